//! Which process is which: a pid plus its start time names a process even after the pid is
//! reused. Build records and VMs carry both to name their owner.

/// The start time of process `pid` in clock ticks after boot, or `None` if it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start(&stat)
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_start(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards; starttime is field 22, the 20th of those.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// While a build runs, its record (`builds/<id>/`) holds this file naming the process that
/// owns the build, as an [`Owner`]; it is removed when `result.json` is written. The store
/// decides from it whether the build is still running (contractor-store's `records`).
pub const OWNER_FILE: &str = "owner.json";

/// Most bytes read of an [`OWNER_FILE`] (ours have about 50).
pub const MAX_OWNER_BYTES: u64 = 4096;

/// What an [`OWNER_FILE`] says: `{"pid": 4242, "start": 98765}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The owner's pid.
    pub pid: u32,
    /// Its start time ([`start_time`]); null when it could not be read.
    #[serde(default)]
    pub start: Option<u64>,
}

impl Owner {
    /// Whether the process named still runs: its pid exists with the same start time (a
    /// reused pid is another process).
    pub fn is_alive(&self) -> bool {
        let start = start_time(self.pid);
        start.is_some() && start == self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_name_with_parentheses_is_skipped() {
        assert!(start_time(std::process::id()).is_some());
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 ";
        assert_eq!(parse_stat_start(stat), Some(98765));
        assert_eq!(parse_stat_start("42 (x) S 1"), None);
    }
}

/// Makes the child of `command` receive SIGTERM when this process dies, however it dies
/// (`PR_SET_PDEATHSIG`): the one place a tool or the front end arranges that for a child.
///
/// It fires when the *thread* that forked the child ends, so such children are started
/// from threads that live as long as the child should. If this process died before the
/// child set the signal, the child finds itself adopted and exits before its exec.
pub fn die_with_parent(command: &mut std::process::Command) {
    crate::sys::die_with_parent(command);
}

#[cfg(test)]
mod death_tests {
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_child_started_to_die_with_its_parent_gets_sigterm_when_the_thread_ends() {
        // PR_SET_PDEATHSIG fires when the thread that forked the child ends: a short-lived
        // thread stands in for a parent that died.
        let child = std::thread::spawn(|| {
            let mut command = std::process::Command::new("sleep");
            command.arg("30");
            super::die_with_parent(&mut command);
            command.spawn().expect("spawn sleep")
        })
        .join()
        .expect("the spawning thread");
        let status = { child }.wait().expect("wait");
        assert_eq!(status.signal(), Some(nix::libc::SIGTERM), "{status:?}");
    }
}

/// The directory Contractor's executables are taken from, by each tool that starts another:
/// `$CONTRACTOR_BIN` when set, else the running executable's (in a unit test, which runs
/// from `target/<profile>/deps/`, the one above; `unit_test` says whether this is one).
pub fn tools_dir(unit_test: bool) -> std::io::Result<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("CONTRACTOR_BIN").filter(|d| !d.is_empty()) {
        return Ok(std::path::PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    if unit_test && dir.file_name().is_some_and(|name| name == "deps") {
        return Ok(dir.parent().map(std::path::PathBuf::from).unwrap_or(dir));
    }
    Ok(dir)
}

/// Whether `path` is an executable regular file (following links, as `execve` does).
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
