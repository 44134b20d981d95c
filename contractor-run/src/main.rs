//! `contractor-run`: reads a RunRequest (JSON) on stdin, runs the build in the VM it names,
//! and writes the run's events as JSON Lines on stdout, ending with `finished`.
//! `contractor-run shell` reads a ShellRequest (the first line of stdin) and carries a kept
//! VM's interactive shell between the rest of stdin and stdout.
//!
//! Once `started` is written, every failure is an outcome carried by `finished`. Before
//! that, a failure is reported on stderr and by the exit code (2 for a bad request, naming
//! its line, column and field; 3 when the host cannot run it) and, with `--json-errors`,
//! also as one error object on stdout: `{"type":"error","version":1,"code":...,"chain":[...]}`.

use std::io::{Read, Write};

use clap::Parser;
use contractor_protocol::error::ToolCode;
use contractor_protocol::run::{RunEvent, RunRequest, ShellEvent, ShellRequest};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};
use contractor_run::shell::{RequestLine, ShellError};

/// Run one build in a started builder VM.
#[derive(Parser)]
#[command(
    version,
    about,
    after_help = r#"Reads one request on stdin, for example:

  {"version":1,
   "control_socket":"/var/lib/libvirt/qemu/channel/target/domain-1-contractor-ab12/org.contractor.control",
   "tunnel_socket":"/var/lib/libvirt/qemu/channel/target/domain-1-contractor-ab12/org.contractor.tunnel",
   "proxy":"127.0.0.1:40123","store":"127.0.0.1:40124","log":"build.log","timeout_secs":600,"boot_timeout_secs":300,
   "job":{"script":"make","source":"/builds/ID/source.tar","artifacts":["hello"],
          "artifacts_dest":"/builds/ID/artifacts/"}}

and writes JSON Lines on stdout:

  {"type":"started","version":1,"confinement":{"enforced":true,"no_new_privs":true,...}}
  {"type":"agent_ready","agent_version":"0.1.0"}
  {"type":"phase","phase":"script"}
  {"type":"output","text":"cc -o hello hello.c\n"}
  {"type":"finished","outcome":"success","exit_code":0,"duration_secs":4.2}

The stream always ends with "finished"; it carries the outcome and, for a failure, the error.
A request that cannot start (bad JSON: its line, column and field are named on stderr) writes
nothing on stdout, or with --json-errors one error object:

  {"type":"error","version":1,"code":"bad_json","chain":["bad JSON request on stdin at line 1, column 12, in `version`: invalid type: string \"1\", expected u32"]}

contractor-vm's "vm" answer holds the two sockets. With --request FILE, FILE holds the request
without control_socket and tunnel_socket, and stdin is contractor-vm's answer as it printed it
(its first line: the "vm" result, whose sockets are taken, or its error object, which ends
this tool with exit code 3 and that error); examples/pipeline.sh composes the tools so.

Exit codes: 0 success, 1 the build failed or timed out, 2 bad request, 3 infrastructure failure."#
)]
struct Args {
    #[command(subcommand)]
    command: Option<Subcommand>,
    /// When the request cannot start, also write the error on stdout as one JSON object
    /// ({"type":"error","version":1,"code":...,"chain":[...]}).
    #[arg(long, global = true)]
    json_errors: bool,
    /// Do not confine this process (no Landlock, seccomp or rlimits): for debugging only.
    /// The `started` event and stderr then say it runs with all of the user's rights.
    #[arg(long, global = true)]
    no_confine: bool,
    /// The RunRequest without `control_socket` and `tunnel_socket` (at most 16 MiB); stdin
    /// is then contractor-vm's answer (`create --json`'s first line), which names them.
    #[arg(long, value_name = "FILE")]
    request: Option<std::path::PathBuf>,
}

#[derive(clap::Subcommand)]
enum Subcommand {
    /// Open the interactive shell of a VM kept after its build (what `contractor shell`
    /// runs): the request is the first line of stdin, the rest of stdin is the keyboard.
    #[command(after_help = r#"Reads one request line on stdin, for example:

  {"version":1,"control_socket":"/var/lib/libvirt/qemu/channel/target/domain-1-contractor-ab12/org.contractor.control","cols":120,"rows":40,"term":"xterm-256color"}

connects to the control channel, confines itself, asks the agent for its shell and writes one
JSON line on stdout when it has started:

  {"type":"shell_started","version":1,"confinement":{"enforced":true,...}}

From then on the rest of stdin goes to the shell and stdout is the shell's terminal, raw
bytes, until the shell exits (the VM then powers off). Put the terminal in raw mode first.

Exit codes: 0 the shell ended, 2 bad request, 3 the channel could not be reached or failed."#)]
    Shell,
}

/// Why the request could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot read the request on stdin")]
    Stdin(#[source] std::io::Error),
    #[error("stdin is empty: pipe one JSON {0} into it (see --help)")]
    NoRequest(&'static str),
    #[error(
        "the request line on stdin is longer than {} bytes",
        contractor_run::shell::MAX_REQUEST_BYTES
    )]
    RequestTooLong,
    #[error("bad JSON request on stdin{at}: {detail}")]
    Json { at: String, detail: String },
    #[error("unsupported protocol version {0} in the request; this contractor-run speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot confine the relay")]
    Confine(#[source] contractor_confine::ConfineError),
    #[error("cannot open the shell")]
    Shell(#[source] ShellError),
    #[error("bad request in {}: {}", .0.display(), .1)]
    RequestJson(std::path::PathBuf, String),
    #[error("cannot read the request file {}", .0.display())]
    RequestFile(std::path::PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    VmAnswer(String),
    #[error("contractor-vm did not create the VM")]
    VmFailed(contractor_protocol::error::ErrorObject),
}

impl StartError {
    fn code(&self) -> ToolCode {
        match self {
            StartError::Stdin(_) => ToolCode::Stdin,
            StartError::NoRequest(_) => ToolCode::NoRequest,
            StartError::RequestTooLong => ToolCode::RequestTooLong,
            StartError::Json { .. } | StartError::RequestJson(..) => ToolCode::BadJson,
            StartError::Version(_) => ToolCode::Unsupported,
            StartError::Runtime(_) => ToolCode::Runtime,
            StartError::Confine(_) => ToolCode::Confine,
            StartError::Shell(err) => err.code(),
            StartError::RequestFile(..) | StartError::VmAnswer(_) => ToolCode::BadVmAnswer,
            StartError::VmFailed(error) => error.code.clone(),
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            StartError::NoRequest(_)
            | StartError::RequestTooLong
            | StartError::Json { .. }
            | StartError::Version(_)
            | StartError::RequestFile(..)
            | StartError::RequestJson(..)
            | StartError::VmAnswer(_) => ExitCode::BadInput,
            StartError::Stdin(_)
            | StartError::VmFailed(_)
            | StartError::Runtime(_)
            | StartError::Confine(_)
            | StartError::Shell(_) => ExitCode::Infrastructure,
        }
    }

    fn chain(&self) -> Vec<String> {
        let mut chain = contractor_protocol::result::error_chain(self);
        if let StartError::VmFailed(error) = self {
            chain.extend(error.chain.iter().cloned());
        }
        chain
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(err) = contractor_protocol::limits::raise_open_files() {
        eprintln!("contractor-run: warning: cannot raise the open-files limit: {err}");
    }
    let outcome = match args.command {
        None => run(&args),
        Some(Subcommand::Shell) => shell(&args),
    };
    match outcome {
        Ok(code) => code.into(),
        Err(err) => {
            contractor_protocol::error::ErrorObject::report(
                "contractor-run",
                err.code(),
                err.chain(),
                args.json_errors,
            );
            err.exit_code().into()
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, StartError> {
    let request = match &args.request {
        Some(file) => request_with_vm_answer(file)?,
        None => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(StartError::Stdin)?;
            if input.trim().is_empty() {
                return Err(StartError::NoRequest("RunRequest"));
            }
            serde_json::from_str(&input).map_err(|e| json_error(&input, &e))?
        }
    };
    if request.version != PROTOCOL_VERSION {
        return Err(StartError::Version(request.version));
    }
    // What the relay holds once confined: the channels and the log, opened now. Landlock
    // binds the calling thread and those it starts later, so this comes before the runtime.
    let opened = contractor_run::open_links(&request);
    let confinement = if args.no_confine {
        contractor_confine::unconfined("contractor-run")
    } else {
        let policy = contractor_run::confinement::policy(&request);
        contractor_confine::confine("contractor-run", &policy).map_err(StartError::Confine)?
    };
    let runtime = tokio::runtime::Runtime::new().map_err(StartError::Runtime)?;
    let code = runtime.block_on(async {
        let (events, mut received) = contractor_run::host::event_channel();
        let printer = tokio::task::spawn_blocking(move || {
            let mut stdout = std::io::stdout().lock();
            while let Some(event) = received.blocking_recv() {
                // `finished` is last; the relay may hold the channel open while the VM lives.
                let last = matches!(event, RunEvent::Finished { .. });
                let mut line = Vec::new();
                if contractor_protocol::jsonl::encode_line(&mut line, &event).is_err() {
                    break;
                }
                let line = escape_controls(&line);
                if contractor_protocol::jsonl::write_flushed(&mut stdout, &line).is_err() || last {
                    break;
                }
            }
            let _ = stdout.flush();
        });
        let finished = contractor_run::run(request, opened, Some(confinement), events).await;
        let _ = printer.await;
        match finished {
            RunEvent::Finished { outcome, .. } => outcome.exit_code(),
            _ => ExitCode::Infrastructure,
        }
    });
    Ok(code)
}

/// The most bytes of a `--request` file.
const MAX_REQUEST_FILE_BYTES: u64 = 16 << 20;

/// `--request FILE`: the request in `file`, completed with the two channel sockets of the VM
/// that contractor-vm's answer on stdin names (only its first line is read, so stdin may be
/// the holder's own stdout). An error object there is contractor-vm's failure, carried on.
fn request_with_vm_answer(file: &std::path::Path) -> Result<RunRequest, StartError> {
    use contractor_protocol::vm::VmResult;
    let text = contractor_protocol::file::read_regular(file, MAX_REQUEST_FILE_BYTES)
        .map_err(|e| StartError::RequestFile(file.to_path_buf(), e))?;
    let mut request: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| StartError::RequestJson(file.to_path_buf(), e.to_string()))?;
    if let Some(field) = ["control_socket", "tunnel_socket"]
        .into_iter()
        .find(|field| request.contains_key(*field))
    {
        return Err(StartError::VmAnswer(format!(
            "--request {}: leave `{field}` out; it comes from contractor-vm's answer on stdin",
            file.display()
        )));
    }
    let mut stdin = contractor_protocol::jsonl::JsonlReader::new(std::io::stdin().lock());
    let answer: serde_json::Value = match stdin.next_message() {
        Ok(Some(answer)) => answer,
        Ok(None) => return Err(StartError::NoRequest("answer of contractor-vm create")),
        Err(e) => {
            return Err(StartError::VmAnswer(format!(
                "stdin is not contractor-vm's answer: {}",
                contractor_protocol::result::joined_chain(&e)
            )))
        }
    };
    if answer["type"] == "error" {
        if let Ok(error) = serde_json::from_value(answer.clone()) {
            return Err(StartError::VmFailed(error));
        }
    }
    let vm = match serde_json::from_value::<VmResult>(answer) {
        Ok(VmResult::Vm { vm, .. }) => vm,
        Ok(_) => {
            return Err(StartError::VmAnswer(
                "stdin holds another answer of contractor-vm than `vm` (create's)".into(),
            ))
        }
        Err(e) => {
            return Err(StartError::VmAnswer(format!(
                "stdin is not contractor-vm's answer: {e}"
            )))
        }
    };
    let (Some(control), Some(tunnel)) = (vm.control_socket, vm.tunnel_socket) else {
        return Err(StartError::VmAnswer(format!(
            "contractor-vm's answer names no channel sockets for VM {} (libvirt reported none)",
            vm.name
        )));
    };
    request.insert("control_socket".into(), serde_json::json!(control));
    request.insert("tunnel_socket".into(), serde_json::json!(tunnel));
    serde_json::from_value(serde_json::Value::Object(request))
        .map_err(|e| StartError::RequestJson(file.to_path_buf(), e.to_string()))
}

/// `contractor-run shell`: reads the request line, connects, confines itself, starts the
/// agent's shell, then carries the bytes. After `shell_started`, stdout is the terminal's:
/// a failure is reported on stderr only (and by exit code 3).
fn shell(args: &Args) -> Result<ExitCode, StartError> {
    let line = {
        let mut stdin = std::io::stdin().lock();
        contractor_run::shell::read_request(&mut stdin).map_err(StartError::Stdin)?
    };
    let text = match line {
        RequestLine::Empty => return Err(StartError::NoRequest("ShellRequest")),
        RequestLine::TooLong => return Err(StartError::RequestTooLong),
        RequestLine::Text(bytes) => String::from_utf8(bytes).map_err(|_| StartError::Json {
            at: String::new(),
            detail: "the request line is not UTF-8".into(),
        })?,
    };
    if text.trim().is_empty() {
        return Err(StartError::NoRequest("ShellRequest"));
    }
    let request: ShellRequest = serde_json::from_str(&text).map_err(|e| json_error(&text, &e))?;
    if request.version != PROTOCOL_VERSION {
        return Err(StartError::Version(request.version));
    }
    // What the shell holds once confined: the channel (twice: one end per direction).
    let mut channel = contractor_run::shell::connect(&request).map_err(StartError::Shell)?;
    let guest = channel
        .try_clone()
        .map_err(|e| StartError::Shell(ShellError::Channel(e)))?;
    let confinement = if args.no_confine {
        contractor_confine::unconfined("contractor-run")
    } else {
        let policy = contractor_run::confinement::shell_policy();
        contractor_confine::confine("contractor-run", &policy).map_err(StartError::Confine)?
    };
    let guest =
        contractor_run::shell::start(&mut channel, guest, &request).map_err(StartError::Shell)?;
    let mut stdout = std::io::stdout().lock();
    let started = ShellEvent::ShellStarted {
        version: PROTOCOL_VERSION,
        confinement: Some(confinement),
    };
    let carried = contractor_protocol::jsonl::write_line(&mut stdout, &started)
        .map_err(|e| ShellError::Stdout(std::io::Error::other(e)))
        .and_then(|()| stdout.flush().map_err(ShellError::Stdout))
        .and_then(|()| contractor_run::shell::carry(std::io::stdin(), channel, guest, &mut stdout));
    match carried {
        Ok(()) => Ok(ExitCode::Success),
        Err(err) => {
            let err = StartError::Shell(err);
            contractor_protocol::error::ErrorObject::report(
                "contractor-run",
                err.code(),
                err.chain(),
                false,
            );
            Ok(ExitCode::Infrastructure)
        }
    }
}

/// The JSON line with every control character that serde_json leaves as it is (DEL, the
/// C1 controls U+0080 to U+009F) and the bidirectional overrides written as `\uXXXX`: the
/// same JSON value, but a guest-chosen string (an artifact path, an error text) cannot
/// drive the terminal that shows the stream.
fn escape_controls(line: &[u8]) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(line) else {
        return line.to_vec();
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let risky = c == '\u{7f}'
            || ('\u{80}'..='\u{9f}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        if risky {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out.into_bytes()
}

/// The error for a request that did not parse: serde's message with the line, column and
/// the field (`job.timeout_secs`) where it went wrong.
fn json_error(text: &str, e: &serde_json::Error) -> StartError {
    let located = contractor_protocol::locate::locate(text, e);
    StartError::Json {
        at: located.at(),
        detail: located.detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        let e = serde_json::from_str::<RunRequest>(text).expect_err("bad request");
        json_error(text, &e).to_string()
    }

    #[test]
    fn bad_requests_name_line_column_and_field() {
        let request = "{\"version\":1,\n \"job\":{\"script\":\"make\",\"artifacts\":[\"a\", 5]}}";
        let message = error_of(request);
        assert!(
            message.contains("line 2, column 43, in `job.artifacts[1]`"),
            "{message}"
        );
        let message = error_of("{\"version\":1,\"tunnel\":\"x\"}");
        assert!(message.contains("in `tunnel`: unknown field"), "{message}");
        let message = error_of("{\"version\":\"1\"}");
        assert!(message.contains("in `version`: invalid type"), "{message}");
        let message = error_of("{\"version\":1,\n\"job\": 5}");
        assert!(message.contains("in `job`: invalid type"), "{message}");
    }

    #[test]
    fn guest_strings_cannot_reach_the_terminal_as_controls() {
        let event = RunEvent::Artifact {
            path: "a\u{1b}[2J\u{9b}31m\u{202e}b\u{7f}".into(),
            size: 1,
        };
        let mut line = Vec::new();
        contractor_protocol::jsonl::encode_line(&mut line, &event).expect("encode");
        let escaped = escape_controls(&line);
        let text = std::str::from_utf8(&escaped).expect("utf-8");
        assert!(
            text.chars().all(|c| c == '\n' || (' '..='~').contains(&c)),
            "{text}"
        );
        let back: RunEvent = serde_json::from_str(text).expect("still JSON");
        assert_eq!(back, event);
    }
}
