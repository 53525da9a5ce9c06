//! Locality-aware balancing: which priority each endpoint of a service has for this proxy, how
//! load spills from one priority to the next as endpoints become unhealthy, and how a priority's
//! load is shared between localities when a `distribute` rule weights them.
//!
//! Priorities follow Istio's `localityLbSetting` (checked against
//! `pilot/pkg/networking/core/loadbalancer/loadbalancer.go`):
//!
//! | priority | the endpoint matches the caller on |
//! | --- | --- |
//! | 0 | region, zone and subzone |
//! | 1 | region and zone |
//! | 2 | region |
//! | 3 | nothing |
//! | 4 | nothing, and a `failover` rule for the caller's region names another region |
//!
//! With `failover_priority` labels, an endpoint matching the first `k` of `N` labels gets
//! priority `N - k`; if `failover` rules are set as well, the locality priority above refines it
//! (`label priority * 5 + locality priority`). Priorities are then compacted to `0..n`.
//! A `distribute` rule whose `from` matches the caller instead keeps every endpoint at priority 0
//! and weights localities; those it does not name receive nothing. A matching rule wins over
//! `failover_priority` (as in Istio).
//!
//! Load per priority is Envoy's arithmetic (`recalculatePerPriorityState`, `distributeLoad`,
//! `recalculatePerPriorityPanic` and `recalculateLoadInTotalPanic` in
//! `source/common/upstream/load_balancer_impl.cc`), in integers:
//!
//! ```text
//! health(P) = min(100, 140 * healthy(P) / total(P))
//! NTA       = min(100, sum of health)
//! load(P)   = min(remaining, health(P) * 100 / NTA), in priority order; the rounding remainder
//!             goes to the first priority with health above 0
//! ```
//!
//! A priority is in panic when NTA < 100 and its healthy share is below the panic threshold; it
//! then balances over all its usable endpoints, ejected ones included. When every priority is in
//! panic, load is split by endpoint count.
//!
//! Where keel differs from Envoy, on purpose:
//! - locality failover applies whether or not outlier detection is configured (Istio turns it
//!   off without outlier detection; readiness from the control plane is health too);
//! - endpoints the control plane reports not ready count in `total` (so a zone losing pods sheds
//!   load gradually, as Envoy does with EDS health) but are never *used*, not even in panic, and
//!   the total-panic split counts only usable endpoints: a pod that is not ready is not a
//!   candidate, whatever else fails;
//! - there is no "degraded" state (keel has no active health checking that would produce one);
//! - a caller that no `distribute` rule's `from` matches gets the failover priorities above
//!   (by locality, or by `failover_priority` labels), where Istio applies neither weights nor
//!   priorities and spreads such a caller over every endpoint alike. Locality failover is on
//!   (`enabled`); rules written for some callers' localities should not send every other caller
//!   across regions.
//!
//! Everything here is a pure function of its inputs; it must never touch shared state.

use std::collections::BTreeMap;

pub use crate::config::Locality;
use crate::config::{DistributeRule, Endpoint, LocalityFailover, LocalityPattern};

/// Envoy's default overprovisioning factor, in percent.
pub const OVERPROVISIONING_FACTOR: u64 = 140;

/// The topology labels a locality implies, under Kubernetes' and Istio's names, so that
/// `failover_priority` can name them like any workload label.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// The caller, as locality-aware balancing sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    pub locality: Locality,
    /// The labels of the proxy's own workload.
    pub labels: BTreeMap<String, String>,
}

/// Where each endpoint goes: its priority, and the weight of its locality within that priority
/// (`None`: localities are not weighted, every endpoint of a priority competes directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Per endpoint, in the input order: its priority (compacted, 0 is best), or `None` when a
    /// `distribute` rule leaves its locality out.
    pub priority: Vec<Option<usize>>,
    /// Per endpoint: the configured weight of its locality when a `distribute` rule applies.
    pub locality_weight: Option<Vec<u32>>,
    /// How many priorities there are.
    pub levels: usize,
}

impl Placement {
    /// Every endpoint at priority 0, localities unweighted.
    pub fn flat(endpoints: usize) -> Placement {
        Placement {
            priority: vec![Some(0); endpoints],
            locality_weight: None,
            levels: usize::from(endpoints > 0),
        }
    }
}

/// Places `endpoints` for `client` under `policy` (`None` or disabled: all at priority 0).
pub fn place(
    client: &Client,
    endpoints: &[&Endpoint],
    policy: Option<&LocalityFailover>,
) -> Placement {
    let Some(policy) = policy.filter(|p| p.enabled) else {
        return Placement::flat(endpoints.len());
    };
    // Istio: distribute and failover are exclusive, and a matching distribute rule wins. Where
    // none matches, Istio applies nothing; keel falls through to failover (module docs).
    if let Some(rule) = policy
        .distribute
        .iter()
        .find(|r| r.from.matches(&client.locality))
    {
        return distribute(rule, endpoints);
    }
    let raw: Vec<usize> = endpoints
        .iter()
        .map(|e| {
            let by_locality = locality_priority(&client.locality, &e.locality, policy);
            if policy.failover_priority.is_empty() {
                by_locality
            } else {
                let by_labels = label_priority(client, e, policy);
                if policy.failover.is_empty() {
                    by_labels
                } else {
                    by_labels * 5 + by_locality
                }
            }
        })
        .collect();
    compact(&raw)
}

/// Istio's `LbPriority` plus its `failover` rule: 0 to 4.
fn locality_priority(client: &Locality, endpoint: &Locality, policy: &LocalityFailover) -> usize {
    if client.region == endpoint.region {
        if client.zone == endpoint.zone {
            if client.subzone == endpoint.subzone {
                return 0;
            }
            return 1;
        }
        return 2;
    }
    match policy.failover.iter().find(|f| f.from == client.region) {
        Some(rule) if rule.to != endpoint.region => 4,
        _ => 3,
    }
}

/// The value of `key` for a workload: its own label, or the one its locality implies.
fn label_value<'a>(
    labels: &'a BTreeMap<String, String>,
    locality: &'a Locality,
    key: &str,
) -> &'a str {
    if let Some(v) = labels.get(key) {
        return v;
    }
    match key {
        REGION_LABEL => &locality.region,
        ZONE_LABEL => &locality.zone,
        SUBZONE_LABEL => &locality.subzone,
        _ => "",
    }
}

/// `N - k` where the endpoint matches the first `k` of the `N` labels. A label with a value
/// (`key=value`) matches endpoints carrying that value; a bare key matches endpoints with the
/// caller's value (a label both lack matches, as in Istio).
fn label_priority(client: &Client, endpoint: &Endpoint, policy: &LocalityFailover) -> usize {
    let n = policy.failover_priority.len();
    for (k, label) in policy.failover_priority.iter().enumerate() {
        let wanted = match &label.value {
            Some(v) => v.as_str(),
            None => label_value(&client.labels, &client.locality, &label.key),
        };
        if label_value(&endpoint.labels, &endpoint.locality, &label.key) != wanted {
            return n - k;
        }
    }
    0
}

/// Renumbers priorities to `0..n` without gaps, keeping their order.
fn compact(raw: &[usize]) -> Placement {
    let mut used: Vec<usize> = raw.to_vec();
    used.sort_unstable();
    used.dedup();
    let priority = raw.iter().map(|p| used.binary_search(p).ok()).collect();
    Placement {
        priority,
        locality_weight: None,
        levels: used.len(),
    }
}

/// How specific a locality pattern is: the number of segments before any `*`.
fn specificity(pattern: &LocalityPattern) -> usize {
    pattern
        .as_str()
        .split('/')
        .take_while(|s| *s != "*")
        .count()
}

/// Istio's `applyLocalityWeights`: each `to` pattern's weight is divided among the localities it
/// matches in proportion to their endpoints' weights (rounded up); localities no pattern matches
/// get nothing. Where Istio takes patterns in map order (so overlapping patterns are decided by
/// chance), keel lets the most specific pattern claim a locality first.
fn distribute(rule: &DistributeRule, endpoints: &[&Endpoint]) -> Placement {
    let mut patterns: Vec<(&LocalityPattern, u32)> = rule.to.iter().map(|(p, w)| (p, *w)).collect();
    patterns.sort_by(|a, b| specificity(b.0).cmp(&specificity(a.0)).then(a.0.cmp(b.0)));

    // Localities, in order of first appearance, with their endpoints' total weight.
    let mut localities: Vec<(&Locality, u64)> = Vec::new();
    let mut group_of = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let index = match localities.iter().position(|(l, _)| **l == e.locality) {
            Some(i) => i,
            None => {
                localities.push((&e.locality, 0));
                localities.len() - 1
            }
        };
        localities[index].1 += u64::from(e.weight.max(1));
        group_of.push(index);
    }
    let mut weight: Vec<Option<u32>> = vec![None; localities.len()];
    for (pattern, pattern_weight) in patterns {
        let matched: Vec<usize> = (0..localities.len())
            .filter(|i| weight[*i].is_none() && pattern.matches(localities[*i].0))
            .collect();
        let total: u64 = matched.iter().map(|i| localities[*i].1).sum();
        for i in matched {
            let share = (localities[i].1 * u64::from(pattern_weight)).div_ceil(total.max(1));
            weight[i] = Some(u32::try_from(share).unwrap_or(u32::MAX));
        }
    }
    let priority = group_of
        .iter()
        .map(|g| weight[*g].filter(|w| *w > 0).map(|_| 0))
        .collect::<Vec<_>>();
    let locality_weight = group_of.iter().map(|g| weight[*g].unwrap_or(0)).collect();
    let levels = usize::from(priority.iter().any(Option::is_some));
    Placement {
        priority,
        locality_weight: Some(locality_weight),
        levels,
    }
}

/// The health of one priority (or one locality) in endpoint counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every endpoint placed there, ready or not.
    pub total: u32,
    /// Ready and not ejected.
    pub healthy: u32,
    /// Ready (ejected ones included): what panic balances over.
    pub usable: u32,
}

impl Counts {
    /// `min(100, 140 * healthy / total)`: 100 down to about 72% healthy.
    pub fn health(self) -> u32 {
        if self.total == 0 {
            return 0;
        }
        let h = OVERPROVISIONING_FACTOR * u64::from(self.healthy) / u64::from(self.total);
        h.min(100) as u32
    }
}

/// The share of requests (percent, adding up to 100) each priority receives, and which
/// priorities are in panic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    pub load: Vec<u32>,
    pub panic: Vec<bool>,
}

/// Envoy's per-priority load for priorities with `levels` counts and a panic threshold in
/// percent (0 disables panic).
pub fn priority_load(levels: &[Counts], panic_threshold: u8) -> PriorityLoad {
    let n = levels.len();
    let mut load = vec![0u32; n];
    if n == 0 {
        return PriorityLoad {
            load,
            panic: Vec::new(),
        };
    }
    let health: Vec<u32> = levels.iter().map(|c| c.health()).collect();
    let nta = health.iter().sum::<u32>().min(100);
    if nta > 0 {
        let mut remaining = 100u32;
        let mut first_available = None;
        for (i, h) in health.iter().enumerate() {
            if first_available.is_none() && *h > 0 {
                first_available = Some(i);
            }
            load[i] = remaining.min((h * 100).checked_div(nta).unwrap_or(0));
            remaining -= load[i];
        }
        if let (Some(first), true) = (first_available, remaining > 0) {
            load[first] += remaining;
        }
    }
    if panic_threshold == 0 && nta == 0 {
        // Nothing is healthy and panic is off: the load must still add up; the pick finds
        // nothing and the caller answers "no healthy upstream".
        load[0] = 100;
        return PriorityLoad {
            load,
            panic: vec![false; n],
        };
    }
    let panic: Vec<bool> = levels
        .iter()
        .map(|c| {
            // Envoy: a priority with no hosts is 0% healthy.
            let below = if c.total == 0 {
                panic_threshold > 0
            } else {
                100 * u64::from(c.healthy) < u64::from(panic_threshold) * u64::from(c.total)
            };
            nta != 100 && below
        })
        .collect();
    if panic.iter().all(|p| *p) {
        load = total_panic_load(levels);
    }
    PriorityLoad { load, panic }
}

/// Every priority in panic: load in proportion to usable endpoints (Envoy counts every host; keel
/// never sends to an endpoint that is not ready, so it does not count those).
fn total_panic_load(levels: &[Counts]) -> Vec<u32> {
    let mut load = vec![0u32; levels.len()];
    let total: u64 = levels.iter().map(|c| u64::from(c.usable)).sum();
    if total == 0 {
        load[0] = 100;
        return load;
    }
    let mut remaining = 100u32;
    let mut first_nonempty = None;
    for (i, c) in levels.iter().enumerate() {
        if first_nonempty.is_none() && c.usable > 0 {
            first_nonempty = Some(i);
        }
        load[i] = (100 * u64::from(c.usable) / total) as u32;
        remaining -= load[i];
    }
    if let Some(first) = first_nonempty {
        load[first] += remaining;
    }
    load
}

/// A locality's effective weight within its priority (Envoy's locality-weighted balancing):
/// `weight * min(100, 140 * healthy / total)`; in panic, its configured weight if it has usable
/// endpoints.
pub fn effective_locality_weight(weight: u32, counts: Counts, panic: bool) -> u64 {
    if panic {
        return if counts.usable > 0 {
            u64::from(weight)
        } else {
            0
        };
    }
    u64::from(weight) * u64::from(counts.health())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FailoverLabel, FailoverRule};

    fn counts(total: u32, healthy: u32) -> Counts {
        Counts {
            total,
            healthy,
            usable: total,
        }
    }

    #[test]
    fn envoy_worked_example_spill() {
        // P0 has 10 hosts, P1 4 (the priority levels page of Envoy's docs).
        let load = |p0, p1| priority_load(&[counts(10, p0), counts(4, p1)], 50);
        assert_eq!(load(10, 4).load, [100, 0]);
        // A priority stays at 100% down to about 72% healthy.
        assert_eq!(load(8, 4).load, [100, 0]);
        assert_eq!(load(7, 4).load, [98, 2]);
        assert_eq!(load(6, 4).load, [84, 16]);
        assert_eq!(load(3, 4).load, [42, 58]);
        // P1 at 1 healthy: health 42 and 35, NTA 77 -> 54 / 45, remainder 1 to P0 (without a
        // panic threshold, the health-based split stands).
        let no_panic = priority_load(&[counts(10, 3), counts(4, 1)], 0);
        assert_eq!(no_panic.load, [55, 45]);
        assert_eq!(no_panic.panic, [false, false]);
        // Both priorities are below the 50% panic threshold with NTA < 100: total panic, split
        // by host count, 71 / 28 and the remainder to P0.
        let panic = load(3, 1);
        assert_eq!(panic.panic, [true, true]);
        assert_eq!(panic.load, [72, 28]);
    }

    #[test]
    fn panic_only_when_total_availability_is_short() {
        // P0 at 40% healthy is in panic only if the other priorities cannot make up for it.
        let covered = priority_load(&[counts(10, 4), counts(4, 4)], 50);
        assert_eq!(covered.load, [56, 44]);
        assert_eq!(covered.panic, [false, false]);
        let alone = priority_load(&[counts(10, 4)], 50);
        assert_eq!(alone.load, [100]);
        assert_eq!(alone.panic, [true]);
        // A single priority at 80% healthy is fully available: no panic.
        assert_eq!(priority_load(&[counts(10, 8)], 50).panic, [false]);
    }

    #[test]
    fn nothing_healthy() {
        let none = priority_load(&[counts(3, 0), counts(3, 0)], 0);
        assert_eq!(none.load, [100, 0]);
        assert_eq!(none.panic, [false, false]);
        // With panic on, everything is in panic and load follows usable endpoints.
        let all_panic = priority_load(&[counts(3, 0), counts(1, 0)], 50);
        assert_eq!(all_panic.load, [75, 25]);
        assert_eq!(all_panic.panic, [true, true]);
        // A priority whose endpoints are all not ready takes no panic load.
        let not_ready = priority_load(
            &[
                Counts {
                    total: 3,
                    healthy: 0,
                    usable: 0,
                },
                Counts {
                    total: 3,
                    healthy: 1,
                    usable: 3,
                },
            ],
            50,
        );
        assert_eq!(not_ready.load, [0, 100]);
        assert!(priority_load(&[], 50).load.is_empty());
    }

    #[test]
    fn three_priorities_spill_in_order() {
        // The first zone is dead, the second half healthy: the third takes the rest.
        let l = priority_load(&[counts(2, 0), counts(2, 1), counts(2, 2)], 50);
        assert_eq!(l.load, [0, 70, 30]);
        assert_eq!(l.panic, [false, false, false]);
    }

    #[test]
    fn locality_weights_follow_health() {
        // Envoy's example: X (weight 1, 50% healthy -> 70) vs Y (weight 2, 100% -> 200): X gets
        // 70 / 270, about 26%.
        let x = effective_locality_weight(1, counts(4, 2), false);
        let y = effective_locality_weight(2, counts(4, 4), false);
        assert_eq!((x, y), (70, 200));
        assert_eq!(x * 100 / (x + y), 25);
        assert_eq!(effective_locality_weight(3, counts(2, 0), true), 3);
    }

    fn endpoint(region: &str, zone: &str, subzone: &str) -> Endpoint {
        Endpoint {
            address: "10.0.0.1".parse().expect("ip"),
            port: None,
            weight: 1,
            locality: Locality {
                region: region.into(),
                zone: zone.into(),
                subzone: subzone.into(),
            },
            identity: None,
            ready: true,
            workload: String::new(),
            meshed: true,
            mtls: false,
            labels: BTreeMap::new(),
        }
    }

    fn client(region: &str, zone: &str, subzone: &str) -> Client {
        Client {
            locality: endpoint(region, zone, subzone).locality,
            labels: BTreeMap::new(),
        }
    }

    fn failover() -> LocalityFailover {
        LocalityFailover {
            enabled: true,
            failover_priority: Vec::new(),
            failover: Vec::new(),
            distribute: Vec::new(),
        }
    }

    #[test]
    fn priorities_by_locality_match() {
        let eps = [
            endpoint("r2", "z9", ""),
            endpoint("r1", "z1", "s1"),
            endpoint("r1", "z1", "s2"),
            endpoint("r1", "z2", ""),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let c = client("r1", "z1", "s1");
        let placed = place(&c, &refs, Some(&failover()));
        assert_eq!(placed.priority, [Some(3), Some(0), Some(1), Some(2)]);
        assert_eq!(placed.levels, 4);
        // Gaps are compacted: without the subzone neighbour, region-only becomes 1.
        let placed = place(&c, &[&eps[1], &eps[3], &eps[0]], Some(&failover()));
        assert_eq!(placed.priority, [Some(0), Some(1), Some(2)]);
        // Disabled, or no policy: one priority.
        let mut off = failover();
        off.enabled = false;
        assert_eq!(place(&c, &refs, Some(&off)), Placement::flat(4));
        assert_eq!(place(&c, &refs, None).levels, 1);
    }

    #[test]
    fn failover_rules_demote_other_regions() {
        let eps = [
            endpoint("eu", "a", ""),
            endpoint("us", "a", ""),
            endpoint("ap", "a", ""),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut policy = failover();
        policy.failover.push(FailoverRule {
            from: "eu".into(),
            to: "us".into(),
        });
        let placed = place(&client("eu", "b", ""), &refs, Some(&policy));
        // eu (region match: 2), us (the failover target: 3), ap (4); compacted.
        assert_eq!(placed.priority, [Some(0), Some(1), Some(2)]);
        // A client in a region without a rule sees us and ap alike.
        let placed = place(&client("ap", "b", ""), &refs, Some(&policy));
        assert_eq!(placed.priority, [Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn failover_priority_labels() {
        let mut eps = [
            endpoint("r1", "z1", ""),
            endpoint("r1", "z2", ""),
            endpoint("r2", "z1", ""),
            endpoint("r1", "z1", ""),
        ];
        eps[0].labels.insert("net".into(), "n1".into());
        eps[1].labels.insert("net".into(), "n1".into());
        eps[2].labels.insert("net".into(), "n1".into());
        eps[3].labels.insert("net".into(), "n2".into());
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut c = client("r1", "z1", "");
        c.labels.insert("net".into(), "n1".into());
        let mut policy = failover();
        policy.failover_priority = vec![
            FailoverLabel {
                key: "net".into(),
                value: None,
            },
            FailoverLabel {
                key: REGION_LABEL.into(),
                value: None,
            },
            FailoverLabel {
                key: ZONE_LABEL.into(),
                value: None,
            },
        ];
        // Matches on 3, 2, 1 and 0 labels (the last differs on the first label, so its region
        // and zone do not count).
        let placed = place(&c, &refs, Some(&policy));
        assert_eq!(placed.priority, [Some(0), Some(1), Some(2), Some(3)]);
        // A value in the label overrides the caller's.
        policy.failover_priority[0].value = Some("n2".into());
        let placed = place(&c, &refs, Some(&policy));
        assert_eq!(placed.priority, [Some(1), Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn distribute_weights_localities_and_empties_the_rest() {
        let eps = [
            endpoint("r1", "z1", ""),
            endpoint("r1", "z2", ""),
            endpoint("r1", "z2", ""),
            endpoint("r1", "z3", ""),
            endpoint("r2", "z1", ""),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut policy = failover();
        let pattern = |s: &str| LocalityPattern::new(s).expect("pattern");
        policy.distribute.push(DistributeRule {
            from: pattern("r1/z1"),
            to: BTreeMap::from([(pattern("r1/z1"), 80), (pattern("r1/*"), 20)]),
        });
        let placed = place(&client("r1", "z1", ""), &refs, Some(&policy));
        // r1/z1 takes 80; r1/* splits 20 over z2 (2 endpoints) and z3 (1) by weight, rounded up;
        // r2 is named by no pattern and gets nothing.
        assert_eq!(placed.priority, [Some(0), Some(0), Some(0), Some(0), None]);
        assert_eq!(placed.locality_weight, Some(vec![80, 14, 14, 7, 0]));
        // A client the rule is not from gets the failover priorities.
        let placed = place(&client("r2", "z1", ""), &refs, Some(&policy));
        assert_eq!(placed.locality_weight, None);
        assert_eq!(placed.levels, 2);
    }

    #[test]
    fn a_caller_no_distribute_rule_matches_gets_failover_priorities() {
        // Where Istio applies neither weights nor priorities to such a caller (every endpoint
        // alike), keel places it as if there were no distribute rule.
        let mut eps = [
            endpoint("r1", "z1", ""),
            endpoint("r1", "z2", ""),
            endpoint("r2", "z1", ""),
            endpoint("r2", "z2", ""),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let pattern = |s: &str| LocalityPattern::new(s).expect("pattern");
        let mut policy = failover();
        policy.distribute.push(DistributeRule {
            from: pattern("r1/*"),
            to: BTreeMap::from([(pattern("r1/z1"), 50), (pattern("r1/z2"), 50)]),
        });
        // Matched: weighted, r2 emptied.
        let matched = place(&client("r1", "z1", ""), &refs, Some(&policy));
        assert_eq!(matched.priority, [Some(0), Some(0), None, None]);
        assert_eq!(matched.locality_weight, Some(vec![50, 50, 0, 0]));
        // Not matched: nothing emptied, nothing weighted, nearest first: its zone, its region,
        // the other region.
        let unmatched = place(&client("r2", "z2", ""), &refs, Some(&policy));
        assert_eq!(unmatched.priority, [Some(2), Some(2), Some(1), Some(0)]);
        assert_eq!(unmatched.locality_weight, None);
        let mut without_rule = policy.clone();
        without_rule.distribute.clear();
        assert_eq!(
            unmatched,
            place(&client("r2", "z2", ""), &refs, Some(&without_rule))
        );
        // With failover_priority labels, those decide for the unmatched caller.
        for (e, net) in eps.iter_mut().zip(["n1", "n2", "n2", "n1"]) {
            e.labels.insert("net".into(), net.into());
        }
        let refs: Vec<&Endpoint> = eps.iter().collect();
        policy.failover_priority = vec![FailoverLabel {
            key: "net".into(),
            value: Some("n2".into()),
        }];
        let by_label = place(&client("r2", "z2", ""), &refs, Some(&policy));
        assert_eq!(by_label.priority, [Some(1), Some(0), Some(0), Some(1)]);
        // The matched caller still gets its rule's weights.
        let matched = place(&client("r1", "z1", ""), &refs, Some(&policy));
        assert_eq!(matched.locality_weight, Some(vec![50, 50, 0, 0]));
    }
}
