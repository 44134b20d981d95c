//! The HTTP/1.1 server: answers GET, HEAD and PUT on the store directory.
//!
//! Reads are allowed anywhere beneath the root; writes only to
//! `/builds/<id>/artifacts/<path>`. Every request path goes through [`crate::path`] and every
//! file operation through [`crate::files`], so no answer ever reads or writes outside the
//! root. Each request is logged as one line on stderr once its response is ready. On
//! shutdown the server stops accepting, lets requests in flight finish for up to
//! [`SHUTDOWN_GRACE`], then returns.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::io::ReaderStream;

use crate::files::{self, FileError, Upload, Written};
use crate::path::StorePath;

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

/// Size of the chunks a file is read and sent in.
const READ_CHUNK: usize = 256 * 1024;

/// What to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store directory. It must exist and be a directory.
    pub root: PathBuf,
    /// Write one access-log line per request on stderr.
    pub access_log: bool,
    /// Serve only `/builds/<id>/…` of this build id; everything else is refused (403).
    /// This is how one build is kept from reading or writing another build's files.
    pub only_build: Option<String>,
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

/// A store ready to serve: its root, resolved to a canonical path.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    access_log: bool,
    only_build: Option<String>,
}

/// The body of every response.
type Body = BoxBody<Bytes, io::Error>;

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
        Ok(Store {
            root,
            access_log: config.access_log,
            only_build: config.only_build.clone(),
        })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Serves connections from `listener` until `shutdown` completes, then waits up to
    /// [`SHUTDOWN_GRACE`] for requests in flight.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let store = Arc::new(self);
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually transient (out of file descriptors, connection reset):
                        // pause rather than spin, and keep serving.
                        eprintln!("contractor-store: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let store = Arc::clone(&store);
            let service = service_fn(move |request| {
                let store = Arc::clone(&store);
                async move { Ok::<_, Infallible>(store.respond_and_log(peer, request).await) }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("contractor-store: {peer}: connection ended: {e}");
                }
            });
        }
        drop(listener);
        let in_flight = graceful.count();
        if in_flight > 0 {
            eprintln!("contractor-store: shutting down; waiting for {in_flight} connection(s)");
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            eprintln!(
                "contractor-store: connections still open after {}s; closing them",
                SHUTDOWN_GRACE.as_secs()
            );
        }
    }

    async fn respond_and_log(
        &self,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<Body> {
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
        if self.access_log {
            eprintln!(
                "contractor-store: {peer} {method} {target} {} {length} {:.3}s",
                response.status().as_u16(),
                started.elapsed().as_secs_f64()
            );
        }
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
        let path = match StorePath::parse(request.uri().path()) {
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
        if method == Method::PUT {
            let mode = match request.headers().get(MODE_HEADER).map(parse_mode) {
                None => None,
                Some(Ok(mode)) => Some(mode),
                Some(Err(value)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("{MODE_HEADER}: {value:?} is not accepted; use 0644 or 0755"),
                    )
                }
            };
            self.put(&path, mode, request.into_body()).await
        } else {
            self.get(&path, method == Method::HEAD).await
        }
    }

    async fn get(&self, path: &StorePath, head_only: bool) -> Response<Body> {
        let opened = match files::open_for_read(&self.root, path).await {
            Ok(opened) => opened,
            Err(e) => return self.file_error(path, e),
        };
        let body = if head_only {
            Empty::new().map_err(|never| match never {}).boxed()
        } else {
            let chunks = ReaderStream::with_capacity(opened.file, READ_CHUNK).map_ok(Frame::data);
            BodyExt::boxed(StreamBody::new(chunks))
        };
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(opened.len));
        response
    }

    async fn put(&self, path: &StorePath, mode: Option<u32>, mut body: Incoming) -> Response<Body> {
        if !path.is_artifact() {
            return text(
                StatusCode::FORBIDDEN,
                &format!(
                    "refused: cannot write {path}; writes are allowed only under \
                     /builds/<id>/artifacts/<path>"
                ),
            );
        }
        let mut upload = match Upload::begin(&self.root, path).await {
            Ok(upload) => upload,
            Err(e) => return self.file_error(path, e),
        };
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                // The client went away or sent a malformed body. Dropping `upload` removes
                // the temporary file; the answer probably reaches nobody.
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("upload of {path} failed: {e}"),
                    )
                }
            };
            if let Ok(data) = frame.into_data() {
                if let Err(e) = upload.write(&data).await {
                    return self.file_error(path, e);
                }
            }
        }
        match upload.commit(mode).await {
            Ok(Written::Created) => status_only(StatusCode::CREATED),
            Ok(Written::Replaced) => status_only(StatusCode::NO_CONTENT),
            Err(e) => self.file_error(path, e),
        }
    }

    /// The response for a failed file operation; server-side failures are also logged.
    fn file_error(&self, path: &StorePath, error: FileError) -> Response<Body> {
        let status = match &error {
            FileError::NotFound => StatusCode::NOT_FOUND,
            FileError::Escapes { .. } | FileError::SymlinkInPath { .. } => StatusCode::FORBIDDEN,
            FileError::NotADirectory { .. } | FileError::IsADirectory { .. } => {
                StatusCode::CONFLICT
            }
            FileError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The client sees paths relative to the store, never the host's absolute paths.
        let reason = match &error {
            FileError::NotFound => format!("{path}: not found"),
            FileError::Escapes { .. } => format!("refused: {path} leads outside the store"),
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
            FileError::Io { .. } => {
                eprintln!("contractor-store: {}", chain(&error));
                format!("{path}: internal error")
            }
        };
        text(status, &reason)
    }

    /// `file` as the client would name it: `/` plus its path beneath the root.
    fn shown(&self, file: &Path) -> String {
        match file.strip_prefix(&self.root) {
            Ok(relative) => format!("/{}", relative.display()),
            Err(_) => "a path".to_string(),
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

/// An error and its sources, joined with ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
