//! The Tokio runtime of `cluster`: the only crate that touches processes, sockets and signals.
//!
//! It drives the sans-IO state machines of [`proto`] (`cluster-core`) with real I/O.

pub use proto;
