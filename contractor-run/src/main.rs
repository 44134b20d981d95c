//! `contractor-run`: reads a RunRequest (JSON) on stdin, runs the build in the VM it names,
//! and writes the run's events as JSON Lines on stdout, ending with `finished`.

use std::io::{Read, Write};

use anyhow::Context;
use clap::Parser;
use contractor_protocol::run::{RunEvent, RunRequest};
use contractor_protocol::ExitCode;

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

  {"type":"started","version":1}
  {"type":"agent_ready","agent_version":"0.1.0"}
  {"type":"phase","phase":"script"}
  {"type":"output","text":"cc -o hello hello.c\n"}
  {"type":"finished","outcome":"success","exit_code":0,"duration_secs":4.2}

Exit codes: 0 success, 1 the build failed or timed out, 2 bad request, 3 infrastructure failure."#
)]
struct Args {}

fn main() -> std::process::ExitCode {
    Args::parse();
    match run() {
        Ok(code) => code.into(),
        Err(err) => {
            eprintln!("contractor-run: {err:#}");
            ExitCode::BadInput.into()
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("cannot read the request on stdin")?;
    let request: RunRequest = serde_json::from_str(&input).context("invalid request on stdin")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let code = runtime.block_on(async {
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::task::spawn_blocking(move || {
            let mut stdout = std::io::stdout().lock();
            while let Some(event) = received.blocking_recv() {
                if contractor_protocol::jsonl::write_line(&mut stdout, &event).is_err() {
                    break;
                }
            }
            let _ = stdout.flush();
        });
        let finished = contractor_run::run(request, events).await;
        let _ = printer.await;
        match finished {
            RunEvent::Finished { outcome, .. } => outcome.exit_code(),
            _ => ExitCode::Infrastructure,
        }
    });
    Ok(code)
}
