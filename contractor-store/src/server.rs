//! The HTTP/1.1 server: answers GET, HEAD and PUT on the store directory.
//!
//! Reads are allowed anywhere beneath the root (narrowed by `only_build` and by build
//! tokens); writes only to `/builds/<id>/artifacts/<path>` and to `/cas/sha256/<hash>`. Every
//! request path goes through [`crate::path`], every permission through [`crate::access`] and
//! every file operation through [`crate::files`], so no answer ever reads or writes outside
//! the root or outside what the caller may touch. A PUT is hashed as it arrives and kept only
//! if it matches the digest the client named and fits the size limits; otherwise nothing is
//! kept. Each request is logged as one line on stderr once its response is ready. On
//! shutdown the server stops accepting, lets requests in flight finish for up to
//! [`SHUTDOWN_GRACE`], then returns.
//!
//! What a client can hold is bounded: at most [`StoreConfig::max_connections`] connections
//! are served at once (one more is answered 503 and closed at once); a request's head must
//! arrive within hyper's header timeout (30 s, also the most a connection may sit idle
//! between requests); an upload whose body sends nothing for
//! [`StoreConfig::body_idle_timeout`] is cut (408, nothing kept).

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use http::header::{
    ACCEPT, ACCEPT_RANGES, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, EXPECT, IF_NONE_MATCH, IF_RANGE, RANGE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use crate::access::{self, Access, TokenTable};
use crate::digest::{self, DigestCache, Sha256, SHA256_HEADER};
use crate::files::{self, FileError, Upload, Written};
use crate::limits::{
    NewEntries, OverLimit, Reservation, UsageTable, ENTRY_COST, MAX_ARTIFACT_DEPTH,
    MAX_BUILD_ENTRIES,
};
use crate::path::StorePath;
use crate::range::{self, ByteRange, RangeRequest};

/// How long requests in flight may take to finish once shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Request header of a PUT that sets the stored file's mode: `0644` (the default) or
/// `0755` (an executable artifact). No other modes are accepted.
pub const MODE_HEADER: &str = "x-content-mode";

/// The mode a `MODE_HEADER` value asks for, or the value when it is not accepted.
fn parse_mode(value: &HeaderValue) -> Result<u32, String> {
    match value.to_str() {
        Ok("0644" | "644") => Ok(0o644),
        Ok("0755" | "755") => Ok(0o755),
        _ => Err(String::from_utf8_lossy(value.as_bytes()).into_owned()),
    }
}

/// Size of the chunks a large file is read and sent in.
const READ_CHUNK: usize = 1 << 20;

/// Chunks read ahead of the network.
const READ_AHEAD: usize = 4;

/// Files up to this size are read whole when opened, in the same blocking call.
const SMALL_FILE: u64 = 64 * 1024;

/// After refusing an upload midway, the store reads and discards up to this much of the rest
/// of its body, so that the client (still sending) receives the answer instead of a reset:
/// 1 GiB, the default `max_artifacts`, so that a refused upload of that size still hears
/// why. Draining writes nothing; it ends after [`DRAIN_IDLE`] without a byte, and after
/// [`DRAIN_TIME`] in all.
const DRAIN_LIMIT: u64 = 1 << 30;

/// A draining upload that sends nothing for this long is answered at once.
const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// The longest the store drains one refused upload.
const DRAIN_TIME: Duration = Duration::from_secs(60);

/// The default of [`StoreConfig::body_idle_timeout`]: 60 s.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The default of [`StoreConfig::max_connections`]: 1024, an eighth of the open files a
/// confined store may hold ([`crate::confinement::MAX_OPEN_FILES`]), which leaves room for
/// the files each connection's request may open.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The whole answer to a connection over [`StoreConfig::max_connections`].
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: 63\r\nConnection: close\r\n\r\n\
the store serves too many connections at once; try again later\n";

/// What to serve. Build it with [`StoreConfig::new`] and set the fields you need, so that
/// fields added later keep their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store directory. It must exist and be a directory.
    pub root: PathBuf,
    /// Write one access-log line per request on stderr.
    pub access_log: bool,
    /// Serve only `/builds/<id>/…` of this build id; everything else is refused (403).
    /// This is how one build is kept from reading or writing another build's files.
    pub only_build: Option<String>,
    /// Build tokens: when set, every request needs `Authorization: Bearer <token>` (401
    /// otherwise) and may touch only its build's files (403 otherwise); see
    /// [`crate::access::decide`]. A table loaded from a file is read again when the file
    /// changes.
    pub tokens: Option<TokenTable>,
    /// Largest single upload, in bytes (413 beyond it).
    pub max_artifact_bytes: Option<u64>,
    /// Largest total under one build's `artifacts/`, in bytes (413 beyond it).
    pub max_build_bytes: Option<u64>,
    /// An upload whose body sends nothing for this long is cut: answered 408, the
    /// connection closed, nothing kept. Default [`DEFAULT_BODY_IDLE_TIMEOUT`].
    pub body_idle_timeout: Duration,
    /// Most connections served at once (at least 1); each one over it is answered 503 and
    /// closed at once. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
}

impl StoreConfig {
    /// Serves `root` to everyone, no limits, no access log.
    pub fn new(root: PathBuf) -> StoreConfig {
        StoreConfig {
            root,
            access_log: false,
            only_build: None,
            tokens: None,
            max_artifact_bytes: None,
            max_build_bytes: None,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The root does not exist or cannot be resolved.
    #[error("store root {path} cannot be used; pass an existing directory to --root")]
    Root {
        /// The root as configured.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The root exists but is not a directory.
    #[error("store root {path} is not a directory; pass an existing directory to --root")]
    RootNotADirectory {
        /// The root as configured.
        path: PathBuf,
    },
}

/// The token table in use, and the file it is read again from when that changes.
#[derive(Debug)]
struct Tokens {
    table: RwLock<TokenTable>,
    /// The file's modification time when last read.
    loaded: Mutex<Option<SystemTime>>,
}

/// A store ready to serve: its root, resolved to a canonical path.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// The root held open, for reads.
    root_dir: files::RootDir,
    access_log: bool,
    only_build: Option<String>,
    tokens: Option<Tokens>,
    max_artifact_bytes: Option<u64>,
    max_build_bytes: Option<u64>,
    body_idle_timeout: Duration,
    /// One permit per connection served; none left: the next connection is refused.
    connections: Arc<tokio::sync::Semaphore>,
    usage: Arc<UsageTable>,
    digests: Arc<DigestCache>,
}

/// The body of every response.
type Body = BoxBody<Bytes, io::Error>;

/// What a PUT may write to.
enum Destination {
    /// `/builds/<id>/artifacts/...`
    Artifact { build: String },
    /// `/cas/sha256/<hash>`: content must hash to its name.
    Blob(Sha256),
}

impl Store {
    /// Checks the configured root and resolves it.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let root_error = |source| StoreError::Root {
            path: config.root.clone(),
            source,
        };
        let root = config.root.canonicalize().map_err(root_error)?;
        let metadata = root.metadata().map_err(root_error)?;
        if !metadata.is_dir() {
            return Err(StoreError::RootNotADirectory {
                path: config.root.clone(),
            });
        }
        let tokens = config.tokens.as_ref().map(|table| Tokens {
            loaded: Mutex::new(table.source().and_then(modified)),
            table: RwLock::new(table.clone()),
        });
        Ok(Store {
            root_dir: files::RootDir::open(&root),
            root,
            access_log: config.access_log,
            only_build: config.only_build.clone(),
            tokens,
            max_artifact_bytes: config.max_artifact_bytes,
            max_build_bytes: config.max_build_bytes,
            body_idle_timeout: config.body_idle_timeout,
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1))),
            usage: Arc::default(),
            digests: Arc::default(),
        })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Serves connections from `listener` until `shutdown` completes, then waits up to
    /// [`SHUTDOWN_GRACE`] for requests in flight. Runs on the caller's runtime.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        Arc::new(self).accept_loop(listener, shutdown).await;
    }

    /// As [`Store::serve`], with requests answered on `workers` threads of its own, each
    /// running a single-threaded runtime, as nginx's worker processes do: the caller's
    /// runtime accepts connections and deals them out in turn, a connection then stays on its
    /// thread, and no thread wakes another to share work. Returns once every worker has
    /// stopped; fails only if a thread or its runtime cannot be started.
    pub async fn serve_on_threads(
        self,
        listener: TcpListener,
        workers: usize,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let store = Arc::new(self);
        let mut queues = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for n in 0..workers.max(1) {
            let (queue, mut accepted) = tokio::sync::mpsc::unbounded_channel::<(
                std::net::TcpStream,
                SocketAddr,
                OwnedSemaphorePermit,
            )>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let store = Arc::clone(&store);
            let worker = move || {
                runtime.block_on(async move {
                    let connections = Connections::new();
                    // The queue closes when the acceptor stops.
                    while let Some((stream, peer, permit)) = accepted.recv().await {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => connections.serve(&store, stream, peer, permit),
                            Err(e) => eprintln!("contractor-store: {peer}: cannot serve: {e}"),
                        }
                    }
                    connections.finish().await;
                });
            };
            let thread = std::thread::Builder::new()
                .name(format!("store-worker-{n}"))
                .spawn(worker)?;
            queues.push(queue);
            threads.push(thread);
        }
        tokio::pin!(shutdown);
        let mut next = 0;
        while let Some((stream, peer)) = accept(&listener, &mut shutdown).await {
            let Some(permit) = store.admit(&stream, peer) else {
                continue;
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            // A worker's queue closes only if its thread ended (it panicked): skip it.
            let mut connection = (stream, peer, permit);
            for _ in 0..queues.len() {
                next = (next + 1) % queues.len();
                match queues[next].send(connection) {
                    Ok(()) => break,
                    Err(refused) => connection = refused.0,
                }
            }
        }
        drop(listener);
        drop(queues);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = joined.await;
        Ok(())
    }

    /// Accepts connections from `listener` and serves each on its own task until `shutdown`
    /// completes, then waits up to [`SHUTDOWN_GRACE`] for requests in flight.
    async fn accept_loop(
        self: Arc<Store>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        let connections = Connections::new();
        tokio::pin!(shutdown);
        while let Some((stream, peer)) = accept(&listener, &mut shutdown).await {
            if let Some(permit) = self.admit(&stream, peer) {
                connections.serve(&self, stream, peer, permit);
            }
        }
        drop(listener);
        connections.finish().await;
    }

    /// A permit to serve the connection just accepted, or `None` when
    /// [`StoreConfig::max_connections`] are served already: the connection is then answered
    /// 503 (if its socket takes the answer without waiting) and closed.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.connections).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                // What the client sent already is read (once, without waiting) so that the
                // close is a FIN, which lets it read the answer, rather than a reset.
                let _ = stream.try_read(&mut [0u8; 4096]);
                if self.access_log {
                    eprintln!("contractor-store: {peer} refused: too many connections");
                }
                None
            }
        }
    }

    async fn respond_and_log(
        &self,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<Body> {
        if !self.access_log {
            return self.respond(request).await;
        }
        let started = Instant::now();
        let method = request.method().clone();
        let target = request.uri().path().to_string();
        let response = self.respond(request).await;
        // Streamed files carry their length in a header; other bodies know their own size.
        let length = match response.headers().get(CONTENT_LENGTH) {
            Some(value) => value.to_str().unwrap_or("-").to_string(),
            None => response
                .body()
                .size_hint()
                .exact()
                .map_or("-".to_string(), |n| n.to_string()),
        };
        // Formatted first and written at once: stderr is unbuffered, so `eprintln!` would
        // make a system call for every piece of the line.
        let line = format!(
            "contractor-store: {peer} {method} {target} {} {length} {:.3}s\n",
            response.status().as_u16(),
            started.elapsed().as_secs_f64()
        );
        let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
        response
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        if method != Method::GET && method != Method::HEAD && method != Method::PUT {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "allowed methods: GET, HEAD, PUT",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
            return response;
        }
        let listing = method != Method::PUT && wants_listing(&request);
        let mut raw_path = request.uri().path();
        if listing && raw_path.len() > 1 {
            raw_path = raw_path.strip_suffix('/').unwrap_or(raw_path);
        }
        let path = match StorePath::parse(raw_path) {
            Ok(path) => path,
            Err(e) => return text(StatusCode::FORBIDDEN, &format!("refused: {e}")),
        };
        if let Some(id) = &self.only_build {
            let names = path.names();
            if names.len() < 3 || names[0] != "builds" || &names[1] != id {
                return text(
                    StatusCode::FORBIDDEN,
                    &format!("refused: {path} is outside this build; this store serves only /builds/{id}/"),
                );
            }
        }
        if let Some(tokens) = &self.tokens {
            let access = if method == Method::PUT {
                Access::Write
            } else {
                Access::Read
            };
            let build = match self.token_build(tokens, request.headers()) {
                Ok(build) => build,
                Err(reason) => {
                    let mut response = text(StatusCode::UNAUTHORIZED, &reason);
                    response.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"contractor-store\""),
                    );
                    return response;
                }
            };
            if let Err(reason) = access::decide(&build, &path, access) {
                return text(StatusCode::FORBIDDEN, &reason);
            }
        }
        if method == Method::PUT {
            self.put(&path, request).await
        } else if listing {
            self.list(&path, request.headers(), method == Method::HEAD)
                .await
        } else {
            self.get(&path, request.headers(), method == Method::HEAD)
                .await
        }
    }

    /// The build whose token the request carries, or why it is refused (401).
    fn token_build(&self, tokens: &Tokens, headers: &HeaderMap) -> Result<String, String> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Err(
                "this store needs a build token: send 'Authorization: Bearer <token>'".into(),
            );
        };
        let Some(token) = access::bearer(value.as_bytes()) else {
            return Err("the Authorization header must be 'Bearer <token>'".into());
        };
        if let Some(build) = tokens
            .table
            .read()
            .ok()
            .and_then(|t| t.build_for(token).map(str::to_string))
        {
            return Ok(build);
        }
        // Unknown: the token file may have gained it since it was read.
        if self.reload_tokens(tokens) {
            if let Some(build) = tokens
                .table
                .read()
                .ok()
                .and_then(|t| t.build_for(token).map(str::to_string))
            {
                return Ok(build);
            }
        }
        Err("the build token is not valid for this store".into())
    }

    /// Reads the token file again if it changed; whether it did.
    fn reload_tokens(&self, tokens: &Tokens) -> bool {
        let Some(source) = tokens
            .table
            .read()
            .ok()
            .and_then(|t| t.source().map(Path::to_path_buf))
        else {
            return false;
        };
        let Ok(mut loaded) = tokens.loaded.lock() else {
            return false;
        };
        let now = modified(&source);
        if now.is_none() || now == *loaded {
            return false;
        }
        match TokenTable::load(&source) {
            Ok(table) => {
                if let Ok(mut current) = tokens.table.write() {
                    *current = table;
                }
                *loaded = now;
                true
            }
            Err(e) => {
                // Keep the tokens already known; say why the new file was not taken.
                eprintln!(
                    "contractor-store: keeping the previous tokens: {}",
                    chain(&e)
                );
                *loaded = now;
                false
            }
        }
    }

    async fn get(&self, path: &StorePath, headers: &HeaderMap, head_only: bool) -> Response<Body> {
        // Opening (and reading a small file whole) happens right here, on the async thread,
        // as nginx does without thread pools: on a local disk these calls take microseconds,
        // and handing each one to a blocking thread halved the rate of small GETs. Large
        // files are read by a blocking thread (`file_stream`).
        let opened = match self.root_dir.open_for_read(path, SMALL_FILE) {
            Ok(opened) => opened,
            Err(e) => return self.file_error(path, e),
        };
        let etag = opened.version.etag();
        let len = opened.len;
        let header_text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        if header_text(IF_NONE_MATCH).is_some_and(|value| range::none_match(value, &etag)) {
            let mut response = status_only(StatusCode::NOT_MODIFIED);
            insert_etag(response.headers_mut(), &etag);
            return response;
        }
        let mut wanted = match header_text(RANGE) {
            Some(value)
                if header_text(IF_RANGE).is_none_or(|v| range::if_range_allows(v, &etag)) =>
            {
                range::parse_range(value, len)
            }
            _ => RangeRequest::Whole,
        };
        if wanted == RangeRequest::Unsatisfiable {
            let mut response = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                &format!("{path}: the range asked for lies beyond its {len} bytes"),
            );
            response
                .headers_mut()
                .insert(CONTENT_RANGE, header_value(&format!("bytes */{len}")));
            return response;
        }
        if let RangeRequest::Part(part) = wanted {
            if part.start == 0 && part.end + 1 == len {
                wanted = RangeRequest::Whole;
            }
        }
        let part = match wanted {
            RangeRequest::Part(part) => part,
            _ if len == 0 => ByteRange { start: 0, end: 0 },
            _ => ByteRange {
                start: 0,
                end: len - 1,
            },
        };
        let body_len = if len == 0 { 0 } else { part.len() };
        let body = if head_only || body_len == 0 {
            Empty::new().map_err(|never| match never {}).boxed()
        } else if let Some(content) = opened.content {
            // Both ends are within the file, which is at most SMALL_FILE bytes.
            let (start, end) = (part.start as usize, part.end as usize + 1);
            Full::new(content.slice(start..end))
                .map_err(|never| match never {})
                .boxed()
        } else {
            file_stream(opened.file, part.start, body_len)
        };
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
        headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        insert_etag(headers, &etag);
        if wanted != RangeRequest::Whole {
            headers.insert(
                CONTENT_RANGE,
                header_value(&format!("bytes {}-{}/{len}", part.start, part.end)),
            );
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        response
    }

    /// A JSON listing of a directory; a file is served as by [`Store::get`].
    async fn list(&self, path: &StorePath, headers: &HeaderMap, head_only: bool) -> Response<Body> {
        let (root, wanted, digests) = (self.root.clone(), path.clone(), Arc::clone(&self.digests));
        let listed =
            tokio::task::spawn_blocking(move || files::list_directory(&root, &wanted, &digests))
                .await;
        let listing = match listed {
            Ok(Ok(listing)) => listing,
            Ok(Err(FileError::NotADirectory { .. })) => {
                return self.get(path, headers, head_only).await
            }
            Ok(Err(e)) => return self.file_error(path, e),
            Err(e) => return self.internal(path, &e),
        };
        let mut json = match serde_json::to_vec(&listing) {
            Ok(json) => json,
            Err(e) => return self.internal(path, &e),
        };
        json.push(b'\n');
        let len = json.len();
        let body = if head_only {
            Empty::new().map_err(|never| match never {}).boxed()
        } else {
            Full::new(Bytes::from(json))
                .map_err(|never| match never {})
                .boxed()
        };
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
        response
    }

    async fn put(&self, path: &StorePath, request: Request<Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let headers = &parts.headers;
        let PutHead {
            destination,
            mode,
            expected,
        } = match put_request(path, headers) {
            Ok(head) => head,
            Err(response) => return *response,
        };
        let declared = body.size_hint().exact();
        // What to read and discard of a body refused before its first byte: nothing if the
        // client waits for "100 Continue" (it will not send), else what it declared.
        let expects_continue = headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let unread = if expects_continue {
            0
        } else {
            declared.unwrap_or(DRAIN_LIMIT)
        };
        if let (Some(max), Some(declared)) = (self.max_artifact_bytes, declared) {
            if declared > max {
                let response = self.too_large_artifact(path, declared, max);
                return drain_then(body, unread, response).await;
            }
        }
        if let Some(response) = too_deep(path) {
            return drain_then(body, unread, response).await;
        }
        let reservation = match self
            .reserve(&destination, path, declared.unwrap_or(0))
            .await
        {
            Ok(reservation) => reservation,
            Err(response) => return drain_then(body, unread, response).await,
        };

        let upload = match Upload::begin(&self.root, path).await {
            Ok(upload) => upload,
            Err(e) => return drain_then(body, unread, self.file_error(path, e)).await,
        };
        let (upload, reservation) = match self
            .receive(path, &destination, body, upload, reservation)
            .await
        {
            Ok(received) => received,
            Err(response) => return response,
        };
        let committed = match upload.commit(mode, expected).await {
            Ok(committed) => committed,
            Err(e) => return self.file_error(path, e),
        };
        self.digests.record(committed.version, committed.sha256);
        if let Some(reservation) = reservation {
            let replaced = match committed.written {
                Written::Created => None,
                Written::Replaced => Some(committed.replaced_len),
            };
            reservation.settle(committed.len, replaced);
        }
        let mut response = status_only(match committed.written {
            Written::Created => StatusCode::CREATED,
            Written::Replaced => StatusCode::NO_CONTENT,
        });
        response
            .headers_mut()
            .insert(SHA256_HEADER, header_value(&committed.sha256.to_hex()));
        response
    }

    /// Reads the body of a PUT of `path` into `upload`, each frame checked against the
    /// artifact and build limits and the idle timeout; the error is the response to send
    /// (the upload then removed).
    async fn receive(
        &self,
        path: &StorePath,
        destination: &Destination,
        mut body: Incoming,
        mut upload: Upload,
        mut reservation: Option<Reservation>,
    ) -> Result<(Upload, Option<Reservation>), Response<Body>> {
        loop {
            let Ok(next) = tokio::time::timeout(self.body_idle_timeout, body.frame()).await else {
                // The client stopped sending: dropping `upload` removes the temporary file,
                // and the connection is closed (its body will never be read to its end).
                drop(upload);
                return Err(self.body_stalled(path));
            };
            let Some(frame) = next else {
                break;
            };
            let frame = match frame {
                Ok(frame) => frame,
                // The client went away or sent a malformed body. Dropping `upload` removes
                // the temporary file; the answer probably reaches nobody.
                Err(e) => {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        &format!("upload of {path} failed: {e}"),
                    ))
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let received = upload.len() + data.len() as u64;
            if let Some(max) = self.max_artifact_bytes {
                if received > max {
                    drop(upload);
                    let response = self.too_large_artifact(path, received, max);
                    return Err(drain_then(body, DRAIN_LIMIT, response).await);
                }
            }
            if let Some(reservation) = &mut reservation {
                if let Err(over) = reservation.cover(received) {
                    drop(upload);
                    let response = self.too_large_build(destination, over);
                    return Err(drain_then(body, DRAIN_LIMIT, response).await);
                }
            }
            if let Err(e) = upload.write(data).await {
                drop(upload);
                return Err(drain_then(body, DRAIN_LIMIT, self.file_error(path, e)).await);
            }
        }
        Ok((upload, reservation))
    }

    /// Reserves `bytes` against the build's limit, when there is one; the error is the
    /// response to send.
    async fn reserve(
        &self,
        destination: &Destination,
        path: &StorePath,
        bytes: u64,
    ) -> Result<Option<Reservation>, Response<Body>> {
        let (Some(limit), Destination::Artifact { build }) = (self.max_build_bytes, destination)
        else {
            return Ok(None);
        };
        let usage = Arc::clone(&self.usage);
        let artifacts = self.root.join("builds").join(build).join("artifacts");
        let id = build.clone();
        let below: Vec<String> = path.names().iter().skip(3).cloned().collect();
        let reserved = tokio::task::spawn_blocking(move || {
            let new = new_entries(&artifacts, &below);
            usage.reserve(&id, &artifacts, limit, bytes, new)
        })
        .await;
        match reserved {
            Ok(Ok(Ok(reservation))) => Ok(Some(reservation)),
            Ok(Ok(Err(over))) => Err(self.too_large_build(destination, over)),
            Ok(Err(e)) => {
                eprintln!("contractor-store: cannot measure build {build}: {e}");
                Err(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot measure the artifacts of build {build}: internal error"),
                ))
            }
            Err(e) => Err(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot measure the artifacts of build {build}: {e}"),
            )),
        }
    }

    /// The answer to an upload whose body sent nothing for [`Store::body_idle_timeout`].
    fn body_stalled(&self, path: &StorePath) -> Response<Body> {
        let mut response = text(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "upload of {path}: no byte of its body arrived for {}s; nothing was kept",
                self.body_idle_timeout.as_secs_f64()
            ),
        );
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        response
    }

    fn too_large_artifact(&self, path: &StorePath, size: u64, max: u64) -> Response<Body> {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "{path}: an upload may hold at most {max} bytes (--max-artifact-bytes); this \
                 one has at least {size}; nothing was stored"
            ),
        )
    }

    fn too_large_build(&self, destination: &Destination, over: OverLimit) -> Response<Body> {
        let (build, limit) = match destination {
            Destination::Artifact { build } => (build.as_str(), self.max_build_bytes.unwrap_or(0)),
            Destination::Blob(_) => ("?", 0),
        };
        let message = match over {
            OverLimit::Bytes { would_be } => format!(
                "build {build} may use at most {limit} bytes of the host's disk for artifacts \
                 (--max-build-bytes; each file counts its size rounded up to {ENTRY_COST} \
                 bytes, each directory {ENTRY_COST}); this upload would bring it to at least \
                 {would_be}; nothing was stored"
            ),
            OverLimit::Entries { would_be } => format!(
                "build {build} may have at most {MAX_BUILD_ENTRIES} files and directories of \
                 artifacts; this upload would bring it to {would_be}; nothing was stored"
            ),
        };
        text(StatusCode::PAYLOAD_TOO_LARGE, &message)
    }

    /// The response for a failed file operation; server-side failures are also logged.
    fn file_error(&self, path: &StorePath, error: FileError) -> Response<Body> {
        if error.is_disk_full() {
            eprintln!("contractor-store: {}", chain(&error));
            return text(
                StatusCode::INSUFFICIENT_STORAGE,
                &format!(
                    "cannot store {path}: the store's disk is full; nothing of this upload \
                     was kept and files already stored are unchanged; free space on the \
                     host and retry"
                ),
            );
        }
        let status = match &error {
            FileError::NotFound => StatusCode::NOT_FOUND,
            FileError::Escapes { .. }
            | FileError::SymlinkInPath { .. }
            | FileError::Denied { .. } => StatusCode::FORBIDDEN,
            FileError::NotADirectory { .. } | FileError::IsADirectory { .. } => {
                StatusCode::CONFLICT
            }
            FileError::DigestMismatch { .. } => StatusCode::BAD_REQUEST,
            FileError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The client sees paths relative to the store, never the host's absolute paths.
        let reason = match &error {
            FileError::NotFound => format!("{path}: not found"),
            FileError::Escapes { .. } => format!("refused: {path} leads outside the store"),
            FileError::Denied { .. } => {
                // Logged: the kernel, not the store's own checks, stopped this one.
                eprintln!("contractor-store: {}", chain(&error));
                format!("refused: {path} leads outside what this store may reach")
            }
            FileError::SymlinkInPath { path: link } => {
                format!(
                    "refused: {} is a symlink; writes never pass through symlinks",
                    self.shown(link)
                )
            }
            FileError::NotADirectory { path: file } => {
                format!(
                    "cannot write {path}: {} is a file, not a directory",
                    self.shown(file)
                )
            }
            FileError::IsADirectory { .. } => format!("cannot write {path}: it is a directory"),
            FileError::DigestMismatch { expected, actual } => format!(
                "{path}: the content has SHA-256 {actual} but the request said {expected}; \
                 nothing was stored"
            ),
            FileError::Io { .. } => {
                eprintln!("contractor-store: {}", chain(&error));
                format!("{path}: internal error")
            }
        };
        text(status, &reason)
    }

    /// A 500 for a failure that is not the client's (logged).
    fn internal(&self, path: &StorePath, error: &dyn std::error::Error) -> Response<Body> {
        eprintln!("contractor-store: {path}: {}", chain(error));
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("{path}: internal error"),
        )
    }

    /// `file` as the client would name it: `/` plus its path beneath the root.
    fn shown(&self, file: &Path) -> String {
        match file.strip_prefix(&self.root) {
            Ok(relative) => format!("/{}", relative.display()),
            Err(_) => "a path".to_string(),
        }
    }
}

/// The next connection from `listener`, or `None` once `shutdown` completes.
async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    // Usually transient (out of file descriptors, connection reset): pause
                    // rather than spin, and keep serving.
                    eprintln!("contractor-store: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shutdown.as_mut() => return None,
        }
    }
}

/// The connections one runtime serves, each on a task of its own, and how to wait for them
/// at shutdown.
struct Connections {
    graceful: GracefulShutdown,
    http: hyper::server::conn::http1::Builder,
}

impl Connections {
    fn new() -> Connections {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new());
        Connections {
            graceful: GracefulShutdown::new(),
            http,
        }
    }

    /// Answers the requests of `stream` on a new task of the current runtime.
    /// The connection holds `permit` until it ends.
    fn serve(
        &self,
        store: &Arc<Store>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        // Each response goes out in one write; do not let Nagle hold it back (nginx's
        // tcp_nodelay, on by default, does the same).
        let _ = stream.set_nodelay(true);
        let store = Arc::clone(store);
        let service = service_fn(move |request| {
            let store = Arc::clone(&store);
            async move { Ok::<_, Infallible>(store.respond_and_log(peer, request).await) }
        });
        let connection = self
            .graceful
            .watch(self.http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("contractor-store: {peer}: connection ended: {e}");
            }
            drop(permit);
        });
    }

    /// Waits up to [`SHUTDOWN_GRACE`] for the requests in flight, then closes what is left.
    async fn finish(self) {
        let in_flight = self.graceful.count();
        if in_flight > 0 {
            eprintln!("contractor-store: shutting down; waiting for {in_flight} connection(s)");
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, self.graceful.shutdown())
            .await
            .is_err()
        {
            eprintln!(
                "contractor-store: connections still open after {}s; closing them",
                SHUTDOWN_GRACE.as_secs()
            );
        }
    }
}

/// Serves `config.root` on `listener` until `shutdown` completes; see [`Store::serve`].
/// Fails only if the root cannot be used.
pub async fn serve(
    config: StoreConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    Store::open(&config)?.serve(listener, shutdown).await;
    Ok(())
}

/// A plain-text response: `message` and a newline.
fn text(status: StatusCode, message: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{message}\n"))).map_err(|never| match never {});
    let mut response = Response::new(body.boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response with no body.
fn status_only(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

use contractor_protocol::result::joined_chain as chain;

/// Where a PUT to `path` writes, or why it may not (403).
/// What the head of a PUT says.
struct PutHead {
    /// Where it goes.
    destination: Destination,
    /// The mode asked for.
    mode: Option<u32>,
    /// The SHA-256 its body must have (a blob's name, or a digest header).
    expected: Option<Sha256>,
}

/// The head of a PUT of `path`; else the 4xx to send.
fn put_request(path: &StorePath, headers: &HeaderMap) -> Result<PutHead, Box<Response<Body>>> {
    let refuse = |status, reason: &str| Box::new(text(status, reason));
    let destination = destination(path).map_err(|reason| refuse(StatusCode::FORBIDDEN, &reason))?;
    let mode = match headers.get(MODE_HEADER).map(parse_mode) {
        None => None,
        Some(Ok(mode)) => Some(mode),
        Some(Err(value)) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                &format!("{MODE_HEADER}: {value:?} is not accepted; use 0644 or 0755"),
            ))
        }
    };
    let named = digest::expected_digest(
        headers.get(SHA256_HEADER).map(HeaderValue::as_bytes),
        headers.get_all("digest").iter().map(HeaderValue::as_bytes),
    );
    let mut expected = named.map_err(|reason| refuse(StatusCode::BAD_REQUEST, &reason))?;
    if let Destination::Blob(name) = &destination {
        if expected.is_some_and(|e| e != *name) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                &format!("{path}: the request's digest differs from the blob's name"),
            ));
        }
        expected = Some(*name);
    }
    Ok(PutHead {
        destination,
        mode,
        expected,
    })
}

fn destination(path: &StorePath) -> Result<Destination, String> {
    if path.is_artifact() {
        return Ok(Destination::Artifact {
            build: path.names()[1].clone(),
        });
    }
    if let [cas, algorithm, name] = path.names() {
        if cas == "cas" && algorithm == "sha256" {
            return match Sha256::from_hex(name) {
                Some(digest) if digest.to_hex() == *name => Ok(Destination::Blob(digest)),
                _ => Err(format!(
                    "refused: {path}: a blob's name must be its SHA-256 as 64 lower-case hex \
                     digits"
                )),
            };
        }
    }
    Err(format!(
        "refused: cannot write {path}; writes are allowed only under \
         /builds/<id>/artifacts/<path> and to /cas/sha256/<sha256>"
    ))
}

/// The refusal of an artifact path deeper than [`MAX_ARTIFACT_DEPTH`] below `artifacts/`.
fn too_deep(path: &StorePath) -> Option<Response<Body>> {
    let depth = path.names().len().saturating_sub(3);
    (path.is_artifact() && depth > MAX_ARTIFACT_DEPTH).then(|| {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "refused: {path} is {depth} levels below artifacts/; an artifact may be at \
                 most {MAX_ARTIFACT_DEPTH} levels deep; nothing was stored"
            ),
        )
    })
}

/// What an upload to `artifacts/<below>` adds: the directories on the way that do not
/// exist yet (`artifacts/` itself included) and whether the file is new. Blocking.
fn new_entries(artifacts: &Path, below: &[String]) -> NewEntries {
    let Some((_, parents)) = below.split_last() else {
        return NewEntries::default();
    };
    let mut dir = artifacts.to_path_buf();
    let mut dirs = 0;
    let mut missing = std::fs::symlink_metadata(&dir).is_err();
    dirs += u64::from(missing);
    for name in parents {
        dir.push(name);
        missing = missing || std::fs::symlink_metadata(&dir).is_err();
        dirs += u64::from(missing);
    }
    let file = missing || std::fs::symlink_metadata(artifacts.join(below.join("/"))).is_err();
    NewEntries { dirs, file }
}

/// Whether a GET asks for a JSON listing: `?json` in the query or JSON in `Accept`.
fn wants_listing(request: &Request<Incoming>) -> bool {
    let query = request.uri().query().unwrap_or("");
    let in_query = query
        .split('&')
        .any(|item| item == "json" || item.starts_with("json="));
    let accepts_json = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"));
    in_query || accepts_json
}

/// Reads and discards up to `limit` more bytes of `body` (see [`DRAIN_LIMIT`]), then
/// answers `response`: a client that is still sending then reads the answer rather than a
/// connection reset.
async fn drain_then(mut body: Incoming, limit: u64, response: Response<Body>) -> Response<Body> {
    let limit = limit.min(DRAIN_LIMIT);
    if limit == 0 {
        return response;
    }
    let drain = async {
        let mut seen = 0u64;
        while seen <= limit {
            match tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    response
}

/// `len` bytes of `file` from `start`, read ahead by a blocking thread in large chunks.
fn file_stream(mut file: std::fs::File, start: u64, len: u64) -> Body {
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        if start > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(start)) {
                let _ = sender.blocking_send(Err(e));
                return;
            }
        }
        let mut remaining = len;
        while remaining > 0 {
            let want = remaining.min(READ_CHUNK as u64);
            let mut chunk = Vec::with_capacity(want as usize);
            let read = (&mut file).take(want).read_to_end(&mut chunk);
            let message = match read {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being sent",
                )),
                Ok(n) => {
                    remaining -= n as u64;
                    Ok(Bytes::from(chunk))
                }
                Err(e) => Err(e),
            };
            let failed = message.is_err();
            // The receiver is gone when the client hung up: stop reading.
            if sender.blocking_send(message).is_err() || failed {
                return;
            }
        }
    });
    let chunks = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)).map_ok(Frame::data);
    BodyExt::boxed(StreamBody::new(chunks))
}

fn insert_etag(headers: &mut HeaderMap, etag: &str) {
    headers.insert(ETAG, header_value(etag));
}

/// A header value made of printable ASCII (what the store builds itself).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The modification time of `path`, if it can be read.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
