//! The proxy server: HTTP/1.1 in, CONNECT tunnels and forwarded plain-HTTP requests out.
//!
//! Every request, allowed or not, yields exactly one [`Decision`] on the decisions channel,
//! and the proxy dials only addresses that [`ProxyConfig::check_addresses`] returned: the
//! host is resolved once, checked, and those very addresses are connected to, so a second
//! DNS answer cannot smuggle in a private address. Responses the proxy makes itself carry
//! `X-Contractor-Proxy-Error`; the same header coming from upstream is removed so that an
//! upstream cannot pose as the proxy.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use contractor_protocol::proxy::{Decision, DecisionTag, Verdict};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allowlist::{normalize_host, HostRule};
use crate::policy::{Denial, ProxyConfig};

/// How long resolving a host, or connecting to it, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long open connections and tunnels may go on after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait before accepting again after `accept` failed (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Serves proxy clients on `listener` until `shutdown` completes, sending one [`Decision`]
/// per request to `decisions` (a dropped receiver is not an error: nobody is listening).
/// After `shutdown`, no connection is accepted; open ones may finish for
/// [`SHUTDOWN_GRACE`], then whatever remains is cut. Returns when every connection is gone.
pub async fn serve(
    config: ProxyConfig,
    listener: TcpListener,
    decisions: UnboundedSender<Decision>,
    shutdown: impl Future<Output = ()>,
) {
    let proxy = Arc::new(Proxy {
        config,
        decisions,
        tasks: TaskTracker::new(),
        stopping: CancellationToken::new(),
        cut: CancellationToken::new(),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    proxy.tasks.spawn(Arc::clone(&proxy).serve_connection(stream, client));
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
    decisions: UnboundedSender<Decision>,
    /// Client connections, tunnels and upstream connections, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Shutdown was asked for: finish the request in hand, take no more.
    stopping: CancellationToken,
    /// The grace period is over: drop everything.
    cut: CancellationToken,
}

/// Where a request wants to go, host normalised.
struct Target {
    host: String,
    port: u16,
}

/// A request refused before its target was fully known, with what is known of it.
struct Rejected {
    denial: Denial,
    target: Target,
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
    #[error("connecting to {0} took longer than {secs} s", secs = CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout(String),
    #[error("the upstream HTTP exchange failed")]
    Http(#[source] hyper::Error),
}

impl UpstreamError {
    fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Connect { .. } | UpstreamError::Http(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl Proxy {
    async fn serve_connection(self: Arc<Self>, stream: TcpStream, client: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&self);
        let service = service_fn(move |request| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(client, request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        // Errors here are the client's (it hung up, sent garbage): nothing to report.
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

    async fn handle(&self, client: SocketAddr, request: Request<Incoming>) -> Response<ProxyBody> {
        let method = request.method().clone();
        let target = match target_of(&request) {
            Ok(target) => target,
            Err(Rejected { denial, target }) => {
                self.record(client, &method, &target, Err(&denial));
                return error_response(denial.status(), &denial);
            }
        };
        let admitted = self.admit(&target).await;
        self.record(
            client,
            &method,
            &target,
            admitted.as_ref().map(|(rule, _)| rule),
        );
        let addrs = match admitted {
            Ok((_, addrs)) => addrs,
            Err(denial) => return error_response(denial.status(), &denial),
        };
        let upstream = match connect(&target, &addrs).await {
            Ok(upstream) => upstream,
            Err(e) => return error_response(e.status(), &e),
        };
        if method == Method::CONNECT {
            self.tunnel(request, upstream)
        } else {
            match self.forward(request, &target, upstream).await {
                Ok(response) => response,
                Err(e) => error_response(e.status(), &e),
            }
        }
    }

    /// The rule allowing `target` and the addresses it may be reached at, or why not.
    async fn admit(&self, target: &Target) -> Result<(HostRule, Vec<SocketAddr>), Denial> {
        let rule = self.config.check_target(&target.host, target.port)?.clone();
        let resolved = resolve(target).await?;
        let addrs = self.config.check_addresses(&resolved)?;
        Ok((rule, addrs))
    }

    fn record(
        &self,
        client: SocketAddr,
        method: &Method,
        target: &Target,
        outcome: Result<&HostRule, &Denial>,
    ) {
        let (decision, reason) = match outcome {
            Ok(rule) => (Verdict::Allow, format!("allowed by {rule}")),
            Err(denial) => (Verdict::Deny, error_chain(denial)),
        };
        // A closed channel means nobody records decisions any more; serving goes on.
        let _ = self.decisions.send(Decision {
            kind: DecisionTag::Decision,
            time: unix_time(),
            client: client.to_string(),
            method: method.to_string(),
            host: target.host.clone(),
            port: target.port,
            decision,
            reason,
        });
    }

    /// Answers 200 and, once hyper hands over the client connection, relays bytes both ways.
    fn tunnel(&self, request: Request<Incoming>, mut upstream: TcpStream) -> Response<ProxyBody> {
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            let Ok(upgraded) = hyper::upgrade::on(request).await else {
                return; // The client left before the tunnel opened.
            };
            let mut client = TokioIo::new(upgraded);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                () = cut.cancelled() => {}
            }
        });
        Response::new(Empty::new().map_err(|never| match never {}).boxed())
    }

    /// Sends the request on `upstream` in origin form and streams the response back.
    async fn forward(
        &self,
        request: Request<Incoming>,
        target: &Target,
        upstream: TcpStream,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(UpstreamError::Http)?;
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = cut.cancelled() => {}
            }
        });
        let response = sender
            .send_request(origin_form(request, target))
            .await
            .map_err(UpstreamError::Http)?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(ERROR_HEADER);
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// Where the request wants to go: `host:port` of a CONNECT, or the absolute URI of a plain
/// HTTP request (whose Host header, if any, must name the same host).
fn target_of(request: &Request<Incoming>) -> Result<Target, Rejected> {
    let uri = request.uri();
    if request.method() == Method::CONNECT {
        return match (uri.host(), uri.port_u16()) {
            (Some(host), Some(port)) => Ok(Target {
                host: normalize_host(host),
                port,
            }),
            _ => Err(Rejected {
                denial: Denial::BadConnectTarget,
                target: claimed_target(request),
            }),
        };
    }
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(Rejected {
            denial: Denial::NotAProxyRequest,
            target: claimed_target(request),
        });
    };
    let is_http = scheme.eq_ignore_ascii_case("http");
    let default_port = if is_http { 80 } else { 443 };
    let target = Target {
        host: normalize_host(host),
        port: uri.port_u16().unwrap_or(default_port),
    };
    if !is_http {
        return Err(Rejected {
            denial: Denial::UnsupportedScheme(scheme.to_string()),
            target,
        });
    }
    if let Some(named) = host_header(request.headers()) {
        if named != target.host {
            return Err(Rejected {
                denial: Denial::HostMismatch(named),
                target,
            });
        }
    }
    Ok(target)
}

/// The host in the Host header, normalised; an unreadable header counts as a different host.
fn host_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::HOST)?;
    let named = value
        .to_str()
        .ok()
        .and_then(|value| value.parse::<Authority>().ok())
        .map(|authority| normalize_host(authority.host()));
    Some(named.unwrap_or_else(|| "unreadable".to_string()))
}

/// The best guess at the target of a request that names none properly, for its decision.
fn claimed_target(request: &Request<Incoming>) -> Target {
    let uri = request.uri();
    let host = uri
        .host()
        .map(normalize_host)
        .or_else(|| host_header(request.headers()));
    Target {
        host: host.unwrap_or_default(),
        port: uri.port_u16().unwrap_or(0),
    }
}

/// The addresses of `target`: an IP address as is, a name through the system resolver.
async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, Denial> {
    if let Ok(ip) = target.host.parse() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(e)) => Err(Denial::Unresolvable(e)),
        Err(_) => Err(Denial::Unresolvable(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        ))),
    }
}

/// Connects to the first of `addrs` that answers, within [`CONNECT_TIMEOUT`] in all.
async fn connect(target: &Target, addrs: &[SocketAddr]) -> Result<TcpStream, UpstreamError> {
    let name = format!("{}:{}", target.host, target.port);
    let attempts = async {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempts).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect {
            target: name,
            source,
        }),
        Err(_) => Err(UpstreamError::ConnectTimeout(name)),
    }
}

/// The request as the origin server expects it: origin-form request line, Host naming the
/// URI's authority (without any user info), no hop-by-hop headers.
fn origin_form(request: Request<Incoming>, target: &Target) -> Request<Incoming> {
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

/// `error: its source: the source's source`, on one line.
fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

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
