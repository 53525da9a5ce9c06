//! Outlier ejection: passive health checking of each endpoint from the outcomes of the requests
//! the proxy sends it, as Envoy's outlier detection does it (checked against
//! `source/common/upstream/outlier_detection_impl.cc`).
//!
//! Two halves:
//! - [`Monitor`], per endpoint, on the data path: atomic counters of consecutive 5xx and gateway
//!   errors and of the current interval's requests and failures. Recording an outcome never
//!   blocks; when a consecutive counter *reaches* its threshold, [`Monitor::record`] says so and
//!   the caller hands the detection to the service's maintenance task.
//! - [`Detector`], per service, owned by that task (Envoy's main thread): it decides ejections
//!   (respecting the maximum ejection percentage), returns ejected endpoints once their ejection
//!   time has passed, and every interval evaluates success rate and failure percentage.
//!
//! Semantics, with Envoy's defaults where keel has the knob: consecutive 5xx (default 5);
//! consecutive gateway errors (502, 503, 504, connect failures, resets and timeouts; off unless
//! set, as in Istio); ejection time = base x multiplier, capped at the maximum, the multiplier
//! growing with each ejection (while `multiplier x base < max + base`) and shrinking by one every
//! interval an endpoint stays back; success rate (eject below `mean - factor x stdev` among
//! endpoints with enough requests, when enough endpoints qualify); failure percentage. Local
//! failures count as Envoy counts them without split mode: a connect failure is a 503, a timeout
//! a 504, a reset after the request was sent a 502, and an opaque connection that opens is a
//! success.
//!
//! Where keel differs from Envoy, on purpose:
//! - the control plane's default maximum ejection percentage is 100, not 10: with 10%, a zone
//!   of two endpoints dying in a service of six keeps one dead endpoint unejected and most of
//!   its zone's load, so locality failover never completes; the panic threshold (kept at
//!   Envoy's 50%) is what stops ejection from leaving too few endpoints. The percentage is
//!   counted over all of a service's endpoints, every priority included, as Envoy counts it;
//! - at least one endpoint may always be ejected when none is (Envoy's `always_eject_one_host`),
//!   unless the maximum ejection percentage is 0: with a configured 10%, services of fewer
//!   than ten endpoints would otherwise never eject anything, and those are most services;
//! - no `enforcing_*` percentages and no ejection jitter: a configured detector always enforces,
//!   and a disabled one is simply absent;
//! - no active health checks, so nothing but time returns an ejected endpoint.
//!
//! An endpoint that accepts requests and never answers produces an outcome only when a timeout
//! ends one of its requests (a `Timeout`, counted as a 504): the route's timeout, or its retry
//! policy's per-try timeout. Routes have neither by default (see `resilience`), so outlier
//! detection ejects a hanging endpoint only on routes that set one; until then, least request
//! (the default balancer) sends it fewer and fewer requests as its requests in flight pile up.
//!
//! Nothing here blocks, and nothing here is called with a lock the data path needs.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::config::OutlierDetection;

/// What happened to one request (or one opaque connection) sent to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No connection could be made to it (or its sidecar could not reach its app).
    ConnectFailed,
    /// The request was sent, and the connection or the stream failed before a response.
    Reset,
    /// No response within a timeout.
    Timeout,
    /// An opaque TCP connection to it opened; nothing more will be learnt about it.
    Connected,
}

impl Outcome {
    /// The status Envoy maps an outcome to when it does not split local from external failures.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Status(code) => code,
            Outcome::ConnectFailed => 503,
            Outcome::Reset => 502,
            Outcome::Timeout => 504,
            Outcome::Connected => 200,
        }
    }
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGatewayErrors,
    SuccessRate,
    FailurePercentage,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
            Reason::SuccessRate => "success_rate",
            Reason::FailurePercentage => "failure_percentage",
        }
    }
}

/// Which consecutive-failure detectors an outcome triggered (their counters just reached the
/// threshold).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detected {
    pub consecutive_5xx: bool,
    pub gateway: bool,
}

impl Detected {
    pub fn any(self) -> bool {
        self.consecutive_5xx || self.gateway
    }
}

/// One endpoint's counters, written by the data path.
#[derive(Debug, Default)]
pub struct Monitor {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Requests and failures (5xx) in the current interval, for success rate and failure
    /// percentage.
    requests: AtomicU64,
    failures: AtomicU64,
}

impl Monitor {
    /// Counts one outcome under `config`.
    pub fn record(&self, outcome: Outcome, config: &OutlierDetection) -> Detected {
        let status = outcome.status();
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !(500..600).contains(&status) {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            return Detected::default();
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let gateway = if matches!(status, 502..=504) {
            // `==`, not `>=`: one detection per run; the detector resets the counter.
            self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                == config.consecutive_gateway_errors
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            false
        };
        let consecutive_5xx =
            self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1 == config.consecutive_5xx;
        Detected {
            consecutive_5xx,
            gateway,
        }
    }

    fn reset(&self, reason: Reason) {
        match reason {
            Reason::Consecutive5xx => self.consecutive_5xx.store(0, Ordering::Relaxed),
            Reason::ConsecutiveGatewayErrors => {
                self.consecutive_gateway.store(0, Ordering::Relaxed)
            }
            Reason::SuccessRate | Reason::FailurePercentage => {}
        }
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// The interval that just ended: (requests, failures), and a fresh one begins.
    fn take_interval(&self) -> (u64, u64) {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let failures = self.failures.swap(0, Ordering::Relaxed);
        (requests, failures.min(requests))
    }
}

/// What the detector decided about one detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ejected,
    /// Ejecting it would exceed the maximum ejection percentage.
    Overflow,
    AlreadyEjected,
}

/// What one interval tick changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick<K> {
    pub returned: Vec<K>,
    pub ejected: Vec<(K, Reason)>,
    pub overflow: u32,
}

impl<K> Default for Tick<K> {
    fn default() -> Self {
        Tick {
            returned: Vec::new(),
            ejected: Vec::new(),
            overflow: 0,
        }
    }
}

impl<K> Tick<K> {
    pub fn changed(&self) -> bool {
        !self.returned.is_empty() || !self.ejected.is_empty()
    }
}

/// One endpoint's ejection history.
#[derive(Debug, Default, Clone)]
struct Record {
    /// `Some` while ejected.
    ejected_at: Option<Instant>,
    /// The ejection time multiplier.
    backoff: u32,
    returned_at: Option<Instant>,
}

/// A service's ejection decisions, keyed by endpoint.
#[derive(Debug)]
pub struct Detector<K> {
    records: HashMap<K, Record>,
}

impl<K> Default for Detector<K> {
    fn default() -> Self {
        Detector {
            records: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Detector<K> {
    pub fn is_ejected(&self, key: &K) -> bool {
        self.records
            .get(key)
            .is_some_and(|r| r.ejected_at.is_some())
    }

    pub fn ejected(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.ejected_at.is_some())
            .count()
    }

    /// The current ejection time multiplier of an endpoint (0 when it never was ejected or has
    /// been back long enough).
    pub fn multiplier(&self, key: &K) -> u32 {
        self.records.get(key).map_or(0, |r| r.backoff)
    }

    /// Forgets endpoints that are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.records.retain(|k, _| keep(k));
    }

    /// Returns every endpoint at once (outlier detection was turned off).
    pub fn clear(&mut self) {
        self.records.clear();
    }

    /// A consecutive-failure detector fired for `key` (one of `hosts` endpoints).
    pub fn detected(
        &mut self,
        key: &K,
        monitor: &Monitor,
        reason: Reason,
        now: Instant,
        config: &OutlierDetection,
        hosts: usize,
    ) -> Verdict {
        if self.is_ejected(key) {
            return Verdict::AlreadyEjected;
        }
        // Reset here rather than on the data path, so that a bout of failures is detected again
        // even if it is not interrupted by a success.
        monitor.reset(reason);
        self.eject(key, now, config, hosts)
    }

    fn eject(&mut self, key: &K, now: Instant, config: &OutlierDetection, hosts: usize) -> Verdict {
        let active = self.ejected();
        let max = f64::from(config.max_ejection_percent);
        let within = 100.0 * (active as f64 + 1.0) / (hosts.max(1) as f64) <= max;
        let first = active == 0 && config.max_ejection_percent > 0;
        if !(within || first) {
            return Verdict::Overflow;
        }
        let record = self.records.entry(key.clone()).or_default();
        record.ejected_at = Some(now);
        let base = config.base_ejection_time.as_secs_f64();
        let max_time = config.max_ejection_time.as_secs_f64();
        if f64::from(record.backoff) * base < max_time + base {
            record.backoff += 1;
        }
        Verdict::Ejected
    }

    /// One evaluation interval has passed: returns endpoints whose ejection is over, decays the
    /// multipliers of endpoints that stayed back, and runs success-rate and failure-percentage
    /// detection over the interval's counts.
    pub fn tick(
        &mut self,
        now: Instant,
        config: &OutlierDetection,
        monitors: &[(K, &Monitor)],
    ) -> Tick<K> {
        let mut tick = Tick::default();
        let base = config.base_ejection_time;
        let mut samples: Vec<(&K, f64, u64)> = Vec::with_capacity(monitors.len());
        for (key, monitor) in monitors {
            let (requests, failures) = monitor.take_interval();
            let record = self.records.entry(key.clone()).or_default();
            match record.ejected_at {
                Some(at) => {
                    let time = base
                        .saturating_mul(record.backoff.max(1))
                        .min(config.max_ejection_time);
                    if now.saturating_duration_since(at) >= time {
                        record.ejected_at = None;
                        record.returned_at = Some(now);
                        // A nearly full counter must not re-eject on very few new errors.
                        monitor.reset_consecutive();
                        tick.returned.push(key.clone());
                    }
                }
                None => {
                    if record
                        .returned_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= config.interval)
                    {
                        record.backoff = record.backoff.saturating_sub(1);
                    }
                    if requests > 0 {
                        let rate = 100.0 * (requests - failures) as f64 / requests as f64;
                        samples.push((key, rate, requests));
                    }
                }
            }
        }
        // Endpoints that just came back have no interval of their own yet: not sampled.
        let hosts = monitors.len();
        let mut outliers: Vec<(K, Reason)> = Vec::new();
        if let Some(sr) = &config.success_rate {
            let valid: Vec<&(&K, f64, u64)> = samples
                .iter()
                .filter(|(_, _, volume)| *volume >= u64::from(sr.request_volume.max(1)))
                .collect();
            if !valid.is_empty() && valid.len() >= sr.minimum_hosts as usize {
                let (_, threshold) =
                    success_rate_threshold(valid.iter().map(|(_, r, _)| *r), sr.stdev_factor);
                for (key, rate, _) in &valid {
                    if *rate < threshold {
                        outliers.push(((*key).clone(), Reason::SuccessRate));
                    }
                }
            }
        }
        if let Some(fp) = &config.failure_percentage {
            let valid: Vec<&(&K, f64, u64)> = samples
                .iter()
                .filter(|(_, _, volume)| *volume >= u64::from(fp.request_volume.max(1)))
                .collect();
            if !valid.is_empty() && valid.len() >= fp.minimum_hosts as usize {
                for (key, rate, _) in &valid {
                    if 100.0 - rate >= f64::from(fp.threshold) {
                        outliers.push(((*key).clone(), Reason::FailurePercentage));
                    }
                }
            }
        }
        for (key, reason) in outliers {
            match self.eject_unless_ejected(&key, now, config, hosts) {
                Verdict::Ejected => tick.ejected.push((key, reason)),
                Verdict::Overflow => tick.overflow += 1,
                Verdict::AlreadyEjected => {}
            }
        }
        tick
    }

    fn eject_unless_ejected(
        &mut self,
        key: &K,
        now: Instant,
        config: &OutlierDetection,
        hosts: usize,
    ) -> Verdict {
        if self.is_ejected(key) {
            Verdict::AlreadyEjected
        } else {
            self.eject(key, now, config, hosts)
        }
    }
}

/// The mean of `rates` and the ejection threshold `mean - factor x stdev` (population standard
/// deviation), as Envoy computes it.
pub fn success_rate_threshold(rates: impl Iterator<Item = f64> + Clone, factor: f64) -> (f64, f64) {
    let (sum, n) = rates
        .clone()
        .fold((0.0, 0usize), |(s, n), r| (s + r, n + 1));
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let variance = rates.map(|r| (r - mean).powi(2)).sum::<f64>() / n as f64;
    (mean, mean - factor * variance.sqrt())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{FailurePercentageEjection, SuccessRateEjection};

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 50,
            success_rate: None,
            failure_percentage: None,
        }
    }

    #[test]
    fn consecutive_5xx_fires_once_at_the_threshold() {
        let c = config();
        let m = Monitor::default();
        for _ in 0..4 {
            assert!(!m.record(Outcome::Status(500), &c).any());
        }
        assert!(m.record(Outcome::Status(503), &c).consecutive_5xx);
        // Past the threshold it does not fire again until the detector resets it.
        assert!(!m.record(Outcome::Status(500), &c).any());
        // A success resets the run.
        m.record(Outcome::Status(200), &c);
        for _ in 0..4 {
            assert!(!m.record(Outcome::ConnectFailed, &c).any());
        }
        assert!(m.record(Outcome::Timeout, &c).consecutive_5xx);
    }

    #[test]
    fn gateway_errors_count_local_failures_and_reset_on_other_5xx() {
        let mut c = config();
        c.consecutive_5xx = 0;
        c.consecutive_gateway_errors = 3;
        let m = Monitor::default();
        m.record(Outcome::ConnectFailed, &c);
        m.record(Outcome::Reset, &c);
        // A 500 is not a gateway error: the gateway run starts over.
        m.record(Outcome::Status(500), &c);
        m.record(Outcome::Status(502), &c);
        m.record(Outcome::Timeout, &c);
        let d = m.record(Outcome::Status(504), &c);
        assert!(d.gateway && !d.consecutive_5xx);
        // An opened opaque connection is a success.
        m.record(Outcome::Connected, &c);
        assert_eq!(m.consecutive_gateway.load(Ordering::Relaxed), 0);
    }

    fn ejected_now(
        d: &mut Detector<u8>,
        key: u8,
        m: &Monitor,
        now: Instant,
        c: &OutlierDetection,
        hosts: usize,
    ) -> Verdict {
        d.detected(&key, m, Reason::Consecutive5xx, now, c, hosts)
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_decays() {
        let c = config();
        let m = Monitor::default();
        let mut d = Detector::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(ejected_now(&mut d, 1, &m, t0, &c, 1), Verdict::Ejected);
        assert_eq!(
            ejected_now(&mut d, 1, &m, t0, &c, 1),
            Verdict::AlreadyEjected
        );
        // Checked at interval ticks: still out at 20 s, back at 30 s (base x 1).
        assert!(d.tick(t0 + s(20), &c, &[(1, &m)]).returned.is_empty());
        assert_eq!(d.tick(t0 + s(30), &c, &[(1, &m)]).returned, [1]);
        // Ejected again at once: base x 2.
        ejected_now(&mut d, 1, &m, t0 + s(31), &c, 1);
        assert_eq!(d.multiplier(&1), 2);
        assert!(d.tick(t0 + s(81), &c, &[(1, &m)]).returned.is_empty());
        assert_eq!(d.tick(t0 + s(91), &c, &[(1, &m)]).returned, [1]);
        // Back and healthy: the multiplier drops by one per interval.
        d.tick(t0 + s(101), &c, &[(1, &m)]);
        assert_eq!(d.multiplier(&1), 1);
        d.tick(t0 + s(111), &c, &[(1, &m)]);
        assert_eq!(d.multiplier(&1), 0);
        d.tick(t0 + s(121), &c, &[(1, &m)]);
        assert_eq!(d.multiplier(&1), 0);
    }

    #[test]
    fn ejection_time_is_capped_at_the_maximum() {
        let c = config();
        let m = Monitor::default();
        let mut d = Detector::default();
        let mut now = Instant::now();
        for _ in 0..20 {
            ejected_now(&mut d, 1, &m, now, &c, 1);
            // Return it as soon as allowed, never letting the multiplier decay.
            let mut at = now;
            loop {
                at += c.interval;
                if !d.tick(at, &c, &[(1, &m)]).returned.is_empty() {
                    break;
                }
            }
            assert!(at - now <= c.max_ejection_time + c.interval);
            now = at;
        }
        // Envoy stops growing once multiplier x base >= max + base: 11 x 30 s.
        assert_eq!(d.multiplier(&1), 11);
    }

    #[test]
    fn max_ejection_percent_with_at_least_one() {
        let c = config(); // 10%
        let m = Monitor::default();
        let now = Instant::now();
        // Three endpoints: 10% would allow none; keel allows one.
        let mut d = Detector::default();
        assert_eq!(ejected_now(&mut d, 1, &m, now, &c, 3), Verdict::Ejected);
        assert_eq!(ejected_now(&mut d, 2, &m, now, &c, 3), Verdict::Overflow);
        // Twenty endpoints at 10%: two.
        let mut d = Detector::default();
        assert_eq!(ejected_now(&mut d, 1, &m, now, &c, 20), Verdict::Ejected);
        assert_eq!(ejected_now(&mut d, 2, &m, now, &c, 20), Verdict::Ejected);
        assert_eq!(ejected_now(&mut d, 3, &m, now, &c, 20), Verdict::Overflow);
        // 0% ejects nothing at all.
        let mut none = config();
        none.max_ejection_percent = 0;
        let mut d = Detector::default();
        assert_eq!(ejected_now(&mut d, 1, &m, now, &none, 3), Verdict::Overflow);
        // 100% ejects everything.
        let mut all = config();
        all.max_ejection_percent = 100;
        let mut d = Detector::default();
        for k in 1..=3 {
            assert_eq!(ejected_now(&mut d, k, &m, now, &all, 3), Verdict::Ejected);
        }
    }

    #[test]
    fn success_rate_threshold_matches_envoy() {
        let (mean, threshold) =
            success_rate_threshold([50.0, 100.0, 100.0, 100.0, 100.0].into_iter(), 1.9);
        assert!((mean - 90.0).abs() < 1e-9);
        assert!((threshold - 52.0).abs() < 1e-9);
    }

    fn fill(m: &Monitor, ok: u32, failed: u32, c: &OutlierDetection) {
        for _ in 0..ok {
            m.record(Outcome::Status(200), c);
        }
        for _ in 0..failed {
            m.record(Outcome::Status(500), c);
        }
    }

    #[test]
    fn success_rate_ejects_the_outlier() {
        let mut c = config();
        c.consecutive_5xx = 0;
        c.max_ejection_percent = 100;
        c.success_rate = Some(SuccessRateEjection {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        });
        let monitors: Vec<Monitor> = (0..5).map(|_| Monitor::default()).collect();
        // Host 0 at 50%, the others at 100%: threshold 52, host 0 is out.
        fill(&monitors[0], 50, 50, &c);
        for m in &monitors[1..] {
            fill(m, 100, 0, &c);
        }
        let refs: Vec<(usize, &Monitor)> = monitors.iter().enumerate().collect();
        let mut d = Detector::default();
        let tick = d.tick(Instant::now(), &c, &refs);
        assert_eq!(tick.ejected, [(0, Reason::SuccessRate)]);
        // The next interval has no samples: nothing more happens.
        assert!(!d.tick(Instant::now(), &c, &refs).changed());
        // Too little volume on one host: fewer than five qualify, no decision.
        let mut d = Detector::default();
        fill(&monitors[0], 50, 50, &c);
        for m in &monitors[1..4] {
            fill(m, 100, 0, &c);
        }
        fill(&monitors[4], 10, 0, &c);
        assert!(!d.tick(Instant::now(), &c, &refs).changed());
    }

    #[test]
    fn failure_percentage_ejects_above_the_threshold() {
        let mut c = config();
        c.consecutive_5xx = 0;
        c.max_ejection_percent = 100;
        c.failure_percentage = Some(FailurePercentageEjection {
            threshold: 85,
            minimum_hosts: 2,
            request_volume: 50,
        });
        let monitors: Vec<Monitor> = (0..3).map(|_| Monitor::default()).collect();
        fill(&monitors[0], 10, 90, &c);
        fill(&monitors[1], 20, 80, &c);
        fill(&monitors[2], 100, 0, &c);
        let refs: Vec<(usize, &Monitor)> = monitors.iter().enumerate().collect();
        let mut d = Detector::default();
        let tick = d.tick(Instant::now(), &c, &refs);
        assert_eq!(tick.ejected, [(0, Reason::FailurePercentage)]);
    }
}
