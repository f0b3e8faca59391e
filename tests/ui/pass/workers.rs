//! The workers form: the primary forks 2 copies of this binary, each runs the empty body.

#[cluster::main(workers = 2)]
async fn main() {}
