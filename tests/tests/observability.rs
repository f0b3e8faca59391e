//! What an operator sees of a running cluster from outside: process names.

mod support;

use support::program::Program;

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_owned()
}

#[test]
fn ps_names_the_primary_and_each_worker() {
    let mut program = Program::start(
        env!("CARGO_BIN_EXE_http_fixture"),
        &[("CLUSTER_WORKERS", "2")],
    );
    let mut workers = [program.worker(), program.worker()];
    workers.sort_unstable();
    // The program's name, shortened to fit the kernel's 15 bytes.
    assert_eq!(comm(program.pid()), "http_fi:primary");
    for (id, pid, _) in workers {
        assert_eq!(comm(pid), format!("http_fixture:w{id}"));
    }
}
