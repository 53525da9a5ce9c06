//! The `Identity` service over the control plane's secure port, driven by a real tonic client
//! the way a proxy dials it: TLS checked against the CA's roots, a bootstrap token as proof.
//! Every refusal names its reason; none needs root. A request is refused unless the token, the
//! identity asked for and the identity in the CSR all agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_control_plane::identity::CaStorage;
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

/// A control plane serving `dir/mesh` with its CA in `dir/ca`, as a restarted one would find it.
async fn start_in(dir: &std::path::Path) -> anyhow::Result<ControlPlane> {
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh)?;
    std::fs::write(mesh.join("mesh.yaml"), MESH)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut identity = IdentityConfig::ephemeral(any);
    identity.storage = CaStorage::Directory {
        dir: dir.join("ca"),
        import: None,
    };
    Ok(ControlPlane::start(ControlPlaneConfig {
        config_dir: mesh,
        discovery_addr: any,
        admin_addr: any,
        identity: Some(identity),
    })
    .await?)
}

/// A request to the admin API: its status and body.
async fn admin(
    cp: &ControlPlane,
    method: http::Method,
    path: &str,
) -> anyhow::Result<(http::StatusCode, String)> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", cp.admin_addr))
        .body(Empty::new())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
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
    let issued = status
        .issued
        .iter()
        .find(|i| i.node == "articles-1.demo")
        .expect("recorded");
    assert_eq!(issued.identity, me);

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

/// Certifies the proxy of workload demo/articles-1, as it would on start-up or renewal.
async fn certify_articles(cp: &ControlPlane) -> anyhow::Result<keel_proto::v1::CertifyResponse> {
    let me = "spiffe://id.local/ns/demo/sa/articles";
    let token = cp
        .tokens
        .as_ref()
        .expect("tokens")
        .mint("demo", "articles-1");
    let mut identity = client(cp).await?;
    let request = CertifyRequest {
        identity: me.to_owned(),
        token: token.into_bytes(),
        csr: csr(me, &KeyPair::generate()?),
        node_id: "articles-1.demo".to_owned(),
    };
    Ok(identity.certify(request).await?.into_inner())
}

#[tokio::test]
async fn a_restarted_control_plane_still_refuses_an_unsafe_root_removal() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = start_in(dir.path()).await?;
    let first = certify_articles(&cp).await?;
    let old = first.signed_by.clone();

    let (code, body) = admin(&cp, http::Method::POST, "/ca/roots").await?;
    assert_eq!(code, 200, "{body}");
    let new = serde_json::from_str::<serde_json::Value>(&body)?["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The proxy holding a certificate is not connected: it cannot be shown to trust the new
    // root, so only a forced step makes it sign.
    let (code, body) = admin(&cp, http::Method::POST, &format!("/ca/roots/{new}/sign")).await?;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("articles-1.demo") && body.contains("not connected"),
        "{body}"
    );
    let (code, body) = admin(
        &cp,
        http::Method::POST,
        &format!("/ca/roots/{new}/sign?force=true"),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = admin(&cp, http::Method::DELETE, &format!("/ca/roots/{old}")).await?;
    assert_eq!(code, 409, "{body}");

    // Restart: the new control plane has seen no proxy and signed nothing yet.
    cp.shutdown().await;
    let cp = start_in(dir.path()).await?;
    let (code, body) = admin(&cp, http::Method::DELETE, &format!("/ca/roots/{old}")).await?;
    assert_eq!(code, 409, "removed after a restart: {body}");
    assert!(
        body.contains(&format!("still chain to root {old}"))
            && body.contains("articles-1.demo (not connected"),
        "{body}"
    );
    let (code, body) = admin(&cp, http::Method::GET, "/ca").await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let old_root = status["roots"]
        .as_array()
        .and_then(|roots| roots.iter().find(|r| r["id"] == old.as_str()))
        .expect("the old root");
    assert_eq!(old_root["certificates"], 1, "{body}");
    assert!(
        old_root["cannot_remove_because"]
            .as_str()
            .is_some_and(|r| r.contains("articles-1.demo")),
        "{body}"
    );

    // The proxy renews (from the new root): nothing chains to the old one any more.
    let renewed = certify_articles(&cp).await?;
    assert_eq!(renewed.signed_by, new);
    let (code, body) = admin(&cp, http::Method::DELETE, &format!("/ca/roots/{old}")).await?;
    assert_eq!(code, 200, "{body}");
    Ok(())
}
