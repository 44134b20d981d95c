//! Where Contractor keeps its files on the host: VM scratch space (and contractor-vm's images) under the
//! XDG data directory (or /var/lib/contractor for root, so that libvirt's QEMU user can
//! read them), and each project's build records in `<project>/.contractor/`.

use std::path::PathBuf;

/// The data directory: `$CONTRACTOR_DATA_DIR`, else `/var/lib/contractor` for root, else
/// `$XDG_DATA_HOME/contractor`, else `~/.local/share/contractor` (the same rule as
/// contractor-vm's, which keeps the images there).
pub fn data_dir() -> Result<PathBuf, contractor_protocol::image::NoDataDir> {
    contractor_protocol::image::data_dir()
}

/// The project's store directory (`.contractor`), checked before a build writes into it,
/// and its key on build hosts: facts about the project, which contractor-spec keeps.
pub use contractor_spec::project::{checked_store_dir, project_key, store_dir, StoreDirError};

/// Creates `dir` and its parents with mode 0755, so that libvirt's QEMU user can reach
/// what is inside when it runs as another user.
pub use contractor_protocol::file::create_dir_world_readable;
