//! A multi-thread worker runtime, and a return type other than `io::Result`.

#[cluster::main(workers = 1, flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}
