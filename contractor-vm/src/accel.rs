//! Choosing the accelerator. KVM is used only where it can work for whoever runs QEMU:
//! the CPU has the `vmx` or `svm` flag (on this host, `/proc/cpuinfo`; on a remote one, its
//! libvirt capabilities), and libvirt's capabilities offer the `kvm` domain type for
//! x86_64 guests (libvirt lists it only when the user it runs QEMU as can open
//! `/dev/kvm`: under `qemu:///session` that is this user, under `qemu:///system`
//! libvirt's); locally `/dev/kvm` must exist, and under `qemu:///session` this user must be
//! able to read and write it. [`probe`] gathers these facts (one capabilities call, only
//! when the CPU flag does not already rule KVM out) and [`kvm_verdict`] alone judges them,
//! so that `auto` ([`resolve`]), an explicit `kvm` and `contractor-vm check` cannot
//! disagree. `auto` picks TCG, which always works, wherever KVM cannot; an explicit `kvm`
//! that cannot work is refused with the reason before libvirt is asked to start anything.

use std::io::Read;
use std::path::Path;

use contractor_protocol::vm::Accel;
use nix::unistd::AccessFlags;

/// The most of `/proc/cpuinfo` read (its flags lines repeat per CPU; the first suffices).
const MAX_CPUINFO: u64 = 1 << 20;

/// The device QEMU opens for KVM.
const DEV_KVM: &str = "/dev/kvm";

/// True when a `/proc/cpuinfo` text has the `vmx` (Intel) or `svm` (AMD) flag.
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim() == "flags" && value.split_whitespace().any(|f| f == "vmx" || f == "svm")
    })
}

/// True when a libvirt capabilities document reports `vmx` or `svm` on the host CPU.
pub fn capabilities_have_virt(capabilities: &str) -> bool {
    let Ok(doc) = roxmltree::Document::parse(capabilities) else {
        return false;
    };
    doc.descendants()
        .filter(|n| n.has_tag_name("host"))
        .flat_map(|host| host.descendants())
        .filter(|n| n.has_tag_name("feature"))
        .any(|f| matches!(f.attribute("name"), Some("vmx" | "svm")))
}

/// True when a libvirt capabilities document offers the `kvm` domain type for x86_64
/// guests (`<guest><arch name='x86_64'>…<domain type='kvm'/>`).
pub fn capabilities_offer_kvm(capabilities: &str) -> bool {
    let Ok(doc) = roxmltree::Document::parse(capabilities) else {
        return false;
    };
    doc.root_element()
        .children()
        .filter(|n| n.has_tag_name("guest"))
        .flat_map(|guest| guest.children())
        .filter(|n| n.has_tag_name("arch") && n.attribute("name") == Some("x86_64"))
        .flat_map(|arch| arch.children())
        .any(|d| d.has_tag_name("domain") && d.attribute("type") == Some("kvm"))
}

/// True for the URIs whose VMs run on this host's file system and CPU.
pub fn is_local_uri(uri: &str) -> bool {
    let base = uri.split('?').next().unwrap_or(uri);
    matches!(base, "qemu:///system" | "qemu:///session")
}

/// Where and as whom QEMU runs for a libvirt URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuPlace {
    /// This host, as this user (`qemu:///session`).
    Session,
    /// This host, as the user libvirt's system daemon runs QEMU as (`qemu:///system`).
    System,
    /// Another host (or a daemon this tool cannot see the files of).
    Remote,
}

impl QemuPlace {
    /// The place of `uri`.
    pub fn of(uri: &str) -> QemuPlace {
        if !is_local_uri(uri) {
            QemuPlace::Remote
        } else if uri.starts_with("qemu:///session") {
            QemuPlace::Session
        } else {
            QemuPlace::System
        }
    }
}

/// The facts KVM's use is decided on, as [`probe`] gathers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// Where QEMU runs.
    pub place: QemuPlace,
    /// The CPU has the `vmx` or `svm` flag: this host's `/proc/cpuinfo`, or, for a remote
    /// URI, the host CPU of libvirt's capabilities.
    pub cpu_virt: bool,
    /// `/dev/kvm` exists on this host (false for a remote URI: not seen from here).
    pub dev_kvm: bool,
    /// Under `qemu:///session`: whether this user may read and write `/dev/kvm`
    /// (`access(2)`); `None` elsewhere.
    pub dev_kvm_yours: Option<bool>,
    /// Whether libvirt's capabilities offer the `kvm` domain type for x86_64; `None` when
    /// they were not read (not needed, or libvirt did not answer).
    pub libvirt_kvm: Option<bool>,
}

/// Why KVM cannot work for a libvirt connection; each says what would make it work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmUnusable {
    /// This host's CPU has no hardware virtualisation (or it is hidden).
    #[error(
        "this CPU has no vmx or svm flag (no hardware virtualisation, or it is turned off in \
         the firmware or not passed to this virtual machine)"
    )]
    NoCpuFlag,
    /// The remote host's CPU has none.
    #[error(
        "the CPU of libvirt's host at {uri} has no vmx or svm flag (its capabilities list neither)"
    )]
    RemoteNoCpuFlag {
        /// The libvirt URI.
        uri: String,
    },
    /// The CPU has the flag, but `/dev/kvm` does not exist.
    #[error(
        "/dev/kvm does not exist (load the module: sudo modprobe kvm_intel, or kvm_amd on AMD)"
    )]
    NoDevKvm,
    /// Under `qemu:///session` QEMU runs as this user, who cannot open `/dev/kvm`.
    #[error(
        "you cannot open /dev/kvm: it is not readable and writable by you, and under \
         qemu:///session QEMU runs as you (add yourself to group kvm: sudo usermod -aG kvm \
         $USER, then log in again)"
    )]
    NotYours,
    /// libvirt's capabilities offer no `kvm` domain type for x86_64.
    #[error(
        "libvirt at {uri} does not offer KVM (its capabilities list no kvm domain type for \
         x86_64 guests: the user it runs QEMU as cannot open /dev/kvm, or its QEMU has no KVM)"
    )]
    NotOffered {
        /// The libvirt URI.
        uri: String,
    },
    /// libvirt did not answer with its capabilities.
    #[error("libvirt at {uri} did not report its capabilities, so KVM cannot be checked")]
    NoCapabilities {
        /// The libvirt URI.
        uri: String,
    },
}

/// Whether KVM can work for libvirt at `uri` given `facts`: `Ok` or the first reason it
/// cannot, in the order a user would fix them (the CPU, the device, the right to it,
/// libvirt).
pub fn kvm_verdict(uri: &str, facts: &KvmFacts) -> Result<(), KvmUnusable> {
    let uri = || uri.to_owned();
    match facts.place {
        QemuPlace::Remote => {
            if facts.libvirt_kvm.is_none() {
                return Err(KvmUnusable::NoCapabilities { uri: uri() });
            }
            if !facts.cpu_virt {
                return Err(KvmUnusable::RemoteNoCpuFlag { uri: uri() });
            }
        }
        QemuPlace::Session | QemuPlace::System => {
            if !facts.cpu_virt {
                return Err(KvmUnusable::NoCpuFlag);
            }
            if !facts.dev_kvm {
                return Err(KvmUnusable::NoDevKvm);
            }
            if facts.place == QemuPlace::Session && facts.dev_kvm_yours != Some(true) {
                return Err(KvmUnusable::NotYours);
            }
        }
    }
    match facts.libvirt_kvm {
        Some(true) => Ok(()),
        Some(false) => Err(KvmUnusable::NotOffered { uri: uri() }),
        None => Err(KvmUnusable::NoCapabilities { uri: uri() }),
    }
}

/// This host's `/proc/cpuinfo` (at most [`MAX_CPUINFO`] bytes; empty when unreadable).
pub fn read_cpuinfo() -> String {
    let mut cpuinfo = String::new();
    if let Ok(file) = std::fs::File::open("/proc/cpuinfo") {
        let _ = file.take(MAX_CPUINFO).read_to_string(&mut cpuinfo);
    }
    cpuinfo
}

/// Gathers the facts for libvirt at `uri`. `capabilities` (libvirt's capabilities
/// document, `None` when it does not answer) is called at most once: always for a remote
/// URI, locally only when the CPU has the flag.
pub fn probe(uri: &str, capabilities: impl FnOnce() -> Option<String>) -> KvmFacts {
    let place = QemuPlace::of(uri);
    if place == QemuPlace::Remote {
        let caps = capabilities();
        return KvmFacts {
            place,
            cpu_virt: caps.as_deref().is_some_and(capabilities_have_virt),
            dev_kvm: false,
            dev_kvm_yours: None,
            libvirt_kvm: caps.as_deref().map(capabilities_offer_kvm),
        };
    }
    let cpu_virt = cpuinfo_has_virt(&read_cpuinfo());
    let dev_kvm_yours = (place == QemuPlace::Session)
        .then(|| nix::unistd::access(DEV_KVM, AccessFlags::R_OK | AccessFlags::W_OK).is_ok());
    KvmFacts {
        place,
        cpu_virt,
        dev_kvm: Path::new(DEV_KVM).exists(),
        dev_kvm_yours,
        libvirt_kvm: if cpu_virt {
            capabilities().as_deref().map(capabilities_offer_kvm)
        } else {
            None
        },
    }
}

/// Resolves `requested` for libvirt at `uri`: `Tcg` as asked; `Auto` to `Kvm` where KVM
/// can work ([`kvm_verdict`] of the [`probe`]), else `Tcg`; `Kvm` as asked where it can
/// work, else the reason it cannot. `capabilities` is called at most once (never for
/// `Tcg`).
pub fn resolve(
    requested: Accel,
    uri: &str,
    capabilities: impl FnOnce() -> Option<String>,
) -> Result<Accel, KvmUnusable> {
    if requested == Accel::Tcg {
        return Ok(Accel::Tcg);
    }
    let verdict = kvm_verdict(uri, &probe(uri, capabilities));
    match (requested, verdict) {
        (_, Ok(())) => Ok(Accel::Kvm),
        (Accel::Kvm, Err(reason)) => Err(reason),
        (_, Err(_)) => Ok(Accel::Tcg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic vmx smx est\nbugs\t\t: spectre_v1\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu sse2 svm extapic\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu sse2 hypervisor vmxnet avx\n\
        vmx flags\t: not-a-flags-line\n";

    /// A capabilities document: the host CPU's `features`, and the domain types offered
    /// for x86_64 guests.
    fn caps(features: &[&str], domains: &[&str]) -> String {
        let features: String = features
            .iter()
            .map(|f| format!("<feature name='{f}'/>"))
            .collect();
        let domains: String = domains
            .iter()
            .map(|d| format!("<domain type='{d}'/>"))
            .collect();
        format!(
            "<capabilities><host><cpu><arch>x86_64</arch>{features}</cpu></host>\
             <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/>\
             <domain type='kvm'/></arch></guest>\
             <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>{domains}</arch></guest>\
             </capabilities>"
        )
    }

    const REMOTE: &str = "qemu+ssh://h/system";

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_virt(INTEL));
        assert!(cpuinfo_has_virt(AMD));
        assert!(
            !cpuinfo_has_virt(NONE),
            "vmxnet and `vmx flags` must not count"
        );
        assert!(!cpuinfo_has_virt(""));
    }

    #[test]
    fn capabilities_flags() {
        let with = "<capabilities><host><cpu><arch>x86_64</arch><model>Skylake</model>\
            <feature name='ds'/><feature name='vmx'/></cpu></host></capabilities>";
        let without = "<capabilities><host><cpu><feature name='ds'/></cpu></host>\
            <guest><feature name='vmx'/></guest></capabilities>";
        assert!(capabilities_have_virt(with));
        assert!(!capabilities_have_virt(without));
        assert!(!capabilities_have_virt("not xml"));
    }

    #[test]
    fn the_kvm_domain_counts_only_for_x86_64_guests() {
        assert!(capabilities_offer_kvm(&caps(&[], &["qemu", "kvm"])));
        // i686 offers kvm in every document here: it must not count for x86_64.
        assert!(!capabilities_offer_kvm(&caps(&["vmx"], &["qemu"])));
        assert!(!capabilities_offer_kvm(
            "<capabilities><host><cpu><feature name='vmx'/></cpu></host></capabilities>"
        ));
        assert!(!capabilities_offer_kvm("not xml"));
    }

    #[test]
    fn local_uris() {
        assert!(is_local_uri("qemu:///system"));
        assert!(is_local_uri("qemu:///session"));
        assert!(!is_local_uri("qemu+ssh://host/system"));
        assert!(!is_local_uri("test:///default"));
        assert_eq!(QemuPlace::of("qemu:///session"), QemuPlace::Session);
        assert_eq!(QemuPlace::of("qemu:///system"), QemuPlace::System);
        assert_eq!(QemuPlace::of(REMOTE), QemuPlace::Remote);
    }

    /// Facts where KVM works locally under `place`.
    fn usable(place: QemuPlace) -> KvmFacts {
        KvmFacts {
            place,
            cpu_virt: true,
            dev_kvm: true,
            dev_kvm_yours: (place == QemuPlace::Session).then_some(true),
            libvirt_kvm: Some(true),
        }
    }

    #[test]
    fn local_kvm_needs_the_flag_the_device_your_right_to_it_and_libvirt() {
        let session = "qemu:///session";
        let system = "qemu:///system";
        assert_eq!(kvm_verdict(session, &usable(QemuPlace::Session)), Ok(()));
        assert_eq!(kvm_verdict(system, &usable(QemuPlace::System)), Ok(()));
        let no_flag = KvmFacts {
            cpu_virt: false,
            libvirt_kvm: None,
            ..usable(QemuPlace::Session)
        };
        assert_eq!(kvm_verdict(session, &no_flag), Err(KvmUnusable::NoCpuFlag));
        // A paravirtual /dev/kvm libvirt offers, without the flag (this test machine's).
        let hidden_flag = KvmFacts {
            cpu_virt: false,
            ..usable(QemuPlace::System)
        };
        assert_eq!(
            kvm_verdict(system, &hidden_flag),
            Err(KvmUnusable::NoCpuFlag)
        );
        let no_device = KvmFacts {
            dev_kvm: false,
            dev_kvm_yours: Some(false),
            libvirt_kvm: Some(false),
            ..usable(QemuPlace::Session)
        };
        assert_eq!(kvm_verdict(session, &no_device), Err(KvmUnusable::NoDevKvm));
        // Not in group kvm: under the session QEMU runs as you, so it cannot open it,
        // whatever libvirt says; under the system daemon your right does not matter.
        let not_yours = KvmFacts {
            dev_kvm_yours: Some(false),
            ..usable(QemuPlace::Session)
        };
        assert_eq!(kvm_verdict(session, &not_yours), Err(KvmUnusable::NotYours));
        let not_offered = KvmFacts {
            libvirt_kvm: Some(false),
            ..usable(QemuPlace::System)
        };
        assert_eq!(
            kvm_verdict(system, &not_offered),
            Err(KvmUnusable::NotOffered { uri: system.into() })
        );
        let unanswered = KvmFacts {
            libvirt_kvm: None,
            ..usable(QemuPlace::Session)
        };
        assert_eq!(
            kvm_verdict(session, &unanswered),
            Err(KvmUnusable::NoCapabilities {
                uri: session.into()
            })
        );
    }

    #[test]
    fn remote_kvm_goes_by_the_remote_capabilities_alone() {
        let facts = |doc: Option<String>| probe(REMOTE, || doc);
        let both = facts(Some(caps(&["svm"], &["qemu", "kvm"])));
        assert_eq!(
            both,
            KvmFacts {
                place: QemuPlace::Remote,
                cpu_virt: true,
                dev_kvm: false,
                dev_kvm_yours: None,
                libvirt_kvm: Some(true),
            }
        );
        assert_eq!(kvm_verdict(REMOTE, &both), Ok(()));
        let remote = || REMOTE.to_owned();
        assert_eq!(
            kvm_verdict(REMOTE, &facts(Some(caps(&[], &["qemu", "kvm"])))),
            Err(KvmUnusable::RemoteNoCpuFlag { uri: remote() })
        );
        assert_eq!(
            kvm_verdict(REMOTE, &facts(Some(caps(&["vmx"], &["qemu"])))),
            Err(KvmUnusable::NotOffered { uri: remote() })
        );
        assert_eq!(
            kvm_verdict(REMOTE, &facts(None)),
            Err(KvmUnusable::NoCapabilities { uri: remote() })
        );
    }

    #[test]
    fn tcg_is_honoured_without_asking_libvirt() {
        let never = || -> Option<String> { panic!("capabilities must not be read") };
        assert_eq!(resolve(Accel::Tcg, "qemu:///system", never), Ok(Accel::Tcg));
        assert_eq!(resolve(Accel::Tcg, REMOTE, never), Ok(Accel::Tcg));
    }

    #[test]
    fn remote_auto_picks_kvm_only_where_libvirt_offers_it() {
        let resolved = |accel, doc: Option<String>| resolve(accel, REMOTE, || doc);
        let both = caps(&["svm"], &["qemu", "kvm"]);
        assert_eq!(resolved(Accel::Auto, Some(both.clone())), Ok(Accel::Kvm));
        assert_eq!(resolved(Accel::Kvm, Some(both)), Ok(Accel::Kvm));
        // The flag, but libvirt there cannot give KVM to QEMU: TCG, not a failed start.
        let flag_only = caps(&["svm"], &["qemu"]);
        assert_eq!(
            resolved(Accel::Auto, Some(flag_only.clone())),
            Ok(Accel::Tcg)
        );
        assert_eq!(resolved(Accel::Auto, None), Ok(Accel::Tcg));
        assert_eq!(
            resolved(Accel::Auto, Some(caps(&[], &["qemu", "kvm"]))),
            Ok(Accel::Tcg)
        );
    }

    #[test]
    fn explicit_kvm_that_cannot_work_is_refused_with_the_reason() {
        let refused = resolve(Accel::Kvm, REMOTE, || Some(caps(&["vmx"], &["qemu"])))
            .expect_err("libvirt offers no KVM");
        assert_eq!(refused, KvmUnusable::NotOffered { uri: REMOTE.into() });
        assert!(refused.to_string().contains(REMOTE), "{refused}");
        assert!(KvmUnusable::NotYours.to_string().contains("group kvm"));
        assert_eq!(
            resolve(Accel::Kvm, REMOTE, || None),
            Err(KvmUnusable::NoCapabilities { uri: REMOTE.into() })
        );
    }
}
