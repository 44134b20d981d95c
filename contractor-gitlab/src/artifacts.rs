//! The artifacts of a job stage's build, copied from its record back into the job's
//! directory, where the runner's artifact and cache stages find them.
//!
//! The record is the one `contractor build` made for this stage (`.contractor/latest` →
//! `builds/<id>`, changed by the build), its artifacts those its `result.json` lists. The
//! job's directory is the job's (the clone put links there): nothing is read or written
//! through a link, and a path that would need one is left out and named.

use std::path::{Component, Path, PathBuf};

use contractor_protocol::result::BuildResult;

/// The most bytes of a record's `result.json` read (it lists at most
/// `contractor_protocol::agent::MAX_REPORTED_ARTIFACTS` paths).
pub const MAX_RESULT_BYTES: u64 = 16 << 20;

/// The record `store/latest` points at (`builds/<id>`), if it is one: `store` a directory,
/// not a link, and the link a plain relative path of two parts.
pub fn latest_record(store: &Path) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(store).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let target = std::fs::read_link(store.join("latest")).ok()?;
    let parts: Vec<_> = target.components().collect();
    match parts.as_slice() {
        [Component::Normal(builds), Component::Normal(id)]
            if *builds == "builds" && !id.to_string_lossy().starts_with('.') =>
        {
            Some(store.join(target))
        }
        _ => None,
    }
}

/// Copies the artifacts `record`'s `result.json` lists to the same relative paths in
/// `project_dir`. Returns one line per problem (an artifact left out, a result unreadable).
pub fn copy_back(record: &Path, project_dir: &Path) -> Vec<String> {
    let result =
        contractor_protocol::file::read_regular(&record.join("result.json"), MAX_RESULT_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<BuildResult>(&bytes).map_err(|e| e.to_string())
            });
    let result = match result {
        Ok(result) => result,
        Err(problem) => {
            return vec![format!(
                "no artifacts copied: {}: {problem}",
                record.join("result.json").display()
            )]
        }
    };
    // The paths in result.json are under the record as the front end named it.
    let listed = result
        .log
        .parent()
        .unwrap_or(Path::new(""))
        .join("artifacts");
    let relative: Vec<PathBuf> = result
        .artifacts
        .iter()
        .filter_map(|a| a.strip_prefix(&listed).ok().map(Path::to_path_buf))
        .collect();
    copy_artifacts(&record.join("artifacts"), &relative, project_dir)
}

/// Copies each of `artifacts` (paths relative to `artifacts_dir`) to the same relative path
/// in `project_dir`. Returns one line per artifact left out.
pub fn copy_artifacts(
    artifacts_dir: &Path,
    artifacts: &[PathBuf],
    project_dir: &Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    for relative in artifacts {
        if let Err(problem) = copy_artifact(&artifacts_dir.join(relative), relative, project_dir) {
            problems.push(format!(
                "artifact {} not copied into the job's directory: {problem}",
                relative.display()
            ));
        }
    }
    problems
}

/// Copies one artifact to `project_dir/relative`, creating directories, never following a
/// link.
fn copy_artifact(from: &Path, relative: &Path, project_dir: &Path) -> Result<(), String> {
    let mut at = project_dir.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err("empty path".into());
    };
    for part in dirs {
        let Component::Normal(part) = part else {
            return Err("not a plain relative path".into());
        };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(_) => std::fs::create_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?,
        }
    }
    let Component::Normal(name) = name else {
        return Err("not a plain relative path".into());
    };
    at.push(name);
    if let Ok(meta) = std::fs::symlink_metadata(&at) {
        if meta.is_dir() {
            return Err(format!("{} is a directory", at.display()));
        }
        std::fs::remove_file(&at).map_err(|e| format!("{}: {e}", at.display()))?;
    }
    let mut source = contractor_protocol::file::open_regular(from)
        .map_err(|e| format!("{}: {e}", from.display()))?;
    let mode = source
        .metadata()
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0o644);
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&at)
        .map_err(|e| format!("{}: {e}", at.display()))?;
    std::io::copy(&mut source, &mut target).map_err(|e| format!("{}: {e}", at.display()))?;
    std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("{}: {e}", at.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_copied_but_never_through_a_link() {
        let dir = tempfile::tempdir().expect("test setup");
        let artifacts = dir.path().join("record/artifacts");
        std::fs::create_dir_all(artifacts.join("out")).expect("test setup");
        std::fs::create_dir_all(artifacts.join("bin")).expect("test setup");
        std::fs::write(artifacts.join("out/hello"), "binary").expect("test setup");
        std::fs::write(artifacts.join("bin/tool"), "tool").expect("test setup");
        let project = dir.path().join("project");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&project).expect("test setup");
        std::fs::create_dir_all(&elsewhere).expect("test setup");
        std::os::unix::fs::symlink(&elsewhere, project.join("bin")).expect("test setup");
        let problems = copy_artifacts(
            &artifacts,
            &[PathBuf::from("out/hello"), PathBuf::from("bin/tool")],
            &project,
        );
        assert_eq!(
            std::fs::read_to_string(project.join("out/hello")).expect("test setup"),
            "binary"
        );
        assert!(!elsewhere.join("tool").exists());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("bin/tool"), "{problems:?}");
    }

    #[test]
    fn only_a_latest_link_to_a_record_of_the_store_counts() {
        let dir = tempfile::tempdir().expect("test setup");
        let store = dir.path().join(".contractor");
        std::fs::create_dir_all(store.join("builds/20261205-070000-abcdef")).expect("setup");
        assert_eq!(latest_record(&store), None);
        for bad in [
            "/etc",
            "../elsewhere/x",
            "builds/../../x",
            "builds/.hidden",
            "builds",
        ] {
            let _ = std::fs::remove_file(store.join("latest"));
            std::os::unix::fs::symlink(bad, store.join("latest")).expect("setup");
            assert_eq!(latest_record(&store), None, "{bad}");
        }
        let _ = std::fs::remove_file(store.join("latest"));
        std::os::unix::fs::symlink("builds/20261205-070000-abcdef", store.join("latest"))
            .expect("setup");
        assert_eq!(
            latest_record(&store),
            Some(store.join("builds/20261205-070000-abcdef"))
        );
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&store, &linked).expect("setup");
        assert_eq!(latest_record(&linked), None);
    }
}
