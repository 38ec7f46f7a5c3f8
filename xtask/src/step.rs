//! Progress reporting: every step says what it is doing, how it ended and how long it took.

use std::io::Write as _;
use std::time::{Duration, Instant};

/// One reported step: `==> installing rust-src ... done (0.7s)`.
///
/// A quiet step prints its outcome on the same line, so nothing may print while it runs. A loud step
/// streams a child's output between its start and end lines. A step dropped without [`Step::done`]
/// or [`Step::finish`] (an early `?` return) reports `FAILED`.
pub struct Step {
    label: String,
    start: Instant,
    loud: bool,
    finished: bool,
}

impl Step {
    /// Starts a step whose outcome is printed on the same line.
    pub fn quiet(label: impl Into<String>) -> Self {
        let label = label.into();
        print!("==> {label} ... ");
        // Best effort: a closed stdout must not turn into a build failure.
        let _ = std::io::stdout().flush();
        Self {
            label,
            start: Instant::now(),
            loud: false,
            finished: false,
        }
    }

    /// Starts a step that streams a child's output (cargo, apt-get) before its end line.
    pub fn loud(label: impl Into<String>) -> Self {
        let label = label.into();
        println!("==> {label} ...");
        Self {
            label,
            start: Instant::now(),
            loud: true,
            finished: false,
        }
    }

    /// Ends the step as `done`.
    pub fn done(self) {
        self.finish("done");
    }

    /// Ends the step with a custom outcome, e.g. `already installed`.
    pub fn finish(mut self, outcome: &str) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: &str) {
        self.finished = true;
        let took = format_duration(self.start.elapsed());
        if self.loud {
            println!("==> {} ... {outcome} ({took})", self.label);
        } else {
            println!("{outcome} ({took})");
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.finished {
            self.end("FAILED");
        }
    }
}

/// Formats a duration the way humans read build times: `0.7s`, `12.3s`, `3m 02.1s`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let minutes = (secs / 60.0).floor();
        format!("{minutes:.0}m {:04.1}s", secs - minutes * 60.0)
    }
}

/// Prints a warning that does not stop the command.
pub fn warn(message: &str) {
    println!("==> warning: {message}");
}

#[cfg(test)]
mod tests {
    use super::format_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_like_build_times() {
        assert_eq!(format_duration(Duration::from_millis(700)), "0.7s");
        assert_eq!(format_duration(Duration::from_millis(59_940)), "59.9s");
        assert_eq!(format_duration(Duration::from_millis(182_100)), "3m 02.1s");
    }
}
