//! Obtaining and renewing the proxy's certificate.
//!
//! The task makes an ECDSA P-256 key in memory, sends a CSR for the proxy's SPIFFE ID with its
//! proof of identity (the token file, read anew on every attempt since Kubernetes rotates
//! projected tokens) to `Identity.Certify` on the control plane's secure port, checks what comes
//! back (the leaf names the proxy's identity, carries its key and chains to the bundle), and
//! installs it in [`MeshTls`]. A new key is made for every certificate.
//!
//! Renewal starts at about 70% of the lifetime (spread between 65% and 75% so a fleet does not
//! renew at once), at once when the mesh's signing root is not the one that signed the current
//! certificate (a root rotation), and is retried with jittered exponential back-off on failure
//! (from 250-500 ms up to 15-30 s). A failed renewal never drops the certificate the proxy has:
//! it keeps serving with it, and keeps trying; once it has expired the proxy is no longer
//! ready (see [`crate::admin`]), since peers refuse it.
//!
//! The task also applies the trust bundle that discovery delivers, to the mesh configurations
//! and to the control plane connection.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keel_proto::spiffe::SpiffeId;
use keel_proto::v1::CertifyRequest;
use keel_proto::v1::identity_client::IdentityClient;
use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::control_plane::ControlPlane;
use super::{Credentials, MeshTls};
use crate::config::{Config, TrustAnchor};
use crate::discovery::backoff::Backoff;
use crate::discovery::{BackoffConfig, Jitter};

/// How long one `Certify` call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct CertifyConfig {
    pub identity: SpiffeId,
    /// The proxy's Node id, so the control plane can tell which proxy holds which certificate.
    pub node_id: String,
    /// The proof of identity; `None` sends an empty token (which a control plane refuses).
    pub token_file: Option<PathBuf>,
    pub backoff: BackoffConfig,
}

impl CertifyConfig {
    pub fn new(identity: SpiffeId, node_id: String, token_file: Option<PathBuf>) -> CertifyConfig {
        CertifyConfig {
            identity,
            node_id,
            token_file,
            // Equal jitter: even the first retry waits 250-500 ms, so a refusal is not
            // answered by an immediate second request.
            backoff: BackoffConfig {
                base: Duration::from_millis(500),
                max: Duration::from_secs(30),
                healthy_after: Duration::ZERO,
                jitter: Jitter::Equal,
            },
        }
    }
}

/// What the certificate task has done, for the admin server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CertStatus {
    pub identity: String,
    #[serde(with = "humantime_serde_opt")]
    pub valid_until: Option<SystemTime>,
    pub signed_by: Option<String>,
    pub issued: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

mod humantime_serde_opt {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_seconds(*t)),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CertifyError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the key or the CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    #[error("the control plane refused: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("no answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("the certificate received is unusable: {0}")]
    Unusable(String),
}

/// Starts the certificate task.
pub fn spawn(
    config: CertifyConfig,
    control_plane: ControlPlane,
    tls: Arc<MeshTls>,
    configs: watch::Receiver<Arc<Config>>,
) -> (JoinHandle<()>, Arc<Mutex<CertStatus>>) {
    let status = Arc::new(Mutex::new(CertStatus {
        identity: config.identity.to_string(),
        ..CertStatus::default()
    }));
    let task = Certifier {
        backoff: Backoff::new(config.backoff),
        config,
        control_plane,
        tls,
        channel: None,
        status: status.clone(),
        anchors: Vec::new(),
    };
    (tokio::spawn(task.run(configs)), status)
}

struct Certifier {
    config: CertifyConfig,
    control_plane: ControlPlane,
    tls: Arc<MeshTls>,
    channel: Option<Channel>,
    backoff: Backoff,
    status: Arc<Mutex<CertStatus>>,
    /// The bundle last applied from discovery.
    anchors: Vec<TrustAnchor>,
}

/// When to renew a certificate valid until `not_after`, from now: 65-75% of what is left.
fn renewal_delay(not_after: SystemTime) -> Duration {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    left.mul_f64(rand::rng().random_range(0.65..0.75))
}

impl Certifier {
    async fn run(mut self, mut configs: watch::Receiver<Arc<Config>>) {
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + self.attempt().await;
                }
                changed = configs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let config = configs.borrow_and_update().clone();
                    if self.apply_bundle(&config.mesh().trust_anchors) {
                        // The signing root is not the one that signed our certificate: renew
                        // soon, at a random moment within a second so proxies spread out.
                        let soon = tokio::time::Instant::now()
                            + Duration::from_millis(rand::rng().random_range(0..1000));
                        next = next.min(soon);
                    }
                }
            }
        }
    }

    /// One attempt; returns how long to wait before the next.
    async fn attempt(&mut self) -> Duration {
        match self.certify().await {
            Ok(not_after) => {
                self.backoff.reset();
                renewal_delay(not_after)
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                status.failures += 1;
                status.last_error = Some(e.to_string());
                if self.tls.credentials().is_some() {
                    tracing::warn!(error = %e, retry_in = ?delay, "certificate renewal failed; keeping the current certificate");
                } else {
                    tracing::warn!(error = %e, retry_in = ?delay, "obtaining a certificate failed");
                }
                delay
            }
        }
    }

    /// Applies a new bundle from discovery. Returns whether the proxy must renew because
    /// another root signs now.
    fn apply_bundle(&mut self, anchors: &[TrustAnchor]) -> bool {
        if anchors.is_empty() || anchors == self.anchors.as_slice() {
            return false;
        }
        let ders: Vec<CertificateDer<'static>> = anchors
            .iter()
            .map(|a| CertificateDer::from(a.certificate.to_vec()))
            .collect();
        if let Err(e) = self.tls.set_bundle(ders.clone()) {
            tracing::warn!(error = %e, "the trust bundle from discovery is unusable; keeping the current one");
            return false;
        }
        if let Some(tls) = self.control_plane.tls()
            && let Err(e) = tls.set_roots(ders)
        {
            tracing::warn!(error = %e, "the trust bundle cannot check the control plane");
        }
        self.anchors = anchors.to_vec();
        tracing::info!(roots = anchors.len(), "trust bundle updated");
        let signing = anchors.iter().find(|a| a.signing).map(|a| a.id.as_str());
        let ours = self.tls.credentials().map(|c| c.signed_by.clone());
        matches!((signing, ours), (Some(signing), Some(ours)) if signing != ours)
    }

    async fn certify(&mut self) -> Result<SystemTime, CertifyError> {
        let token = match &self.config.token_file {
            Some(path) => std::fs::read(path).map_err(|source| CertifyError::Token {
                path: path.clone(),
                source,
            })?,
            None => Vec::new(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(self.config.identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        let request = CertifyRequest {
            identity: self.config.identity.to_string(),
            token: token.trim_ascii().to_vec(),
            csr: csr.der().to_vec(),
            node_id: self.config.node_id.clone(),
        };
        let channel = match &self.channel {
            Some(channel) => channel.clone(),
            None => {
                let channel = self
                    .control_plane
                    .connect()
                    .await
                    .map_err(|e| CertifyError::Connect(crate::discovery::error_chain(&e)))?;
                self.channel = Some(channel.clone());
                channel
            }
        };
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            IdentityClient::new(channel).certify(request),
        )
        .await
        .map_err(|_| CertifyError::Timeout)?;
        let answer = match answer {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                ) {
                    self.channel = None;
                }
                return Err(CertifyError::Refused(status));
            }
        };
        let chain: Vec<CertificateDer<'static>> = answer
            .certificate_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let bundle: Vec<CertificateDer<'static>> = answer
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let not_after = self.check(&chain, &bundle, &key)?;
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = super::provider()
            .key_provider
            .load_private_key(pkcs8)
            .map_err(|e| CertifyError::Unusable(e.to_string()))?;
        drop(key);
        let credentials = Credentials {
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_after,
            signed_by: answer.signed_by.clone(),
        };
        // The bundle discovery sent (if any) is the newer one: the answer's applies only until
        // discovery has spoken.
        let bundle = self.anchors.is_empty().then_some(bundle);
        self.tls
            .set_credentials(credentials, bundle)
            .map_err(|e| CertifyError::Unusable(e.to_string()))?;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.issued += 1;
        status.valid_until = Some(not_after);
        status.signed_by = Some(answer.signed_by.clone());
        status.last_error = None;
        tracing::info!(
            identity = %self.config.identity,
            root = %answer.signed_by,
            valid_until = %humantime::format_rfc3339_seconds(not_after),
            "certificate installed"
        );
        Ok(not_after)
    }

    /// Checks a received chain: it names our identity, carries our key, and chains to `bundle`
    /// now. Returns its expiry.
    fn check(
        &self,
        chain: &[CertificateDer<'static>],
        bundle: &[CertificateDer<'static>],
        key: &KeyPair,
    ) -> Result<SystemTime, CertifyError> {
        let unusable = |reason: String| CertifyError::Unusable(reason);
        let leaf = chain
            .first()
            .ok_or_else(|| unusable("the chain is empty".into()))?;
        let identity = super::identity_of(leaf).map_err(|e| unusable(e.to_string()))?;
        if identity != self.config.identity {
            return Err(unusable(format!(
                "it names {identity}, not {}",
                self.config.identity
            )));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| unusable(format!("not X.509: {e}")))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
        {
            return Err(unusable("it does not carry the key we sent".into()));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(bundle.iter().cloned());
        let provider = super::provider();
        let end_entity = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| unusable(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| unusable(format!("it does not chain to the trust bundle: {e}")))?;
        let not_after = parsed.validity().not_after.timestamp();
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64))
    }
}
