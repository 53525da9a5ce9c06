//! The data-plane benchmark: what keel's sidecars add to a request, against the same request sent
//! directly, all measured in one run.
//!
//! Three cases, each from a client pod to nginx in a server pod (see [`mesh`] for the layout):
//! *direct* (no proxy), *keel one hop* (the client's sidecar to an unmeshed endpoint over
//! HTTP/1.1) and *keel sidecar pair* (client sidecar → HTTP/2 → server sidecar → nginx). For each:
//! the maximum throughput with `wrk`, the latency at fixed open-loop rates (the `openloop`
//! generator), the sidecars' CPU time per request (`/proc/<pid>/stat`) and their memory
//! (`/proc/<pid>/status`). Each run measures the three cases one after the other with fresh
//! sidecars, and the report gives the median and spread of each figure over the runs.
//!
//! It needs root, and creates only its own network (`keel-kbench-*` namespaces, see
//! `keel_control_plane::demo::netns`) and a control plane in this process, which it removes on
//! exit, on error and on Ctrl-C (the binary drops everything before exiting). It never installs
//! anything: missing tools are named with their Debian package.

mod mesh;
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

use crate::openloop;
use crate::procfs::Memory;
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
    /// Open-loop rates (requests per second), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    pub rates: Vec<u32>,
    /// wrk's duration (whole seconds).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub wrk_duration: Duration,
    /// wrk's connections (it always runs one thread: `-t1`).
    #[arg(long, default_value_t = 64)]
    pub wrk_connections: u32,
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
    /// CPUs the sidecars are pinned to (`taskset -c`), or "none".
    #[arg(long, default_value = "1")]
    pub proxy_cpus: String,
    /// The benchmark network's subnet; pods take addresses .2 to .5, the host .1.
    #[arg(long, default_value = "10.91.0.0/24")]
    pub subnet: Ipv4Net,
    /// Also write the report into this markdown file, replacing its data-plane section (or
    /// appending one) and leaving the rest as it is.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The directory holding keel-proxy and openloop; by default this program's own.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

impl Options {
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
            self.wrk_connections > 0 && self.open_loop_connections > 0,
            "connections must be positive"
        );
        ensure!(
            self.proxy_cpus == "none"
                || (!self.proxy_cpus.is_empty()
                    && self
                        .proxy_cpus
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == '-')),
            "--proxy-cpus takes a CPU list such as 1 or 0-1, or \"none\""
        );
        Ok(())
    }

    /// The CPU list for `taskset -c`, if the sidecars are pinned.
    fn pinned_cpus(&self) -> Option<&str> {
        (self.proxy_cpus != "none").then_some(self.proxy_cpus.as_str())
    }

    fn wrk(&self, duration: Duration) -> Wrk {
        Wrk {
            threads: 1,
            connections: self.wrk_connections,
            duration,
            timeout: Duration::from_secs(5),
        }
    }
}

/// One of the three measured paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Direct,
    OneHop,
    Pair,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Direct, Scenario::OneHop, Scenario::Pair];

    pub fn title(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::OneHop => "keel one hop",
            Scenario::Pair => "keel sidecar pair",
        }
    }

    /// The sidecars this case runs.
    fn sidecars(self) -> &'static [Role] {
        match self {
            Scenario::Direct => &[],
            Scenario::OneHop => &[Role::Client],
            Scenario::Pair => &[Role::Client, Role::Server],
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
    pub cpu_wrk: Duration,
    /// CPU time during each open-loop rate's run (warm-up included), in the order of the rates.
    pub cpu_open_loop: Vec<Duration>,
    /// Once `/ready`, before any load.
    pub idle: Memory,
    /// After every load of the case.
    pub loaded: Memory,
}

/// One case of one run.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub scenario: Scenario,
    /// From 1.
    pub run: usize,
    pub wrk: WrkReport,
    /// One per rate, in the order of the rates.
    pub open_loop: Vec<openloop::Report>,
    pub sidecars: Vec<SidecarUsage>,
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
        let cpu: Option<Duration> = self.selected(role).map(|s| s.cpu_wrk).reduce(|a, b| a + b);
        Some(cpu?.as_secs_f64() * 1e6 / self.wrk.requests.max(1) as f64)
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

    /// A line for the progress log.
    fn brief(&self) -> String {
        let mut line = format!("{:>7.0} req/s", self.wrk.requests_per_second);
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
        line
    }
}

/// The programs the benchmark runs.
#[derive(Debug, Clone)]
struct Tools {
    proxy: PathBuf,
    openloop: PathBuf,
    nginx: PathBuf,
}

impl Tools {
    fn find(options: &Options) -> anyhow::Result<Tools> {
        if let Some(why) = netns::missing_requirements(&["ip", "iptables", "setpriv"]) {
            bail!("cannot run the data-plane benchmark: {why}");
        }
        let mut missing = Vec::new();
        let mut tools = vec![("wrk", "wrk")];
        if options.pinned_cpus().is_some() {
            tools.push(("taskset", "util-linux"));
        }
        for (tool, package) in tools {
            if netns::find_on_path(tool).is_none() {
                missing.push(format!("`{tool}` (apt-get install {package})"));
            }
        }
        // nginx is in /usr/sbin, which a user's PATH may lack.
        let nginx = netns::find_on_path("nginx")
            .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()));
        if nginx.is_none() {
            missing.push("`nginx` (apt-get install nginx-light)".to_owned());
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
        match (proxy, openloop, nginx) {
            (Some(proxy), Some(openloop), Some(nginx)) => Ok(Tools {
                proxy,
                openloop,
                nginx,
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

    let testbed = Testbed::start(SUFFIX, layout, &tools).await?;
    let mut measurements = Vec::new();
    for run in 1..=options.runs {
        for scenario in Scenario::ALL {
            eprintln!("run {run}/{}: {} ...", options.runs, scenario.title());
            let measurement = testbed
                .measure(scenario, run, options)
                .await
                .with_context(|| format!("run {run}, {}", scenario.title()))?;
            eprintln!("  {}", measurement.brief());
            measurements.push(measurement);
        }
    }
    let response_bytes = testbed.response_bytes;
    drop(testbed);

    let environment = Environment {
        machine: machine(),
        load_average: (load_at_start, load_average()),
        versions,
        pinning: match options.pinned_cpus() {
            Some(cpus) => format!(
                "each sidecar `keel-proxy run --worker-threads 1` pinned with `taskset -c {cpus}`; \
                 nginx (one worker), wrk and the load generator not pinned"
            ),
            None => "each sidecar `keel-proxy run --worker-threads 1`, nothing pinned".to_owned(),
        },
        load: format!(
            "`{wrk}` after a {warmup} warm-up; open loop (`openloop`, {conns} keep-alive \
             connections, latency from each request's intended send time) at {rates} req/s for \
             {duration} each after a {warmup} warm-up; nginx answers a fixed {body}-byte body \
             (bench/dataplane/nginx.conf)",
            wrk = wrk_label(options),
            warmup = humantime::format_duration(options.warmup),
            conns = options.open_loop_connections,
            rates = options
                .rates
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
            duration = humantime::format_duration(options.open_loop_duration),
            body = response_bytes,
        ),
        command,
    };
    Ok(report::render(
        &environment,
        options.runs,
        &options.rates,
        &wrk_label(options),
        &measurements,
    ))
}

fn wrk_label(options: &Options) -> String {
    let wrk = options.wrk(options.wrk_duration);
    format!(
        "wrk -t{} -c{} -d{}s",
        wrk.threads,
        wrk.connections,
        wrk.duration.as_secs()
    )
}

/// Cores, CPU model and kernel.
fn machine() -> String {
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{cores} cores ({model}), Linux {kernel}")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// keel's revision (of the source tree this benchmark was built from), nginx's and wrk's.
fn versions(tools: &Tools) -> String {
    let output = |command: &mut Command| {
        command
            .output()
            .ok()
            .map(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                text
            })
            .unwrap_or_default()
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let revision = output(Command::new("git").arg("-C").arg(&source).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]));
    let revision = match revision.trim() {
        "" => "unknown".to_owned(),
        rev => {
            let dirty = !output(Command::new("git").arg("-C").arg(&source).args([
                "status",
                "--porcelain",
                "--untracked-files=no",
            ]))
            .trim()
            .is_empty();
            if dirty {
                format!("{rev} with uncommitted changes")
            } else {
                rev.to_owned()
            }
        }
    };
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
    format!("keel {revision}, {nginx}, {wrk}")
}
