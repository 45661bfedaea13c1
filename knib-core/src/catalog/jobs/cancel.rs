//! Cancelling a job ([`Store::cancel_job`], `knib jobs cancel`).
//!
//! # How
//!
//! - A queued job is cancelled at once, under the queue lock.
//! - A running job is asked to stop: an empty `jobs/<id>.cancel` file is
//!   written beside its job file (only whether it exists is ever looked
//!   at). Its runner looks for that file every [`WATCH`] while the job
//!   runs, on whichever host shares the store; it stops the attempt as a
//!   stopped runner would (a compression removes its `.comp` files, the
//!   backup stays as it was) and records the job `cancelled` instead of
//!   queueing it again. [`Store::cancel_job`] waits up to [`CANCEL_WAIT`]
//!   for that, and answers the job as its runner left it: an attempt that
//!   had already ended well stays `done`.
//! - A running job whose runner is dead (on this host: see
//!   [`super::JobOwner::status`]) is cancelled at once, its compression's
//!   `.comp` files removed under the VM's lock.
//! - A runner that does not stop the job in time (one on another host that
//!   is gone, or a knib older than this one, which does not look) leaves
//!   the job running and the request in place: a `busy` error says so.
//!   With `force`, the job is then recorded `cancelled` all the same, and
//!   the request stays: a runner that does still run stops the attempt
//!   when it sees it, and records nothing over a job that is no longer its
//!   own.
//! - An attempt that ends (and would be queued again) before its runner
//!   sees the request, or whose runner dies, is cancelled instead: by the
//!   runner's record, or by the runner that takes the job back. A `ctl`
//!   stopped (Ctrl-C) while the cancel waits leaves the request in place
//!   and forces nothing.
//! - A job that has ended (`done`, `failed`) cannot be cancelled
//!   (`invalid`); cancelling a `cancelled` job again answers it as it is.
//!
//! # Invariants
//!
//! - Every change of a job's state is made under the queue lock (as the
//!   runner's, the queue module's): a cancel and a runner's claim or record
//!   never cross.
//! - Whoever ends the job (its runner's record, a runner taking it back,
//!   or the cancel) removes the request; only a forced cancel leaves it,
//!   for a runner that may still run (a later cancel of the job removes
//!   it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::model::{Job, JobKind, JobState, OwnerStatus};
use super::now_secs;
use super::queue::lock_queue;
use crate::catalog::Store;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::progress::Control;

/// How long [`Store::cancel_job`] waits for a running job's runner to
/// stop it.
pub const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// How often a runner looks for the cancel request of a job it runs.
pub const WATCH: Duration = Duration::from_millis(250);

/// The cancel request of job `id`, in the jobs directory `dir`.
pub(super) fn request_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.cancel"))
}

/// Whether someone asked for job `id` to be cancelled (a request file, or
/// anything else under its name: nothing is read from it).
pub(super) fn requested(dir: &Path, id: &str) -> bool {
    request_path(dir, id).symlink_metadata().is_ok()
}

/// Remove the cancel request of job `id`, if there is one (logged when it
/// cannot be: a request left behind a job that ended is never acted on).
pub(super) fn forget_request(dir: &Path, id: &str) {
    if let Err(e) = fsio::remove_if_exists(&request_path(dir, id)) {
        log::warn!("job {id}: its cancel request is left: {e}");
    }
}

/// Record `j` cancelled, `why`, under the queue lock.
fn record_cancelled(dir: &Path, j: &mut Job, why: String) -> Result<()> {
    j.cancel(why, now_secs());
    j.save(dir)?;
    forget_request(dir, &j.id);
    Ok(())
}

/// Who runs `j`, for messages.
fn runner(j: &Job) -> String {
    j.owner
        .as_ref()
        .map(|o| format!("its runner (pid {} on {})", o.pid, o.hostname))
        .unwrap_or_else(|| "its runner".into())
}

impl Store {
    /// Cancel job `id`, as the module's doc says: a queued job at once, a
    /// running one by asking its runner to stop it (waiting up to
    /// [`CANCEL_WAIT`], or until `ctl` is cancelled or its deadline
    /// passes), or, with `force`, recording it cancelled when its runner
    /// does not stop it in time. The job as it is afterwards.
    pub fn cancel_job(&self, id: &str, force: bool, ctl: &Control) -> Result<Job> {
        self.cancel_job_within(id, force, CANCEL_WAIT, ctl)
    }

    /// [`Store::cancel_job`] with another wait.
    pub fn cancel_job_within(&self, id: &str, force: bool, wait: Duration, ctl: &Control) -> Result<Job> {
        let dir = self.jobs_dir();
        self.job(id)?;
        let started = Instant::now();
        let mut asked = false;
        let mut died = false;
        loop {
            let step = {
                let _lock = lock_queue(&dir)?;
                let mut j = self.job(id)?;
                match j.state {
                    JobState::Queued => {
                        record_cancelled(&dir, &mut j, "cancelled by the operator before it ran".into())?;
                        Some(j)
                    }
                    JobState::Running => {
                        let status = j.owner.as_ref().map(|o| o.status()).unwrap_or(OwnerStatus::Dead);
                        if status == OwnerStatus::Dead {
                            let why = format!("cancelled by the operator; {} had died", runner(&j));
                            record_cancelled(&dir, &mut j, why)?;
                            died = true;
                            Some(j)
                        } else {
                            // Again if it is gone: an attempt that ended
                            // as it was written took it, and the job may
                            // have been claimed again since.
                            if !requested(&dir, id) {
                                fsio::write_atomic(&request_path(&dir, id), b"")?;
                                log::info!("job {id}: asked {} to stop it", runner(&j));
                            }
                            asked = true;
                            None
                        }
                    }
                    JobState::Cancelled => {
                        forget_request(&dir, id);
                        Some(j)
                    }
                    JobState::Done | JobState::Failed if asked => {
                        forget_request(&dir, id);
                        Some(j)
                    }
                    JobState::Done | JobState::Failed => {
                        forget_request(&dir, id);
                        return Err(KnibError::invalid(format!(
                            "job {id} has ended ({}): there is nothing to cancel",
                            j.state.as_str()
                        )));
                    }
                }
            };
            if let Some(j) = step {
                if died {
                    // After the queue lock: the VM's is taken while no
                    // other lock is held.
                    self.remove_comp_of(&j);
                }
                return Ok(j);
            }
            // Stopped (Ctrl-C) or out of time: the request stays for the
            // runner, and nothing is forced.
            ctl.check(&format!("waiting for the runner of job {id} to stop it"))?;
            if started.elapsed() < wait {
                std::thread::sleep(WATCH.min(wait));
                continue;
            }
            let _lock = lock_queue(&dir)?;
            let mut j = self.job(id)?;
            if j.state != JobState::Running {
                // Its attempt ended meanwhile: the next look decides.
                continue;
            }
            if force {
                let why = format!(
                    "cancelled by the operator with force: {} did not stop it within {} s",
                    runner(&j),
                    started.elapsed().as_secs()
                );
                log::warn!("job {id}: {why}");
                // The request stays: a runner that still runs stops the
                // attempt when it sees it, and records nothing over this.
                j.cancel(why, now_secs());
                j.save(&dir)?;
                return Ok(j);
            }
            return Err(KnibError::new(
                ErrorKind::Busy,
                format!(
                    "job {id} is still running: {} was asked to stop it and has not within {} s. It stops it at \
                     its next look if it still runs (a knib older than this one does not look); if that runner \
                     is gone (its host down), cancel with force to record the job cancelled",
                    runner(&j),
                    started.elapsed().as_secs()
                ),
            ));
        }
    }

    /// The `.comp` files a compression job whose runner died left, removed
    /// under the VM's lock (taking it finishes a compression whose next
    /// manifest names them); best effort, logged.
    pub(super) fn remove_comp_of(&self, j: &Job) {
        if j.kind != JobKind::Compress {
            return;
        }
        let m = match self.find(&j.backup) {
            Ok(m) => m,
            Err(e) => return log::warn!("job {}: its .comp files are left: {e}", j.id),
        };
        match self.lock_vm(&m.vm, &format!("cancel of job {}", j.id)) {
            Ok(_lock) => {
                if let Err(e) = self.remove_comp_files(&m) {
                    log::warn!("job {}: its .comp files are left: {e}", j.id);
                }
            }
            Err(e) => log::warn!("job {}: its .comp files are left for later: {e}", j.id),
        }
    }
}
