//! Two agent requests at once on the same files, as CloudStack's agent
//! runs commands in parallel threads: a merge of a VM snapshot delta into
//! its parent while the parent is hashed, restored from or compressed, and
//! the other way round. A file a merge writes is not read (busy, naming
//! it), a file being read is not merged into; before, a hash of a parent
//! half merged, and a restore holding a mix of before and after, were
//! answered as success.

#[path = "common/disk.rs"]
mod disk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use disk::{assert_identical, contents, make_disk, qemu_io, snapshot};
use knib_core::api::call;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn agent(op: &str, req: &Value) -> Result<Value, KnibError> {
    call(op, &req.to_string(), &Control::new()).map(|a| serde_json::from_str(&a).unwrap())
}

/// A parent and a child over it, each with data, in `dir`.
fn pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (parent, child) = (dir.join("parent.qcow2"), dir.join("child.qcow2"));
    make_disk(&parent, 16 * MIB, &[]);
    qemu_io(&parent, "write -P 0x11 0 8M");
    make_disk(&child, 16 * MIB, &["-F", "qcow2", "-b", "parent.qcow2"]);
    qemu_io(&child, "write -P 0x22 4M 8M");
    (parent, child)
}

fn assert_busy(r: Result<Value, KnibError>, names: &Path, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.kind, ErrorKind::Busy, "{what}: {e}");
    assert!(e.message.contains(&names.display().to_string()), "{what}: must name {}: {e}", names.display());
}

/// Wait until `held` says another process holds `file` (looked at, no
/// lock taken).
fn wait_until_held(file: &Path, held: fn(&std::fs::File) -> std::io::Result<bool>) {
    let t = std::time::Instant::now();
    // (A lock file may not be made yet.)
    while !std::fs::File::open(file).is_ok_and(|f| held(&f).unwrap()) {
        assert!(t.elapsed() < Duration::from_secs(30), "nothing ever held {}", file.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until a merge holds `file` (QEMU's writer locks).
fn wait_held_like_qemu(file: &Path) {
    wait_until_held(file, knib_core::lock::held_like_qemu)
}

/// Wait until another operation holds `file` (the lock of
/// `hold_for_one_operation`).
fn wait_held_by_an_operation(file: &Path) {
    wait_until_held(file, knib_core::lock::held_by_one_operation)
}

#[test]
fn a_parent_being_merged_into_is_not_read() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (parent, child) = pair(&dir);
    let reference = dir.join("reference.raw");
    snapshot(&child, &reference);
    // The merge stops once it holds its locks, before it writes, until
    // the three requests are refused (each refusal takes about a second
    // of tries: a fixed pause would race them on a loaded machine).
    let at = format!("merge of {} into {}: writing", child.display(), parent.display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(300));
    let req = json!({"running": false, "merges": [{"parent": parent, "child": child}]});
    let merge = std::thread::spawn(move || agent("agent.merge_snapshot", &req));
    // Wait until the merge holds the parent's locks (looked at, none taken).
    let restored = dir.join("restored.qcow2");
    assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the merge never paused");
    wait_held_like_qemu(&parent);
    let before = contents(&dir);
    assert_busy(agent("agent.take_hash", &json!({"files": [parent]})), &parent, "hash");
    let volume = json!({"backup_path": child, "volume_path": restored});
    // The merge holds the child too (it removes it after).
    assert_busy(agent("agent.restore", &json!({"volumes": [volume]})), &child, "restore");
    assert_busy(agent("agent.compress", &json!({"files": [parent]})), &parent, "compress");
    assert!(contents(&dir) == before, "a refused request wrote something");
    knib_core::crashpoint::release_pause(&at);
    merge.join().unwrap().unwrap();
    assert_identical(&parent, &reference);
    agent("agent.take_hash", &json!({"files": [parent]})).unwrap();
}

#[test]
fn a_parent_being_read_is_not_merged_into() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (parent, child) = pair(&dir);
    let before = contents(&dir);
    // A reader as agent.take_hash, agent.restore and agent.compress hold.
    let held = knib_core::lock::hold_for_reading(&[parent.as_path()], "a test").unwrap();
    let req = json!({"running": false, "merges": [{"parent": parent, "child": child}]});
    assert_busy(agent("agent.merge_snapshot", &req), &parent, "merge");
    assert!(contents(&dir) == before, "the refused merge wrote something");
    drop(held);
    let reference = dir.join("reference.raw");
    snapshot(&child, &reference);
    agent("agent.merge_snapshot", &req).unwrap();
    assert_identical(&parent, &reference);
}

/// A backup volume of a stopped VM without a domain, as the agent sends it.
fn stopped_volume(path: &Path, delta: &Path, store: &Path, parent: Option<&Path>, merge: Option<Value>) -> Value {
    let mut v = json!({"uuid": "u1", "path": path, "delta_path_on_primary": delta, "delta_path_on_store": store});
    if let Some(p) = parent {
        v["parent_backup_path"] = json!(p);
    }
    if let Some(m) = merge {
        v["merge"] = m;
    }
    v
}

/// `request` with its one volume's uuid set to `uuid`.
fn uuid_is(mut request: Value, uuid: &str) -> Value {
    request["volumes"][0]["uuid"] = json!(uuid);
    request
}

#[test]
fn a_stopped_volume_being_backed_up_is_not_backed_up_merged_or_restored_by_another_request() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let base = dir.join("base.qcow2");
    make_disk(&base, 16 * MIB, &[]);
    qemu_io(&base, "write -P 0x11 0 8M");
    let (d1, b1) = (dir.join("d1.qcow2"), store.join("b1.qcow2"));
    let full = json!({"running": false, "volumes": [stopped_volume(&base, &d1, &b1, None, None)]});
    agent("agent.take_backup", &full).unwrap();
    qemu_io(&d1, "write -P 0x22 4M 8M");
    let reference = dir.join("reference.raw");
    snapshot(&d1, &reference);
    // The incremental stops once it holds its files, before it makes the
    // new delta d2 over d1 (then copies d1, merges it into base), until the
    // refusals below are done (each takes about a second of tries).
    let merge = json!({"parent": base, "child": d1});
    let (d2, b2) = (dir.join("d2.qcow2"), store.join("b2.qcow2"));
    let first = json!({"running": false, "volumes": [stopped_volume(&d1, &d2, &b2, Some(&b1), Some(merge.clone()))]});
    // (The pause's name is this test's own: no other test of this file
    // names a volume u1-held.)
    let first = uuid_is(first, "u1-held");
    knib_core::crashpoint::pause_before("snapshot of volume u1-held", Duration::from_secs(300));
    let taking = std::thread::spawn(move || agent("agent.take_backup", &first));
    wait_held_by_an_operation(&d1);
    let before = contents(&dir);
    // The same backup asked again with its own new files (a retried
    // command): before, it merged d1 a second time under the first, and
    // its new delta lost its backing file.
    let (d2b, b2b) = (dir.join("d2b.qcow2"), store.join("b2b.qcow2"));
    let second =
        json!({"running": false, "volumes": [stopped_volume(&d1, &d2b, &b2b, Some(&b1), Some(merge.clone()))]});
    assert_busy(agent("agent.take_backup", &second), &d1, "second backup");
    let cleanup = json!({"running": false, "mode": "discard", "volumes": [stopped_volume(&d1, &d2b, &b2b, Some(&b1), Some(merge.clone()))]});
    assert_busy(agent("agent.cleanup_vm_backup", &cleanup), &d1, "cleanup");
    assert_busy(
        agent("agent.merge_snapshot", &json!({"running": false, "merges": [merge]})),
        &base,
        "merge of the same delta",
    );
    let restore = json!({"volumes": [{"backup_path": b1, "volume_path": d1}]});
    assert_busy(agent("agent.restore", &restore), &d1, "restore over the volume");
    assert!(contents(&dir) == before, "a refused request wrote something");
    assert!(!taking.is_finished(), "the first backup went on before the refusals were done");
    knib_core::crashpoint::release_pause("snapshot of volume u1-held");
    taking.join().unwrap().unwrap();
    // What a user checks: the volume's new chain and the backup hold the
    // disk as it was.
    assert_identical(&d2, &reference);
    assert_identical(&b2, &reference);
    assert!(!d2b.exists() && !b2b.exists());
    // The refused backup's cleanup, asked once the first backup is done:
    // the volume runs on d2 (over base), which that request does not name.
    // Before, the cleanup answered base as the volume's file (the VM would
    // start without d2).
    let before = contents(&dir);
    let e = agent("agent.cleanup_vm_backup", &cleanup).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message.starts_with("request of agent.cleanup_vm_backup: volume u1: ")
            && e.message.contains(&format!("{} sits on the base {}", d2.display(), base.display())),
        "{e}"
    );
    assert!(contents(&dir) == before, "the refused cleanup wrote something");
}

#[test]
fn a_volume_being_restored_is_not_restored_by_another_request() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (x, y) = (dir.join("x.qcow2"), dir.join("y.qcow2"));
    make_disk(&x, 16 * MIB, &[]);
    qemu_io(&x, "write -P 0x33 0 8M");
    make_disk(&y, 16 * MIB, &[]);
    qemu_io(&y, "write -P 0x44 0 8M");
    // Over a volume, and to a new one (a volume restored from a backup).
    for exists in [true, false] {
        let volume = dir.join(format!("volume-{exists}.qcow2"));
        if exists {
            make_disk(&volume, 16 * MIB, &[]);
        }
        knib_core::crashpoint::pause_before(
            &format!("agent.restore: volumes held, {} first", volume.display()),
            Duration::from_secs(3),
        );
        let req = json!({"volumes": [{"backup_path": x, "volume_path": volume}]});
        let first = std::thread::spawn(move || agent("agent.restore", &req));
        wait_held_by_an_operation(&dir.join(format!(".volume-{exists}.qcow2.knib-restore.lock")));
        let before = contents(&dir);
        // Before, the second removed the first's staging file and wrote its
        // own under the same name; one of them failed naming files the
        // other had moved.
        for quick in [false, true] {
            let other = json!({"volumes": [{"backup_path": y, "volume_path": volume}], "quick_restore": quick});
            assert_busy(agent("agent.restore", &other), &volume, "second restore");
        }
        assert!(contents(&dir) == before, "a refused restore wrote something");
        first.join().unwrap().unwrap();
        assert_identical(&volume, &x);
        // Nothing left beside the volume; the next restore runs.
        let hidden: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
        agent("agent.restore", &json!({"volumes": [{"backup_path": y, "volume_path": volume}]})).unwrap();
        assert_identical(&volume, &y);
    }
}

/// libvirt's virtlockd, locking disk files directly, holds a POSIX write
/// lock on byte 0 of each writable disk of a running domain, and libvirt's
/// security manager one on byte 1 while it relabels a file. knib's own
/// one-operation lock is on another byte: a request on those volumes is
/// not refused as busy because of them (it was, every time, when knib's
/// lock was on byte 0; on byte 1 it was whenever libvirt relabeled).
#[test]
fn posix_locks_on_bytes_zero_and_one_as_libvirt_holds_do_not_make_a_request_busy() {
    use std::os::fd::AsRawFd;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let (base, d1, b1) = (dir.join("base.qcow2"), dir.join("d1.qcow2"), store.join("b1.qcow2"));
    make_disk(&base, 16 * MIB, &[]);
    qemu_io(&base, "write -P 0x5c 0 4M");
    let reference = dir.join("reference.raw");
    snapshot(&base, &reference);
    let held = std::fs::OpenOptions::new().read(true).write(true).open(&base).unwrap();
    for byte in [0, 1] {
        let fl = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as nix::libc::c_short,
            l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        nix::fcntl::fcntl(held.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLK(&fl)).unwrap();
    }
    let full = json!({"running": false, "volumes": [stopped_volume(&base, &d1, &b1, None, None)]});
    agent("agent.take_backup", &full).unwrap();
    assert_identical(&b1, &reference);
    drop(held);
}
