//! `contractor-host build`: one build run on a build host for a front end on another
//! machine, over SSH (`contractor build --host`).
//!
//! The front end runs `ssh HOST contractor-host build` and speaks on the session's
//! stdin and stdout:
//!
//! - the build host writes [`HostedLine::Hello`] first (its versions);
//! - the front end writes one [`HostedRequest`] line, then exactly `source_bytes` bytes of
//!   the packed source tar, and then keeps its side open: its end (EOF on the build host's
//!   stdin: Ctrl-C, a killed front end, a cut connection) interrupts the build, whose VM is
//!   then destroyed;
//! - the build host runs the build and writes its events (`contractor build --json`, see
//!   [`crate::build::BuildEvent`]), `finished` last, or one error object when the build
//!   could not start (see [`crate::error::ErrorObject`]);
//! - after `finished` it sends the build record: for each file, a [`HostedLine::File`] line
//!   followed by exactly `bytes` bytes of the file, then [`HostedLine::End`].

use serde::{Deserialize, Serialize};

use crate::vm::Accel;

/// The subcommand of `contractor-host` that serves a hosted build.
pub const HOSTED_COMMAND: &str = "build";

/// The longest request line a build host reads (the spec and the lock travel in it; a lock
/// holds at most 16 MiB).
pub const MAX_REQUEST_BYTES: u64 = 40 << 20;

/// The most files a record sent back may hold.
pub const MAX_RECORD_FILES: u64 = 100_000;

/// The deepest a path of a record file sent back may be, in components.
pub const MAX_RECORD_DEPTH: usize = 64;

/// The most directories a record sent back may make on the front end's disk.
pub const MAX_RECORD_DIRS: u64 = 100_000;

/// What each file and each directory of a record sent back costs at least against the
/// record's byte limit: one 4096-byte block of the host's file system, as the store counts
/// artifacts. A file counts its size rounded up to a multiple of it (an empty file one
/// block), so empty files in deep directories cannot fill the front end's disk.
pub const RECORD_ENTRY_BYTES: u64 = 4096;

/// Bytes of a returned record allowed beyond the build's `max_log` and `max_artifacts`
/// (console log, proxy and download records, the tools' messages).
pub const RECORD_OVERHEAD_BYTES: u64 = 1 << 30;

/// Files of a record that do not travel back, by their first path component: the front end
/// has the source, writes its own `result.json` and `provenance.json`, and owns the build;
/// `inputs` is the build cache handed to the guest; the store that receives the record
/// writes its own artifact index (`artifacts.json`) from what arrived.
pub const NOT_SENT: &[&str] = &[
    "source.tar",
    "result.json",
    "owner.json",
    "inputs",
    "vm.json",
    "provenance.json",
    "artifacts.json",
];

/// What the front end asks a build host to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedRequest {
    /// Protocol version of the front end.
    pub version: u32,
    /// The front end's release (`contractor --version`), which must be the build host's.
    pub contractor: String,
    /// The build's id, chosen by the front end (`YYYYMMDD-HHMMSS-xxxxxx`).
    pub id: String,
    /// The project's key on the build host: 32 lowercase hex digits, the same for every
    /// build of one project directory from one machine (its build cache is kept under it).
    pub project: String,
    /// The text of contractor.toml.
    pub spec: String,
    /// The text of contractor.lock, when the project has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    /// Entries of the packed source.
    pub source_entries: u64,
    /// Bytes of the packed source tar that follow this line (or the build host's
    /// [`HostedLine::Source`] answer, when `source_sha256` is given).
    pub source_bytes: u64,
    /// The packed source's sha256 (64 lowercase hex digits): the build host answers with
    /// [`HostedLine::Source`] whether it needs the bytes, which are sent only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// The accelerator.
    pub accel: Accel,
    /// Whether to restore a saved, booted builder (false: `--cold`).
    pub snapshot: bool,
    /// `--offline`.
    pub offline: bool,
    /// The libvirt URI on the build host; its default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// The lines of a hosted build's stream that are not build events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostedLine {
    /// First line from the build host.
    Hello {
        /// Its protocol version.
        version: u32,
        /// Its release.
        contractor: String,
    },
    /// The build host's answer to a request with `source_sha256`, right after reading it:
    /// whether the front end is to send the source's bytes (false: it kept that source
    /// from the project's previous build).
    Source {
        /// Whether the bytes are to be sent.
        need: bool,
    },
    /// One file of the build record; exactly `bytes` bytes of it follow the line.
    File {
        /// Its path in the record, relative (`build.log`, `artifacts/target/release/x`).
        path: String,
        /// Its size.
        bytes: u64,
        /// Whether it is executable.
        executable: bool,
    },
    /// The record is complete.
    End {
        /// How many files were sent.
        files: u64,
    },
}

/// The lines `contractor-store record follow` writes, besides the build events it passes on
/// (re-encoded from [`crate::build::BuildEvent`]) and its closing `record_received`: what
/// the build host said before them, once checked.
///
/// `{"type":"host_hello","version":1,"contractor":"0.1.0"}`,
/// `{"type":"host_source","need":true}`,
/// `{"type":"host_failed","code":"libvirt_unreachable","chain":["..."]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FollowedLine {
    /// The build host's hello: its protocol version and release (compared by the front
    /// end with its own).
    HostHello {
        /// The build host's protocol version.
        version: u32,
        /// The build host's release.
        contractor: String,
    },
    /// The build host's answer whether it needs the source's bytes (its `source` line).
    HostSource {
        /// Whether the bytes are to be sent.
        need: bool,
    },
    /// The build host's error object: it could not run the build. The last line.
    HostFailed {
        /// Its code.
        code: String,
        /// Its chain, outermost first.
        chain: Vec<String>,
    },
}

/// `contractor-vm capacity`: what a build host has room for, as its libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CapacityReport {
    /// The one answer.
    Capacity {
        /// Protocol version.
        version: u32,
        /// The release of the tools there.
        contractor: String,
        /// Free memory of the host, in MiB.
        free_memory_mib: u64,
        /// Its CPUs.
        cpus: u32,
        /// Contractor VMs running there now.
        running: u32,
    },
}

/// How many more builds of `cpus` CPUs and `memory_mib` MiB fit on a host: free memory ÷
/// the build's memory, and CPUs ÷ the build's CPUs less the VMs already running there, the
/// smaller of the two (0 when either is exhausted).
pub fn room(free_memory_mib: u64, host_cpus: u32, running: u32, cpus: u32, memory_mib: u64) -> u64 {
    let by_memory = free_memory_mib / memory_mib.max(1);
    let by_cpus = u64::from(host_cpus / cpus.max(1)).saturating_sub(u64::from(running));
    by_memory.min(by_cpus)
}

/// Whether `key` is a project key: 32 lowercase hex digits.
pub fn is_project_key(key: &str) -> bool {
    key.len() == 32
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `id` has the form of a build id: `YYYYMMDD-HHMMSS-` and six lowercase hex digits.
pub fn is_build_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 22
        && b[8] == b'-'
        && b[15] == b'-'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
        && b[16..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A new build id, `20261125-130501-3f2a9c` ([`is_build_id`]): the UTC date and time, then
/// three random bytes, so that ids sort by time and concurrent builds do not collide.
pub fn new_build_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (year, month, day) = crate::clock::civil_date(now / 86_400);
    let secs = now % 86_400;
    let mut random = [0u8; 3];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut random);
    }
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{:02x}{:02x}{:02x}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        random[0],
        random[1],
        random[2]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_line_reads_as_its_fields_and_refuses_unknown_ones() {
        let line: HostedLine = serde_json::from_str(
            r#"{"type":"file","path":"build.log","bytes":3,"executable":false}"#,
        )
        .expect("file line");
        assert_eq!(
            line,
            HostedLine::File {
                path: "build.log".into(),
                bytes: 3,
                executable: false
            }
        );
        assert!(
            serde_json::from_str::<HostedLine>(r#"{"type":"end","files":1,"extra":true}"#).is_err()
        );
    }

    #[test]
    fn room_is_the_scarcer_of_memory_and_cpus() {
        // 8 GiB free holds four 2 GiB builds; 8 CPUs hold four 2-CPU builds, one runs.
        assert_eq!(room(8192, 8, 1, 2, 2048), 3);
        assert_eq!(room(3000, 8, 0, 2, 2048), 1);
        assert_eq!(room(100_000, 2, 3, 2, 2048), 0);
        assert_eq!(room(1000, 2, 0, 1, 2048), 0);
    }

    #[test]
    fn ids_and_keys_have_one_form() {
        assert!(is_build_id("20261203-061502-3fa2c1"));
        assert!(is_build_id(&new_build_id()), "{}", new_build_id());
        assert!(!is_build_id("20261203-061502-3FA2C1"));
        assert!(!is_build_id("../../etc/passwd-xxxxx"));
        assert!(!is_build_id("20261203-061502-3fa2c"));
        assert!(is_project_key("0123456789abcdef0123456789abcdef"));
        assert!(!is_project_key("0123456789abcdef0123456789abcde/"));
        assert!(!is_project_key("0123"));
    }
}
