//! `keel-test-endpoint --listen <addr> --name <name> [--mode ok|fail|flaky|hang|delay-<ms>]`: an
//! HTTP endpoint whose faults a test controls (see `keel_tests::endpoint`).

fn main() -> anyhow::Result<()> {
    keel_tests::endpoint::run_from_args(std::env::args().skip(1))
}
