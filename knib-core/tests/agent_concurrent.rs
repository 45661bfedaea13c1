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

#[test]
fn a_parent_being_merged_into_is_not_read() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (parent, child) = pair(&dir);
    let reference = dir.join("reference.raw");
    snapshot(&child, &reference);
    // The merge stops for a while once it holds its locks, before it writes.
    knib_core::crashpoint::pause_before(
        &format!("merge of {} into {}: writing", child.display(), parent.display()),
        Duration::from_secs(4),
    );
    let req = json!({"running": false, "merges": [{"parent": parent, "child": child}]});
    let merge = std::thread::spawn(move || agent("agent.merge_snapshot", &req));
    // Wait until the merge holds the parent's locks (looked at, none taken).
    let restored = dir.join("restored.qcow2");
    let t = std::time::Instant::now();
    let f = std::fs::File::open(&parent).unwrap();
    while !knib_core::lock::held_like_qemu(&f).unwrap() {
        assert!(t.elapsed() < Duration::from_secs(30), "the merge never held the parent");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = contents(&dir);
    assert_busy(agent("agent.take_hash", &json!({"files": [parent]})), &parent, "hash");
    let volume = json!({"backup_path": child, "volume_path": restored});
    // The merge holds the child too (it removes it after).
    assert_busy(agent("agent.restore", &json!({"volumes": [volume]})), &child, "restore");
    assert_busy(agent("agent.compress", &json!({"files": [parent]})), &parent, "compress");
    assert!(contents(&dir) == before, "a refused request wrote something");
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
