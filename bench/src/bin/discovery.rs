//! Control-plane benchmark: how fast and how cheaply a change reaches many proxies.
//!
//! Builds a mesh of `--services` services with `--endpoints` workloads each, starts the real
//! `keel-control-plane` binary on it (so its memory is measured alone), connects `--proxies`
//! simulated proxies that subscribe to everything and ACK every response, then moves one
//! endpoint `--runs` times and measures, each time:
//! - the time from the file write to the last proxy receiving the change;
//! - the bytes each proxy received for it (protobuf message plus the 5-byte gRPC frame header).
//!
//! Prints a markdown report (medians with min and max) and writes it to `--out` if given.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use keel_proto::v1::type_url;
use keel_tests::{DiscoveryClient, node};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(about = "Measure keel's control plane with many simulated proxies")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// The control plane binary; by default the one built next to this benchmark.
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// Also write the report here (markdown).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the control plane's log (at info level) to this file.
    #[arg(long)]
    control_plane_log: Option<PathBuf>,
    /// The control plane's log filter with `--control-plane-log`, e.g.
    /// `info,keel_control_plane::discovery=debug` for each response's time since the publish.
    #[arg(long, default_value = "info", requires = "control_plane_log")]
    control_plane_log_filter: String,
}

fn workload_file(service: usize, endpoints: usize, moved: Option<u8>) -> String {
    let mut out = String::new();
    for e in 0..endpoints {
        // Every endpoint has its own address; `moved` changes the last octet of endpoint 0.
        let last = if e == 0 {
            moved.unwrap_or(1)
        } else {
            e as u8 + 1
        };
        let _ = write!(
            out,
            "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata:
  name: svc-{service}-{e}
  namespace: bench
  labels:
    app: svc-{service}
spec:
  serviceAccount: svc-{service}
  addresses: [10.{}.{}.{last}]
  locality:
    region: local
    zone: zone-{}
---
",
            service / 256 % 256,
            service % 256,
            e % 3
        );
    }
    out
}

fn write_mesh(dir: &Path, services: usize, endpoints: usize) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("mesh.yaml"),
        "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: bench.local\n",
    )?;
    let mut svc = String::new();
    for s in 0..services {
        let _ = write!(
            svc,
            "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: svc-{s}
  namespace: bench
spec:
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: HTTP
  selector:
    app: svc-{s}
---
"
        );
    }
    std::fs::write(dir.join("services.yaml"), svc)?;
    let workloads = dir.join("workloads");
    std::fs::create_dir_all(&workloads)?;
    for s in 0..services {
        std::fs::write(
            workloads.join(format!("svc-{s}.yaml")),
            workload_file(s, endpoints, None),
        )?;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Reads `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

async fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await?;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the control plane was not ready within 120s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct ControlPlaneProcess(Child);

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One proxy's receipt of a response.
struct Receipt {
    at: Instant,
    type_url: String,
    bytes: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.proxies == 0 || args.services == 0 || args.endpoints == 0 {
        bail!("--runs, --proxies, --services and --endpoints must be positive");
    }
    rlimit::increase_nofile_limit(u64::MAX).context("raising the open file limit")?;
    let binary = match args.control_plane.clone() {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("benchmark binary has no directory")?
            .join("keel-control-plane"),
    };
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p keel-control-plane`",
            binary.display()
        );
    }

    let dir = tempfile::tempdir()?;
    write_mesh(dir.path(), args.services, args.endpoints)?;
    let discovery = free_port()?;
    let admin = free_port()?;
    // The control plane runs its CA as in production, in a directory of its own (never the
    // user's) and on a port of its own (never the default 15012 another mesh may hold).
    let ca_dir = tempfile::tempdir()?;
    let secure = free_port()?;
    let started = Instant::now();
    let child = Command::new(&binary)
        .arg("--config-dir")
        .arg(dir.path())
        .arg("--discovery-addr")
        .arg(discovery.to_string())
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--secure-addr")
        .arg(secure.to_string())
        .arg("--ca-dir")
        .arg(ca_dir.path())
        .arg("--log")
        .arg(if args.control_plane_log.is_some() {
            args.control_plane_log_filter.as_str()
        } else {
            "warn"
        })
        .stdout(match &args.control_plane_log {
            Some(path) => Stdio::from(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
            None => Stdio::null(),
        })
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let cp = ControlPlaneProcess(child);
    wait_ready(admin).await?;
    let load_time = started.elapsed();
    let (idle_rss, _) = memory_kib(cp.0.id())?;

    // Connect and sync every proxy, a batch at a time.
    let (tx, mut rx) = mpsc::unbounded_channel::<Receipt>();
    let sync_started = Instant::now();
    let mut initial_bytes = 0usize;
    let mut connected = 0;
    while connected < args.proxies {
        let batch = (args.proxies - connected).min(100);
        let mut joins = Vec::new();
        for i in connected..connected + batch {
            joins.push(tokio::spawn(async move {
                let mut client =
                    DiscoveryClient::connect(discovery, node(&format!("proxy-{i}"), "bench"))
                        .await?;
                client.subscribe_all().await?;
                let mut bytes = 0;
                let mut missing: Vec<&str> = type_url::ALL.to_vec();
                while !missing.is_empty() {
                    let r = client.recv(Duration::from_secs(120)).await?;
                    bytes += r.encoded_len() + 5;
                    client.ack(&r).await?;
                    if !r.incomplete {
                        missing.retain(|t| *t != r.type_url);
                    }
                }
                anyhow::Ok((client, bytes))
            }));
        }
        for join in joins {
            let (mut client, bytes) = join.await??;
            initial_bytes += bytes;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(r) = client.next().await {
                    let receipt = Receipt {
                        at: Instant::now(),
                        type_url: r.type_url.clone(),
                        bytes: r.encoded_len() + 5,
                    };
                    if client.ack(&r).await.is_err() || tx.send(receipt).is_err() {
                        break;
                    }
                }
            });
        }
        connected += batch;
    }
    let sync_time = sync_started.elapsed();
    let (synced_rss, _) = memory_kib(cp.0.id())?;

    // Others share the machine: the load it was under goes with the figures.
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned())
    };
    let load_before = loadavg();
    let cpu = || -> anyhow::Result<(Duration, Duration)> {
        Ok((
            keel_bench::procfs::cpu_time(cp.0.id())?,
            keel_bench::procfs::cpu_time(std::process::id())?,
        ))
    };
    let (cp_cpu_before, own_cpu_before) = cpu()?;
    let mut latencies = Vec::new();
    let mut first_latencies = Vec::new();
    let mut per_proxy_bytes = Vec::new();
    for run in 0..args.runs {
        let service = (run * 7919) % args.services;
        let path = dir.path().join(format!("workloads/svc-{service}.yaml"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = Instant::now();
        std::fs::write(
            &path,
            workload_file(service, args.endpoints, Some(100 + run as u8)),
        )?;
        let mut last = written;
        let mut first: Option<Instant> = None;
        let mut bytes = Vec::new();
        while bytes.len() < args.proxies {
            let receipt = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .context("proxies did not all receive the change within 60s")?
                .context("every proxy task ended")?;
            if receipt.type_url != type_url::ENDPOINTS {
                bail!(
                    "unexpected {} update for an endpoint move",
                    receipt.type_url
                );
            }
            last = last.max(receipt.at);
            first = Some(first.map_or(receipt.at, |f| f.min(receipt.at)));
            bytes.push(receipt.bytes as f64);
        }
        latencies.push(last.duration_since(written).as_secs_f64() * 1000.0);
        if let Some(first) = first {
            first_latencies.push(first.duration_since(written).as_secs_f64() * 1000.0);
        }
        per_proxy_bytes.push(median(&mut bytes));
    }
    let load_after = loadavg();
    let (cp_cpu_after, own_cpu_after) = cpu()?;
    // Over the runs the control plane does nothing but the changes (and the ACKs they bring).
    let per_change = |before: Duration, after: Duration| {
        after.saturating_sub(before).as_secs_f64() * 1000.0 / args.runs as f64
    };
    let cp_cpu_per_change = per_change(cp_cpu_before, cp_cpu_after);
    let own_cpu_per_change = per_change(own_cpu_before, own_cpu_after);
    let (_, peak_rss) = memory_kib(cp.0.id())?;
    let (rss_after, _) = memory_kib(cp.0.id())?;

    let (lat_min, lat_max) = spread(&latencies);
    let (bytes_min, bytes_max) = spread(&per_proxy_bytes);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Control plane: {} services x {} endpoints, {} proxies\n",
        args.services, args.endpoints, args.proxies
    );
    let _ = writeln!(
        report,
        "Machine: {} cores, 1-minute load average {load_before} before the runs and {load_after} after; control plane `{}`; {} runs; command: `cargo run --release -p keel-bench --bin discovery -- --proxies {} --services {} --endpoints {} --runs {}`\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        binary.display(),
        args.runs,
        args.proxies,
        args.services,
        args.endpoints,
        args.runs
    );
    let _ = writeln!(report, "| figure | median | min | max |\n|---|---|---|---|");
    let _ = writeln!(
        report,
        "| one-endpoint change: file write -> last of {} proxies received (ms) | {:.1} | {:.1} | {:.1} |",
        args.proxies,
        median(&mut latencies.clone()),
        lat_min,
        lat_max
    );
    let (first_min, first_max) = spread(&first_latencies);
    let _ = writeln!(
        report,
        "| the same change: file write -> first proxy received (ms; the rest is the fan-out) | {:.1} | {:.1} | {:.1} |",
        median(&mut first_latencies.clone()),
        first_min,
        first_max
    );
    let _ = writeln!(
        report,
        "| one-endpoint change: control plane CPU, user + system (ms per change) | {cp_cpu_per_change:.1} | | |"
    );
    let _ = writeln!(
        report,
        "| one-endpoint change: the {} simulated proxies' CPU (ms per change; shares the cores) | {own_cpu_per_change:.1} | | |",
        args.proxies
    );
    let _ = writeln!(
        report,
        "| one-endpoint change: bytes sent per proxy | {:.0} | {:.0} | {:.0} |",
        median(&mut per_proxy_bytes.clone()),
        bytes_min,
        bytes_max
    );
    let _ = writeln!(
        report,
        "| one-endpoint change: bytes sent to all proxies | {:.0} | | |",
        median(&mut per_proxy_bytes.clone()) * args.proxies as f64
    );
    let _ = writeln!(
        report,
        "| initial sync, bytes per proxy | {} | | |",
        initial_bytes / args.proxies
    );
    let _ = writeln!(
        report,
        "| start to ready, loading the mesh (ms) | {} | | |",
        load_time.as_millis()
    );
    let _ = writeln!(
        report,
        "| connect and sync all proxies (ms) | {} | | |",
        sync_time.as_millis()
    );
    let _ = writeln!(
        report,
        "| control plane RSS: loaded, no proxies (MiB) | {:.1} | | |",
        idle_rss as f64 / 1024.0
    );
    let _ = writeln!(
        report,
        "| control plane RSS: {} proxies synced (MiB) | {:.1} | | |",
        args.proxies,
        synced_rss as f64 / 1024.0
    );
    let _ = writeln!(
        report,
        "| control plane RSS: after the runs / peak (MiB) | {:.1} / {:.1} | | |",
        rss_after as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    print!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
