//! What a serving proxy may still reach once it confines itself ([`policy`]): no file but
//! its download cache (`--cache`, the one directory it may write; pinned bodies are staged
//! there too, in unnamed files); no new socket at all
//! and no TCP connect (its listeners exist before, its upstream connections come from its
//! dialer, [`crate::dialer`], which resolves names and checks every address out of the
//! proxy's reach); bind only the ports it already listens on. Its access log is opened
//! before it confines itself and needs no rule. The dialer's own confinement
//! ([`crate::dialer::DialPolicy::confinement`]) holds what name resolution reads
//! ([`RESOLUTION_FILES`], [`LIBRARY_DIRS`]) and TCP connect to [`upstream_ports`] and
//! [`DNS_PORT`].

use contractor_confine::Policy;

use crate::ProxyConfig;

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

/// The ports upstream connections may go to: the allowed ports and the ports named in
/// allow rules and URL rules.
pub fn upstream_ports(config: &ProxyConfig) -> Vec<u16> {
    let mut ports: Vec<u16> = config.allowed_ports.iter().copied().collect();
    for rule in config.reachable_hosts().rules() {
        ports.extend(rule.ports.iter().flatten().copied());
    }
    // A URL rule's port (`http://host:8080/**`, or its scheme's) is one requests may reach.
    ports.extend(config.url_rules.iter().map(|rule| rule.port));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The confinement policy of a proxy serving `config` on `listen_port` (and metrics on
/// `metrics_port`), whose upstream connections its dialer makes ([`crate::dialer`]).
pub fn policy(config: &ProxyConfig, listen_port: u16, metrics_port: Option<u16>) -> Policy {
    let max_open = config
        .limits
        .max_connections
        .saturating_mul(2)
        .saturating_add(SPARE_FILES);
    Policy {
        // Nothing to read: names are resolved by the dialer, the trust store was read before.
        read: Vec::new(),
        // The download cache, when there is one: entries are written, renamed and removed.
        read_write: config
            .cache
            .iter()
            .map(|cache| cache.dir().to_path_buf())
            .collect(),
        bind_ports: std::iter::once(listen_port).chain(metrics_port).collect(),
        // The dialer connects; the proxy connects nowhere itself, in report mode too.
        connect_ports: Some(Vec::new()),
        max_open_files: Some(u64::try_from(max_open).unwrap_or(u64::MAX)),
        // No RLIMIT_FSIZE: the access log (opened before) grows as long as the proxy runs.
        max_file_size: None,
        max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
        allow_exec: false,
        allowed_syscalls: None,
        // No new socket of any family: its listeners exist already, its upstream sockets
        // come from the dialer (SCM_RIGHTS), and a taken-over proxy can neither dial an
        // address the dialer would refuse nor reach a Unix socket (the user's session bus,
        // libvirt, an SSH agent) or send UDP.
        socket_families: Some(&[]),
        stream_sockets_only: false,
    }
}
