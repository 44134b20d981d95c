//! `contractor build --host` against a stand-in `ssh` (`CONTRACTOR_SSH`) that answers as a
//! build host would: its hello, the build's `finished` event, then a record stream. No VM
//! and no network: what is tested is where the record lands and who writes it (the store's
//! confined `record receive`, which indexes what arrived itself). Needs the tools built
//! beside `contractor` (`cargo build --workspace`).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use sha2::Digest;

/// A project with a spec, a data directory, and the stand-in ssh that sends `stream`.
struct Fixture {
    _dir: tempfile::TempDir,
    project: PathBuf,
    data: PathBuf,
    ssh: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(
        project.join("contractor.toml"),
        "[build]\nscript = \"make\"\nartifacts = [\"hello\"]\n",
    )
    .expect("spec");
    std::fs::write(project.join("Makefile"), "all:\n").expect("source");
    let data = dir.path().join("data");
    let ssh = dir.path().join("ssh");
    Fixture {
        project,
        data,
        ssh,
        _dir: dir,
    }
}

/// One file of a record stream.
fn file(stream: &mut Vec<u8>, path: &str, bytes: &[u8]) {
    let line = serde_json::json!({"type": "file", "path": path, "bytes": bytes.len(), "executable": false});
    stream.extend_from_slice(line.to_string().as_bytes());
    stream.push(b'\n');
    stream.extend_from_slice(bytes);
}

/// The build host's answer: hello, a successful `finished`, then the record `files`.
fn answer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut stream = Vec::new();
    let hello =
        serde_json::json!({"type": "hello", "version": 1, "contractor": env!("CARGO_PKG_VERSION")});
    let finished = serde_json::json!({"type": "finished", "result": {
        "version": 1, "id": "20261125-141502-3fa2c1", "outcome": "success", "exit_code": 0,
        "duration_secs": 1.0, "log": "/h/build.log", "console_log": "/h/console.log",
        "artifacts": [], "refused_hosts": [], "refused_offline": [], "upstream_failures": [],
        "limit": null, "error": null, "host": null}});
    for line in [hello, finished] {
        stream.extend_from_slice(line.to_string().as_bytes());
        stream.push(b'\n');
    }
    for (path, bytes) in files {
        file(&mut stream, path, bytes);
    }
    let end = serde_json::json!({"type": "end", "files": files.len()});
    stream.extend_from_slice(end.to_string().as_bytes());
    stream.push(b'\n');
    stream
}

/// Runs `contractor build --host fake --json` with the stand-in ssh sending `stream`; the
/// build's result and its record directory.
fn build_on_stand_in(fixture: &Fixture, stream: &[u8]) -> (Output, Value, PathBuf) {
    let sent = fixture.ssh.with_extension("stream");
    std::fs::write(&sent, stream).expect("stream");
    let output = build_with_ssh(
        fixture,
        &format!("#!/bin/sh\nexec cat '{}'\n", sent.display()),
    );
    let result = record_result(&fixture.project);
    let record = PathBuf::from(result["log"].as_str().expect("log"))
        .parent()
        .expect("record")
        .to_path_buf();
    (output, result, record)
}

/// Runs `contractor build --host fake --json` with `script` as its ssh's build session
/// (run by `sh` in ssh's own process); the room probe (`contractor-vm capacity`) finds room.
fn build_with_ssh(fixture: &Fixture, script: &str) -> Output {
    let session = fixture.ssh.with_extension("session");
    std::fs::write(&session, script).expect("session");
    let capacity = serde_json::json!({"type": "capacity", "version": 1,
        "contractor": env!("CARGO_PKG_VERSION"), "free_memory_mib": 65536, "cpus": 64,
        "running": 0});
    let ssh = format!(
        "#!/bin/sh\ncase \"$*\" in\n  *' contractor-vm capacity '*) echo '{capacity}'; exit 0 ;;\nesac\nexec /bin/sh '{}' \"$@\"\n",
        session.display()
    );
    std::fs::write(&fixture.ssh, ssh).expect("ssh");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fixture.ssh, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::process::Command::new(env!("CARGO_BIN_EXE_contractor"))
        .args(["build", "--host", "fake", "--json"])
        .current_dir(&fixture.project)
        .env("CONTRACTOR_DATA_DIR", &fixture.data)
        .env("CONTRACTOR_SSH", &fixture.ssh)
        .output()
        .expect("run contractor")
}

fn record_result(project: &Path) -> Value {
    let builds = project.join(".contractor/builds");
    let record = std::fs::read_dir(&builds)
        .expect("builds")
        .next()
        .expect("one record")
        .expect("entry")
        .path();
    serde_json::from_slice(&std::fs::read(record.join("result.json")).expect("result.json"))
        .expect("json")
}

#[test]
fn a_build_hosts_record_is_received_and_indexed_by_the_store() {
    let fixture = fixture();
    let stream = answer(&[("build.log", b"built\n"), ("artifacts/hello", b"hello")]);
    let (output, result, record) = build_on_stand_in(&fixture, &stream);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(result["outcome"], "success", "{stderr}\n{result}");
    assert_eq!(result["host"], "fake");
    assert_eq!(
        std::fs::read(record.join("build.log")).expect("log"),
        b"built\n"
    );
    // The index is the store's, made from what arrived.
    let index: Value = serde_json::from_slice(
        &std::fs::read(record.join("artifacts.json")).expect("the store's index"),
    )
    .expect("json");
    assert_eq!(index["artifacts"][0]["path"], "hello");
    assert_eq!(
        index["artifacts"][0]["sha256"],
        hex(&sha2::Sha256::digest(b"hello"))
    );
    assert_eq!(
        result["artifacts"],
        serde_json::json!([record.join("artifacts/hello")])
    );
}

#[test]
fn a_build_hosts_own_artifact_index_is_never_taken() {
    let fixture = fixture();
    let forged = br#"{"version":1,"build":"x","artifacts":[{"path":"hello","size":5,"sha256":"0000000000000000000000000000000000000000000000000000000000000000","executable":false}]}"#;
    let stream = answer(&[("artifacts.json", forged), ("artifacts/hello", b"hello")]);
    let (output, result, record) = build_on_stand_in(&fixture, &stream);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(result["outcome"], "infrastructure", "{stderr}\n{result}");
    let chain = result["error"]["chain"].to_string();
    assert!(chain.contains("cannot be kept"), "{chain}");
    assert!(
        chain.contains("\\\"artifacts.json\\\" is written by this host"),
        "{chain}"
    );
    let index = std::fs::read(record.join("artifacts.json")).unwrap_or_default();
    assert_ne!(index, forged.to_vec(), "the build host's index was kept");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stand-in ssh that sends `stream`'s first line (the hello), then notes in `report`
/// each process that holds the read end of its stdout (`comm NoNewPrivs Seccomp`), once
/// every reader is confined or after 10 s, and then sends the rest.
fn reader_reporting_ssh(stream: &Path, report: &Path) -> String {
    format!(
        r#"#!/bin/sh
head -n 1 '{stream}'
pipe=$(readlink /proc/$$/fd/1)
tries=0
while :; do
    : > '{report}.new'
    confined=yes
    for fd in /proc/[0-9]*/fd/*; do
        [ "$(readlink "$fd" 2>/dev/null)" = "$pipe" ] || continue
        pid=${{fd#/proc/}}; pid=${{pid%%/*}}
        flags=$(awk '/^flags:/ {{ print $2 }}' "/proc/$pid/fdinfo/${{fd##*/}}" 2>/dev/null)
        case "$flags" in *0) ;; *) continue ;; esac
        line="$(cat /proc/$pid/comm) $(awk '/^NoNewPrivs:/ {{ print $2 }}' /proc/$pid/status) $(awk '/^Seccomp:/ {{ print $2 }}' /proc/$pid/status)"
        echo "$line" >> '{report}.new'
        case "$line" in *" 1 2") ;; *) confined=no ;; esac
    done
    tries=$((tries + 1))
    if [ -s '{report}.new' ] && [ $confined = yes ]; then break; fi
    if [ $tries -ge 100 ]; then break; fi
    sleep 0.1
done
mv '{report}.new' '{report}'
tail -n +2 '{stream}'
"#,
        stream = stream.display(),
        report = report.display()
    )
}

#[test]
fn the_build_hosts_stream_is_read_and_parsed_only_by_a_confined_store() {
    let fixture = fixture();
    let stream = answer(&[("build.log", b"built\n")]);
    let sent = fixture.ssh.with_extension("stream");
    std::fs::write(&sent, &stream).expect("stream");
    let report = fixture.ssh.with_extension("readers");
    let output = build_with_ssh(&fixture, &reader_reporting_ssh(&sent, &report));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let result = record_result(&fixture.project);
    assert_eq!(result["outcome"], "success", "{stderr}\n{result}");
    // Who read the build host's bytes: only contractor-store, with no_new_privs and a
    // seccomp filter (its Landlock rules are shown by contractor-store's own tests).
    let readers = std::fs::read_to_string(&report).expect("the readers' report");
    assert!(!readers.trim().is_empty(), "no reader found");
    for reader in readers.lines() {
        assert_eq!(reader, "contractor-stor 1 2", "readers:\n{readers}");
    }
}

#[test]
fn the_source_is_sent_only_when_the_build_host_says_it_lacks_it() {
    for need in [false, true] {
        let fixture = fixture();
        // The build host's answer: hello, then whether it needs the source, then the rest.
        let rest = answer(&[("build.log", b"built\n")]);
        let split = rest.iter().position(|b| *b == b'\n').expect("hello line") + 1;
        let mut stream = rest[..split].to_vec();
        let source = serde_json::json!({"type": "source", "need": need});
        stream.extend_from_slice(format!("{source}\n").as_bytes());
        stream.extend_from_slice(&rest[split..]);
        let sent = fixture.ssh.with_extension("stream");
        let stdin = fixture.ssh.with_extension("stdin");
        std::fs::write(&sent, &stream).expect("stream");
        // What the front end writes to the session is kept in `stdin`.
        let session = format!(
            "exec 3<&0\ncat <&3 > '{}' &\ncat '{}'\nwait\n",
            stdin.display(),
            sent.display()
        );
        let output = build_with_ssh(&fixture, &session);
        let result = record_result(&fixture.project);
        assert_eq!(
            result["outcome"],
            "success",
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let record = PathBuf::from(result["log"].as_str().expect("log"))
            .parent()
            .expect("record")
            .to_path_buf();
        let tar = std::fs::read(record.join("source.tar")).expect("the local source.tar");
        let received = std::fs::read(&stdin).expect("what the session got");
        let line_end = received
            .iter()
            .position(|b| *b == b'\n')
            .expect("a request line");
        let request: Value = serde_json::from_slice(&received[..line_end]).expect("request");
        assert_eq!(request["source_sha256"], hex(&sha2::Sha256::digest(&tar)));
        let after = &received[line_end + 1..];
        match need {
            false => assert!(after.is_empty(), "{} bytes sent", after.len()),
            true => assert!(after == tar.as_slice(), "the source's bytes follow"),
        }
    }
}
