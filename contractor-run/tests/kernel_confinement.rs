//! The relay confines itself (Landlock, seccomp, rlimits) once it holds the VM's channels
//! and the build log, before its first read from the guest: the real binary says so in its
//! `started` event and in /proc while it waits for the agent. A probe applies the relay's
//! exact policy in a child process, after opening its links, and tries what a compromised
//! relay would: the home, a file anywhere, a port other than the proxy's and the store's,
//! `execve`; while the channels, the log and the two ports still work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use contractor_protocol::result::Outcome;
use contractor_protocol::run::{RunEvent, RunRequest};

const PROBE: &str = "CONTRACTOR_RUN_PROBE";

fn request(dir: &Path, proxy: u16, store: u16) -> RunRequest {
    serde_json::from_value(serde_json::json!({
        "version": 1,
        "control_socket": dir.join("control.sock"),
        "tunnel_socket": dir.join("tunnel.sock"),
        "proxy": format!("127.0.0.1:{proxy}"),
        "store": format!("127.0.0.1:{store}"),
        "log": dir.join("build.log"),
        "timeout_secs": 60,
        "boot_timeout_secs": 60,
        "job": {"script": "true", "source": "/builds/x/source.tar",
                "artifacts_dest": "/builds/x/artifacts/"}
    }))
    .expect("a request")
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn a_relay_waiting_for_its_agent_is_confined_and_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = UnixListener::bind(dir.path().join("control.sock")).expect("control");
    let tunnel = UnixListener::bind(dir.path().join("tunnel.sock")).expect("tunnel");
    let request = request(dir.path(), 9, 9);
    let mut relay = Command::new(env!("CARGO_BIN_EXE_contractor-run"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn contractor-run");
    let mut stdin = relay.stdin.take().expect("stdin");
    serde_json::to_writer(&mut stdin, &request).expect("write the request");
    drop(stdin);
    let mut events = BufReader::new(relay.stdout.take().expect("stdout"));
    let (control, _) = control.accept().expect("the relay connects to control");
    let (tunnel, _) = tunnel.accept().expect("the relay connects to the tunnel");

    let mut line = String::new();
    events.read_line(&mut line).expect("the first event");
    let Ok(RunEvent::Started {
        confinement: Some(confinement),
        ..
    }) = serde_json::from_str(&line)
    else {
        panic!("not a started event with confinement: {line}");
    };
    assert!(
        confinement.enforced && confinement.no_new_privs,
        "{confinement:?}"
    );
    assert!(
        confinement.seccomp && confinement.rlimits,
        "{confinement:?}"
    );
    if confinement.landlock_abi >= 1 {
        assert!(confinement.landlock_fs, "{confinement:?}");
    }
    assert_eq!(confinement.landlock_net, confinement.landlock_abi >= 4);
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.id()))
        .expect("read /proc/PID/status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");

    // The VM goes away before its agent says hello: the relay ends the stream itself.
    drop((control, tunnel));
    let mut rest = String::new();
    events.read_to_string(&mut rest).expect("the rest");
    let last = rest.lines().last().unwrap_or_default();
    match serde_json::from_str(last) {
        Ok(RunEvent::Finished {
            outcome: Outcome::Infrastructure,
            error: Some(error),
            ..
        }) => assert_eq!(error.code, "agent_gone", "{last}"),
        other => panic!("expected finished/agent_gone, got {other:?}: {rest}"),
    }
    assert_eq!(relay.wait().expect("wait").code(), Some(3));
}

#[test]
fn the_relay_policy_keeps_the_home_files_other_ports_and_exec_out_of_reach() {
    let home = tempfile::tempdir().expect("home");
    let work = tempfile::tempdir().expect("work");
    std::fs::write(home.path().join("secret"), b"ssh key").expect("secret");
    let exe = std::env::current_exe().expect("own exe");
    let out = Command::new(exe)
        .args(["probe_relay_policy", "--exact", "--nocapture"])
        .env(PROBE, "1")
        .env("PROBE_HOME", home.path())
        .env("PROBE_WORK", work.path())
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the probe failed:\n{text}");
    assert!(text.contains("1 passed"), "the probe did not run:\n{text}");
}

#[test]
fn probe_relay_policy() {
    if std::env::var_os(PROBE).is_none() {
        return;
    }
    let dir = |name| PathBuf::from(std::env::var_os(name).expect(name));
    let (home, work) = (dir("PROBE_HOME"), dir("PROBE_WORK"));
    let control = UnixListener::bind(work.join("control.sock")).expect("control");
    let _tunnel = UnixListener::bind(work.join("tunnel.sock")).expect("tunnel");
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy");
    let store = TcpListener::bind("127.0.0.1:0").expect("store");
    let other = TcpListener::bind("127.0.0.1:0").expect("other");
    let port = |l: &TcpListener| l.local_addr().expect("addr").port();
    let request = request(&work, port(&proxy), port(&store));

    let opened = contractor_run::open_links(&request);
    // The guest's end (this test plays both) is taken before the relay's rules hold.
    let (mut guest_end, _) = control.accept().expect("accept");
    let policy = contractor_run::confinement::policy(&request);
    let report = contractor_confine::confine("probe", &policy).expect("confine");
    assert!(report.landlock_fs && report.seccomp, "{report:?}");

    // What it must do: its links and the two ports.
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    let runtime = runtime
        .enable_all()
        .build()
        .expect("a runtime after confine");
    let (events, mut received) = contractor_run::host::event_channel();
    std::thread::spawn(move || {
        let _ = guest_end.write_all(b"not a hello\n");
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    let finished = runtime.block_on(async move {
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let finished = contractor_run::run(request, opened, None, events).await;
        drain.abort();
        finished
    });
    let RunEvent::Finished { error, .. } = finished else {
        panic!("{finished:?}");
    };
    // The agent's line reached the relay through the held socket, and the log was made.
    assert_eq!(error.expect("an error").code, "bad_message");
    assert!(work.join("build.log").exists());
    TcpStream::connect(("127.0.0.1", port(&proxy))).expect("the proxy's port");
    TcpStream::connect(("127.0.0.1", port(&store))).expect("the store's port");

    // What it must not do.
    let e = std::fs::read(home.join("secret")).expect_err("the home is out of reach");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::write(work.join("elsewhere"), b"x").expect_err("no file by name");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::read(work.join("build.log")).expect_err("not even its own log by name");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = Command::new("/bin/true").status().expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    // A call off the relay's seccomp allowlist (and on no denylist) is refused too.
    let e = std::env::set_current_dir("/").expect_err("chdir is not on the allowlist");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    let e = std::fs::create_dir(work.join("dir")).expect_err("mkdir is not either");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    // No new Unix socket (the user's services, libvirt's session daemon) and no UDP.
    let e = std::os::unix::net::UnixStream::connect(work.join("tunnel.sock"))
        .expect_err("a Unix socket by path");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::net::UdpSocket::bind("127.0.0.1:0").expect_err("UDP");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    if report.landlock_net {
        let e = TcpStream::connect(("127.0.0.1", port(&other))).expect_err("another port");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
    // bind is not even on the allowlist (and Landlock grants no port).
    let e = TcpListener::bind("127.0.0.1:0").expect_err("bind");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
}
