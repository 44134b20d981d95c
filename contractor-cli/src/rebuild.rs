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
//! The invariant: the front end reads no file of a record. `contractor-attest plan` reads
//! the original's statement (confined) and answers what to pin and what to warn of, or
//! refuses a spec or an image that differs, in the words this front end says;
//! `contractor-store record source` copies the record's `source.tar` out (confined);
//! `contractor-attest compare` hashes both records' artifacts, compares them and writes
//! `rebuild.json`. This module asks and renders.

use std::path::Path;

use contractor_protocol::attest::{AttestAnswer, AttestRequest, PlanRequest, StatedDownload};
pub use contractor_protocol::attest::{
    Compared, RebuildComparison, RebuildPlan, Verdict, REBUILD_FILE,
};
use contractor_protocol::store::RecordSource;
use contractor_protocol::tool::ToolFailure;
use contractor_protocol::PROTOCOL_VERSION;

use crate::image::Manifest;
use crate::lock::{self, Lock};
use crate::provenance::{self, ProvenanceError};
use crate::spec::BuildSpec;
use crate::tools;

/// Has `contractor-attest` read the statement of `record` and weigh `spec` (read from
/// `file`) and the `images` on this host against it: what to pin and warn of, or the
/// refusal to rebuild (a spec that differs; an image, unless `any_image`), said by the
/// tool (codes `spec_changed`, `image_changed`: bad input).
pub fn plan(
    record: &Path,
    file: &Path,
    spec: &BuildSpec,
    images: &[Manifest],
    any_image: bool,
) -> Result<RebuildPlan, ProvenanceError> {
    let request = AttestRequest::Plan(Box::new(PlanRequest {
        version: PROTOCOL_VERSION,
        record: record.to_path_buf(),
        external_parameters: provenance::external_parameters(spec),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        cache_paths: spec.cache_paths.clone(),
        images: images.to_vec(),
        spec: file.to_path_buf(),
        any_image,
    }));
    match provenance::ask(&request)? {
        AttestAnswer::Plan(plan) => Ok(*plan),
        _ => Err(provenance::wrong_answer("plan")),
    }
}

/// The pins of a rebuild: every download the statement lists that the proxy can serve
/// again, by the rule of `contractor pin` ([`lock::lock_of`]).
pub fn pins(downloads: &[StatedDownload]) -> Lock {
    lock::lock_of(downloads.iter().map(|d| lock::Fetched {
        url: &d.url,
        sha256: &d.sha256,
        size: d.size,
        complete_get_200: d.complete_get_200,
    }))
}

/// Has `contractor-attest` compare the two records (the inputs `plan` found to differ
/// first), write the rebuild's `rebuild.json` and sum the rebuild up.
pub fn compare(
    original: &Path,
    rebuild: &Path,
    plan: &RebuildPlan,
) -> Result<RebuildComparison, ProvenanceError> {
    let request = AttestRequest::Compare {
        version: PROTOCOL_VERSION,
        original: original.to_path_buf(),
        rebuild: rebuild.to_path_buf(),
        inputs_differ: plan.image_differences.clone(),
        cache_warning: plan.cache_warning.clone(),
    };
    match provenance::ask(&request)? {
        AttestAnswer::Comparison(compared) => Ok(*compared),
        _ => Err(provenance::wrong_answer("compare")),
    }
}

/// The report, one line per artifact (`Compared`'s words), names escaped for a terminal.
pub fn report_lines(rows: &[Compared]) -> Vec<String> {
    rows.iter()
        .map(|r| crate::display::escape(&r.to_string()).into_owned())
        .collect()
}

/// Has `contractor-store` copy the `source.tar` of build `id` in `store` to `to`, a new
/// file on the file system of the record to come, so that the build can move it there
/// (removed again when the copy failed). The store's stderr is not shown: its error object
/// says the same, reported once by the caller.
pub fn copy_source(store: &Path, id: &str, to: &Path) -> Result<(), ToolFailure> {
    let copied = tools::command(tools::STORE).and_then(|mut command| {
        command
            .args(["record", "source", "--root"])
            .arg(store)
            .args(["--build", id, "--to"])
            .arg(to)
            .stderr(std::process::Stdio::null());
        tools::answer_of::<RecordSource>(tools::STORE, command)
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied.map(|_| ()).map_err(ToolFailure::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3bd1574e617a9a6c1f8f8181bd7e841e1f20e4277607ef28945765188d6284d4";
    const B: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn stated(url: &str, sha256: &str, servable: bool) -> StatedDownload {
        StatedDownload {
            url: url.into(),
            sha256: sha256.into(),
            size: 3,
            complete_get_200: servable,
        }
    }

    #[test]
    fn pins_are_the_servable_downloads_of_the_statement_last_of_each_url() {
        let lock = pins(&[
            stated("https://z.test/last", A, true),
            stated("https://a.test/first", A, true),
            stated("https://a.test/first", B, true),
            stated("https://a.test/head", A, false),
            stated("https://a.test/bad", "ABC", true),
        ]);
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
        assert!(pins(&[]).downloads.is_empty());
    }

    #[test]
    fn the_report_escapes_the_names_the_project_chose() {
        let row = |path: &str| Compared {
            path: path.into(),
            verdict: Verdict::MissingInRebuild,
            original: Some(A.into()),
            rebuild: None,
        };
        let lines = report_lines(&[row("gone"), row("a\u{1b}[2J")]);
        assert_eq!(
            lines[0],
            format!("MISSING    gone  not in the rebuild (original sha256 {A})")
        );
        // A name the project chose is escaped before it reaches a terminal.
        assert!(
            !lines[1].contains('\u{1b}') && lines[1].contains("a\\x1b[2J"),
            "{}",
            lines[1]
        );
    }
}
