//! Failover benchmark: how fast keel stops sending to a dead endpoint, and what a zone failover
//! costs clients (see bench/README.md, "Failover").
//!
//! Each run builds a fresh fleet (`keel_tests::fleet`: a client pod with a sidecar and endpoint
//! processes in their own pods), drives it with closed-loop traffic (four workers, one request
//! after another), then:
//! - **endpoint death**: three meshed endpoints; endpoint `d`'s process is killed (its sidecar
//!   stays, as when a container crashes). Measured: time until the client's sidecar marks `d`
//!   unhealthy (ejected), time until the last request reaches `d`'s pod, how many did, and how
//!   many client requests failed;
//! - **zone failover**: six unmeshed endpoints in three zones (two regions), locality failover
//!   on; both endpoints of the client's zone are killed. Measured: client requests lost, and the
//!   time until every request is served by the next zone. Once with keel's default retry policy,
//!   once with retries off (`attempts: 0`), to show what the retries save.
//!
//! Outlier detection is configured with `consecutive5xx: 5, interval: 1s, baseEjectionTime: 30s`
//! and the defaults for the rest (no cap on the ejection percentage, panic at 50%).
//!
//! Prints a markdown section (the machine, the load average, keel's revision, the command, and
//! the figures as medians with min and max over `--runs`) and, with `--out`, puts it into that
//! file between its markers, replacing an earlier one (`bench/RESULTS.md`).
//!
//! `failover endpoint ...` is the endpoint process itself (the benchmark re-executes itself in
//! each pod). Needs root; removes everything it created when it ends.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use keel_bench::results::{self, Markers};
use keel_bench::summary::Summary;
use keel_tests::fleet::{self, EndpointSpec, Fleet, FleetSpec};
use keel_tests::traffic::{self, Traffic};

/// Where the failover section lives in a results file.
const MARKERS: Markers = Markers {
    begin: "<!-- failover: begin (written by `failover --out`) -->",
    end: "<!-- failover: end -->",
};

/// The outlier detection of both scenarios.
const OUTLIER: &str =
    "  outlierDetection: {consecutive5xx: 5, interval: 1s, baseEjectionTime: 30s}\n";

#[derive(Debug, Parser)]
#[command(about = "Measure keel's failover: a dead endpoint's ejection, a zone's loss")]
struct Args {
    /// Runs of each scenario; figures are medians with min and max.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Closed-loop client workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Also put the section into this file (e.g. bench/RESULTS.md), in place of an earlier one.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const CONVERGE: Duration = Duration::from_secs(30);

fn endpoint_command() -> anyhow::Result<Vec<OsString>> {
    Ok(vec![
        std::env::current_exe()?.into_os_string(),
        OsString::from("endpoint"),
    ])
}

/// One figure over several runs.
#[derive(Default)]
struct Figure {
    name: &'static str,
    unit: &'static str,
    values: Vec<f64>,
}

impl Figure {
    fn new(name: &'static str, unit: &'static str) -> Figure {
        Figure {
            name,
            unit,
            values: Vec::new(),
        }
    }

    fn row(&self, scenario: &str) -> String {
        let cell =
            Summary::of(&self.values).map_or_else(|| "—".to_owned(), |s| s.display(0).to_string());
        format!("| {scenario} | {} | {cell} {} |", self.name, self.unit)
    }
}

/// Endpoint death: returns (ms to ejection, ms to the last request reaching it, requests that
/// reached it after the kill, client failures, client requests after the kill).
async fn endpoint_death(workers: usize) -> anyhow::Result<[f64; 5]> {
    let endpoints = ["b", "c", "d"]
        .into_iter()
        .map(|n| EndpointSpec::new(n, "r1", "zone-a", true))
        .collect();
    let mut fleet = Fleet::start(FleetSpec {
        endpoints,
        traffic_policy: OUTLIER.into(),
        routes: String::new(),
        endpoint_command: endpoint_command()?,
    })
    .await?;
    let d = fleet.endpoint("d")?.ip().context("no pod")?;
    let traffic = Traffic::start(fleet.target(), workers, Duration::ZERO);
    traffic.wait_for_more(500, CONVERGE).await?;
    let inbound =
        |m: &keel_tests::netns::Metrics| m.sum("keel_requests_total", &[("direction", "inbound")]);
    let at_kill = inbound(&fleet.endpoint_metrics("d").await?);
    let killed_at_len = traffic.len();
    fleet.kill("d")?;
    let t0 = Instant::now();
    let mut last_seen = at_kill;
    let mut last_change = t0;
    let mut ejected = None;
    while t0.elapsed() < Duration::from_secs(5) || ejected.is_none() {
        ensure!(
            t0.elapsed() < CONVERGE,
            "d was never ejected\n{}",
            fleet.logs()
        );
        let now = inbound(&fleet.endpoint_metrics("d").await?);
        if now != last_seen {
            last_seen = now;
            last_change = Instant::now();
        }
        if ejected.is_none()
            && fleet::endpoint_healthy(&fleet.client_metrics().await?, d) == Some(0.0)
        {
            ejected = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcomes = traffic.finish().await;
    let after = &outcomes[killed_at_len..];
    Ok([
        ejected.unwrap_or_default().as_secs_f64() * 1000.0,
        last_change.saturating_duration_since(t0).as_secs_f64() * 1000.0,
        last_seen - at_kill,
        traffic::failures(after).len() as f64,
        after.len() as f64,
    ])
}

/// Zone failover: returns (client requests lost, ms until every request is served by the next
/// zone, client requests after the kill).
async fn zone_failover(workers: usize, retries: bool) -> anyhow::Result<[f64; 3]> {
    let endpoints = fleet::three_zones();
    let routes = if retries {
        String::new()
    } else {
        "  routes:\n  - name: all\n    destinations: [{service: web}]\n    retries: {attempts: 0}\n"
            .to_owned()
    };
    let mut fleet = Fleet::start(FleetSpec {
        endpoints,
        traffic_policy: format!("{OUTLIER}  localityFailover: {{enabled: true}}\n"),
        routes,
        endpoint_command: endpoint_command()?,
    })
    .await?;
    let traffic = Traffic::start(fleet.target(), workers, Duration::ZERO);
    traffic.wait_for_more(500, CONVERGE).await?;
    let killed_at_len = traffic.len();
    let t0 = Instant::now();
    fleet.kill("a1")?;
    fleet.kill("a2")?;
    let zone_b = |o: &traffic::Outcome| o.served_by().is_some_and(|w| w.starts_with('b'));
    traffic
        .wait_for_last(500, CONVERGE, "every request served by zone-b", zone_b)
        .await?;
    let outcomes = traffic.finish().await;
    let after = &outcomes[killed_at_len..];
    let switched = after
        .iter()
        .rposition(|o| !zone_b(o))
        .map_or(t0, |i| after[i].at);
    Ok([
        traffic::failures(after).len() as f64,
        switched.saturating_duration_since(t0).as_secs_f64() * 1000.0,
        after.len() as f64,
    ])
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let load_at_start = results::load_average();
    let mut death = [
        Figure::new(
            "time to ejection (client's sidecar marks it unhealthy)",
            "ms",
        ),
        Figure::new("time to the last request reaching its pod", "ms"),
        Figure::new("requests reaching its pod after the kill", "req"),
        Figure::new("client requests failed", "req"),
        Figure::new("client requests in the window", "req"),
    ];
    let mut with_retries = [
        Figure::new("client requests lost", "req"),
        Figure::new("time until every request is served by zone-b", "ms"),
        Figure::new("client requests in the window", "req"),
    ];
    let mut without_retries = [
        Figure::new("client requests lost", "req"),
        Figure::new("time until every request is served by zone-b", "ms"),
        Figure::new("client requests in the window", "req"),
    ];
    for run in 1..=args.runs {
        eprintln!("run {run}/{}", args.runs);
        for (f, v) in death.iter_mut().zip(endpoint_death(args.workers).await?) {
            f.values.push(v);
        }
        for (f, v) in with_retries
            .iter_mut()
            .zip(zone_failover(args.workers, true).await?)
        {
            f.values.push(v);
        }
        for (f, v) in without_retries
            .iter_mut()
            .zip(zone_failover(args.workers, false).await?)
        {
            f.values.push(v);
        }
    }
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut out = format!(
        "{}\n## Failover: a dead endpoint, a lost zone\n\n",
        MARKERS.begin
    );
    out += &format!(
        "Measured by `failover` (bench/src/bin/failover.rs, described in bench/README.md) on {}; \
         load average {load_at_start} at the start, {} at the end; keel {}, {build} build. \
         Outlier detection: `{}`.\n\n",
        results::machine(),
        results::load_average(),
        results::revision(),
        OUTLIER.trim(),
    );
    out += &format!("```sh\n{}\n```\n\n", results::command_line());
    out += &format!(
        "{} runs, {} closed-loop workers; median (min–max) over the runs.\n\n",
        args.runs, args.workers
    );
    out += "| scenario | figure | median (min–max) |\n| --- | --- | --- |\n";
    for f in &death {
        out += &f.row("endpoint process killed (1 of 3, meshed)");
        out += "\n";
    }
    for f in &with_retries {
        out += &f.row("zone lost (2 of 6), default retries");
        out += "\n";
    }
    for f in &without_retries {
        out += &f.row("zone lost (2 of 6), retries off");
        out += "\n";
    }
    out += MARKERS.end;
    out += "\n";
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() == Some("endpoint") {
        return keel_tests::endpoint::run_from_args(argv);
    }
    let args = Args::parse();
    if let Some(why) = keel_tests::netns::require_root() {
        anyhow::bail!("the failover benchmark cannot run here: {why}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&args))?;
    print!("{report}");
    if let Some(out) = &args.out {
        results::write_section(out, MARKERS, &report)
            .with_context(|| format!("putting the failover section into {}", out.display()))?;
        eprintln!("Wrote the failover section of {}", out.display());
    }
    Ok(())
}
