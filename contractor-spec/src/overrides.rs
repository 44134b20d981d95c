//! What `contractor build`'s flags change in the project's `contractor.toml` for one build:
//! `--script-file`, `--allow`, `--timeout`, `--no-artifacts` (what a CI engine's executor,
//! such as `contractor-gitlab-executor`, hands over). The spec is read and checked as
//! always, then the flags apply, each checked as the field it replaces (the same checks as
//! the spec's own fields, so they live here with them); with `--script-file` the file may
//! be missing (the defaults then apply, the project being its directory). The front end
//! only fills [`Overrides`] from its flags.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::{self, BuildSpec, SpecError};

/// The largest `--script-file` read: the script travels to the guest inside the job line,
/// whose limit is 4 MiB (`contractor_protocol::jsonl::MAX_LINE_BYTES`).
pub const MAX_SCRIPT_FILE_BYTES: u64 = 3 << 20;

/// The flags of one build that change its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--script-file`: the script to run instead of `[build] script`.
    pub script_file: Option<PathBuf>,
    /// `--allow`: rules added to `[network] allow`.
    pub allow: Vec<String>,
    /// `--timeout`: replaces `[build] timeout` (a duration: `90s`, `10m`, `1h`).
    pub timeout: Option<String>,
    /// `--no-artifacts`: collect none (`[build] artifacts` ignored).
    pub no_artifacts: bool,
}

/// A flag's value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    /// The spec itself is wrong.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// `--script-file` cannot be read or is too big.
    #[error("--script-file {}: {problem}", path.display())]
    ScriptFile {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
    /// A flag's value is malformed.
    #[error("{flag} {value:?}: {problem}")]
    Value {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
        /// What is wrong and what is accepted.
        problem: String,
    },
}

impl Overrides {
    /// True when no flag changes the spec.
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// The spec at `path` (see [`spec::load_with_images`]; the names of `imported` images
    /// are valid too) with these flags applied.
    pub fn load(&self, path: &Path, imported: &[String]) -> Result<BuildSpec, OverrideError> {
        let script = match &self.script_file {
            Some(file) => Some(read_script(file)?),
            None => None,
        };
        let mut spec = match spec::load_with_images(path, imported) {
            Err(SpecError::Read { error, .. })
                if script.is_some() && error.kind() == std::io::ErrorKind::NotFound =>
            {
                let mut spec =
                    spec::parse_with_images(path, "[build]\nscript = \"true\"\n", imported)?;
                spec.project_dir = std::path::absolute(&spec.project_dir)
                    .unwrap_or_else(|_| spec.project_dir.clone());
                spec.lock = crate::lock::load(&spec.project_dir).map_err(SpecError::from)?;
                spec
            }
            loaded => loaded?,
        };
        if let Some(script) = script {
            spec.script = script;
        }
        self.apply(&mut spec)?;
        Ok(spec)
    }

    /// Applies `--allow`, `--timeout` and `--no-artifacts` to `spec`.
    fn apply(&self, spec: &mut BuildSpec) -> Result<(), OverrideError> {
        for rule in &self.allow {
            let problem = if rule.contains("://") {
                spec::url_rule_problem(rule)
            } else if spec::is_allow_rule(&rule.to_ascii_lowercase()) {
                None
            } else {
                Some("not a host name (deb.debian.org), *.host or URL rule".into())
            };
            if let Some(problem) = problem {
                return Err(OverrideError::Value {
                    flag: "--allow",
                    value: rule.clone(),
                    problem,
                });
            }
            if !spec.allow.contains(rule) {
                spec.allow.push(rule.clone());
            }
        }
        if let Some(text) = &self.timeout {
            spec.timeout = spec::parse_duration(text)
                .filter(|t| *t > Duration::ZERO)
                .ok_or_else(|| OverrideError::Value {
                    flag: "--timeout",
                    value: text.clone(),
                    problem: "not a duration; use a number with a unit: 90s, 10m, 1h".into(),
                })?;
        }
        if self.no_artifacts {
            spec.artifacts.clear();
        }
        Ok(())
    }
}

/// The text of `--script-file` (`-` for stdin), at most [`MAX_SCRIPT_FILE_BYTES`].
fn read_script(path: &Path) -> Result<String, OverrideError> {
    let problem = |problem: String| OverrideError::ScriptFile {
        path: path.to_path_buf(),
        problem,
    };
    let input: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).map_err(|e| problem(e.to_string()))?)
    };
    let mut text = Vec::new();
    input
        .take(MAX_SCRIPT_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| problem(e.to_string()))?;
    if text.len() as u64 > MAX_SCRIPT_FILE_BYTES {
        return Err(problem(format!(
            "over {MAX_SCRIPT_FILE_BYTES} bytes, the most a script may have"
        )));
    }
    String::from_utf8(text).map_err(|_| problem("not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_replace_the_script_add_hosts_and_set_the_timeout() {
        let dir = tempfile::tempdir().expect("test setup");
        let file = dir.path().join("contractor.toml");
        std::fs::write(
            &file,
            "[build]\nscript = \"make\"\nartifacts = [\"out\"]\n[network]\nallow = [\"deb.debian.org\"]\n",
        )
        .expect("test setup");
        let script = dir.path().join("job.sh");
        std::fs::write(&script, "echo from the file\n").expect("test setup");
        let overrides = Overrides {
            script_file: Some(script),
            allow: vec!["deb.debian.org".into(), "*.crates.io".into()],
            timeout: Some("15m".into()),
            no_artifacts: true,
        };
        let spec = overrides.load(&file, &[]).expect("loads");
        assert_eq!(spec.script, "echo from the file\n");
        assert_eq!(spec.allow, vec!["deb.debian.org", "*.crates.io"]);
        assert_eq!(spec.timeout, Duration::from_secs(900));
        assert!(spec.artifacts.is_empty());
    }

    #[test]
    fn with_a_script_file_the_spec_may_be_missing_but_not_broken() {
        let dir = tempfile::tempdir().expect("test setup");
        let script = dir.path().join("job.sh");
        std::fs::write(&script, "true\n").expect("test setup");
        let file = dir.path().join("contractor.toml");
        let overrides = Overrides {
            script_file: Some(script),
            ..Overrides::default()
        };
        let spec = overrides.load(&file, &[]).expect("defaults");
        assert_eq!(spec.project_dir, dir.path());
        assert_eq!(spec.image, spec::DEFAULT_IMAGE);
        assert!(Overrides::default().load(&file, &[]).is_err());
        std::fs::write(&file, "[build]\nscript = \"x\"\n[vm]\ncpus = \"many\"\n")
            .expect("test setup");
        let err = overrides.load(&file, &[]).expect_err("broken");
        assert!(err.to_string().contains("\"many\""), "{err}");
    }

    #[test]
    fn the_names_of_imported_images_are_valid_with_the_flags_too() {
        let dir = tempfile::tempdir().expect("test setup");
        let file = dir.path().join("contractor.toml");
        std::fs::write(&file, "[build]\nscript = \"make\"\nimage = \"my-distro\"\n")
            .expect("test setup");
        let overrides = Overrides {
            timeout: Some("90s".into()),
            ..Overrides::default()
        };
        let err = overrides.load(&file, &[]).expect_err("not imported");
        assert!(err.to_string().contains("my-distro"), "{err}");
        let spec = overrides
            .load(&file, &["my-distro".to_string()])
            .expect("imported");
        assert_eq!(spec.image, "my-distro");
        assert_eq!(spec.timeout, Duration::from_secs(90));
    }

    #[test]
    fn bad_values_are_named_with_what_is_accepted() {
        let dir = tempfile::tempdir().expect("test setup");
        let file = dir.path().join("contractor.toml");
        std::fs::write(&file, "[build]\nscript = \"make\"\n").expect("test setup");
        let allow = Overrides {
            allow: vec!["http://localhost:8080".into()],
            ..Overrides::default()
        };
        let err = allow.load(&file, &[]).expect_err("a bad rule").to_string();
        assert!(err.contains("--allow \"http://localhost:8080\""), "{err}");
        let timeout = Overrides {
            timeout: Some("soon".into()),
            ..Overrides::default()
        };
        let err = timeout
            .load(&file, &[])
            .expect_err("a bad timeout")
            .to_string();
        assert!(
            err.contains("--timeout \"soon\"") && err.contains("10m"),
            "{err}"
        );
        let big = dir.path().join("big.sh");
        std::fs::write(&big, vec![b'#'; MAX_SCRIPT_FILE_BYTES as usize + 1]).expect("setup");
        let script = Overrides {
            script_file: Some(big),
            ..Overrides::default()
        };
        let err = script.load(&file, &[]).expect_err("too big").to_string();
        assert!(err.contains("big.sh") && err.contains("3145728"), "{err}");
    }
}
