//! The test harness: the real `contractor-proxy` binary, real upstream servers on loopback,
//! and a raw HTTP client, all over real sockets. Output is read with the protocol types,
//! which reject unknown fields, so a change to the wire format fails here.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use contractor_protocol::jsonl::JsonlReader;
use contractor_protocol::proxy::{Decision, Download, Summary};
use contractor_protocol::service::{Ready, ReadyTag};

/// What the stdout reader reports when the proxy's stdout ends.
const END_OF_STDOUT: &str = "end of stdout";

/// A line of the proxy's stdout after its ready line.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Line {
    Decision(Decision),
    Download(Download),
    Summary(Summary),
}

/// How long any single wait in a test may take.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running proxy, killed when dropped.
pub struct Proxy {
    child: Child,
    /// Where it listens, from its ready line.
    pub addr: SocketAddr,
    /// Its ready line.
    pub ready: Ready,
    lines: mpsc::Receiver<Result<Line, String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proxy {
    /// Starts the binary with `args` and reads its ready line.
    pub fn start(args: &[&str]) -> Proxy {
        Proxy::start_with_env(args, &[])
    }

    /// Starts the binary with `args` and the environment variables `env` added, and reads
    /// its ready line.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start contractor-proxy");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let collected = std::sync::Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut text) = collected.lock() {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut lines = JsonlReader::new(BufReader::new(stdout));
        let ready: Ready = lines
            .next_message()
            .expect("a valid ready line")
            .expect("a ready line");
        assert_eq!(ready.kind, ReadyTag::Ready);
        assert_eq!(ready.version, 1);
        assert_eq!(ready.service, "proxy");
        assert_ne!(
            ready.addr.port(),
            0,
            "the ready line must carry the bound port"
        );
        let (sender, received) = mpsc::channel();
        thread::spawn(move || loop {
            let next = match lines.next_message::<Line>() {
                Ok(Some(line)) => Ok(line),
                Ok(None) => Err(END_OF_STDOUT.to_string()),
                Err(e) => Err(format!("neither a decision nor a summary line: {e:?}")),
            };
            let last = next.is_err();
            if sender.send(next).is_err() || last {
                return;
            }
        });
        Proxy {
            child,
            addr: ready.addr,
            ready,
            lines: received,
            stderr,
        }
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the proxy wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next decision line (download lines, of --record-downloads, are passed over).
    pub fn next_decision(&self) -> Decision {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(Ok(Line::Decision(decision))) => decision,
            Ok(Ok(Line::Download(_))) => self.next_decision(),
            Ok(Ok(Line::Summary(summary))) => {
                panic!("the summary instead of a decision: {summary:?}")
            }
            Ok(Err(e)) => panic!("no decision line: {e}"),
            Err(e) => panic!("no decision line within {PATIENCE:?}: {e}"),
        }
    }

    /// The next download line (decision lines are passed over).
    pub fn next_download(&self) -> Download {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(Ok(Line::Download(download))) => download,
            Ok(Ok(Line::Decision(_))) => self.next_download(),
            Ok(Ok(Line::Summary(summary))) => {
                panic!("the summary instead of a download: {summary:?}")
            }
            Ok(Err(e)) => panic!("no download line: {e}"),
            Err(e) => panic!("no download line within {PATIENCE:?}: {e}"),
        }
    }

    /// The summary line, once the proxy stops; it must be the next line and the last.
    pub fn summary(&self) -> Summary {
        let summary = match self.lines.recv_timeout(PATIENCE) {
            Ok(Ok(Line::Summary(summary))) => summary,
            Ok(Ok(Line::Decision(decision))) => {
                panic!("a decision instead of the summary: {decision:?}")
            }
            Ok(Ok(Line::Download(download))) => {
                panic!("a download instead of the summary: {download:?}")
            }
            Ok(Err(e)) => panic!("no summary line: {e}"),
            Err(e) => panic!("no summary line within {PATIENCE:?}: {e}"),
        };
        match self.lines.recv_timeout(PATIENCE) {
            Ok(Err(e)) if e == END_OF_STDOUT => summary,
            other => panic!("stdout goes on after the summary: {other:?}"),
        }
    }

    /// The summary line, once the proxy stops, passing over download lines before it.
    pub fn summary_after_downloads(&self) -> Summary {
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(Ok(Line::Summary(summary))) => return summary,
                Ok(Ok(Line::Download(_))) => {}
                other => panic!("no summary line: {other:?}"),
            }
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the proxy") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (the responses in these tests are never chunked).
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Connects to `addr` with timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(PATIENCE))
        .expect("write timeout");
    stream
}

/// Sends `head` (a request line and headers, without the blank line; `Connection: close`
/// is added) to the proxy and reads the whole response.
pub fn request(proxy: SocketAddr, head: &str) -> HttpResponse {
    let mut stream = connect(proxy);
    // A proxy that refuses a request head may answer and close before it has read all of
    // it: then the rest of the write fails, and the answer is what counts.
    let sent = write!(stream, "{head}\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A reset after the answer arrived (unread request bytes at the proxy's close).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("read response: {e} (sending the request: {sent:?})"),
        }
    }
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let (status, headers) = parse_head(head);
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Reads a response head from `stream`, byte by byte so that nothing after it is consumed.
pub fn read_head(stream: &mut TcpStream) -> (u16, Vec<(String, String)>) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read response head");
        head.push(byte[0]);
    }
    parse_head(std::str::from_utf8(&head).expect("utf-8 head").trim_end())
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect(status_line);
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    (status, headers)
}

/// A one-response-per-connection HTTP server on 127.0.0.1 that reports every request head
/// it receives.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    heads: mpsc::Receiver<String>,
}

impl Upstream {
    /// Answers every request with `response` (a complete HTTP response).
    pub fn start(response: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let (sender, heads) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).is_err() {
                        break;
                    }
                    head.push(byte[0]);
                }
                let _ = sender.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(response.as_bytes());
            }
        });
        Upstream { addr, heads }
    }

    /// The next request head received.
    pub fn next_head(&self) -> String {
        self.heads
            .recv_timeout(PATIENCE)
            .expect("the upstream got no request")
    }

    /// Whether no request arrived.
    pub fn got_nothing(&self) -> bool {
        self.heads.recv_timeout(Duration::from_millis(200)).is_err()
    }
}

/// A TCP echo server on 127.0.0.1.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone stream");
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A server on 127.0.0.1 that runs `handle` on each connection in its own thread.
pub fn serve_each(handle: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || handle(stream));
        }
    });
    addr
}

/// Reads up to and including the blank line after a head.
pub fn read_request_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read_exact(&mut byte).is_err() {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
