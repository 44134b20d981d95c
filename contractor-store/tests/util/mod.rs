//! Test harness: runs the real `contractor-store` binary on a directory and talks raw
//! HTTP/1.1 to it, so that tests control every byte of a request (a client library would
//! normalise `..` and percent-encoding away).

#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contractor_protocol::service::{Ready, ReadyTag};

/// A running store; killed when dropped.
pub struct StoreProcess {
    child: Child,
    /// Where it listens, as its ready line said.
    pub addr: SocketAddr,
    /// Its ready line.
    pub ready: Ready,
    log: Arc<Mutex<Vec<String>>>,
    _stdout: BufReader<ChildStdout>,
}

/// A parsed response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_contractor-store"))
}

impl StoreProcess {
    /// Starts `contractor-store serve --root ROOT` on a free loopback port and waits for its
    /// ready line.
    pub fn start(root: &Path) -> StoreProcess {
        let mut command = binary();
        command.args(["serve", "--root"]).arg(root);
        StoreProcess::spawn(command)
    }

    /// Starts `command` (a `serve` command line) on a free loopback port and waits for its
    /// ready line.
    pub fn spawn(mut command: Command) -> StoreProcess {
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start contractor-store");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[store] {line}");
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read ready line");
        let ready: Ready =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        assert_eq!(ready.kind, ReadyTag::Ready);
        assert_eq!(ready.version, 1);
        assert_eq!(ready.service, "store");
        assert!(
            ready.addr.ip().is_loopback() && ready.addr.port() != 0,
            "{}",
            ready.addr
        );
        StoreProcess {
            child,
            addr: ready.addr,
            ready,
            log,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens a connection.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        stream
    }

    /// Sends `head` (request line and headers, without the final blank line, with
    /// `Connection: close` added) and `body`, and reads the whole response.
    pub fn request(&self, head: &str, body: &[u8]) -> HttpResponse {
        let mut stream = self.connect();
        send_head(&mut stream, head);
        stream.write_all(body).expect("send body");
        read_response(&mut stream)
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request(&format!("GET {path} HTTP/1.1"), b"")
    }

    pub fn head(&self, path: &str) -> HttpResponse {
        self.request(&format!("HEAD {path} HTTP/1.1"), b"")
    }

    pub fn put(&self, path: &str, body: &[u8]) -> HttpResponse {
        let head = format!("PUT {path} HTTP/1.1\r\nContent-Length: {}", body.len());
        self.request(&head, body)
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line containing {needle:?}");
    }

    /// Waits until an upload's temporary file exists in `dir`, so that a test knows the
    /// store is midway through that upload.
    pub fn wait_for_temp_file(&self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !temp_files(dir).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no upload temp file appeared in {}", dir.display());
    }

    /// Sends `signal` (`TERM`, `INT`) to the store.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the store to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "store did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a request head with `Connection: close` and the blank line that ends it.
pub fn send_head(stream: &mut TcpStream, head: &str) {
    let head = format!("{head}\r\nHost: store\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
}

/// Reads a response until the server closes the connection.
pub fn read_response(stream: &mut TcpStream) -> HttpResponse {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8(raw[..split].to_vec()).expect("head is text");
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .expect("status")
        .parse()
        .expect("number");
    let headers = lines
        .map(|l| {
            let (name, value) = l.split_once(':').expect("header");
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// The names of upload temp files in `dir` (none if `dir` does not exist).
pub fn temp_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(contractor_store::files::TEMP_PREFIX))
        .collect()
}

/// `len` bytes of a deterministic pseudo-random sequence chosen by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A temp dir holding the store root `root/` and, beside it, a secret no request may read.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

pub const SECRET: &[u8] = b"top secret, outside the store\n";

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir root");
        std::fs::write(dir.path().join("secret.txt"), SECRET).expect("write secret");
        Fixture { dir, root }
    }

    /// Writes `contents` at `relative` beneath the root, creating directories.
    pub fn write(&self, relative: &str, contents: &[u8]) {
        let path = self.root.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, contents).expect("write");
    }

    /// Every file beneath the root, as sorted relative paths.
    pub fn files(&self) -> Vec<String> {
        let mut found = Vec::new();
        walk(&self.root, &self.root, &mut found);
        found.sort();
        found
    }
}

fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        let metadata = std::fs::symlink_metadata(&path).expect("lstat");
        if metadata.is_dir() {
            walk(root, &path, found);
        } else {
            let relative = path.strip_prefix(root).expect("beneath root");
            found.push(relative.to_string_lossy().into_owned());
        }
    }
}
