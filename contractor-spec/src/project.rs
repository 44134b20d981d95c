//! Facts about a project directory beyond its spec: where Contractor keeps the project's
//! build records and caches (`<project>/.contractor`, which a build checks is the user's
//! own real directory before writing into it, since the project ships its directory).

use std::path::{Path, PathBuf};

/// The store root of a project: its build records and artifacts.
pub fn store_dir(project_dir: &Path) -> PathBuf {
    project_dir.join(".contractor")
}

/// The directories of a project's store that Contractor writes into.
const STORE_SUBDIRS: [&str; 2] = ["builds", "cache"];

/// Why a project's store directory cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum StoreDirError {
    /// The project ships something else than a directory of this user's there.
    #[error(
        "{path} is {what}: Contractor keeps its build records there and never follows a link \
         or writes into what a project ships; remove it (`rm -r {path}`) and build again"
    )]
    NotOwnDirectory {
        /// The path.
        path: PathBuf,
        /// What it is instead ("a symbolic link", "owned by uid 0", …).
        what: String,
    },
    /// It could not be inspected.
    #[error("cannot inspect {path}")]
    Inspect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The store root of a project, checked before a build writes into it: `.contractor` and
/// its `builds` and `cache` directories, where they exist, must be real directories (not
/// links) owned by this user, so that a hostile project cannot point the build's record,
/// cache or artifacts anywhere else on the host.
pub fn checked_store_dir(project_dir: &Path) -> Result<PathBuf, StoreDirError> {
    use std::os::unix::fs::MetadataExt;
    let root = store_dir(project_dir);
    let uid = nix::unistd::geteuid().as_raw();
    let mut paths = vec![root.clone()];
    paths.extend(STORE_SUBDIRS.iter().map(|sub| root.join(sub)));
    for path in paths {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StoreDirError::Inspect { path, source }),
        };
        let what = if !meta.is_dir() {
            contractor_protocol::file::kind_name(meta.file_type()).to_string()
        } else if meta.uid() != uid {
            format!(
                "a directory owned by uid {}, not by you (uid {uid})",
                meta.uid()
            )
        } else {
            continue;
        };
        return Err(StoreDirError::NotOwnDirectory { path, what });
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_directory_shipped_as_a_link_is_refused_and_a_real_one_is_taken() {
        let project = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            checked_store_dir(project.path()).expect("no store yet"),
            project.path().join(".contractor")
        );
        let elsewhere = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(elsewhere.path(), project.path().join(".contractor"))
            .expect("symlink");
        let err = checked_store_dir(project.path()).expect_err("a link is refused");
        assert!(err.to_string().contains("a symbolic link"), "{err}");

        std::fs::remove_file(project.path().join(".contractor")).expect("rm");
        std::fs::create_dir_all(project.path().join(".contractor")).expect("mkdir");
        std::os::unix::fs::symlink(elsewhere.path(), project.path().join(".contractor/builds"))
            .expect("symlink");
        let err = checked_store_dir(project.path()).expect_err("a linked builds is refused");
        assert!(err.to_string().contains("builds"), "{err}");

        std::fs::remove_file(project.path().join(".contractor/builds")).expect("rm");
        std::fs::create_dir(project.path().join(".contractor/builds")).expect("mkdir");
        assert!(checked_store_dir(project.path()).is_ok());
    }
}
