//! The launcher's own seccomp filter, on top of `contractor-confine`'s: `socket(2)` is
//! refused with `EACCES`, whatever the address family.
//!
//! Why: Landlock (ABI 7 and earlier) does not govern `connect(2)` to a Unix socket by path,
//! so a QEMU taken over by the guest could otherwise open a new socket and connect to the
//! user's own services: libvirt's session daemon (and ask it to start a domain whose
//! emulator is any program, unconfined), the session bus, an SSH agent. Nor does Landlock
//! govern UDP. QEMU for a builder needs no new socket: libvirt passes the monitor and the
//! channel sockets as descriptors, which keep working, and `socketpair(2)` (a pair of
//! connected ends that reach nothing outside the process) stays allowed.
//!
//! The invariant: applied only to a domain's QEMU (never to libvirt's capability probe,
//! which creates its QMP socket itself), after `no_new_privs` is set.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Why the filter could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SocketFilterError {
    /// The filter could not be built for this architecture.
    #[error("cannot build the seccomp filter that refuses socket(2)")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused it.
    #[error("cannot install the seccomp filter that refuses socket(2)")]
    Apply(#[source] seccompiler::Error),
}

/// The filter: `socket` answers `EACCES`, every other call passes (to the other filters).
pub fn program() -> Result<BpfProgram, SocketFilterError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SocketFilterError::Build)?;
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_socket, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES.unsigned_abs()),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(SocketFilterError::Build)
}

/// Installs [`program`] on every thread of the process (the launcher has one).
pub fn refuse_new_sockets() -> Result<(), SocketFilterError> {
    seccompiler::apply_filter_all_threads(&program()?).map_err(SocketFilterError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_for_this_architecture() {
        assert!(!program().expect("program").is_empty());
    }
}
