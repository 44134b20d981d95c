//! `contractor doctor`: checks everything a build needs and says how to fix each problem.
//!
//! Each check yields a line `ok`, `warn` or `FAIL` with what was found and, when it is not
//! ok, the command or setting that fixes it. Checks only read; they change nothing. What
//! concerns the VM host (programs, libvirt, KVM, the guest agent, subordinate uids, free
//! space, the images, and under `qemu:///session` QEMU's launcher) is asked of `contractor-vm
//! check` and `contractor-vm image list`:
//! here, or on a build host over ssh (`contractor doctor --host`, asked through
//! `contractor-host vm`).

use contractor_protocol::tool::Service;
use contractor_protocol::vm::HostCheck;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth knowing (slower, or soon a problem).
    Warn,
    /// A build cannot work until this is fixed.
    Fail,
}

/// One check's finding.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How it came out.
    pub status: Status,
    /// What was checked.
    pub what: String,
    /// What was found, and the fix when it is not ok.
    pub detail: String,
}

fn finding(status: Status, what: &str, detail: String) -> Finding {
    Finding {
        status,
        what: what.to_string(),
        detail,
    }
}

/// Runs every check against the libvirt URI `uri`: of this machine, or with `host` of that
/// build host (its `contractor-vm check` and `image list`, over ssh).
pub fn check(uri: Option<&str>, host: Option<&str>) -> Vec<Finding> {
    let vm = |args: &[&str]| match host {
        // contractor-host runs it there over ssh.
        Some(host) => crate::tools::command(crate::tools::HOST).map(|mut command| {
            command.args([contractor_protocol::fleet::VM_COMMAND, "--host", host]);
            command.args(args);
            command
        }),
        None => crate::tools::command(crate::tools::VM).map(|mut command| {
            command.args(args);
            command
        }),
    };
    let mut findings = Vec::new();
    // The VM host's own default URI unless one is named (a build host's user is not ours).
    let check = match uri {
        Some(uri) => vec!["check", "--uri", uri],
        None => vec!["check"],
    };
    let checked = vm(&check)
        .and_then(|command| crate::tools::answer_of::<HostCheck>(crate::tools::VM, command));
    match &checked {
        Err(err) => findings.push(finding(Status::Fail, "contractor-vm", chain(err))),
        Ok(checked) => findings.extend(vm_host(checked)),
    }
    if host.is_none() {
        findings.push(confinement());
    }
    if let Ok(checked) = &checked {
        findings.extend(launcher(checked));
    }
    let images = vm(&["image", "list"]).and_then(|command| {
        crate::tools::answer_of::<contractor_protocol::image::ImageResult>(
            crate::tools::VM,
            command,
        )
    });
    findings.push(default_image(images));
    findings
}

/// The findings of a VM host's `contractor-vm check`.
fn vm_host(host: &HostCheck) -> Vec<Finding> {
    let mut findings = Vec::new();
    for program in &host.programs {
        findings.push(match &program.path {
            Some(path) => finding(Status::Ok, &program.name, path.display().to_string()),
            None => finding(
                Status::Fail,
                &program.name,
                format!(
                    "not found; install it: sudo apt-get install {} (or run scripts/setup)",
                    program.package
                ),
            ),
        });
    }
    findings.push(if host.libvirt.ok {
        finding(Status::Ok, "libvirt", format!("{} answers", host.uri))
    } else {
        finding(Status::Fail, "libvirt", host.libvirt.error.join(": "))
    });
    findings.push(if host.cpu_virt && host.dev_kvm {
        finding(
            Status::Ok,
            "accelerator",
            "KVM: the CPU has vmx/svm and /dev/kvm exists".into(),
        )
    } else {
        finding(
            Status::Warn,
            "accelerator",
            "TCG (software emulation, several times slower): the CPU has no vmx/svm flag; \
             builds work, boot takes seconds. On real hardware enable virtualisation in the firmware."
                .into(),
        )
    });
    findings.push(match (&host.agent.ok, &host.agent.path) {
        (true, Some(path)) => finding(Status::Ok, "guest agent", path.display().to_string()),
        _ => finding(Status::Fail, "guest agent", host.agent.error.join(": ")),
    });
    if host.dev_kvm_group_rw == Some(false) {
        findings.push(finding(
            Status::Warn,
            "/dev/kvm",
            "/dev/kvm is not readable and writable by its group; libvirt then re-probes QEMU on \
             every call and VM starts take minutes. Fix: sudo chgrp kvm /dev/kvm && sudo chmod 0660 /dev/kvm"
                .into(),
        ));
    }
    if let Some(space) = &host.space {
        let at = space.path.display();
        findings.push(match space.free_bytes {
            Some(free) if free >= 10 << 30 => finding(
                Status::Ok,
                "disk space",
                format!("{} free under {at}", gib(free)),
            ),
            Some(free) => finding(
                Status::Warn,
                "disk space",
                format!(
                    "only {} free under {at}; an image takes about 1 GiB and each running build up to its disk size",
                    gib(free)
                ),
            ),
            None => finding(Status::Warn, "disk space", format!("cannot tell for {at}")),
        });
    }
    if let Some(subuids) = &host.subuids {
        let user = &subuids.user;
        findings.push(if subuids.has_range {
            finding(
                Status::Ok,
                "subordinate uids",
                format!("{user} has a range (image builds run unprivileged)"),
            )
        } else {
            finding(
                Status::Fail,
                "subordinate uids",
                format!(
                    "{user} has no range in /etc/subuid; image builds need one: sudo usermod \
                     --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
                ),
            )
        });
    }
    findings
}

/// Under `qemu:///session`, QEMU is started by the launcher, which the VM host's `check`
/// says is there (none under another URI).
fn launcher(host: &HostCheck) -> Option<Finding> {
    let probe = host.launcher.as_ref()?;
    Some(match &probe.path {
        Some(path) if probe.ok => finding(
            Status::Ok,
            "QEMU confinement",
            format!(
                "under {} QEMU is started by {} (Landlock, seccomp, rlimits)",
                host.uri,
                path.display()
            ),
        ),
        _ => finding(Status::Fail, "QEMU confinement", probe.error.join(": ")),
    })
}

/// Whether the default image is built, from the VM host's `image list`.
fn default_image(
    images: Result<contractor_protocol::image::ImageResult, crate::tools::ToolError>,
) -> Finding {
    use contractor_protocol::image::ImageResult;
    let default = crate::spec::DEFAULT_IMAGE;
    match images {
        Ok(ImageResult::Images { images, .. }) => {
            match images.into_iter().find(|i| i.manifest.name == default) {
                Some(image) => finding(
                    Status::Ok,
                    "image",
                    format!(
                        "{} (agent {}, disk sha256 {}…)",
                        image.dir.display(),
                        image.manifest.agent_version,
                        image
                            .manifest
                            .disk_sha256
                            .get(..12)
                            .unwrap_or(&image.manifest.disk_sha256)
                    ),
                ),
                None => finding(
                    Status::Warn,
                    "image",
                    format!(
                        "{default} is not built yet; the first build builds it (about a minute), \
                         or run: contractor image build"
                    ),
                ),
            }
        }
        Ok(_) => finding(
            Status::Fail,
            "image",
            "contractor-vm image list answered something else than a list of images".into(),
        ),
        Err(err) => finding(
            Status::Fail,
            "image",
            format!("{}; rebuild it: contractor image build", chain(&err)),
        ),
    }
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

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
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
    fn a_vm_hosts_missing_program_and_subuids_fail_naming_the_fix() {
        use contractor_protocol::vm::{CheckTag, Probe, ProgramProbe, SpaceProbe, SubuidProbe};
        let ok = Probe {
            ok: true,
            path: Some("/a".into()),
            error: vec![],
        };
        let host = HostCheck {
            kind: CheckTag::Check,
            version: 1,
            uri: "qemu:///session".into(),
            libvirt: ok.clone(),
            cpu_virt: true,
            dev_kvm: true,
            agent: ok,
            programs: vec![ProgramProbe {
                name: "mmdebstrap".into(),
                package: "mmdebstrap".into(),
                path: None,
            }],
            dev_kvm_group_rw: Some(false),
            subuids: Some(SubuidProbe {
                user: "ci".into(),
                has_range: false,
            }),
            space: Some(SpaceProbe {
                path: "/home/ci".into(),
                free_bytes: Some(1 << 30),
            }),
            launcher: Some(Probe {
                ok: false,
                path: None,
                error: vec!["the QEMU launcher /x/contractor-qemu is missing".into()],
            }),
        };
        let found = vm_host(&host);
        let line = |what: &str| {
            found
                .iter()
                .find(|f| f.what == what)
                .unwrap_or_else(|| panic!("no {what} in {found:?}"))
        };
        assert_eq!(line("mmdebstrap").status, Status::Fail);
        assert!(line("mmdebstrap")
            .detail
            .contains("apt-get install mmdebstrap"));
        assert_eq!(line("/dev/kvm").status, Status::Warn);
        assert_eq!(line("disk space").status, Status::Warn);
        assert!(line("disk space")
            .detail
            .contains("1.0 GiB free under /home/ci"));
        assert_eq!(line("subordinate uids").status, Status::Fail);
        assert!(line("subordinate uids")
            .detail
            .contains("usermod --add-subuids"));
        assert_eq!(line("accelerator").status, Status::Ok);
        let missing = launcher(&host).expect("under qemu:///session");
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.detail.contains("/x/contractor-qemu is missing"));
        let found = HostCheck {
            launcher: Some(Probe {
                ok: true,
                path: Some("/opt/c/contractor-qemu".into()),
                error: vec![],
            }),
            ..host.clone()
        };
        assert_eq!(
            launcher(&found).expect("found").detail,
            "under qemu:///session QEMU is started by /opt/c/contractor-qemu (Landlock, seccomp, rlimits)"
        );
        assert!(launcher(&HostCheck {
            launcher: None,
            ..host
        })
        .is_none());
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
