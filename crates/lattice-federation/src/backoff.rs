//! Per-destination exponential back-off: a destination that failed is not tried again before its
//! back-off ends, so one dead server costs one failed attempt per back-off period, not one per
//! request.

use std::sync::Mutex;

use crate::bounded::BoundedMap;

/// The first back-off after a failure.
pub const FIRST_BACKOFF_MS: u64 = 2_000;
/// Back-off never grows past this.
pub const MAX_BACKOFF_MS: u64 = 3600 * 1000;
/// How many failing destinations are remembered (the oldest failure is forgotten first).
pub const MAX_TRACKED_DESTINATIONS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failing {
    consecutive_failures: u32,
    retry_at_ms: u64,
}

pub struct Backoff {
    failing: Mutex<BoundedMap<String, Failing>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { failing: Mutex::new(BoundedMap::new(MAX_TRACKED_DESTINATIONS)) }
    }
}

/// The back-off after `consecutive_failures` failures in a row: 2 s, 4 s, 8 s, … at most an hour.
pub fn backoff_ms(consecutive_failures: u32) -> u64 {
    let doublings = consecutive_failures.saturating_sub(1).min(30);
    FIRST_BACKOFF_MS.saturating_mul(1u64 << doublings).min(MAX_BACKOFF_MS)
}

impl Backoff {
    /// `Err(ms)` while `destination` is backing off: how long until it may be tried again.
    pub fn check(&self, destination: &str, now_ms: u64) -> Result<(), u64> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match failing.get(destination) {
            Some(state) if state.retry_at_ms > now_ms => Err(state.retry_at_ms - now_ms),
            _ => Ok(()),
        }
    }

    pub fn failed(&self, destination: &str, now_ms: u64) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let failures = failing.get(destination).map_or(0, |s| s.consecutive_failures).saturating_add(1);
        let state =
            Failing { consecutive_failures: failures, retry_at_ms: now_ms.saturating_add(backoff_ms(failures)) };
        failing.insert(destination.to_owned(), state, now_ms);
    }

    /// Clears `destination`'s back-off; returns whether it was backing off.
    pub fn succeeded(&self, destination: &str) -> bool {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).remove(destination).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let expected = [(1, 2_000), (2, 4_000), (3, 8_000), (12, MAX_BACKOFF_MS), (100, MAX_BACKOFF_MS)];
        for (failures, ms) in expected {
            assert_eq!(backoff_ms(failures), ms, "{failures}");
        }
    }

    #[test]
    fn a_failed_destination_waits_and_success_clears_it() {
        let backoff = Backoff::default();
        assert_eq!(backoff.check("a.example", 0), Ok(()));
        backoff.failed("a.example", 1_000);
        assert_eq!(backoff.check("a.example", 1_500), Err(1_500));
        assert_eq!(backoff.check("b.example", 1_500), Ok(()), "other destinations are not affected");
        assert_eq!(backoff.check("a.example", 3_000), Ok(()));
        backoff.failed("a.example", 3_000);
        assert_eq!(backoff.check("a.example", 6_999), Err(1));
        backoff.succeeded("a.example");
        assert_eq!(backoff.check("a.example", 3_001), Ok(()));
    }
}
