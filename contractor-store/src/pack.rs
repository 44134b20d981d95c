//! `contractor-store pack`: packs a project's source tree into a build record as
//! `source.tar`, the tar the guest agent fetches and unpacks.
//!
//! The project directory is untrusted, so packing never follows a symbolic link and never
//! opens anything but a regular file: symlinks stay links, FIFOs, sockets and devices are
//! left out with a warning, and regular files are opened with `O_NOFOLLOW | O_NONBLOCK` and
//! checked again after opening, so one swapped for a FIFO or a link cannot hang or redirect
//! us. `.git` and the store directory `.contractor` are always left out.
//!
//! Which other files are packed follows what the project ships, chosen by one of two rules
//! (reported in [`Packed::selection`]):
//! - **in a git work tree** (see [`crate::worktree`]), `.gitignore` files apply as git
//!   applies them, and a file git tracks is packed even when a pattern matches it (git's own
//!   rule: patterns only keep untracked files out);
//! - **in no work tree** (an unpacked crate, an sdist, a tarball), everything is packed:
//!   such a tree ships exactly the files it means to, and its `.gitignore` (a crate's often
//!   names `Cargo.lock`) describes the repository it came from, not this tree.
//!
//! `.gitignore` files are read the same way as the sources (at most
//! [`MAX_GITIGNORE_BYTES`]); one that is not a small regular file is not applied and gives a
//! warning. Only the `.gitignore` files inside the project directory apply (not those of a
//! parent directory in the same work tree, nor `.git/info/exclude` or the user's
//! `core.excludesFile`). Order is sorted, so the same tree gives the same tar.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use contractor_protocol::error::ToolCode;
use contractor_protocol::file::{kind_name, open_regular, read_regular};
use contractor_protocol::store::{Packed, SourceRule, SourceSelection};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

/// Largest `.gitignore` file that is applied: 1 MiB. A bigger one is not applied (warning).
pub const MAX_GITIGNORE_BYTES: u64 = 1024 * 1024;

/// Most entries (files, directories, links) the source may have: 1,000,000.
pub const MAX_SOURCE_ENTRIES: usize = 1_000_000;

/// Most warnings about skipped special files that are listed one by one: 20. The rest are
/// counted in one more warning.
pub const MAX_SPECIAL_FILE_WARNINGS: usize = 20;

/// Errors packing the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A directory or file of the tree could not be read.
    #[error("cannot read {path} in the source tree")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tree has more entries than [`MAX_SOURCE_ENTRIES`].
    #[error(
        "the source tree {dir} has more than {max} entries (files, directories and links); \
         leave some out with .gitignore"
    )]
    TooManyEntries {
        /// The project directory.
        dir: PathBuf,
        /// The bound.
        max: usize,
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

impl SourceError {
    /// Whether the project is at fault (it cannot be packed as it is), not the host.
    pub fn is_project_error(&self) -> bool {
        matches!(
            self,
            SourceError::Read { .. } | SourceError::TooManyEntries { .. }
        )
    }

    /// The error object's code: `source_too_many_entries` and `source_unreadable` are the
    /// project's fault, `source_pack` the host's.
    pub fn code(&self) -> ToolCode {
        match self {
            SourceError::TooManyEntries { .. } => ToolCode::SourceTooManyEntries,
            SourceError::Read { .. } => ToolCode::SourceUnreadable,
            SourceError::Pack { .. } => ToolCode::SourcePack,
        }
    }
}

/// Packs `project` into the tar file `tar`.
pub fn pack(project: &Path, tar: &Path) -> Result<Packed, SourceError> {
    pack_at_most(project, tar, MAX_SOURCE_ENTRIES)
}

/// A directory being walked: its children still to visit and its `.gitignore`.
struct Dir {
    path: PathBuf,
    children: std::vec::IntoIter<(OsString, std::fs::Metadata)>,
    gitignore: Option<Gitignore>,
    /// Whether a pattern matches the directory itself (it is walked only for what git
    /// tracks in it: everything else in it is left out too).
    ignored: bool,
}

/// [`pack`] with at most `max_entries` entries (a bound above [`MAX_SOURCE_ENTRIES`] is
/// taken as that).
pub fn pack_at_most(project: &Path, tar: &Path, max_entries: usize) -> Result<Packed, SourceError> {
    let max_entries = max_entries.min(MAX_SOURCE_ENTRIES);
    let pack_err = |path: &Path| {
        let (path, tar) = (path.to_path_buf(), tar.to_path_buf());
        move |source| SourceError::Pack { path, tar, source }
    };
    let file = File::create(tar).map_err(pack_err(tar))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut warnings = Vec::new();
    let mut specials = 0usize;
    let mut entries = 0usize;
    let work_tree = crate::worktree::find(project);
    if let Some(warning) = work_tree.as_ref().and_then(|w| w.warning.clone()) {
        warnings.push(warning);
    }
    let apply_gitignore = work_tree.is_some();
    let mut selection = SourceSelection {
        rule: if apply_gitignore {
            SourceRule::GitWorkTree
        } else {
            SourceRule::Everything
        },
        ignored: 0,
        tracked_kept: 0,
    };
    let mut stack = vec![open_dir(project, project, apply_gitignore, &mut warnings)?];
    while let Some(top) = stack.last_mut() {
        let Some((name, meta)) = top.children.next() else {
            stack.pop();
            continue;
        };
        let path = top.path.join(&name);
        let parent_ignored = top.ignored;
        if stack.len() == 1 && (name == ".git" || name == ".contractor") {
            continue;
        }
        let kind = meta.file_type();
        let Ok(relative) = path.strip_prefix(project).map(Path::to_path_buf) else {
            continue;
        };
        let matched = parent_ignored || ignored(&stack, &path, kind.is_dir());
        let tracked = matched
            && work_tree
                .as_ref()
                .is_some_and(|w| w.tracks(&relative, kind.is_dir()));
        if matched && !tracked {
            selection.ignored += 1;
            continue;
        }
        if tracked && !kind.is_dir() {
            selection.tracked_kept += 1;
        }
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            specials += 1;
            if specials <= MAX_SPECIAL_FILE_WARNINGS {
                warnings.push(format!(
                    "skipped {}: it is {} (only regular files, directories and symbolic links are packed)",
                    relative.display(),
                    kind_name(kind)
                ));
            }
            continue;
        }
        if entries >= max_entries {
            return Err(SourceError::TooManyEntries {
                dir: project.to_path_buf(),
                max: max_entries,
            });
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        if kind.is_dir() {
            header.set_size(0);
            builder
                .append_data(&mut header, &relative, std::io::empty())
                .map_err(pack_err(&path))?;
            let mut dir = open_dir(project, &path, apply_gitignore, &mut warnings)?;
            dir.ignored = matched;
            stack.push(dir);
        } else {
            append_leaf(&mut builder, header, kind.is_symlink(), &path, &relative)
                .map_err(|e| e.or_pack(&path, tar))?;
        }
        entries += 1;
    }
    if specials > MAX_SPECIAL_FILE_WARNINGS {
        warnings.push(format!(
            "skipped {} more special files (FIFOs, sockets or devices) not listed",
            specials - MAX_SPECIAL_FILE_WARNINGS
        ));
    }
    let mut writer = builder.into_inner().map_err(pack_err(tar))?;
    std::io::Write::flush(&mut writer).map_err(pack_err(tar))?;
    let bytes = std::fs::metadata(tar).map_err(pack_err(tar))?.len();
    let mut packed = Packed::new(entries as u64, bytes, warnings);
    packed.selection = Some(selection);
    Ok(packed)
}

/// Why a leaf could not be packed: it could not be read, or not be written to the tar.
enum LeafError {
    Read(std::io::Error),
    Pack(std::io::Error),
}

impl LeafError {
    fn or_pack(self, path: &Path, tar: &Path) -> SourceError {
        match self {
            LeafError::Read(source) => SourceError::Read {
                path: path.to_path_buf(),
                source,
            },
            LeafError::Pack(source) => SourceError::Pack {
                path: path.to_path_buf(),
                tar: tar.to_path_buf(),
                source,
            },
        }
    }
}

/// Appends the symbolic link or the regular file `path` as `relative`: a link as its
/// target, a file as exactly the bytes it had when opened (its metadata read from the
/// open file, not from the walk).
fn append_leaf<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    symlink: bool,
    path: &Path,
    relative: &Path,
) -> Result<(), LeafError> {
    if symlink {
        let target = std::fs::read_link(path).map_err(LeafError::Read)?;
        header.set_size(0);
        return builder
            .append_link(&mut header, relative, target)
            .map_err(LeafError::Pack);
    }
    let file = open_regular(path).map_err(LeafError::Read)?;
    let meta = file.metadata().map_err(LeafError::Read)?;
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    let data = ExactReader {
        inner: file.take(meta.len()),
        left: meta.len(),
    };
    builder
        .append_data(&mut header, relative, data)
        .map_err(LeafError::Pack)
}

/// Reads exactly `left` bytes: a file that shrank while it was packed is an error, not a
/// corrupt tar (one that grew is cut at its size when it was opened).
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Whether `path` is ignored by the `.gitignore` files of the directories on the stack: the
/// deepest that has a say decides, as git does.
fn ignored(stack: &[Dir], path: &Path, is_dir: bool) -> bool {
    for dir in stack.iter().rev() {
        if let Some(gitignore) = &dir.gitignore {
            match gitignore.matched(path, is_dir) {
                Match::Ignore(_) => return true,
                Match::Whitelist(_) => return false,
                Match::None => {}
            }
        }
    }
    false
}

/// Lists the directory `path` (sorted by name, types from `lstat`) and reads its
/// `.gitignore` when `apply_gitignore`.
fn open_dir(
    project: &Path,
    path: &Path,
    apply_gitignore: bool,
    warnings: &mut Vec<String>,
) -> Result<Dir, SourceError> {
    let read_err = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut children = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let meta = std::fs::symlink_metadata(entry.path()).map_err(|source| SourceError::Read {
            path: entry.path(),
            source,
        })?;
        children.push((entry.file_name(), meta));
    }
    children.sort_by(|a, b| a.0.cmp(&b.0));
    let gitignore = children
        .iter()
        .filter(|_| apply_gitignore)
        .find(|(name, _)| name == ".gitignore")
        .and_then(|(_, meta)| read_gitignore(project, path, meta, warnings));
    Ok(Dir {
        path: path.to_path_buf(),
        children: children.into_iter(),
        gitignore,
        ignored: false,
    })
}

/// The `.gitignore` of `dir`, if it is a regular file of at most [`MAX_GITIGNORE_BYTES`];
/// otherwise a warning naming it. A pattern that does not parse is skipped with a warning.
fn read_gitignore(
    project: &Path,
    dir: &Path,
    meta: &std::fs::Metadata,
    warnings: &mut Vec<String>,
) -> Option<Gitignore> {
    let path = dir.join(".gitignore");
    let shown = path.strip_prefix(project).unwrap_or(&path).to_path_buf();
    let not_applied = |warnings: &mut Vec<String>, why: String| {
        warnings.push(format!("{} is not applied: {why}", shown.display()));
    };
    if !meta.file_type().is_file() {
        not_applied(
            warnings,
            format!("it is {}, not a regular file", kind_name(meta.file_type())),
        );
        return None;
    }
    let bytes = match read_regular(&path, MAX_GITIGNORE_BYTES) {
        Ok(bytes) => bytes,
        Err(err) => {
            not_applied(warnings, format!("{err}"));
            return None;
        }
    };
    let mut builder = GitignoreBuilder::new(dir);
    for (number, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
        if let Err(err) = builder.add_line(Some(path.clone()), line) {
            warnings.push(format!(
                "{} line {}: pattern not applied: {err}",
                shown.display(),
                number + 1
            ));
        }
    }
    match builder.build() {
        Ok(gitignore) => Some(gitignore),
        Err(err) => {
            not_applied(warnings, err.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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
        assert!(packed.warnings.is_empty(), "{:?}", packed.warnings);
        // The file's bytes are in the tar.
        let mut archive = tar::Archive::new(std::fs::File::open(&tar).expect("open tar"));
        let mut main_c = String::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            if entry.path().expect("path").ends_with("main.c") {
                entry.read_to_string(&mut main_c).expect("read");
            }
        }
        assert_eq!(main_c, "int main(){}");
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    /// Makes `p` look like a git work tree with nothing tracked (a `.git` with a `HEAD`).
    fn git_dir(p: &Path) {
        std::fs::create_dir_all(p.join(".git")).expect("mkdir");
        std::fs::write(p.join(".git/HEAD"), "ref: refs/heads/main\n").expect("write");
    }

    fn pack_tree(p: &Path) -> (Packed, Vec<String>) {
        let out = tempfile::tempdir().expect("tempdir");
        let tar = out.path().join("source.tar");
        let packed = pack(p, &tar).expect("pack");
        let names = names_in(&tar).into_iter().map(|(n, _)| n).collect();
        (packed, names)
    }

    #[test]
    fn nested_gitignores_apply_below_their_directory_and_negations_win() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        git_dir(p);
        std::fs::create_dir_all(p.join("sub/build")).expect("mkdir");
        std::fs::write(p.join(".gitignore"), "*.log\n!keep.log\n").expect("write");
        std::fs::write(p.join("sub/.gitignore"), "build/\n").expect("write");
        for f in ["a.log", "keep.log", "sub/b.log", "sub/build/x", "build"] {
            std::fs::write(p.join(f), "x").expect("write");
        }
        let (packed, names) = pack_tree(p);
        assert_eq!(
            names,
            [".gitignore", "build", "keep.log", "sub", "sub/.gitignore"]
        );
        assert!(packed.warnings.is_empty(), "{:?}", packed.warnings);
    }

    #[test]
    fn a_gitignore_that_links_outside_the_project_is_not_applied() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("host-file"), "secret.txt\n").expect("write");
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        git_dir(p);
        std::fs::write(p.join("secret.txt"), "x").expect("write");
        std::os::unix::fs::symlink(outside.path().join("host-file"), p.join(".gitignore"))
            .expect("symlink");
        let (packed, names) = pack_tree(p);
        assert_eq!(names, [".gitignore", "secret.txt"], "host file not applied");
        assert_eq!(
            packed.warnings,
            [".gitignore is not applied: it is a symbolic link, not a regular file"]
        );
    }

    #[test]
    fn a_gitignore_that_is_a_fifo_a_directory_or_too_big_is_not_applied() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        git_dir(p);
        for d in ["fifo", "dir/.gitignore", "big"] {
            std::fs::create_dir_all(p.join(d)).expect("mkdir");
        }
        mkfifo(&p.join("fifo/.gitignore"));
        let mut big = b"*\n".to_vec();
        big.resize(MAX_GITIGNORE_BYTES as usize + 1, b'#');
        std::fs::write(p.join("big/.gitignore"), big).expect("write");
        let (packed, names) = pack_tree(p);
        assert_eq!(
            names,
            ["big", "big/.gitignore", "dir", "dir/.gitignore", "fifo"]
        );
        assert_eq!(
            packed.warnings,
            [
                "big/.gitignore is not applied: it is bigger than 1048576 bytes",
                "dir/.gitignore is not applied: it is a directory, not a regular file",
                "fifo/.gitignore is not applied: it is a FIFO, not a regular file",
                "skipped fifo/.gitignore: it is a FIFO (only regular files, directories and symbolic links are packed)",
            ]
        );
    }

    #[test]
    fn special_files_are_skipped_with_a_warning_each_up_to_a_bound() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        std::fs::write(p.join("file"), "x").expect("write");
        let count = MAX_SPECIAL_FILE_WARNINGS + 3;
        for i in 0..count {
            mkfifo(&p.join(format!("fifo{i:02}")));
        }
        let _socket = std::os::unix::net::UnixListener::bind(p.join("zsocket")).expect("socket");
        let (packed, names) = pack_tree(p);
        assert_eq!(names, ["file"]);
        assert_eq!(packed.entries, 1);
        assert_eq!(packed.warnings.len(), MAX_SPECIAL_FILE_WARNINGS + 1);
        assert_eq!(
            packed.warnings[0],
            "skipped fifo00: it is a FIFO (only regular files, directories and symbolic links are packed)"
        );
        assert_eq!(
            packed.warnings[MAX_SPECIAL_FILE_WARNINGS],
            "skipped 4 more special files (FIFOs, sockets or devices) not listed"
        );
    }

    #[test]
    fn a_source_with_too_many_entries_is_refused_by_name() {
        let project = tempfile::tempdir().expect("tempdir");
        for f in ["a", "b", "c"] {
            std::fs::write(project.path().join(f), "x").expect("write");
        }
        let out = tempfile::tempdir().expect("tempdir");
        let tar = out.path().join("source.tar");
        assert_eq!(pack_at_most(project.path(), &tar, 3).expect("3").entries, 3);
        let err = pack_at_most(project.path(), &tar, 2).expect_err("too many");
        assert!(matches!(err, SourceError::TooManyEntries { max: 2, .. }));
        assert!(err.is_project_error());
        assert_eq!(err.code(), ToolCode::SourceTooManyEntries);
        assert!(err.to_string().contains("has more than 2 entries"), "{err}");
    }

    fn git(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run git");
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn outside_a_work_tree_gitignore_is_packed_not_applied() {
        // An unpacked crate: its .gitignore names Cargo.lock, which it ships anyway.
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        std::fs::create_dir_all(p.join("src")).expect("mkdir");
        std::fs::create_dir_all(p.join(".contractor/builds")).expect("mkdir");
        std::fs::write(p.join(".gitignore"), "/target\nCargo.lock\n").expect("write");
        std::fs::write(p.join("Cargo.lock"), "# lock").expect("write");
        std::fs::write(p.join("Cargo.toml"), "[package]").expect("write");
        std::fs::write(p.join("src/lib.rs"), "").expect("write");
        let (packed, names) = pack_tree(p);
        assert_eq!(
            names,
            [
                ".gitignore",
                "Cargo.lock",
                "Cargo.toml",
                "src",
                "src/lib.rs"
            ]
        );
        assert_eq!(
            packed.selection,
            Some(SourceSelection {
                rule: SourceRule::Everything,
                ignored: 0,
                tracked_kept: 0
            })
        );
    }

    #[test]
    fn in_a_work_tree_ignored_files_stay_out_but_tracked_ones_are_packed() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        git(p, &["init", "-q"]);
        std::fs::create_dir_all(p.join("vendor/keep")).expect("mkdir");
        std::fs::create_dir_all(p.join("target")).expect("mkdir");
        std::fs::write(
            p.join(".gitignore"),
            "Cargo.lock\n/target\nvendor/\n*.log\n",
        )
        .expect("write");
        std::fs::write(p.join("Cargo.lock"), "# lock").expect("write");
        std::fs::write(p.join("vendor/keep/tracked.c"), "").expect("write");
        std::fs::write(p.join("vendor/keep/untracked.c"), "").expect("write");
        std::fs::write(p.join("vendor/other.c"), "").expect("write");
        std::fs::write(p.join("target/out"), "").expect("write");
        std::fs::write(p.join("build.log"), "").expect("write");
        std::fs::write(p.join("src.c"), "").expect("write");
        git(p, &["add", ".gitignore", "src.c"]);
        git(p, &["add", "-f", "Cargo.lock", "vendor/keep/tracked.c"]);
        let (packed, names) = pack_tree(p);
        assert_eq!(
            names,
            [
                ".gitignore",
                "Cargo.lock",
                "src.c",
                "vendor",
                "vendor/keep",
                "vendor/keep/tracked.c"
            ]
        );
        assert_eq!(
            packed.selection,
            Some(SourceSelection {
                rule: SourceRule::GitWorkTree,
                // build.log, target, vendor/keep/untracked.c, vendor/other.c
                ignored: 4,
                tracked_kept: 2
            })
        );
        assert!(packed.warnings.is_empty(), "{:?}", packed.warnings);

        // The same from an index git wrote in version 4.
        git(p, &["update-index", "--index-version", "4"]);
        assert_eq!(pack_tree(p), (packed, names));

        // A project in a subdirectory of the work tree is in it too (the parent's
        // .gitignore is not read: only the project's own).
        std::fs::write(p.join("vendor/.gitignore"), "*.c\n").expect("write");
        let (packed, names) = pack_tree(&p.join("vendor"));
        assert_eq!(names, [".gitignore", "keep", "keep/tracked.c"]);
        assert_eq!(packed.selection.map(|s| s.tracked_kept), Some(1));
    }

    #[test]
    fn a_work_tree_whose_index_is_garbage_applies_gitignore_with_a_warning() {
        let project = tempfile::tempdir().expect("tempdir");
        let p = project.path();
        git_dir(p);
        std::fs::write(p.join(".git/index"), "DIRC garbage").expect("write");
        std::fs::write(p.join(".gitignore"), "*.o\n").expect("write");
        std::fs::write(p.join("a.o"), "").expect("write");
        let (packed, names) = pack_tree(p);
        assert_eq!(names, [".gitignore"]);
        assert_eq!(packed.warnings.len(), 1, "{:?}", packed.warnings);
        assert!(
            packed.warnings[0].contains("cannot tell which files git tracks"),
            "{:?}",
            packed.warnings
        );
    }
}
