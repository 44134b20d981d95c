//! The front end's requests to `contractor-host` on its own machine: `resolve` (which build
//! hosts), `hosts` (their room and the line) and `send` (one whole session with a build
//! host: the choice, the line, ssh, the record received by `contractor-store record
//! follow`). Each reads one request line on stdin and answers in JSON Lines on stdout;
//! docs/protocol.md has an example of every line.
//!
//! Requests reject unknown fields; a host name is checked by `contractor-host` (the form is
//! `[ssh://][user@]host[:port]`), which names the field it refuses.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::result::{BuildCode, BuildResult, ErrorInfo, Outcome};
use crate::vm::Accel;

/// The subcommand that names the build hosts.
pub const RESOLVE_COMMAND: &str = "resolve";
/// The subcommand that reports the build hosts' room and the line.
pub const HOSTS_COMMAND: &str = "hosts";
/// The subcommand that runs one session with a build host.
pub const SEND_COMMAND: &str = "send";
/// The subcommand that runs `contractor-vm check` or `image list` on a build host.
pub const VM_COMMAND: &str = "vm";

/// `contractor-host resolve`: the build hosts named (none: those of the user's
/// configuration file).
///
/// `{"version":1,"hosts":["ci@big-box"]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Protocol version.
    pub version: u32,
    /// The `--host` values given, in order (at most [`MAX_HOSTS`]).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The answer to `resolve`: the build hosts, each written as `[user@]host[:port]`, and
/// the configuration file they came from (when none were given).
///
/// `{"type":"resolved","version":1,"hosts":["ci@big-box"],"config":null}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "resolved")]
pub struct Resolved {
    /// Protocol version.
    pub version: u32,
    /// The build hosts; empty when none were given and none are configured.
    pub hosts: Vec<String>,
    /// The configuration file looked at, when no host was given.
    pub config: Option<PathBuf>,
}

/// The most build hosts a request, a command line or the configuration may name.
pub const MAX_HOSTS: usize = 64;

/// `contractor-host hosts`, and the first line of `send`: the build hosts (as `resolve`
/// writes them) and the shape of the build (its CPUs and memory), for which each is asked
/// its room.
///
/// `{"version":1,"hosts":["ci@big-box","ci@other"],"cpus":2,"memory_mib":2048}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRequest {
    /// Protocol version.
    pub version: u32,
    /// The build hosts (1 to [`MAX_HOSTS`]).
    pub hosts: Vec<String>,
    /// The build's CPUs (at least 1).
    pub cpus: u32,
    /// The build's memory in MiB (at least 1).
    pub memory_mib: u64,
}

/// What one build host said of its room for a build of the asked shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Room {
    /// How many more builds of that shape fit there now.
    pub builds: u64,
    /// Its free memory, in MiB.
    pub free_memory_mib: u64,
    /// Its CPUs.
    pub cpus: u32,
    /// Contractor VMs running there.
    pub running: u32,
}

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "room for {} more build(s) ({} MiB free, {} CPUs, {} Contractor VM(s) running)",
            self.builds, self.free_memory_mib, self.cpus, self.running
        )
    }
}

/// One build host's answer: its room, or why it cannot take a build (exactly one is set).
///
/// `{"host":"ci@big-box","room":{"builds":1,"free_memory_mib":6000,"cpus":8,"running":1},"unavailable":null}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostProbe {
    /// The build host.
    pub host: String,
    /// Its room, when it answered.
    pub room: Option<Room>,
    /// Why it did not (cannot be reached, another release, no answer in time).
    pub unavailable: Option<String>,
}

impl std::fmt::Display for HostProbe {
    /// `host: room for …` or `host: why`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.room, &self.unavailable) {
            (Some(room), _) => write!(f, "{}: {room}", self.host),
            (None, Some(why)) => write!(f, "{}: {why}", self.host),
            (None, None) => write!(f, "{}: no answer", self.host),
        }
    }
}

/// The answer to `hosts`: each host's probe, in the order asked, and how many builds wait
/// in this machine's line.
///
/// `{"type":"fleet","version":1,"hosts":[…],"waiting":0}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "fleet")]
pub struct Fleet {
    /// Protocol version.
    pub version: u32,
    /// One probe per host.
    pub hosts: Vec<HostProbe>,
    /// Live tickets in the line here.
    pub waiting: u64,
}

/// The second line of `send`, written after its `chosen` line: the build to send. `send`
/// composes the [`crate::hosted::HostedRequest`] from it (reading the spec and lock files,
/// hashing the source).
///
/// `{"id":"20261203-070102-1f2e3d","record":"/p/.contractor/builds/20261203-070102-1f2e3d","source":"/p/.contractor/builds/20261203-070102-1f2e3d/source.tar","source_entries":4,"spec_file":"/p/contractor.toml","lock_file":null,"project":"5f0c…","accel":"auto","snapshot":true,"offline":false,"max_record_bytes":1075838976}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The build's id (the front end's record's name).
    pub id: String,
    /// The local record directory, named by `id`: the only place the build host's record
    /// is received into.
    pub record: PathBuf,
    /// The packed source tar (a regular file) sent after the request.
    pub source: PathBuf,
    /// How many entries the tar holds.
    pub source_entries: u64,
    /// The project's `contractor.toml`, sent as the request's `spec`.
    pub spec_file: PathBuf,
    /// Its `contractor.lock`, when the build uses one.
    pub lock_file: Option<PathBuf>,
    /// The project's key (32 hex digits) naming its directory on the build host.
    pub project: String,
    /// The accelerator asked for.
    pub accel: Accel,
    /// Whether a snapshot may be restored there.
    pub snapshot: bool,
    /// Whether the build runs offline.
    pub offline: bool,
    /// The most bytes of record received.
    pub max_record_bytes: u64,
}

/// The lines `contractor-host send` writes besides the build's events (passed on as
/// `contractor-store record follow` checked and re-encoded them, without `started` and
/// `finished`, which the front end writes for its own record). The last line is one of
/// `session_result`, `session_interrupted` or `session_failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SendLine {
    /// Builds ahead of this one in the line here: it waits.
    /// `{"type":"waiting","position":2}`
    Waiting {
        /// Its place in the line, from 1.
        position: u64,
    },
    /// Every host that answered is full: it waits, first in line.
    /// `{"type":"hosts_full","position":1,"hosts":[…]}`
    HostsFull {
        /// Its place in the line.
        position: u64,
        /// What each host said.
        hosts: Vec<HostProbe>,
    },
    /// The host that takes the build; `send` then reads the [`SessionRequest`].
    /// `{"type":"chosen","host":"ci@big-box","hosts":[…]}`
    Chosen {
        /// The chosen host.
        host: String,
        /// What each host said.
        hosts: Vec<HostProbe>,
    },
    /// The session ended with the build host's result (its record received).
    /// `{"type":"session_result","result":{…}}`
    SessionResult {
        /// The result the build host wrote (its `id`, `duration_secs` and paths are the
        /// build host's).
        result: Box<BuildResult>,
    },
    /// A signal ended the session before the record came back.
    /// `{"type":"session_interrupted","signal":"Ctrl-C"}`
    SessionInterrupted {
        /// `Ctrl-C` (SIGINT) or `SIGTERM`.
        signal: String,
    },
    /// No host could take the build, or the session failed (the build host refused, went
    /// away, or its record could not be kept); code `build_host`.
    /// `{"type":"session_failed","error":{"code":"build_host","chain":["…"]}}`
    SessionFailed {
        /// Why.
        error: ErrorInfo,
    },
}

impl SendLine {
    /// The `result.json` of a build on `host` whose session ended with this answer, its
    /// record received into `record` with `artifacts` (its `id` and `duration_secs` are
    /// the caller's to set): the build host's outcome, or the interruption or failure that
    /// ended the session (`interrupted`, `build_host`). A line that is not an answer is the
    /// build host's failure.
    pub fn into_result(self, host: &str, record: &Path, artifacts: Vec<PathBuf>) -> BuildResult {
        let mut result = BuildResult {
            artifacts,
            host: Some(host.to_string()),
            ..BuildResult::ended("", record, Outcome::Infrastructure, None)
        };
        let error = |code: BuildCode, message: String| ErrorInfo {
            code: code.as_str().into(),
            chain: vec![message],
        };
        match self {
            SendLine::SessionResult { result: there } => {
                result.outcome = there.outcome;
                result.exit_code = there.exit_code;
                result.limit = there.limit;
                result.error = there.error;
                result.refused_hosts = there.refused_hosts;
                result.refused_offline = there.refused_offline;
            }
            SendLine::SessionInterrupted { signal } => {
                result.outcome = Outcome::Interrupted;
                result.error = Some(error(
                    BuildCode::Interrupted,
                    format!("{signal} ended the session with the build host {host} before its record came back"),
                ));
            }
            SendLine::SessionFailed { error } => result.error = Some(error),
            other => {
                let message = format!("contractor-host send ended with {other:?}, not an answer");
                result.error = Some(error(BuildCode::BuildHost, message));
            }
        }
        result
    }
}
