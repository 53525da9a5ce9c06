//! mTLS between sidecars: the proxy's workload identity, the rustls configurations built from
//! it, and the connection to the control plane's secure port.
//!
//! [`MeshTls`] holds what the proxy currently has (its certificate and key, the trust bundle)
//! and the rustls configurations derived from them, swapped atomically as a whole: a renewal or a
//! new bundle applies to new handshakes and never touches an established connection. The
//! [`certify`] task obtains and renews the certificate; [`control_plane`] dials the control
//! plane over TLS.
//!
//! The hop is TLS 1.3 only. ALPN says what flows inside: `h2` (requests between sidecars),
//! `http/1.1` (upgraded connections such as WebSocket) or `keel.tcp` (opaque TCP). The client
//! sends the server's identity as SNI ([`SpiffeId::server_name`]), so the inbound side can tell
//! a mesh connection meant for it from an application's own TLS.
//!
//! Session resumption is off on both sides: a resumed session would skip the certificate
//! checks, so an identity check, a renewal or a removed root would not apply to it.
//!
//! The private key is made in memory by [`certify`] and lives only in the rustls signing key
//! here: this module must never write it anywhere or send it.

pub mod certify;
pub mod control_plane;
pub mod verify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use keel_proto::spiffe::SpiffeId;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

pub use verify::identity_of;

/// ALPN of the HTTP/2 hop between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of an HTTP/1.1 connection between sidecars (upgrades: WebSocket and the like).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN of opaque TCP between sidecars.
pub const ALPN_OPAQUE: &[u8] = b"keel.tcp";

/// What the inner stream of a mesh connection carries, from its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carried {
    Http2,
    Http1,
    Opaque,
}

impl Carried {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Carried::Http2 => ALPN_H2,
            Carried::Http1 => ALPN_HTTP1,
            Carried::Opaque => ALPN_OPAQUE,
        }
    }

    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Carried> {
        match alpn? {
            ALPN_H2 => Some(Carried::Http2),
            ALPN_HTTP1 => Some(Carried::Http1),
            ALPN_OPAQUE => Some(Carried::Opaque),
            _ => None,
        }
    }
}

/// The proxy's own certificate, presented on both sides of every mesh handshake.
#[derive(Debug)]
struct Own(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Own {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Own {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The proxy's certificate.
#[derive(Debug)]
pub struct Credentials {
    pub certified: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    /// The id of the root that signed it.
    pub signed_by: String,
}

/// The state of the proxy's certificate at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certified {
    /// No certificate yet.
    Not,
    /// Its certificate expired at this time.
    Expired(SystemTime),
    Valid,
}

/// Why a mesh connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MeshConnectError {
    #[error("this proxy has no certificate yet")]
    NoCertificate,
    #[error("{0:?} is not a valid TLS server name")]
    BadName(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("the peer did not agree on the protocol (ALPN)")]
    Alpn,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust bundle is empty or holds no usable certificate")]
    NoRoots,
    #[error("building the TLS configuration failed: {0}")]
    Config(String),
}

type ClientConfigs = HashMap<(Arc<SpiffeId>, Carried), Arc<ClientConfig>>;

/// Everything derived from one certificate and one bundle.
#[derive(Debug)]
struct State {
    credentials: Arc<Credentials>,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    /// Client configurations by expected peer identity and ALPN, built on first use.
    clients: Mutex<ClientConfigs>,
}

/// The proxy's mTLS state, shared by the data path and the certificate task.
#[derive(Debug)]
pub struct MeshTls {
    me: SpiffeId,
    server_name: String,
    provider: Arc<CryptoProvider>,
    /// The latest bundle, as DER certificates.
    bundle: Mutex<Vec<CertificateDer<'static>>>,
    state: ArcSwapOption<State>,
    ready: watch::Sender<bool>,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots_of(bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(bundle.iter().cloned());
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(roots))
}

impl MeshTls {
    pub fn new(me: SpiffeId) -> Arc<MeshTls> {
        Arc::new(MeshTls {
            server_name: me.server_name(),
            me,
            provider: provider(),
            bundle: Mutex::new(Vec::new()),
            state: ArcSwapOption::empty(),
            ready: watch::Sender::new(false),
        })
    }

    /// The proxy's own identity.
    pub fn me(&self) -> &SpiffeId {
        &self.me
    }

    /// The SNI a mesh client sends to reach this proxy.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Whether the proxy holds a certificate; a receiver that turns true when it first does.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.state.load().as_ref().map(|s| s.credentials.clone())
    }

    /// Whether the proxy holds a certificate that is valid at `now` (peers refuse an expired
    /// one; the proxy keeps it all the same, and keeps renewing).
    pub fn certified_at(&self, now: SystemTime) -> Certified {
        match self.credentials() {
            None => Certified::Not,
            Some(c) if c.not_after <= now => Certified::Expired(c.not_after),
            Some(_) => Certified::Valid,
        }
    }

    /// The inbound side's configuration, once the proxy has a certificate.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.state.load().as_ref().map(|s| s.server.clone())
    }

    /// The outbound side's configuration for a peer that must prove `peer`, offering the ALPN
    /// of `carried`, once the proxy has a certificate.
    pub fn client_config(
        &self,
        peer: &Arc<SpiffeId>,
        carried: Carried,
    ) -> Option<Arc<ClientConfig>> {
        let state = self.state.load_full()?;
        let mut clients = state.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = clients.get(&(peer.clone(), carried)) {
            return Some(config.clone());
        }
        let verifier = verify::PeerVerifier::new(state.roots.clone(), peer.clone(), &self.provider);
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Own(state.credentials.certified.clone())));
        config.alpn_protocols = vec![carried.alpn().to_vec()];
        // No session resumption: every connection proves the peer's current certificate
        // against the current bundle, so renewals, root removals and identity checks apply to
        // every new connection. Connections are pooled, so full handshakes are rare.
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        clients.insert((peer.clone(), carried), config.clone());
        Some(config)
    }

    /// Opens a mesh connection to `peer`'s sidecar over `tcp`, carrying `carried`.
    pub async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
        peer: &Arc<SpiffeId>,
        carried: Carried,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, MeshConnectError> {
        let config = self
            .client_config(peer, carried)
            .ok_or(MeshConnectError::NoCertificate)?;
        let name = ServerName::try_from(peer.server_name())
            .map_err(|_| MeshConnectError::BadName(peer.server_name()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(MeshConnectError::Handshake)?;
        if Carried::from_alpn(tls.get_ref().1.alpn_protocol()) != Some(carried) {
            return Err(MeshConnectError::Alpn);
        }
        Ok(tls)
    }

    /// Installs a new certificate (with the bundle that came with it, if any).
    pub fn set_credentials(
        &self,
        credentials: Credentials,
        bundle: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<(), TlsError> {
        let bundle = {
            let mut held = self.bundle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(bundle) = bundle {
                *held = bundle;
            }
            held.clone()
        };
        self.install(Arc::new(credentials), &bundle)
    }

    /// Installs a new trust bundle (discovery sent one).
    pub fn set_bundle(&self, bundle: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        roots_of(&bundle)?;
        *self.bundle.lock().unwrap_or_else(|e| e.into_inner()) = bundle.clone();
        match self.credentials() {
            Some(credentials) => self.install(credentials, &bundle),
            None => Ok(()),
        }
    }

    fn install(
        &self,
        credentials: Arc<Credentials>,
        bundle: &[CertificateDer<'static>],
    ) -> Result<(), TlsError> {
        let roots = roots_of(bundle)?;
        let verifier = verify::MeshClientVerifier::new(
            roots.clone(),
            self.me.trust_domain().to_owned(),
            self.provider.clone(),
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Own(credentials.certified.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        self.state.store(Some(Arc::new(State {
            credentials,
            roots,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })));
        self.ready.send_replace(true);
        Ok(())
    }
}
