//! The `Identity` service over the control plane's secure port, driven by a real tonic client
//! the way a proxy dials it: TLS checked against the CA's roots, a bootstrap token as proof.
//! Every refusal names its reason; none needs root. A request is refused unless the token, the
//! identity asked for and the identity in the CSR all agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_control_plane::server::IdentityConfig;
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use keel_proto::v1::CertifyRequest;
use keel_proto::v1::identity_client::IdentityClient;
use keel_proxy::tls::control_plane::{ControlPlane as Dial, ControlPlaneTls};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

const MESH: &str = "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: id.local}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-1, namespace: demo}
spec: {serviceAccount: articles, addresses: [10.0.0.3]}
";

async fn start() -> anyhow::Result<(ControlPlane, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("mesh.yaml"), MESH)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let cp = ControlPlane::start(ControlPlaneConfig {
        config_dir: dir.path().to_path_buf(),
        discovery_addr: any,
        admin_addr: any,
        identity: Some(IdentityConfig::ephemeral(any)),
    })
    .await?;
    Ok((cp, dir))
}

async fn client(cp: &ControlPlane) -> anyhow::Result<IdentityClient<tonic::transport::Channel>> {
    let ca = cp.ca.as_ref().expect("ca");
    let roots = ca.bundle().anchors.iter().map(|a| a.der.clone()).collect();
    let tls = Arc::new(ControlPlaneTls::new(
        "keel-control-plane.keel-system.svc",
        roots,
    )?);
    let secure = cp.secure_addr.expect("secure port");
    let dial = Dial::new(
        &format!("https://{secure}"),
        Some(tls),
        Duration::from_secs(5),
    )?;
    Ok(IdentityClient::new(dial.connect().await?))
}

fn csr(identity: &str, key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("uri"))];
    params.serialize_request(key).expect("csr").der().to_vec()
}

#[tokio::test]
async fn certify_signs_only_what_the_token_proves() -> anyhow::Result<()> {
    let (cp, _dir) = start().await?;
    let mut identity = client(&cp).await?;
    let tokens = cp.tokens.as_ref().expect("tokens");
    let token = tokens.mint("demo", "articles-1").into_bytes();
    let me = "spiffe://id.local/ns/demo/sa/articles";
    let key = KeyPair::generate()?;

    let answer = identity
        .certify(CertifyRequest {
            identity: me.to_owned(),
            token: token.clone(),
            csr: csr(me, &key),
            node_id: "articles-1.demo".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(answer.certificate_chain.len(), 1);
    assert_eq!(answer.trust_bundle.len(), 1);
    assert!(!answer.signed_by.is_empty());
    assert_eq!(
        keel_proxy::tls::identity_of(&answer.certificate_chain[0])?.to_string(),
        me
    );
    let status = cp.ca.as_ref().expect("ca").status();
    assert_eq!(status.issued["articles-1.demo"].identity, me);

    let refusals = [
        (
            "another service account",
            CertifyRequest {
                identity: "spiffe://id.local/ns/demo/sa/admin".to_owned(),
                token: token.clone(),
                csr: csr(me, &key),
                node_id: String::new(),
            },
            tonic::Code::PermissionDenied,
            "the token proves spiffe://id.local/ns/demo/sa/articles",
        ),
        (
            "another trust domain",
            CertifyRequest {
                identity: "spiffe://other.local/ns/demo/sa/articles".to_owned(),
                token: token.clone(),
                csr: csr(me, &key),
                node_id: String::new(),
            },
            tonic::Code::PermissionDenied,
            "outside the mesh's trust domain",
        ),
        (
            "no token",
            CertifyRequest {
                identity: me.to_owned(),
                token: Vec::new(),
                csr: csr(me, &key),
                node_id: String::new(),
            },
            tonic::Code::Unauthenticated,
            "malformed",
        ),
        (
            "a forged token",
            CertifyRequest {
                identity: me.to_owned(),
                token: b"keel1:demo:articles-1:00".to_vec(),
                csr: csr(me, &key),
                node_id: String::new(),
            },
            tonic::Code::Unauthenticated,
            "does not match",
        ),
        (
            "not a SPIFFE ID",
            CertifyRequest {
                identity: "articles".to_owned(),
                token: token.clone(),
                csr: csr(me, &key),
                node_id: String::new(),
            },
            tonic::Code::InvalidArgument,
            "spiffe://",
        ),
        (
            "a CSR for another identity",
            CertifyRequest {
                identity: me.to_owned(),
                token: token.clone(),
                csr: csr("spiffe://id.local/ns/kube-system/sa/admin", &key),
                node_id: String::new(),
            },
            tonic::Code::PermissionDenied,
            "asks for spiffe://id.local/ns/kube-system/sa/admin, but the proof establishes \
             spiffe://id.local/ns/demo/sa/articles",
        ),
        (
            "a CSR for another trust domain",
            CertifyRequest {
                identity: me.to_owned(),
                token: token.clone(),
                csr: csr("spiffe://evil.example/ns/demo/sa/articles", &key),
                node_id: String::new(),
            },
            tonic::Code::PermissionDenied,
            "asks for spiffe://evil.example/ns/demo/sa/articles, but the proof establishes \
             spiffe://id.local/ns/demo/sa/articles",
        ),
        (
            "a CSR naming no identity",
            CertifyRequest {
                identity: me.to_owned(),
                token: token.clone(),
                csr: {
                    let mut params = CertificateParams::default();
                    params.distinguished_name = DistinguishedName::new();
                    params.serialize_request(&key)?.der().to_vec()
                },
                node_id: String::new(),
            },
            tonic::Code::InvalidArgument,
            "names no identity",
        ),
        (
            "a broken CSR",
            CertifyRequest {
                identity: me.to_owned(),
                token: token.clone(),
                csr: b"\x30\x03garbage".to_vec(),
                node_id: String::new(),
            },
            tonic::Code::InvalidArgument,
            "PKCS#10",
        ),
    ];
    for (what, request, code, reason) in refusals {
        let status = identity.certify(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(reason),
            "{what}: {:?} does not say {reason:?}",
            status.message()
        );
    }
    // The service still answers after all that.
    let again = identity
        .certify(CertifyRequest {
            identity: me.to_owned(),
            token,
            csr: csr(me, &KeyPair::generate()?),
            node_id: String::new(),
        })
        .await;
    assert!(again.is_ok());
    Ok(())
}

#[tokio::test]
async fn the_secure_port_is_refused_to_a_client_trusting_another_root() -> anyhow::Result<()> {
    let (cp, _dir) = start().await?;
    let stranger = rcgen::CertificateParams::default().self_signed(&KeyPair::generate()?)?;
    let tls = Arc::new(ControlPlaneTls::new(
        "keel-control-plane.keel-system.svc",
        vec![stranger.der().clone()],
    )?);
    let secure = cp.secure_addr.expect("secure port");
    let dial = Dial::new(
        &format!("https://{secure}"),
        Some(tls),
        Duration::from_secs(5),
    )?;
    assert!(
        dial.connect().await.is_err(),
        "connected to an untrusted control plane"
    );
    Ok(())
}
