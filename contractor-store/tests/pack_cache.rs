//! `contractor-store pack` and `contractor-store cache ...` against the real binary: each
//! prints its one documented answer (read with the protocol's types, which reject unknown
//! fields), and a failure is an error object whose code and exit code say whose fault it is.

use std::path::Path;
use std::process::{Command, Output};

use contractor_protocol::error::ErrorObject;
use contractor_protocol::store::{CacheCleared, CacheKept, CacheList, CachePrepared, Packed};

fn store(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contractor-store"))
        .args(args)
        .arg("--json-errors")
        .output()
        .expect("run contractor-store")
}

fn answer<T: serde::de::DeserializeOwned>(args: &[&str]) -> T {
    let out = store(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one answer")
}

fn error(args: &[&str], exit: i32) -> ErrorObject {
    let out = store(args);
    assert_eq!(out.status.code(), Some(exit), "{args:?}");
    serde_json::from_slice(&out.stdout).expect("one error object")
}

/// `head` then `tail`.
fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn pack_writes_the_same_tar_twice_and_says_whose_fault_a_failure_is() {
    let project = tempfile::tempdir().expect("tempdir");
    let p = project.path();
    std::fs::create_dir_all(p.join("src")).expect("mkdir");
    std::fs::write(p.join("src/main.c"), "int main(){}").expect("write");
    std::fs::write(p.join("Makefile"), "all:\n").expect("write");
    let out = tempfile::tempdir().expect("tempdir");
    let (a, b) = (out.path().join("a.tar"), out.path().join("b.tar"));

    let packed: Packed = answer(&["pack", "--project", s(p), "--out", s(&a)]);
    assert_eq!((packed.entries, packed.warnings.len()), (3, 0));
    assert_eq!(packed.bytes, std::fs::metadata(&a).expect("tar").len());
    let _: Packed = answer(&["pack", "--project", s(p), "--out", s(&b)]);
    assert_eq!(
        std::fs::read(&a).expect("a"),
        std::fs::read(&b).expect("b"),
        "the same tree gives the same bytes"
    );

    let too_many = error(
        &[
            "pack",
            "--project",
            s(p),
            "--out",
            s(&a),
            "--max-entries",
            "2",
        ],
        2,
    );
    assert_eq!(too_many.code.as_str(), "source_too_many_entries");
    assert!(
        too_many.chain[0].contains("has more than 2 entries"),
        "{too_many:?}"
    );
    let missing = p.join("missing");
    let unreadable = error(&["pack", "--project", s(&missing), "--out", s(&a)], 2);
    assert_eq!(unreadable.code.as_str(), "source_unreadable");
    assert!(unreadable.chain[0].contains(s(&missing)), "{unreadable:?}");
    let nowhere = out.path().join("no/such/dir.tar");
    let host = error(&["pack", "--project", s(p), "--out", s(&nowhere)], 3);
    assert_eq!(host.code.as_str(), "source_pack");
}

#[test]
fn a_cache_is_prepared_kept_listed_and_cleared() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = s(root.path());
    let record = root.path().join("builds/b1");
    std::fs::create_dir_all(record.join("artifacts")).expect("mkdir");
    let path = ["--path", "/root/.kept"];

    let none: CachePrepared = answer(&[
        "cache",
        "prepare",
        "--root",
        r,
        "--build",
        "b1",
        "--max-bytes",
        "1M",
    ]);
    assert_eq!(none.cache, None);
    let prepared: CachePrepared = answer(&with(
        &[
            "cache",
            "prepare",
            "--root",
            r,
            "--build",
            "b1",
            "--max-bytes",
            "1M",
        ],
        &path,
    ));
    let job = prepared.cache.expect("a cache job");
    assert_eq!(job.save, "/builds/b1/artifacts/.contractor-cache.tar");
    assert_eq!((job.restore, job.max_bytes), (None, 1 << 20));

    std::fs::write(record.join("artifacts/.contractor-cache.tar"), "tar").expect("upload");
    let kept: CacheKept = answer(&with(
        &["cache", "keep", "--root", r, "--build", "b1", "--success"],
        &path,
    ));
    assert_eq!(kept.bytes, Some(3));
    let listed: CacheList = answer(&["cache", "list", "--root", r]);
    assert_eq!(listed.caches.len(), 1);
    let info = listed.caches[0].info.clone().expect("info");
    assert_eq!((info.build.as_str(), info.bytes), ("b1", 3));
    let cleared: CacheCleared = answer(&["cache", "clear", "--root", r]);
    assert_eq!(cleared.freed_bytes, 3);

    let bad = error(
        &[
            "cache",
            "prepare",
            "--root",
            r,
            "--build",
            "../b1",
            "--max-bytes",
            "1",
        ],
        2,
    );
    assert_eq!(bad.code.as_str(), "bad_build");
    let relative = error(
        &[
            "cache", "keep", "--root", r, "--build", "b1", "--path", "rel",
        ],
        2,
    );
    assert_eq!(relative.code.as_str(), "bad_cache_path");
}
