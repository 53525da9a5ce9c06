//! `keel-proxy init` as a process, against a real kernel.
//!
//! The first tests need neither root nor iptables: they run the binary with a `PATH` on which no
//! iptables can be found, so that even a regression could not change the host's tables. The
//! namespace test needs root, `ip` and `iptables`; without them it prints `SKIP: <reason>` and
//! passes (fails, with `KEEL_REQUIRE_NETNS=1`). It only ever programs network namespaces it created (deleted on every exit path), and
//! only sends traffic between addresses that live in those namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_keel-proxy");

/// A `PATH` with no iptables on it.
const NO_TOOLS: &str = "/nonexistent-keel-init-test";

/// The rules the default flags install, in `iptables-save` form.
const DEFAULT_RULES: &str = "\
# keel-proxy init --dry-run: iptables (IPv4); nothing was changed
*nat
:KEEL_INBOUND - [0:0]
:KEEL_INBOUND_REDIRECT - [0:0]
:KEEL_OUTBOUND - [0:0]
:KEEL_OUTBOUND_REDIRECT - [0:0]
-A PREROUTING -p tcp -j KEEL_INBOUND
-A OUTPUT -p tcp -j KEEL_OUTBOUND
-A KEEL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A KEEL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A KEEL_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A KEEL_INBOUND -j KEEL_INBOUND_REDIRECT
-A KEEL_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A KEEL_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A KEEL_OUTBOUND -o lo -j RETURN
-A KEEL_OUTBOUND -j KEEL_OUTBOUND_REDIRECT
-A KEEL_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

fn keel_proxy(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("PATH", NO_TOOLS)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEEL_") {
            command.env_remove(name);
        }
    }
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn dry_run_prints_the_default_rules_without_root_or_iptables() -> anyhow::Result<()> {
    let output = keel_proxy(&["init", "--dry-run", "--ipv6", "off"]).output()?;
    ensure!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), DEFAULT_RULES);

    // The same through the environment, with an empty list meaning none.
    let output = keel_proxy(&["init"])
        .env("KEEL_INIT_DRY_RUN", "1")
        .env("KEEL_IPV6", "off")
        .env("KEEL_OUTBOUND_EXCLUDE_PORTS", "")
        .output()?;
    ensure!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), DEFAULT_RULES);
    Ok(())
}

#[test]
fn invalid_flags_are_refused_before_anything_runs() -> anyhow::Result<()> {
    for (args, says) in [
        (
            &["init", "--outbound-exclude-ports", "25,70000"][..],
            "`70000` is not a TCP port: expected a number from 1 to 65535",
        ),
        (
            &["init", "--outbound-exclude-cidrs", "10.96.0.0/33"][..],
            "`10.96.0.0/33` is not an address block",
        ),
        (
            &["init", "--inbound-ports", "9000-8000"][..],
            "the first port must not be above the last",
        ),
        (
            &["init", "--ipv6", "maybe"][..],
            "possible values: auto, on, off",
        ),
    ] {
        let output = keel_proxy(args).output()?;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let output = keel_proxy(&["init", "--inbound-port", "15020"]).output()?;
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--inbound-port and --admin-port are both 15020"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_missing_iptables_is_named_with_what_to_install() -> anyhow::Result<()> {
    for args in [&["init", "--ipv6", "off"][..], &["init", "--cleanup"][..]] {
        let output = keel_proxy(args).output()?;
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        assert!(
            stderr.contains("`iptables` was not found on PATH")
                && stderr.contains("install the iptables package"),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The namespace test.

/// Why the namespace test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not root: creating network namespaces and programming iptables need root".into(),
        );
    }
    for tool in ["ip", "iptables", "iptables-save"] {
        if find_on_path(tool).is_none() {
            return Some(format!(
                "`{tool}` is not on PATH (apt-get install iptables iproute2)"
            ));
        }
    }
    None
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}

/// Runs a command to completion; an error carries its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .with_context(|| format!("running {program}"))?;
    succeeded(&output).with_context(|| format!("{program} {}", args.join(" ")))
}

fn succeeded(output: &Output) -> anyhow::Result<String> {
    ensure!(
        output.status.success(),
        "{}: {}{}",
        output.status,
        text(&output.stderr),
        text(&output.stdout)
    );
    Ok(text(&output.stdout))
}

/// A network namespace this test created; deleted when dropped, whatever happened.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `program` inside the namespace.
    fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn init(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["init"];
        all.extend_from_slice(args);
        self.exec(BIN, &all)
    }

    /// Runs `work` on a thread of its own that has entered the namespace: sockets it creates
    /// and processes it spawns live there.
    fn enter<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let namespace = File::open(self.path())?;
        std::thread::spawn(move || {
            // SAFETY: the descriptor is open for the duration of the call; setns changes the
            // namespace of this thread only, and the thread ends with `work`.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("setns");
            }
            work()
        })
        .join()
        .map_err(|_| anyhow!("a thread inside the namespace panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!(
                "could not delete network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Self::V4 => "iptables-save",
            Self::V6 => "ip6tables-save",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

/// A `nat` table as `iptables-save` prints it, without its counters: the chain declarations,
/// and each chain's rules in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NatTable {
    chains: BTreeSet<String>,
    rules: BTreeMap<String, Vec<String>>,
}

impl NatTable {
    fn parse(save: &str) -> Self {
        let mut table = Self::default();
        for line in save.lines() {
            if let Some(chain) = line.strip_prefix(':') {
                // ":OUTPUT ACCEPT [12:720]" -> ":OUTPUT ACCEPT"
                let declared = chain.rsplit_once(' ').map_or(chain, |(head, _)| head);
                table.chains.insert(declared.to_owned());
            } else if line.starts_with("-A ") {
                let chain = line.split_whitespace().nth(1).unwrap_or_default();
                table
                    .rules
                    .entry(chain.to_owned())
                    .or_default()
                    .push(line.to_owned());
            }
        }
        table
    }

    /// This table with `keel`'s appended: its chains declared and its rules after the rules
    /// already in each chain.
    fn with(&self, keel: &NatTable) -> Self {
        let mut table = self.clone();
        table.chains.extend(keel.chains.iter().cloned());
        for (chain, rules) in &keel.rules {
            table
                .rules
                .entry(chain.clone())
                .or_default()
                .extend(rules.iter().cloned());
        }
        table
    }

    fn keel_free(&self) -> bool {
        !self.chains.iter().any(|c| c.contains("KEEL_"))
            && !self
                .rules
                .values()
                .flatten()
                .any(|rule| rule.contains("KEEL_"))
    }
}

fn dump(ns: &NetNs, family: Family) -> anyhow::Result<NatTable> {
    Ok(NatTable::parse(&ns.exec(family.save(), &["-t", "nat"])?))
}

/// Splits `init --dry-run` output into one table per family.
fn dry_run_tables(output: &str) -> BTreeMap<&'static str, NatTable> {
    let mut blocks: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut current = None;
    for line in output.lines() {
        if line.starts_with("# keel-proxy init --dry-run: iptables ") {
            current = Some("iptables");
        } else if line.starts_with("# keel-proxy init --dry-run: ip6tables ") {
            current = Some("ip6tables");
        } else if let Some(binary) = current {
            let block = blocks.entry(binary).or_default();
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
        .into_iter()
        .map(|(binary, block)| (binary, NatTable::parse(&block)))
        .collect()
}

/// Asserts that each family's table is exactly `baseline` plus keel's dry-run rules.
fn assert_installed(
    pod: &NetNs,
    families: &[Family],
    baseline: &BTreeMap<&'static str, NatTable>,
    planned: &BTreeMap<&'static str, NatTable>,
    when: &str,
) -> anyhow::Result<()> {
    for family in families {
        let name = family.iptables();
        let live = dump(pod, *family)?;
        let keel = planned
            .get(name)
            .ok_or_else(|| anyhow!("the dry run planned nothing for {name}"))?;
        let base = baseline
            .get(name)
            .ok_or_else(|| anyhow!("no baseline for {name}"))?;
        assert_eq!(live, base.with(keel), "{name} nat table {when}");
    }
    Ok(())
}

struct Listeners(Vec<(&'static str, TcpListener)>);

impl Listeners {
    fn add(&mut self, ns: &NetNs, name: &'static str, port: u16, v6: bool) -> anyhow::Result<()> {
        let any: IpAddr = if v6 {
            "::".parse()?
        } else {
            "0.0.0.0".parse()?
        };
        let listener = ns.enter(move || {
            let listener = TcpListener::bind((any, port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        self.0.push((name, listener));
        Ok(())
    }

    /// Connects from inside `from` (as `uid`, if given) to `to`, and returns the name of the
    /// listener, in either namespace, that accepted the connection, with the accepted socket.
    fn connect(
        &self,
        from: &NetNs,
        uid: Option<u32>,
        to: SocketAddr,
    ) -> anyhow::Result<(&'static str, TcpStream)> {
        let client = from
            .enter(move || {
                if let Some(uid) = uid {
                    // The raw syscall changes this thread's credentials only; glibc's
                    // setresuid would change every thread of the test process. The socket
                    // records them when created, which is what `-m owner` matches.
                    // SAFETY: plain integer arguments; the thread ends after the connect.
                    let failed = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } != 0;
                    if failed {
                        return Err(io::Error::last_os_error()).context("setresuid");
                    }
                }
                Ok(TcpStream::connect_timeout(&to, Duration::from_secs(3))?)
            })
            .with_context(|| format!("connecting to {to} as uid {uid:?}"))?;
        let source = canonical(client.local_addr()?);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            for (name, listener) in &self.0 {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        ensure!(
                            canonical(peer) == source,
                            "{name} accepted a connection from {peer}, expected one from {source}"
                        );
                        return Ok((name, stream));
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error).context(*name),
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no listener accepted the connection from {source} to {to}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn addr(text: &str) -> anyhow::Result<SocketAddr> {
    text.parse().with_context(|| format!("test address {text}"))
}

/// Connects and asserts which listener accepted the connection; when that is one of the
/// proxy's, also that [`keel_proxy::transparent::original_dst`] gives back the address the client
/// dialled, in the family it was dialled in.
fn expect_arrival(
    listeners: &Listeners,
    from: &NetNs,
    uid: Option<u32>,
    to: &str,
    expected: &'static str,
) -> anyhow::Result<()> {
    let to = addr(to)?;
    let (listener, accepted) = listeners.connect(from, uid, to)?;
    assert_eq!(listener, expected, "connection to {to} as uid {uid:?}");
    if listener.ends_with("proxy") {
        // keel's own reading: the listeners are dual-stack sockets when the test has IPv6, so
        // an IPv4 connection arrives with an IPv4-mapped local address.
        let original_dst = keel_proxy::transparent::original_dst(&accepted)
            .with_context(|| format!("SO_ORIGINAL_DST on {listener}"))?;
        assert_eq!(original_dst, to, "original destination at {listener}");
    }
    Ok(())
}

const APP: Option<u32> = None;
const PROXY: Option<u32> = Some(1337);

#[test]
fn init_redirects_in_a_fresh_namespace_and_cleanup_restores_it() -> anyhow::Result<()> {
    if let Some(reason) = skip_reason() {
        // SKIP, or a failure with KEEL_REQUIRE_NETNS=1 (as in CI).
        return keel_tests::netns::skip(&format!(
            "init_redirects_in_a_fresh_namespace_and_cleanup_restores_it: {reason}"
        ));
    }
    let v6 = find_on_path("ip6tables-save").is_some() && Path::new("/proc/net/if_inet6").exists();
    if !v6 {
        eprintln!("note: no ip6tables or no IPv6 in this kernel; testing IPv4 only");
    }
    let families: &[Family] = if v6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };

    // "pod" holds the proxy's rules; "peer" is the rest of the network, over a veth pair.
    let pid = std::process::id();
    let pod = NetNs::create(format!("keel-init-{pid}"))?;
    let peer = NetNs::create(format!("keel-init-{pid}-peer"))?;
    let peer_name = peer.name.clone();
    pod.exec("ip", &["link", "set", "lo", "up"])?;
    peer.exec("ip", &["link", "set", "lo", "up"])?;
    pod.exec(
        "ip",
        &[
            "link", "add", "kv0", "type", "veth", "peer", "name", "kv1", "netns", &peer_name,
        ],
    )?;
    pod.exec("ip", &["addr", "add", "10.200.0.1/24", "dev", "kv0"])?;
    peer.exec("ip", &["addr", "add", "10.200.0.9/24", "dev", "kv1"])?;
    peer.exec("ip", &["addr", "add", "10.200.0.70/24", "dev", "kv1"])?;
    if v6 {
        pod.exec(
            "ip",
            &["addr", "add", "fd00:200::1/64", "dev", "kv0", "nodad"],
        )?;
        peer.exec(
            "ip",
            &["addr", "add", "fd00:200::9/64", "dev", "kv1", "nodad"],
        )?;
        peer.exec(
            "ip",
            &["addr", "add", "fd00:200::70/64", "dev", "kv1", "nodad"],
        )?;
    }
    pod.exec("ip", &["link", "set", "kv0", "up"])?;
    peer.exec("ip", &["link", "set", "kv1", "up"])?;

    // Somebody else's rules, which init must leave exactly as they are.
    for family in families {
        let ipt = family.iptables();
        pod.exec(ipt, &["-t", "nat", "-N", "OTHER_MESH"])?;
        pod.exec(ipt, &["-t", "nat", "-A", "OTHER_MESH", "-j", "RETURN"])?;
        let documentation = if *family == Family::V4 {
            "192.0.2.1"
        } else {
            "2001:db8::1"
        };
        pod.exec(
            ipt,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                documentation,
                "-p",
                "tcp",
                "-j",
                "OTHER_MESH",
            ],
        )?;
        pod.exec(
            ipt,
            &["-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN"],
        )?;
    }
    let mut baseline = BTreeMap::new();
    for family in families {
        baseline.insert(family.iptables(), dump(&pod, *family)?);
    }

    // Nothing installed yet: cleanup succeeds and changes nothing.
    pod.init(&["--cleanup"])?;
    for family in families {
        assert_eq!(&dump(&pod, *family)?, &baseline[family.iptables()]);
    }

    // --ipv6 auto must find the pod's IPv6 address by itself.
    let flags = [
        "--outbound-exclude-ports",
        "3306",
        "--outbound-exclude-cidrs",
        "10.200.0.64/26,fd00:200::40/122",
        "--inbound-exclude-ports",
        "9000",
    ];
    let planned = dry_run_tables(&pod.init(&[&["--dry-run"][..], &flags].concat())?);
    assert_eq!(
        planned.keys().copied().collect::<BTreeSet<_>>(),
        families
            .iter()
            .map(|f| f.iptables())
            .collect::<BTreeSet<_>>()
    );
    let v4 = &planned["iptables"];
    assert_eq!(
        v4.rules.get("KEEL_OUTBOUND").map(Vec::as_slice),
        Some(
            &[
                "-A KEEL_OUTBOUND -m owner --uid-owner 1337 -j RETURN".to_owned(),
                "-A KEEL_OUTBOUND -o lo -j RETURN".to_owned(),
                "-A KEEL_OUTBOUND -p tcp -m tcp --dport 3306 -j RETURN".to_owned(),
                "-A KEEL_OUTBOUND -d 10.200.0.64/26 -j RETURN".to_owned(),
                "-A KEEL_OUTBOUND -j KEEL_OUTBOUND_REDIRECT".to_owned(),
            ][..]
        )
    );
    if v6 {
        let outbound = &planned["ip6tables"].rules["KEEL_OUTBOUND"];
        assert!(outbound.contains(&"-A KEEL_OUTBOUND -d fd00:200::40/122 -j RETURN".to_owned()));
        assert!(!outbound.iter().any(|rule| rule.contains("10.200.0.64")));
    }
    // A dry run changed nothing.
    for family in families {
        assert_eq!(&dump(&pod, *family)?, &baseline[family.iptables()]);
    }

    // Installed, then installed again: exactly the planned rules, once.
    pod.init(&flags)?;
    assert_installed(&pod, families, &baseline, &planned, "after the first init")?;
    pod.init(&flags)?;
    assert_installed(&pod, families, &baseline, &planned, "after the second init")?;

    // Not root: refused, saying what is needed, and nothing changed.
    let refused = pod.enter(|| {
        Ok(Command::new(BIN)
            .args(["init"])
            .uid(1337)
            .gid(1337)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output())
    })?;
    match refused {
        Ok(output) => {
            let stderr = text(&output.stderr);
            assert!(!output.status.success(), "init ran as uid 1337: {stderr}");
            assert!(
                stderr.contains("was refused") && stderr.contains("NET_ADMIN"),
                "{stderr}"
            );
        }
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("note: uid 1337 cannot execute {BIN}; the unprivileged run was skipped");
        }
        Err(error) => return Err(error).context("running init as uid 1337"),
    }
    assert_installed(&pod, families, &baseline, &planned, "after a refused init")?;

    // The redirect itself.
    let mut listeners = Listeners(Vec::new());
    listeners.add(&pod, "pod outbound proxy", 15001, v6)?;
    listeners.add(&pod, "pod inbound proxy", 15006, v6)?;
    listeners.add(&pod, "pod admin", 15020, v6)?;
    listeners.add(&pod, "pod app 8080", 8080, v6)?;
    listeners.add(&pod, "pod app 9000", 9000, v6)?;
    listeners.add(&peer, "peer 80", 80, v6)?;
    listeners.add(&peer, "peer 3306", 3306, v6)?;

    let l = &listeners;
    // Outbound: the app's connections go to the proxy, which still learns where they were for.
    expect_arrival(l, &pod, APP, "10.200.0.9:80", "pod outbound proxy")?;
    // ... but not the proxy's own, nor excluded ports or CIDRs.
    expect_arrival(l, &pod, PROXY, "10.200.0.9:80", "peer 80")?;
    expect_arrival(l, &pod, APP, "10.200.0.9:3306", "peer 3306")?;
    expect_arrival(l, &pod, APP, "10.200.0.70:80", "peer 80")?;
    // Loopback, including the pod's own IP (routed over lo), reaches the app directly.
    expect_arrival(l, &pod, APP, "127.0.0.1:8080", "pod app 8080")?;
    expect_arrival(l, &pod, APP, "10.200.0.1:8080", "pod app 8080")?;
    // Inbound: to the inbound proxy, except excluded ports and the admin port.
    expect_arrival(l, &peer, APP, "10.200.0.1:8080", "pod inbound proxy")?;
    expect_arrival(l, &peer, APP, "10.200.0.1:9000", "pod app 9000")?;
    expect_arrival(l, &peer, APP, "10.200.0.1:15020", "pod admin")?;
    if v6 {
        expect_arrival(l, &pod, APP, "[fd00:200::9]:80", "pod outbound proxy")?;
        expect_arrival(l, &pod, PROXY, "[fd00:200::9]:80", "peer 80")?;
        expect_arrival(l, &pod, APP, "[fd00:200::70]:80", "peer 80")?;
        expect_arrival(l, &pod, APP, "[::1]:8080", "pod app 8080")?;
        expect_arrival(l, &peer, APP, "[fd00:200::1]:8080", "pod inbound proxy")?;
        expect_arrival(l, &peer, APP, "[fd00:200::1]:9000", "pod app 9000")?;
    }

    // Installed again with the same flags: nothing is touched, not even for a moment. A flush
    // and refill would leave the same rules, but with their packet counters back at zero.
    let counted = |pod: &NetNs| -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for family in families {
            let save = pod.exec(family.save(), &["-c", "-t", "nat"])?;
            lines.extend(
                save.lines()
                    .filter(|line| line.contains("KEEL_"))
                    .map(|line| format!("{}: {line}", family.iptables())),
            );
        }
        Ok(lines)
    };
    let before = counted(&pod)?;
    ensure!(
        before.iter().any(|line| {
            line.contains("-A KEEL_OUTBOUND_REDIRECT") && !line.contains(": [0:0] ")
        }),
        "the redirects above were not counted: {before:#?}"
    );
    pod.init(&flags)?;
    assert_eq!(counted(&pod)?, before, "a second init with the same flags");

    // Re-installed with other flags: the chains are refilled, not appended to.
    let other = ["--outbound-exclude-ports", "80", "--ipv6", "off"];
    let replanned = dry_run_tables(&pod.init(&[&["--dry-run"][..], &other].concat())?);
    pod.init(&other)?;
    assert_installed(
        &pod,
        &[Family::V4],
        &baseline,
        &replanned,
        "with other flags",
    )?;
    expect_arrival(l, &pod, APP, "10.200.0.9:80", "peer 80")?;
    pod.init(&flags)?;
    assert_installed(&pod, families, &baseline, &planned, "after going back")?;

    // Cleanup removes exactly what init added; a second cleanup finds nothing to do.
    let cleanup_plan = pod.init(&["--cleanup", "--dry-run"])?;
    assert!(
        cleanup_plan.contains("iptables -t nat -D OUTPUT -p tcp -j KEEL_OUTBOUND\n"),
        "{cleanup_plan}"
    );
    assert_installed(
        &pod,
        families,
        &baseline,
        &planned,
        "after a cleanup dry run",
    )?;
    for round in ["first", "second"] {
        pod.init(&["--cleanup"])?;
        for family in families {
            let live = dump(&pod, *family)?;
            assert!(live.keel_free(), "{round} cleanup left {live:?}");
            assert_eq!(
                &live,
                &baseline[family.iptables()],
                "{} after the {round} cleanup",
                family.iptables()
            );
        }
    }
    expect_arrival(l, &pod, APP, "10.200.0.9:80", "peer 80")?;
    expect_arrival(l, &peer, APP, "10.200.0.1:8080", "pod app 8080")?;
    if v6 {
        expect_arrival(l, &pod, APP, "[fd00:200::9]:80", "peer 80")?;
    }
    Ok(())
}
