//! keel's transparent sidecar proxy.
