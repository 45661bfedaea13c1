//! A compression of a backup killed before each of its durable steps, for
//! real: `knib compress` is aborted (`KNIB_TEST_CRASH_AT=N`, the test-only
//! hook of debug builds, see `knib_core::crashpoint`) right before its Nth
//! durable step, for N = 1, 2, ... until it completes. After each crash,
//! before anything takes the VM's lock:
//!
//! - every backup restores to exactly the disks as they were when it was
//!   taken (its files checked against its hashes as they are read), and
//!   `verify` finds every backup sound: what a crash leaves reads as its
//!   files are, never as a backup whose hashes no longer match;
//!
//! then `knib compress` of the same backup succeeds (finishing what the
//! crash interrupted, or starting again), the backup is compressed, every
//! backup still restores and verifies, `qemu-img check` is clean on every
//! file of the store, and no `.comp` file or next manifest is left.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;

use common::disk::{assert_check_clean, assert_identical, make_disk, qemu_io, snapshot};

const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";
const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";
const MIB: u64 = 1 << 20;

/// Run `knib`, aborted before durable step `crash_at` when given.
fn knib(args: &[&str], crash_at: Option<u64>, cwd: &Path) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args).current_dir(cwd).env_remove("KNIB_FAULT_AT").env_remove(NOTE_ENV).env_remove(CRASH_ENV);
    if let Some(n) = crash_at {
        c.env(CRASH_ENV, n.to_string()).env(NOTE_ENV, cwd.join("crash-note"));
    }
    c.output().expect("knib runs")
}

fn ok_json(args: &[&str], cwd: &Path) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = knib(&all, None, cwd);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// Each backup's reference copies: volume name and file.
type Refs = [Vec<(String, PathBuf)>; 2];

/// Two disks with data, a full backup, writes, an incremental one: the
/// store, the two backups' ids, and each backup's reference copies.
fn setup(dir: &Path, seed: u64) -> (PathBuf, [String; 2], Refs) {
    let store = dir.join("store");
    let disks: Vec<(String, PathBuf)> =
        ["a", "b"].iter().map(|n| (n.to_string(), dir.join(format!("{n}.qcow2")))).collect();
    let mut refs: Refs = [Vec::new(), Vec::new()];
    let mut ids = [String::new(), String::new()];
    for (i, (_, p)) in disks.iter().enumerate() {
        make_disk(p, 16 * MIB, &[]);
        qemu_io(p, &format!("write -P 0x{:02x} {} 2M", 0x10 + i as u64 + seed % 7, (seed % 4) * MIB));
        qemu_io(p, &format!("write -P 0x{:02x} 9M 1M", 0x30 + i));
    }
    let disk_args: Vec<String> = disks.iter().map(|(n, p)| format!("{n}={}", p.display())).collect();
    for (k, round) in ["b1", "b2"].iter().enumerate() {
        if k == 1 {
            for (i, (_, p)) in disks.iter().enumerate() {
                qemu_io(p, &format!("write -P 0x{:02x} {} 512k", 0x50 + i, (4 + seed % 3) * MIB));
            }
        }
        let mut args = vec!["backup", "--store", store.to_str().unwrap(), "--vm", "vm1"];
        for d in &disk_args {
            args.extend_from_slice(&["--disk", d]);
        }
        ids[k] = ok_json(&args, dir)["id"].as_str().unwrap().to_string();
        for (n, p) in &disks {
            let r = dir.join(format!("ref-{round}-{n}.qcow2"));
            snapshot(p, &r);
            refs[k].push((n.clone(), r));
        }
    }
    (store, ids, refs)
}

/// Every backup restores to its references, and verify finds all sound.
fn assert_readable(store: &Path, ids: &[String; 2], refs: &Refs, dir: &Path, what: &str) {
    let s = store.to_str().unwrap();
    for (id, refs) in ids.iter().zip(refs) {
        for (vol, reference) in refs {
            let to = dir.join(format!("restored-{id}-{vol}.qcow2"));
            let _ = std::fs::remove_file(&to);
            let out = knib(&["restore", "--store", s, id, "--volume", vol, "--to", to.to_str().unwrap()], None, dir);
            assert!(out.status.success(), "{what}: restore of {id} {vol}: {}", String::from_utf8_lossy(&out.stderr));
            assert_identical(&to, reference);
        }
    }
    let reports = ok_json(&["verify", "--store", s], dir);
    for r in reports.as_array().unwrap() {
        assert_eq!(r["ok"], true, "{what}: verify: {r}");
    }
}

#[test]
fn a_compression_killed_at_every_durable_step_leaves_every_backup_readable() {
    let mut n = 1;
    loop {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let (store, ids, refs) = setup(dir, n);
        let s = store.to_str().unwrap();
        let out = knib(&["compress", "--store", s, &ids[0]], Some(n), dir);
        let finished = out.status.success();
        let step = std::fs::read_to_string(dir.join("crash-note")).unwrap_or_default();
        let what = format!("crash before durable step {}", step.trim());
        if !finished {
            assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            // Before anything takes the VM's lock.
            assert_readable(&store, &ids, &refs, dir, &what);
            ok_json(&["compress", "--store", s, &ids[0]], dir);
        }
        let shown = ok_json(&["show", "--store", s, &ids[0]], dir);
        assert_eq!(shown["compression"]["library"], "zstd", "{what}: {shown}");
        assert_readable(&store, &ids, &refs, dir, &what);
        let backup_dir = store.join("vms/vm1").join(&ids[0]);
        for e in std::fs::read_dir(&backup_dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name == "manifest.json" || name.ends_with(".qcow2"), "{what}: {} is left", p.display());
            if name.ends_with(".qcow2") {
                assert_check_clean(&p);
            }
        }
        if finished {
            assert!(n > 3, "the compression has more than three durable steps; it finished at {n}");
            break;
        }
        n += 1;
        assert!(n < 40, "the compression never finished");
    }
}
