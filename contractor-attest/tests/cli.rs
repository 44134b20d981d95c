//! `contractor-attest` as a pipeline runs it: one request on stdin, one answer on stdout,
//! the documented exit codes, and a process confined to the record it reads.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use contractor_attest::fixture::{fixture_request, write_fixture};
use contractor_protocol::attest::{AttestAnswer, AttestRequest};
use serde_json::json;

fn attest(request: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-attest"))
        .arg("--json-errors")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

fn answer(out: &Output) -> AttestAnswer {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn fixture(dir: &Path) -> contractor_protocol::attest::SignRequest {
    let project = dir.join("project");
    let record = project.join(".contractor/builds/b1");
    write_fixture(&record, &project).expect("fixture");
    fixture_request(&record, &project, &dir.join("data/signing-key"))
}

#[test]
fn signs_then_verifies_confined_and_names_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = fixture(dir.path());
    let sign =
        serde_json::to_string(&AttestRequest::Sign(Box::new(request.clone()))).expect("json");
    let out = attest(&sign, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let AttestAnswer::Signed {
        path,
        key_id,
        confinement,
        ..
    } = answer(&out)
    else {
        panic!("not signed");
    };
    assert_eq!(path, request.record.join("provenance.json"));
    assert!(confinement.enforced && confinement.no_new_privs && confinement.seccomp);
    let verify =
        json!({"type": "verify", "version": 1, "envelope": path, "key": request.key}).to_string();
    let out = attest(&verify, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match answer(&out) {
        AttestAnswer::Verdict {
            problems,
            artifacts,
            downloads,
            key_id: checked,
            ..
        } => {
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!((artifacts, downloads, checked), (2, 2, key_id));
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(request.record.join("artifacts/hello"), b"trojan\n").expect("tamper");
    let out = attest(&verify, &[]);
    assert_eq!(out.status.code(), Some(1));
    let AttestAnswer::Verdict { problems, .. } = answer(&out) else {
        panic!("no verdict");
    };
    assert!(
        problems[0].contains("artifact \"hello\" differs"),
        "{problems:?}"
    );
}

#[test]
fn a_link_out_of_the_record_is_read_only_when_unconfined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = fixture(dir.path());
    let outside = dir.path().join("outside");
    std::fs::rename(request.record.join("artifacts"), &outside).expect("move");
    std::os::unix::fs::symlink(&outside, request.record.join("artifacts")).expect("link");
    let digests = json!({"type": "digests", "version": 1, "record": request.record}).to_string();
    let listed = |extra: &[&str]| match answer(&attest(&digests, extra)) {
        AttestAnswer::Digests { artifacts, .. } => artifacts.len(),
        other => panic!("{other:?}"),
    };
    // Landlock is what keeps it out: without confinement the link is followed.
    assert_eq!(listed(&["--no-confine"]), 2);
    assert_eq!(listed(&[]), 0);
}

#[test]
fn bad_requests_and_keys_are_exit_2_with_an_error_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").expect("write");
    for (request, code, said) in [
        (
            "{\"type\":\"key\",\"version\":1}".to_string(),
            "bad_json",
            "missing field `key`",
        ),
        (
            "{\"type\":\"sing\"}".to_string(),
            "bad_json",
            "unknown variant",
        ),
        (
            json!({"type": "key", "version": 1, "key": garbage, "create": false}).to_string(),
            "bad_key",
            "garbage.pem is not an ed25519 private key",
        ),
        (
            json!({"type": "key", "version": 1, "key": dir.path().join("none"), "create": false})
                .to_string(),
            "attest",
            "cannot read",
        ),
    ] {
        let out = attest(&request, &[]);
        assert_eq!(out.status.code(), Some(2), "{request}");
        let error: contractor_protocol::error::ErrorObject =
            serde_json::from_slice(&out.stdout).expect("error object");
        assert_eq!(error.code.as_str(), code, "{request}");
        assert!(error.chain.join(": ").contains(said), "{:?}", error.chain);
    }
    let out = attest(
        &json!({"type": "key", "version": 1, "key": dir.path().join("made"), "create": true})
            .to_string(),
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        matches!(answer(&out), AttestAnswer::PublicKey { pem, .. } if pem.starts_with("-----BEGIN PUBLIC KEY-----\n"))
    );
}
