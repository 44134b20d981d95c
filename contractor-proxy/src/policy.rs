//! The proxy's policy: what a client may reach, and every reason it may be refused.
//!
//! A request is forwarded only if no deny rule covers its host and port, an allow rule
//! does (with the rule's own ports, or the allowed ports), and at least one address the
//! host resolves to is public or lies in an allowed network. In [`Mode::Report`] nothing
//! is refused for policy reasons, but the decision says what would have been. The checks
//! here are pure (no I/O), so the server decides exactly as these tests say; the reason
//! each [`Denial`] displays is the one the decision line records.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use contractor_protocol::proxy::DecisionClass;
use http::StatusCode;
use serde::Deserialize;

use crate::address::{canonical, restriction, IpNet, Restriction};
use crate::allowlist::{Allowlist, Rule};
use crate::metrics::Metrics;

/// Where the proxy listens unless told otherwise: loopback, a free port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// The ports clients may target unless told otherwise: HTTP and HTTPS.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// The smallest header limit the HTTP parser accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

/// Whether policy refusals are enforced or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refuse what the policy refuses (the default).
    #[default]
    Enforce,
    /// Let everything through, logging "would be refused: ..." where enforce would refuse.
    Report,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "enforce" => Ok(Mode::Enforce),
            "report" => Ok(Mode::Report),
            other => Err(format!("invalid mode {other:?}: use enforce or report")),
        }
    }
}

/// How much the proxy takes on, and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client connections served at once; more get 503 with Retry-After.
    pub max_connections: usize,
    /// The largest request head a client may send (at least [`MIN_HEADER_BYTES`]).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head; slower clients are dropped.
    pub header_read_timeout: Duration,
    /// How long a connection, tunnel or body may go without a byte either way.
    pub idle_timeout: Duration,
    /// How long resolving a host, or connecting to it, may take.
    pub connect_timeout: Duration,
    /// Connection attempts to one `host:port` made at once; more wait their turn.
    pub connects_per_host: usize,
    /// Connection attempts to one `host:port` that may wait their turn; more get 503 with
    /// Retry-After.
    pub connect_queue_per_host: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            connects_per_host: 16,
            connect_queue_per_host: 1024,
        }
    }
}

/// What a resolver returns: the addresses of a host, or why there are none.
pub type Resolution = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a host name and port into addresses: the system resolver unless a test stages
/// DNS answers with [`Resolver::new`].
#[derive(Clone)]
pub struct Resolver(Arc<ResolveFn>);

/// The function behind a [`Resolver`].
type ResolveFn = dyn Fn(&str, u16) -> Resolution + Send + Sync;

impl Resolver {
    /// A resolver that calls `resolve`.
    pub fn new(resolve: impl Fn(&str, u16) -> Resolution + Send + Sync + 'static) -> Self {
        Resolver(Arc::new(resolve))
    }

    /// The system resolver (getaddrinfo).
    pub fn system() -> Self {
        Resolver::new(|host, port| {
            let host = host.to_string();
            Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
        })
    }

    /// The addresses of `host` on `port`.
    pub fn resolve(&self, host: &str, port: u16) -> Resolution {
        (self.0)(host, port)
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

/// Everything the proxy needs to know: where to listen and what to let through.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The address to listen on (used by the binary; [`crate::serve`] takes a bound listener).
    pub listen: SocketAddr,
    /// The hosts clients may reach.
    pub allowlist: Allowlist,
    /// Hosts clients may not reach even if an allow rule covers them.
    pub denylist: Allowlist,
    /// Networks the proxy may connect to although their addresses are restricted.
    pub allowed_nets: Vec<IpNet>,
    /// The ports CONNECT and plain HTTP requests may target, for rules without ports.
    pub allowed_ports: BTreeSet<u16>,
    /// Enforce or only report.
    pub mode: Mode,
    /// Connection and time limits.
    pub limits: Limits,
    /// How host names become addresses.
    pub resolver: Resolver,
    /// Counters, shared with whoever reports them.
    pub metrics: Arc<Metrics>,
    /// Where to send one [`crate::AccessEntry`] per finished request, if anywhere.
    pub access_log: Option<tokio::sync::mpsc::UnboundedSender<crate::AccessEntry>>,
    /// Send a [`contractor_protocol::proxy::Download`] (URL, size, SHA-256) for each
    /// forwarded response, next to the decisions: `--record-downloads`.
    pub record_downloads: bool,
    /// Terminate the TLS of CONNECTs to allowed DNS names with this authority and forward
    /// their requests over the proxy's own verified TLS: `--inspect`.
    pub inspection: Option<crate::inspect::Inspection>,
    /// Hosts whose CONNECTs stay plain tunnels although inspection is on: `--tunnel`.
    pub tunnel: Allowlist,
    /// URL → SHA-256 of the downloads that must have those bytes (`--pins`): such a body is
    /// staged and verified before it is served; one with others is answered 502. Only
    /// recorded downloads are checked.
    pub pins: Arc<std::collections::HashMap<String, String>>,
    /// Allow rules for some URLs of a host (`GET https://host/path/**`): the host may be
    /// reached, and of its requests those a rule allows. Checked where the proxy reads the
    /// requests: plain HTTP, and HTTPS it inspects.
    pub url_rules: Vec<crate::urlrule::UrlRule>,
    /// Where complete `GET` bodies are kept by SHA-256 and pinned URLs served from
    /// (`--cache`); only with `record_downloads`.
    pub cache: Option<Arc<crate::cache::DownloadCache>>,
    /// Serve pinned URLs from the cache and refuse everything else, resolving and dialling
    /// nothing (`--offline`).
    pub offline: bool,
    /// Where upstream connections are made: the dialer process (which checks each address
    /// again) when there is one, as the binary always has; in this process otherwise.
    pub dialer: Option<crate::dialer::Dialer>,
    /// The process's other listening addresses (`--metrics`): never dialled, refused as the
    /// proxy's own as the listener [`crate::serve`] is given is, before the dialer (which
    /// refuses them too) is asked.
    pub also_own: Vec<SocketAddr>,
}

impl ProxyConfig {
    /// A configuration allowing `allowlist` on the default ports, listening on the default
    /// address, with no extra networks, enforcing, with default limits.
    pub fn new(allowlist: Allowlist) -> Self {
        ProxyConfig {
            listen: DEFAULT_LISTEN,
            allowlist,
            denylist: Allowlist::default(),
            allowed_nets: Vec::new(),
            allowed_ports: DEFAULT_PORTS.into_iter().collect(),
            mode: Mode::Enforce,
            limits: Limits::default(),
            resolver: Resolver::system(),
            metrics: Arc::new(Metrics::default()),
            access_log: None,
            record_downloads: false,
            inspection: None,
            tunnel: Allowlist::default(),
            pins: Arc::default(),
            url_rules: Vec::new(),
            cache: None,
            offline: false,
            dialer: None,
            also_own: Vec::new(),
        }
    }

    /// The rule that allows `host:port` (as text), or why there is none: a host rule, or
    /// the URL rules for the host, which then allow only some of its requests.
    pub fn check_target(&self, host: &str, port: u16) -> Result<String, Denial> {
        match self.host_rule(host, port) {
            Ok(rule) => Ok(rule.to_string()),
            Err(Denial::HostNotAllowed | Denial::PortNotAllowed(_))
                if self.url_restricted(host, port) =>
            {
                Ok(format!("URL rules for {host}"))
            }
            Err(denial) => Err(denial),
        }
    }

    /// The host rule that allows `host:port`, or why there is none. Deny rules first, then
    /// host before port, so that a stranger's host is reported as such whatever port it
    /// asked for.
    fn host_rule(&self, host: &str, port: u16) -> Result<&Rule, Denial> {
        if let Some(rule) = self
            .denylist
            .matching(host)
            .find(|rule| rule.covers_port(port, true))
        {
            return Err(Denial::HostDenied(rule.to_string()));
        }
        let mut matching = self.allowlist.matching(host).peekable();
        if matching.peek().is_none() {
            return Err(Denial::HostNotAllowed);
        }
        let default = self.allowed_ports.contains(&port);
        matching
            .find(|rule| rule.covers_port(port, default))
            .ok_or(Denial::PortNotAllowed(port))
    }

    /// The host rules and the hosts of the URL rules: every host some request may reach,
    /// the names the build's authority may sign for.
    pub fn reachable_hosts(&self) -> Allowlist {
        let mut hosts = self.allowlist.clone();
        hosts.extend(Allowlist::from_rules(self.url_rules.iter().map(|rule| {
            Rule {
                host: rule.host.clone(),
                ports: Some([rule.port].into_iter().collect()),
            }
        })));
        hosts
    }

    /// Whether `host:port` is reachable only through URL rules: no host rule allows it, no
    /// deny rule refuses it, and a URL rule covers it.
    pub fn url_restricted(&self, host: &str, port: u16) -> bool {
        let Ok(normal) = crate::allowlist::normalize_host(host) else {
            return false;
        };
        matches!(
            self.host_rule(host, port),
            Err(Denial::HostNotAllowed | Denial::PortNotAllowed(_))
        ) && self.url_rules.iter().any(|rule| {
            rule.covers_host(crate::urlrule::Scheme::Http, &normal, port)
                || rule.covers_host(crate::urlrule::Scheme::Https, &normal, port)
        })
    }

    /// Whether `method` may fetch `path` (the request target, query included) of
    /// `scheme://host:port`, a target [`Self::check_target`] allowed: always, when a host
    /// rule allows the host (`None`: forward the target as sent); otherwise only when one of
    /// its URL rules does, and then the path is read once and the normalised target it gives
    /// is what must be forwarded (`Some`), so that the rule decided on what the host gets.
    pub fn check_url(
        &self,
        method: &str,
        scheme: crate::urlrule::Scheme,
        host: &str,
        port: u16,
        path: &str,
    ) -> Result<Option<String>, Denial> {
        if !self.url_restricted(host, port) {
            return Ok(None);
        }
        let checked =
            crate::urlrule::CheckedPath::new(path).map_err(|problem| Denial::UnclearPath {
                url: url_of(scheme, host, port, path),
                problem,
            })?;
        let normal = crate::allowlist::normalize_host(host).unwrap_or_default();
        let allowed = self.url_rules.iter().any(|rule| {
            rule.covers_host(scheme, &normal, port) && rule.allows_checked(method, &checked)
        });
        match allowed {
            true => Ok(Some(checked.forwarded().to_string())),
            false => Err(Denial::UrlNotAllowed(url_of(scheme, host, port, path))),
        }
    }

    /// The addresses among `resolved` that may be dialled, in their canonical spelling, or
    /// why none may (the first address's restriction).
    pub fn check_addresses(&self, resolved: &[SocketAddr]) -> Result<Vec<SocketAddr>, Denial> {
        let mut refused = None;
        let mut permitted = Vec::new();
        for resolved in resolved {
            let addr = canonical(resolved.ip());
            match self.restriction(addr) {
                None => permitted.push(SocketAddr::new(addr, resolved.port())),
                Some(why) => {
                    refused.get_or_insert(Denial::AddressRefused { addr, why });
                }
            }
        }
        match refused {
            Some(denial) if permitted.is_empty() => Err(denial),
            _ if permitted.is_empty() => Err(Denial::Unresolvable(no_addresses())),
            _ => Ok(permitted),
        }
    }

    /// Why `addr` may not be dialled, or `None` if it is public or in an allowed network.
    pub fn restriction(&self, addr: IpAddr) -> Option<Restriction> {
        restriction(addr).filter(|_| !self.allowed_nets.iter().any(|net| net.contains(addr)))
    }
}

/// Whether dialling `addr` would reach a proxy listening on `own`: the same port, and the
/// same address, or any restricted one when `own` is unspecified (`0.0.0.0`, `::`).
pub fn dials_itself(own: SocketAddr, addr: SocketAddr) -> bool {
    let ip = canonical(addr.ip());
    addr.port() == own.port()
        && (ip == canonical(own.ip()) || (own.ip().is_unspecified() && restriction(ip).is_some()))
}

/// `scheme://host[:port]path`, the port left out when it is the scheme's.
pub fn url_of(scheme: crate::urlrule::Scheme, host: &str, port: u16, path: &str) -> String {
    match port == scheme.default_port() {
        true => format!("{scheme}://{host}{path}"),
        false => format!("{scheme}://{host}:{port}{path}"),
    }
}

fn no_addresses() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "the host has no addresses")
}

/// Why a request was not forwarded: each one is a `deny` decision.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    /// An origin-form request (`GET /path`): the client does not know it talks to a proxy.
    #[error(
        "not a proxy request: send an absolute URI (GET http://host/path) or CONNECT host:port"
    )]
    NotAProxyRequest,
    /// An absolute URI with a scheme other than `http`.
    #[error("cannot forward {0}:// requests: only http://, use CONNECT for https")]
    UnsupportedScheme(String),
    /// A CONNECT target that is not `host:port`.
    #[error("CONNECT target must be host:port")]
    BadConnectTarget,
    /// The Host header names another host than the request URI.
    #[error("Host header names a different host ({0})")]
    HostMismatch(String),
    /// The target host is not a valid host name or address.
    #[error("invalid host: {0}")]
    BadHost(#[source] crate::allowlist::HostProblem),
    /// A deny rule covers the host (and port).
    #[error("host refused by deny rule {0}")]
    HostDenied(String),
    /// No allowlist rule matches the host.
    #[error("host not on the allowlist")]
    HostNotAllowed,
    /// The port is not among the allowed ports.
    #[error("port {0} not allowed")]
    PortNotAllowed(u16),
    /// Every address of the host is restricted.
    #[error("address {addr} is {why}")]
    AddressRefused {
        /// The first address refused.
        addr: IpAddr,
        /// Why.
        why: Restriction,
    },
    /// The host name did not resolve.
    #[error("cannot resolve the host")]
    Unresolvable(#[source] io::Error),
    /// The target is the proxy itself.
    #[error("{0} is the proxy's own listening address")]
    OwnAddress(SocketAddr),
    /// The request head is larger than the limit.
    #[error("request head of {size} bytes is over the limit of {limit} bytes")]
    HeadTooLarge {
        /// About how large it was.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Every connection slot is taken.
    #[error("too many connections (at most {0}); try again shortly")]
    OverCapacity(usize),
    /// Only URL rules allow the host, and none of them this request.
    #[error("{0} is not allowed: only URL rules allow its host, and none matches it")]
    UrlNotAllowed(String),
    /// Only URL rules allow the host, and its TLS is tunnelled, so its requests cannot be read.
    #[error(
        "only URL rules allow {0}, and its TLS is not inspected, so its requests cannot be \
         checked; allow the host, or inspect its TLS"
    )]
    UrlRulesNeedInspection(String),
    /// Only URL rules allow the host, and the request's path cannot be read one way only.
    #[error(
        "{url} is not allowed: only URL rules allow its host, and its path {problem}, which \
         the rules do not accept"
    )]
    UnclearPath {
        /// The URL as asked for.
        url: String,
        /// What makes its path unclear.
        problem: crate::urlrule::PathProblem,
    },
    /// A plain-HTTP `Upgrade` to a host only URL rules allow: after a 101 its bytes could
    /// not be checked.
    #[error("only URL rules allow {0}, and an Upgrade would carry requests no rule could check")]
    UpgradeUnderUrlRules(String),
    /// Inside an inspected TLS session, a request with more than one Host header.
    #[error("more than one Host header")]
    ManyHosts,
    /// Inside an inspected TLS session, a request naming another authority (its Host
    /// header, or its absolute URI) than the CONNECT target.
    #[error("the request names {named}, but its TLS session is to {target} (the CONNECT target)")]
    ForeignAuthority {
        /// What the request names.
        named: String,
        /// The CONNECT target, `host:port`.
        target: String,
    },
    /// Offline, and the request is not a `GET` of a pinned URL whose pinned bytes this
    /// project fetched from it into the download cache.
    #[error(
        "offline: {0} is not served; only GETs of URLs pinned in contractor.lock whose pinned \
         bytes this project itself fetched from that URL into the download cache are (build \
         once with the network, then pin)"
    )]
    Offline(String),
}

impl Denial {
    /// The status the client gets: 400 for a malformed request, 502 when the host does not
    /// resolve, 403 when the policy refuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::NotAProxyRequest
            | Denial::UnsupportedScheme(_)
            | Denial::BadConnectTarget
            | Denial::BadHost(_)
            | Denial::ManyHosts => StatusCode::BAD_REQUEST,
            Denial::Unresolvable(_) => StatusCode::BAD_GATEWAY,
            Denial::OverCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            Denial::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Denial::HostMismatch(_)
            | Denial::HostDenied(_)
            | Denial::OwnAddress(_)
            | Denial::HostNotAllowed
            | Denial::PortNotAllowed(_)
            | Denial::UrlNotAllowed(_)
            | Denial::UnclearPath { .. }
            | Denial::UpgradeUnderUrlRules(_)
            | Denial::ForeignAuthority { .. }
            | Denial::UrlRulesNeedInspection(_)
            | Denial::Offline(_)
            | Denial::AddressRefused { .. } => StatusCode::FORBIDDEN,
        }
    }
}

impl Denial {
    /// A short name for the kind of refusal, the `reason` label of the metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Denial::NotAProxyRequest
            | Denial::UnsupportedScheme(_)
            | Denial::BadConnectTarget
            | Denial::BadHost(_)
            | Denial::ManyHosts => "bad_request",
            Denial::HostMismatch(_) | Denial::ForeignAuthority { .. } => "host_mismatch",
            Denial::HostDenied(_) => "deny_rule",
            Denial::HostNotAllowed => "host_not_allowed",
            Denial::PortNotAllowed(_) => "port_not_allowed",
            Denial::AddressRefused { .. } => "address_refused",
            Denial::Unresolvable(_) => "unresolvable",
            Denial::OwnAddress(_) => "own_address",
            Denial::OverCapacity(_) => "over_capacity",
            Denial::HeadTooLarge { .. } => "head_too_large",
            Denial::UrlNotAllowed(_) | Denial::UnclearPath { .. } => "url_not_allowed",
            Denial::UpgradeUnderUrlRules(_) => "url_upgrade",
            Denial::UrlRulesNeedInspection(_) => "url_rules_uninspected",
            Denial::Offline(_) => "offline",
        }
    }

    /// The kind of refusal its decision line records: an allowed host that could not be
    /// resolved is an upstream failure, not the policy's; a request naming two hosts is
    /// the request's fault (report mode still lets a plain one through, as the policy's),
    /// not its host's.
    pub fn decision_class(&self) -> DecisionClass {
        match self {
            Denial::Unresolvable(_) => DecisionClass::Upstream,
            Denial::HostMismatch(_) => DecisionClass::Request,
            Denial::Offline(_) => DecisionClass::Policy,
            denial if denial.is_policy() => DecisionClass::Policy,
            _ => DecisionClass::Request,
        }
    }

    /// Whether [`Mode::Report`] lets the request through anyway: a policy refusal, not a
    /// malformed request, a failure, or a loop back into the proxy.
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Denial::HostMismatch(_)
                | Denial::HostDenied(_)
                | Denial::HostNotAllowed
                | Denial::PortNotAllowed(_)
                | Denial::UrlNotAllowed(_)
                | Denial::UnclearPath { .. }
                | Denial::UpgradeUnderUrlRules(_)
                | Denial::UrlRulesNeedInspection(_)
                | Denial::AddressRefused { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unresolvable_host_is_an_upstream_failure_and_the_allowlist_a_policy() {
        let unresolvable = Denial::Unresolvable(io::Error::other("no answer within 10 s"));
        assert_eq!(unresolvable.decision_class(), DecisionClass::Upstream);
        assert_eq!(
            Denial::HostNotAllowed.decision_class(),
            DecisionClass::Policy
        );
        assert_eq!(Denial::ManyHosts.decision_class(), DecisionClass::Request);
        // A request naming two hosts (its URI and its Host header) is refused whichever is
        // allowed: allowing its host would change nothing, as inside inspected TLS.
        assert_eq!(
            Denial::HostMismatch("evil.example".into()).decision_class(),
            DecisionClass::Request
        );
        let foreign = Denial::ForeignAuthority {
            named: "evil.example".into(),
            target: "registry.npmjs.org:443".into(),
        };
        assert_eq!(foreign.decision_class(), DecisionClass::Request);
    }

    fn config(rules: &[&str], nets: &[&str]) -> ProxyConfig {
        let mut config = ProxyConfig::new(Allowlist::parse(rules).expect("rules"));
        config.allowed_nets = nets.iter().map(|net| net.parse().expect("net")).collect();
        config
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter()
            .map(|addr| addr.parse().expect("socket address"))
            .collect()
    }

    #[test]
    fn allowed_host_on_default_ports_only() {
        let config = config(&["example.org"], &[]);
        assert_eq!(
            config
                .check_target("example.org", 443)
                .expect("allowed")
                .to_string(),
            "example.org"
        );
        assert!(config.check_target("Example.org.", 80).is_ok());
        let denial = config.check_target("example.org", 22).expect_err("port 22");
        assert_eq!(denial.to_string(), "port 22 not allowed");
        assert_eq!(denial.status(), StatusCode::FORBIDDEN);
        let denial = config
            .check_target("example.com", 22)
            .expect_err("stranger");
        assert_eq!(denial.to_string(), "host not on the allowlist");
    }

    #[test]
    fn deny_rules_win_over_allow_rules() {
        let mut config = config(&["*.example.org", "example.org"], &[]);
        config.denylist =
            Allowlist::parse(["secret.example.org", "example.org:80"]).expect("rules");
        let denial = config
            .check_target("SECRET.example.org.", 443)
            .expect_err("denied");
        assert_eq!(
            denial.to_string(),
            "host refused by deny rule secret.example.org"
        );
        assert_eq!(denial.class(), "deny_rule");
        assert!(config.check_target("example.org", 80).is_err());
        assert!(config.check_target("example.org", 443).is_ok());
        assert!(config.check_target("www.example.org", 443).is_ok());
    }

    #[test]
    fn rule_ports_replace_the_allowed_ports_for_that_rule() {
        let config = config(&["example.org:8443", "*.example.org"], &[]);
        assert!(config.check_target("example.org", 8443).is_ok());
        assert_eq!(
            config
                .check_target("example.org", 443)
                .expect_err("443")
                .to_string(),
            "port 443 not allowed"
        );
        assert!(config.check_target("a.example.org", 443).is_ok());
        assert!(config.check_target("a.example.org", 8443).is_err());
    }

    #[test]
    fn public_addresses_pass_and_restricted_ones_are_dropped() {
        let config = config(&["example.org"], &[]);
        let permitted = config
            .check_addresses(&addrs(&[
                "127.0.0.1:443",
                "203.0.113.5:443",
                "[::ffff:203.0.113.6]:443",
            ]))
            .expect("one public address");
        assert_eq!(permitted, addrs(&["203.0.113.5:443", "203.0.113.6:443"]));
    }

    #[test]
    fn all_restricted_addresses_are_refused_naming_the_first() {
        let config = config(&["example.org"], &[]);
        let denial = config
            .check_addresses(&addrs(&["169.254.169.254:80", "[::1]:80"]))
            .expect_err("all internal");
        assert_eq!(denial.to_string(), "address 169.254.169.254 is link-local");
        let denial = config
            .check_addresses(&addrs(&["[::ffff:127.0.0.1]:80"]))
            .expect_err("mapped");
        assert_eq!(denial.to_string(), "address 127.0.0.1 is loopback");
        assert!(matches!(
            config.check_addresses(&[]),
            Err(Denial::Unresolvable(_))
        ));
    }

    #[test]
    fn allowed_networks_open_restricted_addresses() {
        let config = config(&["localhost"], &["127.0.0.0/8"]);
        let permitted = config
            .check_addresses(&addrs(&["[::1]:8080", "127.0.0.1:8080"]))
            .expect("allowed net");
        assert_eq!(permitted, addrs(&["127.0.0.1:8080"]));
        assert_eq!(
            config.restriction("10.0.0.1".parse().expect("addr")),
            Some(Restriction::Private)
        );
        assert_eq!(
            config.restriction("::ffff:127.0.0.1".parse().expect("addr")),
            None
        );
    }

    #[test]
    fn denials_map_to_statuses() {
        assert_eq!(Denial::NotAProxyRequest.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            Denial::HostMismatch("a".into()).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Denial::Unresolvable(no_addresses()).status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
