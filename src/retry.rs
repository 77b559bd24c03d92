//! Retry timing as pure functions: the delay before attempt n+1, and `Retry-After`.

use std::time::Duration;

use rand::Rng;

use crate::config::{RetryParams, RetryPolicyKind};

/// Longest `Retry-After` we honour; a sink asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay after the `attempt`-th failed attempt (1-based), before jitter is drawn
/// from `unit` (a uniform sample in [0, 1)).
pub fn retry_delay(params: &RetryParams, attempt: u32, unit: f64) -> Duration {
    let base = params.base_delay.as_secs_f64();
    let cap = params.max_delay.as_secs_f64();
    let exp = attempt.saturating_sub(1).min(62) as i32;
    let ceiling = (base * 2f64.powi(exp)).min(cap);
    let unit = unit.clamp(0.0, 1.0);
    let secs = match params.policy {
        RetryPolicyKind::Fixed => base.min(cap),
        // AWS "full jitter": uniform in [0, ceiling]
        RetryPolicyKind::Exponential => ceiling * unit,
        // half fixed, half jittered: uniform in [ceiling/2, ceiling]
        RetryPolicyKind::EqualJitter => ceiling / 2.0 + ceiling / 2.0 * unit,
    };
    Duration::from_secs_f64(secs.max(0.0))
}

/// `retry_delay` with a random jitter sample, never shorter than the sink's
/// `Retry-After`.
pub fn next_delay(params: &RetryParams, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let unit: f64 = rand::rng().random();
    let delay = retry_delay(params, attempt, unit);
    match retry_after {
        Some(ra) => delay.max(ra.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// Parse a `Retry-After` header: delta-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    // an HTTP date in any of the three forms a recipient must accept (RFC 9110
    // §5.6.7): IMF-fixdate, RFC 850, asctime
    let when: chrono::DateTime<chrono::Utc> = httpdate::parse_http_date(value).ok()?.into();
    let delta = when - now;
    Some(
        delta
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(policy: RetryPolicyKind) -> RetryParams {
        RetryParams {
            policy,
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }

    #[test]
    fn exponential_is_full_jitter_under_a_doubling_ceiling() {
        let p = params(RetryPolicyKind::Exponential);
        assert_eq!(retry_delay(&p, 1, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(&p, 3, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(&p, 3, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(&p, 3, 0.5), Duration::from_secs(2));
        // capped at max_delay
        assert_eq!(retry_delay(&p, 30, 1.0), Duration::from_secs(60));
        assert_eq!(retry_delay(&p, u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn equal_jitter_keeps_half_the_ceiling() {
        let p = params(RetryPolicyKind::EqualJitter);
        assert_eq!(retry_delay(&p, 4, 0.0), Duration::from_secs(4));
        assert_eq!(retry_delay(&p, 4, 1.0), Duration::from_secs(8));
    }

    #[test]
    fn fixed_ignores_the_attempt() {
        let p = params(RetryPolicyKind::Fixed);
        assert_eq!(retry_delay(&p, 1, 0.3), Duration::from_secs(1));
        assert_eq!(retry_delay(&p, 9, 0.9), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = params(RetryPolicyKind::Fixed);
        let d = next_delay(&p, 1, Some(Duration::from_secs(30)));
        assert_eq!(d, Duration::from_secs(30));
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        // the two obsolete forms a recipient must accept too (RFC 9110 §5.6.7)
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:40 GMT", now),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:28:50 2015", now),
            Some(Duration::from_secs(50))
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
