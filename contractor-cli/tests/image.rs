//! `contractor image build` of a name no recipe builds, no VM: contractor-vm refuses it
//! (naming the value and the images it builds) and the front end reports its words, exit 2.
//! Needs the tools built beside `contractor` (`cargo build --workspace`).

#[test]
fn an_unknown_image_is_refused_in_contractor_vms_words() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_contractor"))
        .args(["image", "build", "no-such-image"])
        .env("CONTRACTOR_DATA_DIR", data.path())
        .output()
        .expect("run contractor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "contractor: contractor-vm failed (exit code 2): no image no-such-image: Contractor \
             builds debian-12-build, debian-13-build, and others are imported with \
             `contractor-vm image import no-such-image"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}
