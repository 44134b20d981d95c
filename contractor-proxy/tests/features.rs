//! The real `contractor-proxy` binary against real servers on loopback: deny and port
//! rules, report mode, numeric host spellings, limits, keep-alive and pipelining, chunked
//! bodies, upgrades, the access log, metrics, the shutdown summary and the config file.

#[allow(dead_code)]
mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use contractor_protocol::proxy::{SummaryTag, Verdict};
use contractor_proxy::AccessEntry;
use util::{
    connect, echo_server, free_port, read_head, read_request_head, request, serve_each, Proxy,
    Upstream,
};

const HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

fn on_loopback(extra: &[&str]) -> Proxy {
    let mut args = vec!["--allow-net", "127.0.0.0/8"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// Reads one response (head and a Content-Length body) off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> (u16, Vec<(String, String)>, String) {
    let (status, headers) = read_head(stream);
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("read body");
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_deny_rule_wins_over_an_allow_rule() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = on_loopback(&[
        "--allow",
        &format!("localhost:{port}"),
        "--deny",
        &format!("localhost:{port}"),
    ]);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    let reason = format!("host refused by deny rule localhost:{port}");
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        Some(reason.as_str())
    );
    let decision = proxy.next_decision();
    assert_eq!(
        (decision.decision, decision.reason),
        (Verdict::Deny, reason)
    );
    assert!(upstream.got_nothing());
}

#[test]
fn a_rule_with_ports_allows_them_without_allow_port() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = on_loopback(&["--allow", &format!("LocalHost.:{port},1")]);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        proxy.next_decision().reason,
        format!("allowed by localhost:1,{port}")
    );
    let response = request(
        proxy.addr,
        "GET http://localhost/ HTTP/1.1\r\nHost: localhost",
    );
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        Some("port 80 not allowed")
    );
}

#[test]
fn report_mode_lets_refused_requests_through_and_says_why() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = Proxy::start(&["--mode", "report", "--allow", "example.org"]);
    let response = request(
        proxy.addr,
        &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "hello");
    let decision = proxy.next_decision();
    assert_eq!(decision.decision, Verdict::Allow);
    assert_eq!(
        decision.reason,
        "would be refused: host not on the allowlist"
    );
    // Malformed requests are still refused.
    let response = request(proxy.addr, "GET /index.html HTTP/1.1\r\nHost: localhost");
    assert_eq!(response.status, 400);
    assert_eq!(proxy.next_decision().decision, Verdict::Deny);
}

#[test]
fn numeric_spellings_of_loopback_meet_the_address_checks() {
    let echo = echo_server();
    let port = echo.port();
    let proxy = Proxy::start(&[
        "--allow",
        "127.0.0.1",
        "--allow",
        "::ffff:127.0.0.1",
        "--allow-port",
        &port.to_string(),
    ]);
    for spelling in [
        "2130706433",
        "0x7f.1",
        "017700000001",
        "[::ffff:127.0.0.1]",
        "127.1",
    ] {
        let mut stream = connect(proxy.addr);
        write!(
            stream,
            "CONNECT {spelling}:{port} HTTP/1.1\r\nHost: {spelling}:{port}\r\n\r\n"
        )
        .expect("send CONNECT");
        let (status, headers) = read_head(&mut stream);
        assert_eq!(status, 403, "{spelling}");
        assert!(
            headers.contains(&(
                "x-contractor-proxy-error".into(),
                "address 127.0.0.1 is loopback".into()
            )),
            "{spelling}: {headers:?}"
        );
        let decision = proxy.next_decision();
        assert_eq!(decision.decision, Verdict::Deny, "{spelling}");
    }
    let response = request(
        proxy.addr,
        "GET http://1.2.3.4.5/ HTTP/1.1\r\nHost: 1.2.3.4.5",
    );
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response
        .header("x-contractor-proxy-error")
        .is_some_and(|e| e.starts_with("invalid host")));
}

#[test]
fn never_connects_to_its_own_listening_address() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let proxy = on_loopback(&[
        "--listen",
        &listen,
        "--allow",
        "127.0.0.1",
        "--allow-port",
        &port.to_string(),
    ]);
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "CONNECT {listen} HTTP/1.1\r\nHost: {listen}\r\n\r\n"
    )
    .expect("send");
    let (status, headers) = read_head(&mut stream);
    assert_eq!(status, 403);
    let reason = format!("{listen} is the proxy's own listening address");
    assert!(
        headers.contains(&("x-contractor-proxy-error".into(), reason)),
        "{headers:?}"
    );
}

#[test]
fn over_max_connections_gets_503_with_retry_after() {
    let echo = echo_server();
    let proxy = on_loopback(&[
        "--allow",
        "127.0.0.1",
        "--allow-port",
        &echo.port().to_string(),
        "--max-connections",
        "1",
    ]);
    let mut first = connect(proxy.addr);
    write!(first, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send");
    assert_eq!(read_head(&mut first).0, 200);
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
    let response = request(
        proxy.addr,
        &format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}"),
    );
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(response
        .header("x-contractor-proxy-error")
        .is_some_and(|e| e.starts_with("too many connections (at most 1)")));
    assert_eq!(proxy.next_decision().decision, Verdict::Deny);
    // Once the tunnel closes, the slot is free again.
    drop(first);
    thread::sleep(Duration::from_millis(200));
    let mut again = connect(proxy.addr);
    write!(again, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send");
    assert_eq!(read_head(&mut again).0, 200);
}

#[test]
fn a_slow_header_client_is_dropped() {
    let proxy = Proxy::start(&["--allow", "localhost", "--header-read-timeout", "1"]);
    let mut stream = connect(proxy.addr);
    stream
        .write_all(b"GET http://localhost/ HTTP/1.1\r\nHo")
        .expect("send part");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the connection stayed open"
    );
}

#[test]
fn an_oversized_request_head_is_refused() {
    let proxy = Proxy::start(&["--allow", "localhost", "--max-header-bytes", "8192"]);
    let big = "a".repeat(10 * 1024);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}"),
    );
    assert_eq!(response.status, 431, "{response:?}");
    assert!(response
        .header("x-contractor-proxy-error")
        .is_some_and(|e| e.ends_with("over the limit of 8192 bytes")));
    let decision = proxy.next_decision();
    assert_eq!(decision.decision, Verdict::Deny);
    // Far over the limit, the HTTP parser refuses it before it is a request.
    let huge = "a".repeat(40 * 1024);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nX-Big: {huge}"),
    );
    assert_eq!(response.status, 431, "{response:?}");
}

#[test]
fn an_idle_tunnel_is_closed_but_a_slow_steady_one_is_not() {
    let echo = echo_server();
    let proxy = on_loopback(&[
        "--allow",
        "127.0.0.1",
        "--allow-port",
        &echo.port().to_string(),
        "--idle-timeout",
        "1",
    ]);
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send");
    assert_eq!(read_head(&mut stream).0, 200);
    // A byte every 400 ms for 2.4 s, longer than the idle timeout in all.
    for _ in 0..6 {
        stream.write_all(b"x").expect("write");
        let mut echoed = [0u8];
        stream.read_exact(&mut echoed).expect("still open");
        thread::sleep(Duration::from_millis(400));
    }
    thread::sleep(Duration::from_millis(1500));
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)),
        "the idle tunnel was not closed: {read:?}"
    );
}

#[test]
fn keep_alive_requests_are_each_decided_and_pipelined_ones_answered_in_order() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    let mut stream = connect(proxy.addr);
    let allowed =
        format!("GET http://localhost:{port}/a HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    let denied =
        format!("GET http://127.0.0.1:{port}/b HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    // Both at once: pipelined.
    stream
        .write_all(format!("{allowed}{denied}{allowed}").as_bytes())
        .expect("send three requests");
    let statuses: Vec<u16> = (0..3).map(|_| read_response(&mut stream).0).collect();
    assert_eq!(statuses, [200, 403, 200]);
    let verdicts: Vec<Verdict> = (0..3).map(|_| proxy.next_decision().decision).collect();
    assert_eq!(verdicts, [Verdict::Allow, Verdict::Deny, Verdict::Allow]);
    assert!(upstream.next_head().starts_with("GET /a "));
}

fn chunked_echo(mut stream: TcpStream) {
    let head = read_request_head(&mut stream);
    let mut body = Vec::new();
    let mut byte = [0u8];
    while !body.ends_with(b"0\r\n\r\n") {
        if stream.read_exact(&mut byte).is_err() {
            return;
        }
        body.push(byte[0]);
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let reply = format!(
        "chunked={chunked} {}",
        String::from_utf8_lossy(&body).replace("\r\n", "|")
    );
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{reply}\r\n0\r\n\r\n",
        reply.len()
    );
}

#[test]
fn chunked_bodies_go_both_ways() {
    let upstream = serve_each(chunked_echo);
    let port = upstream.port();
    let proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "POST http://localhost:{port}/up HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{raw}"
    );
    assert!(raw.contains("chunked=true"), "{raw}");
    assert!(raw.contains("hello") && raw.contains(" world"), "{raw}");
}

fn upgrade_echo(mut stream: TcpStream) {
    let head = read_request_head(&mut stream).to_ascii_lowercase();
    if !head.contains("upgrade: echo") || !head.contains("connection: upgrade") {
        let _ = stream.write_all(HELLO.as_bytes());
        return;
    }
    let _ = stream.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
    );
    let mut reader = stream.try_clone().expect("clone");
    let _ = std::io::copy(&mut reader, &mut stream);
}

#[test]
fn upgrade_requests_are_relayed_or_answered_never_left_hanging() {
    let upstream = serve_each(upgrade_echo);
    let port = upstream.port();
    let proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "GET http://localhost:{port}/ws HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Upgrade: echo\r\nConnection: Upgrade\r\n\r\n"
    )
    .expect("send");
    let (status, headers) = read_head(&mut stream);
    assert_eq!(status, 101, "{headers:?}");
    assert!(
        headers.contains(&("upgrade".into(), "echo".into())),
        "{headers:?}"
    );
    stream.write_all(b"ping").expect("write");
    let mut echoed = [0u8; 4];
    stream
        .read_exact(&mut echoed)
        .expect("echo through the upgrade");
    assert_eq!(&echoed, b"ping");

    // An upgrade the upstream declines is an ordinary response.
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "GET http://localhost:{port}/ws HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Upgrade: other\r\nConnection: Upgrade\r\n\r\n"
    )
    .expect("send");
    let (status, _, body) = read_response(&mut stream);
    assert_eq!((status, body.as_str()), (200, "hello"));
}

#[test]
fn the_access_log_records_status_bytes_and_duration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("access.jsonl");
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let mut proxy = on_loopback(&[
        "--allow",
        "localhost",
        "--allow-port",
        &port.to_string(),
        "--access-log",
        log.to_str().expect("utf-8 path"),
    ]);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200);
    let response = request(
        proxy.addr,
        "GET http://example.org/ HTTP/1.1\r\nHost: example.org",
    );
    assert_eq!(response.status, 403);
    proxy.terminate();
    assert!(proxy.wait().success());
    let entries: Vec<AccessEntry> = BufReader::new(std::fs::File::open(&log).expect("log"))
        .lines()
        .map(|line| serde_json::from_str(&line.expect("line")).expect("an access entry"))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let allowed = entries.iter().find(|e| e.status == 200).expect("the 200");
    assert_eq!(
        (allowed.kind.as_str(), allowed.decision.as_str()),
        ("access", "allow")
    );
    assert_eq!(allowed.bytes_down, HELLO.len() as u64);
    assert!(allowed.bytes_up > 20, "{allowed:?}");
    let denied = entries.iter().find(|e| e.status == 403).expect("the 403");
    assert_eq!((denied.decision.as_str(), denied.bytes_up), ("deny", 0));
}

#[test]
fn metrics_count_decisions_bytes_and_connections_and_shutdown_prints_a_summary() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut proxy = on_loopback(&[
        "--allow",
        "localhost",
        "--allow-port",
        &port.to_string(),
        "--metrics",
        &metrics_addr,
    ]);
    // Asked for twice, localhost is looked up once (the second answer is the name cache's).
    for _ in 0..2 {
        assert_eq!(
            request(
                proxy.addr,
                &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}")
            )
            .status,
            200
        );
    }
    assert_eq!(
        request(
            proxy.addr,
            "GET http://example.org/ HTTP/1.1\r\nHost: example.org"
        )
        .status,
        403
    );
    let metrics = request(
        metrics_addr.parse().expect("addr"),
        "GET /metrics HTTP/1.1\r\nHost: metrics",
    );
    assert_eq!(metrics.status, 200);
    for line in [
        "contractor_proxy_requests_total{decision=\"allow\",reason=\"allowed\"} 2",
        "contractor_proxy_requests_total{decision=\"deny\",reason=\"host_not_allowed\"} 1",
        &format!(
            "contractor_proxy_upstream_received_bytes_total {}",
            2 * HELLO.len()
        ),
        "contractor_proxy_connections_total 3",
        "contractor_proxy_name_lookups_total 1",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line} in\n{}",
            metrics.body
        );
    }
    proxy.terminate();
    assert!(proxy.wait().success());
    for _ in 0..3 {
        proxy.next_decision();
    }
    let summary = proxy.summary();
    assert_eq!((summary.kind, summary.allowed), (SummaryTag::Summary, 2));
    assert_eq!(summary.denied.get("host_not_allowed"), Some(&1));
    assert_eq!(summary.bytes_down, 2 * HELLO.len() as u64);
    assert_eq!(summary.name_lookups, 1, "{summary:?}");
}

#[test]
fn a_config_file_sets_what_flags_extend() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!("allow = [\"localhost\"]\nallow_net = [\"127.0.0.0/8\"]\nallow_port = [{port}]\n"),
    )
    .expect("write config");
    let config = path.to_str().expect("utf-8 path");
    let proxy = Proxy::start(&["--config", config, "--deny", "127.0.0.1"]);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    let response = request(
        proxy.addr,
        &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    );
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        Some("host refused by deny rule 127.0.0.1")
    );

    std::fs::write(
        &path,
        "allow = [\"localhost\"]\nmode = \"enforce\"\ncolour = \"blue\"\n",
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
        .args(["--config", config])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("proxy.toml") && stderr.contains("line 3") && stderr.contains("colour"),
        "{stderr}"
    );
}

fn trickle(mut stream: TcpStream) {
    let head = read_request_head(&mut stream);
    let stall = head.contains("/stall");
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n");
    for byte in b"abcdef" {
        thread::sleep(Duration::from_millis(if stall { 3000 } else { 400 }));
        if stream.write_all(&[*byte]).is_err() {
            return;
        }
    }
}

#[test]
fn a_body_that_keeps_moving_outlasts_the_idle_timeout_and_a_stalled_one_is_cut() {
    let upstream = serve_each(trickle);
    let port = upstream.port();
    let proxy = on_loopback(&[
        "--allow",
        "localhost",
        "--allow-port",
        &port.to_string(),
        "--idle-timeout",
        "1",
    ]);
    // Six bytes 400 ms apart: 2.4 s in all, never 1 s without a byte.
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/steady HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!((response.status, response.body.as_str()), (200, "abcdef"));
    // Three seconds before the first byte of the body: cut after about one.
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "GET http://localhost:{port}/stall HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    )
    .expect("send");
    let started = Instant::now();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.ends_with("abcdef"), "{raw}");
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "not cut: {:?}",
        started.elapsed()
    );
}

static KEEP_ALIVE_CONNECTIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

fn keep_alive(mut stream: TcpStream) {
    KEEP_ALIVE_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    loop {
        let head = read_request_head(&mut stream);
        if head.is_empty() {
            return;
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    }
}

#[test]
fn upstream_connections_are_reused_across_clients_each_request_still_decided() {
    let upstream = serve_each(keep_alive);
    let port = upstream.port();
    let proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    for _ in 0..3 {
        let response = request(
            proxy.addr,
            &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
        );
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));
        assert_eq!(proxy.next_decision().decision, Verdict::Allow);
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        KEEP_ALIVE_CONNECTIONS.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection for three requests"
    );
    // The pooled connection does not bypass the policy: another name for the same address.
    let response = request(
        proxy.addr,
        &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    );
    assert_eq!(response.status, 403);
}

#[test]
fn a_burst_of_requests_from_many_clients_logs_one_whole_decision_line_each() {
    // Decisions that pile up are written together; each must still be its own whole line,
    // none lost, the summary last.
    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    let upstream = serve_each(|mut stream| {
        let _ = read_request_head(&mut stream);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let port = upstream.port();
    let mut proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    let addr = proxy.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            thread::spawn(move || {
                for i in 0..EACH {
                    let (host, status) = if i % 2 == 0 {
                        (format!("localhost:{port}"), 200)
                    } else {
                        (format!("refused{client}.example:{port}"), 403)
                    };
                    let head = format!("GET http://{host}/{i} HTTP/1.1\r\nHost: {host}");
                    assert_eq!(request(addr, &head).status, status, "{head}");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client thread panicked");
    }
    proxy.terminate();
    assert!(proxy.wait().success());
    let (mut allowed, mut denied) = (0, 0);
    for _ in 0..CLIENTS * EACH {
        match proxy.next_decision().decision {
            Verdict::Allow => allowed += 1,
            _ => denied += 1,
        }
    }
    assert_eq!((allowed, denied), (CLIENTS * EACH / 2, CLIENTS * EACH / 2));
    let summary = proxy.summary();
    assert_eq!(summary.allowed, (CLIENTS * EACH / 2) as u64);
}

#[test]
fn a_pooled_connection_closed_unanswered_is_retried_for_a_get_but_not_for_a_post() {
    // Each upstream connection answers its first request, keeps the connection as if alive,
    // then closes it on the next request without a word: what a server closing an idle
    // connection looks like to the request that took it from the pool.
    static HEADS: AtomicUsize = AtomicUsize::new(0);
    let upstream = serve_each(|mut stream| {
        let _ = read_request_head(&mut stream);
        HEADS.fetch_add(1, Ordering::SeqCst);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        if !read_request_head(&mut stream).is_empty() {
            HEADS.fetch_add(1, Ordering::SeqCst);
        }
    });
    let port = upstream.port();
    let proxy = on_loopback(&["--allow", "localhost", "--allow-port", &port.to_string()]);
    let get = |path: &str| {
        request(
            proxy.addr,
            &format!("GET http://localhost:{port}/{path} HTTP/1.1\r\nHost: localhost:{port}"),
        )
    };
    assert_eq!(get("first").status, 200);
    // Give the first connection time to go back to the pool.
    thread::sleep(Duration::from_millis(300));
    let again = get("second");
    assert_eq!((again.status, again.body.as_str()), (200, "ok"));
    // The second GET went to the pooled connection first (a head that closed it), then to
    // a new one.
    assert_eq!(HEADS.load(Ordering::SeqCst), 3);

    thread::sleep(Duration::from_millis(300));
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "POST http://localhost:{port}/third HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Content-Length: 4\r\nConnection: close\r\n\r\nbody"
    )
    .expect("send the POST");
    let (status, headers) = read_head(&mut stream);
    assert_eq!(status, 502, "{headers:?}");
    assert_eq!(HEADS.load(Ordering::SeqCst), 4, "the POST went once");
}

/// `--ready-fd 3` with descriptor 3 on a FIFO (as `3>FIFO` in sh): the ready line comes
/// there, alone, and the descriptor ends after it (the dialer the proxy starts does not
/// keep it); stdout starts with the first decision.
#[test]
fn the_ready_line_goes_to_the_named_descriptor_and_stdout_has_the_decisions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("ready");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" --ready-fd 3 3>\"$1\"")
        .arg(env!("CARGO_BIN_EXE_contractor-proxy"))
        .arg(&fifo)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the proxy");
    // Read to the end on a thread: without the close, the end would never come.
    let (sent, got) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let read = std::fs::File::open(&fifo).and_then(|mut f| f.read_to_string(&mut text));
        let _ = sent.send(read.map(|_| text));
    });
    let text = got
        .recv_timeout(Duration::from_secs(30))
        .expect("the descriptor ends after the ready line")
        .expect("read the FIFO");
    assert_eq!(text.lines().count(), 1, "{text}");
    let ready: contractor_protocol::service::Ready =
        serde_json::from_str(text.trim_end()).expect("a ready line");
    assert_eq!(ready.service, "proxy");
    let response = request(
        ready.addr,
        "GET http://not-allowed.example/ HTTP/1.1\r\nHost: not-allowed.example",
    );
    assert_eq!(response.status, 403);
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a line");
    let decision: contractor_protocol::proxy::Decision =
        serde_json::from_str(first.trim_end()).expect("stdout starts with the decision");
    assert_eq!(decision.host, "not-allowed.example");
    child.kill().expect("kill");
    let _ = child.wait();
}
