//! Size limits on uploads: per artifact and per build (everything under one build's
//! `artifacts/`).
//!
//! What a build costs the host is more than its file bytes: every file and directory takes
//! at least a block. So a file counts as its size rounded up to [`ENTRY_COST`] (an empty
//! file counts one block) and a directory as one block, all against the build's byte limit;
//! files and directories together are also capped at [`MAX_BUILD_ENTRIES`].
//!
//! The invariant: the cost of what is stored under a build's `artifacts/` plus the cost of
//! its uploads in flight never exceeds its limits. Each upload holds a [`Reservation`] that
//! grows as its body arrives and is refused as soon as it would pass the limit; a finished
//! upload turns its reservation into stored cost (minus the file it replaced), an abandoned
//! one gives the file's part back when dropped. The directories an upload creates are
//! charged when it is accepted and stay charged (an abandoned upload may leave them; two
//! uploads creating the same directory at once both pay: the count errs on the safe side).
//! A build's stored cost is measured from disk the first time the server sees the build and
//! kept in memory after that.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::files::TEMP_PREFIX;

/// What one file or directory costs at least against a build's byte limit: 4096 bytes, one
/// block of the host's file system. A file counts its size rounded up to a multiple of it.
pub const ENTRY_COST: u64 = 4096;

/// Most files and directories under one build's `artifacts/`: 65,536.
pub const MAX_BUILD_ENTRIES: u64 = 65_536;

/// Most path components below a build's `artifacts/` (directories and the file): 32.
pub const MAX_ARTIFACT_DEPTH: usize = 32;

/// What a file of `len` bytes costs: its size rounded up to [`ENTRY_COST`], at least one.
pub fn file_cost(len: u64) -> u64 {
    len.div_ceil(ENTRY_COST).max(1).saturating_mul(ENTRY_COST)
}

/// Per-build accounting of artifact bytes.
#[derive(Debug, Default)]
pub struct UsageTable {
    builds: Mutex<HashMap<String, Usage>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Cost of what is stored.
    stored: u64,
    /// Cost reserved by uploads in flight.
    reserved: u64,
    /// Files and directories, stored or reserved.
    entries: u64,
}

/// A build's limit was reached: which, and what it would have reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The byte limit: stored plus reserved cost, had the request been accepted.
    Bytes {
        /// The cost it would have reached.
        would_be: u64,
    },
    /// [`MAX_BUILD_ENTRIES`]: the files and directories it would have had.
    Entries {
        /// The count it would have reached.
        would_be: u64,
    },
}

/// What an upload adds to its build besides its content: directories and a new file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NewEntries {
    /// Directories the upload creates.
    pub dirs: u64,
    /// Whether the file is new (not replacing one).
    pub file: bool,
}

/// Bytes one upload has reserved against its build's limit; released when dropped unless
/// settled.
#[derive(Debug)]
pub struct Reservation {
    table: Arc<UsageTable>,
    build: String,
    limit: u64,
    bytes: u64,
    /// Whether one entry is reserved for the file (released when dropped).
    file_entry: bool,
}

impl UsageTable {
    /// Reserves an upload of `bytes` to `build`, whose artifacts are under `artifacts`, that
    /// adds `new` entries, within `limit`. Measures the build's stored cost (blocking walk)
    /// if this is the first time the table sees it.
    pub fn reserve(
        self: &Arc<Self>,
        build: &str,
        artifacts: &Path,
        limit: u64,
        bytes: u64,
        new: NewEntries,
    ) -> io::Result<Result<Reservation, OverLimit>> {
        let poisoned = || io::Error::other("usage table poisoned");
        let known = self
            .builds
            .lock()
            .map_err(|_| poisoned())?
            .contains_key(build);
        if !known {
            let (stored, entries) = stored_cost(artifacts)?;
            self.builds
                .lock()
                .map_err(|_| poisoned())?
                .entry(build.to_string())
                .or_insert(Usage {
                    stored,
                    reserved: 0,
                    entries,
                });
        }
        {
            let mut builds = self.builds.lock().map_err(|_| poisoned())?;
            let usage = builds.entry(build.to_string()).or_default();
            let entries = usage.entries + new.dirs + u64::from(new.file);
            if entries > MAX_BUILD_ENTRIES {
                return Ok(Err(OverLimit::Entries { would_be: entries }));
            }
            let dirs_cost = new.dirs.saturating_mul(ENTRY_COST);
            let would_be = usage
                .stored
                .saturating_add(usage.reserved)
                .saturating_add(dirs_cost)
                .saturating_add(file_cost(bytes));
            if would_be > limit {
                return Ok(Err(OverLimit::Bytes { would_be }));
            }
            usage.entries = entries;
            usage.stored += dirs_cost;
        }
        let mut reservation = Reservation {
            table: Arc::clone(self),
            build: build.to_string(),
            limit,
            bytes: 0,
            file_entry: new.file,
        };
        Ok(reservation.grow(file_cost(bytes)).map(|()| reservation))
    }

    /// Stored plus reserved cost of `build`, if known.
    pub fn total(&self, build: &str) -> Option<u64> {
        let builds = self.builds.lock().ok()?;
        builds.get(build).map(|u| u.stored + u.reserved)
    }

    /// Files and directories of `build`, stored or reserved, if known.
    pub fn entries(&self, build: &str) -> Option<u64> {
        let builds = self.builds.lock().ok()?;
        builds.get(build).map(|u| u.entries)
    }
}

impl Reservation {
    /// Reserves `more` bytes, unless that would pass the limit.
    pub fn grow(&mut self, more: u64) -> Result<(), OverLimit> {
        let Ok(mut builds) = self.table.builds.lock() else {
            return Err(OverLimit::Bytes { would_be: u64::MAX });
        };
        let usage = builds.entry(self.build.clone()).or_default();
        let would_be = usage
            .stored
            .saturating_add(usage.reserved)
            .saturating_add(more);
        if would_be > self.limit {
            return Err(OverLimit::Bytes { would_be });
        }
        usage.reserved += more;
        self.bytes += more;
        Ok(())
    }

    /// Makes sure a file of `received` bytes is covered.
    pub fn cover(&mut self, received: u64) -> Result<(), OverLimit> {
        let total = file_cost(received);
        if total > self.bytes {
            self.grow(total - self.bytes)
        } else {
            Ok(())
        }
    }

    /// The upload finished: a file of `stored` bytes now sits where a file of `replaced`
    /// bytes used to (None: there was none).
    pub fn settle(mut self, stored: u64, replaced: Option<u64>) {
        if let Ok(mut builds) = self.table.builds.lock() {
            let usage = builds.entry(self.build.clone()).or_default();
            usage.reserved = usage.reserved.saturating_sub(self.bytes);
            usage.stored = usage
                .stored
                .saturating_add(file_cost(stored))
                .saturating_sub(replaced.map_or(0, file_cost));
            // The entry reserved for a new file that turned out to replace one (or the
            // other way round) is put right.
            match (self.file_entry, replaced.is_some()) {
                (true, true) => usage.entries = usage.entries.saturating_sub(1),
                (false, false) => usage.entries += 1,
                _ => {}
            }
        }
        self.bytes = 0;
        self.file_entry = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 || self.file_entry {
            if let Ok(mut builds) = self.table.builds.lock() {
                if let Some(usage) = builds.get_mut(&self.build) {
                    usage.reserved = usage.reserved.saturating_sub(self.bytes);
                    if self.file_entry {
                        usage.entries = usage.entries.saturating_sub(1);
                    }
                }
            }
        }
    }
}

/// The cost of what is beneath `dir` ((0, 0) if it does not exist) and its count of files
/// and directories, not following symlinks and leaving out upload temporary files. Blocking.
pub fn stored_cost(dir: &Path) -> io::Result<(u64, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut cost, mut count) = (0u64, 0u64);
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            let (below, below_count) = stored_cost(&entry.path())?;
            cost += ENTRY_COST + below;
            count += 1 + below_count;
        } else if metadata.is_file() {
            cost += file_cost(metadata.len());
            count += 1;
        }
    }
    Ok((cost, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_blocks_and_entries_and_are_released() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/f"), [0u8; 300]).expect("write");
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}x")), [0u8; 999]).expect("write");
        let table = Arc::new(UsageTable::default());
        let file = NewEntries {
            dirs: 0,
            file: true,
        };
        let limit = 9 * ENTRY_COST;
        // a, a/b and a/b/f: three blocks, three entries; the temp file does not count.
        let mut first = table
            .reserve("b", dir.path(), limit, 500, file)
            .expect("io")
            .expect("fits");
        assert_eq!(table.total("b"), Some(4 * ENTRY_COST));
        assert_eq!(table.entries("b"), Some(4));
        first.cover(2 * ENTRY_COST).expect("two blocks fit");
        assert_eq!(table.total("b"), Some(5 * ENTRY_COST));
        assert_eq!(
            first.cover(7 * ENTRY_COST + 1).expect_err("over"),
            OverLimit::Bytes {
                would_be: 11 * ENTRY_COST
            }
        );
        // Empty files in new directories cost a block each, not nothing.
        let deep = NewEntries {
            dirs: 4,
            file: true,
        };
        let refused = table.reserve("b", dir.path(), limit, 0, deep).expect("io");
        assert_eq!(
            refused.expect_err("dirs count"),
            OverLimit::Bytes {
                would_be: 10 * ENTRY_COST
            }
        );
        drop(first);
        assert_eq!(table.total("b"), Some(3 * ENTRY_COST));
        assert_eq!(
            table.entries("b"),
            Some(3),
            "a dropped upload gives its entry back"
        );
        let second = table
            .reserve("b", dir.path(), limit, 0, deep)
            .expect("io")
            .expect("fits now");
        second.settle(0, None);
        assert_eq!(table.total("b"), Some(8 * ENTRY_COST));
        assert_eq!(table.entries("b"), Some(8));
        let replace = table
            .reserve("b", dir.path(), limit, 10, NewEntries::default())
            .expect("io")
            .expect("fits");
        replace.settle(10, Some(300));
        assert_eq!(
            table.total("b"),
            Some(8 * ENTRY_COST),
            "replaced file no longer counts"
        );
        assert_eq!(table.entries("b"), Some(8));
    }

    #[test]
    fn files_and_directories_are_capped_in_number() {
        let dir = tempfile::tempdir().expect("dir");
        let table = Arc::new(UsageTable::default());
        let many = NewEntries {
            dirs: MAX_BUILD_ENTRIES,
            file: true,
        };
        let refused = table
            .reserve("b", dir.path(), u64::MAX, 0, many)
            .expect("io");
        assert_eq!(
            refused.expect_err("too many"),
            OverLimit::Entries {
                would_be: MAX_BUILD_ENTRIES + 1
            }
        );
        assert_eq!(table.entries("b"), Some(0), "a refusal charges nothing");
    }
}
