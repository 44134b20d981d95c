//! A project's index in the download cache: which URL this project fetched, with which
//! SHA-256 and which headers, and which hashes its lock pins. Bytes are shared by hash; what
//! a project may be served, and with which headers, is only ever its own index's word, so
//! no project reads, probes or changes what another sees.
//!
//! Files, under `DIR/projects/`: `<key>.jsonl` appends one [`Fetched`] line per download
//! kept (compacted when a proxy of the project starts: the last line of a URL wins, lines
//! whose bytes are gone are dropped, at most [`MAX_FETCHED`] are kept); `<key>.pins` lists
//! the hashes the project's lock pinned when its last proxy started, one per line. A
//! project's files are touched when its proxy starts: a project unused for
//! [`FORGET_AFTER`] is forgotten, and at most [`MAX_PROJECTS`] are remembered (the least
//! recently used go first).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::is_sha256;

/// The most URLs a project's index keeps (the most recent stay).
pub const MAX_FETCHED: usize = 100_000;

/// The most bytes of a project's index file; a proxy appends nothing past it.
pub const MAX_INDEX_BYTES: u64 = 32 << 20;

/// The longest URL indexed (a longer one is passed on, not kept).
pub const MAX_URL: usize = 8 * 1024;

/// The most hashes of a project's pins file (as many as `--pins` reads).
pub const MAX_PINS: usize = 100_000;

/// The most projects remembered; past it, the least recently used are forgotten.
pub const MAX_PROJECTS: usize = 512;

/// A project not built for this long is forgotten: its index and pins are removed, so its
/// entries are no longer served to it nor protected from the trim.
pub const FORGET_AFTER: Duration = Duration::from_secs(90 * 24 * 3600);

/// The form of a project key, for messages.
pub const KEY_FORM: &str = "32 lower-case hex digits (as `contractor` derives it from the \
                            project directory)";

/// Why the cache cannot serve a project.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The key is not of the accepted form.
    #[error("the project key {0:?} is not {KEY_FORM}")]
    BadKey(String),
    /// The project's files cannot be read or written.
    #[error("cannot keep the index {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A project's key: 32 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectKey(String);

impl ProjectKey {
    /// `key` if it has the accepted form ([`KEY_FORM`]).
    pub fn parse(key: &str) -> Result<ProjectKey, IndexError> {
        if contractor_protocol::hosted::is_project_key(key) {
            Ok(ProjectKey(key.to_string()))
        } else {
            Err(IndexError::BadKey(key.to_string()))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One download a project kept: a line of its index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fetched {
    /// The URL as the build asked for it.
    pub url: String,
    /// The SHA-256 of the body it answered.
    pub sha256: String,
    /// Its `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Its `Content-Encoding`: the bytes are encoded so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
}

/// A project's index as its proxy holds it: the URLs it fetched.
#[derive(Debug, Default)]
pub struct ProjectIndex {
    fetched: HashMap<String, Fetched>,
    /// Lines appended since it was loaded.
    appended: usize,
}

/// The directory of the projects' files.
pub fn projects_dir(cache: &Path) -> PathBuf {
    cache.join("projects")
}

fn index_path(cache: &Path, key: &ProjectKey) -> PathBuf {
    projects_dir(cache).join(format!("{}.jsonl", key.as_str()))
}

fn pins_path(cache: &Path, key: &ProjectKey) -> PathBuf {
    projects_dir(cache).join(format!("{}.pins", key.as_str()))
}

/// The lines of a project's index file that parse, in order (a torn last line is skipped);
/// nothing when there is none, or it is not a regular file of at most [`MAX_INDEX_BYTES`].
fn read_lines(path: &Path) -> Vec<Fetched> {
    let Ok(bytes) = contractor_protocol::file::read_regular(path, MAX_INDEX_BYTES) else {
        return Vec::new();
    };
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Fetched>(line).ok())
        .filter(|f| is_sha256(&f.sha256) && f.url.len() <= MAX_URL)
        .collect()
}

/// The hashes of a project's pins file (at most [`MAX_PINS`]).
fn read_pins(path: &Path) -> HashSet<String> {
    let max = (MAX_PINS as u64).saturating_mul(65);
    let Ok(bytes) = contractor_protocol::file::read_regular(path, max) else {
        return HashSet::new();
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|line| is_sha256(line))
        .map(str::to_string)
        .collect()
}

/// Writes `bytes` to `path` whole: a new file renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("new");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(&temp, path)
}

impl ProjectIndex {
    /// The index of `key` in the cache `dir`, compacted (the last line of each URL, only
    /// those whose bytes `present` says are there, the most recent [`MAX_FETCHED`]), and
    /// its pins file replaced by `pins`. Both files are touched: the project was used now.
    pub fn open(
        dir: &Path,
        key: &ProjectKey,
        pins: &HashSet<String>,
        present: impl Fn(&str) -> bool,
    ) -> Result<ProjectIndex, IndexError> {
        let path = index_path(dir, key);
        let lines = read_lines(&path);
        let mut order: Vec<String> = Vec::new();
        let mut fetched: HashMap<String, Fetched> = HashMap::new();
        for line in lines {
            if fetched.contains_key(&line.url) {
                order.retain(|url| *url != line.url);
            }
            order.push(line.url.clone());
            fetched.insert(line.url.clone(), line);
        }
        let keep_from = order.len().saturating_sub(MAX_FETCHED);
        let mut text = Vec::new();
        let mut kept = HashMap::new();
        for url in order.into_iter().skip(keep_from) {
            let Some(line) = fetched.remove(&url) else {
                continue;
            };
            if !present(&line.sha256) {
                continue;
            }
            if let Ok(json) = serde_json::to_vec(&line) {
                text.extend_from_slice(&json);
                text.push(b'\n');
            }
            kept.insert(url, line);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IndexError::Io { path, source }
        };
        replace(&path, &text).map_err(io(&path))?;
        let mut listed: Vec<&String> = pins.iter().take(MAX_PINS).collect();
        listed.sort();
        let pins_text: String = listed.iter().map(|sha| format!("{sha}\n")).collect();
        let pins_file = pins_path(dir, key);
        replace(&pins_file, pins_text.as_bytes()).map_err(io(&pins_file))?;
        Ok(ProjectIndex {
            fetched: kept,
            appended: 0,
        })
    }

    /// What this project fetched from `url`, if it kept it.
    pub fn get(&self, url: &str) -> Option<&Fetched> {
        self.fetched.get(url)
    }

    /// How many URLs it holds.
    pub fn len(&self) -> usize {
        self.fetched.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.fetched.is_empty()
    }

    /// Forgets `url` (its bytes were found changed and removed).
    pub fn forget(&mut self, url: &str) {
        self.fetched.remove(url);
    }

    /// Records `line` in memory and appends it to the project's file in `dir`. `false`
    /// (nothing recorded) when the index is full: [`MAX_FETCHED`] URLs, or the file at
    /// [`MAX_INDEX_BYTES`], or it cannot be written; the project's next proxy compacts it.
    pub fn append(&mut self, dir: &Path, key: &ProjectKey, line: Fetched) -> bool {
        if line.url.len() > MAX_URL
            || (self.fetched.len() >= MAX_FETCHED && !self.fetched.contains_key(&line.url))
            || self.appended >= MAX_FETCHED
        {
            return false;
        }
        let Ok(mut json) = serde_json::to_vec(&line) else {
            return false;
        };
        json.push(b'\n');
        let path = index_path(dir, key);
        let appended = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| {
                let size = file.metadata()?.len();
                if size.saturating_add(json.len() as u64) > MAX_INDEX_BYTES {
                    return Err(io::Error::other("the index is full"));
                }
                // One write of a whole line: concurrent proxies of one project interleave
                // lines, never bytes of a line.
                file.write_all(&json)
            });
        if appended.is_err() {
            return false;
        }
        self.appended += 1;
        self.fetched.insert(line.url.clone(), line);
        true
    }
}

/// The hashes the trim must keep: for each project remembered, those its lock pins that
/// its own index says it fetched (a project protects only what it can be served).
pub fn protected(dir: &Path) -> HashSet<String> {
    let mut protected = HashSet::new();
    for (key, _) in projects(dir) {
        let pins = read_pins(&pins_path(dir, &key));
        if pins.is_empty() {
            continue;
        }
        for line in read_lines(&index_path(dir, &key)) {
            if pins.contains(&line.sha256) {
                protected.insert(line.sha256);
            }
        }
    }
    protected
}

/// The projects remembered in `dir`, each with when it was last used (its pins file's
/// modification time), at most [`MAX_PROJECTS`] × 4 looked at.
fn projects(dir: &Path) -> Vec<(ProjectKey, SystemTime)> {
    let Ok(listing) = fs::read_dir(projects_dir(dir)) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for item in listing.take(MAX_PROJECTS.saturating_mul(4)).flatten() {
        let name = item.file_name();
        let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".pins")) else {
            continue;
        };
        let Ok(key) = ProjectKey::parse(key) else {
            continue;
        };
        let used = item
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        found.push((key, used));
    }
    found
}

/// Forgets the projects unused for [`FORGET_AFTER`], and the least recently used beyond
/// [`MAX_PROJECTS`] (never `keep`); how many were forgotten. Index files without a pins
/// file (left by a proxy that died) go too.
pub fn forget_old(dir: &Path, keep: &ProjectKey) -> usize {
    let mut projects = projects(dir);
    projects.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
    let now = SystemTime::now();
    let mut forgotten = 0;
    for (i, (key, used)) in projects.iter().enumerate() {
        let old = now.duration_since(*used).unwrap_or_default() > FORGET_AFTER;
        if key != keep && (old || i >= MAX_PROJECTS) {
            let _ = fs::remove_file(pins_path(dir, key));
            let _ = fs::remove_file(index_path(dir, key));
            forgotten += 1;
        }
    }
    if let Ok(listing) = fs::read_dir(projects_dir(dir)) {
        for item in listing.take(MAX_PROJECTS.saturating_mul(4)).flatten() {
            let path = item.path();
            let orphan = path.extension().is_some_and(|e| e == "jsonl")
                && !path.with_extension("pins").exists()
                && path.file_stem().and_then(|s| s.to_str()) != Some(keep.as_str());
            if orphan {
                let _ = fs::remove_file(path);
            }
        }
    }
    forgotten
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> ProjectKey {
        ProjectKey::parse(&c.to_string().repeat(32)).expect("key")
    }

    fn line(url: &str, sha: char, content_type: &str) -> Fetched {
        Fetched {
            url: url.to_string(),
            sha256: sha.to_string().repeat(64),
            content_type: Some(content_type.to_string()),
            content_encoding: None,
        }
    }

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(projects_dir(dir.path())).expect("projects");
        dir
    }

    #[test]
    fn a_key_has_one_form_and_a_bad_one_is_named() {
        assert!(ProjectKey::parse(&"0a".repeat(16)).is_ok());
        for bad in [
            "",
            "../x",
            &"A".repeat(32),
            &"a".repeat(31),
            &"a".repeat(33),
        ] {
            let error = ProjectKey::parse(bad).expect_err(bad).to_string();
            assert!(
                error.contains(&format!("{bad:?}")) && error.contains("32"),
                "{error}"
            );
        }
    }

    #[test]
    fn each_project_sees_only_its_own_urls_and_headers() {
        let dir = setup();
        let none = HashSet::new();
        let mut a = ProjectIndex::open(dir.path(), &key('a'), &none, |_| true).expect("a");
        let mut b = ProjectIndex::open(dir.path(), &key('b'), &none, |_| true).expect("b");
        assert!(a.append(dir.path(), &key('a'), line("http://h/x", '1', "text/a")));
        assert!(b.append(dir.path(), &key('b'), line("http://h/y", '1', "text/b")));
        assert_eq!(
            a.get("http://h/x").and_then(|f| f.content_type.as_deref()),
            Some("text/a")
        );
        assert!(a.get("http://h/y").is_none());
        // Reopened from the files: the same, each its own.
        let a = ProjectIndex::open(dir.path(), &key('a'), &none, |_| true).expect("a");
        let b = ProjectIndex::open(dir.path(), &key('b'), &none, |_| true).expect("b");
        assert_eq!(a.len(), 1);
        assert!(b.get("http://h/x").is_none());
        assert_eq!(
            b.get("http://h/y").and_then(|f| f.content_type.as_deref()),
            Some("text/b")
        );
    }

    #[test]
    fn compaction_keeps_the_last_line_of_a_url_and_drops_bytes_gone_and_torn_lines() {
        let dir = setup();
        let none = HashSet::new();
        let mut a = ProjectIndex::open(dir.path(), &key('a'), &none, |_| true).expect("a");
        a.append(dir.path(), &key('a'), line("http://h/x", '1', "old"));
        a.append(dir.path(), &key('a'), line("http://h/x", '2', "new"));
        a.append(dir.path(), &key('a'), line("http://h/gone", '3', "t"));
        let path = index_path(dir.path(), &key('a'));
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"url\":\"http://h/torn\",\"sha"))
            .expect("torn line");
        let present = |sha: &str| !sha.starts_with('3');
        let a = ProjectIndex::open(dir.path(), &key('a'), &none, present).expect("a");
        assert_eq!(a.len(), 1);
        let x = a.get("http://h/x").expect("x");
        assert_eq!(
            (x.sha256.as_str(), x.content_type.as_deref()),
            (&*"2".repeat(64), Some("new"))
        );
        assert_eq!(read_lines(&path).len(), 1, "the file is compacted too");
    }

    #[test]
    fn a_long_url_or_a_full_file_is_not_indexed() {
        let dir = setup();
        let mut a =
            ProjectIndex::open(dir.path(), &key('a'), &HashSet::new(), |_| true).expect("a");
        let long = format!("http://h/{}", "x".repeat(MAX_URL));
        assert!(!a.append(dir.path(), &key('a'), line(&long, '1', "t")));
        let path = index_path(dir.path(), &key('a'));
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(MAX_INDEX_BYTES))
            .expect("fill");
        assert!(!a.append(dir.path(), &key('a'), line("http://h/x", '1', "t")));
        assert!(a.is_empty());
    }

    #[test]
    fn only_pinned_hashes_a_project_fetched_itself_are_protected() {
        let dir = setup();
        let pins: HashSet<String> = ['1', '2']
            .iter()
            .map(|c| c.to_string().repeat(64))
            .collect();
        let mut a = ProjectIndex::open(dir.path(), &key('a'), &pins, |_| true).expect("a");
        a.append(dir.path(), &key('a'), line("http://h/x", '1', "t"));
        a.append(dir.path(), &key('a'), line("http://h/y", '3', "t"));
        // B pins what A fetched, but fetched none of it: it protects nothing.
        let b_pins: HashSet<String> = ['3'].iter().map(|c| c.to_string().repeat(64)).collect();
        ProjectIndex::open(dir.path(), &key('b'), &b_pins, |_| true).expect("b");
        let protected = protected(dir.path());
        assert_eq!(protected, ["1".repeat(64)].into_iter().collect());
    }

    #[test]
    fn projects_unused_long_are_forgotten_but_not_the_one_in_use() {
        let dir = setup();
        let none = HashSet::new();
        for c in ['a', 'b', 'c'] {
            ProjectIndex::open(dir.path(), &key(c), &none, |_| true).expect("open");
        }
        let long_ago = SystemTime::now() - FORGET_AFTER - Duration::from_secs(60);
        for c in ['a', 'b'] {
            fs::File::options()
                .write(true)
                .open(pins_path(dir.path(), &key(c)))
                .and_then(|f| f.set_modified(long_ago))
                .expect("age");
        }
        assert_eq!(forget_old(dir.path(), &key('a')), 1);
        assert!(pins_path(dir.path(), &key('a')).exists());
        assert!(!pins_path(dir.path(), &key('b')).exists());
        assert!(!index_path(dir.path(), &key('b')).exists());
        assert!(pins_path(dir.path(), &key('c')).exists());
    }
}
