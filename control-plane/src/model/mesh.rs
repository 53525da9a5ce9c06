//! [`Model`]: one consistent, validated snapshot of the whole mesh, and the questions the rest of
//! the control plane asks of it (which workloads back a service, which policies guard a
//! workload, which mTLS mode applies, which service a hostname names).
//!
//! Queries are pure reads over the public maps, computed on demand so they can never disagree
//! with those maps. They must never mutate the model, and never panic on a key that is not in
//! the model (they answer "nothing" instead).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::resources::{
    AuthorizationPolicy, MeshConfigSpec, MtlsMode, ObjectKey, Service, TrafficPolicy, Workload,
};

/// The mesh as the control plane serves it. Built by [`Model::from_resources`], which guarantees
/// that every reference inside resolves and that nothing is defined twice.
///
/// Resources are shared with the files they were read from (and with earlier models), so a new
/// model after an edit holds the same allocation for every resource the edit did not touch:
/// building it copies no resource, and telling what changed starts with a pointer comparison.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    /// Defaults when no MeshConfig was given.
    pub mesh: MeshConfigSpec,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    /// Keyed by the *target service*, not by the policy's own name.
    pub traffic_policies: BTreeMap<ObjectKey, Arc<TrafficPolicy>>,
    pub authorization_policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
}

/// A label in a namespace: (namespace, key, value).
type LabelPair<'a> = (&'a str, &'a str, &'a str);

/// Whether `labels` carries every pair in `selector`.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The entries of a map keyed by [`ObjectKey`] that live in `namespace`.
fn in_namespace<'a, T>(
    map: &'a BTreeMap<ObjectKey, T>,
    namespace: &str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a T)> {
    map.range(ObjectKey::new(namespace, "")..)
        .take_while(move |(key, _)| key.namespace == namespace)
}

/// `host` as a hostname: lower case, without a trailing dot or a `:port` suffix.
fn normalize_host(host: &str) -> String {
    let host = if let Some(bracketed) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        bracketed
            .split_once(']')
            .map_or(bracketed, |(address, _)| address)
    } else {
        match host.rsplit_once(':') {
            // One colon followed by digits is a port; bare IPv6 literals have several colons.
            Some((name, port))
                if !name.contains(':')
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Model {
    /// Workloads in `namespace`, in name order.
    pub fn workloads_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Workload> {
        in_namespace(&self.workloads, namespace).map(|(_, w)| &**w)
    }

    /// The workloads a service selects: same namespace, labels containing the whole selector.
    /// A service with an empty selector selects nothing. Workloads that are not ready are
    /// included; readiness travels with each endpoint.
    pub fn endpoints_of(&self, service: &ObjectKey) -> Vec<&Workload> {
        let Some(svc) = self.services.get(service) else {
            return Vec::new();
        };
        if svc.spec.selector.is_empty() {
            return Vec::new();
        }
        self.workloads_in(&service.namespace)
            .filter(|w| selector_matches(&svc.spec.selector, &w.meta.labels))
            .collect()
    }

    /// An index answering [`Model::endpoints_of`] for every service without scanning every
    /// workload each time (a large mesh asks it once per service on every change).
    pub fn endpoint_index(&self) -> EndpointIndex<'_> {
        let mut by_label: HashMap<(&str, &str, &str), Vec<&Workload>> = HashMap::new();
        for (key, workload) in &self.workloads {
            for (k, v) in &workload.meta.labels {
                by_label
                    .entry((key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(workload);
            }
        }
        EndpointIndex {
            model: self,
            by_label,
        }
    }

    /// The services whose selector picks `workload`.
    pub fn services_of(&self, workload: &ObjectKey) -> Vec<&Service> {
        let Some(w) = self.workloads.get(workload) else {
            return Vec::new();
        };
        in_namespace(&self.services, &workload.namespace)
            .map(|(_, s)| &**s)
            .filter(|s| !s.spec.selector.is_empty())
            .filter(|s| selector_matches(&s.spec.selector, &w.meta.labels))
            .collect()
    }

    /// The services whose selector picks any of `workloads` (each as given, which need not be
    /// the version in this model). For more than a couple of workloads, the services of their
    /// namespaces are indexed by one pair of their selector first, so that each workload is
    /// matched against the few services that can select it rather than against all of them.
    pub fn services_selecting(&self, workloads: &[&Workload]) -> BTreeSet<ObjectKey> {
        let selects = |s: &Service, w: &Workload| {
            !s.spec.selector.is_empty() && selector_matches(&s.spec.selector, &w.meta.labels)
        };
        if workloads.len() <= 2 {
            return workloads
                .iter()
                .flat_map(|w| {
                    in_namespace(&self.services, &w.meta.namespace)
                        .filter(|(_, s)| selects(s, w))
                        .map(|(k, _)| k.clone())
                })
                .collect();
        }
        let namespaces: BTreeSet<&str> = workloads
            .iter()
            .map(|w| w.meta.namespace.as_str())
            .collect();
        let mut by_pair: HashMap<LabelPair<'_>, Vec<(&ObjectKey, &Service)>> = HashMap::new();
        for ns in namespaces {
            for (key, service) in in_namespace(&self.services, ns) {
                if let Some((k, v)) = service.spec.selector.iter().next() {
                    by_pair
                        .entry((ns, k.as_str(), v.as_str()))
                        .or_default()
                        .push((key, service));
                }
            }
        }
        let mut out = BTreeSet::new();
        for w in workloads {
            for (k, v) in &w.meta.labels {
                let pair = (w.meta.namespace.as_str(), k.as_str(), v.as_str());
                for (key, service) in by_pair.get(&pair).into_iter().flatten() {
                    if selects(service, w) {
                        out.insert((*key).clone());
                    }
                }
            }
        }
        out
    }

    /// The authorization policies that apply to a workload: those in the mesh's root namespace
    /// (mesh-wide) first, then those in the workload's namespace, each when its selector is empty
    /// or matches the workload's labels.
    pub fn policies_for(&self, workload: &ObjectKey) -> Vec<&AuthorizationPolicy> {
        let Some(w) = self.workloads.get(workload) else {
            return Vec::new();
        };
        let root = self.mesh.root_namespace.as_str();
        let mut namespaces = vec![root];
        if workload.namespace != root {
            namespaces.push(&workload.namespace);
        }
        namespaces
            .into_iter()
            .flat_map(|ns| in_namespace(&self.authorization_policies, ns))
            .map(|(_, p)| &**p)
            .filter(|p| selector_matches(&p.spec.selector, &w.meta.labels))
            .collect()
    }

    /// The mTLS mode for a workload's inbound traffic: the workload's own setting, else its
    /// namespace's, else the mesh's. An unmeshed workload has no proxy, so it is always
    /// [`MtlsMode::Disable`]: callers must not originate mTLS to it.
    pub fn mtls_mode_for(&self, workload: &ObjectKey) -> MtlsMode {
        if let Some(w) = self.workloads.get(workload) {
            if !w.spec.meshed {
                return MtlsMode::Disable;
            }
            if let Some(mode) = w.spec.mtls_mode {
                return mode;
            }
        }
        self.mesh
            .namespace_mtls
            .get(&workload.namespace)
            .copied()
            .unwrap_or(self.mesh.mtls)
    }

    /// The workload's SPIFFE ID: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, workload: &Workload) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.mesh.trust_domain, workload.meta.namespace, workload.spec.service_account
        )
    }

    /// The traffic policy configuring `service`, if any.
    pub fn traffic_policy_for(&self, service: &ObjectKey) -> Option<&TrafficPolicy> {
        self.traffic_policies.get(service).map(|p| &**p)
    }

    /// The service a hostname (or VIP) names, case-insensitively and ignoring a trailing dot or a
    /// `:port`. `None` when no service claims it or when several do (a short name like
    /// `articles` that exists in two namespaces); use [`Model::resolve_host_in`] to resolve
    /// those from a client's namespace.
    pub fn resolve_host(&self, host: &str) -> Option<&Service> {
        let host = normalize_host(host);
        let ip = host.parse::<IpAddr>().ok();
        let mut found = self
            .services
            .values()
            .map(|s| &**s)
            .filter(|s| claims(s, &host, ip));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// Like [`Model::resolve_host`], but as seen from a client in `namespace`: a service in that
    /// namespace wins over services elsewhere, as with Kubernetes DNS search paths.
    pub fn resolve_host_in(&self, namespace: &str, host: &str) -> Option<&Service> {
        let normalized = normalize_host(host);
        let ip = normalized.parse::<IpAddr>().ok();
        in_namespace(&self.services, namespace)
            .map(|(_, s)| &**s)
            .find(|s| claims(s, &normalized, ip))
            .or_else(|| self.resolve_host(host))
    }
}

fn claims(service: &Service, host: &str, ip: Option<IpAddr>) -> bool {
    service.spec.hostnames.iter().any(|h| h == host)
        || ip.is_some_and(|ip| service.spec.vips.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Articles.Demo.:8080"), "articles.demo");
        assert_eq!(normalize_host("articles"), "articles");
        assert_eq!(normalize_host("[fd00::1]:80"), "fd00::1");
        assert_eq!(normalize_host("fd00::1"), "fd00::1");
    }

    #[test]
    fn services_selecting_agrees_with_services_of() {
        let mut text = String::new();
        // Services with one- and two-label selectors in two namespaces, and one selecting
        // nothing; workloads with every combination of labels.
        for (ns, name, selector) in [
            ("a", "web", "{app: web}"),
            ("a", "web-v2", "{app: web, version: v2}"),
            ("a", "api", "{app: api}"),
            ("b", "web", "{app: web}"),
            ("a", "none", "{}"),
        ] {
            text.push_str(&format!(
                "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{port: 80}}]\n  selector: {selector}\n---\n"
            ));
        }
        let mut ip = 0;
        for ns in ["a", "b"] {
            for labels in [
                "{app: web}",
                "{app: web, version: v2}",
                "{app: api}",
                "{other: x}",
            ] {
                ip += 1;
                text.push_str(&format!(
                    "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w{ip}, namespace: {ns}, labels: {labels}}}\nspec:\n  serviceAccount: sa\n  addresses: [10.0.0.{ip}]\n---\n"
                ));
            }
        }
        let resources =
            crate::model::parse_file(std::path::Path::new("m.yaml"), &text).expect("parses");
        let model = Model::from_resources(resources).expect("valid");
        let all: Vec<&Workload> = model.workloads.values().map(|w| &**w).collect();
        let expected = |ws: &[&Workload]| -> BTreeSet<ObjectKey> {
            ws.iter()
                .flat_map(|w| model.services_of(&w.meta.key()))
                .map(|s| s.meta.key())
                .collect()
        };
        // Indexed (many workloads) and scanned (one or two) alike.
        assert_eq!(model.services_selecting(&all), expected(&all));
        assert_eq!(model.services_selecting(&all).len(), 4);
        for w in &all {
            assert_eq!(
                model.services_selecting(&[w]),
                expected(&[w]),
                "{}",
                w.meta.key()
            );
        }
        assert_eq!(model.services_selecting(&all[1..3]), expected(&all[1..3]));
    }
}

/// Workloads by (namespace, label key, label value), in key order within each list. See
/// [`Model::endpoint_index`].
#[derive(Debug)]
pub struct EndpointIndex<'a> {
    model: &'a Model,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Workload>>,
}

impl<'a> EndpointIndex<'a> {
    /// The same answer as [`Model::endpoints_of`], from the index: the shortest list among the
    /// selector's labels, filtered by the whole selector.
    pub fn endpoints_of(&self, service: &ObjectKey) -> Vec<&'a Workload> {
        let Some(svc) = self.model.services.get(service) else {
            return Vec::new();
        };
        let shortest = svc
            .spec
            .selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(service.namespace.as_str(), k.as_str(), v.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            })
            .min_by_key(|list| list.len());
        let Some(candidates) = shortest else {
            return Vec::new();
        };
        candidates
            .iter()
            .copied()
            .filter(|w| selector_matches(&svc.spec.selector, &w.meta.labels))
            .collect()
    }
}
