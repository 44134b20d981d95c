//! The tunnel: many TCP-like streams multiplexed (yamux) over one virtio-serial port.
//!
//! Only the guest opens streams; the host only accepts them. The first byte of every stream
//! names its target (`TunnelTarget`), so the host never connects anywhere the guest did not
//! name and can only name one of three things. One task owns the yamux connection and
//! drives it; callers open streams through a [`Opener`] handle.

use std::future::poll_fn;
use std::task::Poll;

use contractor_protocol::agent::TunnelTarget;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// One stream of the tunnel, usable with tokio's I/O traits.
pub type TunnelStream = Compat<yamux::Stream>;

/// Errors of the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The multiplexed connection ended.
    #[error("the tunnel connection is closed")]
    Closed,
    /// yamux reported an error.
    #[error("tunnel protocol error")]
    Yamux(#[source] yamux::ConnectionError),
    /// Writing the stream's target byte failed.
    #[error("cannot open a tunnel stream")]
    Io(#[source] std::io::Error),
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Opens outbound streams on a tunnel driven by [`spawn`].
#[derive(Clone)]
pub struct Opener {
    requests: mpsc::Sender<OpenReply>,
}

impl Opener {
    /// Opens a stream to `target` (writes the target byte first).
    pub async fn open(&self, target: TunnelTarget) -> Result<TunnelStream, TunnelError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(reply)
            .await
            .map_err(|_| TunnelError::Closed)?;
        let stream = answer
            .await
            .map_err(|_| TunnelError::Closed)?
            .map_err(TunnelError::Yamux)?;
        let mut stream = stream.compat();
        stream
            .write_all(&[target.tag()])
            .await
            .map_err(TunnelError::Io)?;
        Ok(stream)
    }
}

/// Which end of the tunnel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The guest: opens streams.
    Guest,
    /// The host: accepts streams.
    Host,
}

/// Most streams the tunnel's yamux connection holds at once, both directions: 1,024. The
/// host relays at most [`MAX_TUNNEL_STREAMS`] of them to the proxy and the store.
pub const YAMUX_MAX_STREAMS: usize = 1024;

/// Most proxy and store streams the host relays at once per build: 512. A stream beyond it
/// is closed at once and counted; the log stream is not counted against it.
pub const MAX_TUNNEL_STREAMS: usize = 512;

/// The largest data frame sent on the tunnel: 64 KiB.
const YAMUX_FRAME: usize = 64 * 1024;

/// The buffer of each direction of a connection carried over a tunnel stream: 64 KiB
/// (tokio's default is 8 KiB), bounded by the stream count, [`MAX_TUNNEL_STREAMS`].
const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways between a tunnel stream and the connection it carries (the guest's
/// loopback client, or the host's proxy or store) until both ends are done, 64 KiB at a
/// time: fewer trips through the tunnel's frames for bulk transfers.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let _ = tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await;
}

/// How the tunnel's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The other end closed it.
    Closed,
    /// yamux reported an error (a malformed frame, a broken port): its message.
    Failed(String),
}

/// What the driver waits for.
enum Step {
    Request(Option<OpenReply>),
    Outbound(Result<yamux::Stream, yamux::ConnectionError>),
    Inbound(Option<Result<yamux::Stream, yamux::ConnectionError>>),
}

/// Starts the task that drives the tunnel over `io`. Returns the opener (useful on the
/// guest), the receiver of inbound streams (useful on the host; it yields `None` when the
/// connection ends) and how the connection ended, once it has.
///
/// The task reads the connection at all times, also while an outbound stream waits for
/// the other end's acknowledgement: a stream that waits never stops the others.
pub fn spawn<T>(
    io: T,
    side: Side,
) -> (
    Opener,
    mpsc::UnboundedReceiver<TunnelStream>,
    oneshot::Receiver<TunnelEnd>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mode = match side {
        Side::Guest => yamux::Mode::Client,
        Side::Host => yamux::Mode::Server,
    };
    let mut config = yamux::Config::default();
    config.set_max_num_streams(YAMUX_MAX_STREAMS);
    // Frames of up to 64 KiB (yamux's default is 16 KiB): a quarter of the frames to make
    // and parse for a bulk transfer, which under TCG is guest CPU time.
    config.set_split_send_size(YAMUX_FRAME);
    let mut connection = yamux::Connection::new(io.compat(), config, mode);
    let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(16);
    // Unbounded in type, bounded in fact: every stream in it is a live yamux stream, and
    // yamux holds at most YAMUX_MAX_STREAMS.
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
    let (end_tx, end_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut openers_alive = true;
        let mut pending: Option<OpenReply> = None;
        let end = loop {
            let waiting = pending.is_some();
            let step = tokio::select! {
                request = open_rx.recv(), if openers_alive && !waiting => Step::Request(request),
                step = poll_fn(|cx| {
                    if waiting {
                        if let Poll::Ready(stream) = connection.poll_new_outbound(cx) {
                            return Poll::Ready(Step::Outbound(stream));
                        }
                    }
                    connection.poll_next_inbound(cx).map(Step::Inbound)
                }) => step,
            };
            match step {
                Step::Request(Some(reply)) => pending = Some(reply),
                Step::Request(None) => openers_alive = false,
                Step::Outbound(stream) => {
                    if let Some(reply) = pending.take() {
                        let _ = reply.send(stream);
                    }
                }
                Step::Inbound(Some(Ok(stream))) => {
                    // Nobody accepts inbound streams on the guest: the stream is dropped.
                    let _ = inbound_tx.send(stream.compat());
                }
                Step::Inbound(Some(Err(err))) => break TunnelEnd::Failed(err.to_string()),
                Step::Inbound(None) => break TunnelEnd::Closed,
            }
        };
        let _ = end_tx.send(end);
    });
    (Opener { requests: open_tx }, inbound_rx, end_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn guest_streams_arrive_at_host_with_their_target() {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _, _) = spawn(guest_io, Side::Guest);
        let (_, mut inbound, _) = spawn(host_io, Side::Host);

        let mut a = opener
            .open(TunnelTarget::Proxy)
            .await
            .expect("open proxy stream");
        let mut b = opener
            .open(TunnelTarget::Store)
            .await
            .expect("open store stream");
        b.write_all(b"to the store").await.expect("write b");
        b.shutdown().await.expect("close b");
        a.write_all(b"to the proxy").await.expect("write a");
        a.shutdown().await.expect("close a");

        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut stream = inbound.recv().await.expect("an inbound stream");
            let mut data = Vec::new();
            stream.read_to_end(&mut data).await.expect("read");
            seen.push(data);
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![b"pto the proxy".to_vec(), b"sto the store".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_large_transfer_keeps_every_byte() {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _, _) = spawn(guest_io, Side::Guest);
        let (_, mut inbound, _) = spawn(host_io, Side::Host);
        let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            let mut s = opener.open(TunnelTarget::Log).await.expect("open");
            s.write_all(&sent).await.expect("write");
            s.shutdown().await.expect("close");
        });
        let mut stream = inbound.recv().await.expect("stream");
        let mut data = Vec::new();
        stream.read_to_end(&mut data).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(data[0], b'l');
        assert!(data[1..] == payload[..], "payload differs");
    }

    #[tokio::test]
    async fn output_keeps_arriving_while_a_thousand_streams_are_open() {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _, _) = spawn(guest_io, Side::Guest);
        let (_, mut inbound, _) = spawn(host_io, Side::Host);
        let mut log = opener.open(TunnelTarget::Log).await.expect("log");
        let mut held = Vec::new();
        let host = tokio::spawn(async move {
            let mut log = None;
            // The host holds every stream it is given and never answers on them.
            while let Some(mut stream) = inbound.recv().await {
                let mut tag = [0u8; 1];
                stream.read_exact(&mut tag).await.expect("tag");
                if tag[0] == b'l' {
                    log = Some(stream);
                    break;
                }
                held.push(stream);
            }
            let mut log = log.expect("the log stream");
            let mut data = Vec::new();
            log.read_to_end(&mut data).await.expect("read log");
            (data, held, inbound)
        });
        let mut streams = Vec::new();
        let mut refused = 0;
        for _ in 0..1000 {
            // Opens that the tunnel cannot take yet are given up after a while.
            match tokio::time::timeout(
                std::time::Duration::from_millis(20),
                opener.open(TunnelTarget::Proxy),
            )
            .await
            {
                Ok(Ok(stream)) => streams.push(stream),
                _ => refused += 1,
            }
        }
        log.write_all(b"still here").await.expect("write log");
        log.shutdown().await.expect("close log");
        let (data, _held, _inbound) = host.await.expect("host");
        assert_eq!(data, b"still here", "{refused} opens refused");
    }
}
