//! The project's build cache (`[cache] paths`), kept by `contractor-store cache` in the
//! project's store directory (contractor-store/src/cache.rs and docs/store.md say how).
//!
//! The front end only asks: [`prepare`] before the build gives the job's cache, [`keep`]
//! after it keeps what the build saved, [`list`] and [`clear`] serve `contractor cache`.
//! Each is one run of the store tool with one JSON answer.

use std::path::{Path, PathBuf};
use std::process::Command;

use contractor_protocol::agent::CacheJob;
use contractor_protocol::store::{CacheCleared, CacheKept, CacheList, CachePrepared};

use crate::tools::{self, ToolError};

/// Where the agent uploads the new cache, under the build's artifacts.
pub use contractor_protocol::store::CACHE_UPLOAD_NAME as UPLOAD_NAME;
/// A cache on disk and its description, as `contractor-store cache list` reports them.
pub use contractor_protocol::store::{CacheEntry, CacheInfo};

/// Errors of the build cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The record is not the build's record in the store, where the store tool works.
    #[error(
        "the record {} of build {id} is not {}, where contractor-store keeps it",
        record.display(),
        expected.display()
    )]
    Record {
        /// The record given.
        record: PathBuf,
        /// The build.
        id: String,
        /// Where the store keeps it.
        expected: PathBuf,
    },
    /// The store tool failed; its messages say why.
    #[error(transparent)]
    Tool(ToolError),
}

/// Refuses a `record` that is not `<store_root>/builds/<id>`.
fn check_record(store_root: &Path, record: &Path, id: &str) -> Result<(), CacheError> {
    let expected = store_root.join("builds").join(id);
    if record == expected {
        Ok(())
    } else {
        Err(CacheError::Record {
            record: record.to_path_buf(),
            id: id.to_string(),
            expected,
        })
    }
}

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
/// cache (if any) into the record's `inputs/` for the agent to restore. None when the spec
/// keeps no directories. `record` must be `<store_root>/builds/<id>`. What the store had to
/// remove is shown as a warning on stderr.
pub fn prepare(
    store_root: &Path,
    record: &Path,
    id: &str,
    paths: &[String],
    max_bytes: u64,
) -> std::io::Result<Option<CacheJob>> {
    check_record(store_root, record, id).map_err(std::io::Error::other)?;
    let tool = |e| std::io::Error::other(CacheError::Tool(e));
    let mut command = cache_request("prepare", store_root, paths).map_err(tool)?;
    command.args(["--build", id, "--max-bytes", &max_bytes.to_string()]);
    let prepared: CachePrepared = tools::answer_of(tools::STORE, command).map_err(tool)?;
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
    record: &Path,
    id: &str,
    paths: &[String],
    succeeded: bool,
) -> Result<Option<u64>, CacheError> {
    check_record(store_root, record, id)?;
    let mut command = cache_request("keep", store_root, paths).map_err(CacheError::Tool)?;
    command.args(["--build", id]);
    if succeeded {
        command.arg("--success");
    }
    let kept: CacheKept = tools::answer_of(tools::STORE, command).map_err(CacheError::Tool)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_elsewhere_than_the_store_keeps_it_is_refused_by_name() {
        let err =
            check_record(Path::new("/s"), Path::new("/t/builds/b1"), "b1").expect_err("elsewhere");
        assert_eq!(
            err.to_string(),
            "the record /t/builds/b1 of build b1 is not /s/builds/b1, where contractor-store keeps it"
        );
        assert!(check_record(Path::new("/s"), Path::new("/s/builds/b1"), "b1").is_ok());
    }
}
