//! `agent.restore` replaces all of its volumes or none: a volume path that
//! cannot be replaced (a directory) is refused before anything is staged
//! or renamed, so the first volume is not replaced alone; and an old delta
//! to remove that is a file of the backup chain (or a directory) refuses
//! the restore before anything changes, quick or plain.

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

/// A qcow2 overlay `top` over `base`, named relative to `top`'s directory.
fn overlay(base: &std::path::Path, top: &std::path::Path) {
    let name = base.file_name().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(name)
        .arg(top)
        .current_dir(top.parent().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn old_deltas_that_are_files_of_the_backup_chain_or_directories_refuse_the_restore_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The backup chain: base <- inc (a relative pointer, as a store has).
    let (base, inc) = (d.join("base.qcow2"), d.join("inc.qcow2"));
    make_disk(&base, 8 << 20, &[]);
    qemu_io(&base, "write -P 0x21 0 1M");
    overlay(&base, &inc);
    qemu_io(&inc, "write -P 0x22 1M 1M");
    let reference = d.join("reference.raw");
    snapshot(&inc, &reference);
    // The volume on primary, on an old delta over an old base.
    let (old_base, vol) = (d.join("old-base.qcow2"), d.join("volume.qcow2"));
    make_disk(&old_base, 8 << 20, &[]);
    overlay(&old_base, &vol);
    qemu_io(&vol, "write -P 0x11 0 64k");
    let a_dir = d.join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    for quick in [false, true] {
        let request = |deltas: serde_json::Value| {
            json!({"quick_restore": quick, "deltas_to_remove": deltas,
                "volumes": [{"uuid": "u", "backup_path": inc, "volume_path": vol}]})
        };
        let before = contents(d);
        for (bad, why) in [
            (&inc, format!("is {} of the backup chain of volume u", inc.display())),
            (&base, format!("is {} of the backup chain of volume u", base.display())),
            (&a_dir, "is a directory".to_string()),
        ] {
            let req = request(json!([old_base, bad]));
            let e = knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
            let named = format!("request of agent.restore: deltas_to_remove[1] {} {why}", bad.display());
            assert!(e.message.starts_with(&named), "quick {quick}: {e}");
            assert_eq!(contents(d), before, "quick {quick}: something changed");
        }
        // Only the old base: the restore goes ahead and removes it.
        let req = request(json!([old_base]));
        let a: serde_json::Value =
            serde_json::from_str(&knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap())
                .unwrap();
        assert_eq!(a["removed"], json!([old_base]), "{a}");
        assert!(!old_base.exists());
        assert_identical(&vol, &reference);
        assert!(inc.exists() && base.exists());
        assert_check_clean(&vol);
        // The next round starts from an old base again.
        make_disk(&old_base, 8 << 20, &[]);
        std::fs::remove_file(&vol).unwrap();
        overlay(&old_base, &vol);
    }
}

/// A real QEMU process (`qemu-io`, read-write, waiting on its stdin) with
/// `image` open: it holds QEMU's image locks on it and its backing files
/// until killed.
struct Holder(std::process::Child);

impl Holder {
    fn open(image: &std::path::Path) -> Holder {
        // Killed and waited for when dropped, a failed wait below too.
        let holder = Holder(
            std::process::Command::new("qemu-io")
                .args(["-f", "qcow2"])
                .arg(image)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Until its locks are seen.
        let f = std::fs::File::open(image).unwrap();
        for _ in 0..200 {
            if knib_core::lock::held_like_qemu(&f).unwrap() {
                return holder;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("qemu-io never locked {}", image.display());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `agent.restore` never replaces or removes what a VM uses: a volume a
/// QEMU process has open, or an old delta one reads as a backing file (a
/// template other VMs run on), is busy, naming it, and nothing changes;
/// while a restore runs, QEMU cannot open its volume for writing. A volume
/// that is a file of the backup chain is refused, the backup kept. Before,
/// the restored copy was renamed over a running VM's disk (every write the
/// VM made afterwards went to a deleted file) and a template in use was
/// removed under the VMs reading it, answered as success.
#[test]
fn a_restore_never_replaces_or_removes_files_in_use_nor_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backup = d.join("backup.qcow2");
    make_disk(&backup, 8 << 20, &[]);
    qemu_io(&backup, "write -P 0x5b 1M 1M");
    let vol = d.join("volume.qcow2");
    make_disk(&vol, 8 << 20, &[]);
    qemu_io(&vol, "write -P 0x11 0 64k");
    // A template, read by another VM's disk.
    let (template, other) = (d.join("template.qcow2"), d.join("other-vm.qcow2"));
    make_disk(&template, 8 << 20, &[]);
    overlay(&template, &other);
    for quick in [false, true] {
        let call = |volume: &std::path::Path, deltas: serde_json::Value| {
            let req = json!({"quick_restore": quick, "deltas_to_remove": deltas,
                "volumes": [{"uuid": "u", "backup_path": backup, "volume_path": volume}]});
            knib_core::api::call("agent.restore", &req.to_string(), &Control::new())
        };
        let before = contents(d);
        {
            let _vm = Holder::open(&vol);
            let e = call(&vol, json!([])).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Busy, "quick {quick}: {e}");
            assert!(e.message.starts_with(&format!("{} is in use by another process", vol.display())), "{e}");
        }
        assert_eq!(contents(d), before, "quick {quick}: a volume in use was changed");
        {
            let _vm = Holder::open(&other);
            let e = call(&vol, json!([template])).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Busy, "quick {quick}: {e}");
            assert!(e.message.starts_with(&format!("{} is in use by another process", template.display())), "{e}");
        }
        assert_eq!(contents(d), before, "quick {quick}: a template in use was removed");
        for (volume, named) in [(&backup, backup.clone()), (&d.join("alias.qcow2"), backup.clone())] {
            if volume != &backup {
                std::fs::hard_link(&backup, volume).unwrap();
            }
            let before = contents(d);
            let e = call(volume, json!([])).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "quick {quick}: {e}");
            let says = format!(
                "request of agent.restore: volumes[0].volume_path {} is {} of the backup chain of volume u",
                volume.display(),
                named.display()
            );
            assert!(e.message.starts_with(&says), "quick {quick}: {e}");
            assert_eq!(contents(d), before, "quick {quick}: the backup was replaced");
            if volume != &backup {
                std::fs::remove_file(volume).unwrap();
            }
        }
        // While a restore runs, no QEMU starts on its volume.
        let at = "agent.restore: volumes locked against QEMU";
        knib_core::crashpoint::pause_before(at, std::time::Duration::from_secs(3));
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(knib_core::crashpoint::wait_for_pause(at, std::time::Duration::from_secs(60)));
                let out = std::process::Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", "write -P 0x66 0 4k"])
                    .arg(&vol)
                    .output()
                    .unwrap();
                let said = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success() && said.contains("lock"), "quick {quick}: QEMU wrote: {said}");
            });
            // The volume named among the old deltas too (tolerated, never
            // removed): held once, not busy with itself.
            call(&vol, json!([vol])).unwrap();
        });
        assert_identical(&vol, &backup);
        assert_check_clean(&vol);
        std::fs::remove_file(&vol).unwrap();
        make_disk(&vol, 8 << 20, &[]);
    }
}

/// A backup path that is a link into another directory, beside which lie
/// files of the same names as its relative parents: the checks and the
/// copy follow the chain QEMU reads (from the link's target), not the
/// decoys beside the link. Before, a quick restore checked the decoy chain
/// (a delta to remove that was the real parent passed, and was removed
/// under the overlay booted on it).
#[test]
fn a_backup_path_through_a_link_is_checked_as_the_chain_it_leads_to() {
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    let (real, beside) = (d.join("real"), d.join("beside"));
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&beside).unwrap();
    let (base, inc) = (real.join("base.qcow2"), real.join("inc.qcow2"));
    make_disk(&base, 8 << 20, &[]);
    qemu_io(&base, "write -P 0x31 0 1M");
    overlay(&base, &inc);
    qemu_io(&inc, "write -P 0x32 1M 1M");
    // The decoy parent beside the link, and the link.
    make_disk(&beside.join("base.qcow2"), 8 << 20, &[]);
    let link = beside.join("inc.qcow2");
    std::os::unix::fs::symlink(&inc, &link).unwrap();
    let reference = d.join("reference.raw");
    snapshot(&inc, &reference);
    for quick in [true, false] {
        let vol = d.join(format!("volume-{quick}.qcow2"));
        make_disk(&vol, 8 << 20, &[]);
        // The real parent named as an old delta to remove: refused.
        let req = json!({"quick_restore": quick, "deltas_to_remove": [base],
            "volumes": [{"uuid": "v", "backup_path": link, "volume_path": vol}]});
        let e = knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "quick {quick}: {e}");
        assert!(e.message.contains("a restore never removes a backup"), "quick {quick}: {e}");
        assert!(base.exists(), "quick {quick}: the real parent was removed");
        // Without it, the volume reads the real chain.
        let req = json!({"quick_restore": quick, "volumes": [{"uuid": "v", "backup_path": link, "volume_path": vol}]});
        knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap();
        assert_identical(&vol, &reference);
    }
}

/// A staged volume swapped for a link (symbolic, or hard to a file
/// outside) once it is written, while the restore goes on, never replaces
/// the volume: the restore fails as corrupt, naming the staged file, the
/// volume reads as before and the linked file is as it was, quick or plain.
/// Before, the staged name was renamed over the volume as it was found: the
/// VM would then have run on the file the link led to.
#[test]
fn a_staged_volume_swapped_for_a_link_never_replaces_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backup = d.join("backup.qcow2");
    make_disk(&backup, 8 << 20, &[]);
    qemu_io(&backup, "write -P 0x5c 1M 1M");
    let victim = d.join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    for (i, (quick, hard)) in [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate() {
        let vol = d.join(format!("volume{i}.qcow2"));
        make_disk(&vol, 8 << 20, &[]);
        qemu_io(&vol, "write -P 0x12 0 64k");
        let before = std::fs::read(&vol).unwrap();
        let stage = d.join(format!(".volume{i}.qcow2.knib-restore"));
        let at = format!("agent.restore: staged {}", stage.display());
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let e = std::thread::scope(|s| {
            s.spawn(|| while_paused(&at, || replace_with_link(&stage, &victim, hard)));
            let req = json!({"quick_restore": quick,
                "volumes": [{"uuid": "u", "backup_path": backup, "volume_path": vol}]});
            knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap_err()
        });
        let case = format!("quick {quick}, hard {hard}");
        assert_eq!(e.kind, ErrorKind::Corrupt, "{case}: {e}");
        assert!(e.message.contains(&format!("{} was replaced while knib wrote it", stage.display())), "{case}: {e}");
        assert!(e.message.contains("replaced 0 of 1 volumes (none); no restored copy is left"), "{case}: {e}");
        assert!(std::fs::symlink_metadata(&vol).unwrap().file_type().is_file(), "{case}: the volume is a link");
        assert_eq!(std::fs::read(&vol).unwrap(), before, "{case}: the volume was replaced");
        let v = std::fs::read(&victim).unwrap();
        assert!(v == b"not knib's", "{case}: the linked file was written ({} bytes)", v.len());
        let _ = std::fs::remove_file(&stage);
    }
}

/// A backup file whose backing pointer leads out of its filesystem (the
/// backup repository) to another VM's disk, absolute or through `..`: a
/// restore, plain or quick, and a browse refuse it, naming both files,
/// before anything is read or written. Before, the other VM's disk was
/// restored into this volume (or served to its guest, or browsed).
#[test]
fn a_backup_whose_chain_leaves_its_filesystem_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let elsewhere = tempfile::tempdir_in("/dev/shm").unwrap();
    assert_ne!(
        std::fs::metadata(d).unwrap().dev(),
        std::fs::metadata(elsewhere.path()).unwrap().dev(),
        "this test needs /dev/shm on another filesystem than the temporary directory"
    );
    let other = elsewhere.path().join("other-vm.qcow2");
    make_disk(&other, 8 << 20, &[]);
    qemu_io(&other, "write -P 0x77 0 1M");
    let vol = d.join("volume.qcow2");
    make_disk(&vol, 8 << 20, &[]);
    qemu_io(&vol, "write -P 0x11 0 64k");
    let backup = d.join("b1").join("vol.qcow2");
    std::fs::create_dir(d.join("b1")).unwrap();
    let up = "../".repeat(d.join("b1").components().count() - 1);
    let relative = format!("{up}{}", other.strip_prefix("/").unwrap().display());
    for pointer in [other.display().to_string(), relative] {
        let _ = std::fs::remove_file(&backup);
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b", &pointer])
            .arg(&backup)
            .arg("8M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "read -P 0x77 0 1M"])
            .arg(&backup)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("read 1048576/1048576"),
            "QEMU reads the other VM's disk through {pointer}: {text}"
        );
        let before = (contents(d), std::fs::read(&other).unwrap());
        let said = format!(
            "backing file {} of {} is on another filesystem than backup file {}",
            d.join("b1").join(&pointer).display(),
            backup.display(),
            backup.display()
        );
        let said_abs = format!("backing file {} of {}", other.display(), backup.display());
        let refused = |e: &knib_core::KnibError| {
            e.kind == ErrorKind::Corrupt
                && (e.message.contains(&said) || e.message.contains(&said_abs))
                && e.message.contains("is on another filesystem than backup file")
        };
        for quick in [false, true] {
            let req =
                json!({"quick_restore": quick, "volumes": [{"uuid": "u", "backup_path": backup, "volume_path": vol}]});
            let e = knib_core::api::call("agent.restore", &req.to_string(), &Control::new()).unwrap_err();
            assert!(refused(&e), "quick {quick}, {pointer}: {e}");
            assert_eq!((contents(d), std::fs::read(&other).unwrap()), before, "quick {quick}: something changed");
        }
        let req = json!({"backup_path": backup});
        let e = knib_core::api::call("files.fs", &req.to_string(), &Control::new()).unwrap_err();
        assert!(refused(&e), "files.fs, {pointer}: {e}");
    }
}
