//! High availability end to end: a client pod with a real sidecar calls service `web`, whose
//! endpoints are real processes (`keel-test-endpoint`) in their own pods, and the test injects
//! faults: it kills endpoint processes, makes one answer 503 half the time or always, makes one
//! hang, takes a pod's link down, takes a whole zone away, marks endpoints not ready, and floods
//! a failing or slow service. Each test asserts behaviour (no client request lost, where requests
//! go, what the sidecar counted), never speed: intervals and ejection times are short so that the
//! tests are quick, and every wait has a generous deadline.
//!
//! Without root (or ip, iptables, setpriv, curl) each test prints `SKIP: <reason>` and passes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use keel_tests::endpoint::Mode;
use keel_tests::fleet::{self, EndpointSpec, Fleet, FleetSpec};
use keel_tests::skip_unless_root;
use keel_tests::traffic::{self, Outcome, Traffic};

/// How long traffic may take to converge after a change.
const CONVERGE: Duration = Duration::from_secs(30);

fn spec(endpoints: Vec<EndpointSpec>, traffic_policy: &str, routes: &str) -> FleetSpec {
    FleetSpec {
        endpoints,
        traffic_policy: traffic_policy.to_owned(),
        routes: routes.to_owned(),
        endpoint_command: vec![OsString::from(env!("CARGO_BIN_EXE_keel-test-endpoint"))],
    }
}

/// Three meshed endpoints in one zone.
fn three(mode_of_c: Mode) -> Vec<EndpointSpec> {
    let mut eps: Vec<EndpointSpec> = ["b", "c", "d"]
        .into_iter()
        .map(|n| EndpointSpec::new(n, "r1", "zone-a", true))
        .collect();
    eps[2].mode = mode_of_c;
    eps
}

fn failures(outcomes: &[Outcome]) -> Vec<&str> {
    traffic::failures(outcomes)
}

/// Polls `check` on fresh client metrics until it holds.
async fn eventually(
    fleet: &Fleet,
    what: &str,
    mut check: impl FnMut(&keel_tests::netns::Metrics) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let metrics = fleet.client_metrics().await?;
        if check(&metrics) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("never happened: {what}\n{}", fleet.logs()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails, with the first failures and the fleet's logs, if any request of `outcomes` failed;
/// `around` says when (`"around the kill"`).
fn none_lost(fleet: &Fleet, outcomes: &[Outcome], around: &str) -> anyhow::Result<()> {
    let lost = failures(outcomes);
    ensure!(
        lost.is_empty(),
        "{} of {} requests failed {around}: {:?}\n{}",
        lost.len(),
        outcomes.len(),
        &lost[..lost.len().min(5)],
        fleet.logs()
    );
    Ok(())
}

fn ip_of(fleet: &Fleet, name: &str) -> anyhow::Result<std::net::Ipv4Addr> {
    fleet.endpoint(name)?.ip().context("no pod")
}

/// Under steady traffic, waits until the client's sidecar ejects `name`, then for 100 more
/// requests, and checks that none failed. Returns every outcome.
async fn ejected_without_loss(fleet: &Fleet, name: &str) -> anyhow::Result<Vec<Outcome>> {
    let ip = ip_of(fleet, name)?;
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    eventually(fleet, &format!("{name} ejected"), |m| {
        fleet::ejections(m, ip) >= 1.0
    })
    .await?;
    traffic.wait_for_more(100, CONVERGE).await?;
    let outcomes = traffic.finish().await;
    none_lost(fleet, &outcomes, "around the ejection")?;
    Ok(outcomes)
}

/// Steady idempotent traffic, once b, c and d all answer it.
async fn steady_traffic_on_three(fleet: &Fleet) -> anyhow::Result<Traffic> {
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    traffic
        .wait_for_last(60, CONVERGE, "all three endpoints answering", |o| {
            o.result.is_ok()
        })
        .await?;
    let warm = traffic::count(&traffic.snapshot());
    ensure!(
        ["b", "c", "d"].iter().all(|n| warm.contains_key(*n)),
        "before the change every endpoint must answer: {warm:?}"
    );
    Ok(traffic)
}

const OUTLIER: &str = "  loadBalancer: {policy: ROUND_ROBIN}
  outlierDetection: {consecutive5xx: 3, interval: 200ms, baseEjectionTime: 2s, maxEjectionPercent: 50}
";

/// Under steady idempotent load, killing one of three endpoint processes loses no request: the
/// dead endpoint's sidecar answers that its app is unreachable, the client's sidecar retries
/// elsewhere, and after three such failures the endpoint is ejected and gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_endpoints_loses_no_request() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut fleet = Fleet::start(spec(three(Mode::Ok), OUTLIER, "")).await?;
    let d = ip_of(&fleet, "d")?;
    let traffic = steady_traffic_on_three(&fleet).await?;
    fleet.kill("d")?;
    let killed_at = std::time::Instant::now();
    eventually(&fleet, "d ejected by the client's sidecar", |m| {
        fleet::ejections(m, d) >= 1.0 && fleet::endpoint_healthy(m, d) == Some(0.0)
    })
    .await?;
    // While d is ejected nothing reaches its pod.
    let before = fleet.endpoint_metrics("d").await?;
    traffic.wait_for_more(100, CONVERGE).await?;
    let after = fleet.endpoint_metrics("d").await?;
    let outcomes = traffic.finish().await;
    let reached = after.sum("keel_requests_total", &[("direction", "inbound")])
        - before.sum("keel_requests_total", &[("direction", "inbound")]);
    none_lost(&fleet, &outcomes, "around the kill")?;
    ensure!(
        reached == 0.0,
        "{reached} requests reached d's pod while it was ejected"
    );
    // A request sent before the kill may still have been answered by d; none sent after it.
    let (before_kill, after_kill): (Vec<_>, Vec<_>) =
        outcomes.iter().cloned().partition(|o| o.sent < killed_at);
    let after_kill = traffic::count(&after_kill);
    ensure!(!after_kill.contains_key("d"), "{after_kill:?}");
    eprintln!(
        "before the kill {:?}; after {after_kill:?}",
        traffic::count(&before_kill)
    );
    Ok(())
}

/// Under steady idempotent load, an endpoint whose sidecar drains (SIGTERM, as when its pod is
/// deleted) loses no request: its inbound side finishes what it has and sends GOAWAY on the
/// client sidecar's HTTP/2 connection, which then takes no new request; the next ones find d's
/// listener closed and go to the other endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_whose_sidecar_drains_loses_no_request() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut fleet = Fleet::start(spec(three(Mode::Ok), OUTLIER, "")).await?;
    let traffic = steady_traffic_on_three(&fleet).await?;
    fleet.signal_sidecar("d", libc::SIGTERM)?;
    let deadline = Instant::now() + CONVERGE;
    let status = loop {
        if let Some(status) = fleet.sidecar_exited("d")? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "d's sidecar did not finish draining\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(status.success(), "d's sidecar exited with {status}");
    let exited_at = Instant::now();
    traffic.wait_for_more(100, CONVERGE).await?;
    let outcomes = traffic.finish().await;
    none_lost(&fleet, &outcomes, "around the drain")?;
    let after: Vec<_> = outcomes
        .iter()
        .filter(|o| o.sent > exited_at)
        .cloned()
        .collect();
    let after = traffic::count(&after);
    ensure!(
        !after.contains_key("d") && after.len() == 2,
        "after d's sidecar exited: {after:?}"
    );
    eprintln!(
        "{} requests; after d's sidecar exited {after:?}",
        outcomes.len()
    );
    Ok(())
}

/// An endpoint that fails every request is ejected after the configured consecutive failures,
/// gets nothing while ejected, and returns after the ejection time once it works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_after_the_configured_failures_and_returns()
-> anyhow::Result<()> {
    skip_unless_root!();
    let fleet = Fleet::start(spec(three(Mode::Fail), OUTLIER, "")).await?;
    let d = ip_of(&fleet, "d")?;
    let started = Instant::now();
    // One request at a time, so that the count of failures at ejection is close to exact.
    let traffic = Traffic::start(fleet.target(), 1, Duration::from_millis(5));
    eventually(&fleet, "d ejected", |m| fleet::ejections(m, d) >= 1.0).await?;
    let ejected_at = Instant::now();
    let failed = fleet.stats("d").await?.failed;
    // Requests already past the balancer when the detection lands may still reach d.
    ensure!(
        (3..=6).contains(&failed),
        "d answered {failed} requests with 503 before its ejection; consecutive5xx is 3"
    );
    fleet.set_mode("d", Mode::Ok).await?;
    // Nothing reaches d until the ejection time (2 s) has passed; then it serves again.
    let returned = traffic
        .wait_for_last(1, CONVERGE, "d serving again", |o| {
            o.served_by() == Some("d")
        })
        .await;
    let returned_at = Instant::now();
    let outcomes = traffic.finish().await;
    returned.map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let stats = fleet.stats("d").await?;
    ensure!(
        stats.failed == failed,
        "d failed more requests after its ejection"
    );
    // Back after the ejection time (the first ejection: 2 s times 1), found at the next
    // evaluation (every 200 ms). Below: `ejected_at` is when the test saw the ejection, a little
    // after it happened. Above: generous slack for a loaded machine, but not another ejection
    // time's worth (a multiplier that grew, or a return missed at the interval).
    let back_after = returned_at - ejected_at;
    let (base, interval) = (Duration::from_secs(2), Duration::from_millis(200));
    ensure!(
        back_after >= base - Duration::from_millis(500),
        "d came back {back_after:?} after its ejection; the ejection time is {base:?}"
    );
    ensure!(
        back_after <= base + interval + Duration::from_secs(5),
        "d came back only {back_after:?} after its ejection; the ejection time is {base:?} \
         and the interval {interval:?}"
    );
    let lost = failures(&outcomes);
    ensure!(
        lost.is_empty(),
        "retries must hide d's 503s from the client: {:?}",
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "d ejected after {failed} failures, {:?} after the start; back after {:?}: {:?}",
        ejected_at - started,
        returned_at - ejected_at,
        traffic::count(&outcomes)
    );
    Ok(())
}

/// An endpoint answering 503 half the time is ejected, and the client never sees its 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_half_the_time_is_ejected_and_hidden() -> anyhow::Result<()> {
    skip_unless_root!();
    let fleet = Fleet::start(spec(three(Mode::Flaky), OUTLIER, "")).await?;
    let outcomes = ejected_without_loss(&fleet, "d").await?;
    let metrics = fleet.client_metrics().await?;
    let retried = metrics.sum(
        "keel_retries_total",
        &[("service", fleet::SERVICE), ("reason", "status")],
    );
    ensure!(retried >= 1.0, "the 503s must have been retried");
    eprintln!("{:?}, {retried} retries", traffic::count(&outcomes));
    Ok(())
}

/// An endpoint that accepts requests and never answers is cut off by the per-try timeout, the
/// request retried elsewhere, and the endpoint ejected for its timeouts (gateway errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_is_bypassed_and_ejected() -> anyhow::Result<()> {
    skip_unless_root!();
    let policy = "  loadBalancer: {policy: ROUND_ROBIN}
  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 2, interval: 200ms, baseEjectionTime: 30s, maxEjectionPercent: 50}
";
    let routes = "  routes:
  - name: all
    destinations: [{service: web}]
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: [gateway-error, connect-failure]}
";
    let fleet = Fleet::start(spec(three(Mode::Hang), policy, routes)).await?;
    ejected_without_loss(&fleet, "d").await?;
    let metrics = fleet.client_metrics().await?;
    let timeouts = metrics.sum(
        "keel_retries_total",
        &[("service", fleet::SERVICE), ("reason", "timeout")],
    );
    ensure!(
        timeouts >= 2.0,
        "per-try timeouts must have been retried: {timeouts}"
    );
    Ok(())
}

/// A pod whose link goes down (packets silently dropped, nothing refused) is bypassed by per-try
/// and connect timeouts and ejected; with its link back, it serves again after the ejection time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_veth_taken_down_is_bypassed_and_comes_back() -> anyhow::Result<()> {
    skip_unless_root!();
    let policy = "  loadBalancer: {policy: ROUND_ROBIN}
  outlierDetection: {consecutiveGatewayErrors: 2, interval: 200ms, baseEjectionTime: 2s, maxEjectionPercent: 50}
  connectTimeout: 300ms
";
    let routes = "  routes:
  - name: all
    destinations: [{service: web}]
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: [gateway-error, connect-failure]}
";
    let fleet = Fleet::start(spec(three(Mode::Ok), policy, routes)).await?;
    let d = ip_of(&fleet, "d")?;
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    traffic
        .wait_for_last(60, CONVERGE, "every request answered", |o| o.result.is_ok())
        .await?;
    fleet.link("d", false)?;
    let down_at = traffic.len();
    let ejected = eventually(&fleet, "d ejected with its link down", |m| {
        fleet::ejections(m, d) >= 1.0
    })
    .await;
    fleet.link("d", true)?;
    ejected?;
    let back = traffic
        .wait_for_last(1, CONVERGE, "d serving again", |o| {
            o.served_by() == Some("d")
        })
        .await;
    let outcomes = traffic.finish().await;
    back.map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let lost = failures(&outcomes[down_at..]);
    ensure!(
        lost.is_empty(),
        "{} requests failed with d's link down: {:?}\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        fleet.logs()
    );
    eprintln!(
        "after the link went down: {:?}",
        traffic::count(&outcomes[down_at..])
    );
    Ok(())
}

fn zone_of(who: &str) -> Option<char> {
    who.chars().next()
}

fn by_zone(outcomes: &[Outcome]) -> BTreeMap<char, usize> {
    let mut zones = BTreeMap::new();
    for o in outcomes {
        let key = o.served_by().and_then(zone_of).unwrap_or('!');
        *zones.entry(key).or_insert(0) += 1;
    }
    zones
}

const LOCALITY: &str = "  loadBalancer: {policy: LEAST_REQUEST}
  outlierDetection: {consecutive5xx: 3, interval: 200ms, baseEjectionTime: 2s, maxEjectionPercent: 50}
  localityFailover: {enabled: true}
";

/// With three zones, requests stay in the caller's zone while it is healthy, fail over to the
/// next zone (same region) when every endpoint of it dies, without losing requests, and come back
/// once the zone recovers; the zone in another region gets nothing while the nearer one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_fails_over_to_the_next_and_comes_back() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut fleet = Fleet::start(spec(fleet::three_zones(), LOCALITY, "")).await?;
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    traffic.wait_for_more(400, CONVERGE).await?;
    let healthy = traffic.snapshot();
    let zones = by_zone(&healthy);
    let in_zone = zones.get(&'a').copied().unwrap_or(0);
    ensure!(
        in_zone * 100 >= healthy.len() * 99,
        "while zone-a is healthy at least 99% of requests stay there: {zones:?}"
    );
    // The whole zone goes.
    fleet.kill("a1")?;
    fleet.kill("a2")?;
    let killed_at = traffic.len();
    traffic
        .wait_for_last(200, CONVERGE, "every request served by zone-b", |o| {
            o.served_by().and_then(zone_of) == Some('b')
        })
        .await
        .map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let failed_over = traffic.snapshot();
    // It comes back.
    fleet.restart("a1", Mode::Ok).await?;
    fleet.restart("a2", Mode::Ok).await?;
    let restarted_at = traffic.len();
    let back = traffic
        .wait_for_last(200, CONVERGE, "every request served by zone-a again", |o| {
            o.served_by().and_then(zone_of) == Some('a')
        })
        .await;
    let outcomes = traffic.finish().await;
    back.map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let during = by_zone(&failed_over[killed_at..]);
    ensure!(
        !during.contains_key(&'c'),
        "zone-c (another region) must get nothing while zone-b serves: {during:?}"
    );
    none_lost(&fleet, &outcomes, "around the zone's loss")?;
    eprintln!(
        "healthy {zones:?}; zone-a dead {during:?}; recovering {:?}",
        by_zone(&outcomes[restarted_at..])
    );
    Ok(())
}

/// With outlier detection at its defaults (`outlierDetection: {}`: five consecutive 5xx, 10 s
/// interval, 30 s ejection, no cap on the ejection percentage) and the default retry policy, a
/// whole zone's death is failed over without losing a request: both of its endpoints are
/// ejected, so the zone takes no load at all, rather than one staying in (as Envoy's 10% cap
/// would leave it) with most of the zone's load and a retry for every request until the retry
/// budget runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_zone_fails_over_with_default_outlier_settings() -> anyhow::Result<()> {
    skip_unless_root!();
    let policy = "  outlierDetection: {}\n  localityFailover: {enabled: true}\n";
    let mut fleet = Fleet::start(spec(fleet::three_zones(), policy, "")).await?;
    let (a1, a2) = (ip_of(&fleet, "a1")?, ip_of(&fleet, "a2")?);
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    traffic
        .wait_for_last(100, CONVERGE, "zone-a serving", |o| {
            o.served_by().and_then(zone_of) == Some('a')
        })
        .await?;
    fleet.kill("a1")?;
    fleet.kill("a2")?;
    let killed_at = traffic.len();
    let ejected = eventually(&fleet, "both zone-a endpoints ejected", |m| {
        fleet::endpoint_healthy(m, a1) == Some(0.0) && fleet::endpoint_healthy(m, a2) == Some(0.0)
    })
    .await;
    let moved = match ejected {
        Ok(()) => {
            traffic
                .wait_for_last(300, CONVERGE, "every request served by zone-b", |o| {
                    o.served_by().and_then(zone_of) == Some('b')
                })
                .await
        }
        Err(e) => Err(e),
    };
    let outcomes = traffic.finish().await;
    moved.map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let after = &outcomes[killed_at..];
    let lost = failures(after);
    ensure!(
        lost.is_empty(),
        "{} of {} requests after the zone died were lost: {:?}\n{}",
        lost.len(),
        after.len(),
        &lost[..lost.len().min(5)],
        fleet.logs()
    );
    let zones = by_zone(after);
    ensure!(
        !zones.contains_key(&'c'),
        "zone-c (another region) must get nothing while zone-b serves: {zones:?}"
    );
    let metrics = fleet.client_metrics().await?;
    let overflow = metrics.sum(
        "keel_outlier_ejections_overflow_total",
        &[("service", fleet::SERVICE)],
    );
    ensure!(
        overflow == 0.0,
        "{overflow} ejections were refused by the maximum ejection percentage"
    );
    eprintln!("after zone-a died: {zones:?}");
    Ok(())
}

/// Without outlier detection, readiness from the control plane drives failover alone: zone-a
/// marked not ready sends everything to zone-b, without a failed request, and back when ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_alone_fails_a_zone_over_and_back() -> anyhow::Result<()> {
    skip_unless_root!();
    let policy = "  localityFailover: {enabled: true}\n";
    let fleet = Fleet::start(spec(fleet::three_zones(), policy, "")).await?;
    let traffic = Traffic::start(fleet.target(), 4, Duration::from_millis(2));
    traffic
        .wait_for_last(100, CONVERGE, "zone-a serving", |o| {
            o.served_by().and_then(zone_of) == Some('a')
        })
        .await?;
    fleet.set_not_ready(&["a1", "a2"])?;
    let moved = traffic
        .wait_for_last(100, CONVERGE, "zone-b serving", |o| {
            o.served_by().and_then(zone_of) == Some('b')
        })
        .await;
    fleet.set_not_ready(&[])?;
    let back = traffic
        .wait_for_last(100, CONVERGE, "zone-a serving again", |o| {
            o.served_by().and_then(zone_of) == Some('a')
        })
        .await;
    let outcomes = traffic.finish().await;
    moved
        .and(back)
        .map_err(|e| anyhow!("{e}\n{}", fleet.logs()))?;
    let lost = failures(&outcomes);
    ensure!(
        lost.is_empty(),
        "requests failed: {:?}",
        &lost[..lost.len().min(5)]
    );
    ensure!(
        !by_zone(&outcomes).contains_key(&'c'),
        "zone-c must get nothing: {:?}",
        by_zone(&outcomes)
    );
    Ok(())
}

/// When every endpoint fails, the retry budget keeps retries to its share of the requests plus
/// its floor, although the route allows three retries for each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_everything_fails() -> anyhow::Result<()> {
    skip_unless_root!();
    // A window long enough to hold the whole test (which fails if its 1000 requests take more
    // than CONVERGE), so that every retry the test makes is counted against one window and the
    // budget's bound applies to the whole test: 20% of the requests plus 2 per second of the
    // window, 120.
    const PERCENT: f64 = 20.0;
    const PER_SECOND: f64 = 2.0;
    const TTL: Duration = Duration::from_secs(60);
    const WORKERS: usize = 16;
    let mut eps = three(Mode::Fail);
    for e in &mut eps {
        e.mode = Mode::Fail;
    }
    let routes = "  routes:
  - name: all
    destinations: [{service: web}]
    retries: {attempts: 3, retryOn: [retriable-status-codes], retriableStatusCodes: [503]}
";
    let policy = format!(
        "  loadBalancer: {{policy: ROUND_ROBIN}}\n  retryBudget: {{percent: {PERCENT}, minRetriesPerSecond: {PER_SECOND}, ttl: {}s}}\n",
        TTL.as_secs()
    );
    let fleet = Fleet::start(spec(eps, &policy, routes)).await?;
    let before = fleet.client_metrics().await?;
    let started = Instant::now();
    let traffic = Traffic::start(fleet.target(), WORKERS, Duration::ZERO);
    traffic.wait_for_more(1000, CONVERGE).await?;
    let outcomes = traffic.finish().await;
    let elapsed = started.elapsed();
    let after = fleet.client_metrics().await?;
    let grew =
        |name: &str, filter: &[(&str, &str)]| after.sum(name, filter) - before.sum(name, filter);
    let requests = grew(
        "keel_requests_total",
        &[("direction", "outbound"), ("service", fleet::SERVICE)],
    );
    let retries = grew("keel_retries_total", &[("service", fleet::SERVICE)]);
    let denied = grew(
        "keel_retries_skipped_total",
        &[("service", fleet::SERVICE), ("reason", "budget")],
    );
    ensure!(
        failures(&outcomes).len() == outcomes.len(),
        "every endpoint fails, so every request must"
    );
    ensure!(
        requests >= 1000.0,
        "the sidecar counted {requests} requests"
    );
    // The budget's window is cut into ten slots and reaches between nine and ten of them back;
    // a test shorter than nine slots has every retry in the window of its last retry, which was
    // admitted only while the retries of that window were fewer than its allowance: PERCENT of
    // the requests (all of the sidecar's requests to the service, the bound's upper end) plus
    // PER_SECOND over the window. Retries racing for the last unit may each pass: at most one
    // per worker.
    ensure!(
        elapsed < TTL * 9 / 10,
        "the test took {elapsed:?}, longer than one budget window"
    );
    let all_requests = after.sum(
        "keel_requests_total",
        &[("direction", "outbound"), ("service", fleet::SERVICE)],
    );
    let floor = PER_SECOND * TTL.as_secs_f64();
    let bound = PERCENT / 100.0 * all_requests + floor + WORKERS as f64;
    ensure!(
        retries <= bound,
        "{retries} retries for {requests} requests: the budget allows at most {bound:.0}"
    );
    // Every request wants three retries, so the budget is used up: at least the floor is spent.
    ensure!(
        retries >= floor,
        "{retries} retries, fewer than the budget's floor of {floor}"
    );
    ensure!(denied > 0.0, "the budget must have refused retries");
    eprintln!(
        "{requests} requests, {retries} retries (bound {bound:.0}), {denied} refused by the budget, in {elapsed:?}"
    );
    Ok(())
}

/// A retry whose back-off would end past the route's timeout is not made, and the client gets the
/// endpoint's own answer (its 503), not a 504 from the proxy for a retry that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_would_miss_the_deadline_returns_the_real_answer() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut eps = three(Mode::Fail);
    for e in &mut eps {
        e.mode = Mode::Fail;
    }
    // Back-offs are uniform in [0, 1000 s): a request's first retry is refused for the deadline
    // but once in a thousand times. A retry that is made runs into the deadline (a 504, rightly)
    // when its back-off ends less than one attempt's duration before it: for a 50 ms attempt on a
    // loaded machine, one request in twenty thousand, where 10 s back-offs made it one in two
    // hundred.
    let routes = "  routes:
  - name: all
    destinations: [{service: web}]
    timeout: 1s
    retries: {attempts: 5, retryOn: [retriable-status-codes], retriableStatusCodes: [503], backoffBase: 1000s, backoffMax: 1000s}
";
    let fleet = Fleet::start(spec(eps, "  loadBalancer: {policy: ROUND_ROBIN}\n", routes)).await?;
    let target = fleet.target();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(one_request(&target).await?);
    }
    ensure!(
        answers
            .iter()
            .all(|(status, error, _)| *status == 503 && error.is_empty()),
        "every answer must be the endpoints' own 503, not the proxy's: {answers:?}"
    );
    let metrics = fleet.client_metrics().await?;
    let skipped = metrics.sum(
        "keel_retries_skipped_total",
        &[("service", fleet::SERVICE), ("reason", "deadline")],
    );
    ensure!(
        skipped >= 1.0,
        "no retry was refused for the deadline: {answers:?}"
    );
    let timeouts = metrics.sum(
        "keel_requests_total",
        &[("service", fleet::SERVICE), ("error", "timeout")],
    );
    ensure!(timeouts == 0.0, "{timeouts} requests were answered 504");
    Ok(())
}

/// A POST that got a 503 is retried only on a route that opts in with `retryNonIdempotent`: the
/// same failures reach the client on a route that does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_retried_only_when_the_route_says_so() -> anyhow::Result<()> {
    skip_unless_root!();
    let routes = "  routes:
  - name: deduplicated
    match: {path: {prefix: /deduplicated}}
    destinations: [{service: web}]
    retries: {attempts: 2, retryOn: [retriable-status-codes], retriableStatusCodes: [503], retryNonIdempotent: true}
  - name: plain
    destinations: [{service: web}]
    retries: {attempts: 2, retryOn: [retriable-status-codes], retriableStatusCodes: [503]}
";
    // Random balancing (round robin would let the two routes' picks fall into step): a third of
    // first attempts go to d, which answers 503; a retry never goes back to it.
    let fleet = Fleet::start(spec(
        three(Mode::Fail),
        "  loadBalancer: {policy: RANDOM}\n",
        routes,
    ))
    .await?;
    let target = fleet.target();
    const EACH: usize = 30;
    let mut opted_in = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..EACH {
        opted_in.push(
            request(&target, http::Method::POST, "/deduplicated")
                .await?
                .0,
        );
        plain.push(request(&target, http::Method::POST, "/plain").await?.0);
    }
    ensure!(
        opted_in.iter().all(|s| *s == 200),
        "every POST to the opted-in route must be retried past d's 503: {opted_in:?}"
    );
    ensure!(
        plain.contains(&503),
        "a POST to the other route must not be retried after a 503: {plain:?}"
    );
    let metrics = fleet.client_metrics().await?;
    let retried = metrics.sum(
        "keel_retries_total",
        &[("service", fleet::SERVICE), ("reason", "status")],
    );
    // At most one retry per opted-in request, none for the others.
    ensure!(
        retried >= 1.0 && retried <= EACH as f64,
        "{retried} status retries for {EACH} opted-in POSTs: {opted_in:?} {plain:?}"
    );
    Ok(())
}

/// A request retried after a 503 reaches the next endpoint as the client sent it (method,
/// target, `Host`, other fields, body), whether each attempt went over plaintext HTTP/1.1 (to an
/// endpoint without a sidecar) or HTTP/2 (to a sidecar), and whatever the client's form: HTTP/1.1
/// with an origin-form or an absolute-form target, or HTTP/2 without `Host`. b (HTTP/1.1) and c
/// (HTTP/2) fail every request, d (HTTP/1.1) and e (HTTP/2) answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_reaches_the_next_endpoint_as_it_was_sent() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut eps: Vec<EndpointSpec> = [("b", false), ("c", true), ("d", false), ("e", true)]
        .into_iter()
        .map(|(n, meshed)| EndpointSpec::new(n, "r1", "zone-a", meshed))
        .collect();
    eps[0].mode = Mode::Fail;
    eps[1].mode = Mode::Fail;
    // Random picks, no ejection and a budget that refuses nothing: a request's attempts go to
    // the endpoints in every order.
    let policy = "  loadBalancer: {policy: RANDOM}
  outlierDetection: {consecutive5xx: 0}
  retryBudget: {percent: 100, minRetriesPerSecond: 1000}
";
    let routes = "  routes:
  - name: all
    destinations: [{service: web}]
    retries: {attempts: 2, retryOn: [retriable-status-codes], retriableStatusCodes: [503], retryNonIdempotent: true}
";
    let fleet = Fleet::start(spec(eps, policy, routes)).await?;
    let target = fleet.target();
    let host = target.host.as_str();
    // HTTP/2 clients twice as often: a sixth of their requests go to b before e, the case where
    // an HTTP/1 attempt's `Host` could reach a later HTTP/2 one.
    let clients = [
        Client::Http1,
        Client::Http1AbsoluteForm,
        Client::Http2,
        Client::Http2,
    ];
    const EACH: usize = 60;
    let mut answered_by = BTreeMap::new();
    for i in 0..EACH {
        let client = clients[i % clients.len()];
        let (method, body) = if i % 3 == 0 {
            (http::Method::GET, String::new())
        } else {
            (http::Method::POST, format!("body-{i}"))
        };
        let path = format!("/items/{i}?q={i}");
        let answer = exchange(
            &target,
            client,
            method.clone(),
            &path,
            &[("x-test", &format!("v{i}"))],
            &body,
        )
        .await?;
        let served_by = field(&answer, "x-served-by");
        ensure!(
            answer.status == 200,
            "{client:?} {method} {path}: {} from {served_by}",
            answer.status
        );
        // An HTTP/2 client's request stays HTTP/2 to e's app (no sidecar turns it into
        // HTTP/1.1): its target stays absolute and it has no `Host`. Every other hop to an app
        // is HTTP/1.1, with an origin-form target and `Host`.
        let (target_seen, host_seen) = match (client, served_by.as_str()) {
            (Client::Http2, "e") => (format!("http://{host}{path}"), "-"),
            _ => (path.clone(), host),
        };
        let sent = format!("{method} {target_seen} host={host_seen} x-test=v{i} body={body}");
        let seen = field(&answer, "x-seen");
        ensure!(
            seen == sent,
            "{client:?}: {served_by} saw {seen:?}, expected {sent:?}"
        );
        *answered_by.entry((client, served_by)).or_insert(0) += 1;
    }
    ensure!(answered_by.len() == 6, "answered by {answered_by:?}");
    let metrics = fleet.client_metrics().await?;
    let retried = metrics.sum(
        "keel_retries_total",
        &[("service", fleet::SERVICE), ("reason", "status")],
    );
    // Half the first attempts go to b or c (retried once or twice): fewer than 15 retries in
    // 60 requests is practically impossible.
    ensure!(retried >= 15.0, "{retried} retries in {EACH} requests");
    Ok(())
}

/// A circuit breaker of two requests in flight answers a burst against a slow service with
/// immediate 503s naming the limit, counts them, and lets requests through again once the
/// requests in flight finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_trip_and_recover() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut eps = three(Mode::Ok);
    for e in &mut eps {
        e.mode = Mode::Delay(Duration::from_millis(1500));
    }
    let policy = "  loadBalancer: {policy: ROUND_ROBIN}
  circuitBreaker: {maxRequests: 2}
";
    let fleet = Fleet::start(spec(eps, policy, "")).await?;
    let target = fleet.target();
    // A burst of eight at once.
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move { one_request(&target).await })
        })
        .collect();
    let mut answers = Vec::new();
    for request in burst {
        answers.push(request.await??);
    }
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let open: Vec<&(u16, String, String)> = answers
        .iter()
        .filter(|a| a.0 == 503 && a.1 == "circuit-open")
        .collect();
    ensure!(
        ok + open.len() == answers.len(),
        "every answer is a 200 or a circuit-open 503: {answers:?}"
    );
    ensure!(
        ok >= 2 && !open.is_empty(),
        "the breaker must admit two and refuse some: {answers:?}"
    );
    ensure!(
        open.iter().all(|a| a.2 == "max-requests"),
        "the limit must be named: {answers:?}"
    );
    let metrics = fleet.client_metrics().await?;
    let counted = metrics.sum(
        "keel_circuit_breaker_rejections_total",
        &[("service", fleet::SERVICE), ("limit", "max-requests")],
    );
    ensure!(
        counted == open.len() as f64,
        "the sidecar counted {counted} rejections, the clients saw {}",
        open.len()
    );
    // Recovered: with the burst over, requests go through.
    for _ in 0..2 {
        let (status, error, _) = one_request(&target).await?;
        ensure!(status == 200, "after the burst: {status} {error}");
    }
    Ok(())
}

/// One GET on a new connection: status, `keel-error` and `keel-circuit-breaker`.
async fn one_request(
    target: &keel_tests::traffic::Target,
) -> anyhow::Result<(u16, String, String)> {
    request(target, http::Method::GET, "/").await
}

/// One request with a small body on a new connection: status, `keel-error` and
/// `keel-circuit-breaker`.
async fn request(
    target: &keel_tests::traffic::Target,
    method: http::Method,
    path: &str,
) -> anyhow::Result<(u16, String, String)> {
    let answer = exchange(target, Client::Http1, method, path, &[], "{\"comment\": 1}").await?;
    Ok((
        answer.status.as_u16(),
        field(&answer, "keel-error"),
        field(&answer, "keel-circuit-breaker"),
    ))
}

/// How a test client sends its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Client {
    /// HTTP/1.1, origin-form target, `Host`.
    Http1,
    /// HTTP/1.1, absolute-form target (as to a forward proxy), `Host`.
    Http1AbsoluteForm,
    /// HTTP/2 with prior knowledge: `:authority`, no `Host`.
    Http2,
}

/// Sends one request on a new connection and reads its whole answer.
async fn exchange(
    target: &keel_tests::traffic::Target,
    client: Client,
    method: http::Method,
    path: &str,
    fields: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<http::response::Parts> {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = keel_tests::netns::connect_from(&target.from, target.to).await?;
    let uri = match client {
        Client::Http1 => path.to_owned(),
        Client::Http1AbsoluteForm | Client::Http2 => format!("http://{}{path}", target.host),
    };
    let mut request = http::Request::builder().method(method).uri(uri);
    if client != Client::Http2 {
        request = request.header(http::header::HOST, target.host.as_str());
    }
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(bytes::Bytes::from(body.to_owned())))?;
    if client == Client::Http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        let task = tokio::spawn(connection);
        let answer = read_answer(sender.send_request(request)).await;
        task.abort();
        answer
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(connection);
        let answer = read_answer(sender.send_request(request)).await;
        task.abort();
        answer
    }
}

/// Waits for a response and reads its body to the end.
async fn read_answer(
    sent: impl Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
) -> anyhow::Result<http::response::Parts> {
    use http_body_util::BodyExt;
    let response = tokio::time::timeout(Duration::from_secs(20), sent)
        .await
        .map_err(|_| anyhow!("no answer within 20s"))??;
    let (parts, body) = response.into_parts();
    body.collect().await?;
    Ok(parts)
}

/// A response field's value, or "" without one.
fn field(response: &http::response::Parts, name: &str) -> String {
    response
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}
