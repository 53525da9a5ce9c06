//! Dialing the control plane: plaintext (`http://`, discovery only) or TLS (`https://`, the
//! secure port that also serves `Identity`).
//!
//! Over TLS the proxy checks the control plane's certificate against the roots it was given at
//! start (`--ca-root-file`) until discovery delivers the mesh's trust bundle, and against that
//! bundle from then on, so a root rotation reaches the control plane connection too. The
//! certificate must carry the configured server name (`--control-plane-name`).
//!
//! This module must never fall back to plaintext when TLS was asked for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// How the proxy reaches the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// The address as configured, for logs.
    pub address: String,
    endpoint: Endpoint,
    connect_timeout: Duration,
    tls: Option<Arc<ControlPlaneTls>>,
}

/// The TLS side of [`ControlPlane`].
#[derive(Debug)]
pub struct ControlPlaneTls {
    server_name: ServerName<'static>,
    roots: Mutex<Arc<RootCertStore>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("invalid control plane address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("the root file holds no usable certificate")]
    NoRoots,
    #[error("https:// needs the roots to check the control plane with (--ca-root-file)")]
    MissingRoots,
}

impl ControlPlaneTls {
    pub fn new(
        server_name: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<ControlPlaneTls, ControlPlaneError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ControlPlaneError::BadServerName(server_name.to_owned()))?;
        let tls = ControlPlaneTls {
            server_name,
            roots: Mutex::new(Arc::new(RootCertStore::empty())),
        };
        tls.set_roots(roots)?;
        Ok(tls)
    }

    /// Replaces the roots the control plane's certificate is checked against.
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), ControlPlaneError> {
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots);
        if added == 0 {
            return Err(ControlPlaneError::NoRoots);
        }
        *self.roots.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(store);
        Ok(())
    }

    fn connector(&self) -> Result<tokio_rustls::TlsConnector, rustls::Error> {
        let roots = self.roots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut config = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

impl ControlPlane {
    /// `address` is `http://host:port`, `https://host:port` or a bare `host:port` (plaintext).
    /// `https://` needs `tls`.
    pub fn new(
        address: &str,
        tls: Option<Arc<ControlPlaneTls>>,
        connect_timeout: Duration,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let bad = |reason: String| ControlPlaneError::BadAddress {
            address: address.to_owned(),
            reason,
        };
        let (secure, rest) = match address.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => return Err(bad(format!("unknown scheme {scheme:?}"))),
            None => (false, address),
        };
        if secure && tls.is_none() {
            return Err(ControlPlaneError::MissingRoots);
        }
        // The connector does TLS itself; tonic sees a plain HTTP/2 connection either way.
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(60)))
            // A control plane that vanished without closing the connection (a partition, a
            // dead node) is noticed within 40 s instead of after the kernel's TCP timeouts.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(ControlPlane {
            address: address.to_owned(),
            endpoint,
            connect_timeout,
            tls: if secure { tls } else { None },
        })
    }

    pub fn is_secure(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS settings, to update the roots as the bundle changes.
    pub fn tls(&self) -> Option<&Arc<ControlPlaneTls>> {
        self.tls.as_ref()
    }

    /// Connects (TLS when configured).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let Some(tls) = self.tls.clone() else {
            return self.endpoint.connect().await;
        };
        let connect_timeout = self.connect_timeout;
        let connector = tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let port = uri.port_u16().unwrap_or(443);
                let tcp = tokio::time::timeout(
                    connect_timeout,
                    tokio::net::TcpStream::connect((host, port)),
                )
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
                let _ = tcp.set_nodelay(true);
                let connector = tls.connector().map_err(std::io::Error::other)?;
                let stream = connector.connect(tls.server_name.clone(), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        self.endpoint.connect_with_connector(connector).await
    }
}
