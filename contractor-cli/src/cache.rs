//! The project's build cache (`[cache] paths`): guest directories kept between builds.
//!
//! A cache is one tar per set of paths, `<project>/.contractor/cache/<key>.tar` (the key is
//! a hash of the paths, so changing them starts a new cache), with `<key>.json` beside it
//! saying which paths, how big and from which build. For a build, the tar is linked into
//! the record as `inputs/cache.tar`, which the build's store token may read; after a
//! successful script the agent uploads the new tar as `artifacts/.contractor-cache.tar`
//! (the only place the token may write), and [`keep`] moves it out of the artifacts into
//! the cache directory.
//!
//! The guest may leave anything where its upload goes, and the project may come with
//! anything in `.contractor/cache`: only regular files are ever opened, moved or linked
//! there; a directory, link, FIFO or device in their place is removed (never followed).

use std::path::{Path, PathBuf};

use contractor_protocol::agent::CacheJob;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the agent uploads the new cache, under the build's artifacts.
pub const UPLOAD_NAME: &str = ".contractor-cache.tar";

/// What `<key>.json` says about a cache.
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

/// A cache on disk, as `contractor cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The tar.
    pub tar: PathBuf,
    /// Its description, if readable.
    pub info: Option<CacheInfo>,
}

/// Largest `<key>.json` description read: 64 KiB.
pub const MAX_INFO_BYTES: u64 = 64 * 1024;

/// Removes whatever is at `path` without following it: a directory with its contents, any
/// other entry itself. Nothing there is fine.
pub fn remove_entry(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The cache directory, made a real directory if something else is there.
fn ensure_dir(store_root: &Path) -> std::io::Result<PathBuf> {
    let dir = dir(store_root);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        remove_entry(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The type of what is at `path` when it is there and not a regular file.
fn not_regular(path: &Path) -> Option<&'static str> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => Some(crate::source::kind_name(meta.file_type())),
        _ => None,
    }
}

/// The project's cache directory.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("cache")
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
/// `inputs/` for the agent to restore. None when the spec keeps no directories.
pub fn prepare(
    store_root: &Path,
    record: &Path,
    id: &str,
    paths: &[String],
    max_bytes: u64,
) -> std::io::Result<Option<CacheJob>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let cache_dir = dir(store_root);
    let tar = cache_dir.join(format!("{}.tar", key(paths)));
    let real_dir = std::fs::symlink_metadata(&cache_dir).is_ok_and(|m| m.is_dir());
    if let Some(kind) = not_regular(&tar).filter(|_| real_dir) {
        eprintln!(
            "contractor: warning: {} is {kind}, not a cache tar; removed it, the build starts without a cache",
            crate::display::escape_path(&tar)
        );
        remove_entry(&tar)?;
    }
    let regular = std::fs::symlink_metadata(&tar).is_ok_and(|m| m.is_file());
    let restore = if real_dir && regular {
        let inputs = record.join("inputs");
        std::fs::create_dir_all(&inputs)?;
        let linked = inputs.join("cache.tar");
        std::fs::hard_link(&tar, &linked).or_else(|_| {
            let mut from = crate::source::open_regular(&tar)?;
            let mut to = std::fs::File::create(&linked)?;
            std::io::copy(&mut from, &mut to).map(|_| ())
        })?;
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
    record: &Path,
    id: &str,
    paths: &[String],
    succeeded: bool,
) -> std::io::Result<Option<u64>> {
    let _ = std::fs::remove_file(record.join("inputs/cache.tar"));
    let _ = std::fs::remove_dir(record.join("inputs"));
    let uploaded = record.join("artifacts").join(UPLOAD_NAME);
    let Ok(meta) = std::fs::symlink_metadata(&uploaded) else {
        return Ok(None);
    };
    if !meta.is_file() {
        remove_entry(&uploaded)?;
        return Err(std::io::Error::other(format!(
            "the build left {} at {}, not a regular file; it was removed and no cache was kept",
            crate::source::kind_name(meta.file_type()),
            uploaded.display()
        )));
    }
    if !succeeded || paths.is_empty() {
        std::fs::remove_file(&uploaded)?;
        return Ok(None);
    }
    let dir = ensure_dir(store_root)?;
    let key = key(paths);
    let info = CacheInfo {
        paths: paths.to_vec(),
        bytes: meta.len(),
        build: id.to_string(),
    };
    let text = serde_json::to_string_pretty(&info).map_err(std::io::Error::other)?;
    // The tar first: a description never names a tar that is not there yet. Whatever the
    // project left in their place goes (a rename replaces a link, never its target).
    let (tar, json) = (
        dir.join(format!("{key}.tar")),
        dir.join(format!("{key}.json")),
    );
    if not_regular(&tar).is_some() {
        remove_entry(&tar)?;
    }
    std::fs::rename(&uploaded, &tar)?;
    remove_entry(&json)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&json)?;
    std::io::Write::write_all(&mut file, (text + "\n").as_bytes())?;
    Ok(Some(meta.len()))
}

/// The project's caches.
pub fn list(store_root: &Path) -> std::io::Result<Vec<CacheEntry>> {
    let mut entries = Vec::new();
    if std::fs::symlink_metadata(dir(store_root)).is_ok_and(|m| !m.is_dir()) {
        return Ok(entries);
    }
    let read = match std::fs::read_dir(dir(store_root)) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(e) => return Err(e),
    };
    for entry in read.flatten() {
        let tar = entry.path();
        if tar.extension().is_some_and(|e| e == "tar") {
            let info = crate::source::read_regular(&tar.with_extension("json"), MAX_INFO_BYTES)
                .ok()
                .and_then(|text| serde_json::from_slice(&text).ok());
            entries.push(CacheEntry { tar, info });
        }
    }
    entries.sort_by(|a, b| a.tar.cmp(&b.tar));
    Ok(entries)
}

/// Deletes the project's caches; returns how many bytes that freed.
pub fn clear(store_root: &Path) -> std::io::Result<u64> {
    let mut freed = 0;
    for entry in list(store_root)? {
        freed += std::fs::symlink_metadata(&entry.tar)
            .ok()
            .filter(|m| m.is_file())
            .map_or(0, |m| m.len());
        remove_entry(&entry.tar)?;
        remove_entry(&entry.tar.with_extension("json"))?;
    }
    if std::fs::symlink_metadata(dir(store_root)).is_ok_and(|m| !m.is_dir()) {
        remove_entry(&dir(store_root))?;
        return Ok(freed);
    }
    match std::fs::remove_dir(dir(store_root)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound && !dir(store_root).exists() => Err(e),
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

        let job = prepare(store, &first, "b1", &paths, 100)
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore, None, "nothing to restore on the first build");
        assert_eq!(job.save, "/builds/b1/artifacts/.contractor-cache.tar");
        std::fs::write(first.join("artifacts").join(UPLOAD_NAME), b"tar bytes").expect("upload");
        assert_eq!(
            keep(store, &first, "b1", &paths, true).expect("keep"),
            Some(9)
        );
        assert!(
            !first.join("artifacts").join(UPLOAD_NAME).exists(),
            "not an artifact"
        );

        let second = store.join("builds/b2");
        std::fs::create_dir_all(second.join("artifacts")).expect("mkdir");
        let job = prepare(store, &second, "b2", &paths, 100)
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore.as_deref(), Some("/builds/b2/inputs/cache.tar"));
        assert_eq!(
            std::fs::read(second.join("inputs/cache.tar")).expect("input"),
            b"tar bytes"
        );
        // A failed build's upload is dropped; the cache stays the first build's.
        std::fs::write(second.join("artifacts").join(UPLOAD_NAME), b"bad").expect("upload");
        assert_eq!(
            keep(store, &second, "b2", &paths, false).expect("keep"),
            None
        );
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
            prepare(store, &second, "b2", &[], 100).expect("prepare"),
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
        let err = keep(store, &record, "b1", &paths, true).expect_err("a directory");
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
        let job = prepare(store, &second, "b2", &paths, 100)
            .expect("prepare")
            .expect("job");
        assert_eq!(job.restore, None);
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
}
