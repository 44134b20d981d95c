//! The dialer process: it takes its socket from stdin, reads its settings, confines
//! itself, says it is ready, and answers requests with [`WORKERS`] threads until the proxy
//! closes the socket.

use std::io::{self, IoSlice};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, send, sendmsg, sockopt, ControlMessage, MsgFlags, SockType};

use super::{
    receive, Answer, DialPolicy, DialerError, Request, Settings, MAX_ADDRESSES, MAX_MESSAGE,
    MAX_SETTINGS, READY, SETTINGS_CHUNK, WORKERS,
};

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

impl DialPolicy {
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
