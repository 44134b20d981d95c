//! The real `contractor-proxy` binary against real servers on loopback.

#[allow(dead_code)]
mod util;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use contractor_protocol::proxy::{Decision, DecisionClass, DecisionTag, SummaryTag, Verdict};
use util::{connect, echo_server, read_head, request, Proxy, Upstream};

const HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

fn assert_decision(
    decision: &Decision,
    method: &str,
    host: &str,
    port: u16,
    verdict: Verdict,
    reason: &str,
) {
    assert_eq!(decision.kind, DecisionTag::Decision);
    assert_eq!(
        (
            decision.method.as_str(),
            decision.host.as_str(),
            decision.port,
            decision.decision,
            decision.reason.as_str()
        ),
        (method, host, port, verdict, reason),
        "{decision:?}"
    );
    assert!(decision.client.starts_with("127.0.0.1:"), "{decision:?}");
    assert!(decision.time > 1.0e9, "{decision:?}");
}

/// A proxy allowing `rule` on `port`, which may connect to loopback (where the test servers are).
fn proxy_on_loopback(rule: &str, port: u16) -> Proxy {
    Proxy::start(&[
        "--allow",
        rule,
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &port.to_string(),
    ])
}

#[test]
fn forwards_an_allowed_get_in_origin_form_without_proxy_headers() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = proxy_on_loopback("localhost", port);
    let response = request(
        proxy.addr,
        &format!(
            "GET http://LocalHost:{port}/path?q=1 HTTP/1.1\r\nHost: localhost:{port}\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nAccept: text/plain"
        ),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "hello");
    let head = upstream.next_head().to_ascii_lowercase();
    assert!(head.starts_with("get /path?q=1 http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("host: localhost:{port}\r\n")),
        "{head}"
    );
    assert!(head.contains("accept: text/plain\r\n"), "{head}");
    assert!(!head.contains("proxy-"), "{head}");
    assert!(!head.contains("connection:"), "{head}");
    let decision = proxy.next_decision();
    assert_decision(
        &decision,
        "GET",
        "localhost",
        upstream.addr.port(),
        Verdict::Allow,
        "allowed by localhost",
    );
}

#[test]
fn refuses_a_host_not_on_the_allowlist_with_403_and_a_deny_line() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = proxy_on_loopback("localhost", port);
    let response = request(
        proxy.addr,
        &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    );
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        Some("host not on the allowlist")
    );
    assert!(
        response.body.contains("host not on the allowlist"),
        "{response:?}"
    );
    assert_decision(
        &proxy.next_decision(),
        "GET",
        "127.0.0.1",
        port,
        Verdict::Deny,
        "host not on the allowlist",
    );
    assert!(upstream.got_nothing());
}

#[test]
fn relays_bytes_both_ways_through_an_allowed_connect_tunnel() {
    let echo = echo_server();
    let proxy = proxy_on_loopback("127.0.0.1", echo.port());
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    let (status, _) = read_head(&mut stream);
    assert_eq!(status, 200);
    for message in ["hello through the tunnel", "and again"] {
        stream
            .write_all(message.as_bytes())
            .expect("write into the tunnel");
        let mut echoed = vec![0; message.len()];
        stream
            .read_exact(&mut echoed)
            .expect("read from the tunnel");
        assert_eq!(echoed, message.as_bytes());
    }
    assert_decision(
        &proxy.next_decision(),
        "CONNECT",
        "127.0.0.1",
        echo.port(),
        Verdict::Allow,
        "allowed by 127.0.0.1",
    );
}

#[test]
fn a_tunnel_relays_megabytes_intact_both_ways_and_passes_on_a_half_close() {
    let echo = echo_server();
    let proxy = proxy_on_loopback("127.0.0.1", echo.port());
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    assert_eq!(read_head(&mut stream).0, 200);
    // Several times the relay's pipe, in a pattern that shows any lost or reordered byte.
    let sent: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    let mut writer = stream.try_clone().expect("clone the client stream");
    let to_send = sent.clone();
    let sending = std::thread::spawn(move || {
        writer.write_all(&to_send).expect("write into the tunnel");
        // The half-close must reach the echo server, whose close must come back.
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut echoed = Vec::new();
    stream
        .read_to_end(&mut echoed)
        .expect("read until the tunnel closes");
    sending.join().expect("the writer");
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the echoed bytes differ from those sent");
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
}

#[test]
fn refuses_connect_to_a_host_not_on_the_allowlist() {
    let echo = echo_server();
    let port = echo.port();
    let proxy = proxy_on_loopback("*.localhost", port);
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    )
    .expect("send CONNECT");
    let (status, headers) = read_head(&mut stream);
    assert_eq!(status, 403);
    assert!(
        headers.contains(&(
            "x-contractor-proxy-error".into(),
            "host not on the allowlist".into()
        )),
        "{headers:?}"
    );
    assert_decision(
        &proxy.next_decision(),
        "CONNECT",
        "localhost",
        port,
        Verdict::Deny,
        "host not on the allowlist",
    );
}

#[test]
fn refuses_loopback_addresses_unless_an_allowed_network_covers_them() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = Proxy::start(&[
        "--allow",
        "127.0.0.1",
        "--allow",
        "::ffff:127.0.0.1",
        "--allow-port",
        &port.to_string(),
    ]);
    let response = request(
        proxy.addr,
        &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}"),
    );
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        Some("address 127.0.0.1 is loopback")
    );
    assert_decision(
        &proxy.next_decision(),
        "GET",
        "127.0.0.1",
        port,
        Verdict::Deny,
        "address 127.0.0.1 is loopback",
    );

    // The same address spelt as IPv4-mapped IPv6, through CONNECT.
    let mut stream = connect(proxy.addr);
    write!(
        stream,
        "CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{port}\r\n\r\n"
    )
    .expect("send CONNECT");
    let (status, _) = read_head(&mut stream);
    assert_eq!(status, 403);
    let decision = proxy.next_decision();
    assert_decision(
        &decision,
        "CONNECT",
        "::ffff:127.0.0.1",
        port,
        Verdict::Deny,
        "address 127.0.0.1 is loopback",
    );
    assert!(upstream.got_nothing());
}

#[test]
fn refuses_its_own_metrics_address_as_its_own_and_says_so_in_the_decision() {
    // Allowed by every rule, the metrics listener is still the proxy itself: the decision
    // must be the refusal the client gets, not an `allow` that its dialer then refuses.
    let port = util::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(&[
        "--allow",
        "127.0.0.1",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &port.to_string(),
        "--metrics",
        &metrics,
    ]);
    let response = request(
        proxy.addr,
        &format!("GET http://{metrics}/metrics HTTP/1.1\r\nHost: {metrics}"),
    );
    assert_eq!(response.status, 403, "{response:?}");
    let decision = proxy.next_decision();
    assert_decision(
        &decision,
        "GET",
        "127.0.0.1",
        port,
        Verdict::Deny,
        &format!("{metrics} is the proxy's own listening address"),
    );
    assert_eq!(decision.class, Some(DecisionClass::Request), "{decision:?}");
}

#[test]
fn refuses_a_port_that_is_not_allowed() {
    let echo = echo_server();
    let proxy = Proxy::start(&["--allow", "127.0.0.1", "--allow-net", "127.0.0.0/8"]);
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    let (status, headers) = read_head(&mut stream);
    assert_eq!(status, 403);
    let reason = format!("port {} not allowed", echo.port());
    assert!(
        headers.contains(&("x-contractor-proxy-error".into(), reason.clone())),
        "{headers:?}"
    );
    assert_decision(
        &proxy.next_decision(),
        "CONNECT",
        "127.0.0.1",
        echo.port(),
        Verdict::Deny,
        &reason,
    );
}

#[test]
fn strips_an_error_header_forged_by_the_upstream() {
    let upstream = Upstream::start(
        "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Contractor-Proxy-Error: host not on the allowlist\r\n\
         X-Other: kept\r\nConnection: close\r\n\r\nforged",
    );
    let port = upstream.addr.port();
    let proxy = proxy_on_loopback("localhost", port);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "forged");
    assert_eq!(
        response.header("x-contractor-proxy-error"),
        None,
        "{response:?}"
    );
    assert_eq!(response.header("x-other"), Some("kept"), "{response:?}");
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
}

#[test]
fn refuses_a_host_header_that_names_another_host() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = proxy_on_loopback("localhost", port);
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: example.org"),
    );
    assert_eq!(response.status, 403, "{response:?}");
    let reason = "Host header names a different host (example.org)";
    assert_eq!(response.header("x-contractor-proxy-error"), Some(reason));
    assert_decision(
        &proxy.next_decision(),
        "GET",
        "localhost",
        port,
        Verdict::Deny,
        reason,
    );
    assert!(upstream.got_nothing());
}

#[test]
fn answers_a_request_that_is_not_a_proxy_request_with_400() {
    let proxy = Proxy::start(&["--allow", "localhost"]);
    let response = request(proxy.addr, "GET /index.html HTTP/1.1\r\nHost: localhost");
    assert_eq!(response.status, 400, "{response:?}");
    let decision = proxy.next_decision();
    assert_eq!(decision.decision, Verdict::Deny);
    assert!(
        decision.reason.starts_with("not a proxy request"),
        "{decision:?}"
    );
}

#[test]
fn answers_502_when_an_allowed_host_does_not_resolve() {
    let proxy = Proxy::start(&["--allow", "no-such-host.invalid"]);
    let response = request(
        proxy.addr,
        "GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: no-such-host.invalid",
    );
    assert_eq!(response.status, 502, "{response:?}");
    let decision = proxy.next_decision();
    assert_eq!((decision.decision, decision.port), (Verdict::Deny, 80));
    assert!(
        decision.reason.starts_with("cannot resolve the host"),
        "{decision:?}"
    );
}

#[test]
fn answers_502_when_the_upstream_refuses_the_connection() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let port = closed.port();
    let proxy = proxy_on_loopback("127.0.0.1", port);
    let response = request(
        proxy.addr,
        &format!("GET http://{closed}/ HTTP/1.1\r\nHost: {closed}"),
    );
    assert_eq!(response.status, 502, "{response:?}");
    let reason = response
        .header("x-contractor-proxy-error")
        .expect("error header");
    assert!(
        reason.starts_with(&format!("cannot connect to {closed}")),
        "{reason}"
    );
    // The policy allowed it; the failure came after.
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
}

#[test]
fn sigterm_lets_an_open_tunnel_finish_then_exits_zero() {
    let echo = echo_server();
    let mut proxy = proxy_on_loopback("127.0.0.1", echo.port());
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    assert_eq!(read_head(&mut stream).0, 200);
    proxy.terminate();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "still accepting after SIGTERM"
    );
    stream
        .write_all(b"still here")
        .expect("write into the tunnel");
    let mut echoed = [0; 10];
    stream
        .read_exact(&mut echoed)
        .expect("the tunnel still relays");
    assert_eq!(&echoed, b"still here");
    let closed = Instant::now();
    drop(stream);
    let status = proxy.wait();
    assert!(status.success(), "{status:?}");
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "exit waited for the grace period"
    );
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
    assert_eq!(proxy.summary().allowed, 1);
}

#[test]
fn sigterm_ends_stdout_with_a_summary_that_counts_the_requests_made() {
    let upstream = Upstream::start(HELLO);
    let echo = echo_server();
    let (web, tunnel) = (upstream.addr.port(), echo.port());
    let mut proxy = Proxy::start(&[
        "--allow",
        "127.0.0.1",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &web.to_string(),
        "--allow-port",
        &tunnel.to_string(),
    ]);
    let get = format!("GET http://127.0.0.1:{web}/ HTTP/1.1\r\nHost: 127.0.0.1:{web}");
    let mut statuses = Vec::new();
    for head in [
        get.as_str(),
        get.as_str(),
        "GET http://example.org/ HTTP/1.1\r\nHost: example.org",
        "GET http://example.org/ HTTP/1.1\r\nHost: example.org",
        "GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: 127.0.0.1:22",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1",
    ] {
        statuses.push(request(proxy.addr, head).status);
    }
    assert_eq!(statuses, [200, 200, 403, 403, 403, 400]);
    let message = b"counted both ways";
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    assert_eq!(read_head(&mut stream).0, 200);
    stream.write_all(message).expect("write into the tunnel");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut echoed = Vec::new();
    stream
        .read_to_end(&mut echoed)
        .expect("read until the tunnel closes");
    assert_eq!(echoed, message);
    drop(stream);
    let decisions: Vec<Decision> = (0..7).map(|_| proxy.next_decision()).collect();
    proxy.terminate();
    assert!(proxy.wait().success());
    let summary = proxy.summary();
    assert_eq!(summary.kind, SummaryTag::Summary);
    let allowed = decisions
        .iter()
        .filter(|d| d.decision == Verdict::Allow)
        .count();
    assert_eq!((allowed, summary.allowed), (3, 3));
    let denied: Vec<(&str, u64)> = summary
        .denied
        .iter()
        .map(|(class, count)| (class.as_str(), *count))
        .collect();
    assert_eq!(
        denied,
        [
            ("bad_request", 1),
            ("host_not_allowed", 2),
            ("port_not_allowed", 1)
        ]
    );
    assert_eq!(summary.connections, 7);
    assert_eq!(summary.active_connections, 0);
    // Both responses, whole, and the echoed message came from upstreams; the message and
    // the two request heads went to them.
    assert_eq!(summary.bytes_down, (2 * HELLO.len() + message.len()) as u64);
    assert!(
        summary.bytes_up > message.len() as u64 + 2 * "GET / HTTP/1.1\r\n".len() as u64,
        "{summary:?}"
    );
}

#[test]
fn sigterm_cuts_a_tunnel_that_outlasts_the_grace_period() {
    let echo = echo_server();
    let mut proxy = proxy_on_loopback("127.0.0.1", echo.port());
    let mut stream = connect(proxy.addr);
    write!(stream, "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").expect("send CONNECT");
    assert_eq!(read_head(&mut stream).0, 200);
    let asked = Instant::now();
    proxy.terminate();
    let status = proxy.wait();
    assert!(status.success(), "{status:?}");
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        stream
            .read_to_end(&mut rest)
            .map(|_| rest.len())
            .unwrap_or(0),
        0,
        "the tunnel is closed"
    );
}

#[test]
fn invalid_rules_and_networks_exit_2_naming_them() {
    for (args, named) in [
        (["--allow", "*foo.com"], "\"*foo.com\""),
        (
            ["--allow", "example.org:0"],
            "ports after `:` must be numbers from 1 to 65535",
        ),
        (["--deny", "a.*.org"], "write *.example.org"),
        (
            ["--max-header-bytes", "100"],
            "--max-header-bytes: 100 is too small",
        ),
        (["--allow-net", "10.0.0.1/8"], "did you mean 10.0.0.0/8?"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            output.stdout.is_empty(),
            "{args:?}: nothing on stdout before the ready line"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(stderr.starts_with("contractor-proxy: --"), "{stderr}");
    }
}

#[test]
fn help_shows_an_example() {
    let output = Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
        .arg("--help")
        .output()
        .expect("run");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("contractor-proxy --allow deb.debian.org --listen 127.0.0.1:3128"),
        "{help}"
    );
    assert!(
        help.contains("curl -x http://127.0.0.1:3128 https://deb.debian.org/"),
        "{help}"
    );
}

#[test]
fn the_confined_binary_keeps_downloads_in_its_cache_and_serves_them_offline() {
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = cache.path().join("downloads");
    let dir_arg = dir.to_str().expect("utf-8 path");
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let url = format!("http://localhost:{port}/hello.txt");
    let get = format!("GET {url} HTTP/1.1\r\nHost: localhost:{port}");
    let port_arg = port.to_string();
    let mut args = vec![
        "--allow",
        "localhost",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &port_arg,
        "--record-downloads",
        "--cache",
        dir_arg,
        "--cache-project",
        "0123456789abcdef0123456789abcdef",
    ];
    let proxy = Proxy::start(&args);
    assert_eq!(request(proxy.addr, &get).body, "hello");
    upstream.next_head();
    // sha256("hello"), as sha256sum prints it: the entry's name, written by the confined proxy.
    let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let entry = dir.join("sha256").join(sha);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !entry.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&entry).expect("the cached body"), b"hello");
    drop(proxy);

    let pins = cache.path().join("pins.json");
    std::fs::write(&pins, format!("{{\"{url}\":\"{sha}\"}}")).expect("pins");
    args.extend(["--pins", pins.to_str().expect("utf-8 path"), "--offline"]);
    let proxy = Proxy::start(&args);
    let response = request(proxy.addr, &get);
    assert_eq!((response.status, response.body.as_str()), (200, "hello"));
    let other = request(proxy.addr, &get.replace("hello.txt", "other.txt"));
    assert_eq!(other.status, 403, "{other:?}");
    assert!(proxy.next_decision().reason.contains("download cache"));
    assert!(proxy.next_decision().reason.contains("offline"));
    assert!(upstream.got_nothing(), "offline reached the upstream");
}

/// `--record DIR`: the proxy files its decisions and downloads in the record itself, with
/// the phase, writes nothing but its summary on stdout, and the summary tallies what the
/// build's result needs (the host refused by the policy, the unpinned download).
#[test]
fn with_a_record_the_lines_go_to_its_files_and_the_summary_tallies_them() {
    let upstream = Upstream::start(HELLO);
    let web = upstream.addr.port();
    let record = tempfile::tempdir().expect("tempdir");
    let pins = record.path().join("pins.json");
    std::fs::write(&pins, "{}").expect("pins");
    let dir = record.path().to_str().expect("a UTF-8 path");
    let mut proxy = Proxy::start(&[
        "--allow",
        "127.0.0.1",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &web.to_string(),
        "--record-downloads",
        "--pins",
        pins.to_str().expect("a UTF-8 path"),
        "--record",
        dir,
        "--record-phase",
        "fetch",
    ]);
    let get = format!("GET http://127.0.0.1:{web}/ HTTP/1.1\r\nHost: 127.0.0.1:{web}");
    assert_eq!(request(proxy.addr, &get).status, 200);
    let refused = "GET http://example.org/ HTTP/1.1\r\nHost: example.org";
    assert_eq!(request(proxy.addr, refused).status, 403);
    proxy.terminate();
    assert!(proxy.wait().success());
    // The summary is the only line after the ready line.
    let summary = proxy.summary();
    let filed = summary.record.expect("the summary's record tally");
    assert_eq!(filed.refused_hosts, ["example.org"]);
    assert_eq!(
        (filed.unpinned, filed.mismatches, filed.left_out),
        (1, 0, 0)
    );
    let read = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(record.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let decisions = read("proxy.jsonl");
    let downloads = read("downloads.jsonl");
    let verdicts: Vec<(&str, &str)> = decisions
        .iter()
        .map(|d| {
            (
                d["host"].as_str().unwrap_or(""),
                d["decision"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The two decisions, then the summary, filed last.
    assert_eq!(
        verdicts,
        [("127.0.0.1", "allow"), ("example.org", "deny"), ("", "")]
    );
    assert_eq!(decisions[2]["type"], "summary");
    assert_eq!(decisions[2]["record"]["refused_hosts"][0], "example.org");
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(downloads[0]["status"], 200);
    assert!(
        decisions
            .iter()
            .chain(&downloads)
            .all(|l| l["phase"] == "fetch"),
        "{decisions:?} {downloads:?}"
    );
}

/// A phase the proxy does not serve is refused by name.
#[test]
fn a_record_phase_that_is_not_one_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
        .args(["--record", "/tmp", "--record-phase", "build"])
        .output()
        .expect("run contractor-proxy");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"build\" is not a phase; use fetch or script"),
        "{stderr}"
    );
}
