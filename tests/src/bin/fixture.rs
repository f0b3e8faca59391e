//! A worker for the multi-process tests: does what the test (its primary) tells it.

use cluster::{ClusterListener, Role, RuntimeOptions, Worker};
use cluster_tests::{Command, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

fn main() {
    cluster::run(RuntimeOptions::new(), |role| async move {
        match role {
            Role::Worker(worker) => serve(worker).await,
            Role::Primary(_) => {
                eprintln!("fixture: this binary is started by a test's primary");
                std::process::exit(2);
            }
        }
    });
}

struct Listener {
    task: JoinHandle<()>,
    pause: watch::Sender<bool>,
}

async fn serve(worker: Worker) {
    let id = worker.id().get();
    let mut listeners: Vec<Option<Listener>> = Vec::new();
    loop {
        let command = tokio::select! {
            command = worker.recv::<Command>() => command,
            () = worker.shutdown() => break,
        };
        let command = match command {
            Some(Ok(command)) => command,
            Some(Err(error)) => panic!("undecodable command: {error}"),
            None => break,
        };
        match command {
            Command::Listen { addr } => match ClusterListener::bind(addr).await {
                Ok(listener) => {
                    let port = listener.local_addr().expect("bound").port();
                    let index = listeners.len();
                    let (pause, paused) = watch::channel(false);
                    listeners.push(Some(Listener {
                        task: tokio::spawn(accept_loop(id, listener, paused)),
                        pause,
                    }));
                    worker
                        .send(&Reply::Listening { index, port })
                        .expect("send");
                }
                Err(error) => {
                    let reply = Reply::BindFailed {
                        kind: format!("{:?}", error.kind()),
                        errno: error.raw_os_error(),
                    };
                    worker.send(&reply).expect("send");
                }
            },
            Command::Pause { index } => {
                listeners[index]
                    .as_ref()
                    .expect("open")
                    .pause
                    .send_replace(true);
                worker.send(&Reply::Paused { index }).expect("send");
            }
            Command::Resume { index } => {
                listeners[index]
                    .as_ref()
                    .expect("open")
                    .pause
                    .send_replace(false);
            }
            Command::Close { index } => {
                if let Some(listener) = listeners.get_mut(index).and_then(Option::take) {
                    listener.task.abort();
                    let _ = listener.task.await;
                }
                worker.send(&Reply::Closed { index }).expect("send");
            }
            Command::Env { name } => {
                let value = std::env::var(&name).ok();
                let cwd = std::env::current_dir().expect("cwd").display().to_string();
                worker.send(&Reply::Env { value, cwd }).expect("send");
            }
            Command::Block { ms } => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Command::Exit { code } => std::process::exit(code),
            Command::Disconnect => {
                worker.disconnect().await.expect("disconnect");
                break;
            }
        }
    }
    // Leaving: every listener stopped accepting; wait until the clients close what was accepted.
    for Listener { task, pause } in listeners.into_iter().flatten() {
        // A paused accept loop ends when its pause channel closes.
        drop(pause);
        let _ = task.await;
    }
}

async fn accept_loop(id: u64, mut listener: ClusterListener, mut paused: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        // While paused, connections queue up in the listener unaccepted.
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // `accept` is cancel safe: pausing loses no connection.
            _ = paused.wait_for(|p| *p) => continue,
        };
        let Ok((mut stream, _)) = accepted else { break };
        connections.spawn(async move {
            let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
            // Held until the client closes it.
            let _ = stream.read(&mut [0; 1]).await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
