//! Reading build records back for the front end (`contractor builds|show|log|downloads|pin`,
//! and the record `contractor shell ID` and `contractor rebuild` start from):
//! `contractor-store record list|show|downloads|log`.
//!
//! The invariant: only what lies beneath `ROOT/builds/` is read, and only as this module
//! opens it: a build id is checked before it names a directory, a record directory is a
//! real directory (never a link), every file is opened as a regular file without following
//! a link in its last component (`contractor_protocol::file::open_regular`), and each read is
//! bounded (the `MAX_*` constants). The binary confines itself to `ROOT/builds/`, read-only,
//! before it calls anything here.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use contractor_protocol::error::ToolCode;
use contractor_protocol::proxy::Download;
use contractor_protocol::result::BuildResult;
use contractor_protocol::store::{
    KeptVm, RecordDownloads, RecordDownloadsTag, RecordEntry, RecordEntryTag, RecordLog,
    RecordLogTag, RecordShown, RecordShownTag, ShownArtifact, KEPT_VM_FILE, MAX_KEPT_VM_BYTES,
};
use contractor_protocol::PROTOCOL_VERSION;

use crate::path::is_build_id;
use crate::records::{ArtifactIndex, ARTIFACT_INDEX};

/// Most builds `record list` lists (the newest ones; the others are counted as left out).
pub const MAX_LISTED_BUILDS: usize = 100_000;

/// Most bytes of a `result.json` read back (ours have a few KiB; error chains are capped).
pub const MAX_RESULT_BYTES: u64 = 1 << 20;

/// Most bytes of a record's `artifacts.json` read back (an entry is about 150 bytes; the
/// store indexes at most what a build may upload).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Most bytes of a log `record log` sends: a log is at most `build.max_log` plus its cut
/// marker, and `build.max_log` is at most this.
pub const MAX_LOG_BYTES: u64 = 16 << 30;

/// Most lines `record log --tail` sends.
pub const MAX_TAIL_LINES: u32 = 1000;

/// Most bytes of the end of a log that `record log --tail` reads to find its last lines: a
/// line that begins before them is sent from within.
pub const TAIL_WINDOW_BYTES: u64 = 64 << 10;

pub use contractor_protocol::file::MAX_DOWNLOADS_FILE;

/// Why a record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `--build` is not a build id.
    #[error(
        "build id {0:?} is not valid (A-Z a-z 0-9 . _ - only); `contractor builds` lists them"
    )]
    BadBuildId(String),
    /// The store has no builds yet.
    #[error("no builds in {0} yet; run `contractor build` first")]
    NoBuilds(PathBuf),
    /// No record has this id.
    #[error("no build {id:?} in {dir}; `contractor builds` lists them")]
    NoSuchBuild {
        /// The id asked for.
        id: String,
        /// Where it was looked for (`ROOT/builds`).
        dir: PathBuf,
    },
    /// `--kept-vm`: the record has no kept VM.
    #[error(
        "build {id} has no kept VM ({} is missing): run `contractor build --keep`, or \
         `contractor shell` without an id for a fresh VM",
        file.display()
    )]
    NotKept {
        /// The build id.
        id: String,
        /// The file that would name the VM.
        file: PathBuf,
    },
    /// A file or directory of the record could not be read (a link, a FIFO, too big, ...).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
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

impl ReadError {
    /// The error object's code.
    pub fn code(&self) -> ToolCode {
        match self {
            ReadError::BadBuildId(_) => ToolCode::BadBuild,
            ReadError::NoBuilds(_) => ToolCode::NoBuilds,
            ReadError::NoSuchBuild { .. } => ToolCode::NoSuchBuild,
            ReadError::NotKept { .. } => ToolCode::NoKeptVm,
            ReadError::Read { .. } | ReadError::BadResult { .. } => ToolCode::RecordRead,
        }
    }

    /// True when the caller asked for a build that is not there (exit 2); false when a
    /// record that is there cannot be read (exit 3).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ReadError::BadBuildId(_)
                | ReadError::NoBuilds(_)
                | ReadError::NoSuchBuild { .. }
                | ReadError::NotKept { .. }
        )
    }
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> ReadError {
    let path = path.to_path_buf();
    move |source| ReadError::Read { path, source }
}

/// The ids of the records under `root/builds/`, sorted (oldest first): valid build ids of
/// real directories only.
fn ids(root: &Path) -> Result<Vec<String>, ReadError> {
    let builds = root.join("builds");
    let entries = match std::fs::read_dir(&builds) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(&builds)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read_error(&builds))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        if is_build_id(&id) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// The record `id` (checked), or the newest one: its id and directory.
pub fn resolve(root: &Path, id: Option<&str>) -> Result<(String, PathBuf), ReadError> {
    let builds = root.join("builds");
    let id = match id {
        Some(id) if !is_build_id(id) => return Err(ReadError::BadBuildId(id.to_string())),
        Some(id) => id.to_string(),
        None => ids(root)?
            .pop()
            .ok_or_else(|| ReadError::NoBuilds(root.to_path_buf()))?,
    };
    let dir = builds.join(&id);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Ok((id, dir)),
        Ok(m) if m.file_type().is_symlink() => Err(ReadError::Read {
            path: dir,
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a symbolic link, not a record directory",
            ),
        }),
        _ => Err(ReadError::NoSuchBuild { id, dir: builds }),
    }
}

/// The `result.json` of the record `dir`; `None` while the build runs.
pub fn result(dir: &Path) -> Result<Option<BuildResult>, ReadError> {
    let path = dir.join("result.json");
    match contractor_protocol::file::read_regular_if_exists(&path, MAX_RESULT_BYTES) {
        Ok(Some(text)) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| ReadError::BadResult { path, source }),
        Ok(None) => Ok(None),
        Err(source) => Err(ReadError::Read { path, source }),
    }
}

/// `record list`: every build (at most the newest [`MAX_LISTED_BUILDS`]), oldest first, and
/// how many older ones were left out.
pub fn list(root: &Path) -> Result<(Vec<RecordEntry>, u64), ReadError> {
    let mut ids = ids(root)?;
    let left_out = ids.len().saturating_sub(MAX_LISTED_BUILDS);
    ids.drain(..left_out);
    let builds = root.join("builds");
    let entries = ids
        .into_iter()
        .map(|id| {
            let result = result(&builds.join(&id))?;
            Ok(RecordEntry {
                kind: RecordEntryTag::RecordEntry,
                started: started(&id),
                outcome: result.as_ref().map(|r| r.outcome),
                duration_secs: result.as_ref().map(|r| r.duration_secs),
                id,
            })
        })
        .collect::<Result<Vec<_>, ReadError>>()?;
    Ok((entries, left_out as u64))
}

/// `record show`: the record `id` (the newest): its result, each artifact the result names
/// with its size and SHA-256 (from `artifacts.json` when it names the file with that size,
/// else hashed here), and the tally of its downloads (none when they cannot be read); with
/// `kept`, its kept VM, which it must have.
pub fn show(root: &Path, id: Option<&str>, kept: bool) -> Result<RecordShown, ReadError> {
    let (id, dir) = resolve(root, id)?;
    let result = result(&dir)?;
    let kept_vm = kept.then(|| kept_vm(&id, &dir)).transpose()?;
    let index = artifact_index(&dir);
    let artifacts = match &result {
        Some(result) => result
            .artifacts
            .iter()
            .map(|path| shown_artifact(&dir, path, &index))
            .collect(),
        None => indexed_artifacts(&dir, index),
    };
    let (downloads, from_cache) = match downloads_of(&dir) {
        Ok((downloads, _)) => (
            downloads.len() as u64,
            downloads.iter().filter(|d| d.from_cache).count() as u64,
        ),
        Err(_) => (0, 0),
    };
    Ok(RecordShown {
        kind: RecordShownTag::RecordShown,
        version: PROTOCOL_VERSION,
        started: started(&id),
        id,
        dir,
        result,
        artifacts,
        downloads,
        from_cache,
        kept_vm,
    })
}

/// The kept VM of the record `dir` (build `id`): its `vm.json`, a regular file of at most
/// [`MAX_KEPT_VM_BYTES`]; a record without one is [`ReadError::NotKept`].
fn kept_vm(id: &str, dir: &Path) -> Result<KeptVm, ReadError> {
    let path = dir.join(KEPT_VM_FILE);
    match contractor_protocol::file::read_regular_if_exists(&path, MAX_KEPT_VM_BYTES) {
        Ok(Some(text)) => serde_json::from_slice(&text).map_err(|e| ReadError::Read {
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        }),
        Ok(None) => Err(ReadError::NotKept {
            id: id.to_string(),
            file: path,
        }),
        Err(source) => Err(ReadError::Read { path, source }),
    }
}

/// The size and digest of each file `artifacts.json` names, by its path beneath
/// `artifacts/`; empty without a readable index.
fn artifact_index(dir: &Path) -> HashMap<String, (u64, String)> {
    let index = contractor_protocol::file::read_regular(&dir.join(ARTIFACT_INDEX), MAX_INDEX_BYTES)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ArtifactIndex>(&bytes).ok());
    index
        .map(|index| {
            index
                .artifacts
                .into_iter()
                .map(|a| (a.path, (a.size, a.sha256)))
                .collect()
        })
        .unwrap_or_default()
}

/// The artifacts of a record without a result (one received from a build host, not closed
/// yet) as its index names them, sorted: each beneath `artifacts/`, reached by plain names
/// (an index entry that would leave it is left out).
fn indexed_artifacts(dir: &Path, index: HashMap<String, (u64, String)>) -> Vec<ShownArtifact> {
    let artifacts = dir.join("artifacts");
    let mut shown: Vec<ShownArtifact> = index
        .into_iter()
        .filter(|(path, _)| {
            Path::new(path)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        })
        .map(|(path, (size, sha256))| ShownArtifact {
            path: artifacts.join(path),
            size: Some(size),
            sha256: Some(sha256),
        })
        .collect();
    shown.sort_by(|a, b| a.path.cmp(&b.path));
    shown
}

/// What is at the artifact `path` of a result: only a regular file beneath the record's
/// `artifacts/`, reached by plain names; anything else is missing.
fn shown_artifact(
    dir: &Path,
    path: &Path,
    index: &HashMap<String, (u64, String)>,
) -> ShownArtifact {
    let missing = ShownArtifact {
        path: path.to_path_buf(),
        size: None,
        sha256: None,
    };
    let artifacts = dir.join("artifacts");
    let canonical = artifacts.canonicalize().ok();
    let relative = path
        .strip_prefix(&artifacts)
        .ok()
        .or_else(|| canonical.as_deref().and_then(|c| path.strip_prefix(c).ok()));
    let Some(relative) = relative.filter(|r| {
        r.components().next().is_some() && r.components().all(|c| matches!(c, Component::Normal(_)))
    }) else {
        return missing;
    };
    let file = artifacts.join(relative);
    let Ok(opened) = contractor_protocol::file::open_regular(&file) else {
        return missing;
    };
    let Ok(size) = opened.metadata().map(|m| m.len()) else {
        return missing;
    };
    let key = relative.to_string_lossy();
    let sha256 = match index.get(key.as_ref()) {
        Some((indexed, sha256)) if *indexed == size => Some(sha256.clone()),
        _ => crate::digest::hash_reader(opened)
            .ok()
            .map(|(digest, _)| digest.to_hex()),
    };
    ShownArtifact {
        path: path.to_path_buf(),
        size: sha256.as_ref().map(|_| size),
        sha256,
    }
}

/// The download lines of the record `dir`'s `downloads.jsonl` (at most
/// [`MAX_DOWNLOADS_FILE`] bytes), and how many other lines it has.
fn downloads_of(dir: &Path) -> Result<(Vec<Download>, u64), ReadError> {
    let path = dir.join("downloads.jsonl");
    let bytes = contractor_protocol::file::read_regular(&path, MAX_DOWNLOADS_FILE)
        .map_err(read_error(&path))?;
    let mut downloads = Vec::new();
    let mut skipped = 0u64;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Download>(line) {
            Ok(download) => downloads.push(download),
            Err(_) => skipped += 1,
        }
    }
    Ok((downloads, skipped))
}

/// `record downloads`: the record `id`'s (the newest's) downloads, checked and typed, and
/// the first line that says how many follow.
pub fn downloads(
    root: &Path,
    id: Option<&str>,
) -> Result<(RecordDownloads, Vec<Download>), ReadError> {
    let (id, dir) = resolve(root, id)?;
    let (downloads, skipped) = downloads_of(&dir)?;
    Ok((
        RecordDownloads {
            kind: RecordDownloadsTag::RecordDownloads,
            version: PROTOCOL_VERSION,
            id,
            downloads: downloads.len() as u64,
            skipped,
        },
        downloads,
    ))
}

/// `record log`: the record `id`'s (the newest's) `build.log` (`console.log` with
/// `console`), opened as a regular file of at most [`MAX_LOG_BYTES`], and the first line
/// that says how many bytes follow. With `tail`, only its last `tail` lines are sent (at
/// most [`MAX_TAIL_LINES`], found in its last [`TAIL_WINDOW_BYTES`]).
pub fn log(
    root: &Path,
    id: Option<&str>,
    console: bool,
    tail: Option<u32>,
) -> Result<(RecordLog, Box<dyn Read>), ReadError> {
    let (id, dir) = resolve(root, id)?;
    let path = dir.join(if console { "console.log" } else { "build.log" });
    let mut file = contractor_protocol::file::open_regular(&path).map_err(read_error(&path))?;
    let mut bytes = file.metadata().map_err(read_error(&path))?.len();
    if bytes > MAX_LOG_BYTES {
        return Err(ReadError::Read {
            path,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it is bigger than {MAX_LOG_BYTES} bytes"),
            ),
        });
    }
    let body: Box<dyn Read> = match tail {
        None => Box::new(file.take(bytes)),
        Some(lines) => {
            let window = bytes.min(TAIL_WINDOW_BYTES);
            let mut end = Vec::new();
            io::Seek::seek(&mut file, io::SeekFrom::Start(bytes - window))
                .and_then(|_| file.take(window).read_to_end(&mut end))
                .map_err(read_error(&path))?;
            let lines = usize::try_from(lines.min(MAX_TAIL_LINES)).unwrap_or(1);
            let start = end.len() - last_lines(&end, lines).len();
            end.drain(..start);
            bytes = end.len() as u64;
            Box::new(io::Cursor::new(end))
        }
    };
    let header = RecordLog {
        kind: RecordLogTag::RecordLog,
        version: PROTOCOL_VERSION,
        id,
        path,
        bytes,
    };
    Ok((header, body))
}

/// The last `lines` lines of `text`: a last line without its newline counts, and the
/// newline that ends the text begins no other.
fn last_lines(text: &[u8], lines: usize) -> &[u8] {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(lines.saturating_sub(1))
        .map_or(0, |(at, _)| at + 1);
    &text[start..]
}

/// When a build started, from its id (`20261125-141502-3fa2c1` → `2026-11-25 14:15:02`);
/// `None` for an id of another form.
pub fn started(id: &str) -> Option<String> {
    let parts: Vec<&str> = id.splitn(3, '-').collect();
    match parts.as_slice() {
        [date, time, _]
            if date.len() == 8
                && time.len() == 6
                && date.bytes().chain(time.bytes()).all(|b| b.is_ascii_digit()) =>
        {
            Some(format!(
                "{}-{}-{} {}:{}:{}",
                &date[0..4],
                &date[4..6],
                &date[6..8],
                &time[0..2],
                &time[2..4],
                &time[4..6]
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_are_those_the_text_ends_with() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 10), b"a\nb\n");
        assert_eq!(last_lines(b"a\n\n\n", 2), b"\n\n");
        assert_eq!(last_lines(b"", 3), b"");
    }
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
        let (records, left_out) = list(store.path()).expect("list");
        assert_eq!(left_out, 0);
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "20261125-100000-aaaaaa",
                "20261125-110000-bbbbbb",
                "20261125-120000-cccccc"
            ]
        );
        assert_eq!(records[1].outcome, Some(Outcome::Failed));
        assert!(
            records[2].outcome.is_none(),
            "a running build has no result"
        );
        let newest = show(store.path(), None, false).expect("newest");
        assert_eq!(newest.id, "20261125-120000-cccccc");
        let (header, mut body) = log(store.path(), None, false, None).expect("log");
        let mut text = Vec::new();
        body.read_to_end(&mut text).expect("read");
        assert_eq!(text, b"log of 20261125-120000-cccccc\n");
        assert_eq!(header.bytes, text.len() as u64);
        // Its tail: the last lines, found in the log's end, and the count that says so.
        let dir = store.path().join("builds/20261125-120000-cccccc");
        let long = "x".repeat(usize::try_from(TAIL_WINDOW_BYTES).expect("window"));
        std::fs::write(dir.join("console.log"), format!("{long}\nboot\npanic\n")).expect("log");
        let (header, mut body) = log(store.path(), None, true, Some(2)).expect("tail");
        let mut text = Vec::new();
        body.read_to_end(&mut text).expect("read");
        assert_eq!(text, b"boot\npanic\n");
        assert_eq!(header.bytes, text.len() as u64);
        // Fewer lines than asked, in a log longer than the window: from within its first.
        let (_, mut body) = log(store.path(), None, true, Some(5)).expect("tail");
        let mut text = Vec::new();
        body.read_to_end(&mut text).expect("read");
        assert_eq!(text.len() as u64, TAIL_WINDOW_BYTES);
        assert!(text.ends_with(b"x\nboot\npanic\n"));
    }

    #[test]
    fn the_kept_vm_is_read_only_when_asked_and_bounded() {
        let store = tempfile::tempdir().expect("tempdir");
        let id = "20261125-100000-aaaaaa";
        write_record(store.path(), id, Some(Outcome::Failed));
        let file = store.path().join("builds").join(id).join(KEPT_VM_FILE);
        // Not asked: not read, not answered.
        assert_eq!(
            show(store.path(), Some(id), false).expect("show").kept_vm,
            None
        );
        // Asked of a record without one: the user's input, naming the file and what to do.
        let err = show(store.path(), Some(id), true).expect_err("no vm.json");
        assert!(err.is_bad_input());
        assert_eq!(err.code(), ToolCode::NoKeptVm);
        let said = err.to_string();
        assert!(
            said.contains(&format!(
                "build {id} has no kept VM ({} is missing)",
                file.display()
            )) && said.contains("`contractor build --keep`"),
            "{said}"
        );
        let kept = KeptVm {
            name: "contractor-x".into(),
            uri: "qemu:///system".into(),
            control_socket: "/run/x/control.sock".into(),
        };
        std::fs::write(&file, serde_json::to_vec(&kept).expect("json")).expect("vm.json");
        let shown = show(store.path(), Some(id), true).expect("show");
        assert_eq!(shown.kept_vm, Some(kept));
        // What it answers reads back as the protocol's type.
        let line = serde_json::to_string(&shown).expect("json");
        let back: RecordShown = serde_json::from_str(&line).expect("a record_shown line");
        assert_eq!(back, shown);
        // Not valid, too big, or a link: the record cannot be read (exit 3), the file named.
        let too_big = vec![b' '; usize::try_from(MAX_KEPT_VM_BYTES).expect("bound") + 1];
        let cases: [&dyn Fn(); 3] = [
            &|| std::fs::write(&file, b"{\"name\":1}").expect("write"),
            &|| std::fs::write(&file, &too_big).expect("write"),
            &|| {
                std::fs::remove_file(&file).expect("rm");
                std::os::unix::fs::symlink("/etc/hostname", &file).expect("link");
            },
        ];
        for make in cases {
            make();
            let err = show(store.path(), Some(id), true).expect_err("unreadable");
            assert!(!err.is_bad_input(), "{err}");
            assert_eq!(err.code(), ToolCode::RecordRead);
            assert_eq!(err.to_string(), format!("cannot read {}", file.display()));
        }
    }

    #[test]
    fn unknown_ids_and_empty_projects_say_what_to_do() {
        let store = tempfile::tempdir().expect("tempdir");
        let err = show(store.path(), None, false).expect_err("no builds");
        assert!(
            err.to_string().contains("run `contractor build` first"),
            "{err}"
        );
        write_record(store.path(), "20261125-100000-aaaaaa", None);
        for id in ["nope", "../builds", ".hidden"] {
            let err = show(store.path(), Some(id), false).expect_err(id);
            assert!(
                err.to_string().contains("`contractor builds` lists them")
                    && err.to_string().contains(id),
                "{err}"
            );
            assert!(err.is_bad_input());
        }
        assert_eq!(
            started("20261125-100000-aaaaaa").as_deref(),
            Some("2026-11-25 10:00:00")
        );
        assert_eq!(started("nope"), None);
    }
}
