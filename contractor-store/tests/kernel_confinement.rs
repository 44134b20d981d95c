//! The store confines itself (Landlock, seccomp, rlimits) before its first read from a
//! client: the real binary says so in its ready line and in /proc, still serves its build,
//! and a link planted in the record into a "home" directory is refused by the kernel, not
//! only by the store's own checks. A probe applies the store's exact policy in a child
//! process and tries what a compromised store would. The same for `record receive`, which
//! reads a build host's record stream: confined before it reads a byte, to its one record.

mod util;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;

use contractor_store::confinement::{policy, receipt_policy, Needs};
use util::{binary, Fixture, StoreProcess, SECRET};

const ID: &str = "20261202-000000-abc123";

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status")
}

#[test]
fn a_serving_store_is_confined_says_so_and_still_serves_its_build() {
    let fixture = Fixture::new();
    fixture.write(&format!("builds/{ID}/source.tar"), b"the source");
    let mut command = binary();
    command
        .args(["serve", "--only-build", ID, "--root"])
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    let confinement = store
        .ready
        .confinement
        .clone()
        .expect("a confinement field");
    assert!(confinement.enforced, "{confinement:?}");
    assert!(confinement.no_new_privs && confinement.seccomp && confinement.rlimits);
    if confinement.landlock_abi >= 1 {
        assert!(confinement.landlock_fs, "{confinement:?}");
    }
    assert_eq!(confinement.landlock_net, confinement.landlock_abi >= 4);
    let status = proc_status(store.pid());
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");

    let response = store.get(&format!("/builds/{ID}/source.tar"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.body, b"the source");
    let response = store.put(&format!("/builds/{ID}/artifacts/out/hello"), b"built");
    assert!(
        response.status == 201 || response.status == 200,
        "{}",
        response.text()
    );
    assert_eq!(
        std::fs::read(
            fixture
                .root
                .join(format!("builds/{ID}/artifacts/out/hello"))
        )
        .expect("kept"),
        b"built"
    );
}

#[test]
fn a_link_planted_in_the_record_into_home_is_refused_by_the_kernel() {
    let fixture = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("id_ed25519"), SECRET).expect("secret");
    let record = fixture.root.join(format!("builds/{ID}"));
    std::fs::create_dir_all(record.join("artifacts")).expect("record");
    std::os::unix::fs::symlink(home.path().join("id_ed25519"), record.join("artifacts/key"))
        .expect("plant the link");
    let mut command = binary();
    command
        .args(["serve", "--only-build", ID, "--root"])
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    if !store
        .ready
        .confinement
        .as_ref()
        .is_some_and(|c| c.landlock_fs)
    {
        eprintln!("no Landlock on this kernel: nothing to show");
        return;
    }
    let response = store.get(&format!("/builds/{ID}/artifacts/key"));
    assert_eq!(response.status, 403, "{}", response.text());
    assert!(!response.body.windows(SECRET.len()).any(|w| w == SECRET));
    // The kernel said no: the log carries its EACCES.
    store.wait_for_log("the kernel refused");
    store.wait_for_log("Permission denied (os error 13)");
}

const PROBE: &str = "CONTRACTOR_STORE_CONFINE_PROBE";

#[test]
fn the_store_policy_keeps_a_compromised_store_inside_its_build_record() {
    let fixture = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("id_ed25519"), SECRET).expect("secret");
    let record = fixture.root.join(format!("builds/{ID}"));
    std::fs::create_dir_all(record.join("artifacts")).expect("record");
    std::fs::create_dir_all(fixture.root.join("builds/other")).expect("other record");
    std::os::unix::fs::symlink(home.path().join("id_ed25519"), record.join("leak"))
        .expect("plant the link");
    std::fs::write(fixture.dir.path().join("tokens"), "x y\n").expect("tokens");
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "probe_store_policy",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .env("PROBE_ROOT", fixture.root.canonicalize().expect("root"))
        .env("PROBE_HOME", home.path())
        .env("PROBE_TOKENS", fixture.dir.path().join("tokens"))
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn probe_store_policy() {
    if std::env::var_os(PROBE).is_none() {
        return;
    }
    let var = |name| PathBuf::from(std::env::var_os(name).expect(name));
    let (root, home, tokens) = (var("PROBE_ROOT"), var("PROBE_HOME"), var("PROBE_TOKENS"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let elsewhere = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let policy = policy(&Needs {
        root: &root,
        only_build: Some(ID),
        token_file: Some(&tokens),
        port,
    });
    let report = contractor_confine::confine("probe", &policy).expect("confine");
    println!("{report:?}");
    let record = root.join(format!("builds/{ID}"));

    // What the store must do: its record, read and write; the token file, read.
    std::fs::write(record.join("artifacts/out"), b"artifact").expect("write an artifact");
    assert_eq!(
        std::fs::read(record.join("artifacts/out")).expect("read"),
        b"artifact"
    );
    std::fs::read(&tokens).expect("read the token file");

    if report.landlock_fs {
        let refused = |what: &str, result: std::io::Result<()>| {
            let e = result.expect_err(what);
            assert_eq!(errno(&e), libc::EACCES, "{what}: {e}");
        };
        refused("home", std::fs::read(home.join("id_ed25519")).map(drop));
        refused(
            "a link into home",
            std::fs::read(record.join("leak")).map(drop),
        );
        refused(
            "another build",
            std::fs::write(root.join("builds/other/x"), b"x"),
        );
        refused("the store root", std::fs::write(root.join("x"), b"x"));
        refused(
            "beside the store",
            std::fs::read(root.join("../secret.txt")).map(drop),
        );
        refused("the token file", std::fs::write(&tokens, b"mine 0000\n"));
    }
    if report.landlock_net {
        let port = elsewhere.local_addr().expect("addr").port();
        let e = TcpStream::connect(("127.0.0.1", port)).expect_err("connect");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
    let e = Command::new("/bin/sh")
        .arg("-c")
        .arg("true")
        .status()
        .expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
}

#[test]
fn a_store_for_a_build_without_a_record_yet_creates_it_and_takes_uploads() {
    let fixture = Fixture::new();
    let mut command = binary();
    command
        .args(["serve", "--only-build", ID, "--root"])
        .arg(&fixture.root);
    let store = StoreProcess::spawn(command);
    let response = store.put(&format!("/builds/{ID}/artifacts/a"), b"a");
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(fixture.files(), vec![format!("builds/{ID}/artifacts/a")]);
}

#[test]
fn a_receiving_store_is_confined_before_it_reads_the_stream_and_keeps_the_record() {
    use std::io::{Read, Write};
    let fixture = Fixture::new();
    let record = fixture.root.join(format!("builds/{ID}"));
    std::fs::create_dir_all(&record).expect("record");
    let mut command = binary();
    command
        .args([
            "record",
            "receive",
            "--build",
            ID,
            "--max-bytes",
            "1M",
            "--root",
        ])
        .arg(&fixture.root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    // Nothing sent yet: it waits on its stdin, confined by then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut status = proc_status(child.id());
    while !status.contains("Seccomp:\t2") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        status = proc_status(child.id());
    }
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(
            b"{\"type\":\"file\",\"path\":\"artifacts/out\",\"bytes\":5,\"executable\":true}\nbuilt\
              {\"type\":\"end\",\"files\":1}\n",
        )
        .expect("send");
    drop(stdin);
    let mut answer = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut answer)
        .expect("answer");
    assert!(child.wait().expect("wait").success(), "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(answer["type"], "record_received");
    assert_eq!(
        (answer["files"].as_u64(), answer["artifacts"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        std::fs::read(record.join("artifacts/out")).expect("kept"),
        b"built"
    );
    assert!(record.join("artifacts.json").is_file(), "indexed");
}

#[test]
fn the_receipt_policy_keeps_a_compromised_receipt_inside_its_record() {
    let fixture = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("id_ed25519"), SECRET).expect("secret");
    std::fs::create_dir_all(fixture.root.join(format!("builds/{ID}"))).expect("record");
    std::fs::create_dir_all(fixture.root.join("builds/other")).expect("other record");
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "probe_receipt_policy",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .env("PROBE_ROOT", fixture.root.canonicalize().expect("root"))
        .env("PROBE_HOME", home.path())
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[test]
fn probe_receipt_policy() {
    if std::env::var_os(PROBE).is_none() {
        return;
    }
    let var = |name| PathBuf::from(std::env::var_os(name).expect(name));
    let (root, home) = (var("PROBE_ROOT"), var("PROBE_HOME"));
    let record = root.join(format!("builds/{ID}"));
    let report = contractor_confine::confine("probe", &receipt_policy(&record)).expect("confine");
    println!("{report:?}");
    std::fs::create_dir_all(record.join("artifacts/deep")).expect("make a directory");
    std::fs::write(record.join("artifacts/deep/out"), b"x").expect("write a file");
    if report.landlock_fs {
        let refused = |what: &str, result: std::io::Result<()>| {
            let e = result.expect_err(what);
            assert_eq!(errno(&e), libc::EACCES, "{what}: {e}");
        };
        refused("home", std::fs::read(home.join("id_ed25519")).map(drop));
        refused("home, writing", std::fs::write(home.join("x"), b"x"));
        refused(
            "another build",
            std::fs::write(root.join("builds/other/x"), b"x"),
        );
        refused("the store root", std::fs::write(root.join("x"), b"x"));
    }
    let e = std::net::UdpSocket::bind("127.0.0.1:0").expect_err("a socket");
    assert!(matches!(errno(&e), libc::EACCES | libc::EPERM), "{e}");
    let e = Command::new("/bin/sh")
        .arg("-c")
        .arg("true")
        .status()
        .expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
}
