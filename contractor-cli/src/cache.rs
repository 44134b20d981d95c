//! The project's build cache (`[cache] paths`), kept by `contractor-store cache` in the
//! project's store directory (contractor-store/src/cache.rs and docs/store.md say how).
//!
//! The front end only asks: [`prepare`] before the build gives the job's cache, [`keep`]
//! after it keeps what the build saved, [`list`] and [`clear`] serve `contractor cache`.
//! Each is one run of the store tool with one JSON answer.

use std::path::Path;
use std::process::Command;

use contractor_protocol::agent::CacheJob;
use contractor_protocol::store::{CacheCleared, CacheKept, CacheList, CachePrepared};

use crate::tools::{self, ToolError};

/// Where the agent uploads the new cache, under the build's artifacts.
pub use contractor_protocol::store::CACHE_UPLOAD_NAME as UPLOAD_NAME;
/// A cache on disk and its description, as `contractor-store cache list` reports them.
pub use contractor_protocol::store::{CacheEntry, CacheInfo};

/// A `contractor-store cache ACTION --root ROOT` command, with `--path P` for each of
/// `paths`.
fn cache_request(action: &str, store_root: &Path, paths: &[String]) -> Result<Command, ToolError> {
    let mut command = tools::command(tools::STORE)?;
    command.args(["cache", action, "--root"]).arg(store_root);
    for path in paths {
        command.arg("--path").arg(path);
    }
    Ok(command)
}

/// Prepares build `id`'s cache job (`contractor-store cache prepare`): links the existing
/// cache (if any) into the record's `inputs/` (the store's `<store_root>/builds/<id>`) for
/// the agent to restore. None when the spec keeps no directories. What the store had to
/// remove is shown as a warning on stderr.
pub fn prepare(
    store_root: &Path,
    id: &str,
    paths: &[String],
    max_bytes: u64,
) -> std::io::Result<Option<CacheJob>> {
    let mut command = cache_request("prepare", store_root, paths).map_err(std::io::Error::other)?;
    command.args(["--build", id, "--max-bytes", &max_bytes.to_string()]);
    let prepared: CachePrepared =
        tools::answer_of(tools::STORE, command).map_err(std::io::Error::other)?;
    for warning in &prepared.warnings {
        eprintln!("contractor: warning: {}", crate::display::escape(warning));
    }
    Ok(prepared.cache)
}

/// After the build (`contractor-store cache keep`): moves a cache the agent uploaded out of
/// the artifacts into the cache directory (only if the build succeeded), and drops the
/// record's input link. Returns the new cache's size when one was kept.
pub fn keep(
    store_root: &Path,
    id: &str,
    paths: &[String],
    succeeded: bool,
) -> Result<Option<u64>, ToolError> {
    let mut command = cache_request("keep", store_root, paths)?;
    command.args(["--build", id]);
    if succeeded {
        command.arg("--success");
    }
    let kept: CacheKept = tools::answer_of(tools::STORE, command)?;
    Ok(kept.bytes)
}

/// The project's caches (`contractor-store cache list`), sorted by tar.
pub fn list(store_root: &Path) -> Result<Vec<CacheEntry>, ToolError> {
    let listed: CacheList =
        tools::answer_of(tools::STORE, cache_request("list", store_root, &[])?)?;
    Ok(listed.caches)
}

/// Deletes the project's caches (`contractor-store cache clear`); returns how many bytes
/// that freed.
pub fn clear(store_root: &Path) -> Result<u64, ToolError> {
    let command = cache_request("clear", store_root, &[])?;
    let cleared: CacheCleared = tools::answer_of(tools::STORE, command)?;
    Ok(cleared.freed_bytes)
}
