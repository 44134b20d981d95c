//! Records kept beside the files: each build's artifact index (`artifacts.json`) and garbage
//! collection of old builds and unreferenced blobs in the content-addressed area.
//!
//! Whether a build still runs is decided here, by one rule ([`liveness`]), for garbage
//! collection and for closing abandoned records ([`close_abandoned`], which the front end
//! asks for before each build): a record with `result.json` is finished; one whose
//! `owner.json` names a process is running exactly while that process lives (pid and start
//! time), however long it has been quiet; one without either (a record a script made, or
//! one being created) is running while it changed within [`RUNNING_WINDOW`].
//!
//! The invariant: garbage collection never removes a build that is running, nor a blob that a
//! remaining build's `artifacts.json` names, that is hard-linked elsewhere, or that is
//! younger than [`RUNNING_WINDOW`]. Indexes are written to a temporary file and renamed into
//! place, so a reader sees the old index or the new one, never half of one.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use contractor_protocol::process::Owner;
use contractor_protocol::result::{BuildCode, BuildResult, ErrorInfo, Outcome};
use serde::{Deserialize, Serialize};

use crate::digest::hash_file;
use crate::files::TEMP_PREFIX;
use crate::path::is_build_id;

/// A build without `result.json` and without an owner that changed this recently counts as
/// running (see [`liveness`]).
pub const RUNNING_WINDOW: Duration = Duration::from_secs(3600);

/// The name of a build's artifact index, in `builds/<id>/`.
pub const ARTIFACT_INDEX: &str = "artifacts.json";

/// Why a record could not be written or garbage collected.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The build id is not valid.
    #[error("build id {0:?} is not valid; use A-Z a-z 0-9 . _ - only")]
    BadBuildId(String),
    /// The build does not exist.
    #[error("build {id} does not exist: {path} is not a directory")]
    NoSuchBuild {
        /// The build id.
        id: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Neither `keep` nor `older_than` was given.
    #[error("say which builds to remove: give --keep N, --older-than AGE, or both")]
    NoCriterion,
    /// The file system failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |source| RecordError::Io {
        action,
        path,
        source,
    }
}

/// `builds/<id>/artifacts.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactIndex {
    /// Format version: 1.
    pub version: u32,
    /// The build id.
    pub build: String,
    /// Every artifact, sorted by path.
    pub artifacts: Vec<ArtifactRecord>,
}

/// One artifact in an [`ArtifactIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRecord {
    /// Path beneath `artifacts/`, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// Whether the file is executable (mode 0755).
    pub executable: bool,
}

/// Hashes every regular file under `builds/<id>/artifacts/` (symlinks and upload temporary
/// files are left out) and writes `builds/<id>/artifacts.json` atomically. A build with no
/// `artifacts/` directory gets an empty index. Blocking.
pub fn write_artifact_index(root: &Path, id: &str) -> Result<ArtifactIndex, RecordError> {
    if !is_build_id(id) {
        return Err(RecordError::BadBuildId(id.to_string()));
    }
    let build = root.join("builds").join(id);
    match std::fs::symlink_metadata(&build) {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(RecordError::NoSuchBuild {
                id: id.to_string(),
                path: build,
            })
        }
    }
    let mut artifacts = Vec::new();
    collect_artifacts(&build.join("artifacts"), "", &mut artifacts)?;
    artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    let index = ArtifactIndex {
        version: 1,
        build: id.to_string(),
        artifacts,
    };
    let destination = build.join(ARTIFACT_INDEX);
    let temp = build.join(format!("{TEMP_PREFIX}index-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        serde_json::to_writer_pretty(&mut file, &index).map_err(io::Error::other)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, &destination)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io_error("write", &destination)(e));
    }
    Ok(index)
}

fn collect_artifacts(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ArtifactRecord>,
) -> Result<(), RecordError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound && prefix.is_empty() => return Ok(()),
        Err(e) => return Err(io_error("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let metadata = std::fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?;
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if metadata.is_dir() {
            collect_artifacts(&path, &relative, out)?;
        } else if metadata.is_file() {
            let (digest, size) = hash_file(&path).map_err(io_error("hash", &path))?;
            out.push(ArtifactRecord {
                path: relative,
                size,
                sha256: digest.to_hex(),
                executable: metadata.permissions().mode() & 0o111 != 0,
            });
        }
    }
    Ok(())
}

/// Whether a build still runs, by the one rule of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It has a `result.json`.
    Finished,
    /// Its owner lives, or, without one, it changed within [`RUNNING_WINDOW`].
    Running,
    /// Neither: the process that ran it is gone (its pid, when `owner.json` named one).
    Abandoned {
        /// The owner's pid, when the record named one.
        owner: Option<u32>,
    },
}

/// Whether the build whose record is `build` is finished, running or abandoned at `now`:
/// `result.json` (of any kind, never followed) means finished; else a readable
/// `owner.json` decides by its process alone; else the record's newest change, against
/// [`RUNNING_WINDOW`].
pub fn liveness(build: &Path, now: SystemTime) -> Liveness {
    if std::fs::symlink_metadata(build.join("result.json")).is_ok() {
        return Liveness::Finished;
    }
    let owner_file = build.join(contractor_protocol::process::OWNER_FILE);
    match contractor_protocol::file::read_regular(
        &owner_file,
        contractor_protocol::process::MAX_OWNER_BYTES,
    ) {
        Ok(text) => match serde_json::from_slice::<Owner>(&text) {
            Ok(owner) if owner.is_alive() => Liveness::Running,
            Ok(owner) => Liveness::Abandoned {
                owner: Some(owner.pid),
            },
            // An owner file that names no process names no live one.
            Err(_) => Liveness::Abandoned { owner: None },
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if age(now, newest_change(build)) < RUNNING_WINDOW {
                Liveness::Running
            } else {
                Liveness::Abandoned { owner: None }
            }
        }
        // Not a regular file, too big, unreadable: not an owner the store can check.
        Err(_) => Liveness::Abandoned { owner: None },
    }
}

/// Gives every abandoned build under `root/builds/` ([`liveness`]) a `result.json` saying it
/// was interrupted (code `abandoned`), listing its artifacts from the index written for it,
/// and removes its `owner.json`. Returns the ids closed, sorted. Blocking.
pub fn close_abandoned(root: &Path, now: SystemTime) -> Result<Vec<String>, RecordError> {
    let builds_dir = root.join("builds");
    let entries = match std::fs::read_dir(&builds_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", &builds_dir)(e)),
    };
    let mut closed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", &builds_dir))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        // Only real directories: what a project ships there is never followed.
        if !is_build_id(&id) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let Liveness::Abandoned { owner } = liveness(&path, now) else {
            continue;
        };
        let index = write_artifact_index(root, &id)?;
        let why = match owner {
            Some(pid) => format!(
                "the contractor process (pid {pid}) ended before the build finished; libvirt destroyed its VM"
            ),
            None => format!(
                "no live process owns the record and it has not changed for {} minutes: the build that made it ended",
                RUNNING_WINDOW.as_secs() / 60
            ),
        };
        let result = BuildResult {
            version: contractor_protocol::PROTOCOL_VERSION,
            id: id.clone(),
            outcome: Outcome::Interrupted,
            exit_code: None,
            duration_secs: 0.0,
            log: path.join("build.log"),
            console_log: path.join("console.log"),
            artifacts: index
                .artifacts
                .iter()
                .map(|a| path.join("artifacts").join(&a.path))
                .collect(),
            refused_hosts: Vec::new(),
            refused_offline: Vec::new(),
            upstream_failures: Vec::new(),
            limit: None,
            error: Some(ErrorInfo {
                code: BuildCode::Abandoned.as_str().into(),
                chain: vec![why],
            }),
            host: None,
        };
        let result_path = path.join("result.json");
        let written = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&result_path)?;
            serde_json::to_writer_pretty(&mut file, &result).map_err(io::Error::other)?;
            file.write_all(b"\n")
        })();
        written.map_err(io_error("write", &result_path))?;
        let _ = std::fs::remove_file(path.join(contractor_protocol::process::OWNER_FILE));
        closed.push(id);
    }
    closed.sort();
    Ok(closed)
}

/// What [`collect_garbage`] removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Keep at least the newest N finished builds.
    pub keep: Option<usize>,
    /// Remove only builds older than this.
    pub older_than: Option<Duration>,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// The present (a parameter so tests can move it).
    pub now: SystemTime,
}

/// What [`collect_garbage`] did, printed as one JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcSummary {
    /// Always `"gc"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Format version: 1.
    pub version: u32,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Builds removed (or that would be), oldest first.
    pub removed_builds: Vec<String>,
    /// Builds kept, newest first (running ones included).
    pub kept_builds: Vec<String>,
    /// Builds that look like they are running, and so were kept.
    pub running_builds: Vec<String>,
    /// Blobs removed from `cas/sha256/`.
    pub removed_blobs: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
}

struct BuildDir {
    id: String,
    path: PathBuf,
    /// When the build finished (result.json's mtime) or last changed.
    time: SystemTime,
}

/// Removes old builds and unreferenced blobs beneath `root`. Builds are ranked by when they
/// finished (`result.json`'s mtime) or, unfinished, when they last changed. A build is
/// removed when it is not among the newest `keep` (if given) and older than `older_than` (if
/// given), unless it is running. Then every blob in `cas/sha256/` that no remaining build's
/// `artifacts.json` names, that has no other hard link, and that is older than
/// [`RUNNING_WINDOW`] is removed. Blocking.
pub fn collect_garbage(root: &Path, options: &GcOptions) -> Result<GcSummary, RecordError> {
    if options.keep.is_none() && options.older_than.is_none() {
        return Err(RecordError::NoCriterion);
    }
    let mut summary = GcSummary {
        kind: "gc".into(),
        version: 1,
        dry_run: options.dry_run,
        removed_builds: Vec::new(),
        kept_builds: Vec::new(),
        running_builds: Vec::new(),
        removed_blobs: Vec::new(),
        freed_bytes: 0,
    };
    let builds_dir = root.join("builds");
    let mut builds = read_builds(&builds_dir)?;
    builds.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));
    let mut rank = 0usize;
    let mut referenced = HashSet::new();
    let mut removed = Vec::new();
    for build in builds {
        let running = liveness(&build.path, options.now) == Liveness::Running;
        if running {
            summary.running_builds.push(build.id.clone());
            summary.kept_builds.push(build.id.clone());
            read_references(&build.path, &mut referenced);
            continue;
        }
        let beyond_keep = options.keep.is_none_or(|keep| rank >= keep);
        let old_enough = options
            .older_than
            .is_none_or(|limit| age(options.now, build.time) >= limit);
        rank += 1;
        if beyond_keep && old_enough {
            removed.push(build);
        } else {
            read_references(&build.path, &mut referenced);
            summary.kept_builds.push(build.id);
        }
    }
    removed.reverse();
    for build in removed {
        summary.freed_bytes += tree_bytes(&build.path);
        if !options.dry_run {
            std::fs::remove_dir_all(&build.path).map_err(io_error("remove", &build.path))?;
        }
        summary.removed_builds.push(build.id);
    }

    let blobs_dir = root.join("cas").join("sha256");
    let entries = match std::fs::read_dir(&blobs_dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("list", &blobs_dir)(e)),
    };
    for entry in entries.into_iter().flatten() {
        let entry = entry.map_err(io_error("list", &blobs_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let young = metadata
            .modified()
            .map_or(true, |t| age(options.now, t) < RUNNING_WINDOW);
        if !metadata.is_file() || young || metadata.nlink() > 1 || referenced.contains(&name) {
            continue;
        }
        if !options.dry_run {
            std::fs::remove_file(&path).map_err(io_error("remove", &path))?;
        }
        summary.freed_bytes += metadata.len();
        summary.removed_blobs.push(name);
    }
    summary.removed_blobs.sort();
    Ok(summary)
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}

fn read_builds(builds_dir: &Path) -> Result<Vec<BuildDir>, RecordError> {
    let entries = match std::fs::read_dir(builds_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", builds_dir)(e)),
    };
    let mut builds = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", builds_dir))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !metadata.is_dir() || !is_build_id(&id) {
            continue;
        }
        let last_change = newest_change(&path);
        let result = std::fs::symlink_metadata(path.join("result.json")).ok();
        let finished = result.as_ref().is_some_and(std::fs::Metadata::is_file);
        let time = result
            .and_then(|m| m.modified().ok())
            .filter(|_| finished)
            .unwrap_or(last_change);
        builds.push(BuildDir { id, path, time });
    }
    Ok(builds)
}

/// The newest mtime of `path` and everything beneath it (not following symlinks).
fn newest_change(path: &Path) -> SystemTime {
    let mut newest = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let child = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let time = if is_dir {
                newest_change(&child)
            } else {
                std::fs::symlink_metadata(&child)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            };
            newest = newest.max(time);
        }
    }
    newest
}

/// Bytes of regular files beneath `path`.
fn tree_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match std::fs::symlink_metadata(entry.path()) {
            Ok(m) if m.is_dir() => tree_bytes(&entry.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// Adds the digests a build's `artifacts.json` names to `referenced`.
fn read_references(build: &Path, referenced: &mut HashSet<String>) {
    let Ok(text) = std::fs::read_to_string(build.join(ARTIFACT_INDEX)) else {
        return;
    };
    if let Ok(index) = serde_json::from_str::<ArtifactIndex>(&text) {
        referenced.extend(index.artifacts.into_iter().map(|a| a.sha256));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lists_every_artifact_with_its_digest() {
        let dir = tempfile::tempdir().expect("dir");
        let artifacts = dir.path().join("builds/b1/artifacts");
        std::fs::create_dir_all(artifacts.join("bin")).expect("mkdir");
        std::fs::write(artifacts.join("bin/tool"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            artifacts.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::fs::write(artifacts.join("a.txt"), b"hello").expect("write");
        std::fs::write(artifacts.join(format!("{TEMP_PREFIX}1")), b"partial").expect("write");
        let index = write_artifact_index(dir.path(), "b1").expect("index");
        let paths: Vec<_> = index.artifacts.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "bin/tool"]);
        assert_eq!(
            index.artifacts[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(index.artifacts[0].size, 5);
        assert!(!index.artifacts[0].executable && index.artifacts[1].executable);
        let on_disk: ArtifactIndex = serde_json::from_slice(
            &std::fs::read(dir.path().join("builds/b1/artifacts.json")).expect("read"),
        )
        .expect("json");
        assert_eq!(on_disk, index);
    }

    #[test]
    fn index_refuses_bad_or_missing_builds() {
        let dir = tempfile::tempdir().expect("dir");
        let err = write_artifact_index(dir.path(), "../x").expect_err("bad id");
        assert!(err.to_string().contains("\"../x\""), "{err}");
        let err = write_artifact_index(dir.path(), "nope").expect_err("missing");
        assert!(
            err.to_string().contains("build nope does not exist"),
            "{err}"
        );
        std::fs::create_dir_all(dir.path().join("builds/empty")).expect("mkdir");
        let index = write_artifact_index(dir.path(), "empty").expect("empty build");
        assert!(index.artifacts.is_empty());
    }

    #[test]
    fn gc_needs_a_criterion() {
        let dir = tempfile::tempdir().expect("dir");
        let options = GcOptions {
            keep: None,
            older_than: None,
            dry_run: false,
            now: SystemTime::now(),
        };
        let err = collect_garbage(dir.path(), &options).expect_err("no criterion");
        assert!(err.to_string().contains("--keep"), "{err}");
    }
}
