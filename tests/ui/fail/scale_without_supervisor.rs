//! `scale` belongs to `cluster::supervisor::SupervisorHandle`, not to `Primary`.

#[cluster::main]
async fn main(role: cluster::Role) -> std::io::Result<()> {
    match role {
        cluster::Role::Primary(primary) => primary.scale(3).await,
        cluster::Role::Worker(_) => Ok(()),
    }
}
