//! The answers of `contractor-store pack` and `contractor-store cache ...`: one JSON object
//! on stdout each (docs/protocol.md, "contractor-store"), or the shared error object with
//! `--json-errors`.
//!
//! Each message has a one-value `"type"` field (see [`crate::service::ReadyTag`] for why)
//! and `"version": 1`; none accepts unknown fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::CacheJob;
use crate::PROTOCOL_VERSION;

/// Where the agent uploads a build's new cache, under the build's `artifacts/`. It is never
/// one of the build's artifacts: `cache keep` moves it into the cache directory.
pub const CACHE_UPLOAD_NAME: &str = ".contractor-cache.tar";

macro_rules! tag {
    ($(#[$doc:meta])* $name:ident, $variant:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            /// The message's one type.
            $variant,
        }
    };
}

tag!(
    /// The `"type"` of [`Packed`]: `"packed"`.
    PackedTag,
    Packed
);
tag!(
    /// The `"type"` of [`CachePrepared`]: `"cache_prepared"`.
    CachePreparedTag,
    CachePrepared
);
tag!(
    /// The `"type"` of [`CacheKept`]: `"cache_kept"`.
    CacheKeptTag,
    CacheKept
);
tag!(
    /// The `"type"` of [`CacheList`]: `"cache_list"`.
    CacheListTag,
    CacheList
);
tag!(
    /// The `"type"` of [`CacheCleared`]: `"cache_cleared"`.
    CacheClearedTag,
    CacheCleared
);

tag!(
    /// The `"type"` of [`RecordReceived`]: `"record_received"`.
    RecordReceivedTag,
    RecordReceived
);
tag!(
    /// The `"type"` of [`RecordsClosed`]: `"records_closed"`.
    RecordsClosedTag,
    RecordsClosed
);
tag!(
    /// The `"type"` of [`KeptVmForgotten`]: `"kept_vm_forgotten"`.
    KeptVmForgottenTag,
    KeptVmForgotten
);
tag!(
    /// The `"type"` of [`RecordOpened`]: `"record_opened"`.
    RecordOpenedTag,
    RecordOpened
);
tag!(
    /// The `"type"` of [`RecordClosed`]: `"record_closed"`.
    RecordClosedTag,
    RecordClosed
);

tag!(
    /// The `"type"` of [`RecordList`]: `"record_list"`.
    RecordListTag,
    RecordList
);
tag!(
    /// The `"type"` of [`RecordEntry`]: `"record_entry"`.
    RecordEntryTag,
    RecordEntry
);
tag!(
    /// The `"type"` of [`RecordShown`]: `"record_shown"`.
    RecordShownTag,
    RecordShown
);
tag!(
    /// The `"type"` of [`RecordDownloads`]: `"record_downloads"`.
    RecordDownloadsTag,
    RecordDownloads
);
tag!(
    /// The `"type"` of [`RecordLog`]: `"record_log"`.
    RecordLogTag,
    RecordLog
);

/// `record list`'s first line: how many [`RecordEntry`] lines follow (oldest build first).
/// `{"type":"record_list","version":1,"builds":2,"left_out":0}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordList {
    /// Always `record_list`.
    #[serde(rename = "type")]
    pub kind: RecordListTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The number of `record_entry` lines that follow.
    pub builds: u64,
    /// Older builds not listed (beyond the newest `MAX_LISTED_BUILDS`).
    pub left_out: u64,
}

impl RecordList {
    /// The first line of a list of `builds` entries, `left_out` older ones not listed.
    pub fn new(builds: u64, left_out: u64) -> RecordList {
        RecordList {
            kind: RecordListTag::RecordList,
            version: PROTOCOL_VERSION,
            builds,
            left_out,
        }
    }
}

/// One build of `record list`.
/// `{"type":"record_entry","id":"20261125-141502-3fa2c1","started":"2026-11-25 14:15:02",
/// "outcome":"success","duration_secs":12.5}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordEntry {
    /// Always `record_entry`.
    #[serde(rename = "type")]
    pub kind: RecordEntryTag,
    /// The build id.
    pub id: String,
    /// When it started (UTC, `YYYY-MM-DD HH:MM:SS`, from its id); null for an id of
    /// another form.
    pub started: Option<String>,
    /// How it ended; null while it runs (no `result.json` yet).
    pub outcome: Option<crate::result::Outcome>,
    /// How long it ran; null while it runs.
    pub duration_secs: Option<f64>,
}

/// One artifact of a [`RecordShown`]: the path `result.json` names, and what is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShownArtifact {
    /// The path as `result.json` names it.
    pub path: PathBuf,
    /// Its size in bytes; null when it is missing (or not a regular file of the record).
    pub size: Option<u64>,
    /// Its SHA-256, lower-case hex (from the record's `artifacts.json`, else hashed); null
    /// when it is missing.
    pub sha256: Option<String>,
}

/// The file in a build record that names its kept VM (`contractor build --keep`).
pub const KEPT_VM_FILE: &str = "vm.json";

/// Most bytes of a record's [`KEPT_VM_FILE`] read back (ours have a few hundred).
pub const MAX_KEPT_VM_BYTES: u64 = 64 << 10;

/// A VM kept after its build for `contractor shell`: [`KEPT_VM_FILE`] in the build record,
/// and [`RecordShown::kept_vm`] as `record show --kept-vm` reads it.
/// `{"name":"contractor-…","uri":"qemu:///system","control_socket":"/…/control.sock"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptVm {
    /// The VM's name.
    pub name: String,
    /// The libvirt connection it runs under.
    pub uri: String,
    /// The host end of its control channel.
    pub control_socket: PathBuf,
}

/// `record show`: one build's record.
/// `{"type":"record_shown","version":1,"id":"…","dir":"/p/.contractor/builds/…",
/// "started":"2026-11-25 14:15:02","result":{…}|null,"artifacts":[{"path":"…","size":3,
/// "sha256":"…"}],"downloads":2,"from_cache":1}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordShown {
    /// Always `record_shown`.
    #[serde(rename = "type")]
    pub kind: RecordShownTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build id.
    pub id: String,
    /// The record's directory.
    pub dir: PathBuf,
    /// When it started, as in [`RecordEntry::started`].
    pub started: Option<String>,
    /// Its `result.json`; null while it runs.
    pub result: Option<crate::result::BuildResult>,
    /// Each artifact the result names, in its order; while there is no result, each
    /// artifact the record's `artifacts.json` names (a build host's record, received and
    /// not closed yet), sorted.
    pub artifacts: Vec<ShownArtifact>,
    /// The download lines of its `downloads.jsonl`.
    pub downloads: u64,
    /// Of those, the ones served from the download cache.
    pub from_cache: u64,
    /// With `--kept-vm`, the VM kept for `contractor shell` (its [`KEPT_VM_FILE`]); left
    /// out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_vm: Option<KeptVm>,
}

/// `record downloads`' first line: how many lines follow, each a
/// [`crate::proxy::Download`] of the record's `downloads.jsonl`, in its order.
/// `{"type":"record_downloads","version":1,"id":"…","downloads":2,"skipped":1}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordDownloads {
    /// Always `record_downloads`.
    #[serde(rename = "type")]
    pub kind: RecordDownloadsTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build id.
    pub id: String,
    /// The number of download lines that follow.
    pub downloads: u64,
    /// Lines of the file that are not downloads (the `cut` marker, a damaged line).
    pub skipped: u64,
}

/// `record log`'s first line; exactly `bytes` bytes of the log follow it.
/// `{"type":"record_log","version":1,"id":"…","path":"/p/.contractor/builds/…/build.log","bytes":1234}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordLog {
    /// Always `record_log`.
    #[serde(rename = "type")]
    pub kind: RecordLogTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build id.
    pub id: String,
    /// The log file.
    pub path: PathBuf,
    /// The bytes that follow.
    pub bytes: u64,
}

/// `record receive`: the record of a build host's build, received and indexed.
/// `{"type":"record_received","version":1,"files":7,"charged_bytes":57344,"artifacts":2}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordReceived {
    /// Always `record_received`.
    #[serde(rename = "type")]
    pub kind: RecordReceivedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// Files written into the record.
    pub files: u64,
    /// Bytes charged against the limit (each file and directory at least 4096).
    pub charged_bytes: u64,
    /// Artifacts in the index written after it (`artifacts.json`).
    pub artifacts: u64,
}

impl RecordReceived {
    /// The answer for a record of `files` files charged `charged_bytes`, with `artifacts`.
    pub fn new(files: u64, charged_bytes: u64, artifacts: u64) -> RecordReceived {
        RecordReceived {
            kind: RecordReceivedTag::RecordReceived,
            version: PROTOCOL_VERSION,
            files,
            charged_bytes,
            artifacts,
        }
    }
}

/// `record close-abandoned`: the builds whose records it closed (each now has a
/// `result.json` saying it was interrupted). `{"type":"records_closed","version":1,"closed":["20261125-141502-3fa2c1"]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsClosed {
    /// Always `records_closed`.
    #[serde(rename = "type")]
    pub kind: RecordsClosedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The ids of the builds closed, sorted.
    pub closed: Vec<String>,
}

impl RecordsClosed {
    /// The answer naming the `closed` builds.
    pub fn new(closed: Vec<String>) -> RecordsClosed {
        RecordsClosed {
            kind: RecordsClosedTag::RecordsClosed,
            version: PROTOCOL_VERSION,
            closed,
        }
    }
}

/// `record forget-vm`: the record's [`KEPT_VM_FILE`] removed (or there was none), once its
/// VM is gone. `{"type":"kept_vm_forgotten","version":1,"id":"20261125-141502-3fa2c1"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptVmForgotten {
    /// Always `kept_vm_forgotten`.
    #[serde(rename = "type")]
    pub kind: KeptVmForgottenTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build.
    pub id: String,
}

impl KeptVmForgotten {
    /// The answer naming the build `id`.
    pub fn new(id: String) -> KeptVmForgotten {
        KeptVmForgotten {
            kind: KeptVmForgottenTag::KeptVmForgotten,
            version: PROTOCOL_VERSION,
            id,
        }
    }
}

/// `record open`: the build's record made, owned and named `latest`.
/// `{"type":"record_opened","version":1,"id":"20261125-141502-3fa2c1","dir":"/p/.contractor/builds/20261125-141502-3fa2c1"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordOpened {
    /// Always `record_opened`.
    #[serde(rename = "type")]
    pub kind: RecordOpenedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build's id.
    pub id: String,
    /// Its record directory, absolute.
    pub dir: PathBuf,
}

impl RecordOpened {
    /// The answer for the record `dir` of build `id`.
    pub fn new(id: String, dir: PathBuf) -> RecordOpened {
        RecordOpened {
            kind: RecordOpenedTag::RecordOpened,
            version: PROTOCOL_VERSION,
            id,
            dir,
        }
    }
}

/// `record close`: the build's record closed, with the `result.json` written.
/// `{"type":"record_closed","version":1,"result":{"version":1,"id":"…","outcome":"success",…}}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordClosed {
    /// Always `record_closed`.
    #[serde(rename = "type")]
    pub kind: RecordClosedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// What was written to `result.json`.
    pub result: crate::result::BuildResult,
}

impl RecordClosed {
    /// The answer for a record closed with `result`.
    pub fn new(result: crate::result::BuildResult) -> RecordClosed {
        RecordClosed {
            kind: RecordClosedTag::RecordClosed,
            version: PROTOCOL_VERSION,
            result,
        }
    }
}

/// `pack`: `{"type":"packed","version":1,"entries":4,"bytes":10240,"warnings":[]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packed {
    /// Always `packed`.
    #[serde(rename = "type")]
    pub kind: PackedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// Files, directories and links in the tar.
    pub entries: u64,
    /// Size of the tar in bytes.
    pub bytes: u64,
    /// What was left out or not applied, one line each, for the user. Names in them are the
    /// project's, as they are: escape them before printing them on a terminal.
    pub warnings: Vec<String>,
    /// Which rule chose the files and how many each left out (absent from older stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<SourceSelection>,
}

impl Packed {
    /// The answer for a tar of `entries` entries and `bytes` bytes.
    pub fn new(entries: u64, bytes: u64, warnings: Vec<String>) -> Packed {
        Packed {
            kind: PackedTag::Packed,
            version: PROTOCOL_VERSION,
            entries,
            bytes,
            warnings,
            selection: None,
        }
    }
}

/// Which rule chose the packed files. `.git` and `.contractor` at the top are always left
/// out. `{"rule":"git_work_tree","ignored":12,"tracked_kept":1}`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSelection {
    /// The rule that applied.
    pub rule: SourceRule,
    /// Paths left out because a `.gitignore` pattern matches them (a directory left out
    /// counts once, whatever it holds); 0 outside a git work tree.
    pub ignored: u64,
    /// Paths packed although a `.gitignore` pattern matches them, because git tracks them
    /// (they are in the index); 0 outside a git work tree.
    pub tracked_kept: u64,
}

/// How the files to pack were chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceRule {
    /// The project is (in) a git work tree: its `.gitignore` files apply, except to files
    /// git tracks, as git's own rule is.
    GitWorkTree,
    /// The project is in no git work tree (an unpacked crate, sdist or tarball): everything
    /// is packed but `.contractor`; `.gitignore` files are packed, not applied.
    Everything,
}

/// `cache prepare`: the job's cache, or null when the build keeps no directories.
/// `{"type":"cache_prepared","version":1,"cache":{"paths":["/root/.cargo/registry"],
/// "restore":"/builds/ID/inputs/cache.tar","save":"/builds/ID/artifacts/.contractor-cache.tar",
/// "max_bytes":1073741824},"warnings":[]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePrepared {
    /// Always `cache_prepared`.
    #[serde(rename = "type")]
    pub kind: CachePreparedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// What goes into the job's `cache` field; null without cache paths.
    pub cache: Option<CacheJob>,
    /// What was found in the cache's place and removed, one line each, for the user.
    pub warnings: Vec<String>,
}

impl CachePrepared {
    /// The answer carrying `cache`.
    pub fn new(cache: Option<CacheJob>, warnings: Vec<String>) -> CachePrepared {
        CachePrepared {
            kind: CachePreparedTag::CachePrepared,
            version: PROTOCOL_VERSION,
            cache,
            warnings,
        }
    }
}

/// `cache keep`: the size of the cache kept, or null when none was (the build failed, kept
/// no directories, or uploaded none). `{"type":"cache_kept","version":1,"bytes":9}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKept {
    /// Always `cache_kept`.
    #[serde(rename = "type")]
    pub kind: CacheKeptTag,
    /// Protocol version, 1.
    pub version: u32,
    /// Bytes of the new cache tar, if one was kept.
    pub bytes: Option<u64>,
}

impl CacheKept {
    /// The answer for a kept cache of `bytes`.
    pub fn new(bytes: Option<u64>) -> CacheKept {
        CacheKept {
            kind: CacheKeptTag::CacheKept,
            version: PROTOCOL_VERSION,
            bytes,
        }
    }
}

/// What `<store>/cache/<key>.json` says about a cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheInfo {
    /// The guest directories it holds.
    pub paths: Vec<String>,
    /// The tar's size in bytes.
    pub bytes: u64,
    /// The build that saved it.
    pub build: String,
}

/// One cache on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheEntry {
    /// The tar.
    pub tar: PathBuf,
    /// Its size in bytes; 0 when it is not a regular file (it is never followed).
    pub bytes: u64,
    /// Its description, null when that is missing or unreadable.
    pub info: Option<CacheInfo>,
}

/// `cache list`: the store's caches, sorted by tar.
/// `{"type":"cache_list","version":1,"caches":[{"tar":"/p/.contractor/cache/3fa2c1d09e8b7a65.tar",
/// "bytes":9,"info":{"paths":["/root/.kept"],"bytes":9,"build":"20261125-141502-3fa2c1"}}]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheList {
    /// Always `cache_list`.
    #[serde(rename = "type")]
    pub kind: CacheListTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The caches.
    pub caches: Vec<CacheEntry>,
}

impl CacheList {
    /// The answer listing `caches`.
    pub fn new(caches: Vec<CacheEntry>) -> CacheList {
        CacheList {
            kind: CacheListTag::CacheList,
            version: PROTOCOL_VERSION,
            caches,
        }
    }
}

/// `cache clear`: `{"type":"cache_cleared","version":1,"freed_bytes":9}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheCleared {
    /// Always `cache_cleared`.
    #[serde(rename = "type")]
    pub kind: CacheClearedTag,
    /// Protocol version, 1.
    pub version: u32,
    /// Bytes of the tars removed.
    pub freed_bytes: u64,
}

impl CacheCleared {
    /// The answer after freeing `freed_bytes`.
    pub fn new(freed_bytes: u64) -> CacheCleared {
        CacheCleared {
            kind: CacheClearedTag::CacheCleared,
            version: PROTOCOL_VERSION,
            freed_bytes,
        }
    }
}

tag!(
    /// The `"type"` of [`RecordSource`]: `"record_source"`.
    RecordSourceTag,
    RecordSource
);

/// `record source`: the record's packed source, copied out for a rebuild.
/// `{"type":"record_source","version":1,"id":"…","path":"/p/.contractor/.rebuild-4242.tar","bytes":10240}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSource {
    /// Always `record_source`.
    #[serde(rename = "type")]
    pub kind: RecordSourceTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The build id.
    pub id: String,
    /// The new file written.
    pub path: PathBuf,
    /// The bytes copied (the size of the record's `source.tar`).
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_serialize_in_the_documented_shape() {
        let packed = serde_json::to_string(&Packed::new(4, 10240, vec![])).expect("json");
        assert_eq!(
            packed,
            r#"{"type":"packed","version":1,"entries":4,"bytes":10240,"warnings":[]}"#
        );
        let none = serde_json::to_string(&CachePrepared::new(None, vec![])).expect("json");
        assert_eq!(
            none,
            r#"{"type":"cache_prepared","version":1,"cache":null,"warnings":[]}"#
        );
        let kept = serde_json::to_string(&CacheKept::new(Some(9))).expect("json");
        assert_eq!(kept, r#"{"type":"cache_kept","version":1,"bytes":9}"#);
        let cleared = serde_json::to_string(&CacheCleared::new(9)).expect("json");
        assert_eq!(
            cleared,
            r#"{"type":"cache_cleared","version":1,"freed_bytes":9}"#
        );
        let list = CacheList::new(vec![CacheEntry {
            tar: "/s/cache/k.tar".into(),
            bytes: 9,
            info: None,
        }]);
        let text = serde_json::to_string(&list).expect("json");
        assert_eq!(
            text,
            r#"{"type":"cache_list","version":1,"caches":[{"tar":"/s/cache/k.tar","bytes":9,"info":null}]}"#
        );
        assert_eq!(
            serde_json::from_str::<CacheList>(&text).expect("back"),
            list
        );
    }

    #[test]
    fn one_message_is_not_read_as_another() {
        let kept = r#"{"type":"cache_kept","version":1,"bytes":9}"#;
        assert!(serde_json::from_str::<CacheCleared>(kept).is_err());
        assert!(serde_json::from_str::<CacheKept>(kept).is_ok());
    }
}
