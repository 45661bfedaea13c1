//! Store files that are not what knib writes there, planted by someone who
//! can write into the store: a FIFO in place of a manifest, a journal, a
//! job file or `knib.json` must be refused at once, naming the file (not
//! wait forever for a writer, holding the VM's lock or the job queue's),
//! and a huge (sparse) file in their place must be refused before it is
//! read into memory; and a store path that is a file, a FIFO or a device
//! must be refused as not a directory, naming it. The `.knib-since`
//! marker beside a disk (what its delta follows) is read the same way: a
//! FIFO, a link to `/dev/zero` or a huge file there makes the next backup
//! a full one saying why, at once.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use knib_core::catalog::jobs::{run_jobs, RunOptions};
use knib_core::catalog::Store;
use knib_core::{ErrorKind, KnibError};

const ID: &str = "20260101-000000000-0000";
const TOO_LARGE: &str = "is larger than 16777216 bytes, the most a JSON file of a store may have";

/// Run `f` on the store in a thread; panic if it has not returned in 10 s.
fn within_10s<T: Send + 'static>(store: &Store, f: impl FnOnce(&Store) -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let store = Store::open(store.root()).unwrap();
    std::thread::spawn(move || tx.send(f(&store)));
    rx.recv_timeout(Duration::from_secs(10)).expect("the operation hung on a FIFO planted in the store")
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A huge file at `p` that takes no room (100 GiB, sparse).
fn huge(p: &Path) {
    std::fs::File::create(p).unwrap().set_len(100 << 30).unwrap();
}

/// A store with VM `vm1`, a backup directory `ID` and a jobs directory.
fn store() -> (tempfile::TempDir, Store, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("store");
    std::fs::create_dir_all(root.join("vms/vm1").join(ID)).unwrap();
    std::fs::create_dir_all(root.join("jobs")).unwrap();
    let store = Store::open(&root).unwrap();
    (d, store, root)
}

fn assert_refused(e: &KnibError, path: &Path, why: &str) {
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.ends_with(&format!("{} {why}", path.display())), "must name {} ({why}): {e}", path.display());
}

#[test]
fn a_fifo_manifest_is_skipped_by_list_and_refused_by_show() {
    let (_d, store, root) = store();
    let manifest = root.join("vms/vm1").join(ID).join("manifest.json");
    mkfifo(&manifest);
    let listed = within_10s(&store, |s| s.list(None)).unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    let e = within_10s(&store, |s| s.show(ID)).unwrap_err();
    assert_eq!(e.message, format!("manifest {} is not a regular file", manifest.display()));
    assert_refused(&e, &manifest, "is not a regular file");
}

#[test]
fn a_huge_manifest_is_refused_unread() {
    let (_d, store, root) = store();
    let manifest = root.join("vms/vm1").join(ID).join("manifest.json");
    huge(&manifest);
    let e = store.show(ID).unwrap_err();
    assert_eq!(e.message, format!("manifest {} {TOO_LARGE}", manifest.display()));
    assert_refused(&e, &manifest, TOO_LARGE);
    assert!(store.list(None).unwrap().is_empty());
}

#[test]
fn a_fifo_or_huge_settings_file_is_refused() {
    let (_d, store, root) = store();
    let settings = root.join("knib.json");
    mkfifo(&settings);
    let e = within_10s(&store, |s| s.settings()).unwrap_err();
    assert_refused(&e, &settings, "is not a regular file");
    std::fs::remove_file(&settings).unwrap();
    huge(&settings);
    let e = store.settings().unwrap_err();
    assert_refused(&e, &settings, TOO_LARGE);
}

#[cfg(feature = "libvirt")]
#[test]
fn a_fifo_or_huge_journal_is_refused() {
    let (_d, store, root) = store();
    let journal = root.join("vms/vm1/journal.json");
    mkfifo(&journal);
    let e = within_10s(&store, |s| s.interrupted_vault("vm1")).unwrap_err();
    assert_refused(&e, &journal, "is not a regular file");
    std::fs::remove_file(&journal).unwrap();
    huge(&journal);
    let e = store.interrupted_vault("vm1").unwrap_err();
    assert_refused(&e, &journal, TOO_LARGE);
}

#[test]
fn a_fifo_job_file_is_refused_and_the_queue_is_not_held_forever() {
    let (_d, store, root) = store();
    let job = root.join("jobs/j1.json");
    mkfifo(&job);
    let e = within_10s(&store, |s| s.jobs()).unwrap_err();
    assert_refused(&e, &job, "is not a regular file");
    let e = within_10s(&store, |s| run_jobs(s, &RunOptions { no_wait: true, ..Default::default() })).unwrap_err();
    assert_refused(&e, &job, "is not a regular file");
}

#[test]
fn a_huge_job_file_is_refused_unread() {
    let (_d, store, root) = store();
    let job = root.join("jobs/j1.json");
    huge(&job);
    let e = store.jobs().unwrap_err();
    assert_eq!(e.message, format!("job file {} {TOO_LARGE}", job.display()));
    assert_refused(&e, &job, TOO_LARGE);
}

#[test]
fn a_store_path_that_is_not_a_directory_is_refused_naming_it() {
    use knib_core::api::call;
    use knib_core::Control;
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = d.path().join("a-file");
    std::fs::write(&file, b"not a store").unwrap();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    for root in [file.clone(), fifo, PathBuf::from("/dev/null")] {
        let want = format!("store {} is not a directory", root.display());
        let (tx, rx) = mpsc::channel();
        let disks = serde_json::json!([{"name": "a", "path": disk}]);
        let reqs = [
            ("list", serde_json::json!({"store": root})),
            ("backup", serde_json::json!({"store": root, "vm": "v", "disks": disks})),
        ];
        std::thread::spawn(move || {
            for (op, req) in reqs {
                tx.send((op, call(op, &req.to_string(), &Control::new()))).unwrap();
            }
        });
        for _ in 0..2 {
            let (op, got) = rx.recv_timeout(Duration::from_secs(10)).expect("hung on the store path");
            let e = got.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{op} on {}: {e}", root.display());
            assert_eq!(e.message, want, "{op}");
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a store");
    // Missing, and a directory that is not a store: NotFound as before.
    let e =
        call("list", &serde_json::json!({"store": d.path().join("none")}).to_string(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let e = call("list", &serde_json::json!({"store": d.path()}).to_string(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.ends_with("is not a knib store (it holds no vms/, jobs/, groups/ or knib.json)"), "{e}");
}

#[path = "common/disk.rs"]
mod disk;

#[test]
fn a_since_marker_that_is_not_a_small_regular_file_makes_the_next_backup_full_at_once() {
    use knib_core::catalog::BackupOptions;
    let disks = disk::TestDisks::two();
    let d = tempfile::tempdir().unwrap();
    let store = Store::create(d.path().join("store")).unwrap();
    let opts = BackupOptions::default();
    let ctl = knib_core::Control::new();
    store.backup("vm1", &disks.disks, &opts, &ctl).unwrap();
    let marker = PathBuf::from(format!("{}.knib-since", disks.path("root").display()));
    assert!(marker.exists(), "the first backup writes the marker");
    fn zero(p: &Path) {
        std::os::unix::fs::symlink("/dev/zero", p).unwrap()
    }
    fn big(p: &Path) {
        std::fs::write(p, vec![b' '; 1 << 20]).unwrap()
    }
    type Plant = fn(&Path);
    let cases: [(&str, Plant, &str); 3] = [
        ("a FIFO", mkfifo, "is not a regular file"),
        ("a link to /dev/zero", zero, "is a symbolic link"),
        ("a megabyte", big, "is larger than 4096 bytes"),
    ];
    for (what, plant, says) in cases {
        std::fs::remove_file(&marker).unwrap();
        plant(&marker);
        let disks_now = disks.disks.clone();
        let m = within_10s(&store, move |s| {
            s.backup("vm1", &disks_now, &BackupOptions::default(), &knib_core::Control::new())
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let why = m.full_reason.unwrap_or_else(|| panic!("{what}: the backup must be full, saying why"));
        assert!(why.contains(&format!("{} {says}", marker.display())), "{what}: {why}");
        assert!(std::fs::symlink_metadata(&marker).unwrap().is_file(), "{what}: the backup writes a new marker");
    }
}
