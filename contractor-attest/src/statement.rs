//! The in-toto statement of a build: subjects (the artifacts), `buildDefinition` (the spec
//! as the front end states it, what Contractor chose, and every resolved dependency: the
//! packed source and its git commit, the image, the agent, each download of
//! `downloads.jsonl`) and `runDetails`. Everything but the front end's facts
//! ([`SignRequest`]) is read from the record's own files, by this confined tool.

use std::path::Path;

use contractor_protocol::attest::{SignRequest, PREDICATE_TYPE, STATEMENT_TYPE};
use contractor_protocol::file::{read_regular_if_exists, MAX_DOWNLOADS_FILE};
use contractor_protocol::result::Outcome;
use contractor_protocol::vm::SnapshotReport;
use serde_json::{json, Value};

use crate::digest::{artifact_digests, file_sha256};
use crate::AttestError;

/// Our build type: what `externalParameters` and `internalParameters` mean
/// (docs/provenance.md).
pub const BUILD_TYPE: &str = "urn:contractor:build-type:v1";
/// `runDetails.builder.id`.
pub const BUILDER_ID: &str = "urn:contractor:builder:v1";
/// Most bytes of `.git/HEAD`, a ref file, or `.git/packed-refs` read.
const MAX_GIT_FILE_BYTES: u64 = 4 << 20;

/// Whether a build ran its script, so that its record gets provenance: it has an exit
/// status, or it ended in success, failure or timeout.
pub fn ran_script(facts: &SignRequest) -> bool {
    facts.exit_code.is_some()
        || matches!(
            facts.outcome,
            Outcome::Success | Outcome::Failed | Outcome::Timeout
        )
}

/// How the VM booted, in words: `cold`, `restored from a snapshot`, `cold, then saved as a
/// snapshot and restored`; with the reason when a snapshot was asked for and not used. For a
/// build host's VM, its report as the front end relayed it; without one, that it restores a
/// snapshot if it keeps one.
fn boot(facts: &SignRequest) -> String {
    let why = |report: &SnapshotReport| {
        report
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    };
    match &facts.snapshot_report {
        _ if !facts.snapshot => "cold".into(),
        None if facts.build_host.is_some() => {
            "on the build host: restored from a snapshot if it keeps one, else cold".into()
        }
        None => "cold".into(),
        Some(r) if r.restored && r.created => "cold, then saved as a snapshot and restored".into(),
        Some(r) if r.restored => "restored from a snapshot".into(),
        Some(r) => format!("cold{}", why(r)),
    }
}

/// `2026-11-25T14:15:02Z`, of seconds since the Unix epoch.
fn rfc3339(secs: u64) -> String {
    contractor_protocol::clock::format_utc(secs).replacen(' ', "T", 1) + "Z"
}

/// The in-toto statement of the build in `record`.
pub fn statement(facts: &SignRequest) -> Result<Value, AttestError> {
    let record = facts.record.as_path();
    let subject: Vec<Value> = artifact_digests(record)?
        .into_iter()
        .map(|(name, sha256)| json!({"name": name, "digest": {"sha256": sha256}}))
        .collect();
    let external = facts.external_parameters.clone();
    let (downloads, mut reasons) = downloads(record)?;
    if !facts.inspect {
        reasons.push("[network] inspect is off: HTTPS traffic is known by host only".to_string());
    } else if !facts.tunnel.is_empty() {
        reasons.push(format!(
            "[network] tunnel hosts are not inspected, known by host only: {}",
            facts.tunnel.join(", ")
        ));
    }
    let internal = json!({
        "vm": {
            "cpus": facts.cpus,
            "memoryMib": facts.memory_mib,
            "diskGib": facts.disk_gib,
            "network": "none (virtio-serial to the proxy and the store only)",
        },
        "accelerator": facts.accelerator,
        "boot": boot(facts),
        "offline": facts.offline,
        "rebuildOf": facts.rebuild_of,
        "buildCache": {
            "paths": facts.cache_paths,
            "restored": facts.cache_restored,
        },
        "buildHost": facts.build_host,
        "contractorVersion": env!("CARGO_PKG_VERSION"),
        "downloads": {
            "count": downloads.len(),
            "complete": reasons.is_empty(),
            "incompleteBecause": reasons,
        },
    });
    let mut resolved = vec![source_dependency(record, &facts.project)];
    resolved.extend(image_dependencies(facts));
    resolved.extend(downloads);
    let byproducts = byproducts(record, facts)?;
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"contractor": env!("CARGO_PKG_VERSION")}},
                "metadata": {
                    "invocationId": facts.id,
                    "startedOn": rfc3339(facts.started_on),
                    "finishedOn": rfc3339(facts.finished_on),
                },
                "byproducts": byproducts,
            },
        },
    });
    Ok(statement)
}

/// The image and the guest agent it carries, as resolved dependencies: by digest from the
/// image's manifest, or (a build host's image, whose manifest stayed there) by name only.
fn image_dependencies(facts: &SignRequest) -> Vec<Value> {
    let mut deps = Vec::new();
    match &facts.image {
        Some(manifest) => {
            let mut annotations = json!({
                "suite": manifest.suite,
                "created": manifest.created,
            });
            if let Some(base) = &manifest.base {
                annotations["base"] = json!(base);
                annotations["packages"] = json!(manifest.packages);
            }
            // Built from a mirror whose Release was not checked for expiry (asked for with
            // `[image] check_valid_until = false`): said, so a verifier can weigh it.
            if manifest.check_valid_until == Some(false) {
                annotations["checkValidUntil"] = json!(false);
            }
            deps.push(json!({
                "name": "image",
                "uri": format!("contractor-image:{}", manifest.name),
                "digest": {"sha256": manifest.disk_sha256},
                "annotations": annotations,
            }));
            deps.push(json!({
                "name": "guest-agent",
                "uri": format!("contractor-agent:{}", manifest.agent_version),
                "digest": {"sha256": manifest.agent_sha256},
            }));
        }
        None => deps.push(json!({
            "name": "image",
            "uri": format!("contractor-image:{}", facts.image_name),
            "annotations": {"digest": "not known here: the image is on the build host"},
        })),
    }
    deps
}

/// The record's files as byproducts (name and digest), `result.json` annotated with how
/// the build ended (SLSA's metadata has no field for it).
fn byproducts(record: &Path, facts: &SignRequest) -> Result<Vec<Value>, AttestError> {
    let mut byproducts = Vec::new();
    for name in ["result.json", "build.log", "proxy.jsonl", "downloads.jsonl"] {
        if let Some(sha256) = file_sha256(&record.join(name))? {
            byproducts.push(json!({"name": name, "digest": {"sha256": sha256}}));
        }
    }
    if let Some(result) = byproducts
        .first_mut()
        .filter(|b| b["name"] == "result.json")
    {
        result["annotations"] = json!({"outcome": facts.outcome, "exitCode": facts.exit_code});
    }
    Ok(byproducts)
}

/// The resolved dependencies of `downloads.jsonl` (one per download line, in order) and
/// the reasons the list is not complete found in it (a `cut` line).
pub fn downloads(record: &Path) -> Result<(Vec<Value>, Vec<String>), AttestError> {
    let path = record.join("downloads.jsonl");
    let bytes = match read_regular_if_exists(&path, MAX_DOWNLOADS_FILE) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok((Vec::new(), Vec::new())),
        Err(source) => {
            return Err(AttestError::Io {
                action: "read",
                path,
                source,
            })
        }
    };
    let mut deps = Vec::new();
    let mut reasons = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            reasons.push("downloads.jsonl has a line that is not JSON".to_string());
            continue;
        };
        match value["type"].as_str() {
            Some("download") => {
                if let Some(dep) = download_dependency(&value) {
                    deps.push(dep);
                }
            }
            Some("cut") => reasons.push(
                "downloads.jsonl reached its size limit: later downloads are not listed"
                    .to_string(),
            ),
            _ => {}
        }
    }
    Ok((deps, reasons))
}

fn download_dependency(value: &Value) -> Option<Value> {
    let url = value["url"].as_str()?;
    let sha256 = value["sha256"].as_str()?;
    let mut annotations = json!({
        "kind": "download",
        "method": value["method"],
        "status": value["status"],
        "size": value["size"],
        "complete": value["complete"],
    });
    for key in ["phase", "from_cache", "pinned"] {
        if !value[key].is_null() {
            annotations[key] = value[key].clone();
        }
    }
    Some(json!({"uri": url, "digest": {"sha256": sha256}, "annotations": annotations}))
}

/// The packed source (`source.tar`) and, when the project is a git work tree, its commit.
fn source_dependency(record: &Path, project: &Path) -> Value {
    let mut dep = json!({"name": "source", "uri": "source.tar"});
    if let Ok(Some(sha256)) = file_sha256(&record.join("source.tar")) {
        dep["digest"] = json!({"sha256": sha256});
    }
    if let Some((commit, reference)) = git_commit(project) {
        dep["digest"]["gitCommit"] = json!(commit);
        if let Some(reference) = reference {
            dep["annotations"] = json!({"gitRef": reference});
        }
    }
    dep
}

/// The commit `HEAD` names in `project/.git` (read from the files, never by running git)
/// and the branch, if any.
pub fn git_commit(project: &Path) -> Option<(String, Option<String>)> {
    let git = project.join(".git");
    let read = |path: &Path| {
        contractor_protocol::file::read_regular(path, MAX_GIT_FILE_BYTES)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let head = read(&git.join("HEAD"))?;
    let head = head.trim();
    if is_object_id(head) {
        return Some((head.to_string(), None));
    }
    let reference = head.strip_prefix("ref: ")?.trim();
    let safe = reference.starts_with("refs/")
        && !reference
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if !safe {
        return None;
    }
    if let Some(text) = read(&git.join(reference)) {
        let id = text.trim();
        return is_object_id(id).then(|| (id.to_string(), Some(reference.to_string())));
    }
    let packed = read(&git.join("packed-refs"))?;
    packed.lines().find_map(|line| {
        let (id, name) = line.split_once(' ')?;
        (name == reference && is_object_id(id))
            .then(|| (id.to_string(), Some(reference.to_string())))
    })
}

fn is_object_id(text: &str) -> bool {
    (text.len() == 40 || text.len() == 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{fixture_request, write_fixture};
    use sha2::{Digest, Sha256};

    fn fixture() -> (tempfile::TempDir, SignRequest) {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = dir.path().join("project");
        let record = project.join(".contractor/builds/20261125-141502-3fa2c1");
        write_fixture(&record, &project).expect("fixture");
        let request = fixture_request(&record, &project, &dir.path().join("data/signing-key"));
        (dir, request)
    }

    fn sha(bytes: &[u8]) -> String {
        crate::hex(&Sha256::digest(bytes))
    }

    #[test]
    fn boot_says_how_the_vm_started() {
        // Moved with the words from contractor-cli's provenance.rs.
        let (_dir, request) = fixture();
        let booted = |snapshot, restored, created, reason: Option<&str>, host: Option<&str>| {
            let report = SnapshotReport {
                restored,
                created,
                reason: reason.map(String::from),
                dir: None,
            };
            boot(&SignRequest {
                snapshot,
                snapshot_report: Some(report),
                build_host: host.map(String::from),
                ..request.clone()
            })
        };
        assert_eq!(boot(&request), "cold");
        assert_eq!(booted(false, true, false, None, None), "cold");
        assert_eq!(
            booted(true, true, false, None, None),
            "restored from a snapshot"
        );
        assert_eq!(
            booted(true, true, true, None, None),
            "cold, then saved as a snapshot and restored"
        );
        assert_eq!(
            booted(true, false, false, Some("all in use"), None),
            "cold (all in use)"
        );
        // A build host's VM: its report as relayed, worded as a local one.
        assert_eq!(
            booted(true, true, false, None, Some("builder")),
            "restored from a snapshot"
        );
        assert_eq!(
            booted(true, false, false, Some("all in use"), Some("builder")),
            "cold (all in use)"
        );
        assert_eq!(booted(false, false, false, None, Some("builder")), "cold");
        // Without a report (no VM started there): what the build host does.
        assert_eq!(
            boot(&SignRequest {
                snapshot: true,
                snapshot_report: None,
                build_host: Some("builder".into()),
                ..request.clone()
            }),
            "on the build host: restored from a snapshot if it keeps one, else cold"
        );
    }

    #[test]
    fn only_a_build_that_ran_its_script_gets_provenance() {
        let (_dir, request) = fixture();
        let ended = |outcome, exit_code| {
            ran_script(&SignRequest {
                outcome,
                exit_code,
                ..request.clone()
            })
        };
        assert!(ended(Outcome::Success, Some(0)));
        assert!(ended(Outcome::Timeout, None));
        assert!(ended(Outcome::Interrupted, Some(130)));
        assert!(!ended(Outcome::Infrastructure, None));
        assert!(!ended(Outcome::Interrupted, None));
    }

    #[test]
    fn the_statement_lists_artifacts_downloads_source_and_image() {
        let (_dir, request) = fixture();
        let st = statement(&request).expect("statement");
        assert_eq!(st["_type"], STATEMENT_TYPE);
        assert_eq!(st["predicateType"], PREDICATE_TYPE);
        assert_eq!(
            st["subject"],
            json!([
                {"name": "hello", "digest": {"sha256": sha(b"hello binary\n")}},
                {"name": "sub/notes.txt", "digest": {"sha256": sha(b"notes\n")}},
            ])
        );
        let def = &st["predicate"]["buildDefinition"];
        assert_eq!(def["buildType"], BUILD_TYPE);
        assert_eq!(def["externalParameters"], request.external_parameters);
        assert_eq!(def["internalParameters"]["downloads"]["complete"], true);
        let deps = def["resolvedDependencies"].as_array().expect("deps");
        assert_eq!(deps[0]["name"], "source");
        assert_eq!(deps[0]["digest"]["sha256"], sha(b"not really a tar"));
        assert_eq!(
            deps[0]["digest"]["gitCommit"],
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(deps[1]["digest"]["sha256"], "d".repeat(64));
        assert_eq!(deps[2]["name"], "guest-agent");
        assert_eq!(deps[2]["digest"]["sha256"], "a".repeat(64));
        let downloads: Vec<(&str, &str)> = deps[3..]
            .iter()
            .map(|d| {
                (
                    d["uri"].as_str().expect("uri"),
                    d["digest"]["sha256"].as_str().expect("sha256"),
                )
            })
            .collect();
        assert_eq!(
            downloads,
            [
                (
                    "https://deb.debian.org/a.deb",
                    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
                ),
                (
                    "https://static.crates.io/crates/x/x-1.0.crate",
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                ),
            ]
        );
        assert_eq!(deps[4]["annotations"]["phase"], "fetch");
        let run = &st["predicate"]["runDetails"];
        assert_eq!(run["builder"]["id"], BUILDER_ID);
        assert_eq!(run["metadata"]["invocationId"], "20261125-141502-3fa2c1");
        assert_eq!(run["metadata"]["startedOn"], "2026-11-25T14:12:57Z");
        assert_eq!(run["byproducts"][0]["name"], "result.json");
        assert_eq!(run["byproducts"][0]["annotations"]["outcome"], "success");
        assert_eq!(run["byproducts"][0]["annotations"]["exitCode"], 0);
        assert_eq!(run["byproducts"][1]["digest"]["sha256"], sha(b"make\n"));
    }

    #[test]
    fn an_image_built_without_the_release_expiry_check_says_so() {
        let (_dir, mut request) = fixture();
        let image =
            |st: &Value| st["predicate"]["buildDefinition"]["resolvedDependencies"][1].clone();
        assert!(
            image(&statement(&request).expect("statement"))["annotations"]
                .get("checkValidUntil")
                .is_none()
        );
        if let Some(manifest) = request.image.as_mut() {
            manifest.base = Some("debian-unstable".into());
            manifest.packages = vec!["hello".into()];
            manifest.check_valid_until = Some(false);
        }
        let image = image(&statement(&request).expect("statement"));
        assert_eq!(image["annotations"]["checkValidUntil"], false);
        assert_eq!(image["annotations"]["base"], "debian-unstable");
    }

    #[test]
    fn the_store_index_names_the_subjects_when_there_is_one() {
        let (_dir, request) = fixture();
        std::fs::write(
            request.record.join("artifacts.json"),
            format!(
                r#"{{"version":1,"build":"b","artifacts":[{{"path":"hello","size":1,"sha256":"{}","executable":true}}]}}"#,
                "e".repeat(64)
            ),
        )
        .expect("index");
        let st = statement(&request).expect("statement");
        assert_eq!(
            st["subject"],
            json!([{"name": "hello", "digest": {"sha256": "e".repeat(64)}}])
        );
    }

    #[test]
    fn tunnels_uninspected_traffic_and_a_cut_list_mark_the_downloads_incomplete() {
        for (inspect, tunnel) in [(true, vec!["deb.debian.org".to_string()]), (false, vec![])] {
            let (_dir, mut request) = fixture();
            request.inspect = inspect;
            request.tunnel = tunnel;
            let st = statement(&request).expect("statement");
            let downloads = &st["predicate"]["buildDefinition"]["internalParameters"]["downloads"];
            assert_eq!(downloads["complete"], false, "{inspect}");
            assert!(
                downloads["incompleteBecause"][0]
                    .as_str()
                    .is_some_and(|r| r.contains("known by host only")),
                "{downloads}"
            );
        }
        let (_dir, request) = fixture();
        let list_file = request.record.join("downloads.jsonl");
        let mut list = std::fs::read(&list_file).expect("read");
        list.extend_from_slice(b"{\"type\":\"cut\"}\n");
        std::fs::write(&list_file, list).expect("write");
        let st = statement(&request).expect("statement");
        let downloads = &st["predicate"]["buildDefinition"]["internalParameters"]["downloads"];
        assert_eq!(downloads["complete"], false);
    }
}
