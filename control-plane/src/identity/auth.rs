//! Proof of identity: how the CA learns who is asking for a certificate.
//!
//! One trait, [`Authenticator`], two proofs:
//! - [`BootstrapTokens`], the local mesh's: a per-workload token that the control plane mints
//!   (`keelctl token`), an HMAC over the workload's name under a key kept with the CA. It proves
//!   a workload of the current model, and so the service account that workload runs as. Deleting
//!   the workload revokes its token.
//! - [`TokenReview`], Kubernetes': the pod's projected ServiceAccount token, checked by the API
//!   server's TokenReview (audience `keel`, which the answer's `status.audiences` must confirm).
//!   It proves `system:serviceaccount:<ns>:<sa>`. Its tests run against a fake API server that
//!   answers TokenReviews the way the real one does (there is no cluster where they run): the
//!   request's shape and each kind of answer are checked, not a real API server's behaviour.
//!
//! An authenticator answers with the identity it proved, never with the one asked for; the
//! caller compares the two. Tokens are secrets: they are never logged.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use keel_proto::spiffe::SpiffeId;
use ring::hmac;

use crate::model::ObjectKey;
use crate::store::Store;

/// What a proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    pub identity: SpiffeId,
    /// The workload (`<namespace>/<name>`) when the proof names one.
    pub workload: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token is not valid: {0}")]
    Rejected(String),
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

/// Checks a proof of identity. `trust_domain` is the mesh's, for the identity it proves.
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
        trust_domain: &'a str,
    ) -> BoxFuture<'a, Result<Proven, AuthError>>;
}

/// The label of bootstrap tokens, so they are recognisable in a file or an environment.
const TOKEN_PREFIX: &str = "keel1";

/// The local mesh's per-workload bootstrap tokens.
pub struct BootstrapTokens {
    key: hmac::Key,
    store: Arc<Store>,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens").finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn message(namespace: &str, workload: &str) -> Vec<u8> {
    format!("{TOKEN_PREFIX}\0{namespace}\0{workload}").into_bytes()
}

impl BootstrapTokens {
    /// Tokens under `key` (at least 32 bytes of secret), checked against `store`'s model.
    pub fn new(key: &[u8], store: Arc<Store>) -> BootstrapTokens {
        BootstrapTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            store,
        }
    }

    /// Reads the token key from `path`, creating it (32 random bytes, owner-only) if missing.
    pub fn key_from_file(path: &Path) -> std::io::Result<Vec<u8>> {
        match std::fs::read(path) {
            Ok(key) if key.len() >= 32 => Ok(key),
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} holds fewer than 32 bytes", path.display()),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let key: [u8; 32] = rand::random();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(key.to_vec())
            }
            Err(e) => Err(e),
        }
    }

    /// The token of workload `namespace/name`. Minting does not require the workload to exist
    /// yet; the token proves nothing until it does.
    pub fn mint(&self, namespace: &str, name: &str) -> String {
        let tag = hmac::sign(&self.key, &message(namespace, name));
        format!("{TOKEN_PREFIX}:{namespace}:{name}:{}", hex(tag.as_ref()))
    }

    fn check(&self, token: &[u8], trust_domain: &str) -> Result<Proven, AuthError> {
        let token = std::str::from_utf8(token)
            .map_err(|_| AuthError::Malformed("not UTF-8"))?
            .trim();
        let mut parts = token.split(':');
        let (Some(TOKEN_PREFIX), Some(namespace), Some(name), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(AuthError::Malformed(
                "a bootstrap token reads keel1:<namespace>:<workload>:<tag>",
            ));
        };
        let tag = unhex(tag).ok_or(AuthError::Malformed("the tag is not hex"))?;
        hmac::verify(&self.key, &message(namespace, name), &tag)
            .map_err(|_| AuthError::Rejected("the tag does not match".into()))?;
        let snapshot = self.store.current();
        let key = ObjectKey::new(namespace, name);
        let workload = snapshot.model.workloads.get(&key).ok_or_else(|| {
            AuthError::Rejected(format!("workload {key} is not in the mesh (any more)"))
        })?;
        let identity = SpiffeId::new(trust_domain, namespace, &workload.spec.service_account)
            .map_err(|e| AuthError::Rejected(e.to_string()))?;
        Ok(Proven {
            identity,
            workload: Some(key.to_string()),
        })
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
        trust_domain: &'a str,
    ) -> BoxFuture<'a, Result<Proven, AuthError>> {
        Box::pin(async move { self.check(token, trust_domain) })
    }
}

/// The audience keel asks projected ServiceAccount tokens to carry.
pub const TOKEN_AUDIENCE: &str = "keel";

/// Kubernetes' ServiceAccount tokens, checked with the API server's TokenReview.
#[derive(Clone)]
pub struct TokenReview {
    client: kube::Client,
}

impl std::fmt::Debug for TokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReview").finish_non_exhaustive()
    }
}

impl TokenReview {
    pub fn new(client: kube::Client) -> TokenReview {
        TokenReview { client }
    }

    async fn review(&self, token: &[u8], trust_domain: &str) -> Result<Proven, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview as Review, TokenReviewSpec};
        let token = std::str::from_utf8(token)
            .map_err(|_| AuthError::Malformed("not UTF-8"))?
            .trim();
        if token.is_empty() {
            return Err(AuthError::Malformed("empty"));
        }
        let review = Review {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let api: kube::Api<Review> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.ok_or_else(|| {
            AuthError::Unavailable("TokenReview answered without a status".into())
        })?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(status.error.unwrap_or_else(|| {
                "the API server did not authenticate it".into()
            })));
        }
        // Kubernetes: a client that sets spec.audiences must find a compatible audience in
        // status.audiences; an authenticated answer without any means the token is valid for the
        // API server's own audience (or the server is not audience-aware), not for keel's.
        match status.audiences.as_deref() {
            Some(audiences) if audiences.iter().any(|a| a == TOKEN_AUDIENCE) => {}
            Some([]) | None => {
                return Err(AuthError::Rejected(format!(
                    "the API server did not confirm audience {TOKEN_AUDIENCE} (its answer names \
                     no audience: the token may be for the API server itself)"
                )));
            }
            Some(_) => {
                return Err(AuthError::Rejected(format!(
                    "the token is not for audience {TOKEN_AUDIENCE}"
                )));
            }
        }
        let username = status
            .user
            .and_then(|u| u.username)
            .ok_or_else(|| AuthError::Rejected("the API server named no user".into()))?;
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| AuthError::Rejected(format!("{username} is not a ServiceAccount")))?;
        let identity = SpiffeId::new(trust_domain, namespace, service_account)
            .map_err(|e| AuthError::Rejected(e.to_string()))?;
        Ok(Proven {
            identity,
            workload: None,
        })
    }
}

impl Authenticator for TokenReview {
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
        trust_domain: &'a str,
    ) -> BoxFuture<'a, Result<Proven, AuthError>> {
        Box::pin(self.review(token, trust_domain))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;
    use crate::model::Model;

    fn model_with_workload() -> Model {
        let yaml = "\
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-1, namespace: demo}
spec: {serviceAccount: articles, addresses: [10.0.0.3]}
";
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("w.yaml"), yaml).expect("write");
        crate::model::load_dir(dir.path()).expect("valid").0
    }

    #[tokio::test]
    async fn bootstrap_tokens_prove_their_workload_only() {
        let store = Store::new(model_with_workload());
        let tokens = BootstrapTokens::new(&[7u8; 32], store.clone());
        let token = tokens.mint("demo", "articles-1");
        let proven = tokens
            .authenticate(token.as_bytes(), "keel.local")
            .await
            .expect("valid token");
        assert_eq!(
            proven.identity.to_string(),
            "spiffe://keel.local/ns/demo/sa/articles"
        );
        assert_eq!(proven.workload.as_deref(), Some("demo/articles-1"));
        // Trailing whitespace from a file is fine.
        assert!(
            tokens
                .authenticate(format!("{token}\n").as_bytes(), "keel.local")
                .await
                .is_ok()
        );

        // Another key's token, a changed name, a changed tag, garbage.
        let other = BootstrapTokens::new(&[8u8; 32], store.clone());
        let forged = other.mint("demo", "articles-1");
        let renamed = token.replace("articles-1", "articles-2");
        let mut retagged = token.clone();
        let last = retagged.pop().expect("tag");
        retagged.push(if last == '0' { '1' } else { '0' });
        for (what, bad) in [
            ("another key", forged.as_str()),
            ("a changed name", renamed.as_str()),
            ("a changed tag", retagged.as_str()),
        ] {
            let err = tokens
                .authenticate(bad.as_bytes(), "keel.local")
                .await
                .expect_err(what);
            assert!(matches!(err, AuthError::Rejected(_)), "{what}: {err}");
        }
        for garbage in [
            "",
            "keel1:demo",
            "nope:a:b:c",
            "keel1:a:b:zz",
            "keel1:a:b:c:d",
        ] {
            let err = tokens
                .authenticate(garbage.as_bytes(), "keel.local")
                .await
                .expect_err(garbage);
            assert!(matches!(err, AuthError::Malformed(_)), "{garbage}: {err}");
        }
        // A workload that is not in the mesh (any more) proves nothing.
        let gone = tokens.mint("demo", "articles-9");
        let err = tokens
            .authenticate(gone.as_bytes(), "keel.local")
            .await
            .expect_err("gone");
        assert!(err.to_string().contains("not in the mesh"), "{err}");
    }

    #[test]
    fn the_token_key_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token-key");
        let first = BootstrapTokens::key_from_file(&path).expect("created");
        assert_eq!(first.len(), 32);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0);
        assert_eq!(BootstrapTokens::key_from_file(&path).expect("read"), first);
        std::fs::write(&path, b"short").expect("write");
        assert!(BootstrapTokens::key_from_file(&path).is_err());
    }

    /// An API server that answers TokenReviews from a table: token -> (authenticated, user,
    /// audiences), and records what it was asked.
    async fn api_server(
        answers: Vec<(&'static str, serde_json::Value)>,
    ) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = asked.clone();
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (answers, recorded) = (answers.clone(), recorded.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (answers, recorded) = (answers.clone(), recorded.clone());
                            async move {
                                assert_eq!(
                                    req.uri().path(),
                                    "/apis/authentication.k8s.io/v1/tokenreviews"
                                );
                                let body =
                                    req.into_body().collect().await.expect("body").to_bytes();
                                let review: serde_json::Value =
                                    serde_json::from_slice(&body).expect("json");
                                recorded.lock().expect("lock").push(review.clone());
                                let token = review["spec"]["token"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned();
                                let status = answers
                                .iter()
                                .find(|(t, _)| *t == token)
                                .map(|(_, s)| s.clone())
                                .unwrap_or(serde_json::json!({"authenticated": false, "error": "invalid bearer token"}));
                                let mut answer = review;
                                answer["status"] = status;
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(201)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(answer.to_string())))
                                        .expect("response"),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, asked)
    }

    #[tokio::test]
    async fn token_review_maps_service_accounts_to_identities() {
        let (url, asked) = api_server(vec![
            (
                "good",
                serde_json::json!({"authenticated": true, "audiences": ["keel"],
                    "user": {"username": "system:serviceaccount:demo:articles"}}),
            ),
            (
                "a-person",
                serde_json::json!({"authenticated": true, "audiences": ["keel"],
                    "user": {"username": "alice@example.com"}}),
            ),
            (
                "other-audience",
                serde_json::json!({"authenticated": true, "audiences": ["vault"],
                    "user": {"username": "system:serviceaccount:demo:articles"}}),
            ),
            (
                "no-audience",
                serde_json::json!({"authenticated": true,
                    "user": {"username": "system:serviceaccount:demo:articles"}}),
            ),
            (
                "empty-audiences",
                serde_json::json!({"authenticated": true, "audiences": [],
                    "user": {"username": "system:serviceaccount:demo:articles"}}),
            ),
        ])
        .await;
        let config = kube::Config::new(url.parse().expect("url"));
        let review = TokenReview::new(kube::Client::try_from(config).expect("client"));

        let proven = review
            .authenticate(b"good\n", "cluster.local")
            .await
            .expect("authenticated");
        assert_eq!(
            proven.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/articles"
        );
        let sent = asked.lock().expect("lock")[0].clone();
        assert_eq!(sent["spec"]["token"], "good");
        assert_eq!(sent["spec"]["audiences"], serde_json::json!(["keel"]));

        for (token, expect) in [
            ("forged", "invalid bearer token"),
            ("a-person", "is not a ServiceAccount"),
            ("other-audience", "not for audience keel"),
            ("no-audience", "did not confirm audience keel"),
            ("empty-audiences", "did not confirm audience keel"),
        ] {
            let err = review
                .authenticate(token.as_bytes(), "cluster.local")
                .await
                .expect_err(token);
            assert!(
                matches!(err, AuthError::Rejected(_)) && err.to_string().contains(expect),
                "{token}: {err}"
            );
        }
        // An API server that cannot be reached is not a rejection.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let unreachable = TokenReview::new(kube::Client::try_from(config).expect("client"));
        let err = unreachable
            .authenticate(b"good", "cluster.local")
            .await
            .expect_err("unreachable");
        assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    }
}
