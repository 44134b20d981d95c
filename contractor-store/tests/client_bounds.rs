//! What one client can hold of the store, against the real binary: an upload whose body
//! stops arriving is cut after `--body-idle-timeout` (nothing kept), and connections over
//! `--max-connections` are answered 503 and closed.

mod util;

use std::io::{Read, Write};

use util::{binary, read_response, send_head, temp_files, Fixture, StoreProcess};

fn start_with(root: &std::path::Path, args: &[&str]) -> StoreProcess {
    let mut command = binary();
    command.args(["serve", "--root"]).arg(root).args(args);
    StoreProcess::spawn(command)
}

#[test]
fn an_upload_whose_body_stalls_is_cut_and_leaves_nothing() {
    let fixture = Fixture::new();
    let store = start_with(&fixture.root, &["--body-idle-timeout", "1s"]);
    let artifacts = fixture.root.join("builds/b/artifacts");
    std::fs::create_dir_all(&artifacts).expect("mkdir");

    // 1000 bytes declared, 10 sent, then nothing (the connection stays open).
    let mut stream = store.connect();
    send_head(
        &mut stream,
        "PUT /builds/b/artifacts/stalled HTTP/1.1\r\nContent-Length: 1000",
    );
    stream.write_all(&[7u8; 10]).expect("send part of the body");
    store.wait_for_temp_file(&artifacts);

    let response = read_response(&mut stream);
    assert_eq!(response.status, 408, "{}", response.text());
    assert!(
        response.text().contains("nothing was kept"),
        "{}",
        response.text()
    );
    assert_eq!(response.header("connection"), Some("close"));
    assert!(!artifacts.join("stalled").exists(), "a partial artifact");
    assert_eq!(temp_files(&artifacts), Vec::<String>::new());

    // The store serves on; a body that keeps coming is stored whole.
    let response = store.put("/builds/b/artifacts/whole", b"all of it");
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(
        std::fs::read(artifacts.join("whole")).expect("stored"),
        b"all of it"
    );
}

#[test]
fn connections_over_the_cap_are_refused_until_one_ends() {
    let fixture = Fixture::new();
    fixture.write("file", b"content");
    let store = start_with(&fixture.root, &["--max-connections", "2"]);

    // Two connections, each served one request and kept open (keep-alive).
    let open = |store: &StoreProcess| {
        let mut stream = store.connect();
        stream
            .write_all(b"GET /file HTTP/1.1\r\nHost: store\r\n\r\n")
            .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"content") {
            let n = stream.read(&mut buf).expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        stream
    };
    let first = open(&store);
    let _second = open(&store);

    // The third is accepted after them: answered 503 at once, without a request.
    let mut third = store.connect();
    let response = read_response(&mut third);
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(
        response.header("content-length"),
        Some(response.body.len().to_string().as_str())
    );
    assert!(
        response.text().contains("too many connections"),
        "{}",
        response.text()
    );

    // Once one ends, a new connection is served again (the store notices the close a
    // moment later: ask until it has).
    drop(first);
    // A refused connection may also see a reset instead of the 503 when its request
    // arrives as it is closed.
    let mut served = None;
    for _ in 0..500 {
        let mut stream = store.connect();
        let _ = stream.write_all(b"GET /file HTTP/1.1\r\nHost: store\r\nConnection: close\r\n\r\n");
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        if raw.starts_with(b"HTTP/1.1 200") {
            served = Some(raw);
            break;
        }
        assert!(
            raw.is_empty() || raw.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let raw = served.expect("a closed connection's place was never given back");
    assert!(raw.ends_with(b"\r\n\r\ncontent"), "{raw:?}");
}

#[test]
fn bad_bounds_are_refused_naming_the_flag() {
    let fixture = Fixture::new();
    for (flag, value, says) in [
        ("--body-idle-timeout", "0s", "at least 1s"),
        ("--body-idle-timeout", "10", "10"),
        ("--max-connections", "0", "--max-connections"),
    ] {
        let out = binary()
            .args(["serve", "--root"])
            .arg(&fixture.root)
            .args([flag, value])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}
