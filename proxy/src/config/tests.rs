//! Tests of decoding, validation, incremental application and lookup.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use keel_proto::v1::{self as pb, DiscoveryResponse, string_match::Kind};
use prost::Message;
use prost_types::Any;

use super::*;

// ---------------------------------------------------------------------------------------------
// Builders of proto resources.

fn encode<M: Message>(kind: ResourceKind, name: &str, version: &str, m: &M) -> pb::Resource {
    pb::Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(Any {
            type_url: kind.type_url().to_owned(),
            value: m.encode_to_vec(),
        }),
    }
}

fn response(
    kind: ResourceKind,
    resources: Vec<pb::Resource>,
    removed: &[&str],
) -> DiscoveryResponse {
    DiscoveryResponse {
        type_url: kind.type_url().to_owned(),
        system_version: "1".to_owned(),
        resources,
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        nonce: "n".to_owned(),
        incomplete: false,
        error_detail: None,
    }
}

fn port(port: u32, target_port: u32, protocol: pb::Protocol) -> pb::ServicePort {
    pb::ServicePort {
        name: format!("p{port}"),
        port,
        target_port,
        protocol: protocol as i32,
    }
}

fn service(ns: &str, name: &str, vips: &[&str], hostnames: &[&str]) -> pb::Service {
    pb::Service {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        hostnames: hostnames.iter().map(|s| (*s).to_owned()).collect(),
        vips: vips.iter().map(|s| (*s).to_owned()).collect(),
        ports: vec![
            port(80, 8080, pb::Protocol::Http),
            port(9000, 0, pb::Protocol::Tcp),
        ],
    }
}

fn services(list: &[(&str, pb::Service)]) -> DiscoveryResponse {
    response(
        ResourceKind::Service,
        list.iter()
            .map(|(version, s)| {
                encode(
                    ResourceKind::Service,
                    &format!("{}/{}", s.namespace, s.name),
                    version,
                    s,
                )
            })
            .collect(),
        &[],
    )
}

fn exact(s: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(Kind::Exact(s.to_owned())),
    })
}

fn prefix(s: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(Kind::Prefix(s.to_owned())),
    })
}

fn regex(s: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(Kind::Regex(s.to_owned())),
    })
}

fn to(service: &str, weight: u32) -> pb::WeightedDestination {
    pb::WeightedDestination {
        service: service.to_owned(),
        port: 0,
        weight,
    }
}

fn route(
    name: &str,
    m: Option<pb::RouteMatch>,
    destinations: Vec<pb::WeightedDestination>,
) -> pb::Route {
    pb::Route {
        name: name.to_owned(),
        r#match: m,
        destinations,
        timeout: None,
        retry: None,
    }
}

fn route_table(service: &str, routes: Vec<pb::Route>) -> DiscoveryResponse {
    let table = pb::RouteTable {
        service: service.to_owned(),
        routes,
    };
    response(
        ResourceKind::RouteTable,
        vec![encode(ResourceKind::RouteTable, service, "1", &table)],
        &[],
    )
}

fn endpoint(address: &str, port: u32) -> pb::Endpoint {
    pb::Endpoint {
        address: address.to_owned(),
        port,
        weight: 1,
        locality: Some(pb::Locality {
            region: "eu".to_owned(),
            zone: "eu-1".to_owned(),
            subzone: String::new(),
        }),
        identity: "spiffe://cluster.local/ns/demo/sa/articles".to_owned(),
        ready: true,
        workload: "demo/articles-1".to_owned(),
        meshed: true,
        mtls: true,
        labels: [("app".to_owned(), "articles".to_owned())].into(),
    }
}

fn endpoints(service: &str, version: &str, list: Vec<pb::Endpoint>) -> DiscoveryResponse {
    let e = pb::Endpoints {
        service: service.to_owned(),
        endpoints: list,
    };
    response(
        ResourceKind::Endpoints,
        vec![encode(ResourceKind::Endpoints, service, version, &e)],
        &[],
    )
}

fn policy(service: &str) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        service: service.to_owned(),
        ..Default::default()
    }
}

fn policies(p: pb::TrafficPolicy) -> DiscoveryResponse {
    let name = p.service.clone();
    response(
        ResourceKind::TrafficPolicy,
        vec![encode(ResourceKind::TrafficPolicy, &name, "1", &p)],
        &[],
    )
}

fn authz(p: pb::AuthorizationPolicy) -> DiscoveryResponse {
    let name = format!("{}/{}", p.namespace, p.name);
    response(
        ResourceKind::AuthorizationPolicy,
        vec![encode(ResourceKind::AuthorizationPolicy, &name, "1", &p)],
        &[],
    )
}

fn mesh() -> DiscoveryResponse {
    let m = pb::MeshConfig {
        trust_domain: "cluster.local".to_owned(),
        mtls_mode: pb::MtlsMode::Strict as i32,
        outbound_traffic_policy: pb::OutboundTrafficPolicy::RegistryOnly as i32,
        trust_anchors: Vec::new(),
        workload_labels: [("app".to_owned(), "frontend".to_owned())].into(),
    };
    response(
        ResourceKind::MeshConfig,
        vec![encode(ResourceKind::MeshConfig, "mesh", "1", &m)],
        &[],
    )
}

fn applied(builder: &mut ConfigBuilder, r: &DiscoveryResponse) -> Arc<Config> {
    match builder.apply(r) {
        Ok(a) => a.config,
        Err(e) => panic!("rejected: {e}"),
    }
}

fn rejected(builder: &mut ConfigBuilder, r: &DiscoveryResponse) -> ConfigError {
    let before = builder.current().clone();
    let error = builder.apply(r).expect_err("the response must be rejected");
    assert!(
        Arc::ptr_eq(&before, builder.current()),
        "a rejected response must leave the configuration as it was"
    );
    error
}

/// A builder that already holds `demo/articles` (VIP 10.96.0.10) and `demo/frontend`.
fn articles_and_frontend() -> ConfigBuilder {
    let mut b = ConfigBuilder::new("demo");
    applied(&mut b, &mesh());
    applied(
        &mut b,
        &services(&[
            (
                "1",
                service(
                    "demo",
                    "articles",
                    &["10.96.0.10"],
                    &[
                        "articles.demo.svc.cluster.local",
                        "articles.demo",
                        "articles",
                    ],
                ),
            ),
            (
                "1",
                service(
                    "demo",
                    "frontend",
                    &["10.96.0.11", "fd00::11"],
                    &["frontend"],
                ),
            ),
        ]),
    );
    b
}

/// Asserts an `Invalid` error: kind, resource name, field path, and the problem's class.
fn assert_invalid(
    error: &ConfigError,
    kind: ResourceKind,
    name: &str,
    field: &str,
    check: impl Fn(&Problem) -> bool,
) {
    match error {
        ConfigError::Invalid {
            kind: k,
            name: n,
            field: f,
            problem,
        } => {
            assert_eq!((*k, n.as_str(), f.as_str()), (kind, name, field), "{error}");
            assert!(check(problem), "unexpected problem: {error}");
            let text = error.to_string();
            assert!(
                text.contains(kind.as_str()) && text.contains(name) && text.contains(field),
                "the message names resource and field: {text}"
            );
        }
        other => panic!("expected an invalid field, got: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A good configuration.

#[test]
fn a_complete_configuration_is_typed_and_indexed() {
    let mut b = articles_and_frontend();
    applied(
        &mut b,
        &endpoints(
            "demo/articles",
            "1",
            vec![endpoint("10.0.0.5", 0), endpoint("10.0.0.6", 7070)],
        ),
    );
    let mut p = policy("demo/articles");
    p.load_balancer = pb::LoadBalancer::RingHash as i32;
    p.hash = Some(pb::HashPolicy {
        key: Some(pb::hash_policy::Key::Header("X-User".to_owned())),
    });
    p.connect_timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 500_000_000,
    });
    applied(&mut b, &policies(p));
    let config = applied(
        &mut b,
        &route_table(
            "demo/frontend",
            vec![route(
                "api",
                Some(pb::RouteMatch {
                    path: prefix("/api"),
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert!(config.generation() >= 4);
    assert_eq!(config.mesh().mtls_mode, MtlsMode::Strict);
    assert_eq!(
        config.mesh().outbound_traffic_policy,
        OutboundTrafficPolicy::RegistryOnly
    );
    let articles = config.service("demo/articles").expect("articles");
    assert_eq!(
        articles.service.ports[1].target_port, 9000,
        "unset target port is the port"
    );
    assert_eq!(articles.endpoints.endpoints.len(), 2);
    assert_eq!(articles.endpoints.endpoints[0].labels["app"], "articles");
    assert_eq!(config.mesh().workload_labels["app"], "frontend");
    assert_eq!(
        articles.traffic_policy.load_balancer,
        LoadBalancer::RingHash(HashOn::Header(http::HeaderName::from_static("x-user")))
    );
    assert_eq!(
        articles.traffic_policy.connect_timeout,
        Duration::from_millis(1500)
    );
    // No RouteTable for articles: an empty table; no policy for frontend: the defaults.
    assert!(articles.routes.routes.is_empty());
    let frontend = config.service("demo/frontend").expect("frontend");
    assert_eq!(
        *frontend.traffic_policy,
        TrafficPolicy::default_for("demo/frontend")
    );
    assert_eq!(frontend.routes.routes[0].name, "api");
    assert!(config.unresolved().is_empty(), "{:?}", config.unresolved());
}

#[test]
fn traffic_policy_defaults_fill_what_is_absent() {
    let mut b = articles_and_frontend();
    let mut p = policy("demo/articles");
    // Every field left out: none of them reads as 0.
    p.outlier_detection = Some(pb::OutlierDetection {
        success_rate: Some(pb::SuccessRateEjection::default()),
        failure_percentage: Some(pb::FailurePercentageEjection::default()),
        ..Default::default()
    });
    p.circuit_breaker = Some(pb::CircuitBreaker::default());
    p.retry_budget = Some(pb::RetryBudget::default());
    p.idle_timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 0,
    });
    let config = applied(&mut b, &policies(p.clone()));
    let policy = &config
        .service("demo/articles")
        .expect("articles")
        .traffic_policy;
    let outlier = policy
        .outlier_detection
        .as_ref()
        .expect("outlier detection");
    assert_eq!(outlier.interval, OutlierDetection::DEFAULT_INTERVAL);
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.max_ejection_time, Duration::from_secs(300));
    // The mesh model's defaults, not "off": 5 consecutive 5xx, no cap, Envoy's panic threshold.
    assert_eq!(outlier.consecutive_5xx, 5);
    assert_eq!(outlier.consecutive_gateway_errors, 0);
    assert_eq!(outlier.max_ejection_percent, 100);
    assert_eq!(outlier.min_health_percent, 50);
    assert_eq!(outlier.success_rate, Some(SuccessRateEjection::default()));
    assert_eq!(
        outlier.success_rate.as_ref().map(|s| s.stdev_factor),
        Some(1.9)
    );
    assert_eq!(
        outlier.failure_percentage,
        Some(FailurePercentageEjection {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50
        })
    );
    // An empty breaker message is Envoy's limits, not limits of 0 that refuse everything.
    assert_eq!(policy.circuit_breaker, CircuitBreaker::default());
    assert_eq!(policy.circuit_breaker.max_connections, 1024);
    assert_eq!(
        policy.connect_timeout,
        TrafficPolicy::DEFAULT_CONNECT_TIMEOUT
    );
    assert_eq!(policy.idle_timeout, None, "a zero idle timeout means never");
    assert_eq!(policy.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(policy.retry_budget, RetryBudget::default());
    assert_eq!(policy.circuit_breaker.max_retries, u32::MAX);

    let versioned = |p: &pb::TrafficPolicy, version: &str| {
        response(
            ResourceKind::TrafficPolicy,
            vec![encode(ResourceKind::TrafficPolicy, &p.service, version, p)],
            &[],
        )
    };
    // Said explicitly, 0 is 0: the detectors and panic are off, no limit is left at its default.
    p.outlier_detection = Some(pb::OutlierDetection {
        consecutive_5xx: Some(0),
        max_ejection_percent: Some(0),
        min_health_percent: Some(0),
        ..Default::default()
    });
    p.circuit_breaker = Some(pb::CircuitBreaker {
        max_retries: Some(0),
        ..Default::default()
    });
    p.retry_budget = Some(pb::RetryBudget {
        percent: Some(50),
        min_retries_per_second: Some(1),
        ttl: None,
    });
    let config = applied(&mut b, &versioned(&p, "2"));
    let policy = &config
        .service("demo/articles")
        .expect("articles")
        .traffic_policy;
    let outlier = policy.outlier_detection.as_ref().expect("outlier");
    assert_eq!(
        (
            outlier.consecutive_5xx,
            outlier.max_ejection_percent,
            outlier.min_health_percent
        ),
        (0, 0, 0)
    );
    assert_eq!(policy.circuit_breaker.max_retries, 0);
    assert_eq!(policy.circuit_breaker.max_requests, 1024);
    let budget = &config
        .service("demo/articles")
        .expect("articles")
        .traffic_policy
        .retry_budget;
    assert_eq!((budget.percent, budget.min_retries_per_second), (50, 1));
    assert_eq!(budget.ttl, RetryBudget::DEFAULT_TTL);
    p.retry_budget = Some(pb::RetryBudget {
        percent: Some(101),
        min_retries_per_second: Some(1),
        ttl: None,
    });
    let e = rejected(&mut b, &versioned(&p, "3"));
    assert_invalid(
        &e,
        ResourceKind::TrafficPolicy,
        "demo/articles",
        "retry_budget.percent",
        |p| matches!(p, Problem::OutOfRange { value: 101, .. }),
    );
}

#[test]
fn authorization_policies_are_parsed() {
    let mut b = ConfigBuilder::new("demo");
    let config = applied(
        &mut b,
        &authz(pb::AuthorizationPolicy {
            name: "allow-frontend".to_owned(),
            namespace: "demo".to_owned(),
            action: pb::AuthorizationAction::Allow as i32,
            rules: vec![pb::AuthorizationRule {
                from: vec![pb::Source {
                    principals: vec!["cluster.local/ns/demo/sa/frontend".to_owned()],
                    namespaces: vec!["prod-*".to_owned(), "*".to_owned()],
                    ip_blocks: vec!["10.0.0.0/8".to_owned(), "192.168.1.1".to_owned()],
                    ..Default::default()
                }],
                to: vec![pb::Operation {
                    methods: vec!["GET".to_owned()],
                    paths: vec!["/articles*".to_owned(), "*.json".to_owned()],
                    ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }),
    );
    let policies = config.authorization_policies();
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(
        (p.name.as_str(), p.action),
        ("demo/allow-frontend", AuthorizationAction::Allow)
    );
    let source = &p.rules[0].from[0];
    assert_eq!(
        source.namespaces[0],
        StringPattern::Prefix("prod-".to_owned())
    );
    assert_eq!(source.namespaces[1], StringPattern::Any);
    assert_eq!(source.ip_blocks[1].to_string(), "192.168.1.1/32");
    let op = &p.rules[0].to[0];
    assert_eq!(op.methods, [Method::GET]);
    assert!(op.paths[1].matches("/a/b.json"));
    assert!(!op.paths[0].matches("/comments"));
}

// ---------------------------------------------------------------------------------------------
// Each class of error names the resource, the field and the reason.

#[test]
fn a_bad_ip_address_is_rejected() {
    let mut b = ConfigBuilder::new("demo");
    let e = rejected(
        &mut b,
        &services(&[("1", service("demo", "a", &["10.0.0.300"], &[]))]),
    );
    assert_invalid(
        &e,
        ResourceKind::Service,
        "demo/a",
        "vips[0]",
        |p| matches!(p, Problem::BadIp { value } if value == "10.0.0.300"),
    );

    let e = rejected(
        &mut b,
        &endpoints(
            "demo/a",
            "1",
            vec![endpoint("10.0.0.5", 0), endpoint("nope", 0)],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::Endpoints,
        "demo/a",
        "endpoints[1].address",
        |p| matches!(p, Problem::BadIp { .. }),
    );

    let e = rejected(
        &mut b,
        &endpoints("demo/a", "1", vec![endpoint("0.0.0.0", 0)]),
    );
    assert_invalid(
        &e,
        ResourceKind::Endpoints,
        "demo/a",
        "endpoints[0].address",
        |p| matches!(p, Problem::NotUnicast { .. }),
    );
}

#[test]
fn ports_out_of_range_are_rejected() {
    let mut b = ConfigBuilder::new("demo");
    let mut s = service("demo", "a", &[], &[]);
    s.ports[0].port = 0;
    let e = rejected(&mut b, &services(&[("1", s)]));
    assert_invalid(&e, ResourceKind::Service, "demo/a", "ports[0].port", |p| {
        *p == Problem::BadPort { value: 0 }
    });

    let mut s = service("demo", "a", &[], &[]);
    s.ports[1].target_port = 70000;
    let e = rejected(&mut b, &services(&[("1", s)]));
    assert_invalid(
        &e,
        ResourceKind::Service,
        "demo/a",
        "ports[1].target_port",
        |p| *p == Problem::BadPort { value: 70000 },
    );

    let e = rejected(
        &mut b,
        &endpoints("demo/a", "1", vec![endpoint("10.0.0.5", 65536)]),
    );
    assert_invalid(
        &e,
        ResourceKind::Endpoints,
        "demo/a",
        "endpoints[0].port",
        |p| matches!(p, Problem::BadPort { .. }),
    );

    let mut s = service("demo", "a", &[], &[]);
    s.ports[1].port = 80;
    let e = rejected(&mut b, &services(&[("1", s)]));
    assert_invalid(&e, ResourceKind::Service, "demo/a", "ports[1].port", |p| {
        matches!(p, Problem::Duplicate { .. })
    });
}

#[test]
fn a_regex_that_does_not_compile_is_rejected() {
    let mut b = articles_and_frontend();
    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![route(
                "broken",
                Some(pb::RouteMatch {
                    path: regex("/articles/(\\d+"),
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].match.path.regex",
        |p| matches!(p, Problem::BadRegex { pattern, .. } if pattern == "/articles/(\\d+"),
    );
    assert!(!e.to_string().contains('\n'));

    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![route(
                "header",
                Some(pb::RouteMatch {
                    headers: vec![pb::HeaderMatch {
                        name: "x-version".to_owned(),
                        value: regex("v[0-9"),
                        invert: false,
                    }],
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].match.headers[0].value.regex",
        |p| matches!(p, Problem::BadRegex { .. }),
    );
}

#[test]
fn weights_that_add_up_to_zero_are_rejected() {
    let mut b = articles_and_frontend();
    let e = rejected(
        &mut b,
        &route_table(
            "demo/frontend",
            vec![route(
                "split",
                None,
                vec![to("demo/articles", 0), to("demo/frontend", 0)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/frontend",
        "routes[0].destinations",
        |p| *p == Problem::ZeroWeights,
    );
    let e = rejected(
        &mut b,
        &route_table("demo/frontend", vec![route("none", None, vec![])]),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/frontend",
        "routes[0].destinations",
        |p| *p == Problem::Empty,
    );
}

#[test]
fn unknown_enum_values_are_rejected() {
    let mut b = ConfigBuilder::new("demo");
    let mut s = service("demo", "a", &[], &[]);
    s.ports[0].protocol = 99;
    let e = rejected(&mut b, &services(&[("1", s)]));
    assert_invalid(
        &e,
        ResourceKind::Service,
        "demo/a",
        "ports[0].protocol",
        |p| {
            *p == Problem::UnknownEnum {
                what: "Protocol",
                value: 99,
            }
        },
    );

    let mut p = policy("demo/a");
    p.load_balancer = 42;
    let e = rejected(&mut b, &policies(p));
    assert_invalid(
        &e,
        ResourceKind::TrafficPolicy,
        "demo/a",
        "load_balancer",
        |p| matches!(p, Problem::UnknownEnum { value: 42, .. }),
    );

    let mut m = pb::MeshConfig {
        trust_domain: "cluster.local".to_owned(),
        ..Default::default()
    };
    m.mtls_mode = 7;
    let r = response(
        ResourceKind::MeshConfig,
        vec![encode(ResourceKind::MeshConfig, "mesh", "1", &m)],
        &[],
    );
    let e = rejected(&mut b, &r);
    assert_invalid(&e, ResourceKind::MeshConfig, "mesh", "mtls_mode", |p| {
        matches!(p, Problem::UnknownEnum { .. })
    });

    let mut b = articles_and_frontend();
    let mut r = route("retry", None, vec![to("demo/articles", 1)]);
    r.retry = Some(pb::RetryPolicy {
        retry_on: vec!["5xx".to_owned(), "sometimes".to_owned()],
        ..Default::default()
    });
    let e = rejected(&mut b, &route_table("demo/articles", vec![r]));
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].retry.retry_on[1]",
        |p| matches!(p, Problem::UnknownName { value, .. } if value == "sometimes"),
    );

    // Retrying non-idempotent requests with only connect-failure (which already covers every
    // method) changes nothing: refused as inconsistent.
    let mut b = articles_and_frontend();
    let mut r = route("retry", None, vec![to("demo/articles", 1)]);
    r.retry = Some(pb::RetryPolicy {
        retry_on: vec!["connect-failure".to_owned()],
        retry_non_idempotent: true,
        ..Default::default()
    });
    let e = rejected(&mut b, &route_table("demo/articles", vec![r]));
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].retry.retry_non_idempotent",
        |p| matches!(p, Problem::Inconsistent { .. }),
    );

    // A retry policy without attempts retries once (the mesh model's default), not never.
    let mut b = articles_and_frontend();
    let mut r = route("retry", None, vec![to("demo/articles", 1)]);
    r.retry = Some(pb::RetryPolicy::default());
    let config = applied(&mut b, &route_table("demo/articles", vec![r]));
    let articles = config.service("demo/articles").expect("articles");
    let retry = articles.routes.routes[0].retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, RetryPolicy::DEFAULT_ATTEMPTS);
    assert_eq!(retry.attempts, 1);
}

#[test]
fn missing_required_fields_are_rejected() {
    let mut b = articles_and_frontend();
    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![route(
                "no-kind",
                Some(pb::RouteMatch {
                    path: Some(pb::StringMatch { kind: None }),
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].match.path",
        |p| *p == Problem::Missing,
    );

    let mut p = policy("demo/articles");
    p.load_balancer = pb::LoadBalancer::Maglev as i32;
    let e = rejected(&mut b, &policies(p));
    assert_invalid(
        &e,
        ResourceKind::TrafficPolicy,
        "demo/articles",
        "hash",
        |p| *p == Problem::Missing,
    );

    let mut s = service("demo", "a", &[], &[]);
    s.ports.clear();
    let e = rejected(&mut b, &services(&[("1", s)]));
    assert_invalid(&e, ResourceKind::Service, "demo/a", "ports", |p| {
        *p == Problem::Empty
    });

    let e = rejected(
        &mut b,
        &authz(pb::AuthorizationPolicy {
            name: "p".to_owned(),
            namespace: "demo".to_owned(),
            action: 0,
            rules: vec![pb::AuthorizationRule {
                from: vec![pb::Source::default()],
                to: vec![],
            }],
        }),
    );
    assert_invalid(
        &e,
        ResourceKind::AuthorizationPolicy,
        "demo/p",
        "rules[0].from[0]",
        |p| *p == Problem::Empty,
    );
}

#[test]
fn names_must_agree_with_bodies() {
    let mut b = ConfigBuilder::new("demo");
    let s = service("demo", "a", &[], &[]);
    let r = response(
        ResourceKind::Service,
        vec![encode(ResourceKind::Service, "demo/b", "1", &s)],
        &[],
    );
    let e = rejected(&mut b, &r);
    assert_invalid(
        &e,
        ResourceKind::Service,
        "demo/b",
        "name",
        |p| matches!(p, Problem::NameMismatch { found, .. } if found == "demo/a"),
    );

    let e = rejected(
        &mut b,
        &endpoints("demo/a", "1", vec![]).with_name("demo/other"),
    );
    assert_invalid(&e, ResourceKind::Endpoints, "demo/other", "service", |p| {
        matches!(p, Problem::NameMismatch { .. })
    });

    let m = pb::MeshConfig {
        trust_domain: "cluster.local".to_owned(),
        ..Default::default()
    };
    let r = response(
        ResourceKind::MeshConfig,
        vec![encode(ResourceKind::MeshConfig, "other", "1", &m)],
        &[],
    );
    assert_invalid(
        &rejected(&mut b, &r),
        ResourceKind::MeshConfig,
        "other",
        "name",
        |p| matches!(p, Problem::Malformed { .. }),
    );

    let e = rejected(&mut b, &route_table("frontend", vec![]));
    assert_invalid(&e, ResourceKind::RouteTable, "frontend", "service", |p| {
        matches!(p, Problem::Malformed { .. })
    });
}

#[test]
fn other_malformed_values_are_rejected() {
    let mut b = articles_and_frontend();
    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![route(
                "m",
                Some(pb::RouteMatch {
                    method: "GE T".to_owned(),
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].match.method",
        |p| matches!(p, Problem::BadMethod { .. }),
    );

    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![route(
                "p",
                Some(pb::RouteMatch {
                    path: exact("articles"),
                    ..Default::default()
                }),
                vec![to("demo/articles", 1)],
            )],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[0].match.path",
        |p| matches!(p, Problem::Malformed { .. }),
    );

    let e = rejected(
        &mut b,
        &route_table(
            "demo/articles",
            vec![
                route("same", None, vec![to("demo/articles", 1)]),
                route("same", None, vec![to("demo/articles", 1)]),
            ],
        ),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/articles",
        "routes[1].name",
        |p| matches!(p, Problem::Duplicate { .. }),
    );

    for bad in [
        "cluster.local/ns/demo/sa/x",
        "spiffe://cluster.local/workload/x",
        "spiffe://cluster.local/ns/demo/sa/x/y",
    ] {
        let mut bad_identity = endpoint("10.0.0.5", 0);
        bad_identity.identity = bad.to_owned();
        let e = rejected(&mut b, &endpoints("demo/articles", "2", vec![bad_identity]));
        assert_invalid(
            &e,
            ResourceKind::Endpoints,
            "demo/articles",
            "endpoints[0].identity",
            |p| matches!(p, Problem::Malformed { .. }),
        );
    }
    let mut mtls_without_identity = endpoint("10.0.0.5", 0);
    mtls_without_identity.identity = String::new();
    let e = rejected(
        &mut b,
        &endpoints("demo/articles", "2", vec![mtls_without_identity]),
    );
    assert_invalid(
        &e,
        ResourceKind::Endpoints,
        "demo/articles",
        "endpoints[0].identity",
        |p| matches!(p, Problem::Inconsistent { .. }),
    );

    let e = rejected(
        &mut b,
        &authz(pb::AuthorizationPolicy {
            name: "p".to_owned(),
            namespace: "demo".to_owned(),
            action: 1,
            rules: vec![pb::AuthorizationRule {
                from: vec![pb::Source {
                    ip_blocks: vec!["10.0.0.0/33".to_owned()],
                    ..Default::default()
                }],
                to: vec![],
            }],
        }),
    );
    assert_invalid(
        &e,
        ResourceKind::AuthorizationPolicy,
        "demo/p",
        "rules[0].from[0].ip_blocks[0]",
        |p| matches!(p, Problem::BadCidr { .. }),
    );

    let mut p = policy("demo/articles");
    p.connect_timeout = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let e = rejected(&mut b, &policies(p));
    assert_invalid(
        &e,
        ResourceKind::TrafficPolicy,
        "demo/articles",
        "connect_timeout",
        |p| matches!(p, Problem::BadDuration { .. }),
    );

    // A duration the control plane should never send, but which would overflow `now + interval`
    // in the balancer: refused, whatever sent it.
    let mut p = policy("demo/articles");
    p.outlier_detection = Some(pb::OutlierDetection {
        interval: Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        }),
        ..Default::default()
    });
    let e = rejected(&mut b, &policies(p));
    assert_invalid(
        &e,
        ResourceKind::TrafficPolicy,
        "demo/articles",
        "outlier_detection.interval",
        |p| matches!(p, Problem::BadDuration { reason } if reason.contains("longer than")),
    );
    let mut p = policy("demo/articles");
    p.outlier_detection = Some(pb::OutlierDetection {
        interval: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    });
    // An hour is within the ceiling.
    applied(&mut b, &policies(p));
}

#[test]
fn undecodable_resources_are_rejected_by_name() {
    let mut b = ConfigBuilder::new("demo");
    let broken = pb::Resource {
        name: "demo/a".to_owned(),
        version: "1".to_owned(),
        resource: Some(Any {
            type_url: ResourceKind::Service.type_url().to_owned(),
            value: vec![0x0a, 0xff, 0x01],
        }),
    };
    let e = rejected(&mut b, &response(ResourceKind::Service, vec![broken], &[]));
    assert!(
        matches!(&e, ConfigError::Decode { kind: ResourceKind::Service, name, .. } if name == "demo/a"),
        "{e}"
    );

    let s = service("demo", "a", &[], &[]);
    let mut wrong = encode(ResourceKind::Endpoints, "demo/a", "1", &s);
    let e = rejected(
        &mut b,
        &response(ResourceKind::Service, vec![wrong.clone()], &[]),
    );
    assert!(
        matches!(&e, ConfigError::WrongType { name, found, .. } if name == "demo/a" && found.ends_with("Endpoints")),
        "{e}"
    );

    wrong.resource = None;
    let e = rejected(&mut b, &response(ResourceKind::Service, vec![wrong], &[]));
    assert!(matches!(&e, ConfigError::MissingBody { .. }), "{e}");

    let mut r = response(ResourceKind::Service, vec![], &[]);
    r.type_url = "type.googleapis.com/keel.mesh.v1.Nope".to_owned();
    assert!(matches!(
        rejected(&mut b, &r),
        ConfigError::UnknownType { .. }
    ));
}

#[test]
fn a_response_contradicting_itself_is_rejected() {
    let mut b = ConfigBuilder::new("demo");
    let s = service("demo", "a", &[], &[]);
    let twice = response(
        ResourceKind::Service,
        vec![
            encode(ResourceKind::Service, "demo/a", "1", &s),
            encode(ResourceKind::Service, "demo/a", "2", &s),
        ],
        &[],
    );
    assert!(matches!(
        rejected(&mut b, &twice),
        ConfigError::DuplicateResource { .. }
    ));
    let both = response(
        ResourceKind::Service,
        vec![encode(ResourceKind::Service, "demo/a", "1", &s)],
        &["demo/a"],
    );
    assert!(matches!(
        rejected(&mut b, &both),
        ConfigError::ChangedAndRemoved { .. }
    ));
}

#[test]
fn two_services_claiming_one_vip_and_port_conflict() {
    let mut b = articles_and_frontend();
    let e = rejected(
        &mut b,
        &services(&[("1", service("demo", "zz", &["10.96.0.10"], &[]))]),
    );
    match &e {
        ConfigError::Conflict {
            first,
            second,
            what,
            ..
        } => {
            assert_eq!(
                (first.as_str(), second.as_str()),
                ("demo/articles", "demo/zz")
            );
            assert!(what.contains("10.96.0.10:80"), "{what}");
        }
        other => panic!("expected a conflict, got {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental application.

#[test]
fn incremental_add_change_and_remove() {
    let mut b = articles_and_frontend();
    let g0 = b.current().generation();

    // Add.
    let config = applied(
        &mut b,
        &services(&[("1", service("demo", "comments", &["10.96.0.12"], &[]))]),
    );
    assert_eq!(config.generation(), g0 + 1);
    assert_eq!(config.services().count(), 3);
    assert!(
        config.service("demo/articles").is_some(),
        "unmentioned services are kept"
    );

    // Change: a new version replaces the old one.
    let config = applied(
        &mut b,
        &services(&[("2", service("demo", "comments", &["10.96.0.13"], &[]))]),
    );
    assert!(
        config
            .by_addr("10.96.0.12:80".parse().expect("addr"))
            .is_none()
    );
    assert_eq!(
        config
            .by_addr("10.96.0.13:80".parse().expect("addr"))
            .map(|t| t.service.name()),
        Some("demo/comments")
    );
    assert_eq!(
        config.versions()[&ResourceKind::Service].resources["demo/comments"],
        "2"
    );

    // The same version again: nothing changes, no new generation.
    let again = b
        .apply(&services(&[(
            "2",
            service("demo", "comments", &["10.96.0.13"], &[]),
        )]))
        .expect("applies");
    assert!(!again.changed);
    assert_eq!(again.config.generation(), config.generation());

    // Remove (and removing a name not held is harmless).
    let config = applied(
        &mut b,
        &response(
            ResourceKind::Service,
            vec![],
            &["demo/comments", "demo/never"],
        ),
    );
    assert!(config.service("demo/comments").is_none());
    assert_eq!(config.services().count(), 2);
    assert!(
        !b.versions(ResourceKind::Service)
            .contains_key("demo/comments")
    );
}

#[test]
fn a_rejected_update_leaves_the_previous_config_in_place() {
    let mut b = articles_and_frontend();
    applied(
        &mut b,
        &endpoints("demo/articles", "1", vec![endpoint("10.0.0.5", 0)]),
    );
    let before = b.current().clone();

    // The response carries a good change and a bad one: neither is applied.
    let good = pb::Endpoints {
        service: "demo/frontend".to_owned(),
        endpoints: vec![endpoint("10.0.0.9", 0)],
    };
    let bad = pb::Endpoints {
        service: "demo/articles".to_owned(),
        endpoints: vec![endpoint("10.0.0.500", 0)],
    };
    let r = response(
        ResourceKind::Endpoints,
        vec![
            encode(ResourceKind::Endpoints, "demo/frontend", "1", &good),
            encode(ResourceKind::Endpoints, "demo/articles", "2", &bad),
        ],
        &[],
    );
    rejected(&mut b, &r);
    assert!(Arc::ptr_eq(&before, b.current()));
    assert_eq!(
        b.versions(ResourceKind::Endpoints)
            .get("demo/articles")
            .map(String::as_str),
        Some("1")
    );
    assert!(
        !b.versions(ResourceKind::Endpoints)
            .contains_key("demo/frontend")
    );

    // The next good update applies on top of the last good state, not the rejected one.
    let config = applied(
        &mut b,
        &endpoints("demo/frontend", "1", vec![endpoint("10.0.0.9", 0)]),
    );
    let articles = config.service("demo/articles").expect("articles");
    assert_eq!(
        articles.endpoints.endpoints[0].address.to_string(),
        "10.0.0.5"
    );
    assert_eq!(config.generation(), before.generation() + 1);
}

#[test]
fn completeness_needs_a_response_of_every_type() {
    let mut b = ConfigBuilder::new("demo");
    for kind in ResourceKind::ALL {
        assert!(!b.is_complete());
        let applied = b
            .apply(&response(kind, vec![], &[]))
            .expect("empty responses apply");
        assert!(!applied.changed);
        assert!(b.has_received(kind));
    }
    assert!(b.is_complete());
}

#[test]
fn an_incomplete_response_is_only_part_of_a_type() {
    let mut b = ConfigBuilder::new("demo");
    let mut first = mesh();
    first.incomplete = true;
    b.apply(&first).expect("applies");
    assert!(!b.has_received(ResourceKind::MeshConfig));
    b.apply(&response(ResourceKind::MeshConfig, vec![], &[]))
        .expect("applies");
    assert!(b.has_received(ResourceKind::MeshConfig));
}

#[test]
fn references_that_do_not_resolve_are_listed_not_rejected() {
    // A RouteTable may arrive before the Service it routes to (one response per type in
    // flight), so a missing destination is not a reason to reject it.
    let mut b = articles_and_frontend();
    let config = applied(
        &mut b,
        &route_table(
            "demo/frontend",
            vec![route("next", None, vec![to("demo/reviews", 1)])],
        ),
    );
    assert_eq!(
        config.unresolved(),
        [Unresolved::MissingDestination {
            service: "demo/frontend".to_owned(),
            route: "next".to_owned(),
            destination: "demo/reviews".to_owned(),
        }]
    );
    let config = applied(
        &mut b,
        &endpoints("demo/reviews", "1", vec![endpoint("10.0.0.7", 0)]),
    );
    assert!(config.unresolved().contains(&Unresolved::NoSuchService {
        kind: ResourceKind::Endpoints,
        name: "demo/reviews".to_owned(),
    }));
    // Once the service arrives, everything resolves and its endpoints are joined.
    let config = applied(
        &mut b,
        &services(&[("1", service("demo", "reviews", &[], &[]))]),
    );
    assert!(config.unresolved().is_empty(), "{:?}", config.unresolved());
    assert_eq!(
        config
            .service("demo/reviews")
            .expect("reviews")
            .endpoints
            .endpoints
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Lookup.

#[test]
fn lookup_by_vip_and_port() {
    let config = articles_and_frontend().current().clone();
    let addr: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let target = config.by_addr(addr).expect("articles on 80");
    assert_eq!(
        (
            target.service.name(),
            target.port.port,
            target.port.target_port
        ),
        ("demo/articles", 80, 8080)
    );
    assert_eq!(
        config
            .by_addr("10.96.0.10:9000".parse().expect("addr"))
            .map(|t| t.port.protocol),
        Some(Protocol::Tcp)
    );
    assert!(
        config
            .by_addr("10.96.0.10:81".parse().expect("addr"))
            .is_none()
    );
    assert_eq!(
        config
            .by_addr("[fd00::11]:80".parse().expect("addr"))
            .map(|t| t.service.name()),
        Some("demo/frontend")
    );
}

#[test]
fn lookup_by_host_header_with_and_without_port() {
    let config = articles_and_frontend().current().clone();
    let name = |authority: &str, default_port: u16| {
        config
            .by_authority(authority, default_port)
            .map(|t| (t.service.name().to_owned(), t.port.port))
    };
    let articles_80 = Some(("demo/articles".to_owned(), 80));
    assert_eq!(name("articles.demo.svc.cluster.local", 80), articles_80);
    assert_eq!(
        name("articles.demo.svc.cluster.local:80", 9000),
        articles_80
    );
    assert_eq!(name("articles", 80), articles_80);
    assert_eq!(
        name("Articles.Demo.", 80),
        articles_80,
        "case and trailing dot are ignored"
    );
    assert_eq!(
        name("articles:9000", 80),
        Some(("demo/articles".to_owned(), 9000))
    );
    assert_eq!(
        name("articles:8080", 80),
        None,
        "a port the service does not have"
    );
    assert_eq!(name("reviews", 80), None);
    assert_eq!(
        name("10.96.0.10:80", 1),
        articles_80,
        "an IP literal is a VIP"
    );
    assert_eq!(name("10.96.0.10", 80), articles_80);
    assert_eq!(
        name("[fd00::11]:80", 1).map(|t| t.0),
        Some("demo/frontend".to_owned())
    );
    assert_eq!(
        name("[fd00::11]", 80).map(|t| t.0),
        Some("demo/frontend".to_owned())
    );
    assert_eq!(
        name("fd00::11", 80).map(|t| t.0),
        Some("demo/frontend".to_owned())
    );
    assert_eq!(name("articles:notaport", 80), None);
    assert_eq!(name("", 80), None);
    assert_eq!(name(":80", 80), None);
}

#[test]
fn a_short_hostname_prefers_the_proxys_namespace() {
    let mut b = ConfigBuilder::new("demo");
    let config = applied(
        &mut b,
        &services(&[
            ("1", service("demo", "articles", &[], &["articles"])),
            ("1", service("prod", "articles", &[], &["articles"])),
            ("1", service("a", "reviews", &[], &["reviews"])),
            ("1", service("b", "reviews", &[], &["reviews"])),
        ]),
    );
    assert_eq!(
        config.by_host("articles", 80).map(|t| t.service.name()),
        Some("demo/articles")
    );
    assert!(
        config.by_host("reviews", 80).is_none(),
        "ambiguous elsewhere: not guessed"
    );
    assert!(config.unresolved().iter().any(|u| matches!(
        u,
        Unresolved::AmbiguousHost { host, port: 80, .. } if host == "reviews"
    )));
}

#[test]
fn routes_match_in_order() {
    let mut b = articles_and_frontend();
    let table = vec![
        route(
            "admin-post",
            Some(pb::RouteMatch {
                path: prefix("/admin"),
                method: "POST".to_owned(),
                ..Default::default()
            }),
            vec![to("demo/frontend", 1)],
        ),
        route(
            "article-by-id",
            Some(pb::RouteMatch {
                path: regex("/articles/[0-9]+"),
                ..Default::default()
            }),
            vec![to("demo/articles", 1)],
        ),
        route(
            "canary",
            Some(pb::RouteMatch {
                headers: vec![pb::HeaderMatch {
                    name: "x-canary".to_owned(),
                    value: exact("true"),
                    invert: false,
                }],
                ..Default::default()
            }),
            vec![to("demo/articles", 1)],
        ),
        route(
            "not-internal",
            Some(pb::RouteMatch {
                headers: vec![pb::HeaderMatch {
                    name: "x-internal".to_owned(),
                    value: prefix("yes"),
                    invert: true,
                }],
                ..Default::default()
            }),
            vec![to("demo/articles", 1)],
        ),
        route("catch-all", None, vec![to("demo/articles", 1)]),
    ];
    let config = applied(&mut b, &route_table("demo/frontend", table));
    let routes = &config.service("demo/frontend").expect("frontend").routes;
    let headers = |pairs: &[(&'static str, &'static str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    };
    let pick = |method: Method, path: &str, h: &HeaderMap| {
        routes
            .select(None, &method, path, h)
            .map(|r| r.name.as_str())
    };
    let internal = headers(&[("x-internal", "yes-really")]);

    assert_eq!(
        pick(Method::POST, "/admin/users", &internal),
        Some("admin-post")
    );
    assert_eq!(
        pick(Method::GET, "/admin/users", &internal),
        Some("catch-all")
    );
    assert_eq!(
        pick(Method::GET, "/articles/42", &internal),
        Some("article-by-id")
    );
    // The regex is anchored: it must match the whole path.
    assert_eq!(
        pick(Method::GET, "/articles/42/comments", &internal),
        Some("catch-all")
    );
    assert_eq!(
        pick(
            Method::GET,
            "/x",
            &headers(&[("x-canary", "true"), ("x-internal", "yes")])
        ),
        Some("canary")
    );
    // An inverted match holds when the header is absent or does not match.
    assert_eq!(
        pick(Method::GET, "/x", &HeaderMap::new()),
        Some("not-internal")
    );
    assert_eq!(
        pick(Method::GET, "/x", &headers(&[("x-internal", "no")])),
        Some("not-internal")
    );

    let empty = RouteTable::empty("demo/articles");
    assert!(
        empty
            .select(None, &Method::GET, "/", &HeaderMap::new())
            .is_none()
    );
}

#[test]
fn routes_match_the_request_host() {
    let mut b = articles_and_frontend();
    let table = vec![
        route(
            "legacy",
            Some(pb::RouteMatch {
                hosts: vec!["legacy.example.com".to_owned()],
                ..Default::default()
            }),
            vec![to("demo/frontend", 1)],
        ),
        route("rest", None, vec![to("demo/articles", 1)]),
    ];
    let config = applied(&mut b, &route_table("demo/frontend", table));
    let routes = &config.service("demo/frontend").expect("frontend").routes;
    let pick = |authority: Option<&str>| {
        routes
            .select(authority, &Method::GET, "/", &HeaderMap::new())
            .map(|r| r.name.as_str())
    };
    // The host is compared without port, case or trailing dot.
    for authority in [
        "legacy.example.com",
        "Legacy.Example.COM:8080",
        "legacy.example.com.",
    ] {
        assert_eq!(pick(Some(authority)), Some("legacy"), "{authority}");
    }
    for authority in [Some("api.example.com"), Some("10.96.0.1:80"), None] {
        assert_eq!(pick(authority), Some("rest"), "{authority:?}");
    }

    // A host that is not a lower case hostname is refused, naming the field.
    let bad = route(
        "bad",
        Some(pb::RouteMatch {
            hosts: vec!["Legacy.example.com".to_owned()],
            ..Default::default()
        }),
        vec![to("demo/articles", 1)],
    );
    let e = rejected(
        &mut articles_and_frontend(),
        &route_table("demo/frontend", vec![bad]),
    );
    assert_invalid(
        &e,
        ResourceKind::RouteTable,
        "demo/frontend",
        "routes[0].match.hosts[0]",
        |p| matches!(p, Problem::Malformed { value, .. } if value == "Legacy.example.com"),
    );
}

#[test]
fn weighted_destinations_are_picked_by_weight() {
    let mut b = articles_and_frontend();
    let config = applied(
        &mut b,
        &route_table(
            "demo/frontend",
            vec![route(
                "split",
                None,
                vec![
                    to("demo/articles", 90),
                    to("demo/drained", 0),
                    to("demo/frontend", 10),
                ],
            )],
        ),
    );
    let route = &config
        .service("demo/frontend")
        .expect("frontend")
        .routes
        .routes[0];
    assert_eq!(route.total_weight(), 100);
    let picked = |p| route.pick(p).map(|d| d.service.as_str());
    assert_eq!(picked(0), Some("demo/articles"));
    assert_eq!(picked(89), Some("demo/articles"));
    assert_eq!(picked(90), Some("demo/frontend"));
    assert_eq!(picked(99), Some("demo/frontend"));
    assert_eq!(picked(100), Some("demo/articles"), "points wrap around");
}

#[test]
fn endpoint_port_zero_means_the_service_ports_target_port() {
    let mut b = articles_and_frontend();
    let config = applied(
        &mut b,
        &endpoints(
            "demo/articles",
            "1",
            vec![endpoint("10.0.0.5", 0), endpoint("fd00::5", 7070)],
        ),
    );
    let target = config
        .by_addr("10.96.0.10:80".parse().expect("addr"))
        .expect("articles");
    let addrs: Vec<String> = target
        .service
        .endpoint_addrs(target.port)
        .map(|(addr, _)| addr.to_string())
        .collect();
    assert_eq!(addrs, ["10.0.0.5:8080", "[fd00::5]:7070"]);
    let tcp = target.service.port(9000).expect("port 9000");
    let first = &target.service.endpoints.endpoints[0];
    assert_eq!(first.port, None);
    assert_eq!(first.socket_addr(tcp).to_string(), "10.0.0.5:9000");
    assert_eq!(first.locality.to_string(), "eu/eu-1");
}

// ---------------------------------------------------------------------------------------------
// Publication and serialization.

#[tokio::test]
async fn the_store_publishes_to_readers_and_watchers() {
    let store = ConfigStore::default();
    let mut changes = store.subscribe();
    assert_eq!(store.load().generation(), 0);
    assert!(
        !store.is_configured(),
        "the placeholder is not a configuration"
    );
    let b = articles_and_frontend();
    store.publish(b.current().clone());
    assert!(store.is_configured());
    assert!(Arc::ptr_eq(&store.current(), b.current()));
    changes.changed().await.expect("the store is alive");
    assert_eq!(
        changes.borrow_and_update().generation(),
        b.current().generation()
    );
}

#[test]
fn config_serializes_to_json_for_humans() {
    let mut b = articles_and_frontend();
    applied(
        &mut b,
        &endpoints("demo/articles", "1", vec![endpoint("10.0.0.5", 0)]),
    );
    let mut r = route(
        "by-id",
        Some(pb::RouteMatch {
            path: regex("/articles/[0-9]+"),
            method: "GET".to_owned(),
            ..Default::default()
        }),
        vec![to("demo/articles", 1)],
    );
    r.timeout = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    r.retry = Some(pb::RetryPolicy {
        attempts: Some(2),
        retry_on: vec!["5xx".to_owned()],
        retry_non_idempotent: true,
        ..Default::default()
    });
    let config = applied(&mut b, &route_table("demo/articles", vec![r]));
    let json = serde_json::to_value(config.as_ref()).expect("serializes");
    let articles = &json["services"]["demo/articles"];
    assert_eq!(articles["vips"][0], "10.96.0.10");
    assert_eq!(articles["ports"][0]["target_port"], 8080);
    assert_eq!(
        articles["routes"][0]["match"]["path"]["regex"],
        "/articles/[0-9]+"
    );
    assert_eq!(articles["routes"][0]["match"]["method"], "GET");
    assert_eq!(articles["routes"][0]["timeout"], "2s");
    assert_eq!(articles["routes"][0]["retry"]["retry_on"][0], "5xx");
    assert_eq!(articles["routes"][0]["retry"]["backoff_max"], "250ms");
    assert_eq!(articles["routes"][0]["retry"]["retry_non_idempotent"], true);
    assert_eq!(articles["endpoints"][0]["address"], "10.0.0.5");
    assert_eq!(articles["endpoints"][0]["port"], serde_json::Value::Null);
    assert_eq!(
        articles["traffic_policy"]["load_balancer"]["algorithm"],
        "least_request"
    );
    assert_eq!(json["mesh"]["mtls_mode"], "strict");
    assert_eq!(
        json["versions"]["RouteTable"]["resources"]["demo/articles"],
        "1"
    );
}

trait WithName {
    fn with_name(self, name: &str) -> Self;
}

impl WithName for DiscoveryResponse {
    /// Renames the (single) resource, to make its name disagree with its body.
    fn with_name(mut self, name: &str) -> Self {
        for r in &mut self.resources {
            r.name = name.to_owned();
        }
        self
    }
}

#[test]
fn trust_anchors_must_be_certificates_and_one_signs() {
    let root = rcgen::CertificateParams::default()
        .self_signed(&rcgen::KeyPair::generate().expect("key"))
        .expect("cert");
    let anchor = |id: &str, certificate: Vec<u8>, signing: bool| pb::TrustAnchor {
        id: id.to_owned(),
        certificate,
        signing,
    };
    let version = std::cell::Cell::new(1);
    let with = |anchors: Vec<pb::TrustAnchor>| {
        let m = pb::MeshConfig {
            trust_domain: "cluster.local".to_owned(),
            trust_anchors: anchors,
            ..Default::default()
        };
        version.set(version.get() + 1);
        let v = version.get().to_string();
        response(
            ResourceKind::MeshConfig,
            vec![encode(ResourceKind::MeshConfig, "mesh", &v, &m)],
            &[],
        )
    };
    let mut b = ConfigBuilder::new("demo");
    let config = applied(
        &mut b,
        &with(vec![
            anchor("a", root.der().to_vec(), true),
            anchor("b", root.der().to_vec(), false),
        ]),
    );
    let anchors = &config.mesh().trust_anchors;
    assert_eq!(anchors.len(), 2);
    assert!(anchors[0].signing && !anchors[1].signing);
    assert_eq!(&*anchors[0].certificate, root.der().as_ref());

    let e = rejected(&mut b, &with(vec![anchor("a", b"garbage".to_vec(), true)]));
    assert_invalid(
        &e,
        ResourceKind::MeshConfig,
        "mesh",
        "trust_anchors[0].certificate",
        |p| matches!(p, Problem::Malformed { .. }),
    );
    let e = rejected(
        &mut b,
        &with(vec![
            anchor("a", root.der().to_vec(), true),
            anchor("b", root.der().to_vec(), true),
        ]),
    );
    assert_invalid(&e, ResourceKind::MeshConfig, "mesh", "trust_anchors", |p| {
        matches!(p, Problem::Inconsistent { .. })
    });
    let e = rejected(&mut b, &with(vec![anchor("", root.der().to_vec(), true)]));
    assert_invalid(
        &e,
        ResourceKind::MeshConfig,
        "mesh",
        "trust_anchors[0].id",
        |p| matches!(p, Problem::Empty),
    );
}
