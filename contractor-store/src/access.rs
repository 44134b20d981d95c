//! Who may do what: build tokens and the paths each build may read and write.
//!
//! The invariant: with tokens switched on, a request is served only if it carries a token
//! from the [`TokenTable`], and then only within that token's build: it may write beneath
//! `builds/<id>/artifacts/` and read its own `source.tar`, `inputs/`, `artifacts/` and the
//! shared `cas/`. [`decide`] is the one place that rule is written, and it is pure, so it is
//! tested exhaustively without a server.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::path::{is_build_id, StorePath};

/// The build tokens the store accepts: token → build id.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    by_token: HashMap<String, String>,
    source: Option<PathBuf>,
}

// Never print the tokens themselves.
impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenTable")
            .field("tokens", &self.by_token.len())
            .field("source", &self.source)
            .finish()
    }
}

/// Shortest token accepted, in characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token or a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file cannot be read.
    #[error("cannot read token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A line of the token file is malformed.
    #[error("{path}:{line}: {problem}; each line must be '<build-id> <token>' (or blank, or a '#' comment)")]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A build id or token given to [`TokenTable::insert`] is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No randomness was available to make a token.
    #[error("cannot read random bytes from /dev/urandom")]
    Random(#[source] io::Error),
}

impl TokenTable {
    /// An empty table: every request is refused until tokens are added.
    pub fn new() -> TokenTable {
        TokenTable::default()
    }

    /// Accepts `token` for build `build`. Tokens are at least [`MIN_TOKEN_LEN`] characters of
    /// `A-Z a-z 0-9 - _ .`; build ids follow the store's build id rule.
    pub fn insert(&mut self, build: &str, token: &str) -> Result<(), TokenError> {
        check_entry(build, token).map_err(TokenError::Invalid)?;
        self.by_token.insert(token.to_string(), build.to_string());
        Ok(())
    }

    /// Reads a token file: one `<build-id> <token>` pair per line; blank lines and lines
    /// starting with `#` are ignored. The table remembers the file, and the server reads it
    /// again when it changes.
    pub fn load(path: &Path) -> Result<TokenTable, TokenError> {
        let read_error = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(read_error)?;
        let mut table = TokenTable::parse(&text, path)?;
        table.source = Some(path.to_path_buf());
        Ok(table)
    }

    /// Parses the text of a token file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TokenTable, TokenError> {
        let mut table = TokenTable::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line_error = |problem: String| TokenError::Line {
                path: path.to_path_buf(),
                line: number + 1,
                problem,
            };
            let mut words = line.split_whitespace();
            let (Some(build), Some(token), None) = (words.next(), words.next(), words.next())
            else {
                return Err(line_error(format!(
                    "expected two words, found {}",
                    line.split_whitespace().count()
                )));
            };
            check_entry(build, token).map_err(line_error)?;
            table.by_token.insert(token.to_string(), build.to_string());
        }
        Ok(table)
    }

    /// The build a token belongs to.
    pub fn build_for(&self, token: &str) -> Option<&str> {
        self.by_token.get(token).map(String::as_str)
    }

    /// The file the table was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// How many tokens the table holds.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether the table holds no token.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

fn check_entry(build: &str, token: &str) -> Result<(), String> {
    if !is_build_id(build) {
        return Err(format!(
            "build id {build:?} is not valid; use A-Z a-z 0-9 . _ - only"
        ));
    }
    if token.len() < MIN_TOKEN_LEN
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "the token for build {build:?} is not valid; use at least {MIN_TOKEN_LEN} \
             characters of A-Z a-z 0-9 - _ . (contractor-store token makes one)"
        ));
    }
    Ok(())
}

/// A new random token: 32 bytes from `/dev/urandom`, in hex.
pub fn generate_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(TokenError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET, HEAD, or a listing.
    Read,
    /// PUT.
    Write,
}

/// Whether the build `build` (the token's) may do `access` on `path`. The error is the
/// reason, for a 403 answer.
pub fn decide(build: &str, path: &StorePath, access: Access) -> Result<(), String> {
    let names = path.names();
    let own = names.len() >= 3 && names[0] == "builds" && names[1] == build;
    let area = if own { names[2].as_str() } else { "" };
    match access {
        Access::Write if own && area == "artifacts" && names.len() >= 4 => Ok(()),
        Access::Write => Err(format!(
            "refused: the token of build {build} may write only under \
             /builds/{build}/artifacts/, not {path}"
        )),
        Access::Read if names.first().map(String::as_str) == Some("cas") => Ok(()),
        Access::Read if own && names.len() == 3 && area == "source.tar" => Ok(()),
        Access::Read if own && (area == "inputs" || area == "artifacts") => Ok(()),
        Access::Read => Err(format!(
            "refused: the token of build {build} may read only /builds/{build}/source.tar, \
             /builds/{build}/inputs/, /builds/{build}/artifacts/ and /cas/, not {path}"
        )),
    }
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(build: &str, url: &str, access: Access) -> bool {
        decide(build, &StorePath::parse(url).expect("path"), access).is_ok()
    }

    #[test]
    fn a_build_writes_only_its_artifacts() {
        assert!(allowed("b1", "/builds/b1/artifacts/out", Access::Write));
        assert!(allowed("b1", "/builds/b1/artifacts/d/e/f", Access::Write));
        for url in [
            "/builds/b1/artifacts",
            "/builds/b1/source.tar",
            "/builds/b1/inputs/x",
            "/builds/b1/result.json",
            "/builds/b2/artifacts/out",
            "/cas/sha256/00",
            "/x",
            "/",
        ] {
            assert!(!allowed("b1", url, Access::Write), "{url}");
        }
    }

    #[test]
    fn a_build_reads_its_inputs_and_the_cache_only() {
        for url in [
            "/builds/b1/source.tar",
            "/builds/b1/inputs",
            "/builds/b1/inputs/dep.tar",
            "/builds/b1/artifacts/out",
            "/cas",
            "/cas/sha256/abc",
        ] {
            assert!(allowed("b1", url, Access::Read), "{url}");
        }
        for url in [
            "/builds/b2/source.tar",
            "/builds/b2/inputs/x",
            "/builds/b1/result.json",
            "/builds/b1/log.txt",
            "/builds/b1",
            "/builds/b1/source.tar/x",
            "/builds",
            "/",
            "/secret",
        ] {
            assert!(!allowed("b1", url, Access::Read), "{url}");
        }
    }

    #[test]
    fn the_reason_names_the_build_and_the_path() {
        let path = StorePath::parse("/builds/b2/artifacts/x").expect("path");
        let reason = decide("b1", &path, Access::Write).expect_err("refused");
        assert!(reason.contains("/builds/b1/artifacts/"), "{reason}");
        assert!(reason.contains("/builds/b2/artifacts/x"), "{reason}");
    }

    #[test]
    fn token_files_parse_and_bad_lines_are_named() {
        let path = Path::new("tokens.txt");
        let table = TokenTable::parse(
            "# comment\n\nb1 0123456789abcdef0123\n  b2   tok-tok-tok-tok-tok  \n",
            path,
        )
        .expect("valid");
        assert_eq!(table.len(), 2);
        assert_eq!(table.build_for("0123456789abcdef0123"), Some("b1"));
        assert_eq!(table.build_for("tok-tok-tok-tok-tok"), Some("b2"));
        assert_eq!(table.build_for("b1"), None);

        let err = TokenTable::parse("b1 0123456789abcdef0123\nb2\n", path).expect_err("one word");
        assert!(
            err.to_string()
                .starts_with("tokens.txt:2: expected two words"),
            "{err}"
        );
        let err = TokenTable::parse("b1 short\n", path).expect_err("short token");
        assert!(err.to_string().contains("at least 16"), "{err}");
        let err = TokenTable::parse("../x 0123456789abcdef0123\n", path).expect_err("bad id");
        assert!(err.to_string().contains("\"../x\""), "{err}");
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token().expect("token");
        let b = generate_token().expect("token");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let mut table = TokenTable::new();
        table.insert("b1", &a).expect("valid");
        assert_eq!(table.build_for(&a), Some("b1"));
        assert!(!format!("{table:?}").contains(&a), "Debug hides tokens");
    }

    #[test]
    fn bearer_headers_are_read() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer   abc "), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}
