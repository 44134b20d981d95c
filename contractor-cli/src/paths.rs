//! Where Contractor keeps its files on the host: images and VM scratch space under the
//! XDG data directory (or /var/lib/contractor for root, so that libvirt's QEMU user can
//! read them), and each project's build records in `<project>/.contractor/`.

use std::path::{Path, PathBuf};

/// The data directory: `$CONTRACTOR_DATA_DIR`, else `/var/lib/contractor` for root, else
/// `$XDG_DATA_HOME/contractor`, else `~/.local/share/contractor`.
pub fn data_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CONTRACTOR_DATA_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/contractor"));
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("contractor"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/contractor")),
        None => Err("neither HOME nor XDG_DATA_HOME is set; set CONTRACTOR_DATA_DIR to a directory for images".into()),
    }
}

/// The store root of a project: its build records and artifacts.
pub fn store_dir(project_dir: &Path) -> PathBuf {
    project_dir.join(".contractor")
}

/// Creates `dir` and its parents with mode 0755, so that libvirt's QEMU user can reach
/// what is inside when it runs as another user.
pub fn create_dir_world_readable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}
