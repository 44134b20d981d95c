//! The agent's conversation with the host: say hello, take the job, fetch the source from
//! the store, run the script with its output on the log stream, upload the artifacts,
//! report, and finish with `done`.
//!
//! Inside the guest, the proxy and the store are loopback ports served by this agent; each
//! connection to them becomes one tunnel stream. The build reaches nothing else.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use contractor_protocol::agent::{
    CacheJob, GuestMessage, HostMessage, Job, Keep, Phase, TunnelTarget, CONTROL_PORT,
    GUEST_PROXY_PORT, GUEST_STORE_PORT, MAX_REPORTED_ARTIFACTS, TUNNEL_PORT,
};
use contractor_protocol::PROTOCOL_VERSION;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::control::{read_line, Line, CONTROL_LINE_MAX};
use crate::tunnel::{self, Opener, Side};

/// Where the source is unpacked and the script runs.
pub const WORK_DIR: &str = "/build";
/// The agent's version, reported in `hello` (and recorded in image manifests).
pub use contractor_protocol::image::AGENT_VERSION;

const PORT_WAIT: Duration = Duration::from_secs(60);
/// How many artifacts are uploaded at a time: 4.
const PARALLEL_UPLOADS: usize = 4;
/// The bytes of an artifact read and sent at a time: 256 KiB.
const UPLOAD_CHUNK: usize = 256 * 1024;
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// Characters escaped in an artifact's URL path (everything but unreserved and `/`).
const PATH_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Errors of the agent. Those after `hello` are reported to the host as `error` messages.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A virtio-serial port is missing or broken.
    #[error("cannot open the {name} port")]
    Port {
        /// The port name.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control conversation failed.
    #[error("control channel failed")]
    Control(#[source] std::io::Error),
    /// The host sent something else than a job.
    #[error("the host sent an invalid job")]
    BadJob(#[source] serde_json::Error),
    /// The host sent a control line longer than the bound.
    #[error(
        "the host sent a control line longer than {max} bytes (CONTROL_LINE_MAX)",
        max = crate::control::CONTROL_LINE_MAX
    )]
    LineTooLong,
    /// The host closed the control channel before sending a job.
    #[error("the host sent no job")]
    NoJob,
    /// The control channel ended before the host said the network is off.
    #[error("the host did not say `offline` after the fetch")]
    NoOffline,
    /// A loopback listener could not be started.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the store failed.
    #[error("store request {what} failed")]
    Store {
        /// What was asked.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store answered with an error status.
    #[error("store refused {what}: {status} {body}")]
    StoreStatus {
        /// What was asked.
        what: String,
        /// The status.
        status: StatusCode,
        /// The body, truncated.
        body: String,
    },
    /// Local file work failed.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The script could not be started.
    #[error("cannot start the script")]
    Spawn(#[source] std::io::Error),
    /// An artifact pattern matched nothing.
    #[error("artifact {pattern:?} matched no file")]
    ArtifactMissing {
        /// The pattern from the spec.
        pattern: String,
    },
    /// An artifact pattern is not a valid relative glob.
    #[error("artifact pattern {pattern:?} is invalid: {reason}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// An artifact's name is one the store cannot take.
    #[error("artifact {path} cannot be stored: {reason}; the store takes names of UTF-8 characters without a backslash (\\) or NUL byte")]
    ArtifactName {
        /// The path relative to the source root, escaped.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The store refused an artifact (a 4xx answer other than 413).
    #[error("the store refused artifact {path:?}: {status} {body}")]
    ArtifactRejected {
        /// The path relative to the source root.
        path: String,
        /// The status.
        status: StatusCode,
        /// The store's answer, truncated.
        body: String,
    },
    /// The artifact patterns name more files than a build may report.
    #[error("the artifact patterns name {count} files, more than {max} (MAX_REPORTED_ARTIFACTS)", max = MAX_REPORTED_ARTIFACTS)]
    TooManyArtifacts {
        /// How many.
        count: usize,
    },
    /// The tunnel failed.
    #[error("tunnel failed")]
    Tunnel(#[source] tunnel::TunnelError),
}

impl AgentError {
    /// The machine-readable code sent to the host.
    fn code(&self) -> &'static str {
        match self {
            AgentError::ArtifactMissing { .. } | AgentError::BadPattern { .. } => {
                "artifact_missing"
            }
            AgentError::ArtifactName { .. } => "artifact_name",
            AgentError::ArtifactRejected { .. } => "artifact_rejected",
            AgentError::TooManyArtifacts { .. } => "too_many_artifacts",
            AgentError::StoreStatus { status, .. } if *status == StatusCode::PAYLOAD_TOO_LARGE => {
                "limit_max_artifacts"
            }
            AgentError::Store { .. } | AgentError::StoreStatus { .. } => "store",
            AgentError::Spawn(_) => "spawn",
            _ => "agent",
        }
    }
}

/// The agent's whole life: returns when it has said `done` (or cannot talk to the host).
pub async fn serve() -> Result<(), AgentError> {
    let control =
        crate::guest::port::open(CONTROL_PORT, PORT_WAIT).map_err(|source| AgentError::Port {
            name: CONTROL_PORT,
            source,
        })?;
    let tunnel_io =
        crate::guest::port::open(TUNNEL_PORT, PORT_WAIT).map_err(|source| AgentError::Port {
            name: TUNNEL_PORT,
            source,
        })?;
    let (read_half, control_out) = tokio::io::split(control);
    let out: ControlOut = Arc::new(tokio::sync::Mutex::new(control_out));
    // The reader answers the host's `hello`; this VM may be saved while it waits here,
    // and restored many times, each time for another host.
    let done = Arc::new(AtomicBool::new(false));
    let (job_tx, job_rx) = tokio::sync::oneshot::channel();
    let (shell_tx, shell_rx) = tokio::sync::oneshot::channel();
    let (offline_tx, offline_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(read_host(
        BufReader::new(read_half),
        out.clone(),
        done.clone(),
        Channels {
            job: job_tx,
            shell: shell_tx,
            offline: offline_tx,
        },
    ));
    let job = job_rx.await.map_err(|_| AgentError::NoJob)??;
    crate::guest::fresh::wake(&job);
    // The tunnel session begins with the job: nothing of it exists in a saved VM.
    let (opener, _, _) = tunnel::spawn(tunnel_io, Side::Guest);

    let result = run_job(&job, &opener, &out, offline_rx).await;
    if let Err(err) = &result {
        let chain = contractor_protocol::result::error_chain(err);
        say(
            &out,
            &GuestMessage::Error {
                code: err.code().into(),
                chain,
            },
        )
        .await?;
    }
    // No pong after `done`: the host stops pinging there, and a kept VM's port carries
    // only what the shell protocol expects.
    done.store(true, Ordering::SeqCst);
    say(&out, &GuestMessage::Done).await?;
    let succeeded = matches!(result, Ok(true));
    let keep = match job.keep {
        Some(Keep::Always) => true,
        Some(Keep::OnFailure) => !succeeded,
        None => false,
    };
    if !keep {
        return Ok(());
    }
    // The reader hands over the `shell` request with the rest of the channel.
    let Ok(shell) = shell_rx.await else {
        return Ok(());
    };
    let mut writer = out.lock().await;
    crate::guest::shell::serve(shell, &mut *writer, &job).await
}

/// The control channel's writing half, shared by the job and the reader's pongs; each
/// message is written whole under the lock.
type ControlOut = Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio::io::DuplexStream>>>;

/// A `shell` request and the control channel's reading half (with what it has buffered).
pub(crate) struct ShellRequest {
    /// Terminal width.
    pub cols: u16,
    /// Terminal height.
    pub rows: u16,
    /// `TERM`.
    pub term: Option<String>,
    /// The rest of the host's bytes.
    pub input: ControlLines,
}

/// Where the control channel's reader hands what the host sends.
struct Channels {
    job: tokio::sync::oneshot::Sender<Result<Job, AgentError>>,
    shell: tokio::sync::oneshot::Sender<ShellRequest>,
    offline: tokio::sync::oneshot::Sender<()>,
}

/// The one reader of the control channel: hands over the job and the host's `offline`,
/// answers pings until `done`, and after `done` hands over the first `shell` request with
/// the channel and stops.
async fn read_host(
    mut lines: ControlLines,
    out: ControlOut,
    done: Arc<AtomicBool>,
    channels: Channels,
) {
    let Channels {
        job: job_tx,
        shell: shell_tx,
        offline: offline_tx,
    } = channels;
    let mut job_tx = Some(job_tx);
    let mut offline_tx = Some(offline_tx);
    loop {
        let line = match host_line(&mut lines).await {
            Ok(Some(line)) => line,
            Ok(None) => {
                if let Some(tx) = job_tx.take() {
                    let _ = tx.send(Err(AgentError::NoJob));
                }
                return;
            }
            Err(err) => {
                match job_tx.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(err));
                    }
                    None => eprintln!("contractor-agent: the control channel failed: {err}"),
                }
                return;
            }
        };
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<HostMessage>(&line) {
            Ok(HostMessage::Job { job, .. }) => {
                if let Some(tx) = job_tx.take() {
                    let _ = tx.send(Ok(*job));
                }
            }
            Ok(HostMessage::Hello { .. }) => {
                if job_tx.is_some() {
                    let mut writer = out.lock().await;
                    let hello = GuestMessage::Hello {
                        version: PROTOCOL_VERSION,
                        agent_version: AGENT_VERSION.into(),
                    };
                    if let Err(err) = send(&mut *writer, &hello).await {
                        eprintln!("contractor-agent: cannot answer hello: {err}");
                    }
                }
            }
            Ok(HostMessage::Offline) => {
                if let Some(tx) = offline_tx.take() {
                    let _ = tx.send(());
                }
            }
            Ok(HostMessage::Ping { seq }) => {
                if job_tx.is_none() && !done.load(Ordering::SeqCst) {
                    let mut writer = out.lock().await;
                    let _ = send(&mut *writer, &GuestMessage::Pong { seq }).await;
                }
            }
            // Only a kept VM, after `done`, opens a shell.
            Ok(HostMessage::Shell { cols, rows, term }) => {
                if done.load(Ordering::SeqCst) {
                    let _ = shell_tx.send(ShellRequest {
                        cols,
                        rows,
                        term,
                        input: lines,
                    });
                    return;
                }
            }
            Err(err) => {
                if let Some(tx) = job_tx.take() {
                    let _ = tx.send(Err(AgentError::BadJob(err)));
                    return;
                }
                // After the job, a line that is not a message is skipped (a shell client
                // may have left bytes behind).
            }
        }
    }
}

/// Sends one message under the lock.
async fn say(out: &ControlOut, message: &GuestMessage) -> Result<(), AgentError> {
    let mut writer = out.lock().await;
    send(&mut *writer, message).await
}

/// Runs the job; returns whether the script succeeded.
async fn run_job(
    job: &Job,
    opener: &Opener,
    control: &ControlOut,
    offline: tokio::sync::oneshot::Receiver<()>,
) -> Result<bool, AgentError> {
    let gate = Gate::new(GUEST_CONNECTIONS_MAX, GUEST_WAITING_MAX);
    forward(GUEST_PROXY_PORT, TunnelTarget::Proxy, opener, gate.clone()).await?;
    forward(GUEST_STORE_PORT, TunnelTarget::Store, opener, gate).await?;

    say(
        control,
        &GuestMessage::Phase {
            phase: Phase::Source,
        },
    )
    .await?;
    let token = job.store_token.as_deref();
    fetch_source(opener, &job.source, token, Path::new(WORK_DIR)).await?;
    if let Some(cache) = &job.cache {
        restore_cache(opener, cache, token).await;
    }
    if let Some(pem) = &job.ca_certificate {
        trust_build_authority(pem);
    }

    let log = Log::open(opener).await?;
    if let Some(fetch) = &job.fetch {
        say(
            control,
            &GuestMessage::Phase {
                phase: Phase::Fetch,
            },
        )
        .await?;
        let (code, signal) = run_command(fetch, job, &log).await?;
        say(control, &GuestMessage::FetchExited { code, signal }).await?;
        if code != Some(0) {
            log.close().await;
            return Ok(false);
        }
    }
    say(
        control,
        &GuestMessage::Phase {
            phase: Phase::Script,
        },
    )
    .await?;
    if job.fetch.is_some() {
        // The host cuts the network between the two, and says so.
        offline.await.map_err(|_| AgentError::NoOffline)?;
    }
    let oom_before = oom_kills();
    let ran = run_command(&job.script, job, &log).await;
    log.close().await;
    let (code, signal) = ran?;
    let exited = GuestMessage::ScriptExited {
        code,
        signal,
        oom_kills: oom_kills().saturating_sub(oom_before),
        disk_full: disk_full(Path::new(WORK_DIR)),
    };
    say(control, &exited).await?;
    if let (Some(cache), Some(0)) = (&job.cache, code) {
        save_cache(opener, cache, token).await;
    }

    if code == Some(0) && !job.artifacts.is_empty() {
        upload_artifacts(job, opener, control).await?;
    }
    Ok(code == Some(0))
}

/// The artifacts phase: uploads the job's artifacts to the store, a few at a time (each is
/// its own tunnel stream and store request, so that both vCPUs and the host work at once),
/// each reported in the order of the files.
async fn upload_artifacts(
    job: &Job,
    opener: &Opener,
    control: &ControlOut,
) -> Result<(), AgentError> {
    let token = job.store_token.as_deref();
    say(
        control,
        &GuestMessage::Phase {
            phase: Phase::Artifacts,
        },
    )
    .await?;
    let files = artifact_files(Path::new(WORK_DIR), &job.artifacts)?;
    let uploads = files.into_iter().map(|(path, relative)| async move {
        let size = upload(
            opener,
            &path,
            &format!("{}{}", job.artifacts_dest, relative),
            token,
        )
        .await
        .map_err(|err| match err {
            AgentError::StoreStatus { status, body, .. }
                if status.is_client_error() && status != StatusCode::PAYLOAD_TOO_LARGE =>
            {
                AgentError::ArtifactRejected {
                    path: relative.clone(),
                    status,
                    body,
                }
            }
            other => other,
        })?;
        Ok::<_, AgentError>((relative, size))
    });
    let mut uploaded = futures::stream::iter(uploads).buffered(PARALLEL_UPLOADS);
    while let Some(done) = uploaded.next().await {
        let (relative, size) = done?;
        say(
            control,
            &GuestMessage::Artifact {
                path: relative,
                size,
            },
        )
        .await?;
    }
    Ok(())
}

/// How many processes the kernel has killed for lack of memory since boot
/// (`oom_kill` in /proc/vmstat; 0 when it cannot be read).
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|text| parse_vmstat(&text, "oom_kill"))
        .unwrap_or(0)
}

fn parse_vmstat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// Whether the file system holding `dir` is out of space or inodes for an ordinary user
/// of it (less than 1 MiB or no inode left).
fn disk_full(dir: &Path) -> bool {
    let Ok(stats) = nix::sys::statvfs::statvfs(dir) else {
        return false;
    };
    let free = stats
        .blocks_available()
        .saturating_mul(stats.fragment_size());
    free < (1 << 20) || (stats.files() > 0 && stats.files_available() == 0)
}

pub(crate) async fn send<W: AsyncWrite + Unpin>(
    out: &mut W,
    message: &GuestMessage,
) -> Result<(), AgentError> {
    let mut line = serde_json::to_vec(message).map_err(|e| AgentError::Control(e.into()))?;
    line.push(b'\n');
    out.write_all(&line).await.map_err(AgentError::Control)?;
    out.flush().await.map_err(AgentError::Control)
}

type ControlLines = BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>;

/// The host's next line, read within [`CONTROL_LINE_MAX`]; `None` at the end.
pub(crate) async fn host_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut R,
) -> Result<Option<Vec<u8>>, AgentError> {
    match read_line(lines, CONTROL_LINE_MAX)
        .await
        .map_err(AgentError::Control)?
    {
        Line::Text(line) => Ok(Some(line)),
        Line::End => Ok(None),
        Line::TooLong => Err(AgentError::LineTooLong),
    }
}

/// Most guest connections to the proxy and store ports carried at once: 496
/// (`MAX_TUNNEL_STREAMS` less [`AGENT_RESERVED_STREAMS`]). While that many are carried, the
/// next ones are accepted and wait, in the order they came, for one to close.
pub const GUEST_CONNECTIONS_MAX: usize = crate::tunnel::MAX_TUNNEL_STREAMS - AGENT_RESERVED_STREAMS;
/// Most guest connections waiting for one of the [`GUEST_CONNECTIONS_MAX`] to close: 1,024
/// (an open socket each). One more is answered `503 Service Unavailable` at once and
/// closed. npm 9 behind a proxy opens a tunnel per request with no cap of its own: a
/// burst of a thousand is common, and refusing the ones over the bound failed its install.
pub const GUEST_WAITING_MAX: usize = 1024;
/// Tunnel streams kept for the agent's own work (the log, the source, the artifacts): 16.
pub const AGENT_RESERVED_STREAMS: usize = 16;
/// How long an accept loop pauses after an error such as EMFILE before it accepts again:
/// 100 ms.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds of the guest's connections to the proxy and store ports, both ports
/// together: a connection takes a place when it is accepted and a slot when it is carried.
#[derive(Clone)]
struct Gate {
    /// Connections carried over the tunnel.
    slots: Arc<tokio::sync::Semaphore>,
    /// Connections accepted: carried or waiting for a slot.
    places: Arc<tokio::sync::Semaphore>,
}

impl Gate {
    fn new(carried: usize, waiting: usize) -> Gate {
        Gate {
            slots: Arc::new(tokio::sync::Semaphore::new(carried)),
            places: Arc::new(tokio::sync::Semaphore::new(carried + waiting)),
        }
    }
}

/// Serves a guest loopback port by carrying each connection over the tunnel to `target`,
/// at most [`GUEST_CONNECTIONS_MAX`] at once and [`GUEST_WAITING_MAX`] waiting (`gate`).
async fn forward(
    port: u16,
    target: TunnelTarget,
    opener: &Opener,
    gate: Gate,
) -> Result<(), AgentError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    let opener = opener.clone();
    tokio::spawn(async move {
        loop {
            let mut client = match listener.accept().await {
                Ok((client, _)) => client,
                // Out of descriptors (EMFILE, ENFILE) or a connection gone before it was
                // taken: pause briefly and keep serving.
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(place) = gate.places.clone().try_acquire_owned() else {
                tokio::spawn(async move {
                    let _ = client.write_all(refusal(target).as_bytes()).await;
                    let _ = client.shutdown().await;
                });
                continue;
            };
            let (opener, slots) = (opener.clone(), gate.slots.clone());
            tokio::spawn(async move {
                // Slots go to waiting connections in the order they came (tokio's semaphore
                // is fair); the semaphore is never closed.
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                let _place = place;
                carry(client, target, &opener).await;
            });
        }
    });
    Ok(())
}

/// Carries one guest connection over a new tunnel stream to `target`.
async fn carry(mut client: tokio::net::TcpStream, target: TunnelTarget, opener: &Opener) {
    match opener.open(target).await {
        Ok(mut stream) => {
            tunnel::copy_both_ways(&mut client, &mut stream).await;
        }
        Err(err) => {
            let _ = client
                .write_all(
                    unavailable(&format!("the tunnel refused the connection: {err}")).as_bytes(),
                )
                .await;
        }
    }
}

/// The answer to a connection beyond [`GUEST_WAITING_MAX`] waiting ones.
fn refusal(target: TunnelTarget) -> String {
    let what = match target {
        TunnelTarget::Store => "store",
        _ => "proxy",
    };
    unavailable(&format!(
        "contractor: too many connections: the build holds {GUEST_CONNECTIONS_MAX} connections to the proxy and the store (GUEST_CONNECTIONS_MAX) and {GUEST_WAITING_MAX} more wait for one of them (GUEST_WAITING_MAX); this {what} connection was refused"
    ))
}

/// An `HTTP/1.1 503` response with `message` as its body.
fn unavailable(message: &str) -> String {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One HTTP/1.1 request to the store over a fresh tunnel stream, with the build's token.
async fn store_request<B>(
    opener: &Opener,
    mut request: Request<B>,
    token: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, Box<dyn std::error::Error + Send + Sync>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(token) = token {
        let value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        request
            .headers_mut()
            .insert(hyper::header::AUTHORIZATION, value);
    }
    let stream = opener.open(TunnelTarget::Store).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}

async fn check_status(
    what: &str,
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(AgentError::StoreStatus {
        what: what.to_string(),
        status,
        body: String::from_utf8_lossy(&body).chars().take(300).collect(),
    })
}

async fn fetch_source(
    opener: &Opener,
    source: &str,
    token: Option<&str>,
    dest: &Path,
) -> Result<(), AgentError> {
    let tar_path = PathBuf::from("/var/tmp/contractor-source.tar");
    download(opener, source, token, &tar_path).await?;
    unpack(&tar_path, dest).await
}

/// GETs store path `source` into the file `path`.
async fn download(
    opener: &Opener,
    source: &str,
    token: Option<&str>,
    path: &Path,
) -> Result<(), AgentError> {
    let what = format!("GET {source}");
    let store_err = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Store {
        what: what.clone(),
        source,
    };
    let request = Request::get(source)
        .header(hyper::header::HOST, format!("127.0.0.1:{GUEST_STORE_PORT}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| store_err(e.into()))?;
    let response = store_request(opener, request, token)
        .await
        .map_err(store_err)?;
    let mut body = check_status(&what, response).await?.into_body();

    let file_err = |what, source| AgentError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| file_err("cannot create", e))?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| store_err(e.into()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .await
                .map_err(|e| file_err("cannot write", e))?;
        }
    }
    file.flush().await.map_err(|e| file_err("cannot write", e))
}

/// Unpacks the tar at `tar_path` into `dest` (modes, owners and times kept), then deletes
/// the tar.
async fn unpack(tar_path: &Path, dest: &Path) -> Result<(), AgentError> {
    let file_err = |source| AgentError::File {
        what: "cannot unpack",
        path: tar_path.to_path_buf(),
        source,
    };
    let dest = dest.to_path_buf();
    let unpack_path = tar_path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dest)?;
        let mut archive = tar::Archive::new(std::fs::File::open(&unpack_path)?);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.unpack(&dest)?;
        std::fs::remove_file(&unpack_path)
    })
    .await
    .map_err(|e| file_err(std::io::Error::other(e)))?
    .map_err(file_err)
}

/// Puts the cached directories of an earlier build back. A cache that cannot be restored is
/// not the build's failure: the build runs without it (the console says why).
async fn restore_cache(opener: &Opener, cache: &CacheJob, token: Option<&str>) {
    let Some(source) = &cache.restore else { return };
    let tar_path = Path::new("/var/tmp/contractor-cache.tar");
    let restored = match download(opener, source, token, tar_path).await {
        Ok(()) => unpack(tar_path, Path::new("/")).await,
        Err(err) => Err(err),
    };
    if let Err(err) = restored {
        let _ = std::fs::remove_file(tar_path);
        eprintln!(
            "contractor-agent: the cache was not restored: {}",
            contractor_protocol::result::joined_chain(&err)
        );
    }
}

/// Packs the cached directories that exist and uploads them, unless the tar is bigger than
/// the cache's limit. Failures leave the build as it is (the console says why).
async fn save_cache(opener: &Opener, cache: &CacheJob, token: Option<&str>) {
    let tar_path = PathBuf::from("/var/tmp/contractor-cache-new.tar");
    let paths = cache.paths.clone();
    let out = tar_path.clone();
    let packed = tokio::task::spawn_blocking(move || pack_dirs(&paths, &out))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let outcome = match packed {
        Ok(size) if size > cache.max_bytes => Err(format!(
            "the packed cache has {size} bytes, more than cache.max_size ({} bytes)",
            cache.max_bytes
        )),
        Ok(_) => upload(opener, &tar_path, &cache.save, token)
            .await
            .map(|_| ())
            .map_err(|e| contractor_protocol::result::joined_chain(&e)),
        Err(err) => Err(format!("cannot pack the cache: {err}")),
    };
    let _ = std::fs::remove_file(&tar_path);
    if let Err(reason) = outcome {
        eprintln!("contractor-agent: the cache was not saved: {reason}");
    }
}

/// Writes a tar of the directories among `paths` that exist (symlinks stored as links, not
/// followed; names relative to `/`) to `out`. Returns its size.
fn pack_dirs(paths: &[String], out: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::create(out)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    for path in paths {
        let dir = Path::new(path);
        let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
        if is_dir {
            builder.append_dir_all(path.trim_start_matches('/'), dir)?;
        }
    }
    builder
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(std::fs::metadata(out)?.len())
}

/// The script's environment: a clean one, with the proxy and the store.
/// Where the build authority's certificate is written (Debian's place for local
/// authorities; `update-ca-certificates` would keep it).
pub(crate) const BUILD_CA_FILE: &str = "/usr/local/share/ca-certificates/contractor-build.crt";
/// The system's bundle, which the build authority is appended to.
pub(crate) const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Adds the build proxy's authority to the guest's trust: its own file, and the end of
/// the system bundle that OpenSSL, curl, git, cargo, pip and apt read. A failure is said on
/// the console and the build goes on (its TLS then fails, naming the certificate).
fn trust_build_authority(pem: &str) {
    use std::io::Write;
    let written = std::fs::create_dir_all("/usr/local/share/ca-certificates")
        .and_then(|()| std::fs::write(BUILD_CA_FILE, pem))
        .and_then(|()| std::fs::create_dir_all("/etc/ssl/certs"))
        .and_then(|()| {
            let mut bundle = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(CA_BUNDLE)?;
            bundle.write_all(b"\n")?;
            bundle.write_all(pem.as_bytes())
        });
    if let Err(e) = written {
        eprintln!("contractor-agent: cannot add the build authority to the trust store: {e}");
    }
}

pub(crate) fn script_env(job: &Job) -> BTreeMap<String, String> {
    let proxy = format!("http://127.0.0.1:{GUEST_PROXY_PORT}");
    let mut env: BTreeMap<String, String> = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
        ("no_proxy", "127.0.0.1,localhost"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for key in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        env.insert(key.into(), proxy.clone());
    }
    env.insert(
        "CONTRACTOR_STORE".into(),
        format!("http://127.0.0.1:{GUEST_STORE_PORT}"),
    );
    if let Some(token) = &job.store_token {
        env.insert("CONTRACTOR_STORE_TOKEN".into(), token.clone());
    }
    if job.ca_certificate.is_some() {
        // The clients that do not read the system bundle by themselves, pointed at it.
        for key in [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "CARGO_HTTP_CAINFO",
            "PIP_CERT",
            "REQUESTS_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            env.insert(key.into(), CA_BUNDLE.into());
        }
        env.insert("NODE_EXTRA_CA_CERTS".into(), BUILD_CA_FILE.into());
    }
    env.extend(job.env.clone());
    env
}

/// The build's output on its way to the host: one log stream for the whole job (the host
/// takes only the first), fed by each command through [`Log::sender`].
struct Log {
    chunks: tokio::sync::mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<()>,
}

impl Log {
    /// Opens the log stream. It is open before any command runs, so that no connection of a
    /// command's can stand in its way.
    async fn open(opener: &Opener) -> Result<Log, AgentError> {
        let mut log = opener
            .open(TunnelTarget::Log)
            .await
            .map_err(AgentError::Tunnel)?;
        let (chunks, mut received) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let writer = tokio::spawn(async move {
            while let Some(chunk) = received.recv().await {
                if log.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = log.shutdown().await;
        });
        Ok(Log { chunks, writer })
    }

    /// Ends the stream once what was sent is written (at most [`OUTPUT_GRACE`]).
    async fn close(self) {
        drop(self.chunks);
        let _ = tokio::time::timeout(OUTPUT_GRACE, self.writer).await;
    }
}

/// Runs `sh -e -c COMMAND` (the job's `fetch` or `script`) with the script's environment;
/// its stdout and stderr, interleaved as written, go to `log`. Returns the exit code or
/// the signal.
async fn run_command(
    command_text: &str,
    job: &Job,
    log: &Log,
) -> Result<(Option<i32>, Option<i32>), AgentError> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;

    let (mut output, writer) = std::io::pipe().map_err(AgentError::Spawn)?;
    let mut child = {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-e")
            .arg("-c")
            .arg(command_text)
            .current_dir(WORK_DIR)
            .env_clear()
            .envs(script_env(job))
            .stdin(Stdio::null())
            .stdout(writer.try_clone().map_err(AgentError::Spawn)?)
            .stderr(writer);
        command.spawn().map_err(AgentError::Spawn)?
        // `command` drops here, closing our copies of the pipe's write end.
    };

    let chunks = log.chunks.clone();
    let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 || chunks.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
        let _ = drained_tx.send(());
    });

    let status = child.wait().await.map_err(AgentError::Spawn)?;
    // Background processes may hold the pipe open; do not wait for them for long.
    let _ = tokio::time::timeout(OUTPUT_GRACE, drained).await;
    Ok((status.code(), status.signal()))
}

/// The files the artifact patterns name, with their paths relative to `root`. Directories
/// contribute every file below them.
fn artifact_files(root: &Path, patterns: &[String]) -> Result<Vec<(PathBuf, String)>, AgentError> {
    let mut files = Vec::new();
    for pattern in patterns {
        let bad = |reason: &str| AgentError::BadPattern {
            pattern: pattern.clone(),
            reason: reason.into(),
        };
        if pattern.starts_with('/') || pattern.split('/').any(|part| part == "..") {
            return Err(bad(
                "it must be relative to the source root and stay inside it",
            ));
        }
        let full = format!("{}/{}", root.display(), pattern);
        let matches = glob::glob(&full).map_err(|e| bad(&e.to_string()))?;
        let before = files.len();
        for path in matches.flatten() {
            collect_files(&path, &mut files);
        }
        if files.len() == before {
            return Err(AgentError::ArtifactMissing {
                pattern: pattern.clone(),
            });
        }
    }
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for path in files {
        if let Ok(relative) = path.strip_prefix(root) {
            let relative = artifact_name(relative)?;
            if seen.insert(relative.clone()) {
                out.push((path.clone(), relative));
            }
        }
    }
    if out.len() > MAX_REPORTED_ARTIFACTS {
        return Err(AgentError::TooManyArtifacts { count: out.len() });
    }
    Ok(out)
}

/// The store path of an artifact, exactly its name: refused (never renamed) when the
/// store could not take it (contractor-store's path rules: UTF-8, no `\\`, no NUL).
fn artifact_name(relative: &Path) -> Result<String, AgentError> {
    let bad = |reason| AgentError::ArtifactName {
        path: format!("{relative:?}"),
        reason,
    };
    let name = relative
        .to_str()
        .ok_or_else(|| bad("its name is not UTF-8"))?;
    if name.contains('\\') {
        return Err(bad("its name holds a backslash"));
    }
    if name.contains('\0') {
        return Err(bad("its name holds a NUL byte"));
    }
    Ok(name.to_string())
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_file() {
        files.push(path.to_path_buf());
    } else if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            children.sort();
            for child in children {
                collect_files(&child, files);
            }
        }
    }
}

/// PUTs one file to the store, streaming it. Returns its size.
async fn upload(
    opener: &Opener,
    path: &Path,
    dest: &str,
    token: Option<&str>,
) -> Result<u64, AgentError> {
    let file_err = |what, source| AgentError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| file_err("cannot open artifact", e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| file_err("cannot read artifact", e))?;
    let size = meta.len();
    let executable = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
    let url = utf8_percent_encode(dest, PATH_ESCAPES).to_string();
    let what = format!("PUT {dest}");
    let store_err = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Store {
        what: what.clone(),
        source,
    };
    // Big reads: each read of a tokio file is a trip to a blocking thread, and each chunk
    // one HTTP frame and one tunnel frame (ReaderStream's own default is 4 KiB).
    let body = StreamBody::new(
        tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK).map_ok(Frame::data),
    );
    let request = Request::put(url)
        .header(hyper::header::HOST, format!("127.0.0.1:{GUEST_STORE_PORT}"))
        .header(hyper::header::CONTENT_LENGTH, size)
        .header("x-content-mode", if executable { "0755" } else { "0644" })
        .body(body)
        .map_err(|e| store_err(e.into()))?;
    let response = store_request(opener, request, token)
        .await
        .map_err(store_err)?;
    check_status(&what, response).await?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves a free loopback port with `gate`; returns the port and the host's end of
    /// the tunnel (each carried connection arrives there as a stream).
    async fn served(
        gate: Gate,
    ) -> (
        u16,
        tokio::sync::mpsc::UnboundedReceiver<tunnel::TunnelStream>,
    ) {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _, _) = tunnel::spawn(guest_io, Side::Guest);
        let (_, inbound, _) = tunnel::spawn(host_io, Side::Host);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        forward(port, TunnelTarget::Proxy, &opener, gate)
            .await
            .expect("forward");
        (port, inbound)
    }

    #[tokio::test]
    async fn a_connection_beyond_the_carried_and_waiting_ones_gets_a_503_naming_both_bounds() {
        let (port, _inbound) = served(Gate::new(0, 0)).await;
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut client, &mut answer)
            .await
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("GUEST_CONNECTIONS_MAX"), "{answer}");
        assert!(answer.contains("GUEST_WAITING_MAX"), "{answer}");
    }

    #[tokio::test]
    async fn a_connection_over_the_carried_bound_waits_and_is_carried_when_one_closes() {
        let (port, mut inbound) = served(Gate::new(1, 1)).await;
        let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
        let first = connect().await.expect("connect");
        let carried = inbound.recv().await.expect("the first is carried");
        let mut second = connect().await.expect("connect");
        // The third finds the one waiting place taken: refused at once.
        let mut third = connect().await.expect("connect");
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut third, &mut answer)
            .await
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        // The second waits, unanswered and not carried, until the first closes.
        assert!(inbound.try_recv().is_err(), "carried beyond the bound");
        drop(first);
        drop(carried);
        let mut stream = inbound.recv().await.expect("the second is carried");
        tokio::io::AsyncWriteExt::write_all(&mut second, b"after")
            .await
            .expect("write");
        let mut got = [0u8; 6];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut got)
            .await
            .expect("read");
        assert_eq!(&got[1..], b"after", "the target byte, then the bytes");
    }

    #[test]
    fn oom_kills_are_read_from_vmstat() {
        let text = "pgfault 12\noom_kill_extra 9\noom_kill 3\nswap_ra 1\n";
        assert_eq!(parse_vmstat(text, "oom_kill"), Some(3));
        assert_eq!(parse_vmstat("nr_free_pages 1\n", "oom_kill"), None);
        assert_eq!(parse_vmstat("oom_kill x\n", "oom_kill"), None);
    }

    #[test]
    fn cached_directories_pack_relative_to_the_root_and_unpack_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("reg/sub")).expect("mkdir");
        std::fs::write(root.join("reg/sub/crate.txt"), b"cached").expect("write");
        std::os::unix::fs::symlink("sub/crate.txt", root.join("reg/link")).expect("symlink");
        let tar = dir.path().join("cache.tar");
        let reg = root.join("reg").to_string_lossy().into_owned();
        let missing = root.join("missing").to_string_lossy().into_owned();
        let size = pack_dirs(&[reg.clone(), missing], &tar).expect("pack");
        assert_eq!(size, std::fs::metadata(&tar).expect("tar").len());

        let out = dir.path().join("out");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(unpack(&tar, &out)).expect("unpack");
        let back = out.join(reg.trim_start_matches('/'));
        assert_eq!(
            std::fs::read(back.join("sub/crate.txt")).expect("file"),
            b"cached"
        );
        assert_eq!(
            std::fs::read_link(back.join("link")).expect("link"),
            Path::new("sub/crate.txt")
        );
        assert!(!tar.exists(), "the tar is deleted once unpacked");
    }

    #[test]
    fn a_file_system_with_room_is_not_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The test machine's temporary directory has more than 1 MiB free.
        assert!(!disk_full(dir.path()));
    }

    #[test]
    fn artifact_patterns_expand_to_files_relative_to_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("out/sub")).expect("mkdir");
        std::fs::write(root.join("hello"), b"x").expect("write");
        std::fs::write(root.join("out/a.txt"), b"a").expect("write");
        std::fs::write(root.join("out/sub/b.txt"), b"b").expect("write");
        let files = artifact_files(root, &["hello".into(), "out".into(), "out/*.txt".into()])
            .expect("patterns");
        let names: Vec<&str> = files.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(names, ["hello", "out/a.txt", "out/sub/b.txt"]);
    }

    #[test]
    fn a_pattern_that_matches_nothing_or_escapes_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = artifact_files(dir.path(), &["missing".into()]).expect_err("nothing matches");
        assert_eq!(err.code(), "artifact_missing");
        assert!(err.to_string().contains("\"missing\""), "{err}");
        let err = artifact_files(dir.path(), &["../etc/passwd".into()]).expect_err("escapes");
        assert!(err.to_string().contains("stay inside"), "{err}");
    }

    #[test]
    fn artifacts_the_store_cannot_take_fail_by_name_and_are_never_renamed() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a\\b"), b"x").expect("write");
        let err = artifact_files(dir.path(), &["a*".into()]).expect_err("backslash");
        assert_eq!(err.code(), "artifact_name");
        assert!(err.to_string().contains(r#""a\\b""#), "{err}");
        assert!(err.to_string().contains("backslash"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let name = std::ffi::OsStr::from_bytes(b"n\xffme");
        std::fs::create_dir(dir.path().join("out")).expect("mkdir");
        std::fs::write(dir.path().join("out").join(name), b"x").expect("write");
        let err = artifact_files(dir.path(), &["out".into()]).expect_err("not UTF-8");
        assert_eq!(err.code(), "artifact_name");
        assert!(err.to_string().contains(r"n\xFFme"), "{err}");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn the_script_environment_points_at_the_tunnel_and_keeps_job_overrides() {
        let mut job = Job {
            script: "true".into(),
            fetch: None,
            env: BTreeMap::new(),
            source: "/s".into(),
            artifacts: vec![],
            artifacts_dest: "/a/".into(),
            store_token: Some("t0k3n-0123456789abcdef".into()),
            cache: None,
            host_time: None,
            entropy: None,
            keep: None,
            ca_certificate: None,
        };
        job.env.insert("HOME".into(), "/build".into());
        let env = script_env(&job);
        assert_eq!(env["https_proxy"], "http://127.0.0.1:3128");
        assert_eq!(env["CONTRACTOR_STORE"], "http://127.0.0.1:8480");
        assert_eq!(env["CONTRACTOR_STORE_TOKEN"], "t0k3n-0123456789abcdef");
        assert_eq!(env["HOME"], "/build");
        assert!(
            !env.contains_key("SSL_CERT_FILE"),
            "no authority, no override"
        );

        // With the build authority, the clients are pointed at the bundle that holds it;
        // what the job sets itself still wins.
        job.ca_certificate = Some("-----BEGIN CERTIFICATE-----\n".into());
        job.env.insert("PIP_CERT".into(), "/mine.pem".into());
        let env = script_env(&job);
        assert_eq!(env["CARGO_HTTP_CAINFO"], CA_BUNDLE);
        assert_eq!(env["SSL_CERT_FILE"], CA_BUNDLE);
        assert_eq!(env["NODE_EXTRA_CA_CERTS"], BUILD_CA_FILE);
        assert_eq!(env["PIP_CERT"], "/mine.pem");
    }
}
