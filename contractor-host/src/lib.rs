//! `contractor-host build`: the build host's side of `contractor build --host`.
//!
//! The front end on another machine runs this over SSH (the stream is described in
//! `contractor_protocol::hosted` and docs/protocol.md). It takes the request and the source
//! (kept from the project's last build when it is the same, else received and checked by its
//! SHA-256), writes the project's `contractor.toml` and `contractor.lock` into
//! `$CONTRACTOR_DATA_DIR/hosted/<project key>/` (where its build cache stays between builds),
//! and runs the build there with `contractor build --json --local`, whose events go back to
//! the front end as they are; then it sends the record, file by file, and deletes it here.
//! The end of stdin (the session's end: Ctrl-C, a killed front end, a cut connection) sends
//! the build SIGTERM, so its VM is destroyed. The build itself, its VM and its tools are
//! `contractor build`'s: this tool only receives, hands over and sends back.
//!
//! The same tool is the front end's side on the developer's machine (docs/protocol.md):
//! `resolve` names the build hosts ([`buildhost`]), `hosts` reports their room and the
//! line ([`fleet`]), `send` runs one whole session with a build host ([`send`]), and `vm`
//! runs the doctor's checks there ([`queries`]).

#![warn(missing_docs)]

pub mod buildhost;
pub mod fleet;
pub mod queries;
pub mod send;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::hosted::{
    is_build_id, is_project_key, HostedLine, HostedRequest, MAX_RECORD_DEPTH, MAX_RECORD_FILES,
    MAX_REQUEST_BYTES, NOT_SENT,
};
use contractor_protocol::jsonl::{self, JsonlReader};
use contractor_protocol::result::BuildCode;
use contractor_protocol::tool::{Locator, Signaller, Supervised, ToolError};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

/// This release, as `contractor --version` names it: the front end must run the same.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The project's spec and lock, as `contractor build` finds them in its directory.
const SPEC_FILE: &str = "contractor.toml";
const LOCK_FILE: &str = "contractor.lock";

/// Why a hosted build could not start: its error code, messages and exit code.
struct Refusal {
    code: &'static str,
    chain: Vec<String>,
    exit: ExitCode,
}

impl Refusal {
    fn input(chain: Vec<String>) -> Refusal {
        Refusal {
            code: BuildCode::BadSpec.as_str(),
            chain,
            exit: ExitCode::BadInput,
        }
    }

    fn host(chain: Vec<String>) -> Refusal {
        Refusal {
            code: BuildCode::BuildHost.as_str(),
            chain,
            exit: ExitCode::Infrastructure,
        }
    }
}

/// A request read, its source received, ready to build.
struct Prepared {
    request: HostedRequest,
    /// The project's directory here.
    dir: PathBuf,
    /// The source, received or kept.
    tar: PathBuf,
}

/// Serves one hosted build on this process's stdin and stdout; returns its exit code.
pub fn serve() -> ExitCode {
    let mut out = std::io::stdout();
    let hello = HostedLine::Hello {
        version: PROTOCOL_VERSION,
        contractor: RELEASE.into(),
    };
    if jsonl::write_line(&mut out, &hello).is_err() {
        return ExitCode::Infrastructure;
    }
    let mut input = BufReader::new(std::io::stdin());
    let prepared = match prepare(&mut input, &mut out) {
        Ok(prepared) => prepared,
        Err(refusal) => return refuse(refusal),
    };
    let store_root = prepared.dir.join(".contractor");
    remove_stale_records(&store_root);
    let record = store_root.join("builds").join(&prepared.request.id);
    let exit = match build(&prepared, input) {
        Ok(exit) => {
            if record.join("result.json").is_file() {
                if let Err(err) = send_record(&record, &mut out) {
                    eprintln!("contractor-host: cannot send the build record: {err}");
                }
            }
            exit
        }
        Err(refusal) => refuse(refusal),
    };
    let _ = std::fs::remove_file(&prepared.tar);
    if let Err(err) = std::fs::remove_dir_all(&record) {
        if err.kind() != std::io::ErrorKind::NotFound {
            eprintln!("contractor-host: cannot remove {}: {err}", record.display());
        }
    }
    exit
}

/// Runs the build with `contractor build` in the project's directory, its events on this
/// process's stdout; the end of `input` before it is over sends it SIGTERM. Its exit code.
fn build(prepared: &Prepared, input: BufReader<std::io::Stdin>) -> Result<ExitCode, Refusal> {
    let request = &prepared.request;
    let contractor = contractor_binary()?;
    let mut command = Command::new(&contractor);
    command
        .args(["build", "--json", "--local", "--id", &request.id, "-f"])
        .arg(prepared.dir.join(SPEC_FILE))
        .arg("--packed-source")
        .arg(&prepared.tar)
        .args(["--source-entries", &request.source_entries.to_string()])
        .args(["--accel", accel_flag(request.accel)])
        .current_dir(&prepared.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(uri) = &request.uri {
        command.arg("--uri").arg(uri);
    }
    if !request.snapshot {
        command.arg("--cold");
    }
    if request.offline {
        command.arg("--offline");
    }
    let child = Supervised::start(&mut command)
        .map_err(|e| Refusal::host(vec![format!("cannot run {}: {e}", contractor.display())]))?;
    // Once the build is reaped, the session's end is no interruption and sends nothing.
    watch_session(input, child.signaller());
    let status = child.wait().map_err(|e| {
        Refusal::host(vec![format!(
            "cannot wait for {}: {e}",
            contractor.display()
        )])
    })?;
    Ok(match status.code() {
        Some(0) => ExitCode::Success,
        Some(1) => ExitCode::BuildFailed,
        Some(2) => ExitCode::BadInput,
        Some(130) => ExitCode::Interrupted,
        _ => ExitCode::Infrastructure,
    })
}

/// `contractor build --accel`'s value for `accel`.
fn accel_flag(accel: contractor_protocol::vm::Accel) -> &'static str {
    use contractor_protocol::vm::Accel;
    match accel {
        Accel::Auto => "auto",
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}

/// `contractor`, beside this executable (or in `$CONTRACTOR_BIN`).
fn contractor_binary() -> Result<PathBuf, Refusal> {
    // The refusal below says what to do; the locator's hints are not shown.
    let tools = Locator {
        unit_test: cfg!(test),
        hint_env: "",
        hint_beside: "",
    };
    tools.locate("contractor").map_err(|err| match err {
        ToolError::Missing { path, .. } => Refusal::host(vec![format!(
            "{} is missing: install Contractor {RELEASE} whole on this build host",
            path.display()
        )]),
        ToolError::Io { source, .. } => {
            Refusal::host(vec![format!("cannot find this executable: {source}")])
        }
        err => Refusal::host(vec![err.to_string()]),
    })
}

/// A closed record older than this was never sent back (its session broke): it is removed.
pub const STALE_RECORD: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the records under `store_root` that were closed more than [`STALE_RECORD`] ago:
/// every record sent back is deleted at once, so these are what broken sessions left.
fn remove_stale_records(store_root: &Path) {
    let Ok(entries) = std::fs::read_dir(store_root.join("builds")) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let closed = std::fs::metadata(entry.path().join("result.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if closed.is_some_and(|age| age > STALE_RECORD) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reports `refusal` as one error object on stdout (and on stderr) and returns its code.
fn refuse(refusal: Refusal) -> ExitCode {
    ErrorObject::report(
        "contractor",
        ToolCode::parse(refusal.code),
        refusal.chain,
        true,
    );
    refusal.exit
}

/// Reads the request and the source, checks both, and places them in the project's
/// directory here.
fn prepare(
    input: &mut BufReader<std::io::Stdin>,
    out: &mut impl Write,
) -> Result<Prepared, Refusal> {
    let request: HostedRequest = JsonlReader::with_limit(&mut *input, MAX_REQUEST_BYTES)
        .next_message()
        .map_err(|err| {
            Refusal::input(vec![format!("cannot read the hosted build request: {err}")])
        })?
        .ok_or_else(|| Refusal::input(vec!["the front end sent no hosted build request".into()]))?;
    if request.version != PROTOCOL_VERSION || request.contractor != RELEASE {
        return Err(Refusal::host(vec![format!(
            "this build host runs contractor {RELEASE} (protocol {PROTOCOL_VERSION}) and the front \
             end contractor {} (protocol {}): install one release on both",
            request.contractor, request.version
        )]));
    }
    if !is_build_id(&request.id) {
        return Err(Refusal::input(vec![format!(
            "the build id {:?} is not of the form YYYYMMDD-HHMMSS-xxxxxx",
            request.id
        )]));
    }
    if !is_project_key(&request.project) {
        return Err(Refusal::input(vec![format!(
            "the project key {:?} is not 32 lowercase hex digits",
            request.project
        )]));
    }
    let data =
        contractor_protocol::image::data_dir().map_err(|e| Refusal::host(vec![e.to_string()]))?;
    let dir = data.join("hosted").join(&request.project);
    contractor_protocol::file::create_dir_world_readable(&dir)
        .map_err(|e| Refusal::host(vec![format!("cannot create {}: {e}", dir.display())]))?;
    // The source must fit on the build disk it is unpacked on.
    let disk_gib = disk_gib(&dir.join(SPEC_FILE), &request.spec)?;
    install_spec(&dir, &request)?;
    if request.source_bytes > disk_gib.saturating_mul(1 << 30) {
        return Err(Refusal::input(vec![format!(
            "the packed source is {} bytes, more than the build disk ([vm] disk = {disk_gib} GiB) holds",
            request.source_bytes
        )]));
    }
    let tar = dir.join(format!(".incoming-{}.tar", request.id));
    take_source(input, out, &request, &dir, &tar)?;
    Ok(Prepared { request, dir, tar })
}

/// Writes the request's spec and lock (or removes a lock the project no longer has) where
/// `contractor build` reads them; `contractor build` checks them.
fn install_spec(dir: &Path, request: &HostedRequest) -> Result<(), Refusal> {
    let write = |name: &str, text: Option<&str>| -> std::io::Result<()> {
        let path = dir.join(name);
        let staged = dir.join(format!(".{name}.new"));
        match text {
            Some(text) => {
                std::fs::write(&staged, text)?;
                std::fs::rename(&staged, &path)
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    };
    write(SPEC_FILE, Some(&request.spec))
        .and_then(|()| write(LOCK_FILE, request.lock.as_deref()))
        .map_err(|e| {
            Refusal::host(vec![format!(
                "cannot write the spec into {}: {e}",
                dir.display()
            )])
        })
}

/// The spec's `[vm] disk` in GiB, the spec checked by contractor-spec as `contractor
/// build` will check it (but for its image, which contractor-vm here knows: an image it
/// lacks is `contractor build`'s error to report).
fn disk_gib(path: &Path, spec: &str) -> Result<u64, Refusal> {
    let named: Vec<String> = toml::from_str::<toml::Table>(spec)
        .ok()
        .and_then(|table| {
            let image = table.get("build")?.get("image")?.as_str()?.to_string();
            Some(vec![image])
        })
        .unwrap_or_default();
    contractor_spec::spec::parse_with_images(path, spec, &named)
        .map(|spec| spec.disk_gib)
        .map_err(|e| Refusal::input(contractor_protocol::result::error_chain(&e)))
}

/// Places the request's source at `tar`: the project's kept source when it is the same
/// (the front end is told it need not send it), else the bytes the front end sends next.
fn take_source(
    input: &mut BufReader<std::io::Stdin>,
    out: &mut impl Write,
    request: &HostedRequest,
    dir: &Path,
    tar: &Path,
) -> Result<(), Refusal> {
    let kept = match &request.source_sha256 {
        Some(sha) if !is_sha256(sha) => {
            return Err(Refusal::input(vec![format!(
                "the source's sha256 {sha:?} is not 64 lowercase hex digits"
            )]))
        }
        Some(sha) => {
            let kept = take_kept_source(dir, sha, request.source_bytes, tar);
            jsonl::write_line(&mut *out, &HostedLine::Source { need: !kept })
                .map_err(|e| Refusal::host(vec![format!("cannot answer the request: {e}")]))?;
            kept
        }
        None => false,
    };
    if !kept {
        receive_source(
            input,
            tar,
            request.source_bytes,
            request.source_sha256.as_deref(),
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(tar);
            Refusal::host(vec![format!(
                "cannot receive the source into {}: {e}",
                tar.display()
            )])
        })?;
        if let Some(sha) = &request.source_sha256 {
            keep_source(dir, tar, sha, request.source_bytes);
        }
    }
    Ok(())
}

/// The project's last source kept on this host: its tar, and its sha256 and size.
const KEPT_SOURCE: &str = ".kept-source.tar";
const KEPT_DIGEST: &str = ".kept-source.sha256";

/// Whether `text` is a sha256 in 64 lowercase hex digits.
fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Places the project's kept source at `tar` when it is the one of digest `sha` and size
/// `bytes` (a new link to it, else a copy); whether it did.
fn take_kept_source(dir: &Path, sha: &str, bytes: u64, tar: &Path) -> bool {
    let recorded = std::fs::read_to_string(dir.join(KEPT_DIGEST)).unwrap_or_default();
    let kept = dir.join(KEPT_SOURCE);
    let same = recorded.trim() == format!("{sha} {bytes}")
        && std::fs::symlink_metadata(&kept).is_ok_and(|m| m.is_file() && m.len() == bytes);
    same && (std::fs::hard_link(&kept, tar).is_ok() || std::fs::copy(&kept, tar).is_ok())
}

/// Keeps the source just received at `tar` (digest `sha`, `bytes` long) as the project's
/// last one, replacing the previous; a failure only means the next build sends it again.
fn keep_source(dir: &Path, tar: &Path, sha: &str, bytes: u64) {
    let staged = dir.join(format!("{KEPT_SOURCE}.new"));
    let _ = std::fs::remove_file(dir.join(KEPT_DIGEST));
    let _ = std::fs::remove_file(&staged);
    let kept = std::fs::hard_link(tar, &staged)
        .or_else(|_| std::fs::copy(tar, &staged).map(|_| ()))
        .and_then(|()| std::fs::rename(&staged, dir.join(KEPT_SOURCE)))
        .and_then(|()| std::fs::write(dir.join(KEPT_DIGEST), format!("{sha} {bytes}\n")));
    if let Err(err) = kept {
        eprintln!("contractor: cannot keep the source for the next build: {err}");
    }
}

/// Copies exactly `bytes` bytes of `input` into the new file `tar`; when `sha` is given,
/// they must have that sha256.
fn receive_source(
    input: &mut impl BufRead,
    tar: &Path,
    bytes: u64,
    sha: Option<&str>,
) -> std::io::Result<()> {
    use sha2::Digest;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tar)?;
    let mut hash = sha2::Sha256::new();
    let mut limited = input.take(bytes);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = limited.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
        file.write_all(&buffer[..n])?;
        copied += n as u64;
    }
    if copied != bytes {
        return Err(std::io::Error::other(format!(
            "the source ended after {copied} of its {bytes} bytes"
        )));
    }
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(sha) = sha.filter(|sha| *sha != got) {
        return Err(std::io::Error::other(format!(
            "its sha256 is {got}, the request said {sha}"
        )));
    }
    file.flush()
}

/// Reads what is left of stdin until it ends; its end before the build ends sends the
/// build SIGTERM (through `build`, which signals nothing once reaped): it destroys its VM
/// and ends as interrupted.
fn watch_session(mut input: BufReader<std::io::Stdin>, build: Signaller) {
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(input.read(&mut sink), Ok(n) if n > 0) {}
        build.signal(nix::sys::signal::Signal::SIGTERM);
    });
}

/// Sends the files of `record` (but [`NOT_SENT`]) to `out`, each a `file` line and its
/// bytes, then `end`.
fn send_record(record: &Path, out: &mut impl Write) -> std::io::Result<()> {
    let mut files = Vec::new();
    list_files(record, Path::new(""), 0, &mut files)?;
    for (relative, path) in &files {
        let mut file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        use std::os::unix::fs::PermissionsExt;
        let line = HostedLine::File {
            path: relative.to_string_lossy().into_owned(),
            bytes: meta.len(),
            executable: meta.permissions().mode() & 0o111 != 0,
        };
        jsonl::write_line(out, &line).map_err(std::io::Error::other)?;
        let copied = std::io::copy(&mut (&mut file).take(meta.len()), out)?;
        if copied != meta.len() {
            return Err(std::io::Error::other(format!(
                "{} shrank while it was sent",
                path.display()
            )));
        }
    }
    let end = HostedLine::End {
        files: files.len() as u64,
    };
    jsonl::write_line(out, &end).map_err(std::io::Error::other)?;
    out.flush()
}

/// The regular files under `dir` (whose path in the record is `relative`), recursively;
/// links and special files are left out.
fn list_files(
    dir: &Path,
    relative: &Path,
    depth: usize,
    files: &mut Vec<(PathBuf, PathBuf)>,
) -> std::io::Result<()> {
    if depth >= MAX_RECORD_DEPTH {
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if depth == 0 && NOT_SENT.iter().any(|n| name == *n) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let inner = relative.join(&name);
        if kind.is_dir() {
            list_files(&entry.path(), &inner, depth + 1, files)?;
        } else if kind.is_file() && (files.len() as u64) < MAX_RECORD_FILES {
            files.push((inner, entry.path()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod source_tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_received_source_is_kept_and_taken_again_only_by_its_digest_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = b"a tar, say".to_vec();
        let first = dir.path().join(".incoming-1.tar");
        let mut input = std::io::Cursor::new(body.clone());
        receive_source(&mut input, &first, body.len() as u64, Some(&sha(&body))).expect("received");
        keep_source(dir.path(), &first, &sha(&body), body.len() as u64);

        let second = dir.path().join(".incoming-2.tar");
        assert!(take_kept_source(
            dir.path(),
            &sha(&body),
            body.len() as u64,
            &second
        ));
        assert_eq!(std::fs::read(&second).expect("taken"), body);
        let third = dir.path().join(".incoming-3.tar");
        assert!(!take_kept_source(
            dir.path(),
            &sha(b"other"),
            body.len() as u64,
            &third
        ));
        assert!(!take_kept_source(dir.path(), &sha(&body), 3, &third));
        assert!(!third.exists());

        // Bytes that are not what the request's digest says are refused.
        let mut input = std::io::Cursor::new(b"forged".to_vec());
        let err = receive_source(&mut input, &third, 6, Some(&sha(&body))).expect_err("refused");
        assert!(err.to_string().contains("the request said"), "{err}");
        assert!(is_sha256(&sha(&body)) && !is_sha256("ABC"));
    }
}
