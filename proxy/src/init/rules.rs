//! The redirect rules as data: a pure function from the validated flags to the `nat` rules of one
//! address family, and their `iptables-save` rendering.
//!
//! Nothing here runs a command or reads the system; it must stay that way, so that the exact rule
//! text can be unit-tested without root and printed by `--dry-run`. Every rule is written in the
//! canonical form `iptables -S` prints it back in (`-p tcp -m tcp --dport`, CIDRs with their host
//! bits cleared), so that what keel planned and what the kernel holds compare as plain text.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// The only table keel touches.
pub(crate) const TABLE: &str = "nat";

/// Entered from `PREROUTING` for every inbound TCP packet that opens a connection.
pub(crate) const INBOUND_CHAIN: &str = "KEEL_INBOUND";
/// The single place inbound connections are redirected to the proxy's inbound listener.
pub(crate) const INBOUND_REDIRECT_CHAIN: &str = "KEEL_INBOUND_REDIRECT";
/// Entered from `OUTPUT` for every TCP connection opened in the pod.
pub(crate) const OUTBOUND_CHAIN: &str = "KEEL_OUTBOUND";
/// The single place outbound connections are redirected to the proxy's outbound listener.
pub(crate) const OUTBOUND_REDIRECT_CHAIN: &str = "KEEL_OUTBOUND_REDIRECT";

/// Every chain keel owns, in the order `iptables-save` lists user chains (by name).
pub(crate) const OWN_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    INBOUND_REDIRECT_CHAIN,
    OUTBOUND_CHAIN,
    OUTBOUND_REDIRECT_CHAIN,
];

/// The built-in chains keel adds a jump to. Nothing else in them is ever read or changed.
pub(crate) const HOOK_CHAINS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// An address family, and so which binary programs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    /// The binary the `iptables` crate runs for this family.
    pub(crate) fn binary(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn includes(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Self::V4, IpNet::V4(_)) | (Self::V6, IpNet::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// One TCP port or an inclusive range of them, as a flag names it (`3306`, `5000-5100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    pub(crate) const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

/// Why a port or port range from a flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PortError {
    #[error("`{0}` is not a TCP port: expected a number from 1 to 65535")]
    NotAPort(String),
    #[error("`{0}` is not a port range: the first port must not be above the last")]
    Reversed(String),
}

/// Parses a single port, 1 to 65535 (0 is not a port one can connect to or redirect).
pub(crate) fn parse_port(text: &str) -> Result<u16, PortError> {
    match text.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(PortError::NotAPort(text.to_owned())),
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    /// `PORT` or `FIRST-LAST` (inclusive); `FIRST:LAST`, iptables' own spelling, is accepted too.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((first, last)) = text.split_once(['-', ':']) else {
            return parse_port(text).map(Self::single);
        };
        let first = parse_port(first).map_err(|_| PortError::NotAPort(text.to_owned()))?;
        let last = parse_port(last).map_err(|_| PortError::NotAPort(text.to_owned()))?;
        if first > last {
            return Err(PortError::Reversed(text.to_owned()));
        }
        Ok(Self { first, last })
    }
}

/// The form iptables reads and prints: `3306` or `5000:5100`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// Why a CIDR from a flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an address block: expected a CIDR such as 10.96.0.0/12 or fd00::/8, or a single address"
)]
pub(crate) struct CidrError(String);

/// Parses a CIDR, or a bare address as its /32 or /128. Host bits are cleared (`10.0.0.5/8` is
/// `10.0.0.0/8`), which is how iptables itself reads such a block.
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, CidrError> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| CidrError(text.to_owned()))
}

/// A comma-separated list of ports and port ranges, as one flag value or environment variable
/// carries it (`25,3306,5000-5100`). An empty value is an empty list, so a variable set to ""
/// by a template means "none" rather than an error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortList(pub(crate) Vec<PortRange>);

impl FromStr for PortList {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        list_items(text)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// A comma-separated list of CIDRs or addresses (`10.96.0.0/12,fd00::/8`); empty is none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CidrList(pub(crate) Vec<IpNet>);

impl FromStr for CidrList {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        list_items(text)
            .map(parse_cidr)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// What the rules are built from: the flags, validated, with the defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) proxy_uid: u32,
    pub(crate) outbound_port: u16,
    pub(crate) inbound_port: u16,
    pub(crate) admin_port: u16,
    pub(crate) outbound_exclude_ports: Vec<PortRange>,
    pub(crate) outbound_exclude_cidrs: Vec<IpNet>,
    pub(crate) inbound_exclude_ports: Vec<PortRange>,
    /// Empty means every port.
    pub(crate) inbound_ports: Vec<PortRange>,
}

/// One rule: appended to `chain` of [`TABLE`] with the match and target in `spec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) chain: &'static str,
    pub(crate) spec: String,
}

impl Rule {
    fn new(chain: &'static str, spec: impl Into<String>) -> Self {
        Self {
            chain,
            spec: spec.into(),
        }
    }
}

/// As `iptables -S` and `iptables-save` print it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

/// Everything keel installs in one family's `nat` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RuleSet {
    pub(crate) family: Family,
    /// The jumps from the built-in chains into keel's own, one per entry of [`HOOK_CHAINS`].
    pub(crate) jumps: Vec<Rule>,
    /// The contents of keel's own chains ([`OWN_CHAINS`]), grouped by chain, in order.
    pub(crate) rules: Vec<Rule>,
}

impl RuleSet {
    /// The rules for `family`.
    ///
    /// Outbound (`OUTPUT`, connections the pod opens), first match wins:
    /// 1. the proxy's own uid returns, or the proxy's upstream connections would loop into it;
    /// 2. anything leaving through `lo` returns. This covers 127.0.0.0/8 and ::1, and also a
    ///    connection from the application to its own pod IP, which the kernel routes over `lo`:
    ///    such a call reaches the application directly rather than through the inbound proxy.
    ///    That is Linkerd's choice; Istio instead sends it back through its inbound chain, which
    ///    costs extra rules keyed on the proxy's uid for a call that never leaves the pod;
    /// 3. for IPv6, link-local destinations (`fe80::/10`) return: their scope (the interface)
    ///    is not part of the original destination the proxy reads back, so it could not open
    ///    the connection the app asked for;
    /// 4. excluded destination ports and CIDRs (of this family only) return;
    /// 5. everything else is redirected to the outbound listener.
    ///
    /// Inbound (`PREROUTING`, connections arriving at the pod): the proxy's own listeners and
    /// admin port, then the excluded ports, return — a connection addressed to the proxy is never
    /// redirected into itself; then either every other port or only `inbound_ports` is
    /// redirected to the inbound listener. Exclusions win over `inbound_ports`.
    pub(crate) fn build(policy: &Policy, family: Family) -> Self {
        let jumps = vec![
            Rule::new("PREROUTING", format!("-p tcp -j {INBOUND_CHAIN}")),
            Rule::new("OUTPUT", format!("-p tcp -j {OUTBOUND_CHAIN}")),
        ];

        let mut rules = Vec::new();

        let never_redirected_inbound = [
            PortRange::single(policy.outbound_port),
            PortRange::single(policy.inbound_port),
            PortRange::single(policy.admin_port),
        ];
        let inbound_returns = distinct(
            never_redirected_inbound
                .iter()
                .chain(&policy.inbound_exclude_ports),
        );
        for port in inbound_returns {
            rules.push(Rule::new(INBOUND_CHAIN, dport_spec(port, "RETURN")));
        }
        if policy.inbound_ports.is_empty() {
            rules.push(Rule::new(
                INBOUND_CHAIN,
                format!("-j {INBOUND_REDIRECT_CHAIN}"),
            ));
        } else {
            for port in distinct(&policy.inbound_ports) {
                rules.push(Rule::new(
                    INBOUND_CHAIN,
                    dport_spec(port, INBOUND_REDIRECT_CHAIN),
                ));
            }
        }
        rules.push(Rule::new(
            INBOUND_REDIRECT_CHAIN,
            format!("-p tcp -j REDIRECT --to-ports {}", policy.inbound_port),
        ));

        rules.push(Rule::new(
            OUTBOUND_CHAIN,
            format!("-m owner --uid-owner {} -j RETURN", policy.proxy_uid),
        ));
        rules.push(Rule::new(OUTBOUND_CHAIN, "-o lo -j RETURN"));
        if family == Family::V6 {
            rules.push(Rule::new(OUTBOUND_CHAIN, "-d fe80::/10 -j RETURN"));
        }
        for port in distinct(&policy.outbound_exclude_ports) {
            rules.push(Rule::new(OUTBOUND_CHAIN, dport_spec(port, "RETURN")));
        }
        let cidrs = policy
            .outbound_exclude_cidrs
            .iter()
            .filter(|net| family.includes(net));
        for net in distinct(cidrs) {
            rules.push(Rule::new(OUTBOUND_CHAIN, format!("-d {net} -j RETURN")));
        }
        rules.push(Rule::new(
            OUTBOUND_CHAIN,
            format!("-j {OUTBOUND_REDIRECT_CHAIN}"),
        ));
        rules.push(Rule::new(
            OUTBOUND_REDIRECT_CHAIN,
            format!("-p tcp -j REDIRECT --to-ports {}", policy.outbound_port),
        ));

        Self {
            family,
            jumps,
            rules,
        }
    }

    /// The `*nat` block `iptables-save` would print for keel's part of the table: keel's chain
    /// declarations, then the jumps, then the chains' rules.
    pub(crate) fn render(&self) -> String {
        let mut text = format!("*{TABLE}\n");
        for chain in OWN_CHAINS {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in self.jumps.iter().chain(&self.rules) {
            text.push_str(&format!("{rule}\n"));
        }
        text.push_str("COMMIT\n");
        text
    }
}

fn dport_spec(port: PortRange, target: &str) -> String {
    format!("-p tcp -m tcp --dport {port} -j {target}")
}

/// The items in their first-seen order, each once: a port or CIDR named twice yields one rule.
fn distinct<'a, T: PartialEq + Copy + 'a>(items: impl IntoIterator<Item = &'a T>) -> Vec<T> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(item) {
            seen.push(*item);
        }
    }
    seen
}

#[cfg(test)]
impl Policy {
    /// The policy of a sidecar with every flag at its default (the ports of the design).
    pub(crate) fn standard() -> Policy {
        Policy {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15020,
            outbound_exclude_ports: Vec::new(),
            outbound_exclude_cidrs: Vec::new(),
            inbound_exclude_ports: Vec::new(),
            inbound_ports: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Policy {
        Policy::standard()
    }

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(ToString::to_string).collect()
    }

    fn ports(list: &str) -> Vec<PortRange> {
        list.split(',')
            .map(|p| p.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn cidrs(list: &str) -> Vec<IpNet> {
        list.split(',')
            .map(|c| parse_cidr(c).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    #[test]
    fn defaults_render_exactly() {
        let set = RuleSet::build(&defaults(), Family::V4);
        assert_eq!(
            set.render(),
            "\
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
"
        );
    }

    #[test]
    fn ipv6_differs_only_by_returning_link_local_destinations() {
        let v4 = RuleSet::build(&defaults(), Family::V4);
        let v6 = RuleSet::build(&defaults(), Family::V6);
        assert_eq!(v4.jumps, v6.jumps);
        let link_local = Rule::new(OUTBOUND_CHAIN, "-d fe80::/10 -j RETURN");
        let at = v6
            .rules
            .iter()
            .position(|r| *r == link_local)
            .unwrap_or_else(|| panic!("no link-local return in {:?}", v6.rules));
        assert_eq!(v6.rules[at - 1].spec, "-o lo -j RETURN");
        let mut without = v6.rules.clone();
        without.remove(at);
        assert_eq!(v4.rules, without);
    }

    #[test]
    fn every_rule_lives_in_an_own_chain_and_every_jump_in_a_hook() {
        let set = RuleSet::build(&defaults(), Family::V4);
        assert!(set.rules.iter().all(|r| OWN_CHAINS.contains(&r.chain)));
        let hooks: Vec<_> = set.jumps.iter().map(|r| r.chain).collect();
        assert_eq!(hooks, HOOK_CHAINS);
    }

    #[test]
    fn excluded_cidrs_split_by_family() {
        let policy = Policy {
            outbound_exclude_cidrs: cidrs("10.96.0.1/32,fd00::/8,169.254.169.254,2001:db8::1"),
            ..defaults()
        };
        let v4 = lines(&RuleSet::build(&policy, Family::V4).rules);
        let v6 = lines(&RuleSet::build(&policy, Family::V6).rules);
        let v4_cidrs: Vec<_> = v4.iter().filter(|l| l.contains(" -d ")).collect();
        let v6_cidrs: Vec<_> = v6.iter().filter(|l| l.contains(" -d ")).collect();
        assert_eq!(
            v4_cidrs,
            [
                "-A KEEL_OUTBOUND -d 10.96.0.1/32 -j RETURN",
                "-A KEEL_OUTBOUND -d 169.254.169.254/32 -j RETURN",
            ]
        );
        assert_eq!(
            v6_cidrs,
            [
                "-A KEEL_OUTBOUND -d fe80::/10 -j RETURN",
                "-A KEEL_OUTBOUND -d fd00::/8 -j RETURN",
                "-A KEEL_OUTBOUND -d 2001:db8::1/128 -j RETURN",
            ]
        );
    }

    #[test]
    fn outbound_exclusions_come_after_uid_and_loopback_and_before_the_redirect() {
        let policy = Policy {
            outbound_exclude_ports: ports("25,3306,5000-5100"),
            outbound_exclude_cidrs: cidrs("10.96.0.0/12"),
            ..defaults()
        };
        let set = RuleSet::build(&policy, Family::V4);
        let outbound: Vec<_> = lines(&set.rules)
            .into_iter()
            .filter(|l| l.starts_with("-A KEEL_OUTBOUND "))
            .collect();
        assert_eq!(
            outbound,
            [
                "-A KEEL_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
                "-A KEEL_OUTBOUND -o lo -j RETURN",
                "-A KEEL_OUTBOUND -p tcp -m tcp --dport 25 -j RETURN",
                "-A KEEL_OUTBOUND -p tcp -m tcp --dport 3306 -j RETURN",
                "-A KEEL_OUTBOUND -p tcp -m tcp --dport 5000:5100 -j RETURN",
                "-A KEEL_OUTBOUND -d 10.96.0.0/12 -j RETURN",
                "-A KEEL_OUTBOUND -j KEEL_OUTBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn proxy_uid_and_ports_are_taken_from_the_policy() {
        let policy = Policy {
            proxy_uid: 2102,
            outbound_port: 4140,
            inbound_port: 4143,
            admin_port: 4191,
            ..defaults()
        };
        let text = lines(&RuleSet::build(&policy, Family::V6).rules);
        assert!(text.contains(&"-A KEEL_OUTBOUND -m owner --uid-owner 2102 -j RETURN".into()));
        assert!(
            text.contains(&"-A KEEL_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140".into())
        );
        assert!(
            text.contains(&"-A KEEL_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143".into())
        );
        for port in [4140, 4143, 4191] {
            let rule = format!("-A KEEL_INBOUND -p tcp -m tcp --dport {port} -j RETURN");
            assert!(text.contains(&rule), "missing {rule}");
        }
        assert!(
            !text
                .iter()
                .any(|l| l.contains("1337") || l.contains("1500"))
        );
    }

    #[test]
    fn inbound_exclusions_are_deduplicated_with_the_proxy_ports() {
        let policy = Policy {
            inbound_exclude_ports: ports("9000,15020,9000"),
            ..defaults()
        };
        let inbound: Vec<_> = lines(&RuleSet::build(&policy, Family::V4).rules)
            .into_iter()
            .filter(|l| l.starts_with("-A KEEL_INBOUND "))
            .collect();
        assert_eq!(
            inbound,
            [
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 9000 -j RETURN",
                "-A KEEL_INBOUND -j KEEL_INBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn inbound_ports_mode_redirects_only_the_listed_ports_after_the_exclusions() {
        let policy = Policy {
            inbound_ports: ports("8080,9090,9100-9110"),
            inbound_exclude_ports: ports("9090"),
            ..defaults()
        };
        let inbound: Vec<_> = lines(&RuleSet::build(&policy, Family::V4).rules)
            .into_iter()
            .filter(|l| l.starts_with("-A KEEL_INBOUND "))
            .collect();
        assert_eq!(
            inbound,
            [
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 8080 -j KEEL_INBOUND_REDIRECT",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 9090 -j KEEL_INBOUND_REDIRECT",
                "-A KEEL_INBOUND -p tcp -m tcp --dport 9100:9110 -j KEEL_INBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn ports_parse_and_print_in_iptables_form() {
        assert_eq!("3306".parse::<PortRange>(), Ok(PortRange::single(3306)));
        assert_eq!(
            "5000-5100".parse::<PortRange>().map(|r| r.to_string()),
            Ok("5000:5100".to_owned())
        );
        assert_eq!(
            "5000:5100".parse::<PortRange>().map(|r| r.to_string()),
            Ok("5000:5100".to_owned())
        );
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in [
            "0", "65536", "-1", "http", "", "1-0", "80-", "10-5", "1-2-3",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "accepted `{bad}`");
        }
        assert_eq!(
            "10-5".parse::<PortRange>(),
            Err(PortError::Reversed("10-5".into()))
        );
        assert!(parse_port("0").is_err());
    }

    #[test]
    fn lists_split_on_commas_and_empty_is_none() {
        let list: Result<PortList, _> = "25, 3306,5000-5100,".parse();
        assert_eq!(
            list.map(|l| l.0.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Ok(vec!["25".into(), "3306".into(), "5000:5100".into()])
        );
        assert_eq!("".parse::<PortList>(), Ok(PortList::default()));
        assert_eq!(" ".parse::<CidrList>(), Ok(CidrList::default()));
        assert_eq!(
            "25,70000".parse::<PortList>(),
            Err(PortError::NotAPort("70000".into()))
        );
        assert_eq!(
            "10.0.0.0/8,fd00::/8".parse::<CidrList>().map(|l| l.0.len()),
            Ok(2)
        );
        assert!("10.0.0.0/8,nope".parse::<CidrList>().is_err());
    }

    #[test]
    fn cidrs_parse_bare_addresses_and_clear_host_bits() {
        assert_eq!(
            parse_cidr("10.0.0.5/8").map(|n| n.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_cidr("10.96.0.1").map(|n| n.to_string()),
            Ok("10.96.0.1/32".into())
        );
        assert_eq!(
            parse_cidr("fd00::1/8").map(|n| n.to_string()),
            Ok("fd00::/8".into())
        );
        for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "", "example.com"] {
            assert!(parse_cidr(bad).is_err(), "accepted `{bad}`");
        }
    }
}
