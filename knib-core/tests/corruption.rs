//! Corruption never goes unnoticed (issue 13, section 4): backup files
//! damaged on the store (a byte flipped in a guest data cluster, in an L2
//! table, the file cut short), in every layer of a chain, plain, compressed
//! by a compression and compressed as copied, through restore (native and
//! qemu-img data paths), compress, the compression job and verify; and
//! compress racing verify.

mod common;
#[path = "common/gen.rs"]
mod gen;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::disk::*;
use gen::Rng;
use knib_core::catalog::{BackupOptions, Manifest, Store};
use knib_core::engine::CompressOptions;
use knib_core::qcow2::{ClusterState, Qcow2Image};
use knib_core::qemu_img::{CompressionLibrary, ImageFormat};
use knib_core::{Control, ErrorKind};

/// How the backups of a store were made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    /// Plain qcow2 files.
    Plain,
    /// Compressed afterwards by `Store::compress`.
    CompressedLater,
    /// Compressed as they were copied.
    CompressedAsCopied,
}

/// A store with a chain of three backups of two disks (full, two
/// incrementals), every file's hash recorded, and the reference images of
/// each backup.
struct Built {
    _disks: TestDisks,
    dir: tempfile::TempDir,
    ids: Vec<String>,
    refs: Vec<BTreeMap<String, PathBuf>>,
}

/// A guest write with qemu-io. Retried a few times when the disk's base is
/// still locked: with tests running in parallel threads, a process forked
/// by another test while the native merge held its QEMU-style locks on the
/// base may hold them until it execs (seen under load).
fn guest_write(disk: &Path, cmd: &str) {
    for attempt in 0..10 {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(disk)
            .output()
            .expect("qemu-io runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !text.contains("error") && !text.contains("failed") {
            return;
        }
        assert!(text.contains("Failed to get shared") && attempt < 9, "qemu-io {cmd}: {text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn build(seed: u64, variant: Variant) -> Built {
    let disks = TestDisks::two();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(dir.path().join("store")).expect("store");
    let mut rng = Rng::new(seed);
    let mut ids = Vec::new();
    let mut refs = Vec::new();
    for round in 0..3 {
        for d in ["root", "data"] {
            let size = if d == "root" { 64u64 << 20 } else { 32 << 20 };
            for _ in 0..4 {
                let len = (1 + rng.below(16)) * 64 * 1024;
                let off = rng.below((size - len) / 65536) * 65536;
                // Half the writes compress well (a pattern), half do not.
                let cmd = if rng.below(2) == 0 {
                    format!("write -P 0x{:02x} {off} {len}", 1 + rng.below(254))
                } else {
                    let src = disks.dir.path().join(format!("rand-{round}-{d}.bin"));
                    std::fs::write(&src, rng.bytes(len as usize)).expect("source");
                    format!("write -s {} {off} {len}", src.display())
                };
                guest_write(disks.path(d), &cmd);
            }
        }
        refs.push(disks.snapshot_all(&format!("r{round}")));
        let opts = BackupOptions {
            compress: (variant == Variant::CompressedAsCopied).then_some(CompressionLibrary::Zstd),
            ..Default::default()
        };
        let m = store.backup("vm1", &disks.disks, &opts, &Control::new()).expect("backup");
        if variant == Variant::CompressedLater {
            store.compress(&m.id, &CompressOptions::default(), &Control::new()).expect("compress");
        }
        ids.push(m.id);
    }
    // Every file gets its hash (a compression of the code before this
    // change dropped it; the first clean verify records it).
    for r in store.verify(None, &Control::new()).expect("verify") {
        assert!(r.ok, "{r:?}");
    }
    for id in &ids {
        let m = store.show(id).expect("show");
        assert!(m.volumes.iter().all(|v| v.hash.is_some()), "{m:?}");
    }
    Built { _disks: disks, dir, ids, refs }
}

/// A copy of the built store, to damage.
fn copy_store(b: &Built, to: &Path) -> Store {
    let st = std::process::Command::new("cp").arg("-a").arg(b.dir.path().join("store")).arg(to).status().expect("cp");
    assert!(st.success());
    Store::open(to).expect("open copy")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Damage {
    /// A byte flipped inside a guest data cluster of the file.
    DataByte,
    /// A byte flipped in an entry of an L2 table.
    L2Entry,
    /// The file cut short.
    Truncate,
}

const DAMAGES: [Damage; 3] = [Damage::DataByte, Damage::L2Entry, Damage::Truncate];

fn flip(file: &Path, at: u64, mask: u8) {
    let f = OpenOptions::new().read(true).write(true).open(file).expect("open to damage");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= mask;
    f.write_all_at(&b, at).expect("write byte");
}

/// Damage `file` as `damage` says, at a place drawn from `rng`; returns
/// what was done (for failure messages).
fn damage(file: &Path, d: Damage, rng: &mut Rng) -> String {
    let len = std::fs::metadata(file).expect("size").len();
    let mut img = Qcow2Image::open(file).expect("open");
    let cs = img.cluster_size();
    let mut data = Vec::new();
    for i in 0..img.guest_clusters() {
        match img.cluster_state(i).expect("lookup") {
            ClusterState::Data { host_offset } => data.push((host_offset, cs)),
            ClusterState::Compressed { host_offset, compressed_len } => {
                // The stored length is rounded up to sectors: stay in the
                // first bytes, which are surely the cluster's.
                data.push((host_offset, compressed_len.min(16)))
            }
            _ => {}
        }
    }
    assert!(!data.is_empty(), "{} has no data cluster", file.display());
    match d {
        Damage::DataByte => {
            let (host, span) = data[rng.below(data.len() as u64) as usize];
            let at = host + rng.below(span);
            flip(file, at, 1 << rng.below(8));
            format!("byte {at} of a data cluster flipped")
        }
        Damage::L2Entry => {
            let h = img.header().clone();
            let f = std::fs::File::open(file).expect("open");
            let mut e = [0u8; 8];
            f.read_exact_at(&mut e, h.l1_table_offset).expect("L1");
            let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
            assert!(l2 != 0, "{}: the first L1 entry is empty", file.display());
            let mut used = Vec::new();
            for k in 0..cs / 8 {
                f.read_exact_at(&mut e, l2 + k * 8).expect("L2");
                if u64::from_be_bytes(e) != 0 {
                    used.push(k);
                }
            }
            let k = used[rng.below(used.len() as u64) as usize];
            // A bit of the entry's offset (bytes 4 to 6 of the big-endian
            // entry: offsets from 64 KiB to 4 GiB).
            let at = l2 + k * 8 + 4 + rng.below(3);
            flip(file, at, 1 << rng.below(8));
            format!("byte {at} of L2 entry {k} flipped")
        }
        Damage::Truncate => {
            let to = len / 2 + rng.below(len / 2);
            let f = OpenOptions::new().write(true).open(file).expect("open");
            f.set_len(to).expect("truncate");
            format!("cut from {len} to {to} bytes")
        }
    }
}

/// Every file under `dir` with its xxh3-128: to show nothing changed.
fn contents(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for (p, _) in tree(dir) {
        let full = dir.join(&p);
        if full.is_file() {
            let h = knib_core::engine::hash_files(std::slice::from_ref(&full), &Control::new()).expect("hash");
            out.insert(p, h);
        }
    }
    out
}

fn set_data_path(store: &Store, path: &str) {
    std::fs::write(store.root().join("knib.json"), format!("{{\"schema\": 1, \"knib.data.path\": \"{path}\"}}"))
        .expect("settings");
}

/// The temporary file of volume root (the first copied) of the backup of
/// `vm` being taken in the store at `root`.
fn root_being_written(root: &Path, vm: &str) -> PathBuf {
    let part = std::fs::read_dir(root.join("vms").join(vm))
        .expect("vm dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().ends_with(".part"))
        .expect("the backup's directory");
    part.join(".root.qcow2.part")
}

fn file_of(store: &Store, id: &str, volume: &str) -> PathBuf {
    let m: Manifest = store.show(id).expect("show");
    store.volume_file(&m, volume).expect("file")
}

/// Restore fails "corrupt" naming the damaged file, whatever layer of the
/// chain it is in and however it is damaged, and leaves nothing behind;
/// restoring without the check runs on its own; verify reports the file.
fn restore_refuses_damage(variant: Variant, seed: u64, data_paths: &[&str]) {
    let b = build(seed, variant);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut case = 0;
    for layer in 0..b.ids.len() {
        for d in DAMAGES {
            for data_path in data_paths {
                case += 1;
                let work = tempfile::tempdir().expect("tempdir");
                let store = copy_store(&b, &work.path().join("store"));
                set_data_path(&store, data_path);
                let vol = if rng.below(2) == 0 { "root" } else { "data" };
                let bad = file_of(&store, &b.ids[layer], vol);
                let what = damage(&bad, d, &mut rng);
                let name = format!("{}/{vol}.qcow2", b.ids[layer]);
                let ctx = format!("case {case} ({variant:?}, {data_path}): layer {layer} {vol}: {what}");
                let out = work.path().join("out");
                std::fs::create_dir(&out).expect("out dir");
                // The last backup reads every layer; the damaged one reads
                // its own and those below.
                for top in [b.ids.len() - 1, layer] {
                    let fmt = if (case + top) % 2 == 0 { ImageFormat::Qcow2 } else { ImageFormat::Raw };
                    let to = out.join(format!("restored-{top}"));
                    let e = store
                        .restore(&b.ids[top], vol, &to, fmt, &Control::new())
                        .expect_err(&format!("{ctx}: restore of backup {top} must fail"));
                    assert_eq!(e.kind, ErrorKind::Corrupt, "{ctx}: {e}");
                    assert!(e.message.contains(&name), "{ctx}: the error must name {name}: {e}");
                    let left: Vec<_> = std::fs::read_dir(&out).expect("list").flatten().map(|e| e.path()).collect();
                    assert!(left.is_empty(), "{ctx}: left behind {left:?}");
                    // Without the check: the copy runs as it can.
                    let r = store.restore_with(&b.ids[top], vol, &to, fmt, false, &Control::new());
                    match r {
                        Ok(()) => {
                            assert!(to.exists(), "{ctx}");
                            std::fs::remove_file(&to).expect("remove");
                        }
                        Err(e) => assert!(!to.exists(), "{ctx}: failed ({e}) and left {}", to.display()),
                    }
                }
                // The other volume is intact and restores.
                let other = if vol == "root" { "data" } else { "root" };
                let to = out.join("other");
                store.restore(&b.ids[2], other, &to, ImageFormat::Qcow2, &Control::new()).expect(&ctx);
                assert_identical(&to, &b.refs[2][other]);
                // verify reports the damaged backup.
                let r = store.verify(Some(&b.ids[layer]), &Control::new()).expect("verify").pop().expect("one");
                assert!(!r.ok, "{ctx}: verify passed");
                assert!(r.problems.iter().any(|p| p.contains(&name)), "{ctx}: {:?}", r.problems);
            }
        }
    }
}

#[test]
fn restore_refuses_a_damaged_plain_chain() {
    restore_refuses_damage(Variant::Plain, 0x1301, &["native", "qemu-img"]);
}

#[test]
fn restore_refuses_a_damaged_compressed_chain() {
    restore_refuses_damage(Variant::CompressedLater, 0x1302, &["native"]);
}

#[test]
fn restore_refuses_a_damaged_chain_compressed_as_copied() {
    restore_refuses_damage(Variant::CompressedAsCopied, 0x1303, &["native", "qemu-img"]);
}

/// An intact chain restores identical with the check on, on both data
/// paths, and the check reads each byte of a knib-written file once.
#[test]
fn an_intact_chain_restores_identical_with_the_check() {
    let b = build(0x1304, Variant::Plain);
    let store = Store::open(b.dir.path().join("store")).expect("open");
    let out = tempfile::tempdir().expect("tempdir");
    for data_path in ["native", "qemu-img"] {
        set_data_path(&store, data_path);
        for (i, id) in b.ids.iter().enumerate() {
            for vol in ["root", "data"] {
                let to = out.path().join(format!("{data_path}-{i}-{vol}"));
                store.restore(id, vol, &to, ImageFormat::Qcow2, &Control::new()).expect("restore");
                assert_identical(&to, &b.refs[i][vol]);
            }
        }
    }
}

/// Compress refuses a damaged backup: "corrupt" naming the file, the store
/// byte-identical (no `.comp` left), and verify still reports the damage.
fn compress_refuses_damage(seed: u64, data_path: &str) {
    let b = build(seed, Variant::Plain);
    let mut rng = Rng::new(seed ^ 0xc0de);
    for (layer, id) in b.ids.iter().enumerate() {
        for d in DAMAGES {
            let work = tempfile::tempdir().expect("tempdir");
            let root = work.path().join("store");
            let store = copy_store(&b, &root);
            set_data_path(&store, data_path);
            let vol = if rng.below(2) == 0 { "root" } else { "data" };
            let bad = file_of(&store, id, vol);
            let what = damage(&bad, d, &mut rng);
            let name = format!("{id}/{vol}.qcow2");
            let ctx = format!("{data_path}: layer {layer} {vol}: {what}");
            let before = contents(&root);
            let e = store
                .compress(id, &CompressOptions::default(), &Control::new())
                .expect_err(&format!("{ctx}: compress must fail"));
            assert_eq!(e.kind, ErrorKind::Corrupt, "{ctx}: {e}");
            assert!(e.message.contains(&name), "{ctx}: the error must name {name}: {e}");
            assert_eq!(contents(&root), before, "{ctx}: the store changed");
            let r = store.verify(Some(id), &Control::new()).expect("verify").pop().expect("one");
            assert!(!r.ok, "{ctx}: verify passes after the compression");
            assert!(r.problems.iter().any(|p| p.contains(&name)), "{ctx}: {:?}", r.problems);
        }
    }
}

#[test]
fn compress_refuses_a_damaged_backup() {
    compress_refuses_damage(0x1305, "native");
}

#[test]
fn compress_refuses_a_damaged_backup_on_the_qemu_img_path() {
    compress_refuses_damage(0x1306, "qemu-img");
}

/// A compression records the hash of its output (its source was checked):
/// the backup verifies, restores identical, and damage done after the
/// compression is found.
#[test]
fn a_compressed_backup_keeps_a_hash_that_finds_later_damage() {
    let b = build(0x1307, Variant::Plain);
    let work = tempfile::tempdir().expect("tempdir");
    let store = copy_store(&b, &work.path().join("store"));
    let id = &b.ids[1];
    let m = store.compress(id, &CompressOptions::default(), &Control::new()).expect("compress");
    assert!(m.compression.is_some());
    assert!(m.volumes.iter().all(|v| v.hash.is_some()), "a compression of a checked file records its hash: {m:?}");
    let r = store.verify(Some(id), &Control::new()).expect("verify").pop().expect("one");
    assert!(r.ok, "{r:?}");
    let to = work.path().join("r.qcow2");
    store.restore(id, "root", &to, ImageFormat::Qcow2, &Control::new()).expect("restore");
    assert_identical(&to, &b.refs[1]["root"]);
    let mut rng = Rng::new(0x1307);
    damage(&file_of(&store, id, "root"), Damage::DataByte, &mut rng);
    let e = store.restore(&b.ids[2], "root", &work.path().join("x"), ImageFormat::Raw, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("{id}/root.qcow2")), "{e}");
}

/// The compression job of a damaged backup fails at once ("corrupt", no
/// retry) and leaves the backup as it was.
#[test]
fn the_compression_job_of_a_damaged_backup_fails_without_retry() {
    use knib_core::catalog::jobs::{run_jobs, JobState, RunOptions};
    let b = build(0x1308, Variant::Plain);
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("store");
    let store = copy_store(&b, &root);
    let id = &b.ids[0];
    let mut rng = Rng::new(0x1308);
    damage(&file_of(&store, id, "root"), Damage::DataByte, &mut rng);
    std::fs::write(
        root.join("knib.json"),
        r#"{"schema": 1, "compression.max_retries": 2, "compression.retry_interval_secs": 0}"#,
    )
    .expect("settings");
    let before = contents(&root);
    let job = store.queue_compression(id).expect("queue");
    run_jobs(&store, &RunOptions::default()).expect("run");
    let j = store.job(&job.id).expect("job");
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert_eq!(j.attempts, 1, "a damaged backup is not compressed again: {j:?}");
    let err = j.last_error.clone().unwrap_or_default();
    assert!(err.contains(&format!("{id}/root.qcow2")) && err.contains("corrupt"), "{err}");
    let mut after = contents(&root);
    after.retain(|p, _| !p.starts_with("jobs"));
    let mut before = before;
    before.retain(|p, _| !p.starts_with("jobs"));
    assert_eq!(after, before, "the store changed");
    assert!(store.show(id).expect("show").compression.is_none());
}

/// Compress and verify at the same time, many times over: verify never
/// reports a good backup's hash as changed.
#[test]
fn verify_racing_compress_never_reports_a_false_mismatch() {
    let disks = TestDisks::two();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::create(dir.path().join("store")).expect("store"));
    let mut rng = Rng::new(0x1309);
    for round in 0..12 {
        for d in ["root", "data"] {
            let off = rng.below(400) * 65536;
            let len = 64 * 1024 * (1 + rng.below(32));
            guest_write(disks.path(d), &format!("write -P 0x{:02x} {off} {len}", 1 + rng.below(254)));
        }
        let opts = BackupOptions { full: round % 4 == 0, ..Default::default() };
        let m = store.backup("vm1", &disks.disks, &opts, &Control::new()).expect("backup");
        let stop = Arc::new(AtomicBool::new(false));
        let mut verifiers = Vec::new();
        for k in 0..2 {
            let (store, stop, id) = (Arc::clone(&store), Arc::clone(&stop), m.id.clone());
            verifiers.push(std::thread::spawn(move || {
                let mut runs = 0;
                while !stop.load(Ordering::SeqCst) || runs == 0 {
                    let target = if k == 0 { Some(id.as_str()) } else { None };
                    let reports = store.verify(target, &Control::new()).expect("verify runs");
                    for r in reports {
                        assert!(r.ok, "round {round}: verify of a good backup failed: {:?}", r.problems);
                    }
                    runs += 1;
                }
                runs
            }));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(60)));
        loop {
            match store.compress(&m.id, &CompressOptions::default(), &Control::new()) {
                Ok(_) => break,
                Err(e) if e.kind == ErrorKind::Busy => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => panic!("round {round}: compress: {e}"),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(40)));
        stop.store(true, Ordering::SeqCst);
        for v in verifiers {
            let runs = v.join().expect("a verifier panicked");
            assert!(runs > 0);
        }
    }
    for r in store.verify(None, &Control::new()).expect("verify") {
        assert!(r.ok, "{r:?}");
    }
}

/// The agent's compression and restore check the files when the caller
/// gives the per-file hashes (`agent.take_hash`'s `files[].hash`).
#[test]
fn agent_compress_and_restore_check_the_hashes_they_are_given() {
    use knib_core::api::call;
    use serde_json::{json, Value};
    let b = build(0x130a, Variant::Plain);
    let work = tempfile::tempdir().expect("tempdir");
    let store = copy_store(&b, &work.path().join("store"));
    let chain: Vec<PathBuf> = b.ids.iter().map(|id| file_of(&store, id, "root")).collect();
    let ctl = Control::new();
    let hashes: Value =
        serde_json::from_str(&call("agent.take_hash", &json!({ "files": chain }).to_string(), &ctl).expect("hash"))
            .expect("json");
    let each: Vec<String> = hashes["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["hash"].as_str().expect("hash").to_string())
        .collect();
    let mut rng = Rng::new(0x130a);
    damage(&chain[1], Damage::DataByte, &mut rng);
    // Compression of the damaged file with its hash: refused, nothing left.
    let req = json!({ "files": [chain[1]], "expected_hashes": [each[1]] });
    let e = call("agent.compress", &req.to_string(), &ctl).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&chain[1].display().to_string()), "{e}");
    assert!(!knib_core::engine::compress::comp_path(&chain[1]).exists());
    // An intact file: compressed, with the hash of its output.
    let req = json!({ "files": [chain[2]], "expected_hashes": [each[2]] });
    let ans: Value =
        serde_json::from_str(&call("agent.compress", &req.to_string(), &ctl).expect("compress")).expect("json");
    let comp = knib_core::engine::compress::comp_path(&chain[2]);
    let want = knib_core::engine::hash_files(std::slice::from_ref(&comp), &ctl).expect("hash");
    assert_eq!(ans["compressed"][0]["hash"], want.as_str());
    std::fs::remove_file(&comp).expect("remove");
    // A restore of the chain with its hashes: refused, the volume unchanged.
    let vol = work.path().join("vol.qcow2");
    std::fs::write(&vol, b"old volume").expect("volume");
    let expected: Vec<Value> = chain.iter().zip(&each).map(|(p, h)| json!({"path": p, "hash": h})).collect();
    let req = json!({ "volumes": [{ "backup_path": chain[2], "volume_path": vol, "expected_hashes": expected }] });
    let e = call("agent.restore", &req.to_string(), &ctl).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&chain[1].display().to_string()), "{e}");
    assert_eq!(std::fs::read(&vol).expect("volume"), b"old volume");
    let left: Vec<_> = std::fs::read_dir(work.path()).expect("list").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// The check costs no second read of a knib-written file: the copy's own
/// reads are hashed, and only the metadata (and, for a flattened copy, the
/// clusters an upper layer hides) is read for the hash alone. The digests
/// are the recorded per-file hashes.
#[test]
fn the_hash_of_each_source_comes_from_the_copy_s_own_reads() {
    use knib_core::qcow2::{copy_image, CopyOptions, SourceMode, TargetFormat};
    for variant in [Variant::Plain, Variant::CompressedAsCopied] {
        let b = build(0x130b, variant);
        let store = Store::open(b.dir.path().join("store")).expect("open");
        let out = tempfile::tempdir().expect("tempdir");
        for vol in ["root", "data"] {
            let chain: Vec<PathBuf> = b.ids.iter().map(|id| file_of(&store, id, vol)).collect();
            for mode in [SourceMode::Top, SourceMode::Chain] {
                let opts = CopyOptions {
                    mode,
                    format: if mode == SourceMode::Chain { TargetFormat::Raw } else { TargetFormat::Qcow2 },
                    hash_source: true,
                    ..Default::default()
                };
                let dest = out.path().join("copy");
                let r = copy_image(&chain[2], &dest, &opts, &Control::new(), &mut |_| Ok(())).expect("copy");
                let n = if mode == SourceMode::Top { 1 } else { 3 };
                assert_eq!(r.source_hashes.len(), n);
                for (k, sh) in r.source_hashes.iter().enumerate() {
                    let file = &chain[2 - k];
                    let m = store.show(&b.ids[2 - k]).expect("show");
                    assert_eq!(Some(&sh.hash), m.volume(vol).expect("volume").hash.as_ref(), "{}", file.display());
                    let len = std::fs::metadata(file).expect("size").len();
                    // Compressed clusters' sector-rounded extents overlap a
                    // little; nothing else is read twice.
                    let bound = if variant == Variant::Plain { 0 } else { len / 8 };
                    assert!(sh.read_twice_bytes <= bound, "{variant:?} {mode:?} {}: {sh:?} of {len}", file.display());
                    if k == 0 {
                        // The top: all of it is read by the copy but its metadata.
                        assert!(
                            sh.hash_only_bytes <= len / 4 + 1024 * 1024,
                            "{mode:?} {}: {sh:?} of {len}",
                            file.display()
                        );
                    }
                }
                std::fs::remove_file(&dest).expect("remove");
            }
        }
    }
}

/// A file system of its own on a loop device (ext4 in a file), mounted:
/// what the device holds can be changed under the page cache. Unmounted
/// and the device detached when dropped.
struct LoopFs {
    dir: tempfile::TempDir,
    dev: String,
    mnt: PathBuf,
}

impl LoopFs {
    /// `None` (said on stderr) where this host cannot make one: not root,
    /// no loop device, no mount (a container); the tests run as root, and
    /// CI has them.
    fn new(test: &str) -> Option<LoopFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        let run = |cmd: &str, args: &[&str]| -> Result<String, String> {
            let out = std::process::Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        std::fs::File::create(&img).expect("image").set_len(256 << 20).expect("size");
        let img_name = img.to_str().expect("utf-8").to_string();
        run("mkfs.ext4", &["-q", "-F", &img_name]).expect("mkfs.ext4");
        let dev = match run("losetup", &["--find", "--show", &img_name]) {
            Ok(dev) => dev,
            Err(e) => {
                eprintln!("SKIPPED {test}: no loop device ({e})");
                return None;
            }
        };
        // Made at once: its drop detaches the device whatever fails next.
        let fs = LoopFs { mnt: dir.path().join("mnt"), dir, dev };
        std::fs::create_dir(&fs.mnt).expect("mount point");
        if let Err(e) = run("mount", &[&fs.dev, fs.mnt.to_str().expect("utf-8")]) {
            eprintln!("SKIPPED {test}: cannot mount a file system ({e})");
            return None;
        }
        Some(fs)
    }

    /// Overwrite with seeded bytes, on the device and under the page
    /// cache, 64 KiB of `file` (on this file system) around its middle,
    /// away from its header: the file's cached pages still read as
    /// written until they are dropped. The bytes go into the file system's
    /// image, which the loop device reads.
    fn damage_under_cache(&self, file: &Path, seed: u64) {
        std::fs::File::open(file).expect("file").sync_all().expect("fsync");
        let out = std::process::Command::new("filefrag").arg("-v").arg(file).output().expect("filefrag");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "filefrag: {text} {}", String::from_utf8_lossy(&out.stderr));
        // "File size of F is N (M blocks of B bytes)"
        let bs: u64 = text
            .lines()
            .find(|l| l.starts_with("File size of "))
            .and_then(|l| l.rsplit(" of ").next())
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("filefrag: {text}"));
        let len = std::fs::metadata(file).expect("size").len();
        let (from, to) = (len / 2 - (32 << 10), len / 2 + (32 << 10));
        let img = OpenOptions::new().write(true).open(self.dir.path().join("fs.img")).expect("image");
        let mut rng = Rng::new(seed);
        let mut done = 0;
        // " 0:   0..  2929:   16385..  19314:   2930: ..." (logical and
        // physical blocks)
        for line in text.lines() {
            let f: Vec<u64> =
                line.split([':', '.']).map(str::trim).filter(|w| !w.is_empty()).map_while(|w| w.parse().ok()).collect();
            let [_, l0, l1, p0, ..] = f[..] else { continue };
            // This extent's part of [from, to), in bytes.
            let (s, e) = ((l0 * bs).max(from), ((l1 + 1) * bs).min(to));
            if s < e {
                img.write_all_at(&rng.bytes((e - s) as usize), p0 * bs + (s - l0 * bs)).expect("write the image");
                done += e - s;
            }
        }
        img.sync_all().expect("fsync the image");
        assert_eq!(done, to - from, "{} not mapped whole: {text}", file.display());
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = std::process::Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// With `check_output`, a backup file whose bytes on the device are not
/// those written (a write the device lost or garbled while the page cache
/// still holds it) fails the backup `internal` and nothing is kept: the
/// read-back reads the file as the device holds it. The store is on a
/// file system of its own, whose device is overwritten under each file
/// once it is written (seeded bytes), on knib's data path and on
/// qemu-img's, for a full and an incremental backup, and for a compression
/// job (`compression.check_output`; refused, the store as it was). Before, the
/// read-back of knib's own copy read the page cache once its hash had
/// run first (b78bb0c), and qemu-img's copies were always read from the
/// cache: the backup was kept, hashed as the cache held it, and its
/// damage showed at verify or restore.
#[test]
fn a_file_the_device_does_not_hold_as_written_is_not_kept() {
    let Some(fs) = LoopFs::new("a_file_the_device_does_not_hold_as_written_is_not_kept") else { return };
    let root = fs.mnt.join("store");
    let store = Store::create(&root).expect("store");
    std::fs::create_dir_all(&root).expect("store directory");
    let mut rng = Rng::new(0x2501);
    let checked = BackupOptions { compress: Some(CompressionLibrary::Zstd), check_output: true, ..Default::default() };
    for (round, path) in ["native", "native", "qemu-img", "qemu-img"].into_iter().enumerate() {
        std::fs::write(root.join("knib.json"), format!("{{\"schema\": 1, \"knib.data.path\": \"{path}\"}}"))
            .expect("settings");
        let vm = format!("vm{round}");
        let disks = TestDisks::two();
        let write = |rng: &mut Rng, tag: &str| {
            for d in ["root", "data"] {
                let src = disks.dir.path().join(format!("w-{tag}-{d}.bin"));
                std::fs::write(&src, rng.bytes(512 << 10)).expect("source");
                let off = rng.below(60) << 16;
                guest_write(disks.path(d), &format!("write -s {} {off} 512k", src.display()));
            }
        };
        write(&mut rng, "a");
        let full = round % 2 == 0;
        let kept = if full {
            None
        } else {
            let m = store.backup(&vm, &disks.disks, &checked, &Control::new()).expect("a first backup");
            write(&mut rng, "b");
            Some(m.id)
        };
        let refs = disks.snapshot_all("now");
        let step = if path == "qemu-img" { "comparison" } else { "read-back" };
        let at = format!("{step} of {}", root.join("vms").join(&vm).display());
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let (tmp, r) = std::thread::scope(|s| {
            let t = s.spawn(|| {
                while_paused(&at, || {
                    let tmp = root_being_written(&root, &vm);
                    let cached = std::fs::read(&tmp).expect("the file");
                    fs.damage_under_cache(&tmp, 0x2502 + round as u64);
                    // The page cache still holds the file as written.
                    assert_eq!(std::fs::read(&tmp).expect("the file"), cached, "round {round}: the cache changed");
                    tmp
                })
            });
            let r = store.backup(&vm, &disks.disks, &checked, &Control::new());
            (t.join().expect("damage"), r)
        });
        let ctx = format!("round {round} ({path}, full {full})");
        let e = r.expect_err(&format!("{ctx}: the backup must fail"));
        assert_eq!(e.kind, ErrorKind::Internal, "{ctx}: {e}");
        let head = format!("{} does not read back as written: ", tmp.display());
        // Found in its data: the header, left alone, opens.
        assert!(e.message.contains(&head) && !e.message.contains("does not open"), "{ctx}: {e}");
        let ids: Vec<String> = store.list(Some(&vm)).expect("list").into_iter().map(|m| m.id).collect();
        assert_eq!(ids, kept.into_iter().collect::<Vec<_>>(), "{ctx}: a backup was kept");
        for d in ["root", "data"] {
            assert_identical(disks.path(d), &refs[d]);
        }
        // The next backup is kept and restores identical.
        let next = store.backup(&vm, &disks.disks, &checked, &Control::new()).expect("the next backup");
        for d in ["root", "data"] {
            let out = fs.mnt.join(format!("restored-{round}-{d}.qcow2"));
            store.restore(&next.id, d, &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
            assert_identical(&out, &refs[d]);
            std::fs::remove_file(&out).expect("remove");
        }
        // A compression job of a backup, its output damaged on the device
        // the same way once written: refused, the store as it was.
        let plain = BackupOptions { full: true, ..Default::default() };
        let m = store.backup(&vm, &disks.disks, &plain, &Control::new()).expect("an uncompressed backup");
        std::fs::write(
            root.join("knib.json"),
            format!("{{\"schema\": 1, \"knib.data.path\": \"{path}\", \"compression.check_output\": true}}"),
        )
        .expect("settings");
        let tmp = comp_part(&file_of(&store, &m.id, "root"));
        let at = match path {
            "native" => format!("read-back of {}", tmp.display()),
            _ => format!("qemu-img wrote {}", tmp.display()),
        };
        let before = contents(&root);
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let r = std::thread::scope(|s| {
            let t = s.spawn(|| {
                while_paused(&at, || {
                    fs.damage_under_cache(&tmp, 0x2602 + round as u64);
                })
            });
            let r = store.compress(&m.id, &CompressOptions::default(), &Control::new());
            t.join().expect("damage");
            r
        });
        let e = r.expect_err(&format!("{ctx}: the compression must fail"));
        assert_eq!(e.kind, ErrorKind::Internal, "{ctx}: {e}");
        let head = format!("{} does not read back as written: ", tmp.display());
        assert!(e.message.starts_with(&head) && !e.message.contains("does not open"), "{ctx}: {e}");
        assert_eq!(contents(&root), before, "{ctx}: the store changed");
        let v = store.verify(Some(&m.id), &Control::new()).expect("verify").pop().expect("one");
        assert!(v.ok, "{ctx}: {v:?}");
    }
}

/// With `compression.check_output`, a compression whose output does not
/// read back as what was copied into it (a cluster under another's index, pointed at another's data, lost,
/// made zeros, in any layer of a chain; seeded) fails `internal` naming the
/// output, and leaves the store as it was: the backup still verifies and
/// restores identical. On the native data path the output is miswritten
/// before it is hashed; on the qemu-img one, once qemu-img has written it.
/// Before, the miswritten output was hashed as good and renamed over the
/// backup, and the damage showed only at restore.
fn compress_refuses_a_miswritten_output_on(seed: u64, data_path: &str) {
    let b = build(seed, Variant::Plain);
    let mut rng = Rng::new(seed ^ 0x3b17);
    for (i, m) in [Miswrite::Swap, Miswrite::Duplicate, Miswrite::Lose, Miswrite::Zero].into_iter().enumerate() {
        let layer = rng.below(b.ids.len() as u64) as usize;
        let id = &b.ids[layer];
        let work = tempfile::tempdir().expect("tempdir");
        let root = work.path().join("store");
        let store = copy_store(&b, &root);
        std::fs::write(
            store.root().join("knib.json"),
            format!("{{\"schema\": 1, \"knib.data.path\": \"{data_path}\", \"compression.check_output\": true}}"),
        )
        .expect("settings");
        // The first volume compressed is root.
        let tmp = comp_part(&file_of(&store, id, "root"));
        let at = match data_path {
            "native" => format!("read-back of {}", tmp.display()),
            _ => format!("qemu-img wrote {}", tmp.display()),
        };
        let before = contents(&root);
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(3));
        let (what, e) = std::thread::scope(|s| {
            let t = s.spawn(|| {
                assert!(
                    knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)),
                    "no pause at {at}"
                );
                miswrite(&tmp, m, seed + i as u64)
            });
            let r = store.compress(id, &CompressOptions::default(), &Control::new());
            (t.join().expect("miswrite"), r)
        });
        let ctx = format!("{data_path}: layer {layer}: {what}");
        let e = e.expect_err(&format!("{ctx}: the compression must fail"));
        // The copy is faulty, not the backup: an internal error.
        assert_eq!(e.kind, ErrorKind::Internal, "{ctx}: {e}");
        let head = format!("{} does not read back as written: ", tmp.display());
        // Named as the program that wrote it.
        let by = if data_path == "qemu-img" { "qemu-img" } else { "knib" };
        let tail = format!(" (the copy is faulty, not its source: a fault of this host or of {by})");
        assert!(e.message.starts_with(&head) && e.message.ends_with(&tail), "{ctx}: {e}");
        let rest = &e.message[head.len()..e.message.len() - tail.len()];
        if data_path == "qemu-img" {
            // Guest bytes through the chain.
            let f = file_of(&store, id, "root");
            assert!(rest.starts_with("its guest bytes at offset "), "{ctx}: {e}");
            assert!(rest.ends_with(&format!(" differ from {}'s", f.display())), "{ctx}: {e}");
        } else if m == Miswrite::Lose || (m == Miswrite::Zero && layer == 0) {
            // A cluster lost, or made zeros where nothing below shows
            // through (the first layer), is one fewer; otherwise the count
            // holds.
            let n: Vec<u64> = rest.split(' ').filter_map(|w| w.parse().ok()).collect();
            assert_eq!(rest, format!("{} clusters read back where {} were written", n[0], n[0] + 1), "{ctx}");
        } else {
            assert_eq!(rest, "a cluster reads back other than it was written", "{ctx}");
        }
        assert_eq!(contents(&root), before, "{ctx}: the store changed");
        let r = store.verify(Some(id), &Control::new()).expect("verify").pop().expect("one");
        assert!(r.ok, "{ctx}: {r:?}");
        let out = work.path().join("restored.qcow2");
        store.restore(id, "root", &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
        assert_identical(&out, &b.refs[layer]["root"]);
    }
}

#[test]
fn compress_refuses_a_miswritten_output() {
    compress_refuses_a_miswritten_output_on(0x2201, "native");
}

#[test]
fn compress_refuses_a_miswritten_output_on_the_qemu_img_path() {
    compress_refuses_a_miswritten_output_on(0x2202, "qemu-img");
}

/// `check_output` of `agent.compress` and `compress` (JSON API) turns the
/// read-back on for one call: a miswritten output fails as internal
/// naming it, the file or store left as it was; without the field the
/// same miswritten output is accepted (the field is what checks it).
#[test]
fn the_api_s_check_output_refuses_a_miswritten_compression() {
    use knib_core::api::call;
    use serde_json::{json, Value};
    let b = build(0x2203, Variant::Plain);
    let ctl = Control::new();
    let pause = |at: &str| knib_core::crashpoint::pause_before(at, std::time::Duration::from_secs(3));
    let miswritten = |at: &str, tmp: &Path, req: &Value, op: &str| {
        pause(at);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                assert!(
                    knib_core::crashpoint::wait_for_pause(at, std::time::Duration::from_secs(120)),
                    "no pause at {at}"
                );
                miswrite(tmp, Miswrite::Swap, 0x2203)
            });
            let r = call(op, &req.to_string(), &ctl);
            t.join().expect("miswrite");
            r
        })
    };
    // agent.compress of one file with its hash (the output is hashed, so
    // miswritten before its hash is taken).
    let work = tempfile::tempdir().expect("tempdir");
    let store = copy_store(&b, &work.path().join("store"));
    let f = file_of(&store, &b.ids[1], "root");
    let hash = knib_core::engine::hash_files(std::slice::from_ref(&f), &ctl).expect("hash");
    let tmp = comp_part(&f);
    let at = format!("read-back of {}", tmp.display());
    let before = std::fs::read(&f).expect("file");
    let req = json!({ "files": [f], "expected_hashes": [hash], "check_output": true });
    let e = miswritten(&at, &tmp, &req, "agent.compress").expect_err("refused");
    let swapped = |tmp: &Path| {
        format!(
            "{} does not read back as written: a cluster reads back other than it was written (the copy is faulty, not its source: a fault of this host or of knib)",
            tmp.display()
        )
    };
    assert_eq!(e.kind, ErrorKind::Internal, "{e}");
    assert_eq!(e.message, swapped(&tmp));
    assert_eq!(std::fs::read(&f).expect("file"), before);
    let comp = knib_core::engine::compress::comp_path(&f);
    assert!(!comp.exists() && !tmp.exists());
    // Without the field: accepted (another file: a pause is taken once
    // per step name).
    let f = file_of(&store, &b.ids[0], "root");
    let hash = knib_core::engine::hash_files(std::slice::from_ref(&f), &ctl).expect("hash");
    let tmp = comp_part(&f);
    let at = format!("read-back of {}", tmp.display());
    let req = json!({ "files": [f], "expected_hashes": [hash] });
    miswritten(&at, &tmp, &req, "agent.compress").expect("not checked");
    assert!(knib_core::engine::compress::comp_path(&f).exists());
    // compress (a store without compression.check_output).
    let root = work.path().join("store2");
    let store = copy_store(&b, &root);
    let id = &b.ids[2];
    let tmp = comp_part(&file_of(&store, id, "root"));
    let at = format!("read-back of {}", tmp.display());
    let before = contents(&root);
    let req = json!({ "store": root, "backup": id, "check_output": true });
    let e = miswritten(&at, &tmp, &req, "compress").expect_err("refused");
    assert_eq!(e.kind, ErrorKind::Internal, "{e}");
    assert_eq!(e.message, swapped(&tmp));
    assert_eq!(contents(&root), before, "the store changed");
    let id = &b.ids[1];
    let tmp = comp_part(&file_of(&store, id, "root"));
    let at = format!("read-back of {}", tmp.display());
    let req = json!({ "store": root, "backup": id });
    let v: Value = serde_json::from_str(&miswritten(&at, &tmp, &req, "compress").expect("not checked")).expect("json");
    assert!(v["compression"].is_object(), "{v}");
}

/// A compression job whose copy does not read back as written (the
/// store's `compression.check_output`) is retried, not failed for good:
/// the backup is sound. The second attempt compresses it; it verifies and
/// restores identical.
#[test]
fn a_compression_job_whose_copy_is_miswritten_is_retried() {
    use knib_core::catalog::jobs::{run_jobs, JobState, RunOptions};
    let b = build(0x2204, Variant::Plain);
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("store");
    let store = copy_store(&b, &root);
    let id = &b.ids[1];
    std::fs::write(
        root.join("knib.json"),
        r#"{"schema": 1, "compression.check_output": true, "compression.max_retries": 2, "compression.retry_interval_secs": 0}"#,
    )
    .expect("settings");
    let tmp = comp_part(&file_of(&store, id, "root"));
    let at = format!("read-back of {}", tmp.display());
    let job = store.queue_compression(id).expect("queue");
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(3));
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(
                knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)),
                "no pause at {at}"
            );
            miswrite(&tmp, Miswrite::Lose, 0x2204);
        });
        run_jobs(&store, &RunOptions::default()).expect("run");
    });
    let mut j = store.job(&job.id).expect("job");
    if j.state == JobState::Queued {
        // Its retry left for the next run.
        run_jobs(&store, &RunOptions::default()).expect("run");
        j = store.job(&job.id).expect("job");
    }
    // Attempts count the failed ones: one, then done.
    assert_eq!(j.state, JobState::Done, "{j:?}");
    assert_eq!(j.attempts, 1, "{j:?}");
    assert!(store.show(id).expect("show").compression.is_some());
    let r = store.verify(Some(id), &Control::new()).expect("verify").pop().expect("one");
    assert!(r.ok, "{r:?}");
    let out = work.path().join("restored.qcow2");
    store.restore(id, "root", &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
    assert_identical(&out, &b.refs[1]["root"]);
}

/// A backup compressed as it is copied reads its files back when asked
/// (`check_output` of the backup, or the store's
/// `compression.check_output`): a file that does not hold what was copied
/// into it (a cluster under another's index, pointed at another's data,
/// lost, made zeros; seeded, full and incremental) fails the backup as
/// internal naming the file, and nothing is kept: no backup, no temporary
/// left, the disks as the guest wrote them; the next backup (unchecked
/// here, so that the miswritten one would have been kept) restores
/// identical. Every correct copy is accepted. Before, backups compressed
/// as copied were never read back: the damage showed at restore.
#[test]
fn a_backup_compressed_as_copied_that_does_not_read_back_is_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(dir.path().join("store")).expect("store");
    let root = store.root().to_path_buf();
    std::fs::create_dir_all(&root).expect("store directory");
    let mut rng = Rng::new(0x2301);
    let write = |disks: &TestDisks, rng: &mut Rng, tag: &str| {
        for d in ["root", "data"] {
            for k in 0..3u64 {
                let src = disks.dir.path().join(format!("w-{tag}-{d}-{k}.bin"));
                std::fs::write(&src, rng.bytes(256 << 10)).expect("source");
                let off = (rng.below(60) + k * 100) << 16;
                guest_write(disks.path(d), &format!("write -s {} {off} 256k", src.display()));
            }
        }
    };
    let zstd = BackupOptions { compress: Some(CompressionLibrary::Zstd), ..Default::default() };
    let checked = BackupOptions { check_output: true, ..zstd.clone() };
    // Rounds 4 to 7 copy through qemu-img (the store's data path): its
    // files are compared with the disks by guest bytes.
    let path_of = |round: usize| if round >= 4 { "qemu-img" } else { "native" };
    let set_store = |on: bool, round: usize| {
        let path = path_of(round);
        std::fs::write(
            root.join("knib.json"),
            format!("{{\"schema\": 1, \"compression.check_output\": {on}, \"knib.data.path\": \"{path}\"}}"),
        )
        .expect("settings")
    };
    let mut kept: Vec<(String, BTreeMap<String, PathBuf>)> = Vec::new();
    let mut all_disks = Vec::new();
    let ms = [Miswrite::Swap, Miswrite::Duplicate, Miswrite::Lose, Miswrite::Zero];
    for (round, m) in ms.into_iter().chain(ms).enumerate() {
        // A VM of its own each round (a pause is taken once per step name).
        let vm = format!("vm{round}");
        let disks = TestDisks::two();
        set_store(false, round);
        write(&disks, &mut rng, "a");
        let refs = disks.snapshot_all("a");
        let good = store.backup(&vm, &disks.disks, &checked, &Control::new()).expect("a checked backup");
        kept.push((good.id, refs));
        write(&disks, &mut rng, "b");
        let refs = disks.snapshot_all("b");
        // Full or incremental; asked for per call or by the store.
        let full = round % 4 == 0 || round % 4 == 3;
        let by_store = round % 2 == 1;
        set_store(by_store, round);
        let opts = BackupOptions { full, ..if by_store { zstd.clone() } else { checked.clone() } };
        // Miswritten once written, before it is hashed (the hash then
        // agrees with the file: only the read-back can tell).
        // (qemu-img's copy is compared with the disk instead.)
        let step = if round >= 4 { "comparison" } else { "read-back" };
        let at = format!("{step} of {}", root.join("vms").join(&vm).display());
        knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(300));
        let (what, r) = std::thread::scope(|s| {
            let t = s.spawn(|| {
                while_paused(&at, || {
                    let tmp = root_being_written(&root, &vm);
                    let what = miswrite(&tmp, m, round as u64);
                    (tmp, what)
                })
            });
            let r = store.backup(&vm, &disks.disks, &opts, &Control::new());
            (t.join().expect("miswrite"), r)
        });
        let ctx = format!("round {round} ({}, full {full}, by the store {by_store}): {}", path_of(round), what.1);
        let e = r.expect_err(&format!("{ctx}: the backup must fail"));
        assert_eq!(e.kind, ErrorKind::Internal, "{ctx}: {e}");
        let head = format!("{} does not read back as written: ", what.0.display());
        let by = if round >= 4 { "qemu-img" } else { "knib" };
        let tail = format!(" (the copy is faulty, not its source: a fault of this host or of {by})");
        assert!(e.message.contains(&head) && e.message.ends_with(&tail), "{ctx}: {e}");
        let ids: Vec<String> = store.list(Some(&vm)).expect("list").into_iter().map(|m| m.id).collect();
        assert_eq!(ids, [kept.last().expect("kept").0.clone()], "{ctx}: a backup was kept");
        let left: Vec<PathBuf> = std::fs::read_dir(root.join("vms").join(&vm))
            .expect("vm dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().contains(".part"))
            .collect();
        assert!(left.is_empty(), "{ctx}: left {left:?}");
        for d in ["root", "data"] {
            assert_identical(disks.path(d), &refs[d]);
        }
        // The next backup, unchecked, is kept.
        set_store(false, round);
        let next = store.backup(&vm, &disks.disks, &zstd, &Control::new()).expect("backup");
        assert!(next.compression.is_some(), "{ctx}: {next:?}");
        kept.push((next.id, refs));
        all_disks.push(disks);
    }
    for (id, refs) in &kept {
        let r = store.verify(Some(id), &Control::new()).expect("verify").pop().expect("one");
        assert!(r.ok, "{id}: {r:?}");
        for d in ["root", "data"] {
            let out = dir.path().join(format!("restored-{id}-{d}.qcow2"));
            store.restore(id, d, &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
            assert_identical(&out, &refs[d]);
        }
    }
    // The library refuses the field without compression, before anything
    // is made.
    let before = tree(&root);
    let plain = BackupOptions { check_output: true, ..Default::default() };
    let e = store.backup("vm0", &all_disks[0].disks, &plain, &Control::new()).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.message, "backup of vm0: check_output goes with compress (it reads the compressed files back)");
    assert_eq!(tree(&root), before);
    // So does the API.
    let req = serde_json::json!({ "store": root, "vm": "vm0", "disks": [], "check_output": true });
    let e = knib_core::api::call("backup", &req.to_string(), &Control::new()).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(
        e.message,
        "request of backup: field `check_output` goes with `compress` (it reads the compressed files back)"
    );
    // Nor with a vault, before anything is made.
    let none = dir.path().join("none");
    let req = serde_json::json!({ "store": none, "vm": "vm0", "disks": [], "compress": "zstd", "check_output": true, "vault": "s3://b/p" });
    let e = knib_core::api::call("backup", &req.to_string(), &Control::new()).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert_eq!(
        e.message,
        "request of backup: field `check_output` does not go with `vault` (a backup sent straight to a vault leaves no file to read back)"
    );
    assert!(!none.exists());
}

/// Every log record of this process, at warning level and above.
struct Warnings(std::sync::Mutex<Vec<String>>);

impl log::Log for Warnings {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0.lock().expect("log").push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

#[test]
fn a_backup_of_a_disk_knib_does_not_read_is_kept_unread_with_a_warning() {
    // This test alone sets the process's logger.
    log::set_logger(&WARNINGS).expect("logger");
    log::set_max_level(log::LevelFilter::Warn);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(dir.path().join("store")).expect("store");
    // Disks with subclusters: knib neither copies nor reads them, qemu-img
    // copies them.
    let disk_dir = tempfile::tempdir().expect("tempdir");
    let specs = ["root", "data"]
        .map(|name| {
            let path = disk_dir.path().join(format!("{name}.qcow2"));
            make_disk(&path, 32 << 20, &["-o", "extended_l2=on"]);
            knib_core::catalog::DiskSpec { name: name.to_string(), path }
        })
        .to_vec();
    let disks = TestDisks { dir: disk_dir, disks: specs };
    let mut rng = Rng::new(0x2302);
    for d in ["root", "data"] {
        let src = disks.dir.path().join(format!("w-{d}.bin"));
        std::fs::write(&src, rng.bytes(256 << 10)).expect("source");
        guest_write(disks.path(d), &format!("write -s {} {} 256k", src.display(), rng.below(60) << 16));
    }
    let refs = disks.snapshot_all("a");
    let opts = BackupOptions { compress: Some(CompressionLibrary::Zstd), check_output: true, ..Default::default() };
    let m = store.backup("unread", &disks.disks, &opts, &Control::new()).expect("backup");
    assert!(m.compression.is_some(), "{m:?}");
    let said: Vec<String> = WARNINGS.0.lock().expect("log").clone();
    for d in ["root", "data"] {
        let line = format!(
            "backup of volume {d}: its compressed file, copied by qemu-img, is not read back: knib's reader does not read its source (invalid input: qcow2 image {}: extended L2 entries (subclusters) are not supported)",
            disks.path(d).display()
        );
        assert!(said.contains(&line), "{d}: {said:?}");
        let out = dir.path().join(format!("restored-{d}.qcow2"));
        store.restore(&m.id, d, &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
        assert_identical(&out, &refs[d]);
    }
}

/// An image for [`the_read_back_of_good_copies_of_generated_disks_never_fails`]:
/// `path` of `fmt` and `size` bytes made with `opts`, each of `fill`
/// (offset, length, byte) written into it.
fn image(path: &Path, fmt: &str, size: u64, opts: &[&str], fill: &[(u64, u64, u8)]) {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .args(opts)
        .arg(path)
        .arg(size.to_string())
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}: {out:?}", path.display());
    for (off, len, byte) in fill {
        let w = std::process::Command::new("qemu-io")
            .args(["-f", fmt, "-c", &format!("write -q -P {byte} {off} {len}")])
            .arg(path)
            .output()
            .expect("qemu-io");
        assert!(w.status.success(), "{}: {w:?}", path.display());
    }
}

/// The read-back never fails a good copy: chains of backups, compressed as
/// copied and read back, of disks drawn from a seed (cluster sizes from 4
/// KiB to 2 MiB, virtual sizes not a multiple of the cluster size, data,
/// zeros, discards and compressed clusters written by qemu-io; alone, over
/// templates smaller and larger, raw and qcow2, over two files with the
/// lower one partly hidden, or version 2), on knib's own data path and on
/// qemu-img's, each kept and restored equal.
#[test]
fn the_read_back_of_good_copies_of_generated_disks_never_fails() {
    let mut rng = Rng::new(0x2304);
    let sizes = [4u64 << 10, 16 << 10, 64 << 10, 256 << 10, 2 << 20];
    for case in 0..12u64 {
        let path = if case % 2 == 1 { "qemu-img" } else { "native" };
        let cs = sizes[rng.below(5) as usize];
        let below_cs = format!("cluster_size={}", sizes[rng.below(5) as usize]);
        let size = ((8 + rng.below(40)) << 20) + rng.below(64) * 512;
        // Version 2 is left to qemu-img by knib's copy.
        let shape = [
            "alone",
            "over a smaller qcow2 file",
            "over a smaller raw file",
            "version 2",
            "over a larger qcow2 file",
            "over a smaller qcow2 file over a larger raw file",
        ][(case / 2 % 6) as usize];
        let ctx = format!("case {case} ({path}, {shape}, clusters of {cs}, {size} bytes)");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::create(dir.path().join("store")).expect("store");
        let root = store.root().to_path_buf();
        std::fs::create_dir_all(&root).expect("store directory");
        std::fs::write(
            root.join("knib.json"),
            format!(r#"{{"schema": 1, "compression.check_output": true, "knib.data.path": "{path}"}}"#),
        )
        .expect("settings");
        let disk = dir.path().join("d.qcow2");
        let cluster = format!("cluster_size={cs}");
        let small = size / 2 - size / 2 % 512;
        let large = size + size / 2 - size / 2 % 512;
        let d = dir.path();
        match shape {
            "over a smaller qcow2 file" => {
                image(&d.join("t.qcow2"), "qcow2", small, &["-o", &below_cs], &[(0, 4 << 20, 0x5a)]);
                make_disk(&disk, size, &["-o", &cluster, "-b", "t.qcow2", "-F", "qcow2"]);
            }
            "over a smaller raw file" => {
                image(&d.join("t.raw"), "raw", small, &[], &[(0, 4 << 20, 0x5a)]);
                make_disk(&disk, size, &["-o", &cluster, "-b", "t.raw", "-F", "raw"]);
            }
            "over a larger qcow2 file" => {
                // Data past the disk's end too: never seen by the guest.
                let fill = [(0, 4 << 20, 0x5a), (size - size % 512 - (1 << 20), 2 << 20, 0x6b)];
                image(&d.join("t.qcow2"), "qcow2", large, &["-o", &below_cs], &fill);
                make_disk(&disk, size, &["-o", &cluster, "-b", "t.qcow2", "-F", "qcow2"]);
            }
            "over a smaller qcow2 file over a larger raw file" => {
                // Data in the raw file past the middle file's end: hidden
                // (reads stop at the middle file's end, and read zeros).
                image(&d.join("b.raw"), "raw", large, &[], &[(0, 2 << 20, 0x3c), (small, 4 << 20, 0x4d)]);
                image(
                    &d.join("m.qcow2"),
                    "qcow2",
                    small,
                    &["-o", &below_cs, "-b", "b.raw", "-F", "raw"],
                    &[(1 << 20, 2 << 20, 0x5a)],
                );
                make_disk(&disk, size, &["-o", &cluster, "-b", "m.qcow2", "-F", "qcow2"]);
            }
            "version 2" => make_disk(&disk, size, &["-o", &cluster, "-o", "compat=0.10"]),
            _ => make_disk(&disk, size, &["-o", &cluster]),
        }
        let disks = [knib_core::catalog::DiskSpec { name: "d".into(), path: disk.clone() }];
        let srcs = gen::sources(dir.path(), &mut rng, 256 << 10);
        let opts = BackupOptions { compress: Some(CompressionLibrary::Zstd), ..Default::default() };
        let mut taken = Vec::new();
        for round in 0..3 {
            for op in gen::random_ops(&mut rng, size, cs, 16, &srcs, round == 0 && case % 4 < 2) {
                guest_write(&disk, &op);
            }
            let r = dir.path().join(format!("ref{round}.qcow2"));
            snapshot(&disk, &r);
            let m = store
                .backup("gen", &disks, &opts, &Control::new())
                .unwrap_or_else(|e| panic!("{ctx}, backup {round}: {e}"));
            taken.push((m.id, r));
        }
        for (id, r) in &taken {
            let out = dir.path().join(format!("restored-{id}.qcow2"));
            store.restore(id, "d", &out, ImageFormat::Qcow2, &Control::new()).expect("restore");
            assert_identical(&out, r);
        }
    }
}
