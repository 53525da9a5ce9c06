//! [`Model`]: one consistent, validated snapshot of the whole mesh, and the questions the rest of
//! the control plane asks of it (which workloads back a service, which policies guard a
//! workload, which mTLS mode applies, which service a hostname names).
//!
//! Queries are pure reads over the public maps, computed on demand so they can never disagree
//! with those maps. They must never mutate the model, and never panic on a key that is not in
//! the model (they answer "nothing" instead).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::resources::{
    AuthorizationPolicy, MeshConfigSpec, MtlsMode, ObjectKey, Service, TrafficPolicy, Workload,
};

/// The mesh as the control plane serves it. Built by [`Model::from_resources`], which guarantees
/// that every reference inside resolves and that nothing is defined twice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    /// Defaults when no MeshConfig was given.
    pub mesh: MeshConfigSpec,
    pub services: BTreeMap<ObjectKey, Service>,
    pub workloads: BTreeMap<ObjectKey, Workload>,
    /// Keyed by the *target service*, not by the policy's own name.
    pub traffic_policies: BTreeMap<ObjectKey, TrafficPolicy>,
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
}

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
        in_namespace(&self.workloads, namespace).map(|(_, w)| w)
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
            .map(|(_, s)| s)
            .filter(|s| !s.spec.selector.is_empty())
            .filter(|s| selector_matches(&s.spec.selector, &w.meta.labels))
            .collect()
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
            .map(|(_, p)| p)
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
        self.traffic_policies.get(service)
    }

    /// The service a hostname (or VIP) names, case-insensitively and ignoring a trailing dot or a
    /// `:port`. `None` when no service claims it or when several do (a short name like
    /// `articles` that exists in two namespaces); use [`Model::resolve_host_in`] to resolve
    /// those from a client's namespace.
    pub fn resolve_host(&self, host: &str) -> Option<&Service> {
        let host = normalize_host(host);
        let ip = host.parse::<IpAddr>().ok();
        let mut found = self.services.values().filter(|s| claims(s, &host, ip));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// Like [`Model::resolve_host`], but as seen from a client in `namespace`: a service in that
    /// namespace wins over services elsewhere, as with Kubernetes DNS search paths.
    pub fn resolve_host_in(&self, namespace: &str, host: &str) -> Option<&Service> {
        let normalized = normalize_host(host);
        let ip = normalized.parse::<IpAddr>().ok();
        in_namespace(&self.services, namespace)
            .map(|(_, s)| s)
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
