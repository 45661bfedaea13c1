//! The runner: worker threads that claim due jobs, run them within the
//! settings' limits, and record their results (see the module
//! documentation of [`super`] for the rules).
//!
//! # Invariants
//!
//! - A claim and a record are each one queue transaction; a job runs
//!   outside the lock.
//! - At most `max_concurrent_per_host` jobs of a kind run on a host, and at
//!   most one job per VM, whatever its kind.
//! - An error reading the queue stops every worker; the jobs running finish
//!   and are recorded first.

use std::collections::HashSet;
use std::fs::{self};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::cancel;
use super::model::{Job, JobKind, JobOwner, JobState, OwnerStatus};
use super::now_f64;
use super::ownership::me;
use super::queue::{load_all, lock_queue};
use crate::catalog::settings::{Settings, SyncSettings};
use crate::catalog::Store;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::progress::{CancelToken, Control, Deadline};

/// How often a waiting runner looks at the queue again (other processes may
/// change it).
const POLL: Duration = Duration::from_millis(500);

/// What happened to a job, as a runner reports it.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A job whose runner had died was taken back and queued again.
    Recovered(Job),
    /// A job was claimed and is about to run; it is in state running.
    Started(Job),
    /// An attempt ended; the job's state says how (done, failed, cancelled,
    /// or queued again for a retry).
    Finished(Job),
    /// The runner waits for this queued job's retry time
    /// (`next_attempt_at`, not come yet); told once per job and retry time,
    /// so a runner that waits says for what (`no_wait` leaves such jobs
    /// queued instead).
    Waiting(Job),
}

/// Receives the runner's events, from its worker threads.
pub type JobObserver = Arc<dyn Fn(&JobEvent) + Send + Sync>;

/// How an attempt of a sync job ended, as its [`SyncRunner`] tells.
#[derive(Debug, Clone)]
pub enum SyncAttempt {
    /// Sent: what the sync did (its report), kept in the job's `result`.
    Done(serde_json::Value),
    /// Failed in a way a retry would not change (the vault refused the
    /// credentials, or no vault is set): the job fails at once.
    Refused(KnibError),
    /// Failed (the vault unreachable, a missing bucket, the VM busy): retried
    /// as other jobs are.
    Failed(KnibError),
}

/// Runs one attempt of a sync job: sends the backups of `job.vm` that the
/// vault of `settings.vault` lacks, within the control's time budget. The
/// vault is built on the catalog, so the catalog cannot call it itself: the
/// caller of [`run_jobs`] gives the runner (`knib_core::vault::sync_runner`).
pub type SyncRunner = Arc<dyn Fn(&Store, &Job, &SyncSettings, &Control) -> SyncAttempt + Send + Sync>;

/// How [`run_jobs`] runs.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Runs sync jobs; without it they are left queued, as a disabled kind's.
    pub sync: Option<SyncRunner>,
    /// Called at every event (a hook for progress output and tests).
    pub observer: Option<JobObserver>,
    /// Stops the runner: no job is started any more, running ones are
    /// stopped and queued again (their attempt not counted).
    pub cancel: CancelToken,
    /// Do not wait for jobs whose retry time has not come, nor for due jobs
    /// that another runner's job of their VM holds back; leave them queued.
    pub no_wait: bool,
}

/// What one [`run_jobs`] did (job ids).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Every kind of job is disabled in the settings: nothing was run.
    pub disabled: bool,
    /// Jobs that finished.
    pub done: Vec<String>,
    /// Jobs that failed their last attempt.
    pub failed: Vec<String>,
    /// Jobs cancelled: their backup was deleted, or an operator cancelled
    /// them while they ran.
    pub cancelled: Vec<String>,
    /// One entry per failed (or busy) attempt that was queued again for a
    /// retry.
    pub retried: Vec<String>,
    /// Jobs taken back from a runner that had died.
    pub recovered: Vec<String>,
    /// Jobs still queued when the runner ended.
    pub left_queued: Vec<String>,
}

/// The result of one attempt.
enum Outcome {
    Done(Option<serde_json::Value>),
    /// The job ran and found the backup bad: failed at once, no retry.
    Rejected(String, serde_json::Value),
    Cancelled(String),
    Failed(KnibError),
    Interrupted(KnibError),
    /// Its VM (or a file it writes) busy with another operation (a backup,
    /// a delete). Queued again after [`BUSY_RETRY_SECS`], no attempt
    /// counted, within [`BUSY_PATIENCE_SECS`] of its queueing; a failed
    /// attempt after that.
    Busy(KnibError),
}

/// How long a job whose VM was busy waits before it is tried again.
pub const BUSY_RETRY_SECS: u64 = 60;

/// For how long after a job is queued its VM being busy counts no attempt
/// (a holder that never lets go must not keep the job, and a waiting
/// `jobs run`, for ever).
pub const BUSY_PATIENCE_SECS: u64 = 3600;

/// What a look at the queue found.
struct Scan {
    claimed: Option<Job>,
    recovered: Vec<Job>,
    /// Jobs asked to stop, cancelled instead of taken back or claimed.
    cancelled: Vec<Job>,
    /// The earliest retry time of a queued job that is not due yet.
    next_due: Option<f64>,
    /// The queued jobs that are not due yet.
    not_due: Vec<Job>,
    /// A due job could not start (its VM busy, or the host at its limit).
    blocked: bool,
}

/// How long past its time limit a job of another host's runner may run
/// before it is taken for dead: a day, as much as the clocks of hosts
/// sharing a store are allowed to differ (a runner stops a job at its
/// limit; the limit may have been lowered since the job began, and a
/// job's first steps, before its deadline is set, are not counted in it).
pub const STALE_AFTER_SECS: u64 = 86_400;

/// Whether this runner runs jobs of `kind`: enabled in the settings (and,
/// for sync jobs, a [`SyncRunner`] given).
fn runs(kind: JobKind, settings: &Settings, opts: &RunOptions) -> bool {
    kind.limits(settings).0 && (kind != JobKind::Sync || opts.sync.is_some())
}

/// How long a job that ended (done, failed, cancelled) stays in the queue
/// for `jobs list` and `jobs show`: 30 days. Then a runner removes its
/// file, so that the queue, which every scan reads whole, does not grow
/// with every backup for ever.
pub const KEEP_ENDED_SECS: u64 = 30 * 24 * 3600;

/// Remove the files of `jobs` that ended over [`KEEP_ENDED_SECS`] before
/// `now` (under the queue lock: the job's, its cancel request's, its
/// screenshot's), and drop them from `jobs`. A file that
/// cannot be removed stays, logged.
fn forget_old_jobs(dir: &std::path::Path, jobs: &mut Vec<Job>, now: u64) {
    jobs.retain(|j| {
        let old = !j.state.is_active() && j.finished_at.unwrap_or(j.updated_at).saturating_add(KEEP_ENDED_SECS) < now;
        if !old {
            return true;
        }
        match crate::fsio::remove_if_exists(&dir.join(format!("{}.json", j.id))) {
            Ok(()) => {
                log::info!("job {}: ended over {} days ago: its file is removed", j.id, KEEP_ENDED_SECS / 86400);
                cancel::forget_request(dir, &j.id);
                // A validation's screenshot.
                if let Err(e) = crate::fsio::remove_if_exists(&dir.join(format!("{}.png", j.id))) {
                    log::warn!("job {}: {e}", j.id);
                }
                false
            }
            Err(e) => {
                log::warn!("job {}: {e}", j.id);
                true
            }
        }
    });
}

/// Under the queue lock: take back jobs of dead runners, then claim the
/// first due job that the limits allow.
fn scan(store: &Store, settings: &Settings, opts: &RunOptions) -> Result<Scan> {
    let dir = store.jobs_dir();
    let me = me();
    let mut jobs = load_all(&dir)?;
    let now = now_f64();
    forget_old_jobs(&dir, &mut jobs, now as u64);
    let mut recovered = Vec::new();
    let mut cancelled = Vec::new();
    for j in jobs.iter_mut().filter(|j| j.state == JobState::Running) {
        let status = j.owner.as_ref().map(|o| o.status()).unwrap_or(OwnerStatus::Dead);
        // A runner of another host stops a job at its time limit: one held
        // past it by more than STALE_AFTER_SECS is taken for dead (its host
        // went down mid-job), else its VM's jobs waited for ever here.
        let timeout = j.kind.limits(settings).4;
        let stale = status == OwnerStatus::OtherHost
            && timeout > 0
            && j.owner
                .as_ref()
                .is_some_and(|o| o.started_at.saturating_add(timeout).saturating_add(STALE_AFTER_SECS) < now as u64);
        if status == OwnerStatus::Dead || stale {
            let who = j
                .owner
                .as_ref()
                .map(|o| format!("runner pid {} on {}", o.pid, o.hostname))
                .unwrap_or_else(|| "a runner".into());
            let died = match stale {
                true => format!(
                    "its {who} has held it over {STALE_AFTER_SECS} s past its time limit of {timeout} s: taken for dead"
                ),
                false => format!("its {who} died"),
            };
            if cancel::requested(&dir, &j.id) {
                // Asked to stop before its runner died: not run again.
                log::warn!("job {}: {died}; it was asked to stop: cancelled", j.id);
                j.cancel(format!("cancelled by the operator; {died}"), now as u64);
                j.save(&dir)?;
                cancel::forget_request(&dir, &j.id);
                cancelled.push(j.clone());
                continue;
            }
            log::warn!("job {}: {died}; queueing it again", j.id);
            j.state = JobState::Queued;
            j.owner = None;
            j.next_attempt_at = now as u64;
            j.last_error = Some(match stale {
                true => format!("interrupted: {died}"),
                false => format!("interrupted: the {who} died during the attempt"),
            });
            j.updated_at = now as u64;
            j.save(&dir)?;
            recovered.push(j.clone());
        }
    }
    let running: Vec<&Job> = jobs.iter().filter(|j| j.state == JobState::Running).collect();
    let host_running = |kind: JobKind| {
        running.iter().filter(|j| j.kind == kind && j.owner.as_ref().is_some_and(|o| o.hostname == me.hostname)).count()
    };
    let busy_vms: HashSet<&str> = running.iter().map(|j| j.vm.as_str()).collect();
    let mut queued: Vec<usize> = (0..jobs.len()).filter(|i| jobs[*i].state == JobState::Queued).collect();
    queued.sort_by_key(|i| (jobs[*i].next_attempt_at, jobs[*i].created_at, jobs[*i].id.clone()));
    let mut next_due: Option<f64> = None;
    let mut not_due = Vec::new();
    let mut blocked = false;
    let mut pick = None;
    let mut asked = Vec::new();
    for i in queued {
        let j = &jobs[i];
        let at = j.next_attempt_at as f64;
        let (_, max_here, ..) = j.kind.limits(settings);
        if !runs(j.kind, settings, opts) {
            continue;
        }
        if at > now {
            next_due = Some(next_due.map_or(at, |d| d.min(at)));
            not_due.push(j.clone());
        } else if host_running(j.kind) >= max_here as usize || busy_vms.contains(j.vm.as_str()) {
            blocked = true;
        } else if pick.is_none() {
            if cancel::requested(&dir, &j.id) {
                // Asked to stop (its request written while it ran, the
                // attempt then ended and queued again): cancelled, not
                // claimed.
                asked.push(i);
            } else {
                pick = Some(i);
            }
        }
    }
    for i in asked {
        let j = &mut jobs[i];
        log::warn!("job {}: it was asked to stop: cancelled", j.id);
        j.cancel("cancelled by the operator".into(), now as u64);
        j.save(&dir)?;
        cancel::forget_request(&dir, &j.id);
        cancelled.push(j.clone());
    }
    let claimed = match pick {
        Some(i) => {
            let j = &mut jobs[i];
            j.state = JobState::Running;
            j.owner = Some(JobOwner {
                pid: me.pid,
                hostname: me.hostname.clone(),
                started_at: now as u64,
                boot_id: me.boot_id.clone(),
                pid_start: me.pid_start,
            });
            j.updated_at = now as u64;
            j.save(&dir)?;
            Some(j.clone())
        }
        None => None,
    };
    Ok(Scan { claimed, recovered, cancelled, next_due, not_due, blocked })
}

/// Under the queue lock: write the result of an attempt of `job`; the job
/// as it is then, and whether the result was written (not when the job is
/// no longer this runner's).
fn record(store: &Store, settings: &Settings, job: &Job, outcome: &Outcome) -> Result<(Job, bool)> {
    let dir = store.jobs_dir();
    let mut j = Job::load(&dir.join(format!("{}.json", job.id)))?;
    if j.state != JobState::Running || j.owner != job.owner {
        // No longer this runner's: cancelled with force meanwhile (or
        // taken back by another). Left as it is.
        log::warn!(
            "job {}: it is {} now, not this runner's: the attempt's outcome is not recorded",
            j.id,
            j.state.as_str()
        );
        if j.state != JobState::Running {
            cancel::forget_request(&dir, &j.id);
        }
        return Ok((j, false));
    }
    let now = now_f64();
    j.owner = None;
    j.updated_at = now as u64;
    match outcome {
        Outcome::Done(result) => {
            j.state = JobState::Done;
            j.last_error = None;
            j.result = result.clone();
        }
        Outcome::Rejected(why, result) => {
            j.attempts = j.attempts.saturating_add(1);
            j.state = JobState::Failed;
            j.last_error = Some(why.clone());
            j.result = Some(result.clone());
        }
        Outcome::Cancelled(why) => j.cancel(why.clone(), now as u64),
        Outcome::Interrupted(e) => {
            j.state = JobState::Queued;
            j.next_attempt_at = now as u64;
            j.last_error = Some(format!("interrupted: {e}"));
        }
        Outcome::Busy(e) if (now as u64).saturating_sub(j.created_at) < BUSY_PATIENCE_SECS => {
            j.state = JobState::Queued;
            j.next_attempt_at = now as u64 + BUSY_RETRY_SECS;
            j.last_error = Some(format!("busy, tried again in {BUSY_RETRY_SECS} s without counting an attempt: {e}"));
        }
        Outcome::Failed(e) | Outcome::Busy(e) => {
            let (_, _, max_retries, interval, _) = j.kind.limits(settings);
            j.attempts = j.attempts.saturating_add(1);
            j.last_error = Some(e.to_string());
            if j.attempts <= max_retries {
                j.state = JobState::Queued;
                j.next_attempt_at = (now + interval as f64).ceil() as u64;
            } else {
                j.state = JobState::Failed;
            }
        }
    }
    if j.state == JobState::Queued && cancel::requested(&dir, &j.id) {
        // Asked to stop while it ran, its attempt ended before the runner
        // saw it: not queued again.
        j.cancel("cancelled by the operator while it ran".into(), now as u64);
    }
    if !j.state.is_active() {
        j.finished_at = Some(now as u64);
    }
    j.save(&dir)?;
    cancel::forget_request(&dir, &j.id);
    Ok((j, true))
}

/// When the job's backup is gone (or only kept as a removed parent), why;
/// its `.comp` files are removed.
fn backup_gone(store: &Store, job: &Job) -> Option<String> {
    match store.find(&job.backup) {
        Ok(m) if m.removed => {
            // Best effort, under the VM's lock (taking it finishes any
            // compression whose manifest names its `.comp` files): without
            // it the files are left for a later cleanup.
            match store.lock_vm(&m.vm, &format!("cleanup of job {}", job.id)) {
                Ok(_lock) => {
                    if let Err(e) = store.remove_comp_files(&m) {
                        log::warn!("job {}: {e}", job.id);
                    }
                }
                Err(e) => log::warn!("job {}: its .comp files are left for later: {e}", job.id),
            }
            Some(format!("backup {} was deleted", job.backup))
        }
        Ok(_) => None,
        Err(e) if e.kind == ErrorKind::NotFound => Some(format!("backup {} was deleted", job.backup)),
        Err(_) => None,
    }
}

/// The control of an attempt: the runner's cancel token and the kind's
/// time budget (0 = none).
fn job_control(timeout_secs: u64, cancel: &CancelToken) -> Control {
    let deadline =
        if timeout_secs == 0 { Deadline::none() } else { Deadline::after(Duration::from_secs(timeout_secs)) };
    Control::new().with_cancel(cancel.clone()).with_deadline(deadline)
}

/// What an attempt that ended with `e` comes to: cancelled when its backup
/// is gone, interrupted when the runner was stopped, busy when its VM (or
/// the files it writes) was taken by another operation, else failed.
fn failed(store: &Store, job: &Job, cancel: &CancelToken, e: KnibError) -> Outcome {
    if let Some(why) = backup_gone(store, job) {
        Outcome::Cancelled(why)
    } else if e.kind == ErrorKind::Cancelled && cancel.is_cancelled() {
        Outcome::Interrupted(e)
    } else if e.kind == ErrorKind::Busy {
        Outcome::Busy(e)
    } else {
        Outcome::Failed(e)
    }
}

fn compress_job(store: &Store, job: &Job, settings: &Settings, cancel: &CancelToken) -> Outcome {
    if let Some(why) = backup_gone(store, job) {
        return Outcome::Cancelled(why);
    }
    let m = match store.show(&job.backup) {
        Ok(m) => m,
        Err(e) => return Outcome::Failed(e),
    };
    // Leftovers of an interrupted attempt go first, under the VM's lock.
    {
        let _lock = match store.lock_vm(&m.vm, &format!("compression of {}", m.id)) {
            Ok(l) => l,
            Err(e) => return failed(store, job, cancel, e),
        };
        if let Err(e) = store.remove_comp_files(&m) {
            return Outcome::Failed(e);
        }
    }
    let ctl = job_control(settings.compression.timeout_secs, cancel);
    match store.compress(&job.backup, &settings.compress_options(), &ctl) {
        Ok(_) => Outcome::Done(None),
        // A backup file that does not match its hash will not match it on a
        // retry either: failed at once, the backup left as it was.
        Err(e) if e.kind == ErrorKind::Corrupt && backup_gone(store, job).is_none() => {
            Outcome::Rejected(e.to_string(), serde_json::json!({ "error": e }))
        }
        Err(e) => failed(store, job, cancel, e),
    }
}

/// The screenshot of validation job `id`: `STORE/jobs/<id>.png`.
pub fn screenshot_path(store: &Store, id: &str) -> PathBuf {
    store.jobs_dir().join(format!("{id}.png"))
}

fn validate_job(store: &Store, job: &Job, settings: &Settings, cancel: &CancelToken) -> Outcome {
    if let Some(why) = backup_gone(store, job) {
        return Outcome::Cancelled(why);
    }
    let v = &settings.validation;
    let ctl = job_control(v.timeout_secs, cancel);
    let work = store.jobs_dir().join(format!(".{}.work", job.id));
    let shot = screenshot_path(store, &job.id);
    // Both names are knib's own; whatever is there (a leftover, or a link
    // planted to make the boot test write elsewhere) goes first.
    let leftovers = (|| -> Result<()> {
        fsio::remove_entry(&work)?;
        fsio::remove_if_exists(&shot)
    })();
    if let Err(e) = leftovers {
        return failed(store, job, cancel, e);
    }
    let r = store.validate(&job.backup, v, &work, Some(&shot), &ctl);
    let _ = fs::remove_dir_all(&work);
    match r {
        Ok(report) => {
            let value = serde_json::to_value(&report).expect("a report serializes");
            if report.ok {
                Outcome::Done(Some(value))
            } else if let Some(why) = backup_gone(store, job) {
                // Deleted while it was validated (the delete's check that
                // no validation runs came first): its files went, it was
                // not found bad.
                Outcome::Cancelled(why)
            } else {
                Outcome::Rejected(format!("backup {} is not valid: {}", job.backup, report.problems.join("; ")), value)
            }
        }
        Err(e) => failed(store, job, cancel, e),
    }
}

/// A sync job: the VM's backups the vault lacks, sent by the caller's
/// [`SyncRunner`]. It is not cancelled when its `backup` is deleted (the
/// VM's other backups still go); a VM left with no backup sends nothing.
fn sync_job(store: &Store, job: &Job, settings: &Settings, opts: &RunOptions) -> Outcome {
    let Some(run) = &opts.sync else {
        return Outcome::Failed(KnibError::internal(format!("job {}: no sync runner", job.id)));
    };
    let ctl = job_control(settings.sync.timeout_secs, &opts.cancel);
    match run(store, job, &settings.sync, &ctl) {
        SyncAttempt::Done(report) => Outcome::Done(Some(report)),
        SyncAttempt::Refused(e) => Outcome::Rejected(e.to_string(), serde_json::json!({ "error": e })),
        SyncAttempt::Failed(e) if e.kind == ErrorKind::Cancelled && opts.cancel.is_cancelled() => {
            Outcome::Interrupted(e)
        }
        SyncAttempt::Failed(e) => Outcome::Failed(e),
    }
}

/// [`execute`], stopped when the runner is (the attempt is then queued
/// again) or when the job's cancel request appears (see [`cancel`]): the
/// attempt is then cancelled, unless it had ended well or found the backup
/// bad. A thread looks for both every [`cancel::WATCH`] while it runs.
fn execute_watched(store: &Store, job: &Job, settings: &Settings, opts: &RunOptions) -> Outcome {
    let dir = store.jobs_dir();
    let stop = CancelToken::new();
    let job_opts = RunOptions { cancel: stop.clone(), ..opts.clone() };
    let ended = AtomicBool::new(false);
    let asked = AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            while !ended.load(Ordering::SeqCst) {
                if opts.cancel.is_cancelled() {
                    stop.cancel();
                }
                if !asked.load(Ordering::SeqCst) && cancel::requested(&dir, &job.id) {
                    log::warn!("job {}: cancel requested: stopping it", job.id);
                    asked.store(true, Ordering::SeqCst);
                    stop.cancel();
                }
                std::thread::park_timeout(cancel::WATCH);
            }
        });
        // Ends the watcher however `execute` ends (a panic too: the scope
        // would wait for it for ever).
        let _ended = EndWatch(&ended, watcher.thread().clone());
        execute(store, job, settings, &job_opts)
    });
    match outcome {
        Outcome::Done(_) | Outcome::Rejected(..) | Outcome::Cancelled(_) => outcome,
        _ if asked.load(Ordering::SeqCst) || cancel::requested(&dir, &job.id) => {
            Outcome::Cancelled("cancelled by the operator while it ran".into())
        }
        _ => outcome,
    }
}

/// Sets its flag and wakes the watcher of [`execute_watched`] when dropped.
struct EndWatch<'a>(&'a AtomicBool, std::thread::Thread);

impl Drop for EndWatch<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        self.1.unpark();
    }
}

fn execute(store: &Store, job: &Job, settings: &Settings, opts: &RunOptions) -> Outcome {
    let cancel = &opts.cancel;
    // The job's VM is what the runner counts as busy while it runs: a job
    // naming one VM and a backup of another was not queued by knib.
    if job.kind != JobKind::Sync {
        if let Ok(m) = store.find(&job.backup) {
            if m.vm != job.vm {
                let e = KnibError::corrupt(format!(
                    "job {} names VM {} but backup {}, which is a backup of {}: it is not run",
                    job.id, job.vm, job.backup, m.vm
                ));
                return Outcome::Rejected(e.to_string(), serde_json::json!({ "error": e }));
            }
        }
    }
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.kind {
        JobKind::Compress => compress_job(store, job, settings, cancel),
        JobKind::Validate => validate_job(store, job, settings, cancel),
        JobKind::Sync => sync_job(store, job, settings, opts),
    }));
    run.unwrap_or_else(|p| {
        let what = crate::panic_log::payload_message(p.as_ref());
        Outcome::Failed(KnibError::internal(format!("job {} panicked: {what}", job.id)))
    })
}

/// State shared by the worker threads of one runner.
struct Shared {
    /// Jobs of this runner between claim and record.
    running: Mutex<usize>,
    changed: Condvar,
    stop: AtomicBool,
    error: Mutex<Option<KnibError>>,
    summary: Mutex<RunSummary>,
    /// The jobs (and retry times) a [`JobEvent::Waiting`] was told for.
    told_waiting: Mutex<HashSet<(String, u64)>>,
}

impl Shared {
    fn fail(&self, e: KnibError) {
        self.error.lock().get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

fn worker(store: &Store, settings: &Settings, opts: &RunOptions, shared: &Shared) {
    let dir = store.jobs_dir();
    let emit = |e: JobEvent| {
        if let Some(o) = &opts.observer {
            o(&e);
        }
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) || opts.cancel.is_cancelled() {
            return;
        }
        let found = lock_queue(&dir).and_then(|_lock| {
            let s = scan(store, settings, opts)?;
            if s.claimed.is_some() {
                *shared.running.lock() += 1;
            }
            Ok(s)
        });
        let found = match found {
            Ok(s) => s,
            Err(e) => return shared.fail(e),
        };
        for j in found.recovered {
            shared.summary.lock().recovered.push(j.id.clone());
            emit(JobEvent::Recovered(j));
        }
        for j in found.cancelled {
            // A compression's runner may have died mid-write: its `.comp`
            // files go (the queue lock is no longer held).
            store.remove_comp_of(&j);
            shared.summary.lock().cancelled.push(j.id.clone());
            emit(JobEvent::Finished(j));
        }
        if let Some(job) = found.claimed {
            emit(JobEvent::Started(job.clone()));
            let outcome = execute_watched(store, &job, settings, opts);
            crate::crashpoint::pause_point(&format!("recording job {}", job.id));
            let recorded = lock_queue(&dir).and_then(|_lock| record(store, settings, &job, &outcome));
            *shared.running.lock() -= 1;
            shared.changed.notify_all();
            match recorded {
                Ok((j, written)) => {
                    {
                        let mut s = shared.summary.lock();
                        let list = match (j.state, &outcome) {
                            // Cancelled with force meanwhile: counted as
                            // cancelled; taken by another runner: not ours.
                            (JobState::Cancelled, _) => Some(&mut s.cancelled),
                            _ if !written => None,
                            (JobState::Done, _) => Some(&mut s.done),
                            (JobState::Failed, _) => Some(&mut s.failed),
                            (JobState::Queued, Outcome::Failed(_) | Outcome::Busy(_)) => Some(&mut s.retried),
                            _ => None,
                        };
                        if let Some(l) = list {
                            l.push(j.id.clone());
                        }
                    }
                    emit(JobEvent::Finished(j));
                }
                Err(e) => return shared.fail(e),
            }
            continue;
        }
        if !opts.no_wait {
            for j in found.not_due {
                if shared.told_waiting.lock().insert((j.id.clone(), j.next_attempt_at)) {
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(j.next_attempt_at);
                    log::info!(
                        "job {}: waiting for its retry time {} (a runner without waiting leaves it queued)",
                        j.id,
                        crate::catalog::manifest::rfc3339(at)
                    );
                    emit(JobEvent::Waiting(j));
                }
            }
        }
        let mut here = shared.running.lock();
        let waiting = !opts.no_wait && (found.blocked || found.next_due.is_some());
        if *here == 0 && !waiting {
            return;
        }
        let mut timeout = POLL;
        if let Some(due) = found.next_due {
            timeout = timeout.min(Duration::from_secs_f64((due - now_f64()).max(0.0)));
        }
        let _ = shared.changed.wait_for(&mut here, timeout);
    }
}

/// Work the store's job queue until it is empty: run every due job within
/// the settings' limits, wait for the ones waiting for a retry, and return
/// what was done. An error reading the queue (a job file of an unknown kind,
/// say) stops the runner: the jobs it is running finish, and the error is
/// returned.
pub fn run_jobs(store: &Store, opts: &RunOptions) -> Result<RunSummary> {
    let settings = store.settings()?;
    let shared = Shared {
        running: Mutex::new(0),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        summary: Mutex::new(RunSummary::default()),
        told_waiting: Mutex::new(HashSet::new()),
    };
    let workers: u32 =
        JobKind::ALL.iter().filter(|k| runs(**k, &settings, opts)).map(|k| k.limits(&settings).1.max(1)).sum();
    if workers > 0 {
        std::thread::scope(|s| {
            for i in 0..workers {
                let (settings, shared) = (&settings, &shared);
                std::thread::Builder::new()
                    .name(format!("knib-job-{i}"))
                    .spawn_scoped(s, move || worker(store, settings, opts, shared))
                    .expect("a worker thread starts");
            }
        });
    }
    if let Some(e) = shared.error.into_inner() {
        return Err(e);
    }
    let mut summary = shared.summary.into_inner();
    summary.disabled = workers == 0;
    summary.left_queued = store.jobs()?.into_iter().filter(|j| j.state == JobState::Queued).map(|j| j.id).collect();
    if opts.cancel.is_cancelled() {
        return Err(KnibError::new(
            ErrorKind::Cancelled,
            format!("the job runner was cancelled; {} job(s) left queued", summary.left_queued.len()),
        ));
    }
    Ok(summary)
}
