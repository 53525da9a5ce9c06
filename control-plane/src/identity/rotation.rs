//! The checks that make each step of a root rotation safe, from what proxies hold.
//!
//! - A root may start signing only once every proxy that may be using a certificate can be
//!   shown to trust it: every connected proxy has acknowledged a MeshConfig whose trust bundle
//!   holds it, and no proxy holding an unexpired certificate is disconnected (it cannot have
//!   received the bundle, and would refuse the first certificates the root signs).
//! - A root may leave the bundle only once no unexpired certificate chains to it, whether its
//!   holder is connected or not: otherwise peers would refuse that holder's connections. What was
//!   issued comes from the CA's records, which survive a restart of the control plane, so a
//!   restart never makes a root look unused.
//!
//! A proxy that went away for good (a deleted pod) keeps its record until its certificate
//! expires, so it can hold up a step by up to one certificate lifetime; the operator may go
//! ahead anyway (`keelctl ca ... --force`), and the refusal names who would be cut off.
//!
//! These are reads; the admin API runs them right before the change they guard.

use std::collections::HashSet;
use std::time::SystemTime;

use crate::discovery::ProxyRegistry;
use crate::store::Store;

use super::CertificateAuthority;
use super::ca::Issued;

/// Why a rotation step must wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotYet {
    #[error("root {0} is not in the published trust bundle")]
    NotPublished(String),
    #[error("{} connected proxies have not acknowledged a trust bundle with root {root} yet: {}", .proxies.len(), .proxies.join(", "))]
    NotTrusted { root: String, proxies: Vec<String> },
    #[error(
        "{} proxies hold an unexpired certificate but are not connected, so they cannot have \
         received a trust bundle with root {root}: {}; they catch up when they reconnect, and \
         their certificates expire by {} at the latest",
        .proxies.len(), .proxies.join(", "), humantime::format_rfc3339_seconds(*.last_expiry)
    )]
    Disconnected {
        root: String,
        proxies: Vec<String>,
        last_expiry: SystemTime,
    },
    #[error(
        "{} unexpired certificates still chain to root {root}: {}; peers would refuse them once \
         it is gone. Connected proxies renew on their own; the last certificate expires at {}",
        .holders.len(), .holders.join(", "), humantime::format_rfc3339_seconds(*.last_expiry)
    )]
    StillUsed {
        root: String,
        holders: Vec<String>,
        last_expiry: SystemTime,
    },
}

fn connected(registry: &ProxyRegistry) -> HashSet<String> {
    registry.list().into_iter().map(|p| p.id).collect()
}

fn describe(issued: &Issued, connected: &HashSet<String>) -> String {
    let state = if issued.node.is_empty() {
        "no Node id"
    } else if connected.contains(&issued.node) {
        "connected"
    } else {
        "not connected"
    };
    format!(
        "{} ({state}, until {})",
        issued.holder(),
        humantime::format_rfc3339_seconds(issued.not_after)
    )
}

/// Whether root `id` may start signing.
pub fn may_sign(
    store: &Store,
    registry: &ProxyRegistry,
    ca: &CertificateAuthority,
    id: &str,
) -> Result<(), NotYet> {
    let since = store
        .anchor_since(id)
        .ok_or_else(|| NotYet::NotPublished(id.to_owned()))?;
    let proxies = registry.list();
    let lagging: Vec<String> = proxies
        .iter()
        .filter(|p| {
            p.types
                .get("MeshConfig")
                .and_then(|t| t.acked_version)
                .is_none_or(|acked| acked < since)
        })
        .map(|p| p.id.clone())
        .collect();
    if !lagging.is_empty() {
        return Err(NotYet::NotTrusted {
            root: id.to_owned(),
            proxies: lagging,
        });
    }
    let connected: HashSet<String> = proxies.into_iter().map(|p| p.id).collect();
    // Callers without a Node id are not discovery clients: nothing can tell whether they trust
    // a root, and waiting would not change that.
    let away: Vec<Issued> = ca
        .valid_certificates()
        .into_iter()
        .filter(|i| !i.node.is_empty() && i.root != id && !connected.contains(&i.node))
        .collect();
    match away.iter().map(|i| i.not_after).max() {
        None => Ok(()),
        Some(last_expiry) => Err(NotYet::Disconnected {
            root: id.to_owned(),
            proxies: away.iter().map(|i| describe(i, &connected)).collect(),
            last_expiry,
        }),
    }
}

/// Whether root `id` may leave the bundle.
pub fn may_remove(
    ca: &CertificateAuthority,
    registry: &ProxyRegistry,
    id: &str,
) -> Result<(), NotYet> {
    let holders = ca.holders_of(id);
    match holders.iter().map(|i| i.not_after).max() {
        None => Ok(()),
        Some(last_expiry) => {
            let connected = connected(registry);
            Err(NotYet::StillUsed {
                root: id.to_owned(),
                holders: holders.iter().map(|i| describe(i, &connected)).collect(),
                last_expiry,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_proto::spiffe::SpiffeId;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    use super::*;
    use crate::identity::CaStorage;
    use crate::model::Model;

    fn csr(identity: &SpiffeId) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().expect("uri"))];
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    #[test]
    fn a_restart_between_steps_does_not_make_the_old_root_removable() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = CaStorage::Directory {
            dir: dir.path().join("ca"),
            import: None,
        };
        let ttl = Duration::from_secs(3600);
        let a: SpiffeId = "spiffe://keel.local/ns/demo/sa/a".parse().expect("id");
        let b: SpiffeId = "spiffe://keel.local/ns/demo/sa/b".parse().expect("id");
        let registry = ProxyRegistry::default();

        let ca = CertificateAuthority::open(storage.clone(), ttl).expect("ca");
        let old = ca.bundle().anchors[0].id.clone();
        ca.sign_workload(&csr(&a), &a, "a-1.demo").expect("a");
        ca.sign_workload(&csr(&b), &b, "b-1.demo").expect("b");
        let new = ca.add_root(None).expect("add");
        let store = Store::new(Model::default());
        store.set_trust(ca.bundle());
        // Nobody is connected, but two proxies hold certificates: they cannot be shown to
        // trust the new root.
        let err = may_sign(&store, &registry, &ca, &new).expect_err("holders away");
        assert!(
            matches!(&err, NotYet::Disconnected { proxies, .. } if proxies.len() == 2),
            "{err}"
        );
        ca.use_root(&new).expect("use (forced)");
        ca.sign_workload(&csr(&a), &a, "a-1.demo")
            .expect("a renews");
        drop(ca);

        // The control plane restarts: nothing is connected and its memory is empty, but the
        // records say b still holds a certificate from the old root.
        let ca = CertificateAuthority::open(storage.clone(), ttl).expect("reopen");
        let err = may_remove(&ca, &registry, &old).expect_err("b still holds one");
        let message = err.to_string();
        assert!(
            matches!(&err, NotYet::StillUsed { holders, .. } if holders.len() == 1),
            "{message}"
        );
        assert!(
            message.contains("b-1.demo (not connected, until") && !message.contains("a-1.demo"),
            "{message}"
        );
        assert!(
            may_remove(&ca, &registry, &new).is_err(),
            "a holds the new one"
        );

        // b renews (after another restart, for good measure): the old root is unused.
        drop(ca);
        let ca = CertificateAuthority::open(storage, ttl).expect("reopen");
        ca.sign_workload(&csr(&b), &b, "b-1.demo")
            .expect("b renews");
        may_remove(&ca, &registry, &old).expect("no certificate chains to the old root");
        ca.remove_root(&old).expect("removed");
        assert_eq!(ca.status().issued.len(), 2);
    }
}
