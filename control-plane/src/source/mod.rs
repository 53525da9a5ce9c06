//! Where the mesh model comes from. The file source (a watched directory) is the default and
//! needs no cluster.

pub mod apply;
pub mod file;
