//! The inbound side: connections redirected to the pod, handed to the local app.
//!
//! The original destination's port is the app's port; the proxy forwards to the app on the
//! loopback address of the connection's family at that port (127.0.0.1, or `[::1]` for a client
//! that came over IPv6: an app reachable on the pod's IPv6 address listens on IPv6), so the app
//! sees connections from the proxy and the real client's address in `x-forwarded-for`. HTTP/2 from a peer sidecar carries HTTP/1 requests marked with
//! `keel-orig-proto`; they are sent to the app as HTTP/1.1. Other HTTP/2 (gRPC) stays HTTP/2,
//! HTTP/1 stays HTTP/1, and anything else is copied as opaque TCP.
//!
//! mTLS: a TLS ClientHello whose server name is this proxy's identity name is mesh traffic; the
//! proxy terminates it, requiring a client certificate from the mesh (see [`crate::tls`]), and
//! the ALPN says what flows inside (HTTP/2, HTTP/1.1 or opaque TCP). The peer's SPIFFE ID
//! reaches the app in `keel-client-id` (a value a client sends itself is always removed). Other
//! TLS is the application's own and is passed through as opaque TCP. Under STRICT mTLS,
//! everything that is not mesh mTLS is refused and counted. Before the first configuration from
//! the control plane every connection is refused (and counted as `unconfigured`): the pod's mode
//! and policies are not known yet, and the defaults must never stand in for them.
//!
//! Access policies ([`crate::authz`]) are checked per request for HTTP (403 with `keel-error:
//! forbidden`) and per connection for opaque TCP (closed), against the verified peer.
//!
//! This module must never forward to anything but the local app, never pass on a
//! `keel-client-id` it did not verify, and never accept a connection before the first
//! configuration.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use keel_proto::spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::config::MtlsMode;
use crate::metrics::{ConnProtocol, Direction, Refusal, RequestLabels};
use crate::outbound::ORIG_PROTO;
use crate::pool::{self, Body};
use crate::serve::{self, Drain, Shared};
use crate::tls::Carried;
use crate::transparent;
use crate::{authz, detect};

/// How long connecting to the local app may take; it is on the same host.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The header that tells the app who the (verified) client is.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("keel-client-id");
/// The header that carries the client's address to the app.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// How much of a ClientHello the proxy reads to find its server name.
const MAX_CLIENT_HELLO: usize = 16 << 10;
/// How long a peer may take to complete the mTLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the inbound listener until drained.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, drain: Drain) {
    serve::accept_loop(listener, drain, move |stream, client, drain| {
        let shared = shared.clone();
        async move { connection(shared, stream, client, drain).await }
    })
    .await;
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream, client: SocketAddr, drain: Drain) {
    let orig = match transparent::original_dst(&stream) {
        Ok(orig) => orig,
        Err(e) => {
            tracing::warn!(%client, error = %e, "inbound connection without an original destination; closing");
            return;
        }
    };
    if orig.port() == shared.inbound_port {
        tracing::warn!(%client, %orig, "connection addressed to the inbound listener itself; closing");
        return;
    }
    if !shared.config.is_configured() {
        // Until the first configuration the proxy does not know this pod's mTLS mode or its
        // access policies, so it lets nothing in: acting on the defaults would accept plaintext
        // for a pod meant to be STRICT, and any peer for a pod whose policies deny it. (Envoy
        // under Istio has the same effect by having no inbound listener before its first LDS.)
        tracing::debug!(%client, "inbound connection before the first configuration; refused");
        shared.metrics.refused(Refusal::unconfigured);
        return;
    }
    let _ = stream.set_nodelay(true);
    let app = SocketAddr::new(app_ip(orig), orig.port());
    let protocol = match detect::detect(&stream, shared.detect_timeout).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%client, error = %e, "detection failed");
            return;
        }
    };
    let strict = shared.config.current().mesh().mtls_mode == MtlsMode::Strict;
    if protocol == detect::Protocol::Tls {
        match mesh_client_hello(&stream, &shared).await {
            Hello::Mesh => return mesh(shared, stream, client, app, drain).await,
            Hello::Foreign if strict => {
                tracing::debug!(%client, "TLS that is not mesh mTLS refused (STRICT)");
                shared.metrics.refused(Refusal::foreign_tls);
                return;
            }
            Hello::Foreign => {}
        }
    } else if strict {
        tracing::debug!(%client, ?protocol, "plaintext refused (STRICT mTLS)");
        shared.metrics.refused(Refusal::plaintext);
        return;
    }
    match protocol {
        detect::Protocol::Http1 | detect::Protocol::Http2 => {
            let http2 = protocol == detect::Protocol::Http2;
            let _conn = shared
                .metrics
                .connection(Direction::inbound, protocol.into());
            if !http2 && serve::refuse_malformed_head(&mut stream).await {
                return;
            }
            let handler = Arc::new(HttpInbound::new(
                shared.clone(),
                drain.clone(),
                app,
                client,
                None,
            ));
            serve::serve_http(stream, http2, shared.head_timeout, drain, move |req| {
                handler.clone().request(req)
            })
            .await;
        }
        detect::Protocol::Tls | detect::Protocol::Opaque => {
            let label = ConnProtocol::from(protocol);
            let _conn = shared.metrics.connection(Direction::inbound, label);
            if authorized_tcp(&shared, None, client, app) {
                to_app(&shared, stream, app, label).await;
            }
        }
    }
}

/// Where the app is for a connection to `orig`: the loopback address of its family.
fn app_ip(orig: SocketAddr) -> IpAddr {
    match orig {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    }
}

/// Whether the access policies let `peer` at `client` open an opaque connection to `app`'s
/// port; a refusal is logged and counted.
fn authorized_tcp(
    shared: &Shared,
    peer: Option<&SpiffeId>,
    client: SocketAddr,
    app: SocketAddr,
) -> bool {
    let config = shared.config.current();
    let verdict = authz::decide(
        config.authorization_policies(),
        &authz::Attempt {
            peer,
            source_ip: client.ip(),
            port: app.port(),
            http: None,
        },
    );
    for policy in &verdict.audited {
        tracing::info!(%client, peer = ?peer.map(ToString::to_string), port = app.port(), %policy, "audited connection");
    }
    match verdict.denied_by {
        None => true,
        Some(reason) => {
            tracing::debug!(%client, peer = ?peer.map(ToString::to_string), port = app.port(), %reason, "connection denied");
            shared.metrics.refused(Refusal::denied);
            false
        }
    }
}

/// Copies a connection to the app at `app`, both ways. An async block, so that the stream is
/// held once (an `async fn` keeps its arguments twice).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the stream twice"
)]
fn to_app<'a, S>(
    shared: &'a Shared,
    mut stream: S,
    app: SocketAddr,
    label: ConnProtocol,
) -> impl Future<Output = ()> + Send + 'a
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'a,
{
    async move {
        match pool::connect(app, APP_CONNECT_TIMEOUT).await {
            Ok(mut upstream) => {
                let (sent, received) = serve::copy_bidirectional(&mut stream, &mut upstream).await;
                // Both sides closed before the bytes are counted, as when the copy owned them.
                drop(upstream);
                drop(stream);
                shared
                    .metrics
                    .bytes(Direction::inbound, label, sent, received);
            }
            Err(e) => tracing::debug!(%app, error = %e, "local app unreachable"),
        }
    }
}

/// What a TLS ClientHello is for.
enum Hello {
    /// Mesh mTLS for this proxy: its server name is this proxy's identity name.
    Mesh,
    /// Anything else: the application's own TLS, or not TLS after all.
    Foreign,
}

/// Reads (without consuming) the ClientHello on `stream` and tells whether it is mesh mTLS for
/// this proxy. Bounded in size and by the detection timeout.
async fn mesh_client_hello(stream: &TcpStream, shared: &Shared) -> Hello {
    let Some(tls) = &shared.tls else {
        return Hello::Foreign;
    };
    let deadline = tokio::time::Instant::now() + shared.detect_timeout;
    let mut buf = vec![0u8; MAX_CLIENT_HELLO];
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Hello::Foreign,
        };
        match read_client_hello(&buf[..peeked], tls.server_name()) {
            Some(hello) => return hello,
            None if peeked < MAX_CLIENT_HELLO && peeked > 0 => {
                // The ClientHello spans more segments than have arrived.
                if peeked == seen {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = peeked;
            }
            None => return Hello::Foreign,
        }
    }
}

/// What the ClientHello at the start of `bytes` is for, or none while it is incomplete. Not
/// inline in [`mesh_client_hello`]: there the acceptor (1160 bytes) and what it accepted were
/// kept across the wait for more bytes, 2.3 KB of that future's 2.7 KB (`-Zprint-type-sizes`).
fn read_client_hello(mut bytes: &[u8], server_name: &str) -> Option<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    if acceptor.read_tls(&mut bytes).is_err() {
        return Some(Hello::Foreign);
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let ours = accepted.client_hello().server_name() == Some(server_name);
            Some(if ours { Hello::Mesh } else { Hello::Foreign })
        }
        Ok(None) => None,
        Err(_) => Some(Hello::Foreign),
    }
}

/// Terminates mesh mTLS and serves what it carries.
async fn mesh(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    app: SocketAddr,
    drain: Drain,
) {
    let Some((tls, peer, carried)) = mesh_handshake(&shared, stream, client).await else {
        return;
    };
    let _conn = shared
        .metrics
        .connection(Direction::inbound, ConnProtocol::mtls);
    match carried {
        Some(Carried::Http2 | Carried::Http1) => {
            let handler = Arc::new(HttpInbound::new(
                shared.clone(),
                drain.clone(),
                app,
                client,
                Some(peer),
            ));
            let http2 = carried == Some(Carried::Http2);
            serve::serve_http(tls, http2, shared.head_timeout, drain, move |req| {
                handler.clone().request(req)
            })
            .await;
        }
        Some(Carried::Opaque) => {
            if authorized_tcp(&shared, Some(&peer), client, app) {
                to_app(&shared, tls, app, ConnProtocol::mtls).await;
            }
        }
        None => {
            tracing::debug!(%client, %peer, "mTLS without an agreed protocol (ALPN); closing");
        }
    }
}

/// The mesh mTLS handshake on `stream`: the TLS stream, the client's verified identity and
/// the protocol it carries, or none (counted as refused). A function of its own, so that what
/// the handshake leaves in locals is not kept in the connection's future while it is served.
async fn mesh_handshake(
    shared: &Shared,
    stream: TcpStream,
    client: SocketAddr,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Arc<SpiffeId>,
    Option<Carried>,
)> {
    let Some(config) = shared.tls.as_ref().and_then(|t| t.server_config()) else {
        tracing::debug!(%client, "mesh mTLS before this proxy has a certificate; refused");
        shared.metrics.refused(Refusal::no_identity);
        return None;
    };
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%client, error = %e, "mTLS handshake refused");
            shared.metrics.refused(Refusal::handshake);
            return None;
        }
        Err(_) => {
            tracing::debug!(%client, "mTLS handshake timed out");
            shared.metrics.refused(Refusal::handshake);
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    // The verifier accepted exactly one SPIFFE ID of the trust domain; read it back.
    let peer = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::identity_of(leaf).ok())
        .map(Arc::new);
    let Some(peer) = peer else {
        shared.metrics.refused(Refusal::handshake);
        return None;
    };
    let carried = Carried::from_alpn(session.alpn_protocol());
    Some((tls, peer, carried))
}

/// One inbound HTTP connection's request handler, shared by its requests' futures.
struct HttpInbound {
    shared: Arc<Shared>,
    /// Upgraded connections are spliced in its tracker.
    drain: Drain,
    app: SocketAddr,
    client: SocketAddr,
    /// The verified identity of the client's sidecar, over mTLS.
    peer: Option<Arc<SpiffeId>>,
    /// `peer` as the `client_id` label and the `keel-client-id` value, formatted once per
    /// connection ("" and none without a peer).
    peer_label: Arc<str>,
    peer_header: Option<HeaderValue>,
    /// The client's address as the `x-forwarded-for` value, formatted once per connection.
    forwarded_for: Option<HeaderValue>,
}

impl HttpInbound {
    fn new(
        shared: Arc<Shared>,
        drain: Drain,
        app: SocketAddr,
        client: SocketAddr,
        peer: Option<Arc<SpiffeId>>,
    ) -> HttpInbound {
        let peer_label: Arc<str> = peer
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default()
            .into();
        let peer_header = HeaderValue::from_str(&peer_label)
            .ok()
            .filter(|_| peer.is_some());
        let forwarded_for = HeaderValue::from_str(&client.ip().to_string()).ok();
        HttpInbound {
            shared,
            drain,
            app,
            client,
            peer,
            peer_label,
            peer_header,
            forwarded_for,
        }
    }

    /// Why the access policies refuse `req`, if they do.
    fn denied(&self, req: &Request<Body>) -> Option<String> {
        let config = self.shared.config.current();
        let policies = config.authorization_policies();
        if policies.is_empty() {
            return None;
        }
        let host = serve::request_authority(req).unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name);
        let verdict = authz::decide(
            policies,
            &authz::Attempt {
                peer: self.peer.as_deref(),
                source_ip: self.client.ip(),
                port: self.app.port(),
                http: Some(authz::HttpAttempt {
                    method: req.method(),
                    path: req.uri().path(),
                    host,
                }),
            },
        );
        for policy in &verdict.audited {
            tracing::info!(client = %self.client, peer = ?self.peer.as_deref().map(ToString::to_string), method = %req.method(), path = req.uri().path(), %policy, "audited request");
        }
        verdict.denied_by
    }

    /// Answers one request; like [`crate::outbound`]'s handler, its future owns its handle on
    /// the handler, so that it is the one [`serve::serve_http`] boxes, and it is an async block
    /// so that it holds no second copy of its request argument.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its request argument twice"
    )]
    fn request(
        self: Arc<Self>,
        mut req: Request<Body>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        async move {
            let started = Instant::now();
            let mut labels = RequestLabels {
                direction: Direction::inbound,
                service: "",
                route: "",
                endpoint: Some(self.app),
                status: 0,
                error: "",
                client_id: &self.peer_label,
            };
            // Over HTTP/1 the client is not a sidecar (whose outbound side checked already), and
            // hyper's own limits are above keel's (see `serve`).
            if req.version() != Version::HTTP_2 && serve::head_too_large(&req) {
                labels.status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16();
                labels.error = "headers-too-large";
                self.shared.metrics.request(labels, started.elapsed());
                return serve::error_response(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers-too-large",
                );
            }
            if let Some(reason) = self.denied(&req) {
                tracing::debug!(client = %self.client, peer = ?self.peer.as_deref().map(ToString::to_string), method = %req.method(), path = req.uri().path(), %reason, "request denied");
                labels.status = StatusCode::FORBIDDEN.as_u16();
                labels.error = "forbidden";
                self.shared.metrics.request(labels, started.elapsed());
                return serve::error_response(StatusCode::FORBIDDEN, "forbidden");
            }
            let downgrade = req.headers_mut().remove(ORIG_PROTO).is_some();
            req.headers_mut().remove(CLIENT_ID);
            if let Some(value) = &self.peer_header {
                req.headers_mut().insert(CLIENT_ID, value.clone());
            }
            let upgrade = serve::upgrade_protocol(&req);
            let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
            let as_http1 = downgrade || req.version() != Version::HTTP_2;
            let (mut parts, body) = req.into_parts();
            if let Some(ip) = &self.forwarded_for {
                parts.headers.append(X_FORWARDED_FOR, ip.clone());
            }
            pool::strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = &upgrade {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol.clone());
            }
            let sent = if as_http1 {
                parts.version = Version::HTTP_11;
                serve::ensure_host(&mut parts, self.app);
                serve::to_origin_form(&mut parts.uri);
                self.shared
                    .upstreams
                    .send_h1(
                        self.app,
                        None,
                        APP_CONNECT_TIMEOUT,
                        Request::from_parts(parts, body),
                    )
                    .await
            } else {
                let authority = serve::NamedAuthority::of(&parts, self.app);
                parts.uri = serve::absolute_uri(authority.as_str(), &parts.uri);
                self.shared
                    .upstreams
                    .send_h2(
                        self.app,
                        None,
                        APP_CONNECT_TIMEOUT,
                        Request::from_parts(parts, body),
                    )
                    .await
            };
            match sent {
                Ok(mut response) => {
                    if let Some(on_upgrade) = on_upgrade
                        && response.status() == StatusCode::SWITCHING_PROTOCOLS
                    {
                        serve::splice_upgrade(
                            &self.drain,
                            on_upgrade,
                            hyper::upgrade::on(&mut response),
                        );
                    }
                    labels.status = response.status().as_u16();
                    self.shared.metrics.request(labels, started.elapsed());
                    response
                }
                Err(e) => {
                    tracing::debug!(app = %self.app, error = %e, "local app request failed");
                    let (status, reason) = if e.before_request() {
                        (StatusCode::SERVICE_UNAVAILABLE, "app-unreachable")
                    } else {
                        (StatusCode::BAD_GATEWAY, "app-reset")
                    };
                    labels.status = status.as_u16();
                    labels.error = reason;
                    self.shared.metrics.request(labels, started.elapsed());
                    serve::error_response(status, reason)
                }
            }
        }
    }
}
