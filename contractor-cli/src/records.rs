//! Reading build records: `contractor builds`, `contractor show`, `contractor log`.
//!
//! A record is `<project>/.contractor/builds/<id>/`; ids sort by time, so the newest build
//! is the greatest id. These commands only read: they never change a record. What writes
//! record files the front end did not make itself is `contractor-store record ...`: the
//! store opens a build's record ([`open_new`]) and closes it ([`close`]: `artifacts.json` and
//! `result.json`), receives a build host's record (confined to it), and decides which
//! builds are abandoned and closes them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use contractor_protocol::result::{BuildResult, ErrorInfo, Limit, Outcome};
use contractor_protocol::store::{RecordClosed, RecordOpened, RecordsClosed};

use crate::tools::{self, ToolError};

/// Errors reading records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The project has no builds yet.
    #[error("no builds in {0} yet; run `contractor build` first")]
    NoBuilds(PathBuf),
    /// No build has this id.
    #[error("no build {id:?} in {dir}; `contractor builds` lists them")]
    NoSuchBuild {
        /// The id asked for.
        id: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A file of the record could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `result.json` is not a valid build result.
    #[error("{path} is not a valid build result")]
    BadResult {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// One build as listed.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its id.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its result, or `None` while it runs.
    pub result: Option<BuildResult>,
}

/// All builds of the project whose store is `store_root`, oldest first.
pub fn list(store_root: &Path) -> Result<Vec<Record>, RecordError> {
    let builds = store_root.join("builds");
    let entries = match std::fs::read_dir(&builds) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RecordError::Read {
                path: builds,
                source,
            })
        }
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids.into_iter()
        .map(|id| open(store_root, Some(&id)))
        .collect()
}

/// The build `id`, or the newest one.
pub fn open(store_root: &Path, id: Option<&str>) -> Result<Record, RecordError> {
    let builds = store_root.join("builds");
    let id = match id {
        Some(id) => id.to_string(),
        None => {
            let mut newest = None;
            if let Ok(entries) = std::fs::read_dir(&builds) {
                newest = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .max();
            }
            newest.ok_or_else(|| RecordError::NoBuilds(store_root.to_path_buf()))?
        }
    };
    let dir = builds.join(&id);
    if id.contains('/') || id.starts_with('.') || !dir.is_dir() {
        return Err(RecordError::NoSuchBuild { id, dir: builds });
    }
    let path = dir.join("result.json");
    let result = match contractor_protocol::file::read_regular_if_exists(&path, MAX_RESULT_BYTES) {
        Ok(Some(text)) => Some(
            serde_json::from_slice(&text)
                .map_err(|source| RecordError::BadResult { path, source })?,
        ),
        Ok(None) => None,
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    Ok(Record { id, dir, result })
}

/// Most bytes of a `result.json` read back (ours have a few KiB; error chains are capped).
pub const MAX_RESULT_BYTES: u64 = 1 << 20;

/// Most bytes of a record's file read back whole: a log is at most `build.max_log` plus
/// its cut marker, and `build.max_log` is at most this.
pub const MAX_RECORD_FILE_BYTES: u64 = 16 << 30;

/// A file of a record, as bytes (logs are printed exactly as written). Only a regular
/// file is opened (never a link or a FIFO a project may have shipped in `.contractor`).
pub fn read_file(record: &Record, name: &str) -> Result<Vec<u8>, RecordError> {
    read_file_capped(record, name, MAX_RECORD_FILE_BYTES)
}

/// The file `name` of `record`, which must be a regular file of at most `limit` bytes.
pub fn read_file_capped(record: &Record, name: &str, limit: u64) -> Result<Vec<u8>, RecordError> {
    let path = record.dir.join(name);
    contractor_protocol::file::read_regular(&path, limit)
        .map_err(|source| RecordError::Read { path, source })
}

pub use contractor_protocol::file::MAX_DOWNLOADS_FILE;

/// Most bytes of a record's `artifacts.json` read back (an entry is about 150 bytes; the
/// store indexes at most what a build may upload).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The store directory and build id of the record directory `record`
/// (`<store>/builds/<id>`).
fn store_and_id(record: &Path) -> (&Path, &std::ffi::OsStr) {
    let root = record
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    (root, record.file_name().unwrap_or_default())
}

/// Asks the store to open the record of a new build under `store_root`
/// (`contractor-store record open`: abandoned records closed, the directory made, owned by
/// this process, `latest` pointed at it) with the id `id` (else a new one); returns its id.
pub fn open_new(store_root: &Path, id: Option<&str>) -> Result<String, ToolError> {
    let owner = std::process::id().to_string();
    let mut args = vec![
        OsStr::new("record"),
        OsStr::new("open"),
        OsStr::new("--root"),
        store_root.as_os_str(),
        OsStr::new("--owner"),
        OsStr::new(&owner),
    ];
    if let Some(id) = id {
        args.extend([OsStr::new("--id"), OsStr::new(id)]);
    }
    let opened: RecordOpened = tools::answer(tools::STORE, &args)?;
    Ok(opened.id)
}

/// How a build ended, as the front end decided it: what `record close` is told.
pub struct Ended<'a> {
    /// When it started.
    pub started: std::time::SystemTime,
    /// `[build] artifacts`: a success that stored none of one is failed.
    pub artifacts: &'a [String],
    /// Its outcome, exit code, limit and error.
    pub outcome: Outcome,
    /// The script's exit code.
    pub exit_code: Option<i32>,
    /// The limit it hit.
    pub limit: Option<Limit>,
    /// What went wrong.
    pub error: Option<&'a ErrorInfo>,
}

/// Asks the store to close `record` (`contractor-store record close`: the artifacts indexed,
/// each declared one checked, the proxy's refusals tallied, `result.json` written, the owner
/// removed) with the end `ended`; returns the result written.
pub fn close(record: &Path, ended: &Ended) -> Result<BuildResult, ToolError> {
    let (root, id) = store_and_id(record);
    let started = ended
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        .to_string();
    let mut command = tools::command(tools::STORE)?;
    command
        .args(["record", "close", "--root"])
        .arg(root)
        .arg("--build")
        .arg(id)
        .args([
            "--started",
            &started,
            "--outcome",
            &wire_name(ended.outcome),
        ]);
    // `--flag=VALUE`: a value may begin with `-` (a guest's error message).
    for pattern in ended.artifacts {
        command.arg(format!("--artifact={pattern}"));
    }
    if let Some(exit_code) = ended.exit_code {
        command.args(["--exit-code", &exit_code.to_string()]);
    }
    if let Some(limit) = ended.limit {
        command.args(["--limit", &wire_name(limit)]);
    }
    if let Some(error) = ended.error {
        command.arg(format!("--error-code={}", error.code));
        for message in &error.chain {
            command.arg(format!("--error={message}"));
        }
    }
    let closed: RecordClosed = tools::answer_of(tools::STORE, command)?;
    Ok(closed.result)
}

/// An outcome's or a limit's name on the wire (`"interrupted"`, `"max_log"`).
fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// The artifacts of `record` as the store's index (`artifacts.json`, at most
/// [`MAX_INDEX_BYTES`], a regular file) names them, sorted: each a path beneath
/// `artifacts/` of plain names. None when there is no readable index.
pub fn stored_artifacts(record: &Path) -> Vec<PathBuf> {
    #[derive(serde::Deserialize)]
    struct Index {
        artifacts: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        path: String,
    }
    let path = record.join("artifacts.json");
    let Ok(bytes) = contractor_protocol::file::read_regular(&path, MAX_INDEX_BYTES) else {
        return Vec::new();
    };
    let Ok(index) = serde_json::from_slice::<Index>(&bytes) else {
        return Vec::new();
    };
    let dir = record.join("artifacts");
    let mut found: Vec<PathBuf> = index
        .artifacts
        .into_iter()
        .map(|a| PathBuf::from(a.path))
        .filter(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .map(|p| dir.join(p))
        .collect();
    found.sort();
    found
}

/// Asks the store to close every abandoned record under `store_root`
/// (`contractor-store record close-abandoned`: the store alone decides which builds still
/// run); returns the ids it closed.
pub fn close_abandoned(store_root: &Path) -> Result<Vec<String>, ToolError> {
    let closed: RecordsClosed = tools::answer(
        tools::STORE,
        &[
            OsStr::new("record"),
            OsStr::new("close-abandoned"),
            OsStr::new("--root"),
            store_root.as_os_str(),
        ],
    )?;
    Ok(closed.closed)
}

/// When a build started, from its id (`20261125-141502-3fa2c1` → `2026-11-25 14:15:02`).
pub fn started(id: &str) -> String {
    let digits: Vec<&str> = id.splitn(3, '-').collect();
    match digits.as_slice() {
        [date, time, _] if date.len() == 8 && time.len() == 6 => format!(
            "{}-{}-{} {}:{}:{}",
            &date[0..4],
            &date[4..6],
            &date[6..8],
            &time[0..2],
            &time[2..4],
            &time[4..6]
        ),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contractor_protocol::result::Outcome;

    fn write_record(store: &Path, id: &str, outcome: Option<Outcome>) {
        let dir = store.join("builds").join(id);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("build.log"), format!("log of {id}\n")).expect("log");
        if let Some(outcome) = outcome {
            let result = BuildResult {
                version: 1,
                id: id.into(),
                outcome,
                exit_code: Some(0),
                duration_secs: 1.5,
                log: dir.join("build.log"),
                console_log: dir.join("console.log"),
                artifacts: vec![],
                refused_hosts: vec![],
                refused_offline: vec![],
                upstream_failures: vec![],
                limit: None,
                error: None,
                host: None,
            };
            std::fs::write(
                dir.join("result.json"),
                serde_json::to_string(&result).expect("json"),
            )
            .expect("result");
        }
    }

    #[test]
    fn lists_oldest_first_and_opens_the_newest_by_default() {
        let store = tempfile::tempdir().expect("tempdir");
        write_record(
            store.path(),
            "20261125-100000-aaaaaa",
            Some(Outcome::Success),
        );
        write_record(
            store.path(),
            "20261125-110000-bbbbbb",
            Some(Outcome::Failed),
        );
        write_record(store.path(), "20261125-120000-cccccc", None);
        let records = list(store.path()).expect("list");
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "20261125-100000-aaaaaa",
                "20261125-110000-bbbbbb",
                "20261125-120000-cccccc"
            ]
        );
        assert_eq!(
            records[1].result.as_ref().map(|r| r.outcome),
            Some(Outcome::Failed)
        );
        assert!(
            records[2].result.is_none(),
            "a running build has no result yet"
        );
        let newest = open(store.path(), None).expect("newest");
        assert_eq!(newest.id, "20261125-120000-cccccc");
        assert_eq!(
            read_file(&newest, "build.log").expect("log"),
            b"log of 20261125-120000-cccccc\n"
        );
    }

    #[test]
    fn artifacts_are_what_the_stores_index_names() {
        let store = tempfile::tempdir().expect("tempdir");
        let record = store.path().join("builds/20261125-100000-aaaaaa");
        std::fs::create_dir_all(record.join("artifacts/bin")).expect("mkdir");
        std::fs::write(record.join("artifacts/bin/tool"), "x").expect("write");
        std::fs::write(record.join("artifacts/a.txt"), "x").expect("write");
        assert_eq!(
            stored_artifacts(&record),
            Vec::<PathBuf>::new(),
            "no index yet"
        );
        std::fs::write(
            record.join("artifacts.json"),
            r#"{"version":1,"build":"b","artifacts":[{"path":"bin/tool"},{"path":"a.txt"}]}"#,
        )
        .expect("index");
        assert_eq!(
            stored_artifacts(&record),
            [
                record.join("artifacts/a.txt"),
                record.join("artifacts/bin/tool")
            ]
        );
        // What the index names is what is listed: a file it does not name is not walked to,
        // and a path that would leave artifacts/ is dropped.
        std::fs::write(record.join("artifacts/later"), "x").expect("write");
        std::fs::write(
            record.join("artifacts.json"),
            r#"{"version":1,"build":"b","artifacts":[{"path":"a.txt"},{"path":"../../x"},{"path":"/etc/passwd"}]}"#,
        )
        .expect("index");
        assert_eq!(stored_artifacts(&record), [record.join("artifacts/a.txt")]);
        // Only a regular file is read.
        std::fs::remove_file(record.join("artifacts.json")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", record.join("artifacts.json")).expect("link");
        assert_eq!(stored_artifacts(&record), Vec::<PathBuf>::new());
    }

    #[test]
    fn unknown_ids_and_empty_projects_say_what_to_do() {
        let store = tempfile::tempdir().expect("tempdir");
        let err = open(store.path(), None).expect_err("no builds");
        assert!(
            err.to_string().contains("run `contractor build` first"),
            "{err}"
        );
        write_record(store.path(), "20261125-100000-aaaaaa", None);
        for id in ["nope", "../builds", ".hidden"] {
            let err = open(store.path(), Some(id)).expect_err(id);
            assert!(
                err.to_string().contains("`contractor builds` lists them"),
                "{err}"
            );
        }
        assert_eq!(started("20261125-100000-aaaaaa"), "2026-11-25 10:00:00");
    }
}
