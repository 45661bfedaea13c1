//! `recover` with `discard` through the one API (as C and Java call it): an
//! interrupted backup's journal that recover cannot act on is set aside in
//! the store, without libvirt and without the domain; `discard` with
//! `vault` is refused before anything is done.

mod common;

use common::disk::*;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::{Control, ErrorKind};
use serde_json::json;

fn call(op: &str, req: serde_json::Value) -> knib_core::Result<serde_json::Value> {
    knib_core::api::call(op, &req.to_string(), &Control::new()).map(|t| serde_json::from_str(&t).unwrap())
}

#[test]
fn recover_with_discard_sets_a_damaged_journal_aside_without_the_domain() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("d.qcow2");
    make_disk(&disk, 4 << 20, &[]);
    qemu_io(&disk, "write -P 0x31 0 1M");
    let store_dir = d.path().join("st");
    let store = Store::create(&store_dir).unwrap();
    store
        .backup(
            "gone",
            &[DiskSpec { name: "d".into(), path: disk.clone() }],
            &BackupOptions::default(),
            &Control::new(),
        )
        .unwrap();
    let journal = store_dir.join("vms/gone/journal.json");
    // Half of a journal: a write cut short by a full disk.
    std::fs::write(&journal, b"{\"schema\": 1, \"step\": \"cop").unwrap();
    let disk_before = std::fs::read(&disk).unwrap();

    let e = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true, "vault": "s3://b/p"}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("`discard` and `vault`"), "{e}");
    assert!(journal.exists());

    let a = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true})).unwrap();
    let j = &a["discarded"][0];
    assert_eq!(a["discarded"].as_array().unwrap().len(), 1, "{a}");
    assert_eq!(j["method"], "snapshot", "{a}");
    assert!(j["backup_id"].is_null() && j["unreadable"].as_str().unwrap().contains("is corrupted"), "{a}");
    let kept = std::path::PathBuf::from(j["kept_as"].as_str().unwrap());
    assert_eq!(std::fs::read(&kept).unwrap(), b"{\"schema\": 1, \"step\": \"cop");
    assert!(!journal.exists());
    assert_eq!(a["backup_id"], serde_json::Value::Null, "{a}");
    assert_eq!(std::fs::read(&disk).unwrap(), disk_before);
    assert_eq!(store.list(None).unwrap().len(), 1);

    let a = call("recover", json!({"store": store_dir, "domain": "gone", "discard": true})).unwrap();
    assert_eq!(a["discarded"], json!([]), "{a}");
    let e = call("recover", json!({"store": store_dir, "domain": "never", "discard": true})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(!store_dir.join("vms/never").exists());
}
