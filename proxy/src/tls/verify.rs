//! Certificate verification between sidecars: chains to the mesh's trust bundle, and SPIFFE IDs.
//!
//! - [`PeerVerifier`] (the outbound side, a TLS client) accepts a server certificate only if it
//!   chains to the bundle *and* its one URI SAN is exactly the identity discovery said the
//!   endpoint has. A valid mesh certificate for another workload is refused: that is what stops
//!   a compromised pod from answering for a service it is not.
//! - [`MeshClientVerifier`] (the inbound side, a TLS server) accepts a client certificate that
//!   chains to the bundle and names one SPIFFE ID of the mesh's trust domain; which identities
//!   may do what is for authorization to decide.
//!
//! SAN extraction uses x509-parser. Expiry, signature and key usage are webpki's checks. This
//! module must never accept a certificate with zero or several URI SANs, or one outside the
//! trust domain.

use std::sync::Arc;

use keel_proto::spiffe::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// Why a certificate does not carry a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not an X.509 certificate")]
    NotX509,
    #[error("no URI SAN (a SPIFFE ID) in the certificate")]
    NoUri,
    #[error("more than one URI SAN in the certificate")]
    SeveralUris,
    #[error("{0}")]
    NotSpiffe(String),
}

/// The SPIFFE ID in a certificate: its only URI SAN.
pub fn identity_of(cert: &[u8]) -> Result<SpiffeId, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| IdentityError::NotX509)?;
    let mut uris = cert
        .extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        });
    let mut found = None;
    for san in uris.by_ref() {
        for name in &san.general_names {
            if let GeneralName::URI(uri) = name {
                if found.is_some() {
                    return Err(IdentityError::SeveralUris);
                }
                found = Some(*uri);
            }
        }
    }
    let uri = found.ok_or(IdentityError::NoUri)?;
    uri.parse()
        .map_err(|e: keel_proto::spiffe::SpiffeIdError| IdentityError::NotSpiffe(e.to_string()))
}

fn bad_identity(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Checks that a verified certificate names an identity of `trust_domain`.
fn in_trust_domain(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, rustls::Error> {
    let identity = identity_of(cert).map_err(bad_identity)?;
    if identity.trust_domain() != trust_domain {
        return Err(bad_identity(IdentityError::NotSpiffe(format!(
            "{identity} is outside the trust domain {trust_domain}"
        ))));
    }
    Ok(identity)
}

/// The outbound side's verifier for one expected peer identity.
#[derive(Debug)]
pub struct PeerVerifier {
    roots: Arc<RootCertStore>,
    expected: Arc<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Arc<SpiffeId>,
        provider: &CryptoProvider,
    ) -> PeerVerifier {
        PeerVerifier {
            roots,
            expected,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let identity = identity_of(end_entity).map_err(bad_identity)?;
        if identity != *self.expected {
            return Err(bad_identity(IdentityError::NotSpiffe(format!(
                "the peer is {identity}, not the expected {}",
                self.expected
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The mesh hop is TLS 1.3 only; the configs never offer 1.2.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The inbound side's client certificate verifier: webpki's chain checks, then the SPIFFE ID.
#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Result<MeshClientVerifier, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(MeshClientVerifier {
            inner,
            trust_domain,
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every client is a mesh sidecar with one certificate: hints only add bytes.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        in_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
