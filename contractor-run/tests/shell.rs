//! `contractor-run shell` as a command: requests it refuses (exit 2, naming the field), a
//! channel it cannot reach (exit 3, naming the socket), and the conversation with a
//! stand-in agent on a Unix socket: confined, the agent's last build messages skipped, the
//! keyboard and the terminal's bytes carried unchanged. None of these needs a VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use contractor_protocol::run::ShellEvent;

/// The error object of `--json-errors`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorObject {
    r#type: String,
    version: u32,
    code: String,
    chain: Vec<String>,
}

fn shell(stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-run"))
        .args(["shell", "--json-errors"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn contractor-run shell");
    let mut input = child.stdin.take().expect("stdin");
    // The tool may refuse before it reads everything.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().expect("wait for contractor-run")
}

fn refused(stdin: &[u8], exit: i32) -> ErrorObject {
    let out = shell(stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(exit), "{stderr}");
    let error: ErrorObject = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!((error.r#type.as_str(), error.version), ("error", 1));
    assert!(
        stderr.contains(&error.chain.join(": ")),
        "stderr says it too: {stderr}"
    );
    error
}

#[test]
fn bad_shell_requests_are_exit_2_naming_the_field() {
    let error = refused(
        b"{\"version\":1,\"control_socket\":\"/c\",\"cols\":\"80\"}\n",
        2,
    );
    assert_eq!(error.code, "bad_json");
    assert!(
        error.chain[0].contains("line 1, column 46, in `cols`: invalid type"),
        "{error:?}"
    );
    let error = refused(b"{\"version\":1,\"control_sockett\":\"/c\"}\nls\n", 2);
    assert_eq!(error.code, "bad_json");
    assert!(
        error.chain[0].contains("in `control_sockett`: unknown field"),
        "{error:?}"
    );
    let error = refused(b"{\"version\":1}\n", 2);
    assert!(
        error.chain[0].contains("missing field `control_socket`"),
        "{error:?}"
    );
    let error = refused(b"{\"version\":2,\"control_socket\":\"/c\"}\n", 2);
    assert_eq!(error.code, "unsupported");
    let error = refused(b"", 2);
    assert_eq!(error.code, "no_request");
    assert!(error.chain[0].contains("ShellRequest"), "{error:?}");
    let mut long = b"{\"version\":1,\"term\":\"".to_vec();
    long.resize(70_000, b'x');
    let error = refused(&long, 2);
    assert_eq!(error.code, "request_too_long");
    assert!(error.chain[0].contains("65536 bytes"), "{error:?}");
}

#[test]
fn a_channel_that_is_not_there_is_exit_3_naming_the_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("control.sock");
    let request = format!(
        "{}\n",
        serde_json::json!({"version": 1, "control_socket": socket})
    );
    let error = refused(request.as_bytes(), 3);
    assert_eq!(error.code, "connect");
    let said = error.chain.join(": ");
    assert!(
        said.contains(&socket.display().to_string()) && said.contains("virsh list"),
        "{said}"
    );
}

/// A stand-in agent on `socket`: it reads the `shell` message, sends the end of a build
/// and `shell_started`, a prompt, echoes one typed line and closes. Returns the message
/// and the typed line.
fn stand_in_agent(socket: &Path) -> std::thread::JoinHandle<(String, String)> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        let mut message = String::new();
        reader.read_line(&mut message).expect("the shell message");
        writer
            .write_all(b"{\"type\":\"script_exited\",\"code\":1}\n{\"type\":\"done\"}\n")
            .expect("end of build");
        writer
            .write_all(b"{\"type\":\"shell_started\"}\n\x1b[1m# \x1b[0m")
            .expect("started");
        let mut typed = String::new();
        reader.read_line(&mut typed).expect("a typed line");
        writer
            .write_all(format!("echo: {typed}").as_bytes())
            .expect("echo");
        (message, typed)
    })
}

#[test]
fn the_shell_is_carried_confined_with_the_terminal_s_bytes_unchanged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("control.sock");
    let agent = stand_in_agent(&socket);
    let request = serde_json::json!({
        "version": 1, "control_socket": socket, "cols": 132, "rows": 43, "term": "vt220"
    });
    let out = shell(format!("{request}\nuname -a\n").as_bytes());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let (message, typed) = agent.join().expect("agent");

    let message: serde_json::Value = serde_json::from_str(&message).expect("JSON");
    assert_eq!(
        message,
        serde_json::json!({"type": "shell", "cols": 132, "rows": 43, "term": "vt220"})
    );
    assert_eq!(typed, "uname -a\n");

    let mut stdout = &out.stdout[..];
    let mut first = String::new();
    stdout.read_line(&mut first).expect("first line");
    let started: ShellEvent = serde_json::from_str(&first).expect("shell_started");
    let ShellEvent::ShellStarted {
        version,
        confinement,
    } = started;
    assert_eq!(version, 1);
    let confinement = confinement.expect("its confinement");
    assert!(
        confinement.enforced && confinement.no_new_privs && confinement.seccomp,
        "{confinement:?}"
    );
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("rest");
    assert_eq!(rest, b"\x1b[1m# \x1b[0mecho: uname -a\n");
}
