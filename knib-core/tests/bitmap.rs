//! Bitmap backups of running libvirt domains (checkpoints, pull-mode backup
//! jobs, NBD), against the real daemon: guest writes before and during each
//! backup, restores compared with a model of every write, the disks' chains
//! never touched, a bitmap removed behind knib's back, a VM restarted
//! between backups, a chain that switches method.

#![cfg(feature = "libvirt")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::bitmaps::knib_checkpoints;
use common::disk::{replace_with_link, while_paused};
use common::model::{image_has, Model, Write};
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::{BackupOptions, Store, VmSettings};
use knib_core::engine::{BackupKind, BackupMethod};
use knib_core::libvirt::backup::checkpoint_name;
use knib_core::libvirt::qemu_monitor_command_qmp;
use knib_core::qemu_img::ImageFormat;
use knib_core::Control;

const DISKS: [(&str, u64); 2] = [("vda", 64 * MIB), ("vdb", 32 * MIB)];

fn bitmap() -> BackupOptions {
    BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() }
}

fn vm(prefix: &str, dir: &std::path::Path, persistent: bool) -> TestVm {
    TestVm::create(prefix, &DISKS, dir, TestVmOptions { persistent, running: true, agent_channel: false })
}

fn restore_all(store: &Store, id: &str, out: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    DISKS
        .iter()
        .map(|(t, _)| {
            let to = out.join(format!("{id}-{t}.raw"));
            store.restore(id, t, &to, ImageFormat::Raw, &Control::new()).unwrap();
            (t.to_string(), to)
        })
        .collect()
}

fn assert_chains_untouched(vm: &TestVm) {
    for d in vm.disks() {
        assert!(d.backing_chain.is_empty(), "disk {} runs on {:?}", d.target, d.chain_files());
        assert_eq!(d.file, vm.initial_file(&d.target));
    }
}

/// Nothing of a backup job is left in the VM's store directory.
fn assert_no_work_dirs(store: &std::path::Path, vm: &str) {
    let left: Vec<_> = std::fs::read_dir(store.join("vms").join(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".nbd") || n.ends_with(".part") || n == "bitmap-journal.json")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Remove dirty bitmap `name` from every node of the domain that has it
/// (behind libvirt's and knib's back).
fn remove_bitmap_behind_knibs_back(vm: &TestVm, name: &str) -> usize {
    let out =
        qemu_monitor_command_qmp(&vm.vm, r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut n = 0;
    for node in v["return"].as_array().unwrap() {
        let has = node["dirty-bitmaps"].as_array().into_iter().flatten().any(|b| b["name"] == name);
        if has {
            let cmd = serde_json::json!({"execute": "block-dirty-bitmap-remove",
                "arguments": {"node": node["node-name"], "name": name}});
            qemu_monitor_command_qmp(&vm.vm, &cmd.to_string()).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn full_then_incrementals_by_bitmap_with_writes_during_each_backup() {
    if skip_without_libvirt("bitmap backups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let vm = Arc::new(vm("knib-bm", dir.path(), false));
    let model = Arc::new(Mutex::new(Model::new(&DISKS)));
    let mut ids: Vec<(String, usize)> = Vec::new();
    for round in 0..3u64 {
        {
            let mut m = model.lock().unwrap();
            m.write(&vm, "vda", 0x10 + round as u8, round * MIB, 256 * 1024);
            m.write(&vm, "vdb", 0x20 + round as u8, round * MIB, 128 * 1024);
            m.write(&vm, "vdb", 0x30 + round as u8, 16 * MIB + round * MIB, 64 * 1024);
        }
        let before = model.lock().unwrap().writes.len();
        // A writer keeps writing 64 KiB blocks while the backup runs.
        let stop = Arc::new(AtomicBool::new(false));
        let concurrent: Arc<Mutex<Vec<Write>>> = Arc::default();
        let writer = {
            let (vm, model, stop, concurrent) = (vm.clone(), model.clone(), stop.clone(), concurrent.clone());
            std::thread::spawn(move || {
                for k in 0..128u64 {
                    if stop.load(Ordering::SeqCst) && k >= 2 {
                        break;
                    }
                    let off = 32 * MIB + (round * 128 + k) * 64 * 1024;
                    model.lock().unwrap().write(&vm, "vda", 0x80 + round as u8, off, 64 * 1024);
                    let w = *model.lock().unwrap().writes.last().unwrap();
                    concurrent.lock().unwrap().push(w);
                }
            })
        };
        while concurrent.lock().unwrap().len() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The last one compressed as it is written.
        let opts = match round {
            2 => BackupOptions { compress: Some(knib_core::qemu_img::CompressionLibrary::Zstd), ..bitmap() },
            _ => bitmap(),
        };
        let m = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
        assert_eq!(m.compression.is_some(), round == 2);
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(m.kind, if round == 0 { BackupKind::Full } else { BackupKind::Incremental });
        assert!(m.full_reason.is_none(), "{:?}", m.full_reason);
        assert!(vm.vm.is_running().unwrap());
        assert_chains_untouched(&vm);
        assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&m.id)], "one checkpoint: the head's");
        assert_no_work_dirs(&store_dir, vm.name());
        let during = concurrent.lock().unwrap().clone();
        let restored = restore_all(&store, &m.id, dir.path());
        let vda = &restored[0].1;
        let present: Vec<bool> = during.iter().map(|w| image_has(vda, w.pattern, w.offset, w.len)).collect();
        let cut = present.iter().position(|p| !p).unwrap_or(present.len());
        assert!(present[cut..].iter().all(|p| !p), "not a point in time: {present:?}");
        let model_now = model.lock().unwrap().clone();
        for (t, file) in &restored {
            model_now.assert_restored(t, before + cut, file, dir.path());
        }
        if round > 0 {
            // An incremental holds the changed clusters only: not round 0's
            // write at offset 0 of vda, which its parent holds.
            let file = store_dir.join("vms").join(vm.name()).join(&m.id).join("vda.qcow2");
            let out = std::process::Command::new("qemu-img")
                .args(["map", "--output=json", "-f", "qcow2"])
                .arg(&file)
                .output()
                .unwrap();
            let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            let own = map.iter().find(|e| e["start"] == 0).unwrap();
            assert!(own["depth"].as_u64() != Some(0) || own["data"] == false, "{own}");
        }
        ids.push((m.id.clone(), before + cut));
    }
    // Every backup still restores to its instant; verify passes on all.
    let model_now = model.lock().unwrap().clone();
    let out = dir.path().join("again");
    std::fs::create_dir(&out).unwrap();
    for (id, n) in &ids {
        for (t, file) in restore_all(&store, id, &out) {
            model_now.assert_restored(&t, *n, &file, dir.path());
        }
    }
    for r in store.verify(None, &Control::new()).unwrap() {
        assert!(r.problems.is_empty(), "{r:?}");
    }
    model_now.assert_vm_reads_everything(&vm);
}

#[test]
fn a_missing_checkpoint_or_bitmap_makes_the_next_backup_full_and_says_why() {
    if skip_without_libvirt("bitmap removed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = vm("knib-bm-gone", dir.path(), false);
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x41, 0, MIB);
    let b1 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    model.write(&vm, "vdb", 0x42, MIB, MIB);
    // The bitmap goes, the checkpoint's record stays.
    assert_eq!(remove_bitmap_behind_knibs_back(&vm, &checkpoint_name(&b1.id)), 2);
    // libvirt cannot delete that checkpoint now, and its error is the one
    // knib reports (knib falls back to deleting the record alone).
    let e = knib_core::libvirt::backup::delete_checkpoint(&vm.vm, &checkpoint_name(&b1.id), false).unwrap_err();
    assert!(e.to_string().contains("not found"), "libvirt's own message: {e}");
    let b2 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b2.kind, BackupKind::Full);
    let why = b2.full_reason.clone().unwrap();
    assert!(why.contains("no dirty bitmap"), "{why}");
    // Said of the VM's bitmaps, not blamed on one disk's delta (the
    // reason names the disk at fault).
    assert!(why.starts_with("cannot tell which backup the disks' changes follow: "), "{why}");
    for (t, f) in restore_all(&store, &b2.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    // The checkpoint goes too (its record): full again, saying so.
    model.write(&vm, "vda", 0x43, 2 * MIB, MIB);
    let out = std::process::Command::new("virsh")
        .args(["-c", common::vm::URI, "checkpoint-delete", vm.name(), &checkpoint_name(&b2.id)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b3 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b3.kind, BackupKind::Full);
    assert!(b3.full_reason.as_deref().unwrap_or("").contains("no knib checkpoint"), "{:?}", b3.full_reason);
    model.write(&vm, "vdb", 0x44, 3 * MIB, MIB);
    let b4 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!((b4.kind, b4.parent.as_deref()), (BackupKind::Incremental, Some(b3.id.as_str())));
    for (t, f) in restore_all(&store, &b4.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    // Deleting the head deletes its checkpoint: the next backup is full,
    // and its checkpoint is the only one left.
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b4.id)]);
    store.delete(&b4.id).unwrap();
    assert!(knib_checkpoints(&vm).is_empty(), "{:?}", knib_checkpoints(&vm));
    for d in vm.disks() {
        assert!(
            !knib_core::libvirt::backup::bitmaps_of(&vm.vm, &d.file)
                .unwrap()
                .iter()
                .any(|b| b.name.starts_with("knib-")),
            "no bitmap of a deleted backup is left on {}",
            d.target
        );
    }
    let b5 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b5.kind, BackupKind::Full, "{:?}", b5.full_reason);
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b5.id)]);
}

#[test]
fn a_restarted_vm_keeps_its_bitmaps_and_a_chain_can_switch_method() {
    if skip_without_libvirt("bitmap restart and switch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let vm = vm("knib-bm-sw", dir.path(), true);
    let mut model = Model::new(&DISKS);
    // Two backups by snapshot, then the VM's setting says bitmap.
    model.write(&vm, "vda", 0x51, 0, MIB);
    let s1 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    model.write(&vm, "vdb", 0x52, MIB, MIB);
    let s2 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!((s1.kind, s2.kind), (BackupKind::Full, BackupKind::Incremental));
    store.set_vm_settings(vm.name(), &VmSettings { backup_method: BackupMethod::Bitmap }).unwrap();
    assert_eq!(store.vm_settings(vm.name()).unwrap().backup_method, BackupMethod::Bitmap);
    model.write(&vm, "vda", 0x53, 2 * MIB, MIB);
    let b1 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!(b1.kind, BackupKind::Full, "a change of method starts a chain");
    assert!(b1.full_reason.is_some());
    let n1 = model.writes.len();
    // The VM is restarted: its qcow2 bitmaps are persistent.
    vm.power_off();
    vm.boot();
    model.write(&vm, "vdb", 0x54, 3 * MIB, MIB);
    let b2 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!(
        (b2.kind, b2.parent.as_deref()),
        (BackupKind::Incremental, Some(b1.id.as_str())),
        "{:?}",
        b2.full_reason
    );
    let n2 = model.writes.len();
    // Back to snapshot: the disks still run on the delta that follows s2
    // (the bitmap backups never touched it), so it continues s2's chain;
    // the bitmap checkpoints go.
    model.write(&vm, "vda", 0x55, 4 * MIB, MIB);
    let opts = BackupOptions { method: Some(BackupMethod::Snapshot), ..Default::default() };
    let s3 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!(
        (s3.kind, s3.parent.as_deref()),
        (BackupKind::Incremental, Some(s2.id.as_str())),
        "{:?}",
        s3.full_reason
    );
    assert!(knib_checkpoints(&vm).is_empty());
    let n3 = model.writes.len();
    for (id, n) in [(&s2.id, 2), (&b1.id, n1), (&b2.id, n2), (&s3.id, n3)] {
        for (t, f) in restore_all(&store, id, dir.path()) {
            model.assert_restored(&t, n, &f, dir.path());
        }
    }
    model.assert_vm_reads_everything(&vm);
}

/// The knib dirty bitmaps of the node of disk `target`'s file, sorted.
fn node_bitmaps(vm: &TestVm, target: &str) -> Vec<String> {
    let d = vm.disk(target);
    let mut b: Vec<String> = knib_core::libvirt::backup::bitmaps_of(&vm.vm, &d.file)
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .filter(|n| n.starts_with("knib-"))
        .collect();
    b.sort();
    b
}

/// A running domain `prefix` whose disk vda is a raw file and vdb a qcow2
/// one, made in `dir`; and vda's file.
fn raw_disk_vm(prefix: &str, dir: &std::path::Path, persistent: bool) -> (TestVm, std::path::PathBuf) {
    let opts = TestVmOptions { persistent, running: true, agent_channel: false };
    let vm = TestVm::create_with_raw(prefix, &DISKS, &["vda"], dir, opts);
    let raw = vm.disk("vda").file.clone();
    (vm, raw)
}

#[test]
fn a_raw_disk_of_a_running_vm_has_incrementals_by_a_bitmap_in_qemus_memory_until_a_restart() {
    if skip_without_libvirt("bitmap raw disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let (vm, raw) = raw_disk_vm("knib-bm-raw", &base, true);
    let store_dir = dir.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let mut model = Model::new(&DISKS);
    let mut taken = Vec::new();
    model.write(&vm, "vda", 0x61, 0, MIB);
    let b1 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b1.kind, BackupKind::Full);
    assert_eq!(node_bitmaps(&vm, "vda"), vec![checkpoint_name(&b1.id)], "a bitmap of knib's own on the raw disk");
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b1.id)]);
    taken.push((b1.id.clone(), model.writes.len()));

    // Incrementals: the raw disk's changes only, with the guest writing to
    // it while the backup runs.
    for round in 0..2u64 {
        model.write(&vm, "vdb", 0x62 + round as u8, MIB + round * MIB, MIB);
        model.write(&vm, "vda", 0x64 + round as u8, 4 * MIB + round * MIB, MIB);
        let n = model.writes.len();
        let during = std::thread::scope(|s| {
            let w = s.spawn(|| {
                // Written while the backup runs: the backup may or may not
                // hold it, but the next one must.
                vm.write("vda", 0x70 + round as u8, 40 * MIB + round * MIB, 256 * 1024);
            });
            let m = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
            w.join().unwrap();
            m
        });
        model.writes.push(common::model::Write {
            disk: 0,
            offset: 40 * MIB + round * MIB,
            len: 256 * 1024,
            pattern: 0x70 + round as u8,
        });
        assert_eq!(during.kind, BackupKind::Incremental, "{:?}", during.full_reason);
        let vda = store_dir.join("vms").join(vm.name()).join(&during.id).join("vda.qcow2");
        let size = std::fs::metadata(&vda).unwrap().len();
        assert!(size < 8 * MIB, "the raw disk's incremental holds its changes only: {size} bytes");
        assert_eq!(node_bitmaps(&vm, "vda"), vec![checkpoint_name(&during.id)], "the older bitmap goes");
        // Restored: every write before the backup, and the concurrent one
        // either whole or not at all.
        let to = dir.path().join(format!("{}-vda.raw", during.id));
        store.restore(&during.id, "vda", &to, ImageFormat::Raw, &Control::new()).unwrap();
        let w = *model.writes.last().unwrap();
        let k = if image_has(&to, w.pattern, w.offset, w.len) { n + 1 } else { n };
        model.assert_restored("vda", k, &to, dir.path());
        taken.push((during.id.clone(), k));
    }

    // A restart loses the raw disk's bitmap: the next backup is full and
    // says why; the one after is an incremental again.
    vm.power_off();
    vm.boot();
    model.write(&vm, "vda", 0x68, 8 * MIB, MIB);
    let b4 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b4.kind, BackupKind::Full);
    let why = b4.full_reason.clone().unwrap_or_default();
    assert!(why.contains("vda") && why.contains("QEMU's memory only"), "{why}");
    taken.push((b4.id.clone(), model.writes.len()));
    model.write(&vm, "vda", 0x69, 9 * MIB, MIB);
    let b5 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    assert_eq!(b5.kind, BackupKind::Incremental, "{:?}", b5.full_reason);
    taken.push((b5.id.clone(), model.writes.len()));
    let out = dir.path().join("all");
    std::fs::create_dir(&out).unwrap();
    for (id, n) in &taken {
        for (t, f) in restore_all(&store, id, &out) {
            model.assert_restored(&t, *n, &f, dir.path());
        }
    }
    // Deleting the head removes its raw bitmap too.
    store.delete(&b5.id).unwrap();
    assert!(node_bitmaps(&vm, "vda").is_empty(), "{:?}", node_bitmaps(&vm, "vda"));
    assert!(knib_checkpoints(&vm).is_empty());
    assert_eq!(vm.disk("vda").file, raw);
    model.assert_vm_reads_everything(&vm);
}

#[test]
fn the_backup_method_is_a_setting_of_each_vm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    assert_eq!(store.vm_settings("web").unwrap().backup_method, BackupMethod::Snapshot);
    store.set_vm_settings("web", &VmSettings { backup_method: BackupMethod::Bitmap }).unwrap();
    assert_eq!(store.vm_settings("web").unwrap().backup_method, BackupMethod::Bitmap);
    assert_eq!(store.vm_settings("db").unwrap().backup_method, BackupMethod::Snapshot);
    // Through the JSON API: read, set, read back.
    let call = |req: serde_json::Value| {
        knib_core::api::call("vm.settings", &req.to_string(), &Control::new())
            .map(|a| serde_json::from_str::<serde_json::Value>(&a).unwrap())
    };
    let s = root.to_str().unwrap();
    assert_eq!(call(serde_json::json!({"store": s, "vm": "web"})).unwrap()["backup_method"], "bitmap");
    let set = call(serde_json::json!({"store": s, "vm": "db", "backup_method": "bitmap"})).unwrap();
    assert_eq!(set["backup_method"], "bitmap");
    assert_eq!(store.vm_settings("db").unwrap().backup_method, BackupMethod::Bitmap);
    let bad = call(serde_json::json!({"store": s, "vm": "db", "backup_method": "push"})).unwrap_err();
    assert_eq!(bad.kind, knib_core::ErrorKind::InvalidInput, "{bad:?}");
    // A settings file with an unknown key is refused, naming it.
    std::fs::write(root.join("vms/web/settings.json"), r#"{"schema": 1, "backup_methd": "bitmap"}"#).unwrap();
    let e = store.vm_settings("web").unwrap_err();
    assert!(e.message.contains("backup_methd"), "{e:?}");
}

#[test]
fn end_of_chain_and_isolated_bitmap_backups_keep_the_checkpoints_in_step() {
    if skip_without_libvirt("bitmap end of chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = vm("knib-bm-eoc", dir.path(), false);
    let mut model = Model::new(&DISKS);
    let opts = BackupOptions { chain_size: 2, ..bitmap() };
    model.write(&vm, "vda", 0x71, 0, MIB);
    let b1 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b1.id)]);
    // An isolated backup: no checkpoint of its own, the head's stays.
    model.write(&vm, "vdb", 0x72, MIB, MIB);
    let iso =
        store.backup_domain(&vm.vm, &BackupOptions { isolated: true, ..opts.clone() }, false, &Control::new()).unwrap();
    assert_eq!(iso.kind, BackupKind::Isolated);
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b1.id)]);
    for (t, f) in restore_all(&store, &iso.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    // The chain goes on from b1, holding what the isolated one saw too.
    model.write(&vm, "vda", 0x73, 2 * MIB, MIB);
    let b2 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!((b2.kind, b2.parent.as_deref(), b2.end_of_chain), (BackupKind::Incremental, Some(b1.id.as_str()), true));
    assert!(knib_checkpoints(&vm).is_empty(), "the end of a chain leaves no checkpoint");
    for (t, f) in restore_all(&store, &b2.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    let b3 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!((b3.kind, b3.full_reason.as_deref()), (BackupKind::Full, None));
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b3.id)]);
    assert_chains_untouched(&vm);
}

/// A raw disk's writes made while an incremental that ends its chain runs
/// are in the next incremental when that backup fails (cancelled midway,
/// the guest writing meanwhile): the parent's bitmap stops recording when
/// the job starts, and a bitmap of the backup's own takes the writes from
/// then, merged back into the parent's when the backup is undone. Before,
/// such a backup (it keeps no checkpoint) added no bitmap of its own: the
/// writes from the job's start to the undo were tracked nowhere, and the
/// next incremental since the parent missed them.
#[test]
fn a_failed_end_of_chain_incremental_loses_no_write_of_a_raw_disk() {
    if skip_without_libvirt("bitmap raw end of chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let (vm, _) = raw_disk_vm("knib-bm-rawfail", &base, false);
    let store_dir = base.join("store");
    let store = Store::create(&store_dir).unwrap();
    let opts = BackupOptions { chain_size: 2, ..bitmap() };
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x41, 0, MIB);
    let b1 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!(b1.kind, BackupKind::Full);
    model.write(&vm, "vda", 0x42, 2 * MIB, MIB);
    // The next is the chain's last; it is cancelled while its first copy
    // starts, after the guest wrote to the raw disk under the running job.
    let cancel = knib_core::progress::CancelToken::new();
    let at = format!("creating {}", store_dir.display());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(3));
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(
                knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)),
                "no pause at {at}"
            );
            vm.write("vda", 0x43, 5 * MIB, MIB);
            cancel.cancel();
        });
        store.backup_domain(&vm.vm, &opts, false, &Control::new().with_cancel(cancel.clone())).unwrap_err()
    });
    assert_eq!(e.kind, knib_core::ErrorKind::Cancelled, "{e}");
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    model.writes.push(Write { disk: 0, offset: 5 * MIB, len: MIB, pattern: 0x43 });
    assert!(store.list(None).unwrap().iter().all(|m| m.id == b1.id), "the failed backup is not in the store");
    // The chain's last, since b1, holds every write.
    let b2 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!((b2.kind, b2.parent.as_deref(), b2.end_of_chain), (BackupKind::Incremental, Some(b1.id.as_str()), true));
    for (t, f) in restore_all(&store, &b2.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    assert!(node_bitmaps(&vm, "vda").is_empty(), "{:?}", node_bitmaps(&vm, "vda"));
}

/// A link (symbolic, or hard to a file outside the store) swapped in under
/// a bitmap backup's temporary name once it is created is never renamed
/// into the store: the backup fails as corrupt, naming the name, the linked
/// file is as it was, nothing of the backup is left, and the next backup
/// restores every write. Before, the name was renamed into the store
/// without a look at what it led to.
#[test]
fn a_bitmap_backups_temporary_swapped_for_a_link_is_not_kept() {
    if skip_without_libvirt("bitmap temporary swapped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let vm = vm("knib-bm-swap", &base, false);
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x51, 0, MIB);
    let victim = base.join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    // The first disk's copy once its temporary is created, in a store of
    // its own each time (a pause that began is remembered by its name, by
    // every test of this binary).
    for hard in [false, true] {
        let store_dir = base.join(format!("store-{hard}"));
        let store = Store::create(&store_dir).unwrap();
        let at = format!("creating {}", store_dir.display());
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                while_paused(&at, || {
                    let mut parts = vec![];
                    let mut dirs = vec![store_dir.clone()];
                    while let Some(d) = dirs.pop() {
                        for e in std::fs::read_dir(&d).unwrap().flatten() {
                            let p = e.path();
                            if e.file_type().unwrap().is_dir() {
                                dirs.push(p);
                            } else if p.to_string_lossy().ends_with(".vda.qcow2.part") {
                                parts.push(p);
                            }
                        }
                    }
                    assert_eq!(parts.len(), 1, "{parts:?}");
                    replace_with_link(&parts[0], &victim, hard);
                })
            });
            store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap_err()
        });
        assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "hard {hard}: {e}");
        assert!(e.message.contains(".part was replaced while knib wrote it"), "hard {hard}: {e}");
        assert_eq!(e.vm_consistent, Some(true), "{e}");
        let v = std::fs::read(&victim).unwrap();
        assert!(v == b"not knib's", "hard {hard}: the linked file was written ({} bytes)", v.len());
        assert!(store.list(None).unwrap().is_empty(), "hard {hard}: a failed backup is in the store");
        assert_no_work_dirs(&store_dir, vm.vm.name());
    }
    let store = Store::create(base.join("store")).unwrap();
    model.write(&vm, "vdb", 0x52, MIB, MIB);
    let b = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    for (t, f) in restore_all(&store, &b.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    assert_chains_untouched(&vm);
}

/// A bitmap journal whose `since` names a checkpoint that is not knib's (a
/// bitmap of another tool, which the recovery would turn back on and merge
/// into) is refused, naming it, and the journal is left as it was.
#[test]
fn a_journal_following_a_checkpoint_not_of_knib_is_refused() {
    if skip_without_libvirt("bitmap journal since") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let vm = TestVm::create(
        "knib-bm-since",
        &DISKS,
        &base,
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let store_dir = base.join("store");
    let store = Store::create(&store_dir).unwrap();
    store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
    // The journal of an incremental, taken while it runs.
    let journal = store_dir.join("vms").join(vm.vm.name()).join("bitmap-journal.json");
    let at = format!("creating {}", store_dir.display());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(2));
    let text = std::thread::scope(|s| {
        let copy = s.spawn(|| {
            assert!(
                knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)),
                "no pause at {at}"
            );
            std::fs::read(&journal).unwrap()
        });
        let b2 = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap();
        assert_eq!(b2.kind, BackupKind::Incremental);
        copy.join().unwrap()
    });
    let mut j: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert!(j["plan"]["since"].as_str().is_some_and(|s| s.starts_with("knib-")), "{j}");
    for since in ["other-tool-bitmap", "knib-../x", "knib-"] {
        j["plan"]["since"] = since.into();
        let written = j.to_string();
        std::fs::write(&journal, &written).unwrap();
        let e = store.recover_domain(&vm.vm, &Control::new()).unwrap_err();
        assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "{since}: {e}");
        assert!(e.message.contains(&format!("the checkpoint followed, {since:?}, is not one of knib's")), "{e}");
        assert_eq!(std::fs::read_to_string(&journal).unwrap(), written, "the journal changed");
    }
    std::fs::remove_file(&journal).unwrap();
}

/// A store whose path leaves no room for the NBD socket of a bitmap
/// backup (a UNIX socket path has at most 107 bytes) is refused before
/// anything is made: InvalidInput, naming the socket path; no work
/// directory is left in the store (nothing would sweep it), no journal,
/// no backup.
#[test]
fn a_store_too_deep_for_the_nbd_socket_is_refused_leaving_nothing() {
    if skip_without_libvirt("a_store_too_deep_for_the_nbd_socket_is_refused_leaving_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = vm("knib-bmdeep", dir.path(), false);
    let store = Store::create(dir.path().join("s".repeat(100))).unwrap();
    let e = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("is longer than a UNIX socket path may be (107 bytes)"), "{e}");
    let vm_dir = store.root().join("vms").join(vm.name());
    let left: Vec<String> = std::fs::read_dir(&vm_dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|n| n == ".lock"), "left in {}: {left:?}", vm_dir.display());
    assert!(store.list(None).unwrap().is_empty());
}
