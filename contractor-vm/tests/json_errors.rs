//! `--json-errors` and bad requests, against the real binary: a failure is also written on
//! stdout as one error object, bad JSON names its line, column and field (exit 2), and a
//! libvirt that cannot be reached is exit 3. None of these needs a running libvirt.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// The error object of `--json-errors`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorObject {
    r#type: String,
    version: u32,
    code: String,
    chain: Vec<String>,
}

const UNREACHABLE: &str = "qemu+unix:///system?socket=/nonexistent/contractor-test.sock";

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args(args)
        .env_remove("CONTRACTOR_LIBVIRT_URI")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn contractor-vm");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for contractor-vm")
}

/// The one error object on stdout.
fn error_object(out: &Output) -> ErrorObject {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout}");
    let error: ErrorObject = serde_json::from_str(&stdout).expect("an error object");
    assert_eq!((error.r#type.as_str(), error.version), ("error", 1));
    assert!(!error.chain.is_empty());
    error
}

#[test]
fn status_with_unreachable_libvirt_is_exit_3_and_an_error_object() {
    let out = run(
        &[
            "status",
            "--uri",
            UNREACHABLE,
            "--name",
            "contractor-x",
            "--json-errors",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(3));
    let error = error_object(&out);
    assert_eq!(error.code, "libvirt_unreachable");
    assert!(error.chain[0].contains(UNREACHABLE), "{error:?}");
    assert!(
        error
            .chain
            .iter()
            .skip(1)
            .any(|c| c.contains("/nonexistent/contractor-test.sock")),
        "libvirt's own message is in the chain: {error:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("contractor-vm: cannot connect"),
        "{stderr}"
    );
}

#[test]
fn without_json_errors_stdout_stays_empty() {
    let out = run(&["list", "--uri", UNREACHABLE], "");
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_json_is_exit_2_naming_line_column_and_field() {
    let request = "{\"type\": \"create\", \"version\": 1, \"uri\": \"test:///default\",\n \
                   \"spec\": {\"image\": {\"disk\": \"/d\", \"kernel\": \"/k\", \"cmdline\": \"\"},\n  \
                   \"cpus\": \"two\", \"memory_mib\": 512,\n  \
                   \"console_log\": \"/w/c.log\", \"work_dir\": \"/w\"}}";
    let out = run(&["create", "--json", "--json-errors"], request);
    assert_eq!(out.status.code(), Some(2));
    let error = error_object(&out);
    assert_eq!(error.code, "bad_json");
    let expected = "at line 3, column 15, in `spec.cpus`: invalid type: string \"two\"";
    assert!(error.chain[0].contains(expected), "{error:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(expected), "{stderr}");

    // The same through --hold, which reads only the first object and keeps stdin open.
    let out = run(&["create", "--json", "--hold"], request);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(expected),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(
        &["list", "--json", "--json-errors"],
        "{\"type\": \"list\",\n oops}",
    );
    assert_eq!(out.status.code(), Some(2));
    let error = error_object(&out);
    assert!(error.chain[0].contains("at line 2, column 2"), "{error:?}");
}

#[test]
fn other_bad_input_is_exit_2_with_its_code() {
    let out = run(&["status", "--json", "--json-errors"], "");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(error_object(&out).code, "no_request");

    let list = r#"{"type":"list","version":1,"uri":"test:///default"}"#;
    let out = run(&["status", "--json", "--json-errors"], list);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(error_object(&out).code, "wrong_request_type");

    let out = run(&["status", "--bogus", "--json-errors"], "");
    assert_eq!(out.status.code(), Some(2));
    let error = error_object(&out);
    assert_eq!(error.code, "usage");
    assert!(error.chain[0].contains("--bogus"), "{error:?}");

    let out = run(
        &[
            "status",
            "--uri",
            "test:///default",
            "--name",
            "contractor-none",
            "--json-errors",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(error_object(&out).code, "not_found");
}

#[test]
fn explicit_kvm_where_libvirt_offers_none_is_refused_with_the_reason_and_its_code() {
    // libvirt's test driver answers capabilities with no vmx/svm and no kvm domain type:
    // KVM is refused before anything is made, naming the URI and what works instead.
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = work.path().join("vms");
    let work_dir = work_dir.to_str().expect("utf-8");
    let out = run(
        &[
            "create",
            "--uri",
            "test:///default",
            "--disk",
            "/nonexistent/base.qcow2",
            "--kernel",
            "/nonexistent/vmlinuz",
            "--work-dir",
            work_dir,
            "--accel",
            "kvm",
            "--json-errors",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let error = error_object(&out);
    assert_eq!(error.code, "kvm_unusable", "{error:?}");
    let said = &error.chain[0];
    assert!(
        said.starts_with(
            "cannot use KVM: the CPU of libvirt's host at test:///default has no vmx or svm flag"
        ) && said.contains("--accel tcg"),
        "{error:?}"
    );
    assert!(
        !work.path().join("vms").exists(),
        "nothing is made for a refused VM"
    );
}

#[test]
fn help_shows_json_in_and_out_and_json_errors() {
    let out = run(&["--help"], "");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "\"type\": \"create\"",
        "{\"type\":\"vm\",\"version\":1",
        "--json-errors",
        "{\"type\":\"error\",\"version\":1",
        "Exit codes",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}
