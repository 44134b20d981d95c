//! Where Contractor keeps its files on the host: VM scratch space (and contractor-vm's images) under the
//! XDG data directory (or /var/lib/contractor for root, so that libvirt's QEMU user can
//! read them), and each project's build records in `<project>/.contractor/`.

/// The data directory: `$CONTRACTOR_DATA_DIR`, else `/var/lib/contractor` for root, else
/// `$XDG_DATA_HOME/contractor`, else `~/.local/share/contractor` (the same rule as
/// contractor-vm's, which keeps the images there).
pub use contractor_protocol::image::data_dir;

/// The project's store directory (`.contractor`), checked before a build writes into it:
/// a fact about the project, which contractor-spec keeps.
pub use contractor_spec::project::{checked_store_dir, store_dir, StoreDirError};

/// Creates `dir` and its parents with mode 0755, so that libvirt's QEMU user can reach
/// what is inside when it runs as another user.
pub use contractor_protocol::file::create_dir_world_readable;

/// The key of the project directory `dir` in the download cache and on build hosts
/// (`contractor_protocol::downloads`, as examples/pipeline.sh makes it too).
pub use contractor_protocol::downloads::project_key;
