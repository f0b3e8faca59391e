//! The accept loop of the primary's own small servers (the metrics endpoint, the control
//! socket): a bounded number of clients at a time, each served on its own task.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Accepts with `accept` forever, serving each client with `serve` on its own task while fewer
/// than `max` are being served; one more is closed at once. `what` names the server in logs.
pub(crate) async fn accept_loop<S, A, F, H, T>(what: &str, max: usize, mut accept: A, serve: H)
where
    A: FnMut() -> F,
    F: Future<Output = io::Result<S>>,
    H: Fn(S) -> T,
    T: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let client = match accept().await {
            Ok(client) => client,
            Err(error) => {
                // Out of fds, mostly: the workers' connections matter more than these clients.
                tracing::debug!(%error, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let served = serve(client);
        tokio::spawn(async move {
            served.await;
            drop(permit);
        });
    }
}
