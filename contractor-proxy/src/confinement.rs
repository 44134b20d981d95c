//! What a serving proxy may still reach once it confines itself ([`policy`]): for the file
//! system, only what glibc's name resolution reads (its configuration files and the
//! libraries it may load for NSS); for TCP, connect only to the ports its rules can let a
//! request reach (the allowed ports, the ports named in allow rules, the port of each URL
//! rule) plus 53, which the resolver uses when a DNS answer is too big for UDP; bind only
//! the ports it already listens on. In report mode (every request goes through, to any
//! port) TCP connect is left free and the ready line warns so. Its access log is opened
//! before it confines itself and needs no rule; its download cache (`--cache`) is the one
//! directory it may write (pinned bodies are staged there too, in unnamed files).

use std::path::PathBuf;

use contractor_confine::Policy;

use crate::{Mode, ProxyConfig};

/// The files name resolution reads (those missing on a host are simply left out).
pub const RESOLUTION_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ld.so.cache",
    "/etc/localtime",
];

/// Where glibc finds the NSS modules it may `dlopen` (`libnss_files.so.2`, ...) and the
/// libraries they need: system libraries, readable by everyone, holding nothing of the
/// user's.
pub const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
];

/// The DNS port: glibc's resolver retries over TCP when an answer is truncated.
pub const DNS_PORT: u16 = 53;

/// File descriptors beyond two per connection (client and upstream).
const SPARE_FILES: usize = 256;

/// The confinement policy of a proxy serving `config` on `listen_port` (and metrics on
/// `metrics_port`).
pub fn policy(config: &ProxyConfig, listen_port: u16, metrics_port: Option<u16>) -> Policy {
    let mut connect: Vec<u16> = config.allowed_ports.iter().copied().collect();
    for rule in config.allowlist.rules() {
        connect.extend(rule.ports.iter().flatten().copied());
    }
    // A URL rule's port (`http://host:8080/**`, or its scheme's) is one requests may reach.
    connect.extend(config.url_rules.iter().map(|rule| rule.port));
    connect.push(DNS_PORT);
    connect.sort_unstable();
    connect.dedup();
    let max_open = config
        .limits
        .max_connections
        .saturating_mul(2)
        .saturating_add(SPARE_FILES);
    Policy {
        read: RESOLUTION_FILES
            .iter()
            .chain(LIBRARY_DIRS)
            .map(PathBuf::from)
            .collect(),
        // The download cache, when there is one: entries are written, renamed and removed.
        read_write: config
            .cache
            .iter()
            .map(|cache| cache.dir().to_path_buf())
            .collect(),
        bind_ports: std::iter::once(listen_port).chain(metrics_port).collect(),
        // In report mode every request goes through, to any port: only bind is confined.
        connect_ports: (config.mode != Mode::Report).then_some(connect),
        max_open_files: Some(u64::try_from(max_open).unwrap_or(u64::MAX)),
        // No RLIMIT_FSIZE: the access log (opened before) grows as long as the proxy runs.
        max_file_size: None,
        max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
        allow_exec: false,
        allowed_syscalls: None,
        // TCP and UDP (name resolution) over IPv4 and IPv6, and the netlink socket glibc's
        // getaddrinfo asks for the host's addresses; no Unix socket (nscd, the session
        // bus: name resolution goes on without them).
        socket_families: Some(&[
            contractor_confine::AF_INET,
            contractor_confine::AF_INET6,
            contractor_confine::AF_NETLINK,
        ]),
        stream_sockets_only: false,
    }
}
