//! Signed provenance of a build (`provenance.json` in its record) and its check
//! (`contractor verify`).
//!
//! The statement is an in-toto Statement v1 with the SLSA provenance v1 predicate, wrapped
//! in a DSSE envelope signed with ed25519 over DSSE's pre-authentication encoding (PAE), so
//! that tools we did not write can check it (docs/provenance.md). The invariant: the key
//! lives with the front end's user (the data directory, mode 0600, or a file the user
//! names) and is read only by the front end, never by a VM, the store, the proxy or a relay;
//! what the statement says is read from the record after the build, by the front end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use contractor_protocol::image::Manifest;
use contractor_protocol::result::Outcome;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::spec::BuildSpec;

/// The record file the signed statement is written to.
pub const PROVENANCE_FILE: &str = "provenance.json";
/// DSSE's payload type for in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The statement's `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The statement's `predicateType`.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// Our build type: what `externalParameters` and `internalParameters` mean
/// (docs/provenance.md).
pub const BUILD_TYPE: &str = "urn:contractor:build-type:v1";
/// `runDetails.builder.id`.
pub const BUILDER_ID: &str = "urn:contractor:builder:v1";
/// The file name of the key made on first use, in the data directory.
pub const KEY_FILE: &str = "signing-key";
/// The variable naming a signing key (PKCS#8 PEM) to use instead of the data directory's.
pub const KEY_VARIABLE: &str = "CONTRACTOR_SIGNING_KEY";
/// Most artifacts a statement lists (more are an error: the statement would not be true).
pub const MAX_SUBJECTS: usize = 100_000;
/// Most bytes of a `provenance.json` read back (a statement of 64 MiB of downloads fits).
pub const MAX_PROVENANCE_BYTES: u64 = 256 << 20;
/// Most bytes of a key file read.
const MAX_KEY_BYTES: u64 = 64 << 10;
/// Most bytes of a record's `artifacts.json` read (an entry is about 150 bytes).
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Most bytes of `.git/HEAD`, a ref file, or `.git/packed-refs` read.
const MAX_GIT_FILE_BYTES: u64 = 4 << 20;

/// Why provenance could not be written or a key not made or read.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// There is no data directory for the key.
    #[error("no place for the signing key")]
    DataDir(#[source] contractor_protocol::image::NoDataDir),
    /// A file could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not an ed25519 key in the expected PEM.
    #[error(
        "{path} is not an ed25519 {what} in PEM ({detail}); `contractor key` prints the public key"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// `private key (PKCS#8)` or `public key (SubjectPublicKeyInfo)`.
        what: &'static str,
        /// The parser's word.
        detail: String,
    },
    /// The record holds more artifacts than a statement lists.
    #[error("{0} holds more than {MAX_SUBJECTS} artifacts")]
    TooManyArtifacts(PathBuf),
    /// A key could not be encoded.
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProvenanceError {
    let path = path.to_path_buf();
    move |source| ProvenanceError::Io {
        action,
        path,
        source,
    }
}

/// DSSE's pre-authentication encoding: `DSSEv1 SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The key id: lower-case hex SHA-256 of the public key's SubjectPublicKeyInfo (DER).
pub fn key_id(key: &VerifyingKey) -> String {
    match key.to_public_key_der() {
        Ok(der) => hex(&Sha256::digest(der.as_bytes())),
        Err(_) => hex(&Sha256::digest(key.as_bytes())),
    }
}

/// The public key as PEM (SubjectPublicKeyInfo).
pub fn public_pem(key: &VerifyingKey) -> Result<String, ProvenanceError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| ProvenanceError::Encode(e.to_string()))
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

/// The signing key of this user ([`key_path`]), made on first use when it is the data
/// directory's.
pub fn signing_key() -> Result<SigningKey, ProvenanceError> {
    let (path, ours) = key_path()?;
    load_or_create_key(&path, ours)
}

/// Reads the PKCS#8 PEM key at `path`; when it does not exist and `create` is set, makes
/// one (32 bytes of `/dev/urandom`) and writes it there, mode 0600, never over a file.
pub fn load_or_create_key(path: &Path, create: bool) -> Result<SigningKey, ProvenanceError> {
    match contractor_protocol::file::read_regular(path, MAX_KEY_BYTES) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            SigningKey::from_pkcs8_pem(&text).map_err(|e| ProvenanceError::BadKey {
                path: path.to_path_buf(),
                what: "private key (PKCS#8)",
                detail: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let mut seed = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut seed))
                .map_err(io("read", Path::new("/dev/urandom")))?;
            let key = SigningKey::from_bytes(&seed);
            // PKCS#8 v1 (RFC 8410, no public key inside): what OpenSSL 3.0 reads too.
            let pem = ed25519_dalek::pkcs8::KeypairBytes {
                secret_key: seed,
                public_key: None,
            }
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| ProvenanceError::Encode(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io("create", path))?;
            file.write_all(pem.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io("write", path))?;
            Ok(key)
        }
        Err(source) => Err(ProvenanceError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a public key (SubjectPublicKeyInfo PEM) from `path`; a PKCS#8 private key is
/// accepted too (its public half is used).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, ProvenanceError> {
    let bytes =
        contractor_protocol::file::read_regular(path, MAX_KEY_BYTES).map_err(io("read", path))?;
    let text = String::from_utf8_lossy(&bytes);
    if let Ok(key) = VerifyingKey::from_public_key_pem(&text) {
        return Ok(key);
    }
    SigningKey::from_pkcs8_pem(&text)
        .map(|k| k.verifying_key())
        .map_err(|e| ProvenanceError::BadKey {
            path: path.to_path_buf(),
            what: "public key (SubjectPublicKeyInfo)",
            detail: e.to_string(),
        })
}

/// The DSSE envelope of `statement`, signed with `key`.
pub fn envelope(statement: &Value, key: &SigningKey) -> Value {
    let body = serde_json::to_vec(statement).unwrap_or_default();
    let signature = key.sign(&pae(PAYLOAD_TYPE, &body));
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "payloadType": PAYLOAD_TYPE,
        "payload": b64.encode(&body),
        "signatures": [{
            "keyid": key_id(&key.verifying_key()),
            "sig": b64.encode(signature.to_bytes()),
        }],
    })
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

/// Writes `provenance.json` into `record`, signed with this user's key ([`signing_key`]).
pub fn write_signed(record: &Path, facts: &Facts) -> Result<PathBuf, ProvenanceError> {
    let key = signing_key()?;
    let statement = statement(record, facts)?;
    let text = serde_json::to_string_pretty(&envelope(&statement, &key)).unwrap_or_default();
    let path = record.join(PROVENANCE_FILE);
    std::fs::write(&path, text + "\n").map_err(io("write", &path))?;
    Ok(path)
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

/// The statement's `externalParameters`: the spec as given.
pub fn external_parameters(spec: &BuildSpec) -> Value {
    json!({
        "script": spec.script,
        "fetch": spec.fetch,
        "env": spec.env,
        "artifacts": spec.artifacts,
        "image": {
            "name": spec.image,
            "base": spec.derived.as_ref().map(|d| d.base.clone()),
            "packages": spec.derived.as_ref().map(|d| d.packages.clone()).unwrap_or_default(),
        },
        "network": {
            "allow": spec.allow,
            "inspect": spec.inspect,
            "tunnel": spec.tunnel,
        },
        "limits": {
            "timeoutSecs": spec.timeout.as_secs(),
            "maxLogBytes": spec.max_log_bytes,
            "maxArtifactsBytes": spec.max_artifacts_bytes,
        },
        "lockedDownloads": spec.lock.as_ref().map(|l| l.downloads.len()),
    })
}

/// The in-toto statement of the build in `record`.
pub fn statement(record: &Path, facts: &Facts) -> Result<Value, ProvenanceError> {
    let spec = facts.spec;
    let subject: Vec<Value> = artifact_digests(record)?
        .into_iter()
        .map(|(name, sha256)| json!({"name": name, "digest": {"sha256": sha256}}))
        .collect();
    let external = external_parameters(spec);
    let (downloads, mut reasons) = downloads(record)?;
    if !spec.inspect {
        reasons.push("[network] inspect is off: HTTPS traffic is known by host only".to_string());
    } else if !spec.tunnel.is_empty() {
        reasons.push(format!(
            "[network] tunnel hosts are not inspected, known by host only: {}",
            spec.tunnel.join(", ")
        ));
    }
    let internal = json!({
        "vm": {
            "cpus": spec.cpus,
            "memoryMib": spec.memory_mib,
            "diskGib": spec.disk_gib,
            "network": "none (virtio-serial to the proxy and the store only)",
        },
        "accelerator": facts.accel,
        "boot": facts.boot,
        "offline": facts.offline,
        "rebuildOf": facts.rebuild_of,
        "buildCache": {
            "paths": spec.cache_paths,
            "restored": facts.cache_restored,
        },
        "buildHost": facts.host,
        "contractorVersion": env!("CARGO_PKG_VERSION"),
        "downloads": {
            "count": downloads.len(),
            "complete": reasons.is_empty(),
            "incompleteBecause": reasons,
        },
    });
    let mut resolved = vec![source_dependency(record, &spec.project_dir)];
    match facts.image {
        Some(manifest) => {
            let mut annotations = json!({
                "suite": manifest.suite,
                "created": manifest.created,
            });
            if let Some(base) = &manifest.base {
                annotations["base"] = json!(base);
                annotations["packages"] = json!(manifest.packages);
            }
            resolved.push(json!({
                "name": "image",
                "uri": format!("contractor-image:{}", manifest.name),
                "digest": {"sha256": manifest.disk_sha256},
                "annotations": annotations,
            }));
            resolved.push(json!({
                "name": "guest-agent",
                "uri": format!("contractor-agent:{}", manifest.agent_version),
                "digest": {"sha256": manifest.agent_sha256},
            }));
        }
        None => resolved.push(json!({
            "name": "image",
            "uri": format!("contractor-image:{}", spec.image),
            "annotations": {"digest": "not known here: the image is on the build host"},
        })),
    }
    resolved.extend(downloads);
    let mut byproducts = Vec::new();
    for name in ["result.json", "build.log", "proxy.jsonl", "downloads.jsonl"] {
        if let Some(sha256) = file_sha256(&record.join(name))? {
            byproducts.push(json!({"name": name, "digest": {"sha256": sha256}}));
        }
    }
    // How the build ended, as an annotation of its result (SLSA's metadata has no field).
    if let Some(result) = byproducts
        .first_mut()
        .filter(|b| b["name"] == "result.json")
    {
        result["annotations"] = json!({"outcome": facts.outcome, "exitCode": facts.exit_code});
    }
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"contractor": env!("CARGO_PKG_VERSION")}},
                "metadata": {
                    "invocationId": facts.id,
                    "startedOn": rfc3339(facts.started_on),
                    "finishedOn": rfc3339(facts.finished_on),
                },
                "byproducts": byproducts,
            },
        },
    });
    Ok(statement)
}

/// Each artifact's path beneath `artifacts/` and SHA-256: from the store's
/// `artifacts.json` when the record has one, else hashed here.
pub fn artifact_digests(record: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
    let index = record.join("artifacts.json");
    if let Ok(bytes) = contractor_protocol::file::read_regular(&index, MAX_INDEX_BYTES) {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            if let Some(list) = value["artifacts"].as_array() {
                let found: BTreeMap<String, String> = list
                    .iter()
                    .filter_map(|a| {
                        Some((a["path"].as_str()?.into(), a["sha256"].as_str()?.into()))
                    })
                    .collect();
                if found.len() > MAX_SUBJECTS {
                    return Err(ProvenanceError::TooManyArtifacts(index));
                }
                return Ok(found);
            }
        }
    }
    hash_artifacts(&record.join("artifacts"))
}

/// Hashes every regular file under `dir` (links and special files left out), by its
/// `/`-separated path beneath it.
pub fn hash_artifacts(dir: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
    let mut found = BTreeMap::new();
    for path in crate::build::collect_artifacts(dir) {
        if found.len() >= MAX_SUBJECTS {
            return Err(ProvenanceError::TooManyArtifacts(dir.to_path_buf()));
        }
        let Ok(relative) = path.strip_prefix(dir) else {
            continue;
        };
        if let Some(sha256) = file_sha256(&path)? {
            found.insert(relative.to_string_lossy().into_owned(), sha256);
        }
    }
    Ok(found)
}

/// SHA-256 of the regular file `path`, streamed; `None` when it does not exist.
pub fn file_sha256(path: &Path) -> Result<Option<String>, ProvenanceError> {
    let mut file = match contractor_protocol::file::open_regular(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ProvenanceError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hex(&hasher.finalize())))
}

/// The resolved dependencies of `downloads.jsonl` (one per download line, in order) and
/// the reasons the list is not complete found in it (a `cut` line).
pub fn downloads(record: &Path) -> Result<(Vec<Value>, Vec<String>), ProvenanceError> {
    let path = record.join("downloads.jsonl");
    let bytes =
        match contractor_protocol::file::read_regular(&path, crate::records::MAX_DOWNLOADS_FILE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), Vec::new()))
            }
            Err(source) => {
                return Err(ProvenanceError::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
    let mut deps = Vec::new();
    let mut reasons = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            reasons.push("downloads.jsonl has a line that is not JSON".to_string());
            continue;
        };
        match value["type"].as_str() {
            Some("download") => {
                if let Some(dep) = download_dependency(&value) {
                    deps.push(dep);
                }
            }
            Some("cut") => reasons.push(
                "downloads.jsonl reached its size limit: later downloads are not listed"
                    .to_string(),
            ),
            _ => {}
        }
    }
    Ok((deps, reasons))
}

fn download_dependency(value: &Value) -> Option<Value> {
    let url = value["url"].as_str()?;
    let sha256 = value["sha256"].as_str()?;
    let mut annotations = json!({
        "kind": "download",
        "method": value["method"],
        "status": value["status"],
        "size": value["size"],
        "complete": value["complete"],
    });
    for key in ["phase", "from_cache", "pinned"] {
        if !value[key].is_null() {
            annotations[key] = value[key].clone();
        }
    }
    Some(json!({"uri": url, "digest": {"sha256": sha256}, "annotations": annotations}))
}

/// The packed source (`source.tar`) and, when the project is a git work tree, its commit.
fn source_dependency(record: &Path, project: &Path) -> Value {
    let mut dep = json!({"name": "source", "uri": "source.tar"});
    if let Ok(Some(sha256)) = file_sha256(&record.join("source.tar")) {
        dep["digest"] = json!({"sha256": sha256});
    }
    if let Some((commit, reference)) = git_commit(project) {
        dep["digest"]["gitCommit"] = json!(commit);
        if let Some(reference) = reference {
            dep["annotations"] = json!({"gitRef": reference});
        }
    }
    dep
}

/// The commit `HEAD` names in `project/.git` (read from the files, never by running git)
/// and the branch, if any.
pub fn git_commit(project: &Path) -> Option<(String, Option<String>)> {
    let git = project.join(".git");
    let read = |path: &Path| {
        contractor_protocol::file::read_regular(path, MAX_GIT_FILE_BYTES)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let head = read(&git.join("HEAD"))?;
    let head = head.trim();
    if is_object_id(head) {
        return Some((head.to_string(), None));
    }
    let reference = head.strip_prefix("ref: ")?.trim();
    let safe = reference.starts_with("refs/")
        && !reference
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if !safe {
        return None;
    }
    if let Some(text) = read(&git.join(reference)) {
        let id = text.trim();
        return is_object_id(id).then(|| (id.to_string(), Some(reference.to_string())));
    }
    let packed = read(&git.join("packed-refs"))?;
    packed.lines().find_map(|line| {
        let (id, name) = line.split_once(' ')?;
        (name == reference && is_object_id(id))
            .then(|| (id.to_string(), Some(reference.to_string())))
    })
}

fn is_object_id(text: &str) -> bool {
    (text.len() == 40 || text.len() == 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `2026-11-25T14:15:02Z`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    crate::clock::format_utc(secs).replacen(' ', "T", 1) + "Z"
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why `contractor verify` could not check a file (bad input, exit 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyInputError {
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

/// What `contractor verify` found: empty when everything verifies.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Each thing that does not verify, named.
    pub problems: Vec<String>,
    /// The artifacts checked.
    pub artifacts: usize,
    /// The downloads checked.
    pub downloads: usize,
}

/// Checks the envelope at `path` with `key`, the record's artifacts (beside it, in
/// `artifacts/`) against its subjects, and its `downloads.jsonl` against the statement.
pub fn verify(path: &Path, key: &VerifyingKey) -> Result<Verdict, VerifyInputError> {
    let format = |problem: String| VerifyInputError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let bytes =
        contractor_protocol::file::read_regular(path, MAX_PROVENANCE_BYTES).map_err(|source| {
            VerifyInputError::Read {
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
    let signatures = envelope["signatures"]
        .as_array()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format("no `signatures` (a non-empty array)".into()))?;
    let message = pae(payload_type, &body);
    let mut verdict = Verdict::default();
    let mut signed = false;
    for (i, entry) in signatures.iter().enumerate() {
        let sig = entry["sig"]
            .as_str()
            .ok_or_else(|| format(format!("`signatures[{i}].sig` is not a string")))
            .and_then(|s| {
                b64.decode(s)
                    .map_err(|e| format(format!("`signatures[{i}].sig` is not base64 ({e})")))
            })?;
        if let Ok(signature) = Signature::from_slice(&sig) {
            signed |= key.verify(&message, &signature).is_ok();
        }
    }
    if !signed {
        verdict.problems.push(format!(
            "the signature does not verify with key {} (the statement was changed, or another key signed it: --key)",
            key_id(key)
        ));
        return Ok(verdict);
    }
    let statement: Value = serde_json::from_slice(&body)
        .map_err(|e| format(format!("`payload` is not a JSON statement ({e})")))?;
    if statement["_type"] != STATEMENT_TYPE || statement["predicateType"] != PREDICATE_TYPE {
        return Err(format(format!(
            "the statement's `_type` or `predicateType` is not {STATEMENT_TYPE} with {PREDICATE_TYPE}"
        )));
    }
    let record = path.parent().unwrap_or(Path::new("."));
    check_artifacts(record, &statement, &mut verdict).map_err(|e| format(e.to_string()))?;
    check_downloads(record, &statement, &mut verdict).map_err(|e| format(e.to_string()))?;
    Ok(verdict)
}

fn check_artifacts(
    record: &Path,
    statement: &Value,
    verdict: &mut Verdict,
) -> Result<(), ProvenanceError> {
    let mut claimed = BTreeMap::new();
    for subject in statement["subject"].as_array().into_iter().flatten() {
        let name = subject["name"].as_str().unwrap_or_default();
        let sha256 = subject["digest"]["sha256"].as_str().unwrap_or_default();
        claimed.insert(name.to_string(), sha256.to_string());
    }
    let actual = hash_artifacts(&record.join("artifacts"))?;
    for (name, sha256) in &claimed {
        match actual.get(name) {
            None => verdict
                .problems
                .push(format!("artifact {name:?} is missing from the record")),
            Some(found) if found != sha256 => verdict.problems.push(format!(
                "artifact {name:?} differs: sha256 {found}, the statement says {sha256}"
            )),
            Some(_) => {}
        }
    }
    for name in actual.keys().filter(|n| !claimed.contains_key(*n)) {
        verdict
            .problems
            .push(format!("artifact {name:?} is not in the statement"));
    }
    verdict.artifacts = claimed.len();
    Ok(())
}

fn check_downloads(
    record: &Path,
    statement: &Value,
    verdict: &mut Verdict,
) -> Result<(), ProvenanceError> {
    let key = |v: &Value| -> Option<(String, String)> {
        Some((
            v["uri"].as_str()?.to_string(),
            v["digest"]["sha256"].as_str()?.to_string(),
        ))
    };
    let stated: BTreeSet<(String, String)> = statement["predicate"]["buildDefinition"]
        ["resolvedDependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["annotations"]["kind"] == "download")
        .filter_map(key)
        .collect();
    let (deps, _) = downloads(record)?;
    let recorded: BTreeSet<(String, String)> = deps.iter().filter_map(key).collect();
    for (url, sha256) in recorded.difference(&stated) {
        verdict.problems.push(format!(
            "downloads.jsonl lists {url} (sha256 {sha256}), the statement does not"
        ));
    }
    for (url, sha256) in stated.difference(&recorded) {
        verdict.problems.push(format!(
            "the statement lists the download {url} (sha256 {sha256}), downloads.jsonl does not"
        ));
    }
    verdict.downloads = stated.len();
    Ok(())
}

/// A record to state, for the tests here and in `tests/provenance.rs`: two artifacts,
/// `downloads.jsonl` with two downloads (and a decision line), `result.json`, a log and a
/// packed source, in `record`; a git work tree on `main` at a fixed commit in `project`.
#[doc(hidden)]
pub fn write_fixture(record: &Path, project: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(record.join("artifacts/sub"))?;
    std::fs::write(record.join("artifacts/hello"), b"hello binary\n")?;
    std::fs::write(record.join("artifacts/sub/notes.txt"), b"notes\n")?;
    let downloads = [
        r#"{"type":"download","time":1795615977.5,"method":"GET","url":"https://deb.debian.org/a.deb","status":200,"size":3,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","complete":true}"#,
        r#"{"type":"decision","time":1795615977.6,"client":"127.0.0.1:5000","method":"CONNECT","host":"evil.example","port":443,"decision":"deny","reason":"host not on the allowlist"}"#,
        r#"{"type":"download","time":1795615978.0,"method":"GET","url":"https://static.crates.io/crates/x/x-1.0.crate","status":200,"size":0,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","complete":true,"phase":"fetch"}"#,
    ];
    std::fs::write(record.join("downloads.jsonl"), downloads.join("\n") + "\n")?;
    std::fs::write(record.join("build.log"), b"make\n")?;
    std::fs::write(record.join("source.tar"), b"not really a tar")?;
    let result = contractor_protocol::result::BuildResult {
        version: 1,
        id: record
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        outcome: Outcome::Failed,
        exit_code: Some(2),
        duration_secs: 13.0,
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: vec![],
        refused_hosts: vec!["evil.example".into()],
        refused_offline: vec![],
        upstream_failures: vec![],
        limit: None,
        error: None,
        host: None,
    };
    std::fs::write(
        record.join("result.json"),
        serde_json::to_vec_pretty(&result).unwrap_or_default(),
    )?;
    std::fs::create_dir_all(project.join(".git/refs/heads"))?;
    std::fs::write(project.join(".git/HEAD"), b"ref: refs/heads/main\n")?;
    std::fs::write(
        project.join(".git/refs/heads/main"),
        b"0123456789abcdef0123456789abcdef01234567\n",
    )?;
    Ok(())
}

/// The spec text of the fixture's project.
#[doc(hidden)]
pub const FIXTURE_SPEC: &str = r#"
[build]
script = "make"
fetch = "make fetch"
artifacts = ["hello", "sub/*"]

[network]
allow = ["deb.debian.org", "static.crates.io"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: 1,
            name: "debian-12-build".into(),
            suite: "bookworm".into(),
            created: 1_795_615_000,
            disk_sha256: "d".repeat(64),
            agent_version: "0.1.0".into(),
            agent_sha256: "a".repeat(64),
            cmdline: "console=ttyS0".into(),
            base: None,
            packages: vec![],
            check_valid_until: None,
            source: None,
        }
    }

    fn fixture(spec_text: &str) -> (tempfile::TempDir, PathBuf, BuildSpec) {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = dir.path().join("project");
        let record = project.join(".contractor/builds/20261125-141502-3fa2c1");
        write_fixture(&record, &project).expect("fixture");
        let spec = crate::spec::parse(&project.join("contractor.toml"), spec_text).expect("spec");
        (dir, record, spec)
    }

    fn facts<'a>(spec: &'a BuildSpec, manifest: &'a Manifest) -> Facts<'a> {
        Facts {
            id: "20261125-141502-3fa2c1",
            spec,
            accel: contractor_protocol::vm::Accel::Auto,
            boot: "cold".into(),
            offline: false,
            image: Some(manifest),
            host: None,
            started_on: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_615_977),
            finished_on: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_615_990),
            outcome: Outcome::Success,
            exit_code: Some(0),
            rebuild_of: None,
            cache_restored: Some(false),
        }
    }

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

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

    #[test]
    fn pae_is_dsse_v1() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn the_statement_lists_artifacts_downloads_source_and_image() {
        let (_dir, record, spec) = fixture(FIXTURE_SPEC);
        let manifest = manifest();
        let st = statement(&record, &facts(&spec, &manifest)).expect("statement");
        assert_eq!(st["_type"], STATEMENT_TYPE);
        assert_eq!(st["predicateType"], PREDICATE_TYPE);
        assert_eq!(
            st["subject"],
            json!([
                {"name": "hello", "digest": {"sha256": sha(b"hello binary\n")}},
                {"name": "sub/notes.txt", "digest": {"sha256": sha(b"notes\n")}},
            ])
        );
        let def = &st["predicate"]["buildDefinition"];
        assert_eq!(def["buildType"], BUILD_TYPE);
        assert_eq!(def["externalParameters"]["script"], "make");
        assert_eq!(def["externalParameters"]["fetch"], "make fetch");
        assert_eq!(
            def["externalParameters"]["network"]["allow"],
            json!(["deb.debian.org", "static.crates.io"])
        );
        assert_eq!(def["internalParameters"]["downloads"]["complete"], true);
        let deps = def["resolvedDependencies"].as_array().expect("deps");
        assert_eq!(deps[0]["name"], "source");
        assert_eq!(deps[0]["digest"]["sha256"], sha(b"not really a tar"));
        assert_eq!(
            deps[0]["digest"]["gitCommit"],
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(deps[1]["digest"]["sha256"], "d".repeat(64));
        assert_eq!(deps[2]["name"], "guest-agent");
        assert_eq!(deps[2]["digest"]["sha256"], "a".repeat(64));
        let downloads: Vec<(&str, &str)> = deps[3..]
            .iter()
            .map(|d| {
                (
                    d["uri"].as_str().expect("uri"),
                    d["digest"]["sha256"].as_str().expect("sha256"),
                )
            })
            .collect();
        assert_eq!(
            downloads,
            [
                (
                    "https://deb.debian.org/a.deb",
                    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
                ),
                (
                    "https://static.crates.io/crates/x/x-1.0.crate",
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                ),
            ]
        );
        assert_eq!(deps[4]["annotations"]["phase"], "fetch");
        let run = &st["predicate"]["runDetails"];
        assert_eq!(run["builder"]["id"], BUILDER_ID);
        assert_eq!(run["metadata"]["invocationId"], "20261125-141502-3fa2c1");
        assert_eq!(run["metadata"]["startedOn"], "2026-11-25T14:12:57Z");
        assert_eq!(run["byproducts"][0]["name"], "result.json");
        assert_eq!(run["byproducts"][0]["annotations"]["outcome"], "success");
        assert_eq!(run["byproducts"][0]["annotations"]["exitCode"], 0);
        assert_eq!(run["byproducts"][1]["digest"]["sha256"], sha(b"make\n"));
    }

    #[test]
    fn the_store_index_names_the_subjects_when_there_is_one() {
        let (_dir, record, spec) = fixture(FIXTURE_SPEC);
        std::fs::write(
            record.join("artifacts.json"),
            format!(
                r#"{{"version":1,"build":"b","artifacts":[{{"path":"hello","size":1,"sha256":"{}","executable":true}}]}}"#,
                "e".repeat(64)
            ),
        )
        .expect("index");
        let manifest = manifest();
        let st = statement(&record, &facts(&spec, &manifest)).expect("statement");
        assert_eq!(
            st["subject"],
            json!([{"name": "hello", "digest": {"sha256": "e".repeat(64)}}])
        );
    }

    #[test]
    fn tunnels_uninspected_traffic_and_a_cut_list_mark_the_downloads_incomplete() {
        let tunnel = FIXTURE_SPEC.replace("allow = [", "tunnel = [\"deb.debian.org\"]\nallow = [");
        let uninspected = FIXTURE_SPEC.replace("allow = [", "inspect = false\nallow = [");
        for text in [tunnel, uninspected] {
            let (_dir, record, spec) = fixture(&text);
            let manifest = manifest();
            let st = statement(&record, &facts(&spec, &manifest)).expect("statement");
            let downloads = &st["predicate"]["buildDefinition"]["internalParameters"]["downloads"];
            assert_eq!(downloads["complete"], false, "{text}");
            assert!(
                downloads["incompleteBecause"][0]
                    .as_str()
                    .is_some_and(|r| r.contains("known by host only")),
                "{downloads}"
            );
        }
        let (_dir, record, spec) = fixture(FIXTURE_SPEC);
        let mut list = std::fs::read(record.join("downloads.jsonl")).expect("read");
        list.extend_from_slice(b"{\"type\":\"cut\"}\n");
        std::fs::write(record.join("downloads.jsonl"), list).expect("write");
        let manifest = manifest();
        let st = statement(&record, &facts(&spec, &manifest)).expect("statement");
        let downloads = &st["predicate"]["buildDefinition"]["internalParameters"]["downloads"];
        assert_eq!(downloads["complete"], false);
    }

    #[test]
    fn a_key_is_made_once_mode_0600_and_signs_what_verifies() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, record, spec) = fixture(FIXTURE_SPEC);
        let key_file = dir.path().join("data/signing-key");
        let key = load_or_create_key(&key_file, true).expect("make");
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_key(&key_file, true).expect("load");
        let pem = std::fs::read_to_string(&key_file).expect("pem");
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAw"),
            "PKCS#8 v1: {pem}"
        );
        assert_eq!(key.to_bytes(), again.to_bytes(), "made once, then read");
        assert!(
            load_or_create_key(&dir.path().join("given"), false).is_err(),
            "a key given by path is never made"
        );
        let manifest = manifest();
        let st = statement(&record, &facts(&spec, &manifest)).expect("statement");
        let env = envelope(&st, &key);
        let file = record.join(PROVENANCE_FILE);
        std::fs::write(&file, env.to_string()).expect("write");
        let verdict = verify(&file, &key.verifying_key()).expect("verify");
        assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
        assert_eq!((verdict.artifacts, verdict.downloads), (2, 2));

        // Another key: the signature does not verify.
        let other = SigningKey::from_bytes(&[7u8; 32]);
        let verdict = verify(&file, &other.verifying_key()).expect("verify");
        assert!(verdict.problems[0].contains("signature does not verify"));

        // A changed artifact, a missing one, an extra one, a download not stated.
        std::fs::write(record.join("artifacts/hello"), b"trojan\n").expect("tamper");
        std::fs::remove_file(record.join("artifacts/sub/notes.txt")).expect("rm");
        std::fs::write(record.join("artifacts/extra"), b"x").expect("extra");
        let mut list = std::fs::read(record.join("downloads.jsonl")).expect("read");
        list.extend_from_slice(
            br#"{"type":"download","method":"GET","url":"https://x.example/y","status":200,"size":1,"sha256":"00","complete":true}"#,
        );
        std::fs::write(record.join("downloads.jsonl"), list).expect("write");
        let verdict = verify(&file, &key.verifying_key()).expect("verify");
        let all = verdict.problems.join("\n");
        assert!(all.contains("artifact \"hello\" differs"), "{all}");
        assert!(all.contains("\"sub/notes.txt\" is missing"), "{all}");
        assert!(all.contains("\"extra\" is not in the statement"), "{all}");
        assert!(all.contains("https://x.example/y"), "{all}");
    }
}
