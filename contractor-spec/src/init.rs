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
    /// A Debian source package: `debian/control`.
    Debian,
    /// A `Cargo.toml`.
    Cargo,
    /// A Python project: `pyproject.toml` or `setup.py`.
    Python,
    /// A Node.js project: `package.json`.
    Node,
    /// A `Makefile`.
    Make,
    /// Nothing recognised.
    Unknown,
}

impl ProjectKind {
    /// How messages name it: "a Python project".
    pub fn described(self) -> &'static str {
        match self {
            ProjectKind::Debian => "a Debian source package",
            ProjectKind::Cargo => "a Cargo project",
            ProjectKind::Python => "a Python project",
            ProjectKind::Node => "a Node.js project",
            ProjectKind::Make => "a Makefile project",
            ProjectKind::Unknown => "this project",
        }
    }
}

/// Largest project file `init` reads (`debian/control`, `pyproject.toml`): 1 MiB. A bigger
/// one is not read, and the template says so.
pub const MAX_PROJECT_FILE: u64 = 1024 * 1024;

/// Most Python build requirements written into a template: 64 (Build-Depends: the 256
/// packages a derived image takes). The rest are named in a comment for the user to add.
const MAX_BUILD_REQUIRES: usize = 64;

/// What `init` found in a project: its kind and what its template takes from its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// The kind.
    pub kind: ProjectKind,
    /// A lock file is there (`Cargo.lock`, `package-lock.json`, `requirements.txt`).
    pub locked: bool,
    /// Python: the `[build-system] requires` of pyproject.toml (or setuptools and wheel
    /// for a setup.py); Debian: the Build-Depends packages. Each safe to write into a shell
    /// line and into TOML as it is.
    pub requires: Vec<String>,
    /// What could not be taken over, one comment line each.
    pub notes: Vec<String>,
}

/// Recognises the project in `dir`.
pub fn detect(dir: &Path) -> ProjectKind {
    if dir.join("debian/control").is_file() {
        ProjectKind::Debian
    } else if dir.join("Cargo.toml").is_file() {
        ProjectKind::Cargo
    } else if dir.join("pyproject.toml").is_file() || dir.join("setup.py").is_file() {
        ProjectKind::Python
    } else if dir.join("package.json").is_file() {
        ProjectKind::Node
    } else if ["Makefile", "makefile", "GNUmakefile"]
        .iter()
        .any(|m| dir.join(m).is_file())
    {
        ProjectKind::Make
    } else {
        ProjectKind::Unknown
    }
}

/// Recognises the project in `dir` and reads what its template needs.
pub fn survey(dir: &Path) -> Project {
    let kind = detect(dir);
    let mut project = Project {
        kind,
        locked: false,
        requires: Vec::new(),
        notes: Vec::new(),
    };
    let read = |name: &str, notes: &mut Vec<String>| match contractor_protocol::file::read_regular(
        &dir.join(name),
        MAX_PROJECT_FILE,
    ) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(err) => {
            notes.push(format!("{name} was not read: {err}"));
            None
        }
    };
    match kind {
        ProjectKind::Cargo => project.locked = dir.join("Cargo.lock").is_file(),
        ProjectKind::Node => project.locked = dir.join("package-lock.json").is_file(),
        ProjectKind::Python => {
            project.locked = dir.join("requirements.txt").is_file();
            let requires = match dir.join("pyproject.toml").is_file() {
                true => read("pyproject.toml", &mut project.notes)
                    .map(|text| build_requires(&text))
                    .unwrap_or_default(),
                false => Vec::new(),
            };
            // pip's own default backend when pyproject.toml names none.
            let requires = match requires.is_empty() {
                true => vec!["setuptools".to_string(), "wheel".to_string()],
                false => requires,
            };
            project.requires = safe_items(
                requires,
                is_safe_requirement,
                MAX_BUILD_REQUIRES,
                &mut project.notes,
            );
        }
        ProjectKind::Debian => {
            let depends = read("debian/control", &mut project.notes)
                .map(|text| build_depends(&text))
                .unwrap_or_default();
            project.requires = safe_items(
                depends,
                contractor_protocol::image::is_package_name,
                contractor_protocol::image::MAX_DERIVED_PACKAGES - 1,
                &mut project.notes,
            );
        }
        ProjectKind::Make | ProjectKind::Unknown => {}
    }
    project
}

/// `items` that pass `ok`, each once, at most `max`; the others named in `notes`.
fn safe_items(
    items: Vec<String>,
    ok: fn(&str) -> bool,
    max: usize,
    notes: &mut Vec<String>,
) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for item in items {
        if kept.contains(&item) {
            continue;
        }
        if !ok(&item) || kept.len() == max {
            let shown: String = item
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(80)
                .collect();
            notes.push(format!(
                "not taken over (add it yourself if it is needed): {shown}"
            ));
            continue;
        }
        kept.push(item);
    }
    kept
}

/// `[build-system] requires` of a pyproject.toml (empty when it has none or does not parse).
pub fn build_requires(pyproject: &str) -> Vec<String> {
    let Ok(value) = pyproject.parse::<toml::Table>() else {
        return Vec::new();
    };
    value
        .get("build-system")
        .and_then(|b| b.get("requires"))
        .and_then(|r| r.as_array())
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(|s| s.trim().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a requirement can be written, single-quoted, into a shell line in TOML: a name,
/// extras and version specifiers only (an environment marker, with its quotes, cannot).
fn is_safe_requirement(requirement: &str) -> bool {
    !requirement.is_empty()
        && requirement.len() <= 200
        && requirement
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-<>=!~,[] *+".contains(c))
}

/// The packages of the Build-Depends, Build-Depends-Arch and Build-Depends-Indep of a
/// `debian/control`'s source stanza (the first): of each `a | b` the first, without
/// version, architecture, profile or multi-arch qualifiers.
pub fn build_depends(control: &str) -> Vec<String> {
    let mut packages = Vec::new();
    let mut in_depends = false;
    let mut seen_field = false;
    for line in control.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if seen_field {
                break;
            }
            continue;
        }
        let value = if line.starts_with([' ', '\t']) {
            if !in_depends {
                continue;
            }
            line
        } else {
            seen_field = true;
            let Some((field, value)) = line.split_once(':') else {
                in_depends = false;
                continue;
            };
            in_depends = matches!(
                field.trim().to_ascii_lowercase().as_str(),
                "build-depends" | "build-depends-arch" | "build-depends-indep"
            );
            if !in_depends {
                continue;
            }
            value
        };
        for relation in value.split(',') {
            let first = relation.split('|').next().unwrap_or_default();
            let name = first
                .split(['(', '[', '<', ' ', '\t'])
                .find(|part| !part.is_empty())
                .unwrap_or_default();
            let name = name.split(':').next().unwrap_or_default();
            if !name.is_empty() {
                packages.push(name.to_string());
            }
        }
    }
    packages
}

/// The commented spec for a project of `kind` (with nothing read from its files).
pub fn template(kind: ProjectKind) -> String {
    render(&Project {
        kind,
        locked: false,
        requires: Vec::new(),
        notes: Vec::new(),
    })
}

/// What differs between the templates.
struct Parts {
    /// `[image]` (derived) or empty for `build.image`'s default.
    image: String,
    fetch: String,
    script: String,
    artifacts: &'static str,
    timeout: &'static str,
    allow: &'static str,
    cache: &'static str,
}

/// An `[image]` table: `base` with `packages`, and why.
fn derived(base: &str, packages: &[&str], why: &str) -> String {
    let list: Vec<String> = packages.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "# {why}\n# The image is derived once from the base with these Debian packages, and shared.\n\
         [image]\nbase = \"{base}\"\npackages = [{}]\n\n",
        list.join(", ")
    )
}

/// A Cargo project: Debian's current Rust, `cargo fetch`, build and test offline.
fn cargo_parts(project: &Project) -> Parts {
    let locked = if project.locked { " --locked" } else { "" };
    Parts {
        image: derived(
            "debian-13",
            &["rustc-web", "cargo-web"],
            "Debian 13 with Debian's current Rust toolchain (rustc-web, cargo-web).",
        ),
        fetch: format!("cargo fetch{locked}"),
        script: format!(
            "cargo build{locked} --offline --release\ncargo test{locked} --offline --release"
        ),
        artifacts: "# artifacts = [\"target/release/NAME\"]",
        timeout: "30m",
        allow: "[\"index.crates.io\", \"static.crates.io\"]",
        cache:
            "[cache]\npaths = [\"~/.cargo/registry\"]   # downloaded crates, kept between builds\n",
    }
}

/// A Python project: pip downloads wheels (and pytest) in the fetch phase; the script
/// installs them offline into a venv and runs pytest.
fn python_parts(project: &Project) -> Parts {
    let requires: Vec<String> = project.requires.iter().map(|r| format!("'{r}'")).collect();
    let (from, install) = match project.locked {
        true => ("-r requirements.txt .", "-r requirements.txt ."),
        false => (".", "."),
    };
    Parts {
        image: derived(
            "debian-13",
            &["python3-pip", "python3-venv"],
            "Debian 13 with Python 3, pip and venv.",
        ),
        // The build backend is fetched too: the script builds the project offline.
        fetch: format!(
            "python3 -m pip download --no-input --disable-pip-version-check -d wheels {from} pytest {}",
            requires.join(" ")
        )
        .trim_end()
        .to_string(),
        script: format!(
            "python3 -m venv .venv\n\
             .venv/bin/pip install --no-input --disable-pip-version-check --no-index --find-links wheels {install} pytest\n\
             .venv/bin/python -m pytest -q"
        ),
        artifacts: "# artifacts = [\"dist/*\"]",
        timeout: "40m",
        allow: "[\"pypi.org\", \"files.pythonhosted.org\"]",
        cache: "[cache]\npaths = [\"/build/wheels\"]   # downloaded wheels, kept between builds\n",
    }
}

/// A Debian source package: its Build-Depends in the image, `dpkg-buildpackage` in the
/// script.
fn debian_parts(project: &Project) -> Parts {
    let mut packages: Vec<&str> = project.requires.iter().map(String::as_str).collect();
    if !packages.contains(&"dpkg-dev") {
        packages.push("dpkg-dev");
    }
    Parts {
        image: derived(
            "debian-13",
            &packages,
            "Debian 13 with the package's Build-Depends, read from debian/control.",
        ),
        // The Build-Depends are in the image, so the build needs no network: the
        // fetch only checks that none is missing, before the long part starts.
        fetch: "dpkg-checkbuilddeps".to_string(),
        script: "DEB_BUILD_OPTIONS=parallel=2 dpkg-buildpackage -us -uc -b\nmv ../*.deb ."
            .to_string(),
        artifacts: "artifacts = [\"*.deb\"]",
        timeout: "60m",
        allow: "[]",
        cache: "",
    }
}

fn parts(project: &Project) -> Parts {
    match project.kind {
        ProjectKind::Cargo => cargo_parts(project),
        ProjectKind::Python => python_parts(project),
        ProjectKind::Node => Parts {
            image: derived(
                "debian-13",
                &["nodejs", "npm"],
                "Debian 13 with Node.js and npm.",
            ),
            fetch: match project.locked {
                true => "npm ci --no-audit --no-fund",
                false => "npm install --no-audit --no-fund",
            }
            .to_string(),
            script: "npm test".to_string(),
            artifacts: "# artifacts = [\"dist/*\"]",
            timeout: "30m",
            allow: "[\"registry.npmjs.org\"]",
            cache: "[cache]\npaths = [\"~/.npm\"]   # npm's download cache, kept between builds\n",
        },
        ProjectKind::Debian => debian_parts(project),
        ProjectKind::Make => Parts {
            image: String::new(),
            fetch: String::new(),
            script: "make\nmake check".to_string(),
            artifacts: "# artifacts = [\"NAME\"]",
            timeout: "10m",
            allow: "[]",
            cache: "",
        },
        ProjectKind::Unknown => Parts {
            image: String::new(),
            fetch: String::new(),
            script: "echo 'replace me with the build commands'".to_string(),
            artifacts: "# artifacts = [\"dist/*\"]",
            timeout: "10m",
            allow: "[]",
            cache: "",
        },
    }
}

/// The commented spec for `project`.
pub fn render(project: &Project) -> String {
    let Parts {
        image,
        fetch,
        script,
        artifacts,
        timeout,
        allow,
        cache,
    } = parts(project);
    let build_image = match image.is_empty() {
        true => "image = \"debian-12-build\"      # the builder image (the default)\n",
        false => "",
    };
    let fetch = match fetch.is_empty() {
        true => String::new(),
        false => format!(
            "# The fetch runs first, with the network of [network] allow; then the network is\n\
             # cut, and the script runs with none.\nfetch = '''\n{fetch}\n'''\n"
        ),
    };
    let notes: String = project
        .notes
        .iter()
        .map(|n| format!("# contractor init: {}\n", n.replace(['\n', '\r'], " ")))
        .collect();
    let cache = match cache.is_empty() {
        true => String::new(),
        false => format!("\n{cache}"),
    };
    let what = project.kind.described();
    format!(
        r#"# contractor.toml for {what}, written by `contractor init`.
# Every field is described in docs/configuration.md.
{notes}
{image}[build]
{build_image}{fetch}# The script runs with `sh -e` in the unpacked source: the first failing command fails
# the build.
script = """
{script}
"""
{artifacts}                     # paths or globs relative to the source root
timeout = "{timeout}"                # the build is stopped after this long
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
    let project = survey(dir);
    let kind = project.kind;
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
    std::io::Write::write_all(&mut file, render(&project).as_bytes()).map_err(|source| {
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

    const KINDS: [ProjectKind; 6] = [
        ProjectKind::Debian,
        ProjectKind::Cargo,
        ProjectKind::Python,
        ProjectKind::Node,
        ProjectKind::Make,
        ProjectKind::Unknown,
    ];

    fn parsed(text: &str) -> crate::spec::BuildSpec {
        crate::spec::parse(Path::new("contractor.toml"), text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn every_template_is_a_valid_spec() {
        for kind in KINDS {
            let spec = parsed(&template(kind));
            if matches!(kind, ProjectKind::Make | ProjectKind::Unknown) {
                assert_eq!(spec.image, crate::spec::DEFAULT_IMAGE, "{kind:?}");
            }
        }
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
    }

    #[test]
    fn each_ecosystem_gets_an_image_a_fetch_a_cache_its_registry_and_time() {
        /// Kind, packages in the image, hosts allowed, cache paths, what the fetch runs.
        type Case = (
            ProjectKind,
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
            &'static str,
        );
        let cases: [Case; 4] = [
            (
                ProjectKind::Cargo,
                &["rustc-web", "cargo-web"],
                &["index.crates.io", "static.crates.io"],
                &["/root/.cargo/registry"],
                "cargo fetch",
            ),
            (
                ProjectKind::Python,
                &["python3-pip", "python3-venv"],
                &["pypi.org", "files.pythonhosted.org"],
                &["/build/wheels"],
                "pip download",
            ),
            (
                ProjectKind::Node,
                &["nodejs", "npm"],
                &["registry.npmjs.org"],
                &["/root/.npm"],
                "npm install",
            ),
            (
                ProjectKind::Debian,
                &["dpkg-dev"],
                &[],
                &[],
                "dpkg-checkbuilddeps",
            ),
        ];
        for (kind, packages, hosts, cache, fetch) in cases {
            let spec = parsed(&template(kind));
            let derived = spec
                .derived
                .unwrap_or_else(|| panic!("{kind:?}: no [image]"));
            assert_eq!(derived.base, "debian-13", "{kind:?}");
            for package in packages {
                assert!(
                    derived.packages.iter().any(|p| p == package),
                    "{kind:?}: {package}"
                );
            }
            assert_eq!(spec.allow, hosts, "{kind:?}");
            assert_eq!(spec.cache_paths, cache, "{kind:?}");
            let got = spec.fetch.unwrap_or_else(|| panic!("{kind:?}: no fetch"));
            assert!(got.contains(fetch), "{kind:?}: {got}");
            // Longer than the 10 minutes of a plain template: packaging's suite alone took
            // 19 minutes under TCG.
            assert!(
                spec.timeout >= std::time::Duration::from_secs(30 * 60),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_python_project_fetches_its_build_backend_and_leaves_out_what_cannot_be_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("pyproject.toml"),
            "[build-system]\nrequires = [\"flit_core >=3.3,<4\", \"tomli; python_version < '3.11'\"]\nbuild-backend = \"flit_core.buildapi\"\n",
        )
        .expect("write");
        let project = survey(dir.path());
        assert_eq!(project.kind, ProjectKind::Python);
        assert_eq!(project.requires, ["flit_core >=3.3,<4"]);
        assert_eq!(project.notes.len(), 1, "{:?}", project.notes);
        let text = render(&project);
        let spec = parsed(&text);
        let fetch = spec.fetch.expect("fetch");
        assert!(
            fetch.contains("-d wheels . pytest 'flit_core >=3.3,<4'"),
            "{fetch}"
        );
        assert!(
            spec.script
                .contains("--no-index --find-links wheels . pytest"),
            "{}",
            spec.script
        );
        assert!(text.contains("# contractor init: not taken over"), "{text}");

        // A setup.py alone: setuptools, as pip assumes.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("setup.py"), "").expect("write");
        std::fs::write(dir.path().join("requirements.txt"), "").expect("write");
        let project = survey(dir.path());
        assert_eq!(project.requires, ["setuptools", "wheel"]);
        let fetch = parsed(&render(&project)).fetch.expect("fetch");
        assert!(fetch.contains("-r requirements.txt ."), "{fetch}");
    }

    #[test]
    fn lock_files_make_the_fetch_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Cargo.toml"), "").expect("write");
        std::fs::write(dir.path().join("Cargo.lock"), "").expect("write");
        let spec = parsed(&render(&survey(dir.path())));
        assert_eq!(spec.fetch.as_deref(), Some("cargo fetch --locked\n"));
        assert!(
            spec.script.contains("cargo test --locked --offline"),
            "{}",
            spec.script
        );

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("package.json"), "{}").expect("write");
        std::fs::write(dir.path().join("package-lock.json"), "{}").expect("write");
        let spec = parsed(&render(&survey(dir.path())));
        assert_eq!(spec.fetch.as_deref(), Some("npm ci --no-audit --no-fund\n"));
    }

    #[test]
    fn a_debian_source_package_gets_its_build_depends_in_the_image() {
        let control = "# comment
Source: figlet
Section: text
Build-Depends: debhelper-compat (= 13),
 libfoo-dev [linux-any] <!nocheck> | libbar-dev,
 python3:any,
# a comment inside
 ${misc:Depends}
Build-Depends-Indep: docbook-xsl
Standards-Version: 4.6.0

Package: figlet
Depends: libc6
";
        assert_eq!(
            build_depends(control),
            [
                "debhelper-compat",
                "libfoo-dev",
                "python3",
                "${misc",
                "docbook-xsl"
            ]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("debian")).expect("mkdir");
        std::fs::write(dir.path().join("debian/control"), control).expect("write");
        std::fs::write(dir.path().join("Makefile"), "").expect("write");
        let project = survey(dir.path());
        assert_eq!(project.kind, ProjectKind::Debian);
        let spec = parsed(&render(&project));
        assert_eq!(
            spec.derived.expect("derived").packages,
            [
                "debhelper-compat",
                "docbook-xsl",
                "dpkg-dev",
                "libfoo-dev",
                "python3"
            ]
        );
        assert_eq!(spec.artifacts, ["*.deb"]);
    }

    #[test]
    fn init_detects_the_project_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Makefile"), "all:\n").expect("makefile");
        let (path, kind) = write(dir.path()).expect("init");
        assert_eq!(kind, ProjectKind::Make);
        let spec = crate::spec::load_with_images(&path, &[]).expect("written spec loads");
        assert_eq!(spec.script, "make\nmake check\n");
        std::fs::write(&path, "# mine\n").expect("edit");
        let err = write(dir.path()).expect_err("exists");
        assert!(err.to_string().contains("exists already"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "# mine\n");
    }
}
