//! The store: the current mesh model as an immutable, versioned snapshot, and what changed
//! between recent snapshots.
//!
//! Sources (files, Kubernetes) hand the store a complete, already validated [`Model`]; the
//! store turns it into a [`Snapshot`] whose resources are encoded once and versioned by content,
//! so that every discovery stream shares the same bytes and can tell what changed by comparing
//! short version strings. A source that fails validation only records its error here: the last
//! good snapshot keeps being served. Until a source has published a valid model at least once,
//! the snapshot is a placeholder (`loaded` is false, whatever trust bundle it carries) and the
//! discovery server sends nothing from it.
//!
//! The store never blocks on a consumer: snapshots are published through a `watch` channel, so a
//! slow discovery stream simply sees the latest snapshot when it looks again (coalescing).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use keel_proto::v1::type_url;
use serde::Serialize;
use tokio::sync::watch;

use crate::discovery::resources::{self, TypeUrl, VersionedResource};
use crate::identity::TrustBundle;
use crate::model::{Model, ModelChange, ObjectKey, ValidationErrors, Workload};

/// How many deltas a snapshot remembers. A stream that fell further behind compares its whole
/// state instead of the names the deltas touched.
const HISTORY: usize = 64;

/// How long a snapshot displaced from `Store::retired` waits before it is freed: past the fan-out
/// of the change that displaced it.
const RETIRE_DELAY: std::time::Duration = std::time::Duration::from_millis(200);
/// At most this many displaced snapshots wait to be freed.
const GRAVEYARD: usize = 8;

/// The resources of one type, by name.
pub type TypeSet = Arc<BTreeMap<String, Arc<VersionedResource>>>;

/// What changed from one snapshot version to the next: per shared type, the names whose resource
/// was added, changed or removed; and what per-proxy resources depend on.
#[derive(Debug, Default)]
pub struct Delta {
    /// The version this delta leads to (it leads from `to - 1`).
    pub to: u64,
    pub touched: BTreeMap<TypeUrl, BTreeSet<String>>,
    /// Something every proxy's own resources depend on changed (mesh settings, trust bundle,
    /// authorization policies).
    pub node_wide: bool,
    /// Workloads whose resource changed: their proxies' own resources depend on them.
    pub workloads: BTreeSet<ObjectKey>,
}

/// One immutable version of the mesh as the discovery server sees it.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// Whether a source has published a valid model. Until then `model` is an empty placeholder
    /// (the directory may be invalid, or not read yet): nothing may be served from it, or a
    /// proxy that holds a good configuration would be told to remove all of it.
    pub loaded: bool,
    pub model: Arc<Model>,
    /// The CA's roots, which every proxy's MeshConfig carries (empty without a CA).
    pub trust: Arc<TrustBundle>,
    /// Resources that every proxy sees the same way (services, endpoints, routes, traffic
    /// policies), encoded once. A proxy is sent those of the services visible in its namespace
    /// ([`Snapshot::visible`]).
    pub shared: BTreeMap<TypeUrl, TypeSet>,
    /// The services exported to some namespaces only (`exportTo`), by resource name; every
    /// other service is visible everywhere. Empty in a mesh that restricts nothing.
    pub exports: Arc<BTreeMap<String, Arc<BTreeSet<String>>>>,
    /// The deltas that led here, oldest first, ending with the one to `version`.
    deltas: VecDeque<Arc<Delta>>,
    pub created: SystemTime,
}

impl Snapshot {
    /// The snapshot after `previous` (if any), given what changed between their models: only
    /// the shared resources that depend on the change are built again; the others are the same
    /// allocations, and a type where nothing changed is the same set.
    fn build(
        version: u64,
        loaded: bool,
        model: Arc<Model>,
        trust: Arc<TrustBundle>,
        previous: Option<(&Snapshot, ModelChange)>,
    ) -> Snapshot {
        let mtls = !trust.anchors.is_empty();
        let mut delta = Delta {
            to: version,
            ..Delta::default()
        };
        let mut shared = BTreeMap::new();
        let (previous, change) = previous.unzip();
        match previous.zip(change) {
            // Only what depends on the change is built again.
            Some((p, change)) if p.mtls() == mtls && !change.mesh => {
                let rebuild = Rebuild::after(&p.model, &model, &change);
                for type_url in resources::SHARED_TYPES {
                    let (set, touched) = rebuild.apply(type_url, &p.shared[type_url], &model, mtls);
                    if !touched.is_empty() {
                        delta.touched.insert(type_url, touched);
                    }
                    shared.insert(type_url, set);
                }
                delta.node_wide = *p.trust != *trust || !change.authorization_policies.is_empty();
                delta.workloads = change.workloads;
            }
            // Settings every endpoint depends on changed (trust domain, mTLS), or there is
            // nothing to compare with: build everything, and compare versions to tell what did.
            _ => {
                let empty = TypeSet::default();
                for (type_url, fresh) in resources::shared_resources(&model, mtls) {
                    let old = previous.map_or(&empty, |p| &p.shared[type_url]);
                    let mut set = BTreeMap::new();
                    let mut touched = BTreeSet::new();
                    for (name, resource) in fresh {
                        match old.get(&name) {
                            // Unchanged content: keep the old allocation, so identical resources
                            // are shared across snapshots rather than held twice.
                            Some(prev) if prev.version == resource.version => {
                                set.insert(name, prev.clone());
                            }
                            _ => {
                                touched.insert(name.clone());
                                set.insert(name, Arc::new(resource));
                            }
                        }
                    }
                    touched.extend(old.keys().filter(|n| !set.contains_key(*n)).cloned());
                    if !touched.is_empty() {
                        delta.touched.insert(type_url, touched);
                    }
                    shared.insert(type_url, Arc::new(set));
                }
                delta.node_wide = true;
            }
        }
        // A service whose visibility changed is, for the proxies that gain or lose it, added or
        // removed in every shared type, though no resource of it changed.
        let exports = exports_of(&model);
        let empty = BTreeMap::new();
        let before = previous.map_or(&empty, |p| &*p.exports);
        let moved: BTreeSet<&String> = exports
            .iter()
            .filter(|(name, set)| before.get(*name) != Some(set))
            .map(|(name, _)| name)
            .chain(before.keys().filter(|name| !exports.contains_key(*name)))
            .collect();
        if !moved.is_empty() {
            for type_url in resources::SHARED_TYPES {
                delta
                    .touched
                    .entry(type_url)
                    .or_default()
                    .extend(moved.iter().map(|n| (*n).clone()));
            }
        }
        let exports = match previous {
            Some(p) if *p.exports == exports => p.exports.clone(),
            _ => Arc::new(exports),
        };
        let mut deltas = previous.map(|p| p.deltas.clone()).unwrap_or_default();
        if previous.is_some() {
            deltas.push_back(Arc::new(delta));
            while deltas.len() > HISTORY {
                deltas.pop_front();
            }
        }
        Snapshot {
            version,
            loaded,
            model,
            trust,
            shared,
            exports,
            deltas,
            created: SystemTime::now(),
        }
    }

    /// Whether proxies in `namespace` see the shared resources named `name` (a service's).
    pub fn visible(&self, name: &str, namespace: &str) -> bool {
        self.exports
            .get(name)
            .is_none_or(|namespaces| namespaces.contains(namespace))
    }

    /// Whether proxies originate mTLS, that is whether the control plane runs a CA.
    fn mtls(&self) -> bool {
        !self.trust.anchors.is_empty()
    }

    /// Whether what a proxy of `workload` gets for itself (mesh settings, inbound policy) may
    /// differ from what it got from version `since`.
    pub fn node_view_changed_since(&self, since: u64, workload: &ObjectKey) -> bool {
        if since >= self.version {
            return false;
        }
        let Some(first) = self.deltas.front() else {
            return true;
        };
        if first.to > since + 1 {
            return true;
        }
        self.deltas
            .iter()
            .rev()
            .take_while(|d| d.to > since)
            .any(|d| d.node_wide || d.workloads.contains(workload))
    }

    /// The names of `type_url` touched by every change after version `since`, or `None` when
    /// that history is no longer kept (the caller then compares everything).
    pub fn touched_since(&self, type_url: TypeUrl, since: u64) -> Option<BTreeSet<&str>> {
        if since >= self.version {
            return Some(BTreeSet::new());
        }
        let first = self.deltas.front()?;
        if first.to > since + 1 {
            return None;
        }
        let mut names = BTreeSet::new();
        for delta in self.deltas.iter().rev().take_while(|d| d.to > since) {
            if let Some(touched) = delta.touched.get(&type_url) {
                names.extend(touched.iter().map(String::as_str));
            }
        }
        Some(names)
    }

    /// How many resources of each shared type this snapshot holds.
    pub fn counts(&self) -> BTreeMap<TypeUrl, usize> {
        self.shared.iter().map(|(t, s)| (*t, s.len())).collect()
    }
}

/// The services of `model` exported to some namespaces only, by resource name.
fn exports_of(model: &Model) -> BTreeMap<String, Arc<BTreeSet<String>>> {
    model
        .services
        .iter()
        .filter_map(|(key, s)| Some((key.to_string(), Arc::new(s.spec.export_to.clone()?))))
        .collect()
}

/// The state of the source feeding the store, for `keelctl status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// Where the model comes from, e.g. the watched directory.
    pub source: String,
    /// When the last good model was accepted.
    #[serde(with = "crate::admin::rfc3339::option")]
    pub last_good: Option<SystemTime>,
    /// The errors of the newest rejected state, if the newest state was rejected. Cleared when a
    /// good state is accepted.
    pub rejected: Option<ValidationErrors>,
    #[serde(with = "crate::admin::rfc3339::option")]
    pub rejected_at: Option<SystemTime>,
}

/// Which services' shared resources a change makes stale, per type.
struct Rebuild {
    /// Service, RouteTable: the services that changed.
    services: BTreeSet<ObjectKey>,
    /// TrafficPolicy: those, and the targets of the policies that changed.
    policies: BTreeSet<ObjectKey>,
    /// Endpoints: those, and the services that selected or now select a workload that changed.
    endpoints: BTreeSet<ObjectKey>,
}

impl Rebuild {
    fn after(old: &Model, new: &Model, change: &ModelChange) -> Rebuild {
        let services = change.services.clone();
        let mut policies = services.clone();
        policies.extend(change.traffic_policies.iter().cloned());
        let mut endpoints = services.clone();
        for model in [old, new] {
            let workloads: Vec<&Workload> = change
                .workloads
                .iter()
                .filter_map(|k| model.workloads.get(k).map(|w| &**w))
                .collect();
            endpoints.extend(model.services_selecting(&workloads));
        }
        Rebuild {
            services,
            policies,
            endpoints,
        }
    }

    /// The new set of `type_url` from the previous one: stale names rebuilt, the rest kept.
    /// Returns the set and the names whose resource changed.
    fn apply(
        &self,
        type_url: TypeUrl,
        previous: &TypeSet,
        model: &Model,
        mtls: bool,
    ) -> (TypeSet, BTreeSet<String>) {
        let stale = match type_url {
            type_url::ENDPOINTS => &self.endpoints,
            type_url::TRAFFIC_POLICY => &self.policies,
            _ => &self.services,
        };
        let mut touched = BTreeSet::new();
        if stale.is_empty() {
            return (previous.clone(), touched);
        }
        let builder = resources::SharedResources::new(model, mtls, Some(stale.len()));
        let mut set = (**previous).clone();
        for key in stale {
            let name = key.to_string();
            match builder.build(type_url, key) {
                Some(fresh) => {
                    if set.get(&name).is_none_or(|r| r.version != fresh.version) {
                        set.insert(name.clone(), Arc::new(fresh));
                        touched.insert(name);
                    }
                }
                None => {
                    if set.remove(&name).is_some() {
                        touched.insert(name);
                    }
                }
            }
        }
        if touched.is_empty() {
            (previous.clone(), touched)
        } else {
            (Arc::new(set), touched)
        }
    }
}

/// The current snapshot and its history, shared by sources and the discovery server.
#[derive(Debug)]
pub struct Store {
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: Mutex<SourceStatus>,
    /// Root id -> the first snapshot version whose trust bundle holds it, for roots still in
    /// the bundle: a proxy that acknowledged a MeshConfig at least that new trusts the root.
    anchor_since: Mutex<std::collections::HashMap<String, u64>>,
    /// The snapshot replaced by the newest one, kept until the next publish. Streams let go of
    /// it as they take the new one; if the last of them dropped it, that stream would free a
    /// whole model in the middle of the fan-out. The publisher frees it instead, a change later
    /// (and off the runtime's threads, see [`Store::retire`]).
    retired: Mutex<Option<Arc<Snapshot>>>,
    /// Snapshots displaced from `retired`, freed together a little later (see [`Store::retire`]).
    graveyard: Arc<Mutex<Vec<Arc<Snapshot>>>>,
}

impl Store {
    /// A store serving `model`, as if a source had published it.
    pub fn new(model: Model) -> Arc<Store> {
        Store::starting(Snapshot::build(
            1,
            true,
            Arc::new(model),
            Arc::default(),
            None,
        ))
    }

    /// A store with nothing loaded yet: discovery streams wait until a source publishes a valid
    /// model (the first [`Store::publish`]).
    pub fn awaiting_source() -> Arc<Store> {
        Store::starting(Snapshot::build(
            1,
            false,
            Arc::new(Model::default()),
            Arc::default(),
            None,
        ))
    }

    fn starting(first: Snapshot) -> Arc<Store> {
        Arc::new(Store {
            snapshots: watch::Sender::new(Arc::new(first)),
            status: Mutex::new(SourceStatus::default()),
            anchor_since: Mutex::default(),
            retired: Mutex::default(),
            graveyard: Arc::default(),
        })
    }

    /// The snapshot being served now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that sees every new snapshot (or, if it lags, the newest one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// Publishes a validated model as the next snapshot, if it differs from the current one (the
    /// first model published always makes a snapshot, even an empty one: it is the first that may
    /// be served). Returns the version now served.
    pub fn publish(&self, model: impl Into<Arc<Model>>) -> u64 {
        let model = model.into();
        let mut version = 0;
        let mut replaced = None;
        let started = std::time::Instant::now();
        let mut built_at = None;
        self.snapshots.send_if_modified(|current| {
            let change = ModelChange::between(&current.model, &model);
            let compared = started.elapsed();
            if current.loaded && change.is_empty() {
                version = current.version;
                return false;
            }
            let next = Snapshot::build(
                current.version + 1,
                true,
                model,
                current.trust.clone(),
                Some((current, change)),
            );
            version = next.version;
            tracing::info!(version, changes = ?summary(&next), "published mesh snapshot");
            built_at = Some((compared, started.elapsed()));
            replaced = Some(std::mem::replace(current, Arc::new(next)));
            true
        });
        let notified = started.elapsed();
        self.retire(replaced);
        if let Some((compared, built)) = built_at {
            tracing::debug!(
                version,
                compare_us = compared.as_micros() as u64,
                build_us = (built - compared).as_micros() as u64,
                notify_us = (notified - built).as_micros() as u64,
                retire_us = (started.elapsed() - notified).as_micros() as u64,
                "snapshot publish timings"
            );
        }
        let mut status = self.lock_status();
        status.last_good = Some(SystemTime::now());
        status.rejected = None;
        status.rejected_at = None;
        version
    }

    /// Publishes a new trust bundle (the CA's roots changed) as the next snapshot, if it differs.
    /// Returns the version now served.
    pub fn set_trust(&self, trust: Arc<TrustBundle>) -> u64 {
        let mut version = 0;
        let mut replaced = None;
        self.snapshots.send_if_modified(|current| {
            if *current.trust == *trust {
                version = current.version;
                return false;
            }
            // A new trust bundle does not make a placeholder model servable.
            let next = Snapshot::build(
                current.version + 1,
                current.loaded,
                current.model.clone(),
                trust,
                Some((current, ModelChange::default())),
            );
            version = next.version;
            tracing::info!(version, "published a new trust bundle");
            let mut since = self.anchor_since.lock().unwrap_or_else(|e| e.into_inner());
            since.retain(|id, _| next.trust.anchors.iter().any(|a| &a.id == id));
            for anchor in &next.trust.anchors {
                since.entry(anchor.id.clone()).or_insert(version);
            }
            replaced = Some(std::mem::replace(current, Arc::new(next)));
            true
        });
        self.retire(replaced);
        version
    }

    /// Keeps `replaced` until the next change, freeing the one it displaces (see `retired`).
    ///
    /// Freeing a snapshot frees its model's maps, milliseconds of work in a large mesh; done
    /// here it would hold a runtime thread while the streams send the change it just published.
    /// Inside a runtime it is therefore done [`RETIRE_DELAY`] later, on a blocking thread.
    fn retire(&self, replaced: Option<Arc<Snapshot>>) {
        if replaced.is_none() {
            return;
        }
        let Some(older) = std::mem::replace(
            &mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()),
            replaced,
        ) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            drop(older);
            return;
        };
        let mut graveyard = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
        if graveyard.len() >= GRAVEYARD {
            // Changes come faster than the delay: free the oldest now rather than pile up models.
            drop(graveyard.remove(0));
        }
        graveyard.push(older);
        if graveyard.len() == 1 {
            let graveyard = self.graveyard.clone();
            runtime.spawn(async move {
                tokio::time::sleep(RETIRE_DELAY).await;
                let dead =
                    std::mem::take(&mut *graveyard.lock().unwrap_or_else(|e| e.into_inner()));
                drop(tokio::task::spawn_blocking(move || drop(dead)));
            });
        }
    }

    /// The first snapshot version whose trust bundle holds root `id`, while it still does.
    pub fn anchor_since(&self, id: &str) -> Option<u64> {
        self.anchor_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// Records that the source's newest state was rejected; the current snapshot stays.
    pub fn reject(&self, errors: ValidationErrors) {
        tracing::warn!(
            errors = errors.0.len(),
            "mesh configuration rejected, still serving version {}:\n{errors}",
            self.current().version
        );
        let mut status = self.lock_status();
        status.rejected = Some(errors);
        status.rejected_at = Some(SystemTime::now());
    }

    pub fn set_source(&self, source: String) {
        self.lock_status().source = source;
    }

    pub fn source_status(&self) -> SourceStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> MutexGuard<'_, SourceStatus> {
        // The status is plain data; a panic elsewhere while it was held leaves it usable.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn summary(snapshot: &Snapshot) -> BTreeMap<&'static str, usize> {
    snapshot
        .deltas
        .back()
        .filter(|d| d.to == snapshot.version)
        .map(|d| {
            d.touched
                .iter()
                .map(|(t, n)| (resources::short_name(t), n.len()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::DirectoryLoader;

    fn service(name: &str, app: &str) -> String {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  ports: [{{port: 80, protocol: HTTP}}]\n  selector: {{app: {app}}}\n---\n"
        )
    }

    fn workload(name: &str, app: &str, ip: &str) -> String {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}\nspec:\n  serviceAccount: {app}\n  addresses: [{ip}]\n---\n"
        )
    }

    /// A directory, its loader, and a store fed by it, as the file source runs them.
    struct Fixture {
        dir: tempfile::TempDir,
        loader: Arc<DirectoryLoader>,
        store: Arc<Store>,
    }

    impl Fixture {
        fn new(files: &[(&str, String)]) -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            let fixture = Fixture {
                loader: DirectoryLoader::new(dir.path().to_path_buf()),
                dir,
                store: Store::awaiting_source(),
            };
            fixture.write(files);
            fixture
        }

        /// Writes the files and publishes what the loader makes of the directory.
        fn write(&self, files: &[(&str, String)]) -> Arc<Snapshot> {
            for (name, text) in files {
                let path = self.dir.path().join(name);
                if text.is_empty() {
                    std::fs::remove_file(path).expect("remove");
                } else {
                    std::fs::write(path, text).expect("write");
                }
            }
            let model = self.loader.load().expect("valid");
            self.store.publish(model);
            let snapshot = self.store.current();
            // Whatever was rebuilt or kept, the sets are what a build from scratch makes.
            for (type_url, fresh) in resources::shared_resources(&snapshot.model, snapshot.mtls()) {
                let versions = |set: &BTreeMap<String, String>| set.clone();
                let built: BTreeMap<String, String> =
                    fresh.into_iter().map(|(n, r)| (n, r.version)).collect();
                let served: BTreeMap<String, String> = snapshot.shared[type_url]
                    .iter()
                    .map(|(n, r)| (n.clone(), r.version.clone()))
                    .collect();
                assert_eq!(versions(&served), built, "{type_url}");
            }
            snapshot
        }
    }

    fn touched(snapshot: &Snapshot) -> BTreeMap<&'static str, Vec<String>> {
        let delta = snapshot.deltas.back().expect("a delta");
        assert_eq!(delta.to, snapshot.version);
        delta
            .touched
            .iter()
            .map(|(t, names)| (resources::short_name(t), names.iter().cloned().collect()))
            .collect()
    }

    #[test]
    fn a_change_rebuilds_only_the_resources_that_depend_on_it() {
        let fixture = Fixture::new(&[
            ("services.yaml", service("a", "a") + &service("b", "b")),
            ("a.yaml", workload("a-1", "a", "10.0.0.1")),
            ("b.yaml", workload("b-1", "b", "10.0.0.2")),
        ]);
        let first = fixture.write(&[]);
        assert!(first.loaded);

        // An endpoint moves: the Endpoints of its service, nothing else; untouched types are
        // the very same sets.
        let moved = fixture.write(&[("a.yaml", workload("a-1", "a", "10.0.0.9"))]);
        assert_eq!(
            touched(&moved),
            BTreeMap::from([("Endpoints", vec!["demo/a".to_owned()])])
        );
        for t in [
            type_url::SERVICE,
            type_url::ROUTE_TABLE,
            type_url::TRAFFIC_POLICY,
        ] {
            assert!(Arc::ptr_eq(&first.shared[t], &moved.shared[t]), "{t}");
        }
        let delta = moved.deltas.back().expect("delta");
        assert!(!delta.node_wide);
        assert_eq!(
            delta.workloads.iter().collect::<Vec<_>>(),
            [&ObjectKey::new("demo", "a-1")]
        );
        let a1 = ObjectKey::new("demo", "a-1");
        let b1 = ObjectKey::new("demo", "b-1");
        assert!(moved.node_view_changed_since(first.version, &a1));
        assert!(!moved.node_view_changed_since(first.version, &b1));

        // A workload changes service: both services' Endpoints.
        let relabeled = fixture.write(&[("a.yaml", workload("a-1", "b", "10.0.0.9"))]);
        assert_eq!(
            touched(&relabeled),
            BTreeMap::from([("Endpoints", vec!["demo/a".to_owned(), "demo/b".to_owned()])])
        );

        // A traffic policy: the TrafficPolicy of its target only.
        let policy = fixture.write(&[(
            "policy.yaml",
            "apiVersion: keel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  targetRef: {service: b}\n  loadBalancer: {policy: RANDOM}\n".to_owned(),
        )]);
        assert_eq!(
            touched(&policy),
            BTreeMap::from([("TrafficPolicy", vec!["demo/b".to_owned()])])
        );

        // An authorization policy changes what every proxy gets for itself, no shared resource.
        let authz = fixture.write(&[(
            "authz.yaml",
            "apiVersion: keel.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec:\n  action: DENY\n  rules: [{}]\n".to_owned(),
        )]);
        assert!(touched(&authz).is_empty());
        assert!(authz.node_view_changed_since(policy.version, &b1));

        // A service goes away (its file is removed): every type names it.
        let removed = fixture.write(&[
            ("services.yaml", service("b", "b")),
            ("policy.yaml", String::new()),
        ]);
        let names = touched(&removed);
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.values().all(|n| n.contains(&"demo/a".to_owned())));

        // The trust domain is in every endpoint's identity: everything is compared.
        let mesh = fixture.write(&[(
            "mesh.yaml",
            "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  trustDomain: other.local\n".to_owned(),
        )]);
        assert_eq!(touched(&mesh)["Endpoints"], ["demo/b"]);
        assert!(mesh.deltas.back().expect("delta").node_wide);

        // Rewriting a file with the same resources in another order publishes nothing.
        let version = fixture.store.current().version;
        fixture.write(&[("services.yaml", format!("\n{}", service("b", "b")))]);
        assert_eq!(fixture.store.current().version, version);
    }

    #[test]
    fn nothing_is_loaded_until_a_model_is_published_and_trust_alone_does_not_count() {
        let store = Store::awaiting_source();
        assert!(!store.current().loaded);
        let version = store.set_trust(Arc::new(TrustBundle {
            anchors: vec![crate::identity::ca::Anchor {
                id: "root".to_owned(),
                der: rustls_pki_types::CertificateDer::from(Vec::new()),
                signing: true,
            }],
        }));
        assert_eq!(version, 2);
        assert!(
            !store.current().loaded,
            "a trust bundle is not a mesh model"
        );

        // An empty model equals the placeholder, yet publishing it is what makes it servable.
        assert_eq!(store.publish(Model::default()), 3);
        let current = store.current();
        assert!(current.loaded);
        assert_eq!(current.trust.anchors.len(), 1);
        assert_eq!(store.publish(Model::default()), 3, "nothing changed");
        assert!(store.set_trust(Arc::default()) > 3);
        assert!(store.current().loaded, "a loaded model stays loaded");
    }
}
