//! `agent.merge_snapshot` (a stopped VM's snapshot delta merged into its
//! parent) of damaged images, seeded, with the real qemu-img and qemu-io:
//! every merge must either leave the parent reading what the child read
//! before (`qemu-img compare`) or fail, naming the damaged file, with every
//! file byte for byte as it was.
//!
//! - The parents the native merge leaves to `qemu-img commit` (refcounts
//!   of 8 bits, an internal snapshot, a bitmap, extended L2 entries; a
//!   version 2 child; a child larger than its parent), each with a used
//!   cluster's refcount set to 0 and, where L2 entries are 8 bytes, with
//!   two L2 entries made to share a cluster the child writes into. Before,
//!   `qemu-img commit` wrote over the parent's data and knib answered
//!   success.
//! - A child whose compressed data is garbled: before, the native merge
//!   had written part of it into the parent when the read failed.
//! - A dirty child (lazy refcounts) over a parent with a refcount set to 0:
//!   before, the child was rewritten (its refcounts rebuilt) and then the
//!   merge refused for the parent.
//!
//! Each variant is merged undamaged too: it must succeed.

#[path = "common/disk.rs"]
mod disk;
#[path = "common/gen.rs"]
mod gen;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{assert_identical, contents, qemu_io, snapshot, zero_first_data_refcount};
use gen::Rng;
use knib_core::api::call;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::json;

const CS: u64 = 64 * 1024;
const SIZE: u64 = 4 << 20;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn merge(parent: &Path, child: &Path) -> Result<String, KnibError> {
    let req = json!({"running": false, "merges": [{"parent": parent, "child": child}]});
    call("agent.merge_snapshot", &req.to_string(), &Control::new())
}

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// The file offsets of the L2 entries of guest clusters `guest` of a qcow2
/// file with 8-byte L2 entries, 64 KiB clusters and one L2 table.
fn l2_entry_at(file: &Path, guest: u64) -> u64 {
    let f = std::fs::File::open(file).unwrap();
    let l1 = be64(&f, 40);
    let l2 = be64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "{}: no L2 table", file.display());
    l2 + guest * 8
}

/// A parent with `parent_opts` (`qemu-img create -o`) holding six seeded
/// clusters, and a child over it with `child_opts` writing four; the
/// clusters the parent holds.
fn pair(dir: &Path, rng: &mut Rng, parent_opts: &str, child_opts: &str) -> (PathBuf, PathBuf, Vec<u64>) {
    let (parent, child) = (dir.join("parent.qcow2"), dir.join("child.qcow2"));
    let mut opts = vec!["create", "-q", "-f", "qcow2"];
    if !parent_opts.is_empty() {
        opts.extend(["-o", parent_opts]);
    }
    qemu_img(&[&opts[..], &[parent.to_str().unwrap(), &SIZE.to_string()]].concat());
    let mut used = Vec::new();
    while used.len() < 6 {
        let c = rng.below(SIZE / CS);
        if !used.contains(&c) {
            used.push(c);
        }
    }
    for (k, c) in used.iter().enumerate() {
        qemu_io(&parent, &format!("write -q -P {} {} {CS}", 0x10 + k, c * CS));
    }
    let mut opts = vec!["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "parent.qcow2"];
    if !child_opts.is_empty() {
        opts.extend(["-o", child_opts]);
    }
    qemu_img(&[&opts[..], &[child.to_str().unwrap(), &SIZE.to_string()]].concat());
    for k in 0..4 {
        let c = rng.below(SIZE / CS);
        qemu_io(&child, &format!("write -q -P {} {} {}", 0xa0 + k, c * CS, 1 + rng.below(CS)));
    }
    (parent, child, used)
}

/// Merge; it must fail with `kind`, naming `names`, every file as it was.
fn assert_refused(dir: &Path, parent: &Path, child: &Path, what: &str, kind: ErrorKind, names: &Path) {
    let before = contents(dir);
    let e = merge(parent, child).unwrap_err();
    assert_eq!(e.kind, kind, "{what}: {e}");
    assert!(e.message.contains(&names.display().to_string()), "{what}: must name {}: {e}", names.display());
    assert!(contents(dir) == before, "{what}: a file changed though the merge failed ({e})");
}

/// Merge; it must succeed and the parent read what the child read.
fn assert_merged(dir: &Path, parent: &Path, child: &Path, what: &str) {
    let reference = dir.join("reference.raw");
    snapshot(child, &reference);
    merge(parent, child).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_identical(parent, &reference);
}

/// (parent's options, child's options, child resized to twice the size,
/// L2 entries of 8 bytes)
const FALLBACKS: [(&str, &str, bool, bool); 6] = [
    ("refcount_bits=8", "", false, true),
    ("", "compat=0.10", false, true),
    ("", "", true, true),
    ("extended_l2=on", "extended_l2=on", false, false),
    ("snapshot", "", false, true),
    ("bitmap", "", false, true),
];

fn fallback_pair(dir: &Path, rng: &mut Rng, v: usize) -> (PathBuf, PathBuf, Vec<u64>) {
    let (popts, copts, bigger, _) = FALLBACKS[v];
    let plain = matches!(popts, "snapshot" | "bitmap");
    let (parent, child, used) = pair(dir, rng, if plain { "" } else { popts }, copts);
    match popts {
        "snapshot" => qemu_img(&["snapshot", "-c", "s1", parent.to_str().unwrap()]),
        "bitmap" => qemu_img(&["bitmap", "--add", parent.to_str().unwrap(), "b0"]),
        _ => {}
    }
    if bigger {
        qemu_img(&["resize", "-q", child.to_str().unwrap(), &(2 * SIZE).to_string()]);
        qemu_io(&child, &format!("write -q -P 204 {} {CS}", SIZE + CS));
    }
    (parent, child, used)
}

#[test]
fn merges_that_qemu_img_commit_does_refuse_a_damaged_parent() {
    for seed in 0..2u64 {
        for (v, fallback) in FALLBACKS.iter().enumerate() {
            let what = format!("seed {seed}, parent {fallback:?}");
            let mut rng = Rng::new(0x3e46 + seed * 16 + v as u64);
            // Undamaged: merged, the parent reads what the child read.
            let d = tempfile::tempdir().unwrap();
            let (parent, child, _) = fallback_pair(d.path(), &mut rng, v);
            assert_merged(d.path(), &parent, &child, &what);
            // A used cluster's refcount 0: a cluster to allocate, to qemu-img.
            let d = tempfile::tempdir().unwrap();
            let (parent, child, _) = fallback_pair(d.path(), &mut rng, v);
            zero_first_data_refcount(&parent);
            assert_refused(d.path(), &parent, &child, &format!("{what}, refcount 0"), ErrorKind::Corrupt, &parent);
            // Two L2 entries on one cluster, which the child writes into.
            if !fallback.3 {
                continue;
            }
            let d = tempfile::tempdir().unwrap();
            let (parent, child, used) = fallback_pair(d.path(), &mut rng, v);
            let (a, b) = (used[rng.below(3) as usize], used[3 + rng.below(3) as usize]);
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&parent).unwrap();
            let (ea, eb) = (be64(&f, l2_entry_at(&parent, a)), be64(&f, l2_entry_at(&parent, b)));
            let offset = 0x00ff_ffff_ffff_fe00;
            let shared = (eb & !offset) | (ea & offset);
            f.write_all_at(&shared.to_be_bytes(), l2_entry_at(&parent, b)).unwrap();
            drop(f);
            qemu_io(&child, &format!("write -q -P 238 {} 4096", a * CS));
            assert_refused(d.path(), &parent, &child, &format!("{what}, shared cluster"), ErrorKind::Corrupt, &parent);
        }
    }
}

#[test]
fn a_child_whose_compressed_data_is_garbled_leaves_its_parent_as_it_was() {
    for seed in 0..3u64 {
        let mut rng = Rng::new(0x9a7b + seed);
        let d = tempfile::tempdir().unwrap();
        let (parent, child, _) = pair(d.path(), &mut rng, "", "");
        let guest = 8 + rng.below(SIZE / CS - 8);
        qemu_io(&child, &format!("write -q -c -P 85 {} {CS}", guest * CS));
        // The compressed descriptor: offset in the low 54 bits (64 KiB
        // clusters); the data there overwritten with a seeded pattern.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&child).unwrap();
        let entry = be64(&f, l2_entry_at(&child, guest));
        assert_ne!(entry & (1 << 62), 0, "guest cluster {guest} is not compressed");
        let at = entry & ((1 << 54) - 1);
        f.write_all_at(&rng.bytes(24), at).unwrap();
        drop(f);
        let what = format!("seed {seed}, guest cluster {guest} garbled");
        assert_refused(d.path(), &parent, &child, &what, ErrorKind::Corrupt, &child);
    }
}

/// A child whose tables are damaged the way QEMU's iotests damage them (a
/// data entry pointing at the child's own L1 or L2 table, two entries
/// sharing one cluster) is refused, naming it, with every file as it was:
/// the native merge checked the parent only, copied the table's bytes into
/// the parent as guest data, and emptied the child, so the evidence was
/// gone (`qemu-img commit` is refused the same pair by `qemu-img check`).
#[test]
fn a_child_whose_tables_are_damaged_leaves_its_parent_as_it_was() {
    for seed in 0..6u64 {
        let mut rng = Rng::new(0x7ab1e + seed);
        let d = tempfile::tempdir().unwrap();
        let (parent, child, _) = pair(d.path(), &mut rng, "", "");
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&child).unwrap();
        let l1 = be64(&f, 40);
        let l2 = be64(&f, l1) & 0x00ff_ffff_ffff_fe00;
        // The child's data entries: (file offset of the entry, host offset).
        let data: Vec<(u64, u64)> = (0..SIZE / CS)
            .map(|g| l2_entry_at(&child, g))
            .map(|at| (at, be64(&f, at)))
            .filter(|(_, e)| e & (1 << 62) == 0 && e & 0x00ff_ffff_ffff_fe00 != 0)
            .map(|(at, e)| (at, e & 0x00ff_ffff_ffff_fe00))
            .collect();
        assert!(data.len() >= 2, "seed {seed}: the child holds {} data clusters", data.len());
        let (at, _) = data[rng.below(data.len() as u64) as usize];
        let (what, to) = match seed % 3 {
            0 => ("a data entry pointing at the child's L1 table", l1),
            1 => ("a data entry pointing at the child's L2 table", l2),
            _ => ("two data entries sharing a cluster", data.iter().find(|(a, _)| *a != at).unwrap().1),
        };
        f.write_all_at(&((1u64 << 63) | to).to_be_bytes(), at).unwrap();
        drop(f);
        let out = Command::new("qemu-img").args(["check", "-q"]).arg(&child).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "seed {seed}: qemu-img check finds {what} a corruption");
        let what = format!("seed {seed}: {what}");
        assert_refused(d.path(), &parent, &child, &what, ErrorKind::Corrupt, &child);
    }
}

#[test]
fn a_dirty_child_is_not_repaired_for_a_merge_its_parent_refuses() {
    let mut rng = Rng::new(0xd1e7);
    let d = tempfile::tempdir().unwrap();
    let (parent, child, _) = pair(d.path(), &mut rng, "", "lazy_refcounts=on");
    let set_dirty = |file: &Path| {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
        let features = be64(&f, 72) | 1;
        f.write_all_at(&features.to_be_bytes(), 72).unwrap();
    };
    set_dirty(&child);
    zero_first_data_refcount(&parent);
    assert_refused(d.path(), &parent, &child, "dirty child, parent refcount 0", ErrorKind::Corrupt, &parent);
    // Undamaged, the dirty child is repaired and merged.
    let d = tempfile::tempdir().unwrap();
    let (parent, child, _) = pair(d.path(), &mut rng, "", "lazy_refcounts=on");
    set_dirty(&child);
    assert_merged(d.path(), &parent, &child, "dirty child");
}

/// A parent (version 3, 16-bit refcounts, 2 MiB clusters) whose compressed
/// cluster 65537 L2 entries share, with a stored refcount of 65535: the
/// 16-bit refcount overflows (`qemu-img check` reports it), so the native
/// merge refuses it, naming the host cluster, with every file as it was.
/// Before, the references were counted in a saturating 16-bit counter
/// (65535, the stored refcount: no error), and the merge dropped one
/// reference per replaced guest cluster, towards 0 while entries still
/// pointed at the data.
#[test]
fn a_parent_whose_compressed_cluster_overflows_its_refcount_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (parent, child) = (d.path().join("parent.qcow2"), d.path().join("child.qcow2"));
    let size = (128u64 << 30).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", parent.to_str().unwrap(), &size]);
    qemu_io(&parent, "write -q -c -P 0x11 0 2M");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&parent).unwrap();
    let mut be32 = [0u8; 4];
    f.read_exact_at(&mut be32, 20).unwrap();
    let cluster_bits = u64::from(u32::from_be_bytes(be32));
    f.read_exact_at(&mut be32, 96).unwrap();
    assert_eq!((cluster_bits, u32::from_be_bytes(be32)), (21, 4), "2 MiB clusters, 16-bit refcounts");
    let (l1, rt) = (be64(&f, 40), be64(&f, 48));
    let l2 = be64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&f, l2);
    assert_ne!(entry & (1 << 62), 0, "guest cluster 0 is not compressed");
    // Entries 1..=65536 (all in the one L2 table) copy entry 0's descriptor.
    let copies: Vec<u8> = std::iter::repeat_n(entry.to_be_bytes(), 65536).flatten().collect();
    f.write_all_at(&copies, l2 + 8).unwrap();
    // The compressed data's host cluster: refcount 65535, the most 16 bits hold.
    let x = 62 - (cluster_bits - 8);
    let host = (entry & ((1 << x) - 1)) >> cluster_bits;
    let block = be64(&f, rt) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&65535u16.to_be_bytes(), block + 2 * host).unwrap();
    drop(f);
    let out = Command::new("qemu-img").arg("check").arg(&parent).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "qemu-img check finds a corruption: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERROR: overflow cluster"), "{out:?}");

    let base = parent.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-F",
        "qcow2",
        "-b",
        base,
        child.to_str().unwrap(),
    ]);
    qemu_io(&child, "write -q -P 0xa0 2M 8M");
    let what = "a compressed cluster referenced 65537 times";
    assert_refused(d.path(), &parent, &child, what, ErrorKind::Corrupt, &parent);
    let e = merge(&parent, &child).unwrap_err();
    let expected = format!(
        "qcow2 image {}: the L2 entry of guest cluster 65535: compressed data in host cluster {host}, which more \
         than 65535 L2 entries reference: its 16-bit refcount overflows (refcount overflow); it is not written into",
        parent.display()
    );
    assert!(e.message.contains(&expected), "{what}: {e}");
}
