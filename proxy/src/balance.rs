//! Load balancing over a service's endpoints: weighted round robin (smooth), least request by
//! power of two choices, peak EWMA, random, and consistent hashing (ring hash and Maglev).
//!
//! Each service has one [`Balancer`]. Its endpoint set is an immutable [`Pool`] swapped when the
//! configuration changes; the per-endpoint state that must outlive an update (requests in
//! flight, the latency estimate) lives in [`EndpointState`], kept by endpoint address across
//! updates. Picking never takes a lock: it reads the current pool and touches atomics.
//!
//! Readiness: endpoints the control plane reports not ready are left out; when none is ready,
//! none is picked (the caller answers 503). Outlier ejection and locality priorities build on
//! this module and live in `health` and `locality`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;

use crate::config::{Config, Endpoint, HashOn, LoadBalancer, ServicePort};

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

/// What survives configuration updates about one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    key: EndpointKey,
    in_flight: AtomicU32,
    /// Peak EWMA of response latency, in nanoseconds; 0 until the first sample.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds since the balancer's epoch.
    ewma_at: AtomicU64,
    epoch: Instant,
}

type EndpointKey = (IpAddr, Option<u16>);

impl EndpointState {
    fn new(endpoint: Endpoint, epoch: Instant) -> EndpointState {
        EndpointState {
            key: (endpoint.address, endpoint.port),
            endpoint,
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            epoch,
        }
    }

    /// The address to connect to for a request to `port` of the service.
    pub fn socket_addr(&self, port: &ServicePort) -> SocketAddr {
        self.endpoint.socket_addr(port)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
        }
    }

    /// Folds a latency sample into the peak EWMA: a slower sample replaces the estimate at once
    /// (the "peak"), a faster one decays it with time.
    fn observe(&self, latency: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let sample = latency.as_nanos() as f64;
        let prev = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let elapsed = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }

    /// Peak EWMA cost: estimated latency times the requests that would queue behind.
    fn ewma_cost(&self) -> f64 {
        let ewma = match self.ewma_ns.load(Ordering::Relaxed) {
            0 => EWMA_DEFAULT.as_nanos() as f64,
            v => v as f64,
        };
        ewma * f64::from(self.in_flight() + 1) / f64::from(self.endpoint.weight.max(1))
    }
}

/// A request in flight to an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    started: Instant,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    /// Records the response's latency (time to response headers) for peak EWMA.
    pub fn responded(&self) {
        self.endpoint.observe(self.started.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One immutable endpoint set and the tables precomputed for it.
#[derive(Debug, Default)]
struct Pool {
    lb: LoadBalancer,
    /// Ready endpoints, in the order of the configuration.
    endpoints: Vec<Arc<EndpointState>>,
    /// Round robin: indices into `endpoints`, in smooth weighted order.
    schedule: Vec<u32>,
    /// Ring hash: (point, index) sorted by point.
    ring: Vec<(u64, u32)>,
    /// Maglev: slot -> index.
    maglev: Vec<u32>,
}

/// The balancer of one service.
#[derive(Debug)]
pub struct Balancer {
    service: String,
    pool: ArcSwap<Pool>,
    next: AtomicUsize,
    epoch: Instant,
}

impl Balancer {
    fn new(service: String) -> Balancer {
        Balancer {
            service,
            pool: ArcSwap::from_pointee(Pool::default()),
            next: AtomicUsize::new(rand::rng().random::<u32>() as usize),
            epoch: Instant::now(),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// What hash key this service balances on, if any.
    pub fn hash_on(&self) -> Option<HashOn> {
        match &self.pool.load().lb {
            LoadBalancer::RingHash(h) | LoadBalancer::Maglev(h) => Some(h.clone()),
            _ => None,
        }
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    fn update(&self, lb: &LoadBalancer, endpoints: &[Endpoint]) {
        let current = self.pool.load();
        let mut previous: HashMap<EndpointKey, &Arc<EndpointState>> =
            current.endpoints.iter().map(|e| (e.key, e)).collect();
        let states: Vec<Arc<EndpointState>> = endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| match previous.remove(&(e.address, e.port)) {
                Some(state) if state.endpoint == *e => state.clone(),
                // Same address, new attributes (weight, locality...): new state, same counters
                // would be misleading only for a moment, so start afresh.
                _ => Arc::new(EndpointState::new(e.clone(), self.epoch)),
            })
            .collect();
        let unchanged = current.lb == *lb
            && current.endpoints.len() == states.len()
            && current
                .endpoints
                .iter()
                .zip(&states)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return;
        }
        let weights: Vec<u32> = states.iter().map(|e| e.endpoint.weight.max(1)).collect();
        let pool = Pool {
            lb: lb.clone(),
            schedule: match lb {
                LoadBalancer::RoundRobin => smooth_schedule(&weights),
                _ => Vec::new(),
            },
            ring: match lb {
                LoadBalancer::RingHash(_) => ring(&states, &weights),
                _ => Vec::new(),
            },
            maglev: match lb {
                LoadBalancer::Maglev(_) => maglev(&states, &weights),
                _ => Vec::new(),
            },
            endpoints: states,
        };
        self.pool.store(Arc::new(pool));
    }

    /// Picks an endpoint. `hash` is the request's hash key for consistent-hash balancers;
    /// `avoid` is an endpoint to skip when another exists (a retry after a failure).
    pub fn pick(
        &self,
        hash: Option<u64>,
        avoid: Option<&EndpointState>,
    ) -> Option<Arc<EndpointState>> {
        let pool = self.pool.load();
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let avoided = |i: usize| {
            n > 1 && avoid.is_some_and(|a| std::ptr::eq(a, Arc::as_ptr(&pool.endpoints[i])))
        };
        let index = match (&pool.lb, hash) {
            (LoadBalancer::RingHash(_), Some(h)) => {
                let at = pool.ring.partition_point(|(point, _)| *point < h);
                let (_, i) = pool.ring[at % pool.ring.len()];
                i as usize
            }
            (LoadBalancer::Maglev(_), Some(h)) => {
                pool.maglev[(h % MAGLEV_SIZE as u64) as usize] as usize
            }
            (LoadBalancer::RoundRobin, _) => {
                let at = self.next.fetch_add(1, Ordering::Relaxed);
                pool.schedule[at % pool.schedule.len()] as usize
            }
            // Envoy's weighted least request: (active + 1) / weight, so weights count even when
            // nothing is in flight.
            (LoadBalancer::LeastRequest, _) => p2c(&pool.endpoints, |e| {
                f64::from(e.in_flight() + 1) / f64::from(e.endpoint.weight.max(1))
            }),
            (LoadBalancer::PeakEwma, _) => p2c(&pool.endpoints, EndpointState::ewma_cost),
            // Random, and hashing balancers for a request that has no hash key.
            _ => weighted_random(&pool.endpoints),
        };
        let index = if avoided(index) {
            (index + 1) % n
        } else {
            index
        };
        Some(pool.endpoints[index].clone())
    }

    /// The ready endpoints, for status.
    pub fn endpoints(&self) -> Vec<Arc<EndpointState>> {
        self.pool.load().endpoints.clone()
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

fn weighted_random(endpoints: &[Arc<EndpointState>]) -> usize {
    let total: u64 = endpoints
        .iter()
        .map(|e| u64::from(e.endpoint.weight.max(1)))
        .sum();
    let mut point = rand::rng().random_range(0..total.max(1));
    for (i, e) in endpoints.iter().enumerate() {
        let w = u64::from(e.endpoint.weight.max(1));
        if point < w {
            return i;
        }
        point -= w;
    }
    endpoints.len() - 1
}

/// Nginx's smooth weighted round robin, unrolled into a schedule: each endpoint appears in
/// proportion to its weight, interleaved rather than in runs.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    // Scale weights down if the full cycle would be too long; every endpoint keeps at least 1.
    let scale = (total as f64 / MAX_SCHEDULE as f64).max(1.0);
    let weights: Vec<i64> = weights
        .iter()
        .map(|w| ((f64::from(*w) / scale).round() as i64).max(1))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
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

/// Every service's balancer, rebuilt from each new configuration.
#[derive(Debug, Default)]
pub struct Balancers {
    by_service: ArcSwap<HashMap<String, Arc<Balancer>>>,
}

impl Balancers {
    /// Brings the balancers in line with `config`: new services get one, removed services lose
    /// theirs, the rest keep their state.
    pub fn update(&self, config: &Config) {
        let current = self.by_service.load();
        let mut next = HashMap::with_capacity(config.services().count());
        for service in config.services() {
            let name = service.name().to_owned();
            let balancer = current
                .get(&name)
                .cloned()
                .unwrap_or_else(|| Arc::new(Balancer::new(name.clone())));
            balancer.update(
                &service.traffic_policy.load_balancer,
                &service.endpoints.endpoints,
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
mod tests {
    use super::*;
    use crate::config::Locality;

    fn endpoint(last: u8, weight: u32) -> Endpoint {
        Endpoint {
            address: IpAddr::from([10, 0, 0, last]),
            port: None,
            weight,
            locality: Locality::default(),
            identity: None,
            ready: true,
            workload: format!("demo/w{last}"),
            meshed: true,
            labels: std::collections::BTreeMap::new(),
        }
    }

    fn balancer(lb: LoadBalancer, endpoints: &[Endpoint]) -> Balancer {
        let b = Balancer::new("demo/svc".to_owned());
        b.update(&lb, endpoints);
        b
    }

    fn last_octet(e: &EndpointState) -> u8 {
        match e.endpoint.address {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let b = balancer(
            LoadBalancer::RoundRobin,
            &[endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)],
        );
        let mut counts = [0; 4];
        for _ in 0..300 {
            counts[last_octet(&b.pick(None, None).expect("pick")) as usize] += 1;
        }
        assert_eq!(&counts[1..], [100, 100, 100]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let b = balancer(
            LoadBalancer::LeastRequest,
            &[endpoint(1, 1), endpoint(2, 1)],
        );
        let busy = b
            .endpoints()
            .into_iter()
            .find(|e| last_octet(e) == 1)
            .expect("endpoint 1");
        let _held: Vec<_> = (0..10).map(|_| busy.start()).collect();
        for _ in 0..100 {
            assert_eq!(last_octet(&b.pick(None, None).expect("pick")), 2);
        }
    }

    #[test]
    fn least_request_honours_weights_when_idle() {
        let b = balancer(
            LoadBalancer::LeastRequest,
            &[endpoint(1, 1), endpoint(2, 3)],
        );
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[last_octet(&b.pick(None, None).expect("pick")) as usize] += 1;
        }
        // With two endpoints P2C compares both every time: the heavier one always wins a tie.
        assert!(counts[2] > counts[1] * 2, "{counts:?}");
    }

    #[test]
    fn state_survives_an_update_and_not_ready_endpoints_are_skipped() {
        let b = balancer(
            LoadBalancer::LeastRequest,
            &[endpoint(1, 1), endpoint(2, 1)],
        );
        let first = b.pick(None, None).expect("pick");
        let guard = first.start();
        let mut not_ready = endpoint(2, 1);
        not_ready.ready = false;
        let kept = if last_octet(&first) == 1 {
            endpoint(1, 1)
        } else {
            endpoint(2, 1)
        };
        b.update(
            &LoadBalancer::LeastRequest,
            &[kept, not_ready, endpoint(3, 1)],
        );
        let after = b.endpoints();
        let same = after
            .iter()
            .find(|e| last_octet(e) == last_octet(&first))
            .expect("kept");
        assert!(Arc::ptr_eq(same, &first) || last_octet(&first) == 2);
        if last_octet(&first) == 1 {
            assert_eq!(same.in_flight(), 1);
        }
        drop(guard);
        assert!(after.iter().all(|e| e.endpoint.ready));
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_little() {
        for lb in [
            LoadBalancer::RingHash(HashOn::SourceIp),
            LoadBalancer::Maglev(HashOn::SourceIp),
        ] {
            let four: Vec<_> = (1..=4).map(|i| endpoint(i, 1)).collect();
            let b = balancer(lb.clone(), &four);
            let keys: Vec<u64> = (0..2000u32)
                .map(|i| {
                    hash_key(&HashOn::SourceIp, IpAddr::from(i.to_be_bytes()), None).expect("key")
                })
                .collect();
            let before: Vec<u8> = keys
                .iter()
                .map(|k| last_octet(&b.pick(Some(*k), None).expect("pick")))
                .collect();
            let again: Vec<u8> = keys
                .iter()
                .map(|k| last_octet(&b.pick(Some(*k), None).expect("pick")))
                .collect();
            assert_eq!(before, again, "{lb:?} is not stable");
            // Remove one endpoint: keys on the others mostly stay put.
            b.update(&lb, &four[..3]);
            let moved = keys
                .iter()
                .zip(&before)
                .filter(|(k, was)| {
                    **was != 4 && last_octet(&b.pick(Some(**k), None).expect("pick")) != **was
                })
                .count();
            assert!(
                moved < keys.len() / 10,
                "{lb:?} moved {moved} of {}",
                keys.len()
            );
            // Every endpoint gets a fair share.
            let mut counts = [0usize; 5];
            for k in &keys {
                counts[last_octet(&b.pick(Some(*k), None).expect("pick")) as usize] += 1;
            }
            assert!(
                counts[1..4].iter().all(|c| *c > keys.len() / 6),
                "{lb:?} {counts:?}"
            );
        }
    }

    #[test]
    fn avoid_picks_another_endpoint_when_there_is_one() {
        let b = balancer(LoadBalancer::RoundRobin, &[endpoint(1, 1), endpoint(2, 1)]);
        for _ in 0..10 {
            let first = b.pick(None, None).expect("pick");
            let retry = b.pick(None, Some(&first)).expect("pick");
            assert!(!Arc::ptr_eq(&first, &retry));
        }
        let one = balancer(LoadBalancer::RoundRobin, &[endpoint(1, 1)]);
        let only = one.pick(None, None).expect("pick");
        assert!(Arc::ptr_eq(
            &only,
            &one.pick(None, Some(&only)).expect("pick")
        ));
    }

    #[test]
    fn cookie_and_header_keys() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            "a=1; session=abc".parse().expect("value"),
        );
        headers.insert("x-user", "u1".parse().expect("value"));
        let ip = IpAddr::from([10, 0, 0, 1]);
        let by_cookie = hash_key(&HashOn::Cookie("session".into()), ip, Some(&headers));
        assert_eq!(by_cookie, Some(xxhash_rust::xxh3::xxh3_64(b"abc")));
        let name = http::HeaderName::from_static("x-user");
        assert!(hash_key(&HashOn::Header(name), ip, Some(&headers)).is_some());
        assert!(hash_key(&HashOn::Cookie("none".into()), ip, Some(&headers)).is_none());
    }
}
