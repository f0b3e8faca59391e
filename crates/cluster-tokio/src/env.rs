//! The `CLUSTER_*` environment variables: an operator's overrides of [`Settings`], applied in
//! one step ([`Settings::apply_env`]) and validated strictly. A value that is not exactly what a
//! variable accepts stops the program at start ([`EnvError::exit`], exit code 78) instead of
//! being ignored.
//!
//! | variable | overrides | accepts |
//! |---|---|---|
//! | `CLUSTER_WORKERS` | [`Settings::workers`] | `0` to `1024` (`0`: run unclustered) |
//! | `CLUSTER_SCHED_POLICY` | [`Settings::policy`] | `rr`, `least-outstanding` or `none` |
//! | `CLUSTER_HANDOFF_WINDOW` | [`Settings::window`] | `1` to `4096` |
//! | `CLUSTER_MAX_CONNECTIONS_PER_WORKER` | [`Settings::max_connections_per_worker`] | `1` to `1048576`, or `off` |
//! | `CLUSTER_BATCH_SCHEDULING` | [`Settings::batch_scheduling`] | `1` or `0` |
//! | `CLUSTER_DISCONNECT_TIMEOUT` | [`Settings::disconnect_timeout`] | a duration: `20s`, `500ms` |
//! | `CLUSTER_SHUTDOWN_DELAY` | [`Settings::shutdown_delay`] | a duration, or `0` |
//! | `CLUSTER_WORKERS_FOLLOW_CPU_LIMIT` | [`Settings::workers_follow_cpu_limit`] | `1` or `0` |
//! | `CLUSTER_HAND_BACK` | [`Settings::hand_back`] | `1` or `0` |
//! | `CLUSTER_BOOT_TIMEOUT` | [`Settings::boot_timeout`] | a duration |
//! | `CLUSTER_HANDOFF_TIMEOUT` | [`Settings::handoff_timeout`] | a duration |
//! | `CLUSTER_HEARTBEAT_TIMEOUT` | [`Settings::heartbeat_timeout`] | a duration of at least `2s`, or `off` |
//! | `CLUSTER_METRICS_ADDR` | [`Settings::metrics_addr`] | an IP address and port: `127.0.0.1:9100`, `[::]:9100` |
//! | `CLUSTER_CONTROL_SOCKET` | [`Settings::control_socket`] | an absolute path: `/run/my-service/control.sock` |
//! | `CLUSTER_MAX_REQUESTS` | [`Settings::max_requests`] | `1000`, or `1000+100` (up to 100 more, drawn per worker), or `off` |
//! | `CLUSTER_MAX_MEMORY` | [`Settings::max_memory`] | a size of at least 1 MiB: `512MiB`, `2GiB`, `500MB`, or `off` |
//!
//! A duration is a whole number followed by its unit, `ms`, `s`, `m` or `h`, with nothing
//! around it (`20s`, `500ms`, `2m`), from 1 ms to 24 h. A size is a whole number followed by
//! its unit, `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or `kB`, `MB`, `GB`, `TB`
//! (powers of 1000), with nothing around it.
//!
//! [`PRINT_PROTOCOL_VERSION`] (`CLUSTER_PRINT_PROTOCOL_VERSION=1`) is not an override: it asks a
//! build for its protocol version and starts nothing. Nor is [`CHECK_CONFIG`]
//! (`CLUSTER_CHECK_CONFIG=1`): it prints the settings in force and every problem with them, and
//! starts nothing.
//!
//! Every bad value is reported, one line each, not only the first. A `CLUSTER_*` variable that
//! is none of these (a typo such as `CLUSTER_WORKER`) is reported too, with the nearest known
//! name: a warning at start, an error under [`CHECK_CONFIG`].

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::time::Duration;

use proto::SchedulingPolicy;

use crate::settings::{
    self, MAX_TIMEOUT, MAX_WINDOW, MAX_WORKERS, MIN_HEARTBEAT_TIMEOUT, Settings,
};

/// The number of workers.
pub const WORKERS: &str = "CLUSTER_WORKERS";
/// The scheduling policy: `rr`, `least-outstanding` or `none`.
pub const SCHED_POLICY: &str = "CLUSTER_SCHED_POLICY";
/// The handoff window.
pub const HANDOFF_WINDOW: &str = "CLUSTER_HANDOFF_WINDOW";
/// The most connections one worker may have open, or `off`.
pub const MAX_CONNECTIONS_PER_WORKER: &str = "CLUSTER_MAX_CONNECTIONS_PER_WORKER";
/// Batch scheduling of the primary's thread: `1` or `0`.
pub const BATCH_SCHEDULING: &str = "CLUSTER_BATCH_SCHEDULING";
/// How long a disconnected worker may drain.
pub const DISCONNECT_TIMEOUT: &str = "CLUSTER_DISCONNECT_TIMEOUT";
/// How long the cluster keeps serving after SIGTERM before it drains.
pub const SHUTDOWN_DELAY: &str = "CLUSTER_SHUTDOWN_DELAY";
/// Whether the worker count follows the CPU limit: `1` or `0`.
pub const WORKERS_FOLLOW_CPU_LIMIT: &str = "CLUSTER_WORKERS_FOLLOW_CPU_LIMIT";
/// Whether leaving workers hand idle connections back: `1` or `0`.
pub const HAND_BACK: &str = "CLUSTER_HAND_BACK";
/// How long a new worker may take to listen.
pub const BOOT_TIMEOUT: &str = "CLUSTER_BOOT_TIMEOUT";
/// How long a worker may take to ack a connection.
pub const HANDOFF_TIMEOUT: &str = "CLUSTER_HANDOFF_TIMEOUT";
/// How long a worker may stay silent, or `off`.
pub const HEARTBEAT_TIMEOUT: &str = "CLUSTER_HEARTBEAT_TIMEOUT";

/// Where the primary serves `/metrics`, `/healthz` and `/readyz`.
pub const METRICS_ADDR: &str = "CLUSTER_METRICS_ADDR";
/// Where the primary listens for `status`, `reload` and `scale` commands.
pub const CONTROL_SOCKET: &str = "CLUSTER_CONTROL_SOCKET";
/// Recycle a worker after this many connections: `1000`, `1000+100` (with jitter), or `off`.
pub const MAX_REQUESTS: &str = "CLUSTER_MAX_REQUESTS";
/// Recycle a worker past this resident memory: `512MiB`, or `off`.
pub const MAX_MEMORY: &str = "CLUSTER_MAX_MEMORY";

/// Not an override: set to `1`, the program prints the version of the protocol its workers
/// speak (`cluster protocol 4`) and exits 0 without starting anything, so deploy tooling can
/// check a new build against the running primary before a reload. A reload is refused unless
/// the versions are equal.
pub const PRINT_PROTOCOL_VERSION: &str = "CLUSTER_PRINT_PROTOCOL_VERSION";

/// Not an override: set to `1`, the program prints the settings it would run with (each with
/// where it came from: the code, a `CLUSTER_*` variable, or the default) and every problem with
/// them, then exits without starting anything: 0 if there is none, 78 otherwise. An unknown
/// `CLUSTER_*` variable is a problem here, not only a warning.
pub const CHECK_CONFIG: &str = "CLUSTER_CHECK_CONFIG";

/// The protocol version of this build (what [`PRINT_PROTOCOL_VERSION`] prints).
pub const PROTOCOL_VERSION: u16 = proto::PROTOCOL_VERSION;

/// Answers [`PRINT_PROTOCOL_VERSION`] if it is set (and exits), in a process that is not a
/// worker.
pub(crate) fn answer_queries() {
    if std::env::var_os(PRINT_PROTOCOL_VERSION).is_some_and(|v| v == "1")
        && !crate::role::is_worker()
    {
        println!("cluster protocol {PROTOCOL_VERSION}");
        std::process::exit(0);
    }
}

/// Every variable [`Settings::apply_env`] reads, in the order it reads them.
pub const VARIABLES: [&str; 16] = [
    WORKERS,
    SCHED_POLICY,
    HANDOFF_WINDOW,
    MAX_CONNECTIONS_PER_WORKER,
    BATCH_SCHEDULING,
    DISCONNECT_TIMEOUT,
    SHUTDOWN_DELAY,
    WORKERS_FOLLOW_CPU_LIMIT,
    HAND_BACK,
    BOOT_TIMEOUT,
    HANDOFF_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    METRICS_ADDR,
    CONTROL_SOCKET,
    MAX_REQUESTS,
    MAX_MEMORY,
];

/// A variable that was renamed, and what replaced it: setting it is an error that says so.
const RENAMED: [(&str, &str); 1] = [(
    "CLUSTER_HEARTBEAT_TIMEOUT_MS",
    "CLUSTER_HEARTBEAT_TIMEOUT, which takes a unit (`30s`, `500ms`) or `off`",
)];

/// A `CLUSTER_*` variable whose value is not one it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvError {
    variable: &'static str,
    value: OsString,
    accepted: String,
}

impl EnvError {
    /// The variable.
    pub fn variable(&self) -> &'static str {
        self.variable
    }

    /// Its value, as set.
    pub fn value(&self) -> &OsStr {
        &self.value
    }

    /// What the variable accepts.
    pub fn accepted(&self) -> &str {
        &self.accepted
    }

    /// Prints this error as one line on stderr, prefixed with the program's name, and exits with
    /// code 78 (`EX_CONFIG`, which the supervisor treats as "do not restart").
    pub fn exit(&self) -> ! {
        exit_misconfigured(self)
    }
}

/// An error and its sources, on one line.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is not valid: expected {}",
            self.variable, self.value, self.accepted
        )
    }
}

impl std::error::Error for EnvError {}

impl From<EnvError> for std::io::Error {
    fn from(error: EnvError) -> Self {
        Self::new(std::io::ErrorKind::InvalidInput, error)
    }
}

/// Prints `error` and its sources on one line, prefixed with the program's name, and exits with
/// code 78.
pub(crate) fn exit_misconfigured(error: &dyn std::error::Error) -> ! {
    eprintln!(
        "{}: configuration error: {}",
        program_name(),
        ErrorChain(error)
    );
    std::process::exit(proto::supervisor::FATAL_EXIT_CODE)
}

/// This program's file name, as messages to a person start with it.
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "cluster".to_owned())
}

impl Settings {
    /// Applies the `CLUSTER_*` overrides set in this process's environment (the table in
    /// [`crate::env`]); variables that are not set leave the settings as they are.
    ///
    /// # Errors
    ///
    /// The first variable whose value is not one it accepts (empty, malformed, out of range,
    /// not UTF-8), or a renamed variable.
    pub fn apply_env(self) -> Result<Self, EnvError> {
        self.apply_env_from(|name| std::env::var_os(name))
    }

    /// [`Self::apply_env`] with variables read from `lookup` instead of the environment.
    ///
    /// # Errors
    ///
    /// As [`Self::apply_env`].
    pub fn apply_env_from(
        self,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, EnvError> {
        let (settings, mut errors) = self.apply_env_all(lookup);
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors.swap_remove(0))
        }
    }

    /// [`Self::apply_env_from`] that goes on past a bad value: the settings with every good
    /// value applied, and every bad one, in the order of [`VARIABLES`] (renamed variables
    /// first). Each variable applied is recorded as the source of its setting.
    pub(crate) fn apply_env_all(
        mut self,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> (Self, Vec<EnvError>) {
        let mut errors = Vec::new();
        for (old, new) in RENAMED {
            if let Some(value) = lookup(old) {
                errors.push(EnvError {
                    variable: old,
                    value,
                    accepted: format!("no value: the variable was renamed to {new}"),
                });
            }
        }
        for variable in VARIABLES {
            match self.apply_one(variable, &lookup) {
                Ok(true) => self.from_env.push(variable),
                Ok(false) => {}
                Err(error) => errors.push(error),
            }
        }
        (self, errors)
    }

    /// Applies `variable` if it is set: `Ok(true)` if it was.
    fn apply_one(
        &mut self,
        variable: &'static str,
        lookup: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<bool, EnvError> {
        let Some(value) = lookup(variable) else {
            return Ok(false);
        };
        let fail = |accepted: &str| EnvError {
            variable,
            value: value.clone(),
            accepted: accepted.to_owned(),
        };
        let text = value.to_str();
        match variable {
            WORKERS => {
                let accepted = "a whole number from 0 to 1024 (0 runs unclustered)";
                self.workers =
                    Some(parse_number(text, 0, MAX_WORKERS).ok_or_else(|| fail(accepted))?);
            }
            SCHED_POLICY => {
                self.policy = match text {
                    Some("rr") => SchedulingPolicy::RoundRobin,
                    Some("least-outstanding") => SchedulingPolicy::LeastOutstanding,
                    Some("none") => SchedulingPolicy::Shared,
                    _ => {
                        return Err(fail(
                            "`rr` (round robin), `least-outstanding` or `none` (shared sockets)",
                        ));
                    }
                };
            }
            MAX_CONNECTIONS_PER_WORKER => {
                let accepted = "a whole number from 1 to 1048576, or `off` (no cap)";
                self.max_connections_per_worker = match text {
                    Some("off") => None,
                    _ => Some(
                        parse_number(text, 1, settings::MAX_CONNECTIONS_PER_WORKER)
                            .ok_or_else(|| fail(accepted))?,
                    ),
                };
            }
            HANDOFF_WINDOW => {
                let accepted = "a whole number from 1 to 4096";
                self.window = parse_number(text, 1, MAX_WINDOW).ok_or_else(|| fail(accepted))?;
            }
            BATCH_SCHEDULING => {
                self.batch_scheduling = match text {
                    Some("1") => true,
                    Some("0") => false,
                    _ => return Err(fail("`1` or `0`")),
                };
            }
            WORKERS_FOLLOW_CPU_LIMIT => {
                self.workers_follow_cpu_limit = match text {
                    Some("1") => true,
                    Some("0") => false,
                    _ => return Err(fail("`1` or `0`")),
                };
            }
            HAND_BACK => {
                self.hand_back = match text {
                    Some("1") => true,
                    Some("0") => false,
                    _ => return Err(fail("`1` or `0`")),
                };
            }
            HEARTBEAT_TIMEOUT => {
                let accepted = "a duration from 2s to 24h (such as `30s`), or `off`";
                self.heartbeat_timeout = match text {
                    Some("off") => None,
                    _ => Some(
                        parse_duration(text, MIN_HEARTBEAT_TIMEOUT)
                            .ok_or_else(|| fail(accepted))?,
                    ),
                };
            }
            METRICS_ADDR => {
                let accepted = "an IP address and a port, such as `127.0.0.1:9100` or `[::]:9100`";
                self.metrics_addr = Some(
                    text.and_then(|t| t.parse().ok())
                        .ok_or_else(|| fail(accepted))?,
                );
            }
            SHUTDOWN_DELAY => {
                let accepted = "a duration up to 24h: `0`, or a whole number and its unit, \
                                `ms`, `s`, `m` or `h` (such as `5s`)";
                self.shutdown_delay = Some(if text == Some("0") {
                    Duration::ZERO
                } else {
                    parse_duration(text, Duration::ZERO).ok_or_else(|| fail(accepted))?
                });
            }
            CONTROL_SOCKET => {
                let accepted = "an absolute path to a file, such as `/run/my-service/control.sock`";
                let path = std::path::PathBuf::from(&value);
                if !settings::is_socket_path(&path) {
                    return Err(fail(accepted));
                }
                self.control_socket = Some(path);
            }
            MAX_REQUESTS => {
                let accepted = "a whole number of connections of at least 1, with the jitter \
                                after a `+` if any (`1000` or `1000+100`), or `off`";
                self.max_requests = match text {
                    Some("off") => None,
                    _ => Some(parse_max_requests(text).ok_or_else(|| fail(accepted))?),
                };
            }
            MAX_MEMORY => {
                let accepted = "a size of at least 1 MiB: a whole number and its unit, `B`, \
                                `KiB`, `MiB`, `GiB`, `TiB`, `kB`, `MB`, `GB` or `TB` (such as \
                                `512MiB`), or `off`";
                self.max_memory = match text {
                    Some("off") => None,
                    _ => Some(
                        parse_size(text)
                            .filter(|b| *b >= settings::MIN_MAX_MEMORY)
                            .ok_or_else(|| fail(accepted))?,
                    ),
                };
            }
            _ => {
                let accepted = "a duration from 1ms to 24h: a whole number and its unit, \
                                `ms`, `s`, `m` or `h` (such as `20s` or `500ms`)";
                let duration =
                    parse_duration(text, Duration::from_millis(1)).ok_or_else(|| fail(accepted))?;
                match variable {
                    DISCONNECT_TIMEOUT => self.disconnect_timeout = duration,
                    BOOT_TIMEOUT => self.boot_timeout = duration,
                    HANDOFF_TIMEOUT => self.handoff_timeout = duration,
                    _ => unreachable!("every variable has a parser"),
                }
            }
        }
        Ok(true)
    }
}

/// A `CLUSTER_*` variable that nothing reads, and the known one nearest to its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unknown {
    pub(crate) name: String,
    pub(crate) nearest: &'static str,
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not a variable cluster reads (did you mean {}?)",
            self.name, self.nearest
        )
    }
}

/// The `CLUSTER_*` names among `names` that are none of the variables cluster reads or sets.
pub(crate) fn unknown_variables(names: impl IntoIterator<Item = OsString>) -> Vec<Unknown> {
    let known: Vec<&'static str> = VARIABLES
        .into_iter()
        .chain([CHECK_CONFIG, PRINT_PROTOCOL_VERSION])
        .collect();
    let mut unknown: Vec<Unknown> = names
        .into_iter()
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.starts_with("CLUSTER_"))
        .filter(|name| {
            !known.contains(&name.as_str())
                && !RENAMED.iter().any(|(old, _)| old == name)
                && name != crate::role::ENV_WORKER_ID
                && name != crate::role::ENV_IPC_FD
        })
        .map(|name| {
            let nearest = known
                .iter()
                .copied()
                .min_by_key(|candidate| edit_distance(&name, candidate))
                .unwrap_or(WORKERS);
            Unknown { name, nearest }
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

/// The Levenshtein distance between two names (ASCII, short: the plain dynamic programme).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.as_bytes().iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Plain ASCII digits only (no sign, space, `0x` or `_`), within `min..=max`.
fn parse_number(text: Option<&str>, min: usize, max: usize) -> Option<usize> {
    let text = text?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|n| (min..=max).contains(n))
}

/// `<digits>` or `<digits>+<digits>`: at least one connection, and a sum that fits.
fn parse_max_requests(text: Option<&str>) -> Option<(u64, u64)> {
    let text = text?;
    let (requests, jitter) = text.split_once('+').unwrap_or((text, "0"));
    let number = |digits: &str| {
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    let (requests, jitter) = (number(requests)?, number(jitter)?);
    (requests >= 1 && requests.checked_add(jitter).is_some()).then_some((requests, jitter))
}

/// `<digits><unit>`, the unit one of `B`, `KiB`, `MiB`, `GiB`, `TiB`, `kB`, `MB`, `GB`, `TB`.
fn parse_size(text: Option<&str>) -> Option<u64> {
    let text = text?;
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = if digits == 0 {
        None
    } else {
        number.parse().ok()
    }?;
    let scale: u64 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// `<digits><unit>` with the unit one of `ms`, `s`, `m`, `h`, within `min..=MAX_TIMEOUT`.
fn parse_duration(text: Option<&str>, min: Duration) -> Option<Duration> {
    let text = text?;
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = if digits == 0 {
        None
    } else {
        number.parse().ok()
    }?;
    let millis = match unit {
        "ms" => Some(number),
        "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    }?;
    Some(Duration::from_millis(millis)).filter(|d| (min..=MAX_TIMEOUT).contains(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(name: &str, value: &str) -> Result<Settings, EnvError> {
        Settings::new().apply_env_from(|n| (n == name).then(|| value.into()))
    }

    #[test]
    fn the_shutdown_delay_takes_zero_or_a_duration() {
        let delay = |value| apply(SHUTDOWN_DELAY, value).map(|s| s.shutdown_delay);
        assert_eq!(delay("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(delay("0s"), Ok(Some(Duration::ZERO)));
        assert_eq!(delay("5s"), Ok(Some(Duration::from_secs(5))));
        assert_eq!(delay("24h"), Ok(Some(Duration::from_secs(86_400))));
        for bad in ["", "5", "-1s", "5 s", "25h", "1d"] {
            let error = delay(bad).unwrap_err();
            assert!(error.to_string().contains(SHUTDOWN_DELAY), "{error}");
        }
        // Unset: the default, which depends on where the program runs.
        assert_eq!(Settings::new().shutdown_delay, None);
    }

    #[test]
    fn good_values_override_the_code() {
        assert_eq!(apply(WORKERS, "3").unwrap().workers, Some(3));
        assert_eq!(apply(WORKERS, "0").unwrap().workers, Some(0));
        assert_eq!(
            apply(DISCONNECT_TIMEOUT, "20s").unwrap().disconnect_timeout,
            Duration::from_secs(20)
        );
        assert_eq!(
            apply(BOOT_TIMEOUT, "500ms").unwrap().boot_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            apply(HANDOFF_TIMEOUT, "2m").unwrap().handoff_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(
            apply(HEARTBEAT_TIMEOUT, "off").unwrap().heartbeat_timeout,
            None
        );
        assert_eq!(
            apply(SCHED_POLICY, "none").unwrap().policy,
            SchedulingPolicy::Shared
        );
        assert_eq!(
            apply(SCHED_POLICY, "least-outstanding").unwrap().policy,
            SchedulingPolicy::LeastOutstanding
        );
        assert_eq!(
            apply(MAX_CONNECTIONS_PER_WORKER, "64")
                .unwrap()
                .max_connections_per_worker,
            Some(64)
        );
        assert_eq!(
            apply(MAX_CONNECTIONS_PER_WORKER, "off")
                .unwrap()
                .max_connections_per_worker,
            None
        );
        assert!(!apply(BATCH_SCHEDULING, "0").unwrap().batch_scheduling);
        assert_eq!(apply(HANDOFF_WINDOW, "1").unwrap().window, 1);
        assert_eq!(
            apply(METRICS_ADDR, "[::1]:9100").unwrap().metrics_addr,
            Some("[::1]:9100".parse().unwrap())
        );
        assert_eq!(
            apply(CONTROL_SOCKET, "/run/app/ctl.sock")
                .unwrap()
                .control_socket,
            Some("/run/app/ctl.sock".into())
        );
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        let bad_numbers = [
            "", "abc", "-1", " 3", "3 ", "0x10", "5s", "+3", "1_000", "1025",
        ];
        for value in bad_numbers {
            let error = apply(WORKERS, value).unwrap_err();
            assert_eq!(error.variable(), WORKERS, "{value:?}");
            assert!(error.to_string().starts_with("CLUSTER_WORKERS="), "{error}");
        }
        assert!(apply(WORKERS, "99999999999999999999999").is_err());
        for value in ["0", "4097", "x"] {
            assert!(apply(HANDOFF_WINDOW, value).is_err(), "{value:?}");
        }
        let bad_durations = [
            "",
            "20",
            "s",
            "20 s",
            " 20s",
            "-1s",
            "1.5s",
            "0s",
            "0ms",
            "25h",
            "1d",
            "20S",
            "99999999999999999999h",
            "18446744073709551615h",
        ];
        for variable in [DISCONNECT_TIMEOUT, BOOT_TIMEOUT, HANDOFF_TIMEOUT] {
            for value in bad_durations {
                let error = apply(variable, value).unwrap_err();
                assert_eq!(error.variable(), variable, "{value:?}");
            }
        }
        for value in ["1s", "1999ms", "on", ""] {
            assert!(apply(HEARTBEAT_TIMEOUT, value).is_err(), "{value:?}");
        }
        for value in ["RR", "round-robin", "least", ""] {
            assert!(apply(SCHED_POLICY, value).is_err(), "{value:?}");
        }
        // A cap of 0 would serve nothing: refused, naming the variable.
        for value in ["0", "", "-1", "1048577", "none"] {
            let error = apply(MAX_CONNECTIONS_PER_WORKER, value).unwrap_err();
            assert_eq!(error.variable(), MAX_CONNECTIONS_PER_WORKER, "{value:?}");
        }
        for value in ["true", "yes", ""] {
            assert!(apply(BATCH_SCHEDULING, value).is_err(), "{value:?}");
        }
        for value in [
            "",
            "9100",
            ":9100",
            "localhost:9100",
            "127.0.0.1",
            " 127.0.0.1:9100",
            "1.2.3.4:99999",
        ] {
            let error = apply(METRICS_ADDR, value).unwrap_err();
            assert_eq!(error.variable(), METRICS_ADDR, "{value:?}");
        }
        for value in ["", "ctl.sock", "run/ctl.sock", "/"] {
            let error = apply(CONTROL_SOCKET, value).unwrap_err();
            assert_eq!(error.variable(), CONTROL_SOCKET, "{value:?}");
        }
        let renamed = apply("CLUSTER_HEARTBEAT_TIMEOUT_MS", "3000").unwrap_err();
        assert!(
            renamed.to_string().contains("CLUSTER_HEARTBEAT_TIMEOUT"),
            "{renamed}"
        );
    }

    #[test]
    fn every_bad_value_is_reported_and_the_good_ones_applied() {
        let env = [
            (WORKERS, "abc"),
            (BOOT_TIMEOUT, "5s"),
            (HANDOFF_WINDOW, "0"),
        ];
        let (settings, errors) = Settings::new().apply_env_all(|name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).into())
        });
        let named: Vec<&str> = errors.iter().map(EnvError::variable).collect();
        assert_eq!(named, [WORKERS, HANDOFF_WINDOW]);
        assert_eq!(settings.boot_timeout, Duration::from_secs(5));
        assert_eq!(settings.from_env, [BOOT_TIMEOUT]);
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_nearest_known_one() {
        let names = [
            "CLUSTER_WORKER",
            "CLUSTER_WORKERS",
            "PATH",
            "CLUSTER_DISCONECT_TIMEOUT",
        ];
        let unknown = unknown_variables(names.map(OsString::from));
        assert_eq!(
            unknown,
            [
                Unknown {
                    name: "CLUSTER_DISCONECT_TIMEOUT".into(),
                    nearest: DISCONNECT_TIMEOUT
                },
                Unknown {
                    name: "CLUSTER_WORKER".into(),
                    nearest: WORKERS
                },
            ]
        );
        assert!(unknown_variables([OsString::from(CHECK_CONFIG)]).is_empty());
    }

    #[test]
    fn recycling_limits_take_a_count_with_jitter_and_a_size_with_its_unit() {
        let requests = |value| apply(MAX_REQUESTS, value).map(|s| s.max_requests);
        assert_eq!(requests("1000"), Ok(Some((1000, 0))));
        assert_eq!(requests("1000+100"), Ok(Some((1000, 100))));
        assert_eq!(requests("1+0"), Ok(Some((1, 0))));
        assert_eq!(requests("off"), Ok(None));
        for bad in [
            "",
            "-1",
            "0",
            "0+5",
            "1000+",
            "+100",
            "1000+-1",
            "1000 + 100",
            "1e3",
            "1_000",
            "100+10+1",
            "18446744073709551615+1",
            "99999999999999999999",
        ] {
            let error = requests(bad).unwrap_err();
            assert_eq!(error.variable(), MAX_REQUESTS, "{bad:?}");
            assert!(
                error.to_string().starts_with("CLUSTER_MAX_REQUESTS="),
                "{error}"
            );
        }
        let memory = |value| apply(MAX_MEMORY, value).map(|s| s.max_memory);
        assert_eq!(memory("512MiB"), Ok(Some(512 << 20)));
        assert_eq!(memory("2GiB"), Ok(Some(2 << 30)));
        assert_eq!(memory("1024KiB"), Ok(Some(1 << 20)));
        assert_eq!(memory("500MB"), Ok(Some(500_000_000)));
        assert_eq!(memory("1048576B"), Ok(Some(1 << 20)));
        assert_eq!(memory("off"), Ok(None));
        for bad in [
            "",
            "12XB",
            "512",
            "512M",
            "512mib",
            "512 MiB",
            "-1MiB",
            "1.5GiB",
            "1023KiB",
            "0B",
            "99999999999TiB",
            "MiB",
        ] {
            let error = memory(bad).unwrap_err();
            assert_eq!(error.variable(), MAX_MEMORY, "{bad:?}");
            assert!(
                error.to_string().starts_with("CLUSTER_MAX_MEMORY="),
                "{error}"
            );
        }
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStringExt;
        let error = Settings::new()
            .apply_env_from(|n| (n == WORKERS).then(|| OsString::from_vec(vec![0xff])))
            .unwrap_err();
        assert_eq!(error.variable(), WORKERS);
    }
}
