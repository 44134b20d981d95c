//! The configuration file (`--config FILE`, TOML or JSON by extension) and the one place
//! where file settings and command-line flags become a [`ProxyConfig`].
//!
//! The invariant: a [`ConfigFile`] that [`ConfigFile::load`] returned is valid on its own,
//! and every error names the file, the line (where the value can be found) and the field,
//! and says what would be accepted. Unknown fields are errors, so a typo fails loudly.
//! Command-line flags are the same settings: lists (allow, deny, allow_net, allow_port)
//! extend the file's, single values replace them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::address::IpNet;
use crate::allowlist::Allowlist;
use crate::policy::{Limits, Mode, ProxyConfig, DEFAULT_PORTS, MIN_HEADER_BYTES};

/// Every setting, as a file holds it; also what the flags parse into.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address to listen on.
    pub listen: Option<SocketAddr>,
    /// Allow rules.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Deny rules, which win over allow rules.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Networks that may be dialled although restricted.
    #[serde(default)]
    pub allow_net: Vec<String>,
    /// Ports for rules without their own (80 and 443 if none is given anywhere).
    #[serde(default)]
    pub allow_port: Vec<u16>,
    /// `enforce` or `report`.
    pub mode: Option<Mode>,
    /// Limits; any left out keep their defaults.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Where to append one JSON line per finished request.
    pub access_log: Option<PathBuf>,
    /// Where to serve `/metrics`.
    pub metrics: Option<SocketAddr>,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Client connections served at once.
    pub max_connections: Option<usize>,
    /// Largest request head, in bytes (at least 8192).
    pub max_header_bytes: Option<usize>,
    /// Seconds a client may take to send a request head.
    pub header_read_timeout_secs: Option<f64>,
    /// Seconds a connection may go without a byte either way.
    pub idle_timeout_secs: Option<f64>,
    /// Seconds resolving and connecting may take.
    pub connect_timeout_secs: Option<f64>,
}

/// A configuration that cannot be used, and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither `.toml` nor `.json`.
    #[error("{}: unknown file type; name the file *.toml or *.json", path.display())]
    Extension {
        /// The file.
        path: PathBuf,
    },
    /// The file does not parse, or has an unknown field or a value of the wrong type.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the line and the field.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{where_}{problem}")]
    Value {
        /// `FILE line N: field `F`: ` for a file, `--flag: ` for a flag.
        where_: String,
        /// The field (or flag without `--`).
        field: String,
        /// What is wrong and what would be accepted.
        problem: String,
    },
}

impl ConfigFile {
    /// Reads and checks `path`, TOML or JSON by its extension.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let syntax = |message: String| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: message.trim_end().to_string(),
        };
        let file: ConfigFile = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| syntax(e.to_string()))?,
            Some("json") => serde_json::from_str(&text).map_err(|e| syntax(e.to_string()))?,
            _ => {
                return Err(ConfigError::Extension {
                    path: path.to_path_buf(),
                })
            }
        };
        match file.clone().into_config() {
            Ok(_) => Ok(file),
            Err(ConfigError::Value { field, problem, .. }) => Err(ConfigError::Value {
                where_: format!(
                    "{}{}: field `{field}`: ",
                    path.display(),
                    line_of(&text, &problem)
                ),
                field,
                problem,
            }),
            Err(other) => Err(other),
        }
    }

    /// These settings with `flags` on top: lists extended, single values replaced.
    pub fn overlay(mut self, flags: ConfigFile) -> ConfigFile {
        self.listen = flags.listen.or(self.listen);
        self.allow.extend(flags.allow);
        self.deny.extend(flags.deny);
        self.allow_net.extend(flags.allow_net);
        self.allow_port.extend(flags.allow_port);
        self.mode = flags.mode.or(self.mode);
        let (mine, theirs) = (&mut self.limits, flags.limits);
        mine.max_connections = theirs.max_connections.or(mine.max_connections);
        mine.max_header_bytes = theirs.max_header_bytes.or(mine.max_header_bytes);
        mine.header_read_timeout_secs = theirs
            .header_read_timeout_secs
            .or(mine.header_read_timeout_secs);
        mine.idle_timeout_secs = theirs.idle_timeout_secs.or(mine.idle_timeout_secs);
        mine.connect_timeout_secs = theirs.connect_timeout_secs.or(mine.connect_timeout_secs);
        self.access_log = flags.access_log.or(self.access_log);
        self.metrics = flags.metrics.or(self.metrics);
        self
    }

    /// The proxy configuration these settings describe (without an access log sender,
    /// which the caller opens).
    pub fn into_config(self) -> Result<ProxyConfig, ConfigError> {
        let value = |field: &str, problem: String| ConfigError::Value {
            where_: format!(
                "--{}: ",
                field
                    .trim_start_matches("limits.")
                    .trim_end_matches("_secs")
                    .replace('_', "-")
            ),
            field: field.to_string(),
            problem,
        };
        let (url_rules, hosts): (Vec<&String>, Vec<&String>) = self
            .allow
            .iter()
            .partition(|rule| crate::urlrule::is_url_rule(rule));
        let allowlist = Allowlist::parse(hosts).map_err(|e| value("allow", e.to_string()))?;
        let url_rules = url_rules
            .into_iter()
            .map(|rule| rule.parse::<crate::urlrule::UrlRule>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| value("allow", e.to_string()))?;
        let denylist = Allowlist::parse(&self.deny).map_err(|e| value("deny", e.to_string()))?;
        let allowed_nets = self
            .allow_net
            .iter()
            .map(|net| net.parse::<IpNet>())
            .collect::<Result<_, _>>()
            .map_err(|e| value("allow_net", e.to_string()))?;
        if self.allow_port.contains(&0) {
            return Err(value(
                "allow_port",
                "port 0 cannot be dialled; give ports from 1 to 65535".to_string(),
            ));
        }
        let mut config = ProxyConfig::new(allowlist);
        config.denylist = denylist;
        config.url_rules = url_rules;
        config.allowed_nets = allowed_nets;
        if !self.allow_port.is_empty() {
            config.allowed_ports = self.allow_port.into_iter().collect();
        } else {
            config.allowed_ports = DEFAULT_PORTS.into_iter().collect();
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        config.mode = self.mode.unwrap_or_default();
        config.limits = self
            .limits
            .into_limits()
            .map_err(|(field, problem)| value(&format!("limits.{field}"), problem))?;
        Ok(config)
    }
}

impl LimitsFile {
    fn into_limits(self) -> Result<Limits, (&'static str, String)> {
        let mut limits = Limits::default();
        if let Some(max) = self.max_connections {
            if max == 0 {
                return Err((
                    "max_connections",
                    "0 would refuse everyone; give at least 1".into(),
                ));
            }
            limits.max_connections = max;
        }
        if let Some(max) = self.max_header_bytes {
            if max < MIN_HEADER_BYTES {
                return Err((
                    "max_header_bytes",
                    format!("{max} is too small; give at least {MIN_HEADER_BYTES}"),
                ));
            }
            limits.max_header_bytes = max;
        }
        for (field, secs, slot) in [
            (
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                &mut limits.header_read_timeout,
            ),
            (
                "idle_timeout_secs",
                self.idle_timeout_secs,
                &mut limits.idle_timeout,
            ),
            (
                "connect_timeout_secs",
                self.connect_timeout_secs,
                &mut limits.connect_timeout,
            ),
        ] {
            if let Some(secs) = secs {
                *slot = Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or((field, format!("{secs} is not a positive number of seconds")))?;
            }
        }
        Ok(limits)
    }
}

/// ` line N` for the first line of `text` holding the quoted value that `problem` names,
/// or nothing if none does.
fn line_of(text: &str, problem: &str) -> String {
    let quoted = problem
        .split('"')
        .nth(1)
        .filter(|value| !value.is_empty())
        .map(|value| format!("\"{value}\""));
    let Some(quoted) = quoted else {
        return String::new();
    };
    text.lines()
        .position(|line| line.contains(&quoted))
        .map(|index| format!(" line {}", index + 1))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        (dir, path)
    }

    #[test]
    fn toml_and_json_files_say_the_same() {
        let (_d1, toml) = write(
            "proxy.toml",
            "listen = \"127.0.0.1:3128\"\nallow = [\"example.org:443,8443\"]\ndeny = [\"a.example.org\"]\n\
             allow_net = [\"127.0.0.0/8\"]\nallow_port = [8080]\nmode = \"report\"\n\
             [limits]\nmax_connections = 5\nidle_timeout_secs = 2.5\n",
        );
        let (_d2, json) = write(
            "proxy.json",
            r#"{"listen": "127.0.0.1:3128", "allow": ["example.org:443,8443"], "deny": ["a.example.org"],
                "allow_net": ["127.0.0.0/8"], "allow_port": [8080], "mode": "report",
                "limits": {"max_connections": 5, "idle_timeout_secs": 2.5}}"#,
        );
        let toml = ConfigFile::load(&toml).expect("toml");
        assert_eq!(toml, ConfigFile::load(&json).expect("json"));
        let config = toml.into_config().expect("valid");
        assert_eq!(config.mode, Mode::Report);
        assert_eq!(config.limits.max_connections, 5);
        assert_eq!(config.limits.idle_timeout, Duration::from_millis(2500));
        assert_eq!(config.allowed_ports, [8080].into());
        assert_eq!(config.denylist.rules().len(), 1);
    }

    #[test]
    fn flags_extend_lists_and_replace_values() {
        let file = ConfigFile {
            allow: vec!["a.org".into()],
            mode: Some(Mode::Report),
            ..ConfigFile::default()
        };
        let flags = ConfigFile {
            allow: vec!["b.org".into()],
            mode: Some(Mode::Enforce),
            ..ConfigFile::default()
        };
        let merged = file.overlay(flags);
        assert_eq!(merged.allow, ["a.org", "b.org"]);
        assert_eq!(merged.mode, Some(Mode::Enforce));
        assert_eq!(
            merged.into_config().expect("valid").allowed_ports,
            [80, 443].into()
        );
    }

    #[test]
    fn unknown_fields_name_the_file_line_and_field() {
        let (_d, path) = write("p.toml", "allow = [\"a.org\"]\nalow_port = [80]\n");
        let message = ConfigFile::load(&path).expect_err("typo").to_string();
        assert!(message.contains("p.toml"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("alow_port"), "{message}");
        let (_d, path) = write("p.json", "{\n \"limits\": {\"max_conns\": 1}\n}");
        let message = ConfigFile::load(&path).expect_err("typo").to_string();
        assert!(message.contains("p.json"), "{message}");
        assert!(
            message.contains("max_conns") && message.contains("line 2"),
            "{message}"
        );
    }

    #[test]
    fn invalid_values_name_the_file_line_and_field() {
        let (_d, path) = write("p.toml", "allow = [\n  \"a.org\",\n  \"*foo.com\",\n]\n");
        let message = ConfigFile::load(&path).expect_err("bad rule").to_string();
        assert!(
            message.contains("p.toml line 3: field `allow`"),
            "{message}"
        );
        assert!(message.contains("*.example.org"), "{message}");
        let (_d, path) = write("p.toml", "[limits]\nmax_header_bytes = 100\n");
        let message = ConfigFile::load(&path).expect_err("small").to_string();
        assert!(message.contains("limits.max_header_bytes"), "{message}");
        assert!(message.contains("at least 8192"), "{message}");
        let (_d, path) = write("p.yaml", "allow: []\n");
        let message = ConfigFile::load(&path).expect_err("yaml").to_string();
        assert!(message.contains("*.toml or *.json"), "{message}");
    }
}
