#[cluster::main]
#[tokio::main]
async fn main() {}

#[allow(dead_code)]
#[cluster::main(workers = 2)]
#[tokio::main(flavor = "multi_thread")]
async fn other() {}
