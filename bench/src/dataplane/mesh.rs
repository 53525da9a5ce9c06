//! The benchmark's mesh: five pods on one subnet and two services, and the YAML the control plane
//! serves for them.
//!
//! | pod | address | runs | used by |
//! | --- | --- | --- | --- |
//! | `client` | .2 | `wrk`, `h2load`, the load generator | direct |
//! | `client-mesh` | .3 | `wrk`, `h2load`, the load generator, a sidecar | one hop, sidecar pair |
//! | `server` | .4 | nginx, no sidecar (`meshed: false`) | direct, one hop |
//! | `server-mesh` | .5 | nginx, a sidecar | sidecar pair |
//! | `server-b` | .6 | nginx, no sidecar | the endpoint-churn scenario |
//!
//! Service `plain` (VIP 10.96.91.1, port 80 to 8080) selects `server` (and `server-b` while the
//! churn scenario says so); service `meshed` (VIP 10.96.91.2) selects `server-mesh`, port 80 to
//! 8080 (HTTP/1.1) and port 81 to 8081 (HTTP/2: nginx's h2c port, see nginx.conf).

use std::net::Ipv4Addr;

use anyhow::ensure;
use ipnet::Ipv4Net;

/// The mesh namespace of every resource.
pub const NAMESPACE: &str = "bench";
/// Where nginx listens in the server pods.
pub const APP_PORT: u16 = 8080;
/// Where nginx speaks HTTP/2 (h2c with prior knowledge) in the server pods.
pub const H2_APP_PORT: u16 = 8081;
/// The services' port (on their VIPs).
pub const SERVICE_PORT: u16 = 80;
/// Service `meshed`'s HTTP/2 port, to [`H2_APP_PORT`].
pub const H2_SERVICE_PORT: u16 = 81;
/// The mesh's trust domain (in SPIFFE IDs).
pub const TRUST_DOMAIN: &str = "bench.local";
/// The control plane's discovery port, on the network's gateway.
pub const DISCOVERY_PORT: u16 = 15010;
/// The sidecars' admin port.
pub const ADMIN_PORT: u16 = 15020;
/// VIP of service `plain` (inside 10.96.0.0/16, which pods route via the gateway).
pub const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 91, 1);
/// VIP of service `meshed`.
pub const MESHED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 91, 2);

/// The addresses of the benchmark's network.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub client: Ipv4Addr,
    pub client_mesh: Ipv4Addr,
    pub server: Ipv4Addr,
    pub server_mesh: Ipv4Addr,
    pub server_b: Ipv4Addr,
}

impl Layout {
    /// Addresses .1 (the gateway) to .6 of `subnet`.
    pub fn new(subnet: Ipv4Net) -> anyhow::Result<Layout> {
        let subnet = subnet.trunc();
        ensure!(
            subnet.prefix_len() <= 29,
            "the subnet {subnet} is too small: it needs a gateway and five pods (at most /29)"
        );
        ensure!(
            !subnet.contains(&PLAIN_VIP) && !subnet.contains(&MESHED_VIP),
            "the subnet {subnet} contains the service VIPs {PLAIN_VIP} and {MESHED_VIP}"
        );
        let host = |n: u32| Ipv4Addr::from(u32::from(subnet.network()) + n);
        Ok(Layout {
            subnet,
            gateway: host(1),
            client: host(2),
            client_mesh: host(3),
            server: host(4),
            server_mesh: host(5),
            server_b: host(6),
        })
    }

    /// The mesh YAML the control plane serves, with `plain_endpoints` (some of `server` and
    /// `server-b`) selected by service `plain`; the others are parked under a label nothing
    /// selects. `mtls` says whether `server-mesh` takes mTLS (PERMISSIVE) or plaintext only
    /// (DISABLE, so its callers do not originate mTLS): the plaintext and the mTLS keel pairs.
    pub fn mesh_yaml(&self, plain_endpoints: &[Ipv4Addr], mtls: bool) -> String {
        let http =
            format!("{{name: http, port: {SERVICE_PORT}, targetPort: {APP_PORT}, protocol: HTTP}}");
        let h2 = format!(
            "{{name: h2, port: {H2_SERVICE_PORT}, targetPort: {H2_APP_PORT}, protocol: HTTP2}}"
        );
        let service = |name: &str, vip: Ipv4Addr, ports: &str| {
            format!(
                "apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  vips: [{vip}]
  ports: [{ports}]
  selector: {{app: {name}}}
---
"
            )
        };
        let plain_app = |ip: Ipv4Addr| {
            if plain_endpoints.contains(&ip) {
                "plain"
            } else {
                "parked"
            }
        };
        let workload = |name: &str, app: &str, ip: Ipv4Addr, meshed: bool, mode: &str| {
            format!(
                "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}}}}}
spec: {{addresses: [{ip}], meshed: {meshed}, serviceAccount: {name}{mode}}}
---
"
            )
        };
        let server_mesh_mode = if mtls { "" } else { ", mtlsMode: DISABLE" };
        [
            "# Written by the data-plane benchmark (bench/src/dataplane/mesh.rs).\n".to_owned(),
            format!(
                "apiVersion: keel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\n\
                 spec: {{trustDomain: {TRUST_DOMAIN}}}\n---\n"
            ),
            service("plain", PLAIN_VIP, &http),
            service("meshed", MESHED_VIP, &format!("{http}, {h2}")),
            workload("client-mesh", "client", self.client_mesh, true, ""),
            workload("server", plain_app(self.server), self.server, false, ""),
            workload(
                "server-b",
                plain_app(self.server_b),
                self.server_b,
                false,
                "",
            ),
            workload(
                "server-mesh",
                "meshed",
                self.server_mesh,
                true,
                server_mesh_mode,
            ),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_yaml() {
        let layout = Layout::new("10.91.0.0/24".parse().unwrap()).unwrap();
        assert_eq!(layout.gateway, Ipv4Addr::new(10, 91, 0, 1));
        assert_eq!(layout.server_mesh, Ipv4Addr::new(10, 91, 0, 5));
        assert_eq!(layout.server_b, Ipv4Addr::new(10, 91, 0, 6));
        let yaml = layout.mesh_yaml(&[layout.server], false);
        assert!(
            yaml.contains("spec: {addresses: [10.91.0.4], meshed: false, serviceAccount: server}")
        );
        assert!(yaml.contains(
            "spec: {addresses: [10.91.0.5], meshed: true, serviceAccount: server-mesh, mtlsMode: DISABLE}"
        ));
        assert!(!layout.mesh_yaml(&[layout.server], true).contains("DISABLE"));
        assert!(yaml.contains("vips: [10.96.91.2]"));
        assert!(
            yaml.contains("metadata: {name: server-b, namespace: bench, labels: {app: parked}}")
        );
        let both = layout.mesh_yaml(&[layout.server, layout.server_b], false);
        assert!(
            both.contains("metadata: {name: server-b, namespace: bench, labels: {app: plain}}")
        );
        assert!(Layout::new("10.91.0.0/30".parse().unwrap()).is_err());
        assert!(Layout::new("10.96.0.0/16".parse().unwrap()).is_err());
    }

    #[test]
    fn the_control_plane_accepts_the_mesh() {
        let layout = Layout::new("10.91.0.0/24".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (plain, mtls) in [
            (vec![layout.server], false),
            (vec![layout.server, layout.server_b], false),
            (vec![layout.server], true),
        ] {
            std::fs::write(dir.path().join("mesh.yaml"), layout.mesh_yaml(&plain, mtls)).unwrap();
            let (model, _) = keel_control_plane::model::load_dir(dir.path())
                .unwrap_or_else(|errors| panic!("invalid mesh: {errors}"));
            assert_eq!(model.services.len(), 2);
        }
    }
}
