//! A restore (and a quick-restore overlay) writes under a temporary name of
//! its own beside the destination: whatever sits under the fixed name it
//! used before (`.<name>.part`) is neither written through nor removed, and
//! a destination that appears during the restore is not replaced.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::disk::*;
use knib_core::engine::{self, DataPath, RestoreRequest};
use knib_core::qemu_img::{ImageFormat, QemuImg};
use knib_core::{Control, ErrorKind};

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

/// Run `run` with a pause at `at`; while paused, every entry of `out` but
/// `dest` (knib's temporaries) is replaced by a link to `victim` (hard or
/// symbolic). Its answer.
fn with_temporaries_swapped<T>(
    at: &str,
    out: &Path,
    dest: &Path,
    victim: &Path,
    hard: bool,
    run: impl FnOnce() -> T,
) -> T {
    knib_core::crashpoint::pause_before(at, std::time::Duration::from_secs(300));
    std::thread::scope(|s| {
        s.spawn(|| {
            while_paused(at, || {
                for e in std::fs::read_dir(out).unwrap() {
                    let p = e.unwrap().path();
                    if p != dest {
                        replace_with_link(&p, victim, hard);
                    }
                }
            })
        });
        run()
    })
}

/// `.r.qcow2.part` is someone's file and `.r.raw.part` a link to a file
/// outside: before, the restore truncated and overwrote the first, wrote
/// the image through the link into the file outside, and removed the
/// entry on a failure. Now both are left as they were and the restores
/// succeed, on both data paths, and so does a quick-restore overlay.
#[test]
fn entries_at_the_old_temporary_name_are_neither_written_nor_removed() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x31 0 1M");
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"not an image\n").unwrap();

    for (i, path) in [DataPath::Native, DataPath::QemuImg].into_iter().enumerate() {
        let out = d.path().join(format!("out{i}"));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(".r.qcow2.part"), b"someone else's\n").unwrap();
        std::os::unix::fs::symlink(&victim, out.join(".r.raw.part")).unwrap();
        for (name, format) in [("r.qcow2", ImageFormat::Qcow2), ("r.raw", ImageFormat::Raw)] {
            let dest = out.join(name);
            let req = RestoreRequest {
                backup_file: b.clone(),
                dest: dest.clone(),
                format,
                overwrite: false,
                data_path: path,
            };
            engine::restore(&QemuImg::new(), &req, &Control::new()).unwrap_or_else(|e| panic!("{path:?} {name}: {e}"));
            assert_identical(&dest, &b);
        }
        assert_eq!(std::fs::read(out.join(".r.qcow2.part")).unwrap(), b"someone else's\n", "{path:?}");
        assert_eq!(std::fs::read_link(out.join(".r.raw.part")).unwrap(), victim, "{path:?}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"not an image\n", "{path:?}: written through the link");
        assert_eq!(names(&out), [".r.qcow2.part", ".r.raw.part", "r.qcow2", "r.raw"], "{path:?}");
    }

    let out = d.path().join("quick");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(".o.qcow2.part")).unwrap();
    engine::create_overlay(&QemuImg::new(), &b, &out.join("o.qcow2"), &Control::new()).unwrap();
    assert_identical(&out.join("o.qcow2"), &b);
    assert_eq!(std::fs::read(&victim).unwrap(), b"not an image\n", "overlay written through the link");
    assert_eq!(names(&out), [".o.qcow2.part", "o.qcow2"]);
}

/// The destination is made by someone else once the restore has started
/// (at its first progress report): before, the final rename replaced it
/// with the restored image. Now the restore is refused and the entry left
/// as it is, with no temporary file beside it.
#[test]
fn a_destination_that_appears_meanwhile_is_not_replaced() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x31 0 1M");
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("r.qcow2");
    let made = Arc::new(AtomicBool::new(false));
    let ctl = {
        let (dest, made) = (dest.clone(), made.clone());
        Control::new().with_progress(Arc::new(move |_| {
            if !made.swap(true, Ordering::SeqCst) {
                std::fs::write(&dest, b"mine\n").unwrap();
            }
        }))
    };
    let req = RestoreRequest {
        backup_file: b.clone(),
        dest: dest.clone(),
        format: ImageFormat::Qcow2,
        overwrite: false,
        data_path: DataPath::Native,
    };
    let e = engine::restore(&QemuImg::new(), &req, &ctl).unwrap_err();
    assert!(made.load(Ordering::SeqCst), "no progress was reported");
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("appeared meanwhile"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"mine\n");
    assert_eq!(names(&out), ["r.qcow2"]);
}

/// A restore writes its temporary file through the handle it created it
/// with: the name swapped (while the copy starts) for a hard link to a file
/// outside is refused when the restore would rename it into place, naming
/// it, the linked file untouched and no destination made. Before, the
/// native copy reopened the name, and truncated and wrote the linked file.
#[test]
fn a_restore_temporary_swapped_for_a_hard_link_is_not_written_through() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x31 0 1M");
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    let dest = out.join("r.raw");
    let at = format!("creating {}", out.display());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(2));
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(60)), "no pause at {at}");
            for e in std::fs::read_dir(&out).unwrap() {
                let p = e.unwrap().path();
                std::fs::remove_file(&p).unwrap();
                std::fs::hard_link(&victim, &p).unwrap();
            }
        });
        let req = RestoreRequest {
            backup_file: b.clone(),
            dest: dest.clone(),
            format: ImageFormat::Raw,
            overwrite: false,
            data_path: DataPath::Native,
        };
        engine::restore(&QemuImg::new(), &req, &Control::new()).unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("was replaced while knib wrote it"), "{e}");
    let v = std::fs::read(&victim).unwrap();
    assert!(v == b"not knib's", "the linked file was written ({} bytes)", v.len());
    assert!(!dest.exists());
}

/// A restore's temporary swapped, once created, for a link (symbolic, or
/// hard to a file outside) is written through by neither data path nor by
/// a quick-restore overlay, and never renamed into place: each fails as
/// corrupt, naming the temporary, with the linked file as it was and no
/// destination made. Before, qemu-img opened the temporary by name: it
/// followed a symbolic link and wrote the image into the file outside, and
/// truncated a hard-linked one.
#[test]
fn a_restore_temporary_swapped_for_a_link_once_created_is_not_written_through() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x32 0 1M");
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    for (i, (how, hard)) in
        ["native", "qemu-img", "overlay"].into_iter().flat_map(|h| [(h, false), (h, true)]).enumerate()
    {
        let out = d.path().join(format!("out{i}"));
        std::fs::create_dir(&out).unwrap();
        let dest = out.join("r.qcow2");
        let at = format!("created {}", out.display());
        let e = with_temporaries_swapped(&at, &out, &dest, &victim, hard, || {
            let data_path = if how == "native" { DataPath::Native } else { DataPath::QemuImg };
            let req = RestoreRequest {
                backup_file: b.clone(),
                dest: dest.clone(),
                format: ImageFormat::Qcow2,
                overwrite: false,
                data_path,
            };
            match how {
                "overlay" => engine::create_overlay(&QemuImg::new(), &b, &dest, &Control::new()),
                _ => engine::restore(&QemuImg::new(), &req, &Control::new()),
            }
            .unwrap_err()
        });
        assert_eq!(e.kind, ErrorKind::Corrupt, "{how}, hard {hard}: {e}");
        assert!(e.message.contains("was replaced while knib wrote it"), "{how}, hard {hard}: {e}");
        let v = std::fs::read(&victim).unwrap();
        assert!(v == b"not knib's", "{how}, hard {hard}: the linked file was written ({} bytes)", v.len());
        assert!(std::fs::symlink_metadata(&dest).is_err(), "{how}, hard {hard}: a destination was made");
        assert!(names(&out).is_empty(), "{how}, hard {hard}: {:?}", names(&out));
    }
}

/// A restore's temporary swapped for a link (symbolic, or hard to a file
/// outside) after knib's last look at it and before its rename (the
/// rename's durable step) never stays at the destination, and the linked
/// file is as it was. With no destination before, the entry the rename
/// took there is removed again: the restore fails as corrupt, saying so,
/// and no destination is left. Over an existing destination (overwrite)
/// the rename is an exchange, taken back: the destination keeps what it
/// held (before, the rename replaced it, the entry was removed again, and
/// what the destination held was gone).
#[test]
fn a_temporary_swapped_just_before_its_rename_is_not_left_at_the_destination() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x33 0 1M");
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    for (hard, overwrite) in [(false, false), (true, false), (false, true), (true, true)] {
        let out = d.path().join(format!("out-{hard}-{overwrite}"));
        std::fs::create_dir(&out).unwrap();
        let dest = out.join("r.qcow2");
        if overwrite {
            std::fs::write(&dest, b"the restore before").unwrap();
        }
        let at = format!(" to {}", dest.display());
        let e = with_temporaries_swapped(&at, &out, &dest, &victim, hard, || {
            let req = RestoreRequest {
                backup_file: b.clone(),
                dest: dest.clone(),
                format: ImageFormat::Qcow2,
                overwrite,
                data_path: DataPath::Native,
            };
            engine::restore(&QemuImg::new(), &req, &Control::new()).unwrap_err()
        });
        let case = format!("hard {hard}, overwrite {overwrite}");
        assert_eq!(e.kind, ErrorKind::Corrupt, "{case}: {e}");
        assert!(e.message.contains("was replaced while knib wrote it"), "{case}: {e}");
        if overwrite {
            assert!(e.message.contains("taken back: it holds what it held before"), "{case}: {e}");
            let kept = std::fs::read(&dest).unwrap();
            assert!(kept == b"the restore before", "{case}: the destination holds {} other bytes", kept.len());
            assert!(!std::fs::symlink_metadata(&dest).unwrap().file_type().is_symlink(), "{case}");
            assert_eq!(names(&out), ["r.qcow2"], "{case}");
        } else {
            let says = format!("that entry was renamed to {} and removed again", dest.display());
            assert!(e.message.contains(&says), "{case}: {e}");
            assert!(std::fs::symlink_metadata(&dest).is_err(), "{case}: left at the destination");
            assert!(names(&out).is_empty(), "{case}: {:?}", names(&out));
        }
        let v = std::fs::read(&victim).unwrap();
        assert!(v == b"not knib's", "{case}: the linked file was written ({} bytes)", v.len());
    }
}

/// `fsio::write_atomic` (manifests, journals, settings) whose temporary is
/// swapped for a link (symbolic, or hard to a file outside) before its
/// rename fails as corrupt and leaves the file it writes as it was: never
/// a link, never the linked file's content, the linked file untouched, no
/// temporary left. Before, the temporary was renamed by name, link and all.
#[test]
fn a_metadata_temporary_swapped_before_its_rename_leaves_the_file() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    for (hard, before) in [(false, true), (true, true), (false, false), (true, false)] {
        let out = d.path().join(format!("meta-{hard}-{before}"));
        std::fs::create_dir(&out).unwrap();
        let file = out.join("manifest.json");
        if before {
            std::fs::write(&file, b"{\"before\": true}").unwrap();
        }
        let at = format!("write {}", file.display());
        let e = with_temporaries_swapped(&at, &out, &file, &victim, hard, || {
            knib_core::fsio::write_atomic(&file, b"{\"after\": true}").unwrap_err()
        });
        let case = format!("hard {hard}, a file before {before}");
        assert_eq!(e.kind, ErrorKind::Corrupt, "{case}: {e}");
        assert!(e.message.contains("was replaced while knib wrote it"), "{case}: {e}");
        if before {
            assert_eq!(std::fs::read(&file).unwrap(), b"{\"before\": true}", "{case}");
            assert!(!std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink(), "{case}");
            assert_eq!(names(&out), ["manifest.json"], "{case}");
        } else {
            assert!(std::fs::symlink_metadata(&file).is_err(), "{case}: a file was made");
            assert!(names(&out).is_empty(), "{case}: {:?}", names(&out));
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"not knib's", "{case}: the linked file was written");
    }
}
