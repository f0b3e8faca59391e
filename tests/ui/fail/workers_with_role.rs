#[cluster::main(workers = 4)]
async fn main(role: cluster::Role) {
    drop(role);
}
