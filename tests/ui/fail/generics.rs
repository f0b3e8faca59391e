#[cluster::main]
async fn main<T>() {}
