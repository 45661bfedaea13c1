//! Durable compression and validation jobs against the real qemu-img: the
//! concurrency limits, retries, crash recovery, cancellation, the time budget, the rate
//! limit and bad job files.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::disk::*;
use knib_core::catalog::jobs::{run_jobs, Job, JobEvent, JobObserver, JobState, OwnerStatus, RunOptions};
use knib_core::catalog::{BackupOptions, DiskSpec, Manifest, Store};
use knib_core::qemu_img::ImageFormat;
use knib_core::{Control, ErrorKind};

const MIB: u64 = 1 << 20;

/// A store with `knib.json` holding `settings` (flat keys, schema added).
fn store_with(settings: &str) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    std::fs::create_dir(store.root()).unwrap();
    std::fs::write(store.root().join("knib.json"), format!("{{\"schema\": 1, {settings}}}")).unwrap();
    (dir, store)
}

/// One VM with one 32 MiB disk, backed up `writes.len()` times; before each
/// backup `writes[i]` MiB of pattern `0x10 + i` are written. Returns each
/// backup with a reference copy of the disk as it was.
fn backups(store: &Store, work: &Path, vm: &str, writes: &[u64]) -> Vec<(Manifest, PathBuf)> {
    let disk = work.join(format!("{vm}.qcow2"));
    make_disk(&disk, 32 * MIB, &[]);
    let spec = [DiskSpec { name: "root".into(), path: disk.clone() }];
    let mut out = Vec::new();
    for (i, mib) in writes.iter().enumerate() {
        qemu_io(&disk, &format!("write -P 0x{:02x} {}M {mib}M", 0x10 + i, i));
        let reference = work.join(format!("{vm}-ref{i}.qcow2"));
        snapshot(&disk, &reference);
        let m = store.backup(vm, &spec, &BackupOptions::default(), &Control::new()).unwrap();
        out.push((m, reference));
    }
    out
}

fn restores_identical(store: &Store, id: &str, reference: &Path) {
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("restored.qcow2");
    store.restore(id, "root", &to, ImageFormat::Qcow2, &Control::new()).unwrap();
    assert_identical(&to, reference);
}

/// Every `.comp` file under `dir`.
fn comp_files(dir: &Path) -> Vec<PathBuf> {
    tree(dir).into_keys().filter(|p| p.to_string_lossy().ends_with(".comp")).collect()
}

/// Every event of a run, with the time it came.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(Instant, JobEvent)>>,
    running: Mutex<(usize, usize, HashSet<String>)>,
    /// Per kind of job: (running now, most at once).
    per_kind: Mutex<HashMap<&'static str, (usize, usize)>>,
}

impl Recorder {
    /// An observer that records events and, at every start and finish, the
    /// number of jobs running (and that no two jobs of one VM overlap).
    fn observer(self: &Arc<Self>) -> JobObserver {
        let me = self.clone();
        Arc::new(move |e: &JobEvent| {
            {
                let mut r = me.running.lock().unwrap();
                match e {
                    JobEvent::Started(j) => {
                        let mut k = me.per_kind.lock().unwrap();
                        let k = k.entry(j.kind.as_str()).or_default();
                        k.0 += 1;
                        k.1 = k.1.max(k.0);
                        r.0 += 1;
                        r.1 = r.1.max(r.0);
                        assert!(r.2.insert(j.vm.clone()), "two jobs of VM {} at once", j.vm);
                    }
                    JobEvent::Finished(j) => {
                        me.per_kind.lock().unwrap().get_mut(j.kind.as_str()).unwrap().0 -= 1;
                        r.0 -= 1;
                        r.2.remove(&j.vm);
                    }
                    JobEvent::Recovered(_) | JobEvent::Waiting(_) => {}
                }
            }
            me.events.lock().unwrap().push((Instant::now(), e.clone()));
        })
    }

    fn max_running_of(&self, kind: &str) -> usize {
        self.per_kind.lock().unwrap().get(kind).map(|k| k.1).unwrap_or(0)
    }

    fn max_running(&self) -> usize {
        self.running.lock().unwrap().1
    }

    fn starts(&self) -> Vec<(Instant, Job)> {
        let ev = self.events.lock().unwrap();
        ev.iter().filter_map(|(t, e)| if let JobEvent::Started(j) = e { Some((*t, j.clone())) } else { None }).collect()
    }

    fn finishes(&self) -> Vec<(Instant, Job)> {
        let ev = self.events.lock().unwrap();
        ev.iter()
            .filter_map(|(t, e)| if let JobEvent::Finished(j) = e { Some((*t, j.clone())) } else { None })
            .collect()
    }
}

fn run(store: &Store, rec: &Arc<Recorder>) -> knib_core::Result<knib_core::catalog::jobs::RunSummary> {
    run_jobs(store, &RunOptions { observer: Some(rec.observer()), ..Default::default() })
}

#[test]
fn six_jobs_at_most_two_at_once_all_finish_and_restore_identical() {
    let (work, store) = store_with(r#""compression.max_concurrent_per_host": 2, "compression.rate_limit_mbps": 4"#);
    let mut taken = Vec::new();
    for vm in ["vm1", "vm2", "vm3"] {
        taken.extend(backups(&store, work.path(), vm, &[2, 2]));
    }
    let jobs: Vec<Job> = taken.iter().map(|(m, _)| store.queue_compression(&m.id).unwrap()).collect();
    assert_eq!(jobs.len(), 6);
    assert!(jobs.iter().all(|j| j.state == JobState::Queued && j.attempts == 0));
    let rec = Arc::new(Recorder::default());
    let summary = run(&store, &rec).unwrap();
    assert_eq!(rec.max_running(), 2, "never more than 2 at once, and the runner does run 2");
    let mut done = summary.done.clone();
    done.sort();
    let mut ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    ids.sort();
    assert_eq!(done, ids);
    assert!(summary.failed.is_empty() && summary.retried.is_empty() && summary.left_queued.is_empty());
    // Each job ran exactly once.
    let starts: Vec<String> = rec.starts().into_iter().map(|(_, j)| j.id).collect();
    assert_eq!(starts.len(), 6);
    assert_eq!(starts.iter().collect::<HashSet<_>>().len(), 6);
    for j in store.jobs().unwrap() {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert!(j.owner.is_none() && j.finished_at.is_some() && j.last_error.is_none());
    }
    for (m, reference) in &taken {
        assert!(store.show(&m.id).unwrap().compression.is_some(), "{} compressed", m.id);
        restores_identical(&store, &m.id, reference);
    }
    assert!(comp_files(store.root()).is_empty());
}

#[test]
fn two_runners_never_run_a_job_twice_and_share_the_host_limit() {
    let (work, store) = store_with(r#""compression.max_concurrent_per_host": 2, "compression.rate_limit_mbps": 4"#);
    let mut taken = Vec::new();
    for vm in ["a", "b", "c", "d"] {
        taken.extend(backups(&store, work.path(), vm, &[2]));
    }
    for (m, _) in &taken {
        store.queue_compression(&m.id).unwrap();
    }
    let rec = Arc::new(Recorder::default());
    let summaries: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let store = Store::open(store.root()).unwrap();
                let rec = rec.clone();
                s.spawn(move || run(&store, &rec).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(rec.max_running() <= 2, "the per-host limit holds across runners: {}", rec.max_running());
    let starts: Vec<String> = rec.starts().into_iter().map(|(_, j)| j.id).collect();
    assert_eq!(starts.len(), 4, "{starts:?}");
    assert_eq!(starts.iter().collect::<HashSet<_>>().len(), 4, "no job ran twice: {starts:?}");
    assert_eq!(summaries.iter().map(|s| s.done.len()).sum::<usize>(), 4);
    for (m, reference) in &taken {
        restores_identical(&store, &m.id, reference);
    }
}

/// A compression job whose VM is busy (a backup of it runs, started
/// outside the runner) is not an attempt that failed: it is queued again
/// a minute later, its attempts not counted (three busy runs failed it
/// for good before, and its retry waited the hour of a failure), for an
/// hour after it was queued, then it counts as one; once the VM is free
/// it runs.
#[test]
fn a_job_whose_vm_is_busy_is_queued_again_without_counting_an_attempt() {
    let (work, store) = store_with(r#""compression.max_retries": 1"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[4]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let (ctl, reached_rx, go_tx) = common::disk::paused_at_first_progress();
    let (s, disk) = (store.clone(), work.path().join("vm1.qcow2"));
    let backup = std::thread::spawn(move || {
        s.backup("vm1", &[DiskSpec { name: "root".into(), path: disk }], &BackupOptions::default(), &ctl)
    });
    reached_rx.recv().unwrap();
    let summary = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    let j = store.job(&job.id).unwrap();
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0), "{j:?}");
    let why = j.last_error.clone().unwrap_or_default();
    assert!(
        why.starts_with("busy, tried again in 60 s without counting an attempt: busy: ") && why.contains("vm1"),
        "{why}"
    );
    assert!(j.next_attempt_at >= j.updated_at + 60 && j.next_attempt_at <= j.updated_at + 61, "{j:?}");
    // Due again (`edit`), queued more than an hour ago: busy counts.
    let file = store.jobs_dir().join(format!("{}.json", job.id));
    let edit = |created_back: u64| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        v["next_attempt_at"] = 0.into();
        v["created_at"] = (v["created_at"].as_u64().unwrap() - created_back).into();
        std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    };
    edit(3601);
    run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    let j = store.job(&job.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 1), "{j:?}");
    assert!(j.last_error.as_deref().unwrap_or_default().starts_with("busy: "), "{j:?}");
    go_tx.send(()).unwrap();
    backup.join().unwrap().unwrap();
    // Due again, the VM free: it runs and compresses.
    edit(0);
    let summary = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    assert_eq!(summary.done, vec![job.id.clone()], "{summary:?}");
    assert!(store.show(&m.id).unwrap().compression.is_some());
    restores_identical(&store, &m.id, &reference);
}

#[test]
fn a_failing_job_is_retried_at_the_interval_then_failed_and_the_backup_is_untouched() {
    // "Disk full": the minimum free space is far more than any disk has.
    let interval = 1u64;
    let (work, store) = store_with(&format!(
        r#""compression.min_free_factor": 1e12, "compression.max_retries": 2, "compression.retry_interval_secs": {interval}"#
    ));
    let (m, reference) = backups(&store, work.path(), "vm1", &[4]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let before = tree(&store.root().join("vms"));
    let rec = Arc::new(Recorder::default());
    let summary = run(&store, &rec).unwrap();
    assert_eq!(summary.failed, vec![job.id.clone()]);
    assert_eq!(summary.retried, vec![job.id.clone(), job.id.clone()]);
    // 1 attempt + 2 retries, each at least the interval after the last.
    let starts = rec.starts();
    assert_eq!(starts.len(), 3);
    for w in starts.windows(2) {
        assert!(w[1].0 - w[0].0 >= Duration::from_secs(interval), "retried before the interval");
    }
    let finishes = rec.finishes();
    for (i, (_, j)) in finishes.iter().enumerate() {
        assert_eq!(j.attempts, i as u32 + 1);
        assert!(j.last_error.as_deref().unwrap().starts_with("no space: "), "{j:?}");
        if i < 2 {
            assert_eq!(j.state, JobState::Queued);
            assert!(j.next_attempt_at >= j.updated_at + interval, "next attempt at the interval: {j:?}");
        } else {
            assert_eq!(j.state, JobState::Failed);
        }
    }
    // Before each retry the runner told what it waits for, once.
    let ev = rec.events.lock().unwrap().clone();
    let waits: Vec<(Instant, Job)> = ev
        .iter()
        .filter_map(|(t, e)| if let JobEvent::Waiting(j) = e { Some((*t, j.clone())) } else { None })
        .collect();
    assert_eq!(waits.len(), 2, "one wait told per retry: {waits:?}");
    for (k, (t, w)) in waits.iter().enumerate() {
        assert_eq!((w.id.as_str(), w.next_attempt_at), (job.id.as_str(), finishes[k].1.next_attempt_at));
        // (Another worker may tell it just before the failing one reports.)
        assert!(starts[k].0 <= *t && *t <= starts[k + 1].0, "told between the attempt and the retry");
    }
    let j = store.job(&job.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Failed, 3));
    assert!(j.last_error.unwrap().contains("free"));
    assert_eq!(tree(&store.root().join("vms")), before, "the backup is untouched");
    assert!(store.show(&m.id).unwrap().compression.is_none());
    restores_identical(&store, &m.id, &reference);
}

/// The hostname as the runner records it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

/// Rewrite a job file as a runner that died (or runs elsewhere) left it.
fn fake_running(store: &Store, id: &str, pid: u32, host: &str, attempts: u32) {
    let path = store.jobs_dir().join(format!("{id}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["state"] = "running".into();
    v["attempts"] = attempts.into();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    v["owner"] = serde_json::json!({"pid": pid, "hostname": host, "started_at": now});
    // As a runner records it: its process's start time, when it runs.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let start: u64 = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap();
        v["owner"]["pid_start"] = start.into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// A job that ended over 30 days ago has its file removed by the next
/// runner (the queue, read whole by every scan, grew with every backup for
/// ever); one that ended since, and one still queued, stay.
#[test]
fn jobs_that_ended_over_30_days_ago_are_forgotten_by_the_next_runner() {
    let (work, store) = store_with(r#""compression.enabled": true"#);
    let taken = backups(&store, work.path(), "vm1", &[1, 1]);
    let old = store.queue_compression(&taken[0].0.id).unwrap();
    let recent = store.queue_compression(&taken[1].0.id).unwrap();
    let summary = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    assert_eq!(summary.done.len(), 2, "{summary:?}");
    let (m3, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let path = store.jobs_dir().join(format!("{}.json", old.id));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let day = 24 * 3600;
    let ended = v["finished_at"].as_u64().unwrap() - 30 * day - 60;
    v["finished_at"] = ended.into();
    v["updated_at"] = ended.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    // A cancel request and a screenshot left beside it go with it.
    std::fs::write(store.jobs_dir().join(format!("{}.cancel", old.id)), b"").unwrap();
    std::fs::write(store.jobs_dir().join(format!("{}.png", old.id)), b"").unwrap();
    let queued = store.queue_compression(&m3.id).unwrap();
    let _ = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    let left: HashSet<String> = store.jobs().unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(left, HashSet::from([recent.id.clone(), queued.id.clone()]));
    for left in ["json", "cancel", "png"] {
        assert!(!store.jobs_dir().join(format!("{}.{left}", old.id)).exists(), "{left} left");
    }
    assert_eq!(store.job(&queued.id).unwrap().state, JobState::Done);
}

/// A job a runner of another host claimed and has held past its time limit
/// by over a day (that host went down mid-job) is taken for dead: a
/// runner that waits runs it, and the job of the same VM queued behind it,
/// and returns. Before, the first stayed running for ever and the runner
/// waited for ever on the second (its VM busy; only `jobs cancel --force`
/// ended it). One held within its limit is left to its host: a runner
/// without waiting returns at once, leaving both.
#[test]
fn a_job_held_by_another_host_past_its_time_limit_is_taken_back() {
    let (work, store) = store_with(r#""compression.timeout_secs": 600"#);
    let taken = backups(&store, work.path(), "vm1", &[2, 1]);
    let held = store.queue_compression(&taken[0].0.id).unwrap();
    let behind = store.queue_compression(&taken[1].0.id).unwrap();
    fake_running(&store, &held.id, 1, "another-host.example", 0);
    let summary = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    assert!(summary.done.is_empty() && summary.recovered.is_empty(), "{summary:?}");
    assert_eq!(store.job(&held.id).unwrap().state, JobState::Running);
    assert_eq!(store.job(&behind.id).unwrap().state, JobState::Queued);
    // Claimed 600 s + a day and a second ago.
    let path = store.jobs_dir().join(format!("{}.json", held.id));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let then = v["owner"]["started_at"].as_u64().unwrap() - 600 - 86_401;
    v["owner"]["started_at"] = then.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let s = store.clone();
    std::thread::spawn(move || tx.send(run_jobs(&s, &RunOptions::default())).unwrap());
    let summary = rx.recv_timeout(Duration::from_secs(120)).expect("the runner returns").unwrap();
    assert_eq!(summary.recovered, vec![held.id.clone()], "{summary:?}");
    let mut done = summary.done.clone();
    done.sort();
    let mut want = vec![held.id.clone(), behind.id.clone()];
    want.sort();
    assert_eq!(done, want, "{summary:?}");
    let j = store.job(&held.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Done, 0), "not counted: {j:?}");
    for (m, reference) in &taken {
        restores_identical(&store, &m.id, reference);
    }
}

#[test]
fn a_job_of_a_dead_runner_is_taken_back_without_counting_and_its_leftovers_removed() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[4]).pop().unwrap();
    let (other, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let elsewhere = store.queue_compression(&other.id).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    // A runner died mid-compression, in its second attempt: a partial .comp.
    fake_running(&store, &job.id, dead, &hostname(), 1);
    let comp = PathBuf::from(format!("{}.comp", store.volume_file(&m, "root").unwrap().display()));
    std::fs::write(&comp, b"half a compressed file").unwrap();
    // A job held by a runner on another host is not ours to take back.
    fake_running(&store, &elsewhere.id, std::process::id(), "elsewhere.example", 0);
    let owners: HashMap<String, OwnerStatus> =
        store.jobs().unwrap().into_iter().map(|j| (j.id.clone(), j.owner.unwrap().status())).collect();
    assert_eq!(owners[&job.id], OwnerStatus::Dead);
    assert_eq!(owners[&elsewhere.id], OwnerStatus::OtherHost);

    let rec = Arc::new(Recorder::default());
    let summary = run(&store, &rec).unwrap();
    assert_eq!(summary.recovered, vec![job.id.clone()]);
    assert_eq!(summary.done, vec![job.id.clone()]);
    let j = store.job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Done);
    assert_eq!(j.attempts, 1, "the interrupted attempt is not counted as a failure");
    assert!(!comp.exists());
    assert!(comp_files(store.root()).is_empty());
    assert!(store.show(&m.id).unwrap().compression.is_some());
    restores_identical(&store, &m.id, &reference);
    let e = store.job(&elsewhere.id).unwrap();
    assert_eq!(e.state, JobState::Running, "left to its own host");
    assert!(store.show(&other.id).unwrap().compression.is_none());
}

#[test]
fn a_job_whose_backup_was_deleted_is_cancelled_and_its_comp_files_removed() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let chain = backups(&store, work.path(), "vm1", &[2, 1]);
    let (lone, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let (b1, b2) = (&chain[0].0, &chain[1].0);
    let j1 = store.queue_compression(&b1.id).unwrap();
    let j2 = store.queue_compression(&b2.id).unwrap();
    let j3 = store.queue_compression(&lone.id).unwrap();
    // b1 has a child: deleting it keeps its files (marked removed).
    assert_eq!(store.delete(&b1.id).unwrap().marked_removed, vec![b1.id.clone()]);
    let comp = PathBuf::from(format!("{}.comp", store.volume_file(b1, "root").unwrap().display()));
    std::fs::write(&comp, b"leftover").unwrap();
    // The lone backup goes entirely.
    assert_eq!(store.delete(&lone.id).unwrap().expunged, vec![lone.id.clone()]);
    let rec = Arc::new(Recorder::default());
    let mut summary = run(&store, &rec).unwrap();
    summary.cancelled.sort();
    let mut want = vec![j1.id.clone(), j3.id.clone()];
    want.sort();
    assert_eq!(summary.cancelled, want);
    assert_eq!(summary.done, vec![j2.id.clone()]);
    for id in [&j1.id, &j3.id] {
        let j = store.job(id).unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        assert!(j.last_error.unwrap().contains("was deleted"));
    }
    assert!(!comp.exists());
    assert!(comp_files(store.root()).is_empty());
    // The removed parent is untouched; its child restores through it.
    assert!(store.find(&b1.id).unwrap().compression.is_none());
    restores_identical(&store, &b2.id, &chain[1].1);
}

/// Wait (without a time assertion) until `path` exists.
fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn deleting_a_backup_while_it_compresses_is_refused_busy() {
    let (work, store) = store_with(r#""compression.rate_limit_mbps": 8"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[16]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    // Written under its temporary name until whole.
    let file = store.volume_file(&m, "root").unwrap();
    let comp = comp_part(&file);
    let summary = std::thread::scope(|s| {
        let runner = s.spawn(|| run_jobs(&store, &RunOptions::default()).unwrap());
        wait_for(&comp);
        let e = store.delete(&m.id).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{e}");
        assert!(e.message.contains(&format!("compression of {}", m.id)), "{e}");
        runner.join().unwrap()
    });
    assert_eq!(summary.done, vec![job.id]);
    restores_identical(&store, &m.id, &reference);
    store.delete(&m.id).unwrap();
}

#[test]
fn a_compression_limited_to_n_mb_per_s_takes_at_least_size_over_n() {
    let n = 8;
    let (work, store) = store_with(&format!(r#""compression.rate_limit_mbps": {n}"#));
    let (m, reference) = backups(&store, work.path(), "vm1", &[24]).pop().unwrap();
    let size = store.volume_file(&m, "root").unwrap().metadata().unwrap().len();
    store.queue_compression(&m.id).unwrap();
    let rec = Arc::new(Recorder::default());
    run(&store, &rec).unwrap();
    let took = rec.finishes()[0].0 - rec.starts()[0].0;
    let least = Duration::from_secs_f64(0.8 * size as f64 / (n * MIB) as f64);
    assert!(took >= least, "{size} bytes at {n} MB/s took {took:?}, less than {least:?}");
    restores_identical(&store, &m.id, &reference);
}

#[test]
fn a_job_over_its_time_budget_fails_with_timeout_and_leaves_nothing() {
    let (work, store) =
        store_with(r#""compression.rate_limit_mbps": 2, "compression.timeout_secs": 1, "compression.max_retries": 0"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[8]).pop().unwrap();
    let before = tree(&store.root().join("vms"));
    let job = store.queue_compression(&m.id).unwrap();
    let summary = run_jobs(&store, &RunOptions::default()).unwrap();
    assert_eq!(summary.failed, vec![job.id.clone()]);
    let j = store.job(&job.id).unwrap();
    assert!(j.last_error.as_deref().unwrap().starts_with("timeout: "), "{j:?}");
    assert_eq!(tree(&store.root().join("vms")), before);
    restores_identical(&store, &m.id, &reference);
}

#[test]
fn a_cancelled_runner_queues_its_job_again_without_counting_it() {
    let (work, store) = store_with(r#""compression.rate_limit_mbps": 4"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[8]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let cancel = knib_core::CancelToken::new();
    let c = cancel.clone();
    let observer: JobObserver = Arc::new(move |e: &JobEvent| {
        if matches!(e, JobEvent::Started(_)) {
            c.cancel();
        }
    });
    let e = run_jobs(&store, &RunOptions { observer: Some(observer), cancel, ..Default::default() }).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    let j = store.job(&job.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0), "{j:?}");
    assert!(j.owner.is_none());
    assert!(comp_files(store.root()).is_empty());
    assert!(store.show(&m.id).unwrap().compression.is_none());
    restores_identical(&store, &m.id, &reference);
}

#[test]
fn disabled_compression_leaves_jobs_queued_and_no_wait_leaves_retries() {
    // Compression off, validation on: the compression job waits.
    let (work, store) = store_with(r#""compression.enabled": false"#);
    let (m, _) = backups(&store, work.path(), "vm1", &[1]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let s = run_jobs(&store, &RunOptions::default()).unwrap();
    assert!(!s.disabled);
    assert_eq!(s.left_queued, vec![job.id.clone()]);
    std::fs::write(
        store.root().join("knib.json"),
        r#"{"schema": 1, "compression.enabled": false, "validation.enabled": false}"#,
    )
    .unwrap();
    let s = run_jobs(&store, &RunOptions::default()).unwrap();
    assert!(s.disabled);
    assert_eq!(s.left_queued, vec![job.id.clone()]);
    assert_eq!(store.job(&job.id).unwrap().state, JobState::Queued);
    // A failure with an hour to wait: --no-wait leaves it queued.
    std::fs::write(store.root().join("knib.json"), r#"{"schema": 1, "compression": {"min_free_factor": 1e12}}"#)
        .unwrap();
    let s = run_jobs(&store, &RunOptions { no_wait: true, ..Default::default() }).unwrap();
    assert_eq!((s.retried.clone(), s.left_queued.clone()), (vec![job.id.clone()], vec![job.id.clone()]));
    let j = store.job(&job.id).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 1));
    assert!(j.next_attempt_at >= j.updated_at + 3600);
}

#[test]
fn queueing_is_refused_for_duplicates_missing_and_compressed_backups() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let (m, _) = backups(&store, work.path(), "vm1", &[1]).pop().unwrap();
    assert_eq!(store.queue_compression("20000101-000000000-0000").unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(store.queue_compression("../x").unwrap_err().kind, ErrorKind::InvalidInput);
    let job = store.queue_compression(&m.id).unwrap();
    assert!(store.jobs_dir().join(format!("{}.json", job.id)).exists());
    let e = store.queue_compression(&m.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains(&job.id) && e.message.contains("queued"), "{e}");
    run_jobs(&store, &RunOptions::default()).unwrap();
    let e = store.queue_compression(&m.id).unwrap_err();
    assert!(e.message.contains("already compressed"), "{e}");
    assert_eq!(store.job("compress-nope").unwrap_err().kind, ErrorKind::NotFound);
}

#[test]
fn bad_job_files_and_bad_settings_are_errors_not_ignored() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let (m, _) = backups(&store, work.path(), "vm1", &[1]).pop().unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let text = std::fs::read_to_string(store.jobs_dir().join(format!("{}.json", job.id))).unwrap();
    // A kind this knib does not run.
    let other = store.jobs_dir().join("scrub-1.json");
    let v = text.replace(&job.id, "scrub-1").replace("\"compress\"", "\"scrub\"");
    std::fs::write(&other, &v).unwrap();
    for e in [store.jobs().unwrap_err(), run_jobs(&store, &RunOptions::default()).unwrap_err()] {
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message.contains("scrub-1.json") && e.message.contains("\"scrub\""), "{e}");
    }
    assert_eq!(store.job(&job.id).unwrap().state, JobState::Queued, "nothing ran");
    // An unknown field.
    let v = text.replace(&job.id, "scrub-1").replace("\"attempts\"", "\"colour\": 1, \"attempts\"");
    std::fs::write(&other, &v).unwrap();
    let e = store.jobs().unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    std::fs::remove_file(&other).unwrap();
    // Settings: an unknown key, a bad type.
    let settings: BTreeMap<&str, &str> = [
        (r#"{"schema": 1, "compression.max_concurent_per_host": 2}"#, "compression.max_concurent_per_host"),
        (r#"{"schema": 1, "compression": {"rate_limit_mbps": "fast"}}"#, "compression.rate_limit_mbps"),
    ]
    .into_iter()
    .collect();
    for (text, key) in settings {
        std::fs::write(store.root().join("knib.json"), text).unwrap();
        let e = run_jobs(&store, &RunOptions::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains(key), "{e}");
    }
    assert_eq!(store.job(&job.id).unwrap().state, JobState::Queued);
}

#[path = "jobs/validation.rs"]
mod validation;

/// Job files that lie about who runs them or what they are about: a job
/// "running" on this host under pid 1 with no start time (knib's runners
/// always record one) is taken back as a dead runner's and run, instead of
/// holding its VM's jobs (and `--no-wait` runners) forever; a job naming
/// one VM and a backup of another is failed as corrupt, not run.
#[test]
fn job_files_that_lie_about_their_runner_or_their_vm_do_not_hold_the_queue() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let (m1, reference) = backups(&store, work.path(), "vm1", &[2]).pop().unwrap();
    let (m2, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let j1 = store.queue_compression(&m1.id).unwrap();
    let j2 = store.queue_compression(&m2.id).unwrap();
    let edit = |id: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let file = store.root().join("jobs").join(format!("{id}.json"));
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string();
    edit(&j1.id, &|v| {
        v["state"] = "running".into();
        v["owner"] = serde_json::json!({"pid": 1, "hostname": host, "started_at": 0, "boot_id": boot});
    });
    edit(&j2.id, &|v| v["vm"] = "vm1".into());
    let (tx, rx) = std::sync::mpsc::channel();
    let root = store.root().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(run_jobs(&Store::open(&root).unwrap(), &RunOptions::default()));
    });
    let summary =
        rx.recv_timeout(Duration::from_secs(120)).expect("the runner waited on a job no runner runs").unwrap();
    assert_eq!(summary.done, vec![j1.id.clone()]);
    let j = store.job(&j2.id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    let why = j.last_error.unwrap();
    assert!(why.contains(&format!("names VM vm1 but backup {}, which is a backup of vm2", m2.id)), "{why}");
    assert!(store.find(&m2.id).unwrap().compression.is_none(), "the lying job was not run");
    restores_identical(&store, &m1.id, &reference);
}

/// `no_wait` does not wait for a due job that another live runner's job of
/// its VM holds back: it is left queued (before, the runner waited for as
/// long as the other job ran).
#[test]
fn no_wait_leaves_a_job_its_vms_running_job_holds_back() {
    let (work, store) = store_with(r#""compression.max_retries": 0"#);
    let ms = backups(&store, work.path(), "vm1", &[1, 1]);
    let held = store.queue_compression(&ms[0].0.id).unwrap();
    let queued = store.queue_compression(&ms[1].0.id).unwrap();
    // `held` runs under this test's own process (alive, its start time right).
    fake_running(&store, &held.id, std::process::id(), &hostname(), 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let root = store.root().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(run_jobs(&Store::open(&root).unwrap(), &RunOptions { no_wait: true, ..Default::default() }));
    });
    let summary = rx.recv_timeout(Duration::from_secs(60)).expect("a no-wait runner waited").unwrap();
    assert!(summary.done.is_empty(), "{summary:?}");
    assert_eq!(store.job(&queued.id).unwrap().state, JobState::Queued);
    assert_eq!(store.job(&held.id).unwrap().state, JobState::Running);
}

/// `Store::cancel_job`, every state a job can be in: a queued job is
/// cancelled at once and never run; a running compression is stopped by
/// its runner (asked through its cancel request), leaving the backup as it
/// was; a job that ended cannot be cancelled; a job whose runner died is
/// cancelled at once and its `.comp` files removed; a job running on
/// another host whose runner does not stop it is `busy`, then cancelled
/// with force; bad ids are refused.
#[test]
fn cancel_stops_a_job_in_every_state_and_leaves_its_backup_as_it_was() {
    let (work, store) = store_with(r#""compression.rate_limit_mbps": 4, "compression.max_retries": 0"#);
    let (m, reference) = backups(&store, work.path(), "vm1", &[16]).pop().unwrap();
    let (queued_b, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let (done_b, _) = backups(&store, work.path(), "vm3", &[1]).pop().unwrap();
    // vm1's and vm2's backups are never changed (vm3's is compressed).
    let vms = store.root().join("vms");
    let untouched = || (tree(&vms.join("vm1")), tree(&vms.join("vm2")));
    let before = untouched();
    let ctl = Control::new();

    // Queued: cancelled at once, and a runner does not run it.
    let queued = store.queue_compression(&queued_b.id).unwrap();
    let j = store.cancel_job(&queued.id, false, &ctl).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert_eq!(j.last_error.as_deref(), Some("cancelled by the operator before it ran"));
    assert!(j.finished_at.is_some() && j.owner.is_none(), "{j:?}");
    assert_eq!(store.cancel_job(&queued.id, false, &ctl).unwrap(), j, "cancelling it again answers it as it is");

    // Running: its runner stops it once asked.
    let job = store.queue_compression(&m.id).unwrap();
    let file = store.volume_file(&m, "root").unwrap();
    let part = comp_part(&file);
    let request = store.jobs_dir().join(format!("{}.cancel", job.id));
    let (summary, cancelled) = std::thread::scope(|s| {
        let runner = s.spawn(|| run_jobs(&store, &RunOptions::default()).unwrap());
        wait_for(&part);
        let cancelled = store.cancel_job(&job.id, false, &ctl).unwrap();
        (runner.join().unwrap(), cancelled)
    });
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    assert_eq!(cancelled.last_error.as_deref(), Some("cancelled by the operator while it ran"));
    assert_eq!(cancelled.attempts, 0, "{cancelled:?}");
    assert_eq!(summary.cancelled, vec![job.id.clone()], "{summary:?}");
    assert!(summary.done.is_empty() && summary.retried.is_empty(), "{summary:?}");
    assert!(!request.exists(), "the cancel request is left");
    assert!(comp_files(store.root()).is_empty());
    assert!(store.show(&m.id).unwrap().compression.is_none());
    assert_eq!(untouched(), before, "the backups are not as they were");
    restores_identical(&store, &m.id, &reference);

    // Ended: nothing to cancel.
    let done = store.queue_compression(&done_b.id).unwrap();
    assert_eq!(run_jobs(&store, &RunOptions::default()).unwrap().done, vec![done.id.clone()]);
    let e = store.cancel_job(&done.id, false, &ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.message, format!("job {} has ended (done): there is nothing to cancel", done.id));
    assert_eq!(store.job(&done.id).unwrap().state, JobState::Done);

    // Its runner died mid-compression: cancelled at once, the partial
    // `.comp` file removed.
    let again = store.queue_compression(&m.id).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    fake_running(&store, &again.id, dead, &hostname(), 0);
    let comp = PathBuf::from(format!("{}.comp", file.display()));
    std::fs::write(&comp, b"half a compressed file").unwrap();
    let j = store.cancel_job(&again.id, false, &ctl).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert!(j.last_error.as_deref().unwrap().contains(&format!("its runner (pid {dead} on ")), "{j:?}");
    assert!(!comp.exists(), "the dead compression's .comp file is left");

    // Running on another host, whose runner does not stop it: busy, the
    // request left for that runner; then cancelled with force.
    let far = store.queue_compression(&m.id).unwrap();
    fake_running(&store, &far.id, std::process::id(), "elsewhere.example", 0);
    let far_request = store.jobs_dir().join(format!("{}.cancel", far.id));
    let e = store.cancel_job_within(&far.id, false, Duration::from_secs(1), &ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("its runner (pid") && e.message.contains("on elsewhere.example) was asked"), "{e}");
    assert!(e.message.contains("cancel with force"), "{e}");
    assert!(far_request.exists(), "the request for the other host's runner is gone");
    assert_eq!(store.job(&far.id).unwrap().state, JobState::Running);
    // Stopped while it waits (Ctrl-C): nothing forced.
    let stopped = Control::new();
    stopped.cancel.cancel();
    let e = store.cancel_job_within(&far.id, true, Duration::from_secs(1), &stopped).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    assert_eq!(store.job(&far.id).unwrap().state, JobState::Running);
    let j = store.cancel_job_within(&far.id, true, Duration::from_secs(1), &ctl).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert!(j.last_error.as_deref().unwrap().contains("with force"), "{j:?}");
    // The request stays for that runner, should it still run; a later
    // cancel of the job removes it.
    assert!(far_request.exists(), "the request for a runner that may still run is gone");
    assert_eq!(store.cancel_job(&far.id, false, &ctl).unwrap(), j);
    assert!(!far_request.exists(), "the request is left behind a cancelled job");

    // Bad ids.
    assert_eq!(store.cancel_job("../../etc", false, &ctl).unwrap_err().kind, ErrorKind::InvalidInput);
    assert_eq!(store.cancel_job("no-such-job", false, &ctl).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(untouched(), before, "the backups are not as they were");
    restores_identical(&store, &m.id, &reference);
}

/// The races of a cancel with its runner: a job whose attempt ends (to be
/// retried) just as the request is written is cancelled by the record, not
/// claimed again; a job force-cancelled while its runner still runs it
/// keeps the cancel (the runner records nothing over it); a job whose
/// runner died after it was asked to stop is cancelled by the runner that
/// takes it back, not run again.
#[test]
fn a_cancel_is_not_lost_to_its_runner_ending_retrying_or_dying() {
    let (work, store) = store_with(
        r#""compression.rate_limit_mbps": 2, "compression.timeout_secs": 1, "compression.max_retries": 5, "compression.retry_interval_secs": 0"#,
    );
    let (m, reference) = backups(&store, work.path(), "vm1", &[8]).pop().unwrap();
    let ctl = Control::new();

    // Each attempt runs out of time and is retried at once; the cancel
    // comes while the first attempt's outcome is being recorded.
    let job = store.queue_compression(&m.id).unwrap();
    let at = format!("recording job {}", job.id);
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
    let (summary, cancelled) = std::thread::scope(|s| {
        let runner = s.spawn(|| run_jobs(&store, &RunOptions::default()).unwrap());
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "no pause at {at}");
        let cancelled = store.cancel_job_within(&job.id, false, Duration::from_secs(6), &ctl);
        (runner.join().unwrap(), cancelled)
    });
    let cancelled = cancelled.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    assert_eq!(summary.cancelled, vec![job.id.clone()], "{summary:?}");
    assert!(!store.jobs_dir().join(format!("{}.cancel", job.id)).exists());
    assert!(comp_files(store.root()).is_empty());

    // Force-cancelled (as from another host) while this runner runs it,
    // without a request it would see: the cancel stays.
    std::fs::write(store.root().join("knib.json"), r#"{"schema": 1, "compression": {"rate_limit_mbps": 4}}"#).unwrap();
    let job = store.queue_compression(&m.id).unwrap();
    let file = store.volume_file(&m, "root").unwrap();
    let part = comp_part(&file);
    let job_file = store.jobs_dir().join(format!("{}.json", job.id));
    let summary = std::thread::scope(|s| {
        let runner = s.spawn(|| run_jobs(&store, &RunOptions::default()).unwrap());
        wait_for(&part);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&job_file).unwrap()).unwrap();
        v["state"] = "cancelled".into();
        v["owner"] = serde_json::Value::Null;
        v["last_error"] = "cancelled by the operator with force".into();
        std::fs::write(&job_file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        runner.join().unwrap()
    });
    let j = store.job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "the runner recorded over the cancel: {j:?} {summary:?}");
    assert_eq!(j.last_error.as_deref(), Some("cancelled by the operator with force"));
    restores_identical(&store, &m.id, &reference);

    // Its runner died after it was asked to stop: cancelled when taken back.
    let (other, _) = backups(&store, work.path(), "vm2", &[1]).pop().unwrap();
    let job = store.queue_compression(&other.id).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    fake_running(&store, &job.id, dead, &hostname(), 0);
    std::fs::write(store.jobs_dir().join(format!("{}.cancel", job.id)), b"").unwrap();
    // It died mid-write: a partial `.comp` file.
    let comp = PathBuf::from(format!("{}.comp", store.volume_file(&other, "root").unwrap().display()));
    std::fs::write(&comp, b"half a compressed file").unwrap();
    let summary = run_jobs(&store, &RunOptions::default()).unwrap();
    assert!(summary.done.is_empty() && summary.recovered.is_empty(), "{summary:?}");
    assert_eq!(summary.cancelled, vec![job.id.clone()], "{summary:?}");
    assert!(!comp.exists(), "the dead compression's .comp file is left");
    let j = store.job(&job.id).unwrap();
    assert_eq!(j.state, JobState::Cancelled, "{j:?}");
    assert!(j.last_error.as_deref().unwrap().contains("died"), "{j:?}");
    assert!(!store.jobs_dir().join(format!("{}.cancel", job.id)).exists());
    assert!(store.show(&other.id).unwrap().compression.is_none());
}

/// The JSON API's job operations (`jobs.queue`, `jobs.list`, `jobs.show`,
/// `jobs.cancel`) on a real store: each answers the job as its file holds
/// it, with `owner_status`; bad requests get their exact error and change
/// nothing; a job queued through the API is run by the runner and a
/// running one is cancelled (busy without force when its runner does not
/// stop it, cancelled with force).
#[test]
fn the_json_api_queues_lists_shows_and_cancels_jobs() {
    let (dir, store) = store_with(r#""compression": {"retry_interval_secs": 0}"#);
    let b = backups(&store, dir.path(), "vm1", &[4, 2]);
    let root = store.root().display().to_string();
    let settings = std::fs::read(store.root().join("knib.json")).unwrap();
    let ctl = Control::new();
    let call = |op: &str, req: serde_json::Value| -> knib_core::Result<serde_json::Value> {
        knib_core::api::call(op, &req.to_string(), &ctl).map(|t| serde_json::from_str(&t).unwrap())
    };

    // Bad requests: the exact error, nothing queued.
    let bad: Vec<(serde_json::Value, ErrorKind, String)> = vec![
        (
            serde_json::json!({"store": root, "kind": "compress"}),
            ErrorKind::InvalidInput,
            "jobs.queue: a compress job needs `backup`".into(),
        ),
        (
            serde_json::json!({"store": root, "kind": "validate", "backup": b[0].0.id, "vm": "vm1"}),
            ErrorKind::InvalidInput,
            "jobs.queue: a validate job takes `backup`, not `vm`".into(),
        ),
        (
            serde_json::json!({"store": root, "kind": "sync", "backup": b[0].0.id, "vm": "vm1"}),
            ErrorKind::InvalidInput,
            "jobs.queue: a sync job takes either `vm` or `backup`, one of them".into(),
        ),
        (
            serde_json::json!({"store": root, "kind": "sync", "vm": "vm1"}),
            ErrorKind::InvalidInput,
            format!(
                "store {root} has no vault for sync jobs: set \"sync.vault\": \"s3://BUCKET/PREFIX\" in its knib.json"
            ),
        ),
        (
            serde_json::json!({"store": root, "kind": "compress", "backup": "20990101-000000000-0000"}),
            ErrorKind::NotFound,
            format!("backup 20990101-000000000-0000 does not exist in store {root}"),
        ),
    ];
    for (req, kind, message) in bad {
        let e = call("jobs.queue", req.clone()).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (kind, message.as_str()), "{req}");
    }
    let e = call("jobs.queue", serde_json::json!({"store": root, "kind": "shrink", "backup": b[0].0.id})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("shrink"), "{e}");
    assert_eq!(call("jobs.list", serde_json::json!({"store": root})).unwrap(), serde_json::json!([]));

    // Queued, listed, shown: the job file's fields and owner_status.
    let q = call("jobs.queue", serde_json::json!({"store": root, "kind": "compress", "backup": b[0].0.id})).unwrap();
    let id = q["id"].as_str().unwrap().to_string();
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.jobs_dir().join(format!("{id}.json"))).unwrap()).unwrap();
    let mut want = file.clone();
    want["owner_status"] = serde_json::Value::Null;
    assert_eq!(q, want);
    assert_eq!(
        (q["kind"].as_str(), q["state"].as_str(), q["vm"].as_str()),
        (Some("compress"), Some("queued"), Some("vm1"))
    );
    assert_eq!(call("jobs.show", serde_json::json!({"store": root, "job": id})).unwrap(), want);
    assert_eq!(call("jobs.list", serde_json::json!({"store": root})).unwrap(), serde_json::json!([want]));
    let e =
        call("jobs.queue", serde_json::json!({"store": root, "kind": "compress", "backup": b[0].0.id})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    for (job, kind) in [("compress-20990101-000000000-0000", ErrorKind::NotFound), ("../knib", ErrorKind::InvalidInput)]
    {
        let e = call("jobs.show", serde_json::json!({"store": root, "job": job})).unwrap_err();
        assert_eq!(e.kind, kind, "{e}");
        let e = call("jobs.cancel", serde_json::json!({"store": root, "job": job})).unwrap_err();
        assert_eq!(e.kind, kind, "{e}");
    }

    // Run by the runner: done, the backup compressed.
    let s = run_jobs(&store, &RunOptions::default()).unwrap();
    assert_eq!(s.done, vec![id.clone()], "{s:?}");
    let done = call("jobs.show", serde_json::json!({"store": root, "job": id})).unwrap();
    assert_eq!(done["state"], "done", "{done}");
    assert!(store.show(&b[0].0.id).unwrap().compression.is_some());
    let e = call("jobs.cancel", serde_json::json!({"store": root, "job": id})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.message, format!("job {id} has ended (done): there is nothing to cancel"));

    // Queued, then cancelled before it ran.
    let v = call("jobs.queue", serde_json::json!({"store": root, "kind": "validate", "backup": b[1].0.id})).unwrap();
    let vid = v["id"].as_str().unwrap().to_string();
    let c = call("jobs.cancel", serde_json::json!({"store": root, "job": vid})).unwrap();
    assert_eq!(
        (c["state"].as_str(), c["last_error"].as_str()),
        (Some("cancelled"), Some("cancelled by the operator before it ran"))
    );
    assert!(run_jobs(&store, &RunOptions::default()).unwrap().done.is_empty());

    // Running under a runner of another host that does not stop it: busy
    // after the wait, the job still running; cancelled with force.
    let c = call("jobs.queue", serde_json::json!({"store": root, "kind": "compress", "backup": b[1].0.id})).unwrap();
    let cid = c["id"].as_str().unwrap().to_string();
    fake_running(&store, &cid, 1, "another-host.example", 0);
    let shown = call("jobs.show", serde_json::json!({"store": root, "job": cid})).unwrap();
    assert_eq!((shown["state"].as_str(), shown["owner_status"].as_str()), (Some("running"), Some("other_host")));
    let e = call("jobs.cancel", serde_json::json!({"store": root, "job": cid, "wait_secs": 1})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert_eq!(call("jobs.show", serde_json::json!({"store": root, "job": cid})).unwrap()["state"], "running");
    assert!(store.jobs_dir().join(format!("{cid}.cancel")).is_file(), "the request to stop stands for the runner");
    let f = call("jobs.cancel", serde_json::json!({"store": root, "job": cid, "wait_secs": 0, "force": true})).unwrap();
    assert_eq!((f["state"].as_str(), f["owner"].is_null()), (Some("cancelled"), true), "{f}");
    assert!(f["last_error"].as_str().unwrap().starts_with("cancelled by the operator with force"), "{f}");
    restores_identical(&store, &b[1].0.id, &b[1].1);

    // A job file that is not running but names an owner (written by hand,
    // or by another tool): no owner_status, as no runner holds it.
    let path = store.jobs_dir().join(format!("{vid}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["owner"] = serde_json::json!({"pid": std::process::id(), "hostname": hostname(), "started_at": 1});
    std::fs::write(&path, v.to_string()).unwrap();
    let shown = call("jobs.show", serde_json::json!({"store": root, "job": vid})).unwrap();
    assert_eq!((shown["state"].as_str(), shown["owner_status"].is_null()), (Some("cancelled"), true), "{shown}");

    // A sync job, with a vault set (not reached to queue): by VM or by a
    // backup of it, the second answered with the job already queued.
    let mut with_vault: serde_json::Value = serde_json::from_slice(&settings).unwrap();
    with_vault["sync"] = serde_json::json!({"vault": "s3://knib-no-bucket/p"});
    std::fs::write(store.root().join("knib.json"), with_vault.to_string()).unwrap();
    let y = call("jobs.queue", serde_json::json!({"store": root, "kind": "sync", "vm": "vm1"})).unwrap();
    assert_eq!(
        (y["kind"].as_str(), y["vm"].as_str(), y["state"].as_str()),
        (Some("sync"), Some("vm1"), Some("queued"))
    );
    assert_eq!(y["backup"].as_str(), Some(b[1].0.id.as_str()), "the VM's newest backup");
    let again = call("jobs.queue", serde_json::json!({"store": root, "kind": "sync", "backup": b[0].0.id})).unwrap();
    assert_eq!(again["id"], y["id"], "{again}");
    let e = call("jobs.queue", serde_json::json!({"store": root, "kind": "sync", "vm": "../vm1"})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
}
