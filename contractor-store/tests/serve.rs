//! The store's basic contract, against the real binary: startup, GET, HEAD, PUT, other
//! methods, and shutdown on a signal.

mod util;

use std::io::Write;
use std::time::Duration;

use util::{binary, read_response, send_head, Fixture, StoreProcess};

#[test]
fn get_returns_exactly_the_file() {
    let fixture = Fixture::new();
    let contents = util::pattern(7, 100_003);
    fixture.write("builds/b1/source.tar", &contents);
    let store = StoreProcess::start(&fixture.root);

    let response = store.get("/builds/b1/source.tar");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(response.header("content-length"), Some("100003"));
    assert!(response.body == contents, "body differs from the file");
}

#[test]
fn get_of_an_empty_file_is_empty() {
    let fixture = Fixture::new();
    fixture.write("empty", b"");
    let store = StoreProcess::start(&fixture.root);
    let response = store.get("/empty");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("0"));
    assert!(response.body.is_empty());
}

#[test]
fn head_gives_the_length_and_no_body() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", &[1u8; 4321]);
    let store = StoreProcess::start(&fixture.root);

    let response = store.head("/builds/b1/source.tar");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("4321"));
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert!(response.body.is_empty());
}

#[test]
fn missing_files_and_directories_are_not_found() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", b"tar");
    let store = StoreProcess::start(&fixture.root);
    for path in [
        "/missing",
        "/builds/b1",
        "/builds",
        "/",
        "/builds/b1/source.tar/x",
    ] {
        assert_eq!(store.get(path).status, 404, "GET {path}");
        assert_eq!(store.head(path).status, 404, "HEAD {path}");
    }
}

#[test]
fn percent_encoded_names_are_served() {
    let fixture = Fixture::new();
    fixture.write("with space", b"spaced");
    let store = StoreProcess::start(&fixture.root);
    let response = store.get("/with%20space");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"spaced");
}

#[test]
fn put_under_artifacts_creates_the_file_then_replaces_it() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let contents = util::pattern(3, 12_345);

    let created = store.put("/builds/b1/artifacts/out/hello", &contents);
    assert_eq!(created.status, 201, "{}", created.text());
    let path = fixture.root.join("builds/b1/artifacts/out/hello");
    assert!(std::fs::read(&path).expect("artifact") == contents);

    let replaced = store.put("/builds/b1/artifacts/out/hello", b"second");
    assert_eq!(replaced.status, 204, "{}", replaced.text());
    assert_eq!(std::fs::read(&path).expect("artifact"), b"second");
    assert_eq!(fixture.files(), ["builds/b1/artifacts/out/hello"]);

    let fetched = store.get("/builds/b1/artifacts/out/hello");
    assert_eq!(fetched.body, b"second");
}

#[test]
fn chunked_put_is_accepted() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let head = "PUT /builds/b1/artifacts/chunked HTTP/1.1\r\nTransfer-Encoding: chunked";
    let response = store.request(head, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    assert_eq!(response.status, 201, "{}", response.text());
    let path = fixture.root.join("builds/b1/artifacts/chunked");
    assert_eq!(std::fs::read(path).expect("artifact"), b"hello world");
}

#[test]
fn put_outside_artifacts_is_forbidden_and_writes_nothing() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", b"original");
    let store = StoreProcess::start(&fixture.root);
    let refused = [
        "/evil",
        "/builds/b1/source.tar",
        "/builds/b1/artifacts",
        "/builds/b1/other/x",
        "/builds/bad%20id/artifacts/x",
        "/builds/a+b/artifacts/x",
        "/other/b1/artifacts/x",
    ];
    for path in refused {
        let response = store.put(path, b"overwritten");
        assert_eq!(response.status, 403, "PUT {path}");
        assert!(
            response.text().contains("/builds/<id>/artifacts/"),
            "{}",
            response.text()
        );
    }
    assert_eq!(fixture.files(), ["builds/b1/source.tar"]);
    assert_eq!(
        std::fs::read(fixture.root.join("builds/b1/source.tar")).expect("read"),
        b"original"
    );
}

#[test]
fn put_onto_a_directory_or_through_a_file_conflicts() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/artifacts/dir/inner", b"x");
    fixture.write("builds/b1/artifacts/file", b"x");
    let store = StoreProcess::start(&fixture.root);
    assert_eq!(store.put("/builds/b1/artifacts/dir", b"y").status, 409);
    assert_eq!(
        store.put("/builds/b1/artifacts/file/below", b"y").status,
        409
    );
    assert_eq!(
        fixture.files(),
        ["builds/b1/artifacts/dir/inner", "builds/b1/artifacts/file"]
    );
}

#[test]
fn other_methods_are_not_allowed() {
    let fixture = Fixture::new();
    fixture.write("f", b"x");
    let store = StoreProcess::start(&fixture.root);
    for method in ["POST", "DELETE", "OPTIONS", "PATCH"] {
        let response = store.request(&format!("{method} /f HTTP/1.1\r\nContent-Length: 0"), b"");
        assert_eq!(response.status, 405, "{method}");
        assert_eq!(response.header("allow"), Some("GET, HEAD, PUT"), "{method}");
    }
    assert!(fixture.root.join("f").exists());
}

#[test]
fn requests_are_logged_on_stderr() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    store.get("/nothing-here");
    store.wait_for_log("GET /nothing-here 404");
}

#[test]
fn missing_root_is_bad_input_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-store");
    let output = binary()
        .args(["serve", "--root"])
        .arg(&missing)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such-store") && stderr.contains("--root"),
        "{stderr}"
    );
}

#[test]
fn root_that_is_a_file_is_bad_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    let output = binary()
        .args(["serve", "--root"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("plain-file") && stderr.contains("not a directory"),
        "{stderr}"
    );
}

#[test]
fn unusable_listen_address_is_an_infrastructure_failure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = binary()
        .args(["serve", "--root"])
        .arg(dir.path())
        .args(["--listen", &addr])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&addr));
}

#[test]
fn sigint_stops_an_idle_store_with_success() {
    let fixture = Fixture::new();
    let mut store = StoreProcess::start(&fixture.root);
    store.signal("INT");
    assert!(store.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn sigterm_lets_an_upload_in_flight_finish() {
    let fixture = Fixture::new();
    let mut store = StoreProcess::start(&fixture.root);
    let mut stream = store.connect();
    send_head(
        &mut stream,
        "PUT /builds/b1/artifacts/late HTTP/1.1\r\nContent-Length: 10",
    );
    stream.write_all(b"first").expect("send");
    store.wait_for_temp_file(&fixture.root.join("builds/b1/artifacts"));

    store.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    stream
        .write_all(b"-last")
        .expect("send the rest after SIGTERM");
    let response = read_response(&mut stream);
    assert_eq!(response.status, 201, "{}", response.text());
    assert!(store.wait_exit(Duration::from_secs(5)).success());
    assert_eq!(
        std::fs::read(fixture.root.join("builds/b1/artifacts/late")).expect("read"),
        b"first-last"
    );
    assert!(
        std::net::TcpStream::connect(store.addr).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn put_with_a_mode_header_stores_an_executable_and_other_modes_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let head =
        "PUT /builds/b1/artifacts/tool HTTP/1.1\r\nContent-Length: 2\r\nX-Content-Mode: 0755";
    let response = store.request(head, b"#!");
    assert_eq!(response.status, 201, "{}", response.text());
    let stored = fixture.root.join("builds/b1/artifacts/tool");
    let mode = std::fs::metadata(&stored)
        .expect("stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    let head =
        "PUT /builds/b1/artifacts/setuid HTTP/1.1\r\nContent-Length: 2\r\nX-Content-Mode: 4755";
    let response = store.request(head, b"#!");
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("use 0644 or 0755"),
        "{}",
        response.text()
    );
    assert!(!fixture.root.join("builds/b1/artifacts/setuid").exists());
}

#[test]
fn a_store_limited_to_one_build_refuses_every_other_path() {
    let fixture = Fixture::new();
    fixture.write("builds/mine/source.tar", b"mine");
    fixture.write("builds/other/source.tar", b"other");
    fixture.write("cas/x", b"shared");
    let mut command = binary();
    command
        .args(["serve", "--only-build", "mine", "--root"])
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    assert_eq!(store.get("/builds/mine/source.tar").text(), "mine");
    for path in ["/builds/other/source.tar", "/cas/x", "/builds/mine"] {
        let response = store.get(path);
        assert_eq!(response.status, 403, "{path}");
        assert!(
            response.text().contains("serves only /builds/mine/"),
            "{}",
            response.text()
        );
    }
    let response = store.put("/builds/other/artifacts/x", b"nope");
    assert_eq!(response.status, 403);
    assert!(!fixture.root.join("builds/other/artifacts").exists());
    assert_eq!(store.put("/builds/mine/artifacts/x", b"ok").status, 201);
}

/// `serve --ready-fd 3` with descriptor 3 on a FIFO (as `3>FIFO` in sh): the ready line
/// comes there, alone, and the descriptor is closed after it while the store keeps serving;
/// stdout gets nothing.
#[test]
fn the_ready_line_goes_to_the_named_descriptor_which_then_ends() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", b"tar");
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("ready");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" serve --root \"$1\" --ready-fd 3 3>\"$2\"")
        .arg(env!("CARGO_BIN_EXE_contractor-store"))
        .arg(&fixture.root)
        .arg(&fifo)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the store");
    // Read to the end on a thread: without the close, the end would never come.
    let (sent, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let read = std::fs::File::open(&fifo)
            .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text));
        let _ = sent.send(read.map(|_| text));
    });
    let text = got
        .recv_timeout(Duration::from_secs(30))
        .expect("the descriptor ends after the ready line")
        .expect("read the FIFO");
    assert_eq!(text.lines().count(), 1, "{text}");
    let ready: contractor_protocol::service::Ready =
        serde_json::from_str(text.trim_end()).expect("a ready line");
    assert_eq!(ready.service, "store");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still serving"
    );
    let mut stream = std::net::TcpStream::connect(ready.addr).expect("connect");
    send_head(&mut stream, "GET /builds/b1/source.tar HTTP/1.1");
    assert_eq!(read_response(&mut stream).status, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

#[test]
fn a_ready_descriptor_that_is_not_open_is_refused_by_name() {
    let fixture = Fixture::new();
    let out = binary()
        .args(["serve", "--ready-fd", "9", "--json-errors", "--root"])
        .arg(&fixture.root)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"code\":\"bad_ready_fd\""), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ready-fd 9: descriptor 9 is not open"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
