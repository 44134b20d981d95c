//! Exit codes shared by every tool, so that scripts can tell a failed build from a broken
//! machine. Only a binary's `main` turns an error into one of these.

/// The documented exit codes of every Contractor tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The request was carried out (for `contractor build`: the build script succeeded).
    Success = 0,
    /// The build ran and failed: its script exited non-zero, or it hit a limit (timeout).
    BuildFailed = 1,
    /// The input was invalid: bad flags, bad JSON, a bad `contractor.toml`.
    BadInput = 2,
    /// The infrastructure failed: libvirt unreachable, the VM did not boot, the agent died.
    Infrastructure = 3,
    /// The run was interrupted (Ctrl-C or SIGTERM).
    Interrupted = 130,
}

impl ExitCode {
    /// The numeric code a process exits with.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        // Every variant fits in a u8 by construction.
        std::process::ExitCode::from(code as u8)
    }
}
