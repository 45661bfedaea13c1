//! Quiesced backups of a running guest, for real: the Debian-built test
//! guest runs the QEMU guest agent, and what it wrote before the freeze is
//! read back from the backup with knib's file-level restore.
//!
//! How the freeze is proven: the guest's writeback is held back (no
//! periodic flush, dirty data kept for an hour, the ext4 journal committed
//! every 600 s), so a file written without `sync` stays in the guest's page
//! cache; only the freeze (`FIFREEZE`, which syncs the filesystem) puts it
//! on the disk before the snapshot. A backup with quiesce holds it; the
//! same done without quiesce does not. The agent's own log (`slog` to
//! syslog, kept by busybox's syslogd in the guest's `/run`) shows the
//! freeze too.

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{backup_file, disk_file, token, GuestVm};
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::BackupKind;
use knib_core::files::Disk;
use knib_core::libvirt::guest::Exec;
use knib_core::{Control, ErrorKind};

fn ctl() -> Control {
    Control::new()
}

/// The guest's disk in backup `id`: one ext4 filesystem on the whole disk
/// (no partition table), as the test guest lays it out.
fn backed_up_disk(store: &Store, id: &str) -> Disk {
    let disk = Disk::open_backup(store, id, "vda", &ctl()).unwrap();
    let fs = disk.filesystems();
    assert_eq!(fs.len(), 1, "{fs:?}");
    assert_eq!((fs[0].partition, fs[0].fs_type.as_str(), fs[0].start), (None, "ext4", 0), "{fs:?}");
    disk
}

#[test]
fn a_quiesced_backup_holds_what_the_guest_wrote_before_the_freeze() {
    if skip_without_libvirt("a_quiesced_backup_holds_what_the_guest_wrote_before_the_freeze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-quiesce", dir.path());
    g.start_syslog();
    // Dirty data reaches the disk only on a sync or a freeze.
    g.hold_writeback();
    assert_eq!(g.fsfreeze_status(), "thawed");
    assert_eq!(g.agent_freezes(), 0);

    // Written and synced, then written without a sync, just before the backup.
    let synced = token("synced");
    let unsynced = token("unsynced");
    g.sh_ok(&format!("echo {synced} > /root/quiesce-proof && sync && echo {unsynced} > /root/unsynced"));
    let m = store.backup_domain(&g.vm, &BackupOptions::default(), true, &ctl()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);

    // The guest is thawed: a write ends at once.
    let started = Instant::now();
    match g.try_sh("echo x > /root/after && sync", Duration::from_secs(10)) {
        Exec::Ended(out) => assert_eq!(out.exit, Some(0), "{out:?}"),
        other => panic!("a write in the guest after the backup: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(g.fsfreeze_status(), "thawed");
    // The snapshot was taken with the filesystems frozen, once.
    assert_eq!(g.agent_freezes(), 1, "{}", g.syslog());

    // After the backup: the proof file changed, a new file.
    let later = token("later");
    g.sh_ok(&format!("echo {later} > /root/quiesce-proof && echo {later} > /root/later && sync"));

    let disk = backed_up_disk(&store, &m.id);
    assert_eq!(disk_file(&disk, "/root/quiesce-proof").as_deref(), Some(synced.as_str()));
    // Only the freeze put this one on the disk.
    assert_eq!(disk_file(&disk, "/root/unsynced").as_deref(), Some(unsynced.as_str()));
    assert_eq!(disk_file(&disk, "/root/later"), None);
    assert_eq!(disk_file(&disk, "/root/after"), None);
    assert_eq!(disk_file(&disk, "/etc/knib-marker").as_deref(), Some(common::guest::test_guest().marker.as_str()));

    // The same without quiesce: a write without a sync is not in the
    // backup, what was synced is (the file-level restore replays ext4's
    // journal), and nothing was frozen.
    let unsynced2 = token("unsynced2");
    g.sh_ok(&format!("echo {unsynced2} > /root/unsynced2"));
    let m2 = store.backup_domain(&g.vm, &BackupOptions::default(), false, &ctl()).unwrap();
    assert_eq!(m2.kind, BackupKind::Incremental);
    assert_eq!(g.agent_freezes(), 1);
    let disk2 = backed_up_disk(&store, &m2.id);
    assert_eq!(disk_file(&disk2, "/root/quiesce-proof").as_deref(), Some(later.as_str()));
    assert_eq!(disk_file(&disk2, "/root/later").as_deref(), Some(later.as_str()));
    let got = disk_file(&disk2, "/root/unsynced2");
    assert_ne!(got.as_deref(), Some(unsynced2.as_str()), "an unsynced write reached the disk without a freeze");
    // The first backup is as it was.
    assert_eq!(backup_file(&store, &m.id, "vda", "/root/quiesce-proof").as_deref(), Some(synced.as_str()));
}

/// All files under `dir`, recursively.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.exists() {
        return out;
    }
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A domain without a guest agent channel: a backup with quiesce is refused
/// (the agent is named), the VM runs on the files it ran on, no file is
/// left next to its disks or in the store, nothing is published; the same
/// backup without quiesce then works.
#[test]
fn a_quiesced_backup_of_a_domain_without_an_agent_fails_and_changes_nothing() {
    if skip_without_libvirt("a_quiesced_backup_of_a_domain_without_an_agent_fails_and_changes_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vms = dir.path().join("vms");
    std::fs::create_dir(&vms).unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let vm = TestVm::create(
        "knib-quiesce-noagent",
        &[("vda", 16 * MIB), ("vdb", 8 * MIB)],
        &vms,
        TestVmOptions { running: true, ..Default::default() },
    );
    vm.write("vda", 0x5a, 0, MIB);
    let disks = vm.disks();
    let files = tree(&vms);
    let e = store.backup_domain(&vm.vm, &BackupOptions::default(), true, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Hypervisor, "{e}");
    assert!(e.message.contains("guest agent") && e.message.contains(vm.name()), "{e}");
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    assert!(vm.vm.is_running().unwrap());
    assert_eq!(vm.disks(), disks);
    assert_eq!(tree(&vms), files);
    // The store holds at most the VM's lock file.
    let left: Vec<PathBuf> =
        tree(store.root()).into_iter().filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".lock")).collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    assert!(store.list(None).unwrap().is_empty());
    assert!(vm.read_check("vda", 0x5a, 0, MIB));

    let m = store.backup_domain(&vm.vm, &BackupOptions::default(), false, &ctl()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(store.list(None).unwrap().len(), 1);
}

/// A quiesced snapshot whose thaw fails (the guest agent restarted with a
/// freeze hook that fails on `thaw`): libvirt reports an error after the
/// disks were put on their new deltas. The backup fails, saying the
/// snapshot was taken and undone; the VM runs on the files it ran on
/// (nothing on a new delta, no delta file left), nothing is in the store,
/// no journal is left, and the next backup is a plain full one. (Before
/// the fix the error said "nothing was changed" and the VM consistent,
/// the journal was deleted, and the disks stayed on the new deltas.)
#[test]
fn a_quiesced_snapshot_whose_thaw_fails_is_undone() {
    if skip_without_libvirt("a_quiesced_snapshot_whose_thaw_fails_is_undone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-thawfail", dir.path());
    g.fail_thaws();
    // The hook is in place: a freeze works, its thaw fails (the guest is
    // thawed all the same).
    g.agent(&serde_json::json!({"execute": "guest-fsfreeze-freeze"}));
    let thaw = knib_core::libvirt::qemu_agent_command(&g.vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5);
    assert!(thaw.as_ref().is_err_and(|e| e.message.contains("hook")), "{thaw:?}");
    assert_eq!(g.fsfreeze_status(), "thawed");

    let disks = g.disks();
    let deltas = || -> Vec<PathBuf> {
        tree(dir.path()).into_iter().filter(|p| p.to_string_lossy().contains(".knib-delta-")).collect()
    };
    let e = store.backup_domain(&g.vm, &BackupOptions::default(), true, &ctl()).unwrap_err();
    assert_eq!(g.disks(), disks, "the VM runs on the files it ran on ({e})");
    assert!(deltas().is_empty(), "delta files left: {:?}", deltas());
    assert!(e.message.contains("the snapshot was taken"), "{e}");
    assert!(!e.message.contains("nothing was changed"), "{e}");
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    assert!(store.list(None).unwrap().is_empty());
    let journal = store.root().join("vms").join(g.name()).join("journal.json");
    assert!(!journal.exists(), "nothing is left to recover");
    assert_eq!(g.fsfreeze_status(), "thawed");

    let m = store.backup_domain(&g.vm, &BackupOptions::default(), false, &ctl()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(
        disk_file(&backed_up_disk(&store, &m.id), "/etc/knib-marker").as_deref(),
        Some(common::guest::test_guest().marker.as_str())
    );
}
