//! Verify holds every file of a backup's chain against its own backup's
//! recorded hash: a parent whose file changed fails the verify of its
//! child, naming the parent and the file, also when the parent was
//! deleted (kept for the chain) and only the child is listed.

mod common;

use std::path::Path;

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store, VerifyReport};
use knib_core::engine::BackupKind;
use knib_core::Control;

/// The one report of `reports` about backup `id`.
fn report_of<'a>(reports: &'a [VerifyReport], id: &str) -> &'a VerifyReport {
    let of: Vec<&VerifyReport> = reports.iter().filter(|r| r.id == id).collect();
    assert_eq!(of.len(), 1, "{reports:?}");
    of[0]
}

/// The problems of `r` that name `file` as changed, in backup `parent` of
/// `r`'s chain.
fn parent_mismatches(r: &VerifyReport, file: &Path, parent: &str) -> Vec<String> {
    let want = format!("{}: hash ", file.display());
    let of = format!(" of backup {parent}, in the chain of backup {}: the file changed since it was verified", r.id);
    r.problems
        .iter()
        .filter(|p| p.starts_with(&want) && p.contains("differs from the recorded") && p.contains(&of))
        .cloned()
        .collect()
}

/// A full and an incremental backup; one byte of the full one's data
/// (not its header) flipped. `verify <child>` fails naming the parent's
/// backup and file; so does the verify of every listed backup once the
/// parent is deleted but kept for the chain (`list` leaves it out).
#[test]
fn a_changed_parent_fails_the_verify_of_its_child_naming_the_parent() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let ctl = Control::new();
    qemu_io(vm.path("root"), "write -P 0x11 0 4M");
    qemu_io(vm.path("data"), "write -P 0x21 1M 2M");
    let full = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl).unwrap();
    qemu_io(vm.path("root"), "write -P 0x12 8M 1M");
    let inc = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl).unwrap();
    assert_eq!((full.kind, inc.kind), (BackupKind::Full, BackupKind::Incremental));
    assert_eq!(inc.parent.as_deref(), Some(full.id.as_str()));
    // Everything verifies, and every file's hash is recorded.
    let reports = store.verify(None, &ctl).unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
    for id in [&full.id, &inc.id] {
        assert!(store.show(id).unwrap().volumes.iter().all(|v| v.hash.is_some()));
    }

    let parent_file = store.volume_file(&full, "root").unwrap();
    flip_byte(&parent_file, first_data_offset(&parent_file) + 1234);

    // The child: its own file is intact, its parent's is not.
    let r = store.verify(Some(&inc.id), &ctl).unwrap().pop().unwrap();
    assert!(!r.ok, "the verify of {} passed with its parent's file changed: {r:?}", inc.id);
    assert_eq!(parent_mismatches(&r, &parent_file, &full.id).len(), 1, "{r:?}");
    let child_file = store.volume_file(&inc, "root").unwrap();
    assert!(r.problems.iter().all(|p| !p.starts_with(&child_file.display().to_string())), "{r:?}");
    // The other volume's chain is intact.
    assert!(r.problems.iter().all(|p| !p.contains("data.qcow2")), "{r:?}");
    // The parent itself, named as its own backup.
    let r = store.verify(Some(&full.id), &ctl).unwrap().pop().unwrap();
    assert!(!r.ok);
    let own = format!("of backup {}: the file changed since it was verified", full.id);
    assert!(
        r.problems.iter().any(|p| p.starts_with(&format!("{}: hash ", parent_file.display())) && p.contains(&own)),
        "{r:?}"
    );

    // The parent deleted: kept for its child, left out of the list; the
    // verify of the store still finds its file changed, through the child.
    store.delete(&full.id).unwrap();
    assert!(store.find(&full.id).unwrap().removed);
    assert!(parent_file.exists());
    let reports = store.verify(None, &ctl).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = report_of(&reports, &inc.id);
    assert!(!r.ok, "the verify of the store passed with a deleted parent's file changed: {r:?}");
    assert_eq!(parent_mismatches(r, &parent_file, &full.id).len(), 1, "{r:?}");

    // The byte put back: everything verifies again.
    flip_byte(&parent_file, first_data_offset(&parent_file) + 1234);
    let reports = store.verify(None, &ctl).unwrap();
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
}

/// A verify stopped (cancelled, or out of time) while `qemu-img info`
/// reads a backup's file ends with that: it does not report the backup as
/// having a problem (a validation job would fail it as not valid).
#[test]
fn a_verify_stopped_during_qemu_img_info_reports_no_problem() {
    let vm = TestDisks::two();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x71 0 2M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &Control::new()).unwrap();
    let at = format!("verify of backup {}: qemu-img info of root", m.id);
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(2));
    let ctl = Control::new();
    let r = std::thread::scope(|s| {
        let verify = s.spawn(|| store.verify(Some(&m.id), &ctl));
        assert!(
            knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(60)),
            "the verify never reached {at}"
        );
        ctl.cancel.cancel();
        verify.join().unwrap()
    });
    let e = match r {
        Ok(reports) => panic!("a verify stopped during qemu-img info answered {reports:?}"),
        Err(e) => e,
    };
    assert_eq!(e.kind, knib_core::ErrorKind::Cancelled, "{e}");
    assert!(e.message.contains("qemu-img") && e.message.contains(" info "), "{e}");
    // Not stopped, the same backup is whole.
    let reports = store.verify(Some(&m.id), &Control::new()).unwrap();
    assert!(report_of(&reports, &m.id).ok, "{reports:?}");
}
