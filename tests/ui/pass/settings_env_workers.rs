//! `settings = path` through a module, `env = false`, and `workers = 2` applied on top: the
//! primary forks 2 copies of this binary, each runs the empty body.

mod config {
    pub(crate) fn settings() -> cluster::Settings {
        cluster::Settings::new().workers(8)
    }
}

#[cluster::main(settings = crate::config::settings, env = false, workers = 2)]
async fn main() {}
