//! `knib jobs`: the store's durable job queue (compression and validation jobs).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;
use knib_core::catalog::jobs::{run_jobs, Job, JobEvent, JobState, OwnerStatus, RunOptions};
use knib_core::catalog::Store;
use knib_core::{ErrorKind, KnibError, Result};
use serde_json::{json, Value};

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
    /// Queue the compression (or, with --validate, the validation) of a backup.
    Queue {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Queue a validation job (file checks, hashes and, when
        /// `validation.boot` is set in STORE/knib.json, a boot test).
        #[arg(long)]
        validate: bool,
        /// The backup's id.
        backup: String,
    },
}

fn job_json(j: &Job) -> Value {
    let mut v = serde_json::to_value(j).expect("a job serializes");
    let status = j.owner.as_ref().map(|o| o.status());
    v["owner_status"] = serde_json::to_value(status).expect("serializes");
    v
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
pub fn run(cmd: JobsCommand, json: bool) -> Result<()> {
    match cmd {
        JobsCommand::Queue { store, validate, backup } => {
            let store = Store::open(store)?;
            let (j, what) = if validate {
                (store.queue_validation(&backup)?, "validation")
            } else {
                (store.queue_compression(&backup)?, "compression")
            };
            output::say(json, &job_json(&j), &format!("queued job {} ({what} of backup {backup})", j.id));
        }
        JobsCommand::List { store } => {
            let store = Store::open(store)?;
            let jobs = store.jobs()?;
            if json {
                println!("{}", Value::Array(jobs.iter().map(job_json).collect()));
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
                }))
            };
            let summary = run_jobs(&store, &RunOptions { observer, no_wait, ..Default::default() })?;
            let text = if summary.disabled {
                format!(
                    "compression and validation are disabled in {}; {} job(s) left queued",
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
            output::say(json, &json!(summary), &text);
            // A scheduler (cron) must notice jobs that failed for good.
            if !summary.failed.is_empty() {
                let first = store.job(&summary.failed[0]).ok().and_then(|j| j.last_error).unwrap_or_default();
                let kind = if first.starts_with("no space") {
                    ErrorKind::NoSpace
                } else if first.starts_with("timeout") {
                    ErrorKind::Timeout
                } else if first.starts_with("backup ") && first.contains(" is not valid: ") {
                    ErrorKind::Corrupt
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
