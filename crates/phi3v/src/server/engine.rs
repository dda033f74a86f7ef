//! The one worker that runs the model. Requests wait in a bounded FIFO queue (a full queue is
//! the handler's 429); the worker admits up to `max_active` of them and advances all of them
//! by one token per round, their decoder steps batched into one (continuous batching: a
//! request joins the batch after its prefill and leaves it when it ends), so a long answer does
//! not hold back a short one and on a bandwidth-bound CPU `b` requests decode for about the
//! price of one. A request whose client has gone (its event receiver dropped) is cancelled at
//! its next round.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::stop::StopFilter;
use crate::feature_cache::FeatureCache;
use crate::trace::Trace;
use crate::{Choice, Decoding, GenerateOptions, Pipeline, Prepared, Session};

/// One queued request, ready for the model.
pub struct Job {
    pub prepared: Prepared,
    pub opts: GenerateOptions,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the worker tells a request's handler.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    /// The model failed on this request (the message is for the client).
    Failed(String),
}

/// Counters shared with the handlers (`/health`, `Retry-After`).
#[derive(Default)]
pub struct Stats {
    pub waiting: AtomicUsize,
    pub active: AtomicUsize,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    /// Moving average of a request's time in the worker, in milliseconds.
    pub avg_ms: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "waiting": self.waiting.load(Ordering::Relaxed),
            "active": self.active.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "cancelled": self.cancelled.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
        })
    }

    /// A guess at how long a request sent now would wait, for `Retry-After`.
    pub fn retry_after_secs(&self, max_active: usize) -> u64 {
        let waiting = self.waiting.load(Ordering::Relaxed) as u64;
        let avg = self.avg_ms.load(Ordering::Relaxed);
        (waiting * avg / 1000 / max_active.max(1) as u64).clamp(1, 60)
    }

    fn record_time(&self, ms: u64) {
        let old = self.avg_ms.load(Ordering::Relaxed);
        let new = if old == 0 { ms } else { (old * 7 + ms) / 8 };
        self.avg_ms.store(new, Ordering::Relaxed);
    }
}

/// The handle the HTTP side keeps.
pub struct Engine {
    pub queue: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
    pub max_active: usize,
}

impl Engine {
    /// Starts the worker thread.
    pub fn start(
        pipeline: Arc<Pipeline>,
        features: Arc<FeatureCache>,
        queue_size: usize,
        max_active: usize,
    ) -> Engine {
        let (tx, rx) = mpsc::channel(queue_size.max(1));
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("phi3v-model".into())
            .spawn(move || worker(&pipeline, &features, rx, &s, max_active.max(1)))
            .expect("spawning the model thread");
        Engine {
            queue: tx,
            stats,
            max_active: max_active.max(1),
        }
    }
}

/// A request being generated.
struct Active<'p> {
    session: Session,
    dec: Decoding<'p>,
    stop: StopFilter,
    events: mpsc::UnboundedSender<Event>,
    prompt_tokens: usize,
    cached_tokens: usize,
    started: Instant,
}

fn worker(
    p: &Pipeline,
    features: &FeatureCache,
    mut rx: mpsc::Receiver<Job>,
    stats: &Stats,
    max_active: usize,
) {
    let mut active: Vec<Active> = Vec::new();
    // The KV caches of the last `max_active` finished requests, newest last: a follow-up turn
    // of one of those conversations (the same prefix) runs only its new tokens.
    let mut spare: Vec<Session> = Vec::new();
    loop {
        while active.len() < max_active {
            let job = if active.is_empty() {
                match rx.blocking_recv() {
                    Some(j) => j,
                    None => return, // the server is gone
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            // Active from here: the prefill counts.
            stats.active.fetch_add(1, Ordering::Relaxed);
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                stats.active.fetch_sub(1, Ordering::Relaxed);
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A bug that panics fails its request, not the server.
            let events = job.events.clone();
            match catch_unwind(AssertUnwindSafe(|| admit(p, features, job, &mut spare))) {
                Ok(Ok(a)) => active.push(a),
                Ok(Err((events, msg))) => {
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(Event::Failed(msg));
                }
                Err(panic) => {
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(Event::Failed(panic_message(&panic)));
                    spare.clear();
                }
            }
        }
        // One token for each active request: their decoder steps run as one batch.
        let ends = match catch_unwind(AssertUnwindSafe(|| round(p, &mut active))) {
            Ok(ends) => ends,
            Err(panic) => {
                let msg = panic_message(&panic);
                for a in active.drain(..) {
                    let _ = a.events.send(Event::Failed(msg.clone()));
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                spare.clear();
                continue;
            }
        };
        for (i, end) in ends.into_iter().enumerate().rev() {
            let Some(end) = end else { continue };
            let a = active.swap_remove(i);
            stats.active.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Cancelled => stats.cancelled.fetch_add(1, Ordering::Relaxed),
                End::Failed => stats.failed.fetch_add(1, Ordering::Relaxed),
                End::Finished => stats.completed.fetch_add(1, Ordering::Relaxed),
            };
            stats.record_time(a.started.elapsed().as_millis() as u64);
            spare.push(a.session);
            if spare.len() > max_active {
                spare.remove(0);
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    format!("internal error in the model worker: {what}")
}

/// Prefill, on the spare KV cache that holds the longest prefix of this prompt (taken out of
/// `spare`), else on a new one.
fn admit<'p>(
    p: &'p Pipeline,
    features: &FeatureCache,
    job: Job,
    spare: &mut Vec<Session>,
) -> Result<Active<'p>, (mpsc::UnboundedSender<Event>, String)> {
    let started = Instant::now();
    let need = job.prepared.input_ids.len() + job.opts.max_new_tokens;
    // The cache this prompt continues: it shares at least half of what that cache holds (a
    // cache sharing only the template's first tokens stays for its own conversation). One too
    // small grows: a follow-up turn is always longer than the turn before it.
    let best = spare
        .iter()
        .enumerate()
        .map(|(i, s)| (p.reusable(s, &job.prepared), i))
        .filter(|&(reuse, i)| reuse > 0 && 2 * reuse >= spare[i].len())
        .max();
    let reused = match best {
        Some((_, i)) => {
            let mut s = spare.remove(i);
            match p.grow(&mut s, need) {
                Ok(true) => Some(s),
                Ok(false) => None,
                Err(e) => return Err((job.events, e.to_string())),
            }
        }
        None => None,
    };
    let mut session = match reused {
        Some(s) => s,
        None => match p.new_session(need) {
            Ok(s) => s,
            Err(e) => return Err((job.events, e.to_string())),
        },
    };
    let fed = match p.feed(
        &mut session,
        &job.prepared,
        Some(features),
        &Trace::new(false),
    ) {
        Ok(f) => f,
        Err(e) => return Err((job.events, e.to_string())),
    };
    let prompt_tokens = job.prepared.input_ids.len();
    let dec = Decoding::new(p, &job.opts, job.opts.max_new_tokens, &fed);
    Ok(Active {
        session,
        dec,
        stop: StopFilter::new(job.stop),
        events: job.events,
        prompt_tokens,
        cached_tokens: fed.reused,
        started,
    })
}

enum End {
    Finished,
    Cancelled,
    Failed,
}

impl Active<'_> {
    fn done(&mut self, reason: &'static str) -> Option<End> {
        let _ = self.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.dec.ids.len(),
            cached_tokens: self.cached_tokens,
        });
        Some(End::Finished)
    }

    fn failed(&mut self, msg: String) -> Option<End> {
        let _ = self.events.send(Event::Failed(msg));
        Some(End::Failed)
    }

    /// Sends `text` through the stop filter; `Some` when the request has ended.
    fn emit(&mut self, text: &str, last: bool) -> Option<End> {
        let pass = self.stop.push(text);
        if !pass.text.is_empty() && self.events.send(Event::Text(pass.text)).is_err() {
            return Some(End::Cancelled);
        }
        if pass.stopped {
            return self.done("stop");
        }
        if last {
            let rest = self.stop.finish();
            if !rest.is_empty() {
                let _ = self.events.send(Event::Text(rest));
            }
            let reason = if self.dec.stopped_on.is_some() {
                "stop"
            } else {
                "length"
            };
            return self.done(reason);
        }
        None
    }
}

/// Advances every active request by one token; returns, per request, how it ended if it did.
/// The tokens that need the decoder go through it together ([`Pipeline::step_batch`]), except
/// greedy requests on a GPU, which choose their next token on the device one by one.
fn round(p: &Pipeline, active: &mut [Active]) -> Vec<Option<End>> {
    let mut ends: Vec<Option<End>> = Vec::with_capacity(active.len());
    let mut batch: Vec<(usize, u32)> = Vec::new();
    for (i, a) in active.iter_mut().enumerate() {
        if a.events.is_closed() {
            ends.push(Some(End::Cancelled));
            continue;
        }
        let end = match a.dec.choose() {
            Ok(Choice::Ended) => a.done("length"),
            Ok(Choice::Last(piece)) => a.emit(&piece, true),
            Ok(Choice::Step { token, piece }) => match a.emit(&piece, false) {
                Some(end) => Some(end),
                None if a.dec.greedy_on_gpu() => match p.step(&mut a.session, token, true) {
                    Ok(step) => {
                        a.dec.accept(step);
                        None
                    }
                    Err(e) => a.failed(e.to_string()),
                },
                None => {
                    batch.push((i, token));
                    None
                }
            },
            Err(e) => a.failed(e.to_string()),
        };
        ends.push(end);
    }
    if batch.is_empty() {
        return ends;
    }
    let tokens: Vec<u32> = batch.iter().map(|b| b.1).collect();
    let mut picked: Vec<&mut Active> = active
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| batch.iter().any(|b| b.0 == *i))
        .map(|(_, a)| a)
        .collect();
    let mut sessions: Vec<&mut Session> = picked.iter_mut().map(|a| &mut a.session).collect();
    match p.step_batch(&mut sessions, &tokens) {
        Ok(steps) => {
            for (a, step) in picked.iter_mut().zip(steps) {
                a.dec.accept(step);
            }
        }
        Err(e) => {
            for &(i, _) in &batch {
                ends[i] = active[i].failed(e.to_string());
            }
        }
    }
    ends
}
