//! `knib backup --domain NAME --vault s3://...`: a libvirt domain's backup
//! (snapshot method) written straight to the vault, against a real
//! libvirtd with a running QEMU domain and a real S3 server (Ceph RGW),
//! killed for real:
//!
//! - a full and incrementals while the guest writes: each restored from
//!   the vault byte-identical to what the guest had written, nothing of
//!   the backups in the store (the chain is the vault's);
//! - the process aborted before each of its durable steps in turn
//!   (`KNIB_TEST_CRASH_AT=N`): the next backup is refused until `knib
//!   recover --vault` (which says whether the backup was published, asking
//!   the vault); every backup the vault lists is whole, no object outside
//!   them is left after a recovery, and the chain goes on with every
//!   write;
//! - `recover` without the vault the journal names is refused, saying
//!   which vault;
//! - the same by the bitmap method: a running domain's full and
//!   incrementals (and a stopped one's), killed after each step of its
//!   journal, recovered with the vault, the chain going on with every
//!   write and exactly the head's checkpoint left.

#![cfg(feature = "libvirt")]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;
#[path = "../../knib-core/tests/common/s3.rs"]
mod s3;

use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};

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

/// The vault's backups of `vm`; each listed one is whole, and (with
/// `clean`) nothing else is under the prefix.
fn check_vault(p: &s3::Prefix, loc: &str, vm: &str, clean: bool) -> Vec<serde_json::Value> {
    let keys = p.keys();
    let listed = ok_json(&["--json", "list", "--store", loc]).as_array().unwrap().clone();
    let mut expected = Vec::new();
    for b in &listed {
        let id = b["id"].as_str().unwrap();
        expected.push(format!("vms/{vm}/{id}/manifest.json"));
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

fn restore_check(loc: &str, id: &str, model: &Model, n: usize, dir: &Path) {
    for (t, _) in &model.targets {
        let to = dir.join(format!("{id}-{t}.raw"));
        let _ = std::fs::remove_file(&to);
        let out = knib(
            &["restore", "--store", loc, id, "--volume", t, "--to", to.to_str().unwrap(), "--format", "raw"],
            None,
        );
        assert!(out.status.success(), "restore {id} {t}: {}", String::from_utf8_lossy(&out.stderr));
        model.assert_restored(t, n, &to, dir);
    }
}

#[test]
fn a_running_domain_backed_up_straight_to_the_vault_survives_a_kill_at_every_step() {
    if skip_without_libvirt("domain backups to a vault") || !s3::setup() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let p = s3::Prefix::new("vault-domain");
    let loc = p.location();
    let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
    let vm = TestVm::create("knib-vd", &disks, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let name = vm.name().to_string();
    let backup = ["--json", "backup", "--store", &s, "--domain", &name, "--vault", &loc];
    let mut model = Model::new(&disks);

    // A full, then an incremental: only the change is sent.
    model.write(&vm, "vda", 0x01, 0, 8 * MIB);
    model.write(&vm, "vdb", 0x02, 0, 4 * MIB);
    let b1 = ok_json(&backup);
    assert_eq!(b1["kind"], "full", "{b1}");
    let mut taken = vec![(b1["id"].as_str().unwrap().to_string(), model.writes.len())];
    model.write(&vm, "vda", 0x03, 16 * MIB, MIB);
    let b2 = ok_json(&backup);
    assert_eq!((b2["kind"].as_str(), b2["parent"].as_str()), (Some("incremental"), b1["id"].as_str()), "{b2}");
    assert!(b2["volumes"][0]["size"].as_u64().unwrap() < 4 * MIB, "{b2}");
    taken.push((b2["id"].as_str().unwrap().to_string(), model.writes.len()));
    let mine = store.join("vms").join(&name);
    let local: Vec<String> = std::fs::read_dir(&mine)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(local.iter().all(|f| !f.starts_with("20") && f != "journal.json"), "the store holds {local:?}");
    check_vault(&p, &loc, &name, true);

    // Killed before each durable step in turn, then recovered.
    let note = dir.path().join("note");
    let mut n = 1;
    let mut round = 0u64;
    loop {
        round += 1;
        model.write(&vm, "vdb", 0x10 + (round % 200) as u8, 8 * MIB + round * 256 * 1024, 128 * 1024);
        let _ = std::fs::remove_file(&note);
        let out = knib(&backup, Some((n, &note)));
        if out.status.success() {
            assert!(n > 8, "a domain backup to the vault takes more than {n} durable steps");
            let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            taken.push((b["id"].as_str().unwrap().to_string(), model.writes.len()));
            break;
        }
        assert!(n < 200, "the backup never completes");
        let step = std::fs::read_to_string(&note).unwrap_or_default();
        assert!(out.status.signal().is_some(), "step {n} ({step}): {}", String::from_utf8_lossy(&out.stderr));
        // Writes go on between the crash and the recovery.
        model.write(&vm, "vda", 0x80 + (round % 100) as u8, 24 * MIB + round * 256 * 1024, 64 * 1024);
        if mine.join("journal.json").exists() {
            let refused = knib(&backup, None);
            assert_eq!(refused.status.code(), Some(21), "{}", String::from_utf8_lossy(&refused.stderr));
            let no_vault = knib(&["recover", "--store", &s, "--domain", &name], None);
            assert!(!no_vault.status.success());
            let e = String::from_utf8_lossy(&no_vault.stderr);
            assert!(e.contains(&format!("--vault {loc}")), "{e}");
        }
        let before = check_vault(&p, &loc, &name, false).len();
        let rec = ok_json(&["--json", "recover", "--store", &s, "--domain", &name, "--vault", &loc]);
        let after = check_vault(&p, &loc, &name, true);
        assert_eq!(after.len(), before, "step {n} ({step}): recovery changed the vault's backups");
        if rec["published"] == true {
            let id = rec["backup_id"].as_str().unwrap().to_string();
            assert!(after.iter().any(|b| b["id"] == id.as_str()));
            // Published at its instant: the writes before this round's kill.
            taken.push((id, model.writes.len() - 1));
        }
        for d in vm.disks() {
            assert!(d.backing_chain.len() <= 1, "step {n} ({step}): {:?}", d.chain_files());
        }
        n += 1;
    }
    let out = knib(&["verify", "--store", &loc], None);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    let last = taken.last().unwrap().clone();
    restore_check(&loc, &last.0, &model, last.1, dir.path());
    for (id, k) in &taken[..2] {
        restore_check(&loc, id, &model, *k, dir.path());
    }
    model.assert_vm_reads_everything(&vm);
    // An object of the chain lost from the vault: the next backup does not
    // continue the chain (before, it answered success and could not be
    // restored), and nothing is sent; a full one is taken.
    let lost = p.keys().into_keys().find(|k| k.contains(&last.0) && k.ends_with(".qcow2")).unwrap();
    p.delete(&lost);
    let before = p.keys();
    let out = knib(&backup, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the chain to continue is damaged") && err.contains(&lost), "{err}");
    assert_eq!(p.keys(), before, "a refused backup sent something");
    let mut full = backup.to_vec();
    full.push("--full");
    let b = ok_json(&full);
    assert_eq!(b["kind"], "full", "{b}");
}

#[test]
fn bitmap_backups_of_a_domain_go_straight_to_the_vault_and_survive_a_kill_at_every_step() {
    if skip_without_libvirt("bitmap backups to a vault") || !s3::setup() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let p = s3::Prefix::new("vault-bitmap");
    let loc = p.location();
    let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
    let vm = TestVm::create(
        "knib-vb",
        &disks,
        dir.path(),
        TestVmOptions { running: true, persistent: true, ..Default::default() },
    );
    let name = vm.name().to_string();
    let backup = ["--json", "backup", "--store", &s, "--domain", &name, "--vault", &loc, "--method", "bitmap"];
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x01, 0, 4 * MIB);
    let b1 = ok_json(&backup);
    assert_eq!(b1["kind"], "full", "{b1}");
    let mut head = b1["id"].as_str().unwrap().to_string();
    let mut taken = vec![(head.clone(), model.writes.len())];
    for (i, step) in ["begin", "copy", "publish", "end"].into_iter().enumerate() {
        let i = i as u64 + 1;
        model.write(&vm, "vda", 0x10 + i as u8, i * 4 * MIB, MIB);
        model.write(&vm, "vdb", 0x20 + i as u8, i * MIB, 256 * 1024);
        let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
        let out = c.args(&backup[1..]).env("KNIB_FAULT_AT", step).output().unwrap();
        assert_eq!(out.status.signal(), Some(9), "{step}: {}", String::from_utf8_lossy(&out.stderr));
        model.write(&vm, "vdb", 0x30 + i as u8, 16 * MIB + i * MIB, 128 * 1024);
        let no_vault = knib(&["recover", "--store", &s, "--domain", &name], None);
        assert!(String::from_utf8_lossy(&no_vault.stderr).contains(&format!("--vault {loc}")), "{step}");
        let rec = ok_json(&["--json", "recover", "--store", &s, "--domain", &name, "--vault", &loc]);
        assert_eq!(rec["published"], step == "end", "{step}: {rec}");
        if step == "end" {
            head = rec["backup_id"].as_str().unwrap().to_string();
            taken.push((head.clone(), model.writes.len() - 1));
        }
        let mine: Vec<String> = knib_core::libvirt::backup::checkpoints(&vm.vm)
            .unwrap()
            .into_iter()
            .filter(|c| c.starts_with("knib-"))
            .collect();
        assert_eq!(mine, vec![format!("knib-{head}")], "after {step}");
        check_vault(&p, &loc, &name, true);
    }
    let b = ok_json(&backup);
    assert_eq!((b["kind"].as_str(), b["parent"].as_str()), (Some("incremental"), Some(head.as_str())), "{b}");
    assert!(b["volumes"][0]["size"].as_u64().unwrap() < 16 * MIB, "{b}");
    taken.push((b["id"].as_str().unwrap().to_string(), model.writes.len()));
    // Stopped, the chain goes on from the bitmaps in the disks' files.
    model.write(&vm, "vdb", 0x40, 24 * MIB, MIB);
    vm.power_off();
    let b = ok_json(&backup);
    assert_eq!(b["kind"], "incremental", "{b}");
    taken.push((b["id"].as_str().unwrap().to_string(), model.writes.len()));
    check_vault(&p, &loc, &name, true);
    let out = knib(&["verify", "--store", &loc], None);
    assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    for (id, k) in &taken {
        restore_check(&loc, id, &model, *k, dir.path());
    }
    assert!(!store.join("vms").join(&name).join("bitmap-journal.json").exists());
}
