//! Live backups of running libvirt domains, against the real daemon: guest
//! writes arriving before and during each backup, restores compared with a
//! model of every write, end of chain, quick restore and consolidate, and the
//! errors a caller must get.

#![cfg(feature = "libvirt")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::model::{image_has, Model, Write};
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::BackupKind;
use knib_core::qemu_img::ImageFormat;
use knib_core::{Control, ErrorKind};

const DISKS: [(&str, u64); 2] = [("vda", 64 * MIB), ("vdb", 32 * MIB)];

fn running_vm(prefix: &str, dir: &std::path::Path) -> TestVm {
    TestVm::create(prefix, &DISKS, dir, TestVmOptions { persistent: false, running: true, agent_channel: false })
}

fn assert_base_plus_one_delta(vm: &TestVm) {
    for d in vm.disks() {
        assert!(
            d.backing_chain.len() == 1,
            "disk {} must run on base <- one delta, runs on {:?}",
            d.target,
            d.chain_files()
        );
        assert!(d.file.to_string_lossy().contains(".knib-delta-"), "{}", d.file.display());
        assert_eq!(d.backing_chain[0].file, vm.initial_file(&d.target));
    }
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

#[test]
fn full_and_two_incrementals_of_a_running_vm_with_writes_during_each_backup() {
    if skip_without_libvirt("live backups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = running_vm("knib-live", dir.path());
    let model = Arc::new(Mutex::new(Model::new(&DISKS)));
    let vm = Arc::new(vm);
    let mut ids = Vec::new();
    for round in 0..3u64 {
        {
            let mut m = model.lock().unwrap();
            m.write(&vm, "vda", 0x10 + round as u8, round * MIB, 256 * 1024);
            m.write(&vm, "vdb", 0x20 + round as u8, round * MIB, 128 * 1024);
            m.write(&vm, "vdb", 0x30 + round as u8, 16 * MIB + round * MIB, 64 * 1024);
        }
        let before = model.lock().unwrap().writes.len();
        // A writer keeps writing 64 KiB blocks, in order, while the backup runs.
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
                    let pat = 0x80 + round as u8;
                    model.lock().unwrap().write(&vm, "vda", pat, off, 64 * 1024);
                    let w = *model.lock().unwrap().writes.last().unwrap();
                    concurrent.lock().unwrap().push(w);
                }
            })
        };
        while concurrent.lock().unwrap().len() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let m = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let during = concurrent.lock().unwrap().clone();
        assert!(during.len() > 2, "writes must keep arriving during the backup");
        assert_eq!(m.kind, if round == 0 { BackupKind::Full } else { BackupKind::Incremental });
        assert!(vm.vm.is_running().unwrap(), "the VM never stops");
        assert_base_plus_one_delta(&vm);
        // The backup holds the writes up to its snapshot instant: a prefix of
        // the writes made during the backup, and nothing after it.
        let restored = restore_all(&store, &m.id, dir.path());
        let vda = &restored[0].1;
        let present: Vec<bool> = during.iter().map(|w| image_has(vda, w.pattern, w.offset, w.len)).collect();
        let cut = present.iter().position(|p| !p).unwrap_or(present.len());
        assert!(present[cut..].iter().all(|p| !p), "not a point in time: {present:?}");
        let model_now = model.lock().unwrap().clone();
        for (t, file) in &restored {
            model_now.assert_restored(t, before + cut, file, dir.path());
        }
        ids.push((m.id.clone(), before + cut));
        eprintln!("round {round}: {} writes during the backup, {cut} before its snapshot", during.len());
    }
    // Every backup still restores to its instant after later ones were taken.
    let model_now = model.lock().unwrap().clone();
    let out = dir.path().join("again");
    std::fs::create_dir(&out).unwrap();
    for (id, n) in &ids {
        for (t, file) in restore_all(&store, id, &out) {
            model_now.assert_restored(&t, *n, &file, dir.path());
        }
    }
    model_now.assert_vm_reads_everything(&vm);
}

#[test]
fn end_of_chain_leaves_the_vm_on_its_base_and_the_next_backup_is_full() {
    if skip_without_libvirt("end of chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = running_vm("knib-eoc", dir.path());
    let mut model = Model::new(&DISKS);
    let opts = BackupOptions { chain_size: 2, ..Default::default() };
    model.write(&vm, "vda", 0x41, 0, MIB);
    let b1 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    model.write(&vm, "vdb", 0x42, MIB, MIB);
    let n2 = model.writes.len();
    // Compressed as it is copied, in one pass.
    let zstd = BackupOptions { compress: Some(knib_core::qemu_img::CompressionLibrary::Zstd), ..opts.clone() };
    let b2 = store.backup_domain(&vm.vm, &zstd, false, &Control::new()).unwrap();
    assert_eq!((b1.kind, b2.kind, b2.end_of_chain), (BackupKind::Full, BackupKind::Incremental, true));
    assert_eq!(b2.compression.as_ref().map(|c| c.library), Some(knib_core::qemu_img::CompressionLibrary::Zstd));
    assert!(b1.compression.is_none());
    for d in vm.disks() {
        assert!(d.backing_chain.is_empty(), "{:?}", d.chain_files());
        assert_eq!(d.file, vm.initial_file(&d.target));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".knib-delta-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    model.write(&vm, "vda", 0x43, 2 * MIB, MIB);
    let b3 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!((b3.kind, b3.parent.clone()), (BackupKind::Full, None));
    for (t, f) in restore_all(&store, &b2.id, dir.path()) {
        model.assert_restored(&t, n2, &f, dir.path());
    }
    for (t, f) in restore_all(&store, &b3.id, dir.path()) {
        model.assert_restored(&t, model.writes.len(), &f, dir.path());
    }
    // An isolated backup leaves the chain as it was.
    let chain_before: Vec<_> = vm.disks().iter().map(|d| d.chain_files().len()).collect();
    let iso =
        store.backup_domain(&vm.vm, &BackupOptions { isolated: true, ..opts.clone() }, false, &Control::new()).unwrap();
    assert_eq!(iso.kind, BackupKind::Isolated);
    let chain_after: Vec<_> = vm.disks().iter().map(|d| d.chain_files().len()).collect();
    assert_eq!(chain_before, chain_after);
    let b4 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!(b4.parent.as_deref(), Some(b3.id.as_str()));
    model.assert_vm_reads_everything(&vm);
}

/// A quick restore onto a domain whose disk is defined as raw: the qcow2
/// overlay is put under it as qcow2 (its driver type set), and the guest
/// reads the backup. Before, the driver type was left raw: the VM started
/// on the overlay's qcow2 metadata as its disk, success answered.
#[test]
fn quick_restore_onto_a_raw_disk_sets_its_driver_to_qcow2() {
    if skip_without_libvirt("quick restore onto raw") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let src = running_vm("knib-qr-rsrc", dir.path());
    let mut model = Model::new(&DISKS);
    model.write(&src, "vda", 0x61, 0, 4 * MIB);
    model.write(&src, "vdb", 0x62, MIB, 2 * MIB);
    let b = store.backup_domain(&src.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    let tdir = dir.path().join("target");
    std::fs::create_dir(&tdir).unwrap();
    let opts = TestVmOptions { persistent: true, running: false, agent_channel: false };
    let target = TestVm::create_with_raw("knib-qr-raw", &DISKS, &["vda"], &tdir, opts);
    assert_eq!(target.disk("vda").format, "raw");
    store.quick_restore_domain(&b.id, &target.vm, &Control::new()).unwrap();
    assert!(target.vm.is_running().unwrap());
    for t in ["vda", "vdb"] {
        assert_eq!(target.disk(t).format, "qcow2", "disk {t}");
    }
    model.assert_vm_reads_everything(&target);
    target.vm.destroy().unwrap();
}

#[test]
fn quick_restore_runs_at_once_keeps_new_writes_and_consolidate_frees_the_store() {
    if skip_without_libvirt("quick restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let src = running_vm("knib-qr-src", dir.path());
    let mut model = Model::new(&DISKS);
    model.write(&src, "vda", 0x51, 0, 4 * MIB);
    model.write(&src, "vdb", 0x52, MIB, 2 * MIB);
    store.backup_domain(&src.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    model.write(&src, "vda", 0x53, 8 * MIB, MIB);
    let b = store.backup_domain(&src.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    let tdir = dir.path().join("target");
    std::fs::create_dir(&tdir).unwrap();
    let target = TestVm::define_stopped("knib-qr-dst", &DISKS, &tdir);
    // The top of one disk's chain damaged: the domain is not started, its
    // disks are the same, no overlay is made.
    let top = store.chain_files(&b, "vda").unwrap().pop().unwrap();
    let (at, was) = common::disk::zero_first_data_refcount(&top);
    let sources: Vec<_> = target.disks().iter().map(|d| d.file.clone()).collect();
    let files_before = std::fs::read_dir(&tdir).unwrap().count();
    let e = store.quick_restore_domain(&b.id, &target.vm, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(
        e.message.starts_with(&format!(
            "quick restore of backup {}: backup file {} is damaged: qemu-img check found ",
            b.id,
            top.display()
        )),
        "{e}"
    );
    assert!(!target.vm.is_running().unwrap());
    assert_eq!(target.disks().iter().map(|d| d.file.clone()).collect::<Vec<_>>(), sources);
    assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), files_before, "an overlay was left");
    common::disk::put_bytes(&top, at, &was);
    // While the backup's own VM is held (a delete of the backup), the
    // quick restore to another domain is busy and changes nothing.
    let held = store.lock_vm(src.name(), "delete of a backup").unwrap();
    let e = store.quick_restore_domain(&b.id, &target.vm, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("delete of a backup"), "{e}");
    assert!(!target.vm.is_running().unwrap());
    assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), files_before, "an overlay was left");
    drop(held);
    // A disk added to the domain after the backup was taken stays on its
    // file, and the answer says so.
    let added = tdir.join("vdc.qcow2");
    common::disk::make_disk(&added, 16 * MIB, &[]);
    common::disk::qemu_io(&added, "write -P 0x5c 0 1M");
    let out = std::process::Command::new("virsh")
        .args(["-c", common::vm::URI, "attach-disk", target.name(), added.to_str().unwrap(), "vdc"])
        .args(["--subdriver", "qcow2", "--config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let request =
        serde_json::json!({"store": store_dir, "backup": b.id, "domain": target.name(), "connect": common::vm::URI});
    let answer: serde_json::Value =
        serde_json::from_str(&knib_core::api::call("quick_restore", &request.to_string(), &Control::new()).unwrap())
            .unwrap();
    assert_eq!(answer["kept"], serde_json::json!([["vdc", added]]), "{answer}");
    let overlays: Vec<(String, std::path::PathBuf)> = serde_json::from_value(answer["overlays"].clone()).unwrap();
    assert_eq!(overlays.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["vda", "vdb"]);
    assert!(target.vm.is_running().unwrap());
    assert_eq!(target.disk("vdc").file, added);
    let o = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x5c 0 1M"])
        .arg(&added)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("read 1048576/1048576"), "vdc as it was: {o:?}");
    for (t, overlay) in &overlays {
        let d = target.disk(t);
        assert_eq!(&d.file, overlay);
        assert!(std::fs::metadata(overlay).unwrap().len() < 2 * MIB, "no data copied before the VM runs");
        assert!(d.backing_chain[0].file.starts_with(&store_dir), "{:?}", d.chain_files());
    }
    model.assert_vm_reads_everything(&target);
    model.write(&target, "vdb", 0x54, 20 * MIB, MIB);
    let done = knib_core::engine::live::consolidate(store.qemu_img(), &target.vm, &Control::new()).unwrap();
    assert_eq!(done, vec!["vda".to_string(), "vdb".to_string()]);
    for d in target.disks() {
        assert!(d.backing_chain.is_empty(), "{:?}", d.chain_files());
    }
    std::fs::remove_dir_all(&store_dir).unwrap();
    model.assert_vm_reads_everything(&target);
    assert!(knib_core::engine::live::consolidate(store.qemu_img(), &target.vm, &Control::new()).unwrap().is_empty());
}

#[test]
fn busy_missing_domain_raw_disk_and_quiesce_without_agent_are_clear_errors() {
    if skip_without_libvirt("live errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = Arc::new(TestVm::create(
        "knib-err",
        &DISKS,
        dir.path(),
        TestVmOptions { persistent: false, running: true, agent_channel: true },
    ));
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x61, 0, 8 * MIB);
    // Quiesce with no agent answering: refused, nothing changed.
    let chains: Vec<_> =
        vm.disks().iter().map(|d| d.chain_files().iter().map(|p| p.to_path_buf()).collect::<Vec<_>>()).collect();
    let e = store.backup_domain(&vm.vm, &BackupOptions::default(), true, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Hypervisor, "{e}");
    assert!(e.message.contains("guest agent"), "{e}");
    assert_eq!(e.vm_consistent, Some(true));
    let after: Vec<_> =
        vm.disks().iter().map(|d| d.chain_files().iter().map(|p| p.to_path_buf()).collect::<Vec<_>>()).collect();
    assert_eq!(chains, after);
    assert!(store.list(None).unwrap().is_empty());
    // Missing domain.
    let e = vm.hv.domain("knib-no-such-domain").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("knib-no-such-domain"), "{e}");
    // Two backups at once: the second fails at once with "busy".
    let (ctl, reached_rx, go_tx) = common::disk::paused_at_first_progress();
    let (s2, v2) = (store.clone(), vm.clone());
    let first = std::thread::spawn(move || s2.backup_domain(&v2.vm, &BackupOptions::default(), false, &ctl));
    reached_rx.recv().unwrap();
    let t = std::time::Instant::now();
    let e = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&format!("VM {} is busy", vm.name())), "{e}");
    go_tx.send(()).unwrap();
    first.join().unwrap().unwrap();
    assert_base_plus_one_delta(&vm);
    model.assert_vm_reads_everything(&vm);

    // A raw disk: refused before anything is done.
    let rdir = dir.path().join("raw");
    std::fs::create_dir(&rdir).unwrap();
    let raw = rdir.join("raw.img");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let xml = common::vm::domain_xml("knib-raw-probe", &[("vda".into(), raw.clone())], false)
        .replace("type='qcow2'", "type='raw'");
    let rvm = vm.hv.create_transient(&xml).unwrap();
    let e = store.backup_domain(&rvm, &BackupOptions::default(), false, &Control::new()).unwrap_err();
    let _ = rvm.destroy();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("disk vda of domain knib-raw-probe") && e.message.contains("is raw, not qcow2"), "{e}");
    assert_eq!(std::fs::read_dir(&rdir).unwrap().count(), 1);
    assert!(!store.root().join("vms/knib-raw-probe").exists(), "a refused first backup made the VM's directory");
}

#[test]
fn a_stopped_domain_is_backed_up_through_the_same_api() {
    if skip_without_libvirt("stopped domain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-stopped", &DISKS, dir.path());
    let active = |t: &str| vm.disk(t).file;
    // Writes to a stopped VM's disks go into their active files.
    common::disk::qemu_io(&active("vda"), "write -P 0x71 0 2M");
    common::disk::qemu_io(&active("vdb"), "write -P 0x72 1M 1M");
    let r1 = dir.path().join("r1");
    std::fs::create_dir(&r1).unwrap();
    let refs1: Vec<_> = DISKS
        .iter()
        .map(|(t, _)| {
            let p = r1.join(format!("{t}.qcow2"));
            common::disk::snapshot(&active(t), &p);
            p
        })
        .collect();
    let b1 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!(b1.kind, BackupKind::Full);
    common::disk::qemu_io(&active("vda"), "write -P 0x73 4M 1M");
    let r2 = dir.path().join("r2");
    std::fs::create_dir(&r2).unwrap();
    let refs2: Vec<_> = DISKS
        .iter()
        .map(|(t, _)| {
            let p = r2.join(format!("{t}.qcow2"));
            common::disk::snapshot(&active(t), &p);
            p
        })
        .collect();
    let b2 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!(b2.kind, BackupKind::Incremental);
    for (t, _) in DISKS {
        let chain = store.qemu_img().info_chain(&active(t), &Control::new()).unwrap();
        assert_eq!(chain.len(), 2, "{t}: base <- one delta");
        assert_eq!(std::path::PathBuf::from(&chain[1].filename), vm.initial_file(t));
    }
    assert!(!vm.vm.is_running().unwrap());
    for (id, refs) in [(&b1.id, &refs1), (&b2.id, &refs2)] {
        for ((t, f), r) in restore_all(&store, id, dir.path()).iter().zip(refs.iter()) {
            let _ = t;
            common::disk::assert_identical(f, r);
        }
    }
    // The domain boots on what the backups left.
    vm.boot();
    let mut m = Model::new(&DISKS);
    m.write(&vm, "vdb", 0x74, 8 * MIB, MIB);
    assert!(vm.read_check("vda", 0x73, 4 * MIB, MIB) && vm.read_check("vda", 0x71, 0, MIB));
}

#[test]
fn a_disk_only_vm_snapshot_delta_is_merged_running_and_stopped() {
    if skip_without_libvirt("merge snapshot delta") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = TestVm::create(
        "knib-merge",
        &DISKS,
        dir.path(),
        TestVmOptions { persistent: true, running: true, agent_channel: false },
    );
    let q = knib_core::qemu_img::QemuImg::new();
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x91, 0, MIB);
    let s1 = dir.path().join("vda.snap1");
    let s2 = dir.path().join("vda.snap2");
    vm.vm.snapshot_disk_only(&[("vda", &s1)], false).unwrap();
    model.write(&vm, "vda", 0x92, MIB, MIB);
    vm.vm.snapshot_disk_only(&[("vda", &s2)], false).unwrap();
    model.write(&vm, "vda", 0x93, 2 * MIB, MIB);
    // Running: a middle layer, by block commit.
    let now = knib_core::engine::live::merge_snapshot_delta(&q, &vm.vm, "vda", &s1, &[], &Control::new()).unwrap();
    assert_eq!(now, s2);
    assert_eq!(vm.disk("vda").chain_files(), vec![s2.as_path(), vm.initial_file("vda").as_path()]);
    assert!(!s1.exists());
    model.assert_vm_reads_everything(&vm);
    let e = knib_core::engine::live::merge_snapshot_delta(&q, &vm.vm, "vda", &s1, &[], &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    // Stopped: the active layer, by qemu-img commit and a new definition.
    vm.power_off();
    let now = knib_core::engine::live::merge_snapshot_delta(&q, &vm.vm, "vda", &s2, &[], &Control::new()).unwrap();
    assert_eq!(now, vm.initial_file("vda"));
    assert!(!s2.exists());
    vm.boot();
    model.assert_vm_reads_everything(&vm);
}

/// A backup reads the disks' chains under the VM's lock. Backup B is held
/// right before it takes the lock while backup A runs whole: B then sees
/// A's delta, continues A's chain and holds every write. Before, B read the
/// chains before the lock: it planned on the delta A had merged and
/// removed, and failed or copied a chain without A's delta.
#[test]
fn a_backup_reads_the_chains_under_the_vms_lock() {
    if skip_without_libvirt("chains read under the lock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = Arc::new(running_vm("knib-lockread", dir.path()));
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x51, 0, MIB);
    store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    model.write(&vm, "vda", 0x52, MIB, MIB);
    let hold = std::time::Duration::from_secs(20);
    knib_core::crashpoint::pause_before(&format!("locking VM {} for a backup", vm.name()), hold);
    let (s2, v2) = (store.clone(), vm.clone());
    let started = std::time::Instant::now();
    let b = std::thread::spawn(move || s2.backup_domain(&v2.vm, &BackupOptions::default(), false, &Control::new()));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let a = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    let n_a = model.writes.len();
    assert!(started.elapsed() < hold, "backup A ran past B's pause: the test proves nothing");
    model.write(&vm, "vdb", 0x53, 2 * MIB, MIB);
    let n_b = model.writes.len();
    let b = b.join().unwrap().unwrap();
    assert_eq!(b.kind, BackupKind::Incremental);
    assert_eq!(b.parent.as_deref(), Some(a.id.as_str()));
    assert_base_plus_one_delta(&vm);
    for (id, n) in [(&a.id, n_a), (&b.id, n_b)] {
        for (t, file) in restore_all(&store, id, dir.path()) {
            model.assert_restored(&t, n, &file, dir.path());
        }
    }
    model.assert_vm_reads_everything(&vm);
}

/// A plain-disk backup (`knib backup --disk vda=P`) of a disk a running
/// domain holds open is refused as busy, naming the file and saying that a
/// running VM is backed up through its domain; nothing is changed: no
/// `.knib-base` or `.knib-new` beside the disk, the disk's file the same
/// inode and still what the domain runs on, nothing in the store. (Before
/// the fix the backup succeeded: a torn copy, then `P` linked as its base
/// and replaced by an overlay the running QEMU never wrote to.)
#[test]
fn a_plain_disk_backup_of_a_disk_a_running_domain_holds_is_refused() {
    use std::os::unix::fs::MetadataExt;
    if skip_without_libvirt("plain-disk backup of a running VM") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::start("knib-held", &[("vda", 16 * MIB)], dir.path());
    vm.write("vda", 0x4d, 0, 1024 * 1024);
    let p = vm.initial_file("vda");
    let ino = std::fs::metadata(&p).unwrap().ino();
    let disks = vec![knib_core::catalog::DiskSpec { name: "vda".into(), path: p.clone() }];
    let e = store.backup("plain", &disks, &BackupOptions::default(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&p.display().to_string()), "the error names the disk: {e}");
    assert!(e.message.contains("--domain"), "the error says how to back up a running VM: {e}");
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    for leftover in [format!("{name}.knib-base"), format!("{name}.knib-new"), format!("{name}.knib-since")] {
        assert!(!p.with_file_name(&leftover).exists(), "{leftover} was made");
    }
    assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino, "the disk's file was replaced");
    assert_eq!(vm.disk("vda").file, p);
    assert_eq!(vm.disk("vda").backing_chain.len(), 0, "the disk has no backing file");
    assert!(store.list(None).unwrap().is_empty());
    let vm_dir = dir.path().join("store").join("vms").join("plain");
    let left: Vec<_> =
        std::fs::read_dir(&vm_dir).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".part")), "a part directory is left: {left:?}");
    assert!(vm.read_check("vda", 0x4d, 0, 1024 * 1024));
}

/// A running domain whose disk has extended L2 entries (subclusters), and
/// one whose disk runs over a template that has them: the native reader
/// does not read them, so the copies go through qemu-img (reading the
/// snapshotted layers QEMU no longer writes) instead of failing the backup.
/// A full and an incremental each restore to the guest's writes; the VM
/// keeps running on `base <- one delta`.
#[test]
fn a_running_domain_with_extended_l2_disks_is_backed_up() {
    if skip_without_libvirt("extended L2 disks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let extended = ["-o", "extended_l2=on,cluster_size=128k"];
    let vda = dir.path().join("vda.qcow2");
    common::disk::make_disk(&vda, DISKS[0].1, &extended);
    let template = dir.path().join("template.qcow2");
    common::disk::make_disk(&template, DISKS[1].1, &extended);
    let vdb = dir.path().join("vdb.qcow2");
    common::disk::make_disk(&vdb, DISKS[1].1, &["-b", "template.qcow2", "-F", "qcow2"]);
    let vm = TestVm::create_on(
        "knib-xl2",
        &[("vda", vda), ("vdb", vdb)],
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    );
    let mut model = Model::new(&DISKS);
    let mut taken = Vec::new();
    for round in 0..2u64 {
        model.write(&vm, "vda", 0x41 + round as u8, round * MIB + 4096, 200 * 1024);
        model.write(&vm, "vdb", 0x51 + round as u8, 3 * MIB + round * 64 * 1024, 12 * 1024);
        let m = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
        assert_eq!(m.kind, if round == 0 { BackupKind::Full } else { BackupKind::Incremental });
        assert!(vm.vm.is_running().unwrap());
        // base <- one delta, vdb's base over its template.
        for d in vm.disks() {
            assert!(d.file.to_string_lossy().contains(".knib-delta-"), "{}", d.file.display());
            assert_eq!(d.backing_chain[0].file, vm.initial_file(&d.target));
            assert_eq!(d.backing_chain.len(), if d.target == "vda" { 1 } else { 2 }, "{:?}", d.chain_files());
        }
        taken.push((m.id, model.writes.len()));
    }
    for (id, n) in &taken {
        for (t, file) in restore_all(&store, id, dir.path()) {
            model.assert_restored(&t, *n, &file, dir.path());
        }
    }
    model.assert_vm_reads_everything(&vm);
}

/// An internal snapshot (`virsh snapshot-create-as` without
/// `--disk-only`, or `qemu-img snapshot -c`) lives in the file a disk runs
/// on, here the knib delta the next backup merges into the base and
/// removes: that backup is refused before anything is done, naming the
/// file, and the snapshot stays (before, it was removed with the delta and
/// libvirt could no longer revert to it). Once the snapshot is deleted,
/// the backup goes ahead.
#[test]
fn a_backup_that_would_remove_an_internal_snapshot_is_refused() {
    if skip_without_libvirt("internal snapshot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-internal-snap", &DISKS, dir.path());
    let active = |t: &str| vm.disk(t).file;
    let b1 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    common::disk::qemu_io(&active("vdb"), "write -P 0x51 1M 1M");
    let delta = active("vdb");
    assert!(delta.to_string_lossy().contains(".knib-delta-"), "{}", delta.display());
    let snap = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img").arg("snapshot").args(args).arg(&delta).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    snap(&["-c", "int1"]);
    let before: Vec<_> = DISKS.iter().map(|(t, _)| active(t)).collect();
    let e = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message.contains(&format!(
            "disk vdb: {} holds 1 internal snapshot(s) (`qemu-img snapshot -l` lists them): this backup would merge",
            delta.display()
        )),
        "{e}"
    );
    assert_eq!(DISKS.iter().map(|(t, _)| active(t)).collect::<Vec<_>>(), before, "a disk moved");
    assert!(snap(&["-l"]).contains("int1"), "the internal snapshot is gone");
    assert_eq!(store.list(None).unwrap().iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![b1.id.clone()]);
    snap(&["-d", "int1"]);
    let b2 = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &Control::new()).unwrap();
    assert_eq!(b2.kind, BackupKind::Incremental);
}

/// A disk shrunk since its base was made (`qemu-img resize --shrink`, or
/// `virsh blockresize` on a running domain: the top file shrinks, the base
/// keeps its size) stays on its new delta at the end of a chain: a commit
/// never shrinks the file it commits into, and the disk went back to its
/// old size with the data past its new end readable again. The backup
/// restores to the shrunk disk; the next backup is taken and restores too.
#[test]
fn an_end_of_chain_backup_of_a_shrunk_disk_keeps_its_size() {
    if skip_without_libvirt("shrunk disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::define_stopped("knib-shrunk", &DISKS, dir.path());
    let active = |t: &str| vm.disk(t).file;
    let opts = BackupOptions { chain_size: 2, ..Default::default() };
    store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    // Data past the new end, merged into the base by the next backup.
    common::disk::qemu_io(&active("vda"), "write -P 0x61 40M 1M");
    common::disk::qemu_io(&active("vda"), "write -P 0x62 1M 1M");
    let out = std::process::Command::new("qemu-img")
        .args(["resize", "-q", "--shrink"])
        .arg(active("vda"))
        .arg("32M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view = dir.path().join("vda-32M.qcow2");
    common::disk::snapshot(&active("vda"), &view);
    let b2 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    assert_eq!((b2.kind, b2.end_of_chain), (BackupKind::Incremental, true));
    let now = active("vda");
    assert_eq!(store.qemu_img().info(&now, &Control::new()).unwrap().virtual_size, 32 * MIB, "{}", now.display());
    assert!(now.to_string_lossy().contains(".knib-delta-"), "vda runs on {}", now.display());
    common::disk::assert_identical(&now, &view);
    // The other disk's chain ended as usual.
    assert_eq!(active("vdb"), vm.initial_file("vdb"));
    let to = dir.path().join("b2-vda.qcow2");
    store.restore(&b2.id, "vda", &to, ImageFormat::Qcow2, &Control::new()).unwrap();
    common::disk::assert_identical(&to, &view);
    let b3 = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
    let to = dir.path().join("b3-vda.qcow2");
    store.restore(&b3.id, "vda", &to, ImageFormat::Qcow2, &Control::new()).unwrap();
    common::disk::assert_identical(&to, &view);
    assert_eq!(store.qemu_img().info(&active("vda"), &Control::new()).unwrap().virtual_size, 32 * MIB);
}

const MERGE_CHILD_ENV: &str = "KNIB_MERGE_CHILD_REQUEST";

/// Run in the child process: the merge the parent asks for (`[domain,
/// delta, other branch]`), killed by the crash hook.
#[test]
fn child_merge_snapshot_delta() {
    let Ok(req) = std::env::var(MERGE_CHILD_ENV) else { return };
    let [name, delta, other]: [String; 3] = serde_json::from_str(&req).unwrap();
    let vm = knib_core::libvirt::domain(Some(common::vm::URI), &name).unwrap();
    let q = knib_core::qemu_img::QemuImg::new();
    let others = [std::path::PathBuf::from(other)];
    let _ = knib_core::engine::live::merge_snapshot_delta(&q, &vm, "vda", delta.as_ref(), &others, &Control::new());
}

/// A merge of a VM snapshot delta killed before it points another branch
/// of the snapshot tree (an image backed by the delta, off the disk's
/// chain) at the layer below leaves that branch whole: the delta is
/// removed only after every branch is re-pointed. Before, the delta was
/// removed first, and a kill (or a failed rebase) in between left the
/// branch on a file that was gone.
#[test]
fn a_merge_killed_before_it_repoints_a_snapshot_branch_leaves_the_branch_whole() {
    if skip_without_libvirt("merge killed before a re-point") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = TestVm::create(
        "knib-merge-kill",
        &DISKS,
        dir.path(),
        TestVmOptions { persistent: true, running: true, agent_channel: false },
    );
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x81, 0, MIB);
    let s1 = dir.path().join("vda.snap1");
    let s2 = dir.path().join("vda.snap2");
    vm.vm.snapshot_disk_only(&[("vda", &s1)], false).unwrap();
    model.write(&vm, "vda", 0x82, MIB, MIB);
    vm.vm.snapshot_disk_only(&[("vda", &s2)], false).unwrap();
    model.write(&vm, "vda", 0x83, 2 * MIB, MIB);
    // Another branch of the tree, on s1.
    let other = dir.path().join("vda.branch");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (o, s1s) = (other.to_str().unwrap(), s1.to_str().unwrap());
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", s1s, o]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 3M 64k", o]);
    let reference = dir.path().join("branch.raw");
    run(&["qemu-img", "convert", "-U", "-O", "raw", o, reference.to_str().unwrap()]);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_merge_snapshot_delta", "--nocapture", "--test-threads=1"])
        .env(MERGE_CHILD_ENV, serde_json::json!([vm.name(), s1, other]).to_string())
        .env(knib_core::crashpoint::CRASH_BEFORE_ENV, format!("re-point {o}"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was not killed: {}", String::from_utf8_lossy(&out.stdout));
    // The branch reads as before, and the VM reads every write.
    run(&["qemu-img", "compare", "-U", "-q", reference.to_str().unwrap(), o]);
    model.assert_vm_reads_everything(&vm);
}

/// A domain's backup compressed as it is copied, in a store whose
/// `compression.check_output` is on, reads each file back before it is
/// kept, by either method (snapshot: knib's copy of the old delta; bitmap:
/// its copy of the NBD export): correct copies are kept, and a file that
/// does not hold what was copied into it (two clusters swapped; one
/// pointed at another's data) fails the backup as internal naming it.
/// Nothing of that backup is kept, the VM runs on and reads every write,
/// and the next backup (checked too) restores every write up to it.
#[test]
fn a_domain_backup_compressed_as_copied_that_does_not_read_back_is_not_kept() {
    use common::disk::{miswrite, while_paused, Miswrite};
    use knib_core::engine::BackupMethod;
    if skip_without_libvirt("read-back of a domain's compressed backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let root = store.root().to_path_buf();
    std::fs::create_dir_all(&root).unwrap();
    let vm = running_vm("knib-readback", dir.path());
    let vm_dir = root.join("vms").join(vm.name());
    let mut model = Model::new(&DISKS);
    let mut kept: Vec<(String, usize)> = Vec::new();
    // The last round copies through qemu-img (the store's data path): its
    // files are compared with the disks by guest bytes.
    let methods = [
        (BackupMethod::Snapshot, Miswrite::Swap, 0x40u8, "native"),
        (BackupMethod::Bitmap, Miswrite::Duplicate, 0x50, "native"),
        (BackupMethod::Snapshot, Miswrite::Lose, 0x60, "qemu-img"),
    ];
    for (k, (method, m, p, path)) in methods.into_iter().enumerate() {
        std::fs::write(
            root.join("knib.json"),
            format!(r#"{{"schema": 1, "compression.check_output": true, "knib.data.path": "{path}"}}"#),
        )
        .unwrap();
        // Writes never overlap: 8 MiB of each disk per method.
        let o = k as u64 * 8 * MIB;
        let opts = BackupOptions {
            method: Some(method),
            compress: Some(knib_core::qemu_img::CompressionLibrary::Zstd),
            ..Default::default()
        };
        let tag = format!("{method:?} ({path})");
        model.write(&vm, "vda", p + 1, o, MIB);
        model.write(&vm, "vda", p + 2, o + MIB, MIB);
        model.write(&vm, "vdb", p + 3, o, MIB);
        let good = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
        assert!(good.compression.is_some(), "{tag}");
        kept.push((good.id, model.writes.len()));
        model.write(&vm, "vda", p + 4, o + 2 * MIB, MIB);
        model.write(&vm, "vda", p + 5, o + 3 * MIB, MIB);
        // Once the copy of vda is written, before it is hashed (the hash
        // then agrees with the file: only the read-back can tell).
        // (qemu-img's copy is compared with the disk instead.)
        let at = match method {
            _ if path == "qemu-img" => format!("comparison of {}", vm_dir.display()),
            BackupMethod::Snapshot => format!("read-back of {}", vm_dir.display()),
            BackupMethod::Bitmap => format!("wrote {}", vm_dir.display()),
        };
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let (what, r) = std::thread::scope(|s| {
            let t = s.spawn(|| {
                while_paused(&at, || {
                    let part = std::fs::read_dir(&vm_dir)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .find(|p| p.to_string_lossy().ends_with(".part") && p.is_dir())
                        .expect("the backup's directory");
                    let tmp = part.join(".vda.qcow2.part");
                    let what = miswrite(&tmp, m, p as u64);
                    (tmp, what)
                })
            });
            let r = store.backup_domain(&vm.vm, &opts, false, &Control::new());
            (t.join().expect("miswrite"), r)
        });
        let ctx = format!("{tag}: {}", what.1);
        let e = r.expect_err(&format!("{ctx}: the backup must fail"));
        assert_eq!(e.kind, ErrorKind::Internal, "{ctx}: {e}");
        let head = format!("{} does not read back as written: ", what.0.display());
        assert!(e.message.contains(&head), "{ctx}: {e}");
        let ids: Vec<String> = store.list(Some(vm.name())).unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, kept.iter().map(|k| k.0.clone()).collect::<Vec<_>>(), "{ctx}: a backup was kept");
        let left: Vec<_> = std::fs::read_dir(&vm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".part") || n.ends_with(".nbd"))
            .collect();
        assert!(left.is_empty(), "{ctx}: left {left:?}");
        assert!(vm.vm.is_running().unwrap(), "{ctx}");
        let next = store.backup_domain(&vm.vm, &opts, false, &Control::new()).unwrap();
        kept.push((next.id, model.writes.len()));
    }
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (id, n) in &kept {
        for (t, f) in restore_all(&store, id, &out) {
            model.assert_restored(&t, *n, &f, dir.path());
        }
    }
    for r in store.verify(None, &Control::new()).unwrap() {
        assert!(r.problems.is_empty(), "{r:?}");
    }
    model.assert_vm_reads_everything(&vm);
}
