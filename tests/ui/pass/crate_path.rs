//! An explicit path to the `cluster` crate.

#[cluster::main(crate = "cluster", workers = 1)]
async fn main() {}
