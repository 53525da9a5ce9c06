//! keel's transparent sidecar proxy. One module per concern (see the project's design notes);
//! `main.rs` only parses the command line.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod health;
pub mod inbound;
pub mod init;
pub mod locality;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod resilience;
pub mod run;
pub mod serve;
pub mod tls;
pub mod transparent;
