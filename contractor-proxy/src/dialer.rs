//! The dialer: the one process of the proxy that makes sockets. The address policy (no
//! loopback, private, link-local or otherwise restricted address unless an allowed network
//! covers it, never the proxy's own listening address, only the ports the rules can reach)
//! must hold even when a hostile client takes over the proxy process, and Landlock's TCP
//! rules cannot say it (they are per port). So before the proxy confines itself it starts
//! this small process (the same binary again, with the hidden [`SUBCOMMAND`]) over a Unix
//! `SOCK_SEQPACKET` socket pair, and then confines itself so that it can make no socket at
//! all. The dialer keeps the policy and answers two requests:
//!
//! - `resolve host port`: the addresses of a name that an allow rule (or a URL rule) covers
//!   on that port and no deny rule refuses; any other name is refused without a lookup, so
//!   a taken-over proxy cannot leak data through DNS queries for names of its choosing;
//! - `connect addr`: the address is checked again (restricted ranges, allowed networks, the
//!   proxy's own addresses, the ports), connected to within the connect timeout, and the
//!   connected socket handed back with `SCM_RIGHTS`; or the reason it was not.
//!
//! The invariant: every upstream socket the binary uses was checked and connected here.
//! The dialer serves at most [`WORKERS`] requests at once (one thread each); further
//! requests wait in the socket's queue, whose size the kernel bounds, and a proxy that floods it only waits for its own
//! answers. Each message is at most [`MAX_MESSAGE`] bytes; a resolution gives at most
//! [`MAX_ADDRESSES`] addresses. The dialer dies with the proxy: its socket reaches end of
//! file when the proxy exits, and it asks for `SIGKILL` when its parent dies.
//!
//! [`Dialer`] is the proxy's side; a library user who does not start one keeps resolving
//! and dialling in process ([`crate::ProxyConfig::dialer`] is `None`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, recv, recvmsg, send, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::address::canonical;
use crate::allowlist::Allowlist;
use crate::policy::{dials_itself, Denial, Mode, ProxyConfig, Resolution, Resolver};

/// The hidden first argument that makes `contractor-proxy` the dialer.
pub const SUBCOMMAND: &str = "__dialer";

/// Requests the dialer works on at once: one thread each. A resolution that hangs (a DNS
/// server that never answers, up to glibc's own timeouts) holds one of them; the rest go
/// on. 32 new upstream connections in flight is far above what a build opens at once.
pub const WORKERS: usize = 32;

/// The largest request or answer, in bytes (a host name is at most 253 bytes; an answer
/// at most [`MAX_ADDRESSES`] addresses).
pub const MAX_MESSAGE: usize = 8 * 1024;

/// The most addresses one resolution gives (the first ones, in the resolver's order).
pub const MAX_ADDRESSES: usize = 64;

/// The largest settings message (the proxy's rules), in bytes: 16 MiB.
pub const MAX_SETTINGS: usize = 16 << 20;

/// The settings travel in chunks of this size (a `SOCK_SEQPACKET` message must fit the
/// socket's buffer).
const SETTINGS_CHUNK: usize = 32 * 1024;

/// What the dialer says once it is confined, before it takes requests.
const READY: &[u8] = b"ready";

/// How long the proxy waits for its dialer to say [`READY`].
const READY_TIMEOUT_SECS: i64 = 30;

/// File descriptors one worker may hold at once: the socket it connects, or while it
/// resolves the resolver's UDP and netlink sockets and a file it reads.
const FILES_PER_WORKER: u64 = 4;

/// File descriptors of the dialer beyond its workers' (the socket, stdio).
const SPARE_FILES: u64 = 32;

/// Why the dialer could not be started, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DialerError {
    /// The socket pair could not be made.
    #[error("cannot make the dialer's socket pair")]
    SocketPair(#[source] nix::Error),
    /// The dialer process could not be started.
    #[error("cannot start the dialer {0}")]
    Spawn(PathBuf, #[source] io::Error),
    /// The settings could not be sent or received.
    #[error("cannot pass the dialer its settings")]
    Settings(#[source] io::Error),
    /// The dialer exited (or hung) before it said it was ready.
    #[error("the dialer did not start (within {READY_TIMEOUT_SECS} s); its reason is on stderr")]
    NotReady,
    /// The settings do not parse (the same binary wrote them, so this is a bug).
    #[error("the dialer's settings are invalid: {0}")]
    BadSettings(String),
    /// Stdin is not the socket the proxy hands its dialer.
    #[error(
        "{SUBCOMMAND} is started by contractor-proxy itself, with its socket on stdin; \
         do not run it by hand"
    )]
    NotTheProxysSocket,
    /// Confinement failed.
    #[error("cannot confine the dialer")]
    Confine(#[source] contractor_confine::ConfineError),
    /// The socket to the proxy failed.
    #[error("the dialer's socket failed")]
    Socket(#[source] io::Error),
    /// A worker thread could not be started or panicked.
    #[error("a dialer worker failed")]
    Worker(#[source] io::Error),
}

/// What the proxy tells its dialer once, before either is confined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The rules of every host some request may reach ([`ProxyConfig::reachable_hosts`]).
    pub allow: Vec<String>,
    /// The deny rules.
    pub deny: Vec<String>,
    /// The ports of rules without their own.
    pub allowed_ports: Vec<u16>,
    /// Networks that may be dialled although restricted.
    pub allowed_nets: Vec<String>,
    /// The proxy's own listening addresses, never dialled.
    pub own: Vec<SocketAddr>,
    /// Report mode: names and addresses are not refused for policy reasons (the proxy
    /// records "would be refused"); the own addresses still are.
    pub report: bool,
    /// The longest a connect may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Confine the dialer (false only with the proxy's `--no-confine`).
    pub confine: bool,
}

impl Settings {
    /// The settings of a dialer for `config`, whose proxy listens on `own`.
    pub fn of(config: &ProxyConfig, own: &[SocketAddr], confine: bool) -> Settings {
        let rules = |list: &Allowlist| list.rules().iter().map(|r| r.to_string()).collect();
        Settings {
            allow: rules(&config.reachable_hosts()),
            deny: rules(&config.denylist),
            allowed_ports: config.allowed_ports.iter().copied().collect(),
            allowed_nets: config.allowed_nets.iter().map(|n| n.to_string()).collect(),
            own: own.to_vec(),
            report: config.mode == Mode::Report,
            connect_timeout_ms: u64::try_from(config.limits.connect_timeout.as_millis())
                .unwrap_or(u64::MAX),
            confine,
        }
    }

    /// The policy these settings describe.
    pub fn policy(&self) -> Result<DialPolicy, DialerError> {
        let bad = |e: &dyn std::fmt::Display| DialerError::BadSettings(e.to_string());
        let mut config = ProxyConfig::new(Allowlist::parse(&self.allow).map_err(|e| bad(&e))?);
        config.denylist = Allowlist::parse(&self.deny).map_err(|e| bad(&e))?;
        config.allowed_ports = self.allowed_ports.iter().copied().collect();
        config.allowed_nets = self
            .allowed_nets
            .iter()
            .map(|net| net.parse().map_err(|e| bad(&e)))
            .collect::<Result<_, _>>()?;
        config.mode = if self.report {
            Mode::Report
        } else {
            Mode::Enforce
        };
        config.limits.connect_timeout = Duration::from_millis(self.connect_timeout_ms.max(1));
        Ok(DialPolicy {
            ports: crate::confinement::upstream_ports(&config),
            config,
            own: self.own.clone(),
        })
    }
}

/// What the dialer lets through: the proxy's checks, kept out of the proxy's reach.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    config: ProxyConfig,
    own: Vec<SocketAddr>,
    ports: Vec<u16>,
}

impl DialPolicy {
    /// Why `host:port` may not be resolved, if it may not.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), String> {
        if self.config.mode == Mode::Report {
            return Ok(());
        }
        self.config
            .check_target(host, port)
            .map(drop)
            .map_err(|denial| format!("the dialer refuses to resolve {host}: {denial}"))
    }

    /// The address to dial for `addr` (its canonical spelling), or why it may not be.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
        if let Some(own) = self.own.iter().find(|own| dials_itself(**own, addr)) {
            return Err(format!(
                "the dialer refuses {addr}: {}",
                Denial::OwnAddress(*own)
            ));
        }
        if self.config.mode == Mode::Report {
            return Ok(addr);
        }
        if let Some(why) = self.config.restriction(addr.ip()) {
            let denial = Denial::AddressRefused {
                addr: addr.ip(),
                why,
            };
            return Err(format!("the dialer refuses {addr}: {denial}"));
        }
        if !self.ports.contains(&addr.port()) {
            return Err(format!(
                "the dialer refuses {addr}: {}",
                Denial::PortNotAllowed(addr.port())
            ));
        }
        Ok(addr)
    }

    /// The TCP ports the dialer may connect to (for Landlock): those of [`Self::check_addr`],
    /// and DNS for resolution; `None` (any) in report mode.
    fn connect_ports(&self) -> Option<Vec<u16>> {
        (self.config.mode != Mode::Report).then(|| {
            let mut ports = self.ports.clone();
            ports.push(crate::confinement::DNS_PORT);
            ports.sort_unstable();
            ports.dedup();
            ports
        })
    }

    /// The confinement of the dialer: read only what name resolution reads, bind nothing,
    /// connect to [`Self::connect_ports`], sockets of the Internet families (and netlink,
    /// which getaddrinfo asks) only.
    pub fn confinement(&self) -> contractor_confine::Policy {
        let resolution = crate::confinement::RESOLUTION_FILES
            .iter()
            .chain(crate::confinement::LIBRARY_DIRS);
        contractor_confine::Policy {
            read: resolution.map(PathBuf::from).collect(),
            read_write: Vec::new(),
            bind_ports: Vec::new(),
            connect_ports: self.connect_ports(),
            max_open_files: Some(FILES_PER_WORKER * WORKERS as u64 + SPARE_FILES),
            // No RLIMIT_FSIZE: its stderr may be a regular file (a log), and the limit would
            // kill it on its first warning. It opens nothing for writing (Landlock).
            max_file_size: None,
            max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
            allow_exec: false,
            allowed_syscalls: None,
            socket_families: Some(&[
                contractor_confine::AF_INET,
                contractor_confine::AF_INET6,
                contractor_confine::AF_NETLINK,
            ]),
            stream_sockets_only: false,
        }
    }

    /// Answers one request; a connected socket goes with its answer.
    fn answer(&self, request: Request) -> (Answer, Option<TcpStream>) {
        match request {
            Request::Resolve { id, host, port } => {
                let failed = |reason: String, errno| Answer::Failed {
                    id,
                    reason,
                    errno,
                    timed_out: false,
                };
                if let Err(reason) = self.check_name(&host, port) {
                    return (failed(reason, Some(Errno::EACCES as i32)), None);
                }
                match (host.as_str(), port).to_socket_addrs() {
                    Ok(addrs) => (
                        Answer::Resolved {
                            id,
                            addrs: addrs.take(MAX_ADDRESSES).collect(),
                        },
                        None,
                    ),
                    Err(e) => (failed(e.to_string(), None), None),
                }
            }
            Request::Connect {
                id,
                addr,
                timeout_ms,
            } => {
                let addr = match self.check_addr(addr) {
                    Ok(addr) => addr,
                    Err(reason) => {
                        let answer = Answer::Failed {
                            id,
                            reason,
                            errno: Some(Errno::EACCES as i32),
                            timed_out: false,
                        };
                        return (answer, None);
                    }
                };
                let timeout = Duration::from_millis(timeout_ms.max(1))
                    .min(self.config.limits.connect_timeout);
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(stream) => (Answer::Connected { id }, Some(stream)),
                    Err(e) => (
                        Answer::Failed {
                            id,
                            reason: e.to_string(),
                            errno: e.raw_os_error(),
                            timed_out: e.kind() == io::ErrorKind::TimedOut,
                        },
                        None,
                    ),
                }
            }
        }
    }
}

/// A request from the proxy.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Resolve {
        id: u64,
        host: String,
        port: u16,
    },
    Connect {
        id: u64,
        addr: SocketAddr,
        timeout_ms: u64,
    },
}

/// An answer of the dialer; `Connected` carries the socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Answer {
    Resolved {
        id: u64,
        addrs: Vec<SocketAddr>,
    },
    Connected {
        id: u64,
    },
    Failed {
        id: u64,
        reason: String,
        errno: Option<i32>,
        timed_out: bool,
    },
}

impl Answer {
    fn id(&self) -> u64 {
        match self {
            Answer::Resolved { id, .. } | Answer::Connected { id } | Answer::Failed { id, .. } => {
                *id
            }
        }
    }
}

/// A started dialer, before the proxy's runtime runs: its process and the proxy's end of
/// the socket ([`Dialer::start`] takes it over inside the runtime).
#[derive(Debug)]
pub struct Spawned {
    /// The dialer process (it exits when the socket closes).
    pub child: Child,
    /// The proxy's end of the socket pair.
    pub socket: OwnedFd,
}

/// Starts `program` (this binary: `/proc/self/exe`) as the dialer of `config` with the
/// socket on its stdin, passes it its settings and waits until it says it is confined
/// and ready (so a proxy never serves without its dialer). Call before confining the proxy (which
/// may then execute nothing) and before any thread starts.
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

/// Receives what [`send_settings`] sent.
fn receive_settings(socket: &OwnedFd) -> Result<Settings, DialerError> {
    let mut buf = vec![0_u8; SETTINGS_CHUNK];
    let n = receive(socket, &mut buf)?;
    let len: usize = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|text| text.parse().ok())
        .filter(|&len| len <= MAX_SETTINGS)
        .ok_or_else(|| DialerError::BadSettings("no length first".to_string()))?;
    let mut json = Vec::with_capacity(len);
    while json.len() < len {
        let n = receive(socket, &mut buf)?;
        if n == 0 || json.len() + n > len {
            return Err(DialerError::BadSettings(
                "cut short or too long".to_string(),
            ));
        }
        json.extend_from_slice(&buf[..n]);
    }
    serde_json::from_slice(&json).map_err(|e| DialerError::BadSettings(e.to_string()))
}

/// One whole message into `buf` (0 at end of file); a message larger than `buf` is an
/// error, not cut.
fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Result<usize, DialerError> {
    loop {
        match recv(socket.as_raw_fd(), buf, MsgFlags::MSG_TRUNC) {
            Ok(n) if n > buf.len() => {
                return Err(DialerError::Socket(io::Error::other(format!(
                    "a message of {n} bytes, over the limit of {} bytes",
                    buf.len()
                ))))
            }
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(DialerError::Socket(e.into())),
        }
    }
}

/// The dialer's main: takes the socket from stdin, reads the settings, confines itself and
/// answers requests with [`WORKERS`] threads until the proxy closes the socket.
pub fn serve() -> Result<(), DialerError> {
    // If the proxy dies, so does the dialer (its socket's end of file says the same).
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let socket = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|_| DialerError::NotTheProxysSocket)?;
    match getsockopt(&socket, sockopt::SockType) {
        Ok(SockType::SeqPacket) => {}
        _ => return Err(DialerError::NotTheProxysSocket),
    }
    let settings = receive_settings(&socket)?;
    let policy = settings.policy()?;
    if settings.confine {
        contractor_confine::confine("contractor-proxy (dialer)", &policy.confinement())
            .map_err(DialerError::Confine)?;
    }
    send(socket.as_raw_fd(), READY, MsgFlags::MSG_NOSIGNAL)
        .map_err(|e| DialerError::Socket(e.into()))?;
    let socket = Arc::new(socket);
    let policy = Arc::new(policy);
    let workers = (0..WORKERS)
        .map(|_| {
            let (socket, policy) = (Arc::clone(&socket), Arc::clone(&policy));
            std::thread::Builder::new()
                .name("dialer".to_string())
                .spawn(move || work(&socket, &policy))
                .map_err(DialerError::Worker)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut result = Ok(());
    for worker in workers {
        let outcome = worker
            .join()
            .unwrap_or_else(|_| Err(DialerError::Worker(io::Error::other("panicked"))));
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}

/// One worker: a request at a time until end of file.
fn work(socket: &OwnedFd, policy: &DialPolicy) -> Result<(), DialerError> {
    let mut buf = vec![0_u8; MAX_MESSAGE];
    loop {
        let n = receive(socket, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let (answer, stream) = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(request) => policy.answer(request),
            Err(e) => {
                let reason = format!("the dialer cannot read a request: {e}");
                let answer = Answer::Failed {
                    id: 0,
                    reason,
                    errno: None,
                    timed_out: false,
                };
                (answer, None)
            }
        };
        let json = serde_json::to_vec(&answer).map_err(|e| DialerError::Socket(e.into()))?;
        let fds = stream.as_ref().map(|s| [s.as_raw_fd()]);
        let rights: Vec<ControlMessage> = fds
            .as_ref()
            .map(|f| ControlMessage::ScmRights(f))
            .into_iter()
            .collect();
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&json)],
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => {}
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Ok(()),
            Err(e) => return Err(DialerError::Socket(e.into())),
        }
    }
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

/// Reads answers until the dialer's socket closes, then fails every waiting request.
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
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(mut pending) = shared.pending.lock() {
        pending.gone = true;
        pending.waiting.clear();
    }
}

/// One answer and its socket; `None` at end of file. An answer that does not parse is
/// skipped (its request then waits for its timeout).
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
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            fds.extend(raw.into_iter().map(crate::sys::own_received_fd));
        }
    }
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let [buf] = iov;
    if truncated {
        return Ok(Some((
            Answer::Failed {
                id: 0,
                reason: "an answer over the size limit".to_string(),
                errno: None,
                timed_out: false,
            },
            None,
        )));
    }
    let answer = match serde_json::from_slice::<Answer>(&buf[..bytes]) {
        Ok(answer) => answer,
        Err(e) => Answer::Failed {
            id: 0,
            reason: format!("an answer that does not parse: {e}"),
            errno: None,
            timed_out: false,
        },
    };
    // At most one socket per answer; any other is closed here.
    Ok(Some((answer, fds.into_iter().next())))
}

/// Whether the process's arguments ask for the dialer (`contractor-proxy __dialer`).
pub fn is_requested(first_argument: Option<&OsStr>) -> bool {
    first_argument == Some(OsStr::new(SUBCOMMAND))
}
