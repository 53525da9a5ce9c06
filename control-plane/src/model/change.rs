//! Changing a valid model without revalidating all of it, and telling what changed between two
//! models.
//!
//! An edit to a mesh directory replaces the resources of the files it touched. [`IndexedModel`]
//! keeps a valid model with indexes of what resources claim (names, hostnames, VIPs, addresses),
//! so that such a replacement is checked against only what the replaced and new resources take
//! part in: their names, the route references and traffic-policy targets that point at them,
//! and their claims. The cost of an edit then grows with the edit, not with the mesh.
//!
//! The incremental check only decides whether the new state is valid. When it is not, the caller
//! validates the whole state with [`Model::from_resources`], whose errors (file, line, column,
//! and which of two definitions is the later) are the ones reported. This module must never
//! accept a state that [`Model::from_resources`] rejects; the tests compare both on random edits.
//!
//! [`ModelChange`] names the resources whose content differs between two models, comparing
//! allocations first (a model built from another shares every resource an edit did not touch)
//! and content, without positions, only where they differ.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::error::ValidationErrors;
use super::mesh::Model;
use super::resources::{MeshConfigSpec, ObjectKey, Resource, Service, ServiceSpec};

/// A valid model and the indexes that let a change to it be validated in isolation.
#[derive(Debug, Clone, Default)]
pub struct IndexedModel {
    model: Arc<Model>,
    index: Index,
}

/// What resources claim, beyond what the model's maps already answer.
#[derive(Debug, Clone, Default)]
struct Index {
    /// Whether a MeshConfig resource is defined (the model holds only its spec).
    mesh_config: bool,
    /// TrafficPolicy names; the model keys policies by their target.
    policy_names: HashSet<ObjectKey>,
    /// Hostname -> the services listing it.
    hostnames: HashMap<String, Vec<ObjectKey>>,
    vips: HashMap<IpAddr, Vec<ObjectKey>>,
    /// Workload address -> the workloads listing it.
    addresses: HashMap<IpAddr, Vec<ObjectKey>>,
}

impl Index {
    fn of(model: &Model, mesh_config: bool) -> Index {
        let mut index = Index {
            mesh_config,
            ..Index::default()
        };
        for policy in model.traffic_policies.values() {
            index.policy_names.insert(policy.meta.key());
        }
        for (key, service) in &model.services {
            index.claim_service(key, &service.spec);
        }
        for (key, workload) in &model.workloads {
            for address in &workload.spec.addresses {
                index
                    .addresses
                    .entry(*address)
                    .or_default()
                    .push(key.clone());
            }
        }
        index
    }

    fn claim_service(&mut self, key: &ObjectKey, spec: &ServiceSpec) {
        for hostname in &spec.hostnames {
            let claimants = self.hostnames.entry(hostname.clone()).or_default();
            claimants.push(key.clone());
        }
        for vip in &spec.vips {
            self.vips.entry(*vip).or_default().push(key.clone());
        }
    }

    fn release_service(&mut self, key: &ObjectKey, spec: &ServiceSpec) {
        for hostname in &spec.hostnames {
            release(&mut self.hostnames, hostname, key);
        }
        for vip in &spec.vips {
            release(&mut self.vips, vip, key);
        }
    }
}

/// Removes one claim of `key` on `claimed`, dropping the entry once nobody claims it.
fn release<K, Q>(claims: &mut HashMap<K, Vec<ObjectKey>>, claimed: &Q, key: &ObjectKey)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(claimants) = claims.get_mut(claimed) {
        if let Some(at) = claimants.iter().position(|k| k == key) {
            claimants.swap_remove(at);
        }
        if claimants.is_empty() {
            claims.remove(claimed);
        }
    }
}

/// A hostname may name several services only when it is the default short name of each (two
/// namespaces' `articles`), as [`Model::from_resources`] allows.
fn hostname_claims_valid(hostname: &str, claimants: &[ObjectKey]) -> bool {
    claimants.len() <= 1
        || claimants.iter().all(|k| {
            ServiceSpec::default_hostnames(k)
                .iter()
                .any(|h| h == hostname)
        })
}

/// Whether every route destination of `service` names a service of `model`, and a port it has.
fn routes_resolve(model: &Model, service: &Service) -> bool {
    service.spec.routes.iter().all(|route| {
        route.destinations.iter().all(|d| {
            model.services.get(&d.service).is_some_and(|target| {
                d.port.is_none_or(|p| target.spec.port(p).is_some())
                    && target.spec.visible_wherever(&service.spec)
            })
        })
    })
}

impl IndexedModel {
    /// Validates `resources` as a whole.
    pub fn new(resources: Vec<Resource>) -> Result<IndexedModel, ValidationErrors> {
        let mesh_config = resources
            .iter()
            .any(|r| matches!(r, Resource::MeshConfig(_)));
        let model = Model::from_resources(resources)?;
        let index = Index::of(&model, mesh_config);
        Ok(IndexedModel {
            model: Arc::new(model),
            index,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Replaces `removed` (resources of the current model, as they were read) with `added`.
    /// Returns false, changing nothing, when the result would be invalid; the caller then
    /// validates the whole state to say why.
    pub fn replace(&mut self, removed: &[Resource], added: &[Resource]) -> bool {
        let mut next = (*self.model).clone();
        let mesh_config = self.index.mesh_config;
        let valid = apply(&mut next, &mut self.index, removed, added);
        if valid {
            self.model = Arc::new(next);
        } else {
            // The index was changed along the way; rebuild it from the model still served.
            self.index = Index::of(&self.model, mesh_config);
        }
        valid
    }
}

/// Applies the replacement to `model` and `index`, checking as it goes. Both are garbage when
/// it returns false.
fn apply(model: &mut Model, index: &mut Index, removed: &[Resource], added: &[Resource]) -> bool {
    // Services whose removal or new ports may leave a route or a traffic policy dangling.
    let mut retargeted: BTreeMap<ObjectKey, (Vec<u16>, Option<BTreeSet<String>>)> = BTreeMap::new();
    for resource in removed {
        let key = resource.key();
        match resource {
            Resource::MeshConfig(_) => {
                model.mesh = MeshConfigSpec::default();
                index.mesh_config = false;
            }
            Resource::Workload(w) => {
                model.workloads.remove(&key);
                for address in &w.spec.addresses {
                    release(&mut index.addresses, address, &key);
                }
            }
            Resource::Service(s) => {
                model.services.remove(&key);
                index.release_service(&key, &s.spec);
                retargeted.insert(
                    key,
                    (
                        s.spec.ports.iter().map(|p| p.port).collect(),
                        s.spec.export_to.clone(),
                    ),
                );
            }
            Resource::TrafficPolicy(p) => {
                model.traffic_policies.remove(&p.spec.target);
                index.policy_names.remove(&key);
            }
            Resource::AuthorizationPolicy(_) => {
                model.authorization_policies.remove(&key);
            }
        }
    }

    let mut claimed_hostnames = BTreeSet::new();
    let mut claimed_ips = Vec::new();
    let mut added_services = Vec::new();
    let mut added_policies = Vec::new();
    for resource in added {
        let key = resource.key();
        let unique = match resource {
            Resource::MeshConfig(c) => {
                let first = !index.mesh_config;
                model.mesh = c.spec.clone();
                index.mesh_config = true;
                first
            }
            Resource::Workload(w) => {
                for address in &w.spec.addresses {
                    index
                        .addresses
                        .entry(*address)
                        .or_default()
                        .push(key.clone());
                    claimed_ips.push((false, *address));
                }
                model.workloads.insert(key, w.clone()).is_none()
            }
            Resource::Service(s) => {
                index.claim_service(&key, &s.spec);
                claimed_hostnames.extend(s.spec.hostnames.iter().map(String::as_str));
                claimed_ips.extend(s.spec.vips.iter().map(|v| (true, *v)));
                added_services.push(s);
                model.services.insert(key, s.clone()).is_none()
            }
            Resource::TrafficPolicy(p) => {
                added_policies.push(p);
                index.policy_names.insert(key)
                    && model
                        .traffic_policies
                        .insert(p.spec.target.clone(), p.clone())
                        .is_none()
            }
            Resource::AuthorizationPolicy(p) => model
                .authorization_policies
                .insert(key, p.clone())
                .is_none(),
        };
        if !unique {
            return false;
        }
    }

    // Claims: only those the new resources made can conflict.
    let hostnames_valid = claimed_hostnames.iter().all(|h| {
        index
            .hostnames
            .get(*h)
            .is_some_and(|c| hostname_claims_valid(h, c))
    });
    let ips_valid = claimed_ips.iter().all(|(vip, ip)| {
        let claims = if *vip { &index.vips } else { &index.addresses };
        claims.get(ip).is_some_and(|c| c.len() == 1)
    });
    if !hostnames_valid || !ips_valid {
        return false;
    }

    // References: from the new resources, and to the services that went away or lost ports.
    if !added_policies
        .iter()
        .all(|p| model.services.contains_key(&p.spec.target))
    {
        return false;
    }
    if !added_services.iter().all(|s| routes_resolve(model, s)) {
        return false;
    }
    // Still there, with every port it had and visible where it was: routes to it still hold.
    retargeted.retain(|key, (ports, export_to)| match model.services.get(key) {
        Some(now) => {
            !ports.iter().all(|p| now.spec.port(*p).is_some()) || now.spec.export_to != *export_to
        }
        None => true,
    });
    if retargeted
        .keys()
        .any(|key| !model.services.contains_key(key) && model.traffic_policies.contains_key(key))
    {
        return false;
    }
    retargeted.is_empty() || model.services.values().all(|s| routes_resolve(model, s))
}

/// The resources whose content differs between two models, by kind. Positions (which file and
/// line a resource was read from) do not count: moving a resource changes nothing served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelChange {
    /// The mesh settings (MeshConfig) changed.
    pub mesh: bool,
    pub services: BTreeSet<ObjectKey>,
    pub workloads: BTreeSet<ObjectKey>,
    /// By target service, as [`Model::traffic_policies`] keys them.
    pub traffic_policies: BTreeSet<ObjectKey>,
    pub authorization_policies: BTreeSet<ObjectKey>,
}

impl ModelChange {
    pub fn between(old: &Model, new: &Model) -> ModelChange {
        if std::ptr::eq(old, new) {
            return ModelChange::default();
        }
        ModelChange {
            mesh: old.mesh != new.mesh,
            services: changed(&old.services, &new.services, |a, b| {
                a.meta == b.meta && a.spec == b.spec
            }),
            workloads: changed(&old.workloads, &new.workloads, |a, b| {
                a.meta == b.meta && a.spec == b.spec
            }),
            traffic_policies: changed(&old.traffic_policies, &new.traffic_policies, |a, b| {
                a.meta == b.meta && a.spec == b.spec
            }),
            authorization_policies: changed(
                &old.authorization_policies,
                &new.authorization_policies,
                |a, b| a.meta == b.meta && a.spec == b.spec,
            ),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.mesh
            && self.services.is_empty()
            && self.workloads.is_empty()
            && self.traffic_policies.is_empty()
            && self.authorization_policies.is_empty()
    }
}

/// Keys added, removed, or whose value differs, walking both (sorted) maps together.
fn changed<T>(
    old: &BTreeMap<ObjectKey, Arc<T>>,
    new: &BTreeMap<ObjectKey, Arc<T>>,
    same: impl Fn(&T, &T) -> bool,
) -> BTreeSet<ObjectKey> {
    use std::cmp::Ordering;
    let mut out = BTreeSet::new();
    let mut old = old.iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ko, _)), Some((kn, _))) => ko.cmp(kn),
        };
        match order {
            Ordering::Less => {
                if let Some((k, _)) = old.next() {
                    out.insert(k.clone());
                }
            }
            Ordering::Greater => {
                if let Some((k, _)) = new.next() {
                    out.insert(k.clone());
                }
            }
            Ordering::Equal => {
                if let (Some((k, vo)), Some((_, vn))) = (old.next(), new.next())
                    && !Arc::ptr_eq(vo, vn)
                    && !same(vo, vn)
                {
                    out.insert(k.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::parse_file;

    const NAMESPACES: [&str; 2] = ["a", "b"];

    fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
        items[rng.random_range(0..items.len())]
    }

    /// A random document over a small space of names, hostnames and addresses, so that random
    /// files collide often: duplicates, dangling routes and policies, shared claims.
    fn document(rng: &mut StdRng) -> String {
        let ns = pick(rng, &NAMESPACES);
        let n = rng.random_range(0..4);
        let header = |kind: &str, name: String| {
            format!(
                "apiVersion: keel.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            )
        };
        match rng.random_range(0..10) {
            0..=3 => {
                let mut doc = header("Service", format!("svc-{n}"));
                doc.push_str("spec:\n");
                if rng.random_bool(0.4) {
                    let host = pick(rng, &["shared.example", "other.example", "svc-1", "svc-2"]);
                    doc.push_str(&format!("  hostnames: [{host}]\n"));
                }
                if rng.random_bool(0.3) {
                    let vip = pick(rng, &["10.96.0.1", "10.96.0.2"]);
                    doc.push_str(&format!("  vips: [{vip}]\n"));
                }
                let port = pick(rng, &["80", "81"]);
                doc.push_str(&format!(
                    "  ports: [{{name: http, port: {port}, protocol: HTTP}}]\n"
                ));
                doc.push_str(&format!(
                    "  selector: {{app: app-{}}}\n",
                    rng.random_range(0..3)
                ));
                if rng.random_bool(0.6) {
                    let target =
                        format!("svc-{}.{}", rng.random_range(0..3), pick(rng, &NAMESPACES));
                    let port = match rng.random_range(0..3) {
                        0 => ", port: 80".to_owned(),
                        1 => ", port: 81".to_owned(),
                        _ => String::new(),
                    };
                    doc.push_str(&format!(
                        "  routes:\n  - name: r\n    destinations: [{{service: {target}{port}}}]\n"
                    ));
                }
                doc
            }
            4..=6 => {
                let address = pick(rng, &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
                format!(
                    "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w-{n}, namespace: {ns}, labels: {{app: app-{}}}}}\nspec:\n  serviceAccount: sa\n  addresses: [{address}]\n",
                    rng.random_range(0..3)
                )
            }
            7 => {
                let mut doc = header("TrafficPolicy", format!("tp-{}", rng.random_range(0..2)));
                let target = format!("svc-{}", rng.random_range(0..4));
                doc.push_str(&format!("spec:\n  targetRef: {{service: {target}}}\n"));
                doc
            }
            8 => {
                let mut doc = header(
                    "AuthorizationPolicy",
                    format!("ap-{}", rng.random_range(0..2)),
                );
                doc.push_str("spec:\n  action: DENY\n  rules: [{}]\n");
                doc
            }
            _ => {
                let domain = pick(rng, &["one.local", "two.local"]);
                format!(
                    "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  trustDomain: {domain}\n"
                )
            }
        }
    }

    fn file(rng: &mut StdRng, name: &str) -> Vec<Resource> {
        let docs: Vec<String> = (0..rng.random_range(0..4)).map(|_| document(rng)).collect();
        let text = docs.join("---\n");
        parse_file(Path::new(name), &text)
            .unwrap_or_else(|e| panic!("generated YAML must parse:\n{text}\n{e}"))
    }

    fn all(files: &[Vec<Resource>]) -> Vec<Resource> {
        files.iter().flatten().cloned().collect()
    }

    #[test]
    fn incremental_validation_agrees_with_whole_validation_on_random_edits() {
        let mut rng = StdRng::seed_from_u64(0x6b65656c);
        let names: Vec<String> = (0..6).map(|i| format!("f{i}.yaml")).collect();
        let mut files: Vec<Vec<Resource>> = vec![Vec::new(); names.len()];
        let mut indexed = IndexedModel::new(Vec::new()).expect("empty is valid");
        let (mut accepted, mut refused) = (0, 0);
        for step in 0..6000 {
            let i = rng.random_range(0..files.len());
            let edited = file(&mut rng, &names[i]);
            let mut candidate = files.clone();
            candidate[i] = edited.clone();
            let whole = Model::from_resources(all(&candidate));
            let incremental = indexed.replace(&files[i], &edited);
            assert_eq!(
                incremental,
                whole.is_ok(),
                "step {step}: incremental says {incremental}, whole says {:?}",
                whole.as_ref().err()
            );
            match whole {
                Ok(model) => {
                    assert_eq!(**indexed.model(), model, "step {step}");
                    files = candidate;
                    accepted += 1;
                }
                Err(_) => refused += 1,
            }
        }
        // The generator must exercise both outcomes, or the agreement means little.
        assert!(
            accepted > 500 && refused > 500,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn change_ignores_positions_and_names_what_differs() {
        let text = "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec:\n  ports: [{port: 80}]\n";
        let one = Model::from_resources(parse_file(Path::new("one.yaml"), text).expect("parses"))
            .expect("valid");
        let moved = format!("\n\n{text}");
        let two = Model::from_resources(parse_file(Path::new("two.yaml"), &moved).expect("parses"))
            .expect("valid");
        assert!(ModelChange::between(&one, &two).is_empty());
        let other = text.replace("port: 80", "port: 81");
        let three =
            Model::from_resources(parse_file(Path::new("one.yaml"), &other).expect("parses"))
                .expect("valid");
        let change = ModelChange::between(&one, &three);
        assert_eq!(
            change.services.into_iter().collect::<Vec<_>>(),
            [ObjectKey::new("a", "s")]
        );
        let gone = ModelChange::between(&one, &Model::default());
        assert_eq!(gone.services.len(), 1);
    }
}
