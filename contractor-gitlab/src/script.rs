//! The stage script the runner wrote, and the script `contractor build` runs for it in the
//! VM: the runner's script base64-encoded inside a small `sh` wrapper, so that any bytes it
//! holds arrive unchanged, at most [`crate::MAX_STAGE_SCRIPT_BYTES`] of them.

use std::io::Read;
use std::path::Path;

use crate::{GitlabError, MAX_STAGE_SCRIPT_BYTES};

/// The stage script's text, at most [`MAX_STAGE_SCRIPT_BYTES`].
pub fn read_stage_script(path: &Path) -> Result<Vec<u8>, GitlabError> {
    let problem = |problem: String| GitlabError::Script {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| problem(e.to_string()))?;
    let mut text = Vec::new();
    file.take(MAX_STAGE_SCRIPT_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| problem(e.to_string()))?;
    if text.len() as u64 > MAX_STAGE_SCRIPT_BYTES {
        return Err(problem(format!(
            "it is over {MAX_STAGE_SCRIPT_BYTES} bytes, the most a stage script may have"
        )));
    }
    Ok(text)
}

/// The script the VM runs (with `sh -e` in the source's directory): the job's directory
/// path on the host made to lead there (the runner's script `cd`s to it), then the runner's
/// script, carried base64-encoded, run with bash.
pub fn vm_script(project_dir: &Path, stage_script: &[u8]) -> String {
    let dir = shell_quote(&project_dir.display().to_string());
    format!(
        "job_dir={dir}\n\
         if [ \"$job_dir\" != \"$PWD\" ]; then\n\
         \x20 if [ -e \"$job_dir\" ] && [ ! -L \"$job_dir\" ]; then\n\
         \x20   echo \"contractor: $job_dir exists in the builder image; set another builds_dir\" >&2; exit 1\n\
         \x20 fi\n\
         \x20 mkdir -p \"$(dirname \"$job_dir\")\" && ln -sfn \"$PWD\" \"$job_dir\"\n\
         fi\n\
         stage_script=$(mktemp)\n\
         base64 -d > \"$stage_script\" <<'CONTRACTOR_STAGE_SCRIPT'\n\
         {}CONTRACTOR_STAGE_SCRIPT\n\
         exec bash \"$stage_script\"\n",
        base64_lines(stage_script)
    )
}

/// `text` in single quotes for sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `bytes` in base64 (RFC 4648, with padding), in lines of 76 characters, each ending in a
/// newline, as `base64 -d` reads them.
fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 + 1);
    for line in encoded.as_bytes().chunks(76) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [
            ("", ""),
            ("f", "Zg==\n"),
            ("fo", "Zm8=\n"),
            ("foo", "Zm9v\n"),
            ("foob", "Zm9vYg==\n"),
            ("fooba", "Zm9vYmE=\n"),
            ("foobar", "Zm9vYmFy\n"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_lines(plain.as_bytes()), encoded);
        }
        let long = base64_lines(&[0u8; 60]);
        assert_eq!(long.lines().next().map(str::len), Some(76));
    }

    #[test]
    fn the_vm_script_recreates_the_job_directory_and_runs_the_stage_with_bash() {
        let dir = tempfile::tempdir().expect("test setup");
        let job = dir.path().join("it's here/p");
        let script = vm_script(&job, b"#!/usr/bin/env bash\ncd \"$JOB\" && pwd -P > out\n");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("test setup");
        let status = std::process::Command::new("sh")
            .args(["-e", "-c", &script])
            .current_dir(&work)
            .env("JOB", &job)
            .status()
            .expect("test setup");
        assert!(status.success());
        let out = std::fs::read_to_string(work.join("out")).expect("test setup");
        assert_eq!(
            out.trim(),
            work.canonicalize()
                .expect("test setup")
                .display()
                .to_string()
        );
    }

    #[test]
    fn the_largest_stage_script_fits_in_contractor_builds_script_file() {
        let script = vm_script(
            Path::new("/builds/0/g/p"),
            &vec![b'#'; MAX_STAGE_SCRIPT_BYTES as usize],
        );
        // contractor_spec::overrides::MAX_SCRIPT_FILE_BYTES.
        assert!(script.len() < 3 << 20, "{}", script.len());
        let dir = tempfile::tempdir().expect("test setup");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'#'; MAX_STAGE_SCRIPT_BYTES as usize + 1]).expect("setup");
        let err = read_stage_script(&big).expect_err("too big").to_string();
        assert!(err.contains("over 2097152 bytes"), "{err}");
    }
}
