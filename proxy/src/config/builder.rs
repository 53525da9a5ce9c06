//! Applying discovery responses, one at a time, to the resources the proxy holds.
//!
//! The builder keeps every validated resource by type and name, with the version the control
//! plane gave it. A response is decoded and validated into a candidate state (copy on write: only
//! the changed type's map is copied, and resources are shared through `Arc`s), a whole new
//! [`Config`] is assembled from the candidate, and only then does the candidate become the held
//! state. Any error leaves the builder exactly as it was.
//!
//! This module must never keep a partially applied response, and never re-validate a resource
//! whose version did not change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use keel_proto::v1::{self as pb, DiscoveryResponse};
use prost::Message;
use rustc_hash::FxBuildHasher;

use super::error::{ConfigError, FieldError, Problem};
use super::resources::{
    AuthorizationPolicy, Endpoints, MeshSettings, RouteTable, Service, TrafficPolicy,
};
use super::{Config, HostEntry, PortRef, ResourceKind, ServiceConfig, TypeVersions, Unresolved};

/// A resource type of the discovery stream and its validated form.
trait Resource: Sized {
    const KIND: ResourceKind;
    type Proto: Message + Default;
    fn from_proto(name: &str, proto: Self::Proto) -> Result<Self, FieldError>;
}

macro_rules! resource {
    ($ty:ty, $kind:ident, $proto:ty) => {
        impl Resource for $ty {
            const KIND: ResourceKind = ResourceKind::$kind;
            type Proto = $proto;
            fn from_proto(name: &str, proto: $proto) -> Result<Self, FieldError> {
                <$ty>::from_proto(name, proto)
            }
        }
    };
}

resource!(MeshSettings, MeshConfig, pb::MeshConfig);
resource!(Service, Service, pb::Service);
resource!(Endpoints, Endpoints, pb::Endpoints);
resource!(TrafficPolicy, TrafficPolicy, pb::TrafficPolicy);
resource!(RouteTable, RouteTable, pb::RouteTable);
resource!(
    AuthorizationPolicy,
    AuthorizationPolicy,
    pb::AuthorizationPolicy
);

/// A resource as held: its version and its validated value.
struct Held<T> {
    version: String,
    value: Arc<T>,
}

impl<T> Clone for Held<T> {
    fn clone(&self) -> Self {
        Held {
            version: self.version.clone(),
            value: self.value.clone(),
        }
    }
}

/// Everything held of one type.
struct Typed<T> {
    /// Whether a response of this type was ever applied (the first one may be empty).
    received: bool,
    system_version: String,
    items: Arc<BTreeMap<String, Held<T>>>,
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Typed {
            received: self.received,
            system_version: self.system_version.clone(),
            items: self.items.clone(),
        }
    }
}

impl<T> Default for Typed<T> {
    fn default() -> Self {
        Typed {
            received: false,
            system_version: String::new(),
            items: Arc::new(BTreeMap::new()),
        }
    }
}

impl<T> Typed<T> {
    fn get(&self, name: &str) -> Option<&Arc<T>> {
        self.items.get(name).map(|h| &h.value)
    }

    fn versions(&self) -> TypeVersions {
        TypeVersions {
            system_version: self.system_version.clone(),
            resources: self
                .items
                .iter()
                .map(|(name, held)| (name.clone(), held.version.clone()))
                .collect(),
        }
    }
}

impl<T: Resource> Typed<T> {
    /// Applies a response of this type; `Ok(false)` when no resource actually changed.
    fn apply(&mut self, response: &DiscoveryResponse) -> Result<bool, ConfigError> {
        let kind = T::KIND;
        let mut names = HashSet::with_capacity(response.resources.len());
        let mut changed = Vec::with_capacity(response.resources.len());
        for resource in &response.resources {
            let name = resource.name.as_str();
            if name.is_empty() {
                return Err(ConfigError::Invalid {
                    kind,
                    name: String::new(),
                    field: "name".to_owned(),
                    problem: Problem::Empty,
                });
            }
            if !names.insert(name) {
                return Err(ConfigError::DuplicateResource {
                    kind,
                    name: name.to_owned(),
                });
            }
            // Versions change whenever content does; an equal version was validated before.
            let held = self.items.get(name);
            if !resource.version.is_empty() && held.is_some_and(|h| h.version == resource.version) {
                continue;
            }
            let body = resource
                .resource
                .as_ref()
                .ok_or_else(|| ConfigError::MissingBody {
                    kind,
                    name: name.to_owned(),
                })?;
            if body.type_url != kind.type_url() {
                return Err(ConfigError::WrongType {
                    kind,
                    name: name.to_owned(),
                    found: body.type_url.clone(),
                });
            }
            let proto =
                T::Proto::decode(body.value.as_slice()).map_err(|error| ConfigError::Decode {
                    kind,
                    name: name.to_owned(),
                    error,
                })?;
            let value =
                T::from_proto(name, proto).map_err(|e| ConfigError::invalid(kind, name, e))?;
            changed.push((
                name.to_owned(),
                Held {
                    version: resource.version.clone(),
                    value: Arc::new(value),
                },
            ));
        }
        for name in &response.removed_resources {
            if names.contains(name.as_str()) {
                return Err(ConfigError::ChangedAndRemoved {
                    kind,
                    name: name.clone(),
                });
            }
        }
        // A response marked incomplete is one chunk of a larger update: the type's state is
        // whole only once a response without the mark arrives.
        if !response.incomplete {
            self.received = true;
        }
        self.system_version.clone_from(&response.system_version);
        let removes = response
            .removed_resources
            .iter()
            .any(|n| self.items.contains_key(n));
        if changed.is_empty() && !removes {
            return Ok(false);
        }
        let items = Arc::make_mut(&mut self.items);
        for name in &response.removed_resources {
            items.remove(name);
        }
        items.extend(changed);
        Ok(true)
    }
}

/// Everything held, by type.
#[derive(Clone, Default)]
struct State {
    mesh: Typed<MeshSettings>,
    services: Typed<Service>,
    endpoints: Typed<Endpoints>,
    policies: Typed<TrafficPolicy>,
    routes: Typed<RouteTable>,
    authorization: Typed<AuthorizationPolicy>,
}

impl State {
    fn received(&self, kind: ResourceKind) -> bool {
        match kind {
            ResourceKind::MeshConfig => self.mesh.received,
            ResourceKind::Service => self.services.received,
            ResourceKind::Endpoints => self.endpoints.received,
            ResourceKind::TrafficPolicy => self.policies.received,
            ResourceKind::RouteTable => self.routes.received,
            ResourceKind::AuthorizationPolicy => self.authorization.received,
        }
    }

    fn versions(&self, kind: ResourceKind) -> TypeVersions {
        match kind {
            ResourceKind::MeshConfig => self.mesh.versions(),
            ResourceKind::Service => self.services.versions(),
            ResourceKind::Endpoints => self.endpoints.versions(),
            ResourceKind::TrafficPolicy => self.policies.versions(),
            ResourceKind::RouteTable => self.routes.versions(),
            ResourceKind::AuthorizationPolicy => self.authorization.versions(),
        }
    }
}

/// The outcome of an accepted response.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The configuration after the response: a new snapshot when `changed`, else the previous.
    pub config: Arc<Config>,
    /// Whether any resource was added, changed or removed.
    pub changed: bool,
}

/// Holds the resources received so far and turns each response into a new [`Config`].
pub struct ConfigBuilder {
    state: State,
    current: Arc<Config>,
}

impl ConfigBuilder {
    /// A builder holding nothing, for a proxy whose workload lives in `local_namespace` (short
    /// hostnames resolve there first).
    pub fn new(local_namespace: impl Into<String>) -> ConfigBuilder {
        ConfigBuilder {
            state: State::default(),
            current: Arc::new(Config::empty(local_namespace)),
        }
    }

    /// Applies one response. On error nothing changes: the previous configuration stays
    /// current and the error is what the NACK says.
    pub fn apply(&mut self, response: &DiscoveryResponse) -> Result<Applied, ConfigError> {
        let kind = ResourceKind::from_type_url(&response.type_url).ok_or_else(|| {
            ConfigError::UnknownType {
                type_url: response.type_url.clone(),
            }
        })?;
        let mut next = self.state.clone();
        let changed = match kind {
            ResourceKind::MeshConfig => next.mesh.apply(response)?,
            ResourceKind::Service => next.services.apply(response)?,
            ResourceKind::Endpoints => next.endpoints.apply(response)?,
            ResourceKind::TrafficPolicy => next.policies.apply(response)?,
            ResourceKind::RouteTable => next.routes.apply(response)?,
            ResourceKind::AuthorizationPolicy => next.authorization.apply(response)?,
        };
        if changed {
            let generation = self.current.generation + 1;
            let config = assemble(&next, &self.current.local_namespace, generation)?;
            self.current = Arc::new(config);
        }
        self.state = next;
        Ok(Applied {
            config: self.current.clone(),
            changed,
        })
    }

    /// The configuration built from everything applied so far.
    pub fn current(&self) -> &Arc<Config> {
        &self.current
    }

    /// Whether a response of `kind` was ever applied.
    pub fn has_received(&self, kind: ResourceKind) -> bool {
        self.state.received(kind)
    }

    /// Whether a response of every kind was applied: the configuration is complete.
    pub fn is_complete(&self) -> bool {
        ResourceKind::ALL
            .into_iter()
            .all(|k| self.state.received(k))
    }

    /// Name -> version of what is held of `kind`: a reconnecting client's
    /// `initial_resource_versions`.
    pub fn versions(&self, kind: ResourceKind) -> BTreeMap<String, String> {
        self.state.versions(kind).resources
    }
}

/// A service port claiming a hostname: the service and the index of the port.
type Claim<'a> = (&'a Arc<ServiceConfig>, usize);

/// Builds a whole configuration from held resources: joins each service with its routes,
/// endpoints and policy, builds the lookup indexes, and checks what must hold across resources.
fn assemble(state: &State, local_namespace: &str, generation: u64) -> Result<Config, ConfigError> {
    let mut unresolved = Vec::new();

    let mut services = BTreeMap::new();
    for (name, held) in state.services.items.iter() {
        let service = ServiceConfig {
            service: held.value.clone(),
            routes: state
                .routes
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(RouteTable::empty(name))),
            endpoints: state
                .endpoints
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(Endpoints::empty(name))),
            traffic_policy: state
                .policies
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(TrafficPolicy::default_for(name))),
        };
        services.insert(name.clone(), Arc::new(service));
    }

    let orphans: [(ResourceKind, Vec<&String>); 3] = [
        (
            ResourceKind::Endpoints,
            state.endpoints.items.keys().collect(),
        ),
        (
            ResourceKind::TrafficPolicy,
            state.policies.items.keys().collect(),
        ),
        (
            ResourceKind::RouteTable,
            state.routes.items.keys().collect(),
        ),
    ];
    for (kind, names) in orphans {
        for name in names.into_iter().filter(|n| !services.contains_key(*n)) {
            unresolved.push(Unresolved::NoSuchService {
                kind,
                name: name.clone(),
            });
        }
    }
    for service in services.values() {
        for route in &service.routes.routes {
            for d in &route.destinations {
                if !services.contains_key(&d.service) {
                    unresolved.push(Unresolved::MissingDestination {
                        service: service.name().to_owned(),
                        route: route.name.clone(),
                        destination: d.service.clone(),
                    });
                }
            }
        }
    }

    // A VIP and port lead to exactly one service: a second claim is a conflict.
    let mut by_addr: HashMap<SocketAddr, PortRef, FxBuildHasher> = HashMap::default();
    for service in services.values() {
        for vip in &service.service.vips {
            for (index, port) in service.service.ports.iter().enumerate() {
                let addr = SocketAddr::new(*vip, port.port);
                if let Some(first) = by_addr.get(&addr) {
                    return Err(ConfigError::Conflict {
                        kind: ResourceKind::Service,
                        first: first.service.name().to_owned(),
                        second: service.name().to_owned(),
                        what: format!("the address {addr}"),
                    });
                }
                by_addr.insert(
                    addr,
                    PortRef {
                        service: service.clone(),
                        index,
                    },
                );
            }
        }
    }

    // A hostname may be claimed by several services (a short name like `articles` exists in
    // every namespace that has such a service). As DNS search paths do, the proxy's own
    // namespace wins; otherwise only an unambiguous claim is indexed.
    let mut claims: HashMap<(&str, u16), Vec<Claim<'_>>> = HashMap::new();
    for service in services.values() {
        for host in &service.service.hostnames {
            for (index, port) in service.service.ports.iter().enumerate() {
                claims
                    .entry((host.as_str(), port.port))
                    .or_default()
                    .push((service, index));
            }
        }
    }
    let mut by_host: HashMap<String, Vec<HostEntry>, FxBuildHasher> = HashMap::default();
    for ((host, port), candidates) in claims {
        let chosen = match candidates.as_slice() {
            [only] => Some(*only),
            _ => {
                let mut local = candidates
                    .iter()
                    .filter(|(s, _)| s.service.namespace == local_namespace);
                match (local.next(), local.next()) {
                    (Some(one), None) => Some(*one),
                    _ => None,
                }
            }
        };
        match chosen {
            Some((service, index)) => by_host.entry(host.to_owned()).or_default().push(HostEntry {
                port,
                target: PortRef {
                    service: service.clone(),
                    index,
                },
            }),
            None => unresolved.push(Unresolved::AmbiguousHost {
                host: host.to_owned(),
                port,
                services: candidates
                    .iter()
                    .map(|(s, _)| s.name().to_owned())
                    .collect(),
            }),
        }
    }
    unresolved.sort();

    let versions = ResourceKind::ALL
        .into_iter()
        .map(|kind| (kind, state.versions(kind)))
        .collect();

    Ok(Config {
        generation,
        local_namespace: local_namespace.to_owned(),
        mesh: state
            .mesh
            .get(MeshSettings::RESOURCE_NAME)
            .cloned()
            .unwrap_or_default(),
        services,
        by_addr,
        by_host,
        authorization: state
            .authorization
            .items
            .values()
            .map(|h| h.value.clone())
            .collect(),
        versions,
        unresolved,
    })
}
