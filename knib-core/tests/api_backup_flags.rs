//! `backup` with `full` and `isolated` both set: refused, as the CLI
//! refuses `--full --isolated`.

mod common;

use common::disk::*;
use knib_core::{Control, ErrorKind};
use serde_json::json;

/// Before, the request took an isolated backup, silently dropping `full`.
/// Now it is refused naming both fields, before the store is even made.
#[test]
fn full_and_isolated_together_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("d.qcow2");
    make_disk(&disk, 4 << 20, &[]);
    let store = d.path().join("st");
    let req =
        json!({"store": store, "vm": "v", "disks": [{"name": "d", "path": disk}], "full": true, "isolated": true});
    let e = knib_core::api::call("backup", &req.to_string(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("`full` and `isolated`"), "{e}");
    assert!(!store.exists(), "the store was made");

    // The catalog refuses it too, for Rust callers.
    let s = knib_core::catalog::Store::create(&store).unwrap();
    let opts = knib_core::catalog::BackupOptions { full: true, isolated: true, ..Default::default() };
    let disks = [knib_core::catalog::DiskSpec { name: "d".into(), path: disk }];
    let e = s.backup("v", &disks, &opts, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("full and isolated exclude each other"), "{e}");
    assert!(s.list(Some("v")).unwrap().is_empty());
}
