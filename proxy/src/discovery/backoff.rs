//! Retry delays: exponential back-off with jitter (AWS's "Exponential Backoff and Jitter"): the
//! n-th consecutive failure waits a random time below the ceiling `min(max, base * 2^n)`, so a
//! fleet of proxies that lost the control plane together does not come back together. With
//! [`Jitter::Full`] (discovery's reconnects) the wait is uniform in `[0, ceiling]`; with
//! [`Jitter::Equal`] (certificate requests) in `[ceiling / 2, ceiling]`, so that even the first
//! retry waits: a request the control plane just refused is not sent again at once.
//!
//! This module must never produce a delay above the configured maximum.

use std::time::Duration;

use rand::Rng;

/// Where in `[0, ceiling]` a delay falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Anywhere in `[0, ceiling]`.
    #[default]
    Full,
    /// In `[ceiling / 2, ceiling]`.
    Equal,
}

/// How a client spaces its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// The largest delay.
    pub max: Duration,
    /// A stream that delivered a response and stayed up this long was healthy: the next
    /// failure starts again from `base`.
    pub healthy_after: Duration,
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(100),
            max: Duration::from_secs(15),
            healthy_after: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }
}

/// The delays of one run of consecutive failures.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            config,
            failures: 0,
        }
    }

    pub(crate) fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// The upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.max)
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let floor = match self.config.jitter {
            Jitter::Full => 0,
            Jitter::Equal => nanos / 2,
        };
        Duration::from_nanos(rand::rng().random_range(floor..=nanos))
    }

    /// The last stream was healthy: start again from `base`.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(100),
            max: Duration::from_secs(15),
            healthy_after: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }

    #[test]
    fn equal_jitter_never_waits_less_than_half_the_ceiling() {
        let config = BackoffConfig {
            jitter: Jitter::Equal,
            ..config()
        };
        for _ in 0..100 {
            let mut backoff = Backoff::new(config);
            for _ in 0..12 {
                let ceiling = backoff.ceiling();
                let delay = backoff.next_delay();
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
        // The first retry in particular.
        let first = Backoff::new(config).next_delay();
        assert!(first >= Duration::from_millis(50), "{first:?}");
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let mut backoff = Backoff::new(config());
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay();
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000, 15000]
        );
    }

    #[test]
    fn delays_stay_within_their_ceiling_even_after_many_failures() {
        let mut backoff = Backoff::new(config());
        for _ in 0..200 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay <= ceiling && ceiling <= config().max);
        }
    }

    #[test]
    fn delays_are_jittered() {
        let mut backoff = Backoff::new(config());
        for _ in 0..8 {
            backoff.next_delay();
        }
        let delays: std::collections::HashSet<Duration> =
            (0..32).map(|_| backoff.next_delay()).collect();
        assert!(delays.len() > 1, "32 delays were all equal");
    }

    #[test]
    fn reset_starts_over_from_base() {
        let mut backoff = Backoff::new(config());
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), config().base);
    }
}
