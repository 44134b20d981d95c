//! The front end's questions to `contractor-host` besides `send`: `resolve` (which build
//! hosts: those given, else the configuration's), `hosts` (each one's room and the line)
//! and `vm` (`contractor-vm check` run on a build host, for `contractor
//! doctor --host`). Each reads at most one request line and answers in JSON on stdout.

use std::io::BufReader;

use contractor_protocol::error::ToolCode;
use contractor_protocol::fleet::{FleetRequest, ResolveRequest, Resolved};
use contractor_protocol::hosted::MAX_REQUEST_BYTES;
use contractor_protocol::jsonl::{self, JsonlReader};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

use crate::buildhost::{self, BuildHost, HOST_FORM};
use crate::send::{checked_fleet, read_request, Refused};

/// The one request line on stdin of `what`; a missing one is refused.
fn request<T: serde::de::DeserializeOwned>(what: &str) -> Result<T, Refused> {
    let mut input = JsonlReader::with_limit(BufReader::new(std::io::stdin()), MAX_REQUEST_BYTES);
    read_request(&mut input, what)?.ok_or_else(|| Refused {
        code: ToolCode::NoRequest,
        chain: vec![format!("no {what} request on stdin")],
    })
}

/// Writes `answer` on stdout: exit 0, or 3 when stdout is gone.
fn answer(answer: &impl serde::Serialize) -> ExitCode {
    match jsonl::write_line(&mut std::io::stdout(), answer) {
        Ok(()) => ExitCode::Success,
        Err(_) => ExitCode::Infrastructure,
    }
}

/// `contractor-host resolve`: the build hosts given, else the configuration's.
pub fn resolve() -> ExitCode {
    let request: ResolveRequest = match request("resolve") {
        Ok(request) => request,
        Err(refused) => return refused.report(),
    };
    if request.version != PROTOCOL_VERSION {
        return Refused {
            code: ToolCode::Unsupported,
            chain: vec![format!(
                "version: {} is not supported; this is protocol {PROTOCOL_VERSION}",
                request.version
            )],
        }
        .report();
    }
    match buildhost::resolve(&request.hosts) {
        Ok((hosts, config)) => answer(&Resolved {
            version: PROTOCOL_VERSION,
            hosts: hosts.iter().map(BuildHost::to_string).collect(),
            config,
        }),
        Err(why) => Refused {
            code: ToolCode::BadHost,
            chain: vec![why],
        }
        .report(),
    }
}

/// `contractor-host hosts`: each host's room and the line here.
pub fn hosts() -> ExitCode {
    let request: FleetRequest = match request("hosts") {
        Ok(request) => request,
        Err(refused) => return refused.report(),
    };
    match checked_fleet(&request) {
        Ok(hosts) => answer(&crate::fleet::list(
            &hosts,
            request.cpus,
            request.memory_mib,
        )),
        Err(refused) => refused.report(),
    }
}

/// What `contractor-host vm --host H …` may run there: `contractor-vm check [--uri U]` (the
/// doctor's one question, its findings judged there), with `--json-errors` allowed last.
fn allowed_vm_args(args: &[String]) -> bool {
    let args = match args.last().map(String::as_str) {
        Some("--json-errors") => &args[..args.len() - 1],
        _ => args,
    };
    match args {
        [check] => check == "check",
        [check, flag, uri] => {
            check == "check"
                && flag == "--uri"
                && !uri.is_empty()
                && uri
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"'\"\\`$;&|<>(){}*?!#~".contains(&b))
        }
        _ => false,
    }
}

/// `contractor-host vm --host H ARGS…`: runs `contractor-vm ARGS…` on the build host over
/// ssh, its answer on this process's stdout as the build host wrote it (the front end reads
/// it as `contractor-vm`'s), its exit code ssh's.
pub fn vm(args: &[String]) -> std::process::ExitCode {
    let json = args.last().is_some_and(|a| a == "--json-errors");
    let refuse = |why: String| {
        contractor_protocol::error::ErrorObject::report(
            "contractor-host",
            ToolCode::Usage,
            vec![why],
            json,
        );
        std::process::ExitCode::from(ExitCode::BadInput)
    };
    let (host, rest) = match args {
        [flag, host, rest @ ..] if flag == "--host" => (host, rest),
        _ => {
            return refuse(
                "usage: contractor-host vm --host HOST check [--uri URI] [--json-errors]".into(),
            )
        }
    };
    let host = match BuildHost::parse(host) {
        Ok(host) => host,
        Err(why) => {
            return refuse(format!(
                "--host {host:?}: {why}; a build host is {HOST_FORM}"
            ))
        }
    };
    if !allowed_vm_args(rest) {
        return refuse(format!(
            "{rest:?}: only `check [--uri URI]` is run on a build host"
        ));
    }
    let mut remote = vec!["contractor-vm"];
    remote.extend(rest.iter().map(String::as_str));
    let mut ssh = host.ssh(&remote);
    let status = contractor_protocol::tool::start(&mut ssh).and_then(|mut child| child.wait());
    match status.map(|s| s.code()) {
        // ssh's own exit code (255: it could not connect), as the front end reports it.
        Ok(Some(code)) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Ok(None) => ExitCode::Infrastructure.into(),
        Err(err) => {
            eprintln!("contractor-host: cannot run ssh for {host}: {err}");
            ExitCode::Infrastructure.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_checks_of_the_doctor_are_run_on_a_build_host() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(allowed_vm_args(&args(&["check", "--json-errors"])));
        assert!(allowed_vm_args(&args(&[
            "check",
            "--uri",
            "qemu:///session"
        ])));
        assert!(!allowed_vm_args(&args(&["image", "list", "--json-errors"])));
        assert!(!allowed_vm_args(&args(&["destroy", "x"])));
        assert!(!allowed_vm_args(&args(&["check", "--uri", "x;rm -rf ~"])));
        assert!(!allowed_vm_args(&args(&[])));
    }
}
