//! The catalog against the real qemu-img: chains, restores byte-identical,
//! deletion, compression, moved stores and bad input.

mod common;
#[path = "common/gen.rs"]
mod gen;

use std::sync::Arc;

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::{BackupKind, CompressOptions};
use knib_core::qemu_img::{CompressionLibrary, ImageFormat, QemuImg};
use knib_core::{Control, ErrorKind};

fn opts(chain_size: i64) -> BackupOptions {
    BackupOptions { chain_size, ..Default::default() }
}

fn restore_and_compare(store: &Store, id: &str, refs: &std::collections::BTreeMap<String, std::path::PathBuf>) {
    let out = tempfile::tempdir().unwrap();
    for (i, (vol, reference)) in refs.iter().enumerate() {
        let fmt = if i % 2 == 0 { ImageFormat::Qcow2 } else { ImageFormat::Raw };
        let to = out.path().join(format!("{vol}.{}", fmt.as_str()));
        store.restore(id, vol, &to, fmt, &Control::new()).unwrap();
        assert_identical(&to, reference);
    }
}

#[test]
fn full_then_two_incrementals_each_restore_identical() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let rounds: [&[(&str, &str)]; 3] = [
        &[("root", "write -P 0x11 0 8M"), ("data", "write -P 0x21 1M 3M")],
        &[("root", "write -P 0x12 4M 1M"), ("data", "write -z 1M 64k"), ("data", "write -P 0x22 30M 2M")],
        &[("root", "write -P 0x13 63M 1M"), ("root", "discard 0 64k"), ("data", "write -P 0x23 0 512")],
    ];
    let mut taken = Vec::new();
    for (i, round) in rounds.iter().enumerate() {
        for (disk, cmd) in round.iter() {
            qemu_io(vm.path(disk), cmd);
        }
        let refs = vm.snapshot_all(&format!("b{i}"));
        let m = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        assert_eq!(m.kind, if i == 0 { BackupKind::Full } else { BackupKind::Incremental });
        assert_eq!(m.parent, taken.last().map(|(id, _): &(String, _)| id.clone()));
        assert_eq!(m.volumes.len(), 2);
        for d in &vm.disks {
            // The path given stays the active file; primary is base + one delta.
            assert!(d.path.exists());
            assert_eq!(chain_len(&d.path), 2, "{}", d.path.display());
            assert_identical(&d.path, &refs[&d.name]);
            assert_check_clean(&store.volume_file(&m, &d.name).unwrap());
        }
        taken.push((m.id.clone(), refs));
    }
    // Incremental backups hold only the delta: much smaller than the full one.
    let list = store.list(Some("vm1")).unwrap();
    assert_eq!(list.len(), 3);
    assert!(list[1].volumes[0].size < list[0].volumes[0].size / 2);
    for (id, refs) in &taken {
        restore_and_compare(&store, id, refs);
    }
}

#[test]
fn chain_size_three_then_full_and_isolated_keeps_the_chain() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let mut all = Vec::new();
    for i in 0..4u8 {
        qemu_io(vm.path("root"), &format!("write -P {} {}M 1M", 0x30 + i, i));
        let refs = vm.snapshot_all(&format!("c{i}"));
        let m = store.backup("vm1", &vm.disks, &opts(3), &Control::new()).unwrap();
        all.push((m.clone(), refs));
    }
    let kinds: Vec<_> = all.iter().map(|(m, _)| (m.kind, m.position, m.end_of_chain)).collect();
    assert_eq!(
        kinds,
        vec![
            (BackupKind::Full, 1, false),
            (BackupKind::Incremental, 2, false),
            (BackupKind::Incremental, 3, true),
            (BackupKind::Full, 1, false),
        ]
    );
    assert_eq!(all[3].0.parent, None);
    // Isolated: full, no parent, primary untouched, chain continues after it.
    qemu_io(vm.path("data"), "write -P 0x44 2M 1M");
    let iso_refs = vm.snapshot_all("iso");
    let chain_before = chain_len(vm.path("root"));
    let iso = store
        .backup(
            "vm1",
            &vm.disks,
            &BackupOptions { isolated: true, chain_size: 3, ..Default::default() },
            &Control::new(),
        )
        .unwrap();
    assert_eq!((iso.kind, iso.parent.clone(), iso.end_of_chain), (BackupKind::Isolated, None, false));
    assert_eq!(chain_len(vm.path("root")), chain_before);
    qemu_io(vm.path("data"), "write -P 0x45 3M 1M");
    let next_refs = vm.snapshot_all("next");
    let next = store.backup("vm1", &vm.disks, &opts(3), &Control::new()).unwrap();
    assert_eq!(next.kind, BackupKind::Incremental);
    assert_eq!(next.parent.as_deref(), Some(all[3].0.id.as_str()));
    assert_eq!(next.position, 2);
    restore_and_compare(&store, &iso.id, &iso_refs);
    restore_and_compare(&store, &next.id, &next_refs);
    for (m, refs) in &all {
        restore_and_compare(&store, &m.id, refs);
    }
}

#[test]
fn chain_size_one_is_always_full_and_unlimited_never_ends() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    for _ in 0..2 {
        let m = store.backup("one", &vm.disks, &opts(1), &Control::new()).unwrap();
        assert_eq!((m.kind, m.end_of_chain), (BackupKind::Full, true));
        assert_eq!(chain_len(vm.path("root")), 1, "end of chain collapses primary to one file");
    }
    for i in 0..3 {
        let m = store.backup("one", &vm.disks, &opts(0), &Control::new()).unwrap();
        assert!(!m.end_of_chain);
        assert_eq!(m.kind, if i == 0 { BackupKind::Full } else { BackupKind::Incremental });
    }
}

/// An unlimited chain (or one longer than 64) ends at its 64th backup,
/// the most a qcow2 chain knib reads may have; before, backups 65 and on
/// were taken and verified, and could not be restored.
#[test]
fn an_unlimited_chain_ends_at_64_backups_and_every_one_restores() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let mut kept = Vec::new();
    for (i, size) in (0..66).map(|i| (i, if i % 2 == 0 { 0 } else { 100 })) {
        qemu_io(vm.path("root"), &format!("write -P {} {}k 4k", 0x10 + (i % 200), i * 64));
        let m = store.backup("long", &vm.disks, &opts(size), &Control::new()).unwrap();
        let position = i as u32 % 64 + 1;
        assert_eq!((m.position, m.end_of_chain), (position, position == 64), "backup {}", i + 1);
        // The deepest backup (64 files) and the one after the new full.
        if i == 63 || i == 65 {
            kept.push((m.id, vm.snapshot_all(&format!("b{i}"))));
        }
    }
    for (id, refs) in kept {
        restore_and_compare(&store, &id, &refs);
    }
}

#[test]
fn deleting_the_middle_backup_keeps_every_other_restorable() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let mut taken = Vec::new();
    for i in 0..3u8 {
        qemu_io(vm.path("root"), &format!("write -P {} {}M 2M", 0x50 + i, 2 * i));
        qemu_io(vm.path("data"), &format!("write -P {} {}M 1M", 0x60 + i, 3 * i));
        let refs = vm.snapshot_all(&format!("d{i}"));
        taken.push((store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap(), refs));
    }
    let mid = taken[1].0.id.clone();
    let out = store.delete(&mid).unwrap();
    assert_eq!(out.marked_removed, vec![mid.clone()]);
    assert!(out.expunged.is_empty());
    // Why: the later backup that reads it, by id.
    let later = &taken[2].0.id;
    let why = format!("backup {later} depends on it: its files stay until it is deleted");
    assert_eq!(out.kept_because.as_deref(), Some(why.as_str()), "{out:?}");
    let ids: Vec<_> = store.list(None).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![taken[0].0.id.clone(), taken[2].0.id.clone()]);
    assert_eq!(store.show(&mid).unwrap_err().kind, ErrorKind::NotFound);
    for (m, refs) in [&taken[0], &taken[2]] {
        restore_and_compare(&store, &m.id, refs);
    }
    for f in walk_qcow2(sdir.path()) {
        assert_check_clean(&f);
    }
    // Deleting the last one expunges it and its removed parent.
    let out = store.delete(&taken[2].0.id).unwrap();
    assert_eq!(out.expunged, vec![taken[2].0.id.clone(), mid.clone()]);
    assert!(!sdir.path().join("vms/vm1").join(&mid).exists());
    restore_and_compare(&store, &taken[0].0.id, &taken[0].1);
    // The head went: the next backup is full.
    let m = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
}

fn walk_qcow2(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    tree(dir).keys().filter(|p| p.extension().is_some_and(|x| x == "qcow2")).map(|p| dir.join(p)).collect()
}

#[test]
fn compressed_backup_restores_identical_is_smaller_and_still_a_backing_file() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x61 0 16M");
    qemu_io(vm.path("data"), "write -P 0x62 0 8M");
    let r1 = vm.snapshot_all("z1");
    let b1 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x63 8M 4M");
    let r2 = vm.snapshot_all("z2");
    let b2 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    let c1 = store.compress(&b1.id, &CompressOptions::default(), &Control::new()).unwrap();
    let info = c1.compression.clone().unwrap();
    assert_eq!(info.library, CompressionLibrary::Zstd);
    assert!(info.size * 4 < info.original_size, "{info:?}");
    let f = store.volume_file(&c1, "root").unwrap();
    let qi = QemuImg::new().info(&f, &Control::new()).unwrap();
    assert_eq!(qi.format_specific.unwrap().data.compression_type.as_deref(), Some("zstd"));
    assert!(!f.with_extension("qcow2.comp").exists());
    assert_check_clean(&f);
    restore_and_compare(&store, &b1.id, &r1);
    restore_and_compare(&store, &b2.id, &r2);
    // The child compressed too, with its parent as backing.
    let c2 = store.compress(&b2.id, &CompressOptions { coroutines: 4, ..Default::default() }, &Control::new()).unwrap();
    assert_eq!(c2.volumes[0].backing.as_deref(), Some(format!("../{}/root.qcow2", b1.id).as_str()));
    restore_and_compare(&store, &b2.id, &r2);
    let reports = store.verify(None, &Control::new()).unwrap();
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
}

#[test]
fn qcow2_v2_disk_is_compressed_with_zlib() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.qcow2");
    make_disk(&p, 16 << 20, &["-o", "compat=0.10"]);
    qemu_io(&p, "write -P 0x71 0 4M");
    let disks = vec![knib_core::catalog::DiskSpec { name: "old".into(), path: p.clone() }];
    let r = dir.path().join("ref.qcow2");
    snapshot(&p, &r);
    let store = Store::create(dir.path().join("store")).unwrap();
    let b = store.backup("v2", &disks, &opts(8), &Control::new()).unwrap();
    // Copied by qemu-img (to stay version 2), its hash recorded all the same.
    let f = store.volume_file(&b, "old").unwrap();
    let h = knib_core::engine::hash_files(std::slice::from_ref(&f), &Control::new()).unwrap();
    assert_eq!(b.volumes[0].hash.as_deref(), Some(h.as_str()));
    let c = store.compress(&b.id, &CompressOptions::default(), &Control::new()).unwrap();
    assert_eq!(c.compression.unwrap().library, CompressionLibrary::Zlib);
    let f = store.volume_file(&b, "old").unwrap();
    assert!(QemuImg::new().info(&f, &Control::new()).unwrap().is_qcow2_v2());
    let to = dir.path().join("restored.raw");
    store.restore(&b.id, "old", &to, ImageFormat::Raw, &Control::new()).unwrap();
    assert_identical(&to, &r);
}

/// A compression whose next manifest cannot be written (here its
/// temporary's name is taken by a directory, as a full file system fails
/// the write) fails naming it and leaves the backup as it was, with no
/// `.comp` file beside it (before, they stayed until a job runner swept
/// them). Once the name is free, the compression goes through.
#[test]
fn a_compression_whose_next_manifest_cannot_be_written_leaves_no_compressed_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.qcow2");
    make_disk(&p, 16 << 20, &[]);
    qemu_io(&p, "write -P 0x72 0 4M");
    let r = dir.path().join("ref.qcow2");
    snapshot(&p, &r);
    let disks = vec![knib_core::catalog::DiskSpec { name: "d".into(), path: p.clone() }];
    let store = Store::create(dir.path().join("store")).unwrap();
    let b = store.backup("nm", &disks, &opts(8), &Control::new()).unwrap();
    let f = store.volume_file(&b, "d").unwrap();
    let bdir = f.parent().unwrap().to_path_buf();
    let before = std::fs::read(&f).unwrap();
    let blocker = bdir.join(".manifest.next.json.part");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();
    let e = store.compress(&b.id, &CompressOptions::default(), &Control::new()).unwrap_err();
    assert!(e.message.contains(".manifest.next.json.part"), "{e}");
    let mut names: Vec<String> =
        std::fs::read_dir(&bdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert!(!names.iter().any(|n| n.contains(".comp")), "left beside the backup: {names:?}");
    assert!(std::fs::read(&f).unwrap() == before, "the backup file changed");
    assert_eq!(store.show(&b.id).unwrap().compression, None);
    std::fs::remove_dir_all(&blocker).unwrap();
    let c = store.compress(&b.id, &CompressOptions::default(), &Control::new()).unwrap();
    assert!(c.compression.is_some());
    let to = dir.path().join("restored.raw");
    store.restore(&b.id, "d", &to, ImageFormat::Raw, &Control::new()).unwrap();
    assert_identical(&to, &r);
}

/// A disk with extended L2 entries (subclusters), a disk over a base that
/// has them (a template made with `extended_l2=on`) and one whose backing
/// file is named as a `json:` pseudo-protocol: the native reader does not
/// read them, so their copies go through qemu-img, as QEMU reads them,
/// instead of failing the backup. Seeded guest-like
/// writes (partial clusters, zero writes with and without unmap,
/// discards); every backup restores to what the disk held, the store's
/// files check clean and verify.
#[test]
fn disks_with_extended_l2_entries_are_backed_up_through_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("ext.qcow2");
    let template = dir.path().join("template.qcow2");
    let over = dir.path().join("over.qcow2");
    let size = 32u64 << 20;
    let cs = 128u64 << 10;
    let extended = ["-o", "extended_l2=on,cluster_size=128k"];
    make_disk(&ext, size, &extended);
    make_disk(&template, size, &extended);
    qemu_io(&template, "write -P 0x3c 0 5M");
    make_disk(&over, size, &["-b", "template.qcow2", "-F", "qcow2"]);
    // A backing file named as QEMU's json: pseudo-protocol, which libvirt
    // writes after some block jobs: the native reader does not follow it.
    let plain_template = dir.path().join("plain-template.qcow2");
    make_disk(&plain_template, size, &[]);
    qemu_io(&plain_template, "write -P 0x3d 1M 3M");
    let json = dir.path().join("json.qcow2");
    let named =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}"#, plain_template.display());
    make_disk(&json, size, &["-b", &named, "-F", "qcow2"]);
    let disks = vec![
        knib_core::catalog::DiskSpec { name: "ext".into(), path: ext.clone() },
        knib_core::catalog::DiskSpec { name: "over".into(), path: over.clone() },
        knib_core::catalog::DiskSpec { name: "json".into(), path: json.clone() },
    ];
    let mut rng = gen::Rng::new(0x5eb1);
    let srcs = gen::sources(dir.path(), &mut rng, 256 << 10);
    let store = Store::create(dir.path().join("store")).unwrap();
    let mut taken = Vec::new();
    for round in 0..3 {
        for d in &disks {
            for op in gen::random_ops(&mut rng, size, cs, 12, &srcs, false) {
                qemu_io(&d.path, &op);
            }
        }
        let refs: std::collections::BTreeMap<String, std::path::PathBuf> = disks
            .iter()
            .map(|d| {
                let r = dir.path().join(format!("ref{round}-{}.qcow2", d.name));
                snapshot(&d.path, &r);
                (d.name.clone(), r)
            })
            .collect();
        let m = store.backup("xl2", &disks, &opts(8), &Control::new()).unwrap();
        assert_eq!(m.kind, if round == 0 { BackupKind::Full } else { BackupKind::Incremental });
        for d in &disks {
            assert_identical(&d.path, &refs[&d.name]);
            let file = store.volume_file(&m, &d.name).unwrap();
            assert_check_clean(&file);
            // Its hash recorded at backup time, as a native copy's is.
            let v = m.volumes.iter().find(|v| v.name == d.name).unwrap();
            let h = knib_core::engine::hash_files(std::slice::from_ref(&file), &Control::new()).unwrap();
            assert_eq!(v.hash.as_deref(), Some(h.as_str()), "{}", d.name);
        }
        taken.push((m.id, refs));
    }
    for (id, refs) in &taken {
        restore_and_compare(&store, id, refs);
    }
    let reports = store.verify(None, &Control::new()).unwrap();
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
}

#[test]
fn a_moved_store_still_restores() {
    let vm = TestDisks::two();
    let top = tempfile::tempdir().unwrap();
    let store = Store::create(top.path().join("a")).unwrap();
    let mut taken = Vec::new();
    for i in 0..3u8 {
        qemu_io(vm.path("root"), &format!("write -P {} {}M 1M", 0x80 + i, i));
        let refs = vm.snapshot_all(&format!("m{i}"));
        taken.push((store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap(), refs));
    }
    store.compress(&taken[1].0.id, &CompressOptions::default(), &Control::new()).unwrap();
    std::fs::rename(top.path().join("a"), top.path().join("elsewhere")).unwrap();
    let moved = Store::open(top.path().join("elsewhere")).unwrap();
    for (m, refs) in &taken {
        restore_and_compare(&moved, &m.id, refs);
    }
}

fn setup_one() -> (TestDisks, tempfile::TempDir, Store, String) {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x91 0 1M");
    let id = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap().id;
    (vm, sdir, store, id)
}

#[test]
fn unknown_backup_id_is_not_found() {
    let (_vm, sdir, store, _id) = setup_one();
    let before = tree(sdir.path());
    let to = sdir.path().join("../x.qcow2");
    let e = store.restore("20200101-000000000-dead", "root", &to, ImageFormat::Qcow2, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("backup 20200101-000000000-dead does not exist"), "{e}");
    assert_eq!(store.delete("20200101-000000000-dead").unwrap_err().kind, ErrorKind::NotFound);
    assert!(!to.exists());
    assert_eq!(tree(sdir.path()), before);
}

#[test]
fn unknown_volume_is_not_found() {
    let (vm, sdir, store, id) = setup_one();
    let before = tree(sdir.path());
    let to = sdir.path().join("../y.qcow2");
    let e = store.restore(&id, "swap", &to, ImageFormat::Qcow2, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("has no volume \"swap\" (it has: root, data)"), "{e}");
    assert!(!to.exists());
    assert_eq!(tree(sdir.path()), before);
    // Of an incremental: the error names the backup asked for, not the
    // first of its chain.
    let inc = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    assert_eq!(inc.kind, BackupKind::Incremental);
    let e = store.restore(&inc.id, "swap", &to, ImageFormat::Qcow2, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&format!("backup {} has no volume \"swap\"", inc.id)), "{e}");
}

#[test]
fn a_disk_path_that_does_not_exist_is_refused_without_touching_the_store() {
    let (vm, sdir, store, _id) = setup_one();
    let before = tree(sdir.path());
    let mut disks = vm.disks.clone();
    disks[1].path = vm.dir.path().join("nope.qcow2");
    let e = store.backup("vm1", &disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("disk data:") && e.message.contains("nope.qcow2 does not exist"), "{e}");
    let e = store.backup("vm2", &disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(tree(sdir.path()), before);
    assert_eq!(chain_len(vm.path("root")), 2);
}

#[test]
fn a_disk_that_is_not_qcow2_is_refused_without_touching_the_store() {
    let (vm, sdir, store, _id) = setup_one();
    let before = tree(sdir.path());
    let mut disks = vm.disks.clone();
    let raw = vm.dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    disks[1].path = raw;
    let e = store.backup("vm1", &disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("raw.img is raw, not qcow2"), "{e}");
    // A brand-new VM with a bad disk creates nothing either.
    let e = store.backup("vm2", &disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert_eq!(tree(sdir.path()), before);
    assert_eq!(chain_len(vm.path("root")), 2);
}

#[test]
fn corrupted_manifest_is_reported_and_nothing_changes() {
    let (vm, sdir, store, id) = setup_one();
    let mpath = sdir.path().join("vms/vm1").join(&id).join("manifest.json");
    std::fs::write(&mpath, b"{\"schema\": 1, \"id\": ").unwrap();
    let before = tree(sdir.path());
    let e = store.show(&id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains(&format!("manifest {} is corrupted", mpath.display())), "{e}");
    // A manifest that does not parse is skipped by list (with a warning).
    assert!(store.list(None).unwrap().iter().all(|m| m.id != id));
    assert_eq!(tree(sdir.path()), before);
    // The disks' deltas follow a backup the store cannot read: the next
    // backup is full and says why; the damaged manifest is left as it is.
    let m = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    let why = m.full_reason.clone().unwrap_or_default();
    assert!(why.contains(&id) && why.contains("no readable backup"), "{m:?}");
    assert_eq!(std::fs::read(&mpath).unwrap(), b"{\"schema\": 1, \"id\": ");
}

#[test]
fn a_backup_file_removed_behind_knibs_back_is_named() {
    let (vm, sdir, store, id) = setup_one();
    let f = sdir.path().join("vms/vm1").join(&id).join("data.qcow2");
    std::fs::remove_file(&f).unwrap();
    let before = tree(sdir.path());
    let to = vm.dir.path().join("r.qcow2");
    let e = store.restore(&id, "data", &to, ImageFormat::Qcow2, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&format!("{} of volume data is missing", f.display())), "{e}");
    assert!(!to.exists());
    let reports = store.verify(Some(&id), &Control::new()).unwrap();
    assert!(!reports[0].ok);
    assert!(reports[0].problems.iter().any(|p| p.contains("is missing")), "{reports:?}");
    let e = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("--full"), "{e}");
    assert_eq!(tree(sdir.path()), before);
    // The way out the error names works.
    let m =
        store.backup("vm1", &vm.disks, &BackupOptions { full: true, ..Default::default() }, &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
}

#[test]
fn names_that_escape_the_store_are_refused() {
    let (vm, sdir, store, id) = setup_one();
    let before = tree(sdir.path());
    let e = store.backup("../evil", &vm.disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("VM name \"../evil\""), "{e}");
    let mut disks = vm.disks.clone();
    disks[0].name = "../../etc/passwd".into();
    let e = store.backup("vm1", &disks, &opts(8), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("volume name"), "{e}");
    let e = store.show("../vm1").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    let e = store.restore(&id, "../root", &vm.dir.path().join("x"), ImageFormat::Raw, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(tree(sdir.path()), before);
    assert!(!sdir.path().parent().unwrap().join("evil").exists());
}

#[test]
fn a_second_backup_of_the_same_vm_while_one_runs_is_busy() {
    let (vm, sdir, store, _id) = setup_one();
    qemu_io(vm.path("root"), "write -P 0x92 0 16M");
    // The first backup stops inside its copy until the test lets it go.
    let (ctl, reached_rx, go_tx) = common::disk::paused_at_first_progress();
    let store2 = store.clone();
    let disks = vm.disks.clone();
    let first = std::thread::spawn(move || store2.backup("vm1", &disks, &opts(8), &ctl));
    reached_rx.recv().unwrap();
    let t = std::time::Instant::now();
    let e = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "busy must fail at once");
    assert_eq!(e.kind, ErrorKind::Busy);
    assert!(e.message.contains("VM vm1 is busy: backup of vm1"), "{e}");
    let e = store.delete(&store.list(None).unwrap()[0].id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    go_tx.send(()).unwrap();
    let m = first.join().unwrap().unwrap();
    assert_eq!(m.kind, BackupKind::Incremental);
    assert_eq!(store.list(Some("vm1")).unwrap().len(), 2);
    let _ = sdir;
}

/// One disk backed up into two stores at once (each its own VM lock), and
/// a VM started on the disk meanwhile: the disk's files are one backup's
/// at a time, and a writer cannot open the disk while it is copied and
/// made a base (what it wrote would be in no backup). The first backup
/// ends whole, the disk's data is all there, and the second backup, tried
/// again, follows it.
#[test]
fn one_disk_is_backed_up_by_one_backup_at_a_time_and_not_written_meanwhile() {
    for (first_full, pause_at) in [(true, None), (false, None), (true, Some("creation of "))] {
        let vm = TestDisks::two();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (s1, s2) = (Store::create(d1.path()).unwrap(), Store::create(d2.path()).unwrap());
        qemu_io(vm.path("root"), "write -P 0x61 0 16M");
        if !first_full {
            // The disk on its knib base already (its delta merged by the next).
            s1.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
            qemu_io(vm.path("root"), "write -P 0x62 8M 16M");
        }
        let reference = vm.dir.path().join("reference.raw");
        snapshot(vm.path("root"), &reference);
        // The first backup stops inside its copy (or right before the
        // disk's base is made) until the test lets it go.
        let (first, go): (std::thread::JoinHandle<_>, Box<dyn FnOnce()>) = match pause_at {
            None => {
                let (ctl, reached_rx, go_tx) = common::disk::paused_at_first_progress();
                let (s, disks) = (s1.clone(), vm.disks.clone());
                let h = std::thread::spawn(move || s.backup("vm1", &disks, &opts(8), &ctl));
                reached_rx.recv().unwrap();
                (h, Box::new(move || go_tx.send(()).unwrap()))
            }
            Some(at) => {
                let at = format!("{at}{}", vm.path("root").display());
                knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(3));
                let (s, disks) = (s1.clone(), vm.disks.clone());
                let h = std::thread::spawn(move || s.backup("vm1", &disks, &opts(8), &Control::new()));
                assert!(knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(60)));
                (h, Box::new(|| {}))
            }
        };
        let e = s2.backup("vm2", &vm.disks, &opts(8), &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{e}");
        assert!(e.message.contains("root.qcow2") || e.message.contains("data.qcow2"), "{e}");
        assert!(s2.list(None).unwrap().is_empty());
        if first_full {
            // A writer (a VM starting on the disk) cannot open it.
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x63 0 64k"])
                .arg(vm.path("root"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Failed to get \"write\" lock"), "a writer opened the disk: {text}");
        }
        go();
        let m = first.join().unwrap().unwrap();
        assert_eq!(m.kind, if first_full { BackupKind::Full } else { BackupKind::Incremental });
        assert_identical(vm.path("root"), &reference);
        assert_check_clean(vm.path("root"));
        let mut refs = std::collections::BTreeMap::new();
        refs.insert("root".to_string(), reference.clone());
        restore_and_compare(&s1, &m.id, &refs);
        // The second store's backup, once the first is done.
        let m2 = s2.backup("vm2", &vm.disks, &opts(8), &Control::new()).unwrap();
        restore_and_compare(&s2, &m2.id, &refs);
        assert_identical(vm.path("root"), &reference);
    }
}

#[test]
fn a_backup_cancelled_during_its_copy_leaves_no_partial_backup() {
    let (vm, sdir, store, _id) = setup_one();
    qemu_io(vm.path("root"), "write -P 0x93 0 32M");
    let before = tree(sdir.path());
    let refs = vm.snapshot_all("t");
    // Cancelled from the progress of the copy: the copy is killed (or, if it
    // already ended, the backup stops before it is published).
    let cancel = knib_core::CancelToken::new();
    let c2 = cancel.clone();
    let ctl = Control::new().with_cancel(cancel).with_progress(Arc::new(move |_| c2.cancel()));
    let e = store.backup("vm1", &vm.disks, &opts(8), &ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    assert_eq!(e.vm_consistent, Some(true));
    assert_eq!(tree(sdir.path()), before);
    for d in &vm.disks {
        assert_identical(&d.path, &refs[&d.name]);
        // The base may hold part of the delta's writes (merged during the
        // copy, stopped by the cancel): never a damaged one.
        assert_check_clean(&knib_core::engine::take::base_path(&d.path));
    }
    // The next backup is a normal incremental one.
    let m = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Incremental);
    let out = tempfile::tempdir().unwrap();
    store.restore(&m.id, "root", &out.path().join("r.qcow2"), ImageFormat::Qcow2, &Control::new()).unwrap();
    assert_identical(&out.path().join("r.qcow2"), &refs["root"]);
}

#[test]
fn a_backup_compressed_as_it_is_copied_is_recorded_compressed_and_restores_identical() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let zstd = BackupOptions { compress: Some(CompressionLibrary::Zstd), ..Default::default() };
    qemu_io(vm.path("root"), "write -P 0x61 0 16M");
    qemu_io(vm.path("data"), "write -P 0x62 0 8M");
    let r1 = vm.snapshot_all("o1");
    let b1 = store.backup("vm1", &vm.disks, &zstd, &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x63 8M 4M");
    qemu_io(vm.path("data"), "write -z 0 1M");
    let r2 = vm.snapshot_all("o2");
    let b2 = store.backup("vm1", &vm.disks, &zstd, &Control::new()).unwrap();
    assert_eq!(b2.kind, BackupKind::Incremental);
    for b in [&b1, &b2] {
        let info = b.compression.clone().expect("recorded as compressed");
        assert_eq!(info.library, CompressionLibrary::Zstd);
        assert!(info.size * 4 < info.original_size, "{info:?}");
        for v in &b.volumes {
            let f = store.volume_file(b, &v.name).unwrap();
            let qi = QemuImg::new().info(&f, &Control::new()).unwrap();
            assert_eq!(qi.format_specific.unwrap().data.compression_type.as_deref(), Some("zstd"));
            assert_check_clean(&f);
            assert_eq!(v.hash.as_deref(), Some(knib_core::engine::hash_files(&[f], &Control::new()).unwrap().as_str()));
        }
    }
    assert_eq!(b2.volumes[0].backing.as_deref(), Some(format!("../{}/root.qcow2", b1.id).as_str()));
    restore_and_compare(&store, &b1.id, &r1);
    restore_and_compare(&store, &b2.id, &r2);
    // Nothing left for a compression job, and verify agrees with the hashes.
    let e = store.queue_compression(&b2.id).unwrap_err();
    assert!(e.message.contains("already compressed"), "{e}");
    let reports = store.verify(None, &Control::new()).unwrap();
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
}

#[test]
fn what_only_a_domains_backup_does_is_refused_for_a_vm_with_disks() {
    let vm = TestDisks::two();
    let chain_before = chain_len(vm.path("root"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let disks = serde_json::to_value(&vm.disks).unwrap();
    for (field, value) in [("quiesce", serde_json::json!(true)), ("method", serde_json::json!("bitmap"))] {
        let mut req = serde_json::json!({"store": root, "vm": "vm1", "disks": disks});
        req[field] = value.clone();
        for vault in [None, Some("s3://bucket/prefix")] {
            if let Some(v) = vault {
                req["vault"] = serde_json::json!(v);
            }
            let e = knib_core::api::call("backup", &req.to_string(), &Control::new()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{req}: {e}");
            assert!(e.message.contains(&format!("field `{field}` goes with `domain`, not `vm`")), "{req}: {e}");
            assert!(!root.exists(), "{req}: the store was made");
        }
    }
    assert_eq!(chain_len(vm.path("root")), chain_before);
    // Without them the same request backs the VM up.
    let req = serde_json::json!({"store": root, "vm": "vm1", "disks": disks, "quiesce": false});
    knib_core::api::call("backup", &req.to_string(), &Control::new()).unwrap();
}

/// A quick-restored disk reads the backup's files as its backing chain:
/// deleting the backup it reads is refused (busy, naming the overlay)
/// rather than break the disk; a removed ancestor it reads is kept when
/// its last child goes; once the overlay is gone, the deletes go through.
#[test]
fn a_backup_a_quick_restore_reads_is_not_removed_from_disk() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path().join("store")).unwrap();
    qemu_io(vm.path("root"), "write -P 0x31 0 1M");
    let b1 = store.backup("vmq", &vm.disks, &opts(8), &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x32 1M 1M");
    let b2 = store.backup("vmq", &vm.disks, &opts(8), &Control::new()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o2 = out.path().join("root-b2.qcow2");
    let o1 = out.path().join("root-b1.qcow2");
    store.quick_restore_overlay(&b2.id, "root", &o2, &Control::new()).unwrap();
    store.quick_restore_overlay(&b1.id, "root", &o1, &Control::new()).unwrap();
    // b2 has no children: removing it would break o2.
    let e = store.delete(&b2.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&o2.display().to_string()), "{e}");
    assert_check_clean(&o2);
    // b1 has a child: marked removed, its files stay.
    let d = store.delete(&b1.id).unwrap();
    assert_eq!(d.marked_removed, vec![b1.id.clone()]);
    // o2 goes (as a consolidation would leave it: reading b2 no more):
    // b2 is deleted, and b1, removed, is kept for o1.
    std::fs::remove_file(&o2).unwrap();
    let d = store.delete(&b2.id).unwrap();
    assert_eq!(d.expunged, vec![b2.id.clone()]);
    assert_check_clean(&o1);
    let st = std::process::Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(&o1)
        .arg(store.volume_file(&b1, "root").unwrap())
        .status()
        .unwrap();
    assert!(st.success(), "o1 reads what b1 holds");
    // A record filed under a backup but naming another is refused,
    // naming it; without it the delete goes through.
    let pins = sdir.path().join("store/pins");
    let rec = std::fs::read_dir(&pins).unwrap().next().unwrap().unwrap().path();
    qemu_io(vm.path("root"), "write -P 0x33 2M 1M");
    let b3 = store.backup("vmq", &vm.disks, &opts(8), &Control::new()).unwrap();
    let forged = pins.join(format!("{}.forged.json", b3.id));
    std::fs::copy(&rec, &forged).unwrap();
    let e = store.delete(&b3.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&forged.display().to_string()), "{e}");
    std::fs::remove_file(&forged).unwrap();
    // A record naming a FIFO is kept as live, at once (opening it waited
    // for a writer, the VM locked); one naming a relative path is refused.
    let fifo = out.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let planted = pins.join(format!("{}.planted.json", b3.id));
    let record = |overlay: &std::path::Path| {
        let r = serde_json::json!({"vm": "vmq", "backup": b3.id, "volume": "root", "overlay": overlay});
        std::fs::write(&planted, r.to_string()).unwrap();
    };
    let delete_within_10s = |id: String| {
        let (tx, rx) = std::sync::mpsc::channel();
        let root = store.root().to_path_buf();
        std::thread::spawn(move || tx.send(Store::open(&root).unwrap().delete(&id).map(drop)));
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the delete hung")
    };
    record(&fifo);
    let e = delete_within_10s(b3.id.clone()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&fifo.display().to_string()), "{e}");
    record(std::path::Path::new("root-b3.qcow2"));
    let e = delete_within_10s(b3.id.clone()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("names overlay root-b3.qcow2, not an absolute path"), "{e}");
    std::fs::remove_file(&planted).unwrap();
    store.delete(&b3.id).unwrap();

    // A backup that only a removed later backup reads, which a quick
    // restore reads: marked removed, saying so (before, the delete did
    // nothing: the backup stayed listed, and the answer was empty).
    let mut c = Vec::new();
    for i in 0..3u8 {
        qemu_io(vm.path("root"), &format!("write -P 0x{:x} 3M 64k", 0x40 + i));
        c.push(store.backup("vmq", &vm.disks, &opts(8), &Control::new()).unwrap());
    }
    assert_eq!((c[1].parent.as_ref(), c[2].parent.as_ref()), (Some(&c[0].id), Some(&c[1].id)));
    let oc = out.path().join("root-c1.qcow2");
    store.quick_restore_overlay(&c[1].id, "root", &oc, &Control::new()).unwrap();
    assert_eq!(store.delete(&c[1].id).unwrap().marked_removed, vec![c[1].id.clone()]);
    assert_eq!(store.delete(&c[2].id).unwrap().expunged, vec![c[2].id.clone()]);
    let d = store.delete(&c[0].id).unwrap();
    assert_eq!((d.marked_removed.clone(), d.expunged.clone()), (vec![c[0].id.clone()], vec![]), "{d:?}");
    let why = d.kept_because.clone().unwrap_or_default();
    assert!(
        why.starts_with(&format!("backup {}, deleted, depends on it and is read by a quick restore", c[1].id)),
        "{d:?}"
    );
    assert_eq!(store.show(&c[0].id).unwrap_err().kind, ErrorKind::NotFound, "no longer listed");
    assert_check_clean(&oc);
    // Once the overlay is gone, the next delete of the VM takes both.
    std::fs::remove_file(&oc).unwrap();
    qemu_io(vm.path("root"), "write -P 0x50 3M 64k");
    let last = store.backup("vmq", &vm.disks, &opts(8), &Control::new()).unwrap();
    let d = store.delete(&last.id).unwrap();
    for gone in [&c[1].id, &c[0].id] {
        assert!(d.expunged.contains(gone), "{d:?}");
    }
}

/// A bind mount, unmounted on drop.
struct BindMount(std::path::PathBuf);

impl BindMount {
    /// `None` where nothing can be mounted (no privilege).
    fn new(from: &std::path::Path, at: &std::path::Path) -> Option<BindMount> {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount").arg("--bind").arg(from).arg(at).status().ok()?;
        st.success().then(|| BindMount(at.to_path_buf()))
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A quick restore made through another path to the store (a bind mount,
/// as another host or a container mounts it) keeps its backup: the
/// overlay's backing file was compared by path, so a delete through the
/// store's own path took the record for stale, removed it and deleted
/// the backup the disk reads. An overlay of another host (the record
/// names it) is never taken for stale: it cannot be looked at from here.
#[test]
fn a_quick_restore_made_through_another_path_or_on_another_host_keeps_its_backup() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let root = sdir.path().join("store");
    let store = Store::create(&root).unwrap();
    qemu_io(vm.path("root"), "write -P 0x41 0 1M");
    let b1 = store.backup("vmb", &vm.disks, &opts(8), &Control::new()).unwrap();
    let Some(mount) = BindMount::new(&root, &sdir.path().join("mounted")) else {
        eprintln!("skipped: no bind mount can be made here");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let overlay = out.path().join("root-b1.qcow2");
    Store::open(&mount.0).unwrap().quick_restore_overlay(&b1.id, "root", &overlay, &Control::new()).unwrap();
    let e = store.delete(&b1.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&overlay.display().to_string()), "{e}");
    assert_check_clean(&overlay);
    drop(mount);

    // The record says another host made it: its overlay gone from here
    // does not make it stale.
    let rec = std::fs::read_dir(root.join("pins")).unwrap().next().unwrap().unwrap().path();
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert!(r["host"].is_string(), "the record names its host: {r}");
    r["host"] = "another-host.example".into();
    std::fs::write(&rec, r.to_string()).unwrap();
    std::fs::remove_file(&overlay).unwrap();
    let e = store.delete(&b1.id).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(rec.exists(), "another host's record is kept");
    // Back to this host's name: the overlay is gone, the record stale.
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    r["host"] = here.trim().into();
    std::fs::write(&rec, r.to_string()).unwrap();
    store.delete(&b1.id).unwrap();
    assert!(!rec.exists());
}

/// A quick restore's overlay is made and recorded under the backup's VM
/// lock: while another operation holds the VM (a delete that would remove
/// the files the overlay reads), it is busy and makes nothing.
#[test]
fn a_quick_restore_overlay_waits_for_no_delete_of_its_backup() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path().join("store")).unwrap();
    qemu_io(vm.path("root"), "write -P 0x41 0 1M");
    let b = store.backup("vmo", &vm.disks, &opts(8), &Control::new()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let overlay = out.path().join("root.qcow2");
    let held = store.lock_vm("vmo", "delete of a backup").unwrap();
    let e = store.quick_restore_overlay(&b.id, "root", &overlay, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("delete of a backup"), "{e}");
    assert!(!overlay.exists());
    drop(held);
    store.quick_restore_overlay(&b.id, "root", &overlay, &Control::new()).unwrap();
    assert_eq!(store.delete(&b.id).unwrap_err().kind, ErrorKind::Busy);
}

/// Two test disks and a new store whose data path is `data_path`.
fn store_on(data_path: &str) -> (TestDisks, tempfile::TempDir, Store) {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let settings = format!("{{\"schema\": 1, \"knib.data.path\": \"{data_path}\"}}");
    std::fs::write(store.root().join("knib.json"), settings).unwrap();
    (vm, sdir, store)
}

/// A restore takes no lock, so a compression may replace the backup's files
/// and hashes between the restore's read of the manifest and its read of
/// the files: the restore must not call the backup corrupt (it ran again on
/// the manifest as it is then), and restores the same bytes, on both data
/// paths.
#[test]
fn a_restore_racing_a_compression_is_not_reported_corrupt() {
    for data_path in ["native", "qemu-img"] {
        let (vm, _sdir, store) = store_on(data_path);
        qemu_io(vm.path("root"), "write -P 0x5a 0 12M");
        qemu_io(vm.path("root"), "write -P 0x5b 20M 4M");
        let refs = vm.snapshot_all("r");
        let b = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        // The qemu-img path records no hash as it copies: verify does.
        assert!(store.verify(Some(&b.id), &Control::new()).unwrap()[0].ok);
        let before = store.show(&b.id).unwrap().volumes[0].hash.clone();
        assert!(before.is_some(), "{data_path}: no hash recorded");
        // The restore stops right after it read the manifest; the
        // compression runs in that time.
        let pause = std::time::Duration::from_secs(6);
        knib_core::crashpoint::pause_before(&format!("restore of backup {}: manifest read", b.id), pause);
        let out = tempfile::tempdir().unwrap();
        let to = out.path().join("root.qcow2");
        let started = std::time::Instant::now();
        let restorer = {
            let (root, id, to) = (store.root().to_path_buf(), b.id.clone(), to.clone());
            std::thread::spawn(move || {
                Store::open(root).unwrap().restore(&id, "root", &to, ImageFormat::Qcow2, &Control::new())
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(500));
        let c = store.compress(&b.id, &CompressOptions::default(), &Control::new()).unwrap();
        assert!(
            started.elapsed() < pause,
            "{data_path}: the compression took {:?}, longer than the restore's pause: the race was not made",
            started.elapsed()
        );
        assert_ne!(c.volumes[0].hash, before, "{data_path}: the compression changed the file's hash");
        restorer.join().unwrap().unwrap_or_else(|e| panic!("{data_path}: {e}"));
        assert_identical(&to, &refs["root"]);
    }
}

/// A disk grown, then shrunk, between backups: each backup restores to the
/// disk as it was (its size too), on both data paths, after a compression
/// of one and a delete of another, and every backup verifies.
#[test]
fn a_disk_resized_between_backups_restores_at_each_size() {
    for data_path in ["native", "qemu-img"] {
        let (vm, _sdir, store) = store_on(data_path);
        qemu_io(vm.path("root"), "write -P 0x11 0 8M");
        let r1 = vm.snapshot_all("a");
        let b1 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        let st =
            std::process::Command::new("qemu-img").arg("resize").arg(vm.path("root")).arg("256M").output().unwrap();
        assert!(st.status.success());
        qemu_io(vm.path("root"), "write -P 0x22 100M 4M");
        qemu_io(vm.path("root"), "write -P 0x23 60M 8M");
        let r2 = vm.snapshot_all("b");
        let b2 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        let st = std::process::Command::new("qemu-img")
            .arg("resize")
            .arg("--shrink")
            .arg(vm.path("root"))
            .arg("96M")
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        qemu_io(vm.path("root"), "write -P 0x33 90M 2M");
        let r3 = vm.snapshot_all("c");
        let b3 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        qemu_io(vm.path("root"), "write -P 0x44 0 1M");
        let r4 = vm.snapshot_all("d");
        let b4 = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
        assert_eq!([b2.kind, b3.kind, b4.kind], [BackupKind::Incremental; 3], "{data_path}");
        restore_and_compare(&store, &b1.id, &r1);
        restore_and_compare(&store, &b2.id, &r2);
        restore_and_compare(&store, &b3.id, &r3);
        restore_and_compare(&store, &b4.id, &r4);
        store.compress(&b2.id, &CompressOptions::default(), &Control::new()).unwrap();
        store.delete(&b3.id).unwrap();
        restore_and_compare(&store, &b2.id, &r2);
        restore_and_compare(&store, &b4.id, &r4);
        let reports = store.verify(None, &Control::new()).unwrap();
        assert!(reports.iter().all(|r| r.ok), "{reports:?}");
    }
}

/// A compression's `.comp` file swapped, at the step that renames it over
/// the backup's file, for a hard link to a file outside the store: the
/// rename takes that entry, and the compression fails as corrupt, saying
/// the backup's file is not the copy knib wrote (before, it succeeded: the
/// backup's file became the outside file, under the hash of knib's copy);
/// every later operation on the VM is refused, naming the file, until a
/// discard sets the compression aside, and `verify` then reports the file.
/// The outside file is not written.
#[test]
fn a_comp_file_swapped_at_its_rename_fails_the_compression() {
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x71 0 4M");
    let b = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x72 0 1M");
    let child = store.backup("vm1", &vm.disks, &opts(8), &Control::new()).unwrap();
    let file = store.volume_file(&b, "root").unwrap();
    let comp = file.with_extension("qcow2.comp");
    let outside = tempfile::tempdir_in(sdir.path().parent().unwrap()).unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"not knib's").unwrap();
    let at = format!("rename {} to", comp.display());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
    let e = std::thread::scope(|s| {
        s.spawn(|| while_paused(&at, || replace_with_link(&comp, &victim, true)));
        store.compress(&b.id, &CompressOptions::default(), &Control::new()).unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let says = format!("{} was replaced while knib renamed it over {}", comp.display(), file.display());
    assert!(e.message.contains(&says), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"not knib's");
    // The next lock does not finish the compression: the file is not the
    // copy its next manifest describes (before, it did, and recorded the
    // copy's hash for the outside file). A discard sets it aside; the file
    // still does not pass for the backup's.
    let e = store.lock_vm("vm1", "a later operation").map(drop).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let says = format!(
        "{} has no compressed copy ({}) beside it, yet it is not that copy: it is a file with 2 names",
        file.display(),
        comp.display()
    );
    assert!(e.message.contains(&says) && e.message.contains("`knib recover --discard`"), "{e}");
    // A verify of every backup reports each (before, the child's check
    // under the lock made the refusal the answer for the whole store).
    let reports = store.verify(None, &Control::new()).unwrap();
    let of = |id: &str| reports.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("{id}: {reports:?}"));
    assert!(!of(&b.id).ok && of(&b.id).problems.iter().any(|p| p.contains(&says)), "{reports:?}");
    let again = "not checked again under the VM's lock, which is refused";
    assert!(!of(&child.id).ok && of(&child.id).problems.iter().any(|p| p.contains(again)), "{reports:?}");
    let out = store.discard_interrupted("vm1").unwrap();
    assert_eq!(out.discarded.len(), 1, "{out:?}");
    assert!(out.discarded[0].left[0].contains("yet it is not that copy: it is a file with 2 names"), "{out:?}");
    assert!(!file.with_file_name("manifest.next.json").exists());
    drop(store.lock_vm("vm1", "a later operation").unwrap());
    let report = store.verify(Some(&b.id), &Control::new()).unwrap().remove(0);
    assert!(!report.ok && report.problems.iter().any(|p| p.contains("root.qcow2")), "{report:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"not knib's");
}
