//! The benchmark's world: the network and its pods, the control plane, nginx in the server
//! pods, the sidecars of one case; how one case is measured in it, and the endpoint-churn
//! scenario.
//!
//! The network, the control plane, nginx, the mTLS certificates and the redirect rules are set
//! up once. Sidecars (keel's or Envoy's) are started for each case of each run and killed after
//! it, so that every case measures a fresh process (its idle memory, its peak) and no case
//! inherits another's connections.
//!
//! It must never send traffic anywhere but to its own pods, and never leave a process or a
//! namespace behind: everything here is owned by a value whose `Drop` removes it.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_control_plane::demo::metrics;
use keel_control_plane::demo::netns::{Network, Pod, Process};
use keel_control_plane::server::IdentityConfig;
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::envoy::{self, Certificates};
use super::mesh::{
    ADMIN_PORT, APP_PORT, DISCOVERY_PORT, H2_APP_PORT, H2_SERVICE_PORT, Layout, MESHED_VIP,
    NAMESPACE, PLAIN_VIP, TRUST_DOMAIN,
};
use super::nginx_proxy;
use super::{
    Case, ChurnMeasurement, Measurement, Options, ProxyKind, Repeated, Role, SidecarUsage, Tools,
    Topology,
};
use crate::h2load::{self, H2load, H2loadReport};
use crate::openloop;
use crate::procfs::{self, CpuTime, Memory};
use crate::steal;
use crate::wrk::{self, Wrk, WrkReport};

/// nginx's configuration, from `bench/dataplane/nginx.conf`.
const NGINX_CONF: &str = include_str!("../../dataplane/nginx.conf");
/// How long a process may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The control plane's secure port (discovery and certificates over TLS), on the gateway.
const SECURE_PORT: u16 = 15012;
/// Where `keel-proxy init`'s rules send the pod's outbound TCP (its default).
const OUTBOUND_PORT: u16 = 15001;

/// The CA's roots and the workloads' bootstrap tokens, staged for keel's sidecars.
struct KeelIdentity {
    root_file: PathBuf,
    tokens: Arc<keel_control_plane::identity::BootstrapTokens>,
}

impl KeelIdentity {
    fn stage(network: &Network, control_plane: &ControlPlane) -> anyhow::Result<KeelIdentity> {
        let ca = control_plane
            .ca
            .as_ref()
            .context("the control plane's CA")?;
        let root_file = network.stage_file(
            "roots.pem",
            keel_control_plane::identity::ca::bundle_pem(&ca.bundle()).as_bytes(),
            false,
        )?;
        Ok(KeelIdentity {
            root_file,
            tokens: control_plane
                .tokens
                .clone()
                .context("the control plane's bootstrap tokens")?,
        })
    }

    /// Stages `workload`'s bootstrap token where only the proxy's user reads it.
    fn token_file(&self, network: &Network, workload: &str) -> anyhow::Result<PathBuf> {
        let token = self.tokens.mint(NAMESPACE, workload);
        Ok(network.stage_file(&format!("{workload}.token"), token.as_bytes(), true)?)
    }
}

/// Everything set up once. Fields drop in order: nginx, the control plane, the pods, then the
/// network (which removes whatever is left); those only kept to be dropped start with `_`.
pub struct Testbed {
    /// nginx in `server`, `server-mesh` and `server-b`, in that order.
    upstreams: Vec<Process>,
    control_plane: ControlPlane,
    /// What keel's sidecars need for certificates (the mTLS pair).
    identity: KeelIdentity,
    /// Whether `server-mesh` now takes mTLS (see [`Layout::mesh_yaml`]).
    server_mtls: std::sync::atomic::AtomicBool,
    client: Pod,
    client_mesh: Pod,
    server_mesh: Pod,
    _server: Pod,
    _server_b: Pod,
    network: Network,
    layout: Layout,
    /// The directory the control plane watches.
    mesh_dir: PathBuf,
    /// keel-proxy, staged where uid 1337 can run it.
    proxy: PathBuf,
    /// Envoy, staged likewise, if an Envoy case runs.
    envoy: Option<PathBuf>,
    /// nginx, for the upstreams and the reference proxy.
    nginx: PathBuf,
    /// The mTLS cases' certificates.
    certificates: Certificates,
    openloop: PathBuf,
    /// The CPUs nginx and the load generators are pinned to, if they are.
    load_cpus: Option<String>,
    /// The size of nginx's response body.
    pub response_bytes: usize,
}

/// The nginx answering a case's traffic.
#[derive(Debug, Clone, Copy)]
enum Upstream {
    Server = 0,
    ServerMesh = 1,
}

impl Testbed {
    /// Creates the network named by `suffix` and everything in it: the control plane (in this
    /// process) on the gateway, the pods, nginx, the certificates, and the redirect rules of the
    /// meshed pods. nginx, and later the load generators, are pinned to `load_cpus` if given.
    pub async fn start(
        suffix: &str,
        layout: Layout,
        tools: &Tools,
        load_cpus: Option<&str>,
    ) -> anyhow::Result<Testbed> {
        let network = Network::builder(suffix, layout.subnet)
            .gateway(layout.gateway)
            .create()
            .context("creating the benchmark's network")?;
        let proxy = network.stage_executable(&tools.proxy)?;
        let envoy = match &tools.envoy {
            Some(envoy) => Some(network.stage_executable(envoy)?),
            None => None,
        };
        let certificates = Certificates::generate(
            &network.workdir().join("certs"),
            &["client-mesh", "server-mesh"],
        )
        .context("generating the mTLS certificates")?;
        let mesh_dir = network.workdir().join("mesh");
        fs::create_dir_all(&mesh_dir)?;
        fs::write(
            mesh_dir.join("mesh.yaml"),
            layout.mesh_yaml(&[layout.server], false),
        )?;
        // In this process, so that it cannot outlive the benchmark, even a killed one. With a CA
        // (in memory), for the keel mTLS pair.
        let discovery_addr = SocketAddr::from((layout.gateway, DISCOVERY_PORT));
        let secure_addr = SocketAddr::from((layout.gateway, SECURE_PORT));
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            config_dir: mesh_dir.clone(),
            discovery_addr,
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            identity: Some(IdentityConfig::ephemeral(secure_addr)),
        })
        .await
        .with_context(|| format!("starting the control plane on {discovery_addr}"))?;
        let identity = KeelIdentity::stage(&network, &control_plane)?;

        let client = network.add_pod("client", layout.client)?;
        let client_mesh = network.add_pod("client-mesh", layout.client_mesh)?;
        let server = network.add_pod("server", layout.server)?;
        let server_mesh = network.add_pod("server-mesh", layout.server_mesh)?;
        let server_b = network.add_pod("server-b", layout.server_b)?;
        let mut upstreams = Vec::new();
        let mut response_bytes = 0;
        for pod in [&server, &server_mesh, &server_b] {
            let mut nginx = start_nginx(&network, pod, &tools.nginx, load_cpus)?;
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
            upstreams,
            control_plane,
            identity,
            server_mtls: std::sync::atomic::AtomicBool::new(false),
            client,
            client_mesh,
            server_mesh,
            _server: server,
            _server_b: server_b,
            network,
            layout,
            mesh_dir,
            proxy,
            envoy,
            nginx: tools.nginx.clone(),
            certificates,
            openloop: tools.openloop.clone(),
            load_cpus: load_cpus.map(str::to_owned),
            response_bytes,
        })
    }

    /// The client pod, its HTTP/1.1 and HTTP/2 URLs, and the nginx that answers, for `case`.
    fn route(&self, case: Case) -> (&Pod, String, String, Upstream) {
        match case.path() {
            Topology::Direct => (
                &self.client,
                format!("http://{}:{APP_PORT}/", self.layout.server),
                format!("http://{}:{H2_APP_PORT}/", self.layout.server),
                Upstream::Server,
            ),
            // The endpoint has no sidecar: the proxy speaks HTTP/1.1 to it whatever the client
            // speaks.
            Topology::OneHop => (
                &self.client_mesh,
                format!("http://{PLAIN_VIP}/"),
                format!("http://{PLAIN_VIP}/"),
                Upstream::Server,
            ),
            Topology::Pair => (
                &self.client_mesh,
                format!("http://{MESHED_VIP}/"),
                format!("http://{MESHED_VIP}:{H2_SERVICE_PORT}/"),
                Upstream::ServerMesh,
            ),
        }
    }

    /// Measures one case: fresh sidecars, idle memory, a warm-up, wrk, h2load, each open-loop
    /// rate, memory after the load, and a check that the sidecars carried all of it.
    pub async fn measure(
        &self,
        case: Case,
        run: usize,
        options: &Options,
    ) -> anyhow::Result<Measurement> {
        if case.proxy() == Some(ProxyKind::Keel) {
            self.serve_mtls(case.mtls()).await?;
        }
        let mut sidecars = Vec::new();
        if let Some(kind) = case.proxy() {
            for role in case.sidecars() {
                sidecars.push(self.start_sidecar(kind, case, *role, options)?);
            }
        }
        for sidecar in &mut sidecars {
            sidecar.wait_ready(options.proxy_wrapper.is_none()).await?;
        }
        let idle = memories(&sidecars)?;
        let (pod, url, h2_url, upstream) = self.route(case);
        let upstream_pid = self.upstreams[upstream as usize].pid();

        let warmup = self
            .wrk(pod, &url, &options.wrk(options.warmup))
            .await
            .context("warming up")?;
        let limit = options.steal_limit();
        let mut repeated = Repeated::default();
        let mut answered = warmup.requests;

        let wrk = steal::least_disturbed(limit, procfs::host_steal, async || {
            let upstream_before = procfs::cpu_time(upstream_pid)?;
            let wrk = options.wrk(options.wrk_duration);
            let (report, spent) = with_cpu(&sidecars, self.wrk(pod, &url, &wrk)).await?;
            let upstream = procfs::cpu_time(upstream_pid)?.saturating_sub(upstream_before);
            Ok((report, spent, upstream))
        })
        .await?;
        for (report, _, _) in &wrk.set_aside {
            repeated.runs += 1;
            repeated.wrk_errors += report.socket_errors + report.bad_status;
            answered += report.answered_2xx();
        }
        let (wrk, cpu_wrk, upstream_cpu_wrk) = wrk.kept;
        answered += wrk.answered_2xx();
        let total = |spent: Vec<CpuTime>| spent.into_iter().map(CpuTime::total);

        let (h2load, cpu_h2load) = match options.h2load().filter(|_| case.takes_http2()) {
            Some(h2) => {
                let attempts = steal::least_disturbed(limit, procfs::host_steal, async || {
                    with_cpu(&sidecars, self.h2load(pod, &h2_url, &h2)).await
                })
                .await?;
                for (report, _) in &attempts.set_aside {
                    repeated.runs += 1;
                    repeated.h2load_errors += report.failed;
                    answered += report.answered_2xx;
                }
                let (report, spent) = attempts.kept;
                answered += report.answered_2xx;
                (Some(report), total(spent).map(Some).collect())
            }
            None => (None, vec![None; sidecars.len()]),
        };

        let mut open_loop = Vec::new();
        let mut cpu_open_loop = vec![Vec::new(); sidecars.len()];
        let mut stolen_open_loop = Vec::new();
        for rate in &options.rates {
            let attempts = steal::least_disturbed(limit, procfs::host_steal, async || {
                let load = self.open_loop(pod, &url, *rate, options.open_loop_duration, options);
                with_cpu(&sidecars, load).await
            })
            .await?;
            for (report, _) in &attempts.set_aside {
                repeated.runs += 1;
                repeated.open_loop_errors += report.errors;
                answered += report.completed_with_warmup;
            }
            let (report, spent) = attempts.kept;
            answered += report.completed_with_warmup;
            stolen_open_loop.push(attempts.stolen);
            for (cpu, spent) in cpu_open_loop.iter_mut().zip(total(spent)) {
                cpu.push(spent);
            }
            open_loop.push(report);
        }
        let loaded = memories(&sidecars)?;

        // Last, so that it changes none of the figures above (the peak RSS among them).
        let (many_wrk, many) = match options.many_wrk() {
            Some(many) => {
                let attempts = steal::least_disturbed(limit, procfs::host_steal, async || {
                    let halfway = async {
                        tokio::time::sleep(many.duration / 2).await;
                        memories(&sidecars)
                    };
                    let load = async {
                        let (report, open) = tokio::join!(self.wrk(pod, &url, &many), halfway);
                        Ok((report?, open?))
                    };
                    with_cpu(&sidecars, load).await
                })
                .await?;
                for ((report, _), _) in &attempts.set_aside {
                    repeated.runs += 1;
                    repeated.wrk_errors += report.socket_errors + report.bad_status;
                    answered += report.answered_2xx();
                }
                let ((report, open), spent) = attempts.kept;
                answered += report.answered_2xx();
                let usage = spent.into_iter().zip(open).map(Some).collect();
                (Some(report), usage)
            }
            None => (None, vec![None; sidecars.len()]),
        };

        for sidecar in &sidecars {
            sidecar.check_carried(answered, case.mtls()).await?;
        }
        if options.proxy_wrapper.is_some() {
            // A profiler writes its report when its process exits: let it.
            eprintln!("  {answered} requests answered; stopping the sidecars with SIGTERM");
            for sidecar in &mut sidecars {
                sidecar.stop().await;
            }
        }
        let usage = sidecars
            .iter()
            .zip(cpu_wrk)
            .zip(cpu_h2load)
            .zip(cpu_open_loop)
            .zip(idle.into_iter().zip(loaded))
            .zip(many)
            .map(
                |(((((sidecar, cpu_wrk), cpu_h2load), cpu_open_loop), (idle, loaded)), many)| {
                    SidecarUsage {
                        role: sidecar.role,
                        cpu_wrk,
                        cpu_h2load,
                        cpu_open_loop,
                        idle,
                        loaded,
                        many,
                    }
                },
            )
            .collect();
        Ok(Measurement {
            case,
            run,
            wrk,
            h2load,
            many_wrk,
            open_loop,
            sidecars: usage,
            upstream_cpu_wrk,
            stolen_open_loop,
            repeated,
        })
    }

    /// Makes `server-mesh` take mTLS (or plaintext only) and waits until the control plane
    /// serves it, before a keel case starts its sidecars.
    async fn serve_mtls(&self, mtls: bool) -> anyhow::Result<()> {
        if self.server_mtls.swap(mtls, Ordering::Relaxed) == mtls {
            return Ok(());
        }
        replace_mesh(
            &self.mesh_dir,
            self.network.workdir(),
            &self.layout.mesh_yaml(&[self.layout.server], mtls),
        )?;
        let key = keel_control_plane::model::ObjectKey::new(NAMESPACE, "server-mesh");
        let wanted = if mtls {
            keel_control_plane::model::MtlsMode::Permissive
        } else {
            keel_control_plane::model::MtlsMode::Disable
        };
        let deadline = Instant::now() + READY_WITHIN;
        while self.control_plane.store.current().model.mtls_mode_for(&key) != wanted {
            ensure!(
                Instant::now() < deadline,
                "the control plane did not load server-mesh's mTLS mode {wanted:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The endpoint-churn scenario: keel one hop at `--churn-rate`, first steady, then while the
    /// service's endpoint set is rewritten every `--churn-interval` (cycling through `server`,
    /// `server` + `server-b`, `server-b`), then wrk during the churn too.
    pub async fn measure_churn(&self, options: &Options) -> anyhow::Result<ChurnMeasurement> {
        let mut sidecar =
            self.start_sidecar(ProxyKind::Keel, Case::KeelOneHop, Role::Client, options)?;
        sidecar.wait_ready(options.proxy_wrapper.is_none()).await?;
        let (pod, url, _, _) = self.route(Case::KeelOneHop);
        let duration = options.churn_duration;
        let steady = self
            .open_loop(pod, &url, options.churn_rate, duration, options)
            .await?;
        let acks_before = sidecar.acks().await?;
        let written = Arc::new(AtomicU64::new(0));
        let churner = tokio::spawn(churn(
            self.mesh_dir.clone(),
            self.network.workdir().to_path_buf(),
            self.layout,
            options.churn_interval,
            written.clone(),
        ));
        let measured = async {
            let churning = self
                .open_loop(pod, &url, options.churn_rate, duration, options)
                .await?;
            let wrk = self.wrk(pod, &url, &options.wrk(duration)).await?;
            anyhow::Ok((churning, wrk))
        }
        .await;
        churner.abort();
        let _ = churner.await;
        let changes_written = written.load(Ordering::Relaxed);
        // Back to the steady set, for the cases of the next run.
        replace_mesh(
            &self.mesh_dir,
            self.network.workdir(),
            &self.layout.mesh_yaml(
                &[self.layout.server],
                self.server_mtls.load(Ordering::Relaxed),
            ),
        )?;
        let (churning, wrk) = measured?;
        let acks_after = sidecar.acks().await?;
        Ok(ChurnMeasurement {
            steady,
            churning,
            wrk,
            changes_written,
            updates_applied: acks_after.saturating_sub(acks_before),
        })
    }

    /// Starts the `kind` sidecar of `role` for `case` (one worker thread, as uid 1337, pinned if
    /// asked, under the wrapper if given). Does not wait for it.
    fn start_sidecar(
        &self,
        kind: ProxyKind,
        case: Case,
        role: Role,
        options: &Options,
    ) -> anyhow::Result<Sidecar> {
        let (pod, workload) = match role {
            Role::Client => (&self.client_mesh, "client-mesh"),
            Role::Server => (&self.server_mesh, "server-mesh"),
        };
        let program = match kind {
            ProxyKind::Keel => self.proxy.clone(),
            ProxyKind::Envoy => self
                .envoy
                .clone()
                .context("an Envoy case runs, but Envoy was not found")?,
            ProxyKind::Nginx => self.nginx.clone(),
        };
        let mut argv: Vec<&OsStr> = Vec::new();
        if let Some(cpus) = options.pinned_cpus() {
            argv.extend([OsStr::new("taskset"), OsStr::new("-c"), OsStr::new(cpus)]);
        }
        if let Some(wrapper) = &options.proxy_wrapper {
            argv.extend(wrapper.split_whitespace().map(OsStr::new));
        }
        argv.push(program.as_os_str());
        let mut command = pod.proxy_command(argv[0]);
        command.args(&argv[1..]);
        // The sidecar reads its flags' KEEL_* variables: only the flags below may configure it.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("KEEL_") {
                command.env_remove(variable);
            }
        }
        match kind {
            ProxyKind::Keel => {
                command.arg("run");
                if case.mtls() {
                    // An identity: certificates from the CA over the secure port, mTLS to the
                    // other sidecar.
                    command
                        .arg("--control-plane")
                        .arg(format!("https://{}:{SECURE_PORT}", self.layout.gateway))
                        .arg("--ca-root-file")
                        .arg(&self.identity.root_file)
                        .arg("--identity-token-file")
                        .arg(self.identity.token_file(&self.network, workload)?)
                        .args(["--trust-domain", TRUST_DOMAIN]);
                } else {
                    command
                        .arg("--control-plane")
                        .arg(format!("http://{}:{DISCOVERY_PORT}", self.layout.gateway));
                }
                command
                    .args(["--workload", workload, "--namespace", NAMESPACE])
                    .args(["--service-account", workload])
                    .arg("--pod-ip")
                    .arg(pod.ip().to_string())
                    .args(["--worker-threads", "1"])
                    .env("KEEL_LOG", "warn");
            }
            ProxyKind::Envoy => {
                let certs = case.mtls().then(|| self.certificates.of(workload));
                let config = envoy::config(&self.layout, workload, pod.ip(), certs.as_ref());
                envoy::check_filled(&config)?;
                let path = self
                    .network
                    .workdir()
                    .join(format!("envoy-{workload}.yaml"));
                fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
                command
                    .arg("-c")
                    .arg(&path)
                    .args(["--concurrency", "1", "--disable-hot-restart"])
                    .args(["--log-level", "warn"]);
            }
            ProxyKind::Nginx => {
                let prefix = self
                    .network
                    .workdir()
                    .join(format!("nginx-proxy-{workload}"));
                let config = nginx_proxy::write_config(
                    &prefix,
                    keel_control_plane::demo::netns::PROXY_UID,
                    OUTBOUND_PORT,
                    SocketAddr::from((pod.ip(), ADMIN_PORT)),
                    SocketAddr::from((self.layout.server, APP_PORT)),
                )?;
                command
                    .arg("-p")
                    .arg(&prefix)
                    .arg("-c")
                    .arg(&config)
                    .args(["-e", "stderr"]);
            }
        }
        Ok(Sidecar {
            kind,
            role,
            admin: SocketAddr::from((pod.ip(), ADMIN_PORT)),
            process: pod.spawn_command("proxy", command)?,
        })
    }

    /// `program` in `pod`, pinned to the load generators' CPUs if they are.
    fn load_command(&self, pod: &Pod, program: impl AsRef<OsStr>) -> std::process::Command {
        pinned(pod, program.as_ref(), self.load_cpus.as_deref())
    }

    /// Runs wrk in `pod` against `url`.
    async fn wrk(&self, pod: &Pod, url: &str, wrk: &Wrk) -> anyhow::Result<WrkReport> {
        let script = match wrk.script() {
            Some(text) => {
                let path = self
                    .network
                    .workdir()
                    .join(format!("wrk-post-{}.lua", wrk.body));
                fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let args = wrk.args(url, script.as_deref());
        let mut command = tokio::process::Command::from(self.load_command(pod, "wrk"));
        command.args(&args).kill_on_drop(true);
        let output = command.output().await.context("running wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "wrk {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(wrk::parse(&stdout)?)
    }

    /// Runs h2load in `pod` against `url`.
    async fn h2load(&self, pod: &Pod, url: &str, h2: &H2load) -> anyhow::Result<H2loadReport> {
        let mut command = tokio::process::Command::from(self.load_command(pod, "h2load"));
        command.args(h2.args(url)).kill_on_drop(true);
        let output = command.output().await.context("running h2load")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "h2load {} failed ({}): {}{}",
            h2.args(url).join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(h2load::parse(&stdout)?)
    }

    /// Runs the open-loop generator in `pod` against `url` at `rate` for `duration`.
    async fn open_loop(
        &self,
        pod: &Pod,
        url: &str,
        rate: u32,
        duration: Duration,
        options: &Options,
    ) -> anyhow::Result<openloop::Report> {
        let mut command = tokio::process::Command::from(self.load_command(pod, &self.openloop));
        command
            .args(["--url", url])
            .args(["--rate", &rate.to_string()])
            .arg("--duration")
            .arg(humantime::format_duration(duration).to_string())
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

/// Rewrites the mesh every `interval`, cycling service `plain` through three endpoint sets, and
/// counts the writes in `written`; runs until aborted.
async fn churn(
    mesh_dir: PathBuf,
    workdir: PathBuf,
    layout: Layout,
    interval: Duration,
    written: Arc<AtomicU64>,
) {
    let sets = [
        vec![layout.server, layout.server_b],
        vec![layout.server_b],
        vec![layout.server, layout.server_b],
        vec![layout.server],
    ];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for set in sets.iter().cycle() {
        tick.tick().await;
        match replace_mesh(&mesh_dir, &workdir, &layout.mesh_yaml(set, false)) {
            Ok(()) => {
                written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "rewriting the mesh failed"),
        }
    }
}

/// Replaces the watched `mesh.yaml` in one step (written beside the directory, then renamed
/// over it), so that the control plane never reads half a file.
fn replace_mesh(mesh_dir: &Path, workdir: &Path, yaml: &str) -> anyhow::Result<()> {
    let staged = workdir.join("mesh.yaml.next");
    fs::write(&staged, yaml).with_context(|| format!("writing {}", staged.display()))?;
    let target = mesh_dir.join("mesh.yaml");
    fs::rename(&staged, &target).with_context(|| format!("replacing {}", target.display()))
}

/// A running sidecar of one case; killed when dropped.
struct Sidecar {
    kind: ProxyKind,
    role: Role,
    admin: SocketAddr,
    process: Process,
}

impl Sidecar {
    /// Waits for `/ready` (keel's and Envoy's admin both answer it), then, if `check_process`,
    /// checks that the process being measured is the proxy itself (the `ip netns exec`,
    /// `setpriv` and `taskset` in front of it each exec into the next).
    async fn wait_ready(&mut self, check_process: bool) -> anyhow::Result<()> {
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
        if check_process {
            let expected = self.kind.command_name();
            let name = procfs::command_name(self.pid())?;
            ensure!(
                name == expected,
                "process {} of the {} is {name:?}, not {expected}: its CPU time would not be \
                 the proxy's",
                self.pid(),
                self.role.title()
            );
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Fails unless the sidecar answered at least `answered` requests with 2xx (what the
    /// clients saw completed): otherwise traffic went around it and its figures mean nothing.
    /// Checks that the sidecar counted at least `answered` requests, and, for keel's server
    /// sidecar, that they came over mTLS exactly when `mtls`.
    async fn check_carried(&self, answered: u64, mtls: bool) -> anyhow::Result<()> {
        let direction = match self.role {
            Role::Client => "outbound",
            Role::Server => "inbound",
        };
        let counted = match self.kind {
            ProxyKind::Keel => {
                let scraped = metrics::scrape(self.admin).await?;
                if self.role == Role::Server {
                    let over_mtls = scraped.sum(
                        "keel_tcp_connections_opened_total",
                        &[("direction", "inbound"), ("protocol", "mtls")],
                    );
                    ensure!(
                        (over_mtls > 0.0) == mtls,
                        "the server sidecar accepted {over_mtls} mTLS connections in a case \
                         {} mTLS",
                        if mtls { "with" } else { "without" }
                    );
                }
                scraped.sum(
                    "keel_requests_total",
                    &[("direction", direction), ("status", "200")],
                ) as u64
            }
            ProxyKind::Envoy => {
                let Some((200, stats)) = probe(self.admin, "/stats?filter=downstream_rq_2xx").await
                else {
                    bail!("the {}'s admin did not answer /stats", self.role.title());
                };
                envoy::answered_2xx(&String::from_utf8_lossy(&stats), direction)?
            }
            ProxyKind::Nginx => {
                let Some((200, stats)) = probe(self.admin, "/stats").await else {
                    bail!("the {}'s stub_status did not answer", self.role.title());
                };
                nginx_proxy::handled_requests(&String::from_utf8_lossy(&stats))?
            }
        };
        ensure!(
            counted >= answered,
            "the {} counted {counted} {direction} requests answered 2xx, fewer than the \
             {answered} the clients completed: traffic went around it",
            self.role.title()
        );
        Ok(())
    }

    /// Asks the sidecar to exit (SIGTERM) and waits up to 30 s for it; dropping it kills it
    /// if it is still there.
    async fn stop(&mut self) {
        let Ok(pid) = libc::pid_t::try_from(self.pid()) else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, which
        // has not been reaped (we still hold it), so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.process.exited().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Discovery responses the (keel) sidecar has ACKed, from its `/config`.
    async fn acks(&self) -> anyhow::Result<u64> {
        let Some((200, body)) = probe(self.admin, "/config").await else {
            bail!("the {}'s admin did not answer /config", self.role.title());
        };
        let config: serde_json::Value =
            serde_json::from_slice(&body).context("reading the sidecar's /config")?;
        config["discovery"]["acks"]
            .as_u64()
            .context("the sidecar's /config has no discovery.acks")
    }
}

fn cpu_times(sidecars: &[Sidecar]) -> anyhow::Result<Vec<CpuTime>> {
    sidecars
        .iter()
        .map(|s| {
            procfs::cpu_times(s.pid())
                .with_context(|| format!("reading the {}'s CPU time", s.role.title()))
        })
        .collect()
}

/// Runs `load` and returns its result with the CPU time each sidecar spent meanwhile.
async fn with_cpu<T>(
    sidecars: &[Sidecar],
    load: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Vec<CpuTime>)> {
    let before = cpu_times(sidecars)?;
    let report = load.await?;
    Ok((report, elapsed_since(&before, &cpu_times(sidecars)?)))
}

fn elapsed_since(before: &[CpuTime], after: &[CpuTime]) -> Vec<CpuTime> {
    before.iter().zip(after).map(|(b, a)| a.since(*b)).collect()
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

/// `program` in `pod`, under `taskset -c <cpus>` if `cpus` is given (taskset execs into it, so
/// the process measured is the program itself).
fn pinned(pod: &Pod, program: &OsStr, cpus: Option<&str>) -> std::process::Command {
    match cpus {
        Some(cpus) => {
            let mut command = pod.command("taskset");
            command.args([OsStr::new("-c"), OsStr::new(cpus), program]);
            command
        }
        None => pod.command(program),
    }
}

/// Starts nginx in `pod` with [`NGINX_CONF`], its files in a directory of the network's, pinned
/// to `cpus` if given.
fn start_nginx(
    network: &Network,
    pod: &Pod,
    nginx: &Path,
    cpus: Option<&str>,
) -> anyhow::Result<Process> {
    let prefix = network.workdir().join(format!("nginx-{}", pod.name()));
    fs::create_dir_all(prefix.join("tmp"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    let conf = prefix.join("nginx.conf");
    fs::write(&conf, NGINX_CONF).with_context(|| format!("writing {}", conf.display()))?;
    let mut command = pinned(pod, nginx.as_os_str(), cpus);
    command.args([
        OsStr::new("-p"),
        prefix.as_os_str(),
        OsStr::new("-c"),
        conf.as_os_str(),
        OsStr::new("-e"),
        OsStr::new("stderr"),
    ]);
    Ok(pod.spawn_command("nginx", command)?)
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

/// `GET path` at `addr` over HTTP/1.1 with `Connection: close` (Envoy's admin refuses HTTP/1.0):
/// the status and the body, or `None` if no complete answer came within two seconds.
async fn probe(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        parse_answer(&answer)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// The status and body of a whole HTTP/1.1 answer, its body de-chunked if it was chunked.
fn parse_answer(answer: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..head_end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let mut body = &answer[head_end + 4..];
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut decoded = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some((status, decoded));
        }
        decoded.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_answer(plain), Some((200, b"hello".to_vec())));
        let chunked =
            b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked), Some((503, b"hello!!!".to_vec())));
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n"), None);
        let cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhe";
        assert_eq!(parse_answer(cut), None);
    }
}
