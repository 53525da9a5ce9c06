//! Pods as network namespaces for tests: a fresh network per test, pods with a real sidecar
//! (`keel-proxy init` then `keel-proxy run` as uid 1337), and sockets opened inside a pod from the
//! test process itself, so that servers and clients need no binaries of their own.
//!
//! The namespace plumbing is `keel_control_plane::demo::netns`, shared with `keelctl demo`; this
//! module adds what only tests need: names and subnets that never collide between tests running
//! in parallel (in one process or several), the removal of what a killed test process left behind,
//! and [`require_root`], which every root test calls first so that it prints `SKIP: <reason>`
//! instead of passing silently (or fails, with `KEEL_REQUIRE_NETNS=1`, as in CI):
//!
//! ```text
//! #[tokio::test]
//! async fn needs_namespaces() -> anyhow::Result<()> {
//!     keel_tests::skip_unless_root!();
//!     let net = keel_tests::netns::TestNetwork::create()?;
//!     ...
//! }
//! ```
//!
//! It must never remove a network that a live process owns, never use an address already present
//! on the host, and never run a command in the host namespace other than `ip`.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ipnet::{Ipv4Net, Ipv6Net};

pub use keel_control_plane::demo::metrics::{Labels, Metrics, Sample, scrape};
pub use keel_control_plane::demo::netns::{
    DEFAULT_SERVICE_RANGE, NetnsError, Network, NetworkBuilder, PROXY_UID, Pod, Process,
    list_networks, remove_network,
};

/// Tools the root tests run.
const TOOLS: [&str; 4] = ["ip", "iptables", "setpriv", "curl"];
/// Serializes subnet choice and network creation between test processes.
const LOCK_FILE: &str = "/run/keel-tests-netns.lock";
/// Test networks take a /24 of 10.250.0.0/16.
const POOL: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);
/// Width of the base-36 pid at the start of a test network's suffix (36^5 > Linux's pid_max).
const PID_WIDTH: usize = 5;
/// Width of the base-36 counter after it.
const COUNTER_WIDTH: usize = 2;
/// The sidecars' admin port.
pub const ADMIN_PORT: u16 = 15020;
/// The IPv6 prefix of dual-stack test networks (fd00:6b65:656c is "keel" in ASCII).
pub const IPV6_PREFIX: Ipv6Net =
    match Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x6b65, 0x656c, 0, 0, 0, 0, 0), 64) {
        Ok(net) => net,
        Err(_) => panic!("a /64 is a valid prefix"),
    };

/// Why the root tests cannot run here (not root, or a tool missing), or `None` when they can.
pub fn require_root() -> Option<String> {
    keel_control_plane::demo::netns::missing_requirements(&TOOLS)
}

/// The environment variable that turns a skipped root test into a failed one when set to `1`,
/// as `.ci/run` does: there the network-namespace tests must run.
pub const REQUIRE_NETNS: &str = "KEEL_REQUIRE_NETNS";

/// What a root test returns when it cannot run because of `why`: `Ok(())` after printing
/// `SKIP: <why>` to stderr, or, with [`REQUIRE_NETNS`]`=1`, an error saying so.
pub fn skip(why: &str) -> anyhow::Result<()> {
    if std::env::var_os(REQUIRE_NETNS).is_some_and(|v| v == "1") {
        bail!("this test cannot run here ({why}), and {REQUIRE_NETNS}=1 requires it to");
    }
    eprintln!("SKIP: {why}");
    Ok(())
}

/// Returns [`skip`]'s answer from the calling test (which returns `anyhow::Result<()>`) when
/// [`require_root`] gives a reason.
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if let Some(why) = $crate::netns::require_root() {
            return $crate::netns::skip(&why);
        }
    };
}

fn base36(mut n: u64, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for slot in digits.iter_mut().rev() {
        let digit = (n % 36) as u8;
        *slot = if digit < 10 {
            b'0' + digit
        } else {
            b'a' + digit - 10
        };
        n /= 36;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

fn parse_base36(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 36).ok()
}

/// The pid that created a test network, from its suffix.
fn owner_of(suffix: &str) -> Option<u32> {
    if suffix.len() != PID_WIDTH + COUNTER_WIDTH {
        return None;
    }
    parse_base36(&suffix[..PID_WIDTH]).and_then(|pid| u32::try_from(pid).ok())
}

/// Removes test networks whose creator is gone: any with a dead pid, and (once per process, before
/// it creates its first) any with this process's own pid, left by an earlier process that had it.
fn remove_stale_networks() -> anyhow::Result<()> {
    static OWN_PID_SWEPT: Once = Once::new();
    let me = std::process::id();
    let mut sweep_own = false;
    OWN_PID_SWEPT.call_once(|| sweep_own = true);
    for suffix in list_networks()? {
        let Some(pid) = owner_of(&suffix) else {
            continue;
        };
        let stale = if pid == me {
            sweep_own
        } else {
            !Path::new("/proc").join(pid.to_string()).exists()
        };
        if stale {
            remove_network(&suffix)
                .with_context(|| format!("removing the stale test network {suffix}"))?;
        }
    }
    Ok(())
}

/// An exclusive `flock` on [`LOCK_FILE`], released on drop.
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
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("locking the test network registry");
        }
        Ok(Lock { _file: file })
    }
}

/// A [`Network`] for one test: its own suffix (`<pid><counter>` in base 36) and its own /24 of
/// 10.250.0.0/16, free on the host when it was taken. Dereferences to the [`Network`].
#[derive(Debug)]
pub struct TestNetwork {
    network: Network,
}

impl Deref for TestNetwork {
    type Target = Network;
    fn deref(&self) -> &Network {
        &self.network
    }
}

impl TestNetwork {
    /// Creates the network, routing 10.96.0.0/16 (service VIPs) from its pods via the gateway.
    /// Its pods are IPv4 only.
    pub fn create() -> anyhow::Result<TestNetwork> {
        TestNetwork::create_with(None)
    }

    /// Like [`TestNetwork::create`], with IPv6 as well: every pod also gets an address of
    /// [`IPV6_PREFIX`] (`<prefix>::<host number>`, see [`Network::ipv6_of`]). The prefix is the
    /// same for every test network: IPv6 never leaves a network's own namespaces.
    pub fn create_dual_stack() -> anyhow::Result<TestNetwork> {
        TestNetwork::create_with(Some(IPV6_PREFIX))
    }

    fn create_with(ipv6: Option<Ipv6Net>) -> anyhow::Result<TestNetwork> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        ensure!(
            u64::from(count) < 36u64.pow(COUNTER_WIDTH as u32),
            "one test process created too many networks"
        );
        let pid = std::process::id();
        let suffix = format!(
            "{}{}",
            base36(u64::from(pid), PID_WIDTH),
            base36(u64::from(count), COUNTER_WIDTH)
        );
        let _lock = Lock::take()?;
        remove_stale_networks()?;
        let taken: Vec<Ipv4Net> = keel_control_plane::demo::netns::host_addresses()?
            .into_iter()
            .map(|(_, net)| net)
            .collect();
        let start = (pid as usize).wrapping_add(count as usize);
        let subnet = (0..256)
            .map(|i| {
                let third = ((start + i) % 256) as u8;
                let [a, b, _, _] = POOL.octets();
                Ipv4Net::new(Ipv4Addr::new(a, b, third, 0), 24).map(|n| n.trunc())
            })
            .filter_map(Result::ok)
            .find(|candidate| {
                taken
                    .iter()
                    .all(|t| !t.contains(&candidate.network()) && !candidate.contains(&t.network()))
            })
            .context("every /24 of 10.250.0.0/16 is in use on this host")?;
        let mut builder = Network::builder(suffix, subnet);
        if let Some(prefix) = ipv6 {
            builder = builder.ipv6(prefix);
        }
        let network = builder.create()?;
        Ok(TestNetwork { network })
    }

    /// The subnet's address number `n` (the gateway is 1).
    pub fn host(&self, n: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet().network().octets();
        Ipv4Addr::new(a, b, c, n)
    }

    /// Creates pod `name` at `ip` with a sidecar: `keel-proxy init` (as root, in the pod), then
    /// `keel-proxy run` as uid 1337. Does not wait for it to be ready.
    pub fn add_meshed_pod(
        &self,
        name: &str,
        ip: Ipv4Addr,
        sidecar: &Sidecar<'_>,
    ) -> anyhow::Result<MeshedPod> {
        self.add_meshed_pod_with(name, ip, sidecar, &[])
    }

    /// [`TestNetwork::add_meshed_pod`] with `run_args` added to `keel-proxy run`'s flags (e.g.
    /// `--shutdown-grace 2s`).
    pub fn add_meshed_pod_with(
        &self,
        name: &str,
        ip: Ipv4Addr,
        sidecar: &Sidecar<'_>,
        run_args: &[&str],
    ) -> anyhow::Result<MeshedPod> {
        let proxy_bin = self.stage_executable(&proxy_binary()?)?;
        let pod = self.add_pod(name, ip)?;
        let init = pod.exec([proxy_bin.as_os_str(), "init".as_ref()])?;
        ensure!(
            init.status.success(),
            "keel-proxy init in {name} failed ({}): {}",
            init.status,
            String::from_utf8_lossy(&init.stderr).trim()
        );
        let mut run = pod.proxy_command(&proxy_bin);
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("KEEL_") {
                run.env_remove(variable);
            }
        }
        match &sidecar.identity {
            Some(identity) => {
                run.args(["run", "--control-plane"])
                    .arg(format!("https://{}", identity.secure_addr))
                    .arg("--ca-root-file")
                    .arg(identity.root_file)
                    .arg("--identity-token-file")
                    .arg(identity.token_file)
                    .args(["--trust-domain", identity.trust_domain]);
            }
            None => {
                run.args(["run", "--control-plane"])
                    .arg(format!("http://{}", sidecar.control_plane));
            }
        }
        let pod_ips = match pod.ipv6() {
            Some(ipv6) => format!("{ip},{ipv6}"),
            None => ip.to_string(),
        };
        run.args(["--workload", sidecar.workload])
            .args(["--namespace", sidecar.namespace])
            .args(["--service-account", sidecar.service_account])
            .arg("--pod-ip")
            .arg(pod_ips)
            .args(["--region", sidecar.region, "--zone", sidecar.zone])
            .args(run_args)
            .env("KEEL_LOG", sidecar.log);
        let proxy = pod.spawn_command("proxy", run)?;
        Ok(MeshedPod { proxy, pod })
    }
}

/// How a pod's sidecar describes itself to the control plane.
#[derive(Debug, Clone, Copy)]
pub struct Sidecar<'a> {
    /// The control plane's plaintext discovery address (on the network's gateway), used when
    /// the sidecar has no identity.
    pub control_plane: SocketAddr,
    /// With an identity, the sidecar talks to the secure port, gets a certificate and speaks
    /// mTLS to other sidecars.
    pub identity: Option<SidecarIdentity<'a>>,
    pub workload: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
    /// The proxy's log filter (`KEEL_LOG`).
    pub log: &'a str,
}

/// A background task aborted when dropped (servers a test runs inside pods).
#[derive(Debug)]
pub struct Task(pub tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What sidecars need to get certificates from a control plane's CA, staged on a network.
#[derive(Debug, Clone)]
pub struct StagedIdentity {
    pub secure_addr: SocketAddr,
    /// The CA's roots, PEM.
    pub root_file: PathBuf,
    pub trust_domain: String,
    tokens: std::sync::Arc<keel_control_plane::identity::BootstrapTokens>,
}

impl StagedIdentity {
    /// Stages `namespace/name`'s bootstrap token for its sidecar; returns its path.
    pub fn token_file(
        &self,
        net: &Network,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        Ok(net.stage_file(
            &format!("{namespace}.{name}.token"),
            self.tokens.mint(namespace, name).as_bytes(),
            true,
        )?)
    }

    /// The sidecar settings for `token_file`.
    pub fn sidecar<'a>(&'a self, token_file: &'a Path) -> SidecarIdentity<'a> {
        SidecarIdentity {
            secure_addr: self.secure_addr,
            root_file: &self.root_file,
            token_file,
            trust_domain: &self.trust_domain,
        }
    }
}

impl TestNetwork {
    /// Starts a control plane on the YAML directory `dir`, with its discovery and identity
    /// ports on the bridge's gateway (where the pods reach it) and an ephemeral CA, so every
    /// hop between sidecars is mTLS, as a mesh runs.
    pub async fn start_control_plane(
        &self,
        dir: &Path,
    ) -> anyhow::Result<keel_control_plane::ControlPlane> {
        use keel_control_plane::server::IdentityConfig;
        use keel_control_plane::{ControlPlane, ControlPlaneConfig};
        ControlPlane::start(ControlPlaneConfig {
            config_dir: dir.to_path_buf(),
            discovery_addr: SocketAddr::from((self.gateway(), 0)),
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            identity: Some(IdentityConfig::ephemeral(SocketAddr::from((
                self.gateway(),
                0,
            )))),
        })
        .await
        .context("starting the control plane")
    }

    /// Stages `control_plane`'s CA roots for sidecars to read; tokens are staged per pod.
    pub fn stage_identity(
        &self,
        control_plane: &keel_control_plane::ControlPlane,
        trust_domain: &str,
    ) -> anyhow::Result<StagedIdentity> {
        let ca = control_plane
            .ca
            .as_ref()
            .context("the control plane runs no CA")?;
        let tokens = control_plane
            .tokens
            .clone()
            .context("the control plane does not use bootstrap tokens")?;
        let secure_addr = control_plane
            .secure_addr
            .context("the control plane has no secure port")?;
        let root_file = self.stage_file(
            "roots.pem",
            keel_control_plane::identity::ca::bundle_pem(&ca.bundle()).as_bytes(),
            false,
        )?;
        Ok(StagedIdentity {
            secure_addr,
            root_file,
            trust_domain: trust_domain.to_owned(),
            tokens,
        })
    }

    /// Creates meshed pods whose sidecars get their identity from `control_plane`'s CA: each
    /// workload's bootstrap token and the CA's roots are staged for the sidecar to read, and the
    /// sidecar talks to the secure port. Every pod is in `namespace`, runs as the service
    /// account of its name, in region `local` and `zone`. Does not wait for the sidecars to be
    /// ready.
    pub fn add_certified_pods(
        &self,
        control_plane: &keel_control_plane::ControlPlane,
        trust_domain: &str,
        namespace: &str,
        pods: &[(&str, Ipv4Addr)],
        zone: &str,
        log: &str,
    ) -> anyhow::Result<Vec<MeshedPod>> {
        self.add_certified_pods_with(control_plane, trust_domain, namespace, pods, zone, log, &[])
    }

    /// [`TestNetwork::add_certified_pods`] with `run_args` added to every sidecar's flags.
    #[allow(clippy::too_many_arguments)]
    pub fn add_certified_pods_with(
        &self,
        control_plane: &keel_control_plane::ControlPlane,
        trust_domain: &str,
        namespace: &str,
        pods: &[(&str, Ipv4Addr)],
        zone: &str,
        log: &str,
        run_args: &[&str],
    ) -> anyhow::Result<Vec<MeshedPod>> {
        let identity = self.stage_identity(control_plane, trust_domain)?;
        let mut meshed = Vec::with_capacity(pods.len());
        for (name, ip) in pods {
            let token_file = identity.token_file(self, namespace, name)?;
            let sidecar = Sidecar {
                control_plane: control_plane.discovery_addr,
                identity: Some(identity.sidecar(&token_file)),
                workload: name,
                namespace,
                service_account: name,
                region: "local",
                zone,
                log,
            };
            meshed.push(self.add_meshed_pod_with(name, *ip, &sidecar, run_args)?);
        }
        Ok(meshed)
    }
}

/// What a sidecar needs for its identity.
#[derive(Debug, Clone, Copy)]
pub struct SidecarIdentity<'a> {
    /// The control plane's secure port.
    pub secure_addr: SocketAddr,
    /// The CA's roots, PEM (see [`Network::stage_file`]).
    pub root_file: &'a Path,
    /// The workload's bootstrap token, readable by the proxy's user.
    pub token_file: &'a Path,
    pub trust_domain: &'a str,
}

/// `keel-proxy`, built by cargo next to the test binaries (`target/<profile>/keel-proxy`), or
/// next to the running binary itself (a benchmark in `target/<profile>/`).
pub fn proxy_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("keel-proxy", "keel-proxy")
}

/// A binary of the workspace, built by cargo next to the test binaries
/// (`target/<profile>/<name>`) or next to the running binary itself (a benchmark in
/// `target/<profile>/`); `package` says how to build it.
pub fn workspace_binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the test binary")?;
    let beside = exe.parent().map(|dir| dir.join(name));
    if let Some(binary) = beside.filter(|p| p.is_file()) {
        return Ok(binary);
    }
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in target/<profile>/deps")?;
    let binary = profile_dir.join(name);
    if binary.is_file() {
        Ok(binary)
    } else {
        bail!(
            "{} does not exist: build it with `cargo build -p {package}` (`cargo test \
             --workspace` builds it too)",
            binary.display()
        )
    }
}

/// A pod running a sidecar. Fields drop in order: the proxy, then the pod.
#[derive(Debug)]
pub struct MeshedPod {
    pub proxy: Process,
    pub pod: Pod,
}

impl Deref for MeshedPod {
    type Target = Pod;
    fn deref(&self) -> &Pod {
        &self.pod
    }
}

impl MeshedPod {
    /// The sidecar's admin address (`/ready`, `/metrics`), reachable from the host.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.pod.ip(), ADMIN_PORT))
    }

    /// Waits for `GET /ready` to answer 200; fails at once if the proxy exits.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let url: http::Uri = format!("http://{}/ready", self.admin()).parse()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.proxy.exited() {
                bail!(
                    "the sidecar of {} exited ({status}):\n{}",
                    self.pod.name(),
                    self.proxy.log_tail(40)
                );
            }
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(
                    http::Request::get(url.clone())
                        .body(Empty::<Bytes>::new())
                        .context("building GET /ready")?,
                ),
            )
            .await;
            if let Ok(Ok(response)) = answer
                && response.status() == http::StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the sidecar of {} is not ready after {within:?}:\n{}",
                    self.pod.name(),
                    self.proxy.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sidecar's metrics now.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        scrape(self.admin())
            .await
            .with_context(|| format!("scraping the sidecar of {}", self.pod.name()))
    }

    /// The last lines of the sidecar's log, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} ({}):\n{}",
            self.proxy.label(),
            self.proxy.log_path().display(),
            self.proxy.log_tail(40)
        )
    }
}

/// Runs `f` on a new thread that has entered the network namespace at `netns` (a file under
/// /run/netns); sockets it creates live in that namespace for good, whichever thread uses them
/// afterwards.
pub fn in_netns<R, F>(netns: &Path, f: F) -> anyhow::Result<R>
where
    R: Send + 'static,
    F: FnOnce() -> io::Result<R> + Send + 'static,
{
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let netns = File::open(&path)?;
        // SAFETY: setns changes only this thread's network namespace; the descriptor is open
        // for the duration of the call. The thread ends after `f`.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread entering {} panicked", netns.display()))?
    .with_context(|| format!("inside {}", netns.display()))
}

/// [`in_netns`] for a pod.
pub fn in_pod<R, F>(pod: &Pod, f: F) -> anyhow::Result<R>
where
    R: Send + 'static,
    F: FnOnce() -> io::Result<R> + Send + 'static,
{
    in_netns(&pod.netns_path(), f)
}

/// A listener bound to `addr` inside `pod` (call within a tokio runtime).
pub fn listen(pod: &Pod, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = in_pod(pod, move || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .with_context(|| format!("listening on {addr} in {}", pod.name()))?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

/// A connection to `addr` opened inside the namespace at `netns` by root, so redirected through
/// the pod's sidecar when it has one. Takes a path rather than a [`Pod`] so that connectors
/// (tonic's, hyper's) can own what they need.
pub async fn connect_from(netns: &Path, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv6() {
        in_netns(netns, tokio::net::TcpSocket::new_v6)?
    } else {
        in_netns(netns, tokio::net::TcpSocket::new_v4)?
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} from {}: timed out", netns.display()))?
        .with_context(|| format!("connecting to {addr} from {}", netns.display()))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// [`connect_from`] a pod.
pub async fn connect(pod: &Pod, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    connect_from(&pod.netns_path(), addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skips, when run by `a_skip_fails_where_netns_tests_are_required` (else does nothing).
    #[test]
    fn skip_probe() -> anyhow::Result<()> {
        if std::env::var_os("KEEL_SKIP_PROBE").is_some() {
            return skip("probing");
        }
        Ok(())
    }

    #[test]
    fn a_skip_fails_where_netns_tests_are_required() -> anyhow::Result<()> {
        let probe = |require: Option<&str>| -> anyhow::Result<std::process::Output> {
            let mut command = std::process::Command::new(std::env::current_exe()?);
            command
                .args(["--exact", "netns::tests::skip_probe", "--nocapture"])
                .env("KEEL_SKIP_PROBE", "1")
                .env_remove(REQUIRE_NETNS);
            if let Some(value) = require {
                command.env(REQUIRE_NETNS, value);
            }
            Ok(command.output()?)
        };
        for require in [None, Some("0")] {
            let output = probe(require)?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(output.status.success(), "{require:?}: {stderr}");
            ensure!(stderr.contains("SKIP: probing"), "{require:?}: {stderr}");
        }
        let output = probe(Some("1"))?;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        ensure!(!output.status.success(), "a required skip passed: {all}");
        ensure!(
            all.contains("KEEL_REQUIRE_NETNS=1 requires it"),
            "the failure does not say why: {all}"
        );
        Ok(())
    }

    #[test]
    fn suffixes_encode_their_owner() {
        let suffix = format!(
            "{}{}",
            base36(4_194_303, PID_WIDTH),
            base36(35, COUNTER_WIDTH)
        );
        assert_eq!(suffix.len(), 7);
        assert_eq!(owner_of(&suffix), Some(4_194_303));
        assert_eq!(owner_of("demo"), None);
        assert_eq!(base36(0, 2), "00");
        assert_eq!(base36(36, 2), "10");
    }
}
