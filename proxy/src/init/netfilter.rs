//! Reading keel's part of the live `nat` table, planning the commands that bring it to the
//! desired [`RuleSet`] (or remove it), and running them through the `iptables` crate.
//!
//! Planning is pure ([`plan_install`], [`plan_cleanup`]) so that idempotence is tested without
//! root. This module must never read, change or delete a rule that is not one of keel's: it only
//! creates, flushes and deletes the chains in [`OWN_CHAINS`], and only adds or deletes rules in
//! [`HOOK_CHAINS`] whose target is one of those chains.

use std::fmt;
use std::io;

use iptables::IPTables;
use iptables::error::IptablesError;

use super::InitError;
use super::rules::{Family, HOOK_CHAINS, OWN_CHAINS, Rule, RuleSet, TABLE};

/// keel's part of one family's `nat` table, as `iptables -t nat -S` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// Those of [`OWN_CHAINS`] that exist.
    pub(crate) chains: Vec<&'static str>,
    /// Every rule in a hook chain that jumps to one of keel's chains, with its spec as listed.
    pub(crate) jumps: Vec<(String, String)>,
    /// The rules in keel's chains, in order: (chain, spec as listed).
    pub(crate) rules: Vec<(&'static str, String)>,
}

impl Observed {
    /// Parses `iptables -t <table> -S`. Lines about anything but keel's chains are ignored.
    pub(crate) fn parse(listing: &str) -> Self {
        let mut observed = Self::default();
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("-N"), Some(chain)) => {
                    if let Some(own) = OWN_CHAINS.iter().find(|own| **own == chain) {
                        observed.chains.push(own);
                    }
                }
                (Some("-A"), Some(chain)) => {
                    let spec = line
                        .trim()
                        .strip_prefix("-A")
                        .map(str::trim_start)
                        .and_then(|rest| rest.strip_prefix(chain))
                        .map(str::trim)
                        .unwrap_or_default();
                    if let Some(own) = OWN_CHAINS.iter().find(|own| **own == chain) {
                        observed.rules.push((own, spec.to_owned()));
                    } else if HOOK_CHAINS.contains(&chain)
                        && jump_target(spec).is_some_and(|target| OWN_CHAINS.contains(&target))
                    {
                        observed.jumps.push((chain.to_owned(), spec.to_owned()));
                    }
                }
                _ => {}
            }
        }
        observed
    }

    /// Whether nothing of keel's is installed.
    pub(crate) fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The chain a rule's `-j` or `-g` sends packets to. Quoted arguments (comments) are skipped
/// whole, so a comment that mentions a chain is not mistaken for a jump.
fn jump_target(spec: &str) -> Option<&str> {
    let words = words(spec);
    words
        .iter()
        .position(|w| matches!(*w, "-j" | "--jump" | "-g" | "--goto"))
        .and_then(|at| words.get(at + 1).copied())
}

/// Splits a rule the way `iptables -S` quotes it: on spaces, with `"..."` (and its `\"`
/// escapes) as one word.
fn words(spec: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in spec.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if let Some(from) = start.take() {
                    words.push(&spec[from..at]);
                }
                continue;
            }
            _ => {}
        }
        start.get_or_insert(at);
    }
    if let Some(from) = start {
        words.push(&spec[from..]);
    }
    words
}

/// One iptables command against [`TABLE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    NewChain(&'static str),
    FlushChain(&'static str),
    DeleteChain(&'static str),
    Append(Rule),
    Delete { chain: String, spec: String },
}

/// The command's arguments after `-t nat`, as one would type them.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NewChain(chain) => write!(f, "-N {chain}"),
            Self::FlushChain(chain) => write!(f, "-F {chain}"),
            Self::DeleteChain(chain) => write!(f, "-X {chain}"),
            Self::Append(rule) => write!(f, "{rule}"),
            Self::Delete { chain, spec } => write!(f, "-D {chain} {spec}"),
        }
    }
}

/// The commands that turn `observed` into exactly `desired`, whatever was there before: a
/// partial install, an install with other flags, or a duplicated jump. When the table already
/// is `desired`, there are none: running `init` twice changes nothing, not even for a moment.
///
/// keel's chains are created and filled before any jump into them is added, so a first install
/// never redirects into a half-built chain. A chain whose rules are already exactly the desired
/// ones is left alone; one that differs is flushed and refilled in place, and for the few
/// commands in between its connections are not redirected (the empty chain falls through)
/// rather than refused. The jumps are left alone when they already are exactly the desired
/// ones; otherwise every jump into keel's chains is deleted and the desired ones appended.
pub(crate) fn plan_install(desired: &RuleSet, observed: &Observed) -> Vec<Step> {
    let mut steps: Vec<Step> = OWN_CHAINS
        .into_iter()
        .filter(|chain| !observed.chains.contains(chain))
        .map(Step::NewChain)
        .collect();
    for chain in OWN_CHAINS {
        let want = desired.rules.iter().filter(|rule| rule.chain == chain);
        let have = observed.rules.iter().filter(|(c, _)| *c == chain);
        let same = want
            .clone()
            .map(|rule| rule.spec.as_str())
            .eq(have.map(|(_, spec)| spec.as_str()));
        if same && observed.chains.contains(&chain) {
            continue;
        }
        if observed.chains.contains(&chain) {
            steps.push(Step::FlushChain(chain));
        }
        steps.extend(want.cloned().map(Step::Append));
    }

    let jumps_in_place = observed.jumps.len() == desired.jumps.len()
        && desired.jumps.iter().all(|want| {
            observed
                .jumps
                .iter()
                .any(|(chain, spec)| chain == want.chain && *spec == want.spec)
        });
    if !jumps_in_place {
        steps.extend(observed.jumps.iter().map(|(chain, spec)| Step::Delete {
            chain: chain.clone(),
            spec: spec.clone(),
        }));
        steps.extend(desired.jumps.iter().cloned().map(Step::Append));
    }
    steps
}

/// The commands that remove everything keel installed, and nothing else: the jumps first (so no
/// packet enters a chain being emptied), then the chains' rules, then the chains — a chain can
/// only be deleted once no rule, in any of them, refers to it.
pub(crate) fn plan_cleanup(observed: &Observed) -> Vec<Step> {
    let mut steps: Vec<Step> = observed
        .jumps
        .iter()
        .map(|(chain, spec)| Step::Delete {
            chain: chain.clone(),
            spec: spec.clone(),
        })
        .collect();
    steps.extend(observed.chains.iter().copied().map(Step::FlushChain));
    steps.extend(observed.chains.iter().copied().map(Step::DeleteChain));
    steps
}

/// One family's `nat` table, reached through its binary.
pub(crate) struct NatTable {
    family: Family,
    iptables: IPTables,
}

impl NatTable {
    /// Finds the family's binary and its version. Fails with [`InitError::BinaryMissing`] when it
    /// is not on `PATH`.
    pub(crate) fn open(family: Family) -> Result<Self, InitError> {
        let mut iptables = iptables::new(family == Family::V6).map_err(|error| match error
            .downcast_ref::<io::Error>()
        {
            Some(io) if io.kind() == io::ErrorKind::NotFound => InitError::BinaryMissing {
                binary: family.binary(),
            },
            _ => InitError::BinaryUnusable {
                binary: family.binary(),
                detail: error.to_string(),
            },
        })?;
        // Never resolve addresses to names while listing: keel compares the text, and a DNS
        // lookup per rule would stall an init container.
        iptables.set_numeric(true);
        Ok(Self { family, iptables })
    }

    pub(crate) fn family(&self) -> Family {
        self.family
    }

    /// Reads keel's part of the table. This is also where a missing permission or a kernel
    /// without this family's `nat` table is found, before anything is changed.
    pub(crate) fn observe(&self) -> Result<Observed, InitError> {
        let output = self
            .iptables
            .execute(TABLE, "-S")
            .map_err(|error| self.failure("-S", error.as_ref()))?;
        if !output.status.success() {
            return Err(self.refusal(
                "-S",
                output.status.code(),
                &String::from_utf8_lossy(&output.stderr),
            ));
        }
        Ok(Observed::parse(&String::from_utf8_lossy(&output.stdout)))
    }

    /// Runs the steps in order, stopping at the first that fails.
    pub(crate) fn apply(&self, steps: &[Step]) -> Result<(), InitError> {
        for step in steps {
            tracing::debug!(family = %self.family, command = %self.command(step), "iptables");
            let done = match step {
                Step::NewChain(chain) => self.iptables.new_chain(TABLE, chain),
                Step::FlushChain(chain) => self.iptables.flush_chain(TABLE, chain),
                Step::DeleteChain(chain) => self.iptables.delete_chain(TABLE, chain),
                Step::Append(rule) => self.iptables.append(TABLE, rule.chain, &rule.spec),
                Step::Delete { chain, spec } => self.iptables.delete(TABLE, chain, spec),
            };
            done.map_err(|error| self.failure(&step.to_string(), error.as_ref()))?;
        }
        Ok(())
    }

    /// The full command line of a step, for logs and errors.
    pub(crate) fn command(&self, step: &dyn fmt::Display) -> String {
        format!("{} -t {TABLE} {step}", self.family.binary())
    }

    /// Turns an error of the `iptables` crate into one that says what failed and what is needed.
    fn failure(&self, args: &str, error: &(dyn std::error::Error + 'static)) -> InitError {
        if let Some(refused) = error.downcast_ref::<IptablesError>() {
            return self.refusal(args, Some(refused.code), &refused.msg);
        }
        match error.downcast_ref::<io::Error>() {
            Some(io) if io.kind() == io::ErrorKind::NotFound => InitError::BinaryMissing {
                binary: self.family.binary(),
            },
            _ => InitError::CommandFailed {
                command: self.command(&args),
                code: None,
                stderr: error.to_string(),
            },
        }
    }

    /// Classifies a non-zero exit by what the binary printed.
    fn refusal(&self, args: &str, code: Option<i32>, stderr: &str) -> InitError {
        let command = self.command(&args);
        let stderr = stderr.trim().to_owned();
        if stderr.contains("Permission denied") || stderr.contains("you must be root") {
            InitError::PermissionDenied { command, stderr }
        } else if stderr.contains("Table does not exist")
            || stderr.contains("insmod")
            || stderr.contains("Address family not supported")
        {
            InitError::NatUnavailable {
                family: self.family,
                command,
                stderr,
            }
        } else {
            InitError::CommandFailed {
                command,
                code,
                stderr,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::Policy;
    use super::*;

    fn policy() -> Policy {
        Policy::standard()
    }

    fn defaults() -> RuleSet {
        RuleSet::build(&policy(), Family::V4)
    }

    /// What `iptables -t nat -S` lists once `set` is installed in an otherwise empty table.
    fn listing_after(set: &RuleSet) -> String {
        let mut text = String::from(
            "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n",
        );
        for chain in OWN_CHAINS {
            text.push_str(&format!("-N {chain}\n"));
        }
        for rule in set.jumps.iter().chain(&set.rules) {
            text.push_str(&format!("{rule}\n"));
        }
        text
    }

    fn appended_jumps(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|step| match step {
                Step::Append(rule) if HOOK_CHAINS.contains(&rule.chain) => Some(rule.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_second_install_changes_nothing() {
        let set = defaults();
        let observed = Observed::parse(&listing_after(&set));
        assert_eq!(observed.chains, OWN_CHAINS);
        assert_eq!(observed.jumps.len(), 2);
        assert_eq!(observed.rules.len(), set.rules.len());
        assert_eq!(plan_install(&set, &observed), []);
    }

    #[test]
    fn a_first_install_creates_fills_then_jumps() {
        let set = defaults();
        let steps = plan_install(&set, &Observed::default());
        let text: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            &text[..4],
            [
                "-N KEEL_INBOUND",
                "-N KEEL_INBOUND_REDIRECT",
                "-N KEEL_OUTBOUND",
                "-N KEEL_OUTBOUND_REDIRECT"
            ]
        );
        assert_eq!(
            &text[text.len() - 2..],
            [
                "-A PREROUTING -p tcp -j KEEL_INBOUND",
                "-A OUTPUT -p tcp -j KEEL_OUTBOUND"
            ]
        );
        assert_eq!(steps.len(), 4 + set.rules.len() + 2);
    }

    #[test]
    fn an_install_with_other_flags_refills_only_the_chains_that_differ() {
        let installed = defaults();
        let observed = Observed::parse(&listing_after(&installed));
        let desired = RuleSet::build(
            &Policy {
                outbound_exclude_ports: vec!["3306".parse().unwrap_or_else(|e| panic!("{e}"))],
                ..policy()
            },
            Family::V4,
        );
        let steps = plan_install(&desired, &observed);
        assert_eq!(steps[0], Step::FlushChain("KEEL_OUTBOUND"));
        assert!(
            steps[1..]
                .iter()
                .all(|step| matches!(step, Step::Append(rule) if rule.chain == "KEEL_OUTBOUND"))
        );
        let refilled: Vec<&str> = steps[1..]
            .iter()
            .filter_map(|step| match step {
                Step::Append(rule) => Some(rule.spec.as_str()),
                _ => None,
            })
            .collect();
        let wanted: Vec<&str> = desired
            .rules
            .iter()
            .filter(|rule| rule.chain == "KEEL_OUTBOUND")
            .map(|rule| rule.spec.as_str())
            .collect();
        assert_eq!(refilled, wanted);
    }

    #[test]
    fn duplicated_or_foreign_shaped_jumps_are_replaced_by_exactly_one_each() {
        let set = defaults();
        let listing = format!(
            "{}-A OUTPUT -p tcp -j KEEL_OUTBOUND\n-A OUTPUT -j KEEL_OUTBOUND\n",
            listing_after(&set)
        );
        let observed = Observed::parse(&listing);
        assert_eq!(observed.jumps.len(), 4);
        let steps = plan_install(&set, &observed);
        let deletes = steps
            .iter()
            .filter(|step| matches!(step, Step::Delete { .. }))
            .count();
        assert_eq!(deletes, 4);
        assert_eq!(
            appended_jumps(&steps),
            [
                "-A PREROUTING -p tcp -j KEEL_INBOUND",
                "-A OUTPUT -p tcp -j KEEL_OUTBOUND"
            ]
        );
    }

    #[test]
    fn a_partial_install_is_completed() {
        let set = defaults();
        let observed = Observed::parse(
            "-P OUTPUT ACCEPT\n-N KEEL_OUTBOUND\n-A KEEL_OUTBOUND -o lo -j RETURN\n",
        );
        let steps = plan_install(&set, &observed);
        let text: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            &text[..3],
            [
                "-N KEEL_INBOUND",
                "-N KEEL_INBOUND_REDIRECT",
                "-N KEEL_OUTBOUND_REDIRECT"
            ]
        );
        // The half-filled chain is emptied before it is filled; every rule is appended once.
        let flush = text.iter().position(|t| t == "-F KEEL_OUTBOUND");
        let first_outbound = text.iter().position(|t| t.starts_with("-A KEEL_OUTBOUND "));
        assert!(flush.is_some() && flush < first_outbound, "{text:?}");
        let appended_rules = steps
            .iter()
            .filter(|step| matches!(step, Step::Append(rule) if OWN_CHAINS.contains(&rule.chain)))
            .count();
        assert_eq!(appended_rules, set.rules.len());
        assert_eq!(appended_jumps(&steps).len(), 2);
    }

    #[test]
    fn other_rules_and_chains_are_not_observed() {
        let listing = "\
-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N ISTIO_OUTPUT
-N KEEL_SOMETHING_ELSE
-N KEEL_OUTBOUND
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -d 10.0.0.0/8 -m comment --comment \"not -j KEEL_OUTBOUND\" -j RETURN
-A OUTPUT -p tcp -j KEEL_OUTBOUND
-A KEEL_OUTBOUND -j KEEL_OUTBOUND_REDIRECT
-A POSTROUTING -j KEEL_OUTBOUND
";
        let observed = Observed::parse(listing);
        assert_eq!(observed.chains, ["KEEL_OUTBOUND"]);
        assert_eq!(
            observed.jumps,
            [("OUTPUT".to_owned(), "-p tcp -j KEEL_OUTBOUND".to_owned())]
        );
    }

    #[test]
    fn cleanup_deletes_jumps_then_flushes_then_deletes_chains() {
        let observed = Observed::parse(&listing_after(&defaults()));
        let text: Vec<String> = plan_cleanup(&observed)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "-D PREROUTING -p tcp -j KEEL_INBOUND",
                "-D OUTPUT -p tcp -j KEEL_OUTBOUND",
                "-F KEEL_INBOUND",
                "-F KEEL_INBOUND_REDIRECT",
                "-F KEEL_OUTBOUND",
                "-F KEEL_OUTBOUND_REDIRECT",
                "-X KEEL_INBOUND",
                "-X KEEL_INBOUND_REDIRECT",
                "-X KEEL_OUTBOUND",
                "-X KEEL_OUTBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn cleanup_of_nothing_is_nothing() {
        let observed = Observed::parse("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n");
        assert!(observed.is_empty());
        assert!(plan_cleanup(&observed).is_empty());
    }

    #[test]
    fn quoted_words_stay_whole() {
        assert_eq!(
            words(r#"-m comment --comment "a \"b\" -j X" -j RETURN"#),
            [
                "-m",
                "comment",
                "--comment",
                r#""a \"b\" -j X""#,
                "-j",
                "RETURN"
            ]
        );
        assert_eq!(jump_target("-p tcp -g KEEL_INBOUND"), Some("KEEL_INBOUND"));
        assert_eq!(jump_target("-p tcp"), None);
    }
}
