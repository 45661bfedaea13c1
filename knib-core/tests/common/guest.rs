//! A real Linux guest for tests that need one: the small Debian-built test
//! guest of `scripts/build-test-guest.sh` (an ext4 root filesystem on the
//! whole disk, no partition table; busybox; the QEMU guest agent started by
//! its init), booted by direct kernel boot as a running transient domain on
//! a private copy of its disk, with a guest agent channel.
//!
//! [`test_guest`] builds the guest (or finds it in the cache,
//! `/var/tmp/knib-test-guest` or `$KNIB_TEST_GUEST_DIR`) once per test
//! binary. [`GuestVm::boot`] starts a domain on a copy of its disk and waits
//! until the agent answers `guest-sync` (about 10-40 s under TCG);
//! [`GuestVm::sh`] runs a shell command in the guest through `guest-exec`;
//! the domain is destroyed when the [`GuestVm`] is dropped (its files stay
//! in the caller's directory). [`GuestVm::start_syslog`],
//! [`GuestVm::agent_freezes`] and [`GuestVm::hold_writeback`] help prove a
//! freeze; [`backup_file`] reads a file back from a backup.
//!
//! Like the other libvirt test domains, QEMU runs as root (a static DAC
//! label), so the disks may live in `tempfile`'s 0700 directories.

#![cfg(feature = "libvirt")]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use knib_core::catalog::Store;
use knib_core::files::Disk;
use knib_core::libvirt::boot_domain::BootDomain;
use knib_core::libvirt::guest::{run_command, wait_for_agent, CommandOutcome, Exec, GuestCommand};
use knib_core::libvirt::{qemu_agent_command, DiskInfo, Hypervisor, Vm};
use knib_core::{Control, ErrorKind};

use super::vm::URI;

/// How long a guest may take to boot until its agent answers: generous for
/// TCG on a busy machine, never reached when it boots.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long [`GuestVm::sh`] waits for a command.
pub const SH_TIMEOUT: Duration = Duration::from_secs(60);

/// The built test guest (files of the cache directory).
#[derive(Debug)]
pub struct TestGuest {
    /// The cache directory.
    pub dir: PathBuf,
    /// Its disk: qcow2, an ext4 root filesystem on the whole disk.
    pub disk: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// The content of `/etc/knib-marker` in the guest.
    pub marker: String,
}

/// Build the test guest (or find it in the cache) once per test binary.
pub fn test_guest() -> &'static TestGuest {
    static GUEST: OnceLock<TestGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir =
            PathBuf::from(std::env::var("KNIB_TEST_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/knib-test-guest".into()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-guest.sh");
        let started = Instant::now();
        let out = Command::new("bash").arg(&script).arg(&dir).output().expect("bash runs");
        assert!(
            out.status.success(),
            "{} {} failed:\n{}{}",
            script.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("test guest ready in {:.1} s ({})", started.elapsed().as_secs_f64(), dir.display());
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().trim().to_string();
        TestGuest {
            disk: dir.join("disk.qcow2"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            cmdline: read("cmdline"),
            marker: read("marker"),
            dir,
        }
    })
}

/// How a [`GuestVm`] is made.
#[derive(Debug, Clone)]
pub struct GuestVmOptions {
    /// The guest's memory in MiB (default 256).
    pub memory_mib: u64,
    /// Blank qcow2 data disks after the root disk `vda`: (target, size in
    /// bytes), e.g. `("vdb", 16 << 20)`; created as `<name>-<target>.qcow2`.
    pub extra_disks: Vec<(String, u64)>,
    /// How long to wait for the agent (default [`BOOT_TIMEOUT`]).
    pub boot_timeout: Duration,
}

impl Default for GuestVmOptions {
    fn default() -> Self {
        GuestVmOptions { memory_mib: 256, extra_disks: Vec::new(), boot_timeout: BOOT_TIMEOUT }
    }
}

/// A running transient domain of the test guest; destroyed on drop.
pub struct GuestVm {
    /// The connection it was made with.
    pub hv: Hypervisor,
    /// The domain.
    pub vm: Vm,
    name: String,
    /// The disks it started on: (target, file), `vda` first.
    initial: Vec<(String, PathBuf)>,
    console: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl GuestVm {
    /// Boot the test guest as a domain named `<prefix>-<pid>-<n>` on a copy
    /// of its disk made in `dir` (`<name>-vda.qcow2`), and wait until its
    /// guest agent answers. Panics (after destroying the domain) when the
    /// guest does not boot in time, with the end of its serial console.
    pub fn boot(prefix: &str, dir: &Path) -> GuestVm {
        Self::boot_with(prefix, dir, GuestVmOptions::default())
    }

    /// The same, made as `opts` says.
    pub fn boot_with(prefix: &str, dir: &Path, opts: GuestVmOptions) -> GuestVm {
        let g = test_guest();
        let name = format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let dir = std::fs::canonicalize(dir).expect("the disk directory exists");
        let root = dir.join(format!("{name}-vda.qcow2"));
        std::fs::copy(&g.disk, &root)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", g.disk.display(), root.display()));
        let mut disks = vec![("vda".to_string(), root)];
        for (target, size) in &opts.extra_disks {
            let file = dir.join(format!("{name}-{target}.qcow2"));
            super::disk::make_disk(&file, *size, &[]);
            disks.push((target.clone(), file));
        }
        let console = dir.join(format!("{name}-console.log"));
        let xml = BootDomain {
            name: &name,
            domain_type: knib_core::engine::validate::default_domain_type(),
            kernel: Some(&g.kernel),
            initrd: Some(&g.initrd),
            cmdline: Some(&g.cmdline),
            memory_mib: opts.memory_mib,
            disks: &disks,
            console: &console,
            owner: "a knib test's guest",
        }
        .xml()
        .unwrap();
        let hv = Hypervisor::open(URI).expect("connect to libvirt");
        let started = Instant::now();
        let vm = hv.create_transient(&xml).unwrap_or_else(|e| panic!("start domain {name}: {e}"));
        let g = GuestVm { hv, vm, name, initial: disks, console };
        let (answered, why) = wait_for_agent(&g.vm, started, opts.boot_timeout, &Control::new()).unwrap();
        assert!(
            answered,
            "guest {} did not answer within {} s ({}); its console ends with:\n{}",
            g.name,
            opts.boot_timeout.as_secs(),
            why.unwrap_or_default(),
            g.console_tail(20)
        );
        eprintln!("guest {} booted in {:.1} s", g.name, started.elapsed().as_secs_f64());
        g
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file disk `target` started on (the copy of the guest's disk for
    /// `vda`).
    pub fn initial_file(&self, target: &str) -> PathBuf {
        self.initial.iter().find(|(t, _)| t == target).map(|(_, f)| f.clone()).expect("a disk of the guest")
    }

    /// The domain's disks as libvirt reports them now.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.vm.disks().unwrap()
    }

    /// The last `lines` lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Run `/bin/sh -c script` in the guest through `guest-exec` and wait
    /// at most `timeout` for its end: knib's own [`Exec`] (ended with its
    /// exit code and output, failed, or timed out).
    pub fn try_sh(&self, script: &str, timeout: Duration) -> Exec {
        let cmd = GuestCommand {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            expect_exit: None,
            expect_output: None,
        };
        run_command(&self.vm, &cmd, timeout, &Control::new()).unwrap()
    }

    /// Run `/bin/sh -c script` in the guest (at most [`SH_TIMEOUT`]); panics
    /// when it does not run to its end.
    pub fn sh(&self, script: &str) -> CommandOutcome {
        match self.try_sh(script, SH_TIMEOUT) {
            Exec::Ended(out) => out,
            other => panic!("guest {}: sh -c {script:?}: {other:?}", self.name),
        }
    }

    /// Run `/bin/sh -c script` in the guest; panics unless it exits with 0.
    /// Its standard output.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert_eq!(out.exit, Some(0), "guest {}: sh -c {script:?}: {out:?}", self.name);
        out.stdout
    }

    /// Send one JSON command to the guest agent (at most 5 s); its answer's
    /// `return`. Panics on an error.
    pub fn agent(&self, command: &serde_json::Value) -> serde_json::Value {
        let a = qemu_agent_command(&self.vm, &command.to_string(), 5)
            .unwrap_or_else(|e| panic!("guest {}: agent command {command}: {e}", self.name));
        let mut v: serde_json::Value = serde_json::from_str(&a).unwrap();
        v["return"].take()
    }

    /// Start busybox's syslogd in the guest, keeping the log in
    /// `/run/messages` (a tmpfs: never on the disk, so never in a backup).
    /// The agent logs every command it runs there, a freeze as
    /// `guest-fsfreeze called` (see [`GuestVm::agent_freezes`]).
    pub fn start_syslog(&self) {
        self.sh_ok("[ -e /run/messages ] || syslogd -O /run/messages");
    }

    /// How many times the agent logged a freeze (`guest-fsfreeze called`)
    /// since [`GuestVm::start_syslog`].
    pub fn agent_freezes(&self) -> usize {
        self.sh_ok("cat /run/messages").matches("guest-fsfreeze called").count()
    }

    /// The agent's log since [`GuestVm::start_syslog`] (for messages).
    pub fn syslog(&self) -> String {
        self.sh_ok("cat /run/messages")
    }

    /// Hold the guest's writeback back: no periodic flush, dirty data kept
    /// for an hour, the root filesystem's journal committed every 600 s. A
    /// file written without `sync` then stays in the guest's page cache
    /// until a `sync` or a freeze (`FIFREEZE` syncs the filesystem): it is
    /// in a backup only when the guest was quiesced for it.
    pub fn hold_writeback(&self) {
        self.sh_ok(
            "echo 0 > /proc/sys/vm/dirty_writeback_centisecs && echo 360000 > /proc/sys/vm/dirty_expire_centisecs \
             && mount -o remount,commit=600 /",
        );
    }

    /// Dirty data the guest's next freeze must write first, on its disk
    /// throttled (`virsh blkdeviotune`) so that writing it takes about
    /// 50 s: a freeze that outlasts any bound under that.
    pub fn slow_freeze_ahead(&self) {
        self.hold_writeback();
        // Throttled first: dirty data the guest flushed before the
        // throttle (a host under load is slow to set it) would not be
        // there for the freeze to write.
        let out = Command::new("virsh")
            .args(["-c", URI, "blkdeviotune", &self.name, "vda", "--write-bytes-sec", "163840", "--live"])
            .output()
            .unwrap();
        assert!(out.status.success(), "virsh blkdeviotune: {}", String::from_utf8_lossy(&out.stderr));
        self.sh_ok("dd if=/dev/zero of=/root/slow-freeze bs=1M count=8 2>/dev/null");
    }

    /// Restart the guest agent with a freeze hook that fails on `thaw`:
    /// a freeze works, every thaw command fails (the guest is thawed all
    /// the same).
    pub fn fail_thaws(&self) {
        self.sh_ok(
            "printf '#!/bin/sh\\n[ \"$1\" = thaw ] && exit 1\\nexit 0\\n' > /root/thaw-fails && chmod 755 /root/thaw-fails",
        );
        self.restart_agent("-F/root/thaw-fails");
    }

    /// Restart the guest agent with a freeze hook that, on `freeze`, ends
    /// the freeze 4 s later behind the agent's back (the agent killed,
    /// the root filesystem thawed by `fsfreeze --unfreeze`, the agent's
    /// frozen state removed) and starts the agent again with
    /// `guest-fsfreeze-thaw` disabled: a freeze that ends by itself, as a
    /// Windows guest's does after 10 s, and a thaw then answered with an
    /// error, the guest thawed. (A Linux agent ignores SIGTERM while
    /// frozen.)
    pub fn end_freezes_early(&self) {
        self.sh_ok(
            r#"cat > /root/freeze-ends <<'END'
#!/bin/sh
if [ "$1" = freeze ]; then
  setsid sh -c 'sleep 4; kill -9 $(pidof qemu-ga); fsfreeze --unfreeze /; rm -f /run/qga.state.isfrozen; exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -l /run/qemu-ga.log -b guest-fsfreeze-thaw' </dev/null >/dev/null 2>&1 &
fi
exit 0
END
chmod 755 /root/freeze-ends"#,
        );
        self.restart_agent("-F/root/freeze-ends");
    }

    /// Restart the guest agent without a freeze hook (after
    /// [`GuestVm::fail_thaws`] or [`GuestVm::end_freezes_early`]).
    pub fn thaw_normally(&self) {
        self.restart_agent("");
    }

    /// Restart the guest agent with `options` added (a detached shell: the
    /// agent running this command is the one it stops).
    fn restart_agent(&self, options: &str) {
        self.sh_ok(&format!(
            "setsid sh -c 'sleep 2; kill $(pidof qemu-ga); sleep 1; exec /usr/sbin/qemu-ga -m virtio-serial \
             -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -l /run/qemu-ga.log {options}' \
             </dev/null >/dev/null 2>&1 &"
        ));
        std::thread::sleep(Duration::from_secs(6));
        wait_for_agent(&self.vm, Instant::now(), Duration::from_secs(120), &knib_core::Control::new()).unwrap();
    }

    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    pub fn fsfreeze_status(&self) -> String {
        let r = self.agent(&serde_json::json!({"execute": "guest-fsfreeze-status"}));
        r.as_str().unwrap_or_else(|| panic!("guest-fsfreeze-status answered {r}")).to_string()
    }
}

/// The environment variable [`suspend_when_asked`] reads in a test's child
/// process: the name (or part of it) of the step to suspend the domain at.
pub const SUSPEND_ENV: &str = "KNIB_TEST_SUSPEND_AT";

/// In a child process whose parent set [`SUSPEND_ENV`]: suspend domain
/// `name` (`virsh suspend`) while the operation pauses 5 s before that
/// step, as a host under load or an operator might. Every guest agent
/// command after it fails ("domain is not running") until the parent
/// resumes the domain: a thaw that does fail, the guest left frozen.
pub fn suspend_when_asked(name: &str) {
    let Ok(at) = std::env::var(SUSPEND_ENV) else { return };
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(5));
    let name = name.to_string();
    std::thread::spawn(move || {
        if !knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(600)) {
            eprintln!("child: no pause began at {at}");
            return;
        }
        let out = Command::new("virsh").args(["-c", URI, "suspend", &name]).output().unwrap();
        eprintln!("child: virsh suspend {name}: {}", String::from_utf8_lossy(&out.stderr));
    });
}

/// Resume domain `name` (after [`suspend_when_asked`]).
pub fn resume(name: &str) {
    let out = Command::new("virsh").args(["-c", URI, "resume", name]).output().unwrap();
    assert!(out.status.success(), "virsh resume {name}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A token no earlier run can have left anywhere (`knib-<what>-<pid>-<ns>`),
/// to write in a guest and look for in a backup.
pub fn token(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("knib-{what}-{}-{nanos:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// The content of file `path` (trailing white space trimmed) of the only
/// filesystem read natively on volume `volume` of backup `backup`, read by
/// knib's file-level restore; `None` when there is no such file. Panics on
/// any other error.
pub fn backup_file(store: &Store, backup: &str, volume: &str, path: &str) -> Option<String> {
    let disk = Disk::open_backup(store, backup, volume, &Control::new())
        .unwrap_or_else(|e| panic!("volume {volume} of backup {backup}: {e}"));
    disk_file(&disk, path)
}

/// The same on an opened [`Disk`].
pub fn disk_file(disk: &Disk, path: &str) -> Option<String> {
    let scratch = tempfile::tempdir().unwrap();
    let to = scratch.path().join("file");
    match disk.get(None, path, &to, &Control::new()) {
        Ok(_) => Some(std::fs::read_to_string(&to).unwrap().trim_end().to_string()),
        Err(e) if e.kind == ErrorKind::NotFound => None,
        Err(e) => panic!("{path} of {}: {e}", disk.name()),
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if self.vm.is_running().unwrap_or(false) {
            let _ = self.vm.destroy();
        }
    }
}
