//! `contractor.lock`: the downloads a project's builds must get byte for byte, by URL and
//! SHA-256, written by `contractor pin` from a successful build's `downloads.jsonl`.
//!
//! With a lock beside `contractor.toml`, the build's proxy is given its pins (`--pins`): a
//! download of a pinned URL whose bytes hash otherwise never reaches the guest (the proxy
//! stages and verifies the whole body before serving it; a mismatch is answered 502), and
//! the build fails naming the URL and both hashes.
//! Downloads of URLs the lock does not name are allowed, counted and reported.
//!
//! ```toml
//! # contractor.lock: ... (a comment says which build it was written from)
//! version = 1
//!
//! [[download]]
//! url = "https://index.crates.io/artifactory/api/cargo/crates-io/v1/crates/itoa/1.0.19/download"
//! sha256 = "3bd1574e617a9a6c1f8f8181bd7e841e1f20e4277607ef28945765188d6284d4"
//! size = 16014
//! ```
//!
//! The downloads are sorted by URL, one per URL, so that the file diffs well.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use contractor_protocol::proxy::Download;
use serde::{Deserialize, Serialize};

/// The lock file's name, in the project directory.
pub const LOCK_FILE: &str = "contractor.lock";
/// The lock file format written now.
pub const LOCK_VERSION: u32 = 1;
/// The most bytes of a lock file that are read.
pub const MAX_LOCK_BYTES: u64 = 16 << 20;
/// The most downloads a lock may pin (the proxy reads as many).
pub const MAX_PINS: usize = 100_000;

/// A lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// [`LOCK_VERSION`].
    pub version: u32,
    /// The pinned downloads, sorted by URL.
    #[serde(default, rename = "download")]
    pub downloads: Vec<Pin>,
}

/// One pinned download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The URL as the client asked for it.
    pub url: String,
    /// SHA-256 of its body, lower-case hex.
    pub sha256: String,
    /// Its size in bytes (for people; the hash decides).
    pub size: u64,
}

/// What is wrong with a lock file, or with pinning.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The file could not be read.
    #[error("cannot read {path} (a regular file of at most {MAX_LOCK_BYTES} bytes): {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why: said in the message, and so not a `#[source]` (a printed chain would say
        /// it twice).
        error: std::io::Error,
    },
    /// The TOML did not parse, or has unknown fields.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// `line L, column C, at `…`: ` and toml's message
        /// ([`crate::spec::toml_problem`]).
        message: String,
    },
    /// A version this release does not read.
    #[error("{path}: `version` = {version}: this release reads version {LOCK_VERSION}; write it again with `contractor pin`")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version written.
        version: u32,
    },
    /// A pin that is not a SHA-256.
    #[error("{path}: the `sha256` of {url:?} is {sha256:?}; use 64 lower-case hex digits")]
    BadHash {
        /// The file.
        path: PathBuf,
        /// The download.
        url: String,
        /// The value written.
        sha256: String,
    },
    /// A URL pinned twice.
    #[error("{path}: {url:?} is pinned twice; keep one `[[download]]` per URL")]
    Twice {
        /// The file.
        path: PathBuf,
        /// The download.
        url: String,
    },
    /// Too many pins.
    #[error("{path}: {count} downloads pinned; at most {MAX_PINS} are")]
    TooMany {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
    },
    /// The build to pin from did not succeed.
    #[error("build {0} did not succeed; pin the downloads of a build you trust (`contractor builds` lists them)")]
    NotSuccessful(String),
    /// The file could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why: said in the message, and so not a `#[source]` (a printed chain would say
        /// it twice).
        error: std::io::Error,
    },
}

impl LockError {
    /// True when the project's lock (or the build asked for) is at fault, false when the
    /// lock could not be written.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, LockError::Write { .. })
    }
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The lock of the project in `project_dir`, if it has one, checked.
pub fn load(project_dir: &Path) -> Result<Option<Lock>, LockError> {
    let path = project_dir.join(LOCK_FILE);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    let bytes =
        contractor_protocol::file::read_regular(&path, MAX_LOCK_BYTES).map_err(|source| {
            LockError::Read {
                path: path.clone(),
                error: source,
            }
        })?;
    parse(&path, &String::from_utf8_lossy(&bytes)).map(Some)
}

/// Parses and checks lock text read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Lock, LockError> {
    let lock: Lock = toml::from_str(text).map_err(|e| LockError::Parse {
        path: path.to_path_buf(),
        message: crate::spec::toml_problem(text, e.message(), e.span()),
    })?;
    if lock.version != LOCK_VERSION {
        return Err(LockError::Version {
            path: path.to_path_buf(),
            version: lock.version,
        });
    }
    if lock.downloads.len() > MAX_PINS {
        return Err(LockError::TooMany {
            path: path.to_path_buf(),
            count: lock.downloads.len(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for pin in &lock.downloads {
        if !is_sha256(&pin.sha256) {
            return Err(LockError::BadHash {
                path: path.to_path_buf(),
                url: pin.url.clone(),
                sha256: pin.sha256.clone(),
            });
        }
        if !seen.insert(pin.url.as_str()) {
            return Err(LockError::Twice {
                path: path.to_path_buf(),
                url: pin.url.clone(),
            });
        }
    }
    Ok(lock)
}

/// One download as `contractor pin` weighs it: its URL, SHA-256 and size, and whether it was
/// a complete `GET` answered 200 (what the proxy can serve again).
pub struct Fetched<'a> {
    /// The URL fetched.
    pub url: &'a str,
    /// The SHA-256 of its body, as the record has it (checked here).
    pub sha256: &'a str,
    /// The body's size in bytes.
    pub size: u64,
    /// Whether it was a complete `GET` answered 200.
    pub complete_get_200: bool,
}

/// The rule of `contractor pin`: every complete `GET` answered 200 with a SHA-256, the last
/// of each URL, sorted by URL, at most [`MAX_PINS`].
pub fn lock_of<'a>(fetched: impl IntoIterator<Item = Fetched<'a>>) -> Lock {
    let mut pins: BTreeMap<String, Pin> = BTreeMap::new();
    for download in fetched {
        let url = download.url;
        let good = download.complete_get_200 && is_sha256(download.sha256);
        if good && (pins.len() < MAX_PINS || pins.contains_key(url)) {
            pins.insert(
                url.to_string(),
                Pin {
                    url: url.to_string(),
                    sha256: download.sha256.to_string(),
                    size: download.size,
                },
            );
        }
    }
    Lock {
        version: LOCK_VERSION,
        downloads: pins.into_values().collect(),
    }
}

/// The lock of a build's downloads (`contractor-store record downloads`' typed lines):
/// [`lock_of`] them.
pub fn from_downloads(downloads: &[Download]) -> Lock {
    lock_of(downloads.iter().map(|download| Fetched {
        url: &download.url,
        sha256: &download.sha256,
        size: download.size,
        complete_get_200: download.method == "GET" && download.status == 200 && download.complete,
    }))
}

/// The lock as written: a comment naming the build, then the TOML.
pub fn render(lock: &Lock, build_id: &str) -> String {
    let body = toml::to_string(lock).unwrap_or_default();
    format!(
        "# contractor.lock: the downloads builds of this project must get byte for byte.\n\
         # Written by `contractor pin` from build {build_id}; a download of a URL below with\n\
         # other bytes fails the build. Run `contractor pin` again after a build you trust.\n\
         {body}"
    )
}

/// The pins as the proxy reads them (`--pins`): a JSON object of URL → SHA-256.
pub fn pins_json(lock: &Lock) -> String {
    let map: BTreeMap<&str, &str> = lock
        .downloads
        .iter()
        .map(|p| (p.url.as_str(), p.sha256.as_str()))
        .collect();
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".into())
}

/// What changed from `old` to `new`: (added, changed, removed) URLs.
pub fn changes(old: &Lock, new: &Lock) -> (usize, usize, usize) {
    let before: BTreeMap<&str, &str> = old
        .downloads
        .iter()
        .map(|p| (p.url.as_str(), p.sha256.as_str()))
        .collect();
    let after: BTreeMap<&str, &str> = new
        .downloads
        .iter()
        .map(|p| (p.url.as_str(), p.sha256.as_str()))
        .collect();
    let added = after.keys().filter(|u| !before.contains_key(*u)).count();
    let removed = before.keys().filter(|u| !after.contains_key(*u)).count();
    let changed = after
        .iter()
        .filter(|(u, sha)| before.get(*u).is_some_and(|old| old != *sha))
        .count();
    (added, changed, removed)
}

/// What [`pin`] wrote: the file, how many downloads it pins, and the URLs added, pinned to
/// other bytes, and removed since the lock it replaced (all added when there was none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The lock file.
    pub path: PathBuf,
    /// The downloads it pins.
    pub pins: usize,
    /// URLs the old lock did not pin.
    pub added: usize,
    /// URLs pinned to other bytes than before.
    pub changed: usize,
    /// URLs no longer pinned.
    pub removed: usize,
}

/// `contractor pin`: writes the lock of `downloads`, those of build `build_id`, as the lock
/// of `project_dir`. The lock it replaces is read (and checked) first: a bad one is
/// refused, left as it is.
pub fn pin(
    project_dir: &Path,
    build_id: &str,
    downloads: &[Download],
) -> Result<Pinned, LockError> {
    let new = from_downloads(downloads);
    let old = load(project_dir)?;
    let path = write(project_dir, &render(&new, build_id))?;
    let (added, changed, removed) = match &old {
        Some(old) => changes(old, &new),
        None => (new.downloads.len(), 0, 0),
    };
    Ok(Pinned {
        path,
        pins: new.downloads.len(),
        added,
        changed,
        removed,
    })
}

/// Writes `text` as the lock of `project_dir` (through a temporary file, renamed).
pub fn write(project_dir: &Path, text: &str) -> Result<PathBuf, LockError> {
    let path = project_dir.join(LOCK_FILE);
    let temporary = project_dir.join(format!(".{LOCK_FILE}.{}", std::process::id()));
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            LockError::Write {
                path: path.clone(),
                error: source,
            }
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3bd1574e617a9a6c1f8f8181bd7e841e1f20e4277607ef28945765188d6284d4";
    const B: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn line(method: &str, url: &str, status: u16, sha: &str, complete: bool) -> Download {
        let line = format!(
            r#"{{"type":"download","time":1.0,"method":"{method}","url":"{url}","status":{status},"size":3,"sha256":"{sha}","complete":{complete},"phase":"fetch"}}"#
        );
        serde_json::from_str(&line).expect("a download line")
    }

    #[test]
    fn only_complete_successful_gets_are_pinned_sorted_once_each() {
        let downloads = [
            line("GET", "https://z.test/last", 200, A, true),
            line("GET", "https://a.test/first", 200, A, true),
            line("GET", "https://a.test/first", 200, B, true),
            line("HEAD", "https://a.test/head", 200, A, true),
            line("GET", "https://a.test/missing", 404, A, true),
            line("GET", "https://a.test/cut", 200, A, false),
            line("GET", "https://a.test/not-a-hash", 200, "ab12", true),
        ];
        let lock = from_downloads(&downloads);
        let pinned: Vec<(&str, &str)> = lock
            .downloads
            .iter()
            .map(|p| (p.url.as_str(), p.sha256.as_str()))
            .collect();
        assert_eq!(
            pinned,
            [("https://a.test/first", B), ("https://z.test/last", A)]
        );
        // What is written reads back the same.
        let text = render(&lock, "20261202-120000-abcdef");
        assert!(text.starts_with("# contractor.lock"));
        assert_eq!(
            parse(Path::new("contractor.lock"), &text).expect("parse"),
            lock
        );
        assert_eq!(
            pins_json(&lock),
            format!(r#"{{"https://a.test/first":"{B}","https://z.test/last":"{A}"}}"#)
        );
    }

    #[test]
    fn a_bad_lock_is_refused_naming_the_file_and_value() {
        let path = Path::new("proj/contractor.lock");
        let cases = [
            ("version = 2\n", "this release reads version 1"),
            (
                "version = 1\n[[download]]\nurl = \"https://a/\"\nsha256 = \"abc\"\nsize = 1\n",
                "the `sha256` of \"https://a/\" is \"abc\"",
            ),
            (
                &format!("version = 1\n[[download]]\nurl = \"u\"\nsha256 = \"{A}\"\nsize = 1\n[[download]]\nurl = \"u\"\nsha256 = \"{B}\"\nsize = 1\n"),
                "\"u\" is pinned twice",
            ),
            ("version = 1\nextra = true\n", "unknown field"),
        ];
        for (text, says) in cases {
            let err = parse(path, text).expect_err(text).to_string();
            assert!(err.starts_with("proj/contractor.lock"), "{err}");
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn lock_toml_errors_are_one_line_and_read_errors_said_once() {
        let err = parse(
            Path::new("proj/contractor.lock"),
            "version = 1\nextra = true\n",
        )
        .expect_err("unknown field");
        assert_eq!(
            err.to_string(),
            "proj/contractor.lock: line 2, column 1, at `extra = true`: unknown field `extra`, \
             expected `version` or `download`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(LOCK_FILE)).expect("a directory");
        let err = load(dir.path()).expect_err("not a file");
        let chain = contractor_protocol::result::error_chain(&err);
        assert_eq!(chain.len(), 1, "{chain:?}");
        assert!(chain[0].contains("not a regular file"), "{chain:?}");
    }

    #[test]
    fn pinning_writes_the_lock_and_counts_what_changed_and_keeps_a_bad_one() {
        let project = tempfile::tempdir().expect("tempdir");
        let first = [
            line("GET", "https://a.test/a", 200, A, true),
            line("GET", "https://a.test/b", 200, A, true),
        ];
        let pinned = pin(project.path(), "20261202-120000-abcdef", &first).expect("pin");
        assert_eq!(pinned.path, project.path().join(LOCK_FILE));
        assert_eq!((pinned.pins, pinned.added, pinned.changed), (2, 2, 0));
        let written = load(project.path()).expect("load").expect("a lock");
        assert_eq!(written, from_downloads(&first));
        let second = [
            line("GET", "https://a.test/b", 200, B, true),
            line("GET", "https://a.test/c", 200, A, true),
        ];
        let pinned = pin(project.path(), "20261202-130000-abcdef", &second).expect("pin");
        assert_eq!(
            (pinned.pins, pinned.added, pinned.changed, pinned.removed),
            (2, 1, 1, 1)
        );
        // A lock that does not parse is the user's to fix, and stays as it is.
        std::fs::write(project.path().join(LOCK_FILE), "version = 2\n").expect("write");
        let err = pin(project.path(), "20261202-140000-abcdef", &first).expect_err("bad lock");
        assert!(err.is_bad_input(), "{err}");
        let text = std::fs::read_to_string(project.path().join(LOCK_FILE)).expect("read");
        assert_eq!(text, "version = 2\n");
        // One that cannot be written is not.
        let gone = project.path().join("gone");
        let err = pin(&gone, "20261202-140000-abcdef", &first).expect_err("no directory");
        assert!(!err.is_bad_input(), "{err}");
    }

    #[test]
    fn changes_count_added_changed_and_removed_urls() {
        let pin = |url: &str, sha: &str| Pin {
            url: url.into(),
            sha256: sha.into(),
            size: 1,
        };
        let old = Lock {
            version: 1,
            downloads: vec![pin("a", A), pin("b", A), pin("c", A)],
        };
        let new = Lock {
            version: 1,
            downloads: vec![pin("a", A), pin("b", B), pin("d", A)],
        };
        assert_eq!(changes(&old, &new), (1, 1, 1));
    }
}
