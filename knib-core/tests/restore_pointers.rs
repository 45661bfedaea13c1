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
