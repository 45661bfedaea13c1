//! A group backup that quiesces for real (issue 17): the Debian-built test
//! guest, running the QEMU guest agent, beside a firmware-only domain
//! without an agent channel. What the guest wrote and synced just before
//! the group backup, and what it wrote without a sync (which only the
//! freeze puts on its disk: its writeback is held back), are in its backup,
//! read with file-level restore; what it wrote afterwards is not. The
//! record says which member was quiesced and how long the guests were
//! frozen.

#![cfg(feature = "libvirt")]

mod common;

use std::time::Duration;

use common::guest::{backup_file, resume, suspend_when_asked, token, GuestVm, SUSPEND_ENV};
use common::vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB};
use knib_core::catalog::group::{GroupOptions, MemberSpec};
use knib_core::catalog::Store;
use knib_core::Control;

#[test]
fn a_quiesced_group_backup_holds_what_the_guest_wrote_before_the_freeze() {
    if skip_without_libvirt("a_quiesced_group_backup_holds_what_the_guest_wrote_before_the_freeze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-gquiesce", dir.path());
    g.start_syslog();
    g.hold_writeback();
    let other = firmware_vm("knib-gquiesce-fw", dir.path());
    other.write("vda", 0x5a, MIB, 64 * 1024);

    let synced = token("synced");
    let unsynced = token("unsynced");
    g.sh_ok(&format!("echo {synced} > /root/group-proof && sync && echo {unsynced} > /root/group-unsynced"));
    let members = domains(&[g.name(), other.name()]);
    let opts = quiesced(60);
    let rec = store.backup_group(&members, &opts, &Control::new()).unwrap();
    eprintln!("{rec:#?}");
    assert_eq!(rec.state, "complete");
    assert_eq!((rec.members[0].quiesced, rec.members[1].quiesced), (true, false), "{rec:#?}");
    let frozen_ms = rec.freeze_to_thaw_ms.expect("the freeze was timed");
    assert!(frozen_ms > 0.0 && frozen_ms < 60_000.0, "{rec:#?}");
    assert!(rec.snapshot_skew_ms.is_some_and(|s| s <= frozen_ms), "the snapshots fall inside the freeze: {rec:#?}");
    // Thawed: the guest writes and syncs at once, and says it is thawed;
    // the freeze marker is gone.
    assert_eq!(g.fsfreeze_status(), "thawed");
    let markers = std::fs::read_dir(store.root().join("groups"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".frozen"))
        .count();
    assert_eq!(markers, 0, "a quiesced group left its freeze marker");
    g.sh_ok("echo x > /root/after && sync");
    assert_eq!(g.agent_freezes(), 1, "{}", g.syslog());
    g.sh_ok(&format!("echo {} > /root/group-later && sync", token("later")));

    let b = rec.members[0].backup.as_deref().unwrap();
    assert_eq!(backup_file(&store, b, "vda", "/root/group-proof").as_deref(), Some(synced.as_str()));
    assert_eq!(
        backup_file(&store, b, "vda", "/root/group-unsynced").as_deref(),
        Some(unsynced.as_str()),
        "only the freeze could have put it on the disk"
    );
    assert_eq!(backup_file(&store, b, "vda", "/root/group-later"), None);
    assert_eq!(backup_file(&store, b, "vda", "/root/after"), None);
    // The other member is restorable too.
    let out = dir.path().join("restored");
    let restored = store
        .restore_group(&rec.id, &out, knib_core::qemu_img::ImageFormat::Raw, false, true, false, &Control::new())
        .unwrap()
        .0;
    assert_eq!(restored.len(), 2);
    assert!(common::model::image_has(&restored[1].path, 0x5a, MIB, 64 * 1024));
}

#[test]
fn a_freeze_that_outlasts_its_bound_is_thawed_before_the_group_fails() {
    if skip_without_libvirt("a_freeze_that_outlasts_its_bound_is_thawed_before_the_group_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let g = GuestVm::boot("knib-gthaw", dir.path());
    let other = firmware_vm("knib-gthaw-fw", dir.path());
    g.slow_freeze_ahead();
    let members = domains(&[g.name(), other.name()]);
    let opts = quiesced(3);
    let started = std::time::Instant::now();
    let err = store.backup_group(&members, &opts, &Control::new()).unwrap_err();
    eprintln!("after {:.1} s: {err}", started.elapsed().as_secs_f64());
    assert!(err.message.contains("could not be frozen"), "{err}");
    // libvirt gave up on the freeze after 3 s; the guest went on freezing,
    // and knib thawed it once it could.
    assert_eq!(g.fsfreeze_status(), "thawed");
    g.sh_ok("echo x > /root/after && sync");
    assert!(store.list(None).unwrap().is_empty(), "nothing was published");
}

const CHILD_ENV: &str = "KNIB_GROUP_QUIESCE_CHILD_REQUEST";

/// Run in the child process: the quiesced group backup the parent asks for
/// (`[store, domain, domain]`), killed by the crash hook or its guest's
/// domain suspended ([`suspend_when_asked`]).
#[test]
fn child_quiesced_group_backup() {
    let Ok(req) = std::env::var(CHILD_ENV) else { return };
    let [root, guest, other]: [String; 3] = serde_json::from_str(&req).unwrap();
    suspend_when_asked(&guest);
    let members = domains(&[&guest, &other]);
    let opts = quiesced(60);
    let r = Store::create(&root).unwrap().backup_group(&members, &opts, &Control::new());
    eprintln!("child: {r:?}");
}

/// Members of these domains.
fn domains(names: &[&str]) -> Vec<MemberSpec> {
    names.iter().map(|n| MemberSpec { domain: Some(n.to_string()), vm: None, disks: Vec::new() }).collect()
}

/// A quiesced group's options, its freeze bound `secs` seconds.
fn quiesced(secs: u64) -> GroupOptions {
    GroupOptions { quiesce: true, freeze_timeout: Duration::from_secs(secs), ..Default::default() }
}

/// A running domain without a guest agent channel, a second member.
fn firmware_vm(name: &str, dir: &std::path::Path) -> TestVm {
    TestVm::create(
        name,
        &[("vda", 16 * MIB)],
        dir,
        TestVmOptions { persistent: false, running: true, agent_channel: false },
    )
}

/// Run [`child_quiesced_group_backup`] of `g` and `other` into the store at
/// `root` in a child process, with the environment variable `env` set.
fn group_in_child(root: &std::path::Path, g: &GuestVm, other: &TestVm, env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_quiesced_group_backup", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::json!([root, g.name(), other.name()]).to_string())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A quiesced group backup killed while its guests are frozen (a child
/// process, killed by the crash hook between the freeze and the
/// snapshots) leaves them frozen; `group recover` thaws them, and the next
/// quiesced group backup works. Before, group recover never thawed: the
/// guest's I/O hung until someone ran `virsh domfsthaw`.
#[test]
fn group_recover_thaws_the_guests_a_killed_group_left_frozen() {
    if skip_without_libvirt("group_recover_thaws_the_guests_a_killed_group_left_frozen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let g = GuestVm::boot("knib-gcrash", dir.path());
    let other = firmware_vm("knib-gcrash-fw", dir.path());
    let out = group_in_child(&root, &g, &other, &[(knib_core::crashpoint::CRASH_BEFORE_ENV, "its guests frozen")]);
    let said = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the child was not killed: {said}");
    assert_eq!(g.fsfreeze_status(), "frozen", "the kill did not leave the guest frozen: {said}");
    let recovered = store.recover_groups(None, &Control::new());
    let status = g.fsfreeze_status();
    if status == "frozen" {
        g.agent(&serde_json::json!({"execute": "guest-fsfreeze-thaw"}));
    }
    let recovered = recovered.unwrap();
    assert_eq!(status, "thawed", "group recover left the guest frozen: {recovered:?}");
    g.sh_ok("echo x > /root/after-recover && sync");
    let left: Vec<String> = std::fs::read_dir(root.join("groups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "group recover left {left:?}");
    let members = domains(&[g.name(), other.name()]);
    let opts = quiesced(60);
    let rec = store.backup_group(&members, &opts, &Control::new()).unwrap();
    assert_eq!(rec.state, "complete", "{rec:#?}");
    assert_eq!(g.fsfreeze_status(), "thawed");
}

/// A quiesced group backup whose thaw's hook fails (the guest agent
/// restarted with a freeze hook that fails on `thaw`: the agent thaws the
/// filesystems, then answers the hook's error) is complete, the guest
/// saying its filesystems are thawed. Before, knib sent thaws for three
/// minutes and failed the group, saying the guest might still be frozen.
///
/// Then one whose thaw does fail: in a child process, the guest's domain
/// is suspended while it is frozen, just before the snapshots, and the
/// thaw gets 4 s. The group ends failed and leaves its freeze marker; once
/// the domain is resumed the guest is still frozen, and `group recover`
/// thaws it (through the failing hook) and removes the marker. Before, the
/// guests of a group that had ended were never thawed by recover.
#[test]
fn group_recover_thaws_the_guests_a_group_whose_thaw_failed_left_frozen() {
    if skip_without_libvirt("group_recover_thaws_the_guests_a_group_whose_thaw_failed_left_frozen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let g = GuestVm::boot("knib-gthawfail", dir.path());
    g.fail_thaws();
    // The hook is in place: a thaw answers its error, the guest is thawed.
    g.agent(&serde_json::json!({"execute": "guest-fsfreeze-freeze"}));
    let thaw = knib_core::libvirt::qemu_agent_command(&g.vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5);
    assert!(thaw.as_ref().is_err_and(|e| e.message.contains("hook")), "{thaw:?}");
    assert_eq!(g.fsfreeze_status(), "thawed");
    let other = firmware_vm("knib-gthawfail-fw", dir.path());
    let members = domains(&[g.name(), other.name()]);
    let opts = quiesced(60);
    let rec = store.backup_group(&members, &opts, &Control::new()).unwrap();
    assert_eq!(rec.state, "complete", "{rec:#?}");
    assert_eq!(g.fsfreeze_status(), "thawed");

    let out =
        group_in_child(&root, &g, &other, &[("KNIB_TEST_THAW_BUDGET_SECS", "4"), (SUSPEND_ENV, "its guests frozen")]);
    let said = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    resume(g.name());
    assert!(said.contains("may still be frozen"), "{said}");
    let markers: Vec<String> = std::fs::read_dir(root.join("groups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".frozen"))
        .collect();
    assert_eq!(markers.len(), 1, "the group whose thaw failed left no freeze marker: {markers:?}: {said}");
    assert_eq!(g.fsfreeze_status(), "frozen", "the failed thaw did not leave the guest frozen: {said}");
    let recovered = store.recover_groups(None, &Control::new());
    let status = g.fsfreeze_status();
    if status == "frozen" {
        let _ = knib_core::libvirt::qemu_agent_command(&g.vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5);
    }
    assert_eq!(status, "thawed", "group recover left the guest frozen: {recovered:?}");
    recovered.unwrap();
    assert!(!root.join("groups").join(&markers[0]).exists(), "group recover left {}", markers[0]);
}

/// A quiesced group backup whose guest's freeze ends by itself before the
/// snapshots (the agent restarted by its freeze hook, as a Windows guest's
/// freeze ends after 10 s; the thaw then answered with an error, the guest
/// thawed) fails, saying the group is not taken as quiesced: nothing is
/// published, the snapshots are undone, and no freeze marker is left (the
/// guest is thawed). Before, the guest saying it was thawed was taken for a
/// thaw that worked, and the group was recorded complete and quiesced.
#[test]
fn a_group_whose_freeze_ends_before_the_snapshots_fails() {
    if skip_without_libvirt("a_group_whose_freeze_ends_before_the_snapshots_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::create(&root).unwrap();
    let g = GuestVm::boot("knib-gearly", dir.path());
    g.end_freezes_early();
    let other = firmware_vm("knib-gearly-fw", dir.path());
    let disks = g.disks();
    let members = domains(&[g.name(), other.name()]);
    let opts = quiesced(60);
    // The snapshots wait 12 s after the freeze: the agent restarts 4 s
    // after it.
    let at = format!("its guests frozen: {}", g.name());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(12));
    let e = store.backup_group(&members, &opts, &Control::new()).unwrap_err();
    assert!(e.message.contains("and the guest agent then said its filesystems were thawed"), "{e}");
    assert!(e.message.contains("the group is not taken as quiesced"), "{e}");
    assert!(store.list(None).unwrap().is_empty());
    assert!(store.groups().unwrap().is_empty());
    let left: Vec<String> = std::fs::read_dir(root.join("groups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "the failed group left {left:?}");
    assert_eq!(g.disks(), disks, "the snapshots were not undone");
    assert_eq!(g.fsfreeze_status(), "thawed");

    g.thaw_normally();
    let rec = store.backup_group(&members, &opts, &Control::new()).unwrap();
    assert_eq!(rec.state, "complete", "{rec:#?}");
}
