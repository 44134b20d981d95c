//! The front end's requests to `contractor-host` (`resolve`, `hosts`, `send`), run as the
//! real binary with a stand-in `ssh` (`CONTRACTOR_SSH`): bad request lines are refused
//! naming the field, and a build host that cannot be reached, never answers or goes away
//! mid-session gives the documented answer line. No VM and no network. `send`'s session
//! needs `contractor-store` built beside `contractor-host` (`cargo build --workspace`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use contractor_protocol::fleet::{Fleet, FleetRequest, SendLine, SessionRequest};
use serde_json::Value;

/// A temp dir with a stand-in ssh, a runtime dir (for the line and the control sockets)
/// and a data dir.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    /// `session` is the shell run for the session (`contractor-host build`), `capacity`
    /// for the room probe (`contractor-vm capacity`).
    fn new(capacity: &str, session: &str) -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let ssh = format!(
            "#!/bin/sh\ncase \"$*\" in\n  *' contractor-vm capacity '*) {capacity} ;;\n  *) {session} ;;\nesac\n"
        );
        let path = dir.path().join("ssh");
        std::fs::write(&path, ssh).expect("ssh");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["run", "data"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::fs::set_permissions(
            dir.path().join("run"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        Bench { dir }
    }

    fn command(&self, request: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contractor-host"));
        command
            .arg(request)
            .env("CONTRACTOR_SSH", self.dir.path().join("ssh"))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("run"))
            .env("CONTRACTOR_DATA_DIR", self.dir.path().join("data"))
            .env("CONTRACTOR_CONFIG", self.dir.path().join("none.toml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `contractor-host request` with `line` on stdin: its exit code and stdout lines.
    fn ask(&self, request: &str, line: &str) -> (Option<i32>, Vec<Value>) {
        let mut child = self.command(request).spawn().expect("contractor-host");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{line}").expect("request");
        drop(stdin);
        let output = child.wait_with_output().expect("wait");
        let lines = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        (output.status.code(), lines)
    }

    /// A record directory (named by its build id) and a source tar in a store here.
    fn record(&self) -> (PathBuf, PathBuf) {
        let record = self.dir.path().join("project/.contractor/builds").join(ID);
        std::fs::create_dir_all(&record).expect("record");
        let tar = record.join("source.tar");
        std::fs::write(&tar, vec![0u8; 1024]).expect("tar");
        (record, tar)
    }
}

const ID: &str = "20261205-100000-abcdef";

const ROOM: &str = r#"echo '{"type":"capacity","version":1,"contractor":"0.1.0","free_memory_mib":65536,"cpus":64,"running":0}'"#;

fn fleet_line(hosts: &[&str]) -> String {
    serde_json::to_string(&FleetRequest {
        version: 1,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        cpus: 2,
        memory_mib: 2048,
    })
    .expect("json")
}

/// The error object's code and chain, joined.
fn refused(lines: &[Value]) -> (String, String) {
    let error = lines.last().expect("an error line");
    assert_eq!(error["type"], "error", "{lines:?}");
    let chain: Vec<String> = serde_json::from_value(error["chain"].clone()).expect("chain");
    (
        error["code"].as_str().unwrap_or_default().to_string(),
        chain.join(": "),
    )
}

#[test]
fn bad_request_lines_are_refused_naming_the_field() {
    let bench = Bench::new(ROOM, "exit 255");
    for request in ["send", "hosts"] {
        let (code, lines) = bench.ask(request, r#"{"version":1,"hostz":["a"],"cpus":2}"#);
        assert_eq!(code, Some(2), "{request}");
        let (kind, chain) = refused(&lines);
        assert_eq!(kind, "bad_json", "{request}");
        assert!(chain.contains("hostz"), "{request}: {chain}");

        let (code, lines) = bench.ask(request, &fleet_line(&["ci@box", "-oProxyCommand=sh"]));
        assert_eq!(code, Some(2), "{request}");
        let (kind, chain) = refused(&lines);
        assert_eq!(kind, "bad_host", "{request}");
        assert!(chain.contains("hosts[1]"), "{request}: {chain}");
        assert!(chain.contains("-oProxyCommand=sh"), "{request}: {chain}");
    }
    let (code, lines) = bench.ask("resolve", r#"{"version":1,"hosts":["ci@"]}"#);
    assert_eq!(code, Some(2));
    let (kind, chain) = refused(&lines);
    assert_eq!(kind, "bad_host");
    assert!(chain.starts_with("--host \"ci@\""), "{chain}");

    let (code, lines) = bench.ask(
        "resolve",
        r#"{"version":1,"hosts":["ssh://ci@[fd00::1]:2222"]}"#,
    );
    assert_eq!(code, Some(0));
    assert_eq!(lines[0]["hosts"][0], "ci@[fd00::1]:2222", "{lines:?}");
}

#[test]
fn hosts_reports_each_hosts_room_or_why_it_has_none() {
    let bench = Bench::new(ROOM, "exit 255");
    let (code, lines) = bench.ask("hosts", &fleet_line(&["ci@box"]));
    assert_eq!(code, Some(0));
    let fleet: Fleet = serde_json::from_value(lines[0].clone()).expect("fleet");
    let room = fleet.hosts[0].room.as_ref().expect("room");
    assert_eq!((room.builds, room.cpus), (32, 64));

    let bench = Bench::new("echo 'ssh: connect: refused' >&2; exit 255", "exit 255");
    let (_, lines) = bench.ask("hosts", &fleet_line(&["ci@box"]));
    let fleet: Fleet = serde_json::from_value(lines[0].clone()).expect("fleet");
    let why = fleet.hosts[0].unavailable.as_deref().expect("why");
    assert!(
        why.contains("cannot be reached: ssh: connect: refused"),
        "{why}"
    );
}

#[test]
fn send_with_no_host_that_answers_fails_naming_each_host() {
    let bench = Bench::new("exit 255", "exit 255");
    let (code, lines) = bench.ask("send", &fleet_line(&["ci@one", "ci@two"]));
    assert_eq!(code, Some(0));
    let answer: SendLine = serde_json::from_value(lines[0].clone()).expect("answer");
    let SendLine::SessionFailed { error } = answer else {
        panic!("not session_failed: {lines:?}");
    };
    assert_eq!(error.code, "build_host");
    assert_eq!(
        error.chain[0],
        "none of the 2 build hosts can take the build"
    );
    assert!(
        error.chain[1].starts_with("ci@one: cannot be reached"),
        "{error:?}"
    );
}

/// A `send` that has chosen its host and been sent the build.
fn session(bench: &Bench) -> (Child, BufReader<ChildStdout>) {
    let mut child = bench.command("send").spawn().expect("contractor-host");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", fleet_line(&["ci@box"])).expect("fleet");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let first = next(&mut out);
    assert!(matches!(first, SendLine::Chosen { .. }), "{first:?}");
    let (record, source) = bench.record();
    let spec_file = bench.dir.path().join("project/contractor.toml");
    std::fs::write(&spec_file, "[build]\nscript = \"make\"\n").expect("spec");
    let request = SessionRequest {
        id: ID.into(),
        record,
        source,
        source_entries: 1,
        spec_file,
        lock_file: None,
        project: "0".repeat(32),
        accel: Default::default(),
        snapshot: true,
        offline: false,
        max_record_bytes: 1 << 20,
    };
    writeln!(stdin, "{}", serde_json::to_string(&request).expect("json")).expect("session");
    // Held open as the front end holds it: its end is the session's end.
    std::mem::forget(stdin);
    (child, out)
}

fn next(out: &mut BufReader<ChildStdout>) -> SendLine {
    let mut line = String::new();
    out.read_line(&mut line).expect("a line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn an_ssh_that_dies_mid_session_is_the_build_hosts_failure_naming_it() {
    let bench = Bench::new(ROOM, "cat >/dev/null & sleep 0.2; exit 255");
    let (mut child, mut out) = session(&bench);
    let SendLine::SessionFailed { error } = next(&mut out) else {
        panic!("not session_failed");
    };
    let chain = error.chain.join(": ");
    assert!(
        chain.contains(
            "the build host ci@box went away before the build finished: ssh could not reach it"
        ),
        "{chain}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn ctrl_c_closes_the_session_and_is_named_in_the_answer() {
    // A build host that ends the session when its stdin closes (as contractor-host build
    // does), having sent nothing.
    let bench = Bench::new(
        ROOM,
        "touch \"$CONTRACTOR_DATA_DIR/session\"; cat >/dev/null; exit 0",
    );
    let (mut child, mut out) = session(&bench);
    // Once ssh runs, the session watches for signals: Ctrl-C then.
    let started = bench.dir.path().join("data/session");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("kill");
    assert_eq!(
        next(&mut out),
        SendLine::SessionInterrupted {
            signal: "Ctrl-C".into()
        }
    );
    assert!(child.wait().expect("wait").success());
}

#[test]
fn a_session_request_whose_record_is_not_its_builds_is_refused_naming_the_field() {
    let bench = Bench::new(ROOM, "exit 255");
    let mut child = bench.command("send").spawn().expect("contractor-host");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", fleet_line(&["ci@box"])).expect("fleet");
    let line = serde_json::json!({"id": ID, "record": "/tmp", "source": "/etc/hostname",
        "source_entries": 1, "spec_file": "/nonexistent", "lock_file": null,
        "project": "0".repeat(32), "accel": "auto", "snapshot": true, "offline": false,
        "max_record_bytes": 1});
    writeln!(stdin, "{line}").expect("session");
    drop(stdin);
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(2));
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines[0]["type"], "chosen", "{lines:?}");
    let (kind, chain) = refused(&lines);
    assert_eq!(kind, "bad_session");
    assert!(chain.starts_with("id, record:"), "{chain}");
}

#[test]
fn vm_runs_only_the_doctors_checks_there_and_exits_as_ssh_did() {
    let bench = Bench::new("exit 255", "echo 'ssh: connect: refused' >&2; exit 255");
    let run = |args: &[&str]| {
        let mut command = bench.command("vm");
        command.args(args).stdin(Stdio::null());
        command.output().expect("contractor-host vm")
    };
    let out = run(&["--host", "ci@box", "check", "--json-errors"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ssh: connect: refused"));
    let out = run(&["--host", "ci@box", "destroy", "x", "--json-errors"]);
    assert_eq!(out.status.code(), Some(2));
    let (kind, chain) = refused(&[serde_json::from_slice(&out.stdout).expect("error object")]);
    assert_eq!(kind, "usage");
    assert!(chain.contains("only `check [--uri URI]` is run"), "{chain}");
}
