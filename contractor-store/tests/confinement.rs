//! No request reads or writes outside the store root: every traversal form is refused, and
//! symlinks leading out are neither followed nor written through.

mod util;

use util::{Fixture, StoreProcess, SECRET};

/// Paths that try to reach `../secret.txt` (beside the root) in every spelling.
const TRAVERSALS: &[&str] = &[
    "/../secret.txt",
    "/builds/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/.%2e/secret.txt",
    "/%2e%2e%2fsecret.txt",
    "/..%2fsecret.txt",
    "/builds%2f..%2f..%2fsecret.txt",
    "/%2f..%2fsecret.txt",
    "/./../secret.txt",
    "/secret.txt%00",
    "/%00/../secret.txt",
    "/..%5csecret.txt",
    "/%5c..%5csecret.txt",
    "//../secret.txt",
];

#[test]
fn traversal_reads_are_refused_with_a_reason() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    for path in TRAVERSALS {
        let response = store.get(path);
        assert_eq!(response.status, 403, "GET {path}: {}", response.text());
        assert!(
            response.text().starts_with("refused: "),
            "GET {path}: {}",
            response.text()
        );
        assert!(
            !response.body.windows(SECRET.len()).any(|w| w == SECRET),
            "GET {path} leaked"
        );
        assert_eq!(store.head(path).status, 403, "HEAD {path}");
    }
}

#[test]
fn absolute_path_after_decoding_is_refused() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let absolute = fixture.dir.path().join("secret.txt");
    let encoded = absolute.to_string_lossy().replace('/', "%2f");
    let response = store.get(&format!("/{encoded}"));
    assert_eq!(response.status, 403, "{}", response.text());
    assert!(
        response.text().contains("encoded '/'"),
        "{}",
        response.text()
    );
}

#[test]
fn raw_backslash_is_refused() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let response = store.get("/..\\secret.txt");
    assert_eq!(response.status, 403, "{}", response.text());
    assert!(response.text().contains("backslash"), "{}", response.text());
    assert!(!response.body.windows(SECRET.len()).any(|w| w == SECRET));
}

#[test]
fn doubly_encoded_dots_are_a_plain_name_not_a_traversal() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    // %252e%252e decodes once to the literal name "%2e%2e", which does not exist.
    assert_eq!(store.get("/%252e%252e/secret.txt").status, 404);
}

#[test]
fn traversal_writes_are_refused_and_write_nothing() {
    let fixture = Fixture::new();
    let store = StoreProcess::start(&fixture.root);
    let attempts = [
        "/builds/b1/artifacts/../../../evil",
        "/builds/b1/artifacts/%2e%2e/%2e%2e/%2e%2e/evil",
        "/builds/b1/artifacts/..%2f..%2f..%2fevil",
        "/builds/b1/artifacts/%2fevil",
        "/builds/b1/artifacts/evil%00",
        "/builds/b1/artifacts/..%5c..%5cevil",
        "/builds/../artifacts/evil",
        "/builds/%2e%2e/artifacts/evil",
        "/builds/b1/artifacts/./evil",
    ];
    for path in attempts {
        let response = store.put(path, b"evil");
        assert_eq!(response.status, 403, "PUT {path}: {}", response.text());
    }
    assert!(fixture.files().is_empty(), "{:?}", fixture.files());
    let beside: Vec<_> = std::fs::read_dir(fixture.dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside.len(), 2, "{beside:?}"); // root/ and secret.txt
}

#[test]
fn symlink_to_outside_is_not_served() {
    let fixture = Fixture::new();
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), SECRET).expect("write");
    std::fs::create_dir_all(fixture.root.join("builds/b1")).expect("mkdir");
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        fixture.root.join("builds/b1/link"),
    )
    .expect("ln");
    std::os::unix::fs::symlink(outside.path(), fixture.root.join("outdir")).expect("ln");
    std::os::unix::fs::symlink("../secret.txt", fixture.root.join("relative")).expect("ln");
    let store = StoreProcess::start(&fixture.root);

    for path in ["/builds/b1/link", "/outdir/secret", "/relative"] {
        let response = store.get(path);
        assert_eq!(response.status, 403, "GET {path}: {}", response.text());
        assert!(
            !response.body.windows(SECRET.len()).any(|w| w == SECRET),
            "GET {path} leaked"
        );
        assert_eq!(store.head(path).status, 403, "HEAD {path}");
    }
}

#[test]
fn symlink_within_the_root_is_served() {
    let fixture = Fixture::new();
    fixture.write("builds/b1/source.tar", b"tarball");
    std::os::unix::fs::symlink("b1", fixture.root.join("builds/latest")).expect("ln");
    let store = StoreProcess::start(&fixture.root);
    let response = store.get("/builds/latest/source.tar");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"tarball");
}

#[test]
fn put_does_not_write_through_a_symlinked_directory() {
    let fixture = Fixture::new();
    let outside = tempfile::tempdir().expect("outside");
    std::fs::create_dir_all(fixture.root.join("builds/b1")).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), fixture.root.join("builds/b1/artifacts"))
        .expect("ln");
    std::os::unix::fs::symlink(outside.path(), fixture.root.join("builds/b2")).expect("ln");
    let store = StoreProcess::start(&fixture.root);

    for path in [
        "/builds/b1/artifacts/evil",
        "/builds/b1/artifacts/sub/evil",
        "/builds/b2/artifacts/evil",
    ] {
        let response = store.put(path, b"evil");
        assert_eq!(response.status, 403, "PUT {path}: {}", response.text());
        assert!(response.text().contains("symlink"), "{}", response.text());
    }
    assert_eq!(std::fs::read_dir(outside.path()).expect("list").count(), 0);
}
