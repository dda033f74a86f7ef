//! `--trace`: one line per pipeline stage with its shape and time, on stderr.

use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
}

impl Trace {
    pub fn new(enabled: bool) -> Self {
        Trace { enabled }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Prints `stage  [shape]  time  note`.
    pub fn stage(&self, name: &str, shape: &[usize], took: Duration, note: &str) {
        if self.enabled {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            let shape = format!("[{}]", dims.join(","));
            eprintln!("[trace] {name:<30} {shape:<22} {:>9.3} ms  {note}", took.as_secs_f64() * 1e3);
        }
    }

    /// Times `f` and reports it as one stage.
    pub fn time<T>(&self, name: &str, shape: impl FnOnce(&T) -> Vec<usize>, note: &str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.stage(name, &shape(&out), start.elapsed(), note);
        out
    }
}
