//! Boot tests of backups (`engine::validate::boot_test`) against the real
//! libvirt daemon, with a small Linux guest built from Debian packages by
//! `scripts/build-test-guest.sh` (cached in `/var/tmp/knib-test-guest`, or
//! `$KNIB_TEST_GUEST_DIR`): a backup of its disk boots, shows a screen,
//! runs a command; a backup of a blank disk does not boot; the backup files
//! are never written, and the domain and the overlays are gone afterwards
//! whatever happened.
//!
//! The tests run one at a time (each boots a guest; under TCG that is CPU
//! work), and are skipped only when the libvirt daemon does not answer.

#![cfg(feature = "libvirt")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use common::vm::{skip_without_libvirt, URI};
use knib_core::catalog::{BackupOptions, DiskSpec, Manifest, Store};
use knib_core::engine::validate::{boot_test, BootTestReport, BootTestRequest, GuestCommand, PNG_MAGIC};
use knib_core::engine::{hash_files, BackupKind};
use knib_core::libvirt::Hypervisor;
use knib_core::{CancelToken, Control, ErrorKind};

/// Boot timeout for a guest that boots: generous for TCG (it boots in
/// about 10 s there), never reached when it boots.
const BOOT_TIMEOUT_SECS: u64 = 300;

/// Boot timeout for a disk that does not boot.
const NO_BOOT_TIMEOUT_SECS: u64 = 12;

/// One boot test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The built test guest (shared with the other tests that boot it).
use common::guest::TestGuest as Guest;

/// Build the test guest (or find it in the cache) once per test run.
fn guest() -> &'static Guest {
    common::guest::test_guest()
}

fn hv() -> Hypervisor {
    Hypervisor::open(URI).expect("connect to libvirt")
}

/// Every file of the store with its modification time and hash.
fn snapshot_files(root: &Path) -> BTreeMap<PathBuf, (SystemTime, String)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
                let hash = hash_files(std::slice::from_ref(&p), &Control::new()).unwrap();
                out.insert(p, (mtime, hash));
            }
        }
    }
    out
}

/// The names of the domains libvirt knows (running or defined).
fn all_domains() -> Vec<String> {
    let out = Command::new("virsh").args(["-c", URI, "list", "--all", "--name"]).output().expect("virsh runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// The domain of `report` is gone, and no boot-test domain of this process
/// is left; the work directory is empty.
fn assert_cleaned_up(domain: &str, work: &Path) {
    let ours = format!("knib-validate-{}-", std::process::id());
    let left: Vec<String> = all_domains().into_iter().filter(|d| d == domain || d.starts_with(&ours)).collect();
    assert!(left.is_empty(), "boot-test domains left: {left:?}");
    let files: Vec<PathBuf> = std::fs::read_dir(work).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.is_empty(), "files left in the work directory: {files:?}");
}

/// A store with a backup of `disk` (a copy is backed up): a full backup,
/// and with `incremental` a second one on top of it. Returns the store and
/// the last backup.
fn backed_up(dir: &Path, disk: &Path, incremental: bool) -> (Store, Manifest) {
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let root = vm_dir.join("root.qcow2");
    std::fs::copy(disk, &root).unwrap();
    let store = Store::create(dir.join("store")).unwrap();
    let disks = vec![DiskSpec { name: "vda".into(), path: root }];
    let mut m = store.backup("guest", &disks, &BackupOptions::default(), &Control::new()).unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    if incremental {
        m = store.backup("guest", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        assert_eq!(m.kind, BackupKind::Incremental);
    }
    (store, m)
}

fn request(g: &Guest, backup: PathBuf, work: &Path) -> BootTestRequest {
    BootTestRequest {
        backup_files: vec![("vda".into(), backup)],
        work_dir: work.to_path_buf(),
        kernel: Some(g.kernel.clone()),
        initrd: Some(g.initrd.clone()),
        cmdline: Some(g.cmdline.clone()),
        memory_mib: 256,
        boot_timeout_secs: BOOT_TIMEOUT_SECS,
        screenshot: None,
        command: None,
        domain_type: None,
        max_write_bytes: None,
        timing: Default::default(),
    }
}

/// A store holding a backup of a copy of a disk, and an empty work
/// directory beside it, all in `tmp`.
struct Fixture {
    tmp: tempfile::TempDir,
    store: Store,
    /// The backup's file of volume `vda`.
    backup: PathBuf,
    /// The store's files before the test.
    before: BTreeMap<PathBuf, (SystemTime, String)>,
    work: PathBuf,
}

/// A [`Fixture`] with a backup of `disk` (with `incremental`, the second
/// of two).
fn fixture(disk: &Path, incremental: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (store, m) = backed_up(tmp.path(), disk, incremental);
    let backup = store.volume_file(&m, "vda").unwrap();
    let before = snapshot_files(store.root());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    Fixture { tmp, store, backup, before, work }
}

/// Decode a PNG file: (width, height, number of distinct pixels).
fn decode_png(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(PNG_MAGIC), "{} is not a PNG", path.display());
    let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples() * (info.bit_depth as usize).div_ceil(8);
    let distinct: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    (info.width, info.height, distinct.len())
}

fn show(report: &BootTestReport) -> String {
    serde_json::to_string_pretty(report).unwrap()
}

#[test]
fn a_backup_boots_shows_a_screen_and_runs_a_command() {
    if skip_without_libvirt("a_backup_boots_shows_a_screen_and_runs_a_command") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let Fixture { tmp, store, backup, before, work } = fixture(&g.disk, true);
    let shot = tmp.path().join("screen.png");

    let mut req = request(g, backup.clone(), &work);
    req.screenshot = Some(shot.clone());
    req.command = Some(GuestCommand {
        path: "/bin/cat".into(),
        args: vec!["/etc/knib-marker".into()],
        expect_exit: Some(0),
        expect_output: Some(g.marker.clone()),
    });
    let started = Instant::now();
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    eprintln!("boot test in {:.1} s: {}", started.elapsed().as_secs_f64(), show(&report));
    assert!(report.booted, "{}", show(&report));
    assert!(report.passed, "{}", show(&report));
    assert!(report.problems.is_empty(), "{}", show(&report));
    assert!(report.boot_seconds > 0.0 && report.boot_seconds < BOOT_TIMEOUT_SECS as f64);
    assert_eq!(report.command_exit, Some(0));
    assert_eq!(report.command_output.as_deref().map(str::trim_end), Some(g.marker.as_str()));
    assert_eq!(report.screenshot.as_deref(), Some(shot.as_path()));
    let (w, h, distinct) = decode_png(&shot);
    assert!(w >= 320 && h >= 200, "screenshot of {w}x{h}");
    assert!(distinct >= 2, "the screenshot is one colour");
    assert_cleaned_up(&report.domain, &work);

    // The same backup, an output that does not match: the guest boots, the
    // command runs, the test fails and says why.
    let mut req = request(g, backup.clone(), &work);
    req.command = Some(GuestCommand {
        path: "/bin/cat".into(),
        args: vec!["/etc/knib-marker".into()],
        expect_exit: None,
        expect_output: Some("something else".into()),
    });
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    eprintln!("{}", show(&report));
    assert!(report.booted, "{}", show(&report));
    assert!(!report.passed);
    assert_eq!(report.command_exit, Some(0));
    assert_eq!(report.problems.len(), 1, "{}", show(&report));
    let p = &report.problems[0];
    assert!(p.contains("/bin/cat /etc/knib-marker") && p.contains(&g.marker) && p.contains("something else"), "{p}");
    assert_eq!(report.screenshot, None);
    assert_cleaned_up(&report.domain, &work);

    // An exit code that does not match.
    let mut req = request(g, backup, &work);
    req.command = Some(GuestCommand {
        path: "/bin/ls".into(),
        args: vec!["/no/such/file".into()],
        expect_exit: Some(0),
        expect_output: None,
    });
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    assert!(report.booted && !report.passed, "{}", show(&report));
    assert!(report.command_exit.is_some_and(|c| c != 0), "{}", show(&report));
    assert!(report.problems[0].contains("expected exit code 0"), "{}", show(&report));
    assert_cleaned_up(&report.domain, &work);

    // The backup files were only read.
    assert_eq!(snapshot_files(store.root()), before, "the store changed");
}

/// A guest that writes more than the request's `max_write_bytes` (a
/// command filling its disk) is destroyed, and the test fails saying so:
/// before, nothing bounded what a guest wrote to its overlays and console,
/// in the work directory, beside the store maybe. The same command under
/// no limit of its own passes (the free-space reserve leaves it alone).
/// Either way the domain, the overlays and the console log are gone, and
/// the backup was only read.
#[test]
fn a_guest_writing_past_its_limit_is_stopped_and_the_test_fails() {
    if skip_without_libvirt("a_guest_writing_past_its_limit_is_stopped_and_the_test_fails") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let Fixture { tmp: _tmp, store, backup, before, work } = fixture(&g.disk, false);
    let fill = GuestCommand {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), "dd if=/dev/urandom of=/fill bs=1M count=32 && sync && echo filled".into()],
        expect_exit: Some(0),
        expect_output: Some("filled".into()),
    };

    let mut req = request(g, backup.clone(), &work);
    req.command = Some(fill.clone());
    req.max_write_bytes = Some(0);
    let e = boot_test(&hv(), &req, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(e.message.contains("max_write_bytes is 0"), "{e}");
    req.max_write_bytes = Some(8 << 20);
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    eprintln!("{}", show(&report));
    assert!(!report.passed, "{}", show(&report));
    // What the checks found before the guest was stopped is kept: it had
    // booted (the command runs once the agent answers).
    assert!(report.booted && report.boot_seconds > 0.0, "{}", show(&report));
    let p = &report.problems[0];
    assert!(
        p.starts_with("the guest was stopped: it wrote ") && p.ends_with("more than the test's limit of 8.0 MiB"),
        "{}",
        show(&report)
    );
    assert_ne!(report.command_output.as_deref().map(str::trim_end), Some("filled"), "{}", show(&report));
    assert_cleaned_up(&report.domain, &work);

    // The same through the API's throwaway validation (`agent.validate`
    // with `disks`), as a C or Java caller asks it: `max_write_mib`.
    let a = agent_ok(
        "agent.validate",
        &serde_json::json!({
            "disks": [{"target": "vda", "path": backup}],
            "work_dir": work,
            "kernel": g.kernel, "initrd": g.initrd, "cmdline": g.cmdline, "memory_mib": 256,
            "boot_timeout_secs": BOOT_TIMEOUT_SECS,
            "execute_script": true, "script": "/bin/sh",
            "script_arguments": format!("-c,{}", fill.args[1]),
            "max_write_mib": 8,
        }),
    );
    let p = a["problems"][0].as_str().unwrap_or_default();
    assert!(
        a["passed"] == false
            && a["boot_validated"] == true
            && p.starts_with("the guest was stopped: it wrote ")
            && p.ends_with("more than the test's limit of 8.0 MiB"),
        "{a:#}"
    );
    assert_cleaned_up("", &work);

    let mut req = request(g, backup, &work);
    req.command = Some(fill);
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    assert!(report.passed, "{}", show(&report));
    assert_eq!(report.command_output.as_deref().map(str::trim_end), Some("filled"));
    assert_cleaned_up(&report.domain, &work);
    assert_eq!(snapshot_files(store.root()), before, "the store changed");
}

#[test]
fn a_blank_disk_does_not_boot() {
    if skip_without_libvirt("a_blank_disk_does_not_boot") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let blank = tmp.path().join("blank.qcow2");
    common::disk::make_disk(&blank, 64 << 20, &[]);
    let (store, m) = backed_up(tmp.path(), &blank, false);
    let backup = store.volume_file(&m, "vda").unwrap();
    let before = snapshot_files(store.root());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();

    // By direct kernel boot: the initramfs finds no root filesystem.
    let mut req = request(g, backup.clone(), &work);
    req.boot_timeout_secs = NO_BOOT_TIMEOUT_SECS;
    req.screenshot = Some(tmp.path().join("blank.png"));
    req.command = Some(GuestCommand { path: "/bin/true".into(), args: vec![], expect_exit: None, expect_output: None });
    let started = Instant::now();
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    let took = started.elapsed();
    eprintln!("{}", show(&report));
    assert!(!report.booted && !report.passed, "{}", show(&report));
    let want = format!("no answer from the guest agent within {NO_BOOT_TIMEOUT_SECS} s");
    assert!(report.problems[0].starts_with(&want), "{}", show(&report));
    assert!(report.boot_seconds >= NO_BOOT_TIMEOUT_SECS as f64, "{}", show(&report));
    assert!(took < Duration::from_secs(NO_BOOT_TIMEOUT_SECS + 30), "took {took:?}");
    assert_eq!(report.command_exit, None);
    assert_eq!(report.command_output, None);
    // The screen of a guest that did not boot is still saved.
    assert!(report.screenshot.is_some(), "{}", show(&report));
    decode_png(report.screenshot.as_deref().unwrap());
    assert_cleaned_up(&report.domain, &work);

    // Through the firmware: SeaBIOS finds nothing to boot.
    let mut req = request(g, backup, &work);
    req.kernel = None;
    req.initrd = None;
    req.cmdline = None;
    req.boot_timeout_secs = 6;
    let report = boot_test(&hv(), &req, &Control::new()).unwrap();
    assert!(!report.booted && !report.passed, "{}", show(&report));
    assert!(report.problems[0].starts_with("no answer from the guest agent within 6 s"), "{}", show(&report));
    assert_cleaned_up(&report.domain, &work);

    assert_eq!(snapshot_files(store.root()), before, "the store changed");
}

#[test]
fn a_cancelled_boot_test_leaves_nothing_behind() {
    if skip_without_libvirt("a_cancelled_boot_test_leaves_nothing_behind") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let Fixture { tmp, store, backup, before, work } = fixture(&g.disk, false);

    let cancel = CancelToken::new();
    let ctl = Control::new().with_cancel(cancel.clone());
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        cancel.cancel();
    });
    let ours = format!("knib-validate-{}-", std::process::id());
    let started = Instant::now();
    let err = boot_test(&hv(), &request(g, backup.clone(), &work), &ctl).unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.kind, ErrorKind::Cancelled, "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let left: Vec<String> = all_domains().into_iter().filter(|d| d.starts_with(&ours)).collect();
    assert!(left.is_empty(), "boot-test domains left: {left:?}");
    assert!(std::fs::read_dir(&work).unwrap().next().is_none(), "the work directory is not empty");

    // A request that cannot run is refused before anything is made.
    let mut req = request(g, backup, &work);
    req.backup_files.push(("vda".into(), tmp.path().join("blank.qcow2")));
    assert_eq!(boot_test(&hv(), &req, &Control::new()).unwrap_err().kind, ErrorKind::InvalidInput);
    req.backup_files.pop();
    req.kernel = Some(tmp.path().join("no-kernel"));
    assert_eq!(boot_test(&hv(), &req, &Control::new()).unwrap_err().kind, ErrorKind::NotFound);
    assert!(std::fs::read_dir(&work).unwrap().next().is_none());

    assert_eq!(snapshot_files(store.root()), before, "the store changed");
}

/// The validation jobs of the store: a boot test as the queue runs it.
#[test]
fn a_boot_test_on_a_remote_uri_is_refused_before_anything_is_copied() {
    use knib_core::catalog::settings::ValidationSettings;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("vda.qcow2");
    common::disk::make_disk(&disk, 4 << 20, &[]);
    let store = Store::create(tmp.path().join("store")).unwrap();
    let disks = vec![DiskSpec { name: "vda".into(), path: disk }];
    let m = store.backup("guest", &disks, &BackupOptions::default(), &Control::new()).unwrap();
    std::fs::write(store.root().join("vmlinuz"), b"kernel").unwrap();
    for connect in ["qemu+ssh://host/system", "qemu+ext:///system?command=/bin/true", "xen:///system"] {
        let settings = ValidationSettings {
            boot: true,
            connect: connect.into(),
            kernel: Some("vmlinuz".into()),
            ..Default::default()
        };
        let work = tmp.path().join("work");
        let e = store.validate(&m.id, &settings, &work, None, &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains("validation.connect must be a local QEMU URI"), "{e}");
        assert!(e.message.contains(connect), "{e}");
        // Nothing was made for a test that cannot run.
        assert!(std::fs::symlink_metadata(&work).is_err(), "{connect}: {} was left", work.display());
    }
}

#[test]
fn validation_jobs_boot_a_backup_and_fail_one_whose_root_disk_was_zeroed() {
    use knib_core::catalog::jobs::{run_jobs, screenshot_path, JobState, RunOptions};
    if skip_without_libvirt("validation_jobs_boot_a_backup_and_fail_one_whose_root_disk_was_zeroed") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let (store, good) = backed_up(tmp.path(), &g.disk, false);
    // The kernel and initrd are files of the store, named relative to it.
    std::fs::create_dir(store.root().join("boot")).unwrap();
    std::fs::copy(&g.kernel, store.root().join("boot/vmlinuz")).unwrap();
    std::fs::copy(&g.initrd, store.root().join("boot/initrd")).unwrap();
    let settings = |timeout: u64| {
        serde_json::json!({
            "schema": 1,
            "validation.boot": true,
            "validation.kernel": "boot/vmlinuz",
            "validation.initrd": "boot/initrd",
            "validation.cmdline": g.cmdline,
            "validation.memory_mib": 256,
            "validation.boot_timeout_secs": timeout,
            "validation.command": ["/bin/uname"],
            "validation.expect_output": "Linux",
            "validation.max_retries": 0,
        })
        .to_string()
    };
    // One validation job of backup `id` under settings `json`, run: it ends
    // done (`done`) or failed.
    let validate = |id: &str, json: String, done: bool| -> knib_core::catalog::jobs::Job {
        std::fs::write(store.root().join("knib.json"), json).unwrap();
        let job = store.queue_validation(id).unwrap();
        let summary = run_jobs(&store, &RunOptions::default()).unwrap();
        let j = store.job(&job.id).unwrap();
        assert_eq!(if done { &summary.done } else { &summary.failed }, &vec![job.id.clone()], "{j:?}");
        j
    };
    // An initrd that is a link out of the store (to a host file the guest
    // would read) is refused before anything boots.
    let mut linked: serde_json::Value = serde_json::from_str(&settings(BOOT_TIMEOUT_SECS)).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", store.root().join("boot/host-file")).unwrap();
    linked["validation.initrd"] = "boot/host-file".into();
    let j = validate(&good.id, linked.to_string(), false);
    let why = j.last_error.clone().unwrap();
    assert!(why.contains("validation.initrd") && why.contains("boot/host-file"), "{why}");
    assert!(j.result.as_ref().is_none_or(|r| r.get("boot").is_none_or(|b| b.is_null())), "{j:?}");
    // An absolute path (which knib once took) loads, but fails the boot
    // test, naming the setting.
    linked["validation.initrd"] = g.initrd.to_str().unwrap().into();
    let j = validate(&good.id, linked.to_string(), false);
    let why = j.last_error.clone().unwrap();
    assert!(why.contains("setting validation.initrd must be a path inside the store"), "{why}");

    let j = validate(&good.id, settings(BOOT_TIMEOUT_SECS), true);
    let boot = &j.result.as_ref().unwrap()["boot"];
    assert_eq!(boot["passed"], true, "{boot}");
    assert_eq!(boot["command_output"].as_str().map(str::trim_end), Some("Linux"), "{boot}");
    let shot = screenshot_path(&store, &j.id);
    assert_eq!(boot["screenshot"].as_str(), Some(shot.to_str().unwrap()));
    let (w, h, _) = decode_png(&shot);
    assert!(w > 0 && h > 0 && std::fs::metadata(&shot).unwrap().len() > 0);
    let domain = boot["domain"].as_str().unwrap().to_string();
    assert!(!all_domains().contains(&domain), "domain {domain} left");

    // The same backup under `validation.max_write_mib`, with a command that
    // writes more: the guest is stopped and the job fails, saying so.
    let mut limited: serde_json::Value = serde_json::from_str(&settings(BOOT_TIMEOUT_SECS)).unwrap();
    limited["validation.max_write_mib"] = 8.into();
    limited["validation.command"] =
        serde_json::json!(["/bin/sh", "-c", "dd if=/dev/urandom of=/fill bs=1M count=32 && sync && uname"]);
    let j = validate(&good.id, limited.to_string(), false);
    let why = j.last_error.clone().unwrap();
    assert!(why.contains("boot test: the guest was stopped: it wrote ") && why.contains("limit of 8.0 MiB"), "{why}");
    let domain = j.result.as_ref().unwrap()["boot"]["domain"].as_str().unwrap().to_string();
    assert!(!all_domains().contains(&domain), "domain {domain} left");

    // The root disk zeroed in the VM, then backed up: that backup does not boot.
    let root = tmp.path().join("vm/root.qcow2");
    let size = knib_core::qemu_img::QemuImg::default().info(&root, &Control::new()).unwrap().virtual_size;
    let out =
        Command::new("qemu-io").args(["-f", "qcow2", "-c", &format!("write -z 0 {size}")]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let disks = vec![DiskSpec { name: "vda".into(), path: root }];
    let zeroed = store.backup("guest", &disks, &BackupOptions::default(), &Control::new()).unwrap();
    assert_eq!(zeroed.kind, BackupKind::Incremental);
    let images = |m: BTreeMap<PathBuf, (SystemTime, String)>| -> BTreeMap<PathBuf, (SystemTime, String)> {
        m.into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "qcow2")).collect()
    };
    let before = images(snapshot_files(&store.root().join("vms")));
    let j = validate(&zeroed.id, settings(NO_BOOT_TIMEOUT_SECS), false);
    assert_eq!(j.state, JobState::Failed);
    let why = j.last_error.clone().unwrap();
    let want = format!("boot test: no answer from the guest agent within {NO_BOOT_TIMEOUT_SECS} s");
    assert!(why.contains(&want), "{why}");
    let boot = &j.result.as_ref().unwrap()["boot"];
    let domain = boot["domain"].as_str().unwrap().to_string();
    assert!(!all_domains().contains(&domain), "domain {domain} left");
    // No overlay or work directory left, and the backups were only read.
    let left: Vec<_> = std::fs::read_dir(store.jobs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json") && !n.ends_with(".png") && n != ".lock")
        .collect();
    assert!(left.is_empty(), "left in the jobs directory: {left:?}");
    assert_eq!(images(snapshot_files(&store.root().join("vms"))), before, "a backup file changed");
}

/// Destroys the domain when dropped (a test that fails leaves none).
struct Running(knib_core::libvirt::Vm);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.is_running().unwrap_or(false) {
            let _ = self.0.destroy();
        }
    }
}

fn agent_ok(op: &str, req: &serde_json::Value) -> serde_json::Value {
    let a =
        knib_core::api::call(op, &req.to_string(), &Control::new()).unwrap_or_else(|e| panic!("{op}: {e}\n{req:#}"));
    serde_json::from_str(&a).unwrap()
}

/// The agent's path (issue 14 §3): the "management server" makes the
/// validation VM's volume, knib turns it into an overlay of the backup
/// (`agent.prepare_validation` with `overlay_path`), the management server
/// starts the VM, and `agent.validate` validates that running domain by
/// name: a screenshot named and answered as the agent names it, a script
/// whose arguments are split at commas, its result as the agent's
/// `scriptResult` (null, the base64 output, "Timeout", the error), with the
/// script's timeout honoured; nothing created or destroyed;
/// `agent.cleanup_validation` does nothing unless asked to remove the domain.
#[test]
fn the_agent_validates_the_running_validation_vm_as_kboss_does() {
    use base64::Engine as _;
    use knib_core::libvirt::boot_domain::BootDomain;
    use serde_json::json;
    if skip_without_libvirt("the_agent_validates_the_running_validation_vm_as_kboss_does") {
        return;
    }
    let _serial = serial();
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    // The backup on the store, as CloudStack lays it out.
    let store_root = tmp.path().join("mnt-store");
    let backup = store_root.join("backups/2/7/0b1c2d3e");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    std::fs::copy(&g.disk, &backup).unwrap();
    let backup_hash = hash_files(std::slice::from_ref(&backup), &Control::new()).unwrap();
    // The validation VM's volume, empty, as the management server creates it.
    let primary = tmp.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    let volume = primary.join("5e6f7a8b");
    common::disk::make_disk(&volume, 64 << 20, &[]);

    let a = agent_ok(
        "agent.prepare_validation",
        &json!({"vm_name": "v-7", "volumes": [{"uuid": "5e6f7a8b", "backup_path": backup, "overlay_path": volume}]}),
    );
    assert_eq!(a["volumes"][0]["overlay_path"], json!(volume));
    let info = knib_core::qemu_img::QemuImg::default().info(&volume, &Control::new()).unwrap();
    assert_eq!(
        info.full_backing_filename.as_deref().map(Path::new),
        Some(backup.canonicalize().unwrap().as_path()),
        "{info:?}"
    );
    assert_eq!(std::fs::read_dir(&primary).unwrap().count(), 1, "prepare left a temporary file");

    // The management server starts the validation VM.
    let name = format!("knib-kboss-validation-{}", std::process::id());
    let disks = [("vda".to_string(), volume.clone())];
    let console = tmp.path().join("console.log");
    let xml = BootDomain {
        name: &name,
        domain_type: knib_core::engine::validate::default_domain_type(),
        kernel: Some(&g.kernel),
        initrd: Some(&g.initrd),
        cmdline: Some(&g.cmdline),
        memory_mib: 256,
        disks: &disks,
        console: &console,
        owner: "the management server's validation VM",
    }
    .xml()
    .unwrap();
    let vm = Running(hv().create_transient(&xml).unwrap());

    // Boot, a screenshot after its wait, a script that exits 3 with output.
    let base = json!({
        "domain": name,
        "boot_timeout_secs": BOOT_TIMEOUT_SECS,
        "execute_script": true,
        "script": "/bin/sh",
        "script_arguments": "-c,echo a b; exit 3",
        "script_timeout_secs": 30,
    });
    let mut req = base.clone();
    req["take_screenshot"] = json!(true);
    req["screenshot_wait_secs"] = json!(1);
    req["screenshot_next_to"] = json!(backup);
    req["store_root"] = json!(store_root);
    req["expected_result"] = json!("0");
    let a = agent_ok("agent.validate", &req);
    eprintln!("{a:#}");
    assert_eq!(a["boot_validated"], true, "{a:#}");
    let out_b64 = base64::engine::general_purpose::STANDARD.encode("a b\n");
    assert_eq!(a["script_result"], json!(out_b64), "the output in base64, as the agent answers: {a:#}");
    assert_eq!((a["script_exit_code"].as_i64(), a["script_output"].as_str()), (Some(3), Some("a b\n")), "{a:#}");
    assert_eq!(a["passed"], false, "{a:#}");
    let rel = a["screenshot_store_path"].as_str().unwrap();
    assert!(rel.starts_with("backups/2/7/0b1c2d3e-screenshot-") && rel.ends_with(".png"), "{rel}");
    let shot = store_root.join(rel);
    assert_eq!(a["screenshot_path"], json!(shot));
    let (w, h, _) = decode_png(&shot);
    assert!(w >= 320 && h >= 200, "screenshot of {w}x{h}");

    // The same output expected, in base64 as the management server keeps
    // it: matched, so null.
    let mut req = base.clone();
    req["expected_result"] = json!(out_b64);
    let a = agent_ok("agent.validate", &req);
    assert_eq!((a["script_result"].clone(), a["passed"].clone()), (json!(null), json!(true)), "{a:#}");
    // The decoded output is not what the agent compares with.
    req["expected_result"] = json!("a b\n");
    assert_eq!(agent_ok("agent.validate", &req)["script_result"], json!(out_b64));
    // "0" (the default) matches an exit code of 0.
    let mut req = base.clone();
    req["script_arguments"] = json!("-c,exit 0");
    req.as_object_mut().unwrap().remove("script_timeout_secs");
    let a = agent_ok("agent.validate", &req);
    assert_eq!((a["script_result"].clone(), a["passed"].clone()), (json!(null), json!(true)), "{a:#}");
    // A script that outlives its timeout: "Timeout", in about that time.
    let mut req = base.clone();
    req["script"] = json!("/bin/sleep");
    req["script_arguments"] = json!("60");
    req["script_timeout_secs"] = json!(2);
    let started = Instant::now();
    let a = agent_ok("agent.validate", &req);
    assert_eq!(a["script_result"], "Timeout", "{a:#}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    // A program the guest does not have: the error, which is no match.
    let mut req = base.clone();
    req["script"] = json!("/no/such/program");
    let a = agent_ok("agent.validate", &req);
    let r = a["script_result"].as_str().unwrap_or_default();
    assert!(!r.is_empty() && r != "Timeout" && a["passed"] == false, "{a:#}");

    // knib created, changed and destroyed nothing.
    assert!(vm.0.is_running().unwrap(), "the validation VM was stopped");
    assert_eq!(hash_files(std::slice::from_ref(&backup), &Control::new()).unwrap(), backup_hash);
    let on_store: Vec<PathBuf> =
        std::fs::read_dir(backup.parent().unwrap()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(on_store.len(), 2, "the backup and one screenshot: {on_store:?}");

    // The clean-up, as the agent's, does nothing; with remove_domain it
    // removes the domain.
    let a = agent_ok("agent.cleanup_validation", &json!({"vm_name": name}));
    assert_eq!(a, json!({"domain_removed": false, "removed": []}));
    assert!(vm.0.is_running().unwrap());
    let a = agent_ok("agent.cleanup_validation", &json!({"vm_name": name, "remove_domain": true}));
    assert_eq!(a["domain_removed"], true);
    assert!(!all_domains().contains(&name), "domain {name} left");
    assert!(volume.exists(), "the volume is the management server's to remove");
}
