//! Pods as Linux network namespaces on one bridge: the plumbing that `keelctl demo` and keel's
//! cross-process tests (`keel-tests`) share, so that both build the same local mesh.
//!
//! One [`Network`] with suffix `S` is laid out as:
//!
//! ```text
//!   host namespace      keel-upS  (veth; the gateway address, e.g. 10.77.0.1/24)
//!                          |
//!   netns keel-S-hub    host0 ── keel-brS (bridge) ── p0 ── p1 ── ...   (veths)
//!                                                      |     |
//!   netns keel-S-<pod>                                eth0  eth0  (pod IP; routes via gateway)
//! ```
//!
//! Pods reach each other through the bridge and reach the host (where a control plane listens)
//! through the gateway address. Every pod routes its default route and the service VIP ranges
//! (10.96.0.0/16 unless told otherwise) via the gateway, so that a connection to a VIP leaves a
//! SYN that the pod's `OUTPUT` nat rules can redirect to its sidecar; a packet that really left
//! for a VIP would be dropped by the host (nothing here enables forwarding).
//!
//! The bridge lives in a namespace of its own, not in the host's: when `br_netfilter` is loaded,
//! bridged frames traverse the iptables of the namespace that owns the bridge
//! (`net.bridge.bridge-nf-call-iptables`), and a host firewall (Docker sets `FORWARD` to `DROP`)
//! would silently drop pod-to-pod traffic. In the hub namespace those sysctls are turned off and
//! its tables are empty, so the host's firewall only ever sees traffic addressed to the host
//! itself (its `INPUT` chain must accept the subnet for the control plane to be reachable).
//!
//! Pods are IPv4 only unless the network is built with [`NetworkBuilder::ipv6`]: without it IPv6
//! is disabled in the hub and in every pod. With it, each pod also gets an address of the given
//! /64 (the prefix plus the pod's host number in the IPv4 subnet, so 10.250.7.3 becomes
//! `<prefix>::3`) and routes all IPv6 on-link through `eth0`; the host takes no part in IPv6 (the
//! control plane stays reachable over IPv4 only), so every IPv6 address lives inside the
//! network's own namespaces.
//!
//! Everything created carries the network's suffix in its name, and removal ([`Network`]'s and
//! [`Pod`]'s `Drop`, [`remove_network`]) kills every process left in a namespace before deleting
//! it, so that nothing survives a panic. This module must never touch a namespace, link or
//! process whose name does not carry its own suffix, never change the host's sysctls or firewall,
//! and never run anything in the host namespace except `ip` itself.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

/// The uid keel's sidecar runs as; the redirect rules exempt it.
pub const PROXY_UID: u32 = 1337;

/// The service VIP range pods route via the gateway unless told otherwise (Kubernetes' usual
/// service CIDR).
pub const DEFAULT_SERVICE_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("10.96.0.0/16 is a valid network"),
};

/// Longest suffix: `keel-br` + suffix must fit the kernel's 15-character interface names.
const MAX_SUFFIX: usize = 8;
/// Longest pod name; namespace names are file names, but keep them readable.
const MAX_POD_NAME: usize = 40;
/// A file in every network's work directory, so that only those are ever removed as stale.
const WORKDIR_MARK: &str = ".keel-network";
/// How long removal waits for killed processes to leave a namespace.
const KILL_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "network namespace {0} already exists: another run is using this name, or a previous one \
         was killed before it could clean up (`ip netns delete {0}` removes it)"
    )]
    Exists(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Io { what, source }
}

/// Why this process cannot build networks, or `None` when it can: it must be root (namespaces,
/// veths and iptables need it) and find each of `tools` on `PATH`.
pub fn missing_requirements(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!(
            "not root (euid {euid}): network namespaces, veth links and iptables rules need root"
        ));
    }
    let missing: Vec<String> = tools
        .iter()
        .filter(|tool| find_on_path(tool).is_none())
        .map(|tool| match package_of(tool) {
            Some(package) => format!("`{tool}` (apt-get install {package})"),
            None => format!("`{tool}`"),
        })
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!("not found on PATH: {}", missing.join(", ")))
    }
}

fn package_of(tool: &str) -> Option<&'static str> {
    match tool {
        "ip" => Some("iproute2"),
        "iptables" | "ip6tables" => Some("iptables"),
        "curl" => Some("curl"),
        "setpriv" => Some("util-linux"),
        _ => None,
    }
}

/// The first executable file named `tool` in `PATH`.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Renders a command line for error messages.
fn render(command: &Command) -> String {
    let mut out = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `command` to completion; a non-zero exit is an error carrying its stderr.
fn run(command: &mut Command) -> Result<Output, NetnsError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: render(command),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(NetnsError::Command {
            command: render(command),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn ip<I, S>(args: I) -> Result<Output, NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").args(args))
}

/// Writes a sysctl inside namespace `netns` (sysctls under /proc/sys/net are per namespace and
/// read through the writer's own namespace). A key the kernel does not have (IPv6 compiled out,
/// br_netfilter not loaded) is left alone: there is nothing to turn off.
fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ip([
        "netns",
        "exec",
        netns,
        "sh",
        "-c",
        r#"if [ -e "$2" ]; then printf '%s\n' "$1" > "$2"; fi"#,
        "sh",
        value,
        &path,
    ])
    .map(drop)
}

/// Names of the network namespaces that exist.
fn list_namespaces() -> Result<Vec<String>, NetnsError> {
    let output = ip(["netns", "list"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The IPv4 addresses of the host namespace's interfaces: (device, address with its prefix).
pub fn host_addresses() -> Result<Vec<(String, Ipv4Net)>, NetnsError> {
    let output = ip(["-4", "-o", "addr", "show"])?;
    // "2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\ ..."
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip(1);
            let device = words.next()?;
            let mut words = words.skip_while(|w| *w != "inet").skip(1);
            let address = words.next()?.parse::<Ipv4Net>().ok()?;
            Some((device.to_owned(), address))
        })
        .collect())
}

/// Kills every process in `netns`, waits for them to leave it, then deletes it. A namespace that
/// is already gone is not an error.
fn delete_namespace(netns: &str) -> Result<(), NetnsError> {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = match ip(["netns", "pids", netns]) {
            Ok(output) => String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
                .collect::<Vec<_>>(),
            Err(_) if !Path::new("/run/netns").join(netns).exists() => return Ok(()),
            Err(e) => return Err(e),
        };
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions; the pid was just read from the
            // namespace we own, and an already-exited pid only yields ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match ip(["netns", "delete", netns]) {
        Ok(_) => Ok(()),
        Err(_) if !Path::new("/run/netns").join(netns).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a link of the host namespace; one that is already gone is not an error.
fn delete_host_link(name: &str) -> Result<(), NetnsError> {
    match ip(["link", "delete", "dev", name]) {
        Ok(_) => Ok(()),
        Err(_) if !Path::new("/sys/class/net").join(name).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

fn namespace_prefix(suffix: &str) -> String {
    format!("keel-{suffix}-")
}

fn hub_namespace(suffix: &str) -> String {
    format!("keel-{suffix}-hub")
}

fn uplink_name(suffix: &str) -> String {
    format!("keel-up{suffix}")
}

fn bridge_name(suffix: &str) -> String {
    format!("keel-br{suffix}")
}

/// The suffixes of the networks present on this machine (built by this module, by this process
/// or another, alive or left behind by one that was killed).
pub fn list_networks() -> Result<Vec<String>, NetnsError> {
    Ok(list_namespaces()?
        .into_iter()
        .filter_map(|name| {
            name.strip_prefix("keel-")
                .and_then(|rest| rest.strip_suffix("-hub"))
                .filter(|suffix| valid_suffix(suffix))
                .map(str::to_owned)
        })
        .collect())
}

/// Removes everything of the network with `suffix`: the processes in its namespaces, the
/// namespaces, the bridge and the host's uplink. Used by `Drop` and to clear what a killed run
/// left behind; the caller must know that no live run owns `suffix`.
pub fn remove_network(suffix: &str) -> Result<(), NetnsError> {
    if !valid_suffix(suffix) {
        return Err(invalid_suffix(suffix));
    }
    let prefix = namespace_prefix(suffix);
    let hub = hub_namespace(suffix);
    let mut first_error = None;
    // The uplink first: namespace deletion is asynchronous in the kernel, and its veth peer would
    // otherwise linger in the host for a moment after we return.
    if let Err(e) = delete_host_link(&uplink_name(suffix)) {
        first_error.get_or_insert(e);
    }
    for netns in list_namespaces()? {
        if netns.starts_with(&prefix)
            && netns != hub
            && let Err(e) = delete_namespace(&netns)
        {
            first_error.get_or_insert(e);
        }
    }
    if let Err(e) = delete_namespace(&hub) {
        first_error.get_or_insert(e);
    }
    remove_stale_workdirs(suffix);
    first_error.map_or(Ok(()), Err)
}

/// Removes work directories of networks with `suffix` that a killed run left in the temporary
/// directory; only directories carrying [`WORKDIR_MARK`] are touched. A live network's `TempDir`
/// tolerates its directory being gone already.
fn remove_stale_workdirs(suffix: &str) {
    let prefix = format!("keel-{suffix}-");
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(&prefix)
            && path.join(WORKDIR_MARK).is_file();
        if ours && let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), error = %e, "removing a stale work directory");
        }
    }
}

fn valid_suffix(suffix: &str) -> bool {
    (1..=MAX_SUFFIX).contains(&suffix.len())
        && suffix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn invalid_suffix(suffix: &str) -> NetnsError {
    NetnsError::Invalid {
        what: "network suffix",
        value: suffix.to_owned(),
        why: format!("1 to {MAX_SUFFIX} characters of a-z and 0-9"),
    }
}

/// How to build a [`Network`]; see [`Network::builder`].
#[derive(Debug, Clone)]
pub struct NetworkBuilder {
    suffix: String,
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    routed: Vec<Ipv4Net>,
    ipv6: Option<Ipv6Net>,
}

impl NetworkBuilder {
    /// Gives the network IPv6 too: every pod gets an address of `prefix` (a /64) beside its
    /// IPv4 address. See the module's comment.
    pub fn ipv6(mut self, prefix: Ipv6Net) -> Self {
        self.ipv6 = Some(prefix.trunc());
        self
    }

    /// The host-side address pods use as their gateway; default: the subnet's first address.
    pub fn gateway(mut self, gateway: Ipv4Addr) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// Another range pods route via the gateway (a VIP range besides 10.96.0.0/16).
    pub fn route(mut self, cidr: Ipv4Net) -> Self {
        if !self.routed.contains(&cidr.trunc()) {
            self.routed.push(cidr.trunc());
        }
        self
    }

    /// Creates the hub namespace, its bridge and the host's uplink. Fails if a namespace of this
    /// suffix already exists; on failure, whatever was created is removed.
    pub fn create(self) -> Result<Network, NetnsError> {
        if !valid_suffix(&self.suffix) {
            return Err(invalid_suffix(&self.suffix));
        }
        let subnet = self.subnet.trunc();
        if let Some(prefix) = self.ipv6
            && prefix.prefix_len() != 64
        {
            return Err(NetnsError::Invalid {
                what: "IPv6 prefix",
                value: prefix.to_string(),
                why: "must be a /64".to_owned(),
            });
        }
        if subnet.prefix_len() > 30 {
            return Err(NetnsError::Invalid {
                what: "subnet",
                value: subnet.to_string(),
                why: "needs room for a gateway and pods (at most /30)".to_owned(),
            });
        }
        let gateway = match self.gateway {
            Some(gateway) => gateway,
            None => subnet.hosts().next().ok_or_else(|| NetnsError::Invalid {
                what: "subnet",
                value: subnet.to_string(),
                why: "has no host addresses".to_owned(),
            })?,
        };
        if !host_address_of(&subnet, gateway) {
            return Err(NetnsError::Invalid {
                what: "gateway",
                value: gateway.to_string(),
                why: format!("must be a host address of {subnet}"),
            });
        }
        let hub = hub_namespace(&self.suffix);
        if list_namespaces()?
            .iter()
            .any(|n| n.starts_with(&namespace_prefix(&self.suffix)))
        {
            return Err(NetnsError::Exists(hub));
        }
        let workdir = tempfile::Builder::new()
            .prefix(&format!("keel-{}-", self.suffix))
            .tempdir()
            .map_err(io_error("creating the network's work directory"))?;
        for dir in [workdir.path().to_path_buf(), workdir.path().join("bin")] {
            fs::create_dir_all(&dir)
                .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)))
                .map_err(io_error(format!("preparing {}", dir.display())))?;
        }
        fs::write(workdir.path().join(WORKDIR_MARK), b"")
            .map_err(io_error("marking the network's work directory"))?;
        ip(["netns", "add", &hub])?;
        // From here on, dropping `network` removes whatever was created.
        let network = Network {
            bridge: bridge_name(&self.suffix),
            uplink: uplink_name(&self.suffix),
            hub,
            suffix: self.suffix,
            subnet,
            gateway,
            routed: self.routed,
            ipv6: self.ipv6,
            workdir,
            next_port: AtomicU32::new(0),
        };
        network.plumb()?;
        Ok(network)
    }
}

fn host_address_of(subnet: &Ipv4Net, address: Ipv4Addr) -> bool {
    subnet.contains(&address) && address != subnet.network() && address != subnet.broadcast()
}

/// A bridge with an address on the host, into which pods are plugged. Dropping it kills every
/// process in its pods and removes every namespace and link it created.
#[derive(Debug)]
pub struct Network {
    suffix: String,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    routed: Vec<Ipv4Net>,
    ipv6: Option<Ipv6Net>,
    hub: String,
    bridge: String,
    uplink: String,
    workdir: tempfile::TempDir,
    next_port: AtomicU32,
}

impl Network {
    /// A network named by `suffix` (1 to 8 characters of a-z0-9, unique among the networks alive
    /// on this machine) over `subnet`.
    pub fn builder(suffix: impl Into<String>, subnet: Ipv4Net) -> NetworkBuilder {
        NetworkBuilder {
            suffix: suffix.into(),
            subnet,
            gateway: None,
            routed: vec![DEFAULT_SERVICE_RANGE],
            ipv6: None,
        }
    }

    fn plumb(&self) -> Result<(), NetnsError> {
        let prefix = self.subnet.prefix_len().to_string();
        // Bridged frames must not go through any iptables (see the module's comment).
        for key in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
            "net.bridge.bridge-nf-call-arptables",
        ] {
            sysctl(&self.hub, key, "0")?;
        }
        if self.ipv6.is_none() {
            sysctl(&self.hub, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(&self.hub, "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        ip([
            "-n",
            &self.hub,
            "link",
            "add",
            &self.bridge,
            "type",
            "bridge",
        ])?;
        ip(["-n", &self.hub, "link", "set", "dev", &self.bridge, "up"])?;
        ip([
            "link",
            "add",
            &self.uplink,
            "type",
            "veth",
            "peer",
            "name",
            "host0",
            "netns",
            &self.hub,
        ])?;
        ip([
            "-n",
            &self.hub,
            "link",
            "set",
            "dev",
            "host0",
            "master",
            &self.bridge,
            "up",
        ])?;
        ip([
            "addr",
            "add",
            &format!("{}/{prefix}", self.gateway),
            "dev",
            &self.uplink,
        ])?;
        ip(["link", "set", "dev", &self.uplink, "up"])?;
        Ok(())
    }

    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The host's address on the network, the pods' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The network's IPv6 prefix, when it has IPv6.
    pub fn ipv6_prefix(&self) -> Option<Ipv6Net> {
        self.ipv6
    }

    /// The IPv6 address a pod at `ip` gets, when the network has IPv6: the prefix plus the
    /// pod's host number in the IPv4 subnet.
    pub fn ipv6_of(&self, ip: Ipv4Addr) -> Option<Ipv6Addr> {
        let prefix = self.ipv6?;
        let host = u32::from(ip).wrapping_sub(u32::from(self.subnet.network()));
        Some(Ipv6Addr::from(
            u128::from(prefix.network()) | u128::from(host),
        ))
    }

    /// The host's interface on the network.
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// A directory (mode 0755) that lives as long as the network: process logs and staged
    /// executables go here.
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// Makes `executable` runnable by any uid (the proxy's 1337 included) from a path that does
    /// not depend on the permissions of its original directory (a 0700 home, say), and immune to
    /// a rebuild while the network runs: hard-linked, or copied, into the work directory.
    pub fn stage_executable(&self, executable: &Path) -> Result<PathBuf, NetnsError> {
        let name = executable.file_name().ok_or_else(|| NetnsError::Invalid {
            what: "executable",
            value: executable.display().to_string(),
            why: "has no file name".to_owned(),
        })?;
        let staged = self.workdir.path().join("bin").join(name);
        if staged.exists() {
            return Ok(staged);
        }
        if fs::hard_link(executable, &staged).is_err() {
            fs::copy(executable, &staged)
                .map_err(io_error(format!("copying {}", executable.display())))?;
        }
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))
            .map_err(io_error(format!("making {} executable", staged.display())))?;
        Ok(staged)
    }

    /// Writes `contents` to `<workdir>/files/<name>` for the sidecars to read: world-readable
    /// when `secret` is false, else readable by the proxy's user (uid 1337) only.
    pub fn stage_file(
        &self,
        name: &str,
        contents: &[u8],
        secret: bool,
    ) -> Result<PathBuf, NetnsError> {
        let dir = self.workdir.path().join("files");
        fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)))
            .map_err(io_error(format!("preparing {}", dir.display())))?;
        let path = dir.join(name);
        let written = fs::write(&path, contents).and_then(|()| {
            if secret {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
                std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID))
            } else {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            }
        });
        written.map_err(io_error(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// Creates pod `name` (namespace `keel-<suffix>-<name>`) with address `ip` on the bridge:
    /// `lo` up, `eth0` with `ip`, the default route and the routed ranges via the gateway.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod, NetnsError> {
        let valid_name = (1..=MAX_POD_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && name != "hub";
        if !valid_name {
            return Err(NetnsError::Invalid {
                what: "pod name",
                value: name.to_owned(),
                why: format!("1 to {MAX_POD_NAME} characters of a-z, 0-9 and '-', not \"hub\""),
            });
        }
        if !host_address_of(&self.subnet, ip) || ip == self.gateway {
            return Err(NetnsError::Invalid {
                what: "pod address",
                value: ip.to_string(),
                why: format!(
                    "must be a host address of {} other than the gateway {}",
                    self.subnet, self.gateway
                ),
            });
        }
        let netns = format!("{}{name}", namespace_prefix(&self.suffix));
        if Path::new("/run/netns").join(&netns).exists() {
            return Err(NetnsError::Exists(netns));
        }
        ip_netns_add(&netns)?;
        let pod = Pod {
            name: name.to_owned(),
            netns,
            ip,
            ipv6: self.ipv6_of(ip),
            logs: self.workdir.path().to_path_buf(),
        };
        self.plumb_pod(&pod)?;
        Ok(pod)
    }

    fn plumb_pod(&self, pod: &Pod) -> Result<(), NetnsError> {
        let netns = pod.netns.as_str();
        if pod.ipv6.is_none() {
            sysctl(netns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(netns, "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let port = format!("p{}", self.next_port.fetch_add(1, Ordering::Relaxed));
        ip([
            "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ])?;
        ip([
            "-n",
            &self.hub,
            "link",
            "set",
            "dev",
            &port,
            "master",
            &self.bridge,
            "up",
        ])?;
        let address = format!("{}/{}", pod.ip, self.subnet.prefix_len());
        let gateway = self.gateway.to_string();
        ip(["-n", netns, "link", "set", "dev", "lo", "up"])?;
        ip(["-n", netns, "addr", "add", &address, "dev", "eth0"])?;
        ip(["-n", netns, "link", "set", "dev", "eth0", "up"])?;
        ip(["-n", netns, "route", "add", "default", "via", &gateway])?;
        if let Some(ipv6) = pod.ipv6 {
            // No duplicate address detection: the address is usable at once, and nobody else
            // on the bridge has it. Every IPv6 destination is on-link: a SYN to a service VIP
            // needs a route to leave, so that the pod's nat OUTPUT rules can redirect it.
            let address = format!("{ipv6}/64");
            ip(["-n", netns, "addr", "add", &address, "dev", "eth0", "nodad"])?;
            ip(["-n", netns, "-6", "route", "add", "default", "dev", "eth0"])?;
        }
        for cidr in &self.routed {
            if !self.subnet.contains(cidr) {
                ip([
                    "-n",
                    netns,
                    "route",
                    "add",
                    &cidr.to_string(),
                    "via",
                    &gateway,
                ])?;
            }
        }
        Ok(())
    }
}

fn ip_netns_add(netns: &str) -> Result<(), NetnsError> {
    ip(["netns", "add", netns]).map(drop)
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = remove_network(&self.suffix) {
            tracing::warn!(network = %self.suffix, error = %e, "removing the network failed");
        }
    }
}

/// A network namespace plugged into a [`Network`]. Dropping it kills every process in it and
/// deletes it (its veth goes with it).
#[derive(Debug)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    logs: PathBuf,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The namespace's file, for `setns(2)`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address, on a network with IPv6.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// `program` run as root inside the pod; add arguments and environment before spawning.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns])
            .arg(program.as_ref());
        command
    }

    /// `program` run inside the pod as `uid` (and gid `uid`), with no supplementary groups and
    /// no capabilities.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--inh-caps=-all", "--"])
            .arg(program.as_ref());
        command
    }

    /// `program` run inside the pod as the proxy's uid (1337), whose connections are not
    /// redirected.
    pub fn proxy_command(&self, program: impl AsRef<OsStr>) -> Command {
        self.command_as(PROXY_UID, program)
    }

    /// Runs `argv` as root inside the pod to completion. A non-zero exit is not an error here:
    /// the caller reads the status.
    pub fn exec<I, S>(&self, argv: I) -> Result<Output, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().ok_or_else(|| NetnsError::Invalid {
            what: "command",
            value: String::new(),
            why: "is empty".to_owned(),
        })?;
        let mut command = self.command(program);
        command.args(argv).stdin(Stdio::null());
        command.output().map_err(|source| NetnsError::Spawn {
            command: render(&command),
            source,
        })
    }

    /// Runs `argv` as root inside the pod in the background; see [`Pod::spawn_command`].
    pub fn spawn<I, S>(&self, label: &str, argv: I) -> Result<Process, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (program, args) = split_argv(argv)?;
        let mut command = self.command(program);
        command.args(args);
        self.spawn_command(label, command)
    }

    /// Runs `argv` as the proxy's uid inside the pod in the background.
    pub fn spawn_as_proxy<I, S>(&self, label: &str, argv: I) -> Result<Process, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (program, args) = split_argv(argv)?;
        let mut command = self.proxy_command(program);
        command.args(args);
        self.spawn_command(label, command)
    }

    /// Spawns `command` (built by [`Pod::command`] or [`Pod::proxy_command`]) with its output
    /// appended to `<workdir>/<pod>.<label>.log`. The returned guard kills it when dropped.
    pub fn spawn_command(&self, label: &str, mut command: Command) -> Result<Process, NetnsError> {
        let log = self.logs.join(format!("{}.{label}.log", self.name));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_error(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_error(format!("opening {}", log.display())))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| NetnsError::Spawn {
                command: render(&command),
                source,
            })?;
        Ok(Process {
            label: format!("{}/{label}", self.name),
            child,
            log,
        })
    }
}

fn split_argv<I, S>(argv: I) -> Result<(OsString, Vec<OsString>), NetnsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut argv = argv.into_iter().map(|a| a.as_ref().to_owned());
    let program = argv.next().ok_or_else(|| NetnsError::Invalid {
        what: "command",
        value: String::new(),
        why: "is empty".to_owned(),
    })?;
    Ok((program, argv.collect()))
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Err(e) = delete_namespace(&self.netns) {
            tracing::warn!(pod = %self.netns, error = %e, "removing the pod's namespace failed");
        }
    }
}

/// A background process in a pod. Dropping it kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Process {
    label: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// `<pod>/<label>`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its output (at most the last 64 KiB of the log).
    pub fn log_tail(&self, lines: usize) -> String {
        const WINDOW: u64 = 64 * 1024;
        let mut text = String::new();
        let read = File::open(&self.log).and_then(|mut file| {
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) => {
                let all = String::from_utf8_lossy(&bytes);
                let kept: Vec<&str> = all.lines().rev().take(lines).collect();
                for line in kept.into_iter().rev() {
                    let _ = writeln!(text, "{line}");
                }
            }
            Err(e) => {
                let _ = writeln!(text, "(cannot read {}: {e})", self.log.display());
            }
        }
        text
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends it `signal` (e.g. `libc::SIGTERM`); an error if it has already exited (its pid may
    /// belong to another process by now).
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if let Some(status) = self.exited() {
            return Err(io::Error::other(format!(
                "{} already exited ({status})",
                self.label
            )));
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        // SAFETY: kill has no memory-safety preconditions; the child is ours and not reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
