//! A quiesced bitmap backup of a running guest, for real: the guest agent
//! freezes the filesystems around `virDomainBackupBegin`, so a file written
//! without `sync` just before it is in the backup (the freeze syncs it); a
//! bitmap incremental after it is read back with file-level restore.

#![cfg(feature = "libvirt")]

mod common;

use common::guest::{backup_file, resume, suspend_when_asked, token, GuestVm, SUSPEND_ENV};
use common::vm::skip_without_libvirt;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::{BackupKind, BackupMethod};
use knib_core::Control;

#[test]
fn a_quiesced_bitmap_backup_holds_what_the_guest_wrote_before_the_freeze() {
    if skip_without_libvirt("a_quiesced_bitmap_backup_holds_what_the_guest_wrote_before_the_freeze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-bm-quiesce", dir.path());
    g.start_syslog();
    g.hold_writeback();
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    let unsynced = token("bm-unsynced");
    g.sh_ok(&format!("echo {unsynced} > /root/bm-unsynced"));
    let m = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(g.fsfreeze_status(), "thawed");
    assert_eq!(g.agent_freezes(), 1, "{}", g.syslog());
    assert_eq!(backup_file(&store, &m.id, "vda", "/root/bm-unsynced").as_deref(), Some(unsynced.as_str()));
    // An incremental by bitmap, its files read back through the chain.
    let later = token("bm-later");
    g.sh_ok(&format!("echo {later} > /root/bm-later && sync"));
    let m2 = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap();
    assert_eq!((m2.kind, m2.parent.as_deref()), (BackupKind::Incremental, Some(m.id.as_str())));
    assert_eq!(g.agent_freezes(), 2, "{}", g.syslog());
    assert_eq!(backup_file(&store, &m2.id, "vda", "/root/bm-later").as_deref(), Some(later.as_str()));
    assert_eq!(backup_file(&store, &m2.id, "vda", "/root/bm-unsynced").as_deref(), Some(unsynced.as_str()));
    assert_eq!(backup_file(&store, &m.id, "vda", "/root/bm-later"), None);
}

#[test]
fn a_freeze_that_outlasts_its_bound_is_thawed_before_the_bitmap_backup_fails() {
    if skip_without_libvirt("a_freeze_that_outlasts_its_bound_is_thawed_before_the_bitmap_backup_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-bm-thaw", dir.path());
    g.slow_freeze_ahead();
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    let started = std::time::Instant::now();
    let err = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap_err();
    eprintln!("after {:.1} s: {err}", started.elapsed().as_secs_f64());
    assert!(err.message.contains("did not freeze the filesystems (they are thawed)"), "{err}");
    assert_eq!(err.vm_consistent, Some(true), "{err}");
    // libvirt gave up on the freeze after 30 s; the guest went on freezing,
    // and knib thawed it once it could.
    assert_eq!(g.fsfreeze_status(), "thawed");
    g.sh_ok("echo x > /root/after && sync");
    assert!(store.list(None).unwrap().is_empty(), "nothing was published");
}

/// A quiesced bitmap backup whose thaw's hook fails (the guest agent
/// restarted with a freeze hook that fails on `thaw`: the agent thaws the
/// filesystems, then answers the hook's error) is published, the guest
/// saying its filesystems are thawed. Before, knib sent thaws for three
/// minutes and failed the backup, saying the guest might still be frozen.
///
/// Then one whose thaw does fail: in a child process, the domain is
/// suspended while its guest is frozen, just before the backup job
/// begins, and the thaw gets 4 s. The backup fails, leaving the VM
/// inconsistent and its journal. Its undo keeps the `frozen-by-knib`
/// marker in the work directory, so once the domain is resumed `recover`
/// knows the backup left the guest frozen, thaws it (through the failing
/// hook), then removes the directory. Before, the undo removed the marker
/// with the directory, and recover took a guest still frozen for another
/// tool's.
#[test]
fn a_bitmap_backup_whose_thaw_fails_leaves_its_freeze_to_recover() {
    if skip_without_libvirt("a_bitmap_backup_whose_thaw_fails_leaves_its_freeze_to_recover") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let g = GuestVm::boot("knib-bm-thawfail", dir.path());
    g.fail_thaws();
    // The hook is in place: a thaw answers its error, the guest is thawed.
    g.agent(&serde_json::json!({"execute": "guest-fsfreeze-freeze"}));
    let thaw = knib_core::libvirt::qemu_agent_command(&g.vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5);
    assert!(thaw.as_ref().is_err_and(|e| e.message.contains("hook")), "{thaw:?}");
    assert_eq!(g.fsfreeze_status(), "thawed");
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    let m = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(g.fsfreeze_status(), "thawed");

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_quiesced_bitmap_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::json!([root, g.vm.name()]).to_string())
        .env("KNIB_TEST_THAW_BUDGET_SECS", "4")
        .env(SUSPEND_ENV, "its filesystems frozen")
        .output()
        .unwrap();
    let said = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    resume(g.vm.name());
    assert!(said.contains("may still be frozen"), "{said}");
    let vm_dir = root.join("vms").join(g.vm.name());
    assert!(vm_dir.join("bitmap-journal.json").exists(), "the failed backup left no journal: {said}");
    assert_eq!(store.list(None).unwrap().len(), 1, "{said}");
    let work: Vec<std::path::PathBuf> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".nbd"))
        .collect();
    assert_eq!(work.len(), 1, "{work:?}: {said}");
    assert!(work[0].join("frozen-by-knib").exists(), "the undo removed the freeze marker: {said}");
    assert_eq!(g.fsfreeze_status(), "frozen", "the failed thaw did not leave the guest frozen: {said}");
    let r = store.recover_domain(&g.vm, &Control::new());
    let status = g.fsfreeze_status();
    if status == "frozen" {
        let _ = knib_core::libvirt::qemu_agent_command(&g.vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5);
    }
    let r = r.unwrap();
    assert_eq!(status, "thawed", "recover left the guest frozen: {r:?}");
    assert!(!r.published, "{r:?}");
    assert!(!work[0].exists(), "recover left {}: {r:?}", work[0].display());
}

const CHILD_ENV: &str = "KNIB_QUIESCE_CHILD_REQUEST";

/// Run in the child process: the quiesced bitmap backup the parent asks
/// for (`[store, domain]`), killed by the crash hook or its domain
/// suspended ([`suspend_when_asked`]).
#[test]
fn child_quiesced_bitmap_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let [root, name]: [String; 2] = serde_json::from_str(&req).unwrap();
    suspend_when_asked(&name);
    let vm = knib_core::libvirt::domain(Some(common::vm::URI), &name).unwrap();
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    let r = Store::create(&root).unwrap().backup_domain(&vm, &opts, true, &Control::new());
    eprintln!("child: {r:?}");
}

/// A quiesced bitmap backup killed while the guest's filesystems are
/// frozen (a child process, killed by the crash hook just before the
/// backup job begins) leaves the guest frozen; the store's `recover`
/// thaws it, undoes the backup, and the next quiesced backup works.
/// Before, recover never thawed: the guest's I/O hung until someone ran
/// `virsh domfsthaw`.
///
/// Then a backup killed before its freeze, and the guest frozen by another
/// tool: the recover leaves it frozen, and says so. Before, a recover (and
/// the agent's cleanup of any bitmap backup) thawed a guest whoever froze it.
#[test]
fn recover_thaws_a_guest_a_killed_quiesced_backup_left_frozen() {
    if skip_without_libvirt("recover_thaws_a_guest_a_killed_quiesced_backup_left_frozen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let g = GuestVm::boot("knib-bm-crash", dir.path());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_quiesced_bitmap_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::json!([root, g.vm.name()]).to_string())
        .env(knib_core::crashpoint::CRASH_BEFORE_ENV, "its filesystems frozen")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was not killed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        g.fsfreeze_status(),
        "frozen",
        "the kill did not leave the guest frozen: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = store.recover_domain(&g.vm, &Control::new()).unwrap();
    assert!(!r.published, "{r:?}");
    assert!(r.report.actions.iter().any(|a| a.starts_with("thawed the filesystems of domain")), "{r:?}");
    assert_eq!(g.fsfreeze_status(), "thawed");
    g.sh_ok("echo x > /root/after-recover && sync");
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    let m = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(g.fsfreeze_status(), "thawed");

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_quiesced_bitmap_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::json!([root, g.vm.name()]).to_string())
        .env(knib_core::crashpoint::CRASH_BEFORE_ENV, "backup exports of domain")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was not killed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(g.fsfreeze_status(), "thawed", "the child froze the guest before its kill");
    g.agent(&serde_json::json!({"execute": "guest-fsfreeze-freeze"}));
    let r = store.recover_domain(&g.vm, &Control::new());
    let status = g.fsfreeze_status();
    g.agent(&serde_json::json!({"execute": "guest-fsfreeze-thaw"}));
    let r = r.unwrap();
    assert_eq!(status, "frozen", "the recover thawed a guest another tool froze: {r:?}");
    assert!(r.report.actions.iter().any(|a| a.starts_with("left the filesystems of domain")), "{r:?}");
    assert!(!r.report.actions.iter().any(|a| a.starts_with("thawed")), "{r:?}");
}

/// A quiesced bitmap backup whose guest's freeze ends by itself before the
/// backup job begins (the agent restarted by its freeze hook, as a Windows
/// guest's freeze ends after 10 s; the thaw then answered with an error,
/// the guest thawed) fails, saying the backup is not taken as quiesced,
/// with the VM consistent and nothing published; the next quiesced backup,
/// the agent back to normal, works. Before, knib took the guest saying it
/// was thawed for a thaw that worked, and published the backup as
/// quiesced.
#[test]
fn a_freeze_that_ends_before_the_backup_job_fails_the_backup() {
    if skip_without_libvirt("a_freeze_that_ends_before_the_backup_job_fails_the_backup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-bm-early", dir.path());
    g.end_freezes_early();
    let opts = BackupOptions { method: Some(BackupMethod::Bitmap), ..Default::default() };
    // The job begins 12 s after the freeze: the agent restarts 4 s after
    // it.
    let at = format!("backup job of domain {}, its filesystems frozen", g.vm.name());
    knib_core::crashpoint::pause_before(&at, std::time::Duration::from_secs(12));
    let e = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap_err();
    assert!(e.message.contains("and the guest agent then said its filesystems were thawed"), "{e}");
    assert!(e.message.contains("guest-fsfreeze-thaw has been disabled"), "{e}");
    assert!(e.message.contains("the backup is not taken as quiesced"), "{e}");
    assert_ne!(e.vm_consistent, Some(false), "{e}");
    assert!(store.list(None).unwrap().is_empty());
    assert_eq!(g.fsfreeze_status(), "thawed");
    let vm_dir = store.root().join("vms").join(g.vm.name());
    assert!(!vm_dir.join("bitmap-journal.json").exists(), "a consistent failure left its journal");

    g.thaw_normally();
    let m = store.backup_domain(&g.vm, &opts, true, &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(g.fsfreeze_status(), "thawed");
}
