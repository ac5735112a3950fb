//! Per-key token buckets for the endpoints that attract abuse: guessing passwords, registering,
//! the unauthenticated directory, and flooding rooms or devices.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use ruma::UserId;
use ruma::api::client::uiaa::AuthData;

use crate::error::ApiError;

/// One configured limit: a sustained rate and the burst allowed on top of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// How many checks pass between sweeps of idle keys, which bounds the limiter's memory.
const SWEEP_EVERY_CHECKS: u64 = 4_096;

pub struct KeyedLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

impl KeyedLimiter {
    /// `None` disables the limit (tests, benchmarks, or an operator's choice).
    pub fn new(limit: Option<RateLimit>) -> Self {
        let limiter = limit.and_then(|limit| {
            let period = Duration::from_secs_f64(1.0 / limit.per_second.max(f64::MIN_POSITIVE));
            let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(limit.burst.max(1))?);
            Some(DefaultKeyedRateLimiter::keyed(quota))
        });
        Self { limiter, checks: AtomicU64::new(0) }
    }

    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(SWEEP_EVERY_CHECKS) {
            limiter.retain_recent();
        }
        limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited { retry_after_ms: wait.as_millis().max(1) as u64 }
        })
    }
}

/// The limits the client API applies.
pub struct RateLimits {
    pub login_per_ip: KeyedLimiter,
    pub login_per_user: KeyedLimiter,
    pub registration_per_ip: KeyedLimiter,
    pub uia_password_per_ip: KeyedLimiter,
    pub uia_password_per_user: KeyedLimiter,
    pub public_rooms_per_ip: KeyedLimiter,
    pub message_per_user: KeyedLimiter,
    pub room_creation_per_user: KeyedLimiter,
    pub invite_per_user: KeyedLimiter,
    pub join_per_user: KeyedLimiter,
    pub to_device_per_user: KeyedLimiter,
    /// Authenticated server-server requests, per origin server.
    pub federation_per_origin: KeyedLimiter,
    /// The unauthenticated notary API (`/_matrix/key/v2/query`), which fetches other servers'
    /// keys on a miss.
    pub key_query_per_ip: KeyedLimiter,
    pub url_preview_per_user: KeyedLimiter,
    pub delayed_events_per_key: KeyedLimiter,
}

impl RateLimits {
    /// Counts an `m.login.password` stage of user-interactive auth against the client's address
    /// and the account: a stolen access token must not become a way to guess the password
    /// without the login limits. Other stages (and bodies without `auth`) pass.
    pub fn check_password_stage(&self, ip_key: &str, user: &UserId, auth: Option<&AuthData>) -> Result<(), ApiError> {
        if !matches!(auth, Some(AuthData::Password(_))) {
            return Ok(());
        }
        self.uia_password_per_ip.check(ip_key)?;
        self.uia_password_per_user.check(user.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_next_request_waits() {
        let limiter = KeyedLimiter::new(Some(RateLimit { per_second: 0.1, burst: 3 }));
        for _ in 0..3 {
            limiter.check("1.2.3.4").unwrap();
        }
        match limiter.check("1.2.3.4") {
            Err(ApiError::RateLimited { retry_after_ms }) => assert!(retry_after_ms > 1_000),
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Other keys have their own bucket.
        limiter.check("5.6.7.8").unwrap();
    }

    #[test]
    fn no_limit_means_no_limit() {
        let limiter = KeyedLimiter::new(None);
        for _ in 0..10_000 {
            limiter.check("k").unwrap();
        }
    }
}
