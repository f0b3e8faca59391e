#[cluster::main(workers = 2, flavor = "multi_thread", workers = 3)]
async fn main() {}
