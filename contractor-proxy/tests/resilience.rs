//! A proxy that survives a real package manager: hundreds of connections to one name at
//! once through a resolver that cannot take them (one lookup is made, every one is
//! answered), a resolver that keeps failing (tried again, then reported), an upstream that
//! refuses a connection at first or resets one before answering (tried again, recorded
//! once), and the per-host queue of connection attempts (full: 503 with Retry-After).
//!
//! Most tests serve the library with a staged resolver (the binary's resolver is the
//! system's, which a test cannot make slow); the reset test runs the real binary.
//! `bench/proxy/dns/run` counts the binary's own DNS queries.

#[allow(dead_code)]
mod served;
#[allow(dead_code)]
mod util;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use contractor_protocol::proxy::{ProxyLine, Verdict};
use contractor_proxy::{ProxyConfig, Resolver};
use served::{connect_status, open_to_loopback, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(30);

/// Allows `rule` on any port, loopback open, names resolved by `resolver`.
fn config(rule: &str, resolver: Resolver) -> ProxyConfig {
    let mut config = open_to_loopback(&[rule]);
    config.resolver = resolver;
    config
}

/// A TCP server that accepts every connection and holds it open.
async fn holding_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// A resolver like a plain one under load: slow (200 ms an answer), and it drops the
/// lookups over `capacity` at once (they fail as timeouts). Counts the lookups.
fn overwhelmed_resolver(answer: SocketAddr, capacity: usize) -> (Resolver, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let resolver = Resolver::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        let in_flight = Arc::clone(&in_flight);
        Box::pin(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            match now > capacity {
                true => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the resolver dropped the query",
                )),
                false => Ok(vec![answer]),
            }
        })
    });
    (resolver, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_connects_to_one_name_are_all_answered_from_one_lookup() {
    let upstream = holding_server().await;
    let (resolver, asked) = overwhelmed_resolver(upstream, 10);
    let mut proxy = start(config("registry.test", resolver)).await;
    let target = format!("registry.test:{}", upstream.port());
    let clients: Vec<_> = (0..300)
        .map(|_| {
            let (proxy, target) = (proxy.addr, target.clone());
            tokio::spawn(async move {
                tokio::time::timeout(PATIENCE, connect_status(proxy, target)).await
            })
        })
        .collect();
    let mut answered = 0;
    for client in clients {
        let head = client
            .await
            .expect("client task")
            .expect("an answer in time")
            .expect("a response head");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        answered += 1;
    }
    assert_eq!(answered, 300);
    assert_eq!(asked.load(Ordering::SeqCst), 1, "one lookup for one name");
    let mut allowed = 0;
    while let Ok(line) = proxy.lines.try_recv() {
        if let ProxyLine::Decision(decision) = line {
            assert_eq!(decision.decision, Verdict::Allow, "{decision:?}");
            allowed += 1;
        }
    }
    assert_eq!(allowed, 300, "one decision line per CONNECT");
}

#[tokio::test]
async fn a_resolver_that_keeps_timing_out_is_tried_three_times_then_reported() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let resolver = Resolver::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Err(io::Error::other(
                "failed to lookup address information: Temporary failure in name resolution",
            ))
        })
    });
    let mut proxy = start(config("flaky.test", resolver)).await;
    let head = connect_status(proxy.addr, "flaky.test:443".to_string())
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("(tried 3 times)"), "{head}");
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    let Some(ProxyLine::Decision(decision)) = proxy.lines.recv().await else {
        panic!("a decision");
    };
    assert_eq!(decision.decision, Verdict::Deny);
    assert!(decision.reason.contains("tried 3 times"), "{decision:?}");
    assert!(proxy.lines.try_recv().is_err(), "one line for the request");
}

/// Fills the accept queue of a listener that never accepts, so that further connection
/// attempts to it hang (Linux drops their SYNs).
fn unanswering_server() -> (SocketAddr, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let listener = socket.listen(0).expect("listen");
    let mut queued = Vec::new();
    for _ in 0..4 {
        if let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
        {
            queued.push(stream);
        }
    }
    std::mem::forget(listener);
    (addr, queued)
}

#[tokio::test]
async fn connection_attempts_beyond_the_per_host_queue_get_503_with_retry_after() {
    let (hung, _queued) = unanswering_server();
    let resolver = Resolver::new(move |_, _| Box::pin(async move { Ok(vec![hung]) }));
    let mut config = config("busy.test", resolver);
    config.limits.connects_per_host = 1;
    config.limits.connect_queue_per_host = 1;
    config.limits.connect_timeout = Duration::from_secs(3);
    let proxy = start(config).await;
    let target = format!("busy.test:{}", hung.port());
    // One attempt in progress, one waiting: the third finds the queue full.
    let first = tokio::spawn(connect_status(proxy.addr, target.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn(connect_status(proxy.addr, target.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = connect_status(proxy.addr, target).await.expect("answer");
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(
        third.to_ascii_lowercase().contains("retry-after: "),
        "{third}"
    );
    assert!(third.contains("1 waiting"), "{third}");
    for waited in [first, second] {
        let head = waited.await.expect("task").expect("answer");
        assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    }
}

/// An HTTP server that resets the first connection once it has read the request, and
/// answers `hello` on every later one.
fn resetting_once_server() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let _ = util::read_request_head(&mut stream);
            if n == 0 {
                // SO_LINGER 0: closing sends RST, not FIN.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(
                    &stream.as_fd(),
                    nix::sys::socket::sockopt::Linger,
                    &linger,
                )
                .expect("linger");
                drop(stream);
                continue;
            }
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    addr
}

#[test]
fn a_get_whose_new_upstream_connection_is_reset_unanswered_goes_again_and_is_recorded_once() {
    let upstream = resetting_once_server();
    let port = upstream.port();
    let proxy = util::Proxy::start(&[
        "--allow",
        "localhost",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &port.to_string(),
    ]);
    let response = util::request(
        proxy.addr,
        &format!("GET http://localhost:{port}/pkg HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "hello");
    let decision = proxy.next_decision();
    assert_eq!(
        (decision.method.as_str(), decision.decision),
        ("GET", Verdict::Allow)
    );
    // The next line is the next request's: the retry made no line of its own.
    let refused = util::request(
        proxy.addr,
        "GET http://other.test/ HTTP/1.1\r\nHost: other.test",
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(proxy.next_decision().host, "other.test");
}

#[tokio::test]
async fn a_connect_refused_until_the_upstream_listens_is_tried_again_and_recorded_once() {
    // A port nobody listens on until 30 ms after the name was resolved; the proxy's first
    // attempt is refused, the next (100 ms later) finds the listener.
    let port = StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    let resolver = Resolver::new(move |_, _| {
        Box::pin(async move {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let listener = TcpListener::bind(upstream).await.expect("bind upstream");
                let (held, _) = listener.accept().await.expect("accept");
                tokio::time::sleep(PATIENCE).await;
                drop(held);
            });
            Ok(vec![upstream])
        })
    });
    let mut proxy = start(config("late.test", resolver)).await;
    let head = connect_status(proxy.addr, format!("late.test:{port}"))
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let Some(ProxyLine::Decision(decision)) = proxy.lines.recv().await else {
        panic!("a decision");
    };
    assert_eq!(decision.decision, Verdict::Allow, "{decision:?}");
    assert!(proxy.lines.try_recv().is_err(), "one line for the request");
}

/// A client in a slow VM connects, then writes its CONNECT only later (its event loop was
/// busy): the head's timeout runs from the head's first byte, so it is answered. A client
/// that starts a head and stalls is still dropped after the timeout. (npm 9's proxy agent
/// waits 300 s on a connection closed without an answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_its_connect_after_the_head_timeout_is_still_answered() {
    let upstream = holding_server().await;
    let mut config = config(
        "registry.test",
        Resolver::new(move |_, _| Box::pin(async move { Ok(vec![upstream]) })),
    );
    config.limits.header_read_timeout = Duration::from_millis(300);
    let mut proxy = start(config).await;
    let target = format!("registry.test:{}", upstream.port());

    let mut late = TcpStream::connect(proxy.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    late.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("the connection is still open");
    let mut answer = [0_u8; 12];
    tokio::time::timeout(PATIENCE, late.read_exact(&mut answer))
        .await
        .expect("answered in time")
        .expect("an answer, not a closed connection");
    assert_eq!(&answer, b"HTTP/1.1 200");
    let decision = tokio::time::timeout(PATIENCE, proxy.lines.recv())
        .await
        .expect("a decision in time");
    assert!(
        matches!(decision, Some(ProxyLine::Decision(ref d)) if d.decision == Verdict::Allow),
        "{decision:?}"
    );

    let mut stalled = TcpStream::connect(proxy.addr).await.expect("connect");
    stalled.write_all(b"CONNECT regi").await.expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stalled.read_to_end(&mut rest))
        .await
        .expect("a stalled head is dropped");
    assert!(rest.is_empty() || read.is_err(), "{rest:?}");
}
