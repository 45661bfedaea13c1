//! `knib backup --vault` (a backup written straight to the vault) killed,
//! for real, against a real S3 server (Ceph RGW, see
//! `knib-core/tests/common/s3.rs`): the process is aborted before each of
//! its durable steps in turn (`KNIB_TEST_CRASH_AT=N`, as in
//! `crash_steps.rs`); after each kill:
//!
//! - nothing of the backup is visible until its manifest is written, and
//!   every backup the vault lists is whole;
//! - the next `knib backup --vault` removes what was left (the recorded
//!   upload aborted, objects without a manifest removed) and succeeds: no
//!   upload record and no object outside a listed backup is left, `knib
//!   verify` passes, and a restore is byte-identical.

use std::path::Path;
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;
#[path = "../../knib-core/tests/common/s3.rs"]
mod s3;

use common::disk::{assert_identical, make_disk, qemu_io, snapshot};

const CRASH_ENV: &str = "KNIB_TEST_CRASH_AT";
const NOTE_ENV: &str = "KNIB_TEST_CRASH_NOTE";

fn knib(args: &[&str], crash_at: Option<(u64, &Path)>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args);
    match crash_at {
        Some((n, note)) => c.env(CRASH_ENV, n.to_string()).env(NOTE_ENV, note),
        None => c.env_remove(CRASH_ENV).env_remove(NOTE_ENV),
    };
    c.output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = knib(args, None);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("knib {args:?} printed no JSON ({e})"))
}

/// Every listed backup is whole, and (with `clean`) nothing else is there.
fn check_vault(p: &s3::Prefix, loc: &str, clean: bool) -> Vec<serde_json::Value> {
    let keys = p.keys();
    let listed = ok_json(&["--json", "list", "--store", loc]);
    let listed = listed.as_array().unwrap().clone();
    let mut expected = Vec::new();
    for b in &listed {
        let id = b["id"].as_str().unwrap();
        expected.push(format!("vms/vm1/{id}/manifest.json"));
        for v in b["volumes"].as_array().unwrap() {
            let rel = v["file"].as_str().unwrap().strip_prefix(&format!("{loc}/")).unwrap().to_string();
            assert_eq!(keys.get(&rel), v["size"].as_u64().as_ref(), "{rel} of a listed backup is not whole: {keys:?}");
            expected.push(rel);
        }
    }
    if clean {
        expected.sort();
        let got: Vec<String> = keys.keys().cloned().collect();
        assert_eq!(got, expected, "objects outside the listed backups are left");
    }
    listed
}

#[test]
fn a_direct_backup_killed_at_every_step_leaves_nothing_visible_and_the_next_one_succeeds() {
    if !s3::setup() {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let tpl = w.path().join("template");
    std::fs::create_dir(&tpl).unwrap();
    make_disk(&tpl.join("root.qcow2"), 32 << 20, &[]);
    make_disk(&tpl.join("data.qcow2"), 8 << 20, &[]);
    // root: a multipart upload (parts of 8 MiB); data: one PUT.
    qemu_io(&tpl.join("root.qcow2"), "write -P 0x61 0 17M");
    qemu_io(&tpl.join("root.qcow2"), "write -P 0x63 20M 9M");
    qemu_io(&tpl.join("data.qcow2"), "write -P 0x62 0 1M");
    let reference = w.path().join("root-ref.qcow2");
    snapshot(&tpl.join("root.qcow2"), &reference);
    let note = w.path().join("note");

    let mut n = 1;
    loop {
        // Fresh disks (same paths), store and prefix for each step.
        let vmdir = w.path().join("vm");
        let _ = std::fs::remove_dir_all(&vmdir);
        std::fs::create_dir(&vmdir).unwrap();
        for f in ["root.qcow2", "data.qcow2"] {
            std::fs::copy(tpl.join(f), vmdir.join(f)).unwrap();
        }
        let store = w.path().join(format!("store-{n}"));
        let p = s3::Prefix::new("direct-kill");
        let loc = p.location();
        let disks = [
            format!("root={}", vmdir.join("root.qcow2").display()),
            format!("data={}", vmdir.join("data.qcow2").display()),
        ];
        let args = [
            "--json",
            "backup",
            "--store",
            store.to_str().unwrap(),
            "--vm",
            "vm1",
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
            "--vault",
            &loc,
        ];
        let _ = std::fs::remove_file(&note);
        let out = knib(&args, Some((n, &note)));
        if out.status.success() {
            assert!(n > 10, "a direct backup of two disks takes more than {n} durable steps");
            check_vault(&p, &loc, true);
            break;
        }
        assert!(n < 200, "the direct backup never completes");
        let step = std::fs::read_to_string(&note).unwrap_or_default();
        let listed = check_vault(&p, &loc, false);
        let published = listed.len() == 1;
        assert!(listed.len() <= 1);
        // The manifest is the last object written: before it, nothing shows.
        if step.contains("part ") || step.contains("upload") || step.contains("copy of") {
            assert!(!published, "step {step}: a backup is visible before its manifest");
        }
        // The next run cleans up and succeeds.
        let b = ok_json(&args);
        let listed = check_vault(&p, &loc, true);
        assert_eq!(listed.len(), if published { 2 } else { 1 }, "step {step}");
        ok_json(&["--json", "verify", "--store", &loc]);
        let to = w.path().join("restored.qcow2");
        let _ = std::fs::remove_file(&to);
        let id = b["id"].as_str().unwrap();
        ok_json(&["--json", "restore", "--store", &loc, id, "--volume", "root", "--to", to.to_str().unwrap()]);
        assert_identical(&to, &reference);
        n += 1;
    }
}
