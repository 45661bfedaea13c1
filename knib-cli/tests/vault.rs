//! `knib sync` killed, for real, against a real S3 server (Ceph RGW, see
//! `knib-core/tests/common/s3.rs`): the process is aborted before each of
//! its durable steps in turn (`KNIB_TEST_CRASH_AT=N`, as in
//! `crash_steps.rs`), and at random times by SIGKILL; after each kill:
//!
//! - every backup the vault lists is complete (each of its objects there,
//!   as long as its manifest says): an interrupted upload shows nothing;
//! - the next `knib sync` aborts what was left, sends the rest, and leaves
//!   no upload record; then the vault holds every backup, `knib verify`
//!   passes on it, and a restore from it is byte-identical.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;
#[path = "../../knib-core/tests/common/s3.rs"]
mod s3;

use common::disk::{assert_identical, make_disk, qemu_io, snapshot};

const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";

fn knib(args: &[&str], crash_at: Option<u64>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).env_remove("KNIB_TEST_CRASH_NOTE");
    match crash_at {
        Some(n) => c.env(CRASH_ENV, n.to_string()),
        None => c.env_remove(CRASH_ENV),
    };
    c.output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = knib(args, None);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// A store with two backups (full, incremental) of two disks, one large
/// enough for a multipart upload; the disks' contents at the second.
fn store_with_two_backups(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("root.qcow2");
    let data = dir.join("data.qcow2");
    make_disk(&root, 32 << 20, &[]);
    make_disk(&data, 8 << 20, &[]);
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let disks = [format!("root={}", root.display()), format!("data={}", data.display())];
    qemu_io(&root, "write -P 0x61 0 17M");
    qemu_io(&data, "write -P 0x62 0 1M");
    ok_json(&["--json", "backup", "--store", s, "--vm", "vm1", "--disk", &disks[0], "--disk", &disks[1]]);
    qemu_io(&root, "write -P 0x63 20M 9M");
    ok_json(&["--json", "backup", "--store", s, "--vm", "vm1", "--disk", &disks[0], "--disk", &disks[1]]);
    let reference = dir.join("root-ref.qcow2");
    snapshot(&root, &reference);
    (store, reference)
}

/// What a killed sync may leave: only whole backups are listed.
fn assert_only_whole_backups(p: &s3::Prefix, loc: &str) {
    let keys = p.keys();
    let listed = ok_json(&["--json", "list", "--store", loc]);
    for b in listed.as_array().unwrap() {
        for v in b["volumes"].as_array().unwrap() {
            let rel = v["file"].as_str().unwrap().strip_prefix(&format!("{loc}/")).unwrap().to_string();
            assert_eq!(keys.get(&rel), v["size"].as_u64().as_ref(), "{rel} of a listed backup is not whole: {keys:?}");
        }
    }
}

/// Resume: the next sync sends the rest; everything is there and right.
fn resume_and_check(store: &str, loc: &str, p: &s3::Prefix, reference: &Path, work: &Path) {
    let r = ok_json(&["--json", "sync", "--store", store, "--to", loc, "--parallel-parts", "2"]);
    assert_eq!(r["sent"].as_array().unwrap().len() + r["present"].as_array().unwrap().len(), 2, "{r}");
    assert!(p.keys().keys().all(|k| k.starts_with("vms/")), "an upload record is left: {:?}", p.keys());
    // Every object's bytes are the ones sent: a checking sync reads them all
    // and has nothing to send again.
    let c = ok_json(&["--json", "sync", "--store", store, "--to", loc, "--check"]);
    let objects: u64 = p.keys().iter().filter(|(k, _)| k.ends_with(".qcow2")).map(|(_, n)| n).sum();
    assert_eq!(c["bytes_checked"].as_u64(), Some(objects), "{c}");
    assert!(c["repaired"].as_array().unwrap().is_empty() && c["damaged"].as_array().unwrap().is_empty(), "{c}");
    let listed = ok_json(&["--json", "list", "--store", loc]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    ok_json(&["--json", "verify", "--store", loc]);
    let last = listed[1]["id"].as_str().unwrap();
    let to = work.join("restored.qcow2");
    let _ = std::fs::remove_file(&to);
    ok_json(&["--json", "restore", "--store", loc, last, "--volume", "root", "--to", to.to_str().unwrap()]);
    assert_identical(&to, reference);
}

#[test]
fn a_sync_killed_at_every_step_and_at_random_times_is_resumed() {
    if !s3::setup() {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let (store, reference) = store_with_two_backups(w.path());
    let store = store.to_str().unwrap().to_string();

    // Aborted before each durable step in turn, until a sync completes.
    let mut n = 1;
    loop {
        let p = s3::Prefix::new("kill-step");
        let loc = p.location();
        let out = knib(&["sync", "--store", &store, "--to", &loc, "--parallel-parts", "2"], Some(n));
        if out.status.success() {
            assert!(n > 10, "a sync of two backups takes more than {n} durable steps");
            resume_and_check(&store, &loc, &p, &reference, w.path());
            break;
        }
        assert!(n < 200, "the sync never completes");
        assert_only_whole_backups(&p, &loc);
        resume_and_check(&store, &loc, &p, &reference, w.path());
        n += 1;
    }

    // Killed (SIGKILL) at seeded random times.
    let mut seed = 0x5eed_u64;
    for _ in 0..3 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let p = s3::Prefix::new("kill-time");
        let loc = p.location();
        let mut child = Command::new(env!("CARGO_BIN_EXE_knib"))
            .args(["sync", "--store", &store, "--to", &loc])
            .env_remove(CRASH_ENV)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100 + seed % 1500));
        let _ = child.kill();
        let _ = child.wait();
        assert_only_whole_backups(&p, &loc);
        resume_and_check(&store, &loc, &p, &reference, w.path());
    }
}
