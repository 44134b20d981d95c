//! The progress display: on a terminal, one status line redrawn in place with a spinner and
//! the elapsed time; elsewhere, plain lines, one per step. Always on stderr.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// A progress display for one long task with named steps.
pub struct Progress {
    state: Arc<Mutex<State>>,
    ticker: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

struct State {
    terminal: bool,
    task: String,
    step: String,
    detail: String,
    started: Instant,
    step_started: Instant,
    drawn: bool,
}

impl Progress {
    /// Starts showing progress of `task`.
    pub fn start(task: &str) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let now = Instant::now();
        let state = Arc::new(Mutex::new(State {
            terminal,
            task: task.to_string(),
            step: String::new(),
            detail: String::new(),
            started: now,
            step_started: now,
            drawn: false,
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = terminal.then(|| {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut frame = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut s) = state.lock() {
                        s.draw(frame);
                    }
                    frame += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        Progress {
            state,
            ticker,
            stop,
        }
    }

    /// Begins a step; the previous one is reported finished.
    pub fn step(&self, step: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.finish_step();
            s.step = step.to_string();
            s.detail.clear();
            s.step_started = Instant::now();
            if !s.terminal {
                eprintln!("{}: {}...", s.task, step);
            }
        }
    }

    /// Shows a detail of the current step (the latest line of a tool's output).
    pub fn detail(&self, detail: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.detail = detail.chars().take(60).collect();
        }
    }

    /// Ends the display with a final line.
    pub fn finish(mut self, message: &str) {
        self.stop_ticker();
        if let Ok(mut s) = self.state.lock() {
            s.finish_step();
            eprintln!(
                "{}: {} ({:.1}s)",
                s.task,
                message,
                s.started.elapsed().as_secs_f64()
            );
        }
    }

    fn stop_ticker(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_ticker();
        if let Ok(mut s) = self.state.lock() {
            s.clear();
        }
    }
}

impl State {
    fn draw(&mut self, frame: usize) {
        if self.step.is_empty() {
            return;
        }
        let spinner = SPINNER[frame % SPINNER.len()];
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!(" · {}", self.detail)
        };
        eprint!(
            "\r\x1b[2K{spinner} {}: {} {:.0}s{detail}",
            self.task,
            self.step,
            self.step_started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
            self.drawn = false;
        }
    }

    fn finish_step(&mut self) {
        if self.step.is_empty() {
            return;
        }
        self.clear();
        if self.terminal {
            eprintln!(
                "✓ {}: {} ({:.1}s)",
                self.task,
                self.step,
                self.step_started.elapsed().as_secs_f64()
            );
        }
        self.step.clear();
    }
}
