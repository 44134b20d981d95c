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
