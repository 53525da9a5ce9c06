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
//! Each request is admitted by the service's circuit breakers, then sent to an endpoint the
//! balancer picks; failures are recorded for outlier detection and retried as the route's retry
//! policy allows (`resilience`), within the retry budget, each retry on another endpoint when
//! there is one. The route's timeout bounds the whole exchange up to the response headers.
//!
//! Errors the proxy answers itself carry a `keel-error` header naming the reason. This module
//! must never buffer a body whole (a retry replays at most a bounded copy), and never wait on the
//! control plane.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};

use crate::balance::{self, Balancer, EndpointState};
use crate::config::{
    Config, OutboundTrafficPolicy, Protocol, RetryPolicy, RouteTable, ServiceConfig, ServicePort,
};
use crate::detect;
use crate::health::Outcome;
use crate::metrics::{ConnProtocol, Direction, RequestLabels};
use crate::pool::{self, Body, Connect, UpstreamError};
use crate::resilience::{self, Failure, LimitPermit, RequestBody};
use crate::serve::{self, Drain, Shared};
use crate::tls::Carried;
use crate::transparent;
use tokio_util::either::Either;

/// How long a connection to a destination outside the mesh may take to open.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries an HTTP/1 request's original protocol across the HTTP/2 hop.
///
/// Header names used per request are `HeaderName` constants, not `&str`: a map validates and
/// converts a `&str` name on every lookup.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("keel-orig-proto");

/// The header that names the circuit breaker that refused a request.
const KEEL_CIRCUIT_BREAKER: HeaderName = HeaderName::from_static("keel-circuit-breaker");

/// What an inbound sidecar answers when its app refused the connection: the request never
/// reached the app.
const APP_UNREACHABLE: &str = "app-unreachable";

/// What an inbound sidecar answers when its app failed after it was sent the request.
const APP_RESET: &str = "app-reset";

/// Opaque TCP: connection attempts on distinct endpoints before giving up.
const TCP_CONNECT_ATTEMPTS: usize = 3;

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
    mut stream: TcpStream,
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
    // On a port declared HTTP, silence is a slow client, not a server-speaks-first protocol:
    // it gets as long as any HTTP client to send its request head.
    let detect_timeout = if declared.is_some_and(Protocol::is_http) {
        shared.head_timeout
    } else {
        shared.detect_timeout
    };
    let protocol = match declared {
        Some(Protocol::Tcp) => detect::Protocol::Opaque,
        _ => match detect::detect(&stream, detect_timeout).await {
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
            if !http2 && serve::refuse_malformed_head(&mut stream).await {
                return;
            }
            let handler = Arc::new(HttpOutbound {
                shared: shared.clone(),
                orig,
                client,
                drain: drain.clone(),
            });
            serve::serve_http(stream, http2, shared.head_timeout, drain, move |req| {
                handler.clone().request(req)
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
            // Boxed: its connect and copy are 4 KB, which every HTTP connection's future
            // would otherwise be laid out to hold as well.
            Box::pin(opaque(
                &shared, &config, stream, client, orig, target, label,
            ))
            .await;
        }
    }
}

/// Opaque TCP: to a balanced endpoint of the service, or through to the original destination.
async fn opaque(
    shared: &Shared,
    config: &Config,
    mut stream: TcpStream,
    client: SocketAddr,
    orig: SocketAddr,
    target: Option<(Arc<ServiceConfig>, ServicePort)>,
    label: ConnProtocol,
) {
    // A service's idle timeout closes an opaque connection that carries nothing for that long.
    let idle_timeout = target
        .as_ref()
        .and_then(|(service, _)| service.traffic_policy.idle_timeout);
    let upstream = match target {
        Some((service, port)) => {
            let Some(balancer) = shared.balancers.get(service.name()) else {
                return;
            };
            let hash = balancer
                .hash_on()
                .and_then(|on| balance::hash_key(&on, client.ip(), None));
            let permit = match LimitPermit::connection(balancer.limits()) {
                Ok(permit) => permit,
                Err(limit) => {
                    tracing::debug!(service = service.name(), %client, "circuit breaker open ({}); closing", limit.as_str());
                    shared.metrics.circuit_open(service.name(), limit.as_str());
                    return;
                }
            };
            let timeout = service.traffic_policy.connect_timeout;
            let mut tried = Vec::new();
            let mut connected = None;
            // A connect failure is retried on another endpoint: nothing was sent yet.
            for _ in 0..TCP_CONNECT_ATTEMPTS {
                let Some(endpoint) = balancer.pick(hash, &tried) else {
                    break;
                };
                let addr = endpoint.socket_addr(&port);
                let peer = endpoint.endpoint.mtls_peer();
                let connecting = Instant::now();
                match shared
                    .upstreams
                    .connect(addr, peer, Carried::Opaque, timeout)
                    .await
                {
                    Ok(s) => {
                        balancer.record(&endpoint, Outcome::Connected);
                        let mut in_flight = endpoint.start();
                        in_flight.hold(permit);
                        connected = Some((s, Some(in_flight)));
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(service = service.name(), %addr, error = %e, "endpoint connect failed");
                        balancer.record(&endpoint, Outcome::ConnectFailed);
                        endpoint.connect_failed(connecting.elapsed());
                        tried.push(endpoint);
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
            Ok(s) => Some((Either::Left(s), None)),
            Err(e) => {
                tracing::debug!(%orig, error = %e, "passthrough connect failed");
                None
            }
        },
    };
    let Some((mut upstream, _in_flight)) = upstream else {
        return;
    };
    let (sent, received) = match idle_timeout {
        None => serve::copy_bidirectional(&mut stream, &mut upstream).await,
        Some(timeout) => copy_until_idle(&mut stream, &mut upstream, timeout).await,
    };
    // Both sides closed before the endpoint's in-flight count and the circuit breaker's
    // permit are given back.
    drop(upstream);
    drop(stream);
    shared
        .metrics
        .bytes(Direction::outbound, label, sent, received);
}

/// Copies both ways like [`serve::copy_bidirectional`], and stops once neither side has sent
/// anything for `timeout` (dropping the streams then closes both). Returns the bytes sent to
/// the client and received from it.
async fn copy_until_idle<C, U>(client: &mut C, upstream: &mut U, timeout: Duration) -> (u64, u64)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut client = Watched {
        inner: client,
        activity: activity.clone(),
        read: 0,
    };
    let mut upstream = Watched {
        inner: upstream,
        activity: activity.clone(),
        read: 0,
    };
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => copied,
        () = activity.idle_for(timeout) => {
            tracing::debug!(?timeout, "opaque connection idle; closing");
            Ok((0, 0))
        }
    };
    if let Err(e) = copied {
        tracing::debug!(error = %e, "opaque connection ended with an error");
    }
    (upstream.read, client.read)
}

/// When an opaque connection last moved a byte.
struct Activity {
    epoch: Instant,
    last_ns: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last =
                Duration::from_nanos(self.last_ns.load(std::sync::atomic::Ordering::Relaxed));
            let idle = self.epoch.elapsed().saturating_sub(last);
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// A stream that notes when it reads data, and counts what it read.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    read: u64,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One outbound HTTP connection's request handler, shared by its requests' futures.
struct HttpOutbound {
    shared: Arc<Shared>,
    orig: SocketAddr,
    client: SocketAddr,
    /// Upgraded connections are spliced in its tracker.
    drain: Drain,
}

/// Where a request goes.
struct Destination {
    service: Arc<ServiceConfig>,
    port: ServicePort,
    timeout: Option<Duration>,
    /// The table and index of the route, for its name and retry policy.
    routes: Option<(Arc<RouteTable>, usize)>,
}

impl Destination {
    /// The route's name, for metrics; "" when no route matched.
    fn route_name(&self) -> &str {
        self.routes
            .as_ref()
            .and_then(|(table, i)| table.routes.get(*i))
            .map_or("", |r| r.name.as_str())
    }

    fn retry_policy(&self) -> &RetryPolicy {
        self.routes
            .as_ref()
            .and_then(|(table, i)| table.routes.get(*i))
            .and_then(|r| r.retry.as_ref())
            .unwrap_or_else(|| resilience::default_retry_policy())
    }
}

/// A service port without its name: a request needs only its numbers, and cloning the name
/// would allocate on every request.
fn unnamed(port: &ServicePort) -> ServicePort {
    ServicePort {
        name: None,
        port: port.port,
        target_port: port.target_port,
        protocol: port.protocol,
    }
}

/// What to answer if no retry follows: the proxy's error (status and reason), or the upstream's
/// response.
type LastAnswer = Result<(StatusCode, &'static str), (Response<Body>, balance::InFlight)>;

/// How one attempt ended.
enum Attempt {
    Response(Response<Body>, balance::InFlight),
    /// The upstream could not be reached, or was reached and failed: how that counts for
    /// outlier detection, and what to answer if this is the last attempt.
    Failed {
        outcome: Outcome,
        status: StatusCode,
        reason: &'static str,
    },
    /// The route's timeout expired.
    DeadlineExceeded,
    /// A circuit breaker refused a connection or a wait for one.
    Overflow(&'static str),
}

impl HttpOutbound {
    /// Answers one request. It owns its handle on the handler, so that its future is the one
    /// [`serve::serve_http`] boxes, not one more level around it that would hold (and copy) it;
    /// and it is an async block, not an `async fn`, so that it holds no second copy of its
    /// request argument (see [`pool::Upstreams::send_h1_with`]).
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
            if serve::head_too_large(&req) {
                return serve::error_response(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers-too-large",
                );
            }
            let config = self.shared.config.current();
            let Some(dest) = self.destination(&config, &req) else {
                // Boxed: the passthrough's send would otherwise make every request's future, and
                // every copy of it, larger by its size.
                return Box::pin(self.passthrough(&config, req, started)).await;
            };
            let mut labels = RequestLabels {
                direction: Direction::outbound,
                service: dest.service.name(),
                route: dest.route_name(),
                endpoint: None,
                status: 0,
                error: "",
                client_id: "",
            };
            let Some(balancer) = self.shared.balancers.get(dest.service.name()) else {
                return self.answer(
                    labels,
                    started,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-endpoints",
                );
            };
            let admitted = match balancer.limits().admit_request(started) {
                Ok(permit) => permit,
                Err(limit) => return self.circuit_open(labels, started, limit.as_str()),
            };
            let hash = balancer
                .hash_on()
                .and_then(|on| balance::hash_key(&on, self.client.ip(), Some(req.headers())));
            let upgrade = serve::upgrade_protocol(&req);
            let mut on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
            let client_version = req.version();
            let (mut parts, body) = req.into_parts();
            pool::strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = &upgrade {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol.clone());
            }
            // The request's head stays here for retries; each attempt lends it to the pool or
            // sends a copy (see `SendContext::attempt`). The authority is held apart, since an
            // HTTP/1 attempt rewrites the head's URI.
            let named = serve::NamedAuthority::of(&parts, self.orig);
            let authority = named.as_str();
            let policy = dest.retry_policy();
            let idempotent = resilience::is_idempotent(&parts.method);
            let body = RequestBody::new(body);
            // A timeout too long for the clock is no deadline (the config builder caps it anyway).
            let deadline = dest.timeout.and_then(|t| started.checked_add(t));
            let traffic = &dest.service.traffic_policy;
            let options = Connect {
                timeout: traffic.connect_timeout,
                idle_timeout: traffic.idle_timeout,
                admission: Some(balancer.limits()),
                peer: None,
            };
            let send = SendContext {
                shared: &self.shared,
                balancer: &balancer,
                port: &dest.port,
                authority,
                client_version,
                // Looked up only when the authority was not the Host field's.
                client_host: matches!(named, serve::NamedAuthority::Host(_))
                    || parts.headers.contains_key(header::HOST),
                upgrade: upgrade.is_some(),
                options,
                per_try_timeout: policy.per_try_timeout,
                deadline,
            };
            let mut tried: Vec<Arc<EndpointState>> = Vec::new();
            let mut retry_permit = None;
            let mut retries = 0;
            // When the next attempt starts: the first with the request, a retry after its backoff.
            let mut attempt_at = started;
            loop {
                let Some(endpoint) = balancer.pick(hash, &tried) else {
                    let reason = if balancer.has_endpoints() {
                        "no-healthy-upstream"
                    } else {
                        "no-endpoints"
                    };
                    return self.answer(labels, started, StatusCode::SERVICE_UNAVAILABLE, reason);
                };
                labels.endpoint = Some(endpoint.socket_addr(&dest.port));
                let Some(request_body) = body.attempt() else {
                    // Checked before deciding the retry, but the failed attempt's connection went on
                    // reading the body past what can be replayed.
                    return self.answer(
                        labels,
                        started,
                        StatusCode::BAD_GATEWAY,
                        "body-not-replayable",
                    );
                };
                let attempt = send
                    .attempt(&endpoint, &mut parts, request_body, attempt_at)
                    .await;
                drop(retry_permit.take());
                // What went wrong, if anything, and whether the policy retries it.
                let (failure, last_answer) = match attempt {
                    Attempt::Response(mut response, in_flight) => {
                        let status = response.status();
                        // A peer sidecar's own answer about its app: the request never reached it
                        // (unreachable), or the app failed with the request (reset).
                        let peer_error = endpoint
                            .endpoint
                            .meshed
                            .then(|| response.headers().get(serve::KEEL_ERROR))
                            .flatten()
                            .map(|v| v.as_bytes());
                        let (outcome, failure) = match peer_error {
                            Some(e) if e == APP_UNREACHABLE.as_bytes() => {
                                (Outcome::ConnectFailed, Failure::NotSent)
                            }
                            Some(e) if e == APP_RESET.as_bytes() => {
                                (Outcome::Reset, Failure::Reset)
                            }
                            _ => (
                                Outcome::Status(status.as_u16()),
                                Failure::Response(status.as_u16(), response.headers()),
                            ),
                        };
                        balancer.record(&endpoint, outcome);
                        let retry = resilience::retry_condition(policy, failure, idempotent);
                        if retry.is_none() || retries >= policy.attempts {
                            if let Some(on_upgrade) = on_upgrade.take()
                                && status == StatusCode::SWITCHING_PROTOCOLS
                            {
                                serve::splice_upgrade(
                                    &self.drain,
                                    on_upgrade,
                                    hyper::upgrade::on(&mut response),
                                );
                            }
                            labels.status = status.as_u16();
                            self.shared.metrics.request(labels, started.elapsed());
                            let mut in_flight = in_flight;
                            in_flight.hold(admitted);
                            return serve::track(response, in_flight);
                        }
                        (retry, Err((response, in_flight)))
                    }
                    Attempt::Failed {
                        outcome,
                        status,
                        reason,
                    } => {
                        balancer.record(&endpoint, outcome);
                        let failure = match outcome {
                            Outcome::ConnectFailed => Failure::NotSent,
                            Outcome::Timeout => Failure::Timeout,
                            _ => Failure::Reset,
                        };
                        let retry = resilience::retry_condition(policy, failure, idempotent);
                        (retry, Ok((status, reason)))
                    }
                    Attempt::DeadlineExceeded => {
                        balancer.record(&endpoint, Outcome::Timeout);
                        return self.answer(
                            labels,
                            started,
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                        );
                    }
                    Attempt::Overflow(limit) => return self.circuit_open(labels, started, limit),
                };
                let Some(condition) = failure.filter(|_| retries < policy.attempts) else {
                    return self.give_up(labels, started, last_answer, admitted);
                };
                if !body.replayable() {
                    self.shared
                        .metrics
                        .retry_skipped(dest.service.name(), "body-too-large");
                    return self.give_up(labels, started, last_answer, admitted);
                }
                // A retry that would start at or past the deadline is not made, and spends no
                // budget; the client gets the last attempt's own answer rather than a 504.
                let wait =
                    resilience::backoff(retries + 1, policy.backoff_base, policy.backoff_max);
                match balancer.limits().admit_retry(wait, deadline) {
                    Ok(permit) => retry_permit = Some(permit),
                    Err(denied) => {
                        self.shared
                            .metrics
                            .retry_skipped(dest.service.name(), denied.as_str());
                        return self.give_up(labels, started, last_answer, admitted);
                    }
                }
                retries += 1;
                // The failed response (if any) is dropped before the retry.
                drop(last_answer);
                self.shared.metrics.retry(dest.service.name(), condition);
                tracing::debug!(service = dest.service.name(), endpoint = ?labels.endpoint, condition, retry = retries, "retrying");
                tried.push(endpoint);
                tokio::time::sleep(wait).await;
                attempt_at = Instant::now();
            }
        }
    }

    /// Answers with the last attempt's outcome: its response, or the proxy's error.
    fn give_up(
        &self,
        mut labels: RequestLabels,
        started: Instant,
        last: LastAnswer,
        admitted: LimitPermit,
    ) -> Response<Body> {
        match last {
            Ok((status, reason)) => self.answer(labels, started, status, reason),
            Err((response, mut in_flight)) => {
                labels.status = response.status().as_u16();
                self.shared.metrics.request(labels, started.elapsed());
                in_flight.hold(admitted);
                serve::track(response, in_flight)
            }
        }
    }

    fn circuit_open(
        &self,
        mut labels: RequestLabels,
        started: Instant,
        limit: &'static str,
    ) -> Response<Body> {
        self.shared.metrics.circuit_open(labels.service, limit);
        labels.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
        labels.error = "circuit-open";
        self.shared.metrics.request(labels, started.elapsed());
        let mut response = serve::error_response(StatusCode::SERVICE_UNAVAILABLE, "circuit-open");
        response
            .headers_mut()
            .insert(KEEL_CIRCUIT_BREAKER, HeaderValue::from_static(limit));
        response
    }

    /// Resolves the service (by authority, then by original destination), the route and the
    /// weighted destination.
    fn destination(&self, config: &Config, req: &Request<Body>) -> Option<Destination> {
        let authority = serve::request_authority(req);
        let by_authority = authority.and_then(|a| config.by_authority(a, self.orig.port()));
        let target = by_authority.or_else(|| config.by_addr(self.orig))?;
        let route = target
            .service
            .routes
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| {
                r.matcher
                    .matches(authority, req.method(), req.uri().path(), req.headers())
            });
        let Some((index, route)) = route else {
            return Some(Destination {
                service: target.service.clone(),
                port: unnamed(target.port),
                timeout: None,
                routes: None,
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
            port: unnamed(port),
            timeout: route.timeout,
            routes: Some((target.service.routes.clone(), index)),
        })
    }

    /// A request for a destination outside the mesh.
    async fn passthrough(
        &self,
        config: &Config,
        req: Request<Body>,
        started: Instant,
    ) -> Response<Body> {
        let labels = RequestLabels {
            direction: Direction::outbound,
            service: "",
            route: "",
            endpoint: Some(self.orig),
            status: 0,
            error: "",
            client_id: "",
        };
        if config.mesh().outbound_traffic_policy == OutboundTrafficPolicy::RegistryOnly {
            return self.answer(labels, started, StatusCode::BAD_GATEWAY, "registry-only");
        }
        let (mut parts, body) = req.into_parts();
        pool::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        serve::ensure_host(&mut parts, self.orig);
        serve::to_origin_form(&mut parts.uri);
        let out = Request::from_parts(parts, body);
        match self
            .shared
            .upstreams
            .send_h1(self.orig, None, PASSTHROUGH_CONNECT_TIMEOUT, out)
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

/// What every attempt of one request shares.
struct SendContext<'a> {
    shared: &'a Shared,
    balancer: &'a Balancer,
    port: &'a ServicePort,
    authority: &'a str,
    client_version: Version,
    /// Whether the client's head has a `Host` field (an HTTP/2 client's may not).
    client_host: bool,
    upgrade: bool,
    options: Connect<'a>,
    per_try_timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl SendContext<'_> {
    /// Sends one attempt of the request with the head `head` and `body`, starting `now`, to
    /// `endpoint`, within the per-try timeout and the route's deadline.
    ///
    /// An HTTP/1 attempt rewrites the head in place (version, `Host`, origin-form URI) and lends
    /// it to [`pool::Upstreams::send_h1_kept`]. An HTTP/2 attempt sends a copy of the head, since
    /// h2 takes one by value; it sets the copy's version and URI, and leaves out a `Host` that an
    /// HTTP/1 attempt added, so that every attempt carries the client's fields.
    ///
    /// An async block, not an `async fn`, for the reason [`pool::Upstreams::send_h1_with`] is one.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its body argument twice"
    )]
    fn attempt(
        &self,
        endpoint: &Arc<EndpointState>,
        head: &mut Parts,
        body: Body,
        now: Instant,
    ) -> impl Future<Output = Attempt> {
        async move {
            let addr = endpoint.socket_addr(self.port);
            let in_flight = endpoint.start_at(now);
            let h2 = endpoint.endpoint.meshed && !self.upgrade;
            let options = self.options.to_peer(endpoint.endpoint.mtls_peer());
            // The pool's future itself, not an async block around it: one level less to hold it
            // and copy it.
            let send = if h2 {
                let mut out = Request::from_parts(head.clone(), body);
                if self.client_version != Version::HTTP_2 {
                    out.headers_mut()
                        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
                }
                if !self.client_host {
                    out.headers_mut().remove(header::HOST);
                }
                *out.version_mut() = Version::HTTP_2;
                *out.uri_mut() = serve::absolute_uri(self.authority, out.uri());
                Either::Left(self.shared.upstreams.send_h2_with(addr, options, out))
            } else {
                head.version = Version::HTTP_11;
                serve::set_host(&mut head.headers, self.authority);
                serve::to_origin_form(&mut head.uri);
                Either::Right(
                    self.shared
                        .upstreams
                        .send_h1_kept(addr, options, head, body),
                )
            };
            let to_deadline = self.deadline.map(|d| d.saturating_duration_since(now));
            let (limit, per_try) = match (self.per_try_timeout, to_deadline) {
                (Some(p), Some(d)) if p < d => (Some(p), true),
                (Some(p), None) => (Some(p), true),
                (_, d) => (d, false),
            };
            // Every ending but a circuit breaker's refusal (not the endpoint's doing) feeds peak
            // EWMA: a response by its latency (a 5xx as a failure), a failure by its penalty.
            match serve::with_timeout(limit, send).await {
                Ok(Ok(response)) => {
                    in_flight.finished(response.status().is_server_error());
                    Attempt::Response(response, in_flight)
                }
                Ok(Err(UpstreamError::Overflow { limit, .. })) => Attempt::Overflow(limit),
                Ok(Err(e)) if e.before_request() => {
                    tracing::debug!(service = self.balancer.service(), %addr, error = %e, "endpoint unreachable");
                    in_flight.finished(true);
                    Attempt::Failed {
                        outcome: Outcome::ConnectFailed,
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        reason: "upstream-connect-failed",
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = self.balancer.service(), %addr, error = %e, "upstream failed");
                    in_flight.finished(true);
                    Attempt::Failed {
                        outcome: Outcome::Reset,
                        status: StatusCode::BAD_GATEWAY,
                        reason: "upstream-reset",
                    }
                }
                Err(_) if per_try => {
                    in_flight.finished(true);
                    Attempt::Failed {
                        outcome: Outcome::Timeout,
                        status: StatusCode::GATEWAY_TIMEOUT,
                        reason: "timeout",
                    }
                }
                Err(_) => {
                    in_flight.finished(true);
                    Attempt::DeadlineExceeded
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn an_idle_opaque_connection_is_closed() {
        let (mut app, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let copy = tokio::spawn(async move {
            let (mut client_side, mut upstream_side) = (client_side, upstream_side);
            copy_until_idle(
                &mut client_side,
                &mut upstream_side,
                Duration::from_millis(200),
            )
            .await
        });
        app.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        server.write_all(b"pong!").await.expect("write");
        let mut got = [0u8; 5];
        app.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong!");
        // Then nothing: the proxy closes both sides.
        let (sent, received) = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("closed for idleness")
            .expect("task");
        assert_eq!((sent, received), (5, 4));
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }
}
