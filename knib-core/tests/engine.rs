//! Engine operations used on their own (as the CloudStack agent does):
//! merging a delta, finalizing a compression whose backup went away, and the
//! chain hash.

mod common;

use std::path::PathBuf;

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
