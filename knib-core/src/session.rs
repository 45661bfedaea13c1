//! What a binding's handle stands for: a [`Session`] (the progress sink,
//! time budget and cancellation of the operations run through it, one at a
//! time) kept in a table of [`Handles`].
//!
//! A handle is a token, never a pointer: it is looked up in the table on
//! every call, so a released, never-made or garbage handle is found missing
//! (the binding turns that into its own error) instead of being
//! dereferenced. Tokens are never reused. The table holds each session as an
//! `Arc`; a running call holds another reference, so releasing a handle
//! while another thread runs an operation on it is safe: the operation
//! finishes, then the session goes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Instant;

use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::{CancelToken, Control, Deadline, ProgressSink};

/// The message of the "busy" error [`Session::exclusive`] refuses a second
/// operation with (a binding tells it from an operation's own "busy", such
/// as a VM another process backs up, which is the operation's error).
pub const CONTEXT_BUSY: &str = "another operation is running on this context (use one context per thread)";

/// The settings and state behind one handle of a binding.
#[derive(Default)]
pub struct Session {
    cancel: Mutex<CancelToken>,
    progress: Mutex<Option<ProgressSink>>,
    timeout_secs: AtomicI64,
    running: AtomicBool,
}

impl Session {
    /// A session with no progress sink and no time limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set (or with `None` remove) where the progress of the next
    /// operations goes.
    pub fn set_progress(&self, sink: Option<ProgressSink>) {
        *self.progress.lock() = sink;
    }

    /// Set the time budget of each next operation, in seconds; 0 or less
    /// means none, and so does a budget too large for the clock
    /// (`i64::MAX`): see [`Deadline::after`].
    pub fn set_timeout(&self, seconds: i64) {
        self.timeout_secs.store(seconds, Ordering::SeqCst);
    }

    /// Ask the running operation to stop; when none runs, the next one to
    /// start is cancelled at once.
    pub fn cancel(&self) {
        self.cancel.lock().cancel();
    }

    /// The control of one operation: this session's progress sink, cancel
    /// token and time budget.
    pub fn control(&self) -> Control {
        let mut ctl = Control::new()
            .with_cancel(self.cancel.lock().clone())
            .with_deadline(Deadline::from_secs(self.timeout_secs.load(Ordering::SeqCst)));
        if let Some(sink) = self.progress.lock().clone() {
            ctl = ctl.with_progress(sink);
        }
        ctl
    }

    /// Run `f` as this session's one operation: a second one at the same
    /// time is refused with a "busy" error. A cancellation asked for during
    /// (or before) it is used up when it ends.
    pub fn exclusive<T, E: From<KnibError>>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut slot = self.begin()?;
        slot.started = true;
        f()
    }

    /// Take this session's one slot (else a "busy" error); it is given back
    /// when the value returned is dropped, using up a cancellation when an
    /// operation `started` in it.
    fn begin(&self) -> Result<Slot<'_>> {
        if self.running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(KnibError::busy(CONTEXT_BUSY));
        }
        Ok(Slot { session: self, started: false })
    }

    /// Run operation `op` of [`crate::api::call`] on `request` as this
    /// session's one operation, logging its end and duration. A
    /// cancellation asked for before it starts fails it at once with a
    /// "cancelled" error, whatever the operation: those that take no
    /// control (`version`, `list`, `delete`, ...) never look at the token,
    /// so the cancellation would be used up unseen and the operation done.
    pub fn call(&self, op: &str, request: &str) -> Result<String> {
        self.call_with(|| Ok((op, request)))
    }

    /// [`Session::call`] on the operation and request `args` gives,
    /// read once this session's one operation has begun: a call whose
    /// arguments are bad (a C caller's NULL) while another operation runs
    /// is refused as busy, as any second operation is, and its error
    /// does not replace the running operation's.
    pub fn call_with<'a, E: From<KnibError>>(
        &self,
        args: impl FnOnce() -> std::result::Result<(&'a str, &'a str), E>,
    ) -> std::result::Result<String, E> {
        let mut slot = self.begin()?;
        // Arguments refused: no operation started, a cancellation waits on.
        let (op, request) = args()?;
        slot.started = true;
        let ctl = self.control();
        if ctl.cancel.is_cancelled() {
            log::info!(target: "knib", "{op}: cancelled before it started");
            return Err(KnibError::new(ErrorKind::Cancelled, format!("{op}: cancelled before it started")).into());
        }
        let started = Instant::now();
        log::debug!(target: "knib", "{op}: started");
        let r = crate::api::call(op, request, &ctl);
        let secs = started.elapsed().as_secs_f64();
        match &r {
            Ok(_) => log::info!(target: "knib", "{op}: done in {secs:.2} s"),
            Err(e) => log::info!(target: "knib", "{op}: failed after {secs:.2} s: {e}"),
        }
        r.map_err(E::from)
    }
}

/// A session's one operation slot, taken ([`Session::begin`]).
struct Slot<'a> {
    session: &'a Session,
    /// An operation started in it.
    started: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.started {
            *self.session.cancel.lock() = CancelToken::new();
        }
        self.session.running.store(false, Ordering::SeqCst);
    }
}

struct Table<T> {
    next: u64,
    live: BTreeMap<u64, Arc<T>>,
}

/// A table of live objects behind handles (tokens). Handles are
/// `tag + n * 16`, never reused; pick a tag that is no valid address (a
/// non-canonical one on 64-bit machines), so that a handle mistaken for a
/// pointer faults at once.
pub struct Handles<T> {
    tag: u64,
    table: Mutex<Table<T>>,
}

impl<T> Handles<T> {
    /// An empty table whose handles start from `tag`.
    pub const fn new(tag: u64) -> Self {
        Handles { tag, table: Mutex::new(Table { next: 1, live: BTreeMap::new() }) }
    }

    /// Keep `value` and return its new handle.
    pub fn insert(&self, value: T) -> u64 {
        let mut t = self.table.lock();
        let n = t.next;
        t.next += 1;
        let handle = self.tag.wrapping_add(n.wrapping_mul(16));
        t.live.insert(handle, Arc::new(value));
        handle
    }

    /// The value behind `handle`, if it is live.
    pub fn get(&self, handle: u64) -> Option<Arc<T>> {
        self.table.lock().live.get(&handle).cloned()
    }

    /// Release `handle`: it is dead from now on. The value goes when the
    /// last call using it returns. `None` when it was not live.
    pub fn remove(&self, handle: u64) -> Option<Arc<T>> {
        self.table.lock().live.remove(&handle)
    }

    /// How many handles are live.
    pub fn len(&self) -> usize {
        self.table.lock().live.len()
    }

    /// Whether no handle is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn handles_are_tokens_never_reused() {
        let h: Handles<u32> = Handles::new(0x1000);
        let a = h.insert(1);
        let b = h.insert(2);
        assert_ne!(a, b);
        assert_eq!(*h.get(a).unwrap(), 1);
        assert!(h.get(a + 1).is_none() && h.get(0).is_none());
        let held = h.get(b).unwrap();
        assert!(h.remove(b).is_some());
        assert!(h.remove(b).is_none(), "a second release finds nothing");
        assert!(h.get(b).is_none());
        assert_eq!(*held, 2, "a running call keeps its value");
        let c = h.insert(3);
        assert!(c != a && c != b);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn one_operation_at_a_time_and_cancel_is_used_up() {
        let s = Session::new();
        let inner = s.exclusive(|| Ok::<_, KnibError>(s.exclusive(|| Ok::<_, KnibError>(())).unwrap_err()));
        assert_eq!(inner.unwrap().kind, ErrorKind::Busy);
        s.cancel();
        let e = s.call("agent.take_hash", r#"{"files": ["/nonexistent-knib-file"]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
        let e = s.call("agent.take_hash", r#"{"files": ["/nonexistent-knib-file"]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "the cancellation was used up: {e}");
    }

    /// A call whose arguments are bad (a C caller's NULL) while another
    /// operation runs is refused as busy (before, its own error replaced the
    /// running operation's); and, no operation having started, it leaves a
    /// cancellation waiting for the next one.
    #[test]
    fn bad_arguments_are_busy_while_an_operation_runs_and_leave_a_cancellation() {
        let s = Session::new();
        let bad = || Err::<(&str, &str), _>(KnibError::invalid("`request_json` is NULL"));
        let inner = s.exclusive(|| Ok::<_, KnibError>(s.call_with(bad).unwrap_err()));
        assert_eq!(inner.unwrap().kind, ErrorKind::Busy);
        s.cancel();
        assert_eq!(s.call_with(bad).unwrap_err().kind, ErrorKind::InvalidInput);
        let e = s.call("version", "{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled, "the cancellation was used up by the refused call: {e}");
        s.call("version", "{}").unwrap();
    }

    /// Huge budgets (what a binding gets from `INT64_MAX` or Java's
    /// `Long.MAX_VALUE`) are no limit, never an overflow: a fixed set near
    /// the edges and seeded ones in between.
    #[test]
    fn a_huge_timeout_means_no_limit() {
        let mut seed: u64 = 0x6b6e_6962_7469_6d65;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut budgets = vec![i64::MAX, i64::MAX - 1, 1 << 62, 1 << 40, u32::MAX as i64, 100 * 365 * 86_400];
        budgets.extend((0..16).map(|_| (next() >> 1) as i64 | (1 << 34)));
        let s = Session::new();
        for secs in budgets {
            s.set_timeout(secs);
            let ctl = s.control();
            assert!(!ctl.deadline.expired(), "{secs} s: expired at once");
            assert!(ctl.deadline.remaining().is_none_or(|r| r.as_secs() >= 100 * 365 * 86_400 - 60), "{secs} s");
            let answer = s.call("version", "{}").unwrap_or_else(|e| panic!("{secs} s: {e}"));
            assert!(answer.contains("\"version\""), "{answer}");
        }
        s.set_timeout(-1);
        assert!(s.control().deadline.remaining().is_none(), "a negative budget is no limit");
        assert!(Deadline::after(std::time::Duration::MAX).remaining().is_none());
        assert!(Deadline::after(std::time::Duration::from_secs(u64::MAX)).budget().is_none());
    }
}
