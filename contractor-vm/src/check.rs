//! `contractor-vm check`: whether this host can run builder VMs, as facts and as findings.
//!
//! The probes gather the facts (programs, libvirt, KVM, the guest agent, subordinate uids,
//! free space, QEMU's launcher); [`findings`] judges them, with the default image, into
//! `ok`, `warn` or `fail` lines that each name the fix when it is not ok. The judgement is
//! this tool's alone, so that `contractor doctor` prints the same findings for this machine
//! and for a build host (whose own contractor-vm judges its own facts). Checks only read;
//! they change nothing.

use std::io::Read;
use std::path::PathBuf;

use contractor_protocol::image::DEFAULT_IMAGE;
use contractor_protocol::result::joined_chain;
use contractor_protocol::vm::{
    CheckTag, Finding, FindingStatus, HostCheck, Probe, ProgramProbe, SpaceProbe, SubuidProbe,
};
use contractor_protocol::PROTOCOL_VERSION;

use crate::accel::{kvm_verdict, KvmFacts, QemuPlace};
use crate::image::{Image, ImageError};
use crate::lifecycle::connect;

/// A probe's answer: fine (with the file found, if any), or the error and its causes.
fn probe<E: std::error::Error>(found: Result<Option<PathBuf>, E>) -> Probe {
    match found {
        Ok(path) => Probe {
            ok: true,
            path,
            error: Vec::new(),
        },
        Err(e) => Probe {
            ok: false,
            path: None,
            error: contractor_protocol::result::error_chain(&e),
        },
    }
}

/// What `check` reports of this host for libvirt at `uri`: the facts and their findings.
pub fn host_check(uri: String) -> HostCheck {
    let conn = connect(&uri);
    let libvirt = probe(conn.as_ref().map(|_| None));
    // The facts `auto` and an explicit `kvm` are decided on, gathered the same way.
    let kvm = crate::accel::probe(&uri, || {
        conn.as_ref().ok().and_then(|c| c.capabilities().ok())
    });
    drop(conn);
    let local = kvm.place != QemuPlace::Remote;
    let agent = probe(crate::image::agent_path().map(Some));
    let launcher = crate::lifecycle::session_launcher(&uri).map(|found| probe(found.map(Some)));
    let mut check = HostCheck {
        kind: CheckTag::Check,
        version: PROTOCOL_VERSION,
        uri,
        libvirt,
        cpu_virt: kvm.cpu_virt,
        dev_kvm: kvm.dev_kvm,
        dev_kvm_yours: kvm.dev_kvm_yours,
        libvirt_kvm: kvm.libvirt_kvm,
        agent,
        programs: NEEDED_PROGRAMS
            .iter()
            .map(|(name, package)| ProgramProbe {
                name: name.to_string(),
                package: package.to_string(),
                path: which(name),
            })
            .collect(),
        dev_kvm_group_rw: dev_kvm_group_rw().filter(|_| local),
        subuids: subuids(),
        space: space(),
        launcher,
        findings: Vec::new(),
    };
    check.findings = findings(&check, crate::image::list());
    check
}

/// The programs a VM host needs, with the Debian package of each.
const NEEDED_PROGRAMS: [(&str, &str); 5] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("mmdebstrap", "mmdebstrap"),
    ("debugfs", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
];

/// Where `program` is: on `PATH`, else in `/usr/sbin` or `/sbin`.
fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Whether `/dev/kvm`'s group may read and write it; `None` without `/dev/kvm`.
fn dev_kvm_group_rw() -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    Some(meta.mode() & 0o060 == 0o060)
}

/// The most of `/etc/subuid` read.
const MAX_SUBUID: u64 = 1 << 20;

/// Whether `$USER` has subordinate uids; `None` for root, who needs none.
fn subuids() -> Option<SubuidProbe> {
    if nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = std::env::var("USER").unwrap_or_default();
    let mut text = String::new();
    if let Ok(file) = std::fs::File::open("/etc/subuid") {
        let _ = file.take(MAX_SUBUID).read_to_string(&mut text);
    }
    let has_range = text
        .lines()
        .any(|l| l.split(':').next() == Some(user.as_str()));
    Some(SubuidProbe { user, has_range })
}

/// The free space at the data directory (or its nearest existing ancestor).
fn space() -> Option<SpaceProbe> {
    let dir = contractor_protocol::image::data_dir().ok()?;
    let existing = dir.ancestors().find(|d| d.exists())?.to_path_buf();
    let free_bytes = nix::sys::statvfs::statvfs(&existing)
        .ok()
        .map(|stat| stat.blocks_available() * stat.fragment_size());
    Some(SpaceProbe {
        path: existing,
        free_bytes,
    })
}

/// Free space under which the data directory is a warning: an image takes about 1 GiB and
/// each running build up to its disk size.
const LOW_SPACE: u64 = 10 << 30;

/// The findings of a VM host's facts `host` and of its images (`images`, as
/// [`crate::image::list`] gave them), in the order `contractor doctor` prints them.
pub fn findings(host: &HostCheck, images: Result<Vec<Image>, ImageError>) -> Vec<Finding> {
    use FindingStatus::{Fail, Ok, Warn};
    let mut found = Vec::new();
    for program in &host.programs {
        found.push(match &program.path {
            Some(path) => Finding::new(Ok, &program.name, path.display().to_string()),
            None => Finding::new(
                Fail,
                &program.name,
                format!(
                    "not found; install it: sudo apt-get install {} (or run scripts/setup)",
                    program.package
                ),
            ),
        });
    }
    found.push(if host.libvirt.ok {
        Finding::new(Ok, "libvirt", format!("{} answers", host.uri))
    } else {
        Finding::new(Fail, "libvirt", host.libvirt.error.join(": "))
    });
    found.push(accelerator_finding(host));
    found.push(match (&host.agent.ok, &host.agent.path) {
        (true, Some(path)) => Finding::new(Ok, "guest agent", path.display().to_string()),
        _ => Finding::new(Fail, "guest agent", host.agent.error.join(": ")),
    });
    if host.dev_kvm_group_rw == Some(false) {
        found.push(Finding::new(
            Warn,
            "/dev/kvm",
            "/dev/kvm is not readable and writable by its group; libvirt then re-probes QEMU on \
             every call and VM starts take minutes. Fix: sudo chgrp kvm /dev/kvm && sudo chmod 0660 /dev/kvm",
        ));
    }
    if let Some(space) = &host.space {
        found.push(space_finding(space));
    }
    if let Some(subuids) = &host.subuids {
        let user = &subuids.user;
        found.push(if subuids.has_range {
            Finding::new(
                Ok,
                "subordinate uids",
                format!("{user} has a range (image builds run unprivileged)"),
            )
        } else {
            Finding::new(
                Fail,
                "subordinate uids",
                format!(
                    "{user} has no range in /etc/subuid; image builds need one: sudo usermod \
                     --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
                ),
            )
        });
    }
    found.extend(launcher_finding(host));
    found.push(image_finding(images));
    found
}

/// Whether the data directory has room.
fn space_finding(space: &SpaceProbe) -> Finding {
    let at = space.path.display();
    match space.free_bytes {
        Some(free) if free >= LOW_SPACE => Finding::new(
            FindingStatus::Ok,
            "disk space",
            format!("{} free under {at}", gib(free)),
        ),
        Some(free) => Finding::new(
            FindingStatus::Warn,
            "disk space",
            format!(
                "only {} free under {at}; an image takes about 1 GiB and each running build up to its disk size",
                gib(free)
            ),
        ),
        None => Finding::new(
            FindingStatus::Warn,
            "disk space",
            format!("cannot tell for {at}"),
        ),
    }
}

/// Under `qemu:///session`, QEMU is started by the launcher, which the probe found or not
/// (no finding under another URI).
fn launcher_finding(host: &HostCheck) -> Option<Finding> {
    let probe = host.launcher.as_ref()?;
    Some(match &probe.path {
        Some(path) if probe.ok => Finding::new(
            FindingStatus::Ok,
            "QEMU confinement",
            format!(
                "under {} QEMU is started by {} (Landlock, seccomp, rlimits)",
                host.uri,
                path.display()
            ),
        ),
        _ => Finding::new(
            FindingStatus::Fail,
            "QEMU confinement",
            probe.error.join(": "),
        ),
    })
}

/// Whether the default image is built, from this host's images.
fn image_finding(images: Result<Vec<Image>, ImageError>) -> Finding {
    match images {
        Ok(images) => match images
            .into_iter()
            .find(|i| i.manifest.name == DEFAULT_IMAGE)
        {
            Some(image) => Finding::new(
                FindingStatus::Ok,
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
            None => Finding::new(
                FindingStatus::Warn,
                "image",
                format!(
                    "{DEFAULT_IMAGE} is not built yet; the first build builds it (about a minute), \
                     or run: contractor image build"
                ),
            ),
        },
        Err(err) => Finding::new(
            FindingStatus::Fail,
            "image",
            format!("{}; rebuild it: contractor image build", joined_chain(&err)),
        ),
    }
}

/// What `auto` picks for `host` and why, judged by [`kvm_verdict`] as `auto` judges it.
fn accelerator_finding(host: &HostCheck) -> Finding {
    let facts = KvmFacts {
        place: QemuPlace::of(&host.uri),
        cpu_virt: host.cpu_virt,
        dev_kvm: host.dev_kvm,
        dev_kvm_yours: host.dev_kvm_yours,
        libvirt_kvm: host.libvirt_kvm,
    };
    let tcg = "TCG (software emulation, several times slower; builds work, boot takes seconds)";
    match kvm_verdict(&host.uri, &facts) {
        Ok(()) if facts.place == QemuPlace::Remote => Finding::new(
            FindingStatus::Ok,
            "accelerator",
            format!(
                "KVM: the host's CPU has vmx/svm and libvirt at {} offers KVM",
                host.uri
            ),
        ),
        Ok(()) => Finding::new(
            FindingStatus::Ok,
            "accelerator",
            "KVM: the CPU has vmx/svm, /dev/kvm is open to QEMU's user and libvirt offers KVM",
        ),
        Err(reason) => Finding::new(
            FindingStatus::Warn,
            "accelerator",
            format!("{tcg}: {reason}"),
        ),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Facts with one of everything that can go wrong, under `qemu:///session`.
    fn troubled_host() -> HostCheck {
        let ok = Probe {
            ok: true,
            path: Some("/a".into()),
            error: vec![],
        };
        HostCheck {
            kind: CheckTag::Check,
            version: 1,
            uri: "qemu:///session".into(),
            libvirt: ok.clone(),
            cpu_virt: true,
            dev_kvm: true,
            dev_kvm_yours: Some(true),
            libvirt_kvm: Some(true),
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
            findings: vec![],
        }
    }

    fn line<'a>(found: &'a [Finding], what: &str) -> &'a Finding {
        found
            .iter()
            .find(|f| f.what == what)
            .unwrap_or_else(|| panic!("no {what} in {found:?}"))
    }

    #[test]
    fn a_vm_hosts_missing_program_and_subuids_fail_naming_the_fix() {
        use FindingStatus::{Fail, Ok, Warn};
        let host = troubled_host();
        let found = findings(&host, std::result::Result::Ok(vec![]));
        assert_eq!(line(&found, "mmdebstrap").status, Fail);
        assert!(line(&found, "mmdebstrap")
            .detail
            .contains("apt-get install mmdebstrap"));
        assert_eq!(line(&found, "/dev/kvm").status, Warn);
        assert_eq!(line(&found, "disk space").status, Warn);
        assert!(line(&found, "disk space")
            .detail
            .contains("1.0 GiB free under /home/ci"));
        assert_eq!(line(&found, "subordinate uids").status, Fail);
        assert!(line(&found, "subordinate uids")
            .detail
            .contains("usermod --add-subuids"));
        assert_eq!(line(&found, "accelerator").status, Ok);
        let missing = line(&found, "QEMU confinement");
        assert_eq!(missing.status, Fail);
        assert!(missing.detail.contains("/x/contractor-qemu is missing"));
        let there = HostCheck {
            launcher: Some(Probe {
                ok: true,
                path: Some("/opt/c/contractor-qemu".into()),
                error: vec![],
            }),
            ..host.clone()
        };
        assert_eq!(
            line(&findings(&there, std::result::Result::Ok(vec![])), "QEMU confinement").detail,
            "under qemu:///session QEMU is started by /opt/c/contractor-qemu (Landlock, seccomp, rlimits)"
        );
        let elsewhere = HostCheck {
            launcher: None,
            ..host
        };
        let found = findings(&elsewhere, std::result::Result::Ok(vec![]));
        assert!(
            found.iter().all(|f| f.what != "QEMU confinement"),
            "{found:?}"
        );
    }

    #[test]
    fn the_accelerator_finding_gives_tcgs_reason_as_auto_decides_it() {
        use FindingStatus::{Ok, Warn};
        let session = troubled_host();
        let accelerator = |host: &HostCheck| {
            line(
                &findings(host, std::result::Result::Ok(vec![])),
                "accelerator",
            )
            .clone()
        };
        assert_eq!(accelerator(&session).status, Ok);
        // Not in group kvm: libvirt's own user may use KVM, QEMU running as you may not.
        let not_yours = accelerator(&HostCheck {
            dev_kvm_yours: Some(false),
            ..session.clone()
        });
        assert_eq!(not_yours.status, Warn);
        assert!(
            not_yours.detail.contains("you cannot open /dev/kvm")
                && not_yours.detail.contains("group kvm"),
            "{not_yours:?}"
        );
        let no_flag = accelerator(&HostCheck {
            cpu_virt: false,
            ..session.clone()
        });
        assert!(
            no_flag.status == Warn && no_flag.detail.contains("no vmx or svm flag"),
            "{no_flag:?}"
        );
        let no_device = accelerator(&HostCheck {
            dev_kvm: false,
            ..session.clone()
        });
        assert!(
            no_device.detail.contains("/dev/kvm does not exist"),
            "{no_device:?}"
        );
        let system = HostCheck {
            uri: "qemu:///system".into(),
            dev_kvm_yours: None,
            libvirt_kvm: Some(false),
            ..session.clone()
        };
        let not_offered = accelerator(&system);
        assert!(
            not_offered.status == Warn
                && not_offered
                    .detail
                    .contains("libvirt at qemu:///system does not offer KVM"),
            "{not_offered:?}"
        );
        // A remote host goes by its own capabilities, whatever this host has.
        let remote = HostCheck {
            uri: "qemu+ssh://builder/system".into(),
            dev_kvm: false,
            dev_kvm_yours: None,
            libvirt_kvm: Some(true),
            ..session
        };
        let there = accelerator(&remote);
        assert!(
            there.status == Ok && there.detail.contains("qemu+ssh://builder/system"),
            "{there:?}"
        );
    }

    #[test]
    fn the_default_image_is_ok_when_built_a_warning_when_not_and_a_failure_when_unreadable() {
        let host = troubled_host();
        let image = |found: Result<Vec<Image>, ImageError>| {
            findings(&host, found)
                .pop()
                .expect("the image is the last finding")
        };
        let missing = image(Ok(vec![]));
        assert_eq!(
            (missing.status, missing.what.as_str()),
            (FindingStatus::Warn, "image")
        );
        assert!(
            missing
                .detail
                .starts_with("debian-12-build is not built yet"),
            "{missing:?}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.qcow2");
        std::fs::write(&disk, b"disk").expect("disk");
        let built = |name: &str| Image {
            dir: dir.path().join(name),
            manifest: crate::image::new_manifest(name, "bookworm", &disk, "a0").expect("manifest"),
        };
        let found = image(Ok(vec![built("debian-13-build"), built(DEFAULT_IMAGE)]));
        assert_eq!(found.status, FindingStatus::Ok, "{found:?}");
        assert!(
            found.detail.starts_with(&format!(
                "{} (agent ",
                dir.path().join(DEFAULT_IMAGE).display()
            )),
            "{found:?}"
        );
        assert!(found.detail.contains(", disk sha256 "), "{found:?}");

        let unreadable = image(Err(ImageError::Locate(std::io::Error::other("gone"))));
        assert_eq!(unreadable.status, FindingStatus::Fail);
        assert!(
            unreadable
                .detail
                .ends_with("; rebuild it: contractor image build"),
            "{unreadable:?}"
        );
    }
}
