//! Progress, cancellation and time budgets of long operations.
//!
//! Long work (copies, compression, restores, block jobs) takes a [`Control`]:
//! it reports [`Progress`] to an optional sink, stops when the caller's
//! [`CancelToken`] is set from another thread, and stops when the
//! [`Deadline`] of the command passes. All three are cheap to clone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{ErrorKind, KnibError, Result};

/// A point in the life of a long operation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// What is being done now ("copy vol1", "compress vol2", "block commit vda").
    pub step: String,
    /// Percent of this step done, 0.0 to 100.0.
    pub percent: f64,
}

/// Receives progress reports; called from the thread doing the work.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Set from any thread to stop an operation at its next check.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the operation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The time by which a command (all its steps together) must be done.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Option<Instant>,
    budget: Option<Duration>,
}

impl Deadline {
    /// No time limit.
    pub fn none() -> Self {
        Deadline { at: None, budget: None }
    }
    /// A limit of `budget` from now; a budget so large that its end is past
    /// what the clock can represent (`i64::MAX` seconds, `u64::MAX`) is no
    /// limit.
    pub fn after(budget: Duration) -> Self {
        match Instant::now().checked_add(budget) {
            Some(at) => Deadline { at: Some(at), budget: Some(budget) },
            None => Self::none(),
        }
    }
    /// From a number of seconds; 0 or less means no limit, and so does a
    /// number too large for the clock (see [`Deadline::after`]).
    pub fn from_secs(secs: i64) -> Self {
        if secs <= 0 {
            Self::none()
        } else {
            Self::after(Duration::from_secs(secs as u64))
        }
    }
    /// Time left, `None` when there is no limit.
    pub fn remaining(&self) -> Option<Duration> {
        self.at.map(|at| at.saturating_duration_since(Instant::now()))
    }
    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at)
    }
    /// The whole budget this deadline was made from.
    pub fn budget(&self) -> Option<Duration> {
        self.budget
    }
}

impl Default for Deadline {
    fn default() -> Self {
        Self::none()
    }
}

/// The progress of one step told to a [`Control`] every whole percent:
/// the first call is always told, then a call when the step has grown by
/// a percent or more since the last one told (so at most about a hundred
/// reports, whatever the step's size). A step of nothing is 100% done.
pub(crate) struct EveryPercent<'a> {
    ctl: &'a Control,
    step: &'a str,
    reported: Option<f64>,
}

impl<'a> EveryPercent<'a> {
    /// Nothing told yet.
    pub(crate) fn new(ctl: &'a Control, step: &'a str) -> Self {
        EveryPercent { ctl, step, reported: None }
    }
    /// `done` of `total` (any unit) are done.
    pub(crate) fn at(&mut self, done: u64, total: u64) {
        let pct = if total == 0 { 100.0 } else { done.min(total) as f64 * 100.0 / total as f64 };
        if self.reported.is_none_or(|r| pct - r >= 1.0) {
            self.ctl.report(self.step, pct);
            self.reported = Some(pct);
        }
    }
}

/// Progress sink, cancel token and deadline of one operation.
#[derive(Clone, Default)]
pub struct Control {
    /// Where progress goes, if anywhere.
    pub progress: Option<ProgressSink>,
    /// Stops the operation when set.
    pub cancel: CancelToken,
    /// When the operation must be done by.
    pub deadline: Deadline,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Control {
    /// No progress, no cancellation, no deadline.
    pub fn new() -> Self {
        Self::default()
    }
    /// The same control with a deadline.
    pub fn with_deadline(mut self, deadline: Deadline) -> Self {
        self.deadline = deadline;
        self
    }
    /// The same control with a progress sink.
    pub fn with_progress(mut self, sink: ProgressSink) -> Self {
        self.progress = Some(sink);
        self
    }
    /// The same control with a cancel token.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }
    /// Report progress of `step`.
    pub fn report(&self, step: &str, percent: f64) {
        if let Some(sink) = &self.progress {
            sink(&Progress { step: step.to_string(), percent });
        }
    }
    /// Fail if the operation was cancelled or its deadline passed; `what`
    /// names the step about to be taken, or the one under way (a copy
    /// checks between its chunks).
    pub fn check(&self, what: &str) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(KnibError::new(ErrorKind::Cancelled, format!("cancelled at {what}")));
        }
        if self.deadline.expired() {
            return Err(self.timeout_error(what));
        }
        Ok(())
    }
    /// The error for running out of time during `what`.
    pub fn timeout_error(&self, what: &str) -> KnibError {
        let budget = self.deadline.budget().map(|b| format!("{}s", b.as_secs_f64())).unwrap_or_else(|| "no".into());
        KnibError::new(ErrorKind::Timeout, format!("{what}: the time budget ({budget}) ran out"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// What `steps` of `done` out of `total` tell a sink.
    fn told(total: u64, steps: impl IntoIterator<Item = u64>) -> Vec<f64> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let ctl = Control::new().with_progress(Arc::new(move |p: &Progress| sink.lock().push(p.percent)));
        let mut p = EveryPercent::new(&ctl, "step");
        for done in steps {
            p.at(done, total);
        }
        let v = seen.lock().clone();
        v
    }

    /// The first call is told, then one per whole percent grown at most;
    /// nothing goes past 100% or back.
    #[test]
    fn every_percent_tells_each_percent_once() {
        let v = told(1000, 0..=1000);
        assert_eq!(v.len(), 101, "{v:?}");
        assert_eq!((v[0], v[100]), (0.0, 100.0));
        assert!(v.windows(2).all(|w| w[1] - w[0] >= 1.0), "{v:?}");
        // Steps larger than a percent are each told.
        assert_eq!(told(10, [0, 3, 7, 10]), vec![0.0, 30.0, 70.0, 100.0]);
        // Beyond the end counts as the end; a step of nothing is done.
        assert_eq!(told(10, [12]), vec![100.0]);
        assert_eq!(told(0, [0]), vec![100.0]);
        // Less than a percent more is not told.
        assert_eq!(told(1000, [0, 5, 9]), vec![0.0]);
    }
}
