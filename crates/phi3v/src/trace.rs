//! `--trace`: one line per pipeline stage with its shape and time, on stderr. A recording
//! trace keeps the stages instead, for benchmarks.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// One traced stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub shape: Vec<usize>,
    pub took: Duration,
    pub note: String,
}

#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    recorded: Option<RefCell<Vec<Stage>>>,
}

impl Trace {
    /// Prints stages to stderr when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Trace {
            enabled,
            recorded: None,
        }
    }

    /// Keeps every stage (see [`Trace::stages`]) and prints nothing.
    pub fn recording() -> Self {
        Trace {
            enabled: false,
            recorded: Some(RefCell::new(Vec::new())),
        }
    }

    /// Whether the caller should print its extra detail lines.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The stages recorded so far (empty unless made by [`Trace::recording`]).
    pub fn stages(&self) -> Vec<Stage> {
        self.recorded
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// Reports `stage  [shape]  time  note`.
    pub fn stage(&self, name: &str, shape: &[usize], took: Duration, note: &str) {
        if let Some(r) = &self.recorded {
            r.borrow_mut().push(Stage {
                name: name.into(),
                shape: shape.to_vec(),
                took,
                note: note.into(),
            });
        }
        if self.enabled {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            let shape = format!("[{}]", dims.join(","));
            eprintln!(
                "[trace] {name:<30} {shape:<22} {:>9.3} ms  {note}",
                took.as_secs_f64() * 1e3
            );
        }
    }

    /// Times `f` and reports it as one stage.
    pub fn time<T>(
        &self,
        name: &str,
        shape: impl FnOnce(&T) -> Vec<usize>,
        note: &str,
        f: impl FnOnce() -> T,
    ) -> T {
        let start = Instant::now();
        let out = f();
        self.stage(name, &shape(&out), start.elapsed(), note);
        out
    }
}
