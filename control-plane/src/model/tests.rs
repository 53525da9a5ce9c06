//! Tests of the model as a whole: YAML in, resources or located errors out, and the queries.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const FILE: &str = "mesh.yaml";

fn parse(text: &str) -> Result<Vec<Resource>, ValidationErrors> {
    parse_file(Path::new(FILE), text)
}

fn errors(text: &str) -> Vec<ValidationError> {
    match parse(text) {
        Ok(resources) => panic!("expected errors, got {resources:#?}"),
        Err(errors) => errors.0,
    }
}

fn model_errors(text: &str) -> Vec<ValidationError> {
    let resources = parse(text).unwrap_or_else(|e| panic!("parse failed:\n{e}"));
    match Model::from_resources(resources) {
        Ok(_) => panic!("expected model errors"),
        Err(errors) => errors.0,
    }
}

fn model(text: &str) -> Model {
    let resources = parse(text).unwrap_or_else(|e| panic!("parse failed:\n{e}"));
    Model::from_resources(resources).unwrap_or_else(|e| panic!("model failed:\n{e}"))
}

/// Asserts that `errors` is exactly one error of `kind` at `line:column` about `field`.
#[track_caller]
fn assert_one(
    errors: &[ValidationError],
    line: usize,
    column: usize,
    kind: ErrorKind,
    field: &str,
) {
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got:\n{}",
        ValidationErrors(errors.to_vec())
    );
    let e = &errors[0];
    assert_eq!(
        (e.line, e.column, e.kind, e.field.as_str()),
        (line, column, kind, field),
        "unexpected error: {e}"
    );
    assert_eq!(e.file, Path::new(FILE));
}

const SERVICE: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: articles
  namespace: demo
spec:
  ports:
  - {name: http, port: 80}
  selector: {app: articles}
";

// ---------------------------------------------------------------------------------------------
// Error classes, each at an exact position.

#[test]
fn syntax_error_points_where_the_parser_stopped() {
    let text = "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: a\nspec: {}\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, ErrorKind::Syntax);
    assert_eq!((errors[0].line, errors[0].column), (4, 5), "{}", errors[0]);
    assert_eq!(errors[0].field, "");
}

#[test]
fn syntax_error_in_a_later_document_is_in_file_coordinates() {
    let text = format!("{SERVICE}---\nkind: Workload\n  bad: indent: here\n");
    let errors = errors(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, ErrorKind::Syntax);
    assert!(errors[0].line >= 11, "{}", errors[0]);
}

#[test]
fn unknown_field_points_at_the_key_and_suggests() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: articles}
spec:
  ports:
  - name: http
    port: 80
    target_port: 8080
";
    let errors = errors(text);
    assert_one(
        &errors,
        8,
        5,
        ErrorKind::UnknownField,
        "spec.ports[0].target_port",
    );
    assert!(
        errors[0].reason.contains("did you mean `targetPort`?"),
        "{}",
        errors[0]
    );
}

#[test]
fn unknown_top_level_field() {
    let text = format!("{SERVICE}status: {{}}\n");
    assert_one(&errors(&text), 10, 1, ErrorKind::UnknownField, "status");
}

#[test]
fn wrong_type_points_at_the_value() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: w}
spec:
  addresses: 10.0.0.1
";
    let errors = errors(text);
    assert_one(&errors, 5, 14, ErrorKind::WrongType, "spec.addresses");
    assert!(
        errors[0].reason.contains("expected a list"),
        "{}",
        errors[0]
    );

    let text = SERVICE.replace("port: 80", "port: http");
    assert_one(
        &errors_of(&text),
        8,
        24,
        ErrorKind::WrongType,
        "spec.ports[0].port",
    );

    let text = SERVICE.replace("{app: articles}", "{app: 1}");
    let errors = errors_of(&text);
    assert_one(
        &errors,
        9,
        19,
        ErrorKind::WrongType,
        "spec.selector[\"app\"]",
    );
    assert!(errors[0].reason.contains("quote"), "{}", errors[0]);
}

fn errors_of(text: &str) -> Vec<ValidationError> {
    errors(text)
}

#[test]
fn missing_required_field_points_at_its_mapping() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: articles}
spec:
  selector: {app: articles}
";
    assert_one(&errors(text), 5, 3, ErrorKind::MissingField, "spec.ports");

    let text = "apiVersion: keel.dev/v1alpha1\nkind: Service\nspec: {ports: [{port: 80}]}\n";
    assert_one(&errors(text), 1, 1, ErrorKind::MissingField, "metadata");

    let text = "kind: Service\nmetadata: {name: a}\n";
    assert_one(&errors(text), 1, 1, ErrorKind::MissingField, "apiVersion");
}

#[test]
fn unknown_kind_points_at_the_kind() {
    let text =
        "apiVersion: keel.dev/v1alpha1\nkind: Deployment\nmetadata: {name: a}\nspec: {x: 1}\n";
    let errors = errors(text);
    assert_one(&errors, 2, 7, ErrorKind::UnknownKind, "kind");
    assert!(errors[0].reason.contains("MeshConfig"), "{}", errors[0]);

    let text = "apiVersion: keel.dev/v1alpha1\nkind: service\nmetadata: {name: a}\n";
    assert!(errors_of(text)[0].reason.contains("did you mean Service?"));
}

#[test]
fn unsupported_api_version_points_at_the_value() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: None}\n";
    let errors = errors(text);
    // One clear error, not a list of unknown Kubernetes fields.
    assert_one(
        &errors,
        1,
        13,
        ErrorKind::UnsupportedApiVersion,
        "apiVersion",
    );
    assert!(errors[0].reason.contains("keel.dev/v1alpha1"));
}

#[test]
fn bad_cidr_points_at_the_value() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/8, 10.0.0.0/33]
";
    assert_one(
        &errors(text),
        8,
        32,
        ErrorKind::InvalidValue,
        "spec.rules[0].from[0].source.ipBlocks[1]",
    );

    let host_bits = text.replace("10.0.0.0/33", "10.1.2.3/8");
    let errors = errors_of(&host_bits);
    assert!(
        errors[0].reason.contains("did you mean 10.0.0.0/8?"),
        "{}",
        errors[0]
    );
}

#[test]
fn bad_ports_point_at_the_value() {
    for (port, column) in [("0", 24), ("70000", 24), ("-1", 24)] {
        let text = SERVICE.replace("port: 80", &format!("port: {port}"));
        let errors = errors(&text);
        assert_one(
            &errors,
            8,
            column,
            ErrorKind::InvalidValue,
            "spec.ports[0].port",
        );
        assert!(errors[0].reason.contains(port), "{}", errors[0]);
    }
    let text = SERVICE.replace("port: 80}", "port: 80, targetPort: 70000}");
    assert_one(
        &errors(&text),
        8,
        40,
        ErrorKind::InvalidValue,
        "spec.ports[0].targetPort",
    );
}

const ROUTED: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: articles, namespace: demo}
spec:
  ports: [{port: 80}]
  routes:
  - name: reads
    match:
      path: {prefix: /reads}
    destinations:
    - {service: reads, weight: 90}
    - {service: reads-v2.demo, port: 80, weight: 10}
    timeout: 5s
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: reads, namespace: demo}
spec:
  ports: [{port: 80}]
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: reads-v2, namespace: demo}
spec:
  ports: [{port: 80}]
";

#[test]
fn routes_parse_with_resolved_references() {
    let m = model(ROUTED);
    let articles = &m.services[&ObjectKey::new("demo", "articles")];
    let route = &articles.spec.routes[0];
    assert_eq!(route.name, "reads");
    assert_eq!(route.matches.path, Some(PathMatch::Prefix("/reads".into())));
    assert_eq!(route.timeout, Some(Duration::from_secs(5)));
    assert_eq!(
        route.destinations,
        vec![
            RouteDestination {
                service: ObjectKey::new("demo", "reads"),
                port: None,
                weight: 90
            },
            RouteDestination {
                service: ObjectKey::new("demo", "reads-v2"),
                port: Some(80),
                weight: 10
            },
        ]
    );
}

/// A service with two names routed apart, and a route naming a host the service does not have.
const BY_HOST: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  hostnames: [api.example.com, legacy.example.com]
  ports: [{port: 80}]
  routes:
  - name: legacy
    match:
      hosts: [legacy.example.com]
    destinations: [{service: api}]
  - name: typo
    match:
      hosts: [api.example.com, legacy.exmaple.com]
    destinations: [{service: api}]
";

#[test]
fn route_hosts_are_hostnames_of_the_service() {
    assert_one(
        &errors(BY_HOST),
        14,
        32,
        ErrorKind::InvalidValue,
        "spec.routes[1].match.hosts[1]",
    );
    let error = &errors(BY_HOST)[0];
    assert!(
        error
            .reason
            .contains("hostnames are: api.example.com, legacy.example.com"),
        "{}",
        error.reason
    );
    let fixed = BY_HOST.replace("legacy.exmaple.com", "legacy.example.com");
    let m = model(&fixed);
    let api = &m.services[&ObjectKey::new("demo", "api")];
    assert_eq!(api.spec.routes[0].matches.hosts, ["legacy.example.com"]);
    // Without listed hostnames, the defaults are the ones a route may name.
    let defaults = BY_HOST
        .replace("  hostnames: [api.example.com, legacy.example.com]\n", "")
        .replace("[legacy.example.com]", "[api.demo]")
        .replace(
            "[api.example.com, legacy.exmaple.com]",
            "[api, api.demo.svc.cluster.local]",
        );
    let m = model(&defaults);
    let api = &m.services[&ObjectKey::new("demo", "api")];
    assert_eq!(api.spec.routes[0].matches.hosts, ["api.demo"]);
    // A host is a hostname: not upper case, not a pattern.
    assert_one(
        &errors(&BY_HOST.replace("legacy.exmaple.com", "\"*.example.com\"")),
        14,
        32,
        ErrorKind::InvalidValue,
        "spec.routes[1].match.hosts[1]",
    );
}

#[test]
fn bad_duration_points_at_the_value() {
    let text = ROUTED.replace("timeout: 5s", "timeout: 5 parsecs");
    let errors = errors(&text);
    assert_one(
        &errors,
        13,
        14,
        ErrorKind::InvalidValue,
        "spec.routes[0].timeout",
    );
    assert!(errors[0].reason.contains("5 parsecs"), "{}", errors[0]);

    let text = ROUTED.replace("timeout: 5s", "timeout: 5");
    assert_one(
        &errors_of(&text),
        13,
        14,
        ErrorKind::WrongType,
        "spec.routes[0].timeout",
    );
}

#[test]
fn bad_regex_points_at_the_value() {
    let text = ROUTED.replace("{prefix: /reads}", "{regex: \"/reads/(\"}");
    let errors = errors(&text);
    assert_one(
        &errors,
        9,
        21,
        ErrorKind::InvalidValue,
        "spec.routes[0].match.path.regex",
    );
    assert!(
        errors[0].reason.starts_with("invalid regex"),
        "{}",
        errors[0]
    );
}

#[test]
fn bad_ip_points_at_the_value() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: w}
spec:
  addresses:
  - 10.0.0.1
  - 10.0.0.300
";
    let errors = errors(text);
    assert_one(&errors, 7, 5, ErrorKind::InvalidValue, "spec.addresses[1]");
    assert!(errors[0].reason.contains("10.0.0.300"));
}

#[test]
fn dangling_route_destination_points_at_the_reference() {
    let text = ROUTED.replace(
        "{service: reads, weight: 90}",
        "{service: readz, weight: 90}",
    );
    let errors = model_errors(&text);
    assert_one(
        &errors,
        11,
        17,
        ErrorKind::DanglingReference,
        "spec.routes[0].destinations[0].service",
    );
    assert!(errors[0].reason.contains("demo/readz"), "{}", errors[0]);

    let text = ROUTED.replace("port: 80, weight: 10", "port: 81, weight: 10");
    let errors = model_errors(&text);
    assert_one(
        &errors,
        12,
        38,
        ErrorKind::DanglingReference,
        "spec.routes[0].destinations[1].port",
    );
    assert!(errors[0].reason.contains("has no port 81"), "{}", errors[0]);
}

#[test]
fn dangling_target_ref_points_at_the_reference() {
    let text = format!(
        "{SERVICE}---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: p, namespace: demo}}
spec:
  targetRef: {{service: articles.other}}
"
    );
    let errors = model_errors(&text);
    assert_one(
        &errors,
        15,
        24,
        ErrorKind::DanglingReference,
        "spec.targetRef.service",
    );
    assert!(errors[0].reason.contains("other/articles"));
}

#[test]
fn duplicate_name_in_one_file_points_at_the_second_name() {
    let text = format!("{SERVICE}---\n{SERVICE}");
    let errors = model_errors(&text);
    assert_one(&errors, 14, 9, ErrorKind::DuplicateName, "metadata.name");
    assert!(
        errors[0]
            .reason
            .contains("already defined at mesh.yaml:4:9"),
        "{}",
        errors[0]
    );
}

#[test]
fn duplicate_name_across_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
    fs::write(
        dir.path().join("b.yaml"),
        format!("# the same service\n{SERVICE}"),
    )
    .unwrap();
    let errors = load_dir(dir.path()).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(e.file, dir.path().join("b.yaml"));
    assert_eq!((e.line, e.column, e.kind), (5, 9, ErrorKind::DuplicateName));
    let first = format!("{}:4:9", dir.path().join("a.yaml").display());
    assert!(e.reason.contains(&first), "{e}");
}

#[test]
fn one_mesh_config_and_one_traffic_policy_per_service() {
    let mesh = "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n";
    let errors = model_errors(&format!(
        "{mesh}---\n{}",
        mesh.replace("name: mesh", "name: other")
    ));
    assert_one(&errors, 7, 18, ErrorKind::DuplicateName, "metadata.name");

    let policy = |name: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  targetRef: {{service: articles}}\n"
        )
    };
    let text = format!("{SERVICE}---\n{}---\n{}", policy("one"), policy("two"));
    let errors = model_errors(&text);
    assert_one(
        &errors,
        21,
        24,
        ErrorKind::DuplicateName,
        "spec.targetRef.service",
    );
    assert!(
        errors[0].reason.contains("TrafficPolicy demo/one"),
        "{}",
        errors[0]
    );
}

#[test]
fn mesh_config_is_cluster_scoped() {
    let text =
        "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh, namespace: x}\n";
    assert_one(
        &errors(text),
        3,
        35,
        ErrorKind::InvalidValue,
        "metadata.namespace",
    );
}

#[test]
fn hostnames_vips_and_addresses_are_claimed_once() {
    let other = SERVICE.replace("name: articles", "name: copy").replace(
        "  selector:",
        "  hostnames: [articles.demo.svc.cluster.local]\n  vips: [10.96.0.1]\n  selector:",
    );
    let first = SERVICE.replace("  selector:", "  vips: [10.96.0.1]\n  selector:");
    let errors = model_errors(&format!("{first}---\n{other}"));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        (errors[0].line, errors[0].column, errors[0].field.as_str()),
        (20, 15, "spec.hostnames[0]")
    );
    assert_eq!(
        (errors[1].line, errors[1].column, errors[1].field.as_str()),
        (21, 10, "spec.vips[0]")
    );

    // Default short names may coincide across namespaces.
    let elsewhere = SERVICE.replace("namespace: demo", "namespace: other");
    let m = model(&format!("{SERVICE}---\n{elsewhere}"));
    assert_eq!(m.services.len(), 2);

    let workload = |name: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  addresses: [10.77.0.2]\n"
        )
    };
    let errors = model_errors(&format!("{}---\n{}", workload("a"), workload("b")));
    assert_one(
        &errors,
        11,
        15,
        ErrorKind::DuplicateName,
        "spec.addresses[0]",
    );
}

// ---------------------------------------------------------------------------------------------
// Documents and collection of errors.

#[test]
fn multi_document_files_skip_empty_documents() {
    let text = format!(
        "---\n# nothing here\n---\n{SERVICE}---\n---\n{}...\n",
        SERVICE.replace("articles", "comments")
    );
    let resources = parse(&text).unwrap();
    assert_eq!(resources.len(), 2);
    assert_eq!(resources[0].key(), ObjectKey::new("demo", "articles"));
    assert_eq!(resources[1].key(), ObjectKey::new("demo", "comments"));
    let (first, second) = (resources[0].origin(), resources[1].origin());
    assert_eq!((first.document, first.line, first.column), (0, 4, 1));
    assert_eq!((second.document, second.line), (1, 15));
    assert!(text[first.byte_range.clone()].starts_with("---\napiVersion"));
    assert!(text[second.byte_range.clone()].contains("name: comments"));
    assert_eq!(resources[0].kind(), Kind::Service);
    assert_eq!(
        first.position_of("spec.ports[0].port"),
        Position {
            line: 11,
            column: 24
        }
    );
}

#[test]
fn errors_are_collected_from_every_document() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: a}
spec:
  addresses: [10.0.0.1]
  weight: 0
  ready: yes
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: b}
spec: {addresses: [10.0.0.2]}
---
apiVersion: keel.dev/v1alpha1
kind: Gadget
";
    let errors = errors(text);
    let summary: Vec<_> = errors
        .iter()
        .map(|e| (e.line, e.column, e.kind, e.field.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (6, 11, ErrorKind::InvalidValue, "spec.weight"),
            (7, 10, ErrorKind::WrongType, "spec.ready"),
            (15, 7, ErrorKind::UnknownKind, "kind"),
        ]
    );
}

#[test]
fn display_and_json_forms() {
    let e = ValidationError {
        file: PathBuf::from("mesh/services.yaml"),
        line: 3,
        column: 7,
        field: "spec.ports[0].port".into(),
        kind: ErrorKind::InvalidValue,
        reason: "port must be between 1 and 65535, got 0".into(),
    };
    assert_eq!(
        e.to_string(),
        "mesh/services.yaml:3:7: invalid-value: spec.ports[0].port: port must be between 1 and 65535, got 0"
    );
    let no_field = ValidationError {
        field: String::new(),
        kind: ErrorKind::Syntax,
        ..e.clone()
    };
    assert_eq!(
        no_field.to_string(),
        "mesh/services.yaml:3:7: syntax: port must be between 1 and 65535, got 0"
    );
    let all = ValidationErrors(vec![e.clone(), no_field]);
    assert_eq!(all.to_string().lines().count(), 2);
    let json = serde_json::to_value(&all).unwrap();
    assert_eq!(json[0]["kind"], "invalid-value");
    assert_eq!(json[0]["line"], 3);
    assert_eq!(json[1]["kind"], "syntax");
    assert_eq!(
        serde_json::to_value(ErrorKind::UnsupportedApiVersion).unwrap(),
        "unsupported-api-version"
    );
}

// ---------------------------------------------------------------------------------------------
// Defaults and field rules.

#[test]
fn defaults_are_applied() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: w}
spec: {addresses: ['fd00::1']}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
  routes:
  - name: all
    destinations: [{service: web}]
    retries: {attempts: 2}
---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web}
spec:
  targetRef: {service: web}
  outlierDetection: {baseEjectionTime: 400s}
";
    let m = model(text);
    assert_eq!(m.mesh, MeshConfigSpec::default());
    assert_eq!(m.mesh.trust_domain, "cluster.local");
    assert_eq!(m.mesh.root_namespace, "keel-system");
    assert_eq!(m.mesh.mtls, MtlsMode::Permissive);
    assert_eq!(
        m.mesh.outbound_traffic_policy,
        OutboundTrafficPolicy::AllowAny
    );

    let w = &m.workloads[&ObjectKey::new("default", "w")];
    assert_eq!(w.spec.service_account, "default");
    assert_eq!(
        (w.spec.weight, w.spec.ready, w.spec.meshed),
        (1, true, true)
    );
    assert_eq!(w.spec.mtls_mode, None);
    assert_eq!(w.spec.locality, Locality::default());
    assert_eq!(
        m.spiffe_id(w),
        "spiffe://cluster.local/ns/default/sa/default"
    );

    let web = &m.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        web.spec.hostnames,
        vec!["web.default.svc.cluster.local", "web.default", "web"]
    );
    assert_eq!(web.spec.ports[0].target_port, 80);
    assert_eq!(web.spec.ports[0].protocol, None);
    let route = &web.spec.routes[0];
    assert_eq!(route.matches, RouteMatch::default());
    assert_eq!(route.destinations[0].weight, 1);
    let retries = route.retries.as_ref().unwrap();
    assert_eq!(retries.retry_on, vec![RetryOn::ConnectFailure]);
    assert_eq!(retries.backoff_base, Duration::from_millis(25));
    assert_eq!(retries.backoff_max, Duration::from_millis(250));

    let policy = &m.traffic_policies[&ObjectKey::new("default", "web")].spec;
    assert_eq!(policy.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(policy.circuit_breaker, CircuitBreaker::default());
    // Retries are bounded by the budget (20% plus 10 per second over 10 s) rather than by
    // maxRetries.
    assert_eq!(policy.circuit_breaker.max_retries, u32::MAX);
    assert_eq!(
        (
            policy.retry_budget.percent,
            policy.retry_budget.min_retries_per_second,
            policy.retry_budget.ttl
        ),
        (20, 10, Duration::from_secs(10))
    );
    assert_eq!(policy.connect_timeout, Duration::from_secs(5));
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx, 5);
    assert_eq!(outlier.interval, Duration::from_secs(10));
    // keel's default, not Envoy's 10%: a whole zone may be ejected (the panic threshold guards).
    assert_eq!(outlier.max_ejection_percent, 100);
    assert_eq!(outlier.min_health_percent, 50);
    // Envoy: max ejection time defaults to 300 s, or the base if that is longer.
    assert_eq!(outlier.max_ejection_time, Duration::from_secs(400));
}

#[test]
fn full_traffic_policy() {
    let text = format!(
        "{SERVICE}---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: articles, namespace: demo}}
spec:
  targetRef: {{service: articles}}
  loadBalancer: {{policy: MAGLEV, hashOn: {{header: X-User}}}}
  outlierDetection: {{consecutive5xx: 3, consecutiveGatewayErrors: 2, interval: 5s, baseEjectionTime: 10s, maxEjectionTime: 60s, maxEjectionPercent: 50, minHealthPercent: 0,
                     successRate: {{minimumHosts: 3, requestVolume: 10, stdevFactor: 2}}, failurePercentage: {{threshold: 90}}}}
  localityFailover: {{enabled: true, failoverPriority: [topology.kubernetes.io/region, 'topology.kubernetes.io/zone=zone-a'],
                     distribute: [{{from: 'local/*', to: {{'local/zone-a/*': 80, 'local/zone-b/*': 20}}}}]}}
  circuitBreaker: {{maxConnections: 10, maxRetries: 0}}
  retryBudget: {{percent: 50, minRetriesPerSecond: 1, ttl: 30s}}
  connectTimeout: 250ms
  idleTimeout: 1h
"
    );
    let m = model(&text);
    let p = &m
        .traffic_policy_for(&ObjectKey::new("demo", "articles"))
        .unwrap()
        .spec;
    assert_eq!(
        p.load_balancer,
        LoadBalancer::Maglev(HashOn::Header(http::HeaderName::from_static("x-user")))
    );
    let o = p.outlier_detection.as_ref().unwrap();
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway_errors), (3, 2));
    assert_eq!(o.max_ejection_time, Duration::from_secs(60));
    assert_eq!(o.success_rate.as_ref().unwrap().stdev_factor, 2.0);
    assert_eq!(
        o.failure_percentage,
        Some(FailurePercentageEjection {
            threshold: 90,
            ..Default::default()
        })
    );
    let l = p.locality_failover.as_ref().unwrap();
    assert_eq!(l.failover_priority[1].value.as_deref(), Some("zone-a"));
    assert_eq!(l.distribute[0].to.values().sum::<u32>(), 100);
    let zone_a = Locality {
        region: Some("local".into()),
        zone: Some("zone-a".into()),
        subzone: None,
    };
    assert!(l.distribute[0].from.matches(&zone_a));
    assert!(LocalityPattern("local/zone-a/*".into()).matches(&zone_a));
    assert!(!LocalityPattern("local/zone-b".into()).matches(&zone_a));
    assert_eq!(p.circuit_breaker.max_connections, 10);
    assert_eq!(p.circuit_breaker.max_requests, 1024);
    assert_eq!(p.circuit_breaker.max_retries, 0);
    assert_eq!(
        p.retry_budget,
        RetryBudget {
            percent: 50,
            min_retries_per_second: 1,
            ttl: Duration::from_secs(30),
        }
    );
    assert_eq!(p.connect_timeout, Duration::from_millis(250));
}

#[test]
fn traffic_policy_rules() {
    let policy = |spec: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{service: a}}\n{spec}"
        )
    };
    // Hashing balancers need a hash key, and only they may have one.
    let e = errors(&policy("  loadBalancer: {policy: RING_HASH}\n"));
    assert_one(
        &e,
        6,
        17,
        ErrorKind::MissingField,
        "spec.loadBalancer.hashOn",
    );
    let e = errors(&policy(
        "  loadBalancer: {policy: ROUND_ROBIN, hashOn: {sourceIp: true}}\n",
    ));
    assert_one(
        &e,
        6,
        47,
        ErrorKind::InvalidValue,
        "spec.loadBalancer.hashOn",
    );
    let e = errors(&policy(
        "  loadBalancer: {policy: RING_HASH, hashOn: {sourceIp: true, cookie: s}}\n",
    ));
    assert_one(
        &e,
        6,
        70,
        ErrorKind::InvalidValue,
        "spec.loadBalancer.hashOn.cookie",
    );
    let e = errors(&policy("  loadBalancer: {policy: least_request}\n"));
    assert!(
        e[0].reason.contains("did you mean `LEAST_REQUEST`?"),
        "{}",
        e[0]
    );
    // maxEjectionTime may not be below baseEjectionTime; percents stop at 100.
    let e = errors(&policy(
        "  outlierDetection: {baseEjectionTime: 60s, maxEjectionTime: 30s}\n",
    ));
    assert_one(
        &e,
        6,
        62,
        ErrorKind::InvalidValue,
        "spec.outlierDetection.maxEjectionTime",
    );
    let e = errors(&policy("  outlierDetection: {maxEjectionPercent: 101}\n"));
    assert_one(
        &e,
        6,
        42,
        ErrorKind::InvalidValue,
        "spec.outlierDetection.maxEjectionPercent",
    );
    // Distribute weights add up to 100; failover and distribute exclude each other.
    let e = errors(&policy(
        "  localityFailover: {distribute: [{from: r1, to: {r1: 50}}]}\n",
    ));
    assert_one(
        &e,
        6,
        50,
        ErrorKind::InvalidValue,
        "spec.localityFailover.distribute[0].to",
    );
    let e = errors(&policy(
        "  localityFailover: {failover: [{from: r1, to: r2}], distribute: [{from: r1, to: {r1: 100}}]}\n",
    ));
    assert_one(
        &e,
        6,
        66,
        ErrorKind::InvalidValue,
        "spec.localityFailover.distribute",
    );
    let e = errors(&policy(
        "  localityFailover: {failover: [{from: r1, to: r1}]}\n",
    ));
    assert_one(
        &e,
        6,
        48,
        ErrorKind::InvalidValue,
        "spec.localityFailover.failover[0].to",
    );
    // A retry budget is a percentage and a count; nothing else.
    let e = errors(&policy("  retryBudget: {percent: 120}\n"));
    assert_one(
        &e,
        6,
        26,
        ErrorKind::InvalidValue,
        "spec.retryBudget.percent",
    );
    let e = errors(&policy("  retryBudget: {minRetriesPerSecond: -1}\n"));
    assert_one(
        &e,
        6,
        38,
        ErrorKind::InvalidValue,
        "spec.retryBudget.minRetriesPerSecond",
    );
    let e = errors(&policy("  retryBudget: {ttl: 0s}\n"));
    assert_one(&e, 6, 22, ErrorKind::InvalidValue, "spec.retryBudget.ttl");
    let e = errors(&policy("  retryBudget: {ratio: 0.2}\n"));
    assert_eq!(e.len(), 1, "{}", ValidationErrors(e.clone()));
    assert_eq!(e[0].field, "spec.retryBudget.ratio");
}

#[test]
fn route_rules() {
    let with_match = |m: &str| ROUTED.replace("      path: {prefix: /reads}\n", m);
    let e = errors(&with_match("      path: {prefix: /a, exact: /b}\n"));
    assert_one(
        &e,
        9,
        33,
        ErrorKind::InvalidValue,
        "spec.routes[0].match.path.exact",
    );
    let e = errors(&with_match("      path: {prefix: reads}\n"));
    assert_one(
        &e,
        9,
        22,
        ErrorKind::InvalidValue,
        "spec.routes[0].match.path.prefix",
    );
    let e = errors(&with_match("      method: get\n"));
    assert_one(
        &e,
        9,
        15,
        ErrorKind::InvalidValue,
        "spec.routes[0].match.method",
    );
    assert!(e[0].reason.contains("did you mean GET?"));
    let e = errors(&with_match(
        "      headers: [{name: \"bad header\", exact: x}]\n",
    ));
    assert_one(
        &e,
        9,
        24,
        ErrorKind::InvalidValue,
        "spec.routes[0].match.headers[0].name",
    );
    let e = errors(&with_match("      headers: [{name: x-canary}]\n"));
    assert_one(
        &e,
        9,
        17,
        ErrorKind::MissingField,
        "spec.routes[0].match.headers[0]",
    );

    let parsed = model(&with_match(
        "      method: POST\n      headers: [{name: X-Canary, regex: '^1$', invert: true}]\n",
    ));
    let route = &parsed.services[&ObjectKey::new("demo", "articles")]
        .spec
        .routes[0];
    assert_eq!(route.matches.method, Some(http::Method::POST));
    assert_eq!(
        route.matches.headers,
        vec![HeaderMatch {
            name: http::HeaderName::from_static("x-canary"),
            value: ValueMatch::Regex("^1$".into()),
            invert: true
        }]
    );

    let e = errors(
        &ROUTED
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 0"),
    );
    assert_one(
        &e,
        11,
        7,
        ErrorKind::InvalidValue,
        "spec.routes[0].destinations",
    );
    let e = errors(&ROUTED.replace("{service: reads, weight: 90}", "{service: a.b.c}"));
    assert_one(
        &e,
        11,
        17,
        ErrorKind::InvalidValue,
        "spec.routes[0].destinations[0].service",
    );

    let retries = |r: &str| ROUTED.replace("    timeout: 5s\n", &format!("    retries: {r}\n"));
    let e = errors(&retries("{retryOn: [retriable-status-codes]}"));
    assert_one(
        &e,
        13,
        24,
        ErrorKind::MissingField,
        "spec.routes[0].retries.retriableStatusCodes",
    );
    let e = errors(&retries("{retriableStatusCodes: [503]}"));
    assert_one(
        &e,
        13,
        37,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.retriableStatusCodes",
    );
    let e = errors(&retries("{retryOn: [5xx, sometimes]}"));
    assert_one(
        &e,
        13,
        30,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.retryOn[1]",
    );
    let e = errors(&retries("{backoffBase: 1s, backoffMax: 100ms}"));
    assert_one(
        &e,
        13,
        44,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.backoffMax",
    );
    let e = errors(&retries("{perTryTimeout: 0s}"));
    assert_one(
        &e,
        13,
        30,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.perTryTimeout",
    );
    // `attempts: 0` turns retries off for the route; more than 100 is refused.
    let m = model(&retries("{attempts: 0}"));
    let route = &m.services[&ObjectKey::new("demo", "articles")].spec.routes[0];
    assert_eq!(route.retries.as_ref().map(|r| r.attempts), Some(0));
    let e = errors(&retries("{attempts: 101}"));
    assert_one(
        &e,
        13,
        25,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.attempts",
    );
    // Retrying non-idempotent requests is opt-in, and only with a condition it changes.
    let m = model(&retries(
        "{retryOn: [reset, 5xx], retryNonIdempotent: true}",
    ));
    let route = &m.services[&ObjectKey::new("demo", "articles")].spec.routes[0];
    assert_eq!(
        route.retries.as_ref().map(|r| r.retry_non_idempotent),
        Some(true)
    );
    let m = model(&retries("{attempts: 2}"));
    let route = &m.services[&ObjectKey::new("demo", "articles")].spec.routes[0];
    assert_eq!(
        route.retries.as_ref().map(|r| r.retry_non_idempotent),
        Some(false)
    );
    let e = errors(&retries("{retryNonIdempotent: true}"));
    assert_one(
        &e,
        13,
        35,
        ErrorKind::InvalidValue,
        "spec.routes[0].retries.retryNonIdempotent",
    );
    let e = errors(&retries("{retryOn: [reset], retryNonIdempotent: yes}"));
    assert_eq!(e.len(), 1, "{e:?}");

    let tcp = ROUTED.replacen(
        "ports: [{port: 80}]",
        "ports: [{port: 80, protocol: TCP}]",
        1,
    );
    let e = errors(&tcp);
    assert_one(&e, 7, 5, ErrorKind::InvalidValue, "spec.routes");

    let e = errors(&ROUTED.replace("  - name: reads\n", "  - name: reads\n    timeout: 1s\n"));
    assert_eq!(
        e[0].kind,
        ErrorKind::Syntax,
        "duplicate keys are refused: {}",
        e[0]
    );
}

#[test]
fn service_rules() {
    let e = errors(&SERVICE.replace(
        "- {name: http, port: 80}",
        "- {name: http, port: 80}\n  - {name: http, port: 81}",
    ));
    assert_one(&e, 9, 12, ErrorKind::InvalidValue, "spec.ports[1].name");
    let e = errors(&SERVICE.replace("- {name: http, port: 80}", "- {port: 80}\n  - {port: 80}"));
    assert_one(&e, 9, 12, ErrorKind::InvalidValue, "spec.ports[1].port");
    let e = errors(&SERVICE.replace("name: articles", "name: Articles"));
    assert_one(&e, 4, 9, ErrorKind::InvalidValue, "metadata.name");
    let e = errors(&SERVICE.replace("name: articles", "name: a.b"));
    assert_one(&e, 4, 9, ErrorKind::InvalidValue, "metadata.name");
    let e = errors(&SERVICE.replace("ports:\n  - {name: http, port: 80}", "ports: []"));
    assert_one(&e, 7, 10, ErrorKind::InvalidValue, "spec.ports");
    let e = errors(&SERVICE.replace("{app: articles}", "{\"app/x/y\": a}"));
    assert_one(
        &e,
        9,
        14,
        ErrorKind::InvalidValue,
        "spec.selector[\"app/x/y\"]",
    );
}

#[test]
fn workload_rules() {
    let workload = |spec: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  addresses: [10.0.0.1]\n{spec}"
        )
    };
    let e = errors(&workload("  meshed: false\n  mtlsMode: STRICT\n"));
    assert_one(&e, 7, 13, ErrorKind::InvalidValue, "spec.mtlsMode");
    let e = errors(&workload("  locality: {zone: z1}\n"));
    assert_one(&e, 6, 20, ErrorKind::InvalidValue, "spec.locality.zone");
    let e = errors(&workload("  locality: {region: eu/west}\n"));
    assert_one(&e, 6, 22, ErrorKind::InvalidValue, "spec.locality.region");
    let e = errors(&workload("  addresses: []\n").replace("  addresses: [10.0.0.1]\n", ""));
    assert_one(&e, 5, 14, ErrorKind::InvalidValue, "spec.addresses");
    let e = errors(&workload("").replace("[10.0.0.1]", "[10.0.0.1, 10.0.0.1]"));
    assert_one(&e, 5, 25, ErrorKind::InvalidValue, "spec.addresses[1]");
    // YAML 1.1 booleans are strings here, so `yes` is refused rather than guessed.
    let e = errors(&workload("  ready: yes\n"));
    assert_one(&e, 6, 10, ErrorKind::WrongType, "spec.ready");
}

#[test]
fn authorization_policy_rules() {
    let text = "apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ['cluster.local/ns/demo/sa/*'], notIpBlocks: [10.1.0.0/16, 10.2.0.1]}
    to:
    - operation: {methods: [DELETE], paths: ['/admin*', '*.php', /exact, '*'], ports: [8080]}
";
    let resources = parse(text).unwrap();
    let Resource::AuthorizationPolicy(p) = &resources[0] else {
        panic!("not a policy")
    };
    assert_eq!(p.spec.action, AuthorizationAction::Deny);
    let rule = &p.spec.rules[0];
    assert_eq!(
        rule.from[0].principals,
        vec![StringMatch::Prefix("cluster.local/ns/demo/sa/".into())]
    );
    assert_eq!(rule.from[0].not_ip_blocks[1].to_string(), "10.2.0.1/32");
    assert_eq!(
        rule.to[0].paths,
        vec![
            StringMatch::Prefix("/admin".into()),
            StringMatch::Suffix(".php".into()),
            StringMatch::Exact("/exact".into()),
            StringMatch::Any
        ]
    );
    assert!(rule.to[0].paths[0].matches("/admin/users"));
    assert_eq!(rule.to[0].ports, vec![8080]);

    let e = errors(&text.replace(
        "'cluster.local/ns/demo/sa/*'",
        "'spiffe://cluster.local/ns/demo/sa/x'",
    ));
    assert_one(
        &e,
        8,
        29,
        ErrorKind::InvalidValue,
        "spec.rules[0].from[0].source.principals[0]",
    );
    let e = errors(&text.replace("'/admin*'", "'/a*b'"));
    assert_one(
        &e,
        10,
        46,
        ErrorKind::InvalidValue,
        "spec.rules[0].to[0].operation.paths[0]",
    );
    let e = errors(&text.replace("- source: {principals: ['cluster.local/ns/demo/sa/*'], notIpBlocks: [10.1.0.0/16, 10.2.0.1]}", "- source: {}"));
    assert_one(
        &e,
        8,
        15,
        ErrorKind::InvalidValue,
        "spec.rules[0].from[0].source",
    );
    let e = errors(&text.replace("    - source:", "    - src:"));
    assert_eq!(e[0].kind, ErrorKind::UnknownField);
    assert_eq!((e[0].line, e[0].column), (8, 7));
}

// ---------------------------------------------------------------------------------------------
// Queries.

const QUERIES: &str = "apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: keel.local
  rootNamespace: mesh-root
  mtls: {mode: PERMISSIVE}
  namespaceMtls: {payments: STRICT}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: articles, namespace: demo}
spec:
  hostnames: [articles.example.com]
  vips: [10.96.0.10]
  ports: [{port: 80}]
  selector: {app: articles}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: articles, namespace: payments}
spec:
  ports: [{port: 80}]
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: payments}
spec:
  ports: [{port: 80}]
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-1, namespace: demo, labels: {app: articles, version: v1}}
spec: {addresses: [10.77.0.2], serviceAccount: articles}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-2, namespace: demo, labels: {app: articles, version: v2}}
spec: {addresses: [10.77.0.3], ready: false, mtlsMode: DISABLE}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-1, namespace: other, labels: {app: articles}}
spec: {addresses: [10.77.0.4]}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: pay-1, namespace: payments, labels: {app: pay}}
spec: {addresses: [10.77.0.5]}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: legacy, namespace: payments, labels: {app: legacy}}
spec: {addresses: [10.77.0.6], meshed: false}
---
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: demo-wide, namespace: demo}
spec: {}
---
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-v2, namespace: demo}
spec: {selector: {matchLabels: {version: v2}}}
---
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: mesh-root}
spec: {action: DENY}
---
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: all-articles, namespace: mesh-root}
spec: {selector: {matchLabels: {app: articles}}, action: AUDIT}
";

fn names<T>(items: &[&T], meta: impl Fn(&T) -> &Metadata) -> Vec<String> {
    items.iter().map(|i| meta(i).key().to_string()).collect()
}

#[test]
fn endpoints_of_selects_within_the_namespace() {
    let m = model(QUERIES);
    let endpoints = m.endpoints_of(&ObjectKey::new("demo", "articles"));
    assert_eq!(
        names(&endpoints, |w: &Workload| &w.meta),
        vec!["demo/articles-1", "demo/articles-2"]
    );
    // An empty selector selects nothing; an unknown service has no endpoints.
    assert!(
        m.endpoints_of(&ObjectKey::new("payments", "web"))
            .is_empty()
    );
    assert!(m.endpoints_of(&ObjectKey::new("demo", "nope")).is_empty());
    // The index gives the same answers for every service.
    let index = m.endpoint_index();
    for key in m.services.keys().chain([&ObjectKey::new("demo", "nope")]) {
        assert_eq!(
            names(&index.endpoints_of(key), |w: &Workload| &w.meta),
            names(&m.endpoints_of(key), |w: &Workload| &w.meta),
            "{key}"
        );
    }
    let services = m.services_of(&ObjectKey::new("demo", "articles-2"));
    assert_eq!(
        names(&services, |s: &Service| &s.meta),
        vec!["demo/articles"]
    );
}

#[test]
fn policies_for_combines_root_namespace_and_selectors() {
    let m = model(QUERIES);
    let p = |ns: &str, name: &str| {
        names(
            &m.policies_for(&ObjectKey::new(ns, name)),
            |p: &AuthorizationPolicy| &p.meta,
        )
    };
    assert_eq!(
        p("demo", "articles-1"),
        vec![
            "mesh-root/all-articles",
            "mesh-root/mesh-wide",
            "demo/demo-wide"
        ]
    );
    assert_eq!(
        p("demo", "articles-2"),
        vec![
            "mesh-root/all-articles",
            "mesh-root/mesh-wide",
            "demo/demo-wide",
            "demo/only-v2"
        ]
    );
    // Root-namespace selectors match across namespaces; other namespaces' policies do not.
    assert_eq!(
        p("other", "articles-1"),
        vec!["mesh-root/all-articles", "mesh-root/mesh-wide"]
    );
    assert_eq!(p("payments", "pay-1"), vec!["mesh-root/mesh-wide"]);
    assert!(p("demo", "missing").is_empty());
}

#[test]
fn mtls_mode_precedence() {
    let m = model(QUERIES);
    let mode = |ns: &str, name: &str| m.mtls_mode_for(&ObjectKey::new(ns, name));
    assert_eq!(mode("demo", "articles-1"), MtlsMode::Permissive); // mesh
    assert_eq!(mode("demo", "articles-2"), MtlsMode::Disable); // workload beats mesh
    assert_eq!(mode("payments", "pay-1"), MtlsMode::Strict); // namespace beats mesh
    assert_eq!(mode("payments", "legacy"), MtlsMode::Disable); // no sidecar, no mTLS
    assert_eq!(mode("payments", "not-yet-known"), MtlsMode::Strict);
    let w = &m.workloads[&ObjectKey::new("demo", "articles-1")];
    assert_eq!(m.spiffe_id(w), "spiffe://keel.local/ns/demo/sa/articles");
}

#[test]
fn resolve_host_by_name_and_vip() {
    let m = model(QUERIES);
    let key = |s: Option<&Service>| s.map(|s| s.meta.key().to_string());
    assert_eq!(
        key(m.resolve_host("articles.example.com")),
        Some("demo/articles".into())
    );
    assert_eq!(
        key(m.resolve_host("Articles.Example.com.:443")),
        Some("demo/articles".into())
    );
    assert_eq!(
        key(m.resolve_host("10.96.0.10")),
        Some("demo/articles".into())
    );
    assert_eq!(
        key(m.resolve_host("web.payments.svc.cluster.local")),
        Some("payments/web".into())
    );
    assert_eq!(key(m.resolve_host("web")), Some("payments/web".into()));
    // `articles` explicitly lists its hostnames, so the default names are not its.
    assert_eq!(
        key(m.resolve_host("articles")),
        Some("payments/articles".into())
    );
    assert_eq!(key(m.resolve_host("nothing.here")), None);
    assert_eq!(
        key(m.resolve_host_in("demo", "web")),
        Some("payments/web".into())
    );
}

#[test]
fn short_names_shared_by_two_namespaces_resolve_from_a_namespace() {
    let elsewhere = SERVICE.replace("namespace: demo", "namespace: other");
    let m = model(&format!("{SERVICE}---\n{elsewhere}"));
    assert!(m.resolve_host("articles").is_none(), "ambiguous");
    let key = |s: Option<&Service>| s.map(|s| s.meta.key().to_string());
    assert_eq!(
        key(m.resolve_host_in("other", "articles")),
        Some("other/articles".into())
    );
    assert_eq!(
        key(m.resolve_host_in("demo", "articles")),
        Some("demo/articles".into())
    );
    assert_eq!(
        key(m.resolve_host("articles.other")),
        Some("other/articles".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Loading from disk.

#[test]
fn load_dir_skips_hidden_and_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("nested/deeper")).unwrap();
    fs::create_dir_all(root.join(".git")).unwrap();
    fs::create_dir_all(root.join("..data")).unwrap();
    fs::write(root.join("b.yaml"), SERVICE).unwrap();
    fs::write(
        root.join("nested/deeper/a.yml"),
        SERVICE.replace("articles", "comments"),
    )
    .unwrap();
    fs::write(root.join("notes.txt"), "not yaml: [").unwrap();
    for skipped in [
        ".hidden.yaml",
        "b.yaml~",
        ".b.yaml.swp",
        "c.yaml.swp",
        ".git/x.yaml",
        "..data/x.yaml",
    ] {
        fs::write(root.join(skipped), "this is: [not valid").unwrap();
    }
    let (m, files) = load_dir(root).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        files,
        vec![root.join("b.yaml"), root.join("nested/deeper/a.yml")]
    );
    assert_eq!(m.services.len(), 2);

    // An empty directory is an empty mesh.
    let empty = tempfile::tempdir().unwrap();
    let (m, files) = load_dir(empty.path()).unwrap();
    assert!(files.is_empty());
    assert_eq!(m, Model::default());
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::os::unix::fs::symlink(root.join("gone.yaml"), root.join("broken.yaml")).unwrap();
    fs::write(root.join("latin1.yaml"), b"kind: caf\xe9\n").unwrap();
    let errors = load_dir(root).unwrap_err().0;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].file, root.join("broken.yaml"));
    assert_eq!((errors[0].kind, errors[0].line), (ErrorKind::Io, 0));
    assert!(errors[0].to_string().starts_with(&format!(
        "{}: io: cannot read",
        root.join("broken.yaml").display()
    )));
    assert_eq!(errors[1].file, root.join("latin1.yaml"));
    assert_eq!(
        (errors[1].kind, errors[1].line, errors[1].column),
        (ErrorKind::Syntax, 1, 10)
    );

    let missing = load_dir(&root.join("missing")).unwrap_err().0;
    assert_eq!(missing[0].kind, ErrorKind::Io);
}

#[test]
fn load_files_takes_files_and_directories_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("d")).unwrap();
    fs::write(root.join("d/a.yaml"), SERVICE).unwrap();
    fs::write(
        root.join("extra.txt"),
        SERVICE.replace("articles", "comments"),
    )
    .unwrap();
    let m = load_files(&[
        root.join("d"),
        root.join("d/a.yaml"),
        root.join("extra.txt"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.services.len(), 2);
    let errors = load_files(&[root.join("nope.yaml")]).unwrap_err().0;
    assert_eq!(errors[0].kind, ErrorKind::Io);
}

#[test]
fn symlink_loops_terminate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("d")).unwrap();
    fs::write(root.join("d/a.yaml"), SERVICE).unwrap();
    std::os::unix::fs::symlink(root, root.join("d/loop")).unwrap();
    let (m, files) = load_dir(root).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(files.len(), 1);
    assert_eq!(m.services.len(), 1);
}

#[test]
fn the_example_mesh_loads() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh"));
    let (m, files) = load_dir(dir).unwrap_or_else(|e| panic!("examples/mesh is invalid:\n{e}"));
    assert_eq!(files.len(), 4);
    assert_eq!(m.mesh.trust_domain, "keel.local");
    let svc = |name: &str| ObjectKey::new("demo", name);
    for (service, endpoints) in [
        ("frontend", 1),
        ("articles", 2),
        ("comments", 2),
        ("reads", 1),
    ] {
        assert_eq!(m.endpoints_of(&svc(service)).len(), endpoints, "{service}");
    }
    assert!(matches!(
        m.traffic_policy_for(&svc("reads"))
            .map(|p| &p.spec.load_balancer),
        Some(LoadBalancer::RingHash(HashOn::SourceIp))
    ));
    let articles_1 = ObjectKey::new("demo", "articles-1");
    assert_eq!(m.policies_for(&articles_1).len(), 1);
    assert_eq!(m.mtls_mode_for(&articles_1), MtlsMode::Permissive);
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

#[test]
fn garbage_never_panics() {
    let mut inputs: Vec<String> = vec![
        String::new(),
        "\0\0\0".into(),
        "}{][".into(),
        ":".into(),
        "- - - -".into(),
        "&a [*a]".into(),
        "? [a]\n: b".into(),
        "!!binary aGVsbG8=".into(),
        "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: [x]}\nspec: 7\n".into(),
        "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1e999}, {port: .nan}, {port: 99999999999999999999999999999}]}\n".into(),
        "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], routes: [{name: r, destinations: [{service: a, weight: 4294967295}, {service: a, weight: 4294967295}]}]}\n".into(),
        "apiVersion: keel.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: a\n  <<: {namespace: x}\nspec: {addresses: [::1]}\n".into(),
        "---\n---\n...\n---\n%YAML 1.2\n---\n".into(),
        "\u{feff}\u{feff}---".into(),
        "a: 'é\u{1F600}'\n  b: c".into(),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("{}x", "- ".repeat(5_000)),
        (0..200).map(|i| format!("{}k{i}:\n", "  ".repeat(i))).collect(),
    ];
    // Pseudo-random bytes (a fixed LCG, so failures reproduce).
    const ALPHABET: &[u8] = b" -:[]{}#&*!|>'\"\n\tak1";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..64 {
        let bytes: Vec<u8> = (0..256)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                (state >> 33) as u8
            })
            .collect();
        inputs.push(String::from_utf8_lossy(&bytes).into_owned());
        let printable: String = bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
            .collect();
        inputs.push(printable);
    }
    for input in &inputs {
        // Every input yields resources or located errors; none panics.
        if let Err(errors) = parse(input) {
            assert!(!errors.is_empty());
            for e in &errors {
                assert!(e.line >= 1 && e.column >= 1, "{e}");
            }
        }
    }
    assert!(parse(&inputs[15]).is_err(), "deep nesting is refused");
}

#[test]
fn alias_bombs_are_refused() {
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
";
    let errors = errors(bomb);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, ErrorKind::Syntax);
}

/// A duration past its field's ceiling is refused where it is written: the proxy would compute
/// `now + interval` with it and overflow.
#[test]
fn durations_past_their_ceiling_are_refused() {
    let text = format!(
        "{SERVICE}---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: articles, namespace: demo}}
spec:
  targetRef: {{service: articles}}
  outlierDetection: {{consecutive5xx: 3, consecutiveGatewayErrors: 2, interval: 5s}}
"
    );
    // Within the ceiling (an hour): accepted.
    model(&text.replace("interval: 5s", "interval: 1h"));
    let errors = errors(&text.replace("interval: 5s", "interval: 100000000h"));
    assert_one(
        &errors,
        16,
        80,
        ErrorKind::InvalidValue,
        "spec.outlierDetection.interval",
    );
    assert!(
        errors[0]
            .reason
            .contains("longer than the most this field allows, 1h"),
        "{}",
        errors[0]
    );
    // Every duration field has one.
    let text = ROUTED.replace("timeout: 5s", "timeout: 25h");
    assert_one(
        &errors_of(&text),
        13,
        14,
        ErrorKind::InvalidValue,
        "spec.routes[0].timeout",
    );
}

#[test]
fn export_to_resolves_namespaces_and_refuses_nonsense() {
    let exported = |list: &str| format!("{SERVICE}  exportTo: {list}\n");
    let key = ObjectKey::new("demo", "articles");
    let m = model(&exported("[\".\", shop]"));
    let spec = &m.services[&key].spec;
    assert!(spec.visible_in("demo") && spec.visible_in("shop"));
    assert!(!spec.visible_in("other"));
    assert!(
        model(&exported("[\"*\"]")).services[&key]
            .spec
            .export_to
            .is_none()
    );
    assert!(model(SERVICE).services[&key].spec.visible_in("anywhere"));
    assert_one(
        &errors(&exported("[\"*\", shop]")),
        10,
        13,
        ErrorKind::InvalidValue,
        "spec.exportTo",
    );
    assert_one(
        &errors(&exported("[Shop_1]")),
        10,
        14,
        ErrorKind::InvalidValue,
        "spec.exportTo[0]",
    );
}
