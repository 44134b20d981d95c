//! The download cache shared by projects, through the real (confined) `contractor-proxy`
//! binary and real upstreams on loopback: each project is served only what it fetched
//! itself, with its own headers, and no project's build evicts what another's lock pins.

#[allow(dead_code)]
mod util;

use std::path::{Path, PathBuf};

use util::{request, Proxy, Upstream};

/// sha256("hello"), as sha256sum prints it.
const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

const PROJECT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const PROJECT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// A scratch directory with a download cache in it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("downloads")
    }

    fn entry(&self, sha: &str) -> PathBuf {
        self.cache().join("sha256").join(sha)
    }

    /// A pins file of `url` → `sha`.
    fn pins(&self, name: &str, url: &str, sha: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{{\"{url}\":\"{sha}\"}}")).expect("pins");
        path
    }

    /// A proxy of `project` on the cache, reaching loopback `ports`, with `more` flags.
    fn proxy(&self, project: &str, ports: &[u16], more: &[&str]) -> Proxy {
        let cache = self.cache();
        let mut args: Vec<String> = [
            "--allow",
            "localhost",
            "--allow-net",
            "127.0.0.0/8",
            "--record-downloads",
            "--cache",
            path_str(&cache),
            "--cache-project",
            project,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for port in ports {
            args.extend(["--allow-port".to_string(), port.to_string()]);
        }
        args.extend(more.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proxy::start(&args)
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Stops `proxy` and waits until it is gone: every entry it keeps is then written.
fn stop(mut proxy: Proxy) {
    proxy.terminate();
    assert!(proxy.wait().success());
}

fn get(url: &str) -> String {
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("an http URL");
    format!("GET {url} HTTP/1.1\r\nHost: {authority}")
}

#[test]
fn two_projects_with_the_same_bytes_are_each_served_their_own_headers() {
    let scratch = Scratch::new();
    let gzip = Upstream::start(
        "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Encoding: gzip\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    let plain = Upstream::start(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
         Connection: close\r\n\r\nhello",
    );
    let (a_port, b_port) = (gzip.addr.port(), plain.addr.port());
    let a_url = format!("http://localhost:{a_port}/hello.gz");
    let b_url = format!("http://localhost:{b_port}/hello.txt");

    let a = scratch.proxy(PROJECT_A, &[a_port], &[]);
    assert_eq!(request(a.addr, &get(&a_url)).status, 200);
    gzip.next_head();
    stop(a);
    // B stores the same bytes with other headers afterwards.
    let b = scratch.proxy(PROJECT_B, &[b_port], &[]);
    assert_eq!(request(b.addr, &get(&b_url)).status, 200);
    plain.next_head();
    stop(b);
    assert!(scratch.entry(HELLO_SHA).is_file());

    let a_pins = scratch.pins("a.json", &a_url, HELLO_SHA);
    let a = scratch.proxy(PROJECT_A, &[a_port], &["--pins", path_str(&a_pins)]);
    let response = request(a.addr, &get(&a_url));
    assert_eq!((response.status, response.body.as_str()), (200, "hello"));
    assert_eq!(
        (
            response.header("content-type"),
            response.header("content-encoding")
        ),
        (Some("application/gzip"), Some("gzip")),
        "A is served the headers its upstream gave: {response:?}"
    );
    assert!(
        a.next_decision().reason.contains("download cache"),
        "served from the cache"
    );
    assert!(gzip.got_nothing());

    let b_pins = scratch.pins("b.json", &b_url, HELLO_SHA);
    let b = scratch.proxy(
        PROJECT_B,
        &[b_port],
        &["--pins", path_str(&b_pins), "--offline"],
    );
    let response = request(b.addr, &get(&b_url));
    assert_eq!((response.status, response.body.as_str()), (200, "hello"));
    assert_eq!(
        (
            response.header("content-type"),
            response.header("content-encoding")
        ),
        (Some("text/plain"), None),
        "B is served its own headers: {response:?}"
    );
}

#[test]
fn a_project_pinning_bytes_only_another_fetched_is_not_served_them() {
    let scratch = Scratch::new();
    let hello =
        Upstream::start("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let missing =
        Upstream::start("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let (a_port, b_port) = (hello.addr.port(), missing.addr.port());
    let a_url = format!("http://localhost:{a_port}/secret.tar");
    let a = scratch.proxy(PROJECT_A, &[a_port], &[]);
    assert_eq!(request(a.addr, &get(&a_url)).body, "hello");
    hello.next_head();
    stop(a);
    assert!(scratch.entry(HELLO_SHA).is_file());

    // B pins a URL of its own host that never answered those bytes: the network is asked
    // and says 404, which is not the pinned body (a pinned URL's body is verified before it
    // is served, so B gets 502 naming the hash the 404 had, never A's bytes).
    let b_url = format!("http://localhost:{b_port}/probe");
    let b_pins = scratch.pins("b.json", &b_url, HELLO_SHA);
    let b = scratch.proxy(PROJECT_B, &[b_port], &["--pins", path_str(&b_pins)]);
    let response = request(b.addr, &get(&b_url));
    assert_eq!(response.status, 502, "{response:?}");
    assert!(!response.body.contains("hello"), "{response:?}");
    missing.next_head();
    stop(b);

    // B pins A's very URL, offline: refused, naming the URL; the upstream is not asked.
    let b_pins = scratch.pins("b2.json", &a_url, HELLO_SHA);
    let b = scratch.proxy(
        PROJECT_B,
        &[a_port],
        &["--pins", path_str(&b_pins), "--offline"],
    );
    let response = request(b.addr, &get(&a_url));
    assert_eq!(response.status, 403, "{response:?}");
    let decision = b.next_decision();
    assert!(
        decision.reason.contains("offline") && decision.reason.contains(&a_url),
        "{decision:?}"
    );
    assert!(hello.got_nothing());
    // A itself still is.
    let a_pins = scratch.pins("a.json", &a_url, HELLO_SHA);
    let a = scratch.proxy(
        PROJECT_A,
        &[a_port],
        &["--pins", path_str(&a_pins), "--offline"],
    );
    assert_eq!(request(a.addr, &get(&a_url)).body, "hello");
}

#[test]
fn a_build_over_the_cache_size_does_not_evict_another_projects_pinned_entries() {
    let scratch = Scratch::new();
    let hello =
        Upstream::start("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let world =
        Upstream::start("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nworld");
    let big = Upstream::start(
        "HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\n\
         twenty bytes of data",
    );
    let (hello_port, world_port, big_port) =
        (hello.addr.port(), world.addr.port(), big.addr.port());
    let pinned_url = format!("http://localhost:{hello_port}/pinned");
    let loose_url = format!("http://localhost:{world_port}/loose");
    let big_url = format!("http://localhost:{big_port}/big");
    // A keeps two entries and its lock pins one of them.
    let a_pins = scratch.pins("a.json", &pinned_url, HELLO_SHA);
    let a = scratch.proxy(
        PROJECT_A,
        &[hello_port, world_port],
        &["--pins", path_str(&a_pins)],
    );
    assert_eq!(request(a.addr, &get(&pinned_url)).body, "hello");
    assert_eq!(request(a.addr, &get(&loose_url)).body, "world");
    stop(a);
    // sha256("world")
    let world_sha = "486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7";
    assert!(scratch.entry(world_sha).is_file());

    // B's build, in a cache of 24 bytes, adds 20: room is made from A's loose entry only.
    let b = scratch.proxy(PROJECT_B, &[big_port], &["--cache-size", "24"]);
    assert_eq!(request(b.addr, &get(&big_url)).body, "twenty bytes of data");
    stop(b);
    assert!(scratch.entry(HELLO_SHA).is_file(), "A's pinned entry stays");
    assert!(
        !scratch.entry(world_sha).is_file(),
        "A's loose entry made room"
    );

    // A, offline, is still served its pinned download.
    let a = scratch.proxy(
        PROJECT_A,
        &[hello_port],
        &["--pins", path_str(&a_pins), "--offline"],
    );
    assert_eq!(request(a.addr, &get(&pinned_url)).body, "hello");
}

#[test]
fn a_build_past_its_quota_passes_downloads_on_and_counts_them_not_kept() {
    let scratch = Scratch::new();
    let hello =
        Upstream::start("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let port = hello.addr.port();
    let b = scratch.proxy(PROJECT_B, &[port], &["--cache-max", "4"]);
    let response = request(b.addr, &get(&format!("http://localhost:{port}/x")));
    assert_eq!((response.status, response.body.as_str()), (200, "hello"));
    assert_eq!(
        b.next_decision().decision,
        contractor_protocol::proxy::Verdict::Allow
    );
    b.terminate();
    assert_eq!(b.summary_after_downloads().cache_not_kept, 1);
    assert!(!scratch.entry(HELLO_SHA).exists());
    assert!(b.stderr().contains("not kept"), "{}", b.stderr());
}

#[test]
fn a_cache_without_a_well_formed_project_key_is_refused_by_name() {
    let scratch = Scratch::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
        .args([
            "--record-downloads",
            "--cache",
            path_str(&scratch.cache()),
            "--cache-project",
            "../other",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cache-project")
            && stderr.contains("\"../other\"")
            && stderr.contains("32 lower-case hex"),
        "{stderr}"
    );
}
