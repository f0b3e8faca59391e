//! A worker for the multi-process tests: does what the test (its primary) tells it.

use cluster::{ClusterListener, Role, RuntimeOptions, Worker};
use cluster_tests::{Command, Reply};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

async fn serve(worker: Worker) {
    let id = worker.id().get();
    let mut listeners: Vec<Option<JoinHandle<()>>> = Vec::new();
    let mut pauses: Vec<watch::Sender<bool>> = Vec::new();
    loop {
        let command = tokio::select! {
            command = worker.recv::<Command>() => command,
            () = worker.shutdown() => return,
        };
        let command = match command {
            Some(Ok(command)) => command,
            Some(Err(error)) => panic!("undecodable command: {error}"),
            None => return,
        };
        match command {
            Command::Listen { addr } => match ClusterListener::bind(addr).await {
                Ok(mut listener) => {
                    let port = listener.local_addr().expect("bound").port();
                    let index = listeners.len();
                    let (pause, mut paused) = watch::channel(false);
                    pauses.push(pause);
                    listeners.push(Some(tokio::spawn(async move {
                        loop {
                            // While paused, connections queue up in the listener unaccepted.
                            if paused.wait_for(|p| !*p).await.is_err() {
                                return;
                            }
                            let accepted = tokio::select! {
                                accepted = listener.accept() => accepted,
                                // `accept` is cancel safe: pausing loses no connection.
                                _ = paused.wait_for(|p| *p) => continue,
                            };
                            let Ok((mut stream, _)) = accepted else {
                                return;
                            };
                            tokio::spawn(async move {
                                let _ = stream.write_all(format!("{id}\n").as_bytes()).await;
                                let _ = stream.shutdown().await;
                            });
                        }
                    })));
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
                pauses[index].send_replace(true);
                worker.send(&Reply::Paused { index }).expect("send");
            }
            Command::Close { index } => {
                if let Some(task) = listeners.get_mut(index).and_then(Option::take) {
                    task.abort();
                    let _ = task.await;
                }
                worker.send(&Reply::Closed { index }).expect("send");
            }
            Command::Block { ms } => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Command::Exit { code } => std::process::exit(code),
            Command::Disconnect => {
                worker.disconnect().await.expect("disconnect");
                return;
            }
        }
    }
}
