//! Access policies on the inbound side: may this peer do this to this workload?
//!
//! The control plane sends each proxy the AuthorizationPolicies that apply to its workload
//! (mesh-wide ones from the root namespace, then its namespace's, selected by labels). They are
//! evaluated as Istio evaluates them:
//!
//! 1. a request that matches any DENY policy is denied;
//! 2. otherwise, if no ALLOW policy applies to the workload, it is allowed;
//! 3. otherwise it is allowed only if it matches an ALLOW policy.
//!
//! AUDIT policies never change the decision; a match is reported so it can be logged and counted.
//! A policy matches when any of its rules does; a rule when any of its `from` (or none is given)
//! and any of its `to` (or none) match; a `from` or `to` when every field it sets matches, values
//! within a field being alternatives. `principals` and `namespaces` come from the peer's verified
//! SPIFFE ID, so they never match a plaintext request; `not_principals: ["*"]` therefore matches
//! exactly the requests without an identity.
//!
//! Opaque TCP has no method, path or host: an operation that asks for one does not match it in an
//! ALLOW policy, and in a DENY policy those fields are ignored (as in Istio: a DENY rule must not
//! be dodged by speaking TCP). This module only decides; it must never look at anything but the
//! verified peer, the connection and the request line.

use std::net::IpAddr;
use std::sync::Arc;

use http::Method;
use keel_proto::spiffe::SpiffeId;

use crate::config::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Operation, Source, StringPattern,
};

/// What is being authorized.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The client's verified identity (mTLS), if any.
    pub peer: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    /// The workload port the client asked for.
    pub port: u16,
    /// `None` for opaque TCP.
    pub http: Option<HttpAttempt<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpAttempt<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The Host or :authority, without a port.
    pub host: &'a str,
}

/// The outcome for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None` when allowed; else the reason, naming the policy where there is one.
    pub denied_by: Option<String>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.denied_by.is_none()
    }
}

/// Decides `attempt` under `policies`.
pub fn decide(policies: &[Arc<AuthorizationPolicy>], attempt: &Attempt<'_>) -> Verdict {
    let mut verdict = Verdict {
        denied_by: None,
        audited: Vec::new(),
    };
    if policies.is_empty() {
        return verdict;
    }
    let principal = attempt.peer.map(principal_of);
    let mut allow_policies = false;
    let mut allowed = false;
    for policy in policies {
        let action = policy.action;
        let matched = policy
            .rules
            .iter()
            .any(|rule| rule_matches(rule, action, attempt, principal.as_deref()));
        match action {
            AuthorizationAction::Deny if matched => {
                verdict.denied_by = Some(format!("DENY policy {}", policy.name));
                return verdict;
            }
            AuthorizationAction::Allow => {
                allow_policies = true;
                allowed |= matched;
            }
            AuthorizationAction::Audit if matched => verdict.audited.push(policy.name.clone()),
            _ => {}
        }
    }
    if allow_policies && !allowed {
        verdict.denied_by = Some("no ALLOW policy matches".to_owned());
    }
    verdict
}

/// `<td>/ns/<ns>/sa/<sa>`: a SPIFFE ID as policies name it, without the scheme.
fn principal_of(id: &SpiffeId) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain(),
        id.namespace(),
        id.service_account()
    )
}

fn any(patterns: &[StringPattern], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

/// A field that is set must match; an unset one matches anything.
fn field(patterns: &[StringPattern], value: Option<&str>) -> bool {
    patterns.is_empty() || any(patterns, value)
}

fn not_field(patterns: &[StringPattern], value: Option<&str>) -> bool {
    !any(patterns, value)
}

fn rule_matches(
    rule: &AuthorizationRule,
    action: AuthorizationAction,
    attempt: &Attempt<'_>,
    principal: Option<&str>,
) -> bool {
    let from = rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|s| source_matches(s, attempt, principal));
    let to = rule.to.is_empty()
        || rule
            .to
            .iter()
            .any(|o| operation_matches(o, action, attempt));
    from && to
}

fn source_matches(source: &Source, attempt: &Attempt<'_>, principal: Option<&str>) -> bool {
    let namespace = attempt.peer.map(SpiffeId::namespace);
    let ip = attempt.source_ip;
    field(&source.principals, principal)
        && not_field(&source.not_principals, principal)
        && field(&source.namespaces, namespace)
        && not_field(&source.not_namespaces, namespace)
        && (source.ip_blocks.is_empty() || source.ip_blocks.iter().any(|b| b.contains(&ip)))
        && !source.not_ip_blocks.iter().any(|b| b.contains(&ip))
}

fn operation_matches(op: &Operation, action: AuthorizationAction, attempt: &Attempt<'_>) -> bool {
    let port = attempt.port;
    let ports = (op.ports.is_empty() || op.ports.contains(&port)) && !op.not_ports.contains(&port);
    if !ports {
        return false;
    }
    let asks_http = !(op.methods.is_empty()
        && op.not_methods.is_empty()
        && op.paths.is_empty()
        && op.not_paths.is_empty()
        && op.hosts.is_empty()
        && op.not_hosts.is_empty());
    let Some(http) = attempt.http else {
        // Opaque TCP: HTTP fields never match in an ALLOW rule and are ignored in a DENY one.
        return !asks_http || action == AuthorizationAction::Deny;
    };
    let host = http.host.to_ascii_lowercase();
    (op.methods.is_empty() || op.methods.contains(http.method))
        && !op.not_methods.contains(http.method)
        && field(&op.paths, Some(http.path))
        && not_field(&op.not_paths, Some(http.path))
        && field(&op.hosts, Some(&host))
        && not_field(&op.not_hosts, Some(&host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn pattern(s: &str) -> StringPattern {
        if s == "*" {
            StringPattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StringPattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StringPattern::Suffix(p.to_owned())
        } else {
            StringPattern::Exact(s.to_owned())
        }
    }

    fn policy(
        name: &str,
        action: AuthorizationAction,
        rules: Vec<AuthorizationRule>,
    ) -> Arc<AuthorizationPolicy> {
        Arc::new(AuthorizationPolicy {
            name: format!("demo/{name}"),
            namespace: "demo".to_owned(),
            action,
            rules,
        })
    }

    fn from_principals(p: &[&str]) -> Source {
        Source {
            principals: p.iter().map(|s| pattern(s)).collect(),
            ..Source::default()
        }
    }

    fn to_methods_paths(m: &[Method], p: &[&str]) -> Operation {
        Operation {
            methods: m.to_vec(),
            paths: p.iter().map(|s| pattern(s)).collect(),
            ..Operation::default()
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("keel.local", "demo", sa).expect("id")
    }

    fn http<'a>(peer: Option<&'a SpiffeId>, method: &'a Method, path: &'a str) -> Attempt<'a> {
        Attempt {
            peer,
            source_ip: "10.0.0.2".parse().expect("ip"),
            port: 8080,
            http: Some(HttpAttempt {
                method,
                path,
                host: "articles.demo",
            }),
        }
    }

    #[test]
    fn no_policy_allows_everything() {
        let get = Method::GET;
        assert!(decide(&[], &http(None, &get, "/")).allowed());
    }

    #[test]
    fn allow_policies_are_an_allow_list() {
        let frontend = id("frontend");
        let other = id("other");
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        let policies = [policy(
            "articles-allow-frontend",
            AuthorizationAction::Allow,
            vec![AuthorizationRule {
                from: vec![from_principals(&["keel.local/ns/demo/sa/frontend"])],
                to: vec![to_methods_paths(
                    &[Method::GET, Method::POST],
                    &["/articles*"],
                )],
            }],
        )];
        assert!(decide(&policies, &http(Some(&frontend), &get, "/articles/1")).allowed());
        assert!(decide(&policies, &http(Some(&frontend), &post, "/articles")).allowed());
        for (peer, method, path) in [
            (Some(&frontend), &delete, "/articles/1"),
            (Some(&frontend), &get, "/admin"),
            (Some(&other), &get, "/articles/1"),
            (None, &get, "/articles/1"),
        ] {
            let verdict = decide(&policies, &http(peer, method, path));
            assert_eq!(
                verdict.denied_by.as_deref(),
                Some("no ALLOW policy matches"),
                "{peer:?} {method} {path}"
            );
        }
        // An ALLOW policy with no rule allows nothing; `rules: [{}]` allows everything.
        let nothing = [policy("nothing", AuthorizationAction::Allow, vec![])];
        assert!(!decide(&nothing, &http(Some(&frontend), &get, "/")).allowed());
        let everything = [policy(
            "everything",
            AuthorizationAction::Allow,
            vec![AuthorizationRule::default()],
        )];
        assert!(decide(&everything, &http(None, &get, "/")).allowed());
    }

    #[test]
    fn deny_wins_and_not_principals_star_means_unauthenticated() {
        let frontend = id("frontend");
        let get = Method::GET;
        let policies = [
            policy(
                "allow-all",
                AuthorizationAction::Allow,
                vec![AuthorizationRule::default()],
            ),
            policy(
                "deny-plaintext",
                AuthorizationAction::Deny,
                vec![AuthorizationRule {
                    from: vec![Source {
                        not_principals: vec![StringPattern::Any],
                        ..Source::default()
                    }],
                    to: vec![],
                }],
            ),
        ];
        assert!(decide(&policies, &http(Some(&frontend), &get, "/")).allowed());
        let verdict = decide(&policies, &http(None, &get, "/"));
        assert_eq!(
            verdict.denied_by.as_deref(),
            Some("DENY policy demo/deny-plaintext")
        );
        // principals ["*"] needs an identity.
        let any_authenticated = [policy(
            "authn",
            AuthorizationAction::Allow,
            vec![AuthorizationRule {
                from: vec![from_principals(&["*"])],
                to: vec![],
            }],
        )];
        assert!(decide(&any_authenticated, &http(Some(&frontend), &get, "/")).allowed());
        assert!(!decide(&any_authenticated, &http(None, &get, "/")).allowed());
    }

    #[test]
    fn tcp_does_not_dodge_deny_rules_nor_match_http_allow_rules() {
        let frontend = id("frontend");
        let tcp = Attempt {
            peer: Some(&frontend),
            source_ip: "10.0.0.2".parse().expect("ip"),
            port: 8080,
            http: None,
        };
        let deny_delete = [policy(
            "no-delete",
            AuthorizationAction::Deny,
            vec![AuthorizationRule {
                from: vec![],
                to: vec![to_methods_paths(&[Method::DELETE], &[])],
            }],
        )];
        assert!(!decide(&deny_delete, &tcp).allowed());
        let allow_get = [policy(
            "get",
            AuthorizationAction::Allow,
            vec![AuthorizationRule {
                from: vec![],
                to: vec![to_methods_paths(&[Method::GET], &[])],
            }],
        )];
        assert!(!decide(&allow_get, &tcp).allowed());
        let allow_port = [policy(
            "port",
            AuthorizationAction::Allow,
            vec![AuthorizationRule {
                from: vec![],
                to: vec![Operation {
                    ports: vec![8080],
                    ..Operation::default()
                }],
            }],
        )];
        assert!(decide(&allow_port, &tcp).allowed());
        assert!(!decide(&allow_port, &Attempt { port: 9090, ..tcp }).allowed());
    }

    #[test]
    fn namespaces_ip_blocks_hosts_and_audit() {
        let frontend = id("frontend");
        let get = Method::GET;
        let from_demo_subnet = [policy(
            "net",
            AuthorizationAction::Allow,
            vec![AuthorizationRule {
                from: vec![Source {
                    namespaces: vec![pattern("demo")],
                    ip_blocks: vec!["10.0.0.0/24".parse::<IpNet>().expect("net")],
                    ..Source::default()
                }],
                to: vec![Operation {
                    hosts: vec![pattern("articles.*")],
                    ..Operation::default()
                }],
            }],
        )];
        assert!(decide(&from_demo_subnet, &http(Some(&frontend), &get, "/")).allowed());
        let elsewhere = Attempt {
            source_ip: "10.9.0.2".parse().expect("ip"),
            ..http(Some(&frontend), &get, "/")
        };
        assert!(!decide(&from_demo_subnet, &elsewhere).allowed());
        let audit = [policy(
            "watch",
            AuthorizationAction::Audit,
            vec![AuthorizationRule::default()],
        )];
        let verdict = decide(&audit, &http(None, &get, "/"));
        assert!(verdict.allowed());
        assert_eq!(verdict.audited, vec!["demo/watch".to_owned()]);
    }
}
