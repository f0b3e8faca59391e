//! A primary with `Settings::silent`: it forks two workers, each prints one line that is not
//! UTF-8 (`raw <id> \xff`) and one JSON line (`{"msg":"json","id":<id>}`) on stdout, then
//! `FIXTURE_LINES` (default 1000) lines `out <id> <n>` on stdout and `err <id> <n>` on stderr,
//! and exits at once; the primary exits as soon as both have exited.

use std::io::Write;

use cluster::{Role, Settings};

fn main() {
    let lines: usize = std::env::var("FIXTURE_LINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    cluster::run(Settings::new().silent(true), |role| async move {
        match role {
            Role::Worker(worker) => {
                let id = worker.id().get();
                let mut raw = format!("raw {id} ").into_bytes();
                raw.extend_from_slice(b"\xff\n");
                std::io::stdout().write_all(&raw).expect("stdout");
                println!("{{\"msg\":\"json\",\"id\":{id}}}");
                for n in 0..lines {
                    println!("out {id} {n}");
                    eprintln!("err {id} {n}");
                }
            }
            Role::Primary(primary) => {
                let a = primary.fork().await.expect("fork");
                let b = primary.fork().await.expect("fork");
                a.exited().await;
                b.exited().await;
            }
        }
    });
}
