//! What the relay (`contractor-run`) may still reach once it confines itself
//! ([`policy`]): nothing on the file system (the VM's two channel sockets and the build log
//! are open before), no TCP bind, and TCP connect only to the proxy's and the store's
//! ports (and the script proxy's, with a fetch phase), the places a guest stream can be
//! relayed to; and a seccomp **allowlist**
//! ([`SYSCALLS`]) of the calls it makes once it serves, every other one refused with `EPERM`.
//! `contractor-run shell` holds even less ([`shell_policy`]): its control channel and its
//! stdin and stdout, no file, no TCP, no new socket, and a shorter allowlist.

use contractor_confine::Policy;
use contractor_protocol::run::RunRequest;

/// The most files the relay holds open: 1024, room for the [`crate::tunnel::MAX_TUNNEL_STREAMS`]
/// relayed streams (one TCP connection each) and its channels, log and runtime.
pub const MAX_OPEN_FILES: u64 = 1024;

/// The system calls a serving relay makes (the async runtime, its threads and memory, the
/// channels, TCP to the proxy and the store, writing the log and its events), and nothing
/// else: no file by name but `openat` (which Landlock then refuses), no `execve`, no
/// `ptrace`, no new namespace (`clone` passes only without a namespace flag). Taken from
/// `strace -f` of the relay in real builds (output, artifacts, refused proxy and store
/// requests), plus the calls of paths those did not take: signal returns, timers, `poll`,
/// the vectored and message forms of reading and writing, `fstat`.
pub const SYSCALLS: &[(&str, libc::c_long)] = &joined::<
    RUNTIME_CORE_LEN,
    RELAY_EXTRAS_LEN,
    { RUNTIME_CORE_LEN + RELAY_EXTRAS_LEN },
>(RUNTIME_CORE, RELAY_EXTRAS);

/// The calls the relay makes beyond [`RUNTIME_CORE`]: its async runtime's polling, sockets
/// (TCP to the proxy and the store, the channels), the log file and the runtime's clocks
/// and limits.
const RELAY_EXTRAS: [(&str, libc::c_long); RELAY_EXTRAS_LEN] = [
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("lseek", libc::SYS_lseek),
    ("ioctl", libc::SYS_ioctl),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fstat", libc::SYS_fstat),
    ("newfstatat", libc::SYS_newfstatat),
    ("statx", libc::SYS_statx),
    ("openat", libc::SYS_openat),
    ("socket", libc::SYS_socket),
    ("socketpair", libc::SYS_socketpair),
    ("connect", libc::SYS_connect),
    ("shutdown", libc::SYS_shutdown),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("getsockopt", libc::SYS_getsockopt),
    ("setsockopt", libc::SYS_setsockopt),
    ("getsockname", libc::SYS_getsockname),
    ("getpeername", libc::SYS_getpeername),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("eventfd2", libc::SYS_eventfd2),
    ("pipe2", libc::SYS_pipe2),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("clock_getres", libc::SYS_clock_getres),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("prlimit64", libc::SYS_prlimit64),
    ("getrlimit", libc::SYS_getrlimit),
];
const RELAY_EXTRAS_LEN: usize = 32;

/// The calls both confined `contractor-run` processes make (the relay and `contractor-run
/// shell`): reading and writing descriptors they hold, memory, threads and their locks,
/// signals, `prctl` (the confinement report reads `no_new_privs`), randomness, clocks and
/// sleeps. Each allowlist is this core plus its own extras.
const RUNTIME_CORE: [(&str, libc::c_long); RUNTIME_CORE_LEN] = [
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("close", libc::SYS_close),
    ("fcntl", libc::SYS_fcntl),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("mremap", libc::SYS_mremap),
    ("brk", libc::SYS_brk),
    ("futex", libc::SYS_futex),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("clone", libc::SYS_clone),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("tgkill", libc::SYS_tgkill),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("prctl", libc::SYS_prctl),
    ("getrandom", libc::SYS_getrandom),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("restart_syscall", libc::SYS_restart_syscall),
];
const RUNTIME_CORE_LEN: usize = 35;

/// `core` followed by `extras`, as one list (`N` is their lengths' sum, checked when it is
/// built).
const fn joined<const A: usize, const B: usize, const N: usize>(
    core: [(&'static str, libc::c_long); A],
    extras: [(&'static str, libc::c_long); B],
) -> [(&'static str, libc::c_long); N] {
    assert!(A + B == N, "N must be the sum of the two lengths");
    let mut all = [("", 0); N];
    let mut i = 0;
    while i < A {
        all[i] = core[i];
        i += 1;
    }
    while i < N {
        all[i] = extras[i - A];
        i += 1;
    }
    all
}

/// The confinement policy of a relay that runs `request`.
pub fn policy(request: &RunRequest) -> Policy {
    let mut ports = vec![request.proxy.port(), request.store.port()];
    ports.extend(request.script_proxy.map(|p| p.port()));
    ports.sort_unstable();
    ports.dedup();
    Policy {
        read: Vec::new(),
        read_write: Vec::new(),
        bind_ports: Vec::new(),
        connect_ports: Some(ports),
        max_open_files: Some(MAX_OPEN_FILES),
        // No RLIMIT_FSIZE: the relay bounds the log itself (`max_log_bytes`), and the limit
        // would also cap the file its stderr is appended to.
        max_file_size: None,
        max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
        allow_exec: false,
        allowed_syscalls: Some(SYSCALLS),
        // TCP to the proxy and the store, nothing else.
        socket_families: Some(&[libc::AF_INET, libc::AF_INET6]),
        stream_sockets_only: true,
    }
}

/// The most files `contractor-run shell` holds open: 64 (its stdin, stdout, stderr, the
/// control channel and its clone, with room to spare).
pub const SHELL_MAX_OPEN_FILES: u64 = 64;

/// The system calls `contractor-run shell` makes once it carries the shell's bytes (two
/// threads reading and writing the descriptors they hold), and nothing else: no file by
/// name, no new socket, no `connect`, no `execve`. Taken from `strace -f` of the tool
/// carrying a shell (a thread's start asks `sched_getaffinity`; the confinement report
/// reads `no_new_privs` with `prctl`; the standard library checks a descriptor with
/// `fcntl` when it closes it), plus signal returns and the sleeps of a contended lock.
pub const SHELL_SYSCALLS: &[(&str, libc::c_long)] = &RUNTIME_CORE;

/// The confinement policy of `contractor-run shell`, which holds its control channel
/// before it confines itself: no file, no TCP, no new socket of any kind, the
/// [`SHELL_SYSCALLS`] allowlist.
pub fn shell_policy() -> Policy {
    Policy {
        allowed_syscalls: Some(SHELL_SYSCALLS),
        ..Policy::offline(Vec::new(), Vec::new(), SHELL_MAX_OPEN_FILES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_reaches_no_file_and_only_the_proxy_and_the_store() {
        let request: RunRequest = serde_json::from_value(serde_json::json!({
            "version": 1, "control_socket": "/c", "tunnel_socket": "/t",
            "proxy": "127.0.0.1:4001", "store": "127.0.0.1:4002", "log": "/l",
            "timeout_secs": 1, "boot_timeout_secs": 1,
            "job": {"script": "true", "source": "/s", "artifacts_dest": "/a/"}
        }))
        .expect("request");
        let policy = policy(&request);
        assert!(policy.read.is_empty() && policy.read_write.is_empty());
        assert!(policy.bind_ports.is_empty() && !policy.allow_exec);
        assert_eq!(policy.connect_ports, Some(vec![4001, 4002]));
        assert_eq!(policy.allowed_syscalls, Some(SYSCALLS));
    }

    #[test]
    fn the_shell_reaches_no_file_no_port_and_no_new_socket() {
        let policy = shell_policy();
        assert!(policy.read.is_empty() && policy.read_write.is_empty());
        assert!(policy.bind_ports.is_empty() && !policy.allow_exec);
        assert_eq!(policy.connect_ports, Some(Vec::new()));
        assert_eq!(policy.socket_families, Some(&[][..]));
        for (name, _) in SHELL_SYSCALLS {
            assert!(
                !["socket", "connect", "openat", "execve"].contains(name),
                "{name}"
            );
        }
    }

    #[test]
    fn the_allowlist_holds_nothing_the_denylist_refuses() {
        for (name, nr) in SYSCALLS.iter().chain(SHELL_SYSCALLS) {
            assert!(
                !contractor_confine::seccomp::DENIED
                    .iter()
                    .any(|(_, denied)| denied == nr),
                "{name} is on both lists"
            );
        }
    }

    #[test]
    fn each_allowlist_is_the_runtime_core_and_its_extras_each_call_once() {
        for list in [SYSCALLS, SHELL_SYSCALLS] {
            for call in RUNTIME_CORE {
                assert!(list.contains(&call), "{} missing", call.0);
            }
            let mut numbers: Vec<_> = list.iter().map(|&(_, nr)| nr).collect();
            numbers.sort_unstable();
            numbers.dedup();
            assert_eq!(numbers.len(), list.len(), "a call listed twice");
        }
        assert_eq!(SYSCALLS[RUNTIME_CORE_LEN..], RELAY_EXTRAS[..]);
    }
}
