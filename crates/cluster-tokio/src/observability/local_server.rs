//! The accept loop of the primary's own small servers (the metrics endpoint, the control
//! socket): a bounded number of clients at a time, each served on its own task.
//!
//! Clients that hold a slot without asking anything (a slow request head, an idle command
//! connection, a flood of either) must not keep out the ones that matter: a liveness probe, an
//! operator's `cluster-ctl`. So when every slot is taken, the oldest client that is idle (it
//! has not finished its request yet, or waits between commands) gives way to the new one;
//! only when every client is busy is the new one closed at once.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

/// What a served client says of itself: idle (evictable) or busy.
#[derive(Debug)]
pub(crate) struct Idle(Arc<Client>);

#[derive(Debug)]
struct Client {
    idle: AtomicBool,
    evicted: Notify,
}

impl Idle {
    /// The client waits for its peer (evictable), or works on its request (not).
    pub(crate) fn set(&self, idle: bool) {
        self.0.idle.store(idle, Ordering::Relaxed);
    }
}

/// Accepts with `accept` forever, serving each client with `serve` on its own task while fewer
/// than `max` are being served. When all are, the oldest idle client is closed to make room;
/// if none is idle, the new client is closed at once. A client starts idle. `what` names the
/// server in logs.
pub(crate) async fn accept_loop<S, A, F, H, T>(what: &str, max: usize, mut accept: A, serve: H)
where
    A: FnMut() -> F,
    F: Future<Output = io::Result<S>>,
    H: Fn(S, Idle) -> T,
    T: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    // The clients being served, oldest first.
    let mut clients: VecDeque<Weak<Client>> = VecDeque::new();
    loop {
        let stream = match accept().await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of fds, mostly: the workers' connections matter more than these clients.
                tracing::debug!(%error, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        clients.retain(|client| client.strong_count() > 0);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest_idle = clients.iter().position(|client| {
                    client
                        .upgrade()
                        .is_some_and(|c| c.idle.load(Ordering::Relaxed))
                });
                let Some(index) = oldest_idle else {
                    continue;
                };
                if let Some(client) = clients.remove(index).and_then(|c| c.upgrade()) {
                    client.evicted.notify_one();
                }
                tracing::debug!("{what}: every slot taken; the oldest idle client gave way");
                // Its task ends at its next poll, and gives its slot back.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                permit
            }
        };
        let client = Arc::new(Client {
            idle: AtomicBool::new(true),
            evicted: Notify::new(),
        });
        clients.push_back(Arc::downgrade(&client));
        let served = serve(stream, Idle(client.clone()));
        tokio::spawn(async move {
            tokio::select! {
                () = served => {}
                () = client.evicted.notified() => {}
            }
            drop(permit);
        });
    }
}
