//! The comments service: `GET /comments?article=<id>` lists an article's comments and
//! `POST /comments` (`{"article", "author", "text"}`) adds one.
//!
//! State is in memory, per instance. It must never hold more than [`MAX_PER_ARTICLE`] comments
//! per article (the oldest go first) nor comments for more than [`MAX_ARTICLES`] articles (a
//! comment on one more article is refused with 507).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::server::{Reply, Role, decode, error, json, not_found};

pub const MAX_PER_ARTICLE: usize = 50;
pub const MAX_ARTICLES: usize = 10_000;
const MAX_TEXT: usize = 2_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Comment {
    article: u64,
    author: String,
    text: String,
}

pub struct Comments {
    by_article: Mutex<HashMap<u64, VecDeque<Comment>>>,
}

impl Comments {
    /// Starts with one comment on each seeded article.
    pub fn new(seeded_articles: u64) -> Comments {
        let by_article = (1..=seeded_articles)
            .map(|article| {
                let first = Comment {
                    article,
                    author: "keel".to_owned(),
                    text: "First!".to_owned(),
                };
                (article, VecDeque::from([first]))
            })
            .collect();
        Comments {
            by_article: Mutex::new(by_article),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Comment>>> {
        // Every update is a single push or pop: a poisoned lock still guards a consistent map.
        self.by_article.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list(&self, request: &Request<Bytes>) -> Reply {
        let article = request.uri().query().and_then(|query| {
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| *key == "article")
                .and_then(|(_, value)| value.parse::<u64>().ok())
        });
        let Some(article) = article else {
            return error(StatusCode::BAD_REQUEST, "expected ?article=<id>");
        };
        let list: Vec<Comment> = self
            .map()
            .get(&article)
            .map(|comments| comments.iter().cloned().collect())
            .unwrap_or_default();
        json(StatusCode::OK, &list)
    }

    fn post(&self, request: &Request<Bytes>) -> Reply {
        let comment: Comment = match decode(request) {
            Ok(comment) => comment,
            Err(refusal) => return refusal.reply(),
        };
        if comment.text.trim().is_empty()
            || comment.text.len() > MAX_TEXT
            || comment.author.len() > 100
        {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("a text of 1 to {MAX_TEXT} bytes and an author of at most 100"),
            );
        }
        let mut map = self.map();
        if !map.contains_key(&comment.article) && map.len() >= MAX_ARTICLES {
            return error(
                StatusCode::INSUFFICIENT_STORAGE,
                "this instance holds comments for as many articles as it can",
            );
        }
        let comments = map.entry(comment.article).or_default();
        comments.push_back(comment.clone());
        while comments.len() > MAX_PER_ARTICLE {
            comments.pop_front();
        }
        json(StatusCode::CREATED, &comment)
    }
}

impl Role for Comments {
    async fn handle(&self, request: Request<Bytes>) -> Reply {
        match (request.method(), request.uri().path().trim_end_matches('/')) {
            (&Method::GET, "/healthz") => json(StatusCode::OK, &json!({"ok": true})),
            (&Method::GET, "/comments") => self.list(&request),
            (&Method::POST, "/comments") => self.post(&request),
            (_, "/comments") => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
            _ => not_found(),
        }
    }
}
