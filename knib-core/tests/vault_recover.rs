//! Recovery of an interrupted backup of a domain with a vault given
//! (`knib recover --vault`), against a real S3 server (Ceph RGW,
//! `scripts/ceph.sh`; see `common/s3.rs`) and the libvirt daemon: a
//! vault's backup is discarded only when the journal says the backup was
//! being written to that vault and the vault has no manifest of it; a
//! published backup (a journal of a backup into the store naming its id)
//! keeps every object, and one whose manifest cannot be read stops the
//! recovery with an error, keeping every object.

#![cfg(feature = "libvirt")]

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::disk::*;
use common::vm::{skip_without_libvirt, TestVm};
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::engine::live::{delta_path, DiskPlan, LivePlan};
use knib_core::engine::{BackupKind, DataPath};
use knib_core::vault::{SyncOptions, Vault};
use knib_core::Control;

/// A backup id no backup of these tests has.
const UNFINISHED: &str = "20261201-050000000-00aa";

/// The plan of a full backup `id` of the stopped domain's disk `vda` (on
/// `base`), its file written to `dest`, interrupted before its snapshot
/// was taken.
fn plan(id: &str, base: &Path, dest: PathBuf) -> LivePlan {
    LivePlan {
        backup_id: id.into(),
        kind: BackupKind::Full,
        end_of_chain: false,
        quiesce: false,
        running: false,
        disks: vec![DiskPlan {
            target: "vda".into(),
            base: base.to_path_buf(),
            old_delta: None,
            new_delta: delta_path(base, id),
            dest,
            parent: None,
            virtual_size: 16 << 20,
            snapshots: Vec::new(),
            grand_children: Vec::new(),
        }],
        data_path: DataPath::default(),
        compress: None,
        check_output: false,
    }
}

/// Write the journal of `vm` in `store`: `plan` at step `step`, naming
/// `vault` when given.
fn write_journal(store: &Store, vm: &str, step: &str, plan: &LivePlan, vault: Option<&str>) -> PathBuf {
    let dir = store.root().join("vms").join(vm);
    std::fs::create_dir_all(&dir).unwrap();
    let mut j = serde_json::json!({"schema": 1, "step": step, "plan": plan});
    if let Some(v) = vault {
        j["vault"] = serde_json::json!(v);
    }
    let path = dir.join("journal.json");
    std::fs::write(&path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    path
}

/// The keys of the prefix under `vms/<vm>/<id>/`, with their sizes.
fn backup_keys(p: &s3::Prefix, vm: &str, id: &str) -> BTreeMap<String, u64> {
    let under = format!("vms/{vm}/{id}/");
    p.keys().into_iter().filter(|(k, _)| k.starts_with(&under)).collect()
}

#[test]
fn recover_with_a_vault_discards_only_the_unpublished_backup_its_journal_names() {
    if !s3::setup() || skip_without_libvirt("vault recover") {
        return;
    }
    let ctl = Control::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let vm = TestVm::define_stopped("knib-vrec", &[("vda", 16 << 20)], dir.path());
    let name = vm.name().to_string();
    let base = vm.disk("vda").file;
    let store = Store::create(dir.path().join("store")).unwrap();
    let p = s3::Prefix::new("vault-recover");
    let vault = Vault::open(&p.location()).unwrap();

    // A backup of the VM published in the vault, not in the store (taken
    // from a copy of its disk: the domain's own is left as it is).
    let copy = dir.path().join("copy.qcow2");
    make_disk(&copy, 16 << 20, &[]);
    qemu_io(&copy, "write -P 0x5a 0 6M");
    let disks = [DiskSpec { name: "vda".into(), path: copy.clone() }];
    let sent =
        vault.backup_direct(&store, &name, &disks, &BackupOptions::default(), &SyncOptions::direct(), &ctl).unwrap();
    let x = sent.id.clone();
    assert!(store.list(None).unwrap().is_empty());
    let kept = backup_keys(&p, &name, &x);
    assert!(kept.contains_key(&format!("vms/{name}/{x}/manifest.json")), "{kept:?}");
    assert!(kept.contains_key(&format!("vms/{name}/{x}/vda.qcow2")), "{kept:?}");

    // 1. The journal of a backup into the store (no `vault`) that has the
    // id of the vault's backup: recovered as the store's, unpublished; the
    // vault's backup is not this journal's to discard.
    let store_vm = store.root().join("vms").join(&name);
    let in_store = plan(&x, &base, store_vm.join(format!(".{x}.part/vda.qcow2")));
    let journal = write_journal(&store, &name, "copy", &in_store, None);
    let out = vault.recover_domain(&store, &vm.vm, &ctl).unwrap();
    assert_eq!((out.backup_id.as_deref(), out.published), (Some(x.as_str()), false), "{out:?}");
    assert!(!journal.exists());
    assert_eq!(backup_keys(&p, &name, &x), kept, "the vault's published backup {x} was discarded");
    let listed: Vec<String> = vault.list(Some(&name)).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(listed, [x.as_str()]);
    assert_eq!(vm.disk("vda").file, base);

    // 2. A journal naming the vault, of a backup there with no manifest:
    // its objects are discarded, and only they.
    let dest = |id: &str| PathBuf::from(format!("{}/vms/{name}/{id}/vda.qcow2", p.location()));
    p.put(&format!("vms/{name}/{UNFINISHED}/vda.qcow2"), vec![0x42; 4096]);
    let to_vault = plan(UNFINISHED, &base, dest(UNFINISHED));
    let journal = write_journal(&store, &name, "copy", &to_vault, Some(&p.location()));
    let out = vault.recover_domain(&store, &vm.vm, &ctl).unwrap();
    assert_eq!((out.backup_id.as_deref(), out.published), (Some(UNFINISHED), false), "{out:?}");
    assert!(!journal.exists());
    assert!(backup_keys(&p, &name, UNFINISHED).is_empty(), "{:?}", p.keys());
    assert_eq!(backup_keys(&p, &name, &x), kept);

    // 3. A journal naming the vault, of a backup there whose manifest
    // cannot be read: neither published nor unfinished, so the recovery
    // stops with an error naming it, keeps its journal and discards nothing.
    let manifest = format!("vms/{name}/{x}/manifest.json");
    p.put(&manifest, b"{\"schema\": 1, \"id\": ".to_vec());
    let damaged = backup_keys(&p, &name, &x);
    let journal = write_journal(&store, &name, "copy", &plan(&x, &base, dest(&x)), Some(&p.location()));
    let e = vault.recover_domain(&store, &vm.vm, &ctl).unwrap_err();
    assert_eq!(e.kind, knib_core::ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("backup {x} of {name} has a manifest that cannot be read")), "{e}");
    assert!(journal.exists(), "the journal of a recovery that stopped is kept");
    assert_eq!(backup_keys(&p, &name, &x), damaged, "backup {x}, with a manifest that cannot be read, was discarded");
    assert_eq!(p.get(&manifest), b"{\"schema\": 1, \"id\": ");
    assert_eq!(vm.disk("vda").file, base);
}
