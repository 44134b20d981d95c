//! `--record DIR`: the proxy files its own lines in a build's record.
//!
//! Each decision goes to `DIR/proxy.jsonl`, each download to `DIR/downloads.jsonl`, with
//! `"phase"` added when the proxy serves one phase of a build that has two
//! (`--record-phase`). Both files are opened for appending before the proxy confines
//! itself, so that the two proxies of one build (the fetch and the script phase's) can
//! write them at once: a line is one `write(2)` to a file opened `O_APPEND`, so lines of
//! the two never mix. Each proxy writes at most [`MAX_RECORD_FILE`] bytes to each file;
//! past that one `cut` line says so and the rest is counted. What the lines say that the
//! build's result needs (the hosts refused, the downloads that did not match their pins) is
//! tallied on the way and reported in the summary ([`RecordTally`]), which is also filed
//! last in `proxy.jsonl` (even past the file's limit: it is one bounded line, and what
//! `contractor-store record close` fails a build with a pin mismatch from).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use contractor_protocol::agent::Phase;
use contractor_protocol::jsonl::{encode_line, JsonlError};
pub use contractor_protocol::proxy::MAX_RECORD_FILE;
use contractor_protocol::proxy::{ProxyLine, RecordTally, Refusals, Summary};

/// The record's file of decisions.
pub const DECISIONS_FILE: &str = "proxy.jsonl";
/// The record's file of downloads.
pub const DOWNLOADS_FILE: &str = "downloads.jsonl";

/// Where a proxy run with `--record` writes, and what it has tallied.
pub struct Record {
    decisions: Capped,
    downloads: Capped,
    phase: Option<Phase>,
    pinned: bool,
    refusals: Refusals,
    tally: RecordTally,
    line: Vec<u8>,
}

impl Record {
    /// Opens (appending; made if missing, not through a link) the two files in `dir`;
    /// `pinned`: the proxy was given `--pins`, so a GET of a URL it does not pin is counted.
    pub fn open(dir: &Path, phase: Option<Phase>, pinned: bool) -> std::io::Result<Record> {
        Ok(Record {
            decisions: Capped::open(&dir.join(DECISIONS_FILE), MAX_RECORD_FILE)?,
            downloads: Capped::open(&dir.join(DOWNLOADS_FILE), MAX_RECORD_FILE)?,
            phase,
            pinned,
            refusals: Refusals::default(),
            tally: RecordTally::default(),
            line: Vec::new(),
        })
    }

    /// Tallies `line` and writes it to its file.
    pub fn write(&mut self, mut line: ProxyLine) -> Result<(), JsonlError> {
        self.tally.note(&mut self.refusals, &line, self.pinned);
        let file = match &mut line {
            ProxyLine::Decision(decision) => {
                decision.phase = self.phase;
                &mut self.decisions
            }
            ProxyLine::Download(download) => {
                download.phase = self.phase;
                &mut self.downloads
            }
        };
        self.line.clear();
        encode_line(&mut self.line, &line)?;
        file.write(&self.line).map_err(JsonlError::Io)
    }

    /// Once the last line is written: puts the tally into `summary` and files it last in
    /// `proxy.jsonl`, even when the file has reached its limit (the summary is one bounded
    /// line: `contractor-store record close` fails a build whose download did not match its
    /// pin from it).
    pub fn finish(mut self, summary: &mut Summary) -> Result<(), JsonlError> {
        let mut tally = std::mem::take(&mut self.tally).with_refusals(&self.refusals);
        tally.left_out = self.decisions.left_out + self.downloads.left_out;
        summary.record = Some(tally);
        summary.phase = self.phase;
        self.line.clear();
        encode_line(&mut self.line, summary)?;
        let written = self
            .decisions
            .write_last(&self.line)
            .map_err(JsonlError::Io);
        summary.phase = None;
        written
    }
}

/// A file that takes at most `limit` bytes of lines.
struct Capped {
    file: File,
    written: u64,
    limit: u64,
    left_out: u64,
}

impl Capped {
    fn open(path: &Path, limit: u64) -> std::io::Result<Capped> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Capped {
            file,
            written: 0,
            limit,
            left_out: 0,
        })
    }

    /// Writes `line` (ending in a newline) in one call, or counts it once the file is full.
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let size = line.len() as u64;
        if self.written + size > self.limit {
            if self.left_out == 0 {
                let cut = format!(
                    "{{\"type\":\"cut\",\"limit\":{},\"reason\":\"the file reached its limit; later lines are left out\"}}\n",
                    self.limit
                );
                self.file.write_all(cut.as_bytes())?;
            }
            self.left_out += 1;
            return Ok(());
        }
        self.written += size;
        self.file.write_all(line)
    }

    /// Writes `line`, the file's last (a bounded one), whether or not the file is full.
    fn write_last(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.written += line.len() as u64;
        self.file.write_all(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contractor_protocol::proxy::{
        Decision, DecisionClass, DecisionTag, Download, DownloadTag, DownloadTime, Verdict,
    };

    fn decision(host: &str, verdict: Verdict, class: Option<DecisionClass>) -> ProxyLine {
        ProxyLine::Decision(Decision {
            kind: DecisionTag::Decision,
            time: 1.0,
            client: "127.0.0.1:1".into(),
            method: "CONNECT".into(),
            host: host.into(),
            port: 443,
            decision: verdict,
            reason: "because".into(),
            class,
            phase: None,
        })
    }

    fn download(url: &str, sha256: &str, pinned: Option<&str>) -> ProxyLine {
        ProxyLine::Download(Download {
            kind: DownloadTag::Download,
            time: DownloadTime(1),
            method: "GET".into(),
            url: url.into(),
            status: 200,
            size: 3,
            sha256: sha256.into(),
            content_type: None,
            complete: true,
            pinned: pinned.map(str::to_string),
            from_cache: false,
            phase: None,
        })
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn lines_go_to_their_files_with_the_phase_and_are_tallied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = Record::open(dir.path(), Some(Phase::Fetch), true).expect("open");
        record
            .write(decision(
                "evil.example",
                Verdict::Deny,
                Some(DecisionClass::Policy),
            ))
            .expect("write");
        record
            .write(decision(
                "down.example",
                Verdict::Deny,
                Some(DecisionClass::Upstream),
            ))
            .expect("write");
        record
            .write(decision("ok.example", Verdict::Allow, None))
            .expect("write");
        record
            .write(download(
                "http://a/x",
                &"1".repeat(64),
                Some(&"2".repeat(64)),
            ))
            .expect("write");
        record
            .write(download("http://a/y", &"3".repeat(64), None))
            .expect("write");
        let mut summary: Summary = serde_json::from_str(
            r#"{"type":"summary","allowed":1,"denied":{},"bytes_up":0,"bytes_down":0,"connections":3,"active_connections":0}"#,
        )
        .expect("a summary");
        record.finish(&mut summary).expect("finish");
        let tally = summary.record.clone().expect("the tally");
        assert_eq!(tally.refused_hosts, ["evil.example"]);
        assert_eq!(tally.upstream_failures.len(), 1);
        assert_eq!(tally.upstream_failures[0].host, "down.example");
        assert_eq!(tally.mismatches, 1);
        assert_eq!(tally.mismatched[0].url, "http://a/x");
        assert_eq!(tally.unpinned, 1);
        assert_eq!(tally.left_out, 0);
        let decisions = lines(&dir.path().join(DECISIONS_FILE));
        let downloads = lines(&dir.path().join(DOWNLOADS_FILE));
        // The three decisions, then the summary.
        assert_eq!(decisions.len(), 4);
        assert_eq!(decisions[3]["type"], "summary");
        assert_eq!(decisions[3]["record"]["unpinned"], 1);
        assert_eq!(downloads.len(), 2);
        assert!(decisions
            .iter()
            .chain(&downloads)
            .all(|l| l["phase"] == "fetch"));
        // What the proxy filed is what readers of the record parse.
        for line in decisions[..3].iter().chain(&downloads) {
            serde_json::from_value::<ProxyLine>(line.clone()).expect("a proxy line");
        }
        serde_json::from_value::<Summary>(decisions[3].clone()).expect("a summary");
    }

    #[test]
    fn two_writers_append_whole_lines_and_a_full_file_is_cut_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DECISIONS_FILE);
        let mut one = Capped::open(&path, 20).expect("open");
        let mut two = Capped::open(&path, 1 << 20).expect("open");
        one.write(b"{\"n\":1}\n").expect("write");
        two.write(b"{\"n\":2}\n").expect("write");
        one.write(b"{\"n\":3}\n").expect("write");
        one.write(b"{\"n\":4}\n").expect("write");
        one.write(b"{\"n\":5}\n").expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        assert!(
            lines[3].starts_with("{\"type\":\"cut\",\"limit\":20,"),
            "{text}"
        );
        assert_eq!(lines.len(), 4);
        assert_eq!(one.left_out, 2);
    }

    #[test]
    fn the_summary_is_filed_last_even_in_a_full_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = Record::open(dir.path(), None, true).expect("open");
        // Files that hold one line each.
        record.decisions.limit = 200;
        record.downloads.limit = 300;
        for host in ["a.example", "b.example"] {
            record
                .write(decision(host, Verdict::Deny, Some(DecisionClass::Policy)))
                .expect("write");
        }
        for url in ["http://a/x", "http://a/y"] {
            record
                .write(download(url, &"1".repeat(64), Some(&"2".repeat(64))))
                .expect("write");
        }
        let mut summary: Summary = serde_json::from_str(
            r#"{"type":"summary","allowed":0,"denied":{},"bytes_up":0,"bytes_down":0,"connections":2,"active_connections":0}"#,
        )
        .expect("a summary");
        record.finish(&mut summary).expect("finish");
        let decisions = lines(&dir.path().join(DECISIONS_FILE));
        assert_eq!(decisions.len(), 3, "{decisions:?}");
        assert_eq!(decisions[1]["type"], "cut");
        // What `record close` fails the build from: both mismatches, though the second's
        // line was left out of downloads.jsonl.
        let filed: Summary = serde_json::from_value(decisions[2].clone()).expect("a summary");
        let tally = filed.record.expect("the tally");
        assert_eq!(tally.mismatches, 2);
        assert_eq!(tally.mismatched.len(), 2);
        assert_eq!(tally.left_out, 2);
        assert_eq!(
            lines(&dir.path().join(DOWNLOADS_FILE)).len(),
            2,
            "one, then the cut"
        );
    }

    #[test]
    fn a_link_in_place_of_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(DOWNLOADS_FILE))
            .expect("symlink");
        let err = Record::open(dir.path(), None, false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains(DOWNLOADS_FILE), "{err}");
    }
}
