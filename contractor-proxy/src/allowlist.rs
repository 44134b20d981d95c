//! Host rules: which host names (and ports) a client may, or may not, ask the proxy to reach.
//!
//! A rule is an exact host (`example.org`, or an IP address) or a wildcard for subdomains
//! (`*.example.org`, which does not match `example.org` itself), optionally followed by the
//! ports it covers (`example.org:443,8443`). The same rules make the allowlist and the deny
//! list. The invariant: every rule held by an [`Allowlist`] is valid and in the normal form
//! of [`normalize_host`] (lower case, no trailing dot, international names in punycode,
//! numeric IPv4 spellings such as `0x7f.1` turned into dotted quads), so matching a
//! normalised request host is plain string comparison.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// The longest host name DNS can carry, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// The longest label of a host name.
const MAX_LABEL_LEN: usize = 63;

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// `example.org` or `192.0.2.7`: that host only.
    Exact(String),
    /// `*.example.org`: any subdomain of `example.org` (held without the `*.`), not
    /// `example.org` itself.
    Subdomains(String),
}

impl HostRule {
    /// Whether this rule covers `host`, which must already be normalised.
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
            HostRule::Exact(host) if host.contains(':') => write!(f, "[{host}]"),
            HostRule::Exact(host) => f.write_str(host),
            HostRule::Subdomains(base) => write!(f, "*.{base}"),
        }
    }
}

/// One rule: a host pattern and, optionally, the ports it is limited to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which hosts.
    pub host: HostRule,
    /// Which ports; `None` means the proxy's allowed ports (for an allow rule) or every
    /// port (for a deny rule).
    pub ports: Option<BTreeSet<u16>>,
}

impl Rule {
    /// Whether this rule names `port`; a rule without ports answers `default`.
    pub fn covers_port(&self, port: u16, default: bool) -> bool {
        self.ports
            .as_ref()
            .map_or(default, |ports| ports.contains(&port))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.host)?;
        if let Some(ports) = &self.ports {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            write!(f, ":{}", ports.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for HostRule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, RuleError> {
        let rule: Rule = raw.parse()?;
        match rule.ports {
            None => Ok(rule.host),
            Some(_) => Err(RuleError {
                rule: raw.to_string(),
                problem: RuleProblem::Ports,
            }),
        }
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, RuleError> {
        let invalid = |problem| RuleError {
            rule: raw.to_string(),
            problem,
        };
        let (host, ports) = split_ports(raw).map_err(invalid)?;
        let ports = ports.map(parse_ports).transpose().map_err(invalid)?;
        let host = parse_host_rule(host).map_err(invalid)?;
        Ok(Rule { host, ports })
    }
}

/// `host` and the text after its port colon, if any; a bare IPv6 address has no ports.
fn split_ports(raw: &str) -> Result<(&str, Option<&str>), RuleProblem> {
    if let Some(rest) = raw.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or(RuleProblem::Host(HostProblem::Character('[')))?;
        return match after {
            "" => Ok((addr, None)),
            _ => match after.strip_prefix(':') {
                Some(ports) => Ok((addr, Some(ports))),
                None => Err(RuleProblem::Host(HostProblem::Character(']'))),
            },
        };
    }
    if raw.matches(':').count() > 1 {
        return Ok((raw, None));
    }
    Ok(match raw.split_once(':') {
        Some((host, ports)) => (host, Some(ports)),
        None => (raw, None),
    })
}

fn parse_ports(list: &str) -> Result<BTreeSet<u16>, RuleProblem> {
    list.split(',')
        .map(str::trim)
        .map(|port| match port.parse::<u16>() {
            // Digits only: u16's parser would also take `+443`.
            Ok(number) if number > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(number),
            _ => Err(RuleProblem::Ports),
        })
        .collect()
}

fn parse_host_rule(raw: &str) -> Result<HostRule, RuleProblem> {
    if raw.is_empty() || raw == "." {
        return Err(RuleProblem::Empty);
    }
    if let Some(base) = raw.strip_prefix("*.") {
        if base.is_empty() || base == "." {
            return Err(RuleProblem::Wildcard);
        }
        if base.contains('*') {
            return Err(RuleProblem::Wildcard);
        }
        let base = normalize_host(base).map_err(RuleProblem::Host)?;
        if base.parse::<IpAddr>().is_ok() {
            return Err(RuleProblem::WildcardAddress);
        }
        return Ok(HostRule::Subdomains(base));
    }
    if raw.contains('*') {
        return Err(RuleProblem::Wildcard);
    }
    Ok(HostRule::Exact(
        normalize_host(raw).map_err(RuleProblem::Host)?,
    ))
}

/// An invalid rule: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rule {rule:?}: {problem}; a rule is a host name (example.org), `*.` and a host \
     name for its subdomains only (*.example.org), or an IP address, optionally followed by \
     `:` and its ports (example.org:443,8443)"
)]
pub struct RuleError {
    /// The rule as given.
    pub rule: String,
    /// What is wrong with it.
    pub problem: RuleProblem,
}

/// What is wrong with a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// Nothing to match.
    #[error("it is empty")]
    Empty,
    /// `*` anywhere but as the whole first label before a host name.
    #[error(
        "`*` is only accepted as the whole first label, followed by a host name \
         (write *.example.org, not *example.org, a.*.org or a bare *)"
    )]
    Wildcard,
    /// `*.192.0.2.1`: an address has no subdomains.
    #[error("an IP address has no subdomains; write the address alone")]
    WildcardAddress,
    /// The ports after `:` are not a comma-separated list of 1 to 65535.
    #[error("the ports after `:` must be numbers from 1 to 65535 separated by commas")]
    Ports,
    /// The host part is not a host name or address.
    #[error("{0}")]
    Host(HostProblem),
}

/// Why a host is not a valid host name or IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostProblem {
    /// Nothing there.
    #[error("the host is empty")]
    Empty,
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
    /// A name IDNA rejects, such as an `xn--` label that is not valid punycode.
    #[error("it is not a valid international domain name (IDNA); write it in punycode (xn--...)")]
    Idna,
    /// Ends in a number but is no IPv4 address (`1.2.3.4.5`, `0x100000000`).
    #[error("it ends in a number but is not a valid IPv4 address")]
    Numeric,
}

/// Host rules in the order given. Empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
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

    /// These rules, already valid and normal (as [`Rule`]'s parser makes them).
    pub fn from_rules(rules: impl IntoIterator<Item = Rule>) -> Allowlist {
        Allowlist {
            rules: rules.into_iter().collect(),
        }
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds the rules of `other` after these.
    pub fn extend(&mut self, other: Allowlist) {
        self.rules.extend(other.rules);
    }

    /// The first rule whose host part covers `host` (any spelling: it is normalised here).
    pub fn find(&self, host: &str) -> Option<&Rule> {
        self.matching(host).next()
    }

    /// Every rule whose host part covers `host` (any spelling: it is normalised here; a host
    /// that is no valid host matches nothing).
    pub fn matching<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Rule> + 'a {
        let host = normalize_host(host).ok();
        self.rules
            .iter()
            .filter(move |rule| host.as_deref().is_some_and(|host| rule.host.matches(host)))
    }
}

/// The form hosts are compared in: lower case, without one trailing dot, international
/// names in punycode, IPv6 addresses without brackets in their canonical spelling, and the
/// numeric IPv4 spellings that `inet_aton` and curl accept (`2130706433`, `0x7f.1`,
/// `017700000001`) as dotted quads, so that they meet the address checks.
pub fn normalize_host(host: &str) -> Result<String, HostProblem> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostProblem::Empty);
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<IpAddr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => Err(HostProblem::Character('[')),
        };
    }
    if host.contains(':') {
        return match host.parse::<IpAddr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => Err(HostProblem::Character(':')),
        };
    }
    let lower = host.to_lowercase();
    if let Some(v4) = numeric_ipv4(&lower)? {
        return Ok(v4.to_string());
    }
    if let Some(bad) = lower
        .chars()
        .find(|&c| c.is_ascii() && !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(HostProblem::Character(bad));
    }
    let ascii = idna::domain_to_ascii(&lower).map_err(|_| HostProblem::Idna)?;
    check_name(&ascii)?;
    Ok(ascii)
}

/// The IPv4 address a host spells the way `inet_aton` reads it (one to four parts, each
/// decimal, `0x` hex or `0` octal, the last filling the remaining bytes), `None` if its last
/// label is not a number (so it is a name), or an error if it is a number but no address.
fn numeric_ipv4(host: &str) -> Result<Option<Ipv4Addr>, HostProblem> {
    let labels: Vec<&str> = host.split('.').collect();
    let last = labels.last().copied().unwrap_or_default();
    let is_number = |label: &str| {
        !label.is_empty()
            && (label.bytes().all(|b| b.is_ascii_digit())
                || label
                    .strip_prefix("0x")
                    .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit())))
    };
    if !is_number(last) {
        return Ok(None);
    }
    if labels.len() > 4 {
        return Err(HostProblem::Numeric);
    }
    let mut values = Vec::with_capacity(labels.len());
    for label in &labels {
        let (digits, radix) = if let Some(hex) = label.strip_prefix("0x") {
            (hex, 16)
        } else if label.len() > 1 && label.starts_with('0') {
            (&label[1..], 8)
        } else {
            (*label, 10)
        };
        let value = match digits {
            "" if radix == 16 => 0,
            _ => u64::from_str_radix(digits, radix).map_err(|_| HostProblem::Numeric)?,
        };
        values.push(value);
    }
    let (last, leading) = values.split_last().ok_or(HostProblem::Numeric)?;
    if leading.iter().any(|&byte| byte > 255) {
        return Err(HostProblem::Numeric);
    }
    let room = 8 * (4 - leading.len() as u32);
    if room < 64 && *last >> room != 0 {
        return Err(HostProblem::Numeric);
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, &byte)| acc | byte << (24 - 8 * i as u32));
    let bits = u32::try_from(high | last).map_err(|_| HostProblem::Numeric)?;
    Ok(Some(Ipv4Addr::from_bits(bits)))
}

/// Checks that an ASCII `name` is a host name: labels of letters, digits, `-` and `_`.
fn check_name(name: &str) -> Result<(), HostProblem> {
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(HostProblem::Character(bad));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(HostProblem::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostProblem::TooLong);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostProblem::Hyphen);
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
        let err = rule.parse::<Rule>().expect_err(rule);
        assert_eq!(err.rule, rule);
        err.problem
    }

    fn exact(host: &str) -> HostRule {
        HostRule::Exact(host.into())
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
        assert_eq!(list.rules()[0].host, exact("deb.debian.org"));
        assert!(list.find("DEB.debian.org.").is_some());
        assert!(allowlist(&["*.Example.org"])
            .find("WWW.EXAMPLE.ORG")
            .is_some());
    }

    #[test]
    fn international_names_compare_in_punycode() {
        let list = allowlist(&["Bücher.example"]);
        assert_eq!(list.rules()[0].host, exact("xn--bcher-kva.example"));
        assert!(list.find("xn--bcher-kva.example").is_some());
        assert!(list.find("BÜCHER.example.").is_some());
        assert!(allowlist(&["*.xn--bcher-kva.example"])
            .find("www.bücher.example")
            .is_some());
    }

    #[test]
    fn ip_address_rules_match_only_that_address() {
        let list = allowlist(&["127.0.0.1", "[::1]", "*.0.0.a"]);
        assert_eq!(
            list.find("127.0.0.1").map(|r| &r.host),
            Some(&exact("127.0.0.1"))
        );
        assert_eq!(list.find("[::1]").map(|r| &r.host), Some(&exact("::1")));
        assert!(list.find("::1").is_some());
        assert!(list.find("10.0.0.1").is_none());
        assert!(list.find("b.0.0.a").is_some());
    }

    #[test]
    fn numeric_ipv4_spellings_are_read_as_inet_aton_does() {
        for spelling in [
            "2130706433",
            "0x7f.1",
            "017700000001",
            "0x7f000001",
            "127.1",
            "127.0.1",
            "0177.0.0.01",
            "127.0.0.1.",
        ] {
            assert_eq!(
                normalize_host(spelling),
                Ok("127.0.0.1".into()),
                "{spelling}"
            );
        }
        assert_eq!(
            normalize_host("[::FFFF:127.0.0.1]"),
            Ok("::ffff:127.0.0.1".into())
        );
        for bad in [
            "1.2.3.4.5",
            "256.1.1.1",
            "4294967296",
            "08.1",
            "0x1g.1",
            "0x100.1",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
        // A name whose last label is not a number stays a name.
        assert_eq!(normalize_host("1.2.3.com"), Ok("1.2.3.com".into()));
    }

    #[test]
    fn rules_may_carry_ports() {
        let list = allowlist(&["example.org:443,8443", "[::1]:80", "::1", "*.a.org:22"]);
        let ports = |i: usize| list.rules()[i].ports.clone();
        assert_eq!(ports(0), Some([443, 8443].into()));
        assert_eq!(list.rules()[1].host, exact("::1"));
        assert_eq!(ports(1), Some([80].into()));
        assert_eq!(ports(2), None);
        assert!(list.rules()[0].covers_port(8443, false));
        assert!(!list.rules()[0].covers_port(80, true));
        assert!(list.rules()[2].covers_port(80, true));
        assert_eq!(list.rules()[0].to_string(), "example.org:443,8443");
        assert_eq!(list.rules()[1].to_string(), "[::1]:80");
        assert_eq!(list.rules()[3].to_string(), "*.a.org:22");
    }

    #[test]
    fn invalid_rules_name_the_problem() {
        use HostProblem as H;
        assert_eq!(problem(""), RuleProblem::Empty);
        assert_eq!(problem("."), RuleProblem::Empty);
        assert_eq!(problem("*"), RuleProblem::Wildcard);
        assert_eq!(problem("*."), RuleProblem::Wildcard);
        assert_eq!(problem("a.*.b"), RuleProblem::Wildcard);
        assert_eq!(problem("*foo.com"), RuleProblem::Wildcard);
        assert_eq!(problem("*.*.foo.com"), RuleProblem::Wildcard);
        assert_eq!(problem("foo.*"), RuleProblem::Wildcard);
        assert_eq!(problem("*.10.0.0.1"), RuleProblem::WildcardAddress);
        assert_eq!(problem("example.org:"), RuleProblem::Ports);
        assert_eq!(problem("example.org:0"), RuleProblem::Ports);
        assert_eq!(problem("example.org:443,x"), RuleProblem::Ports);
        assert_eq!(problem("example.org:70000"), RuleProblem::Ports);
        assert_eq!(
            problem("example.org/path"),
            RuleProblem::Host(H::Character('/'))
        );
        assert_eq!(problem("http://example.org"), RuleProblem::Ports);
        assert_eq!(
            problem("exa mple.org"),
            RuleProblem::Host(H::Character(' '))
        );
        assert_eq!(problem("example..org"), RuleProblem::Host(H::EmptyLabel));
        assert_eq!(problem(".example.org"), RuleProblem::Host(H::EmptyLabel));
        assert_eq!(problem("-example.org"), RuleProblem::Host(H::Hyphen));
        assert_eq!(problem("xn--zz.example"), RuleProblem::Host(H::Idna));
        assert_eq!(problem("1.2.3.4.5"), RuleProblem::Host(H::Numeric));
        assert_eq!(
            problem(&format!("{}.org", "a".repeat(64))),
            RuleProblem::Host(H::TooLong)
        );
        assert_eq!(
            problem(&["abc"; 64].join(".")),
            RuleProblem::Host(H::TooLong)
        );
    }

    #[test]
    fn rule_error_names_the_rule_and_suggests_the_fix() {
        let message = Allowlist::parse(["example.org", "*foo.com"])
            .expect_err("invalid")
            .to_string();
        assert!(message.contains("\"*foo.com\""), "{message}");
        assert!(message.contains("write *.example.org"), "{message}");
        assert!(message.contains("IP address"), "{message}");
        assert!(message.contains("example.org:443,8443"), "{message}");
    }
}
