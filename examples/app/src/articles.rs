//! The articles service: `GET /articles` lists them, `GET /articles/<id>` returns one with its
//! comments (from the comments service) and its read count (bumped on the reads service), and
//! `POST /articles` adds one.
//!
//! Each instance keeps its own articles in memory: the seeded ones are the same everywhere, a
//! posted one lives only on the instance that took it. It must never hold more than
//! [`MAX_POSTED`] posted articles (the oldest go first), and never answer an article without its
//! comments and read count: if either upstream fails, the answer is a 502 naming it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::server::{Refusal, Reply, Role, decode, error, json, not_found};
use crate::upstream::{Answer, Upstream};

/// Articles every instance starts with (ids 1 to 5).
pub const SEEDED: [(&str, &str); 5] = [
    (
        "Why sidecars",
        "A proxy next to every workload sees every request both ways.",
    ),
    (
        "Round robin is not enough",
        "Least request with two choices keeps tail latency down.",
    ),
    (
        "Outlier ejection",
        "Stop sending to the endpoint that keeps failing, then try it again.",
    ),
    (
        "Locality",
        "Prefer the zone you are in; spill over only when it is unhealthy.",
    ),
    (
        "Retry budgets",
        "Retries that are not bounded turn a slowdown into an outage.",
    ),
];

/// Posted articles kept per instance.
pub const MAX_POSTED: usize = 1000;
const MAX_TITLE: usize = 200;
const MAX_TEXT: usize = 10_000;

#[derive(Debug, Clone, Serialize)]
struct Article {
    id: u64,
    title: String,
    body: String,
}

#[derive(Debug, Deserialize)]
struct NewArticle {
    title: String,
    body: String,
}

struct Store {
    articles: BTreeMap<u64, Article>,
    next_id: u64,
}

pub struct Articles {
    store: Mutex<Store>,
    comments: Upstream,
    reads: Upstream,
}

impl Articles {
    pub fn new(comments: Upstream, reads: Upstream) -> Articles {
        let articles: BTreeMap<u64, Article> = (1..)
            .zip(SEEDED)
            .map(|(id, (title, body))| {
                (
                    id,
                    Article {
                        id,
                        title: title.to_owned(),
                        body: body.to_owned(),
                    },
                )
            })
            .collect();
        let next_id = articles.len() as u64 + 1;
        Articles {
            store: Mutex::new(Store { articles, next_id }),
            comments,
            reads,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the map half-updated (every update is one
        // insert or remove), so a poisoned lock is still consistent.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list(&self) -> Reply {
        let list: Vec<_> = self
            .store()
            .articles
            .values()
            .map(|a| json!({"id": a.id, "title": a.title}))
            .collect();
        json(StatusCode::OK, &list)
    }

    fn post(&self, request: &Request<Bytes>) -> Reply {
        let new: NewArticle = match decode(request) {
            Ok(new) => new,
            Err(refusal) => return refusal.reply(),
        };
        if new.title.trim().is_empty() || new.title.len() > MAX_TITLE || new.body.len() > MAX_TEXT {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "a title of 1 to {MAX_TITLE} bytes and a body of at most {MAX_TEXT} bytes"
                ),
            );
        }
        let mut store = self.store();
        let id = store.next_id;
        store.next_id += 1;
        let article = Article {
            id,
            title: new.title,
            body: new.body,
        };
        store.articles.insert(id, article.clone());
        let seeded = SEEDED.len() as u64;
        while store.articles.len() > SEEDED.len() + MAX_POSTED {
            let oldest_posted = store.articles.range(seeded + 1..).next().map(|(id, _)| *id);
            match oldest_posted {
                Some(old) => store.articles.remove(&old),
                None => break,
            };
        }
        json(StatusCode::CREATED, &article)
    }

    async fn get(&self, id: u64) -> Reply {
        let Some(article) = self.store().articles.get(&id).cloned() else {
            return not_found();
        };
        let comments_path = format!("/comments?article={id}");
        let reads_path = format!("/reads/{id}");
        let (comments, reads) = tokio::join!(
            self.comments.call(Method::GET, &comments_path, None, &[]),
            self.reads.call(Method::POST, &reads_path, None, &[]),
        );
        let comments = match required(&self.comments, comments) {
            Ok(answer) => answer,
            Err(refusal) => return refusal.reply(),
        };
        let reads = match required(&self.reads, reads) {
            Ok(answer) => answer,
            Err(refusal) => return refusal.reply(),
        };
        let (Some(comment_list), Some(count)) = (comments.json(), reads.json()) else {
            return error(
                StatusCode::BAD_GATEWAY,
                "comments or reads answered something that is not JSON",
            );
        };
        json(
            StatusCode::OK,
            &json!({
                "id": article.id,
                "title": article.title,
                "body": article.body,
                "comments": comment_list,
                "reads": count.get("reads"),
                "via": { "comments": comments.served_by, "reads": reads.served_by },
            }),
        )
    }
}

/// A successful answer of `upstream`, or why the article cannot be served (502).
fn required(upstream: &Upstream, answer: anyhow::Result<Answer>) -> Result<Answer, Refusal> {
    match answer {
        Ok(answer) if answer.status.is_success() => Ok(answer),
        Ok(answer) => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("{} answered {}", upstream.name(), answer.status),
        )),
        Err(e) => Err(Refusal::new(StatusCode::BAD_GATEWAY, format!("{e:#}"))),
    }
}

impl Role for Articles {
    async fn handle(&self, request: Request<Bytes>) -> Reply {
        let path = request.uri().path().trim_end_matches('/');
        match (request.method(), path) {
            (&Method::GET, "/healthz") => json(StatusCode::OK, &json!({"ok": true})),
            (&Method::GET, "/articles") => self.list(),
            (&Method::POST, "/articles") => self.post(&request),
            (&Method::GET, other) => {
                match other.strip_prefix("/articles/").map(str::parse::<u64>) {
                    Some(Ok(id)) => self.get(id).await,
                    _ => not_found(),
                }
            }
            (_, "/articles") => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
            _ => not_found(),
        }
    }
}
