//! The live rows: a full and an incremental backup of a running domain, by knib (the
//! catalog's domain backup: a disk-only snapshot, the copy of the delta,
//! the block commit) and by `virtnbdbackup` (libvirt's backup API, dirty
//! bitmaps, NBD). The domain has no operating system (it sits in SeaBIOS);
//! its disk is a copy of the benchmark's disk, and the guest's writes are
//! made through the disk's own block backend with HMP `qemu-io -d`. Each
//! run of each tool starts from a fresh domain, a full backup by the same
//! tool and the same writes (seeded by the run), all untimed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use knib_core::catalog::{BackupOptions, Store};
use knib_core::engine::BackupMethod;
use knib_core::libvirt::{qemu_monitor_command_hmp, Hypervisor};
use knib_core::Control;

use super::{ok, s, Rng, CS};
use crate::measure::{cmd, compare_serving, Measured, RowEnv, Tool};

pub(crate) const URI: &str = "qemu:///system";

/// The servers the live rows drive (their CPU is the rows' work, shown
/// apart from other processes'): the domain's QEMU, libvirt's daemons.
const SERVERS: &[&str] = &["qemu-system-x86", "libvirtd", "virtlogd"];

/// Why the row cannot run here, if it cannot.
pub(crate) fn unavailable() -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join("virtnbdbackup").is_file());
    if !found {
        return Some(
            "virtnbdbackup is not installed (Debian package `virtnbdbackup`, in scripts/setup.sh)".to_string(),
        );
    }
    let libvirt =
        Command::new("virsh").args(["-c", URI, "version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !libvirt {
        return Some(format!("the libvirt daemon does not answer (`virsh -c {URI} version` fails)"));
    }
    None
}

/// knib's side: one backup of the running domain `name` into the store
/// (a full one on a new store, incremental after) by `method`. The bytes
/// QEMU wrote to storage meanwhile (`write_bytes` of its `/proc/PID/io`:
/// the block commit of the snapshot method; the bitmaps and scratch files
/// of the bitmap method) are appended, with the backup's kind, to
/// [`writes_file`] beside the live directory (which each run removes).
pub(crate) fn knib_backup(store: &Path, name: &str, method: BackupMethod) {
    let ctl = Control::new();
    let hv = Hypervisor::open(URI).expect("libvirt");
    let vm = hv.domain(name).expect("the domain");
    let before = qemu_write_bytes(name);
    let st = Store::create(store).expect("store");
    let opts = BackupOptions { method: Some(method), ..Default::default() };
    let m = st.backup_domain(&vm, &opts, false, &ctl).expect("domain backup");
    if let (Some(b), Some(a), Some(dir)) = (before, qemu_write_bytes(name), store.parent()) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(writes_file(dir, method))
            .expect("the QEMU writes file");
        writeln!(f, "{} {}", m.kind.as_str(), a.saturating_sub(b)).expect("the QEMU writes file");
    }
}

/// Where [`knib_backup`] records QEMU's writes for the live directory `dir`.
fn writes_file(dir: &Path, method: BackupMethod) -> PathBuf {
    dir.with_extension(format!("qemu-writes-{}", method.as_str()))
}

/// `write_bytes` of the QEMU process of domain `name`, when it can be read.
fn qemu_write_bytes(name: &str) -> Option<u64> {
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?;
    let io = std::fs::read_to_string(format!("/proc/{}/io", pid.trim())).ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok())
}

/// The median of the incremental backups' figures in a writes file.
fn median_incremental_writes(file: &Path) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut v: Vec<u64> =
        text.lines().filter_map(|l| l.strip_prefix("incremental ")).filter_map(|n| n.trim().parse().ok()).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn xml(name: &str, disk: &Path) -> String {
    let kind = if Path::new("/dev/kvm").exists() { "kvm" } else { "qemu" };
    format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
        disk.to_str().expect("UTF-8 path")
    )
}

/// The row's domain and files.
pub(crate) struct Live<'a> {
    pub(crate) me: &'a str,
    pub(crate) src: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) size: u64,
    pub(crate) changed: u64,
    pub(crate) name: String,
}

impl Live<'_> {
    fn disk(&self) -> PathBuf {
        self.dir.join("vda.qcow2")
    }
    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    fn nbd(&self) -> PathBuf {
        self.dir.join("virtnbdbackup")
    }

    /// Destroy and undefine the domain, remove the files.
    pub(crate) fn teardown(&self) {
        if let Ok(hv) = Hypervisor::open(URI) {
            if let Ok(vm) = hv.domain(&self.name) {
                let _ = vm.destroy();
                // Its checkpoints (virtnbdbackup's) go with it.
                let _ = Command::new("virsh")
                    .args(["-c", URI, "undefine", &self.name, "--checkpoints-metadata", "--snapshots-metadata"])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A fresh running domain on a copy of the disk; then, with `full`, a
    /// full backup by it (untimed) and the run's writes.
    fn prepare(&self, run: usize, full: Option<&[String]>) {
        self.teardown();
        std::fs::create_dir_all(self.store()).expect("live dir");
        let disk = self.disk();
        ok(Command::new("cp").arg("--sparse=always").arg(&self.src).arg(&disk));
        ok(Command::new("sync").arg(&disk));
        let hv = Hypervisor::open(URI).expect("libvirt");
        // Persistent: virtnbdbackup keeps checkpoints, which a transient
        // domain may refuse.
        let vm = hv.define(&xml(&self.name, &disk)).expect("define the domain");
        vm.start().expect("start the domain");
        let Some(full) = full else { return };
        ok(Command::new(&full[0]).args(&full[1..]));
        let device = vm.disk("vda").expect("disk vda").qom_device_path().expect("a running disk has a device alias");
        let log = PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name));
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut rng = Rng::new(100 + run as u64);
        let (mut written, mut writes) = (0, 0);
        while written < self.changed {
            let n = (1 + rng.below(16)).min(self.changed - written);
            let at = rng.below(self.size / CS - n);
            let hmp = format!("qemu-io -d {device} \"write -P {} {} {}\"", 1 + rng.below(250), at * CS, n * CS);
            let answer = qemu_monitor_command_hmp(&vm, &hmp).expect("qemu-io through the monitor");
            assert!(answer.trim().is_empty(), "{hmp}: {answer}");
            written += n;
            writes += 1;
        }
        // qemu-io prints into the domain's log, not into the answer: each
        // write ends with its statistics line (`... ops/sec)`), a failed
        // one with `failed: `.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let bytes = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes[(start as usize).min(bytes.len())..]).into_owned();
            assert!(!text.contains(" failed: "), "a write of the live row failed: {text}");
            if text.lines().filter(|l| l.ends_with("ops/sec)")).count() >= writes {
                break;
            }
            assert!(Instant::now() < until, "the live row's writes did not finish in 60 s: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The guest's writes reach the disk before the timed backup starts
        // (QEMU writes through the host's page cache): each tool's timed
        // `sync -f` then writes back its own work only, not the guest's.
        ok(Command::new("sync").arg("-f").arg(&disk));
        eprintln!("  ({writes} writes, {written} clusters)");
    }
}

/// Run the rows: knib's full domain backup against virtnbdbackup's, then
/// the incremental ones; (full, incremental).
pub(crate) fn rows(live: &Live<'_>, runs: usize) -> ((Vec<Measured>, RowEnv), (Vec<Measured>, RowEnv)) {
    let (store, nbd) = (s(&live.store()), s(&live.nbd()));
    let knib_once = cmd(&[live.me, "op", "live-backup", &store, &live.name]);
    let nbd_full = cmd(&["virtnbdbackup", "-U", URI, "-d", &live.name, "-l", "full", "-o", &nbd]);
    let nbd_inc = cmd(&["virtnbdbackup", "-U", URI, "-d", &live.name, "-l", "inc", "-o", &nbd]);
    // The domain is removed however the row ends (a failed step panics).
    struct Down<'a, 'b>(&'a Live<'b>);
    impl Drop for Down<'_, '_> {
        fn drop(&mut self) {
            self.0.teardown();
        }
    }
    let _down = Down(live);
    let fresh = |run: usize| live.prepare(run, None);
    let full = compare_serving(
        runs,
        &[
            Tool::new("knib", vec![knib_once.clone()], &live.store()).sync_fs().setup(&fresh),
            Tool::new("virtnbdbackup", vec![nbd_full.clone()], &live.nbd()).sync_fs().setup(&fresh),
        ],
        SERVERS,
    );
    let knib_prep = |run: usize| live.prepare(run, Some(&knib_once));
    let nbd_prep = |run: usize| live.prepare(run, Some(&nbd_full));
    let inc = compare_serving(
        runs,
        &[
            Tool::new("knib", vec![knib_once.clone()], &live.store()).sync_fs().setup(&knib_prep),
            Tool::new("virtnbdbackup", vec![nbd_inc], &live.nbd()).sync_fs().setup(&nbd_prep),
        ],
        SERVERS,
    );
    let _ = std::fs::remove_file(writes_file(&live.dir, BackupMethod::Snapshot));
    (full, inc)
}

/// The bitmap row: a 1%-changed incremental backup of the running domain
/// by bitmap against one by snapshot, each after a full backup by the same
/// method and the same writes (untimed); the timings and the median bytes
/// QEMU wrote to storage during each incremental (bitmap, snapshot).
pub(crate) fn method_rows(live: &Live<'_>, runs: usize) -> ((Vec<Measured>, RowEnv), [u64; 2]) {
    let store = s(&live.store());
    let by_bitmap = cmd(&[live.me, "op", "live-backup-bitmap", &store, &live.name]);
    let by_snapshot = cmd(&[live.me, "op", "live-backup", &store, &live.name]);
    struct Down<'a, 'b>(&'a Live<'b>);
    impl Drop for Down<'_, '_> {
        fn drop(&mut self) {
            self.0.teardown();
        }
    }
    let _down = Down(live);
    let files = [writes_file(&live.dir, BackupMethod::Bitmap), writes_file(&live.dir, BackupMethod::Snapshot)];
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let bitmap_prep = |run: usize| live.prepare(run, Some(&by_bitmap));
    let snapshot_prep = |run: usize| live.prepare(run, Some(&by_snapshot));
    let m = compare_serving(
        runs,
        &[
            Tool::new("knib by bitmap", vec![by_bitmap.clone()], &live.store()).sync_fs().setup(&bitmap_prep),
            Tool::new("knib by snapshot", vec![by_snapshot.clone()], &live.store()).sync_fs().setup(&snapshot_prep),
        ],
        SERVERS,
    );
    let writes = [median_incremental_writes(&files[0]), median_incremental_writes(&files[1])];
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    (m, writes)
}
