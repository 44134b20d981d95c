//! The library's `serve` in-process, against real servers on loopback: a real TLS upstream
//! through a CONNECT tunnel, and a staged resolver where DNS answers must be controlled
//! (a private answer, a failing first address, the proxy's own address, a silent address).

#[allow(dead_code)]
mod served;
#[allow(dead_code)]
mod test_tls;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use contractor_protocol::proxy::Verdict;
use contractor_proxy::{Allowlist, ProxyConfig, Resolver};
use served::{connect_tls, inspect_tls, open_to_loopback, start, start_on};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const PATIENCE: Duration = Duration::from_secs(10);

/// Allows `rules` on any port, loopback networks open, DNS answered by `answers`.
fn config(rules: &[&str], answers: Vec<SocketAddr>) -> ProxyConfig {
    let mut config = open_to_loopback(rules);
    let answers = Arc::new(answers);
    config.resolver = Resolver::new(move |host, _port| {
        let answers = Arc::clone(&answers);
        let host = host.to_string();
        Box::pin(async move {
            if host.ends_with(".invalid") {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such host (staged)",
                ));
            }
            Ok(answers.to_vec())
        })
    });
    config
}

/// Sends `head` (with `Connection: close` added) and reads the whole response.
async fn request(proxy: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream
        .write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

/// An HTTP server answering every connection with `hello`.
async fn hello_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    )
                    .await;
            });
        }
    });
    addr
}

/// An address nobody listens on.
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

fn status_and_error(response: &str) -> (u16, Option<String>) {
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let error = response
        .lines()
        .take_while(|line| !line.is_empty())
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("x-contractor-proxy-error: ")
                .map(|_| line["x-contractor-proxy-error: ".len()..].to_string())
        });
    (status, error)
}

#[tokio::test]
async fn a_real_tls_upstream_answers_through_a_connect_tunnel() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let server_config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls");
    let tls_addr = tls_listener.local_addr().expect("tls addr");
    tokio::spawn(async move {
        let (stream, _) = tls_listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(stream).await.expect("tls handshake");
        let mut buf = [0; 4096];
        let n = tls.read(&mut buf).await.expect("read request");
        assert!(buf[..n].starts_with(b"GET /secret HTTP/1.1\r\n"));
        tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello tls!")
            .await
            .expect("answer");
        tls.shutdown().await.expect("close");
    });

    let mut proxy = start(config(&["localhost"], vec![tls_addr])).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let port = tls_addr.port();
    stream
        .write_all(
            format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("CONNECT");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("head byte"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut roots = RootCertStore::empty();
    roots.add(cert).expect("trust the test certificate");
    let client_config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(client_config));
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, stream)
        .await
        .expect("tls through the tunnel");
    tls.write_all(b"GET /secret HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.ends_with("hello tls!"), "{response}");
    let decision = proxy.next_decision().await;
    assert_eq!(decision.decision, Verdict::Allow);
    assert_eq!(decision.reason, "allowed by localhost");
}

#[tokio::test]
async fn a_name_answered_with_a_private_address_is_refused() {
    let answers = vec!["10.1.2.3:80".parse().expect("addr")];
    let mut proxy = start(config(&["intranet.test"], answers)).await;
    let response = request(
        proxy.addr,
        "GET http://intranet.test/ HTTP/1.1\r\nHost: intranet.test",
    )
    .await;
    assert_eq!(
        status_and_error(&response),
        (403, Some("address 10.1.2.3 is private".into()))
    );
    assert_eq!(proxy.next_decision().await.decision, Verdict::Deny);
}

#[tokio::test]
async fn the_next_allowed_address_is_tried_when_one_fails_and_nothing_is_resolved_twice() {
    let good = hello_server().await;
    // A refusing address first, then a private one (never dialled), then the good one.
    let refused = closed_port();
    let answers = vec![refused, "192.168.0.1:1".parse().expect("addr"), good];
    let mut config = config(&["multi.test"], answers.clone());
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&lookups);
    config.resolver = Resolver::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        let answers = answers.clone();
        Box::pin(async move { Ok(answers) })
    });
    let mut proxy = start(config).await;
    let port = good.port();
    let response = request(
        proxy.addr,
        &format!("GET http://multi.test:{port}/ HTTP/1.1\r\nHost: multi.test:{port}"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        1,
        "resolved once, dialled what was checked"
    );
}

#[tokio::test]
async fn dns_failure_is_502_with_the_reason() {
    let mut proxy = start(config(&["*.invalid"], vec![])).await;
    let response = request(
        proxy.addr,
        "GET http://gone.invalid/ HTTP/1.1\r\nHost: gone.invalid",
    )
    .await;
    let (status, error) = status_and_error(&response);
    assert_eq!(status, 502, "{response}");
    assert_eq!(
        error.as_deref(),
        Some("cannot resolve the host: no such host (staged)")
    );
    assert_eq!(proxy.next_decision().await.decision, Verdict::Deny);
}

#[tokio::test]
async fn a_name_that_resolves_to_the_proxy_itself_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let own = listener.local_addr().expect("addr");
    let mut proxy = start_on(config(&["loop.test"], vec![own]), listener).await;
    let port = own.port();
    let response = request(
        proxy.addr,
        &format!("GET http://loop.test:{port}/ HTTP/1.1\r\nHost: loop.test:{port}"),
    )
    .await;
    assert_eq!(
        status_and_error(&response),
        (
            403,
            Some(format!("{own} is the proxy's own listening address"))
        )
    );
    assert_eq!(proxy.next_decision().await.decision, Verdict::Deny);
}

#[tokio::test]
async fn an_upstream_that_never_answers_the_handshake_is_504() {
    // A listener that never accepts, its backlog filled: further SYNs are dropped.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let silent = socket.listen(0).expect("listen");
    let silent_addr = silent.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(silent_addr)).await
        {
            fillers.push(stream);
        }
    }
    let mut config = config(&["slow.test"], vec![silent_addr]);
    config.limits.connect_timeout = Duration::from_secs(1);
    let mut proxy = start(config).await;
    let port = silent_addr.port();
    let response = request(
        proxy.addr,
        &format!("GET http://slow.test:{port}/ HTTP/1.1\r\nHost: slow.test:{port}"),
    )
    .await;
    let (status, error) = status_and_error(&response);
    assert_eq!(status, 504, "{response}");
    assert!(
        error
            .is_some_and(|e| e.starts_with(&format!("connecting to slow.test:{port} took longer"))),
        "{response}"
    );
    // Allowed by the policy; the failure came after.
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    drop(silent);
}

#[tokio::test]
async fn each_forwarded_response_is_recorded_with_the_sha256_of_its_body() {
    let upstream = hello_server().await;
    let port = upstream.port();
    let mut recording = config(&["files.test"], vec![upstream]);
    recording.record_downloads = true;
    let mut proxy = start(recording).await;
    let url = format!("http://files.test:{port}/pool/hello.txt");
    let response = request(
        proxy.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: files.test:{port}"),
    )
    .await;
    assert!(response.ends_with("hello"), "{response}");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let download = proxy.next_download().await;
    assert_eq!(
        (
            download.method.as_str(),
            download.url.as_str(),
            download.status
        ),
        ("GET", url.as_str(), 200)
    );
    assert_eq!(download.size, 5);
    // sha256("hello"), as sha256sum prints it.
    assert_eq!(
        download.sha256,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert!(download.complete);

    // Without the setting, nothing but the decision.
    let mut quiet = start(config(&["files.test"], vec![upstream])).await;
    request(
        quiet.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: files.test:{port}"),
    )
    .await;
    assert_eq!(quiet.next_decision().await.decision, Verdict::Allow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(quiet.lines.try_recv().is_err(), "no download line");
}

/// A TLS server for `name` with a certificate of its own test authority (returned, for the
/// proxy's upstream roots), answering each request with `body` and keeping the connection.
async fn tls_server(name: &str, body: &'static [u8]) -> (SocketAddr, RootCertStore) {
    tls_server_with(name, Some(body)).await
}

/// [`tls_server`], answering each request with `body`, or with the request's own head.
async fn tls_server_with(name: &str, body: Option<&'static [u8]>) -> (SocketAddr, RootCertStore) {
    let (server_config, ca_cert) = test_tls::server_for(name);
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0; 4096];
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if request.windows(4).any(|w| w == b"\r\n\r\n") {
                        let body = body.map_or(std::mem::take(&mut request), <[u8]>::to_vec);
                        request.clear();
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/x-tar\r\n\r\n", body.len());
                        if tls.write_all(head.as_bytes()).await.is_err()
                            || tls.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    let roots = test_tls::roots_of(&ca_cert);
    (addr, roots)
}

/// Sends GET `path` on `tls` and reads one response with its Content-Length body.
async fn get(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> String {
    send_head(tls, &format!("GET {path} HTTP/1.1\r\nHost: {host}")).await
}

use tokio_rustls::rustls::pki_types as rustls_cert;

/// A configuration allowing `rules`, recording downloads and inspecting TLS with a new
/// authority (its certificate returned, for the client to trust) and upstream `roots`.
fn inspecting(
    rules: &[&str],
    upstream: SocketAddr,
    roots: RootCertStore,
) -> (ProxyConfig, rustls_cert::CertificateDer<'static>) {
    let (urls, hosts): (Vec<&str>, Vec<&str>) = rules.iter().partition(|r| r.contains("://"));
    let mut config = config(&hosts, vec![upstream]);
    config.url_rules = urls.iter().map(|r| r.parse().expect("URL rule")).collect();
    let certificate = inspect_tls(&mut config, roots);
    (config, certificate)
}

#[tokio::test]
async fn inspected_tls_is_forwarded_over_verified_tls_and_each_response_recorded() {
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let (config, authority) = inspecting(&["crates.test"], upstream, roots);
    let mut proxy = start(config).await;
    let port = upstream.port();
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("the client trusts the build authority's certificate for crates.test");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    // Two requests on one connection, each recorded with its URL and hash.
    for path in ["/api/v1/crates/itoa/1.0.0/download", "/second"] {
        let response = get(&mut tls, "crates.test", path).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("crate bytes"), "{response}");
        let download = proxy.next_download().await;
        assert_eq!(download.url, format!("https://crates.test:{port}{path}"));
        assert_eq!(download.size, 11);
        // sha256("crate bytes"), as sha256sum prints it.
        assert_eq!(
            download.sha256,
            "6c1a3e927bfe496d41c3f8c58bec46b4a964aa6435fd05fa55e52a0491a34159"
        );
        assert_eq!(download.content_type.as_deref(), Some("application/x-tar"));
    }
}

/// A TCP front for `behind` that resets the first connection once the client spoke
/// (SO_LINGER 0), and relays every later one to `behind`.
async fn resetting_once_front(behind: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                let mut hello = [0; 16];
                let _ = stream.read(&mut hello).await;
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(
                    &std::os::fd::AsFd::as_fd(&stream),
                    nix::sys::socket::sockopt::Linger,
                    &linger,
                )
                .expect("linger");
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(behind).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_inspected_handshake_the_upstream_resets_is_tried_again_on_a_new_connection() {
    let (server, roots) = tls_server("crates.test", b"crate bytes").await;
    let front = resetting_once_front(server).await;
    let (config, authority) = inspecting(&["crates.test"], front, roots);
    let mut proxy = start(config).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", front.port(), &authority)
        .await
        .expect("the client's TLS");
    let response = get(&mut tls, "crates.test", "/index").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("crate bytes"), "{response}");
    // One decision for the CONNECT, one download for the response: the retry is silent.
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let download = proxy.next_download().await;
    assert!(download.url.ends_with("/index"), "{download:?}");
    assert!(proxy.lines.try_recv().is_err(), "nothing else recorded");
}

#[tokio::test]
async fn an_upstream_certificate_this_host_does_not_trust_is_refused_and_named() {
    let (upstream, _its_roots) = tls_server("crates.test", b"crate bytes").await;
    // The proxy trusts another authority only.
    let (_, other_roots) = tls_server("other.test", b"").await;
    let (config, authority) = inspecting(&["crates.test"], upstream, other_roots);
    let mut proxy = start(config).await;
    let port = upstream.port();
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("the client side still speaks TLS");
    let response = get(&mut tls, "crates.test", "/").await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        response
            .to_lowercase()
            .contains("x-contractor-proxy-error: tls to crates.test"),
        "{response}"
    );
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let refused = proxy.next_decision().await;
    assert_eq!(refused.decision, Verdict::Deny);
    assert!(refused.reason.contains("certificate"), "{}", refused.reason);
}

#[tokio::test]
async fn a_tunnel_rule_keeps_a_host_out_of_inspection() {
    let (upstream, roots) = tls_server("pinned.test", b"pinned").await;
    let (mut config, authority) = inspecting(&["pinned.test"], upstream, roots);
    config.tunnel = Allowlist::parse(["pinned.test"]).expect("rule");
    let proxy = start(config).await;
    // The build authority's certificate is not offered: the host's own is.
    let refused = connect_tls(proxy.addr, "pinned.test", upstream.port(), &authority).await;
    assert!(refused.is_err(), "the tunnel was inspected");
}

#[tokio::test]
async fn a_pinned_download_with_other_bytes_never_reaches_the_client_whole() {
    let upstream = hello_server().await;
    let port = upstream.port();
    let url = format!("http://files.test:{port}/hello.txt");
    let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let other = "0000000000000000000000000000000000000000000000000000000000000000";
    for (pin, whole) in [(hello, true), (other, false)] {
        let mut pinned = config(&["files.test"], vec![upstream]);
        pinned.record_downloads = true;
        pinned.pins = Arc::new([(url.clone(), pin.to_string())].into_iter().collect());
        let mut proxy = start(pinned).await;
        let response = request(
            proxy.addr,
            &format!("GET {url} HTTP/1.1\r\nHost: files.test:{port}"),
        )
        .await;
        assert_eq!(response.ends_with("\r\n\r\nhello"), whole, "{response}");
        assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
        let download = proxy.next_download().await;
        assert_eq!(download.sha256, hello, "the hash of what the upstream sent");
        assert_eq!(download.pinned.as_deref(), Some(pin));
        assert_eq!(download.mismatched(), !whole);
    }
}

#[tokio::test]
async fn url_rules_allow_some_requests_of_an_inspected_host_and_refuse_the_rest_by_url() {
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let port = upstream.port();
    let rule = format!("GET https://crates.test:{port}/api/**");
    let (config, authority) = inspecting(&[&rule], upstream, roots);
    let mut proxy = start(config).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("a host of a URL rule is inspected with a certificate for it");
    let allowed = proxy.next_decision().await;
    assert_eq!(allowed.decision, Verdict::Allow);
    assert!(
        allowed.reason.contains("URL rules for crates.test"),
        "{}",
        allowed.reason
    );
    let response = get(&mut tls, "crates.test", "/api/v1/crates/itoa/download").await;
    assert!(response.ends_with("crate bytes"), "{response}");
    assert_eq!(proxy.next_download().await.status, 200);
    for path in ["/index/itoa", "/api/../index/itoa", "/api/%2e%2e/index"] {
        let response = get(&mut tls, "crates.test", path).await;
        assert!(response.starts_with("HTTP/1.1 403"), "{path}: {response}");
        let refused = proxy.next_decision().await;
        assert_eq!(refused.decision, Verdict::Deny);
        let url = format!("https://crates.test:{port}{path}");
        assert!(refused.reason.contains(&url), "{}", refused.reason);
    }
    // Another method is refused too; the session goes on serving what is allowed.
    tls.write_all(b"POST /api/v1/x HTTP/1.1\r\nHost: crates.test\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("request");
    let refused = proxy.next_decision().await;
    assert!(refused.reason.contains("/api/v1/x"), "{}", refused.reason);

    // A tunnelled host allowed by URL rules alone cannot be checked, so it is refused.
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let (mut config, _) = inspecting(
        &[&rule.replace(&port.to_string(), &upstream.port().to_string())],
        upstream,
        roots,
    );
    config.tunnel = Allowlist::parse(["crates.test"]).expect("rule");
    let mut proxy = start(config).await;
    let response = request(
        proxy.addr,
        &format!(
            "CONNECT crates.test:{0} HTTP/1.1\r\nHost: crates.test:{0}",
            upstream.port()
        ),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    let refused = proxy.next_decision().await;
    assert!(
        refused.reason.contains("not inspected"),
        "{}",
        refused.reason
    );
}

#[tokio::test]
async fn report_mode_records_what_url_rules_would_refuse_inside_inspected_tls() {
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let port = upstream.port();
    let rule = format!("GET https://crates.test:{port}/api/**");
    let (mut config, authority) = inspecting(&[&rule], upstream, roots);
    config.mode = contractor_proxy::Mode::Report;
    let mut proxy = start(config).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("inspected");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    // Let through, as report mode does, and said so as plain HTTP says it: enforcing
    // must hold no surprise the report did not name.
    let response = get(&mut tls, "crates.test", "/index/itoa").await;
    assert!(response.ends_with("crate bytes"), "{response}");
    let would = proxy.next_decision().await;
    assert_eq!(would.decision, Verdict::Allow, "{would:?}");
    assert!(
        would.reason.starts_with("would be refused: ")
            && would
                .reason
                .contains(&format!("https://crates.test:{port}/index/itoa")),
        "{}",
        would.reason
    );
    assert_eq!(proxy.next_download().await.status, 200);
}

#[tokio::test]
async fn plain_http_url_rules_check_the_absolute_uri() {
    let upstream = hello_server().await;
    let port = upstream.port();
    let mut config = config(&[], vec![upstream]);
    config.url_rules = vec![format!("http://files.test:{port}/pool/*.txt")
        .parse()
        .expect("rule")];
    let mut proxy = start(config).await;
    for (path, allowed) in [
        ("/pool/hello.txt", true),
        ("/pool/a/hello.txt", false),
        ("/etc", false),
    ] {
        let response = request(
            proxy.addr,
            &format!("GET http://files.test:{port}{path} HTTP/1.1\r\nHost: files.test:{port}"),
        )
        .await;
        assert_eq!(response.ends_with("hello"), allowed, "{path}: {response}");
        let decision = proxy.next_decision().await;
        assert_eq!(
            decision.decision == Verdict::Allow,
            allowed,
            "{path}: {}",
            decision.reason
        );
    }
}

/// A configuration allowing `files.test` on loopback `upstream`, recording downloads into
/// the cache `dir`, with `url` pinned to `pin`.
fn caching(upstream: SocketAddr, dir: &std::path::Path, url: &str, pin: &str) -> ProxyConfig {
    let mut config = config(&["files.test"], vec![upstream]);
    config.record_downloads = true;
    config.pins = Arc::new([(url.to_string(), pin.to_string())].into_iter().collect());
    config.cache = Some(Arc::new(open_cache(dir)));
    config
}

const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// The download cache in `dir`, as one project's proxy opens it.
fn open_cache(dir: &std::path::Path) -> contractor_proxy::cache::DownloadCache {
    use contractor_proxy::cache::{index::ProjectKey, CacheSettings, DownloadCache};
    let settings = CacheSettings {
        project: ProjectKey::parse("0123456789abcdef0123456789abcdef").expect("key"),
        quota: 1 << 20,
        size: 1 << 20,
        pins: Default::default(),
    };
    DownloadCache::open(dir, settings).expect("cache")
}

#[tokio::test]
async fn a_pinned_download_is_cached_then_served_from_the_cache_and_a_changed_copy_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = hello_server().await;
    let port = upstream.port();
    let url = format!("http://files.test:{port}/hello.txt");
    let get = format!("GET {url} HTTP/1.1\r\nHost: files.test:{port}");
    let mut proxy = start(caching(upstream, dir.path(), &url, HELLO_SHA)).await;
    let response = request(proxy.addr, &get).await;
    assert!(response.ends_with("\r\n\r\nhello"), "{response}");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let download = proxy.next_download().await;
    assert!(
        !download.from_cache && download.sha256 == HELLO_SHA,
        "{download:?}"
    );
    let entry = dir.path().join("sha256").join(HELLO_SHA);
    assert_eq!(std::fs::read(&entry).expect("the cached body"), b"hello");

    // The upstream is gone: the body comes from the cache.
    let mut proxy = start(caching(closed_port(), dir.path(), &url, HELLO_SHA)).await;
    let response = request(proxy.addr, &get).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("\r\n\r\nhello"), "{response}");
    let download = proxy.next_download().await;
    assert!(
        download.from_cache && !download.mismatched(),
        "{download:?}"
    );
    let decision = proxy.next_decision().await;
    assert!(
        decision.reason.contains("download cache"),
        "{}",
        decision.reason
    );

    // A changed copy is never served: 502 naming both hashes, a mismatched line, removed.
    std::fs::write(&entry, b"HELLO").expect("tamper");
    let response = request(proxy.addr, &get).await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(!response.ends_with("HELLO"), "{response}");
    assert!(response.contains(HELLO_SHA), "{response}");
    let download = proxy.next_download().await;
    assert!(download.from_cache && download.mismatched(), "{download:?}");
    assert_ne!(download.sha256, HELLO_SHA);
    assert!(response.contains(&download.sha256), "{response}");
    assert!(!entry.exists(), "the changed copy is removed");
}

#[tokio::test]
async fn offline_serves_pinned_urls_from_the_cache_over_inspected_tls_and_resolves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let port = upstream.port();
    let crate_url = format!("https://crates.test:{port}/crate");
    let crate_sha = "6c1a3e927bfe496d41c3f8c58bec46b4a964aa6435fd05fa55e52a0491a34159";
    // Online first, to fill the cache.
    let (mut online, authority) = inspecting(&["crates.test"], upstream, roots.clone());
    online.cache = Some(Arc::new(open_cache(dir.path())));
    let mut proxy = start(online).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("tls");
    assert!(get(&mut tls, "crates.test", "/crate")
        .await
        .ends_with("crate bytes"));
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    assert_eq!(proxy.next_download().await.sha256, crate_sha);
    drop(tls);

    // Offline: a resolver that counts, and the upstream's address never given.
    let (mut offline, authority) = inspecting(&["crates.test", "files.test"], closed_port(), roots);
    let resolved = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&resolved);
    offline.resolver = Resolver::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(io::Error::other("offline: resolved")) })
    });
    offline.cache = Some(Arc::new(open_cache(dir.path())));
    offline.pins = Arc::new(
        [(crate_url.clone(), crate_sha.to_string())]
            .into_iter()
            .collect(),
    );
    offline.offline = true;
    offline.tunnel = Allowlist::parse(["files.test"]).expect("rule");
    let mut proxy = start(offline).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("an inspected host is answered offline");
    assert!(proxy.next_decision().await.reason.contains("offline"));
    let response = get(&mut tls, "crates.test", "/crate").await;
    assert!(response.ends_with("crate bytes"), "{response}");
    let download = proxy.next_download().await;
    assert!(
        download.from_cache && download.url == crate_url,
        "{download:?}"
    );
    let response = get(&mut tls, "crates.test", "/index").await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    let refused = proxy.next_decision().await;
    assert!(
        refused.reason.contains("offline") && refused.reason.contains("/index"),
        "{}",
        refused.reason
    );
    // A tunnel and an unpinned plain request are refused.
    let response = request(
        proxy.addr,
        &format!("CONNECT files.test:{port} HTTP/1.1\r\nHost: files.test:{port}"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(proxy
        .next_decision()
        .await
        .reason
        .contains("a tunnel to files.test"));
    let response = request(
        proxy.addr,
        &format!("GET http://crates.test:{port}/x HTTP/1.1\r\nHost: crates.test:{port}"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert_eq!(
        resolved.load(Ordering::SeqCst),
        0,
        "offline resolved a name"
    );
}

#[tokio::test]
async fn with_a_lock_an_inspected_host_is_dialled_only_for_what_the_cache_cannot_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upstream, roots) = tls_server("crates.test", b"crate bytes").await;
    let port = upstream.port();
    let crate_sha = "6c1a3e927bfe496d41c3f8c58bec46b4a964aa6435fd05fa55e52a0491a34159";
    let cache = || Some(Arc::new(open_cache(dir.path())));
    let (mut online, authority) = inspecting(&["crates.test"], upstream, roots.clone());
    online.cache = cache();
    let mut proxy = start(online).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("tls");
    assert!(get(&mut tls, "crates.test", "/crate")
        .await
        .ends_with("crate bytes"));
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    assert_eq!(proxy.next_download().await.sha256, crate_sha);
    drop(tls);

    // The host is gone now. With the crate pinned and cached, the session still serves
    // it: nothing was dialled. What the cache lacks is dialled then, and fails, named.
    let (mut pinned, authority) = inspecting(&["crates.test"], closed_port(), roots);
    pinned.cache = cache();
    let url = format!("https://crates.test:{port}/crate");
    pinned.pins = Arc::new([(url, crate_sha.to_string())].into_iter().collect());
    let mut proxy = start(pinned).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("the CONNECT is answered without dialling");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    let response = get(&mut tls, "crates.test", "/crate").await;
    assert!(response.ends_with("crate bytes"), "{response}");
    assert!(proxy.next_download().await.from_cache);
    let response = get(&mut tls, "crates.test", "/index").await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    let refused = proxy.next_decision().await;
    assert_eq!(refused.decision, Verdict::Deny);
    assert!(
        refused.reason.contains("cannot connect to crates.test"),
        "{}",
        refused.reason
    );
}

/// Sends `head` (request line and headers, no blank line) on `tls` and reads one response.
async fn send_head(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, head: &str) -> String {
    tls.write_all(format!("{head}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut response = Vec::new();
    loop {
        response.push(tls.read_u8().await.expect("response byte"));
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if response.len() == end + 4 + length {
                return String::from_utf8_lossy(&response).into_owned();
            }
        }
    }
}

#[tokio::test]
async fn an_inspected_session_forwards_only_to_its_connect_target() {
    let (upstream, roots) = tls_server_with("crates.test", None).await;
    let port = upstream.port();
    let (config, authority) = inspecting(&["crates.test", "other.test"], upstream, roots);
    let mut proxy = start(config).await;
    let mut tls = connect_tls(proxy.addr, "crates.test", port, &authority)
        .await
        .expect("inspected");
    assert_eq!(proxy.next_decision().await.decision, Verdict::Allow);
    for (head, status, why) in [
        (
            "GET /x HTTP/1.1\r\nHost: crates.test\r\nHost: other.test".to_string(),
            400,
            "more than one Host header".to_string(),
        ),
        (
            "GET /x HTTP/1.1\r\nHost: other.test".to_string(),
            403,
            "names Host \"other.test\"".to_string(),
        ),
        (
            format!("GET /x HTTP/1.1\r\nHost: crates.test:{}", port + 1),
            403,
            format!("crates.test:{}", port + 1),
        ),
        (
            "GET https://other.test/x HTTP/1.1\r\nHost: crates.test".to_string(),
            403,
            "the URI https://other.test/x".to_string(),
        ),
    ] {
        let response = send_head(&mut tls, &head).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{head}: {response}"
        );
        let refused = proxy.next_decision().await;
        assert_eq!(refused.decision, Verdict::Deny, "{head}");
        assert!(refused.reason.contains(&why), "{head}: {}", refused.reason);
        assert!(
            refused
                .reason
                .contains(&format!("crates.test:{port} (the CONNECT target)"))
                || status == 400,
            "{}",
            refused.reason
        );
    }
    // The target's own authority goes through, with the Host the target's, and is recorded
    // under it.
    let absolute = format!("GET https://crates.test:{port}/y HTTP/1.1\r\nHost: crates.test");
    let response = send_head(&mut tls, &absolute).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let forwarded = response.to_ascii_lowercase();
    assert!(forwarded.contains("get /y http/1.1\r\n"), "{response}");
    assert!(
        forwarded.contains(&format!("host: crates.test:{port}\r\n")),
        "{response}"
    );
    assert_eq!(forwarded.matches("host:").count(), 1, "{response}");
    let download = proxy.next_download().await;
    assert_eq!(download.url, format!("https://crates.test:{port}/y"));
}
