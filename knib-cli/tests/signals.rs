//! Ctrl-C and SIGTERM: the first one cancels the running command, which
//! cleans up and ends with exit status 16 (`knib: cancelled: ...`); a
//! second one ends knib at once by that signal.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A store `dir/st` with one backup of a disk holding `data_mib` MiB of
/// data; the backup's id.
fn store_with_backup(dir: &Path, data_mib: u64) -> (PathBuf, String) {
    let disk = dir.join("d.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(&disk), &format!("{}M", data_mib * 2)]);
    run(&["qemu-io", "-f", "qcow2", "-c", &format!("write -P 0x31 0 {data_mib}M"), s(&disk)]);
    let store = dir.join("st");
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["--json", "backup", "--store", s(&store), "--vm", "v", "--disk", &format!("d={}", s(&disk))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (store, m["id"].as_str().unwrap().to_string())
}

/// knib in a process group of its own (as a terminal's foreground job is).
fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(args)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait (up to a minute) until `f` holds, failing if `child` ends first.
fn wait_for(child: &mut Child, what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("knib ended ({st}) before {what}");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no {what} after a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: a signal to a process (or group) this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Every path under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Wait for `child` to end (within 20 s of the signal): its status and
/// standard error.
fn finish(child: Child) -> (std::process::ExitStatus, String) {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let t = Instant::now();
    while !waiter.is_finished() {
        if t.elapsed() > Duration::from_secs(20) {
            signal(pid as i32, libc::SIGKILL);
            panic!("knib did not end within 20 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A restore interrupted once its temporary file is there (SIGINT to knib
/// alone): exit status 16, a `knib: cancelled` line, and nothing beside
/// the target. Before, SIGINT killed knib (status 130 in a shell) and the
/// temporary file was left.
#[test]
fn sigint_cancels_a_restore_and_leaves_nothing_beside_the_target() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = store_with_backup(d.path(), 256);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let to = out.join("r.qcow2");
    let mut child = spawn(&["restore", "--store", s(&store), &id, "--volume", "d", "--to", s(&to)]);
    wait_for(&mut child, "the restore's temporary file", || std::fs::read_dir(&out).unwrap().next().is_some());
    signal(child.id() as i32, libc::SIGINT);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(16), "{status}: {err}");
    assert!(err.starts_with("knib: cancelled: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(tree(&out), Vec::<PathBuf>::new());
}

/// Ctrl-C on a terminal: SIGINT to knib's whole process group, the
/// qemu-img it runs included, during a compression on the qemu-img data
/// path. Exit status 16, and the store is as it was (the compressed copy
/// removed, the backup not compressed).
#[test]
fn ctrl_c_to_the_process_group_cancels_a_compression_on_the_qemu_img_path() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = store_with_backup(d.path(), 32);
    std::fs::write(store.join("knib.json"), r#"{"schema": 1, "knib.data.path": "qemu-img"}"#).unwrap();
    let before = tree(&store);
    let manifest = store.join("vms/v").join(&id).join("manifest.json");
    let m0 = std::fs::read(&manifest).unwrap();
    let mut child = spawn(&["compress", "--store", s(&store), &id, "--rate-limit", "1"]);
    // Written under its temporary name until whole.
    let comp = store.join("vms/v").join(&id).join(".d.qcow2.comp.part");
    wait_for(&mut child, "qemu-img's output", || comp.exists());
    signal(-(child.id() as i32), libc::SIGINT);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(16), "{status}: {err}");
    assert!(err.starts_with("knib: cancelled: "), "{err}");
    assert_eq!(tree(&store), before, "{err}");
    assert_eq!(std::fs::read(&manifest).unwrap(), m0);
}

/// SIGTERM cancels as SIGINT does; a second signal (here SIGINT then
/// SIGTERM, both pending when knib runs again) ends knib at once, by the
/// second signal.
#[test]
fn sigterm_cancels_and_a_second_signal_ends_knib() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = store_with_backup(d.path(), 32);
    let args = ["compress", "--store", s(&store), &id, "--rate-limit", "1"];
    // Written under its temporary name until whole.
    let comp = store.join("vms/v").join(&id).join(".d.qcow2.comp.part");

    let before = tree(&store);
    let mut child = spawn(&args);
    wait_for(&mut child, "the compressed copy", || comp.exists());
    signal(child.id() as i32, libc::SIGTERM);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(16), "{status}: {err}");
    assert!(err.starts_with("knib: cancelled: "), "{err}");
    assert_eq!(tree(&store), before, "{err}");

    let mut child = spawn(&args);
    wait_for(&mut child, "the compressed copy", || comp.exists());
    let pid = child.id() as i32;
    signal(pid, libc::SIGSTOP);
    signal(pid, libc::SIGINT);
    signal(pid, libc::SIGTERM);
    signal(pid, libc::SIGCONT);
    let (status, err) = finish(child);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}: {err}");
}

/// `jobs run` stops on SIGINT as every command does: while it runs a
/// compression (the job is stopped and queued again, its attempt not
/// counted, nothing left beside the backup), and while it waits for a
/// job's retry time. Before, the runner never saw the signal: the
/// compression ran to its end and `jobs run` exited 0, and a wait went on
/// until a second signal.
#[test]
fn sigint_stops_jobs_run_while_a_job_runs_and_while_it_waits() {
    let d = tempfile::tempdir().unwrap();
    let (store, id) = store_with_backup(d.path(), 32);
    std::fs::write(store.join("knib.json"), r#"{"schema": 1, "compression.rate_limit_mbps": 1}"#).unwrap();
    run(&[env!("CARGO_BIN_EXE_knib"), "jobs", "queue", "--store", s(&store), &id]);
    let before = tree(&store.join("vms"));
    let comp = store.join("vms/v").join(&id).join(".d.qcow2.comp.part");
    let mut child = spawn(&["jobs", "run", "--store", s(&store)]);
    wait_for(&mut child, "the compressed copy", || comp.exists());
    signal(child.id() as i32, libc::SIGINT);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(16), "{status}: {err}");
    assert!(err.starts_with("knib: cancelled: ") && err.contains("1 job(s) left queued"), "{err}");
    assert_eq!(tree(&store.join("vms")), before, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["--json", "jobs", "list", "--store", s(&store)])
        .output()
        .unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((jobs[0]["state"].as_str(), jobs[0]["attempts"].as_u64()), (Some("queued"), Some(0)), "{jobs}");

    // A job waiting for its retry an hour ahead.
    std::fs::write(
        store.join("knib.json"),
        r#"{"schema": 1, "compression.min_free_factor": 1e12, "compression.retry_interval_secs": 3600}"#,
    )
    .unwrap();
    let mut child = spawn(&["jobs", "run", "--store", s(&store)]);
    let job_file = store.join("jobs").join(format!("{}.json", jobs[0]["id"].as_str().unwrap()));
    wait_for(&mut child, "the failed attempt", || {
        std::fs::read_to_string(&job_file).is_ok_and(|t| t.contains("\"attempts\": 1") && t.contains("queued"))
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id() as i32, libc::SIGINT);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(16), "{status}: {err}");
    assert!(err.starts_with("knib: cancelled: "), "{err}");
}
