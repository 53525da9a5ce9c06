//! keel's benchmark harness: what the benchmark binaries in `src/bin` share.
//!
//! - [`dataplane`]: the data-plane benchmark (direct, one hop, sidecar pair) and its report;
//! - [`openloop`]: the open-loop load generator (`openloop` binary);
//! - [`wrk`], [`h2load`]: running `wrk` and `h2load` and reading their reports;
//! - [`procfs`]: a measured process's CPU time and memory;
//! - [`summary`]: the median and spread of a figure over runs;
//! - [`results`]: sections of `bench/RESULTS.md` and what they say about the run.

pub mod dataplane;
pub mod h2load;
pub mod openloop;
pub mod procfs;
pub mod results;
pub mod steal;
pub mod summary;
pub mod wrk;
