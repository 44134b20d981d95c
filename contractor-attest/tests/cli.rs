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
        AttestAnswer::Verdict(verified) => {
            assert!(verified.problems.is_empty(), "{:?}", verified.problems);
            let checked = (verified.artifacts, verified.downloads, verified.key_id);
            assert_eq!(checked, (2, 2, key_id));
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(request.record.join("artifacts/hello"), b"trojan\n").expect("tamper");
    let out = attest(&verify, &[]);
    assert_eq!(out.status.code(), Some(1));
    let AttestAnswer::Verdict(verified) = answer(&out) else {
        panic!("no verdict");
    };
    let problems = verified.problems;
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

#[test]
fn a_build_whose_script_did_not_run_is_not_signed_and_no_key_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = contractor_protocol::attest::SignRequest {
        outcome: contractor_protocol::result::Outcome::Infrastructure,
        exit_code: None,
        ..fixture(dir.path())
    };
    let sign =
        serde_json::to_string(&AttestRequest::Sign(Box::new(request.clone()))).expect("json");
    let out = attest(&sign, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        matches!(answer(&out), AttestAnswer::NotSigned { reason, .. } if reason == "build 20261125-141502-3fa2c1 did not run its script"),
        "{}",
        text(&out.stdout)
    );
    assert!(!request.record.join("provenance.json").exists());
    assert!(!request.key.exists());
}

/// Signs the fixture's record (whose statement `plan` and `compare` read) and returns the
/// sign request.
fn signed_fixture(dir: &Path) -> contractor_protocol::attest::SignRequest {
    let request = fixture(dir);
    let sign =
        serde_json::to_string(&AttestRequest::Sign(Box::new(request.clone()))).expect("json");
    let out = attest(&sign, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    request
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `plan` request for the fixture as its spec stands, `images` on this host.
fn plan_request(
    request: &contractor_protocol::attest::SignRequest,
    images: serde_json::Value,
) -> serde_json::Value {
    json!({"type": "plan", "version": 1, "record": request.record,
        "external_parameters": request.external_parameters, "cpus": request.cpus,
        "memory_mib": request.memory_mib, "disk_gib": request.disk_gib,
        "cache_paths": [], "images": images, "spec": "/p/contractor.toml"})
}

/// The error object of a request refused as bad input (exit 2), with its chain joined.
fn refused(out: &Output) -> (String, String) {
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let error: contractor_protocol::error::ErrorObject =
        serde_json::from_slice(&out.stdout).expect("error object");
    (error.code.as_str().to_string(), error.chain.join(": "))
}

#[test]
fn plan_reads_the_statement_confined_and_names_what_differs_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = signed_fixture(dir.path());
    let image = serde_json::to_value(request.image.as_ref().expect("image")).expect("json");
    let out = attest(&plan_request(&request, json!([image])).to_string(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let AttestAnswer::Plan(plan) = answer(&out) else {
        panic!("no plan");
    };
    let urls: Vec<(&str, bool)> = plan
        .downloads
        .iter()
        .map(|d| (d.url.as_str(), d.complete_get_200))
        .collect();
    assert_eq!(
        urls,
        [
            ("https://deb.debian.org/a.deb", true),
            ("https://static.crates.io/crates/x/x-1.0.crate", true)
        ]
    );
    assert!(plan.image_differences.is_empty() && plan.warnings.is_empty());
    assert!(plan.incomplete_downloads.is_empty() && plan.cache_warning.is_none());
    assert!(plan.confinement.enforced && plan.confinement.seccomp);

    // The spec's script and the VM's shape changed: refused, naming the file and fields.
    let mut changed = plan_request(&request, json!([image]));
    changed["external_parameters"]["script"] = json!("make all");
    changed["cpus"] = json!(1);
    changed["any_image"] = json!(true);
    let (code, said) = refused(&attest(&changed.to_string(), &[]));
    assert_eq!(code, "spec_changed");
    assert_eq!(
        said,
        "/p/contractor.toml is not what build b1 was built with: 2 differ \
         (externalParameters.script, vm.cpus); restore it (e.g. `git checkout` the commit \
         of that build) to rebuild"
    );

    // The image was rebuilt since: refused, unless the request says `any_image`.
    let mut other = image.clone();
    other["disk_sha256"] = json!("e".repeat(64));
    let mut rebuilt = plan_request(&request, json!([other]));
    let (code, said) = refused(&attest(&rebuilt.to_string(), &[]));
    assert_eq!(code, "image_changed");
    assert!(
        said.contains(&format!("was {}", "d".repeat(64)))
            && said.contains(&format!("it is {} now (built 2026-11-25 ", "e".repeat(64)))
            && said.ends_with("; `contractor rebuild --any-image` rebuilds with the current image (and says which inputs differ)"),
        "{said}"
    );
    rebuilt["any_image"] = json!(true);
    let AttestAnswer::Plan(plan) = answer(&attest(&rebuilt.to_string(), &[])) else {
        panic!("no plan");
    };
    assert!(plan.image_differences[0].contains("has changed since"));
    // The image is gone from this host.
    let (code, said) = refused(&attest(&plan_request(&request, json!([])).to_string(), &[]));
    assert_eq!(code, "image_changed");
    assert!(said.contains("is gone from this host"), "{said}");
}

/// The warnings are worded by the tool: a statement whose downloads are incomplete, and
/// one whose build restored a build cache.
#[test]
fn plan_words_the_warnings_of_inputs_a_rebuild_may_lack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut request = fixture(dir.path());
    request.cache_restored = Some(true);
    request.cache_paths = vec!["/build/target".into()];
    request.image = None;
    // Traffic not inspected: the statement says its list of downloads is not complete.
    request.inspect = false;
    let sign =
        serde_json::to_string(&AttestRequest::Sign(Box::new(request.clone()))).expect("json");
    assert_eq!(attest(&sign, &[]).status.code(), Some(0));
    let AttestAnswer::Plan(plan) =
        answer(&attest(&plan_request(&request, json!([])).to_string(), &[]))
    else {
        panic!("no plan");
    };
    assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    assert!(
        plan.warnings[0].starts_with("build b1 did not record every download (")
            && plan.warnings[0].ends_with("): what it did not record cannot be served offline"),
        "{}",
        plan.warnings[0]
    );
    assert_eq!(plan.warnings[1], plan.cache_warning.clone().expect("cache"));
    assert!(plan.warnings[1].starts_with("the original restored the build cache"));
}

#[test]
fn compare_writes_rebuild_json_and_names_each_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = signed_fixture(dir.path());
    let again = request.record.with_file_name("b2");
    std::fs::create_dir_all(again.join("artifacts/sub")).expect("mkdir");
    std::fs::copy(
        request.record.join("artifacts/hello"),
        again.join("artifacts/hello"),
    )
    .expect("copy");
    std::fs::write(again.join("artifacts/sub/notes.txt"), b"other\n").expect("write");
    let compare = json!({"type": "compare", "version": 1, "original": request.record,
        "rebuild": again, "inputs_differ": ["image: known"], "cache_warning": "no cache"})
    .to_string();
    // The rebuild's record has no result.json yet: nothing to say how it ended.
    let out = attest(&compare, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The rebuild succeeded where the original failed; it was refused a host offline.
    let mut result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(request.record.join("result.json")).expect("result"))
            .expect("json");
    result["id"] = json!("b2");
    result["outcome"] = json!("success");
    result["duration_secs"] = json!(4.25);
    std::fs::write(again.join("result.json"), result.to_string()).expect("write");
    let out = attest(&compare, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let AttestAnswer::Comparison(compared) = answer(&out) else {
        panic!("no comparison");
    };
    let contractor_protocol::attest::RebuildComparison {
        artifacts,
        identical,
        inputs_differ,
        same_end,
        summary,
        path,
        confinement,
        ..
    } = *compared;
    assert!(!same_end);
    assert_eq!(
        summary,
        [
            "rebuild b2 of build b1: 1 of 2 artifact(s) identical; the rebuild succeeded in 4.2s",
            "  the original ended failed, the rebuild success: `contractor log b2` says why",
            "  no cache",
            "  refused offline: evil.example (not in the record's downloads, or not in the download cache any more)",
            "  input differs: image: known",
        ]
    );
    let verdicts: Vec<(&str, contractor_protocol::attest::Verdict)> = artifacts
        .iter()
        .map(|r| (r.path.as_str(), r.verdict))
        .collect();
    use contractor_protocol::attest::Verdict;
    assert_eq!(
        verdicts,
        [
            ("hello", Verdict::Identical),
            ("sub/notes.txt", Verdict::Different)
        ]
    );
    assert!(!identical && confinement.enforced);
    // The rebuild has no statement: only the inputs already known.
    assert_eq!(inputs_differ, ["image: known"]);
    assert_eq!(path, again.join("rebuild.json"));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("rebuild.json")).expect("json");
    assert_eq!(written["rebuildOf"], "b1");
    assert_eq!(written["identical"], false);
    assert_eq!(written["artifacts"][1]["verdict"], "different");

    // A link planted as rebuild.json is refused, never written through.
    std::fs::remove_file(&path).expect("rm");
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &path).expect("link");
    let out = attest(&compare, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(!target.exists());
}

#[test]
fn bad_plan_and_compare_requests_name_the_field_or_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let request = fixture(dir.path());
    let mut no_cpus = plan_request(&request, json!([]));
    no_cpus.as_object_mut().expect("object").remove("cpus");
    let mut typo = plan_request(&request, json!([]));
    typo["cache_path"] = json!([]);
    for (request, code, said) in [
        (no_cpus.to_string(), "bad_json", "missing field `cpus`"),
        (
            {
                let mut bad = plan_request(&request, json!([]));
                bad["images"] = json!([{"name": 1}]);
                bad.to_string()
            },
            "bad_json",
            "in `images[0].name`",
        ),
        (typo.to_string(), "bad_json", "unknown field `cache_path`"),
        (
            json!({"type": "compare", "version": 1, "original": "/o", "rebuild": "/r"}).to_string(),
            "bad_json",
            "missing field `inputs_differ`",
        ),
        (
            json!({"type": "compare", "version": 1, "original": "/o", "rebuild": "/r",
                "inputs_differ": "x"})
            .to_string(),
            "bad_json",
            "in `inputs_differ`: invalid type: string",
        ),
        // The fixture is not signed: there is no statement to plan from.
        (
            plan_request(&request, json!([])).to_string(),
            "attest",
            "a rebuild needs the record's signed statement",
        ),
    ] {
        let out = attest(&request, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{request}: {}",
            text(&out.stderr)
        );
        let error: contractor_protocol::error::ErrorObject =
            serde_json::from_slice(&out.stdout).expect("error object");
        assert_eq!(error.code.as_str(), code, "{request}");
        assert!(error.chain.join(": ").contains(said), "{:?}", error.chain);
    }
}
