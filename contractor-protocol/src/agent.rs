//! What the host and the guest agent say to each other.
//!
//! The control port carries JSON Lines in both directions: the host sends one `Job`, the
//! agent answers with `hello` first and `done` last. The tunnel port carries multiplexed
//! TCP streams; each stream opened by the guest starts with one byte naming its target.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The name of the control port (virtio-serial) as the guest sees it.
pub const CONTROL_PORT: &str = "org.contractor.control";
/// The name of the tunnel port (virtio-serial) as the guest sees it.
pub const TUNNEL_PORT: &str = "org.contractor.tunnel";
/// Guest loopback port where the proxy is reachable.
pub const GUEST_PROXY_PORT: u16 = 3128;
/// Guest loopback port where the store is reachable.
pub const GUEST_STORE_PORT: u16 = 8480;

/// Most artifacts one build may report (`artifact` messages): 10,000. The agent refuses
/// more before uploading; the host ends a build whose guest reports more
/// (`too_many_artifacts`, failed).
pub const MAX_REPORTED_ARTIFACTS: usize = 10_000;

/// Where a tunnel stream goes: its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelTarget {
    /// The filtering proxy.
    Proxy,
    /// The artifact store.
    Store,
    /// The build's output (guest to host only, raw bytes).
    Log,
}

impl TunnelTarget {
    /// The byte that opens a stream to this target.
    pub fn tag(self) -> u8 {
        match self {
            TunnelTarget::Proxy => b'p',
            TunnelTarget::Store => b's',
            TunnelTarget::Log => b'l',
        }
    }

    /// The target a stream's first byte names.
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b'p' => Some(TunnelTarget::Proxy),
            b's' => Some(TunnelTarget::Store),
            b'l' => Some(TunnelTarget::Log),
            _ => None,
        }
    }
}

/// The build the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Run with `sh -e -c` in the unpacked source directory.
    pub script: String,
    /// Extra environment for the script.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Store path (URL path) of the source tar, e.g. `/builds/ID/source.tar`.
    pub source: String,
    /// Paths or globs, relative to the source root, uploaded after a successful script.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// Store path prefix the artifacts are uploaded under, e.g. `/builds/ID/artifacts/`.
    pub artifacts_dest: String,
    /// The build's store token: sent as `Authorization: Bearer <token>` with every store
    /// request, and given to the script as `CONTRACTOR_STORE_TOKEN`. None when the store
    /// takes no tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_token: Option<String>,
    /// Directories kept between builds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheJob>,
    /// When to keep the VM after `done` and wait for a `shell` message instead of powering
    /// off. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Keep>,
}

/// When the agent keeps the VM for a shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// After a failed script or a failure of the agent.
    OnFailure,
    /// Always.
    Always,
}

/// The build's cache: directories the agent restores before the script and saves after a
/// successful one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheJob {
    /// Absolute guest directories to keep.
    pub paths: Vec<String>,
    /// Store path of a tar of them from an earlier build, unpacked at `/` before the
    /// script; none on the first build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// Store path the new tar is uploaded to after a successful script.
    pub save: String,
    /// Most bytes the tar may have; a bigger one is not saved.
    pub max_bytes: u64,
}

/// Host to guest, on the control port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Run this build.
    Job {
        /// Protocol version, 1.
        version: u32,
        /// The build.
        job: Box<Job>,
    },
    /// Open an interactive shell in the kept VM. After the agent's `shell_started`, the
    /// control port carries the terminal's raw bytes both ways until the shell exits; then
    /// the VM powers off.
    Shell {
        /// Terminal width in columns (0: unknown).
        #[serde(default)]
        cols: u16,
        /// Terminal height in rows (0: unknown).
        #[serde(default)]
        rows: u16,
        /// The terminal type for `TERM` (default `xterm-256color`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<String>,
    },
}

/// A phase of the build inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Fetching and unpacking the source.
    Source,
    /// Running the script.
    Script,
    /// Uploading artifacts.
    Artifacts,
}

/// Guest to host, on the control port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// The agent is up. First message.
    Hello {
        /// Protocol version, 1.
        version: u32,
        /// The agent's version.
        agent_version: String,
    },
    /// A phase began.
    Phase {
        /// Which phase.
        phase: Phase,
    },
    /// One artifact was uploaded.
    Artifact {
        /// Path relative to the source root.
        path: String,
        /// Size in bytes.
        size: u64,
    },
    /// The script ended.
    ScriptExited {
        /// Its exit code, if it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        /// The signal that killed it, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// Processes the guest kernel killed for lack of memory while the script ran.
        #[serde(default, skip_serializing_if = "is_zero")]
        oom_kills: u64,
        /// The build's disk had no free space or inodes left when the script ended.
        #[serde(default, skip_serializing_if = "is_false")]
        disk_full: bool,
    },
    /// The agent could not do its part (not the script's failure).
    Error {
        /// A short machine-readable code, e.g. `source_fetch`.
        code: String,
        /// The error and its causes, outermost first.
        chain: Vec<String>,
    },
    /// The agent is finished: it powers off, unless the job's `keep` applies, when it waits
    /// for a `shell` message. Last message of the job.
    Done,
    /// The shell has started; raw terminal bytes follow.
    ShellStarted,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}
