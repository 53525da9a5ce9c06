//! Load balancing over a service's endpoints, and the per-service state that feeds it.
//!
//! Each service has one [`Balancer`]. What the data path reads is an immutable [`Pool`] swapped
//! whole (`ArcSwap`) whenever the configuration or an endpoint's health changes: the priority
//! levels of the endpoints for this proxy (`locality`), each level's share of requests and panic
//! state, and per level (or per weighted locality) the set of endpoints to balance over with the
//! tables its algorithm needs. Picking reads the current pool and touches only atomics and
//! thread-local state: it never takes a lock.
//!
//! Per-endpoint state that must survive configuration updates (requests in flight, the latency
//! estimate, the outlier counters) is [`EndpointStats`], kept by endpoint address for as long as
//! the endpoint is listed, whatever else about it changes.
//!
//! Algorithms, per `LoadBalancer`:
//! - round robin: a precomputed smooth weighted schedule (stride scheduling), walked by an
//!   atomic index;
//! - least request: with equal weights, the less busy of two random endpoints (P2C); with unequal
//!   weights, Envoy's earliest-deadline-first schedule over `weight / (active + 1)`, so a lighter
//!   endpoint keeps its share instead of losing every comparison to a heavier one;
//! - peak EWMA: the same, over the latency estimate times `active + 1` (Linkerd's cost); the
//!   estimate decays toward 0 with the time since its last sample, as tower's and Linkerd's do,
//!   and a failed attempt counts as at least a fixed penalty (keel's addition: tower records a
//!   failure at its own, often tiny, latency, which makes a fast-failing endpoint the cheapest);
//! - random: weighted, by binary search over cumulative weights;
//! - ring hash (1024 entries at least, proportional to weight) and Maglev (65537 slots), on the
//!   request's hash key; requests without a key are placed at random.
//!
//! The earliest-deadline-first schedules are per thread, as Envoy's are per worker: each data
//! path thread keeps its own for the sets it picks from, so nothing is shared or locked.
//!
//! Health: endpoints the control plane reports not ready are never picked; endpoints ejected by
//! outlier detection (`health`) are picked only by a priority in panic. Detections reach the
//! service's maintenance task through a channel; that task (Envoy's main thread, in effect) owns
//! the ejection decisions and rebuilds the pool. Only it and configuration updates take the
//! service's control lock.

use std::cell::RefCell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::{Notify, mpsc};

use crate::config::{
    Config, Endpoint, HashOn, LoadBalancer, LocalityFailover, OutlierDetection, ServicePort,
    TrafficPolicy,
};
use crate::health::{Detector, Monitor, Outcome, Reason, Verdict};
use crate::locality::{self, Client, Counts, Locality};
use crate::metrics::Metrics;
use crate::resilience::{LimitPermit, ServiceLimits};

/// Ring hash: entries on the ring (Envoy's minimum ring size).
const RING_SIZE: usize = 1024;
/// Maglev: the lookup table's size, a prime (Envoy's default).
const MAGLEV_SIZE: usize = 65537;
/// Smooth round robin: the longest precomputed schedule.
const MAX_SCHEDULE: usize = 4096;
/// Peak EWMA: how fast the latency estimate forgets (Linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Peak EWMA: the estimate of an endpoint with no samples yet.
const EWMA_DEFAULT: Duration = Duration::from_millis(1);
/// Peak EWMA: the least a failed attempt (5xx, connect failure, reset, timeout) counts as. A
/// failure is often fast (a refused connection, an immediate 503), and counted at its own
/// elapsed time it would make a failing endpoint look like the cheapest one. Well above any
/// healthy request in a mesh, so a failing endpoint loses P2C comparisons against healthy ones;
/// without new failures the decay brings it back into play in about `EWMA_DECAY * ln(penalty /
/// healthy latency)` (under a minute against 1 ms endpoints).
const EWMA_FAILURE_PENALTY: Duration = Duration::from_millis(250);
/// Envoy's default panic threshold when outlier detection does not set one.
const DEFAULT_PANIC_THRESHOLD: u8 = OutlierDetection::DEFAULT_MIN_HEALTH_PERCENT;
/// How many times a pick is redrawn to avoid endpoints a request already tried (Envoy's
/// `host_selection_retry_max_attempts` for the previous-hosts predicate).
const AVOID_REDRAWS: usize = 3;

/// An endpoint's identity across updates: its address and explicit port.
pub type EndpointKey = (IpAddr, Option<u16>);

/// What survives configuration updates about one endpoint.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    /// Peak EWMA of response latency, in nanoseconds; 0 until the first sample.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds since `epoch`.
    ewma_at: AtomicU64,
    epoch: Instant,
    outlier: Monitor,
}

impl EndpointStats {
    fn new(epoch: Instant) -> EndpointStats {
        EndpointStats {
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            epoch,
            outlier: Monitor::default(),
        }
    }

    fn nanos_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The stored estimate decayed to `now` (nanoseconds), and whether there is one. As in
    /// tower's and Linkerd's peak EWMA, reading the estimate decays it toward 0 with the time
    /// since its last sample (`exp(-elapsed / EWMA_DECAY)`): an endpoint that was slow once and
    /// then got no traffic grows cheaper until it is picked and measured again, instead of
    /// losing every comparison for ever.
    fn ewma_at(&self, now: Instant) -> Option<f64> {
        let stored = self.ewma_ns.load(Ordering::Relaxed);
        if stored == 0 {
            return None;
        }
        let weight = self.decay_weight(self.nanos_since_epoch(now));
        Some(Self::decayed(stored, weight))
    }

    /// How much of the stored estimate is left at `now_ns`: `exp(-elapsed / EWMA_DECAY)` for the
    /// time since its last sample.
    fn decay_weight(&self, now_ns: u64) -> f64 {
        let at = self.ewma_at.load(Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(at) as f64;
        (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// The stored estimate with `weight` of it left; at least 1 ns, so that costs stay finite
    /// and comparable after a very long idle.
    fn decayed(stored: u64, weight: f64) -> f64 {
        (stored as f64 * weight).max(1.0)
    }

    /// Folds a sample taken at `now` into the peak EWMA: a sample above the (decayed) estimate
    /// replaces it at once (the "peak"), a lower one is blended in by the time since the last
    /// sample. The two atomics are written one after the other; a pick reading between them
    /// sees a slightly wrong decay for one comparison, which is harmless.
    fn observe_at(&self, sample: Duration, now: Instant) {
        let sample = sample.as_nanos() as f64;
        let now_ns = self.nanos_since_epoch(now);
        let stored = self.ewma_ns.load(Ordering::Relaxed);
        let next = if stored == 0 {
            sample
        } else {
            // One weight for both the peak test and the blend.
            let weight = self.decay_weight(now_ns);
            if sample > Self::decayed(stored, weight) {
                sample
            } else {
                stored as f64 * weight + sample * (1.0 - weight)
            }
        };
        // 0 means "no sample": a sample of 0 ns is stored as 1 ns.
        self.ewma_ns.store((next as u64).max(1), Ordering::Relaxed);
        self.ewma_at.store(now_ns, Ordering::Relaxed);
    }

    /// Records how an attempt that took `elapsed` ended: its latency, or, if it failed, at least
    /// [`EWMA_FAILURE_PENALTY`].
    fn observe_attempt(&self, elapsed: Duration, failed: bool, now: Instant) {
        let sample = if failed {
            elapsed.max(EWMA_FAILURE_PENALTY)
        } else {
            elapsed
        };
        self.observe_at(sample, now);
    }
}

/// One endpoint as the current configuration describes it, with its lasting stats.
#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    key: EndpointKey,
    stats: Arc<EndpointStats>,
}

impl EndpointState {
    /// The address to connect to for a request to `port` of the service.
    pub fn socket_addr(&self, port: &ServicePort) -> SocketAddr {
        self.endpoint.socket_addr(port)
    }

    pub fn key(&self) -> EndpointKey {
        self.key
    }

    pub fn in_flight(&self) -> u32 {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// [`EndpointState::start`] for a request that started at `now`.
    pub fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: now,
            held: None,
        }
    }

    /// Peak EWMA cost at `now`: the decayed latency estimate times the requests that would queue
    /// behind.
    fn ewma_cost(&self, now: Instant) -> f64 {
        let ewma = self
            .stats
            .ewma_at(now)
            .unwrap_or(EWMA_DEFAULT.as_nanos() as f64);
        ewma * f64::from(self.in_flight() + 1)
    }

    /// Records an attempt that failed without an `InFlight` (an opaque connection that could
    /// not be opened) for peak EWMA.
    pub fn connect_failed(&self, elapsed: Duration) {
        self.stats.observe_attempt(elapsed, true, Instant::now());
    }

    /// How the endpoint is labelled in metrics: its address, with its port if it has its own.
    pub fn label(&self) -> String {
        match self.endpoint.port {
            Some(p) => SocketAddr::new(self.endpoint.address, p).to_string(),
            None => self.endpoint.address.to_string(),
        }
    }
}

/// A request in flight to an endpoint; dropping it ends the request.
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    started: Instant,
    /// A circuit-breaker permit to release with the request.
    held: Option<LimitPermit>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("endpoint", &self.endpoint.key)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    /// Records how the attempt ended for peak EWMA: the time to response headers of a
    /// response, or a failure (a 5xx, a reset, a timeout, no connection), which counts as at
    /// least [`EWMA_FAILURE_PENALTY`].
    pub fn finished(&self, failed: bool) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        self.endpoint.stats.observe_attempt(elapsed, failed, now);
    }

    /// Keeps `permit` until the request ends.
    pub fn hold(&mut self, permit: LimitPermit) {
        self.held = Some(permit);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint
            .stats
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Host sets: the endpoints one pick chooses among, with their algorithm's tables.

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

/// Endpoints to balance over and the tables the algorithm needs.
#[derive(Debug)]
struct HostSet {
    /// Identifies the set to the per-thread EDF schedules.
    id: u64,
    /// Dropped with the set: tells the per-thread schedules it is gone.
    alive: Arc<()>,
    hosts: Vec<Arc<EndpointState>>,
    weights: Vec<u32>,
    equal_weights: bool,
    /// Random: cumulative weights.
    cumulative: Vec<u64>,
    /// Round robin: indices in smooth weighted order, and the next position.
    schedule: Vec<u32>,
    next: AtomicUsize,
    /// Ring hash: (point, index) sorted by point.
    ring: Vec<(u64, u32)>,
    /// Maglev: slot -> index.
    maglev: Vec<u32>,
}

impl HostSet {
    fn new(lb: &LoadBalancer, hosts: Vec<Arc<EndpointState>>) -> HostSet {
        let weights: Vec<u32> = hosts.iter().map(|e| e.endpoint.weight.max(1)).collect();
        let equal_weights = weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += u64::from(*w);
                Some(*sum)
            })
            .collect();
        HostSet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            schedule: match lb {
                LoadBalancer::RoundRobin => smooth_schedule(&weights),
                _ => Vec::new(),
            },
            next: AtomicUsize::new(rand::rng().random::<u32>() as usize),
            ring: match lb {
                LoadBalancer::RingHash(_) => ring(&hosts, &weights),
                _ => Vec::new(),
            },
            maglev: match lb {
                LoadBalancer::Maglev(_) => maglev(&hosts, &weights),
                _ => Vec::new(),
            },
            cumulative,
            equal_weights,
            weights,
            hosts,
        }
    }

    fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// One pick by `lb`; the set is not empty.
    fn pick(&self, lb: &LoadBalancer, hash: Option<u64>) -> usize {
        self.pick_at(lb, hash, Instant::now)
    }

    /// [`HostSet::pick`] with the clock peak EWMA decays by (read only by peak EWMA).
    fn pick_at(&self, lb: &LoadBalancer, hash: Option<u64>, now: impl Fn() -> Instant) -> usize {
        match (lb, hash) {
            (LoadBalancer::RingHash(_), Some(h)) => {
                let at = self.ring.partition_point(|(point, _)| *point < h);
                self.ring[at % self.ring.len()].1 as usize
            }
            (LoadBalancer::Maglev(_), Some(h)) => {
                self.maglev[(h % MAGLEV_SIZE as u64) as usize] as usize
            }
            (LoadBalancer::RoundRobin, _) => {
                let at = self.next.fetch_add(1, Ordering::Relaxed);
                self.schedule[at % self.schedule.len()] as usize
            }
            (LoadBalancer::LeastRequest, _) if self.equal_weights => {
                p2c(&self.hosts, |e| f64::from(e.in_flight()))
            }
            // Envoy's weighted least request: EDF on weight / (active + 1) (active request bias
            // 1.0).
            (LoadBalancer::LeastRequest, _) => {
                edf_pick(self, |e, w| f64::from(w) / f64::from(e.in_flight() + 1))
            }
            (LoadBalancer::PeakEwma, _) if self.equal_weights => {
                let now = now();
                p2c(&self.hosts, |e| e.ewma_cost(now))
            }
            (LoadBalancer::PeakEwma, _) => {
                let now = now();
                edf_pick(self, |e, w| f64::from(w) / e.ewma_cost(now))
            }
            // Random, and hashing balancers for a request that has no hash key.
            _ => self.weighted_random(rand::rng().random()),
        }
    }

    /// The endpoint that owns `point` (any u64) on the line of weights.
    fn weighted_random(&self, point: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0).max(1);
        if self.equal_weights {
            return (point % self.hosts.len() as u64) as usize;
        }
        let at = point % total;
        self.cumulative.partition_point(|c| *c <= at)
    }
}

/// Power of two choices: the cheaper of two distinct random endpoints.
fn p2c(endpoints: &[Arc<EndpointState>], cost: impl Fn(&EndpointState) -> f64) -> usize {
    let n = endpoints.len();
    if n == 1 {
        return 0;
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let b = (a + rng.random_range(1..n)) % n;
    if cost(&endpoints[b]) < cost(&endpoints[a]) {
        b
    } else {
        a
    }
}

/// An earliest-deadline-first schedule (Envoy's `EdfScheduler`): each endpoint's next deadline is
/// the current time plus the inverse of its weight when it was last picked, so over time each is
/// picked in proportion to its (current) weight.
#[derive(Debug)]
struct Edf {
    set: Weak<()>,
    now: f64,
    order: u64,
    queue: BinaryHeap<Deadline>,
}

#[derive(Debug)]
struct Deadline {
    at: f64,
    /// Ties are broken first in, first out.
    order: u64,
    index: u32,
}

impl PartialEq for Deadline {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Deadline {}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Deadline {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest deadline.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.order.cmp(&self.order))
    }
}

impl Edf {
    fn new(set: &HostSet, weight: &impl Fn(&EndpointState, u32) -> f64) -> Edf {
        let mut rng = rand::rng();
        let mut queue = BinaryHeap::with_capacity(set.hosts.len());
        for (i, host) in set.hosts.iter().enumerate() {
            // A random first deadline within each endpoint's period, so that threads and
            // rebuilt schedules do not all start on the same endpoint.
            let w = weight(host, set.weights[i]).max(f64::MIN_POSITIVE);
            queue.push(Deadline {
                at: rng.random::<f64>() / w,
                order: i as u64,
                index: i as u32,
            });
        }
        Edf {
            set: Arc::downgrade(&set.alive),
            now: 0.0,
            order: set.hosts.len() as u64,
            queue,
        }
    }

    fn pick(&mut self, set: &HostSet, weight: &impl Fn(&EndpointState, u32) -> f64) -> usize {
        let Some(top) = self.queue.pop() else {
            return 0;
        };
        self.now = top.at;
        let i = top.index as usize;
        let w = weight(&set.hosts[i], set.weights[i]).max(f64::MIN_POSITIVE);
        self.queue.push(Deadline {
            at: self.now + 1.0 / w,
            order: self.order,
            index: top.index,
        });
        self.order += 1;
        i
    }
}

thread_local! {
    /// This thread's EDF schedules, by host set.
    static SCHEDULES: RefCell<HashMap<u64, Edf>> = RefCell::new(HashMap::new());
}

fn edf_pick(set: &HostSet, weight: impl Fn(&EndpointState, u32) -> f64) -> usize {
    SCHEDULES.with(|cell| {
        let Ok(mut schedules) = cell.try_borrow_mut() else {
            // Re-entered on this thread (it cannot happen: picking does not call out); fall back
            // to a weighted random pick rather than fail.
            return set.weighted_random(rand::rng().random());
        };
        if !schedules.contains_key(&set.id) {
            // Forget the schedules of sets that no longer exist before adding one.
            schedules.retain(|_, edf| edf.set.strong_count() > 0);
            schedules.insert(set.id, Edf::new(set, &weight));
        }
        match schedules.get_mut(&set.id) {
            Some(edf) => edf.pick(set, &weight),
            None => 0,
        }
    })
}

/// A smooth weighted round-robin cycle: each endpoint appears in proportion to its weight,
/// interleaved rather than in runs. Endpoint `i`'s `k`-th turn of `w_i` sits at `(k + 1/2) / w_i`
/// of the cycle, and the cycle is every turn in that order (ties by endpoint order): stride
/// scheduling, whose turns of an endpoint are never more than about `total / w_i + n` apart.
/// Nginx's smooth weighted round robin interleaves a little more evenly but costs
/// O(endpoints) per turn, O(n²) per rebuild once endpoints outnumber [`MAX_SCHEDULE`]; this is
/// a sort, O(t log t) for `t` turns, and a rebuild happens under the service's control lock on
/// every ejection and return.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    // Scale weights down if the full cycle would be too long; every endpoint keeps at least 1.
    let scale = (total as f64 / MAX_SCHEDULE as f64).max(1.0);
    let weights: Vec<u64> = weights
        .iter()
        .map(|w| ((f64::from(*w) / scale).round() as u64).max(1))
        .collect();
    // (2k + 1, w_i, i): the turn's position is (2k + 1) / (2 w_i).
    let mut turns: Vec<(u64, u64, u32)> = Vec::with_capacity(weights.iter().sum::<u64>() as usize);
    for (i, w) in weights.iter().enumerate() {
        turns.extend((0..*w).map(|k| (2 * k + 1, *w, i as u32)));
    }
    turns.sort_unstable_by(|a, b| {
        (u128::from(a.0) * u128::from(b.1))
            .cmp(&(u128::from(b.0) * u128::from(a.1)))
            .then(a.2.cmp(&b.2))
    });
    turns.into_iter().map(|(_, _, i)| i).collect()
}

fn endpoint_hash(e: &EndpointState, salt: u64) -> u64 {
    let key = format!("{}:{}", e.endpoint.address, e.endpoint.port.unwrap_or(0));
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), salt)
}

/// A hash ring with entries in proportion to weight, at least [`RING_SIZE`] in all.
fn ring(endpoints: &[Arc<EndpointState>], weights: &[u32]) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut ring = Vec::with_capacity(RING_SIZE + endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let share = (RING_SIZE as u64 * u64::from(weights[i])).div_ceil(total.max(1));
        for replica in 0..share.max(1) {
            ring.push((endpoint_hash(e, replica), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// The Maglev lookup table (Eisenbud et al., NSDI 2016), weighted by letting an endpoint take
/// as many turns per round as its weight.
fn maglev(endpoints: &[Arc<EndpointState>], weights: &[u32]) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let m = MAGLEV_SIZE as u64;
    let prefs: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| (endpoint_hash(e, 0) % m, endpoint_hash(e, 1) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; endpoints.len()];
    let mut table = vec![u32::MAX; MAGLEV_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in prefs.iter().enumerate() {
            for _ in 0..weights[i] {
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
    }
    table
}

/// The hash key of a request for a consistent-hash balancer.
pub fn hash_key(on: &HashOn, client: IpAddr, headers: Option<&http::HeaderMap>) -> Option<u64> {
    match on {
        HashOn::SourceIp => Some(match client {
            IpAddr::V4(ip) => xxhash_rust::xxh3::xxh3_64(&ip.octets()),
            IpAddr::V6(ip) => xxhash_rust::xxh3::xxh3_64(&ip.octets()),
        }),
        HashOn::Header(name) => headers?
            .get(name)
            .map(|v| xxhash_rust::xxh3::xxh3_64(v.as_bytes())),
        HashOn::Cookie(name) => headers?
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| xxhash_rust::xxh3::xxh3_64(v.as_bytes()))
            }),
    }
}

/// A different, well-mixed value derived from a hash (to choose a priority, then a locality,
/// then an endpoint from one key without correlating the choices).
fn rehash(h: u64, salt: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&h.to_le_bytes(), salt)
}

// ---------------------------------------------------------------------------------------------
// Pools: the immutable picture the data path picks from.

/// One priority level.
#[derive(Debug)]
struct Level {
    /// Percent of requests; the levels' loads add up to 100 when anything is usable.
    load: u32,
    panic: bool,
    /// One set, or one per weighted locality.
    groups: Vec<HostSet>,
    /// Cumulative effective weights of `groups` (when there are several).
    group_weights: Vec<u64>,
}

impl Level {
    fn pick_group(&self, point: u64) -> Option<&HostSet> {
        if self.groups.len() == 1 {
            return self.groups.first().filter(|g| !g.is_empty());
        }
        let total = *self.group_weights.last()?;
        if total == 0 {
            return None;
        }
        let at = point % total;
        self.groups
            .get(self.group_weights.partition_point(|c| *c <= at))
    }
}

/// The balancing picture of one service at one moment.
#[derive(Debug, Default)]
pub struct Pool {
    lb: LoadBalancer,
    /// Every endpoint, ready or not, in the order of the configuration.
    endpoints: Vec<Arc<EndpointState>>,
    levels: Vec<Level>,
    outlier: Option<OutlierDetection>,
}

/// The inputs a pool is built from.
struct PoolSpec<'a> {
    lb: &'a LoadBalancer,
    outlier: Option<&'a OutlierDetection>,
    locality: Option<&'a LocalityFailover>,
    client: &'a Client,
    endpoints: &'a [Arc<EndpointState>],
}

impl Pool {
    fn build(spec: PoolSpec<'_>, ejected: impl Fn(&EndpointKey) -> bool) -> Pool {
        let refs: Vec<&Endpoint> = spec.endpoints.iter().map(|e| &e.endpoint).collect();
        let placement = locality::place(spec.client, &refs, spec.locality);
        let healthy = |e: &EndpointState| e.endpoint.ready && !ejected(&e.key);
        let mut counts = vec![Counts::default(); placement.levels];
        for (e, p) in spec.endpoints.iter().zip(&placement.priority) {
            let Some(c) = p.and_then(|p| counts.get_mut(p)) else {
                continue;
            };
            c.total += 1;
            c.usable += u32::from(e.endpoint.ready);
            c.healthy += u32::from(healthy(e));
        }
        let threshold = spec
            .outlier
            .map_or(DEFAULT_PANIC_THRESHOLD, |o| o.min_health_percent);
        let load = locality::priority_load(&counts, threshold);
        let levels = (0..placement.levels)
            .map(|p| {
                let panic = load.panic[p];
                let members: Vec<(usize, &Arc<EndpointState>)> = spec
                    .endpoints
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| placement.priority[*i] == Some(p))
                    .collect();
                // In panic, every usable endpoint; otherwise the healthy ones.
                let usable = |e: &EndpointState| {
                    if panic { e.endpoint.ready } else { healthy(e) }
                };
                let (groups, group_weights) = match &placement.locality_weight {
                    None => {
                        let hosts = members
                            .iter()
                            .filter(|(_, e)| usable(e))
                            .map(|(_, e)| (*e).clone())
                            .collect();
                        (vec![HostSet::new(spec.lb, hosts)], Vec::new())
                    }
                    Some(weights) => {
                        let mut localities: Vec<(&Locality, u32, Counts, Vec<Arc<EndpointState>>)> =
                            Vec::new();
                        for (i, e) in &members {
                            let l = &e.endpoint.locality;
                            let at = match localities.iter().position(|(x, ..)| *x == l) {
                                Some(at) => at,
                                None => {
                                    localities.push((
                                        l,
                                        weights[*i],
                                        Counts::default(),
                                        Vec::new(),
                                    ));
                                    localities.len() - 1
                                }
                            };
                            let entry = &mut localities[at];
                            entry.2.total += 1;
                            entry.2.usable += u32::from(e.endpoint.ready);
                            entry.2.healthy += u32::from(healthy(e));
                            if usable(e) {
                                entry.3.push((*e).clone());
                            }
                        }
                        let mut sum = 0u64;
                        let mut cumulative = Vec::with_capacity(localities.len());
                        let mut groups = Vec::with_capacity(localities.len());
                        for (_, weight, c, hosts) in localities {
                            sum += locality::effective_locality_weight(weight, c, panic);
                            cumulative.push(sum);
                            groups.push(HostSet::new(spec.lb, hosts));
                        }
                        (groups, cumulative)
                    }
                };
                Level {
                    load: load.load[p],
                    panic,
                    groups,
                    group_weights,
                }
            })
            .collect();
        Pool {
            lb: spec.lb.clone(),
            endpoints: spec.endpoints.to_vec(),
            levels,
            outlier: spec.outlier.cloned(),
        }
    }

    /// One draw: a priority by load, a locality by weight, an endpoint by the algorithm.
    fn draw(&self, hash: Option<u64>, salt: u64) -> Option<&Arc<EndpointState>> {
        let point = |n: u64| match hash {
            Some(h) => rehash(h, salt * 16 + n),
            None => rand::rng().random(),
        };
        let at = (point(1) % 100) as u32 + 1;
        let mut sum = 0;
        let level = self.levels.iter().find(|l| {
            sum += l.load;
            at <= sum
        })?;
        let group = level.pick_group(point(2))?;
        if group.is_empty() {
            return None;
        }
        let key = match (hash, salt) {
            (Some(h), 0) => Some(h),
            (Some(_), _) => Some(point(3)),
            (None, _) => None,
        };
        group.hosts.get(group.pick(&self.lb, key))
    }

    /// An endpoint for a request with `hash` (consistent-hash balancers) that avoids `avoid`
    /// (endpoints the request already tried) when another is available.
    fn pick(&self, hash: Option<u64>, avoid: &[Arc<EndpointState>]) -> Option<Arc<EndpointState>> {
        let avoided = |e: &Arc<EndpointState>| avoid.iter().any(|a| Arc::ptr_eq(a, e));
        let mut last = None;
        for salt in 0..=AVOID_REDRAWS as u64 {
            let Some(e) = self.draw(hash, salt) else {
                break;
            };
            if !avoided(e) {
                return Some(e.clone());
            }
            last = Some(e);
            if avoid.is_empty() {
                break;
            }
        }
        // Every draw hit a tried endpoint: any untried one, best priority first (a retry fails
        // over to the next priority once its own is exhausted), else the last drawn.
        let offset = rand::rng().random::<u32>() as usize;
        for level in &self.levels {
            for group in &level.groups {
                let n = group.hosts.len();
                if let Some(e) = (0..n)
                    .map(|i| &group.hosts[(offset + i) % n])
                    .find(|e| !avoided(e))
                {
                    return Some(e.clone());
                }
            }
        }
        last.cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Balancers

/// A consecutive-failure detection on its way to the maintenance task.
#[derive(Debug)]
struct Detection {
    key: EndpointKey,
    reason: Reason,
}

/// What only configuration updates and the maintenance task touch.
struct Control {
    policy: Option<Arc<TrafficPolicy>>,
    client: Client,
    endpoints: Vec<Arc<EndpointState>>,
    by_key: HashMap<EndpointKey, usize>,
    detector: Detector<EndpointKey>,
    /// When outlier detection next evaluates, if it is on.
    next_tick: Option<Instant>,
    detections: mpsc::UnboundedReceiver<Detection>,
    /// Endpoints with a health gauge (label -> workload), and how many priority gauges are set.
    reported: HashMap<String, String>,
    reported_levels: usize,
}

/// The balancer of one service.
pub struct Balancer {
    service: String,
    pool: ArcSwap<Pool>,
    control: Mutex<Control>,
    detections: mpsc::UnboundedSender<Detection>,
    wake: Arc<Notify>,
    limits: Arc<ServiceLimits>,
    metrics: Arc<Metrics>,
    epoch: Instant,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

fn lock(control: &Mutex<Control>) -> MutexGuard<'_, Control> {
    control.lock().unwrap_or_else(|e| e.into_inner())
}

impl Balancer {
    /// A balancer with no endpoints. Inside a tokio runtime it gets a maintenance task (outlier
    /// detection's decisions and intervals); outside one, [`Balancer::maintain`] must be called.
    pub fn new(service: impl Into<String>, metrics: Arc<Metrics>) -> Arc<Balancer> {
        let (tx, rx) = mpsc::unbounded_channel();
        let balancer = Arc::new(Balancer {
            service: service.into(),
            pool: ArcSwap::from_pointee(Pool::default()),
            control: Mutex::new(Control {
                policy: None,
                client: Client::default(),
                endpoints: Vec::new(),
                by_key: HashMap::new(),
                detector: Detector::default(),
                next_tick: None,
                detections: rx,
                reported: HashMap::new(),
                reported_levels: 0,
            }),
            detections: tx,
            wake: Arc::new(Notify::new()),
            limits: Arc::new(ServiceLimits::default()),
            metrics,
            epoch: Instant::now(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(maintenance(
                Arc::downgrade(&balancer),
                balancer.wake.clone(),
            ));
        }
        balancer
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The service's circuit breakers and retry budget.
    pub fn limits(&self) -> &Arc<ServiceLimits> {
        &self.limits
    }

    /// What this service balances on, if it hashes.
    pub fn hash_on(&self) -> Option<HashOn> {
        match &self.pool.load().lb {
            LoadBalancer::RingHash(h) | LoadBalancer::Maglev(h) => Some(h.clone()),
            _ => None,
        }
    }

    /// Whether the service has endpoints at all (ready or not).
    pub fn has_endpoints(&self) -> bool {
        !self.pool.load().endpoints.is_empty()
    }

    /// Every endpoint, ready or not.
    pub fn endpoints(&self) -> Vec<Arc<EndpointState>> {
        self.pool.load().endpoints.clone()
    }

    /// Picks an endpoint. `hash` is the request's key for consistent-hash balancers; `avoid`
    /// lists endpoints to skip when another is available (those a retried request failed on).
    pub fn pick(
        &self,
        hash: Option<u64>,
        avoid: &[Arc<EndpointState>],
    ) -> Option<Arc<EndpointState>> {
        self.pool.load().pick(hash, avoid)
    }

    /// Records what happened to a request (or an opaque connection) sent to `endpoint`, for
    /// outlier detection.
    pub fn record(&self, endpoint: &EndpointState, outcome: Outcome) {
        let pool = self.pool.load();
        let Some(config) = &pool.outlier else {
            return;
        };
        let detected = endpoint.stats.outlier.record(outcome, config);
        if !detected.any() {
            return;
        }
        for (fired, reason) in [
            (detected.gateway, Reason::ConsecutiveGatewayErrors),
            (detected.consecutive_5xx, Reason::Consecutive5xx),
        ] {
            if fired {
                let _ = self.detections.send(Detection {
                    key: endpoint.key,
                    reason,
                });
            }
        }
        self.wake.notify_one();
    }

    /// Applies a traffic policy and an endpoint list; endpoints keep their stats and outlier
    /// state by address.
    pub fn configure(&self, policy: &Arc<TrafficPolicy>, endpoints: &[Endpoint], client: &Client) {
        let mut control = lock(&self.control);
        let same_policy = control.policy.as_ref().is_some_and(|p| **p == **policy);
        let same_endpoints = control.endpoints.len() == endpoints.len()
            && control
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(a, b)| a.endpoint == *b);
        if same_policy && same_endpoints && control.client == *client {
            return;
        }
        let previous: HashMap<EndpointKey, Arc<EndpointState>> = control
            .endpoints
            .iter()
            .map(|e| (e.key, e.clone()))
            .collect();
        let states: Vec<Arc<EndpointState>> = endpoints
            .iter()
            .map(|e| {
                let key = (e.address, e.port);
                match previous.get(&key) {
                    Some(state) if state.endpoint == *e => state.clone(),
                    // New attributes (weight, locality, readiness...): a new description, the
                    // same stats.
                    Some(state) => Arc::new(EndpointState {
                        endpoint: e.clone(),
                        key,
                        stats: state.stats.clone(),
                    }),
                    None => Arc::new(EndpointState {
                        endpoint: e.clone(),
                        key,
                        stats: Arc::new(EndpointStats::new(self.epoch)),
                    }),
                }
            })
            .collect();
        control.by_key = states.iter().enumerate().map(|(i, e)| (e.key, i)).collect();
        let by_key = &control.by_key;
        let keep: HashSet<EndpointKey> = by_key.keys().copied().collect();
        control.detector.retain(|k| keep.contains(k));
        match &policy.outlier_detection {
            None => {
                control.detector.clear();
                control.next_tick = None;
            }
            Some(o) => {
                let interval_changed = control
                    .policy
                    .as_ref()
                    .and_then(|p| p.outlier_detection.as_ref())
                    .is_none_or(|old| old.interval != o.interval);
                if interval_changed || control.next_tick.is_none() {
                    // An interval too long for the clock means no tick is ever due (the config
                    // builder caps it, but the clock arithmetic must not panic regardless).
                    control.next_tick = Instant::now().checked_add(o.interval);
                }
            }
        }
        self.limits
            .configure(&policy.circuit_breaker, &policy.retry_budget);
        control.policy = Some(policy.clone());
        control.client = client.clone();
        control.endpoints = states;
        self.rebuild(&mut control);
        drop(control);
        // The interval may have changed.
        self.wake.notify_one();
    }

    /// Processes pending detections and, when due, outlier detection's interval; returns when
    /// the next interval is due.
    pub fn maintain(&self, now: Instant) -> Option<Instant> {
        let mut control = lock(&self.control);
        let Some(config) = control
            .policy
            .as_ref()
            .and_then(|p| p.outlier_detection.clone())
        else {
            while control.detections.try_recv().is_ok() {}
            return None;
        };
        let mut changed = false;
        let hosts = control.endpoints.len();
        while let Ok(Detection { key, reason }) = control.detections.try_recv() {
            let Some(state) = control
                .by_key
                .get(&key)
                .map(|i| control.endpoints[*i].clone())
            else {
                continue;
            };
            let verdict =
                control
                    .detector
                    .detected(&key, &state.stats.outlier, reason, now, &config, hosts);
            changed |= self.report_verdict(&state, reason, verdict);
        }
        if control.next_tick.is_some_and(|at| now >= at) {
            let endpoints = control.endpoints.clone();
            let monitors: Vec<(EndpointKey, &Monitor)> = endpoints
                .iter()
                .map(|e| (e.key, &e.stats.outlier))
                .collect();
            let tick = control.detector.tick(now, &config, &monitors);
            for (key, reason) in &tick.ejected {
                if let Some(i) = control.by_key.get(key) {
                    self.report_verdict(&control.endpoints[*i], *reason, Verdict::Ejected);
                }
            }
            for key in &tick.returned {
                if let Some(i) = control.by_key.get(key) {
                    tracing::info!(service = %self.service, endpoint = %control.endpoints[*i].label(), "endpoint returned from ejection");
                }
            }
            for _ in 0..tick.overflow {
                self.metrics.ejection_overflow(&self.service);
            }
            changed |= tick.changed();
            control.next_tick = now.checked_add(config.interval);
        }
        if changed {
            self.rebuild(&mut control);
        }
        control.next_tick
    }

    fn report_verdict(&self, state: &EndpointState, reason: Reason, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Ejected => {
                tracing::info!(service = %self.service, endpoint = %state.label(), reason = reason.as_str(), "endpoint ejected");
                self.metrics
                    .ejection(&self.service, &state.label(), reason.as_str());
                true
            }
            Verdict::Overflow => {
                tracing::debug!(service = %self.service, endpoint = %state.label(), reason = reason.as_str(), "ejection refused: too many endpoints ejected");
                self.metrics.ejection_overflow(&self.service);
                false
            }
            Verdict::AlreadyEjected => false,
        }
    }

    /// Builds and publishes a new pool from the control state, and updates the health gauges.
    fn rebuild(&self, control: &mut Control) {
        let default_policy;
        let policy = match &control.policy {
            Some(p) => p.as_ref(),
            None => {
                default_policy = TrafficPolicy::default_for(&self.service);
                &default_policy
            }
        };
        let detector = &control.detector;
        let pool = Pool::build(
            PoolSpec {
                lb: &policy.load_balancer,
                outlier: policy.outlier_detection.as_ref(),
                locality: policy.locality_failover.as_ref(),
                client: &control.client,
                endpoints: &control.endpoints,
            },
            |k| detector.is_ejected(k),
        );
        let mut reported = HashMap::with_capacity(control.endpoints.len());
        for e in &control.endpoints {
            let label = e.label();
            let healthy = e.endpoint.ready && !detector.is_ejected(&e.key);
            self.metrics
                .endpoint_health(&self.service, &label, &e.endpoint.workload, healthy);
            reported.insert(label, e.endpoint.workload.clone());
        }
        for (gone, workload) in &control.reported {
            if reported.get(gone) != Some(workload) {
                self.metrics.forget_endpoint(&self.service, gone, workload);
            }
        }
        control.reported = reported;
        for (p, level) in pool.levels.iter().enumerate() {
            self.metrics
                .priority_load(&self.service, p, level.load, level.panic);
        }
        for p in pool.levels.len()..control.reported_levels {
            self.metrics.forget_priority(&self.service, p);
        }
        control.reported_levels = pool.levels.len();
        self.pool.store(Arc::new(pool));
    }

    /// Per priority: its share of requests (percent) and whether it is in panic.
    pub fn priority_loads(&self) -> Vec<(u32, bool)> {
        self.pool
            .load()
            .levels
            .iter()
            .map(|l| (l.load, l.panic))
            .collect()
    }

    /// Whether outlier detection has `endpoint` ejected now.
    pub fn is_ejected(&self, endpoint: &EndpointState) -> bool {
        lock(&self.control).detector.is_ejected(&endpoint.key)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let control = lock(&self.control);
        for (label, workload) in &control.reported {
            self.metrics.forget_endpoint(&self.service, label, workload);
        }
        for p in 0..control.reported_levels {
            self.metrics.forget_priority(&self.service, p);
        }
        // Let the maintenance task see that the balancer is gone.
        self.wake.notify_one();
    }
}

/// A service's maintenance task: applies detections as they come and runs outlier detection's
/// interval. Ends when the balancer is dropped.
async fn maintenance(balancer: Weak<Balancer>, wake: Arc<Notify>) {
    let mut next: Option<Instant> = None;
    loop {
        let sleep = async move {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wake.notified() => {}
            () = sleep => {}
        }
        let Some(b) = balancer.upgrade() else {
            return;
        };
        next = b.maintain(Instant::now());
    }
}

/// Every service's balancer, kept in line with each new configuration.
#[derive(Debug)]
pub struct Balancers {
    /// By service name, hashed with Fx: the names come from the configuration, and every
    /// request looks one up.
    by_service: ArcSwap<HashMap<String, Arc<Balancer>, rustc_hash::FxBuildHasher>>,
    locality: Locality,
    metrics: Arc<Metrics>,
}

impl Default for Balancers {
    fn default() -> Self {
        Balancers::new(Locality::default(), Arc::new(Metrics::default()))
    }
}

impl Balancers {
    /// Balancers for a proxy in `locality`.
    pub fn new(locality: Locality, metrics: Arc<Metrics>) -> Balancers {
        Balancers {
            by_service: ArcSwap::from_pointee(HashMap::default()),
            locality,
            metrics,
        }
    }

    /// Brings the balancers in line with `config`: new services get one, removed services lose
    /// theirs, the rest keep their state.
    pub fn update(&self, config: &Config) {
        let client = Client {
            locality: self.locality.clone(),
            labels: config.mesh().workload_labels.clone(),
        };
        let current = self.by_service.load();
        let mut next =
            HashMap::with_capacity_and_hasher(config.services().count(), Default::default());
        for service in config.services() {
            let name = service.name().to_owned();
            let balancer = current
                .get(&name)
                .cloned()
                .unwrap_or_else(|| Balancer::new(name.clone(), self.metrics.clone()));
            balancer.configure(
                &service.traffic_policy,
                &service.endpoints.endpoints,
                &client,
            );
            next.insert(name, balancer);
        }
        self.by_service.store(Arc::new(next));
    }

    pub fn get(&self, service: &str) -> Option<Arc<Balancer>> {
        self.by_service.load().get(service).cloned()
    }
}

#[cfg(test)]
mod tests;
