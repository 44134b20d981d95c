//! Keeping the download cache under its size: the entries used longest ago go first, but
//! never one that a remembered project's lock pins and that project fetched itself
//! ([`super::index::protected`]); parts of entries left by a proxy that died go after a day.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::is_sha256;

/// The most entries read when trimming or measuring; past it the others are not seen.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Partly written entries (of a proxy that was killed) older than this are removed.
const STALE_PART: Duration = Duration::from_secs(24 * 3600);

/// One entry: its bytes' file, size and last use.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    sha256: String,
    bytes: u64,
    used: SystemTime,
}

/// Entries and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
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
        let Some(name) = name.to_str().filter(|n| is_sha256(n)) else {
            continue;
        };
        let meta = item.metadata()?;
        if !meta.is_file() {
            continue;
        }
        entries.push(Entry {
            path: item.path(),
            sha256: name.to_string(),
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

/// What a trim did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// What was removed.
    pub removed: Usage,
    /// What the cache holds after.
    pub left: Usage,
}

/// Removes the entries used longest ago, but those in `protected`, until the cache in `dir`
/// holds at most `max` bytes less `room`; and stale parts in `tmp/`.
pub fn trim(dir: &Path, max: u64, room: u64, protected: &HashSet<String>) -> io::Result<Trimmed> {
    let mut entries = entries(dir)?;
    let mut left = Usage {
        entries: entries.len() as u64,
        bytes: entries.iter().map(|e| e.bytes).sum(),
    };
    let goal = max.saturating_sub(room);
    entries.sort_by_key(|e| e.used);
    let mut removed = Usage::default();
    for entry in entries {
        if left.bytes <= goal {
            break;
        }
        if protected.contains(&entry.sha256) {
            continue;
        }
        match fs::remove_file(&entry.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Left by the cache's earlier layout, where headers were shared.
        let _ = fs::remove_file(entry.path.with_extension("json"));
        left.bytes -= entry.bytes;
        left.entries -= 1;
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
    Ok(Trimmed { removed, left })
}

/// Removes every entry and every project's index (`contractor-proxy cache clear`, which
/// `contractor cache clear --downloads` runs); what was removed. Parts being written by a
/// running proxy stay (it then keeps its download or gives it up, as when the cache is full).
pub fn clear(dir: &Path) -> io::Result<Usage> {
    let removed = trim(dir, 0, 0, &HashSet::new())?.removed;
    match fs::remove_dir_all(dir.join("projects")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(removed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: char, bytes: usize, age_secs: u64) -> PathBuf {
        let path = dir.join("sha256").join(name.to_string().repeat(64));
        fs::write(&path, vec![0u8; bytes]).expect("entry");
        let used = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(used))
            .expect("mtime");
        path
    }

    #[test]
    fn the_trim_removes_the_least_recently_used_but_never_a_protected_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("sha256")).expect("dir");
        let oldest = put(dir.path(), 'a', 100, 300);
        let middle = put(dir.path(), 'b', 100, 200);
        let newest = put(dir.path(), 'c', 100, 100);
        fs::write(dir.path().join("sha256/not-an-entry"), b"x").expect("other file");
        let protected: HashSet<String> = ["a".repeat(64)].into_iter().collect();
        let trimmed = trim(dir.path(), 250, 100, &protected).expect("trim");
        assert_eq!(
            trimmed.removed,
            Usage {
                entries: 2,
                bytes: 200
            }
        );
        assert!(oldest.exists() && !middle.exists() && !newest.exists());
        assert!(dir.path().join("sha256/not-an-entry").exists());
        assert_eq!(trimmed.left, usage(dir.path()).expect("usage"));
        // Only protected entries are left: nothing more can go.
        assert_eq!(
            trim(dir.path(), 0, 0, &protected)
                .expect("trim")
                .left
                .entries,
            1
        );
        assert_eq!(
            usage(&dir.path().join("none")).expect("usage"),
            Usage::default()
        );
    }

    #[test]
    fn clearing_removes_every_entry_pinned_or_not_and_every_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("sha256")).expect("dir");
        put(dir.path(), 'a', 100, 300);
        put(dir.path(), 'b', 50, 100);
        fs::create_dir_all(dir.path().join("projects")).expect("dir");
        fs::write(dir.path().join("projects/index.jsonl"), "{}").expect("index");
        assert_eq!(
            clear(dir.path()).expect("clear"),
            Usage {
                entries: 2,
                bytes: 150
            }
        );
        assert_eq!(usage(dir.path()).expect("usage"), Usage::default());
        assert!(!dir.path().join("projects").exists(), "the indexes go too");
        // A cache never made is empty, and clearing it is no error.
        assert_eq!(
            clear(&dir.path().join("none")).expect("clear"),
            Usage::default()
        );
    }
}
