//! What the relay (`contractor-run`) may still reach once it confines itself
//! ([`policy`]): nothing on the file system (the VM's two channel sockets and the build log
//! are open before), no TCP bind, and TCP connect only to the proxy's and the store's
//! ports (and the script proxy's, with a fetch phase), the places a guest stream can be
//! relayed to; and a seccomp **allowlist**
//! ([`SYSCALLS`]) of the calls it makes once it serves, every other one refused with `EPERM`.

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
pub const SYSCALLS: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("lseek", libc::SYS_lseek),
    ("close", libc::SYS_close),
    ("fcntl", libc::SYS_fcntl),
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
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
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
    ("clock_getres", libc::SYS_clock_getres),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("prlimit64", libc::SYS_prlimit64),
    ("getrlimit", libc::SYS_getrlimit),
];

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
    fn the_allowlist_holds_nothing_the_denylist_refuses() {
        for (name, nr) in SYSCALLS {
            assert!(
                !contractor_confine::seccomp::DENIED
                    .iter()
                    .any(|(_, denied)| denied == nr),
                "{name} is on both lists"
            );
        }
    }
}
