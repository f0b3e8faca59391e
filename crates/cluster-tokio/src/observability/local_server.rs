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
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

/// What a served client says of itself: idle (it may be closed to make room) or busy. The
/// accept loop takes an idle client only by winning the same atomic step the client takes to
/// become busy, so a command that started is never cut.
#[derive(Debug)]
pub(crate) struct Idle(Arc<Client>);

#[derive(Debug)]
struct Client {
    state: AtomicU8,
    evicted: Notify,
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const EVICTED: u8 = 2;

impl Idle {
    /// The client starts on a request: returns `false` if it was closed to make room first
    /// (then it must not start it).
    pub(crate) fn busy(&self) -> bool {
        match self
            .0
            .state
            .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == BUSY,
        }
    }

    /// The client waits for its peer again: it may be closed to make room.
    pub(crate) fn idle(&self) {
        let _ = self
            .0
            .state
            .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Client {
    /// Takes this client to make room, if it is idle.
    fn evict(&self) -> bool {
        let evicted = self
            .state
            .compare_exchange(IDLE, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if evicted {
            self.evicted.notify_one();
        }
        evicted
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
                let oldest_idle = clients
                    .iter()
                    .position(|client| client.upgrade().is_some_and(|c| c.evict()));
                let Some(index) = oldest_idle else {
                    continue;
                };
                clients.remove(index);
                tracing::debug!("{what}: every slot taken; the oldest idle client gave way");
                // Its task ends at its next poll, and gives its slot back.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                permit
            }
        };
        let client = Arc::new(Client {
            state: AtomicU8::new(IDLE),
            evicted: Notify::new(),
        });
        clients.push_back(Arc::downgrade(&client));
        let served = serve(stream, Idle(client.clone()));
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = client.evicted.notified() => {}
                () = served => {}
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use tokio::sync::{mpsc, oneshot, watch};

    use super::*;

    /// A client chosen to make room whose request arrived in the same turn: it is either taken
    /// before it starts, or it runs to its end; never cut in the middle.
    #[tokio::test(flavor = "current_thread")]
    async fn making_room_never_cuts_a_request_that_started() {
        /// Counts a request dropped before it finished.
        struct Cut(Arc<AtomicUsize>, bool);
        impl Drop for Cut {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.fetch_add(1, SeqCst);
                }
            }
        }
        let cut = Arc::new(AtomicUsize::new(0));
        for round in 0..50 {
            let (clients, incoming) = mpsc::unbounded_channel::<oneshot::Receiver<()>>();
            let incoming = Arc::new(tokio::sync::Mutex::new(incoming));
            let (finish, finished) = watch::channel(false);
            let counted = cut.clone();
            let server = tokio::spawn(accept_loop(
                "test",
                1,
                move || {
                    let incoming = incoming.clone();
                    async move { Ok::<_, io::Error>(incoming.lock().await.recv().await.unwrap()) }
                },
                move |request: oneshot::Receiver<()>, idle: Idle| {
                    let (counted, mut finished) = (counted.clone(), finished.clone());
                    async move {
                        if request.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        if !idle.busy() {
                            return;
                        }
                        let mut started = Cut(counted, false);
                        let _ = finished.wait_for(|done| *done).await;
                        started.1 = true;
                    }
                },
            ));
            let (first_request, first) = oneshot::channel();
            clients.send(first).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            // A second client comes as the first one's request does.
            let (_second_request, second) = oneshot::channel();
            clients.send(second).unwrap();
            first_request.send(()).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                cut.load(SeqCst),
                0,
                "round {round}: a started request was cut"
            );
            finish.send(true).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            server.abort();
        }
    }
}
