//! The download cache that the builds' proxies share (`contractor-proxy --cache`): where it
//! is, how large it may grow and how much of it one build may add are
//! `contractor_protocol::downloads`'s, shared with every program that starts a proxy. The
//! proxy keeps each complete download as `sha256/<hex>`, each project's index (URL, hash,
//! headers; the hashes its lock pins) under `projects/`, and keeps the cache under its size
//! itself (docs/proxy.md, "The download cache"): the front end asks it to measure or clear
//! the cache (`contractor-proxy cache list|clear`) and walks no entry itself.

use std::ffi::OsStr;
use std::path::Path;

pub use contractor_protocol::downloads::{build_quota, dir, max_bytes, SIZE_VARIABLE};
/// What the cache holds, or what clearing it removed, as the proxy answers.
pub use contractor_protocol::proxy::DownloadCacheUsage as Usage;

use crate::tools::{self, ToolError};

/// Asks the proxy, which keeps the cache, to `list` or `clear` the cache in `dir`
/// (`contractor-proxy cache list|clear --dir DIR`).
fn ask_proxy(action: &str, dir: &Path) -> Result<Usage, ToolError> {
    let args = [
        OsStr::new("cache"),
        OsStr::new(action),
        OsStr::new("--dir"),
        dir.as_os_str(),
    ];
    tools::answer(tools::PROXY, &args)
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
    fn the_proxy_lists_and_clears_the_cache_for_the_front_end() {
        // Runs the real contractor-proxy of this build (`cargo build -p contractor-proxy`).
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("downloads");
        let counted = |usage: Usage| (usage.entries, usage.bytes);
        assert_eq!(counted(usage(&cache).expect("usage")), (0, 0), "never made");
        std::fs::create_dir_all(cache.join("sha256")).expect("dir");
        std::fs::create_dir_all(cache.join("projects")).expect("dir");
        std::fs::write(cache.join("sha256").join("a".repeat(64)), [0u8; 100]).expect("entry");
        std::fs::write(cache.join("sha256").join("b".repeat(64)), [0u8; 50]).expect("entry");
        std::fs::write(cache.join("sha256/not-an-entry"), b"x").expect("other file");
        std::fs::write(cache.join("projects/index.jsonl"), "{}").expect("index");
        assert_eq!(counted(usage(&cache).expect("usage")), (2, 150));
        assert_eq!(counted(clear(&cache).expect("clear")), (2, 150));
        assert_eq!(counted(usage(&cache).expect("usage")), (0, 0));
        assert!(!cache.join("projects").exists(), "the indexes go too");
    }
}
