//! `--json-errors`: a proxy that cannot start says why as one error object on stdout, with
//! the documented exit code; without the flag stdout stays empty.

use std::process::Command;

use contractor_protocol::error::ErrorObject;

fn proxy(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_contractor-proxy"))
        .args(args)
        .output()
        .expect("run contractor-proxy")
}

#[test]
fn an_invalid_rule_is_bad_input_with_an_error_object_naming_it() {
    let out = proxy(&["--json-errors", "--allow", "*foo.com"]);
    assert_eq!(out.status.code(), Some(2));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("one error object");
    assert!(
        error.code.as_str() == "bad_config" || error.code.as_str() == "bad_rule",
        "{}",
        error.code
    );
    assert!(
        error.chain.join(": ").contains("*foo.com"),
        "{:?}",
        error.chain
    );

    let quiet = proxy(&["--allow", "*foo.com"]);
    assert_eq!(quiet.status.code(), Some(2));
    assert!(quiet.stdout.is_empty());
}

#[test]
fn an_address_in_use_is_an_infrastructure_error_object() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = proxy(&["--json-errors", "--listen", &addr]);
    assert_eq!(out.status.code(), Some(3));
    let error: ErrorObject = serde_json::from_slice(&out.stdout).expect("one error object");
    assert_eq!(error.code.as_str(), "serve");
    assert!(error.chain.join(": ").contains(&addr), "{:?}", error.chain);
}
