//! The job operations (`jobs.*`): the store's durable queue of compression,
//! validation and sync jobs ([`crate::catalog::jobs`]), seen, fed and
//! stopped from a caller of the JSON API. The jobs are run by `knib jobs
//! run` (a timer, cron), on any host sharing the store.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::catalog::jobs::{Job, JobKind, JobState, OwnerStatus, CANCEL_WAIT};
use crate::catalog::Store;
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::wire::store_dir;

/// A job, as its file holds it, and whether its runner still runs: the
/// answer of the `jobs.*` operations and of `knib jobs list --json`.
#[derive(Serialize, JsonSchema)]
pub struct JobView {
    /// The job.
    #[serde(flatten)]
    pub job: Job,
    /// For a running job: `alive` (its runner on this host runs), `dead`
    /// (it is gone: the next `knib jobs run` takes the job back) or
    /// `other_host` (nothing can be told from here); null otherwise.
    pub owner_status: Option<OwnerStatus>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let owner_status = job.owner.as_ref().filter(|_| job.state == JobState::Running).map(|o| o.status());
        JobView { job, owner_status }
    }
}

/// The request of `jobs.list`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsListReq {
    /// The store directory.
    store: PathBuf,
}

/// The request of `jobs.show`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobRef {
    /// The store directory.
    store: PathBuf,
    /// The job's id (`jobs.list`).
    job: String,
}

/// The request of `jobs.queue`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsQueueReq {
    /// The store directory.
    store: PathBuf,
    /// `compress` (the backup compressed in place), `validate` (file
    /// checks, hashes and, when `validation.boot` is set in the store's
    /// `knib.json`, a boot test) or `sync` (every backup of the VM that the
    /// vault of `sync.vault` lacks sent to it).
    kind: JobKind,
    /// The backup's id: required for `compress` and `validate`; for `sync`,
    /// its VM is synced (or give `vm`).
    #[serde(default)]
    backup: Option<String>,
    /// For `sync`: the VM whose backups are sent.
    #[serde(default)]
    vm: Option<String>,
}

/// The request of `jobs.cancel`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsCancelReq {
    /// The store directory.
    store: PathBuf,
    /// The job's id.
    job: String,
    /// When the runner of a running job does not stop it within the wait
    /// (its host is down, say), record it cancelled all the same.
    #[serde(default)]
    force: bool,
    /// How long to wait for the runner of a running job to stop it, in
    /// seconds; absent: 30. A queued job is cancelled at once. A call
    /// cancelled, or out of its time budget, before the wait ends fails so
    /// and forces nothing; the request to stop stands, and the runner still
    /// stops the job when it sees it.
    #[serde(default)]
    wait_secs: Option<u64>,
}

pub(crate) fn list(r: JobsListReq) -> Result<Vec<JobView>> {
    store_dir("jobs.list", &r.store)?;
    Ok(Store::open(&r.store)?.jobs()?.into_iter().map(JobView::from).collect())
}

pub(crate) fn show(r: JobRef) -> Result<JobView> {
    store_dir("jobs.show", &r.store)?;
    Store::open(&r.store)?.job(&r.job).map(JobView::from)
}

pub(crate) fn queue(r: JobsQueueReq) -> Result<JobView> {
    store_dir("jobs.queue", &r.store)?;
    let store = Store::open(&r.store)?;
    let job = match (r.kind, r.backup, r.vm) {
        (JobKind::Sync, None, Some(vm)) => store.queue_sync(&vm)?,
        (JobKind::Sync, Some(backup), None) => store.queue_sync(&store.show(&backup)?.vm)?,
        (JobKind::Sync, ..) => {
            return Err(KnibError::invalid("jobs.queue: a sync job takes either `vm` or `backup`, one of them"))
        }
        (kind, _, Some(_)) => {
            return Err(KnibError::invalid(format!("jobs.queue: a {} job takes `backup`, not `vm`", kind.as_str())))
        }
        (kind, None, None) => {
            return Err(KnibError::invalid(format!("jobs.queue: a {} job needs `backup`", kind.as_str())))
        }
        (JobKind::Compress, Some(backup), None) => store.queue_compression(&backup)?,
        (JobKind::Validate, Some(backup), None) => store.queue_validation(&backup)?,
    };
    Ok(job.into())
}

pub(crate) fn cancel(r: JobsCancelReq, ctl: &Control) -> Result<JobView> {
    store_dir("jobs.cancel", &r.store)?;
    let wait = r.wait_secs.map(Duration::from_secs).unwrap_or(CANCEL_WAIT);
    Store::open(&r.store)?.cancel_job_within(&r.job, r.force, wait, ctl).map(JobView::from)
}
