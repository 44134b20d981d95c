//! `contractor-run` as a command: bad requests (exit 2, with line, column and field), the
//! `--json-errors` object, a request whose VM never answers (exit 3, the stream still ends
//! with `finished`), and `--help`. None of these needs a VM.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use contractor_protocol::result::Outcome;
use contractor_protocol::run::RunEvent;

/// The error object of `--json-errors`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorObject {
    r#type: String,
    version: u32,
    code: String,
    chain: Vec<String>,
}

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-run"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn contractor-run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write the request");
    child.wait_with_output().expect("wait for contractor-run")
}

/// A request for a VM whose channel sockets never appear.
fn request(dir: &std::path::Path) -> String {
    serde_json::json!({
        "version": 1,
        "control_socket": dir.join("control.sock"),
        "tunnel_socket": dir.join("tunnel.sock"),
        "proxy": "127.0.0.1:9",
        "store": "127.0.0.1:9",
        "log": dir.join("build.log"),
        "timeout_secs": 60,
        "boot_timeout_secs": 1,
        "job": {"script": "true", "source": "/builds/x/source.tar",
                "artifacts_dest": "/builds/x/artifacts/"}
    })
    .to_string()
}

#[test]
fn bad_json_is_exit_2_naming_line_column_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = request(dir.path()).replace("\"timeout_secs\":60", "\n\"timeout_secs\":\"60\"");
    assert!(bad.contains("\"60\""), "the request has the field: {bad}");
    let out = run(&[], &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout without --json-errors"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("at line 2, column 19, in `timeout_secs`: invalid type"),
        "{stderr}"
    );
}

#[test]
fn json_errors_writes_one_error_object() {
    let out = run(&["--json-errors"], "{\"version\": 1,\n \"jobb\": {}}");
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let error: ErrorObject = serde_json::from_str(&stdout).expect("an error object");
    assert_eq!((error.r#type.as_str(), error.version), ("error", 1));
    assert_eq!(error.code, "bad_json");
    assert!(
        error.chain[0].contains("line 2, column 7, in `jobb`: unknown field `jobb`"),
        "{error:?}"
    );

    let out = run(&["--json-errors"], "");
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("an error object");
    assert_eq!(error.code, "no_request");

    let dir = tempfile::tempdir().expect("temp dir");
    let future = request(dir.path()).replace("\"version\":1", "\"version\":2");
    let out = run(&["--json-errors"], &future);
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("an error object");
    assert_eq!(error.code, "unsupported");
    assert!(error.chain[0].contains("version 2"), "{error:?}");
}

#[test]
fn a_vm_that_never_answers_is_exit_3_and_the_stream_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&["--json-errors"], &request(dir.path()));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<RunEvent> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        matches!(events.first(), Some(RunEvent::Started { .. })),
        "{stdout}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, RunEvent::Unknown)),
        "no error object once the stream has started: {stdout}"
    );
    match events.last() {
        Some(RunEvent::Finished {
            outcome: Outcome::Infrastructure,
            error: Some(error),
            ..
        }) => assert_eq!(error.code, "boot_timeout"),
        other => panic!("expected finished/infrastructure, got {other:?}\n{stdout}"),
    }
}

#[test]
fn help_shows_the_request_the_events_and_json_errors() {
    let out = run(&["--help"], "");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "\"control_socket\"",
        "{\"type\":\"finished\"",
        "--json-errors",
        "{\"type\":\"error\",\"version\":1",
        "Exit codes",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// `--request FILE`: the request without its sockets in FILE, contractor-vm's answer as it
/// printed it on stdin.
fn run_with_vm_answer(dir: &std::path::Path, answer: &str) -> Output {
    let mut request: serde_json::Value = serde_json::from_str(&request(dir)).expect("the request");
    let fields = request.as_object_mut().expect("an object");
    fields.remove("control_socket");
    fields.remove("tunnel_socket");
    let file = dir.join("run.json");
    std::fs::write(&file, request.to_string()).expect("write the request file");
    run(
        &["--json-errors", "--request", file.to_str().expect("utf-8")],
        answer,
    )
}

#[test]
fn the_vm_answer_on_stdin_names_the_sockets_the_relay_connects_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("vm-control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&control).expect("bind");
    let answer = serde_json::json!({"type": "vm", "version": 1, "vm": {
        "name": "contractor-0123456789ab", "uri": "test:///default", "state": "running",
        "control_socket": control, "tunnel_socket": dir.path().join("vm-tunnel.sock")}});
    // Accepted on a thread, which reports what it saw (never blocking the test: a relay
    // that does not connect ends its run, and the listener is polled until then).
    let (sent, connected) = std::sync::mpsc::channel();
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        for _ in 0..600 {
            if listener.accept().is_ok() {
                let _ = sent.send(());
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    let out = run_with_vm_answer(dir.path(), &format!("{answer}\n"));
    assert!(
        connected.try_recv().is_ok(),
        "the relay connected to the VM answer's control socket; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: RunEvent =
        serde_json::from_str(stdout.lines().last().expect("events")).expect("an event");
    assert!(
        matches!(last, RunEvent::Finished { .. }),
        "the run started and finished: {stdout}"
    );
}

#[test]
fn a_vm_error_on_stdin_ends_the_run_with_that_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let answer = r#"{"type":"error","version":1,"code":"libvirt_unreachable","chain":["cannot connect to libvirt at qemu:///system","no socket"]}"#;
    let out = run_with_vm_answer(dir.path(), answer);
    assert_eq!(out.status.code(), Some(3));
    let error: ErrorObject =
        serde_json::from_slice(&out.stdout).expect("one error object on stdout");
    assert_eq!(error.code, "libvirt_unreachable");
    assert_eq!(
        error.chain,
        [
            "contractor-vm did not create the VM",
            "cannot connect to libvirt at qemu:///system",
            "no socket"
        ]
    );
}

#[test]
fn a_request_file_with_sockets_or_an_answer_without_them_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("run.json");
    std::fs::write(&file, request(dir.path())).expect("write");
    let out = run(
        &["--json-errors", "--request", file.to_str().expect("utf-8")],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("error object");
    assert_eq!(error.code, "bad_vm_answer");
    assert!(
        error.chain[0].contains("leave `control_socket` out"),
        "{error:?}"
    );

    let answer = r#"{"type":"vm","version":1,"vm":{"name":"contractor-0123456789ab","uri":"test:///default","state":"running"}}"#;
    let out = run_with_vm_answer(dir.path(), answer);
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("error object");
    assert_eq!(error.code, "bad_vm_answer");
    assert!(
        error.chain[0].contains("names no channel sockets for VM contractor-0123456789ab"),
        "{error:?}"
    );
}
