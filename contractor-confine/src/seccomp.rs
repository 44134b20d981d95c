//! The seccomp filters: by default a denylist of the system calls a confined tool never
//! needs and an attacker would want (see the crate documentation for why), or, for a tool
//! whose calls are few and known, an allowlist of exactly those. Each refused call fails
//! with `EPERM`; `clone3` fails with `ENOSYS` so that glibc falls back to
//! `clone`, whose flags the filter can see, and `clone` with any namespace flag is refused.
//! Installed on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`).
//!
//! Every filter starts with the same first rule, before any other ([`X32_GUARD`]): a system
//! call number with the x32 bit (`0x40000000`) set fails with `EPERM`. On x86_64 the kernel
//! reports an x32 call with the x86_64 architecture and the number `nr | 0x40000000`, so a
//! filter that checks only the architecture (as seccompiler's do) and then compares numbers
//! would let `socket(AF_UNIX)` as `41 | 0x40000000`, or an x32 `execve`, `mount`,
//! `ptrace`, through a denylist. No Contractor tool makes x32 calls; on a kernel without
//! x32 they fail with `ENOSYS` anyway, and on other architectures no call number is that
//! high. Every program is built by `compile`, the one place that adds the rule.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::{ConfineError, Policy};

/// The system calls refused with `EPERM`.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("setns", libc::SYS_setns),
    ("unshare", libc::SYS_unshare),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("syslog", libc::SYS_syslog),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("personality", libc::SYS_personality),
    ("vhangup", libc::SYS_vhangup),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("uselib", libc::SYS_uselib),
];

/// The `clone` flags that make new namespaces.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// The x32 bit of an x86_64 system call number (`__X32_SYSCALL_BIT`).
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The rule every filter starts with: load the call number; if it is at least
/// [`X32_SYSCALL_BIT`], fail with `EPERM`; else go on with the rest of the filter.
pub const X32_GUARD: [sock_filter; 3] = [
    // A = seccomp_data.nr (offset 0)
    sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    },
    // A >= X32_SYSCALL_BIT ? next : skip one
    sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
        jt: 0,
        jf: 1,
        k: X32_SYSCALL_BIT,
    },
    sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
    },
];

/// The most instructions the kernel accepts in one filter (`BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

/// Compiles `filter` and puts [`X32_GUARD`] in front: the one way a program of this module
/// is made. seccompiler's own program begins with its architecture check, and its jumps are
/// relative, so the guard in front changes none of them.
fn compile(
    filter: Result<SeccompFilter, seccompiler::BackendError>,
) -> Result<BpfProgram, ConfineError> {
    let compiled = filter
        .and_then(BpfProgram::try_from)
        .map_err(ConfineError::SeccompBuild)?;
    let mut program = Vec::with_capacity(X32_GUARD.len() + compiled.len());
    program.extend_from_slice(&X32_GUARD);
    program.extend(compiled);
    if program.len() > MAX_INSTRUCTIONS {
        return Err(ConfineError::SeccompBuild(
            seccompiler::BackendError::FilterTooLarge(program.len()),
        ));
    }
    Ok(program)
}

/// Compiles one filter: the system calls of `rules` fail with `errno`, the rest pass.
fn compile_denied(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: libc::c_int,
) -> Result<BpfProgram, ConfineError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(ConfineError::SeccompBuild)?;
    compile(SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno.unsigned_abs()),
        arch,
    ))
}

/// The system calls that execute a program, refused unless the policy allows them.
const EXEC: &[libc::c_long] = &[libc::SYS_execve, libc::SYS_execveat];

/// The filter that refuses [`DENIED`] (less `execve` and `execveat` when `allow_exec`), and
/// `clone` with a namespace flag, with `EPERM`.
pub fn program_denied(allow_exec: bool) -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(_, nr)| !(allow_exec && EXEC.contains(nr)))
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    let mut clone_rules = Vec::with_capacity(NAMESPACE_FLAGS.len());
    for &flag in NAMESPACE_FLAGS {
        let flag = u64::from(flag.unsigned_abs());
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(ConfineError::SeccompBuild)?;
        clone_rules.push(SeccompRule::new(vec![condition]).map_err(ConfineError::SeccompBuild)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    compile_denied(rules, libc::EPERM)
}

/// The filter that allows only `allowed` (and `clone` without a namespace flag) and refuses
/// every other system call with `EPERM`. A call of [`DENIED`] in `allowed` is refused all
/// the same.
pub fn program_allowed(allowed: &[(&str, libc::c_long)]) -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed
        .iter()
        .filter(|(_, nr)| !DENIED.iter().any(|(_, denied)| denied == nr))
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    let all_namespaces = NAMESPACE_FLAGS
        .iter()
        .fold(0_u64, |mask, flag| mask | u64::from(flag.unsigned_abs()));
    let no_namespace = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(all_namespaces),
        0,
    )
    .map_err(ConfineError::SeccompBuild)?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![no_namespace]).map_err(ConfineError::SeccompBuild)?],
    );
    // clone3 passes this filter so that the other one's ENOSYS decides (of two filters
    // that both answer with an errno, the one installed last wins).
    rules.insert(libc::SYS_clone3, Vec::new());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(ConfineError::SeccompBuild)?;
    compile(SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        SeccompAction::Allow,
        arch,
    ))
}

/// The filter that refuses `socket(2)` with `EACCES` for an address family outside
/// `families` (`None`: any family passes) and, with `stream_only`, for any type but
/// `SOCK_STREAM`; every other call passes (to the other filters). `None` and `false`: no
/// filter.
pub fn program_sockets(
    families: Option<&[libc::c_int]>,
    stream_only: bool,
) -> Result<Option<BpfProgram>, ConfineError> {
    if families.is_none() && !stream_only {
        return Ok(None);
    }
    let condition = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .map_err(ConfineError::SeccompBuild)
    };
    let rule = |conditions| SeccompRule::new(conditions).map_err(ConfineError::SeccompBuild);
    // The rules of one system call are alternatives; the conditions of one rule all hold.
    let mut refused = Vec::new();
    match families {
        Some([]) => {}
        Some(families) => {
            let outside = families
                .iter()
                .map(|&family| condition(0, SeccompCmpOp::Ne, u64::from(family.unsigned_abs())))
                .collect::<Result<Vec<_>, _>>()?;
            refused.push(rule(outside)?);
        }
        None => {}
    }
    if stream_only {
        // The type is the low four bits of the second argument (the rest are flags).
        for kind in (0..16_u64).filter(|&k| k != u64::from(libc::SOCK_STREAM.unsigned_abs())) {
            refused.push(rule(vec![condition(
                1,
                SeccompCmpOp::MaskedEq(0xf),
                kind,
            )?])?);
        }
    }
    // No family at all: every socket(2) is refused, whatever its arguments.
    let refused = if families == Some(&[]) {
        Vec::new()
    } else {
        refused
    };
    compile_denied(BTreeMap::from([(libc::SYS_socket, refused)]), libc::EACCES).map(Some)
}

/// The filter that refuses `clone3` with `ENOSYS`: its flags sit in memory the filter cannot
/// read, and glibc falls back to `clone` on `ENOSYS`.
pub fn program_clone3() -> Result<BpfProgram, ConfineError> {
    compile_denied(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        libc::ENOSYS,
    )
}

/// Installs the filters (the `clone3` one, the one for `socket(2)` when the policy restricts
/// it, then the denylist or the policy's allowlist) on every thread of the process. Returns false (with a warning) when the kernel has no
/// seccomp filters.
pub fn apply(policy: &Policy, warnings: &mut Vec<String>) -> Result<bool, ConfineError> {
    let clone3 = program_clone3()?;
    let second = match policy.allowed_syscalls {
        Some(allowed) => program_allowed(allowed)?,
        None => program_denied(policy.allow_exec)?,
    };
    let sockets = program_sockets(policy.socket_families, policy.stream_sockets_only)?;
    // The allowlist goes last: it may not allow seccomp(2) itself.
    for filter in [Some(&clone3), sockets.as_ref(), Some(&second)]
        .into_iter()
        .flatten()
    {
        match seccompiler::apply_filter_all_threads(filter) {
            Ok(()) => {}
            Err(seccompiler::Error::Seccomp(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                warnings.push(
                    "this kernel has no seccomp filters: system calls are NOT filtered".to_string(),
                );
                return Ok(false);
            }
            Err(e) => return Err(ConfineError::SeccompApply(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_starts_by_refusing_x32_numbers() {
        let relay: &[(&str, libc::c_long)] = &[("read", libc::SYS_read)];
        let programs = [
            program_denied(false).expect("denylist"),
            program_denied(true).expect("launcher's denylist"),
            program_allowed(relay).expect("allowlist"),
            program_sockets(Some(&[]), true)
                .expect("no sockets")
                .expect("a filter"),
            program_sockets(Some(&[libc::AF_INET]), false)
                .expect("IPv4 only")
                .expect("a filter"),
            program_clone3().expect("clone3"),
        ];
        for program in programs {
            assert_eq!(program[..X32_GUARD.len()], X32_GUARD, "{program:?}");
            assert!(program.len() > X32_GUARD.len());
        }
    }
}
