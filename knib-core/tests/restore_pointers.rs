//! A backup file is read from a store or a share others can write: its
//! backing pointers may have been changed. A restore, a quick-restore or
//! boot-test overlay follows only a chain of regular qcow2 files. Before,
//! a backup whose backing pointer named a raw host file restored that
//! file's bytes as the guest's (both data paths), and an overlay on it
//! booted them; a pointer to a FIFO hung the restore.

use std::path::Path;
use std::process::Command;

use knib_core::engine::restore::{restore, RestoreRequest};
use knib_core::engine::DataPath;
use knib_core::qemu_img::{ImageFormat, QemuImg};
use knib_core::{Control, ErrorKind};

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn restores_and_overlays_follow_only_qcow2_files() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // A host file with its own bytes, and a "backup" pointing at it.
    std::fs::write(dir.join("host-secret.raw"), vec![0x5a; 1 << 20]).unwrap();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "-b", "host-secret.raw", "-F", "raw", "raw-backed.qcow2", "1M"]);
    // A pointer to a FIFO (written without opening it).
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "qcow2", "fifo-backed.qcow2", "1M"]);
    // A good chain: qcow2 on qcow2.
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "good.qcow2"]);

    let q = QemuImg::new();
    let ctl = Control::new();
    for (backup, names) in [("raw-backed.qcow2", "host-secret.raw"), ("fifo-backed.qcow2", "fifo")] {
        for data_path in [DataPath::Native, DataPath::QemuImg] {
            let dest = dir.join(format!("out-{backup}-{data_path:?}.raw"));
            let req = RestoreRequest {
                backup_file: dir.join(backup),
                dest: dest.clone(),
                format: ImageFormat::Raw,
                overwrite: false,
                data_path,
            };
            let e = restore(&q, &req, &ctl).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{backup} {data_path:?}: {e}");
            assert!(e.message.contains(names), "{backup} {data_path:?}: {e}");
            assert!(!dest.exists(), "{backup} {data_path:?}: something was restored");
        }
        let overlay = dir.join(format!("overlay-{backup}"));
        let e = knib_core::engine::create_overlay(&q, &dir.join(backup), &overlay, &ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{backup}: {e}");
        assert!(!overlay.exists(), "{backup}: an overlay was made");
    }
    // Nothing but the files made above is there (no temporary left).
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["base.qcow2", "fifo", "fifo-backed.qcow2", "good.qcow2", "host-secret.raw", "raw-backed.qcow2"]);
    // A chain of qcow2 files restores and takes an overlay as before.
    for data_path in [DataPath::Native, DataPath::QemuImg] {
        let dest = dir.join(format!("good-{data_path:?}.raw"));
        let req = RestoreRequest {
            backup_file: dir.join("good.qcow2"),
            dest: dest.clone(),
            format: ImageFormat::Raw,
            overwrite: false,
            data_path,
        };
        restore(&q, &req, &ctl).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 1 << 20);
    }
    knib_core::engine::create_overlay(&q, &dir.join("good.qcow2"), &dir.join("overlay-good.qcow2"), &ctl).unwrap();
}

/// A backing pointer that QEMU reads as a protocol (`file:<path>`,
/// `host_device:`, `json:`): knib found a decoy qcow2 file by that name in
/// the directory and checked it, while qemu-img (its data path, overlays,
/// `agent.restore` quick restores) opened the host file the name points
/// at. Refused as corrupt on both data paths, nothing written.
#[test]
fn a_backing_pointer_qemu_reads_as_a_protocol_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let secret = dir.join("host-secret.raw");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let q = QemuImg::new();
    let ctl = Control::new();
    for (n, pointer) in [
        format!("file:{}", secret.display()),
        format!("host_device:{}", secret.display()),
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}"#, secret.display()),
    ]
    .iter()
    .enumerate()
    {
        // The decoy: a zeroed qcow2 file knib finds by the pointer taken
        // as a relative name (for the first two; a name with '/' in it).
        if !pointer.starts_with("json:") {
            let decoy = dir.join(pointer.trim_start_matches('/'));
            std::fs::create_dir_all(decoy.parent().unwrap()).unwrap();
            qemu_img(&dir, &["create", "-q", "-f", "qcow2", decoy.to_str().unwrap(), "1M"]);
        }
        let backup = format!("protocol-{n}.qcow2");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "-u", "-b", pointer, "-F", "qcow2", &backup, "1M"]);
        for data_path in [DataPath::Native, DataPath::QemuImg] {
            let dest = dir.join(format!("out-{n}-{data_path:?}.raw"));
            let req = RestoreRequest {
                backup_file: dir.join(&backup),
                dest: dest.clone(),
                format: ImageFormat::Raw,
                overwrite: false,
                data_path,
            };
            let e = restore(&q, &req, &ctl).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Corrupt, "{pointer} {data_path:?}: {e}");
            assert!(e.message.contains("names a QEMU protocol"), "{pointer} {data_path:?}: {e}");
            assert!(!dest.exists(), "{pointer} {data_path:?}: something was restored");
        }
        let overlay = dir.join(format!("overlay-{n}.qcow2"));
        let e = knib_core::engine::create_overlay(&q, &dir.join(&backup), &overlay, &ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{pointer}: {e}");
        assert!(!overlay.exists(), "{pointer}: an overlay was made");
    }
}
