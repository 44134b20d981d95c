//! `contractor-host send`: one whole session of `contractor build --host`, on the front
//! end's machine, for the front end.
//!
//! It reads a [`FleetRequest`] line, chooses the build host (the roomiest of those given,
//! once first in this machine's line; see [`crate::fleet`]) and writes `chosen`, then reads
//! a [`SessionRequest`] line: the local record directory and the packed source the front
//! end made. It runs `ssh HOST contractor-host build`, sends the [`HostedRequest`] and the
//! source, and hands ssh's stdout, unread, to `contractor-store record follow`, which is
//! confined to the local record: it checks every line, receives the record and writes the
//! checked events on. This process reads only what the store writes: it passes the build's
//! events on to the front end and ends with one answer line (`session_result`,
//! `session_interrupted` or `session_failed`). It never reads the build host's stream.
//!
//! Ctrl-C or SIGTERM (the front end forwards both) closes the session's stdin, which
//! interrupts the build there (its record still comes back); the session is cut
//! [`INTERRUPT_GRACE`] later, or at once on a second signal or when the front end is gone.
//! Every process it starts dies with it, and it with the front end (`PR_SET_PDEATHSIG`),
//! and the build host ends the build when its session ends, so no VM outlives the front
//! end.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use contractor_protocol::build::BuildEvent;
use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::fleet::{FleetRequest, SendLine, SessionRequest};
use contractor_protocol::hosted::{
    is_build_id, FollowedLine, HostedRequest, HOSTED_COMMAND, MAX_REQUEST_BYTES,
};
use contractor_protocol::jsonl::{self, JsonlReader};
use contractor_protocol::result::error_chain;
use contractor_protocol::result::{BuildCode, BuildResult, ErrorInfo};
use contractor_protocol::tool::{self, stop_child, Answers, Locator, SignalWatch, ToolError};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

use crate::buildhost::{self, BuildHost};
use crate::fleet::Ticket;
use crate::RELEASE;

/// The executable the build host runs for a hosted build (found on its `PATH`;
/// `contractor` and the tools it composes are taken from beside it).
pub const REMOTE_TOOL: &str = contractor_protocol::tool::names::HOST;

/// After Ctrl-C, how long the build host has to end the build and send its record back
/// before the session is cut.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(20);

/// The store tool, which receives the record.
use contractor_protocol::tool::names::STORE;

/// Where this tool finds the others it starts (`contractor-store`): beside itself, or in
/// `$CONTRACTOR_BIN`.
const TOOLS: Locator = Locator {
    unit_test: cfg!(test),
    hint_env: "install the tools of one release together, or set CONTRACTOR_BIN to their directory",
    hint_beside:
        "install the tools of one release together, or set CONTRACTOR_BIN to their directory",
};

/// A request this tool refuses: its code, its messages and its exit code.
pub struct Refused {
    /// The error code.
    pub code: ToolCode,
    /// The messages, outermost first.
    pub chain: Vec<String>,
}

impl Refused {
    fn new(code: ToolCode, chain: Vec<String>) -> Refused {
        Refused { code, chain }
    }

    /// Reports it (stderr, and the error object on stdout); exit 2.
    pub fn report(self) -> ExitCode {
        ErrorObject::report("contractor-host", self.code, self.chain, true);
        ExitCode::BadInput
    }
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`] as a `T`; `None` at the end of
/// `input`. The error names the line's problem (serde names the field).
pub fn read_request<T: serde::de::DeserializeOwned, R: BufRead>(
    input: &mut JsonlReader<R>,
    what: &str,
) -> Result<Option<T>, Refused> {
    input.next_message().map_err(|err| {
        let mut chain = vec![format!("cannot read the {what} request")];
        chain.extend(contractor_protocol::result::error_chain(&err));
        Refused::new(ToolCode::BadJson, chain)
    })
}

/// Checks a [`FleetRequest`]: its version, its hosts (named by their index when one is
/// not valid) and its shape.
pub fn checked_fleet(request: &FleetRequest) -> Result<Vec<BuildHost>, Refused> {
    if request.version != PROTOCOL_VERSION {
        return Err(Refused::new(
            ToolCode::Unsupported,
            vec![format!(
                "version: {} is not supported; this is protocol {PROTOCOL_VERSION}",
                request.version
            )],
        ));
    }
    if request.cpus == 0 || request.memory_mib == 0 {
        return Err(Refused::new(
            ToolCode::BadJson,
            vec!["cpus and memory_mib: each must be at least 1".into()],
        ));
    }
    buildhost::parse_listed(&request.hosts)
        .map_err(|why| Refused::new(ToolCode::BadHost, vec![why]))
}

/// The hosted build request for `session`: its record a directory (not a link) named by
/// its build id, its source a regular file (hashed here), its spec and lock read. The
/// error names the field.
fn hosted_request(session: &SessionRequest) -> Result<HostedRequest, Refused> {
    let bad = |why: String| Refused::new(ToolCode::BadSession, vec![why]);
    let id = &session.id;
    let named = session.record.file_name().and_then(|n| n.to_str()) == Some(id.as_str());
    if !is_build_id(id) || !named || !session.record.is_absolute() {
        return Err(bad(format!(
            "id, record: {id:?} is not a build id naming the absolute directory {}",
            session.record.display()
        )));
    }
    if !std::fs::symlink_metadata(&session.record).is_ok_and(|m| m.is_dir()) {
        let why = format!("record: {} is not a directory", session.record.display());
        return Err(bad(why));
    }
    let text = |field: &str, path: &Path, max: u64| {
        contractor_protocol::file::read_regular(path, max)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .map_err(|e| bad(format!("{field}: cannot read {}: {e}", path.display())))
    };
    let spec = text(
        "spec_file",
        &session.spec_file,
        contractor_spec::allow::MAX_SPEC_BYTES,
    )?;
    let lock = match &session.lock_file {
        Some(path) => Some(text(
            "lock_file",
            path,
            contractor_spec::lock::MAX_LOCK_BYTES,
        )?),
        None => None,
    };
    let (source_bytes, sha256) = hash_file(&session.source).map_err(|e| {
        bad(format!(
            "source: cannot read {}: {e}",
            session.source.display()
        ))
    })?;
    Ok(HostedRequest {
        version: PROTOCOL_VERSION,
        contractor: RELEASE.into(),
        id: id.clone(),
        project: session.project.clone(),
        spec,
        lock,
        source_entries: session.source_entries,
        source_bytes,
        source_sha256: Some(sha256),
        accel: session.accel,
        snapshot: session.snapshot,
        offline: session.offline,
        uri: None,
    })
}

/// The size and the sha256 (lowercase hex) of the regular file at `path`.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    let mut file = contractor_protocol::file::open_regular(path)?;
    let mut hash = sha2::Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hash)?;
    Ok((
        bytes,
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    ))
}

/// Writes `line` on `out` and flushes it; a front end that is gone is not an error here
/// (its death ends this process).
fn tell(out: &mut impl Write, line: &impl serde::Serialize) {
    let _ = jsonl::write_line(out, line);
    let _ = out.flush();
}

/// `contractor-host send` on this process's stdin and stdout; its exit code.
pub fn send() -> ExitCode {
    let mut input = JsonlReader::with_limit(BufReader::new(std::io::stdin()), MAX_REQUEST_BYTES);
    let mut out = std::io::stdout();
    let fleet: FleetRequest = match read_request(&mut input, "send") {
        Ok(Some(request)) => request,
        Ok(None) => {
            return Refused::new(ToolCode::NoRequest, vec!["no send request on stdin".into()])
                .report()
        }
        Err(refused) => return refused.report(),
    };
    let hosts = match checked_fleet(&fleet) {
        Ok(hosts) => hosts,
        Err(refused) => return refused.report(),
    };
    let taken = crate::fleet::take(&hosts, fleet.cpus, fleet.memory_mib, &mut |line| {
        tell(&mut std::io::stdout(), &line)
    });
    let (host, ticket) = match taken {
        Ok((i, probes, ticket)) => {
            tell(
                &mut out,
                &SendLine::Chosen {
                    host: hosts[i].to_string(),
                    hosts: probes,
                },
            );
            (hosts[i].clone(), ticket)
        }
        Err(chain) => {
            tell(
                &mut out,
                &SendLine::SessionFailed {
                    error: host_error(chain),
                },
            );
            return ExitCode::Success;
        }
    };
    // The front end may give up before sending the build (its source could not be packed).
    let session: SessionRequest = match read_request(&mut input, "session") {
        Ok(Some(session)) => session,
        Ok(None) => return ExitCode::Success,
        Err(refused) => return refused.report(),
    };
    let request = match hosted_request(&session) {
        Ok(request) => request,
        Err(refused) => return refused.report(),
    };
    let (answer, ended) = run_session(&host, &session, &request, ticket, &mut out);
    tell(&mut out, &answer);
    if let Some(session) = ended {
        session.end();
    }
    ExitCode::Success
}

/// Runs the session with `host`: its answer line, and the session to end once that is
/// written.
fn run_session(
    host: &BuildHost,
    session: &SessionRequest,
    request: &HostedRequest,
    ticket: Option<Ticket>,
    out: &mut impl Write,
) -> (SendLine, Option<Session>) {
    let ran = Session::start(host, request, &session.source);
    let (ran, ended) = match ran {
        Ok(mut running) => {
            let ran = running.follow(host, &session.record, session.max_record_bytes, ticket, out);
            (ran, Some(running))
        }
        Err(err) => (
            Err(RemoteEnd::Failed(host_error(vec![format!(
                "cannot run ssh for {host}: {err}"
            )]))),
            None,
        ),
    };
    let answer = match ran {
        Ok(result) => SendLine::SessionResult {
            result: Box::new(result),
        },
        Err(RemoteEnd::Interrupted(signal)) => SendLine::SessionInterrupted {
            signal: signal.into(),
        },
        Err(RemoteEnd::Failed(error)) => SendLine::SessionFailed { error },
    };
    (answer, ended)
}

/// Why a remote build failed, as the record's error.
fn host_error(chain: Vec<String>) -> ErrorInfo {
    ErrorInfo {
        code: BuildCode::BuildHost.as_str().into(),
        chain,
    }
}

/// Starts `contractor-store record follow` reading `stream` (the build host's whole
/// stream, which this process never reads): confined to `record`, it checks the stream's
/// hello, events and error, writes them on re-encoded, then receives the record (at most
/// `limit` bytes) and indexes its artifacts. In a process group of its own, so that a
/// terminal's Ctrl-C does not cut the record.
fn follow_record(
    stream: ChildStdout,
    record: &Path,
    limit: u64,
) -> Result<(Child, Answers), String> {
    let root = record
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in a store's builds/", record.display()))?;
    let id = record.file_name().unwrap_or_default();
    let mut command = TOOLS
        .command(STORE)
        .map_err(|e| error_chain(&e).join(": "))?;
    command
        .args(["record", "follow", "--root"])
        .arg(root)
        .arg("--build")
        .arg(id)
        .arg("--max-bytes")
        .arg(limit.to_string())
        .arg("--json-errors");
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let failed = |e: ToolError| error_chain(&e).join(": ");
    let mut child = tool::spawn_reading(STORE, command, Stdio::from(stream)).map_err(failed)?;
    let answers = Answers::of(STORE, &mut child).map_err(failed)?;
    Ok((child, answers))
}

/// How a session ended without a complete record.
enum RemoteEnd {
    /// Ctrl-C or SIGTERM here.
    Interrupted(&'static str),
    /// The build host failed, refused, or went away.
    Failed(ErrorInfo),
}

impl From<ErrorInfo> for RemoteEnd {
    fn from(error: ErrorInfo) -> RemoteEnd {
        RemoteEnd::Failed(error)
    }
}

/// What the session's writer is told.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Whether the build host needs the source's bytes.
    Source(bool),
    /// Close the session's stdin.
    Close,
}

/// One `ssh … contractor-host build` session.
struct Session {
    child: Child,
    /// The build host's stream, for `record follow` to read.
    stdout: Option<ChildStdout>,
    /// Tells the writer the build host's answer whether it needs the source's bytes, or
    /// to close the session's stdin (as does dropping every sender).
    close: Option<mpsc::Sender<Step>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Ctrl-C and SIGTERM ([`watch_signals`]); the first one's name is the interruption.
    signals: SignalWatch,
}

impl Session {
    /// Starts `ssh` and, on a thread, sends it `request` and the source `tar`, then holds
    /// its stdin open until [`Session::end`] or an interruption.
    fn start(host: &BuildHost, request: &HostedRequest, tar: &Path) -> std::io::Result<Session> {
        let mut ssh = host.ssh(&[REMOTE_TOOL, HOSTED_COMMAND]);
        ssh.stdin(Stdio::piped()).stdout(Stdio::piped());
        // Its own process group: Ctrl-C reaches this process, which ends the session in
        // order, not ssh, which would cut it.
        std::os::unix::process::CommandExt::process_group(&mut ssh, 0);
        let mut child = tool::start(&mut ssh)?;
        let stdout = child.stdout.take();
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
        let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut source = std::fs::File::open(tar)?;
        let (close, steps) = mpsc::channel::<Step>();
        let ask = request.source_sha256.is_some();
        let writer = std::thread::spawn(move || {
            stdin.write_all(&line)?;
            stdin.flush()?;
            // With a digest the build host says whether it has that source already; an
            // interruption before it does closes the session at once.
            let send = match ask {
                true => steps.recv().ok(),
                false => Some(Step::Source(true)),
            };
            if send == Some(Step::Source(true)) {
                std::io::copy(&mut source, &mut stdin)?;
                stdin.flush()?;
            }
            // Held open until told (or until the session is dropped).
            if matches!(send, Some(Step::Source(_))) {
                while let Ok(Step::Source(_)) = steps.recv() {}
            }
            drop(stdin);
            Ok(())
        });
        let signals = watch_signals(
            Some(close.clone()),
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::unistd::getppid(),
        );
        Ok(Session {
            child,
            stdout,
            close: Some(close),
            writer: Some(writer),
            signals,
        })
    }

    /// The signal that interrupted the session, if any.
    fn interruption(&self) -> Option<&'static str> {
        self.signals.signal()
    }

    /// Follows the session to its end: the store's confined `record follow` reads the build
    /// host's stream (this process never does), checks it and receives the record into
    /// `record` (at most `limit` bytes); this process shows the checked events it writes on
    /// and returns the build host's result.
    fn follow(
        &mut self,
        host: &BuildHost,
        record: &Path,
        limit: u64,
        ticket: Option<Ticket>,
        out: &mut impl Write,
    ) -> Result<BuildResult, RemoteEnd> {
        // Held until the VM runs there (and counts in the host's room), then the next in
        // line may go.
        let mut ticket = ticket;
        let Some(stream) = self.stdout.take() else {
            return Err(host_error(vec!["ssh has no stdout".into()]).into());
        };
        let (mut store, mut answers) = follow_record(stream, record, limit).map_err(|why| {
            let chain = vec![format!("cannot follow the build on {host}"), why];
            RemoteEnd::Failed(host_error(chain))
        })?;
        let ended = self.followed(host, &mut answers, &mut ticket, out);
        if ended.is_err() {
            stop_child(&mut store);
        }
        // Drained so that the store never blocks on a full pipe.
        answers.drain();
        let _ = store.wait();
        ended
    }

    /// Reads what `record follow` writes: the build host's checked hello, the build's
    /// events (passed on to `out`), its result, and the store's answer once the record is
    /// received.
    fn followed(
        &mut self,
        host: &BuildHost,
        answers: &mut Answers,
        ticket: &mut Option<Ticket>,
        out: &mut impl Write,
    ) -> Result<BuildResult, RemoteEnd> {
        let mut finished = None;
        loop {
            let line = match answers.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let why = "contractor-store record follow ended without an answer";
                    return Err(self.lost(host, Some(why.into())));
                }
                Err(err) => return Err(self.lost(host, Some(error_chain(&err).join(": ")))),
            };
            let value: serde_json::Value = serde_json::from_slice(&line).map_err(|err| {
                host_error(vec![format!(
                    "contractor-store record follow wrote bad JSON: {err}"
                )])
            })?;
            let kind = value["type"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "host_hello" | "host_failed" | "host_source" => {
                    match serde_json::from_value(value) {
                        Ok(line) => self.host_said(host, line)?,
                        Err(err) => {
                            return Err(host_error(vec![format!("bad {kind:?} line: {err}")]).into())
                        }
                    }
                }
                "error" => return Err(self.store_failed(host, value)),
                "record_received" => {
                    return finished.ok_or_else(|| {
                        self.lost(
                            host,
                            Some("the record came before the build finished".into()),
                        )
                    })
                }
                _ => match serde_json::from_value::<BuildEvent>(value) {
                    // The front end announced the build, and announces its end.
                    Ok(BuildEvent::Started { .. }) => {}
                    Ok(event @ BuildEvent::VmStarted { .. }) => {
                        drop(ticket.take());
                        tell(out, &event);
                    }
                    Ok(BuildEvent::Finished { result }) => finished = Some(result),
                    Ok(event) => tell(out, &event),
                    Err(err) => {
                        return Err(host_error(vec![format!("bad {kind:?} event: {err}")]).into())
                    }
                },
            }
        }
    }

    /// The build host's hello (its release must be this one) or its failure.
    fn host_said(&mut self, host: &BuildHost, line: FollowedLine) -> Result<(), RemoteEnd> {
        match line {
            FollowedLine::HostHello {
                version,
                contractor,
            } if version == PROTOCOL_VERSION && contractor == RELEASE => Ok(()),
            FollowedLine::HostHello {
                version,
                contractor,
            } => Err(host_error(vec![format!(
                "the build host {host} runs contractor {contractor} (protocol {version}), \
                 this is contractor {RELEASE} (protocol {PROTOCOL_VERSION}): install one release on both"
            )])
            .into()),
            FollowedLine::HostSource { need } => {
                if let Some(writer) = &self.close {
                    let _ = writer.send(Step::Source(need));
                }
                Ok(())
            }
            FollowedLine::HostFailed { code, chain: said } => {
                let mut chain = vec![format!("the build host {host} could not run the build")];
                chain.extend(said);
                Err(RemoteEnd::Failed(ErrorInfo { code, chain }))
            }
        }
    }

    /// The store's own error object: the stream broke off or broke the protocol (the build
    /// host's failure), or the record cannot be kept here.
    fn store_failed(&mut self, host: &BuildHost, value: serde_json::Value) -> RemoteEnd {
        let error = match serde_json::from_value::<ErrorObject>(value) {
            Ok(error) => error,
            Err(err) => return host_error(vec![format!("bad error line: {err}")]).into(),
        };
        match error.code {
            ToolCode::HostedCut => self.lost(host, None),
            ToolCode::HostedStream | ToolCode::RecordCut => {
                self.lost(host, Some(error.chain.join(": ")))
            }
            _ => {
                let mut chain = vec![format!(
                    "the record from the build host {host} cannot be kept"
                )];
                chain.extend(error.chain);
                RemoteEnd::Failed(host_error(chain))
            }
        }
    }

    /// The session ended (or broke) before the record was complete: an interruption here,
    /// or the build host's failure, with `why` if the stream said more.
    fn lost(&mut self, host: &BuildHost, why: Option<String>) -> RemoteEnd {
        if let Some(signal) = self.interruption() {
            return RemoteEnd::Interrupted(signal);
        }
        if let Some(close) = self.close.take() {
            let _ = close.send(Step::Close);
        }
        // Killed, not stopped (`tool::stop_child`): ssh ends on SIGTERM with 255, which
        // would read as a lost connection.
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        let how = match status.and_then(|s| s.code()) {
            Some(255) => {
                "ssh could not reach it or lost the connection (exit 255; its message is above)"
                    .to_string()
            }
            Some(127) => format!(
                "{REMOTE_TOOL} is not on its PATH (exit 127): install Contractor {RELEASE} there"
            ),
            Some(code) => format!("ssh exited with {code}"),
            None => "ssh was killed".to_string(),
        };
        let mut chain = vec![format!(
            "the build host {host} went away before the build finished: {how}"
        )];
        chain.extend(why);
        RemoteEnd::Failed(host_error(chain))
    }

    /// Closes the session and waits for ssh.
    fn end(mut self) {
        drop(std::mem::take(&mut self.signals));
        if let Some(close) = self.close.take() {
            let _ = close.send(Step::Close);
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        let _ = self.child.wait();
    }
}

/// Watches for Ctrl-C and SIGTERM: the first closes the session's stdin (the build host
/// then interrupts the build and sends its record), and cuts the session if it has not
/// ended [`INTERRUPT_GRACE`] later; the second cuts it at once, as does the first when
/// the front end is gone (its death is what sent it: nothing is to outlive it).
fn watch_signals(
    close: Option<mpsc::Sender<Step>>,
    ssh: nix::unistd::Pid,
    parent: nix::unistd::Pid,
) -> SignalWatch {
    let mut close = close;
    SignalWatch::start(move |caught| {
        let orphaned = nix::unistd::getppid() != parent;
        if caught.first && !orphaned {
            if let Some(close) = close.take() {
                let _ = close.send(Step::Close);
            }
            std::thread::spawn(move || {
                std::thread::sleep(INTERRUPT_GRACE);
                let _ = nix::sys::signal::kill(ssh, nix::sys::signal::Signal::SIGTERM);
            });
        } else {
            let _ = nix::sys::signal::kill(ssh, nix::sys::signal::Signal::SIGTERM);
        }
    })
    .unwrap_or_else(|err| {
        eprintln!("contractor-host: warning: cannot watch for Ctrl-C ({err})");
        SignalWatch::default()
    })
}
