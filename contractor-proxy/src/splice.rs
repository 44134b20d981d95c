//! Zero-copy tunnels: bytes move between the client's and the upstream's sockets through a
//! kernel pipe with splice(2), never through the proxy's memory.
//!
//! Used for CONNECT tunnels between two plain TCP sockets (the common case); anything
//! else goes through the ordinary copy. The invariant matches the copy it replaces: each
//! direction runs until its source ends, then half-closes its destination; bytes are
//! counted and keep the shared idle clock alive as they move, and a tunnel with no byte
//! either way for the idle timeout ends with `TimedOut`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::meter::{Activity, Transfer};
use crate::metrics::Metrics;

/// How much one splice call moves at most, and the pipe size asked for.
const CHUNK: usize = 1 << 20;

/// Which way bytes go, for the counters.
#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// Relays `client` <-> `upstream` until both directions end, after first sending `early`
/// (bytes the client sent before the tunnel opened) upstream.
pub(crate) async fn tunnel(
    client: &TcpStream,
    upstream: &TcpStream,
    early: &[u8],
    activity: &Activity,
    transfer: &Transfer,
    metrics: &Metrics,
) -> io::Result<()> {
    let count = |direction: Direction, n: usize| {
        activity.touch();
        let n = n as u64;
        match direction {
            Direction::Up => {
                transfer.up.fetch_add(n, Ordering::Relaxed);
                metrics.add_up(n);
            }
            Direction::Down => {
                transfer.down.fetch_add(n, Ordering::Relaxed);
                metrics.add_down(n);
            }
        }
    };
    let mut sent = 0;
    while sent < early.len() {
        upstream.writable().await?;
        match upstream.try_write(&early[sent..]) {
            Ok(n) => {
                count(Direction::Up, n);
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let up = one_way(client, upstream, |n| count(Direction::Up, n));
    let down = one_way(upstream, client, |n| count(Direction::Down, n));
    let idle = async {
        loop {
            let deadline = activity.deadline();
            tokio::time::sleep_until(deadline).await;
            if tokio::time::Instant::now() >= activity.deadline() {
                return io::Error::new(io::ErrorKind::TimedOut, "the tunnel went idle");
            }
        }
    };
    tokio::select! {
        result = async { tokio::try_join!(up, down) } => result.map(|_| ()),
        e = idle => Err(e),
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, moved: impl Fn(usize)) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe()?;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_in.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            // SAFETY: shutdown(2) on a socket this stream owns, which stays open.
            let _ = unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(());
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_out.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(n) => {
                    moved(n);
                    left -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A non-blocking pipe (read end, write end), as large as the system lets us make it.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe moves more per call; failing that, the default size works too.
    let size = libc::c_int::try_from(CHUNK).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a descriptor we own.
    let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    Ok((read, write))
}

/// One non-blocking splice(2) of up to `len` bytes from `from` to `to`.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice on descriptors the caller keeps open, without offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
