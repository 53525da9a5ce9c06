//! Calling another service of the demo the way an unmodified application in a mesh does: a plain
//! HTTP/1.1 connection to the service's address (its VIP, which the pod's sidecar intercepts)
//! with `Host: <service>.<namespace>.svc.cluster.local`, and nothing mesh-specific.
//!
//! It must never retry (that is the mesh's job, configured per route), and never wait longer than
//! [`TIMEOUT`] for an answer.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::server::SERVED_BY;

/// How long a call may take, body included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read from an upstream.
const MAX_ANSWER: usize = 1024 * 1024;

/// One service the role calls.
#[derive(Clone)]
pub struct Upstream {
    /// The service's name, for errors.
    name: &'static str,
    /// `http://<address>:<port>`, without a path.
    base: String,
    host: HeaderValue,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("host", &self.host)
            .finish()
    }
}

/// What an upstream answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Its `x-served-by`, if it sent one.
    pub served_by: Option<String>,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, if the status is a success and the body is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        if self.status.is_success() {
            serde_json::from_slice(&self.body).ok()
        } else {
            None
        }
    }
}

impl Upstream {
    /// `address` is `http://host:port` (a VIP, usually); `service` and `namespace` make the
    /// `Host` header.
    pub fn new(service: &'static str, namespace: &str, address: &Uri) -> anyhow::Result<Upstream> {
        if address.scheme_str() != Some("http") {
            bail!("--{service} {address}: only http:// addresses are supported");
        }
        let authority = address
            .authority()
            .with_context(|| format!("--{service} {address}: missing host:port"))?;
        if !matches!(address.path(), "" | "/") || address.query().is_some() {
            bail!("--{service} {address}: give only http://host:port, without a path");
        }
        let host = format!("{service}.{namespace}.svc.cluster.local");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(TIMEOUT));
        Ok(Upstream {
            name: service,
            base: format!("http://{authority}"),
            host: HeaderValue::from_str(&host)
                .with_context(|| format!("{host:?} is not a valid Host header"))?,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Sends `method path_and_query` with an optional JSON body and extra headers.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&'static str, &'static str)],
    ) -> anyhow::Result<Answer> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path_and_query}", self.base))
            .header(header::HOST, self.host.clone());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(value).context("encoding the request body")?)
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .with_context(|| format!("building {method} {path_and_query}"))?;
        let call = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let served_by = response
                .headers()
                .get(SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
                .to_bytes();
            anyhow::Ok(Answer {
                status,
                served_by,
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))?
            .with_context(|| format!("{} {method} {path_and_query}", self.name))
    }
}
