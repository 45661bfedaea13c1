//! Tampered journals of live backups: a plan naming files knib did not
//! name is corrupt, and recover deletes nothing such a journal names.

use super::*;
use knib_core::catalog::journal_check::check_plan;
use knib_core::engine::live::{delta_path, DiskPlan, LivePlan};
use knib_core::engine::{BackupKind, DataPath};

const ID: &str = "20261201-050000000-00aa";

fn plan(base: &Path, store_vm: &Path) -> LivePlan {
    LivePlan {
        backup_id: ID.into(),
        kind: BackupKind::Incremental,
        end_of_chain: false,
        quiesce: false,
        running: false,
        disks: vec![DiskPlan {
            target: "vda".into(),
            base: base.to_path_buf(),
            old_delta: Some(delta_path(base, "20261130-050000000-00bb")),
            new_delta: delta_path(base, ID),
            dest: store_vm.join(format!(".{ID}.part/vda.qcow2")),
            parent: Some("../20261130-050000000-00bb/vda.qcow2".into()),
            virtual_size: 16 << 20,
            snapshots: Vec::new(),
            grand_children: Vec::new(),
        }],
        data_path: DataPath::default(),
        compress: None,
        check_output: false,
    }
}

/// Every way a journal's plan can name a file knib did not name,
/// chosen from the seed: (field, tampering).
type PlanEdit = Box<dyn Fn(&mut LivePlan)>;

fn tamperings(rng: &mut Rng, canary: &Path) -> Vec<(&'static str, PlanEdit)> {
    let c = canary.join("secret");
    let c2 = c.clone();
    let c3 = c.clone();
    let c4 = c.clone();
    let c5 = c.clone();
    let rel = ["../../etc/passwd", "secret", "./x/../../y"][rng.below(3) as usize];
    vec![
        ("new_delta", Box::new(move |p: &mut LivePlan| p.disks[0].new_delta = c.clone())),
        ("new_delta", Box::new(move |p: &mut LivePlan| p.disks[0].new_delta = PathBuf::from(rel))),
        (
            "new_delta",
            Box::new(|p: &mut LivePlan| {
                let b = p.disks[0].base.clone();
                p.disks[0].new_delta = delta_path(&b, "20200101-000000000-0000");
            }),
        ),
        ("old_delta", Box::new(move |p: &mut LivePlan| p.disks[0].old_delta = Some(c2.clone()))),
        (
            "old_delta",
            Box::new(|p: &mut LivePlan| {
                let b = p.disks[0].base.clone();
                p.disks[0].old_delta = Some(PathBuf::from(format!("{}.knib-delta-../../x", b.display())));
            }),
        ),
        (
            "old_delta",
            Box::new(|p: &mut LivePlan| {
                let b = p.disks[0].base.with_file_name("other.qcow2");
                p.disks[0].old_delta = Some(delta_path(&b, "20261130-050000000-00bb"));
            }),
        ),
        (
            "base",
            Box::new(move |p: &mut LivePlan| {
                p.disks[0].base = c3.clone();
                p.disks[0].new_delta = delta_path(&c3, ID);
                p.disks[0].old_delta = None;
            }),
        ),
        (
            // A file of the chain further down (a shared template): before,
            // accepted as any file of the chain.
            "base",
            Box::new(|p: &mut LivePlan| {
                let t = PathBuf::from("/var/lib/libvirt/images/template.qcow2");
                p.disks[0].new_delta = delta_path(&t, ID);
                p.disks[0].base = t;
                p.disks[0].old_delta = None;
            }),
        ),
        ("snapshots", Box::new(move |p: &mut LivePlan| p.disks[0].snapshots = vec![c4.clone()])),
        ("grand_children", Box::new(move |p: &mut LivePlan| p.disks[0].grand_children = vec![c5.clone()])),
        ("target", Box::new(|p: &mut LivePlan| p.disks[0].target = "vdz".into())),
        ("target", Box::new(|p: &mut LivePlan| p.disks[0].target = "../vda".into())),
        ("backup_id", Box::new(|p: &mut LivePlan| p.backup_id = "../../x".into())),
        ("dest", Box::new(|p: &mut LivePlan| p.disks[0].dest = PathBuf::from("/etc/vda.qcow2"))),
        ("parent", Box::new(|p: &mut LivePlan| p.disks[0].parent = Some("/etc/vda.qcow2".into()))),
        (
            "target",
            Box::new(|p: &mut LivePlan| {
                let d = p.disks[0].clone();
                p.disks.push(d);
            }),
        ),
    ]
}

#[test]
fn a_plan_naming_files_knib_did_not_name_is_corrupt() {
    let base = PathBuf::from("/var/lib/libvirt/images/vm-vda.qcow2");
    let journal = PathBuf::from("/store/vms/vm/journal.json");
    let good = plan(&base, Path::new("/store/vms/vm"));
    let template = PathBuf::from("/var/lib/libvirt/images/template.qcow2");
    let chain = vec![good.disks[0].old_delta.clone().unwrap(), base.clone(), template];
    let disks = vec![("vda".to_string(), chain.clone()), ("vdb".to_string(), vec![PathBuf::from("/x/b.qcow2")])];
    check_plan(&good, &journal, "vm", &disks, None).unwrap();
    // The store may have been mounted elsewhere since.
    check_plan(&plan(&base, Path::new("/mnt/other/vms/vm")), &journal, "vm", &disks, None).unwrap();
    // A backup written to a vault: its files are the vault's keys, exactly.
    let key = |t: &str| PathBuf::from(format!("s3://bucket/prefix/vms/vm/{}/{t}.qcow2", good.backup_id));
    let mut to_vault = good.clone();
    for d in &mut to_vault.disks {
        d.dest = key(&d.target);
    }
    check_plan(&to_vault, &journal, "vm", &disks, Some(&key)).unwrap();
    let e = check_plan(&good, &journal, "vm", &disks, Some(&key)).unwrap_err();
    assert!(e.message.contains("of this backup in its vault"), "{e}");
    let mut elsewhere = to_vault.clone();
    elsewhere.disks[0].dest = PathBuf::from("s3://bucket/other/vms/vm/x/vda.qcow2");
    assert_eq!(check_plan(&elsewhere, &journal, "vm", &disks, Some(&key)).unwrap_err().kind, ErrorKind::Corrupt);
    let mut rng = Rng::new(SEED);
    for (field, t) in tamperings(&mut rng, Path::new("/canary")) {
        let mut p = good.clone();
        t(&mut p);
        let e = check_plan(&p, &journal, "vm", &disks, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{field}: {e}");
        assert!(e.message.contains("journal /store/vms/vm/journal.json"), "{e}");
        assert!(e.message.contains(field), "{field}: {e}");
    }
}

/// A stopped domain and a store; each tampered journal makes recover
/// refuse with `corrupt` naming the journal, and nothing is deleted.
#[test]
fn recover_deletes_nothing_a_tampered_journal_names() {
    if common::vm::skip_without_libvirt("tampered journal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let vm = common::vm::TestVm::define_stopped("knib-tamper", &[("vda", 16 << 20)], dir.path());
    let base = vm.disk("vda").file;
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let vm_dir = root.join("vms").join(vm.name());
    std::fs::create_dir_all(&vm_dir).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"not knib's").unwrap();
    std::fs::write(outside.join("other"), b"not knib's either").unwrap();
    let good = plan(&base, &vm_dir);
    let journal = vm_dir.join("journal.json");
    let mut rng = Rng::new(SEED ^ 1);
    let mut texts: Vec<(String, String)> = tamperings(&mut rng, &outside)
        .into_iter()
        .map(|(field, t)| {
            let mut p = good.clone();
            t(&mut p);
            let j = serde_json::json!({"schema": 1, "step": "copy", "plan": p});
            (field.to_string(), serde_json::to_string_pretty(&j).unwrap())
        })
        .collect();
    // A key given twice: the second would win in a map.
    let j = serde_json::to_string(&serde_json::json!({"schema": 1, "step": "copy", "plan": good})).unwrap();
    let evil = serde_json::to_string(&outside.join("other")).unwrap();
    texts
        .push(("given twice".into(), j.replacen("\"new_delta\":", &format!("\"new_delta\":{evil},\"new_delta\":"), 1)));
    texts.push(("given twice".into(), j.replacen("\"plan\":", "\"plan\":{},\"plan\":", 1)));
    for (what, text) in &texts {
        std::fs::write(&journal, text).unwrap();
        let before = canary_state(&outside);
        let e = store.recover_domain(&vm.vm, &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message.contains(&journal.display().to_string()), "{what}: {e}");
        assert!(e.message.contains(what.as_str()), "{what}: {e}");
        assert_canary(&before, &canary_state(&outside), what);
        assert!(journal.exists(), "{what}: the journal must be kept for a human to look at");
        assert!(base.exists());
    }
    // A journal that is a link out of the store is not read.
    std::fs::write(outside.join("journal.json"), &texts[0].1).unwrap();
    std::fs::remove_file(&journal).unwrap();
    symlink(outside.join("journal.json"), &journal).unwrap();
    let before = canary_state(&outside);
    let e = store.recover_domain(&vm.vm, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&journal.display().to_string()), "{e}");
    assert_canary(&before, &canary_state(&outside), "linked journal");
    // A journal of its own, with the backup's directory a link to a
    // directory outside holding a manifest: not taken as published (it
    // would be finished and made the chain's head), refused as corrupt
    // naming the link, and nothing is changed.
    std::fs::remove_file(&journal).unwrap();
    let fake = outside.join("fake-backup");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("manifest.json"), b"{}").unwrap();
    symlink(&fake, vm_dir.join(ID)).unwrap();
    let text = serde_json::to_string(&serde_json::json!({"schema": 1, "step": "merge", "plan": good})).unwrap();
    std::fs::write(&journal, &text).unwrap();
    let before = canary_state(&outside);
    let e = store.recover_domain(&vm.vm, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&vm_dir.join(ID).display().to_string()), "{e}");
    assert_canary(&before, &canary_state(&outside), "linked backup directory");
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), text, "the journal must be kept");
    assert!(!vm_dir.join("state.json").exists(), "no head was recorded");
    assert_eq!(vm.disk("vda").file, base);
    std::fs::remove_file(vm_dir.join(ID)).unwrap();
    // The untampered journal of a backup that never started its
    // snapshot: recovered, and the disk is as it was.
    std::fs::remove_file(&journal).unwrap();
    let mut ok = good.clone();
    ok.disks[0].old_delta = None;
    ok.disks[0].parent = None;
    ok.kind = BackupKind::Full;
    std::fs::write(
        &journal,
        serde_json::to_string(&serde_json::json!({"schema": 1, "step": "snapshot", "plan": ok})).unwrap(),
    )
    .unwrap();
    store.recover_domain(&vm.vm, &Control::new()).unwrap();
    assert!(!journal.exists());
    assert_eq!(vm.disk("vda").file, base);
}
