//! `contractor key` and `contractor verify` as a user runs them, on a fixture record signed
//! with the key `contractor key` made; and the same envelope checked by an independent
//! implementation (Python's `cryptography`, Debian's python3-cryptography).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use contractor_attest::fixture::{write_fixture, FIXTURE_SPEC};
use contractor_cli::provenance;

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    project: PathBuf,
    record: PathBuf,
}

const ID: &str = "20261125-141502-3fa2c1";

fn contractor(fixture: &Fixture, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contractor"))
        .args(args)
        .current_dir(&fixture.project)
        .env("CONTRACTOR_DATA_DIR", &fixture.data)
        .env_remove(provenance::KEY_VARIABLE)
        .output()
        .expect("run contractor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A record signed with the key `contractor key` made in a fresh data directory.
fn signed_record() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("project");
    let record = project.join(".contractor/builds").join(ID);
    write_fixture(&record, &project).expect("fixture");
    std::fs::write(project.join("contractor.toml"), FIXTURE_SPEC).expect("spec");
    let fixture = Fixture {
        data: dir.path().join("data"),
        project,
        record,
        _dir: dir,
    };
    let out = contractor(&fixture, &["key"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let key =
        contractor_attest::key::load_or_create_key(&fixture.data.join(provenance::KEY_FILE), false)
            .expect("the key contractor key made");
    let spec = contractor_cli::spec::parse(&fixture.project.join("contractor.toml"), FIXTURE_SPEC)
        .expect("spec");
    let result: contractor_protocol::result::BuildResult = serde_json::from_slice(
        &std::fs::read(fixture.record.join("result.json")).expect("the fixture's result"),
    )
    .expect("result");
    let request = provenance::sign_request(
        &fixture.record,
        &spec,
        &result,
        std::time::SystemTime::now(),
    )
    .expect("the request");
    let request = contractor_protocol::attest::SignRequest {
        cache_restored: Some(false),
        ..request
    };
    let statement = contractor_attest::statement::statement(&request).expect("statement");
    let envelope = contractor_attest::dsse::envelope(&statement, &key);
    std::fs::write(
        fixture.record.join(provenance::PROVENANCE_FILE),
        serde_json::to_string_pretty(&envelope).expect("json"),
    )
    .expect("write");
    fixture
}

fn provenance_file(fixture: &Fixture) -> String {
    fixture
        .record
        .join(provenance::PROVENANCE_FILE)
        .display()
        .to_string()
}

#[test]
fn a_signed_record_verifies_by_id_newest_and_file() {
    let fixture = signed_record();
    let file = provenance_file(&fixture);
    for args in [vec!["verify"], vec!["verify", ID], vec!["verify", &file]] {
        let out = contractor(&fixture, &args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("2 artifact(s) and 2 download(s) as stated"),
            "{}",
            text(&out.stdout)
        );
    }
    // The key is the user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(fixture.data.join("signing-key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_tampered_artifact_does_not_verify_and_is_named() {
    let fixture = signed_record();
    std::fs::write(fixture.record.join("artifacts/hello"), b"trojan\n").expect("tamper");
    let out = contractor(&fixture, &["verify", ID]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("artifact \"hello\" differs"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_tampered_statement_or_another_key_does_not_verify() {
    let fixture = signed_record();
    let path = fixture.record.join(provenance::PROVENANCE_FILE);
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    let b64 = base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let payload = b64
        .decode(envelope["payload"].as_str().expect("payload"))
        .expect("base64");
    let mut statement: serde_json::Value = serde_json::from_slice(&payload).expect("statement");
    statement["subject"][0]["digest"]["sha256"] = "0".repeat(64).into();
    envelope["payload"] = b64
        .encode(serde_json::to_vec(&statement).expect("json"))
        .into();
    std::fs::write(&path, envelope.to_string()).expect("write");
    let out = contractor(&fixture, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("signature does not verify"),
        "{}",
        text(&out.stderr)
    );

    let fixture = signed_record();
    let other = fixture.project.join("other.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_contractor"))
        .arg("key")
        .env("CONTRACTOR_DATA_DIR", fixture.project.join("other-data"))
        .output()
        .expect("key");
    std::fs::write(&other, &out.stdout).expect("pem");
    let out = contractor(&fixture, &["verify", "--key", "other.pem"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

#[test]
fn bad_input_is_exit_2_naming_the_file_or_field() {
    let fixture = signed_record();
    let cases: [(&str, &[u8], &str); 3] = [
        ("garbage.json", b"not json", "not JSON"),
        (
            "notype.json",
            br#"{"payload":"","signatures":[]}"#,
            "`payloadType`",
        ),
        (
            "nosig.json",
            br#"{"payloadType":"application/vnd.in-toto+json","payload":"e30=","signatures":[]}"#,
            "`signatures`",
        ),
    ];
    for (name, bytes, field) in cases {
        let path = fixture.project.join(name);
        std::fs::write(&path, bytes).expect("write");
        let out = contractor(&fixture, &["verify", &path.display().to_string()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(name) && stderr.contains(field), "{stderr}");
    }
    let out = contractor(&fixture, &["verify", "./missing.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = contractor(&fixture, &["verify", "--key", "contractor.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("contractor.toml is not an ed25519 public key"));
}

/// The envelope checked by code we did not write: Python's `cryptography` verifies the
/// ed25519 signature over DSSE's PAE with the PEM `contractor key` prints.
#[test]
fn python_cryptography_verifies_the_envelope_independently() {
    let have = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        // To the stderr handle: libtest captures eprintln!.
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!(
            "SKIPPED: python3 with the cryptography package is missing (apt-get install python3-cryptography; scripts/setup installs it)\n"
        ));
        return;
    }
    let fixture = signed_record();
    let pem = contractor(&fixture, &["key"]).stdout;
    let pem_file = fixture.project.join("contractor.pub");
    std::fs::write(&pem_file, pem).expect("pem");
    let check = r#"
import base64, json, sys
from cryptography.hazmat.primitives.serialization import load_pem_public_key
key = load_pem_public_key(open(sys.argv[1], "rb").read())
env = json.load(open(sys.argv[2]))
body = base64.b64decode(env["payload"])
t = env["payloadType"].encode()
pae = b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)
key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae)
st = json.loads(body)
assert st["_type"] == "https://in-toto.io/Statement/v1"
assert st["predicateType"] == "https://slsa.dev/provenance/v1"
print(len(st["subject"]), "subjects verified")
"#;
    let run = |file: &Path| {
        Command::new("python3")
            .args(["-c", check])
            .arg(&pem_file)
            .arg(file)
            .output()
            .expect("python3")
    };
    let file = fixture.record.join(provenance::PROVENANCE_FILE);
    let out = run(&file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "2 subjects verified\n");

    // And it refuses a changed payload, so the check above can fail.
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    envelope["payload"] = "e30=".into();
    std::fs::write(&file, envelope.to_string()).expect("write");
    let out = run(&file);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("InvalidSignature"),
        "{}",
        text(&out.stderr)
    );
}

/// The signing key is opened only by contractor-attest, never by the front end: `contractor
/// key` and `contractor verify` run under `strace -f`, and every open of the key file is
/// made by a process that executed contractor-attest.
#[test]
fn the_front_end_never_opens_the_signing_key() {
    let have = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        // To the stderr handle: libtest captures eprintln!.
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!(
                "SKIPPED: strace is missing (apt-get install strace; scripts/setup installs it)\n"
            ),
        );
        return;
    }
    let fixture = signed_record();
    let key_file = fixture.data.join(provenance::KEY_FILE);
    for args in [&["key"][..], &["verify"][..]] {
        let trace = fixture.project.join("trace");
        let out = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=execve,open,openat,openat2", "-o"])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_contractor"))
            .args(args)
            .current_dir(&fixture.project)
            .env("CONTRACTOR_DATA_DIR", &fixture.data)
            .env_remove(provenance::KEY_VARIABLE)
            .output()
            .expect("strace");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let lines = std::fs::read_to_string(&trace).expect("trace");
        // `PID execve("/path/to/contractor-attest", ...) = 0`: the pids that are the tool.
        // Under load strace splits the call (`<unfinished ...>`, then `<... execve resumed>
        // ... = 0`): a line naming the tool that did not fail is enough.
        let attest: Vec<&str> = lines
            .lines()
            .filter(|l| {
                l.contains("execve(\"") && l.contains("contractor-attest\"") && !l.contains("= -1")
            })
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let opens: Vec<&str> = lines
            .lines()
            .filter(|l| l.contains("open") && l.contains(&*key_file.to_string_lossy()))
            .collect();
        assert!(
            !opens.is_empty(),
            "{args:?}: nobody opened the key:\n{lines}"
        );
        for open in opens {
            let pid = open.split_whitespace().next().unwrap_or_default();
            assert!(
                attest.contains(&pid),
                "{args:?}: the key was opened by pid {pid}, not by contractor-attest {attest:?}: {open}"
            );
        }
        assert!(
            !attest.is_empty(),
            "{args:?}: contractor-attest never ran:\n{lines}"
        );
    }
}

/// A record whose `artifacts` is a link out of the record does not verify: the checker
/// reads only the record (Landlock), so what the link points to is never read and the
/// stated artifacts are missing.
#[test]
fn artifacts_linked_out_of_the_record_are_not_read() {
    let fixture = signed_record();
    let outside = fixture.project.join("outside");
    std::fs::rename(fixture.record.join("artifacts"), &outside).expect("move");
    std::os::unix::fs::symlink(&outside, fixture.record.join("artifacts")).expect("link");
    let out = contractor(&fixture, &["verify", ID]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Named once: the checker's own stderr is not shown again beside the front end's report.
    assert_eq!(
        stderr
            .matches("artifact \"hello\" is missing from the record")
            .count(),
        1,
        "{stderr}"
    );
}

/// `contractor rebuild`'s first step, as the front end asks it of the real
/// `contractor-attest`: a record signed from the front end's own facts plans with no
/// difference; a changed spec is refused by the tool, in the words `contractor rebuild`
/// says.
#[test]
fn a_rebuild_plan_of_a_record_signed_here_finds_what_changed() {
    let fixture = signed_record();
    let bin = Path::new(env!("CARGO_BIN_EXE_contractor"))
        .parent()
        .expect("the tools' directory");
    // The tools are the ones beside `contractor` (this test process is not).
    std::env::set_var("CONTRACTOR_BIN", bin);
    let file = fixture.project.join("contractor.toml");
    let parse = |text: &str| contractor_cli::spec::parse(&file, text).expect("spec");
    let spec = parse(FIXTURE_SPEC);
    let plan = |spec: &contractor_cli::spec::BuildSpec| {
        contractor_cli::rebuild::plan(&fixture.record, &file, spec, &[], false)
    };
    let planned = plan(&spec).expect("plan");
    // The statement names no image digest here (signed without a manifest): nothing to weigh.
    assert!(planned.image_differences.is_empty());
    assert_eq!(
        contractor_cli::rebuild::pins(&planned.downloads)
            .downloads
            .len(),
        2
    );
    assert!(planned.warnings.is_empty() && planned.cache_warning.is_none());

    let changed =
        FIXTURE_SPEC.replace("script = \"make\"", "script = \"make all\"") + "\n[vm]\ncpus = 1\n";
    let err = plan(&parse(&changed)).expect_err("a changed spec");
    assert!(err.is_bad_input(), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not what build {ID} was built with: 2 differ (externalParameters.script, \
             vm.cpus); restore it (e.g. `git checkout` the commit of that build) to rebuild",
            file.display()
        )
    );

    // No statement: bad input, named as `contractor rebuild` says it.
    std::fs::remove_file(fixture.record.join(provenance::PROVENANCE_FILE)).expect("rm");
    let err = plan(&spec).expect_err("none");
    assert!(err.is_bad_input(), "{err}");
    assert!(
        err.to_string()
            .contains("a rebuild needs the record's signed statement"),
        "{err}"
    );
}

/// `contractor rebuild` of a record whose spec has changed since: refused before anything
/// runs, exit 2, the file and the fields named (no VM needed to get there).
#[test]
fn contractor_rebuild_refuses_a_changed_spec_with_exit_2() {
    let fixture = signed_record();
    let file = fixture.project.join("contractor.toml");
    let changed = FIXTURE_SPEC.replace("script = \"make\"", "script = \"make all\"");
    std::fs::write(&file, changed).expect("spec");
    let out = contractor(&fixture, &["rebuild", ID]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The file as the user named it (the default, in the project directory).
    assert_eq!(
        text(&out.stderr),
        format!(
            "contractor: contractor.toml is not what build {ID} was built with: 1 differ \
             (externalParameters.script); restore it (e.g. `git checkout` the commit of that \
             build) to rebuild\n"
        )
    );
}

/// `contractor rebuild` of a record without its `source.tar`: `contractor-store record
/// source` refuses it, exit 2, the file named, and no copy is left in the store.
#[test]
fn contractor_rebuild_of_a_record_without_its_source_is_exit_2() {
    let fixture = signed_record();
    let tar = fixture.record.join("source.tar");
    std::fs::remove_file(&tar).expect("rm");
    let out = contractor(&fixture, &["rebuild", ID]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // Said once, the record's directory as the store names it.
    assert_eq!(
        text(&out.stderr),
        format!(
            "contractor: cannot read ./.contractor/builds/{ID}/source.tar: a rebuild builds \
             the record's own packed source: No such file or directory (os error 2)\n"
        )
    );
    let store = fixture.project.join(".contractor");
    let left: Vec<_> = std::fs::read_dir(&store)
        .expect("store")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".rebuild-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
