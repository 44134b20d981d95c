//! The download cache (`--cache DIR`): response bodies by SHA-256, shared by the builds of
//! one user, so that a download pinned in `contractor.lock` is served from the disk instead
//! of the network, and with `--offline` only from there.
//!
//! Only the bytes are shared. Which URL answered which bytes, with which `Content-Type` and
//! `Content-Encoding`, is each project's own ([`index`], `--cache-project`): a pinned URL is
//! served from the cache only when this project's index says this project fetched exactly
//! the pinned hash from that very URL, and with the headers it was answered then. So a
//! project can neither read nor probe by hash what another downloaded, nor change the
//! headers another is served.
//!
//! Layout: `DIR/sha256/<hex>` holds the bytes, `DIR/projects/` the projects' indexes,
//! `DIR/tmp/` bodies being written. An entry is only ever complete: a body is written to
//! `tmp/` and renamed into place once its hash is known. An entry's bytes are hashed again
//! each time before they are served; one whose hash is not its name (the disk, or someone,
//! changed it) is removed and reported, never served. Serving an entry sets its
//! modification time, which the trim orders by.
//!
//! Bounds: one proxy run adds at most `quota` bytes (`--cache-max`); a download past it
//! is passed on but not kept, and counted ([`DownloadCache::not_kept`], the summary's
//! `cache_not_kept`). The cache holds at most `size` bytes (`--cache-size`): when an entry
//! would pass it, the proxy first trims ([`trim`]) the least recently used entries that no
//! remembered project's lock pins; if that makes no room, the entry is not kept.

pub mod index;
pub mod trim;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use index::{Fetched, IndexError, ProjectIndex, ProjectKey};

/// The default of `--cache-max`: bytes of new entries one proxy run writes at most.
pub const DEFAULT_MAX_WRITTEN: u64 = 4 << 30;

/// The default of `--cache-size`: the most bytes the cache holds.
pub const DEFAULT_SIZE: u64 = 10 << 30;

/// The most bytes of a content type kept with an entry.
const MAX_TYPE: usize = contractor_protocol::proxy::MAX_CONTENT_TYPE;

/// Why the cache cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A directory of it cannot be made or read.
    #[error("cannot prepare {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The project's index.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// What a proxy run may do with the cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// The project served (`--cache-project`).
    pub project: ProjectKey,
    /// The most bytes of new entries this run writes (`--cache-max`).
    pub quota: u64,
    /// The most bytes the cache holds (`--cache-size`).
    pub size: u64,
    /// The hashes this project's lock pins (`--pins`), protected from other runs' trims.
    pub pins: HashSet<String>,
}

/// A download cache directory, as one project's proxy uses it.
#[derive(Debug)]
pub struct DownloadCache {
    dir: PathBuf,
    project: ProjectKey,
    max_written: u64,
    size: u64,
    written: AtomicU64,
    not_kept: AtomicU64,
    /// This project's index, and the bytes the cache holds as this run last counted them.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    index: ProjectIndex,
    held: u64,
}

/// An entry found and checked: its file (at the start), size and headers.
#[derive(Debug)]
pub struct Entry {
    /// The bytes, read from the start.
    pub file: File,
    /// How many.
    pub size: u64,
    /// The headers this project was served them with.
    pub headers: Described,
}

/// The headers that describe an entry's bytes (each at most 256 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Encoding` (`gzip`, ...): the bytes are encoded so.
    pub content_encoding: Option<String>,
}

/// What the cache holds for a URL and the SHA-256 it is pinned to.
#[derive(Debug)]
pub enum Lookup {
    /// Nothing this project may be served: it did not fetch these bytes from this URL.
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
    /// The cache in `dir`, created (owner only) if need be, for `settings.project`: its
    /// index loaded and compacted, its pins recorded, projects unused for long forgotten,
    /// and the cache trimmed if it holds more than `settings.size`.
    pub fn open(dir: &Path, settings: CacheSettings) -> Result<DownloadCache, CacheError> {
        for sub in ["sha256", "tmp", "projects"] {
            let path = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|source| CacheError::Dir { path, source })?;
        }
        let present = |sha: &str| dir.join("sha256").join(sha).is_file();
        let index = ProjectIndex::open(dir, &settings.project, &settings.pins, present)?;
        index::forget_old(dir, &settings.project);
        let cache = DownloadCache {
            dir: dir.to_path_buf(),
            project: settings.project,
            max_written: settings.quota,
            size: settings.size,
            written: AtomicU64::new(0),
            not_kept: AtomicU64::new(0),
            state: Mutex::new(State { index, held: 0 }),
        };
        let held = trim::usage(dir)
            .map_err(|source| CacheError::Dir {
                path: dir.join("sha256"),
                source,
            })?
            .bytes;
        let held = if held > cache.size {
            cache.trim(0).unwrap_or(held)
        } else {
            held
        };
        if let Ok(mut state) = cache.state.lock() {
            state.held = held;
        }
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many downloads this run passed on but did not keep (its quota was used, the
    /// cache was full of protected entries, or the project's index was full).
    pub fn not_kept(&self) -> u64 {
        self.not_kept.load(Ordering::Relaxed)
    }

    /// Counts a download not kept, and says why on stderr (the first time).
    fn note_not_kept(&self, url: &str, why: &str) {
        if self.not_kept.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!(
                "contractor-proxy: {url} was passed on but not kept in the download cache: \
                 {why} (further downloads not kept are only counted)"
            );
        }
    }

    /// Trims the cache to `size` less `room` (protecting every project's pinned entries);
    /// the bytes left.
    fn trim(&self, room: u64) -> io::Result<u64> {
        let protected = index::protected(&self.dir);
        let trimmed = trim::trim(&self.dir, self.size, room, &protected)?;
        if trimmed.removed.entries > 0 {
            eprintln!(
                "contractor-proxy: the download cache removed {} entries ({} bytes) used \
                 longest ago to stay within {} bytes",
                trimmed.removed.entries, trimmed.removed.bytes, self.size
            );
        }
        Ok(trimmed.left.bytes)
    }

    fn entry_path(&self, sha256: &str) -> Option<PathBuf> {
        is_sha256(sha256).then(|| self.dir.join("sha256").join(sha256))
    }

    /// The entry this project fetched from `url` if its hash is `pinned`, its bytes hashed
    /// again first (blocking: call it off the runtime's threads).
    pub fn lookup(&self, url: &str, pinned: &str) -> io::Result<Lookup> {
        let fetched = match self.state.lock() {
            Ok(state) => state.index.get(url).cloned(),
            Err(_) => None,
        };
        let Some(fetched) = fetched.filter(|f| f.sha256 == pinned) else {
            return Ok(Lookup::Missing);
        };
        let Some(path) = self.entry_path(pinned) else {
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
        if got != pinned {
            let _ = fs::remove_file(&path);
            if let Ok(mut state) = self.state.lock() {
                state.index.forget(url);
            }
            return Ok(Lookup::Tampered { sha256: got, size });
        }
        file.rewind()?;
        // Used now: the LRU trim keeps it longest.
        let _ = file.set_modified(std::time::SystemTime::now());
        Ok(Lookup::Found(Entry {
            file,
            size,
            headers: Described {
                content_type: fetched.content_type,
                content_encoding: fetched.content_encoding,
            }
            .capped(),
        }))
    }

    /// A new entry for `url` being written, or `None` when this run's quota is used up
    /// (counted as not kept) or the temporary file cannot be made.
    pub fn writer(
        self: &Arc<Self>,
        url: &str,
        content_encoding: Option<&str>,
    ) -> Option<EntryWriter> {
        if self.written.load(Ordering::Relaxed) >= self.max_written {
            self.note_not_kept(url, &self.over_quota());
            return None;
        }
        let file = tempfile_in(&self.dir.join("tmp")).ok()?;
        Some(EntryWriter {
            cache: Arc::clone(self),
            file: Some(file),
            url: url.to_string(),
            size: 0,
            content_encoding: content_encoding.map(str::to_string),
        })
    }

    fn over_quota(&self) -> String {
        format!(
            "this build's share of the cache ({} bytes, --cache-max) is used",
            self.max_written
        )
    }

    /// Makes the `temp` file of `size` bytes the entry `sha256` (unless the cache has it
    /// already), trimming first if it would pass the cache's size, and records `line` in
    /// this project's index. `Err`: why it was not kept.
    fn keep(&self, temp: &Path, size: u64, line: Fetched) -> Result<(), String> {
        let path = self
            .entry_path(&line.sha256)
            .ok_or_else(|| "its hash is not a SHA-256".to_string())?;
        let mut state = self
            .state
            .lock()
            .map_err(|_| "the cache's state is poisoned".to_string())?;
        if path.is_file() {
            let _ = fs::remove_file(temp);
        } else {
            if state.held.saturating_add(size) > self.size {
                state.held = self.trim(size).map_err(|e| format!("cannot trim: {e}"))?;
                if state.held.saturating_add(size) > self.size {
                    return Err(format!(
                        "the cache is full ({} of {} bytes, --cache-size) with entries other \
                         projects' locks pin",
                        state.held, self.size
                    ));
                }
            }
            fs::rename(temp, &path).map_err(|e| format!("cannot rename it into place: {e}"))?;
            state.held = state.held.saturating_add(size);
        }
        if !state.index.append(&self.dir, &self.project, line) {
            return Err(format!(
                "the project's index is full (at most {} URLs, {} bytes)",
                index::MAX_FETCHED,
                index::MAX_INDEX_BYTES
            ));
        }
        Ok(())
    }
}

/// An entry being written: bytes go to a temporary file, which becomes the entry once the
/// body ended and its hash is known ([`EntryWriter::commit`]); dropped, it is deleted.
#[derive(Debug)]
pub struct EntryWriter {
    cache: Arc<DownloadCache>,
    file: Option<(File, PathBuf)>,
    url: String,
    size: u64,
    content_encoding: Option<String>,
}

impl EntryWriter {
    /// Adds `data`; past the run's quota (counted as not kept), or on a write error, the
    /// entry is given up.
    pub fn write(&mut self, data: &[u8]) {
        if self.file.is_none() {
            return;
        }
        let written = self
            .cache
            .written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let over = written.saturating_add(data.len() as u64) > self.cache.max_written;
        if over {
            self.cache
                .note_not_kept(&self.url, &self.cache.over_quota());
            self.abandon();
            return;
        }
        let failed = match &mut self.file {
            Some((file, _)) => file.write_all(data).is_err(),
            None => false,
        };
        if failed {
            self.abandon();
        } else {
            self.size += data.len() as u64;
        }
    }

    /// Makes the bytes written the entry for `sha256` (their hash), kept in this project's
    /// index with `content_type` and the encoding the writer was made with.
    pub fn commit(mut self, sha256: &str, content_type: Option<&str>) {
        let Some((file, temp)) = self.file.take() else {
            return;
        };
        drop(file);
        let described = Described {
            content_type: content_type.map(str::to_string),
            content_encoding: self.content_encoding.take(),
        }
        .capped();
        let line = Fetched {
            url: std::mem::take(&mut self.url),
            sha256: sha256.to_string(),
            content_type: described.content_type,
            content_encoding: described.content_encoding,
        };
        let url = line.url.clone();
        if let Err(why) = self.cache.keep(&temp, self.size, line) {
            let _ = fs::remove_file(&temp);
            self.cache.note_not_kept(&url, &why);
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

    fn settings(project: char, quota: u64, size: u64, pins: &[&[u8]]) -> CacheSettings {
        CacheSettings {
            project: ProjectKey::parse(&project.to_string().repeat(32)).expect("key"),
            quota,
            size,
            pins: pins.iter().map(|p| sha(p)).collect(),
        }
    }

    fn keep(cache: &Arc<DownloadCache>, url: &str, body: &[u8], content_type: &str) {
        let mut writer = cache.writer(url, None).expect("writer");
        writer.write(body);
        writer.commit(&sha(body), Some(content_type));
    }

    fn read(lookup: Lookup) -> (Vec<u8>, Described) {
        let Lookup::Found(mut entry) = lookup else {
            panic!("not found: {lookup:?}");
        };
        let mut read = Vec::new();
        entry.file.read_to_end(&mut read).expect("read");
        (read, entry.headers)
    }

    #[test]
    fn an_entry_is_written_whole_then_found_checked_and_a_changed_one_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(
            DownloadCache::open(dir.path(), settings('a', 1 << 20, 1 << 20, &[])).expect("open"),
        );
        let body = b"crate bytes";
        let url = "http://h/crate";
        let mut writer = cache.writer(url, Some("gzip")).expect("writer");
        writer.write(&body[..5]);
        writer.write(&body[5..]);
        assert!(matches!(
            cache.lookup(url, &sha(body)).expect("lookup"),
            Lookup::Missing
        ));
        writer.commit(&sha(body), Some("application/x-tar"));
        let (read, headers) = read(cache.lookup(url, &sha(body)).expect("lookup"));
        assert_eq!(read, body);
        assert_eq!(headers.content_type.as_deref(), Some("application/x-tar"));
        assert_eq!(headers.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );

        let path = dir.path().join("sha256").join(sha(body));
        fs::write(&path, b"other bytes").expect("tamper");
        match cache.lookup(url, &sha(body)).expect("lookup") {
            Lookup::Tampered { sha256, size } => {
                assert_eq!((sha256, size), (sha(b"other bytes"), 11));
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists(), "the changed entry is removed");
    }

    #[test]
    fn a_project_is_served_only_what_it_fetched_itself_from_that_url_with_its_own_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = b"the same bytes";
        let a = Arc::new(
            DownloadCache::open(dir.path(), settings('a', 1 << 20, 1 << 20, &[])).expect("a"),
        );
        keep(&a, "http://h/a.tar.gz", body, "application/gzip");
        let b = Arc::new(
            DownloadCache::open(dir.path(), settings('b', 1 << 20, 1 << 20, &[])).expect("b"),
        );
        // B pins A's URL, or any URL, to A's bytes: B never fetched them, nothing is served.
        for url in ["http://h/a.tar.gz", "http://h/b.tar"] {
            assert!(matches!(
                b.lookup(url, &sha(body)).expect("lookup"),
                Lookup::Missing
            ));
        }
        keep(&b, "http://h/b.tar", body, "application/x-tar");
        assert_eq!(
            read(b.lookup("http://h/b.tar", &sha(body)).expect("b"))
                .1
                .content_type
                .as_deref(),
            Some("application/x-tar")
        );
        // A's headers did not change; nor does A get B's URL.
        assert_eq!(
            read(a.lookup("http://h/a.tar.gz", &sha(body)).expect("a"))
                .1
                .content_type
                .as_deref(),
            Some("application/gzip")
        );
        assert!(matches!(
            a.lookup("http://h/b.tar", &sha(body)).expect("lookup"),
            Lookup::Missing
        ));
        // The same project, a pin of another hash: not served either.
        assert!(matches!(
            a.lookup("http://h/a.tar.gz", &sha(b"x")).expect("lookup"),
            Lookup::Missing
        ));
    }

    #[test]
    fn a_run_writes_at_most_its_quota_and_an_abandoned_entry_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(
            DownloadCache::open(dir.path(), settings('a', 8, 1 << 20, &[])).expect("open"),
        );
        let mut writer = cache.writer("http://h/x", None).expect("writer");
        writer.write(b"0123456789");
        writer.commit(&sha(b"0123456789"), None);
        assert!(matches!(
            cache
                .lookup("http://h/x", &sha(b"0123456789"))
                .expect("lookup"),
            Lookup::Missing
        ));
        assert!(
            cache.writer("http://h/y", None).is_none(),
            "the quota is used up"
        );
        assert_eq!(cache.not_kept(), 2);
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
        let cache = Arc::new(
            DownloadCache::open(dir.path(), settings('a', 100, 1 << 20, &[])).expect("open"),
        );
        drop(cache.writer("http://h/x", None).expect("writer"));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }

    #[test]
    fn a_full_cache_makes_room_from_unpinned_entries_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pinned: &[u8] = &[b'p'; 40];
        let loose: &[u8] = &[b'l'; 40];
        let a = Arc::new(
            DownloadCache::open(dir.path(), settings('a', 1 << 20, 100, &[pinned])).expect("a"),
        );
        keep(&a, "http://h/pinned", pinned, "t");
        keep(&a, "http://h/loose", loose, "t");
        let b =
            Arc::new(DownloadCache::open(dir.path(), settings('b', 1 << 20, 100, &[])).expect("b"));
        // 80 held, 30 more would pass 100: A's loose entry goes, its pinned one stays.
        keep(&b, "http://h/new", &[b'n'; 30], "t");
        assert!(dir.path().join("sha256").join(sha(pinned)).exists());
        assert!(!dir.path().join("sha256").join(sha(loose)).exists());
        assert!(dir.path().join("sha256").join(sha(&[b'n'; 30])).exists());
        // 70 held, 61 more cannot fit beside what A pins: passed on, not kept.
        keep(&b, "http://h/big", &[b'b'; 61], "t");
        assert!(!dir.path().join("sha256").join(sha(&[b'b'; 61])).exists());
        assert!(dir.path().join("sha256").join(sha(pinned)).exists());
        assert_eq!((a.not_kept(), b.not_kept()), (0, 1));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }
}
