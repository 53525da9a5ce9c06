//! The frontend: the page a reader asks for. `GET /` lists the articles and `GET /articles/<id>`
//! shows one, both by calling the articles service through the pod's sidecar.
//!
//! It holds no state and must never answer for articles on its own: an upstream failure is a 502
//! naming the upstream, an upstream 4xx is passed on.

use http::{Method, Request, StatusCode};
use serde_json::json;

use crate::server::{Reply, Role, error, json, not_found};
use crate::upstream::{Answer, Upstream};

pub struct Frontend {
    pub articles: Upstream,
}

impl Role for Frontend {
    async fn handle(&self, request: Request<bytes::Bytes>) -> Reply {
        if request.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the frontend only serves GET",
            );
        }
        let path = request.uri().path();
        match path.trim_end_matches('/') {
            "" => self.page("/articles", "articles").await,
            "/healthz" => json(StatusCode::OK, &json!({"ok": true})),
            other => match other.strip_prefix("/articles/").map(str::parse::<u64>) {
                Some(Ok(id)) => self.page(&format!("/articles/{id}"), "article").await,
                _ => not_found(),
            },
        }
    }
}

impl Frontend {
    /// Fetches `path` from articles and wraps it as `{<key>: ..., via: {articles: <instance>}}`.
    async fn page(&self, path: &str, key: &str) -> Reply {
        match self.articles.call(Method::GET, path, None, &[]).await {
            Ok(answer) => wrap(answer, key),
            Err(e) => error(StatusCode::BAD_GATEWAY, &format!("{e:#}")),
        }
    }
}

fn wrap(answer: Answer, key: &str) -> Reply {
    match answer.json() {
        Some(value) => json(
            StatusCode::OK,
            &json!({ key: value, "via": { "articles": answer.served_by } }),
        ),
        None if answer.status.is_client_error() => json(
            answer.status,
            &serde_json::from_slice::<serde_json::Value>(&answer.body)
                .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&answer.body) })),
        ),
        None => error(
            StatusCode::BAD_GATEWAY,
            &format!("articles answered {}", answer.status),
        ),
    }
}
