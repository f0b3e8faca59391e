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
/// reports their exits and, on SIGTERM or SIGINT, disconnects them gracefully; once every
/// worker has exited, it returns `Ok` if all exited with code 0 and an error naming the first
/// failure otherwise. The return type must then be `()` or `Result<(), E>` where
/// `E: From<std::io::Error>` (see `cluster::MainOutput`).
///
/// ```ignore
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
/// ```ignore
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
///   `CLUSTER_WORKERS` environment variable overrides it; without either, one worker per CPU.
/// - `flavor = "current_thread"` (the default) or `flavor = "multi_thread"`: the Tokio runtime
///   of each worker. The primary always runs on a current-thread runtime.
/// - `worker_threads = N` (with `flavor = "multi_thread"` only): the threads of each worker's
///   runtime.
/// - `crate = "path"`: the path of the `cluster` crate, if it is not `::cluster` (for instance
///   when it is renamed, or re-exported by another crate).
///
/// ```ignore
/// #[cluster::main(workers = 2, flavor = "multi_thread", worker_threads = 4)]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     Ok(())
/// }
/// ```
///
/// # Equivalent code not using `#[cluster::main]`
///
/// The workers form
///
/// ```ignore
/// #[cluster::main(workers = 4, flavor = "multi_thread")]
/// async fn main() -> std::io::Result<()> {
///     println!("Hello from a worker");
///     Ok(())
/// }
/// ```
///
/// is equivalent to
///
/// ```ignore
/// fn main() -> std::io::Result<()> {
///     cluster::run_workers(
///         cluster::RuntimeOptions::new().flavor(cluster::Flavor::MultiThread),
///         Some(4),
///         || async move {
///             println!("Hello from a worker");
///             Ok(())
///         },
///     )
/// }
/// ```
///
/// and the role form
///
/// ```ignore
/// #[cluster::main]
/// async fn main(role: cluster::Role) {
///     println!("{role:?}");
/// }
/// ```
///
/// to
///
/// ```ignore
/// fn main() {
///     cluster::run(cluster::RuntimeOptions::new(), |role: cluster::Role| async move {
///         println!("{role:?}");
///     })
/// }
/// ```
///
/// `cluster::run` must be the first thing `main` does, before any thread exists: it reads and
/// removes the markers a worker finds in its environment.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    entry::main(args.into(), item.into()).into()
}
