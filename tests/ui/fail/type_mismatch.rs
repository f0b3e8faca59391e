#[cluster::main]
async fn main(_role: cluster::Role) -> std::io::Result<()> {
    Ok(());
}
