//! URL rules through the real binary: they decide on exactly what is forwarded (one
//! normalised path; path parameters and double encodings refused), an `Upgrade` cannot turn
//! a checked request into an unchecked relay, and a rule's own port is reachable by the
//! confined proxy.

#[allow(dead_code)]
mod util;

use contractor_protocol::proxy::Verdict;
use util::{request, Proxy, Upstream};

const HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

/// A proxy that reaches `localhost:port` only through `GET http://localhost:port/public/**`,
/// confined unless `--no-confine` is in `extra`.
fn ruled(port: u16, extra: &[&str]) -> Proxy {
    let rule = format!("GET http://localhost:{port}/public/**");
    let mut args = vec!["--allow-net", "127.0.0.0/8", "--allow", &rule];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

#[test]
fn a_url_rule_with_a_port_makes_that_port_reachable_for_the_confined_proxy() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = ruled(port, &[]);
    assert!(proxy.ready.confinement.is_some(), "confined");
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/public/x HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "hello"),
        "{response:?}"
    );
    assert_eq!(proxy.next_decision().decision, Verdict::Allow);
}

#[test]
fn paths_read_two_ways_are_refused_and_the_checked_path_is_what_is_forwarded() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = ruled(port, &["--no-confine"]);
    for (path, why) in [
        ("/public/..;/private/x", "`;`"),
        ("/public/%252e%252e/private/x", "encoded twice"),
        ("/public/x;type=a", "`;`"),
    ] {
        let response = request(
            proxy.addr,
            &format!("GET http://localhost:{port}{path} HTTP/1.1\r\nHost: localhost:{port}"),
        );
        assert_eq!(response.status, 403, "{path}: {response:?}");
        let decision = proxy.next_decision();
        assert_eq!(decision.decision, Verdict::Deny, "{path}");
        assert!(decision.reason.contains(why), "{path}: {}", decision.reason);
        assert!(
            decision.reason.contains(path),
            "{path}: {}",
            decision.reason
        );
        assert!(upstream.got_nothing(), "{path} reached the upstream");
    }
    // An escaped unreserved character is the character: forwarded as the rule read it.
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/%70ublic/%7Ex HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    let head = upstream.next_head();
    assert!(head.starts_with("GET /public/~x HTTP/1.1\r\n"), "{head}");
}

#[test]
fn an_upgrade_to_a_host_under_url_rules_is_refused() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port();
    let proxy = ruled(port, &["--no-confine"]);
    let response = request(
        proxy.addr,
        &format!(
            "GET http://localhost:{port}/public/ws HTTP/1.1\r\nHost: localhost:{port}\r\n\
             Upgrade: websocket"
        ),
    );
    assert_eq!(response.status, 403, "{response:?}");
    let decision = proxy.next_decision();
    assert_eq!(decision.decision, Verdict::Deny);
    assert!(decision.reason.contains("Upgrade"), "{}", decision.reason);
    assert!(upstream.got_nothing(), "the upgrade reached the upstream");
}
