//! Size limits (413) and a full disk (507), against the real binary.

mod util;

use std::process::Command;

use util::{binary, temp_files, Fixture, StoreProcess};

fn start_with(root: &std::path::Path, args: &[&str]) -> StoreProcess {
    let mut command = binary();
    command.args(["serve", "--root"]).arg(root).args(args);
    StoreProcess::spawn(command)
}

/// `body` as one chunk of a chunked request body, then the final chunk.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

#[test]
fn an_artifact_over_the_limit_is_413_naming_the_limit_and_nothing_is_kept() {
    let fixture = Fixture::new();
    let store = start_with(&fixture.root, &["--max-artifact-bytes", "1000"]);

    let response = store.put("/builds/b/artifacts/big", &[1u8; 1001]);
    assert_eq!(response.status, 413);
    assert!(
        response.text().contains("at most 1000 bytes"),
        "{}",
        response.text()
    );
    assert!(response.text().contains("--max-artifact-bytes"));

    // Without a declared length the store counts as the body arrives.
    let response = store.request(
        "PUT /builds/b/artifacts/big HTTP/1.1\r\nTransfer-Encoding: chunked",
        &chunked(&[2u8; 5000]),
    );
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(temp_files(&fixture.root.join("builds/b/artifacts")).is_empty());
    assert!(fixture.files().is_empty(), "{:?}", fixture.files());

    assert_eq!(
        store.put("/builds/b/artifacts/fits", &[3u8; 1000]).status,
        201
    );
    assert_eq!(fixture.files(), ["builds/b/artifacts/fits"]);
}

/// What a file or directory costs at least against a build's total (the store's
/// `ENTRY_COST`, one block).
const BLOCK: usize = 4096;

#[test]
fn a_build_over_its_total_is_413_and_replacing_a_file_frees_its_bytes() {
    let fixture = Fixture::new();
    fixture.write("builds/b/artifacts/before", &[0u8; 500]);
    let limit = (6 * BLOCK).to_string();
    let store = start_with(&fixture.root, &["--max-build-bytes", &limit]);

    // `before` counts one block, `one` another.
    assert_eq!(
        store.put("/builds/b/artifacts/one", &[1u8; BLOCK]).status,
        201
    );
    let response = store.put("/builds/b/artifacts/two", &[2u8; 4 * BLOCK + 1]);
    assert_eq!(response.status, 413);
    assert!(
        response.text().contains(&format!("at most {limit} bytes")),
        "{}",
        response.text()
    );
    assert!(response.text().contains("--max-build-bytes"));
    let response = store.request(
        "PUT /builds/b/artifacts/two HTTP/1.1\r\nTransfer-Encoding: chunked",
        &chunked(&[2u8; 4 * BLOCK + 1]),
    );
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(!fixture.root.join("builds/b/artifacts/two").exists());

    // Replacing `one` with a smaller file makes room.
    assert_eq!(
        store.put("/builds/b/artifacts/one", &[1u8; 400]).status,
        204
    );
    assert_eq!(
        store
            .put("/builds/b/artifacts/two", &[2u8; 3 * BLOCK])
            .status,
        201
    );
    // Even an empty file costs a block.
    assert_eq!(store.put("/builds/b/artifacts/empty", b"").status, 201);
    assert_eq!(store.put("/builds/b/artifacts/three", b"").status, 413);
    // Another build has its own total (its artifacts/ directory costs a block too).
    let five_blocks = vec![0u8; 5 * BLOCK];
    assert_eq!(store.put("/builds/c/artifacts/x", &five_blocks).status, 201);
    assert!(temp_files(&fixture.root.join("builds/b/artifacts")).is_empty());
}

#[test]
fn empty_files_in_deep_trees_count_their_directories_and_depth_is_capped() {
    let fixture = Fixture::new();
    let limit = (20 * BLOCK).to_string();
    let store = start_with(&fixture.root, &["--max-build-bytes", &limit]);
    // artifacts/ + 8 directories + the file: 10 blocks, for an empty file.
    let deep = "/builds/b/artifacts/1/2/3/4/5/6/7/8/f";
    assert_eq!(store.put(deep, b"").status, 201);
    // Another 10 blocks fit exactly (9 new directories and the file) …
    assert_eq!(
        store
            .put("/builds/b/artifacts/a/b/c/d/e/f/g/h/i/f", b"")
            .status,
        201
    );
    // … and then not even one more empty directory with an empty file.
    let response = store.put("/builds/b/artifacts/z/f", b"");
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(
        response.text().contains("each directory 4096"),
        "{}",
        response.text()
    );
    assert!(!fixture.root.join("builds/b/artifacts/z").exists());

    let too_deep = format!("/builds/d/artifacts/{}f", "d/".repeat(32));
    let response = store.put(&too_deep, b"");
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(
        response.text().contains("at most 32 levels deep"),
        "{}",
        response.text()
    );
    assert!(!fixture.root.join("builds/d").exists());
}

#[test]
fn sizes_with_units_are_accepted_and_bad_ones_named() {
    let fixture = Fixture::new();
    let output = binary()
        .args(["serve", "--max-build-bytes", "12X", "--root"])
        .arg(&fixture.root)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--max-build-bytes") && stderr.contains("\"12X\""),
        "{stderr}"
    );
    let store = start_with(&fixture.root, &["--max-artifact-bytes", "1K"]);
    assert_eq!(store.put("/builds/b/artifacts/x", &[0u8; 1024]).status, 201);
    assert_eq!(store.put("/builds/b/artifacts/y", &[0u8; 1025]).status, 413);
}

/// Runs the store in its own user and mount namespace on a 1 MiB tmpfs, so that the disk
/// really fills up.
fn start_on_tiny_disk(root: &std::path::Path) -> StoreProcess {
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(root)
        .arg(env!("CARGO_BIN_EXE_contractor-store"))
        .args(["serve", "--root"])
        .arg(root);
    StoreProcess::spawn(command)
}

#[test]
fn a_full_disk_is_507_and_keeps_what_was_stored() {
    let fixture = Fixture::new();
    let store = start_on_tiny_disk(&fixture.root);
    let first = util::pattern(1, 300_000);
    assert_eq!(store.put("/builds/b/artifacts/first", &first).status, 201);

    let response = store.put("/builds/b/artifacts/huge", &util::pattern(2, 2_000_000));
    assert_eq!(response.status, 507, "{}", response.text());
    assert!(
        response.text().contains("disk is full"),
        "{}",
        response.text()
    );

    // Replacing the stored file with something too big fails the same way and keeps it.
    let response = store.put("/builds/b/artifacts/first", &util::pattern(3, 2_000_000));
    assert_eq!(response.status, 507, "{}", response.text());
    assert!(store.get("/builds/b/artifacts/first").body == first);

    let listing: serde_json::Value =
        serde_json::from_slice(&store.get("/builds/b/artifacts/?json").body).expect("json");
    let names: Vec<_> = listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(names, ["first"], "no partial or temporary file remains");
    // Space was given back: a small upload works again.
    assert_eq!(store.put("/builds/b/artifacts/small", b"ok").status, 201);
}

#[test]
fn a_client_waiting_for_100_continue_is_refused_without_sending() {
    let fixture = Fixture::new();
    let store = start_with(&fixture.root, &["--max-artifact-bytes", "1000"]);
    // No body follows: the answer must be the 413, not "100 Continue".
    let response = store.request(
        "PUT /builds/b/artifacts/big HTTP/1.1\r\nContent-Length: 5000\r\nExpect: 100-continue",
        b"",
    );
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(fixture.files().is_empty());
}
