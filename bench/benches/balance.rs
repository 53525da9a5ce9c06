//! The cost of one balancer pick, per algorithm, over 10 and 1000 endpoints.
//!
//! `cargo bench -p keel-bench --bench balance`. Each pick reads the service's current pool and
//! runs the algorithm, as the data path does before every request (no request is sent). Weighted
//! least request and peak EWMA use Envoy's EDF schedule when weights differ, P2C when they are
//! equal, so both cases are measured; `locality-3-zones` adds the priority choice of locality
//! failover to least request. `rebuild` times a round-robin pool's rebuild after one endpoint's
//! weight changes (what an ejection or a return costs under the service's control lock), over
//! 1000 and 10,000 endpoints.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use keel_proxy::balance::{Balancer, hash_key};
use keel_proxy::config::{Endpoint, HashOn, LoadBalancer, LocalityFailover, TrafficPolicy};
use keel_proxy::locality::{Client, Locality};
use keel_proxy::metrics::Metrics;

fn endpoints(n: usize, weighted: bool) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32 + 1)),
            port: None,
            weight: if weighted { 1 + (i % 3) as u32 } else { 1 },
            locality: Locality {
                region: "r1".into(),
                zone: format!("zone-{}", i % 3),
                subzone: String::new(),
            },
            identity: None,
            ready: true,
            workload: format!("bench/w{i}"),
            meshed: true,
            mtls: false,
            labels: BTreeMap::new(),
        })
        .collect()
}

fn balancer(lb: LoadBalancer, n: usize, weighted: bool, locality: bool) -> Arc<Balancer> {
    let mut policy = TrafficPolicy::default_for("bench/svc");
    policy.load_balancer = lb;
    if locality {
        policy.locality_failover = Some(LocalityFailover {
            enabled: true,
            failover_priority: Vec::new(),
            failover: Vec::new(),
            distribute: Vec::new(),
        });
    }
    let client = Client {
        locality: Locality {
            region: "r1".into(),
            zone: "zone-0".into(),
            subzone: String::new(),
        },
        labels: BTreeMap::new(),
    };
    let b = Balancer::new("bench/svc", Arc::new(Metrics::default()));
    b.configure(&Arc::new(policy), &endpoints(n, weighted), &client);
    b
}

fn picks(c: &mut Criterion) {
    let cases: [(&str, LoadBalancer, bool, bool); 9] = [
        ("round-robin", LoadBalancer::RoundRobin, false, false),
        (
            "round-robin-weighted",
            LoadBalancer::RoundRobin,
            true,
            false,
        ),
        (
            "least-request-p2c",
            LoadBalancer::LeastRequest,
            false,
            false,
        ),
        ("least-request-edf", LoadBalancer::LeastRequest, true, false),
        ("peak-ewma-p2c", LoadBalancer::PeakEwma, false, false),
        ("random-weighted", LoadBalancer::Random, true, false),
        (
            "ring-hash",
            LoadBalancer::RingHash(HashOn::SourceIp),
            false,
            false,
        ),
        (
            "maglev",
            LoadBalancer::Maglev(HashOn::SourceIp),
            false,
            false,
        ),
        ("locality-3-zones", LoadBalancer::LeastRequest, false, true),
    ];
    let mut group = c.benchmark_group("pick");
    for n in [10, 1000] {
        for (name, lb, weighted, locality) in &cases {
            let b = balancer(lb.clone(), n, *weighted, *locality);
            let hashed = matches!(lb, LoadBalancer::RingHash(_) | LoadBalancer::Maglev(_));
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |bench, _| {
                bench.iter(|| {
                    client = client.wrapping_add(1);
                    let hash = hashed
                        .then(|| {
                            hash_key(&HashOn::SourceIp, IpAddr::from(client.to_be_bytes()), None)
                        })
                        .flatten();
                    black_box(b.pick(hash, &[]))
                })
            });
        }
    }
    group.finish();
}

/// The cost of rebuilding a round-robin pool (its smooth schedule included) when an endpoint
/// changes, as an ejection, a return or an update does under the service's control lock.
fn rebuilds(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild");
    group.sample_size(20);
    for n in [1000, 10_000] {
        let b = balancer(LoadBalancer::RoundRobin, n, true, false);
        let mut policy = TrafficPolicy::default_for("bench/svc");
        policy.load_balancer = LoadBalancer::RoundRobin;
        let policy = Arc::new(policy);
        let base = endpoints(n, true);
        let mut changed = base.clone();
        changed[0].weight += 1;
        let client = Client::default();
        let mut flip = false;
        group.bench_with_input(
            BenchmarkId::new("round-robin-weighted", n),
            &n,
            |bench, _| {
                bench.iter(|| {
                    flip = !flip;
                    b.configure(&policy, if flip { &changed } else { &base }, &client);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, picks, rebuilds);
criterion_main!(benches);
