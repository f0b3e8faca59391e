//! What the core reports, as the user's events, and the user's messages as the core's frames.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use proto::WorkerId;
use proto::wire::{Envelope, UserKind};

use super::super::{Event, ListenAddress, WorkerHandle, WorkerShared};
use super::{Driver, Held, Input};

impl Driver {
    pub(super) fn publish(&mut self, event: proto::Event) {
        let handle = |workers: &HashMap<WorkerId, Arc<WorkerShared>>, id: &WorkerId| {
            workers.get(id).map(|shared| WorkerHandle {
                shared: shared.clone(),
                tx: self.input_tx.clone(),
            })
        };
        let event = match event {
            proto::Event::Online { worker, .. } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.state = proto::WorkerState::Online);
                Event::Online(w)
            }
            proto::Event::Listening { worker, addr, .. } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.state = proto::WorkerState::Listening);
                Event::Listening {
                    worker: w,
                    address: ListenAddress::from_bound(addr),
                }
            }
            proto::Event::Ready { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                w.shared.update(|s| s.ready = true);
                Event::Ready(w)
            }
            proto::Event::User { worker, envelope } => {
                let fd = if envelope.fd {
                    self.received.pop()
                } else {
                    None
                };
                let tx = self.input_tx.downgrade();
                let answer = move |seq| -> crate::message::Responder {
                    Box::new(move |answer| {
                        tx.upgrade()
                            .and_then(|tx| {
                                tx.send(Input::Answer {
                                    worker,
                                    ack: seq,
                                    answer,
                                })
                                .ok()
                            })
                            .ok_or_else(super::super::stopped)
                    })
                };
                let requests = self.links.get_mut(&worker).map(|link| &mut link.requests);
                let Some(message) = crate::message::route(envelope, fd, requests, answer) else {
                    return;
                };
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                Event::Message { worker: w, message }
            }
            proto::Event::Disconnect { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                let eod = self
                    .core
                    .lifecycle(worker)
                    .and_then(proto::Lifecycle::exited_after_disconnect);
                w.shared.update(|s| {
                    s.state = proto::WorkerState::Disconnected;
                    s.connected = false;
                    s.exited_after_disconnect = eod;
                });
                Event::Disconnect(w)
            }
            proto::Event::Exit {
                worker,
                status,
                exited_after_disconnect,
                killed,
            } => {
                let Some(shared) = self.workers.remove(&worker) else {
                    return;
                };
                self.shared
                    .workers
                    .lock()
                    .expect("not poisoned")
                    .remove(&worker);
                let w = WorkerHandle {
                    shared,
                    tx: self.input_tx.clone(),
                };
                w.shared.update(|s| {
                    s.state = proto::WorkerState::Dead;
                    s.connected = false;
                    s.exited_after_disconnect = Some(exited_after_disconnect);
                    s.exit = Some(status);
                    s.killed = killed;
                });
                Event::Exit {
                    worker: w,
                    status,
                    killed,
                }
            }
            proto::Event::Error { worker, error } => {
                // The whole chain names the rule (`link protocol violated: protocol version
                // mismatch: ours 2, peer 99`), not only its family.
                tracing::warn!(%worker, error = %crate::env::ErrorChain(&error), "worker broke the protocol; disconnecting and killing it");
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                Event::Error { worker: w, error }
            }
        };
        self.shared.publish(event);
    }

    /// Queues a user frame for `worker`; an fd waits in the connection slab until sent.
    pub(super) fn send_user(
        &mut self,
        worker: WorkerId,
        kind: UserKind,
        payload: Vec<u8>,
        fd: Option<OwnedFd>,
    ) {
        let envelope = Envelope {
            kind,
            fd: fd.is_some(),
            payload,
        };
        let token = fd.map(|fd| self.tokens.insert(Held::new(fd)));
        // Sizes were checked when the value was encoded.
        if let Err((error, token)) = self.core.send_user(worker, envelope, token) {
            tracing::warn!(%worker, %error, "message not sent");
            if let Some(token) = token {
                self.tokens.remove(token);
            }
        }
        self.drain_core();
    }
}
