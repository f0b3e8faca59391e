//! A program in the `Role` form, through `cluster::run` without the macro: its code asks for two
//! workers (`Settings::workers(2)`), and with `FIXTURE_NO_ENV=1` it turns the `CLUSTER_*`
//! overrides off. The primary prints `forking <n>` and forks `Settings::worker_count()` workers;
//! each prints `worker <id>` and exits; the primary exits once all have.

use std::io::Write;

use cluster::primary::Event;
use cluster::{Role, Settings};

fn main() {
    let settings = Settings::new()
        .workers(2)
        .env_overrides(std::env::var_os("FIXTURE_NO_ENV").is_none());
    cluster::run(settings, |role| async move {
        match role {
            Role::Worker(worker) => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "worker {}", worker.id().get()).expect("stdout");
                out.flush().expect("stdout");
            }
            Role::Primary(primary) => {
                let mut events = primary.events();
                let count = primary.settings().worker_count();
                println!("forking {count}");
                for _ in 0..count {
                    primary.fork().await.expect("fork");
                }
                let mut exited = 0;
                while exited < count {
                    if let Some(Event::Exit { .. }) = events.recv().await {
                        exited += 1;
                    }
                }
            }
        }
    });
}
