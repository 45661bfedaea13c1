//! Durable jobs of a store: compression and validation of backups, and
//! syncs of a VM's backups to a vault on S3.
//!
//! # Files
//!
//! ```text
//! STORE/knib.json          settings (see [`super::settings`]); optional
//! STORE/jobs/.lock         flock: one short queue transaction at a time
//! STORE/jobs/<id>.json     one job (JSON, schema 1), written atomically
//! STORE/jobs/<id>.cancel   a request to cancel running job <id> (empty)
//! ```
//!
//! A job is `queued`, `running`, `done`, `failed` or `cancelled`. Every
//! change of state (queue, claim, take back, record a result) is made under
//! the store-wide queue lock, by reading the job files and rewriting the one
//! that changes with [`crate::fsio::write_atomic`]: a compare-and-swap, so two
//! runners (threads or processes) never claim the same job, and a job file is
//! always whole.
//!
//! # Running
//!
//! [`run_jobs`] starts one worker thread per slot of each enabled kind
//! (`compression.max_concurrent_per_host`, `validation.max_concurrent_per_host`
//! and, when it was given a [`SyncRunner`], `sync.max_concurrent_per_host`).
//! Each claims a due queued job (state `running`, `owner` = this process),
//! runs it with its kind's time budget, and records the result:
//!
//! - success: `done` (a validation's report is kept in the job's `result`);
//! - a validation that ran and found the backup bad: `failed` at once, with
//!   the problems in `last_error` and the report in `result` (checking an
//!   unchanged backup again would find the same);
//! - a compression that found a backup file damaged (`corrupt`: it does not
//!   match its recorded hash): `failed` at once, the backup left as it was;
//! - failure: `attempts` + 1; while `attempts <= max_retries` the job is
//!   queued again with `next_attempt_at` = now + `retry_interval_secs`,
//!   then it is `failed` with `last_error`; the backup is left as it was
//!   (a failed compression removes its `.comp` files);
//! - the backup no longer exists (deleted meanwhile, or only kept as a
//!   removed parent): `cancelled`, and its `.comp` files are removed.
//! - an operator cancelled it ([`Store::cancel_job`], `knib jobs cancel`;
//!   see [`cancel`]): `cancelled`, the attempt stopped as a stopped
//!   runner's is (a compression removes its `.comp` files).
//!
//! Limits: at most `max_concurrent_per_host` jobs of a kind run at once on
//! one host, counting the jobs of every runner process of the host (jobs with
//! a live owner of the same hostname); at most one job per VM runs at a
//! time, whatever its kind. The retries, interval and budget are the kind's
//! own settings; jobs of a disabled kind stay queued. The runner ends when
//! no job is queued and none of its own is running; jobs waiting for their retry time are
//! waited for (unless [`RunOptions::no_wait`]), so the queue is worked until
//! empty.
//!
//! # Crashes
//!
//! A job found `running` whose owner is on this host (same hostname) and
//! dead (no such pid, a zombie, a pid reused by another process or a
//! different boot) is taken back: queued again, its attempt not counted (it
//! was interrupted, not failed). Before each attempt the `.comp` files of the
//! backup are removed, under the VM's lock, so an interrupted compression
//! leaves nothing behind once it runs again. A job owned by another host is
//! never taken back from here.
//!
//! # Deleting a backup whose job is running
//!
//! `Store::delete` takes the VM's lock, which the compression holds while it
//! runs: the delete is refused at once with a "busy" error naming the
//! compression ("VM vm1 is busy: compression of `<backup>` (pid N) is running;
//! try again when it ends"). A queued job whose backup was deleted is
//! cancelled when a runner gets to it.
//!
//! A validation only reads the backup and does not hold the VM's lock (so
//! backups of the VM go on meanwhile); `Store::delete` and
//! `Store::compress` refuse, with a "busy" error naming the job, a backup
//! whose validation job is running. Should its files vanish anyway, the job
//! ends `cancelled`.
//!
//! # Sync jobs
//!
//! A sync job sends the backups of one VM that the vault (`sync.vault` in
//! the settings, `s3://bucket/prefix`) lacks, like a Proxmox Backup Server
//! sync job: one job per VM, not per backup. Its `backup` is the VM's
//! newest backup when it was queued (queueing again while one is queued
//! only moves that to the newest), but an attempt sends whatever the VM
//! lacks in the vault at that moment. Per VM because that keeps the two
//! rules of the vault true whatever the order jobs run in: an attempt
//! holds the VM's lock, lists the vault, and sends the missing backups of
//! every chain root first, so a child never goes before its parent and
//! nothing the vault has is sent again (a job per backup would have to
//! order jobs of one VM between themselves, and a deleted backup would
//! cancel a job whose chain still needs sending). A VM left with no
//! backup sends nothing and the job is `done`.
//!
//! The catalog does not know the vault (the vault is built on it): the
//! caller of [`run_jobs`] gives the [`SyncRunner`] in
//! [`RunOptions::sync`] (`knib_core::vault::sync_runner`); without one,
//! sync jobs stay queued as a disabled kind's do. Limits, retries, interval
//! and time budget are `sync.*`; the rate limit, part size and parts in
//! flight are one job's (two jobs at once send twice the rate). A failed
//! attempt (an unreachable server, a missing bucket, the VM busy with a
//! backup) is retried; one the vault refuses the credentials of, or with
//! no vault set or a bad location, fails at once: retrying with the same
//! credentials would be refused again (and could lock the key out), and an
//! operator must fix them. A job's `result` is the sync's report (backups
//! sent and present, bytes sent).

use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(doc)]
use crate::catalog::Store;

pub mod cancel;
mod model;
pub(crate) mod ownership;
mod queue;
mod runner;

pub use cancel::CANCEL_WAIT;
pub use model::{Job, JobKind, JobOwner, JobState, OwnerStatus};
pub(crate) use ownership::hostname;
pub use runner::{run_jobs, screenshot_path, JobEvent, JobObserver, RunOptions, RunSummary, SyncAttempt, SyncRunner};

/// The job schema this version of knib writes and reads.
pub const JOB_SCHEMA: u32 = 1;

/// The directory of the job files, in the store.
pub const JOBS_DIR: &str = "jobs";

fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn now_secs() -> u64 {
    now_f64() as u64
}
