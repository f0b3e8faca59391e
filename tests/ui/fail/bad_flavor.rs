#[cluster::main(flavor = "multi-thread")]
async fn main() {}

#[allow(dead_code)]
#[cluster::main(flavor = "single_thread")]
async fn other() {}
