//! contractor-confine: a host-side tool that reads bytes from the hostile guest confines
//! itself with this crate before its first read, with means that need no root:
//! `no_new_privs`, Landlock file-system rules (paths readable, paths read-write), Landlock
//! TCP rules where the kernel's ABI has them (4 and later: bind only to listed ports,
//! connect only to listed ports), a seccomp filter and rlimits.
//!
//! The invariant: [`confine`] either enforces everything this kernel offers or says, in the
//! [`Confinement`] it returns and on stderr, what does not hold. It never downgrades
//! silently. Landlock on ABI < 8 restricts only the calling thread and the threads it
//! starts afterwards, so a tool must call [`confine`] before it starts any thread (an async
//! runtime's workers included); seccomp is applied to every thread of the process.
//!
//! The seccomp filter of the relay, whose calls once serving are few and known, is an
//! **allowlist** ([`Policy::allowed_syscalls`]). That of the store and the proxy is a
//! **denylist** ([`seccomp::DENIED`]): it refuses with `EPERM`
//! the system calls a confined tool never needs and an attacker would want (`execve`,
//! `ptrace`, `mount`, `bpf`, namespaces, kernel modules, `process_vm_*`, `keyctl`,
//! `perf_event_open`, `userfaultfd`, `io_uring`, ...). An allowlist would be tighter, but
//! tokio, hyper and glibc's `getaddrinfo` (with the NSS modules it may load) call a set of
//! system calls that changes with their versions and the host's configuration, which we
//! cannot test on every host; a missing entry would kill a build at random. Landlock is what
//! keeps the file system and the network out of reach; the denylist takes away the tools
//! that would widen a compromise.

#![warn(missing_docs)]

pub mod landlock_rules;
pub mod limits;
pub mod seccomp;
mod sys;

use std::path::PathBuf;

pub use contractor_protocol::service::Confinement;
/// The address families a [`Policy::socket_families`] names.
pub use libc::{AF_INET, AF_INET6, AF_NETLINK};

/// The address space (`RLIMIT_AS`) of a confined tool (store, proxy, relay): 4 GiB. They
/// map 0.2 to 0.35 GiB while serving a build (VmPeak, measured); the rest is room for
/// glibc's per-thread arenas and thread stacks on hosts with many cores. A guest that
/// drives a tool past it gets allocation failures in that tool, not a host out of memory.
pub const TOOL_ADDRESS_SPACE: u64 = 4 << 30;

/// What a confined process may still do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Files and directories (with everything beneath) it may read, and execute or map.
    /// A path that does not exist is left out (it cannot be reached either).
    pub read: Vec<PathBuf>,
    /// Files and directories (with everything beneath) it may read, write, create and
    /// remove.
    pub read_write: Vec<PathBuf>,
    /// TCP ports it may bind (the one it already listens on). Empty: none.
    pub bind_ports: Vec<u16>,
    /// TCP ports it may connect to: `Some(vec![])` none, `None` any (TCP connect is then
    /// left unconfined, and the report warns so).
    pub connect_ports: Option<Vec<u16>>,
    /// `RLIMIT_NOFILE`, lowered to this (never raised above the hard limit).
    pub max_open_files: Option<u64>,
    /// `RLIMIT_FSIZE`: the largest regular file it may write.
    pub max_file_size: Option<u64>,
    /// `RLIMIT_AS`: the most virtual memory it may map, in bytes.
    pub max_address_space: Option<u64>,
    /// Leave `execve`/`execveat` to pass the seccomp filter: only for a launcher that
    /// confines itself and then executes the program it confines (contractor-qemu), whose
    /// own sandbox then refuses them. Every other tool keeps them refused.
    pub allow_exec: bool,
    /// `Some`: the seccomp filter is an **allowlist** of these system calls (name, number),
    /// and every other call fails with `EPERM` ([`seccomp::program_allowed`]); for a tool
    /// whose calls once serving are few and known (the relay). `None`: the denylist
    /// [`seccomp::DENIED`].
    pub allowed_syscalls: Option<&'static [(&'static str, libc::c_long)]>,
    /// `Some`: `socket(2)` may make sockets of these address families only (every other
    /// family fails with `EACCES`); `Some(&[])`: no new socket at all. Landlock (ABI 7 and
    /// earlier) governs neither `connect(2)` to a Unix socket by path nor UDP, so without
    /// this a compromised tool could reach the user's own services through a new socket:
    /// libvirt's session daemon (and ask it for an unconfined domain), the session bus, an
    /// SSH agent. Sockets held from before and `socketpair(2)` are not affected. `None`:
    /// any family.
    pub socket_families: Option<&'static [libc::c_int]>,
    /// `socket(2)` may make stream sockets only (TCP): no UDP, raw or packet sockets.
    pub stream_sockets_only: bool,
}

impl Policy {
    /// The policy of a tool that reaches no network and runs nothing: it reads `read`,
    /// writes `read_write`, holds at most `max_open_files`; no TCP bind or connect, no new
    /// socket of any kind (descriptors held from before still work), no `execve`, the
    /// [`seccomp::DENIED`] denylist, the [`TOOL_ADDRESS_SPACE`]. No `RLIMIT_FSIZE`: such a
    /// tool bounds what it writes itself, and the limit would also cap the log its stderr
    /// may be appended to (`SIGXFSZ` would kill it mid-build). A tool that listens adds its
    /// port to `bind_ports`.
    pub fn offline(read: Vec<PathBuf>, read_write: Vec<PathBuf>, max_open_files: u64) -> Policy {
        Policy {
            read,
            read_write,
            bind_ports: Vec::new(),
            connect_ports: Some(Vec::new()),
            max_open_files: Some(max_open_files),
            max_file_size: None,
            max_address_space: Some(TOOL_ADDRESS_SPACE),
            allow_exec: false,
            allowed_syscalls: None,
            socket_families: Some(&[]),
            stream_sockets_only: true,
        }
    }
}

/// Why confinement could not be applied. A kernel that lacks a feature is not an error
/// (that is a warning in the [`Confinement`]); these are failures of the calls themselves.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    /// The Landlock ruleset could not be built or enforced.
    #[error("cannot enforce the Landlock rules")]
    Landlock(#[source] landlock::RulesetError),
    /// The seccomp filter could not be built.
    #[error("cannot build the seccomp filter")]
    SeccompBuild(#[source] seccompiler::BackendError),
    /// The seccomp filter could not be installed.
    #[error("cannot install the seccomp filter")]
    SeccompApply(#[source] seccompiler::Error),
    /// An rlimit could not be set.
    #[error("cannot set {0}")]
    Rlimit(&'static str, #[source] nix::Error),
}

/// Confines the calling process to `policy`, for good, and reports what holds. `tool` names
/// the process in the warnings printed on stderr (`contractor-store: warning: ...`).
pub fn confine(tool: &str, policy: &Policy) -> Result<Confinement, ConfineError> {
    nix::sys::prctl::set_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let mut warnings = Vec::new();
    limits::apply(policy)?;
    let landlock = landlock_rules::apply(policy, &mut warnings)?;
    let seccomp = seccomp::apply(policy, &mut warnings)?;
    for warning in &warnings {
        eprintln!("{tool}: warning: {warning}");
    }
    Ok(Confinement {
        enforced: true,
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        landlock_abi: landlock.kernel_abi,
        landlock_fs: landlock.fs,
        landlock_net: landlock.net,
        seccomp,
        rlimits: true,
        warnings,
    })
}

/// The report of a process that was asked not to confine itself (a debugging flag), after
/// warning on stderr.
pub fn unconfined(tool: &str) -> Confinement {
    let warning = "confinement is turned off: this process runs with all of the user's rights";
    eprintln!("{tool}: warning: {warning}");
    Confinement {
        enforced: false,
        no_new_privs: false,
        landlock_abi: landlock_rules::kernel_abi(),
        landlock_fs: false,
        landlock_net: false,
        seccomp: false,
        rlimits: false,
        warnings: vec![warning.to_string()],
    }
}
