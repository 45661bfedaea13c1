//! The CloudStack agent's operations (`agent.*` JSON ops) against the real
//! libvirt daemon and qemu-img: backups of a running and of a stopped
//! domain with CloudStack-style file names, compression, restore, quick
//! restore and consolidation, the hash, the clean-up of an interrupted
//! backup (undone or finished), VM snapshot merges and validation.

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};

use common::disk::{assert_identical, make_disk, put_bytes, qemu_io, snapshot, zero_first_data_refcount};
use common::model::Model;
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::api::call;
use knib_core::{Control, ErrorKind, KnibError};
use serde_json::{json, Value};

const DISKS: [(&str, u64); 2] = [("vda", 32 * MIB), ("vdb", 16 * MIB)];

fn agent(op: &str, req: &Value) -> Result<Value, KnibError> {
    call(op, &req.to_string(), &Control::new()).map(|a| serde_json::from_str(&a).expect("answers are JSON"))
}

fn ok(op: &str, req: &Value) -> Value {
    agent(op, req).unwrap_or_else(|e| panic!("{op}: {e}\nrequest: {req:#}"))
}

/// The files a disk runs on now, active file first.
fn chain(vm: &TestVm, target: &str) -> Vec<PathBuf> {
    vm.disk(target).chain_files().into_iter().map(Path::to_path_buf).collect()
}

/// The volumes of a backup request: each disk's current file, a new delta
/// beside the base named like CloudStack's (a uuid-ish name), its file on
/// the store, and for an incremental backup its parent and the merge tree.
fn volumes(vm: &TestVm, store: &Path, n: u32, parent: Option<u32>) -> Value {
    let vols: Vec<Value> = DISKS
        .iter()
        .filter(|(t, _)| vm.disks().iter().any(|d| d.target == *t))
        .map(|(t, _)| {
            let c = chain(vm, t);
            let base = vm.initial_file(t);
            let mut v = json!({
                "uuid": format!("uuid-{t}"),
                "path": c[0],
                "delta_path_on_primary": base.with_file_name(format!("delta-{t}-{n}")),
                "delta_path_on_store": store.join(format!("backup-{n}")).join(format!("{t}.qcow2")),
            });
            if c.len() > 1 {
                v["merge"] = json!({"parent": c[1], "child": c[0]});
            }
            if let Some(p) = parent {
                v["parent_backup_path"] = json!(store.join(format!("backup-{p}")).join(format!("{t}.qcow2")));
            }
            v
        })
        .collect();
    json!(vols)
}

#[test]
fn full_and_incremental_backups_of_a_running_domain_compress_restore_and_hash() {
    if skip_without_libvirt("agent backups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::create("knib-agent", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x11, 0, MIB);
    model.write(&vm, "vdb", 0x12, MIB, 256 * 1024);
    let n1 = model.writes.len();

    let a1 = ok(
        "agent.take_backup",
        &json!({"domain": vm.name(), "running": true, "volumes": volumes(&vm, &store, 1, None)}),
    );
    assert_eq!(a1["kind"], "full");
    assert_eq!(a1["vm_consistent"], true);
    for (i, (t, _)) in DISKS.iter().enumerate() {
        let v = &a1["volumes"][i];
        assert_eq!(v["uuid"], format!("uuid-{t}"));
        let now = chain(&vm, t);
        assert_eq!(v["new_volume_path"], json!(now[0]), "the answer names the file the volume runs on");
        assert_eq!(now.len(), 2, "{t} runs on base <- the new delta: {now:?}");
        assert!(v["size"].as_u64().unwrap() > 0);
    }

    model.write(&vm, "vda", 0x21, 4 * MIB, 512 * 1024);
    model.write(&vm, "vdb", 0x22, 8 * MIB, 64 * 1024);
    let n2 = model.writes.len();
    let a2 = ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 2, Some(1))}));
    assert_eq!(a2["kind"], "incremental");
    for (i, (t, _)) in DISKS.iter().enumerate() {
        let now = chain(&vm, t);
        assert_eq!(a2["volumes"][i]["new_volume_path"], json!(now[0]));
        assert_eq!(now, vec![vm.initial_file(t).with_file_name(format!("delta-{t}-2")), vm.initial_file(t)]);
        let file = store.join("backup-2").join(format!("{t}.qcow2"));
        let info = knib_core::qemu_img::QemuImg::new().info(&file, &Control::new()).unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some(format!("../backup-1/{t}.qcow2").as_str()));
    }

    // Compress and finalize the incremental backup's files.
    let files: Vec<PathBuf> = DISKS.iter().map(|(t, _)| store.join("backup-2").join(format!("{t}.qcow2"))).collect();
    let c = ok("agent.compress", &json!({"files": files, "library": "zstd"}));
    assert_eq!(c["compressed"][0]["library"], "zstd");
    // A finalize interrupted after its first rename (the first .comp is in
    // place, the second not) is asked again: it finishes the second
    // (before, it failed for ever on the first's missing .comp, and the
    // second stayed uncompressed beside its .comp).
    let comp0 = PathBuf::from(format!("{}.comp", files[0].display()));
    std::fs::rename(&comp0, &files[0]).unwrap();
    let f = ok("agent.finalize_compression", &json!({"files": files}));
    assert!(!PathBuf::from(format!("{}.comp", files[1].display())).exists());
    // Asked once more, with nothing left to rename: not found, as before.
    let e = agent("agent.finalize_compression", &json!({"files": files})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let sizes: u64 = files.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert_eq!(f["total_size"].as_u64(), Some(sizes), "the agent's details: the sum of the finalized files' sizes");
    assert_eq!(f["finalized"][1]["path"], json!(files[1]));
    assert!(!PathBuf::from(format!("{}.comp", files[0].display())).exists());

    // Each backup restores to its instant.
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (n, upto) in [(1, n1), (2, n2)] {
        for (t, _) in DISKS {
            let to = out.join(format!("{t}-{n}.qcow2"));
            let backup = store.join(format!("backup-{n}")).join(format!("{t}.qcow2"));
            let r = ok("agent.restore", &json!({"volumes": [{"uuid": t, "backup_path": backup, "volume_path": to}]}));
            assert_eq!(r["volumes"][0]["path"], json!(to));
            model.assert_restored(t, upto, &to, dir.path());
        }
    }

    // The hash of a chain is stable and changes with one byte.
    let chain_files = json!([store.join("backup-1/vda.qcow2"), store.join("backup-2/vda.qcow2")]);
    let h1 = ok("agent.take_hash", &json!({"files": chain_files, "backup_uuid": "b2"}));
    let h2 = ok("agent.take_hash", &json!({"files": chain_files}));
    assert_eq!(h1["hash"], h2["hash"]);
    assert_eq!(h1["backup_uuid"], "b2");
    assert_eq!(h1["files"].as_array().unwrap().len(), 2);
    model.assert_vm_reads_everything(&vm);
}

#[test]
fn cleanup_undoes_an_unfinished_backup_and_finishes_a_copied_one() {
    if skip_without_libvirt("agent cleanup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm =
        TestVm::create("knib-agent-clean", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x31, 0, MIB);
    ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 1, None)}));
    model.write(&vm, "vda", 0x32, 2 * MIB, MIB);

    // Interrupted after the snapshot: the new deltas are on top, nothing is
    // on the store. Cleanup commits them back.
    let req = json!({"domain": vm.name(), "running": true, "volumes": volumes(&vm, &store, 2, Some(1))});
    let before: Vec<Vec<PathBuf>> = DISKS.iter().map(|(t, _)| chain(&vm, t)).collect();
    let news: Vec<(String, PathBuf)> = req["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(DISKS)
        .map(|(v, (t, _))| (t.to_string(), PathBuf::from(v["delta_path_on_primary"].as_str().unwrap())))
        .collect();
    vm.vm.snapshot_disk_only(&news, false).unwrap();
    model.write(&vm, "vdb", 0x33, 0, 128 * 1024);
    let a = ok("agent.cleanup_vm_backup", &req);
    assert_eq!(a["published"], false);
    for (i, (t, _)) in DISKS.iter().enumerate() {
        assert_eq!(chain(&vm, t), before[i], "{t} is back on its chain: {a:#}");
        assert!(!news[i].1.exists());
    }
    assert!(!store.join("backup-2").join("vda.qcow2").exists());

    // The same, the request as the wrapper builds it from the agent's
    // cleanup TOs: `path` is the file the failed delta was to sit on (the
    // base), no `merge`. The new deltas go back into the old deltas, which
    // the request does not name (not through them into the base).
    vm.vm.snapshot_disk_only(&news, false).unwrap();
    model.write(&vm, "vda", 0x35, 5 * MIB, 128 * 1024);
    let mut as_tos = req.clone();
    for (i, v) in as_tos["volumes"].as_array_mut().unwrap().iter_mut().enumerate() {
        v["path"] = json!(before[i].last().unwrap());
        v.as_object_mut().unwrap().remove("merge");
    }
    let a = ok("agent.cleanup_vm_backup", &as_tos);
    for (i, (t, _)) in DISKS.iter().enumerate() {
        assert_eq!(chain(&vm, t), before[i], "{t} is back on its chain: {a:#}");
        assert_eq!(a["volumes"][i]["path"], json!(before[i][0]), "{a:#}");
        assert!(!news[i].1.exists());
    }
    model.assert_vm_reads_everything(&vm);

    // Interrupted after the copy: the backup is complete on the store.
    let stored = || -> Vec<PathBuf> {
        vm.vm.snapshot_disk_only(&news, false).unwrap();
        let mut out = Vec::new();
        for (i, (t, _)) in DISKS.iter().enumerate() {
            let v = &req["volumes"][i];
            let dest = PathBuf::from(v["delta_path_on_store"].as_str().unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "qcow2", "-B"])
                .arg(format!("../backup-1/{t}.qcow2"))
                .args(["-F", "qcow2"])
                .arg(&before[i][0])
                .arg(&dest)
                .status()
                .unwrap();
            assert!(st.success());
            out.push(dest);
        }
        out
    };
    // The agent's cleanup (the default, "discard") removes it anyway and
    // puts the disks back on `base <- delta`.
    let dests = stored();
    model.write(&vm, "vda", 0x34, 3 * MIB, 64 * 1024);
    let a = ok("agent.cleanup_vm_backup", &req);
    assert_eq!(
        (a["mode"].as_str(), a["published"].as_bool(), a["vm_running"].as_bool()),
        (Some("discard"), Some(true), Some(true)),
        "{a:#}"
    );
    assert_eq!(a["removed_from_store"], json!(dests));
    for (i, (t, _)) in DISKS.iter().enumerate() {
        assert!(!dests[i].exists());
        assert_eq!(chain(&vm, t), before[i], "{t} is back on its chain: {a:#}");
        assert!(!news[i].1.exists());
    }
    model.assert_vm_reads_everything(&vm);

    // With mode "complete", cleanup finishes it (the old delta merged into
    // the base).
    stored();
    let mut req = req.clone();
    req["mode"] = json!("complete");
    let a = ok("agent.cleanup_vm_backup", &req);
    assert_eq!((a["published"].as_bool(), a["removed_from_store"].as_array().map(Vec::len)), (Some(true), Some(0)));
    for (i, (t, _)) in DISKS.iter().enumerate() {
        assert_eq!(chain(&vm, t), vec![news[i].1.clone(), vm.initial_file(t)], "{a:#}");
        assert_eq!(a["volumes"][i]["path"], json!(news[i].1));
    }
    model.assert_vm_reads_everything(&vm);
}

#[test]
fn failed_backups_say_whether_the_vm_is_consistent() {
    if skip_without_libvirt("agent errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let e = agent("agent.take_backup", &json!({"domain": "knib-agent-no-such-domain", "volumes": []})).unwrap_err();
    assert_eq!((e.kind, e.vm_consistent), (ErrorKind::NotFound, Some(true)), "{e}");
    let vm = TestVm::create(
        "knib-agent-err",
        &DISKS[..1],
        dir.path(),
        TestVmOptions { running: true, ..Default::default() },
    );
    let vols = volumes(&vm, &store, 1, None);
    let e = agent("agent.take_backup", &json!({"domain": vm.name(), "running": false, "volumes": vols})).unwrap_err();
    assert!(e.message.contains("field `running` is false"), "{e}");
    let mut bad = vols.clone();
    bad[0]["path"] = json!(dir.path().join("elsewhere.qcow2"));
    let e = agent("agent.take_backup", &json!({"domain": vm.name(), "volumes": bad})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("has no disk running on"), "{e}");
    // A copy that fails after the snapshot (its temporary name is taken by
    // a directory): the snapshot is undone, the VM consistent.
    let dest = PathBuf::from(vols[0]["delta_path_on_store"].as_str().unwrap());
    std::fs::create_dir_all(dest.parent().unwrap().join(".vda.qcow2.part")).unwrap();
    let e = agent("agent.take_backup", &json!({"domain": vm.name(), "volumes": vols})).unwrap_err();
    assert_eq!(e.vm_consistent, Some(true), "{e}");
    assert!(e.message.contains("copy of disk vda"), "{e}");
    assert!(!PathBuf::from(vols[0]["delta_path_on_primary"].as_str().unwrap()).exists());
    assert!(!dest.exists());
    assert_eq!(chain(&vm, "vda"), vec![vm.initial_file("vda")]);
}

#[test]
fn a_stopped_domain_backup_and_a_vm_snapshot_merge() {
    if skip_without_libvirt("agent stopped domain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm = TestVm::create(
        "knib-agent-stopped",
        &DISKS[..1],
        dir.path(),
        TestVmOptions { persistent: true, ..Default::default() },
    );
    let base = vm.initial_file("vda");
    qemu_io(&base, "write -P 0x41 0 1M");
    let vol = |n: u32, parent: Option<u32>, path: &Path, merge: Option<Value>| {
        let mut v = json!({
            "uuid": "root",
            "path": path,
            "delta_path_on_primary": base.with_file_name(format!("delta-{n}")),
            "delta_path_on_store": store.join(format!("b{n}/root.qcow2")),
        });
        if let Some(p) = parent {
            v["parent_backup_path"] = json!(store.join(format!("b{p}/root.qcow2")));
        }
        if let Some(m) = merge {
            v["merge"] = m;
        }
        json!([v])
    };
    let a =
        ok("agent.take_backup", &json!({"domain": vm.name(), "running": false, "volumes": vol(1, None, &base, None)}));
    let d1 = base.with_file_name("delta-1");
    assert_eq!(a["volumes"][0]["new_volume_path"], json!(d1));
    assert_eq!(vm.disk("vda").file, d1);
    qemu_io(&d1, "write -P 0x42 2M 1M");
    let reference = dir.path().join("ref.qcow2");
    snapshot(&d1, &reference);
    let merge = json!({"parent": base, "child": d1});
    let a = ok(
        "agent.take_backup",
        &json!({"domain": vm.name(), "running": false, "end_of_chain": true, "volumes": vol(2, Some(1), &d1, Some(merge))}),
    );
    assert_eq!(a["volumes"][0]["new_volume_path"], json!(base), "end of chain: back on the base");
    assert_eq!(vm.disk("vda").file, base);
    assert!(!d1.exists());
    let to = dir.path().join("restored.qcow2");
    ok("agent.restore", &json!({"volumes": [{"backup_path": store.join("b2/root.qcow2"), "volume_path": to}]}));
    assert_identical(&to, &reference);

    // A disk-only VM snapshot's delta merged into its parent, stopped.
    let snap = base.with_file_name("snap-1");
    vm.vm.snapshot_disk_only(&[("vda", &snap)], false).unwrap();
    qemu_io(&snap, "write -P 0x43 4M 64k");
    let top = base.with_file_name("snap-2");
    vm.vm.snapshot_disk_only(&[("vda", &top)], false).unwrap();
    let reference = dir.path().join("ref2.qcow2");
    snapshot(&top, &reference);
    // Nothing to merge (a restore of every volume ends with it): done, the chain unchanged.
    let a = ok("agent.merge_snapshot", &json!({"domain": vm.name(), "merges": []}));
    assert_eq!(a, json!({"volumes": []}));
    assert!(snap.exists() && top.exists());
    let below = knib_core::qemu_img::QemuImg::new().info(&top, &Control::new()).unwrap().full_backing_filename;
    assert_eq!(below.map(PathBuf::from), Some(snap.clone()));
    let e = agent("agent.merge_snapshot", &json!({"domain": vm.name(), "merges": [{"parent": top, "child": snap}]}))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let a = ok(
        "agent.merge_snapshot",
        &json!({"domain": vm.name(), "running": false, "merges": [{"uuid": "root", "parent": base, "child": snap, "grand_children": [top]}]}),
    );
    assert_eq!(a["volumes"][0]["path"], json!(top));
    assert!(!snap.exists());
    assert_identical(&top, &reference);
}

#[test]
fn quick_restore_consolidate_and_validation_files() {
    if skip_without_libvirt("agent quick restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.qcow2");
    make_disk(&backup, 16 * MIB, &[]);
    qemu_io(&backup, "write -P 0x51 0 2M");
    let old = dir.path().join("old-delta.qcow2");
    make_disk(&old, MIB, &[]);
    let vol = dir.path().join("volume.qcow2");
    make_disk(&vol, 16 * MIB, &[]);
    let request = json!({"quick_restore": true, "deltas_to_remove": [old], "volumes": [{"uuid": "v1", "backup_path": backup, "volume_path": vol}]});
    // A backup whose metadata is damaged: no VM is run on it, nothing is
    // changed, nothing is left.
    let (at, was) = zero_first_data_refcount(&backup);
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let before = listing(dir.path());
    let vol_bytes = std::fs::read(&vol).unwrap();
    let e = agent("agent.restore", &request).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(
        e.message.starts_with(&format!("backup file {} is damaged: qemu-img check found ", backup.display()))
            && e.message.ends_with(
                "; no VM was run on it (verify says more; a plain restore without verification gets out what can be)"
            ),
        "{e}"
    );
    assert_eq!(listing(dir.path()), before);
    assert_eq!(std::fs::read(&vol).unwrap(), vol_bytes, "the volume was changed");
    put_bytes(&backup, at, &was);
    // Hashes the caller gives are held against the files before anything
    // is staged: a wrong one, and a file that is not in the chain.
    let hash = ok("agent.take_hash", &json!({"files": [backup]}))["files"][0]["hash"].as_str().unwrap().to_string();
    let with_hashes = |expected: Value| {
        let mut r = request.clone();
        r["volumes"][0]["expected_hashes"] = expected;
        r
    };
    let wrong = format!("{:032x}", u128::from_str_radix(&hash, 16).unwrap() ^ 1);
    let e = agent("agent.restore", &with_hashes(json!([{"path": backup, "hash": wrong}]))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert_eq!(
        e.message,
        format!(
            "backup file {} is corrupted: its xxh3-128 hash is {hash}, the recorded hash is {wrong}",
            backup.display()
        )
    );
    let e = agent("agent.restore", &with_hashes(json!([{"path": old, "hash": hash}]))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.starts_with(&format!("backup file {} is not in the chain", old.display())), "{e}");
    assert_eq!(listing(dir.path()), before);
    assert_eq!(std::fs::read(&vol).unwrap(), vol_bytes, "the volume was changed");
    let request = with_hashes(json!([{"path": backup, "hash": hash}]));
    let a = ok("agent.restore", &request);
    assert_eq!(a["volumes"][0]["backing"], json!(backup.canonicalize().unwrap()));
    assert_eq!(a["removed"], json!([old]));
    let vm = TestVm::create_on(
        "knib-agent-quick",
        &[("vda", vol.clone())],
        TestVmOptions { running: true, ..Default::default() },
    );
    assert_eq!(chain(&vm, "vda").len(), 2);
    // Without `volumes`: every disk of the domain (what the catalog's
    // consolidate did under its own name).
    let a = ok("agent.consolidate", &json!({"domain": vm.name()}));
    assert_eq!(a["consolidated"], json!([{"uuid": null, "target": "vda", "path": vol, "pulled": true}]));
    assert_eq!(chain(&vm, "vda"), vec![vol.clone()]);
    assert!(vm.read_check("vda", 0x51, 0, 2 * MIB));
    let a = ok("agent.consolidate", &json!({"domain": vm.name(), "volumes": [{"uuid": "v1", "path": vol}]}));
    assert_eq!(a["consolidated"], json!([{"uuid": "v1", "target": "vda", "path": vol, "pulled": false}]));

    // Validation overlays: made, then removed by the clean-up.
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let a = ok(
        "agent.prepare_validation",
        &json!({"vm_name": "knib-agent-validation", "work_dir": work, "volumes": [{"uuid": "v1", "backup_path": backup}]}),
    );
    let overlay = PathBuf::from(a["volumes"][0]["overlay_path"].as_str().unwrap());
    assert!(overlay.exists());
    let e = agent(
        "agent.prepare_validation",
        &json!({"vm_name": "../x", "work_dir": work, "volumes": [{"uuid": "v1", "backup_path": backup}]}),
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    // A firmware-only guest never answers the agent: with wait_for_boot the
    // validation fails, without it, it passes.
    let v = json!({"disks": [{"target": "vda", "path": overlay}], "work_dir": work, "boot_timeout_secs": 1, "memory_mib": 64});
    let r = ok("agent.validate", &v);
    assert_eq!((r["boot_validated"].as_bool(), r["passed"].as_bool()), (Some(false), Some(false)), "{r:#}");
    let mut v2 = v.clone();
    v2["wait_for_boot"] = json!(false);
    // Where a screenshot would go, as the Java wrapper always sets it: no
    // screenshot step, no screenshot, and the validation passes.
    v2["screenshot_next_to"] = json!(work.join("backup-file"));
    v2["store_root"] = json!(work);
    let r = ok("agent.validate", &v2);
    assert_eq!(r["passed"], true, "{r:#}");
    assert!(r["screenshot_path"].is_null() && r["screenshot_store_path"].is_null(), "{r:#}");
    // As the agent: the clean-up does nothing by default.
    let a = ok("agent.cleanup_validation", &json!({"vm_name": "knib-agent-validation"}));
    assert_eq!((a["removed"].clone(), a["domain_removed"].clone()), (json!([]), json!(false)));
    assert!(overlay.exists());
    // Another VM whose name starts with this one's and a dash, with a
    // volume whose uuid ends like this one's: the overlays differ, and the
    // clean-up of the first leaves the second's (before, both were
    // "<vm>-<uuid>": "knib-agent-validation-x-v1" was either, and the first
    // VM's clean-up removed it).
    let other = ok(
        "agent.prepare_validation",
        &json!({"vm_name": "knib-agent-validation-x", "work_dir": work, "volumes": [{"uuid": "v1", "backup_path": backup}]}),
    );
    let other = PathBuf::from(other["volumes"][0]["overlay_path"].as_str().unwrap());
    let same_name = ok(
        "agent.prepare_validation",
        &json!({"vm_name": "knib-agent-validation", "work_dir": work, "volumes": [{"uuid": "x-v1", "backup_path": backup}]}),
    );
    let same_name = PathBuf::from(same_name["volumes"][0]["overlay_path"].as_str().unwrap());
    assert_ne!(other, same_name);
    let a = ok("agent.cleanup_validation", &json!({"vm_name": "knib-agent-validation", "work_dir": work}));
    let mut removed: Vec<PathBuf> =
        a["removed"].as_array().unwrap().iter().map(|p| PathBuf::from(p.as_str().unwrap())).collect();
    removed.sort();
    let mut expected = vec![overlay.clone(), same_name.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert_eq!(a["domain_removed"], false);
    assert!(other.exists(), "the other VM's overlay is left alone");
    let a = ok("agent.cleanup_validation", &json!({"vm_name": "knib-agent-validation-x", "work_dir": work}));
    assert_eq!(a["removed"], json!([other]));
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "boot tests leave nothing behind");
}

/// `agent.validate`'s two ways exclude each other, and its screenshot and
/// script fields are checked before anything runs (a screenshot replaces
/// only an earlier screenshot); `agent.prepare_validation`
/// replaces a volume file with an overlay only when the file holds no data
/// and no QEMU holds it, and all volumes or none.
#[test]
fn validation_requests_are_checked_and_overlays_replace_only_empty_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let err = |op: &str, v: Value| {
        let e = agent(op, &v).expect_err(&format!("{op} accepted {v:#}"));
        (e.kind, e.message)
    };
    let disks = json!([{"target": "vda", "path": dir.path().join("x")}]);
    let not_png = dir.path().join("a-disk.qcow2");
    make_disk(&not_png, MIB, &[]);
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink(&not_png, &link).unwrap();
    let disk_bytes = std::fs::read(&not_png).unwrap();
    for (req, words) in [
        (json!({}), "give `domain`"),
        (json!({"domain": "v", "disks": disks}), "exclude each other"),
        (json!({"domain": "v", "work_dir": dir.path()}), "`work_dir` is for a throwaway domain"),
        (json!({"domain": "v", "memory_mib": 256}), "`memory_mib` is for a throwaway domain"),
        (json!({"disks": disks}), "needs `work_dir`"),
        (json!({"domain": "v", "max_write_mib": 8}), "`max_write_mib` is for a throwaway domain"),
        (
            json!({"disks": disks, "work_dir": dir.path(), "max_write_mib": 0}),
            "`max_write_mib` must be from 1 to 1048576",
        ),
        (
            json!({"disks": disks, "work_dir": dir.path(), "max_write_mib": 1048577}),
            "`max_write_mib` must be from 1 to 1048576 (MiB), not 1048577",
        ),
        (json!({"domain": "v", "take_screenshot": true}), "needs `screenshot_path` or `screenshot_next_to`"),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_next_to": "/s/b/f", "screenshot_path": "/s/x.png"}),
            "exclude each other",
        ),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_next_to": "/s/b/f", "store_root": "/t"}),
            "is not under `store_root`",
        ),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_next_to": "/s/../t/f", "store_root": "/s"}),
            "has a `..` component",
        ),
        (json!({"domain": "v", "take_screenshot": true, "screenshot_next_to": "b/f"}), "screenshot_next_to"),
        (json!({"domain": "v", "execute_script": true}), "`execute_script` needs `script`"),
        // A screenshot replaces only an earlier one: not a disk, a
        // directory, a FIFO or a link.
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_path": not_png}),
            "exists and is not a PNG image; it is not replaced",
        ),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_path": dir.path()}),
            "exists and is not a PNG image; it is not replaced",
        ),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_path": fifo}),
            "exists and is not a PNG image; it is not replaced",
        ),
        (
            json!({"domain": "v", "take_screenshot": true, "screenshot_path": link}),
            "exists and is not a PNG image; it is not replaced",
        ),
    ] {
        let (kind, message) = err("agent.validate", req.clone());
        assert_eq!(kind, ErrorKind::InvalidInput, "{req}: {message}");
        assert!(message.contains(words), "{req}: {message:?} does not say {words:?}");
    }
    assert_eq!(std::fs::read(&not_png).unwrap(), disk_bytes);
    for f in [&not_png, &fifo, &link] {
        std::fs::remove_file(f).unwrap();
    }

    // A backup file, and volume files in every state.
    let backup = dir.path().join("backup.qcow2");
    make_disk(&backup, 16 * MIB, &[]);
    qemu_io(&backup, "write -P 0x61 0 1M");
    let empty = dir.path().join("empty.qcow2");
    make_disk(&empty, 16 * MIB, &[]);
    let zero_length = dir.path().join("zero-length");
    std::fs::write(&zero_length, b"").unwrap();
    let absent = dir.path().join("absent.qcow2");
    let with_data = dir.path().join("with-data.qcow2");
    make_disk(&with_data, 16 * MIB, &[]);
    qemu_io(&with_data, "write -P 0x62 4M 64k");
    let with_zeros = dir.path().join("with-zeros.qcow2");
    make_disk(&with_zeros, 16 * MIB, &[]);
    qemu_io(&with_zeros, "write -z 0 1M");
    let with_backing = dir.path().join("with-backing.qcow2");
    make_disk(&with_backing, 16 * MIB, &["-b", backup.to_str().unwrap(), "-F", "qcow2"]);
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    // As the MS creates a volume for a sparse or fat offering: every cluster
    // mapped, all zeros; one written to is data.
    let preallocated: Vec<PathBuf> = ["metadata", "falloc", "full"]
        .iter()
        .map(|mode| {
            let p = dir.path().join(format!("prealloc-{mode}.qcow2"));
            make_disk(&p, 16 * MIB, &["-o", &format!("preallocation={mode}")]);
            p
        })
        .collect();
    let prealloc_written = dir.path().join("prealloc-written.qcow2");
    make_disk(&prealloc_written, 16 * MIB, &["-o", "preallocation=full"]);
    qemu_io(&prealloc_written, "write -P 0x63 4M 64k");
    let with_snapshot = dir.path().join("with-snapshot.qcow2");
    make_disk(&with_snapshot, 16 * MIB, &[]);
    let st =
        std::process::Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&with_snapshot).status().unwrap();
    assert!(st.success());
    let prepare = |vols: &[(&str, &Path)]| {
        let volumes: Vec<Value> =
            vols.iter().map(|(uuid, p)| json!({"uuid": uuid, "backup_path": backup, "overlay_path": p})).collect();
        agent("agent.prepare_validation", &json!({"vm_name": "v-1", "volumes": volumes}))
    };
    // Every file of the directory with its bytes.
    let files = || -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect()
    };
    for (bad, words) in [
        (&with_data, "holds data"),
        (&prealloc_written, "holds data (guest cluster 64 is not zeros)"),
        (&with_snapshot, "has 1 internal snapshot"),
        (&with_backing, "has a backing file"),
        (&raw, "is not an empty qcow2 image"),
    ] {
        // The bad one second: the first, replaceable, is not touched either.
        let before = files();
        let e = prepare(&[("a", &empty), ("b", bad)]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains(words) && e.message.contains(bad.to_str().unwrap()), "{e}");
        assert_eq!(files(), before, "a refused prepare changed files");
    }
    // A volume some QEMU holds is busy.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&empty)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let e = prepare(&[("a", &empty)]).unwrap_err();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    // Empty, zero-length, zeroed, preallocated and absent files are replaced by overlays.
    let a = prepare(&[
        ("a", &empty),
        ("b", &zero_length),
        ("c", &absent),
        ("d", &with_zeros),
        ("e", &preallocated[0]),
        ("f", &preallocated[1]),
        ("g", &preallocated[2]),
    ])
    .unwrap();
    let a: Value = a;
    assert_eq!(a["volumes"].as_array().unwrap().len(), 7);
    for p in [&empty, &zero_length, &absent, &with_zeros, &preallocated[0], &preallocated[1], &preallocated[2]] {
        let info = knib_core::qemu_img::QemuImg::default().info(p, &Control::new()).unwrap();
        assert_eq!(
            info.full_backing_filename.as_deref().map(Path::new),
            Some(backup.canonicalize().unwrap().as_path())
        );
        assert_identical(p, &backup);
    }
    // An overlay is never a backup file, and never named twice.
    assert_eq!(prepare(&[("a", &backup)]).unwrap_err().kind, ErrorKind::InvalidInput);
    let fresh = dir.path().join("fresh.qcow2");
    assert_eq!(prepare(&[("a", &fresh), ("b", &fresh)]).unwrap_err().kind, ErrorKind::InvalidInput);
    assert!(!fresh.exists());
    let leftovers: Vec<_> = files().into_keys().filter(|p| p.to_string_lossy().ends_with(".part")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `agent.compress`'s `min_free_bytes` holds beside every file, not only
/// the first: the second here is on a 4 MiB tmpfs (mounted for the test;
/// skipped, saying so, where mounting is not allowed).
#[test]
fn compress_min_free_bytes_holds_beside_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: compress_min_free_bytes_holds_beside_every_file needs to mount a tmpfs (root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&small);
    let (a, b) = (dir.path().join("a.qcow2"), small.join("b.qcow2"));
    for f in [&a, &b] {
        make_disk(f, 2 * MIB, &[]);
        qemu_io(f, "write -P 0x61 0 64k");
    }
    let before = std::fs::read(&b).unwrap();
    // A rate limit qemu-img's -r would overflow is refused, naming it.
    let e = agent("agent.compress", &json!({"files": [a, b], "rate_limit_mbps": 9_000_000_000_000u64})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("rate_limit_mbps must be at most 1000000"), "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), before);
    let e = agent("agent.compress", &json!({"files": [a, b], "min_free_bytes": 64 * MIB})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
    assert!(e.message.starts_with(&format!("compression (min_free_bytes): {} has ", small.display())), "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), before);
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 1, "something was written beside b");
}

/// A disk whose delta was merged since the last backup (the MS does that
/// when a volume is detached or migrated; a disk attached since then has
/// none either) is copied whole in the same backup as the others'
/// incrementals, as the MS asks: no parent, no merge for it.
#[test]
fn one_backup_takes_full_and_incremental_volumes_together() {
    if skip_without_libvirt("agent mixed backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm =
        TestVm::create("knib-agent-mix", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x31, 0, MIB);
    model.write(&vm, "vdb", 0x32, MIB, 256 * 1024);
    ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 1, None)}));
    model.write(&vm, "vdb", 0x33, 2 * MIB, 64 * 1024);
    // vdb's delta merged into its base while the VM runs.
    let (vdb_base, vdb_delta) = (vm.initial_file("vdb"), chain(&vm, "vdb")[0].clone());
    ok(
        "agent.merge_snapshot",
        &json!({"domain": vm.name(), "merges": [{"uuid": "uuid-vdb", "parent": vdb_base, "child": vdb_delta}]}),
    );
    assert_eq!(chain(&vm, "vdb"), vec![vdb_base.clone()]);
    model.write(&vm, "vda", 0x34, 4 * MIB, 512 * 1024);
    model.write(&vm, "vdb", 0x35, 8 * MIB, 64 * 1024);
    let n2 = model.writes.len();

    let mut vols = volumes(&vm, &store, 2, Some(1));
    assert!(vols[1]["merge"].is_null(), "vdb runs on its base: no merge");
    vols[1].as_object_mut().unwrap().remove("parent_backup_path");
    let a = ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": vols}));
    assert_eq!(a["kind"], "incremental");
    let q = knib_core::qemu_img::QemuImg::new();
    let info = |f: &Path| q.info(f, &Control::new()).unwrap();
    assert_eq!(info(&store.join("backup-2/vda.qcow2")).backing_filename.as_deref(), Some("../backup-1/vda.qcow2"));
    assert_eq!(info(&store.join("backup-2/vdb.qcow2")).backing_filename, None, "vdb is copied whole");
    for (t, _) in DISKS {
        let now = chain(&vm, t);
        assert_eq!(now, vec![vm.initial_file(t).with_file_name(format!("delta-{t}-2")), vm.initial_file(t)]);
        assert_eq!(a["volumes"][if t == "vda" { 0 } else { 1 }]["new_volume_path"], json!(now[0]));
    }
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    for (t, _) in DISKS {
        let to = out.join(format!("{t}.qcow2"));
        let backup = store.join("backup-2").join(format!("{t}.qcow2"));
        ok("agent.restore", &json!({"volumes": [{"uuid": t, "backup_path": backup, "volume_path": to}]}));
        model.assert_restored(t, n2, &to, dir.path());
    }
    // The bitmap method takes one checkpoint for all disks: all or none.
    let mut vols = volumes(&vm, &store, 3, Some(2));
    vols[1].as_object_mut().unwrap().remove("parent_backup_path");
    for v in vols.as_array_mut().unwrap() {
        v.as_object_mut().unwrap().remove("merge");
    }
    let e = agent("agent.take_backup", &json!({"domain": vm.name(), "method": "bitmap", "volumes": vols})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("uuid-vdb") && e.message.contains("method `bitmap`"), "{e}");
    model.assert_vm_reads_everything(&vm);
}

/// The time budget bounds the copy, not the block commit after it (as on
/// the Java path): a budget that runs out once the backup is published
/// still lets the merge finish, and the VM is consistent on its new delta.
#[test]
fn the_block_commit_after_a_published_backup_runs_past_the_time_budget() {
    if skip_without_libvirt("agent merge past the budget") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm =
        TestVm::create("knib-agent-budget", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x51, 0, MIB);
    ok("agent.take_backup", &json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 1, None)}));
    model.write(&vm, "vda", 0x52, 2 * MIB, 256 * 1024);
    model.write(&vm, "vdb", 0x53, MIB, 64 * 1024);
    let n2 = model.writes.len();
    let old = chain(&vm, "vda")[0].clone();
    knib_core::crashpoint::pause_before(
        &format!("block commit of {}", old.display()),
        std::time::Duration::from_secs(3),
    );
    let a = ok(
        "agent.take_backup",
        &json!({"domain": vm.name(), "timeout_secs": 2, "volumes": volumes(&vm, &store, 2, Some(1))}),
    );
    assert_eq!(a["vm_consistent"], true);
    assert!(!old.exists(), "the old delta is merged and removed");
    for (t, _) in DISKS {
        assert_eq!(chain(&vm, t), vec![vm.initial_file(t).with_file_name(format!("delta-{t}-2")), vm.initial_file(t)]);
        let to = dir.path().join(format!("{t}-restored.qcow2"));
        let backup = store.join("backup-2").join(format!("{t}.qcow2"));
        ok("agent.restore", &json!({"volumes": [{"uuid": t, "backup_path": backup, "volume_path": to}]}));
        model.assert_restored(t, n2, &to, dir.path());
    }
    model.assert_vm_reads_everything(&vm);
}

/// The snapshot method holds a domain's volumes for the whole take, as the
/// bitmap method does: while a take waits before its snapshot, a cleanup
/// of the same volumes, a second take and a consolidation are busy,
/// naming a volume, and change nothing. The take then snapshots the
/// running domain while knib holds its files, within a short budget: knib's
/// lock is not on the byte libvirt's security manager locks while it
/// relabels the files (byte 1; there, libvirt's snapshot waited about ten
/// seconds and the take ran out of time).
#[test]
fn the_snapshot_method_holds_the_volumes_for_the_whole_take() {
    if skip_without_libvirt("agent snapshot method busy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let vm =
        TestVm::create("knib-agent-held", &DISKS, dir.path(), TestVmOptions { running: true, ..Default::default() });
    let mut model = Model::new(&DISKS);
    model.write(&vm, "vda", 0x61, 0, MIB);
    let n1 = model.writes.len();
    let at = format!("snapshot of domain {}", vm.name());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(6));
    let first = json!({"domain": vm.name(), "timeout_secs": 12, "volumes": volumes(&vm, &store, 1, None)});
    let taking = std::thread::spawn(move || agent("agent.take_backup", &first));
    assert!(knib_core::crashpoint::wait_for_pause(&at, std::time::Duration::from_secs(120)), "no pause at {at}");
    let mut cleanup = json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 1, None)});
    cleanup["mode"] = json!("discard");
    let vda = vm.initial_file("vda");
    for (op, r) in [
        ("agent.cleanup_vm_backup", cleanup),
        ("agent.take_backup", json!({"domain": vm.name(), "volumes": volumes(&vm, &store, 2, None)})),
        ("agent.consolidate", json!({"domain": vm.name(), "volumes": [{"path": vda}]})),
    ] {
        let e = agent(op, &r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{op}: {e}");
        assert!(e.message.contains(&vda.display().to_string()), "{op}: {e}");
    }
    let a = taking.join().unwrap().unwrap_or_else(|e| panic!("the take: {e}"));
    assert_eq!(a["kind"], json!("full"), "{a}");
    assert!(!store.join("backup-2").exists(), "the refused take wrote");
    for (t, _) in DISKS {
        let to = dir.path().join(format!("{t}-restored.qcow2"));
        let backup = store.join("backup-1").join(format!("{t}.qcow2"));
        ok("agent.restore", &json!({"volumes": [{"uuid": t, "backup_path": backup, "volume_path": to}]}));
        model.assert_restored(t, n1, &to, dir.path());
    }
    model.assert_vm_reads_everything(&vm);
}
