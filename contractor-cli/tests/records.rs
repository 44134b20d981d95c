//! `contractor builds|show|log|downloads` against a hand-made record, no VM: the front end
//! asks the store (`contractor-store record list|show|downloads|log`) and renders its
//! answer with the words and exit codes users and scripts know. Needs the tools built beside
//! `contractor` (`cargo build --workspace`).

use std::path::{Path, PathBuf};
use std::process::Output;

const OLD: &str = "20261125-100000-aaaaaa";
const NEW: &str = "20261125-110000-bbbbbb";
const DOWNLOAD: &str = r#"{"type":"download","time":1764700000.123,"method":"GET","url":"http://deb.debian.org/x.deb","status":200,"size":2048,"sha256":"ab12","complete":true,"from_cache":true,"phase":"fetch"}"#;

struct Project {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Project {
    fn new() -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("project");
        std::fs::create_dir_all(&path).expect("mkdir");
        std::fs::write(path.join("contractor.toml"), "[build]\nscript = \"true\"\n").expect("spec");
        Project { path, _dir: dir }
    }

    fn record(&self, id: &str) -> PathBuf {
        self.path.join(".contractor/builds").join(id)
    }

    fn write(&self, relative: &str, bytes: &[u8]) {
        let path = self.path.join(".contractor/builds").join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    fn contractor(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_contractor"))
            .args(args)
            .current_dir(&self.path)
            .env("CONTRACTOR_DATA_DIR", self.path.join("no-data"))
            .output()
            .expect("run contractor")
    }

    /// A finished build with one artifact, one listed outside the record, and a download.
    fn finished(&self, outside: &Path) {
        let dir = self.record(OLD);
        self.write(
            &format!("{OLD}/build.log"),
            b"the log\n\x1b[31mred\x1b[0m\n",
        );
        self.write(&format!("{OLD}/console.log"), b"console\n");
        self.write(&format!("{OLD}/artifacts/hello"), b"abc");
        self.write(
            &format!("{OLD}/downloads.jsonl"),
            format!("{DOWNLOAD}\n").as_bytes(),
        );
        let result = serde_json::json!({
            "version": 1, "id": OLD, "outcome": "success", "exit_code": 0,
            "duration_secs": 2.5, "log": dir.join("build.log"),
            "console_log": dir.join("console.log"),
            "artifacts": [dir.join("artifacts/hello"), outside],
            "refused_hosts": ["evil.example"], "refused_offline": [],
            "upstream_failures": [], "limit": null, "error": null
        });
        self.write(&format!("{OLD}/result.json"), result.to_string().as_bytes());
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn builds_show_log_and_downloads_render_what_the_store_read() {
    let project = Project::new();
    let outside = project.path.join("not-an-artifact");
    std::fs::write(&outside, "a host file the record names").expect("write");
    project.finished(&outside);
    project.write(&format!("{NEW}/build.log"), b"running\n");

    let builds = project.contractor(&["builds"]);
    assert!(builds.status.success(), "{}", text(&builds.stderr));
    assert_eq!(
        text(&builds.stdout),
        format!(
            "BUILD                    STARTED             RESULT          DURATION\n\
             {NEW}   2026-11-25 11:00:00 running                -\n\
             {OLD}   2026-11-25 10:00:00 success             2.5s\n"
        )
    );

    let shown = project.contractor(&["show", OLD]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let shown = text(&shown.stdout);
    for line in [
        format!("build:     {OLD}"),
        "started:   2026-11-25 10:00:00".to_string(),
        "result:    success".to_string(),
        format!(
            "artifact:  {} (3 B) sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            project.record(OLD).join("artifacts/hello").display()
        ),
        // A path the result names outside its record is not read: missing.
        format!("artifact:  {} () sha256:(missing)", outside.display()),
        format!(
            "downloads: 1, 1 from the download cache (`contractor downloads {OLD}` lists them)"
        ),
        "refused:   evil.example".to_string(),
    ] {
        assert!(shown.lines().any(|l| l == line), "{line:?} not in\n{shown}");
    }
    let running = project.contractor(&["show"]);
    assert!(text(&running.stdout).contains("result:    running (no result.json yet)"));

    // The log as written, byte for byte.
    let log = project.contractor(&["log", OLD]);
    assert!(log.status.success(), "{}", text(&log.stderr));
    assert_eq!(log.stdout, b"the log\n\x1b[31mred\x1b[0m\n");
    let console = project.contractor(&["log", "--console", OLD]);
    assert_eq!(console.stdout, b"console\n");

    let downloads = project.contractor(&["downloads", OLD]);
    assert!(downloads.status.success(), "{}", text(&downloads.stderr));
    assert!(
        text(&downloads.stdout).contains(
            "GET    200    2.0 KiB  ab12  http://deb.debian.org/x.deb  (fetch, from the download cache)"
        ),
        "{}",
        text(&downloads.stdout)
    );
    let json = project.contractor(&["downloads", "--json", OLD]);
    let line: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON line");
    assert_eq!(line["url"], "http://deb.debian.org/x.deb");
    project.write(&format!("{NEW}/downloads.jsonl"), b"");
    let none = project.contractor(&["downloads"]);
    assert!(none.status.success());
    assert!(text(&none.stderr).contains("downloaded nothing through its proxy"));
}

#[test]
fn a_missing_build_is_the_users_input_and_an_unreadable_record_the_hosts() {
    let project = Project::new();
    for args in [&["show"][..], &["log"], &["downloads"], &["pin"]] {
        let out = project.contractor(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("contractor: no builds in ")
                && stderr.contains("run `contractor build` first")
                && stderr.lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
    project.write(&format!("{OLD}/build.log"), b"x");
    for id in ["nope", "../x"] {
        let out = project.contractor(&["show", id]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("{id:?}"))
                && stderr.contains("`contractor builds` lists them"),
            "{stderr}"
        );
    }
    // A log that is a link is refused, naming it (exit 3).
    std::fs::remove_file(project.record(OLD).join("build.log")).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", project.record(OLD).join("build.log")).expect("ln");
    let out = project.contractor(&["log"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("build.log: it is a symbolic link, not a regular file"),
        "{stderr}"
    );
}

#[test]
fn a_shell_in_a_build_without_a_readable_kept_vm_names_the_file_and_what_to_do() {
    let project = Project::new();
    let outside = project.path.join("not-an-artifact");
    project.finished(&outside);
    let file = format!("builds/{OLD}/vm.json");
    let out = project.contractor(&["shell", OLD]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("contractor: build {OLD} has no kept VM ("))
            && stderr.contains(&format!(
                "{file} is missing): run `contractor build --keep`"
            ))
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    // One the store cannot read (not a kept VM, or a link): named, still the user's to fix.
    project.write(&format!("{OLD}/vm.json"), b"{\"name\":1}");
    let out = project.contractor(&["shell", OLD]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("contractor: cannot read ") && stderr.contains(&file),
        "{stderr}"
    );
    std::fs::remove_file(project.record(OLD).join("vm.json")).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", project.record(OLD).join("vm.json")).expect("ln");
    let out = project.contractor(&["shell", OLD]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&file), "{}", text(&out.stderr));
}

#[test]
fn a_shell_or_doctor_refusing_a_hostile_name_shows_it_escaped() {
    // A spec path or a build host's name with a terminal escape in it: refused as the
    // user's input (exit 2) in the one way every command reports, never written raw.
    let project = Project::new();
    let file = project.path.join("\u{1b}[2J/contractor.toml");
    let file = file.to_str().expect("utf-8");
    for args in [
        &["shell", "-f", file][..],
        &["doctor", "--host", "\u{1b}[2Jx y"],
    ] {
        let out = project.contractor(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("contractor: ")
                && stderr.contains("[2J")
                && !stderr.contains('\u{1b}')
                && stderr.lines().count() == 1,
            "{args:?}: {stderr:?}"
        );
    }
}
