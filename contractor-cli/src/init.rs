//! `contractor init`: writes a commented `contractor.toml` for the project it finds, so a
//! first build needs no reading. It never overwrites an existing spec.

use std::path::{Path, PathBuf};

/// Errors of `contractor init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A spec exists already.
    #[error("{0} exists already; edit it, or remove it to start over")]
    Exists(PathBuf),
    /// The spec could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What kind of project a directory holds, judged by its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectKind {
    /// A `Cargo.toml`.
    Cargo,
    /// A `Makefile`.
    Make,
    /// Nothing recognised.
    Unknown,
}

/// Recognises the project in `dir`.
pub fn detect(dir: &Path) -> ProjectKind {
    if dir.join("Cargo.toml").is_file() {
        ProjectKind::Cargo
    } else if ["Makefile", "makefile", "GNUmakefile"]
        .iter()
        .any(|m| dir.join(m).is_file())
    {
        ProjectKind::Make
    } else {
        ProjectKind::Unknown
    }
}

/// The commented spec for a project of `kind`.
pub fn template(kind: ProjectKind) -> String {
    let (what, image, script, artifacts, allow, cache) = match kind {
        ProjectKind::Cargo => (
            "a Cargo project",
            "debian-13-build\"      # Debian 13: rustc 1.85 and cargo from Debian's packages",
            "cargo build --locked --release\ncargo test --locked --release",
            "# artifacts = [\"target/release/NAME\"]",
            "[\"index.crates.io\", \"static.crates.io\"]",
            "\n[cache]\npaths = [\"~/.cargo/registry\"]   # downloaded crates, kept between builds\n",
        ),
        ProjectKind::Make => ("a Makefile project", "debian-12-build\"      # the builder image (the default)", "make\nmake check", "# artifacts = [\"NAME\"]", "[]", ""),
        ProjectKind::Unknown => ("this project", "debian-12-build\"      # the builder image (the default)", "echo 'replace me with the build commands'", "# artifacts = [\"dist/*\"]", "[]", ""),
    };
    format!(
        r#"# contractor.toml for {what}, written by `contractor init`.
# Every field is described in docs/configuration.md.

[build]
image = "{image}
# The script runs with `sh -e` in the unpacked source: the first failing command fails
# the build. It reaches the network only through the proxy ([network] allow).
script = """
{script}
"""
{artifacts}                     # paths or globs relative to the source root
timeout = "10m"                # the build is stopped after this long
# max_log = "64MiB"            # output beyond this is cut and the build fails
# max_artifacts = "1GiB"       # total size of the artifacts

[vm]
cpus = 2
memory = "2GiB"
# disk = "8GiB"               # how much the build can write, anywhere in the VM

[network]
allow = {allow}                # hosts the build may reach through the proxy
# What each ecosystem usually needs; copy into `allow` what your build fetches:
#   Cargo: "index.crates.io", "static.crates.io"  (git dependencies: "github.com")
#   pip:   "pypi.org", "files.pythonhosted.org"
#   npm:   "registry.npmjs.org"
#   apt:   "deb.debian.org"
# After a build was refused hosts, `contractor allow --from-last` adds them here.
{cache}"#
    )
}

/// Writes `dir/contractor.toml`; returns its path and the kind detected.
pub fn write(dir: &Path) -> Result<(PathBuf, ProjectKind), InitError> {
    let path = dir.join("contractor.toml");
    let kind = detect(dir);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                InitError::Exists(path.clone())
            } else {
                InitError::Write {
                    path: path.clone(),
                    source,
                }
            }
        })?;
    std::io::Write::write_all(&mut file, template(kind).as_bytes()).map_err(|source| {
        InitError::Write {
            path: path.clone(),
            source,
        }
    })?;
    Ok((path, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_a_valid_spec() {
        for kind in [ProjectKind::Cargo, ProjectKind::Make, ProjectKind::Unknown] {
            let text = template(kind);
            let spec = crate::spec::parse(Path::new("contractor.toml"), &text)
                .unwrap_or_else(|e| panic!("{kind:?}: {e}\n{text}"));
            let image = if kind == ProjectKind::Cargo {
                "debian-13-build"
            } else {
                crate::spec::DEFAULT_IMAGE
            };
            assert_eq!(spec.image, image);
        }
        let cargo =
            crate::spec::parse(Path::new("c.toml"), &template(ProjectKind::Cargo)).expect("cargo");
        assert!(cargo.script.contains("cargo build --locked"));
        assert!(cargo.allow.contains(&"static.crates.io".to_string()));
        // The usual hosts of each ecosystem are offered, commented out.
        let make = template(ProjectKind::Make);
        for host in [
            "pypi.org",
            "files.pythonhosted.org",
            "registry.npmjs.org",
            "deb.debian.org",
        ] {
            let line = make
                .lines()
                .find(|l| l.contains(host))
                .unwrap_or_else(|| panic!("{host} is not offered:\n{make}"));
            assert!(line.starts_with('#'), "{line}");
            assert!(crate::spec::is_allow_rule(host));
        }
        assert_eq!(cargo.cache_paths, ["/root/.cargo/registry"]);
    }

    #[test]
    fn init_detects_the_project_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Makefile"), "all:\n").expect("makefile");
        let (path, kind) = write(dir.path()).expect("init");
        assert_eq!(kind, ProjectKind::Make);
        let spec = crate::spec::load(&path).expect("written spec loads");
        assert_eq!(spec.script, "make\nmake check\n");
        std::fs::write(&path, "# mine\n").expect("edit");
        let err = write(dir.path()).expect_err("exists");
        assert!(err.to_string().contains("exists already"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "# mine\n");
    }
}
