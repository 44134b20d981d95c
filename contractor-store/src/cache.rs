//! `contractor-store cache`: a project's build cache (`[cache] paths`), guest directories
//! kept between builds, in the store directory it belongs to.
//!
//! A cache is one tar per set of paths, `<store>/cache/<key>.tar` (the key is a hash of the
//! paths, so changing them starts a new cache), with `<key>.json` beside it saying which
//! paths, how big and from which build. For a build, [`prepare`] links the tar into the
//! record as `inputs/cache.tar`, which the build's store token may read; after a successful
//! script the agent uploads the new tar as `artifacts/.contractor-cache.tar` (the only place
//! the token may write), and [`keep`] moves it out of the artifacts into the cache directory.
//!
//! The guest may leave anything where its upload goes, and the project may come with
//! anything in `.contractor/cache`: only regular files are ever opened, moved or linked
//! there; a directory, link, FIFO or device in their place is removed (never followed).

use std::path::{Path, PathBuf};

use contractor_protocol::agent::CacheJob;
use contractor_protocol::error::ToolCode;
use contractor_protocol::file::{kind_name, open_regular, read_regular};
pub use contractor_protocol::store::CACHE_UPLOAD_NAME as UPLOAD_NAME;
use contractor_protocol::store::{CacheEntry, CacheInfo};
use sha2::{Digest, Sha256};

use crate::path::is_build_id;

/// Largest `<key>.json` description read: 64 KiB.
pub const MAX_INFO_BYTES: u64 = 64 * 1024;

/// Errors of the cache commands.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The build id cannot name a record.
    #[error("{id:?} is not a build id (A-Z a-z 0-9 . _ - only, not . or ..)")]
    BadBuild {
        /// The id given.
        id: String,
    },
    /// A cache path is not an absolute guest directory.
    #[error("the cache path {path:?} is not an absolute guest directory (one starting with /)")]
    BadPath {
        /// The path given.
        path: String,
    },
    /// The build left something other than a regular file where its cache goes.
    #[error(
        "the build left {kind} at {}, not a regular file; it was removed and no cache was kept",
        path.display()
    )]
    NotRegular {
        /// What it was.
        kind: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done: "read", "link", "move", ….
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The description could not be written as JSON.
    #[error("cannot describe the cache")]
    Describe(#[source] serde_json::Error),
}

impl CacheError {
    /// Whether the caller's input is at fault (exit code 2), not the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CacheError::BadBuild { .. } | CacheError::BadPath { .. }
        )
    }

    /// The error object's code: `bad_build`, `bad_cache_path`, `cache_not_regular` (the
    /// build uploaded something else than a file as its cache) or `cache_io`.
    pub fn code(&self) -> ToolCode {
        match self {
            CacheError::BadBuild { .. } => ToolCode::BadBuild,
            CacheError::BadPath { .. } => ToolCode::BadCachePath,
            CacheError::NotRegular { .. } => ToolCode::CacheNotRegular,
            CacheError::Io { .. } | CacheError::Describe(_) => ToolCode::CacheIo,
        }
    }
}

/// The error for `action` failing on `path`.
fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

/// Removes whatever is at `path` without following it: a directory with its contents, any
/// other entry itself. Nothing there is fine.
pub fn remove_entry(path: &Path) -> Result<(), CacheError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(io("remove", path)),
    }
}

/// The cache directory, made a real directory if something else is there.
fn ensure_dir(store_root: &Path) -> Result<PathBuf, CacheError> {
    let dir = dir(store_root);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        remove_entry(&dir)?;
    }
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    Ok(dir)
}

/// The type of what is at `path` when it is there and not a regular file.
fn not_regular(path: &Path) -> Option<&'static str> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => Some(kind_name(meta.file_type())),
        _ => None,
    }
}

/// The store's cache directory.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("cache")
}

/// The record of build `id`.
fn record(store_root: &Path, id: &str) -> Result<PathBuf, CacheError> {
    if !is_build_id(id) {
        return Err(CacheError::BadBuild { id: id.to_string() });
    }
    Ok(store_root.join("builds").join(id))
}

/// Refuses a path that is not an absolute guest directory.
fn check_paths(paths: &[String]) -> Result<(), CacheError> {
    match paths.iter().find(|p| !p.starts_with('/')) {
        Some(path) => Err(CacheError::BadPath { path: path.clone() }),
        None => Ok(()),
    }
}

/// The cache key of a set of paths.
pub fn key(paths: &[String]) -> String {
    let mut hash = Sha256::new();
    for path in paths {
        hash.update(path.as_bytes());
        hash.update(b"\n");
    }
    hash.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Prepares build `id`'s cache job: links the existing cache (if any) into the record's
/// `inputs/` for the agent to restore. None when the build keeps no directories. What was in
/// the cache's place and had to go is told in `warnings`.
pub fn prepare(
    store_root: &Path,
    id: &str,
    paths: &[String],
    max_bytes: u64,
    warnings: &mut Vec<String>,
) -> Result<Option<CacheJob>, CacheError> {
    let record = record(store_root, id)?;
    check_paths(paths)?;
    if paths.is_empty() {
        return Ok(None);
    }
    let cache_dir = dir(store_root);
    let tar = cache_dir.join(format!("{}.tar", key(paths)));
    let real_dir = std::fs::symlink_metadata(&cache_dir).is_ok_and(|m| m.is_dir());
    if let Some(kind) = not_regular(&tar).filter(|_| real_dir) {
        warnings.push(format!(
            "{} is {kind}, not a cache tar; removed it, the build starts without a cache",
            tar.display()
        ));
        remove_entry(&tar)?;
    }
    let regular = std::fs::symlink_metadata(&tar).is_ok_and(|m| m.is_file());
    let restore = if real_dir && regular {
        let inputs = record.join("inputs");
        std::fs::create_dir_all(&inputs).map_err(io("create", &inputs))?;
        let linked = inputs.join("cache.tar");
        if std::fs::hard_link(&tar, &linked).is_err() {
            let mut from = open_regular(&tar).map_err(io("read", &tar))?;
            let mut to = std::fs::File::create(&linked).map_err(io("create", &linked))?;
            std::io::copy(&mut from, &mut to).map_err(io("copy the cache to", &linked))?;
        }
        Some(format!("/builds/{id}/inputs/cache.tar"))
    } else {
        None
    };
    Ok(Some(CacheJob {
        paths: paths.to_vec(),
        restore,
        save: format!("/builds/{id}/artifacts/{UPLOAD_NAME}"),
        max_bytes,
    }))
}

/// After the build: moves a cache the agent uploaded out of the artifacts into the cache
/// directory (only if the build succeeded), and drops the record's input link. Returns the
/// new cache's size when one was kept.
pub fn keep(
    store_root: &Path,
    id: &str,
    paths: &[String],
    succeeded: bool,
) -> Result<Option<u64>, CacheError> {
    let record = record(store_root, id)?;
    check_paths(paths)?;
    let _ = std::fs::remove_file(record.join("inputs/cache.tar"));
    let _ = std::fs::remove_dir(record.join("inputs"));
    let uploaded = record.join("artifacts").join(UPLOAD_NAME);
    let Ok(meta) = std::fs::symlink_metadata(&uploaded) else {
        return Ok(None);
    };
    if !meta.is_file() {
        remove_entry(&uploaded)?;
        return Err(CacheError::NotRegular {
            kind: kind_name(meta.file_type()),
            path: uploaded,
        });
    }
    if !succeeded || paths.is_empty() {
        std::fs::remove_file(&uploaded).map_err(io("remove", &uploaded))?;
        return Ok(None);
    }
    let dir = ensure_dir(store_root)?;
    let key = key(paths);
    let info = CacheInfo {
        paths: paths.to_vec(),
        bytes: meta.len(),
        build: id.to_string(),
    };
    let text = serde_json::to_string_pretty(&info).map_err(CacheError::Describe)?;
    // The tar first: a description never names a tar that is not there yet. Whatever the
    // project left in their place goes (a rename replaces a link, never its target).
    let (tar, json) = (
        dir.join(format!("{key}.tar")),
        dir.join(format!("{key}.json")),
    );
    if not_regular(&tar).is_some() {
        remove_entry(&tar)?;
    }
    std::fs::rename(&uploaded, &tar).map_err(io("move the new cache to", &tar))?;
    remove_entry(&json)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&json)
        .map_err(io("create", &json))?;
    std::io::Write::write_all(&mut file, (text + "\n").as_bytes()).map_err(io("write", &json))?;
    Ok(Some(meta.len()))
}

/// The store's caches, sorted by tar.
pub fn list(store_root: &Path) -> Result<Vec<CacheEntry>, CacheError> {
    let mut entries = Vec::new();
    let dir = dir(store_root);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        return Ok(entries);
    }
    let read = match std::fs::read_dir(&dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(e) => return Err(io("read", &dir)(e)),
    };
    for entry in read.flatten() {
        let tar = entry.path();
        if tar.extension().is_some_and(|e| e == "tar") {
            let info = read_regular(&tar.with_extension("json"), MAX_INFO_BYTES)
                .ok()
                .and_then(|text| serde_json::from_slice(&text).ok());
            let bytes = std::fs::symlink_metadata(&tar)
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len());
            entries.push(CacheEntry { tar, bytes, info });
        }
    }
    entries.sort_by(|a, b| a.tar.cmp(&b.tar));
    Ok(entries)
}

/// Deletes the store's caches; returns how many bytes that freed.
pub fn clear(store_root: &Path) -> Result<u64, CacheError> {
    let mut freed = 0;
    for entry in list(store_root)? {
        freed += entry.bytes;
        remove_entry(&entry.tar)?;
        remove_entry(&entry.tar.with_extension("json"))?;
    }
    let dir = dir(store_root);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        remove_entry(&dir)?;
        return Ok(freed);
    }
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound && !dir.exists() => {
            Err(io("remove", &dir)(e))
        }
        _ => Ok(freed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_goes_from_one_build_to_the_next_and_clear_removes_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = root.path();
        let paths = vec!["/root/.cargo/registry".to_string()];
        let first = store.join("builds/b1");
        std::fs::create_dir_all(first.join("artifacts")).expect("mkdir");

        let job = prepare(store, "b1", &paths, 100, &mut Vec::new())
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore, None, "nothing to restore on the first build");
        assert_eq!(job.save, "/builds/b1/artifacts/.contractor-cache.tar");
        std::fs::write(first.join("artifacts").join(UPLOAD_NAME), b"tar bytes").expect("upload");
        assert_eq!(keep(store, "b1", &paths, true).expect("keep"), Some(9));
        assert!(
            !first.join("artifacts").join(UPLOAD_NAME).exists(),
            "not an artifact"
        );

        let second = store.join("builds/b2");
        std::fs::create_dir_all(second.join("artifacts")).expect("mkdir");
        let job = prepare(store, "b2", &paths, 100, &mut Vec::new())
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore.as_deref(), Some("/builds/b2/inputs/cache.tar"));
        assert_eq!(
            std::fs::read(second.join("inputs/cache.tar")).expect("input"),
            b"tar bytes"
        );
        // A failed build's upload is dropped; the cache stays the first build's.
        std::fs::write(second.join("artifacts").join(UPLOAD_NAME), b"bad").expect("upload");
        assert_eq!(keep(store, "b2", &paths, false).expect("keep"), None);
        assert!(!second.join("inputs").exists());
        let listed = list(store).expect("list");
        assert_eq!(listed.len(), 1);
        let info = listed[0].info.clone().expect("info");
        assert_eq!(
            (info.paths, info.bytes, info.build.as_str()),
            (paths.clone(), 9, "b1")
        );

        // Other paths are another cache.
        assert_ne!(key(&paths), key(&["/build/target".to_string()]));
        assert_eq!(
            prepare(store, "b2", &[], 100, &mut Vec::new()).expect("prepare"),
            None
        );

        assert_eq!(clear(store).expect("clear"), 9);
        assert!(list(store).expect("list").is_empty());
        assert_eq!(clear(store).expect("clear again"), 0);
    }

    #[test]
    fn whatever_the_guest_or_project_leaves_where_the_cache_goes_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = root.path();
        let paths = vec!["/root/.cache".to_string()];
        let key = key(&paths);
        // The guest uploads a directory as its cache.
        let record = store.join("builds/b1");
        std::fs::create_dir_all(record.join("artifacts").join(UPLOAD_NAME).join("x"))
            .expect("mkdir");
        let err = keep(store, "b1", &paths, true).expect_err("a directory");
        assert!(
            err.to_string().contains("the build left a directory at"),
            "{err}"
        );
        assert!(!record.join("artifacts").join(UPLOAD_NAME).exists());
        // The project comes with a directory as the tar, a FIFO as its description, and a
        // link to a file elsewhere as another tar.
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("precious"), "keep me").expect("write");
        let cache = dir(store);
        std::fs::create_dir_all(cache.join(format!("{key}.tar/sub"))).expect("mkdir");
        let fifo = std::ffi::CString::new(format!("{}/{key}.json", cache.display())).expect("c");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink(outside.path().join("precious"), cache.join("other.tar"))
            .expect("symlink");
        let listed = list(store).expect("list does not open the FIFO");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|e| e.info.is_none()));
        // A build restores nothing from it and removes the directory.
        let second = store.join("builds/b2");
        std::fs::create_dir_all(&second).expect("mkdir");
        let mut warnings = Vec::new();
        let job = prepare(store, "b2", &paths, 100, &mut warnings)
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore, None);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].ends_with(
                "is a directory, not a cache tar; removed it, the build starts without a cache"
            ),
            "{warnings:?}"
        );
        std::fs::create_dir_all(cache.join(format!("{key}.tar/sub"))).expect("mkdir");
        assert_eq!(clear(store).expect("clear"), 0);
        assert!(std::fs::symlink_metadata(&cache).is_err(), "all gone");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("precious")).expect("read"),
            "keep me"
        );
        // A cache directory that is a link is removed as a link.
        std::os::unix::fs::symlink(outside.path(), &cache).expect("symlink");
        assert!(list(store).expect("list").is_empty());
        clear(store).expect("clear");
        assert!(std::fs::symlink_metadata(&cache).is_err());
        assert!(outside.path().join("precious").exists());
    }

    #[test]
    fn a_bad_build_id_or_cache_path_is_refused_by_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let paths = vec!["/root/.cache".to_string()];
        let err = prepare(root.path(), "../x", &paths, 1, &mut Vec::new()).expect_err("id");
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with("\"../x\" is not a build id"),
            "{err}"
        );
        let err = keep(root.path(), "b1", &["rel".to_string()], true).expect_err("path");
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            "the cache path \"rel\" is not an absolute guest directory (one starting with /)"
        );
    }
}
