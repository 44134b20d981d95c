//! What the host and the guest agent say to each other.
//!
//! The control port carries JSON Lines in both directions: the host sends one `Job`, the
//! agent answers with `hello` first and `done` last. The tunnel port carries multiplexed
//! TCP streams; each stream opened by the guest starts with one byte naming its target.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::result::ErrorInfo;

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
    /// Run first, the same way, with the network of `[network] allow`; the agent then
    /// says `phase: script` and waits for the host's `offline` (the host has cut the
    /// network) before it runs `script`. A fetch that fails ends the build (no script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<String>,
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
    /// The host's wall clock when it sent the job: the agent sets the guest's clock to it
    /// before anything else (a VM restored from a snapshot wakes with the clock of the
    /// moment it was saved). Filled in by `contractor-run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_time: Option<HostTime>,
    /// 32 bytes of the host's randomness, hex: the agent mixes them into the guest kernel's
    /// pool and reseeds its random number generator before the job runs, so that two VMs
    /// restored from one snapshot share no random state. Filled in by `contractor-run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
    /// When to keep the VM after `done` and wait for a `shell` message instead of powering
    /// off. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Keep>,
    /// The PEM certificate of the build proxy's authority when it inspects TLS: the agent
    /// adds it to the guest's trust store and points the usual variables at the bundle
    /// (docs/protocol.md, "TLS inspection").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
}

/// A moment of the host's wall clock (`CLOCK_REALTIME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostTime {
    /// Seconds since the Unix epoch.
    pub secs: u64,
    /// Nanoseconds within the second, below 1,000,000,000.
    pub nanos: u32,
}

impl HostTime {
    /// The host's clock now.
    pub fn now() -> HostTime {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        HostTime {
            secs: since.as_secs(),
            nanos: since.subsec_nanos(),
        }
    }
}

/// Bytes of host randomness a job carries ([`Job::entropy`], as hex): 32.
pub const JOB_ENTROPY_BYTES: usize = 32;

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
    /// Who is there? The agent answers each `hello` before the job with its own `hello`.
    /// The host speaks first, so that a VM saved while it waits for its job answers
    /// whoever restores it; the host repeats it until answered (a `hello` written before
    /// the guest opened its port may not reach it).
    Hello {
        /// Protocol version, 1.
        version: u32,
    },
    /// Run this build.
    Job {
        /// Protocol version, 1.
        version: u32,
        /// The build.
        job: Box<Job>,
    },
    /// The build's network is off (every proxy stream of the fetch phase is closed, later
    /// ones are refused): run the script. The answer to `phase: script` of a job with a
    /// `fetch`.
    Offline,
    /// Are you there? Sent every 5 s while the job runs (after `job`, until `done`); the
    /// agent answers `pong` with the same `seq`.
    Ping {
        /// Counts up from 1.
        seq: u64,
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
    /// Running the job's `fetch`, with the network.
    Fetch,
    /// Running the script.
    Script,
    /// Uploading artifacts.
    Artifacts,
}

impl Phase {
    /// The phase's name, as it is written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Source => "source",
            Phase::Fetch => "fetch",
            Phase::Script => "script",
            Phase::Artifacts => "artifacts",
        }
    }
}

/// Guest to host, on the control port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// The agent is up and waits for its job: the answer to the host's `hello`.
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
    /// The job's `fetch` ended (its code and signal as for `script_exited`); unless it
    /// exited 0 the agent runs no script and says `done`.
    FetchExited {
        /// Its exit code, if it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        /// The signal that killed it, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
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
    /// The answer to `ping`, with its `seq`.
    Pong {
        /// The `seq` of the ping answered.
        seq: u64,
    },
    /// The shell has started; raw terminal bytes follow.
    ShellStarted,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Most entries of a guest-provided error chain that are kept: 16 (the last one says how
/// much more was cut).
pub const ERROR_CHAIN_MAX: usize = 16;
/// Most bytes of one entry of a guest-provided error chain: 4 KiB (4,096 bytes), plus the
/// cut marker.
pub const ERROR_TEXT_MAX: usize = 4096;
/// Most bytes of a guest-provided error code: 64, made of `a-z 0-9 _` only.
pub const ERROR_CODE_MAX: usize = 64;

impl ErrorInfo {
    /// An error whose code and chain come from someone not trusted (the guest agent),
    /// bounded: at most [`ERROR_CHAIN_MAX`] entries of at most [`ERROR_TEXT_MAX`] bytes each,
    /// with a visible `… (cut: N more bytes)` marker where text was cut; a code that is not
    /// 1 to [`ERROR_CODE_MAX`] characters of `a-z 0-9 _` becomes `agent`, and the original,
    /// escaped and cut, opens the chain.
    pub fn capped(code: &str, chain: &[String]) -> ErrorInfo {
        let code_ok = !code.is_empty()
            && code.len() <= ERROR_CODE_MAX
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let mut entries: Vec<String> = Vec::new();
        if !code_ok {
            let shown = cut_text(code, ERROR_CODE_MAX);
            entries.push(format!(
                "the agent sent an invalid error code {shown:?} (accepted: 1 to {ERROR_CODE_MAX} characters of a-z 0-9 _)"
            ));
        }
        let room = ERROR_CHAIN_MAX - entries.len();
        let (kept, rest) = if chain.len() > room {
            chain.split_at(room - 1)
        } else {
            (chain, &[][..])
        };
        entries.extend(kept.iter().map(|text| cut_text(text, ERROR_TEXT_MAX)));
        if !rest.is_empty() {
            let bytes: usize = rest.iter().map(String::len).sum();
            entries.push(format!(
                "\u{2026} (cut: {} more entries, {bytes} more bytes)",
                rest.len()
            ));
        }
        ErrorInfo {
            code: if code_ok {
                code.to_string()
            } else {
                "agent".to_string()
            },
            chain: entries,
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with a marker saying how
/// many bytes were cut.
fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\u{2026} (cut: {} more bytes)",
        &text[..end],
        text.len() - end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_error_is_cut_to_its_bounds_with_markers() {
        let chain: Vec<String> = (0..100).map(|_| "é".repeat(10_000)).collect();
        let info = ErrorInfo::capped("store", &chain);
        assert_eq!(info.code, "store");
        assert_eq!(info.chain.len(), ERROR_CHAIN_MAX);
        for entry in &info.chain[..ERROR_CHAIN_MAX - 1] {
            assert!(entry.len() <= ERROR_TEXT_MAX + 40, "{}", entry.len());
            assert!(entry.ends_with("(cut: 15904 more bytes)"), "{entry}");
        }
        assert_eq!(
            info.chain[ERROR_CHAIN_MAX - 1],
            "\u{2026} (cut: 85 more entries, 1700000 more bytes)"
        );
    }

    #[test]
    fn a_bad_code_becomes_agent_with_the_original_escaped() {
        let info = ErrorInfo::capped("Evil\u{1b}[2J", &["why".into()]);
        assert_eq!(info.code, "agent");
        assert!(
            info.chain[0].contains(r#""Evil\u{1b}[2J""#),
            "{}",
            info.chain[0]
        );
        assert_eq!(info.chain[1], "why");
        let long = "a".repeat(ERROR_CODE_MAX + 1);
        assert_eq!(ErrorInfo::capped(&long, &[]).code, "agent");
        let short = ErrorInfo::capped("source_fetch", &["x".into()]);
        assert_eq!(
            (short.code.as_str(), short.chain.len()),
            ("source_fetch", 1)
        );
    }
}
