//! `record close`: the `result.json` of a build that ran, written by the store from what the
//! record and the run's events say, so that a composition of the tools (examples/pipeline.sh)
//! closes its record as `contractor build` does without re-deriving the result itself.
//!
//! The result is the run's `finished` event, or how the caller says the build ended (its
//! outcome, exit code, limit and error, the error capped as the run's is), the artifacts of the index written now
//! (`artifacts.json`), a success whose declared artifact no stored file matches turned into
//! `failed` (`artifact_missing`; without `finished`, the stream's error object or code
//! `run`), and the refusals of `proxy.jsonl` tallied by the
//! protocol's one rule (`Refusals`; lines marked `"phase":"script"` are the offline script's,
//! `refused_offline`). A download that did not match its pin (contractor.lock), as the
//! proxies' summaries filed last in `proxy.jsonl` count them, fails the build whatever it
//! ended as (`download_mismatch`, one chain line per mismatch: its URL, both hashes, and
//! whether the bytes were the download cache's copy). The invariant: a record is closed once; one with a `result.json` is
//! refused, and `result.json` appears whole (written aside, then renamed). A VM kept for
//! `contractor shell` (`--kept-vm`) is written as the record's `vm.json` before it, and
//! removed by `record forget-vm` ([`forget_kept_vm`]) once the VM is gone.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use contractor_protocol::agent::Phase;
use contractor_protocol::jsonl::JsonlReader;
use contractor_protocol::proxy::{Decision, Mismatch, Refusals, Summary, MAX_MISMATCHES};
use contractor_protocol::result::{BuildCode, BuildResult, ErrorInfo, Outcome};
use contractor_protocol::run::RunEvent;

use crate::files::TEMP_PREFIX;
use crate::path::is_build_id;
use crate::records::{write_artifact_index, RecordError};

/// Why a record could not be closed.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// Not a build id, no such record, or one closed already.
    #[error("{0}")]
    NotOpen(String),
    /// The run's events could not be read.
    #[error("cannot read the run's events on stdin")]
    Events(#[source] contractor_protocol::jsonl::JsonlError),
    /// The index, `proxy.jsonl` or `result.json` could not be read or written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The process could not confine itself to the record.
    #[error("cannot confine the close")]
    Confine(#[source] contractor_confine::ConfineError),
}

impl CloseError {
    /// True when the caller named a record that cannot be closed (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CloseError::NotOpen(_) | CloseError::Record(RecordError::BadBuildId(_))
        )
    }
}

/// What closing needs besides the record: when the build started, the artifacts it
/// declared (`[build] artifacts`), and how it ended when the caller decided that itself.
#[derive(Debug, Clone)]
pub struct Closing {
    /// When the build started (its duration runs from here).
    pub started: SystemTime,
    /// The declared artifact patterns; each must match a stored artifact for a success.
    pub artifacts: Vec<String>,
    /// How the build ended as its caller decided (`contractor build`: an interruption, a
    /// VM that did not start...); `None`: as the run's events on stdin say.
    pub ended: Option<Ended>,
    /// The VM kept for `contractor shell`, written as the record's `vm.json`.
    pub kept_vm: Option<contractor_protocol::store::KeptVm>,
}

/// How a build ended, as the caller of `record close` says (`--outcome` and its flags): what
/// `result.json` says but for a declared artifact missing, which fails a success here too.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    /// The outcome.
    pub outcome: Outcome,
    /// The script's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The limit it hit, if any.
    pub limit: Option<contractor_protocol::result::Limit>,
    /// What went wrong (capped here as the run's own error is).
    pub error: Option<ErrorInfo>,
}

/// Closes the record `root/builds/<id>` of a build whose run wrote `events` (contractor-run's
/// stdout; not read when the caller said how it ended, `closing.ended`): indexes its
/// artifacts, writes its `result.json`, removes its `owner.json`, and returns the result.
/// Blocking.
pub fn close(
    root: &Path,
    id: &str,
    events: impl BufRead,
    closing: &Closing,
) -> Result<BuildResult, CloseError> {
    if !is_build_id(id) {
        return Err(RecordError::BadBuildId(id.to_string()).into());
    }
    let record = root.join("builds").join(id);
    if !std::fs::symlink_metadata(&record).is_ok_and(|m| m.is_dir()) {
        return Err(CloseError::NotOpen(format!(
            "build {id} has no record: {} is not a directory",
            record.display()
        )));
    }
    let result_path = record.join("result.json");
    if std::fs::symlink_metadata(&result_path).is_ok() {
        return Err(CloseError::NotOpen(format!(
            "build {id} is closed already: {} exists",
            result_path.display()
        )));
    }
    let ran = match &closing.ended {
        Some(ended) => (
            ended.outcome,
            ended.exit_code,
            ended.error.clone(),
            ended.limit,
        ),
        None => last_finished(events)?,
    };
    let index = write_artifact_index(root, id)?;
    // In path order (component by component), as `contractor build` has always listed them.
    let mut stored: Vec<PathBuf> = index
        .artifacts
        .iter()
        .map(|a| PathBuf::from(&a.path))
        .collect();
    stored.sort();
    let (mut outcome, exit_code, mut error, limit) = ran;
    if outcome == Outcome::Success {
        if let Some(pattern) =
            contractor_protocol::result::missing_artifact(&stored, &closing.artifacts)
        {
            outcome = Outcome::Failed;
            error = Some(contractor_protocol::result::artifact_missing_error(
                &pattern,
            ));
        }
    }
    let filed = proxy_filed(&record)?;
    if filed.mismatches > 0 {
        outcome = Outcome::Failed;
        error = Some(mismatch_error(filed.mismatches, &filed.mismatched));
    }
    let (refusals, offline) = (filed.build, filed.offline);
    let result = BuildResult {
        version: contractor_protocol::PROTOCOL_VERSION,
        id: id.to_string(),
        outcome,
        exit_code,
        duration_secs: SystemTime::now()
            .duration_since(closing.started)
            .unwrap_or_default()
            .as_secs_f64(),
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: stored
            .iter()
            .map(|path| record.join("artifacts").join(path))
            .collect(),
        refused_hosts: refusals.refused.iter().cloned().collect(),
        refused_offline: offline.refused.into_iter().collect(),
        upstream_failures: refusals.upstream_failures(),
        limit,
        error: error.map(|e| ErrorInfo::capped(&e.code, &e.chain)),
        host: None,
    };
    // The record is whole before it is closed: the kept VM's file first.
    if let Some(kept) = &closing.kept_vm {
        write_json(&record, contractor_protocol::store::KEPT_VM_FILE, kept)?;
    }
    write_json(&record, "result.json", &result)?;
    let _ = std::fs::remove_file(record.join(contractor_protocol::process::OWNER_FILE));
    Ok(result)
}

/// How the run ended: its last `finished` event. Without one, the last error object on the
/// stream is the failure (contractor-run's before it started, or that of a step before the
/// run, such as `contractor-store pack`, whose project errors are the build's: `failed`);
/// without either, an infrastructure failure (code `run`).
type Ran = (
    Outcome,
    Option<i32>,
    Option<ErrorInfo>,
    Option<contractor_protocol::result::Limit>,
);

fn last_finished(events: impl BufRead) -> Result<Ran, CloseError> {
    use contractor_protocol::error::{ErrorObject, ToolCode};
    let mut reader = JsonlReader::new(events);
    let mut finished = None;
    let mut tool_error: Option<ErrorObject> = None;
    while let Some(line) = reader.next_line().map_err(CloseError::Events)? {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if value["type"] == "error" {
            tool_error = serde_json::from_value(value).ok().or(tool_error);
            continue;
        }
        if let Ok(RunEvent::Finished {
            outcome,
            exit_code,
            error,
            limit,
            ..
        }) = serde_json::from_value::<RunEvent>(value)
        {
            finished = Some((outcome, exit_code, error, limit));
        }
    }
    if let Some(finished) = finished {
        return Ok(finished);
    }
    let (outcome, error) = match tool_error {
        Some(error) => {
            let outcome = match error.code {
                ToolCode::SourceTooManyEntries | ToolCode::SourceUnreadable => Outcome::Failed,
                _ => Outcome::Infrastructure,
            };
            let info = ErrorInfo {
                code: error.code.as_str().to_string(),
                chain: error.chain,
            };
            (outcome, info)
        }
        None => (
            Outcome::Infrastructure,
            ErrorInfo {
                code: BuildCode::Run.as_str().into(),
                chain: vec!["contractor-run ended without a finished event".to_string()],
            },
        ),
    };
    Ok((outcome, None, Some(error), None))
}

/// What the proxies filed in the record's `proxy.jsonl` that the result depends on.
#[derive(Default)]
struct Filed {
    /// The refusals of the build's proxy.
    build: Refusals,
    /// The refusals of the offline script's (lines marked `"phase":"script"`).
    offline: Refusals,
    /// Downloads that did not match their pins, all of them counted (the proxies'
    /// summaries' `record.mismatches`).
    mismatches: u64,
    /// The first [`MAX_MISMATCHES`] of them.
    mismatched: Vec<Mismatch>,
}

/// What the record's `proxy.jsonl` says: the refusals of its decision lines and the pin
/// mismatches of its summary lines (each proxy files its summary last). Other lines are
/// skipped; a record without the file has none.
fn proxy_filed(record: &Path) -> Result<Filed, CloseError> {
    let path = record.join("proxy.jsonl");
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Filed::default()),
        Err(source) => {
            return Err(RecordError::Io {
                action: "read",
                path,
                source,
            }
            .into())
        }
    };
    let mut filed = Filed::default();
    let mut reader = JsonlReader::new(io::BufReader::new(file));
    // A line past the reader's bound (MAX_LINE_BYTES) ends the tally, as the end would.
    while let Ok(Some(line)) = reader.next_line() {
        if let Ok(decision) = serde_json::from_slice::<Decision>(line) {
            match decision.phase {
                Some(Phase::Script) => filed.offline.note(&decision),
                _ => filed.build.note(&decision),
            }
        } else if let Ok(Summary {
            record: Some(tally),
            ..
        }) = serde_json::from_slice::<Summary>(line)
        {
            filed.mismatches = filed.mismatches.saturating_add(tally.mismatches);
            let room = MAX_MISMATCHES.saturating_sub(filed.mismatched.len());
            filed
                .mismatched
                .extend(tally.mismatched.into_iter().take(room));
        }
    }
    Ok(filed)
}

/// The error of a build with `count` downloads that did not match contractor.lock, the
/// first of them `mismatched`: one line, then one per mismatch.
fn mismatch_error(count: u64, mismatched: &[Mismatch]) -> ErrorInfo {
    let mut chain = vec![format!(
        "{count} download(s) did not match contractor.lock (tampering, or a moved tag; `contractor pin` after a build you trust)"
    )];
    chain.extend(mismatched.iter().map(|m| {
        let whose = match m.from_cache {
            true => "the download cache's copy has",
            false => "its bytes have",
        };
        format!(
            "{}: {whose} SHA-256 {}, contractor.lock pins {}",
            m.url, m.sha256, m.pinned
        )
    }));
    ErrorInfo {
        code: BuildCode::DownloadMismatch.as_str().into(),
        chain,
    }
}

/// Writes `value` as the record's file `name` (`result.json`, `vm.json`): pretty, ending
/// with a newline, aside first and then renamed into place.
fn write_json(record: &Path, name: &str, value: &impl serde::Serialize) -> Result<(), RecordError> {
    let destination = record.join(name);
    let temp = record.join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()));
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        serde_json::to_writer_pretty(&mut file, value).map_err(io::Error::other)?;
        file.write_all(b"\n")?;
        std::fs::rename(&temp, &destination)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        RecordError::Io {
            action: "write",
            path: destination,
            source,
        }
    })
}

/// Removes the record `root/builds/<id>`'s `vm.json` once its VM is gone (`record
/// forget-vm`); a record without one is fine.
pub fn forget_kept_vm(root: &Path, id: &str) -> Result<(), RecordError> {
    if !is_build_id(id) {
        return Err(RecordError::BadBuildId(id.to_string()));
    }
    let path = root
        .join("builds")
        .join(id)
        .join(contractor_protocol::store::KEPT_VM_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Io {
            action: "remove",
            path,
            source,
        }),
    }
}
