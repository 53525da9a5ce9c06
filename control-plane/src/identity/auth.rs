//! Proof of identity: how the CA learns who is asking for a certificate.
//!
//! One trait, [`Authenticator`], two proofs:
//! - [`BootstrapTokens`], the local mesh's: a per-workload token that the control plane mints
//!   (`keelctl token`), an HMAC over the workload's name under a key kept with the CA. It proves
//!   a workload of the current model, and so the service account that workload runs as. Deleting
//!   the workload revokes its token.
//! - [`TokenReview`], Kubernetes': the pod's projected ServiceAccount token, checked by the API
//!   server's TokenReview (audience `keel`). It proves `system:serviceaccount:<ns>:<sa>`.
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
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| a == TOKEN_AUDIENCE)
        {
            return Err(AuthError::Rejected(format!(
                "the token is not for audience {TOKEN_AUDIENCE}"
            )));
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
