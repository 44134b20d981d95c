//! Build tokens against the real binary: no token is 401, another build's files are 403,
//! a build's own inputs, artifacts and the shared cache are allowed; the token file is read
//! again when it changes.

mod util;

use util::{binary, Fixture, StoreProcess};

const TOKEN_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
const TOKEN_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";

fn start_with_tokens(fixture: &Fixture, tokens: &str) -> (StoreProcess, std::path::PathBuf) {
    let file = fixture.dir.path().join("tokens");
    std::fs::write(&file, tokens).expect("write tokens");
    let mut command = binary();
    command
        .args(["serve", "--token-file"])
        .arg(&file)
        .arg("--root")
        .arg(&fixture.root);
    (StoreProcess::spawn(command), file)
}

fn with_token(store: &StoreProcess, method: &str, path: &str, token: &str) -> util::HttpResponse {
    let body: &[u8] = if method == "PUT" { b"data" } else { b"" };
    let length = if method == "PUT" {
        "\r\nContent-Length: 4"
    } else {
        ""
    };
    store.request(
        &format!("{method} {path} HTTP/1.1\r\nAuthorization: Bearer {token}{length}"),
        body,
    )
}

fn inputs(fixture: &Fixture) {
    for build in ["a", "b"] {
        fixture.write(&format!("builds/{build}/source.tar"), build.as_bytes());
        fixture.write(&format!("builds/{build}/inputs/dep"), b"dep");
        fixture.write(&format!("builds/{build}/result.json"), b"{}");
    }
    fixture.write("cas/sha256/blob", b"cached");
}

#[test]
fn requests_without_a_valid_token_are_401() {
    let fixture = Fixture::new();
    inputs(&fixture);
    let (store, _) = start_with_tokens(&fixture, &format!("a {TOKEN_A}\n"));
    for response in [
        store.get("/builds/a/source.tar"),
        store.put("/builds/a/artifacts/x", b"x"),
        store.request(
            "GET /builds/a/source.tar HTTP/1.1\r\nAuthorization: Bearer wrongwrongwrongwrong",
            b"",
        ),
        store.request(
            &format!("GET /builds/a/source.tar HTTP/1.1\r\nAuthorization: Basic {TOKEN_A}"),
            b"",
        ),
    ] {
        assert_eq!(response.status, 401, "{}", response.text());
        assert!(response
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")));
    }
    assert!(!fixture.root.join("builds/a/artifacts").exists());
}

#[test]
fn a_token_reaches_only_its_own_build_and_the_cache() {
    let fixture = Fixture::new();
    inputs(&fixture);
    let (store, _) = start_with_tokens(&fixture, &format!("a {TOKEN_A}\nb {TOKEN_B}\n"));

    for path in [
        "/builds/a/source.tar",
        "/builds/a/inputs/dep",
        "/cas/sha256/blob",
    ] {
        let response = with_token(&store, "GET", path, TOKEN_A);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    let response = with_token(&store, "PUT", "/builds/a/artifacts/out", TOKEN_A);
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(
        with_token(&store, "GET", "/builds/a/artifacts/out", TOKEN_A).body,
        b"data"
    );

    for (method, path) in [
        ("GET", "/builds/b/source.tar"),
        ("GET", "/builds/b/inputs/dep"),
        ("GET", "/builds/a/result.json"),
        ("PUT", "/builds/b/artifacts/out"),
        ("PUT", "/builds/a/inputs/dep"),
        (
            "PUT",
            "/cas/sha256/3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7",
        ),
    ] {
        let response = with_token(&store, method, path, TOKEN_A);
        assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
        assert!(
            response.text().contains("token of build a"),
            "{}",
            response.text()
        );
    }
    assert!(!fixture.root.join("builds/b/artifacts").exists());
    assert_eq!(
        std::fs::read(fixture.root.join("builds/a/inputs/dep")).expect("read"),
        b"dep"
    );
    // B's token works for B.
    assert_eq!(
        with_token(&store, "GET", "/builds/b/source.tar", TOKEN_B).body,
        b"b"
    );
}

#[test]
fn a_token_added_to_the_file_is_accepted_without_a_restart() {
    let fixture = Fixture::new();
    inputs(&fixture);
    let (store, file) = start_with_tokens(&fixture, &format!("a {TOKEN_A}\n"));
    assert_eq!(
        with_token(&store, "GET", "/builds/b/source.tar", TOKEN_B).status,
        401
    );

    // The `token` subcommand appends a fresh random token.
    let output = binary()
        .args(["token", "--build", "b", "--token-file"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert_eq!(token.len(), 64);
    // Make sure the file's modification time moves even on a coarse clock.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    std::fs::File::options()
        .append(true)
        .open(&file)
        .and_then(|f| f.set_modified(later))
        .expect("touch");

    assert_eq!(
        with_token(&store, "GET", "/builds/b/source.tar", &token).body,
        b"b"
    );
    assert_eq!(
        with_token(&store, "GET", "/builds/a/source.tar", TOKEN_A).status,
        200
    );
}

#[test]
fn a_bad_token_file_is_bad_input_naming_the_line() {
    let fixture = Fixture::new();
    let file = fixture.dir.path().join("tokens");
    std::fs::write(&file, "# tokens\na short\n").expect("write");
    let output = binary()
        .args(["serve", "--token-file"])
        .arg(&file)
        .arg("--root")
        .arg(&fixture.root)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2), "bad input");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("at least 16"), "{stderr}");
}

#[test]
fn tokens_and_only_build_narrow_together() {
    let fixture = Fixture::new();
    inputs(&fixture);
    let file = fixture.dir.path().join("tokens");
    std::fs::write(&file, format!("a {TOKEN_A}\nb {TOKEN_B}\n")).expect("write");
    let mut command = binary();
    command
        .args(["serve", "--only-build", "a", "--token-file"])
        .arg(&file)
        .arg("--root")
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    assert_eq!(
        with_token(&store, "GET", "/builds/a/source.tar", TOKEN_A).status,
        200
    );
    let response = with_token(&store, "GET", "/builds/b/source.tar", TOKEN_B);
    assert_eq!(response.status, 403);
    assert!(
        response.text().contains("serves only /builds/a/"),
        "{}",
        response.text()
    );
}

#[test]
fn an_own_token_is_made_for_the_one_build_said_in_the_ready_line_and_kept_in_no_file() {
    let fixture = Fixture::new();
    inputs(&fixture);
    let mut command = binary();
    command
        .args(["serve", "--only-build", "a", "--own-token", "--root"])
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    let token = store
        .ready
        .token
        .clone()
        .expect("the ready line carries a token");
    assert!(
        contractor_protocol::service::is_token(&token) && token.len() == 64,
        "{token:?}"
    );
    let response = with_token(&store, "GET", "/builds/a/source.tar", &token);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.body, b"a");
    assert_eq!(store.get("/builds/a/source.tar").status, 401);
    let response = with_token(&store, "GET", "/builds/b/source.tar", &token);
    assert!(response.status >= 400, "{}", response.status);
    // Nothing beside the root nor beneath it holds the token.
    for file in fixture.files() {
        let text = std::fs::read(fixture.root.join(&file)).expect("read");
        assert!(!String::from_utf8_lossy(&text).contains(&token), "{file}");
    }
    let beside: Vec<_> = std::fs::read_dir(fixture.dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(beside.len(), 2, "{beside:?}");
}

#[test]
fn an_own_token_needs_one_build_and_no_token_file() {
    let fixture = Fixture::new();
    for args in [
        vec!["serve", "--own-token"],
        vec![
            "serve",
            "--only-build",
            "a",
            "--own-token",
            "--token-file",
            "t",
        ],
    ] {
        let output = binary()
            .args(&args)
            .arg("--root")
            .arg(&fixture.root)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}
