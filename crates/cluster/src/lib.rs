//! `cluster`: a Tokio-native multi-process cluster runtime, Node's `cluster` module for async
//! Rust.
//!
//! This facade re-exports the runtime ([`cluster_tokio`]) and its sans-IO protocol core
//! ([`proto`]).

pub use cluster_tokio::proto;
