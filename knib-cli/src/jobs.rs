//! `knib jobs`: the store's durable job queue (compression, validation and
//! sync jobs); `knib sync --queue`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;
use knib_core::catalog::jobs::{run_jobs, Job, JobEvent, JobKind, JobState, OwnerStatus, RunOptions};
use knib_core::catalog::Store;
use knib_core::{Control, ErrorKind, KnibError, Result};
use serde_json::Value;

use crate::output;

/// The `jobs` subcommands.
#[derive(Subcommand)]
pub enum JobsCommand {
    /// Work the queue until it is empty, within the limits of STORE/knib.json
    /// (concurrency, retries and their interval, time budget, free space,
    /// rate limit).
    Run {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Do not wait for jobs whose retry time has not come.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the jobs, oldest first.
    List {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Cancel a job: a queued one at once; a running one by asking its
    /// runner to stop it (it looks every quarter second), waiting up to
    /// 30 s. A compression stopped so leaves its backup as it was.
    Cancel {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// When the runner does not stop the job within 30 s (its host is
        /// down, say), record it cancelled all the same.
        #[arg(long)]
        force: bool,
        /// The job's id (`knib jobs list`).
        job: String,
    },
    /// Queue the compression (or, with --validate, the validation; with
    /// --sync, the sync of its VM to the vault) of a backup.
    Queue {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Queue a validation job (file checks, hashes and, when
        /// `validation.boot` is set in STORE/knib.json, a boot test).
        #[arg(long, conflicts_with = "sync")]
        validate: bool,
        /// Queue a sync job of the backup's VM: it sends to `sync.vault`
        /// every backup of the VM the vault lacks.
        #[arg(long)]
        sync: bool,
        /// The backup's id.
        backup: String,
    },
}

/// The job as the JSON API answers it (with `owner_status`).
fn job_json(j: &Job) -> serde_json::Result<Value> {
    serde_json::to_value(knib_core::api::jobs::JobView::from(j.clone()))
}

fn job_line(j: &Job) -> String {
    let mut s =
        format!("{}  {}  {}  {}  {}  attempts {}", j.id, j.kind.as_str(), j.vm, j.backup, j.state.as_str(), j.attempts);
    if let Some(o) = &j.owner {
        let status = match o.status() {
            OwnerStatus::Alive => "alive",
            OwnerStatus::Dead => "dead: taken back by the next `jobs run`",
            OwnerStatus::OtherHost => "on another host",
        };
        s += &format!("  owner pid {} on {} ({status})", o.pid, o.hostname);
    }
    if j.state == JobState::Queued && j.attempts > 0 {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(j.next_attempt_at);
        s += &format!("  next attempt at {}", knib_core::catalog::manifest::rfc3339(at));
    }
    if let Some(e) = &j.last_error {
        s += &format!("  last error: {e}");
    }
    s
}

/// Run a `jobs` subcommand.
pub fn run(cmd: JobsCommand, json: bool, ctl: &Control) -> Result<()> {
    match cmd {
        JobsCommand::Queue { store, validate, sync, backup } => {
            let store = Store::open(store)?;
            if sync {
                let vm = store.show(&backup)?.vm;
                let j = store.queue_sync(&vm)?;
                output::say(json, || job_json(&j), &format!("queued job {} (sync of VM {vm} to the vault)", j.id))?;
                return Ok(());
            }
            let (j, what) = if validate {
                (store.queue_validation(&backup)?, "validation")
            } else {
                (store.queue_compression(&backup)?, "compression")
            };
            output::say(json, || job_json(&j), &format!("queued job {} ({what} of backup {backup})", j.id))?;
        }
        JobsCommand::Cancel { store, force, job } => {
            let store = Store::open(store)?;
            let j = store.cancel_job(&job, force, ctl)?;
            let text = match j.state {
                JobState::Cancelled => format!("job {} cancelled: {}", j.id, j.last_error.as_deref().unwrap_or("")),
                s => format!("job {} was not cancelled: its attempt had ended ({})", j.id, s.as_str()),
            };
            output::say(json, || job_json(&j), &text)?;
        }
        JobsCommand::List { store } => {
            let store = Store::open(store)?;
            let jobs = store.jobs()?;
            if json {
                let all = jobs.iter().map(job_json).collect::<serde_json::Result<Vec<Value>>>().map(Value::Array);
                println!("{}", output::json_value(all)?);
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                for j in &jobs {
                    println!("{}", job_line(j));
                }
            }
        }
        JobsCommand::Run { store, no_wait } => {
            let store = Store::open(store)?;
            let observer: Option<knib_core::catalog::jobs::JobObserver> = if json {
                None
            } else {
                Some(Arc::new(|e: &JobEvent| match e {
                    JobEvent::Recovered(j) => {
                        println!("{}: taken back from a runner that died", j.id)
                    }
                    JobEvent::Started(j) if j.kind == JobKind::Sync => {
                        println!("{}: sync of VM {} started (attempt {})", j.id, j.vm, j.attempts + 1)
                    }
                    JobEvent::Started(j) => {
                        println!(
                            "{}: {} of backup {} started (attempt {})",
                            j.id,
                            j.kind.as_str(),
                            j.backup,
                            j.attempts + 1
                        )
                    }
                    JobEvent::Finished(j) => println!("{}: {}", j.id, job_line(j)),
                    JobEvent::Waiting(j) => {
                        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(j.next_attempt_at);
                        println!(
                            "{}: waiting for its next attempt at {} (`jobs run --no-wait` leaves it queued)",
                            j.id,
                            knib_core::catalog::manifest::rfc3339(at)
                        )
                    }
                }))
            };
            let sync = Some(knib_core::vault::sync_runner());
            // Ctrl-C and SIGTERM stop the runner: no job starts any more,
            // a running one is stopped and queued again.
            let cancel = ctl.cancel.clone();
            let summary = run_jobs(&store, &RunOptions { observer, no_wait, sync, cancel })?;
            let text = if summary.disabled {
                format!(
                    "every kind of job is disabled in {}; {} job(s) left queued",
                    store.root().join("knib.json").display(),
                    summary.left_queued.len()
                )
            } else {
                format!(
                    "{} done, {} failed, {} cancelled, {} retried, {} taken back, {} left queued",
                    summary.done.len(),
                    summary.failed.len(),
                    summary.cancelled.len(),
                    summary.retried.len(),
                    summary.recovered.len(),
                    summary.left_queued.len()
                )
            };
            output::say(json, || serde_json::to_value(&summary), &text)?;
            // A scheduler (cron) must notice jobs that failed for good.
            if !summary.failed.is_empty() {
                let first = store.job(&summary.failed[0]).ok().and_then(|j| j.last_error).unwrap_or_default();
                let kind = if first.starts_with("no space") {
                    ErrorKind::NoSpace
                } else if first.starts_with("timeout") {
                    ErrorKind::Timeout
                } else if first.starts_with("backup ") && first.contains(" is not valid: ") {
                    ErrorKind::Corrupt
                } else if let Some(k) = failed_sync_kind(&store, &summary.failed[0]) {
                    k
                } else {
                    ErrorKind::ImageTool
                };
                return Err(KnibError::new(
                    kind,
                    format!(
                        "{} job(s) failed: {}; see `knib jobs list`",
                        summary.failed.len(),
                        summary.failed.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The kind of the error a failed sync job ended with (its `last_error`
/// is the error's text, `<kind>: <message>`), so the exit status says it.
fn failed_sync_kind(store: &Store, id: &str) -> Option<ErrorKind> {
    let j = store.job(id).ok()?;
    if j.kind != JobKind::Sync {
        return None;
    }
    ErrorKind::of_message(&j.last_error?)
}

/// `knib sync --queue`: a sync job of each VM of the store (or of `vm`).
pub fn queue_sync(store: PathBuf, vm: Option<String>, json: bool) -> Result<()> {
    let store = Store::open(store)?;
    let vms = match vm {
        Some(vm) => vec![vm],
        None => store.vms()?.into_iter().filter(|v| store.list(Some(v)).is_ok_and(|l| !l.is_empty())).collect(),
    };
    if vms.is_empty() {
        return Err(KnibError::not_found(format!("store {} has no backup to sync", store.root().display())));
    }
    let mut queued = Vec::new();
    for vm in &vms {
        queued.push(store.queue_sync(vm)?);
    }
    let text = queued
        .iter()
        .map(|j| format!("queued job {} (sync of VM {} to the vault)", j.id, j.vm))
        .collect::<Vec<_>>()
        .join("\n");
    output::say(
        json,
        || queued.iter().map(job_json).collect::<serde_json::Result<Vec<Value>>>().map(Value::Array),
        &text,
    )?;
    Ok(())
}

/// After a backup: queue the VM's sync job when `sync.auto` says so. A
/// backup that worked is not failed by this: a problem is said on stderr.
pub fn after_backup(store: &Store, vm: &str, json: bool) {
    match store.queue_sync_after_backup(vm) {
        Ok(Some(j)) if !json => println!("queued job {} (sync of VM {vm} to the vault)", j.id),
        Ok(_) => {}
        Err(e) => eprintln!("knib: warning: the backup is done, but its sync job was not queued: {e}"),
    }
}
