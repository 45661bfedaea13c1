//! The libvirt part against the real daemon: disks and chains, disk-only
//! snapshots, block commit (non-active and active with pivot), block pull,
//! cancel and time limits of block jobs, quiesce without a guest agent,
//! stopped domains. Each test skips (with a message) only when
//! `virsh -c qemu:///system version` fails.

#![cfg(feature = "libvirt")]

#[path = "common/vm.rs"]
mod vm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use knib_core::libvirt::{
    block_commit, block_job_abort, block_job_info, block_pull, commit_and_wait, pull_and_wait, wait_block_job,
    BlockJobKind, CommitFlags, Hypervisor, PullFlags,
};
use knib_core::qemu_img::QemuImg;
use knib_core::{CancelToken, Control, Deadline, ErrorKind, Progress};
use vm::{skip_without_libvirt, TestVm, TestVmOptions, MIB, URI};

const K64: u64 = 64 * 1024;

/// The writes made so far, to read back at the end: (target, pattern,
/// offset, length), none overlapping another.
type Written = Vec<(&'static str, u8, u64, u64)>;

fn write(vm: &TestVm, log: &mut Written, target: &'static str, pattern: u8, offset: u64, len: u64) {
    vm.write(target, pattern, offset, len);
    log.push((target, pattern, offset, len));
}

fn assert_all_read_back(vm: &TestVm, log: &Written) {
    for &(target, pattern, offset, len) in log {
        assert!(vm.read_check(target, pattern, offset, len), "{target}: 0x{pattern:02x} at {offset}+{len} is gone");
    }
}

fn chain(vm: &TestVm, target: &str) -> Vec<PathBuf> {
    vm.disk(target).chain_files().into_iter().map(Path::to_path_buf).collect()
}

fn recording_control() -> (Control, Arc<Mutex<Vec<Progress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let ctl = Control::new().with_progress(Arc::new(move |p: &Progress| sink.lock().unwrap().push(p.clone())));
    (ctl, seen)
}

#[test]
fn snapshots_commit_pivot_and_pull_keep_every_write() {
    if skip_without_libvirt("snapshots_commit_pivot_and_pull_keep_every_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = TestVm::start("knib-parts", &[("vda", 64 * MIB), ("vdb", 32 * MIB)], dir.path());
    let (base_a, base_b) = (t.initial_file("vda"), t.initial_file("vdb"));

    // The domain as the library sees it.
    let hv = Hypervisor::open(URI).unwrap();
    let vm = hv.domain(t.name()).unwrap();
    assert_eq!(vm.name(), t.name());
    assert!(vm.is_running().unwrap());
    let disks = vm.disks().unwrap();
    assert_eq!(disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(), ["vda", "vdb"]);
    assert_eq!(disks[0].file, base_a);
    assert_eq!(disks[1].file, base_b);
    for d in &disks {
        assert_eq!(d.format, "qcow2");
        assert!(d.backing_chain.is_empty(), "{d:?}");
        assert!(d.qom_device_path().unwrap().starts_with("/machine/peripheral/virtio-disk"), "{d:?}");
    }
    assert!(block_job_info(&vm, "vda").unwrap().is_none());

    let mut log = Written::new();
    write(&t, &mut log, "vda", 0xa1, 0, K64);
    write(&t, &mut log, "vdb", 0xb1, MIB, K64);
    // read_check is not vacuous.
    assert!(!t.read_check("vda", 0xff, 0, K64));
    assert!(!t.read_check("vda", 0xa1, MIB, K64));

    // Snapshot 1: base <- d1.
    let d1 = |b: &Path| b.with_extension("d1");
    let d2 = |b: &Path| b.with_extension("d2");
    vm.snapshot_disk_only(&[("vda", d1(&base_a)), ("vdb", d1(&base_b))], false).unwrap();
    assert_eq!(chain(&t, "vda"), [d1(&base_a), base_a.clone()]);
    assert_eq!(chain(&t, "vdb"), [d1(&base_b), base_b.clone()]);
    assert_eq!(t.disk("vda").backing_chain[0].format, "qcow2");
    write(&t, &mut log, "vda", 0xa2, MIB, K64);
    write(&t, &mut log, "vdb", 0xb2, 2 * MIB, K64);

    // Snapshot 2: base <- d1 <- d2 (libvirt writes absolute backing names).
    vm.snapshot_disk_only(&[("vda", d2(&base_a)), ("vdb", d2(&base_b))], false).unwrap();
    assert_eq!(chain(&t, "vda"), [d2(&base_a), d1(&base_a), base_a.clone()]);
    let info = QemuImg::new().info(&d2(&base_a), &Control::new()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some(d1(&base_a).to_str().unwrap()));
    write(&t, &mut log, "vda", 0xa3, 2 * MIB, K64);
    write(&t, &mut log, "vdb", 0xb3, 3 * MIB, K64);
    // Overwrite half of the first write: the newest data must win.
    log[0] = ("vda", 0xa1, K64 / 2, K64 / 2);
    write(&t, &mut log, "vda", 0xa5, 0, K64 / 2);

    // Keeping relative names is refused on libvirt's absolute chain.
    let err = block_commit(
        &vm,
        "vda",
        Some(&base_a),
        Some(&d1(&base_a)),
        CommitFlags { relative: true, ..Default::default() },
    )
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Hypervisor);
    assert!(err.message.contains("virDomainBlockCommit") && err.message.contains("vda"), "{err}");

    // Non-active commit of d1 into base: base <- d2, d2 now backed by base.
    // vda with the low-level calls...
    let (ctl, seen) = recording_control();
    block_commit(&vm, "vda", Some(&base_a), Some(&d1(&base_a)), CommitFlags::default()).unwrap();
    wait_block_job(&vm, "vda", &ctl, "commit vda", false).unwrap();
    assert_eq!(chain(&t, "vda"), [d2(&base_a), base_a.clone()]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.last().map(|p| p.percent), Some(100.0), "{seen:?}");
    assert!(seen.iter().all(|p| p.step == "commit vda"), "{seen:?}");
    assert!(block_job_info(&vm, "vda").unwrap().is_none());
    // ... vdb with the checked helper, after two refused requests.
    let ctl = Control::new();
    let err = commit_and_wait(&vm, "vdb", &base_b, &base_a, false, &ctl, "commit vdb").unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    let err = commit_and_wait(&vm, "vdb", &d1(&base_b), &base_b, false, &ctl, "commit vdb").unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput, "{err}");
    commit_and_wait(&vm, "vdb", &base_b, &d1(&base_b), false, &ctl, "commit vdb").unwrap();
    assert_eq!(chain(&t, "vdb"), [d2(&base_b), base_b.clone()]);
    for base in [&base_a, &base_b] {
        let info = QemuImg::new().info(&d2(base), &Control::new()).unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some(base.to_str().unwrap()));
    }
    assert_all_read_back(&t, &log);
    write(&t, &mut log, "vda", 0xa6, 4 * MIB, K64);

    // Active commit of d2 into base with pivot: vda runs on base alone.
    let (ctl, _) = recording_control();
    block_commit(&vm, "vda", Some(&base_a), None, CommitFlags { active: true, ..Default::default() }).unwrap();
    wait_block_job(&vm, "vda", &ctl, "active commit vda", true).unwrap();
    assert_eq!(chain(&t, "vda"), [base_a.as_path()]);
    assert!(block_job_info(&vm, "vda").unwrap().is_none());

    // Block pull on vdb: d2 holds everything, no backing.
    block_pull(&vm, "vdb", PullFlags::default()).unwrap();
    wait_block_job(&vm, "vdb", &Control::new(), "pull vdb", false).unwrap();
    assert_eq!(chain(&t, "vdb"), [d2(&base_b)]);

    // Once more on vdb with the checked helpers: an active commit with
    // pivot, then a pull.
    write(&t, &mut log, "vdb", 0xb4, 4 * MIB, K64);
    let d3 = |b: &Path| b.with_extension("d3");
    vm.snapshot_disk_only(&[("vdb", d3(&base_b))], false).unwrap();
    assert_eq!(chain(&t, "vda"), [base_a.as_path()]);
    write(&t, &mut log, "vdb", 0xb5, 5 * MIB, K64);
    commit_and_wait(&vm, "vdb", &d2(&base_b), &d3(&base_b), false, &ctl, "commit vdb").unwrap();
    assert_eq!(chain(&t, "vdb"), [d2(&base_b)]);
    vm.snapshot_disk_only(&[("vdb", d3(&base_b).with_extension("d4"))], false).unwrap();
    write(&t, &mut log, "vdb", 0xb6, 6 * MIB, K64);
    pull_and_wait(&vm, "vdb", None, false, &ctl, "pull vdb").unwrap();
    assert_eq!(chain(&t, "vdb"), [d3(&base_b).with_extension("d4")]);

    assert_all_read_back(&t, &log);
    // The guest keeps writing where it should.
    write(&t, &mut log, "vda", 0xa7, 5 * MIB, K64);
    write(&t, &mut log, "vdb", 0xb7, 7 * MIB, K64);
    assert_all_read_back(&t, &log);

    // Powered off, vda's base file holds all of vda's data by itself.
    t.vm.destroy().unwrap();
    for &(target, pattern, offset, len) in log.iter().filter(|w| w.0 == "vda") {
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", &format!("read -P 0x{pattern:02x} {offset} {len}")])
            .arg(&base_a)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("verification failed"), "{target} 0x{pattern:02x}: {text}");
    }
}

#[test]
fn cancel_and_deadline_abort_an_active_commit_and_keep_the_chain() {
    if skip_without_libvirt("cancel_and_deadline_abort_an_active_commit_and_keep_the_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = TestVm::start("knib-parts", &[("vda", 64 * MIB)], dir.path());
    let base = t.initial_file("vda");
    let top = base.with_extension("top");
    let mut log = Written::new();
    write(&t, &mut log, "vda", 0x11, 0, K64);
    t.vm.snapshot_disk_only(&[("vda", &top)], false).unwrap();
    write(&t, &mut log, "vda", 0x22, MIB, K64);
    let active = CommitFlags { active: true, ..Default::default() };

    // Cancelled: the job is aborted, the domain stays on base <- top.
    let cancel = CancelToken::new();
    cancel.cancel();
    block_commit(&t.vm, "vda", None, None, active).unwrap();
    let err = wait_block_job(&t.vm, "vda", &Control::new().with_cancel(cancel), "commit vda", true).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled, "{err}");
    assert!(block_job_info(&t.vm, "vda").unwrap().is_none());
    assert_eq!(chain(&t, "vda"), [top.clone(), base.clone()]);

    // Out of time: the same, as a timeout.
    block_commit(&t.vm, "vda", None, None, active).unwrap();
    let ctl = Control::new().with_deadline(Deadline::after(std::time::Duration::ZERO));
    let err = wait_block_job(&t.vm, "vda", &ctl, "commit vda", true).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(err.message.contains("commit vda"), "{err}");
    assert!(block_job_info(&t.vm, "vda").unwrap().is_none());
    assert_eq!(chain(&t, "vda"), [top.clone(), base.clone()]);
    assert_all_read_back(&t, &log);

    // Without pivot_when_ready the wait ends when the job is ready; the
    // caller pivots.
    block_commit(&t.vm, "vda", None, None, active).unwrap();
    wait_block_job(&t.vm, "vda", &Control::new(), "commit vda", false).unwrap();
    let info = block_job_info(&t.vm, "vda").unwrap().expect("a ready job");
    assert_eq!(info.kind, BlockJobKind::ActiveCommit);
    assert!(info.is_ready(), "{info:?}");
    // libvirt may refuse the pivot for a moment: QEMU reports the job ready
    // (cur == end) before libvirt has handled QEMU's "ready" event.
    let mut tries = 0;
    while let Err(e) = block_job_abort(&t.vm, "vda", true) {
        tries += 1;
        assert!(tries < 50, "pivot: {e}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(chain(&t, "vda"), [base.as_path()]);
    assert_all_read_back(&t, &log);
}

#[test]
fn relative_backing_names_are_kept_on_request() {
    if skip_without_libvirt("relative_backing_names_are_kept_on_request") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    let img = |args: &[&str]| {
        let st = std::process::Command::new("qemu-img").args(args).current_dir(&d).status().unwrap();
        assert!(st.success(), "qemu-img {args:?}");
    };
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "d.qcow2"]);
    img(&["create", "-q", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", "e.qcow2"]);
    let t = TestVm::create_on(
        "knib-parts",
        &[("vda", d.join("e.qcow2"))],
        TestVmOptions { running: true, ..Default::default() },
    );
    // libvirt shows the chain with absolute paths.
    assert_eq!(chain(&t, "vda"), [d.join("e.qcow2"), d.join("d.qcow2"), d.join("base.qcow2")]);
    t.write("vda", 0x33, 0, K64);
    block_commit(
        &t.vm,
        "vda",
        Some(&d.join("base.qcow2")),
        Some(&d.join("d.qcow2")),
        CommitFlags { relative: true, ..Default::default() },
    )
    .unwrap();
    wait_block_job(&t.vm, "vda", &Control::new(), "commit vda", false).unwrap();
    assert_eq!(chain(&t, "vda"), [d.join("e.qcow2"), d.join("base.qcow2")]);
    let info = QemuImg::new().info(&d.join("e.qcow2"), &Control::new()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("base.qcow2"));
    assert!(t.read_check("vda", 0x33, 0, K64));
}

fn quiesce_fails(agent_channel: bool) {
    let dir = tempfile::tempdir().unwrap();
    let t = TestVm::create(
        "knib-parts",
        &[("vda", 16 * MIB), ("vdb", 16 * MIB)],
        dir.path(),
        TestVmOptions { running: true, agent_channel, ..Default::default() },
    );
    let before = t.disks();
    let new_a = t.initial_file("vda").with_extension("q1");
    let new_b = t.initial_file("vdb").with_extension("q1");
    let err = t.vm.snapshot_disk_only(&[("vda", &new_a), ("vdb", &new_b)], true).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Hypervisor, "{err}");
    assert!(err.message.contains("the guest agent did not answer"), "{err}");
    assert!(err.message.contains(t.name()), "{err}");
    assert_eq!(t.disks(), before);
    assert!(!new_a.exists() && !new_b.exists());
    // Without quiesce the same snapshot works.
    t.vm.snapshot_disk_only(&[("vda", &new_a), ("vdb", &new_b)], false).unwrap();
    assert_eq!(t.disk("vda").file, new_a);
}

#[test]
fn quiesce_without_an_agent_channel_fails_and_changes_nothing() {
    if skip_without_libvirt("quiesce_without_an_agent_channel_fails_and_changes_nothing") {
        return;
    }
    quiesce_fails(false);
}

#[test]
fn quiesce_with_a_silent_agent_fails_and_changes_nothing() {
    if skip_without_libvirt("quiesce_with_a_silent_agent_fails_and_changes_nothing") {
        return;
    }
    quiesce_fails(true);
}

#[test]
fn unknown_domain_and_bad_uri() {
    if skip_without_libvirt("unknown_domain_and_bad_uri") {
        return;
    }
    let hv = Hypervisor::open(URI).unwrap();
    assert_eq!(hv.uri(), URI);
    let err = hv.domain("knib-no-such-domain").unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert_eq!(err.message, "domain knib-no-such-domain does not exist");

    let err = Hypervisor::open("qemu:///nowhere").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Hypervisor);
    assert!(err.message.contains("qemu:///nowhere"), "{err}");
}

#[test]
fn stopped_domain_snapshot_works_block_jobs_do_not() {
    if skip_without_libvirt("stopped_domain_snapshot_works_block_jobs_do_not") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = TestVm::define_stopped("knib-parts", &[("vda", 16 * MIB)], dir.path());
    let base = t.initial_file("vda");
    assert!(!t.vm.is_running().unwrap());
    assert!(t.vm.is_persistent().unwrap());
    let d = t.disk("vda");
    assert_eq!((d.file.as_path(), d.format.as_str(), d.alias.as_deref()), (base.as_path(), "qcow2", None));

    // libvirt makes the overlay itself and updates the definition (quiesce
    // is ignored on a stopped domain); the inactive XML has no chain.
    let top = base.with_extension("d1");
    t.vm.snapshot_disk_only(&[("vda", &top)], true).unwrap();
    let d = t.disk("vda");
    assert_eq!(d.file, top);
    assert!(d.backing_chain.is_empty());
    let info = QemuImg::new().info(&top, &Control::new()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some(base.to_str().unwrap()));

    let err = block_commit(&t.vm, "vda", None, None, CommitFlags { active: true, ..Default::default() }).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Hypervisor, "{err}");
    eprintln!("block commit on a stopped domain: {err}");
    let err = block_job_info(&t.vm, "vda").unwrap_err();
    eprintln!("block job info on a stopped domain: {err}");
    let err = knib_core::libvirt::qemu_monitor_command_hmp(&t.vm, "info block").unwrap_err();
    eprintln!("HMP on a stopped domain: {err}");

    // Started, it runs on the overlay and libvirt knows the chain.
    t.boot();
    assert_eq!(chain(&t, "vda"), [top.clone(), base.clone()]);
    t.write("vda", 0x44, MIB, K64);
    assert!(t.read_check("vda", 0x44, MIB, K64));
}

#[test]
fn a_larger_commit_and_pull_report_progress_to_the_end() {
    if skip_without_libvirt("a_larger_commit_and_pull_report_progress_to_the_end") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = TestVm::start("knib-parts", &[("vda", 256 * MIB)], dir.path());
    let base = t.initial_file("vda");
    let mut log = Written::new();
    t.vm.snapshot_disk_only(&[("vda", base.with_extension("d1"))], false).unwrap();
    write(&t, &mut log, "vda", 0x5a, 0, 160 * MIB);
    t.vm.snapshot_disk_only(&[("vda", base.with_extension("d2"))], false).unwrap();
    write(&t, &mut log, "vda", 0x5b, 200 * MIB, MIB);

    let (ctl, seen) = recording_control();
    commit_and_wait(&t.vm, "vda", &base, &base.with_extension("d1"), false, &ctl, "commit vda").unwrap();
    assert_eq!(chain(&t, "vda"), [base.with_extension("d2"), base.clone()]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.last().map(|p| p.percent), Some(100.0), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].percent <= w[1].percent), "{seen:?}");

    let (ctl, seen) = recording_control();
    pull_and_wait(&t.vm, "vda", None, false, &ctl, "pull vda").unwrap();
    assert_eq!(chain(&t, "vda"), [base.with_extension("d2")]);
    assert_eq!(seen.lock().unwrap().last().map(|p| p.percent), Some(100.0));
    assert_all_read_back(&t, &log);
}
