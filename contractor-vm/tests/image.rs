//! `contractor-vm image` and `check` against the real binary, in a fresh data directory:
//! the answers are one JSON object each, mirrored strictly, and bad input is exit 2 with an
//! error object naming what is wrong. None of these builds an image or needs libvirt.

use std::process::{Command, Output};

/// `{"type":"images",...}` and `{"type":"removed",...}`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Images {
    r#type: String,
    version: u32,
    images: Vec<serde_json::Value>,
}

/// The error object of `--json-errors`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorObject {
    r#type: String,
    version: u32,
    code: String,
    chain: Vec<String>,
}

/// The probes of `check`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    ok: bool,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    error: Vec<String>,
}

/// `{"type":"check",...}`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    r#type: String,
    version: u32,
    uri: String,
    libvirt: Probe,
    cpu_virt: bool,
    dev_kvm: bool,
    agent: Probe,
}

fn run(data: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args(args)
        .env("CONTRACTOR_DATA_DIR", data)
        .env("CONTRACTOR_AGENT", data.join("no-agent"))
        .output()
        .expect("run contractor-vm")
}

fn one_line<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout}");
    serde_json::from_str(&stdout).expect("the documented object")
}

#[test]
fn an_empty_data_directory_lists_no_images() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = run(data.path(), &["image", "list"]);
    assert!(out.status.success(), "{out:?}");
    let images: Images = one_line(&out);
    assert_eq!((images.r#type.as_str(), images.version), ("images", 1));
    assert!(images.images.is_empty());
}

#[test]
fn bad_names_and_missing_images_are_exit_2_naming_them() {
    let data = tempfile::tempdir().expect("tempdir");
    for (args, code, says) in [
        (
            &["image", "build", "../etc"][..],
            "bad_image_name",
            "\"../etc\"",
        ),
        (
            &["image", "rm", "nothing-here"][..],
            "no_image",
            "nothing-here",
        ),
        (
            &[
                "image",
                "import",
                "debian-12-build",
                "--disk",
                "/d",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
            ][..],
            "built_image_name",
            "debian-12-build",
        ),
        (
            &[
                "image",
                "import",
                "mine",
                "--disk",
                "/nonexistent/d",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
            ][..],
            "bad_import",
            "/nonexistent/d",
        ),
    ] {
        let mut all = args.to_vec();
        all.push("--json-errors");
        let out = run(data.path(), &all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let error: ErrorObject = one_line(&out);
        assert_eq!((error.r#type.as_str(), error.version), ("error", 1));
        assert_eq!(error.code, code, "{args:?}");
        assert!(error.chain.join(": ").contains(says), "{args:?}: {error:?}");
    }
}

#[test]
fn building_without_the_agent_is_exit_3_saying_how_to_build_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = run(
        data.path(),
        &["image", "build", "debian-12-build", "--json-errors"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let error: ErrorObject = one_line(&out);
    assert_eq!(error.code, "no_agent");
    assert!(error.chain[0].contains("scripts/build-agent"), "{error:?}");
}

#[test]
fn check_reports_libvirt_kvm_and_the_agent() {
    let data = tempfile::tempdir().expect("tempdir");
    let uri = "qemu+unix:///system?socket=/nonexistent/contractor-test.sock";
    let out = run(data.path(), &["check", "--uri", uri]);
    assert!(out.status.success(), "{out:?}");
    let check: Check = one_line(&out);
    assert_eq!((check.r#type.as_str(), check.version), ("check", 1));
    assert_eq!(check.uri, uri);
    assert!(!check.libvirt.ok && !check.libvirt.error.is_empty());
    assert!(!check.agent.ok && check.agent.path.is_none());
    assert!(
        check.agent.error[0].contains("no-agent"),
        "{:?}",
        check.agent
    );
    let _ = (check.cpu_virt, check.dev_kvm, check.libvirt.path);
}
