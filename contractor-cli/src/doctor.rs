//! `contractor doctor`: checks everything a build needs and says how to fix each problem.
//!
//! Each check yields a line `ok`, `warn` or `FAIL` with what was found and, when it is not
//! ok, the command or setting that fixes it. Checks only read; they change nothing. What
//! concerns the VM host (libvirt, KVM, the guest agent, the images) is asked of
//! `contractor-vm check` and `contractor-vm image list`.

use std::path::Path;

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

/// Runs every check against the libvirt URI `uri`.
pub fn check(uri: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (program, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("mmdebstrap", "mmdebstrap"),
        ("debugfs", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
    ] {
        findings.push(match which(program) {
            Some(path) => finding(Status::Ok, program, path),
            None => finding(
                Status::Fail,
                program,
                format!(
                    "not found; install it: sudo apt-get install {package} (or run scripts/setup)"
                ),
            ),
        });
    }

    let args = [
        std::ffi::OsStr::new("check"),
        std::ffi::OsStr::new("--uri"),
        std::ffi::OsStr::new(uri),
    ];
    match crate::tools::answer::<HostCheck>(crate::tools::VM, &args) {
        Err(err) => findings.push(finding(Status::Fail, "contractor-vm", chain(&err))),
        Ok(host) => {
            findings.push(if host.libvirt.ok {
                finding(Status::Ok, "libvirt", format!("{} answers", host.uri))
            } else {
                finding(Status::Fail, "libvirt", host.libvirt.error.join(": "))
            });
            findings.push(if host.cpu_virt && host.dev_kvm {
                finding(Status::Ok, "accelerator", "KVM: the CPU has vmx/svm and /dev/kvm exists".into())
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
                (true, Some(path)) => {
                    finding(Status::Ok, "guest agent", path.display().to_string())
                }
                _ => finding(Status::Fail, "guest agent", host.agent.error.join(": ")),
            });
        }
    }
    findings.push(confinement());
    if uri.ends_with("/session") {
        findings.push(match crate::tools::locate(crate::tools::QEMU_LAUNCHER) {
            Ok(path) => finding(
                Status::Ok,
                "QEMU confinement",
                format!(
                    "under {uri} QEMU is started by {} (Landlock, seccomp, rlimits)",
                    path.display()
                ),
            ),
            Err(err) => finding(Status::Fail, "QEMU confinement", chain(&err)),
        });
    }
    if let Some(kvm) = kvm_permission_problem() {
        findings.push(finding(Status::Warn, "/dev/kvm", kvm));
    }

    match crate::paths::data_dir() {
        Err(err) => findings.push(finding(Status::Fail, "data directory", err.to_string())),
        Ok(dir) => {
            let default = crate::spec::DEFAULT_IMAGE;
            findings.push(match crate::image::list() {
                Ok(images) => match images.into_iter().find(|i| i.manifest.name == default) {
                    Some(image) => finding(
                        Status::Ok,
                        "image",
                        format!(
                            "{} (agent {}, disk sha256 {}…)",
                            image.dir.display(),
                            image.manifest.agent_version,
                            image.manifest.disk_sha256.get(..12).unwrap_or(&image.manifest.disk_sha256)
                        ),
                    ),
                    None => finding(
                        Status::Warn,
                        "image",
                        format!(
                            "{default} is not built yet; the first build builds it (about a minute), or run: contractor image build"
                        ),
                    ),
                },
                Err(err) => finding(Status::Fail, "image", format!("{}; rebuild it: contractor image build", chain(&err))),
            });
            let existing = dir
                .ancestors()
                .find(|d| d.exists())
                .unwrap_or(Path::new("/"));
            findings.push(match free_bytes(existing) {
                Some(free) if free >= 10 << 30 => {
                    finding(Status::Ok, "disk space", format!("{} free under {}", gib(free), existing.display()))
                }
                Some(free) => finding(
                    Status::Warn,
                    "disk space",
                    format!(
                        "only {} free under {}; an image takes about 1 GiB and each running build up to its disk size",
                        gib(free),
                        existing.display()
                    ),
                ),
                None => finding(Status::Warn, "disk space", format!("cannot tell for {}", existing.display())),
            });
        }
    }

    if !nix::unistd::geteuid().is_root() {
        let user = std::env::var("USER").unwrap_or_default();
        let has_range = std::fs::read_to_string("/etc/subuid")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(':').next() == Some(user.as_str()));
        findings.push(if has_range {
            finding(Status::Ok, "subordinate uids", format!("{user} has a range (image builds run unprivileged)"))
        } else {
            finding(
                Status::Fail,
                "subordinate uids",
                format!("{user} has no range in /etc/subuid; image builds need one: sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"),
            )
        });
    }
    findings
}

/// What confinement this kernel gives the tools that serve the guest, asked of a real one:
/// a proxy started on a loopback port (it confines itself before it serves, as in a build)
/// and stopped again. Its `ready` line says what holds and what does not.
fn confinement() -> Finding {
    const WHAT: &str = "confinement";
    let name = crate::tools::PROXY;
    let started = crate::tools::command(name).and_then(|mut command| {
        command
            .args(["--listen", "127.0.0.1:0", "--json-errors"])
            .stderr(std::process::Stdio::null());
        crate::tools::spawn(name, command)
    });
    let mut child = match started {
        Ok(child) => child,
        Err(err) => return finding(Status::Fail, WHAT, chain(&err)),
    };
    let ready = crate::tools::Answers::of(name, &mut child)
        .and_then(|mut answers| answers.first::<contractor_protocol::service::Ready>(&mut child));
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = child.wait();
    match ready.map(|ready| ready.confinement) {
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

fn which(program: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .map(|found| found.display().to_string())
}

/// Without udev, /dev/kvm may stay root-only: libvirt then re-probes QEMU on every call and
/// each VM start takes a minute and a half.
fn kvm_permission_problem() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    if meta.mode() & 0o060 == 0o060 {
        return None;
    }
    Some(
        "/dev/kvm is not readable and writable by its group; libvirt then re-probes QEMU on every \
         call and VM starts take minutes. Fix: sudo chgrp kvm /dev/kvm && sudo chmod 0660 /dev/kvm"
            .into(),
    )
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stat.blocks_available() * stat.fragment_size())
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
