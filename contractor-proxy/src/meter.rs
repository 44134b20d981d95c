//! A byte stream wrapper that counts what moves and cuts connections that go idle.
//!
//! Both sides of one exchange (the client connection and its upstream connection, or the two
//! ends of a tunnel) share one [`Activity`] clock: a byte moving either way keeps both alive,
//! so a long download never times out while its client sends nothing. The invariant: a
//! [`Metered`] stream fails with `TimedOut` only when no byte has moved on any stream
//! sharing its clock for the whole idle timeout; there is no limit on total time.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// When bytes last moved on any stream sharing this clock.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    idle: Duration,
}

impl Activity {
    /// A clock that starts now and lets streams idle for `idle`.
    pub(crate) fn new(idle: Duration) -> Arc<Self> {
        Arc::new(Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            idle,
        })
    }

    pub(crate) fn touch(&self) {
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(elapsed, Ordering::Relaxed);
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + self.idle
    }
}

/// Bytes moved to and from one upstream, for one request's access log entry.
#[derive(Debug, Default)]
pub(crate) struct Transfer {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
}

/// Which request an upstream connection's bytes count for: a pooled connection serves one
/// request after another, and is pointed at each in turn.
#[derive(Debug)]
pub(crate) struct TransferSlot(std::sync::Mutex<Arc<Transfer>>);

impl TransferSlot {
    /// A slot counting for `transfer`.
    pub(crate) fn new(transfer: Arc<Transfer>) -> Arc<Self> {
        Arc::new(TransferSlot(std::sync::Mutex::new(transfer)))
    }

    /// Counts from now on for `transfer`.
    pub(crate) fn set(&self, transfer: Arc<Transfer>) {
        if let Ok(mut current) = self.0.lock() {
            *current = transfer;
        }
    }

    fn add(&self, read: u64, written: u64) {
        if let Ok(current) = self.0.lock() {
            current.down.fetch_add(read, Ordering::Relaxed);
            current.up.fetch_add(written, Ordering::Relaxed);
        }
    }
}

/// A stream with an idle clock and, for upstream streams, byte counters.
pub(crate) struct Metered<S> {
    inner: S,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    /// For an upstream stream: where to count bytes read (down) and written (up).
    counts: Option<(Arc<TransferSlot>, Arc<Metrics>)>,
    /// Whatever must live exactly as long as this stream (a connection slot), which may be
    /// longer than its HTTP connection once the stream becomes a tunnel.
    _held: Option<Box<dyn Send + Sync>>,
}

impl<S> Metered<S> {
    /// A client-side stream: idle clock only.
    pub(crate) fn client(inner: S, activity: Arc<Activity>) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(activity.deadline()));
        Metered {
            inner,
            activity,
            timer,
            counts: None,
            _held: None,
        }
    }

    /// The wrapped stream, and whatever [`Metered::holding`] made it keep alive.
    pub(crate) fn into_parts(self) -> (S, Option<Box<dyn Send + Sync>>) {
        (self.inner, self._held)
    }

    /// The idle clock this stream shares.
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// This stream, keeping `held` alive until it is dropped.
    pub(crate) fn holding(mut self, held: impl Send + Sync + 'static) -> Self {
        self._held = Some(Box::new(held));
        self
    }

    /// An upstream stream: idle clock and byte counters.
    pub(crate) fn upstream(
        inner: S,
        activity: Arc<Activity>,
        transfer: Arc<TransferSlot>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut metered = Metered::client(inner, activity);
        metered.counts = Some((transfer, metrics));
        metered
    }

    fn moved(&self, read: usize, written: usize) {
        if read + written == 0 {
            return;
        }
        self.activity.touch();
        if let Some((transfer, metrics)) = &self.counts {
            let (read, written) = (read as u64, written as u64);
            transfer.add(read, written);
            metrics.add_down(read);
            metrics.add_up(written);
        }
    }

    /// Pending while the shared clock has not run out; `TimedOut` once it has.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = self.activity.deadline();
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {} s", self.activity.idle.as_secs_f64()),
                ));
            }
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            ready!(self.timer.as_mut().poll(cx));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.moved(buf.filled().len() - before, 0);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.moved(0, n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.moved(0, n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
