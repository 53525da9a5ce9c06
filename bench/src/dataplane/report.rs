//! The data-plane benchmark's report: a markdown section with the machine, the versions, the
//! exact command, one table of medians with their spread per case, the keel/Envoy ratios, keel's
//! targets, the scenarios beyond steady state, and its place in `RESULTS.md`.
//!
//! Every measured number comes from the measurements passed in; the only numbers written here
//! are keel's targets (from issue 6), labelled as targets.

use std::fmt::Write as _;
use std::path::Path;

use super::{Case, ChurnMeasurement, Measurement, Options, Role};
use crate::openloop::{Percentiles, Report};
use crate::results::{self, Markers};
use crate::summary::Summary;

/// Marks the start of the data-plane section in a results file.
pub const SECTION_BEGIN: &str = "<!-- dataplane: begin (written by `dataplane --out`) -->";
/// Marks its end.
pub const SECTION_END: &str = "<!-- dataplane: end -->";

/// Reads one percentile.
type Pick = fn(&Percentiles) -> f64;

/// The latency percentiles in the table, by name.
const PERCENTILES: [(&str, Pick); 4] = [
    ("p50", |p| p.p50),
    ("p99", |p| p.p99),
    ("p99.9", |p| p.p999),
    ("max", |p| p.max),
];

/// What the report says about where and how it was measured.
#[derive(Debug, Clone)]
pub struct Environment {
    /// Cores, CPU model, kernel.
    pub machine: String,
    /// The load average (1, 5, 15 minutes) when the benchmark started and when the data-plane
    /// runs ended.
    pub load_average: (String, String),
    /// keel's revision and the other programs' versions.
    pub versions: String,
    /// How the processes were placed on CPUs.
    pub pinning: String,
    /// The load: wrk's, h2load's and the open-loop generator's settings.
    pub load: String,
    /// The command line, as run.
    pub command: String,
}

/// Renders the section (with its markers).
pub fn render(
    environment: &Environment,
    options: &Options,
    cases: &[Case],
    measurements: &[Measurement],
    churn: &[ChurnMeasurement],
    discovery: &[String],
) -> String {
    let runs = options.runs;
    let rates = &options.rates;
    let mut out = String::new();
    let _ = writeln!(out, "{SECTION_BEGIN}");
    let _ = writeln!(out, "## Data plane: direct, keel and Envoy\n");
    let _ = writeln!(
        out,
        "Client pod → nginx in a server pod over a bridge (network namespaces and veths). \
         *direct*: no proxy. *one hop*: the client's sidecar (outbound, transparent) → nginx, \
         HTTP/1.1 to the endpoint (it has no sidecar). *pair*: the client's sidecar → HTTP/2 → \
         the server's sidecar (inbound) → nginx. Envoy is configured to do keel's work \
         (bench/dataplane/envoy.yaml: the same iptables redirect, original_dst, routing by \
         Host to a cluster of the endpoints, HTTP/2 between sidecars, no access log). The \
         control plane and the network are set up once; every run starts fresh sidecars for \
         each case, and runs interleave the cases so that the machine's noise falls on all of \
         them alike. HTTP/2 (h2load) goes to nginx's h2c port directly and through the pairs; \
         through one hop the sidecar speaks HTTP/1.1 to nginx. *pair mTLS*: the pair with \
         mutual TLS 1.3 between the sidecars (ECDSA P-256 SPIFFE certificates; keel's from its \
         control plane's CA, Envoy's from files the benchmark generates). *nginx one hop \
         (reference)*: nginx as a reverse proxy in the one-hop path, behind the same redirect \
         (bench/dataplane/nginx-proxy.conf: one upstream, keep-alive HTTP/1.1, no routing, no \
         access log); it does less than a sidecar, so its figures are the floor of what any \
         proxy costs on this machine.\n"
    );
    let _ = writeln!(out, "- Machine: {}", environment.machine);
    let _ = writeln!(
        out,
        "- Load average (1, 5, 15 min): {} at the start, {} after the data-plane runs (2 cores; \
         other work on the machine shares them)",
        environment.load_average.0, environment.load_average.1
    );
    let _ = writeln!(out, "- Versions: {}", environment.versions);
    let _ = writeln!(out, "- Placement: {}", environment.pinning);
    let _ = writeln!(out, "- Load: {}", environment.load);
    let _ = writeln!(
        out,
        "- Each cell: median (min–max) of {runs} runs; added latency is each run's figure minus \
         *direct*'s in the same run"
    );
    let _ = writeln!(
        out,
        "- Disturbed runs: a load run (wrk, h2load, or one open-loop rate) during which the host \
         gave more than {}% of the machine's CPU time to other guests (steal, from /proc/stat) \
         is measured again, up to {} more times, and the attempt with the least steal is kept; \
         steal does not depend on the proxy under test, and every attempt's errors count",
        options.steal_limit_percent, options.steal_retries
    );
    let _ = writeln!(out, "- Command: `{}`\n", environment.command);

    let table = Table {
        cases,
        measurements,
    };
    let _ = writeln!(
        out,
        "| figure | {} |",
        cases
            .iter()
            .map(|c| c.title())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|{}", "---|".repeat(cases.len()));
    let mut row = |label: String, cells: Vec<String>| {
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    };
    row(
        format!(
            "max throughput HTTP/1.1, `{}` (req/s)",
            super::wrk_label(&options.wrk(options.wrk_duration))
        ),
        table.cells(0, false, |m| Some(m.wrk.requests_per_second)),
    );
    if let Some(h2) = options.h2load() {
        row(
            format!("max throughput HTTP/2, `{}` (req/s)", h2.label()),
            table.cells(0, false, |m| Some(m.h2load?.requests_per_second)),
        );
    }
    if let Some(many) = options.many_wrk() {
        row(
            format!(
                "max throughput HTTP/1.1 with many connections, `{}` (req/s)",
                super::wrk_label(&many)
            ),
            table.cells(0, false, |m| Some(m.many_wrk?.requests_per_second)),
        );
    }
    for (i, rate) in rates.iter().enumerate() {
        for (name, pick) in PERCENTILES {
            row(
                format!("latency at {rate} req/s, {name} (ms)"),
                table.cells(3, false, |m| {
                    Some(pick(&m.open_loop.get(i)?.latency_us) / 1000.0)
                }),
            );
        }
        for (name, pick) in PERCENTILES {
            row(
                format!("added latency at {rate} req/s vs direct, {name} (ms)"),
                table.added(|m| Some(pick(&m.open_loop.get(i)?.latency_us) / 1000.0)),
            );
        }
    }
    row(
        "proxy CPU per request, HTTP/1.1 max load, all sidecars (µs)".to_owned(),
        table.cells(1, false, |m| m.cpu_per_request_wrk(None)),
    );
    row(
        "the kernel's share of that CPU time (system time, %)".to_owned(),
        table.cells(0, false, |m| m.kernel_share_wrk()),
    );
    for role in [Role::Client, Role::Server] {
        row(
            format!(
                "proxy CPU per request, HTTP/1.1 max load, {} (µs)",
                role.title()
            ),
            table.cells(1, false, |m| {
                m.sidecar(role)?;
                m.cpu_per_request_wrk(Some(role))
            }),
        );
    }
    if options.h2load().is_some() {
        row(
            "proxy CPU per request, HTTP/2 max load, all sidecars (µs)".to_owned(),
            table.cells(1, false, |m| m.cpu_per_request_h2load()),
        );
    }
    if let Some(many) = options.many_wrk() {
        row(
            format!(
                "proxy CPU per request, HTTP/1.1 max load with {} connections, all sidecars (µs)",
                many.connections
            ),
            table.cells(1, false, |m| m.cpu_per_request_many()),
        );
    }
    for (i, rate) in rates.iter().enumerate() {
        row(
            format!("proxy CPU per request at {rate} req/s, all sidecars (µs)"),
            table.cells(1, false, |m| m.cpu_per_request_open_loop(i)),
        );
    }
    row(
        "nginx CPU per request, HTTP/1.1 max load (µs; for scale: one recv and one send per \
         request)"
            .to_owned(),
        table.cells(1, false, |m| Some(m.upstream_cpu_per_request())),
    );
    for role in [Role::Client, Role::Server] {
        let mib = |kib: u64| kib as f64 / 1024.0;
        row(
            format!("{} RSS idle, once ready (MiB)", role.title()),
            table.cells(1, false, |m| Some(mib(m.sidecar(role)?.idle.rss_kib))),
        );
        row(
            format!("{} RSS after the load (MiB)", role.title()),
            table.cells(1, false, |m| Some(mib(m.sidecar(role)?.loaded.rss_kib))),
        );
        row(
            format!("{} peak RSS, VmHWM (MiB)", role.title()),
            table.cells(1, false, |m| Some(mib(m.sidecar(role)?.loaded.hwm_kib))),
        );
        if let Some(many) = options.many_wrk() {
            let n = many.connections;
            row(
                format!(
                    "{} RSS halfway through `{}`: {n} client connections open (MiB)",
                    role.title(),
                    super::wrk_label(&many)
                ),
                table.cells(1, false, |m| Some(mib(m.sidecar(role)?.many?.1.rss_kib))),
            );
            row(
                format!(
                    "{} RSS per client connection then, over its RSS idle (KiB; its upstream \
                     connections included)",
                    role.title()
                ),
                table.cells(1, false, |m| m.kib_per_connection(role, n)),
            );
        }
    }
    for (i, rate) in rates.iter().enumerate() {
        row(
            format!("load generator's own send lag at {rate} req/s, p99 (ms)"),
            table.cells(3, false, |m| {
                Some(m.open_loop.get(i)?.send_lag_us.p99 / 1000.0)
            }),
        );
    }
    for (i, rate) in rates.iter().enumerate() {
        row(
            format!(
                "CPU time the host gave to other guests (steal, both CPUs) during the open loop at \
                 {rate} req/s (ms)"
            ),
            table.cells(0, false, |m| {
                Some(m.stolen_open_loop.get(i)?.as_secs_f64() * 1000.0)
            }),
        );
    }
    row(
        format!(
            "load runs measured again: the host took more than {}% of the machine's CPU time \
             during them (all runs)",
            options.steal_limit_percent
        ),
        table.repeats(),
    );
    row(
        "errors in all runs, repeated ones included: wrk (socket + non-2xx) / h2load / open loop"
            .to_owned(),
        table.errors(),
    );

    ratios(&mut out, &table, options);
    mtls_cost(&mut out, &table, options);
    targets(&mut out, &table, options);
    churn_section(&mut out, churn, options);
    if !discovery.is_empty() {
        let _ = writeln!(
            out,
            "\n### Control plane: a change reaching many proxies\n\nThe `discovery` benchmark \
             (bench/src/bin/discovery.rs), run by this command after the data-plane runs with \
             `--services {} --endpoints 10 --runs {}`; its own tables follow.\n",
            options.discovery_services, options.discovery_runs
        );
        for report in discovery {
            // Its headings one level down, under this one.
            for line in report.lines() {
                if line.starts_with('#') {
                    let _ = writeln!(out, "##{line}");
                } else {
                    let _ = writeln!(out, "{line}");
                }
            }
            let _ = writeln!(out);
        }
    }
    let _ = writeln!(out, "{SECTION_END}");
    out
}

/// keel's figures over Envoy's doing the same work, from the medians.
fn ratios(out: &mut String, table: &Table<'_>, options: &Options) {
    let pairs: Vec<(Case, Case)> = table
        .cases
        .iter()
        .filter_map(|envoy| Some((envoy.keel_counterpart()?, *envoy)))
        .filter(|(keel, _)| table.cases.contains(keel))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### keel / Envoy\n\nkeel's median over Envoy's median, doing the same work: above 1 \
         is keel's advantage for throughput, below 1 for CPU, latency and memory.\n"
    );
    let _ = writeln!(
        out,
        "| figure | {} |",
        pairs
            .iter()
            .map(|(k, e)| format!("{} / {}", k.title(), e.title()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|{}", "---|".repeat(pairs.len()));
    let mut row = |label: &str, figure: &dyn Fn(Case) -> Option<f64>| {
        let cells: Vec<String> = pairs
            .iter()
            .map(|(keel, envoy)| match (figure(*keel), figure(*envoy)) {
                (Some(k), Some(e)) if e != 0.0 => format!("{:.2}", k / e),
                _ => "—".to_owned(),
            })
            .collect();
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    };
    row("max throughput HTTP/1.1", &|c| {
        table.median(c, |m| Some(m.wrk.requests_per_second))
    });
    if options.h2load().is_some() {
        row("max throughput HTTP/2", &|c| {
            table.median(c, |m| Some(m.h2load?.requests_per_second))
        });
    }
    row("proxy CPU per request, HTTP/1.1 max load", &|c| {
        table.median(c, |m| m.cpu_per_request_wrk(None))
    });
    for (i, rate) in options.rates.iter().enumerate() {
        row(&format!("added p99 latency at {rate} req/s"), &|c| {
            table.added_median(c, |m| Some(m.open_loop.get(i)?.latency_us.p99 / 1000.0))
        });
    }
    row("client sidecar RSS after the load", &|c| {
        table.median(c, |m| Some(m.sidecar(Role::Client)?.loaded.rss_kib as f64))
    });
    if let Some(many) = options.many_wrk() {
        let n = many.connections;
        row(
            &format!("max throughput HTTP/1.1 with {n} connections"),
            &|c| table.median(c, |m| Some(m.many_wrk?.requests_per_second)),
        );
        row(
            &format!("proxy CPU per request, HTTP/1.1 max load with {n} connections"),
            &|c| table.median(c, |m| m.cpu_per_request_many()),
        );
        row(
            &format!("client sidecar RSS per client connection, {n} open"),
            &|c| table.median(c, |m| m.kib_per_connection(Role::Client, n)),
        );
    }
}

/// What mTLS between the sidecars adds to each proxy's pair: the latency of the pair with mTLS
/// minus the plaintext pair's in the same run, and the same for CPU per request.
fn mtls_cost(out: &mut String, table: &Table<'_>, options: &Options) {
    let pairs: Vec<(Case, Case)> = [
        (Case::KeelPair, Case::KeelPairMtls),
        (Case::EnvoyPair, Case::EnvoyPairMtls),
    ]
    .into_iter()
    .filter(|(plain, mtls)| table.cases.contains(plain) && table.cases.contains(mtls))
    .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### What mTLS adds to a sidecar pair\n\nEach run's pair with mTLS minus the same \
         proxy's plaintext pair in that run; median (min–max) over the runs.\n"
    );
    let _ = writeln!(
        out,
        "| figure | {} |",
        pairs
            .iter()
            .map(|(_, mtls)| format!("{} − plaintext", mtls.title()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|{}", "---|".repeat(pairs.len()));
    let mut row = |label: String, decimals: usize, figure: &dyn Fn(&Measurement) -> Option<f64>| {
        let cells: Vec<String> = pairs
            .iter()
            .map(|(plain, mtls)| {
                cell(
                    Summary::of(&table.differences(*mtls, *plain, figure)),
                    decimals,
                    true,
                )
            })
            .collect();
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    };
    for (i, rate) in options.rates.iter().enumerate() {
        for (name, pick) in PERCENTILES.iter().take(2) {
            row(format!("latency at {rate} req/s, {name} (ms)"), 3, &|m| {
                Some(pick(&m.open_loop.get(i)?.latency_us) / 1000.0)
            });
        }
    }
    row(
        "proxy CPU per request, HTTP/1.1 max load, both sidecars (µs)".to_owned(),
        1,
        &|m| m.cpu_per_request_wrk(None),
    );
    row("max throughput HTTP/1.1 (req/s)".to_owned(), 0, &|m| {
        Some(m.wrk.requests_per_second)
    });
}

/// keel's targets (issue 6) against this run's medians.
fn targets(out: &mut String, table: &Table<'_>, options: &Options) {
    let one_hop = Case::KeelOneHop;
    if !table.cases.contains(&one_hop) {
        return;
    }
    // nginx as a proxy in the same path, where it ran: what the machine lets any proxy reach.
    let reference = table.cases.contains(&Case::NginxOneHop);
    let _ = writeln!(
        out,
        "\n### keel against its targets\n\n{}| target | measured (median) | met |{}\n|---|---|---|{}",
        if reference {
            "The last column is the same figure for nginx as a reverse proxy in keel's one-hop \
             path, in this run: the floor of what a proxy costs on this machine.\n\n"
        } else {
            ""
        },
        if reference {
            " nginx one hop (reference) |"
        } else {
            ""
        },
        if reference { "---|" } else { "" },
    );
    let mut row = |target: &str,
                   measured: Option<f64>,
                   nginx: Option<f64>,
                   decimals: usize,
                   met: &dyn Fn(f64) -> bool| {
        let (value, verdict) = match measured {
            Some(v) => (format!("{v:.decimals$}"), if met(v) { "yes" } else { "no" }),
            None => ("—".to_owned(), "—"),
        };
        let reference_cell = match (reference, nginx) {
            (false, _) => String::new(),
            (true, Some(v)) => format!(" {v:.decimals$} |"),
            (true, None) => " — |".to_owned(),
        };
        let _ = writeln!(out, "| {target} | {value} | {verdict} |{reference_cell}");
    };
    let cpu = |case| table.median(case, |m| m.cpu_per_request_wrk(None));
    row(
        "proxy CPU per request ≤ 15 µs (HTTP/1.1 max load)",
        cpu(one_hop),
        cpu(Case::NginxOneHop),
        1,
        &|v| v <= 15.0,
    );
    if table.cases.contains(&Case::EnvoyOneHop) {
        let over_envoy = |case| {
            table
                .median(case, |m| Some(m.wrk.requests_per_second))
                .zip(table.median(Case::EnvoyOneHop, |m| Some(m.wrk.requests_per_second)))
                .map(|(k, e)| k / e)
        };
        row(
            "max req/s ≥ 3 × Envoy's one hop (ratio)",
            over_envoy(one_hop),
            over_envoy(Case::NginxOneHop),
            2,
            &|v| v >= 3.0,
        );
    }
    if let Some(i) = options.rates.iter().position(|r| *r == 2000) {
        let added =
            |case| table.added_median(case, |m| Some(m.open_loop.get(i)?.latency_us.p99 / 1000.0));
        row(
            "added p99 at 2000 req/s ≤ 0.05 ms",
            added(one_hop),
            added(Case::NginxOneHop),
            3,
            &|v| v <= 0.05,
        );
    }
    let rss = |case| {
        table.median(case, |m| {
            Some(m.sidecar(Role::Client)?.loaded.rss_kib as f64 / 1024.0)
        })
    };
    row(
        "RSS after the load ≤ 12 MB (MiB; 12 MB = 11.44 MiB)",
        rss(one_hop),
        rss(Case::NginxOneHop),
        1,
        &|v| v * 1024.0 * 1024.0 <= 12e6,
    );
    // The sidecar pair with mTLS: its added p99 against Envoy's pair doing the same (mTLS).
    if table.cases.contains(&Case::KeelPairMtls)
        && table.cases.contains(&Case::EnvoyPairMtls)
        && let Some(i) = options.rates.iter().position(|r| *r == 2000)
    {
        let added =
            |case| table.added_median(case, |m| Some(m.open_loop.get(i)?.latency_us.p99 / 1000.0));
        let ratio = added(Case::KeelPairMtls)
            .zip(added(Case::EnvoyPairMtls))
            .filter(|(_, envoy)| *envoy > 0.0)
            .map(|(keel, envoy)| keel / envoy);
        row(
            "pair with mTLS: added p99 at 2000 req/s ≤ 0.5 × Envoy's pair with mTLS (ratio)",
            ratio,
            None,
            2,
            &|v| v <= 0.5,
        );
    }
}

/// The endpoint-churn scenario's table.
fn churn_section(out: &mut String, churn: &[ChurnMeasurement], options: &Options) {
    if churn.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### keel one hop while its endpoints change\n\nOpen loop at {rate} req/s for {d} \
         (after a {w} warm-up) through keel one hop, first steady, then while the control \
         plane's YAML directory is rewritten every {i} (service `plain` cycling through its \
         endpoints {{server}}, {{server, server-b}}, {{server-b}}, {{server, server-b}}; both \
         nginx), then `wrk` for {d} during the churn. Median (min–max) of {n} runs.\n",
        rate = options.churn_rate,
        d = humantime::format_duration(options.churn_duration),
        w = humantime::format_duration(options.warmup),
        i = humantime::format_duration(options.churn_interval),
        n = churn.len(),
    );
    let _ = writeln!(
        out,
        "| figure | steady | endpoints changing | change |\n|---|---|---|---|"
    );
    let summary = |f: &dyn Fn(&ChurnMeasurement) -> f64, decimals: usize| {
        let values: Vec<f64> = churn.iter().map(f).collect();
        cell(Summary::of(&values), decimals, false)
    };
    for (name, pick) in PERCENTILES {
        let of = |r: &Report| pick(&r.latency_us) / 1000.0;
        let _ = writeln!(
            out,
            "| latency {name} (ms) | {} | {} | {} |",
            summary(&|c| of(&c.steady), 3),
            summary(&|c| of(&c.churning), 3),
            cell(
                Summary::of(
                    &churn
                        .iter()
                        .map(|c| of(&c.churning) - of(&c.steady))
                        .collect::<Vec<_>>()
                ),
                3,
                true
            ),
        );
    }
    let _ = writeln!(
        out,
        "| failed requests, open loop | {} | {} | |",
        churn.iter().map(|c| c.steady.errors).sum::<u64>(),
        churn.iter().map(|c| c.churning.errors).sum::<u64>(),
    );
    let _ = writeln!(
        out,
        "| failed requests, wrk (socket + non-2xx) | | {} | |",
        churn
            .iter()
            .map(|c| c.wrk.socket_errors + c.wrk.bad_status)
            .sum::<u64>(),
    );
    let _ = writeln!(
        out,
        "| wrk max throughput while churning (req/s) | | {} | |",
        summary(&|c| c.wrk.requests_per_second, 0)
    );
    let _ = writeln!(
        out,
        "| endpoint-set changes written / discovery responses the sidecar applied (ACKed), per run | | {} / {} | |",
        summary(&|c| c.changes_written as f64, 0),
        summary(&|c| c.updates_applied as f64, 0),
    );
}

/// Builds the table's cells from the measurements.
struct Table<'a> {
    cases: &'a [Case],
    measurements: &'a [Measurement],
}

impl Table<'_> {
    fn values(&self, case: Case, figure: impl Fn(&Measurement) -> Option<f64>) -> Vec<f64> {
        self.measurements
            .iter()
            .filter(|m| m.case == case)
            .filter_map(figure)
            .collect()
    }

    fn median(&self, case: Case, figure: impl Fn(&Measurement) -> Option<f64>) -> Option<f64> {
        Summary::of(&self.values(case, figure)).map(|s| s.median)
    }

    /// The median over runs of `figure` minus direct's `figure` in the same run.
    fn added_median(
        &self,
        case: Case,
        figure: impl Fn(&Measurement) -> Option<f64>,
    ) -> Option<f64> {
        self.median(case, |m| Some(figure(m)? - figure(self.direct(m.run)?)?))
    }

    /// Per run, `figure` of `case` minus `figure` of `baseline` in the same run.
    fn differences(
        &self,
        case: Case,
        baseline: Case,
        figure: &dyn Fn(&Measurement) -> Option<f64>,
    ) -> Vec<f64> {
        self.values(case, |m| {
            let base = self
                .measurements
                .iter()
                .find(|b| b.case == baseline && b.run == m.run)?;
            Some(figure(m)? - figure(base)?)
        })
    }

    fn direct(&self, run: usize) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.case == Case::Direct && m.run == run)
    }

    /// One cell per case: the summary of `figure` over that case's runs, or "—".
    fn cells(
        &self,
        decimals: usize,
        signed: bool,
        figure: impl Fn(&Measurement) -> Option<f64>,
    ) -> Vec<String> {
        self.cases
            .iter()
            .map(|case| cell(Summary::of(&self.values(*case, &figure)), decimals, signed))
            .collect()
    }

    /// One cell per proxied case: `figure` minus direct's `figure` of the same run.
    fn added(&self, figure: impl Fn(&Measurement) -> Option<f64>) -> Vec<String> {
        let mut cells = self.cells(3, true, |m| {
            if m.case == Case::Direct {
                return None;
            }
            Some(figure(m)? - figure(self.direct(m.run)?)?)
        });
        for (cell, case) in cells.iter_mut().zip(self.cases) {
            if *case == Case::Direct {
                *cell = "—".to_owned();
            }
        }
        cells
    }

    /// Total wrk, h2load and open-loop errors per case.
    /// Per case: the load runs set aside as disturbed, over all runs, and how many load runs
    /// the case had in all.
    fn repeats(&self) -> Vec<String> {
        self.cases
            .iter()
            .map(|case| {
                let runs = self.measurements.iter().filter(|m| m.case == *case);
                let (repeated, kept) = runs.fold((0, 0), |(repeated, kept), m| {
                    let loads = 1
                        + usize::from(m.h2load.is_some())
                        + usize::from(m.many_wrk.is_some())
                        + m.open_loop.len();
                    (repeated + m.repeated.runs, kept + loads)
                });
                format!("{repeated} of {}", repeated + kept)
            })
            .collect()
    }

    fn errors(&self) -> Vec<String> {
        self.cases
            .iter()
            .map(|case| {
                let runs = self.measurements.iter().filter(|m| m.case == *case);
                let (wrk, h2, open_loop) = runs.fold((0, 0, 0), |(wrk, h2, open_loop), m| {
                    (
                        wrk + m.wrk.socket_errors
                            + m.wrk.bad_status
                            + m.many_wrk.map_or(0, |w| w.socket_errors + w.bad_status)
                            + m.repeated.wrk_errors,
                        h2 + m.h2load.map_or(0, |h| h.failed) + m.repeated.h2load_errors,
                        open_loop
                            + m.repeated.open_loop_errors
                            + m.open_loop.iter().map(|r| r.errors).sum::<u64>(),
                    )
                });
                format!("{wrk} / {h2} / {open_loop}")
            })
            .collect()
    }
}

fn cell(summary: Option<Summary>, decimals: usize, signed: bool) -> String {
    match summary {
        None => "—".to_owned(),
        Some(s) if signed => s.display_signed(decimals).to_string(),
        Some(s) => s.display(decimals).to_string(),
    }
}

/// Where the data-plane section lives in a results file.
pub const MARKERS: Markers = Markers {
    begin: SECTION_BEGIN,
    end: SECTION_END,
};

/// Puts `section` (which carries its own markers) into the file at `path`, in place of the
/// data-plane section if there is one, else at the end (see [`crate::results::write_section`]).
pub fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    results::write_section(path, MARKERS, section)
}
