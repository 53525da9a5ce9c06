//! Load runs disturbed from outside the machine. On a virtual machine the host may give this
//! machine's CPUs to other guests while it has work to run (steal); a run during which that
//! happened measures the host as much as the proxy: a few 10 ms pauses put a millisecond into
//! the p99 of an open loop at 2000 req/s. Such a run is measured again, and the attempt with
//! the least steal is kept. Steal is measured independently of the proxy under test, so the
//! choice cannot favour one proxy over another.

use std::io;
use std::time::{Duration, Instant};

use anyhow::Context;

/// When a run counts as disturbed, and how often it is measured again.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Steal allowed, as a share of the machine's CPU time during the run (all CPUs), in
    /// percent.
    pub percent: f64,
    /// Attempts after the first.
    pub retries: u32,
    /// The machine's CPUs: steal is summed over all of them.
    pub cpus: u32,
}

impl Limit {
    /// The most steal a run that took `elapsed` may see and still count.
    pub fn allowed(&self, elapsed: Duration) -> Duration {
        elapsed.mul_f64(f64::from(self.cpus) * self.percent / 100.0)
    }
}

/// What a run came to once it was measured as often as it took.
#[derive(Debug)]
pub struct Attempts<T> {
    /// The attempt with the least steal (the first of equals).
    pub kept: T,
    /// The steal during the kept attempt.
    pub stolen: Duration,
    /// The other attempts, in the order they ran: no figure may come from them, but what they
    /// sent and the errors they saw still count.
    pub set_aside: Vec<T>,
}

/// Runs `load` once, and again (up to `limit.retries` more times) while every attempt so far
/// saw more steal than `limit` allows; `steal` reads the machine's steal counter.
pub async fn least_disturbed<T>(
    limit: Limit,
    mut steal: impl FnMut() -> io::Result<Duration>,
    mut load: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Attempts<T>> {
    let mut attempts: Vec<(T, Duration)> = Vec::new();
    loop {
        let before = steal().context("reading the host's steal time")?;
        let started = Instant::now();
        let value = load().await?;
        let elapsed = started.elapsed();
        let stolen = steal()
            .context("reading the host's steal time")?
            .saturating_sub(before);
        let disturbed = stolen > limit.allowed(elapsed);
        attempts.push((value, stolen));
        if !disturbed || attempts.len() > limit.retries as usize {
            break;
        }
    }
    let best = attempts
        .iter()
        .enumerate()
        .min_by_key(|(i, (_, stolen))| (*stolen, *i))
        .map(|(i, _)| i)
        .expect("at least one attempt ran");
    let (kept, stolen) = attempts.remove(best);
    Ok(Attempts {
        kept,
        stolen,
        set_aside: attempts.into_iter().map(|(value, _)| value).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MS: Duration = Duration::from_millis(1);

    /// A steal counter that grows by the next of `steps` during each attempt.
    fn counter(steps: &[u64]) -> (Cell<Duration>, Vec<Duration>) {
        (
            Cell::new(Duration::ZERO),
            steps.iter().map(|ms| MS * *ms as u32).collect(),
        )
    }

    async fn run(limit: Limit, steps: &[u64]) -> Attempts<usize> {
        let (clock, steps) = counter(steps);
        let attempt = Cell::new(0usize);
        least_disturbed(
            limit,
            || Ok(clock.get()),
            async || {
                let n = attempt.get();
                clock.set(clock.get() + steps[n]);
                attempt.set(n + 1);
                Ok(n)
            },
        )
        .await
        .unwrap()
    }

    // The attempts below take microseconds, so any steal during one is over a 1% limit.
    const LIMIT: Limit = Limit {
        percent: 1.0,
        retries: 2,
        cpus: 2,
    };

    #[tokio::test]
    async fn a_quiet_run_is_measured_once() {
        let attempts = run(LIMIT, &[0]).await;
        assert_eq!((attempts.kept, attempts.stolen), (0, Duration::ZERO));
        assert!(attempts.set_aside.is_empty());
    }

    #[tokio::test]
    async fn a_disturbed_run_is_measured_again_until_one_is_quiet() {
        let attempts = run(LIMIT, &[40, 0]).await;
        assert_eq!((attempts.kept, attempts.stolen), (1, Duration::ZERO));
        assert_eq!(attempts.set_aside, vec![0]);
    }

    #[tokio::test]
    async fn after_the_retries_the_least_disturbed_attempt_is_kept() {
        let attempts = run(LIMIT, &[40, 10, 30]).await;
        assert_eq!((attempts.kept, attempts.stolen), (1, MS * 10));
        assert_eq!(attempts.set_aside, vec![0, 2]);
    }

    #[tokio::test]
    async fn without_retries_the_first_attempt_is_kept() {
        let limit = Limit {
            retries: 0,
            ..LIMIT
        };
        let attempts = run(limit, &[40]).await;
        assert_eq!((attempts.kept, attempts.stolen), (0, MS * 40));
        assert!(attempts.set_aside.is_empty());
    }

    #[test]
    fn the_allowance_is_a_share_of_all_cpus_time() {
        let limit = Limit {
            percent: 0.5,
            retries: 2,
            cpus: 2,
        };
        assert_eq!(limit.allowed(Duration::from_secs(12)), MS * 120);
    }
}
