//! Crash recovery of bitmap backups, for real: `knib backup --domain
//! --method bitmap` is killed with SIGKILL right after it records each step
//! of its journal in turn; `knib recover` must end the backup job, leave
//! exactly one knib checkpoint (the chain head's), no socket or scratch
//! directory and no partial backup, and the next incremental must hold
//! every guest write (one disk is raw: its bitmap is knib's own, and the
//! parent's bitmap must get the interrupted backup's writes back). The
//! same for a stopped domain (persistent bitmaps
//! and qemu-nbd exports): no export outlives knib, and the files keep
//! exactly the head's bitmap.

#![cfg(feature = "libvirt")]

#[path = "../../knib-core/tests/common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::bitmaps::file_bitmaps;
use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::libvirt::backup::{backup_running, checkpoint_name, checkpoints};

fn knib(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_knib"));
    c.args(args);
    match fault {
        Some(step) => c.env("KNIB_FAULT_AT", step),
        None => c.env_remove("KNIB_FAULT_AT"),
    };
    c.output().expect("knib runs")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = knib(args, None);
    assert!(out.status.success(), "knib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn leftovers(store: &Path, vm: &str) -> Vec<String> {
    std::fs::read_dir(store.join("vms").join(vm))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part") || n.ends_with(".nbd") || n.ends_with("journal.json"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_bitmap_backup_killed_at_every_step_is_recovered_with_nothing_lost() {
    if skip_without_libvirt("bitmap crash recovery") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
    // vdb is raw: its bitmap is knib's own, in QEMU's memory.
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let files = [("vda", base.join("crash-vda.qcow2"), "qcow2"), ("vdb", base.join("crash-vdb.raw"), "raw")];
    for ((_, f, fmt), (_, size)) in files.iter().zip(disks) {
        let out =
            Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(f).arg(size.to_string()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let vm = TestVm::create_on(
        "knib-bmcrash",
        &[("vda", files[0].1.clone()), ("vdb", files[1].1.clone())],
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let name = vm.name().to_string();
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x01, 0, 2 * MIB);
    let first = ok_json(&["--json", "backup", "--store", &s, "--domain", &name, "--method", "bitmap"]);
    let mut head = first["id"].as_str().unwrap().to_string();
    for (i, step) in ["begin", "copy", "publish", "end"].into_iter().enumerate() {
        let i = i as u64 + 1;
        model.write(&vm, "vda", 0x10 + i as u8, i * 2 * MIB, MIB);
        model.write(&vm, "vdb", 0x20 + i as u8, i * MIB, 512 * 1024);
        let out = knib(&["backup", "--store", &s, "--domain", &name, "--method", "bitmap"], Some(step));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "knib was to be killed at {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(store.join("vms").join(&name).join("bitmap-journal.json").exists());
        // A backup meanwhile is refused until recovered.
        let refused = knib(&["backup", "--store", &s, "--domain", &name, "--method", "bitmap"], None);
        assert_eq!(refused.status.code(), Some(21), "{}", String::from_utf8_lossy(&refused.stderr));
        // Writes go on between the crash and the recovery.
        model.write(&vm, "vdb", 0x30 + i as u8, 16 * MIB + i * MIB, 256 * 1024);
        let rec = ok_json(&["--json", "recover", "--store", &s, "--domain", &name]);
        let published = step == "end";
        assert_eq!(rec["published"], published, "{rec}");
        if published {
            head = rec["backup_id"].as_str().unwrap().to_string();
        }
        assert!(!backup_running(&vm.vm).unwrap(), "after {step}: a backup job is left");
        let mine: Vec<String> = checkpoints(&vm.vm).unwrap().into_iter().filter(|c| c.starts_with("knib-")).collect();
        assert_eq!(mine, vec![checkpoint_name(&head)], "after {step}");
        let raw: Vec<String> = knib_core::libvirt::backup::bitmaps_of(&vm.vm, &files[1].1)
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .filter(|n| n.starts_with("knib-"))
            .collect();
        assert_eq!(raw, vec![checkpoint_name(&head)], "after {step}: the raw disk's bitmaps");
        assert!(leftovers(&store, &name).is_empty(), "after {step}: {:?}", leftovers(&store, &name));
        for d in vm.disks() {
            assert!(d.backing_chain.is_empty(), "after {step}: {:?}", d.chain_files());
        }
        let out = knib(&["verify", "--store", &s], None);
        assert!(out.status.success(), "verify after {step}: {}", String::from_utf8_lossy(&out.stdout));
        model.assert_vm_reads_everything(&vm);
    }
    // The next backup continues the chain and holds every write; the store
    // is given as a relative path (libvirt takes absolute socket paths
    // only: knib makes the work directory's absolute).
    let out = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(["--json", "backup", "--store", "store", "--domain", &name, "--method", "bitmap"])
        .current_dir(dir.path())
        .env_remove("KNIB_FAULT_AT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["kind"], "incremental", "{b}");
    assert!(b.get("full_reason").is_none() || b["full_reason"].is_null(), "{b}");
    assert_eq!(b["parent"], head.as_str(), "{b}");
    for (t, _) in disks {
        let to = dir.path().join(format!("final-{t}.raw"));
        let out = knib(
            &[
                "restore",
                "--store",
                &s,
                b["id"].as_str().unwrap(),
                "--volume",
                t,
                "--to",
                to.to_str().unwrap(),
                "--format",
                "raw",
            ],
            None,
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        model.assert_restored(t, model.writes.len(), &to, dir.path());
    }
}

#[test]
fn a_bitmap_backup_of_a_stopped_domain_killed_at_every_step_is_recovered_with_nothing_lost() {
    if skip_without_libvirt("bitmap crash recovery of a stopped domain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let disks = [("vda", 64 * MIB), ("vdb", 32 * MIB)];
    let vm = TestVm::define_stopped("knib-bmscrash", &disks, dir.path());
    let name = vm.name().to_string();
    let file = |t: &str| vm.initial_file(t);
    let mut model = Model::new(&disks);
    model.write_file(&file("vda"), "qcow2", "vda", 0x01, 0, 2 * MIB);
    let first = ok_json(&["--json", "backup", "--store", &s, "--domain", &name, "--method", "bitmap"]);
    let mut head = first["id"].as_str().unwrap().to_string();
    for (i, step) in ["begin", "copy", "publish", "end"].into_iter().enumerate() {
        let i = i as u64 + 1;
        model.write_file(&file("vda"), "qcow2", "vda", 0x10 + i as u8, i * 2 * MIB, MIB);
        model.write_file(&file("vdb"), "qcow2", "vdb", 0x20 + i as u8, i * MIB, 512 * 1024);
        let out = knib(&["backup", "--store", &s, "--domain", &name, "--method", "bitmap"], Some(step));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "knib was to be killed at {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let refused = knib(&["backup", "--store", &s, "--domain", &name, "--method", "bitmap"], None);
        assert_eq!(refused.status.code(), Some(21), "{}", String::from_utf8_lossy(&refused.stderr));
        // No export outlives knib: the disks are not held.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let nbd = Command::new("pgrep").args(["-f", &format!("qemu-nbd.*{name}")]).output().unwrap();
        assert!(nbd.stdout.is_empty(), "after {step}: qemu-nbd runs: {}", String::from_utf8_lossy(&nbd.stdout));
        model.write_file(&file("vdb"), "qcow2", "vdb", 0x30 + i as u8, 16 * MIB + i * MIB, 256 * 1024);
        let rec = ok_json(&["--json", "recover", "--store", &s, "--domain", &name]);
        let published = step == "end";
        assert_eq!(rec["published"], published, "{rec}");
        if published {
            head = rec["backup_id"].as_str().unwrap().to_string();
        }
        for (t, _) in disks {
            assert_eq!(file_bitmaps(&file(t)), vec![checkpoint_name(&head)], "after {step}: {t}");
        }
        let mine: Vec<String> = checkpoints(&vm.vm).unwrap().into_iter().filter(|c| c.starts_with("knib-")).collect();
        assert_eq!(mine, vec![checkpoint_name(&head)], "after {step}");
        assert!(leftovers(&store, &name).is_empty(), "after {step}: {:?}", leftovers(&store, &name));
        let out = knib(&["verify", "--store", &s], None);
        assert!(out.status.success(), "verify after {step}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let b = ok_json(&["--json", "backup", "--store", &s, "--domain", &name, "--method", "bitmap"]);
    assert_eq!(b["kind"], "incremental", "{b}");
    assert_eq!(b["parent"], head.as_str(), "{b}");
    for (t, _) in disks {
        let to = dir.path().join(format!("final-{t}.raw"));
        let id = b["id"].as_str().unwrap();
        let out =
            knib(&["restore", "--store", &s, id, "--volume", t, "--to", to.to_str().unwrap(), "--format", "raw"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        model.assert_restored(t, model.writes.len(), &to, dir.path());
    }
    // The domain starts and reads every write.
    vm.boot();
    model.assert_vm_reads_everything(&vm);
}

/// A host crash stops the domain too: a bitmap backup of a running,
/// persistent domain killed after its copy (unpublished) and after its
/// publication, then the domain shut off (`virsh destroy`) before `knib
/// recover`. Recovery must succeed on the stopped domain (libvirt deletes
/// no checkpoint of an inactive domain but by its metadata, and QMP is
/// gone), leave the head's checkpoint alone in libvirt and in the disk's
/// file, and the domain must start again and read every write.
#[test]
fn a_bitmap_backup_of_a_running_domain_recovered_after_the_domain_stopped() {
    if skip_without_libvirt("bitmap crash recovery after the domain stopped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_string();
    let disks = [("vda", 64 * MIB)];
    let vm = TestVm::create(
        "knib-bmdown",
        &disks,
        dir.path(),
        TestVmOptions { persistent: true, running: true, agent_channel: false },
    );
    let name = vm.name().to_string();
    let file = vm.initial_file("vda");
    let mut model = Model::new(&disks);
    model.write(&vm, "vda", 0x01, 0, 2 * MIB);
    let first = ok_json(&["--json", "backup", "--store", &s, "--domain", &name, "--method", "bitmap"]);
    let mut head = first["id"].as_str().unwrap().to_string();
    for (i, step) in ["copy", "end"].into_iter().enumerate() {
        let i = i as u64 + 1;
        model.write(&vm, "vda", 0x10 + i as u8, i * 2 * MIB, MIB);
        let out = knib(&["backup", "--store", &s, "--domain", &name, "--method", "bitmap"], Some(step));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "knib was to be killed at {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        vm.power_off();
        let out = knib(&["--json", "recover", "--store", &s, "--domain", &name], None);
        assert!(
            out.status.success(),
            "recover after {step} on the stopped domain: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rec["published"], step == "end", "{rec}");
        if step == "end" {
            head = rec["backup_id"].as_str().unwrap().to_string();
        }
        let mine: Vec<String> = checkpoints(&vm.vm).unwrap().into_iter().filter(|c| c.starts_with("knib-")).collect();
        assert_eq!(mine, vec![checkpoint_name(&head)], "after {step}");
        assert_eq!(file_bitmaps(&file), vec![checkpoint_name(&head)], "after {step}: the disk's bitmaps");
        assert!(leftovers(&store, &name).is_empty(), "after {step}: {:?}", leftovers(&store, &name));
        let out = knib(&["verify", "--store", &s], None);
        assert!(out.status.success(), "verify after {step}: {}", String::from_utf8_lossy(&out.stdout));
        vm.boot();
        model.assert_vm_reads_everything(&vm);
    }
    // The next backup continues the chain from the head and holds every
    // write: none was lost with the deleted checkpoints.
    model.write(&vm, "vda", 0x40, 40 * MIB, MIB);
    let b = ok_json(&["--json", "backup", "--store", &s, "--domain", &name, "--method", "bitmap"]);
    assert_eq!((b["kind"].as_str(), b["parent"].as_str()), (Some("incremental"), Some(head.as_str())), "{b}");
    let to = dir.path().join("final-vda.raw");
    let id = b["id"].as_str().unwrap();
    let out =
        knib(&["restore", "--store", &s, id, "--volume", "vda", "--to", to.to_str().unwrap(), "--format", "raw"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model.assert_restored("vda", model.writes.len(), &to, dir.path());
}
