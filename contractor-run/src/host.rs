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

use contractor_protocol::agent::{GuestMessage, HostMessage, TunnelTarget};
use contractor_protocol::result::{ErrorInfo, Outcome};
use contractor_protocol::run::{RunEvent, RunRequest};
use contractor_protocol::PROTOCOL_VERSION;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::text::Utf8Chunker;
use crate::tunnel::{self, Side, TunnelStream};

/// Where `run` sends its events.
pub type EventSink = mpsc::UnboundedSender<RunEvent>;

/// How long to wait for a VM's channel sockets to appear.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
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
    /// The agent's first message was not `hello`.
    #[error("the agent did not start with hello")]
    NoHello,
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
}

/// Runs the request's job to its end and returns the closing `finished` event (also sent
/// to `events`). Never fails: every failure is an outcome.
pub async fn run(request: RunRequest, events: EventSink) -> RunEvent {
    let started = Instant::now();
    let _ = events.send(RunEvent::Started {
        version: PROTOCOL_VERSION,
    });
    let mut progress = Progress::default();
    let boot_limit = Duration::from_secs(request.boot_timeout_secs);
    let (outcome, error) = match tokio::time::timeout(boot_limit, connect(&request, &events)).await {
        Err(_) => (
            Outcome::Infrastructure,
            Some(ErrorInfo {
                code: "boot_timeout".into(),
                chain: vec![format!(
                    "the guest agent did not answer within {} s (the VM did not boot? see the console log)",
                    request.boot_timeout_secs
                )],
            }),
        ),
        Ok(Err(err)) => (Outcome::Infrastructure, Some(error_info("infrastructure", &err))),
        Ok(Ok(session)) => {
            let limit = Duration::from_secs(request.timeout_secs);
            match tokio::time::timeout(limit, session.run_job(&request, &events, &mut progress)).await {
                Ok(Ok(())) => judge(&progress),
                Ok(Err(err)) => (Outcome::Infrastructure, Some(error_info("infrastructure", &err))),
                Err(_) => (
                    Outcome::Timeout,
                    Some(ErrorInfo {
                        code: "timeout".into(),
                        chain: vec![format!(
                            "the build ran past its timeout of {} s and was stopped",
                            request.timeout_secs
                        )],
                    }),
                ),
            }
        }
    };
    let finished = RunEvent::Finished {
        outcome,
        exit_code: progress.exit_code,
        duration_secs: started.elapsed().as_secs_f64(),
        error,
    };
    let _ = events.send(finished.clone());
    finished
}

/// Decides the outcome once the agent has said all it will say.
fn judge(progress: &Progress) -> (Outcome, Option<ErrorInfo>) {
    if let Some(error) = &progress.agent_error {
        let outcome = if error.code == "artifact_missing" {
            Outcome::Failed
        } else {
            Outcome::Infrastructure
        };
        return (outcome, Some(error.clone()));
    }
    match (progress.exit_code, progress.signal) {
        (Some(0), _) => (Outcome::Success, None),
        (Some(_), _) => (Outcome::Failed, None),
        (None, Some(signal)) => (
            Outcome::Failed,
            Some(ErrorInfo {
                code: "signal".into(),
                chain: vec![format!("the script was killed by signal {signal}")],
            }),
        ),
        (None, None) => (
            Outcome::Infrastructure,
            Some(error_info("agent_gone", &RunError::AgentGone)),
        ),
    }
}

/// The error and its sources as data.
pub fn error_info(code: &str, err: &(dyn std::error::Error + 'static)) -> ErrorInfo {
    let mut chain = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    ErrorInfo {
        code: code.to_string(),
        chain,
    }
}

type ControlLines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// A VM whose agent has said hello.
struct Session {
    lines: ControlLines,
    control_out: tokio::net::unix::OwnedWriteHalf,
    log_done: oneshot::Receiver<()>,
}

/// Connects to the VM's channels, starts relaying the tunnel, and waits for the agent.
async fn connect(request: &RunRequest, events: &EventSink) -> Result<Session, RunError> {
    let control = connect_channel("control", &request.control_socket).await?;
    let tunnel_io = connect_channel("tunnel", &request.tunnel_socket).await?;
    let log = tokio::fs::File::create(&request.log)
        .await
        .map_err(|source| RunError::Log {
            path: request.log.clone(),
            source,
        })?;

    let (log_done_tx, log_done) = oneshot::channel();
    let relay = Relay {
        proxy: request.proxy,
        store: request.store,
        log: Arc::new(Mutex::new(Some((log, request.log.clone(), log_done_tx)))),
        events: events.clone(),
    };
    let (_opener, mut inbound) = tunnel::spawn(tunnel_io, Side::Host);
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            tokio::spawn(relay.clone().handle(stream));
        }
    });

    let (read_half, control_out) = control.into_split();
    let mut lines = BufReader::new(read_half).lines();
    match next_message(&mut lines).await? {
        Some(GuestMessage::Hello { agent_version, .. }) => {
            let _ = events.send(RunEvent::AgentReady { agent_version });
        }
        Some(_) => return Err(RunError::NoHello),
        None => return Err(RunError::AgentGone),
    }
    Ok(Session {
        lines,
        control_out,
        log_done,
    })
}

impl Session {
    /// Hands the agent its job and follows it to `done`.
    async fn run_job(
        mut self,
        request: &RunRequest,
        events: &EventSink,
        progress: &mut Progress,
    ) -> Result<(), RunError> {
        let job = HostMessage::Job {
            version: PROTOCOL_VERSION,
            job: request.job.clone(),
        };
        let mut line = serde_json::to_vec(&job).map_err(|e| RunError::Control(e.into()))?;
        line.push(b'\n');
        self.control_out
            .write_all(&line)
            .await
            .map_err(RunError::Control)?;

        while let Some(message) = next_message(&mut self.lines).await? {
            match message {
                GuestMessage::Hello { .. } => {}
                GuestMessage::Phase { phase } => {
                    let _ = events.send(RunEvent::Phase { phase });
                }
                GuestMessage::Artifact { path, size } => {
                    let _ = events.send(RunEvent::Artifact { path, size });
                }
                GuestMessage::ScriptExited { code, signal } => {
                    progress.exit_code = code;
                    progress.signal = signal;
                }
                GuestMessage::Error { code, chain } => {
                    progress.agent_error = Some(ErrorInfo { code, chain });
                }
                GuestMessage::Done => break,
            }
        }
        // The output travels on its own stream; let it catch up before the closing event.
        let _ = tokio::time::timeout(LOG_DRAIN, self.log_done).await;
        Ok(())
    }
}

async fn next_message(lines: &mut ControlLines) -> Result<Option<GuestMessage>, RunError> {
    loop {
        let Some(line) = lines.next_line().await.map_err(RunError::Control)? else {
            return Ok(None);
        };
        if line.trim().is_empty() {
            continue;
        }
        return serde_json::from_str(&line)
            .map(Some)
            .map_err(|source| RunError::BadMessage {
                line: line.chars().take(200).collect(),
                source,
            });
    }
}

/// Connects to a channel socket, waiting for QEMU to create it.
async fn connect_channel(name: &'static str, path: &Path) -> Result<UnixStream, RunError> {
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(source) if Instant::now() >= deadline => {
                return Err(RunError::Channel {
                    name,
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

type LogSlot = Arc<Mutex<Option<(tokio::fs::File, PathBuf, oneshot::Sender<()>)>>>;

/// Connects each guest stream to the one place its first byte names.
#[derive(Clone)]
struct Relay {
    proxy: std::net::SocketAddr,
    store: std::net::SocketAddr,
    log: LogSlot,
    events: EventSink,
}

impl Relay {
    async fn handle(self, mut stream: TunnelStream) {
        let mut tag = [0u8; 1];
        if stream.read_exact(&mut tag).await.is_err() {
            return;
        }
        match TunnelTarget::from_tag(tag[0]) {
            Some(TunnelTarget::Proxy) => splice(stream, self.proxy).await,
            Some(TunnelTarget::Store) => splice(stream, self.store).await,
            Some(TunnelTarget::Log) => {
                // Only the first log stream is accepted; a second one is dropped.
                let slot = self.log.lock().map(|mut slot| slot.take()).ok().flatten();
                if let Some((file, path, done)) = slot {
                    if let Err(err) = copy_log(stream, file, &self.events).await {
                        eprintln!(
                            "contractor-run: cannot write the build log {}: {err}",
                            path.display()
                        );
                    }
                    let _ = done.send(());
                }
            }
            None => {}
        }
    }
}

async fn splice(mut stream: TunnelStream, target: std::net::SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
}

async fn copy_log(
    mut stream: TunnelStream,
    mut file: tokio::fs::File,
    events: &EventSink,
) -> std::io::Result<()> {
    let mut chunker = Utf8Chunker::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        let text = chunker.push(&buf[..n]);
        if !text.is_empty() {
            let _ = events.send(RunEvent::Output { text });
        }
    }
    let text = chunker.finish();
    if !text.is_empty() {
        let _ = events.send(RunEvent::Output { text });
    }
    file.flush().await?;
    file.sync_all().await
}
