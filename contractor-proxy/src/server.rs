//! The proxy server: HTTP/1.1 in, CONNECT tunnels and forwarded plain-HTTP requests out.
//!
//! Every request, allowed or not, yields exactly one [`Decision`] on the decisions channel
//! (and, with an access log, one [`AccessEntry`] when it ends), and the proxy dials only
//! addresses that [`ProxyConfig::check_addresses`] returned: the host is resolved once,
//! checked, and those very addresses are connected to, so a second DNS answer cannot
//! smuggle in a private address; the proxy's own listening address is never dialled. Idle
//! upstream HTTP connections are pooled by address, and a request may take one only for an
//! address its own checks returned, so reuse never skips a decision; the upstream TLS
//! connections of inspected sessions are pooled the same way by host ([`crate::pool`]),
//! shared by every session to that host (HTTP/2 where the host offers it). Names are looked up
//! through [`crate::names::NameCache`] (each once per TTL), connection attempts to one host
//! wait their turn (the `gate` module), and an upstream that refuses, resets or closes a
//! connection before answering is tried again a bounded number of times; the record
//! still shows each request once.
//! Responses the proxy makes itself carry `X-Contractor-Proxy-Error`; the same header
//! coming from upstream is removed so that an upstream cannot pose as the proxy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use contractor_protocol::proxy::{
    Decision, DecisionClass, DecisionTag, Download, DownloadTag, DownloadTime, ProxyLine, Verdict,
    MAX_CONTENT_TYPE,
};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::cache::{EntryWriter, Lookup};
use crate::inspect::Inspection;
use crate::stage::{StageError, Stager, Staging};
use crate::urlrule::Scheme;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::address::canonical;
use crate::allowlist::normalize_host;
use crate::meter::{Activity, Metered, Transfer, TransferSlot};
use crate::metrics::AccessEntry;
use crate::policy::{Denial, Mode, ProxyConfig};
use crate::pool::{Connection, Sender, UpstreamPool};

/// How long resolving a host, or connecting to it, may take by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long open connections and tunnels may go on after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long to wait before accepting again after `accept` failed (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The buffer each direction of a tunnel copies through.
const TUNNEL_BUFFER: usize = 64 * 1024;

/// What a client over `--max-connections` is told to wait, in seconds.
const RETRY_AFTER_SECS: &str = "1";

/// Rounds of connection attempts to a target's addresses while every address refuses or
/// resets the connection (the first round included), all within the connect timeout.
pub const CONNECT_ROUNDS: u32 = 3;

/// The wait before the second round of connection attempts (or the second sending of a
/// request, or TLS handshake); it doubles for each further one.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// How many times an idempotent plain request without a body, or an inspected session's
/// TLS handshake, is tried on a new connection while the upstream closes or resets it before
/// answering (the first try included).
pub const SEND_ATTEMPTS: u32 = 3;

/// The header on every response the proxy makes itself, saying why.
pub const ERROR_HEADER: &str = "x-contractor-proxy-error";

/// Headers that concern one connection only, never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The error of a body the proxy passes on: hyper's, or the proxy's own refusal to pass
/// on the end of a download that does not match its pin.
type BoxError = Box<dyn Error + Send + Sync>;

type ProxyBody = BoxBody<Bytes, BoxError>;

/// Serves proxy clients on `listener` until `shutdown` completes, sending one [`Decision`]
/// per request to `decisions`, and with [`ProxyConfig::record_downloads`] one [`Download`]
/// per forwarded response (a dropped receiver is not an error: nobody is listening).
/// After `shutdown`, no connection is accepted; open ones may finish for
/// [`SHUTDOWN_GRACE`], then whatever remains is cut. Returns when every connection is gone.
pub async fn serve(
    config: ProxyConfig,
    listener: TcpListener,
    decisions: UnboundedSender<ProxyLine>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(config.limits.max_connections));
    let (config_resolver, config_timeout) =
        (config.resolver.clone(), config.limits.connect_timeout);
    let config_limits = config.limits;
    let config_metrics = Arc::clone(&config.metrics);
    // Pinned bodies are staged beside the cache's entries in the making, else in memory.
    let stager = Stager::new(config.cache.as_ref().map(|cache| cache.dir().join("tmp")));
    let proxy = Arc::new(Proxy {
        own: listener
            .local_addr()
            .ok()
            .into_iter()
            .chain(config.also_own.iter().copied())
            .collect(),
        stager: Arc::new(stager),
        config,
        decisions,
        tasks: TaskTracker::new(),
        stopping: CancellationToken::new(),
        cut: CancellationToken::new(),
        pool: Mutex::new(HashMap::new()),
        upstreams: Arc::new(UpstreamPool::new()),
        names: crate::names::NameCache::new(
            config_resolver,
            config_timeout,
            Arc::clone(&config_metrics),
        ),
        gate: crate::gate::ConnectGate::new(
            config_limits.connects_per_host,
            config_limits.connect_queue_per_host,
        ),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let slot = Arc::clone(&slots).try_acquire_owned().ok();
                    proxy.tasks.spawn(Arc::clone(&proxy).serve_connection(stream, client, slot));
                }
                Err(e) => {
                    eprintln!("contractor-proxy: cannot accept a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    proxy.stopping.cancel();
    // Idle upstream connections end when their senders go.
    if let Ok(mut pool) = proxy.pool.lock() {
        pool.clear();
    }
    proxy.upstreams.clear();
    proxy.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, proxy.tasks.wait())
        .await
        .is_err()
    {
        proxy.cut.cancel();
        proxy.tasks.wait().await;
    }
}

/// What every connection shares.
struct Proxy {
    config: ProxyConfig,
    /// The listening addresses (this one's first, then [`ProxyConfig::also_own`]), never
    /// to be dialled.
    own: Vec<SocketAddr>,
    decisions: UnboundedSender<ProxyLine>,
    /// Client connections, tunnels and upstream connections, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Shutdown was asked for: finish the request in hand, take no more.
    stopping: CancellationToken,
    /// The grace period is over: drop everything.
    cut: CancellationToken,
    /// Idle upstream connections for plain HTTP, by the address they were dialled at.
    pool: Mutex<HashMap<SocketAddr, Vec<Pooled>>>,
    /// Upstream TLS connections of inspected sessions, by host, shared by every session.
    upstreams: Arc<UpstreamPool<ProxyBody>>,
    /// Where pinned bodies wait until they are verified.
    stager: Arc<Stager>,
    /// The answers of the resolver, each name looked up once per TTL.
    names: crate::names::NameCache,
    /// Connection attempts per host: bounded, the rest queued.
    gate: crate::gate::ConnectGate,
}

/// An idle upstream HTTP/1.1 connection, ready for the next request to its address.
struct Pooled {
    /// The address it was dialled at, checked again by every request that takes it.
    addr: SocketAddr,
    sender: SendRequest<ProxyBody>,
    transfer: Arc<TransferSlot>,
}

/// Idle upstream connections kept per address.
const POOL_PER_ADDRESS: usize = 64;

/// Where a request wants to go, host normalised.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
}

/// A request refused before its target was fully known, with what is known of it.
struct Rejected {
    denial: Denial,
    target: Target,
}

/// A request let through: why, and where it may connect.
struct Admitted {
    reason: String,
    addrs: Vec<SocketAddr>,
}

/// Failures after the request was allowed.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {target} took longer than {secs} s")]
    ConnectTimeout { target: String, secs: f64 },
    #[error("the upstream HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("too many connections to one host at once")]
    Busy(#[source] crate::gate::Full),
}

/// A refusal after the request was allowed, with its reason (an upstream that failed TLS
/// verification, a closed upstream).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl UpstreamError {
    fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Connect { .. } | UpstreamError::Http(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// One request's access log entry, written when the last holder lets go: after the tunnel
/// closes, or the forwarded response's last byte went out.
struct Exchange {
    proxy: Arc<Proxy>,
    started: Instant,
    time: f64,
    client: SocketAddr,
    method: String,
    target: Target,
    verdict: Verdict,
    status: AtomicU16,
    transfer: Arc<Transfer>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(log) = &self.proxy.config.access_log else {
            return;
        };
        let _ = log.send(AccessEntry {
            kind: "access".to_string(),
            time: self.time,
            client: self.client.to_string(),
            method: self.method.clone(),
            host: self.target.host.clone(),
            port: self.target.port,
            decision: match self.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            }
            .to_string(),
            status: self.status.load(Ordering::Relaxed),
            bytes_up: self.transfer.up.load(Ordering::Relaxed),
            bytes_down: self.transfer.down.load(Ordering::Relaxed),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}

/// A response body that holds its request's [`Exchange`] until the body is done, so the
/// access log entry is written after the last byte; with `--record-downloads`, it also
/// hashes the body on its way through and sends its [`Download`] when it ends or is dropped.
/// A download of a pinned URL (`--pins`) never goes this way: it is staged whole and
/// verified first ([`Proxy::staged`]).
struct EndsExchange {
    body: Incoming,
    _exchange: Arc<Exchange>,
    download: Option<Hashing>,
    /// With `--cache`, the entry a complete `GET` answered 200 becomes.
    keep: Option<EntryWriter>,
}

/// A download being recorded: its line so far, and the hash of the bytes passed on.
struct Hashing {
    line: Download,
    hasher: Sha256,
    to: UnboundedSender<ProxyLine>,
}

impl Hashing {
    /// The hex SHA-256 of the bytes so far, and the line with it.
    fn finish(mut self, complete: bool) -> Download {
        self.line.sha256 = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.line.complete = complete;
        self.line
    }

    /// Sends the line once.
    fn send(to: &UnboundedSender<ProxyLine>, line: Download) {
        // Nobody listening any more is not an error: serving goes on.
        let _ = to.send(ProxyLine::Download(line));
    }
}

/// `line`, marked as not passed on whole.
fn download_cut(mut line: Download) -> Download {
    line.complete = false;
    line
}

/// Why the proxy refused to pass on a pinned download.
#[derive(Debug, thiserror::Error)]
#[error("{url}: the bytes have SHA-256 {got}, contractor.lock pins {pinned}")]
struct Mismatch {
    url: String,
    got: String,
    pinned: String,
}

impl EndsExchange {
    /// Sends the download line, once: `complete` if the body ended whole, and then, with
    /// `--cache`, its entry kept.
    fn end(&mut self, complete: bool) {
        let Some(download) = self.download.take() else {
            return;
        };
        let to = download.to.clone();
        let line = download.finish(complete);
        if let Some(keep) = self.keep.take().filter(|_| complete && !line.mismatched()) {
            keep.commit(&line.sha256, line.content_type.as_deref());
        }
        Hashing::send(&to, line);
    }
}

impl Drop for EndsExchange {
    fn drop(&mut self) {
        // The client's side ends once the length is sent, often before the end is polled.
        let complete = self.body.is_end_stream();
        self.end(complete);
    }
}

impl Body for EndsExchange {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(polled) => polled,
        };
        match polled {
            Some(Ok(frame)) => {
                if let (Some(download), Some(data)) = (&mut this.download, frame.data_ref()) {
                    download.hasher.update(data);
                    download.line.size += data.len() as u64;
                    if let Some(keep) = &mut this.keep {
                        keep.write(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                this.end(true);
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                this.end(false);
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream() && self.download.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why a pinned download was answered 502 instead of passed on.
#[derive(Debug, thiserror::Error)]
enum Unverified {
    #[error("{url}: the pinned download was not passed on")]
    Staging {
        url: String,
        #[source]
        source: StageError,
    },
    #[error("{url}: the upstream's body broke off, so it could not be verified")]
    Broken {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error(transparent)]
    Mismatch(Mismatch),
}

/// A pinned download, verified, served from where it was staged; its [`Download`] line is
/// sent when the body ends or is dropped, `complete` if the client was sent all of it.
struct StagedBody {
    bytes: CachedBody,
    line: Option<(Download, UnboundedSender<ProxyLine>)>,
    /// The staged file's room, given back when the body is done.
    _staging: Staging,
}

impl Drop for StagedBody {
    fn drop(&mut self) {
        if let Some((mut line, to)) = self.line.take() {
            line.complete = self.bytes.left == 0;
            Hashing::send(&to, line);
        }
    }
}

impl Body for StagedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().bytes).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.bytes.size_hint()
    }
}

/// A cached entry's bytes as a response body, holding its request's [`Exchange`] until the
/// last byte went out.
struct CachedBody {
    file: tokio::fs::File,
    left: u64,
    buf: Vec<u8>,
    _exchange: Arc<Exchange>,
}

/// The most bytes a [`CachedBody`] reads at once.
const CACHED_CHUNK: usize = 1 << 16;

impl Body for CachedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.left).map_or(CACHED_CHUNK, |left| left.min(CACHED_CHUNK));
        let mut read = tokio::io::ReadBuf::new(&mut this.buf[..want]);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut this.file), cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                let short = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the download cache's entry shrank while it was served",
                );
                Poll::Ready(Some(Err(Box::new(short))))
            }
            Poll::Ready(Ok(())) => {
                let data = Bytes::copy_from_slice(read.filled());
                this.left -= data.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// How an inspected session reaches its host.
enum Dial {
    /// `--offline`: never; each request is served from the cache or refused.
    Offline,
    /// Over this connection first, opened when the CONNECT was answered (to one of these
    /// addresses, where a TLS handshake cut short is tried again), then as `Later`.
    Connected(Upstream, Vec<SocketAddr>),
    /// At each request the download cache cannot answer: over a pooled connection to the
    /// host, else a new one to one of these addresses (with a lock, a build whose downloads
    /// are all cached opens no connection at all).
    Later(Vec<SocketAddr>),
}

/// A new upstream TCP connection: the address it went to, the stream, and which exchange
/// its bytes count for.
type Upstream = (SocketAddr, Metered<TcpStream>, Arc<TransferSlot>);

/// An inspected session's link to its host.
enum Link {
    /// Requests go over `first` (the TLS session made when the CONNECT was answered), then
    /// over pooled connections or new ones to `addrs`.
    Pool {
        addrs: Vec<SocketAddr>,
        first: Option<Connection<ProxyBody>>,
    },
    /// No TLS session to the host can be had: why (recorded once, as the CONNECT's refusal).
    Failed(String),
}

/// Why the proxy did not serve a cached entry.
#[derive(Debug, thiserror::Error)]
#[error(
    "{url}: the download cache's copy has SHA-256 {got}, contractor.lock pins {pinned}; the \
     copy was removed"
)]
struct TamperedEntry {
    url: String,
    got: String,
    pinned: String,
}

/// What a request of an inspected session is forwarded with.
struct Session<'a> {
    client: SocketAddr,
    link: &'a tokio::sync::Mutex<Link>,
    target: &'a Target,
    exchange: &'a Arc<Exchange>,
    inspection: &'a Inspection,
}

/// Counts a client connection as active for as long as it lives.
struct ConnectionGuard(Arc<Proxy>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.config.metrics.connection_closed();
    }
}

impl Proxy {
    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        self.config.metrics.connection_opened();
        let guard = ConnectionGuard(Arc::clone(&self));
        let _ = stream.set_nodelay(true);
        let limits = self.config.limits;
        // The head's timeout runs from its first byte: a client in a slow VM may connect
        // well before it writes (its event loop busy), and a connection closed unanswered
        // leaves some clients (npm 9's proxy agent) waiting minutes. Until then the
        // connection is idle, bounded by the idle timeout and the connection slots.
        let mut first_byte = [0_u8; 1];
        tokio::select! {
            first = tokio::time::timeout(limits.idle_timeout, stream.peek(&mut first_byte)) => {
                // Closed, failed or idle before its first byte: nothing to answer.
                if !matches!(first, Ok(Ok(1..))) {
                    return;
                }
            }
            () = self.stopping.cancelled() => return,
        }
        let activity = Activity::new(limits.idle_timeout);
        let over_capacity = slot.is_none();
        // The slot and the active count last as long as the client's stream, tunnel included.
        let client_stream = Metered::client(stream, Arc::clone(&activity)).holding((slot, guard));
        let proxy = Arc::clone(&self);
        let clock = Arc::clone(&activity);
        let service = service_fn(move |request| {
            let proxy = Arc::clone(&proxy);
            let clock = Arc::clone(&clock);
            async move { Ok::<_, Infallible>(proxy.handle(client, request, clock, over_capacity).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // Room for heads somewhat over the limit, so that `handle` refuses them with a
            // reason; heads past twice the limit get hyper's bare 431.
            .max_buf_size(
                limits
                    .max_header_bytes
                    .saturating_mul(2)
                    .max(crate::policy::MIN_HEADER_BYTES),
            )
            .keep_alive(!over_capacity)
            .serve_connection(TokioIo::new(client_stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        // Errors here are the client's (it hung up, sent garbage, went idle): nothing to report.
        tokio::select! {
            _ = connection.as_mut() => return,
            () = self.stopping.cancelled() => {}
        }
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            _ = connection => {}
            () = self.cut.cancelled() => {}
        }
    }

    async fn handle(
        self: Arc<Self>,
        client: SocketAddr,
        mut request: Request<Incoming>,
        activity: Arc<Activity>,
        over_capacity: bool,
    ) -> Response<ProxyBody> {
        let method = request.method().clone();
        let (target, earlier) = match self.screen(&method, &mut request, over_capacity) {
            Ok(screened) => screened,
            Err(Rejected { denial, target }) => {
                return self.refuse(client, &method, target, denial)
            }
        };
        let plain = method != Method::CONNECT && !request.headers().contains_key(header::UPGRADE);
        if self.config.offline || (plain && self.config.cache.is_some()) {
            if let Some(response) = self
                .without_network(client, &method, &mut request, &target, earlier.is_some())
                .await
            {
                return response;
            }
        }
        let admitted = match self.admit(&target, earlier).await {
            Ok(admitted) => admitted,
            Err(denial) => return self.refuse(client, &method, target, denial),
        };
        self.record(
            client,
            &method,
            &target,
            Verdict::Allow,
            admitted.reason,
            None,
        );
        let exchange = Arc::new(self.exchange(client, &method, &target, Verdict::Allow));
        if plain {
            let request = request.map(|body| body.map_err(BoxError::from).boxed());
            let result = self
                .send_plain(request, &target, &admitted.addrs, activity, &exchange)
                .await;
            return self.finish(result, &exchange);
        }
        let inspection = match method == Method::CONNECT {
            true => self.inspected(&target),
            false => None,
        };
        if let Some(inspection) = inspection {
            return self
                .connect_inspected(
                    client,
                    request,
                    target,
                    admitted.addrs,
                    exchange,
                    inspection,
                )
                .await;
        }
        let (_, upstream, _) = match self
            .connect_metered(&target, &admitted.addrs, Arc::clone(&activity), &exchange)
            .await
        {
            Ok(connected) => connected,
            Err(e) => return self.finish(Err(e), &exchange),
        };
        if method == Method::CONNECT {
            exchange.status.store(200, Ordering::Relaxed);
            let client_side = hyper::upgrade::on(&mut request);
            return self.tunnel(client_side, upstream, exchange);
        }
        let result = self.forward(request, &target, upstream, &exchange).await;
        self.finish(result, &exchange)
    }

    /// The checks that need neither the network nor the cache: the request's target, the
    /// size of its head, the connection limit and the URL rules (a matched request's path is
    /// set to the normalised one the rule checked). `Ok`: the target, and in report mode the
    /// policy refusal it would have had; `Err`: the refusal, with what is known of the target.
    fn screen(
        &self,
        method: &Method,
        request: &mut Request<Incoming>,
        over_capacity: bool,
    ) -> Result<(Target, Option<Denial>), Rejected> {
        let report = self.config.mode == Mode::Report;
        let (target, earlier) = match target_of(request) {
            Ok(target) => (target, None),
            Err(Rejected { denial, target }) if report && denial.is_policy() => {
                (target, Some(denial))
            }
            Err(rejected) => return Err(rejected),
        };
        let refused = |denial, target| Err(Rejected { denial, target });
        let limit = self.config.limits.max_header_bytes;
        let size = head_size(request);
        if size > limit {
            return refused(Denial::HeadTooLarge { size, limit }, target);
        }
        if over_capacity {
            let denial = Denial::OverCapacity(self.config.limits.max_connections);
            return refused(denial, target);
        }
        match self.check_url_rules(method, request, &target) {
            // Forward what the rule matched: the normalised path.
            Ok(Some(checked)) => {
                if !set_path(request, &checked) {
                    let url = request.uri().to_string();
                    return refused(Denial::UrlNotAllowed(url), target);
                }
            }
            Ok(None) => {}
            Err(denial) if report && denial.is_policy() => {}
            Err(denial) => return refused(denial, target),
        }
        Ok((target, earlier))
    }

    /// An admitted CONNECT that is inspected. It is answered 200 once the host is known to
    /// be reachable: a new connection to it is open, or a pooled one is alive. With pins and
    /// a cache it is answered at once (the session may need no network at all). Either way
    /// a host that fails later is recorded as this CONNECT's refusal, once.
    async fn connect_inspected(
        self: &Arc<Self>,
        client: SocketAddr,
        mut request: Request<Incoming>,
        target: Target,
        addrs: Vec<SocketAddr>,
        exchange: Arc<Exchange>,
        inspection: Inspection,
    ) -> Response<ProxyBody> {
        let lazily = self.config.cache.is_some() && !self.config.pins.is_empty();
        let pooled = self.upstreams.has(&target.host, target.port, &addrs);
        let dial = match lazily || pooled {
            true => Dial::Later(addrs),
            false => match self
                .connect_metered(&target, &addrs, self.upstream_clock(), &exchange)
                .await
            {
                Ok(upstream) => Dial::Connected(upstream, addrs),
                Err(e) => return self.finish(Err(e), &exchange),
            },
        };
        exchange.status.store(200, Ordering::Relaxed);
        let client_side = hyper::upgrade::on(&mut request);
        self.inspect(client, client_side, dial, exchange, target, inspection)
    }

    /// The answer that needs no network, if there is one: a plain `GET` of a pinned URL
    /// whose bytes are cached; offline, also an inspected CONNECT (its requests are then
    /// served from the cache alone) and a refusal of everything else. Nothing is resolved
    /// or dialled. `None`: go on to the network.
    async fn without_network(
        self: &Arc<Self>,
        client: SocketAddr,
        method: &Method,
        request: &mut Request<Incoming>,
        target: &Target,
        earlier_refusal: bool,
    ) -> Option<Response<ProxyBody>> {
        let report = self.config.mode == Mode::Report;
        let rule = match self.config.check_target(&target.host, target.port) {
            Ok(rule) if !earlier_refusal => rule,
            Ok(_) => "report mode".to_string(),
            Err(denial) if report && denial.is_policy() => "report mode".to_string(),
            Err(denial) => return Some(self.refuse(client, method, target.clone(), denial)),
        };
        if *method == Method::CONNECT {
            let Some(inspection) = self.inspected(target) else {
                let denial =
                    Denial::Offline(format!("a tunnel to {}:{}", target.host, target.port));
                return Some(self.refuse(client, method, target.clone(), denial));
            };
            let reason = format!("allowed by {rule}; offline: served from the download cache only");
            self.record(client, method, target, Verdict::Allow, reason, None);
            let exchange = Arc::new(self.exchange(client, method, target, Verdict::Allow));
            exchange.status.store(200, Ordering::Relaxed);
            let client_side = hyper::upgrade::on(request);
            return Some(self.inspect(
                client,
                client_side,
                Dial::Offline,
                exchange,
                target.clone(),
                inspection,
            ));
        }
        let url = request.uri().to_string();
        let exchange = || Arc::new(self.exchange(client, method, target, Verdict::Allow));
        if let Some(response) = self
            .served_from_cache(method.as_str(), &url, exchange)
            .await
        {
            let reason = format!("allowed by {rule}; served from the download cache");
            self.record(client, method, target, Verdict::Allow, reason, None);
            return Some(response);
        }
        if self.config.offline {
            return Some(self.refuse(client, method, target.clone(), Denial::Offline(url)));
        }
        None
    }

    /// Whether URL rules let `request` through, when only they allow its host: a plain
    /// request's URL must match one (and its normalised target, returned, is what is
    /// forwarded), and it may not ask for an `Upgrade`, whose bytes no rule could check; a
    /// CONNECT must be inspected, so that its requests can be checked in turn
    /// ([`Self::forward_inspected`]).
    fn check_url_rules(
        &self,
        method: &Method,
        request: &Request<Incoming>,
        target: &Target,
    ) -> Result<Option<String>, Denial> {
        let restricted = self.config.url_restricted(&target.host, target.port);
        if *method == Method::CONNECT {
            let unreadable = restricted && self.inspected(target).is_none();
            return match unreadable {
                true => Err(Denial::UrlRulesNeedInspection(target.host.clone())),
                false => Ok(None),
            };
        }
        if restricted && request.headers().contains_key(header::UPGRADE) {
            return Err(Denial::UpgradeUnderUrlRules(target.host.clone()));
        }
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        self.config.check_url(
            method.as_str(),
            Scheme::Http,
            &target.host,
            target.port,
            path,
        )
    }

    /// The response, or the error response for `result`, with its status recorded.
    fn finish(
        &self,
        result: Result<Response<ProxyBody>, UpstreamError>,
        exchange: &Exchange,
    ) -> Response<ProxyBody> {
        match result {
            Ok(response) => response,
            Err(e) => {
                exchange
                    .status
                    .store(e.status().as_u16(), Ordering::Relaxed);
                let mut response = error_response(e.status(), &e);
                if let UpstreamError::Busy(_) = e {
                    response.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from_static(RETRY_AFTER_SECS),
                    );
                }
                response
            }
        }
    }

    /// An idle pooled connection to one of `addrs` (all checked for this request).
    fn take_pooled(&self, addrs: &[SocketAddr]) -> Option<Pooled> {
        let mut pool = self.pool.lock().ok()?;
        for addr in addrs {
            let Some(idle) = pool.get_mut(addr) else {
                continue;
            };
            while let Some(pooled) = idle.pop() {
                if pooled.sender.is_ready() && !pooled.sender.is_closed() {
                    return Some(pooled);
                }
            }
        }
        None
    }

    /// Sends a plain request on an idle pooled connection to one of `addrs` when there is
    /// one, else on a new connection. Servers close idle connections on their own clock, so
    /// a pooled one may turn out closed only when the request is on it, unanswered: a request
    /// that may safely go twice (idempotent and without a body) then goes once more, on a
    /// new connection, instead of failing with 502; and so again while new connections end
    /// unanswered, [`SEND_ATTEMPTS`] times in all.
    async fn send_plain(
        self: &Arc<Self>,
        mut request: Request<ProxyBody>,
        target: &Target,
        addrs: &[SocketAddr],
        activity: Arc<Activity>,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        if let Some(pooled) = self.take_pooled(addrs) {
            pooled.transfer.set(Arc::clone(&exchange.transfer));
            let again = resendable(&request);
            match (self.send(pooled, request, target, exchange).await, again) {
                (Err(UpstreamError::Http(e)), Some(again)) if unanswered(&e) => request = again,
                (result, _) => return result,
            }
        }
        // On new connections: a request that may go twice goes again while the upstream
        // closes or resets the connection before answering, a bounded number of times.
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 1;
        loop {
            let (addr, upstream, transfer) = self
                .connect_metered(target, addrs, Arc::clone(&activity), exchange)
                .await?;
            let sender = self
                .handshake(upstream)
                .await
                .map_err(UpstreamError::Http)?;
            let pooled = Pooled {
                addr,
                sender,
                transfer,
            };
            let again = resendable(&request).filter(|_| attempt < SEND_ATTEMPTS);
            match (self.send(pooled, request, target, exchange).await, again) {
                (Err(UpstreamError::Http(e)), Some(again)) if unanswered(&e) => request = again,
                (result, _) => return result,
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    /// Connects to the first of `addrs` that answers, metered: its bytes count for
    /// `exchange` (through the returned slot, which a pooled connection's next exchange
    /// takes over) and keep the client's `activity` alive.
    async fn connect_metered(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
        activity: Arc<Activity>,
        exchange: &Exchange,
    ) -> Result<(SocketAddr, Metered<TcpStream>, Arc<TransferSlot>), UpstreamError> {
        let (addr, upstream) = self.connect(target, addrs).await?;
        let transfer = TransferSlot::new(Arc::clone(&exchange.transfer));
        let upstream = Metered::upstream(
            upstream,
            activity,
            Arc::clone(&transfer),
            Arc::clone(&self.config.metrics),
        );
        Ok((addr, upstream, transfer))
    }

    /// Starts an HTTP/1.1 client connection on `upstream`, driven by a task of its own.
    async fn handshake<T>(&self, upstream: T) -> Result<SendRequest<ProxyBody>, hyper::Error>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = cut.cancelled() => {}
            }
        });
        Ok(sender)
    }

    /// Sends a plain request on a pooled (or new) connection; the connection goes back to
    /// the pool once the response's body is done, and the exchange ends with the body.
    async fn send(
        self: &Arc<Self>,
        pooled: Pooled,
        request: Request<ProxyBody>,
        target: &Target,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let Pooled {
            addr,
            mut sender,
            transfer,
        } = pooled;
        let asked = (request.method().to_string(), request.uri().to_string());
        let response = sender
            .send_request(origin_form(request, target))
            .await
            .map_err(UpstreamError::Http)?;
        exchange
            .status
            .store(response.status().as_u16(), Ordering::Relaxed);
        let proxy = Arc::clone(self);
        self.tasks.spawn(async move {
            // Ready again once the response body has been read to its end.
            if sender.ready().await.is_err() || proxy.stopping.is_cancelled() {
                return;
            }
            if let Ok(mut pool) = proxy.pool.lock() {
                let idle = pool.entry(addr).or_default();
                if idle.len() < POOL_PER_ADDRESS {
                    idle.push(Pooled {
                        addr,
                        sender,
                        transfer,
                    });
                }
            }
        });
        Ok(self.passed_on(response, exchange, asked.0, asked.1).await)
    }

    /// With `--record-downloads`, the [`Hashing`] that records `response` to `method url`.
    fn downloading(
        &self,
        method: String,
        url: String,
        response: &Response<Incoming>,
    ) -> Option<Hashing> {
        let url_for_pin = url.clone();
        self.config.record_downloads.then(|| Hashing {
            line: Download {
                kind: DownloadTag::Download,
                time: DownloadTime((unix_time() * 1000.0) as u64),
                method,
                url,
                status: response.status().as_u16(),
                size: 0,
                sha256: String::new(),
                content_type: response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.len() <= MAX_CONTENT_TYPE)
                    .map(str::to_string),
                complete: false,
                pinned: self.config.pins.get(&url_for_pin).cloned(),
                from_cache: false,
                phase: None,
            },
            hasher: Sha256::new(),
            to: self.decisions.clone(),
        })
    }

    /// With `--cache`, the response to a `GET` of a pinned `url` from the cache, if this
    /// project's index says it fetched the pinned bytes from `url` (hashed again first, with
    /// the headers it was answered then), recorded as a download `from_cache`. A cached
    /// copy with other bytes is removed, recorded (a mismatch, which fails the build) and
    /// answered 502. `None`: not pinned, not cached, or not a `GET`: ask the network.
    async fn served_from_cache(
        &self,
        method: &str,
        url: &str,
        exchange: impl FnOnce() -> Arc<Exchange>,
    ) -> Option<Response<ProxyBody>> {
        let cache = self.config.cache.as_ref()?;
        let pinned = self.config.pins.get(url)?.clone();
        if method != "GET" {
            return None;
        }
        let lookup = {
            let (cache, url, pinned) = (Arc::clone(cache), url.to_string(), pinned.clone());
            tokio::task::spawn_blocking(move || cache.lookup(&url, &pinned)).await
        };
        let entry = match lookup {
            Ok(Ok(Lookup::Found(entry))) => entry,
            Ok(Ok(Lookup::Missing)) => return None,
            Ok(Ok(Lookup::Tampered { sha256, size })) => {
                let mut line = self.cached_download(url, &pinned, size, None);
                line.sha256 = sha256.clone();
                Hashing::send(&self.decisions, line);
                exchange().status.store(502, Ordering::Relaxed);
                let tampered = TamperedEntry {
                    url: url.to_string(),
                    got: sha256,
                    pinned,
                };
                return Some(error_response(StatusCode::BAD_GATEWAY, &tampered));
            }
            Ok(Err(e)) => {
                eprintln!("contractor-proxy: cannot read the download cache's copy of {url}: {e}");
                return None;
            }
            Err(_) => return None,
        };
        let line =
            self.cached_download(url, &pinned, entry.size, entry.headers.content_type.clone());
        Hashing::send(&self.decisions, line);
        let exchange = exchange();
        exchange.status.store(200, Ordering::Relaxed);
        let mut response = Response::new(
            CachedBody {
                file: tokio::fs::File::from_std(entry.file),
                left: entry.size,
                buf: vec![0; CACHED_CHUNK],
                _exchange: exchange,
            }
            .boxed(),
        );
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.size));
        let described = [
            (header::CONTENT_TYPE, &entry.headers.content_type),
            (header::CONTENT_ENCODING, &entry.headers.content_encoding),
        ];
        for (name, value) in described {
            if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name, value);
            }
        }
        Some(response)
    }

    /// The download line of `url` served from the cache: complete, pinned to `pinned`.
    fn cached_download(
        &self,
        url: &str,
        pinned: &str,
        size: u64,
        content_type: Option<String>,
    ) -> Download {
        Download {
            kind: DownloadTag::Download,
            time: DownloadTime((unix_time() * 1000.0) as u64),
            method: "GET".to_string(),
            url: url.to_string(),
            status: 200,
            size,
            sha256: pinned.to_string(),
            content_type,
            complete: true,
            pinned: Some(pinned.to_string()),
            from_cache: true,
            phase: None,
        }
    }

    /// The inspection that serves a CONNECT to `target`, if it is inspected: inspection is
    /// on, the host is a DNS name the authority covers, and no `--tunnel` rule names it.
    fn inspected(&self, target: &Target) -> Option<Inspection> {
        let inspection = self.config.inspection.as_ref()?;
        (inspection.authority.covers(&target.host)
            && self.config.tunnel.find(&target.host).is_none())
        .then(|| inspection.clone())
    }

    /// Answers 200 to a CONNECT that is inspected, then serves the client's TLS session as
    /// the host (with the build authority's certificate for it) and forwards each request
    /// over the proxy's own TLS session to the host, verified against the host's roots. A
    /// host whose certificate fails verification is refused (a `deny` decision naming why),
    /// and each request to it is answered 502 with the reason.
    fn inspect(
        self: &Arc<Self>,
        client: SocketAddr,
        client_side: hyper::upgrade::OnUpgrade,
        upstream: Dial,
        exchange: Arc<Exchange>,
        target: Target,
        inspection: Inspection,
    ) -> Response<ProxyBody> {
        let proxy = Arc::clone(self);
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = proxy.inspected_session(client, client_side, upstream, &exchange, &target, &inspection) => {}
                () = cut.cancelled() => {}
            }
            drop(exchange);
        });
        Response::new(Empty::new().map_err(|never| match never {}).boxed())
    }

    async fn inspected_session(
        self: &Arc<Self>,
        client: SocketAddr,
        client_side: hyper::upgrade::OnUpgrade,
        upstream: Dial,
        exchange: &Arc<Exchange>,
        target: &Target,
        inspection: &Inspection,
    ) {
        let Ok(upgraded) = client_side.await else {
            return; // The client left before the tunnel opened.
        };
        let server_config = match inspection.authority.server_config(&target.host) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("contractor-proxy: {e}");
                return;
            }
        };
        // A client that does not speak TLS, or does not trust the authority, ends here.
        let Ok(client_tls) = TlsAcceptor::from(server_config)
            .accept(TokioIo::new(upgraded))
            .await
        else {
            return;
        };
        // The name the client asked TLS for must be the CONNECT's host.
        if let Some(sni) = client_tls.get_ref().1.server_name() {
            if !sni.eq_ignore_ascii_case(&target.host) {
                return;
            }
        }
        let link = match upstream {
            // Offline: every request is served from the cache or refused before this is used.
            Dial::Offline => {
                Link::Failed("offline: nothing is fetched from the network".to_string())
            }
            Dial::Later(addrs) => Link::Pool { addrs, first: None },
            Dial::Connected(upstream, addrs) => {
                let tls = self
                    .dial_tls(Some(upstream), target, &addrs, exchange, inspection)
                    .await;
                match self.refused_unless_dialled(client, tls, target, exchange) {
                    Ok(first) => Link::Pool {
                        addrs,
                        first: Some(first),
                    },
                    Err(reason) => Link::Failed(reason),
                }
            }
        };
        let upstream = Arc::new(tokio::sync::Mutex::new(link));
        let inspection = inspection.clone();
        let proxy = Arc::clone(self);
        let exchange = Arc::clone(exchange);
        let target = target.clone();
        let service = service_fn(move |request| {
            let (proxy, upstream, exchange, target, inspection) = (
                Arc::clone(&proxy),
                Arc::clone(&upstream),
                Arc::clone(&exchange),
                target.clone(),
                inspection.clone(),
            );
            async move {
                let session = Session {
                    client,
                    link: &upstream,
                    target: &target,
                    exchange: &exchange,
                    inspection: &inspection,
                };
                Ok::<_, Infallible>(proxy.forward_inspected(request, session).await)
            }
        });
        let limits = self.config.limits;
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(
                limits
                    .max_header_bytes
                    .saturating_mul(2)
                    .max(crate::policy::MIN_HEADER_BYTES),
            )
            .serve_connection(TokioIo::new(client_tls), service)
            .await;
    }

    /// `tls`, or its failure recorded as a refusal of the session's CONNECT (a `deny` that
    /// names why) and returned as the reason each request gets.
    fn refused_unless_dialled<T>(
        &self,
        client: SocketAddr,
        tls: Result<T, String>,
        target: &Target,
        exchange: &Exchange,
    ) -> Result<T, String> {
        tls.inspect_err(|reason| {
            self.record(
                client,
                &Method::CONNECT,
                target,
                Verdict::Deny,
                reason.clone(),
                Some(DecisionClass::Upstream),
            );
            exchange.status.store(502, Ordering::Relaxed);
        })
    }

    /// The proxy's own TLS session to `target`, over `first` when given (the connection
    /// the CONNECT was answered with), else over a new connection to one of `addrs`. A
    /// handshake the upstream resets or closes before it completes (no byte of the client's
    /// was forwarded yet) is tried again on a new connection, [`SEND_ATTEMPTS`] times in all.
    async fn dial_tls(
        &self,
        mut first: Option<Upstream>,
        target: &Target,
        addrs: &[SocketAddr],
        exchange: &Exchange,
        inspection: &Inspection,
    ) -> Result<Connection<ProxyBody>, String> {
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 1;
        loop {
            let upstream = match first.take() {
                Some(upstream) => upstream,
                None => match self
                    .connect_metered(target, addrs, self.upstream_clock(), exchange)
                    .await
                {
                    Ok(upstream) => upstream,
                    Err(e) => return Err(format!("cannot connect to {}: {e}", target.host)),
                },
            };
            match self.upstream_tls(upstream, target, inspection).await {
                Ok(connection) => return Ok(connection),
                Err((_, true)) if attempt < SEND_ATTEMPTS => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err((reason, _)) => return Err(reason),
            }
        }
    }

    /// The proxy's own TLS session to `target` over `upstream`, verified against the
    /// host's roots, as an HTTP/2 connection where the host chose `h2` by ALPN (shared at
    /// once through the pool with every session to the host), else as an HTTP/1.1 one; the
    /// reason it failed otherwise, and whether the upstream cut the handshake short (reset
    /// or closed the connection).
    async fn upstream_tls(
        &self,
        upstream: Upstream,
        target: &Target,
        inspection: &Inspection,
    ) -> Result<Connection<ProxyBody>, (String, bool)> {
        let (addr, upstream, transfer) = upstream;
        let name = ServerName::try_from(target.host.clone()).map_err(|e| {
            (
                format!("{} is not a TLS server name: {e}", target.host),
                false,
            )
        })?;
        let tls = TlsConnector::from(Arc::clone(&inspection.upstream))
            .connect(name, upstream)
            .await
            .map_err(|e| {
                let cut = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                );
                let reason = format!(
                    "TLS to {}:{} failed (its certificate is checked against this host's trust store): {e}",
                    target.host, target.port
                );
                (reason, cut)
            })?;
        let failed = |e: hyper::Error| (format!("HTTP to {} failed: {e}", target.host), false);
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let sender = self.handshake_h2(tls).await.map_err(failed)?;
            self.upstreams.put_shared(
                &target.host,
                target.port,
                addr,
                sender.clone(),
                Arc::clone(&transfer),
            );
            return Ok(Connection {
                addr,
                sender: Sender::Http2(sender),
                transfer,
                reused: false,
            });
        }
        let sender = self.handshake(tls).await.map_err(failed)?;
        Ok(Connection {
            addr,
            sender: Sender::Http1(sender),
            transfer,
            reused: false,
        })
    }

    /// Starts an HTTP/2 client connection on `upstream`, driven by a task of its own.
    async fn handshake_h2<T>(
        &self,
        upstream: T,
    ) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, hyper::Error>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(upstream))
            .await?;
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = cut.cancelled() => {}
            }
        });
        Ok(sender)
    }

    /// A new idle clock for an upstream connection of inspected sessions: such a
    /// connection outlives the session that dialled it, so it keeps time of its own.
    fn upstream_clock(&self) -> Arc<Activity> {
        Activity::new(self.config.limits.idle_timeout)
    }

    /// A connection to the session's host for one request: the session's first one, else
    /// a pooled one (unless `pooled` is false), else a new one. A host that cannot be
    /// reached fails the session's requests from then on, its refusal recorded once.
    async fn upstream_for(
        &self,
        session: &Session<'_>,
        pooled: bool,
    ) -> Result<Connection<ProxyBody>, String> {
        let target = session.target;
        let mut link = session.link.lock().await;
        let addrs = match &mut *link {
            Link::Failed(reason) => return Err(reason.clone()),
            Link::Pool { first, addrs } => match first.take() {
                Some(first) => return Ok(first),
                None => addrs.clone(),
            },
        };
        if pooled {
            if let Some(connection) = self.upstreams.take(&target.host, target.port, &addrs) {
                return Ok(connection);
            }
        }
        let tls = self
            .dial_tls(None, target, &addrs, session.exchange, session.inspection)
            .await;
        self.refused_unless_dialled(session.client, tls, target, session.exchange)
            .inspect_err(|reason| *link = Link::Failed(reason.clone()))
    }

    /// Sends one request of an inspected session on a pooled connection to its host, else
    /// on a new one. A request that may safely go twice (idempotent, without a body) goes
    /// again on a new connection when its connection ends before answering: once after a
    /// pooled one (the server may have closed it while it was idle), and while new ones end
    /// so, [`SEND_ATTEMPTS`] times in all.
    async fn send_inspected(
        &self,
        mut request: Request<ProxyBody>,
        session: &Session<'_>,
        url: &str,
    ) -> Result<Response<Incoming>, Response<ProxyBody>> {
        let mut pooled = true;
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 1;
        loop {
            let connection = self
                .upstream_for(session, pooled)
                .await
                .map_err(|reason| error_response(StatusCode::BAD_GATEWAY, &Refused(reason)))?;
            let reused = connection.reused;
            let again = resendable(&request).filter(|_| reused || attempt < SEND_ATTEMPTS);
            match (self.send_on(connection, request, session, url).await, again) {
                (Err(e), Some(again)) if unanswered(&e) => request = again,
                (Err(e), _) => {
                    let failed = UpstreamError::Http(e);
                    return Err(error_response(StatusCode::BAD_GATEWAY, &failed));
                }
                (Ok(response), _) => return Ok(response),
            }
            if reused {
                pooled = false;
            } else {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        }
    }

    /// Sends `request` (origin-form, `Host` the session's authority) on `connection`, its
    /// bytes counted for the session; an HTTP/1.1 connection goes back to the pool once the
    /// response has been read to its end.
    async fn send_on(
        &self,
        connection: Connection<ProxyBody>,
        request: Request<ProxyBody>,
        session: &Session<'_>,
        url: &str,
    ) -> Result<Response<Incoming>, hyper::Error> {
        let Connection {
            addr,
            sender,
            transfer,
            ..
        } = connection;
        transfer.set(Arc::clone(&session.exchange.transfer));
        match sender {
            Sender::Http1(mut sender) => {
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let (upstreams, stopping) = (Arc::clone(&self.upstreams), self.stopping.clone());
                let (host, port) = (session.target.host.clone(), session.target.port);
                self.tasks.spawn(async move {
                    // Ready again once the response body has been read to its end.
                    if sender.ready().await.is_err() || stopping.is_cancelled() {
                        return;
                    }
                    upstreams.put_idle(&host, port, addr, sender, transfer);
                });
                Ok(response)
            }
            Sender::Http2(mut sender) => {
                // HTTP/2 names the authority in the request's URI (`:authority`).
                let (mut parts, body) = request.into_parts();
                parts.uri = url.parse().unwrap_or(parts.uri);
                parts.headers.remove(header::HOST);
                parts.version = Version::HTTP_2;
                sender.ready().await?;
                sender.send_request(Request::from_parts(parts, body)).await
            }
        }
    }

    /// Forwards one request of an inspected session to the host and streams the response
    /// back, recording it as `https://host[:port]/path`. The session's authority is its
    /// CONNECT target, always: a request with several Host headers, or naming another
    /// authority (Host header, absolute URI), is refused; the Host forwarded is the target.
    async fn forward_inspected(
        &self,
        request: Request<Incoming>,
        session: Session<'_>,
    ) -> Response<ProxyBody> {
        let (client, target, exchange) = (session.client, session.target, session.exchange);
        let mut path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let authority = match target.port {
            443 => target.host.clone(),
            port => format!("{}:{port}", target.host),
        };
        let method = request.method().to_string();
        if let Err(denial) = same_authority(&request, target) {
            return self.refuse_inspected(client, request.method(), target, &denial);
        }
        match self
            .config
            .check_url(&method, Scheme::Https, &target.host, target.port, &path)
        {
            // Forward what the rule matched: the normalised path.
            Ok(Some(checked)) => path = checked,
            Ok(None) => {}
            // Let through, and said so, as a plain request's decision says it.
            Err(denial) if self.config.mode == Mode::Report && denial.is_policy() => {
                let reason = format!("would be refused: {}", error_chain(&denial));
                self.record(
                    client,
                    request.method(),
                    target,
                    Verdict::Allow,
                    reason,
                    None,
                );
            }
            Err(denial) => {
                return self.refuse_inspected(client, request.method(), target, &denial);
            }
        }
        let url = format!("https://{authority}{path}");
        if let Some(response) = self
            .served_from_cache(&method, &url, || Arc::clone(exchange))
            .await
        {
            return response;
        }
        if self.config.offline {
            let denial = Denial::Offline(url);
            return self.refuse_inspected(client, request.method(), target, &denial);
        }
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.uri = path.parse().unwrap_or_default();
        // The one authority of the session, whatever the client wrote.
        parts.headers.remove(header::HOST);
        if let Ok(host) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, host);
        }
        let request = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
        let response = match self.send_inspected(request, &session, &url).await {
            Ok(response) => response,
            Err(failed) => return failed,
        };
        exchange
            .status
            .store(response.status().as_u16(), Ordering::Relaxed);
        self.passed_on(response, exchange, method, url).await
    }

    /// The upstream's `response` to `method url` as the client gets it: hop-by-hop headers
    /// and the proxy's error header removed, HTTP/1.1, its body holding `exchange` until it
    /// ends and, with `--record-downloads`, recorded. A download of a pinned URL is staged
    /// and verified before anything of it is passed on ([`Self::staged`]).
    async fn passed_on(
        &self,
        response: Response<Incoming>,
        exchange: &Arc<Exchange>,
        method: String,
        url: String,
    ) -> Response<ProxyBody> {
        let keeps =
            self.config.record_downloads && method == "GET" && response.status() == StatusCode::OK;
        let keep = match &self.config.cache {
            Some(cache) if keeps => {
                let encoding = response
                    .headers()
                    .get(header::CONTENT_ENCODING)
                    .and_then(|v| v.to_str().ok());
                cache.writer(&url, encoding)
            }
            _ => None,
        };
        let download = self.downloading(method, url, &response);
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(ERROR_HEADER);
        parts.version = Version::HTTP_11;
        match download {
            Some(download) if download.line.pinned.is_some() => {
                self.staged(parts, body, exchange, download, keep).await
            }
            download => {
                let body = EndsExchange {
                    body,
                    _exchange: Arc::clone(exchange),
                    download,
                    keep,
                };
                Response::from_parts(parts, body.boxed())
            }
        }
    }

    /// A pinned download, read whole into a staging file ([`crate::stage`]) and hashed
    /// before a byte of it is passed on: if its SHA-256 is the pinned one, it is served from
    /// there with `Content-Length` and no trailers, so that a client can only ever end the
    /// message holding the verified bytes; otherwise (other bytes, a body that broke off or
    /// is too large to stage) the client gets 502 with the reason and the `download` line
    /// says what came.
    async fn staged(
        &self,
        mut parts: http::response::Parts,
        mut body: Incoming,
        exchange: &Arc<Exchange>,
        mut download: Hashing,
        mut keep: Option<EntryWriter>,
    ) -> Response<ProxyBody> {
        let url = download.line.url.clone();
        let staged = async {
            let mut staging = self.stager.open().map_err(|source| Unverified::Staging {
                url: url.clone(),
                source,
            })?;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|source| Unverified::Broken {
                    url: url.clone(),
                    source,
                })?;
                // Trailers are dropped: the verified body goes out with its length alone.
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                staging.write(data).map_err(|source| Unverified::Staging {
                    url: url.clone(),
                    source,
                })?;
                download.hasher.update(data);
                download.line.size += data.len() as u64;
                if let Some(keep) = &mut keep {
                    keep.write(data);
                }
            }
            Ok::<_, Unverified>(staging)
        }
        .await;
        let to = download.to.clone();
        let mut staging = match staged {
            Ok(staging) => staging,
            Err(unverified) => {
                Hashing::send(&to, download.finish(false));
                exchange.status.store(502, Ordering::Relaxed);
                return error_response(StatusCode::BAD_GATEWAY, &unverified);
            }
        };
        let line = download.finish(true);
        if line.mismatched() {
            let mismatch = Unverified::Mismatch(Mismatch {
                url: line.url.clone(),
                got: line.sha256.clone(),
                pinned: line.pinned.clone().unwrap_or_default(),
            });
            Hashing::send(&to, line);
            exchange.status.store(502, Ordering::Relaxed);
            return error_response(StatusCode::BAD_GATEWAY, &mismatch);
        }
        if let Some(keep) = keep {
            keep.commit(&line.sha256, line.content_type.as_deref());
        }
        let file = match staging.reader() {
            Ok(file) => file,
            Err(e) => {
                let unverified = Unverified::Staging {
                    url,
                    source: StageError::Write(e),
                };
                Hashing::send(&to, download_cut(line));
                exchange.status.store(502, Ordering::Relaxed);
                return error_response(StatusCode::BAD_GATEWAY, &unverified);
            }
        };
        let size = staging.size();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        let body = StagedBody {
            bytes: CachedBody {
                file: tokio::fs::File::from_std(file),
                left: size,
                buf: vec![0; CACHED_CHUNK],
                _exchange: Arc::clone(exchange),
            },
            line: Some((line, to)),
            _staging: staging,
        };
        Response::from_parts(parts, body.boxed())
    }

    /// Records the refusal of a request inside an inspected session (whose access log entry
    /// is the session's) and makes its response.
    fn refuse_inspected(
        &self,
        client: SocketAddr,
        method: &Method,
        target: &Target,
        denial: &Denial,
    ) -> Response<ProxyBody> {
        self.record(
            client,
            method,
            target,
            Verdict::Deny,
            error_chain(denial),
            Some(denial.decision_class()),
        );
        self.config.metrics.denied(denial.class());
        error_response(denial.status(), denial)
    }

    /// Records a refusal and makes its response.
    fn refuse(
        self: &Arc<Self>,
        client: SocketAddr,
        method: &Method,
        target: Target,
        denial: Denial,
    ) -> Response<ProxyBody> {
        let class = Some(denial.decision_class());
        self.record(
            client,
            method,
            &target,
            Verdict::Deny,
            error_chain(&denial),
            class,
        );
        self.config.metrics.denied(denial.class());
        let status = denial.status();
        let exchange = self.exchange(client, method, &target, Verdict::Deny);
        exchange.status.store(status.as_u16(), Ordering::Relaxed);
        let mut response = error_response(status, &denial);
        if let Denial::OverCapacity(_) = denial {
            let headers = response.headers_mut();
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    fn exchange(
        self: &Arc<Self>,
        client: SocketAddr,
        method: &Method,
        target: &Target,
        verdict: Verdict,
    ) -> Exchange {
        Exchange {
            proxy: Arc::clone(self),
            started: Instant::now(),
            time: unix_time(),
            client,
            method: method.to_string(),
            target: target.clone(),
            verdict,
            status: AtomicU16::new(0),
            transfer: Arc::new(Transfer::default()),
        }
    }

    /// Why `target` may be reached and at which addresses, or why not. In report mode a
    /// policy refusal (`earlier`, or one found here) becomes the reason instead.
    async fn admit(&self, target: &Target, earlier: Option<Denial>) -> Result<Admitted, Denial> {
        let report = self.config.mode == Mode::Report;
        let mut would = earlier;
        let mut rule = None;
        match self.config.check_target(&target.host, target.port) {
            Ok(found) => rule = Some(found),
            Err(denial) if report && denial.is_policy() => {
                would.get_or_insert(denial);
            }
            Err(denial) => return Err(denial),
        }
        let resolved = self.resolve(target).await?;
        let looped = resolved.iter().find_map(|addr| self.own_for(*addr));
        let resolved: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| self.own_for(*addr).is_none())
            .collect();
        if let (true, Some(own)) = (resolved.is_empty(), looped) {
            return Err(Denial::OwnAddress(own));
        }
        let addrs = match self.config.check_addresses(&resolved) {
            Ok(addrs) => addrs,
            Err(denial) if report && denial.is_policy() => {
                would.get_or_insert(denial);
                resolved
                    .iter()
                    .map(|addr| SocketAddr::new(canonical(addr.ip()), addr.port()))
                    .collect()
            }
            Err(denial) => return Err(denial),
        };
        let reason = match (would, rule) {
            (Some(denial), _) => format!("would be refused: {}", error_chain(&denial)),
            (None, Some(rule)) => format!("allowed by {rule}"),
            (None, None) => "allowed".to_string(),
        };
        Ok(Admitted { reason, addrs })
    }

    /// The listening address of this proxy that dialling `addr` would reach, if any.
    fn own_for(&self, addr: SocketAddr) -> Option<SocketAddr> {
        self.own
            .iter()
            .copied()
            .find(|own| crate::policy::dials_itself(*own, addr))
    }

    /// The addresses of `target`: an IP address as is, a name through the resolver.
    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, Denial> {
        if let Ok(ip) = target.host.parse() {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        // Every attempt of the lookup is bounded; this bounds the wait for it as a whole.
        let timeout = self.names.longest_wait() + RETRY_BACKOFF;
        let lookup = self.names.resolve(&target.host, target.port);
        match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => Err(Denial::Unresolvable(e)),
            Err(_) => Err(Denial::Unresolvable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", timeout.as_secs_f64()),
            ))),
        }
    }

    /// A TCP connection to `addr`: made by the dialer process when there is one (it checks
    /// the address again, out of this process's reach), here otherwise.
    async fn dial(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        match &self.config.dialer {
            Some(dialer) => dialer.connect(addr, timeout).await,
            None => TcpStream::connect(addr).await,
        }
    }

    /// Connects to the first of `addrs` that answers, giving each an equal share of the
    /// connect timeout (at least a second) and all of them no more than the timeout.
    async fn connect(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
    ) -> Result<(SocketAddr, TcpStream), UpstreamError> {
        let name = format!("{}:{}", target.host, target.port);
        // Waiting for a turn does not count against the connect timeout.
        let _turn = self.gate.enter(&name).await.map_err(UpstreamError::Busy)?;
        let timeout = self.config.limits.connect_timeout;
        let share = (timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX))
            .max(Duration::from_secs(1))
            .min(timeout);
        let attempts = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
            let mut backoff = RETRY_BACKOFF;
            for round in 1..=CONNECT_ROUNDS {
                let mut all_refused = true;
                for addr in addrs {
                    match tokio::time::timeout(share, self.dial(*addr, share)).await {
                        Ok(Ok(stream)) => return Ok((*addr, stream)),
                        Ok(Err(e)) => {
                            all_refused &= refused_or_reset(&e);
                            last = e;
                        }
                        Err(_) => {
                            all_refused = false;
                            last = io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("{addr} did not answer"),
                            )
                        }
                    }
                }
                // Nothing was sent on a refused or reset connection: trying again is safe.
                if !all_refused || addrs.is_empty() || round == CONNECT_ROUNDS {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(last)
        };
        let attempted = tokio::time::timeout(timeout, attempts).await;
        if !matches!(attempted, Ok(Ok(_))) {
            // The name may have moved: the next request looks it up again.
            self.names.forget(&target.host, target.port);
        }
        match attempted {
            Ok(Ok((addr, stream))) => {
                let _ = stream.set_nodelay(true);
                Ok((addr, stream))
            }
            Ok(Err(source)) if source.kind() == io::ErrorKind::TimedOut => {
                Err(UpstreamError::ConnectTimeout {
                    target: name,
                    secs: timeout.as_secs_f64(),
                })
            }
            Ok(Err(source)) => Err(UpstreamError::Connect {
                target: name,
                source,
            }),
            Err(_) => Err(UpstreamError::ConnectTimeout {
                target: name,
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    fn record(
        &self,
        client: SocketAddr,
        method: &Method,
        target: &Target,
        decision: Verdict,
        reason: String,
        class: Option<DecisionClass>,
    ) {
        if decision == Verdict::Allow {
            self.config.metrics.allowed();
        }
        // A closed channel means nobody records decisions any more; serving goes on.
        let _ = self.decisions.send(ProxyLine::Decision(Decision {
            kind: DecisionTag::Decision,
            time: unix_time(),
            client: client.to_string(),
            method: method.to_string(),
            host: target.host.clone(),
            port: target.port,
            decision,
            reason,
            class,
            phase: None,
        }));
    }

    /// Answers 200 and, once hyper hands over the client connection, relays bytes both ways.
    fn tunnel(
        &self,
        client: hyper::upgrade::OnUpgrade,
        upstream: Metered<TcpStream>,
        exchange: Arc<Exchange>,
    ) -> Response<ProxyBody> {
        self.relay(client, upstream, exchange);
        Response::new(Empty::new().map_err(|never| match never {}).boxed())
    }

    /// Relays bytes between the upgraded client connection and `upstream` until either
    /// side closes, goes idle, or shutdown cuts it: on two threads of its own when the client
    /// side is still the plain TCP stream, on the event loop otherwise.
    fn relay(
        &self,
        client: hyper::upgrade::OnUpgrade,
        mut upstream: Metered<TcpStream>,
        exchange: Arc<Exchange>,
    ) {
        let cut = self.cut.clone();
        let metrics = Arc::clone(&self.config.metrics);
        self.tasks.spawn(async move {
            let Ok(upgraded) = client.await else {
                return; // The client left before the tunnel opened.
            };
            match upgraded.downcast::<TokioIo<Metered<TcpStream>>>() {
                Ok(parts) => {
                    let activity = Arc::clone(upstream.activity());
                    // The connection slot and the active count last until the tunnel ends.
                    let (client, _held) = parts.io.into_inner().into_parts();
                    let (upstream, _) = upstream.into_parts();
                    let relayed = crate::relay::tunnel(
                        client,
                        upstream,
                        &parts.read_buf,
                        &activity,
                        &exchange.transfer,
                        &metrics,
                    );
                    tokio::select! {
                        _ = relayed => {}
                        () = cut.cancelled() => {}
                    }
                }
                Err(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut client, &mut upstream, TUNNEL_BUFFER, TUNNEL_BUFFER) => {}
                        () = cut.cancelled() => {}
                    }
                }
            }
            drop(exchange);
        });
    }

    /// Sends the request on `upstream` in origin form and streams the response back; an
    /// `Upgrade` request that the upstream accepts (101) becomes a relay both ways.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        target: &Target,
        upstream: Metered<TcpStream>,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let upgrade = request.headers().get(header::UPGRADE).cloned();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(UpstreamError::Http)?;
        let cut = self.cut.clone();
        let held = Arc::clone(exchange);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = connection.with_upgrades() => {}
                () = cut.cancelled() => {}
            }
            drop(held);
        });
        let mut outgoing = origin_form(request, target);
        if let Some(upgrade) = &upgrade {
            let headers = outgoing.headers_mut();
            headers.insert(header::UPGRADE, upgrade.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let mut response = sender
            .send_request(outgoing)
            .await
            .map_err(UpstreamError::Http)?;
        exchange
            .status
            .store(response.status().as_u16(), Ordering::Relaxed);
        let upgraded = match client_upgrade {
            Some(client) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Some((client, hyper::upgrade::on(&mut response)))
            }
            _ => None,
        };
        let (mut parts, body) = response.into_parts();
        let accepted = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(ERROR_HEADER);
        parts.version = Version::HTTP_11;
        if let Some((client, upstream)) = upgraded {
            if let Some(accepted) = accepted {
                parts.headers.insert(header::UPGRADE, accepted);
            }
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            let exchange = Arc::clone(exchange);
            let cut = self.cut.clone();
            let relay_tasks = self.tasks.clone();
            relay_tasks.spawn(async move {
                let Ok(upstream) = upstream.await else { return };
                let Ok(client) = client.await else { return };
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    () = cut.cancelled() => {}
                }
                drop(exchange);
            });
        }
        Ok(Response::from_parts(
            parts,
            body.map_err(BoxError::from).boxed(),
        ))
    }
}

/// Where the request wants to go: `host:port` of a CONNECT, or the absolute URI of a plain
/// HTTP request (whose Host header, if any, must name the same host).
fn target_of(request: &Request<Incoming>) -> Result<Target, Rejected> {
    let uri = request.uri();
    let (host, port) = if request.method() == Method::CONNECT {
        match (uri.host(), uri.port_u16()) {
            (Some(host), Some(port)) => (host, port),
            _ => {
                return Err(Rejected {
                    denial: Denial::BadConnectTarget,
                    target: claimed_target(request),
                })
            }
        }
    } else {
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(Rejected {
                denial: Denial::NotAProxyRequest,
                target: claimed_target(request),
            });
        };
        let is_http = scheme.eq_ignore_ascii_case("http");
        let port = uri.port_u16().unwrap_or(if is_http { 80 } else { 443 });
        if !is_http {
            return Err(Rejected {
                denial: Denial::UnsupportedScheme(scheme.to_string()),
                target: Target {
                    host: best_guess(host),
                    port,
                },
            });
        }
        (host, port)
    };
    let target = match normalize_host(host) {
        Ok(host) => Target { host, port },
        Err(problem) => {
            return Err(Rejected {
                denial: Denial::BadHost(problem),
                target: Target {
                    host: best_guess(host),
                    port,
                },
            })
        }
    };
    if request.method() != Method::CONNECT {
        if let Some(named) = host_header(request.headers()) {
            if named != target.host {
                return Err(Rejected {
                    denial: Denial::HostMismatch(named),
                    target,
                });
            }
        }
    }
    Ok(target)
}

/// Whether `request`, inside the TLS session of a CONNECT to `target`, names that authority
/// alone: at most one Host header, and it and an absolute URI (if any) name the target's
/// host and, when they name a port, its port (an absolute URI without one names 443).
fn same_authority<B>(request: &Request<B>, target: &Target) -> Result<(), Denial> {
    let foreign = |named: String| Denial::ForeignAuthority {
        named,
        target: format!("{}:{}", target.host, target.port),
    };
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Denial::ManyHosts);
    }
    if let Some(value) = host {
        let named = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let same = value
            .to_str()
            .ok()
            .and_then(|value| value.parse::<Authority>().ok())
            .is_some_and(|authority| {
                normalize_host(authority.host()).is_ok_and(|host| host == target.host)
                    && authority.port_u16().is_none_or(|port| port == target.port)
            });
        if !same {
            return Err(foreign(format!("Host {named:?}")));
        }
    }
    let uri = request.uri();
    if let Some(authority) = uri.authority() {
        let same = uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            && normalize_host(authority.host()).is_ok_and(|host| host == target.host)
            && authority.port_u16().unwrap_or(443) == target.port;
        if !same {
            return Err(foreign(format!("the URI {uri}")));
        }
    }
    Ok(())
}

/// About how many bytes the request head took on the wire.
fn head_size(request: &Request<Incoming>) -> usize {
    let line = request.method().as_str().len() + request.uri().to_string().len() + 12;
    request.headers().iter().fold(line, |size, (name, value)| {
        size + name.as_str().len() + value.len() + 4
    })
}

/// `host` normalised if it can be, else as given in lower case: for the decision line of a
/// request refused anyway.
fn best_guess(host: &str) -> String {
    normalize_host(host).unwrap_or_else(|_| host.to_ascii_lowercase())
}

/// The host in the Host header, normalised; an unreadable header counts as a different host.
fn host_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::HOST)?;
    let named = value
        .to_str()
        .ok()
        .and_then(|value| value.parse::<Authority>().ok())
        .and_then(|authority| normalize_host(authority.host()).ok());
    Some(named.unwrap_or_else(|| "unreadable".to_string()))
}

/// The best guess at the target of a request that names none properly, for its decision.
fn claimed_target(request: &Request<Incoming>) -> Target {
    let uri = request.uri();
    let host = uri
        .host()
        .map(best_guess)
        .or_else(|| host_header(request.headers()));
    Target {
        host: host.unwrap_or_default(),
        port: uri.port_u16().unwrap_or(0),
    }
}

/// The request as the origin server expects it: origin-form request line, Host naming the
/// URI's authority (without any user info), no hop-by-hop headers.
fn origin_form<B>(request: Request<B>, target: &Target) -> Request<B> {
    let (mut parts, body) = request.into_parts();
    let authority = match (parts.uri.host(), parts.uri.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        (None, _) => target.host.clone(),
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, host);
    }
    Request::from_parts(parts, body)
}

/// Replaces the path and query of `request`'s URI by `target` (origin form, checked);
/// false, the request unchanged, if that makes no URI.
fn set_path<B>(request: &mut Request<B>, target: &str) -> bool {
    let Ok(path) = target.parse::<PathAndQuery>() else {
        return false;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path);
    match Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// A copy of `request` to send again should its connection fail unanswered: for a request
/// that may safely go twice, one with an idempotent method (RFC 9110, 9.2.2) and without a
/// body; `None` for any other.
fn resendable(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let idempotent = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(request.method());
    if !idempotent || !request.body().is_end_stream() {
        return None;
    }
    let mut again = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    Some(again)
}

/// Whether a connection attempt failed in a way that may pass when tried again: refused
/// (nobody listening yet, or a full queue) or reset before it was made.
fn refused_or_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// Whether `e` means the connection ended before any answer: the request was never
/// written, or written to a connection that closed or was reset without a response (over
/// TLS, a close without `close_notify` is an unexpected end of file).
fn unanswered(e: &hyper::Error) -> bool {
    let reset = e
        .source()
        .and_then(|source| source.downcast_ref::<io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        });
    e.is_canceled() || e.is_incomplete_message() || e.is_closed() || reset
}

/// Removes the hop-by-hop headers, and those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A response made by the proxy itself: the reason as short text and in [`ERROR_HEADER`].
fn error_response(status: StatusCode, error: &dyn Error) -> Response<ProxyBody> {
    let reason = error_chain(error);
    let body = Full::new(Bytes::from(format!("contractor-proxy: {reason}\n")));
    let mut response = Response::new(body.map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let printable: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&printable) {
        headers.insert(ERROR_HEADER, value);
    }
    response
}

use contractor_protocol::result::joined_chain as error_chain;

/// Seconds since the Unix epoch, to the millisecond.
fn unix_time() -> f64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since_epoch.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("accept", "*/*"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn error_response_carries_the_reason_twice() {
        let response = error_response(StatusCode::FORBIDDEN, &Denial::PortNotAllowed(22));
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[ERROR_HEADER], "port 22 not allowed");
    }

    #[test]
    fn error_chain_joins_sources() {
        let denial = Denial::Unresolvable(io::Error::other("no such host"));
        assert_eq!(
            error_chain(&denial),
            "cannot resolve the host: no such host"
        );
        let response = error_response(denial.status(), &denial);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
}
