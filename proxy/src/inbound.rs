//! The inbound side: connections redirected to the pod, handed to the local app.
//!
//! The original destination's port is the app's port; the proxy forwards to the app on
//! 127.0.0.1 at that port, so the app sees connections from the proxy and the real client's
//! address in `x-forwarded-for`. HTTP/2 from a peer sidecar carries HTTP/1 requests marked with
//! `keel-orig-proto`; they are sent to the app as HTTP/1.1. Other HTTP/2 (gRPC) stays HTTP/2,
//! HTTP/1 stays HTTP/1, and anything else is copied as opaque TCP.
//!
//! Authorization of the peer happens here once identities exist (mTLS); this module must never
//! forward to anything but the local app.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};

use crate::detect;
use crate::metrics::{ConnProtocol, Direction, RequestLabels};
use crate::outbound::ORIG_PROTO;
use crate::pool::{self, Body};
use crate::serve::{self, Drain, Shared};
use crate::transparent;

/// How long connecting to the local app may take; it is on the same host.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves the inbound listener until drained.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, drain: Drain) {
    serve::accept_loop(listener, drain, move |stream, client, drain| {
        let shared = shared.clone();
        async move { connection(shared, stream, client, drain).await }
    })
    .await;
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, client: SocketAddr, drain: Drain) {
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
    let _ = stream.set_nodelay(true);
    let app = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), orig.port());
    let protocol = match detect::detect(&stream, shared.detect_timeout).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%client, error = %e, "detection failed");
            return;
        }
    };
    match protocol {
        detect::Protocol::Http1 | detect::Protocol::Http2 => {
            let http2 = protocol == detect::Protocol::Http2;
            let _conn = shared
                .metrics
                .connection(Direction::inbound, protocol.into());
            let handler = HttpInbound {
                shared: shared.clone(),
                app,
                client,
            };
            serve::serve_http(stream, http2, drain, move |req| {
                let handler = handler.clone();
                async move { handler.request(req).await }
            })
            .await;
        }
        detect::Protocol::Tls | detect::Protocol::Opaque => {
            let label = ConnProtocol::from(protocol);
            let _conn = shared.metrics.connection(Direction::inbound, label);
            match pool::connect(app, APP_CONNECT_TIMEOUT).await {
                Ok(upstream) => {
                    let (sent, received) = serve::copy_bidirectional(stream, upstream).await;
                    shared
                        .metrics
                        .bytes(Direction::inbound, label, sent, received);
                }
                Err(e) => tracing::debug!(%app, error = %e, "local app unreachable"),
            }
        }
    }
}

#[derive(Clone)]
struct HttpInbound {
    shared: Arc<Shared>,
    app: SocketAddr,
    client: SocketAddr,
}

impl HttpInbound {
    async fn request(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let mut labels = RequestLabels {
            direction: Direction::inbound,
            service: "",
            route: "",
            endpoint: Some(self.app),
            status: 0,
            error: "",
        };
        let downgrade = req.headers_mut().remove(ORIG_PROTO).is_some();
        let upgrade = serve::upgrade_protocol(&req);
        let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let as_http1 = downgrade || req.version() != Version::HTTP_2;
        let (mut parts, body) = req.into_parts();
        if let Ok(ip) = HeaderValue::from_str(&self.client.ip().to_string()) {
            parts.headers.append("x-forwarded-for", ip);
        }
        let authority = serve::authority(&parts).unwrap_or_else(|| self.app.to_string());
        pool::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        let mut out = Request::from_parts(parts, pool::incoming(body));
        let sent = if as_http1 {
            *out.version_mut() = Version::HTTP_11;
            serve::set_host(&mut out, &authority);
            *out.uri_mut() = serve::origin_form(out.uri());
            self.shared
                .upstreams
                .send_h1(self.app, APP_CONNECT_TIMEOUT, out)
                .await
        } else {
            *out.uri_mut() = serve::absolute_uri(&authority, out.uri());
            self.shared
                .upstreams
                .send_h2(self.app, APP_CONNECT_TIMEOUT, out)
                .await
        };
        match sent {
            Ok(mut response) => {
                if let Some(on_upgrade) = on_upgrade
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    serve::splice_upgrade(on_upgrade, hyper::upgrade::on(&mut response));
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
