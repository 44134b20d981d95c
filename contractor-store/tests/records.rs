//! `contractor-store index` and `contractor-store gc` against real directories, and the
//! library used in-process the way the front end uses it.

mod util;

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use util::{binary, Fixture};

fn run(args: &[&str], root: &Path) -> (bool, Value, String) {
    let output = binary()
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        output.status.success(),
        json,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sets the mtime of `path` and everything beneath it to `age` ago.
fn age_tree(path: &Path, age: Duration) {
    let when = SystemTime::now() - age;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("list") {
            age_tree(&entry.expect("entry").path(), age);
        }
    }
    std::fs::File::open(path)
        .and_then(|f| f.set_modified(when))
        .expect("set mtime");
}

fn build(fixture: &Fixture, id: &str, finished: bool, age_hours: u64, artifact: &[u8]) {
    fixture.write(&format!("builds/{id}/source.tar"), b"tar");
    fixture.write(&format!("builds/{id}/artifacts/out"), artifact);
    if finished {
        fixture.write(&format!("builds/{id}/result.json"), b"{}");
    }
    age_tree(
        &fixture.root.join("builds").join(id),
        Duration::from_secs(age_hours * 3600 + 60),
    );
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn index_writes_artifacts_json() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/artifacts/bin/hello", b"hello");
    fixture.write("builds/b1/artifacts/README", b"");
    let (ok, printed, stderr) = run(&["index", "--build", "b1"], &fixture.root);
    assert!(ok, "{stderr}");
    let on_disk: Value = serde_json::from_slice(
        &std::fs::read(fixture.root.join("builds/b1/artifacts.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(printed, on_disk);
    assert_eq!(on_disk["build"], "b1");
    assert_eq!(on_disk["artifacts"][0]["path"], "README");
    assert_eq!(on_disk["artifacts"][1]["path"], "bin/hello");
    assert_eq!(on_disk["artifacts"][1]["size"], 5);
    assert_eq!(
        on_disk["artifacts"][1]["sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );

    let (ok, _, stderr) = run(&["index", "--build", "missing"], &fixture.root);
    assert!(!ok);
    assert!(stderr.contains("build missing does not exist"), "{stderr}");
}

#[test]
fn gc_keeps_the_newest_builds_and_running_ones() {
    let fixture = Fixture::new();
    for (id, hours) in [
        ("old1", 50),
        ("old2", 40),
        ("mid", 30),
        ("new1", 20),
        ("new2", 10),
    ] {
        build(&fixture, id, true, hours, id.as_bytes());
    }
    build(&fixture, "running", false, 0, b"r");
    build(&fixture, "abandoned", false, 60, b"a");

    let (ok, dry, stderr) = run(&["gc", "--keep", "2", "--dry-run"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(dry["dry_run"], true);
    assert!(
        fixture.root.join("builds/old1").exists(),
        "dry run removes nothing"
    );

    let (ok, summary, stderr) = run(&["gc", "--keep", "2"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(summary["type"], "gc");
    assert_eq!(
        summary,
        Value::Object({
            let mut expected = dry.as_object().expect("object").clone();
            expected.insert("dry_run".into(), Value::Bool(false));
            expected
        }),
        "the dry run predicted this"
    );
    assert_eq!(
        strings(&summary["removed_builds"]),
        ["abandoned", "old1", "old2", "mid"]
    );
    assert_eq!(
        strings(&summary["kept_builds"]),
        ["running", "new2", "new1"]
    );
    assert_eq!(strings(&summary["running_builds"]), ["running"]);
    let mut left: Vec<_> = std::fs::read_dir(fixture.root.join("builds"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["new1", "new2", "running"]);
    assert!(summary["freed_bytes"].as_u64().expect("bytes") > 0);
}

#[test]
fn gc_older_than_and_unreferenced_blobs() {
    let fixture = Fixture::new();
    build(&fixture, "week_old", true, 8 * 24, b"w");
    build(&fixture, "day_old", true, 24, b"d");
    let (ok, _, stderr) = run(&["index", "--build", "day_old"], &fixture.root);
    assert!(ok, "{stderr}");
    let kept_blob = "18ac3e7343f016890c510e93f935261169d9e3f565436429830faf0934f4f8e4"; // "d"
    let young_blob = "0".repeat(64);
    let old_blob = "1".repeat(64);
    let linked_blob = "2".repeat(64);
    for name in [
        kept_blob,
        young_blob.as_str(),
        old_blob.as_str(),
        linked_blob.as_str(),
    ] {
        fixture.write(&format!("cas/sha256/{name}"), b"blob");
    }
    std::fs::hard_link(
        fixture.root.join(format!("cas/sha256/{linked_blob}")),
        fixture.root.join("builds/day_old/artifacts/linked"),
    )
    .expect("link");
    for name in [kept_blob, old_blob.as_str(), linked_blob.as_str()] {
        age_tree(
            &fixture.root.join(format!("cas/sha256/{name}")),
            Duration::from_secs(2 * 3600),
        );
    }

    let (ok, summary, stderr) = run(&["gc", "--older-than", "7d"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(strings(&summary["removed_builds"]), ["week_old"]);
    assert_eq!(
        strings(&summary["removed_blobs"]),
        std::slice::from_ref(&old_blob)
    );
    assert!(fixture.root.join("builds/day_old").exists());
    for name in [kept_blob, young_blob.as_str(), linked_blob.as_str()] {
        assert!(
            fixture.root.join(format!("cas/sha256/{name}")).exists(),
            "{name}"
        );
    }

    let (ok, _, stderr) = run(&["gc"], &fixture.root);
    assert!(!ok);
    assert!(stderr.contains("--keep"), "{stderr}");
    let (ok, _, stderr) = run(&["gc", "--older-than", "7"], &fixture.root);
    assert!(!ok);
    assert!(stderr.contains("\"7\" is not an age"), "{stderr}");
}

/// Writes `builds/<id>/owner.json` naming this test process, with its start time moved by
/// `skew` (a nonzero skew names a process that is gone: the pid now belongs to another).
fn own(fixture: &Fixture, id: &str, skew: u64, age: Duration) {
    let pid = std::process::id();
    let start = contractor_protocol::process::start_time(pid).expect("start time") + skew;
    fixture.write(
        &format!("builds/{id}/owner.json"),
        format!("{{\"pid\":{pid},\"start\":{start}}}").as_bytes(),
    );
    age_tree(&fixture.root.join("builds").join(id), age);
}

/// The rules that used to disagree: gc took a build for running by its record's mtime, the
/// front end by its owner's pid. Now one rule: an owned record runs exactly while its owner
/// lives, however long it has been quiet; gc and closing agree.
#[test]
fn a_quiet_build_with_a_live_owner_runs_and_a_fresh_one_whose_owner_died_does_not() {
    let fixture = Fixture::new();
    // A long build whose last output was two hours ago: its owner still runs.
    build(&fixture, "quiet", false, 2, b"q");
    own(&fixture, "quiet", 0, Duration::from_secs(2 * 3600));
    // A build written a moment ago whose owner was killed.
    build(&fixture, "killed", false, 0, b"k");
    own(&fixture, "killed", 1, Duration::ZERO);

    let (ok, summary, stderr) = run(&["gc", "--keep", "0", "--dry-run"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(strings(&summary["running_builds"]), ["quiet"], "{summary}");
    assert_eq!(strings(&summary["removed_builds"]), ["killed"], "{summary}");

    let (ok, closed, stderr) = run(&["record", "close-abandoned"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(closed["type"], "records_closed");
    assert_eq!(strings(&closed["closed"]), ["killed"]);
    assert!(!fixture.root.join("builds/quiet/result.json").exists());
    let result: Value = serde_json::from_slice(
        &std::fs::read(fixture.root.join("builds/killed/result.json")).expect("closed"),
    )
    .expect("json");
    assert_eq!(result["outcome"], "interrupted");
    assert_eq!(result["error"]["code"], "abandoned");
    assert!(!fixture.root.join("builds/killed/owner.json").exists());
    assert!(
        result["artifacts"][0]
            .as_str()
            .is_some_and(|a| a.ends_with("builds/killed/artifacts/out")),
        "{result}"
    );
    // Closed once: a second pass finds nothing to close.
    let (ok, closed, stderr) = run(&["record", "close-abandoned"], &fixture.root);
    assert!(ok, "{stderr}");
    assert_eq!(strings(&closed["closed"]), Vec::<String>::new());
}

/// The library on a real socket, configured the way `contractor build` configures it, with a
/// token and a limit set on top.
#[tokio::test]
async fn the_library_serves_in_process_with_tokens_and_limits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", b"tar");
    let token = contractor_store::generate_token().expect("token");
    let mut tokens = contractor_store::TokenTable::new();
    tokens.insert("b1", &token).expect("valid");
    let config = contractor_store::StoreConfig {
        root: fixture.root.clone(),
        access_log: false,
        only_build: Some("b1".to_string()),
        tokens: Some(tokens),
        max_artifact_bytes: Some(10),
        ..contractor_store::StoreConfig::new(fixture.root.clone())
    };
    let store = contractor_store::Store::open(&config).expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(store.serve(listener, async {
        let _ = stopped.await;
    }));

    let exchange = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    };
    let auth = format!("Authorization: Bearer {token}\r\nConnection: close\r\n");
    let answer = exchange(format!("GET /builds/b1/source.tar HTTP/1.1\r\n{auth}\r\n")).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("tar"),
        "{answer}"
    );
    let answer = exchange(format!(
        "PUT /builds/b1/artifacts/x HTTP/1.1\r\n{auth}Content-Length: 11\r\nX-Content-Mode: 0755\r\n\r\nhello world"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let answer = exchange(format!(
        "PUT /builds/b1/artifacts/x HTTP/1.1\r\n{auth}Content-Length: 5\r\nX-Content-Mode: 0755\r\n\r\nhello"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let answer =
        exchange("GET /builds/b1/source.tar HTTP/1.1\r\nConnection: close\r\n\r\n".to_string())
            .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let _ = stop.send(());
    server.await.expect("server task");
    assert_eq!(
        fixture.files(),
        ["builds/b1/artifacts/x", "builds/b1/source.tar"]
    );
}

/// `record close --root R --build ID --started T [--artifact P]...` with `events` on stdin.
fn close_record(root: &Path, id: &str, artifacts: &[&str], events: &str) -> std::process::Output {
    close_record_with(root, id, artifacts, &[], events)
}

/// The `record_closed` answer of a close that must have succeeded (its stderr shown if not).
fn closed(out: &std::process::Output) -> contractor_protocol::store::RecordClosed {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one record_closed answer")
}

/// [`close_record`] with the flags `ended` (how the caller says the build ended).
fn close_record_with(
    root: &Path,
    id: &str,
    artifacts: &[&str],
    ended: &[&str],
    events: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut command = binary();
    command
        .args(["record", "close", "--json-errors", "--root"])
        .arg(root)
        .args(["--build", id, "--started", "1000.5"])
        .args(ended);
    for artifact in artifacts {
        command.args(["--artifact", artifact]);
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // A refused close exits before it reads: its stdin may be gone.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(events.as_bytes());
    child.wait_with_output().expect("wait")
}

const RUN_EVENTS: &str = r#"{"type":"started","version":1}
{"type":"agent_ready","agent_version":"0.1.0"}
{"type":"output","text":"cc -o hello hello.c\n"}
{"type":"artifact","path":"hello","size":5}
{"type":"finished","outcome":"success","exit_code":0,"duration_secs":4.2}
"#;

#[test]
fn record_close_writes_the_result_from_the_run_the_index_and_the_proxy() {
    let fixture = Fixture::new();
    let id = "20261125-141502-3fa2c1";
    fixture.write(&format!("builds/{id}/artifacts/hello"), b"hello");
    fixture.write(
        &format!("builds/{id}/owner.json"),
        b"{\"pid\":1,\"start\":1}",
    );
    let head =
        r#"{"type":"decision","time":1.0,"client":"127.0.0.1:5000","method":"CONNECT","port":443"#;
    let proxy = [
        format!(r#"{head},"host":"github.com","decision":"deny","reason":"host not on the allowlist","class":"policy"}}"#),
        format!(r#"{head},"host":"deb.debian.org","decision":"deny","reason":"cannot resolve the host","class":"upstream"}}"#),
        format!(r#"{head},"host":"late.example","decision":"deny","reason":"host not on the allowlist","class":"policy","phase":"script"}}"#),
        r#"{"type":"summary","allowed":0,"denied":{},"bytes_up":0,"bytes_down":0,"connections":3,"active_connections":0}"#.to_string(),
    ];
    fixture.write(
        &format!("builds/{id}/proxy.jsonl"),
        (proxy.join("\n") + "\n").as_bytes(),
    );
    let out = close_record(&fixture.root, id, &["hello"], RUN_EVENTS);
    let answer = closed(&out);
    let record = fixture.root.join("builds").join(id);
    let written: contractor_protocol::result::BuildResult =
        serde_json::from_slice(&std::fs::read(record.join("result.json")).expect("result.json"))
            .expect("a BuildResult");
    assert_eq!(written, answer.result);
    assert_eq!(written.id, id);
    assert_eq!(
        written.outcome,
        contractor_protocol::result::Outcome::Success
    );
    assert_eq!(written.exit_code, Some(0));
    assert_eq!(written.artifacts, [record.join("artifacts/hello")]);
    assert_eq!(written.refused_hosts, ["github.com"]);
    assert_eq!(written.refused_offline, ["late.example"]);
    assert_eq!(written.upstream_failures.len(), 1);
    assert_eq!(written.upstream_failures[0].host, "deb.debian.org");
    assert!(written.duration_secs > 1.0e9, "from --started to now");
    assert!(
        record.join("artifacts.json").is_file(),
        "the index was written"
    );
    assert!(!record.join("owner.json").exists(), "the owner is gone");

    // A record is closed once.
    let again = close_record(&fixture.root, id, &["hello"], RUN_EVENTS);
    assert_eq!(again.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("\"code\":\"record_not_open\""), "{stdout}");
    assert!(stdout.contains("is closed already"), "{stdout}");
}

#[test]
fn record_close_fails_a_build_whose_download_did_not_match_its_pin() {
    let fixture = Fixture::new();
    let (pinned, got, cached) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    // Two proxies' summaries, as each files its own last in proxy.jsonl: the build's (with
    // its tally of downloads.jsonl: two mismatches, one the download cache's copy) and
    // the script phase's (none).
    let summary = |phase: &str, record: &str| {
        format!(
            r#"{{"type":"summary","allowed":2,"denied":{{}},"bytes_up":0,"bytes_down":0,"connections":2,"active_connections":0,"record":{record},"phase":"{phase}"}}"#
        )
    };
    let tally = format!(
        r#"{{"refused_hosts":[],"upstream_failures":[],"mismatches":2,"mismatched":[{{"url":"https://x.example/a.tar.gz","sha256":"{got}","pinned":"{pinned}","from_cache":false}},{{"url":"https://x.example/b.tar.gz","sha256":"{cached}","pinned":"{pinned}","from_cache":true}}],"unpinned":0,"left_out":0}}"#
    );
    let none = r#"{"refused_hosts":[],"upstream_failures":[],"mismatches":0,"mismatched":[],"unpinned":0,"left_out":0}"#;
    let proxy = [summary("fetch", &tally), summary("script", none)].join("\n") + "\n";
    let expected_chain = [
        "2 download(s) did not match contractor.lock (tampering, or a moved tag; `contractor pin` after a build you trust)".to_string(),
        format!("https://x.example/a.tar.gz: its bytes have SHA-256 {got}, contractor.lock pins {pinned}"),
        format!("https://x.example/b.tar.gz: the download cache's copy has SHA-256 {cached}, contractor.lock pins {pinned}"),
    ];
    // Whatever the run said (a success from its events, or the caller's outcome), the
    // build failed: the guest never had those downloads whole.
    let ended: [&[&str]; 2] = [&[], &["--outcome", "success", "--exit-code", "0"]];
    for (n, ended) in ended.iter().enumerate() {
        let id = format!("20261125-141502-00003{n}");
        fixture.write(&format!("builds/{id}/artifacts/hello"), b"hello");
        fixture.write(&format!("builds/{id}/proxy.jsonl"), proxy.as_bytes());
        let out = close_record_with(&fixture.root, &id, &["hello"], ended, RUN_EVENTS);
        let closed = closed(&out);
        let result = closed.result;
        assert_eq!(result.outcome, contractor_protocol::result::Outcome::Failed);
        assert_eq!(result.exit_code, Some(0), "the script's own exit is kept");
        let error = result.error.expect("the mismatch");
        assert_eq!(error.code, "download_mismatch");
        assert_eq!(error.chain, expected_chain);
        let written =
            std::fs::read_to_string(fixture.root.join(format!("builds/{id}/result.json")))
                .expect("result.json");
        assert!(written.contains("download_mismatch"), "{written}");
    }

    // Without a mismatch in any summary, the success stands.
    let id = "20261125-141502-000039";
    fixture.write(&format!("builds/{id}/artifacts/hello"), b"hello");
    let proxy = summary("fetch", none) + "\n";
    fixture.write(&format!("builds/{id}/proxy.jsonl"), proxy.as_bytes());
    let out = close_record(&fixture.root, id, &["hello"], RUN_EVENTS);
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Success
    );
}

#[test]
fn record_close_fails_a_success_without_its_artifact_and_a_run_without_finished_by_its_error() {
    let fixture = Fixture::new();
    let missing = "20261125-141502-000001";
    fixture.write(&format!("builds/{missing}/build.log"), b"log");
    let out = close_record(&fixture.root, missing, &["hello", "*.deb"], RUN_EVENTS);
    let closed = closed(&out);
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Failed
    );
    let error = closed.result.error.expect("an error");
    assert_eq!(error.code, "artifact_missing");
    assert!(error.chain[0].contains("\"hello\""), "{error:?}");

    let cut = "20261125-141502-000002";
    fixture.write(&format!("builds/{cut}/build.log"), b"log");
    let events = "{\"type\":\"started\",\"version\":1}\n{\"type\":\"error\",\"version\":1,\"code\":\"confine\",\"chain\":[\"cannot confine the relay\"]}\n";
    let out = close_record(&fixture.root, cut, &[], events);
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Infrastructure
    );
    let error = closed.result.error.expect("an error");
    assert_eq!(error.code, "confine");
    assert_eq!(error.chain, ["cannot confine the relay"]);

    // A project that cannot be packed: the store's own pack error is the build's failure.
    let unpacked = "20261125-141502-000003";
    fixture.write(&format!("builds/{unpacked}/build.log"), b"log");
    let events = "{\"type\":\"error\",\"version\":1,\"code\":\"source_unreadable\",\"chain\":[\"cannot read x\"]}\n";
    let out = close_record(&fixture.root, unpacked, &[], events);
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Failed
    );

    // Nothing at all: the run's failure.
    let silent = "20261125-141502-000004";
    fixture.write(&format!("builds/{silent}/build.log"), b"log");
    let out = close_record(&fixture.root, silent, &[], "");
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(closed.result.error.expect("error").code, "run");
}

/// The front end decides some ends itself (Ctrl-C, a VM that never started): `--outcome` and its flags are what `result.json` says, whatever
/// stdin holds, but a success still needs its declared artifacts; artifacts are listed in
/// path order, as `contractor build` lists them.
#[test]
fn record_close_writes_the_callers_outcome_and_still_fails_a_success_without_its_artifact() {
    let fixture = Fixture::new();
    let stopped = "20261125-141502-000011";
    fixture.write(&format!("builds/{stopped}/artifacts/hello"), b"hello");
    let ended = [
        "--outcome",
        "interrupted",
        "--error-code",
        "interrupted",
        "--error",
        "the build was interrupted (SIGINT)",
        "--error",
        "-bash: a message may begin with a dash",
    ];
    let out = close_record_with(&fixture.root, stopped, &["hello"], &ended, RUN_EVENTS);
    let closed = closed(&out);
    let result = closed.result;
    assert_eq!(
        result.outcome,
        contractor_protocol::result::Outcome::Interrupted
    );
    assert_eq!(result.exit_code, None, "stdin's finished is not read");
    let error = result.error.expect("the caller's error");
    assert_eq!(error.code, "interrupted");
    assert_eq!(
        error.chain,
        [
            "the build was interrupted (SIGINT)",
            "-bash: a message may begin with a dash"
        ]
    );

    let timed_out = "20261125-141502-000012";
    fixture.write(&format!("builds/{timed_out}/build.log"), b"log");
    let ended = [
        "--outcome",
        "timeout",
        "--exit-code",
        "-9",
        "--limit",
        "timeout",
    ];
    let out = close_record_with(&fixture.root, timed_out, &[], &ended, "");
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Timeout
    );
    assert_eq!(closed.result.exit_code, Some(-9));
    assert_eq!(
        closed.result.limit,
        Some(contractor_protocol::result::Limit::Timeout)
    );
    assert_eq!(closed.result.error, None);

    let missing = "20261125-141502-000013";
    fixture.write(&format!("builds/{missing}/artifacts/a-b"), b"1");
    fixture.write(&format!("builds/{missing}/artifacts/a/b"), b"2");
    let ended = ["--outcome", "success", "--exit-code", "0"];
    let out = close_record_with(&fixture.root, missing, &["a", "hello"], &ended, "");
    let closed: contractor_protocol::store::RecordClosed =
        serde_json::from_slice(&out.stdout).expect("answer");
    assert_eq!(
        closed.result.outcome,
        contractor_protocol::result::Outcome::Failed
    );
    assert_eq!(closed.result.exit_code, Some(0));
    let error = closed.result.error.expect("an error");
    assert_eq!(error.code, "artifact_missing");
    assert!(error.chain[0].contains("\"hello\""), "{error:?}");
    let record = fixture.root.join("builds").join(missing);
    assert_eq!(
        closed.result.artifacts,
        [record.join("artifacts/a/b"), record.join("artifacts/a-b")],
        "path order: a/b before a-b"
    );

    // Flags that need --outcome, and values that are none.
    let bad = close_record_with(
        &fixture.root,
        "20261125-141502-000014",
        &[],
        &["--limit", "disk"],
        "",
    );
    assert_eq!(bad.status.code(), Some(2));
    let bad = close_record_with(
        &fixture.root,
        "20261125-141502-000014",
        &[],
        &["--outcome", "fine"],
        "",
    );
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("\"fine\" is not an outcome; give success"),
        "{stderr}"
    );
}

/// `record open --root R [--id ID] --owner PID`, its exit code, its one answer or error
/// object, and its stderr.
fn open_record(root: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let output = binary()
        .args(["record", "open", "--json-errors", "--root"])
        .arg(root)
        .args(args)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (
        output.status.code(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn record_open_makes_a_new_owned_record_points_latest_at_it_and_closes_abandoned_ones() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = Fixture::new();
    // A build whose front end was killed a moment ago: the next open closes it.
    build(&fixture, "20261125-141502-0000aa", false, 0, b"k");
    own(&fixture, "20261125-141502-0000aa", 1, Duration::ZERO);
    let me = std::process::id().to_string();
    let (code, opened, stderr) = open_record(&fixture.root, &["--owner", &me]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(opened["type"], "record_opened");
    assert_eq!(opened["version"], 1);
    let id = opened["id"].as_str().expect("an id").to_string();
    assert!(contractor_protocol::hosted::is_build_id(&id), "{id}");
    let dir = fixture
        .root
        .canonicalize()
        .expect("root")
        .join("builds")
        .join(&id);
    assert_eq!(opened["dir"], dir.to_str().expect("utf-8"));
    let mode = std::fs::metadata(&dir)
        .expect("the record")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o755,
        0o755,
        "readable by libvirt's QEMU user: {mode:o}"
    );
    let owner: contractor_protocol::process::Owner =
        serde_json::from_slice(&std::fs::read(dir.join("owner.json")).expect("owner.json"))
            .expect("an owner");
    assert_eq!(owner.pid, std::process::id());
    assert!(owner.is_alive(), "it names this live process: {owner:?}");
    assert_eq!(
        std::fs::read_link(fixture.root.join("latest")).expect("latest"),
        Path::new("builds").join(&id)
    );
    assert!(
        fixture
            .root
            .join("builds/20261125-141502-0000aa/result.json")
            .is_file(),
        "the abandoned record was closed"
    );
    // The new record runs while its owner lives: another open leaves it alone.
    let (code, again, stderr) = open_record(&fixture.root, &["--owner", &me]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_ne!(again["id"], opened["id"]);
    assert!(!dir.join("result.json").exists());
    assert!(dir.join("owner.json").exists());
}

#[test]
fn record_open_refuses_a_malformed_or_taken_id_and_an_owner_that_is_gone_naming_them() {
    let fixture = Fixture::new();
    let me = std::process::id().to_string();
    let id = "20261125-141502-3fa2c1";
    let (code, opened, stderr) = open_record(&fixture.root, &["--id", id, "--owner", &me]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(opened["id"], id);

    let (code, error, _) = open_record(&fixture.root, &["--id", id, "--owner", &me]);
    assert_eq!(code, Some(2));
    assert_eq!(error["code"], "record_exists");
    let chain = error["chain"].to_string();
    assert!(
        chain.contains(&format!("build {id} has a record already")),
        "{chain}"
    );

    for bad in ["../../etc", "20261125-141502-3FA2C1", "x"] {
        let (code, error, _) = open_record(&fixture.root, &["--id", bad, "--owner", &me]);
        assert_eq!(code, Some(2), "{bad}");
        assert_eq!(error["code"], "bad_build", "{bad}");
        let chain = error["chain"][0].as_str().expect("a message");
        assert!(chain.contains(&format!("{bad:?} is not valid")), "{chain}");
    }
    assert!(!fixture.root.join("etc").exists());

    // A pid no process has (above the kernel's largest).
    let (code, error, _) = open_record(&fixture.root, &["--owner", "4194305"]);
    assert_eq!(code, Some(2));
    assert_eq!(error["code"], "bad_owner");
    assert!(error["chain"][0]
        .as_str()
        .expect("a message")
        .contains("--owner 4194305"));
    assert_eq!(
        std::fs::read_dir(fixture.root.join("builds"))
            .expect("builds")
            .count(),
        1,
        "nothing was opened for the refused requests"
    );
}

#[test]
fn record_close_writes_the_kept_vm_and_forget_vm_removes_it() {
    use contractor_protocol::store::{KeptVm, KEPT_VM_FILE};
    let fixture = Fixture::new();
    let kept = KeptVm {
        name: "contractor-20261125-141502-000040".into(),
        uri: "qemu:///system".into(),
        control_socket: "/run/x/control.sock".into(),
    };
    let json = serde_json::to_string(&kept).expect("json");
    let file = fixture.root.join("kept.json");
    std::fs::write(&file, &json).expect("write");
    // As JSON, and as a file holding it.
    let given = [json.clone(), file.display().to_string()];
    for (n, given) in given.iter().enumerate() {
        let id = format!("20261125-141502-00004{n}");
        fixture.write(&format!("builds/{id}/build.log"), b"log");
        let flag = format!("--kept-vm={given}");
        let ended = ["--outcome", "failed", "--exit-code", "1", &flag];
        let out = close_record_with(&fixture.root, &id, &[], &ended, "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record = fixture.root.join("builds").join(&id);
        let written: KeptVm =
            serde_json::from_slice(&std::fs::read(record.join(KEPT_VM_FILE)).expect("vm.json"))
                .expect("a KeptVm");
        assert_eq!(written, kept);
        // What `contractor shell ID` reads back.
        let (ok, shown, stderr) = run(
            &["record", "show", "--kept-vm", "--build", &id],
            &fixture.root,
        );
        assert!(ok, "{stderr}");
        assert_eq!(shown["kept_vm"]["name"], kept.name.as_str());

        // Once the VM is gone; twice is fine.
        for _ in 0..2 {
            let (ok, answer, stderr) = run(&["record", "forget-vm", "--build", &id], &fixture.root);
            assert!(ok, "{stderr}");
            assert_eq!(answer["type"], "kept_vm_forgotten");
            assert_eq!(answer["id"], id.as_str());
            assert!(!record.join(KEPT_VM_FILE).exists());
        }
    }

    // Not a kept VM: refused before anything is written, naming what is wrong.
    let id = "20261125-141502-000049";
    fixture.write(&format!("builds/{id}/build.log"), b"log");
    for bad in [
        r#"{"name":"x"}"#.to_string(),
        "/nonexistent/kept.json".to_string(),
    ] {
        let flag = format!("--kept-vm={bad}");
        let out = close_record_with(&fixture.root, id, &[], &["--outcome", "failed", &flag], "");
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--kept-vm"), "{stderr}");
        assert!(stderr.contains("kept VM"), "{stderr}");
        assert!(!fixture
            .root
            .join(format!("builds/{id}/result.json"))
            .exists());
    }
    let (ok, answer, _) = run(
        &["record", "forget-vm", "--json-errors", "--build", "../x"],
        &fixture.root,
    );
    assert!(!ok);
    assert_eq!(answer["code"], "record_not_open", "{answer}");
}
