//! The proxy's side of its dialer: [`spawn`] starts it before the proxy confines itself,
//! [`Dialer`] sends it requests from the runtime and hands each answer (and the socket that
//! comes with a connection) to the request that waits for it.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, send, socketpair, sockopt, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::{
    receive, Answer, DialerError, Request, Settings, MAX_MESSAGE, READY, READY_TIMEOUT_SECS,
    SETTINGS_CHUNK, SUBCOMMAND,
};
use crate::policy::{Resolution, Resolver};

/// A started dialer, before the proxy's runtime runs: its process and the proxy's end of
/// the socket ([`Dialer::start`] takes it over inside the runtime).
#[derive(Debug)]
pub struct Spawned {
    /// The dialer process (it exits when the socket closes).
    pub child: Child,
    /// The proxy's end of the socket pair.
    pub socket: OwnedFd,
}

/// Starts `program` (this binary: `/proc/self/exe`) as a dialer with the socket on its
/// stdin, passes it its `settings` and waits until it says it is confined and ready (so a
/// proxy never serves without its dialer). Call before confining the proxy (which may then
/// execute nothing) and before any thread starts.
pub fn spawn(program: &Path, settings: &Settings) -> Result<Spawned, DialerError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(DialerError::SocketPair)?;
    let child = Command::new(program)
        .arg0("contractor-proxy-dialer")
        .arg(SUBCOMMAND)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| DialerError::Spawn(program.to_path_buf(), e))?;
    let json = serde_json::to_vec(settings).map_err(|e| DialerError::BadSettings(e.to_string()))?;
    send_settings(&ours, &json).map_err(DialerError::Settings)?;
    // The proxy serves only once its dialer is confined: a dialer that cannot confine itself
    // (its reason on stderr) stops the proxy from starting.
    nix::sys::socket::setsockopt(
        &ours,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(READY_TIMEOUT_SECS, 0),
    )
    .map_err(|e| DialerError::Settings(e.into()))?;
    let mut buf = [0_u8; READY.len()];
    match receive(&ours, &mut buf) {
        Ok(n) if buf[..n] == *READY => {}
        Ok(_) => return Err(DialerError::NotReady),
        Err(DialerError::Socket(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(DialerError::NotReady)
        }
        Err(e) => return Err(e),
    }
    Ok(Spawned {
        child,
        socket: ours,
    })
}

/// Sends the settings: their length, then chunks.
fn send_settings(socket: &OwnedFd, json: &[u8]) -> io::Result<()> {
    send(
        socket.as_raw_fd(),
        json.len().to_string().as_bytes(),
        MsgFlags::MSG_NOSIGNAL,
    )?;
    for chunk in json.chunks(SETTINGS_CHUNK) {
        let sent = send(socket.as_raw_fd(), chunk, MsgFlags::MSG_NOSIGNAL)?;
        if sent != chunk.len() {
            return Err(io::Error::other("the settings were cut short"));
        }
    }
    Ok(())
}

/// The proxy's side of a dialer: requests go out on the socket, and one task reads the
/// answers and hands each to the request that waits for it.
#[derive(Clone)]
pub struct Dialer(Arc<Handle>);

struct Handle {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Shared {
    /// The `SOCK_SEQPACKET` socket, driven through tokio's datagram type: the same calls
    /// (`send`, `recvmsg`) and readiness, with message boundaries kept.
    socket: tokio::net::UnixDatagram,
    pending: Mutex<Pending>,
    next: AtomicU64,
}

/// The requests waiting for an answer; `gone` once the dialer's socket closed.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Received>>,
    gone: bool,
}

/// An answer and the socket that came with it.
type Received = (Answer, Option<OwnedFd>);

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}

/// Removes a request's entry when it is answered or given up.
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.waiting.remove(&self.id);
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the proxy's dialer process has exited",
    )
}

impl Dialer {
    /// Takes over the proxy's end of a dialer's socket; call inside the runtime.
    pub fn start(socket: OwnedFd) -> io::Result<Dialer> {
        let socket = std::os::unix::net::UnixDatagram::from(socket);
        socket.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            pending: Mutex::default(),
            next: AtomicU64::new(1),
        });
        let reader = tokio::spawn(read_answers(Arc::clone(&shared)));
        Ok(Dialer(Arc::new(Handle { shared, reader })))
    }

    /// A [`Resolver`] that asks this dialer.
    pub fn resolver(&self) -> Resolver {
        let dialer = self.clone();
        Resolver::new(move |host, port| -> Resolution {
            let (dialer, host) = (dialer.clone(), host.to_string());
            Box::pin(async move { dialer.resolve(&host, port).await })
        })
    }

    /// The addresses of `host` on `port`, as the dialer resolves them.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let request = |id| Request::Resolve {
            id,
            host: host.to_string(),
            port,
        };
        match self.ask(request).await? {
            (Answer::Resolved { addrs, .. }, _) => Ok(addrs),
            (answer, _) => Err(failure(answer)),
        }
    }

    /// A TCP connection to `addr`, made and checked by the dialer within `timeout` (and its
    /// own connect timeout).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let request = |id| Request::Connect {
            id,
            addr,
            timeout_ms,
        };
        match self.ask(request).await? {
            (Answer::Connected { .. }, Some(fd)) => {
                let stream = TcpStream::from(fd);
                stream.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(stream)
            }
            (Answer::Connected { .. }, None) => Err(io::Error::other(
                "the dialer answered connected without a socket",
            )),
            (answer, _) => Err(failure(answer)),
        }
    }

    /// Sends the request made with a fresh id and waits for its answer.
    async fn ask(&self, request: impl FnOnce(u64) -> Request) -> io::Result<Received> {
        let shared = &self.0.shared;
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        let json = serde_json::to_vec(&request(id))?;
        if json.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a dialer request of {} bytes is over the limit of {MAX_MESSAGE}",
                    json.len()
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = shared.pending.lock().map_err(|_| gone())?;
            if pending.gone {
                return Err(gone());
            }
            pending.waiting.insert(id, tx);
        }
        let _waiting = Waiting { shared, id };
        shared
            .socket
            .async_io(Interest::WRITABLE, || {
                send(
                    shared.socket.as_raw_fd(),
                    &json,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)
            })
            .await?;
        rx.await.map_err(|_| gone())
    }
}

/// The error a failed answer stands for.
fn failure(answer: Answer) -> io::Error {
    match answer {
        Answer::Failed {
            timed_out: true,
            reason,
            ..
        } => io::Error::new(io::ErrorKind::TimedOut, reason),
        Answer::Failed {
            errno: Some(errno),
            reason,
            ..
        } => io::Error::new(io::Error::from_raw_os_error(errno).kind(), reason),
        Answer::Failed { reason, .. } => io::Error::other(reason),
        other => io::Error::other(format!("the dialer answered out of turn: {other:?}")),
    }
}

/// Reads answers until the dialer's socket closes, then fails every waiting request. Only
/// the socket's end (or its reset: the dialer is gone) ends the reading; any other error of
/// one message is that message's and reading goes on, so a moment without a free file
/// descriptor fails one connection, not the proxy.
async fn read_answers(shared: Arc<Shared>) {
    let mut buf = vec![0_u8; MAX_MESSAGE];
    loop {
        let received = shared
            .socket
            .async_io(Interest::READABLE, || {
                receive_answer(&shared.socket, &mut buf)
            })
            .await;
        match received {
            Ok(Some(received)) => {
                let id = received.0.id();
                let waiter = shared
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut pending| pending.waiting.remove(&id));
                // A request given up (timed out) drops its answer, and the socket with it.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(received);
                }
            }
            Ok(None) => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                eprintln!("contractor-proxy: reading the dialer's answer failed: {e}");
                // Whatever failed (memory, most likely) may take a moment to come back.
                tokio::time::sleep(RECEIVE_BACKOFF).await;
            }
        }
    }
    if let Ok(mut pending) = shared.pending.lock() {
        pending.gone = true;
        pending.waiting.clear();
    }
}

/// The pause after a failed read of the dialer's socket (not its end) before the next.
const RECEIVE_BACKOFF: Duration = Duration::from_millis(50);

/// One answer and its socket; `None` at end of file. An answer that does not parse is
/// skipped (its request then waits for its timeout). An answer whose socket the kernel
/// could not hand over (the proxy at its file limit: `MSG_CTRUNC`) fails its request with
/// that reason.
fn receive_answer(fd: &tokio::net::UnixDatagram, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let bytes = msg.bytes;
    let too_long = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let socket_lost = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    if !socket_lost {
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                fds.extend(raw.into_iter().map(crate::sys::own_received_fd));
            }
        }
    }
    if bytes == 0 && fds.is_empty() && !socket_lost {
        return Ok(None);
    }
    let [buf] = iov;
    if too_long {
        return Ok(Some((
            failed(0, "an answer over the size limit".to_string()),
            None,
        )));
    }
    let answer = match serde_json::from_slice::<Answer>(&buf[..bytes]) {
        Ok(answer) if socket_lost => failed(
            answer.id(),
            format!(
                "the proxy could not take the connected socket from its dialer: no free file \
                 descriptor (its limit, RLIMIT_NOFILE, is {})",
                open_file_limit()
            ),
        ),
        Ok(answer) => answer,
        Err(e) => failed(0, format!("an answer that does not parse: {e}")),
    };
    // At most one socket per answer; any other is closed here.
    Ok(Some((answer, fds.into_iter().next())))
}

/// A failed answer to request `id`.
fn failed(id: u64, reason: String) -> Answer {
    Answer::Failed {
        id,
        reason,
        errno: None,
        timed_out: false,
    }
}

/// This process's soft limit of open files, as text.
fn open_file_limit() -> String {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or_else(|e| format!("unknown: {e}"), |(soft, _)| soft.to_string())
}
