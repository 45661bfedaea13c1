//! The catalog's JSON operations take absolute paths only (as the agent's
//! do): a relative or empty `store` or `to` would be read from the
//! working directory of whatever process hosts knib (a JVM, a C program).
//! Each is refused before anything is read or written, naming the field.

mod common;

use common::disk::*;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::{Control, ErrorKind};
use serde_json::json;

fn call(op: &str, req: serde_json::Value) -> knib_core::Result<String> {
    knib_core::api::call(op, &req.to_string(), &Control::new())
}

/// Before, `restore` with `"to": "<relative>"` wrote the image into the
/// test's working directory and `backup` with a relative `store` made a
/// store there; `group.restore` and `files.get` went on to look for the
/// group or backup. Each is now refused, naming the field, and nothing
/// appears in the working directory.
#[test]
fn relative_or_empty_paths_are_refused_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("d.qcow2");
    make_disk(&disk, 4 << 20, &[]);
    qemu_io(&disk, "write -P 0x31 0 1M");
    let store_dir = d.path().join("st");
    let store = Store::create(&store_dir).unwrap();
    let m = store
        .backup("v", &[DiskSpec { name: "d".into(), path: disk.clone() }], &BackupOptions::default(), &Control::new())
        .unwrap();
    let rel = format!("knib-api-paths-{}", std::process::id());
    // What a request left in the working directory under that name (or a
    // temporary name made from it).
    let left = || {
        std::fs::read_dir(".")
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(&rel))
            .collect::<Vec<_>>()
    };

    let cases = [
        ("restore", "to", json!({"store": store_dir, "backup": m.id, "volume": "d", "to": rel})),
        ("restore", "to", json!({"store": store_dir, "backup": m.id, "volume": "d", "to": ""})),
        ("restore", "store", json!({"store": "st", "backup": m.id, "volume": "d", "to": d.path().join("r")})),
        ("backup", "store", json!({"store": rel, "vm": "v2", "disks": [{"name": "d", "path": disk}]})),
        ("group.restore", "to", json!({"store": store_dir, "group": "g", "to": rel})),
        ("files.get", "to", json!({"store": store_dir, "backup": m.id, "volume": "d", "path": "/", "to": rel})),
        ("files.ls", "store", json!({"store": "", "backup": m.id, "volume": "d"})),
        ("list", "store", json!({"store": rel})),
        ("vm.settings", "store", json!({"store": rel, "vm": "v", "backup_method": "snapshot"})),
        ("jobs.list", "store", json!({"store": rel})),
        ("jobs.queue", "store", json!({"store": rel, "kind": "compress", "backup": m.id})),
        ("jobs.show", "store", json!({"store": "", "job": "compress-x"})),
        ("jobs.cancel", "store", json!({"store": rel, "job": "compress-x"})),
    ];
    for (op, field, req) in cases {
        let r = call(op, req.clone());
        let stray = left();
        for p in &stray {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
        let e = r.expect_err(&format!("{op} {req}"));
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{op} {req}: {e}");
        assert!(e.message.starts_with(&format!("request of {op}: field `{field}`")), "{op} {req}: {e}");
        assert!(stray.is_empty(), "{op} {req} wrote {stray:?}");
    }
    let e = call("restore", json!({"store": store_dir, "backup": m.id, "volume": "d", "to": ""})).unwrap_err();
    assert_eq!(e.message, "request of restore: field `to` is empty");

    // A vault where a store directory is needed is named as one, not as
    // a relative path (before: "s3://... is not an absolute path").
    let vault = "s3://bucket/prefix";
    for (op, req) in [
        ("compress", json!({"store": vault, "backup": m.id})),
        ("hash", json!({"store": vault, "backup": m.id})),
        ("recover", json!({"store": vault, "domain": "v"})),
        ("vm.settings", json!({"store": vault, "vm": "v", "backup_method": "snapshot"})),
        ("group.list", json!({"store": vault})),
        ("jobs.list", json!({"store": vault})),
        ("jobs.queue", json!({"store": vault, "kind": "validate", "backup": m.id})),
        ("jobs.show", json!({"store": vault, "job": "compress-x"})),
        ("jobs.cancel", json!({"store": vault, "job": "compress-x"})),
    ] {
        let e = call(op, req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{op}: {e}");
        assert!(
            e.message.starts_with(&format!("request of {op}: field `store`: s3://bucket/prefix is a vault")),
            "{op}: {e}"
        );
    }

    // Absolute paths are taken as before.
    let to = d.path().join("r.qcow2");
    call("restore", json!({"store": store_dir, "backup": m.id, "volume": "d", "to": to})).unwrap();
    assert_identical(&to, &disk);
}
