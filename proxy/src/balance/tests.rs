use std::collections::BTreeMap;

use super::*;
use crate::config::{DistributeRule, LocalityPattern};

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
        mtls: false,
        labels: BTreeMap::new(),
    }
}

fn in_zone(last: u8, zone: &str) -> Endpoint {
    let mut e = endpoint(last, 1);
    e.locality = Locality {
        region: "r1".into(),
        zone: zone.into(),
        subzone: String::new(),
    };
    e
}

fn policy(lb: LoadBalancer) -> TrafficPolicy {
    let mut p = TrafficPolicy::default_for("demo/svc");
    p.load_balancer = lb;
    p
}

fn outlier() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: 5,
        consecutive_gateway_errors: 0,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(10),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: 100,
        min_health_percent: 50,
        success_rate: None,
        failure_percentage: None,
    }
}

fn client_in(zone: &str) -> Client {
    Client {
        locality: in_zone(0, zone).locality,
        labels: BTreeMap::new(),
    }
}

fn balancer_with(policy: TrafficPolicy, endpoints: &[Endpoint], client: &Client) -> Arc<Balancer> {
    let b = Balancer::new("demo/svc", Arc::new(Metrics::default()));
    b.configure(&Arc::new(policy), endpoints, client);
    b
}

fn balancer(lb: LoadBalancer, endpoints: &[Endpoint]) -> Arc<Balancer> {
    balancer_with(policy(lb), endpoints, &Client::default())
}

fn last_octet(e: &EndpointState) -> u8 {
    match e.endpoint.address {
        IpAddr::V4(ip) => ip.octets()[3],
        IpAddr::V6(_) => 0,
    }
}

fn counts(b: &Balancer, picks: usize) -> [usize; 16] {
    let mut counts = [0; 16];
    for _ in 0..picks {
        counts[last_octet(&b.pick(None, &[]).expect("pick")) as usize] += 1;
    }
    counts
}

fn find(b: &Balancer, last: u8) -> Arc<EndpointState> {
    b.endpoints()
        .into_iter()
        .find(|e| last_octet(e) == last)
        .expect("endpoint")
}

#[test]
fn smooth_round_robin_interleaves_by_weight() {
    // Turns at (k + 1/2) / w: 0 at 0.1, 0.3, 0.5, 0.7, 0.9; 1 and 2 at 0.5.
    assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 0, 1, 2, 0, 0]);
    assert_eq!(smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
    assert_eq!(smooth_schedule(&[1, 3]), [1, 0, 1, 1]);
    // Any weights: each endpoint its weight's worth of turns per cycle, spread out: between two
    // of its turns (cyclically) at most (total - w) / w + n others.
    let mut rng = rand::rng();
    for _ in 0..50 {
        let n = rng.random_range(1..40);
        let weights: Vec<u32> = (0..n).map(|_| rng.random_range(1..20)).collect();
        let schedule = smooth_schedule(&weights);
        let total: u32 = weights.iter().sum();
        assert_eq!(schedule.len() as u32, total);
        for (i, w) in weights.iter().enumerate() {
            let at: Vec<usize> = (0..schedule.len())
                .filter(|p| schedule[*p] as usize == i)
                .collect();
            assert_eq!(at.len() as u32, *w, "{weights:?}");
            let bound = ((total - w) / w) as usize + n;
            for (k, p) in at.iter().enumerate() {
                let next = at.get(k + 1).copied().unwrap_or(at[0] + schedule.len());
                assert!(
                    next - p - 1 <= bound,
                    "endpoint {i} waits {} turns (bound {bound}) in {schedule:?} for {weights:?}",
                    next - p - 1
                );
            }
        }
    }
    // Past MAX_SCHEDULE endpoints every one keeps a turn.
    let many = smooth_schedule(&vec![1; MAX_SCHEDULE * 3]);
    assert_eq!(many.len(), MAX_SCHEDULE * 3);
    assert!(many.iter().enumerate().all(|(p, i)| *i as usize == p));
    let b = balancer(
        LoadBalancer::RoundRobin,
        &[endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)],
    );
    assert_eq!(&counts(&b, 300)[1..4], [100, 100, 100]);
    let weighted = balancer(LoadBalancer::RoundRobin, &[endpoint(1, 1), endpoint(2, 3)]);
    assert_eq!(&counts(&weighted, 400)[1..3], [100, 300]);
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let b = balancer(
        LoadBalancer::LeastRequest,
        &[endpoint(1, 1), endpoint(2, 1)],
    );
    let _held: Vec<_> = (0..10).map(|_| find(&b, 1).start()).collect();
    for _ in 0..100 {
        assert_eq!(last_octet(&b.pick(None, &[]).expect("pick")), 2);
    }
}

#[test]
fn weighted_least_request_keeps_the_lighter_endpoint_in_proportion() {
    // The defect this replaces: with two endpoints P2C compares both every time, and
    // (active + 1) / weight always prefers the heavier one when idle, so weight 1 got nothing.
    let b = balancer(
        LoadBalancer::LeastRequest,
        &[endpoint(1, 1), endpoint(2, 3)],
    );
    let c = counts(&b, 4000);
    // EDF gives exact proportions over each cycle: 1000 and 3000, give or take the start.
    assert!(c[1].abs_diff(1000) <= 4, "{c:?}");
    assert!(c[2].abs_diff(3000) <= 4, "{c:?}");
    // Under load the weights bend: with 8 requests held on the heavy endpoint its weight is
    // 3 / 9 against 1 / 1, so the light one takes three quarters of new requests.
    let _held: Vec<_> = (0..8).map(|_| find(&b, 2).start()).collect();
    let c = counts(&b, 4000);
    assert!(c[1] > 2800 && c[2] > 800, "{c:?}");
}

#[test]
fn peak_ewma_prefers_the_faster_endpoint() {
    let b = balancer(LoadBalancer::PeakEwma, &[endpoint(1, 1), endpoint(2, 1)]);
    let slow = find(&b, 1);
    let now = Instant::now();
    slow.stats.observe_at(Duration::from_millis(50), now);
    find(&b, 2).stats.observe_at(Duration::from_millis(1), now);
    let c = counts(&b, 200);
    assert_eq!(c[2], 200, "{c:?}");
    // With unequal weights the EDF still gives the slow endpoint some share.
    let weighted = balancer(LoadBalancer::PeakEwma, &[endpoint(1, 1), endpoint(2, 3)]);
    let c = counts(&weighted, 400);
    assert!(c[1] > 50 && c[2] > 250, "{c:?}");
}

/// A host set of `endpoints` as one level of a pool holds it.
fn host_set(lb: &LoadBalancer, endpoints: &[Endpoint]) -> HostSet {
    let epoch = Instant::now();
    let hosts = endpoints
        .iter()
        .map(|e| {
            Arc::new(EndpointState {
                endpoint: e.clone(),
                key: (e.address, e.port),
                stats: Arc::new(EndpointStats::new(epoch)),
            })
        })
        .collect();
    HostSet::new(lb, hosts)
}

/// A sample below the decayed estimate is blended in by the time since the last one; one above
/// it replaces the estimate.
#[test]
fn peak_ewma_blends_a_lower_sample_and_takes_a_higher_one() {
    let t0 = Instant::now();
    let stats = EndpointStats::new(t0);
    assert_eq!(stats.ewma_at(t0), None, "no estimate before a sample");
    stats.observe_at(Duration::from_millis(10), t0);
    // One decay period later, e^-1 of the estimate is left: 10 ms decays to 3.68 ms, and a
    // 2 ms sample (lower) is blended in: 10 * e^-1 + 2 * (1 - e^-1) = 4.94 ms.
    let t1 = t0 + EWMA_DECAY;
    let decayed = stats.ewma_at(t1).expect("an estimate");
    assert!((decayed - 10e6 * (-1f64).exp()).abs() < 10.0, "{decayed}");
    stats.observe_at(Duration::from_millis(2), t1);
    let blended = 10e6 * (-1f64).exp() + 2e6 * (1.0 - (-1f64).exp());
    let got = stats.ewma_at(t1).expect("an estimate");
    assert!((got - blended).abs() < 10.0, "{got} against {blended}");
    // A 20 ms sample is above the estimate: it becomes the estimate at once.
    stats.observe_at(Duration::from_millis(20), t1);
    let got = stats.ewma_at(t1).expect("an estimate");
    assert!((got - 20e6).abs() < 1.0, "{got}");
}

#[test]
fn peak_ewma_decays_so_a_once_slow_endpoint_is_tried_again() {
    let set = host_set(&LoadBalancer::PeakEwma, &[endpoint(1, 1), endpoint(2, 1)]);
    let (slow, fast) = (&set.hosts[0], &set.hosts[1]);
    let t0 = Instant::now();
    // One slow response from endpoint 1, then light traffic (one request a second, nothing in
    // flight when the next is picked), every response taking 1 ms wherever it goes.
    slow.stats.observe_at(Duration::from_secs(1), t0);
    fast.stats.observe_at(Duration::from_millis(1), t0);
    let mut back = None;
    for second in 1..=300u64 {
        let now = t0 + Duration::from_secs(second);
        let picked = &set.hosts[set.pick_at(&LoadBalancer::PeakEwma, None, || now)];
        picked.stats.observe_at(Duration::from_millis(1), now);
        if Arc::ptr_eq(picked, slow) {
            back = Some(second);
            break;
        }
    }
    // Without decay the estimate stays at 1 s and endpoint 1 never wins again. With it, 1 s
    // decays below the other's 1 ms after 10 s * ln(1000), about 69 s.
    let back = back.expect("the once-slow endpoint is never picked again");
    assert!((60..=80).contains(&back), "picked again after {back} s");
    // Its fresh sample (above the decayed estimate) replaced it: 1 ms, like the other's.
    let now = t0 + Duration::from_secs(back);
    let cost = slow.ewma_cost(now);
    assert!((cost - 1e6).abs() < 1.0, "{cost}");
}

#[test]
fn peak_ewma_does_not_prefer_an_endpoint_that_fails_fast() {
    let set = host_set(
        &LoadBalancer::PeakEwma,
        &[endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)],
    );
    let t0 = Instant::now();
    // Endpoint 1 refuses connections in 50 µs; the others answer in 20 ms.
    set.hosts[0]
        .stats
        .observe_attempt(Duration::from_micros(50), true, t0);
    for healthy in &set.hosts[1..] {
        healthy
            .stats
            .observe_attempt(Duration::from_millis(20), false, t0);
    }
    let now = t0 + Duration::from_millis(100);
    for _ in 0..200 {
        let i = set.pick_at(&LoadBalancer::PeakEwma, None, || now);
        assert_ne!(i, 0, "the failing endpoint was preferred");
    }
    // A fast failure raises an estimate at once (the peak), like a slow response.
    set.hosts[1]
        .stats
        .observe_attempt(Duration::from_micros(50), true, now);
    assert!(set.hosts[1].ewma_cost(now) >= EWMA_FAILURE_PENALTY.as_nanos() as f64);
    // A success is its latency, even a fast one.
    set.hosts[2]
        .stats
        .observe_attempt(Duration::from_micros(50), false, now);
    assert!(set.hosts[2].ewma_cost(now) < Duration::from_millis(20).as_nanos() as f64);
}

#[test]
fn random_follows_weights() {
    let b = balancer(LoadBalancer::Random, &[endpoint(1, 1), endpoint(2, 4)]);
    let c = counts(&b, 10_000);
    assert!((1500..2500).contains(&c[1]), "{c:?}");
    assert!((7500..8500).contains(&c[2]), "{c:?}");
}

#[test]
fn state_survives_an_update_and_not_ready_endpoints_are_skipped() {
    let b = balancer(
        LoadBalancer::LeastRequest,
        &[endpoint(1, 1), endpoint(2, 1)],
    );
    let first = find(&b, 1);
    let guard = first.start();
    let stats = first.stats.clone();
    // Endpoint 1 changes weight, 2 becomes not ready, 3 appears.
    let mut not_ready = endpoint(2, 1);
    not_ready.ready = false;
    b.configure(
        &Arc::new(policy(LoadBalancer::LeastRequest)),
        &[endpoint(1, 5), not_ready, endpoint(3, 1)],
        &Client::default(),
    );
    let after = find(&b, 1);
    assert_eq!(after.endpoint.weight, 5);
    assert!(Arc::ptr_eq(&after.stats, &stats), "the stats must be kept");
    assert_eq!(after.in_flight(), 1);
    drop(guard);
    assert_eq!(after.in_flight(), 0);
    let c = counts(&b, 300);
    assert_eq!(c[2], 0, "{c:?}");
    assert!(c[1] > 0 && c[3] > 0, "{c:?}");
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
            .map(|i| hash_key(&HashOn::SourceIp, IpAddr::from(i.to_be_bytes()), None).expect("key"))
            .collect();
        let pick = |k: u64| last_octet(&b.pick(Some(k), &[]).expect("pick"));
        let before: Vec<u8> = keys.iter().map(|k| pick(*k)).collect();
        let again: Vec<u8> = keys.iter().map(|k| pick(*k)).collect();
        assert_eq!(before, again, "{lb:?} is not stable");
        // Remove one endpoint: keys on the others mostly stay put.
        b.configure(
            &Arc::new(policy(lb.clone())),
            &four[..3],
            &Client::default(),
        );
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, was)| **was != 4 && pick(**k) != **was)
            .count();
        assert!(
            moved < keys.len() / 10,
            "{lb:?} moved {moved} of {}",
            keys.len()
        );
        // Every endpoint gets a fair share.
        let mut c = [0usize; 5];
        for k in &keys {
            c[pick(*k) as usize] += 1;
        }
        assert!(c[1..4].iter().all(|n| *n > keys.len() / 6), "{lb:?} {c:?}");
    }
}

#[test]
fn consistent_hash_follows_weights() {
    let weights = [1u32, 2, 5];
    let eps: Vec<Endpoint> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| endpoint(i as u8 + 1, *w))
        .collect();
    let total: u32 = weights.iter().sum();
    // The tables themselves: ring entries and Maglev slots in proportion to weight.
    let set = host_set(&LoadBalancer::RingHash(HashOn::SourceIp), &eps);
    for (i, w) in weights.iter().enumerate() {
        let entries = set.ring.iter().filter(|(_, e)| *e as usize == i).count();
        assert_eq!(entries, (RING_SIZE * *w as usize).div_ceil(total as usize));
    }
    let set = host_set(&LoadBalancer::Maglev(HashOn::SourceIp), &eps);
    for (i, w) in weights.iter().enumerate() {
        let slots = set.maglev.iter().filter(|e| **e as usize == i).count();
        let expected = MAGLEV_SIZE * *w as usize / total as usize;
        assert!(slots.abs_diff(expected) <= 3, "endpoint {i}: {slots} slots");
    }
    // And the keys that land on each endpoint (hashes are fixed, so these counts are too).
    for lb in [
        LoadBalancer::RingHash(HashOn::SourceIp),
        LoadBalancer::Maglev(HashOn::SourceIp),
    ] {
        let b = balancer(lb.clone(), &eps);
        let mut c = [0usize; 4];
        let keys = 20_000u32;
        for k in 0..keys {
            let key = hash_key(&HashOn::SourceIp, IpAddr::from(k.to_be_bytes()), None);
            c[last_octet(&b.pick(key, &[]).expect("pick")) as usize] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let share = c[i + 1] as f64 / f64::from(keys);
            let expected = f64::from(*w) / f64::from(total);
            // A ring of 1024 hashed points splits the circle unevenly by a few percent (here
            // 8% at most); unweighted, each would get a third.
            assert!(
                (share / expected - 1.0).abs() < 0.15,
                "{lb:?}: endpoint {} got {share:.3} of the keys, its weight {expected:.3}",
                i + 1
            );
        }
    }
}

#[test]
fn a_retry_avoids_endpoints_already_tried() {
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
        LoadBalancer::Maglev(HashOn::SourceIp),
    ] {
        let b = balancer(
            lb.clone(),
            &[endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)],
        );
        for k in 0..20u64 {
            let first = b.pick(Some(k), &[]).expect("pick");
            let second = b.pick(Some(k), std::slice::from_ref(&first)).expect("pick");
            assert!(!Arc::ptr_eq(&first, &second), "{lb:?}");
            let third = b
                .pick(Some(k), &[first.clone(), second.clone()])
                .expect("pick");
            assert!(!Arc::ptr_eq(&third, &first) && !Arc::ptr_eq(&third, &second));
        }
    }
    // A single endpoint is picked again rather than nothing.
    let one = balancer(LoadBalancer::RoundRobin, &[endpoint(1, 1)]);
    let only = one.pick(None, &[]).expect("pick");
    assert!(Arc::ptr_eq(
        &only,
        &one.pick(None, std::slice::from_ref(&only)).expect("pick")
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

fn zones() -> Vec<Endpoint> {
    vec![
        in_zone(1, "a"),
        in_zone(2, "a"),
        in_zone(3, "b"),
        in_zone(4, "b"),
        in_zone(5, "c"),
        in_zone(6, "c"),
    ]
}

fn zone_policy(outlier: Option<OutlierDetection>) -> TrafficPolicy {
    let mut p = policy(LoadBalancer::RoundRobin);
    p.locality_failover = Some(LocalityFailover {
        enabled: true,
        failover_priority: Vec::new(),
        failover: Vec::new(),
        distribute: Vec::new(),
    });
    p.outlier_detection = outlier;
    p
}

#[test]
fn locality_keeps_requests_in_zone_and_fails_over_on_readiness() {
    let b = balancer_with(zone_policy(None), &zones(), &client_in("a"));
    let c = counts(&b, 200);
    assert_eq!(c[1] + c[2], 200, "{c:?}");
    // One of two zone-a endpoints not ready: zone a is 70% healthy and sheds 30% to b and c.
    let mut eps = zones();
    eps[0].ready = false;
    b.configure(&Arc::new(zone_policy(None)), &eps, &client_in("a"));
    assert_eq!(b.priority_loads(), [(70, false), (30, false)]);
    let c = counts(&b, 1000);
    assert_eq!(c[1], 0, "{c:?}");
    assert!((600..800).contains(&c[2]), "{c:?}");
    // Zone a gone: everything to b and c.
    eps[1].ready = false;
    b.configure(&Arc::new(zone_policy(None)), &eps, &client_in("a"));
    assert_eq!(b.priority_loads(), [(0, false), (100, false)]);
    let c = counts(&b, 200);
    assert_eq!(c[3] + c[4] + c[5] + c[6], 200, "{c:?}");
    // Back: all in zone a again.
    b.configure(&Arc::new(zone_policy(None)), &zones(), &client_in("a"));
    assert_eq!(counts(&b, 100)[1..3].iter().sum::<usize>(), 100);
}

fn fail(b: &Balancer, e: &EndpointState, n: usize) {
    for _ in 0..n {
        b.record(e, Outcome::Status(503));
    }
}

#[test]
fn consecutive_failures_eject_and_the_ejection_time_returns() {
    let b = balancer_with(zone_policy(Some(outlier())), &zones(), &client_in("a"));
    let t0 = Instant::now();
    let one = find(&b, 1);
    fail(&b, &one, 4);
    b.maintain(t0);
    assert!(!b.is_ejected(&one));
    fail(&b, &one, 1);
    b.maintain(t0);
    assert!(b.is_ejected(&one));
    // Zone a at 50% healthy: 70 / 30.
    assert_eq!(b.priority_loads()[0], (70, false));
    let c = counts(&b, 300);
    assert_eq!(c[1], 0, "{c:?}");
    // Both zone-a endpoints ejected: failover to the other zones.
    fail(&b, &find(&b, 2), 5);
    b.maintain(t0);
    assert_eq!(b.priority_loads(), [(0, false), (100, false)]);
    // Before the ejection time, nothing changes; after it, both return.
    b.maintain(t0 + Duration::from_secs(5));
    assert!(b.is_ejected(&one));
    b.maintain(t0 + Duration::from_secs(11));
    assert!(!b.is_ejected(&one));
    assert_eq!(b.priority_loads(), [(100, false), (0, false)]);
}

#[test]
fn panic_uses_ejected_endpoints_when_too_few_are_healthy() {
    let eps = [endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)];
    let mut p = policy(LoadBalancer::RoundRobin);
    p.outlier_detection = Some(outlier());
    let b = balancer_with(p.clone(), &eps, &Client::default());
    let now = Instant::now();
    fail(&b, &find(&b, 1), 5);
    fail(&b, &find(&b, 2), 5);
    b.maintain(now);
    // One of three healthy: below 50%, so every endpoint is used.
    assert_eq!(b.priority_loads(), [(100, true)]);
    let c = counts(&b, 300);
    assert!(c[1] > 0 && c[2] > 0 && c[3] > 0, "{c:?}");
    // Without panic, only the healthy one.
    let mut no_panic = p;
    if let Some(o) = no_panic.outlier_detection.as_mut() {
        o.min_health_percent = 0;
    }
    b.configure(&Arc::new(no_panic), &eps, &Client::default());
    assert_eq!(counts(&b, 100)[3], 100);
    // Every endpoint ejected, no panic: nothing to pick.
    fail(&b, &find(&b, 3), 5);
    b.maintain(now);
    assert!(b.pick(None, &[]).is_none());
    assert!(b.has_endpoints());
}

#[test]
fn outlier_state_survives_a_configuration_update() {
    let eps = [endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)];
    let mut p = policy(LoadBalancer::RoundRobin);
    p.outlier_detection = Some(outlier());
    let b = balancer_with(p.clone(), &eps, &Client::default());
    fail(&b, &find(&b, 1), 5);
    b.maintain(Instant::now());
    // Weight of the ejected endpoint changes, another endpoint arrives: still ejected.
    b.configure(
        &Arc::new(p),
        &[
            endpoint(1, 2),
            endpoint(2, 1),
            endpoint(3, 1),
            endpoint(4, 1),
        ],
        &Client::default(),
    );
    assert!(b.is_ejected(&find(&b, 1)));
    assert_eq!(counts(&b, 100)[1], 0);
}

#[test]
fn distribute_weights_localities() {
    let mut p = zone_policy(None);
    let pattern = |s: &str| LocalityPattern::new(s).expect("pattern");
    if let Some(l) = p.locality_failover.as_mut() {
        l.distribute.push(DistributeRule {
            from: pattern("r1/a"),
            to: BTreeMap::from([(pattern("r1/a"), 80), (pattern("r1/b"), 20)]),
        });
    }
    let b = balancer_with(p, &zones(), &client_in("a"));
    let c = counts(&b, 10_000);
    let (a, bz, cz) = (c[1] + c[2], c[3] + c[4], c[5] + c[6]);
    assert!((7500..8500).contains(&a), "{c:?}");
    assert!((1500..2500).contains(&bz), "{c:?}");
    assert_eq!(cz, 0, "{c:?}");
}
