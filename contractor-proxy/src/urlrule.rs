//! URL rules: allow rules finer than a host, for the requests the proxy can read (plain HTTP,
//! and HTTPS when it inspects TLS).
//!
//! A URL rule is `[METHOD ]scheme://host[:port]/path-pattern`:
//! `https://index.example.org/**`, `GET https://mirror.example.org/debian/pool/**`,
//! `http://dl.example.org/releases/*.tar.gz`. In the pattern `**` stands for any text and
//! `*` for any text without `/`; everything else is literal. The pattern is matched against
//! the request's path, percent-decoded, without its query. The host part is a host rule of
//! [`crate::allowlist`] without ports (`*.example.org` works); the port is the scheme's own
//! (80, 443) unless given, and it is among the ports the confined proxy may connect to.
//!
//! The path is read once, by [`CheckedPath::new`], and what the rule matched is what is
//! forwarded: the normalised form ([`CheckedPath::forwarded`]: escapes of unreserved
//! characters decoded, the other escapes kept with upper-case hex, the query as sent). A
//! path that cannot be read one way only is refused: a `.` or `..` segment (also
//! percent-encoded), a backslash or NUL, a `;` (path parameters: `/public/..;/private`), an
//! escape that decodes to `%` (double encoding: `%252e`), a bad escape. A server that
//! decodes the forwarded path once therefore sees exactly the decoded path the rule
//! matched, so a rule for `/public/**` cannot be walked out of.

use std::fmt;
use std::str::FromStr;

use crate::allowlist::HostRule;

/// The longest path pattern accepted.
pub const MAX_PATTERN_LEN: usize = 1024;
/// The longest method name accepted.
const MAX_METHOD_LEN: usize = 16;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP: forwarded requests with an absolute `http://` URI.
    Http,
    /// HTTPS: requests inside an inspected TLS session.
    Https,
}

impl Scheme {
    /// The port of URLs that name none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// One URL rule; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlRule {
    /// The one method allowed (upper case), or any.
    pub method: Option<String>,
    /// Which scheme.
    pub scheme: Scheme,
    /// Which hosts.
    pub host: HostRule,
    /// Which port.
    pub port: u16,
    /// The path pattern, starting with `/`.
    pub pattern: String,
}

impl UrlRule {
    /// Whether this rule's scheme, host and port are `scheme://host:port` (`host` already
    /// normalised): the rule may allow some of its requests.
    pub fn covers_host(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.scheme == scheme && self.port == port && self.host.matches(host)
    }

    /// Whether this rule allows `method` to `path` (the request target's path, percent-
    /// encoded as sent, with or without its query) on a host it covers; a path
    /// [`CheckedPath::new`] refuses is allowed by no rule.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        CheckedPath::new(path).is_ok_and(|path| self.allows_checked(method, &path))
    }

    /// Whether this rule allows `method` to the checked `path` on a host it covers.
    pub fn allows_checked(&self, method: &str, path: &CheckedPath) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        glob_matches(self.pattern.as_bytes(), &path.decoded)
    }
}

impl fmt::Display for UrlRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(method) = &self.method {
            write!(f, "{method} ")?;
        }
        write!(f, "{}://{}", self.scheme, self.host)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.pattern)
    }
}

/// True when `raw` is written as a URL rule (it has `://`), valid or not.
pub fn is_url_rule(raw: &str) -> bool {
    raw.contains("://")
}

/// An invalid URL rule: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid URL rule {rule:?}: {problem}; a URL rule is an optional method, http:// or \
     https://, a host (or *.host) with an optional port, and a path pattern in which ** is any \
     text and * any text without `/`: \"GET https://mirror.example.org/debian/pool/**\""
)]
pub struct UrlRuleError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for UrlRule {
    type Err = UrlRuleError;

    fn from_str(raw: &str) -> Result<Self, UrlRuleError> {
        let invalid = |problem: String| UrlRuleError {
            rule: raw.to_string(),
            problem,
        };
        let (method, url) = match raw.split_once(' ') {
            Some((method, url)) => (Some(method), url.trim_start()),
            None => (None, raw),
        };
        let method = match method {
            None => None,
            Some(m)
                if !m.is_empty()
                    && m.len() <= MAX_METHOD_LEN
                    && m.bytes().all(|b| b.is_ascii_uppercase()) =>
            {
                Some(m.to_string())
            }
            Some(m) => {
                return Err(invalid(format!(
                    "the method {m:?} is not an upper-case HTTP method (GET, HEAD, POST, ...)"
                )))
            }
        };
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            return Err(invalid("the scheme must be http:// or https://".into()));
        };
        let (authority, pattern) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => {
                return Err(invalid(
                    "the path pattern is missing (end with /** for every path)".into(),
                ))
            }
        };
        if authority.contains('@') {
            return Err(invalid(
                "a URL rule carries no user name or password".into(),
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => match bracketed.split_once(']') {
                Some((addr, "")) => (addr, None),
                Some((addr, after)) => (addr, Some(after.strip_prefix(':').unwrap_or(after))),
                None => (authority, None),
            },
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => scheme.default_port(),
            Some(port) => match port.parse::<u16>() {
                Ok(number) if number > 0 && port.bytes().all(|b| b.is_ascii_digit()) => number,
                _ => return Err(invalid(format!("the port {port:?} is not 1 to 65535"))),
            },
        };
        let host: HostRule = host
            .parse()
            .map_err(|e: crate::RuleError| invalid(e.problem.to_string()))?;
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(invalid(format!(
                "the path pattern is {} bytes; at most {MAX_PATTERN_LEN} are accepted",
                pattern.len()
            )));
        }
        if let Some(bad) = pattern
            .chars()
            .find(|&c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '\\' | '%'))
        {
            return Err(invalid(format!(
                "the path pattern contains {bad:?}; write the decoded path, without query, \
                 fragment, spaces or backslashes"
            )));
        }
        if pattern.split('/').any(|s| s == "." || s == "..") {
            return Err(invalid("the path pattern has a `.` or `..` segment".into()));
        }
        Ok(UrlRule {
            method,
            scheme,
            host,
            port,
            pattern: pattern.to_string(),
        })
    }
}

/// A request target's path read once for URL rules: decoded, for the rules to match, and
/// normalised, to be forwarded (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPath {
    /// The path percent-decoded, without the query.
    decoded: Vec<u8>,
    /// The path normalised, with the query as sent.
    forwarded: String,
}

/// Why a request path cannot be read one way only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// It does not start with `/`.
    #[error("does not start with `/`")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("has a `%` that is not followed by two hex digits")]
    BadEscape,
    /// An escape that decodes to `%`.
    #[error("is encoded twice (an escape decodes to `%`)")]
    DoubleEncoding,
    /// A `;`, raw or escaped.
    #[error("has a `;` (path parameters are read differently by different servers)")]
    Parameter,
    /// A `.` or `..` segment, raw or escaped.
    #[error("has a `.` or `..` segment")]
    DotSegment,
    /// A backslash or NUL, raw or escaped.
    #[error("has a backslash or NUL")]
    Separator,
}

impl CheckedPath {
    /// `target` (a request target in origin form: path, and maybe `?query`) read once.
    pub fn new(target: &str) -> Result<CheckedPath, PathProblem> {
        let (path, query) = match target.find(['?', '#']) {
            Some(at) => target.split_at(at),
            None => (target, ""),
        };
        let query = query.split('#').next().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(PathProblem::NotAbsolute);
        }
        let mut decoded = Vec::with_capacity(path.len());
        let mut forwarded = String::with_capacity(target.len());
        let mut bytes = path.bytes();
        while let Some(b) = bytes.next() {
            let byte = match b {
                b'%' => {
                    let hex = [
                        bytes.next().ok_or(PathProblem::BadEscape)?,
                        bytes.next().ok_or(PathProblem::BadEscape)?,
                    ];
                    let value = std::str::from_utf8(&hex)
                        .ok()
                        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                        .ok_or(PathProblem::BadEscape)?;
                    if value == b'%' {
                        return Err(PathProblem::DoubleEncoding);
                    }
                    if is_unreserved(value) {
                        forwarded.push(char::from(value));
                    } else {
                        forwarded.push_str(&format!("%{value:02X}"));
                    }
                    value
                }
                b => {
                    // The target came in as text: non-ASCII bytes are kept, escaped.
                    if b.is_ascii() {
                        forwarded.push(char::from(b));
                    } else {
                        forwarded.push_str(&format!("%{b:02X}"));
                    }
                    b
                }
            };
            match byte {
                b';' => return Err(PathProblem::Parameter),
                b'\\' | 0 => return Err(PathProblem::Separator),
                _ => decoded.push(byte),
            }
        }
        if decoded
            .split(|&b| b == b'/')
            .any(|segment| segment == b"." || segment == b"..")
        {
            return Err(PathProblem::DotSegment);
        }
        forwarded.push_str(query);
        Ok(CheckedPath { decoded, forwarded })
    }

    /// The target to forward: the normalised path and the query as sent.
    pub fn forwarded(&self) -> &str {
        &self.forwarded
    }
}

/// RFC 3986's unreserved characters: an escape of one means the character itself.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether `text` matches `pattern` (`**` any bytes, `*` any bytes but `/`), by dynamic
/// programming over the pattern: time pattern × text, no backtracking blow-up.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    // States are positions in the pattern; `reach[i]` says pattern[..i] matches the text so far.
    let tokens = tokens(pattern);
    let mut reach = vec![false; tokens.len() + 1];
    reach[0] = true;
    close_over_stars(&tokens, &mut reach);
    for &byte in text {
        let mut next = vec![false; tokens.len() + 1];
        for (i, token) in tokens.iter().enumerate() {
            if !reach[i] {
                continue;
            }
            match token {
                Token::Byte(b) if *b == byte => next[i + 1] = true,
                Token::Byte(_) => {}
                Token::Star if byte != b'/' => next[i] = true,
                Token::Star => {}
                Token::AnyStar => next[i] = true,
            }
        }
        close_over_stars(&tokens, &mut next);
        if !next.iter().any(|&r| r) {
            return false;
        }
        reach = next;
    }
    reach[tokens.len()]
}

#[derive(Debug, Clone, Copy)]
enum Token {
    Byte(u8),
    Star,
    AnyStar,
}

fn tokens(pattern: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut i = 0;
    while i < pattern.len() {
        match (pattern[i], pattern.get(i + 1)) {
            (b'*', Some(b'*')) => {
                tokens.push(Token::AnyStar);
                i += 2;
                while pattern.get(i) == Some(&b'*') {
                    i += 1;
                }
            }
            (b'*', _) => {
                tokens.push(Token::Star);
                i += 1;
            }
            (b, _) => {
                tokens.push(Token::Byte(b));
                i += 1;
            }
        }
    }
    tokens
}

/// A star may match nothing: every state before a star also reaches the state after it.
fn close_over_stars(tokens: &[Token], reach: &mut [bool]) {
    for i in 0..tokens.len() {
        if reach[i] && matches!(tokens[i], Token::Star | Token::AnyStar) {
            reach[i + 1] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(raw: &str) -> UrlRule {
        raw.parse().expect("a valid rule")
    }

    #[test]
    fn rules_parse_with_and_without_method_and_port() {
        let r = rule("GET https://Mirror.Example.org/debian/pool/**");
        assert_eq!(r.method.as_deref(), Some("GET"));
        assert_eq!(r.scheme, Scheme::Https);
        assert_eq!(r.host, HostRule::Exact("mirror.example.org".into()));
        assert_eq!(r.port, 443);
        assert_eq!(
            r.to_string(),
            "GET https://mirror.example.org/debian/pool/**"
        );
        let r = rule("http://*.example.org:8080/a/*.tar.gz");
        assert_eq!(
            (r.scheme, r.port, r.method.clone()),
            (Scheme::Http, 8080, None)
        );
        assert!(r.covers_host(Scheme::Http, "dl.example.org", 8080));
        assert!(!r.covers_host(Scheme::Http, "example.org", 8080));
        assert!(!r.covers_host(Scheme::Https, "dl.example.org", 8080));
        assert_eq!(r.to_string(), "http://*.example.org:8080/a/*.tar.gz");
    }

    #[test]
    fn invalid_rules_say_what_is_wrong() {
        for (raw, problem) in [
            ("get https://a.test/**", "upper-case"),
            ("ftp://a.test/**", "http:// or https://"),
            ("https://a.test", "path pattern is missing"),
            ("https://u@a.test/**", "user name"),
            ("https://a.test:99999/**", "1 to 65535"),
            ("https://a..test/**", "empty label"),
            ("https://a.test/x?y=1", "query"),
            ("https://a.test/a/../b", "`..`"),
            ("https://a.test/%2e%2e/b", "decoded path"),
        ] {
            let error = raw.parse::<UrlRule>().expect_err(raw).to_string();
            assert!(error.contains(problem), "{raw}: {error}");
            assert!(error.contains(&format!("{raw:?}")), "{error}");
        }
        let long = format!("https://a.test/{}", "a".repeat(MAX_PATTERN_LEN));
        assert!(long
            .parse::<UrlRule>()
            .expect_err("too long")
            .to_string()
            .contains("at most 1024"));
    }

    #[test]
    fn stars_match_within_a_segment_and_double_stars_across() {
        let r = rule("https://a.test/pool/*.deb");
        assert!(r.allows("GET", "/pool/hello_2.10.deb"));
        assert!(r.allows("GET", "/pool/.deb"));
        assert!(!r.allows("GET", "/pool/main/hello.deb"));
        assert!(!r.allows("GET", "/pool/hello.deb.sig"));
        let r = rule("GET https://a.test/pool/**");
        assert!(r.allows("GET", "/pool/main/h/hello/hello.deb"));
        assert!(r.allows("GET", "/pool/"));
        assert!(r.allows("GET", "/pool/x?query=/../../etc"));
        assert!(!r.allows("POST", "/pool/x"));
        assert!(!r.allows("GET", "/pool"));
        assert!(!r.allows("GET", "/other/pool/x"));
        let r = rule("https://a.test/a/**/z");
        assert!(!r.allows("GET", "/a/z"));
        assert!(r.allows("GET", "/a//z"));
        assert!(r.allows("GET", "/a/b/c/z"));
    }

    #[test]
    fn paths_that_walk_out_of_a_pattern_match_nothing() {
        let r = rule("https://a.test/public/**");
        assert!(r.allows("GET", "/public/file%20name"));
        for path in [
            "/public/../private",
            "/public/%2e%2e/private",
            "/public/%2E./private",
            "/public/./x",
            "/public/a\\..\\b",
            "/public/%5c..",
            "/public/%zz",
            "/public/%2",
            "/public/%00",
            "public/x",
        ] {
            assert!(!r.allows("GET", path), "{path}");
        }
        // An encoded slash is a slash: `*` does not cross it.
        let r = rule("https://a.test/public/*");
        assert!(!r.allows("GET", "/public/a%2Fb"));
    }

    #[test]
    fn path_parameters_and_double_encodings_match_nothing() {
        let r = rule("GET https://a.test/public/**");
        for (path, problem) in [
            ("/public/..;/private/x", PathProblem::Parameter),
            ("/public/x;jsessionid=1", PathProblem::Parameter),
            ("/public/x%3bparam", PathProblem::Parameter),
            ("/public/%252e%252e/private/x", PathProblem::DoubleEncoding),
            ("/public/%25", PathProblem::DoubleEncoding),
            ("/public/%2e%2e/private", PathProblem::DotSegment),
            ("/public%2F..%2Fprivate", PathProblem::DotSegment),
            ("/public/%5c", PathProblem::Separator),
            ("/public/%g1", PathProblem::BadEscape),
            ("*", PathProblem::NotAbsolute),
        ] {
            assert!(!r.allows("GET", path), "{path}");
            assert_eq!(CheckedPath::new(path), Err(problem), "{path}");
        }
        // A query is not the path: `;` and `%25` there are the server's business.
        assert!(r.allows("GET", "/public/x?a=1;b=%25"));
    }

    #[test]
    fn the_forwarded_path_is_the_normalised_one_the_rule_matched() {
        for (target, forwarded) in [
            ("/public/x", "/public/x"),
            ("/%70ublic/%7Ex%2dy", "/public/~x-y"),
            ("/public/a%2fb", "/public/a%2Fb"),
            (
                "/public/file%20name?q=%2e%2e",
                "/public/file%20name?q=%2e%2e",
            ),
            ("/public/%c3%a9", "/public/%C3%A9"),
        ] {
            let checked = CheckedPath::new(target).expect(target);
            assert_eq!(checked.forwarded(), forwarded, "{target}");
            // Read again, the forwarded form is the same path.
            let again = CheckedPath::new(checked.forwarded()).expect(forwarded);
            assert_eq!(again, checked, "{target}");
        }
        let r = rule("GET https://a.test/public/**");
        assert!(r.allows("GET", "/%70ublic/x"));
    }

    #[test]
    fn matching_is_linear_in_the_pattern_times_the_path() {
        let pattern = format!("https://a.test/{}", "*a".repeat(200));
        let r = rule(&pattern);
        let path = format!("/{}b", "a".repeat(8000));
        assert!(!r.allows("GET", &path));
    }
}
