//! Size limits on uploads: per artifact and per build (everything under one build's
//! `artifacts/`).
//!
//! The invariant: the bytes stored under a build's `artifacts/` plus the bytes of its uploads
//! in flight never exceed its limit. Each upload holds a [`Reservation`] that grows as its
//! body arrives and is refused as soon as it would pass the limit; a finished upload turns its
//! reservation into stored bytes (minus the file it replaced), an abandoned one gives it back
//! when dropped. A build's stored total is measured from disk the first time the server sees
//! the build and kept in memory after that.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::files::TEMP_PREFIX;

/// Per-build accounting of artifact bytes.
#[derive(Debug, Default)]
pub struct UsageTable {
    builds: Mutex<HashMap<String, Usage>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    stored: u64,
    reserved: u64,
}

/// A build's limit was reached; the total it would have reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Stored plus reserved bytes, had the request been accepted.
    pub would_be: u64,
}

/// Bytes one upload has reserved against its build's limit; released when dropped unless
/// settled.
#[derive(Debug)]
pub struct Reservation {
    table: Arc<UsageTable>,
    build: String,
    limit: u64,
    bytes: u64,
}

impl UsageTable {
    /// Reserves `bytes` for an upload to `build`, whose artifacts are under `artifacts`,
    /// within `limit`. Measures the build's stored bytes (blocking walk) if this is the first
    /// time the table sees it.
    pub fn reserve(
        self: &Arc<Self>,
        build: &str,
        artifacts: &Path,
        limit: u64,
        bytes: u64,
    ) -> io::Result<Result<Reservation, OverLimit>> {
        let known = self
            .builds
            .lock()
            .map_err(|_| io::Error::other("usage table poisoned"))?
            .contains_key(build);
        if !known {
            let stored = stored_bytes(artifacts)?;
            self.builds
                .lock()
                .map_err(|_| io::Error::other("usage table poisoned"))?
                .entry(build.to_string())
                .or_insert(Usage {
                    stored,
                    reserved: 0,
                });
        }
        let mut reservation = Reservation {
            table: Arc::clone(self),
            build: build.to_string(),
            limit,
            bytes: 0,
        };
        Ok(reservation.grow(bytes).map(|()| reservation))
    }

    /// Stored plus reserved bytes of `build`, if known.
    pub fn total(&self, build: &str) -> Option<u64> {
        let builds = self.builds.lock().ok()?;
        builds.get(build).map(|u| u.stored + u.reserved)
    }
}

impl Reservation {
    /// Reserves `more` bytes, unless that would pass the limit.
    pub fn grow(&mut self, more: u64) -> Result<(), OverLimit> {
        let Ok(mut builds) = self.table.builds.lock() else {
            return Err(OverLimit { would_be: u64::MAX });
        };
        let usage = builds.entry(self.build.clone()).or_default();
        let would_be = usage
            .stored
            .saturating_add(usage.reserved)
            .saturating_add(more);
        if would_be > self.limit {
            return Err(OverLimit { would_be });
        }
        usage.reserved += more;
        self.bytes += more;
        Ok(())
    }

    /// Makes sure at least `total` bytes are reserved.
    pub fn cover(&mut self, total: u64) -> Result<(), OverLimit> {
        if total > self.bytes {
            self.grow(total - self.bytes)
        } else {
            Ok(())
        }
    }

    /// The upload finished: `stored` bytes now sit where `replaced` bytes used to.
    pub fn settle(mut self, stored: u64, replaced: u64) {
        if let Ok(mut builds) = self.table.builds.lock() {
            let usage = builds.entry(self.build.clone()).or_default();
            usage.reserved = usage.reserved.saturating_sub(self.bytes);
            usage.stored = usage.stored.saturating_add(stored).saturating_sub(replaced);
        }
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            if let Ok(mut builds) = self.table.builds.lock() {
                if let Some(usage) = builds.get_mut(&self.build) {
                    usage.reserved = usage.reserved.saturating_sub(self.bytes);
                }
            }
        }
    }
}

/// The total size of the regular files beneath `dir` (0 if it does not exist), not following
/// symlinks and leaving out upload temporary files. Blocking.
pub fn stored_bytes(dir: &Path) -> io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut total = 0u64;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            total += stored_bytes(&entry.path())?;
        } else if metadata.is_file() {
            total += metadata.len();
        }
    }
    Ok(total)
}

/// Parses a byte count: a number, optionally followed by `K`, `M`, `G` or `T` (powers of
/// 1024; `KiB`… and `KB`… are read the same way).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?} is not a size; write a number of bytes, optionally with K, M, G or T"
            ))
        }
    };
    let number: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a size; write a number of bytes, optionally with K, M, G or T")
    })?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").expect_err("unit").contains("\"12X\""));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T")
            .expect_err("big")
            .contains("too large"));
    }

    #[test]
    fn reservations_respect_the_limit_and_are_released() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/f"), [0u8; 300]).expect("write");
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}x")), [0u8; 999]).expect("write");
        let table = Arc::new(UsageTable::default());
        let mut first = table
            .reserve("b", dir.path(), 1000, 500)
            .expect("io")
            .expect("fits");
        assert_eq!(table.total("b"), Some(800), "temp files do not count");
        assert_eq!(
            first.grow(201).expect_err("over"),
            OverLimit { would_be: 1001 }
        );
        let second = table.reserve("b", dir.path(), 1000, 200).expect("io");
        let second = second.expect("exactly at the limit");
        drop(second);
        assert_eq!(table.total("b"), Some(800));
        first.settle(500, 300);
        assert_eq!(
            table.total("b"),
            Some(500),
            "replaced file no longer counts"
        );
        let third = table.reserve("b", dir.path(), 1000, 501).expect("io");
        assert!(third.is_err());
        assert_eq!(table.total("b"), Some(500));
    }
}
