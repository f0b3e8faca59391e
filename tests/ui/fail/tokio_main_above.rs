#[tokio::main]
#[cluster::main]
async fn main() {}
