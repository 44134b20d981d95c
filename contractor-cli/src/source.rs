//! Packs the project's source tree into the build record as `source.tar`.
//!
//! Symlinks stay links (never followed out of the tree); `.git`, the store directory
//! `.contractor` and files ignored by `.gitignore` are left out. Order is sorted, so the
//! same tree gives the same tar.

use std::path::{Path, PathBuf};

/// Errors packing the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Walking the tree failed.
    #[error("cannot read the source tree under {dir}")]
    Walk {
        /// The project directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: ignore::Error,
    },
    /// Writing the tar failed.
    #[error("cannot pack {path} into {tar}")]
    Pack {
        /// The file being packed.
        path: PathBuf,
        /// The tar file.
        tar: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What was packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Files, directories and links in the tar.
    pub entries: usize,
    /// Size of the tar in bytes.
    pub bytes: u64,
}

/// Packs `project` into the tar file `tar`.
pub fn pack(project: &Path, tar: &Path) -> Result<Packed, SourceError> {
    let pack_err = |path: &Path| {
        let (path, tar) = (path.to_path_buf(), tar.to_path_buf());
        move |source| SourceError::Pack { path, tar, source }
    };
    let file = std::fs::File::create(tar).map_err(pack_err(tar))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let walker = ignore::WalkBuilder::new(project)
        .hidden(false)
        .parents(false)
        .require_git(false)
        .git_global(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|entry| {
            let name = entry.file_name();
            !(entry.depth() == 1 && (name == ".git" || name == ".contractor"))
        })
        .build();
    let mut entries = 0;
    for entry in walker {
        let entry = entry.map_err(|source| SourceError::Walk {
            dir: project.to_path_buf(),
            source,
        })?;
        let Ok(relative) = entry.path().strip_prefix(project) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        builder
            .append_path_with_name(entry.path(), relative)
            .map_err(pack_err(entry.path()))?;
        entries += 1;
    }
    let mut writer = builder.into_inner().map_err(pack_err(tar))?;
    std::io::Write::flush(&mut writer).map_err(pack_err(tar))?;
    let bytes = std::fs::metadata(tar).map_err(pack_err(tar))?.len();
    Ok(Packed { entries, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(tar: &Path) -> Vec<(String, tar::EntryType)> {
        let mut archive = tar::Archive::new(std::fs::File::open(tar).expect("open tar"));
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").to_string_lossy().into_owned(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn packs_files_keeps_links_and_leaves_out_git_store_and_ignored() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        std::fs::create_dir_all(p.join("src")).expect("mkdir");
        std::fs::create_dir_all(p.join(".git/objects")).expect("mkdir");
        std::fs::create_dir_all(p.join(".contractor/builds")).expect("mkdir");
        std::fs::write(p.join("src/main.c"), "int main(){}").expect("write");
        std::fs::write(p.join(".gitignore"), "*.o\n").expect("write");
        std::fs::write(p.join("main.o"), "obj").expect("write");
        std::fs::write(p.join(".git/HEAD"), "ref").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", p.join("link")).expect("symlink");
        let out = tempfile::tempdir().expect("tempdir");
        let tar = out.path().join("source.tar");

        let packed = pack(p, &tar).expect("pack");

        let names = names_in(&tar);
        let just_names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(just_names, [".gitignore", "link", "src", "src/main.c"]);
        assert_eq!(names[1].1, tar::EntryType::Symlink);
        assert_eq!(packed.entries, 4);
        assert_eq!(packed.bytes, std::fs::metadata(&tar).expect("meta").len());
    }
}
