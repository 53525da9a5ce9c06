//! The contract between keel's control plane and its proxies: the `Discovery`
//! stream (xDS-style, incremental, ACK/NACK) and the `Identity` service.
//!
//! Generated code, plus the pieces of the contract both sides must parse and check alike: SPIFFE
//! IDs and the ceilings on durations.

pub mod limits;
pub mod spiffe;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("keel.mesh.v1");

    /// Type URLs of the resources carried by the discovery stream.
    pub mod type_url {
        pub const SERVICE: &str = "type.googleapis.com/keel.mesh.v1.Service";
        pub const ROUTE_TABLE: &str = "type.googleapis.com/keel.mesh.v1.RouteTable";
        pub const ENDPOINTS: &str = "type.googleapis.com/keel.mesh.v1.Endpoints";
        pub const TRAFFIC_POLICY: &str = "type.googleapis.com/keel.mesh.v1.TrafficPolicy";
        pub const AUTHORIZATION_POLICY: &str =
            "type.googleapis.com/keel.mesh.v1.AuthorizationPolicy";
        pub const MESH_CONFIG: &str = "type.googleapis.com/keel.mesh.v1.MeshConfig";

        /// Every type, in the order a server should send them on a new stream
        /// (mesh settings and services before the routes that name them, and
        /// endpoints before routes so a route never points at nothing).
        pub const ALL: [&str; 6] = [
            MESH_CONFIG,
            SERVICE,
            ENDPOINTS,
            TRAFFIC_POLICY,
            ROUTE_TABLE,
            AUTHORIZATION_POLICY,
        ];
    }
}
