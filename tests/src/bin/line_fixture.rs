//! A line protocol over a plain `ClusterListener`, for the hand-back API without the serve
//! helpers: every worker listens on `127.0.0.1:0`, prints `worker <id> pid <pid> port <port>`,
//! and answers each line `<text>` with `<build> worker <id> <text>`. Leaving while other workers
//! stay, it hands each connection back between two lines, with the part of a line it has read;
//! it takes such connections with `accept_with_prefix`.

use std::io::Write;

use cluster::ClusterListener;
use cluster::net::HandBack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

#[cluster::main(workers = 2)]
async fn main() -> std::io::Result<()> {
    let mut listener = ClusterListener::bind("127.0.0.1:0").await?;
    let id = cluster::Worker::current().map_or(0, |w| w.id().get());
    let port = listener.local_addr()?.port();
    say(&format!(
        "worker {id} pid {} port {port}",
        std::process::id()
    ));
    let hand_back = listener.hand_back();
    let build = cluster_tests::build_version();
    let (stop, stopped) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = cluster::shutdown() => break,
            accepted = listener.accept_with_prefix() => {
                let (stream, _, unread) = accepted?;
                let line = Line {
                    prefix: format!("{build} worker {id} "),
                    stopped: stopped.clone(),
                    hand_back: hand_back.clone(),
                };
                connections.spawn(line.serve(stream, unread));
            }
        }
    }
    drop(listener);
    stop.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

struct Line {
    prefix: String,
    stopped: watch::Receiver<bool>,
    hand_back: Option<HandBack>,
}

impl Line {
    /// Answers lines until the client leaves, or until the worker stops: then the connection
    /// goes back with what it has of the next line, or is closed when there is nowhere to go.
    async fn serve(mut self, mut stream: TcpStream, mut unread: Vec<u8>) {
        loop {
            while let Some(end) = unread.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = unread.drain(..=end).collect();
                let mut answer = self.prefix.clone().into_bytes();
                answer.extend_from_slice(&line);
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
            let mut chunk = [0; 512];
            tokio::select! {
                _ = self.stopped.wait_for(|stopped| *stopped) => break,
                read = stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => unread.extend_from_slice(&chunk[..n]),
                },
            }
        }
        // Between two lines: nothing half answered.
        let Some(hand_back) = self.hand_back.filter(HandBack::is_wanted) else {
            return;
        };
        let Ok(conn) = stream.into_std() else {
            return;
        };
        if let Err(error) = hand_back.send(conn, unread) {
            eprintln!("not handed back: {error}");
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
