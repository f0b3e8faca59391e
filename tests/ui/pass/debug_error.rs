//! An error type that is `Debug` but not `Display`: returned as it is, for std to print.

#[derive(Debug)]
struct Opaque;

impl From<std::io::Error> for Opaque {
    fn from(_: std::io::Error) -> Self {
        Self
    }
}

#[cluster::main(workers = 1)]
async fn main() -> Result<(), Opaque> {
    Ok(())
}
