//! The download cache that the builds' proxies share (`contractor-proxy --cache`): where it
//! is, how large it may grow, how much of it one build may add, and listing and clearing it.
//! The proxy keeps each complete download as `sha256/<hex>`, each project's index (URL,
//! hash, headers; the hashes its lock pins) under `projects/`, and keeps the cache under
//! its size itself (docs/proxy.md, "The download cache"): the front end only measures
//! entries by their file metadata and, when asked, removes everything.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The download cache's size unless `CONTRACTOR_DOWNLOAD_CACHE_SIZE` says otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

/// The variable that sets the download cache's size (`20GiB`, `512MiB`, `0` for none kept).
pub const SIZE_VARIABLE: &str = "CONTRACTOR_DOWNLOAD_CACHE_SIZE";

/// The most bytes one build adds to the cache (`contractor-proxy --cache-max`): half its
/// size, so that one build never pushes out more than half of what others kept, and
/// never what their locks pin.
pub fn build_quota(size: u64) -> u64 {
    size / 2
}

/// The most entries read when trimming or listing; past it the oldest beyond are not seen.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Partly written entries (of a proxy that was killed) older than this are removed.
const STALE_PART: Duration = Duration::from_secs(24 * 3600);

/// The download cache directory: `downloads/` in the data directory.
pub fn dir() -> Result<PathBuf, contractor_protocol::image::NoDataDir> {
    Ok(crate::paths::data_dir()?.join("downloads"))
}

/// The most bytes the cache may hold: `CONTRACTOR_DOWNLOAD_CACHE_SIZE`, else
/// [`DEFAULT_MAX_BYTES`].
pub fn max_bytes() -> Result<u64, String> {
    match std::env::var(SIZE_VARIABLE) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_MAX_BYTES),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{SIZE_VARIABLE} is not text")),
        Ok(text) => parse_max(&text),
    }
}

fn parse_max(text: &str) -> Result<u64, String> {
    let has_unit = text.trim().ends_with(|c: char| c.is_ascii_alphabetic());
    match contractor_protocol::units::parse_size(text) {
        _ if text.trim() == "0" => Ok(0),
        Ok(bytes) if has_unit => Ok(bytes),
        _ => Err(format!(
            "{SIZE_VARIABLE}={text:?} is not a size; write it with a unit (\"20GiB\", \
             \"512MiB\") or 0 to keep nothing"
        )),
    }
}

/// One entry: its bytes' file, size and last use.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

/// What the cache holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Entries (downloads kept).
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

fn entries(dir: &Path) -> io::Result<Vec<Entry>> {
    let listing = match fs::read_dir(dir.join("sha256")) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for item in listing.take(MAX_ENTRIES.saturating_mul(2)) {
        let item = item?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let meta = item.metadata()?;
        if !meta.is_file() {
            continue;
        }
        entries.push(Entry {
            path: item.path(),
            bytes: meta.len(),
            used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
        if entries.len() >= MAX_ENTRIES {
            break;
        }
    }
    Ok(entries)
}

/// How many entries and bytes the cache in `dir` holds.
pub fn usage(dir: &Path) -> io::Result<Usage> {
    let entries = entries(dir)?;
    Ok(Usage {
        entries: entries.len() as u64,
        bytes: entries.iter().map(|e| e.bytes).sum(),
    })
}

/// Removes the entries used longest ago until the cache in `dir` holds at most `max`
/// bytes, and parts of entries left by a proxy that died; what was removed. It knows
/// nothing of the projects' pins: only [`clear`] (`max` 0) uses it; builds leave the
/// trimming to their proxy, which protects what the projects' locks pin.
fn trim(dir: &Path, max: u64) -> io::Result<Usage> {
    let mut entries = entries(dir)?;
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    entries.sort_by_key(|e| e.used);
    let mut removed = Usage::default();
    for entry in entries {
        if total <= max {
            break;
        }
        remove_entry(&entry.path)?;
        total -= entry.bytes;
        removed.entries += 1;
        removed.bytes += entry.bytes;
    }
    if let Ok(parts) = fs::read_dir(dir.join("tmp")) {
        let now = SystemTime::now();
        for part in parts.take(MAX_ENTRIES).flatten() {
            let stale = part
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_PART);
            if stale {
                let _ = fs::remove_file(part.path());
            }
        }
    }
    Ok(removed)
}

/// Removes every entry, and every project's index; what was removed.
pub fn clear(dir: &Path) -> io::Result<Usage> {
    let removed = trim(dir, 0)?;
    match fs::remove_dir_all(dir.join("projects")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(removed),
    }
}

fn remove_entry(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let _ = fs::remove_file(path.with_extension("json"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: char, bytes: usize, age_secs: u64) -> PathBuf {
        let path = dir.join("sha256").join(name.to_string().repeat(64));
        fs::write(&path, vec![0u8; bytes]).expect("entry");
        fs::write(path.with_extension("json"), "{}").expect("headers");
        let used = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(used))
            .expect("mtime");
        path
    }

    #[test]
    fn the_size_needs_a_unit_or_zero() {
        assert_eq!(parse_max("20GiB"), Ok(20 << 30));
        assert_eq!(parse_max("0"), Ok(0));
        for bad in ["20", "lots", "-1GiB", ""] {
            let error = parse_max(bad).expect_err(bad);
            assert!(
                error.contains(SIZE_VARIABLE) && error.contains("20GiB"),
                "{error}"
            );
        }
    }

    #[test]
    fn trimming_removes_the_entries_used_longest_ago_until_the_cache_fits() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("sha256")).expect("dir");
        fs::create_dir_all(dir.path().join("tmp")).expect("dir");
        let oldest = put(dir.path(), 'a', 100, 300);
        let middle = put(dir.path(), 'b', 100, 200);
        let newest = put(dir.path(), 'c', 100, 100);
        fs::write(dir.path().join("sha256/not-an-entry"), b"x").expect("other file");
        assert_eq!(
            usage(dir.path()).expect("usage"),
            Usage {
                entries: 3,
                bytes: 300
            }
        );
        let removed = trim(dir.path(), 150).expect("trim");
        assert_eq!((removed.entries, removed.bytes), (2, 200));
        assert!(!oldest.exists() && !middle.exists() && newest.exists());
        assert!(!oldest.with_extension("json").exists());
        assert!(dir.path().join("sha256/not-an-entry").exists());
        fs::create_dir_all(dir.path().join("projects")).expect("dir");
        fs::write(dir.path().join("projects/index.jsonl"), "{}").expect("index");
        assert_eq!(clear(dir.path()).expect("clear").entries, 1);
        assert!(!dir.path().join("projects").exists(), "the indexes go too");
        assert_eq!(usage(dir.path()).expect("usage"), Usage::default());
        // A cache never made is empty.
        assert_eq!(
            usage(&dir.path().join("none")).expect("usage"),
            Usage::default()
        );
    }
}
