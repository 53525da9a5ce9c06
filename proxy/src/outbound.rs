//! The outbound side: from the app's redirected connection to a service, a route, an endpoint
//! and an upstream connection.
//!
//! A connection's original destination names a service by VIP:port (or nothing: the destination
//! is outside the mesh). TCP ports are proxied as opaque streams to a balanced endpoint. Other
//! ports are detected: HTTP/1 and HTTP/2 are served per request (the `Host`/`:authority` may
//! name another service than the VIP), anything else is opaque.
//!
//! Requests to an endpoint with a sidecar travel over one multiplexed HTTP/2 connection per
//! endpoint; HTTP/1 requests are marked with `keel-orig-proto` so the peer's inbound side turns
//! them back into HTTP/1.1 (as Linkerd does). Upgrades (WebSocket) go over HTTP/1.1 end to end.
//!
//! Errors the proxy answers itself carry a `keel-error` header naming the reason. This module
//! must never buffer a body whole, and never wait on the control plane.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};

use crate::balance;
use crate::config::{Config, OutboundTrafficPolicy, Protocol, ServiceConfig, ServicePort};
use crate::detect;
use crate::metrics::{ConnProtocol, Direction, RequestLabels};
use crate::pool::{self, Body};
use crate::serve::{self, Drain, Shared};
use crate::transparent;

/// How long a connection to a destination outside the mesh may take to open.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries an HTTP/1 request's original protocol across the HTTP/2 hop.
pub const ORIG_PROTO: &str = "keel-orig-proto";

/// Serves the outbound listener until drained.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, drain: Drain) {
    let own = listener.local_addr().ok();
    serve::accept_loop(listener, drain, move |stream, client, drain| {
        let shared = shared.clone();
        async move { connection(shared, stream, client, own, drain).await }
    })
    .await;
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    own: Option<SocketAddr>,
    drain: Drain,
) {
    let orig = match transparent::original_dst(&stream) {
        Ok(orig) => orig,
        Err(e) => {
            tracing::warn!(%client, error = %e, "outbound connection without an original destination; closing");
            return;
        }
    };
    if Some(orig) == own || orig.port() == shared.inbound_port && orig.ip().is_loopback() {
        tracing::warn!(%client, %orig, "connection addressed to the proxy itself; closing");
        return;
    }
    let _ = stream.set_nodelay(true);
    let config = shared.config.current();
    let target = config
        .by_addr(orig)
        .map(|t| (t.service.clone(), t.port.clone()));

    let declared = target.as_ref().map(|(_, port)| port.protocol);
    let protocol = match declared {
        Some(Protocol::Tcp) => detect::Protocol::Opaque,
        _ => match detect::detect(&stream, shared.detect_timeout).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%client, error = %e, "detection failed");
                return;
            }
        },
    };
    match protocol {
        detect::Protocol::Http1 | detect::Protocol::Http2 => {
            let http2 = protocol == detect::Protocol::Http2;
            let _conn = shared
                .metrics
                .connection(Direction::outbound, protocol.into());
            let handler = HttpOutbound {
                shared: shared.clone(),
                orig,
                client,
            };
            serve::serve_http(stream, http2, drain, move |req| {
                let handler = handler.clone();
                async move { handler.request(req).await }
            })
            .await;
        }
        detect::Protocol::Opaque if declared.is_some_and(Protocol::is_http) => {
            // The port is declared HTTP but the client did not speak it: say so rather than
            // tunnel bytes the service cannot understand.
            let _conn = shared
                .metrics
                .connection(Direction::outbound, ConnProtocol::tcp);
            serve::refuse_not_http(stream).await;
        }
        detect::Protocol::Tls | detect::Protocol::Opaque => {
            let label = ConnProtocol::from(protocol);
            let _conn = shared.metrics.connection(Direction::outbound, label);
            opaque(&shared, &config, stream, client, orig, target, label).await;
        }
    }
}

/// Opaque TCP: to a balanced endpoint of the service, or through to the original destination.
async fn opaque(
    shared: &Shared,
    config: &Config,
    stream: TcpStream,
    client: SocketAddr,
    orig: SocketAddr,
    target: Option<(Arc<ServiceConfig>, ServicePort)>,
    label: ConnProtocol,
) {
    let upstream = match target {
        Some((service, port)) => {
            let Some(balancer) = shared.balancers.get(service.name()) else {
                return;
            };
            let hash = balancer
                .hash_on()
                .and_then(|on| balance::hash_key(&on, client.ip(), None));
            let timeout = service.traffic_policy.connect_timeout;
            let mut last = None;
            let mut connected = None;
            // A connect failure is retried once on another endpoint: nothing was sent yet.
            for _ in 0..2 {
                let Some(endpoint) = balancer.pick(hash, last.as_deref()) else {
                    break;
                };
                let addr = endpoint.socket_addr(&port);
                match pool::connect(addr, timeout).await {
                    Ok(s) => {
                        connected = Some((s, Some(endpoint.start())));
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(service = service.name(), %addr, error = %e, "endpoint connect failed");
                        last = Some(endpoint);
                    }
                }
            }
            connected
        }
        None if config.mesh().outbound_traffic_policy == OutboundTrafficPolicy::RegistryOnly => {
            tracing::debug!(%client, %orig, "destination outside the mesh refused (REGISTRY_ONLY)");
            return;
        }
        None => match pool::connect(orig, PASSTHROUGH_CONNECT_TIMEOUT).await {
            Ok(s) => Some((s, None)),
            Err(e) => {
                tracing::debug!(%orig, error = %e, "passthrough connect failed");
                None
            }
        },
    };
    let Some((upstream, _in_flight)) = upstream else {
        return;
    };
    let (sent, received) = serve::copy_bidirectional(stream, upstream).await;
    shared
        .metrics
        .bytes(Direction::outbound, label, sent, received);
}

/// One outbound HTTP connection's request handler.
#[derive(Clone)]
struct HttpOutbound {
    shared: Arc<Shared>,
    orig: SocketAddr,
    client: SocketAddr,
}

/// Where a request goes.
struct Destination {
    service: Arc<ServiceConfig>,
    port: ServicePort,
    route: String,
    timeout: Option<Duration>,
}

impl HttpOutbound {
    async fn request(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        if serve::head_too_large(req.headers()) {
            return serve::error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
            );
        }
        let config = self.shared.config.current();
        let Some(dest) = self.destination(&config, &req) else {
            return self.passthrough(&config, req, started).await;
        };
        let mut labels = RequestLabels {
            direction: Direction::outbound,
            service: dest.service.name(),
            route: &dest.route,
            endpoint: None,
            status: 0,
            error: "",
        };
        let Some(balancer) = self.shared.balancers.get(dest.service.name()) else {
            return self.answer(
                labels,
                started,
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
            );
        };
        let hash = balancer
            .hash_on()
            .and_then(|on| balance::hash_key(&on, self.client.ip(), Some(req.headers())));
        let upgrade = serve::upgrade_protocol(&req);
        let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let client_version = req.version();
        let (mut parts, body) = req.into_parts();
        pool::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        let authority = serve::authority(&parts).unwrap_or_else(|| self.orig.to_string());
        let mut body = Some(pool::incoming(body));
        let mut tried = None;
        let connect_timeout = dest.service.traffic_policy.connect_timeout;
        for _ in 0..2 {
            let Some(endpoint) = balancer.pick(hash, tried.as_deref()) else {
                break;
            };
            let addr = endpoint.socket_addr(&dest.port);
            labels.endpoint = Some(addr);
            let in_flight = endpoint.start();
            let Some(request_body) = body.take() else {
                break;
            };
            let h2 = endpoint.endpoint.meshed && upgrade.is_none();
            let mut out = Request::from_parts(parts.clone(), request_body);
            let sent = if h2 {
                if client_version != Version::HTTP_2 {
                    out.headers_mut()
                        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
                }
                *out.version_mut() = Version::HTTP_2;
                *out.uri_mut() = serve::absolute_uri(&authority, out.uri());
                let send = self.shared.upstreams.send_h2(addr, connect_timeout, out);
                serve::with_timeout(dest.timeout, send).await
            } else {
                *out.version_mut() = Version::HTTP_11;
                serve::set_host(&mut out, &authority);
                *out.uri_mut() = serve::origin_form(out.uri());
                let send = self.shared.upstreams.send_h1(addr, connect_timeout, out);
                serve::with_timeout(dest.timeout, send).await
            };
            match sent {
                Ok(Ok(mut response)) => {
                    in_flight.responded();
                    if let Some(on_upgrade) = on_upgrade
                        && response.status() == StatusCode::SWITCHING_PROTOCOLS
                    {
                        serve::splice_upgrade(on_upgrade, hyper::upgrade::on(&mut response));
                    }
                    labels.status = response.status().as_u16();
                    self.shared.metrics.request(labels, started.elapsed());
                    return serve::track(response, in_flight);
                }
                Ok(Err(e)) if e.before_request() => {
                    tracing::debug!(service = dest.service.name(), %addr, error = %e, "endpoint unreachable; trying another");
                    tried = Some(in_flight.endpoint().clone());
                    // The request never left, but its body went with the failed attempt: only a
                    // request without a body can be sent again (bounded replay buffers for
                    // bodies come with retries).
                    if serve::has_no_body(&parts) {
                        body = Some(pool::empty());
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = dest.service.name(), %addr, error = %e, "upstream failed");
                    return self.answer(labels, started, StatusCode::BAD_GATEWAY, "upstream-reset");
                }
                Err(_) => {
                    return self.answer(labels, started, StatusCode::GATEWAY_TIMEOUT, "timeout");
                }
            }
        }
        if tried.is_some() {
            return self.answer(
                labels,
                started,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-connect-failed",
            );
        }
        self.answer(
            labels,
            started,
            StatusCode::SERVICE_UNAVAILABLE,
            "no-endpoints",
        )
    }

    /// Resolves the service (by authority, then by original destination), the route and the
    /// weighted destination.
    fn destination(&self, config: &Config, req: &Request<Incoming>) -> Option<Destination> {
        let by_authority =
            serve::request_authority(req).and_then(|a| config.by_authority(&a, self.orig.port()));
        let target = by_authority.or_else(|| config.by_addr(self.orig))?;
        let route = target
            .service
            .routes
            .select(req.method(), req.uri().path(), req.headers());
        let Some(route) = route else {
            return Some(Destination {
                service: target.service.clone(),
                port: target.port.clone(),
                route: String::new(),
                timeout: None,
            });
        };
        let point = rand::rng().random_range(0..route.total_weight().max(1));
        let picked = route.pick(point)?;
        let service = config.service(&picked.service)?;
        let port = picked.port.unwrap_or(target.port.port);
        let port = service
            .port(port)
            .or_else(|| service.service.ports.first())?;
        Some(Destination {
            service: service.clone(),
            port: port.clone(),
            route: route.name.clone(),
            timeout: route.timeout,
        })
    }

    /// A request for a destination outside the mesh.
    async fn passthrough(
        &self,
        config: &Config,
        req: Request<Incoming>,
        started: Instant,
    ) -> Response<Body> {
        let labels = RequestLabels {
            direction: Direction::outbound,
            service: "",
            route: "",
            endpoint: Some(self.orig),
            status: 0,
            error: "",
        };
        if config.mesh().outbound_traffic_policy == OutboundTrafficPolicy::RegistryOnly {
            return self.answer(labels, started, StatusCode::BAD_GATEWAY, "registry-only");
        }
        let (mut parts, body) = req.into_parts();
        pool::strip_hop_by_hop(&mut parts.headers);
        let authority = serve::authority(&parts).unwrap_or_else(|| self.orig.to_string());
        let mut out = Request::from_parts(parts, pool::incoming(body));
        *out.version_mut() = Version::HTTP_11;
        serve::set_host(&mut out, &authority);
        *out.uri_mut() = serve::origin_form(out.uri());
        match self
            .shared
            .upstreams
            .send_h1(self.orig, PASSTHROUGH_CONNECT_TIMEOUT, out)
            .await
        {
            Ok(response) => {
                let mut labels = labels;
                labels.status = response.status().as_u16();
                self.shared.metrics.request(labels, started.elapsed());
                response
            }
            Err(e) if e.before_request() => self.answer(
                labels,
                started,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-connect-failed",
            ),
            Err(_) => self.answer(labels, started, StatusCode::BAD_GATEWAY, "upstream-reset"),
        }
    }

    fn answer(
        &self,
        mut labels: RequestLabels<'_>,
        started: Instant,
        status: StatusCode,
        reason: &'static str,
    ) -> Response<Body> {
        labels.status = status.as_u16();
        labels.error = reason;
        self.shared.metrics.request(labels, started.elapsed());
        serve::error_response(status, reason)
    }
}
