//! Procedural macros of `cluster` (`#[cluster::main]`); use them through the `cluster` crate.

mod entry;

use proc_macro::TokenStream;

/// Marks the `async fn main` of a clustered program: the same binary runs as the primary and,
/// re-executed by it, as every worker.
///
/// The function must be `async`, not generic, and take either no parameter or one
/// `cluster::Role`. It may return anything `main` can, or nothing. Its attributes, visibility
/// and doc comments are kept.
///
/// # Workers form
///
/// Without a parameter, the body is what every worker runs. The primary forks the workers,
/// restarts those that crash, reports their exits and, on SIGTERM, disconnects them gracefully
/// (on Ctrl-C too, within 5 s at most); it returns `Ok` after such a shutdown, and an error when
/// no worker can be kept running. The return type must then be `()` or `Result<(), E>` where
/// `E: From<std::io::Error>` (see `cluster::MainOutput`).
///
/// ```no_run
/// #[cluster::main(workers = 4)]
/// async fn main() -> std::io::Result<()> {
///     let mut listener = cluster::ClusterListener::bind("127.0.0.1:3000").await?;
///     while let Ok((stream, _peer)) = listener.accept().await {
///         tokio::spawn(async move { drop(stream) });
///     }
///     Ok(())
/// }
/// ```
///
/// # Role form
///
/// With one parameter, the function runs in every process and the parameter tells which
/// process it is: `Role::Primary` in the process that was started, `Role::Worker` in the
/// workers it forks. The primary forks and watches the workers itself. The parameter may be
/// any pattern, and its type is kept as written.
///
/// ```no_run
/// use cluster::Role;
///
/// #[cluster::main]
/// async fn main(role: Role) -> std::io::Result<()> {
///     match role {
///         Role::Primary(primary) => {
///             primary.fork().await?;
///             cluster::shutdown().await;
///             primary.disconnect().await
///         }
///         Role::Worker(_worker) => {
///             cluster::shutdown().await;
///             Ok(())
///         }
///     }
/// }
/// ```
///
/// # Arguments
///
/// - `workers = N` (workers form only): how many workers the primary forks, at least 1. The
///   `CLUSTER_WORKERS` environment variable overrides it (unless `env = false`); without either,
///   one worker per CPU.
/// - `flavor = "current_thread"` (the default) or `flavor = "multi_thread"`: the Tokio runtime
///   of each worker. The primary always runs on a current-thread runtime.
/// - `worker_threads = N` (with `flavor = "multi_thread"` only, or a `settings` function that
///   sets it): the threads of each worker's runtime.
/// - `settings = path`: a function `fn() -> cluster::Settings` (`settings = my_settings`,
///   `settings = crate::config::settings`), a path and not a string. The program starts from the
///   `Settings` it returns instead of `cluster::Settings::new()`, and the arguments above are
///   applied on top of them: `workers = 2` wins over the function's `.workers(8)`. Without
///   `flavor`, the function's flavor is kept, and `worker_threads` is checked against it when
///   the program starts. The function runs first thing in every process, the primary and each
///   worker: it must not start threads.
/// - `env = false`: leaves out the `CLUSTER_*` environment overrides (`CLUSTER_WORKERS`,
///   `CLUSTER_SCHED_POLICY`, ...: the table in `cluster::env`), so that the program runs with
///   its settings as written. By default (`env = true`) they apply, on top of everything else.
/// - `crate = "path"`: the path of the `cluster` crate, if it is not `::cluster` (for instance
///   when it is renamed, or re-exported by another crate).
///
/// Invalid settings (after the environment overrides) are reported on one line of stderr, and
/// the program exits with code 78 (`EX_CONFIG`) before it starts any worker.
///
/// ```no_run
/// #[cluster::main(workers = 2, flavor = "multi_thread", worker_threads = 4)]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     Ok(())
/// }
/// ```
///
/// ```no_run
/// use std::time::Duration;
///
/// fn settings() -> cluster::Settings {
///     cluster::Settings::new().disconnect_timeout(Duration::from_secs(5))
/// }
///
/// #[cluster::main(settings = settings, workers = 4, env = false)]
/// async fn main() {}
/// ```
///
/// `#[cluster::main]` builds the Tokio runtime of the primary and of every worker: it cannot be
/// combined with `#[tokio::main]` (or another runtime's attribute) on the same function, in
/// either order.
///
/// # Equivalent code not using `#[cluster::main]`
///
/// The workers form
///
/// ```no_run
/// #[cluster::main(workers = 4, flavor = "multi_thread")]
/// async fn main() -> std::io::Result<()> {
///     println!("Hello from a worker");
///     Ok(())
/// }
/// ```
///
/// is equivalent to
///
/// ```no_run
/// fn main() -> std::io::Result<()> {
///     let settings = cluster::Settings::new()
///         .workers(4)
///         .flavor(cluster::settings::Flavor::MultiThread);
///     cluster::run_workers(settings, || async move {
///         println!("Hello from a worker");
///         Ok(())
///     })
/// }
/// ```
///
/// and the role form
///
/// ```no_run
/// # fn my_settings() -> cluster::Settings { cluster::Settings::new() }
/// #[cluster::main(settings = my_settings)]
/// async fn main(role: cluster::Role) {
///     println!("{role:?}");
/// }
/// ```
///
/// to
///
/// ```no_run
/// # fn my_settings() -> cluster::Settings { cluster::Settings::new() }
/// fn main() {
///     cluster::run(my_settings(), |role: cluster::Role| async move {
///         println!("{role:?}");
///     })
/// }
/// ```
///
/// Both functions apply the `CLUSTER_*` overrides and validate the settings as the macro does;
/// `env = false` is `.env_overrides(false)` on the settings.
///
/// `cluster::run` and `cluster::run_workers` must be the first thing `main` does, before any
/// thread exists: they read and remove the markers a worker finds in its environment.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    entry::main(args.into(), item.into()).into()
}
