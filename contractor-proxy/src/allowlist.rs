//! The host allowlist: which host names a client may ask the proxy to reach.
//!
//! A rule is an exact host (`example.org`, or an IP address) or a wildcard for subdomains
//! (`*.example.org`, which does not match `example.org` itself). The invariant: every rule
//! held by an [`Allowlist`] is valid and in the normal form of [`normalize_host`], so
//! matching a normalised request host is plain string comparison.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The longest host name DNS can carry, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// The longest label of a host name.
const MAX_LABEL_LEN: usize = 63;

/// One allowlist rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// `example.org` or `192.0.2.7`: that host only.
    Exact(String),
    /// `*.example.org`: any subdomain of `example.org` (held without the `*.`), not
    /// `example.org` itself.
    Subdomains(String),
}

impl HostRule {
    /// Whether this rule allows `host`, which must already be normalised.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostRule::Exact(exact) => host == exact,
            HostRule::Subdomains(base) => {
                // An IP address has no subdomains, even when it looks like one.
                host.parse::<IpAddr>().is_err()
                    && host
                        .strip_suffix(base.as_str())
                        .and_then(|prefix| prefix.strip_suffix('.'))
                        .is_some_and(|label| !label.is_empty())
            }
        }
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostRule::Exact(host) => f.write_str(host),
            HostRule::Subdomains(base) => write!(f, "*.{base}"),
        }
    }
}

impl FromStr for HostRule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, RuleError> {
        let invalid = |problem| RuleError {
            rule: raw.to_string(),
            problem,
        };
        let host = normalize_host(raw);
        if host.is_empty() {
            return Err(invalid(RuleProblem::Empty));
        }
        if host.parse::<IpAddr>().is_ok() {
            return Ok(HostRule::Exact(host));
        }
        if let Some(base) = host.strip_prefix("*.") {
            if base.is_empty() {
                return Err(invalid(RuleProblem::Wildcard));
            }
            check_name(base).map_err(invalid)?;
            return Ok(HostRule::Subdomains(base.to_string()));
        }
        check_name(&host).map_err(invalid)?;
        Ok(HostRule::Exact(host))
    }
}

/// An invalid allowlist rule: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid allowlist rule {rule:?}: {problem}; a rule is a host name (example.org), \
     `*.` and a host name for its subdomains only (*.example.org), or an IP address"
)]
pub struct RuleError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong with it.
    pub problem: RuleProblem,
}

/// What is wrong with an allowlist rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// Nothing to match.
    #[error("it is empty")]
    Empty,
    /// `*` anywhere but as the whole first label before a host name.
    #[error("`*` is only accepted as the whole first label, followed by a host name")]
    Wildcard,
    /// `host:port`: ports are a separate setting.
    #[error("it has a port; allow ports with --allow-port")]
    Port,
    /// A character no host name contains: a space, a slash, ...
    #[error("it contains {0:?}, which a host name cannot contain")]
    Character(char),
    /// `a..b` or `.example.org`.
    #[error("it has an empty label")]
    EmptyLabel,
    /// A label that starts or ends with `-`.
    #[error("a label starts or ends with `-`")]
    Hyphen,
    /// A label longer than 63 characters, or a name longer than 253.
    #[error("it is too long for a host name")]
    TooLong,
}

/// The hosts a client may reach. Empty means nothing is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<HostRule>,
}

impl Allowlist {
    /// Parses rules as given on the command line or in `contractor.toml`; fails on the first
    /// invalid one.
    pub fn parse<I>(rules: I) -> Result<Allowlist, RuleError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let rules = rules
            .into_iter()
            .map(|rule| rule.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(Allowlist { rules })
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    /// The first rule that allows `host` (any spelling: it is normalised here).
    pub fn find(&self, host: &str) -> Option<&HostRule> {
        let host = normalize_host(host);
        self.rules.iter().find(|rule| rule.matches(&host))
    }
}

/// The form hosts are compared in: lower case, without one trailing dot, IPv6 addresses
/// without brackets and in their canonical spelling.
pub fn normalize_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match unbracketed.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_string(),
    }
}

/// Checks that a normalised `name` is a host name: labels of letters, digits, `-` and `_`.
fn check_name(name: &str) -> Result<(), RuleProblem> {
    if name.contains('*') {
        return Err(RuleProblem::Wildcard);
    }
    let is_host_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if let Some(bad) = name.chars().find(|&c| !is_host_char(c)) {
        return Err(RuleProblem::Character(bad));
    }
    if name.contains(':') {
        return Err(RuleProblem::Port);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(RuleProblem::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(RuleProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(RuleProblem::TooLong);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(RuleProblem::Hyphen);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist(rules: &[&str]) -> Allowlist {
        Allowlist::parse(rules).expect("valid rules")
    }

    fn problem(rule: &str) -> RuleProblem {
        let err = rule.parse::<HostRule>().expect_err(rule);
        assert_eq!(err.rule, rule);
        err.problem
    }

    #[test]
    fn exact_rule_matches_only_that_host() {
        let list = allowlist(&["example.org"]);
        assert!(list.find("example.org").is_some());
        assert!(list.find("www.example.org").is_none());
        assert!(list.find("notexample.org").is_none());
        assert!(list.find("example.org.evil.com").is_none());
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_domain_itself() {
        let list = allowlist(&["*.example.org"]);
        assert!(list.find("a.example.org").is_some());
        assert!(list.find("a.b.example.org").is_some());
        assert!(list.find("example.org").is_none());
        assert!(list.find("badexample.org").is_none());
        assert!(list.find(".example.org").is_none());
    }

    #[test]
    fn hosts_and_rules_compare_lower_cased_without_trailing_dot() {
        let list = allowlist(&["Deb.Debian.ORG."]);
        assert_eq!(list.rules(), [HostRule::Exact("deb.debian.org".into())]);
        assert!(list.find("DEB.debian.org.").is_some());
        assert!(allowlist(&["*.Example.org"])
            .find("WWW.EXAMPLE.ORG")
            .is_some());
    }

    #[test]
    fn ip_address_rules_match_only_that_address() {
        let list = allowlist(&["127.0.0.1", "[::1]", "*.0.0.1"]);
        assert_eq!(
            list.find("127.0.0.1"),
            Some(&HostRule::Exact("127.0.0.1".into()))
        );
        assert_eq!(list.find("[::1]"), Some(&HostRule::Exact("::1".into())));
        assert!(list.find("::1").is_some());
        // The wildcard rule is a name; it never matches an address that looks like one.
        assert!(list.find("10.0.0.1").is_none());
        assert!(list.find("a.0.0.1").is_some());
    }

    #[test]
    fn rule_displays_as_written() {
        assert_eq!(
            allowlist(&["*.example.org"]).rules()[0].to_string(),
            "*.example.org"
        );
        assert_eq!(
            allowlist(&["example.org"]).rules()[0].to_string(),
            "example.org"
        );
    }

    #[test]
    fn invalid_rules_name_the_problem() {
        assert_eq!(problem(""), RuleProblem::Empty);
        assert_eq!(problem("."), RuleProblem::Empty);
        assert_eq!(problem("*"), RuleProblem::Wildcard);
        assert_eq!(problem("*."), RuleProblem::Wildcard);
        assert_eq!(problem("a.*.b"), RuleProblem::Wildcard);
        assert_eq!(problem("*foo.com"), RuleProblem::Wildcard);
        assert_eq!(problem("*.*.foo.com"), RuleProblem::Wildcard);
        assert_eq!(problem("foo.*"), RuleProblem::Wildcard);
        assert_eq!(problem("example.org:443"), RuleProblem::Port);
        assert_eq!(problem("example.org/path"), RuleProblem::Character('/'));
        assert_eq!(problem("http://example.org"), RuleProblem::Character('/'));
        assert_eq!(problem("exa mple.org"), RuleProblem::Character(' '));
        assert_eq!(problem(" example.org"), RuleProblem::Character(' '));
        assert_eq!(problem("example..org"), RuleProblem::EmptyLabel);
        assert_eq!(problem(".example.org"), RuleProblem::EmptyLabel);
        assert_eq!(problem("-example.org"), RuleProblem::Hyphen);
        assert_eq!(
            problem(&format!("{}.org", "a".repeat(64))),
            RuleProblem::TooLong
        );
        assert_eq!(problem(&["abc"; 64].join(".")), RuleProblem::TooLong);
    }

    #[test]
    fn rule_error_names_the_rule_and_what_is_accepted() {
        let message = Allowlist::parse(["example.org", "*foo.com"])
            .expect_err("invalid")
            .to_string();
        assert!(message.contains("\"*foo.com\""), "{message}");
        assert!(message.contains("*.example.org"), "{message}");
        assert!(message.contains("IP address"), "{message}");
    }

    #[test]
    fn normalize_host_brackets_and_canonical_ipv6() {
        assert_eq!(normalize_host("[::FFFF:127.0.0.1]"), "::ffff:127.0.0.1");
        assert_eq!(normalize_host("[0:0:0:0:0:0:0:1]"), "::1");
        assert_eq!(normalize_host("Example.ORG."), "example.org");
    }
}
