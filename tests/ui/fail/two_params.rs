#[cluster::main]
async fn main(role: cluster::Role, _extra: u32) {
    drop(role);
}
