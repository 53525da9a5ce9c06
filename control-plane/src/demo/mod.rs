//! `keelctl demo`: keel's local mesh on one machine. Every Workload of a mesh directory becomes a
//! pod (a network namespace on a bridge) running `keel-proxy init`, `keel-proxy run` as uid 1337
//! and the demo application (`keel-demo-app`) in the role its `app` label names; the control
//! plane runs in this process on the bridge's host address. Once every sidecar is ready, a load
//! generator in the frontend pod sends a mix of requests through its sidecar, and the demo prints
//! what the client measured per route next to what the sidecars counted.
//!
//! The submodules are its parts: [`plan`] (model to pods), [`netns`] (namespaces, shared with
//! keel's tests), [`metrics`] (reading the sidecars' counters) and [`summary`] (the tables).
//!
//! It must never write into the user's mesh directory (the control plane serves a copy), never
//! leave a namespace, link or process behind (everything it starts is owned by a guard dropped
//! on success, on error and on SIGINT/SIGTERM/SIGHUP; a run killed outright is cleaned up by the
//! next one), and never touch the host's firewall or sysctls.

pub mod metrics;
pub mod netns;
pub mod plan;
pub mod summary;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ipnet::Ipv4Net;

use self::metrics::Metrics;
use self::netns::{Network, Pod, Process};
use self::plan::{MeshPlan, PodPlan, Role};
use self::summary::{LoadReport, RouteLabel};
use crate::identity::CaStorage;
use crate::model;
use crate::server::{IdentityConfig, ProofKind};
use crate::{ControlPlane, ControlPlaneConfig};

/// The demo's network suffix: namespaces `keel-demo-<workload>`, bridge `keel-brdemo`.
const SUFFIX: &str = "demo";
/// Holds the pid of the running demo, so that a second one refuses to start and a killed one's
/// leftovers can be told from a live run's.
const LOCK_FILE: &str = "/run/keel-demo.pid";
/// Where the sidecars reach the control plane, on the gateway address.
const DISCOVERY_PORT: u16 = 15010;
/// The control plane's secure port (discovery and certificates, over TLS) on the gateway.
const SECURE_PORT: u16 = 15012;
/// The sidecars' admin port (`/ready`, `/metrics`).
const PROXY_ADMIN_PORT: u16 = 15020;
/// How long sidecars get to receive their first configuration.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first request through the whole chain may take to succeed.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The kinds of request `keel-demo-app --role load --only <kind>` sends, with the service each
/// calls.
const KINDS: [(&str, Role); 7] = [
    ("articles-get", Role::Articles),
    ("articles-list", Role::Articles),
    ("articles-post", Role::Articles),
    ("comments-list", Role::Comments),
    ("comments-post", Role::Comments),
    ("reads-bump", Role::Reads),
    ("reads-canary", Role::Reads),
];

/// Flags of `keelctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The mesh to run: one pod per Workload. It is read, never written: the control plane
    /// serves a copy.
    #[arg(long, default_value = "examples/mesh")]
    pub config_dir: PathBuf,
    /// How many requests the load generator sends.
    #[arg(long, default_value_t = 600)]
    pub requests: u64,
    /// How long it spreads them over (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The most requests it has in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Where keel-proxy and keel-demo-app are; default: next to keelctl.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The control plane's admin API, for `keelctl status` while the demo runs.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin_addr: SocketAddr,
    /// The sidecars' log filter (their logs are shown when something fails).
    #[arg(long, default_value = "info")]
    pub proxy_log: String,
    /// Keep the mesh running after the summary, until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
    /// Lifetime of the sidecars' certificates (they renew at about 70% of it); short values
    /// show renewal during `--hold`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

/// Runs the demo; returns the exit status (0: every request succeeded).
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    if let Some(why) = netns::missing_requirements(&["ip", "iptables", "setpriv"]) {
        bail!(
            "keelctl demo runs every workload in its own network namespace with iptables redirect \
             rules, so it needs root and the ip, iptables and setpriv commands: {why}. Run it as \
             root, e.g. `sudo target/release/keelctl demo`."
        );
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let binaries = Binaries::locate(args.bin_dir.as_deref())?;
    // Every handler is installed before the first namespace exists. (`tokio::signal::ctrl_c()`
    // would install SIGINT's only when first polled, and the demo's setup runs `ip` commands
    // for seconds before it yields: a Ctrl-C then killed keelctl and left the mesh behind.) A
    // signal that arrives while the setup is busy is acted on as soon as it yields.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    // Dropping the demo's future drops every guard it holds: processes, pods, network, control
    // plane, lock. That is the cleanup, whichever branch wins.
    let code = tokio::select! {
        result = demo(&args, &binaries) => result?,
        _ = interrupt.recv() => 130,
        _ = terminate.recv() => 143,
        _ = hangup.recv() => 129,
    };
    if code >= 128 {
        eprintln!("keelctl demo: stopped; the demo's namespaces, links and processes are removed");
    }
    Ok(code)
}

/// The two executables the demo runs in the pods.
#[derive(Debug)]
struct Binaries {
    proxy: PathBuf,
    app: PathBuf,
}

impl Binaries {
    fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Binaries> {
        let dir = match bin_dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::current_exe()
                .context("finding keelctl's own path")?
                .parent()
                .map(Path::to_path_buf)
                .context("keelctl's path has no directory")?,
        };
        let build = if dir.ends_with("debug") {
            "cargo build --workspace"
        } else {
            "cargo build --release --workspace"
        };
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow!(
                    "{name} not found in {} (keelctl demo looks next to its own executable, or \
                     in --bin-dir): build it with `{build}`",
                    dir.display()
                ))
            }
        };
        Ok(Binaries {
            proxy: find("keel-proxy")?,
            app: find("keel-demo-app")?,
        })
    }
}

/// A pod of the demo with what runs in it. Fields drop in order: processes, then the pod.
struct RunningPod {
    proxy: Option<Process>,
    app: Process,
    pod: Pod,
    plan: PodPlan,
}

impl RunningPod {
    fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.plan.ip, PROXY_ADMIN_PORT))
    }

    /// Last lines of the sidecar's and the app's logs, for an error message.
    fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(proxy) = &self.proxy {
            out.push_str(&format!(
                "--- {} ({}):\n{}",
                proxy.label(),
                proxy.log_path().display(),
                proxy.log_tail(15)
            ));
        }
        out.push_str(&format!(
            "--- {} ({}):\n{}",
            self.app.label(),
            self.app.log_path().display(),
            self.app.log_tail(5)
        ));
        out
    }
}

/// Keeps a second demo from starting while one runs; removed on drop.
struct DemoLock;

impl DemoLock {
    fn acquire() -> anyhow::Result<DemoLock> {
        for _ in 0..2 {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(LOCK_FILE)
            {
                Ok(mut file) => {
                    writeln!(file, "{}", std::process::id())
                        .with_context(|| format!("writing {LOCK_FILE}"))?;
                    return Ok(DemoLock);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let owner = fs::read_to_string(LOCK_FILE)
                        .ok()
                        .and_then(|text| text.trim().parse::<u32>().ok());
                    if let Some(pid) = owner
                        && pid != std::process::id()
                        && is_live_keelctl(pid)
                    {
                        bail!(
                            "another keelctl demo is running (pid {pid}): stop it first (Ctrl-C \
                             in its terminal, or `kill {pid}`)"
                        );
                    }
                    // Its owner is gone: a demo that was killed before it could clean up.
                    match fs::remove_file(LOCK_FILE) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e).with_context(|| format!("removing {LOCK_FILE}")),
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("creating {LOCK_FILE}")),
            }
        }
        bail!("{LOCK_FILE} keeps reappearing: is another keelctl demo starting?")
    }
}

/// Whether `pid` is a running (not zombie) process named keelctl, per /proc/<pid>/stat:
/// `pid (comm) state ...`.
fn is_live_keelctl(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = stat.get(open + 1..close).unwrap_or_default();
    let state = stat.get(close + 1..).unwrap_or_default().trim_start();
    comm == "keelctl" && !state.starts_with(['Z', 'X'])
}

impl Drop for DemoLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(LOCK_FILE);
    }
}

/// The running mesh. Fields drop in order: pods (their processes first), control plane,
/// network, lock.
struct Mesh {
    pods: Vec<RunningPod>,
    control_plane: ControlPlane,
    network: Network,
    _lock: DemoLock,
    bins: Binaries,
    plan: MeshPlan,
    model: model::Model,
}

async fn demo(args: &DemoArgs, binaries: &Binaries) -> anyhow::Result<i32> {
    let mut mesh = Mesh::start(args, binaries).await?;
    let http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let started = Instant::now();
    wait_ready(&http, &mut mesh.pods, &mesh.plan).await?;
    println!(
        "Every sidecar has its configuration ({:.1}s).",
        started.elapsed().as_secs_f64()
    );
    smoke(&http, &mesh.pods).await?;
    let code = match mesh.client() {
        Some(client) => drive(args, &mesh, client).await?,
        None => {
            println!("No meshed pod to send traffic from; nothing more to show.");
            0
        }
    };
    if args.hold {
        let (ip, port) = mesh
            .pods
            .iter()
            .find(|p| p.plan.role == Role::Frontend)
            .map_or((mesh.plan.gateway, 0), |p| (p.plan.ip, p.plan.port));
        println!(
            "\nThe mesh keeps running until Ctrl-C. Try:\n  curl -s http://{ip}:{port}/articles/1\n  \
             keelctl status --control-plane http://{}",
            mesh.control_plane.admin_addr
        );
        std::future::pending::<()>().await;
    }
    println!("Removing the demo's namespaces.");
    drop(mesh);
    Ok(code)
}

impl Mesh {
    /// Checks what the host offers, then creates the network, the control plane and every pod
    /// with its processes. Does not wait for them.
    async fn start(args: &DemoArgs, binaries: &Binaries) -> anyhow::Result<Mesh> {
        ensure!(
            args.config_dir.is_dir(),
            "no mesh directory at {}: run keelctl demo from the repository's root, or pass \
             --config-dir <directory of mesh YAML>",
            args.config_dir.display()
        );
        let (model, _) = model::load_dir(&args.config_dir).map_err(|errors| {
            anyhow!(
                "{} is not a valid mesh ({} error(s)):\n{errors}",
                args.config_dir.display(),
                errors.0.len()
            )
        })?;
        let plan = plan::plan(&model)
            .with_context(|| format!("cannot run the mesh in {}", args.config_dir.display()))?;
        let lock = DemoLock::acquire()?;
        if netns::list_networks()?.iter().any(|s| s == SUFFIX) {
            println!(
                "Removing what a previous demo left behind (it was killed before cleaning up)."
            );
            netns::remove_network(SUFFIX)?;
        }
        if let Some((device, address)) = netns::host_addresses()?
            .into_iter()
            .find(|(_, net)| overlaps(net, &plan.subnet))
        {
            bail!(
                "the mesh's subnet {} is already in use on this host ({address} on {device}); \
                 the demo needs it for its bridge",
                plan.subnet
            );
        }

        let mut builder = Network::builder(SUFFIX, plan.subnet).gateway(plan.gateway);
        for vip in &plan.vips {
            if !netns::DEFAULT_SERVICE_RANGE.contains(vip) && !plan.subnet.contains(vip) {
                builder = builder.route(Ipv4Net::from(*vip));
            }
        }
        let network = builder.create()?;
        let bins = Binaries {
            proxy: network.stage_executable(&binaries.proxy)?,
            app: network.stage_executable(&binaries.app)?,
        };
        let mesh_dir = network.workdir().join("mesh");
        copy_mesh(&args.config_dir, &mesh_dir)?;
        let discovery_addr = SocketAddr::from((plan.gateway, DISCOVERY_PORT));
        let secure_addr = SocketAddr::from((plan.gateway, SECURE_PORT));
        // A CA of the demo's own, in the network's work directory: removed with it.
        let identity = IdentityConfig {
            storage: CaStorage::Directory {
                dir: network.workdir().join("ca"),
                import: None,
            },
            workload_ttl: args.cert_ttl,
            secure_addr,
            extra_names: Vec::new(),
            proof: ProofKind::BootstrapToken,
        };
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            config_dir: mesh_dir,
            discovery_addr,
            admin_addr: args.admin_addr,
            identity: Some(identity),
        })
        .await
        .with_context(|| {
            format!(
                "starting the control plane (is another one using {discovery_addr}, \
                 {secure_addr} or {}? --admin-addr picks another admin address)",
                args.admin_addr
            )
        })?;
        println!(
            "keel demo: {} workloads from {} on {} (control plane {secure_addr}, admin {}; \
             `keelctl status` and `keelctl ca status` work while the demo runs)",
            plan.pods.len(),
            args.config_dir.display(),
            plan.subnet,
            control_plane.admin_addr,
        );
        let sidecar_identity = SidecarIdentity::stage(&network, &control_plane, &model)?;
        let mut mesh = Mesh {
            pods: Vec::new(),
            control_plane,
            network,
            _lock: lock,
            bins,
            plan,
            model,
        };
        for pod_plan in mesh.plan.pods.clone() {
            let running = start_pod(
                &mesh.network,
                &pod_plan,
                &mesh.bins,
                &sidecar_identity,
                args,
            )?;
            let key =
                crate::model::ObjectKey::new(&pod_plan.workload.namespace, &pod_plan.workload.name);
            let identity = match mesh.model.workloads.get(&key) {
                Some(w) if pod_plan.meshed => format!(
                    "sidecar, {} (mTLS {})",
                    mesh.model.spiffe_id(w),
                    mtls_mode_name(mesh.model.mtls_mode_for(&key))
                ),
                _ => "no sidecar".to_owned(),
            };
            println!(
                "  {:<14} {:<15} {:<9} {identity}",
                pod_plan.name,
                pod_plan.ip,
                pod_plan.role.as_str(),
            );
            mesh.pods.push(running);
        }
        Ok(mesh)
    }

    /// The pod the load generator runs in.
    fn client(&self) -> Option<&RunningPod> {
        let name = &self.plan.client()?.name;
        self.pods.iter().find(|p| &p.plan.name == name)
    }
}

/// Sends the load from `client`, then prints the route and inbound tables; returns the exit
/// status (1 when a request failed).
async fn drive(args: &DemoArgs, mesh: &Mesh, client: &RunningPod) -> anyhow::Result<i32> {
    let load = LoadCommand::new(&mesh.bins.app, client, &mesh.plan);
    print!(
        "Learning each request's route from {}'s sidecar...",
        client.plan.name
    );
    let _ = io::stdout().flush();
    let routes = calibrate(&load, client).await?;
    println!(" {} of {} kinds labelled.", routes.len(), load.kinds.len());

    let before = scrape_all(&mesh.pods).await;
    println!(
        "Sending {} requests over {} from {} (at most {} in flight)...",
        args.requests,
        humantime::format_duration(args.duration),
        client.plan.name,
        args.concurrency
    );
    let report = load
        .run(&[
            "--requests".into(),
            args.requests.to_string().into(),
            "--duration".into(),
            humantime::format_duration(args.duration).to_string().into(),
            "--concurrency".into(),
            args.concurrency.to_string().into(),
        ])
        .await?;
    // Sidecars may count a request just after its answer left: give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = scrape_all(&mesh.pods).await;

    let namespace = &client.plan.workload.namespace;
    let outbound = growth(&before, &after, &client.plan.name, "outbound");
    let rows = summary::route_rows(namespace, &report, &routes, &outbound, &mesh.model);
    println!(
        "\nRoutes: measured by the load generator in {} in {:.1}s; SIDECAR is what its sidecar \
         counted for the same route.\n",
        client.plan.name,
        report.elapsed_ms as f64 / 1000.0
    );
    print!("{}", summary::render_routes(&rows));
    let inbound: Vec<_> = mesh
        .pods
        .iter()
        .filter(|p| p.plan.meshed)
        .map(|p| {
            summary::inbound_row(
                &p.plan.name,
                &growth(&before, &after, &p.plan.name, "inbound"),
            )
        })
        .collect();
    println!(
        "\nInbound: what each sidecar let in during the run, the calls between services \
         included.\n"
    );
    print!("{}", summary::render_inbound(&inbound));
    let opened = |protocol: &str| -> f64 {
        after
            .values()
            .map(|m| {
                m.sum(
                    "keel_tcp_connections_opened_total",
                    &[("direction", "inbound"), ("protocol", protocol)],
                )
            })
            .sum()
    };
    let mtls = opened("mtls");
    let plaintext = opened("http1") + opened("http2") + opened("tcp") + opened("tls");
    println!(
        "\nConnections the sidecars accepted since they started: {mtls} over mTLS, {plaintext} \
         in plaintext (from outside the mesh)."
    );
    let missing: Vec<&str> = mesh
        .pods
        .iter()
        .filter(|p| p.plan.meshed && !after.contains_key(&p.plan.name))
        .map(|p| p.plan.name.as_str())
        .collect();
    if !missing.is_empty() {
        println!(
            "  note: no metrics from {} (GET /metrics failed)",
            missing.join(", ")
        );
    }
    let failed: u64 = rows.iter().map(|r| r.requests - r.succeeded).sum();
    if failed == 0 {
        println!("\nEvery request succeeded.");
        Ok(0)
    } else {
        println!(
            "\n{failed} request(s) failed. Logs of the client's sidecar:\n{}",
            client.logs()
        );
        Ok(1)
    }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Copies the mesh's YAML files to `to`, keeping their relative paths.
fn copy_mesh(from: &Path, to: &Path) -> anyhow::Result<()> {
    let files = model::yaml_files(from)
        .map_err(|errors| anyhow!("listing {}:\n{errors}", from.display()))?;
    for file in files {
        let relative = file
            .strip_prefix(from)
            .map(Path::to_path_buf)
            .or_else(|_| file.file_name().map(PathBuf::from).context("a file name"))?;
        let target = to.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::copy(&file, &target)
            .with_context(|| format!("copying {} to {}", file.display(), target.display()))?;
    }
    Ok(())
}

/// Removes the caller's `KEEL_*` variables from a child's environment: `keel-proxy` and
/// `keel-demo-app` read their flags from such variables, and the user's shell must not change
/// what the demo asked for.
fn clean_env(command: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEEL_") {
            command.env_remove(name);
        }
    }
}

fn mtls_mode_name(mode: crate::model::MtlsMode) -> &'static str {
    match mode {
        crate::model::MtlsMode::Strict => "STRICT",
        crate::model::MtlsMode::Permissive => "PERMISSIVE",
        crate::model::MtlsMode::Disable => "DISABLE",
    }
}

/// What every sidecar needs to get its certificate: the control plane's secure port, the CA's
/// roots and its workload's bootstrap token, staged where the proxy's user can read them.
struct SidecarIdentity {
    control_plane: String,
    root_file: PathBuf,
    trust_domain: String,
    tokens: Arc<crate::identity::BootstrapTokens>,
}

impl SidecarIdentity {
    fn stage(
        network: &Network,
        control_plane: &ControlPlane,
        model: &crate::model::Model,
    ) -> anyhow::Result<SidecarIdentity> {
        let ca = control_plane
            .ca
            .as_ref()
            .context("the control plane's CA")?;
        let tokens = control_plane
            .tokens
            .clone()
            .context("the control plane's bootstrap tokens")?;
        let secure = control_plane.secure_addr.context("the secure port")?;
        let root_file = network.stage_file(
            "roots.pem",
            crate::identity::ca::bundle_pem(&ca.bundle()).as_bytes(),
            false,
        )?;
        Ok(SidecarIdentity {
            control_plane: format!("https://{secure}"),
            root_file,
            trust_domain: model.mesh.trust_domain.clone(),
            tokens,
        })
    }

    /// Stages `namespace/name`'s token; returns its path.
    fn token_file(
        &self,
        network: &Network,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let token = self.tokens.mint(namespace, name);
        Ok(network.stage_file(&format!("{namespace}.{name}.token"), token.as_bytes(), true)?)
    }
}

fn start_pod(
    network: &Network,
    plan: &PodPlan,
    bins: &Binaries,
    identity: &SidecarIdentity,
    args: &DemoArgs,
) -> anyhow::Result<RunningPod> {
    let pod = network.add_pod(&plan.name, plan.ip)?;
    let proxy = if plan.meshed {
        let mut init = pod.command(&bins.proxy);
        init.arg("init");
        clean_env(&mut init);
        let output = init
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running keel-proxy init in {}", plan.name))?;
        ensure!(
            output.status.success(),
            "keel-proxy init in {} failed ({}):\n{}",
            plan.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let mut run = pod.proxy_command(&bins.proxy);
        clean_env(&mut run);
        let ip = plan.ip.to_string();
        let token_file =
            identity.token_file(network, &plan.workload.namespace, &plan.workload.name)?;
        run.args([
            "run",
            "--control-plane",
            &identity.control_plane,
            "--workload",
            &plan.workload.name,
            "--namespace",
            &plan.workload.namespace,
            "--service-account",
            &plan.service_account,
            "--pod-ip",
            &ip,
        ]);
        for (flag, value) in [
            ("--region", &plan.locality.region),
            ("--zone", &plan.locality.zone),
            ("--subzone", &plan.locality.subzone),
        ] {
            if let Some(value) = value {
                run.args([flag, value]);
            }
        }
        run.arg("--ca-root-file")
            .arg(&identity.root_file)
            .arg("--identity-token-file")
            .arg(&token_file)
            .args(["--trust-domain", &identity.trust_domain]);
        run.env("KEEL_LOG", &args.proxy_log);
        Some(pod.spawn_command("proxy", run)?)
    } else {
        None
    };
    let mut app = pod.command(&bins.app);
    clean_env(&mut app);
    app.args([
        "--role",
        plan.role.as_str(),
        "--listen",
        &format!("0.0.0.0:{}", plan.port),
        "--workload",
        &plan.workload.name,
        "--namespace",
        &plan.workload.namespace,
    ]);
    for (service, address) in &plan.upstreams {
        app.arg(format!("--{service}"))
            .arg(format!("http://{address}"));
    }
    let app = pod.spawn_command("app", app)?;
    Ok(RunningPod {
        proxy,
        app,
        pod,
        plan: plan.clone(),
    })
}

type Http = Client<HttpConnector, Empty<Bytes>>;

/// `GET url` within `timeout`: the status, `x-served-by` and the body.
async fn get(
    http: &Http,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<(http::StatusCode, Option<String>, Bytes)> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let call = async {
        let response = http.get(uri).await?;
        let status = response.status();
        let served_by = response
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, served_by, body))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("GET {url}: no answer within {timeout:?}"))?
        .with_context(|| format!("GET {url}"))
}

/// Waits until every sidecar answers `/ready` with 200, failing early if a process exits.
async fn wait_ready(http: &Http, pods: &mut [RunningPod], plan: &MeshPlan) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<usize> = (0..pods.len()).filter(|i| pods[*i].plan.meshed).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for i in pending {
            let pod = &mut pods[i];
            if let Some(status) = pod.proxy.as_mut().and_then(Process::exited) {
                bail!(
                    "the sidecar of {} exited ({status}) before it was ready:\n{}",
                    pod.plan.name,
                    pod.logs()
                );
            }
            if let Some(status) = pod.app.exited() {
                bail!(
                    "the app of {} exited ({status}):\n{}",
                    pod.plan.name,
                    pod.logs()
                );
            }
            let url = format!("http://{}/ready", pod.admin());
            match get(http, &url, Duration::from_secs(1)).await {
                Ok((status, _, _)) if status == http::StatusCode::OK => {}
                _ => still.push(i),
            }
        }
        pending = still;
        if !pending.is_empty() && Instant::now() >= deadline {
            let names: Vec<&str> = pending
                .iter()
                .map(|i| pods[*i].plan.name.as_str())
                .collect();
            bail!(
                "{} sidecar(s) not ready after {}s: {}. They fetch their configuration from the \
                 control plane at {}:{DISCOVERY_PORT}, so the host's firewall must accept \
                 connections from {} to it.\n{}",
                names.len(),
                READY_TIMEOUT.as_secs(),
                names.join(", "),
                plan.gateway,
                plan.subnet,
                pods[pending[0]].logs()
            );
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// One request through the whole chain, from the host to the frontend's pod address (so through
/// its sidecar's inbound side), retried until it succeeds: frontend, articles, comments, reads.
async fn smoke(http: &Http, pods: &[RunningPod]) -> anyhow::Result<()> {
    let Some(frontend) = pods.iter().find(|p| p.plan.role == Role::Frontend) else {
        return Ok(());
    };
    let url = format!(
        "http://{}:{}/articles/1",
        frontend.plan.ip, frontend.plan.port
    );
    let deadline = Instant::now() + SMOKE_TIMEOUT;
    let last = loop {
        let outcome = get(http, &url, Duration::from_secs(6)).await;
        if let Ok((status, served_by, body)) = &outcome
            && status.is_success()
        {
            let page: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let name = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
            println!(
                "GET {url} -> {status}: {} -> {} -> {} + {}",
                served_by.as_deref().unwrap_or("?"),
                name(&page["via"]["articles"]),
                name(&page["article"]["via"]["comments"]),
                name(&page["article"]["via"]["reads"]),
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let last = match last {
        Ok((status, _, body)) => format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
        Err(e) => format!("{e:#}"),
    };
    let mut logs = String::new();
    for pod in pods
        .iter()
        .filter(|p| matches!(p.plan.role, Role::Frontend | Role::Articles))
    {
        logs.push_str(&pod.logs());
    }
    bail!(
        "the request through the whole chain did not succeed within {}s; last answer: {last}\n{logs}",
        SMOKE_TIMEOUT.as_secs()
    )
}

/// `keel-demo-app --role load` in the client pod, with the services it can reach.
struct LoadCommand<'a> {
    app: &'a Path,
    pod: &'a Pod,
    namespace: String,
    upstreams: Vec<(Role, SocketAddrV4)>,
    /// The kinds whose service has an address.
    kinds: Vec<&'static str>,
}

impl<'a> LoadCommand<'a> {
    fn new(app: &'a Path, client: &'a RunningPod, plan: &MeshPlan) -> LoadCommand<'a> {
        let namespace = client.plan.workload.namespace.clone();
        let upstreams: Vec<(Role, SocketAddrV4)> = [Role::Articles, Role::Comments, Role::Reads]
            .into_iter()
            .filter_map(|role| {
                plan.services
                    .get(&(namespace.clone(), role))
                    .map(|a| (role, *a))
            })
            .collect();
        let kinds = KINDS
            .iter()
            .filter(|(_, role)| upstreams.iter().any(|(r, _)| r == role))
            .map(|(kind, _)| *kind)
            .collect();
        LoadCommand {
            app,
            pod: &client.pod,
            namespace,
            upstreams,
            kinds,
        }
    }

    async fn run(&self, extra: &[OsString]) -> anyhow::Result<LoadReport> {
        let mut command = self.pod.command(self.app);
        clean_env(&mut command);
        command.args(["--role", "load", "--namespace", &self.namespace]);
        for (role, address) in &self.upstreams {
            command
                .arg(format!("--{role}"))
                .arg(format!("http://{address}"));
        }
        command.args(extra).env("KEEL_LOG", "warn");
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true).stdin(Stdio::null());
        let output = command
            .output()
            .await
            .context("running the load generator")?;
        ensure!(
            output.status.success(),
            "the load generator failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "the load generator's report is not JSON: {}",
                String::from_utf8_lossy(&output.stdout).trim()
            )
        })
    }
}

/// Sends one request of each kind and reads, from the client's sidecar's counters, which
/// route it took. Kinds whose route cannot be read are left out (shown as `?`).
async fn calibrate(
    load: &LoadCommand<'_>,
    client: &RunningPod,
) -> anyhow::Result<BTreeMap<String, RouteLabel>> {
    let mut routes = BTreeMap::new();
    for kind in &load.kinds {
        let Ok(before) = metrics::scrape(client.admin()).await else {
            continue;
        };
        load.run(&[
            "--only".into(),
            (*kind).into(),
            "--requests".into(),
            "1".into(),
            "--duration".into(),
            "0s".into(),
        ])
        .await?;
        let service = KINDS
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, role)| format!("{}/{role}", load.namespace));
        // The sidecar may count the request just after the answer left.
        for _ in 0..10 {
            let Ok(after) = metrics::scrape(client.admin()).await else {
                break;
            };
            let grown = after.growth(&before, "keel_requests_total");
            let outbound: Vec<&metrics::Labels> = grown
                .keys()
                .filter(|l| l.get("direction").map(String::as_str) == Some("outbound"))
                .collect();
            let chosen = outbound
                .iter()
                .find(|l| l.get("service") == service.as_ref())
                .or_else(|| outbound.first());
            if let Some(labels) = chosen
                && let (Some(service), Some(route)) = (labels.get("service"), labels.get("route"))
            {
                routes.insert(
                    (*kind).to_owned(),
                    RouteLabel {
                        service: service.clone(),
                        route: route.clone(),
                    },
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(routes)
}

/// Scrapes every meshed pod's sidecar; pods whose scrape failed are absent.
async fn scrape_all(pods: &[RunningPod]) -> BTreeMap<String, Metrics> {
    let mut all = BTreeMap::new();
    for pod in pods.iter().filter(|p| p.plan.meshed) {
        if let Ok(metrics) = metrics::scrape(pod.admin()).await {
            all.insert(pod.plan.name.clone(), metrics);
        }
    }
    all
}

/// How `keel_requests_total{direction=<direction>}` of one pod's sidecar grew.
fn growth(
    before: &BTreeMap<String, Metrics>,
    after: &BTreeMap<String, Metrics>,
    pod: &str,
    direction: &str,
) -> BTreeMap<metrics::Labels, f64> {
    let empty = Metrics::default();
    let (Some(after), before) = (after.get(pod), before.get(pod).unwrap_or(&empty)) else {
        return BTreeMap::new();
    };
    after
        .growth(before, "keel_requests_total")
        .into_iter()
        .filter(|(labels, _)| labels.get("direction").map(String::as_str) == Some(direction))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_overlap_either_way() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("a network");
        assert!(overlaps(&net("10.77.0.0/24"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.77.0.0/24")));
        assert!(!overlaps(&net("10.77.0.0/24"), &net("10.77.1.0/24")));
    }

    #[test]
    fn missing_binaries_name_the_build_command() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let error = Binaries::locate(Some(dir.path())).expect_err("nothing is built there");
        let text = error.to_string();
        assert!(text.contains("keel-proxy not found"), "{text}");
        assert!(text.contains("cargo build --release --workspace"), "{text}");
    }
}
