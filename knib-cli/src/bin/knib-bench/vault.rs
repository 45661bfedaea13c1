//! The vault rows: a sync of a full and an incremental backup of the
//! benchmark's disk to an S3 vault (Ceph RGW in CI) against `cp` of the same
//! files into a local store directory, and a restore of the incremental from
//! the vault against the same restore from the local store. The store is
//! made once (untimed): the disk copied into a VM directory, a catalog full
//! backup, 10% of its clusters rewritten by qemu-io, an incremental backup.
//! Each sync run starts from an empty vault prefix (the backups deleted,
//! untimed), each `cp` run from an empty directory; the restores read what
//! the last sync sent. They need an S3 server: `KNIB_S3_ENDPOINT` (with the
//! `AWS_*` credentials and `KNIB_S3_BUCKET`) as `eval "$(bash scripts/ceph.sh
//! env)"` sets them; the rows are skipped, saying so, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::qemu_img::ImageFormat;
use knib_core::vault::{SyncOptions, Vault};
use knib_core::Control;

use super::{ok, s, Rng, CS};
use crate::measure::{cmd, compare_serving, Measured, RowEnv, Tool};

/// The servers the vault rows drive (their CPU is the rows' work, shown
/// apart from other processes'): Ceph's daemons.
const SERVERS: &[&str] = &["radosgw", "ceph-osd", "ceph-mon", "ceph-mgr"];

/// Why the rows cannot run here, if they cannot.
pub(crate) fn unavailable() -> Option<String> {
    match std::env::var("KNIB_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => None,
        _ => Some(
            "KNIB_S3_ENDPOINT is not set: no S3 server (start one with `bash scripts/ceph.sh start`, then \
             `eval \"$(bash scripts/ceph.sh env)\"`)"
                .to_string(),
        ),
    }
}

/// knib's side of the sync: every backup of `store` the vault lacks.
pub(crate) fn knib_sync(store: &Path, location: &str) {
    let store = Store::open(store).expect("the store");
    let v = Vault::open(location).expect("the vault");
    v.sync_from(&store, &SyncOptions::default(), &Control::new()).expect("sync");
}

/// knib's side of a restore from the vault (verified, as by default).
pub(crate) fn knib_restore_vault(location: &str, id: &str, to: &Path) {
    let v = Vault::open(location).expect("the vault");
    v.restore(id, "root", to, ImageFormat::Qcow2, true, &Control::new()).expect("restore from the vault");
}

/// knib's side of a restore from the local store (verified, as by default).
pub(crate) fn knib_restore_store(store: &Path, id: &str, to: &Path) {
    let store = Store::open(store).expect("the store");
    store.restore(id, "root", to, ImageFormat::Qcow2, &Control::new()).expect("restore");
}

/// Delete every backup of the vault's prefix (children first, so each
/// delete expunges), leaving it empty.
fn clear(location: &str) {
    let v = Vault::open(location).expect("the vault");
    for _ in 0..8 {
        let list = v.list(None).expect("list the vault");
        if list.is_empty() {
            return;
        }
        for m in list.iter().rev() {
            v.delete(&m.id).expect("delete from the vault");
        }
    }
    panic!("vault {location}: backups are left after deleting them all");
}

/// The rows' setup.
pub(crate) struct VaultBench<'a> {
    pub(crate) me: &'a str,
    /// The benchmark's disk.
    pub(crate) src: PathBuf,
    /// Work here (the VM's disk, the store, the copies, the restores).
    pub(crate) dir: PathBuf,
    pub(crate) size: u64,
}

/// What the rows measured: the sync's and the restore's tools, and the
/// bytes of the two backups' files (what a sync sends, a restore reads).
pub(crate) struct VaultRows {
    pub(crate) sync: Option<(Vec<Measured>, RowEnv)>,
    pub(crate) restore: Option<(Vec<Measured>, RowEnv)>,
    pub(crate) bytes: u64,
}

/// Run the rows wanted; the vault prefix and the work directory are
/// removed afterwards.
pub(crate) fn rows(b: &VaultBench<'_>, runs: usize, want_sync: bool, want_restore: bool) -> VaultRows {
    // The vault reads its endpoint from AWS_ENDPOINT_URL; the children
    // inherit it.
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        if let Ok(e) = std::env::var("KNIB_S3_ENDPOINT") {
            std::env::set_var("AWS_ENDPOINT_URL", e);
        }
    }
    let bucket = std::env::var("KNIB_S3_BUCKET").unwrap_or_else(|_| "knib-test".into());
    let location = format!("s3://{bucket}/knib-bench-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&b.dir);
    std::fs::create_dir_all(&b.dir).expect("vault work directory");

    // The store: a full backup, 10% of the clusters rewritten, an incremental.
    let disk = b.dir.join("vda.qcow2");
    ok(Command::new("cp").arg("--sparse=always").arg(&b.src).arg(&disk));
    let store_dir = b.dir.join("store");
    let store = Store::create(&store_dir).expect("the store");
    let spec = [DiskSpec { name: "root".into(), path: disk.clone() }];
    let ctl = Control::new();
    store.backup("bench", &spec, &BackupOptions::default(), &ctl).expect("full backup");
    let mut rng = Rng::new(7);
    let (changed, mut written) = (b.size / CS / 10, 0);
    let mut io = vec!["-f".to_string(), "qcow2".to_string()];
    while written < changed {
        let n = (1 + rng.below(16)).min(changed - written);
        let at = rng.below(b.size / CS - n);
        io.push("-c".into());
        io.push(format!("write -q -P {} {} {}", 1 + rng.below(250), at * CS, n * CS));
        written += n;
    }
    io.push(s(&disk));
    ok(Command::new("qemu-io").args(&io));
    let inc = store.backup("bench", &spec, &BackupOptions::default(), &ctl).expect("incremental backup");
    let bytes: u64 = store.list(None).expect("list").iter().flat_map(|m| m.volumes.iter().map(|v| v.size)).sum();
    ok(Command::new("sync").arg("-f").arg(&store_dir));
    let store_s = s(&store_dir);

    let mut out = VaultRows { sync: None, restore: None, bytes };
    if want_sync {
        eprintln!("vault: sync a full and an incremental backup ({:.1} MiB)", bytes as f64 / (1 << 20) as f64);
        let copy = b.dir.join("copy");
        let clear_vault = |_run: usize| clear(&location);
        let empty_copy = |_run: usize| {
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy).expect("copy directory");
        };
        let (mut m, env) = compare_serving(
            runs,
            &[
                // Its output is in the vault: the store directory stands in
                // for it (fsynced: nothing to do), its size set below.
                Tool::new("knib sync", vec![cmd(&[b.me, "op", "vault-sync", &store_s, &location])], &store_dir)
                    .setup(&clear_vault),
                Tool::new(
                    "cp -r (into a local store directory)",
                    vec![cmd(&["cp", "-r", &s(&store_dir.join("vms")), &s(&copy)])],
                    &copy,
                )
                .sync_fs()
                .setup(&empty_copy),
            ],
            SERVERS,
        );
        m[0].out_bytes = bytes;
        out.sync = Some((m, env));
    }
    if want_restore {
        if !want_sync {
            knib_sync(&store_dir, &location);
        }
        eprintln!("vault: restore the incremental backup");
        let (ko, lo) = (b.dir.join("restored-vault.qcow2"), b.dir.join("restored-local.qcow2"));
        out.restore = Some(compare_serving(
            runs,
            &[
                Tool::new(
                    "knib restore from the vault",
                    vec![cmd(&[b.me, "op", "vault-restore", &location, &inc.id, &s(&ko)])],
                    &ko,
                ),
                Tool::new(
                    "knib restore from the local store",
                    vec![cmd(&[b.me, "op", "store-restore", &store_s, &inc.id, &s(&lo)])],
                    &lo,
                ),
            ],
            SERVERS,
        ));
    }
    clear(&location);
    let _ = std::fs::remove_dir_all(&b.dir);
    out
}
