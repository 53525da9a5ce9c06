//! From the mesh model to what `keelctl demo` runs: one pod per Workload (its first IPv4 address,
//! the demo app's role from its `app` label, the port its services target), the addresses each
//! role calls (a service's VIP and port), and the subnet and gateway of the bridge.
//!
//! Pure: it reads the model and decides, so that every reason the demo cannot run a mesh is
//! found, and reported with the resource it concerns, before anything is created. It must never
//! guess an address the model does not give: a role whose upstream has no VIP is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

use crate::model::{Locality, Model, ObjectKey, Protocol, Service};

/// The demo app's roles that serve (`keel-demo-app --role <role>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Frontend,
    Articles,
    Comments,
    Reads,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Frontend, Role::Articles, Role::Comments, Role::Reads];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Articles => "articles",
            Role::Comments => "comments",
            Role::Reads => "reads",
        }
    }

    /// The services (named like the roles) that this role calls.
    pub fn calls(self) -> &'static [Role] {
        match self {
            Role::Frontend => &[Role::Articles],
            Role::Articles => &[Role::Comments, Role::Reads],
            Role::Comments | Role::Reads => &[],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pod to run.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    /// The pod's name (namespace `keel-demo-<name>`): the workload's name.
    pub name: String,
    pub workload: ObjectKey,
    pub service_account: String,
    pub ip: Ipv4Addr,
    pub locality: Locality,
    /// Whether it runs a sidecar (`keel-proxy init` and `keel-proxy run`).
    pub meshed: bool,
    pub role: Role,
    /// Where the app listens: the target port of the first service that selects the workload.
    pub port: u16,
    /// `--<service> http://<vip>:<port>` for each service the role calls.
    pub upstreams: Vec<(Role, SocketAddrV4)>,
}

/// Everything `keelctl demo` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPlan {
    pub subnet: Ipv4Net,
    /// The host's address on the bridge, where the control plane listens.
    pub gateway: Ipv4Addr,
    pub pods: Vec<PodPlan>,
    /// Service VIPs by namespace and role name, for the load generator.
    pub services: BTreeMap<(String, Role), SocketAddrV4>,
    /// Every IPv4 VIP of the mesh, to be routed via the gateway from the pods.
    pub vips: Vec<Ipv4Addr>,
}

impl MeshPlan {
    /// The pod the load generator runs in: the first meshed frontend, else the first meshed pod.
    pub fn client(&self) -> Option<&PodPlan> {
        let meshed = || self.pods.iter().filter(|p| p.meshed);
        meshed()
            .find(|p| p.role == Role::Frontend)
            .or_else(|| meshed().next())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the mesh has no Workloads: the demo runs one pod per Workload")]
    NoWorkloads,
    #[error("workload {workload} has no IPv4 address: the demo's pods are IPv4 only")]
    NoIpv4 { workload: ObjectKey },
    #[error(
        "workload {workload} has label app={app:?}: the demo app's roles are frontend, articles, \
         comments and reads"
    )]
    UnknownRole { workload: ObjectKey, app: String },
    #[error(
        "workload {workload} ({role}) calls the {service} service, but {namespace}/{service} \
         {why}"
    )]
    Upstream {
        workload: ObjectKey,
        role: Role,
        service: Role,
        namespace: String,
        why: &'static str,
    },
    #[error(
        "workloads {first} ({first_ip}) and {other} ({other_ip}) are not in one /24: the demo puts \
         every pod on one bridge"
    )]
    Subnet {
        first: ObjectKey,
        first_ip: Ipv4Addr,
        other: ObjectKey,
        other_ip: Ipv4Addr,
    },
    #[error("workloads {0} and {1} have the same address")]
    SameAddress(ObjectKey, ObjectKey),
    #[error("every address of {0} is taken by a workload: none is left for the host's gateway")]
    NoGateway(Ipv4Net),
}

/// Plans the demo for `model`.
pub fn plan(model: &Model) -> Result<MeshPlan, PlanError> {
    let mut services = BTreeMap::new();
    for (key, service) in &model.services {
        if let Some(role) = Role::ALL.into_iter().find(|r| r.as_str() == key.name)
            && let Some(address) = service_address(service)
        {
            services.insert((key.namespace.clone(), role), address);
        }
    }
    let mut vips: Vec<Ipv4Addr> = model
        .services
        .values()
        .flat_map(|s| s.spec.vips.iter())
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    vips.sort();
    vips.dedup();

    let mut pods: Vec<PodPlan> = Vec::new();
    for (key, workload) in &model.workloads {
        let ip = workload
            .spec
            .addresses
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| PlanError::NoIpv4 {
                workload: key.clone(),
            })?;
        let app = workload.meta.labels.get("app").cloned().unwrap_or_default();
        let role = Role::ALL
            .into_iter()
            .find(|r| r.as_str() == app)
            .ok_or_else(|| PlanError::UnknownRole {
                workload: key.clone(),
                app,
            })?;
        let port = model
            .services_of(key)
            .first()
            .and_then(|s| preferred_port(s))
            .map_or(8080, |p| p.target_port);
        let mut upstreams = Vec::new();
        for &called in role.calls() {
            let service_key = ObjectKey::new(key.namespace.clone(), called.as_str());
            let why = match model.services.get(&service_key) {
                None => Some("does not exist"),
                Some(s) if service_address(s).is_none() => {
                    Some("has no IPv4 VIP (the demo app reaches services by VIP)")
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(PlanError::Upstream {
                    workload: key.clone(),
                    role,
                    service: called,
                    namespace: key.namespace.clone(),
                    why,
                });
            }
            if let Some(address) = services.get(&(key.namespace.clone(), called)) {
                upstreams.push((called, *address));
            }
        }
        let name = if model
            .workloads
            .keys()
            .filter(|other| other.name == key.name)
            .count()
            > 1
        {
            format!("{}-{}", key.namespace, key.name)
        } else {
            key.name.clone()
        };
        pods.push(PodPlan {
            name,
            workload: key.clone(),
            service_account: workload.spec.service_account.clone(),
            ip,
            locality: workload.spec.locality.clone(),
            meshed: workload.spec.meshed,
            role,
            port,
            upstreams,
        });
    }

    let first = pods.first().ok_or(PlanError::NoWorkloads)?;
    let subnet = Ipv4Net::new(first.ip, 24)
        .map(|net| net.trunc())
        .map_err(|_| PlanError::NoWorkloads)?;
    for pod in &pods {
        if !subnet.contains(&pod.ip) || pod.ip == subnet.network() || pod.ip == subnet.broadcast() {
            return Err(PlanError::Subnet {
                first: first.workload.clone(),
                first_ip: first.ip,
                other: pod.workload.clone(),
                other_ip: pod.ip,
            });
        }
        if let Some(twin) = pods
            .iter()
            .find(|other| other.ip == pod.ip && other.workload != pod.workload)
        {
            return Err(PlanError::SameAddress(
                pod.workload.clone(),
                twin.workload.clone(),
            ));
        }
    }
    let gateway = subnet
        .hosts()
        .find(|candidate| pods.iter().all(|p| p.ip != *candidate))
        .ok_or(PlanError::NoGateway(subnet))?;
    Ok(MeshPlan {
        subnet,
        gateway,
        pods,
        services,
        vips,
    })
}

/// The port the demo app serves a service on: its HTTP port, else its first.
fn preferred_port(service: &Service) -> Option<&crate::model::ServicePort> {
    service
        .spec
        .ports
        .iter()
        .find(|p| p.protocol == Some(Protocol::Http))
        .or_else(|| service.spec.ports.first())
}

/// `<first IPv4 VIP>:<preferred port>`.
fn service_address(service: &Service) -> Option<SocketAddrV4> {
    let vip = service.spec.vips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })?;
    let port = preferred_port(service)?;
    Some(SocketAddrV4::new(vip, port.port))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn examples() -> Model {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        match crate::model::load_dir(&dir) {
            Ok((model, _)) => model,
            Err(errors) => panic!("examples/mesh is invalid:\n{errors}"),
        }
    }

    #[test]
    fn plans_one_pod_per_example_workload() {
        let plan = plan(&examples()).expect("the example mesh plans");
        assert_eq!(plan.subnet.to_string(), "10.77.0.0/24");
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 77, 0, 1));
        let names: Vec<&str> = plan.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "articles-1",
                "articles-2",
                "comments-1",
                "comments-2",
                "frontend-1",
                "reads-1",
                "reads-v2-1"
            ]
        );
        let articles = &plan.pods[0];
        assert_eq!(articles.role, Role::Articles);
        assert_eq!(articles.port, 8080);
        assert!(articles.meshed);
        assert_eq!(
            articles.upstreams,
            vec![
                (Role::Comments, "10.96.0.12:80".parse().expect("address")),
                (Role::Reads, "10.96.0.13:80".parse().expect("address")),
            ]
        );
        let client = plan.client().expect("a client pod");
        assert_eq!(client.name, "frontend-1");
        assert_eq!(
            client.upstreams,
            vec![(Role::Articles, "10.96.0.11:80".parse().expect("address"))]
        );
        let v2 = &plan.pods[6];
        assert_eq!((v2.role, v2.port), (Role::Reads, 8080));
        assert_eq!(plan.services.len(), 4);
        assert!(plan.vips.contains(&Ipv4Addr::new(10, 96, 0, 10)));
    }

    #[test]
    fn a_role_whose_upstream_has_no_vip_is_refused() {
        let mut model = examples();
        let key = ObjectKey::new("demo", "reads");
        if let Some(reads) = model.services.get_mut(&key) {
            std::sync::Arc::make_mut(reads).spec.vips.clear();
        }
        let error = plan(&model).expect_err("reads has no VIP");
        assert!(
            error.to_string().contains("demo/reads has no IPv4 VIP"),
            "{error}"
        );
    }

    #[test]
    fn workloads_outside_one_subnet_are_refused() {
        let mut model = examples();
        if let Some(w) = model.workloads.get_mut(&ObjectKey::new("demo", "reads-1")) {
            std::sync::Arc::make_mut(w).spec.addresses =
                vec![IpAddr::V4(Ipv4Addr::new(10, 78, 0, 7))];
        }
        assert!(matches!(plan(&model), Err(PlanError::Subnet { .. })));
    }
}
