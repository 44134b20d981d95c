//! End-to-end: `contractor rebuild` builds a record's own source again, offline, in a fresh
//! VM, and compares the artifacts bit for bit: examples/hello comes out identical (exit 0),
//! an artifact that embeds the time comes out different (exit 1), and a record whose image
//! has changed since is not rebuilt (exit 2).

mod util;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use contractor_protocol::result::Outcome;
use util::Project;

fn rebuild(project: &Path, args: &[&str]) -> Output {
    Command::new(util::contractor())
        .arg("rebuild")
        .args(args)
        .current_dir(project)
        .output()
        .expect("run contractor rebuild")
}

fn text(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The report's lines on stdout (the build's own output is there too, before them).
fn report(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| {
            ["identical  ", "DIFFERENT  ", "MISSING    "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(String::from)
        .collect()
}

/// The record's `rebuild.json`, from the newest build (the rebuild).
fn rebuild_json(project: &Path) -> serde_json::Value {
    let path = project.join(".contractor/latest/rebuild.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("rebuild.json is JSON")
}

/// Runs `base64 ARGS` on `input`.
fn base64(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("base64")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("base64");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn hello_rebuilds_identical_offline_and_not_from_a_changed_image() {
    if util::skip_without_vm("hello_rebuilds_identical_offline_and_not_from_a_changed_image") {
        return;
    }
    let project = Project::hello();
    let build = project.build();
    assert_eq!(build.result.outcome, Outcome::Success, "{}", build.stderr);
    // The working tree changes after the build: the rebuild builds the record's source.
    std::fs::write(
        project.path().join("hello.c"),
        "int main(void) { return 1; }\n",
    )
    .expect("change the working tree");

    let out = rebuild(project.path(), &[&build.result.id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = report(&out);
    let original = std::fs::read(build.record.join("artifacts/hello")).expect("artifact");
    assert_eq!(lines.len(), 1, "{}", text(&out));
    assert!(
        lines[0].starts_with("identical  hello  sha256 "),
        "{}",
        text(&out)
    );
    let json = rebuild_json(project.path());
    assert_eq!(json["rebuildOf"], build.result.id.as_str());
    assert_eq!(json["identical"], true);
    // Both records are kept; the rebuild's is signed, offline, and names the original.
    let rebuilt = util::latest_result(project.path());
    assert_ne!(rebuilt.id, build.result.id);
    assert!(build.record.join("provenance.json").is_file());
    let again = project
        .path()
        .join(".contractor/builds")
        .join(&rebuilt.id)
        .join("artifacts/hello");
    assert_eq!(std::fs::read(again).expect("rebuilt artifact"), original);
    let statement = contractor_protocol::attest::read_statement(
        &project
            .path()
            .join(".contractor/builds")
            .join(&rebuilt.id)
            .join("provenance.json"),
    )
    .expect("the rebuild's statement");
    let internal = &statement["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["offline"], true);
    assert_eq!(internal["rebuildOf"], build.result.id.as_str());

    // The statement says the build used another image than this host has now: no rebuild
    // (the signature is not what is checked here; `contractor verify` does that).
    let file = build.record.join("provenance.json");
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("envelope");
    let payload = envelope["payload"].as_str().expect("payload").to_string();
    let body = base64(&["-d"], payload.as_bytes());
    let mut st: serde_json::Value = serde_json::from_slice(&body).expect("statement");
    for dep in st["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array_mut()
        .expect("deps")
    {
        if dep["name"] == "image" {
            dep["digest"]["sha256"] = "0".repeat(64).into();
        }
    }
    let encoded = base64(&["-w0"], &serde_json::to_vec(&st).expect("json"));
    envelope["payload"] = String::from_utf8(encoded).expect("ascii").into();
    std::fs::write(&file, envelope.to_string()).expect("write");
    let refused = rebuild(project.path(), &[&build.result.id]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        stderr.contains("has changed since") && stderr.contains("--any-image"),
        "{stderr}"
    );
}

#[test]
fn an_artifact_that_embeds_the_time_is_named_different() {
    if util::skip_without_vm("an_artifact_that_embeds_the_time_is_named_different") {
        return;
    }
    let project = Project::new(&util::small_spec(
        "date +%s%N > stamp\necho same > steady",
        "artifacts = [\"stamp\", \"steady\"]",
    ));
    let build = project.build();
    assert_eq!(build.result.outcome, Outcome::Success, "{}", build.stderr);
    let out = rebuild(project.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let lines = report(&out);
    assert_eq!(lines.len(), 2, "{}", text(&out));
    assert!(
        lines[0].starts_with("DIFFERENT  stamp  original sha256 ")
            && lines[0].contains(", rebuild sha256 "),
        "{}",
        text(&out)
    );
    assert!(
        lines[1].starts_with("identical  steady  sha256 "),
        "{}",
        text(&out)
    );
    let json = rebuild_json(project.path());
    assert_eq!(json["identical"], false);
    assert_eq!(json["artifacts"][0]["verdict"], "different");
}
