//! Decoding YAML documents into typed resources, one document at a time.
//!
//! Each document is first read as a header (`apiVersion`, `kind`) to pick its type, then decoded
//! field by field. Every field-level rule lives here: required fields, ranges, formats, and the
//! rules that tie fields of one resource together (exactly one of `exact|prefix|regex`, a hash
//! key only with a hashing balancer). Rules that need other resources (references, duplicates)
//! belong to `validate`. Decoding must never stop at the first problem of a document and never
//! panic, whatever the input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use keel_proto::limits;

use super::decode::{
    Decoder, Field, Fields, check_any, check_dns_label, check_dns_subdomain, check_label_key,
    check_label_value, check_service_name,
};
use super::error::{ErrorKind, ValidationError, ValidationErrors};
use super::resources::*;
use super::yaml::{Node, Value, parse_document, quote, split_documents};

/// Parses every document of one file. Problems from all documents are reported together; the
/// file yields resources only if it has none.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Resource>, ValidationErrors> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    let mut index = 0;
    for document in split_documents(text) {
        let node = match parse_document(path, &document) {
            Ok(node) if node.value == Value::Null => continue,
            Ok(node) => node,
            Err(error) => {
                errors.push(error);
                index += 1;
                continue;
            }
        };
        let origin = Origin {
            file: path.to_path_buf(),
            document: index,
            line: node.pos.line,
            column: node.pos.column,
            byte_range: document.byte_range.clone(),
            fields: FieldPositions::default(),
        };
        index += 1;
        match decode_resource(path, origin, &node) {
            Ok(resource) => resources.push(resource),
            Err(mut problems) => errors.append(&mut problems),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        let mut errors = ValidationErrors(errors);
        errors.sort();
        Err(errors)
    }
}

const KIND_NAMES: [(&str, Kind); 5] = [
    ("MeshConfig", Kind::MeshConfig),
    ("Workload", Kind::Workload),
    ("Service", Kind::Service),
    ("TrafficPolicy", Kind::TrafficPolicy),
    ("AuthorizationPolicy", Kind::AuthorizationPolicy),
];

/// Decodes one non-empty document.
fn decode_resource(
    file: &Path,
    mut origin: Origin,
    node: &Node,
) -> Result<Resource, Vec<ValidationError>> {
    let mut dec = Decoder::new(file);
    let kind = header(&mut dec, node);
    let resource = kind.and_then(|kind| decode_kind(&mut dec, node, kind, &origin));
    let (errors, fields) = dec.into_parts();
    match resource {
        Some(mut resource) if errors.is_empty() => {
            origin.fields = fields;
            set_origin(&mut resource, origin);
            Ok(resource)
        }
        _ => Err(errors),
    }
}

fn set_origin(resource: &mut Resource, origin: Origin) {
    // The resource was just decoded, so nothing else holds it and nothing is copied.
    match resource {
        Resource::MeshConfig(r) => Arc::make_mut(r).origin = origin,
        Resource::Workload(r) => Arc::make_mut(r).origin = origin,
        Resource::Service(r) => Arc::make_mut(r).origin = origin,
        Resource::TrafficPolicy(r) => Arc::make_mut(r).origin = origin,
        Resource::AuthorizationPolicy(r) => Arc::make_mut(r).origin = origin,
    }
}

/// Checks `apiVersion` and `kind` before anything else, so that a Kubernetes Deployment in the
/// directory yields one clear error instead of a list of unknown fields.
fn header(dec: &mut Decoder<'_>, node: &Node) -> Option<Kind> {
    let Value::Map(entries) = &node.value else {
        let reason = format!(
            "a document must be a mapping with apiVersion, kind, metadata and spec; found {}",
            node.value.describe()
        );
        dec.error(node.pos, "", ErrorKind::WrongType, reason);
        return None;
    };
    let lookup = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == name))
            .map(|(_, v)| v)
    };

    let api_ok = match lookup("apiVersion") {
        None => {
            let reason = format!("missing required field `apiVersion` (use {API_VERSION})");
            dec.error(node.pos, "apiVersion", ErrorKind::MissingField, reason);
            false
        }
        Some(value) => match &value.value {
            Value::Str(s) if s == API_VERSION => true,
            Value::Str(s) => {
                let reason = format!(
                    "apiVersion {} is not supported; keel reads {API_VERSION}",
                    quote(s)
                );
                dec.error(
                    value.pos,
                    "apiVersion",
                    ErrorKind::UnsupportedApiVersion,
                    reason,
                );
                false
            }
            other => {
                let reason = format!("expected a string, found {}", other.describe());
                dec.error(value.pos, "apiVersion", ErrorKind::WrongType, reason);
                false
            }
        },
    };

    let kind = match lookup("kind") {
        None => {
            dec.error(
                node.pos,
                "kind",
                ErrorKind::MissingField,
                "missing required field `kind`",
            );
            None
        }
        Some(value) => match &value.value {
            Value::Str(s) => {
                let found = KIND_NAMES.iter().find(|(name, _)| name == s);
                if found.is_none() {
                    let names: Vec<&str> = KIND_NAMES.iter().map(|(n, _)| *n).collect();
                    let reason = match names.iter().find(|n| n.eq_ignore_ascii_case(s)) {
                        Some(n) => format!("unknown kind {}; did you mean {n}?", quote(s)),
                        None => format!(
                            "unknown kind {}; expected one of: {}",
                            quote(s),
                            names.join(", ")
                        ),
                    };
                    dec.error(value.pos, "kind", ErrorKind::UnknownKind, reason);
                }
                found.map(|(_, kind)| *kind)
            }
            other => {
                let reason = format!("expected a string, found {}", other.describe());
                dec.error(value.pos, "kind", ErrorKind::WrongType, reason);
                None
            }
        },
    };
    if api_ok { kind } else { None }
}

fn decode_kind(
    dec: &mut Decoder<'_>,
    node: &Node,
    kind: Kind,
    origin: &Origin,
) -> Option<Resource> {
    let root = dec.fields(node, "", &["apiVersion", "kind", "metadata", "spec"])?;
    let meta = metadata(dec, &root, kind);
    let origin = origin.clone();
    let namespace = meta
        .as_ref()
        .map(|m| m.namespace.clone())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());

    let resource = match kind {
        Kind::MeshConfig => {
            // Every MeshConfig field has a default, so `spec` may be left out.
            let spec = match root.get("spec") {
                Some(field) => mesh_config_spec(dec, field),
                None => Some(MeshConfigSpec::default()),
            };
            Resource::MeshConfig(Arc::new(MeshConfig {
                meta: meta?,
                origin,
                spec: spec?,
            }))
        }
        Kind::Workload => {
            let spec = root
                .require(dec, "spec")
                .and_then(|f| workload_spec(dec, f));
            Resource::Workload(Arc::new(Workload {
                meta: meta?,
                origin,
                spec: spec?,
            }))
        }
        Kind::Service => {
            let name = meta.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            let key = ObjectKey::new(namespace, name);
            let spec = root
                .require(dec, "spec")
                .and_then(|f| service_spec(dec, f, &key));
            Resource::Service(Arc::new(Service {
                meta: meta?,
                origin,
                spec: spec?,
            }))
        }
        Kind::TrafficPolicy => {
            let spec = root
                .require(dec, "spec")
                .and_then(|f| traffic_policy_spec(dec, f, &namespace));
            Resource::TrafficPolicy(Arc::new(TrafficPolicy {
                meta: meta?,
                origin,
                spec: spec?,
            }))
        }
        Kind::AuthorizationPolicy => {
            let spec = root
                .require(dec, "spec")
                .and_then(|f| authorization_policy_spec(dec, f));
            Resource::AuthorizationPolicy(Arc::new(AuthorizationPolicy {
                meta: meta?,
                origin,
                spec: spec?,
            }))
        }
    };
    Some(resource)
}

fn metadata(dec: &mut Decoder<'_>, root: &Fields<'_>, kind: Kind) -> Option<Metadata> {
    let field = root.require(dec, "metadata")?;
    let m = dec.fields(
        field.node,
        field.path(),
        &["name", "namespace", "labels", "annotations"],
    )?;
    let check_name = if kind == Kind::Service {
        check_service_name
    } else {
        check_dns_subdomain
    };
    let name = m
        .require(dec, "name")
        .and_then(|f| dec.checked_string(f, check_name));
    let namespace = match (m.get("namespace"), kind.is_namespaced()) {
        (None, true) => Some(DEFAULT_NAMESPACE.to_owned()),
        (None, false) => Some(String::new()),
        (Some(f), true) => dec.checked_string(f, check_dns_label),
        (Some(f), false) => {
            dec.invalid(
                f,
                format!("{kind} is cluster-scoped; remove `metadata.namespace`"),
            );
            None
        }
    };
    let labels = m
        .get("labels")
        .and_then(|f| dec.labels(f))
        .unwrap_or_default();
    let annotations = m
        .get("annotations")
        .and_then(|f| dec.string_map(f, check_label_key, check_any))
        .unwrap_or_default();
    Some(Metadata {
        name: name?,
        namespace: namespace?,
        labels,
        annotations,
    })
}

// ---------------------------------------------------------------------------------------------
// MeshConfig

const MTLS_MODES: [(&str, MtlsMode); 3] = [
    ("STRICT", MtlsMode::Strict),
    ("PERMISSIVE", MtlsMode::Permissive),
    ("DISABLE", MtlsMode::Disable),
];

fn check_trust_domain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "trust domain {} must be 1 to 255 characters of a-z, 0-9, '.', '_' and '-'",
            quote(s)
        ))
    }
}

fn mesh_config_spec(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<MeshConfigSpec> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "trustDomain",
            "rootNamespace",
            "mtls",
            "namespaceMtls",
            "outboundTrafficPolicy",
        ],
    )?;
    let defaults = MeshConfigSpec::default();
    let trust_domain = f
        .get("trustDomain")
        .map(|f| dec.checked_string(f, check_trust_domain));
    let root_namespace = f
        .get("rootNamespace")
        .map(|f| dec.checked_string(f, check_dns_label));
    let mtls = f.get("mtls").map(|field| {
        let m = dec.fields(field.node, field.path(), &["mode"])?;
        match m.get("mode") {
            Some(mode) => dec.one_of(mode, &MTLS_MODES),
            None => Some(MtlsMode::default()),
        }
    });
    let namespace_mtls = f.get("namespaceMtls").map(|field| {
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (namespace, key_pos, item) in dec.entries(field)? {
            if let Err(reason) = check_dns_label(&namespace) {
                dec.error(key_pos, &item.path, ErrorKind::InvalidValue, reason);
                ok = false;
            }
            match dec.one_of(item.field(), &MTLS_MODES) {
                Some(mode) => {
                    out.insert(namespace, mode);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    });
    let outbound = f.get("outboundTrafficPolicy").map(|f| {
        dec.one_of(
            f,
            &[
                ("ALLOW_ANY", OutboundTrafficPolicy::AllowAny),
                ("REGISTRY_ONLY", OutboundTrafficPolicy::RegistryOnly),
            ],
        )
    });
    Some(MeshConfigSpec {
        trust_domain: or_default(trust_domain, defaults.trust_domain)?,
        root_namespace: or_default(root_namespace, defaults.root_namespace)?,
        mtls: or_default(mtls, defaults.mtls)?,
        namespace_mtls: or_default(namespace_mtls, defaults.namespace_mtls)?,
        outbound_traffic_policy: or_default(outbound, defaults.outbound_traffic_policy)?,
    })
}

/// `None` (field absent) → `Some(None)`; `Some(None)` (field invalid) → `None`.
fn optional<T>(value: Option<Option<T>>) -> Option<Option<T>> {
    match value {
        None => Some(None),
        Some(decoded) => decoded.map(Some),
    }
}

/// `None` (field absent) → the default; `Some(None)` (field invalid) → `None`.
fn or_default<T>(value: Option<Option<T>>, default: T) -> Option<T> {
    match value {
        None => Some(default),
        Some(decoded) => decoded,
    }
}

// ---------------------------------------------------------------------------------------------
// Workload

fn check_locality_part(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 {
        return Err("must be 1 to 128 characters".to_owned());
    }
    if s.chars()
        .any(|c| c == '/' || c == '*' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{} must not contain '/', '*' or whitespace (they separate and match localities)",
            quote(s)
        ));
    }
    Ok(())
}

fn locality(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<Locality> {
    let f = dec.fields(field.node, field.path(), &["region", "zone", "subzone"])?;
    let mut part = |name: &str| {
        f.get(name)
            .map(|field| dec.checked_string(field, check_locality_part))
    };
    let region = part("region");
    let zone = part("zone");
    let subzone = part("subzone");
    if let (None, Some(_)) = (&region, &zone)
        && let Some(zone) = f.get("zone")
    {
        dec.invalid(zone, "a zone needs a region");
        return None;
    }
    if let (None, Some(_)) = (&zone, &subzone)
        && let Some(subzone) = f.get("subzone")
    {
        dec.invalid(subzone, "a subzone needs a zone");
        return None;
    }
    Some(Locality {
        region: optional(region)?,
        zone: optional(zone)?,
        subzone: optional(subzone)?,
    })
}

fn workload_spec(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<WorkloadSpec> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "serviceAccount",
            "addresses",
            "locality",
            "weight",
            "ready",
            "meshed",
            "mtlsMode",
        ],
    )?;
    let service_account = f
        .get("serviceAccount")
        .map(|f| dec.checked_string(f, check_dns_subdomain));
    let addresses = f.require(dec, "addresses").and_then(|field| {
        let addresses = unique_list(dec, field, "address", |dec, f| dec.ip(f))?;
        if addresses.is_empty() {
            dec.invalid(field, "a workload needs at least one address");
            return None;
        }
        Some(addresses)
    });
    let locality_value = f.get("locality").map(|f| locality(dec, f));
    let weight = f.get("weight").map(|f| dec.integer(f, 1u32, u32::MAX));
    let ready = f.get("ready").map(|f| dec.bool(f));
    let meshed = f.get("meshed").map(|f| dec.bool(f));
    let mtls_mode = f.get("mtlsMode").map(|f| dec.one_of(f, &MTLS_MODES));
    let meshed = or_default(meshed, true)?;
    if let (false, Some(field)) = (meshed, f.get("mtlsMode")) {
        dec.invalid(
            field,
            "mtlsMode applies only to meshed workloads; this one has `meshed: false`",
        );
        return None;
    }
    Some(WorkloadSpec {
        service_account: or_default(service_account, "default".to_owned())?,
        addresses: addresses?,
        locality: or_default(locality_value, Locality::default())?,
        weight: or_default(weight, 1)?,
        ready: or_default(ready, true)?,
        meshed,
        mtls_mode: optional(mtls_mode)?,
    })
}

/// A list whose items must be distinct; a repeat is reported at the repeat.
fn unique_list<T: PartialEq + std::fmt::Display>(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    what: &str,
    mut decode: impl FnMut(&mut Decoder<'_>, Field<'_>) -> Option<T>,
) -> Option<Vec<T>> {
    let items = dec.list(field)?;
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in &items {
        match decode(dec, item.field()) {
            Some(value) if out.contains(&value) => {
                dec.invalid(item.field(), format!("{what} {value} is listed twice"));
                ok = false;
            }
            Some(value) => out.push(value),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

// ---------------------------------------------------------------------------------------------
// Service

/// `name` (in `namespace`) or `name.namespace`.
fn service_ref(dec: &mut Decoder<'_>, field: Field<'_>, namespace: &str) -> Option<ObjectKey> {
    dec.parsed(field, |s| {
        let (name, ns) = s.split_once('.').unwrap_or((s, namespace));
        if ns.contains('.') {
            return Err(format!(
                "{} is not a service reference; write `name` or `name.namespace`",
                quote(s)
            ));
        }
        check_service_name(name).map_err(|e| format!("service name: {e}"))?;
        check_dns_label(ns).map_err(|e| format!("namespace: {e}"))?;
        Ok(ObjectKey::new(ns, name))
    })
}

fn service_spec(dec: &mut Decoder<'_>, field: Field<'_>, key: &ObjectKey) -> Option<ServiceSpec> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "hostnames",
            "vips",
            "ports",
            "selector",
            "routes",
            "exportTo",
        ],
    )?;
    let hostnames = f.get("hostnames").map(|field| {
        unique_list(dec, field, "hostname", |dec, f| {
            dec.checked_string(f, |s| {
                check_dns_subdomain(s).map_err(|e| format!("hostname {e}"))
            })
        })
    });
    let vips = f
        .get("vips")
        .map(|field| unique_list(dec, field, "address", |dec, f| dec.ip(f)));
    let ports = f
        .require(dec, "ports")
        .and_then(|field| service_ports(dec, field));
    let selector = f.get("selector").map(|f| dec.labels(f));
    // A route may match some of the service's hostnames; unknown when they failed to parse.
    let known_hosts = match &hostnames {
        Some(None) => None,
        Some(Some(listed)) if !listed.is_empty() => Some(listed.clone()),
        _ => Some(ServiceSpec::default_hostnames(key)),
    };
    let routes = f
        .get("routes")
        .map(|field| routes(dec, field, &key.namespace, known_hosts.as_deref()));
    let export_to = f.get("exportTo").map(|field| export_to(dec, field, key));

    if let (Some(ports), Some(Some(routes)), Some(routes_field)) =
        (&ports, &routes, f.get("routes"))
        && !routes.is_empty()
        && ports.iter().all(|p| p.protocol == Some(Protocol::Tcp))
    {
        dec.invalid(
            routes_field,
            "routes apply to HTTP traffic, but every port of this service is TCP",
        );
        return None;
    }

    let hostnames = match or_default(hostnames, Vec::new())? {
        listed if listed.is_empty() => ServiceSpec::default_hostnames(key),
        listed => listed,
    };
    Some(ServiceSpec {
        hostnames,
        vips: or_default(vips, Vec::new())?,
        ports: ports?,
        selector: or_default(selector, BTreeMap::new())?,
        routes: or_default(routes, Vec::new())?,
        export_to: or_default(export_to, None)?,
    })
}

/// `exportTo`, as Istio spells it: `"*"` (every namespace, the default), `"."` (the service's
/// own) or namespace names. Resolved to a set of namespaces, or `None` for every one. Istio's
/// `"~"` (no namespace) is not offered: a service nobody may call is better removed.
fn export_to(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    key: &ObjectKey,
) -> Option<Option<BTreeSet<String>>> {
    let entries = unique_list(dec, field, "namespace", |dec, f| {
        dec.checked_string(f, |s| match s {
            "*" | "." => Ok(()),
            _ => check_dns_label(s).map_err(|e| {
                format!("must be \"*\", \".\" or a namespace name, and namespace {e}")
            }),
        })
    })?;
    if entries.iter().any(|e| e == "*") {
        if entries.len() > 1 {
            dec.invalid(
                field,
                "\"*\" exports to every namespace; listing others beside it is a mistake",
            );
            return None;
        }
        return Some(None);
    }
    if entries.is_empty() {
        // As in Istio, an empty list is the default.
        return Some(None);
    }
    Some(Some(
        entries
            .into_iter()
            .map(|e| if e == "." { key.namespace.clone() } else { e })
            .collect(),
    ))
}

const PROTOCOLS: [(&str, Protocol); 4] = [
    ("HTTP", Protocol::Http),
    ("HTTP2", Protocol::Http2),
    ("GRPC", Protocol::Grpc),
    ("TCP", Protocol::Tcp),
];

fn service_ports(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<Vec<ServicePort>> {
    let items = dec.list(field)?;
    if items.is_empty() {
        dec.invalid(field, "a service needs at least one port");
        return None;
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in &items {
        let Some(p) = dec.fields(
            item.node,
            &item.path,
            &["name", "port", "targetPort", "protocol"],
        ) else {
            ok = false;
            continue;
        };
        let name = p
            .get("name")
            .map(|f| dec.checked_string(f, check_dns_label));
        let port = p.require(dec, "port").and_then(|f| dec.port(f));
        let target_port = p.get("targetPort").map(|f| dec.port(f));
        let protocol = p.get("protocol").map(|f| dec.one_of(f, &PROTOCOLS));
        let (Some(port), Some(name), Some(target_port), Some(protocol)) = (
            port,
            optional(name),
            or_default(target_port, port.unwrap_or(0)),
            optional(protocol),
        ) else {
            ok = false;
            continue;
        };
        if let Some(f) = p.get("port")
            && ports.iter().any(|other| other.port == port)
        {
            dec.invalid(f, format!("port {port} is listed twice"));
            ok = false;
            continue;
        }
        if let (Some(f), Some(n)) = (p.get("name"), &name)
            && ports.iter().any(|other| other.name.as_ref() == Some(n))
        {
            dec.invalid(f, format!("port name {} is used twice", quote(n)));
            ok = false;
            continue;
        }
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    }
    ok.then_some(ports)
}

fn routes(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    namespace: &str,
    hosts: Option<&[String]>,
) -> Option<Vec<Route>> {
    let items = dec.list(field)?;
    let mut out: Vec<Route> = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in &items {
        match route(dec, item.field(), namespace, hosts) {
            Some((route, name_field_pos)) => {
                if out.iter().any(|r| r.name == route.name) {
                    dec.error(
                        name_field_pos,
                        &format!("{}.name", item.path),
                        ErrorKind::InvalidValue,
                        format!("route name {} is used twice", quote(&route.name)),
                    );
                    ok = false;
                } else {
                    out.push(route);
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn route(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    namespace: &str,
    hosts: Option<&[String]>,
) -> Option<(Route, Position)> {
    let f = dec.fields(
        field.node,
        field.path(),
        &["name", "match", "destinations", "timeout", "retries"],
    )?;
    let name_field = f.require(dec, "name");
    let name_pos = name_field.map(|n| n.pos()).unwrap_or(f.pos());
    let name = name_field.and_then(|f| dec.checked_string(f, check_dns_label));
    let matches = f.get("match").map(|f| route_match(dec, f, hosts));
    let destinations = f
        .require(dec, "destinations")
        .and_then(|f| destinations(dec, f, namespace));
    let timeout = f
        .get("timeout")
        .map(|f| dec.duration(f, limits::REQUEST_TIMEOUT));
    let retries = f.get("retries").map(|f| retry_policy(dec, f));
    Some((
        Route {
            name: name?,
            matches: or_default(matches, RouteMatch::default())?,
            destinations: destinations?,
            timeout: optional(timeout)?,
            retries: optional(retries)?,
        },
        name_pos,
    ))
}

/// Reads a mapping that must set exactly one of `choices`; returns the chosen key and its value.
fn exactly_one<'f, 'c>(
    dec: &mut Decoder<'_>,
    fields: &'f Fields<'_>,
    whole: Field<'_>,
    choices: &[&'c str],
) -> Option<(&'c str, Field<'f>)> {
    let mut set: Vec<(&'c str, Field<'f>)> = choices
        .iter()
        .filter_map(|c| fields.get(c).map(|f| (*c, f)))
        .collect();
    // Blame the one written last.
    set.sort_by_key(|(_, f)| f.pos());
    match set.as_slice() {
        [only] => Some(*only),
        [] => {
            dec.error(
                whole.pos(),
                whole.path(),
                ErrorKind::MissingField,
                format!("set exactly one of: {}", choices.join(", ")),
            );
            None
        }
        [(first, _), (second, value), ..] => {
            dec.invalid(
                *value,
                format!(
                    "`{first}` and `{second}` are both set; set exactly one of: {}",
                    choices.join(", ")
                ),
            );
            None
        }
    }
}

fn check_path(s: &str) -> Result<(), String> {
    if s.starts_with('/') {
        Ok(())
    } else {
        Err(format!("path {} must start with '/'", quote(s)))
    }
}

/// `known_hosts`: the service's hostnames, which a `hosts` condition may name (`None`: they are
/// unknown because they failed to parse, so they are not checked).
fn route_match(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    known_hosts: Option<&[String]>,
) -> Option<RouteMatch> {
    let f = dec.fields(
        field.node,
        field.path(),
        &["hosts", "path", "method", "headers"],
    )?;
    let hosts = f.get("hosts").map(|field| {
        unique_list(dec, field, "host", |dec, f| {
            dec.checked_string(f, |s| {
                check_dns_subdomain(s).map_err(|e| format!("host {e}"))?;
                match known_hosts {
                    Some(known) if !known.iter().any(|h| h == s) => Err(format!(
                        "{} is not a hostname of this service, so no request routed here has it; the service's hostnames are: {}",
                        quote(s),
                        known.join(", ")
                    )),
                    _ => Ok(()),
                }
            })
        })
    });
    let path = f.get("path").map(|field| {
        let p = dec.fields(field.node, field.path(), &["exact", "prefix", "regex"])?;
        let (which, value) = exactly_one(dec, &p, field, &["exact", "prefix", "regex"])?;
        match which {
            "exact" => dec.checked_string(value, check_path).map(PathMatch::Exact),
            "prefix" => dec.checked_string(value, check_path).map(PathMatch::Prefix),
            _ => dec.regex(value).map(PathMatch::Regex),
        }
    });
    let method = f.get("method").map(|f| dec.parsed(f, parse_method));
    let headers = f
        .get("headers")
        .map(|field| dec.list_of(field, header_match));
    Some(RouteMatch {
        hosts: or_default(hosts, Vec::new())?,
        path: optional(path)?,
        method: optional(method)?,
        headers: or_default(headers, Vec::new())?,
    })
}

fn parse_method(s: &str) -> Result<Method, String> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if let Some(standard) = STANDARD
        .iter()
        .find(|m| m.eq_ignore_ascii_case(s) && **m != s)
    {
        return Err(format!(
            "HTTP methods are case-sensitive; did you mean {standard}?"
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("{} is not an HTTP method", quote(s)))
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("{} is not a valid HTTP header name", quote(s)))
}

fn check_header_value(s: &str) -> Result<(), String> {
    HeaderValue::from_str(s)
        .map(|_| ())
        .map_err(|_| format!("{} cannot appear in an HTTP header value", quote(s)))
}

fn header_match(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<HeaderMatch> {
    let f = dec.fields(
        field.node,
        field.path(),
        &["name", "exact", "prefix", "regex", "invert"],
    )?;
    let name = f
        .require(dec, "name")
        .and_then(|f| dec.parsed(f, parse_header_name));
    let value =
        exactly_one(dec, &f, field, &["exact", "prefix", "regex"]).and_then(|(which, value)| {
            match which {
                "exact" => dec
                    .checked_string(value, check_header_value)
                    .map(ValueMatch::Exact),
                "prefix" => dec
                    .checked_string(value, check_header_value)
                    .map(ValueMatch::Prefix),
                _ => dec.regex(value).map(ValueMatch::Regex),
            }
        });
    let invert = f.get("invert").map(|f| dec.bool(f));
    Some(HeaderMatch {
        name: name?,
        value: value?,
        invert: or_default(invert, false)?,
    })
}

fn destinations(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    namespace: &str,
) -> Option<Vec<RouteDestination>> {
    let list = dec.list_of(field, |dec, item| {
        let f = dec.fields(item.node, item.path(), &["service", "port", "weight"])?;
        let service = f
            .require(dec, "service")
            .and_then(|f| service_ref(dec, f, namespace));
        let port = f.get("port").map(|f| dec.port(f));
        let weight = f.get("weight").map(|f| dec.integer(f, 0u32, u32::MAX));
        Some(RouteDestination {
            service: service?,
            port: optional(port)?,
            weight: or_default(weight, 1)?,
        })
    })?;
    let total: u64 = list.iter().map(|d| u64::from(d.weight)).sum();
    if list.is_empty() {
        dec.invalid(field, "a route needs at least one destination");
        return None;
    }
    if total == 0 {
        dec.invalid(
            field,
            "destination weights add up to 0; give at least one a weight",
        );
        return None;
    }
    if total > u64::from(u32::MAX) {
        dec.invalid(
            field,
            format!(
                "destination weights add up to {total}, more than {}",
                u32::MAX
            ),
        );
        return None;
    }
    Some(list)
}

const RETRY_ON: [(&str, RetryOn); 5] = [
    ("connect-failure", RetryOn::ConnectFailure),
    ("reset", RetryOn::Reset),
    ("gateway-error", RetryOn::GatewayError),
    ("5xx", RetryOn::ServerError),
    ("retriable-status-codes", RetryOn::RetriableStatusCodes),
];

const GRPC_CODES: [(&str, GrpcCode); 5] = [
    ("cancelled", GrpcCode::Cancelled),
    ("deadline-exceeded", GrpcCode::DeadlineExceeded),
    ("internal", GrpcCode::Internal),
    ("resource-exhausted", GrpcCode::ResourceExhausted),
    ("unavailable", GrpcCode::Unavailable),
];

fn retry_policy(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<RetryPolicy> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retriableStatusCodes",
            "retriableGrpcCodes",
            "backoffBase",
            "backoffMax",
            "retryNonIdempotent",
        ],
    )?;
    // 0 turns retries off for the route (it would otherwise get the proxy's default policy).
    let attempts = f.get("attempts").map(|f| dec.integer(f, 0u32, 100u32));
    let per_try_timeout = f
        .get("perTryTimeout")
        .map(|f| dec.duration(f, limits::REQUEST_TIMEOUT));
    let retry_on = f.get("retryOn").map(|field| {
        let mut seen = BTreeSet::new();
        let list = dec.list_of(field, |dec, f| dec.one_of(f, &RETRY_ON))?;
        Some(
            list.into_iter()
                .filter(|r| seen.insert(*r))
                .collect::<Vec<_>>(),
        )
    });
    let codes = f.get("retriableStatusCodes").map(|field| {
        unique_list(dec, field, "status code", |dec, f| {
            dec.integer(f, 100u16, 599u16)
        })
    });
    let grpc_codes = f.get("retriableGrpcCodes").map(|field| {
        let mut seen = BTreeSet::new();
        let list = dec.list_of(field, |dec, f| dec.one_of(f, &GRPC_CODES))?;
        Some(
            list.into_iter()
                .filter(|c| seen.insert(*c))
                .collect::<Vec<_>>(),
        )
    });
    let base = f
        .get("backoffBase")
        .map(|f| dec.duration(f, limits::RETRY_BACKOFF));
    let max = f
        .get("backoffMax")
        .map(|f| dec.duration(f, limits::RETRY_BACKOFF));
    let non_idempotent = f.get("retryNonIdempotent").map(|f| dec.bool(f));

    let retry_on = or_default(retry_on, vec![RetryOn::ConnectFailure])?;
    let retry_non_idempotent = or_default(non_idempotent, false)?;
    // Connect failures are retried for any method whatever this says: with no other condition
    // it would change nothing, which is surely not what its author meant.
    if let (true, Some(field)) = (retry_non_idempotent, f.get("retryNonIdempotent"))
        && !retry_on.iter().any(|r| *r != RetryOn::ConnectFailure)
    {
        dec.invalid(
            field,
            "has no effect unless retryOn includes reset, 5xx, gateway-error or \
             retriable-status-codes (connect failures are retried for any method anyway)",
        );
        return None;
    }
    let codes = or_default(codes, Vec::new())?;
    let wants_codes = retry_on.contains(&RetryOn::RetriableStatusCodes);
    if let (false, Some(field)) = (wants_codes, f.get("retriableStatusCodes"))
        && !codes.is_empty()
    {
        dec.invalid(
            field,
            "has no effect unless retryOn includes retriable-status-codes",
        );
        return None;
    }
    if wants_codes && codes.is_empty() {
        let at = f.get("retryOn").map(|f| f.pos()).unwrap_or(f.pos());
        dec.error(
            at,
            &f.path_of("retriableStatusCodes"),
            ErrorKind::MissingField,
            "retryOn includes retriable-status-codes, so list the codes in retriableStatusCodes",
        );
        return None;
    }
    let backoff_base = or_default(base, RetryPolicy::DEFAULT_BACKOFF_BASE)?;
    let backoff_max = match max {
        None => backoff_base.saturating_mul(10),
        Some(max) => {
            let max = max?;
            if max < backoff_base
                && let Some(field) = f.get("backoffMax")
            {
                dec.invalid(
                    field,
                    format!(
                        "backoffMax ({}) is below backoffBase ({})",
                        humantime::format_duration(max),
                        humantime::format_duration(backoff_base)
                    ),
                );
                return None;
            }
            max
        }
    };
    Some(RetryPolicy {
        attempts: or_default(attempts, RetryPolicy::DEFAULT_ATTEMPTS)?,
        per_try_timeout: optional(per_try_timeout)?,
        retry_on,
        retriable_status_codes: codes,
        retriable_grpc_codes: or_default(grpc_codes, Vec::new())?,
        backoff_base,
        backoff_max,
        retry_non_idempotent,
    })
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

fn traffic_policy_spec(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
    namespace: &str,
) -> Option<TrafficPolicySpec> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "targetRef",
            "loadBalancer",
            "outlierDetection",
            "localityFailover",
            "circuitBreaker",
            "retryBudget",
            "connectTimeout",
            "idleTimeout",
        ],
    )?;
    let target = f.require(dec, "targetRef").and_then(|field| {
        let t = dec.fields(field.node, field.path(), &["service"])?;
        t.require(dec, "service")
            .and_then(|f| service_ref(dec, f, namespace))
    });
    let load_balancer = f.get("loadBalancer").map(|f| load_balancer(dec, f));
    let outlier = f.get("outlierDetection").map(|f| outlier_detection(dec, f));
    let locality = f.get("localityFailover").map(|f| locality_failover(dec, f));
    let breaker = f.get("circuitBreaker").map(|f| circuit_breaker(dec, f));
    let budget = f.get("retryBudget").map(|f| retry_budget(dec, f));
    let connect_timeout = f
        .get("connectTimeout")
        .map(|f| dec.duration(f, limits::CONNECT_TIMEOUT));
    let idle_timeout = f
        .get("idleTimeout")
        .map(|f| dec.duration(f, limits::IDLE_TIMEOUT));
    Some(TrafficPolicySpec {
        target: target?,
        load_balancer: or_default(load_balancer, LoadBalancer::default())?,
        outlier_detection: optional(outlier)?,
        locality_failover: optional(locality)?,
        circuit_breaker: or_default(breaker, CircuitBreaker::default())?,
        retry_budget: or_default(budget, RetryBudget::default())?,
        connect_timeout: or_default(connect_timeout, TrafficPolicySpec::DEFAULT_CONNECT_TIMEOUT)?,
        idle_timeout: or_default(idle_timeout, TrafficPolicySpec::DEFAULT_IDLE_TIMEOUT)?,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    LeastRequest,
    PeakEwma,
    RingHash,
    Maglev,
    Random,
}

/// A cookie name is an RFC 6265 token.
fn check_cookie_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{} is not a valid cookie name", quote(s)))
    }
}

fn load_balancer(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<LoadBalancer> {
    let f = dec.fields(field.node, field.path(), &["policy", "hashOn"])?;
    let policy = f.get("policy").map(|f| {
        dec.one_of(
            f,
            &[
                ("ROUND_ROBIN", Policy::RoundRobin),
                ("LEAST_REQUEST", Policy::LeastRequest),
                ("PEAK_EWMA", Policy::PeakEwma),
                ("RING_HASH", Policy::RingHash),
                ("MAGLEV", Policy::Maglev),
                ("RANDOM", Policy::Random),
            ],
        )
    });
    let hash_on = f.get("hashOn").map(|field| {
        let h = dec.fields(field.node, field.path(), &["sourceIp", "header", "cookie"])?;
        // `sourceIp: false` selects nothing, so it does not count as a choice.
        let source_ip = optional(h.get("sourceIp").map(|f| dec.bool(f)))?;
        let mut set: Vec<&str> = ["sourceIp", "header", "cookie"]
            .into_iter()
            .filter(|c| h.has(c) && (*c != "sourceIp" || source_ip == Some(true)))
            .collect();
        set.sort_by_key(|c| h.get(c).map(|f| f.pos()));
        let (which, value) = match set.as_slice() {
            [only] => (*only, h.get(only)?),
            [] => {
                dec.error(
                    field.pos(),
                    field.path(),
                    ErrorKind::MissingField,
                    "set exactly one of: sourceIp: true, header, cookie",
                );
                return None;
            }
            [first, second, ..] => {
                let value = h.get(second)?;
                dec.invalid(
                    value,
                    format!("`{first}` and `{second}` are both set; hash on exactly one"),
                );
                return None;
            }
        };
        match which {
            "sourceIp" => Some(HashOn::SourceIp),
            "header" => dec.parsed(value, parse_header_name).map(HashOn::Header),
            _ => dec
                .checked_string(value, check_cookie_name)
                .map(HashOn::Cookie),
        }
    });
    let policy = or_default(policy, Policy::LeastRequest)?;
    let hashing = matches!(policy, Policy::RingHash | Policy::Maglev);
    match (hashing, hash_on, f.get("hashOn")) {
        (true, Some(hash_on), _) => {
            let hash_on = hash_on?;
            Some(if policy == Policy::RingHash {
                LoadBalancer::RingHash(hash_on)
            } else {
                LoadBalancer::Maglev(hash_on)
            })
        }
        (true, None, _) => {
            dec.error(
                f.pos(),
                &f.path_of("hashOn"),
                ErrorKind::MissingField,
                "RING_HASH and MAGLEV need hashOn: {sourceIp: true}, {header: <name>} or {cookie: <name>}",
            );
            None
        }
        (false, Some(_), Some(field)) => {
            dec.invalid(field, "hashOn applies only to RING_HASH and MAGLEV");
            None
        }
        (false, _, _) => Some(match policy {
            Policy::RoundRobin => LoadBalancer::RoundRobin,
            Policy::PeakEwma => LoadBalancer::PeakEwma,
            Policy::Random => LoadBalancer::Random,
            _ => LoadBalancer::LeastRequest,
        }),
    }
}

fn positive_float(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<f64> {
    let value = match field.node.value {
        Value::Float(x) => x,
        Value::Int(i) => i as f64,
        _ => {
            dec.wrong_type(field, "a number");
            return None;
        }
    };
    if value.is_finite() && value > 0.0 && value <= 1000.0 {
        Some(value)
    } else {
        dec.invalid(
            field,
            format!("must be a number above 0 and at most 1000, got {value}"),
        );
        None
    }
}

fn outlier_detection(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<OutlierDetection> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "consecutive5xx",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "successRate",
            "failurePercentage",
        ],
    )?;
    let d = OutlierDetection::default();
    let consecutive_5xx = f
        .get("consecutive5xx")
        .map(|f| dec.integer(f, 0u32, u32::MAX));
    let gateway = f
        .get("consecutiveGatewayErrors")
        .map(|f| dec.integer(f, 0u32, u32::MAX));
    let interval = f
        .get("interval")
        .map(|f| dec.duration(f, limits::OUTLIER_INTERVAL));
    let base = f
        .get("baseEjectionTime")
        .map(|f| dec.duration(f, limits::EJECTION_TIME));
    let max = f
        .get("maxEjectionTime")
        .map(|f| dec.duration(f, limits::EJECTION_TIME));
    let max_percent = f.get("maxEjectionPercent").map(|f| dec.percent(f));
    let min_health = f.get("minHealthPercent").map(|f| dec.percent(f));
    let success_rate = f.get("successRate").map(|field| {
        let s = dec.fields(
            field.node,
            field.path(),
            &["minimumHosts", "requestVolume", "stdevFactor"],
        )?;
        let d = SuccessRateEjection::default();
        let hosts = s
            .get("minimumHosts")
            .map(|f| dec.integer(f, 1u32, u32::MAX));
        let volume = s
            .get("requestVolume")
            .map(|f| dec.integer(f, 1u32, u32::MAX));
        let factor = s.get("stdevFactor").map(|f| positive_float(dec, f));
        Some(SuccessRateEjection {
            minimum_hosts: or_default(hosts, d.minimum_hosts)?,
            request_volume: or_default(volume, d.request_volume)?,
            stdev_factor: or_default(factor, d.stdev_factor)?,
        })
    });
    let failure_percentage = f.get("failurePercentage").map(|field| {
        let p = dec.fields(
            field.node,
            field.path(),
            &["threshold", "minimumHosts", "requestVolume"],
        )?;
        let d = FailurePercentageEjection::default();
        let threshold = p.get("threshold").map(|f| dec.percent(f));
        let hosts = p
            .get("minimumHosts")
            .map(|f| dec.integer(f, 1u32, u32::MAX));
        let volume = p
            .get("requestVolume")
            .map(|f| dec.integer(f, 1u32, u32::MAX));
        Some(FailurePercentageEjection {
            threshold: or_default(threshold, d.threshold)?,
            minimum_hosts: or_default(hosts, d.minimum_hosts)?,
            request_volume: or_default(volume, d.request_volume)?,
        })
    });

    let base = or_default(base, d.base_ejection_time)?;
    let max = match max {
        // Envoy: 300 s, or the base ejection time if that is longer.
        None => d.max_ejection_time.max(base),
        Some(max) => {
            let max = max?;
            if max < base
                && let Some(field) = f.get("maxEjectionTime")
            {
                dec.invalid(
                    field,
                    format!(
                        "maxEjectionTime ({}) is below baseEjectionTime ({})",
                        humantime::format_duration(max),
                        humantime::format_duration(base)
                    ),
                );
                return None;
            }
            max
        }
    };
    Some(OutlierDetection {
        consecutive_5xx: or_default(consecutive_5xx, d.consecutive_5xx)?,
        consecutive_gateway_errors: or_default(gateway, d.consecutive_gateway_errors)?,
        interval: or_default(interval, d.interval)?,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: or_default(max_percent, d.max_ejection_percent)?,
        min_health_percent: or_default(min_health, d.min_health_percent)?,
        success_rate: optional(success_rate)?,
        failure_percentage: optional(failure_percentage)?,
    })
}

/// `region[/zone[/subzone]]`, where the last segment may be `*`.
fn parse_locality_pattern(s: &str) -> Result<LocalityPattern, String> {
    let segments: Vec<&str> = s.split('/').collect();
    if segments.len() > 3 {
        return Err(format!(
            "locality {} has more than three parts (region/zone/subzone)",
            quote(s)
        ));
    }
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if *segment == "*" && i == last {
            continue;
        }
        check_locality_part(segment).map_err(|e| {
            format!(
                "locality {}: {e} ('*' may only be a whole last part)",
                quote(s)
            )
        })?;
    }
    Ok(LocalityPattern(s.to_owned()))
}

fn failover_label(s: &str) -> Result<FailoverLabel, String> {
    let (key, value) = match s.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (s, None),
    };
    check_label_key(key)?;
    if let Some(value) = value {
        check_label_value(value)?;
    }
    Ok(FailoverLabel {
        key: key.to_owned(),
        value: value.map(str::to_owned),
    })
}

fn locality_failover(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<LocalityFailover> {
    let f = dec.fields(
        field.node,
        field.path(),
        &["enabled", "failoverPriority", "failover", "distribute"],
    )?;
    let enabled = f.get("enabled").map(|f| dec.bool(f));
    let priority = f.get("failoverPriority").map(|field| {
        let list = dec.list_of(field, |dec, f| dec.parsed(f, failover_label))?;
        let mut seen = BTreeSet::new();
        for (i, label) in list.iter().enumerate() {
            if !seen.insert(label.key.as_str()) {
                let path = format!("{}[{i}]", field.path());
                let pos = item_position(field, i);
                dec.error(
                    pos,
                    &path,
                    ErrorKind::InvalidValue,
                    format!("label {} is listed twice", quote(&label.key)),
                );
                return None;
            }
        }
        Some(list)
    });
    let failover = f.get("failover").map(|field| {
        let mut froms = BTreeSet::new();
        dec.list_of(field, |dec, item| {
            let r = dec.fields(item.node, item.path(), &["from", "to"])?;
            let from = r
                .require(dec, "from")
                .and_then(|f| dec.checked_string(f, check_locality_part));
            let to = r
                .require(dec, "to")
                .and_then(|f| dec.checked_string(f, check_locality_part));
            let (from, to) = (from?, to?);
            if from == to {
                dec.invalid(r.get("to")?, "failover must go to a different region");
                return None;
            }
            if !froms.insert(from.clone()) {
                dec.invalid(
                    r.get("from")?,
                    format!("region {} already has a failover rule", quote(&from)),
                );
                return None;
            }
            Some(FailoverRule { from, to })
        })
    });
    let distribute = f.get("distribute").map(|field| {
        let mut froms = BTreeSet::new();
        dec.list_of(field, |dec, item| {
            let r = dec.fields(item.node, item.path(), &["from", "to"])?;
            let from = r
                .require(dec, "from")
                .and_then(|f| dec.parsed(f, parse_locality_pattern));
            let to = r.require(dec, "to").and_then(|field| {
                let mut weights = BTreeMap::new();
                let mut ok = true;
                for (locality, key_pos, value) in dec.entries(field)? {
                    match parse_locality_pattern(&locality) {
                        Ok(pattern) => {
                            if let Some(weight) = dec.integer(value.field(), 1u32, 100u32) {
                                weights.insert(pattern, weight);
                            } else {
                                ok = false;
                            }
                        }
                        Err(reason) => {
                            dec.error(key_pos, &value.path, ErrorKind::InvalidValue, reason);
                            ok = false;
                        }
                    }
                }
                if !ok {
                    return None;
                }
                let total: u32 = weights.values().sum();
                if total != 100 {
                    dec.invalid(field, format!("weights must add up to 100, not {total}"));
                    return None;
                }
                Some(weights)
            });
            let (from, to) = (from?, to?);
            if !froms.insert(from.clone()) {
                dec.invalid(
                    r.get("from")?,
                    format!("locality {from} already has a distribute rule"),
                );
                return None;
            }
            Some(DistributeRule { from, to })
        })
    });
    let failover = or_default(failover, Vec::new())?;
    let distribute = or_default(distribute, Vec::new())?;
    if !failover.is_empty()
        && !distribute.is_empty()
        && let Some(field) = f.get("distribute")
    {
        dec.invalid(field, "distribute and failover cannot both be set");
        return None;
    }
    Some(LocalityFailover {
        enabled: or_default(enabled, true)?,
        failover_priority: or_default(priority, Vec::new())?,
        failover,
        distribute,
    })
}

/// The position of item `i` of a list field (the list's position if it is not a list).
fn item_position(field: Field<'_>, i: usize) -> Position {
    match &field.node.value {
        Value::Seq(items) => items.get(i).map_or(field.pos(), |n| n.pos),
        _ => field.pos(),
    }
}

fn circuit_breaker(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<CircuitBreaker> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "maxConnections",
            "maxPendingRequests",
            "maxRequests",
            "maxRetries",
        ],
    )?;
    let d = CircuitBreaker::default();
    let connections = f
        .get("maxConnections")
        .map(|f| dec.integer(f, 1u32, u32::MAX));
    let pending = f
        .get("maxPendingRequests")
        .map(|f| dec.integer(f, 1u32, u32::MAX));
    let requests = f.get("maxRequests").map(|f| dec.integer(f, 1u32, u32::MAX));
    let retries = f.get("maxRetries").map(|f| dec.integer(f, 0u32, u32::MAX));
    Some(CircuitBreaker {
        max_connections: or_default(connections, d.max_connections)?,
        max_pending_requests: or_default(pending, d.max_pending_requests)?,
        max_requests: or_default(requests, d.max_requests)?,
        max_retries: or_default(retries, d.max_retries)?,
    })
}

fn retry_budget(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<RetryBudget> {
    let f = dec.fields(
        field.node,
        field.path(),
        &["percent", "minRetriesPerSecond", "ttl"],
    )?;
    let d = RetryBudget::default();
    let percent = f.get("percent").map(|f| dec.percent(f));
    let floor = f
        .get("minRetriesPerSecond")
        .map(|f| dec.integer(f, 0u32, u32::MAX));
    let ttl = f
        .get("ttl")
        .map(|f| dec.duration(f, limits::RETRY_BUDGET_TTL));
    Some(RetryBudget {
        percent: or_default(percent, d.percent)?,
        min_retries_per_second: or_default(floor, d.min_retries_per_second)?,
        ttl: or_default(ttl, d.ttl)?,
    })
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// Istio's string match: `exact`, `prefix*`, `*suffix` or `*`.
fn parse_string_match(s: &str) -> Result<StringMatch, String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s == "*" {
        return Ok(StringMatch::Any);
    }
    let inner = s.trim_start_matches('*').trim_end_matches('*');
    let stars = s.len() - inner.len();
    if inner.contains('*') || stars > 1 {
        return Err(format!(
            "{} may use '*' only once, as its first or last character",
            quote(s)
        ));
    }
    Ok(if s.starts_with('*') {
        StringMatch::Suffix(inner.to_owned())
    } else if s.ends_with('*') {
        StringMatch::Prefix(inner.to_owned())
    } else {
        StringMatch::Exact(s.to_owned())
    })
}

fn parse_principal(s: &str) -> Result<StringMatch, String> {
    if s.starts_with("spiffe://") {
        return Err(format!(
            "write principals without the scheme: {}",
            quote(s.trim_start_matches("spiffe://"))
        ));
    }
    parse_string_match(s)
}

fn authorization_policy_spec(
    dec: &mut Decoder<'_>,
    field: Field<'_>,
) -> Option<AuthorizationPolicySpec> {
    let f = dec.fields(field.node, field.path(), &["selector", "action", "rules"])?;
    let selector = f.get("selector").map(|field| {
        let s = dec.fields(field.node, field.path(), &["matchLabels"])?;
        match s.get("matchLabels") {
            Some(labels) => dec.labels(labels),
            None => Some(BTreeMap::new()),
        }
    });
    let action = f.get("action").map(|f| {
        dec.one_of(
            f,
            &[
                ("ALLOW", AuthorizationAction::Allow),
                ("DENY", AuthorizationAction::Deny),
                ("AUDIT", AuthorizationAction::Audit),
            ],
        )
    });
    let rules = f.get("rules").map(|field| dec.list_of(field, rule));
    Some(AuthorizationPolicySpec {
        selector: or_default(selector, BTreeMap::new())?,
        action: or_default(action, AuthorizationAction::Allow)?,
        rules: or_default(rules, Vec::new())?,
    })
}

fn rule(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<AuthorizationRule> {
    let f = dec.fields(field.node, field.path(), &["from", "to"])?;
    let from = f.get("from").map(|field| {
        dec.list_of(field, |dec, item| {
            let wrapper = dec.fields(item.node, item.path(), &["source"])?;
            let source_field = wrapper.require(dec, "source")?;
            source(dec, source_field)
        })
    });
    let to = f.get("to").map(|field| {
        dec.list_of(field, |dec, item| {
            let wrapper = dec.fields(item.node, item.path(), &["operation"])?;
            let operation_field = wrapper.require(dec, "operation")?;
            operation(dec, operation_field)
        })
    });
    Some(AuthorizationRule {
        from: or_default(from, Vec::new())?,
        to: or_default(to, Vec::new())?,
    })
}

fn source(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<Source> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "principals",
            "notPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
        ],
    )?;
    let mut matches = |name: &str, parse: fn(&str) -> Result<StringMatch, String>| {
        f.get(name)
            .map(|field| dec.list_of(field, |dec, f| dec.parsed(f, parse)))
    };
    let principals = matches("principals", parse_principal);
    let not_principals = matches("notPrincipals", parse_principal);
    let namespaces = matches("namespaces", parse_string_match);
    let not_namespaces = matches("notNamespaces", parse_string_match);
    let mut nets = |name: &str| {
        f.get(name)
            .map(|field| dec.list_of(field, |dec, f| dec.cidr(f)))
    };
    let ip_blocks = nets("ipBlocks");
    let not_ip_blocks = nets("notIpBlocks");
    let source = Source {
        principals: or_default(principals, Vec::new())?,
        not_principals: or_default(not_principals, Vec::new())?,
        namespaces: or_default(namespaces, Vec::new())?,
        not_namespaces: or_default(not_namespaces, Vec::new())?,
        ip_blocks: or_default(ip_blocks, Vec::new())?,
        not_ip_blocks: or_default(not_ip_blocks, Vec::new())?,
    };
    if source == Source::default() {
        dec.invalid(
            field,
            "a source must set at least one field (omit `from` to match any source)",
        );
        return None;
    }
    Some(source)
}

fn operation(dec: &mut Decoder<'_>, field: Field<'_>) -> Option<Operation> {
    let f = dec.fields(
        field.node,
        field.path(),
        &[
            "methods",
            "notMethods",
            "paths",
            "notPaths",
            "ports",
            "notPorts",
            "hosts",
            "notHosts",
        ],
    )?;
    let mut methods = |name: &str| {
        f.get(name)
            .map(|field| dec.list_of(field, |dec, f| dec.parsed(f, parse_method)))
    };
    let m = methods("methods");
    let not_m = methods("notMethods");
    let mut matches = |name: &str| {
        f.get(name)
            .map(|field| dec.list_of(field, |dec, f| dec.parsed(f, parse_string_match)))
    };
    let paths = matches("paths");
    let not_paths = matches("notPaths");
    let hosts = matches("hosts");
    let not_hosts = matches("notHosts");
    let mut ports = |name: &str| {
        f.get(name)
            .map(|field| dec.list_of(field, |dec, f| dec.port(f)))
    };
    let p = ports("ports");
    let not_p = ports("notPorts");
    let operation = Operation {
        methods: or_default(m, Vec::new())?,
        not_methods: or_default(not_m, Vec::new())?,
        paths: or_default(paths, Vec::new())?,
        not_paths: or_default(not_paths, Vec::new())?,
        ports: or_default(p, Vec::new())?,
        not_ports: or_default(not_p, Vec::new())?,
        hosts: or_default(hosts, Vec::new())?,
        not_hosts: or_default(not_hosts, Vec::new())?,
    };
    if operation == Operation::default() {
        dec.invalid(
            field,
            "an operation must set at least one field (omit `to` to match any operation)",
        );
        return None;
    }
    Some(operation)
}
