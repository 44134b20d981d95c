//! The proxy confines itself (Landlock, seccomp, rlimits) before it serves: the real binary
//! says so in its ready line and in /proc, still resolves a name from /etc/hosts and proxies
//! to an allowed loopback server through its dialer. A probe applies the proxy's exact policy
//! in a child process and tries what a compromised proxy would: the user's files, a socket
//! of its own to any address, `execve`; another asks the real dialer, as the proxy starts
//! it, for addresses the policy refuses.

#[allow(dead_code)] // this file uses a small part of the shared harness
mod util;

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;

use contractor_proxy::{Allowlist, ProxyConfig};
use util::{request, Proxy, Upstream};

const HELLO: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

#[test]
fn a_serving_proxy_is_confined_says_so_and_still_proxies_to_an_allowed_port() {
    let upstream = Upstream::start(HELLO);
    let port = upstream.addr.port().to_string();
    let proxy = Proxy::start(&[
        "--allow-net",
        "127.0.0.0/8",
        "--allow",
        "localhost",
        "--allow-port",
        &port,
    ]);
    let confinement = proxy
        .ready
        .confinement
        .clone()
        .expect("a confinement field");
    assert!(confinement.enforced, "{confinement:?}");
    assert!(confinement.no_new_privs && confinement.seccomp && confinement.rlimits);
    if confinement.landlock_abi >= 1 {
        assert!(confinement.landlock_fs, "{confinement:?}");
    }
    assert_eq!(confinement.landlock_net, confinement.landlock_abi >= 4);
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // Its one child is the dialer, confined too.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", proxy.pid()))
        .expect("children");
    let dialer = children
        .split_whitespace()
        .next()
        .expect("a dialer process");
    let cmdline = std::fs::read(format!("/proc/{dialer}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("__dialer"),
        "{cmdline:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{dialer}/status")).expect("status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");

    // localhost comes from /etc/hosts, read under confinement.
    let response = request(
        proxy.addr,
        &format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"),
    );
    assert_eq!(response.status, 200, "{response:?} {}", proxy.stderr());
    assert_eq!(response.body, "hello");
}

const PROBE: &str = "CONTRACTOR_PROXY_CONFINE_PROBE";

#[test]
fn the_proxy_policy_leaves_a_compromised_proxy_no_socket_and_no_file() {
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("id_ed25519"), b"secret").expect("secret");
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "probe_proxy_policy",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .env("PROBE_HOME", home.path())
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn probe_proxy_policy() {
    let Some(home) = std::env::var_os(PROBE).and(std::env::var_os("PROBE_HOME")) else {
        return;
    };
    let home = PathBuf::from(home);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_port = allowed.local_addr().expect("addr").port();
    let mut config = ProxyConfig::new(Allowlist::parse(["localhost"]).expect("rule"));
    config.allowed_ports = [allowed_port].into();
    config.allowed_nets = vec!["127.0.0.0/8".parse().expect("net")];
    let policy = contractor_proxy::confinement::policy(
        &config,
        listener.local_addr().expect("addr").port(),
        None,
    );
    let report = contractor_confine::confine("probe", &policy).expect("confine");
    println!("{report:?}");

    // A taken-over proxy cannot make a socket: not to an allowed port at an allowed
    // address, not to the cloud's metadata service; it resolves nothing itself.
    let e = TcpStream::connect(("127.0.0.1", allowed_port)).expect_err("an allowed port");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = TcpStream::connect(("169.254.169.254", 80)).expect_err("metadata");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::net::UdpSocket::bind("127.0.0.1:0").expect_err("UDP");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::os::unix::net::UnixStream::connect("/run/dbus/system_bus_socket")
        .expect_err("a Unix socket");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    assert!(("localhost", allowed_port).to_socket_addrs().is_err());

    if report.landlock_fs {
        let e = std::fs::read(home.join("id_ed25519")).expect_err("home");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = std::fs::write(home.join("planted"), b"x").expect_err("write");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = std::fs::read("/etc/shadow").expect_err("shadow");
        assert!(matches!(errno(&e), libc::EACCES), "{e}");
        let e = std::fs::read("/etc/hosts").expect_err("hosts: the dialer resolves");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
    let e = TcpListener::bind("127.0.0.1:0").expect_err("bind another port");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = Command::new("/bin/sh")
        .arg("-c")
        .arg("true")
        .status()
        .expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
}

const DIALER_PROBE: &str = "CONTRACTOR_PROXY_DIALER_PROBE";

#[test]
fn the_dialer_refuses_what_the_policy_refuses_even_to_a_confined_proxy() {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args(["probe_dialer", "--exact", "--nocapture", "--test-threads=1"])
        .env(DIALER_PROBE, "1")
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

/// Starts the real binary's dialer as the proxy does, confines this process with the
/// proxy's policy, then asks the dialer for what a taken-over proxy would want.
#[test]
fn probe_dialer() {
    use contractor_proxy::dialer::{self, Dialer, Settings};
    use std::io::{Read, Write};
    use std::time::Duration;

    if std::env::var_os(DIALER_PROBE).is_none() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let own = listener.local_addr().expect("addr");
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_port = allowed.local_addr().expect("addr").port();
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = ProxyConfig::new(Allowlist::parse(["localhost"]).expect("rule"));
    config.allowed_ports = [allowed_port, 80, own.port()].into();
    config.allowed_nets = vec!["127.0.0.0/8".parse().expect("net")];
    let spawned = dialer::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_contractor-proxy")),
        &Settings::of(&config, &[own], true),
    )
    .expect("start the dialer");
    let policy = contractor_proxy::confinement::policy(&config, own.port(), None);
    contractor_confine::confine("probe", &policy).expect("confine");
    let e = TcpStream::connect(("127.0.0.1", allowed_port)).expect_err("no socket here");
    assert_eq!(errno(&e), libc::EACCES, "{e}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dialer = Dialer::start(spawned.socket).expect("dialer");
        let second = Duration::from_secs(2);
        let refused = |addr: &str| {
            let dialer = dialer.clone();
            let addr = addr.parse().expect("addr");
            async move {
                let e = dialer.connect(addr, second).await.expect_err("refused");
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
                e.to_string()
            }
        };
        let why = refused("169.254.169.254:80").await;
        assert!(why.contains("169.254.169.254 is link-local"), "{why}");
        let why = refused("10.1.2.3:80").await;
        assert!(why.contains("is private"), "{why}");
        let why = refused(&own.to_string()).await;
        assert!(why.contains("the proxy's own listening address"), "{why}");
        let other = other.local_addr().expect("addr").to_string();
        let why = refused(&other).await;
        assert!(why.contains("not allowed"), "{why}");

        // What the policy allows works: a name it covers resolves, an address connects,
        // and the socket handed over reaches the server.
        let addrs = dialer
            .resolve("localhost", allowed_port)
            .await
            .expect("resolve");
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], allowed_port));
        assert!(addrs.contains(&to), "{addrs:?}");
        let e = dialer
            .resolve("leak.example.com", allowed_port)
            .await
            .expect_err("a name no rule covers");
        assert!(e.to_string().contains("refuses to resolve"), "{e}");
        let mut stream = dialer
            .connect(to, second)
            .await
            .expect("connect")
            .into_std()
            .expect("std");
        stream.set_nonblocking(false).expect("blocking");
        stream.write_all(b"ping").expect("write");
        let (mut accepted, _) = allowed.accept().expect("accept");
        let mut got = [0_u8; 4];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
    });
}
