//! End-to-end: examples/pipeline.sh builds examples/hello with the separate tools
//! (contractor-store, contractor-proxy, contractor-vm, contractor-run) composed in plain sh,
//! in a real VM, the way docs/protocol.md says a user can compose them.
//!
//! The script runs with the tools of this cargo target directory (`scripts/test` builds them
//! and the static agent there) and a fresh store directory. Its stdout is contractor-run's
//! event stream, read here with the protocol's types; its record is read as a `BuildResult`.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use contractor_protocol::result::{BuildResult, Outcome};
use contractor_protocol::run::RunEvent;

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory holding `contractor` and, beside it, the other tools.
fn bin_dir() -> PathBuf {
    util::bin_dir()
}

/// Runs the script with `store` as its store and `bin` as its tool directory, on `project`
/// (examples/hello when `None`).
fn pipeline(project: Option<&Path>, store: &Path, bin: &Path) -> Output {
    let mut command = Command::new("sh");
    command
        .arg(repo().join("examples/pipeline.sh"))
        .env("STORE", store)
        .env("CONTRACTOR_BIN", bin)
        .env_remove("PROJECT");
    if let Some(project) = project {
        command.env("PROJECT", project);
    }
    command.output().expect("run sh examples/pipeline.sh")
}

/// Every file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).expect("read_dir").flatten() {
            let path = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// `result.json` of `record` with what differs between two builds of one project made
/// neutral: the id (also inside paths) and the duration.
fn neutral_result(record: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(record.join("result.json")).expect("result.json");
    let result: BuildResult =
        serde_json::from_str(&text).expect("result.json matches the protocol");
    let text = text.replace(&result.id, "ID");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["duration_secs"] = serde_json::json!(0);
    value
}

/// `(name, uri)` of the VM from the line `pipeline: VM NAME started at URI (ACCEL)`.
fn vm_of(stderr: &str) -> Option<(String, String)> {
    stderr.lines().find_map(|line| {
        let rest = line.strip_prefix("pipeline: VM ")?;
        let mut words = rest.split_whitespace();
        let name = words.next()?.to_string();
        let uri = rest
            .split(" started at ")
            .nth(1)?
            .split_whitespace()
            .next()?;
        Some((name, uri.to_string()))
    })
}

fn vm_exists(uri: &str, name: &str) -> bool {
    let out = Command::new("virsh")
        .args(["-c", uri, "list", "--all", "--name"])
        .output()
        .expect("virsh is installed (libvirt-clients)");
    assert!(
        out.status.success(),
        "virsh list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == name)
}

#[test]
fn the_shell_pipeline_builds_hello_like_contractor_build() {
    if util::skip_without_vm("the_shell_pipeline_builds_hello_like_contractor_build") {
        return;
    }
    let store = tempfile::tempdir().expect("temp store");
    let out = pipeline(None, store.path(), &bin_dir());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (vm, uri) = vm_of(&stderr).unwrap_or_else(|| panic!("no VM line on stderr:\n{stderr}"));
    // contractor-vm's holder finishes libvirt's destroy on its own after it lets go, so
    // the script may end first: gone within util::VM_GONE.
    let deadline = std::time::Instant::now() + util::VM_GONE;
    while vm_exists(&uri, &vm) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !vm_exists(&uri, &vm),
        "VM {vm} is still defined at {uri} {:?} after the script",
        util::VM_GONE
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the pipeline failed; stderr:\n{stderr}\nstdout:\n{stdout}"
    );

    // stdout is contractor-run's event stream and nothing else.
    let events: Vec<RunEvent> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a RunEvent ({e}): {line}\nstdout:\n{stdout}"))
        })
        .collect();
    assert!(
        matches!(
            events.first(),
            Some(RunEvent::Started { version: 1, confinement: Some(c) }) if c.enforced && c.seccomp
        ),
        "the relay reports its confinement first: {stdout}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, RunEvent::Unknown)),
        "an event type the protocol does not know:\n{stdout}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RunEvent::Artifact { path, .. } if path == "hello")),
        "{stdout}"
    );
    match events.last() {
        Some(RunEvent::Finished {
            outcome, exit_code, ..
        }) => {
            assert_eq!(*outcome, Outcome::Success, "{stdout}");
            assert_eq!(*exit_code, Some(0), "{stdout}");
        }
        other => panic!("the stream does not end with finished: {other:?}\n{stdout}"),
    }

    // The record: the artifact arrived by itself, and runs here.
    let builds: Vec<PathBuf> = std::fs::read_dir(store.path().join("builds"))
        .expect("builds/")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(builds.len(), 1, "one build record: {builds:?}");
    let record = &builds[0];
    let hello = record.join("artifacts/hello");
    let run = Command::new(&hello)
        .current_dir(record.join("artifacts"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", hello.display()));
    assert_eq!(String::from_utf8_lossy(&run.stdout), "Hello, world!\n");
    for file in ["source.tar", "build.log", "console.log", "proxy.jsonl"] {
        assert!(record.join(file).is_file(), "{file} missing in the record");
    }
    let log = std::fs::read_to_string(record.join("build.log")).expect("build.log");
    assert!(log.contains("all checks passed"), "{log}");
    let result: BuildResult = serde_json::from_str(
        &std::fs::read_to_string(record.join("result.json")).expect("result.json"),
    )
    .expect("result.json matches the protocol");
    assert_eq!(result.outcome, Outcome::Success);
    assert_eq!(
        Some(result.id.as_str()),
        record.file_name().and_then(|n| n.to_str())
    );
    assert_eq!(result.artifacts, vec![hello]);
}

/// The two spellings of one orchestration make the same record: `contractor build` and
/// examples/pipeline.sh on one project, compared file by file (ids, times and the messages
/// that carry ports and pids aside).
#[test]
fn the_pipeline_and_contractor_build_write_the_same_record() {
    if util::skip_without_vm("the_pipeline_and_contractor_build_write_the_same_record") {
        return;
    }
    let project = tempfile::tempdir().expect("temp project");
    let example = repo().join("examples/hello");
    for file in ["contractor.toml", "hello.c", "Makefile"] {
        std::fs::copy(example.join(file), project.path().join(file)).expect("copy example");
    }
    let built = Command::new(util::contractor())
        .arg("build")
        .current_dir(project.path())
        .output()
        .expect("run contractor build");
    assert!(
        built.status.success(),
        "contractor build failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let first = std::fs::canonicalize(project.path().join(".contractor/latest")).expect("latest");
    let out = pipeline(
        Some(project.path()),
        &project.path().join(".contractor"),
        &bin_dir(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the pipeline failed; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = std::fs::canonicalize(project.path().join(".contractor/latest")).expect("latest");
    assert_ne!(first, second, "the pipeline made a record of its own");

    // `contractor build` also signs its record (provenance.json, with the front end's key,
    // docs/provenance.md); the shell spelling holds no key and signs nothing.
    let mut files = files_under(&first);
    let signed = Path::new("provenance.json");
    assert!(
        files.iter().any(|file| file == signed),
        "contractor build signs its record: {files:?}"
    );
    files.retain(|file| file != signed);
    assert_eq!(
        files,
        files_under(&second),
        "the records hold different files"
    );
    for must in [
        "source.tar",
        "build.log",
        "console.log",
        "proxy.jsonl",
        "result.json",
        "tools.log",
        "artifacts/hello",
    ] {
        assert!(
            files.contains(&PathBuf::from(must)),
            "{must} missing: {files:?}"
        );
    }
    for file in &files {
        let name = file.to_string_lossy();
        match name.as_ref() {
            "result.json" => assert_eq!(neutral_result(&first), neutral_result(&second)),
            // The store's index names its build.
            "artifacts.json" => {
                let index = |record: &Path| -> serde_json::Value {
                    let text = std::fs::read(record.join(file)).expect("read");
                    serde_json::from_slice::<serde_json::Value>(&text).expect("index")["artifacts"]
                        .clone()
                };
                assert_eq!(index(&first), index(&second), "the artifact indexes differ");
            }
            // Timestamps (console) and ports and pids (the tools' messages) differ.
            "console.log" | "tools.log" => {
                assert!(
                    std::fs::metadata(first.join(file)).expect("stat").len() > 0,
                    "{name} is empty"
                );
            }
            _ => assert!(
                std::fs::read(first.join(file)).expect("read")
                    == std::fs::read(second.join(file)).expect("read"),
                "{name} differs between contractor build and the pipeline"
            ),
        }
    }
}

#[test]
fn the_pipeline_names_a_missing_tool_and_exits_3() {
    let store = tempfile::tempdir().expect("temp store");
    let empty = tempfile::tempdir().expect("empty bin dir");
    let out = pipeline(None, store.path(), empty.path());
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "no executable {}/contractor",
            empty.path().display()
        )),
        "{stderr}"
    );
    assert!(
        !store.path().join("builds").exists(),
        "nothing was started: {stderr}"
    );
}
