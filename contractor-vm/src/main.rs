//! `contractor-vm`: the builder VM lifecycle tool. All the work is in the library; see
//! `contractor_vm::cli` for the flags and the JSON rule.

fn main() -> std::process::ExitCode {
    with_system_directories_on_path();
    contractor_vm::cli::run()
}

/// The e2fsprogs tools (mke2fs, e2fsck, resize2fs, debugfs, dumpe2fs) live in /usr/sbin and
/// /sbin, which an ordinary user's PATH lacks on Debian (an SSH session's, for one): they
/// are appended when missing. Runs before any thread exists.
fn with_system_directories_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&path).collect();
    for system in ["/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == std::path::Path::new(system)) {
            dirs.push(system.into());
        }
    }
    if let Ok(joined) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", joined);
    }
}
