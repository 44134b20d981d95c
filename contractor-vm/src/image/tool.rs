//! Running the programs an image is built with (mmdebstrap, debugfs, qemu-img, xz, …).
//!
//! The invariant: what a program prints is read into bounded buffers only. Its stdout is
//! kept up to a caller's limit (a larger output is an error, not a truncation), and of its
//! stderr only the last [`TAIL_LINES`] lines, each cut at [`MAX_LINE`] bytes, are kept for
//! the error message.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use super::progress::Progress;
use super::ImageError;

/// Lines of a failed program's output kept for its error.
const TAIL_LINES: usize = 20;
/// Bytes of one line of a program's output that are kept.
const MAX_LINE: usize = 4096;
/// The stdout a program's text answer may have (`debugfs cat modules.dep`, `stat`, `ls`).
pub const MAX_TEXT: u64 = 16 << 20;
/// The stdout of a decompression (one kernel module).
pub const MAX_BINARY: u64 = 256 << 20;

/// How a command is shown in messages.
fn shown(command: &Command) -> String {
    format!("{command:?}").replace('"', "")
}

/// Reads `input` line by line (each cut at [`MAX_LINE`] bytes), calling `each` on every
/// line and returning the last [`TAIL_LINES`].
fn tail_lines(input: impl Read, mut each: impl FnMut(&str)) -> Vec<String> {
    let mut reader = BufReader::new(input);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line longer than MAX_LINE is read on in pieces, each a line of its own.
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        each(text);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text.to_string());
    }
    tail.into()
}

/// Reads at most `limit` bytes of `input`; `None` when it holds more (the rest is drained).
fn read_capped(input: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut input = input;
    let mut bytes = Vec::new();
    (&mut input).take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        std::io::copy(&mut input, &mut std::io::sink())?;
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Starts `command` (shown as `shown`) with no stdin and its stdout and stderr piped.
fn spawn_piped(command: &mut Command, shown: &str) -> Result<std::process::Child, ImageError> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: shown.to_string(),
            source,
        })
}

/// Runs a program, showing its latest stderr line as the progress detail; on failure returns
/// its last lines.
pub fn run(command: &mut Command, progress: &Progress) -> Result<(), ImageError> {
    let shown = shown(command);
    let mut child = spawn_piped(command, &shown)?;
    let stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || match stdout {
        Some(out) => tail_lines(out, |_| {}),
        None => Vec::new(),
    });
    let mut tail = match child.stderr.take() {
        Some(stderr) => tail_lines(stderr, |line| {
            progress.detail(line.trim_start_matches("I: "));
        }),
        None => Vec::new(),
    };
    let stdout_tail = out_thread.join().unwrap_or_default();
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let skip = stdout_tail.len().saturating_sub(5);
    tail.extend(stdout_tail.into_iter().skip(skip));
    Err(ImageError::Tool {
        command: shown,
        detail: format!("{status}\n{}", tail.join("\n")),
    })
}

/// Most `E:` lines kept for [`ImageError::Apt`]: 8.
pub const MAX_ERROR_LINES: usize = 8;
/// Most bytes of output [`run_logged`] writes to its log: 64 MiB (the rest is counted).
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// The `E:` lines of mmdebstrap's output, apt's own first (mmdebstrap's are the ones that
/// only say which of its steps failed), each once, at most [`MAX_ERROR_LINES`].
pub fn error_lines<'a>(output: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut apt = Vec::new();
    let mut ours = Vec::new();
    for line in output {
        let line = line.trim_end_matches('\r');
        let Some(said) = line.strip_prefix("E: ") else {
            continue;
        };
        // mmdebstrap's own: "E: apt-get update … failed", "E: setup failed: …",
        // "E: mmdebstrap failed …", "E: run_chroot failed: …".
        let mmdebstrap = said.ends_with(" failed")
            || said.contains("failed: E: ")
            || said.starts_with("setup failed")
            || said.starts_with("mmdebstrap")
            || said.starts_with("run_");
        if apt.iter().chain(ours.iter()).any(|l: &String| l == line) {
            continue;
        }
        match mmdebstrap {
            true => ours.push(line.to_string()),
            false => apt.push(line.to_string()),
        }
    }
    apt.extend(ours);
    apt.truncate(MAX_ERROR_LINES);
    apt
}

/// Runs mmdebstrap as [`run`] does, writing its whole output (stderr, then stdout, at most
/// [`MAX_LOG_BYTES`]) to `log`; a failure is [`ImageError::Apt`]: its `E:` lines and the log.
pub fn run_logged(
    command: &mut Command,
    progress: &Progress,
    log: &std::path::Path,
) -> Result<(), ImageError> {
    use std::io::Write;
    let shown = shown(command);
    let file = std::fs::File::create(log).map_err(|source| ImageError::File {
        what: "cannot write",
        path: log.to_path_buf(),
        source,
    })?;
    let mut child = spawn_piped(command, &shown)?;
    let writer = std::sync::Arc::new(std::sync::Mutex::new((std::io::BufWriter::new(file), 0u64)));
    let keep =
        |writer: &std::sync::Arc<std::sync::Mutex<(std::io::BufWriter<std::fs::File>, u64)>>,
         line: &str,
         errors: &mut Vec<String>| {
            if let Ok(mut guard) = writer.lock() {
                let (out, written) = &mut *guard;
                if *written < MAX_LOG_BYTES {
                    let _ = writeln!(out, "{line}");
                    *written += line.len() as u64 + 1;
                }
            }
            // Only the E: lines are kept in memory, and a bounded number of them.
            if line.starts_with("E: ") && errors.len() < 4 * MAX_ERROR_LINES {
                errors.push(line.to_string());
            }
        };
    let stdout = child.stdout.take();
    let out_writer = std::sync::Arc::clone(&writer);
    let out_thread = std::thread::spawn(move || {
        let mut errors = Vec::new();
        if let Some(out) = stdout {
            tail_lines(out, |line| keep(&out_writer, line, &mut errors));
        }
        errors
    });
    let mut errors = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        tail_lines(stderr, |line| {
            progress.detail(line.trim_start_matches("I: "));
            keep(&writer, line, &mut errors);
        });
    }
    errors.extend(out_thread.join().unwrap_or_default());
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let Ok(mut guard) = writer.lock() {
        let (out, _) = &mut *guard;
        let _ = writeln!(out, "{shown}: {status}");
        let _ = out.flush();
    }
    if status.success() {
        return Ok(());
    }
    let mut errors = error_lines(errors.iter().map(String::as_str));
    if errors.is_empty() {
        errors.push(format!("{status}"));
    }
    Err(ImageError::Apt {
        errors,
        log: log.to_path_buf(),
    })
}

/// Runs `command` and returns its stdout as text (at most [`MAX_TEXT`] bytes).
pub fn output(command: &mut Command) -> Result<String, ImageError> {
    bytes(command, MAX_TEXT).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Runs `command` and returns its stdout, at most `limit` bytes; a failure carries its
/// stderr's last lines.
pub fn bytes(command: &mut Command, limit: u64) -> Result<Vec<u8>, ImageError> {
    let shown = shown(command);
    let mut child = spawn_piped(command, &shown)?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || match stderr {
        Some(err) => tail_lines(err, |_| {}),
        None => Vec::new(),
    });
    let out = match child.stdout.take() {
        Some(stdout) => read_capped(stdout, limit),
        None => Ok(Some(Vec::new())),
    };
    let err_tail = err_thread.join().unwrap_or_default();
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: shown.clone(),
        source,
    })?;
    let out = out.map_err(|source| ImageError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if !status.success() {
        return Err(ImageError::Tool {
            command: shown,
            detail: format!("{status}\n{}", err_tail.join("\n")),
        });
    }
    out.ok_or(ImageError::TooMuchOutput {
        command: shown,
        limit,
    })
}

/// Puts the child of `command` in a process group of its own, and has it receive SIGTERM
/// when this process dies. For mmdebstrap: when it fails it sends SIGHUP to its whole
/// process group (`kill HUP => -getpgrp()`), which would otherwise hang up this process
/// and whoever shares its group (the front end, a test harness, the user's shell job).
/// Its own group keeps that inside; the parent-death signal keeps it from outliving us
/// (outside our group, a Ctrl-C at the terminal no longer reaches it).
pub fn own_group_dying_with_us(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    contractor_protocol::process::die_with_parent(command);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apts_own_error_lines_come_first_each_once() {
        let output = "I: automatically chosen format: ext2
I: running apt-get update...
E: Release file for http://deb.debian.org/debian/dists/sid/InRelease is expired (invalid since 28d 3h 2min 1s). Updates for this repository will not be applied.
E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed
E: Release file for http://deb.debian.org/debian/dists/sid/InRelease is expired (invalid since 28d 3h 2min 1s). Updates for this repository will not be applied.
W: some warning
E: setup failed: E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed";
        assert_eq!(
            error_lines(output.lines()),
            [
                "E: Release file for http://deb.debian.org/debian/dists/sid/InRelease is expired (invalid since 28d 3h 2min 1s). Updates for this repository will not be applied.",
                "E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed",
                "E: setup failed: E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed",
            ]
        );
        let many: Vec<String> = (0..50).map(|i| format!("E: error {i}")).collect();
        assert_eq!(
            error_lines(many.iter().map(String::as_str)).len(),
            MAX_ERROR_LINES
        );
    }

    #[test]
    fn a_failed_run_says_its_error_lines_and_keeps_the_whole_output_in_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("build.log");
        let progress = Progress::start("test");
        let err = run_logged(
            Command::new("sh").args([
                "-c",
                "echo 'I: step'>&2; echo out; echo 'E: Release file for x is expired (invalid since 28d)'>&2; echo 'E: apt-get update failed'>&2; exit 1",
            ]),
            &progress,
            &log,
        )
        .expect_err("fails");
        let message = err.to_string();
        assert!(
            message.starts_with("mmdebstrap failed: E: Release file for x is expired (invalid since 28d); E: apt-get update failed"),
            "{message}"
        );
        assert!(message.contains("check_valid_until = false"), "{message}");
        assert!(
            message.ends_with(&format!("(full log: {})", log.display())),
            "{message}"
        );
        assert!(!message.contains('\n'), "one line: {message}");
        let kept = std::fs::read_to_string(&log).expect("log");
        for line in ["I: step", "out", "E: apt-get update failed"] {
            assert!(kept.contains(line), "{kept}");
        }
    }

    #[test]
    fn output_is_bounded() {
        let text = output(Command::new("sh").args(["-c", "echo hello"])).expect("echo");
        assert_eq!(text, "hello\n");
        let err =
            bytes(Command::new("sh").args(["-c", "echo 0123456789"]), 4).expect_err("too much");
        assert!(
            matches!(err, ImageError::TooMuchOutput { limit: 4, .. }),
            "{err}"
        );
        let err =
            output(Command::new("sh").args(["-c", "echo why >&2; exit 3"])).expect_err("fails");
        assert!(err.to_string().contains("why"), "{err}");
    }

    #[test]
    fn only_the_tail_of_long_output_is_kept() {
        let mut seen = 0;
        let input = "x\n".repeat(100) + &"y".repeat(MAX_LINE * 2);
        let tail = tail_lines(input.as_bytes(), |_| seen += 1);
        assert_eq!(seen, 102);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[TAIL_LINES - 1].len(), MAX_LINE);
    }
}
