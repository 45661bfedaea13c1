//! Crash recovery, for real: the `knib backup --domain` process is killed
//! with SIGKILL right after it records each step of its journal in turn, and
//! `knib recover` must leave the running VM on `base <- one delta` with every
//! guest write readable and the store without a partial backup.

#![cfg(feature = "libvirt")]

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};

fn knib(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args);
    match fault {
        Some(step) => c.env("KNIB_FAULT_AT", step),
        None => c.env_remove("KNIB_FAULT_AT"),
    };
    c.output().expect("knib runs")
}

fn backups(store: &Path) -> Vec<serde_json::Value> {
    let out = knib(&["--json", "list", "--store", store.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn leftovers(store: &Path, vm: &str) -> Vec<String> {
    let dir = store.join("vms").join(vm);
    std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part") || n.ends_with(".deleting") || n == "journal.json")
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_at_every_journal_step_then_recovered_with_nothing_lost() {
    if skip_without_libvirt("crash recovery") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
    let vm = TestVm::create(
        "knib-crash",
        &disks,
        dir.path(),
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let name = vm.name().to_string();
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x01, 0, 2 * MIB);
    let out = knib(&["backup", "--store", &s, "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut killed_at = Vec::new();
    for (i, step) in ["snapshot", "copy", "publish", "merge", "pivot"].into_iter().enumerate() {
        let i = i as u64 + 1;
        model.write(&vm, "vda", 0x10 + i as u8, i * 2 * MIB, MIB);
        model.write(&vm, "vdb", 0x20 + i as u8, i * MIB, 512 * 1024);
        let count_before = backups(&store).len();
        // The pivot step is taken only at the end of a chain.
        let chain = if step == "pivot" { "1" } else { "8" };
        let out = knib(&["backup", "--store", &s, "--domain", &name, "--chain-size", chain], Some(step));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "knib was to be killed at {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        killed_at.push(step);
        assert!(store.join("vms").join(&name).join("journal.json").exists());
        // A mistyped store is not found: nothing is made there, and the
        // interrupted backup is not answered as in order.
        let typo = dir.path().join("stor");
        let out = knib(&["recover", "--store", typo.to_str().unwrap(), "--domain", &name], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("knib: not found: ") && err.contains("does not exist"), "{err}");
        assert!(!typo.exists(), "recover made {}", typo.display());
        // Writes go on between the crash and the recovery.
        model.write(&vm, "vdb", 0x30 + i as u8, 16 * MIB + i * MIB, 256 * 1024);
        let out = knib(&["--json", "recover", "--store", &s, "--domain", &name], None);
        assert!(out.status.success(), "recover after {step}: {}", String::from_utf8_lossy(&out.stderr));
        let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rec["step"], step);
        let published = matches!(step, "merge" | "pivot");
        assert_eq!(rec["published"], published, "{rec}");
        assert!(vm.vm.is_running().unwrap());
        for d in vm.disks() {
            assert!(d.backing_chain.len() <= 1, "after {step}, {} runs on {:?}", d.target, d.chain_files());
            if d.backing_chain.len() == 1 {
                assert!(d.file.to_string_lossy().contains(".knib-delta-"));
            }
            assert_eq!(*d.chain_files().last().unwrap(), vm.initial_file(&d.target));
        }
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(".knib-delta-"))
            .filter(|p| !vm.disks().iter().any(|d| d.chain_files().contains(&p.as_path())))
            .collect();
        assert!(stray.is_empty(), "after {step}: delta files out of every chain: {stray:?}");
        assert!(leftovers(&store, &name).is_empty(), "after {step}: {:?}", leftovers(&store, &name));
        assert_eq!(backups(&store).len(), count_before + published as usize);
        model.assert_vm_reads_everything(&vm);
        let out = knib(&["verify", "--store", &s], None);
        assert!(out.status.success(), "verify after {step}: {}", String::from_utf8_lossy(&out.stdout));
    }
    eprintln!("killed at: {}", killed_at.join(", "));
    assert_eq!(killed_at, ["snapshot", "copy", "publish", "merge", "pivot"]);
    // A normal backup afterwards holds every write.
    let out = knib(&["--json", "backup", "--store", &s, "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (t, _) in disks {
        assert_restores_every_write(&s, &b, t, &dir.path().join(format!("final-{t}.raw")), &model, dir.path());
    }
}

#[test]
fn a_backup_killed_in_a_store_named_by_a_relative_path_is_recovered_from_anywhere() {
    if skip_without_libvirt("crash recovery, relative store path") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disks = [("vda", 32 * MIB)];
    let vm = TestVm::create(
        "knib-crash-rel",
        &disks,
        dir.path(),
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let name = vm.name().to_string();
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x41, 0, 2 * MIB);
    // `--store ./x/../store`, from the test's directory.
    let in_dir = |args: &[&str], fault: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
        c.current_dir(dir.path()).args(args);
        match fault {
            Some(step) => c.env("KNIB_FAULT_AT", step),
            None => c.env_remove("KNIB_FAULT_AT"),
        };
        c.output().expect("knib runs")
    };
    std::fs::create_dir(dir.path().join("x")).unwrap();
    let out = in_dir(&["backup", "--store", "./x/../store", "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model.write(&vm, "vda", 0x42, 4 * MIB, MIB);
    let out = in_dir(&["backup", "--store", "store", "--domain", &name], Some("copy"));
    assert_eq!(out.status.signal(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    // Recovered from another directory, the store named by its absolute
    // path (before, the journal held paths relative to where the backup
    // ran, and recover refused it as corrupt whatever the spelling).
    let store = dir.path().join("store");
    let out = knib(&["--json", "recover", "--store", store.to_str().unwrap(), "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["step"], "copy", "{rec}");
    assert!(leftovers(&store, &name).is_empty(), "{:?}", leftovers(&store, &name));
    model.assert_vm_reads_everything(&vm);
    let out = knib(&["backup", "--store", store.to_str().unwrap(), "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A backup killed before it was published, whose domain's disk was then
/// flattened by hand (`virsh blockpull`): `recover` cannot tell what to
/// merge and refuses, naming `--discard`; every backup is refused.
/// `recover --discard` sets the journal aside in the store (kept as it
/// was), leaves every file outside the store as it was, and the next
/// backup runs and holds every write.
#[test]
fn an_interrupted_backup_recover_cannot_follow_is_discarded_leaving_the_disks_alone() {
    if skip_without_libvirt("recover --discard") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let disks = [("vda", 32 * MIB)];
    let vm = TestVm::create(
        "knib-discard",
        &disks,
        dir.path(),
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let name = vm.name().to_string();
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x41, 0, 2 * MIB);
    let out = knib(&["backup", "--store", &s, "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model.write(&vm, "vda", 0x42, 4 * MIB, MIB);
    let out = knib(&["backup", "--store", &s, "--domain", &name], Some("publish"));
    assert_eq!(out.status.signal(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    let journal = store.join("vms").join(&name).join("journal.json");
    let recorded = std::fs::read(&journal).unwrap();
    let id = serde_json::from_slice::<serde_json::Value>(&recorded).unwrap()["plan"]["backup_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The operator flattens the disk: the journal's plan no longer matches.
    let out =
        Command::new("virsh").args(["-c", common::vm::URI, "blockpull", &name, "vda", "--wait"]).output().unwrap();
    assert!(out.status.success(), "virsh blockpull: {}", String::from_utf8_lossy(&out.stderr));
    model.write(&vm, "vda", 0x43, 8 * MIB, MIB);
    let out = knib(&["recover", "--store", &s, "--domain", &name], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(20), "{err}");
    assert!(err.contains("recover --discard"), "{err}");
    let out = knib(&["backup", "--store", &s, "--domain", &name], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("recover --discard"), "{err}");

    let before = files_outside(dir.path(), &store);
    let out = knib(&["--json", "recover", "--store", &s, "--domain", &name, "--discard"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let j = &d["discarded"][0];
    assert_eq!(d["discarded"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(j["backup_id"], id.as_str(), "{d}");
    assert_eq!(j["step"], "publish", "{d}");
    assert_eq!(j["published"], false, "{d}");
    assert!(j["left"][0].as_str().unwrap().starts_with("disk vda may still run on"), "{d}");
    let kept = std::path::PathBuf::from(j["kept_as"].as_str().unwrap());
    assert_eq!(kept.parent().unwrap(), store.join("vms").join(&name));
    assert_eq!(std::fs::read(&kept).unwrap(), recorded, "the journal was not kept as it was");
    assert!(!journal.exists());
    assert_eq!(files_outside(dir.path(), &store), before, "a file outside the store changed");
    assert!(leftovers(&store, &name).is_empty(), "{:?}", leftovers(&store, &name));
    assert_eq!(backups(&store).len(), 1);
    let out = knib(&["--json", "recover", "--store", &s, "--domain", &name, "--discard"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["discarded"], serde_json::json!([]), "{d}");

    // Backups run again, and hold every write.
    model.write(&vm, "vda", 0x44, 12 * MIB, MIB);
    let out = knib(&["--json", "backup", "--store", &s, "--domain", &name], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The disk runs on no delta since: the backup is full, and says why.
    assert_eq!(b["kind"], "full", "{b}");
    assert!(b["full_reason"].as_str().is_some_and(|r| r.contains("vda")), "{b}");
    assert_restores_every_write(&s, &b, "vda", &dir.path().join("after-discard.raw"), &model, dir.path());
    let out = knib(&["verify", "--store", &s], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Every regular file under `dir` but those under `store`, with a digest
/// of its bytes.
fn files_outside(dir: &Path, store: &Path) -> Vec<(std::path::PathBuf, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let (p, t) = (e.path(), e.file_type().unwrap());
        if p == store {
            continue;
        }
        if t.is_dir() {
            out.extend(files_outside(&p, store));
        } else if t.is_file() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            out.push((p, h.finish()));
        }
    }
    out.sort();
    out
}

/// Volume `volume` of backup `b` of store `store`, restored to raw at `to`,
/// holds every write `model` recorded.
fn assert_restores_every_write(store: &str, b: &serde_json::Value, volume: &str, to: &Path, model: &Model, dir: &Path) {
    let id = b["id"].as_str().unwrap();
    let out = knib(
        &["restore", "--store", store, id, "--volume", volume, "--to", to.to_str().unwrap(), "--format", "raw"],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model.assert_restored(volume, model.writes.len(), to, dir);
}
