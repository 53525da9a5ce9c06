//! The connected proxies and what each has acknowledged or rejected, for `keelctl status`; and
//! the last few that disconnected, with how they left, so that a proxy that NACKed and went
//! away (or was cut off for a bad request) can still be diagnosed.
//!
//! Streams report here; nothing on a stream's path waits for a reader of this registry for
//! longer than a map update. What it holds is bounded: one entry per open stream, and at most
//! [`RECENT_DISCONNECTS`] of the others.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use keel_proto::v1::Node;
use serde::Serialize;

use super::resources;

/// How many NACKs are kept per proxy.
const NACK_HISTORY: usize = 8;

/// How many disconnected proxies are remembered, newest first.
pub const RECENT_DISCONNECTS: usize = 32;

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub type_url: String,
    /// The version of the response rejected.
    pub version: u64,
    pub nonce: String,
    /// The version the proxy says it kept (the last it applied of the type on this stream), as
    /// its NACK echoes it; `None` if it had applied none or did not say.
    pub kept_version: Option<String>,
    pub message: String,
    #[serde(with = "crate::admin::rfc3339")]
    pub at: SystemTime,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// The snapshot version of the last response the proxy acknowledged.
    pub acked_version: Option<u64>,
    #[serde(with = "crate::admin::rfc3339::option")]
    pub acked_at: Option<SystemTime>,
    /// Resources of this type the proxy holds.
    pub resources: usize,
    /// The nonce of the response awaiting an answer, if any: at most one response per type is
    /// unacknowledged.
    pub pending_nonce: Option<String>,
    /// Responses of this type handed to the stream's transport, and their encoded bytes. A proxy
    /// that stops answering stops these growing: what the server holds for it is bounded.
    pub sent: u64,
    pub sent_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub stream: u64,
    pub id: String,
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    pub locality: String,
    pub pod_ips: Vec<String>,
    pub proxy_version: String,
    pub peer: Option<SocketAddr>,
    #[serde(with = "crate::admin::rfc3339")]
    pub connected_at: SystemTime,
    /// Per type, by short name ("Service", "Endpoints", ...).
    pub types: BTreeMap<&'static str, TypeStatus>,
    pub nacks_total: u64,
    pub recent_nacks: Vec<Nack>,
    /// The last protocol error the proxy caused (an unknown type, a bad request).
    pub last_error: Option<String>,
}

/// A proxy whose stream ended: its status as it was then, when, and why.
#[derive(Debug, Clone, Serialize)]
pub struct DisconnectedProxy {
    #[serde(flatten)]
    pub status: ProxyStatus,
    #[serde(with = "crate::admin::rfc3339")]
    pub disconnected_at: SystemTime,
    /// Why the stream ended, when it was not the proxy closing it cleanly.
    pub end_reason: Option<String>,
}

#[derive(Debug, Default)]
pub struct ProxyRegistry {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    proxies: HashMap<u64, ProxyStatus>,
    /// Newest first, at most [`RECENT_DISCONNECTS`].
    disconnected: VecDeque<DisconnectedProxy>,
}

impl ProxyRegistry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, stream: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.lock().proxies.get_mut(&stream) {
            f(p);
        }
    }

    pub(super) fn connect(&self, stream: u64, node: Node, peer: Option<SocketAddr>) {
        let locality = node
            .locality
            .map(|l| {
                [l.region, l.zone, l.subzone]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default();
        let status = ProxyStatus {
            stream,
            id: if node.id.is_empty() {
                format!("{}.{}", node.workload, node.namespace)
            } else {
                node.id
            },
            workload: node.workload,
            namespace: node.namespace,
            service_account: node.service_account,
            locality,
            pod_ips: node.pod_ips,
            proxy_version: node.proxy_version,
            peer,
            connected_at: SystemTime::now(),
            types: BTreeMap::new(),
            nacks_total: 0,
            recent_nacks: Vec::new(),
            last_error: None,
        };
        self.lock().proxies.insert(stream, status);
    }

    /// The stream ended, cleanly (`None`) or for `reason`; its status moves to the recently
    /// disconnected.
    pub(super) fn disconnect(&self, stream: u64, reason: Option<String>) {
        let mut state = self.lock();
        let Some(status) = state.proxies.remove(&stream) else {
            return;
        };
        if state.disconnected.len() == RECENT_DISCONNECTS {
            state.disconnected.pop_back();
        }
        state.disconnected.push_front(DisconnectedProxy {
            status,
            disconnected_at: SystemTime::now(),
            end_reason: reason,
        });
    }

    pub(super) fn sent(&self, stream: u64, type_url: &str, nonce: &str, bytes: usize) {
        self.update(stream, |p| {
            let t = p.types.entry(resources::short_name(type_url)).or_default();
            t.pending_nonce = Some(nonce.to_owned());
            t.sent += 1;
            t.sent_bytes += bytes as u64;
        });
    }

    pub(super) fn acked(&self, stream: u64, type_url: &str, version: u64, resources: usize) {
        self.update(stream, |p| {
            let t = p.types.entry(resources::short_name(type_url)).or_default();
            t.acked_version = Some(version);
            t.acked_at = Some(SystemTime::now());
            t.resources = resources;
            t.pending_nonce = None;
        });
    }

    pub(super) fn nacked(&self, stream: u64, nack: Nack) {
        self.update(stream, |p| {
            p.types
                .entry(resources::short_name(&nack.type_url))
                .or_default()
                .pending_nonce = None;
            p.nacks_total += 1;
            p.last_error = Some(format!(
                "NACK of version {}: {}",
                nack.version, nack.message
            ));
            if p.recent_nacks.len() == NACK_HISTORY {
                p.recent_nacks.remove(0);
            }
            p.recent_nacks.push(nack);
        });
    }

    pub(super) fn error(&self, stream: u64, message: String) {
        self.update(stream, |p| p.last_error = Some(message));
    }

    /// Every connected proxy, ordered by id.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut all: Vec<_> = self.lock().proxies.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id).then(a.stream.cmp(&b.stream)));
        all
    }

    /// The last [`RECENT_DISCONNECTS`] proxies whose stream ended, newest first.
    pub fn recently_disconnected(&self) -> Vec<DisconnectedProxy> {
        self.lock().disconnected.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnected_proxies_are_remembered_with_their_last_error_and_bounded() {
        let registry = ProxyRegistry::default();
        let node = |i: usize| Node {
            id: format!("p{i}"),
            workload: format!("w{i}"),
            namespace: "demo".to_owned(),
            ..Node::default()
        };
        registry.connect(1, node(1), None);
        registry.nacked(
            1,
            Nack {
                type_url: keel_proto::v1::type_url::ENDPOINTS.to_owned(),
                version: 7,
                nonce: "3".to_owned(),
                kept_version: Some("6".to_owned()),
                message: "bad endpoint".to_owned(),
                at: SystemTime::now(),
            },
        );
        registry.disconnect(1, Some("receive failed".to_owned()));
        assert!(registry.list().is_empty());
        let gone = registry.recently_disconnected();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].status.id, "p1");
        assert_eq!(gone[0].status.nacks_total, 1);
        assert!(
            gone[0]
                .status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("bad endpoint"))
        );
        assert_eq!(gone[0].end_reason.as_deref(), Some("receive failed"));
        let json = serde_json::to_value(&gone[0]).expect("serializes");
        assert_eq!(json["id"], "p1");
        assert_eq!(json["end_reason"], "receive failed");

        for i in 2..RECENT_DISCONNECTS + 10 {
            registry.connect(i as u64, node(i), None);
            registry.disconnect(i as u64, None);
        }
        let gone = registry.recently_disconnected();
        assert_eq!(gone.len(), RECENT_DISCONNECTS);
        assert_eq!(gone[0].status.id, format!("p{}", RECENT_DISCONNECTS + 9));
        // A stream never registered leaves nothing.
        registry.disconnect(9999, None);
        assert_eq!(registry.recently_disconnected().len(), RECENT_DISCONNECTS);
    }
}
