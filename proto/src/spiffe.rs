//! SPIFFE IDs as keel uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Both sides of the contract parse identities with this one type: the control plane when it
//! signs, the proxy when it checks a peer's certificate. Parsing is strict (the SPIFFE ID spec's
//! character rules, keel's path shape), so two spellings of one identity cannot both pass.

use std::fmt;

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("`{0}` has an invalid trust domain: lower-case letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error(
        "`{0}` is not a keel workload identity: the path must be /ns/<namespace>/sa/<service-account>"
    )]
    Path(String),
    #[error("`{0}` has an invalid path segment: letters, digits, '.', '-' and '_' only")]
    Segment(String),
}

fn trust_domain_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl SpiffeId {
    /// The identity of `service_account` in `namespace`, checked like a parsed one.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The TLS server name a client sends (SNI) when it connects to this identity's sidecar:
    /// the inbound side recognises connections meant for it by this name (as Linkerd does),
    /// and passes any other TLS through to the application.
    pub fn server_name(&self) -> String {
        format!(
            "{}.{}.id.keel",
            self.service_account.to_ascii_lowercase().replace('_', "-"),
            self.namespace.to_ascii_lowercase().replace('_', "-")
        )
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !trust_domain_ok(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(s.to_owned()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = parts.as_slice() else {
            return Err(SpiffeIdError::Path(s.to_owned()));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(SpiffeIdError::Path(s.to_owned()));
        }
        if !segment_ok(namespace) || !segment_ok(service_account) {
            return Err(SpiffeIdError::Segment(s.to_owned()));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: (*namespace).to_owned(),
            service_account: (*service_account).to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_keel_identities() {
        let id: SpiffeId = "spiffe://keel.local/ns/demo/sa/articles"
            .parse()
            .expect("id");
        assert_eq!(id.trust_domain(), "keel.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "articles");
        assert_eq!(id.to_string(), "spiffe://keel.local/ns/demo/sa/articles");
        assert_eq!(id.server_name(), "articles.demo.id.keel");
        assert_eq!(
            SpiffeId::new("keel.local", "demo", "articles").expect("id"),
            id
        );
    }

    #[test]
    fn refuses_what_is_not_one() {
        for bad in [
            "https://keel.local/ns/demo/sa/a",
            "spiffe://Keel.Local/ns/demo/sa/a",
            "spiffe:///ns/demo/sa/a",
            "spiffe://keel.local",
            "spiffe://keel.local/ns/demo",
            "spiffe://keel.local/ns/demo/sa/a/extra",
            "spiffe://keel.local/namespace/demo/sa/a",
            "spiffe://keel.local/ns/demo/sa/",
            "spiffe://keel.local/ns/../sa/a",
            "spiffe://keel.local/ns/de mo/sa/a",
            "spiffe://keel.local:8080/ns/demo/sa/a",
            "spiffe://user@keel.local/ns/demo/sa/a",
            "spiffe://keel.local/ns/demo/sa/a?q",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }
}
