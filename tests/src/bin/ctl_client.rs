//! `cluster-ctl` as the tests run it: the shipped client's code, built as a binary of this
//! package so that the tests can find it.

fn main() -> std::process::ExitCode {
    cluster_ctl::main()
}
