//! `settings = path`: the options start from the `Settings` a function returns (the Role form:
//! no worker is forked). The body still sees the function, not a local of the expansion.

fn settings() -> cluster::Settings {
    cluster::Settings::new().disconnect_timeout(std::time::Duration::from_secs(2))
}

#[cluster::main(settings = settings)]
async fn main(role: cluster::Role) -> std::io::Result<()> {
    let _ = settings();
    match role {
        cluster::Role::Primary(_) => Ok(()),
        cluster::Role::Worker(_) => Ok(()),
    }
}
