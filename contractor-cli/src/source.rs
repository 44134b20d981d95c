//! Packs the project's source tree into the build record as `source.tar`, by running
//! `contractor-store pack` (the walk itself, its bounds and its handling of links, special
//! files and `.gitignore` are in contractor-store/src/pack.rs and docs/store.md).
//!
//! The front end keeps only what it needs to report: how big the tar is, what was left out,
//! and, when packing fails, whether the project or the host is at fault (the tool's error
//! code), with the tool's own messages as the error's chain.

use std::path::Path;

use contractor_protocol::error::ToolCode;
use contractor_protocol::store::SourceSelection;

use crate::tools::{self, ToolError, ToolMessages};

/// Errors packing the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The tree has more entries than the store packs (`source_too_many_entries`): the
    /// project's fault. The store's messages say how many are accepted.
    #[error(transparent)]
    TooManyEntries(ToolMessages),
    /// A directory or file of the tree could not be read (`source_unreadable`): the
    /// project's fault. The store's messages name the file.
    #[error(transparent)]
    Unreadable(ToolMessages),
    /// The tar could not be written (`source_pack`): the host's fault. The store's messages
    /// name the file.
    #[error(transparent)]
    Write(ToolMessages),
    /// The store could not be run, or failed without saying why: the host's fault.
    #[error(transparent)]
    Tool(ToolError),
}

impl SourceError {
    /// Whether the project is at fault (it cannot be packed as it is), not the host.
    pub fn is_project_error(&self) -> bool {
        matches!(
            self,
            SourceError::TooManyEntries(_) | SourceError::Unreadable(_)
        )
    }
}

/// What was packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// Files, directories and links in the tar.
    pub entries: usize,
    /// Size of the tar in bytes.
    pub bytes: u64,
    /// What was left out or not applied, one line each (for the user, on stderr; the names
    /// in them are the project's, so escape them).
    pub warnings: Vec<String>,
    /// Which rule chose the files, and how many each left out.
    pub selection: Option<SourceSelection>,
}

/// Packs `project` into the tar file `tar` (`contractor-store pack`).
pub fn pack(project: &Path, tar: &Path) -> Result<Packed, SourceError> {
    run_pack(project, tar, None)
}

/// [`pack`] with at most `max_entries` entries (`--max-entries`; at least 1, at most the
/// store's bound of 1,000,000).
pub fn pack_at_most(project: &Path, tar: &Path, max_entries: usize) -> Result<Packed, SourceError> {
    run_pack(project, tar, Some(max_entries))
}

fn run_pack(project: &Path, tar: &Path, max_entries: Option<usize>) -> Result<Packed, SourceError> {
    let mut command = tools::command(tools::STORE).map_err(SourceError::Tool)?;
    command
        .args(["pack", "--project"])
        .arg(project)
        .arg("--out")
        .arg(tar);
    if let Some(max) = max_entries {
        command.args(["--max-entries", &max.to_string()]);
    }
    let packed: contractor_protocol::store::Packed = tools::answer_of(tools::STORE, command)
        .map_err(|err| {
            let messages = err.messages();
            match (err.tool_code(), messages) {
                (Some(ToolCode::SourceTooManyEntries), Some(m)) => SourceError::TooManyEntries(m),
                (Some(ToolCode::SourceUnreadable), Some(m)) => SourceError::Unreadable(m),
                (Some(ToolCode::SourcePack), Some(m)) => SourceError::Write(m),
                _ => SourceError::Tool(err),
            }
        })?;
    Ok(Packed {
        entries: usize::try_from(packed.entries).unwrap_or(usize::MAX),
        bytes: packed.bytes,
        warnings: packed.warnings,
        selection: packed.selection,
    })
}
