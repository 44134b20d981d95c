//! `contractor doctor`: checks everything a build needs and says how to fix each problem.
//!
//! Each check yields a line `ok`, `warn` or `FAIL` with what was found and, when it is not
//! ok, the command or setting that fixes it. Checks only read; they change nothing. What
//! concerns the VM host (programs, libvirt, KVM, the guest agent, subordinate uids, free
//! space, the default image, and under `qemu:///session` QEMU's launcher) is judged by
//! `contractor-vm check`, whose answer carries its findings: here, or on a build host over
//! ssh (`contractor doctor --host`, asked through `contractor-host vm`), where that host's
//! own contractor-vm judges its own facts. The front end adds only its own finding: the
//! confinement this machine's tools get.

use contractor_protocol::tool::Service;
use contractor_protocol::vm::HostCheck;
pub use contractor_protocol::vm::{Finding, FindingStatus as Status};

fn finding(status: Status, what: &str, detail: String) -> Finding {
    Finding::new(status, what, detail)
}

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
        Err(err) => vec![finding(Status::Fail, "contractor-vm", chain(&err))],
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
        Err(err) => finding(Status::Fail, WHAT, chain(&err)),
        Ok(None) => finding(
            Status::Warn,
            WHAT,
            "contractor-proxy reported none (a tool of another release?); reinstall contractor"
                .into(),
        ),
        Ok(Some(c)) => confinement_finding(&c),
    }
}

/// The doctor's line for what a tool said of its confinement.
fn confinement_finding(c: &contractor_protocol::service::Confinement) -> Finding {
    const WHAT: &str = "confinement";
    let landlock = match (c.landlock_abi, c.landlock_fs, c.landlock_net) {
        (0, _, _) => "no Landlock".to_string(),
        (abi, true, true) => format!("Landlock ABI {abi} (files and TCP)"),
        (abi, true, false) => format!("Landlock ABI {abi} (files only)"),
        (abi, false, _) => format!("Landlock ABI {abi} (not enforced)"),
    };
    let seccomp = if c.seccomp { "seccomp" } else { "no seccomp" };
    let level = format!("{landlock}, {seccomp}, no_new_privs, rlimits");
    if c.enforced && c.warnings.is_empty() {
        return finding(
            Status::Ok,
            WHAT,
            format!(
                "{level}: the store, proxy and relay each reach only their own files and ports"
            ),
        );
    }
    let mut fixes = Vec::new();
    if c.landlock_abi == 0 {
        fixes.push("Landlock needs Linux 5.13 or later with `landlock` in the lsm= boot parameter (or CONFIG_LSM)");
    } else if !c.landlock_net {
        fixes.push("Landlock's TCP rules need Linux 6.7 or later (ABI 4)");
    }
    if !c.seccomp {
        fixes.push("seccomp filters need a kernel with CONFIG_SECCOMP_FILTER");
    }
    let fix = if fixes.is_empty() {
        String::new()
    } else {
        format!(". {}", fixes.join("; "))
    };
    finding(
        Status::Warn,
        WHAT,
        format!(
            "{level}; what does not hold: {}{fix}",
            c.warnings.join("; ")
        ),
    )
}

use contractor_protocol::result::joined_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;
    use contractor_protocol::service::Confinement;

    fn confinement(abi: u32, net: bool, seccomp: bool, warnings: &[&str]) -> Confinement {
        Confinement {
            enforced: true,
            no_new_privs: true,
            landlock_abi: abi,
            landlock_fs: abi > 0,
            landlock_net: net,
            seccomp,
            rlimits: true,
            warnings: warnings.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_doctor_names_the_level_and_what_is_missing() {
        let full = confinement_finding(&confinement(7, true, true, &[]));
        assert_eq!(full.status, Status::Ok);
        assert!(
            full.detail
                .contains("Landlock ABI 7 (files and TCP), seccomp"),
            "{}",
            full.detail
        );

        let debian = confinement_finding(&confinement(2, false, true, &["TCP is NOT confined"]));
        assert_eq!(debian.status, Status::Warn);
        assert!(
            debian.detail.contains("ABI 2 (files only)"),
            "{}",
            debian.detail
        );
        assert!(
            debian.detail.contains("TCP is NOT confined"),
            "{}",
            debian.detail
        );
        assert!(debian.detail.contains("Linux 6.7"), "{}", debian.detail);

        let bare = confinement_finding(&confinement(
            0,
            false,
            false,
            &["no Landlock", "no seccomp"],
        ));
        assert_eq!(bare.status, Status::Warn);
        assert!(bare.detail.contains("lsm="), "{}", bare.detail);
        assert!(
            bare.detail.contains("CONFIG_SECCOMP_FILTER"),
            "{}",
            bare.detail
        );
    }
}
