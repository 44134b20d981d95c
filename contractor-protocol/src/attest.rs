//! `contractor-attest`'s requests and answers, and the one reader of a signed statement.
//!
//! A build's record holds `provenance.json`: a DSSE envelope whose payload is an in-toto
//! Statement v1 with the SLSA provenance v1 predicate (docs/provenance.md). The tool that
//! signs and checks it (`contractor-attest`) and the front end that reads it back
//! (`contractor rebuild`) take the statement out of its envelope here, with the same checks
//! and the same bound ([`MAX_PROVENANCE_BYTES`]), so the two can never disagree on what a
//! statement says. The signature is checked only by `contractor-attest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::image::Manifest;
use crate::result::Outcome;
use crate::service::Confinement;
use crate::vm::{Accel, SnapshotReport};

/// The record file the signed statement is written to.
pub const PROVENANCE_FILE: &str = "provenance.json";
/// DSSE's payload type for in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The statement's `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The statement's `predicateType`.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// Most bytes of a `provenance.json` read back (a statement of 64 MiB of downloads fits).
pub const MAX_PROVENANCE_BYTES: u64 = 256 << 20;
/// Most bytes of a request to `contractor-attest` (the spec's script and env are in it).
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// A request to `contractor-attest`, one JSON object on its stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttestRequest {
    /// Write the signed statement of the build in `record` to its `provenance.json`.
    Sign(Box<SignRequest>),
    /// Check an envelope, its record's artifacts and downloads.
    Verify {
        /// Protocol version, 1.
        version: u32,
        /// The `provenance.json` to check; its record is the directory it is in.
        envelope: PathBuf,
        /// A public key (SubjectPublicKeyInfo PEM) or a private key (PKCS#8 PEM, its
        /// public half is used).
        key: PathBuf,
    },
    /// The public key of the signing key at `key`, made first when `create` and missing.
    Key {
        /// Protocol version, 1.
        version: u32,
        /// The signing key (PKCS#8 PEM).
        key: PathBuf,
        /// Make it (0600, never over a file) when it does not exist.
        create: bool,
    },
    /// The SHA-256 of every regular file under `record/artifacts/`.
    Digests {
        /// Protocol version, 1.
        version: u32,
        /// The build record.
        record: PathBuf,
    },
    /// What a rebuild of `record` takes from its statement, and how the spec and the images
    /// given differ from what it states.
    Plan(Box<PlanRequest>),
    /// Compares two records' artifacts and the inputs their statements name; writes the
    /// comparison to the rebuild's [`REBUILD_FILE`].
    Compare {
        /// Protocol version, 1.
        version: u32,
        /// The record of the build rebuilt.
        original: PathBuf,
        /// The rebuild's record (only its [`REBUILD_FILE`] is written).
        rebuild: PathBuf,
        /// Differences of inputs already known (the image's, `--any-image`), kept first.
        inputs_differ: Vec<String>,
        /// What the rebuild may lack (`plan`'s `cache_warning`), said again in the summary
        /// when the rebuild did not end as the original did.
        #[serde(default)]
        cache_warning: Option<String>,
    },
}

/// The record file of a rebuild that says which build it rebuilt and how they compare.
pub const REBUILD_FILE: &str = "rebuild.json";

/// What `plan` needs besides the record's statement: the spec as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// Protocol version, 1.
    pub version: u32,
    /// The build record to rebuild (its `provenance.json` is read; the signature is not
    /// checked: `verify` does that).
    pub record: PathBuf,
    /// The spec now, as `sign` would state it (`externalParameters`).
    pub external_parameters: Value,
    /// The VM's shape now.
    pub cpus: u32,
    /// The VM's memory now, MiB.
    pub memory_mib: u64,
    /// The VM's scratch disk now, GiB.
    pub disk_gib: u64,
    /// `[cache] paths` now.
    pub cache_paths: Vec<String>,
    /// The images on this host (their manifests).
    pub images: Vec<Manifest>,
    /// The spec file (`contractor.toml`) the spec is read from: named when it says
    /// something else than the statement (the refusal `spec_changed`).
    pub spec: PathBuf,
    /// Rebuild with the image on this host even when it is not the one stated
    /// (`contractor rebuild --any-image`); else that is refused (`image_changed`).
    #[serde(default)]
    pub any_image: bool,
}

/// `verify`'s answer: what does not verify (exit 1 when any), else nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verified {
    /// Protocol version, 1.
    pub version: u32,
    /// Each thing that does not verify, named; empty when everything verifies.
    pub problems: Vec<String>,
    /// The artifacts checked.
    pub artifacts: usize,
    /// The downloads checked.
    pub downloads: usize,
    /// The key id of the key checked against.
    pub key_id: String,
    /// How the tool was confined while it read the record.
    pub confinement: Confinement,
}

/// `plan`'s answer: what a rebuild takes from the statement, and what it may lack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildPlan {
    /// Protocol version, 1.
    pub version: u32,
    /// The downloads the statement lists, in its order.
    pub downloads: Vec<StatedDownload>,
    /// How the image on this host differs from the one stated (only with `any_image`; an
    /// input known to differ); empty when the same.
    pub image_differences: Vec<String>,
    /// Why the statement's list of downloads is not complete; empty when it is.
    pub incomplete_downloads: Vec<String>,
    /// Why the rebuild may lack an input of the original (a restored build cache).
    pub cache_warning: Option<String>,
    /// What to warn of before the rebuild, in words: each reason the statement's list of
    /// downloads is not complete, then the cache's warning.
    pub warnings: Vec<String>,
    /// How the tool was confined while it read the record.
    pub confinement: Confinement,
}

/// `compare`'s answer: each artifact of either build, by path, and the inputs that differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildComparison {
    /// Protocol version, 1.
    pub version: u32,
    /// Each artifact, sorted by path (the build cache's upload left out).
    pub artifacts: Vec<Compared>,
    /// Whether every artifact is identical (true for none).
    pub identical: bool,
    /// The inputs that differ (the given ones first, then the image's and the guest
    /// agent's digests in the two statements).
    pub inputs_differ: Vec<String>,
    /// Whether the rebuild ended as the original did (true when the original's end is
    /// not known: it has no `result.json`).
    pub same_end: bool,
    /// The summary of the rebuild, in words, one line each: how many artifacts are
    /// identical and how the rebuild ended, then how the ends differ, what was refused
    /// offline, each input that differs, or that there was nothing to compare.
    pub summary: Vec<String>,
    /// The file the comparison was written to.
    pub path: PathBuf,
    /// How the tool was confined while it read the records.
    pub confinement: Confinement,
}

/// A download a statement lists (`resolvedDependencies` of kind `download`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatedDownload {
    /// The URL.
    pub url: String,
    /// The SHA-256 the statement gives its body.
    pub sha256: String,
    /// Its size in bytes (0 when not stated).
    pub size: u64,
    /// Whether it was a complete `GET` answered 200 (what the proxy can serve again).
    pub complete_get_200: bool,
}

/// How one artifact of a rebuild compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The same bytes on both sides.
    Identical,
    /// Other bytes.
    Different,
    /// In the original, not in the rebuild.
    MissingInRebuild,
    /// In the rebuild, not in the original.
    MissingInOriginal,
}

/// One artifact of either build, compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compared {
    /// Its path beneath `artifacts/`.
    pub path: String,
    /// How it compares.
    pub verdict: Verdict,
    /// Its SHA-256 in the original, if there.
    pub original: Option<String>,
    /// Its SHA-256 in the rebuild, if there.
    pub rebuild: Option<String>,
}

impl std::fmt::Display for Compared {
    /// The artifact's line of `contractor rebuild`'s report: its verdict, its path and the
    /// digests on each side (`identical  hello  sha256 98ea…`). The path is the project's
    /// choice: a caller that shows it on a terminal escapes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = &self.path;
        let a = self.original.as_deref().unwrap_or_default();
        let b = self.rebuild.as_deref().unwrap_or_default();
        match self.verdict {
            Verdict::Identical => write!(f, "identical  {path}  sha256 {a}"),
            Verdict::Different => {
                write!(
                    f,
                    "DIFFERENT  {path}  original sha256 {a}, rebuild sha256 {b}"
                )
            }
            Verdict::MissingInRebuild => {
                write!(
                    f,
                    "MISSING    {path}  not in the rebuild (original sha256 {a})"
                )
            }
            Verdict::MissingInOriginal => {
                write!(
                    f,
                    "MISSING    {path}  not in the original (rebuild sha256 {b})"
                )
            }
        }
    }
}

/// The file name of the signing key made on first use, in the data directory.
pub const KEY_FILE: &str = "signing-key";
/// The variable naming a signing key (PKCS#8 PEM) to use instead of the data directory's.
pub const KEY_VARIABLE: &str = "CONTRACTOR_SIGNING_KEY";

/// Where this user's signing key is: `$CONTRACTOR_SIGNING_KEY`, else [`KEY_FILE`] in the
/// data directory ([`crate::image::data_dir`]). The flag says whether it is the data
/// directory's own, made on first use (`create`, `create_key`).
pub fn key_path() -> Result<(PathBuf, bool), crate::image::NoDataDir> {
    match std::env::var_os(KEY_VARIABLE).filter(|v| !v.is_empty()) {
        Some(path) => Ok((PathBuf::from(path), false)),
        None => Ok((crate::image::data_dir()?.join(KEY_FILE), true)),
    }
}

/// What `sign` needs besides the record's files: the facts the front end knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// Protocol version, 1.
    pub version: u32,
    /// The build record (read; only its `provenance.json` is written).
    pub record: PathBuf,
    /// The signing key (PKCS#8 PEM).
    pub key: PathBuf,
    /// Make the key (0600) when it does not exist: only the data directory's own.
    pub create_key: bool,
    /// The project directory: the commit its `.git` names is the source's (read from the
    /// files, never by running git).
    pub project: PathBuf,
    /// The build id (`runDetails.metadata.invocationId`).
    pub id: String,
    /// The spec as given (`externalParameters`), as the front end states it.
    pub external_parameters: Value,
    /// The VM's shape.
    pub cpus: u32,
    /// The VM's memory, MiB.
    pub memory_mib: u64,
    /// The VM's scratch disk, GiB.
    pub disk_gib: u64,
    /// `[network] inspect`.
    pub inspect: bool,
    /// `[network] tunnel`: hosts known by name only.
    pub tunnel: Vec<String>,
    /// `[cache] paths`.
    pub cache_paths: Vec<String>,
    /// Whether the build restored its build cache; None when not known here.
    pub cache_restored: Option<bool>,
    /// The accelerator the VM ran with, else the one asked for.
    pub accelerator: Accel,
    /// A snapshot boot was asked for (`--snapshot`).
    pub snapshot: bool,
    /// contractor-vm's report of the snapshot, as it gave it (None when it gave none, or
    /// from a build host). `sign` says in words how the VM booted.
    pub snapshot_report: Option<SnapshotReport>,
    /// `--offline`.
    pub offline: bool,
    /// The image's name (the spec's).
    pub image_name: String,
    /// The image's manifest, when the image is on this host.
    pub image: Option<Manifest>,
    /// The build host of a `--host` build.
    pub build_host: Option<String>,
    /// When the build started, seconds since the Unix epoch (stated in RFC 3339, UTC).
    pub started_on: u64,
    /// When it finished, seconds since the Unix epoch.
    pub finished_on: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The script's exit status. A build whose script did not run (no exit status, and an
    /// ending other than success, failure or timeout) gets no provenance: `sign` answers
    /// `not_signed`.
    pub exit_code: Option<i32>,
    /// The build this one rebuilt, if it is a rebuild.
    pub rebuild_of: Option<String>,
}

/// `contractor-attest`'s answer, one JSON object on its stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttestAnswer {
    /// `sign`: the envelope was written.
    Signed {
        /// Protocol version, 1.
        version: u32,
        /// The file written.
        path: PathBuf,
        /// The signer's key id.
        key_id: String,
        /// How the tool was confined while it read the record.
        confinement: Confinement,
    },
    /// `sign` of a build whose script did not run: nothing was written (exit 0).
    NotSigned {
        /// Protocol version, 1.
        version: u32,
        /// Why, in words.
        reason: String,
    },
    /// `verify`: what does not verify (exit 1 when any), else nothing.
    Verdict(Box<Verified>),
    /// `key`: the public key.
    PublicKey {
        /// Protocol version, 1.
        version: u32,
        /// SubjectPublicKeyInfo PEM.
        pem: String,
        /// Lower-case hex SHA-256 of the key's DER.
        key_id: String,
    },
    /// `digests`: each artifact's path beneath `artifacts/` and SHA-256.
    Digests {
        /// Protocol version, 1.
        version: u32,
        /// Path → lower-case hex SHA-256.
        artifacts: BTreeMap<String, String>,
    },
    /// `plan`: what a rebuild takes from the statement. A spec that differs from it, or
    /// (without `any_image`) an image, is refused instead (`spec_changed`, `image_changed`).
    Plan(Box<RebuildPlan>),
    /// `compare`: each artifact of either build, by path, and the inputs that differ.
    Comparison(Box<RebuildComparison>),
}

/// Why a statement could not be read out of its envelope.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a DSSE envelope of ours.
    #[error("{path}: {problem}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        problem: String,
    },
}

/// A DSSE envelope taken apart: its payload decoded, its signatures as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `payloadType`.
    pub payload_type: String,
    /// The decoded payload.
    pub body: Vec<u8>,
    /// Each `signatures[i].sig`, decoded.
    pub signatures: Vec<Vec<u8>>,
}

/// Reads the envelope at `path` (a regular file of at most [`MAX_PROVENANCE_BYTES`]).
pub fn read_envelope(path: &Path) -> Result<Envelope, StatementError> {
    let format = |problem: String| StatementError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = crate::file::read_regular(path, MAX_PROVENANCE_BYTES).map_err(|source| {
        StatementError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let envelope: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format(format!("not JSON ({e}); expected a DSSE envelope")))?;
    let payload_type = envelope["payloadType"]
        .as_str()
        .ok_or_else(|| format("no `payloadType` string; expected a DSSE envelope".into()))?;
    if payload_type != PAYLOAD_TYPE {
        return Err(format(format!(
            "`payloadType` is {payload_type:?}; expected {PAYLOAD_TYPE:?}"
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = envelope["payload"]
        .as_str()
        .ok_or_else(|| format("no `payload` string".into()))
        .and_then(|p| {
            b64.decode(p)
                .map_err(|e| format(format!("`payload` is not base64 ({e})")))
        })?;
    let list = envelope["signatures"]
        .as_array()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format("no `signatures` (a non-empty array)".into()))?;
    let mut signatures = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let sig = entry["sig"]
            .as_str()
            .ok_or_else(|| format(format!("`signatures[{i}].sig` is not a string")))?;
        signatures.push(
            b64.decode(sig)
                .map_err(|e| format(format!("`signatures[{i}].sig` is not base64 ({e})")))?,
        );
    }
    Ok(Envelope {
        payload_type: payload_type.to_string(),
        body,
        signatures,
    })
}

/// The statement in `envelope` (read from `path`): an in-toto Statement v1 with the SLSA
/// provenance v1 predicate.
pub fn statement_of(path: &Path, envelope: &Envelope) -> Result<Value, StatementError> {
    let format = |problem: String| StatementError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let statement: Value = serde_json::from_slice(&envelope.body)
        .map_err(|e| format(format!("`payload` is not a JSON statement ({e})")))?;
    if statement["_type"] != STATEMENT_TYPE || statement["predicateType"] != PREDICATE_TYPE {
        return Err(format(format!(
            "the statement's `_type` or `predicateType` is not {STATEMENT_TYPE} with {PREDICATE_TYPE}"
        )));
    }
    Ok(statement)
}

/// Reads the statement of the envelope at `path`; its signature is not checked here
/// (`contractor-attest` verify does that).
pub fn read_statement(path: &Path) -> Result<Value, StatementError> {
    statement_of(path, &read_envelope(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_is_the_variables_else_the_data_directorys() {
        // Only this test sets the variable.
        std::env::set_var(KEY_VARIABLE, "/keys/ci.pem");
        let named = key_path().expect("key path");
        std::env::set_var(KEY_VARIABLE, "");
        let default = key_path().expect("key path");
        std::env::remove_var(KEY_VARIABLE);
        assert_eq!(named, (PathBuf::from("/keys/ci.pem"), false));
        let data = crate::image::data_dir().expect("data dir");
        assert_eq!(default, (data.join("signing-key"), true));
    }

    #[test]
    fn each_verdict_has_its_line() {
        let (a, b) = ("3bd1", "2cf2");
        let row = |path: &str, verdict, a: Option<&str>, b: Option<&str>| Compared {
            path: path.into(),
            verdict,
            original: a.map(String::from),
            rebuild: b.map(String::from),
        };
        let lines = [
            row("gone", Verdict::MissingInRebuild, Some(a), None),
            row("hello", Verdict::Identical, Some(a), Some(a)),
            row("new", Verdict::MissingInOriginal, None, Some(b)),
            row("stamp", Verdict::Different, Some(a), Some(b)),
        ]
        .map(|r| r.to_string());
        assert_eq!(
            lines,
            [
                "MISSING    gone  not in the rebuild (original sha256 3bd1)",
                "identical  hello  sha256 3bd1",
                "MISSING    new  not in the original (rebuild sha256 2cf2)",
                "DIFFERENT  stamp  original sha256 3bd1, rebuild sha256 2cf2",
            ]
        );
    }

    #[test]
    fn a_statement_comes_out_of_its_envelope_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(PROVENANCE_FILE);
        let b64 = base64::engine::general_purpose::STANDARD;
        let statement =
            serde_json::json!({"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE});
        let envelope = serde_json::json!({
            "payloadType": PAYLOAD_TYPE,
            "payload": b64.encode(statement.to_string()),
            "signatures": [{"keyid": "k", "sig": b64.encode([1u8, 2])}],
        });
        std::fs::write(&file, envelope.to_string()).expect("write");
        assert_eq!(read_statement(&file).expect("read"), statement);
        assert_eq!(
            read_envelope(&file).expect("envelope").signatures,
            [vec![1u8, 2]]
        );
        for (text, said) in [
            ("{\"payloadType\": 1}", "no `payloadType`"),
            ("[", "not JSON"),
            (
                "{\"payloadType\": \"application/vnd.in-toto+json\", \"payload\": \"!!\"}",
                "not base64",
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            let err = read_statement(&file).expect_err(text).to_string();
            assert!(err.contains(said) && err.contains(PROVENANCE_FILE), "{err}");
        }
        let err = read_statement(&dir.path().join("none.json")).expect_err("missing");
        assert!(matches!(err, StatementError::Read { .. }), "{err}");
    }
}
