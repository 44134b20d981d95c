//! Turning a request's URL path into a path under the store root, without touching the disk.
//!
//! The invariant: a [`StorePath`] is a list of plain names, each one percent-decoded exactly
//! once, none empty, `.` or `..`, and none holding a `/`, a `\` or a NUL byte. Joining such
//! names onto the root can only name something beneath the root, lexically. Symlinks are the
//! one way out that a lexical check cannot see; [`crate::files`] deals with them.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a URL path was refused. Every variant is a client error (403): the message says which
/// segment and why, and is sent back in the response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path did not start with `/` (for example `*` or an empty path).
    #[error("the path must start with '/'")]
    NotAbsolute,
    /// `//` or a trailing `/`: an empty segment names nothing.
    #[error("empty path segment (a doubled or trailing '/')")]
    EmptySegment,
    /// `%` not followed by two hex digits.
    #[error("bad percent-encoding in segment {segment:?}")]
    BadEscape {
        /// The segment as it arrived.
        segment: String,
    },
    /// The segment decodes to `.` or `..` (written plainly or as `%2e`).
    #[error("segment {segment:?} is '.' or '..'; paths may not step out of a directory")]
    DotSegment {
        /// The segment as it arrived.
        segment: String,
    },
    /// The segment decodes to something holding `/` (`%2f`), which would hide a separator
    /// or an absolute path inside one name.
    #[error("segment {segment:?} holds an encoded '/'")]
    EncodedSlash {
        /// The segment as it arrived.
        segment: String,
    },
    /// A `\` in a segment, plain or encoded.
    #[error("segment {segment:?} holds a backslash")]
    Backslash {
        /// The segment as it arrived.
        segment: String,
    },
    /// A NUL byte (`%00`) in a segment.
    #[error("segment {segment:?} holds a NUL byte")]
    Nul {
        /// The segment as it arrived.
        segment: String,
    },
    /// The decoded bytes are not UTF-8.
    #[error("segment {segment:?} does not decode to UTF-8")]
    NotUtf8 {
        /// The segment as it arrived.
        segment: String,
    },
}

/// A request path, checked and decoded: plain names relative to the store root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePath {
    names: Vec<String>,
}

impl StorePath {
    /// Checks and decodes a URL path (without its query string). `/` is the root itself.
    pub fn parse(url_path: &str) -> Result<StorePath, PathError> {
        let rest = url_path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
        if rest.is_empty() {
            return Ok(StorePath { names: Vec::new() });
        }
        let names = rest
            .split('/')
            .map(decode_segment)
            .collect::<Result<_, _>>()?;
        Ok(StorePath { names })
    }

    /// The decoded names, outermost first.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// This path beneath `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(&self.names);
        path
    }

    /// Whether a client may write here: `builds/<id>/artifacts/<one or more names>`, where
    /// the build id is made of `A-Z a-z 0-9 . _ -` only.
    pub fn is_artifact(&self) -> bool {
        match self.names.as_slice() {
            [builds, id, artifacts, _, ..] => {
                builds == "builds" && is_build_id(id) && artifacts == "artifacts"
            }
            _ => false,
        }
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.names.join("/"))
    }
}

/// Checks and decodes `url_path` and joins it onto `root`. Pure: it does not look at the
/// disk, so it cannot see symlinks.
pub fn resolve(root: &Path, url_path: &str) -> Result<PathBuf, PathError> {
    StorePath::parse(url_path).map(|path| path.under(root))
}

/// Whether `id` is a valid build id: non-empty, `A-Z a-z 0-9 . _ -` only, not `.` or `..`.
pub fn is_build_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Decodes one segment exactly once and checks the result is a plain name.
fn decode_segment(segment: &str) -> Result<String, PathError> {
    let owned = || segment.to_string();
    if segment.is_empty() {
        return Err(PathError::EmptySegment);
    }
    let decoded = percent_decode(segment.as_bytes())
        .ok_or_else(|| PathError::BadEscape { segment: owned() })?;
    if decoded.contains(&b'\0') {
        return Err(PathError::Nul { segment: owned() });
    }
    if decoded.contains(&b'/') {
        return Err(PathError::EncodedSlash { segment: owned() });
    }
    if decoded.contains(&b'\\') {
        return Err(PathError::Backslash { segment: owned() });
    }
    if decoded == b"." || decoded == b".." {
        return Err(PathError::DotSegment { segment: owned() });
    }
    String::from_utf8(decoded).map_err(|_| PathError::NotUtf8 { segment: owned() })
}

/// `%XX` to the byte it stands for; `None` if a `%` is not followed by two hex digits.
fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let high = hex_value(bytes.next()?)?;
            let low = hex_value(bytes.next()?)?;
            out.push(high << 4 | low);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/srv/store";

    fn ok(url: &str) -> PathBuf {
        resolve(Path::new(ROOT), url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str) -> PathError {
        match resolve(Path::new(ROOT), url) {
            Ok(path) => panic!("{url} was accepted as {}", path.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_paths_join_onto_the_root() {
        assert_eq!(ok("/"), PathBuf::from(ROOT));
        assert_eq!(
            ok("/builds/b1/source.tar"),
            PathBuf::from("/srv/store/builds/b1/source.tar")
        );
        assert_eq!(ok("/a.b/c-d/e_f"), PathBuf::from("/srv/store/a.b/c-d/e_f"));
    }

    #[test]
    fn names_that_merely_contain_dots_are_fine() {
        assert_eq!(ok("/..."), PathBuf::from("/srv/store/..."));
        assert_eq!(ok("/..a"), PathBuf::from("/srv/store/..a"));
        assert_eq!(ok("/a.."), PathBuf::from("/srv/store/a.."));
        assert_eq!(ok("/.hidden"), PathBuf::from("/srv/store/.hidden"));
    }

    #[test]
    fn percent_encoding_is_decoded() {
        assert_eq!(ok("/with%20space"), PathBuf::from("/srv/store/with space"));
        assert_eq!(ok("/%41%62c"), PathBuf::from("/srv/store/Abc"));
        assert_eq!(ok("/caf%C3%A9"), PathBuf::from("/srv/store/café"));
    }

    #[test]
    fn percent_encoding_is_decoded_exactly_once() {
        // %25 is '%': the result is the literal name "%2e%2e", not "..".
        assert_eq!(ok("/%252e%252e"), PathBuf::from("/srv/store/%2e%2e"));
        assert_eq!(ok("/a/%252f"), PathBuf::from("/srv/store/a/%2f"));
        assert_eq!(ok("/%2500"), PathBuf::from("/srv/store/%00"));
    }

    #[test]
    fn dot_dot_segments_are_refused() {
        for url in [
            "/..",
            "/../etc/passwd",
            "/builds/../../etc",
            "/a/..",
            "/a/../b",
        ] {
            assert!(
                matches!(refused(url), PathError::DotSegment { .. }),
                "{url}"
            );
        }
    }

    #[test]
    fn dot_segments_are_refused() {
        for url in ["/.", "/./a", "/a/./b", "/a/."] {
            assert!(
                matches!(refused(url), PathError::DotSegment { .. }),
                "{url}"
            );
        }
    }

    #[test]
    fn encoded_dot_dot_is_refused_in_every_case_mix() {
        for url in [
            "/%2e%2e/etc",
            "/%2E%2E/etc",
            "/.%2e/etc",
            "/%2e./etc",
            "/a/%2e",
            "/%2E",
        ] {
            assert!(
                matches!(refused(url), PathError::DotSegment { .. }),
                "{url}"
            );
        }
    }

    #[test]
    fn encoded_slash_is_refused() {
        for url in [
            "/a%2fb",
            "/a%2Fb",
            "/..%2f..%2fetc",
            "/%2e%2e%2fetc",
            "/builds/x/artifacts/%2f",
        ] {
            assert!(
                matches!(refused(url), PathError::EncodedSlash { .. }),
                "{url}"
            );
        }
    }

    #[test]
    fn absolute_path_after_decoding_is_refused() {
        assert!(matches!(
            refused("/%2fetc/passwd"),
            PathError::EncodedSlash { .. }
        ));
        assert!(matches!(
            refused("/%2F%2Fetc"),
            PathError::EncodedSlash { .. }
        ));
    }

    #[test]
    fn nul_bytes_are_refused() {
        for url in ["/a%00", "/%00", "/file.txt%00.png"] {
            assert!(matches!(refused(url), PathError::Nul { .. }), "{url}");
        }
    }

    #[test]
    fn backslashes_are_refused_plain_or_encoded() {
        for url in ["/a\\b", "/..\\..\\etc", "/a%5cb", "/%5C..%5C"] {
            assert!(matches!(refused(url), PathError::Backslash { .. }), "{url}");
        }
    }

    #[test]
    fn bad_escapes_are_refused() {
        for url in ["/%", "/%2", "/%zz", "/a%g0", "/%%2e"] {
            assert!(matches!(refused(url), PathError::BadEscape { .. }), "{url}");
        }
    }

    #[test]
    fn empty_segments_are_refused() {
        for url in ["//", "//etc/passwd", "/a//b", "/a/"] {
            assert_eq!(refused(url), PathError::EmptySegment, "{url}");
        }
    }

    #[test]
    fn paths_must_start_with_a_slash() {
        for url in ["", "*", "etc/passwd", "../x"] {
            assert_eq!(refused(url), PathError::NotAbsolute, "{url:?}");
        }
    }

    #[test]
    fn non_utf8_is_refused() {
        assert!(matches!(refused("/%ff%fe"), PathError::NotUtf8 { .. }));
    }

    #[test]
    fn the_error_names_the_segment_as_sent() {
        let message = refused("/ok/%2e%2e/x").to_string();
        assert!(message.contains("%2e%2e"), "{message}");
    }

    #[test]
    fn resolved_paths_stay_under_the_root() {
        let urls = ["/a", "/a/b/c", "/%2e%2e%2e", "/...", "/%252e%252e/x"];
        for url in urls {
            let path = ok(url);
            assert!(path.starts_with(ROOT), "{url} -> {}", path.display());
            assert!(path
                .components()
                .all(|c| !matches!(c, std::path::Component::ParentDir)));
        }
    }

    fn artifact(url: &str) -> bool {
        StorePath::parse(url)
            .map(|p| p.is_artifact())
            .unwrap_or(false)
    }

    #[test]
    fn writes_are_allowed_only_under_build_artifacts() {
        assert!(artifact("/builds/b1/artifacts/hello"));
        assert!(artifact(
            "/builds/2024-01-01_x.y/artifacts/dir/sub/file.bin"
        ));
        assert!(!artifact("/builds/b1/artifacts"));
        assert!(!artifact("/builds/b1/source.tar"));
        assert!(!artifact("/builds/b1/artifact/hello"));
        assert!(!artifact("/builds/b1"));
        assert!(!artifact("/other/b1/artifacts/hello"));
        assert!(!artifact("/hello"));
        assert!(!artifact("/"));
    }

    #[test]
    fn build_ids_are_restricted() {
        assert!(
            artifact("/builds/%41bc/artifacts/x"),
            "decoded id 'Abc' is valid"
        );
        assert!(!artifact("/builds/a%20b/artifacts/x"));
        assert!(!artifact("/builds/a+b/artifacts/x"));
        assert!(!artifact("/builds/caf%C3%A9/artifacts/x"));
        assert!(!artifact("/builds/../artifacts/x"));
        assert!(!is_build_id("."));
        assert!(!is_build_id(".."));
        assert!(!is_build_id(""));
        assert!(is_build_id("..."));
        assert!(is_build_id("A-z_0.9"));
    }

    #[test]
    fn display_shows_the_decoded_path() {
        let path = StorePath::parse("/a%20b/c").expect("valid");
        assert_eq!(path.to_string(), "/a b/c");
        assert_eq!(path.names(), ["a b", "c"]);
    }
}
