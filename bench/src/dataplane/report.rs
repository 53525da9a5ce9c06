//! The data-plane benchmark's report: a markdown section with the machine, the versions, the
//! exact command and one table of medians with their spread, and its place in `RESULTS.md`.
//!
//! Every number in the table comes from the measurements passed in; the only numbers written here
//! are the reference figures of other proxies, printed apart and labelled as not measured.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::{Measurement, Role, Scenario};
use crate::openloop::Percentiles;
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
    /// The load average (1, 5, 15 minutes) when the benchmark started and when it ended.
    pub load_average: (String, String),
    /// keel's revision, nginx's and wrk's versions.
    pub versions: String,
    /// How the processes were placed on CPUs.
    pub pinning: String,
    /// The load: wrk's and the open-loop generator's settings.
    pub load: String,
    /// The command line, as run.
    pub command: String,
}

/// Renders the section (with its markers) for `measurements` over `runs` runs.
pub fn render(
    environment: &Environment,
    runs: usize,
    rates: &[u32],
    wrk_label: &str,
    measurements: &[Measurement],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{SECTION_BEGIN}");
    let _ = writeln!(
        out,
        "## Data plane: direct, keel one hop, keel sidecar pair\n"
    );
    let _ = writeln!(
        out,
        "Client pod → nginx in a server pod over a bridge (network namespaces and veths), \
         HTTP/1.1 keep-alive. *direct*: no proxy. *keel one hop*: the client's sidecar \
         (outbound) → nginx (endpoint `meshed: false`). *keel sidecar pair*: the client's sidecar \
         → HTTP/2 → the server's sidecar (inbound) → nginx. The control plane and the network \
         are set up once; every run starts fresh sidecars for each case, and runs interleave the \
         three cases so that the machine's noise falls on all of them alike.\n"
    );
    let _ = writeln!(out, "- Machine: {}", environment.machine);
    let _ = writeln!(
        out,
        "- Load average: {} at the start, {} at the end",
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
    let _ = writeln!(out, "- Command: `{}`\n", environment.command);

    let table = Table { measurements };
    let _ = writeln!(
        out,
        "| figure | {} | {} | {} |",
        Scenario::Direct.title(),
        Scenario::OneHop.title(),
        Scenario::Pair.title()
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let mut row = |label: String, cells: [String; 3]| {
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} |",
            cells[0], cells[1], cells[2]
        );
    };
    row(
        format!("max throughput, `{wrk_label}` (req/s)"),
        table.cells(0, false, |m| Some(m.wrk.requests_per_second)),
    );
    for (i, rate) in rates.iter().enumerate() {
        for (name, pick) in PERCENTILES {
            row(
                format!("latency at {rate} req/s, {name} (ms)"),
                table.cells(3, false, |m| {
                    Some(pick(&m.open_loop.get(i)?.latency_us) / 1000.0)
                }),
            );
        }
        for (name, pick) in &PERCENTILES[..3] {
            row(
                format!("added latency at {rate} req/s vs direct, {name} (ms)"),
                table.added(|m| Some(pick(&m.open_loop.get(i)?.latency_us) / 1000.0)),
            );
        }
    }
    row(
        "sidecar CPU per request under wrk, all sidecars (µs)".to_owned(),
        table.cells(1, false, |m| m.cpu_per_request_wrk(None)),
    );
    for role in [Role::Client, Role::Server] {
        row(
            format!("sidecar CPU per request under wrk, {} (µs)", role.title()),
            table.cells(1, false, |m| m.cpu_per_request_wrk(Some(role))),
        );
    }
    for (i, rate) in rates.iter().enumerate() {
        row(
            format!("sidecar CPU per request at {rate} req/s, all sidecars (µs)"),
            table.cells(1, false, |m| m.cpu_per_request_open_loop(i)),
        );
    }
    for role in [Role::Client, Role::Server] {
        let mib = |kib: u64| kib as f64 / 1024.0;
        row(
            format!("{} RSS idle, after `/ready` (MiB)", role.title()),
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
    }
    for (i, rate) in rates.iter().enumerate() {
        row(
            format!("load generator's own send lag at {rate} req/s, p99 (ms)"),
            table.cells(3, false, |m| {
                Some(m.open_loop.get(i)?.send_lag_us.p99 / 1000.0)
            }),
        );
    }
    row(
        "errors in all runs: wrk (socket + non-2xx) / open loop".to_owned(),
        table.errors(),
    );

    let _ = writeln!(
        out,
        "\nReference (not measured in this run; measured earlier on this kind of machine, one \
         worker, HTTP/1.1 keep-alive):\n"
    );
    let _ = writeln!(
        out,
        "| proxy, one hop | CPU per request | added p99 at 2000 req/s |"
    );
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(out, "| Envoy | 66 µs | +0.30 ms |");
    let _ = writeln!(out, "| HAProxy, nginx | ~20 µs | +0.05 ms |");
    let _ = writeln!(out, "{SECTION_END}");
    out
}

/// Builds the table's cells from the measurements.
struct Table<'a> {
    measurements: &'a [Measurement],
}

impl Table<'_> {
    /// One cell per scenario: the summary of `figure` over that scenario's runs, or "—".
    fn cells(
        &self,
        decimals: usize,
        signed: bool,
        figure: impl Fn(&Measurement) -> Option<f64>,
    ) -> [String; 3] {
        Scenario::ALL.map(|scenario| {
            let values: Vec<f64> = self
                .measurements
                .iter()
                .filter(|m| m.scenario == scenario)
                .filter_map(&figure)
                .collect();
            cell(Summary::of(&values), decimals, signed)
        })
    }

    /// One cell per proxied scenario: `figure` minus direct's `figure` of the same run.
    fn added(&self, figure: impl Fn(&Measurement) -> Option<f64>) -> [String; 3] {
        let direct = |run: usize| {
            self.measurements
                .iter()
                .find(|m| m.scenario == Scenario::Direct && m.run == run)
        };
        let mut cells = self.cells(3, true, |m| Some(figure(m)? - figure(direct(m.run)?)?));
        cells[0] = "—".to_owned();
        cells
    }

    /// Total wrk and open-loop errors per scenario.
    fn errors(&self) -> [String; 3] {
        Scenario::ALL.map(|scenario| {
            let runs = self.measurements.iter().filter(|m| m.scenario == scenario);
            let (wrk, open_loop) = runs.fold((0, 0), |(wrk, open_loop), m| {
                (
                    wrk + m.wrk.socket_errors + m.wrk.bad_status,
                    open_loop + m.open_loop.iter().map(|r| r.errors).sum::<u64>(),
                )
            });
            format!("{wrk} / {open_loop}")
        })
    }
}

fn cell(summary: Option<Summary>, decimals: usize, signed: bool) -> String {
    match summary {
        None => "—".to_owned(),
        Some(s) if signed => s.display_signed(decimals).to_string(),
        Some(s) => s.display(decimals).to_string(),
    }
}

/// Puts `section` (which carries its own markers) into the file at `path`: in place of the
/// section between the markers if there is one, else at the end. Everything else in the file
/// stays as it was; a missing file is created.
pub fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = replace_section(&existing, section);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replace_section(existing: &str, section: &str) -> String {
    let section = section.trim_end();
    if let Some(begin) = existing.find(SECTION_BEGIN)
        && let Some(end) = existing[begin..].find(SECTION_END)
    {
        let end = begin + end + SECTION_END.len();
        return format!("{}{section}{}", &existing[..begin], &existing[end..]);
    }
    let existing = existing.trim_end();
    if existing.is_empty() {
        format!("{section}\n")
    } else {
        format!("{existing}\n\n{section}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let first = format!("{SECTION_BEGIN}\nold\n{SECTION_END}\n");
        let second = format!("{SECTION_BEGIN}\nnew\n{SECTION_END}\n");
        assert_eq!(replace_section("", &first), first);
        let file = format!("# Results\n\n## Control plane\n\nx\n\n{first}\n## Later\n\ny\n");
        let updated = replace_section(&file, &second);
        assert_eq!(
            updated,
            format!("# Results\n\n## Control plane\n\nx\n\n{second}\n## Later\n\ny\n")
        );
        let appended = replace_section("# Results\n\ntext\n", &first);
        assert_eq!(appended, format!("# Results\n\ntext\n\n{first}"));
    }
}
