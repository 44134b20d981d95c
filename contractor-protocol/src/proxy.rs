//! The proxy's stdout messages after its ready line: one [`Decision`] per request, with
//! `--record-downloads` one [`Download`] per response it forwarded, and one [`Summary`] of
//! its counters as the last line when it stops.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The most refused hosts a build's result names, and the most hosts it names as failed
/// (the proxy's decisions file has them all).
pub const MAX_REFUSED_HOSTS: usize = 1024;

/// The most bytes of a failure's reason kept in a build's result: 512.
pub const MAX_FAILURE_REASON_BYTES: usize = 512;

/// What a build's `result.json` says of its proxy's refusals, tallied from its decision
/// lines by the one rule every writer of results uses (`contractor build` as the lines come,
/// `contractor-store record close` from `proxy.jsonl`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refusals {
    /// The hosts its policy refused (at most [`MAX_REFUSED_HOSTS`]).
    pub refused: BTreeSet<String>,
    /// Allowed hosts it could not reach: the first reason (at most
    /// [`MAX_FAILURE_REASON_BYTES`]) and how many times (at most [`MAX_REFUSED_HOSTS`] hosts).
    pub failures: BTreeMap<String, (String, u64)>,
}

impl Refusals {
    /// Counts one decision line: a refusal of an allowed host's resolution or connection
    /// (class `upstream`) is a failure; a refusal of the request itself (class `request`:
    /// malformed, another authority inside inspected TLS, over capacity) names no host the
    /// allow list could permit, so it is neither (proxy.jsonl has it); any other refusal
    /// is the policy's (lines from a proxy that does not classify are taken as the
    /// policy's).
    pub fn note(&mut self, decision: &Decision) {
        if decision.decision != Verdict::Deny || decision.class == Some(DecisionClass::Request) {
            return;
        }
        if decision.class == Some(DecisionClass::Upstream) {
            if let Some((_, count)) = self.failures.get_mut(&decision.host) {
                *count += 1;
            } else if self.failures.len() < MAX_REFUSED_HOSTS {
                let mut reason = decision.reason.clone();
                if reason.len() > MAX_FAILURE_REASON_BYTES {
                    let mut cut = MAX_FAILURE_REASON_BYTES;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    reason.push('…');
                }
                self.failures.insert(decision.host.clone(), (reason, 1));
            }
        } else if self.refused.len() < MAX_REFUSED_HOSTS {
            self.refused.insert(decision.host.clone());
        }
    }

    /// The failures as `result.json` lists them, sorted by host.
    pub fn upstream_failures(&self) -> Vec<crate::result::UpstreamFailure> {
        self.failures
            .iter()
            .map(|(host, (reason, count))| crate::result::UpstreamFailure {
                host: host.clone(),
                reason: reason.clone(),
                count: *count,
            })
            .collect()
    }
}

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
    /// For a refusal, what kind it is: the policy's, a failure of an allowed host's
    /// resolution or connection, or a bad request. Absent on allowed lines and from older
    /// proxies (readers then take a refusal as the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<DecisionClass>,
    /// The build's phase the proxy served (`--record-phase`), in a build's record when the
    /// build has a fetch phase; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::agent::Phase>,
}

/// What kind of refusal a `deny` [`Decision`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionClass {
    /// The policy refused it: the host, port or URL is not allowed (adding the host to
    /// `[network] allow` may permit it).
    Policy,
    /// The host is allowed, but resolving it or connecting to it (TCP or TLS) failed: the
    /// allow list is not at fault.
    Upstream,
    /// The request itself was refused: malformed, too big, over the proxy's capacity, or
    /// looping back into the proxy.
    Request,
}

/// The `"type"` of a [`Decision`] line (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionTag {
    /// `"decision"`
    Decision,
}

/// One response the proxy forwarded, written when its body has ended (or was cut):
/// what came from where, and the SHA-256 of exactly the bytes the client got.
///
/// `{"type":"download","time":1764700000.123,"method":"GET",
/// "url":"http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
/// "status":200,"size":53064,"sha256":"…","content_type":"application/vnd.debian.binary-package",
/// "complete":true}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    /// Always `download`.
    #[serde(rename = "type")]
    pub kind: DownloadTag,
    /// Seconds since the Unix epoch when the response began, with milliseconds.
    pub time: DownloadTime,
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The URL as the client asked for it (absolute, at most the proxy's header limit).
    pub url: String,
    /// The upstream's status code.
    pub status: u16,
    /// Bytes of the body the client was sent.
    pub size: u64,
    /// SHA-256 of those bytes, lower-case hex.
    pub sha256: String,
    /// The response's `Content-Type`, when it had one (at most 256 bytes, else left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// False when the body ended early (the upstream or the client went away, or the proxy
    /// withheld the end of a download that did not match its pin): `size` and `sha256` are
    /// then of the part that came from the upstream.
    pub complete: bool,
    /// With `--pins`, the SHA-256 the URL is pinned to. When it differs from `sha256`, the
    /// proxy did not pass on the body's last bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// True when the proxy served the body from its download cache (`--cache`), not from
    /// the network; `sha256` is then the hash the cached bytes had.
    #[serde(default, skip_serializing_if = "is_false")]
    pub from_cache: bool,
    /// As [`Decision::phase`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::agent::Phase>,
}

fn is_false(value: &bool) -> bool {
    !value
}

impl Download {
    /// True when the URL is pinned and the bytes were others.
    pub fn mismatched(&self) -> bool {
        self.pinned.as_ref().is_some_and(|pin| *pin != self.sha256)
    }
}

/// A [`Download`]'s time: seconds since the Unix epoch, in thousandths (kept as an integer
/// so that the type compares exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DownloadTime(pub u64);

impl Serialize for DownloadTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0 as f64 / 1000.0)
    }
}

impl<'de> Deserialize<'de> for DownloadTime {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        if !(0.0..1e12).contains(&secs) {
            return Err(serde::de::Error::custom("a time in seconds since 1970"));
        }
        Ok(DownloadTime((secs * 1000.0).round() as u64))
    }
}

/// The `"type"` of a [`Download`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadTag {
    /// `"download"`
    Download,
}

/// A line the proxy writes after its ready line and before its summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProxyLine {
    /// One per request.
    Decision(Decision),
    /// One per forwarded response, with `--record-downloads`.
    Download(Download),
}

/// The most bytes of a `Content-Type` kept in a [`Download`].
pub const MAX_CONTENT_TYPE: usize = 256;

/// The last line on the proxy's stdout, written once it has stopped (SIGTERM or SIGINT)
/// and every connection is gone: what it did while it ran.
///
/// `{"type":"summary","allowed":12,"denied":{"host_not_allowed":3},"bytes_up":10240,
/// "bytes_down":52428800,"connections":15,"active_connections":0,"name_lookups":2}`
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
    /// Host names looked up with the resolver: each attempt of a lookup counts (one
    /// `getaddrinfo`, whose DNS queries are usually two, A and AAAA); an answer reused from
    /// the proxy's name cache does not. Absent (0) from a proxy of an older release.
    #[serde(default)]
    pub name_lookups: u64,
    /// With `--cache`, downloads passed on but not kept in the download cache (the run's
    /// `--cache-max` was used, or the cache was full of entries other projects pin); left
    /// out when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_not_kept: u64,
    /// With `--record DIR`: what the proxy filed in the record, tallied for the build's
    /// result; absent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordTally>,
    /// As [`Decision::phase`] (the copy in a build's `proxy.jsonl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::agent::Phase>,
}

/// The most bytes the proxy writes to each of a record's `proxy.jsonl` and
/// `downloads.jsonl` (`--record`): 64 MiB; past it, one `{"type":"cut",...}` line says so
/// and later lines are counted in [`RecordTally::left_out`], not written (but for the
/// proxy's summary, filed last whatever the size: one bounded line). A guest decides
/// how many requests it makes. Two proxies of one build (the fetch and the script phase's)
/// each write at most this much.
pub const MAX_RECORD_FILE: u64 = 64 << 20;

/// The most pin mismatches a [`RecordTally`] describes (downloads.jsonl has them all).
pub const MAX_MISMATCHES: usize = 16;

/// What a proxy run with `--record` filed, as its [`Summary`] says: the build's result is
/// made from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordTally {
    /// The hosts the policy refused, sorted (at most [`MAX_REFUSED_HOSTS`]).
    pub refused_hosts: Vec<String>,
    /// Allowed hosts that could not be reached, sorted by host (at most
    /// [`MAX_REFUSED_HOSTS`]).
    pub upstream_failures: Vec<crate::result::UpstreamFailure>,
    /// Downloads whose bytes were not those `--pins` names: all of them counted.
    pub mismatches: u64,
    /// The first [`MAX_MISMATCHES`] of them.
    pub mismatched: Vec<Mismatch>,
    /// With `--pins`: GETs answered 200 of URLs the pins do not name.
    pub unpinned: u64,
    /// Lines not written because their file had reached [`MAX_RECORD_FILE`] bytes.
    pub left_out: u64,
}

/// A download whose bytes were not the pinned ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mismatch {
    /// The URL.
    pub url: String,
    /// The SHA-256 of the bytes seen.
    pub sha256: String,
    /// The SHA-256 the pins name.
    pub pinned: String,
    /// Whether the bytes were the download cache's copy.
    pub from_cache: bool,
}

impl RecordTally {
    /// Counts one line the proxy filed; `pinned`: it was given `--pins`.
    pub fn note(&mut self, refusals: &mut Refusals, line: &ProxyLine, pinned: bool) {
        match line {
            ProxyLine::Decision(decision) => refusals.note(decision),
            ProxyLine::Download(download) if download.mismatched() => {
                self.mismatches += 1;
                if self.mismatched.len() < MAX_MISMATCHES {
                    self.mismatched.push(Mismatch {
                        url: download.url.clone(),
                        sha256: download.sha256.clone(),
                        pinned: download.pinned.clone().unwrap_or_default(),
                        from_cache: download.from_cache,
                    });
                }
            }
            ProxyLine::Download(download) => {
                if pinned
                    && download.pinned.is_none()
                    && download.method == "GET"
                    && download.status == 200
                {
                    self.unpinned += 1;
                }
            }
        }
    }

    /// The tally with `refusals`' hosts in it.
    pub fn with_refusals(mut self, refusals: &Refusals) -> RecordTally {
        self.refused_hosts = refusals.refused.iter().cloned().collect();
        self.upstream_failures = refusals.upstream_failures();
        self
    }
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// The `"type"` of a [`Summary`] line (a one-value field, see `service::ReadyTag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryTag {
    /// `"summary"`
    Summary,
}

/// The answer of `contractor-proxy cache list --dir DIR` (what the download cache holds) and
/// of `contractor-proxy cache clear --dir DIR` (what it removed):
/// `{"type":"download_cache","version":1,"entries":3,"bytes":1048576}`,
/// `{"type":"download_cache_cleared","version":1,"entries":3,"bytes":1048576}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadCacheUsage {
    /// `download_cache` (list) or `download_cache_cleared` (clear).
    #[serde(rename = "type")]
    pub kind: DownloadCacheTag,
    /// Protocol version, 1.
    pub version: u32,
    /// Entries (downloads kept, by SHA-256).
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl DownloadCacheUsage {
    /// The answer `kind` counting `entries` of `bytes`.
    pub fn new(kind: DownloadCacheTag, entries: u64, bytes: u64) -> DownloadCacheUsage {
        DownloadCacheUsage {
            kind,
            version: crate::PROTOCOL_VERSION,
            entries,
            bytes,
        }
    }
}

/// The `"type"` of a [`DownloadCacheUsage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadCacheTag {
    /// `"download_cache"`: what the cache holds.
    DownloadCache,
    /// `"download_cache_cleared"`: what was removed.
    DownloadCacheCleared,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the proxy writes to proxy.jsonl, as it writes it.
    fn decisions(lines: &[&str]) -> Refusals {
        let mut refusals = Refusals::default();
        for line in lines {
            match serde_json::from_str::<ProxyLine>(line).expect("a decision line") {
                ProxyLine::Decision(decision) => refusals.note(&decision),
                other => panic!("not a decision: {other:?}"),
            }
        }
        refusals
    }

    #[test]
    fn an_allowed_host_that_cannot_be_reached_is_a_failure_not_a_refusal() {
        let head = r#"{"type":"decision","time":1.0,"client":"127.0.0.1:5000","method":"CONNECT","port":443"#;
        let line = |host: &str, decision: &str, reason: &str, class: &str| {
            format!(
                r#"{head},"host":"{host}","decision":"{decision}","reason":"{reason}"{class}}}"#
            )
        };
        let lines = [
            line(
                "registry.npmjs.org",
                "allow",
                "allowed by registry.npmjs.org",
                "",
            ),
            line(
                "registry.npmjs.org",
                "deny",
                "cannot resolve the host: no answer within 10 s",
                r#","class":"upstream""#,
            ),
            line(
                "registry.npmjs.org",
                "deny",
                "TLS to registry.npmjs.org:443 failed: Connection reset by peer",
                r#","class":"upstream""#,
            ),
            line(
                "evil.example",
                "deny",
                "host not on the allowlist",
                r#","class":"policy""#,
            ),
            // A proxy that does not classify: a refusal, as before.
            line("old.example", "deny", "host not on the allowlist", ""),
        ];
        let refusals = decisions(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            refusals.refused.into_iter().collect::<Vec<_>>(),
            ["evil.example", "old.example"]
        );
        assert_eq!(
            refusals.failures.into_iter().collect::<Vec<_>>(),
            [(
                "registry.npmjs.org".to_string(),
                (
                    "cannot resolve the host: no answer within 10 s".to_string(),
                    2
                )
            )]
        );
    }

    #[test]
    fn a_refused_request_names_no_host_to_allow() {
        // Inside inspected TLS to an allowed host, a request naming another authority is
        // refused with the CONNECT target as its host: allowing that host changes nothing.
        let foreign = r#"{"type":"decision","time":1.0,"client":"127.0.0.1:5000","method":"GET","host":"registry.npmjs.org","port":443,"decision":"deny","reason":"the request names evil.example, but its TLS session is to registry.npmjs.org:443 (the CONNECT target)","class":"request"}"#;
        let busy = r#"{"type":"decision","time":1.0,"client":"127.0.0.1:5000","method":"CONNECT","host":"crates.io","port":443,"decision":"deny","reason":"too many connections (at most 256); try again shortly","class":"request"}"#;
        let refusals = decisions(&[foreign, busy]);
        assert!(refusals.refused.is_empty(), "{:?}", refusals);
        assert!(refusals.failures.is_empty(), "{:?}", refusals);
    }

    #[test]
    fn a_download_reads_and_writes_the_documented_line() {
        let line = r#"{"type":"download","time":1764700000.123,"method":"GET","url":"http://deb.debian.org/x.deb","status":200,"size":3,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","content_type":"application/vnd.debian.binary-package","complete":true}"#;
        let download: Download = serde_json::from_str(line).expect("parse");
        assert_eq!(download.time, DownloadTime(1_764_700_000_123));
        assert_eq!(download.size, 3);
        assert_eq!(serde_json::to_string(&download).expect("json"), line);
        let decision_like = line.replace(r#""type":"download""#, r#""type":"decision""#);
        assert!(serde_json::from_str::<Download>(&decision_like).is_err());
        let no_type = line.replace(
            r#","content_type":"application/vnd.debian.binary-package""#,
            "",
        );
        let untyped: Download = serde_json::from_str(&no_type).expect("no content type");
        assert_eq!(untyped.content_type, None);
    }

    #[test]
    fn the_summary_reads_and_writes_the_documented_line() {
        let line = r#"{"type":"summary","allowed":12,"denied":{"host_not_allowed":3},"bytes_up":10240,"bytes_down":52428800,"connections":15,"active_connections":0,"name_lookups":2}"#;
        let summary: Summary = serde_json::from_str(line).expect("parse");
        assert_eq!(summary.name_lookups, 2);
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
        // An older proxy's line, without the count, reads as none.
        let older = line.replace(r#","name_lookups":2"#, "");
        let older: Summary = serde_json::from_str(&older).expect("parse an older line");
        assert_eq!(older.name_lookups, 0);
    }
}
