//! Images damaged the way QEMU's iotests damage them (dirty lazy-refcount
//! images left by a killed writer, L1/L2/refcount entries pointing at
//! metadata, bad header fields, snapshots, bitmaps, odd virtual sizes),
//! through the native merge and through `Store::backup`: knib either
//! refuses with `corrupt` naming the problem and leaves the bytes as they
//! were, or has QEMU repair the image first, and then the chain reads
//! exactly what it read before and `qemu-img check` is clean.

mod common;
#[path = "common/gen.rs"]
mod gen;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::disk::*;
use gen::Rng;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::engine::native;
use knib_core::qemu_img::QemuImg;
use knib_core::{Control, ErrorKind};

/// Run qemu-io on `disk` and kill it (SIGKILL) after `cmds`: a writer that
/// dies, leaving the dirty bit and stale lazy refcounts.
fn qemu_io_killed(disk: &Path, cmds: &[String]) {
    // knib's own overlays are made without lazy refcounts: turn them on.
    let st = Command::new("qemu-img").args(["amend", "-f", "qcow2", "-o", "lazy_refcounts=on"]).arg(disk).status();
    assert!(st.unwrap().success());
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.args(["-c", "sigraise 9"]).arg(disk);
    let out = c.output().expect("qemu-io runs");
    assert!(!out.status.success(), "qemu-io was not killed");
    assert!(is_dirty(disk), "{} is not dirty after the kill", disk.display());
}

fn is_dirty(p: &Path) -> bool {
    let b = std::fs::read(p).unwrap();
    u64::from_be_bytes(b[72..80].try_into().unwrap()) & 1 != 0
}

/// `qemu-img check` finds no corruption or leak (it may repair nothing).
fn check_clean(p: &Path) -> bool {
    let out = Command::new("qemu-img").args(["check", "-U"]).arg(p).output().unwrap();
    out.status.success()
}

fn opts() -> BackupOptions {
    BackupOptions { chain_size: 8, ..Default::default() }
}

/// Seeded writes of whole and partial clusters over `size` bytes.
fn writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(256)) * 512;
            let len = len.min(size - off);
            format!("write -q -P {} {off} {len}", 1 + rng.below(250))
        })
        .collect()
}

/// The dirty cases through `Store::backup`: the disk is dirty at the first
/// backup (it becomes the base), or its delta is dirty at an incremental,
/// over several cluster sizes. Every backup's restore equals the disk as
/// it was, and the disk afterwards still reads the same and checks clean.
#[test]
fn dirty_disks_through_store_backup_lose_nothing() {
    for (case, cluster) in [(0u64, 65536u64), (1, 4096), (2, 512 * 1024), (3, 65536)] {
        let mut rng = Rng::new(1300 + case);
        let dir = tempfile::tempdir().unwrap();
        let sdir = tempfile::tempdir().unwrap();
        let store = Store::create(sdir.path()).unwrap();
        let size = 16u64 << 20;
        let disk = dir.path().join("d.qcow2");
        make_disk(&disk, size, &["-o", &format!("lazy_refcounts=on,cluster_size={cluster}")]);
        let disks = vec![DiskSpec { name: "d".into(), path: disk.clone() }];
        // Case 0 and 1: the disk is dirty at its first backup (then its
        // base is dirty at the second). Case 2 and 3: the delta is dirty.
        let dirty_first = case < 2;
        for round in 0..3 {
            let ops = writes(&mut rng, size, 12);
            if (round == 0 && dirty_first) || (round == 1 && !dirty_first) {
                qemu_io_killed(&disk, &ops);
            } else {
                for op in &ops {
                    qemu_io(&disk, op);
                }
            }
            let reference = dir.path().join(format!("ref{round}.qcow2"));
            snapshot(&disk, &reference);
            let m = store.backup("vm1", &disks, &opts(), &Control::new()).unwrap();
            // The disk reads what it read before the backup.
            assert_identical(&disk, &reference);
            let out = dir.path().join(format!("r{round}.qcow2"));
            store.restore(&m.id, "d", &out, knib_core::qemu_img::ImageFormat::Qcow2, &Control::new()).unwrap();
            assert_identical(&out, &reference);
            for f in QemuImg::new().info_chain(&disk, &Control::new()).unwrap() {
                let p = PathBuf::from(&f.filename);
                if !is_dirty(&p) {
                    assert!(check_clean(&p), "case {case} round {round}: {} does not check clean", p.display());
                }
            }
        }
    }
}

/// A virtual size that is not a multiple of 512 in the header (QEMU reads
/// it rounded down) or not of the cluster size: backup, restore and verify
/// agree on the size.
#[test]
fn odd_virtual_sizes_backup_restore_and_verify_agree() {
    for (i, (size, header_size)) in
        [(1_000_001u64, None), (3 << 20, Some((3u64 << 20) - 1000)), (65536 * 3 + 512, None)].into_iter().enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let sdir = tempfile::tempdir().unwrap();
        let store = Store::create(sdir.path()).unwrap();
        let disk = dir.path().join("d.qcow2");
        make_disk(&disk, size, &[]);
        qemu_io(&disk, "write -P 0x5a 0 4096");
        if let Some(hs) = header_size {
            let mut b = std::fs::read(&disk).unwrap();
            b[24..32].copy_from_slice(&hs.to_be_bytes());
            std::fs::write(&disk, b).unwrap();
        }
        let qemu_size = QemuImg::new().info(&disk, &Control::new()).unwrap().virtual_size;
        let disks = vec![DiskSpec { name: "d".into(), path: disk.clone() }];
        for round in 0..2 {
            qemu_io(&disk, &format!("write -P {} 8192 4096", 0x10 + round));
            let reference = dir.path().join(format!("ref{round}.qcow2"));
            snapshot(&disk, &reference);
            let m = store.backup("vm1", &disks, &opts(), &Control::new()).unwrap();
            assert_eq!(m.volumes[0].virtual_size, qemu_size, "case {i}: the manifest's size");
            let v = store.verify(Some(&m.id), &Control::new()).unwrap();
            assert!(v.iter().all(|r| r.ok), "case {i} round {round}: verify: {v:?}");
            for fmt in [knib_core::qemu_img::ImageFormat::Qcow2, knib_core::qemu_img::ImageFormat::Raw] {
                let out = dir.path().join(format!("r{round}.{}", fmt.as_str()));
                store.restore(&m.id, "d", &out, fmt, &Control::new()).unwrap();
                assert_eq!(QemuImg::new().info(&out, &Control::new()).unwrap().virtual_size, qemu_size, "case {i}");
                assert_identical(&out, &reference);
            }
        }
    }
}

// ---- Damaged bases and tops through the merge (engine::native::commit) ----

fn rd64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn wr64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// A base with seeded data and a top over it with seeded writes, in `dir`.
fn make_pair(dir: &Path, rng: &mut Rng, cluster: u64) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let size = 4u64 << 20;
    make_disk(&base, size, &["-o", &format!("cluster_size={cluster}")]);
    for op in writes(rng, size, 10) {
        qemu_io(&base, &op);
    }
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster}"))
        .arg(&top)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success());
    for op in writes(rng, size, 10) {
        qemu_io(&top, &op);
    }
    (base, top)
}

/// The non-zero L2 entries of `img`: (guest cluster, file offset of the
/// entry, entry).
fn l2_entries(img: &[u8]) -> Vec<(u64, u64, u64)> {
    let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
    let l1_off = rd64(img, 40);
    let l1_size = u64::from(u32::from_be_bytes(img[36..40].try_into().unwrap()));
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = rd64(img, l1_off + i * 8) & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        for j in 0..cs / 8 {
            let e = rd64(img, l2 + j * 8);
            if e != 0 {
                out.push((i * (cs / 8) + j, l2 + j * 8, e));
            }
        }
    }
    out
}

/// The L2 entries of `img` that hold an uncompressed host cluster: (file
/// offset of the entry, entry).
fn data_entries(img: &[u8]) -> Vec<(u64, u64)> {
    l2_entries(img)
        .into_iter()
        .filter(|&(_, _, e)| e & COMPRESSED == 0 && e & OFFSET_MASK != 0)
        .map(|(_, at, e)| (at, e))
        .collect()
}

/// The compressed L2 entry of `img` (there is one): (file offset of the
/// entry, entry).
fn compressed_entry(img: &[u8]) -> (u64, u64) {
    let mut c = l2_entries(img).into_iter().filter(|&(_, _, e)| e & COMPRESSED != 0);
    let (_, at, e) = c.next().expect("a compressed L2 entry");
    assert!(c.next().is_none(), "one compressed L2 entry");
    (at, e)
}

/// The kinds of damage made to a compressed cluster, which the base gets
/// first (written by QEMU: see [`compress_one_cluster`]).
fn needs_compressed(kind: &str) -> bool {
    kind.starts_with("compressed-")
}

/// Write one compressed cluster into `base` (qemu-io `write -c`, at the
/// end of the file) at a guest cluster the top holds (so the merge
/// replaces it) and the base does not (QEMU compresses only into
/// unallocated clusters).
fn compress_one_cluster(base: &Path, top: &Path) {
    let (b, t) = (std::fs::read(base).unwrap(), std::fs::read(top).unwrap());
    let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let in_base: std::collections::HashSet<u64> = l2_entries(&b).iter().map(|&(g, _, _)| g).collect();
    let g = l2_entries(&t)
        .iter()
        .map(|&(g, _, _)| g)
        .find(|g| !in_base.contains(g))
        .expect("a guest cluster the top holds and the base does not");
    qemu_io(base, &format!("write -q -c -P 0x6b {} {cs}", g * cs));
}

/// Ways to damage a base, as QEMU's iotests do.
const DAMAGE: &[&str] = &[
    "l2-at-refcount-block",
    "l2-at-refcount-table",
    "l2-past-eof",
    "l2-at-l1",
    "l2-at-l2",
    "l1-at-l1",
    "two-l2-at-one-cluster",
    "refcount-zero-in-use",
    "refcount-zero-on-l2",
    "refcount-block-at-l2",
    // The copied flag (bit 63) against the refcount, as `qemu-img check`
    // checks it (OFLAG_COPIED): the merge rewrites an L2 table only when
    // its L1 entry has the flag (it failed there, part-way, after earlier
    // ranges were written and synced), writes in place over a cluster whose
    // entry has it, drops a reference to one whose entry lacks it.
    "l1-copied-cleared",
    "l2-copied-cleared",
    "l2-copied-refcount-2",
    // A compressed cluster whose sector count reaches a cluster past the
    // end of the file (the merge, replacing it, dropped references to
    // clusters past the end: "would go from 0 to -1", after its L2 entries
    // were durable), or with the copied flag.
    "compressed-past-eof",
    "compressed-copied",
];

/// Damage `img` (the bytes of a base; `top`: those of the top) the way
/// `kind` says; returns the words the refusal must name.
fn damage(img: &mut [u8], top: &[u8], kind: &str, rng: &mut Rng) -> &'static str {
    let l1_off = rd64(img, 40);
    let rt_off = rd64(img, 48);
    let block = rd64(img, rt_off) & !0x1ff;
    let entries = data_entries(img);
    let (at, e) = entries[rng.below(entries.len() as u64) as usize];
    let l1_size = u64::from(u32::from_be_bytes(img[36..40].try_into().unwrap()));
    let l2s: Vec<u64> = (0..l1_size).map(|i| rd64(img, l1_off + i * 8) & OFFSET_MASK).filter(|&o| o != 0).collect();
    let keep = e & !OFFSET_MASK;
    match kind {
        "l2-at-refcount-block" => {
            wr64(img, at, keep | block);
            "refcount block"
        }
        "l2-at-refcount-table" => {
            wr64(img, at, keep | rt_off);
            "refcount table"
        }
        "l2-past-eof" => {
            wr64(img, at, keep | ((img.len() as u64 + (1 << 21)) & !0x1f_ffff));
            "past the end of the file"
        }
        "l2-at-l1" => {
            wr64(img, at, keep | l1_off);
            "L1 table"
        }
        "l2-at-l2" => {
            wr64(img, at, keep | l2s[rng.below(l2s.len() as u64) as usize]);
            "L2 table"
        }
        "l1-at-l1" => {
            wr64(img, l1_off, COPIED | l1_off);
            "L1 table"
        }
        "two-l2-at-one-cluster" => {
            let (at2, _) = entries.iter().copied().find(|&(a, _)| a != at).unwrap();
            wr64(img, at2, keep | (e & OFFSET_MASK));
            "also holds another L2 entry's data"
        }
        "refcount-zero-in-use" => {
            let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
            let c = (e & OFFSET_MASK) / cs;
            let per_block = cs / 2;
            let b = rd64(img, rt_off + (c / per_block) * 8) & !0x1ff;
            let at = (b + (c % per_block) * 2) as usize;
            img[at..at + 2].copy_from_slice(&[0, 0]);
            "stale refcounts"
        }
        "refcount-zero-on-l2" => {
            // An L2 table's own refcount (the last table: a host cluster
            // far from the header, in a later window of a windowed check).
            let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
            let c = l2s.iter().max().copied().unwrap() / cs;
            let per_block = cs / 2;
            let b = rd64(img, rt_off + (c / per_block) * 8) & !0x1ff;
            let at = (b + (c % per_block) * 2) as usize;
            img[at..at + 2].copy_from_slice(&[0, 0]);
            "stale refcounts"
        }
        "refcount-block-at-l2" => {
            wr64(img, rt_off, l2s[0]);
            "L2 table"
        }
        "l1-copied-cleared" => {
            // The last L1 entry of both files (one the top writes into,
            // after others it writes into: index 1 or more where the
            // image has more than one L2 table).
            let top_l1 = rd64(top, 40);
            let i = (0..l1_size)
                .rev()
                .find(|&i| rd64(img, l1_off + i * 8) & OFFSET_MASK != 0 && rd64(top, top_l1 + i * 8) & OFFSET_MASK != 0)
                .expect("an L1 entry of both files");
            let at = l1_off + i * 8;
            let e = rd64(img, at);
            assert!(e & COPIED != 0, "L1 entry {i}: {e:#x}");
            wr64(img, at, e & !COPIED);
            "L1 entry"
        }
        "l2-copied-cleared" => {
            assert!(e & COPIED != 0, "{e:#x}");
            wr64(img, at, e & !COPIED);
            "lacks the copied flag"
        }
        "l2-copied-refcount-2" => {
            let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
            let c = (e & OFFSET_MASK) / cs;
            let per_block = cs / 2;
            let b = rd64(img, rt_off + (c / per_block) * 8) & !0x1ff;
            let at = (b + (c % per_block) * 2) as usize;
            assert_eq!(img[at..at + 2], [0, 1]);
            img[at..at + 2].copy_from_slice(&[0, 2]);
            "has the copied flag, but"
        }
        "compressed-past-eof" => {
            // The largest sector count: the data's two clusters (the most
            // a descriptor spans) from a cluster that ends the file.
            let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
            let (at, e) = compressed_entry(img);
            let x = 62 - (u32::from_be_bytes(img[20..24].try_into().unwrap()) - 8);
            let coff = e & ((1 << x) - 1);
            assert_eq!(coff / cs, (img.len() as u64 - 1) / cs, "the compressed data ends the file");
            wr64(img, at, e | (((1 << (62 - x)) - 1) << x));
            "runs past the end of the file"
        }
        "compressed-copied" => {
            let (at, e) = compressed_entry(img);
            wr64(img, at, e | COPIED);
            "copied flag"
        }
        _ => unreachable!(),
    }
}

/// Every kind of damage, over several cluster sizes, from a fixed seed:
/// the merge refuses with a corrupt error naming the problem, and neither
/// file changes. The same pair undamaged merges and reads as before.
#[test]
fn damaged_bases_are_refused_before_anything_is_written() {
    let q = QemuImg::new();
    for (n, &cluster) in [512u64, 4096, 65536].iter().enumerate() {
        for (k, kind) in DAMAGE.iter().enumerate() {
            let mut rng = Rng::new(1313 + (n * 100 + k) as u64);
            let dir = tempfile::tempdir().unwrap();
            let (base, top) = make_pair(dir.path(), &mut rng, cluster);
            if needs_compressed(kind) {
                compress_one_cluster(&base, &top);
            }
            let tag = format!("{kind} with {cluster}-byte clusters");
            // Undamaged, the base passes the check and qemu-img check.
            assert!(knib_core::qcow2::scan_file(&base, None).unwrap().is_ok(), "{tag}: undamaged");
            assert!(check_clean(&base), "{tag}: undamaged");
            let mut img = std::fs::read(&base).unwrap();
            let top_bytes = std::fs::read(&top).unwrap();
            let words = damage(&mut img, &top_bytes, kind, &mut rng);
            std::fs::write(&base, &img).unwrap();
            // QEMU finds it too (it is damage, not a new layout).
            assert!(!check_clean(&base), "{tag}: qemu-img check finds nothing");
            // The check before the write finds the same, whether it counts
            // the references in one pass or in windows of a few clusters.
            let whole = knib_core::qcow2::scan_file(&base, None).expect_err("damage found");
            for window in [1, 2, 5, 64] {
                let e = knib_core::qcow2::scan_file(&base, Some(window)).err();
                assert_eq!(e.as_ref().map(|e| &e.message), Some(&whole.message), "{tag}, window {window}");
            }
            let e = native::commit(&q, &top, native::DataPath::Native, &Control::new())
                .err()
                .unwrap_or_else(|| panic!("{tag}: merged into a damaged base"));
            assert_eq!(e.kind, ErrorKind::Corrupt, "{tag}: {e}");
            assert!(e.message.contains("base.qcow2") && e.message.contains(words), "{tag}: {e}");
            assert_eq!(std::fs::read(&base).unwrap(), img, "{tag}: the base changed");
            assert_eq!(std::fs::read(&top).unwrap(), top_bytes, "{tag}: the top changed");
        }
        // The control: undamaged, the same pair merges and reads the same.
        let mut rng = Rng::new(1313 + n as u64 * 100);
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = make_pair(dir.path(), &mut rng, cluster);
        let before = dir.path().join("before.qcow2");
        snapshot(&top, &before);
        let end = knib_core::qcow2::scan_file(&base, None).unwrap().unwrap();
        for window in [1, 2, 5, 64] {
            assert_eq!(knib_core::qcow2::scan_file(&base, Some(window)).unwrap().unwrap(), end, "window {window}");
        }
        native::commit(&q, &top, native::DataPath::Native, &Control::new()).unwrap();
        assert_identical(&base, &before);
        assert_identical(&top, &before);
        assert!(check_clean(&base));
    }
}

/// The offset of header extension `ty` in `img` (v3, header_length 112 or
/// more): the offset of its type field.
fn find_ext(img: &[u8], ty: u32) -> Option<usize> {
    let mut pos = u32::from_be_bytes(img[100..104].try_into().unwrap()) as usize;
    loop {
        let t = u32::from_be_bytes(img[pos..pos + 4].try_into().unwrap());
        let len = u32::from_be_bytes(img[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if t == ty {
            return Some(pos);
        }
        if t == 0 {
            return None;
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

fn qemu_img_ok(args: &[&str], dir: &Path) {
    let out = Command::new("qemu-img").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Header fields QEMU refuses to open an image with: the reader refuses
/// them as corrupt naming the field, and a merge into such a base is
/// refused the same way with the base unchanged.
#[test]
fn headers_qemu_refuses_are_refused_as_corrupt() {
    let q = QemuImg::new();
    let cases: &[(&str, &str)] = &[
        ("too-many-snapshots", "snapshots are over the limit"),
        ("snapshot-table-misaligned", "snapshot table offset"),
        ("snapshot-table-past-eof", "snapshot table at"),
        ("refcount-table-too-large", "refcount table of"),
        ("bitmaps-none", "bitmaps extension"),
        ("bitmap-directory-misaligned", "directory offset"),
        ("bitmap-directory-past-eof", "bitmap directory at"),
        ("backing-format-too-long", "backing format extension"),
    ];
    for (i, (kind, words)) in cases.iter().enumerate() {
        let mut rng = Rng::new(1340 + i as u64);
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = make_pair(dir.path(), &mut rng, 65536);
        if kind.starts_with("bitmap") {
            qemu_img_ok(&["bitmap", "--add", "base.qcow2", "b0"], dir.path());
        }
        // The damaged image: the base, or for the backing format the top.
        let target = if *kind == "backing-format-too-long" { &top } else { &base };
        let mut img = std::fs::read(target).unwrap();
        let len = img.len() as u64;
        match *kind {
            "too-many-snapshots" => img[60..64].copy_from_slice(&65537u32.to_be_bytes()),
            "snapshot-table-misaligned" => {
                img[60..64].copy_from_slice(&1u32.to_be_bytes());
                wr64(&mut img, 64, 65536 + 8);
            }
            "snapshot-table-past-eof" => {
                img[60..64].copy_from_slice(&1u32.to_be_bytes());
                wr64(&mut img, 64, (len + (1 << 20)) & !0xffff);
            }
            "refcount-table-too-large" => img[56..60].copy_from_slice(&129u32.to_be_bytes()),
            "bitmaps-none" => {
                let at = find_ext(&img, 0x2385_2875).expect("bitmaps extension");
                img[at + 8..at + 12].copy_from_slice(&0u32.to_be_bytes());
            }
            "bitmap-directory-misaligned" => {
                let at = find_ext(&img, 0x2385_2875).expect("bitmaps extension");
                let off = rd64(&img, at as u64 + 24);
                wr64(&mut img, at as u64 + 24, off + 8);
            }
            "bitmap-directory-past-eof" => {
                let at = find_ext(&img, 0x2385_2875).expect("bitmaps extension");
                wr64(&mut img, at as u64 + 24, (len + (1 << 20)) & !0xffff);
            }
            "backing-format-too-long" => {
                let at = find_ext(&img, 0xe279_2aca).expect("backing format extension");
                img[at + 4..at + 8].copy_from_slice(&16u32.to_be_bytes());
            }
            _ => unreachable!(),
        }
        std::fs::write(target, &img).unwrap();
        let base_bytes = std::fs::read(&base).unwrap();
        let e = knib_core::qcow2::Qcow2Image::open(target).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{kind}: {e}");
        assert!(e.message.contains(words), "{kind}: {e}");
        let e = native::commit(&q, &top, native::DataPath::Native, &Control::new())
            .err()
            .unwrap_or_else(|| panic!("{kind}: merged"));
        assert_eq!(e.kind, ErrorKind::Corrupt, "{kind}: {e}");
        assert!(e.message.contains(words), "{kind}: {e}");
        assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "{kind}: the base changed");
    }
}

/// A backing file name with a NUL byte in it (QEMU takes the name as cut
/// there): the reader refuses the image as corrupt naming the byte, and a
/// merge of it is refused the same way with both files unchanged. Before,
/// the name was taken whole and failed late, in a std::fs call that named
/// no image ("file name contained an unexpected NUL byte").
#[test]
fn a_backing_file_name_with_a_nul_byte_is_refused_as_corrupt() {
    let q = QemuImg::new();
    let mut rng = Rng::new(1345);
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_pair(dir.path(), &mut rng, 65536);
    let mut img = std::fs::read(&top).unwrap();
    let at = rd64(&img, 8) as usize;
    let len = u32::from_be_bytes(img[16..20].try_into().unwrap()) as usize;
    assert_eq!(&img[at..at + len], b"base.qcow2");
    img[at + 4] = 0;
    std::fs::write(&top, &img).unwrap();
    let (base_bytes, top_bytes) = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    let words = format!("qcow2 image {}: backing file name has a NUL byte at 4", top.display());
    let e = knib_core::qcow2::Qcow2Image::open(&top).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&words), "{e}");
    let e = knib_core::qcow2::Chain::open(&top).expect_err("the chain opens");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&words), "{e}");
    let e = native::commit(&q, &top, native::DataPath::Native, &Control::new()).expect_err("merged");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&words), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "the base changed");
    assert_eq!(std::fs::read(&top).unwrap(), top_bytes, "the top changed");
}

/// A top with internal snapshots, bitmaps or lazy refcounts: the merge
/// keeps them (the top is emptied by qemu-img commit, or natively with the
/// lazy refcounts bit kept), and `empty_image` refuses what it would drop.
#[test]
fn tops_keep_their_snapshots_bitmaps_and_features() {
    let q = QemuImg::new();
    for (i, kind) in ["snapshot", "bitmap", "lazy-refcounts"].iter().enumerate() {
        let mut rng = Rng::new(1350 + i as u64);
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = make_pair(dir.path(), &mut rng, 65536);
        match *kind {
            "snapshot" => qemu_img_ok(&["snapshot", "-c", "s1", "top.qcow2"], dir.path()),
            "bitmap" => qemu_img_ok(&["bitmap", "--add", "top.qcow2", "b1"], dir.path()),
            _ => qemu_img_ok(&["amend", "-o", "lazy_refcounts=on", "top.qcow2"], dir.path()),
        }
        if *kind != "lazy-refcounts" {
            let h = knib_core::qcow2::Qcow2Image::open(&top).unwrap().header().clone();
            let bytes = std::fs::read(&top).unwrap();
            let e = knib_core::qcow2::empty_image(&top, &h).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{kind}: {e}");
            assert_eq!(std::fs::read(&top).unwrap(), bytes, "{kind}: emptied");
        }
        let before = dir.path().join("before.qcow2");
        snapshot(&top, &before);
        let end = knib_core::qcow2::scan_file(&base, None).unwrap().unwrap();
        for window in [1, 2, 5, 64] {
            assert_eq!(knib_core::qcow2::scan_file(&base, Some(window)).unwrap().unwrap(), end, "window {window}");
        }
        native::commit(&q, &top, native::DataPath::Native, &Control::new()).unwrap();
        assert_identical(&base, &before);
        assert_identical(&top, &before);
        assert!(check_clean(&base) && check_clean(&top), "{kind}");
        let info = Command::new("qemu-img").args(["info", "-U"]).arg(&top).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout).to_string();
        let kept = match *kind {
            "snapshot" => info.contains("s1"),
            "bitmap" => info.contains("b1"),
            _ => info.contains("lazy refcounts: true"),
        };
        assert!(kept, "{kind}: lost by the merge: {info}");
    }
}

// ---- The refcount check's memory (Qcow2Image::check_refcounts) ----

/// A 1 TiB image in a 384 KiB file (64 KiB clusters, 32-bit refcounts):
/// its 2048 L1 entries all point at one L2 table, whose 8192 entries all
/// point at one data cluster: 2^24 references, with consistent refcounts
/// (2048 for the table, 2^24 for the data). The entries have the copied
/// flag when `copied` (wrong: their cluster's refcount is not 1).
fn one_cluster_everywhere(path: &Path, copied: bool) {
    let cs = 1u64 << 16;
    let (l1_size, l2n) = (2048u64, cs / 8);
    let mut img = vec![0u8; 6 * cs as usize];
    img[..4].copy_from_slice(b"QFI\xfb");
    img[4..8].copy_from_slice(&3u32.to_be_bytes());
    img[20..24].copy_from_slice(&16u32.to_be_bytes());
    wr64(&mut img, 24, l1_size * l2n * cs);
    img[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
    wr64(&mut img, 40, cs); // L1 table: host cluster 1
    wr64(&mut img, 48, 2 * cs); // refcount table: host cluster 2
    img[56..60].copy_from_slice(&1u32.to_be_bytes());
    img[96..100].copy_from_slice(&5u32.to_be_bytes()); // 32-bit refcounts
    img[100..104].copy_from_slice(&112u32.to_be_bytes());
    let flag = if copied { COPIED } else { 0 };
    for i in 0..l1_size {
        wr64(&mut img, cs + i * 8, flag | (4 * cs));
    }
    wr64(&mut img, 2 * cs, 3 * cs); // refcount block: host cluster 3
    for (c, n) in [(0u64, 1u32), (1, 1), (2, 1), (3, 1), (4, l1_size as u32), (5, (l1_size * l2n) as u32)] {
        let at = (3 * cs + c * 4) as usize;
        img[at..at + 4].copy_from_slice(&n.to_be_bytes());
    }
    for j in 0..l2n {
        wr64(&mut img, 4 * cs + j * 8, flag | (5 * cs));
    }
    img[5 * cs as usize..].fill(0x5a);
    std::fs::write(path, img).unwrap();
}

/// The peak resident memory of this process so far, in bytes.
fn max_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

/// The refcount check (a vault's verify runs it before the hash check)
/// keeps nothing per L1 or L2 entry: on an image whose 2^24 entries point
/// at one cluster it finds what it must, the copied flags too, without its
/// memory growing with the entries. (It kept a String and a tuple per
/// entry for the copied flags: its peak grew by 1.3 GiB here, measured;
/// some 70 GiB with 2 MiB clusters and 2^30 entries in a 10 MiB file.)
#[test]
fn the_refcount_check_keeps_nothing_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.qcow2");
    let before = max_rss();
    // Consistent: QEMU agrees.
    one_cluster_everywhere(&path, false);
    assert!(check_clean(&path), "qemu-img check of the crafted image");
    let r = knib_core::qcow2::Qcow2Image::open(&path).unwrap().check_refcounts(&knib_core::Control::new()).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.allocated_clusters, 6);
    // Every L1 and L2 entry has the copied flag its refcount denies: each
    // is counted, the first listed.
    one_cluster_everywhere(&path, true);
    let r = knib_core::qcow2::Qcow2Image::open(&path).unwrap().check_refcounts(&knib_core::Control::new()).unwrap();
    assert_eq!((r.leaks, r.corruptions), (0, 2048 + (1 << 24)));
    assert_eq!(r.problems.len(), 20);
    assert_eq!(r.problems[0], "L1 entry 0: copied flag true but refcount 2048");
    assert_eq!(r.problems[1], "L2 entry 0 of table 0: copied flag true but refcount 16777216");
    assert_eq!(r.problems[19], "L2 entry 18 of table 0: copied flag true but refcount 16777216");
    let grown = max_rss().saturating_sub(before);
    assert!(grown < 200 << 20, "the check's peak memory grew by {} MiB", grown >> 20);
}
