//! Bitmap backups of stopped VMs: a libvirt domain that is shut off, or a
//! VM libvirt does not know (CloudStack's stopped VMs have no domain).
//! The changes are tracked by persistent dirty bitmaps stored in the disks'
//! qcow2 files, named like checkpoints (`knib-<backup id>`), and read
//! through a read-only `qemu-nbd` export per disk. The disks' chains are
//! never touched.
//!
//! # Steps (those of [`super::bitmap`])
//!
//! 1. `Begin`: `qemu-img bitmap --add --enable knib-<id>` on each disk's
//!    active file (it records every write after this backup, by whoever
//!    opens the image next: QEMU loads it when the VM starts), then one
//!    read-only `qemu-nbd` per disk on a UNIX socket in the backup's
//!    private work directory (mode 0700), exporting the parent backup's
//!    bitmap for an incremental. `qemu-nbd` holds the image's lock for the
//!    whole copy, so a VM started meanwhile fails to start ("Failed to get
//!    write lock") instead of writing under the copy; a VM started between
//!    the two makes `qemu-nbd` fail, and the backup is undone.
//! 2. `Copy`: each export's dirty clusters (incremental) or allocated
//!    clusters (full) are written by [`super::bitmap_copy::copy_export`].
//! 3. `Publish`: the caller makes the copies visible.
//! 4. `End`: the exports end; the older knib bitmaps are removed from the
//!    files (every one after the end of a chain, none after an isolated
//!    backup); for a libvirt domain, its checkpoint metadata follows the
//!    files: the backup's checkpoint is recorded (`REDEFINE`), so that the
//!    first backup after the VM starts is an incremental by libvirt's
//!    backup job, and the older ones are dropped.
//!
//! Before publication a failure ends the exports and removes the new
//! bitmap: the parent's still records every write since the parent backup.
//! `qemu-nbd` is started with `PR_SET_PDEATHSIG`, so a killed knib leaves
//! no export holding the disk; [`recover`] also ends any `qemu-nbd` still
//! serving the work directory.
//!
//! # What the next backup follows
//!
//! [`tracked_since`]: the newest knib bitmap that every disk's active file
//! carries, recording (`auto`) and consistent (not `in-use`, which QEMU
//! leaves when it stopped without closing the image). A raw disk or a
//! qcow2 v2 image cannot store a bitmap: every backup of it is full, and
//! says why.
//!
//! # Why `qemu-nbd`
//!
//! knib's own qcow2 reader does not parse the bitmap directory (the
//! `bitmaps` header extension and bitmap tables). QEMU's code is the
//! reference for that format and for the meaning of its `auto` and
//! `in-use` flags, and it takes the image lock a running VM takes; the cost
//! is one short-lived process per disk. The export is read by the same NBD
//! client and single-pass writer as a running domain's.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::bitmap::{remove_work_dir, BitmapDisk, BitmapPlan, Exporter};
use crate::error::{ErrorKind, KnibError, Result};
use crate::libvirt::backup::{self, checkpoint_backup_id, checkpoint_name};
use crate::libvirt::{disk_targets, Vm};
use crate::progress::Control;
use crate::qemu_img::QemuImg;

/// The disks of a stopped domain a bitmap backup takes: every file disk.
pub fn inspect(vm: &Vm) -> Result<Vec<crate::libvirt::DiskInfo>> {
    let disks = vm.disks_to_back_up()?;
    if disks.is_empty() {
        return Err(KnibError::invalid(format!("domain {} has no file-backed disk", vm.name())));
    }
    super::bitmap::refuse_read_only(vm, &disks)?;
    Ok(disks)
}

/// Why the disks cannot carry persistent bitmaps, if one cannot: a raw
/// disk, or a qcow2 v2 image.
pub fn cannot_carry(q: &QemuImg, disks: &[BitmapDisk], ctl: &Control) -> Result<Option<String>> {
    for d in disks {
        if d.format != "qcow2" {
            return Ok(Some(format!(
                "disk {} ({}) is {}: a raw file cannot store a dirty bitmap, so every bitmap backup of it while the VM is stopped is full",
                d.target,
                d.file.display(),
                d.format
            )));
        }
        if q.info(&d.file, ctl)?.is_qcow2_v2() {
            return Ok(Some(format!(
                "disk {} ({}) is a qcow2 version 2 image, which cannot store a dirty bitmap: every bitmap backup of it is full",
                d.target,
                d.file.display()
            )));
        }
    }
    Ok(None)
}

/// Which backup the persistent bitmaps of `disks` track the writes since:
/// the id of the newest knib bitmap of the first disk, when every disk
/// carries it, recording and consistent; otherwise why not.
pub fn tracked_since(q: &QemuImg, disks: &[BitmapDisk], ctl: &Control) -> Result<std::result::Result<String, String>> {
    if let Some(why) = cannot_carry(q, disks, ctl)? {
        return Ok(Err(why));
    }
    let Some(first) = disks.first() else { return Ok(Err("no disk".into())) };
    let bitmaps = q.bitmaps(&first.file, ctl)?;
    let Some(id) = bitmaps.iter().filter_map(|b| checkpoint_backup_id(&b.name)).max() else {
        return Ok(Err(format!(
            "disk {} ({}) has no knib dirty bitmap (the last backup was not taken by bitmap, ended its chain, or the bitmap was removed)",
            first.target,
            first.file.display()
        )));
    };
    Ok(tracks(q, disks, id, ctl)?.map(|()| id.to_string()))
}

/// Whether every disk's active file carries the persistent bitmap of
/// backup `id`, recording and consistent; otherwise why not.
pub fn tracks(q: &QemuImg, disks: &[BitmapDisk], id: &str, ctl: &Control) -> Result<std::result::Result<(), String>> {
    if let Some(why) = cannot_carry(q, disks, ctl)? {
        return Ok(Err(why));
    }
    let name = checkpoint_name(id);
    for d in disks {
        let bitmaps = q.bitmaps(&d.file, ctl)?;
        let Some(b) = bitmaps.iter().find(|b| b.name == name) else {
            return Ok(Err(format!(
                "disk {} ({}) has no dirty bitmap {name} (it was removed, or the disk changed since that backup)",
                d.target,
                d.file.display()
            )));
        };
        if b.inconsistent() {
            return Ok(Err(format!(
                "the dirty bitmap {name} of disk {} is inconsistent (QEMU stopped without closing the image while it was in use)",
                d.target
            )));
        }
        if !b.recording() {
            return Ok(Err(format!("the dirty bitmap {name} of disk {} does not record writes", d.target)));
        }
    }
    Ok(Ok(()))
}

/// The socket of disk `d`'s export.
fn socket_of(plan: &BitmapPlan, d: &BitmapDisk) -> PathBuf {
    plan.work_dir.join(format!("{}.sock", d.target))
}

/// The `qemu-nbd` program: `KNIB_QEMU_NBD` or `qemu-nbd` from `PATH`.
fn qemu_nbd() -> PathBuf {
    std::env::var_os("KNIB_QEMU_NBD").map(PathBuf::from).unwrap_or_else(|| "qemu-nbd".into())
}

/// One running `qemu-nbd`.
struct Export {
    child: Child,
    socket: PathBuf,
}

/// Start a read-only `qemu-nbd` of `d` on `socket`, exporting `bitmap`
/// too; returns once it accepts connections.
fn start_export(d: &BitmapDisk, socket: &Path, bitmap: Option<&str>, log: &Path) -> Result<Export> {
    crate::process::children_reapable(&qemu_nbd())?;
    let err = std::fs::File::create(log).map_err(|e| KnibError::io("cannot create", log, e))?;
    let mut cmd = Command::new(qemu_nbd());
    cmd.arg("--read-only")
        .arg("--persistent")
        .arg(format!("--format={}", d.format))
        .arg("--export-name")
        .arg(&d.target)
        .arg("--socket")
        .arg(socket);
    if let Some(b) = bitmap {
        cmd.arg("--bitmap").arg(b);
    }
    cmd.arg(&d.file).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    // The export ends when knib dies, so no export keeps the disk locked.
    crate::process::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Io };
        KnibError::new(kind, format!("cannot run {}: {e}", qemu_nbd().display()))
    })?;
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| KnibError::io("cannot wait for", &qemu_nbd(), e))? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(KnibError::new(
                ErrorKind::ImageTool,
                format!("qemu-nbd of disk {} ({}) ended ({st}): {}", d.target, d.file.display(), text.trim()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(Export { child, socket: socket.to_path_buf() });
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(KnibError::new(
                ErrorKind::ImageTool,
                format!("qemu-nbd of disk {} did not listen on {} within 30 s", d.target, socket.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Export {
    /// End the export (read-only: killing it loses nothing, and never
    /// waits on a client).
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// End every `qemu-nbd` serving a socket in `dir` (one left by a knib that
/// was killed before its child noticed); returns how many.
fn stop_strays(dir: &Path) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_nbd = args.first().is_some_and(|a| a.ends_with(b"qemu-nbd"));
        let ours = args.iter().any(|a| {
            let p = Path::new(std::ffi::OsStr::from_bytes(a));
            p.parent() == Some(dir) && p.extension().is_some_and(|e| e == "sock")
        });
        if is_nbd && ours {
            // SAFETY: kill(2) of a read-only qemu-nbd serving knib's own
            // work directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            n += 1;
        }
    }
    n
}

/// A stopped VM's exports and persistent bitmaps (see the module doc).
pub(crate) struct Stopped<'a> {
    q: &'a QemuImg,
    vm: Option<&'a Vm>,
    ctl: Control,
    exports: Vec<Export>,
}

impl<'a> Stopped<'a> {
    /// For the disks of `vm` (a stopped domain) or of a VM without one.
    pub(crate) fn new(q: &'a QemuImg, vm: Option<&'a Vm>, ctl: &Control) -> Self {
        Stopped { q, vm, ctl: ctl.clone(), exports: Vec::new() }
    }

    fn stop_exports(&mut self) {
        for e in self.exports.drain(..) {
            e.stop();
        }
    }

    /// Remove the bitmap `name` from every disk that has it: with
    /// `qemu-img`, or through QEMU when the domain runs by now.
    fn remove_bitmap(&self, disks: &[BitmapDisk], name: &str) -> Result<bool> {
        if let Some(vm) = self.vm {
            if vm.is_running()? {
                return Ok(backup::remove_bitmaps_named(vm, name)? > 0);
            }
        }
        let mut any = false;
        for d in disks.iter().filter(|d| d.format == "qcow2") {
            if self.q.bitmaps(&d.file, &self.ctl)?.iter().any(|b| b.name == name) {
                self.q.bitmap_remove(&d.file, name, &self.ctl)?;
                any = true;
            }
        }
        Ok(any)
    }

    /// The knib bitmaps of the disks' files but `keep`.
    fn others(&self, disks: &[BitmapDisk], keep: Option<&str>) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for d in disks.iter().filter(|d| d.format == "qcow2") {
            for b in self.q.bitmaps(&d.file, &self.ctl)? {
                if checkpoint_backup_id(&b.name).is_some() && Some(b.name.as_str()) != keep && !names.contains(&b.name)
                {
                    names.push(b.name);
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.stop_exports();
    }
}

impl Exporter for Stopped<'_> {
    fn who(&self) -> String {
        match self.vm {
            Some(vm) => format!("domain {} (stopped)", vm.name()),
            None => "the VM without a domain".to_string(),
        }
    }

    fn begin(&mut self, plan: &BitmapPlan) -> Result<()> {
        let dir = &plan.work_dir;
        std::fs::DirBuilder::new().mode(0o700).create(dir).map_err(|e| KnibError::io("cannot create", dir, e))?;
        let started = (|| -> Result<()> {
            for d in &plan.disks {
                let s = socket_of(plan, d);
                if s.as_os_str().len() > 107 {
                    return Err(KnibError::invalid(format!(
                        "the NBD socket path {} is longer than a UNIX socket path may be (107 bytes): use a store with a shorter path",
                        s.display()
                    )));
                }
            }
            if let Some(c) = &plan.checkpoint {
                for d in &plan.disks {
                    self.ctl.check(&format!("adding bitmap {c} to disk {}", d.target))?;
                    self.q.bitmap_add(&d.file, c, &self.ctl)?;
                }
            }
            for d in &plan.disks {
                let e = start_export(
                    d,
                    &socket_of(plan, d),
                    plan.since.as_deref(),
                    &dir.join(format!("{}.log", d.target)),
                )?;
                self.exports.push(e);
            }
            Ok(())
        })();
        if let Err(e) = started {
            return Err(match self.undo(plan) {
                Ok(_) => e,
                Err(u) => super::bitmap::undo_failed(e, u, &self.who()),
            });
        }
        Ok(())
    }

    fn export(&self, plan: &BitmapPlan, d: &BitmapDisk) -> (PathBuf, String, Option<String>) {
        (socket_of(plan, d), d.target.clone(), plan.since.clone())
    }

    fn end(&mut self, plan: &BitmapPlan) -> Result<Vec<String>> {
        self.stop_exports();
        let mut done = Vec::new();
        let n = stop_strays(&plan.work_dir);
        if n > 0 {
            done.push(format!("ended {n} qemu-nbd exports left running"));
        }
        if plan.kind != super::take::BackupKind::Isolated {
            for name in self.others(&plan.disks, plan.checkpoint.as_deref())? {
                if self.remove_bitmap(&plan.disks, &name)? {
                    done.push(format!("removed bitmap {name} (older than the backup's) from the disks"));
                }
            }
            if let Some(vm) = self.vm {
                for c in backup::checkpoints(vm)? {
                    if checkpoint_backup_id(&c).is_some() && Some(c.as_str()) != plan.checkpoint.as_deref() {
                        backup::delete_checkpoint(vm, &c, true)?;
                        done.push(format!("deleted checkpoint {c} of domain {} (older than the backup's)", vm.name()));
                    }
                }
                if let Some(c) = &plan.checkpoint {
                    let all = disk_targets(&vm.xml()?)?;
                    let with: Vec<String> = plan.disks.iter().map(|d| d.target.clone()).collect();
                    backup::redefine_checkpoint(vm, c, &all, &with)?;
                }
            }
        }
        remove_work_dir(&plan.work_dir)?;
        Ok(done)
    }

    fn undo(&mut self, plan: &BitmapPlan) -> Result<Vec<String>> {
        self.stop_exports();
        let mut done = Vec::new();
        let n = stop_strays(&plan.work_dir);
        if n > 0 {
            done.push(format!("ended {n} qemu-nbd exports left running"));
        }
        if let Some(c) = &plan.checkpoint {
            if self.remove_bitmap(&plan.disks, c)? {
                done.push(format!("removed bitmap {c} from the disks (the one before it still records every write)"));
            }
            if let Some(vm) = self.vm {
                if backup::delete_checkpoint(vm, c, true)? {
                    done.push(format!("deleted checkpoint {c} of domain {}", vm.name()));
                }
            }
        }
        remove_work_dir(&plan.work_dir)?;
        Ok(done)
    }
}

/// Take the bitmap backup `plan` of a stopped VM (`vm`: its libvirt
/// domain, if it has one); see [`super::bitmap::take`].
pub fn take(
    q: &QemuImg,
    vm: Option<&Vm>,
    plan: &BitmapPlan,
    ctl: &Control,
    journal: &mut dyn FnMut(super::bitmap::BitmapStep) -> Result<()>,
    copy_to: Option<&mut super::bitmap::ExportCopyTo<'_>>,
    publish: &mut dyn FnMut(&[super::take::VolumeResult]) -> Result<()>,
) -> Result<Vec<super::take::VolumeResult>> {
    if let Some(vm) = vm {
        if vm.is_running()? {
            return Err(KnibError::busy(format!(
                "domain {} started before its bitmap backup as a stopped VM began: take the backup again",
                vm.name()
            ))
            .with_vm_consistent(true));
        }
    }
    super::bitmap::run(&mut Stopped::new(q, vm, ctl), plan, ctl, journal, copy_to, publish)
}

/// Finish or undo an interrupted bitmap backup of a stopped VM: its exports
/// end; a published backup keeps its bitmap (the older ones go), an
/// unpublished one loses it; the work directory goes. Returns what was
/// done.
pub fn recover(q: &QemuImg, vm: Option<&Vm>, plan: &BitmapPlan, published: bool, ctl: &Control) -> Result<Vec<String>> {
    let mut s = Stopped::new(q, vm, ctl);
    if published {
        s.end(plan)
    } else {
        s.undo(plan)
    }
}
