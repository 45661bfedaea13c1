//! Test VMs on the real libvirt daemon (`qemu:///system`): a domain with no
//! operating system (it sits in SeaBIOS, looking for something to boot)
//! whose virtio disks are qcow2 files, and guest writes injected into them.
//!
//! How a guest write is injected ([`TestVm::write`]): the HMP command
//! `qemu-io -d /machine/peripheral/<alias>/virtio-backend "write -P 0xNN OFF LEN"`
//! is sent through libvirt's QEMU monitor passthrough
//! (virDomainQemuMonitorCommand with the HMP flag). `-d` names the guest
//! device by its QOM path (the virtio-blk device's backend), so QEMU writes
//! LEN bytes of the byte NN at offset OFF through the very block backend the
//! virtio-blk device uses: the write lands in whatever the active layer of
//! the disk is at that moment (after a snapshot, the new overlay; after a
//! pivot, the base), exactly where a guest write would go, with the same
//! copy-on-write and dirty tracking. Only the virtio ring is bypassed. The
//! device path, unlike a block node name, survives snapshots and pivots.
//! QEMU 7.2 prints qemu-io's results (`wrote ...`, `read ...`, `Pattern
//! verification failed ...`, `... failed: <error>`) on its standard output,
//! which libvirt sends to `/var/log/libvirt/qemu/<domain>.log`, not into the
//! monitor's answer; the harness reads them from there and fails the test
//! when the command did not succeed. [`TestVm::read_check`] does the same
//! with `read -P 0xNN OFF LEN`, which compares what the guest would read.
//!
//! QEMU runs as root (a static DAC label) so that disk files may live in
//! any directory, including `tempfile`'s 0700 ones.

#![cfg(feature = "libvirt")]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use knib_core::libvirt::{qemu_monitor_command_hmp, DiskInfo, Hypervisor, Vm};

/// The libvirt URI the tests use.
pub const URI: &str = "qemu:///system";

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Whether the libvirt daemon answers (`virsh -c qemu:///system version`).
pub fn libvirt_available() -> bool {
    Command::new("virsh").args(["-c", URI, "version"]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// True (after printing why) when the test `test` must be skipped because
/// the libvirt daemon does not answer. Use as
/// `if skip_without_libvirt("name") { return; }`.
pub fn skip_without_libvirt(test: &str) -> bool {
    if libvirt_available() {
        return false;
    }
    eprintln!("SKIPPED {test}: `virsh -c {URI} version` fails (no libvirt daemon)");
    true
}

/// How a [`TestVm`] is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct TestVmOptions {
    /// Define the domain (persistent) rather than create it transient.
    pub persistent: bool,
    /// Start it (a transient domain is always started).
    pub running: bool,
    /// Give it a guest agent channel (`org.qemu.guest_agent.0`); no agent
    /// runs behind it, so the agent never answers.
    pub agent_channel: bool,
}

/// A throwaway domain for tests; destroyed (and undefined) on drop.
pub struct TestVm {
    /// The connection it was made with.
    pub hv: Hypervisor,
    /// The domain.
    pub vm: Vm,
    name: String,
    persistent: bool,
    /// Disk files the harness created (removed on drop).
    created: Vec<PathBuf>,
    /// The files the disks started on, by target.
    initial: Vec<(String, PathBuf)>,
    /// qemu-io results are read from the shared log: one command at a time.
    io_lock: Mutex<()>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The domain XML of a test VM on `disks` (target, qcow2 file; a file
/// named `*.raw` is a raw disk).
pub fn domain_xml(name: &str, disks: &[(String, PathBuf)], agent_channel: bool) -> String {
    let kind = if Path::new("/dev/kvm").exists() { "kvm" } else { "qemu" };
    let mut devices = String::new();
    for (target, file) in disks {
        let format = if file.extension().is_some_and(|e| e == "raw") { "raw" } else { "qcow2" };
        devices.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n      \
             <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
            xml_escape(file.to_str().expect("UTF-8 disk path")),
            xml_escape(target)
        ));
    }
    if agent_channel {
        devices.push_str(
            "    <channel type='unix'>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n",
        );
    }
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type><boot dev='hd'/></os>
  <on_reboot>restart</on_reboot>
  <devices>
{devices}    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
        name = xml_escape(name)
    )
}

/// Start a defined domain and watch it for a second. A test guest has no
/// OS and waits in its firmware; on nested KVM its QEMU was seen to stop
/// within two seconds of a start, with nothing in its log (libvirt's log:
/// "shutting down, reason=crashed" or "reason=failed"; the start then
/// fails with "domain is no longer running" or "process exited while
/// connecting to monitor"), mostly when the domain is started again right
/// after a `destroy` while other domains start and stop: the domain is
/// then started again after a second, at most three times in all.
fn start_watched(vm: &Vm, name: &str) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=3 {
        if attempt > 1 {
            eprintln!("test domain {name}: {last} (start {} of 3)", attempt - 1);
            std::thread::sleep(Duration::from_secs(1));
        }
        if let Err(e) = vm.start() {
            last = format!("start {name}: {e}");
            continue;
        }
        let until = Instant::now() + Duration::from_secs(1);
        let mut running = true;
        while running && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            running = vm.is_running().unwrap_or(false);
        }
        if running {
            return Ok(());
        }
        last = "stopped within a second of its start".to_string();
    }
    Err(format!("test domain {name} does not stay running: {last}"))
}

impl TestVm {
    /// A running transient domain named `<prefix>-<pid>-<n>` with one qcow2
    /// disk per `(target, size in bytes)`, created in `dir` as
    /// `<name>-<target>.qcow2`.
    pub fn start(prefix: &str, disks: &[(&str, u64)], dir: &Path) -> TestVm {
        Self::create(prefix, disks, dir, TestVmOptions { running: true, ..Default::default() })
    }

    /// The same as a persistent domain, defined but not started.
    pub fn define_stopped(prefix: &str, disks: &[(&str, u64)], dir: &Path) -> TestVm {
        Self::create(prefix, disks, dir, TestVmOptions { persistent: true, ..Default::default() })
    }

    /// A domain with new qcow2 disks, made as `opts` says.
    pub fn create(prefix: &str, disks: &[(&str, u64)], dir: &Path, opts: TestVmOptions) -> TestVm {
        Self::create_with_raw(prefix, disks, &[], dir, opts)
    }

    /// A domain with new disks, made as `opts` says: raw files
    /// `<name>-<target>.raw` for the targets in `raw`, qcow2 files for the
    /// others. All are removed on drop.
    pub fn create_with_raw(
        prefix: &str,
        disks: &[(&str, u64)],
        raw: &[&str],
        dir: &Path,
        opts: TestVmOptions,
    ) -> TestVm {
        let name = unique_name(prefix);
        let dir = std::fs::canonicalize(dir).expect("the disk directory exists");
        let mut files = Vec::new();
        for (target, size) in disks {
            let fmt = if raw.contains(target) { "raw" } else { "qcow2" };
            let file = dir.join(format!("{name}-{target}.{fmt}"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(&file)
                .arg(size.to_string())
                .output()
                .expect("qemu-img runs");
            assert!(
                out.status.success(),
                "qemu-img create {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            files.push((target.to_string(), file));
        }
        let created = files.iter().map(|(_, f)| f.clone()).collect();
        let mut vm = Self::make(name, &files, opts);
        vm.created = created;
        vm
    }

    /// A domain on existing qcow2 files (target, absolute path), made as
    /// `opts` says; the files are left alone on drop.
    pub fn create_on(prefix: &str, disks: &[(&str, PathBuf)], opts: TestVmOptions) -> TestVm {
        let files: Vec<(String, PathBuf)> = disks.iter().map(|(t, f)| (t.to_string(), f.clone())).collect();
        Self::make(unique_name(prefix), &files, opts)
    }

    fn make(name: String, files: &[(String, PathBuf)], opts: TestVmOptions) -> TestVm {
        let hv = Hypervisor::open(URI).expect("connect to libvirt");
        let xml = domain_xml(&name, files, opts.agent_channel);
        let vm = if opts.persistent {
            let vm = hv.define(&xml).unwrap_or_else(|e| panic!("define {name}: {e}\n{xml}"));
            if opts.running {
                if let Err(e) = start_watched(&vm, &name) {
                    let _ = vm.destroy();
                    let _ = vm.undefine();
                    panic!("{e}");
                }
            }
            vm
        } else {
            hv.create_transient(&xml).unwrap_or_else(|e| panic!("create {name}: {e}\n{xml}"))
        };
        TestVm {
            hv,
            vm,
            name,
            persistent: opts.persistent,
            created: Vec::new(),
            initial: files.to_vec(),
            io_lock: Mutex::new(()),
        }
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file disk `target` started on.
    pub fn initial_file(&self, target: &str) -> PathBuf {
        self.initial
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("{} has no disk {target}", self.name))
    }

    /// Start the (persistent, stopped) domain.
    pub fn boot(&self) {
        start_watched(&self.vm, &self.name).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Power the (persistent) domain off.
    pub fn power_off(&self) {
        self.vm.destroy().unwrap_or_else(|e| panic!("destroy {}: {e}", self.name));
    }

    /// The domain's file disks as libvirt shows them now.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.vm.disks().unwrap_or_else(|e| panic!("disks of {}: {e}", self.name))
    }

    /// The disk `target` as libvirt shows it now.
    pub fn disk(&self, target: &str) -> DiskInfo {
        self.vm.disk(target).unwrap_or_else(|e| panic!("disk {target} of {}: {e}", self.name))
    }

    /// The domain's log file, where QEMU's standard output goes.
    pub fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    /// Run one qemu-io command on the running disk `target` (see the module
    /// documentation) and return what qemu-io printed. Panics when the
    /// monitor refuses the command or qemu-io prints nothing within 30 s.
    pub fn qemu_io(&self, target: &str, cmd: &str) -> String {
        let _guard = self.io_lock.lock().unwrap_or_else(|e| e.into_inner());
        let disk = self.disk(target);
        let device = disk
            .qom_device_path()
            .unwrap_or_else(|| panic!("disk {target} of {} has no device alias: is it running?", self.name));
        let log = self.log_path();
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let hmp = format!("qemu-io -d {device} \"{cmd}\"");
        let answer = qemu_monitor_command_hmp(&self.vm, &hmp).unwrap_or_else(|e| panic!("{hmp}: {e}"));
        assert!(answer.trim().is_empty(), "{hmp} on {}: {answer}", self.name);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let bytes = std::fs::read(&log).unwrap_or_default();
            let from = if (bytes.len() as u64) < start { 0 } else { start as usize };
            let text = String::from_utf8_lossy(&bytes[from..]).into_owned();
            // A command ends with its statistics line, or with `<op> failed: <error>`.
            if text.lines().any(|l| l.ends_with("ops/sec)") || l.contains(" failed: ")) {
                return text;
            }
            assert!(
                Instant::now() < until,
                "{hmp} on {}: no result in {} after 30 s: {text:?}",
                self.name,
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Write `len` bytes of `pattern` at `offset` of disk `target` as the
    /// guest would (see the module documentation); panics when it fails.
    pub fn write(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        let out = self.qemu_io(target, &format!("write -P 0x{pattern:02x} {offset} {len}"));
        let expected = format!("wrote {len}/{len} bytes at offset {offset}");
        assert!(
            out.contains(&expected) && !out.contains("failed"),
            "write 0x{pattern:02x} at {offset}+{len} on {target} of {}: {out}",
            self.name
        );
    }

    /// Whether the guest reads `len` bytes of `pattern` at `offset` of disk
    /// `target`; panics when the read itself fails.
    pub fn read_check(&self, target: &str, pattern: u8, offset: u64, len: u64) -> bool {
        let out = self.qemu_io(target, &format!("read -P 0x{pattern:02x} {offset} {len}"));
        let expected = format!("read {len}/{len} bytes at offset {offset}");
        assert!(
            out.contains(&expected) && !out.contains("read failed"),
            "read at {offset}+{len} on {target} of {}: {out}",
            self.name
        );
        !out.contains("Pattern verification failed")
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if self.vm.is_running().unwrap_or(false) {
            if let Err(e) = self.vm.destroy() {
                eprintln!("destroying test domain {}: {e}", self.name);
            }
        }
        if self.persistent && self.vm.is_persistent().unwrap_or(false) {
            if let Err(e) = self.vm.undefine() {
                eprintln!("undefining test domain {}: {e}", self.name);
            }
        }
        for file in &self.created {
            let _ = std::fs::remove_file(file);
        }
    }
}
