//! The reads service: `POST /reads/<id>` counts one more read of an article and returns the
//! count, `GET /reads/<id>` returns it.
//!
//! Counts are in memory, per instance: a client that wants consistent counts must keep reaching
//! the same instance (the example mesh's `reads` TrafficPolicy hashes on the source address). It
//! must never count more than [`MAX_ARTICLES`] distinct articles (one more is refused with 507).

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde_json::json;

use crate::server::{Reply, Role, error, json, not_found};

pub const MAX_ARTICLES: usize = 10_000;

#[derive(Default)]
pub struct Reads {
    counts: Mutex<HashMap<u64, u64>>,
}

impl Reads {
    fn bump(&self, article: u64) -> Reply {
        // Every update is a single insert: a poisoned lock still guards a consistent map.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if !counts.contains_key(&article) && counts.len() >= MAX_ARTICLES {
            return error(
                StatusCode::INSUFFICIENT_STORAGE,
                "this instance counts as many articles as it can",
            );
        }
        let count = counts.entry(article).or_insert(0);
        *count += 1;
        json(
            StatusCode::OK,
            &json!({"article": article, "reads": *count}),
        )
    }

    fn get(&self, article: u64) -> Reply {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let reads = counts.get(&article).copied().unwrap_or(0);
        json(StatusCode::OK, &json!({"article": article, "reads": reads}))
    }
}

impl Role for Reads {
    async fn handle(&self, request: Request<Bytes>) -> Reply {
        let path = request.uri().path().trim_end_matches('/');
        if request.method() == Method::GET && path == "/healthz" {
            return json(StatusCode::OK, &json!({"ok": true}));
        }
        let Some(Ok(article)) = path.strip_prefix("/reads/").map(str::parse::<u64>) else {
            return not_found();
        };
        match *request.method() {
            Method::POST => self.bump(article),
            Method::GET => self.get(article),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
        }
    }
}
