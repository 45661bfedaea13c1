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
//! Whatever happens (a failed check, an error, a cancellation, a panic),
//! the domain is destroyed and the overlays and console log are removed
//! (see [`BootTestReport::problems`] for a clean-up that failed).
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
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::create_overlay;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::xml::xml_escape;
use crate::libvirt::{qemu_agent_command, virt_error, Hypervisor, Vm};
use crate::names;
use crate::progress::Control;
use crate::qemu_img::QemuImg;

/// How often the guest agent is asked `guest-sync` while the guest boots.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// How long one agent command may wait for its answer, in seconds.
const AGENT_TIMEOUT_SECS: i32 = 5;

/// How long a command run through `guest-exec` may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The prefix of the names of boot-test domains: `knib-validate-<pid>-<n>`.
pub const DOMAIN_PREFIX: &str = "knib-validate";

/// A command to run in the guest through `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    /// The program, an absolute path in the guest (`/bin/cat`).
    pub path: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The exit code it must end with. When neither this nor
    /// `expect_output` is given, the command must exit with 0.
    #[serde(default)]
    pub expect_exit: Option<i64>,
    /// What it must print on its standard output (compared without
    /// trailing white space on either side).
    #[serde(default)]
    pub expect_output: Option<String>,
}

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
}

/// The kernel command line used with a kernel and no command line.
pub const DEFAULT_CMDLINE: &str = "root=/dev/vda console=tty0 console=ttyS0";

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
    /// Whether the guest booted and every check asked for passed.
    pub passed: bool,
    /// What went wrong, one line each (empty when `passed`).
    pub problems: Vec<String>,
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

/// An id for `guest-sync` that an earlier, stale answer cannot carry: the
/// time, the pid and a counter mixed (below 2^53, exact in any JSON reader).
fn sync_id() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ COUNTER.fetch_add(1, Ordering::SeqCst).rotate_left(17);
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x & ((1 << 53) - 1)
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
                if let Err(e) = vm.domain().destroy() {
                    if vm.is_running().unwrap_or(false) {
                        problems.push(format!("cannot destroy domain {}: {}", vm.name(), e.message()));
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
    for (what, file) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
        if let Some(f) = file {
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
    if let Some(c) = &req.command {
        if !c.path.starts_with('/') {
            return Err(KnibError::invalid(format!("boot test: command {:?} is not an absolute path", c.path)));
        }
    }
    Ok(())
}

fn disk_bus(target: &str) -> Option<&'static str> {
    if target.starts_with("vd") {
        Some("virtio")
    } else if target.starts_with("sd") {
        Some("sata")
    } else if target.starts_with("hd") {
        Some("ide")
    } else {
        None
    }
}

fn utf8(p: &Path) -> Result<String> {
    p.to_str().map(xml_escape).ok_or_else(|| KnibError::invalid(format!("path {} is not UTF-8", p.display())))
}

/// The XML of the throwaway domain.
fn domain_xml(
    name: &str,
    req: &BootTestRequest,
    overlays: &[(String, PathBuf)],
    console: &Path,
    domain_type: &str,
) -> Result<String> {
    let mut os = String::from("<type arch='x86_64'>hvm</type>");
    if let Some(kernel) = &req.kernel {
        let _ = write!(os, "<kernel>{}</kernel>", utf8(kernel)?);
        if let Some(initrd) = &req.initrd {
            let _ = write!(os, "<initrd>{}</initrd>", utf8(initrd)?);
        }
        let cmdline = req.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
        let _ = write!(os, "<cmdline>{}</cmdline>", xml_escape(cmdline));
    }
    let mut devices = String::new();
    for (i, (target, file)) in overlays.iter().enumerate() {
        let boot = if i == 0 && req.kernel.is_none() { "\n      <boot order='1'/>" } else { "" };
        let _ = write!(
            devices,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      <target dev='{}' bus='{}'/>{boot}\n    </disk>\n",
            utf8(file)?,
            xml_escape(target),
            disk_bus(target).unwrap_or("virtio"),
        );
    }
    Ok(format!(
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <description>knib boot test of a backup; removed when the test ends</description>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>{os}</os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{devices}    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
        name = xml_escape(name),
        memory = req.memory_mib,
        console = utf8(console)?,
    ))
}

/// Boot-test a backup (see the module documentation). An error means the
/// test could not be run (a missing file, overlays that could not be made,
/// a domain libvirt refused, a cancellation, the caller's deadline); a guest
/// that does not boot or fails a check is a report with `passed` false and
/// the reasons in `problems`.
pub fn boot_test(hv: &Hypervisor, req: &BootTestRequest, ctl: &Control) -> Result<BootTestReport> {
    check_request(req)?;
    let work_dir = req
        .work_dir
        .canonicalize()
        .map_err(|e| KnibError::io("cannot resolve the work directory", &req.work_dir, e))?;
    let name = domain_name();
    let mut cleanup = Cleanup { vm: None, files: Vec::new() };
    let q = QemuImg::new();

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
    let xml = domain_xml(&name, req, &overlays, &console, domain_type)?;
    ctl.check("starting the boot-test domain")?;
    ctl.report("boot test: start", 0.0);
    let started = Instant::now();
    let vm = hv.create_transient(&xml).map_err(|e| e.context("boot test"))?;
    cleanup.vm = Some(vm.clone());

    let mut report = BootTestReport { domain: name.clone(), ..Default::default() };
    let boot_timeout = Duration::from_secs(req.boot_timeout_secs);
    let (booted, last_error) = wait_for_agent(&vm, started, boot_timeout, ctl)?;
    report.booted = booted;
    report.boot_seconds = started.elapsed().as_secs_f64();
    if booted {
        ctl.report("boot test: booted", 50.0);
    } else {
        let mut p = format!("no answer from the guest agent within {} s", req.boot_timeout_secs);
        if let Some(e) = last_error {
            let _ = write!(p, " (last: {e})");
        }
        let tail = console_tail(&console, 5);
        if !tail.is_empty() {
            let _ = write!(p, "; the console ends with: {}", tail.join(" | "));
        }
        report.problems.push(p);
    }

    if let Some(dest) = &req.screenshot {
        ctl.check("the screenshot")?;
        match screenshot(hv, &vm, dest) {
            Ok(()) => report.screenshot = Some(dest.clone()),
            Err(e) => report.problems.push(format!("no screenshot: {}", e.message)),
        }
    }

    if let (true, Some(cmd)) = (booted, &req.command) {
        ctl.report("boot test: command", 75.0);
        match run_command(&vm, cmd, ctl)? {
            Ok(out) => {
                report.command_exit = out.exit;
                report.command_output = Some(out.stdout.clone());
                report.problems.extend(compare_command(cmd, &out));
            }
            Err(p) => report.problems.push(p),
        }
    }

    report.problems.extend(cleanup.finish());
    report.passed = report.booted && report.problems.is_empty();
    ctl.report("boot test: done", 100.0);
    Ok(report)
}

/// Ask `guest-sync` every [`SYNC_INTERVAL`] until the agent echoes the id or
/// `timeout` from `started` passes: (answered, the last failure).
fn wait_for_agent(vm: &Vm, started: Instant, timeout: Duration, ctl: &Control) -> Result<(bool, Option<String>)> {
    // A timeout past what the clock can represent has no end.
    let until = started.checked_add(timeout);
    let mut last_error;
    loop {
        ctl.check("waiting for the guest to boot")?;
        if !vm.is_running().unwrap_or(false) {
            return Ok((false, Some("the domain stopped".into())));
        }
        let id = sync_id();
        let cmd = format!(r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#);
        // libvirt's own message ("Guest agent is not responding: QEMU guest
        // agent is not connected") says enough.
        match vm.domain().qemu_agent_command(&cmd, AGENT_TIMEOUT_SECS, 0) {
            Ok(answer) => match serde_json::from_str::<Value>(&answer) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok((true, None)),
                _ => last_error = Some(format!("guest-sync answered {answer:?}, not the id {id}")),
            },
            Err(e) => last_error = Some(e.message().to_string()),
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok((false, last_error));
        }
        // Sleep to the next attempt (the last one at the deadline), in
        // short steps so that a cancellation is seen at once.
        let next = Instant::now() + SYNC_INTERVAL;
        let wake = until.map_or(next, |u| next.min(u));
        while Instant::now() < wake {
            ctl.check("waiting for the guest to boot")?;
            std::thread::sleep(Duration::from_millis(100).min(wake.saturating_duration_since(Instant::now())));
        }
    }
}

/// The last `n` non-empty lines of the console log.
fn console_tail(console: &Path, n: usize) -> Vec<String> {
    let Ok(bytes) = fs::read(console) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim().chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Take a screenshot of the domain's first screen and save it as PNG at
/// `dest` (written under a temporary name, then renamed).
fn screenshot(hv: &Hypervisor, vm: &Vm, dest: &Path) -> Result<()> {
    let what = || format!("screenshot of domain {}", vm.name());
    let stream = virt::stream::Stream::new(hv.connect(), 0).map_err(|e| virt_error(what(), &e))?;
    let mime = vm.domain().screenshot(&stream, 0, 0).map_err(|e| virt_error(what(), &e))?;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.recv(&mut buf).map_err(|e| virt_error(what(), &e))?;
        if n <= 0 {
            break;
        }
        data.extend_from_slice(&buf[..n as usize]);
    }
    let _ = stream.finish();
    let png = if data.starts_with(PNG_MAGIC) {
        data
    } else if data.starts_with(b"P6") {
        ppm_to_png(&data).map_err(|e| e.context(what()))?
    } else {
        return Err(KnibError::hypervisor(format!(
            "{}: libvirt sent {} bytes of {mime}, neither PNG nor PPM",
            what(),
            data.len()
        )));
    };
    fsio::write_atomic(dest, &png)
}

/// The first bytes of every PNG file.
pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Convert a binary PPM (P6, 8 bits a sample) to PNG.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: &str| KnibError::new(ErrorKind::Hypervisor, format!("the screenshot is not a valid PPM: {why}"));
    let mut pos = 2;
    let mut fields = [0usize; 3];
    if !ppm.starts_with(b"P6") {
        return Err(bad("no P6 magic"));
    }
    for field in &mut fields {
        // White space and comments, then a decimal number.
        loop {
            match ppm.get(pos) {
                Some(c) if c.is_ascii_whitespace() => pos += 1,
                Some(b'#') => {
                    while ppm.get(pos).is_some_and(|&c| c != b'\n') {
                        pos += 1;
                    }
                }
                _ => break,
            }
        }
        let start = pos;
        while ppm.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        *field = std::str::from_utf8(&ppm[start..pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a bad header"))?;
    }
    // One white-space byte ends the header.
    pos += 1;
    let [width, height, maxval] = fields;
    if maxval == 0 || maxval > 255 {
        return Err(bad("not 8 bits a sample"));
    }
    if width == 0 || height == 0 || width > 1 << 15 || height > 1 << 15 {
        return Err(bad("a bad size"));
    }
    let len = width * height * 3;
    let pixels = ppm.get(pos..pos + len).ok_or_else(|| bad("too short"))?;
    let scaled: Vec<u8>;
    let pixels = if maxval == 255 {
        pixels
    } else {
        scaled = pixels.iter().map(|&p| ((p as usize * 255) / maxval) as u8).collect();
        &scaled
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(BufWriter::new(&mut out), width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
        w.write_image_data(pixels).map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
        w.finish().map_err(|e| KnibError::internal(format!("PNG encoder: {e}")))?;
    }
    Ok(out)
}

/// What a command run through `guest-exec` did.
#[derive(Debug, Clone)]
struct CommandOutcome {
    exit: Option<i64>,
    signal: Option<i64>,
    stdout: String,
    stderr: String,
}

fn describe(cmd: &GuestCommand) -> String {
    std::iter::once(cmd.path.as_str()).chain(cmd.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
}

/// Run `cmd` in the guest: `Ok(Ok(outcome))` when it ran to its end,
/// `Ok(Err(problem))` when the agent refused it or it did not end within
/// [`COMMAND_TIMEOUT`]; `Err` on a cancellation or the caller's deadline.
fn run_command(vm: &Vm, cmd: &GuestCommand, ctl: &Control) -> Result<std::result::Result<CommandOutcome, String>> {
    let shown = describe(cmd);
    let exec = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": cmd.path, "arg": cmd.args, "capture-output": true},
    });
    let answer = match qemu_agent_command(vm, &exec.to_string(), AGENT_TIMEOUT_SECS) {
        Ok(a) => a,
        Err(e) => return Ok(Err(format!("command {shown} was not started: {}", e.message))),
    };
    let Some(pid) = serde_json::from_str::<Value>(&answer).ok().and_then(|v| v["return"]["pid"].as_i64()) else {
        return Ok(Err(format!("command {shown}: guest-exec answered {answer:?}, without a pid")));
    };
    let until = Instant::now() + COMMAND_TIMEOUT;
    let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string();
    loop {
        ctl.check(&format!("waiting for command {shown}"))?;
        let answer = match qemu_agent_command(vm, &status, AGENT_TIMEOUT_SECS) {
            Ok(a) => a,
            Err(e) => return Ok(Err(format!("command {shown}: guest-exec-status failed: {}", e.message))),
        };
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        let r = &v["return"];
        if r["exited"].as_bool() == Some(true) {
            let text = |key: &str| -> std::result::Result<String, String> {
                match r[key].as_str() {
                    None => Ok(String::new()),
                    Some(b64) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .map_err(|e| format!("command {shown}: its {key} is not base64: {e}")),
                }
            };
            return Ok(match (text("out-data"), text("err-data")) {
                (Ok(stdout), Ok(stderr)) => {
                    Ok(CommandOutcome { exit: r["exitcode"].as_i64(), signal: r["signal"].as_i64(), stdout, stderr })
                }
                (Err(p), _) | (_, Err(p)) => Err(p),
            });
        }
        if r.is_null() {
            return Ok(Err(format!("command {shown}: guest-exec-status answered {answer:?}")));
        }
        if Instant::now() >= until {
            return Ok(Err(format!("command {shown} did not end within {} s", COMMAND_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The problems of a command's outcome against what was expected.
fn compare_command(cmd: &GuestCommand, out: &CommandOutcome) -> Vec<String> {
    let shown = describe(cmd);
    let mut problems = Vec::new();
    let expect_exit = match (cmd.expect_exit, &cmd.expect_output) {
        (Some(code), _) => Some(code),
        (None, None) => Some(0),
        (None, Some(_)) => None,
    };
    if let Some(code) = expect_exit {
        if out.exit != Some(code) {
            let got = match (out.exit, out.signal) {
                (Some(c), _) => format!("exited with {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                (None, None) => "ended without an exit code".to_string(),
            };
            let stderr = out.stderr.trim();
            let stderr = if stderr.is_empty() { String::new() } else { format!(" (stderr: {stderr:?})") };
            problems.push(format!("command {shown} {got}, expected exit code {code}{stderr}"));
        }
    }
    if let Some(expected) = &cmd.expect_output {
        if out.stdout.trim_end() != expected.trim_end() {
            problems.push(format!(
                "command {shown} printed {:?}, expected {:?}",
                out.stdout.trim_end(),
                expected.trim_end()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(exit: Option<i64>, stdout: &str) -> CommandOutcome {
        CommandOutcome { exit, signal: None, stdout: stdout.into(), stderr: String::new() }
    }

    fn cmd(expect_exit: Option<i64>, expect_output: Option<&str>) -> GuestCommand {
        GuestCommand {
            path: "/bin/cat".into(),
            args: vec!["/etc/x".into()],
            expect_exit,
            expect_output: expect_output.map(str::to_string),
        }
    }

    #[test]
    fn compares_commands() {
        assert!(compare_command(&cmd(None, None), &outcome(Some(0), "")).is_empty());
        let p = compare_command(&cmd(None, None), &outcome(Some(1), ""));
        assert_eq!(p, ["command /bin/cat /etc/x exited with 1, expected exit code 0"]);
        assert!(compare_command(&cmd(None, Some("hello\n")), &outcome(Some(3), "hello")).is_empty());
        let p = compare_command(&cmd(Some(0), Some("bye")), &outcome(Some(0), "hello\n"));
        assert_eq!(p, [r#"command /bin/cat /etc/x printed "hello", expected "bye""#]);
        let p = compare_command(&cmd(Some(0), None), &outcome(None, ""));
        assert_eq!(p, ["command /bin/cat /etc/x ended without an exit code, expected exit code 0"]);
    }

    #[test]
    fn converts_ppm() {
        let mut ppm = b"P6\n# a comment\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        let png = ppm_to_png(&ppm).unwrap();
        assert!(png.starts_with(PNG_MAGIC));
        let mut reader = png::Decoder::new(std::io::Cursor::new(&png)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..info.buffer_size()], &[255, 0, 0, 0, 0, 255]);
        assert!(ppm_to_png(b"P6\n2 1\n255\n\x01").is_err());
        assert!(ppm_to_png(b"P5\n2 1\n255\n").is_err());
    }

    #[test]
    fn sync_ids_differ_and_fit_json() {
        let a = sync_id();
        let b = sync_id();
        assert_ne!(a, b);
        assert!(a < 1 << 53 && b < 1 << 53);
    }

    #[test]
    fn refuses_bad_requests() {
        let dir = std::env::temp_dir();
        let base = BootTestRequest {
            backup_files: vec![],
            work_dir: dir.clone(),
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: 256,
            boot_timeout_secs: 10,
            screenshot: None,
            command: None,
            domain_type: None,
        };
        assert_eq!(check_request(&base).unwrap_err().kind, ErrorKind::InvalidInput);
        let mut r = base.clone();
        r.backup_files = vec![("../vda".into(), dir.join("nothing"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::InvalidInput);
        r.backup_files = vec![("vda".into(), dir.join("knib-no-such-file"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::NotFound);
        r.backup_files = vec![("xda".into(), dir.join("knib-no-such-file"))];
        assert_eq!(check_request(&r).unwrap_err().kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn xml_has_the_devices() {
        let req = BootTestRequest {
            backup_files: vec![("vda".into(), "/s/a.qcow2".into())],
            work_dir: "/w".into(),
            kernel: Some("/k/vmlinuz".into()),
            initrd: Some("/k/initrd".into()),
            cmdline: Some("root=/dev/vda a&b".into()),
            memory_mib: 256,
            boot_timeout_secs: 10,
            screenshot: None,
            command: None,
            domain_type: None,
        };
        let xml = domain_xml(
            "knib-validate-1-0",
            &req,
            &[("vda".into(), "/w/o.qcow2".into())],
            Path::new("/w/c.log"),
            "qemu",
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let text = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).unwrap();
        assert_eq!(text("kernel"), "/k/vmlinuz");
        assert_eq!(text("cmdline"), "root=/dev/vda a&b");
        assert!(xml.contains("org.qemu.guest_agent.0") && xml.contains("<model type='vga'/>"));
        assert!(!xml.contains("<boot order"));
    }
}
