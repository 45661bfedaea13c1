//! The vault against a real S3 server (Ceph RGW, `scripts/ceph.sh`; see
//! `common/s3.rs`): chains synced (only what the vault lacks, parents
//! first), restored from the bucket byte-identical, verified; a damaged
//! object found by verify and refused by restore; a small file-level
//! restore from a large backup fetching a small fraction of it; chain-safe
//! deletes; the JSON operations on an `s3://` store.

mod common;
#[path = "common/fsimage.rs"]
mod fsimage;
#[path = "common/s3.rs"]
mod s3;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::disk::*;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::qemu_img::ImageFormat;
use knib_core::vault::{SyncOptions, Vault};
use knib_core::{Control, ErrorKind};
use serde_json::{json, Value};

fn ctl() -> Control {
    Control::new()
}

/// Three backups of two disks (full, then two incrementals), with the
/// disks' contents at each.
fn three_backups(vm: &TestDisks, store: &Store) -> Vec<(String, BTreeMap<String, PathBuf>)> {
    let rounds: [&[(&str, &str)]; 3] = [
        &[("root", "write -P 0x11 0 20M"), ("data", "write -P 0x21 1M 3M")],
        &[("root", "write -P 0x12 4M 1M"), ("data", "write -z 1M 64k"), ("data", "write -P 0x22 30M 2M")],
        &[("root", "write -P 0x13 63M 1M"), ("root", "discard 0 64k"), ("data", "write -P 0x23 0 512")],
    ];
    let mut out = Vec::new();
    for (i, round) in rounds.iter().enumerate() {
        for (disk, cmd) in round.iter() {
            qemu_io(vm.path(disk), cmd);
        }
        let refs = vm.snapshot_all(&format!("b{i}"));
        let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
        out.push((m.id, refs));
    }
    out
}

/// Three backups of two disks in a store, synced to a fresh prefix.
struct Synced {
    p: s3::Prefix,
    vm: TestDisks,
    _sdir: tempfile::TempDir,
    store: Store,
    taken: Vec<(String, BTreeMap<String, PathBuf>)>,
    vault: Vault,
}

/// Every backup of `vault` verifies, and each volume of `taken` restores
/// identical to its reference.
fn assert_verified_and_restored(vault: &Vault, taken: &[(String, BTreeMap<String, PathBuf>)]) {
    let v = vault.verify(None, &ctl()).unwrap();
    assert!(v.reports.iter().all(|r| r.ok), "{v:?}");
    let out = tempfile::tempdir().unwrap();
    for (id, refs) in taken {
        for (vol, reference) in refs {
            let to = out.path().join(format!("{id}-{vol}.raw"));
            vault.restore(id, vol, &to, ImageFormat::Raw, true, &ctl()).unwrap();
            assert_identical(&to, reference);
        }
    }
}

impl Synced {
    fn new(name: &str) -> Synced {
        let p = s3::Prefix::new(name);
        let vm = TestDisks::two();
        let sdir = tempfile::tempdir().unwrap();
        let store = Store::create(sdir.path()).unwrap();
        let taken = three_backups(&vm, &store);
        let vault = Vault::open(&p.location()).unwrap();
        vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
        Synced { p, vm, _sdir: sdir, store, taken, vault }
    }
}

#[test]
fn chains_synced_restored_identical_verified_and_deleted_chain_safely() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("chain");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let taken = three_backups(&vm, &store);
    let vault = Vault::open(&p.location()).unwrap();
    assert!(vault.list(None).unwrap().is_empty());

    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    let ids: Vec<String> = taken.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(r.sent, ids, "parents first");
    assert!(r.present.is_empty());
    let local_bytes: u64 = store.list(None).unwrap().iter().flat_map(|m| m.volumes.iter().map(|v| v.size)).sum();
    assert_eq!(r.bytes_sent, local_bytes);
    // Nothing but the backups is left: no upload record.
    assert!(p.keys().keys().all(|k| k.starts_with("vms/vm1/")), "{:?}", p.keys());

    // A second sync sends nothing.
    let again = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(again.sent.is_empty(), "{again:?}");
    assert_eq!(again.present, ids);

    // The vault's manifests are the store's, with every hash.
    let listed = vault.list(None).unwrap();
    for (l, v) in store.list(None).unwrap().iter().zip(&listed) {
        assert_eq!((&l.id, &l.parent, l.kind, l.position), (&v.id, &v.parent, v.kind, v.position));
        for (lv, vv) in l.volumes.iter().zip(&v.volumes) {
            assert!(vv.hash.is_some());
            assert_eq!(lv.hash.as_ref().or(vv.hash.as_ref()), vv.hash.as_ref());
            assert_eq!(lv.size, vv.size);
        }
    }

    // Every backup restores from the bucket to exactly the disk as it was.
    let out = tempfile::tempdir().unwrap();
    for (id, refs) in &taken {
        for (i, (vol, reference)) in refs.iter().enumerate() {
            let fmt = if i % 2 == 0 { ImageFormat::Qcow2 } else { ImageFormat::Raw };
            let to = out.path().join(format!("{id}-{vol}.{}", fmt.as_str()));
            let done = vault.restore(id, vol, &to, fmt, true, &ctl()).unwrap();
            assert!(done.verified && done.bytes_fetched > 0);
            assert_identical(&to, reference);
            if fmt == ImageFormat::Qcow2 {
                assert_check_clean(&to);
            }
        }
    }
    let v = vault.verify(None, &ctl()).unwrap();
    assert_eq!(v.reports.len(), 3);
    assert!(v.reports.iter().all(|r| r.ok && r.files_checked == 2), "{v:?}");

    // A fourth backup: the next sync sends it alone.
    qemu_io(vm.path("data"), "write -P 0x24 8M 1M");
    let m4 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.sent, vec![m4.id.clone()]);
    assert_eq!(r.bytes_sent, m4.volumes.iter().map(|v| v.size).sum::<u64>());

    // Deletes keep chains whole: a backup with children is only marked.
    let d = vault.delete(&taken[1].0).unwrap();
    assert_eq!(d.marked_removed, vec![taken[1].0.clone()]);
    // Every later backup that reads it, not only its child.
    let why = format!("backups {}, {} depend on it: its objects stay until they are deleted", taken[2].0, m4.id);
    assert_eq!(d.kept_because.as_deref(), Some(why.as_str()), "{d:?}");
    assert!(vault.show(&taken[1].0).is_err());
    let to = out.path().join("after-delete.raw");
    vault.restore(&taken[2].0, "root", &to, ImageFormat::Raw, true, &ctl()).unwrap();
    assert_identical(&to, &taken[2].1["root"]);
    // The removed backup's object damaged (a byte changed, its length
    // kept): a verify of every backup finds it through the backups that
    // read it (before, no report hashed it, and every one was ok), reading
    // it once.
    let key = p.keys().into_keys().find(|k| k.contains(&taken[1].0) && k.ends_with("root.qcow2")).unwrap();
    let good = p.get(&key);
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x5a;
    p.put(&key, bad);
    let sound = vault.verify(None, &ctl()).unwrap();
    let failed: Vec<&str> = sound.reports.iter().filter(|r| !r.ok).map(|r| r.id.as_str()).collect();
    assert!(failed.contains(&taken[2].0.as_str()), "{sound:?}");
    let kept = format!("(backup {}, deleted, is kept because this backup reads it)", taken[1].0);
    for r in sound.reports.iter().filter(|r| !r.ok) {
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].contains(&key) && r.problems[0].ends_with(&kept), "{r:?}");
    }
    let objects: u64 = sound.reports.iter().map(|r| r.files_checked as u64).sum();
    let total: u64 = vault.list(None).unwrap().iter().map(|m| m.volumes.len() as u64).sum();
    assert_eq!(objects, total + 2, "the kept backup's two objects, once each: {sound:?}");
    p.put(&key, good);
    assert!(vault.verify(None, &ctl()).unwrap().reports.iter().all(|r| r.ok));
    // The last two go: the removed one with them.
    vault.delete(&m4.id).unwrap();
    let d = vault.delete(&taken[2].0).unwrap();
    assert_eq!(d.expunged, vec![taken[2].0.clone(), taken[1].0.clone()]);
    let left: Vec<String> = vault.list(None).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(left, vec![taken[0].0.clone()]);
    assert!(p.keys().keys().all(|k| k.contains(&taken[0].0)), "{:?}", p.keys());
}

#[test]
fn a_damaged_object_is_found_by_verify_and_refused_by_restore() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("damage");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x31 0 12M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();

    // One byte of a data cluster changed, the length kept.
    let rel = format!("vms/vm1/{}/root.qcow2", m.id);
    let good = p.get(&rel);
    let mut bytes = good.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    p.put(&rel, bytes.clone());

    let v = vault.verify(Some(&m.id), &ctl()).unwrap();
    assert!(!v.reports[0].ok);
    assert!(v.reports[0].problems.iter().any(|p| p.contains("root.qcow2") && p.contains("hash")), "{v:?}");
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("r.qcow2");
    let e = vault.restore(&m.id, "root", &to, ImageFormat::Qcow2, true, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("root.qcow2") && e.message.contains("damaged"), "{e}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "nothing is left behind");
    // The other volume is whole and restores.
    vault.restore(&m.id, "data", &to, ImageFormat::Qcow2, true, &ctl()).unwrap();

    // An object cut short is corrupt before anything is read through it.
    bytes.truncate(bytes.len() - 4096);
    p.put(&rel, bytes);
    let e = vault.restore(&m.id, "root", &out.path().join("s.raw"), ImageFormat::Raw, false, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("its manifest says"), "{e}");

    // A header that gives the volume another virtual size, the length
    // kept: refused before a byte is written (before, the restore wrote an
    // image of the header's size, then failed on the hash), and by the
    // reads of file-level and quick restores.
    let mut bytes = good.clone();
    let size = u64::from_be_bytes(bytes[24..32].try_into().unwrap());
    bytes[24..32].copy_from_slice(&(size * 2).to_be_bytes());
    p.put(&rel, bytes);
    let grown = out.path().join("v.raw");
    let e = vault.restore(&m.id, "root", &grown, ImageFormat::Raw, true, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let says = format!("its qcow2 header gives volume root a virtual size of {} bytes, the manifest {size}", size * 2);
    assert!(e.message.contains(&says), "{e}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1, "nothing is left behind");
    let e = vault.volume_chain(&m.id, "root").map(drop).unwrap_err();
    assert!(e.message.contains(&says), "{e}");
}

/// An object replaced after its chain was opened (the same length, other
/// bytes: the L1 table read at the open would no longer match the data
/// read later) is not read on: every ranged GET asks for the version
/// opened (If-Match with its ETag), and the change is a Corrupt error.
#[test]
fn an_object_replaced_while_it_is_read_is_not_read_on() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("replaced");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x41 0 12M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    let (mut chain, _) = vault.volume_chain(&m.id, "root").unwrap();
    let mut buf = vec![0u8; 4096];
    chain.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x41; 4096]);
    let rel = format!("vms/vm1/{}/root.qcow2", m.id);
    let mut bytes = p.get(&rel);
    let at = bytes.len() - 1;
    bytes[at] ^= 0x5a;
    p.put(&rel, bytes);
    // 8 MiB on: past what the first read fetched ahead.
    let e = chain.read_at(8 << 20, &mut buf).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("root.qcow2 changed while it was read"), "{e}");
}

/// A backup copied under another VM's name (sorted first, with its
/// manifest's `vm` changed to match) is not restored in place of the
/// original: the id is found twice, a Corrupt error names both VMs, and
/// nothing is written.
#[test]
fn a_backup_id_under_two_vms_is_refused() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("two-vms");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x51 0 1M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    let out = tempfile::tempdir().unwrap();
    vault.restore(&m.id, "root", &out.path().join("ok.raw"), ImageFormat::Raw, true, &ctl()).unwrap();
    for (k, _) in p.keys() {
        let Some(rest) = k.strip_prefix(&format!("vms/vm1/{}/", m.id)) else { continue };
        let mut data = p.get(&k);
        if rest == "manifest.json" {
            let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
            v["vm"] = serde_json::json!("vm0");
            data = serde_json::to_vec(&v).unwrap();
        }
        p.put(&format!("vms/vm0/{}/{rest}", m.id), data);
    }
    let e = vault.restore(&m.id, "root", &out.path().join("r.raw"), ImageFormat::Raw, true, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("backup {} is in vault", m.id)) && e.message.contains("vm0 and vm1"), "{e}");
    assert!(!out.path().join("r.raw").exists());
}

/// A chain of manifests deeper than a qcow2 chain may be (65 backups,
/// each naming the one before: manifests only, as somebody with write
/// access to the bucket could add) is refused before any object of it
/// is opened.
#[test]
fn a_chain_deeper_than_64_backups_is_refused_before_any_object_is_opened() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("deep");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    let base: serde_json::Value = serde_json::from_slice(&p.get(&format!("vms/vm1/{}/manifest.json", m.id))).unwrap();
    let mut parent = m.id.clone();
    // 100 deep: the walk stops past 64 (before, it fetched every manifest
    // to the root first, for every backup a vault-wide verify looked at).
    for i in 1..=100 {
        let id = format!("29990101-000000000-{i:04}");
        let mut v = base.clone();
        v["id"] = serde_json::json!(id);
        v["parent"] = serde_json::json!(parent);
        v["position"] = serde_json::json!(i + 1);
        for vol in v["volumes"].as_array_mut().unwrap() {
            let file = vol["file"].as_str().unwrap().to_string();
            vol["backing"] = serde_json::json!(format!("../{parent}/{file}"));
        }
        p.put(&format!("vms/vm1/{id}/manifest.json"), serde_json::to_vec(&v).unwrap());
        parent = id;
    }
    let out = tempfile::tempdir().unwrap();
    let vault = Vault::open(&p.location()).unwrap();
    let e = vault.restore(&parent, "root", &out.path().join("r.raw"), ImageFormat::Raw, true, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("its chain has more than the 64 backups"), "{e}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    assert!(vault.get_requests() <= 70, "{} GETs for a refused chain", vault.get_requests());
}

#[test]
fn a_small_file_restore_from_a_large_backup_fetches_a_small_fraction() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("files");
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"vault-test\n").unwrap();
    fsimage::write_stream(&src.join("big.bin"), 7, 96 << 20);
    let img = w.path().join("fs.img");
    fsimage::mkfs_ext4(&src, &img, 128);
    let raw = w.path().join("disk.raw");
    fsimage::partitioned_disk(&[&img], &raw);
    let disk = w.path().join("disk.qcow2");
    fsimage::to_qcow2(&raw, &disk);
    let store = Store::create(w.path().join("store")).unwrap();
    let disks = vec![DiskSpec { name: "root".into(), path: disk.clone() }];
    let m = store.backup("vm1", &disks, &BackupOptions::default(), &ctl()).unwrap();
    let backup_bytes = m.volumes[0].size;
    assert!(backup_bytes > 96 << 20);
    Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();

    // A fresh handle counts only what this restore fetches.
    let vault = Vault::open(&p.location()).unwrap();
    let (chain, name) = vault.volume_chain(&m.id, "root").unwrap();
    let d = knib_core::files::Disk::open_chain(chain, name, &ctl()).unwrap();
    assert_eq!(d.filesystems().len(), 1);
    let to = w.path().join("hostname");
    d.get(None, "/etc/hostname", &to, &ctl()).unwrap();
    assert_eq!(std::fs::read(&to).unwrap(), b"vault-test\n");
    let fetched = vault.bytes_fetched();
    assert!(fetched > 0);
    assert!(fetched * 20 < backup_bytes, "fetched {fetched} bytes of a {backup_bytes}-byte backup");

    // The same through the JSON operation, with the vault as its store.
    let to2 = w.path().join("hostname2");
    let req = json!({"store": p.location(), "backup": m.id, "volume": "root", "path": "/etc/hostname", "to": to2});
    knib_core::api::call("files.get", &req.to_string(), &ctl()).unwrap();
    assert_eq!(std::fs::read(&to2).unwrap(), b"vault-test\n");
}

/// An incremental that overrides a long run of its parent (longer than the
/// gap a read beyond the parent's hashed prefix fills at once): the
/// restore goes on reading the parent past the run, and those reads must
/// not all be fetched a second time for the parent's hash. Restored
/// identical and verified, fetching about the objects' bytes once (each
/// byte of the objects at most 1.3 times), not the parent's rest twice.
#[test]
fn a_restore_past_a_long_overridden_run_fetches_the_parent_about_once() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("overridden-run");
    let w = tempfile::tempdir().unwrap();
    let disk = w.path().join("root.qcow2");
    make_disk(&disk, 128 << 20, &[]);
    qemu_io(&disk, "write -P 0x31 0 96M");
    let store = Store::create(w.path().join("store")).unwrap();
    let disks = vec![DiskSpec { name: "root".into(), path: disk.clone() }];
    store.backup("vm1", &disks, &BackupOptions::default(), &ctl()).unwrap();
    // 16 MiB, twice the gap filled at once, 72 MiB of the parent after it.
    qemu_io(&disk, "write -P 0x32 8M 16M");
    let inc = store.backup("vm1", &disks, &BackupOptions::default(), &ctl()).unwrap();
    let objects: u64 = store.list(None).unwrap().iter().map(|m| m.volumes[0].size).sum();
    Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();

    let vault = Vault::open(&p.location()).unwrap();
    let to = w.path().join("restored.qcow2");
    let done = vault.restore(&inc.id, "root", &to, ImageFormat::Qcow2, true, &ctl()).unwrap();
    assert!(done.verified);
    assert_identical(&to, &disk);
    assert!(
        done.bytes_fetched * 10 <= objects * 13,
        "fetched {} bytes to restore from {objects} bytes of objects",
        done.bytes_fetched
    );
}

#[test]
fn the_json_operations_take_a_vault_as_their_store() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("json");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("data"), "write -P 0x41 0 9M");
    let refs = vm.snapshot_all("b0");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let call = |op: &str, req: Value| -> Value {
        let out = knib_core::api::call(op, &req.to_string(), &ctl()).unwrap_or_else(|e| panic!("{op}: {e}"));
        serde_json::from_str(&out).unwrap()
    };
    let loc = p.location();
    let sent = call("sync", json!({"store": sdir.path(), "to": loc, "parallel_parts": 2}));
    assert_eq!(sent["sent"], json!([m.id]));
    let list = call("list", json!({"store": loc}));
    assert_eq!(list[0]["id"], json!(m.id));
    let file = list[0]["volumes"][0]["file"].as_str().unwrap().to_string();
    assert!(file.starts_with(&format!("{loc}/vms/vm1/{}/", m.id)), "{file}");
    let shown = call("show", json!({"store": loc, "backup": m.id}));
    assert_eq!(shown, list[0]);
    let w = tempfile::tempdir().unwrap();
    let to = w.path().join("data.raw");
    call("restore", json!({"store": loc, "backup": m.id, "volume": "data", "to": to, "format": "raw"}));
    assert_identical(&to, &refs["data"]);
    let v = call("verify", json!({"store": loc}));
    assert_eq!(v[0]["ok"], json!(true), "{v}");
    let d = call("delete", json!({"store": loc, "backup": m.id}));
    assert_eq!(d["expunged"], json!([m.id]));
    assert!(p.keys().is_empty(), "{:?}", p.keys());
    // What needs a store directory says so.
    for op in ["compress", "hash"] {
        let e = knib_core::api::call(op, &json!({"store": loc, "backup": m.id}).to_string(), &ctl()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{op}: {e}");
        assert!(e.message.contains("is a vault"), "{op}: {e}");
    }
    // A bad `to` names the field.
    let e =
        knib_core::api::call("sync", &json!({"store": sdir.path(), "to": "/tmp/x"}).to_string(), &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("field `to`"), "{e}");
}

/// A delete that would expunge waits for an unfinished upload of the VM (a
/// backup being sent may be a child of the one deleted: its parent is not
/// known until its manifest is written); a sync cleans up an interrupted
/// one, and the delete then goes through.
#[test]
fn a_delete_waits_for_an_unfinished_upload_of_the_vm() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("delete-busy");
    let head = taken[2].0.clone();
    for (what, rel) in [
        ("has objects but no manifest", "vms/vm1/20990101-000000000-beef/root.qcow2".to_string()),
        ("upload record", "uploads/vm1/20990101-000000000-beef/root.qcow2.json".to_string()),
    ] {
        p.put(&rel, b"{}".to_vec());
        let before = p.keys();
        let e = vault.delete(&head).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{e}");
        assert!(e.message.contains(what) && e.message.contains(&head), "{e}");
        assert_eq!(p.keys(), before, "a refused delete removed something");
        p.delete(&rel);
    }
    // Empty "folder" markers (an S3 console's) are no upload: they do not
    // hold the delete below back. Before, every delete of the VM was busy
    // for good (no sync can remove them).
    p.put_folder_marker("vms/vm1/notes");
    p.put_folder_marker(&format!("vms/vm1/{head}"));
    // An interrupted upload (objects, no manifest): the next sync removes it.
    p.put("vms/vm1/20990101-000000000-beef/root.qcow2", b"partial".to_vec());
    assert_eq!(vault.delete(&head).unwrap_err().kind, ErrorKind::Busy);
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(p.keys().keys().all(|k| !k.contains("beef")), "{:?}", p.keys());
    let d = vault.delete(&head).unwrap();
    assert_eq!(d.expunged, vec![head.clone()]);
}

/// An object lost from the vault (removed by hand, or cut short) while
/// its backup's manifest stays: the next sync sends it again from the
/// store, checked against the vault's hash, and says so; every backup then
/// restores as taken. A store without that backup cannot: the sync says
/// which objects are lost, and changes nothing.
#[test]
fn an_object_lost_from_the_vault_is_sent_again_by_the_next_sync() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("lost");
    let ids: Vec<String> = taken.iter().map(|(id, _)| id.clone()).collect();
    let gone = format!("vms/vm1/{}/root.qcow2", ids[0]);
    let short = format!("vms/vm1/{}/data.qcow2", ids[2]);
    let whole = p.keys();
    p.delete(&gone);
    p.put(&short, b"cut short".to_vec());
    // From a store that lacks those backups: said, nothing sent.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::create(other_dir.path()).unwrap();
    let opts = SyncOptions { vm: Some("vm1".into()), ..SyncOptions::default() };
    let r = vault.sync_from(&other, &opts, &ctl()).unwrap();
    assert!(r.repaired.is_empty() && r.sent.is_empty() && r.bytes_sent == 0, "{r:?}");
    assert_eq!(r.damaged.len(), 2, "{r:?}");
    assert!(r.unmended.is_empty(), "the other store has none of those backups: {r:?}");
    assert!(
        r.damaged[0].starts_with(&format!("backup {}: object {gone} is gone, and this store has no backup", ids[0])),
        "{r:?}"
    );
    assert!(
        r.damaged[1].contains(&format!("object {short} is 9 bytes long, its manifest says {}", whole[&short])),
        "{r:?}"
    );
    assert!(!p.keys().contains_key(&gone));
    // From the store that took them: sent again, and nothing else.
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.repaired, vec![ids[0].clone(), ids[2].clone()], "{r:?}");
    assert!(r.sent.is_empty() && r.damaged.is_empty(), "{r:?}");
    assert_eq!(r.bytes_sent, whole[&gone] + whole[&short]);
    assert_eq!(p.keys(), whole, "the vault holds what it held, and no upload record");
    assert_verified_and_restored(&vault, &taken);
    let again = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(again.repaired.is_empty() && again.bytes_sent == 0, "{again:?}");
}

/// An object of a backup being sent that is gone when its manifest would be
/// written (another writer's cleanup of unfinished backups of the same VM
/// name removed it): the backup is not published, the sync fails saying
/// so. Before, the manifest named an object that was not there, and the
/// sync answered success.
#[test]
fn a_backup_whose_object_vanished_before_publishing_is_not_published() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm, _sdir, store, taken: _, vault } = Synced::new("vanished");
    qemu_io(vm.path("root"), "write -P 0x44 2M 1M");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    let object = format!("vms/vm1/{}/root.qcow2", m.id);
    let at = format!("publishing backup {} in vault", m.id);
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(3));
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(120)), "no pause at {at}");
            p.delete(&object);
        });
        vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("backup {} is not published", m.id)), "{e}");
    assert!(!p.keys().contains_key(&format!("vms/vm1/{}/manifest.json", m.id)), "the manifest was written");
    // The next sync sends it whole.
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(p.keys().contains_key(&object));
    assert!(vault.verify(Some(&m.id), &ctl()).unwrap().reports.iter().all(|r| r.ok));
}

/// A sync job that finds objects of the vault lost which its store has the
/// backup of but cannot send again (this store's file of it is not the one
/// sent: another hash, as after a compression) fails at once, naming it:
/// it was marked done, and the vault could not restore that backup. (The
/// same damage to a backup this store does not have only goes in the
/// report's `damaged`: see
/// an_object_lost_from_the_vault_is_sent_again_by_the_next_sync.)
#[test]
fn a_sync_job_that_cannot_repair_the_vault_fails_naming_the_damage() {
    use knib_core::catalog::jobs::{run_jobs, JobState, RunOptions};
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("unrepaired");
    let first = &taken[0].0;
    let gone = format!("vms/vm1/{first}/root.qcow2");
    p.delete(&gone);
    // This store's file of it is not the one sent (its manifest says
    // another hash, as after a compression).
    let manifest = store.root().join(format!("vms/vm1/{first}/manifest.json"));
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for v in m["volumes"].as_array_mut().unwrap() {
        v["hash"] = "0".repeat(32).into();
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let settings = json!({"schema": 1, "sync.vault": vault.location(), "sync.max_retries": 3});
    std::fs::write(store.root().join("knib.json"), settings.to_string()).unwrap();
    let job = store.queue_sync("vm1").unwrap();
    let opts = RunOptions { sync: Some(knib_core::vault::sync_runner()), no_wait: true, ..RunOptions::default() };
    let summary = run_jobs(&store, &opts).unwrap();
    let j = store.job(&job.id).unwrap();
    assert_eq!(summary.failed, vec![job.id.clone()], "{j:?}");
    assert_eq!(j.state, JobState::Failed, "failed at once, not retried: {j:?}");
    let why = j.last_error.clone().unwrap();
    assert!(why.contains(&format!("cannot be restored and this store could not mend: {first}")), "{why}");
    // The same sync, by hand: the damage is in the report.
    let r = vault.sync_from(&store, &SyncOptions { vm: Some("vm1".into()), ..SyncOptions::default() }, &ctl()).unwrap();
    assert_eq!(r.unmended, std::slice::from_ref(first), "{r:?}");
    let said = format!("object {gone} is gone, and this store's file of it is not the one sent");
    assert!(r.damaged[0].contains(&said), "{r:?}");
}

/// An object whose bytes changed in the vault, and this store's file of
/// it damaged too (its manifest's hash kept): a checking sync hashes the
/// file as it sends it, does not complete its upload, and leaves the
/// vault's object as it is,
/// reporting both (before, it sent the damaged file over the object, then
/// found its hash wrong and deleted the object: the vault's only copy was
/// gone).
#[test]
fn a_checking_sync_never_replaces_a_damaged_object_by_a_damaged_file() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("both");
    let id = taken[1].0.clone();
    let changed = format!("vms/vm1/{id}/root.qcow2");
    let mut bad = p.get(&changed);
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    p.put(&changed, bad.clone());
    let file = store.root().join(&changed);
    let mut here = std::fs::read(&file).unwrap();
    here[at / 2] ^= 0x21;
    std::fs::write(&file, &here).unwrap();
    let opts = SyncOptions { vm: Some("vm1".into()), check: true, ..SyncOptions::default() };
    let r = vault.sync_from(&store, &opts, &ctl()).unwrap();
    assert_eq!(r.unmended, std::slice::from_ref(&id), "{r:?}");
    assert!(r.repaired.is_empty() && r.bytes_sent == 0, "{r:?}");
    let said = format!("this store's file of it, {}, is not the one sent either (hash ", file.display());
    assert!(r.damaged.len() == 1 && r.damaged[0].contains(&said), "{r:?}");
    assert_eq!(p.get(&changed), bad, "the vault's object is left as it is");
}

/// An object whose bytes changed in the vault but not its length (a
/// byte flipped): a plain sync, which only lists the objects, cannot see
/// it; a sync with `check` reads every object, finds it by its hash, and
/// sends it again from the store that has the backup (a store without it
/// reports it damaged). Afterwards the vault verifies and restores exact.
#[test]
fn an_object_whose_bytes_changed_is_found_by_a_checking_sync_and_sent_again() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("changed");
    let ids: Vec<String> = taken.iter().map(|(id, _)| id.clone()).collect();
    let changed = format!("vms/vm1/{}/root.qcow2", ids[1]);
    let good = p.get(&changed);
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    p.put(&changed, bad);
    let whole = p.keys();
    let objects: u64 = whole.iter().filter(|(k, _)| k.ends_with(".qcow2")).map(|(_, n)| n).sum();
    let checking = SyncOptions { check: true, ..SyncOptions::default() };

    let plain = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(plain.repaired.is_empty() && plain.damaged.is_empty() && plain.bytes_checked == 0, "{plain:?}");
    assert_eq!(plain.present, ids, "{plain:?}");

    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::create(other_dir.path()).unwrap();
    let r = vault.sync_from(&other, &SyncOptions { vm: Some("vm1".into()), ..checking.clone() }, &ctl()).unwrap();
    assert_eq!(r.bytes_checked, objects, "{r:?}");
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    assert!(
        r.damaged[0].starts_with(&format!("backup {}: object {changed} has hash ", ids[1]))
            && r.damaged[0].contains("(its bytes changed), and this store has no backup"),
        "{r:?}"
    );
    assert!(r.repaired.is_empty() && r.bytes_sent == 0, "{r:?}");

    let r = vault.sync_from(&store, &checking, &ctl()).unwrap();
    assert_eq!(r.repaired, vec![ids[1].clone()], "{r:?}");
    assert!(r.damaged.is_empty() && r.sent.is_empty(), "{r:?}");
    assert_eq!(r.bytes_sent, good.len() as u64);
    assert_eq!(r.bytes_checked, objects);
    assert!(p.get(&changed) == good, "the object was not sent again as it was");
    assert_eq!(p.keys(), whole, "the vault holds what it held, and no upload record");
    assert_verified_and_restored(&vault, &taken);
    // Progress is told per object checked, each up to 100%.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    let watched = ctl().with_progress(std::sync::Arc::new(move |p: &knib_core::Progress| {
        sink.lock().unwrap().push((p.step.clone(), p.percent));
    }));
    let again = vault.sync_from(&store, &checking, &watched).unwrap();
    assert!(again.repaired.is_empty() && again.bytes_sent == 0 && again.bytes_checked == objects, "{again:?}");
    let done: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(step, pct)| step.starts_with("checking s3://") && *pct == 100.0)
        .map(|(step, _)| step.clone())
        .collect();
    assert_eq!(done.len(), whole.keys().filter(|k| k.ends_with(".qcow2")).count(), "{done:?}");
    assert!(done.iter().any(|s| s.ends_with(&changed)), "{done:?}");
}

/// An object someone else put under a key with an empty segment
/// (`vms//x`, `vms/vm1//x`), which the S3 client cannot name, stops every
/// listing of that part of the vault: the error is `corrupt`, names the
/// key and says how to remove it; once it is gone, all works again.
#[test]
fn an_object_key_with_an_empty_segment_is_named_with_how_to_remove_it() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store: _store, taken, vault } = Synced::new("empty-segment");
    for (rel, listed) in [("vms//x", "vms//"), ("vms/vm1//x", "vms/vm1//")] {
        p.raw("PUT", rel);
        let e = match Vault::open(&p.location()) {
            Err(e) => e,
            Ok(v) => v.list(None).unwrap_err(),
        };
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        let key = format!("{}/{listed}", p.prefix);
        assert!(e.message.contains(&key), "names the key {key}: {e}");
        assert!(e.message.contains("remove it (every object whose key starts so) with another S3 client"), "{e}");
        p.raw("DELETE", rel);
    }
    let listed: Vec<String> = vault.list(None).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(listed, taken.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>());
}

/// An object someone else put under a key with characters knib's S3
/// client encodes when it names a key (`~`), in knib's part of the vault
/// (an unfinished upload's place): a delete or a sync, which would list
/// it and could never remove it under that name, fails `corrupt` naming
/// the key and how to remove it (before, a delete was `busy` for good,
/// advising a sync, whose removal went to another key and removed
/// nothing); once it is gone, both work.
#[test]
fn an_object_key_knib_cannot_name_as_it_is_is_named_with_how_to_remove_it() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("odd-key");
    let odd = "vms/vm1/20990101-000000000-0001/disk~1";
    p.raw("PUT", odd);
    let shown = format!("{}/{odd}", p.prefix);
    let sync = || vault.sync_from(&store, &SyncOptions::default(), &ctl());
    for e in [vault.delete(&taken[2].0).map(drop).unwrap_err(), sync().map(drop).unwrap_err()] {
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains(&shown), "names the key {shown}: {e}");
        assert!(e.message.contains("knib can neither read nor remove it"), "{e}");
        assert!(e.message.contains("remove it with another S3 client"), "{e}");
    }
    p.raw("DELETE", odd);
    sync().unwrap();
    assert_eq!(vault.delete(&taken[2].0).unwrap().expunged, vec![taken[2].0.clone()]);
}

/// A backup whose parent was deleted from the vault while it was sent is
/// not published (it would be a child without a parent); the next sync
/// sends the parent again, then the child.
#[test]
fn a_backup_whose_parent_goes_while_it_is_sent_is_not_published() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm, _sdir, store, taken, vault } = Synced::new("parent-gone");
    qemu_io(vm.path("root"), "write -P 0x77 2M 64k");
    let m4 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    assert_eq!(m4.parent.as_deref(), Some(taken[2].0.as_str()));
    // While m4's objects are sent, its parent's manifest goes (a delete
    // elsewhere that raced with this sync).
    knib_core::crashpoint::pause_before(&format!("publishing backup {}", m4.id), std::time::Duration::from_secs(2));
    let parent_manifest = format!("vms/vm1/{}/manifest.json", taken[2].0);
    let remover = {
        let rel = parent_manifest.clone();
        let child = format!("vms/vm1/{}/", m4.id);
        // A second handle on the same prefix, never dropped (dropping empties it).
        let prefix = std::mem::ManuallyDrop::new(s3::Prefix { prefix: p.prefix.clone() });
        std::thread::spawn(move || {
            // Once the sync has read what the vault has and sends m4.
            while !prefix.keys().keys().any(|k| k.starts_with(&child)) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            prefix.delete(&rel);
        })
    };
    let e = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err();
    remover.join().unwrap();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains(&m4.id) && e.message.contains(&taken[2].0), "{e}");
    assert!(vault.show(&m4.id).is_err(), "published without its parent");
    // The next sync sends the parent again, then the child: all restore.
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.sent, vec![taken[2].0.clone(), m4.id.clone()]);
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("m4.raw");
    vault.restore(&m4.id, "root", &to, ImageFormat::Raw, true, &ctl()).unwrap();
    assert_identical(&to, vm.path("root"));
}

/// A backup whose manifest in the vault cannot be read is not sent again
/// over it (its objects overwritten, the sync reporting it sent): the sync
/// fails naming the manifest, and the vault is left as it was.
#[test]
fn a_sync_does_not_send_over_an_unreadable_manifest() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken, vault } = Synced::new("unreadable");
    let rel = format!("vms/vm1/{}/manifest.json", taken[1].0);
    p.put(&rel, b"{\"schema\": 99}".to_vec());
    let before: BTreeMap<String, Vec<u8>> = p.keys().into_keys().map(|k| (k.clone(), p.get(&k))).collect();
    let e = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&rel), "{e}");
    let after: BTreeMap<String, Vec<u8>> = p.keys().into_keys().map(|k| (k.clone(), p.get(&k))).collect();
    assert!(before == after, "the vault changed");
    // A verify of every backup does not skip it: it is reported, failed,
    // under its id.
    let v = vault.verify(None, &ctl()).unwrap();
    let bad = v.reports.iter().find(|r| r.id == taken[1].0).unwrap_or_else(|| panic!("not reported: {v:?}"));
    assert!(!bad.ok && bad.files_checked == 0, "{bad:?}");
    assert!(
        bad.problems.len() == 1 && bad.problems[0].starts_with("VM vm1: ") && bad.problems[0].contains(&rel),
        "{bad:?}"
    );
    assert!(v.reports.iter().any(|r| r.id == taken[0].0 && r.ok), "{v:?}");
}

/// A backup file cannot steer a sync out of the store: one swapped for a
/// link to a file outside it between the chain's check and its upload is
/// refused, not read (before, the upload opened it by name and read the
/// outside file); a sparse one grown past what an S3 object may hold (5
/// TiB) is refused before any of it is read (before, it was read in parts
/// of over 500 MiB). Put back, the backup is sent, verifies and restores.
#[test]
fn a_backup_file_swapped_or_grown_in_the_store_is_not_sent() {
    if !s3::setup() {
        return;
    }
    let Synced { p: _p, vm, _sdir, store, mut taken, vault } = Synced::new("swapped");
    let refs = vm.snapshot_all("b3");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    taken.push((m.id.clone(), refs));
    let files: Vec<PathBuf> = ["root", "data"].iter().map(|v| store.volume_file(&m, v).unwrap()).collect();
    let in_vault = |id: &str| vault.list(None).unwrap().iter().any(|b| b.id == id);

    // Grown: a sparse file of 5 TiB and a byte, its qcow2 header intact.
    let len = std::fs::metadata(&files[0]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap().set_len((5 << 40) + 1).unwrap();
    let e = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message.starts_with(&format!("backup file {} is 5497558138881 bytes long, more than", files[0].display())),
        "{e}"
    );
    assert!(!in_vault(&m.id));
    std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap().set_len(len).unwrap();

    // Swapped while the sync runs: each file of the backup in turn.
    let outside = tempfile::tempdir().unwrap();
    for f in &files {
        let secret = outside.path().join("secret.qcow2");
        std::fs::copy(f, &secret).unwrap();
        let at = format!("opening {} to send it", f.display());
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
        let kept = f.with_extension("kept");
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                // While the sync waits there: the chain was checked, the
                // file is about to be opened for its upload.
                assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(120)), "no pause at {at}");
                std::fs::rename(f, &kept).unwrap();
                std::os::unix::fs::symlink(&secret, f).unwrap();
            });
            vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err()
        });
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert_eq!(
            e.message,
            format!(
                "backup file being sent {} is, or passes through, a symbolic link: knib follows no link inside a store",
                f.display()
            )
        );
        assert!(!in_vault(&m.id));
        std::fs::remove_file(f).unwrap();
        std::fs::rename(&kept, f).unwrap();
    }
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.sent, vec![m.id.clone()], "{r:?}");
    assert_verified_and_restored(&vault, &taken);
}

/// A backup file whose bytes are not the ones its manifest records (a byte
/// flipped in the store) is not sent, whether it goes in one put or in
/// parts: its upload is never completed, so an object at its key (here
/// the good bytes, put there while the sync opens the file, as another
/// sync of the backup would) stays as it is. Before, the damaged file was sent over that
/// object, then found wrong and its key deleted: the vault lost the good
/// copy. Once the file is mended, the next sync sends the backup.
#[test]
fn a_backup_file_changed_since_it_was_written_is_not_sent_over_any_object() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm, _sdir, store, mut taken, vault } = Synced::new("changed");
    qemu_io(vm.path("root"), "write -P 0x45 8M 8M");
    qemu_io(vm.path("data"), "write -P 0x46 0 64k");
    let refs = vm.snapshot_all("b3");
    let m = store.backup("vm1", &vm.disks, &BackupOptions::default(), &ctl()).unwrap();
    taken.push((m.id.clone(), refs));
    for (volume, parts) in [("root", true), ("data", false)] {
        let file = store.volume_file(&m, volume).unwrap();
        let good = std::fs::read(&file).unwrap();
        assert_eq!(good.len() > knib_core::vault::DEFAULT_PART_SIZE, parts, "{volume} is sent in parts or not");
        let key = format!("vms/vm1/{}/{volume}.qcow2", m.id);
        let mut bad = good.clone();
        bad[good.len() * 3 / 4] ^= 0x08;
        std::fs::write(&file, &bad).unwrap();
        // The good bytes land at the key while the sync opens the file
        // (after it removed what unfinished syncs left).
        let at = format!("opening {} to send it", file.display());
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(120)), "no pause at {at}");
                p.put(&key, good.clone());
            });
            vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err()
        });
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        let said = format!("backup {}: file {} has hash ", m.id, file.display());
        assert!(e.message.starts_with(&said), "{e}");
        assert!(e.message.ends_with(": it changed since it was written; not sent"), "{e}");
        assert_eq!(p.get(&key), good, "the object at {key} is left as it was");
        assert!(!p.keys().keys().any(|k| k.starts_with("uploads/")), "an upload record is left: {:?}", p.keys());
        assert!(!vault.list(None).unwrap().iter().any(|b| b.id == m.id));
        std::fs::write(&file, &good).unwrap();
    }
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.sent, vec![m.id.clone()], "{r:?}");
    assert_verified_and_restored(&vault, &taken);
}

/// An object under the VM's upload records too large to be one is junk: the
/// next sync removes it (it blocked every sync of the VM).
#[test]
fn an_oversized_upload_record_is_removed_by_the_next_sync() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store, taken: _, vault } = Synced::new("big-record");
    p.put("uploads/vm1/junk.json", vec![b' '; 70 << 10]);
    vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert!(!p.keys().contains_key("uploads/vm1/junk.json"), "{:?}", p.keys());
}

/// A record of a quick restore served from the vault, as knib writes it.
fn serving_record(backup: &str, host: &str, domain: &str, dir: &str) -> (String, Vec<u8>) {
    let rel = format!("serving/{backup}/{host}/{domain}.json");
    let rec = json!({"schema": 1, "backup": backup, "host": host, "domain": domain, "dir": dir,
        "created": "2026-12-05T03:00:00.000Z"});
    (rel, serde_json::to_vec(&rec).unwrap())
}

#[test]
fn a_backup_a_quick_restore_serves_is_not_deleted_from_any_host() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store: _store, taken, vault } = Synced::new("delete-served");
    let (mid, head) = (taken[1].0.clone(), taken[2].0.clone());
    // Served on another host: busy, naming the domain and the host.
    let (rel, text) = serving_record(&head, "other-host", "dom1", "/var/lib/x/.knib-vault-dom1");
    p.put(&rel, text);
    let before = p.keys();
    let e = vault.delete(&head).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.contains("domain dom1 on host other-host"), "{e}");
    assert_eq!(p.keys(), before, "a refused delete changed the vault");
    // A record that is not what knib writes is corrupt, naming it.
    for bad in [
        json!({"schema": 1, "backup": mid, "host": "other-host", "domain": "dom1", "dir": "/x", "created": ""}),
        json!({"schema": 1, "backup": head, "host": "../x", "domain": "dom1", "dir": "/x", "created": ""}),
        json!({"schema": 1, "backup": head, "host": "other-host", "domain": "dom1", "dir": "/x", "created": "", "evil": 1}),
    ] {
        p.put(&rel, serde_json::to_vec(&bad).unwrap());
        let e = vault.delete(&head).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{bad}: {e}");
        assert!(e.message.contains(&rel), "{bad}: {e}");
    }
    p.delete(&rel);
    // A record of this host whose directory is gone is stale: removed by
    // the delete, which goes through.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let (stale, text) = serving_record(&mid, &host, "dom2", "/nonexistent/.knib-vault-dom2");
    p.put(&stale, text);
    // The middle backup has a child: it is only marked removed.
    let d = vault.delete(&mid).unwrap();
    assert_eq!(d.marked_removed, vec![mid.clone()]);
    // Served again (on another host), the removed middle backup is kept
    // when the delete of its last child cascades to it.
    let (rel2, text) = serving_record(&mid, "other-host", "dom3", "/x");
    p.put(&rel2, text);
    let d = vault.delete(&head).unwrap();
    assert_eq!(d.expunged, vec![head.clone()]);
    assert!(p.keys().keys().any(|k| k == &format!("vms/vm1/{mid}/manifest.json")), "{:?}", p.keys());
    assert!(!p.keys().contains_key(&stale), "the stale record of this host is left");
    p.delete(&rel2);
}

#[test]
fn a_quick_restore_recorded_while_a_delete_runs_keeps_the_backup() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store: _store, taken, vault: _vault } = Synced::new("delete-served-race");
    let head = taken[2].0.clone();
    let manifest = format!("vms/vm1/{head}/manifest.json");
    let text = p.get(&manifest);
    // The delete stops once it removed the manifest, before it looks for
    // records again; a quick restore records itself meanwhile.
    knib_core::crashpoint::pause_before(
        &format!("delete of {head} from the vault: manifest removed"),
        std::time::Duration::from_secs(3),
    );
    let (loc, id) = (p.location(), head.clone());
    let deleting = std::thread::spawn(move || Vault::open(&loc).unwrap().delete(&id));
    let t = std::time::Instant::now();
    while p.keys().contains_key(&manifest) {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "the delete never removed the manifest");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (rel, rec) = serving_record(&head, "other-host", "dom1", "/x");
    p.put(&rel, rec);
    let e = deleting.join().unwrap().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    // The manifest is back as it was, and every object is there.
    assert_eq!(p.get(&manifest), text);
    assert!(p.keys().keys().any(|k| k.starts_with(&format!("vms/vm1/{head}/")) && k.ends_with(".qcow2")));
    p.delete(&rel);
}

/// What a delete killed part way leaves (objects of a backup without its
/// manifest) holds the VM's deletes back until a sync of the VM removes it,
/// as the busy error says: also from a store that has no backup of the VM
/// (the site's store is gone). Before, that sync returned at once.
#[test]
fn a_sync_of_a_vm_the_store_lacks_removes_what_a_killed_delete_left() {
    if !s3::setup() {
        return;
    }
    let Synced { p, vm: _vm, _sdir, store: _store, taken, vault } = Synced::new("delete-leftovers");
    let head = taken[2].0.clone();
    let leftover = "vms/vm1/20990101-000000000-dead/root.qcow2";
    p.put(leftover, b"half deleted".to_vec());
    let e = vault.delete(&head).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = Store::create(empty_dir.path()).unwrap();
    std::fs::create_dir(empty_dir.path().join("vms")).unwrap();
    let empty = Store::open(empty.root()).unwrap();
    // Every VM of an empty store: nothing to do, nothing touched.
    vault.sync_from(&empty, &SyncOptions::default(), &ctl()).unwrap();
    assert!(p.keys().contains_key(leftover));
    // The VM asked for: its leftovers go.
    let one = SyncOptions { vm: Some("vm1".into()), ..SyncOptions::default() };
    vault.sync_from(&empty, &one, &ctl()).unwrap();
    assert!(!p.keys().contains_key(leftover), "{:?}", p.keys());
    let d = vault.delete(&head).unwrap();
    assert_eq!(d.expunged, vec![head.clone()]);
    // The VM's other backups are untouched.
    assert!(p.keys().keys().any(|k| k.starts_with(&format!("vms/vm1/{}/", taken[1].0))));
}

/// A sync of a whole store goes on past a VM that is busy (a backup of it
/// holds its lock), one whose backup file cannot be sent (grown past what
/// S3 takes: invalid) and one whose backup file is gone from the store:
/// the fourth VM's backup is sent, and the sync fails with the gravest
/// kind (invalid input before not found before busy), naming the three
/// VMs left and what was sent. The next sync, the VMs free and mended,
/// sends the rest, and every backup restores from the vault identical.
/// Before, the first VM's error ended the sync: no VM after it was sent.
#[test]
fn a_sync_of_the_store_goes_on_past_a_vm_it_cannot_send_and_names_it() {
    if !s3::setup() {
        return;
    }
    let p = s3::Prefix::new("vm-left");
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let mut taken = Vec::new();
    let mut vms = Vec::new();
    for (i, vm) in ["a-busy", "b-grown", "c-gone", "d-free"].into_iter().enumerate() {
        let disks = TestDisks::two();
        qemu_io(disks.path("root"), &format!("write -P 0x{:02x} {i}M 2M", 0x31 + i));
        let refs = disks.snapshot_all("b0");
        let m = store.backup(vm, &disks.disks, &BackupOptions::default(), &ctl()).unwrap();
        taken.push((m.id.clone(), refs));
        vms.push((disks, m));
    }
    let vault = Vault::open(&p.location()).unwrap();
    let grown = store.volume_file(&vms[1].1, "root").unwrap();
    let len = std::fs::metadata(&grown).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&grown).unwrap().set_len((5 << 40) + 1).unwrap();
    let gone = store.volume_file(&vms[2].1, "data").unwrap();
    let kept = gone.with_extension("kept");
    std::fs::rename(&gone, &kept).unwrap();
    let lock = store.lock_vm("a-busy", "a test's backup").unwrap();
    let e = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let head =
        format!("the sync to {} left 3 of the store's 4 VMs unsent: VM a-busy: busy: VM a-busy is busy", p.location());
    assert!(e.message.starts_with(&head), "{e}");
    assert!(
        e.message.contains(&format!("; VM b-grown: invalid input: backup file {} is 5497558138881", grown.display())),
        "{e}"
    );
    assert!(e.message.contains("; VM c-gone: "), "{e}");
    assert!(e.message.ends_with(&format!("; sent: {}; 0 present", taken[3].0)), "{e}");
    let listed: Vec<String> = vault.list(None).unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(listed, vec![taken[3].0.clone()]);

    drop(lock);
    std::fs::OpenOptions::new().write(true).open(&grown).unwrap().set_len(len).unwrap();
    std::fs::rename(&kept, &gone).unwrap();
    let r = vault.sync_from(&store, &SyncOptions::default(), &ctl()).unwrap();
    assert_eq!(r.sent, taken[..3].iter().map(|t| t.0.clone()).collect::<Vec<_>>(), "{r:?}");
    assert_eq!(r.present, vec![taken[3].0.clone()], "{r:?}");
    assert_verified_and_restored(&vault, &taken);
    // One VM asked for: its error as it is, nothing else tried.
    let lock = store.lock_vm("d-free", "a test's backup").unwrap();
    let one = SyncOptions { vm: Some("d-free".into()), ..SyncOptions::default() };
    let e = vault.sync_from(&store, &one, &ctl()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    assert!(e.message.starts_with("VM d-free is busy"), "{e}");
    drop(lock);
}
