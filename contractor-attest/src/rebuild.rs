//! `plan` and `compare`: what a rebuild (`contractor rebuild`) takes from a record's signed
//! statement, and how the rebuild's artifacts and inputs compare with the original's.
//!
//! The invariant: a record's statement and artifacts are read here, in the confined tool,
//! and the front end only gets typed facts back (the downloads to pin, the warnings to
//! say, each artifact's verdict) or the refusal to rebuild (the spec's fields that differ,
//! the image that does), which it says as it is. The statement's signature is not checked by `plan`:
//! `verify` does that. Artifacts are compared by the SHA-256 of the files in the two
//! records' `artifacts/`; their contents are never parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use contractor_protocol::attest::{
    read_statement, Compared, PlanRequest, RebuildPlan, StatedDownload, StatementError, Verdict,
    PROVENANCE_FILE,
};
use contractor_protocol::file::read_regular_if_exists;
use contractor_protocol::image::Manifest;
use contractor_protocol::result::{BuildResult, Outcome};
use contractor_protocol::service::Confinement;
use contractor_protocol::store::CACHE_UPLOAD_NAME;
use contractor_protocol::PROTOCOL_VERSION;
use serde_json::{json, Value};

use crate::AttestError;

/// Reads the statement of `request.record` and weighs the spec and images given against
/// it: what a rebuild takes from it, and what to warn of. A spec that says something else
/// is refused, and so is another image unless `request.any_image`.
pub fn plan(request: &PlanRequest, confinement: Confinement) -> Result<RebuildPlan, AttestError> {
    let path = request.record.join(PROVENANCE_FILE);
    let statement = read_statement(&path).map_err(|e| match e {
        StatementError::Read { path, source } => AttestError::NoStatement { path, source },
        other => AttestError::Statement(other),
    })?;
    let id = request
        .record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fields = spec_differences(&statement, request);
    if !fields.is_empty() {
        return Err(AttestError::SpecChanged {
            file: request.spec.clone(),
            id,
            fields,
        });
    }
    let recorded = recorded_image(&statement);
    let current = recorded
        .as_ref()
        .and_then(|(name, _)| request.images.iter().find(|m| &m.name == name));
    let image_differences = image_differences(&statement, current);
    if !image_differences.is_empty() && !request.any_image {
        return Err(AttestError::ImageChanged(image_differences.join("; ")));
    }
    let incomplete_downloads = incomplete_downloads(&statement);
    let cache_warning = cache_warning(&statement, !request.cache_paths.is_empty());
    let warnings = incomplete_downloads
        .iter()
        .map(|reason| format!("build {id} did not record every download ({reason}): what it did not record cannot be served offline"))
        .chain(cache_warning.clone())
        .collect();
    Ok(RebuildPlan {
        version: PROTOCOL_VERSION,
        downloads: stated_downloads(&statement),
        image_differences,
        incomplete_downloads,
        cache_warning,
        warnings,
        confinement,
    })
}

fn dependencies(statement: &Value) -> impl Iterator<Item = &Value> {
    statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .into_iter()
        .flatten()
}

/// The downloads the statement lists, with whether each was a complete `GET` answered 200.
pub fn stated_downloads(statement: &Value) -> Vec<StatedDownload> {
    dependencies(statement)
        .filter(|dep| dep["annotations"]["kind"] == "download")
        .filter_map(|dep| {
            let notes = &dep["annotations"];
            Some(StatedDownload {
                url: dep["uri"].as_str()?.to_string(),
                sha256: dep["digest"]["sha256"].as_str()?.to_string(),
                size: notes["size"].as_u64().unwrap_or(0),
                complete_get_200: notes["method"] == "GET"
                    && notes["status"] == 200
                    && notes["complete"] == true,
            })
        })
        .collect()
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
pub fn cache_warning(statement: &Value, spec_keeps_cache: bool) -> Option<String> {
    let cache = &statement["predicate"]["buildDefinition"]["internalParameters"]["buildCache"];
    let says = match cache["restored"].as_bool() {
        Some(false) => return None,
        Some(true) => "restored the build cache of an earlier build",
        None if !spec_keeps_cache => return None,
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

/// The fields in which the spec now says something else than the statement: its
/// `externalParameters` (but `lockedDownloads`: a rebuild pins what the record lists) and
/// the VM's shape.
pub fn spec_differences(statement: &Value, now: &PlanRequest) -> Vec<String> {
    let definition = &statement["predicate"]["buildDefinition"];
    let recorded = &definition["externalParameters"];
    let mut fields = Vec::new();
    if let Some(map) = now.external_parameters.as_object() {
        for (key, value) in map {
            if key != "lockedDownloads" && &recorded[key] != value {
                fields.push(format!("externalParameters.{key}"));
            }
        }
    }
    let vm = &definition["internalParameters"]["vm"];
    let shape = [
        ("cpus", json!(now.cpus)),
        ("memoryMib", json!(now.memory_mib)),
        ("diskGib", json!(now.disk_gib)),
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
            contractor_protocol::clock::format_utc(manifest.created)
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

/// Compares two records' artifacts (path → SHA-256), by path, sorted. The build cache's
/// upload is not an artifact.
pub fn compare(
    original: &BTreeMap<String, String>,
    rebuild: &BTreeMap<String, String>,
) -> Vec<Compared> {
    let paths: BTreeSet<&String> = original
        .keys()
        .chain(rebuild.keys())
        .filter(|p| p.as_str() != CACHE_UPLOAD_NAME)
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

/// The comparison of the records `original` (of build `original_id`) and `rebuild`: each
/// artifact, and the inputs that differ (`known` first, then the statements' digests; a
/// statement that cannot be read adds none).
pub fn comparison(
    original: &Path,
    rebuild: &Path,
    known: &[String],
) -> Result<(Vec<Compared>, Vec<String>), AttestError> {
    let before = crate::digest::hash_artifacts(&original.join("artifacts"))?;
    let after = crate::digest::hash_artifacts(&rebuild.join("artifacts"))?;
    let mut inputs_differ = known.to_vec();
    let statements = (
        read_statement(&original.join(PROVENANCE_FILE)),
        read_statement(&rebuild.join(PROVENANCE_FILE)),
    );
    if let (Ok(before), Ok(after)) = statements {
        for found in input_differences(&before, &after) {
            if !inputs_differ.contains(&found) {
                inputs_differ.push(found);
            }
        }
    }
    Ok((compare(&before, &after), inputs_differ))
}

/// Most bytes of a record's `result.json` read (ours have a few KiB, their error chains
/// capped; the store reads back at most as much).
pub const MAX_RESULT_BYTES: u64 = 1 << 20;

/// The `result.json` of `record` (a regular file, never through a link, at most
/// [`MAX_RESULT_BYTES`], typed); None when it has none.
pub fn result_of(record: &Path) -> Result<Option<BuildResult>, AttestError> {
    let path = record.join("result.json");
    let bytes =
        read_regular_if_exists(&path, MAX_RESULT_BYTES).map_err(crate::io("read", &path))?;
    bytes
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| {
                crate::io("read", &path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
        })
        .transpose()
}

/// The rebuild's record has no `result.json` to say how it ended.
pub fn no_result(record: &Path) -> AttestError {
    let path = record.join("result.json");
    crate::io("read", &path)(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the rebuild's record has no result",
    ))
}

/// How the two builds ended.
#[derive(Debug)]
pub struct Ended<'a> {
    /// The build rebuilt.
    pub original_id: &'a str,
    /// Its result, when its record has one.
    pub original: Option<BuildResult>,
    /// The rebuild's result.
    pub rebuild: BuildResult,
}

/// The summary of a rebuild whose artifacts compared as `rows` and whose inputs differ as
/// `inputs_differ` (`cache_warning`: what it may lack, said when the ends differ): its
/// lines, and whether it ended as the original did.
pub fn summary(
    ended: &Ended,
    rows: &[Compared],
    inputs_differ: &[String],
    cache_warning: Option<&str>,
) -> (Vec<String>, bool) {
    let rebuild = &ended.rebuild;
    let word = |o: Outcome| format!("{o:?}").to_lowercase();
    let identical = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Identical)
        .count();
    let same_end = ended
        .original
        .as_ref()
        .is_none_or(|r| r.outcome == rebuild.outcome);
    let mut lines = vec![format!(
        "rebuild {} of build {}: {identical} of {} artifact(s) identical; the rebuild {} in {:.1}s",
        rebuild.id,
        ended.original_id,
        rows.len(),
        match rebuild.outcome {
            Outcome::Success => "succeeded".to_string(),
            other => format!("ended {}", word(other)),
        },
        rebuild.duration_secs
    )];
    if !same_end {
        lines.push(format!(
            "  the original ended {}, the rebuild {}: `contractor log {}` says why",
            ended
                .original
                .as_ref()
                .map_or("unknown".into(), |r| word(r.outcome)),
            word(rebuild.outcome),
            rebuild.id
        ));
        lines.extend(cache_warning.map(|warning| format!("  {warning}")));
    }
    if !rebuild.refused_hosts.is_empty() {
        lines.push(format!(
            "  refused offline: {} (not in the record's downloads, or not in the download cache any more)",
            rebuild.refused_hosts.join(", ")
        ));
    }
    lines.extend(
        inputs_differ
            .iter()
            .map(|found| format!("  input differs: {found}")),
    );
    if rows.is_empty() {
        lines.push("  no artifacts to compare".into());
    }
    (lines, same_end)
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

#[cfg(test)]
mod tests {
    use super::*;
    use contractor_protocol::attest::{PREDICATE_TYPE, STATEMENT_TYPE};

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
    fn the_stated_downloads_are_the_download_dependencies_with_whether_servable() {
        let st = statement(vec![
            json!({"name": "source", "uri": "source.tar", "digest": {"sha256": A}}),
            download("https://z.test/last", A, "GET", 200, true),
            download("https://a.test/head", A, "HEAD", 200, true),
            download("https://a.test/missing", A, "GET", 404, true),
            download("https://a.test/cut", A, "GET", 200, false),
        ]);
        let stated = stated_downloads(&st);
        let said: Vec<(&str, bool)> = stated
            .iter()
            .map(|d| (d.url.as_str(), d.complete_get_200))
            .collect();
        assert_eq!(
            said,
            [
                ("https://z.test/last", true),
                ("https://a.test/head", false),
                ("https://a.test/missing", false),
                ("https://a.test/cut", false),
            ]
        );
        assert_eq!(stated[0].size, 3);
        assert!(stated_downloads(&statement(vec![])).is_empty());
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
            (CACHE_UPLOAD_NAME, A),
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
        assert_eq!(rows[3].original.as_deref(), Some(A));
        assert_eq!(rows[3].rebuild.as_deref(), Some(B));

        let same = compare(&map(&[("hello", A)]), &map(&[("hello", A)]));
        assert!(all_identical(&same));
        let json = record_json("b1", &same, &[]);
        assert_eq!(json["rebuildOf"], "b1");
        assert_eq!(json["identical"], true);
        assert_eq!(json["artifacts"][0]["verdict"], "identical");
    }

    #[test]
    fn a_restored_build_cache_is_an_input_the_rebuild_warns_of() {
        let with = |restored: Value| {
            json!({"predicate": {"buildDefinition": {"internalParameters": {
                "buildCache": {"paths": ["/build/x"], "restored": restored}}}}})
        };
        assert!(cache_warning(&with(json!(false)), true).is_none());
        let said = cache_warning(&with(json!(true)), false).expect("restored");
        assert!(said.contains("restored the build cache"), "{said}");
        // A statement that does not say: the spec decides whether to warn.
        let silent = statement(vec![]);
        assert!(cache_warning(&silent, false).is_none());
        let said = cache_warning(&silent, true).expect("may have");
        assert!(said.contains("may have restored"), "{said}");
    }

    fn result(id: &str, outcome: Outcome) -> BuildResult {
        serde_json::from_value(json!({"version": 1, "id": id, "outcome": outcome,
            "exit_code": null, "duration_secs": 12.0, "log": "/r/build.log",
            "console_log": "/r/console.log", "artifacts": [], "refused_hosts": [],
            "refused_offline": [], "upstream_failures": [], "limit": null, "error": null,
            "host": null}))
        .expect("a result")
    }

    #[test]
    fn the_summary_says_how_many_are_identical_and_how_each_build_ended() {
        let row = |path: &str, verdict| Compared {
            path: path.into(),
            verdict,
            original: Some(A.into()),
            rebuild: Some(A.into()),
        };
        let rows = [row("a", Verdict::Identical), row("b", Verdict::Different)];
        let ended = Ended {
            original_id: "b1",
            original: Some(result("b1", Outcome::Success)),
            rebuild: result("b2", Outcome::Success),
        };
        let (lines, same_end) = summary(&ended, &rows, &[], Some("no cache"));
        assert!(same_end);
        // The cache's warning is said only when the ends differ.
        assert_eq!(
            lines,
            ["rebuild b2 of build b1: 1 of 2 artifact(s) identical; the rebuild succeeded in 12.0s"]
        );

        let ended = Ended {
            original_id: "b1",
            original: Some(result("b1", Outcome::Success)),
            rebuild: result("b2", Outcome::Failed),
        };
        let (lines, same_end) = summary(&ended, &[], &["image: x".into()], Some("no cache"));
        assert!(!same_end);
        assert_eq!(
            lines,
            [
                "rebuild b2 of build b1: 0 of 0 artifact(s) identical; the rebuild ended failed in 12.0s",
                "  the original ended success, the rebuild failed: `contractor log b2` says why",
                "  no cache",
                "  input differs: image: x",
                "  no artifacts to compare",
            ]
        );
        // An original without a result: its end is not known, so not different.
        let ended = Ended {
            original_id: "b1",
            original: None,
            rebuild: result("b2", Outcome::Failed),
        };
        assert!(summary(&ended, &rows, &[], None).1);
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
