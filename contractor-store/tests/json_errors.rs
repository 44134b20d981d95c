//! `--json-errors`: a store that cannot start says why as one error object on stdout, with
//! the documented exit code; without the flag stdout stays empty.

use std::process::Command;

use contractor_protocol::error::ErrorObject;

fn store(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_contractor-store"))
        .args(args)
        .output()
        .expect("run contractor-store")
}

#[test]
fn a_missing_root_is_bad_input_with_an_error_object() {
    let out = store(&["--json-errors", "serve", "--root", "/nonexistent/store"]);
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("one error object");
    assert_eq!(error.code.as_str(), "bad_root");
    assert!(
        error.chain.join(": ").contains("/nonexistent/store"),
        "{:?}",
        error.chain
    );

    let quiet = store(&["serve", "--root", "/nonexistent/store"]);
    assert_eq!(quiet.status.code(), Some(2));
    assert!(quiet.stdout.is_empty());
}

#[test]
fn an_address_in_use_is_an_infrastructure_error_object() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path().to_str().expect("utf-8").to_string();
    let out = store(&["serve", "--json-errors", "--root", &root, "--listen", &addr]);
    assert_eq!(out.status.code(), Some(3));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("one error object");
    assert_eq!(error.code.as_str(), "serve");
    assert!(error.chain[0].contains(&addr), "{:?}", error.chain);
}
