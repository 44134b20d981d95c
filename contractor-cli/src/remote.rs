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

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::time::Instant;

use contractor_protocol::build::BuildEvent;
use contractor_protocol::fleet::{
    Fleet, FleetRequest, HostProbe, ResolveRequest, Resolved, SendLine, SessionRequest,
    HOSTS_COMMAND, RESOLVE_COMMAND,
};
use contractor_protocol::hosted::RECORD_OVERHEAD_BYTES;
use contractor_protocol::result::{error_chain, BuildCode, ErrorInfo};
use contractor_protocol::tool::SignalWatch;
use contractor_protocol::vm::Accel;
use contractor_protocol::PROTOCOL_VERSION;

use crate::build::{self, BuildError, BuildOptions, BuildReport, PendingRelease};
use crate::display::{escape, Display};
use crate::tools::{self, Answers, Reply};
use crate::{lock, paths, source, spec};

/// The build hosts: those `given` (`--host`), else the configuration's, as `contractor-host
/// resolve` checks them, with the configuration file it looked at. The error names the
/// value or the file and says what is accepted.
pub fn resolve(given: &[String]) -> Result<(Vec<String>, Option<PathBuf>), String> {
    let request = ResolveRequest {
        version: PROTOCOL_VERSION,
        hosts: given.to_vec(),
    };
    let asked = tools::ask::<_, Resolved>(tools::HOST, &[RESOLVE_COMMAND], &request);
    asked
        .map(|(r, _)| (r.hosts, r.config))
        .map_err(|err| match err.messages() {
            Some(messages) if err.is_bad_input() => error_chain(&messages).join(": "),
            _ => error_chain(&err).join(": "),
        })
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
    tools::ask(tools::HOST, &[HOSTS_COMMAND], &request).map(|(fleet, _)| fleet)
}

/// A `contractor-host send` that has chosen the build host and waits for the build.
pub struct Sender {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: Answers,
    /// The chosen host.
    pub host: String,
}

/// A line of `send`: its own, or a build event it passes on.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Said {
    Send(SendLine),
    Event(Box<BuildEvent>),
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
    let request = FleetRequest {
        version: PROTOCOL_VERSION,
        hosts: hosts.to_vec(),
        cpus,
        memory_mib,
    };
    let mut sender = Sender::start(&request).map_err(|e| error_chain(&e))?;
    let mut waited = false;
    loop {
        match sender.next().map_err(|why| vec![why])? {
            Said::Send(SendLine::Waiting { position }) => eprintln!(
                "contractor: waiting in line for a build host: position {position} (Ctrl-C to give up)"
            ),
            Said::Send(SendLine::HostsFull { position, hosts }) => {
                eprintln!(
                    "contractor: all {} build host(s) are full; waiting in line: position {position} (Ctrl-C to give up)",
                    hosts.len()
                );
                show_probes(&hosts);
            }
            Said::Send(SendLine::Chosen { host, hosts: probes }) => {
                if tell && (hosts.len() > 1 || waited) {
                    eprintln!("contractor: build host {} chosen", escape(&host));
                    show_probes(&probes);
                }
                sender.host = host;
                return Ok(sender);
            }
            Said::Send(SendLine::SessionFailed { error }) => return Err(error.chain),
            _ => return Err(vec!["contractor-host send answered out of turn".into()]),
        }
        waited = true;
    }
}

/// Each host's answer, indented under the line that names them.
fn show_probes(probes: &[HostProbe]) {
    for probe in probes {
        eprintln!("  {}", escape(&probe.to_string()));
    }
}

impl Sender {
    /// Starts `contractor-host send` (in its own process group: Ctrl-C reaches this
    /// process, which forwards it once the session runs) and writes `request`.
    fn start(request: &FleetRequest) -> Result<Sender, tools::ToolError> {
        let mut command = tools::command(tools::HOST)?;
        command.arg(contractor_protocol::fleet::SEND_COMMAND);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = tools::spawn(tools::HOST, command)?;
        let mut stdin = child.stdin.take();
        if let Some(stdin) = stdin.as_mut() {
            // A `send` that ended at once says why in its answer, or by its exit.
            let _ = contractor_protocol::jsonl::write_line(stdin, request);
        }
        let answers = Answers::of(tools::HOST, &mut child)?;
        Ok(Sender {
            child,
            stdin,
            answers,
            host: String::new(),
        })
    }

    /// The next line of `send`; the error says why there is none (its error object's
    /// chain, a line that is not its documented JSON with its number and start).
    fn next(&mut self) -> Result<Said, String> {
        match self.answers.next_reply::<Said>() {
            Ok(Some(Reply::Answer(said))) => Ok(said),
            Ok(Some(Reply::Error(error))) => Err(error.chain.join(": ")),
            Ok(None) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!(
                    "contractor-host send ended without an answer ({status}); its own message is above"
                ))
            }
            Err(err) => Err(error_chain(&err).join(": ")),
        }
    }

    /// Sends the build and follows the session to `send`'s answer, showing the build's
    /// events; Ctrl-C and SIGTERM are forwarded to `send`. Also gives the build host's VM
    /// as it started (its accelerator and snapshot report), which the provenance records.
    fn follow(&mut self, session: &SessionRequest, display: &Display) -> (SendLine, VmFacts) {
        let failed = |why: String| SendLine::SessionFailed {
            error: ErrorInfo {
                code: BuildCode::BuildHost.as_str().into(),
                chain: vec![why],
            },
        };
        if let Some(stdin) = self.stdin.as_mut() {
            // A `send` that cannot take it has ended: its answer, or its exit, says why.
            let _ = contractor_protocol::jsonl::write_line(stdin, session);
        }
        let signals = forward_signals(self.child.id());
        let mut vm = None;
        let answer = loop {
            match self.next() {
                Ok(Said::Event(event)) => {
                    if let BuildEvent::VmStarted {
                        accel, snapshot, ..
                    } = &*event
                    {
                        vm = Some((*accel, snapshot.clone()));
                    }
                    display.event(&event)
                }
                Ok(Said::Send(answer)) => break answer,
                Err(why) => break failed(why),
            }
        };
        let forwarded = signals.signal();
        drop(signals);
        // A `send` that a forwarded signal ended before its answer was interrupted.
        let answer = match (forwarded, &answer) {
            (Some(signal), SendLine::SessionFailed { .. })
                if self.child.try_wait().is_ok_and(|s| s.is_some()) =>
            {
                SendLine::SessionInterrupted {
                    signal: signal.into(),
                }
            }
            _ => answer,
        };
        (answer, vm)
    }

    /// Waits for `send` to end the session (closes its stdin first).
    fn end(mut self) {
        drop(self.stdin.take());
        self.answers.drain();
        let _ = self.child.wait();
    }
}

/// The build host's VM as its `vm_started` event described it: its accelerator and snapshot
/// report; none when no VM started.
type VmFacts = Option<(Accel, Option<contractor_protocol::vm::SnapshotReport>)>;

/// Forwards Ctrl-C and SIGTERM to `send` (pid `pid`); the watch notes the first one's name.
fn forward_signals(pid: u32) -> SignalWatch {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    SignalWatch::start(move |caught| {
        let _ = nix::sys::signal::kill(pid, caught.signal);
    })
    .unwrap_or_else(|err| {
        eprintln!("contractor: warning: cannot watch for Ctrl-C ({err})");
        SignalWatch::default()
    })
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
    // Opened by the store as a local build's record is: abandoned ones closed first, its
    // `owner.json` naming this process, `latest` pointing at it.
    let id = crate::records::open_new(&store_root, None).map_err(BuildError::Open)?;
    let record = store_root.join("builds").join(&id);
    let close = |err: BuildError| build::close_failed_record(&record, &id, started, err);
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
    let session = SessionRequest {
        id: id.clone(),
        record: record.clone(),
        source: tar,
        source_entries: packed.entries as u64,
        spec_file: std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf()),
        lock_file: spec
            .lock
            .as_ref()
            .map(|_| spec.project_dir.join(lock::LOCK_FILE)),
        project: crate::paths::project_key(&spec.project_dir),
        accel: options.accel,
        snapshot: options.snapshot,
        offline: options.offline,
        max_record_bytes: spec
            .max_artifacts_bytes
            .saturating_add(spec.max_log_bytes)
            .saturating_add(RECORD_OVERHEAD_BYTES),
    };
    let (answer, vm_started) = sender.follow(&session, display);
    // The build host releases its VM after the record is sent, and `send` ends with the
    // session: waited for after the summary, as a local build's release is.
    let release = PendingRelease::later(move || sender.end());
    let artifacts = crate::records::stored_artifacts(&record);
    let mut result = answer.into_result(&host, &record, artifacts);
    result.id = id;
    result.duration_secs = started.elapsed().as_secs_f64();
    // Written here, not by `contractor-store record close`: the result is the build host's
    // (its refusals, and its host, which `record close` does not write), not one the store
    // re-derives from the record.
    build::write_result(&record, &result);
    // Signed here, after the record came back: the build host never holds the key.
    // The accelerator and snapshot the build host's VM started with, as its `vm_started`
    // event said (the request's `auto` only when no VM started).
    let facts = |request| contractor_protocol::attest::SignRequest {
        accelerator: vm_started.as_ref().map_or(options.accel, |v| v.0),
        snapshot_report: vm_started.as_ref().and_then(|v| v.1.clone()),
        snapshot: options.snapshot,
        offline: options.offline,
        build_host: Some(host.clone()),
        ..request
    };
    crate::provenance::sign(&record, spec, &result, started_on, facts, display);
    let _ = std::fs::remove_file(record.join(build::OWNER_FILE));
    display.event(&BuildEvent::Finished {
        result: result.clone(),
    });
    Ok(BuildReport {
        result,
        kept: None,
        release,
    })
}
