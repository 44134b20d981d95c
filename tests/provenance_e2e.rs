//! End-to-end: a real build's record carries signed provenance that tools we did not write
//! can check (Python's `cryptography`), and `contractor verify` refuses it once an artifact
//! is changed.

mod util;

use std::process::Command;

use contractor_protocol::result::Outcome;
use util::Project;

/// Checks the envelope with the PEM `contractor key` printed, independently of our code:
/// the ed25519 signature over DSSE's PAE, then that every download of the record's
/// downloads.jsonl is a resolved dependency with its sha256 and that every file under the
/// record's artifacts/ is a subject with its sha256. Prints the counts.
const INDEPENDENT_CHECK: &str = r#"
import base64, hashlib, json, os, sys
from cryptography.hazmat.primitives.serialization import load_pem_public_key
pem, record = sys.argv[1], sys.argv[2]
key = load_pem_public_key(open(pem, "rb").read())
env = json.load(open(os.path.join(record, "provenance.json")))
body = base64.b64decode(env["payload"])
t = env["payloadType"].encode()
assert t == b"application/vnd.in-toto+json"
key.verify(base64.b64decode(env["signatures"][0]["sig"]), b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body))
st = json.loads(body)
assert st["_type"] == "https://in-toto.io/Statement/v1", st["_type"]
assert st["predicateType"] == "https://slsa.dev/provenance/v1", st["predicateType"]
deps = {(d.get("uri"), d.get("digest", {}).get("sha256")) for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
downloads = [json.loads(l) for l in open(os.path.join(record, "downloads.jsonl")) if l.strip()]
downloads = [d for d in downloads if d.get("type") == "download"]
for d in downloads:
    assert (d["url"], d["sha256"]) in deps, ("not a resolved dependency", d["url"])
subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
files = 0
root = os.path.join(record, "artifacts")
for dirpath, _, names in os.walk(root):
    for name in names:
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        assert subjects.get(rel) == hashlib.sha256(open(path, "rb").read()).hexdigest(), ("subject", rel)
        files += 1
assert files == len(subjects), (files, subjects)
print(f"{len(downloads)} downloads, {files} artifacts")
"#;

#[test]
fn the_rust_crate_examples_signed_provenance_checks_out_independently() {
    if util::skip_without_vm("the_rust_crate_examples_signed_provenance_checks_out_independently") {
        return;
    }
    let has_python = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    let project = Project::example(
        "rust-crate",
        &["Cargo.toml", "Cargo.lock", "src/lib.rs", "src/main.rs"],
    );
    let build = project.build();
    assert_eq!(
        build.result.outcome,
        Outcome::Success,
        "stderr:\n{}\nlog:\n{}",
        build.stderr,
        build.log()
    );
    let contractor = |args: &[&str]| {
        Command::new(util::contractor())
            .args(args)
            .current_dir(project.path())
            .output()
            .expect("run contractor")
    };
    let verified = contractor(&["verify", &build.result.id]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    if has_python {
        let pem = project.path().join("contractor.pub");
        std::fs::write(&pem, contractor(&["key"]).stdout).expect("write the public key");
        let checked = Command::new("python3")
            .args(["-c", INDEPENDENT_CHECK])
            .arg(&pem)
            .arg(&build.record)
            .output()
            .expect("python3");
        let stdout = String::from_utf8_lossy(&checked.stdout);
        assert!(
            checked.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&checked.stderr)
        );
        // cargo's index and the crate, through inspection: at least the crate itself.
        assert!(
            !stdout.starts_with("0 downloads") && stdout.ends_with(", 1 artifacts\n"),
            "{stdout}"
        );
    } else {
        eprintln!(
            "SKIPPED the independent check: python3 with the cryptography package is missing \
             (apt-get install python3-cryptography; scripts/setup installs it)"
        );
    }

    let artifact = build.record.join("artifacts/target/release/digits");
    std::fs::write(&artifact, b"not what was built").expect("tamper");
    let refused = contractor(&["verify", &build.result.id]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("artifact \"target/release/digits\" differs"),
        "{stderr}"
    );
}
