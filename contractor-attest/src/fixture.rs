//! A record to state and check, for the tests of this crate and of the front end
//! (`contractor-cli/tests/provenance.rs`): not used by the tool itself.

use std::path::Path;

use contractor_protocol::attest::SignRequest;
use contractor_protocol::result::Outcome;
use serde_json::json;

/// A record to state, for the tests here and in `tests/provenance.rs`: two artifacts,
/// `downloads.jsonl` with two downloads (and a decision line), `result.json`, a log and a
/// packed source, in `record`; a git work tree on `main` at a fixed commit in `project`.
#[doc(hidden)]
pub fn write_fixture(record: &Path, project: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(record.join("artifacts/sub"))?;
    std::fs::write(record.join("artifacts/hello"), b"hello binary\n")?;
    std::fs::write(record.join("artifacts/sub/notes.txt"), b"notes\n")?;
    let downloads = [
        r#"{"type":"download","time":1795615977.5,"method":"GET","url":"https://deb.debian.org/a.deb","status":200,"size":3,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","complete":true}"#,
        r#"{"type":"decision","time":1795615977.6,"client":"127.0.0.1:5000","method":"CONNECT","host":"evil.example","port":443,"decision":"deny","reason":"host not on the allowlist"}"#,
        r#"{"type":"download","time":1795615978.0,"method":"GET","url":"https://static.crates.io/crates/x/x-1.0.crate","status":200,"size":0,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","complete":true,"phase":"fetch"}"#,
    ];
    std::fs::write(record.join("downloads.jsonl"), downloads.join("\n") + "\n")?;
    std::fs::write(record.join("build.log"), b"make\n")?;
    std::fs::write(record.join("source.tar"), b"not really a tar")?;
    let result = contractor_protocol::result::BuildResult {
        version: 1,
        id: record
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        outcome: Outcome::Failed,
        exit_code: Some(2),
        duration_secs: 13.0,
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: vec![],
        refused_hosts: vec!["evil.example".into()],
        refused_offline: vec![],
        upstream_failures: vec![],
        limit: None,
        error: None,
        host: None,
    };
    std::fs::write(
        record.join("result.json"),
        serde_json::to_vec_pretty(&result).unwrap_or_default(),
    )?;
    std::fs::create_dir_all(project.join(".git/refs/heads"))?;
    std::fs::write(project.join(".git/HEAD"), b"ref: refs/heads/main\n")?;
    std::fs::write(
        project.join(".git/refs/heads/main"),
        b"0123456789abcdef0123456789abcdef01234567\n",
    )?;
    Ok(())
}

/// The spec text of the fixture's project.
#[doc(hidden)]
pub const FIXTURE_SPEC: &str = r#"
[build]
script = "make"
fetch = "make fetch"
artifacts = ["hello", "sub/*"]

[network]
allow = ["deb.debian.org", "static.crates.io"]
"#;

/// A sign request for the fixture's record, as the front end would send it for
/// [`FIXTURE_SPEC`] (the key at `key`, made when missing).
#[doc(hidden)]
pub fn fixture_request(record: &Path, project: &Path, key: &Path) -> SignRequest {
    SignRequest {
        version: 1,
        record: record.to_path_buf(),
        key: key.to_path_buf(),
        create_key: true,
        project: project.to_path_buf(),
        id: "20261125-141502-3fa2c1".into(),
        external_parameters: json!({
            "script": "make",
            "fetch": "make fetch",
            "artifacts": ["hello", "sub/*"],
            "network": {"allow": ["deb.debian.org", "static.crates.io"], "inspect": true, "tunnel": []},
        }),
        cpus: 2,
        memory_mib: 2048,
        disk_gib: 8,
        inspect: true,
        tunnel: vec![],
        cache_paths: vec![],
        cache_restored: Some(false),
        accelerator: contractor_protocol::vm::Accel::Auto,
        snapshot: false,
        snapshot_report: None,
        offline: false,
        image_name: "debian-12-build".into(),
        image: Some(contractor_protocol::image::Manifest {
            version: 1,
            name: "debian-12-build".into(),
            suite: "bookworm".into(),
            created: 1_795_615_000,
            disk_sha256: "d".repeat(64),
            agent_version: "0.1.0".into(),
            agent_sha256: "a".repeat(64),
            cmdline: "console=ttyS0".into(),
            base: None,
            packages: vec![],
            check_valid_until: None,
            source: None,
        }),
        build_host: None,
        // 2026-11-25T14:12:57Z and 14:13:10Z.
        started_on: 1_795_615_977,
        finished_on: 1_795_615_990,
        outcome: Outcome::Success,
        exit_code: Some(0),
        rebuild_of: None,
    }
}
