//! `cluster-ctl`: see the crate's library docs, or run `cluster-ctl --help`.

fn main() -> std::process::ExitCode {
    cluster_ctl::main()
}
