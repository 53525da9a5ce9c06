fn main() {
    eprintln!("keel-proxy: no subcommands are built yet");
    std::process::exit(2);
}
