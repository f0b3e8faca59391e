//! Procedural macros of `cluster` (`#[cluster::main]`); use them through the `cluster` crate.
