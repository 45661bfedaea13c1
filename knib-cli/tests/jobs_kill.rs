//! A `knib jobs run` killed with SIGKILL in the middle of a compression: the
//! job is left running with a dead owner and a `.comp.part` file; the next
//! `knib jobs run` takes it back, runs it again to the end, leaves no `.comp`
//! file, and the backup restores byte-identical. `knib jobs cancel` stops a
//! compression another process runs.

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::disk::{assert_identical, comp_part, make_disk, qemu_io, snapshot};

const MIB: u64 = 1 << 20;

fn knib(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

fn ok(args: &[&str]) -> Output {
    let out = knib(args);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ok(args).stdout).unwrap()
}

fn comp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(comp_files(&e.path()));
        } else if e.file_name().to_string_lossy().ends_with(".comp")
            || e.file_name().to_string_lossy().ends_with(".comp.part")
        {
            out.push(e.path());
        }
    }
    out
}

/// A backup of VM vm1 (one disk of `size` MiB, `writes` made first, kept
/// in `reference.qcow2`) and its compression queued at `mbps` MB/s.
struct Queued {
    dir: tempfile::TempDir,
    store: PathBuf,
    id: String,
    file: PathBuf,
    /// The compression's temporary output, there while it runs.
    comp: PathBuf,
    reference: PathBuf,
    job_id: String,
}

fn queued(size: u64, writes: &[&str], mbps: u32) -> Queued {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let disk = dir.path().join("root.qcow2");
    make_disk(&disk, size * MIB, &[]);
    for w in writes {
        qemu_io(&disk, w);
    }
    let reference = dir.path().join("reference.qcow2");
    snapshot(&disk, &reference);
    let disk_arg = format!("root={}", disk.display());
    let backup = json(&["--json", "backup", "--store", s, "--vm", "vm1", "--disk", &disk_arg]);
    let id = backup["id"].as_str().unwrap().to_string();
    let file = PathBuf::from(backup["volumes"][0]["file"].as_str().unwrap());
    // A compression writes under a temporary name until its output is whole.
    let comp = comp_part(&file);
    std::fs::write(
        store.join("knib.json"),
        format!(r#"{{"schema": 1, "compression": {{"rate_limit_mbps": {mbps}}}}}"#),
    )
    .unwrap();
    let job = json(&["--json", "jobs", "queue", "--store", s, &id]);
    assert_eq!(job["state"], "queued");
    let job_id = job["id"].as_str().unwrap().to_string();
    Queued { dir, store, id, file, comp, reference, job_id }
}

#[test]
fn a_runner_killed_mid_compression_is_taken_back_and_finishes() {
    // 68 MiB at 8 MB/s: the compression takes several seconds.
    let Queued { dir, store, id, file: _, comp, reference, job_id } =
        queued(96, &["write -P 0x5a 0 64M", "write -P 0xa5 80M 4M"], 8);
    let s = store.to_str().unwrap();

    let mut runner = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["jobs", "run", "--store", s])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !comp.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "the compression never started");
        assert!(runner.try_wait().unwrap().is_none(), "the runner ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    runner.kill().unwrap();
    assert_eq!(runner.wait().unwrap().signal(), Some(9));

    let jobs = json(&["--json", "jobs", "list", "--store", s]);
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["id"], job_id.as_str());
    assert_eq!(jobs[0]["state"], "running", "{jobs}");
    assert_eq!(jobs[0]["owner_status"], "dead", "{jobs}");
    assert!(comp.exists(), "the killed compression left its temporary file");
    let shown = json(&["--json", "show", "--store", s, &id]);
    assert!(shown["compression"].is_null());

    // Again, without the rate limit.
    std::fs::remove_file(store.join("knib.json")).unwrap();
    let summary = json(&["--json", "jobs", "run", "--store", s]);
    assert_eq!(summary["recovered"], serde_json::json!([job_id]), "{summary}");
    assert_eq!(summary["done"], serde_json::json!([job_id]), "{summary}");
    let jobs = json(&["--json", "jobs", "list", "--store", s]);
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[0]["attempts"], 0, "the interrupted attempt is not a failure");
    assert!(jobs[0]["owner"].is_null());
    assert!(comp_files(&store).is_empty(), "{:?}", comp_files(&store));
    let shown = json(&["--json", "show", "--store", s, &id]);
    assert_eq!(shown["compression"]["library"], "zstd");

    let restored = dir.path().join("restored.qcow2");
    ok(&["restore", "--store", s, &id, "--volume", "root", "--to", restored.to_str().unwrap()]);
    assert_identical(&restored, &reference);
    ok(&["verify", "--store", s, &id]);

    // The text forms work too.
    let out = String::from_utf8(ok(&["jobs", "list", "--store", s]).stdout).unwrap();
    assert!(out.contains(&job_id) && out.contains("done"), "{out}");
    let out = String::from_utf8(ok(&["jobs", "run", "--store", s]).stdout).unwrap();
    assert!(out.contains("0 done"), "{out}");
    let e = knib(&["jobs", "queue", "--store", s, &id]);
    assert_eq!(e.status.code(), Some(13), "{}", String::from_utf8_lossy(&e.stderr));
    assert!(String::from_utf8_lossy(&e.stderr).contains("already compressed"));
}

/// `knib jobs cancel` from another process stops the compression a
/// `knib jobs run` is running: the runner sees the request, stops the
/// attempt and records the job cancelled (its exit status 0: nothing
/// failed); the backup is as it was, no `.comp` file and no request is
/// left. A job that ended is refused (13), an unknown one not found (11).
#[test]
fn jobs_cancel_stops_the_compression_another_process_runs() {
    // 48 MiB at 4 MB/s: the compression takes about 12 s.
    let Queued { dir, store, id, file, comp, reference, job_id } = queued(64, &["write -P 0x5a 0 48M"], 4);
    let s = store.to_str().unwrap();
    let manifest = std::fs::read(file.with_file_name("manifest.json")).unwrap();

    let runner = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["--json", "jobs", "run", "--store", s])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !comp.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "the compression never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = String::from_utf8(ok(&["jobs", "cancel", "--store", s, &job_id]).stdout).unwrap();
    assert_eq!(out.trim(), format!("job {job_id} cancelled: cancelled by the operator while it ran"));
    let ran = runner.wait_with_output().unwrap();
    assert!(ran.status.success(), "{ran:?}");
    let summary: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(summary["cancelled"], serde_json::json!([job_id]), "{summary}");

    let jobs = json(&["--json", "jobs", "list", "--store", s]);
    assert_eq!(jobs[0]["state"], "cancelled", "{jobs}");
    assert!(comp_files(&store).is_empty(), "{:?}", comp_files(&store));
    assert!(!store.join("jobs").join(format!("{job_id}.cancel")).exists(), "the cancel request is left");
    assert_eq!(std::fs::read(file.with_file_name("manifest.json")).unwrap(), manifest);
    ok(&["verify", "--store", s, &id]);
    let restored = dir.path().join("restored.qcow2");
    ok(&["restore", "--store", s, &id, "--volume", "root", "--to", restored.to_str().unwrap()]);
    assert_identical(&restored, &reference);

    // Cancelled again: answered as it is.
    let again = json(&["--json", "jobs", "cancel", "--store", s, &job_id]);
    assert_eq!(again["state"], "cancelled", "{again}");
    // Ended: refused. Unknown: not found.
    std::fs::remove_file(store.join("knib.json")).unwrap();
    let done = json(&["--json", "jobs", "queue", "--store", s, &id]);
    let done_id = done["id"].as_str().unwrap();
    ok(&["jobs", "run", "--store", s]);
    let e = knib(&["jobs", "cancel", "--store", s, done_id]);
    assert_eq!(e.status.code(), Some(13), "{e:?}");
    assert!(String::from_utf8_lossy(&e.stderr).contains("has ended (done): there is nothing to cancel"), "{e:?}");
    let e = knib(&["jobs", "cancel", "--store", s, "compress-no-such-job"]);
    assert_eq!(e.status.code(), Some(11), "{e:?}");
}
