//! Backups written straight to the vault from the single-pass copy,
//! against a real S3 server (Ceph RGW, `scripts/ceph.sh`; see
//! `common/s3.rs`): a chain written directly and restored from the bucket
//! byte-identical; the parent must be in the vault; the multipart sink's
//! memory bound (its parts are in spool files), its single PUT and its
//! header patch; an image of many parts, plain and compressed; the hash
//! recorded is that of the bytes made, a spool file changed before its
//! upload or an object changed before its read-back failing the backup.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::BackupKind;
use knib_core::qcow2::Sink;
use knib_core::qemu_img::{CompressionLibrary, ImageFormat};
use knib_core::vault::{SyncOptions, Vault, VaultSink};
use knib_core::{Control, ErrorKind};

fn ctl() -> Control {
    Control::new()
}

/// Small parts, two at a time: a few MiB of disk is many parts.
fn send() -> SyncOptions {
    SyncOptions { part_size: 5 << 20, parallel_parts: 2, ..Default::default() }
}

#[test]
fn a_chain_written_directly_restores_byte_identical() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-chain");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    let rounds: [&[(&str, &str)]; 4] = [
        &[("root", "write -P 0x11 0 20M"), ("data", "write -P 0x21 1M 3M")],
        &[("root", "write -P 0x12 4M 1M"), ("data", "write -z 1M 64k"), ("data", "write -P 0x22 30M 2M")],
        &[("root", "write -P 0x13 63M 1M"), ("root", "discard 0 64k"), ("data", "write -P 0x23 0 512")],
        &[("root", "write -P 0x14 8M 7M")],
    ];
    let mut taken = Vec::new();
    for (i, round) in rounds.iter().enumerate() {
        for (disk, cmd) in round.iter() {
            qemu_io(vm.path(disk), cmd);
        }
        let refs = vm.snapshot_all(&format!("b{i}"));
        // The last one compressed: its header is written last, into the
        // first part kept for it.
        let opts = BackupOptions { compress: (i == 3).then_some(CompressionLibrary::Zstd), ..Default::default() };
        let m = vault.backup_direct(&store, "vm1", &vm.disks, &opts, &send(), &ctl()).unwrap();
        taken.push((m, refs));
    }
    let kinds: Vec<BackupKind> = taken.iter().map(|(m, _)| m.kind).collect();
    assert_eq!(kinds, [BackupKind::Full, BackupKind::Incremental, BackupKind::Incremental, BackupKind::Incremental]);
    for w in taken.windows(2) {
        assert_eq!(w[1].0.parent.as_deref(), Some(w[0].0.id.as_str()));
    }
    assert!(taken[3].0.compression.is_some());
    // Nothing of them in the store; nothing but the backups in the vault.
    assert!(store.list(None).unwrap().is_empty());
    assert!(p.keys().keys().all(|k| k.starts_with("vms/vm1/")), "{:?}", p.keys());
    // The manifests' sizes and hashes are the objects'.
    let listed = vault.list(Some("vm1")).unwrap();
    assert_eq!(listed.len(), 4);
    let keys = p.keys();
    for m in &listed {
        for v in &m.volumes {
            assert_eq!(keys[&format!("vms/vm1/{}/{}", m.id, v.file)], v.size);
            let bytes = p.get(&format!("vms/vm1/{}/{}", m.id, v.file));
            let h = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes));
            assert_eq!(v.hash.as_deref(), Some(h.as_str()), "{} {}", m.id, v.name);
        }
    }

    let out = tempfile::tempdir().unwrap();
    for (m, refs) in &taken {
        for (i, (vol, reference)) in refs.iter().enumerate() {
            let fmt = if i % 2 == 0 { ImageFormat::Qcow2 } else { ImageFormat::Raw };
            let to = out.path().join(format!("{}-{vol}.{}", m.id, fmt.as_str()));
            let done = vault.restore(&m.id, vol, &to, fmt, true, &ctl()).unwrap();
            assert!(done.verified);
            assert_identical(&to, reference);
            if fmt == ImageFormat::Qcow2 {
                assert_check_clean(&to);
            }
        }
    }
    let v = vault.verify(None, &ctl()).unwrap();
    assert!(v.reports.iter().all(|r| r.ok && r.files_checked == 2), "{v:?}");
}

#[test]
fn the_parent_must_be_in_the_vault() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-parent");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x31 0 6M");
    let local = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x32 1M 1M");
    // The deltas follow a backup of the store that the vault lacks.
    let e = vault.backup_direct(&store, "vm1", &vm.disks, &BackupOptions::default(), &send(), &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains(&local.id) && e.message.contains("knib sync"), "{e}");
    assert!(p.keys().is_empty(), "{:?}", p.keys());
    // Synced, the direct backup continues it.
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    let refs = vm.snapshot_all("after");
    let m = vault.backup_direct(&store, "vm1", &vm.disks, &BackupOptions::default(), &send(), &ctl()).unwrap();
    assert_eq!((m.kind, m.parent.as_deref()), (BackupKind::Incremental, Some(local.id.as_str())));
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("root.raw");
    vault.restore(&m.id, "root", &to, ImageFormat::Raw, true, &ctl()).unwrap();
    assert_identical(&to, &refs["root"]);
    // A full one needs no parent.
    let full = BackupOptions { full: true, ..Default::default() };
    let f = vault.backup_direct(&store, "vm1", &vm.disks, &full, &send(), &ctl()).unwrap();
    assert_eq!((f.kind, f.parent), (BackupKind::Full, None));
}

/// A chain whose parent object was lost from the vault (its manifest
/// kept) is not continued: the direct backup is refused as the store
/// refuses a damaged chain, naming the object, and nothing is sent; a full
/// one is taken. Before, it and every later one answered success and none
/// could be restored.
#[test]
fn a_chain_with_a_lost_object_is_not_continued() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-lost");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x41 0 4M");
    let first = vault.backup_direct(&store, "vm1", &vm.disks, &BackupOptions::default(), &send(), &ctl()).unwrap();
    let lost = format!("vms/vm1/{}/{}", first.id, first.volumes[0].file);
    p.delete(&lost);
    qemu_io(vm.path("root"), "write -P 0x42 1M 1M");
    let before = p.keys();
    let e = vault.backup_direct(&store, "vm1", &vm.disks, &BackupOptions::default(), &send(), &ctl()).unwrap_err();
    assert!(e.message.contains("the chain to continue is damaged") && e.message.contains(&lost), "{e}");
    assert_eq!(p.keys(), before, "a refused backup sent something");
    let full = BackupOptions { full: true, ..Default::default() };
    let refs = vm.snapshot_all("full");
    let f = vault.backup_direct(&store, "vm1", &vm.disks, &full, &send(), &ctl()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("root.raw");
    vault.restore(&f.id, "root", &to, ImageFormat::Raw, true, &ctl()).unwrap();
    assert_identical(&to, &refs["root"]);
}

/// A disk knib's own reader does not copy (qcow2 version 2; extended L2
/// entries) cannot be written straight to a vault: refused before anything
/// changes, naming the disk and why, and saying to take it into the store
/// and sync it; nothing is sent and the disk is as it was. Taken into the
/// store (through qemu-img) and synced, it restores from the vault.
#[test]
fn a_disk_the_native_path_does_not_copy_is_refused_before_anything_is_sent() {
    if !s3::setup() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    for (name, opts, why) in [
        ("old", ["-o", "compat=0.10"], "is a qcow2 version 2 image"),
        ("xl2", ["-o", "extended_l2=on"], "extended L2 entries (subclusters) are not supported"),
    ] {
        let p = s3::Prefix::new(&format!("direct-refused-{name}"));
        let vault = Vault::open(&p.location()).unwrap();
        let disk = dir.path().join(format!("{name}.qcow2"));
        make_disk(&disk, 8 << 20, &opts);
        qemu_io(&disk, "write -P 0x61 1M 2M");
        let reference = dir.path().join(format!("{name}-ref.qcow2"));
        snapshot(&disk, &reference);
        let disks = vec![knib_core::catalog::DiskSpec { name: "vda".into(), path: disk.clone() }];
        let e = vault.backup_direct(&store, name, &disks, &BackupOptions::default(), &send(), &ctl()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        for part in [why, disk.to_str().unwrap(), "take it into the store and sync it"] {
            assert!(e.message.contains(part), "{name}: {part:?} not in: {e}");
        }
        assert!(p.keys().is_empty(), "{:?}", p.keys());
        assert_eq!(chain_len(&disk), 1, "{name}: the disk is as it was");
        assert_identical(&disk, &reference);
        let m = store.backup(name, &disks, &BackupOptions::default(), &ctl()).unwrap();
        vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
        let to = dir.path().join(format!("{name}-restored.raw"));
        vault.restore(&m.id, "vda", &to, ImageFormat::Raw, true, &ctl()).unwrap();
        assert_identical(&to, &reference);
    }
}

/// Bytes of a test stream: not compressible, not zero.
fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn the_sink_holds_at_most_its_bound_and_sends_every_byte_in_order() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-sink");
    let vault = Vault::open(&p.location()).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let spooled_names = || std::fs::read_dir(spool.path()).unwrap().count();
    for parallel in [1usize, 3] {
        let opts = SyncOptions { part_size: 5 << 20, parallel_parts: parallel, ..Default::default() };
        let rel = format!("vms/vm1/x/p{parallel}.qcow2");
        let record = format!("uploads/vm1/x/p{parallel}.json");
        let data = stream(parallel as u64, (37 << 20) + 12345);
        let mut sink = VaultSink::new(&vault, &rel, &record, &opts, true, spool.path()).unwrap();
        // Appends of odd sizes, and runs of zeros.
        let mut off = 0;
        let mut n = 1;
        while off < data.len() {
            let k = (n * 7919 % (3 << 20) + 1).min(data.len() - off);
            sink.append(&data[off..off + k]).unwrap();
            off += k;
            n += 1;
        }
        sink.append_zeros(100_000).unwrap();
        let bound = sink.bound();
        // The parts are in spool files: in memory, small buffers only.
        assert!(bound <= (256 << 10) + parallel * (512 << 10), "{bound}");
        assert!(sink.peak_buffered() <= bound, "{} > {bound}", sink.peak_buffered());
        // Hashed: written front to back, part 0 is not kept.
        assert!(sink.peak_spooled() <= parallel as u64 * (5 << 20), "{}", sink.peak_spooled());
        assert_eq!(spooled_names(), 0, "the spool files have no names");
        let (len, hash) = sink.finish(&ctl()).unwrap();
        let mut want = data.clone();
        want.resize(want.len() + 100_000, 0);
        assert_eq!(len, want.len() as u64);
        assert_eq!(hash, format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&want)));
        assert!(p.get(&rel) == want, "the object is the bytes appended");
        assert!(!p.keys().contains_key(&record), "the upload record is removed");
    }
    // The peak, measured on a sink that is not finished yet.
    let opts = SyncOptions { part_size: 5 << 20, parallel_parts: 2, ..Default::default() };
    let mut sink =
        VaultSink::new(&vault, "vms/vm1/x/peak.qcow2", "uploads/vm1/x/peak.json", &opts, false, spool.path()).unwrap();
    let chunk = stream(9, 1 << 20);
    for _ in 0..40 {
        sink.append(&chunk).unwrap();
        assert!(sink.peak_buffered() <= sink.bound(), "{} > {}", sink.peak_buffered(), sink.bound());
        // Part 0 kept for a patch, one being filled, one in flight.
        assert!(sink.peak_spooled() <= 3 * (5 << 20), "{}", sink.peak_spooled());
    }
    assert!(sink.peak_buffered() > 0 && sink.bound() < 2 << 20, "{} {}", sink.peak_buffered(), sink.bound());
    assert!(sink.peak_spooled() >= 2 * (5 << 20), "parts were held in spool files: {}", sink.peak_spooled());
    // Dropped unfinished: the upload is aborted, nothing is visible.
    drop(sink);
    assert!(!p.keys().keys().any(|k| k.contains("peak")), "{:?}", p.keys());

    // One small part: one PUT; a patch of the first part, hashed with it.
    let mut sink =
        VaultSink::new(&vault, "vms/vm1/x/small", "uploads/vm1/x/small.json", &opts, true, spool.path()).unwrap();
    let mut want = stream(3, 70_000);
    sink.append(&want).unwrap();
    sink.patch(10, b"HEADER").unwrap();
    assert!(sink.patch(69_999, b"xy").is_err());
    let (len, hash) = sink.finish(&ctl()).unwrap();
    want[10..16].copy_from_slice(b"HEADER");
    assert_eq!((len, hash), (70_000, format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&want))));
    let got = p.get("vms/vm1/x/small");
    assert!(got == want);
    assert_eq!(spooled_names(), 0);
}

#[test]
fn an_image_of_many_parts_is_sent_from_spool_files_plain_and_compressed() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-many");
    let w = tempfile::tempdir().unwrap();
    // 64 MiB of guest, 27 MiB of it random (not compressed away): more
    // than 5 parts of 5 MiB, plain or compressed.
    let raw = w.path().join("root.raw");
    let mut bytes = stream(21, 24 << 20);
    bytes.resize(40 << 20, 0);
    bytes.extend(stream(22, 3 << 20));
    bytes.resize(64 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    drop(bytes);
    let disk = w.path().join("root.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    let reference = w.path().join("ref.qcow2");
    snapshot(&disk, &reference);
    let disks = vec![knib_core::catalog::DiskSpec { name: "root".into(), path: disk }];
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    let send = SyncOptions::direct();
    let bound = VaultSink::new(&vault, "vms/vm1/x/b", "uploads/vm1/x/b.json", &send, false, w.path()).unwrap().bound();
    assert!(bound <= 2 << 20, "{bound}");
    for compress in [None, Some(CompressionLibrary::Zstd)] {
        let opts = BackupOptions { full: true, compress, ..Default::default() };
        let m = vault.backup_direct(&store, "vm1", &disks, &opts, &send, &ctl()).unwrap();
        assert_eq!(m.compression.is_some(), compress.is_some());
        let size = m.volumes[0].size;
        assert!(size > 5 * (5 << 20), "{compress:?}: {size} bytes is not more than 5 parts");
        // The parts went through spool files: the sink's memory stayed small.
        let peak = vault.part_memory_peak();
        assert!(peak > 0 && peak <= bound as u64, "{compress:?}: {peak} bytes of parts in memory (bound {bound})");
        // Nothing of them is left in the store.
        let left: Vec<_> = std::fs::read_dir(sdir.path().join("vms/vm1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let to = w.path().join(format!("restored-{}.qcow2", compress.is_some()));
        let done = vault.restore(&m.id, "root", &to, ImageFormat::Qcow2, true, &ctl()).unwrap();
        assert!(done.verified);
        assert_identical(&to, &reference);
        assert_check_clean(&to);
    }
}

#[test]
fn the_json_backup_writes_straight_to_a_vault() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-json");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    qemu_io(vm.path("data"), "write -P 0x41 0 9M");
    let refs = vm.snapshot_all("b0");
    let loc = p.location();
    let call = |req: serde_json::Value| knib_core::api::call("backup", &req.to_string(), &ctl());
    let disks = serde_json::to_value(&vm.disks).unwrap();
    let out = call(serde_json::json!({"store": sdir.path(), "vm": "vm1", "disks": disks, "vault": loc})).unwrap();
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["kind"], "full");
    let id = b["id"].as_str().unwrap();
    let file = b["volumes"][0]["file"].as_str().unwrap();
    assert!(file.starts_with(&format!("{loc}/vms/vm1/{id}/")), "{file}");
    // In the vault, not in the store.
    assert!(Store::open(sdir.path()).unwrap().list(None).unwrap().is_empty());
    let w = tempfile::tempdir().unwrap();
    let to = w.path().join("data.raw");
    Vault::open(&loc).unwrap().restore(id, "data", &to, ImageFormat::Raw, true, &ctl()).unwrap();
    assert_identical(&to, &refs["data"]);
    // A bad `vault` names the field; a VM and a domain at once are refused.
    for (req, says) in [
        (serde_json::json!({"store": sdir.path(), "vm": "vm1", "disks": disks, "vault": "backups/x"}), "field `vault`"),
        (
            serde_json::json!({"store": sdir.path(), "vm": "vm1", "domain": "d1", "vault": loc}),
            "give `vm` with `disks`, or `domain`",
        ),
    ] {
        let e = call(req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains(says), "{e}");
    }
}

/// The xxh3-128 of `bytes`, as manifests write it.
fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// A qcow2 disk `name` in `dir` of `size_mib` MiB whose first
/// `random_mib` MiB are random (not compressed away).
fn random_disk(dir: &Path, name: &str, random_mib: usize, size_mib: usize) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let mut bytes = stream(random_mib as u64 + 40, random_mib << 20);
    bytes.resize(size_mib << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let disk = dir.join(format!("{name}.qcow2"));
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();
    disk
}

/// The spool files of store directory `dir` open in this process: the
/// `/proc/self/fd` links of its unlinked files (they have no name).
fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let dir = format!("{}/", std::fs::canonicalize(dir).unwrap().display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let link = e.unwrap().path();
        let Ok(to) = std::fs::read_link(&link) else { continue };
        let to = to.to_string_lossy();
        if to.starts_with(&dir) && to.ends_with(" (deleted)") {
            found.push(link);
        }
    }
    found
}

/// Flip the bits of byte `at` of the file behind `link` (a new open file
/// description: the file's own offset is left alone).
fn damage(link: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(link).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
}

/// Whether the file behind `link` starts with 64 KiB of zeros: the header
/// cluster of a compressed image, written last.
fn starts_with_zeros(link: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(link).unwrap();
    let mut b = vec![0u8; 64 << 10];
    f.read_exact_at(&mut b, 0).unwrap();
    b.iter().all(|&x| x == 0)
}

/// Ends the pause at its step when dropped (a failed assertion does not
/// leave the backup's thread waiting out its pause).
struct Release(String);

impl Drop for Release {
    fn drop(&mut self) {
        knib_core::crashpoint::release_pause(&self.0);
    }
}

/// Take a direct backup of `disks` as VM `vm` on a thread of its own,
/// holding it before its first step whose name contains `step` while
/// `meanwhile` runs; its outcome.
fn backup_held_at(
    vault: &Vault,
    store: &Store,
    vm: &str,
    disks: &[knib_core::catalog::DiskSpec],
    opts: &BackupOptions,
    step: &str,
    meanwhile: impl FnOnce(),
) -> knib_core::Result<knib_core::catalog::Manifest> {
    use std::time::Duration;
    knib_core::crashpoint::pause_before(step, Duration::from_secs(300));
    std::thread::scope(|s| {
        let h = s.spawn(|| vault.backup_direct(store, vm, disks, opts, &send(), &ctl()));
        let release = Release(step.to_string());
        assert!(knib_core::crashpoint::wait_for_pause(step, Duration::from_secs(300)), "no pause at {step}");
        meanwhile();
        drop(release);
        h.join().unwrap()
    })
}

/// A compressed image's header is written last, into its first part: its
/// hash cannot be taken as it is sent, and the object is read back. The
/// hash recorded is still that of the bytes knib made: each part read back
/// is checked against the hash of the part sent, so an object the vault
/// changed after the upload fails the backup as `corrupt`, removed, with
/// no manifest. Before, the hash of whatever was read back was recorded,
/// and every later check passed on the damaged image.
#[test]
fn a_compressed_direct_backup_records_the_hash_of_the_bytes_it_made() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-readback");
    let w = tempfile::tempdir().unwrap();
    let disk = random_disk(w.path(), "root", 16, 32);
    let reference = w.path().join("ref.qcow2");
    snapshot(&disk, &reference);
    let disks = vec![knib_core::catalog::DiskSpec { name: "root".into(), path: disk }];
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    let zstd = BackupOptions { full: true, compress: Some(CompressionLibrary::Zstd), ..Default::default() };

    // Sent whole: the hash recorded is the object's, and that of the same
    // copy into the store; the image restores as its source.
    let m = vault.backup_direct(&store, "vm1", &disks, &zstd, &send(), &ctl()).unwrap();
    let v = &m.volumes[0];
    let obj = p.get(&format!("vms/vm1/{}/{}", m.id, v.file));
    assert!(obj.len() > 2 * (5 << 20), "{} bytes: not three parts", obj.len());
    assert_eq!(v.hash.as_deref(), Some(xxh3_hex(&obj).as_str()));
    let local = store.backup("vm1", &disks, &zstd, &ctl()).unwrap();
    assert_eq!(local.volumes[0].hash, v.hash, "the store's copy of the same disk is another image");
    let to = w.path().join("restored.qcow2");
    let done = vault.restore(&m.id, "root", &to, ImageFormat::Qcow2, true, &ctl()).unwrap();
    assert!(done.verified);
    assert_identical(&to, &reference);

    // Changed in the vault between its upload and its read-back (a byte of
    // a middle part): the backup fails, and leaves nothing.
    let loc = p.location();
    let step = format!("removal of the upload record of {loc}/vms/vm2/");
    let r = backup_held_at(&vault, &store, "vm2", &disks, &zstd, &step, || {
        let rel = p.keys().into_keys().find(|k| k.starts_with("vms/vm2/") && k.ends_with(".qcow2")).unwrap();
        let mut bytes = p.get(&rel);
        let at = bytes.len() / 2;
        bytes[at] ^= 0x5a;
        p.put(&rel, bytes);
    });
    let e = r.expect_err("a backup whose object changed in the vault was published");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    for part in [format!("{loc}/vms/vm2/"), "read back from the vault".into(), "not kept".into()] {
        assert!(e.message.contains(&part), "{part:?} not in: {e}");
    }
    assert!(vault.list(Some("vm2")).unwrap().is_empty());
    assert!(!p.keys().keys().any(|k| k.contains("vm2")), "{:?}", p.keys());

    // Not compressed, an object is not read back: its hash is taken as it
    // is sent, so the same damage is recorded as nothing (the hash is a
    // clean copy's) and verify finds it.
    let plain = BackupOptions { full: true, ..Default::default() };
    let clean = vault.backup_direct(&store, "vm3", &disks, &plain, &send(), &ctl()).unwrap();
    let step = format!("removal of the upload record of {loc}/vms/vm3/");
    let mut rel = String::new();
    let damaged = backup_held_at(&vault, &store, "vm3", &disks, &plain, &step, || {
        rel = p.keys().into_keys().find(|k| k.starts_with("vms/vm3/") && !k.contains(&clean.id)).unwrap();
        let mut bytes = p.get(&rel);
        let at = bytes.len() / 2;
        bytes[at] ^= 0x5a;
        p.put(&rel, bytes);
    })
    .unwrap();
    assert_eq!(damaged.volumes[0].hash, clean.volumes[0].hash);
    assert_ne!(damaged.volumes[0].hash.as_deref(), Some(xxh3_hex(&p.get(&rel)).as_str()));
    let e = vault.verify(Some(&damaged.id), &ctl()).unwrap();
    assert!(e.reports.iter().any(|r| !r.ok), "{e:?}");
}

/// A spool file changed between its write and its upload (the local disk
/// damaged it) is not sent: each block is checked as it is read for its
/// PUT against its hash as written, and the part held for a compressed
/// image's header is checked before the header goes in. The backup fails
/// as `corrupt` naming the object, with no manifest and nothing left in
/// the vault; plain or compressed, in parts or in one PUT. Before, the
/// damaged bytes were sent: a plain image's recorded hash was then that of
/// the bytes made (the damage found later), a compressed one's that of the
/// damaged object read back (the damage hidden).
#[test]
fn a_spool_file_changed_after_it_is_written_is_not_sent() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("direct-spool");
    let loc = p.location();
    let w = tempfile::tempdir().unwrap();
    // More than two parts, compressed or not; and one part.
    let big = random_disk(w.path(), "big", 16, 32);
    let small = random_disk(w.path(), "small", 1, 8);
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    #[derive(Clone, Copy, Debug)]
    enum Which {
        /// The one spool file there is.
        Only,
        /// Part 0 of a compressed image, held for its header.
        Held,
        /// The other: the part about to be sent.
        NotHeld,
    }
    // (VM, disk, compressed, the step before which a spool file changes, which)
    let cases = [
        ("plain", &big, false, "part 0 of", Which::Only),
        ("held", &big, true, "part 1 of", Which::Held),
        ("sent", &big, true, "part 1 of", Which::NotHeld),
        ("one-plain", &small, false, "upload of", Which::Only),
        ("one", &small, true, "upload of", Which::Only),
    ];
    for (vm, disk, compressed, step, which) in cases {
        let disks = vec![knib_core::catalog::DiskSpec { name: "root".into(), path: disk.clone() }];
        let opts = BackupOptions {
            full: true,
            compress: compressed.then_some(CompressionLibrary::Zstd),
            ..Default::default()
        };
        let vm_dir = sdir.path().join("vms").join(vm);
        let at = format!("{step} {loc}/vms/{vm}/");
        let r = backup_held_at(&vault, &store, vm, &disks, &opts, &at, || {
            let files = spool_files(&vm_dir);
            let file = match which {
                Which::Only => {
                    assert_eq!(files.len(), 1, "{vm}: {files:?}");
                    &files[0]
                }
                Which::Held | Which::NotHeld => {
                    assert_eq!(files.len(), 2, "{vm}: {files:?}");
                    let held = matches!(which, Which::Held);
                    let mut it = files.iter().filter(|f| starts_with_zeros(f) == held);
                    let f = it.next().unwrap_or_else(|| panic!("{vm}: no such spool file"));
                    assert!(it.next().is_none(), "{vm}: two parts alike");
                    f
                }
            };
            // Past the header cluster (a held part 0 gets its header
            // later), inside the part.
            let len = std::fs::metadata(file).unwrap().len();
            assert!(len > 128 << 10, "{vm}: {len}");
            damage(file, len / 2 + 7);
        });
        let e = r.expect_err(&format!("{vm}: a backup sent from a changed spool file was published"));
        assert_eq!(e.kind, ErrorKind::Corrupt, "{vm}: {e}");
        for part in [format!("{loc}/vms/{vm}/"), "changed since it was written".into(), "not sent".into()] {
            assert!(e.message.contains(&part), "{vm}: {part:?} not in: {e}");
        }
        assert!(vault.list(Some(vm)).unwrap().is_empty(), "{vm}");
        assert!(!p.keys().keys().any(|k| k.contains(&format!("/{vm}/"))), "{vm}: {:?}", p.keys());
        assert!(spool_files(&vm_dir).is_empty(), "{vm}: spool files left open");
    }
    // Unchanged, the same backups are taken and restore as their disks.
    for (vm, disk, compressed) in [("plain", &big, false), ("one", &small, true)] {
        let disks = vec![knib_core::catalog::DiskSpec { name: "root".into(), path: disk.clone() }];
        let opts = BackupOptions {
            full: true,
            compress: compressed.then_some(CompressionLibrary::Zstd),
            ..Default::default()
        };
        let m = vault.backup_direct(&store, vm, &disks, &opts, &send(), &ctl()).unwrap();
        let obj = p.get(&format!("vms/{vm}/{}/{}", m.id, m.volumes[0].file));
        assert_eq!(m.volumes[0].hash.as_deref(), Some(xxh3_hex(&obj).as_str()), "{vm}");
        let to = w.path().join(format!("{vm}.raw"));
        vault.restore(&m.id, "root", &to, ImageFormat::Raw, true, &ctl()).unwrap();
        let src = w.path().join(format!("{vm}-src.raw"));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-O", "raw"])
            .arg(disk)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        assert_identical(&to, &src);
    }
}
