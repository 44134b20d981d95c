//! `contractor rebuild [ID]`: build a recorded build's own source again, offline, and
//! compare the artifacts bit for bit.
//!
//! What goes in is taken from the record, never from the working tree: the source is the
//! record's `source.tar`, the downloads are pinned to the URLs and SHA-256 its signed
//! statement lists (the proxy serves them from the download cache and refuses everything
//! else), and the image must be the one whose disk digest the statement names. The spec
//! (`contractor.toml`) must say what the statement's `externalParameters` say. The rebuild
//! itself is an ordinary build (`build::build`, with the packed source, `offline`, and the
//! pins as its lock), with its own record and signed statement, which names the build it
//! rebuilt (`internalParameters.rebuildOf`) and holds `rebuild.json`, the comparison.
//!
//! Artifacts are compared by the SHA-256 of the files in the two records' `artifacts/`,
//! hashed on the host; their contents are never parsed here (they are the project's).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::image::Manifest;
use crate::lock::{self, Lock};
use crate::provenance;
use crate::spec::BuildSpec;

/// The file in a rebuild's record that says which build it rebuilt and how the artifacts
/// compare.
pub const REBUILD_FILE: &str = "rebuild.json";

/// Why a record cannot be rebuilt as it is (bad input).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The record has no readable `provenance.json`.
    #[error("cannot read {path}: a rebuild needs the record's signed statement (a build that ran its script has one)")]
    NoStatement {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record has no `source.tar`.
    #[error("cannot read {path}: a rebuild builds the record's own packed source")]
    NoSource {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `provenance.json` is not an envelope with an in-toto statement of ours.
    #[error("{path}: {problem}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        problem: String,
    },
    /// The spec says something else than the statement's `externalParameters`.
    #[error("{file} is not what build {id} was built with: {} differ ({}); restore it (e.g. `git checkout` the commit of that build) to rebuild", fields.len(), fields.join(", "))]
    SpecChanged {
        /// The spec file.
        file: PathBuf,
        /// The build.
        id: String,
        /// The fields that differ (`externalParameters.<name>`, `vm.<name>`).
        fields: Vec<String>,
    },
    /// The recorded image is gone or has other bytes (`--any-image` goes on).
    #[error("{0}; `contractor rebuild --any-image` rebuilds with the current image (and says which inputs differ)")]
    ImageChanged(String),
}

/// Reads the statement of the envelope at `path` (its signature is not checked here:
/// `contractor verify` does that) with the one reader of statements
/// (`contractor_protocol::attest`).
pub fn read_statement(path: &Path) -> Result<Value, RebuildError> {
    use contractor_protocol::attest::StatementError;
    contractor_protocol::attest::read_statement(path).map_err(|e| match e {
        StatementError::Read { path, source } => RebuildError::NoStatement { path, source },
        StatementError::Format { path, problem } => RebuildError::Format { path, problem },
    })
}

fn dependencies(statement: &Value) -> impl Iterator<Item = &Value> {
    statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .into_iter()
        .flatten()
}

/// The pins of a rebuild: every download the statement lists that the proxy can serve
/// again (a complete `GET` answered 200 with a SHA-256), the last of each URL, sorted by
/// URL, at most [`MAX_PINS`] — the rule of `contractor pin`, applied to the statement.
pub fn pins(statement: &Value) -> Lock {
    lock::lock_of(dependencies(statement).filter_map(|dep| {
        let notes = &dep["annotations"];
        if notes["kind"] != "download" {
            return None;
        }
        Some(lock::Fetched {
            url: dep["uri"].as_str()?,
            sha256: dep["digest"]["sha256"].as_str()?,
            size: notes["size"].as_u64().unwrap_or(0),
            complete_get_200: lock::Fetched::complete_get_200(
                &notes["method"],
                &notes["status"],
                &notes["complete"],
            ),
        })
    }))
}

/// Whether the statement says its list of downloads is not complete, and why.
pub fn incomplete_downloads(statement: &Value) -> Vec<String> {
    let downloads = &statement["predicate"]["buildDefinition"]["internalParameters"]["downloads"];
    if downloads["complete"] == false {
        downloads["incompleteBecause"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect()
    } else {
        Vec::new()
    }
}

/// Why the rebuild may lack an input of the original: the build cache. A rebuild never
/// restores one (it starts from the source alone); when the original restored one (its
/// statement's `internalParameters.buildCache.restored`, or, for a statement that does not
/// say, when the spec keeps a cache), what it took from there — downloads it then skipped —
/// is in neither its record nor its statement, and is refused offline.
pub fn cache_warning(statement: &Value, spec: &BuildSpec) -> Option<String> {
    let cache = &statement["predicate"]["buildDefinition"]["internalParameters"]["buildCache"];
    let says = match cache["restored"].as_bool() {
        Some(false) => return None,
        Some(true) => "restored the build cache of an earlier build",
        None if spec.cache_paths.is_empty() => return None,
        None => {
            "may have restored the build cache of an earlier build (its statement does not say)"
        }
    };
    Some(format!(
        "the original {says} ([cache] paths); a rebuild runs without it, so what the original took from there (downloads it skipped) is not in its record, and is refused offline"
    ))
}

/// The image the statement names: its name and the SHA-256 of its disk, when known.
pub fn recorded_image(statement: &Value) -> Option<(String, Option<String>)> {
    let dep = dependencies(statement).find(|d| d["name"] == "image")?;
    let name = dep["uri"].as_str()?.strip_prefix("contractor-image:")?;
    let sha256 = dep["digest"]["sha256"].as_str().map(String::from);
    Some((name.to_string(), sha256))
}

/// The digest of the dependency `name` (`image`, `guest-agent`) in the statement.
fn digest_of(statement: &Value, name: &str) -> Option<String> {
    dependencies(statement)
        .find(|d| d["name"] == name)
        .and_then(|d| d["digest"]["sha256"].as_str().map(String::from))
}

/// The fields in which `spec` says something else than the statement: its
/// `externalParameters` (but `lockedDownloads`: a rebuild pins what the record lists) and
/// the VM's shape.
pub fn spec_differences(statement: &Value, spec: &BuildSpec) -> Vec<String> {
    let definition = &statement["predicate"]["buildDefinition"];
    let recorded = &definition["externalParameters"];
    let current = provenance::external_parameters(spec);
    let mut fields = Vec::new();
    if let Some(map) = current.as_object() {
        for (key, value) in map {
            if key != "lockedDownloads" && &recorded[key] != value {
                fields.push(format!("externalParameters.{key}"));
            }
        }
    }
    let vm = &definition["internalParameters"]["vm"];
    let shape = [
        ("cpus", json!(spec.cpus)),
        ("memoryMib", json!(spec.memory_mib)),
        ("diskGib", json!(spec.disk_gib)),
    ];
    for (key, value) in shape {
        if vm[key] != value {
            fields.push(format!("vm.{key}"));
        }
    }
    fields
}

/// How the image on this host differs from the one the statement names; empty when it
/// is the same (or the statement does not know the image's digest: a `--host` build's).
pub fn image_differences(statement: &Value, current: Option<&Manifest>) -> Vec<String> {
    let Some((name, Some(recorded))) = recorded_image(statement) else {
        return Vec::new();
    };
    match current {
        None => vec![format!(
            "the image {name} that build was made with (disk sha256 {recorded}) is gone from this host"
        )],
        Some(manifest) if manifest.disk_sha256 != recorded => vec![format!(
            "the image {name} has changed since: its disk's sha256 was {recorded}, it is {} now (built {})",
            manifest.disk_sha256,
            crate::image::format_time(manifest.created)
        )],
        Some(_) => Vec::new(),
    }
}

/// The inputs of the rebuild (its statement) that differ from the original's: the image
/// and the guest agent, by digest.
pub fn input_differences(original: &Value, rebuild: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for name in ["image", "guest-agent"] {
        let (before, after) = (digest_of(original, name), digest_of(rebuild, name));
        if before != after {
            found.push(format!(
                "{name}: sha256 {} in the original, {} in the rebuild",
                before.as_deref().unwrap_or("unknown"),
                after.as_deref().unwrap_or("unknown")
            ));
        }
    }
    found
}

/// How one artifact compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The same bytes on both sides.
    Identical,
    /// Other bytes.
    Different,
    /// In the original, not in the rebuild.
    MissingInRebuild,
    /// In the rebuild, not in the original.
    MissingInOriginal,
}

/// One artifact of either build, compared.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Compared {
    /// Its path beneath `artifacts/`.
    pub path: String,
    /// How it compares.
    pub verdict: Verdict,
    /// Its SHA-256 in the original, if there.
    pub original: Option<String>,
    /// Its SHA-256 in the rebuild, if there.
    pub rebuild: Option<String>,
}

/// Compares two records' artifacts (path → SHA-256), by path, sorted. The build cache's
/// upload is not an artifact.
pub fn compare(
    original: &BTreeMap<String, String>,
    rebuild: &BTreeMap<String, String>,
) -> Vec<Compared> {
    let paths: BTreeSet<&String> = original
        .keys()
        .chain(rebuild.keys())
        .filter(|p| p.as_str() != crate::cache::UPLOAD_NAME)
        .collect();
    paths
        .into_iter()
        .map(|path| {
            let (a, b) = (original.get(path), rebuild.get(path));
            let verdict = match (a, b) {
                (Some(a), Some(b)) if a == b => Verdict::Identical,
                (Some(_), Some(_)) => Verdict::Different,
                (Some(_), None) => Verdict::MissingInRebuild,
                _ => Verdict::MissingInOriginal,
            };
            Compared {
                path: path.clone(),
                verdict,
                original: a.cloned(),
                rebuild: b.cloned(),
            }
        })
        .collect()
}

/// Whether every artifact is identical (true for none).
pub fn all_identical(rows: &[Compared]) -> bool {
    rows.iter().all(|r| r.verdict == Verdict::Identical)
}

/// The report, one line per artifact (names escaped for a terminal).
pub fn report_lines(rows: &[Compared]) -> Vec<String> {
    let none = String::new();
    rows.iter()
        .map(|r| {
            let path = crate::display::escape(&r.path);
            let a = r.original.as_ref().unwrap_or(&none);
            let b = r.rebuild.as_ref().unwrap_or(&none);
            match r.verdict {
                Verdict::Identical => format!("identical  {path}  sha256 {a}"),
                Verdict::Different => {
                    format!("DIFFERENT  {path}  original sha256 {a}, rebuild sha256 {b}")
                }
                Verdict::MissingInRebuild => {
                    format!("MISSING    {path}  not in the rebuild (original sha256 {a})")
                }
                Verdict::MissingInOriginal => {
                    format!("MISSING    {path}  not in the original (rebuild sha256 {b})")
                }
            }
        })
        .collect()
}

/// `rebuild.json` of a rebuild's record.
pub fn record_json(original_id: &str, rows: &[Compared], inputs_differ: &[String]) -> Value {
    json!({
        "version": 1,
        "rebuildOf": original_id,
        "identical": all_identical(rows),
        "inputsDiffer": inputs_differ,
        "artifacts": rows,
    })
}

/// Copies the record's `source.tar` to `to` (a new file, on the file system of the
/// record to come, so that the build can move it there).
pub fn copy_source(record: &Path, to: &Path) -> Result<(), RebuildError> {
    let from = record.join("source.tar");
    let no_source = |source| RebuildError::NoSource {
        path: from.clone(),
        source,
    };
    let mut input = contractor_protocol::file::open_regular(&from).map_err(no_source)?;
    let copied = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .and_then(|mut output| std::io::copy(&mut input, &mut output));
    copied.map(|_| ()).map_err(|source| {
        let _ = std::fs::remove_file(to);
        RebuildError::NoSource {
            path: to.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::{PREDICATE_TYPE, STATEMENT_TYPE};

    const A: &str = "3bd1574e617a9a6c1f8f8181bd7e841e1f20e4277607ef28945765188d6284d4";
    const B: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn download(url: &str, sha: &str, method: &str, status: u16, complete: bool) -> Value {
        json!({"uri": url, "digest": {"sha256": sha}, "annotations": {
            "kind": "download", "method": method, "status": status, "size": 3, "complete": complete}})
    }

    fn statement(deps: Vec<Value>) -> Value {
        json!({"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE,
            "predicate": {"buildDefinition": {"resolvedDependencies": deps}}})
    }

    #[test]
    fn pins_are_the_servable_downloads_of_the_statement_last_of_each_url() {
        let st = statement(vec![
            json!({"name": "source", "uri": "source.tar", "digest": {"sha256": A}}),
            json!({"name": "image", "uri": "contractor-image:debian-12-build", "digest": {"sha256": A}}),
            download("https://z.test/last", A, "GET", 200, true),
            download("https://a.test/first", A, "GET", 200, true),
            download("https://a.test/first", B, "GET", 200, true),
            download("https://a.test/head", A, "HEAD", 200, true),
            download("https://a.test/missing", A, "GET", 404, true),
            download("https://a.test/cut", A, "GET", 200, false),
            download("https://a.test/bad", "ABC", "GET", 200, true),
        ]);
        let lock = pins(&st);
        let pinned: Vec<(&str, &str)> = lock
            .downloads
            .iter()
            .map(|p| (p.url.as_str(), p.sha256.as_str()))
            .collect();
        assert_eq!(
            pinned,
            [("https://a.test/first", B), ("https://z.test/last", A)]
        );
        assert_eq!(
            crate::lock::pins_json(&lock),
            format!(r#"{{"https://a.test/first":"{B}","https://z.test/last":"{A}"}}"#)
        );
        assert!(pins(&statement(vec![])).downloads.is_empty());
    }

    #[test]
    fn the_statement_is_read_from_a_record_that_verify_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = dir.path().join("project");
        let record = project.join(".contractor/builds/b1");
        contractor_attest::fixture::write_fixture(&record, &project).expect("fixture");
        let spec = crate::spec::parse(
            &project.join("contractor.toml"),
            contractor_attest::fixture::FIXTURE_SPEC,
        )
        .expect("spec");
        let manifest = Manifest {
            version: 1,
            name: "debian-12-build".into(),
            suite: "bookworm".into(),
            created: 1,
            disk_sha256: "d".repeat(64),
            agent_version: "0.1.0".into(),
            agent_sha256: "a".repeat(64),
            cmdline: String::new(),
            base: None,
            packages: vec![],
            check_valid_until: None,
            source: None,
        };
        let facts = provenance::Facts {
            id: "b1",
            spec: &spec,
            accel: contractor_protocol::vm::Accel::Auto,
            boot: "cold".into(),
            offline: false,
            image: Some(&manifest),
            host: None,
            started_on: std::time::SystemTime::UNIX_EPOCH,
            finished_on: std::time::SystemTime::UNIX_EPOCH,
            outcome: contractor_protocol::result::Outcome::Success,
            exit_code: Some(0),
            rebuild_of: None,
            cache_restored: Some(false),
        };
        let request = provenance::sign_request(&record, &facts, &dir.path().join("key"), false);
        let st = contractor_attest::statement::statement(&request).expect("statement");
        let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
        let file = record.join(provenance::PROVENANCE_FILE);
        std::fs::write(
            &file,
            contractor_attest::dsse::envelope(&st, &key).to_string(),
        )
        .expect("write");
        let read = read_statement(&file).expect("read");
        assert_eq!(read, st);
        // The fixture's two downloads, both complete GETs answered 200.
        assert_eq!(pins(&read).downloads.len(), 2);
        assert!(spec_differences(&read, &spec).is_empty());
        assert!(image_differences(&read, Some(&manifest)).is_empty());

        // The spec changed: its script and the VM's shape are named.
        let changed = contractor_attest::fixture::FIXTURE_SPEC
            .replace("script = \"make\"", "script = \"make all\"")
            + "\n[vm]\ncpus = 1\n";
        let changed = crate::spec::parse(&project.join("contractor.toml"), &changed).expect("spec");
        assert_eq!(
            spec_differences(&read, &changed),
            ["externalParameters.script", "vm.cpus"]
        );
        // The image was rebuilt, or removed.
        let mut other = manifest.clone();
        other.disk_sha256 = "e".repeat(64);
        let said = image_differences(&read, Some(&other)).join("\n");
        assert!(said.contains(&format!("was {}", "d".repeat(64))), "{said}");
        assert!(
            said.contains(&format!("it is {} now", "e".repeat(64))),
            "{said}"
        );
        let said = image_differences(&read, None).join("\n");
        assert!(said.contains("is gone from this host"), "{said}");

        // Not an envelope, not ours: bad input naming the file.
        std::fs::write(
            &file,
            format!(
                "{{\"payloadType\": \"{}\", \"payload\": \"!!\"}}",
                contractor_protocol::attest::PAYLOAD_TYPE
            ),
        )
        .expect("write");
        let err = read_statement(&file).expect_err("not base64").to_string();
        assert!(
            err.contains("provenance.json") && err.contains("not base64"),
            "{err}"
        );
        let err = read_statement(&record.join("nothing.json"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("needs the record's signed statement"), "{err}");
    }

    #[test]
    fn artifacts_compare_by_path_and_sha256_and_only_all_identical_passes() {
        let map = |items: &[(&str, &str)]| -> BTreeMap<String, String> {
            items
                .iter()
                .map(|(p, s)| (p.to_string(), s.to_string()))
                .collect()
        };
        let original = map(&[
            ("hello", A),
            ("stamp", A),
            ("gone", A),
            (crate::cache::UPLOAD_NAME, A),
        ]);
        let rebuild = map(&[("hello", A), ("stamp", B), ("new", B)]);
        let rows = compare(&original, &rebuild);
        let verdicts: Vec<(&str, Verdict)> =
            rows.iter().map(|r| (r.path.as_str(), r.verdict)).collect();
        assert_eq!(
            verdicts,
            [
                ("gone", Verdict::MissingInRebuild),
                ("hello", Verdict::Identical),
                ("new", Verdict::MissingInOriginal),
                ("stamp", Verdict::Different),
            ]
        );
        assert!(!all_identical(&rows));
        let lines = report_lines(&rows);
        assert_eq!(lines[1], format!("identical  hello  sha256 {A}"));
        assert_eq!(
            lines[3],
            format!("DIFFERENT  stamp  original sha256 {A}, rebuild sha256 {B}")
        );
        assert!(lines[0].contains("not in the rebuild") && lines[0].contains(A));
        assert!(lines[2].contains("not in the original") && lines[2].contains(B));

        let same = compare(&map(&[("hello", A)]), &map(&[("hello", A)]));
        assert!(all_identical(&same));
        let json = record_json("b1", &same, &[]);
        assert_eq!(json["rebuildOf"], "b1");
        assert_eq!(json["identical"], true);
        assert_eq!(json["artifacts"][0]["verdict"], "identical");

        // A name the project chose is escaped before it reaches a terminal.
        let odd = compare(&map(&[("a\u{1b}[2J", A)]), &map(&[]));
        assert!(!report_lines(&odd)[0].contains('\u{1b}'));
    }

    #[test]
    fn a_restored_build_cache_is_an_input_the_rebuild_warns_of() {
        let spec =
            |text: &str| crate::spec::parse(Path::new("p/contractor.toml"), text).expect("spec");
        let cached = spec("[build]\nscript = \"make\"\n[cache]\npaths = [\"/build/x\"]\n");
        let plain = spec("[build]\nscript = \"make\"\n");
        let with = |restored: Value| {
            json!({"predicate": {"buildDefinition": {"internalParameters": {
                "buildCache": {"paths": ["/build/x"], "restored": restored}}}}})
        };
        assert!(cache_warning(&with(json!(false)), &cached).is_none());
        let said = cache_warning(&with(json!(true)), &plain).expect("restored");
        assert!(said.contains("restored the build cache"), "{said}");
        // A statement that does not say: the spec decides whether to warn.
        let silent = statement(vec![]);
        assert!(cache_warning(&silent, &plain).is_none());
        let said = cache_warning(&silent, &cached).expect("may have");
        assert!(said.contains("may have restored"), "{said}");
    }

    #[test]
    fn the_images_and_agents_digests_are_the_inputs_compared() {
        let image = |sha: &str| json!({"name": "image", "uri": "contractor-image:debian-12-build", "digest": {"sha256": sha}});
        let agent = |sha: &str| json!({"name": "guest-agent", "uri": "contractor-agent:0.1.0", "digest": {"sha256": sha}});
        let one = statement(vec![image(A), agent(A)]);
        assert!(input_differences(&one, &one).is_empty());
        let other = statement(vec![image(B), agent(A)]);
        let found = input_differences(&one, &other);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("image: sha256 ") && found[0].contains(B));
        assert_eq!(
            recorded_image(&one),
            Some(("debian-12-build".to_string(), Some(A.to_string())))
        );
    }
}
