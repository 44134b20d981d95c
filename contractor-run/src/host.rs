//! The host side of one build: connect to the VM's control and tunnel channels, hand the
//! agent its job, relay the guest's streams to the proxy and the store, write the log, and
//! end with exactly one `finished` event.
//!
//! The host never opens a stream towards the guest and never connects anywhere but the
//! proxy and the store given in the request: those two addresses are the guest's whole
//! world. Limits (the timeout) are enforced here, not trusted to the guest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contractor_protocol::agent::{
    GuestMessage, HostMessage, HostTime, Phase, TunnelTarget, JOB_ENTROPY_BYTES,
};
use contractor_protocol::result::{ErrorInfo, Limit, Outcome};
use contractor_protocol::run::{RunEvent, RunRequest};
use contractor_protocol::service::Confinement;
use contractor_protocol::PROTOCOL_VERSION;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::control::{Line, LineReader, CONTROL_LINE_MAX};
use crate::text::Utf8Chunker;
use crate::tunnel::{self, Side, TunnelStream};

/// Where `run` sends its events: a bounded channel (make it with [`event_channel`]). `run`
/// waits while it is full, so a guest that floods messages is slowed, not buffered.
pub type EventSink = mpsc::Sender<RunEvent>;

/// How many events wait in an [`EventSink`] before `run` waits for the reader: 256.
pub const EVENT_QUEUE: usize = 256;

/// Most `artifact` messages a guest may send in one build: 10,000. One more ends the
/// build as failed (`too_many_artifacts`).
pub const MAX_REPORTED_ARTIFACTS: usize = contractor_protocol::agent::MAX_REPORTED_ARTIFACTS;

/// A bounded channel for `run`'s events ([`EVENT_QUEUE`] events).
pub fn event_channel() -> (EventSink, mpsc::Receiver<RunEvent>) {
    mpsc::channel(EVENT_QUEUE)
}

/// What the build may still send: `max_log` bytes, shared by its output and its control
/// lines, so that a flood of control messages hits the same limit as a flood of output.
#[derive(Debug)]
struct Budget {
    max: Option<u64>,
    used: std::sync::atomic::AtomicU64,
}

impl Budget {
    fn new(max: Option<u64>) -> Budget {
        Budget {
            max,
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes up to `n` bytes of the budget; returns how many it had room for.
    fn take(&self, n: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let Some(max) = self.max else { return n };
        let mut granted = 0;
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                granted = n.min(max.saturating_sub(used));
                Some(used + granted)
            });
        granted
    }
}

/// How long to wait for a VM's channel sockets to appear.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
/// How often the host pings the agent while the job runs: every 5 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long the host waits for a `pong` before it ends the run as `guest_unresponsive`:
/// 30 s.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the host waits for the agent's answer to `hello` before saying it again.
const HELLO_REPEAT: Duration = Duration::from_secs(1);
/// How long the host still waits for `done` once the tunnel has ended (the guest powers
/// off right after `done`, so the two may cross): 2 s.
const TUNNEL_END_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the rest of the output after the agent reports the script's end.
const LOG_DRAIN: Duration = Duration::from_secs(10);

/// Errors that end a run as an infrastructure failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A channel socket never appeared or refused the connection.
    #[error("cannot connect to the VM's {name} channel at {path}")]
    Channel {
        /// `control` or `tunnel`.
        name: &'static str,
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be written.
    #[error("cannot write the build log {path}")]
    Log {
        /// The log path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control channel failed.
    #[error("the control channel failed")]
    Control(#[source] std::io::Error),
    /// The agent sent something that is not a message.
    #[error("the agent sent an invalid message: {line:?}")]
    BadMessage {
        /// The line, truncated.
        line: String,
        /// Why it is invalid.
        #[source]
        source: serde_json::Error,
    },
    /// The agent sent a control line longer than the bound.
    #[error(
        "the agent sent a control line longer than {max} bytes (CONTROL_LINE_MAX); the run was stopped",
        max = crate::control::CONTROL_LINE_MAX
    )]
    LineTooLong,
    /// The tunnel's connection ended or failed while the job ran.
    #[error("the tunnel to the guest broke while the build ran: {0}")]
    TunnelBroken(String),
    /// No `pong` came for [`LIVENESS_TIMEOUT`].
    #[error(
        "the guest stopped answering for {} s (no pong to the host's pings): it is frozen, suspended or its agent was stopped",
        LIVENESS_TIMEOUT.as_secs()
    )]
    GuestUnresponsive,
    /// The agent's first message was not `hello`.
    #[error("the agent did not answer hello with hello")]
    NoHello,
    /// The host's randomness for the job could not be read.
    #[error("cannot read the host's randomness (getrandom) for the job")]
    Entropy(#[source] std::io::Error),
    /// The VM went away before the agent reported the script's end.
    #[error(
        "the VM stopped before the agent reported the end of the script (see the console log)"
    )]
    AgentGone,
}

/// What the agent reported so far; read even when the timeout cuts the run short.
#[derive(Debug, Default)]
struct Progress {
    exit_code: Option<i32>,
    signal: Option<i32>,
    agent_error: Option<ErrorInfo>,
    /// A limit the host enforced while the job ran (the output cap).
    limit: Option<(Limit, String)>,
    /// Processes the guest kernel killed for lack of memory while the script ran.
    oom_kills: u64,
    /// The build's disk was full when the script ended.
    disk_full: bool,
    /// `artifact` messages received.
    artifacts: usize,
    /// How the job's `fetch` ended (code, signal), if it ran.
    fetch: Option<(Option<i32>, Option<i32>)>,
    /// The host judged the build failed while it ran (not a limit of the spec).
    failure: Option<ErrorInfo>,
}

/// How a run ended, before it becomes the `finished` event.
struct Verdict {
    outcome: Outcome,
    error: Option<ErrorInfo>,
    limit: Option<Limit>,
}

impl Verdict {
    fn new(outcome: Outcome, error: Option<ErrorInfo>) -> Verdict {
        Verdict {
            outcome,
            error,
            limit: None,
        }
    }

    fn infrastructure(code: &str, message: String) -> Verdict {
        Verdict::new(
            Outcome::Infrastructure,
            Some(ErrorInfo {
                code: code.into(),
                chain: vec![message],
            }),
        )
    }

    /// The build failed because it hit `limit`; `message` names the limit and its value.
    fn limit(limit: Limit, outcome: Outcome, message: String) -> Verdict {
        Verdict {
            outcome,
            error: Some(ErrorInfo {
                code: format!(
                    "limit_{}",
                    serde_json::to_value(limit)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
                chain: vec![message],
            }),
            limit: Some(limit),
        }
    }
}

/// The VM's two channels and the build log, opened before the relay confines itself (after
/// that it can open nothing by name): what [`run`] works with.
#[derive(Debug)]
pub struct Links {
    control: std::os::unix::net::UnixStream,
    tunnel: std::os::unix::net::UnixStream,
    log: std::fs::File,
}

/// Why [`open_links`] has no links.
#[derive(Debug)]
pub enum LinkError {
    /// The channel sockets did not appear within the boot timeout.
    BootTimeout,
    /// A socket refused, or did not appear within its own wait, or the log cannot be made.
    Failed(RunError),
}

/// What [`open_links`] left for [`run`]: when it began (the run's clock and its boot
/// timeout start there) and the links or why there are none.
#[derive(Debug)]
pub struct Opened {
    started: Instant,
    links: Result<Links, LinkError>,
}

/// Connects to the VM's control and tunnel channels (waiting up to 30 s, and never past the
/// boot timeout, for QEMU to make them) and creates the build log. Blocking: it runs before
/// the async runtime, so that the relay can confine itself to what it holds.
pub fn open_links(request: &RunRequest) -> Opened {
    let started = Instant::now();
    let boot = Duration::from_secs(request.boot_timeout_secs);
    let links = (|| {
        let control = connect_channel("control", &request.control_socket, started, boot)?;
        let tunnel = connect_channel("tunnel", &request.tunnel_socket, started, boot)?;
        let log = std::fs::File::create(&request.log).map_err(|source| {
            LinkError::Failed(RunError::Log {
                path: request.log.clone(),
                source,
            })
        })?;
        Ok(Links {
            control,
            tunnel,
            log,
        })
    })();
    Opened { started, links }
}

/// Runs the request's job to its end and returns the closing `finished` event (also sent
/// to `events`, after `started` with the relay's `confinement`). Never fails: every failure
/// is an outcome.
pub async fn run(
    request: RunRequest,
    opened: Opened,
    confinement: Option<Confinement>,
    events: EventSink,
) -> RunEvent {
    let started = opened.started;
    let _ = events
        .send(RunEvent::Started {
            version: PROTOCOL_VERSION,
            confinement,
        })
        .await;
    let mut progress = Progress::default();
    let boot_limit =
        Duration::from_secs(request.boot_timeout_secs).saturating_sub(started.elapsed());
    let connected = match opened.links {
        Ok(links) => tokio::time::timeout(boot_limit, connect(links, &request, &events))
            .await
            .unwrap_or(Err(LinkError::BootTimeout)),
        Err(err) => Err(err),
    };
    let verdict = match connected {
        Err(LinkError::BootTimeout) => Verdict::infrastructure(
            "boot_timeout",
            format!(
                "the guest agent did not answer within {} s (the VM did not boot? see the console log)",
                request.boot_timeout_secs
            ),
        ),
        Err(LinkError::Failed(err)) => {
            Verdict::new(Outcome::Infrastructure, Some(error_info(err.code(), &err)))
        }
        Ok(session) => {
            let limit = Duration::from_secs(request.timeout_secs);
            match tokio::time::timeout(limit, session.run_job(&request, &events, &mut progress)).await {
                Ok(Ok(())) => judge(&progress, &request),
                Ok(Err(err)) => Verdict::new(Outcome::Infrastructure, Some(error_info(err.code(), &err))),
                Err(_) => Verdict::limit(
                    Limit::Timeout,
                    Outcome::Timeout,
                    format!(
                        "the build ran past its timeout ({} = {} s) and was stopped",
                        Limit::Timeout.field(),
                        request.timeout_secs
                    ),
                ),
            }
        }
    };
    let finished = RunEvent::Finished {
        outcome: verdict.outcome,
        exit_code: progress.exit_code,
        duration_secs: started.elapsed().as_secs_f64(),
        // Guest text reaches the error in more ways than `error` (serde names what it could
        // not parse): cap it all.
        error: verdict.error.map(|e| ErrorInfo::capped(&e.code, &e.chain)),
        limit: verdict.limit,
    };
    let _ = events.send(finished.clone()).await;
    finished
}

/// Decides the outcome once the agent has said all it will say (or a limit stopped it).
fn judge(progress: &Progress, request: &RunRequest) -> Verdict {
    if let Some(error) = &progress.failure {
        return Verdict::new(Outcome::Failed, Some(error.clone()));
    }
    if let Some((limit, message)) = &progress.limit {
        return Verdict::limit(*limit, Outcome::Failed, message.clone());
    }
    if let Some((code, signal)) = progress.fetch.filter(|&(code, _)| code != Some(0)) {
        let how = match (code, signal) {
            (Some(code), _) => format!("exited with {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "ended without an exit code".to_string(),
        };
        return Verdict::new(
            Outcome::Failed,
            Some(ErrorInfo {
                code: "fetch_failed".into(),
                chain: vec![format!(
                    "the fetch command (build.fetch) {how}; the script did not run"
                )],
            }),
        );
    }
    // A failed script that ran out of memory or disk failed on that limit.
    if progress.exit_code != Some(0) && progress.agent_error.is_none() {
        let size = |value: Option<u64>, unit: &str| {
            value.map_or(String::new(), |v| format!(" = {v} {unit}"))
        };
        if progress.oom_kills > 0 {
            return Verdict::limit(
                Limit::Memory,
                Outcome::Failed,
                format!(
                    "the build ran out of memory ({}{}): the guest kernel killed {} process(es)",
                    Limit::Memory.field(),
                    size(request.memory_mib, "MiB"),
                    progress.oom_kills
                ),
            );
        }
        if progress.disk_full {
            return Verdict::limit(
                Limit::Disk,
                Outcome::Failed,
                format!(
                    "the build filled its disk ({}{})",
                    Limit::Disk.field(),
                    size(request.disk_gib, "GiB")
                ),
            );
        }
    }
    if let Some(error) = &progress.agent_error {
        return match error.code.as_str() {
            "artifact_missing" | "artifact_name" | "artifact_rejected" | "too_many_artifacts" => {
                Verdict::new(Outcome::Failed, Some(error.clone()))
            }
            "limit_max_artifacts" => Verdict {
                outcome: Outcome::Failed,
                error: Some(error.clone()),
                limit: Some(Limit::MaxArtifacts),
            },
            _ => Verdict::new(Outcome::Infrastructure, Some(error.clone())),
        };
    }
    match (progress.exit_code, progress.signal) {
        (Some(0), _) => Verdict::new(Outcome::Success, None),
        (Some(_), _) => Verdict::new(Outcome::Failed, None),
        (None, Some(signal)) => Verdict::new(
            Outcome::Failed,
            Some(ErrorInfo {
                code: "signal".into(),
                chain: vec![format!("the script was killed by signal {signal}")],
            }),
        ),
        (None, None) => Verdict::new(
            Outcome::Infrastructure,
            Some(error_info("agent_gone", &RunError::AgentGone)),
        ),
    }
}

/// The error and its sources as data.
pub fn error_info(code: &str, err: &(dyn std::error::Error + 'static)) -> ErrorInfo {
    ErrorInfo::from_error(code, err)
}

/// The control channel's reading half. Cancel-safe ([`LineReader`]): the hello repeat's
/// timer and the other branches of [`Session::follow`]'s select drop reads that may be
/// in the middle of a line.
type ControlLines = LineReader<BufReader<tokio::net::unix::OwnedReadHalf>>;

impl RunError {
    /// The code of the `finished` event's error.
    fn code(&self) -> &'static str {
        match self {
            RunError::LineTooLong => "control_line_too_long",
            RunError::Control(_) => "control_broken",
            RunError::BadMessage { .. } => "bad_message",
            RunError::AgentGone => "agent_gone",
            RunError::TunnelBroken(_) => "tunnel_broken",
            RunError::GuestUnresponsive => "guest_unresponsive",
            _ => "infrastructure",
        }
    }
}

/// The build's network as the relay enforces it: on while the job's `fetch` runs, off
/// (for good) once the agent says the script begins. Off, proxy streams go to the script
/// proxy (which refuses and records) or are closed, and every stream of the fetch phase is
/// cut.
#[derive(Clone, Default)]
struct Network {
    offline: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio_util::sync::CancellationToken,
}

impl Network {
    fn go_offline(&self) {
        self.offline
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.cancel();
    }

    fn is_offline(&self) -> bool {
        self.offline.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A VM whose agent has said hello.
struct Session {
    network: Network,
    lines: ControlLines,
    budget: Arc<Budget>,
    tunnel_end: oneshot::Receiver<tunnel::TunnelEnd>,
    /// Taken by the pinger once the job is sent.
    control_out: Option<tokio::net::unix::OwnedWriteHalf>,
    log_done: oneshot::Receiver<LogEnd>,
}

/// How the build's output stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogEnd {
    /// The guest closed it.
    Complete,
    /// It passed the output cap of this many bytes and was cut.
    Cut(u64),
}

/// Starts relaying the tunnel and waits for the agent's hello.
async fn connect(
    links: Links,
    request: &RunRequest,
    events: &EventSink,
) -> Result<Session, LinkError> {
    let failed = |source| LinkError::Failed(RunError::Control(source));
    let control = async_stream(links.control).map_err(failed)?;
    let tunnel_io = async_stream(links.tunnel).map_err(failed)?;
    let log = tokio::fs::File::from_std(links.log);

    let (log_done_tx, log_done) = oneshot::channel();
    let budget = Arc::new(Budget::new(request.max_log_bytes));
    let network = Network::default();
    let relay = Relay {
        proxy: request.proxy,
        script_proxy: request.script_proxy,
        network: network.clone(),
        store: request.store,
        log: Arc::new(Mutex::new(Some((log, request.log.clone(), log_done_tx)))),
        budget: budget.clone(),
        events: events.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(tunnel::MAX_TUNNEL_STREAMS)),
        refused: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let (_opener, mut inbound, tunnel_end) = tunnel::spawn(tunnel_io, Side::Host);
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            tokio::spawn(relay.clone().handle(stream));
        }
    });

    let (read_half, mut control_out) = control.into_split();
    let mut lines = LineReader::new(BufReader::new(read_half));
    // The host speaks first (a restored VM has nothing to say until asked), and repeats
    // itself until the agent answers: a line written before the guest opened its port
    // may never reach it. A repeat does not lose an answer being read: `lines` keeps what
    // the dropped read had of it.
    let hello = HostMessage::Hello {
        version: PROTOCOL_VERSION,
    };
    let answer = loop {
        write_message(&mut control_out, &hello)
            .await
            .map_err(gone_if_closed)?;
        match tokio::time::timeout(HELLO_REPEAT, next_message(&mut lines)).await {
            Ok(answer) => break answer.map_err(gone_if_closed)?,
            Err(_) => continue,
        }
    };
    match answer {
        Some((GuestMessage::Hello { agent_version, .. }, _)) => {
            let _ = events.send(RunEvent::AgentReady { agent_version }).await;
        }
        Some(_) => return Err(LinkError::Failed(RunError::NoHello)),
        None => return Err(LinkError::Failed(RunError::AgentGone)),
    }
    Ok(Session {
        network,
        lines,
        budget,
        tunnel_end,
        control_out: Some(control_out),
        log_done,
    })
}

impl Session {
    /// Hands the agent its job and follows it to `done`, pinging it meanwhile; ends at
    /// once when the control channel or the tunnel breaks or the agent stops answering.
    async fn run_job(
        mut self,
        request: &RunRequest,
        events: &EventSink,
        progress: &mut Progress,
    ) -> Result<(), RunError> {
        // The clock and the randomness are the host's of this moment (see Job::host_time).
        let mut job = request.job.clone();
        job.host_time = Some(HostTime::now());
        job.entropy = Some(host_entropy()?);
        let job = HostMessage::Job {
            version: PROTOCOL_VERSION,
            job: Box::new(job),
        };
        let Some(mut out) = self.control_out.take() else {
            return Err(RunError::Control(std::io::ErrorKind::NotConnected.into()));
        };
        write_message(&mut out, &job).await?;
        // The pinger owns the writing half; it stops between two pings, never inside one,
        // so that the port holds whole lines for a `shell` later.
        let (stop_pings, stopped) = tokio::sync::watch::channel(false);
        let (outbox, letters) = mpsc::channel(4);
        tokio::spawn(ping(out, stopped, letters));
        let fetches = request.job.fetch.is_some();
        let result = self.follow(events, progress, fetches, &outbox).await;
        let _ = stop_pings.send(true);
        result
    }

    async fn follow(
        &mut self,
        events: &EventSink,
        progress: &mut Progress,
        fetches: bool,
        outbox: &mpsc::Sender<HostMessage>,
    ) -> Result<(), RunError> {
        let mut log_done = Some(&mut self.log_done);
        let mut tunnel_end = Some(&mut self.tunnel_end);
        let mut tunnel_gone: Option<(String, tokio::time::Instant)> = None;
        let mut answer_by = tokio::time::Instant::now() + LIVENESS_TIMEOUT;
        // With a fetch: whether the host has said `offline` (after cutting the network).
        let mut offline_sent = false;
        loop {
            let grace_until = tunnel_gone.as_ref().map(|(_, until)| *until);
            let message = tokio::select! {
                message = next_message(&mut self.lines) => message?,
                end = async { log_done.as_mut().expect("guarded").await }, if log_done.is_some() => {
                    log_done = None;
                    if let Ok(LogEnd::Cut(max)) = end {
                        progress.limit = Some((
                            Limit::MaxLog,
                            format!(
                                "the build's output passed {} = {} bytes and was cut; the build was stopped",
                                Limit::MaxLog.field(),
                                max
                            ),
                        ));
                        return Ok(());
                    }
                    continue;
                }
                end = async { tunnel_end.as_mut().expect("guarded").await }, if tunnel_end.is_some() => {
                    tunnel_end = None;
                    let reason = match end {
                        Ok(tunnel::TunnelEnd::Failed(reason)) => reason,
                        Ok(tunnel::TunnelEnd::Closed) | Err(_) => "the guest closed it".to_string(),
                    };
                    tunnel_gone = Some((reason, tokio::time::Instant::now() + TUNNEL_END_GRACE));
                    continue;
                }
                () = tokio::time::sleep_until(grace_until.unwrap_or(answer_by)), if grace_until.is_some() => {
                    let (reason, _) = tunnel_gone.take().expect("guarded");
                    return Err(RunError::TunnelBroken(reason));
                }
                () = tokio::time::sleep_until(answer_by) => return Err(RunError::GuestUnresponsive),
            };
            let Some((message, bytes)) = message else {
                return Err(RunError::AgentGone);
            };
            if self.budget.take(bytes as u64) < bytes as u64 {
                progress.limit = Some((
                    Limit::MaxLog,
                    format!(
                        "the build's output and control messages passed {} = {} bytes; the build was stopped",
                        Limit::MaxLog.field(),
                        self.budget.max.unwrap_or_default()
                    ),
                ));
                return Ok(());
            }
            let heard = Heard {
                events,
                progress: &mut *progress,
                fetches,
                offline_sent: &mut offline_sent,
                outbox,
            };
            match Self::heard(&self.network, message, heard).await? {
                Next::Go => {}
                Next::Alive => answer_by = tokio::time::Instant::now() + LIVENESS_TIMEOUT,
                Next::Stop => return Ok(()),
                Next::Done => break,
            }
        }
        // The output travels on its own stream; let it catch up before the closing event.
        if let Some(done) = log_done {
            if let Ok(Ok(LogEnd::Cut(max))) = tokio::time::timeout(LOG_DRAIN, done).await {
                progress.limit = Some((
                    Limit::MaxLog,
                    format!(
                        "the build's output passed {} = {} bytes and was cut",
                        Limit::MaxLog.field(),
                        max
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Acts on one message of the guest's: what the build's progress and events learn
    /// from it, and what [`Self::follow`] does next.
    async fn heard(
        network: &Network,
        message: GuestMessage,
        to: Heard<'_>,
    ) -> Result<Next, RunError> {
        match message {
            GuestMessage::Hello { .. } => {}
            GuestMessage::Pong { .. } => return Ok(Next::Alive),
            GuestMessage::Phase { phase } => {
                // The script of a job with a fetch runs offline: the network goes off
                // before the agent hears it may start.
                if phase == Phase::Script && to.fetches && !*to.offline_sent {
                    *to.offline_sent = true;
                    network.go_offline();
                    to.outbox
                        .send(HostMessage::Offline)
                        .await
                        .map_err(|_| RunError::Control(std::io::ErrorKind::BrokenPipe.into()))?;
                }
                let _ = to.events.send(RunEvent::Phase { phase }).await;
            }
            GuestMessage::FetchExited { code, signal } => {
                // The fetch is over: nothing after it has the network, whatever the
                // guest says next.
                network.go_offline();
                to.progress.fetch = Some((code, signal));
            }
            GuestMessage::Artifact { path, size } => {
                to.progress.artifacts += 1;
                if to.progress.artifacts > MAX_REPORTED_ARTIFACTS {
                    to.progress.failure = Some(ErrorInfo {
                        code: "too_many_artifacts".into(),
                        chain: vec![format!(
                            "the guest reported more than {MAX_REPORTED_ARTIFACTS} artifacts (MAX_REPORTED_ARTIFACTS); the build was stopped"
                        )],
                    });
                    return Ok(Next::Stop);
                }
                let _ = to.events.send(RunEvent::Artifact { path, size }).await;
            }
            GuestMessage::ScriptExited { .. } if to.fetches && !*to.offline_sent => {
                to.progress.failure = Some(ErrorInfo {
                    code: "script_before_offline".into(),
                    chain: vec!["the guest reported the script's end before the host had cut the network after the fetch; the build was stopped".into()],
                });
                return Ok(Next::Stop);
            }
            GuestMessage::ScriptExited {
                code,
                signal,
                oom_kills,
                disk_full,
            } => {
                to.progress.exit_code = code;
                to.progress.signal = signal;
                to.progress.oom_kills = oom_kills;
                to.progress.disk_full = disk_full;
            }
            GuestMessage::Error { code, chain } => {
                to.progress.agent_error = Some(ErrorInfo::capped(&code, &chain));
            }
            GuestMessage::Done => return Ok(Next::Done),
            // Only after a `shell` message, which `run` never sends.
            GuestMessage::ShellStarted => {}
        }
        Ok(Next::Go)
    }
}

/// What [`Relay::heard`] works on: where events go, the build's progress, whether the job
/// has a fetch, whether `offline` was sent, and the way to the agent.
struct Heard<'a> {
    events: &'a EventSink,
    progress: &'a mut Progress,
    fetches: bool,
    offline_sent: &'a mut bool,
    outbox: &'a mpsc::Sender<HostMessage>,
}

/// What follows a guest message.
enum Next {
    /// Read the next one.
    Go,
    /// The agent answered a ping: it is alive.
    Alive,
    /// A limit or a violation stopped the build (said in the progress).
    Stop,
    /// The agent is done.
    Done,
}

/// A control channel closed under the relay before the agent answered `hello`: the VM
/// went away.
fn gone_if_closed(err: RunError) -> LinkError {
    match err {
        RunError::Control(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            LinkError::Failed(RunError::AgentGone)
        }
        other => LinkError::Failed(other),
    }
}

/// [`JOB_ENTROPY_BYTES`] bytes from the host's `getrandom(2)`, as hex.
fn host_entropy() -> Result<String, RunError> {
    let mut bytes = [0u8; JOB_ENTROPY_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RunError::Entropy(err));
                }
            }
        }
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes one message to the agent as one line.
async fn write_message<W: AsyncWrite + Unpin>(
    out: &mut W,
    message: &HostMessage,
) -> Result<(), RunError> {
    let mut line = serde_json::to_vec(message).map_err(|e| RunError::Control(e.into()))?;
    line.push(b'\n');
    out.write_all(&line).await.map_err(RunError::Control)?;
    out.flush().await.map_err(RunError::Control)
}

/// Sends `ping` every [`PING_INTERVAL`], and each message of `letters` as it comes, until
/// `stop` turns true or the channel fails.
async fn ping<W: AsyncWrite + Unpin>(
    mut out: W,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut letters: mpsc::Receiver<HostMessage>,
) {
    let mut seq = 0;
    let mut next_ping = tokio::time::Instant::now() + PING_INTERVAL;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_ping) => {}
            Some(letter) = letters.recv() => {
                if write_message(&mut out, &letter).await.is_err() {
                    return;
                }
                continue;
            }
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        next_ping = tokio::time::Instant::now() + PING_INTERVAL;
        seq += 1;
        if write_message(&mut out, &HostMessage::Ping { seq })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The agent's next message; lines are read within [`CONTROL_LINE_MAX`].
async fn next_message<R: AsyncBufRead + Unpin>(
    lines: &mut LineReader<R>,
) -> Result<Option<(GuestMessage, usize)>, RunError> {
    loop {
        let line = match lines
            .next(CONTROL_LINE_MAX)
            .await
            .map_err(RunError::Control)?
        {
            Line::Text(line) => line,
            Line::End => return Ok(None),
            Line::TooLong => return Err(RunError::LineTooLong),
        };
        if line.trim_ascii().is_empty() {
            continue;
        }
        return serde_json::from_slice(&line)
            .map(|message| Some((message, line.len() + 1)))
            .map_err(|source| RunError::BadMessage {
                line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
                source,
            });
    }
}

/// A blocking stream made non-blocking and handed to the runtime.
fn async_stream(stream: std::os::unix::net::UnixStream) -> std::io::Result<UnixStream> {
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Connects to a channel socket, waiting for QEMU to create it: up to [`SOCKET_WAIT`], and
/// never past `boot` from `started`.
fn connect_channel(
    name: &'static str,
    path: &Path,
    started: Instant,
    boot: Duration,
) -> Result<std::os::unix::net::UnixStream, LinkError> {
    let socket_deadline = Instant::now() + SOCKET_WAIT;
    let boot_deadline = started + boot;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() >= boot_deadline => return Err(LinkError::BootTimeout),
            Err(source) if Instant::now() >= socket_deadline => {
                return Err(LinkError::Failed(RunError::Channel {
                    name,
                    path: path.to_path_buf(),
                    source,
                }))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

type LogSlot = Arc<Mutex<Option<(tokio::fs::File, PathBuf, oneshot::Sender<LogEnd>)>>>;

/// Connects each guest stream to the one place its first byte names.
#[derive(Clone)]
struct Relay {
    proxy: std::net::SocketAddr,
    /// Where proxy streams go once the network is off (closed when absent).
    script_proxy: Option<std::net::SocketAddr>,
    network: Network,
    store: std::net::SocketAddr,
    log: LogSlot,
    budget: Arc<Budget>,
    events: EventSink,
    /// Proxy and store streams relayed at once, at most MAX_TUNNEL_STREAMS.
    streams: Arc<tokio::sync::Semaphore>,
    /// Streams closed because MAX_TUNNEL_STREAMS were open.
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    async fn handle(self, mut stream: TunnelStream) {
        let mut tag = [0u8; 1];
        if stream.read_exact(&mut tag).await.is_err() {
            return;
        }
        let (target, cut) = match TunnelTarget::from_tag(tag[0]) {
            Some(TunnelTarget::Proxy) if self.network.is_offline() => match self.script_proxy {
                Some(script_proxy) => (script_proxy, None),
                None => return,
            },
            Some(TunnelTarget::Proxy) => (self.proxy, Some(self.network.cut.clone())),
            Some(TunnelTarget::Store) => (self.store, None),
            Some(TunnelTarget::Log) => return self.take_log(stream).await,
            None => return,
        };
        let Ok(_permit) = self.streams.clone().try_acquire_owned() else {
            // Closed at once: the guest's connection sees its end, nothing waits.
            let refused = self
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if refused == 0 {
                eprintln!(
                    "contractor-run: the guest holds {} tunnel streams (MAX_TUNNEL_STREAMS); further ones are refused",
                    tunnel::MAX_TUNNEL_STREAMS
                );
            }
            return;
        };
        match cut {
            // A stream of the fetch phase ends when the network goes off.
            Some(cut) => {
                tokio::select! {
                    () = splice(stream, target) => {}
                    () = cut.cancelled() => {}
                }
            }
            None => splice(stream, target).await,
        }
    }

    /// Copies the first log stream to the log; a second one is dropped.
    async fn take_log(self, stream: TunnelStream) {
        let slot = self.log.lock().map(|mut slot| slot.take()).ok().flatten();
        let Some((file, path, done)) = slot else {
            return;
        };
        let end = match copy_log(stream, file, &self.events, &self.budget).await {
            Ok(end) => end,
            Err(err) => {
                eprintln!(
                    "contractor-run: cannot write the build log {}: {err}",
                    path.display()
                );
                LogEnd::Complete
            }
        };
        let _ = done.send(end);
    }
}

async fn splice(mut stream: TunnelStream, target: std::net::SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    tunnel::copy_both_ways(&mut stream, &mut upstream).await;
}

/// Copies the build's output to the log file and to `output` events, up to `max` bytes.
async fn copy_log(
    mut stream: TunnelStream,
    mut file: tokio::fs::File,
    events: &EventSink,
    budget: &Budget,
) -> std::io::Result<LogEnd> {
    let mut chunker = Utf8Chunker::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = LogEnd::Complete;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let room = usize::try_from(budget.take(n as u64)).unwrap_or(n).min(n);
        file.write_all(&buf[..room]).await?;
        let mut text = chunker.push(&buf[..room]);
        if room < n {
            let limit = budget.max.unwrap_or_default();
            let marker = format!(
                "\n[contractor: output cut here: the build passed build.max_log = {limit} bytes]\n"
            );
            file.write_all(marker.as_bytes()).await?;
            text.push_str(&chunker.finish());
            text.push_str(&marker);
            end = LogEnd::Cut(limit);
        }
        if !text.is_empty() {
            let _ = events.send(RunEvent::Output { text }).await;
        }
        if end != LogEnd::Complete {
            break;
        }
    }
    let text = chunker.finish();
    if !text.is_empty() {
        let _ = events.send(RunEvent::Output { text }).await;
    }
    file.flush().await?;
    file.sync_all().await?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn log_through_tunnel(output: &[u8], max: Option<u64>) -> (LogEnd, Vec<u8>, String) {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _, _) = tunnel::spawn(guest_io, Side::Guest);
        let (_, mut inbound, _) = tunnel::spawn(host_io, Side::Host);
        let mut guest = opener
            .open(TunnelTarget::Log)
            .await
            .expect("open log stream");
        guest.write_all(output).await.expect("write output");
        guest.shutdown().await.expect("close output");
        let mut stream = inbound.recv().await.expect("log stream");
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag).await.expect("tag");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("build.log");
        let file = tokio::fs::File::create(&path).await.expect("log file");
        let (events, mut received) = event_channel();
        let end = copy_log(stream, file, &events, &Budget::new(max))
            .await
            .expect("copy");
        drop(events);
        let mut text = String::new();
        while let Some(RunEvent::Output { text: t }) = received.recv().await {
            text.push_str(&t);
        }
        (end, std::fs::read(&path).expect("read log"), text)
    }

    #[tokio::test]
    async fn output_within_the_cap_is_kept_whole() {
        let (end, log, text) = log_through_tunnel(b"line one\nline two\n", Some(100)).await;
        assert_eq!(end, LogEnd::Complete);
        assert_eq!(log, b"line one\nline two\n");
        assert_eq!(text, "line one\nline two\n");
    }

    #[tokio::test]
    async fn output_past_the_cap_is_cut_with_a_marker() {
        let output = vec![b'x'; 200_000];
        let (end, log, text) = log_through_tunnel(&output, Some(1000)).await;
        assert_eq!(end, LogEnd::Cut(1000));
        let marker =
            "\n[contractor: output cut here: the build passed build.max_log = 1000 bytes]\n";
        assert_eq!(log.len(), 1000 + marker.len());
        assert!(log.ends_with(marker.as_bytes()));
        assert!(
            text.ends_with(marker) && text.len() == log.len(),
            "events carry the same text"
        );
    }

    #[tokio::test]
    async fn a_control_line_past_the_bound_ends_the_read_with_its_code() {
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            // Twice the bound and more, without a newline; stops once the host hangs up.
            for _ in 0..(2 * CONTROL_LINE_MAX / chunk.len() + 1) {
                if guest.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut reader = LineReader::new(BufReader::new(host));
        let err = next_message(&mut reader).await.expect_err("too long");
        assert_eq!(err.code(), "control_line_too_long");
        assert!(err.to_string().contains("1048576 bytes"), "{err}");
        drop(reader);
        writer.await.expect("writer");
    }

    /// Runs `run_job` against a guest that says `guest_says` on the control channel.
    async fn job_with(guest_says: Vec<u8>, max_log: Option<u64>) -> (Progress, Vec<RunEvent>) {
        let mut says = guest_says;
        says.extend_from_slice(b"{\"type\":\"done\"}\n");
        let (result, progress, events) = job_against(says, max_log, None).await;
        result.expect("run_job");
        (progress, events)
    }

    /// Runs `run_job` against a guest that says `says` (and keeps the channel open), with
    /// a tunnel that ends as `tunnel` says (never when None).
    async fn job_against(
        says: Vec<u8>,
        max_log: Option<u64>,
        tunnel: Option<tunnel::TunnelEnd>,
    ) -> (Result<(), RunError>, Progress, Vec<RunEvent>) {
        let (host_end, mut guest_end) = UnixStream::pair().expect("socket pair");
        let (read_half, control_out) = host_end.into_split();
        let (_, log_done) = oneshot::channel();
        let (tunnel_tx, tunnel_end) = oneshot::channel();
        let _tunnel_alive = match tunnel {
            Some(end) => {
                let _ = tunnel_tx.send(end);
                None
            }
            None => Some(tunnel_tx),
        };
        let session = Session {
            network: Network::default(),
            lines: LineReader::new(BufReader::new(read_half)),
            budget: Arc::new(Budget::new(max_log)),
            control_out: Some(control_out),
            log_done,
            tunnel_end,
        };
        let guest = tokio::spawn(async move {
            let _ = guest_end.write_all(&says).await;
            guest_end
        });
        let (events, mut received) = event_channel();
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(event) = received.recv().await {
                seen.push(event);
            }
            seen
        });
        let mut progress = Progress::default();
        let result = session.run_job(&request(), &events, &mut progress).await;
        drop(events);
        drop(guest.await.expect("guest"));
        (result, progress, reader.await.expect("reader"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_tunnel_ends_the_job_at_once() {
        let (result, _, _) = job_against(
            Vec::new(),
            None,
            Some(tunnel::TunnelEnd::Failed("bad frame".into())),
        )
        .await;
        let err = result.expect_err("broken");
        assert_eq!(err.code(), "tunnel_broken");
        assert!(err.to_string().contains("bad frame"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_that_stops_answering_pings_is_unresponsive() {
        // The agent said it started the script, then froze.
        let phase = GuestMessage::Phase {
            phase: contractor_protocol::agent::Phase::Script,
        };
        let (result, _, _) = job_against(lines_of(&phase, 1), None, None).await;
        let err = result.expect_err("unresponsive");
        assert_eq!(err.code(), "guest_unresponsive");
        assert!(err.to_string().contains("30 s"), "{err}");
    }

    #[tokio::test]
    async fn a_control_channel_closed_before_done_is_agent_gone() {
        let exited = GuestMessage::ScriptExited {
            code: Some(0),
            signal: None,
            oom_kills: 0,
            disk_full: false,
        };
        let (host_end, mut guest_end) = UnixStream::pair().expect("socket pair");
        guest_end
            .write_all(&lines_of(&exited, 1))
            .await
            .expect("write");
        // The guest's side closes its sending half; the host's job still goes out.
        guest_end.shutdown().await.expect("shutdown");
        let (read_half, control_out) = host_end.into_split();
        let (_, log_done) = oneshot::channel();
        let (_tunnel_alive, tunnel_end) = oneshot::channel();
        let session = Session {
            network: Network::default(),
            lines: LineReader::new(BufReader::new(read_half)),
            budget: Arc::new(Budget::new(None)),
            control_out: Some(control_out),
            log_done,
            tunnel_end,
        };
        let (events, _received) = event_channel();
        let err = session
            .run_job(&request(), &events, &mut Progress::default())
            .await
            .expect_err("gone");
        assert_eq!(err.code(), "agent_gone");
    }

    fn lines_of(message: &GuestMessage, count: usize) -> Vec<u8> {
        let mut line = serde_json::to_vec(message).expect("json");
        line.push(b'\n');
        line.repeat(count)
    }

    #[tokio::test]
    async fn a_bad_message_naming_a_huge_type_reaches_finished_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control");
        let tunnel_socket = dir.path().join("tunnel");
        let control_listener = tokio::net::UnixListener::bind(&control).expect("control");
        let tunnel_listener = tokio::net::UnixListener::bind(&tunnel_socket).expect("tunnel");
        let guest = tokio::spawn(async move {
            let (mut control, _) = control_listener.accept().await.expect("accept control");
            let (tunnel, _) = tunnel_listener.accept().await.expect("accept tunnel");
            let hello = r#"{"type":"hello","version":1,"agent_version":"0"}"#;
            let bad = format!("{{\"type\":\"{}\"}}\n", "x".repeat(500_000));
            control
                .write_all(format!("{hello}\n{bad}").as_bytes())
                .await
                .expect("write");
            (control, tunnel)
        });
        let mut request = request();
        request.control_socket = control;
        request.tunnel_socket = tunnel_socket;
        request.log = dir.path().join("build.log");
        let (events, mut received) = event_channel();
        let drain = tokio::spawn(async move {
            while let Some(event) = received.recv().await {
                if matches!(event, RunEvent::Finished { .. }) {
                    break;
                }
            }
        });
        let opened = open_links(&request);
        let finished = run(request, opened, None, events).await;
        drain.await.expect("drain");
        drop(guest.await.expect("guest"));
        let RunEvent::Finished { error, .. } = finished else {
            panic!("not finished: {finished:?}");
        };
        let error = error.expect("error");
        assert_eq!(error.code, "bad_message");
        let bytes: usize = error.chain.iter().map(String::len).sum();
        assert!(bytes < 17 * 4200, "{bytes} bytes in finished");
    }

    #[tokio::test]
    async fn a_hello_answer_cut_by_the_repeat_still_arrives_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control");
        let tunnel_socket = dir.path().join("tunnel");
        let control_listener = tokio::net::UnixListener::bind(&control).expect("control");
        let tunnel_listener = tokio::net::UnixListener::bind(&tunnel_socket).expect("tunnel");
        // The agent sends the first part of its answer to the first hello, and the rest
        // only once the host has said hello again: the host's read of the answer is
        // under way when the repeat comes.
        let guest = tokio::spawn(async move {
            let (control, _) = control_listener.accept().await.expect("accept control");
            let (tunnel, _) = tunnel_listener.accept().await.expect("accept tunnel");
            let (read_half, mut write_half) = control.into_split();
            let mut from_host = BufReader::new(read_half);
            let mut hellos = 0;
            let mut line = String::new();
            for part in [
                &br#"{"type":"hello","vers"#[..],
                br#"ion":1,"agent_version":"0"}"#,
            ] {
                line.clear();
                tokio::io::AsyncBufReadExt::read_line(&mut from_host, &mut line)
                    .await
                    .expect("read");
                assert!(line.contains(r#""type":"hello""#), "{line}");
                hellos += 1;
                write_half.write_all(part).await.expect("write");
            }
            write_half.write_all(b"\n").await.expect("write");
            (hellos, from_host, write_half, tunnel)
        });
        let mut request = request();
        request.control_socket = control;
        request.tunnel_socket = tunnel_socket;
        request.log = dir.path().join("build.log");
        let links = open_links(&request).links.expect("links");
        let (events, mut received) = event_channel();
        let session = connect(links, &request, &events).await;
        let (hellos, ..) = guest.await.expect("guest");
        assert_eq!(hellos, 2, "the host repeated its hello once");
        assert!(session.is_ok(), "the answer was read whole");
        drop(events);
        let ready = received.recv().await.expect("an event");
        assert!(
            matches!(ready, RunEvent::AgentReady { ref agent_version } if agent_version == "0"),
            "{ready:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_agent_error_is_capped() {
        let error = GuestMessage::Error {
            code: "store".into(),
            chain: vec!["x".repeat(20_000); 40],
        };
        let (progress, _) = job_with(lines_of(&error, 1), None).await;
        let error = progress.agent_error.expect("error");
        let bytes: usize = error.chain.iter().map(String::len).sum();
        assert!(bytes < 17 * 4200, "{bytes} bytes kept");
    }

    #[tokio::test]
    async fn a_flood_of_control_messages_hits_max_log() {
        let phase = GuestMessage::Phase {
            phase: contractor_protocol::agent::Phase::Script,
        };
        let (progress, events) = job_with(lines_of(&phase, 10_000), Some(10_000)).await;
        let (limit, message) = progress.limit.expect("a limit");
        assert_eq!(limit, Limit::MaxLog);
        assert!(message.contains("build.max_log = 10000"), "{message}");
        assert!(events.len() < 10_000 / 30, "{} events passed", events.len());
    }

    #[tokio::test]
    async fn more_artifacts_than_the_bound_fail_the_build() {
        let artifact = GuestMessage::Artifact {
            path: "a".into(),
            size: 1,
        };
        let (progress, events) =
            job_with(lines_of(&artifact, MAX_REPORTED_ARTIFACTS + 5), None).await;
        assert_eq!(events.len(), MAX_REPORTED_ARTIFACTS);
        let verdict = judge(&progress, &request());
        assert_eq!(verdict.outcome, Outcome::Failed);
        assert_eq!(verdict.error.expect("error").code, "too_many_artifacts");
    }

    #[test]
    fn artifacts_the_store_refuses_fail_the_build_not_the_machinery() {
        for code in ["artifact_name", "artifact_rejected", "too_many_artifacts"] {
            let progress = Progress {
                exit_code: Some(0),
                agent_error: Some(ErrorInfo {
                    code: code.into(),
                    chain: vec!["artifact \"a\\\\b\" cannot be stored".into()],
                }),
                ..Progress::default()
            };
            assert_eq!(
                judge(&progress, &request()).outcome,
                Outcome::Failed,
                "{code}"
            );
        }
    }

    #[test]
    fn a_limit_becomes_a_failed_outcome_naming_the_field() {
        let progress = Progress {
            exit_code: Some(0),
            limit: Some((Limit::MaxLog, "passed build.max_log = 10 bytes".into())),
            ..Progress::default()
        };
        let verdict = judge(&progress, &request());
        assert_eq!(verdict.outcome, Outcome::Failed);
        assert_eq!(verdict.limit, Some(Limit::MaxLog));
        let error = verdict.error.expect("error");
        assert_eq!(error.code, "limit_max_log");
        assert!(error.chain[0].contains("build.max_log"));
    }

    /// A session of a job with a fetch, its network, the guest's end of the control
    /// channel, and what keeps the tunnel "alive".
    fn fetch_session() -> (
        Session,
        Network,
        UnixStream,
        oneshot::Sender<tunnel::TunnelEnd>,
    ) {
        let (host_end, guest_end) = UnixStream::pair().expect("socket pair");
        let (read_half, control_out) = host_end.into_split();
        let (_, log_done) = oneshot::channel();
        let (tunnel_alive, tunnel_end) = oneshot::channel();
        let network = Network::default();
        let session = Session {
            network: network.clone(),
            lines: LineReader::new(BufReader::new(read_half)),
            budget: Arc::new(Budget::new(None)),
            control_out: Some(control_out),
            log_done,
            tunnel_end,
        };
        (session, network, guest_end, tunnel_alive)
    }

    fn fetch_request() -> RunRequest {
        let mut request = request();
        request.job.fetch = Some("cargo fetch".into());
        request
    }

    #[tokio::test]
    async fn a_guest_that_ends_the_script_before_offline_fails_the_build() {
        let (session, network, mut guest_end, _alive) = fetch_session();
        let says = "{\"type\":\"phase\",\"phase\":\"fetch\"}\n{\"type\":\"fetch_exited\",\"code\":0}\n{\"type\":\"script_exited\",\"code\":0}\n{\"type\":\"done\"}\n";
        guest_end.write_all(says.as_bytes()).await.expect("say");
        let (events, _received) = event_channel();
        let mut progress = Progress::default();
        session
            .run_job(&fetch_request(), &events, &mut progress)
            .await
            .expect("the job ran");
        // The fetch's end alone already cut the network.
        assert!(network.is_offline());
        let failure = progress.failure.clone().expect("a failure");
        assert_eq!(failure.code, "script_before_offline");
        assert_eq!(judge(&progress, &request()).outcome, Outcome::Failed);
    }

    #[tokio::test]
    async fn the_network_goes_off_before_the_agent_may_run_the_script_of_a_fetch() {
        let (session, network, guest_end, _alive) = fetch_session();
        let watched = network.clone();
        let guest = tokio::spawn(async move {
            let (guest_read, mut guest_write) = guest_end.into_split();
            let mut from_host = BufReader::new(guest_read);
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut from_host, &mut line)
                .await
                .expect("the job");
            assert!(line.contains("\"fetch\":\"cargo fetch\""), "{line}");
            let say = |m: &str| format!("{m}\n");
            for message in [
                r#"{"type":"phase","phase":"fetch"}"#,
                r#"{"type":"fetch_exited","code":0}"#,
                r#"{"type":"phase","phase":"script"}"#,
            ] {
                guest_write
                    .write_all(say(message).as_bytes())
                    .await
                    .expect("say");
            }
            line.clear();
            tokio::io::AsyncBufReadExt::read_line(&mut from_host, &mut line)
                .await
                .expect("offline");
            // By the time the agent hears it, the relay is offline.
            assert_eq!(line.trim(), r#"{"type":"offline"}"#);
            assert!(watched.is_offline() && watched.cut.is_cancelled());
            let exited = r#"{"type":"script_exited","code":0}"#;
            guest_write
                .write_all(say(exited).as_bytes())
                .await
                .expect("say");
            guest_write
                .write_all(b"{\"type\":\"done\"}\n")
                .await
                .expect("say");
        });
        let (events, _received) = event_channel();
        let mut progress = Progress::default();
        assert!(!network.is_offline());
        session
            .run_job(&fetch_request(), &events, &mut progress)
            .await
            .expect("the job ran");
        guest.await.expect("the guest's view");
        assert_eq!(progress.fetch, Some((Some(0), None)));
        assert_eq!(progress.exit_code, Some(0));
    }

    #[test]
    fn a_failed_fetch_fails_the_build_and_names_it() {
        let failed = Progress {
            fetch: Some((Some(101), None)),
            ..Progress::default()
        };
        let verdict = judge(&failed, &request());
        assert_eq!(verdict.outcome, Outcome::Failed);
        let error = verdict.error.expect("error");
        assert_eq!(error.code, "fetch_failed");
        assert!(
            error.chain[0].contains("build.fetch) exited with 101"),
            "{:?}",
            error.chain
        );
    }

    fn request() -> RunRequest {
        serde_json::from_str(
            r#"{"version":1,"control_socket":"/c","tunnel_socket":"/t","proxy":"127.0.0.1:1",
                "store":"127.0.0.1:2","log":"/l","timeout_secs":60,"memory_mib":768,
                "disk_gib":2,"job":{"script":"true","source":"/s","artifacts_dest":"/a/"}}"#,
        )
        .expect("request")
    }

    #[test]
    fn a_failed_script_that_ran_out_of_memory_or_disk_failed_on_that_limit() {
        let oom = Progress {
            exit_code: Some(137),
            oom_kills: 2,
            ..Progress::default()
        };
        let verdict = judge(&oom, &request());
        assert_eq!(verdict.limit, Some(Limit::Memory));
        let message = &verdict.error.expect("error").chain[0];
        assert!(
            message.contains("vm.memory = 768 MiB") && message.contains("killed 2"),
            "{message}"
        );

        let full = Progress {
            exit_code: Some(1),
            disk_full: true,
            ..Progress::default()
        };
        let verdict = judge(&full, &request());
        assert_eq!(
            (verdict.outcome, verdict.limit),
            (Outcome::Failed, Some(Limit::Disk))
        );
        assert!(verdict.error.expect("error").chain[0].contains("vm.disk = 2 GiB"));

        // A script that coped with it (or succeeded anyway) did not fail on a limit.
        let coped = Progress {
            exit_code: Some(0),
            oom_kills: 1,
            disk_full: true,
            ..Progress::default()
        };
        let verdict = judge(&coped, &request());
        assert_eq!((verdict.outcome, verdict.limit), (Outcome::Success, None));
    }
}
