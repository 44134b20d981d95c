//! Signed provenance of a build, as the front end asks for it: `contractor-attest` signs a
//! record's `provenance.json`, checks one (`contractor verify`), shows the public key
//! (`contractor key`); `crate::rebuild` asks it to plan and compare a rebuild.
//!
//! The invariant: the front end never opens the signing key nor parses a record's files to
//! state or check them; it names the key's path (`$CONTRACTOR_SIGNING_KEY`, else
//! `signing-key` in the data directory) and the facts only it knows (the spec as given, how
//! the VM ran), and the confined tool does the rest (docs/provenance.md, docs/security.md).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use contractor_protocol::attest::{AttestAnswer, AttestRequest, SignRequest};
pub use contractor_protocol::attest::{PREDICATE_TYPE, PROVENANCE_FILE, STATEMENT_TYPE};
use contractor_protocol::image::Manifest;
use contractor_protocol::result::Outcome;
use contractor_protocol::PROTOCOL_VERSION;

use crate::spec::BuildSpec;
use crate::tools::{self, ToolError};

/// The file name of the key made on first use, in the data directory.
pub const KEY_FILE: &str = "signing-key";
/// The variable naming a signing key (PKCS#8 PEM) to use instead of the data directory's.
pub const KEY_VARIABLE: &str = "CONTRACTOR_SIGNING_KEY";

/// Why provenance could not be written, checked, or a key shown.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// There is no data directory for the key.
    #[error("no place for the signing key")]
    DataDir(#[source] contractor_protocol::image::NoDataDir),
    /// contractor-attest could not be run or talked to.
    #[error(transparent)]
    Tool(ToolError),
    /// contractor-attest refused its input (a bad key or envelope, exit code 2) and said
    /// why: its messages, as if the work had been done here.
    #[error(transparent)]
    Refused(tools::ToolMessages),
    /// contractor-attest failed and said why.
    #[error(transparent)]
    Failed(tools::ToolMessages),
    /// contractor-attest answered something else than what was asked.
    #[error("contractor-attest answered a `{0}` request with another kind of answer")]
    Answer(&'static str),
}

impl ProvenanceError {
    /// True when the input is at fault (a bad key or envelope): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ProvenanceError::DataDir(_) | ProvenanceError::Refused(_)
        )
    }
}

impl From<ToolError> for ProvenanceError {
    fn from(error: ToolError) -> Self {
        match error.messages() {
            Some(messages) if error.is_bad_input() => ProvenanceError::Refused(messages),
            Some(messages) => ProvenanceError::Failed(messages),
            None => ProvenanceError::Tool(error),
        }
    }
}

/// Where the signing key is: `$CONTRACTOR_SIGNING_KEY`, else `signing-key` in the data
/// directory. The flag says whether it is ours to make when missing.
pub fn key_path() -> Result<(PathBuf, bool), ProvenanceError> {
    match std::env::var_os(KEY_VARIABLE).filter(|v| !v.is_empty()) {
        Some(path) => Ok((PathBuf::from(path), false)),
        None => Ok((
            crate::paths::data_dir()
                .map_err(ProvenanceError::DataDir)?
                .join(KEY_FILE),
            true,
        )),
    }
}

/// What the front end knows of a build besides its record's files.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The build id.
    pub id: &'a str,
    /// The spec as given.
    pub spec: &'a BuildSpec,
    /// The accelerator the VM ran with (`kvm`, `tcg`), else the one asked for (`auto`).
    pub accel: contractor_protocol::vm::Accel,
    /// How the VM booted ([`boot`]).
    pub boot: String,
    /// `--offline`: downloads only from the download cache.
    pub offline: bool,
    /// The image's manifest, when the image is on this host.
    pub image: Option<&'a Manifest>,
    /// The build host of a `--host` build.
    pub host: Option<&'a str>,
    /// When the build started.
    pub started_on: SystemTime,
    /// When it finished.
    pub finished_on: SystemTime,
    /// How it ended.
    pub outcome: Outcome,
    /// The script's exit status.
    pub exit_code: Option<i32>,
    /// The build this one rebuilt (`contractor rebuild`), if it is a rebuild.
    pub rebuild_of: Option<&'a str>,
    /// Whether the build restored the project's build cache (`[cache] paths`) from an
    /// earlier build (inputs its record does not hold); None when not known here (a
    /// `--host` build's).
    pub cache_restored: Option<bool>,
}

/// The request that signs the build in `record` with `key` (made when `create`).
pub fn sign_request(record: &Path, facts: &Facts, key: &Path, create: bool) -> SignRequest {
    let spec = facts.spec;
    SignRequest {
        version: PROTOCOL_VERSION,
        record: record.to_path_buf(),
        key: key.to_path_buf(),
        create_key: create,
        project: spec.project_dir.clone(),
        id: facts.id.to_string(),
        external_parameters: external_parameters(spec),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        inspect: spec.inspect,
        tunnel: spec.tunnel.clone(),
        cache_paths: spec.cache_paths.clone(),
        cache_restored: facts.cache_restored,
        accelerator: facts.accel,
        boot: facts.boot.clone(),
        offline: facts.offline,
        image_name: spec.image.clone(),
        image: facts.image.cloned(),
        build_host: facts.host.map(String::from),
        started_on: rfc3339(facts.started_on),
        finished_on: rfc3339(facts.finished_on),
        outcome: facts.outcome,
        exit_code: facts.exit_code,
        rebuild_of: facts.rebuild_of.map(String::from),
    }
}

/// Has `contractor-attest` write `provenance.json` into `record`, signed with this user's
/// key ([`key_path`]).
pub fn write_signed(record: &Path, facts: &Facts) -> Result<PathBuf, ProvenanceError> {
    let (key, create) = key_path()?;
    let request = AttestRequest::Sign(Box::new(sign_request(record, facts, &key, create)));
    match tools::ask(tools::ATTEST, &request)? {
        (AttestAnswer::Signed { path, .. }, _) => Ok(path),
        _ => Err(ProvenanceError::Answer("sign")),
    }
}

/// This user's public key as PEM, the key made on first use when it is the data
/// directory's.
pub fn public_key() -> Result<String, ProvenanceError> {
    let (key, create) = key_path()?;
    let request = AttestRequest::Key {
        version: PROTOCOL_VERSION,
        key,
        create,
    };
    match tools::ask(tools::ATTEST, &request)? {
        (AttestAnswer::PublicKey { pem, .. }, _) => Ok(pem),
        _ => Err(ProvenanceError::Answer("key")),
    }
}

/// What `contractor verify` found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Each thing that does not verify, named; empty when everything verifies.
    pub problems: Vec<String>,
    /// The artifacts checked.
    pub artifacts: usize,
    /// The downloads checked.
    pub downloads: usize,
    /// The key checked against.
    pub key_id: String,
}

/// Has `contractor-attest` check the envelope at `envelope` with the key at `key` (this
/// user's signing key when None).
pub fn verify(envelope: &Path, key: Option<&Path>) -> Result<Verdict, ProvenanceError> {
    let key = match key {
        Some(key) => key.to_path_buf(),
        None => key_path()?.0,
    };
    let request = AttestRequest::Verify {
        version: PROTOCOL_VERSION,
        envelope: envelope.to_path_buf(),
        key,
    };
    match tools::ask(tools::ATTEST, &request)? {
        (
            AttestAnswer::Verdict {
                problems,
                artifacts,
                downloads,
                key_id,
                ..
            },
            _,
        ) => Ok(Verdict {
            problems,
            artifacts,
            downloads,
            key_id,
        }),
        _ => Err(ProvenanceError::Answer("verify")),
    }
}

/// How the VM booted, in words: `cold`, `restored from a snapshot`, `cold, then saved as a
/// snapshot and restored`; with the reason when a snapshot was asked for and not used.
pub fn boot(asked: bool, report: Option<&contractor_protocol::vm::SnapshotReport>) -> String {
    let why = |report: &contractor_protocol::vm::SnapshotReport| {
        report
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    };
    match report {
        _ if !asked => "cold".into(),
        None => "cold".into(),
        Some(r) if r.restored && r.created => "cold, then saved as a snapshot and restored".into(),
        Some(r) if r.restored => "restored from a snapshot".into(),
        Some(r) => format!("cold{}", why(r)),
    }
}

/// Whether a build ran its script, so that its record gets provenance.
pub fn ran_script(outcome: Outcome, exit_code: Option<i32>) -> bool {
    exit_code.is_some()
        || matches!(
            outcome,
            Outcome::Success | Outcome::Failed | Outcome::Timeout
        )
}

/// The statement's `externalParameters`: the spec as given (made by contractor-spec).
pub use contractor_spec::external::external_parameters;

/// `2026-11-25T14:15:02Z`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    crate::clock::format_utc(secs).replacen(' ', "T", 1) + "Z"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_says_how_the_vm_started() {
        use contractor_protocol::vm::SnapshotReport;
        let report = |restored, created, reason: Option<&str>| SnapshotReport {
            restored,
            created,
            reason: reason.map(String::from),
            dir: None,
        };
        assert_eq!(boot(false, None), "cold");
        assert_eq!(
            boot(true, Some(&report(true, false, None))),
            "restored from a snapshot"
        );
        assert_eq!(
            boot(true, Some(&report(true, true, None))),
            "cold, then saved as a snapshot and restored"
        );
        assert_eq!(
            boot(true, Some(&report(false, false, Some("all in use")))),
            "cold (all in use)"
        );
    }
}
