//! The proxy's per-request decision, one JSON line each on its log.

use serde::{Deserialize, Serialize};

/// Whether the proxy let a request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forwarded.
    Allow,
    /// Refused with 403.
    Deny,
}

/// `{"type":"decision","time":"...","client":"127.0.0.1:5000","method":"CONNECT",
/// "host":"example.com","port":443,"decision":"deny","reason":"host not on the allowlist"}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Always `decision`.
    #[serde(rename = "type")]
    pub kind: DecisionTag,
    /// Seconds since the Unix epoch, with milliseconds.
    pub time: f64,
    /// The client's address.
    pub client: String,
    /// `CONNECT`, `GET`, ...
    pub method: String,
    /// The target host as the client named it (lower-cased).
    pub host: String,
    /// The target port.
    pub port: u16,
    /// Allowed or refused.
    pub decision: Verdict,
    /// Why: the rule that matched, or why none did.
    pub reason: String,
}

/// The `"type"` of a [`Decision`] line (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionTag {
    /// `"decision"`
    Decision,
}
