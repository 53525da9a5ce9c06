//! keel's control plane: reads the mesh model from its source, validates it, and streams each
//! proxy its view of it over the discovery stream. `keelctl` talks to its admin API.

pub mod admin;
pub mod cli;
pub mod demo;
pub mod discovery;
pub mod identity;
pub mod model;
pub mod server;
pub mod source;
pub mod store;

pub use server::{ControlPlane, ControlPlaneConfig};
