//! What `contractor build` shows while it runs, from its [`BuildEvent`]s.
//!
//! - On a terminal: each phase (image, boot, source, build, artifacts) as a status line at
//!   the bottom with a spinner and its elapsed time, a `✓` line when it ends, and the build's
//!   own output streamed above the status line.
//! - Not on a terminal: plain `contractor: …` lines on stderr, one per step, and the output
//!   on stdout as it comes.
//! - `--quiet`: nothing while the build runs.
//! - `--json`: every event as one JSON line on stdout (docs/protocol.md), nothing else.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contractor_protocol::agent::Phase;
use contractor_protocol::build::BuildEvent;
use contractor_protocol::store::{SourceRule, SourceSelection};
use contractor_protocol::vm::SnapshotReport;

/// Most bytes of one guest-provided error message shown in the summary: 4 KiB.
pub const MAX_SHOWN_MESSAGE_BYTES: usize = 4096;

/// Whether `c` must not reach the terminal as it is: C0 controls, DEL, C1 controls, the
/// bidirectional overrides and isolates, and invisible marks and line separators.
fn is_unsafe(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' | '\u{200b}'..='\u{200f}' | '\u{2028}' | '\u{2029}'
        | '\u{61c}' | '\u{feff}')
}

/// `text` (guest- or project-chosen) as contractor prints it in its own lines: control and
/// bidi characters as visible escapes (`\x1b`, `\n`, `\u{202e}`), everything else as is.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < '\u{80}' && is_unsafe(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// [`escape`], cut to at most `max` bytes of the original (on a character boundary), saying
/// how much was left out.
pub fn escape_capped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return escape(text).into_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} more bytes not shown)",
        escape(&text[..end]),
        text.len() - end
    )
}

/// A path, escaped.
pub fn escape_path(path: &std::path::Path) -> String {
    escape(&path.to_string_lossy()).into_owned()
}

const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// What the user asked to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Progress on a terminal, plain lines elsewhere.
    Auto,
    /// Nothing while the build runs.
    Quiet,
    /// The event stream as JSON Lines on stdout.
    Json,
}

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Terminal,
    Plain,
    Quiet,
    Json,
}

/// The display of one build; clones show on the same display.
#[derive(Clone)]
pub struct Display {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct State {
    style: Style,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    id: String,
    started: Instant,
    /// The phase shown on the status line: its name, start and detail.
    phase: Option<(&'static str, Instant, String)>,
    /// Terminal: output not yet ended by a newline (the status line is drawn below it).
    pending: String,
    drawn: bool,
    frame: usize,
}

impl Display {
    /// A display for `mode` on this process's stdout and stderr.
    pub fn new(mode: Mode) -> Display {
        let style = match mode {
            Mode::Quiet => Style::Quiet,
            Mode::Json => Style::Json,
            Mode::Auto if std::io::stderr().is_terminal() => Style::Terminal,
            Mode::Auto => Style::Plain,
        };
        let display = Display::with(
            style,
            Box::new(std::io::stdout()),
            Box::new(std::io::stderr()),
        );
        if style == Style::Terminal {
            let shared = display.shared.clone();
            let ticker = std::thread::spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    if let Ok(mut state) = shared.state.lock() {
                        state.frame += 1;
                        state.draw();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            if let Ok(mut slot) = display.shared.ticker.lock() {
                *slot = Some(ticker);
            }
        }
        display
    }

    fn with(style: Style, out: Box<dyn Write + Send>, err: Box<dyn Write + Send>) -> Display {
        Display {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    style,
                    out,
                    err,
                    id: String::new(),
                    started: Instant::now(),
                    phase: None,
                    pending: String::new(),
                    drawn: false,
                    frame: 0,
                }),
                stop: AtomicBool::new(false),
                ticker: Mutex::new(None),
            }),
        }
    }

    /// Shows one event.
    pub fn event(&self, event: &BuildEvent) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.show(event);
        }
    }

    /// Shows a warning on stderr (`contractor: warning: …`), in every mode but `--quiet`.
    pub fn warning(&self, text: &str) {
        if let Ok(mut state) = self.shared.state.lock() {
            if state.style == Style::Quiet {
                return;
            }
            state.clear();
            let _ = writeln!(state.err, "contractor: warning: {}", escape(text));
            state.draw();
        }
    }

    /// Stops the spinner and clears the status line (before the summary is printed).
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let ticker = self.shared.ticker.lock().ok().and_then(|mut t| t.take());
        if let Some(ticker) = ticker {
            let _ = ticker.join();
        }
        if let Ok(mut state) = self.shared.state.lock() {
            state.clear();
            state.end_phase();
            state.flush_pending();
        }
    }
}

impl State {
    fn show(&mut self, event: &BuildEvent) {
        match self.style {
            Style::Quiet => {}
            Style::Json => {
                let _ = contractor_protocol::jsonl::write_line(&mut self.out, event);
            }
            Style::Plain => self.plain(event),
            Style::Terminal => {
                self.clear();
                self.terminal(event);
                self.draw();
            }
        }
    }

    /// The plain lines (stable: scripts and bench/run read them; one event may print more
    /// than one line, each starting with `contractor: `).
    fn plain(&mut self, event: &BuildEvent) {
        let line = match event {
            BuildEvent::Started { id, .. } => {
                self.id = id.clone();
                return;
            }
            BuildEvent::SourcePacked {
                entries,
                bytes,
                selection,
            } => {
                let mut line = format!(
                    "contractor: build {}: source packed ({entries} entries, {})",
                    escape(&self.id),
                    human_bytes(*bytes)
                );
                if let Some(selection) = selection {
                    line.push_str(&format!(
                        "\ncontractor: build {}: source {}",
                        escape(&self.id),
                        selection_text(selection)
                    ));
                }
                line
            }
            BuildEvent::VmStarted {
                name,
                accel,
                snapshot,
            } => {
                let why = match snapshot {
                    Some(SnapshotReport {
                        restored: false,
                        reason: Some(reason),
                        ..
                    }) => format!(" ({})", escape(reason)),
                    _ => String::new(),
                };
                format!(
                    "contractor: VM {} started ({accel:?}){}{why}",
                    escape(name),
                    snapshot_note(snapshot.as_ref())
                )
            }
            BuildEvent::AgentReady { .. } => "contractor: VM booted".to_string(),
            BuildEvent::Phase { phase } => format!("contractor: phase {}", phase.as_str()),
            BuildEvent::Output { text } => {
                let _ = self.out.write_all(text.as_bytes());
                let _ = self.out.flush();
                return;
            }
            BuildEvent::Artifact { path, size } => {
                format!(
                    "contractor: artifact {} ({})",
                    escape(path),
                    human_bytes(*size)
                )
            }
            BuildEvent::ImageReady { .. } | BuildEvent::Finished { .. } | BuildEvent::Unknown => {
                return
            }
        };
        let _ = writeln!(self.err, "{line}");
    }

    fn terminal(&mut self, event: &BuildEvent) {
        match event {
            BuildEvent::Started { id, .. } => {
                self.id = id.clone();
                let _ = writeln!(self.err, "contractor: build {}", escape(id));
            }
            BuildEvent::ImageReady { name } => {
                let secs = self.started.elapsed().as_secs_f64();
                let _ = writeln!(self.err, "✓ image {} ({secs:.1}s)", escape(name));
            }
            BuildEvent::SourcePacked {
                entries,
                bytes,
                selection,
            } => {
                let _ = writeln!(
                    self.err,
                    "✓ source packed: {entries} entries, {}",
                    human_bytes(*bytes)
                );
                if let Some(selection) = selection {
                    let _ = writeln!(self.err, "  source {}", selection_text(selection));
                }
                self.begin("boot", "starting the VM".into());
            }
            BuildEvent::VmStarted {
                name,
                accel,
                snapshot,
            } => {
                if let Some(SnapshotReport {
                    restored: false,
                    reason: Some(reason),
                    ..
                }) = snapshot
                {
                    self.clear();
                    let _ = writeln!(self.err, "  booting cold: {}", escape(reason));
                }
                if let Some((_, _, detail)) = &mut self.phase {
                    *detail = format!(
                        "VM {} ({accel:?}){}",
                        escape(name),
                        snapshot_note(snapshot.as_ref())
                    );
                }
            }
            BuildEvent::AgentReady { .. } => self.end_phase(),
            BuildEvent::Phase { phase } => {
                let (name, detail) = match phase {
                    Phase::Source => ("source", "uploading the source"),
                    Phase::Fetch => ("fetch", "running the fetch, with the network"),
                    Phase::Script => ("build", "running the script"),
                    Phase::Artifacts => ("artifacts", "storing the artifacts"),
                };
                self.begin(name, detail.into());
            }
            BuildEvent::Output { text } => {
                self.pending.push_str(text);
                if let Some(end) = self.pending.rfind('\n') {
                    let complete: String = self.pending.drain(..=end).collect();
                    let _ = self.out.write_all(complete.as_bytes());
                    let _ = self.out.flush();
                }
            }
            BuildEvent::Artifact { path, size } => {
                let _ = writeln!(
                    self.err,
                    "  artifact {} ({})",
                    escape(path),
                    human_bytes(*size)
                );
            }
            BuildEvent::Finished { .. } => {
                self.end_phase();
                self.flush_pending();
            }
            BuildEvent::Unknown => {}
        }
    }

    fn begin(&mut self, name: &'static str, detail: String) {
        self.end_phase();
        self.phase = Some((name, Instant::now(), detail));
    }

    /// Ends the phase on the status line with a `✓` line (terminal only).
    fn end_phase(&mut self) {
        if let Some((name, started, detail)) = self.phase.take() {
            if self.style == Style::Terminal {
                self.flush_pending();
                let secs = started.elapsed().as_secs_f64();
                let detail = match name {
                    "boot" => format!(": {detail}"),
                    _ => String::new(),
                };
                let _ = writeln!(self.err, "✓ {name}{detail} ({secs:.1}s)");
            }
        }
    }

    /// Prints output that had no newline yet, ending it with one.
    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            let _ = writeln!(self.out, "{text}");
            let _ = self.out.flush();
        }
    }

    fn draw(&mut self) {
        if self.style != Style::Terminal {
            return;
        }
        let Some((name, started, detail)) = &self.phase else {
            return;
        };
        let spinner = SPINNER[self.frame % SPINNER.len()];
        let line = format!(
            "{spinner} {name} {:.0}s · {detail} · total {:.0}s",
            started.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
        let _ = write!(self.err, "\r\x1b[2K{line}");
        let _ = self.err.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            let _ = write!(self.err, "\r\x1b[2K");
            let _ = self.err.flush();
            self.drawn = false;
        }
    }
}

/// How the VM started, when a snapshot was asked for: `, restored from a snapshot`,
/// `, booted cold and saved as a snapshot`, or `, booted cold`.
fn snapshot_note(snapshot: Option<&SnapshotReport>) -> &'static str {
    match snapshot {
        Some(SnapshotReport {
            restored: true,
            created: false,
            ..
        }) => ", restored from a snapshot",
        Some(SnapshotReport {
            restored: true,
            created: true,
            ..
        }) => ", booted cold, saved as a snapshot and restored",
        Some(SnapshotReport {
            restored: false, ..
        }) => ", booted cold",
        None => "",
    }
}

/// Which rule chose the packed files, for the first lines of a build.
fn selection_text(selection: &SourceSelection) -> String {
    match selection.rule {
        SourceRule::GitWorkTree => {
            let tracked = match selection.tracked_kept {
                1 => "1 tracked file packed although a pattern matches it".to_string(),
                n => format!("{n} tracked files packed although a pattern matches them"),
            };
            let ignored = match selection.ignored {
                1 => "1 path left out".to_string(),
                n => format!("{n} paths left out"),
            };
            format!(
                "from a git work tree: .gitignore applied ({ignored}; {tracked}); \
                 .git and .contractor left out"
            )
        }
        SourceRule::Everything => "from no git work tree: everything packed but .contractor \
             (.gitignore not applied)"
            .to_string(),
    }
}

/// `1.2 MiB`
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contractor_protocol::vm::Accel;

    /// A `Write` whose bytes the test reads afterwards.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("sink").clone()).expect("utf-8")
        }
    }

    fn events() -> Vec<BuildEvent> {
        vec![
            BuildEvent::Started {
                version: 1,
                id: "20261125-160000-abcdef".into(),
                record: "/p/.contractor/builds/20261125-160000-abcdef".into(),
            },
            BuildEvent::ImageReady {
                name: "debian-12-build".into(),
            },
            BuildEvent::SourcePacked {
                entries: 4,
                bytes: 5120,
                selection: Some(SourceSelection {
                    rule: SourceRule::GitWorkTree,
                    ignored: 3,
                    tracked_kept: 1,
                }),
            },
            BuildEvent::VmStarted {
                name: "contractor-0123456789ab".into(),
                accel: Accel::Tcg,
                snapshot: None,
            },
            BuildEvent::AgentReady {
                agent_version: "0.1.0".into(),
            },
            BuildEvent::Phase {
                phase: Phase::Source,
            },
            BuildEvent::Phase {
                phase: Phase::Script,
            },
            BuildEvent::Output {
                text: "compiling\npart".into(),
            },
            BuildEvent::Output {
                text: "ial line\nno newline at the end".into(),
            },
            BuildEvent::Phase {
                phase: Phase::Artifacts,
            },
            BuildEvent::Artifact {
                path: "hello".into(),
                size: 16_000,
            },
        ]
    }

    fn shown(style: Style) -> (String, String) {
        let (out, err) = (Sink::default(), Sink::default());
        let display = Display::with(style, Box::new(out.clone()), Box::new(err.clone()));
        for event in events() {
            display.event(&event);
        }
        display.close();
        (out.text(), err.text())
    }

    #[test]
    fn plain_lines_name_each_step_and_output_passes_through_unchanged() {
        let (out, err) = shown(Style::Plain);
        assert_eq!(out, "compiling\npartial line\nno newline at the end");
        assert_eq!(
            err,
            "contractor: build 20261125-160000-abcdef: source packed (4 entries, 5.0 KiB)\n\
             contractor: build 20261125-160000-abcdef: source from a git work tree: \
             .gitignore applied (3 paths left out; 1 tracked file packed although a pattern \
             matches it); .git and .contractor left out\n\
             contractor: VM contractor-0123456789ab started (Tcg)\n\
             contractor: VM booted\n\
             contractor: phase source\n\
             contractor: phase script\n\
             contractor: phase artifacts\n\
             contractor: artifact hello (15.6 KiB)\n"
        );
    }

    #[test]
    fn the_terminal_shows_each_phase_ending_and_whole_output_lines() {
        let (out, err) = shown(Style::Terminal);
        // The partial line waits for its end; the last one is ended when the build is.
        assert_eq!(out, "compiling\npartial line\nno newline at the end\n");
        let ticks: Vec<&str> = err
            .split(['\n', '\r'])
            .filter_map(|l| l.trim_start_matches("\x1b[2K").strip_prefix("✓ "))
            .map(|l| l.rsplit_once(" (").map_or(l, |(tick, _time)| tick))
            .collect();
        assert_eq!(
            ticks,
            [
                "image debian-12-build",
                "source packed: 4 entries, 5.0 KiB",
                "boot: VM contractor-0123456789ab (Tcg)",
                "source",
                "build",
                "artifacts"
            ]
        );
        assert!(err.contains("  artifact hello (15.6 KiB)\n"), "{err}");
        // The status line was drawn, and cleared before every line printed.
        assert!(
            err.contains("\r\x1b[2K⠋ build 0s · running the script"),
            "{err}"
        );
    }

    #[test]
    fn how_the_vm_started_is_said_and_a_cold_boot_says_why() {
        let started = |snapshot| BuildEvent::VmStarted {
            name: "contractor-snap-91f5e701c083-0".into(),
            accel: Accel::Tcg,
            snapshot,
        };
        let (out, err) = (Sink::default(), Sink::default());
        let display = Display::with(Style::Plain, Box::new(out), Box::new(err.clone()));
        display.event(&started(Some(SnapshotReport {
            restored: true,
            created: false,
            reason: None,
            dir: None,
        })));
        display.event(&started(Some(SnapshotReport {
            restored: false,
            created: false,
            reason: Some("all 4 snapshots of this image and shape are in use".into()),
            dir: None,
        })));
        display.close();
        assert_eq!(
            err.text(),
            "contractor: VM contractor-snap-91f5e701c083-0 started (Tcg), restored from a snapshot\n\
             contractor: VM contractor-snap-91f5e701c083-0 started (Tcg), booted cold (all 4 snapshots of this image and shape are in use)\n"
        );
    }

    #[test]
    fn json_prints_every_event_as_one_line_on_stdout_and_nothing_else() {
        let (out, err) = shown(Style::Json);
        assert_eq!(err, "");
        let read: Vec<BuildEvent> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is an event"))
            .collect();
        assert_eq!(read, events());
    }

    #[test]
    fn guest_text_in_contractors_own_lines_is_escaped_but_output_is_not() {
        assert_eq!(escape("hello.deb"), "hello.deb");
        assert_eq!(
            escape("a\x1b[2Jb\n\u{7f}\u{9b}\u{202e}\u{2066}é"),
            "a\\x1b[2Jb\\n\\x7f\\u{9b}\\u{202e}\\u{2066}é"
        );
        assert_eq!(
            escape_capped("ab\x07cd", 3),
            "ab\\x07… (2 more bytes not shown)"
        );
        for style in [Style::Plain, Style::Terminal] {
            let (out, err) = (Sink::default(), Sink::default());
            let display = Display::with(style, Box::new(out.clone()), Box::new(err.clone()));
            display.event(&BuildEvent::Output {
                text: "raw \x1b[31m\n".into(),
            });
            display.event(&BuildEvent::Artifact {
                path: "evil\x1b]0;pwned\x07\u{202e}".into(),
                size: 1,
            });
            display.warning("skipped a\x1bb");
            display.close();
            let err = err.text().replace("\r\x1b[2K", "");
            assert!(
                !err.contains("\x1b]") && !err.contains('\u{202e}'),
                "{err:?}"
            );
            assert!(err.contains("evil\\x1b]0;pwned\\x07\\u{202e}"), "{err:?}");
            assert!(
                err.contains("contractor: warning: skipped a\\x1bb\n"),
                "{err:?}"
            );
            assert_eq!(out.text(), "raw \x1b[31m\n", "the build's output stays raw");
        }
    }

    #[test]
    fn quiet_shows_nothing() {
        assert_eq!(shown(Style::Quiet), (String::new(), String::new()));
    }
}
