//! The messages of the primary's control socket, typed once for the primary (which answers) and
//! `cluster-ctl` (which asks). Encoding is the caller's: the socket speaks one line of JSON per
//! message, so that operators can talk to it with `socat`.
//!
//! ```text
//! {"version":1,"command":"status"}               {"version":1,"ok":true,"status":{..}}
//! {"version":1,"command":"reload"}               {"version":1,"ok":true,"reload":{..}}
//! {"version":1,"command":"scale","workers":4}    {"version":1,"ok":true,"scale":4}
//! anything else                                  {"version":1,"ok":false,"kind":"..","error":".."}
//! ```
//!
//! The bare words `status`, `reload` and `scale <n>` are the same requests at the current
//! version, for a human at a terminal. An answer's `version` is the primary's; a request of
//! another version is answered with an [`ErrorKind::UnknownVersion`] error and nothing else
//! happens. An error answer (`"ok":false`) keeps its shape in every version, so that any client
//! can show why it was refused. Within one version, fields are only ever added: both sides ignore fields they do not
//! know and take missing ones as empty (`#[serde(default)]`).

use serde::{Deserialize, Serialize};

/// The version of the control protocol this crate speaks.
pub const VERSION: u32 = 1;

/// A request: what to do, at a protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version the client speaks: [`VERSION`].
    pub version: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// `command` at the current [`VERSION`].
    pub fn new(command: Command) -> Self {
        Self {
            version: VERSION,
            command,
        }
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// The cluster's status: [`Answer::Status`].
    Status,
    /// A rolling reload, answered when it ends: [`Answer::Reload`].
    Reload,
    /// Keep this many workers: [`Answer::Scale`] once the change is under way.
    Scale {
        /// The number of workers wanted.
        workers: usize,
    },
}

/// What the primary answers to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "AnswerLine", try_from = "AnswerLine")]
pub enum Answer {
    /// The status asked for.
    Status(Status),
    /// How the reload asked for went.
    Reload(Reload),
    /// The number of workers the primary now keeps.
    Scale(usize),
    /// The request was not done.
    Error(Error),
}

/// Why a request was not done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    /// What kind of failure, for programs.
    pub kind: ErrorKind,
    /// What happened, for people.
    #[serde(rename = "error")]
    pub message: String,
}

impl Error {
    /// An error of `kind`, saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The kinds of [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is of a protocol version the primary does not speak.
    UnknownVersion,
    /// The request is not one: not JSON of a request's shape, not a known word, too long, not
    /// UTF-8, not ended by a newline.
    Malformed,
    /// The client's user is neither the primary's nor root.
    Refused,
    /// The request was understood, but the primary could not do it (the reason says why).
    Failed,
    /// A kind this side does not know (sent by a newer peer).
    #[serde(other)]
    Other,
}

/// The cluster's status, as [`Command::Status`] answers it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The primary's process id.
    pub pid: u32,
    /// Since the primary started.
    pub uptime_seconds: f64,
    /// The generation of the workers started last: 1, plus one per reload.
    pub generation: u64,
    /// `serving`, `shutdown delay` (SIGTERM came: it serves on while load balancers stop
    /// sending) or `draining`; empty from a primary that does not say.
    pub phase: String,
    /// The number of workers the primary keeps.
    pub wanted: usize,
    /// The workers that serve (listening).
    pub serving: usize,
    /// Whether the cluster is ready for traffic, as `/readyz` answers it: it serves (not in its
    /// shutdown delay, not draining) and at least one worker serves.
    pub ready: bool,
    /// Workers restarted after they died.
    pub restarts: u64,
    /// Workers the kernel's OOM killer killed.
    pub oom_kills: u64,
    /// Reloads, by how they ended.
    pub reloads: ReloadCounts,
    /// Workers recycled, by why.
    pub recycles: RecycleCounts,
    /// Connections the primary holds (accepted, not yet handed to a worker for good).
    pub connections_held: usize,
    /// Listening sockets the primary holds.
    pub listeners: usize,
    /// Connections handed to workers since the primary started.
    pub handoffs: u64,
    /// Idle keep-alive connections leaving workers handed back since the primary started.
    pub handed_back: u64,
    /// Accept errors on the primary's listeners.
    pub accept_errors: u64,
    /// How long accepted connections waited in the primary before they were handed to a
    /// worker: a histogram, bucket by bucket (not cumulative), the unbounded one last.
    pub handoff_latency: Vec<LatencyBucket>,
    /// Every worker.
    pub workers: Vec<WorkerStatus>,
    /// The settings in force, each with where it came from.
    pub settings: Vec<Setting>,
    /// The binary of each generation that has a worker running, and of the generation new
    /// workers start in.
    pub binaries: Vec<GenerationBinary>,
}

/// One setting in force, in a [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Setting {
    /// The setting, as its builder method is named (`workers`, `disconnect_timeout`).
    pub name: String,
    /// Its value as a person reads it (`30s`, `rr`, `none`).
    pub value: String,
    /// Where it came from: a `CLUSTER_*` variable's name, `code`, `default`, or how a default
    /// was found (`one per CPU: the cgroup's CPU quota`).
    pub source: String,
}

/// The binary a generation of workers runs, in a [`Status`]: as it was when the generation
/// started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationBinary {
    /// The generation.
    pub generation: u64,
    /// Where the binary was found.
    pub path: String,
    /// Its inode: a deploy by rename always brings a new one.
    pub inode: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time, in seconds since the Unix epoch.
    pub modified_unix_seconds: u64,
}

/// One bucket of [`Status::handoff_latency`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencyBucket {
    /// Its upper bound, in seconds; `None` for the last bucket, which has none.
    pub le_seconds: Option<f64>,
    /// The handoffs that waited longer than the previous bucket's bound and at most this one's.
    pub count: u64,
}

/// Reloads, by how they ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadCounts {
    /// Every worker replaced.
    pub complete: u64,
    /// Stopped early; the old workers left kept serving.
    pub aborted: u64,
    /// Could not start.
    pub failed: u64,
}

/// Workers recycled (replaced while serving), by why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecycleCounts {
    /// Handed their limit of connections.
    pub requests: u64,
    /// Over the memory limit.
    pub memory: u64,
}

/// One worker in a [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerStatus {
    /// The worker's id (from 1, never reused).
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// The slot it fills, if it fills one.
    pub slot: Option<usize>,
    /// The generation it belongs to.
    pub generation: u64,
    /// Its state: `online`, `listening`, `disconnecting`...
    pub state: String,
    /// Whether it declared itself ready (`cluster::ready()`); what a worker must do to count
    /// as serving when the primary waits for readiness (the `wait_ready` setting).
    pub ready: bool,
    /// Since it was started.
    pub uptime_seconds: f64,
    /// Restarts of its slot.
    pub restarts: u64,
    /// Its resident memory, when it could be read.
    pub resident_bytes: Option<u64>,
    /// Its CPU time, when it could be read.
    pub cpu_seconds: Option<f64>,
    /// Connections handed to it.
    pub handoffs: u64,
    /// The connections it holds, when they could be counted.
    pub connections: Option<usize>,
    /// Connections handed to it and not yet acknowledged.
    pub in_flight: usize,
    /// Its open connections as the primary's scheduler counts them (handed to it, and not
    /// refused, given back or reported ended): what least-outstanding and the per-worker cap
    /// go by.
    pub outstanding: usize,
    /// Connections it refused (its queue was full).
    pub refused: u64,
    /// Connections it gave back.
    pub returned: u64,
    /// The worker its slot held before it, if that one died.
    pub previous: Option<PreviousWorker>,
}

/// The worker a slot held before, in a [`WorkerStatus`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreviousWorker {
    /// Its id.
    pub id: u64,
    /// How it exited.
    pub status: String,
    /// Why the primary killed it, if it did.
    pub killed: Option<String>,
    /// Whether the kernel's OOM killer killed it.
    pub oom_killed: bool,
}

/// How a reload went, as [`Command::Reload`] answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reload {
    /// The generation of the replacements.
    pub generation: u64,
    /// How many workers were replaced.
    pub replaced: usize,
    /// Idle keep-alive connections the replaced workers handed back to the others.
    pub handed_back: u64,
    /// Whether every worker was replaced.
    pub complete: bool,
    /// Whether the replacements run another binary than the workers they replaced.
    pub binary_changed: bool,
    /// Why the reload stopped early, if it did: the old workers left keep serving.
    pub aborted: Option<String>,
}

/// An [`Answer`] as it is on the wire: `ok`, then the one field that carries it.
#[derive(Serialize, Deserialize)]
struct AnswerLine {
    version: u32,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reload: Option<Reload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scale: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Answer> for AnswerLine {
    fn from(answer: Answer) -> Self {
        let mut line = Self {
            version: VERSION,
            ok: true,
            status: None,
            reload: None,
            scale: None,
            kind: None,
            error: None,
        };
        match answer {
            Answer::Status(status) => line.status = Some(status),
            Answer::Reload(reload) => line.reload = Some(reload),
            Answer::Scale(workers) => line.scale = Some(workers),
            Answer::Error(error) => {
                line.ok = false;
                line.kind = Some(error.kind);
                line.error = Some(error.message);
            }
        }
        line
    }
}

impl TryFrom<AnswerLine> for Answer {
    type Error = String;

    fn try_from(line: AnswerLine) -> Result<Self, String> {
        // An error answer has this shape in every version, so that a client of any version
        // can say why its request was refused (an `UnknownVersion` above all).
        if !line.ok {
            return Ok(Self::Error(Error {
                kind: line.kind.unwrap_or(ErrorKind::Other),
                message: line.error.unwrap_or_else(|| "no reason given".to_owned()),
            }));
        }
        if line.version != VERSION {
            return Err(format!(
                "an answer of control protocol version {}; this side speaks version {VERSION}",
                line.version
            ));
        }
        match (line.status, line.reload, line.scale) {
            (Some(status), None, None) => Ok(Self::Status(status)),
            (None, Some(reload), None) => Ok(Self::Reload(reload)),
            (None, None, Some(workers)) => Ok(Self::Scale(workers)),
            _ => Err("an answer carries exactly one of `status`, `reload`, `scale`".to_owned()),
        }
    }
}

/// What a request must hold whatever its version: read first, so that a request of another
/// version is told so (`UnknownVersion`) rather than that its shape is wrong.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Versioned {
    /// The request's version; missing: not a request.
    #[serde(default)]
    pub version: Option<u64>,
}

impl Versioned {
    /// `Ok` if the rest of the request may be read as a [`Request`] of this [`VERSION`].
    ///
    /// # Errors
    ///
    /// `Malformed` without a version, `UnknownVersion` for another version.
    pub fn check(self) -> Result<(), Error> {
        match self.version {
            None => Err(Error::new(
                ErrorKind::Malformed,
                format!("a request has a `version` (this primary speaks version {VERSION})"),
            )),
            Some(version) if version != u64::from(VERSION) => Err(Error::new(
                ErrorKind::UnknownVersion,
                format!(
                    "control protocol version {version} is unknown: this primary speaks version {VERSION}"
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

impl Command {
    /// Reads the words form of a command: `status`, `reload` or `scale <n>`.
    ///
    /// # Errors
    ///
    /// `Malformed`, saying what was expected.
    pub fn from_words(line: &str) -> Result<Self, Error> {
        let mut words = line.split_ascii_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("status"), None, None) => Ok(Self::Status),
            (Some("reload"), None, None) => Ok(Self::Reload),
            (Some("scale"), Some(count), None) => count
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| count.parse().ok())
                .flatten()
                .map(|workers| Self::Scale { workers })
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Malformed,
                        format!("`scale` takes a whole number of workers, not `{count}`"),
                    )
                }),
            _ => {
                let shown: String = line.chars().take(40).collect();
                Err(Error::new(
                    ErrorKind::Malformed,
                    format!(
                        "unknown command `{shown}`: expected `status`, `reload`, `scale <workers>` or a JSON request"
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_commands_of_the_current_version() {
        assert_eq!(Command::from_words("status"), Ok(Command::Status));
        assert_eq!(
            Command::from_words(" scale  4 "),
            Ok(Command::Scale { workers: 4 })
        );
        for bad in [
            "",
            "status now",
            "scale -1",
            "scale 99999999999999999999999",
            "frob",
        ] {
            let error = Command::from_words(bad).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn versions_other_than_this_one_are_told_apart_from_malformed_requests() {
        let check = |version| Versioned { version }.check().map_err(|e| e.kind);
        assert_eq!(check(Some(u64::from(VERSION))), Ok(()));
        assert_eq!(check(Some(2)), Err(ErrorKind::UnknownVersion));
        assert_eq!(check(None), Err(ErrorKind::Malformed));
    }
}
