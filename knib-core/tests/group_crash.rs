//! A group backup of two running domains killed before each of its durable
//! steps (`KNIB_TEST_CRASH_AT=N`, a child process), then `group.recover`:
//! every VM runs on its base or its base and one delta with every write it
//! made, no journal is left, the group's record (when there is one) names
//! only published backups, each restoring to the VM at the group's instant;
//! with `on_failure: "rollback"` either every member or none of the crashed
//! group is left in the store; and the next group backup works.

#![cfg(feature = "libvirt")]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::Store;
use knib_core::crashpoint::{CRASH_BEFORE_ENV, CRASH_ENV, NOTE_ENV};
use knib_core::qemu_img::ImageFormat;
use knib_core::Control;
use serde_json::{json, Value};

const DISKS: [(&str, u64); 2] = [("vda", 16 * MIB), ("vdb", 8 * MIB)];
const CHILD_ENV: &str = "KNIB_GROUP_CHILD_REQUEST";

/// Run in the child process: the group backup the parent asks for.
#[test]
fn child_group_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    if let Err(e) = knib_core::api::call("group.backup", &req, &Control::new()) {
        panic!("the group backup failed: {e}");
    }
}

fn call(op: &str, req: &Value) -> Value {
    let a = knib_core::api::call(op, &req.to_string(), &Control::new()).unwrap_or_else(|e| panic!("{op}: {e}"));
    serde_json::from_str(&a).unwrap()
}

/// Each disk runs on its base, or on its base and one delta.
fn assert_consistent(vm: &TestVm, step: &str) {
    for d in vm.disks() {
        let chain = d.chain_files();
        assert!(chain.len() <= 2, "{step}: disk {} of {} runs on {chain:?}", d.target, vm.name());
        assert_eq!(chain.last().unwrap(), &vm.initial_file(&d.target).as_path(), "{step}");
    }
}

fn backups(store: &Store) -> BTreeSet<String> {
    store.list(None).map(|l| l.into_iter().map(|m| m.id).collect()).unwrap_or_default()
}

#[test]
fn a_group_backup_killed_at_every_step_is_recovered() {
    if std::env::var(CHILD_ENV).is_ok() || skip_without_libvirt("group crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let opts = TestVmOptions { persistent: false, running: true, agent_channel: false };
    let vms = [
        TestVm::create("knib-gcrash-a", &DISKS, dir.path(), opts),
        TestVm::create("knib-gcrash-b", &DISKS, dir.path(), opts),
    ];
    let mut models = [Model::new(&DISKS), Model::new(&DISKS)];
    let mut n = 1u32;
    loop {
        for (k, (vm, m)) in vms.iter().zip(&mut models).enumerate() {
            let target = if n.is_multiple_of(2) { "vda" } else { "vdb" };
            m.write(vm, target, (n % 200) as u8 + 1 + k as u8, n as u64 * 64 * 1024, 64 * 1024);
        }
        let at: Vec<usize> = models.iter().map(|m| m.writes.len()).collect();
        let rollback = n.is_multiple_of(2);
        let req = json!({
            "store": root,
            "members": [{"domain": vms[0].name()}, {"domain": vms[1].name()}],
            "on_failure": if rollback { "rollback" } else { "keep" },
        });
        let before = backups(&store);
        let note = dir.path().join("note");
        let _ = std::fs::remove_file(&note);
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_group_backup", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, req.to_string())
            .env(CRASH_ENV, n.to_string())
            .env(NOTE_ENV, &note)
            .output()
            .unwrap();
        let step = std::fs::read_to_string(&note).unwrap_or_default();
        let crashed = !out.status.success();
        if !crashed || step.is_empty() {
            assert!(
                !crashed,
                "step {n}: the child failed without the crash hook: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(n > 10, "the group backup has more than {n} durable steps");
            break;
        }
        // Killed before the store existed: there is nothing to recover.
        let recovered = if root.exists() { call("group.recover", &json!({"store": root})) } else { json!([]) };
        let step = format!("crash before step {}", step.trim());
        for (vm, m) in vms.iter().zip(&models) {
            assert_consistent(vm, &step);
            m.assert_vm_reads_everything(vm);
            assert!(
                !root.join("vms").join(vm.name()).join("journal.json").exists(),
                "{step}: a member's journal is left"
            );
        }
        let left: Vec<String> = std::fs::read_dir(root.join("groups"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{step}: {left:?} left");
        let new: BTreeSet<String> = backups(&store).difference(&before).cloned().collect();
        let rec = recovered.as_array().unwrap().first().cloned();
        let in_record: BTreeSet<String> = rec
            .iter()
            .flat_map(|r| {
                r["members"].as_array().unwrap().iter().filter_map(|m| m["backup"].as_str().map(str::to_string))
            })
            .collect();
        // A crash after the record was written leaves nothing to recover:
        // the record is the newest group then.
        let newest = store.groups().unwrap().last().cloned();
        let recorded: BTreeSet<String> = match (&rec, &newest) {
            (Some(_), _) => in_record.clone(),
            (None, Some(g)) if !new.is_empty() => g.members.iter().filter_map(|m| m.backup.clone()).collect(),
            _ => BTreeSet::new(),
        };
        assert_eq!(new, recorded, "{step}: the crashed group's published backups are its record's ({recovered})");
        if rollback {
            assert!(new.is_empty() || new.len() == 2, "{step}: rollback left {new:?}");
        }
        // Each backup left is the VM at the group's instant.
        for id in &new {
            let man = store.show(id).unwrap();
            let k = vms.iter().position(|v| v.name() == man.vm).unwrap();
            for v in &man.volumes {
                let to = dir.path().join(format!("r-{n}-{}-{}.raw", man.vm, v.name));
                store.restore(id, &v.name, &to, ImageFormat::Raw, &Control::new()).unwrap();
                models[k].assert_restored(&v.name, at[k], &to, dir.path());
                std::fs::remove_file(&to).unwrap();
            }
        }
        eprintln!("{step}: recovered, {} backups kept", new.len());
        n += 1;
    }
    // The next group backup, uninterrupted, holds every write.
    let rec = call(
        "group.backup",
        &json!({"store": root, "members": [{"domain": vms[0].name()}, {"domain": vms[1].name()}]}),
    );
    assert_eq!(rec["state"], "complete");
    let out = dir.path().join("final");
    let restored = store
        .restore_group(rec["id"].as_str().unwrap(), &out, ImageFormat::Raw, false, true, false, &Control::new())
        .unwrap()
        .0;
    for r in &restored {
        let k = vms.iter().position(|v| v.name() == r.vm).unwrap();
        models[k].assert_restored(&r.volume, models[k].writes.len(), &r.path, Path::new(dir.path()));
    }
}

/// A group backup killed after its record was written and before its
/// journal was removed (the child stopped before that removal), one
/// member's backup then deleted (as retention would), then `group.recover`:
/// with "rollback" and with "keep" the record is left as it was, the other
/// member's backup is kept, and the journal is gone. Before, recovery
/// replayed the journal of the finished group: with "rollback" it deleted
/// the other member's backup, with "keep" it rewrote the record.
#[test]
fn a_group_killed_after_its_record_is_written_is_left_as_recorded() {
    if std::env::var(CHILD_ENV).is_ok() || skip_without_libvirt("group crash after the record") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let opts = TestVmOptions { persistent: false, running: true, agent_channel: false };
    let vms = [
        TestVm::create("knib-gfinished-a", &DISKS, dir.path(), opts),
        TestVm::create("knib-gfinished-b", &DISKS, dir.path(), opts),
    ];
    let groups = root.join("groups");
    let dotfiles = || -> Vec<String> {
        std::fs::read_dir(&groups)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    };
    for on_failure in ["rollback", "keep"] {
        let req = json!({
            "store": root,
            "members": [{"domain": vms[0].name()}, {"domain": vms[1].name()}],
            "on_failure": on_failure,
        });
        let note = dir.path().join("note");
        let _ = std::fs::remove_file(&note);
        // The first removal of a group's file named `.group-…` in a group
        // backup that succeeds: its journal's, right after its record.
        let at = format!("remove {}", groups.join(".group-").display());
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_group_backup", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, req.to_string())
            .env(CRASH_BEFORE_ENV, &at)
            .env(NOTE_ENV, &note)
            .output()
            .unwrap();
        let step = std::fs::read_to_string(&note).unwrap_or_default();
        assert!(
            !out.status.success() && step.trim_end().ends_with(".journal.json"),
            "{on_failure}: the child was not stopped before removing the journal ({step:?}): {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let journal = dotfiles().into_iter().find(|n| n.ends_with(".journal.json")).expect("the journal is left");
        let id = journal.strip_prefix('.').unwrap().strip_suffix(".journal.json").unwrap().to_string();
        let record = groups.join(format!("{id}.json"));
        let text = std::fs::read(&record).expect("the record is written");
        let rec = store.group(&id).unwrap();
        assert_eq!(rec.state, "complete", "{on_failure}: {rec:#?}");
        let ids: Vec<String> = rec.members.iter().map(|m| m.backup.clone().unwrap()).collect();
        // One member's backup deleted, as retention deletes it.
        store.delete(&ids[0]).unwrap();
        let recovered = call("group.recover", &json!({"store": root}));
        assert_eq!(recovered, json!([]), "{on_failure}: a finished group was recovered again");
        assert_eq!(std::fs::read(&record).unwrap(), text, "{on_failure}: the record was rewritten");
        store.show(&ids[1]).unwrap_or_else(|e| panic!("{on_failure}: the other member's backup was deleted: {e}"));
        assert_eq!(store.show(&ids[0]).unwrap_err().kind, knib_core::ErrorKind::NotFound);
        assert!(dotfiles().is_empty(), "{on_failure}: {:?} left", dotfiles());
        for vm in &vms {
            assert_consistent(vm, on_failure);
        }
    }
}
