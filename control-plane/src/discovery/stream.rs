//! One proxy's discovery stream: what it subscribed to, what it holds, what is in flight.
//!
//! The stream follows the incremental xDS transport. Each resource type is pushed
//! independently; at most one response per type is unacknowledged at a time, and changes that
//! arrive meanwhile are coalesced into the next response, sent when the ACK or NACK comes. A
//! proxy that never answers therefore costs one response per type and never delays anyone else.
//!
//! What the proxy holds is tracked per resource name and version (as a shared snapshot set plus
//! the names where the proxy differs from it), so a response carries only what differs. Large
//! updates are split into bounded responses marked `incomplete`. After a NACK the rejected versions
//! (and rejected removals) are remembered and not sent again until the resource changes
//! (resending a rejected config in a loop is a classic control-plane bug).
//!
//! What a stream keeps grows with the mesh, never with what the proxy sends: names subscribed are
//! capped per type ([`MAX_NAMES`]), only names the proxy actually holds are recorded, and rejected
//! versions are forgotten once their resource changes or leaves the snapshot.
//!
//! Nothing is sent before the store holds a model a source loaded: until then a stream stays open
//! and silent, so a proxy keeps whatever configuration it has. A request for a type this server
//! does not serve is answered once with an error for that type, and the stream goes on.
//!
//! This module must never block on the store or on another stream.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node, Resource};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::registry::{Nack, ProxyRegistry};
use super::resources::{self, NodeInfo, TypeUrl};
use crate::store::{Snapshot, TypeSet};

/// The most bytes of resources in one response; larger updates are sent in several, each after
/// the previous one is answered. Bounds what a stream buffers (tonic keeps an encode buffer the
/// size of the largest message a stream ever sent, for the stream's life). A response may exceed
/// it by one resource.
pub const RESPONSE_BUDGET: usize = 64 << 10;

/// When a stream's deviations from its base grow past this, it re-bases on the current set.
const MAX_CHANGES: usize = 64;

/// How many distinct unknown type URLs a stream may ask for (each is answered once with an
/// error); past this the proxy is broken or hostile, and its stream ends.
const MAX_REFUSED_TYPES: usize = 16;

/// A longer type URL is garbage, not a type this server might not know yet; the stream ends.
const MAX_TYPE_URL: usize = 512;

/// The most names one stream may subscribe to, or claim to hold, per type. A proxy wanting more
/// than this subscribes to the type's wildcard instead; past it the stream ends
/// (RESOURCE_EXHAUSTED), so a hostile client cannot grow the server's memory without limit.
pub const MAX_NAMES: usize = 32_768;

/// The longest resource name or version a request may carry ("<namespace>/<name>" is at most
/// 63 + 1 + 253 bytes; versions are 16 hex digits).
const MAX_NAME_LEN: usize = 320;

/// The state of one resource type on one stream.
///
/// What the proxy holds is `base` (a resource set of some snapshot, shared with every stream that
/// holds the same) with `changes` on top, so a proxy in step with the mesh costs a pointer, not a
/// copy of every name and version.
#[derive(Debug, Default)]
struct Subscription {
    /// Every visible resource of the type, or only `names`.
    wildcard: bool,
    names: BTreeSet<String>,
    base: Option<TypeSet>,
    /// Name -> the version held, or `None` for not held; overrides `base`.
    changes: HashMap<String, Option<String>>,
    /// How many resources the proxy holds, kept as `changes` change (counting would cost a
    /// lookup in `base` per change on every answer).
    held: usize,
    /// The snapshot version last compared against in full; 0 forces a full comparison.
    synced: u64,
    in_flight: Option<InFlight>,
    /// What the proxy rejected, by name: a version (`Some`), or the removal (`None`); not sent
    /// again until the resource changes. Entries go when their resource does.
    rejected: HashMap<String, Option<String>>,
    /// The first response of a subscription is sent even when empty, so the proxy knows it
    /// has the complete state of the type.
    owes_first_response: bool,
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    system_version: u64,
    /// For each name in the response, what the proxy held before (to restore on a NACK) and
    /// what was sent (`None`: removed).
    changes: Vec<(String, Option<String>, Option<String>)>,
}

impl Subscription {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The version of `name` the proxy holds.
    fn held(&self, name: &str) -> Option<&str> {
        match self.changes.get(name) {
            Some(v) => v.as_deref(),
            None => self
                .base
                .as_ref()
                .and_then(|b| b.get(name))
                .map(|r| r.version.as_str()),
        }
    }

    /// Every name the proxy holds.
    fn held_names(&self) -> BTreeSet<&str> {
        let mut names: BTreeSet<&str> = self
            .base
            .iter()
            .flat_map(|b| b.keys().map(String::as_str))
            .chain(self.changes.keys().map(String::as_str))
            .collect();
        names.retain(|n| self.held(n).is_some());
        names
    }

    /// Starts a subscription from what the proxy says it holds (a reconnect).
    fn holding(initial: &BTreeMap<String, String>) -> Result<Subscription, Status> {
        if initial.len() > MAX_NAMES {
            return Err(Status::resource_exhausted(format!(
                "initial_resource_versions names {} resources; at most {MAX_NAMES} per type",
                initial.len()
            )));
        }
        if let Some((name, version)) = initial
            .iter()
            .find(|(n, v)| n.len() > MAX_NAME_LEN || v.len() > MAX_NAME_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "initial_resource_versions entry of {} and {} bytes: names and versions are at most {MAX_NAME_LEN}",
                name.len(),
                version.len()
            )));
        }
        Ok(Subscription {
            owes_first_response: true,
            changes: initial
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            held: initial.len(),
            ..Subscription::default()
        })
    }

    /// Applies a request's subscription changes. Past [`MAX_NAMES`] names the stream ends.
    fn apply_names(&mut self, subscribe: &[String], unsubscribe: &[String]) -> Result<(), Status> {
        for name in subscribe {
            if name == "*" {
                self.wildcard = true;
                continue;
            }
            if name.len() > MAX_NAME_LEN {
                return Err(Status::invalid_argument(format!(
                    "a resource name of {} bytes (at most {MAX_NAME_LEN})",
                    name.len()
                )));
            }
            if self.names.len() >= MAX_NAMES && !self.names.contains(name) {
                return Err(Status::resource_exhausted(format!(
                    "more than {MAX_NAMES} names subscribed to one type; subscribe to \"*\" instead"
                )));
            }
            self.names.insert(name.clone());
        }
        for name in unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
            // The proxy forgets what it unsubscribed from; nothing is sent for it. A name it
            // never held leaves nothing behind.
            if self.held(name).is_some() {
                self.set_held(name.clone(), None);
            }
            self.rejected.remove(name);
        }
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            self.synced = 0;
        }
        Ok(())
    }

    /// Builds the next response from `desired`, or `None` when the proxy already holds it.
    /// `touched` narrows the comparison to the names changed since `synced`, when known; only
    /// the names `visible` to the proxy are sent (the others are removed if held).
    fn diff(
        &mut self,
        type_url: TypeUrl,
        desired: &TypeSet,
        visible: impl Fn(&str) -> bool,
        touched: Option<BTreeSet<&str>>,
        version: u64,
        nonce: String,
    ) -> Option<DiscoveryResponse> {
        let candidates: BTreeSet<&str> = match touched {
            Some(names) if self.synced != 0 => names,
            _ => {
                // A full comparison visits only what exists or is held: forget what the proxy
                // rejected of anything else.
                let mut rejected = std::mem::take(&mut self.rejected);
                rejected.retain(|name, _| desired.contains_key(name) || self.held(name).is_some());
                self.rejected = rejected;
                desired
                    .keys()
                    .map(String::as_str)
                    .chain(self.held_names())
                    .collect()
            }
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut changes = Vec::new();
        let mut bytes = 0;
        let mut incomplete = false;
        // Rejections that no longer apply: the resource changed or went.
        let mut forget = Vec::new();
        for name in candidates {
            if bytes >= RESPONSE_BUDGET {
                incomplete = true;
                break;
            }
            let held = self.held(name);
            match desired
                .get(name)
                .filter(|_| self.subscribed(name) && visible(name))
            {
                Some(want) => {
                    match self.rejected.get(name) {
                        Some(Some(v)) if *v == want.version => continue,
                        // Rejected was another version, or the removal: the resource changed.
                        Some(_) => forget.push(name.to_owned()),
                        None => {}
                    }
                    if held == Some(want.version.as_str()) {
                        continue;
                    }
                    bytes += want.body.value.len() + name.len() + want.version.len();
                    changes.push((
                        name.to_owned(),
                        held.map(str::to_owned),
                        Some(want.version.clone()),
                    ));
                    resources.push(Resource {
                        name: name.to_owned(),
                        version: want.version.clone(),
                        resource: Some(want.body.clone()),
                    });
                }
                None if held.is_some() => {
                    match self.rejected.get(name) {
                        // The proxy refused to remove it: not asked again until it changes.
                        Some(None) => continue,
                        Some(Some(_)) => forget.push(name.to_owned()),
                        None => {}
                    }
                    bytes += name.len();
                    changes.push((name.to_owned(), held.map(str::to_owned), None));
                    removed.push(name.to_owned());
                }
                None => {
                    if self.rejected.contains_key(name) {
                        forget.push(name.to_owned());
                    }
                }
            }
        }
        for name in forget {
            self.rejected.remove(&name);
        }
        for (name, _, sent) in &changes {
            self.set_held(name.clone(), sent.clone());
        }
        if incomplete {
            // Names past the budget were not compared: the next response compares everything.
            self.synced = 0;
        } else {
            self.synced = version;
            if self.wildcard && (self.base.is_none() || self.changes.len() > MAX_CHANGES) {
                self.rebase(desired);
            }
        }
        if changes.is_empty() && !self.owes_first_response {
            return None;
        }
        if !incomplete {
            self.owes_first_response = false;
        }
        self.in_flight = Some(InFlight {
            nonce: nonce.clone(),
            system_version: version,
            changes,
        });
        Some(DiscoveryResponse {
            type_url: type_url.to_owned(),
            system_version: version.to_string(),
            resources,
            removed_resources: removed,
            nonce,
            incomplete,
            error_detail: None,
        })
    }

    /// Makes `desired` the base, keeping as changes only where the proxy holds something else.
    fn rebase(&mut self, desired: &TypeSet) {
        let names: BTreeSet<&str> = desired
            .keys()
            .map(String::as_str)
            .chain(self.held_names())
            .collect();
        let changes: HashMap<String, Option<String>> = names
            .into_iter()
            .filter_map(|name| {
                let held = self.held(name);
                let base = desired.get(name).map(|r| r.version.as_str());
                (held != base).then(|| (name.to_owned(), held.map(str::to_owned)))
            })
            .collect();
        self.base = Some(desired.clone());
        self.changes = changes;
    }

    /// The proxy rejected the in-flight response: it kept what it had.
    fn rejected_in_flight(&mut self, flight: InFlight) {
        for (name, before, sent) in flight.changes {
            self.rejected.insert(name.clone(), sent);
            self.set_held(name, before);
        }
    }

    /// Records that the proxy holds `version` of `name` (`None`: does not hold it).
    fn set_held(&mut self, name: String, version: Option<String>) {
        let before = self.held(&name).is_some();
        match (before, version.is_some()) {
            (true, false) => self.held -= 1,
            (false, true) => self.held += 1,
            _ => {}
        }
        self.changes.insert(name, version);
    }

    /// How many resources the proxy holds.
    fn held_count(&self) -> usize {
        self.held
    }
}

/// A proxy's stream, from its first request to its end.
pub(super) struct ProxyStream {
    id: u64,
    node: NodeInfo,
    registry: Arc<ProxyRegistry>,
    snapshot: Arc<Snapshot>,
    /// Resources computed for this node alone (mesh settings, inbound policy)...
    own: BTreeMap<TypeUrl, TypeSet>,
    /// ...valid for the snapshot of this version...
    own_version: u64,
    /// ...and built from the snapshot of this one.
    own_built: u64,
    subscriptions: BTreeMap<TypeUrl, Subscription>,
    /// Unknown type URLs the proxy asked for; each was refused once.
    refused: HashSet<String>,
    /// Refusals not yet sent.
    refusals: Vec<DiscoveryResponse>,
    nonces: u64,
    /// Requests read so far, the first included.
    requests: u64,
}

/// The status that ends a stream whose `n`th request could not be read, when that is the
/// client's fault: a message that does not decode as a `DiscoveryRequest` (tonic reports it as
/// INTERNAL), one too large (OUT_OF_RANGE, RESOURCE_EXHAUSTED) or compressed in a way this server
/// does not read (UNIMPLEMENTED). The answer is INVALID_ARGUMENT naming the request and the
/// reason, never a plain end of stream (grpc-status OK) that would let a broken client believe
/// all was well. `None` for the client going away (a reset, a lost connection): nothing to say.
pub(super) fn unreadable_request(n: u64, status: &Status) -> Option<Status> {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Internal | Code::OutOfRange | Code::ResourceExhausted | Code::Unimplemented
    )
    .then(|| {
        Status::invalid_argument(format!(
            "discovery request #{n} is not a readable keel.mesh.v1.DiscoveryRequest: {}",
            status.message()
        ))
    })
}

/// Why a stream ended other than by the proxy closing it.
#[derive(Debug)]
enum Ended {
    /// The proxy's connection went away without a word: the sidecar was killed, its pod
    /// deleted, or the network between them cut.
    Lost(String),
    /// The stream failed: the proxy sent what cannot be served, or the control plane stops.
    Failed(String),
}

impl From<String> for Ended {
    fn from(reason: String) -> Self {
        Ended::Failed(reason)
    }
}

/// Runs a stream until the proxy goes away. The first request has already been read.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    id: u64,
    peer: Option<SocketAddr>,
    first: DiscoveryRequest,
    mut requests: Streaming<DiscoveryRequest>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut stopping: watch::Receiver<bool>,
    registry: Arc<ProxyRegistry>,
    responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let node = match first.node.as_ref().map(NodeInfo::try_from) {
        Some(Ok(node)) => node,
        Some(Err(reason)) => {
            let _ = responses
                .send(Err(Status::invalid_argument(format!("bad node: {reason}"))))
                .await;
            return;
        }
        None => {
            let _ = responses
                .send(Err(Status::invalid_argument(
                    "the first discovery request must carry the node",
                )))
                .await;
            return;
        }
    };
    let snapshot = snapshots.borrow_and_update().clone();
    registry.connect(id, first.node.clone().unwrap_or_default(), peer);
    tracing::info!(stream = id, node = %node.id, ?peer, "proxy connected");
    if !snapshot.loaded {
        tracing::info!(
            stream = id,
            node = %node.id,
            "no valid mesh configuration loaded yet; the stream waits for one"
        );
    }
    let mut stream = ProxyStream {
        id,
        own: resources::node_resources(&snapshot.model, &snapshot.trust, &node),
        own_version: snapshot.version,
        own_built: snapshot.version,
        node,
        registry,
        snapshot,
        subscriptions: BTreeMap::new(),
        refused: HashSet::new(),
        refusals: Vec::new(),
        nonces: 0,
        requests: 1,
    };
    let end = tokio::select! {
        end = stream.run(first, &mut requests, &mut snapshots, &responses) => end,
        () = async { drop(stopping.wait_for(|s| *s).await) } => {
            let _ = responses
                .send(Err(Status::unavailable("the control plane is shutting down")))
                .await;
            Err(Ended::Failed(
                "the control plane is shutting down".to_owned(),
            ))
        }
    };
    let reason = match end {
        Ok(()) => {
            tracing::info!(stream = id, node = %stream.node.id, "proxy disconnected");
            None
        }
        // How most proxies leave: their pod is deleted and the sidecar killed with it.
        Err(Ended::Lost(reason)) => {
            tracing::info!(stream = id, node = %stream.node.id, %reason, "proxy connection lost");
            Some(reason)
        }
        Err(Ended::Failed(reason)) => {
            tracing::warn!(stream = id, node = %stream.node.id, %reason, "discovery stream ended");
            Some(reason)
        }
    };
    stream.registry.disconnect(id, reason);
}

impl ProxyStream {
    async fn run(
        &mut self,
        first: DiscoveryRequest,
        requests: &mut Streaming<DiscoveryRequest>,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
        responses: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Ended> {
        self.handle_or_end(first, responses).await?;
        loop {
            let refusals = std::mem::take(&mut self.refusals);
            for response in refusals.into_iter().chain(self.pending_responses()) {
                if response.error_detail.is_none() {
                    tracing::debug!(
                        stream = self.id,
                        r#type = resources::short_name(&response.type_url),
                        version = self.snapshot.version,
                        since_publish_us = self
                            .snapshot
                            .created
                            .elapsed()
                            .map_or(0, |d| d.as_micros() as u64),
                        "response handed to the transport"
                    );
                    self.registry.sent(
                        self.id,
                        &response.type_url,
                        &response.nonce,
                        response.encoded_len(),
                    );
                }
                responses
                    .send(Ok(response))
                    .await
                    .map_err(|_| Ended::Lost("the proxy stopped reading".to_owned()))?;
            }
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        self.requests += 1;
                        self.handle_or_end(request, responses).await?
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        let Some(answer) = unreadable_request(self.requests + 1, &status) else {
                            // The proxy went away (reset, connection lost): no fault of its
                            // requests, nobody to answer, nothing to record against it.
                            return Err(Ended::Lost(format!(
                                "receive failed: {}",
                                status.message()
                            )));
                        };
                        let reason = answer.message().to_owned();
                        self.registry.error(self.id, reason.clone());
                        // The proxy learns why its stream ends.
                        let _ = responses.send(Err(answer)).await;
                        return Err(Ended::Failed(reason));
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Err(Ended::Failed("the store is gone".to_owned()));
                    }
                    self.snapshot = snapshots.borrow_and_update().clone();
                    // Most changes (an endpoint moving) leave this proxy's own resources as
                    // they are; they are built again only when what they depend on changed.
                    if self
                        .snapshot
                        .node_view_changed_since(self.own_version, &self.node.workload)
                    {
                        self.own = resources::node_resources(
                            &self.snapshot.model,
                            &self.snapshot.trust,
                            &self.node,
                        );
                        self.own_built = self.snapshot.version;
                    }
                    self.own_version = self.snapshot.version;
                },
            }
        }
    }

    /// Applies one request; a request that ends the stream is answered with its status.
    async fn handle_or_end(
        &mut self,
        request: DiscoveryRequest,
        responses: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), String> {
        let Err(status) = self.handle(request) else {
            return Ok(());
        };
        let reason = status.message().to_owned();
        self.registry.error(self.id, reason.clone());
        let _ = responses.send(Err(status)).await;
        Err(reason)
    }

    /// Applies one request: subscription changes, then the ACK or NACK it carries. An error ends
    /// the stream.
    fn handle(&mut self, mut request: DiscoveryRequest) -> Result<(), Status> {
        if request.type_url.is_empty() {
            return Ok(());
        }
        let Some(type_url) = resources::known_type(&request.type_url) else {
            return self.refuse(request.type_url);
        };
        let subscription = match self.subscriptions.entry(type_url) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                // The proxy reconnected holding these versions: nothing equal is resent.
                let mut s = Subscription::holding(&request.initial_resource_versions)?;
                if request.subscribe.is_empty() {
                    s.wildcard = true;
                }
                e.insert(s)
            }
        };
        subscription.apply_names(&request.subscribe, &request.unsubscribe)?;

        if request.response_nonce.is_empty() {
            return Ok(());
        }
        let in_flight = subscription
            .in_flight
            .take_if(|f| f.nonce == request.response_nonce);
        let Some(flight) = in_flight else {
            // A stale or unknown nonce: the subscription change above still counts, the
            // ACK does not.
            tracing::debug!(stream = self.id, nonce = %request.response_nonce, "stale nonce");
            return Ok(());
        };
        // The version the proxy says it runs: on an ACK the one applied, on a NACK the one kept.
        let echoed = std::mem::take(&mut request.system_version);
        match request.error_detail {
            None => {
                // The nonce says which response was answered; an echo that names another
                // version is a confused proxy (or one that answered the wrong response), worth
                // seeing in status. An empty echo is an older proxy's.
                if !echoed.is_empty() && echoed != flight.system_version.to_string() {
                    let reason = format!(
                        "ACK of nonce {} names version {echoed:?}, but that response was version {}",
                        flight.nonce, flight.system_version
                    );
                    tracing::warn!(stream = self.id, node = %self.node.id, "{reason}");
                    self.registry.error(self.id, reason);
                }
                self.registry.acked(
                    self.id,
                    type_url,
                    flight.system_version,
                    subscription.held_count(),
                );
            }
            Some(detail) => {
                tracing::warn!(
                    stream = self.id,
                    node = %self.node.id,
                    r#type = resources::short_name(type_url),
                    version = flight.system_version,
                    error = %detail.message,
                    "proxy rejected configuration"
                );
                self.registry.nacked(
                    self.id,
                    Nack {
                        type_url: type_url.to_owned(),
                        version: flight.system_version,
                        nonce: flight.nonce.clone(),
                        kept_version: (!echoed.is_empty()).then_some(echoed),
                        message: detail.message,
                        at: std::time::SystemTime::now(),
                    },
                );
                subscription.rejected_in_flight(flight);
            }
        }
        Ok(())
    }

    /// A request for a type this server does not serve. The proxy gets one response saying so
    /// (xDS servers commonly ignore such a request, leaving the proxy waiting for nothing); its
    /// other subscriptions go on. Requests repeating the type (an answer to that response) are
    /// ignored.
    fn refuse(&mut self, type_url: String) -> Result<(), Status> {
        if type_url.len() > MAX_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "a type URL of {} bytes is not a type URL (at most {MAX_TYPE_URL})",
                type_url.len()
            )));
        }
        if self.refused.contains(&type_url) {
            tracing::debug!(stream = self.id, %type_url, "unknown type asked for again");
            return Ok(());
        }
        if self.refused.len() >= MAX_REFUSED_TYPES {
            return Err(Status::invalid_argument(format!(
                "more than {MAX_REFUSED_TYPES} unknown type URLs on one stream; the last was {type_url:?}"
            )));
        }
        let reason = format!(
            "unknown type URL {type_url:?}; this control plane serves: {}",
            resources::ALL_TYPES.join(", ")
        );
        tracing::warn!(stream = self.id, node = %self.node.id, "{reason}");
        self.registry.error(self.id, reason.clone());
        self.nonces += 1;
        self.refusals.push(DiscoveryResponse {
            type_url: type_url.clone(),
            nonce: self.nonces.to_string(),
            error_detail: Some(ErrorDetail {
                code: tonic::Code::InvalidArgument as i32,
                message: reason,
            }),
            ..DiscoveryResponse::default()
        });
        self.refused.insert(type_url);
        Ok(())
    }

    /// Every response that can be sent now: for each subscribed type with nothing in flight,
    /// what differs between the current snapshot and what the proxy holds.
    fn pending_responses(&mut self) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        if !self.snapshot.loaded {
            // No valid model yet: the stream stays open and silent, so the proxy keeps what it
            // holds (and is not ready if it holds nothing) instead of being told the mesh is
            // empty. Subscriptions are recorded meanwhile and answered once a model is loaded.
            return out;
        }
        for type_url in resources::ALL_TYPES {
            let Some(subscription) = self.subscriptions.get_mut(type_url) else {
                continue;
            };
            if subscription.in_flight.is_some() {
                continue;
            }
            let synced = subscription.synced;
            let shared = self.snapshot.shared.contains_key(type_url);
            let (desired, touched) = match self.snapshot.shared.get(type_url) {
                Some(set) => (set, self.snapshot.touched_since(type_url, synced)),
                None => match self.own.get(type_url) {
                    // Compared since this set was built: only a new set can differ.
                    Some(set) if synced != 0 && synced >= self.own_built => {
                        (set, Some(BTreeSet::new()))
                    }
                    Some(set) => (set, None),
                    None => continue,
                },
            };
            // Most changes touch a few types: the others have nothing to compare.
            let nothing_touched = touched.as_ref().is_some_and(BTreeSet::is_empty);
            if nothing_touched && synced != 0 && !subscription.owes_first_response {
                subscription.synced = self.snapshot.version;
                continue;
            }
            self.nonces += 1;
            let nonce = self.nonces.to_string();
            // Shared resources are a service's: sent only where it is exported.
            let snapshot = &self.snapshot;
            let namespace = self.node.workload.namespace.as_str();
            let visible = |name: &str| !shared || snapshot.visible(name, namespace);
            if let Some(r) =
                subscription.diff(type_url, desired, visible, touched, snapshot.version, nonce)
            {
                out.push(r);
            }
        }
        out
    }
}

impl TryFrom<&Node> for NodeInfo {
    type Error = String;

    fn try_from(node: &Node) -> Result<Self, Self::Error> {
        if node.workload.is_empty() {
            return Err("node.workload is empty".to_owned());
        }
        if node.namespace.is_empty() {
            return Err("node.namespace is empty".to_owned());
        }
        let id = if node.id.is_empty() {
            format!("{}.{}", node.workload, node.namespace)
        } else {
            node.id.clone()
        };
        Ok(NodeInfo {
            id,
            workload: crate::model::ObjectKey {
                namespace: node.namespace.clone(),
                name: node.workload.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::resources::VersionedResource;
    use prost_types::Any;

    fn resource(version: &str, size: usize) -> Arc<VersionedResource> {
        Arc::new(VersionedResource {
            version: version.to_owned(),
            body: Any {
                type_url: "t".to_owned(),
                value: vec![0; size],
            },
        })
    }

    fn set(items: &[(&str, &str)]) -> TypeSet {
        Arc::new(
            items
                .iter()
                .map(|(n, v)| ((*n).to_owned(), resource(v, 8)))
                .collect(),
        )
    }

    fn holding(items: &[(&str, &str)]) -> Subscription {
        let held = items
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        let mut s = Subscription::holding(&held).expect("within the caps");
        s.wildcard = true;
        s
    }

    const T: TypeUrl = keel_proto::v1::type_url::SERVICE;

    fn names(r: &DiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn first_response_is_sent_even_when_empty_and_then_only_changes() {
        let mut s = holding(&[]);
        let r = s
            .diff(T, &set(&[]), |_| true, None, 1, "1".into())
            .expect("first");
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        s.in_flight = None;
        assert!(
            s.diff(T, &set(&[]), |_| true, None, 2, "2".into())
                .is_none()
        );
        let r = s
            .diff(T, &set(&[("a", "1")]), |_| true, None, 3, "3".into())
            .expect("a");
        assert_eq!(names(&r), ["a"]);
    }

    #[test]
    fn reconnect_with_versions_resends_only_what_differs() {
        let mut s = holding(&[("a", "1"), ("b", "1")]);
        let desired = set(&[("a", "1"), ("b", "2"), ("c", "1")]);
        let r = s
            .diff(T, &desired, |_| true, None, 5, "1".into())
            .expect("response");
        assert_eq!(names(&r), ["b", "c"]);
        assert!(r.removed_resources.is_empty());
        // In step now: the stream holds the snapshot's set itself, with no deviations.
        assert!(s.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, &desired)));
        assert!(s.changes.is_empty());
        assert_eq!(s.held_count(), 3);
    }

    #[test]
    fn removal_is_named() {
        let mut s = holding(&[("gone", "1")]);
        let r = s
            .diff(T, &set(&[]), |_| true, None, 2, "1".into())
            .expect("response");
        assert_eq!(r.removed_resources, ["gone"]);
        assert_eq!(s.held("gone"), None);
        assert_eq!(s.held_count(), 0);
    }

    #[test]
    fn nack_restores_what_was_held_and_the_rejected_version_is_not_resent() {
        let mut s = holding(&[("a", "1")]);
        s.owes_first_response = false;
        let desired = set(&[("a", "2")]);
        s.diff(T, &desired, |_| true, None, 2, "1".into())
            .expect("a@2");
        let flight = s.in_flight.take().expect("in flight");
        s.rejected_in_flight(flight);
        assert_eq!(s.held("a"), Some("1"));
        assert!(s.diff(T, &desired, |_| true, None, 2, "2".into()).is_none());
        // A new version of the resource is sent again.
        let r = s.diff(T, &set(&[("a", "3")]), |_| true, None, 3, "3".into());
        assert_eq!(r.expect("a@3").resources[0].version, "3");
    }

    #[test]
    fn touched_names_narrow_the_comparison() {
        let mut s = holding(&[("a", "1")]);
        s.owes_first_response = false;
        s.synced = 4;
        // "b" is not held but not touched either: only the touched names are compared.
        let desired = set(&[("a", "2"), ("b", "1")]);
        let r = s
            .diff(
                T,
                &desired,
                |_| true,
                Some(BTreeSet::from(["a"])),
                5,
                "1".into(),
            )
            .expect("a");
        assert_eq!(names(&r), ["a"]);
    }

    #[test]
    fn named_subscription_sees_only_its_names() {
        let mut s = Subscription {
            owes_first_response: true,
            ..Subscription::default()
        };
        s.apply_names(&["b".to_owned()], &[]).expect("one name");
        let r = s
            .diff(
                T,
                &set(&[("a", "1"), ("b", "1")]),
                |_| true,
                None,
                1,
                "1".into(),
            )
            .expect("b");
        assert_eq!(names(&r), ["b"]);
    }

    #[test]
    fn large_updates_are_split_and_complete_in_the_last_part() {
        let big: TypeSet = Arc::new(
            (0..40)
                .map(|i| (format!("r{i:02}"), resource("1", 8 << 10)))
                .collect(),
        );
        let mut s = holding(&[]);
        let mut received = BTreeSet::new();
        let mut parts = 0;
        loop {
            let r = s
                .diff(T, &big, |_| true, None, 7, parts.to_string())
                .expect("part");
            parts += 1;
            let bytes: usize = r
                .resources
                .iter()
                .map(|r| r.resource.as_ref().map_or(0, |a| a.value.len()))
                .sum();
            assert!(
                bytes <= RESPONSE_BUDGET + (8 << 10),
                "part of {bytes} bytes"
            );
            received.extend(r.resources.iter().map(|r| r.name.clone()));
            s.in_flight = None;
            if !r.incomplete {
                break;
            }
        }
        assert!(parts > 1, "40 x 8 KiB must not fit one response");
        assert_eq!(received.len(), 40);
        assert!(s.diff(T, &big, |_| true, None, 7, "last".into()).is_none());
    }

    /// What the proxy holds, counted from scratch.
    fn counted(s: &Subscription) -> usize {
        s.held_names().len()
    }

    #[test]
    fn the_held_count_follows_every_change() {
        let mut s = holding(&[("a", "1"), ("b", "1"), ("gone", "1")]);
        assert_eq!((s.held_count(), counted(&s)), (3, 3));
        let desired = set(&[("a", "2"), ("b", "1"), ("c", "1")]);
        let r = s
            .diff(T, &desired, |_| true, None, 2, "1".into())
            .expect("a, c, -gone");
        assert_eq!(r.removed_resources, ["gone"]);
        assert_eq!((s.held_count(), counted(&s)), (3, 3));
        // Rejected: the proxy kept a@1 and gone@1 and never got c.
        let flight = s.in_flight.take().expect("in flight");
        s.rejected_in_flight(flight);
        assert_eq!((s.held_count(), counted(&s)), (3, 3));
        assert_eq!(s.held("c"), None);
        s.apply_names(&[], &["b".to_owned()]).expect("unsubscribe");
        assert_eq!((s.held_count(), counted(&s)), (2, 2));
        // Many changes re-base on a shared set; the count stays right.
        let many: TypeSet = Arc::new(
            (0..100)
                .map(|i| (format!("r{i}"), resource("1", 8)))
                .collect(),
        );
        s.diff(T, &many, |_| true, None, 3, "2".into())
            .expect("all of them");
        s.in_flight = None;
        // `gone`'s removal was rejected, so it is not asked again: the proxy still holds it.
        assert_eq!(s.held("gone"), Some("1"));
        assert_eq!((s.held_count(), counted(&s)), (101, 101));
    }

    #[test]
    fn many_small_changes_rebase_on_the_shared_set() {
        let mut s = holding(&[]);
        let first: TypeSet = Arc::new(
            (0..100)
                .map(|i| (format!("r{i}"), resource("1", 8)))
                .collect(),
        );
        s.diff(T, &first, |_| true, None, 1, "1".into())
            .expect("initial");
        s.in_flight = None;
        let second: TypeSet = Arc::new(
            (0..100)
                .map(|i| (format!("r{i}"), resource("2", 8)))
                .collect(),
        );
        let r = s
            .diff(T, &second, |_| true, None, 2, "2".into())
            .expect("all changed");
        assert_eq!(r.resources.len(), 100);
        assert!(s.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, &second)));
        assert!(s.changes.is_empty());
    }

    #[test]
    fn a_rejected_removal_is_not_sent_again_until_the_resource_changes() {
        let mut s = holding(&[("a", "1"), ("b", "1")]);
        s.owes_first_response = false;
        let r = s
            .diff(T, &set(&[("b", "1")]), |_| true, None, 2, "1".into())
            .expect("removal");
        assert_eq!(r.removed_resources, ["a"]);
        let flight = s.in_flight.take().expect("in flight");
        s.rejected_in_flight(flight);
        assert_eq!(s.held("a"), Some("1"), "the proxy kept it");
        // Neither the next incremental comparison nor a full one asks again.
        assert!(
            s.diff(T, &set(&[("b", "1")]), |_| true, None, 3, "2".into())
                .is_none()
        );
        s.synced = 0;
        assert!(
            s.diff(T, &set(&[("b", "1")]), |_| true, None, 4, "3".into())
                .is_none()
        );
        // Back with the version the proxy holds: nothing to send, and the refusal is forgotten.
        assert!(
            s.diff(
                T,
                &set(&[("a", "1"), ("b", "1")]),
                |_| true,
                None,
                5,
                "4".into()
            )
            .is_none()
        );
        assert!(s.rejected.is_empty());
        // Gone again: the removal is a new change, and is sent.
        let r = s.diff(T, &set(&[("b", "1")]), |_| true, None, 6, "5".into());
        assert_eq!(r.expect("removal").removed_resources, ["a"]);
    }

    #[test]
    fn rejected_versions_are_forgotten_when_their_resource_goes() {
        let mut s = holding(&[]);
        s.owes_first_response = false;
        s.diff(T, &set(&[("a", "1")]), |_| true, None, 1, "1".into())
            .expect("a");
        let flight = s.in_flight.take().expect("in flight");
        s.rejected_in_flight(flight);
        assert_eq!(s.rejected.len(), 1);
        // The resource leaves the snapshot (an incremental comparison of the touched name)...
        assert!(
            s.diff(
                T,
                &set(&[]),
                |_| true,
                Some(BTreeSet::from(["a"])),
                2,
                "2".into()
            )
            .is_none()
        );
        assert!(s.rejected.is_empty());
        // ...or is missed by history and found gone in a full comparison.
        s.diff(T, &set(&[("b", "1")]), |_| true, None, 3, "3".into())
            .expect("b");
        let flight = s.in_flight.take().expect("in flight");
        s.rejected_in_flight(flight);
        assert_eq!(s.rejected.len(), 1);
        s.synced = 0;
        assert!(
            s.diff(T, &set(&[]), |_| true, None, 4, "4".into())
                .is_none()
        );
        assert!(s.rejected.is_empty());
    }

    #[test]
    fn unsubscribing_names_never_held_records_nothing() {
        let mut s = holding(&[("a", "1")]);
        let names: Vec<String> = (0..1000).map(|i| format!("never-{i}")).collect();
        s.apply_names(&[], &names).expect("unsubscribe");
        assert!(s.changes.len() <= 1, "{} entries", s.changes.len());
        s.apply_names(&[], &["a".to_owned()]).expect("unsubscribe");
        assert_eq!(s.held("a"), None);
        assert_eq!(s.held_count(), 0);
    }

    #[test]
    fn subscribed_names_are_capped_per_type() {
        let mut s = Subscription::default();
        let names: Vec<String> = (0..MAX_NAMES).map(|i| format!("n{i}")).collect();
        s.apply_names(&names, &[]).expect("up to the cap");
        // Subscribing again to a name already there is no growth.
        s.apply_names(&names[..10], &[]).expect("no growth");
        let err = s
            .apply_names(&["one-too-many".to_owned()], &[])
            .expect_err("past the cap");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("subscribe to"), "{}", err.message());
        let too_long = "x".repeat(MAX_NAME_LEN + 1);
        let err = Subscription::default()
            .apply_names(&[too_long], &[])
            .expect_err("too long");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let initial: BTreeMap<String, String> = (0..=MAX_NAMES)
            .map(|i| (format!("n{i}"), "1".to_owned()))
            .collect();
        let err = Subscription::holding(&initial).expect_err("too many held");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
