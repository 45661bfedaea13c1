//! Incremental backups of a running domain (real libvirt and QEMU) with
//! disk-only VM snapshots taken since the last backup
//! (`vm_snapshot_delta_paths`): after one and after two snapshots, and the
//! incremental after them, each restored and compared with what the guest
//! had written (writes made through the monitor), the guest still reading
//! every write.

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};

use common::disk::{assert_identical, make_disk, qemu_io, snapshot};
use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::api::call;
use knib_core::qemu_img::QemuImg;
use knib_core::Control;
use serde_json::{json, Value};

const DISKS: [(&str, u64); 2] = [("vda", 32 * MIB), ("vdb", 16 * MIB)];

fn ok(op: &str, req: &Value) -> Value {
    call(op, &req.to_string(), &Control::new())
        .map(|a| serde_json::from_str(&a).expect("answers are JSON"))
        .unwrap_or_else(|e| panic!("{op}: {e}\nrequest: {req:#}"))
}

fn chain(vm: &TestVm, target: &str) -> Vec<PathBuf> {
    vm.disk(target).chain_files().into_iter().map(Path::to_path_buf).collect()
}

fn store_file(store: &Path, n: u32, t: &str) -> PathBuf {
    store.join(format!("backup-{n}")).join(format!("{t}.qcow2"))
}

/// The volumes of backup `n` as the management server sends them, with `k`
/// VM snapshots taken since the last backup: `path` the top, `merge.child`
/// the old delta (`k` layers below), `merge.parent` the layer below it,
/// `grand_children` the layer over it, `vm_snapshot_delta_paths` the old
/// delta and the snapshot deltas but the top, oldest first.
fn volumes(vm: &TestVm, store: &Path, n: u32, parent: Option<u32>, k: usize) -> Value {
    let vols: Vec<Value> = DISKS
        .iter()
        .map(|(t, _)| {
            let c = chain(vm, t);
            let base = vm.initial_file(t);
            let mut v = json!({
                "uuid": format!("uuid-{t}"),
                "path": c[0],
                "delta_path_on_primary": base.with_file_name(format!("delta-{t}-{n}")),
                "delta_path_on_store": store_file(store, n, t),
            });
            if c.len() > k + 1 {
                v["merge"] = json!({"parent": c[k + 1], "child": c[k]});
                if k > 0 {
                    v["merge"]["grand_children"] = json!([c[k - 1]]);
                    v["vm_snapshot_delta_paths"] = json!(c[1..=k].iter().rev().collect::<Vec<_>>());
                }
            }
            if let Some(p) = parent {
                v["parent_backup_path"] = json!(store_file(store, p, t));
            }
            v
        })
        .collect();
    json!(vols)
}

fn vm_snapshot(vm: &TestVm, name: &str) -> Vec<PathBuf> {
    let files: Vec<(String, PathBuf)> =
        DISKS.iter().map(|(t, _)| (t.to_string(), vm.initial_file(t).with_file_name(format!("{name}-{t}")))).collect();
    vm.vm.snapshot_disk_only(&files, false).unwrap();
    files.into_iter().map(|f| f.1).collect()
}

#[test]
fn incrementals_of_a_running_domain_after_one_and_two_vm_snapshots() {
    if skip_without_libvirt("agent backups with VM snapshots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::create("knib-snaps", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    let mut at = 0u64;
    let mut write = |model: &mut Model, p: u8| {
        for (t, _) in DISKS {
            model.write(&vm, t, p, at, 192 * 1024);
        }
        at += 256 * 1024;
    };
    write(&mut model, 0x11);
    let n1 = model.writes.len();
    let a = ok(
        "agent.take_backup",
        &json!({"domain": vm.name(), "running": true, "volumes": volumes(&vm, &store, 1, None, 0)}),
    );
    assert_eq!(a["kind"], "full");

    // One VM snapshot since the last backup.
    write(&mut model, 0x21);
    let s1 = vm_snapshot(&vm, "s1");
    write(&mut model, 0x22);
    let n2 = model.writes.len();
    // Another branch of vda's snapshot tree on the old delta (a VM
    // snapshot reverted from): the merge must leave it whole, on the base.
    let old_vda = chain(&vm, "vda")[1].clone();
    let branch = dir.path().join("branch-vda");
    make_disk(&branch, 32 * MIB, &["-u", "-F", "qcow2", "-b", old_vda.to_str().unwrap()]);
    qemu_io(&branch, &format!("write -P 0x5b {} 64k", 64 * 1024));
    let branch_then = dir.path().join("branch-then.qcow2");
    snapshot(&branch, &branch_then);
    let mut vols = volumes(&vm, &store, 2, Some(1), 1);
    vols[0]["merge"]["grand_children"].as_array_mut().unwrap().push(json!(branch));
    let a = ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": vols.clone()}));
    assert_eq!(a["kind"], "incremental");
    assert!(!old_vda.exists());
    let info = QemuImg::new().info(&branch, &Control::new()).unwrap();
    assert_eq!(
        info.full_backing_filename.map(PathBuf::from),
        Some(vm.initial_file("vda")),
        "the branch was not re-pointed"
    );
    assert_identical(&branch, &branch_then);
    // The clean-up of the same request (as after a crash between the merge's
    // steps) finds the branch on the base already: left as it is, not
    // refused; the chains below are checked unchanged.
    let c = ok("agent.cleanup_vm_backup", &json!({"domain": vm.name(), "volumes": vols, "mode": "complete"}));
    assert_eq!(c["published"], true, "{c:#}");
    assert_identical(&branch, &branch_then);
    for (i, (t, _)) in DISKS.iter().enumerate() {
        let now = chain(&vm, t);
        let d2 = vm.initial_file(t).with_file_name(format!("delta-{t}-2"));
        assert_eq!(now, vec![d2.clone(), s1[i].clone(), vm.initial_file(t)], "the old delta is merged, s1 kept");
        assert_eq!(a["volumes"][i]["new_volume_path"], json!(d2));
        assert!(!vm.initial_file(t).with_file_name(format!("delta-{t}-1")).exists());
        let info = QemuImg::new().info(&store_file(&store, 2, t), &Control::new()).unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some(format!("../backup-1/{t}.qcow2").as_str()));
    }

    // Two.
    write(&mut model, 0x31);
    vm_snapshot(&vm, "s2");
    write(&mut model, 0x32);
    let s3 = vm_snapshot(&vm, "s3");
    write(&mut model, 0x33);
    let n3 = model.writes.len();
    ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 3, Some(2), 2)}));
    for (i, (t, _)) in DISKS.iter().enumerate() {
        let now = chain(&vm, t);
        assert_eq!(now[0], vm.initial_file(t).with_file_name(format!("delta-{t}-3")));
        assert_eq!(now[1], s3[i]);
        assert_eq!(now.len(), 5, "delta-3, s3, s2, s1, base: {now:?}");
    }

    // The next incremental still holds every write.
    write(&mut model, 0x41);
    let n4 = model.writes.len();
    ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 4, Some(3), 0)}));

    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (n, upto) in [(1, n1), (2, n2), (3, n3), (4, n4)] {
        for (t, _) in DISKS {
            let to = out.join(format!("{t}-{n}.qcow2"));
            ok(
                "agent.restore",
                &json!({"volumes": [{"uuid": t, "backup_path": store_file(&store, n, t), "volume_path": to}]}),
            );
            model.assert_restored(t, upto, &to, dir.path());
        }
    }
    model.assert_vm_reads_everything(&vm);
}

const CHILD_ENV: &str = "KNIB_SNAPSHOTS_LIVE_CHILD_REQUEST";

/// The child process of the crash test below: runs `agent.take_backup`
/// with the request in `KNIB_SNAPSHOTS_LIVE_CHILD_REQUEST` (the crash hook
/// aborts it).
#[test]
fn child_take_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let _ = call("agent.take_backup", &req, &Control::new());
}

/// A crash after the block commit of the old delta and before the rebase
/// of another branch of the snapshot tree on it (a grand child), then
/// `agent.cleanup_vm_backup` (mode complete): the old delta is out of the
/// disk's chain, its data in the base, and the branch still reads through
/// it. The cleanup re-points the branch at the base before removing the
/// old delta: the branch still opens, passes `qemu-img check` and reads
/// what it read before. (Before the fix the cleanup removed the old delta
/// under the branch, which then no longer opened.)
#[test]
fn a_crash_before_a_grand_childs_rebase_then_cleanup_keeps_the_branch() {
    if skip_without_libvirt("crash before a grand child's rebase") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::create("knib-gcrash", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    for (t, _) in DISKS {
        model.write(&vm, t, 0x11, 0, 192 * 1024);
    }
    ok(
        "agent.take_backup",
        &json!({"domain": vm.name(), "running": true, "volumes": volumes(&vm, &store, 1, None, 0)}),
    );
    for (t, _) in DISKS {
        model.write(&vm, t, 0x21, 256 * 1024, 192 * 1024);
    }
    vm_snapshot(&vm, "s1");
    for (t, _) in DISKS {
        model.write(&vm, t, 0x22, 512 * 1024, 192 * 1024);
    }
    let old_vda = chain(&vm, "vda")[1].clone();
    let branch = dir.path().join("branch-vda");
    make_disk(&branch, 32 * MIB, &["-u", "-F", "qcow2", "-b", old_vda.to_str().unwrap()]);
    qemu_io(&branch, &format!("write -P 0x5b {} 64k", 64 * 1024));
    let branch_then = dir.path().join("branch-then.qcow2");
    snapshot(&branch, &branch_then);
    let mut vols = volumes(&vm, &store, 2, Some(1), 1);
    vols[0]["merge"]["grand_children"].as_array_mut().unwrap().push(json!(branch));
    let req = json!({"domain": vm.name(), "volumes": vols.clone()});

    let note = dir.path().join("note");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_take_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, req.to_string())
        .env(knib_core::crashpoint::CRASH_BEFORE_ENV, format!("rebase of {}", branch.display()))
        .env(knib_core::crashpoint::NOTE_ENV, &note)
        .output()
        .unwrap();
    let noted = std::fs::read_to_string(&note).unwrap_or_default();
    assert!(
        !out.status.success() && noted.contains(&format!("rebase of {}", branch.display())),
        "the child did not crash before the branch's rebase (note {noted:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The crash came where it was meant to: the old delta committed, out
    // of the chain, still there, and the branch still on it.
    assert!(old_vda.exists());
    assert!(!chain(&vm, "vda").contains(&old_vda), "{:?}", chain(&vm, "vda"));
    let backing = |f: &Path| QemuImg::new().info(f, &Control::new()).unwrap().full_backing_filename.map(PathBuf::from);
    assert_eq!(backing(&branch), Some(old_vda.clone()));

    let mut creq = req.clone();
    creq["mode"] = json!("complete");
    // While the branch cannot be re-pointed (another process holds it, as
    // QEMU would), the cleanup fails naming it and keeps the old delta.
    let held = std::fs::File::options().read(true).write(true).open(&branch).unwrap();
    assert!(knib_core::lock::lock_like_qemu_writer(&held).unwrap());
    let e = call("agent.cleanup_vm_backup", &creq.to_string(), &Control::new()).unwrap_err();
    assert!(e.message.contains(&format!("{} is kept", old_vda.display())), "{e}");
    assert!(e.message.contains(&branch.display().to_string()), "the error names the branch: {e}");
    assert!(old_vda.exists(), "the old delta is kept while the branch reads through it");
    assert_eq!(backing(&branch), Some(old_vda.clone()));
    assert_identical(&branch, &branch_then);
    drop(held);
    let c = ok("agent.cleanup_vm_backup", &creq);
    assert_eq!(c["published"], true, "{c:#}");
    assert_eq!(c["vm_consistent"], true, "{c:#}");
    assert!(!old_vda.exists(), "the old delta is removed");
    assert_eq!(backing(&branch), Some(vm.initial_file("vda")), "the branch is on the base");
    common::disk::assert_check_clean(&branch);
    let chain_out =
        std::process::Command::new("qemu-img").args(["info", "-U", "--backing-chain"]).arg(&branch).output().unwrap();
    assert!(chain_out.status.success(), "{}", String::from_utf8_lossy(&chain_out.stderr));
    assert_identical(&branch, &branch_then);
    for (t, _) in DISKS {
        assert_eq!(chain(&vm, t)[0], vm.initial_file(t).with_file_name(format!("delta-{t}-2")));
        assert_eq!(chain(&vm, t).len(), 3, "delta-2, s1, base: {:?}", chain(&vm, t));
    }
    model.assert_vm_reads_everything(&vm);
}
