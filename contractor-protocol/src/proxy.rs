//! The proxy's stdout messages after its ready line: one [`Decision`] per request, and one
//! [`Summary`] of its counters as the last line when it stops.

use std::collections::BTreeMap;

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

/// The last line on the proxy's stdout, written once it has stopped (SIGTERM or SIGINT)
/// and every connection is gone: what it did while it ran.
///
/// `{"type":"summary","allowed":12,"denied":{"host_not_allowed":3},"bytes_up":10240,
/// "bytes_down":52428800,"connections":15,"active_connections":0}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Always `summary`.
    #[serde(rename = "type")]
    pub kind: SummaryTag,
    /// Requests let through: `allow` decisions (in report mode, also those that would have
    /// been refused).
    pub allowed: u64,
    /// Requests refused, by reason class (`host_not_allowed`, `deny_rule`,
    /// `port_not_allowed`, `address_refused`, `unresolvable`, `bad_request`,
    /// `host_mismatch`, `own_address`, `over_capacity`, `head_too_large`); classes that
    /// never occurred are left out.
    pub denied: BTreeMap<String, u64>,
    /// Bytes sent to upstreams (request heads and bodies, tunnel bytes).
    pub bytes_up: u64,
    /// Bytes received from upstreams (response heads and bodies, tunnel bytes).
    pub bytes_down: u64,
    /// Client connections accepted.
    pub connections: u64,
    /// Client connections still open: 0 once the proxy has stopped, unless its shutdown cut
    /// some that were slow to close.
    pub active_connections: i64,
}

/// The `"type"` of a [`Summary`] line (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryTag {
    /// `"summary"`
    Summary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reads_and_writes_the_documented_line() {
        let line = r#"{"type":"summary","allowed":12,"denied":{"host_not_allowed":3},"bytes_up":10240,"bytes_down":52428800,"connections":15,"active_connections":0}"#;
        let summary: Summary = serde_json::from_str(line).expect("parse");
        assert_eq!(
            (
                summary.kind,
                summary.allowed,
                summary.denied.get("host_not_allowed")
            ),
            (SummaryTag::Summary, 12, Some(&3))
        );
        assert_eq!(serde_json::to_string(&summary).expect("json"), line);
        let decision_like = line.replace(r#""type":"summary""#, r#""type":"decision""#);
        assert!(serde_json::from_str::<Summary>(&decision_like).is_err());
        let extra = line.replace(r#""allowed":12"#, r#""allowed":12,"refused":1"#);
        assert!(serde_json::from_str::<Summary>(&extra).is_err());
    }
}
