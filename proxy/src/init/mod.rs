//! `keel-proxy init`: the `nat` rules that make the sidecar transparent.
//!
//! It runs once per pod, before the application, in the pod's network namespace (an init
//! container with `NET_ADMIN` and `NET_RAW`), and programs the `nat` table of iptables — and of
//! ip6tables when the namespace has IPv6 — so that:
//!
//! - every TCP connection the pod opens is redirected to the proxy's outbound listener (15001),
//!   except the proxy's own (uid 1337), traffic through `lo`, and excluded ports and CIDRs;
//! - every TCP connection arriving at the pod is redirected to the proxy's inbound listener
//!   (15006), except those to the proxy's own ports, its admin port (15020) and excluded ports.
//!
//! The rules are data: `rules::RuleSet::build` computes them from the flags, `--dry-run`
//! prints them, and `netfilter` reads the live table and plans the commands that make it
//! exactly that — so running `init` twice runs no command the second time (the rules, and the
//! connections they redirect, are never touched), and `--cleanup` removes what `init` added. Every binary is found and every table read before the first change; a run
//! that fails midway (an init container is retried) is completed by the next.
//!
//! It must never touch a chain or rule that is not keel's (everything keel owns is a `KEEL_*`
//! chain of the `nat` table, or a jump into one from `PREROUTING` or `OUTPUT`), never redirect
//! the proxy's own connections (that would loop them into itself), and never change anything
//! with `--dry-run`. It only handles TCP: UDP (DNS included) is left alone.

mod netfilter;
mod rules;

use std::io::{self, Write};

use clap::builder::BoolishValueParser;
use ipnet::IpNet;

use netfilter::{NatTable, Observed, plan_cleanup, plan_install};
use rules::{CidrList, Family, OWN_CHAINS, Policy, PortList, RuleSet, parse_port};

/// Flags of `keel-proxy init`. Each can also be set through the environment variable named in
/// its help; a flag on the command line wins. A list flag may be repeated, and its variable set
/// to "" means an empty list; `KEEL_INIT_DRY_RUN` and `KEEL_INIT_CLEANUP` take true/false,
/// yes/no, on/off or 1/0.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The uid the proxy runs as; connections it opens are never redirected.
    #[arg(
        long,
        env = "KEEL_PROXY_UID",
        value_name = "UID",
        default_value_t = 1337
    )]
    proxy_uid: u32,

    /// The proxy's outbound listener, where connections opened by the pod are redirected.
    #[arg(
        long,
        env = "KEEL_OUTBOUND_PORT",
        value_name = "PORT",
        default_value_t = 15001,
        value_parser = parse_port
    )]
    outbound_port: u16,

    /// The proxy's inbound listener, where connections arriving at the pod are redirected.
    #[arg(
        long,
        env = "KEEL_INBOUND_PORT",
        value_name = "PORT",
        default_value_t = 15006,
        value_parser = parse_port
    )]
    inbound_port: u16,

    /// The proxy's admin port (metrics, health); connections to it are never redirected.
    #[arg(
        long,
        env = "KEEL_ADMIN_PORT",
        value_name = "PORT",
        default_value_t = 15020,
        value_parser = parse_port
    )]
    admin_port: u16,

    /// Destination ports whose outbound connections bypass the proxy, comma-separated; a range
    /// is written FIRST-LAST. Example: 25,3306,5000-5100.
    #[arg(long, env = "KEEL_OUTBOUND_EXCLUDE_PORTS", value_name = "PORTS")]
    outbound_exclude_ports: Vec<PortList>,

    /// Destination CIDRs (or single addresses) whose outbound connections bypass the proxy,
    /// comma-separated. IPv4 blocks go to iptables, IPv6 blocks to ip6tables.
    #[arg(long, env = "KEEL_OUTBOUND_EXCLUDE_CIDRS", value_name = "CIDRS")]
    outbound_exclude_cidrs: Vec<CidrList>,

    /// Local ports whose inbound connections bypass the proxy, comma-separated, ranges as
    /// FIRST-LAST. The proxy's own ports and the admin port are always excluded.
    #[arg(long, env = "KEEL_INBOUND_EXCLUDE_PORTS", value_name = "PORTS")]
    inbound_exclude_ports: Vec<PortList>,

    /// Redirect inbound connections only to these local ports (comma-separated, ranges as
    /// FIRST-LAST) instead of to every port. Exclusions still win.
    #[arg(long, env = "KEEL_INBOUND_PORTS", value_name = "PORTS")]
    inbound_ports: Vec<PortList>,

    /// Whether to program ip6tables too: `auto` does when the namespace has an IPv6 address
    /// other than loopback and link-local (per /proc/net/if_inet6); with `--cleanup`, `auto`
    /// removes keel's IPv6 rules wherever ip6tables can be used.
    #[arg(
        long,
        env = "KEEL_IPV6",
        value_name = "MODE",
        value_enum,
        default_value_t = Ipv6Mode::Auto
    )]
    ipv6: Ipv6Mode,

    /// Print the rules in iptables-save form (with --cleanup: the commands that would remove
    /// them, which requires reading the table) and change nothing.
    #[arg(long, env = "KEEL_INIT_DRY_RUN", value_parser = BoolishValueParser::new())]
    dry_run: bool,

    /// Remove the jumps and chains that `init` installed, and nothing else. Succeeds when
    /// nothing is installed.
    #[arg(long, env = "KEEL_INIT_CLEANUP", value_parser = BoolishValueParser::new())]
    cleanup: bool,
}

/// Whether ip6tables is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// Why `init` stopped: each says what failed and what is needed.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("invalid flags: {0}")]
    InvalidFlags(String),

    #[error(
        "`{binary}` was not found on PATH; keel-proxy init programs the redirect rules through it: \
         install the iptables package (it provides iptables and ip6tables){}",
        v6_hint(.binary)
    )]
    BinaryMissing { binary: &'static str },

    #[error("`{binary} --version` did not identify a usable iptables: {detail}")]
    BinaryUnusable {
        binary: &'static str,
        detail: String,
    },

    #[error(
        "`{command}` was refused ({stderr}): keel-proxy init must run as root, or with the \
         NET_ADMIN and NET_RAW capabilities, in the pod's network namespace"
    )]
    PermissionDenied { command: String, stderr: String },

    #[error(
        "`{command}` found no {family} nat table ({stderr}): the kernel must provide NAT for \
         {family} (nf_nat with iptable_nat/ip6table_nat, or nft_chain_nat for iptables-nft){}",
        if *.family == Family::V6 { "; for a pod without IPv6, pass --ipv6 off" } else { "" }
    )]
    NatUnavailable {
        family: Family,
        command: String,
        stderr: String,
    },

    #[error("`{command}` failed{}: {stderr}", exit_code(*.code))]
    CommandFailed {
        command: String,
        code: Option<i32>,
        stderr: String,
    },

    #[error(
        "could not read {path} to detect IPv6 (pass --ipv6 on or --ipv6 off to decide instead)"
    )]
    DetectIpv6 {
        path: &'static str,
        source: io::Error,
    },

    #[error("could not write the dry-run output")]
    Output(#[from] io::Error),
}

fn v6_hint(binary: &str) -> &'static str {
    if binary == Family::V6.binary() {
        "; for a pod without IPv6, pass --ipv6 off"
    } else {
        ""
    }
}

fn exit_code(code: Option<i32>) -> String {
    code.map(|code| format!(" with exit code {code}"))
        .unwrap_or_default()
}

/// Installs the redirect rules in the current network namespace, or removes them with
/// `--cleanup`; with `--dry-run`, prints instead of changing anything.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    if args.cleanup {
        cleanup(args.ipv6, args.dry_run, &mut stdout)?;
    } else {
        install(&args.policy()?, args.ipv6, args.dry_run, &mut stdout)?;
    }
    Ok(())
}

impl InitArgs {
    /// The flags as the rules need them, with the checks that involve more than one flag.
    fn policy(&self) -> Result<Policy, InitError> {
        let listeners = [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--admin-port", self.admin_port),
        ];
        for (at, (flag, port)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[at + 1..].iter().find(|(_, p)| p == port) {
                return Err(InitError::InvalidFlags(format!(
                    "{flag} and {other} are both {port}: the proxy's outbound, inbound and admin \
                     ports must differ"
                )));
            }
        }
        Ok(Policy {
            proxy_uid: self.proxy_uid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            outbound_exclude_ports: flatten(&self.outbound_exclude_ports, |l| &l.0),
            outbound_exclude_cidrs: flatten(&self.outbound_exclude_cidrs, |l| &l.0),
            inbound_exclude_ports: flatten(&self.inbound_exclude_ports, |l| &l.0),
            inbound_ports: flatten(&self.inbound_ports, |l| &l.0),
        })
    }
}

/// The items of a list flag given several times, in order.
fn flatten<L, T: Clone>(lists: &[L], items: impl Fn(&L) -> &Vec<T>) -> Vec<T> {
    lists
        .iter()
        .flat_map(|list| items(list).iter().cloned())
        .collect()
}

fn install(
    policy: &Policy,
    ipv6: Ipv6Mode,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<(), InitError> {
    let with_v6 = match ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => namespace_has_ipv6()?,
    };
    let sets: Vec<RuleSet> = [Family::V4, Family::V6]
        .into_iter()
        .filter(|family| *family == Family::V4 || with_v6)
        .map(|family| RuleSet::build(policy, family))
        .collect();
    if !with_v6 {
        let ignored: Vec<String> = policy
            .outbound_exclude_cidrs
            .iter()
            .filter(|net| matches!(net, IpNet::V6(_)))
            .map(ToString::to_string)
            .collect();
        if !ignored.is_empty() {
            tracing::warn!(
                cidrs = ?ignored,
                "IPv6 CIDRs are excluded, but ip6tables is not programmed here; they have no effect"
            );
        }
    }

    if dry_run {
        for set in &sets {
            writeln!(
                out,
                "# keel-proxy init --dry-run: {} ({}); nothing was changed",
                set.family.binary(),
                set.family
            )?;
            out.write_all(set.render().as_bytes())?;
        }
        out.flush()?;
        return Ok(());
    }

    // Find every binary and read every table before the first change, so that a missing
    // ip6tables or a missing permission stops init before the IPv4 rules are in place.
    let mut tables = Vec::with_capacity(sets.len());
    for set in sets {
        let table = NatTable::open(set.family)?;
        let observed = table.observe()?;
        tables.push((table, observed, set));
    }
    for (table, observed, set) in &tables {
        let steps = plan_install(set, observed);
        if steps.is_empty() {
            tracing::info!(family = %set.family, "the redirect rules are already in place");
            continue;
        }
        table.apply(&steps)?;
        tracing::info!(
            family = %set.family,
            chains = ?OWN_CHAINS,
            rules = set.rules.len(),
            commands = steps.len(),
            reinstalled = !observed.is_empty(),
            "installed the redirect rules"
        );
    }
    Ok(())
}

fn cleanup(ipv6: Ipv6Mode, dry_run: bool, out: &mut dyn Write) -> Result<(), InitError> {
    let mut tables: Vec<(NatTable, Observed)> = Vec::with_capacity(2);
    let v4 = NatTable::open(Family::V4)?;
    let observed = v4.observe()?;
    tables.push((v4, observed));
    let v6 = match ipv6 {
        Ipv6Mode::Off => None,
        Ipv6Mode::On => Some(open_and_observe(Family::V6)?),
        // keel's IPv6 rules may exist wherever ip6tables works, whatever the addresses now.
        Ipv6Mode::Auto => match open_and_observe(Family::V6) {
            Ok(table) => Some(table),
            Err(error @ (InitError::BinaryMissing { .. } | InitError::NatUnavailable { .. })) => {
                tracing::debug!(%error, "no ip6tables nat table, so no IPv6 rules to remove");
                None
            }
            Err(error) => return Err(error),
        },
    };
    tables.extend(v6);

    for (table, observed) in &tables {
        let steps = plan_cleanup(observed);
        if dry_run {
            writeln!(
                out,
                "# keel-proxy init --cleanup --dry-run: {} ({}); nothing was changed",
                table.family().binary(),
                table.family()
            )?;
            if steps.is_empty() {
                writeln!(out, "# nothing of keel's is installed")?;
            }
            for step in &steps {
                writeln!(out, "{}", table.command(step))?;
            }
            continue;
        }
        table.apply(&steps)?;
        if observed.is_empty() {
            tracing::info!(
                family = %table.family(),
                "no redirect rules installed; nothing to remove"
            );
        } else {
            tracing::info!(
                family = %table.family(),
                chains = ?observed.chains,
                jumps = observed.jumps.len(),
                "removed the redirect rules"
            );
        }
    }
    out.flush()?;
    Ok(())
}

fn open_and_observe(family: Family) -> Result<(NatTable, Observed), InitError> {
    let table = NatTable::open(family)?;
    let observed = table.observe()?;
    Ok((table, observed))
}

/// The current network namespace's IPv6 addresses (`/proc/net` follows the reader's namespace).
const IF_INET6: &str = "/proc/net/if_inet6";

fn namespace_has_ipv6() -> Result<bool, InitError> {
    match std::fs::read_to_string(IF_INET6) {
        Ok(listing) => Ok(has_routable_ipv6(&listing)),
        // No such file: the kernel runs without IPv6.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InitError::DetectIpv6 {
            path: IF_INET6,
            source,
        }),
    }
}

/// Whether the namespace has an IPv6 address that pods talk over: neither loopback nor
/// link-local. Every interface of a kernel with IPv6 gets a link-local address whether or not the
/// cluster uses IPv6, so counting those would program ip6tables in every IPv4 pod. That would be
/// harmless now that the proxy serves IPv6, but useless: link-local destinations are never
/// redirected (see `rules`), and services are not reached at link-local addresses. A pod that
/// wants its IPv6 redirected anyway passes `--ipv6 on`.
fn has_routable_ipv6(if_inet6: &str) -> bool {
    if_inet6
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = u128::from_str_radix(fields.next()?, 16).ok()?;
            let interface = fields.nth(4)?;
            Some((std::net::Ipv6Addr::from(address), interface))
        })
        .any(|(address, interface)| {
            interface != "lo" && !address.is_loopback() && !address.is_unicast_link_local()
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied())).map(|c| c.init)
    }

    fn parsed(args: &[&str]) -> InitArgs {
        parse(args).unwrap_or_else(|error| panic!("{args:?} rejected: {error}"))
    }

    fn dry_run_text(args: &[&str]) -> String {
        let args = parsed(args);
        let policy = args.policy().unwrap_or_else(|error| panic!("{error}"));
        let mut out = Vec::new();
        install(&policy, args.ipv6, true, &mut out).unwrap_or_else(|error| panic!("{error}"));
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn defaults_match_the_mesh_contract() {
        let args = parsed(&[]);
        let policy = args.policy().unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(policy.proxy_uid, 1337);
        assert_eq!(policy.outbound_port, 15001);
        assert_eq!(policy.inbound_port, 15006);
        assert_eq!(policy.admin_port, 15020);
        assert!(policy.outbound_exclude_ports.is_empty());
        assert!(policy.inbound_ports.is_empty());
        assert_eq!(args.ipv6, Ipv6Mode::Auto);
        assert!(!args.dry_run && !args.cleanup);
    }

    #[test]
    fn lists_split_on_commas_and_repeat() {
        let args = parsed(&[
            "--outbound-exclude-ports",
            "25,3306",
            "--outbound-exclude-ports=5000-5100",
            "--outbound-exclude-cidrs",
            "10.96.0.1/32,fd00::/8",
            "--inbound-ports",
            "8080,9090",
            "--inbound-exclude-ports",
            "",
        ]);
        let policy = args.policy().unwrap_or_else(|error| panic!("{error}"));
        let shown: Vec<String> = policy
            .outbound_exclude_ports
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["25", "3306", "5000:5100"]);
        assert_eq!(policy.outbound_exclude_cidrs.len(), 2);
        assert_eq!(policy.inbound_ports.len(), 2);
        assert!(policy.inbound_exclude_ports.is_empty());
    }

    #[test]
    fn invalid_ports_and_cidrs_are_refused_with_the_reason() {
        for (flag, value, reason) in [
            (
                "--outbound-exclude-ports",
                "70000",
                "expected a number from 1 to 65535",
            ),
            (
                "--inbound-exclude-ports",
                "0",
                "expected a number from 1 to 65535",
            ),
            ("--inbound-ports", "9000-8000", "must not be above the last"),
            (
                "--outbound-port",
                "http",
                "expected a number from 1 to 65535",
            ),
            ("--outbound-exclude-cidrs", "10.0.0.0/33", "expected a CIDR"),
            ("--proxy-uid", "-1", "invalid value"),
            ("--ipv6", "maybe", "invalid value"),
        ] {
            let error = match parse(&[&format!("{flag}={value}")]) {
                Ok(args) => panic!("{flag} {value} accepted: {args:?}"),
                Err(error) => error.to_string(),
            };
            assert!(error.contains(reason), "{flag} {value}: {error}");
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn the_proxy_ports_must_differ() {
        let args = parsed(&["--inbound-port", "15001"]);
        match args.policy() {
            Err(InitError::InvalidFlags(reason)) => {
                assert!(reason.contains("--outbound-port and --inbound-port are both 15001"));
            }
            other => panic!("expected InvalidFlags, got {other:?}"),
        }
    }

    #[test]
    fn dry_run_prints_one_block_per_family() {
        let text = dry_run_text(&[
            "--ipv6",
            "on",
            "--proxy-uid",
            "2102",
            "--outbound-exclude-cidrs",
            "10.96.0.0/12,fd00::/8",
        ]);
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with('#')).collect();
        assert_eq!(
            headers,
            [
                "# keel-proxy init --dry-run: iptables (IPv4); nothing was changed",
                "# keel-proxy init --dry-run: ip6tables (IPv6); nothing was changed",
            ]
        );
        assert_eq!(text.matches("*nat\n").count(), 2);
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert_eq!(text.matches("--uid-owner 2102 -j RETURN").count(), 2);
        let (v4, v6) = text
            .split_once("# keel-proxy init --dry-run: ip6tables")
            .unwrap_or_else(|| panic!("no IPv6 block in {text}"));
        assert!(v4.contains("-A KEEL_OUTBOUND -d 10.96.0.0/12 -j RETURN"));
        assert!(!v4.contains("fd00::/8"));
        assert!(v6.contains("-A KEEL_OUTBOUND -d fd00::/8 -j RETURN"));
        assert!(!v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn dry_run_without_ipv6_prints_only_iptables() {
        let text = dry_run_text(&["--ipv6", "off", "--outbound-exclude-cidrs", "fd00::/8"]);
        assert!(text.starts_with(
            "# keel-proxy init --dry-run: iptables (IPv4); nothing was changed\n*nat\n"
        ));
        assert_eq!(text.matches("*nat").count(), 1);
        assert!(!text.contains("fd00::/8"));
    }

    #[test]
    fn ipv6_counts_only_beyond_loopback_and_link_local() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n";
        let ula = "fd006b65656c00000000000000000002 04 40 00 80     eth0\n";
        let global = "20010db8000000000000000000000002 04 40 00 80     eth0\n";
        assert!(!has_routable_ipv6(""));
        assert!(!has_routable_ipv6(lo));
        assert!(!has_routable_ipv6(&format!("{lo}{link_local}")));
        assert!(has_routable_ipv6(&format!("{lo}{link_local}{ula}")));
        assert!(has_routable_ipv6(&format!("{lo}{global}")));
        assert!(!has_routable_ipv6("garbage\n"));
    }

    #[test]
    fn errors_say_what_is_needed() {
        let missing = InitError::BinaryMissing {
            binary: "ip6tables",
        }
        .to_string();
        assert!(
            missing.contains("install the iptables package"),
            "{missing}"
        );
        assert!(missing.contains("--ipv6 off"), "{missing}");
        let missing_v4 = InitError::BinaryMissing { binary: "iptables" }.to_string();
        assert!(!missing_v4.contains("--ipv6"), "{missing_v4}");
        let denied = InitError::PermissionDenied {
            command: "iptables -t nat -S".into(),
            stderr: "Permission denied (you must be root)".into(),
        }
        .to_string();
        assert!(denied.contains("NET_ADMIN"), "{denied}");
        let failed = InitError::CommandFailed {
            command: "iptables -t nat -X KEEL_OUTBOUND".into(),
            code: Some(1),
            stderr: "Device or resource busy".into(),
        }
        .to_string();
        assert_eq!(
            failed,
            "`iptables -t nat -X KEEL_OUTBOUND` failed with exit code 1: Device or resource busy"
        );
    }
}
