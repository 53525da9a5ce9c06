//! The mesh's certificate authority: its roots, the signing of workload certificates
//! (X.509-SVIDs), and the rotation of roots.
//!
//! Roots are ECDSA P-256 self-signed CA certificates that sign leaves directly (path length 0).
//! They are generated on first start, or imported from files, and persisted in the CA directory
//! (`roots/<id>/cert.pem`, `roots/<id>/key.pem` readable by the owner only, and `state.json`
//! naming the roots in order and the one that signs), so a restarted control plane keeps its
//! identity and every issued certificate stays valid.
//!
//! Rotation is three steps, each safe on its own (see [`CertificateAuthority::add_root`],
//! [`CertificateAuthority::use_root`], [`CertificateAuthority::remove_root`]): a new root is
//! first only *trusted* (it joins the bundle every proxy receives), then it *signs* (proxies whose
//! certificate chains to another root renew at once), and the old root is removed once no
//! unexpired certificate chains to it. The checks are [`super::rotation`]'s; this module keeps
//! the facts and refuses only what is wrong in itself (removing the signing root).
//!
//! The facts are the certificates that may still be in use: for each proxy (its identity and
//! Node id) the newest certificate signed for it, its serial, the root that signed it and its
//! expiry, until it expires. A proxy that renews replaces its record; a proxy that went away
//! leaves its record until the certificate expires, since it might still present it. The records
//! are written to `issued.json` in the CA directory before a certificate is handed out (a failed
//! write refuses the certificate), so a restarted control plane still knows what it signed: an
//! empty memory after a restart must never make a root look unused.
//!
//! Every leaf follows the X.509-SVID rules: exactly one URI SAN (the SPIFFE ID), an empty
//! subject, cA=false, a critical KeyUsage of digitalSignature only, EKU serverAuth and
//! clientAuth. No leaf outlives the root that signs it. A CSR must ask for exactly the identity the caller proved (one URI SAN, nothing
//! else) or it is refused; even then the CA takes nothing from it but its public key: the
//! identity comes from the caller's proof, the rest from here. It must never write a key where
//! others can read it, and never lose the last persisted state on a failed write.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use keel_proto::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How long a generated root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are valid from a little before they are signed, for clocks slightly behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The shortest workload certificate lifetime the CA accepts as a setting.
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(10);
/// The default workload certificate lifetime (Istio's and Linkerd's).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA directory {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    BadRoot { what: String, reason: String },
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error(
        "the certificate signing request asks for {requested}, but the proof establishes {proven}"
    )]
    IdentityMismatch { requested: String, proven: String },
    #[error("no root with id {0}")]
    NoSuchRoot(String),
    #[error(
        "root {0} signs new certificates; make another root sign first (`keelctl ca use-root`)"
    )]
    RemovingSigningRoot(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("workload certificate lifetime {0:?} is below the minimum of {MIN_WORKLOAD_TTL:?}")]
    TtlTooShort(Duration),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A root as the bundle carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anchor {
    pub id: String,
    #[serde(skip)]
    pub der: CertificateDer<'static>,
    pub signing: bool,
}

/// The roots every peer certificate may chain to, as proxies receive them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TrustBundle {
    pub anchors: Vec<Anchor>,
}

impl TrustBundle {
    pub fn signing(&self) -> Option<&Anchor> {
        self.anchors.iter().find(|a| a.signing)
    }
}

struct Root {
    id: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

/// The newest certificate signed for one proxy (an identity and a Node id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issued {
    /// The Node id the proxy gave ("" when the caller named none).
    pub node: String,
    pub identity: String,
    /// The certificate's serial number, in hex (`a1:b2:...`).
    pub serial: String,
    /// The root that signed it.
    pub root: String,
    #[serde(with = "crate::admin::rfc3339")]
    pub not_after: SystemTime,
}

impl Issued {
    /// Who holds it, for a message: the Node id, or the identity and serial without one.
    pub fn holder(&self) -> String {
        if self.node.is_empty() {
            format!("{} (serial {})", self.identity, self.serial)
        } else {
            self.node.clone()
        }
    }
}

/// `issued.json`: the records of [`Issued`] certificates.
#[derive(Serialize, Deserialize)]
struct IssuedFile {
    certificates: Vec<IssuedRecord>,
}

#[derive(Serialize, Deserialize)]
struct IssuedRecord {
    node: String,
    identity: String,
    serial: String,
    root: String,
    /// Seconds since the Unix epoch.
    not_after: u64,
}

/// A root, for status.
#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    pub id: String,
    pub signing: bool,
    #[serde(with = "crate::admin::rfc3339")]
    pub not_after: SystemTime,
    pub subject: String,
    /// Unexpired certificates that chain to it.
    pub certificates: usize,
    /// When the last of them expires.
    #[serde(with = "crate::admin::rfc3339::option")]
    pub last_expiry: Option<SystemTime>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    pub roots: Vec<RootStatus>,
    pub workload_ttl_seconds: u64,
    /// The unexpired certificates, each proxy's newest, by Node id.
    pub issued: Vec<Issued>,
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Signed {
    pub chain: Vec<CertificateDer<'static>>,
    pub bundle: TrustBundle,
    pub not_after: SystemTime,
    pub signed_by: String,
}

/// A proxy, for the records of what was issued: its identity and its Node id.
type Holder = (String, String);

struct State {
    roots: Vec<Root>,
    signing: String,
    /// Each proxy's newest certificate, until it expires.
    issued: HashMap<Holder, Issued>,
}

impl State {
    fn signing_root(&self) -> &Root {
        // `signing` always names one of `roots`: every change keeps that true.
        self.roots
            .iter()
            .find(|r| r.id == self.signing)
            .unwrap_or(&self.roots[0])
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle {
            anchors: self
                .roots
                .iter()
                .map(|r| Anchor {
                    id: r.id.clone(),
                    der: r.der.clone(),
                    signing: r.id == self.signing,
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedState {
    roots: Vec<String>,
    signing: String,
}

/// Where the CA keeps its roots.
#[derive(Debug, Clone)]
pub enum CaStorage {
    /// A directory: created if missing, a root generated on first start (or imported from
    /// `import`, a certificate and key in PEM, when given and the directory has no root yet).
    Directory {
        dir: PathBuf,
        import: Option<(PathBuf, PathBuf)>,
    },
    /// In memory only: a fresh root per process (tests and throwaway meshes).
    Memory,
}

/// The certificate authority.
pub struct CertificateAuthority {
    dir: Option<PathBuf>,
    state: Mutex<State>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    workload_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("workload_ttl", &self.workload_ttl)
            .finish_non_exhaustive()
    }
}

/// The id of a root: the first 8 bytes of its certificate's SHA-256, in hex.
pub fn root_id(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn generate_root() -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "keel");
    name.push(DnType::CommonName, "keel mesh root CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.der().clone(), key))
}

fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<[u8; 16]>();
    // Positive and without a leading zero byte, as RFC 5280 wants serials.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Checks that `der` is a CA certificate that `key` belongs to, and makes a root of it.
fn root_from(der: CertificateDer<'static>, key: KeyPair, what: &str) -> Result<Root, CaError> {
    let bad = |reason: String| CaError::BadRoot {
        what: what.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad(
            "the certificate is not a CA (basicConstraints cA=false)".into(),
        ));
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(bad("the key does not belong to the certificate".into()));
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    if not_after <= SystemTime::now() {
        return Err(bad("the certificate has expired".into()));
    }
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad(e.to_string()))?;
    Ok(Root {
        id: root_id(&der),
        der,
        issuer,
        not_after,
    })
}

fn read_root(cert_path: &Path, key_path: &Path) -> Result<Root, CaError> {
    let cert_pem = fs::read(cert_path).map_err(io_err(cert_path))?;
    let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
    let der = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| CaError::BadRoot {
        what: cert_path.display().to_string(),
        reason: format!("no PEM certificate: {e}"),
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadRoot {
        what: key_path.display().to_string(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    root_from(der, key, &cert_path.display().to_string())
}

/// Writes `contents` to `path` through a temporary file and a rename, so a crash leaves either
/// the old file or the new one. `private` files are readable by the owner only.
fn write_atomically(path: &Path, contents: &[u8], private: bool) -> Result<(), CaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    tmp.write_all(contents).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| CaError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// PEM of the bundle's certificates, one after another (what `--ca-root-file` takes).
pub fn bundle_pem(bundle: &TrustBundle) -> String {
    bundle.anchors.iter().map(|a| pem_of(&a.der)).collect()
}

impl CertificateAuthority {
    /// Opens (or creates) the CA. `workload_ttl` is the lifetime of workload certificates.
    pub fn open(
        storage: CaStorage,
        workload_ttl: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        if workload_ttl < MIN_WORKLOAD_TTL {
            return Err(CaError::TtlTooShort(workload_ttl));
        }
        let (dir, roots, signing, issued) = match storage {
            CaStorage::Memory => {
                let (der, key) = generate_root()?;
                let root = root_from(der, key, "generated root")?;
                let signing = root.id.clone();
                (None, vec![root], signing, HashMap::new())
            }
            CaStorage::Directory { dir, import } => {
                let (roots, signing) = Self::load_or_create(&dir, import)?;
                let issued = Self::load_issued(&dir, &roots)?;
                (Some(dir), roots, signing, issued)
            }
        };
        let state = State {
            roots,
            signing,
            issued,
        };
        let bundle = watch::Sender::new(Arc::new(state.bundle()));
        Ok(CertificateAuthority {
            dir,
            state: Mutex::new(state),
            bundle,
            workload_ttl,
        })
    }

    fn load_or_create(
        dir: &Path,
        import: Option<(PathBuf, PathBuf)>,
    ) -> Result<(Vec<Root>, String), CaError> {
        let state_path = dir.join("state.json");
        if state_path.exists() {
            let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
            let persisted: PersistedState =
                serde_json::from_str(&text).map_err(|e| CaError::Corrupt {
                    path: state_path.clone(),
                    reason: e.to_string(),
                })?;
            let mut roots = Vec::new();
            for id in &persisted.roots {
                let root_dir = dir.join("roots").join(id);
                let root = read_root(&root_dir.join("cert.pem"), &root_dir.join("key.pem"))?;
                if root.id != *id {
                    return Err(CaError::Corrupt {
                        path: root_dir,
                        reason: format!("holds root {}, not {id}", root.id),
                    });
                }
                roots.push(root);
            }
            if !roots.iter().any(|r| r.id == persisted.signing) {
                return Err(CaError::Corrupt {
                    path: state_path,
                    reason: format!(
                        "the signing root {} is not among the roots",
                        persisted.signing
                    ),
                });
            }
            tracing::info!(dir = %dir.display(), roots = roots.len(), signing = %persisted.signing, "CA loaded");
            return Ok((roots, persisted.signing));
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let root = match import {
            Some((cert, key)) => read_root(&cert, &key)?,
            None => {
                let (der, key) = generate_root()?;
                root_from(der, key, "generated root")?
            }
        };
        Self::persist_root(dir, &root)?;
        let signing = root.id.clone();
        Self::persist_state(dir, std::slice::from_ref(&signing), &signing)?;
        let roots = vec![root];
        tracing::info!(dir = %dir.display(), root = %signing, "CA created");
        Ok((roots, signing))
    }

    /// Reads `issued.json` (absent in a new CA directory), keeping the unexpired records of
    /// roots that are still there.
    fn load_issued(dir: &Path, roots: &[Root]) -> Result<HashMap<Holder, Issued>, CaError> {
        let path = dir.join("issued.json");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file: IssuedFile = serde_json::from_str(&text).map_err(|e| CaError::Corrupt {
            path: path.clone(),
            reason: format!(
                "{e} (it records the certificates still in use, which root removal checks; \
                 remove the file only if no workload holds a certificate from a root you will \
                 remove)"
            ),
        })?;
        let now = SystemTime::now();
        let issued: HashMap<Holder, Issued> = file
            .certificates
            .into_iter()
            .map(|r| Issued {
                node: r.node,
                identity: r.identity,
                serial: r.serial,
                root: r.root,
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(r.not_after),
            })
            .filter(|i| i.not_after > now && roots.iter().any(|r| r.id == i.root))
            .map(|i| ((i.identity.clone(), i.node.clone()), i))
            .collect();
        tracing::info!(
            certificates = issued.len(),
            "CA records of unexpired certificates loaded"
        );
        Ok(issued)
    }

    /// Writes the records of what was issued, when the CA has a directory.
    fn persist_issued(&self, issued: &HashMap<Holder, Issued>) -> Result<(), CaError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mut certificates: Vec<IssuedRecord> = issued
            .values()
            .map(|i| IssuedRecord {
                node: i.node.clone(),
                identity: i.identity.clone(),
                serial: i.serial.clone(),
                root: i.root.clone(),
                not_after: i
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                    .unwrap_or_default(),
            })
            .collect();
        certificates.sort_by(|a, b| (&a.identity, &a.node).cmp(&(&b.identity, &b.node)));
        let path = dir.join("issued.json");
        let json = serde_json::to_vec_pretty(&IssuedFile { certificates }).map_err(|e| {
            CaError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        write_atomically(&path, &json, false)
    }

    fn persist_root(dir: &Path, root: &Root) -> Result<(), CaError> {
        let root_dir = dir.join("roots").join(&root.id);
        fs::create_dir_all(&root_dir).map_err(io_err(&root_dir))?;
        write_atomically(
            &root_dir.join("key.pem"),
            root.issuer.key().serialize_pem().as_bytes(),
            true,
        )?;
        write_atomically(
            &root_dir.join("cert.pem"),
            pem_of(&root.der).as_bytes(),
            false,
        )
    }

    fn persist_state(dir: &Path, roots: &[String], signing: &str) -> Result<(), CaError> {
        let state = PersistedState {
            roots: roots.to_vec(),
            signing: signing.to_owned(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|e| CaError::Corrupt {
            path: dir.join("state.json"),
            reason: e.to_string(),
        })?;
        write_atomically(&dir.join("state.json"), &json, false)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Persists the roots `ids` with `signing` (and `new_root`'s files first), before the caller
    /// changes the state in memory: a failed write changes nothing.
    fn persist(
        &self,
        ids: &[String],
        signing: &str,
        new_root: Option<&Root>,
    ) -> Result<(), CaError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        if let Some(root) = new_root {
            Self::persist_root(dir, root)?;
        }
        Self::persist_state(dir, ids, signing)
    }

    fn publish(&self, state: MutexGuard<'_, State>) {
        let bundle = Arc::new(state.bundle());
        drop(state);
        self.bundle.send_replace(bundle);
    }

    /// Adds a root to the bundle without letting it sign: generated, or from a PEM certificate
    /// and key. Returns its id. Adding a root that is already there changes nothing.
    pub fn add_root(&self, pem: Option<(&str, &str)>) -> Result<String, CaError> {
        let root = match pem {
            Some((cert_pem, key_pem)) => {
                let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
                    CaError::BadRoot {
                        what: "the certificate".into(),
                        reason: format!("no PEM certificate: {e}"),
                    }
                })?;
                let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadRoot {
                    what: "the key".into(),
                    reason: format!("no usable PEM private key: {e}"),
                })?;
                root_from(der, key, "the imported root")?
            }
            None => {
                let (der, key) = generate_root()?;
                root_from(der, key, "generated root")?
            }
        };
        let id = root.id.clone();
        let mut state = self.lock();
        if state.roots.iter().any(|r| r.id == id) {
            return Ok(id);
        }
        let mut ids: Vec<String> = state.roots.iter().map(|r| r.id.clone()).collect();
        ids.push(id.clone());
        self.persist(&ids, &state.signing, Some(&root))?;
        state.roots.push(root);
        self.publish(state);
        tracing::info!(root = %id, "root added to the trust bundle");
        Ok(id)
    }

    /// Makes root `id` sign new certificates.
    pub fn use_root(&self, id: &str) -> Result<(), CaError> {
        let mut state = self.lock();
        if !state.roots.iter().any(|r| r.id == id) {
            return Err(CaError::NoSuchRoot(id.to_owned()));
        }
        let ids: Vec<String> = state.roots.iter().map(|r| r.id.clone()).collect();
        self.persist(&ids, id, None)?;
        state.signing = id.to_owned();
        self.publish(state);
        tracing::info!(root = %id, "root now signs workload certificates");
        Ok(())
    }

    /// Removes root `id` from the bundle. The signing root cannot be removed.
    pub fn remove_root(&self, id: &str) -> Result<(), CaError> {
        let mut state = self.lock();
        if state.signing == id {
            return Err(CaError::RemovingSigningRoot(id.to_owned()));
        }
        if !state.roots.iter().any(|r| r.id == id) {
            return Err(CaError::NoSuchRoot(id.to_owned()));
        }
        let ids: Vec<String> = state
            .roots
            .iter()
            .map(|r| r.id.clone())
            .filter(|r| r != id)
            .collect();
        self.persist(&ids, &state.signing, None)?;
        state.roots.retain(|r| r.id != id);
        self.publish(state);
        tracing::info!(root = %id, "root removed from the trust bundle");
        Ok(())
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// A receiver that sees every new trust bundle.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    pub fn workload_ttl(&self) -> Duration {
        self.workload_ttl
    }

    /// The unexpired certificates that chain to `root`, ordered by holder.
    pub fn holders_of(&self, root: &str) -> Vec<Issued> {
        let now = SystemTime::now();
        let mut holders: Vec<Issued> = self
            .lock()
            .issued
            .values()
            .filter(|i| i.root == root && i.not_after > now)
            .cloned()
            .collect();
        holders.sort_by(|a, b| (&a.node, &a.identity).cmp(&(&b.node, &b.identity)));
        holders
    }

    /// Every unexpired certificate, ordered by holder.
    pub fn valid_certificates(&self) -> Vec<Issued> {
        let now = SystemTime::now();
        let mut all: Vec<Issued> = self
            .lock()
            .issued
            .values()
            .filter(|i| i.not_after > now)
            .cloned()
            .collect();
        all.sort_by(|a, b| (&a.node, &a.identity).cmp(&(&b.node, &b.identity)));
        all
    }

    pub fn status(&self) -> CaStatus {
        let issued = self.valid_certificates();
        let state = self.lock();
        CaStatus {
            roots: state
                .roots
                .iter()
                .map(|r| {
                    let chained = issued.iter().filter(|i| i.root == r.id);
                    RootStatus {
                        id: r.id.clone(),
                        signing: r.id == state.signing,
                        not_after: r.not_after,
                        subject: x509_parser::parse_x509_certificate(&r.der)
                            .map(|(_, c)| c.subject().to_string())
                            .unwrap_or_default(),
                        certificates: chained.clone().count(),
                        last_expiry: chained.map(|i| i.not_after).max(),
                    }
                })
                .collect(),
            workload_ttl_seconds: self.workload_ttl.as_secs(),
            issued,
        }
    }

    /// Signs a workload certificate for `identity`, whose proof the caller has checked, over the
    /// public key of `csr` (DER). The CSR must be well formed, correctly self-signed, for an
    /// ECDSA P-256 key, and ask for exactly `identity` (see [`check_csr`]); the certificate is
    /// built here, only the key is taken from the CSR.
    pub fn sign_workload(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        node_id: &str,
    ) -> Result<Signed, CaError> {
        let request = check_csr(csr, identity)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let mut state = self.lock();
        let root = state.signing_root();
        // A leaf never outlives the root it chains to.
        let not_after = (now + self.workload_ttl).min(root.not_after);
        params.not_after = not_after.into();
        let cert = params.signed_by(&request.public_key, &root.issuer)?;
        let signed_by = root.id.clone();
        let bundle = state.bundle();
        let holder = (identity.to_string(), node_id.to_owned());
        let record = Issued {
            node: node_id.to_owned(),
            identity: identity.to_string(),
            serial: serial.to_string(),
            root: signed_by.clone(),
            not_after,
        };
        let previous = state.issued.insert(holder.clone(), record);
        state.issued.retain(|_, i| i.not_after > now);
        // Recorded before it is handed out: a certificate the records do not know of could
        // make a root look unused.
        if let Err(e) = self.persist_issued(&state.issued) {
            match previous {
                Some(previous) => state.issued.insert(holder, previous),
                None => state.issued.remove(&holder),
            };
            tracing::error!(error = %e, "recording an issued certificate failed; refusing it");
            return Err(e);
        }
        Ok(Signed {
            chain: vec![cert.der().clone()],
            bundle,
            not_after,
            signed_by,
        })
    }

    /// A serving certificate for the control plane itself: DNS names and IP addresses,
    /// serverAuth only, with a key made here. Returns the chain, the key and the expiry.
    pub fn sign_server(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair, SystemTime), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            match name.parse::<std::net::IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(SanType::DnsName(name.clone().try_into()?)),
            }
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = (now - CLOCK_SKEW).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let state = self.lock();
        let root = state.signing_root();
        let not_after = (now + self.workload_ttl).min(root.not_after);
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &root.issuer)?;
        Ok((vec![cert.der().clone()], key, not_after))
    }
}

/// Parses and checks a CSR: a valid self-signature over an ECDSA P-256 public key, asking for
/// `identity` and nothing else: exactly one requested extension, subjectAltName, holding exactly
/// one name, the URI `identity`. A CSR for another identity is refused even though the CA would
/// not sign what it asks for, so that a proxy asking for the wrong identity learns it at once
/// instead of holding a certificate it did not expect.
fn check_csr(csr: &[u8], identity: &SpiffeId) -> Result<CertificateSigningRequestParams, CaError> {
    use x509_parser::cri_attributes::ParsedCriAttribute;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|e| CaError::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    let spki = &parsed.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
    if !is_p256 {
        return Err(CaError::BadCsr(
            "the key must be ECDSA P-256 (as X.509-SVIDs are issued)".into(),
        ));
    }
    parsed
        .verify_signature()
        .map_err(|_| CaError::BadCsr("its signature does not verify".into()))?;

    let wanted = identity.to_string();
    let mut uris = Vec::new();
    for attribute in parsed.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(requested) = attribute.parsed_attribute() else {
            continue;
        };
        for extension in &requested.extensions {
            let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() else {
                return Err(CaError::BadCsr(format!(
                    "it requests extension {}, which keel does not sign; send only the \
                     subjectAltName URI {wanted}",
                    extension.oid
                )));
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                    other => {
                        return Err(CaError::BadCsr(format!(
                            "it asks for {}; an X.509-SVID carries only the URI {wanted}",
                            describe_name(other)
                        )));
                    }
                }
            }
        }
    }
    match uris.as_slice() {
        [only] if *only == wanted => {}
        [] => {
            return Err(CaError::BadCsr(format!(
                "it names no identity; it must ask for exactly the URI SAN {wanted}"
            )));
        }
        asked if asked.iter().all(|u| *u == wanted) => {
            return Err(CaError::BadCsr(format!(
                "it asks for {wanted} {} times; exactly one URI SAN is allowed",
                asked.len()
            )));
        }
        asked => {
            return Err(CaError::IdentityMismatch {
                requested: asked.join(", "),
                proven: wanted,
            });
        }
    }
    // rcgen re-parses it for the public key; only the key is taken from its answer.
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
        .map_err(|e| CaError::BadCsr(e.to_string()))
}

/// A subjectAltName that is not a URI, for an error message.
fn describe_name(name: &x509_parser::extensions::GeneralName<'_>) -> String {
    use x509_parser::extensions::GeneralName;
    match name {
        GeneralName::DNSName(dns) => format!("the DNS name {dns}"),
        GeneralName::RFC822Name(mail) => format!("the e-mail address {mail}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => format!(
                "the IP address {}",
                std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default())
            ),
            16 => format!(
                "the IP address {}",
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default())
            ),
            _ => "a malformed IP address".to_owned(),
        },
        other => format!("the name {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn csr_for(key: &KeyPair, san: &str) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(san.try_into().expect("uri"))];
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("spiffe id")
    }

    fn memory_ca() -> CertificateAuthority {
        CertificateAuthority::open(CaStorage::Memory, Duration::from_secs(3600)).expect("ca")
    }

    #[test]
    fn workload_certificates_are_x509_svids() {
        let ca = memory_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let identity = id("spiffe://keel.local/ns/demo/sa/articles");
        let csr = csr_for(&key, &identity.to_string());
        let signed = ca
            .sign_workload(&csr, &identity, "articles-1.demo")
            .expect("signed");
        assert_eq!(signed.chain.len(), 1);
        assert_eq!(signed.signed_by, ca.bundle().anchors[0].id);
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.chain[0]).expect("parse");
        assert!(
            cert.subject().iter().next().is_none(),
            "subject must be empty"
        );
        assert_eq!(
            cert.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        let mut uris = Vec::new();
        let mut saw = (false, false, false, false);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            other => panic!("unexpected SAN {other:?}"),
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => {
                    assert!(!bc.ca);
                    saw.0 = true;
                }
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ext.critical, "KeyUsage must be critical");
                    // Bit 0, digitalSignature, and nothing else.
                    assert_eq!(ku.flags, 1, "KeyUsage {ku}");
                    saw.1 = true;
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    assert!(eku.server_auth && eku.client_auth);
                    saw.2 = true;
                }
                ParsedExtension::AuthorityKeyIdentifier(_) => saw.3 = true,
                _ => {}
            }
        }
        assert_eq!(uris, vec![identity.to_string()]);
        assert_eq!(saw, (true, true, true, true));
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + CLOCK_SKEW.as_secs() as i64);
        let holders = ca.holders_of(&signed.signed_by);
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].node, "articles-1.demo");
        assert_eq!(holders[0].identity, identity.to_string());
        assert_eq!(holders[0].serial, cert.raw_serial_as_string());
    }

    fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("uri"))
    }

    #[test]
    fn a_csr_for_another_identity_is_refused_naming_both() {
        let ca = memory_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let proven = id("spiffe://keel.local/ns/demo/sa/articles");
        let evil = "spiffe://evil.example/ns/kube-system/sa/admin";
        for (what, sans) in [
            ("another identity", vec![uri(evil)]),
            (
                "its own and another",
                vec![uri(&proven.to_string()), uri(evil)],
            ),
        ] {
            let err = ca
                .sign_workload(&csr_with(&key, sans), &proven, "articles-1.demo")
                .expect_err(what);
            assert!(
                matches!(err, CaError::IdentityMismatch { .. }),
                "{what}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.contains(evil) && message.contains(&proven.to_string()),
                "{what}: {message}"
            );
        }
        // Nothing was recorded as issued.
        assert!(ca.status().issued.is_empty());
    }

    #[test]
    fn a_csr_must_name_exactly_the_proven_identity_and_nothing_else() {
        let ca = memory_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let proven = id("spiffe://keel.local/ns/demo/sa/articles");
        let me = proven.to_string();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("no SAN", csr_with(&key, vec![]), "names no identity"),
            (
                "a DNS name beside the identity",
                csr_with(
                    &key,
                    vec![
                        uri(&me),
                        SanType::DnsName("articles.demo.svc".try_into().expect("dns")),
                    ],
                ),
                "articles.demo.svc",
            ),
            (
                "an IP address",
                csr_with(&key, vec![SanType::IpAddress([10, 0, 0, 3].into())]),
                "10.0.0.3",
            ),
            (
                "the identity twice",
                csr_with(&key, vec![uri(&me), uri(&me)]),
                "exactly one URI SAN",
            ),
            (
                "another extension",
                {
                    let mut params = CertificateParams::default();
                    params.distinguished_name = DistinguishedName::new();
                    params.subject_alt_names = vec![uri(&me)];
                    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    params.serialize_request(&key).expect("csr").der().to_vec()
                },
                "does not sign",
            ),
        ];
        for (what, csr, reason) in cases {
            let err = ca.sign_workload(&csr, &proven, "n").expect_err(what);
            assert!(matches!(err, CaError::BadCsr(_)), "{what}: {err}");
            assert!(err.to_string().contains(reason), "{what}: {err}");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let ca = memory_ca();
        let identity = id("spiffe://keel.local/ns/demo/sa/a");
        let err = ca
            .sign_workload(b"not der", &identity, "n")
            .expect_err("garbage");
        assert!(err.to_string().contains("not a PKCS#10 request"), "{err}");

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let err = ca
            .sign_workload(&csr_for(&p384, &identity.to_string()), &identity, "n")
            .expect_err("p384");
        assert!(err.to_string().contains("ECDSA P-256"), "{err}");

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut csr = csr_for(&key, &identity.to_string());
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        let err = ca
            .sign_workload(&csr, &identity, "n")
            .expect_err("tampered");
        assert!(err.to_string().contains("does not verify"), "{err}");
    }

    #[test]
    fn the_root_persists_and_rotates() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = CaStorage::Directory {
            dir: dir.path().join("ca"),
            import: None,
        };
        let ttl = Duration::from_secs(600);
        let first = CertificateAuthority::open(storage.clone(), ttl).expect("ca");
        let root1 = first.bundle().anchors[0].id.clone();
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.path().join("ca/roots").join(&root1).join("key.pem");
            let mode = fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o077, 0, "the root key must be private");
        }
        let root2 = first.add_root(None).expect("add");
        let bundle = first.bundle();
        assert_eq!(bundle.anchors.len(), 2);
        assert_eq!(bundle.signing().expect("signing").id, root1);
        assert!(matches!(
            first.remove_root(&root1),
            Err(CaError::RemovingSigningRoot(_))
        ));
        first.use_root(&root2).expect("use");
        drop(first);

        let reopened = CertificateAuthority::open(storage.clone(), ttl).expect("reopen");
        let bundle = reopened.bundle();
        assert_eq!(
            bundle
                .anchors
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>(),
            [root1.as_str(), root2.as_str()]
        );
        assert_eq!(bundle.signing().expect("signing").id, root2);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let identity = id("spiffe://keel.local/ns/demo/sa/a");
        let signed = reopened
            .sign_workload(&csr_for(&key, &identity.to_string()), &identity, "n")
            .expect("sign");
        assert_eq!(signed.signed_by, root2);
        reopened.remove_root(&root1).expect("remove");
        assert!(matches!(
            reopened.remove_root(&root1),
            Err(CaError::NoSuchRoot(_))
        ));
        drop(reopened);
        let last = CertificateAuthority::open(storage, ttl).expect("reopen");
        assert_eq!(last.bundle().anchors.len(), 1);
        assert_eq!(last.bundle().anchors[0].id, root2);
    }

    #[test]
    fn what_was_issued_is_recorded_before_it_is_handed_out() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = CaStorage::Directory {
            dir: dir.path().join("ca"),
            import: None,
        };
        let ttl = Duration::from_secs(600);
        let identity = id("spiffe://keel.local/ns/demo/sa/a");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = csr_for(&key, &identity.to_string());
        let ca = CertificateAuthority::open(storage.clone(), ttl).expect("ca");
        let root = ca.bundle().anchors[0].id.clone();
        ca.sign_workload(&csr, &identity, "a-1.demo")
            .expect("first");
        let second = ca
            .sign_workload(&csr, &identity, "a-1.demo")
            .expect("renewal");
        ca.sign_workload(&csr, &identity, "a-2.demo")
            .expect("another replica");
        // A renewal replaces the proxy's record; another proxy of the same identity has its own.
        let holders = ca.holders_of(&root);
        assert_eq!(
            holders.iter().map(|i| i.node.as_str()).collect::<Vec<_>>(),
            ["a-1.demo", "a-2.demo"]
        );
        drop(ca);
        let reopened = CertificateAuthority::open(storage.clone(), ttl).expect("reopen");
        let after = reopened.holders_of(&root);
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].serial, holders[0].serial);
        let expiry = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("t")
                .as_secs()
        };
        assert!(expiry(after[0].not_after) >= expiry(second.not_after));

        // A write that fails refuses the certificate and leaves the records as they were.
        let records = dir.path().join("ca/issued.json");
        fs::remove_file(&records).expect("rm");
        fs::create_dir(&records).expect("a directory where the file goes");
        let err = reopened
            .sign_workload(&csr, &identity, "a-3.demo")
            .expect_err("unrecorded");
        assert!(matches!(err, CaError::Io { .. }), "{err}");
        assert_eq!(reopened.holders_of(&root).len(), 2);
        drop(reopened);

        // A damaged file is named, not ignored: ignoring it would make roots look unused.
        fs::remove_dir(&records).expect("rmdir");
        fs::write(&records, "{ not json").expect("write");
        let err = CertificateAuthority::open(storage, ttl).expect_err("corrupt");
        assert!(
            err.to_string().contains("issued.json") && err.to_string().contains("root removal"),
            "{err}"
        );
    }

    #[test]
    fn no_certificate_outlives_its_root() {
        let ca = memory_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        let root_until = now + Duration::from_secs(600);
        params.not_after = root_until.into();
        let root = params.self_signed(&key).expect("root");
        let id = ca
            .add_root(Some((&root.pem(), &key.serialize_pem())))
            .expect("a root valid for 10 minutes");
        ca.use_root(&id).expect("use");

        let identity = self::id("spiffe://keel.local/ns/demo/sa/a");
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let signed = ca
            .sign_workload(&csr_for(&leaf_key, &identity.to_string()), &identity, "n")
            .expect("signed");
        let (_, leaf) = x509_parser::parse_x509_certificate(&signed.chain[0]).expect("parse");
        let (_, issuer) = x509_parser::parse_x509_certificate(root.der()).expect("parse");
        // The CA's lifetime is an hour; the root's ten minutes win.
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            issuer.validity().not_after.timestamp()
        );
        assert!(signed.not_after <= root_until);
        let (chain, _, server_until) = ca.sign_server(&["cp.example".to_owned()]).expect("server");
        let (_, server) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
        assert_eq!(
            server.validity().not_after.timestamp(),
            issuer.validity().not_after.timestamp()
        );
        assert!(server_until <= root_until);
    }

    #[test]
    fn a_root_can_be_imported_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let (der, key) = generate_root().expect("root");
        let cert_path = dir.path().join("root.pem");
        let key_path = dir.path().join("root-key.pem");
        fs::write(&cert_path, pem_of(&der)).expect("write");
        fs::write(&key_path, key.serialize_pem()).expect("write");
        let ca = CertificateAuthority::open(
            CaStorage::Directory {
                dir: dir.path().join("ca"),
                import: Some((cert_path.clone(), key_path)),
            },
            Duration::from_secs(600),
        )
        .expect("import");
        assert_eq!(ca.bundle().anchors[0].id, root_id(&der));

        // A key that is not the certificate's.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let err = ca
            .add_root(Some((&pem_of(&der), &other.serialize_pem())))
            .expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");
        // A leaf is not a CA.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = CertificateParams::new(vec!["x.example".to_owned()])
            .expect("params")
            .self_signed(&leaf_key)
            .expect("leaf");
        let err = ca
            .add_root(Some((&leaf.pem(), &leaf_key.serialize_pem())))
            .expect_err("leaf");
        assert!(err.to_string().contains("not a CA"), "{err}");
        let err = ca
            .add_root(Some(("garbage", "garbage")))
            .expect_err("garbage");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        assert!(matches!(
            CertificateAuthority::open(CaStorage::Memory, Duration::from_secs(1)),
            Err(CaError::TtlTooShort(_))
        ));
    }
}
