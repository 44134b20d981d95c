//! Uploads are all or nothing: an interrupted upload leaves nothing behind, concurrent
//! uploads to one path leave exactly one whole body, and large bodies arrive intact.

mod util;

use std::io::Write;
use std::sync::{Arc, Barrier};

use sha2::{Digest, Sha256};
use util::{read_response, send_head, temp_files, Fixture, StoreProcess};

#[test]
fn interrupted_upload_leaves_no_file_and_no_temp_file() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let artifacts = fixture.root.join("builds/b1/artifacts");

    let mut stream = store.connect();
    send_head(
        &mut stream,
        "PUT /builds/b1/artifacts/partial HTTP/1.1\r\nContent-Length: 1000000",
    );
    stream.write_all(b"0123456789").expect("send");
    // The upload is under way: its temp file exists.
    store.wait_for_temp_file(&artifacts);
    drop(stream);

    // The access line is written once the handler has finished and cleaned up.
    store.wait_for_log("PUT /builds/b1/artifacts/partial");
    assert!(
        temp_files(&artifacts).is_empty(),
        "{:?}",
        temp_files(&artifacts)
    );
    assert!(!artifacts.join("partial").exists());
    assert!(fixture.files().is_empty(), "{:?}", fixture.files());

    // The store still works afterwards.
    assert_eq!(
        store.put("/builds/b1/artifacts/partial", b"whole").status,
        201
    );
}

#[test]
fn interrupted_replacement_keeps_the_old_file() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/artifacts/kept", b"old contents");
    let store = StoreProcess::start(&fixture.root);
    let artifacts = fixture.root.join("builds/b1/artifacts");

    let mut stream = store.connect();
    send_head(
        &mut stream,
        "PUT /builds/b1/artifacts/kept HTTP/1.1\r\nContent-Length: 1000000",
    );
    stream.write_all(b"new but short").expect("send");
    store.wait_for_temp_file(&artifacts);
    drop(stream);
    store.wait_for_log("PUT /builds/b1/artifacts/kept");
    assert_eq!(fixture.files(), ["builds/b1/artifacts/kept"]);
    assert_eq!(
        std::fs::read(artifacts.join("kept")).expect("read"),
        b"old contents"
    );
}

#[test]
fn concurrent_puts_to_one_path_leave_one_whole_body() {
    const SIZE: usize = 4 * 1024 * 1024;
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let bodies = [util::pattern(1, SIZE), util::pattern(2, SIZE)];
    let path = "/builds/b1/artifacts/contested";

    for _round in 0..3 {
        let barrier = Arc::new(Barrier::new(2));
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = bodies
                .iter()
                .map(|body| {
                    let barrier = Arc::clone(&barrier);
                    let mut stream = store.connect();
                    scope.spawn(move || {
                        let head = format!("PUT {path} HTTP/1.1\r\nContent-Length: {}", body.len());
                        send_head(&mut stream, &head);
                        barrier.wait();
                        // Interleave the two uploads chunk by chunk.
                        for chunk in body.chunks(64 * 1024) {
                            stream.write_all(chunk).expect("send");
                        }
                        read_response(&mut stream).status
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("uploader"))
                .collect()
        });
        assert!(
            statuses.iter().all(|s| *s == 201 || *s == 204),
            "{statuses:?}"
        );

        let stored =
            std::fs::read(fixture.root.join("builds/b1/artifacts/contested")).expect("read");
        assert!(
            stored == bodies[0] || stored == bodies[1],
            "stored file is a mix of both uploads"
        );
        assert_eq!(fixture.files(), ["builds/b1/artifacts/contested"]);
    }
}

#[test]
fn large_put_then_get_round_trips() {
    const SIZE: usize = 64 * 1024 * 1024;
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let body = util::pattern(64, SIZE);
    let sent = Sha256::digest(&body);

    let put = store.put("/builds/b1/artifacts/big.bin", &body);
    assert_eq!(put.status, 201, "{}", put.text());
    let on_disk = Sha256::digest(
        std::fs::read(fixture.root.join("builds/b1/artifacts/big.bin")).expect("read"),
    );
    assert_eq!(on_disk, sent);

    let got = store.get("/builds/b1/artifacts/big.bin");
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    assert_eq!(got.body.len(), SIZE);
    assert_eq!(Sha256::digest(&got.body), sent);
}
