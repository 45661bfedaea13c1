//! The queue: the job files of a store, read and changed under the
//! store-wide queue lock.
//!
//! # Invariants
//!
//! - Every change of a job's state is made under the queue lock
//!   ([`lock_queue`]), by reading the job files and rewriting the one that
//!   changes: a compare-and-swap, so two runners never claim one job.
//! - The lock is held for one short transaction, never while a job runs.
//! - A backup has at most one queued or running compression and one
//!   validation job; a VM has at most one queued sync job (queueing another
//!   brings the queued one up to date instead).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::{Job, JobKind, JobState, OwnerStatus};
use super::{now_secs, JOBS_DIR, JOB_SCHEMA};
use crate::catalog::settings::Settings;
use crate::catalog::{Manifest, Store};
use crate::error::{KnibError, Result};
use crate::names;

/// The queue lock: a blocking `flock` on `jobs/.lock`
/// ([`crate::lock::lock_exclusive`]), held for one short transaction (read
/// the job files, rewrite one) and released when dropped. Every thread opens
/// the file itself, so threads of one process exclude each other too.
pub(super) struct QueueLock {
    _file: File,
}

pub(super) fn lock_queue(dir: &Path) -> Result<QueueLock> {
    use std::os::unix::fs::OpenOptionsExt;
    // `dir` is `<store>/jobs`: a real directory of the store, never a link.
    let root = dir.parent().unwrap_or(Path::new("."));
    crate::catalog::confine::ensure_dir(root, Path::new(JOBS_DIR), "jobs directory")?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| KnibError::io("cannot open lock", &path, e))?;
    crate::lock::lock_exclusive(&file).map_err(|e| KnibError::io("cannot lock", &path, e))?;
    Ok(QueueLock { _file: file })
}

/// Whether the jobs directory `dir` (`<store>/jobs`) exists, as a real
/// directory of the store: a symbolic link (to job files outside the store)
/// is `corrupt`, naming it.
fn jobs_dir_exists(dir: &Path) -> Result<bool> {
    let root = dir.parent().unwrap_or(Path::new("."));
    match crate::catalog::confine::check(
        root,
        Path::new(JOBS_DIR),
        crate::catalog::confine::Want::Dir,
        "jobs directory",
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.kind == crate::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every job file in `dir`, oldest first.
pub(super) fn load_all(dir: &Path) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    if !jobs_dir_exists(dir)? {
        return Ok(out);
    }
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(KnibError::io("cannot list", dir, e)),
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') || !n.ends_with(".json") {
            continue;
        }
        out.push(Job::load(&e.path())?);
    }
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(out)
}

impl Store {
    /// The directory of the job files.
    pub fn jobs_dir(&self) -> PathBuf {
        self.root().join(JOBS_DIR)
    }

    /// The store's settings (`knib.json`, or the defaults).
    pub fn settings(&self) -> Result<Settings> {
        Settings::load(self.root())
    }

    /// Every job, oldest first. A job file that cannot be read (an unknown
    /// kind, a newer schema) is an error.
    pub fn jobs(&self) -> Result<Vec<Job>> {
        load_all(&self.jobs_dir())
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Job> {
        names::validate("job id", id)?;
        let p = self.jobs_dir().join(format!("{id}.json"));
        if !jobs_dir_exists(&self.jobs_dir())? || !p.exists() {
            return Err(KnibError::not_found(format!("job {id} does not exist in store {}", self.root().display())));
        }
        Job::load(&p)
    }

    /// Queue the compression of backup `backup`. Refused when the backup is
    /// already compressed or already has a queued or running compression job.
    pub fn queue_compression(&self, backup: &str) -> Result<Job> {
        let m = self.show(backup)?;
        if m.compression.is_some() {
            return Err(KnibError::invalid(format!("backup {backup} is already compressed")));
        }
        self.queue_job(JobKind::Compress, &m)
    }

    /// Queue the validation of backup `backup`. Refused when it already has
    /// a queued or running validation job.
    pub fn queue_validation(&self, backup: &str) -> Result<Job> {
        let m = self.show(backup)?;
        self.queue_job(JobKind::Validate, &m)
    }

    /// Queue a sync job of VM `vm`: it sends every backup of the VM that
    /// the vault of the settings (`sync.vault`) lacks, parents first, when a
    /// runner gets to it. Refused when no vault is set or the VM has no
    /// backup. When the VM already has a queued sync job, that job is
    /// returned instead, its `backup` set to the VM's newest (it will send
    /// that one too); a running one is left alone, and the new job runs
    /// after it (one job per VM at a time).
    pub fn queue_sync(&self, vm: &str) -> Result<Job> {
        names::validate("VM name", vm)?;
        let settings = self.settings()?;
        if settings.sync.vault.is_none() {
            return Err(KnibError::invalid(format!(
                "store {} has no vault for sync jobs: set \"sync.vault\": \"s3://BUCKET/PREFIX\" in its {}",
                self.root().display(),
                crate::catalog::settings::SETTINGS_FILE
            )));
        }
        let newest = self.list(Some(vm))?.pop().ok_or_else(|| {
            KnibError::not_found(format!("VM {vm} has no backup in store {}: nothing to sync", self.root().display()))
        })?;
        let dir = self.jobs_dir();
        let _lock = lock_queue(&dir)?;
        let queued =
            load_all(&dir)?.into_iter().find(|j| j.kind == JobKind::Sync && j.vm == vm && j.state == JobState::Queued);
        if let Some(mut j) = queued {
            if j.backup != newest.id {
                j.backup = newest.id.clone();
                j.updated_at = now_secs();
                j.save(&dir)?;
            }
            return Ok(j);
        }
        self.new_job(&dir, JobKind::Sync, &newest)
    }

    /// After a backup of `vm`: queue its sync job when the settings say so
    /// (`sync.enabled` and `sync.auto`); `None` when they do not.
    pub fn queue_sync_after_backup(&self, vm: &str) -> Result<Option<Job>> {
        let s = self.settings()?;
        if !(s.sync.enabled && s.sync.auto) {
            return Ok(None);
        }
        self.queue_sync(vm).map(Some)
    }

    /// The running validation job of backup `backup` whose runner is alive,
    /// if there is one.
    pub fn running_validation(&self, backup: &str) -> Result<Option<Job>> {
        Ok(load_all(&self.jobs_dir())?.into_iter().find(|j| {
            j.kind == JobKind::Validate
                && j.backup == backup
                && j.state == JobState::Running
                && j.owner.as_ref().is_some_and(|o| o.status() != OwnerStatus::Dead)
        }))
    }

    fn queue_job(&self, kind: JobKind, m: &Manifest) -> Result<Job> {
        let dir = self.jobs_dir();
        let _lock = lock_queue(&dir)?;
        if let Some(j) = load_all(&dir)?.into_iter().find(|j| j.kind == kind && j.backup == m.id && j.state.is_active())
        {
            return Err(KnibError::invalid(format!(
                "backup {} already has a {} job, {}, {}",
                m.id,
                kind.as_str(),
                j.id,
                j.state.as_str()
            )));
        }
        self.new_job(&dir, kind, m)
    }

    /// Write a new queued job of `kind` on `m` (under the queue lock).
    fn new_job(&self, dir: &Path, kind: JobKind, m: &Manifest) -> Result<Job> {
        let mut id = format!("{}-{}", kind.as_str(), crate::catalog::new_backup_id());
        while dir.join(format!("{id}.json")).exists() {
            std::thread::sleep(Duration::from_millis(1));
            id = format!("{}-{}", kind.as_str(), crate::catalog::new_backup_id());
        }
        let now = now_secs();
        let job = Job {
            schema: JOB_SCHEMA,
            id,
            kind,
            vm: m.vm.clone(),
            backup: m.id.clone(),
            state: JobState::Queued,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
            owner: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
            result: None,
        };
        job.save(dir)?;
        Ok(job)
    }
}
