//! Bitmap backups of stopped libvirt domains: persistent dirty bitmaps in
//! the disks' qcow2 files, read through `qemu-nbd`, against the real
//! qemu-img, qemu-nbd, libvirtd and QEMU. Writes are made to the files
//! while the domain is stopped and by the guest while it runs; each restore
//! is compared with a model of every write; the chain goes on across stops
//! and starts; a removed, an inconsistent (`in-use`) bitmap and a raw disk
//! make the next backup full and say why.

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::bitmaps::{file_bitmaps, knib_checkpoints};
use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::{BackupOptions, Manifest, Store};
use knib_core::engine::{BackupKind, BackupMethod};
use knib_core::libvirt::backup::checkpoint_name;
use knib_core::qemu_img::{ImageFormat, QemuImg};
use knib_core::Control;

const DISKS: [(&str, u64); 2] = [("vda", 64 * MIB), ("vdb", 32 * MIB)];

fn bitmap() -> BackupOptions {
    BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() }
}

fn backup(store: &Store, vm: &TestVm) -> Manifest {
    store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap()
}

/// Nothing of a backup is left: no work directory, journal or part in the
/// VM's store directory, no qemu-nbd running.
fn assert_nothing_left(store: &Path, vm: &str) {
    let left: Vec<_> = std::fs::read_dir(store.join("vms").join(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".nbd") || n.ends_with(".part") || n == "bitmap-journal.json")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let nbd = Command::new("pgrep").args(["-f", &format!("qemu-nbd.*{vm}")]).output().unwrap();
    assert!(nbd.stdout.is_empty(), "qemu-nbd left running: {}", String::from_utf8_lossy(&nbd.stdout));
}

fn restore_check(store: &Store, id: &str, model: &Model, n: usize, dir: &Path) {
    for (t, _) in DISKS {
        let to = dir.join(format!("{id}-{t}.raw"));
        store.restore(id, t, &to, ImageFormat::Raw, &Control::new()).unwrap();
        model.assert_restored(t, n, &to, dir);
    }
}

/// Whether `file`'s own layer (not its backing file) holds data at `offset`.
fn own_data_at(file: &Path, offset: u64) -> bool {
    let out = Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(file).output().unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter().any(|e| {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        s <= offset && offset < s + l && e["depth"] == 0 && e["data"] == true
    })
}

#[test]
fn a_stopped_domain_is_backed_up_by_persistent_bitmaps_and_its_chain_goes_on_across_starts() {
    if skip_without_libvirt("bitmap backups of stopped domains") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let vm = TestVm::define_stopped("knib-bms", &DISKS, dir.path());
    let file = |t: &str| vm.initial_file(t);
    let mut model = Model::new(&DISKS);
    let mut taken: Vec<(String, usize)> = Vec::new();

    // Stopped: a full backup, then an incremental of the files' writes.
    model.write_file(&file("vda"), "qcow2", "vda", 0x11, 0, MIB);
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x12, 2 * MIB, MIB);
    let b1 = backup(&store, &vm);
    assert_eq!(b1.kind, BackupKind::Full);
    for (t, _) in DISKS {
        assert_eq!(file_bitmaps(&file(t)), vec![checkpoint_name(&b1.id)], "{t}");
    }
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b1.id)], "libvirt follows the files");
    assert_nothing_left(&store_dir, vm.name());
    taken.push((b1.id.clone(), model.writes.len()));

    model.write_file(&file("vda"), "qcow2", "vda", 0x13, 8 * MIB, 512 * 1024);
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x14, 20 * MIB, 64 * 1024);
    let b2 = backup(&store, &vm);
    assert_eq!(
        (b2.kind, b2.parent.as_deref()),
        (BackupKind::Incremental, Some(b1.id.as_str())),
        "{:?}",
        b2.full_reason
    );
    assert!(b2.full_reason.is_none());
    let vda2 = store_dir.join("vms").join(vm.name()).join(&b2.id).join("vda.qcow2");
    assert!(own_data_at(&vda2, 8 * MIB), "the change is in the incremental");
    assert!(!own_data_at(&vda2, 0), "the unchanged first MiB is left to the parent");
    for (t, _) in DISKS {
        assert_eq!(file_bitmaps(&file(t)), vec![checkpoint_name(&b2.id)], "{t}: the older bitmap goes");
        assert_eq!(vm.disk(t).file, file(t), "the chain is untouched");
    }
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b2.id)]);
    assert_nothing_left(&store_dir, vm.name());
    taken.push((b2.id.clone(), model.writes.len()));

    // Started: the first backup of the running domain follows the
    // checkpoint the stopped backup recorded in libvirt.
    vm.boot();
    model.write(&vm, "vda", 0x15, 12 * MIB, MIB);
    model.write(&vm, "vdb", 0x16, 24 * MIB, 128 * 1024);
    let b3 = backup(&store, &vm);
    assert_eq!(
        (b3.kind, b3.parent.as_deref()),
        (BackupKind::Incremental, Some(b2.id.as_str())),
        "{:?}",
        b3.full_reason
    );
    taken.push((b3.id.clone(), model.writes.len()));
    model.write(&vm, "vdb", 0x17, 26 * MIB, 64 * 1024);
    vm.power_off();

    // Stopped again: QEMU stored the running backup's bitmap in the files,
    // with the guest's last write in it.
    model.write_file(&file("vda"), "qcow2", "vda", 0x18, 16 * MIB, MIB);
    let b4 = backup(&store, &vm);
    assert_eq!(
        (b4.kind, b4.parent.as_deref()),
        (BackupKind::Incremental, Some(b3.id.as_str())),
        "{:?}",
        b4.full_reason
    );
    assert_eq!(knib_checkpoints(&vm), vec![checkpoint_name(&b4.id)]);
    taken.push((b4.id.clone(), model.writes.len()));
    assert_nothing_left(&store_dir, vm.name());

    for (id, n) in &taken {
        restore_check(&store, id, &model, *n, dir.path());
    }
    for r in store.verify(None, &Control::new()).unwrap() {
        assert!(r.problems.is_empty(), "{r:?}");
    }

    // Deleting the head removes its bitmap from the files and its
    // checkpoint from libvirt.
    store.delete(&b4.id).unwrap();
    for (t, _) in DISKS {
        assert!(file_bitmaps(&file(t)).is_empty(), "{t}: {:?}", file_bitmaps(&file(t)));
    }
    assert!(knib_checkpoints(&vm).is_empty());
    // The next backup is then full, and says why.
    let b5 = backup(&store, &vm);
    assert_eq!(b5.kind, BackupKind::Full, "{:?}", b5.full_reason);
    assert!(b5.full_reason.is_some());
    // The domain still starts and reads every write.
    vm.boot();
    model.assert_vm_reads_everything(&vm);
}

#[test]
fn a_removed_or_inconsistent_bitmap_of_a_stopped_domain_makes_the_next_backup_full() {
    if skip_without_libvirt("bitmap backups of stopped domains") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-bms-gone", &DISKS, dir.path());
    let file = |t: &str| vm.initial_file(t);
    let q = QemuImg::new();
    let mut model = Model::new(&DISKS);
    model.write_file(&file("vda"), "qcow2", "vda", 0x21, 0, MIB);
    let b1 = backup(&store, &vm);
    // Removed behind knib's back, from one disk.
    q.bitmap_remove(&file("vdb"), &checkpoint_name(&b1.id), &Control::new()).unwrap();
    model.write_file(&file("vda"), "qcow2", "vda", 0x22, MIB, MIB);
    let b2 = backup(&store, &vm);
    assert_eq!(b2.kind, BackupKind::Full);
    let why = b2.full_reason.clone().unwrap_or_default();
    assert!(why.contains("vdb") && why.contains("no dirty bitmap"), "{why}");
    restore_check(&store, &b2.id, &model, model.writes.len(), dir.path());

    // In use when the process that had it open died (qemu-io killing
    // itself, as QEMU's iotests do): QEMU marks it `in-use`.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x23 4194304 65536", "-c", "sigraise 9"])
        .arg(file("vda"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io was to die");
    model.writes.push(common::model::Write { disk: 0, offset: 4 * MIB, len: 64 * 1024, pattern: 0x23 });
    let flags = q.bitmaps(&file("vda"), &Control::new()).unwrap();
    assert!(flags.iter().any(|b| b.inconsistent()), "{flags:?}");
    let b3 = backup(&store, &vm);
    assert_eq!(b3.kind, BackupKind::Full);
    let why = b3.full_reason.clone().unwrap_or_default();
    assert!(why.contains("inconsistent"), "{why}");
    restore_check(&store, &b3.id, &model, model.writes.len(), dir.path());
    // The inconsistent bitmap is gone; the new one records.
    assert_eq!(file_bitmaps(&file("vda")), vec![checkpoint_name(&b3.id)]);
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x24, 3 * MIB, MIB);
    let b4 = backup(&store, &vm);
    assert_eq!(b4.kind, BackupKind::Incremental, "{:?}", b4.full_reason);
    restore_check(&store, &b4.id, &model, model.writes.len(), dir.path());
}

#[test]
fn a_raw_disk_of_a_stopped_domain_is_backed_up_in_full_each_time_saying_why() {
    if skip_without_libvirt("bitmap backups of stopped domains") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let raw: PathBuf = base.join("knib-bms-raw-vda.raw");
    let qcow: PathBuf = base.join("knib-bms-raw-vdb.qcow2");
    for (f, fmt, size) in [(&raw, "raw", DISKS[0].1), (&qcow, "qcow2", DISKS[1].1)] {
        let out =
            Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(f).arg(size.to_string()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let vm = TestVm::create_on(
        "knib-bms-raw",
        &[("vda", raw.clone()), ("vdb", qcow.clone())],
        TestVmOptions { persistent: true, running: false, agent_channel: false },
    );
    let store = Store::create(dir.path().join("store")).unwrap();
    let mut model = Model::new(&DISKS);
    model.write_file(&raw, "raw", "vda", 0x31, 0, MIB);
    let b1 = backup(&store, &vm);
    model.write_file(&qcow, "qcow2", "vdb", 0x32, MIB, MIB);
    let b2 = backup(&store, &vm);
    assert_eq!((b1.kind, b2.kind), (BackupKind::Full, BackupKind::Full));
    assert!(b2.full_reason.as_deref().unwrap_or("").contains("is raw"), "{:?}", b2.full_reason);
    assert!(file_bitmaps(&qcow).is_empty(), "no bitmap is kept when a disk cannot carry one");
    assert!(knib_checkpoints(&vm).is_empty());
    restore_check(&store, &b2.id, &model, model.writes.len(), dir.path());
}

/// A read-only disk (`<readonly/>`) is refused by the bitmap method before
/// anything is written: the image gets no bitmap (before, a stopped
/// domain's backup wrote one into it, and a running domain's failed with
/// libvirt's bare message).
#[test]
fn a_read_only_disk_is_refused_by_the_bitmap_method_and_not_written() {
    if skip_without_libvirt("read-only disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-bm-ro", &DISKS, dir.path());
    let xml = vm.vm.xml().unwrap();
    let at = xml.find("<target dev='vdb'").expect("vdb's target");
    let xml = format!("{}<readonly/>{}", &xml[..at], &xml[at..]);
    let f = dir.path().join("ro.xml");
    std::fs::write(&f, &xml).unwrap();
    let out = Command::new("virsh").args(["-c", "qemu:///system", "define"]).arg(&f).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vdb = vm.disk("vdb");
    assert!(vdb.read_only, "{vdb:?}");
    let before = std::fs::read(&vdb.file).unwrap();
    let e = store.backup_domain(&vm.vm, &bitmap(), false, &Control::new()).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message.starts_with(&format!("disk vdb of domain {} ({}) is read-only: ", vm.vm.name(), vdb.file.display())),
        "{e}"
    );
    assert!(std::fs::read(&vdb.file).unwrap() == before, "the read-only image was written");
    assert!(file_bitmaps(&vm.disk("vda").file).is_empty());
    assert!(store.list(None).unwrap().is_empty());
}

/// A disk shrunk and grown again between two bitmap backups (`qemu-img
/// resize --shrink`, then back): the grown part reads zeros and is clean
/// in the dirty bitmap (QEMU does not mark what a shrink removed), while
/// the parent holds data there. The incremental takes it as zeros, and
/// restores to what the disk holds (before, the parent's old data came
/// back). The first backup's data elsewhere is kept.
#[test]
fn a_disk_shrunk_and_grown_again_is_restored_as_it_is() {
    if skip_without_libvirt("shrunk and grown disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-bm-regrow", &DISKS, dir.path());
    let vda = vm.disk("vda").file;
    common::disk::qemu_io(&vda, "write -P 0x12 40M 1M");
    common::disk::qemu_io(&vda, "write -P 0x13 1M 1M");
    let b1 = backup(&store, &vm);
    for size in ["32M", "64M"] {
        let mut c = Command::new("qemu-img");
        c.args(["resize", "-q", "-f", "qcow2"]);
        if size == "32M" {
            c.arg("--shrink");
        }
        let out = c.arg(&vda).arg(size).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    common::disk::qemu_io(&vda, "write -P 0x14 2M 64k");
    let b2 = backup(&store, &vm);
    assert_eq!((b2.kind, b2.parent.as_deref()), (BackupKind::Incremental, Some(b1.id.as_str())));
    let to = dir.path().join("b2-vda.qcow2");
    store.restore(&b2.id, "vda", &to, ImageFormat::Qcow2, &Control::new()).unwrap();
    common::disk::assert_identical(&to, &vda);
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 0 40M 1M"]).arg(&to).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 1048576/1048576"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}
