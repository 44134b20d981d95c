//! The proxy's policy: what a client may reach, and every reason it may be refused.
//!
//! A request is forwarded only if its host matches the allowlist, its port is allowed, and
//! at least one address the host resolves to is public or lies in an allowed network. The
//! checks here are pure (no I/O), so the server decides exactly as these tests say; the
//! reason each [`Denial`] displays is the one the decision line records.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::StatusCode;

use crate::address::{canonical, restriction, IpNet, Restriction};
use crate::allowlist::{Allowlist, HostRule};

/// Where the proxy listens unless told otherwise: loopback, a free port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// The ports clients may target unless told otherwise: HTTP and HTTPS.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// Everything the proxy needs to know: where to listen and what to let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The address to listen on (used by the binary; [`crate::serve`] takes a bound listener).
    pub listen: SocketAddr,
    /// The hosts clients may reach.
    pub allowlist: Allowlist,
    /// Networks the proxy may connect to although their addresses are restricted.
    pub allowed_nets: Vec<IpNet>,
    /// The ports CONNECT and plain HTTP requests may target.
    pub allowed_ports: BTreeSet<u16>,
}

impl ProxyConfig {
    /// A configuration allowing `allowlist` on the default ports, listening on the default
    /// address, with no extra networks.
    pub fn new(allowlist: Allowlist) -> Self {
        ProxyConfig {
            listen: DEFAULT_LISTEN,
            allowlist,
            allowed_nets: Vec::new(),
            allowed_ports: DEFAULT_PORTS.into_iter().collect(),
        }
    }

    /// The rule that allows `host:port`, or why there is none. Host before port, so that a
    /// stranger's host is reported as such whatever port it asked for.
    pub fn check_target(&self, host: &str, port: u16) -> Result<&HostRule, Denial> {
        let rule = self.allowlist.find(host).ok_or(Denial::HostNotAllowed)?;
        if !self.allowed_ports.contains(&port) {
            return Err(Denial::PortNotAllowed(port));
        }
        Ok(rule)
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
}

impl Denial {
    /// The status the client gets: 400 for a malformed request, 502 when the host does not
    /// resolve, 403 when the policy refuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::NotAProxyRequest | Denial::UnsupportedScheme(_) | Denial::BadConnectTarget => {
                StatusCode::BAD_REQUEST
            }
            Denial::Unresolvable(_) => StatusCode::BAD_GATEWAY,
            Denial::HostMismatch(_)
            | Denial::HostNotAllowed
            | Denial::PortNotAllowed(_)
            | Denial::AddressRefused { .. } => StatusCode::FORBIDDEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
