//! The benchmark's world: the network and its four pods, the control plane, nginx in the server
//! pods, and the sidecars of one case; and how one case is measured in it.
//!
//! The network, the control plane, nginx and the redirect rules are set up once. Sidecars are
//! started for each case of each run and killed after it, so that every case measures a fresh
//! process (its idle memory, its peak) and no case inherits another's connections.
//!
//! It must never send traffic anywhere but to its own pods, and never leave a process or a
//! namespace behind: everything here is owned by a value whose `Drop` removes it.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_control_plane::demo::metrics;
use keel_control_plane::demo::netns::{Network, Pod, Process};
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::mesh::{ADMIN_PORT, APP_PORT, DISCOVERY_PORT, Layout, MESHED_VIP, NAMESPACE, PLAIN_VIP};
use super::{Measurement, Options, Role, Scenario, SidecarUsage, Tools};
use crate::openloop;
use crate::procfs::{self, Memory};
use crate::wrk::{self, Wrk, WrkReport};

/// nginx's configuration, from `bench/dataplane/nginx.conf`.
const NGINX_CONF: &str = include_str!("../../dataplane/nginx.conf");
/// How long a process may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Everything set up once. Fields drop in order: nginx, the control plane, the pods, then the
/// network (which removes whatever is left); those only kept to be dropped start with `_`.
pub struct Testbed {
    _upstreams: Vec<Process>,
    _control_plane: ControlPlane,
    client: Pod,
    client_mesh: Pod,
    server_mesh: Pod,
    _server: Pod,
    _network: Network,
    layout: Layout,
    /// keel-proxy, staged where uid 1337 can run it.
    proxy: PathBuf,
    openloop: PathBuf,
    /// The size of nginx's response body.
    pub response_bytes: usize,
}

impl Testbed {
    /// Creates the network named by `suffix` and everything in it: the control plane (in this
    /// process) on the gateway, the pods, nginx, and the redirect rules of the meshed pods.
    pub async fn start(suffix: &str, layout: Layout, tools: &Tools) -> anyhow::Result<Testbed> {
        let network = Network::builder(suffix, layout.subnet)
            .gateway(layout.gateway)
            .create()
            .context("creating the benchmark's network")?;
        let proxy = network.stage_executable(&tools.proxy)?;
        let mesh_dir = network.workdir().join("mesh");
        fs::create_dir_all(&mesh_dir)?;
        fs::write(mesh_dir.join("mesh.yaml"), layout.mesh_yaml())?;
        // In this process, so that it cannot outlive the benchmark, even a killed one.
        let discovery_addr = SocketAddr::from((layout.gateway, DISCOVERY_PORT));
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            config_dir: mesh_dir,
            discovery_addr,
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            identity: None,
        })
        .await
        .with_context(|| format!("starting the control plane on {discovery_addr}"))?;

        let client = network.add_pod("client", layout.client)?;
        let client_mesh = network.add_pod("client-mesh", layout.client_mesh)?;
        let server = network.add_pod("server", layout.server)?;
        let server_mesh = network.add_pod("server-mesh", layout.server_mesh)?;
        let mut upstreams = Vec::new();
        let mut response_bytes = 0;
        for pod in [&server, &server_mesh] {
            let mut nginx = start_nginx(&network, pod, &tools.nginx)?;
            // Probed from the host before the pod's redirect rules exist.
            response_bytes =
                wait_for_nginx(&mut nginx, SocketAddr::from((pod.ip(), APP_PORT))).await?;
            upstreams.push(nginx);
        }
        for pod in [&client_mesh, &server_mesh] {
            let init = pod.exec([proxy.as_os_str(), OsStr::new("init")])?;
            ensure!(
                init.status.success(),
                "keel-proxy init in {} failed ({}): {}",
                pod.name(),
                init.status,
                String::from_utf8_lossy(&init.stderr).trim()
            );
        }
        Ok(Testbed {
            _upstreams: upstreams,
            _control_plane: control_plane,
            client,
            client_mesh,
            server_mesh,
            _server: server,
            _network: network,
            layout,
            proxy,
            openloop: tools.openloop.clone(),
            response_bytes,
        })
    }

    /// Measures one case: fresh sidecars, idle memory, a warm-up, wrk, each open-loop rate, memory
    /// after the load, and a check that the sidecars carried all of it.
    pub async fn measure(
        &self,
        scenario: Scenario,
        run: usize,
        options: &Options,
    ) -> anyhow::Result<Measurement> {
        let mut sidecars = Vec::new();
        for role in scenario.sidecars() {
            sidecars.push(self.start_sidecar(*role, options.pinned_cpus())?);
        }
        for sidecar in &mut sidecars {
            sidecar.wait_ready().await?;
        }
        let idle = memories(&sidecars)?;
        let (pod, url) = match scenario {
            Scenario::Direct => (
                &self.client,
                format!("http://{}:{APP_PORT}/", self.layout.server),
            ),
            Scenario::OneHop => (&self.client_mesh, format!("http://{PLAIN_VIP}/")),
            Scenario::Pair => (&self.client_mesh, format!("http://{MESHED_VIP}/")),
        };

        let warmup = self
            .wrk(pod, &url, &options.wrk(options.warmup))
            .await
            .context("warming up")?;
        let before = cpu_times(&sidecars)?;
        let wrk = self
            .wrk(pod, &url, &options.wrk(options.wrk_duration))
            .await?;
        let cpu_wrk = elapsed_since(&before, &cpu_times(&sidecars)?);

        let mut open_loop = Vec::new();
        let mut cpu_open_loop = vec![Vec::new(); sidecars.len()];
        for rate in &options.rates {
            let before = cpu_times(&sidecars)?;
            let report = self.open_loop(pod, &url, *rate, options).await?;
            for (cpu, spent) in cpu_open_loop
                .iter_mut()
                .zip(elapsed_since(&before, &cpu_times(&sidecars)?))
            {
                cpu.push(spent);
            }
            open_loop.push(report);
        }
        let loaded = memories(&sidecars)?;

        let answered = warmup.requests
            + wrk.requests
            + open_loop
                .iter()
                .map(|r| r.completed_with_warmup)
                .sum::<u64>();
        for sidecar in &sidecars {
            sidecar.check_carried(answered).await?;
        }
        let usage = sidecars
            .iter()
            .zip(cpu_wrk)
            .zip(cpu_open_loop)
            .zip(idle.into_iter().zip(loaded))
            .map(
                |(((sidecar, cpu_wrk), cpu_open_loop), (idle, loaded))| SidecarUsage {
                    role: sidecar.role,
                    cpu_wrk,
                    cpu_open_loop,
                    idle,
                    loaded,
                },
            )
            .collect();
        Ok(Measurement {
            scenario,
            run,
            wrk,
            open_loop,
            sidecars: usage,
        })
    }

    /// Starts the sidecar of `role` (`keel-proxy run` as uid 1337, one worker thread, pinned to
    /// `cpus` if given). Does not wait for it.
    fn start_sidecar(&self, role: Role, cpus: Option<&str>) -> anyhow::Result<Sidecar> {
        let (pod, workload) = match role {
            Role::Client => (&self.client_mesh, "client-mesh"),
            Role::Server => (&self.server_mesh, "server-mesh"),
        };
        let mut command = match cpus {
            Some(cpus) => {
                let mut command = pod.proxy_command("taskset");
                command.args(["-c", cpus]).arg(&self.proxy);
                command
            }
            None => pod.proxy_command(&self.proxy),
        };
        // The sidecar reads its flags' KEEL_* variables: only the flags below may configure it.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("KEEL_") {
                command.env_remove(variable);
            }
        }
        command
            .arg("run")
            .arg("--control-plane")
            .arg(format!("http://{}:{DISCOVERY_PORT}", self.layout.gateway))
            .args(["--workload", workload, "--namespace", NAMESPACE])
            .arg("--pod-ip")
            .arg(pod.ip().to_string())
            .args(["--worker-threads", "1"])
            .env("KEEL_LOG", "warn");
        Ok(Sidecar {
            role,
            admin: SocketAddr::from((pod.ip(), ADMIN_PORT)),
            process: pod.spawn_command("proxy", command)?,
        })
    }

    /// Runs wrk in `pod` against `url`.
    async fn wrk(&self, pod: &Pod, url: &str, wrk: &Wrk) -> anyhow::Result<WrkReport> {
        let mut command = tokio::process::Command::from(pod.command("wrk"));
        command.args(wrk.args(url)).kill_on_drop(true);
        let output = command.output().await.context("running wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "wrk {} failed ({}): {}{}",
            wrk.args(url).join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(wrk::parse(&stdout)?)
    }

    /// Runs the open-loop generator in `pod` against `url` at `rate`.
    async fn open_loop(
        &self,
        pod: &Pod,
        url: &str,
        rate: u32,
        options: &Options,
    ) -> anyhow::Result<openloop::Report> {
        let mut command = tokio::process::Command::from(pod.command(&self.openloop));
        command
            .args(["--url", url])
            .args(["--rate", &rate.to_string()])
            .arg("--duration")
            .arg(humantime::format_duration(options.open_loop_duration).to_string())
            .arg("--warmup")
            .arg(humantime::format_duration(options.warmup).to_string())
            .args(["--connections", &options.open_loop_connections.to_string()])
            .kill_on_drop(true);
        let output = command.output().await.context("running openloop")?;
        ensure!(
            output.status.success(),
            "openloop at {rate} req/s against {url} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout).context("reading openloop's report")
    }
}

/// A running sidecar of one case; killed when dropped.
struct Sidecar {
    role: Role,
    admin: SocketAddr,
    process: Process,
}

impl Sidecar {
    /// Waits for `/ready`, then checks that the process being measured is the proxy itself (the
    /// `ip netns exec`, `setpriv` and `taskset` in front of it each exec into the next).
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.process.exited() {
                bail!(
                    "the {} exited ({status}):\n{}",
                    self.role.title(),
                    self.process.log_tail(30)
                );
            }
            if let Some((200, _)) = probe(self.admin, "/ready").await {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} is not ready after {READY_WITHIN:?}:\n{}",
                    self.role.title(),
                    self.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let name = procfs::command_name(self.pid())?;
        ensure!(
            name == "keel-proxy",
            "process {} of the {} is {name:?}, not keel-proxy: its CPU time would not be the \
             proxy's",
            self.pid(),
            self.role.title()
        );
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Fails unless the sidecar answered at least `answered` requests with 200 (what the clients
    /// saw completed): otherwise traffic went around it and its figures mean nothing.
    async fn check_carried(&self, answered: u64) -> anyhow::Result<()> {
        let direction = match self.role {
            Role::Client => "outbound",
            Role::Server => "inbound",
        };
        let counted = metrics::scrape(self.admin).await?.sum(
            "keel_requests_total",
            &[("direction", direction), ("status", "200")],
        );
        ensure!(
            counted >= answered as f64,
            "the {} counted {counted} {direction} requests answered 200, fewer than the \
             {answered} the clients completed: traffic went around it",
            self.role.title()
        );
        Ok(())
    }
}

fn cpu_times(sidecars: &[Sidecar]) -> anyhow::Result<Vec<Duration>> {
    sidecars
        .iter()
        .map(|s| {
            procfs::cpu_time(s.pid())
                .with_context(|| format!("reading the {}'s CPU time", s.role.title()))
        })
        .collect()
}

fn elapsed_since(before: &[Duration], after: &[Duration]) -> Vec<Duration> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b))
        .collect()
}

fn memories(sidecars: &[Sidecar]) -> anyhow::Result<Vec<Memory>> {
    sidecars
        .iter()
        .map(|s| {
            procfs::memory(s.pid())
                .with_context(|| format!("reading the {}'s memory", s.role.title()))
        })
        .collect()
}

/// Starts nginx in `pod` with [`NGINX_CONF`], its files in a directory of the network's.
fn start_nginx(network: &Network, pod: &Pod, nginx: &Path) -> anyhow::Result<Process> {
    let prefix = network.workdir().join(format!("nginx-{}", pod.name()));
    fs::create_dir_all(prefix.join("tmp"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    let conf = prefix.join("nginx.conf");
    fs::write(&conf, NGINX_CONF).with_context(|| format!("writing {}", conf.display()))?;
    Ok(pod.spawn(
        "nginx",
        [
            nginx.as_os_str(),
            OsStr::new("-p"),
            prefix.as_os_str(),
            OsStr::new("-c"),
            conf.as_os_str(),
            OsStr::new("-e"),
            OsStr::new("stderr"),
        ],
    )?)
}

/// Waits until nginx answers `GET /` at `addr` with 200; returns the size of its body.
async fn wait_for_nginx(nginx: &mut Process, addr: SocketAddr) -> anyhow::Result<usize> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = nginx.exited() {
            bail!("nginx exited ({status}):\n{}", nginx.log_tail(30));
        }
        if let Some((200, body)) = probe(addr, "/").await {
            return Ok(body.len());
        }
        if Instant::now() > deadline {
            bail!(
                "nginx does not answer at {addr} after {READY_WITHIN:?}:\n{}",
                nginx.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` at `addr` over HTTP/1.0, which the server closes after answering: the status and
/// the body, or `None` if no complete answer came within two seconds.
async fn probe(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
        let status = std::str::from_utf8(&answer[..head_end])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some((status, answer[head_end + 4..].to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}
