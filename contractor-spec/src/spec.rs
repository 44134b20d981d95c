//! `contractor.toml`: what the user asks for, parsed and checked before anything starts.
//!
//! Every error names the file, the line and the field, and says what would be accepted.
//! Nothing is defaulted silently except the documented defaults below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The default builder image.
pub const DEFAULT_IMAGE: &str = contractor_protocol::image::DEFAULT_IMAGE;
const MIB: u64 = 1024 * 1024;

/// `[vm] cpus` when it is not given.
pub const DEFAULT_CPUS: u32 = 2;
/// `[vm] memory` when it is not given, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 2048;

/// Images Contractor knows how to build.
pub const KNOWN_IMAGES: &[&str] = &[DEFAULT_IMAGE, "debian-13-build"];

/// A checked build specification.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    /// The file it came from.
    pub path: PathBuf,
    /// The project directory (the file's directory).
    pub project_dir: PathBuf,
    /// Builder image name (of a derived image: named by its definition).
    pub image: String,
    /// `[image]`: the image is derived from a base with packages.
    pub derived: Option<Derived>,
    /// The script, run with `sh -e -c`.
    pub script: String,
    /// `build.fetch`: run first with the network of `[network] allow`; the script then
    /// runs with none.
    pub fetch: Option<String>,
    /// Extra environment for the script.
    pub env: BTreeMap<String, String>,
    /// Artifact paths or globs relative to the source root.
    pub artifacts: Vec<String>,
    /// Wall-clock limit of the build.
    pub timeout: Duration,
    /// Most bytes of output the build may write.
    pub max_log_bytes: u64,
    /// Most bytes of artifacts the build may store, in all.
    pub max_artifacts_bytes: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size of the VM in GiB.
    pub disk_gib: u64,
    /// Hosts the build may reach through the proxy, and URL rules ([`url_rule_problem`]).
    pub allow: Vec<String>,
    /// `[network] inspect`: the proxy terminates TLS to the allowed hosts with the build's
    /// own authority and records each download (default true).
    pub inspect: bool,
    /// `[network] tunnel`: allowed hosts whose TLS is tunnelled, not inspected.
    pub tunnel: Vec<String>,
    /// Guest directories kept between builds of this project (absolute, `~` expanded).
    pub cache_paths: Vec<String>,
    /// Most bytes the kept directories may take, packed.
    pub cache_max_bytes: u64,
    /// The project's contractor.lock, when it has one (read by [`load`]).
    pub lock: Option<crate::lock::Lock>,
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}: {error} (run `contractor build` in a directory with a contractor.toml, or pass -f FILE)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why: said in the message, and so not a `#[source]` (a printed chain would say
        /// it twice).
        error: std::io::Error,
    },
    /// The TOML did not parse or had unknown fields.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// `line L, column C, at `…`: ` and toml's message ([`toml_problem`]).
        message: String,
    },
    /// The project's contractor.lock is unreadable or invalid.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// A value is out of range or malformed.
    #[error("{path}:{line}: `{field}` = {value}: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Dotted field name.
        field: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    build: RawBuild,
    #[serde(default)]
    vm: RawVm,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    cache: RawCache,
    image: Option<Spanned<RawImage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    base: Spanned<String>,
    #[serde(default)]
    packages: Vec<Spanned<String>>,
    #[serde(default = "checked")]
    check_valid_until: bool,
}

/// `[image] check_valid_until`'s default: apt checks the mirror's Release dates.
fn checked() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    max_size: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    image: Option<Spanned<String>>,
    script: Spanned<String>,
    fetch: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    artifacts: Vec<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    max_log: Option<Spanned<String>>,
    max_artifacts: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVm {
    cpus: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default = "inspect_by_default")]
    inspect: bool,
    #[serde(default)]
    tunnel: Vec<Spanned<String>>,
}

fn inspect_by_default() -> bool {
    true
}

impl Default for RawNetwork {
    fn default() -> Self {
        RawNetwork {
            allow: Vec::new(),
            inspect: inspect_by_default(),
            tunnel: Vec::new(),
        }
    }
}

/// The most bytes of a `contractor.toml` that are read: 1 MiB.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Reads and checks a spec file (a regular file, never through a link, of at most
/// [`MAX_SPEC_BYTES`]), with the names of `imported` images valid too, and the project's
/// `contractor.lock`.
pub fn load_with_images(path: &Path, imported: &[String]) -> Result<BuildSpec, SpecError> {
    let bytes =
        contractor_protocol::file::read_regular(path, MAX_SPEC_BYTES).map_err(|source| {
            SpecError::Read {
                path: path.to_path_buf(),
                error: source,
            }
        })?;
    let text = String::from_utf8(bytes).map_err(|_| SpecError::Read {
        path: path.to_path_buf(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"),
    })?;
    let mut spec = parse_with_images(path, &text, imported)?;
    // Absolute, so that the paths in the build record and the summary work from anywhere.
    if let Ok(dir) = std::path::absolute(&spec.project_dir) {
        spec.project_dir = dir;
    }
    spec.lock = crate::lock::load(&spec.project_dir)?;
    Ok(spec)
}

/// A derived image's definition: `[image] base = "debian-12" packages = [...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// `debian-12`, `debian-13` or `debian-unstable`.
    pub base: String,
    /// Debian packages, sorted, each once.
    pub packages: Vec<String>,
    /// `check_valid_until`: whether apt refuses a mirror whose Release file is past its
    /// `Valid-Until` date (default true; false only on request, for a snapshot or a stale
    /// mirror, and then recorded in the image's manifest and name).
    pub check_valid_until: bool,
}

/// True when `rule` is a valid `[network] allow` entry: a host name (`deb.debian.org`) or a
/// wildcard for its subdomains (`*.crates.io`), without ports or paths.
pub fn is_allow_rule(rule: &str) -> bool {
    let bare = rule.strip_prefix("*.").unwrap_or(rule);
    !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The longest URL rule accepted (the proxy takes path patterns of up to 1024 bytes).
const MAX_URL_RULE: usize = 1280;

/// What is wrong with a URL rule of `[network] allow`, or `None`: `[METHOD ]http[s]://host
/// [:port]/pattern`, `**` any text and `*` any text without `/` in the pattern, which is a
/// decoded path without query, `.` or `..` segments. The proxy checks the same when it
/// starts; checking here names the file and line.
pub fn url_rule_problem(rule: &str) -> Option<String> {
    let usage = "write [METHOD ]https://host[:port]/pattern, where ** is any text and * any \
                 text without `/`: \"GET https://deb.debian.org/debian/pool/**\"";
    if rule.len() > MAX_URL_RULE {
        return Some(format!("it is over {MAX_URL_RULE} bytes; {usage}"));
    }
    let url = match rule.split_once(' ') {
        Some((method, url))
            if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) =>
        {
            url
        }
        Some((method, _)) => {
            return Some(format!("{method:?} is not an upper-case method; {usage}"))
        }
        None => rule,
    };
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Some(format!("the scheme must be http:// or https://; {usage}"));
    };
    let Some((authority, path)) = rest.find('/').map(|at| rest.split_at(at)) else {
        return Some(format!(
            "the path pattern is missing (end with /** for every path); {usage}"
        ));
    };
    let host = match authority.split_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => host,
        Some((_, port)) => return Some(format!("the port {port:?} is not 1 to 65535")),
        None => authority,
    };
    if !is_allow_rule(&host.to_ascii_lowercase()) {
        return Some(format!("{host:?} is not a host name or *.host; {usage}"));
    }
    if let Some(bad) = path
        .chars()
        .find(|&c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '\\' | '%'))
    {
        return Some(format!(
            "the path pattern contains {bad:?}; write the decoded path, without query, fragment, spaces or backslashes"
        ));
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Some("the path pattern has a `.` or `..` segment".into());
    }
    None
}

/// Parses and checks spec text; `path` is only used in messages and to find the project.
pub fn parse(path: &Path, text: &str) -> Result<BuildSpec, SpecError> {
    parse_with_images(path, text, &[])
}

/// [`parse`], also accepting the names of `imported` images.
pub fn parse_with_images(
    path: &Path,
    text: &str,
    imported: &[String],
) -> Result<BuildSpec, SpecError> {
    let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
        path: path.to_path_buf(),
        message: toml_problem(text, e.message(), e.span()),
    })?;
    let check = Checker { path, text };
    let (image, derived) = check.image(raw.build.image, raw.image, imported)?;
    let build = check.build(raw.build.script, raw.build.fetch, raw.build.artifacts)?;
    let timeout = match raw.build.timeout {
        None => Duration::from_secs(600),
        Some(t) => parse_duration(t.get_ref()).ok_or_else(|| {
            check.error(
                t.span(),
                "build.timeout",
                format!("{:?}", t.get_ref()),
                "not a duration; use a number with a unit: \"90s\", \"10m\", \"1h\"".into(),
            )
        })?,
    };
    let max_log_bytes = check.size(raw.build.max_log, "build.max_log", 64)?;
    let max_artifacts_bytes = check.size(raw.build.max_artifacts, "build.max_artifacts", 1024)?;
    let (cpus, memory_mib, disk_gib) = check.vm(raw.vm)?;
    let inspect = raw.network.inspect;
    let (allow, tunnel) = check.network(raw.network)?;
    let cache_paths = check.cache_paths(raw.cache.paths)?;
    let cache_max_bytes = check.size(raw.cache.max_size, "cache.max_size", 1024)?;
    Ok(BuildSpec {
        path: path.to_path_buf(),
        project_dir: project_dir_of(path),
        image,
        derived,
        script: build.script,
        fetch: build.fetch,
        env: raw.build.env,
        artifacts: build.artifacts,
        timeout,
        max_log_bytes,
        max_artifacts_bytes,
        cpus,
        memory_mib,
        disk_gib,
        allow,
        inspect,
        tunnel,
        cache_paths,
        cache_max_bytes,
        lock: None,
    })
}

/// The directory of the spec file `path` (`.` for a bare file name): the project, whose
/// records are in its store directory (`project::store_dir`). The spec need not be valid.
pub fn project_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `[build]`'s script, fetch and artifacts, checked.
struct BuildFields {
    script: String,
    fetch: Option<String>,
    artifacts: Vec<String>,
}

/// Checks the fields of one spec file, whose errors name the file, the line, the field and
/// what would be accepted.
struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn error(
        &self,
        span: std::ops::Range<usize>,
        field: &'static str,
        value: String,
        reason: String,
    ) -> SpecError {
        SpecError::Value {
            path: self.path.to_path_buf(),
            line: line_of(self.text, span.start),
            field,
            value,
            reason,
        }
    }

    /// A size field in bytes (`"64MiB"`), `default_mib` MiB when absent.
    fn size(
        &self,
        value: Option<Spanned<String>>,
        field: &'static str,
        default_mib: u64,
    ) -> Result<u64, SpecError> {
        match value {
            None => Ok(default_mib * MIB),
            Some(v) => match parse_size_mib(v.get_ref()) {
                Some(n) if n > 0 => Ok(n * MIB),
                _ => Err(self.error(
                    v.span(),
                    field,
                    format!("{:?}", v.get_ref()),
                    "use a size with a unit: \"64MiB\", \"1GiB\"".into(),
                )),
            },
        }
    }

    /// The image's name: `build.image` (built or imported), `[image]` (derived), or the
    /// default; with the derived image's definition.
    fn image(
        &self,
        named: Option<Spanned<String>>,
        table: Option<Spanned<RawImage>>,
        imported: &[String],
    ) -> Result<(String, Option<Derived>), SpecError> {
        match (named, table) {
            (Some(_), Some(table)) => Err(self.error(
                table.span(),
                "image",
                "an [image] table".into(),
                "give either build.image (a built or imported image) or [image] (base and packages), not both".into(),
            )),
            (None, Some(table)) => {
                let derived = self.derived(table.into_inner())?;
                let name = contractor_protocol::image::derived_image_name(
                    &derived.base,
                    &derived.packages,
                    derived.check_valid_until,
                );
                Ok((name, Some(derived)))
            }
            (None, None) => Ok((DEFAULT_IMAGE.to_string(), None)),
            (Some(image), None)
                if KNOWN_IMAGES.contains(&image.get_ref().as_str())
                    || imported.contains(image.get_ref()) =>
            {
                Ok((image.into_inner(), None))
            }
            (Some(image), None) => {
                let imported = if imported.is_empty() {
                    "none (`contractor image import` adds one)".to_string()
                } else {
                    imported.join(", ")
                };
                Err(self.error(
                    image.span(),
                    "build.image",
                    format!("{:?}", image.get_ref()),
                    format!(
                        "unknown image; Contractor builds {}; imported: {imported}",
                        KNOWN_IMAGES.join(", ")
                    ),
                ))
            }
        }
    }

    /// `[image]`: a known base and Debian package names (sorted, each once).
    fn derived(&self, table: RawImage) -> Result<Derived, SpecError> {
        use contractor_protocol::image::{is_package_name, DERIVED_BASES, MAX_DERIVED_PACKAGES};
        let base = table.base.get_ref();
        if !DERIVED_BASES.iter().any(|(b, _)| b == base) {
            let bases: Vec<&str> = DERIVED_BASES.iter().map(|(b, _)| *b).collect();
            return Err(self.error(
                table.base.span(),
                "image.base",
                format!("{base:?}"),
                format!("use one of {}", bases.join(", ")),
            ));
        }
        if table.packages.len() > MAX_DERIVED_PACKAGES {
            return Err(self.error(
                table.base.span(),
                "image.packages",
                format!("{} packages", table.packages.len()),
                format!("at most {MAX_DERIVED_PACKAGES}"),
            ));
        }
        let mut packages = Vec::new();
        for package in &table.packages {
            if !is_package_name(package.get_ref()) {
                return Err(self.error(
                    package.span(),
                    "image.packages",
                    format!("{:?}", package.get_ref()),
                    "use Debian package names: lower-case letters, digits, `+`, `-` and `.` (\"python3-pytest\")".into(),
                ));
            }
            packages.push(package.get_ref().clone());
        }
        packages.sort();
        packages.dedup();
        Ok(Derived {
            base: base.clone(),
            packages,
            check_valid_until: table.check_valid_until,
        })
    }

    /// `build.script` (not empty), `build.fetch` (not empty when given) and
    /// `build.artifacts` (relative, without `..`).
    fn build(
        &self,
        script: Spanned<String>,
        fetch: Option<Spanned<String>>,
        raw_artifacts: Vec<Spanned<String>>,
    ) -> Result<BuildFields, SpecError> {
        if script.get_ref().trim().is_empty() {
            return Err(self.error(
                script.span(),
                "build.script",
                "\"\"".into(),
                "the script is empty; give the shell commands that build the project".into(),
            ));
        }
        if let Some(fetch) = fetch.as_ref().filter(|f| f.get_ref().trim().is_empty()) {
            return Err(self.error(
                fetch.span(),
                "build.fetch",
                "\"\"".into(),
                "the fetch command is empty; give the commands that download what the build needs (\"cargo fetch --locked\"), or leave the field out".into(),
            ));
        }
        let mut artifacts = Vec::new();
        for artifact in raw_artifacts {
            let pattern = artifact.get_ref();
            if pattern.is_empty()
                || pattern.starts_with('/')
                || pattern.split('/').any(|p| p == "..")
            {
                return Err(self.error(
                    artifact.span(),
                    "build.artifacts",
                    format!("{pattern:?}"),
                    "artifacts are paths or globs relative to the source root, without `..` (e.g. \"hello\" or \"target/*.deb\")".into(),
                ));
            }
            artifacts.push(artifact.into_inner());
        }
        Ok(BuildFields {
            script: script.into_inner(),
            fetch: fetch.map(Spanned::into_inner),
            artifacts,
        })
    }

    /// `[vm]`: CPUs (1–64, default 2), memory in MiB (128 MiB–1 TiB, default 2 GiB), disk
    /// in GiB (whole, at least 1, default 8).
    fn vm(&self, vm: RawVm) -> Result<(u32, u64, u64), SpecError> {
        let cpus = match vm.cpus {
            None => DEFAULT_CPUS,
            Some(c) => match u32::try_from(*c.get_ref()) {
                Ok(n @ 1..=64) => n,
                _ => {
                    return Err(self.error(
                        c.span(),
                        "vm.cpus",
                        c.get_ref().to_string(),
                        "use a whole number from 1 to 64".into(),
                    ))
                }
            },
        };
        let memory_mib = match vm.memory {
            None => DEFAULT_MEMORY_MIB,
            Some(m) => match parse_size_mib(m.get_ref()) {
                Some(n) if (128..=1024 * 1024).contains(&n) => n,
                _ => {
                    return Err(self.error(
                        m.span(),
                        "vm.memory",
                        format!("{:?}", m.get_ref()),
                        "use a size from \"128MiB\" up, with a unit: \"512MiB\", \"2GiB\"".into(),
                    ))
                }
            },
        };
        let disk_gib = match vm.disk {
            None => 8,
            Some(d) => match parse_size_mib(d.get_ref()) {
                Some(n) if n >= 1024 && n % 1024 == 0 => n / 1024,
                _ => {
                    return Err(self.error(
                        d.span(),
                        "vm.disk",
                        format!("{:?}", d.get_ref()),
                        "use a whole number of GiB, at least 1: \"4GiB\", \"20GiB\"".into(),
                    ))
                }
            },
        };
        Ok((cpus, memory_mib, disk_gib))
    }

    /// `[network]`'s allow rules (host names, wildcards, URL rules) and tunnel rules.
    fn network(&self, network: RawNetwork) -> Result<(Vec<String>, Vec<String>), SpecError> {
        let mut allow = Vec::new();
        for host in network.allow {
            let rule = host.get_ref();
            if rule.contains("://") {
                let problem = url_rule_problem(rule).or_else(|| {
                    (rule.contains("https://") && !network.inspect).then(|| {
                        "an https:// URL rule needs `inspect = true` (the proxy reads the \
                         requests only when it inspects TLS); allow the host instead"
                            .to_string()
                    })
                });
                if let Some(problem) = problem {
                    return Err(self.error(
                        host.span(),
                        "network.allow",
                        format!("{rule:?}"),
                        problem,
                    ));
                }
                allow.push(rule.clone());
                continue;
            }
            if !is_allow_rule(rule) {
                return Err(self.error(
                    host.span(),
                    "network.allow",
                    format!("{rule:?}"),
                    "use a host name (\"deb.debian.org\"), a wildcard for its subdomains (\"*.crates.io\") or a URL rule (\"GET https://deb.debian.org/debian/pool/**\"); no ports, and not `*` alone".into(),
                ));
            }
            allow.push(rule.to_ascii_lowercase());
        }
        let mut tunnel = Vec::new();
        for host in network.tunnel {
            let rule = host.get_ref().to_ascii_lowercase();
            if !is_allow_rule(&rule) {
                return Err(self.error(
                    host.span(),
                    "network.tunnel",
                    format!("{rule:?}"),
                    "use a host name or wildcard of `allow` (\"*.crates.io\"), whose TLS is then tunnelled, not inspected".into(),
                ));
            }
            tunnel.push(rule);
        }
        Ok((allow, tunnel))
    }

    /// `cache.paths`, as absolute guest paths, each once.
    fn cache_paths(&self, entries: Vec<Spanned<String>>) -> Result<Vec<String>, SpecError> {
        let mut cache_paths = Vec::new();
        for entry in entries {
            let Some(guest) = cache_path(entry.get_ref()) else {
                return Err(self.error(
                    entry.span(),
                    "cache.paths",
                    format!("{:?}", entry.get_ref()),
                    "use a directory in the VM, absolute or under ~ (the script's HOME, /root), \
                     without `..` and not / itself: \"~/.cargo/registry\", \"/build/target\""
                        .into(),
                ));
            };
            if !cache_paths.contains(&guest) {
                cache_paths.push(guest);
            }
        }
        Ok(cache_paths)
    }
}

/// A `cache.paths` entry as an absolute guest path (`~` is the script's HOME, /root), or
/// None if it is not an acceptable directory.
fn cache_path(entry: &str) -> Option<String> {
    let path = match entry.strip_prefix('~') {
        Some("") => "/root".to_string(),
        Some(rest) if rest.starts_with('/') => format!("/root{rest}"),
        Some(_) => return None,
        None => entry.to_string(),
    };
    let path = path.trim_end_matches('/');
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.contains('\0')
        && path
            .split('/')
            .skip(1)
            .all(|part| !part.is_empty() && part != "." && part != "..");
    ok.then(|| path.to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The most characters of the offending line that [`toml_problem`] quotes.
const MAX_QUOTED_CHARS: usize = 80;

/// The most characters of the parser's message that [`toml_problem`] keeps (it repeats a
/// wrong value whole, and a spec may be 1 MiB).
const MAX_MESSAGE_CHARS: usize = 300;

/// A TOML parser's complaint about `text` as one line: `line L, column C, at `…`: MESSAGE`
/// (1-based, the column in characters, from `span`; the quote is the offending line as
/// written, at most [`MAX_QUOTED_CHARS`] characters around the column with `…` where it is
/// cut, which names the field when the message names only the value), or MESSAGE alone
/// without a span. MESSAGE is the parser's, its lines joined with `; `, at most
/// [`MAX_MESSAGE_CHARS`] characters. The parser's own rendering is several lines (the
/// file's line and a caret), which a front end that escapes control characters would print
/// as one line of `\n`s.
pub fn toml_problem(text: &str, message: &str, span: Option<std::ops::Range<usize>>) -> String {
    let joined = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let what = cut_chars(&joined, 0, MAX_MESSAGE_CHARS);
    let Some(span) = span else {
        return what;
    };
    let offset = (0..=span.start.min(text.len()))
        .rev()
        .find(|&at| text.is_char_boundary(at))
        .unwrap_or(0);
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let indent = line.chars().take_while(|c| c.is_whitespace()).count();
    let from = (column - 1)
        .saturating_sub(MAX_QUOTED_CHARS / 2)
        .saturating_sub(indent);
    let quoted = cut_chars(line.trim(), from, MAX_QUOTED_CHARS);
    let quoted = match quoted.as_str() {
        "" => String::new(),
        _ => format!(", at `{quoted}`"),
    };
    format!(
        "line {}, column {column}{quoted}: {what}",
        line_of(text, offset)
    )
}

/// At most `max` characters of `text` from character `from` on, with `…` before when
/// `from` cut some off and after when the end did.
fn cut_chars(text: &str, from: usize, max: usize) -> String {
    let mut chars = text.chars().skip(from);
    let kept: String = chars.by_ref().take(max).collect();
    let before = if from > 0 && !kept.is_empty() {
        "…"
    } else {
        ""
    };
    let after = if chars.next().is_some() { "…" } else { "" };
    format!("{before}{kept}{after}")
}

/// A spec's duration: contractor-protocol's duration syntax (`90s`, `10m`, `1h30m`), more
/// than zero.
pub fn parse_duration(text: &str) -> Option<Duration> {
    contractor_protocol::units::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}

/// A spec's size in MiB: contractor-protocol's size syntax with a unit (`512MiB`, `2GiB`,
/// also `M`, `G`, `MB`, `GB`, read as binary units), a whole number of MiB.
pub fn parse_size_mib(text: &str) -> Option<u64> {
    let has_unit = text.trim().ends_with(|c: char| c.is_ascii_alphabetic());
    let bytes = contractor_protocol::units::parse_size(text).ok()?;
    (has_unit && bytes % MIB == 0).then_some(bytes / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<BuildSpec, SpecError> {
        parse(Path::new("proj/contractor.toml"), text)
    }

    #[test]
    fn the_issue_example_parses_with_its_values() {
        let spec = parse_text(
            r#"
[build]
image = "debian-12-build"
script = """
make
make check
"""
artifacts = ["hello"]
timeout = "10m"

[vm]
cpus = 2
memory = "2GiB"

[network]
allow = []
"#,
        )
        .expect("valid spec");
        assert_eq!(spec.script, "make\nmake check\n");
        assert_eq!(spec.artifacts, ["hello"]);
        assert_eq!(spec.timeout, Duration::from_secs(600));
        assert_eq!((spec.cpus, spec.memory_mib), (2, 2048));
        assert_eq!(spec.project_dir, Path::new("proj"));
    }

    #[test]
    fn tls_is_inspected_unless_turned_off_and_tunnel_takes_allow_rules() {
        let spec = parse_text("[build]\nscript = \"true\"\n").expect("minimal spec");
        assert!(spec.inspect && spec.tunnel.is_empty());
        let spec = parse_text(
            "[build]\nscript = \"true\"\n[network]\nallow = [\"a.test\"]\ninspect = false\ntunnel = [\"A.test\"]\n",
        )
        .expect("spec");
        assert!(!spec.inspect);
        assert_eq!(spec.tunnel, ["a.test"]);
        let err = parse_text("[build]\nscript = \"true\"\n[network]\ntunnel = [\"https://x/\"]\n")
            .expect_err("not a host")
            .to_string();
        assert!(err.contains("network.tunnel"), "{err}");
    }

    #[test]
    fn url_rules_are_kept_as_written_and_bad_ones_named() {
        let spec = parse_text(
            "[build]\nscript = \"true\"\n[network]\nallow = [\"A.test\", \"GET https://Mirror.test/Debian/pool/**\"]\n",
        )
        .expect("spec");
        assert_eq!(
            spec.allow,
            ["a.test", "GET https://Mirror.test/Debian/pool/**"]
        );
        for (rule, problem, inspect) in [
            ("get https://a.test/**", "upper-case method", true),
            ("ftp://a.test/**", "http:// or https://", true),
            ("https://a.test", "path pattern is missing", true),
            ("https://a.test:0/**", "1 to 65535", true),
            ("https://a_b.test/**", "not a host name", true),
            ("https://a.test/x?y", "query", true),
            ("https://a.test/a/../b", "`..` segment", true),
            ("https://a.test/**", "needs `inspect = true`", false),
        ] {
            let text = format!(
                "[build]\nscript = \"true\"\n[network]\ninspect = {inspect}\nallow = [{rule:?}]\n"
            );
            let err = parse_text(&text).expect_err(rule).to_string();
            assert!(
                err.contains("network.allow") && err.contains(problem),
                "{rule}: {err}"
            );
            assert!(err.contains("contractor.toml:5:"), "{err}");
        }
        let plain = "[build]\nscript = \"true\"\n[network]\ninspect = false\nallow = [\"http://a.test/**\"]\n";
        assert!(
            parse_text(plain).is_ok(),
            "plain HTTP URL rules need no inspection"
        );
    }

    #[test]
    fn the_project_is_the_spec_files_directory() {
        assert_eq!(project_dir_of(Path::new("contractor.toml")), Path::new("."));
        assert_eq!(project_dir_of(Path::new("a/b/x.toml")), Path::new("a/b"));
        assert_eq!(
            project_dir_of(Path::new("/p/contractor.toml")),
            Path::new("/p")
        );
    }

    #[test]
    fn defaults_apply_only_to_absent_fields() {
        let spec = parse_text("[build]\nscript = \"true\"\n").expect("minimal spec");
        assert_eq!(spec.image, DEFAULT_IMAGE);
        assert_eq!((spec.cpus, spec.memory_mib, spec.disk_gib), (2, 2048, 8));
        // What `contractor hosts` counts room for when there is no contractor.toml.
        assert_eq!(
            (spec.cpus, spec.memory_mib),
            (DEFAULT_CPUS, DEFAULT_MEMORY_MIB)
        );
        assert_eq!(
            (spec.max_log_bytes, spec.max_artifacts_bytes),
            (64 << 20, 1 << 30)
        );
        assert!(spec.allow.is_empty() && spec.artifacts.is_empty());
        assert!(spec.cache_paths.is_empty());
        assert_eq!(spec.cache_max_bytes, 1 << 30);
    }

    #[test]
    fn imported_images_are_valid_image_names() {
        let text = "[build]\nscript = \"true\"\nimage = \"my-distro\"\n";
        assert!(parse_text(text).is_err());
        let spec = parse_with_images(Path::new("c.toml"), text, &["my-distro".into()])
            .expect("an imported image");
        assert_eq!(spec.image, "my-distro");
    }

    #[test]
    fn cache_paths_become_absolute_guest_directories() {
        let spec = parse_text(
            "[build]\nscript = \"true\"\n[cache]\n\
             paths = [\"~/.cargo/registry/\", \"/build/target\", \"~\", \"~/.cargo/registry\"]\n\
             max_size = \"256MiB\"\n",
        )
        .expect("spec");
        assert_eq!(
            spec.cache_paths,
            ["/root/.cargo/registry", "/build/target", "/root"],
            "~ expanded, trailing slash dropped, duplicates once"
        );
        assert_eq!(spec.cache_max_bytes, 256 << 20);
        for bad in ["/", "relative", "~user/x", "/a/../b", "/a//b", "/a/./b", ""] {
            assert_eq!(cache_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_fields_name_the_field_and_the_file() {
        let err = parse_text("[build]\nscript = \"true\"\nartefacts = []\n").expect_err("typo");
        let text = err.to_string();
        assert!(text.starts_with("proj/contractor.toml: "), "{text}");
        assert!(
            text.contains("artefacts") && text.contains("line 3"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_name_line_field_and_what_is_accepted() {
        let cases = [
            (
                "[build]\nscript = \"true\"\ntimeout = \"ten minutes\"\n",
                3,
                "build.timeout",
                "\"10m\"",
            ),
            (
                "[build]\nscript = \"true\"\n[vm]\nmemory = \"2XB\"\n",
                4,
                "vm.memory",
                "\"2GiB\"",
            ),
            (
                "[build]\nscript = \"true\"\n[vm]\ncpus = 0\n",
                4,
                "vm.cpus",
                "1 to 64",
            ),
            (
                "[build]\nscript = \"true\"\nartifacts = [\"../x\"]\n",
                3,
                "build.artifacts",
                "relative",
            ),
            (
                "[build]\nscript = \"true\"\n[network]\nallow = [\"*\"]\n",
                4,
                "network.allow",
                "wildcard",
            ),
            (
                "[build]\nscript = \"true\"\nimage = \"windows\"\n",
                3,
                "build.image",
                "debian-12-build",
            ),
            (
                "[build]\nscript = \"true\"\n[cache]\npaths = [\"~/ok\", \"../x\"]\n",
                4,
                "cache.paths",
                "~/.cargo/registry",
            ),
            (
                "[build]\nscript = \"true\"\n[cache]\nmax_size = \"big\"\n",
                4,
                "cache.max_size",
                "\"1GiB\"",
            ),
            (
                "[build]\nscript = \"true\"\nmax_log = \"lots\"\n",
                3,
                "build.max_log",
                "\"64MiB\"",
            ),
            (
                "[build]\nscript = \"true\"\nfetch = \" \"\n",
                3,
                "build.fetch",
                "cargo fetch --locked",
            ),
        ];
        for (text, line, field, hint) in cases {
            let err = parse_text(text).expect_err(field);
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("proj/contractor.toml:{line}: `{field}`")),
                "{message}"
            );
            assert!(message.contains(hint), "{message}");
        }
    }

    #[test]
    fn check_valid_until_is_on_unless_turned_off_and_names_another_image() {
        let on = parse_text("[image]\nbase = \"debian-unstable\"\n[build]\nscript = \"true\"\n")
            .expect("default");
        assert!(on.derived.as_ref().expect("derived").check_valid_until);
        let off = parse_text(
            "[image]\nbase = \"debian-unstable\"\ncheck_valid_until = false\n[build]\nscript = \"true\"\n",
        )
        .expect("off");
        assert!(!off.derived.as_ref().expect("derived").check_valid_until);
        assert_ne!(on.image, off.image, "an unchecked image is never shared");
        let err = parse_text(
            "[image]\nbase = \"debian-unstable\"\ncheck_valid_until = \"no\"\n[build]\nscript = \"true\"\n",
        )
        .expect_err("not a boolean")
        .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("check_valid_until"), "{err}");
        assert!(err.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn an_image_table_derives_an_image_named_by_its_definition() {
        let text = "[image]\nbase = \"debian-12\"\npackages = [\"python3-pytest\", \"nodejs\", \"nodejs\"]\n[build]\nscript = \"pytest\"\n";
        let spec = parse_text(text).expect("a derived image");
        let derived = spec.derived.expect("derived");
        assert_eq!(derived.base, "debian-12");
        assert_eq!(derived.packages, ["nodejs", "python3-pytest"]);
        assert_eq!(
            spec.image,
            contractor_protocol::image::derived_name("debian-12", &derived.packages)
        );
        let inline = "image = { base = \"debian-unstable\" }\n[build]\nscript = \"true\"\n";
        assert!(parse_text(inline)
            .expect("inline")
            .image
            .starts_with("debian-unstable-"));

        for (text, field, hint) in [
            ("[image]\nbase = \"ubuntu\"\n[build]\nscript = \"true\"\n", "image.base", "debian-12, debian-13, debian-unstable"),
            ("[image]\nbase = \"debian-12\"\npackages = [\"ok\", \"Bad Name\"]\n[build]\nscript = \"true\"\n", "image.packages", "Debian package names"),
            ("[image]\nbase = \"debian-12\"\n[build]\nscript = \"true\"\nimage = \"debian-13-build\"\n", "image", "not both"),
        ] {
            let message = parse_text(text).expect_err(field).to_string();
            assert!(message.contains(&format!("`{field}`")), "{message}");
            assert!(message.contains(hint), "{message}");
        }
    }

    #[test]
    fn toml_errors_are_one_line_naming_file_line_column_and_field() {
        for (text, expected) in [
            (
                "[build]\nscript = \"x\"\nfoo = 1\n".to_string(),
                "proj/contractor.toml: line 3, column 1, at `foo = 1`: unknown field `foo`, \
                 expected one of `image`, `script`, `fetch`, `env`, `artifacts`, `timeout`, \
                 `max_log`, `max_artifacts`"
                    .to_string(),
            ),
            (
                "[build]\nscript = \"x\"\n[vm]\ncpus = \"two\"\n".to_string(),
                "proj/contractor.toml: line 4, column 8, at `cpus = \"two\"`: invalid type: \
                 string \"two\", expected i64"
                    .to_string(),
            ),
            (
                "[build]\nscript = x\n".to_string(),
                "proj/contractor.toml: line 2, column 10, at `script = x`: invalid string; \
                 expected `\"`, `'`"
                    .to_string(),
            ),
            (
                "[build]\n  script = \"é\" \"y\"\n".to_string(),
                "proj/contractor.toml: line 2, column 16, at `script = \"é\" \"y\"`: expected \
                 newline, `#`"
                    .to_string(),
            ),
            (
                format!(
                    "[build]\nscript = \"x\"\n[vm]\ncpus = \"{}\"\n",
                    "é".repeat(100)
                ),
                format!(
                    "proj/contractor.toml: line 4, column 8, at `cpus = \"{}…`: invalid type: \
                     string \"{}\", expected i64",
                    "é".repeat(72),
                    "é".repeat(100)
                ),
            ),
        ] {
            let err = parse_text(&text).expect_err(&text);
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn a_toml_error_far_into_a_long_line_is_quoted_around_its_column_and_its_message_is_cut() {
        // The error is at column 113 of a 114-character line: the quote starts 40
        // characters before it, with `…` for what it leaves out.
        let long = "a".repeat(100);
        let text = format!("[build]\nscript = \"{long}\" x\n");
        let err = parse_text(&text).expect_err("a value after the string");
        let line = format!("script = \"{long}\" x");
        let expected_quote = format!("…{}", &line[72..]);
        assert_eq!(
            err.to_string(),
            format!(
                "proj/contractor.toml: line 2, column 113, at `{expected_quote}`: expected \
                 newline, `#`"
            )
        );
        // A wrong value of 1,000 characters: the message keeps 300 and says it was cut.
        let value = "v".repeat(1000);
        let text = format!("[build]\nscript = \"x\"\n[vm]\ncpus = \"{value}\"\n");
        let message = parse_text(&text)
            .expect_err("a string for cpus")
            .to_string();
        let what = message.split_once("`: ").expect("a quote").1;
        assert_eq!(what.chars().count(), MAX_MESSAGE_CHARS + 1, "{what}");
        assert!(what.ends_with('…'), "{what}");
    }

    #[test]
    fn an_unreadable_spec_says_why_once_in_its_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_with_images(&dir.path().join("contractor.toml"), &[]).expect_err("missing");
        let chain = contractor_protocol::result::error_chain(&err).join(": ");
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "{chain}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let err =
            load_with_images(Path::new("/nonexistent/contractor.toml"), &[]).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/contractor.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_spec_behind_a_link_or_too_big_is_refused_naming_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "[build]\nscript = \"true\"\n").expect("write");
        let link = dir.path().join("contractor.toml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = load_with_images(&link, &[]).expect_err("a link");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_file(&link).expect("unlink");
        let mut big = b"[build]\nscript = \"true\"\n".to_vec();
        big.resize(MAX_SPEC_BYTES as usize + 1, b'#');
        std::fs::write(&link, &big).expect("write");
        let err = load_with_images(&link, &[]).expect_err("too big");
        assert!(
            err.to_string().contains("bigger than 1048576 bytes"),
            "{err}"
        );
        std::fs::write(&link, "[build]\nscript = \"true\"\n").expect("write");
        let spec = load_with_images(&link, &[]).expect("a regular file loads");
        assert_eq!(spec.script, "true");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_size_mib("512MiB"), Some(512));
        assert_eq!(parse_size_mib("2GiB"), Some(2048));
        assert_eq!(parse_size_mib("2"), None);
        assert_eq!(parse_size_mib("GiB"), None);
    }
}
