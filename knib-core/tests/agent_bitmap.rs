//! The CloudStack agent's backups by method `bitmap` (`agent.take_backup`
//! and `agent.cleanup_vm_backup` with `"method": "bitmap"`) of a running
//! domain, against the real libvirt and QEMU: a full and incrementals in
//! the agent's store layout, each restored and compared with what the guest
//! had written; the disks' chains never touched; a checkpoint removed
//! behind knib's back (the next incremental copies every cluster over its
//! parent and says why); a failed backup cleaned up (discarded, and the
//! next incremental still holds every write); requests the method refuses;
//! stopped VMs, with a domain or without one (persistent bitmaps in the
//! volumes' files).

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};

use common::bitmaps::{file_bitmaps, knib_checkpoints};
use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::api::call;
use knib_core::Control;
use serde_json::{json, Value};

const DISKS: [(&str, u64); 2] = [("vda", 32 * MIB), ("vdb", 16 * MIB)];

fn call_json(op: &str, req: &Value) -> knib_core::Result<Value> {
    call(op, &req.to_string(), &Control::new()).map(|a| serde_json::from_str(&a).expect("answers are JSON"))
}

fn ok(op: &str, req: &Value) -> Value {
    call_json(op, req).unwrap_or_else(|e| panic!("{op}: {e}\nrequest: {req:#}"))
}

/// Backup `n`'s file of disk `t`, named by a uuid of its own as
/// CloudStack names them.
fn store_file(store: &Path, n: u32, t: &str) -> PathBuf {
    store.join(format!("vol-{t}")).join(format!("0000000{n}-aaaa-bbbb-cccc-{t}"))
}

fn volumes(vm: &TestVm, store: &Path, n: u32, parent: Option<u32>) -> Value {
    json!(DISKS
        .iter()
        .map(|(t, _)| {
            let mut v = json!({
                "uuid": format!("uuid-{t}"),
                "path": vm.initial_file(t),
                // Not created by method bitmap.
                "delta_path_on_primary": vm.initial_file(t).with_file_name(format!("delta-{t}-{n}")),
                "delta_path_on_store": store_file(store, n, t),
            });
            if let Some(p) = parent {
                v["parent_backup_path"] = json!(store_file(store, p, t));
            }
            v
        })
        .collect::<Vec<_>>())
}

fn take(vm: &TestVm, store: &Path, n: u32, parent: Option<u32>) -> Value {
    ok("agent.take_backup", &json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(vm, store, n, parent)}))
}

fn assert_chains_untouched(vm: &TestVm) {
    for d in vm.disks() {
        assert!(d.backing_chain.is_empty(), "disk {} runs on {:?}", d.target, d.chain_files());
        assert_eq!(d.file, vm.initial_file(&d.target));
        let n = d.file.file_name().unwrap().to_string_lossy().into_owned();
        let left: Vec<_> = std::fs::read_dir(d.file.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("delta-") || f.ends_with(".nbd"))
            .collect();
        assert!(left.is_empty(), "beside {n}: {left:?}");
    }
}

#[test]
fn agent_backups_by_bitmap_follow_the_parent_checkpoint() {
    if skip_without_libvirt("agent backups by bitmap") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::create("knib-abm", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    let mut at = 0u64;
    let mut write = |model: &mut Model, p: u8| {
        for (t, _) in DISKS {
            model.write(&vm, t, p, at, 128 * 1024);
        }
        at += 192 * 1024;
    };
    let ckpt = |n: u32| format!("knib-{}", store_file(&store, n, "vda").file_name().unwrap().to_string_lossy());

    write(&mut model, 0x11);
    // Much more before the full than between backups.
    model.write(&vm, "vda", 0x12, 16 * MIB, 4 * MIB);
    model.write(&vm, "vdb", 0x12, 8 * MIB, 4 * MIB);
    let mut upto = vec![(1, model.writes.len())];
    let a = take(&vm, &store, 1, None);
    assert_eq!(a["kind"], "full");
    assert!(a.get("full_reason").is_none(), "{a:#}");
    assert_eq!(a["volumes"][0]["new_volume_path"], json!(vm.initial_file("vda")));
    assert_eq!(knib_checkpoints(&vm), vec![ckpt(1)]);
    assert_chains_untouched(&vm);

    // An incremental follows backup 1's checkpoint: only what changed.
    write(&mut model, 0x22);
    upto.push((2, model.writes.len()));
    let a = take(&vm, &store, 2, Some(1));
    assert_eq!(a["kind"], "incremental");
    assert!(a.get("full_reason").is_none(), "{a:#}");
    assert_eq!(knib_checkpoints(&vm), vec![ckpt(2)], "the parent's checkpoint goes, the new one stays");
    let size2 = a["volumes"][0]["size"].as_u64().unwrap();
    let size1 = std::fs::metadata(store_file(&store, 1, "vda")).unwrap().len();
    assert!(size2 < size1, "an incremental by bitmap ({size2} bytes) is smaller than the full ({size1})");
    for (t, _) in DISKS {
        let info = knib_core::qemu_img::QemuImg::new().info(&store_file(&store, 2, t), &Control::new()).unwrap();
        let want = format!("0000000{}-aaaa-bbbb-cccc-{t}", 1);
        assert_eq!(info.backing_filename.as_deref(), Some(want.as_str()));
    }

    // A failed backup (here: one the management server gives up on after
    // it was stored) is cleaned up: its files and checkpoint go, the
    // parent's checkpoint (2) covers its writes again.
    write(&mut model, 0x33);
    let req3 = json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(&vm, &store, 3, Some(2))});
    ok("agent.take_backup", &req3);
    let mut cleanup = req3.clone();
    cleanup["mode"] = json!("discard");
    let c = ok("agent.cleanup_vm_backup", &cleanup);
    assert_eq!(c["published"], true);
    for (t, _) in DISKS {
        assert!(!store_file(&store, 3, t).exists(), "discarded backup 3 of {t} is removed");
    }
    assert!(knib_checkpoints(&vm).is_empty() || knib_checkpoints(&vm) == vec![ckpt(2)], "{:?}", knib_checkpoints(&vm));

    // The next incremental over backup 2 holds backup 3's writes too, as
    // a checkpoint of 2 is gone after the cleanup (libvirt merged 3's
    // bitmap into 2's; on a libvirt that deleted 2 with it, knib copies
    // every cluster over the parent and says why).
    write(&mut model, 0x44);
    upto.push((4, model.writes.len()));
    let a = take(&vm, &store, 4, Some(2));
    assert_eq!(a["kind"], "incremental");

    // A checkpoint removed behind knib's back: the next incremental is
    // still exact, every cluster copied over the parent, and says why.
    for c in knib_checkpoints(&vm) {
        let out = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "checkpoint-delete", vm.name(), &c])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    write(&mut model, 0x55);
    upto.push((5, model.writes.len()));
    let a = take(&vm, &store, 5, Some(4));
    assert_eq!(a["kind"], "incremental");
    let why = a["full_reason"].as_str().unwrap_or_else(|| panic!("no full_reason: {a:#}"));
    assert!(why.contains(&ckpt(4)), "{why}");
    assert_eq!(knib_checkpoints(&vm), vec![ckpt(5)]);
    assert_chains_untouched(&vm);

    // Every backup restores to what the guest had at its instant.
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (n, k) in upto {
        for (t, _) in DISKS {
            let to = out.join(format!("{n}-{t}.qcow2"));
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(store_file(&store, n, t))
                .arg(&to)
                .status()
                .unwrap();
            assert!(st.success());
            model.assert_restored(t, k, &to, &out);
        }
    }
    model.assert_vm_reads_everything(&vm);
}

/// A bitmap cleanup never removes the volume's own file, nor a file of the
/// parent backup's chain, named as the backup file (`delta_path_on_store`):
/// refused as a backup would be, invalid input, nothing removed. Before,
/// the cleanup of a VM without a domain removed the disk.
/// While a take of a domain's volumes runs, a cleanup of the same volumes
/// (CloudStack's, after it gave up waiting for the take), a second take, a
/// consolidation and a VM snapshot merge are busy, naming a volume:
/// before, the cleanup ran beside the take, aborted its job and removed
/// its files, and the consolidation and the merge took no lock. The take
/// then ends whole.
#[test]
fn a_cleanup_or_a_second_take_while_a_take_runs_is_busy() {
    if skip_without_libvirt("agent bitmap busy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let store = base.join("store");
    let vm = TestVm::create("knib-abbusy", &DISKS, &base, TestVmOptions { running: true, ..Default::default() });
    let req = |n: u32| json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(&vm, &store, n, None)});
    let at = format!("copy of disk vda of domain {}", vm.name());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(8));
    let first = req(1);
    let taking = std::thread::spawn(move || call_json("agent.take_backup", &first));
    assert!(knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)), "no pause at {at}");
    let mut cleanup = req(1);
    cleanup["mode"] = json!("discard");
    let vda = vm.initial_file("vda");
    let consolidate = json!({"domain": vm.name(), "volumes": [{"path": vda}]});
    let merge = json!({"domain": vm.name(), "merges": [{"uuid": "u", "parent": base.join("p.qcow2"), "child": vda}]});
    for (op, r) in [
        ("agent.cleanup_vm_backup", cleanup),
        ("agent.take_backup", req(2)),
        ("agent.consolidate", consolidate),
        ("agent.merge_snapshot", merge),
    ] {
        let e = call_json(op, &r).unwrap_err();
        assert_eq!(e.kind, knib_core::ErrorKind::Busy, "{op}: {e}");
        assert!(e.message.contains(&vm.initial_file("vda").display().to_string()), "{op}: {e}");
    }
    let a = taking.join().unwrap().unwrap();
    assert_eq!(a["kind"], json!("full"), "{a}");
    for (t, _) in DISKS {
        assert!(store_file(&store, 1, t).is_file(), "backup file of {t}");
        assert!(!store_file(&store, 2, t).exists(), "the refused take wrote {t}");
    }
    assert_chains_untouched(&vm);
}

#[test]
fn a_bitmap_cleanup_never_removes_the_disk_or_the_parent_backup() {
    if skip_without_libvirt("bitmap cleanup refusals") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ab12.qcow2");
    let parent = dir.path().join("parent.qcow2");
    for f in [&disk, &parent] {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(f)
            .arg("8M")
            .status()
            .unwrap();
        assert!(st.success());
    }
    for (mode, store_file, named) in
        [("discard", &disk, "path"), ("complete", &disk, "path"), ("discard", &parent, "chain of parent_backup_path")]
    {
        let v = json!([{"uuid": "u", "path": disk, "delta_path_on_primary": dir.path().join("new"),
            "delta_path_on_store": store_file, "parent_backup_path": parent}]);
        let before = (std::fs::read(&disk).unwrap(), std::fs::read(&parent).unwrap());
        let e = call_json(
            "agent.cleanup_vm_backup",
            &json!({"running": false, "method": "bitmap", "mode": mode, "volumes": v}),
        )
        .unwrap_err();
        assert_eq!(e.kind, knib_core::ErrorKind::InvalidInput, "{mode}: {e}");
        let says = format!(
            "request of agent.cleanup_vm_backup: volumes[0].delta_path_on_store {} is the volume's {named}",
            store_file.display()
        );
        assert!(e.message.starts_with(&says), "{mode}: {e}");
        assert_eq!((std::fs::read(&disk).unwrap(), std::fs::read(&parent).unwrap()), before, "{mode}: a file changed");
    }
}

#[test]
fn method_bitmap_refuses_what_it_cannot_do() {
    if skip_without_libvirt("agent bitmap refusals") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // No domain, and the volume's file is missing.
    let missing = dir.path().join("d.qcow2");
    let v = json!([{"uuid": "u", "path": missing, "delta_path_on_primary": dir.path().join("n"),
        "delta_path_on_store": store.join("x")}]);
    let e = call_json("agent.take_backup", &json!({"running": false, "method": "bitmap", "volumes": v})).unwrap_err();
    assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    assert_eq!(e.vm_consistent, Some(true));

    let vm = TestVm::create(
        "knib-abr",
        &DISKS,
        dir.path(),
        TestVmOptions { running: true, persistent: true, ..Default::default() },
    );
    // Nothing is merged by bitmap.
    let mut vols = volumes(&vm, &store, 1, None);
    vols[0]["merge"] = json!({"parent": vm.initial_file("vda"), "child": vm.initial_file("vda")});
    let e =
        call_json("agent.take_backup", &json!({"domain": vm.name(), "method": "bitmap", "volumes": vols})).unwrap_err();
    assert!(e.to_string().contains("`merge` and `vm_snapshot_delta_paths` must be absent"), "{e}");
    // A misspelt method names the field's values.
    let e = call_json(
        "agent.take_backup",
        &json!({"domain": vm.name(), "method": "bitmaps", "volumes": volumes(&vm, &store, 1, None)}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bitmaps"), "{e}");
    assert!(knib_checkpoints(&vm).is_empty());
    assert!(!store.exists() || std::fs::read_dir(&store).unwrap().next().is_none(), "nothing written to the store");
    // `running: false` for a domain that runs.
    let e = call_json(
        "agent.take_backup",
        &json!({"domain": vm.name(), "running": false, "method": "bitmap", "volumes": volumes(&vm, &store, 1, None)}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("field `running` is false"), "{e}");
}

#[test]
fn stopped_vms_with_or_without_a_domain_are_backed_up_by_persistent_bitmaps() {
    if skip_without_libvirt("agent bitmap backups of stopped VMs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::define_stopped("knib-abs", &DISKS, dir.path());
    let file = |t: &str| vm.initial_file(t);
    let ckpt = |n: u32| format!("knib-{}", store_file(&store, n, "vda").file_name().unwrap().to_string_lossy());
    // CloudStack's stopped VMs have no domain: the request names the files.
    let req = |n: u32, parent: Option<u32>, domain: bool| {
        let mut r = json!({"running": false, "method": "bitmap", "volumes": volumes(&vm, &store, n, parent)});
        if domain {
            r["domain"] = json!(vm.name());
        }
        r
    };
    let mut model = Model::new(&DISKS);
    let mut upto = Vec::new();
    model.write_file(&file("vda"), "qcow2", "vda", 0x41, 0, 4 * MIB);
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x42, MIB, 4 * MIB);
    let a = ok("agent.take_backup", &req(1, None, false));
    assert_eq!(a["kind"], "full");
    assert_eq!(a["volumes"][0]["new_volume_path"], json!(file("vda")));
    for (t, _) in DISKS {
        assert_eq!(file_bitmaps(&file(t)), vec![ckpt(1)], "{t}");
    }
    upto.push((1, model.writes.len()));

    // An incremental follows backup 1's bitmap: only what changed.
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x43, 12 * MIB, 128 * 1024);
    let a = ok("agent.take_backup", &req(2, Some(1), false));
    assert_eq!(a["kind"], "incremental");
    assert!(a.get("full_reason").is_none(), "{a:#}");
    let size2 = std::fs::metadata(store_file(&store, 2, "vda")).unwrap().len();
    let size1 = std::fs::metadata(store_file(&store, 1, "vda")).unwrap().len();
    assert!(size2 * 4 < size1, "unchanged vda: {size2} bytes against the full's {size1}");
    for (t, _) in DISKS {
        assert_eq!(file_bitmaps(&file(t)), vec![ckpt(2)], "{t}: the parent's bitmap goes");
    }
    upto.push((2, model.writes.len()));

    // The same VM named by its stopped domain: libvirt's checkpoints follow.
    model.write_file(&file("vda"), "qcow2", "vda", 0x44, 8 * MIB, MIB);
    let a = ok("agent.take_backup", &req(3, Some(2), true));
    assert_eq!(a["kind"], "incremental");
    assert!(a.get("full_reason").is_none(), "{a:#}");
    assert_eq!(knib_checkpoints(&vm), vec![ckpt(3)]);
    upto.push((3, model.writes.len()));

    // A backup the management server gives up on is discarded: its files
    // and bitmap go; the next incremental of 3 copies every cluster over it
    // and says why.
    model.write_file(&file("vdb"), "qcow2", "vdb", 0x45, 14 * MIB, MIB);
    ok("agent.take_backup", &req(4, Some(3), true));
    let mut cleanup = req(4, Some(3), true);
    cleanup["mode"] = json!("discard");
    let c = ok("agent.cleanup_vm_backup", &cleanup);
    assert_eq!(c["published"], true);
    for (t, _) in DISKS {
        assert!(!store_file(&store, 4, t).exists());
        assert!(file_bitmaps(&file(t)).is_empty(), "{t}: {:?}", file_bitmaps(&file(t)));
    }
    assert!(knib_checkpoints(&vm).is_empty());
    let a = ok("agent.take_backup", &req(5, Some(3), false));
    assert_eq!(a["kind"], "incremental");
    assert!(a["full_reason"].as_str().unwrap_or("").contains("no dirty bitmap"), "{a:#}");
    upto.push((5, model.writes.len()));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".nbd") || f.starts_with("delta-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (n, k) in upto {
        for (t, _) in DISKS {
            let to = out.join(format!("{n}-{t}.qcow2"));
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(store_file(&store, n, t))
                .arg(&to)
                .status()
                .unwrap();
            assert!(st.success());
            model.assert_restored(t, k, &to, &out);
        }
    }
}

const CHILD_ENV: &str = "KNIB_AGENT_BITMAP_CHILD_REQUEST";

/// Run in the child process: the `agent.take_backup` the parent asks for,
/// killed by the crash hook.
#[test]
fn child_take_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let _ = call("agent.take_backup", &req, &Control::new());
}

/// A running domain with a raw disk vda and a qcow2 disk vdb, made in `dir`.
fn raw_disk_vm(prefix: &str, dir: &Path) -> TestVm {
    let opts = TestVmOptions { persistent: false, running: true, agent_channel: false };
    TestVm::create_with_raw(prefix, &DISKS, &["vda"], dir, opts)
}

/// The files of backup `n` restored and compared with what the guest wrote
/// (its first `k` writes).
fn assert_backup_holds(store: &Path, n: u32, model: &Model, k: usize, scratch: &Path) {
    for (t, _) in DISKS {
        let to = scratch.join(format!("{n}-{t}.qcow2"));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(store_file(store, n, t))
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success());
        model.assert_restored(t, k, &to, scratch);
    }
}

/// Through the agent: an end-of-chain incremental by bitmap that fails
/// (cancelled after the guest wrote to its raw disk under the running job)
/// loses no write: the next incremental since the same parent holds it.
/// And one killed midway (a child process), then cleaned up (`discard`),
/// loses none either and the chain goes on by bitmap: the cleanup turns
/// the parent's bitmap on again and merges the failed backup's own into
/// it. Before, the cleanup's plan named no parent: the parent's bitmap of
/// the raw disk stayed stopped, and the next backup copied every cluster.
#[test]
fn a_failed_or_killed_end_of_chain_incremental_loses_no_write_of_a_raw_disk() {
    if skip_without_libvirt("agent bitmap raw end of chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let vm = raw_disk_vm("knib-abrawfail", &base);
    let store = base.join("store");
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x51, 0, MIB);
    take(&vm, &store, 1, None);
    model.write(&vm, "vda", 0x52, 2 * MIB, MIB);
    let last = |n: u32| json!({"domain": vm.name(), "method": "bitmap", "end_of_chain": true, "volumes": volumes(&vm, &store, n, Some(1))});
    // Cancelled: the take undoes itself.
    let cancel = knib_core::CancelToken::new();
    let at = format!("creating {}", store.display());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(3));
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(
                knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)),
                "no pause at {at}"
            );
            vm.write("vda", 0x53, 5 * MIB, MIB);
            cancel.cancel();
        });
        call("agent.take_backup", &last(2).to_string(), &Control::new().with_cancel(cancel.clone())).unwrap_err()
    });
    assert_eq!(e.kind, knib_core::ErrorKind::Cancelled, "{e}");
    model.writes.push(common::model::Write { disk: 0, offset: 5 * MIB, len: MIB, pattern: 0x53 });
    let a = ok("agent.take_backup", &last(2));
    assert_eq!((&a["kind"], &a["full_reason"]), (&json!("incremental"), &Value::Null), "{a}");
    assert_backup_holds(&store, 2, &model, model.writes.len(), &base);
    // The next chain: b1 again, then one killed once its job runs, cleaned up.
    let first = json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(&vm, &store, 11, None)});
    ok("agent.take_backup", &first);
    model.write(&vm, "vda", 0x54, 7 * MIB, MIB);
    let last = |n: u32| json!({"domain": vm.name(), "method": "bitmap", "end_of_chain": true, "volumes": volumes(&vm, &store, n, Some(11))});
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_take_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, last(12).to_string())
        .env(knib_core::crashpoint::CRASH_BEFORE_ENV, format!("copy of disk vda of domain {}", vm.name()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was not killed: {}", String::from_utf8_lossy(&out.stdout));
    model.write(&vm, "vda", 0x55, 9 * MIB, MIB);
    let mut cleanup = last(12);
    cleanup["mode"] = json!("discard");
    let c = ok("agent.cleanup_vm_backup", &cleanup);
    assert_eq!(c["published"], json!(false), "{c}");
    model.write(&vm, "vda", 0x56, 11 * MIB, MIB);
    let a = ok("agent.take_backup", &last(13));
    assert_eq!((&a["kind"], &a["full_reason"]), (&json!("incremental"), &Value::Null), "{a}");
    let vda = std::fs::metadata(store_file(&store, 13, "vda")).unwrap().len();
    assert!(vda < 8 * MIB, "the raw disk's incremental holds its changes only: {vda} bytes");
    assert_backup_holds(&store, 13, &model, model.writes.len(), &base);
}

/// A backup job already running on the domain (here begun outside knib, a
/// pull-mode job) makes a bitmap take busy, and the refusal names the
/// agent's remedy (`agent.cleanup_vm_backup`), not the CLI's (`knib
/// recover`, which before it named to CloudStack). Nothing is written.
#[test]
fn a_take_beside_a_running_backup_job_is_busy_naming_the_agents_remedy() {
    if skip_without_libvirt("agent bitmap running job") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let store = base.join("store");
    let vm = TestVm::create("knib-abjob", &DISKS, &base, TestVmOptions { running: true, ..Default::default() });
    begin_pull_job(&vm, &base);
    let e = call_json(
        "agent.take_backup",
        &json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(&vm, &store, 1, None)}),
    )
    .unwrap_err();
    virsh(&["domjobabort", vm.name()]).unwrap();
    assert_eq!(e.kind, knib_core::ErrorKind::Busy, "{e}");
    assert!(e.message.contains(&format!("a backup job is running on domain {}", vm.name())), "{e}");
    assert!(e.message.contains("agent.cleanup_vm_backup"), "{e}");
    assert!(!e.message.contains("knib recover"), "{e}");
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    assert!(!store.exists() || std::fs::read_dir(&store).unwrap().next().is_none(), "the refused take wrote");
    assert_chains_untouched(&vm);
}

/// A cleanup ends its own backup's job only: a backup job that is not
/// this backup's (its NBD server on another socket; here begun outside
/// knib) is left running, and the cleanup says so. Before, the cleanup of
/// any bitmap backup of the domain aborted whatever job ran on it.
#[test]
fn a_cleanup_leaves_a_backup_job_that_is_not_its_own() {
    if skip_without_libvirt("agent bitmap foreign job") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let store = base.join("store");
    let vm = TestVm::create("knib-abforeign", &DISKS, &base, TestVmOptions { running: true, ..Default::default() });
    begin_pull_job(&vm, &base);
    let mut cleanup = json!({"domain": vm.name(), "method": "bitmap", "volumes": volumes(&vm, &store, 1, None)});
    cleanup["mode"] = json!("discard");
    let a = call_json("agent.cleanup_vm_backup", &cleanup);
    let still = virsh(&["backup-dumpxml", vm.name()]).is_ok();
    virsh(&["domjobabort", vm.name()]).unwrap();
    let a = a.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert!(still, "the cleanup aborted a backup job that was not its own: {a}");
    let said = a["actions"].as_array().unwrap().iter().any(|x| {
        x.as_str()
            .unwrap_or_default()
            .starts_with(&format!("left the backup job running on domain {} alone", vm.name()))
    });
    assert!(said, "{a}");
    assert_chains_untouched(&vm);
}

/// `virsh ARGS` on the test daemon: its standard output, or its error.
fn virsh(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!("virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr))),
    }
}

/// Begin a pull-mode backup job on `vm` outside knib (its NBD server on
/// `dir/job.sock`, its scratch files in `dir`), as another tool would.
fn begin_pull_job(vm: &TestVm, dir: &Path) {
    let xml = dir.join("backup.xml");
    let disks: String = DISKS
        .iter()
        .map(|(t, _)| {
            let scratch = dir.join(format!("scratch-{t}.qcow2"));
            format!("<disk name='{t}' backup='yes' type='file'><scratch file='{}'/></disk>", scratch.display())
        })
        .collect();
    let job = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>{disks}</disks></domainbackup>",
        dir.join("job.sock").display()
    );
    std::fs::write(&xml, job).unwrap();
    virsh(&["backup-begin", vm.name(), &xml.to_string_lossy()]).unwrap();
}
