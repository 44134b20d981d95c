//! `contractor doctor`: checks everything a build needs and says how to fix each problem.
//!
//! Each check yields a line `ok`, `warn` or `FAIL` with what was found and, when it is not
//! ok, the command or setting that fixes it. Checks only read; they change nothing. What
//! concerns the VM host (programs, libvirt, KVM, the guest agent, subordinate uids, free
//! space, the default image, and under `qemu:///session` QEMU's launcher) is judged by
//! `contractor-vm check`, whose answer carries its findings: here, or on a build host over
//! ssh (`contractor doctor --host`, asked through `contractor-host vm`), where that host's
//! own contractor-vm judges its own facts. The front end adds only its own finding: the
//! confinement this machine's tools get, as a proxy reports it (judged by
//! `contractor_protocol::confinement`).

use contractor_protocol::tool::Service;
use contractor_protocol::vm::HostCheck;
pub use contractor_protocol::vm::{Finding, FindingStatus as Status};

/// Runs every check against the libvirt URI `uri`: of this machine, or with `host` of that
/// build host (its `contractor-vm check`, over ssh).
pub fn check(uri: Option<&str>, host: Option<&str>) -> Vec<Finding> {
    // The VM host's own default URI unless one is named (a build host's user is not ours).
    let mut args = vec!["check"];
    args.extend(uri.iter().flat_map(|uri| ["--uri", uri]));
    let command = match host {
        // contractor-host runs it there over ssh.
        Some(host) => crate::tools::command(crate::tools::HOST).map(|mut command| {
            command.args([contractor_protocol::fleet::VM_COMMAND, "--host", host]);
            command.args(&args);
            command
        }),
        None => crate::tools::command(crate::tools::VM).map(|mut command| {
            command.args(&args);
            command
        }),
    };
    let checked =
        command.and_then(|command| crate::tools::answer_of::<HostCheck>(crate::tools::VM, command));
    let mut findings = match checked {
        Ok(checked) => checked.findings,
        Err(err) => vec![Finding::new(Status::Fail, "contractor-vm", chain(&err))],
    };
    if host.is_none() {
        findings.push(confinement());
    }
    findings
}

/// What confinement this kernel gives the tools that serve the guest, asked of a real one:
/// a proxy started on a loopback port (it confines itself before it serves, as in a build)
/// and stopped again. Its `ready` line says what holds and what does not.
fn confinement() -> Finding {
    const WHAT: &str = "confinement";
    let name = crate::tools::PROXY;
    // The proxy is stopped (SIGTERM) when its Service is dropped, here at once.
    let started = crate::tools::command(name).and_then(|mut command| {
        command
            .args(["--listen", "127.0.0.1:0", "--json-errors"])
            .stderr(std::process::Stdio::null());
        Service::start(name, command, |_| {}, crate::tools::Answers::drain)
    });
    match started.map(|proxy| proxy.confinement.clone()) {
        Err(err) => Finding::new(Status::Fail, WHAT, chain(&err)),
        Ok(None) => Finding::new(
            Status::Warn,
            WHAT,
            "contractor-proxy reported none (a tool of another release?); reinstall contractor",
        ),
        Ok(Some(c)) => c.finding(),
    }
}

use contractor_protocol::result::joined_chain as chain;
