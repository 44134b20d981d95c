//! Many open CONNECT tunnels at once, as a package manager leaves them (npm's proxy agent
//! opens one tunnel per request and keeps it open): the real binary, whose file
//! descriptors are limited by its confinement to two per connection slot and a spare, holds
//! every slot's tunnel open and relaying, and answers the next CONNECT once one closes.

#[allow(dead_code)]
mod util;

use std::io::{Read, Write};
use std::net::TcpStream;

/// The proxy's connection slots in this test: its file limit is then 2 × 120 + 256.
const SLOTS: usize = 120;

/// Opens a CONNECT tunnel to `target` through `proxy` and sees one line echoed through it;
/// the proxy's status when it answers anything but 200, with its headers.
fn try_tunnel(
    proxy: std::net::SocketAddr,
    target: &str,
    n: usize,
) -> Result<TcpStream, (u16, Vec<(String, String)>)> {
    let mut stream = util::connect(proxy);
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )
    .expect("send CONNECT");
    let (status, headers) = util::read_head(&mut stream);
    if status != 200 {
        return Err((status, headers));
    }
    let line = format!("tunnel {n}\n");
    stream.write_all(line.as_bytes()).expect("write");
    let mut echoed = vec![0u8; line.len()];
    if let Err(e) = stream.read_exact(&mut echoed) {
        panic!("tunnel {n}: no echo: {e}");
    }
    assert_eq!(echoed, line.as_bytes(), "tunnel {n}");
    Ok(stream)
}

/// [`try_tunnel`], which must succeed.
fn echoing_tunnel(proxy: std::net::SocketAddr, target: &str, n: usize) -> TcpStream {
    try_tunnel(proxy, target, n)
        .unwrap_or_else(|(status, headers)| panic!("tunnel {n}: status {status}: {headers:?}"))
}

#[test]
fn every_connection_slot_holds_an_open_tunnel_and_the_proxy_answers_after_them() {
    let upstream = util::echo_server();
    let port = upstream.port().to_string();
    let slots = SLOTS.to_string();
    let proxy = util::Proxy::start(&[
        "--allow",
        "localhost",
        "--allow-net",
        "127.0.0.0/8",
        "--allow-port",
        &port,
        "--max-connections",
        &slots,
    ]);
    let target = format!("localhost:{port}");
    // All but one slot: the one left is the next CONNECT's.
    let open: Vec<TcpStream> = (0..SLOTS - 1)
        .map(|n| echoing_tunnel(proxy.addr, &target, n))
        .collect();
    let last = echoing_tunnel(proxy.addr, &target, SLOTS - 1);
    drop(last);
    drop(open);
    // Every tunnel gone, the proxy still resolves and dials. It frees a slot when it sees
    // its tunnel's end, which may come just after our close: until then it answers 503
    // with `Retry-After`, and a client that waits as told gets its tunnel (at most 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        match try_tunnel(proxy.addr, &target, SLOTS) {
            Ok(stream) => break stream,
            Err((503, headers))
                if std::time::Instant::now() < deadline
                    && headers.iter().any(|(name, _)| name == "retry-after") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err((status, headers)) => panic!("after the tunnels: status {status}: {headers:?}"),
        }
    };
    drop(after);
    assert!(
        !proxy.stderr().contains("dialer"),
        "the proxy's stderr: {}",
        proxy.stderr()
    );
}
