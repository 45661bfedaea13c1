//! Durable jobs of a store: compression and validation of backups.
//!
//! # Files
//!
//! ```text
//! STORE/knib.json          settings (see [`super::settings`]); optional
//! STORE/jobs/.lock         flock: one short queue transaction at a time
//! STORE/jobs/<id>.json     one job (JSON, schema 1), written atomically
//! ```
//!
//! A job is `queued`, `running`, `done`, `failed` or `cancelled`. Every
//! change of state (queue, claim, take back, record a result) is made under
//! the store-wide queue lock, by reading the job files and rewriting the one
//! that changes with [`fsio::write_atomic`]: a compare-and-swap, so two
//! runners (threads or processes) never claim the same job, and a job file is
//! always whole.
//!
//! # Running
//!
//! [`run_jobs`] starts one worker thread per slot of each enabled kind
//! (`compression.max_concurrent_per_host` + `validation.max_concurrent_per_host`).
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

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::settings::Settings;
use super::{Manifest, Store};
use crate::engine::compress::comp_path;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::names;
use crate::progress::{CancelToken, Control, Deadline};

/// The job schema this version of knib writes and reads.
pub const JOB_SCHEMA: u32 = 1;

/// The directory of the job files, in the store.
pub const JOBS_DIR: &str = "jobs";

/// How often a waiting runner looks at the queue again (other processes may
/// change it).
const POLL: Duration = Duration::from_millis(500);

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Compress a backup in place.
    Compress,
    /// Validate a backup: file checks, hashes and, if set, a boot test.
    Validate,
}

impl JobKind {
    /// Every kind this knib runs.
    pub const ALL: &'static [JobKind] = &[JobKind::Compress, JobKind::Validate];

    /// The kind's name in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Compress => "compress",
            JobKind::Validate => "validate",
        }
    }

    /// The limits of this kind of job: (enabled, max per host, retries,
    /// retry interval, time budget in seconds).
    fn limits(self, s: &Settings) -> (bool, u32, u32, u64, u64) {
        match self {
            JobKind::Compress => {
                let c = &s.compression;
                (c.enabled, c.max_concurrent_per_host, c.max_retries, c.retry_interval_secs, c.timeout_secs)
            }
            JobKind::Validate => {
                let v = &s.validation;
                (v.enabled, v.max_concurrent_per_host, v.max_retries, v.retry_interval_secs, v.timeout_secs)
            }
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to run (at `next_attempt_at` or later).
    Queued,
    /// Claimed by a runner (`owner`).
    Running,
    /// Finished successfully.
    Done,
    /// Failed its last allowed attempt (`last_error` says why).
    Failed,
    /// Not run: its backup was deleted.
    Cancelled,
}

impl JobState {
    /// The state's name in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Queued or running.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// The runner process holding a running job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOwner {
    /// Its process id.
    pub pid: u32,
    /// Its host.
    pub hostname: String,
    /// When it claimed the job (unix seconds).
    pub started_at: u64,
    /// The Linux boot id of its host when it claimed the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The start time of its process (clock ticks after boot), so a reused
    /// pid is not taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

/// Whether a job's owner still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerStatus {
    /// The owner process is alive on this host.
    Alive,
    /// The owner was on this host and is gone.
    Dead,
    /// The owner is on another host: nothing can be told from here.
    OtherHost,
}

/// One job: `STORE/jobs/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Schema version ([`JOB_SCHEMA`]).
    pub schema: u32,
    /// The job's id (its file's name without `.json`).
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The VM of the backup.
    pub vm: String,
    /// The backup it works on.
    pub backup: String,
    /// Where it is in its life.
    pub state: JobState,
    /// Failed attempts so far (interrupted ones are not counted).
    pub attempts: u32,
    /// When it may run (again), unix seconds.
    pub next_attempt_at: u64,
    /// Why the last attempt failed (or why it was cancelled or taken back).
    pub last_error: Option<String>,
    /// The runner holding it, while it is running.
    pub owner: Option<JobOwner>,
    /// When it was queued (unix seconds).
    pub created_at: u64,
    /// When its file last changed (unix seconds).
    pub updated_at: u64,
    /// When it ended (done, failed or cancelled), unix seconds.
    pub finished_at: Option<u64>,
    /// What the last attempt found (a validation's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Job {
    /// Read and check a job file.
    ///
    /// The file is untrusted: a link is not followed, a key given twice or
    /// unknown is refused, and its id, VM and backup must be plain names
    /// ([`crate::names`]); anything else is [`ErrorKind::Corrupt`].
    pub fn load(path: &Path) -> Result<Job> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let corrupt = |what: String| KnibError::corrupt(format!("job file {} {what}", path.display()));
        let mut text = Vec::new();
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.read_to_end(&mut text))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => corrupt("is a symbolic link: knib follows no link inside a store".into()),
                _ => KnibError::io("cannot read job", path, e),
            })?;
        crate::json::check_unique_keys(&text).map_err(|e| corrupt(format!("is corrupted: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| corrupt(format!("is corrupted: {e}")))?;
        match v.get("schema").and_then(|s| s.as_u64()) {
            Some(s) if s == JOB_SCHEMA as u64 => {}
            Some(s) => return Err(corrupt(format!("has schema {s}; this knib reads schema {JOB_SCHEMA}"))),
            None => return Err(corrupt("has no schema".into())),
        }
        if let Some(kind) = v.get("kind").and_then(|k| k.as_str()) {
            if !JobKind::ALL.iter().any(|k| k.as_str() == kind) {
                let known: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(corrupt(format!(
                    "has kind {kind:?}, which this knib does not know (it runs: {})",
                    known.join(", ")
                )));
            }
        }
        let job: Job = serde_json::from_value(v).map_err(|e| corrupt(format!("is corrupted: {e}")))?;
        for (field, what, value) in [("id", "job id", &job.id), ("vm", "VM name", &job.vm), ("backup", "backup id", &job.backup)] {
            names::validate(what, value).map_err(|e| corrupt(format!("field `{field}`: {}", e.message)))?;
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if job.id != stem {
            return Err(corrupt(format!("holds job {:?}, not {stem:?}", job.id)));
        }
        Ok(job)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("a job always serializes");
        fsio::write_atomic(&dir.join(format!("{}.json", self.id)), &text)
    }
}

/// This process, as a job owner.
struct Me {
    pid: u32,
    hostname: String,
    boot_id: Option<String>,
    pid_start: Option<u64>,
}

fn me() -> &'static Me {
    static ME: OnceLock<Me> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Me { pid, hostname: hostname(), boot_id: boot_id(), pid_start: proc_stat(pid).map(|(_, start)| start) }
    })
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::from("localhost");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// The state letter and start time of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl JobOwner {
    /// Whether the owner still runs, as far as this host can tell.
    pub fn status(&self) -> OwnerStatus {
        let me = me();
        if self.hostname != me.hostname {
            return OwnerStatus::OtherHost;
        }
        if let (Some(a), Some(b)) = (&self.boot_id, &me.boot_id) {
            if a != b {
                return OwnerStatus::Dead;
            }
        }
        if self.pid == 0 || self.pid > i32::MAX as u32 {
            return OwnerStatus::Dead;
        }
        match proc_stat(self.pid) {
            Some((state, start)) => {
                if matches!(state, 'Z' | 'X') || self.pid_start.is_some_and(|s| s != start) {
                    OwnerStatus::Dead
                } else {
                    OwnerStatus::Alive
                }
            }
            None => {
                // SAFETY: signal 0 only checks that the process exists.
                let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
                let err = std::io::Error::last_os_error().raw_os_error();
                if rc == 0 || err == Some(libc::EPERM) {
                    OwnerStatus::Alive
                } else {
                    OwnerStatus::Dead
                }
            }
        }
    }
}

fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn now_secs() -> u64 {
    now_f64() as u64
}

/// The queue lock: a blocking `flock` on `jobs/.lock`, held for one short
/// transaction (read the job files, rewrite one). Every thread opens the file
/// itself, so threads of one process exclude each other too.
struct QueueLock {
    _file: File,
}

fn lock_queue(dir: &Path) -> Result<QueueLock> {
    use std::os::unix::fs::OpenOptionsExt;
    // `dir` is `<store>/jobs`: a real directory of the store, never a link.
    let root = dir.parent().unwrap_or(Path::new("."));
    super::confine::ensure_dir(root, Path::new(JOBS_DIR), "jobs directory")?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| KnibError::io("cannot open lock", &path, e))?;
    loop {
        // SAFETY: `file` is an open descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(QueueLock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(KnibError::io("cannot lock", &path, err));
        }
    }
}

/// Every job file in `dir`, oldest first.
fn load_all(dir: &Path) -> Result<Vec<Job>> {
    let mut out = Vec::new();
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
        if !p.exists() {
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
        let mut id = format!("{}-{}", kind.as_str(), super::new_backup_id());
        while dir.join(format!("{id}.json")).exists() {
            std::thread::sleep(Duration::from_millis(1));
            id = format!("{}-{}", kind.as_str(), super::new_backup_id());
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
        job.save(&dir)?;
        Ok(job)
    }
}

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
}

/// Receives the runner's events, from its worker threads.
pub type JobObserver = Arc<dyn Fn(&JobEvent) + Send + Sync>;

/// How [`run_jobs`] runs.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Called at every event (a hook for progress output and tests).
    pub observer: Option<JobObserver>,
    /// Stops the runner: no job is started any more, running ones are
    /// stopped and queued again (their attempt not counted).
    pub cancel: CancelToken,
    /// Do not wait for jobs whose retry time has not come; leave them queued.
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
    /// Jobs cancelled because their backup was deleted.
    pub cancelled: Vec<String>,
    /// One entry per failed attempt that was queued again for a retry.
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
}

/// What a look at the queue found.
struct Scan {
    claimed: Option<Job>,
    recovered: Vec<Job>,
    /// The earliest retry time of a queued job that is not due yet.
    next_due: Option<f64>,
    /// A due job could not start (its VM busy, or the host at its limit).
    blocked: bool,
}

/// Under the queue lock: take back jobs of dead runners, then claim the
/// first due job that the limits allow.
fn scan(store: &Store, settings: &Settings) -> Result<Scan> {
    let dir = store.jobs_dir();
    let me = me();
    let mut jobs = load_all(&dir)?;
    let now = now_f64();
    let mut recovered = Vec::new();
    for j in jobs.iter_mut().filter(|j| j.state == JobState::Running) {
        let status = j.owner.as_ref().map(|o| o.status()).unwrap_or(OwnerStatus::Dead);
        if status == OwnerStatus::Dead {
            let who = j
                .owner
                .as_ref()
                .map(|o| format!("runner pid {} on {}", o.pid, o.hostname))
                .unwrap_or_else(|| "a runner".into());
            log::warn!("job {}: its {who} died; queueing it again", j.id);
            j.state = JobState::Queued;
            j.owner = None;
            j.next_attempt_at = now as u64;
            j.last_error = Some(format!("interrupted: the {who} died during the attempt"));
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
    let mut blocked = false;
    let mut pick = None;
    for i in queued {
        let j = &jobs[i];
        let at = j.next_attempt_at as f64;
        let (enabled, max_here, ..) = j.kind.limits(settings);
        if !enabled {
            continue;
        }
        if at > now {
            next_due = Some(next_due.map_or(at, |d| d.min(at)));
        } else if host_running(j.kind) >= max_here as usize || busy_vms.contains(j.vm.as_str()) {
            blocked = true;
        } else if pick.is_none() {
            pick = Some(i);
        }
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
    Ok(Scan { claimed, recovered, next_due, blocked })
}

/// Under the queue lock: write the result of an attempt of `job`.
fn record(store: &Store, settings: &Settings, job: &Job, outcome: &Outcome) -> Result<Job> {
    let dir = store.jobs_dir();
    let mut j = Job::load(&dir.join(format!("{}.json", job.id)))?;
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
            j.attempts += 1;
            j.state = JobState::Failed;
            j.last_error = Some(why.clone());
            j.result = Some(result.clone());
        }
        Outcome::Cancelled(why) => {
            j.state = JobState::Cancelled;
            j.last_error = Some(why.clone());
        }
        Outcome::Interrupted(e) => {
            j.state = JobState::Queued;
            j.next_attempt_at = now as u64;
            j.last_error = Some(format!("interrupted: {e}"));
        }
        Outcome::Failed(e) => {
            let (_, _, max_retries, interval, _) = j.kind.limits(settings);
            j.attempts += 1;
            j.last_error = Some(e.to_string());
            if j.attempts <= max_retries {
                j.state = JobState::Queued;
                j.next_attempt_at = (now + interval as f64).ceil() as u64;
            } else {
                j.state = JobState::Failed;
            }
        }
    }
    if !j.state.is_active() {
        j.finished_at = Some(now as u64);
    }
    j.save(&dir)?;
    Ok(j)
}

/// Remove the `.comp` files of backup `m`.
fn remove_comp_files(store: &Store, m: &Manifest) -> Result<()> {
    for v in &m.volumes {
        fsio::remove_if_exists(&comp_path(&store.backup_dir(m).join(&v.file)))?;
    }
    Ok(())
}

/// When the job's backup is gone (or only kept as a removed parent), why;
/// its `.comp` files are removed.
fn backup_gone(store: &Store, job: &Job) -> Option<String> {
    match store.find(&job.backup) {
        Ok(m) if m.removed => {
            // Best effort: the backup is no longer shown, nothing else
            // writes its files.
            let _lock = store.lock_vm(&m.vm, &format!("cleanup of job {}", job.id));
            if let Err(e) = remove_comp_files(store, &m) {
                log::warn!("job {}: {e}", job.id);
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
/// is gone, interrupted when the runner was stopped, else failed.
fn failed(store: &Store, job: &Job, cancel: &CancelToken, e: KnibError) -> Outcome {
    if let Some(why) = backup_gone(store, job) {
        Outcome::Cancelled(why)
    } else if e.kind == ErrorKind::Cancelled && cancel.is_cancelled() {
        Outcome::Interrupted(e)
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
            Err(e) => return Outcome::Failed(e),
        };
        if let Err(e) = remove_comp_files(store, &m) {
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
        match fs::symlink_metadata(&work) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&work).map_err(|e| KnibError::io("cannot remove", &work, e))?,
            Ok(_) => fsio::remove_if_exists(&work)?,
            Err(_) => {}
        }
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
            } else {
                Outcome::Rejected(format!("backup {} is not valid: {}", job.backup, report.problems.join("; ")), value)
            }
        }
        Err(e) => failed(store, job, cancel, e),
    }
}

fn execute(store: &Store, job: &Job, settings: &Settings, cancel: &CancelToken) -> Outcome {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.kind {
        JobKind::Compress => compress_job(store, job, settings, cancel),
        JobKind::Validate => validate_job(store, job, settings, cancel),
    }));
    run.unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
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
}

impl Shared {
    fn fail(&self, e: KnibError) {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
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
            let s = scan(store, settings)?;
            if s.claimed.is_some() {
                *shared.running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            Ok(s)
        });
        let found = match found {
            Ok(s) => s,
            Err(e) => return shared.fail(e),
        };
        for j in found.recovered {
            shared.summary.lock().unwrap_or_else(|p| p.into_inner()).recovered.push(j.id.clone());
            emit(JobEvent::Recovered(j));
        }
        if let Some(job) = found.claimed {
            emit(JobEvent::Started(job.clone()));
            let outcome = execute(store, &job, settings, &opts.cancel);
            let recorded = lock_queue(&dir).and_then(|_lock| record(store, settings, &job, &outcome));
            *shared.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            shared.changed.notify_all();
            match recorded {
                Ok(j) => {
                    {
                        let mut s = shared.summary.lock().unwrap_or_else(|p| p.into_inner());
                        let list = match (j.state, &outcome) {
                            (JobState::Done, _) => Some(&mut s.done),
                            (JobState::Failed, _) => Some(&mut s.failed),
                            (JobState::Cancelled, _) => Some(&mut s.cancelled),
                            (JobState::Queued, Outcome::Failed(_)) => Some(&mut s.retried),
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
        let here = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = found.blocked || (!opts.no_wait && found.next_due.is_some());
        if *here == 0 && !waiting {
            return;
        }
        let mut timeout = POLL;
        if let Some(due) = found.next_due {
            timeout = timeout.min(Duration::from_secs_f64((due - now_f64()).max(0.0)));
        }
        let _ = shared.changed.wait_timeout(here, timeout);
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
    };
    let workers: u32 = JobKind::ALL.iter().map(|k| k.limits(&settings)).filter(|l| l.0).map(|l| l.1.max(1)).sum();
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
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut summary = shared.summary.into_inner().unwrap_or_else(|p| p.into_inner());
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
