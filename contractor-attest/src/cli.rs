//! The command line: one request (`contractor_protocol::attest::AttestRequest`) on stdin,
//! one answer on stdout, human messages on stderr, and the exit code: 0 done (verify:
//! everything verifies), 1 verify found problems (named in the answer and on stderr), 2 bad
//! input (the request, a key file, an envelope), 3 this host could not do it. Each request
//! reads its key first, then confines the process ([`crate::confinement`]) before it reads
//! a record.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use contractor_protocol::attest::{
    AttestAnswer, AttestRequest, RebuildComparison, SignRequest, Verified, MAX_REQUEST_BYTES,
    PROVENANCE_FILE, REBUILD_FILE,
};
use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::service::Confinement;
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

use crate::{io, AttestError};

const TOOL: &str = contractor_protocol::tool::names::ATTEST;

/// Sign a build record's provenance, verify it, show the signing key, or plan and compare
/// a rebuild.
#[derive(Parser)]
#[command(
    name = "contractor-attest",
    version,
    about,
    after_help = r#"Reads one request on stdin and writes one answer on stdout, for example:

  {"type":"key","version":1,"key":"/home/me/.local/share/contractor/signing-key","create":true}
  -> {"type":"public_key","version":1,"pem":"-----BEGIN PUBLIC KEY-----\n...","key_id":"5f2c..."}

  {"type":"verify","version":1,"envelope":".contractor/builds/ID/provenance.json","key":"contractor.pub"}
  -> {"type":"verdict","version":1,"problems":[],"artifacts":2,"downloads":3,"key_id":"5f2c...","confinement":{...}}

  {"type":"digests","version":1,"record":".contractor/builds/ID"}
  {"type":"plan","version":1,"record":...,"external_parameters":{...},...}   (a rebuild's inputs)
  {"type":"compare","version":1,"original":...,"rebuild":...,"inputs_differ":[]}
  {"type":"sign","version":1,"record":...,"key":...,...}   (docs/protocol.md lists their fields)

Exit codes: 0 done, 1 does not verify, 2 bad input, 3 infrastructure failure."#
)]
struct Args {
    /// When the request fails, also write the error on stdout as one JSON object
    /// ({"type":"error","version":1,"code":...,"chain":[...]}).
    #[arg(long)]
    json_errors: bool,
    /// Do not confine this process (no Landlock, seccomp or rlimits): for debugging only.
    #[arg(long)]
    no_confine: bool,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot read the request from stdin")]
    Stdin(#[source] std::io::Error),
    #[error("the request on stdin is bigger than {MAX_REQUEST_BYTES} bytes")]
    TooBig,
    #[error("bad JSON request on stdin{at}: {detail}")]
    Json { at: String, detail: String },
    #[error("cannot confine this process")]
    Confine(#[source] contractor_confine::ConfineError),
    #[error(transparent)]
    Attest(#[from] AttestError),
}

impl CliError {
    fn code(&self) -> ToolCode {
        match self {
            CliError::Stdin(_) => ToolCode::Stdin,
            CliError::TooBig | CliError::Json { .. } => ToolCode::BadJson,
            CliError::Confine(_) => ToolCode::Confine,
            CliError::Attest(AttestError::BadKey { .. }) => ToolCode::BadKey,
            CliError::Attest(AttestError::Statement(_)) => ToolCode::BadEnvelope,
            CliError::Attest(AttestError::SpecChanged { .. }) => ToolCode::SpecChanged,
            CliError::Attest(AttestError::ImageChanged(_)) => ToolCode::ImageChanged,
            CliError::Attest(_) => ToolCode::Attest,
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Stdin(_) | CliError::Confine(_) => ExitCode::Infrastructure,
            CliError::TooBig | CliError::Json { .. } => ExitCode::BadInput,
            CliError::Attest(e) if e.is_bad_input() => ExitCode::BadInput,
            CliError::Attest(_) => ExitCode::Infrastructure,
        }
    }
}

/// Runs the tool; only this turns errors into exit codes.
pub fn run() -> std::process::ExitCode {
    let args = Args::parse();
    let result = read_request().and_then(|request| handle(request, !args.no_confine));
    match result {
        Ok((answer, exit)) => {
            let mut stdout = std::io::stdout().lock();
            if contractor_protocol::jsonl::write_line(&mut stdout, &answer).is_err()
                || stdout.flush().is_err()
            {
                return ExitCode::Infrastructure.into();
            }
            exit.into()
        }
        Err(err) => {
            let chain = contractor_protocol::result::error_chain(&err);
            ErrorObject::report(TOOL, err.code(), chain, args.json_errors);
            err.exit_code().into()
        }
    }
}

fn read_request() -> Result<AttestRequest, CliError> {
    let mut text = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(CliError::Stdin)?;
    if text.len() as u64 > MAX_REQUEST_BYTES {
        return Err(CliError::TooBig);
    }
    let text = String::from_utf8_lossy(&text);
    serde_json::from_str(&text).map_err(|e| {
        let located = contractor_protocol::locate::locate_tagged(&text, &e, reparse);
        CliError::Json {
            at: located.at(),
            detail: located.detail,
        }
    })
}

/// Parses one member of a request as its field's type, to name the field a bad value is
/// in (serde gives no position inside a tagged enum); `None` for other members.
fn reparse(key: &str, value: &str) -> Option<serde_json::Error> {
    use contractor_protocol::image::Manifest;
    fn as_type<T: serde::de::DeserializeOwned>(value: &str) -> Option<serde_json::Error> {
        serde_json::from_str::<T>(value).err()
    }
    match key {
        "record" | "original" | "rebuild" | "envelope" | "key" | "project" | "spec" => {
            as_type::<PathBuf>(value)
        }
        "version" | "cpus" => as_type::<u32>(value),
        "memory_mib" | "disk_gib" => as_type::<u64>(value),
        "create" | "create_key" | "any_image" => as_type::<bool>(value),
        "inputs_differ" | "cache_paths" => as_type::<Vec<String>>(value),
        "images" => as_type::<Vec<Manifest>>(value),
        _ => None,
    }
}

fn handle(request: AttestRequest, confine: bool) -> Result<(AttestAnswer, ExitCode), CliError> {
    let confined = |read: Vec<PathBuf>| -> Result<Confinement, CliError> {
        if confine {
            contractor_confine::confine(TOOL, &crate::confinement::policy(read))
                .map_err(CliError::Confine)
        } else {
            Ok(contractor_confine::unconfined(TOOL))
        }
    };
    match request {
        AttestRequest::Key { key, create, .. } => {
            let key = crate::key::load_or_create_key(&key, create)?.verifying_key();
            confined(Vec::new())?;
            let answer = AttestAnswer::PublicKey {
                version: PROTOCOL_VERSION,
                pem: crate::key::public_pem(&key)?,
                key_id: crate::key::key_id(&key),
            };
            Ok((answer, ExitCode::Success))
        }
        AttestRequest::Sign(request) => sign(&request, confined),
        AttestRequest::Verify { envelope, key, .. } => {
            let key = crate::key::load_public_key(&key)?;
            let record = envelope.parent().unwrap_or(Path::new(".")).to_path_buf();
            let confinement = confined(vec![record])?;
            let verdict = crate::verify::verify(&envelope, &key)?;
            for problem in &verdict.problems {
                eprintln!("{TOOL}: {problem}");
            }
            let exit = match verdict.problems.is_empty() {
                true => ExitCode::Success,
                false => ExitCode::BuildFailed,
            };
            let answer = AttestAnswer::Verdict(Box::new(Verified {
                version: PROTOCOL_VERSION,
                problems: verdict.problems,
                artifacts: verdict.artifacts,
                downloads: verdict.downloads,
                key_id: crate::key::key_id(&key),
                confinement,
            }));
            Ok((answer, exit))
        }
        AttestRequest::Digests { record, .. } => {
            confined(vec![record.clone()])?;
            let artifacts = crate::digest::hash_artifacts(&record.join("artifacts"))?;
            let answer = AttestAnswer::Digests {
                version: PROTOCOL_VERSION,
                artifacts,
            };
            Ok((answer, ExitCode::Success))
        }
        AttestRequest::Plan(request) => {
            let confinement = confined(vec![request.record.clone()])?;
            let plan = crate::rebuild::plan(&request, confinement)?;
            Ok((AttestAnswer::Plan(Box::new(plan)), ExitCode::Success))
        }
        AttestRequest::Compare {
            original,
            rebuild,
            inputs_differ,
            cache_warning,
            ..
        } => compare(&original, &rebuild, &inputs_differ, cache_warning, confined),
    }
}

/// `compare`: `rebuild.json` is opened (never through a link) before the process confines
/// itself to reading the two records.
fn compare(
    original: &Path,
    rebuild: &Path,
    known: &[String],
    cache_warning: Option<String>,
    confined: impl Fn(Vec<PathBuf>) -> Result<Confinement, CliError>,
) -> Result<(AttestAnswer, ExitCode), CliError> {
    let path = rebuild.join(REBUILD_FILE);
    let mut file = open_output(&path)?;
    let confinement = confined(vec![original.to_path_buf(), rebuild.to_path_buf()])?;
    let (artifacts, inputs_differ) = crate::rebuild::comparison(original, rebuild, known)?;
    let id = original
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let json = crate::rebuild::record_json(&id, &artifacts, &inputs_differ);
    write_output(&mut file, &path, &json)?;
    let ended = crate::rebuild::Ended {
        original_id: &id,
        original: crate::rebuild::result_of(original)?,
        rebuild: crate::rebuild::result_of(rebuild)?
            .ok_or_else(|| crate::rebuild::no_result(rebuild))?,
    };
    let (summary, same_end) =
        crate::rebuild::summary(&ended, &artifacts, &inputs_differ, cache_warning.as_deref());
    let answer = AttestAnswer::Comparison(Box::new(RebuildComparison {
        version: PROTOCOL_VERSION,
        identical: crate::rebuild::all_identical(&artifacts),
        artifacts,
        inputs_differ,
        same_end,
        summary,
        path,
        confinement,
    }));
    Ok((answer, ExitCode::Success))
}

/// Opens the one file a request writes, never through a link, and only a regular file.
fn open_output(path: &Path) -> Result<std::fs::File, CliError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc_nofollow())
        .open(path)
        .map_err(io("write", path))?;
    if !file.metadata().map_err(io("write", path))?.is_file() {
        return Err(AttestError::Io {
            action: "write",
            path: path.to_path_buf(),
            source: std::io::Error::other("it is not a regular file"),
        }
        .into());
    }
    Ok(file)
}

/// Replaces the contents of `file` (opened by [`open_output`]) with `value`, pretty.
fn write_output(
    file: &mut std::fs::File,
    path: &Path,
    value: &serde_json::Value,
) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    file.set_len(0)
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.write_all(b"\n"))
        .map_err(io("write", path))?;
    Ok(())
}

/// `sign`: the key is read and `provenance.json` opened (never through a link) before the
/// process confines itself to reading the record and the project's `.git`.
fn sign(
    request: &SignRequest,
    confined: impl Fn(Vec<PathBuf>) -> Result<Confinement, CliError>,
) -> Result<(AttestAnswer, ExitCode), CliError> {
    if !crate::statement::ran_script(request) {
        let answer = AttestAnswer::NotSigned {
            version: PROTOCOL_VERSION,
            reason: format!("build {} did not run its script", request.id),
        };
        return Ok((answer, ExitCode::Success));
    }
    let key = crate::key::load_or_create_key(&request.key, request.create_key)?;
    let path = request.record.join(PROVENANCE_FILE);
    let mut file = open_output(&path)?;
    let confinement = confined(vec![request.record.clone(), request.project.join(".git")])?;
    let statement = crate::statement::statement(request)?;
    write_output(&mut file, &path, &crate::dsse::envelope(&statement, &key))?;
    let answer = AttestAnswer::Signed {
        version: PROTOCOL_VERSION,
        path,
        key_id: crate::key::key_id(&key.verifying_key()),
        confinement,
    };
    Ok((answer, ExitCode::Success))
}

/// `O_NOFOLLOW | O_NONBLOCK`: a link planted as `provenance.json` is refused, never written
/// through, and a FIFO never blocks the open (it is then refused as not a regular file).
fn libc_nofollow() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits()
}
