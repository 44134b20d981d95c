//! `contractor allow`: adds hosts to the spec's `[network] allow`, the ones named or the
//! ones the newest build was refused (`--from-last`), after showing the change and, on a
//! terminal, asking. The spec is edited in place with its comments and layout kept
//! (`toml_edit`), checked as a spec before it is written, and replaced atomically.
//!
//! The refused hosts come from the guest (whatever names its requests carried), so only
//! valid allow rules are taken ([`crate::spec::is_allow_rule`]), at most [`MAX_HOSTS`],
//! and every one is shown before anything is written.

use std::path::{Path, PathBuf};

/// The most hosts added at once (a build's result names at most 1024 refused hosts).
pub const MAX_HOSTS: usize = 1024;

/// The most bytes of a spec file read for editing.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Why the spec was not changed.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    /// The spec could not be read.
    #[error("cannot read {path} (a regular file of at most 1 MiB)")]
    Read {
        /// The spec.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spec is not TOML.
    #[error("{path} is not valid TOML: {detail}")]
    Toml {
        /// The spec.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// `network` or `network.allow` has another type.
    #[error("{path}: `{field}` is not a {wanted}; fix it by hand")]
    Shape {
        /// The spec.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What it must be.
        wanted: &'static str,
    },
    /// The spec is not a valid spec.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// A host given on the command line is not an allow rule.
    #[error("{0:?} is not a host name: use a host (\"deb.debian.org\") or a wildcard for its subdomains (\"*.crates.io\"), without ports or paths")]
    BadHost(String),
    /// The edited spec would not be a valid spec.
    #[error("the changed spec would not be valid, so it was not written")]
    Invalid(#[source] crate::spec::SpecError),
    /// The newest build is still running.
    #[error("the newest build {0} has no result yet (it is running); try again when it ends")]
    Running(String),
    /// Not a terminal and no `--yes`.
    #[error("stdin is not a terminal, so nobody can confirm: pass --yes to write the change shown above")]
    NotConfirmed,
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

/// A spec opened for `contractor allow`: read for editing ([`read_spec`]), checked as a
/// spec, with the hosts named on the command line checked as allow rules. The front end
/// adds the hosts the newest build was refused, shows [`Edit::diff`], asks, and writes
/// [`Edit::with`]'s text with [`write_spec`].
#[derive(Debug)]
pub struct Edit {
    path: PathBuf,
    text: String,
    imported: Vec<String>,
    /// The spec's `[network] allow` as it is.
    pub allowed: Vec<String>,
}

impl Edit {
    /// Reads the spec at `path` and checks it (the names of `imported` images are valid
    /// too), and each host of `named` (one of [`AllowError::BadHost`] otherwise).
    pub fn open(path: &Path, named: &[String], imported: &[String]) -> Result<Edit, AllowError> {
        let text = read_spec(path)?;
        let spec = crate::spec::parse_with_images(path, &text, imported)?;
        if let Some(bad) = named
            .iter()
            .find(|host| !crate::spec::is_allow_rule(&host.to_ascii_lowercase()))
        {
            return Err(AllowError::BadHost(bad.clone()));
        }
        Ok(Edit {
            path: path.to_path_buf(),
            text,
            imported: imported.to_vec(),
            allowed: spec.allow,
        })
    }

    /// The spec's text with `hosts` (see [`new_hosts`]) added to `[network] allow`
    /// ([`edited`]), checked as a spec again before it may be written.
    pub fn with(&self, hosts: &[String]) -> Result<String, AllowError> {
        let new = edited(&self.path, &self.text, hosts)?;
        crate::spec::parse_with_images(&self.path, &new, &self.imported)
            .map_err(AllowError::Invalid)?;
        Ok(new)
    }

    /// The change from the spec as read to `new`, as [`diff`] shows it.
    pub fn diff(&self, new: &str) -> String {
        diff(&self.text, new)
    }
}

/// The hosts of `candidates` that are valid allow rules and not yet allowed, lower case,
/// each once, in order, at most [`MAX_HOSTS`]; and those that are not host names.
pub fn new_hosts(allowed: &[String], candidates: &[String]) -> (Vec<String>, Vec<String>) {
    let mut fresh: Vec<String> = Vec::new();
    let mut rejected = Vec::new();
    for host in candidates {
        let host = host.to_ascii_lowercase();
        if !crate::spec::is_allow_rule(&host) {
            rejected.push(host);
        } else if !allowed.contains(&host) && !fresh.contains(&host) && fresh.len() < MAX_HOSTS {
            fresh.push(host);
        }
    }
    (fresh, rejected)
}

/// The line to paste into `[network]` to allow `allowed` and `more`:
/// `allow = ["deb.debian.org", "example.org"]`.
pub fn allow_line(allowed: &[String], more: &[String]) -> String {
    let hosts: Vec<String> = allowed
        .iter()
        .chain(more)
        .map(|h| format!("\"{h}\""))
        .collect();
    format!("allow = [{}]", hosts.join(", "))
}

/// `text` with `hosts` appended to `[network] allow` (the table and the array made when
/// missing), the rest of the file as it was.
pub fn edited(path: &Path, text: &str, hosts: &[String]) -> Result<String, AllowError> {
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| AllowError::Toml {
                path: path.to_path_buf(),
                detail: crate::spec::toml_problem(text, e.message(), e.span()),
            })?;
    let shape = |field, wanted| AllowError::Shape {
        path: path.to_path_buf(),
        field,
        wanted,
    };
    let network = doc
        .entry("network")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| shape("network", "table"))?;
    if network.get("allow").is_none() {
        network.insert("allow", toml_edit::value(toml_edit::Array::new()));
    }
    let allow = network
        .get_mut("allow")
        .and_then(toml_edit::Item::as_array_mut)
        .ok_or_else(|| shape("network.allow", "list of hosts"))?;
    for host in hosts {
        allow.push(host.as_str());
    }
    Ok(doc.to_string())
}

/// The change from `old` to `new` as `-`/`+` lines with a line of context either side (the
/// edit is one contiguous block: the common head and tail are left out).
pub fn diff(old: &str, new: &str) -> String {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    let head = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
    let tail = old[head..]
        .iter()
        .rev()
        .zip(new[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = String::new();
    if head > 0 {
        out.push_str(&format!("  {}\n", old[head - 1]));
    }
    for line in &old[head..old.len() - tail] {
        out.push_str(&format!("- {line}\n"));
    }
    for line in &new[head..new.len() - tail] {
        out.push_str(&format!("+ {line}\n"));
    }
    if tail > 0 {
        out.push_str(&format!("  {}\n", old[old.len() - tail]));
    }
    out
}

/// Reads the spec at `path` for editing: a regular file only, at most [`MAX_SPEC_BYTES`].
pub fn read_spec(path: &Path) -> Result<String, AllowError> {
    let read = |source| AllowError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = contractor_protocol::file::read_regular(path, MAX_SPEC_BYTES).map_err(read)?;
    String::from_utf8(bytes)
        .map_err(|e| read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Replaces `path` with `text` atomically (a temporary file beside it, renamed over it),
/// keeping its permissions.
pub fn write_spec(path: &Path, text: &str) -> Result<(), AllowError> {
    let failed = |source| AllowError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.contractor-allow.{}", std::process::id()));
    let permissions = std::fs::metadata(path).map_err(failed)?.permissions();
    // A new file, never an existing one: the project directory may hold a link planted at
    // this name, and writing through it would overwrite whatever it points at.
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp);
    let written = created.and_then(|mut file| {
        let written = std::io::Write::write_all(&mut file, text.as_bytes())
            .and_then(|()| file.set_permissions(permissions))
            .and_then(|()| std::fs::rename(&temp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    });
    written.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_new_valid_hosts_are_taken_once() {
        let (fresh, rejected) = new_hosts(
            &hosts(&["deb.debian.org"]),
            &hosts(&[
                "Example.ORG",
                "deb.debian.org",
                "example.org",
                "a b\"]",
                "x.io:443",
                "*.crates.io",
            ]),
        );
        assert_eq!(fresh, ["example.org", "*.crates.io"]);
        assert_eq!(rejected, ["a b\"]", "x.io:443"]);
    }

    #[test]
    fn the_line_to_paste_holds_the_old_and_the_new_hosts() {
        assert_eq!(
            allow_line(&hosts(&["deb.debian.org"]), &hosts(&["example.org"])),
            r#"allow = ["deb.debian.org", "example.org"]"#
        );
    }

    #[test]
    fn an_existing_list_grows_and_comments_stay() {
        let path = Path::new("contractor.toml");
        let text = "# my build\n[build]\nscript = \"make\"  # build it\n\n[network]\nallow = [\"deb.debian.org\"]  # apt\n\n[vm]\ncpus = 2\n";
        let new = edited(path, text, &hosts(&["example.org"])).expect("edited");
        assert!(
            new.contains("allow = [\"deb.debian.org\", \"example.org\"]  # apt\n"),
            "{new}"
        );
        assert!(
            new.starts_with("# my build\n[build]\nscript = \"make\"  # build it\n"),
            "{new}"
        );
        assert!(new.ends_with("[vm]\ncpus = 2\n"), "{new}");
        let shown = diff(text, &new);
        assert_eq!(
            shown,
            "  [network]\n- allow = [\"deb.debian.org\"]  # apt\n+ allow = [\"deb.debian.org\", \"example.org\"]  # apt\n  \n"
        );
        crate::spec::parse(path, &new).expect("still a spec");
    }

    #[test]
    fn a_spec_without_network_gets_the_table() {
        let path = Path::new("contractor.toml");
        let text = "[build]\nscript = \"make\"\n";
        let new = edited(path, text, &hosts(&["example.org"])).expect("edited");
        let spec = crate::spec::parse(path, &new).expect("still a spec");
        assert_eq!(spec.allow, ["example.org"]);
        assert!(new.starts_with(text), "{new}");
        assert!(
            new.ends_with("[network]\nallow = [\"example.org\"]\n"),
            "{new:?}"
        );
        let inline = "network = { allow = [] }\n[build]\nscript = \"make\"\n";
        let new = edited(path, inline, &hosts(&["example.org"])).expect("edited");
        assert_eq!(
            crate::spec::parse(path, &new).expect("spec").allow,
            ["example.org"]
        );
    }

    #[test]
    fn a_field_of_another_type_is_named_and_nothing_is_changed() {
        let path = Path::new("contractor.toml");
        let err = edited(path, "network = 5\n", &hosts(&["a.org"])).expect_err("not a table");
        assert!(
            err.to_string().contains("`network` is not a table"),
            "{err}"
        );
        let err =
            edited(path, "[network]\nallow = \"a\"\n", &hosts(&["a.org"])).expect_err("not a list");
        assert!(
            err.to_string().contains("`network.allow` is not a list"),
            "{err}"
        );
        let err = edited(path, "[network\n", &hosts(&["a.org"])).expect_err("not TOML");
        assert!(err.to_string().contains("is not valid TOML"), "{err}");
    }

    #[test]
    fn an_edit_checks_the_spec_and_the_named_hosts_then_the_changed_spec() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("contractor.toml");
        std::fs::write(&path, "[build]\nscript = \"make\"\nimage = \"mine\"\n").expect("write");
        let err = Edit::open(&path, &[], &[]).expect_err("mine is not imported");
        assert!(matches!(err, AllowError::Spec(_)), "{err}");
        assert!(err.to_string().contains("mine"), "{err}");
        let imported = hosts(&["mine"]);
        let err = Edit::open(&path, &hosts(&["a.org", "x.io:443"]), &imported)
            .expect_err("a port is no host");
        assert!(
            err.to_string()
                .starts_with("\"x.io:443\" is not a host name"),
            "{err}"
        );
        let edit = Edit::open(&path, &hosts(&["A.org"]), &imported).expect("opened");
        assert!(edit.allowed.is_empty());
        let new = edit.with(&hosts(&["a.org"])).expect("edited");
        assert!(new.ends_with("[network]\nallow = [\"a.org\"]\n"), "{new:?}");
        assert!(edit.diff(&new).contains("+ allow = [\"a.org\"]"), "{new}");
    }

    #[test]
    fn the_spec_is_replaced_whole_with_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("contractor.toml");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        write_spec(&path, "new").expect("replace");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temp file left"
        );
        // A link planted at the temporary name is not written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").expect("victim");
        let temp = dir.path().join(format!(
            ".contractor.toml.contractor-allow.{}",
            std::process::id()
        ));
        std::os::unix::fs::symlink(&victim, &temp).expect("plant");
        assert!(
            write_spec(&path, "newer").is_err(),
            "wrote through a planted link"
        );
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        std::fs::remove_file(&temp).expect("unplant");
        std::fs::remove_file(&victim).expect("victim");
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&path, &link).expect("link");
        assert!(read_spec(&link).is_err(), "a link is not read");
    }
}
