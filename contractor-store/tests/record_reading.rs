//! `contractor-store record list|show|downloads|log|source` against real directories: what
//! the front end's `contractor builds|show|downloads|log|pin` render, and the source
//! `contractor rebuild` builds. Each answer is checked
//! against the wire types, ids are checked, a missing or malformed id is refused naming it,
//! a link in a record is refused, and each read is bounded.

mod util;

use std::path::Path;

use contractor_protocol::error::ErrorObject;
use contractor_protocol::proxy::Download;
use contractor_protocol::result::{BuildResult, Outcome};
use contractor_protocol::store::{
    RecordDownloads, RecordEntry, RecordList, RecordLog, RecordShown, RecordSource,
};
use util::{binary, Fixture};

const OLD: &str = "20261125-100000-aaaaaa";
const NEW: &str = "20261125-110000-bbbbbb";

/// Runs `record ARGS --root ROOT --json-errors`: exit code, stdout, stderr.
fn record(root: &Path, args: &[&str]) -> (i32, Vec<u8>, String) {
    let output = binary()
        .arg("--json-errors")
        .arg("record")
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run contractor-store");
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn lines(stdout: &[u8]) -> Vec<&[u8]> {
    stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect()
}

fn error_of(stdout: &[u8]) -> ErrorObject {
    serde_json::from_slice(lines(stdout)[0]).expect("an error object")
}

fn result(fixture: &Fixture, id: &str, outcome: Outcome, artifacts: &[&str]) {
    let dir = fixture.root.join("builds").join(id);
    let result = BuildResult {
        version: 1,
        id: id.into(),
        outcome,
        exit_code: Some(0),
        duration_secs: 2.5,
        log: dir.join("build.log"),
        console_log: dir.join("console.log"),
        artifacts: artifacts
            .iter()
            .map(|a| dir.join("artifacts").join(a))
            .collect(),
        refused_hosts: vec![],
        refused_offline: vec![],
        upstream_failures: vec![],
        limit: None,
        error: None,
        host: None,
    };
    fixture.write(
        &format!("builds/{id}/result.json"),
        &serde_json::to_vec(&result).expect("json"),
    );
}

const DOWNLOAD: &str = r#"{"type":"download","time":1764700000.123,"method":"GET","url":"http://deb.debian.org/x.deb","status":200,"size":3,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","complete":true,"from_cache":true,"phase":"fetch"}"#;

/// Two builds: the old one finished with two artifacts (one indexed, one not), downloads
/// and logs; the new one still running.
fn two_builds() -> Fixture {
    let fixture = Fixture::new();
    fixture.write(&format!("builds/{OLD}/build.log"), b"old log\n");
    fixture.write(&format!("builds/{OLD}/console.log"), b"console\n");
    fixture.write(&format!("builds/{OLD}/artifacts/a.txt"), b"hello");
    fixture.write(&format!("builds/{OLD}/artifacts/bin/tool"), b"abc");
    fixture.write(
        &format!("builds/{OLD}/artifacts.json"),
        br#"{"version":1,"build":"b","artifacts":[{"path":"a.txt","size":5,"sha256":"from-the-index","executable":false}]}"#,
    );
    fixture.write(
        &format!("builds/{OLD}/downloads.jsonl"),
        format!(
            "{DOWNLOAD}\n{}\n{{\"type\":\"cut\",\"limit\":1}}\nnot json\n",
            DOWNLOAD.replace(r#","from_cache":true"#, "")
        )
        .as_bytes(),
    );
    result(
        &fixture,
        OLD,
        Outcome::Success,
        &["a.txt", "bin/tool", "gone"],
    );
    fixture.write(&format!("builds/{NEW}/build.log"), b"new log\n");
    fixture
}

#[test]
fn list_names_every_build_oldest_first_running_or_ended() {
    let fixture = two_builds();
    // Not builds: a name that is no build id, a file, a link.
    fixture.write("builds/not a build/build.log", b"x");
    fixture.write("builds/20261125-120000-cccccc", b"a file");
    std::os::unix::fs::symlink(
        fixture.root.join("builds").join(OLD),
        fixture.root.join("builds/20261125-130000-dddddd"),
    )
    .expect("link");
    let (code, stdout, stderr) = record(&fixture.root, &["list"]);
    assert_eq!(code, 0, "{stderr}");
    let listed = lines(&stdout);
    let header: RecordList = serde_json::from_slice(listed[0]).expect("header");
    assert_eq!((header.builds, header.left_out), (2, 0));
    let entries: Vec<RecordEntry> = listed[1..]
        .iter()
        .map(|l| serde_json::from_slice(l).expect("entry"))
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].id, OLD);
    assert_eq!(entries[0].started.as_deref(), Some("2026-11-25 10:00:00"));
    assert_eq!(entries[0].outcome, Some(Outcome::Success));
    assert_eq!(entries[0].duration_secs, Some(2.5));
    assert_eq!(entries[1].id, NEW);
    assert_eq!((entries[1].outcome, entries[1].duration_secs), (None, None));

    // A store with no builds directory lists nothing.
    let empty = Fixture::new();
    let (code, stdout, _) = record(&empty.root, &["list"]);
    assert_eq!(code, 0);
    assert_eq!(
        lines(&stdout),
        [br#"{"type":"record_list","version":1,"builds":0,"left_out":0}"#]
    );
}

#[test]
fn show_gives_the_result_each_artifact_hashed_or_indexed_and_the_downloads_tally() {
    let fixture = two_builds();
    let (code, stdout, stderr) = record(&fixture.root, &["show", "--build", OLD]);
    assert_eq!(code, 0, "{stderr}");
    let shown: RecordShown = serde_json::from_slice(&stdout).expect("record_shown");
    assert_eq!(shown.id, OLD);
    assert_eq!(shown.dir, fixture.root.join("builds").join(OLD));
    assert_eq!(
        shown.result.as_ref().map(|r| r.outcome),
        Some(Outcome::Success)
    );
    let artifacts: Vec<(Option<u64>, Option<&str>)> = shown
        .artifacts
        .iter()
        .map(|a| (a.size, a.sha256.as_deref()))
        .collect();
    assert_eq!(
        artifacts,
        [
            // The index names it with its size: its digest is the index's.
            (Some(5), Some("from-the-index")),
            // Not indexed: hashed.
            (
                Some(3),
                Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            ),
            (None, None),
        ]
    );
    // Two download lines, one from the cache; the cut marker and a damaged line are not.
    assert_eq!((shown.downloads, shown.from_cache), (2, 1));

    // The newest by default: still running.
    let (code, stdout, _) = record(&fixture.root, &["show"]);
    assert_eq!(code, 0);
    let shown: RecordShown = serde_json::from_slice(&stdout).expect("record_shown");
    assert_eq!((shown.id.as_str(), shown.result), (NEW, None));
    assert!(shown.artifacts.is_empty(), "no index, no result");

    // A record without a result but with an index (a build host's, received): the index's
    // artifacts, sorted, and never one whose path would leave artifacts/.
    let entry =
        |path: &str| format!(r#"{{"path":"{path}","size":2,"sha256":"ix","executable":false}}"#);
    let index = format!(
        r#"{{"version":1,"build":"b","artifacts":[{},{},{}]}}"#,
        entry("z/b"),
        entry("a"),
        entry("../../etc/passwd")
    );
    fixture.write(&format!("builds/{NEW}/artifacts.json"), index.as_bytes());
    let (code, stdout, _) = record(&fixture.root, &["show"]);
    assert_eq!(code, 0);
    let shown: RecordShown = serde_json::from_slice(&stdout).expect("record_shown");
    let artifacts = fixture.root.join("builds").join(NEW).join("artifacts");
    let listed: Vec<_> = shown
        .artifacts
        .iter()
        .map(|a| (a.path.clone(), a.size, a.sha256.as_deref()))
        .collect();
    assert_eq!(
        listed,
        [
            (artifacts.join("a"), Some(2), Some("ix")),
            (artifacts.join("z/b"), Some(2), Some("ix")),
        ]
    );
}

#[test]
fn a_missing_or_malformed_build_is_refused_naming_it() {
    let empty = Fixture::new();
    for request in ["show", "downloads", "log"] {
        let (code, stdout, _) = record(&empty.root, &[request]);
        assert_eq!(code, 2, "{request}");
        let error = error_of(&stdout);
        assert_eq!(error.code.as_str(), "no_builds");
        assert!(
            error.chain[0].contains("run `contractor build` first"),
            "{error:?}"
        );
    }
    let fixture = two_builds();
    for request in ["show", "downloads", "log"] {
        let (code, stdout, stderr) = record(
            &fixture.root,
            &[request, "--build", "20261125-000000-ffffff"],
        );
        assert_eq!(code, 2, "{request}: {stderr}");
        let error = error_of(&stdout);
        assert_eq!(error.code.as_str(), "no_such_build");
        assert!(
            error.chain[0].contains("\"20261125-000000-ffffff\"")
                && error.chain[0].contains("`contractor builds` lists them"),
            "{error:?}"
        );
        for bad in ["../builds", "a/b", ".."] {
            let (code, stdout, _) = record(&fixture.root, &[request, "--build", bad]);
            assert_eq!(code, 2, "{request} {bad}");
            let error = error_of(&stdout);
            assert_eq!(error.code.as_str(), "bad_build");
            assert!(error.chain[0].contains(&format!("{bad:?}")), "{error:?}");
        }
    }
}

#[test]
fn a_link_in_a_record_is_refused_never_followed() {
    let fixture = two_builds();
    let outside = Fixture::new();
    outside.write("secret", b"not the record's");
    let old = fixture.root.join("builds").join(OLD);
    // The log, the result, the downloads: links refused, naming the file (exit 3).
    std::fs::remove_file(old.join("build.log")).expect("rm");
    std::os::unix::fs::symlink(outside.root.join("secret"), old.join("build.log")).expect("ln");
    let (code, stdout, _) = record(&fixture.root, &["log", "--build", OLD]);
    assert_eq!(code, 3);
    let error = error_of(&stdout);
    assert_eq!(error.code.as_str(), "record_read");
    assert!(error.chain[0].ends_with("build.log"), "{error:?}");
    assert!(error.chain[1].contains("symbolic link"), "{error:?}");
    std::fs::remove_file(old.join("downloads.jsonl")).expect("rm");
    std::os::unix::fs::symlink(outside.root.join("secret"), old.join("downloads.jsonl"))
        .expect("ln");
    let (code, stdout, _) = record(&fixture.root, &["downloads", "--build", OLD]);
    assert_eq!((code, error_of(&stdout).code.as_str()), (3, "record_read"));
    // An artifact that is a link is missing, never hashed through.
    std::fs::remove_file(old.join("artifacts/bin/tool")).expect("rm");
    std::os::unix::fs::symlink(outside.root.join("secret"), old.join("artifacts/bin/tool"))
        .expect("ln");
    let (code, stdout, _) = record(&fixture.root, &["show", "--build", OLD]);
    assert_eq!(code, 0);
    let shown: RecordShown = serde_json::from_slice(&stdout).expect("record_shown");
    assert_eq!(shown.artifacts[1].sha256, None);
    std::fs::remove_file(old.join("result.json")).expect("rm");
    std::os::unix::fs::symlink(outside.root.join("secret"), old.join("result.json")).expect("ln");
    let (code, stdout, _) = record(&fixture.root, &["show", "--build", OLD]);
    assert_eq!((code, error_of(&stdout).code.as_str()), (3, "record_read"));
    // A record directory that is a link.
    std::os::unix::fs::symlink(
        &outside.root,
        fixture.root.join("builds/20261125-000000-eeeeee"),
    )
    .expect("ln");
    let (code, stdout, _) = record(
        &fixture.root,
        &["show", "--build", "20261125-000000-eeeeee"],
    );
    assert_eq!(code, 3);
    assert!(error_of(&stdout).chain[1].contains("symbolic link"));
}

#[test]
fn downloads_are_typed_lines_and_the_log_its_exact_bytes() {
    let fixture = two_builds();
    let (code, stdout, stderr) = record(&fixture.root, &["downloads", "--build", OLD]);
    assert_eq!(code, 0, "{stderr}");
    let listed = lines(&stdout);
    let header: RecordDownloads = serde_json::from_slice(listed[0]).expect("header");
    assert_eq!(
        (header.id.as_str(), header.downloads, header.skipped),
        (OLD, 2, 2)
    );
    let downloads: Vec<Download> = listed[1..]
        .iter()
        .map(|l| serde_json::from_slice(l).expect("a download"))
        .collect();
    assert_eq!(downloads.len(), 2);
    assert!(downloads[0].from_cache && !downloads[1].from_cache);

    let (code, stdout, _) = record(&fixture.root, &["log", "--build", OLD, "--console"]);
    assert_eq!(code, 0);
    let newline = stdout.iter().position(|b| *b == b'\n').expect("header");
    let header: RecordLog = serde_json::from_slice(&stdout[..newline]).expect("header");
    assert_eq!(header.bytes, 8);
    assert_eq!(&stdout[newline + 1..], b"console\n");
    // Its tail: the last lines only, counted; a count out of range is refused (exit 2).
    fixture.write(&format!("builds/{OLD}/console.log"), b"a\nb\nc\n");
    let (code, stdout, _) = record(
        &fixture.root,
        &["log", "--build", OLD, "--console", "--tail", "2"],
    );
    assert_eq!(code, 0);
    let newline = stdout.iter().position(|b| *b == b'\n').expect("header");
    let header: RecordLog = serde_json::from_slice(&stdout[..newline]).expect("header");
    assert_eq!((header.bytes, &stdout[newline + 1..]), (4, &b"b\nc\n"[..]));
    for bad in ["0", "1001"] {
        let (code, _, stderr) = record(&fixture.root, &["log", "--console", "--tail", bad]);
        assert_eq!(code, 2, "{stderr}");
    }
    // A build that has no downloads.jsonl (its proxy never ran): refused, naming it.
    let (code, stdout, _) = record(&fixture.root, &["downloads"]);
    assert_eq!(code, 3);
    let error = error_of(&stdout);
    assert_eq!(error.code.as_str(), "record_read");
    assert!(
        error.chain[0].ends_with(&format!("{NEW}/downloads.jsonl")),
        "{error:?}"
    );
}

#[test]
fn reads_are_bounded() {
    let fixture = two_builds();
    // A result.json over its bound is refused, not read whole.
    let big = vec![b' '; (contractor_store::reading::MAX_RESULT_BYTES + 1) as usize];
    fixture.write(&format!("builds/{NEW}/result.json"), &big);
    let (code, stdout, _) = record(&fixture.root, &["show"]);
    assert_eq!(code, 3);
    let error = error_of(&stdout);
    assert!(
        error.chain[1].contains("bigger than 1048576 bytes"),
        "{error:?}"
    );
    // A downloads.jsonl over its bound (a sparse file: no disk used).
    let downloads = fixture
        .root
        .join("builds")
        .join(OLD)
        .join("downloads.jsonl");
    std::fs::File::options()
        .write(true)
        .open(&downloads)
        .and_then(|f| f.set_len(contractor_store::reading::MAX_DOWNLOADS_FILE + 1))
        .expect("grow");
    let (code, stdout, _) = record(&fixture.root, &["downloads", "--build", OLD]);
    assert_eq!(code, 3);
    assert!(error_of(&stdout).chain[1].contains("bigger than"));
    // A log over its bound (sparse too).
    let log = fixture.root.join("builds").join(OLD).join("build.log");
    std::fs::File::options()
        .write(true)
        .open(&log)
        .and_then(|f| f.set_len(contractor_store::reading::MAX_LOG_BYTES + 1))
        .expect("grow");
    let (code, stdout, _) = record(&fixture.root, &["log", "--build", OLD]);
    assert_eq!(code, 3);
    assert!(error_of(&stdout).chain[1].contains("bigger than"));
}

/// `record source`: the record's `source.tar` copied to a new file, confined; the newest
/// build's by default; a record without one, or a TAR that exists, is refused.
#[test]
fn source_is_copied_to_a_new_file_and_a_missing_one_is_refused() {
    let fixture = two_builds();
    fixture.write(&format!("builds/{OLD}/source.tar"), b"the old tar");
    let to = fixture.dir.path().join("copy.tar");
    let to_arg = to.to_str().expect("utf-8");
    let (code, stdout, stderr) = record(&fixture.root, &["source", "--build", OLD, "--to", to_arg]);
    assert_eq!(code, 0, "{stderr}");
    let answer: RecordSource = serde_json::from_slice(&stdout).expect("record_source");
    assert_eq!((answer.id.as_str(), answer.bytes), (OLD, 11));
    assert_eq!(answer.path, to);
    assert_eq!(std::fs::read(&to).expect("copy"), b"the old tar");

    // Never over an existing file: host failure, nothing read.
    let (code, stdout, _) = record(&fixture.root, &["source", "--build", OLD, "--to", to_arg]);
    assert_eq!(code, 3);
    assert_eq!(error_of(&stdout).code.as_str(), "source_copy");

    // The newest build has no source.tar: bad input, the file named.
    let other = fixture.dir.path().join("other.tar");
    let (code, stdout, _) = record(
        &fixture.root,
        &["source", "--to", other.to_str().expect("utf-8")],
    );
    assert_eq!(code, 2);
    let error = error_of(&stdout);
    assert_eq!(error.code.as_str(), "no_source");
    assert!(
        error.chain[0].ends_with(&format!(
            "{NEW}/source.tar: a rebuild builds the record's own packed source"
        )),
        "{:?}",
        error.chain
    );
}
