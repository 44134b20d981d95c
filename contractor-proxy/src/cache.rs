//! The download cache (`--cache DIR`): response bodies by SHA-256, shared by the builds of
//! one user, so that a download pinned in `contractor.lock` is served from the disk instead
//! of the network, and with `--offline` only from there.
//!
//! Layout: `DIR/sha256/<hex>` holds the bytes, `DIR/sha256/<hex>.json` the headers that
//! describe them (`{"content_type":…,"content_encoding":…}`: a gzip-encoded body stays
//! gzip-encoded), `DIR/tmp/` bodies being written. An entry is only
//! ever complete: a body is written to `tmp/` and renamed into place once its hash is known.
//! An entry's bytes are hashed again each time before they are served; one whose hash is
//! not its name (the disk, or someone, changed it) is removed and reported, never served.
//! Serving an entry sets its modification time, which is what the front end's LRU trim
//! (`contractor cache`) orders by. The proxy writes at most `max_bytes` of new entries in
//! one run; the cache's total size is the front end's to cap.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The default of `--cache-max`: bytes of new entries one proxy run writes at most.
pub const DEFAULT_MAX_WRITTEN: u64 = 8 << 30;

/// The most bytes of a content type kept with an entry.
const MAX_TYPE: usize = contractor_protocol::proxy::MAX_CONTENT_TYPE;

/// A download cache directory.
#[derive(Debug)]
pub struct DownloadCache {
    dir: PathBuf,
    max_written: u64,
    written: AtomicU64,
}

/// An entry found and checked: its file (at the start), size and headers.
#[derive(Debug)]
pub struct Entry {
    /// The bytes, read from the start.
    pub file: File,
    /// How many.
    pub size: u64,
    /// The headers they were first served with.
    pub headers: Described,
}

/// The headers that describe an entry's bytes (each at most 256 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Described {
    /// `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `Content-Encoding` (`gzip`, ...): the bytes are encoded so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
}

/// The most bytes of an entry's `.json`.
const MAX_DESCRIBED: u64 = 4096;

/// What the cache holds for a SHA-256.
#[derive(Debug)]
pub enum Lookup {
    /// Nothing.
    Missing,
    /// The bytes, checked.
    Found(Entry),
    /// An entry whose bytes have another hash (given, with their size); it was removed.
    Tampered {
        /// The hash the bytes had.
        sha256: String,
        /// How many bytes there were.
        size: u64,
    },
}

impl DownloadCache {
    /// The cache in `dir`, created (owner only) if need be; at most `max_written` bytes of
    /// new entries are written by this process.
    pub fn open(dir: &Path, max_written: u64) -> io::Result<DownloadCache> {
        for sub in ["sha256", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        Ok(DownloadCache {
            dir: dir.to_path_buf(),
            max_written,
            written: AtomicU64::new(0),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, sha256: &str) -> Option<PathBuf> {
        is_sha256(sha256).then(|| self.dir.join("sha256").join(sha256))
    }

    /// The entry for `sha256`, its bytes hashed again first (blocking: call it off the
    /// runtime's threads).
    pub fn lookup(&self, sha256: &str) -> io::Result<Lookup> {
        let Some(path) = self.entry_path(sha256) else {
            return Ok(Lookup::Missing);
        };
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Missing),
            Err(e) => return Err(e),
        };
        if !file.metadata()?.is_file() {
            return Ok(Lookup::Missing);
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let got = hex(&hasher.finalize());
        if got != sha256 {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(path.with_extension("json"));
            return Ok(Lookup::Tampered { sha256: got, size });
        }
        file.rewind()?;
        // Used now: the LRU trim keeps it longest.
        let _ = file.set_modified(std::time::SystemTime::now());
        let mut described = Vec::new();
        let headers = File::open(path.with_extension("json"))
            .and_then(|f| f.take(MAX_DESCRIBED).read_to_end(&mut described))
            .ok()
            .and_then(|_| serde_json::from_slice::<Described>(&described).ok())
            .map(Described::capped)
            .unwrap_or_default();
        Ok(Lookup::Found(Entry {
            file,
            size,
            headers,
        }))
    }

    /// A new entry being written, or `None` when this run's share is used up or the
    /// temporary file cannot be made.
    pub fn writer(self: &Arc<Self>, content_encoding: Option<&str>) -> Option<EntryWriter> {
        if self.written.load(Ordering::Relaxed) >= self.max_written {
            return None;
        }
        let file = tempfile_in(&self.dir.join("tmp")).ok()?;
        Some(EntryWriter {
            cache: Arc::clone(self),
            file: Some(file),
            content_encoding: content_encoding.map(str::to_string),
        })
    }
}

/// An entry being written: bytes go to a temporary file, which becomes the entry once the
/// body ended and its hash is known ([`EntryWriter::commit`]); dropped, it is deleted.
#[derive(Debug)]
pub struct EntryWriter {
    cache: Arc<DownloadCache>,
    file: Option<(File, PathBuf)>,
    content_encoding: Option<String>,
}

impl EntryWriter {
    /// Adds `data`; past the run's share, or on a write error, the entry is given up.
    pub fn write(&mut self, data: &[u8]) {
        let written = self
            .cache
            .written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let over = written.saturating_add(data.len() as u64) > self.cache.max_written;
        let failed = match &mut self.file {
            Some((file, _)) => over || file.write_all(data).is_err(),
            None => false,
        };
        if failed {
            self.abandon();
        }
    }

    /// Makes the bytes written the entry for `sha256` (their hash), with `content_type`.
    pub fn commit(mut self, sha256: &str, content_type: Option<&str>) {
        let Some((file, temp)) = self.file.take() else {
            return;
        };
        drop(file);
        let Some(path) = self.cache.entry_path(sha256) else {
            let _ = fs::remove_file(&temp);
            return;
        };
        let described = Described {
            content_type: content_type.map(str::to_string),
            content_encoding: self.content_encoding.take(),
        }
        .capped();
        let written = serde_json::to_vec(&described)
            .ok()
            .is_some_and(|json| fs::write(path.with_extension("json"), json).is_ok());
        if !written {
            let _ = fs::remove_file(&temp);
            return;
        }
        if fs::rename(&temp, &path).is_err() {
            let _ = fs::remove_file(&temp);
        }
    }

    fn abandon(&mut self) {
        if let Some((_, temp)) = self.file.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl Described {
    /// Without headers over [`MAX_TYPE`] bytes.
    fn capped(self) -> Described {
        let short = |v: Option<String>| v.filter(|v| v.len() <= MAX_TYPE);
        Described {
            content_type: short(self.content_type),
            content_encoding: short(self.content_encoding),
        }
    }
}

/// A new file in `dir` that only this process opened (`O_EXCL`; named by the process, a
/// counter and the time, so that proxies sharing the cache do not collide). No randomness
/// is needed, and none could be read: the confined proxy cannot open `/dev/urandom`.
fn tempfile_in(dir: &Path) -> io::Result<(File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let path = dir.join(format!(
        "part-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok((file, path))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` is a SHA-256 in lower-case hex (an entry's name).
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn an_entry_is_written_whole_then_found_checked_and_a_changed_one_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(DownloadCache::open(dir.path(), 1 << 20).expect("open"));
        let body = b"crate bytes";
        let mut writer = cache.writer(Some("gzip")).expect("writer");
        writer.write(&body[..5]);
        writer.write(&body[5..]);
        assert!(matches!(
            cache.lookup(&sha(body)).expect("lookup"),
            Lookup::Missing
        ));
        writer.commit(&sha(body), Some("application/x-tar"));
        let Lookup::Found(mut entry) = cache.lookup(&sha(body)).expect("lookup") else {
            panic!("not found");
        };
        let mut read = Vec::new();
        entry.file.read_to_end(&mut read).expect("read");
        assert_eq!((read.as_slice(), entry.size), (&body[..], 11));
        assert_eq!(
            entry.headers.content_type.as_deref(),
            Some("application/x-tar")
        );
        assert_eq!(entry.headers.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );

        let path = dir.path().join("sha256").join(sha(body));
        fs::write(&path, b"other bytes").expect("tamper");
        match cache.lookup(&sha(body)).expect("lookup") {
            Lookup::Tampered { sha256, size } => {
                assert_eq!((sha256, size), (sha(b"other bytes"), 11));
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists(), "the changed entry is removed");
        assert!(matches!(
            cache.lookup("not-a-hash").expect("lookup"),
            Lookup::Missing
        ));
    }

    #[test]
    fn a_run_writes_at_most_its_share_and_an_abandoned_entry_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(DownloadCache::open(dir.path(), 8).expect("open"));
        let mut writer = cache.writer(None).expect("writer");
        writer.write(b"0123456789");
        writer.commit(&sha(b"0123456789"), None);
        assert!(matches!(
            cache.lookup(&sha(b"0123456789")).expect("lookup"),
            Lookup::Missing
        ));
        assert!(cache.writer(None).is_none(), "the share is used up");
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
        let cache = Arc::new(DownloadCache::open(dir.path(), 100).expect("open"));
        drop(cache.writer(None).expect("writer"));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }
}
