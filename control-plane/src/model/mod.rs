//! The mesh model: keel's resources (`MeshConfig`, `Workload`, `Service`, `TrafficPolicy`,
//! `AuthorizationPolicy`) as typed Rust values, read from Kubernetes-shaped YAML
//! (`apiVersion: keel.dev/v1alpha1`) and validated, with every error naming its file, line,
//! column, field path and reason.
//!
//! Flow: [`load_dir`] / [`load_files`] read files → [`parse_file`] cuts each into documents and
//! decodes each document into a [`Resource`] (all field-level rules) → [`Model::from_resources`]
//! checks what spans resources (duplicates, references) and builds the [`Model`] that the store
//! and discovery server consume.
//!
//! This module must never panic on any input, never hand out a half-validated resource, and
//! never let YAML-library types leak into its public types: everything downstream of it assumes
//! the model is valid and does not check again.
//!
//! A watched directory changes a file at a time: [`IndexedModel`] applies such a change to a
//! valid model, checking only what the change takes part in, and [`ModelChange`] says which
//! resources differ between two models, so that consumers rebuild only what depends on them.
//!
//! Files: `resources` (the public types), `yaml` (documents → spanned node trees), `decode`
//! (typed readers over nodes), `parse` (one reader per kind), `validate` (cross-resource checks),
//! `change` (incremental checks and model differences), `mesh` (the [`Model`] and its queries),
//! `load` (files and directories), `error`.

mod change;
mod decode;
mod error;
mod load;
mod mesh;
mod parse;
mod resources;
mod validate;
mod yaml;

pub use change::{IndexedModel, ModelChange};
pub use error::{ErrorKind, ValidationError, ValidationErrors};
pub use load::{MeshFile, load_dir, load_files, mesh_files, read_mesh_file, yaml_files};
pub use mesh::{EndpointIndex, Model, selector_matches};
pub use parse::parse_file;
pub use resources::*;

#[cfg(test)]
mod tests;
