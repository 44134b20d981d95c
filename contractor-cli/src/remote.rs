//! `contractor build --host`: the same build, its VM on a build host reached over SSH.
//!
//! The session is `contractor-host send`'s (the contractor-host crate; docs/protocol.md):
//! it chooses the build host (the roomiest of those named, once first in this machine's
//! line), runs `ssh HOST contractor-host build`, sends the request and the source, and has
//! `contractor-store record follow` (confined to the local `.contractor/builds/<id>/`)
//! check the build host's stream and receive its record. This process never reads that
//! stream nor starts ssh: it asks `contractor-host resolve` which hosts, writes the
//! request, packs the source into the record, shows the checked events `send` passes on
//! (as a local build's), forwards Ctrl-C and SIGTERM to it (the first interrupts the build
//! there, its record still comes back), and writes `result.json` from its answer, naming
//! the host. `send` dies with this process (parent-death signal), and with it the session;
//! the build host then ends the build, so no VM outlives the front end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use contractor_protocol::build::BuildEvent;
use contractor_protocol::fleet::{
    Fleet, FleetRequest, HostProbe, ResolveRequest, Resolved, SendLine, SessionRequest,
};
use contractor_protocol::hosted::{HostedRequest, RECORD_OVERHEAD_BYTES};
use contractor_protocol::result::{error_chain, BuildCode, BuildResult, ErrorInfo, Outcome};
use contractor_protocol::PROTOCOL_VERSION;

use crate::build::{self, BuildError, BuildOptions, BuildReport, PendingRelease};
use crate::display::{escape, Display};
use crate::tools::{self, Answers};
use crate::{lock, paths, source, spec};

/// This release, as `contractor --version` names it: a build host must run the same.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The user's configuration file: `$CONTRACTOR_CONFIG`, else
/// `$XDG_CONFIG_HOME/contractor/config.toml`, else `~/.config/contractor/config.toml`
/// (read by `contractor-host resolve`; looked at here only to skip asking when it is not
/// there).
pub fn config_file() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("CONTRACTOR_CONFIG")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("contractor/config.toml")))
        .or_else(|| var("HOME").map(|d| d.join(".config/contractor/config.toml")))
}

/// The build hosts: those `given` (`--host`), else the configuration's, as `contractor-host
/// resolve` checks them (none without either: the configuration file is not there). The
/// error names the value or the file and says what is accepted.
pub fn resolve(given: &[String]) -> Result<Vec<String>, String> {
    if given.is_empty() && !config_file().is_some_and(|p| p.exists()) {
        return Ok(Vec::new());
    }
    let request = ResolveRequest {
        version: PROTOCOL_VERSION,
        hosts: given.to_vec(),
    };
    let mut command = tools::command(tools::HOST).map_err(|e| error_chain(&e).join(": "))?;
    command.arg(contractor_protocol::fleet::RESOLVE_COMMAND);
    match tools::ask_of::<_, Resolved>(tools::HOST, command, &request) {
        Ok((resolved, _)) => Ok(resolved.hosts),
        Err(err) => Err(match (err.is_bad_input(), err.messages()) {
            (true, Some(messages)) => error_chain(&messages).join(": "),
            _ => error_chain(&err).join(": "),
        }),
    }
}

/// `contractor hosts`: each host's room for a build of `cpus` CPUs and `memory_mib` MiB,
/// as `contractor-host hosts` found it.
pub fn fleet(hosts: &[String], cpus: u32, memory_mib: u64) -> Result<Fleet, tools::ToolError> {
    let request = FleetRequest {
        version: PROTOCOL_VERSION,
        hosts: hosts.to_vec(),
        cpus,
        memory_mib,
    };
    let mut command = tools::command(tools::HOST)?;
    command.arg(contractor_protocol::fleet::HOSTS_COMMAND);
    tools::ask_of::<_, Fleet>(tools::HOST, command, &request).map(|(fleet, _)| fleet)
}

/// A `contractor-host send` that has chosen the build host and waits for the build.
pub struct Sender {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: Answers,
    /// The chosen host.
    pub host: String,
}

/// Starts `contractor-host send` for a build of `cpus` CPUs and `memory_mib` MiB on one of
/// `hosts`, and shows its waiting in line (always) and its choice (with `tell`, when there
/// was one to make or a wait). The error is the chain that says why no host can take the
/// build.
pub fn choose(
    hosts: &[String],
    cpus: u32,
    memory_mib: u64,
    tell: bool,
) -> Result<Sender, Vec<String>> {
    let failed = |err: tools::ToolError| error_chain(&err);
    let mut command = tools::command(tools::HOST).map_err(failed)?;
    command.arg(contractor_protocol::fleet::SEND_COMMAND);
    // Its own process group: Ctrl-C reaches this process, which forwards it once the
    // session runs (before, this process's death ends it).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = tools::spawn(tools::HOST, command).map_err(failed)?;
    let mut stdin = child.stdin.take();
    let request = FleetRequest {
        version: PROTOCOL_VERSION,
        hosts: hosts.to_vec(),
        cpus,
        memory_mib,
    };
    if let Some(stdin) = stdin.as_mut() {
        let _ = contractor_protocol::jsonl::write_line(stdin, &request);
    }
    let mut answers = Answers::of(tools::HOST, &mut child).map_err(failed)?;
    let mut waited = false;
    loop {
        let line = match answers.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => return Err(vec![ended_without_answer(&mut child)]),
            Err(err) => return Err(failed(err)),
        };
        match serde_json::from_slice::<SendLine>(&line) {
            Ok(SendLine::Waiting { position }) => {
                eprintln!(
                    "contractor: waiting in line for a build host: position {position} (Ctrl-C to give up)"
                );
                waited = true;
            }
            Ok(SendLine::HostsFull { position, hosts }) => {
                eprintln!(
                    "contractor: all {} build host(s) are full; waiting in line: position {position} (Ctrl-C to give up)",
                    hosts.len()
                );
                show_probes(&hosts);
                waited = true;
            }
            Ok(SendLine::Chosen {
                host,
                hosts: probes,
            }) => {
                if tell && (hosts.len() > 1 || waited) {
                    eprintln!("contractor: build host {} chosen", escape(&host));
                    show_probes(&probes);
                }
                return Ok(Sender {
                    child,
                    stdin,
                    answers,
                    host,
                });
            }
            Ok(SendLine::SessionFailed { error }) => return Err(error.chain),
            _ => return Err(vec![bad_line(&line)]),
        }
    }
}

/// Each host's answer, indented under the line that names them.
fn show_probes(probes: &[HostProbe]) {
    for probe in probes {
        eprintln!("  {}", escape(&probe.to_string()));
    }
}

fn bad_line(line: &[u8]) -> String {
    format!(
        "contractor-host send wrote something other than its documented JSON: {}",
        escape(&String::from_utf8_lossy(&line[..line.len().min(200)]))
    )
}

/// Why `send` ended without its answer line: its exit.
fn ended_without_answer(child: &mut Child) -> String {
    let how = match child
        .wait()
        .ok()
        .map(|s| (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)))
    {
        Some((Some(code), _)) => format!("exit code {code}"),
        Some((None, Some(signal))) => format!("killed by signal {signal}"),
        _ => "no exit status".into(),
    };
    format!("contractor-host send ended without an answer ({how}); its own message is above")
}

/// The sha256 of the file at `path`, in lowercase hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path)?;
    let mut hash = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hash)?;
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Why a remote build failed, as the record's error.
fn host_error(chain: Vec<String>) -> ErrorInfo {
    ErrorInfo {
        code: BuildCode::BuildHost.as_str().into(),
        chain,
    }
}

/// Runs one build of `spec` (read from `file`) on the host `sender` chose. The same
/// outcomes as [`build::build`]: a failure before the record exists is an error,
/// everything after it a result in the local record. Call it from the main thread
/// (`contractor-host send` dies with it).
pub fn build_on(
    mut sender: Sender,
    spec: &spec::BuildSpec,
    file: &Path,
    options: &BuildOptions,
    display: &Display,
) -> Result<BuildReport, BuildError> {
    let host = sender.host.clone();
    let started = Instant::now();
    let started_on = std::time::SystemTime::now();
    let store_root = paths::checked_store_dir(&spec.project_dir).map_err(BuildError::StoreDir)?;
    build::close_abandoned_records(&store_root);
    let id = build::new_build_id();
    let record = store_root.join("builds").join(&id);
    paths::create_dir_world_readable(&record).map_err(|source| BuildError::Record {
        path: record.clone(),
        source,
    })?;
    let close = |err: BuildError| build::close_failed_record(&record, &id, started, err);
    let spec_text = std::fs::read_to_string(file)
        .map_err(|source| BuildError::Record {
            path: file.to_path_buf(),
            source,
        })
        .map_err(close)?;
    let lock_path = spec.project_dir.join(lock::LOCK_FILE);
    let lock_text = match spec.lock {
        Some(_) => Some(
            source::read_regular(&lock_path, lock::MAX_LOCK_BYTES)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|source| BuildError::Record {
                    path: lock_path.clone(),
                    source,
                })
                .map_err(close)?,
        ),
        None => None,
    };
    let tar = record.join("source.tar");
    let packed = source::pack(&spec.project_dir, &tar)
        .map_err(BuildError::Source)
        .map_err(close)?;
    display.event(&BuildEvent::Started {
        version: PROTOCOL_VERSION,
        id: id.clone(),
        record: record.clone(),
    });
    for warning in &packed.warnings {
        display.warning(warning);
    }
    build::update_latest(&store_root, &id);
    let owner_file = build::write_owner(&record).map_err(close)?;
    let request = HostedRequest {
        version: PROTOCOL_VERSION,
        contractor: RELEASE.into(),
        id: id.clone(),
        project: crate::paths::project_key(&spec.project_dir),
        spec: spec_text,
        lock: lock_text,
        source_entries: packed.entries as u64,
        source_bytes: packed.bytes,
        source_sha256: sha256_of(&tar).ok(),
        accel: options.accel,
        snapshot: options.snapshot,
        offline: options.offline,
        uri: None,
    };
    let limit = spec
        .max_artifacts_bytes
        .saturating_add(spec.max_log_bytes)
        .saturating_add(RECORD_OVERHEAD_BYTES);
    let session = SessionRequest {
        record: record.clone(),
        source: tar,
        max_record_bytes: limit,
        request,
    };
    let ran = sender.follow(&session, display);
    // The build host releases its VM after the record is sent, and `send` ends with the
    // session: waited for after the summary, as a local build's release is.
    let release = PendingRelease::later(move || sender.end());
    let mut result = result_of(ran, &host, &record);
    result.id = id;
    result.duration_secs = started.elapsed().as_secs_f64();
    build::write_result(&record, &result);
    sign_here(&host, spec, options, &record, &result, started_on, display);
    let _ = std::fs::remove_file(&owner_file);
    display.event(&BuildEvent::Finished {
        result: result.clone(),
    });
    Ok(BuildReport {
        result,
        kept: None,
        release,
    })
}

/// The result of a build on `host` whose session ended so, its record in `record` (its
/// `id` and `duration_secs` are the caller's to set).
fn result_of(ran: Result<BuildResult, RemoteEnd>, host: &str, record: &Path) -> BuildResult {
    let mut result = BuildResult {
        version: PROTOCOL_VERSION,
        id: String::new(),
        outcome: Outcome::Infrastructure,
        exit_code: None,
        duration_secs: 0.0,
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: crate::records::stored_artifacts(record),
        refused_hosts: Vec::new(),
        refused_offline: Vec::new(),
        upstream_failures: Vec::new(),
        limit: None,
        error: None,
        host: Some(host.to_string()),
    };
    match ran {
        Ok(there) => {
            result.outcome = there.outcome;
            result.exit_code = there.exit_code;
            result.limit = there.limit;
            result.error = there.error;
            result.refused_hosts = there.refused_hosts;
            result.refused_offline = there.refused_offline;
        }
        Err(RemoteEnd::Interrupted(signal)) => {
            result.outcome = Outcome::Interrupted;
            result.error = Some(ErrorInfo {
                code: BuildCode::Interrupted.as_str().into(),
                chain: vec![format!(
                    "{signal} ended the session with the build host {host} before its record came back"
                )],
            });
        }
        Err(RemoteEnd::Failed(error)) => result.error = Some(error),
    }
    result
}

/// Signs the provenance of a build whose script ran on `host`, here, after its record came
/// back: the build host never holds the key.
fn sign_here(
    host: &str,
    spec: &spec::BuildSpec,
    options: &BuildOptions,
    record: &Path,
    result: &BuildResult,
    started_on: std::time::SystemTime,
    display: &Display,
) {
    if !crate::provenance::ran_script(result.outcome, result.exit_code) {
        return;
    }
    let facts = crate::provenance::Facts {
        id: &result.id,
        spec,
        accel: options.accel,
        boot: match options.snapshot {
            true => "on the build host: restored from a snapshot if it keeps one, else cold".into(),
            false => "cold".into(),
        },
        offline: options.offline,
        image: None,
        host: Some(host),
        started_on,
        finished_on: std::time::SystemTime::now(),
        outcome: result.outcome,
        exit_code: result.exit_code,
        rebuild_of: None,
        cache_restored: None,
    };
    if let Err(err) = crate::provenance::write_signed(record, &facts) {
        display.warning(&format!(
            "cannot write the signed provenance: {}",
            contractor_protocol::result::joined_chain(&err)
        ));
    }
}

/// How a session ended without a complete record.
enum RemoteEnd {
    /// Ctrl-C or SIGTERM here.
    Interrupted(String),
    /// The build host failed, refused, or went away.
    Failed(ErrorInfo),
}

impl Sender {
    /// Sends the build (`request`, its record and source) and follows the session to
    /// `send`'s answer, showing the build's events; Ctrl-C and SIGTERM are forwarded.
    fn follow(
        &mut self,
        session: &SessionRequest,
        display: &Display,
    ) -> Result<BuildResult, RemoteEnd> {
        if let Some(stdin) = self.stdin.as_mut() {
            let written = contractor_protocol::jsonl::write_line(stdin, session)
                .map_err(|e| e.to_string())
                .and_then(|()| stdin.flush().map_err(|e| e.to_string()));
            if let Err(err) = written {
                let why = format!("cannot send the build to contractor-host send: {err}");
                return Err(RemoteEnd::Failed(host_error(vec![why])));
            }
        }
        let forwarded = Arc::new(Mutex::new(None::<String>));
        let signals = forward_signals(self.child.id(), forwarded.clone());
        let ended = self.answered(display);
        if let Some(handle) = signals {
            handle.close();
        }
        let signal = forwarded.lock().ok().and_then(|s| s.clone());
        match (ended, signal) {
            (Err(RemoteEnd::Failed(_)), Some(signal))
                if self.child.try_wait().is_ok_and(|s| s.is_some()) =>
            {
                Err(RemoteEnd::Interrupted(signal))
            }
            (ended, _) => ended,
        }
    }

    /// Reads `send`'s lines to its answer: events shown, the answer returned.
    fn answered(&mut self, display: &Display) -> Result<BuildResult, RemoteEnd> {
        let failed = |why: String| RemoteEnd::Failed(host_error(vec![why]));
        loop {
            let line = match self.answers.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return Err(failed(ended_without_answer(&mut self.child))),
                Err(err) => return Err(failed(error_chain(&err).join(": "))),
            };
            if let Ok(answer) = serde_json::from_slice::<SendLine>(&line) {
                return match answer {
                    SendLine::SessionResult { result } => Ok(*result),
                    SendLine::SessionInterrupted { signal } => Err(RemoteEnd::Interrupted(signal)),
                    SendLine::SessionFailed { error } => Err(RemoteEnd::Failed(error)),
                    _ => Err(failed(bad_line(&line))),
                };
            }
            match serde_json::from_slice::<BuildEvent>(&line) {
                Ok(event) => display.event(&event),
                Err(_) => return Err(failed(bad_line(&line))),
            }
        }
    }

    /// Waits for `send` to end the session (closes its stdin first).
    fn end(mut self) {
        drop(self.stdin.take());
        self.answers.drain();
        let _ = self.child.wait();
    }
}

/// Forwards Ctrl-C and SIGTERM to `send` (pid `pid`), noting the first one's name.
fn forward_signals(
    pid: u32,
    forwarded: Arc<Mutex<Option<String>>>,
) -> Option<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("contractor: warning: cannot watch for Ctrl-C ({err})");
            return None;
        }
    };
    let handle = signals.handle();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    std::thread::spawn(move || {
        for number in signals.forever() {
            let (signal, name) = match number {
                SIGINT => (nix::sys::signal::Signal::SIGINT, "Ctrl-C"),
                _ => (nix::sys::signal::Signal::SIGTERM, "SIGTERM"),
            };
            if let Ok(mut first) = forwarded.lock() {
                first.get_or_insert_with(|| name.to_string());
            }
            let _ = nix::sys::signal::kill(pid, signal);
        }
    });
    Some(handle)
}
