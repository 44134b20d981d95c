//! The download cache that the builds' proxies share (`contractor-proxy --cache`): where it
//! is, how large it may grow, how much of it one build may add, and listing and clearing it.
//! The proxy keeps each complete download as `sha256/<hex>`, each project's index (URL,
//! hash, headers; the hashes its lock pins) under `projects/`, and keeps the cache under
//! its size itself (docs/proxy.md, "The download cache"): the front end asks it to measure
//! or clear the cache (`contractor-proxy cache list|clear`) and walks no entry itself.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use contractor_protocol::proxy::DownloadCacheUsage;

use crate::tools::{self, ToolError};

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

/// What the cache holds, or what clearing it removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Entries (downloads kept).
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Asks the proxy, which keeps the cache, to `list` or `clear` the cache in `dir`
/// (`contractor-proxy cache list|clear --dir DIR`).
fn ask_proxy(action: &str, dir: &Path) -> Result<Usage, ToolError> {
    let args = [
        OsStr::new("cache"),
        OsStr::new(action),
        OsStr::new("--dir"),
        dir.as_os_str(),
    ];
    let answer: DownloadCacheUsage = tools::answer(tools::PROXY, &args)?;
    Ok(Usage {
        entries: answer.entries,
        bytes: answer.bytes,
    })
}

/// How many entries and bytes the cache in `dir` holds (none when it was never made).
pub fn usage(dir: &Path) -> Result<Usage, ToolError> {
    ask_proxy("list", dir)
}

/// Removes every entry, and every project's index; what was removed.
pub fn clear(dir: &Path) -> Result<Usage, ToolError> {
    ask_proxy("clear", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_proxy_lists_and_clears_the_cache_for_the_front_end() {
        // Runs the real contractor-proxy of this build (`cargo build -p contractor-proxy`).
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("downloads");
        assert_eq!(
            usage(&cache).expect("usage"),
            Usage::default(),
            "never made"
        );
        std::fs::create_dir_all(cache.join("sha256")).expect("dir");
        std::fs::create_dir_all(cache.join("projects")).expect("dir");
        std::fs::write(cache.join("sha256").join("a".repeat(64)), [0u8; 100]).expect("entry");
        std::fs::write(cache.join("sha256").join("b".repeat(64)), [0u8; 50]).expect("entry");
        std::fs::write(cache.join("sha256/not-an-entry"), b"x").expect("other file");
        std::fs::write(cache.join("projects/index.jsonl"), "{}").expect("index");
        let held = Usage {
            entries: 2,
            bytes: 150,
        };
        assert_eq!(usage(&cache).expect("usage"), held);
        assert_eq!(clear(&cache).expect("clear"), held);
        assert_eq!(usage(&cache).expect("usage"), Usage::default());
        assert!(!cache.join("projects").exists(), "the indexes go too");
    }
}
