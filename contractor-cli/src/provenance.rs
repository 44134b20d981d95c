//! Signed provenance of a build, as the front end asks for it: `contractor-attest` signs a
//! record's `provenance.json`, checks one (`contractor verify`), shows the public key
//! (`contractor key`); `crate::rebuild` asks it to plan and compare a rebuild.
//!
//! The invariant: the front end never opens the signing key nor parses a record's files to
//! state or check them; it names the key's path (`$CONTRACTOR_SIGNING_KEY`, else
//! `signing-key` in the data directory) and the facts only it knows (the spec as given, how
//! the VM ran), and the confined tool does the rest (docs/provenance.md, docs/security.md).

use std::path::Path;
use std::time::SystemTime;

use contractor_protocol::attest::{AttestAnswer, AttestRequest, SignRequest};
pub use contractor_protocol::attest::{Verified, PREDICATE_TYPE, PROVENANCE_FILE, STATEMENT_TYPE};
use contractor_protocol::result::BuildResult;
use contractor_protocol::tool::ToolFailure;
use contractor_protocol::PROTOCOL_VERSION;

use crate::display::Display;
use crate::spec::BuildSpec;
use crate::tools;

pub use contractor_protocol::attest::{KEY_FILE, KEY_VARIABLE};

/// Why provenance could not be written, checked, or a key shown.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// There is no data directory for the key.
    #[error("no place for the signing key")]
    DataDir(#[from] contractor_protocol::image::NoDataDir),
    /// contractor-attest refused its input (a bad key or envelope, a rebuild it refuses),
    /// failed, or could not be asked: its own messages when it said why.
    #[error(transparent)]
    Attest(#[from] ToolFailure),
}

impl ProvenanceError {
    /// True when the input is at fault (a bad key or envelope): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ProvenanceError::DataDir(_) => true,
            ProvenanceError::Attest(failure) => failure.is_bad_input(),
        }
    }
}

/// Asks `contractor-attest` `request` and returns its answer (whatever its exit code: a
/// verdict that does not verify is the caller's to judge).
pub(crate) fn ask(request: &AttestRequest) -> Result<AttestAnswer, ProvenanceError> {
    match tools::ask(tools::ATTEST, &[], request) {
        Ok((answer, _)) => Ok(answer),
        Err(error) => Err(ToolFailure::from(error).into()),
    }
}

/// contractor-attest answered a `request` request with another kind of answer.
pub(crate) fn wrong_answer(request: &'static str) -> ProvenanceError {
    ToolFailure::WrongAnswer {
        name: tools::ATTEST,
        request,
    }
    .into()
}

/// The request that signs `result`'s build in `record` with this user's key
/// ([`contractor_protocol::attest::key_path`]): the spec as given and how the build ended,
/// and, for the facts only the caller knows, a build on this host that started at
/// `started_on` and finished now, with the accelerator asked for by default (`auto`), no
/// snapshot asked for, not offline, no image manifest, not a rebuild, its build cache not
/// known. The caller sets what differs
/// (`SignRequest { snapshot, .. }`). contractor-attest signs only a build that ran its
/// script.
pub fn sign_request(
    record: &Path,
    spec: &BuildSpec,
    result: &BuildResult,
    started_on: SystemTime,
) -> Result<SignRequest, ProvenanceError> {
    let (key, create_key) = contractor_protocol::attest::key_path()?;
    Ok(SignRequest {
        version: PROTOCOL_VERSION,
        record: record.to_path_buf(),
        key,
        create_key,
        project: spec.project_dir.clone(),
        id: result.id.clone(),
        external_parameters: external_parameters(spec),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        inspect: spec.inspect,
        tunnel: spec.tunnel.clone(),
        cache_paths: spec.cache_paths.clone(),
        cache_restored: None,
        accelerator: contractor_protocol::vm::Accel::Auto,
        snapshot: false,
        snapshot_report: None,
        offline: false,
        image_name: spec.image.clone(),
        image: None,
        build_host: None,
        started_on: unix_seconds(started_on),
        finished_on: unix_seconds(SystemTime::now()),
        outcome: result.outcome,
        exit_code: result.exit_code,
        rebuild_of: None,
    })
}

/// Signs `result`'s build in `record` as [`sign_request`] states it, with the facts only the
/// caller knows set by `facts` (`|request| SignRequest { snapshot, ..request }`), and
/// warns on `display` when the provenance cannot be written: the build's outcome stands.
pub fn sign(
    record: &Path,
    spec: &BuildSpec,
    result: &BuildResult,
    started_on: SystemTime,
    facts: impl FnOnce(SignRequest) -> SignRequest,
    display: &Display,
) {
    let signed =
        sign_request(record, spec, result, started_on).and_then(|r| write_signed(facts(r)));
    if let Err(err) = signed {
        display.warning(&format!(
            "cannot write the signed provenance: {}",
            contractor_protocol::result::joined_chain(&err)
        ));
    }
}

/// Has `contractor-attest` write `provenance.json` into the request's record, signed with
/// the key it names, when the build ran its script (else it writes nothing).
fn write_signed(request: SignRequest) -> Result<(), ProvenanceError> {
    match ask(&AttestRequest::Sign(Box::new(request)))? {
        AttestAnswer::Signed { .. } | AttestAnswer::NotSigned { .. } => Ok(()),
        _ => Err(wrong_answer("sign")),
    }
}

/// This user's public key as PEM, the key made on first use when it is the data
/// directory's.
pub fn public_key() -> Result<String, ProvenanceError> {
    let (key, create) = contractor_protocol::attest::key_path()?;
    let request = AttestRequest::Key {
        version: PROTOCOL_VERSION,
        key,
        create,
    };
    match ask(&request)? {
        AttestAnswer::PublicKey { pem, .. } => Ok(pem),
        _ => Err(wrong_answer("key")),
    }
}

/// Has `contractor-attest` check the envelope at `envelope` with the key at `key` (this
/// user's signing key when None).
pub fn verify(envelope: &Path, key: Option<&Path>) -> Result<Verified, ProvenanceError> {
    let key = match key {
        Some(key) => key.to_path_buf(),
        None => contractor_protocol::attest::key_path()?.0,
    };
    let request = AttestRequest::Verify {
        version: PROTOCOL_VERSION,
        envelope: envelope.to_path_buf(),
        key,
    };
    match ask(&request)? {
        AttestAnswer::Verdict(verified) => Ok(*verified),
        _ => Err(wrong_answer("verify")),
    }
}

/// The statement's `externalParameters`: the spec as given (made by contractor-spec).
pub use contractor_spec::external::external_parameters;

/// Seconds since the Unix epoch.
fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
