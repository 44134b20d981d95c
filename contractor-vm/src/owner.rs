//! Who owns a VM. Every domain carries its owner in its `<metadata>`: the owning process's
//! pid, that process's start time (so a reused pid is not mistaken for the owner), the host
//! name the pid belongs to, and when the VM was created. A VM whose owner ran on this host
//! and is gone has leaked, and `reap` destroys it.

use std::time::{SystemTime, UNIX_EPOCH};

/// The process a VM belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOwner {
    /// The owning process.
    pub pid: u32,
    /// The process's start time in clock ticks after boot (`/proc/PID/stat` field 22);
    /// `None` when unknown.
    pub process_start: Option<u64>,
    /// The host the pid belongs to.
    pub host: String,
    /// When the VM was created, in seconds since the Unix epoch.
    pub created_unix: u64,
}

impl VmOwner {
    /// The current process, now.
    pub fn current() -> Self {
        Self::for_pid(std::process::id())
    }

    /// The parent of the current process (for a short-lived tool whose caller owns the VM).
    pub fn parent() -> Self {
        let ppid = std::os::unix::process::parent_id();
        Self::for_pid(ppid)
    }

    /// The process `pid` on this host, now.
    pub fn for_pid(pid: u32) -> Self {
        VmOwner {
            pid,
            process_start: process_start(pid),
            host: host_name(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// True when the owner ran on this host and no longer exists (or its pid now belongs to
    /// a process that started at another time).
    pub fn is_gone_from_this_host(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        match process_start(self.pid) {
            None => true,
            Some(now) => self.process_start.is_some_and(|then| then != now),
        }
    }
}

/// This host's name, as the kernel knows it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| String::from("unknown"))
}

pub use contractor_protocol::process::{parse_stat_start, start_time as process_start};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_with_odd_command_names() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_stat_start(stat), Some(987654));
        assert_eq!(parse_stat_start("garbage"), None);
    }

    #[test]
    fn current_process_is_alive_and_dead_pid_is_gone() {
        let me = VmOwner::current();
        assert!(me.process_start.is_some());
        assert!(!me.is_gone_from_this_host());
        let reused = VmOwner {
            process_start: me.process_start.map(|s| s + 1),
            ..me.clone()
        };
        assert!(
            reused.is_gone_from_this_host(),
            "a reused pid is not the owner"
        );
        let elsewhere = VmOwner {
            host: "another-host.invalid".into(),
            pid: u32::MAX,
            ..me
        };
        assert!(
            !elsewhere.is_gone_from_this_host(),
            "other hosts' pids are not ours to judge"
        );
    }
}
