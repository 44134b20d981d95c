//! `verify`: the envelope's signature with the key given, each artifact of the record
//! against its subject (naming any that differ, are missing or are not stated), and the
//! record's `downloads.jsonl` against the statement's downloads, both ways.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use contractor_protocol::attest::{read_envelope, statement_of};
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::digest::hash_artifacts;
use crate::key::key_id;
use crate::statement::downloads;
use crate::AttestError;

/// What `verify` found: no problems when everything verifies.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Each thing that does not verify, named.
    pub problems: Vec<String>,
    /// The artifacts checked.
    pub artifacts: usize,
    /// The downloads checked.
    pub downloads: usize,
}

/// Checks the envelope at `path` with `key`, the record's artifacts (beside it, in
/// `artifacts/`) against its subjects, and its `downloads.jsonl` against the statement.
/// An envelope that is not one of ours is an error (bad input); what does not verify is
/// in the verdict.
pub fn verify(path: &Path, key: &VerifyingKey) -> Result<Verdict, AttestError> {
    let envelope = read_envelope(path)?;
    let mut verdict = Verdict::default();
    if !crate::dsse::signed_by(&envelope, key) {
        verdict.problems.push(format!(
            "the signature does not verify with key {} (the statement was changed, or another key signed it: --key)",
            key_id(key)
        ));
        return Ok(verdict);
    }
    let statement = statement_of(path, &envelope)?;
    let record = path.parent().unwrap_or(Path::new("."));
    check_artifacts(record, &statement, &mut verdict)?;
    check_downloads(record, &statement, &mut verdict)?;
    Ok(verdict)
}

fn check_artifacts(
    record: &Path,
    statement: &Value,
    verdict: &mut Verdict,
) -> Result<(), AttestError> {
    let mut claimed = BTreeMap::new();
    for subject in statement["subject"].as_array().into_iter().flatten() {
        let name = subject["name"].as_str().unwrap_or_default();
        let sha256 = subject["digest"]["sha256"].as_str().unwrap_or_default();
        claimed.insert(name.to_string(), sha256.to_string());
    }
    let actual = hash_artifacts(&record.join("artifacts"))?;
    for (name, sha256) in &claimed {
        match actual.get(name) {
            None => verdict
                .problems
                .push(format!("artifact {name:?} is missing from the record")),
            Some(found) if found != sha256 => verdict.problems.push(format!(
                "artifact {name:?} differs: sha256 {found}, the statement says {sha256}"
            )),
            Some(_) => {}
        }
    }
    for name in actual.keys().filter(|n| !claimed.contains_key(*n)) {
        verdict
            .problems
            .push(format!("artifact {name:?} is not in the statement"));
    }
    verdict.artifacts = claimed.len();
    Ok(())
}

fn check_downloads(
    record: &Path,
    statement: &Value,
    verdict: &mut Verdict,
) -> Result<(), AttestError> {
    let key = |v: &Value| -> Option<(String, String)> {
        Some((
            v["uri"].as_str()?.to_string(),
            v["digest"]["sha256"].as_str()?.to_string(),
        ))
    };
    let stated: BTreeSet<(String, String)> = statement["predicate"]["buildDefinition"]
        ["resolvedDependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["annotations"]["kind"] == "download")
        .filter_map(key)
        .collect();
    let (deps, _) = downloads(record)?;
    let recorded: BTreeSet<(String, String)> = deps.iter().filter_map(key).collect();
    for (url, sha256) in recorded.difference(&stated) {
        verdict.problems.push(format!(
            "downloads.jsonl lists {url} (sha256 {sha256}), the statement does not"
        ));
    }
    for (url, sha256) in stated.difference(&recorded) {
        verdict.problems.push(format!(
            "the statement lists the download {url} (sha256 {sha256}), downloads.jsonl does not"
        ));
    }
    verdict.downloads = stated.len();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{fixture_request, write_fixture};
    use contractor_protocol::attest::PROVENANCE_FILE;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_signed_statement_verifies_and_every_change_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = dir.path().join("project");
        let record = project.join(".contractor/builds/b1");
        write_fixture(&record, &project).expect("fixture");
        let request = fixture_request(&record, &project, &dir.path().join("key"));
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let st = crate::statement::statement(&request).expect("statement");
        let file = record.join(PROVENANCE_FILE);
        std::fs::write(&file, crate::dsse::envelope(&st, &key).to_string()).expect("write");
        let verdict = verify(&file, &key.verifying_key()).expect("verify");
        assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
        assert_eq!((verdict.artifacts, verdict.downloads), (2, 2));

        // Another key: the signature does not verify.
        let other = SigningKey::from_bytes(&[7u8; 32]);
        let verdict = verify(&file, &other.verifying_key()).expect("verify");
        assert!(verdict.problems[0].contains("signature does not verify"));

        // A changed artifact, a missing one, an extra one, a download not stated.
        std::fs::write(record.join("artifacts/hello"), b"trojan\n").expect("tamper");
        std::fs::remove_file(record.join("artifacts/sub/notes.txt")).expect("rm");
        std::fs::write(record.join("artifacts/extra"), b"x").expect("extra");
        let mut list = std::fs::read(record.join("downloads.jsonl")).expect("read");
        list.extend_from_slice(
            br#"{"type":"download","method":"GET","url":"https://x.example/y","status":200,"size":1,"sha256":"00","complete":true}"#,
        );
        std::fs::write(record.join("downloads.jsonl"), list).expect("write");
        let verdict = verify(&file, &key.verifying_key()).expect("verify");
        let all = verdict.problems.join("\n");
        assert!(all.contains("artifact \"hello\" differs"), "{all}");
        assert!(all.contains("\"sub/notes.txt\" is missing"), "{all}");
        assert!(all.contains("\"extra\" is not in the statement"), "{all}");
        assert!(all.contains("https://x.example/y"), "{all}");
    }
}
