//! What the core reports, as the user's events, and the user's messages as the core's frames.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use proto::WorkerId;

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
                self.mirror(worker, &w.shared);
                Event::Online(w)
            }
            proto::Event::Listening { worker, addr, .. } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                self.mirror(worker, &w.shared);
                Event::Listening {
                    worker: w,
                    address: ListenAddress::from_bound(addr),
                }
            }
            proto::Event::Ready { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                self.mirror(worker, &w.shared);
                Event::Ready(w)
            }
            proto::Event::Message {
                worker,
                payload,
                fd,
                request,
            } => {
                let fd = if fd { self.received.pop() } else { None };
                let tx = self.input_tx.downgrade();
                let responder = request.map(|seq| -> crate::message::Responder {
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
                });
                let message = crate::message::Message::new(payload, fd, responder);
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                // Not an event: messages have their own bounded stream.
                return self.deliver_message(worker, w, message);
            }
            proto::Event::Answer {
                worker,
                seq,
                answer,
            } => {
                if let Some(link) = self.links.get_mut(&worker) {
                    link.waiters.answer(seq, answer);
                }
                return;
            }
            proto::Event::Disconnect { worker } => {
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                self.mirror(worker, &w.shared);
                Event::Disconnect(w)
            }
            proto::Event::Exit {
                worker,
                status,
                exited_after_disconnect,
                killed,
            } => {
                self.disconnect_within.remove(&worker);
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
                // The core forgot the worker: its last word is in the event.
                w.shared.update(|s| {
                    s.state = proto::WorkerState::Dead;
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
                if let proto::ProtocolError::HandoffTimeout { seq } = &error {
                    // Not a broken rule: the worker stopped answering.
                    tracing::warn!(worker = worker.get(), connection = %seq, "worker did not acknowledge a connection within the handoff timeout: presumed hung; killing it (the connections it did not take go to other workers)");
                } else {
                    tracing::warn!(worker = worker.get(), error = %crate::env::ErrorChain(&error), "worker broke the protocol; disconnecting and killing it");
                }
                let Some(w) = handle(&self.workers, &worker) else {
                    return;
                };
                Event::Error {
                    worker: w,
                    error: super::super::ProtocolError::new(error),
                }
            }
        };
        self.shared.publish(event);
    }

    /// Copies the core's view of `worker` (the one place its state is kept) into what its
    /// handles show.
    fn mirror(&self, worker: WorkerId, shared: &WorkerShared) {
        let Some(lifecycle) = self.core.lifecycle(worker) else {
            return;
        };
        let ready = self.core.is_ready(worker);
        shared.update(|s| {
            s.state = lifecycle.state();
            s.exited_after_disconnect = lifecycle.exited_after_disconnect();
            s.ready = ready;
        });
    }

    /// Queues a user message for `worker`; its fd waits in the connection slab until sent.
    pub(super) fn send_message(&mut self, worker: WorkerId, payload: Vec<u8>, fd: Option<OwnedFd>) {
        let token = fd.map(|fd| self.tokens.insert(Held::new(fd)));
        // Sizes were checked when the value was encoded.
        if let Err((error, token)) = self.core.send_message(worker, payload, token) {
            tracing::warn!(worker = worker.get(), %error, "message not sent");
            if let Some(token) = token {
                self.tokens.remove(token);
            }
        }
        self.drain_core();
    }
}
