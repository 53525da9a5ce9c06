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

use serde::Serialize;
use tokio::sync::watch;

use crate::discovery::resources::{self, TypeUrl, VersionedResource};
use crate::identity::TrustBundle;
use crate::model::{Model, ValidationErrors};

/// How many deltas a snapshot remembers. A stream that fell further behind compares its whole
/// state instead of the names the deltas touched.
const HISTORY: usize = 64;

/// The resources of one type, by name.
pub type TypeSet = Arc<BTreeMap<String, Arc<VersionedResource>>>;

/// What changed from one snapshot version to the next: per type, the names whose resource was
/// added, changed or removed.
#[derive(Debug, Default)]
pub struct Delta {
    /// The version this delta leads to (it leads from `to - 1`).
    pub to: u64,
    pub touched: BTreeMap<TypeUrl, BTreeSet<String>>,
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
    /// policies), encoded once.
    pub shared: BTreeMap<TypeUrl, TypeSet>,
    /// The deltas that led here, oldest first, ending with the one to `version`.
    deltas: VecDeque<Arc<Delta>>,
    pub created: SystemTime,
}

impl Snapshot {
    fn build(
        version: u64,
        loaded: bool,
        model: Arc<Model>,
        trust: Arc<TrustBundle>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mut shared = BTreeMap::new();
        let mut delta = Delta {
            to: version,
            touched: BTreeMap::new(),
        };
        for (type_url, fresh) in resources::shared_resources(&model, !trust.anchors.is_empty()) {
            let old = previous.and_then(|p| p.shared.get(&type_url));
            let mut set = BTreeMap::new();
            let mut touched = BTreeSet::new();
            for (name, resource) in fresh {
                match old.and_then(|o| o.get(&name)) {
                    // Unchanged content: keep the old allocation, so identical resources are
                    // shared across snapshots rather than held twice.
                    Some(prev) if prev.version == resource.version => {
                        set.insert(name, prev.clone());
                    }
                    _ => {
                        touched.insert(name.clone());
                        set.insert(name, Arc::new(resource));
                    }
                }
            }
            if let Some(old) = old {
                touched.extend(old.keys().filter(|n| !set.contains_key(*n)).cloned());
            }
            if !touched.is_empty() {
                delta.touched.insert(type_url, touched);
            }
            shared.insert(type_url, Arc::new(set));
        }
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
            deltas,
            created: SystemTime::now(),
        }
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
        for delta in self.deltas.iter().filter(|d| d.to > since) {
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

/// The current snapshot and its history, shared by sources and the discovery server.
#[derive(Debug)]
pub struct Store {
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: Mutex<SourceStatus>,
    /// Root id -> the first snapshot version whose trust bundle holds it, for roots still in
    /// the bundle: a proxy that acknowledged a MeshConfig at least that new trusts the root.
    anchor_since: Mutex<std::collections::HashMap<String, u64>>,
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
    pub fn publish(&self, model: Model) -> u64 {
        let mut version = 0;
        self.snapshots.send_if_modified(|current| {
            if current.loaded && *current.model == model {
                version = current.version;
                return false;
            }
            let next = Snapshot::build(
                current.version + 1,
                true,
                Arc::new(model),
                current.trust.clone(),
                Some(current),
            );
            version = next.version;
            tracing::info!(version, changes = ?summary(&next), "published mesh snapshot");
            *current = Arc::new(next);
            true
        });
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
                Some(current),
            );
            version = next.version;
            tracing::info!(version, "published a new trust bundle");
            let mut since = self.anchor_since.lock().unwrap_or_else(|e| e.into_inner());
            since.retain(|id, _| next.trust.anchors.iter().any(|a| &a.id == id));
            for anchor in &next.trust.anchors {
                since.entry(anchor.id.clone()).or_insert(version);
            }
            *current = Arc::new(next);
            true
        });
        version
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
