//! Pinned downloads (`--pins`) through the real, confined binary: a hostile upstream that
//! ends its message early (chunked with a trailer; close-delimited to an HTTP/1.0 client)
//! must not hand the client a complete message with other bytes than the pinned ones, over
//! plain HTTP and inside inspected TLS, staged in memory and in the cache's directory; the
//! pinned bytes themselves come with `Content-Length`.

#[allow(dead_code)]
mod test_tls;
#[allow(dead_code)]
mod util;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use util::{read_request_head, serve_each, Proxy};

/// What the hostile upstream sends.
const SENT: &[u8] = b"tampered bytes";

/// A chunked answer whose trailer comes right after the body.
const CHUNKED_WITH_TRAILER: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
    Trailer: X-Checksum\r\nContent-Type: application/x-tar\r\n\r\n\
    8\r\ntampered\r\n6\r\n bytes\r\n0\r\nX-Checksum: 1\r\n\r\n";

/// An HTTP/1.0 answer whose end is the connection's close.
const CLOSE_DELIMITED: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Type: application/x-tar\r\n\r\n\
    tampered bytes";

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn chunked_with_trailer(mut stream: TcpStream) {
    read_request_head(&mut stream);
    let _ = stream.write_all(CHUNKED_WITH_TRAILER);
}

fn close_delimited(mut stream: TcpStream) {
    read_request_head(&mut stream);
    let _ = stream.write_all(CLOSE_DELIMITED);
}

/// What curl got: its exit code, the status and headers it saw, the body it wrote.
#[derive(Debug)]
struct Fetched {
    code: i32,
    // Read through `Debug`, in the message of a failed check.
    #[allow(dead_code)]
    stderr: String,
    head: String,
    body: Vec<u8>,
}

/// Fetches `url` with curl through `proxy` (`--fail`: an error status is a failure),
/// with `extra` arguments.
fn curl(proxy: SocketAddr, url: &str, extra: &[&str], dir: &Path) -> Fetched {
    let (head, body) = (dir.join("head"), dir.join("body"));
    let _ = std::fs::remove_file(&head);
    let _ = std::fs::remove_file(&body);
    let output = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "10",
            "--proxy",
        ])
        .arg(format!("http://{proxy}"))
        .arg("--dump-header")
        .arg(&head)
        .arg("--output")
        .arg(&body)
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    Fetched {
        code: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        head: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// A proxy recording downloads with `url` pinned to `pin`, allowing `localhost` on `port`;
/// `cache` adds a download cache (pinned bodies are then staged in its directory).
fn pinned_proxy(
    dir: &Path,
    url: &str,
    pin: &str,
    port: u16,
    cache: bool,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proxy {
    let pins = dir.join("pins.json");
    std::fs::write(&pins, format!("{{\"{url}\":\"{pin}\"}}")).expect("pins");
    let port = port.to_string();
    let cache_dir = dir.join("cache");
    let mut args = vec![
        "--allow",
        "localhost",
        "--allow-port",
        &port,
        "--allow-net",
        "127.0.0.0/8",
        "--record-downloads",
        "--pins",
        pins.to_str().expect("utf-8 path"),
    ];
    if cache {
        args.extend([
            "--cache",
            cache_dir.to_str().expect("utf-8 path"),
            "--cache-project",
            "0123456789abcdef0123456789abcdef",
        ]);
    }
    args.extend_from_slice(extra);
    let proxy = Proxy::start_with_env(&args, env);
    assert!(
        proxy.ready.confinement.is_some(),
        "the proxy under test is the confined one"
    );
    proxy
}

/// The tampered body is answered 502 (curl --fail exits 22) and never written whole; the
/// same bytes, pinned, arrive whole with their Content-Length; each is recorded.
fn check_both_ways(
    fetch: impl Fn(&Proxy, &Path) -> Fetched,
    url: &str,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) {
    for cache in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = sha256(b"the pinned bytes");
        let proxy = pinned_proxy(dir.path(), url, &other, port, cache, extra, env);
        let got = fetch(&proxy, dir.path());
        assert_eq!(got.code, 22, "cache {cache}: {got:?}");
        assert!(got.head.contains(" 502"), "cache {cache}: {got:?}");
        assert!(got.head.contains("contractor.lock pins"), "{got:?}");
        assert!(got.body.is_empty(), "cache {cache}: {got:?}");
        let download = proxy.next_download();
        assert_eq!(download.sha256, sha256(SENT), "cache {cache}");
        assert!(download.mismatched(), "cache {cache}: {download:?}");

        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = pinned_proxy(dir.path(), url, &sha256(SENT), port, cache, extra, env);
        let got = fetch(&proxy, dir.path());
        assert_eq!(got.code, 0, "cache {cache}: {got:?}");
        assert_eq!(got.body, SENT, "cache {cache}");
        assert!(
            got.head
                .contains(&format!("content-length: {}\r\n", SENT.len())),
            "cache {cache}: {got:?}"
        );
        assert!(!got.head.contains("x-checksum"), "{got:?}");
        let download = proxy.next_download();
        assert!(
            download.complete && !download.mismatched(),
            "cache {cache}: {download:?}"
        );
    }
}

#[test]
fn a_tampered_pinned_body_over_plain_http_never_arrives_as_a_complete_message() {
    for (upstream, http10) in [
        (serve_each(chunked_with_trailer), false),
        (serve_each(close_delimited), true),
    ] {
        let port = upstream.port();
        let url = format!("http://localhost:{port}/crate.tar");
        let version: &[&str] = if http10 { &["--http1.0"] } else { &[] };
        check_both_ways(
            |proxy, dir| curl(proxy.addr, &url, version, dir),
            &url,
            port,
            &[],
            &[],
        );
    }
}

#[test]
fn a_raw_http10_client_gets_502_not_the_tampered_bytes() {
    let upstream = serve_each(close_delimited);
    let port = upstream.port();
    let url = format!("http://localhost:{port}/crate.tar");
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = pinned_proxy(dir.path(), &url, &sha256(b"other"), port, false, &[], &[]);
    let mut stream = util::connect(proxy.addr);
    write!(stream, "GET {url} HTTP/1.0\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut raw).expect("read to the close");
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.starts_with("HTTP/1.1 502") || raw.starts_with("HTTP/1.0 502"),
        "{raw}"
    );
    assert!(!raw.contains("tampered bytes"), "{raw}");
}

/// A TLS server for `localhost` with a certificate of a test authority (its PEM returned),
/// answering every request on each connection with `answer` and closing.
async fn tls_upstream(answer: &'static [u8]) -> (SocketAddr, String) {
    let (server_config, ca_cert) = test_tls::server_for("localhost");
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read_u8().await {
                        Ok(byte) => head.push(byte),
                        Err(_) => return,
                    }
                }
                let _ = tls.write_all(answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca_cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_pinned_body_inside_inspected_tls_never_arrives_as_a_complete_message() {
    for (answer, http10) in [(CLOSE_DELIMITED, true), (CHUNKED_WITH_TRAILER, false)] {
        let (upstream, roots) = tls_upstream(answer).await;
        let port = upstream.port();
        let trust = tempfile::tempdir().expect("tempdir");
        let roots_file = trust.path().join("roots.pem");
        std::fs::write(&roots_file, roots).expect("roots");
        let url = format!("https://localhost:{port}/crate.tar");
        let roots_path = roots_file.to_str().expect("utf-8").to_string();
        tokio::task::spawn_blocking(move || {
            let env = [("SSL_CERT_FILE", roots_path.as_str())];
            check_both_ways(
                |proxy, dir| {
                    let authority = dir.join("authority.pem");
                    let pem = proxy.ready.ca_certificate.clone().expect("--inspect");
                    std::fs::write(&authority, pem).expect("authority");
                    let mut extra = vec![
                        "--cacert".to_string(),
                        authority.to_str().expect("utf-8").to_string(),
                    ];
                    if http10 {
                        // The inspecting side offers ALPN `http/1.1` only: no ALPN at all.
                        extra.extend(["--http1.0".to_string(), "--no-alpn".to_string()]);
                    }
                    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                    curl(proxy.addr, &url, &extra, dir)
                },
                &url,
                port,
                &["--inspect"],
                &env,
            );
        })
        .await
        .expect("the checks");
    }
}
