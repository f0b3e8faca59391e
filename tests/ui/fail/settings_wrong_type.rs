fn settings() -> i32 {
    2
}

#[cluster::main(settings = settings)]
async fn main() {}
