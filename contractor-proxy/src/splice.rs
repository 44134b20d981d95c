//! Zero-copy tunnels: bytes move between the client's and the upstream's sockets through a
//! kernel pipe with splice(2), never through the proxy's memory.
//!
//! Used for CONNECT tunnels between two plain TCP sockets (the common case); anything
//! else goes through the ordinary copy. The two sockets leave the async runtime's event
//! loop, and each direction runs on its own thread doing blocking splice(2) calls: the
//! kernel wakes that thread directly when bytes arrive or room frees up. (Through the event
//! loop, every packet woke a runtime thread as well, and a large download ran markedly
//! slower; see bench/proxy/run.) If the threads cannot be started, the same relay runs as
//! async non-blocking splices instead.
//!
//! The invariant matches the copy it replaces: each direction runs until its source ends,
//! then half-closes its destination; bytes are counted and keep the shared idle clock
//! alive as they move; a tunnel with no byte either way for the idle timeout ends with
//! `TimedOut`. However the tunnel ends (both directions done, an error, idle, or its future
//! dropped because shutdown cut it), both sockets are shut down, which ends a thread still
//! blocked in splice(2).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::meter::{Activity, Transfer};
use crate::metrics::Metrics;

/// How much one splice call moves at most, and the pipe size asked for.
const CHUNK: usize = 1 << 20;

/// Stack size of a relay thread: it only loops over splice(2).
const RELAY_STACK: usize = 64 * 1024;

/// Which way bytes go, for the counters.
#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// Where one direction's moved bytes are counted.
#[derive(Clone)]
struct Counter {
    direction: Direction,
    activity: Arc<Activity>,
    transfer: Arc<Transfer>,
    metrics: Arc<Metrics>,
}

impl Counter {
    fn count(&self, n: usize) {
        self.activity.touch();
        let n = n as u64;
        match self.direction {
            Direction::Up => {
                self.transfer.up.fetch_add(n, Ordering::Relaxed);
                self.metrics.add_up(n);
            }
            Direction::Down => {
                self.transfer.down.fetch_add(n, Ordering::Relaxed);
                self.metrics.add_down(n);
            }
        }
    }
}

/// Relays `client` <-> `upstream` until both directions end, after first sending `early`
/// (bytes the client sent before the tunnel opened) upstream.
pub(crate) async fn tunnel(
    client: TcpStream,
    upstream: TcpStream,
    early: &[u8],
    activity: &Arc<Activity>,
    transfer: &Arc<Transfer>,
    metrics: &Arc<Metrics>,
) -> io::Result<()> {
    let counter = |direction| Counter {
        direction,
        activity: Arc::clone(activity),
        transfer: Arc::clone(transfer),
        metrics: Arc::clone(metrics),
    };
    let (up, down) = (counter(Direction::Up), counter(Direction::Down));
    let mut sent = 0;
    while sent < early.len() {
        upstream.writable().await?;
        match upstream.try_write(&early[sent..]) {
            Ok(n) => {
                up.count(n);
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let idle = async {
        loop {
            let deadline = activity.deadline();
            tokio::time::sleep_until(deadline).await;
            if tokio::time::Instant::now() >= activity.deadline() {
                return io::Error::new(io::ErrorKind::TimedOut, "the tunnel went idle");
            }
        }
    };
    // Out of the event loop (still non-blocking): a socket left registered there would wake
    // it for every packet, although nothing there waits for them.
    let sockets = ShutDownOnDrop([client.into_std()?, upstream.into_std()?]);
    let [client, upstream] = &sockets.0;
    match relay_threads(client, upstream, up.clone(), down.clone()) {
        Ok((up_done, down_done)) => {
            let finished = |done: Done| async move {
                done.await
                    .unwrap_or_else(|_| Err(io::Error::other("a tunnel relay thread died")))
            };
            tokio::select! {
                result = async { tokio::try_join!(finished(up_done), finished(down_done)) } => {
                    result.map(|_| ())
                }
                e = idle => Err(e),
            }
        }
        Err(_) => {
            let client = TcpStream::from_std(client.try_clone()?)?;
            let upstream = TcpStream::from_std(upstream.try_clone()?)?;
            let up = one_way(&client, &upstream, |n| up.count(n));
            let down = one_way(&upstream, &client, |n| down.count(n));
            tokio::select! {
                result = async { tokio::try_join!(up, down) } => result.map(|_| ()),
                e = idle => Err(e),
            }
        }
    }
}

/// The tunnel's two sockets, shut down both ways when dropped.
struct ShutDownOnDrop([std::net::TcpStream; 2]);

impl Drop for ShutDownOnDrop {
    fn drop(&mut self) {
        for socket in &self.0 {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// How one direction's relay thread ended.
type Done = oneshot::Receiver<io::Result<()>>;

/// Starts one thread per direction, each with its own handles to the two sockets, then
/// puts the sockets in blocking mode and lets the threads go. Returns how each direction
/// ends. On failure nothing has changed: a thread already started ends without a splice.
fn relay_threads(
    client: &std::net::TcpStream,
    upstream: &std::net::TcpStream,
    up: Counter,
    down: Counter,
) -> io::Result<(Done, Done)> {
    let (up_go, up_done) = relay_thread(client.try_clone()?, upstream.try_clone()?, up)?;
    // If this fails, `up_go` is dropped and the first thread ends without touching anything.
    let (down_go, down_done) = relay_thread(upstream.try_clone()?, client.try_clone()?, down)?;
    if let Err(e) = client
        .set_nonblocking(false)
        .and_then(|()| upstream.set_nonblocking(false))
    {
        let _ = client.set_nonblocking(true);
        let _ = upstream.set_nonblocking(true);
        return Err(e);
    }
    let _ = up_go.send(());
    let _ = down_go.send(());
    Ok((up_done, down_done))
}

/// Starts a thread that, once told to go, relays `from` to `to` with blocking splices.
/// Dropping the returned sender instead ends the thread before it touches a socket.
fn relay_thread(
    from: std::net::TcpStream,
    to: std::net::TcpStream,
    counter: Counter,
) -> io::Result<(mpsc::Sender<()>, Done)> {
    let (go, told) = mpsc::channel();
    let (finished, done) = oneshot::channel();
    thread::Builder::new()
        .name("proxy-tunnel".to_string())
        .stack_size(RELAY_STACK)
        .spawn(move || {
            if told.recv().is_ok() {
                let _ = finished.send(blocking_one_way(&from, &to, &counter));
            }
        })?;
    Ok((go, done))
}

/// Moves bytes from the blocking socket `from` to the blocking socket `to` until `from`
/// ends (or is shut down), then half-closes `to`.
fn blocking_one_way(
    from: &std::net::TcpStream,
    to: &std::net::TcpStream,
    counter: &Counter,
) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe(0)?;
    loop {
        // The pipe is empty here, so this waits for the socket only.
        let filled = splice(from.as_raw_fd(), pipe_in.as_raw_fd(), CHUNK, 0)?;
        if filled == 0 {
            let _ = to.shutdown(Shutdown::Write);
            return Ok(());
        }
        let mut left = filled;
        while left > 0 {
            let n = splice(pipe_out.as_raw_fd(), to.as_raw_fd(), left, 0)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            counter.count(n);
            left -= n;
        }
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`: the async
/// relay, for when the threads cannot be started.
async fn one_way(from: &TcpStream, to: &TcpStream, moved: impl Fn(usize)) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe(libc::O_NONBLOCK)?;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(
                    from.as_raw_fd(),
                    pipe_in.as_raw_fd(),
                    CHUNK,
                    libc::SPLICE_F_NONBLOCK,
                )
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
                splice(
                    pipe_out.as_raw_fd(),
                    to.as_raw_fd(),
                    left,
                    libc::SPLICE_F_NONBLOCK,
                )
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

/// A pipe (read end, write end) with extra `flags` (`O_NONBLOCK`), as large as the system
/// lets us make it.
fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags | libc::O_CLOEXEC) } != 0 {
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

/// One splice(2) of up to `len` bytes from `from` to `to`, with `flags`
/// (`SPLICE_F_NONBLOCK`), retried when a signal interrupts it.
fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    loop {
        // SAFETY: splice on descriptors the caller keeps open, without offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | flags,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
