//! keelctl: validate, apply and inspect keel mesh configuration.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = keel_control_plane::cli::Cli::parse();
    match keel_control_plane::cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("keelctl: {e:#}");
            std::process::exit(1);
        }
    }
}
