//! The one place the front end's side of contractor-host starts a process (`ssh`, and
//! `contractor-store record follow` from beside this executable): each dies with this
//! process (`PR_SET_PDEATHSIG`, see `contractor_protocol::process::die_with_parent`), so
//! nothing outlives the front end that started this tool.

use std::path::PathBuf;
use std::process::{Child, Command};

/// Starts `command`, which is sent SIGTERM when the thread that starts it ends: call it
/// from a thread that lives as long as the child should.
pub fn start(command: &mut Command) -> std::io::Result<Child> {
    contractor_protocol::process::die_with_parent(command);
    command.spawn()
}

/// The executable of tool `name`, taken from beside this one (or `$CONTRACTOR_BIN`); the
/// error says where it was looked for.
pub fn tool(name: &str) -> Result<PathBuf, String> {
    let dir = contractor_protocol::process::tools_dir(cfg!(test))
        .map_err(|e| format!("cannot find the tools' directory: {e}"))?;
    let path = dir.join(name);
    match contractor_protocol::process::is_executable(&path) {
        true => Ok(path),
        false => Err(format!(
            "the tool {name} is missing: {} is not an executable file (install the tools of \
             one release together, or set CONTRACTOR_BIN to their directory)",
            path.display()
        )),
    }
}
