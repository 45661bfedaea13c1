//! `agent.restore` replaces all of its volumes or none: a volume path that
//! cannot be replaced (a directory) is refused before anything is staged
//! or renamed, so the first volume is not replaced alone.

mod common;

use common::disk::*;
use knib_core::{Control, ErrorKind};
use serde_json::json;

#[test]
fn a_volume_that_cannot_be_replaced_refuses_the_whole_restore_first() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.qcow2");
    make_disk(&backup, 8 << 20, &[]);
    qemu_io(&backup, "write -P 0x5b 1M 1M");
    let v0 = dir.path().join("v0.qcow2");
    make_disk(&v0, 8 << 20, &[]);
    qemu_io(&v0, "write -P 0x11 0 64k");
    let before = std::fs::read(&v0).unwrap();
    let v1 = dir.path().join("v1.qcow2");
    std::fs::create_dir(&v1).unwrap();
    let req = json!({"volumes": [
        {"uuid": "a", "backup_path": backup, "volume_path": v0},
        {"uuid": "b", "backup_path": backup, "volume_path": v1},
    ]});
    let e = knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("volumes[1].volume_path") && e.message.contains("not a regular file"), "{e}");
    assert_eq!(std::fs::read(&v0).unwrap(), before, "the first volume was replaced alone");
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, vec!["backup.qcow2", "v0.qcow2", "v1.qcow2"], "nothing staged is left");
    // The same request with a file there restores both.
    std::fs::remove_dir(&v1).unwrap();
    knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap();
    assert_identical(&v0, &backup);
    assert_identical(&v1, &backup);
}
