//! Checks that span resources: names defined twice, references to services (or ports) that do
//! not exist, more than one MeshConfig, more than one TrafficPolicy per service, and hostnames,
//! VIPs and workload addresses claimed twice.
//!
//! Each error points at the later of two conflicting definitions (in input order, which is file
//! order) and says where the earlier one is. Nothing here re-checks single-resource rules; those
//! were enforced when the document was decoded. A model is returned only when no check fails.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::error::{ErrorKind, ValidationError, ValidationErrors};
use super::mesh::Model;
use super::resources::{
    Kind, MeshConfig, ObjectKey, Origin, Position, Resource, Service, ServiceSpec,
};

/// Where a resource's `metadata.name` is, as `file:line:column`.
fn name_site(origin: &Origin) -> String {
    let at = origin.position_of("metadata.name");
    format!("{}:{}:{}", origin.file.display(), at.line, at.column)
}

fn field_site(origin: &Origin, field: &str) -> String {
    let at = origin.position_of(field);
    format!("{}:{}:{}", origin.file.display(), at.line, at.column)
}

fn error_at(origin: &Origin, field: &str, kind: ErrorKind, reason: String) -> ValidationError {
    ValidationError::new(&origin.file, origin.position_of(field), field, kind, reason)
}

/// Inserts `value` unless its key is taken, in which case the error names the first definition.
fn insert_unique<T>(
    map: &mut BTreeMap<ObjectKey, T>,
    kind: Kind,
    key: ObjectKey,
    value: T,
    origin_of: impl Fn(&T) -> &Origin,
    errors: &mut Vec<ValidationError>,
) {
    if let Some(first) = map.get(&key) {
        let reason = format!(
            "{kind} {key} is already defined at {}",
            name_site(origin_of(first))
        );
        errors.push(error_at(
            origin_of(&value),
            "metadata.name",
            ErrorKind::DuplicateName,
            reason,
        ));
    } else {
        map.insert(key, value);
    }
}

impl Model {
    /// Assembles a model from parsed resources, checking everything that involves more than one
    /// resource. All problems are reported, not just the first.
    pub fn from_resources(resources: Vec<Resource>) -> Result<Model, ValidationErrors> {
        let mut errors = Vec::new();
        let mut model = Model::default();
        let mut mesh_config: Option<Arc<MeshConfig>> = None;
        let mut policies_by_name = BTreeMap::new();
        let mut traffic_policies = Vec::new();
        let mut service_order = Vec::new();
        let mut workload_order = Vec::new();

        for resource in resources {
            let key = resource.key();
            match resource {
                Resource::MeshConfig(config) => match &mesh_config {
                    Some(first) => {
                        let reason = format!(
                            "only one MeshConfig is allowed; {} is defined at {}",
                            first.meta.name,
                            name_site(&first.origin)
                        );
                        errors.push(error_at(
                            &config.origin,
                            "metadata.name",
                            ErrorKind::DuplicateName,
                            reason,
                        ));
                    }
                    None => mesh_config = Some(config),
                },
                Resource::Workload(w) => {
                    if !model.workloads.contains_key(&key) {
                        workload_order.push(key.clone());
                    }
                    insert_unique(
                        &mut model.workloads,
                        Kind::Workload,
                        key,
                        w,
                        |w| &w.origin,
                        &mut errors,
                    );
                }
                Resource::Service(s) => {
                    if !model.services.contains_key(&key) {
                        service_order.push(key.clone());
                    }
                    insert_unique(
                        &mut model.services,
                        Kind::Service,
                        key,
                        s,
                        |s| &s.origin,
                        &mut errors,
                    );
                }
                Resource::TrafficPolicy(p) => {
                    if let Some(first) = policies_by_name.get(&key) {
                        let reason = format!(
                            "TrafficPolicy {key} is already defined at {}",
                            name_site(first)
                        );
                        errors.push(error_at(
                            &p.origin,
                            "metadata.name",
                            ErrorKind::DuplicateName,
                            reason,
                        ));
                    } else {
                        policies_by_name.insert(key, p.origin.clone());
                        traffic_policies.push(p);
                    }
                }
                Resource::AuthorizationPolicy(p) => insert_unique(
                    &mut model.authorization_policies,
                    Kind::AuthorizationPolicy,
                    key,
                    p,
                    |p| &p.origin,
                    &mut errors,
                ),
            }
        }
        if let Some(config) = mesh_config {
            model.mesh = config.spec.clone();
        }

        for key in &service_order {
            if let Some(service) = model.services.get(key) {
                check_routes(&model, service, &mut errors);
            }
        }
        for policy in traffic_policies {
            let target = policy.spec.target.clone();
            if !model.services.contains_key(&target) {
                errors.push(error_at(
                    &policy.origin,
                    "spec.targetRef.service",
                    ErrorKind::DanglingReference,
                    format!("service {target} does not exist"),
                ));
            } else if let Some(first) = model.traffic_policies.get(&target) {
                let reason = format!(
                    "service {target} already has TrafficPolicy {} (defined at {})",
                    first.meta.key(),
                    name_site(&first.origin)
                );
                errors.push(error_at(
                    &policy.origin,
                    "spec.targetRef.service",
                    ErrorKind::DuplicateName,
                    reason,
                ));
            } else {
                model.traffic_policies.insert(target, policy);
            }
        }
        check_service_claims(&model, &service_order, &mut errors);
        check_workload_addresses(&model, &workload_order, &mut errors);

        if errors.is_empty() {
            Ok(model)
        } else {
            let mut errors = ValidationErrors(errors);
            errors.sort();
            Err(errors)
        }
    }
}

/// Every route destination names an existing service, a port that service has, and a service
/// visible wherever the routing service is (`exportTo`).
fn check_routes(model: &Model, service: &Service, errors: &mut Vec<ValidationError>) {
    for (i, route) in service.spec.routes.iter().enumerate() {
        for (j, destination) in route.destinations.iter().enumerate() {
            let path = format!("spec.routes[{i}].destinations[{j}]");
            let Some(target) = model.services.get(&destination.service) else {
                errors.push(error_at(
                    &service.origin,
                    &format!("{path}.service"),
                    ErrorKind::DanglingReference,
                    format!("service {} does not exist", destination.service),
                ));
                continue;
            };
            // A proxy that sees this service and its routes must see where they lead.
            if !target.spec.visible_wherever(&service.spec) {
                let list = |spec: &super::resources::ServiceSpec| match &spec.export_to {
                    None => "every namespace".to_owned(),
                    Some(n) => n.iter().cloned().collect::<Vec<_>>().join(", "),
                };
                errors.push(error_at(
                    &service.origin,
                    &format!("{path}.service"),
                    ErrorKind::DanglingReference,
                    format!(
                        "service {} is exported to {}, but this service, whose route leads there, is visible in {}",
                        destination.service,
                        list(&target.spec),
                        list(&service.spec)
                    ),
                ));
            }
            if let Some(port) = destination.port
                && target.spec.port(port).is_none()
            {
                let ports: Vec<String> = target
                    .spec
                    .ports
                    .iter()
                    .map(|p| p.port.to_string())
                    .collect();
                errors.push(error_at(
                    &service.origin,
                    &format!("{path}.port"),
                    ErrorKind::DanglingReference,
                    format!(
                        "service {} has no port {port} (it has {})",
                        destination.service,
                        ports.join(", ")
                    ),
                ));
            }
        }
    }
}

/// Hostnames and VIPs name one service each. The one exception: two services' default short
/// names (`articles` in two namespaces) may coincide, since clients resolve those from their own
/// namespace.
fn check_service_claims(model: &Model, order: &[ObjectKey], errors: &mut Vec<ValidationError>) {
    let mut hostnames: BTreeMap<&str, &Service> = BTreeMap::new();
    let mut vips: BTreeMap<IpAddr, &Service> = BTreeMap::new();
    for service in order.iter().filter_map(|k| model.services.get(k)) {
        let key = service.meta.key();
        let defaults = ServiceSpec::default_hostnames(&key);
        for (i, hostname) in service.spec.hostnames.iter().enumerate() {
            let Some(first) = hostnames.get(hostname.as_str()) else {
                hostnames.insert(hostname, service);
                continue;
            };
            let first_key = first.meta.key();
            let both_default = defaults.contains(hostname)
                && ServiceSpec::default_hostnames(&first_key).contains(hostname);
            if both_default {
                continue;
            }
            let field = format!("spec.hostnames[{i}]");
            let at = service
                .origin
                .fields
                .get(&field)
                .unwrap_or_else(|| service.origin.position_of("metadata.name"));
            errors.push(ValidationError::new(
                &service.origin.file,
                at,
                field,
                ErrorKind::DuplicateName,
                format!(
                    "hostname {hostname} already names service {first_key} (defined at {})",
                    name_site(&first.origin)
                ),
            ));
        }
        for (i, vip) in service.spec.vips.iter().enumerate() {
            match vips.get(vip) {
                Some(first) => errors.push(error_at(
                    &service.origin,
                    &format!("spec.vips[{i}]"),
                    ErrorKind::DuplicateName,
                    format!(
                        "VIP {vip} already belongs to service {} (at {})",
                        first.meta.key(),
                        field_site(&first.origin, "spec.vips")
                    ),
                )),
                None => {
                    vips.insert(*vip, service);
                }
            }
        }
    }
}

/// A pod IP identifies one workload: the discovery server finds a proxy's workload by it.
fn check_workload_addresses(model: &Model, order: &[ObjectKey], errors: &mut Vec<ValidationError>) {
    let mut owners: BTreeMap<IpAddr, (&ObjectKey, &Origin, Position)> = BTreeMap::new();
    for (key, workload) in order
        .iter()
        .filter_map(|k| model.workloads.get(k).map(|w| (k, w)))
    {
        for (i, address) in workload.spec.addresses.iter().enumerate() {
            let field = format!("spec.addresses[{i}]");
            let at = workload.origin.position_of(&field);
            match owners.get(address) {
                Some((first, origin, first_at)) => errors.push(ValidationError::new(
                    &workload.origin.file,
                    at,
                    field,
                    ErrorKind::DuplicateName,
                    format!(
                        "address {address} is already used by workload {first} (at {}:{}:{})",
                        origin.file.display(),
                        first_at.line,
                        first_at.column
                    ),
                )),
                None => {
                    owners.insert(*address, (key, &workload.origin, at));
                }
            }
        }
    }
}
