//! How a build ended: the outcome shared by `contractor-run`'s closing event and the build
//! record's `result.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The script exited 0 and every artifact was collected.
    Success,
    /// The script failed, or an artifact was missing.
    Failed,
    /// The build ran past its timeout and was stopped.
    Timeout,
    /// The machinery failed: the VM, the agent, libvirt.
    Infrastructure,
    /// The user interrupted the build.
    Interrupted,
}

impl Outcome {
    /// The outcome's name on the wire and on screen (`"success"`, `"interrupted"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Infrastructure => "infrastructure",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The exit code a tool reports for this outcome.
    pub fn exit_code(self) -> crate::ExitCode {
        use crate::ExitCode;
        match self {
            Outcome::Success => ExitCode::Success,
            Outcome::Failed | Outcome::Timeout => ExitCode::BuildFailed,
            Outcome::Infrastructure => ExitCode::Infrastructure,
            Outcome::Interrupted => ExitCode::Interrupted,
        }
    }
}

/// A limit of the spec that a build hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `build.timeout`: the build ran too long.
    Timeout,
    /// `build.max_log`: the build wrote too much output.
    MaxLog,
    /// `build.max_artifacts`: the artifacts were too big.
    MaxArtifacts,
    /// `vm.memory`: the guest kernel killed a process of the build for lack of memory.
    Memory,
    /// `vm.disk`: the build filled its disk.
    Disk,
}

impl Limit {
    /// The limit's name on the wire (`"max_log"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Timeout => "timeout",
            Limit::MaxLog => "max_log",
            Limit::MaxArtifacts => "max_artifacts",
            Limit::Memory => "memory",
            Limit::Disk => "disk",
        }
    }

    /// The spec field that sets this limit.
    pub fn field(self) -> &'static str {
        match self {
            Limit::Timeout => "build.timeout",
            Limit::MaxLog => "build.max_log",
            Limit::MaxArtifacts => "build.max_artifacts",
            Limit::Memory => "vm.memory",
            Limit::Disk => "vm.disk",
        }
    }
}

/// An error reported as data: a code and the chain of messages, outermost first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    /// A short machine-readable code.
    pub code: String,
    /// The error and its causes, outermost first.
    pub chain: Vec<String>,
}

impl ErrorInfo {
    /// `err` and its sources as data, under `code`.
    pub fn from_error(code: &str, err: &dyn std::error::Error) -> ErrorInfo {
        ErrorInfo {
            code: code.to_string(),
            chain: error_chain(err),
        }
    }
}

/// The error codes `contractor build` itself writes into `result.json` (`error.code`) and
/// its error objects. The tools' and the guest's own codes are carried through as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildCode {
    /// `bad_spec`: contractor.toml is invalid (an error object, exit 2).
    BadSpec,
    /// `build_setup`: the build could not be set up before its record existed.
    BuildSetup,
    /// `source_too_many_entries`: the project has more entries than a source tar may hold.
    SourceTooManyEntries,
    /// `source_unreadable`: a project file could not be read.
    SourceUnreadable,
    /// `source_pack`: the host could not write the source tar.
    SourcePack,
    /// `image`: the builder image could not be built or found.
    Image,
    /// `record`: the build record could not be written.
    Record,
    /// `cache_prepare`: the build cache could not be prepared.
    CachePrepare,
    /// `service_start`: the store or the proxy did not start.
    ServiceStart,
    /// `private_dir`: the private directory for the store token could not be made.
    PrivateDir,
    /// `data_dir`: the data directory cannot be told.
    DataDir,
    /// `store_dir`: the project's store directory is not one Contractor may write into.
    StoreDir,
    /// `artifact_missing`: the guest reported success, but a declared artifact is not stored.
    ArtifactMissing,
    /// `download_mismatch`: a download of a URL contractor.lock pins had other bytes (the
    /// proxy withheld its last bytes from the guest).
    DownloadMismatch,
    /// `vm_work_dir`: the VMs' work directory could not be made.
    VmWorkDir,
    /// `vm_create`: contractor-vm could not create the VM.
    VmCreate,
    /// `vm_channels`: libvirt reported no channel sockets for the VM.
    VmChannels,
    /// `run`: contractor-run failed or ended without `finished`.
    Run,
    /// `interrupted`: Ctrl-C or SIGTERM ended the build.
    Interrupted,
    /// `abandoned`: the front end died before the build finished (found by the next build).
    Abandoned,
    /// `build_host`: the build host could not be reached, refused the build, or went away
    /// before the build finished (`contractor build --host`).
    BuildHost,
}

impl BuildCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildCode::BadSpec => "bad_spec",
            BuildCode::BuildSetup => "build_setup",
            BuildCode::SourceTooManyEntries => "source_too_many_entries",
            BuildCode::SourceUnreadable => "source_unreadable",
            BuildCode::SourcePack => "source_pack",
            BuildCode::Image => "image",
            BuildCode::Record => "record",
            BuildCode::CachePrepare => "cache_prepare",
            BuildCode::ServiceStart => "service_start",
            BuildCode::PrivateDir => "private_dir",
            BuildCode::DataDir => "data_dir",
            BuildCode::StoreDir => "store_dir",
            BuildCode::ArtifactMissing => "artifact_missing",
            BuildCode::DownloadMismatch => "download_mismatch",
            BuildCode::VmWorkDir => "vm_work_dir",
            BuildCode::VmCreate => "vm_create",
            BuildCode::VmChannels => "vm_channels",
            BuildCode::Run => "run",
            BuildCode::Interrupted => "interrupted",
            BuildCode::Abandoned => "abandoned",
            BuildCode::BuildHost => "build_host",
        }
    }
}

impl std::fmt::Display for BuildCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and its sources, outermost first: what a tool prints joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> Vec<String> {
    let mut chain = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    chain
}

/// An error and its sources on one line, outermost first, joined with ": ": what every tool
/// prints on stderr.
pub fn joined_chain(err: &dyn std::error::Error) -> String {
    error_chain(err).join(": ")
}

/// One collected artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Path relative to the source root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// `builds/<id>/result.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildResult {
    /// Protocol version, 1.
    pub version: u32,
    /// The build's id.
    pub id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The script's exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Wall time of the whole build, in seconds.
    pub duration_secs: f64,
    /// The build's output.
    pub log: PathBuf,
    /// The VM's serial console.
    pub console_log: PathBuf,
    /// Collected artifacts (paths on the host).
    pub artifacts: Vec<PathBuf>,
    /// Hosts the proxy refused (with a fetch phase: during the fetch).
    pub refused_hosts: Vec<String>,
    /// Hosts the script asked for after the fetch phase, when the build has no network:
    /// all refused. Absent without a fetch phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_offline: Vec<String>,
    /// Allowed hosts the proxy could not reach (resolution or connection failed), not
    /// refused by the policy: one entry per host, with the first reason and how often.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_failures: Vec<UpstreamFailure>,
    /// The limit the build hit, if it hit one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// What went wrong, for infrastructure failures and timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The build host the VM ran on (`contractor build --host`), as named there; absent
    /// for a build on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl BuildResult {
    /// The result of build `id`, its record `record`, that ended `outcome` with `error`
    /// and nothing else to report: no exit code, artifacts, refusals, limit or host (the
    /// caller sets those it has), no duration yet. How a record is closed when its build
    /// failed before its run or its run's answer was lost.
    pub fn ended(id: &str, record: &Path, outcome: Outcome, error: Option<ErrorInfo>) -> Self {
        BuildResult {
            version: crate::PROTOCOL_VERSION,
            id: id.to_string(),
            outcome,
            exit_code: None,
            duration_secs: 0.0,
            log: record.join("build.log"),
            console_log: record.join("console.log"),
            artifacts: Vec::new(),
            refused_hosts: Vec::new(),
            refused_offline: Vec::new(),
            upstream_failures: Vec::new(),
            limit: None,
            error,
            host: None,
        }
    }
}

/// An allowed host the proxy could not reach during a build.
/// `{"host":"registry.npmjs.org","reason":"cannot resolve the host: no answer within 10 s","count":611}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFailure {
    /// The host as the client named it.
    pub host: String,
    /// Why, as the proxy said it the first time.
    pub reason: String,
    /// How many requests to it failed.
    pub count: u64,
}

/// The first of the declared artifact `patterns` (`[build] artifacts`: paths or globs,
/// relative to the source root) that no stored artifact matches, neither itself nor one of
/// its directories; `stored` are the stored files' paths beneath `artifacts/`, the build
/// cache's upload ([`crate::store::CACHE_UPLOAD_NAME`]) not counted. A pattern that is no
/// glob matches nothing. The host checks this itself: the guest's word is not enough.
pub fn missing_artifact(stored: &[PathBuf], patterns: &[String]) -> Option<String> {
    let stored: Vec<&PathBuf> = stored
        .iter()
        .filter(|path| path.as_path() != std::path::Path::new(crate::store::CACHE_UPLOAD_NAME))
        .collect();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    patterns
        .iter()
        .find(|pattern| {
            let Ok(glob) = glob::Pattern::new(pattern.trim_end_matches('/')) else {
                return true;
            };
            !stored.iter().any(|path| {
                path.ancestors()
                    .filter(|p| !p.as_os_str().is_empty())
                    .any(|p| glob.matches_path_with(p, options))
            })
        })
        .cloned()
}

/// The error of a build that reported success although the declared artifact `pattern`
/// ([`missing_artifact`]) is not stored.
pub fn artifact_missing_error(pattern: &str) -> ErrorInfo {
    ErrorInfo {
        code: BuildCode::ArtifactMissing.as_str().into(),
        chain: vec![format!(
            "no stored artifact matches the declared artifact {pattern:?} ([build] artifacts), although the guest reported success"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_that_ended_without_a_run_names_its_record_and_reports_nothing_else() {
        let error = ErrorInfo {
            code: BuildCode::ServiceStart.as_str().into(),
            chain: vec!["cannot start the store".into()],
        };
        let record = Path::new("/p/.contractor/builds/b1");
        let result = BuildResult::ended("b1", record, Outcome::Infrastructure, Some(error));
        let json = serde_json::to_value(&result).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "id": "b1",
                "outcome": "infrastructure",
                "duration_secs": 0.0,
                "log": "/p/.contractor/builds/b1/build.log",
                "console_log": "/p/.contractor/builds/b1/console.log",
                "artifacts": [],
                "refused_hosts": [],
                "error": {"code": "service_start", "chain": ["cannot start the store"]},
            })
        );
    }

    #[test]
    fn a_build_code_reads_on_the_wire_as_its_name() {
        let json = serde_json::to_string(&BuildCode::ArtifactMissing).expect("json");
        assert_eq!(json, format!("\"{}\"", BuildCode::ArtifactMissing.as_str()));
        assert_eq!(
            BuildCode::SourceTooManyEntries.as_str(),
            "source_too_many_entries"
        );
    }

    #[test]
    fn an_outcome_and_a_limit_read_on_the_wire_as_their_names() {
        use Outcome::*;
        for outcome in [Success, Failed, Timeout, Infrastructure, Interrupted] {
            let json = serde_json::to_string(&outcome).expect("json");
            assert_eq!(json, format!("\"{}\"", outcome.as_str()));
        }
        let limits = [
            Limit::Timeout,
            Limit::MaxLog,
            Limit::MaxArtifacts,
            Limit::Memory,
            Limit::Disk,
        ];
        for limit in limits {
            let json = serde_json::to_string(&limit).expect("json");
            assert_eq!(json, format!("\"{}\"", limit.as_str()));
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the VM")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_lists_every_cause_outermost_first() {
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no kernel",
        ));
        let info = ErrorInfo::from_error("vm_create", &err);
        assert_eq!(info.code, "vm_create");
        assert_eq!(info.chain, ["cannot start the VM", "no kernel"]);
    }
}
