//! The dialer: the one process of the proxy that makes sockets. The address policy (no
//! loopback, private, link-local or otherwise restricted address unless an allowed network
//! covers it, never the proxy's own listening address, only the ports the rules can reach)
//! must hold even when a hostile client takes over the proxy process, and Landlock's TCP
//! rules cannot say it (they are per port). So before the proxy confines itself it starts
//! this small process (the same binary again, with the hidden [`SUBCOMMAND`]) over a Unix
//! `SOCK_SEQPACKET` socket pair, and then confines itself so that it can make no socket at
//! all. The dialer keeps the policy and answers two requests:
//!
//! - `resolve host port`: the addresses of a name that an allow rule (or a URL rule) covers
//!   on that port and no deny rule refuses; any other name is refused without a lookup, so
//!   a taken-over proxy cannot leak data through DNS queries for names of its choosing;
//! - `connect addr`: the address is checked again (restricted ranges, allowed networks, the
//!   proxy's own addresses, the ports), connected to within the connect timeout, and the
//!   connected socket handed back with `SCM_RIGHTS`; or the reason it was not.
//!
//! The invariant: every upstream socket the binary uses was checked and connected here.
//! The dialer serves at most [`WORKERS`] requests at once (one thread each); further
//! requests wait in the socket's queue, whose size the kernel bounds, and a proxy that
//! floods it only waits for its own answers. Each message is at most [`MAX_MESSAGE`]
//! bytes; a resolution gives at most [`MAX_ADDRESSES`] addresses. The dialer dies with the
//! proxy: its socket reaches end of file when the proxy exits, and it asks for `SIGKILL`
//! when its parent dies.
//!
//! [`Dialer`] is the proxy's side; a library user who does not start one keeps resolving
//! and dialling in process ([`crate::ProxyConfig::dialer`] is `None`).

mod client;
mod process;

use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::address::canonical;
use crate::allowlist::Allowlist;
use crate::policy::{dials_itself, Denial, Mode, ProxyConfig};

pub use client::{spawn, Dialer, Spawned};
pub use process::serve;

/// The hidden first argument that makes `contractor-proxy` the dialer.
pub const SUBCOMMAND: &str = "__dialer";

/// Requests the dialer works on at once: one thread each. A resolution that hangs (a DNS
/// server that never answers, up to glibc's own timeouts) holds one of them; the rest go
/// on. 32 new upstream connections in flight is far above what a build opens at once.
pub const WORKERS: usize = 32;

/// The largest request or answer, in bytes (a host name is at most 253 bytes; an answer
/// at most [`MAX_ADDRESSES`] addresses).
pub const MAX_MESSAGE: usize = 8 * 1024;

/// The most addresses one resolution gives (the first ones, in the resolver's order).
pub const MAX_ADDRESSES: usize = 64;

/// The largest settings message (the proxy's rules), in bytes: 16 MiB.
pub const MAX_SETTINGS: usize = 16 << 20;

/// The settings travel in chunks of this size (a `SOCK_SEQPACKET` message must fit the
/// socket's buffer).
const SETTINGS_CHUNK: usize = 32 * 1024;

/// What the dialer says once it is confined, before it takes requests.
const READY: &[u8] = b"ready";

/// How long the proxy waits for its dialer to say [`READY`].
const READY_TIMEOUT_SECS: i64 = 30;

/// File descriptors one worker may hold at once: the socket it connects, or while it
/// resolves the resolver's UDP and netlink sockets and a file it reads.
const FILES_PER_WORKER: u64 = 4;

/// File descriptors of the dialer beyond its workers' (the socket, stdio).
const SPARE_FILES: u64 = 32;

/// Why the dialer could not be started, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DialerError {
    /// The socket pair could not be made.
    #[error("cannot make the dialer's socket pair")]
    SocketPair(#[source] nix::Error),
    /// The dialer process could not be started.
    #[error("cannot start the dialer {0}")]
    Spawn(PathBuf, #[source] io::Error),
    /// The settings could not be sent or received.
    #[error("cannot pass the dialer its settings")]
    Settings(#[source] io::Error),
    /// The dialer exited (or hung) before it said it was ready.
    #[error("the dialer did not start (within {READY_TIMEOUT_SECS} s); its reason is on stderr")]
    NotReady,
    /// The settings do not parse (the same binary wrote them, so this is a bug).
    #[error("the dialer's settings are invalid: {0}")]
    BadSettings(String),
    /// Stdin is not the socket the proxy hands its dialer.
    #[error(
        "{SUBCOMMAND} is started by contractor-proxy itself, with its socket on stdin; \
         do not run it by hand"
    )]
    NotTheProxysSocket,
    /// Confinement failed.
    #[error("cannot confine the dialer")]
    Confine(#[source] contractor_confine::ConfineError),
    /// The socket to the proxy failed.
    #[error("the dialer's socket failed")]
    Socket(#[source] io::Error),
    /// A worker thread could not be started or panicked.
    #[error("a dialer worker failed")]
    Worker(#[source] io::Error),
}

/// What the proxy tells its dialer once, before either is confined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The rules of every host some request may reach ([`ProxyConfig::reachable_hosts`]).
    pub allow: Vec<String>,
    /// The deny rules.
    pub deny: Vec<String>,
    /// The ports of rules without their own.
    pub allowed_ports: Vec<u16>,
    /// Networks that may be dialled although restricted.
    pub allowed_nets: Vec<String>,
    /// The proxy's own listening addresses, never dialled.
    pub own: Vec<SocketAddr>,
    /// Report mode: names and addresses are not refused for policy reasons (the proxy
    /// records "would be refused"); the own addresses still are.
    pub report: bool,
    /// The longest a connect may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Confine the dialer (false only with the proxy's `--no-confine`).
    pub confine: bool,
}

impl Settings {
    /// The settings of a dialer for `config`, whose proxy listens on `own`.
    pub fn of(config: &ProxyConfig, own: &[SocketAddr], confine: bool) -> Settings {
        let rules = |list: &Allowlist| list.rules().iter().map(|r| r.to_string()).collect();
        Settings {
            allow: rules(&config.reachable_hosts()),
            deny: rules(&config.denylist),
            allowed_ports: config.allowed_ports.iter().copied().collect(),
            allowed_nets: config.allowed_nets.iter().map(|n| n.to_string()).collect(),
            own: own.to_vec(),
            report: config.mode == Mode::Report,
            connect_timeout_ms: u64::try_from(config.limits.connect_timeout.as_millis())
                .unwrap_or(u64::MAX),
            confine,
        }
    }

    /// The policy these settings describe.
    pub fn policy(&self) -> Result<DialPolicy, DialerError> {
        let bad = |e: &dyn std::fmt::Display| DialerError::BadSettings(e.to_string());
        let mut config = ProxyConfig::new(Allowlist::parse(&self.allow).map_err(|e| bad(&e))?);
        config.denylist = Allowlist::parse(&self.deny).map_err(|e| bad(&e))?;
        config.allowed_ports = self.allowed_ports.iter().copied().collect();
        config.allowed_nets = self
            .allowed_nets
            .iter()
            .map(|net| net.parse().map_err(|e| bad(&e)))
            .collect::<Result<_, _>>()?;
        config.mode = if self.report {
            Mode::Report
        } else {
            Mode::Enforce
        };
        config.limits.connect_timeout = Duration::from_millis(self.connect_timeout_ms.max(1));
        Ok(DialPolicy {
            ports: crate::confinement::upstream_ports(&config),
            config,
            own: self.own.clone(),
        })
    }
}

/// What the dialer lets through: the proxy's checks, kept out of the proxy's reach.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    config: ProxyConfig,
    own: Vec<SocketAddr>,
    ports: Vec<u16>,
}

impl DialPolicy {
    /// Why `host:port` may not be resolved, if it may not.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), String> {
        if self.config.mode == Mode::Report {
            return Ok(());
        }
        self.config
            .check_target(host, port)
            .map(drop)
            .map_err(|denial| format!("the dialer refuses to resolve {host}: {denial}"))
    }

    /// The address to dial for `addr` (its canonical spelling), or why it may not be.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
        if let Some(own) = self.own.iter().find(|own| dials_itself(**own, addr)) {
            return Err(format!(
                "the dialer refuses {addr}: {}",
                Denial::OwnAddress(*own)
            ));
        }
        if self.config.mode == Mode::Report {
            return Ok(addr);
        }
        if let Some(why) = self.config.restriction(addr.ip()) {
            let denial = Denial::AddressRefused {
                addr: addr.ip(),
                why,
            };
            return Err(format!("the dialer refuses {addr}: {denial}"));
        }
        if !self.ports.contains(&addr.port()) {
            return Err(format!(
                "the dialer refuses {addr}: {}",
                Denial::PortNotAllowed(addr.port())
            ));
        }
        Ok(addr)
    }

    /// The TCP ports the dialer may connect to (for Landlock): those of [`Self::check_addr`],
    /// and DNS for resolution; `None` (any) in report mode.
    fn connect_ports(&self) -> Option<Vec<u16>> {
        (self.config.mode != Mode::Report).then(|| {
            let mut ports = self.ports.clone();
            ports.push(crate::confinement::DNS_PORT);
            ports.sort_unstable();
            ports.dedup();
            ports
        })
    }

    /// The confinement of the dialer: read only what name resolution reads, bind nothing,
    /// connect to the ports of [`Self::check_addr`] and DNS (any in report mode), make
    /// sockets of the Internet families (and netlink, which getaddrinfo asks) only.
    pub fn confinement(&self) -> contractor_confine::Policy {
        let resolution = crate::confinement::RESOLUTION_FILES
            .iter()
            .chain(crate::confinement::LIBRARY_DIRS);
        contractor_confine::Policy {
            read: resolution.map(PathBuf::from).collect(),
            read_write: Vec::new(),
            bind_ports: Vec::new(),
            connect_ports: self.connect_ports(),
            max_open_files: Some(FILES_PER_WORKER * WORKERS as u64 + SPARE_FILES),
            // No RLIMIT_FSIZE: its stderr may be a regular file (a log), and the limit would
            // kill it on its first warning. It opens nothing for writing (Landlock).
            max_file_size: None,
            max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
            allow_exec: false,
            allowed_syscalls: None,
            socket_families: Some(&[
                contractor_confine::AF_INET,
                contractor_confine::AF_INET6,
                contractor_confine::AF_NETLINK,
            ]),
            stream_sockets_only: false,
        }
    }
}

/// A request from the proxy.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Resolve {
        id: u64,
        host: String,
        port: u16,
    },
    Connect {
        id: u64,
        addr: SocketAddr,
        timeout_ms: u64,
    },
}

/// An answer of the dialer; `Connected` carries the socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Answer {
    Resolved {
        id: u64,
        addrs: Vec<SocketAddr>,
    },
    Connected {
        id: u64,
    },
    Failed {
        id: u64,
        reason: String,
        errno: Option<i32>,
        timed_out: bool,
    },
}

impl Answer {
    fn id(&self) -> u64 {
        match self {
            Answer::Resolved { id, .. } | Answer::Connected { id } | Answer::Failed { id, .. } => {
                *id
            }
        }
    }
}

/// One whole message into `buf` (0 at end of file); a message larger than `buf` is an
/// error, not cut.
fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Result<usize, DialerError> {
    loop {
        match recv(socket.as_raw_fd(), buf, MsgFlags::MSG_TRUNC) {
            Ok(n) if n > buf.len() => {
                return Err(DialerError::Socket(io::Error::other(format!(
                    "a message of {n} bytes, over the limit of {} bytes",
                    buf.len()
                ))))
            }
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(DialerError::Socket(e.into())),
        }
    }
}

/// Whether the process's arguments ask for the dialer (`contractor-proxy __dialer`).
pub fn is_requested(first_argument: Option<&OsStr>) -> bool {
    first_argument == Some(OsStr::new(SUBCOMMAND))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str], mode: Mode, own: &str) -> DialPolicy {
        let mut config = ProxyConfig::new(Allowlist::parse(rules).expect("rules"));
        config.denylist = Allowlist::parse(["secret.example.org"]).expect("deny");
        config.allowed_nets = vec!["127.0.0.0/8".parse().expect("net")];
        config.url_rules = vec!["GET https://files.example.net:8443/pub/**"
            .parse()
            .expect("URL rule")];
        config.mode = mode;
        let settings = Settings::of(&config, &[own.parse().expect("own")], true);
        let json = serde_json::to_vec(&settings).expect("json");
        let back: Settings = serde_json::from_slice(&json).expect("parse");
        assert_eq!(back, settings);
        back.policy().expect("policy")
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    #[test]
    fn names_resolve_only_when_a_rule_allows_them() {
        let policy = policy(
            &["*.example.org", "[::1]:8080"],
            Mode::Enforce,
            "127.0.0.1:3128",
        );
        assert!(policy.check_name("www.example.org", 443).is_ok());
        assert!(policy.check_name("files.example.net", 8443).is_ok());
        for (host, port) in [
            ("secret.example.org", 443),
            ("example.org", 443),
            ("leak-0123.attacker.example", 443),
            ("www.example.org", 22),
            ("files.example.net", 443),
        ] {
            let why = policy.check_name(host, port).expect_err(host);
            assert!(why.contains("refuses to resolve"), "{why}");
        }
    }

    #[test]
    fn addresses_are_checked_again_out_of_the_proxys_reach() {
        let policy = policy(&["example.org"], Mode::Enforce, "0.0.0.0:3128");
        assert_eq!(
            policy.check_addr(addr("[::ffff:203.0.113.5]:443")),
            Ok(addr("203.0.113.5:443"))
        );
        assert!(policy.check_addr(addr("127.0.0.1:80")).is_ok());
        assert!(policy.check_addr(addr("203.0.113.5:8443")).is_ok());
        for (target, reason) in [
            ("169.254.169.254:80", "is link-local"),
            ("10.0.0.1:443", "is private"),
            ("[fe80::1]:443", "is link-local"),
            ("127.0.0.1:3128", "own listening address"),
            ("203.0.113.5:22", "port 22 not allowed"),
        ] {
            let why = policy.check_addr(addr(target)).expect_err(target);
            assert!(why.contains(reason), "{target}: {why}");
        }
    }

    #[test]
    fn report_mode_refuses_only_the_proxy_itself() {
        let policy = policy(&["example.org"], Mode::Report, "127.0.0.1:3128");
        assert!(policy.check_name("anything.example.com", 22).is_ok());
        assert!(policy.check_addr(addr("169.254.169.254:22")).is_ok());
        assert!(policy.check_addr(addr("127.0.0.1:3128")).is_err());
        assert_eq!(policy.confinement().connect_ports, None);
        let enforcing = self::policy(&["example.org"], Mode::Enforce, "127.0.0.1:3128");
        assert_eq!(
            enforcing.confinement().connect_ports,
            Some(vec![53, 80, 443, 8443])
        );
    }
}
