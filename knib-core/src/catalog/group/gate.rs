//! Where a group backup's members wait for each other between the steps
//! (see [`super`]): one mutex and condition variable, the phase the
//! coordinator has reached, what each member has done, and the copy slots.
//!
//! # Invariants
//!
//! - A member only moves past a step when the phase allows it; once the
//!   phase is `Abort` every waiting member gets an error (before its
//!   snapshot: nothing changed; before its publication: it undoes).
//! - At most `max_copying` members hold a copy slot; a slot is given back
//!   before the publication barrier (so members waiting there never starve
//!   the others) and whatever happens to the member.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// Where the members are held between the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Members are planned; they wait before their snapshot.
    Gather,
    /// Take the snapshots.
    Snapshot,
    /// Copy (guests thawed).
    Copy,
    /// Publish (rollback mode: every copy is written).
    Publish,
    /// Give up: members that have not published undo what they did.
    Abort,
}

#[derive(Debug)]
pub(super) struct GateState {
    pub(super) phase: Phase,
    /// Member i waits before its snapshot.
    pub(super) ready: Vec<bool>,
    /// Member i's snapshot is done, and when.
    pub(super) snapped: Vec<Option<SystemTime>>,
    /// Member i's copies are written (rollback mode).
    pub(super) written: Vec<bool>,
    /// Member i failed, and why.
    pub(super) failed: Vec<Option<String>>,
    /// Member i is done (published or failed).
    pub(super) done: Vec<bool>,
    /// Members copying now, and at most how many.
    pub(super) copying: usize,
    pub(super) max_copying: usize,
    /// Member i holds a copy slot.
    pub(super) holds: Vec<bool>,
    /// Why the group gave up.
    pub(super) abort_reason: Option<String>,
}

/// The meeting point of the members and the coordinator.
pub(super) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

impl Gate {
    pub(super) fn new(n: usize, max_copying: usize) -> Gate {
        Gate {
            state: Mutex::new(GateState {
                phase: Phase::Gather,
                ready: vec![false; n],
                snapped: vec![None; n],
                written: vec![false; n],
                failed: vec![None; n],
                done: vec![false; n],
                copying: 0,
                max_copying: max_copying.max(1),
                holds: vec![false; n],
                abort_reason: None,
            }),
            cv: Condvar::new(),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the state and wake everyone.
    pub(super) fn update(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.lock());
        self.cv.notify_all();
    }

    /// Wait (checking `ctl` every 100 ms) until `until` holds; a cancel or
    /// deadline aborts the group.
    pub(super) fn wait(&self, ctl: &Control, mut until: impl FnMut(&GateState) -> bool) -> Result<()> {
        let mut st = self.lock();
        loop {
            if until(&st) {
                return Ok(());
            }
            if let Err(e) = ctl.check("group backup") {
                st.phase = Phase::Abort;
                st.abort_reason.get_or_insert_with(|| e.message.clone());
                self.cv.notify_all();
                return Err(e);
            }
            st = self.cv.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A member's wait for `phase`, or an error when the group gave up.
    pub(super) fn member_wait(&self, i: usize, ctl: &Control, ok: &[Phase]) -> Result<()> {
        let mut st = self.lock();
        loop {
            if ok.contains(&st.phase) {
                return Ok(());
            }
            if st.phase == Phase::Abort {
                return Err(KnibError::new(
                    ErrorKind::Cancelled,
                    format!("the group backup gave up: {}", st.abort_reason.clone().unwrap_or_default()),
                ));
            }
            let _ = i;
            st = self.cv.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
            if ctl.check("group backup").is_err() && st.phase != Phase::Abort {
                // The coordinator sees the same cancellation and aborts.
                continue;
            }
        }
    }

    /// Member i takes a copy slot, waiting for one (an error when the
    /// group gives up meanwhile).
    pub(super) fn take_slot(&self, i: usize, ctl: &Control) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.phase == Phase::Abort {
                return Err(KnibError::new(
                    ErrorKind::Cancelled,
                    format!("the group backup gave up: {}", st.abort_reason.clone().unwrap_or_default()),
                ));
            }
            if st.copying < st.max_copying {
                st.copying += 1;
                st.holds[i] = true;
                return Ok(());
            }
            st = self.cv.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
            let _ = ctl;
        }
    }

    /// Member i gives its copy slot back, if it holds one.
    pub(super) fn give_slot(&self, i: usize) {
        self.update(|st| {
            if st.holds[i] {
                st.holds[i] = false;
                st.copying -= 1;
            }
        });
    }

    pub(super) fn abort(&self, reason: String) {
        self.update(|s| {
            s.phase = Phase::Abort;
            s.abort_reason.get_or_insert(reason);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn copy_slots_let_at_most_the_limit_copy_at_once() {
        let gate = Gate::new(3, 2);
        let ctl = Control::new();
        gate.take_slot(0, &ctl).unwrap();
        gate.take_slot(1, &ctl).unwrap();
        let third = std::thread::scope(|s| {
            let h = s.spawn(|| {
                gate.take_slot(2, &ctl).unwrap();
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(300));
            let given = Instant::now();
            gate.give_slot(0);
            (given, h.join().unwrap())
        });
        assert!(third.1 >= third.0, "the third member copied before a slot was free");
        assert_eq!(gate.lock().copying, 2);
        // Giving a slot twice, or one never taken, changes nothing.
        gate.give_slot(0);
        assert_eq!(gate.lock().copying, 2);
        // A group that gives up lets a waiting member go with an error.
        let e = std::thread::scope(|s| {
            let h = s.spawn(|| gate.take_slot(0, &ctl));
            std::thread::sleep(Duration::from_millis(200));
            gate.abort("a test".into());
            h.join().unwrap()
        });
        assert_eq!(e.unwrap_err().kind, ErrorKind::Cancelled);
    }
}
