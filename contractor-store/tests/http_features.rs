//! Range requests, ETags and conditional GETs, verified uploads and JSON listings, against
//! the real binary.

mod util;

use serde_json::Value;
use sha2::Digest;
use util::{Fixture, StoreProcess};

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn base64(data: &[u8]) -> String {
    contractor_store::digest::base64_encode(data)
}

#[test]
fn a_single_range_is_served_as_partial_content() {
    let fixture = Fixture::new();
    let contents = util::pattern(3, 300_000); // larger than the pre-read size
    fixture.write("big", &contents);
    fixture.write("small", &contents[..1000]);
    let store = StoreProcess::start(&fixture.root);

    for (path, len) in [("/big", 300_000usize), ("/small", 1000)] {
        let cases = [
            ("bytes=0-99", 0, 99),
            ("bytes=500-", 500, len - 1),
            ("bytes=-10", len - 10, len - 1),
            ("bytes=10-999999999", 10, len - 1),
        ];
        for (range, start, end) in cases {
            let response = store.request(&format!("GET {path} HTTP/1.1\r\nRange: {range}"), b"");
            assert_eq!(response.status, 206, "{path} {range}");
            assert_eq!(
                response.header("content-range"),
                Some(format!("bytes {start}-{end}/{len}").as_str()),
                "{path} {range}"
            );
            assert_eq!(
                response.header("content-length"),
                Some((end - start + 1).to_string().as_str())
            );
            assert!(
                response.body == contents[start..=end],
                "{path} {range}: body differs"
            );
        }
    }
}

#[test]
fn an_unsatisfiable_range_is_416_and_other_ranges_get_the_whole_file() {
    let fixture = Fixture::new();
    fixture.write("f", b"0123456789");
    let store = StoreProcess::start(&fixture.root);

    let response = store.request("GET /f HTTP/1.1\r\nRange: bytes=10-20", b"");
    assert_eq!(response.status, 416);
    assert_eq!(response.header("content-range"), Some("bytes */10"));
    assert!(response.text().contains("10 bytes"), "{}", response.text());

    for range in ["bytes=0-1,4-5", "lines=1-2", "bytes=5-2"] {
        let response = store.request(&format!("GET /f HTTP/1.1\r\nRange: {range}"), b"");
        assert_eq!(response.status, 200, "{range}");
        assert_eq!(response.body, b"0123456789");
    }
    let head = store.request("HEAD /f HTTP/1.1\r\nRange: bytes=2-3", b"");
    assert_eq!(head.status, 206);
    assert_eq!(head.header("content-length"), Some("2"));
    assert!(head.body.is_empty());
}

#[test]
fn etag_and_if_none_match_give_304_until_the_file_changes() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    assert_eq!(store.put("/builds/b/artifacts/x", b"one").status, 201);

    let first = store.get("/builds/b/artifacts/x");
    let etag = first.header("etag").expect("etag").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong: {etag}"
    );
    assert_eq!(first.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        store.head("/builds/b/artifacts/x").header("etag"),
        Some(etag.as_str())
    );

    let again = store.request(
        &format!("GET /builds/b/artifacts/x HTTP/1.1\r\nIf-None-Match: {etag}"),
        b"",
    );
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));

    // Same length, new content: a new version, so a new tag and a full answer.
    assert_eq!(store.put("/builds/b/artifacts/x", b"two").status, 204);
    let changed = store.request(
        &format!("GET /builds/b/artifacts/x HTTP/1.1\r\nIf-None-Match: {etag}"),
        b"",
    );
    assert_eq!(changed.status, 200);
    assert_eq!(changed.body, b"two");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));

    // If-Range with the old tag: the range is ignored and the whole new file is sent.
    let stale = store.request(
        &format!("GET /builds/b/artifacts/x HTTP/1.1\r\nRange: bytes=0-0\r\nIf-Range: {etag}"),
        b"",
    );
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, b"two");
}

#[test]
fn put_with_a_matching_digest_is_kept_and_a_mismatch_keeps_nothing() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let body = util::pattern(11, 2_500_000);
    let good = sha256_hex(&body);

    let response = store.request(
        &format!(
            "PUT /builds/b/artifacts/ok HTTP/1.1\r\nContent-Length: {}\r\nX-Content-SHA256: {good}",
            body.len()
        ),
        &body,
    );
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(response.header("x-content-sha256"), Some(good.as_str()));
    assert!(std::fs::read(fixture.root.join("builds/b/artifacts/ok")).expect("read") == body);

    let wrong = sha256_hex(b"something else");
    let response = store.request(
        &format!(
            "PUT /builds/b/artifacts/bad HTTP/1.1\r\nContent-Length: {}\r\nX-Content-SHA256: {wrong}",
            body.len()
        ),
        &body,
    );
    assert_eq!(response.status, 400);
    assert!(response.text().contains(&good) && response.text().contains(&wrong));
    assert!(response.text().contains("nothing was stored"));

    // Digest header (base64), mismatching, over an existing file: the old file stays.
    let digest = base64(&sha2::Sha256::digest(b"not this"));
    let response = store.request(
        &format!(
            "PUT /builds/b/artifacts/ok HTTP/1.1\r\nContent-Length: 3\r\nDigest: sha-256={digest}"
        ),
        b"new",
    );
    assert_eq!(response.status, 400);
    assert!(std::fs::read(fixture.root.join("builds/b/artifacts/ok")).expect("read") == body);

    let digest = base64(&sha2::Sha256::digest(b"new"));
    let response = store.request(
        &format!(
            "PUT /builds/b/artifacts/ok HTTP/1.1\r\nContent-Length: 3\r\nDigest: sha-256={digest}"
        ),
        b"new",
    );
    assert_eq!(response.status, 204);
    assert_eq!(fixture.files(), ["builds/b/artifacts/ok"]);

    let response = store.request(
        "PUT /builds/b/artifacts/x HTTP/1.1\r\nContent-Length: 1\r\nX-Content-SHA256: xyz",
        b"x",
    );
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("64 hex digits"),
        "{}",
        response.text()
    );
}

#[test]
fn cas_blobs_must_hash_to_their_name() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let name = sha256_hex(b"blob");
    let response = store.put(&format!("/cas/sha256/{name}"), b"blob");
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(store.get(&format!("/cas/sha256/{name}")).body, b"blob");

    let other = sha256_hex(b"other");
    let response = store.put(&format!("/cas/sha256/{other}"), b"blob");
    assert_eq!(response.status, 400);
    let response = store.put("/cas/sha256/not-a-hash", b"blob");
    assert_eq!(response.status, 403);
    assert!(
        response.text().contains("64 lower-case hex"),
        "{}",
        response.text()
    );
    let response = store.put("/cas/md5/abc", b"blob");
    assert_eq!(response.status, 403);
    assert_eq!(fixture.files(), [format!("cas/sha256/{name}")]);
}

#[test]
fn directories_are_listed_as_json() {
    let fixture = Fixture::new();
    fixture.write("builds/b/source.tar", b"tar");
    fixture.write("builds/b/inputs/dep", b"dependency");
    std::fs::create_dir_all(fixture.root.join("builds/b/artifacts")).expect("mkdir");
    std::os::unix::fs::symlink("source.tar", fixture.root.join("builds/b/link")).expect("ln");
    fixture.write("builds/b/.contractor-upload-1-1", b"in flight");
    let store = StoreProcess::start(&fixture.root);

    for request in [
        "GET /builds/b/?json HTTP/1.1".to_string(),
        "GET /builds/b?json HTTP/1.1".to_string(),
        "GET /builds/b/ HTTP/1.1\r\nAccept: application/json".to_string(),
    ] {
        let response = store.request(&request, b"");
        assert_eq!(response.status, 200, "{request}: {}", response.text());
        assert_eq!(response.header("content-type"), Some("application/json"));
        let listing: Value = serde_json::from_slice(&response.body).expect("json");
        assert_eq!(listing["path"], "/builds/b/");
        let entries = listing["entries"].as_array().expect("entries");
        let names: Vec<_> = entries.iter().map(|e| e["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                Some("artifacts"),
                Some("inputs"),
                Some("link"),
                Some("source.tar")
            ],
            "sorted, temp files left out"
        );
        assert_eq!(entries[0]["type"], "directory");
        assert_eq!(entries[2]["type"], "symlink");
        assert_eq!(entries[3]["type"], "file");
        assert_eq!(entries[3]["size"], 3);
        assert_eq!(entries[3]["sha256"], sha256_hex(b"tar"));
        assert!(entries[0].get("sha256").is_none());
    }
    let root: Value =
        serde_json::from_slice(&store.get("/?json").body).expect("root listing is json");
    assert_eq!(root["path"], "/");
    assert_eq!(root["entries"][0]["name"], "builds");
    // A file asked for as JSON is still the file; a missing directory is 404; without the
    // JSON request a directory is still not served.
    assert_eq!(store.get("/builds/b/source.tar?json").body, b"tar");
    assert_eq!(store.get("/builds/nope/?json").status, 404);
    assert_eq!(store.get("/builds/b").status, 404);
}

#[test]
fn listings_do_not_follow_symlinks_out_of_the_store() {
    let fixture = Fixture::new();
    std::os::unix::fs::symlink(fixture.dir.path(), fixture.root.join("out")).expect("ln");
    let store = StoreProcess::start(&fixture.root);
    let response = store.get("/out/?json");
    assert_eq!(response.status, 403);
    assert!(!response.text().contains("secret"), "{}", response.text());
}
