//! The job model: what a job is, the states it goes through, and its file.
//!
//! # Invariants
//!
//! - A job file is `STORE/jobs/<id>.json`, JSON of schema [`super::JOB_SCHEMA`],
//!   always written whole ([`fsio::write_atomic`]); a file of another schema
//!   or an unknown kind is an error, never skipped.
//! - `running` is the only state with an `owner`; `done`, `failed` and
//!   `cancelled` are final and carry `finished_at`.

use std::fs::OpenOptions;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::JOB_SCHEMA;
use crate::catalog::confine::read_capped;
use crate::catalog::settings::Settings;
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::names;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Compress a backup in place.
    Compress,
    /// Validate a backup: file checks, hashes and, if set, a boot test.
    Validate,
    /// Send a VM's backups that the vault (`sync.vault`) lacks, parents
    /// first.
    Sync,
}

impl JobKind {
    /// Every kind this knib runs.
    pub const ALL: &'static [JobKind] = &[JobKind::Compress, JobKind::Validate, JobKind::Sync];

    /// The kind's name in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Compress => "compress",
            JobKind::Validate => "validate",
            JobKind::Sync => "sync",
        }
    }

    /// The limits of this kind of job: (enabled, max per host, retries,
    /// retry interval, time budget in seconds).
    pub(super) fn limits(self, s: &Settings) -> (bool, u32, u32, u64, u64) {
        match self {
            JobKind::Compress => {
                let c = &s.compression;
                (c.enabled, c.max_concurrent_per_host, c.max_retries, c.retry_interval_secs, c.timeout_secs)
            }
            JobKind::Validate => {
                let v = &s.validation;
                (v.enabled, v.max_concurrent_per_host, v.max_retries, v.retry_interval_secs, v.timeout_secs)
            }
            JobKind::Sync => {
                let y = &s.sync;
                (y.enabled, y.max_concurrent_per_host, y.max_retries, y.retry_interval_secs, y.timeout_secs)
            }
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
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
    /// Not run, or stopped: its backup was deleted, or an operator
    /// cancelled it (`last_error` says which).
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OwnerStatus {
    /// The owner process is alive on this host.
    Alive,
    /// The owner was on this host and is gone.
    Dead,
    /// The owner is on another host: nothing can be told from here.
    OtherHost,
}

/// How far ahead of this host's clock another host sharing the store may
/// write a job's times (a day).
const CLOCK_SLACK_SECS: u64 = 86_400;

/// One job: `STORE/jobs/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Schema version (1).
    pub schema: u32,
    /// The job's id (its file's name without `.json`).
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The VM of the backup.
    pub vm: String,
    /// The backup it works on (a sync job: the VM's newest backup when it
    /// was queued; it sends that one and every other the vault lacks).
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
    /// The file is untrusted: a link is not followed; anything but a
    /// regular file (a FIFO too: it is opened with `O_NONBLOCK`, so without
    /// waiting for a writer), a file of more than 16 MiB (the cap on a
    /// store's JSON files) and a key given twice or unknown are refused; its
    /// id, VM and backup must be plain names ([`crate::names`]); anything
    /// else is [`crate::ErrorKind::Corrupt`].
    pub fn load(path: &Path) -> Result<Job> {
        use std::os::unix::fs::OpenOptionsExt;
        let corrupt = |what: String| KnibError::corrupt(format!("job file {} {what}", path.display()));
        let refused = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ELOOP) => corrupt("is a symbolic link: knib follows no link inside a store".into()),
            _ => KnibError::io("cannot read job", path, e),
        };
        // O_NONBLOCK: a FIFO opens at once (and is refused below) instead of
        // waiting for a writer while the queue's lock is held.
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(refused)?;
        if !f.metadata().map_err(|e| KnibError::io("cannot stat job", path, e))?.is_file() {
            return Err(corrupt("is not a regular file".into()));
        }
        // O_NONBLOCK makes no difference to a regular file's reads.
        let text = read_capped(&f, path, "job file")?;
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
        for (field, what, value) in
            [("id", "job id", &job.id), ("vm", "VM name", &job.vm), ("backup", "backup id", &job.backup)]
        {
            names::validate(what, value).map_err(|e| corrupt(format!("field `{field}`: {}", e.message)))?;
        }
        // knib writes the time of the moment, or of the moment plus a retry
        // interval (at most 2^32 - 1 seconds), on this host or another
        // whose clock may be ahead: a time more than a day past that is no
        // time of its (a runner would wait for it, and a date past the
        // year 9999 cannot be shown).
        let latest = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_add(u32::MAX as u64 + CLOCK_SLACK_SECS);
        let times = [
            ("next_attempt_at", Some(job.next_attempt_at)),
            ("created_at", Some(job.created_at)),
            ("updated_at", Some(job.updated_at)),
            ("finished_at", job.finished_at),
            ("owner.started_at", job.owner.as_ref().map(|o| o.started_at)),
        ];
        if let Some((field, t)) = times.iter().find_map(|(f, t)| t.filter(|t| *t > latest).map(|t| (f, t))) {
            return Err(corrupt(format!(
                "field `{field}`: {t} is no time knib writes (more than {} seconds from now)",
                u32::MAX as u64 + CLOCK_SLACK_SECS
            )));
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if job.id != stem {
            return Err(corrupt(format!("holds job {:?}, not {stem:?}", job.id)));
        }
        Ok(job)
    }

    /// Mark the job cancelled at `now` (unix seconds), `why`: no owner, its
    /// end time set. Not saved.
    pub(super) fn cancel(&mut self, why: String, now: u64) {
        self.state = JobState::Cancelled;
        self.owner = None;
        self.last_error = Some(why);
        self.updated_at = now;
        self.finished_at = Some(now);
    }

    pub(super) fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("a job always serializes");
        fsio::write_atomic(&dir.join(format!("{}.json", self.id)), &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn a_fifo_job_file_is_refused_without_waiting_for_a_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j1.json");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Job::load(&p2));
        });
        let e = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("Job::load hung on a FIFO").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(e.message, format!("job file {} is not a regular file", p.display()));
    }

    #[test]
    fn a_huge_job_file_is_refused_unread() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j1.json");
        // Sparse: 100 GiB that take no room, and would exhaust memory if read.
        std::fs::File::create(&p).unwrap().set_len(100 << 30).unwrap();
        let e = Job::load(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(
            e.message,
            format!("job file {} is larger than 16777216 bytes, the most a JSON file of a store may have", p.display())
        );
    }

    #[test]
    fn a_directory_in_place_of_a_job_file_is_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j1.json");
        std::fs::create_dir(&p).unwrap();
        let e = Job::load(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(e.message, format!("job file {} is not a regular file", p.display()));
    }

    /// A job file's times beyond what knib writes (now plus the longest
    /// retry interval) are refused, naming the field: before, a runner
    /// panicked formatting such a retry time as a date (past the year
    /// 9999), or waited for it.
    #[test]
    fn a_job_time_knib_never_writes_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j1.json");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let job = |field: &str, t: u64| {
            let mut v = serde_json::json!({
                "schema": JOB_SCHEMA, "id": "j1", "kind": "compress", "vm": "vm1", "backup": "b1",
                "state": "queued", "attempts": 1, "next_attempt_at": now, "last_error": null, "owner": null,
                "created_at": now, "updated_at": now, "finished_at": null,
            });
            v[field] = t.into();
            std::fs::write(&p, v.to_string()).unwrap();
            Job::load(&p)
        };
        // The longest retry interval from a clock a day ahead, and a minute
        // for this test's own clock to move.
        let latest = now + u32::MAX as u64 + 86_400;
        for field in ["next_attempt_at", "created_at", "updated_at", "finished_at"] {
            for t in [latest + 3600, 253_402_300_800, u64::MAX] {
                let e = job(field, t).unwrap_err();
                assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
                assert_eq!(
                    e.message,
                    format!(
                        "job file {} field `{field}`: {t} is no time knib writes (more than 4295053695 seconds from now)",
                        p.display()
                    )
                );
            }
            // The longest retry interval, written by a runner whose clock
            // is a day ahead, is a time knib writes.
            job(field, latest).unwrap();
        }
    }
}
