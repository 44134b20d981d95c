//! A build host as the front end's side names and reaches it: `[ssh://][user@]host[:port]`
//! parsed and checked (no option or shell syntax reaches `ssh`), the user's configuration
//! file's `hosts`, and the `ssh` command line (batch mode, keep-alives, one shared
//! connection per host under a private runtime directory).

use std::path::{Path, PathBuf};
use std::process::Command;

pub use contractor_protocol::fleet::MAX_HOSTS;

/// The environment variable naming the `ssh` program to use (default `ssh`).
pub const SSH_ENV: &str = "CONTRACTOR_SSH";

/// How long `ssh` may take to connect.
pub const CONNECT_TIMEOUT_SECS: u32 = 10;

/// A build host that stops answering is given up after this many seconds (ssh's
/// keep-alives: 3 unanswered, 5 s apart).
pub const KEEPALIVE_SECS: u32 = 5;

/// A build host: `[ssh://][user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildHost {
    /// The login name, when given (else ssh's own choice: its config, then the local user).
    pub user: Option<String>,
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port, when given.
    pub port: Option<u16>,
}

/// What a build host name may look like, for error messages.
pub const HOST_FORM: &str = "[ssh://][user@]host[:port], for example builder@big-box or \
ssh://ci@10.0.0.5:2222 (user: letters, digits, '.', '_', '-'; host: a DNS name, an IPv4 \
address or an [IPv6] address)";

impl BuildHost {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<BuildHost, String> {
        let rest = text.strip_prefix("ssh://").unwrap_or(text);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, rest) = match rest.rsplit_once('@') {
            Some((user, rest)) => (Some(user), rest),
            None => (None, rest),
        };
        if let Some(user) = user {
            let valid = !user.is_empty()
                && user.len() <= 64
                && !user.starts_with('-')
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(format!("the user {user:?} is not a valid login name"));
            }
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("{rest:?} opens an [IPv6] address but does not close it"))?;
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{address:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("{after:?} after the address is not :port"))?,
                ),
            };
            (address.to_string(), port)
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("the port {port:?} is not a number from 1 to 65535"))?,
            ),
        };
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && !host.starts_with('-')
            && !host.starts_with('.')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b));
        if !name_ok && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "the host {host:?} is not a host name or an address"
            ));
        }
        Ok(BuildHost {
            user: user.map(String::from),
            host,
            port,
        })
    }

    /// The `ssh` command that runs `command` (the remote tool's arguments) on this host.
    pub fn ssh(&self, command: &[&str]) -> Command {
        let program = std::env::var_os(SSH_ENV)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "ssh".into());
        let mut ssh = Command::new(program);
        ssh.args(["-T", "-e", "none", "-o", "BatchMode=yes"])
            .arg(format!("-oConnectTimeout={CONNECT_TIMEOUT_SECS}"))
            .arg(format!("-oServerAliveInterval={KEEPALIVE_SECS}"))
            .arg("-oServerAliveCountMax=3");
        if let Some(path) = control_path(self) {
            // One connection per host, shared by every session and probe, and kept
            // `PERSIST_SECS` after the last ends.
            ssh.arg("-oControlMaster=auto")
                .arg(format!("-oControlPath={path}"))
                .arg(format!("-oControlPersist={PERSIST_SECS}"));
        }
        if let Some(port) = self.port {
            ssh.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &self.user {
            ssh.arg("-l").arg(user);
        }
        ssh.arg("--").arg(&self.host).args(command);
        ssh
    }
}

/// How long the shared connection to a build host stays open after its last session ends
/// (ssh's `ControlPersist`).
pub const PERSIST_SECS: u32 = 120;

/// The longest control socket path used: ssh binds it with a 17-character temporary suffix
/// first, and a Unix socket's path holds at most 107 bytes.
const MAX_CONTROL_PATH: usize = 90;

/// Contractor's directory for sockets and the line: `$XDG_RUNTIME_DIR/contractor`, else
/// the data directory.
pub fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .map(|d| d.join("contractor"))
        .or_else(|| contractor_protocol::image::data_dir().ok())
}

/// The directory of the shared connections' sockets, `<runtime dir>/ssh` (see
/// [`runtime_dir`]).
pub fn control_dir() -> Option<PathBuf> {
    private_dir(&runtime_dir()?.join("ssh"))
}

/// `dir`, made if missing (its parents world-readable, itself mode 0700), when it is a
/// directory (not a link) of this user's that nobody else may enter: a socket or ticket
/// another user could place there would be trusted.
pub fn private_dir(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        contractor_protocol::file::create_dir_world_readable(parent).ok()?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = std::fs::symlink_metadata(dir).ok()?;
    let own =
        meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0;
    own.then(|| dir.to_path_buf())
}

/// The control socket of `host`'s shared connection (named by a digest of `[user@]host[:port]`),
/// or none when its path would be too long or not plain enough for ssh's option syntax: then
/// each ssh connects on its own.
fn control_path(host: &BuildHost) -> Option<String> {
    use sha2::Digest;
    let dir = control_dir()?;
    let digest = sha2::Sha256::digest(host.to_string().as_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name).into_os_string().into_string().ok()?;
    let plain = path
        .chars()
        .all(|c| !c.is_whitespace() && !c.is_control() && !"%\"'\\".contains(c));
    (plain && path.len() <= MAX_CONTROL_PATH).then_some(path)
}

impl std::fmt::Display for BuildHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match (self.host.contains(':'), self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            (_, None) => f.write_str(&self.host),
        }
    }
}

/// The user's configuration file: `$CONTRACTOR_CONFIG`, else
/// `$XDG_CONFIG_HOME/contractor/config.toml`, else `~/.config/contractor/config.toml`.
pub fn config_file() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("CONTRACTOR_CONFIG")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("contractor/config.toml")))
        .or_else(|| var("HOME").map(|d| d.join(".config/contractor/config.toml")))
}

/// The most bytes of the configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    host: Option<HostTable>,
    hosts: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostTable {
    name: String,
}

/// The build hosts the user's configuration names (`[host] name = "…"`, or `hosts =
/// ["…", …]`), none when there is no configuration file.
pub fn configured_hosts() -> Result<Vec<BuildHost>, String> {
    let Some(path) = config_file() else {
        return Ok(Vec::new());
    };
    let text = match contractor_protocol::file::read_regular(&path, MAX_CONFIG_BYTES) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    };
    let text =
        String::from_utf8(text).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let config: Config = toml::from_str(&text).map_err(|err| {
        let problem = contractor_spec::spec::toml_problem(&text, err.message(), err.span());
        format!("{}: {problem}", path.display())
    })?;
    let names = match (config.host, config.hosts) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{}: name either [host] name or hosts, not both",
                path.display()
            ))
        }
        (Some(table), None) => vec![table.name],
        (None, Some(hosts)) => hosts,
        (None, None) => Vec::new(),
    };
    let field = |i: usize| match names.len() {
        1 => "the build host".to_string(),
        _ => format!("hosts[{i}]"),
    };
    if names.len() > MAX_HOSTS {
        return Err(format!(
            "{}: {} build hosts; at most {MAX_HOSTS} are accepted",
            path.display(),
            names.len()
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            BuildHost::parse(name).map_err(|why| {
                format!(
                    "{}: {} {name:?}: {why}; a build host is {HOST_FORM}",
                    path.display(),
                    field(i)
                )
            })
        })
        .collect()
}

/// The build hosts of a build: those `given` (`--host`), else the configuration's; with
/// the configuration file looked at when none were given. The error names the value (or
/// the file and field) and says what is accepted.
pub fn resolve(given: &[String]) -> Result<(Vec<BuildHost>, Option<PathBuf>), String> {
    if given.is_empty() {
        return Ok((configured_hosts()?, config_file()));
    }
    if given.len() > MAX_HOSTS {
        return Err(format!(
            "{} --host options; at most {MAX_HOSTS} are accepted",
            given.len()
        ));
    }
    let hosts = given
        .iter()
        .map(|text| {
            BuildHost::parse(text)
                .map_err(|why| format!("--host {text:?}: {why}; a build host is {HOST_FORM}"))
        })
        .collect::<Result<_, _>>()?;
    Ok((hosts, None))
}

/// The hosts of a request's `hosts` field (1 to [`MAX_HOSTS`]); the error names the
/// entry and says what is accepted.
pub fn parse_listed(listed: &[String]) -> Result<Vec<BuildHost>, String> {
    if listed.is_empty() || listed.len() > MAX_HOSTS {
        return Err(format!(
            "hosts: {} build hosts; from 1 to {MAX_HOSTS} are accepted",
            listed.len()
        ));
    }
    listed
        .iter()
        .enumerate()
        .map(|(i, text)| {
            BuildHost::parse(text)
                .map_err(|why| format!("hosts[{i}] {text:?}: {why}; a build host is {HOST_FORM}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_hosts_parse_in_every_documented_form() {
        let host = |user: Option<&str>, name: &str, port: Option<u16>| BuildHost {
            user: user.map(String::from),
            host: name.into(),
            port,
        };
        assert_eq!(
            BuildHost::parse("ci@big-box"),
            Ok(host(Some("ci"), "big-box", None))
        );
        assert_eq!(
            BuildHost::parse("ssh://ci@10.0.0.5:2222"),
            Ok(host(Some("ci"), "10.0.0.5", Some(2222)))
        );
        assert_eq!(BuildHost::parse("big-box"), Ok(host(None, "big-box", None)));
        assert_eq!(
            BuildHost::parse("ssh://[fd00::1]:22"),
            Ok(host(None, "fd00::1", Some(22)))
        );
        assert_eq!(
            BuildHost::parse("ssh://[fd00::1]:22").map(|h| h.to_string()),
            Ok("[fd00::1]:22".to_string())
        );
        for bad in [
            "-oProxyCommand=x",
            "ci@",
            "@host",
            "a b@host",
            "host:0",
            "host:x",
            "",
            "[fd00::1",
            "ci@-host",
        ] {
            assert!(BuildHost::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
