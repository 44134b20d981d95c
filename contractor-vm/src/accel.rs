//! Choosing the accelerator. `Accel::Auto` picks KVM only where it can work: a local
//! connection on a CPU with the `vmx` or `svm` flag and a `/dev/kvm`, or a remote host whose
//! capabilities report those flags; everywhere else it picks TCG, which always works.
//! Explicit `kvm` and `tcg` are honoured as asked.

use std::path::Path;

use contractor_protocol::vm::Accel;

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

/// True for the URIs whose VMs run on this host's file system and CPU.
pub fn is_local_uri(uri: &str) -> bool {
    let base = uri.split('?').next().unwrap_or(uri);
    matches!(base, "qemu:///system" | "qemu:///session")
}

/// The accelerator for a local connection: KVM when `/proc/cpuinfo` has vmx/svm and
/// `/dev/kvm` exists.
pub fn local_accel() -> Accel {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo_has_virt(&cpuinfo) && Path::new("/dev/kvm").exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Resolves `Auto` to `Kvm` or `Tcg`; `capabilities` is called only for a remote `uri`.
pub fn resolve(
    requested: Accel,
    uri: &str,
    capabilities: impl FnOnce() -> Option<String>,
) -> Accel {
    match requested {
        Accel::Kvm | Accel::Tcg => requested,
        Accel::Auto if is_local_uri(uri) => local_accel(),
        Accel::Auto => match capabilities() {
            Some(caps) if capabilities_have_virt(&caps) => Accel::Kvm,
            _ => Accel::Tcg,
        },
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
    fn local_uris() {
        assert!(is_local_uri("qemu:///system"));
        assert!(is_local_uri("qemu:///session"));
        assert!(!is_local_uri("qemu+ssh://host/system"));
        assert!(!is_local_uri("test:///default"));
    }

    #[test]
    fn explicit_choices_are_honoured() {
        let never = || -> Option<String> { panic!("capabilities must not be read") };
        assert_eq!(resolve(Accel::Kvm, "qemu:///system", never), Accel::Kvm);
        assert_eq!(
            resolve(Accel::Tcg, "qemu+ssh://h/system", || None),
            Accel::Tcg
        );
    }

    #[test]
    fn remote_auto_uses_capabilities() {
        let caps = "<capabilities><host><cpu><feature name='svm'/></cpu></host></capabilities>";
        assert_eq!(
            resolve(Accel::Auto, "qemu+ssh://h/system", || Some(caps.into())),
            Accel::Kvm
        );
        assert_eq!(
            resolve(Accel::Auto, "qemu+ssh://h/system", || None),
            Accel::Tcg
        );
    }
}
