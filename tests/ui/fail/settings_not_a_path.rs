#[cluster::main(settings = "x")]
async fn main() {}

#[allow(dead_code)]
#[cluster::main(settings = settings())]
async fn other() {}

#[allow(dead_code)]
fn settings() -> cluster::Settings {
    cluster::Settings::new()
}
