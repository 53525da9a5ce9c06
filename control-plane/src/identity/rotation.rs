//! The checks that make each step of a root rotation safe, from what the connected proxies hold.
//!
//! - A root may start signing only once every connected proxy has acknowledged a MeshConfig
//!   whose trust bundle holds it: otherwise a proxy that does not trust it yet would refuse the
//!   first certificates it signs.
//! - A root may leave the bundle only once no connected proxy's newest certificate chains to it:
//!   otherwise peers would refuse that proxy's new connections.
//!
//! These are reads; the admin API runs them right before the change they guard.

use crate::discovery::ProxyRegistry;
use crate::store::Store;

use super::CertificateAuthority;

/// Why a rotation step must wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotYet {
    #[error("root {0} is not in the published trust bundle")]
    NotPublished(String),
    #[error("{} connected proxies have not acknowledged a trust bundle with root {root} yet: {}", .proxies.len(), .proxies.join(", "))]
    NotTrusted { root: String, proxies: Vec<String> },
    #[error("{} connected proxies still use a certificate from root {root}: {}", .proxies.len(), .proxies.join(", "))]
    StillUsed { root: String, proxies: Vec<String> },
}

/// Whether root `id` may start signing.
pub fn may_sign(store: &Store, registry: &ProxyRegistry, id: &str) -> Result<(), NotYet> {
    let since = store
        .anchor_since(id)
        .ok_or_else(|| NotYet::NotPublished(id.to_owned()))?;
    let lagging: Vec<String> = registry
        .list()
        .into_iter()
        .filter(|p| {
            p.types
                .get("MeshConfig")
                .and_then(|t| t.acked_version)
                .is_none_or(|acked| acked < since)
        })
        .map(|p| p.id)
        .collect();
    if lagging.is_empty() {
        Ok(())
    } else {
        Err(NotYet::NotTrusted {
            root: id.to_owned(),
            proxies: lagging,
        })
    }
}

/// Whether root `id` may leave the bundle.
pub fn may_remove(
    ca: &CertificateAuthority,
    registry: &ProxyRegistry,
    id: &str,
) -> Result<(), NotYet> {
    let holders = ca.holders_of(id);
    let connected: Vec<String> = registry
        .list()
        .into_iter()
        .map(|p| p.id)
        .filter(|p| holders.contains(p))
        .collect();
    if connected.is_empty() {
        Ok(())
    } else {
        Err(NotYet::StillUsed {
            root: id.to_owned(),
            proxies: connected,
        })
    }
}
