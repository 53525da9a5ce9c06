//! The proxy's view of the model: validated mesh resources turned into the proto resources of the
//! discovery stream, each encoded once and versioned by a hash of its bytes.
//!
//! Services, endpoints, routes and traffic policies are the same for every proxy that sees them
//! and are built once per snapshot; which proxies see a service is its `exportTo` (every
//! namespace by default, as in Istio), applied per stream when it compares what the proxy holds
//! ([`crate::store::Snapshot::visible`]), so visibility costs no copy per namespace. Mesh
//! settings (with the workload's mTLS mode) and inbound authorization depend on the proxy's
//! workload and are built per proxy.
//!
//! Nothing here may fail: the model was validated, so every conversion is total.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::v1::{self as pb, type_url};
use prost::Message;
use prost_types::Any;

use crate::identity::TrustBundle;
use crate::model::{self, Model, ObjectKey};

/// A resource type's URL; always one of [`ALL_TYPES`].
pub type TypeUrl = &'static str;

/// Every type this control plane serves, in the order responses are sent.
pub const ALL_TYPES: [TypeUrl; 6] = type_url::ALL;

/// An encoded resource and its content version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedResource {
    pub version: String,
    pub body: Any,
}

impl VersionedResource {
    fn new(type_url: TypeUrl, message: &impl Message) -> VersionedResource {
        let value = message.encode_to_vec();
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&value));
        VersionedResource {
            version,
            body: Any {
                type_url: type_url.to_owned(),
                value,
            },
        }
    }
}

/// The proxy a stream serves, as the views need it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub workload: ObjectKey,
}

/// The `&'static` form of a type URL this server knows.
pub fn known_type(type_url: &str) -> Option<TypeUrl> {
    ALL_TYPES.into_iter().find(|t| *t == type_url)
}

/// "Service" for "type.googleapis.com/keel.mesh.v1.Service".
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        type_url::SERVICE => "Service",
        type_url::ROUTE_TABLE => "RouteTable",
        type_url::ENDPOINTS => "Endpoints",
        type_url::TRAFFIC_POLICY => "TrafficPolicy",
        type_url::AUTHORIZATION_POLICY => "AuthorizationPolicy",
        type_url::MESH_CONFIG => "MeshConfig",
        _ => "unknown",
    }
}

type Built = BTreeMap<String, VersionedResource>;

/// The types every proxy sees alike, one resource per service, named after the service.
pub const SHARED_TYPES: [TypeUrl; 4] = [
    type_url::SERVICE,
    type_url::ENDPOINTS,
    type_url::ROUTE_TABLE,
    type_url::TRAFFIC_POLICY,
];

/// Builds the shared resources of a model, for all services or for a few. `mtls` says whether
/// the control plane runs a CA, so that proxies have certificates and originate mTLS to meshed
/// endpoints.
pub struct SharedResources<'a> {
    model: &'a Model,
    mtls: bool,
    /// Answers "which workloads back this service" for many services at once; without it, each
    /// question scans the service's namespace (cheaper when only a few are asked).
    index: Option<model::EndpointIndex<'a>>,
}

impl<'a> SharedResources<'a> {
    /// A builder for `services` services; `None`: for all of them.
    pub fn new(model: &'a Model, mtls: bool, services: Option<usize>) -> SharedResources<'a> {
        // An index costs a pass over every workload; a namespace scan per service is cheaper
        // for a handful of services.
        let index = services
            .is_none_or(|n| n > 16)
            .then(|| model.endpoint_index());
        SharedResources { model, mtls, index }
    }

    /// The resource of `type_url` (one of [`SHARED_TYPES`]) for service `key`, or `None` when
    /// the model has no such service.
    pub fn build(&self, type_url: TypeUrl, key: &ObjectKey) -> Option<VersionedResource> {
        let service = self.model.services.get(key)?;
        Some(match type_url {
            type_url::SERVICE => VersionedResource::new(type_url, &service_of(service)),
            type_url::ENDPOINTS => {
                let workloads = match &self.index {
                    Some(index) => index.endpoints_of(key),
                    None => self.model.endpoints_of(key),
                };
                VersionedResource::new(
                    type_url,
                    &endpoints_of(self.model, &workloads, key, self.mtls),
                )
            }
            type_url::ROUTE_TABLE => VersionedResource::new(type_url, &route_table_of(service)),
            _ => {
                let policy = match self.model.traffic_policies.get(key) {
                    Some(p) => traffic_policy_of(&p.spec),
                    None => traffic_policy_of(&model::TrafficPolicySpec::default_for(key.clone())),
                };
                VersionedResource::new(type_url::TRAFFIC_POLICY, &policy)
            }
        })
    }
}

/// Every resource every proxy sees alike, by type.
pub fn shared_resources(model: &Model, mtls: bool) -> Vec<(TypeUrl, Built)> {
    let builder = SharedResources::new(model, mtls, None);
    SHARED_TYPES
        .into_iter()
        .map(|type_url| {
            let built = model
                .services
                .keys()
                .filter_map(|key| Some((key.to_string(), builder.build(type_url, key)?)))
                .collect();
            (type_url, built)
        })
        .collect()
}

/// The resources that depend on the proxy's own workload.
pub fn node_resources(
    model: &Model,
    trust: &TrustBundle,
    node: &NodeInfo,
) -> BTreeMap<TypeUrl, Arc<BTreeMap<String, Arc<VersionedResource>>>> {
    let mesh = pb::MeshConfig {
        trust_anchors: trust
            .anchors
            .iter()
            .map(|a| pb::TrustAnchor {
                id: a.id.clone(),
                certificate: a.der.to_vec(),
                signing: a.signing,
            })
            .collect(),
        trust_domain: model.mesh.trust_domain.clone(),
        mtls_mode: mtls_mode(model.mtls_mode_for(&node.workload)) as i32,
        outbound_traffic_policy: match model.mesh.outbound_traffic_policy {
            model::OutboundTrafficPolicy::AllowAny => pb::OutboundTrafficPolicy::AllowAny,
            model::OutboundTrafficPolicy::RegistryOnly => pb::OutboundTrafficPolicy::RegistryOnly,
        } as i32,
        // Locality failover by `failoverPriority` compares the caller's labels with each
        // endpoint's.
        workload_labels: model
            .workloads
            .get(&node.workload)
            .map(|w| w.meta.labels.clone())
            .unwrap_or_default(),
    };
    let mesh = BTreeMap::from([(
        "mesh".to_owned(),
        Arc::new(VersionedResource::new(type_url::MESH_CONFIG, &mesh)),
    )]);
    let authz = model
        .policies_for(&node.workload)
        .into_iter()
        .map(|p| {
            let key = p.meta.key();
            let message = authorization_policy_of(&key, &p.spec);
            (
                key.to_string(),
                Arc::new(VersionedResource::new(
                    type_url::AUTHORIZATION_POLICY,
                    &message,
                )),
            )
        })
        .collect();
    BTreeMap::from([
        (type_url::MESH_CONFIG, Arc::new(mesh)),
        (type_url::AUTHORIZATION_POLICY, Arc::new(authz)),
    ])
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn locality(l: &model::Locality) -> pb::Locality {
    pb::Locality {
        region: l.region.clone().unwrap_or_default(),
        zone: l.zone.clone().unwrap_or_default(),
        subzone: l.subzone.clone().unwrap_or_default(),
    }
}

fn service_of(service: &model::Service) -> pb::Service {
    pb::Service {
        name: service.meta.name.clone(),
        namespace: service.meta.namespace.clone(),
        hostnames: service.spec.hostnames.clone(),
        vips: service.spec.vips.iter().map(|ip| ip.to_string()).collect(),
        ports: service
            .spec
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::from(p.port),
                target_port: u32::from(p.target_port),
                protocol: match p.protocol {
                    None => pb::Protocol::Unspecified,
                    Some(model::Protocol::Http) => pb::Protocol::Http,
                    Some(model::Protocol::Http2) => pb::Protocol::Http2,
                    Some(model::Protocol::Grpc) => pb::Protocol::Grpc,
                    Some(model::Protocol::Tcp) => pb::Protocol::Tcp,
                } as i32,
            })
            .collect(),
    }
}

fn endpoints_of(
    model: &Model,
    workloads: &[&model::Workload],
    key: &ObjectKey,
    mtls: bool,
) -> pb::Endpoints {
    let endpoints = workloads
        .iter()
        // One endpoint per workload, at its primary address: a dual-stack pod is one endpoint,
        // as in a Kubernetes EndpointSlice of one address family, so it is not weighted twice.
        .filter_map(|w| {
            let address = w.spec.addresses.first()?;
            Some(pb::Endpoint {
                address: address.to_string(),
                port: 0,
                weight: w.spec.weight,
                locality: Some(locality(&w.spec.locality)),
                identity: model.spiffe_id(w),
                ready: w.spec.ready,
                workload: w.meta.key().to_string(),
                meshed: w.spec.meshed,
                mtls: mtls && model.mtls_mode_for(&w.meta.key()) != model::MtlsMode::Disable,
                labels: w.meta.labels.clone(),
            })
        })
        .collect();
    pb::Endpoints {
        service: key.to_string(),
        endpoints,
    }
}

fn string_match(m: &model::PathMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    pb::StringMatch {
        kind: Some(match m {
            model::PathMatch::Exact(s) => Kind::Exact(s.clone()),
            model::PathMatch::Prefix(s) => Kind::Prefix(s.clone()),
            model::PathMatch::Regex(s) => Kind::Regex(s.clone()),
        }),
    }
}

fn value_match(m: &model::ValueMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    pb::StringMatch {
        kind: Some(match m {
            model::ValueMatch::Exact(s) => Kind::Exact(s.clone()),
            model::ValueMatch::Prefix(s) => Kind::Prefix(s.clone()),
            model::ValueMatch::Regex(s) => Kind::Regex(s.clone()),
        }),
    }
}

fn retry_on(r: model::RetryOn) -> &'static str {
    match r {
        model::RetryOn::ConnectFailure => "connect-failure",
        model::RetryOn::Reset => "reset",
        model::RetryOn::GatewayError => "gateway-error",
        model::RetryOn::ServerError => "5xx",
        model::RetryOn::RetriableStatusCodes => "retriable-status-codes",
    }
}

fn grpc_code(c: model::GrpcCode) -> &'static str {
    match c {
        model::GrpcCode::Cancelled => "cancelled",
        model::GrpcCode::DeadlineExceeded => "deadline-exceeded",
        model::GrpcCode::Internal => "internal",
        model::GrpcCode::ResourceExhausted => "resource-exhausted",
        model::GrpcCode::Unavailable => "unavailable",
    }
}

fn route_table_of(service: &model::Service) -> pb::RouteTable {
    let routes = service
        .spec
        .routes
        .iter()
        .map(|r| pb::Route {
            name: r.name.clone(),
            r#match: Some(pb::RouteMatch {
                hosts: r.matches.hosts.clone(),
                path: r.matches.path.as_ref().map(string_match),
                headers: r
                    .matches
                    .headers
                    .iter()
                    .map(|h| pb::HeaderMatch {
                        name: h.name.to_string(),
                        value: Some(value_match(&h.value)),
                        invert: h.invert,
                    })
                    .collect(),
                method: r
                    .matches
                    .method
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            }),
            destinations: r
                .destinations
                .iter()
                .map(|d| pb::WeightedDestination {
                    service: d.service.to_string(),
                    port: d.port.map(u32::from).unwrap_or(0),
                    weight: d.weight,
                })
                .collect(),
            timeout: r.timeout.map(duration),
            retry: r.retries.as_ref().map(|p| pb::RetryPolicy {
                attempts: Some(p.attempts),
                per_try_timeout: p.per_try_timeout.map(duration),
                retry_on: p.retry_on.iter().map(|r| retry_on(*r).to_owned()).collect(),
                retriable_status_codes: p
                    .retriable_status_codes
                    .iter()
                    .map(|c| u32::from(*c))
                    .collect(),
                retriable_grpc_codes: p
                    .retriable_grpc_codes
                    .iter()
                    .map(|c| grpc_code(*c).to_owned())
                    .collect(),
                backoff_base: Some(duration(p.backoff_base)),
                backoff_max: Some(duration(p.backoff_max)),
                retry_non_idempotent: p.retry_non_idempotent,
            }),
        })
        .collect();
    pb::RouteTable {
        service: service.meta.key().to_string(),
        routes,
    }
}

fn hash_policy(h: &model::HashOn) -> pb::HashPolicy {
    use pb::hash_policy::Key;
    pb::HashPolicy {
        key: Some(match h {
            model::HashOn::SourceIp => Key::SourceIp(true),
            model::HashOn::Header(name) => Key::Header(name.to_string()),
            model::HashOn::Cookie(name) => Key::Cookie(name.clone()),
        }),
    }
}

fn traffic_policy_of(spec: &model::TrafficPolicySpec) -> pb::TrafficPolicy {
    use model::LoadBalancer as Lb;
    let (load_balancer, hash) = match &spec.load_balancer {
        Lb::RoundRobin => (pb::LoadBalancer::RoundRobin, None),
        Lb::LeastRequest => (pb::LoadBalancer::LeastRequest, None),
        Lb::PeakEwma => (pb::LoadBalancer::PeakEwma, None),
        Lb::Random => (pb::LoadBalancer::Random, None),
        Lb::RingHash(h) => (pb::LoadBalancer::RingHash, Some(hash_policy(h))),
        Lb::Maglev(h) => (pb::LoadBalancer::Maglev, Some(hash_policy(h))),
    };
    pb::TrafficPolicy {
        service: spec.target.to_string(),
        load_balancer: load_balancer as i32,
        hash,
        outlier_detection: spec
            .outlier_detection
            .as_ref()
            .map(|o| pb::OutlierDetection {
                consecutive_5xx: Some(o.consecutive_5xx),
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                interval: Some(duration(o.interval)),
                base_ejection_time: Some(duration(o.base_ejection_time)),
                max_ejection_time: Some(duration(o.max_ejection_time)),
                max_ejection_percent: Some(u32::from(o.max_ejection_percent)),
                success_rate: o.success_rate.as_ref().map(|s| pb::SuccessRateEjection {
                    minimum_hosts: Some(s.minimum_hosts),
                    request_volume: Some(s.request_volume),
                    // Envoy's integer form: the factor times 1000. The model keeps it finite
                    // and positive, so the cast neither wraps nor loses more than rounding.
                    stdev_factor: Some((s.stdev_factor * 1000.0).round() as u32),
                }),
                failure_percentage: o.failure_percentage.as_ref().map(|f| {
                    pb::FailurePercentageEjection {
                        threshold: Some(u32::from(f.threshold)),
                        minimum_hosts: Some(f.minimum_hosts),
                        request_volume: Some(f.request_volume),
                    }
                }),
                min_health_percent: Some(u32::from(o.min_health_percent)),
            }),
        locality_failover: spec
            .locality_failover
            .as_ref()
            .map(|l| pb::LocalityFailover {
                enabled: l.enabled,
                failover_priority: l
                    .failover_priority
                    .iter()
                    .map(|f| match &f.value {
                        Some(v) => format!("{}={v}", f.key),
                        None => f.key.clone(),
                    })
                    .collect(),
                failover: l
                    .failover
                    .iter()
                    .map(|f| pb::FailoverRule {
                        from: f.from.clone(),
                        to: f.to.clone(),
                    })
                    .collect(),
                distribute: l
                    .distribute
                    .iter()
                    .map(|d| pb::DistributeRule {
                        from: d.from.to_string(),
                        to: d.to.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    })
                    .collect(),
            }),
        circuit_breaker: Some(pb::CircuitBreaker {
            max_connections: Some(spec.circuit_breaker.max_connections),
            max_pending_requests: Some(spec.circuit_breaker.max_pending_requests),
            max_requests: Some(spec.circuit_breaker.max_requests),
            max_retries: Some(spec.circuit_breaker.max_retries),
        }),
        retry_budget: Some(pb::RetryBudget {
            percent: Some(u32::from(spec.retry_budget.percent)),
            min_retries_per_second: Some(spec.retry_budget.min_retries_per_second),
            ttl: Some(duration(spec.retry_budget.ttl)),
        }),
        connect_timeout: Some(duration(spec.connect_timeout)),
        idle_timeout: Some(duration(spec.idle_timeout)),
    }
}

fn mtls_mode(m: model::MtlsMode) -> pb::MtlsMode {
    match m {
        model::MtlsMode::Strict => pb::MtlsMode::Strict,
        model::MtlsMode::Permissive => pb::MtlsMode::Permissive,
        model::MtlsMode::Disable => pb::MtlsMode::Disable,
    }
}

fn patterns(v: &[model::StringMatch]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn authorization_policy_of(
    key: &ObjectKey,
    spec: &model::AuthorizationPolicySpec,
) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        action: match spec.action {
            model::AuthorizationAction::Allow => pb::AuthorizationAction::Allow,
            model::AuthorizationAction::Deny => pb::AuthorizationAction::Deny,
            model::AuthorizationAction::Audit => pb::AuthorizationAction::Audit,
        } as i32,
        rules: spec
            .rules
            .iter()
            .map(|r| pb::AuthorizationRule {
                from: r
                    .from
                    .iter()
                    .map(|s| pb::Source {
                        principals: patterns(&s.principals),
                        not_principals: patterns(&s.not_principals),
                        namespaces: patterns(&s.namespaces),
                        not_namespaces: patterns(&s.not_namespaces),
                        ip_blocks: s.ip_blocks.iter().map(ToString::to_string).collect(),
                        not_ip_blocks: s.not_ip_blocks.iter().map(ToString::to_string).collect(),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|o| pb::Operation {
                        methods: o.methods.iter().map(ToString::to_string).collect(),
                        not_methods: o.not_methods.iter().map(ToString::to_string).collect(),
                        paths: patterns(&o.paths),
                        not_paths: patterns(&o.not_paths),
                        ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
                        not_ports: o.not_ports.iter().map(|p| u32::from(*p)).collect(),
                        hosts: patterns(&o.hosts),
                        not_hosts: patterns(&o.not_hosts),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        match model::load_dir(&dir) {
            Ok((model, _)) => model,
            Err(errors) => panic!("examples/mesh is invalid:\n{errors}"),
        }
    }

    fn decode<M: Message + Default>(
        built: &[(TypeUrl, Built)],
        type_url: TypeUrl,
        name: &str,
    ) -> M {
        let (_, resources) = built
            .iter()
            .find(|(t, _)| *t == type_url)
            .expect("type built");
        M::decode(resources[name].body.value.as_slice()).expect("decodes")
    }

    /// What locality failover by labels and the retry budget need reaches the proxy.
    #[test]
    fn labels_and_retry_budget_are_encoded() {
        let model = example();
        let built = shared_resources(&model, true);
        let endpoints: pb::Endpoints = decode(&built, type_url::ENDPOINTS, "demo/articles");
        assert!(!endpoints.endpoints.is_empty());
        for e in &endpoints.endpoints {
            assert_eq!(e.labels.get("app").map(String::as_str), Some("articles"));
            // Meshed, PERMISSIVE, and a CA runs: callers originate mTLS.
            assert!(e.mtls && e.meshed);
        }
        let without_ca: pb::Endpoints = decode(
            &shared_resources(&model, false),
            type_url::ENDPOINTS,
            "demo/articles",
        );
        assert!(without_ca.endpoints.iter().all(|e| !e.mtls));
        let policy: pb::TrafficPolicy = decode(&built, type_url::TRAFFIC_POLICY, "demo/reads");
        let budget = policy.retry_budget.expect("a retry budget");
        assert_eq!(
            (budget.percent, budget.min_retries_per_second),
            (Some(20), Some(10))
        );
        assert_eq!(budget.ttl.map(|d| d.seconds), Some(10));
        assert_eq!(
            policy.circuit_breaker.and_then(|c| c.max_retries),
            Some(u32::MAX)
        );

        let node = NodeInfo {
            id: "frontend-1.demo".into(),
            workload: ObjectKey::new("demo", "frontend-1"),
        };
        let mesh =
            &node_resources(&model, &TrustBundle::default(), &node)[type_url::MESH_CONFIG]["mesh"];
        let mesh = pb::MeshConfig::decode(mesh.body.value.as_slice()).expect("decodes");
        assert_eq!(
            mesh.workload_labels.get("app").map(String::as_str),
            Some("frontend")
        );
        let stranger = NodeInfo {
            id: "nobody.demo".into(),
            workload: ObjectKey::new("demo", "nobody"),
        };
        let mesh = &node_resources(&model, &TrustBundle::default(), &stranger)
            [type_url::MESH_CONFIG]["mesh"];
        let mesh = pb::MeshConfig::decode(mesh.body.value.as_slice()).expect("decodes");
        assert!(mesh.workload_labels.is_empty());
    }

    #[test]
    fn route_hosts_are_encoded() {
        let text = "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: api, namespace: demo}\nspec:\n  hostnames: [api.example.com, legacy.example.com]\n  ports: [{port: 80}]\n  routes:\n  - name: legacy\n    match: {hosts: [legacy.example.com], path: {prefix: /}}\n    destinations: [{service: api}]\n";
        let resources = model::parse_file(std::path::Path::new("api.yaml"), text).expect("parses");
        let model = Model::from_resources(resources).expect("valid");
        let built = shared_resources(&model, false);
        let table: pb::RouteTable = decode(&built, type_url::ROUTE_TABLE, "demo/api");
        let matches = table.routes[0].r#match.as_ref().expect("a match");
        assert_eq!(matches.hosts, ["legacy.example.com"]);
    }

    /// Zeros that mean "off" are sent as such, so that the proxy, which gives an absent field
    /// its default, still receives them.
    #[test]
    fn zeros_are_sent_explicitly() {
        let text = "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: api, namespace: demo}\nspec:\n  ports: [{port: 80}]\n  routes:\n  - name: all\n    destinations: [{service: api}]\n    retries: {attempts: 0}\n---\napiVersion: keel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: demo}\nspec:\n  targetRef: {service: api}\n  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 3, maxEjectionPercent: 0, minHealthPercent: 0}\n  circuitBreaker: {maxRetries: 0}\n  retryBudget: {percent: 0, minRetriesPerSecond: 0}\n";
        let resources = model::parse_file(std::path::Path::new("api.yaml"), text).expect("parses");
        let model = Model::from_resources(resources).expect("valid");
        let built = shared_resources(&model, false);
        let policy: pb::TrafficPolicy = decode(&built, type_url::TRAFFIC_POLICY, "demo/api");
        let outlier = policy.outlier_detection.expect("outlier detection");
        assert_eq!(
            (
                outlier.consecutive_5xx,
                outlier.max_ejection_percent,
                outlier.min_health_percent
            ),
            (Some(0), Some(0), Some(0))
        );
        let breaker = policy.circuit_breaker.expect("circuit breaker");
        assert_eq!(breaker.max_retries, Some(0));
        assert_eq!(breaker.max_requests, Some(1024));
        let budget = policy.retry_budget.expect("retry budget");
        assert_eq!(
            (budget.percent, budget.min_retries_per_second),
            (Some(0), Some(0))
        );
        let table: pb::RouteTable = decode(&built, type_url::ROUTE_TABLE, "demo/api");
        assert_eq!(
            table.routes[0].retry.as_ref().and_then(|r| r.attempts),
            Some(0)
        );
    }

    #[test]
    fn retrying_non_idempotent_requests_is_encoded() {
        let route = |retries: &str| {
            format!(
                "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {{name: api, namespace: demo}}\nspec:\n  ports: [{{port: 80}}]\n  routes:\n  - name: all\n    destinations: [{{service: api}}]\n    retries: {retries}\n"
            )
        };
        for (retries, expected) in [
            ("{retryOn: [5xx], retryNonIdempotent: true}", true),
            ("{retryOn: [5xx]}", false),
        ] {
            let text = route(retries);
            let resources =
                model::parse_file(std::path::Path::new("api.yaml"), &text).expect("parses");
            let model = Model::from_resources(resources).expect("valid");
            let built = shared_resources(&model, false);
            let table: pb::RouteTable = decode(&built, type_url::ROUTE_TABLE, "demo/api");
            let retry = table.routes[0].retry.as_ref().expect("a retry policy");
            assert_eq!(retry.retry_non_idempotent, expected, "{retries}");
        }
    }
}
