//! The sans-IO core of `cluster`: wire messages, the seq/ack link, the handle registry and the
//! worker state machine.
//!
//! This crate performs no I/O, reads no clock and holds no file descriptor. It is driven by
//! `cluster-tokio`: inputs are `handle_*` calls, outputs are drained with `poll_*`, time is
//! passed in. Connections are opaque tokens (`C`) that the driver pairs with real sockets.
//!
//! ```text
//!   driver (cluster-tokio)                       core (this crate)
//!   ─────────────────────                        ─────────────────
//!   datagram from worker ─── handle_frame ─────▶ Primary ─┬─ Link (per worker: seq/ack)
//!   accepted connection ──── handle_connection ─▶         ├─ Registry ─ RoundRobin / Shared
//!   bind finished ────────── handle_bound ──────▶         └─ Lifecycle (per worker)
//!   worker exited ────────── handle_exit ───────▶
//!   deadline reached ─────── handle_timeout ────▶
//!                          ◀── poll_output: Transmit (+ fd) / Bind / Unbind / Close / Event
//! ```
//!
//! # The drain rule
//!
//! After every `handle_*` call, drain `poll_output` until it returns `None`, then re-arm the
//! timer from `poll_timeout`. Outputs are produced in the order their effects must happen.

#![forbid(unsafe_code)]

pub mod control;
pub mod error;
pub mod key;
pub mod lifecycle;
pub mod link;
pub mod primary;
pub mod registry;
pub mod session;
pub mod supervisor;
pub mod user;
pub mod wire;

pub use error::ProtocolError;
pub use key::{AddressType, HandleKey};
pub use lifecycle::{ExitStatus, KillReason, Lifecycle, WorkerState};
pub use link::{Link, LinkError};
pub use primary::{Attachment, Config, Counters, Event, FdKind, Output, Primary, Transmit};
pub use registry::{Registry, RegistryConfig, RegistryOutput, RoundRobin, SchedulingPolicy};
pub use session::{SessionEvent, SessionOutput, WorkerSession};
pub use supervisor::{Supervisor, SupervisorConfig, SupervisorEvent, SupervisorOutput};
pub use user::{Answer, SendError};
pub use wire::{HandleId, PROTOCOL_VERSION, Seq, WorkerId};
