//! Engine operations used on their own (as the CloudStack agent does):
//! merging a delta, finalizing a compression whose backup went away, and the
//! chain hash.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::disk::*;
use knib_core::engine;
use knib_core::qemu_img::QemuImg;
use knib_core::Control;

#[test]
fn merge_delta_folds_a_snapshot_layer_into_its_base_and_keeps_every_byte() {
    let d = tempfile::tempdir().unwrap();
    let (base, mid, top) = (d.path().join("base.qcow2"), d.path().join("mid.qcow2"), d.path().join("top.qcow2"));
    let q = QemuImg::new();
    let ctl = Control::new();
    make_disk(&base, 16 << 20, &[]);
    qemu_io(&base, "write -P 0x01 0 4M");
    q.create_overlay(&mid, "base.qcow2", "qcow2", None, &ctl).unwrap();
    qemu_io(&mid, "write -P 0x02 1M 1M");
    q.create_overlay(&top, "mid.qcow2", "qcow2", None, &ctl).unwrap();
    qemu_io(&top, "write -P 0x03 3M 64k");
    let r = d.path().join("ref.qcow2");
    snapshot(&top, &r);
    let wrong = engine::merge_delta(&q, &mid, Some(&base), &ctl).unwrap_err();
    assert!(wrong.message.contains("does not use"), "{wrong}");
    engine::merge_delta(&q, &mid, Some(&top), &ctl).unwrap();
    assert!(!mid.exists());
    assert_eq!(chain_len(&top), 2);
    assert_eq!(q.info(&top, &ctl).unwrap().backing_filename.as_deref(), Some("base.qcow2"));
    assert_identical(&top, &r);
    assert_check_clean(&base);
}

#[test]
fn finalize_renames_over_or_cleans_up_when_the_backup_went_away() {
    let d = tempfile::tempdir().unwrap();
    let q = QemuImg::new();
    let ctl = Control::new();
    let f = d.path().join("vol.qcow2");
    make_disk(&f, 8 << 20, &[]);
    qemu_io(&f, "write -P 0x41 0 4M");
    let r = d.path().join("ref.qcow2");
    snapshot(&f, &r);
    let files = vec![f.clone()];
    let done = engine::compress(&q, &files, &engine::CompressOptions::default(), &ctl).unwrap();
    assert!(done[0].comp_path.exists());
    // The backup was deleted meanwhile: the .comp goes, nothing else changes.
    let before = std::fs::metadata(&f).unwrap().len();
    engine::finalize(&files, false).unwrap();
    assert!(!done[0].comp_path.exists());
    assert_eq!(std::fs::metadata(&f).unwrap().len(), before);
    // Normal case: renamed over the original.
    engine::compress(&q, &files, &engine::CompressOptions::default(), &ctl).unwrap();
    engine::finalize(&files, true).unwrap();
    assert!(std::fs::metadata(&f).unwrap().len() < before / 4);
    assert_identical(&f, &r);
    let e = engine::finalize(&files, true).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::NotFound);
    // A free-space minimum the store cannot meet refuses before writing.
    let opts = engine::CompressOptions { min_free_factor: 1e12, ..Default::default() };
    let e = engine::compress(&q, &files, &opts, &ctl).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::NoSpace, "{e}");
    assert!(!done[0].comp_path.exists());
}

#[test]
fn the_hash_is_xxh3_128_of_the_files_in_chain_order() {
    let d = tempfile::tempdir().unwrap();
    let a: PathBuf = d.path().join("a");
    let b: PathBuf = d.path().join("b");
    std::fs::write(&a, b"hello ").unwrap();
    std::fs::write(&b, vec![7u8; 3 << 20]).unwrap();
    let h = engine::hash_files(&[a.clone(), b.clone()], &Control::new()).unwrap();
    let mut all = b"hello ".to_vec();
    all.extend(vec![7u8; 3 << 20]);
    assert_eq!(h, format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&all)));
    assert_ne!(h, engine::hash_files(&[b, a], &Control::new()).unwrap());
}

/// Back up a disk full then incrementally through `data_path`; returns the
/// two answers and the references (the disk as it was at each backup).
fn two_backups(dir: &std::path::Path, data_path: engine::DataPath) -> (Vec<engine::TakeBackupAnswer>, Vec<PathBuf>) {
    let q = QemuImg::new();
    let ctl = Control::new();
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.qcow2");
    make_disk(&disk, 24 << 20, &[]);
    qemu_io(&disk, "write -P 0x11 0 5M");
    qemu_io(&disk, "write -z 6M 1M");
    qemu_io(&disk, "write -P 0x12 23M 1M");
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let mut answers = Vec::new();
    let mut refs = Vec::new();
    for (i, kind) in [engine::BackupKind::Full, engine::BackupKind::Incremental].into_iter().enumerate() {
        if i == 1 {
            qemu_io(&disk, "write -P 0x13 1M 64k");
            qemu_io(&disk, "write -z 2M 128k");
            qemu_io(&disk, "write -P 0x14 20M 3M");
        }
        let r = dir.join(format!("ref{i}.qcow2"));
        snapshot(&disk, &r);
        refs.push(r);
        let req = engine::TakeBackupRequest {
            volumes: vec![engine::VolumeBackup {
                name: "v".into(),
                disk: disk.clone(),
                dest: store.join(format!("b{i}.qcow2")),
                parent: (i == 1).then(|| "b0.qcow2".to_string()),
            }],
            kind,
            end_of_chain: false,
            data_path,
            compress: None,
            check_output: false,
        };
        answers.push(engine::take_backup(&q, &req, &ctl).unwrap());
    }
    (answers, refs)
}

#[test]
fn native_backups_record_the_hash_of_the_file_and_match_qemu_img_backups() {
    let d = tempfile::tempdir().unwrap();
    let ctl = Control::new();
    let (native, refs) = two_backups(&d.path().join("n"), engine::DataPath::Native);
    let (qemu, _) = two_backups(&d.path().join("q"), engine::DataPath::QemuImg);
    for (a, r) in native.iter().zip(&refs) {
        let v = &a.volumes[0];
        // The hash recorded at backup time is what verify computes later.
        let h = engine::hash_files(std::slice::from_ref(&v.dest), &ctl).unwrap();
        assert_eq!(v.hash.as_deref(), Some(h.as_str()), "{}", v.dest.display());
        assert_eq!(v.size, std::fs::metadata(&v.dest).unwrap().len());
        assert_check_clean(&v.dest);
        assert_identical(&v.dest, r);
    }
    // qemu-img's copies have their hash recorded too, read back.
    for a in &qemu {
        let v = &a.volumes[0];
        let h = engine::hash_files(std::slice::from_ref(&v.dest), &ctl).unwrap();
        assert_eq!(v.hash.as_deref(), Some(h.as_str()), "{}", v.dest.display());
    }
    // Primary after the merges (native, and qemu-img commit): the base
    // passes check, the disk's delta is empty and the disk reads as it did
    // at the last backup.
    for side in ["n", "q"] {
        let disk = d.path().join(side).join("disk.qcow2");
        assert_check_clean(&engine::take::base_path(&disk));
        assert_check_clean(&disk);
        assert_identical(&disk, &refs[1]);
        let map = QemuImg::new().info(&disk, &ctl).unwrap();
        assert!(map.actual_size.unwrap_or(0) < 1 << 20, "{side}: {map:?}");
    }
    // Both paths store the same guest data, and the delta holds only the
    // clusters written since the full backup.
    for (n, q) in native.iter().zip(&qemu) {
        assert_identical(&n.volumes[0].dest, &q.volumes[0].dest);
    }
    let info = QemuImg::new().info(&native[1].volumes[0].dest, &ctl).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("b0.qcow2"));
    assert!(native[1].volumes[0].size < 6 << 20, "{}", native[1].volumes[0].size);

    // Compression and restores through the native path.
    let files = vec![native[1].volumes[0].dest.clone()];
    let done = engine::compress(&QemuImg::new(), &files, &engine::CompressOptions::default(), &ctl).unwrap();
    assert!(done[0].compressed_size < done[0].original_size, "{done:?}");
    engine::finalize(&files, true).unwrap();
    assert_check_clean(&files[0]);
    assert_identical(&files[0], &refs[1]);
    let info = QemuImg::new().info(&files[0], &ctl).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("b0.qcow2"));
    assert_eq!(info.format_specific.unwrap().data.compression_type.as_deref(), Some("zstd"));
    for (name, format) in
        [("r.raw", knib_core::qemu_img::ImageFormat::Raw), ("r.qcow2", knib_core::qemu_img::ImageFormat::Qcow2)]
    {
        let dest = d.path().join(name);
        let req = engine::RestoreRequest {
            backup_file: files[0].clone(),
            dest: dest.clone(),
            format,
            overwrite: false,
            data_path: engine::DataPath::Native,
        };
        engine::restore(&QemuImg::new(), &req, &ctl).unwrap();
        assert_identical(&dest, &refs[1]);
        let e = engine::restore(&QemuImg::new(), &req, &ctl).unwrap_err();
        assert_eq!(e.kind, knib_core::ErrorKind::InvalidInput, "{e}");
    }
}

#[test]
fn a_one_pass_compressed_backup_is_compressed_and_restores() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.qcow2");
    make_disk(&disk, 16 << 20, &[]);
    qemu_io(&disk, "write -P 0x21 0 8M");
    let r = d.path().join("ref.qcow2");
    snapshot(&disk, &r);
    for (i, path) in [engine::DataPath::Native, engine::DataPath::QemuImg].into_iter().enumerate() {
        let dest = d.path().join(format!("b{i}.qcow2"));
        let req = engine::TakeBackupRequest {
            volumes: vec![engine::VolumeBackup {
                name: "v".into(),
                disk: disk.clone(),
                dest: dest.clone(),
                parent: None,
            }],
            kind: engine::BackupKind::Isolated,
            end_of_chain: false,
            data_path: path,
            compress: Some(knib_core::qemu_img::CompressionLibrary::Zstd),
            check_output: false,
        };
        let a = engine::take_backup(&QemuImg::new(), &req, &Control::new()).unwrap();
        assert!(a.volumes[0].size < 1 << 20, "{path:?}: {}", a.volumes[0].size);
        assert_check_clean(&dest);
        assert_identical(&dest, &r);
        if path == engine::DataPath::Native {
            let h = engine::hash_files(std::slice::from_ref(&dest), &Control::new()).unwrap();
            assert_eq!(a.volumes[0].hash.as_deref(), Some(h.as_str()));
        }
    }
}

#[test]
fn a_backup_that_is_not_published_leaves_the_delta_full_and_the_disk_unchanged() {
    // The delta is merged into the base while it is copied; when the backup
    // then fails (here: publishing it), the delta must stay as it was, so
    // the next backup copies every write again.
    let d = tempfile::tempdir().unwrap();
    two_backups(d.path(), engine::DataPath::Native);
    let disk = d.path().join("disk.qcow2");
    let base = engine::take::base_path(&disk);
    qemu_io(&disk, "write -P 0x21 3M 2M");
    qemu_io(&disk, "write -z 22M 64k");
    let now = d.path().join("now.qcow2");
    snapshot(&disk, &now);
    let ctl = Control::new();
    let req = |name: &str| engine::TakeBackupRequest {
        volumes: vec![engine::VolumeBackup {
            name: "v".into(),
            disk: disk.clone(),
            dest: d.path().join("store").join(name),
            parent: Some("b1.qcow2".into()),
        }],
        kind: engine::BackupKind::Incremental,
        end_of_chain: false,
        data_path: engine::DataPath::Native,
        compress: None,
        check_output: false,
    };
    let delta_before = std::fs::read(&disk).unwrap();
    let e = engine::take::take_backup_with(&QemuImg::new(), &req("b2.qcow2"), &ctl, &mut |_| {
        Err(knib_core::KnibError::new(knib_core::ErrorKind::Io, "manifest cannot be written"))
    })
    .unwrap_err();
    assert!(e.message.contains("manifest cannot be written"), "{e}");
    assert_eq!(e.vm_consistent, Some(true));
    assert!(!d.path().join("store").join("b2.qcow2").exists());
    // The delta is untouched; the base holds its writes already (merged
    // during the copy), which changes nothing the disk reads.
    assert_eq!(std::fs::read(&disk).unwrap(), delta_before);
    assert_check_clean(&base);
    assert_identical(&base, &now);
    assert_identical(&disk, &now);
    // The next backup holds the writes, and the merge then empties the delta.
    let a = engine::take_backup(&QemuImg::new(), &req("b2.qcow2"), &ctl).unwrap();
    let b2 = &a.volumes[0].dest;
    let restored = d.path().join("restored.raw");
    let rq = engine::RestoreRequest {
        backup_file: b2.clone(),
        dest: restored.clone(),
        format: knib_core::qemu_img::ImageFormat::Raw,
        overwrite: false,
        data_path: engine::DataPath::Native,
    };
    engine::restore(&QemuImg::new(), &rq, &ctl).unwrap();
    assert_identical(&restored, &now);
    assert_identical(&disk, &now);
    assert_check_clean(&base);
    assert!(std::fs::metadata(&disk).unwrap().len() < 1 << 20);
}

#[test]
fn an_expected_file_outside_the_chain_is_refused_on_both_data_paths() {
    // A hash given for a file the backup's chain does not lead to says
    // nothing of what is restored: refused, even when that file matches it.
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.qcow2");
    make_disk(&b, 4 << 20, &[]);
    qemu_io(&b, "write -P 0x31 0 1M");
    let other = d.path().join("other.qcow2");
    make_disk(&other, 4 << 20, &[]);
    let (_, each) = knib_core::hash::hash_chain(std::slice::from_ref(&other), &Control::new()).unwrap();
    let expected = [engine::verify::ExpectedHash { path: other.clone(), hash: each[0].clone() }];
    for (i, path) in [engine::DataPath::Native, engine::DataPath::QemuImg].into_iter().enumerate() {
        let dest = d.path().join(format!("r{i}.raw"));
        let req = engine::RestoreRequest {
            backup_file: b.clone(),
            dest: dest.clone(),
            format: knib_core::qemu_img::ImageFormat::Raw,
            overwrite: false,
            data_path: path,
        };
        let e = engine::restore_verified(&QemuImg::new(), &req, &expected, &Control::new()).unwrap_err();
        assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "{path:?}: {e}");
        assert!(
            e.message.starts_with(&format!("backup file {} is not in the chain", other.display())),
            "{path:?}: {e}"
        );
        assert!(!dest.exists(), "{path:?}: a restore was written");
    }
}

/// A compression writes its output only into a file of its own: its
/// temporary swapped (after the claim of the name, before the copy starts)
/// for a symbolic link to a file outside, or for a hard link to one, is
/// refused, naming it, the file the link leads to is left as it was, and
/// nothing is left under the compression's names. Before, the copy opened
/// the name again: it followed a symbolic link (fixed in c550de6 by
/// opening it following none) and truncated and wrote a hard-linked file
/// (fixed by writing through the handle of the claim, and checking that
/// the name still leads to it before and after the rename).
#[test]
fn a_compression_temporary_swapped_for_a_link_is_not_written_through() {
    for hard in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vol.qcow2");
        make_disk(&f, 8 << 20, &[]);
        qemu_io(&f, "write -P 0x5a 0 2M");
        let r = d.path().join("ref.qcow2");
        snapshot(&f, &r);
        // Beside the store's directory, so that a hard link can be made.
        let outside = tempfile::tempdir_in(d.path().parent().unwrap()).unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"not knib's").unwrap();
        let at = format!("creating {}", d.path().display());
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "no pause at {at}");
                for e in std::fs::read_dir(d.path()).unwrap() {
                    let p = e.unwrap().path();
                    if p.to_string_lossy().ends_with(".part") {
                        std::fs::remove_file(&p).unwrap();
                        if hard {
                            std::fs::hard_link(&victim, &p).unwrap();
                        } else {
                            std::os::unix::fs::symlink(&victim, &p).unwrap();
                        }
                    }
                }
            });
            let opts = engine::CompressOptions { data_path: engine::DataPath::Native, ..Default::default() };
            engine::compress(&QemuImg::new(), std::slice::from_ref(&f), &opts, &Control::new()).unwrap_err()
        });
        assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "hard {hard}: {e}");
        assert!(e.message.ends_with(".part was replaced while knib wrote it (it is no longer the file knib created); knib writes its temporary files only as files of their own"), "hard {hard}: {e}");
        let v = std::fs::read(&victim).unwrap();
        assert!(v == b"not knib's", "hard {hard}: the file outside was written ({} bytes)", v.len());
        assert_identical(&f, &r);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["ref.qcow2", "vol.qcow2"], "hard {hard}");
    }
}

/// A link (symbolic, or hard to a file outside the store) swapped in under
/// a backup's temporary name while its copy is written, on both data paths,
/// is never written through and never renamed into the store: the backup
/// fails as corrupt, naming the name, the linked file and the disk are as
/// they were, and nothing is left in the store. Before, qemu-img created the
/// copy by name (following a link put there after knib emptied the name),
/// and neither data path checked that the name still led to the file
/// written before renaming it into the store. The next backups, full then
/// incremental, are whole, the incremental's backing pointer named as asked.
#[test]
fn a_backups_temporary_swapped_for_a_link_is_not_written_through() {
    use engine::DataPath::{Native, QemuImg as ByQemuImg};
    for (path, hard) in [(Native, false), (Native, true), (ByQemuImg, false), (ByQemuImg, true)] {
        let s = SwapSetup::new();
        let (d, disk, r, store, victim) = (&s.dir, &s.disk, &s.reference, &s.store, &s.victim);
        let req = |i: usize| engine::TakeBackupRequest {
            volumes: vec![engine::VolumeBackup {
                name: "v".into(),
                disk: disk.clone(),
                dest: store.join(format!("b{i}.qcow2")),
                parent: (i == 1).then(|| "b0.qcow2".to_string()),
            }],
            kind: if i == 1 { engine::BackupKind::Incremental } else { engine::BackupKind::Full },
            end_of_chain: false,
            data_path: path,
            compress: None,
            check_output: false,
        };
        let (_, case) = swapped_for_a_link(store, path, victim, hard, || {
            engine::take_backup(&QemuImg::new(), &req(0), &Control::new()).unwrap_err()
        });
        assert_identical(disk, r);
        assert_eq!(std::fs::read_dir(store).unwrap().count(), 0, "{case}: left in the store");
        engine::take_backup(&QemuImg::new(), &req(0), &Control::new()).unwrap();
        qemu_io(disk, "write -P 0x5c 1M 64k");
        let r1 = d.path().join("ref1.qcow2");
        snapshot(disk, &r1);
        engine::take_backup(&QemuImg::new(), &req(1), &Control::new()).unwrap();
        let b1 = store.join("b1.qcow2");
        let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&b1).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["backing-filename"], "b0.qcow2", "{case}");
        assert_check_clean(&b1);
        assert_identical(&b1, &r1);
    }
}

/// The same for a stopped volume's backup of its files (as the agent takes
/// it: a new delta over the base, the base copied): the backup fails as
/// corrupt, the linked file is as it was, the new delta is undone and the
/// store left empty; the next backup is whole.
#[test]
fn a_stopped_volumes_backup_temporary_swapped_for_a_link_is_not_written_through() {
    use engine::DataPath::{Native, QemuImg as ByQemuImg};
    for (path, hard) in [(Native, false), (Native, true), (ByQemuImg, false), (ByQemuImg, true)] {
        let s = SwapSetup::new();
        let (d, base, r, store, victim) = (&s.dir, &s.disk, &s.reference, &s.store, &s.victim);
        let dest = store.join("b0.qcow2");
        let plan = engine::stopped::FilesPlan {
            kind: engine::BackupKind::Full,
            end_of_chain: false,
            disks: vec![engine::stopped::FilesDisk {
                name: "v".into(),
                base: base.clone(),
                old_delta: None,
                new_delta: d.path().join("disk.qcow2.d1"),
                dest: dest.clone(),
                parent: None,
                virtual_size: 8 << 20,
                grand_children: vec![],
                snapshots: vec![],
            }],
            data_path: path,
            compress: None,
            check_output: false,
        };
        let (e, case) = swapped_for_a_link(store, path, victim, hard, || {
            engine::stopped::take(&QemuImg::new(), &plan, &Control::new()).unwrap_err()
        });
        assert_eq!(e.vm_consistent, Some(true), "{case}: {e}");
        assert_identical(base, r);
        assert!(!plan.disks[0].new_delta.exists(), "{case}: the new delta is left");
        assert_eq!(std::fs::read_dir(store).unwrap().count(), 0, "{case}: left in the store");
        engine::stopped::take(&QemuImg::new(), &plan, &Control::new()).unwrap();
        assert_check_clean(&dest);
        assert_identical(&dest, r);
    }
}

/// The empty overlay a backup puts in a disk's place (`<disk>.knib-new`,
/// over the disk turned into its base), swapped for a link once made or
/// just before its rename, never becomes the disk: the step fails as
/// corrupt, naming it, the disk
/// reads as before and is no link, the linked file is as it was, and the
/// next backup (which repairs the half-made step) is whole. Before,
/// qemu-img created the overlay by name (through a link put there) and
/// the name was renamed over the disk as found: the VM would then have
/// run on the file the link led to (and, swapped at the rename, did even
/// after the overlay was made through knib's descriptor: the rename is now
/// an exchange, taken back).
#[test]
fn a_disks_new_overlay_swapped_for_a_link_never_becomes_the_disk() {
    for (hard, at_rename) in [(false, false), (true, false), (false, true), (true, true)] {
        let s = SwapSetup::new();
        let new = s.disk.with_file_name("disk.qcow2.knib-new");
        let req = |i: usize| engine::TakeBackupRequest {
            volumes: vec![engine::VolumeBackup {
                name: "v".into(),
                disk: s.disk.clone(),
                dest: s.store.join(format!("b{i}.qcow2")),
                parent: (i == 1).then(|| "b0.qcow2".to_string()),
            }],
            kind: if i == 1 { engine::BackupKind::Incremental } else { engine::BackupKind::Full },
            end_of_chain: false,
            data_path: engine::DataPath::Native,
            compress: None,
            check_output: false,
        };
        // Once made, or at the rename's step (after knib's last look at
        // the name before it).
        let at = match at_rename {
            false => format!("created {}", new.display()),
            true => format!("rename {} to {}", new.display(), s.disk.display()),
        };
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(300));
        let e = std::thread::scope(|t| {
            t.spawn(|| while_paused(&at, || replace_with_link(&new, &s.victim, hard)));
            engine::take_backup(&QemuImg::new(), &req(0), &Control::new()).unwrap_err()
        });
        let hard = format!("{hard}, at the rename {at_rename}");
        assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "hard {hard}: {e}");
        assert!(e.message.contains(&format!("{} was replaced while knib wrote it", new.display())), "hard {hard}: {e}");
        let v = std::fs::read(&s.victim).unwrap();
        assert!(v == b"not knib's", "hard {hard}: the linked file was written ({} bytes)", v.len());
        assert!(std::fs::symlink_metadata(&s.disk).unwrap().file_type().is_file(), "hard {hard}: the disk is a link");
        assert_identical(&s.disk, &s.reference);
        // The next backup repairs the half-made step (the link left under
        // the overlay's name is removed, not followed) and holds every write.
        for f in std::fs::read_dir(&s.store).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        engine::take_backup(&QemuImg::new(), &req(0), &Control::new()).unwrap();
        qemu_io(&s.disk, "write -P 0x5e 1M 64k");
        let r1 = s.dir.path().join("ref1.qcow2");
        snapshot(&s.disk, &r1);
        engine::take_backup(&QemuImg::new(), &req(1), &Control::new()).unwrap();
        assert_identical(&s.store.join("b1.qcow2"), &r1);
        assert_identical(&s.disk, &r1);
    }
}

/// A disk with data, a copy of it (`reference`), an empty store beside it,
/// and a file outside (`victim`) on the same file system (so that a hard
/// link can be made).
struct SwapSetup {
    dir: tempfile::TempDir,
    disk: PathBuf,
    reference: PathBuf,
    store: PathBuf,
    _outside: tempfile::TempDir,
    victim: PathBuf,
}

impl SwapSetup {
    fn new() -> SwapSetup {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        make_disk(&disk, 8 << 20, &[]);
        qemu_io(&disk, "write -P 0x5b 0 2M");
        let reference = dir.path().join("ref.qcow2");
        snapshot(&disk, &reference);
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let outside = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"not knib's").unwrap();
        SwapSetup { dir, disk, reference, store, _outside: outside, victim }
    }
}

/// Run `run` (a backup into `store` on data path `path`, to fail) while,
/// once its copy has made the temporary `.b0.qcow2.part`, the temporary is
/// replaced by a link to `victim` (hard, or symbolic): the error, after
/// checking that it says the temporary was replaced (corrupt) and that
/// `victim` was not written; and the case's name for messages.
fn swapped_for_a_link(
    store: &std::path::Path,
    path: engine::DataPath,
    victim: &std::path::Path,
    hard: bool,
    run: impl FnOnce() -> knib_core::KnibError,
) -> (knib_core::KnibError, String) {
    let tmp = &store.join(".b0.qcow2.part");
    let at = &match path {
        engine::DataPath::Native => format!("creating {}", tmp.display()),
        _ => format!("qemu-img copy to {}", tmp.display()),
    };
    let case = format!("{path:?}, hard {hard}");
    knib_core::crashpoint::pause_before(at, Duration::from_secs(300));
    let e = std::thread::scope(|s| {
        s.spawn(|| while_paused(at, || replace_with_link(tmp, victim, hard)));
        run()
    });
    assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "{case}: {e}");
    let says = format!("{} was replaced while knib wrote it (it is no longer the file knib created)", tmp.display());
    assert!(e.message.contains(&says), "{case}: {e}");
    let v = std::fs::read(victim).unwrap();
    assert!(v == b"not knib's", "{case}: the file outside was written ({} bytes)", v.len());
    (e, case)
}

/// A VM started on a disk between the backup's check that its disks are
/// unused and the native merge's locks (here `qemu-io` holding the second
/// disk, begun while the merge waits before locking it) refuses the backup
/// as busy before anything is copied: nothing is left in the store, no
/// delta is emptied, every disk reads as before. Before, the copy ran
/// beside the merge's preparation: the disk was copied while it could be
/// written (a torn backup), and its merge failed as busy after the backup
/// was stored.
#[test]
fn a_disk_a_vm_starts_on_before_the_merge_locks_it_refuses_the_backup() {
    use engine::BackupKind::{Full, Incremental};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let disks: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| {
            let p = dir.join(format!("{n}.qcow2"));
            make_disk(&p, 8 << 20, &[]);
            qemu_io(&p, "write -P 0x21 0 1M");
            p
        })
        .collect();
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let req = |i: usize, kind: engine::BackupKind| engine::TakeBackupRequest {
        volumes: disks
            .iter()
            .enumerate()
            .map(|(k, p)| engine::VolumeBackup {
                name: format!("v{k}"),
                disk: p.clone(),
                dest: store.join(format!("b{i}-{k}.qcow2")),
                parent: (kind == Incremental).then(|| format!("b{}-{k}.qcow2", i - 1)),
            })
            .collect(),
        kind,
        end_of_chain: false,
        data_path: engine::DataPath::Native,
        compress: None,
        check_output: false,
    };
    engine::take_backup(&QemuImg::new(), &req(0, Full), &Control::new()).unwrap();
    let mut refs = Vec::new();
    for (k, p) in disks.iter().enumerate() {
        qemu_io(p, "write -P 0x22 2M 1M");
        let r = dir.join(format!("ref-{k}.qcow2"));
        snapshot(p, &r);
        refs.push(r);
    }
    let at = format!("locking {} for a merge", disks[1].display());
    // Long enough for a loaded machine; released as soon as qemu-io
    // holds the disk.
    let pause = Duration::from_secs(300);
    knib_core::crashpoint::pause_before(&at, pause);
    let second = req(1, Incremental);
    let backup = std::thread::spawn(move || engine::take_backup(&QemuImg::new(), &second, &Control::new()));
    assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the merge never paused");
    let paused = std::time::Instant::now();
    let start = || {
        std::process::Command::new("qemu-io")
            .args(["-c", "sleep 60000"])
            .arg(&disks[1])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut vm = start();
    // qemu-io holds the disk (QEMU's own locks refuse a second writer)
    // while the merge still waits. The probe (`qemu-img info`, a reader
    // that shares no write) may lock the disk first: qemu-io then exits,
    // and starts again. Both may also fail at once, each meeting the
    // other's locks while it opens (seen once: qemu-io exited as the probe
    // failed, and the merge then locked a free disk): so the probe must
    // fail twice, with qemu-io still running a while after each.
    let probe_fails = || {
        let out = std::process::Command::new("qemu-img").arg("info").arg(&disks[1]).output().unwrap();
        !out.status.success()
    };
    let still_running = |vm: &mut std::process::Child| {
        std::thread::sleep(Duration::from_millis(300));
        vm.try_wait().unwrap().is_none()
    };
    loop {
        if vm.try_wait().unwrap().is_some() {
            vm = start();
        }
        if probe_fails() && still_running(&mut vm) && probe_fails() && still_running(&mut vm) {
            break;
        }
        assert!(paused.elapsed() < pause / 2, "qemu-io did not lock {} in time", disks[1].display());
        std::thread::sleep(Duration::from_millis(20));
    }
    knib_core::crashpoint::release_pause(&at);
    let e = backup.join().unwrap();
    let _ = vm.kill();
    let _ = vm.wait();
    let e = e.unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&disks[1].display().to_string()), "{e}");
    let left: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("b1") || n.contains(".part"))
        .collect();
    assert!(left.is_empty(), "the refused backup left {left:?}");
    for (p, r) in disks.iter().zip(&refs) {
        assert_identical(r, p);
        assert!(engine::take::base_path(p).exists(), "{} lost its base", p.display());
        let delta = QemuImg::new().check(p, &Control::new()).unwrap();
        assert!(delta.allocated_clusters.unwrap_or(0) > 0, "the delta of {} was emptied: {delta:?}", p.display());
    }
}

/// Every disk a plain-disk backup copies is held against writers (a VM
/// started on it) from before its copy until its delta is merged, whatever
/// merges it: knib's own merge (its writer locks), `qemu-img commit`
/// (the qemu-img data path, or a base the native merge does not take, here
/// one with 8-bit refcounts), or nothing (a base marked corrupt, whose
/// merge fails). Before, only the first held the disk: in the others a VM
/// started during the copy tore it, or wrote after it what
/// `qemu-img commit` then folded into the base, in no backup.
#[test]
fn every_disk_a_backup_copies_stays_locked_against_writers_until_its_merge() {
    use engine::BackupKind::{Full, Incremental};
    use engine::DataPath::{Native, QemuImg as ByQemuImg};
    // (what, data path, options of the disk, base marked corrupt, seed)
    let modes: [(&str, engine::DataPath, &[&str], bool, u64); 4] = [
        ("native merge", Native, &[], false, 11),
        ("qemu-img data path", ByQemuImg, &[], false, 12),
        ("base the native merge does not take", Native, &["-o", "refcount_bits=8"], false, 13),
        ("base marked corrupt", Native, &[], true, 14),
    ];
    for (what, data_path, opts, corrupt, seed) in modes {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let mut x = seed;
        let mut offset = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % 112 * (64 << 10)
        };
        let disks: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|n| {
                let p = dir.join(format!("{n}.qcow2"));
                make_disk(&p, 8 << 20, opts);
                qemu_io(&p, &format!("write -P 0x31 {} 1M", offset()));
                p
            })
            .collect();
        let store = dir.join("store");
        std::fs::create_dir(&store).unwrap();
        // Volume names of this mode only: the pause below is process-wide.
        let req = |i: usize, kind: engine::BackupKind, end_of_chain: bool| engine::TakeBackupRequest {
            volumes: disks
                .iter()
                .enumerate()
                .map(|(k, p)| engine::VolumeBackup {
                    name: format!("locked-{seed}-{k}"),
                    disk: p.clone(),
                    dest: store.join(format!("b{i}-{k}.qcow2")),
                    parent: (kind == Incremental).then(|| format!("b{}-{k}.qcow2", i - 1)),
                })
                .collect(),
            kind,
            end_of_chain,
            data_path,
            compress: None,
            check_output: false,
        };
        engine::take_backup(&QemuImg::new(), &req(0, Full, false), &Control::new()).unwrap();
        let mut refs = Vec::new();
        for (k, p) in disks.iter().enumerate() {
            if corrupt {
                // Incompatible feature bit 1: QEMU marked the base corrupt.
                put_bytes(&engine::take::base_path(p), 72, &2u64.to_be_bytes());
            }
            qemu_io(p, &format!("write -P 0x32 {} 512k", offset()));
            let r = dir.join(format!("ref-{k}.qcow2"));
            snapshot(p, &r);
            refs.push(r);
        }
        // Paused before the second disk's copy: the first is copied, the
        // second not yet; a VM starting on either must be refused.
        let at = format!("copy of volume locked-{seed}-1");
        let at = at.as_str();
        // Held until the writers were tried (released then).
        knib_core::crashpoint::pause_before(at, Duration::from_secs(300));
        let second = req(1, Incremental, false);
        let backup = std::thread::spawn(move || engine::take_backup(&QemuImg::new(), &second, &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(at, Duration::from_secs(60)), "{what}: the copy never paused");
        for p in &disks {
            assert_no_writer_gets(p, what);
        }
        knib_core::crashpoint::release_pause(at);
        let r = backup.join().unwrap();
        if corrupt {
            let e = r.unwrap_err();
            assert!(e.message.contains("the backup is stored") && e.message.contains("marked corrupt"), "{what}: {e}");
        } else {
            r.unwrap();
        }
        for (k, (p, r)) in disks.iter().zip(&refs).enumerate() {
            assert_identical(r, p);
            assert_identical(r, &store.join(format!("b1-{k}.qcow2")));
        }
        if corrupt {
            continue;
        }
        // A backup that ends the chain: the disk stays held until its base
        // has replaced it (a write between the merge and the rename was
        // dropped with the file).
        for (k, p) in disks.iter().enumerate() {
            qemu_io(p, &format!("write -P 0x33 {} 256k", offset()));
            snapshot(p, &refs[k]);
        }
        let at = format!("rename {} to {}", engine::take::base_path(&disks[0]).display(), disks[0].display());
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(300));
        let third = req(2, Incremental, true);
        let backup = std::thread::spawn(move || engine::take_backup(&QemuImg::new(), &third, &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "{what}: the rename never paused");
        assert_no_writer_gets(&disks[0], &format!("{what}, end of chain"));
        knib_core::crashpoint::release_pause(&at);
        backup.join().unwrap().unwrap();
        for (k, (p, r)) in disks.iter().zip(&refs).enumerate() {
            assert_identical(r, p);
            assert_identical(r, &store.join(format!("b2-{k}.qcow2")));
            assert_eq!(chain_len(p), 1, "{what}: {} is not its base alone", p.display());
        }
    }
}

/// A writer (`qemu-io`, as a VM would) cannot open `disk`: QEMU's own
/// locks refuse it.
fn assert_no_writer_gets(disk: &std::path::Path, what: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x66 0 64k"])
        .arg(disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Failed to get \"write\" lock"),
        "{what}: a writer opened {} during the backup: {text}",
        disk.display()
    );
}

/// A base creation interrupted where the disk was renamed to its base
/// (no hard links) and a link (hard or symbolic, to a file outside) was
/// put under the new overlay's name: the next backup is full, since the
/// repair gives the base the disk's name back and the disk runs on no
/// base of knib's. Before, the catalog took the disk for one on its base,
/// decided an incremental, and the backup failed saying the disk had no
/// knib base. The outside file is not read into the backup nor written.
/// With knib's own overlay there (case "own"), the repair puts it in the
/// disk's place and the chain goes on: an incremental.
#[test]
fn a_backup_after_an_overlay_refused_on_the_rename_path_is_full() {
    use knib_core::catalog::{BackupOptions, DiskSpec, Store};
    for case in ["symbolic", "hard", "own"] {
        let s = SwapSetup::new();
        let store = Store::create(&s.store).unwrap();
        let disks = [DiskSpec { name: "vda".into(), path: s.disk.clone() }];
        let b1 = store.backup("vm1", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        let base = engine::take::base_path(&s.disk);
        let new = s.disk.with_file_name("disk.qcow2.knib-new");
        let reference = s.dir.path().join("ref2.qcow2");
        // The state: the disk renamed to its base, under the overlay's
        // name a link, or knib's overlay (the disk's delta since b1).
        if case == "own" {
            qemu_io(&s.disk, "write -P 0x5c 1M 1M");
            snapshot(&s.disk, &reference);
            std::fs::rename(&s.disk, &new).unwrap();
        } else {
            snapshot(&s.disk, &reference);
            std::fs::remove_file(&s.disk).unwrap();
            std::fs::write(&new, b"").unwrap();
            replace_with_link(&new, &s.victim, case == "hard");
        }
        assert!(base.exists() && !s.disk.exists(), "{case}");
        let b2 = store.backup("vm1", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        let kind = if case == "own" { engine::BackupKind::Incremental } else { engine::BackupKind::Full };
        assert_eq!(b2.kind, kind, "{case}: {b2:?}");
        assert_ne!(b2.id, b1.id);
        assert!(std::fs::symlink_metadata(&new).is_err(), "{case}: the entry under the overlay's name is left");
        assert!(std::fs::symlink_metadata(&s.disk).unwrap().file_type().is_file(), "{case}");
        assert_identical(&s.disk, &reference);
        let out = s.dir.path().join(format!("restored-{case}.qcow2"));
        store.restore(&b2.id, "vda", &out, knib_core::qemu_img::ImageFormat::Qcow2, &Control::new()).unwrap();
        assert_identical(&out, &reference);
        assert_eq!(std::fs::read(&s.victim).unwrap(), b"not knib's", "{case}");
    }
}

/// A disk left missing with its data at its base (a backup killed on a
/// file system without hard links after it took back an overlay it
/// refused, before the base took the disk's name back): nothing is
/// repaired (the disk may have been removed on purpose), and inspecting
/// the disk (as a backup of it does) says where its data is and what to
/// do: not found, naming the base; nothing is written. Once renamed back
/// the disk reads as before.
#[test]
fn a_disk_missing_beside_its_base_is_reported_with_the_base() {
    let s = SwapSetup::new();
    let base = engine::take::base_path(&s.disk);
    std::fs::rename(&s.disk, &base).unwrap();
    assert!(!engine::take::repair_volume(&s.disk).unwrap());
    let q = QemuImg::new();
    let e = engine::take::inspect_disk(&q, "vda", &s.disk, &Control::new()).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::NotFound, "{e}");
    let says = format!("{} is there, and holds the disk's data", base.display());
    assert!(e.message.starts_with(&format!("disk vda: {} does not exist", s.disk.display())), "{e}");
    assert!(e.message.contains(&says) && e.message.contains(&format!("rename it back to {}", s.disk.display())), "{e}");
    let store = knib_core::catalog::Store::create(&s.store).unwrap();
    let disks = [knib_core::catalog::DiskSpec { name: "vda".into(), path: s.disk.clone() }];
    let opts = knib_core::catalog::BackupOptions::default();
    let e = store.backup("vm1", &disks, &opts, &Control::new()).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::NotFound, "{e}");
    assert!(e.message.contains(&says), "{e}");
    assert!(store.list(None).unwrap().is_empty());
    let vm_dir = s.store.join("vms/vm1");
    let left: Vec<_> = std::fs::read_dir(&vm_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".part")), "{left:?}");
    std::fs::rename(&base, &s.disk).unwrap();
    engine::take::inspect_disk(&q, "vda", &s.disk, &Control::new()).unwrap();
    assert_identical(&s.disk, &s.reference);
    // A disk simply missing says only that.
    std::fs::remove_file(&s.disk).unwrap();
    let e = engine::take::inspect_disk(&q, "vda", &s.disk, &Control::new()).unwrap_err();
    assert_eq!(e.message, format!("disk vda: {} does not exist", s.disk.display()));
}

/// A base creation interrupted where the disk was renamed to its base (a
/// file system without hard links, or an older knib), with a link (hard
/// or symbolic, to a file outside) under the new overlay's name: the
/// repair puts the base back under the disk's name and removes the link.
/// Before, it renamed the entry under the overlay's name to the disk's:
/// the VM's disk became the link.
#[test]
fn a_repair_never_makes_a_link_under_the_overlays_name_the_disk() {
    for hard in [false, true] {
        let s = SwapSetup::new();
        let base = engine::take::base_path(&s.disk);
        let new = s.disk.with_file_name("disk.qcow2.knib-new");
        std::fs::rename(&s.disk, &base).unwrap();
        std::fs::write(&new, b"").unwrap();
        replace_with_link(&new, &s.victim, hard);
        assert!(engine::take::repair_volume(&s.disk).unwrap(), "hard {hard}: nothing repaired");
        let m = std::fs::symlink_metadata(&s.disk).unwrap();
        assert!(m.file_type().is_file(), "hard {hard}: the disk is a link");
        assert_identical(&s.disk, &s.reference);
        assert!(std::fs::symlink_metadata(&new).is_err(), "hard {hard}: the link is left");
        assert!(!base.exists(), "hard {hard}: the base is left");
        assert_eq!(std::fs::read(&s.victim).unwrap(), b"not knib's", "hard {hard}");
    }
}
