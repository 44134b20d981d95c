//! `contractor-run`: its request (stdin) and its event stream (stdout, JSON Lines).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::{Job, Phase};
use crate::result::{ErrorInfo, Limit, Outcome};

/// What `contractor-run` is asked to do: run `job` in the VM whose channels are given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Protocol version, 1.
    pub version: u32,
    /// Host end of the VM's control channel.
    pub control_socket: PathBuf,
    /// Host end of the VM's tunnel channel.
    pub tunnel_socket: PathBuf,
    /// The filtering proxy the guest's proxy streams go to.
    pub proxy: SocketAddr,
    /// The artifact store the guest's store streams go to.
    pub store: SocketAddr,
    /// With a job's `fetch`: where proxy streams go once the fetch has ended (a proxy that
    /// refuses everything and records what was asked). Absent: they are closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_proxy: Option<SocketAddr>,
    /// File the build's output is written to (raw bytes, as produced).
    pub log: PathBuf,
    /// Limit for the build itself, in seconds, from the moment the agent has the job.
    pub timeout_secs: u64,
    /// Limit for the VM to boot and its agent to answer, in seconds (default 300).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
    /// Most bytes of output the build may write; beyond it the output is cut (with a
    /// marker line in the log) and the build fails. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_log_bytes: Option<u64>,
    /// The VM's memory in MiB, when known: named in the message of the `vm.memory` limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The size of the VM's build disk in GiB, when known: named in the message of the
    /// `vm.disk` limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// The build.
    pub job: Job,
}

/// One event of `contractor-run`'s stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    /// First event.
    Started {
        /// Protocol version, 1.
        version: u32,
        /// What holds the relay once it has opened the VM's channels and the log (see
        /// [`Confinement`]); absent from a relay of an older release.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confinement: Option<crate::service::Confinement>,
    },
    /// The guest agent answered.
    AgentReady {
        /// The agent's version.
        agent_version: String,
    },
    /// A phase began in the guest.
    Phase {
        /// Which phase.
        phase: Phase,
    },
    /// Build output (lossy UTF-8; the log file has the exact bytes).
    Output {
        /// The text.
        text: String,
    },
    /// An artifact was stored.
    Artifact {
        /// Path relative to the source root.
        path: String,
        /// Size in bytes.
        size: u64,
    },
    /// Last event: how the run ended.
    Finished {
        /// How it ended.
        outcome: Outcome,
        /// The script's exit code, when it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Seconds from request to end.
        duration_secs: f64,
        /// What went wrong, unless it succeeded or the script failed on its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorInfo>,
        /// The limit the build hit, if it hit one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<Limit>,
    },
    /// A message type this reader does not know (from a newer writer).
    #[serde(other)]
    Unknown,
}

fn default_boot_timeout() -> u64 {
    300
}

/// What `contractor-run shell` is asked to do: open the interactive shell of a VM kept
/// after its build, whose agent waits on its control channel. It is the first line of the
/// tool's stdin; the rest of stdin is the keyboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellRequest {
    /// Protocol version, 1.
    pub version: u32,
    /// Host end of the kept VM's control channel (`vm.json`'s `control_socket`).
    pub control_socket: PathBuf,
    /// Terminal width in columns (0: unknown).
    #[serde(default)]
    pub cols: u16,
    /// Terminal height in rows (0: unknown).
    #[serde(default)]
    pub rows: u16,
    /// The terminal type for the guest's `TERM` (default `xterm-256color`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// The one JSON line `contractor-run shell` writes on stdout; the terminal's raw bytes
/// follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShellEvent {
    /// The agent started the shell; from the next byte on, stdout is the shell's terminal.
    ShellStarted {
        /// Protocol version, 1.
        version: u32,
        /// What holds the tool while it carries the shell's bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confinement: Option<crate::service::Confinement>,
    },
}
