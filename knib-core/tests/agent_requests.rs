//! `agent.validate` requests refused before anything is booted: a path
//! that is not absolute (libvirt and QEMU would resolve it against their
//! own directory, not knib's) and a screenshot wait over an hour (it
//! panicked on an overflow, after the domain had booted), each naming the
//! field.

use knib_core::{Control, ErrorKind};
use serde_json::json;

fn refused(req: serde_json::Value) -> knib_core::KnibError {
    knib_core::api::call("agent.validate", &req.to_string(), &Control::new()).unwrap_err()
}

#[test]
fn validation_requests_with_relative_paths_or_endless_waits_are_refused() {
    let disk = json!([{"target": "vda", "path": "/var/tmp/nonexistent-knib-backup.qcow2"}]);
    for (field, req) in [
        ("work_dir", json!({"disks": disk, "work_dir": "work"})),
        ("disks[0].path", json!({"disks": [{"target": "vda", "path": "b.qcow2"}], "work_dir": "/var/tmp"})),
        ("kernel", json!({"disks": disk, "work_dir": "/var/tmp", "kernel": "boot/vmlinuz"})),
        ("initrd", json!({"disks": disk, "work_dir": "/var/tmp", "initrd": "initrd.img"})),
    ] {
        let e = refused(req);
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{field}: {e}");
        assert!(e.message.contains(field), "{field}: {e}");
    }
    let e = refused(json!({"disks": disk, "work_dir": "/var/tmp", "screenshot_wait_secs": u64::MAX}));
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("screenshot_wait_secs"), "{e}");
}
