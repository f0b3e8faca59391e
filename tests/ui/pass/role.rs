//! The Role form: `main` runs in every process and matches on its role (no worker is forked).

#[cluster::main]
async fn main(role: cluster::Role) -> std::io::Result<()> {
    match role {
        cluster::Role::Primary(_) => Ok(()),
        cluster::Role::Worker(_) => Ok(()),
    }
}
