//! Validation of a backup: a boot test (DESIGN §1, "Validation").
//!
//! [`boot_test`] starts a throwaway transient domain on qcow2 overlays of
//! the backup files (the overlays take every guest write: the backup itself
//! is only ever read, as a backing file) and runs the checks asked for:
//!
//! - wait for boot: the guest agent's `guest-sync`, with a random id that
//!   must come back, every [`SYNC_INTERVAL`] until the boot timeout;
//! - a screenshot of the VGA screen (virDomainScreenshot), saved as PNG
//!   (libvirt hands PNG from QEMU 7.2 on, PPM before: PPM is converted);
//! - a command run through `guest-exec`, polled with `guest-exec-status`,
//!   its exit code and standard output compared with the expected ones.
//!
//! The libvirt side of each lives in `libvirt/`: the domain's XML in
//! [`crate::libvirt::boot_domain`], the guest agent in
//! [`crate::libvirt::guest`], the screenshot in
//! [`crate::libvirt::screenshot`]. This module owns the test: its request,
//! its report, the overlays, and the clean-up.
//!
//! The guest may not fill the host's disk: the test does not start when
//! the file system of its work directory has less than [`MIN_FREE_BYTES`]
//! free, and a watcher thread measures the space the overlays and the
//! console log take, five times a second, while the checks run: when they
//! grow past [`BootTestRequest::max_write_bytes`], or the file system's
//! free space falls below [`MIN_FREE_BYTES`] (whatever filled it), it
//! destroys the domain and cancels the checks; the report says why.
//!
//! Whatever happens (a failed check, an error, a cancellation, a panic),
//! the domain is destroyed and the overlays and console log are removed
//! (see [`BootTestReport::problems`] for a clean-up that failed). A
//! process killed during its boot test cleans nothing: each boot test
//! first destroys the domains `knib-validate-<pid>-<n>` whose process is
//! gone, and removes their overlays and console logs (and the empty
//! directory `knib verify --boot` made for them). Only domains whose
//! description says they were made in this pid namespace are judged so: a
//! knib in a container sharing the host's libvirt would otherwise take a
//! running test's domain of the host for an orphan.
//!
//! How the guest boots: with [`BootTestRequest::kernel`] (and optionally
//! an initrd and a command line), by direct kernel boot, the disks holding
//! the root filesystem; without, through the firmware (SeaBIOS) from the
//! first disk, as a CloudStack guest boots from its root volume.
//!
//! The domain runs QEMU as root with a static DAC label and no relabelling
//! (`<seclabel type='static' model='dac' relabel='no'>`): libvirt never
//! changes the owner of the store's files, and QEMU can read them whatever
//! their permissions. It has one vCPU, virtio disks (IDE or SATA for `hd*`
//! and `sd*` targets), a guest agent channel, a VGA card without any
//! graphics listener (screenshots need none), and its serial console in a
//! file in the work directory (its last lines are quoted when the guest
//! does not boot).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::create_overlay;
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::libvirt::boot_domain::{disk_bus, BootDomain};
use crate::libvirt::guest::{compare_command, exec_problem, run_command, wait_for_agent};
use crate::libvirt::screenshot::screenshot;
use crate::libvirt::{Hypervisor, Vm};
use crate::names;
use crate::progress::Control;
use crate::qemu_img::QemuImg;

pub use crate::libvirt::boot_domain::DEFAULT_CMDLINE;
pub use crate::libvirt::guest::{CommandOutcome, Exec, GuestCommand, COMMAND_TIMEOUT, SYNC_INTERVAL};
pub use crate::libvirt::screenshot::{ppm_to_png, PNG_MAGIC};

/// The least free space a boot test leaves on its work directory's file
/// system: it does not start with less, and a guest whose writes (to its
/// overlays, to its serial console) bring it below is stopped. A backup's
/// guest must never fill the host's disk, which may hold the store.
pub const MIN_FREE_BYTES: u64 = 1 << 30;

/// How often a boot test measures what its guest wrote.
const WRITE_WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// The prefix of the names of boot-test domains: `knib-validate-<pid>-<n>`.
pub const DOMAIN_PREFIX: &str = "knib-validate";

/// A boot test of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootTestRequest {
    /// The disks, in boot order: (guest target, backup file), the file
    /// being the top of the volume's chain on the store. `vd*` targets are
    /// virtio disks, `sd*` SATA, `hd*` IDE.
    pub backup_files: Vec<(String, PathBuf)>,
    /// Where the overlays and the console log go (removed afterwards).
    pub work_dir: PathBuf,
    /// A kernel to boot directly; without one the first disk is booted
    /// through the firmware.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The initrd of the kernel.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel's command line; default [`DEFAULT_CMDLINE`].
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The guest's memory, in MiB.
    pub memory_mib: u64,
    /// How long the guest has to answer the agent's `guest-sync`.
    pub boot_timeout_secs: u64,
    /// Where to save a screenshot (PNG), if one is wanted.
    #[serde(default)]
    pub screenshot: Option<PathBuf>,
    /// A command to run once the guest is up.
    #[serde(default)]
    pub command: Option<GuestCommand>,
    /// libvirt's domain type, `kvm` or `qemu` (TCG); default
    /// [`default_domain_type`].
    #[serde(default)]
    pub domain_type: Option<String>,
    /// The most the guest's overlays and serial console log may grow
    /// together, in bytes (the space their files take, above what it was
    /// at the start: a rewrite of a cluster the overlay holds already
    /// takes none); past it the domain is destroyed and the test fails,
    /// saying so. At least 1. Default: no limit of its own, but the test is
    /// stopped the same way whenever the work directory's file system has
    /// less than [`MIN_FREE_BYTES`] free, whatever filled it.
    #[serde(default)]
    pub max_write_bytes: Option<u64>,
    /// The checks' timing and judging.
    #[serde(flatten)]
    pub timing: CheckTiming,
}

/// How the checks of a guest are timed and judged, apart from what they
/// are (see [`boot_test`] and [`validate_running`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckTiming {
    /// Wait for the guest agent before the other checks (else it is not
    /// waited for, and the boot is not validated).
    #[serde(default = "yes")]
    pub wait_for_boot: bool,
    /// Seconds to wait before the screenshot.
    #[serde(default)]
    pub screenshot_wait_secs: u64,
    /// Seconds the command has to end, from its start.
    #[serde(default = "default_command_timeout")]
    pub command_timeout_secs: u64,
    /// Compare the command's outcome with its expectations
    /// ([`GuestCommand::expect_exit`], [`GuestCommand::expect_output`]) and
    /// report a mismatch as a problem; without, the caller judges
    /// [`BootTestReport::command_result`] itself.
    #[serde(default = "yes")]
    pub judge_command: bool,
}

impl Default for CheckTiming {
    fn default() -> Self {
        CheckTiming {
            wait_for_boot: true,
            screenshot_wait_secs: 0,
            command_timeout_secs: COMMAND_TIMEOUT.as_secs(),
            judge_command: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_command_timeout() -> u64 {
    COMMAND_TIMEOUT.as_secs()
}

/// What a boot test found.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BootTestReport {
    /// The name of the throwaway domain (gone by the time the report is
    /// returned).
    pub domain: String,
    /// Whether the guest agent answered `guest-sync` within the timeout.
    pub booted: bool,
    /// Seconds from the start of the domain to the agent's first answer (or
    /// to giving up).
    pub boot_seconds: f64,
    /// The screenshot, when one was asked for and taken.
    pub screenshot: Option<PathBuf>,
    /// The command's exit code, when it ran and exited.
    pub command_exit: Option<i64>,
    /// The command's standard output, when it ran.
    pub command_output: Option<String>,
    /// Whether the guest booted (when it was waited for) and every check
    /// asked for passed.
    pub passed: bool,
    /// What went wrong, one line each (empty when `passed`).
    pub problems: Vec<String>,
    /// How the command went, when one was asked for (not stored).
    #[serde(skip)]
    pub command_result: Option<Exec>,
}

/// The domain type to use when the request names none: `kvm` when
/// `/dev/kvm` exists and the host's KVM runs ordinary guests, else `qemu`
/// (TCG). A host whose KVM is PVM (the `kvm_pvm` module: nested
/// virtualization by shadow paging, which runs only PVM-enabled guest
/// kernels at speed) gets `qemu` too: an ordinary kernel crawls there.
pub fn default_domain_type() -> &'static str {
    let kvm = Path::new("/dev/kvm").exists();
    let pvm = Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
        && !Path::new("/sys/module/kvm_amd").exists();
    if kvm && !pvm {
        "kvm"
    } else {
        "qemu"
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh domain name, `knib-validate-<pid>-<n>`.
fn domain_name() -> String {
    format!("{DOMAIN_PREFIX}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// The pid in a boot-test domain's name `knib-validate-<pid>-<n>`.
fn boot_domain_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(DOMAIN_PREFIX)?.strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| pid.parse().ok()).flatten()
}

/// Destroy the boot-test domains whose process is gone (killed during
/// its boot test: nothing destroyed them), and remove their overlays and
/// console logs (the files named after the domain beside its disks).
/// A domain whose process still runs, or a pid reused since, is left. What
/// cannot be removed is logged: the boot test goes on.
fn sweep_orphans(hv: &Hypervisor) {
    let domains = match hv.domains() {
        Ok(d) => d,
        Err(e) => {
            log::warn!("boot test: cannot list the domains to remove those of killed boot tests: {e}");
            return;
        }
    };
    for vm in domains {
        let Some(pid) = boot_domain_pid(vm.name()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let name = vm.name().to_string();
        // Only a domain of this pid namespace: pid numbers of another (a
        // container's, or the host's seen from one) say nothing here.
        let here = owner_tag(pid);
        let xml = vm.xml().unwrap_or_default();
        if !here.as_deref().is_some_and(|tag| description_has(&xml, tag)) {
            log::info!(
                "boot test: domain {name} was not made by a knib of this pid namespace ({}); it is left",
                here.as_deref().unwrap_or("this process's pid namespace cannot be read")
            );
            continue;
        }
        // Its disks from the XML just read (no second call to libvirt).
        let mut files: Vec<PathBuf> = crate::libvirt::parse_disks(&xml)
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.file)
            .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{name}-"))))
            .collect();
        let dir = files.first().and_then(|f| f.parent()).map(Path::to_path_buf);
        if let Some(dir) = &dir {
            files.push(dir.join(format!("{name}-console.log")));
        }
        log::warn!("boot test: removing domain {name}, left by a boot test whose process ({pid}) is gone");
        let mut cleanup = Cleanup { vm: Some(vm), files };
        for p in cleanup.finish() {
            log::warn!("boot test: clean-up of {name}: {p}");
        }
        // The private directory `knib verify --boot` made for it, once
        // empty (a directory that still holds anything is left).
        if let Some(dir) =
            dir.filter(|d| d.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(SCRATCH_PREFIX)))
        {
            if std::fs::remove_dir(&dir).is_ok() {
                log::warn!("boot test: removed {}, the empty directory of {name}", dir.display());
            }
        }
    }
}

/// How the private directories `knib verify --boot` makes for a boot test's
/// overlays begin (`knib-validate-<backup>-<random>`, in the temporary
/// directory): a killed boot test's is removed with its domain, once empty.
pub const SCRATCH_PREFIX: &str = "knib-validate-";

/// What the description of a boot-test domain made by process `pid` of
/// this pid namespace says of it: `run by pid <pid> in pid:[<inode>]`.
/// `None` when the namespace cannot be read (such a domain is never
/// swept).
fn owner_tag(pid: u32) -> Option<String> {
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("run by pid {pid} in {}", ns.to_str()?))
}

/// Whether the `<description>` of domain XML `xml` ends with `; <tag>`.
fn description_has(xml: &str, tag: &str) -> bool {
    roxmltree::Document::parse(xml).is_ok_and(|doc| {
        doc.root_element()
            .children()
            .find(|n| n.has_tag_name("description"))
            .and_then(|n| n.text())
            .is_some_and(|d| d.strip_suffix(tag).is_some_and(|rest| rest.ends_with("; ")))
    })
}

/// Destroys the domain and removes the files of a boot test when dropped,
/// whatever happened; [`Cleanup::finish`] does it early and reports.
struct Cleanup {
    vm: Option<Vm>,
    files: Vec<PathBuf>,
}

impl Cleanup {
    fn finish(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(vm) = self.vm.take() {
            // A transient domain disappears when destroyed; one that stopped
            // by itself is gone already.
            if vm.is_running().unwrap_or(false) {
                if let Err(e) = vm.destroy() {
                    if vm.is_running().unwrap_or(false) {
                        problems.push(e.message);
                    }
                }
            }
        }
        for f in self.files.drain(..) {
            if let Err(e) = fsio::remove_if_exists(&f) {
                problems.push(format!("cannot remove {}: {e}", f.display()));
            }
        }
        problems
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.finish() {
            log::warn!("boot test clean-up: {p}");
        }
    }
}

fn check_request(req: &BootTestRequest) -> Result<()> {
    if req.backup_files.is_empty() {
        return Err(KnibError::invalid("boot test: no backup file was given"));
    }
    for (i, (target, file)) in req.backup_files.iter().enumerate() {
        names::validate("disk target", target)?;
        if disk_bus(target).is_none() {
            return Err(KnibError::invalid(format!(
                "boot test: disk target {target:?} does not start with vd, sd or hd"
            )));
        }
        if req.backup_files[..i].iter().any(|(t, _)| t == target) {
            return Err(KnibError::invalid(format!("boot test: disk target {target} is named twice")));
        }
        if !file.is_file() {
            return Err(KnibError::not_found(format!("backup file {} does not exist", file.display())));
        }
    }
    if !req.work_dir.is_dir() {
        return Err(KnibError::not_found(format!("work directory {} does not exist", req.work_dir.display())));
    }
    if req.max_write_bytes == Some(0) {
        return Err(KnibError::invalid("boot test: max_write_bytes is 0: the guest could not write its first byte"));
    }
    for (what, file) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
        if let Some(f) = file {
            // The domain's XML names it, and libvirt does not read a
            // relative path from the caller's working directory.
            if !f.is_absolute() {
                return Err(KnibError::invalid(format!("boot test: {what} {} is not an absolute path", f.display())));
            }
            if !f.is_file() {
                return Err(KnibError::not_found(format!("boot test: {what} {} does not exist", f.display())));
            }
        }
    }
    if req.kernel.is_none() && (req.initrd.is_some() || req.cmdline.is_some()) {
        return Err(KnibError::invalid("boot test: an initrd or a kernel command line needs a kernel"));
    }
    if req.memory_mib < 16 {
        return Err(KnibError::invalid(format!("boot test: {} MiB of memory is too little", req.memory_mib)));
    }
    if req.boot_timeout_secs == 0 {
        return Err(KnibError::invalid("boot test: the boot timeout is 0 s"));
    }
    if let Some(t) = req.domain_type.as_deref() {
        if t != "kvm" && t != "qemu" {
            return Err(KnibError::invalid(format!("boot test: domain type {t:?} is neither kvm nor qemu")));
        }
    }
    check_command(req)
}

fn check_command(req: &BootTestRequest) -> Result<()> {
    if let Some(c) = &req.command {
        if !c.path.starts_with('/') {
            return Err(KnibError::invalid(format!("validation: command {:?} is not an absolute path", c.path)));
        }
    }
    Ok(())
}

/// Boot-test a backup (see the module documentation). An error means the
/// test could not be run (a missing file, a work directory with less than
/// [`MIN_FREE_BYTES`] free (NoSpace), overlays that could not be made, a
/// domain libvirt refused, a cancellation, the caller's deadline); a guest
/// that does not boot, fails a check or was stopped for what it wrote is a
/// report with `passed` false and the reasons in `problems` (the guest
/// stopped: that reason first, then what the checks had found by then).
pub fn boot_test(hv: &Hypervisor, req: &BootTestRequest, ctl: &Control) -> Result<BootTestReport> {
    check_request(req)?;
    sweep_orphans(hv);
    let work_dir = req
        .work_dir
        .canonicalize()
        .map_err(|e| KnibError::io("cannot resolve the work directory", &req.work_dir, e))?;
    let name = domain_name();
    let mut cleanup = Cleanup { vm: None, files: Vec::new() };
    let q = QemuImg::new();
    fsio::require_space(&work_dir, MIN_FREE_BYTES, "boot test")?;

    let mut overlays = Vec::new();
    for (target, backup) in &req.backup_files {
        ctl.check(&format!("the overlay of disk {target}"))?;
        let overlay = work_dir.join(format!("{name}-{target}.qcow2"));
        cleanup.files.push(overlay.clone());
        create_overlay(&q, backup, &overlay, ctl)
            .map_err(|e| e.context(format_args!("boot test: overlay of {}", backup.display())))?;
        overlays.push((target.clone(), overlay));
    }
    let console = work_dir.join(format!("{name}-console.log"));
    cleanup.files.push(console.clone());

    let domain_type = req.domain_type.as_deref().unwrap_or_else(|| default_domain_type());
    let xml = BootDomain {
        name: &name,
        domain_type,
        kernel: req.kernel.as_deref(),
        initrd: req.initrd.as_deref(),
        cmdline: req.cmdline.as_deref(),
        memory_mib: req.memory_mib,
        disks: &overlays,
        console: &console,
        owner: &owner_tag(std::process::id()).unwrap_or_default(),
    }
    .xml()?;
    ctl.check("starting the boot-test domain")?;
    ctl.report("boot test: start", 0.0);
    let started = Instant::now();
    let vm = hv.create_transient(&xml).map_err(|e| e.context("boot test"))?;
    cleanup.vm = Some(vm.clone());

    // The checks run under a control of their own, cancelled by the
    // watcher of the guest's writes when it stops the guest (and when the
    // caller cancels).
    let checks = Control { cancel: crate::progress::CancelToken::new(), ..ctl.clone() };
    let mut files: Vec<PathBuf> = overlays.iter().map(|(_, o)| o.clone()).collect();
    files.push(console.clone());
    let mut report = BootTestReport::default();
    let (checked, stopped) = watched(
        |done| watch_writes(&vm, &files, &work_dir, req.max_write_bytes, ctl, &checks, done),
        || check_guest(hv, &vm, req, started, Some(&console), &checks, &mut report),
    );
    match stopped {
        None => checked?,
        Some(why) => stopped_guest(checked, why, ctl.check("the boot test"), &mut report)?,
    }
    clip_problems(&mut report);
    report.domain = name.clone();
    report.problems.extend(cleanup.finish());
    report.passed = (report.booted || !req.timing.wait_for_boot) && report.problems.is_empty();
    ctl.report("boot test: done", 100.0);
    Ok(report)
}

/// The outcome of checks that ended (`checked`) after the watcher stopped
/// the guest for `why`: the caller's own cancellation or time budget
/// (`outer`, its check now) is an error still, whatever the guest wrote;
/// else the reason goes first in the report's problems, after it what the
/// checks had found, and how they ended when not by the watcher's
/// cancellation.
fn stopped_guest(checked: Result<()>, why: String, outer: Result<()>, report: &mut BootTestReport) -> Result<()> {
    use crate::ErrorKind::{Cancelled, Timeout};
    if let Err(outer) = outer {
        return Err(match checked {
            Err(e) if matches!(e.kind, Cancelled | Timeout) => e,
            _ => outer,
        });
    }
    report.problems.insert(0, why);
    if let Err(e) = checked {
        if e.kind != Cancelled {
            report.problems.push(e.message);
        }
    }
    Ok(())
}

/// Run `checks` while `watch` runs on a thread of its own, told to end
/// (its flag set, its thread woken) when `checks` ends, even by a panic:
/// the scope waits for it before a panic goes on. What each returned (the
/// watcher's verdict is `None` when it panicked).
fn watched<R>(
    watch: impl FnOnce(&std::sync::atomic::AtomicBool) -> Option<String> + Send,
    checks: impl FnOnce() -> R,
) -> (R, Option<String>) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let flag = &done;
    std::thread::scope(|s| {
        let watcher = s.spawn(move || watch(flag));
        let stop = StopWatching(flag, watcher.thread().clone());
        let r = checks();
        drop(stop);
        (r, watcher.join().unwrap_or(None))
    })
}

/// Ends the watcher of [`watched`] when dropped: sets its flag and wakes it.
struct StopWatching<'a>(&'a std::sync::atomic::AtomicBool, std::thread::Thread);

impl Drop for StopWatching<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        self.1.unpark();
    }
}

/// Watch what the boot test's guest writes to `files` (its overlays and
/// console log, measured by the blocks they take) until `done`: when it
/// passes `max` or leaves the work directory's file system less than
/// [`MIN_FREE_BYTES`] free, destroy `vm`, cancel `checks` and say why. A
/// cancellation of the caller's `ctl` is passed on to `checks`.
fn watch_writes(
    vm: &Vm,
    files: &[PathBuf],
    work_dir: &Path,
    max: Option<u64>,
    ctl: &Control,
    checks: &Control,
    done: &std::sync::atomic::AtomicBool,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let taken = || files.iter().filter_map(|f| fs::metadata(f).ok()).map(|m| m.blocks() * 512).sum::<u64>();
    let at_start = taken();
    let mut told = false;
    while !done.load(Ordering::Relaxed) {
        if ctl.cancel.is_cancelled() {
            checks.cancel.cancel();
        }
        let written = taken().saturating_sub(at_start);
        // A file system that cannot say its free space is not held to the
        // reserve (the limit still holds); said once.
        let free = fsio::free_space(work_dir).unwrap_or_else(|e| {
            if !std::mem::replace(&mut told, true) {
                log::warn!("boot test {}: the reserve is not watched: {e}", vm.name());
            }
            u64::MAX
        });
        if let Some(why) = writes_exceeded(written, max, free) {
            log::warn!("boot test {}: {why}", vm.name());
            if let Err(e) = vm.destroy() {
                log::warn!("boot test {}: {e}", vm.name());
            }
            checks.cancel.cancel();
            return Some(why);
        }
        std::thread::park_timeout(WRITE_WATCH_INTERVAL);
    }
    None
}

/// Why a guest that wrote `written` bytes, with `free` bytes left on the
/// work directory's file system, is stopped, if it is (see
/// [`BootTestRequest::max_write_bytes`] and [`MIN_FREE_BYTES`]).
fn writes_exceeded(written: u64, max: Option<u64>, free: u64) -> Option<String> {
    if let Some(max) = max.filter(|&m| written > m) {
        return Some(format!(
            "the guest was stopped: it wrote {} to its overlays and console log, more than the test's limit of {}",
            fsio::human_bytes(written),
            fsio::human_bytes(max)
        ));
    }
    (free < MIN_FREE_BYTES).then(|| {
        format!(
            "the guest was stopped: the work directory's file system had {} free, less than the {} a boot test leaves (the guest had written {})",
            fsio::human_bytes(free),
            fsio::human_bytes(MIN_FREE_BYTES),
            fsio::human_bytes(written)
        )
    })
}

/// Validate a domain that is running already (CloudStack's validation VM,
/// started by the management server on overlays it made): the checks of
/// `req` (its disks, work directory, kernel, memory and domain type are
/// not used), on `vm` as it is. Nothing is created, changed or destroyed
/// but what the command does in the guest and the screenshot file.
pub fn validate_running(hv: &Hypervisor, vm: &Vm, req: &BootTestRequest, ctl: &Control) -> Result<BootTestReport> {
    if !vm.is_running()? {
        return Err(KnibError::invalid(format!("domain {} is not running; there is nothing to validate", vm.name())));
    }
    check_command(req)?;
    let mut report = BootTestReport::default();
    check_guest(hv, vm, req, Instant::now(), None, ctl, &mut report)?;
    clip_problems(&mut report);
    report.domain = vm.name().to_string();
    report.passed = (report.booted || !req.timing.wait_for_boot) && report.problems.is_empty();
    ctl.report("validation: done", 100.0);
    Ok(report)
}

/// The checks of `req` on the running `vm`, in the agent's order: wait for
/// the guest agent (when asked), the screenshot (after its wait), the
/// command. A command is run even when the boot was not waited for; when
/// the agent was waited for in vain it is not run, and its result says so.
fn check_guest(
    hv: &Hypervisor,
    vm: &Vm,
    req: &BootTestRequest,
    started: Instant,
    console: Option<&Path>,
    ctl: &Control,
    report: &mut BootTestReport,
) -> Result<()> {
    if req.timing.wait_for_boot {
        let boot_timeout = Duration::from_secs(req.boot_timeout_secs);
        let (booted, last_error) = wait_for_agent(vm, started, boot_timeout, ctl)?;
        report.booted = booted;
        report.boot_seconds = started.elapsed().as_secs_f64();
        if booted {
            ctl.report("validation: booted", 50.0);
        } else {
            let mut p = format!("no answer from the guest agent within {} s", req.boot_timeout_secs);
            if let Some(e) = last_error {
                let _ = write!(p, " (last: {e})");
            }
            let tail = console.map(|c| console_tail(c, 5)).unwrap_or_default();
            if !tail.is_empty() {
                let _ = write!(p, "; the console ends with: {}", tail.join(" | "));
            }
            report.problems.push(p);
        }
    }

    if let Some(dest) = &req.screenshot {
        let wait = Duration::from_secs(req.timing.screenshot_wait_secs);
        // A wait too long to add to now is waited for as long as a day,
        // never a panic (the request's bound is the caller's).
        let until = Instant::now().checked_add(wait).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        while Instant::now() < until {
            ctl.check("waiting to take the screenshot")?;
            std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
        ctl.check("the screenshot")?;
        match screenshot(hv, vm, dest) {
            Ok(()) => report.screenshot = Some(dest.clone()),
            Err(e) => report.problems.push(format!("no screenshot: {}", e.message)),
        }
    }

    if let Some(cmd) = &req.command {
        let timeout = Duration::from_secs(req.timing.command_timeout_secs);
        let exec = if req.timing.wait_for_boot && !report.booted {
            Exec::Failed(format!(
                "command {} was not run: the guest agent did not answer within {} s",
                cmd.path, req.boot_timeout_secs
            ))
        } else {
            ctl.report("validation: command", 75.0);
            run_command(vm, cmd, timeout, ctl)?
        };
        let mut exec = exec;
        if let Exec::Ended(out) = &mut exec {
            report.command_exit = out.exit;
            if req.timing.judge_command {
                report.problems.extend(compare_command(cmd, out));
            }
            // Judged whole, kept cut: the guest's output goes into job
            // records and answers, which must stay small.
            out.stdout = clip(&out.stdout, MAX_GUEST_OUTPUT);
            out.stderr = clip(&out.stderr, MAX_GUEST_OUTPUT);
            if out.stdout_base64.len() > MAX_GUEST_OUTPUT {
                // A prefix of whole base64 quads stays valid base64.
                out.stdout_base64.truncate(MAX_GUEST_OUTPUT / 4 * 4);
            }
            report.command_output = Some(out.stdout.clone());
        } else if req.timing.judge_command && report.booted {
            report.problems.extend(exec_problem(cmd, &exec, timeout));
        }
        if let Exec::Failed(why) = &mut exec {
            *why = clip(why, MAX_GUEST_TEXT);
        }
        report.command_result = Some(exec);
    }
    Ok(())
}

/// Every problem line may quote the guest (its agent's answers, its
/// output, its console): each is cut to a bounded length.
fn clip_problems(report: &mut BootTestReport) {
    for p in &mut report.problems {
        *p = clip(p, MAX_GUEST_TEXT);
    }
}

/// The longest problem line kept: what the guest said is cut there.
pub const MAX_GUEST_TEXT: usize = 4096;

/// The most of a command's output (stdout, stderr) a report keeps.
pub const MAX_GUEST_OUTPUT: usize = 64 * 1024;

/// `s` cut to at most about `max` bytes (at a character boundary), saying
/// how much was cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} more bytes cut]", &s[..end], s.len() - end)
}

/// The last `n` non-empty lines of the console log (of its last 64 KiB:
/// the guest writes it, and it may be huge).
fn console_tail(console: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(console) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024))).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if f.take(64 * 1024).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim().chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest stopped for its writes: the reason first, what the checks
    /// had found kept, an error of theirs other than the watcher's
    /// cancellation added; but the caller's own cancellation or time
    /// budget is an error.
    #[test]
    fn a_stopped_guest_is_a_report_unless_the_caller_cancelled() {
        use crate::ErrorKind::{Cancelled, Hypervisor as Virt, Timeout};
        let found = || BootTestReport { booted: true, problems: vec!["no screenshot: x".into()], ..Default::default() };
        let stop = || "the guest was stopped: y".to_string();
        let err = |k, m: &str| Err(KnibError::new(k, m));

        let mut r = found();
        stopped_guest(err(Cancelled, "cancelled at the command"), stop(), Ok(()), &mut r).unwrap();
        assert_eq!(r.problems, ["the guest was stopped: y", "no screenshot: x"]);
        assert!(r.booted);

        let mut r = found();
        stopped_guest(err(Virt, "domain is not running"), stop(), Ok(()), &mut r).unwrap();
        assert_eq!(r.problems, ["the guest was stopped: y", "no screenshot: x", "domain is not running"]);

        let mut r = found();
        stopped_guest(Ok(()), stop(), Ok(()), &mut r).unwrap();
        assert_eq!(r.problems, ["the guest was stopped: y", "no screenshot: x"]);

        let outer = || err(Cancelled, "cancelled at the boot test");
        let e = stopped_guest(err(Cancelled, "cancelled at the command"), stop(), outer(), &mut found()).unwrap_err();
        assert_eq!(e.message, "cancelled at the command");
        let e = stopped_guest(err(Timeout, "budget ran out"), stop(), outer(), &mut found()).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (Timeout, "budget ran out"));
        let e = stopped_guest(Ok(()), stop(), outer(), &mut found()).unwrap_err();
        assert_eq!(e.message, "cancelled at the boot test");
    }

    /// A panic of the checks ends the watcher of the guest's writes too:
    /// the scope waits for it before the panic goes on, and without the
    /// guard it would wait for ever.
    #[test]
    fn a_panic_of_the_checks_ends_the_watcher() {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| {
                watched(
                    |done| {
                        while !done.load(Ordering::Relaxed) {
                            std::thread::park_timeout(Duration::from_secs(3600));
                        }
                        None
                    },
                    || panic!("the checks panicked"),
                )
            });
            let _ = tx.send(r.is_err());
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true), "the watcher did not end");
        waiter.join().unwrap();
    }

    #[test]
    fn a_guest_is_stopped_past_its_write_limit_or_the_free_space_reserve() {
        const MIB: u64 = 1 << 20;
        let plenty = 100 * MIN_FREE_BYTES;
        assert_eq!(writes_exceeded(0, None, plenty), None);
        assert_eq!(writes_exceeded(u64::MAX / 2, None, plenty), None);
        assert_eq!(writes_exceeded(8 * MIB, Some(8 * MIB), plenty), None);
        assert_eq!(writes_exceeded(8 * MIB, None, MIN_FREE_BYTES), None);
        let over = writes_exceeded(8 * MIB + 1, Some(8 * MIB), plenty).unwrap();
        assert!(over.contains("wrote 8.0 MiB") && over.contains("limit of 8.0 MiB"), "{over}");
        let full = writes_exceeded(3 * MIB, Some(8 * MIB), MIN_FREE_BYTES - 1).unwrap();
        assert!(
            full.contains("less than the 1.0 GiB a boot test leaves") && full.contains("written 3.0 MiB"),
            "{full}"
        );
    }

    #[test]
    fn boot_domain_names_give_their_pid() {
        assert_eq!(boot_domain_pid("knib-validate-123-0"), Some(123));
        assert_eq!(boot_domain_pid("knib-validate-7-15"), Some(7));
        for other in [
            "knib-validate-",
            "knib-validate-1",
            "knib-validate-x-1",
            "knib-validate-1-",
            "knib-validate-1-2-3",
            "knib-validatex-1-2",
            "vm-1-2",
        ] {
            assert_eq!(boot_domain_pid(other), None, "{other}");
        }
    }

    /// A domain is swept only when its description names its pid in this
    /// pid namespace, as the boot test writes it.
    #[test]
    fn only_a_domain_of_this_pid_namespace_is_the_sweeps() {
        let tag = owner_tag(42).expect("this process's pid namespace");
        assert!(tag.starts_with("run by pid 42 in pid:["), "{tag}");
        let xml = |d: &str| {
            format!("<domain type='kvm'><name>knib-validate-42-0</name><description>{d}</description></domain>")
        };
        let ours = format!("knib boot test of a backup; removed when the test ends; {tag}");
        assert!(description_has(&xml(&ours), &tag));
        for other in [
            "knib boot test of a backup; removed when the test ends".to_string(),
            "knib boot test of a backup; removed when the test ends; run by pid 42 in pid:[1]".to_string(),
            format!("knib boot test of a backup; removed when the test ends; {}", owner_tag(4).unwrap()),
            format!("{ours}; and more"),
            format!("x{tag}"),
        ] {
            assert!(!description_has(&xml(&other), &tag), "{other}");
        }
        assert!(!description_has("<domain><name>x</name></domain>", &tag));
        assert!(!description_has("not xml", &tag));
    }
    use crate::error::ErrorKind;

    /// What the guest says is cut: a problem line and the console's tail
    /// stay bounded whatever it wrote (a job record must stay loadable).
    #[test]
    fn what_the_guest_says_is_cut_to_a_bound() {
        let long = "\u{1}".repeat(3_000_000) + "é";
        let c = clip(&long, MAX_GUEST_TEXT);
        assert!(c.len() < MAX_GUEST_TEXT + 64, "{}", c.len());
        assert!(c.ends_with("more bytes cut]"), "{}", &c[c.len() - 40..]);
        assert_eq!(clip("short", MAX_GUEST_TEXT), "short");
        // At a character boundary.
        assert_eq!(clip("ééé", 3), "é... [4 more bytes cut]");
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut text = "x".repeat(8 << 20);
        text.push_str("\nlast line\n");
        fs::write(&console, text).unwrap();
        let tail = console_tail(&console, 2);
        assert_eq!(tail.last().map(String::as_str), Some("last line"));
        assert!(tail.iter().all(|l| l.len() <= 64 * 1024));
    }

    /// A boot test of `backup_files` in `work_dir`, every other field its
    /// plain value.
    fn request(backup_files: Vec<(String, PathBuf)>, work_dir: &Path) -> BootTestRequest {
        BootTestRequest {
            backup_files,
            work_dir: work_dir.to_path_buf(),
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: 256,
            boot_timeout_secs: 10,
            screenshot: None,
            command: None,
            domain_type: None,
            max_write_bytes: None,
            timing: CheckTiming::default(),
        }
    }

    #[test]
    fn refuses_bad_requests() {
        let dir = std::env::temp_dir();
        let base = request(vec![], &dir);
        assert_eq!(check_request(&base).unwrap_err().kind, ErrorKind::InvalidInput);
        let mut r = base.clone();
        r.backup_files = vec![("../vda".into(), dir.join("nothing"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::InvalidInput);
        r.backup_files = vec![("vda".into(), dir.join("knib-no-such-file"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::NotFound);
        r.backup_files = vec![("xda".into(), dir.join("knib-no-such-file"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::InvalidInput);
    }

    /// A relative kernel or initrd would go into the domain's XML as it is
    /// (before, only `is_file()` from knib's working directory was
    /// checked): refused, naming it, even when it exists from here (the
    /// package's directory, where cargo runs the tests).
    #[test]
    fn a_relative_kernel_or_initrd_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("vda.qcow2");
        std::fs::write(&disk, b"").unwrap();
        let rel = std::path::PathBuf::from("Cargo.toml");
        assert!(rel.is_file());
        let mut base = request(vec![("vda".into(), disk)], d.path());
        base.kernel = Some(std::fs::canonicalize(&rel).unwrap());
        check_request(&base).unwrap();
        let mut r = base.clone();
        r.kernel = Some(rel.clone());
        let e = check_request(&r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert_eq!(e.message, "boot test: kernel Cargo.toml is not an absolute path");
        let mut r = base.clone();
        r.initrd = Some(rel);
        let e = check_request(&r).unwrap_err();
        assert_eq!(e.message, "boot test: initrd Cargo.toml is not an absolute path");
    }
}
