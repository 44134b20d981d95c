//! Build records, as the store keeps them: `contractor builds`, `show`, `log`, `downloads`,
//! `pin`, and the record `contractor shell ID` and `contractor rebuild` start from.
//!
//! A record is `<project>/.contractor/builds/<id>/`. The front end opens no file of one to
//! read it: it asks the store (`contractor-store record list|show|downloads|log`, confined
//! read-only to `builds/`), which checks the id, refuses links and bounds every read, and
//! only renders the answer. What writes record files is also the store's: it opens a build's
//! record ([`open_new`]) and closes it ([`close`]: `artifacts.json`, `result.json`, a kept
//! VM's `vm.json`, which [`forget_kept_vm`] removes once the VM is gone),
//! receives a build host's record (confined to it), and decides which builds are abandoned
//! and closes them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use contractor_protocol::proxy::Download;
use contractor_protocol::result::{BuildResult, ErrorInfo, Limit, Outcome};
use contractor_protocol::store::{
    KeptVm, KeptVmForgotten, RecordClosed, RecordDownloads, RecordEntry, RecordList, RecordLog,
    RecordOpened, RecordShown,
};

use serde::de::DeserializeOwned;

use contractor_protocol::tool::ToolFailure;

use crate::tools::{self, Lines, ToolError};

/// Errors reading records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store refused the request for a build that is not there (or no build yet, or the
    /// id is not one: `no_builds`, `no_such_build`, `bad_build`, its words say what to do),
    /// could not read the record (its words), could not be asked, or answered something
    /// else than its protocol.
    #[error(transparent)]
    Store(#[from] ToolFailure),
    /// The log could not be copied out.
    #[error("cannot write the log")]
    Write(#[source] std::io::Error),
}

impl RecordError {
    /// True when the build asked for is not there (the user's input: the store refused it),
    /// false when its record could not be read.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, RecordError::Store(failure) if failure.is_bad_input())
    }
}

impl From<ToolError> for RecordError {
    fn from(error: ToolError) -> RecordError {
        RecordError::Store(error.into())
    }
}

/// A store request about the records under `store_root` (`record SUBCOMMAND --root ROOT
/// [--build ID] --json-errors`), started; returns it, being read, and its first line.
fn request<T: DeserializeOwned>(
    subcommand: &str,
    store_root: &Path,
    id: Option<&str>,
    more: &[&str],
) -> Result<(Lines, T), ToolError> {
    let mut command = tools::command(tools::STORE)?;
    command
        .args(["record", subcommand, "--root"])
        .arg(store_root)
        .args(id.map(|id| ["--build", id]).into_iter().flatten())
        .args(more);
    Lines::start(tools::STORE, command)
}

/// All builds of the project whose store is `store_root`, oldest first
/// (`contractor-store record list`).
pub fn list(store_root: &Path) -> Result<Vec<RecordEntry>, RecordError> {
    let (lines, header) = request::<RecordList>("list", store_root, None, &[])?;
    Ok(lines.rest(header.builds)?)
}

/// The record of build `id`, or of the newest one (`contractor-store record show`): its
/// result, its artifacts with their sizes and digests, the tally of its downloads.
pub fn show(store_root: &Path, id: Option<&str>) -> Result<RecordShown, RecordError> {
    let (lines, shown) = request::<RecordShown>("show", store_root, id, &[])?;
    lines.rest::<RecordShown>(0)?;
    Ok(shown)
}

/// The record directory and kept VM of build `id` (`contractor-store record show
/// --kept-vm`: the store reads its `vm.json`, confined and bounded); a record without one
/// is the user's input, its words say what to do.
pub fn kept_vm(store_root: &Path, id: &str) -> Result<(PathBuf, KeptVm), RecordError> {
    let (lines, shown) = request::<RecordShown>("show", store_root, Some(id), &["--kept-vm"])?;
    lines.rest::<RecordShown>(0)?;
    let kept = shown.kept_vm.ok_or(ToolFailure::WrongAnswer {
        name: tools::STORE,
        request: "record show --kept-vm",
    })?;
    Ok((shown.dir, kept))
}

/// The downloads of build `id` (the newest), checked and typed by the store
/// (`contractor-store record downloads`), and the build's id.
pub fn downloads(
    store_root: &Path,
    id: Option<&str>,
) -> Result<(String, Vec<Download>), RecordError> {
    let (lines, header) = request::<RecordDownloads>("downloads", store_root, id, &[])?;
    Ok((header.id, lines.rest(header.downloads)?))
}

/// Copies the log of build `id` (the newest; its console log with `console`) to `out`, as
/// the store sends it (`contractor-store record log`: the bytes as written; with `tail`,
/// only its last `tail` lines, at most 1,000).
pub fn log(
    store_root: &Path,
    id: Option<&str>,
    console: bool,
    tail: Option<u32>,
    out: &mut dyn Write,
) -> Result<(), RecordError> {
    let tail = tail.map(|lines| lines.to_string());
    let mut more = Vec::new();
    more.extend(console.then_some("--console"));
    more.extend(tail.iter().flat_map(|lines| ["--tail", lines.as_str()]));
    let (mut lines, header) = request::<RecordLog>("log", store_root, id, &more)?;
    let copied = std::io::copy(&mut lines.bytes().take(header.bytes), out)
        .and_then(|copied| out.flush().map(|()| copied))
        .map_err(RecordError::Write)?;
    // A log cut short is the store's failure, said by its end.
    lines.rest::<RecordLog>(u64::from(copied != header.bytes))?;
    Ok(())
}

/// The store directory and build id of the record directory `record`
/// (`<store>/builds/<id>`).
pub fn store_and_id(record: &Path) -> (&Path, &std::ffi::OsStr) {
    let root = record
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    (root, record.file_name().unwrap_or_default())
}

/// Asks the store to open the record of a new build under `store_root`
/// (`contractor-store record open`: abandoned records closed, the directory made, owned by
/// this process, `latest` pointed at it) with the id `id` (else a new one); returns its id.
pub fn open_new(store_root: &Path, id: Option<&str>) -> Result<String, ToolError> {
    let mut command = tools::command(tools::STORE)?;
    command
        .args(["record", "open", "--root"])
        .arg(store_root)
        .args(["--owner", &std::process::id().to_string()])
        .args(id.map(|id| ["--id", id]).into_iter().flatten());
    let opened: RecordOpened = tools::answer_of(tools::STORE, command)?;
    Ok(opened.id)
}

/// How a build ended, as the front end decided it: what `record close` is told.
pub struct Ended<'a> {
    /// When it started.
    pub started: std::time::SystemTime,
    /// `[build] artifacts`: a success that stored none of one is failed.
    pub artifacts: &'a [String],
    /// Its outcome, exit code, limit and error.
    pub outcome: Outcome,
    /// The script's exit code.
    pub exit_code: Option<i32>,
    /// The limit it hit.
    pub limit: Option<Limit>,
    /// What went wrong.
    pub error: Option<&'a ErrorInfo>,
    /// The VM kept for `contractor shell`: the store writes it as the record's `vm.json`.
    pub kept_vm: Option<&'a KeptVm>,
}

/// Asks the store to close `record` (`contractor-store record close`: the artifacts indexed,
/// each declared one checked, the proxy's refusals tallied, `result.json` written, the owner
/// removed) with the end `ended`; returns the result written.
pub fn close(record: &Path, ended: &Ended) -> Result<BuildResult, ToolError> {
    let (root, id) = store_and_id(record);
    let started = ended
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        .to_string();
    let mut command = tools::command(tools::STORE)?;
    command
        .args(["record", "close", "--root"])
        .arg(root)
        .arg("--build")
        .arg(id)
        .args(["--started", &started, "--outcome", ended.outcome.as_str()]);
    // `--flag=VALUE`: a value may begin with `-` (a guest's error message).
    for pattern in ended.artifacts {
        command.arg(format!("--artifact={pattern}"));
    }
    if let Some(exit_code) = ended.exit_code {
        command.args(["--exit-code", &exit_code.to_string()]);
    }
    if let Some(limit) = ended.limit {
        command.args(["--limit", limit.as_str()]);
    }
    if let Some(error) = ended.error {
        command.arg(format!("--error-code={}", error.code));
        for message in &error.chain {
            command.arg(format!("--error={message}"));
        }
    }
    if let Some(kept) = ended.kept_vm {
        let json = serde_json::to_string(kept).unwrap_or_default();
        command.arg(format!("--kept-vm={json}"));
    }
    let closed: RecordClosed = tools::answer_of(tools::STORE, command)?;
    Ok(closed.result)
}

/// Asks the store to remove `record`'s `vm.json` once its VM is gone (`contractor-store
/// record forget-vm`, confined to the record).
pub fn forget_kept_vm(record: &Path) -> Result<(), RecordError> {
    let (root, id) = store_and_id(record);
    let (lines, _) = request::<KeptVmForgotten>("forget-vm", root, id.to_str(), &[])?;
    lines.rest::<KeptVmForgotten>(0)?;
    Ok(())
}

/// The artifacts of `record` (`<store>/builds/<id>`, not closed yet: a build host's record
/// just received) as the store's index names them, sorted: each a path beneath `artifacts/`
/// of plain names (`contractor-store record show`, which reads `artifacts.json` confined).
/// None when the store cannot say.
pub fn stored_artifacts(record: &Path) -> Vec<PathBuf> {
    let (root, id) = store_and_id(record);
    match id.to_str().map(|id| show(root, Some(id))) {
        Some(Ok(shown)) => shown.artifacts.into_iter().map(|a| a.path).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_what_the_stores_index_names() {
        // Runs the real contractor-store of this build (`cargo build -p contractor-store`).
        // An index as the store writes it, naming `paths`.
        let index = |paths: &[&str]| {
            let entries: Vec<String> = paths
                .iter()
                .map(|p| format!(r#"{{"path":"{p}","size":1,"sha256":"ab","executable":false}}"#))
                .collect();
            format!(
                r#"{{"version":1,"build":"b","artifacts":[{}]}}"#,
                entries.join(",")
            )
        };
        let store = tempfile::tempdir().expect("tempdir");
        let record = store.path().join("builds/20261125-100000-aaaaaa");
        std::fs::create_dir_all(record.join("artifacts/bin")).expect("mkdir");
        std::fs::write(record.join("artifacts/bin/tool"), "x").expect("write");
        std::fs::write(record.join("artifacts/a.txt"), "x").expect("write");
        assert_eq!(
            stored_artifacts(&record),
            Vec::<PathBuf>::new(),
            "no index yet"
        );
        std::fs::write(record.join("artifacts.json"), index(&["bin/tool", "a.txt"]))
            .expect("index");
        assert_eq!(
            stored_artifacts(&record),
            [
                record.join("artifacts/a.txt"),
                record.join("artifacts/bin/tool")
            ]
        );
        // What the index names is what is listed: a file it does not name is not walked to,
        // and a path that would leave artifacts/ is dropped.
        std::fs::write(record.join("artifacts/later"), "x").expect("write");
        std::fs::write(
            record.join("artifacts.json"),
            index(&["a.txt", "../../x", "/etc/passwd"]),
        )
        .expect("index");
        assert_eq!(stored_artifacts(&record), [record.join("artifacts/a.txt")]);
        // Only a regular file is read.
        std::fs::remove_file(record.join("artifacts.json")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", record.join("artifacts.json")).expect("link");
        assert_eq!(stored_artifacts(&record), Vec::<PathBuf>::new());
    }
}
