//! Upstream connections of inspected sessions are pooled across client sessions: against
//! real local TLS servers (HTTP/1.1 and HTTP/2) that count the connections they accept.

#[allow(dead_code)]
mod served;
#[allow(dead_code)]
mod test_tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use contractor_protocol::proxy::{ProxyLine, Verdict};
use contractor_proxy::Resolver;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use served::{connect_tls, inspect_tls, open_to_loopback, start, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

const PATIENCE: Duration = Duration::from_secs(10);

/// The idle connections the proxy keeps per host (`contractor_proxy::pool::IDLE_PER_HOST`,
/// spelled out so that this test also builds against a proxy without a pool).
const IDLE_PER_HOST: usize = 16;

const HOST: &str = "registry.test";

/// Inspects TLS to [`HOST`] (answered with `upstream`, trusted through `roots`), recording
/// downloads; returns the proxy and the authority's certificate for clients to trust.
async fn inspecting(
    upstream: SocketAddr,
    roots: RootCertStore,
) -> (Running, CertificateDer<'static>) {
    let mut config = open_to_loopback(&[HOST]);
    config.resolver =
        Resolver::new(move |_host, _port| Box::pin(async move { Ok(vec![upstream]) }));
    let certificate = inspect_tls(&mut config, roots);
    (start(config).await, certificate)
}

/// A TLS server for [`HOST`] with a certificate of its own authority (returned as roots).
fn server_tls(alpn: &[&[u8]]) -> (TlsAcceptor, RootCertStore) {
    let (mut server_config, ca_cert) = test_tls::server_for(HOST);
    server_config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let roots = test_tls::roots_of(&ca_cert);
    (TlsAcceptor::from(Arc::new(server_config)), roots)
}

/// What the HTTP/1.1 server does with the `n`th request (from 0) on its `c`th connection
/// (from 0).
#[derive(Clone, Copy)]
enum Answer {
    /// Answers 200 with the body `c:n` and keeps the connection open.
    Serve,
    /// Closes the connection without a word.
    Close,
}

/// A local HTTP/1.1 TLS server counting the connections it accepted and those still open.
struct Counting {
    addr: SocketAddr,
    roots: RootCertStore,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

/// An HTTP/1.1 keep-alive server answering as `answer` says; with `hold`, the first request
/// of each connection is answered only once `hold` is passed (as many requests in at once).
/// It accepts `accepts` connections, then stops listening (connections are refused).
async fn http1_server(
    answer: fn(usize, usize) -> Answer,
    hold: Option<Arc<Barrier>>,
    accepts: usize,
) -> Counting {
    let (acceptor, roots) = server_tls(&[b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (counted, still_open) = (Arc::clone(&accepted), Arc::clone(&open));
    tokio::spawn(async move {
        for _ in 0..accepts {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let c = counted.fetch_add(1, Ordering::SeqCst);
            still_open.fetch_add(1, Ordering::SeqCst);
            let (acceptor, open, hold) = (acceptor.clone(), Arc::clone(&still_open), hold.clone());
            tokio::spawn(async move {
                serve_http1(acceptor, stream, c, answer, hold).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Counting {
        addr,
        roots,
        accepted,
        open,
    }
}

async fn serve_http1(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    c: usize,
    answer: fn(usize, usize) -> Answer,
    hold: Option<Arc<Barrier>>,
) {
    let Ok(mut tls) = acceptor.accept(stream).await else {
        return;
    };
    let mut request = Vec::new();
    let mut buf = [0; 4096];
    let mut n = 0;
    loop {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => request.extend_from_slice(&buf[..read]),
        }
        if !request.windows(4).any(|w| w == b"\r\n\r\n") {
            continue;
        }
        request.clear();
        if let (0, Some(hold)) = (n, &hold) {
            hold.wait().await;
        }
        match answer(c, n) {
            Answer::Close => return,
            Answer::Serve => {
                let body = format!("{c}:{n}");
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                if tls.write_all(head.as_bytes()).await.is_err()
                    || tls.write_all(body.as_bytes()).await.is_err()
                {
                    return;
                }
            }
        }
        n += 1;
    }
}

/// A local HTTP/2-only TLS server (ALPN `h2`) counting the connections it accepted; each
/// response says which connection and protocol served it.
async fn http2_server() -> Counting {
    let (acceptor, roots) = server_tls(&[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let body = format!("{c}:{:?}:{}", request.version(), request.uri().path());
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Counting {
        addr,
        roots,
        accepted,
        open,
    }
}

/// One inspected client session: CONNECT to [`HOST`] through `proxy`, TLS trusting
/// `authority`, one GET of `path`; its status and body.
async fn session(
    proxy: SocketAddr,
    port: u16,
    authority: &CertificateDer<'static>,
    path: &str,
) -> (u16, String) {
    session_sending(proxy, port, authority, "GET", path, "").await
}

/// [`session`] with a request of `method` and `body`.
async fn session_sending(
    proxy: SocketAddr,
    port: u16,
    authority: &CertificateDer<'static>,
    method: &str,
    path: &str,
    body: &'static str,
) -> (u16, String) {
    let tls = connect_tls(proxy, HOST, port, authority)
        .await
        .expect("TLS with the proxy as the host");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 over the session");
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", HOST)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits (at most [`PATIENCE`]) until `count` is `expected`; whether it got there.
async fn reaches(count: &AtomicUsize, expected: usize) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while count.load(Ordering::SeqCst) != expected {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn sequential_inspected_sessions_to_one_host_share_one_upstream_connection() {
    let server = http1_server(|_, _| Answer::Serve, None, usize::MAX).await;
    let (mut proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    for n in 0..5 {
        let path = format!("/package-{n}");
        let (status, body) = session(proxy.addr, port, &authority, &path).await;
        assert_eq!(status, 200, "{body}");
        // The one connection's n-th request.
        assert_eq!(body, format!("0:{n}"));
        // Each session's CONNECT is decided once and each response recorded once.
        assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
        let download = proxy.next_download().await;
        assert_eq!(download.url, format!("https://{HOST}:{port}{path}"));
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection for five sessions"
    );
    assert!(proxy.lines.try_recv().is_err(), "nothing else recorded");
}

#[tokio::test]
async fn an_http2_upstream_serves_many_concurrent_sessions_over_one_connection() {
    let server = http2_server().await;
    let (mut proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    // The first session learns that the host speaks HTTP/2 and shares its connection.
    let (status, body) = session(proxy.addr, port, &authority, "/first").await;
    assert_eq!((status, body.as_str()), (200, "0:HTTP/2.0:/first"));
    let sessions: Vec<_> = (0..20)
        .map(|n| {
            let (proxy, authority) = (proxy.addr, authority.clone());
            tokio::spawn(async move { session(proxy, port, &authority, &format!("/p{n}")).await })
        })
        .collect();
    for (n, session) in sessions.into_iter().enumerate() {
        let (status, body) = session.await.expect("session");
        assert_eq!((status, body), (200, format!("0:HTTP/2.0:/p{n}")));
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection for 21 sessions"
    );
    // 21 CONNECT decisions and 21 downloads, each once.
    let mut urls = Vec::new();
    for _ in 0..42 {
        match proxy.next_line().await {
            ProxyLine::Decision(decision) => assert_eq!(decision.decision, Verdict::Allow),
            ProxyLine::Download(download) => urls.push(download.url),
        }
    }
    urls.sort();
    urls.dedup();
    assert_eq!(urls.len(), 21);
    assert!(proxy.lines.try_recv().is_err(), "nothing else recorded");
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_not_used_for_a_failed_request() {
    // The first connection answers once, then closes without answering the next request
    // (as a server does that closes an idle connection just as a request arrives).
    let server = http1_server(
        |c, n| match (c, n) {
            (0, 1) => Answer::Close,
            _ => Answer::Serve,
        },
        None,
        usize::MAX,
    )
    .await;
    let (mut proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    let expected = ["0:0", "1:0", "1:1"];
    for (n, expected) in expected.into_iter().enumerate() {
        let path = format!("/p{n}");
        let (status, body) = session(proxy.addr, port, &authority, &path).await;
        assert_eq!((status, body.as_str()), (200, expected));
        assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
        let download = proxy.next_download().await;
        assert_eq!(download.url, format!("https://{HOST}:{port}{path}"));
    }
    // The second request went again on a new connection, which the third one reused.
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert!(
        proxy.lines.try_recv().is_err(),
        "the retry made no line of its own"
    );
}

#[tokio::test]
async fn the_pool_keeps_no_more_idle_connections_per_host_than_its_bound() {
    let sessions = IDLE_PER_HOST + 4;
    // Every first request waits until all are in, so each session has a connection of its own.
    let hold = Arc::new(Barrier::new(sessions));
    let server = http1_server(|_, _| Answer::Serve, Some(hold), usize::MAX).await;
    let (proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    let running: Vec<_> = (0..sessions)
        .map(|n| {
            let (proxy, authority) = (proxy.addr, authority.clone());
            tokio::spawn(async move { session(proxy, port, &authority, &format!("/p{n}")).await })
        })
        .collect();
    for session in running {
        assert_eq!(session.await.expect("session").0, 200);
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), sessions);
    // The proxy closes what it cannot keep, and keeps the rest open for the next sessions.
    assert!(
        reaches(&server.open, IDLE_PER_HOST).await,
        "{} upstream connections open, the pool keeps {IDLE_PER_HOST}",
        server.open.load(Ordering::SeqCst)
    );
    let (status, body) = session(proxy.addr, port, &authority, "/again").await;
    assert_eq!(status, 200);
    assert!(
        body.ends_with(":1"),
        "a kept connection's second request: {body}"
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), sessions);
    assert_eq!(server.open.load(Ordering::SeqCst), IDLE_PER_HOST);
}

#[tokio::test]
async fn a_request_with_a_body_is_not_sent_twice_when_its_pooled_connection_ends() {
    let server = http1_server(
        |c, n| match (c, n) {
            (0, 1) => Answer::Close,
            _ => Answer::Serve,
        },
        None,
        usize::MAX,
    )
    .await;
    let (mut proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    assert_eq!(session(proxy.addr, port, &authority, "/first").await.0, 200);
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let _ = proxy.next_download().await;
    let (status, reason) =
        session_sending(proxy.addr, port, &authority, "POST", "/publish", "a body").await;
    assert_eq!(status, 502, "{reason}");
    assert!(
        reason.contains("the upstream HTTP exchange failed"),
        "{reason}"
    );
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1, "not sent again");
    assert!(proxy.lines.try_recv().is_err(), "no download line");
}

#[tokio::test]
async fn a_connect_answered_over_a_pooled_connection_is_refused_once_when_the_host_is_gone() {
    // One connection, answered once; after it the server closes it unanswered and refuses
    // every new connection.
    let server = http1_server(
        |_, n| match n {
            0 => Answer::Serve,
            _ => Answer::Close,
        },
        None,
        1,
    )
    .await;
    let (mut proxy, authority) = inspecting(server.addr, server.roots.clone()).await;
    let port = server.addr.port();
    assert_eq!(session(proxy.addr, port, &authority, "/first").await.0, 200);
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let _ = proxy.next_download().await;
    // The CONNECT is answered 200 over the live pooled connection, without dialling...
    let (status, reason) = session(proxy.addr, port, &authority, "/second").await;
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    // ...and when that connection ends and no new one can be made, the request gets 502 and
    // the CONNECT one refusal naming why.
    assert_eq!(status, 502, "{reason}");
    assert!(
        reason.contains("cannot connect to registry.test"),
        "{reason}"
    );
    let refusal = proxy.next_decision().await;
    assert_eq!(refusal.decision, Verdict::Deny);
    assert_eq!(refusal.method, "CONNECT");
    assert!(
        refusal.reason.contains("cannot connect to registry.test"),
        "{refusal:?}"
    );
    assert!(proxy.lines.try_recv().is_err(), "nothing else recorded");
}
