//! The tunnel: many TCP-like streams multiplexed (yamux) over one virtio-serial port.
//!
//! Only the guest opens streams; the host only accepts them. The first byte of every stream
//! names its target (`TunnelTarget`), so the host never connects anywhere the guest did not
//! name and can only name one of three things. One task owns the yamux connection and
//! drives it; callers open streams through a [`Opener`] handle.

use std::future::poll_fn;

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

/// Starts the task that drives the tunnel over `io`. Returns the opener (useful on the guest)
/// and the receiver of inbound streams (useful on the host). The receiver yields `None` when
/// the connection ends.
pub fn spawn<T>(io: T, side: Side) -> (Opener, mpsc::Receiver<TunnelStream>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mode = match side {
        Side::Guest => yamux::Mode::Client,
        Side::Host => yamux::Mode::Server,
    };
    let mut config = yamux::Config::default();
    config.set_max_num_streams(1024);
    let mut connection = yamux::Connection::new(io.compat(), config, mode);
    let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(16);
    let (inbound_tx, inbound_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut openers_alive = true;
        loop {
            tokio::select! {
                request = open_rx.recv(), if openers_alive => match request {
                    Some(reply) => {
                        let stream = poll_fn(|cx| connection.poll_new_outbound(cx)).await;
                        let _ = reply.send(stream);
                    }
                    None => openers_alive = false,
                },
                inbound = poll_fn(|cx| connection.poll_next_inbound(cx)) => match inbound {
                    Some(Ok(stream)) => {
                        if inbound_tx.send(stream.compat()).await.is_err() {
                            // Nobody accepts inbound streams on this side: drop it, keep
                            // driving the connection for the outbound ones.
                        }
                    }
                    Some(Err(_)) | None => break,
                },
            }
        }
    });
    (Opener { requests: open_tx }, inbound_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn guest_streams_arrive_at_host_with_their_target() {
        let (guest_io, host_io) = tokio::io::duplex(64 * 1024);
        let (opener, _) = spawn(guest_io, Side::Guest);
        let (_, mut inbound) = spawn(host_io, Side::Host);

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
        let (opener, _) = spawn(guest_io, Side::Guest);
        let (_, mut inbound) = spawn(host_io, Side::Host);
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
}
