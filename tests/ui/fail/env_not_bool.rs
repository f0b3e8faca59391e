#[cluster::main(env = "false")]
async fn main() {}

#[allow(dead_code)]
#[cluster::main(env = 0)]
async fn other() {}
