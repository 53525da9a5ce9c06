//! The connected proxies and what each has acknowledged or rejected, for `keelctl status`.
//!
//! Streams report here; nothing on a stream's path waits for a reader of this registry for
//! longer than a map update.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use keel_proto::v1::Node;
use serde::Serialize;

use super::resources;

/// How many NACKs are kept per proxy.
const NACK_HISTORY: usize = 8;

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

#[derive(Debug, Default)]
pub struct ProxyRegistry {
    proxies: Mutex<HashMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, ProxyStatus>> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, stream: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.lock().get_mut(&stream) {
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
        self.lock().insert(stream, status);
    }

    pub(super) fn disconnect(&self, stream: u64) {
        self.lock().remove(&stream);
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
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id).then(a.stream.cmp(&b.stream)));
        all
    }
}
