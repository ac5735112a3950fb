//! Per-origin limits on inbound federation: how many requests of one server are handled at
//! once, how many may wait, and which client addresses are refused for a while after too many
//! requests that failed authentication.
//!
//! A server that floods this one slows only itself: its requests queue behind its own, and past
//! the queue get `429` (senders back off on it). Addresses sending badly signed requests are
//! cut off before their requests cost a signature check or a key fetch from the named origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::OwnedServerName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::rate_limit::{KeyedLimiter, RateLimit};

/// How long a request that finds its origin's queue full is told to wait before retrying.
const QUEUE_FULL_RETRY_MS: u64 = 1_000;
/// Past this many blocked addresses, expired ones are swept on the next block.
const BLOCKED_SWEEP_SIZE: usize = 10_000;

/// Concurrency and queue bounds per origin server.
pub struct OriginGate {
    concurrent: usize,
    queued: usize,
    origins: Arc<Mutex<HashMap<OwnedServerName, Arc<OriginSlot>>>>,
}

struct OriginSlot {
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit (changed under the map's lock).
    waiting: Mutex<usize>,
}

/// Held while one request of an origin is handled; dropping it lets the next one in.
pub struct OriginPermit {
    permit: Option<OwnedSemaphorePermit>,
    origin: OwnedServerName,
    origins: Arc<Mutex<HashMap<OwnedServerName, Arc<OriginSlot>>>>,
    concurrent: usize,
}

/// Takes a waiting request off its slot's count, also when the request is dropped while waiting
/// (the peer hung up).
struct Waiting<'a>(&'a OriginSlot);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.0.waiting.lock().unwrap_or_else(|e| e.into_inner());
        *waiting = waiting.saturating_sub(1);
    }
}

impl OriginGate {
    /// `concurrent` requests of one origin at a time (at least 1), `queued` more waiting.
    pub fn new(concurrent: usize, queued: usize) -> Self {
        Self { concurrent: concurrent.max(1), queued, origins: Arc::default() }
    }

    /// Waits for a turn of `origin`; `429` when `queued` of its requests already wait.
    pub async fn enter(&self, origin: &OwnedServerName) -> Result<OriginPermit, ApiError> {
        let slot = {
            let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            let slot = origins
                .entry(origin.clone())
                .or_insert_with(|| {
                    Arc::new(OriginSlot { permits: Arc::new(Semaphore::new(self.concurrent)), waiting: Mutex::new(0) })
                })
                .clone();
            let mut waiting = slot.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if slot.permits.available_permits() == 0 && *waiting >= self.queued {
                tracing::info!(%origin, queued = *waiting, "federation requests of this origin over the queue bound");
                return Err(ApiError::RateLimited { retry_after_ms: QUEUE_FULL_RETRY_MS });
            }
            *waiting += 1;
            drop(waiting);
            slot
        };
        let waiting = Waiting(&slot);
        // The semaphore is never closed, so acquiring only waits.
        let permit = slot.permits.clone().acquire_owned().await.ok();
        drop(waiting);
        Ok(OriginPermit { permit, origin: origin.clone(), origins: self.origins.clone(), concurrent: self.concurrent })
    }

    /// Origins with a slot (busy, waiting, or not yet swept); for tests.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.origins.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for OriginPermit {
    /// Releases the turn and forgets the origin once nothing of it is running or waiting, so
    /// the map holds only busy origins.
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        let idle = origins.get(&self.origin).is_some_and(|slot| {
            slot.permits.available_permits() == self.concurrent
                && *slot.waiting.lock().unwrap_or_else(|e| e.into_inner()) == 0
        });
        if idle {
            origins.remove(&self.origin);
        }
    }
}

/// Client addresses refused for a while after too many failed authentications.
pub struct FailedAuthGate {
    failures: KeyedLimiter,
    blocked: Mutex<HashMap<String, Instant>>,
}

impl FailedAuthGate {
    /// `None` never blocks.
    pub fn new(limit: Option<RateLimit>) -> Self {
        Self { failures: KeyedLimiter::new(limit), blocked: Mutex::default() }
    }

    /// `429` while `address` is blocked. An unknown address (empty) is never blocked: it would
    /// put every peer in one bucket.
    pub fn check(&self, address: &str) -> Result<(), ApiError> {
        if address.is_empty() {
            return Ok(());
        }
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let Some(until) = blocked.get(address).copied() else { return Ok(()) };
        let now = Instant::now();
        if until <= now {
            blocked.remove(address);
            return Ok(());
        }
        let wait = until.duration_since(now).as_millis().max(1) as u64;
        Err(ApiError::RateLimited { retry_after_ms: wait })
    }

    /// Counts one failed authentication from `address`; past the limit it is blocked until the
    /// limit would let its next attempt through.
    pub fn record_failure(&self, address: &str) {
        if address.is_empty() {
            return;
        }
        let Err(ApiError::RateLimited { retry_after_ms }) = self.failures.check(address) else { return };
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= BLOCKED_SWEEP_SIZE {
            blocked.retain(|_, until| *until > now);
        }
        tracing::warn!(%address, retry_after_ms, "too many failed federation authentications; address blocked");
        blocked.insert(address.to_owned(), now + Duration::from_millis(retry_after_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(name: &str) -> OwnedServerName {
        name.try_into().expect("server name")
    }

    #[tokio::test]
    async fn a_busy_origin_queues_up_to_its_bound_and_other_origins_pass() {
        let gate = Arc::new(OriginGate::new(1, 1));
        let first = gate.enter(&origin("a.test")).await.expect("first runs");
        let queued = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.enter(&origin("a.test")).await.map(|_| ()) })
        };
        // Let the second request reach the queue.
        while gate.origins.lock().unwrap().get(&origin("a.test")).is_none_or(|s| *s.waiting.lock().unwrap() == 0) {
            tokio::task::yield_now().await;
        }
        let refused = gate.enter(&origin("a.test")).await;
        assert!(matches!(refused, Err(ApiError::RateLimited { .. })), "third request of a.test over the queue");
        let other = gate.enter(&origin("b.test")).await.expect("another origin is not held up");
        drop(first);
        queued.await.expect("task").expect("the queued request ran once the first ended");
        drop(other);
        assert_eq!(gate.tracked(), 0, "idle origins are forgotten");
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_leaves_the_queue() {
        let gate = Arc::new(OriginGate::new(1, 1));
        let first = gate.enter(&origin("a.test")).await.expect("first runs");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.enter(&origin("a.test")).await.map(|_| ()) })
        };
        while gate.origins.lock().unwrap().get(&origin("a.test")).is_none_or(|s| *s.waiting.lock().unwrap() == 0) {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        let second = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter(&origin("a.test")).await.map(|_| ()) }
        });
        drop(first);
        second.await.expect("task").expect("the queue slot of the dropped request is free again");
        assert_eq!(gate.tracked(), 0);
    }

    #[test]
    fn an_address_is_blocked_only_after_its_failure_budget() {
        let gate = FailedAuthGate::new(Some(RateLimit { per_second: 0.001, burst: 2 }));
        gate.record_failure("192.0.2.1");
        gate.record_failure("192.0.2.1");
        gate.check("192.0.2.1").expect("two failures are within the budget");
        gate.record_failure("192.0.2.1");
        assert!(matches!(gate.check("192.0.2.1"), Err(ApiError::RateLimited { .. })));
        gate.check("192.0.2.2").expect("other addresses pass");
        let off = FailedAuthGate::new(None);
        for _ in 0..100 {
            off.record_failure("192.0.2.1");
        }
        off.check("192.0.2.1").expect("no limit configured, never blocked");
    }
}
