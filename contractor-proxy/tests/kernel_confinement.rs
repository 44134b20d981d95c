//! The proxy confines itself (Landlock, seccomp, rlimits) before it serves: the real binary
//! says so in its ready line and in /proc, still resolves a name from /etc/hosts and proxies
//! to an allowed loopback server. A probe applies the proxy's exact policy in a child process
//! and tries what a compromised proxy would: the user's files, other ports, `execve`.

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
fn the_proxy_policy_keeps_a_compromised_proxy_to_resolution_and_its_ports() {
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
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_port = allowed.local_addr().expect("addr").port();
    let mut config = ProxyConfig::new(Allowlist::default());
    config.allowed_ports = [allowed_port].into();
    let policy = contractor_proxy::confinement::policy(
        &config,
        listener.local_addr().expect("addr").port(),
        None,
    );
    let report = contractor_confine::confine("probe", &policy).expect("confine");
    println!("{report:?}");

    // What the proxy must do: resolve names (here from /etc/hosts), connect to its ports.
    let resolved: Vec<_> = ("localhost", allowed_port)
        .to_socket_addrs()
        .expect("resolve localhost under confinement")
        .collect();
    assert!(!resolved.is_empty());
    TcpStream::connect(("127.0.0.1", allowed_port)).expect("an allowed port");
    std::fs::read("/etc/hosts").expect("read /etc/hosts");

    if report.landlock_fs {
        let e = std::fs::read(home.join("id_ed25519")).expect_err("home");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = std::fs::write(home.join("planted"), b"x").expect_err("write");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = std::fs::read("/etc/shadow").expect_err("shadow");
        assert!(matches!(errno(&e), libc::EACCES), "{e}");
    }
    if report.landlock_net {
        let port = other.local_addr().expect("addr").port();
        let e = TcpStream::connect(("127.0.0.1", port)).expect_err("a port outside the rules");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = TcpListener::bind("127.0.0.1:0").expect_err("bind another port");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
    let e = Command::new("/bin/sh")
        .arg("-c")
        .arg("true")
        .status()
        .expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
}
