//! The project's build cache (`[cache] paths`): guest directories kept between builds.
//!
//! A cache is one tar per set of paths, `<project>/.contractor/cache/<key>.tar` (the key is
//! a hash of the paths, so changing them starts a new cache), with `<key>.json` beside it
//! saying which paths, how big and from which build. For a build, the tar is linked into
//! the record as `inputs/cache.tar`, which the build's store token may read; after a
//! successful script the agent uploads the new tar as `artifacts/.contractor-cache.tar`
//! (the only place the token may write), and [`keep`] moves it out of the artifacts into
//! the cache directory.

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
    let tar = dir(store_root).join(format!("{}.tar", key(paths)));
    let restore = if tar.is_file() {
        let inputs = record.join("inputs");
        std::fs::create_dir_all(&inputs)?;
        let linked = inputs.join("cache.tar");
        std::fs::hard_link(&tar, &linked).or_else(|_| std::fs::copy(&tar, &linked).map(|_| ()))?;
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
    let Ok(meta) = std::fs::metadata(&uploaded) else {
        return Ok(None);
    };
    if !succeeded || paths.is_empty() {
        std::fs::remove_file(&uploaded)?;
        return Ok(None);
    }
    let dir = dir(store_root);
    std::fs::create_dir_all(&dir)?;
    let key = key(paths);
    let info = CacheInfo {
        paths: paths.to_vec(),
        bytes: meta.len(),
        build: id.to_string(),
    };
    let text = serde_json::to_string_pretty(&info).map_err(std::io::Error::other)?;
    // The tar first: a description never names a tar that is not there yet.
    std::fs::rename(&uploaded, dir.join(format!("{key}.tar")))?;
    std::fs::write(dir.join(format!("{key}.json")), text + "\n")?;
    Ok(Some(meta.len()))
}

/// The project's caches.
pub fn list(store_root: &Path) -> std::io::Result<Vec<CacheEntry>> {
    let mut entries = Vec::new();
    let read = match std::fs::read_dir(dir(store_root)) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(e) => return Err(e),
    };
    for entry in read.flatten() {
        let tar = entry.path();
        if tar.extension().is_some_and(|e| e == "tar") {
            let info = std::fs::read(tar.with_extension("json"))
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
        freed += std::fs::metadata(&entry.tar).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&entry.tar)?;
        let _ = std::fs::remove_file(entry.tar.with_extension("json"));
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
}
