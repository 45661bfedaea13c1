//! Backups of running domains by dirty bitmap: libvirt checkpoints and
//! pull-mode backup jobs. The disks' chains are never touched: nothing is
//! snapshotted, nothing merged, and raw disks are tracked too (by a bitmap
//! of knib's own in QEMU's memory: see "Raw disks" below). Stopped VMs are backed
//! up by [`super::bitmap_stopped`] through the same steps (`Exporter`).
//!
//! # Steps
//!
//! 1. `Begin`: one `virDomainBackupBegin` in pull mode for all the disks:
//!    an NBD server on a UNIX socket in a private directory (owned by
//!    QEMU's user, mode 0700) with one export per disk, and, in the same
//!    call, the checkpoint of this backup (`knib-<id>`, a dirty bitmap of
//!    that name on each disk), so the export and the new bitmap start at
//!    one instant. An incremental backup exports the changes since the
//!    parent backup's checkpoint as the dirty bitmap of each export. With
//!    quiesce the guest's filesystems are frozen (guest agent) around the
//!    call, and thawed until the guest says so after it, whatever happened
//!    ([`crate::libvirt::freeze`]); a guest left frozen fails the backup;
//! 2. `Copy`: each export's dirty clusters (incremental) or allocated
//!    clusters (full) are written to the store by knib's own writer
//!    ([`super::bitmap_copy`]), the parent backup's file as backing file;
//! 3. `Publish`: the caller makes the copies visible;
//! 4. `End`: the job is ended (its NBD server and scratch files go), and
//!    knib's older checkpoints are deleted: one checkpoint (the chain
//!    head's) is left, or none after the end of a chain. An isolated backup
//!    creates no checkpoint and deletes none.
//!
//! Before publication a failure ends the job and deletes the new
//! checkpoint (libvirt merges its bitmap into the parent's, so the parent
//! still covers every write); the VM is consistent. [`recover`] does the
//! same after a crash, from the journal's plan.
//!
//! # Raw disks
//!
//! libvirt keeps checkpoints of qcow2 disks only. A raw disk's dirty
//! bitmap is knib's own: a non-persistent bitmap `knib-<id>` added to the
//! disk's node just before the job starts; for an incremental, the
//! parent's bitmap is stopped just after it and exported beside libvirt's
//! export of the disk (`knib-<target>`, on the job's fleecing node, which
//! reads the job's instant). Each bitmap so covers a little more than its
//! interval; the clusters it adds are read at the job's instant too, so the
//! copy stays exact. Undoing a backup gives its writes back to the parent's
//! bitmap (recording again, then the new one merged into it, then
//! removed). The bitmap lives in QEMU's memory: after a VM restart the
//! next backup is full and says why.
//!
//! # What the next backup follows
//!
//! [`tracked_since`] names the backup whose checkpoint each disk's bitmap
//! tracks writes since: knib's newest checkpoint, when every disk has its
//! bitmap, recording and consistent. A missing checkpoint or bitmap (the
//! VM was restarted with a raw disk, a transient domain was recreated,
//! someone removed it), an inconsistent one (QEMU stopped while it was in
//! use) or a raw disk's bitmap lost with a VM restart is a reason for a full
//! backup, given to the caller, never a short incremental.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::take::{BackupKind, VolumeResult};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::backup::{self, BackupDisk};
use crate::libvirt::{disk_targets, freeze, DiskInfo, Vm};
use crate::progress::Control;
use crate::qcow2::CompressionType;
use crate::qemu_img::CompressionLibrary;

/// A step of a bitmap backup, recorded before it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitmapStep {
    /// The backup job and the checkpoint.
    Begin,
    /// The copies to the store.
    Copy,
    /// Making the copies visible on the store.
    Publish,
    /// Ending the job, deleting the older checkpoints.
    End,
}

impl BitmapStep {
    /// Every step, in order.
    pub const ALL: [BitmapStep; 4] = [BitmapStep::Begin, BitmapStep::Copy, BitmapStep::Publish, BitmapStep::End];

    /// The step's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapStep::Begin => "begin",
            BitmapStep::Copy => "copy",
            BitmapStep::Publish => "publish",
            BitmapStep::End => "end",
        }
    }
}

/// What a bitmap backup does with one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapDisk {
    /// The guest target (`vda`): also its NBD export's name.
    pub target: String,
    /// The disk's active file (left as it is).
    pub file: PathBuf,
    /// The backup file on the store.
    pub dest: PathBuf,
    /// The parent backup's file, as the backing pointer of `dest`.
    pub parent: Option<String>,
    /// The format of `file` (`qcow2` or `raw`): a stopped VM's disk is
    /// exported in it, never probed.
    #[serde(default = "qcow2")]
    pub format: String,
}

fn qcow2() -> String {
    "qcow2".to_string()
}

/// A bitmap backup of a running domain, planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapPlan {
    /// The id of the backup.
    pub backup_id: String,
    /// Full, incremental or isolated.
    pub kind: BackupKind,
    /// The backup ends its chain (no checkpoint is kept).
    pub end_of_chain: bool,
    /// Freeze the guest's filesystems for the backup's instant.
    pub quiesce: bool,
    /// One entry per disk.
    pub disks: Vec<BitmapDisk>,
    /// The private directory of the NBD socket and scratch files.
    pub work_dir: PathBuf,
    /// The checkpoint an incremental backup copies the changes since.
    pub since: Option<String>,
    /// The checkpoint this backup creates (none for an isolated backup or
    /// one that ends its chain, or when a disk cannot carry a bitmap).
    pub checkpoint: Option<String>,
    /// Compress the backup files as they are written.
    #[serde(default)]
    pub compress: Option<CompressionLibrary>,
    /// With `compress`: read each compressed file back through its own
    /// tables before it is kept, and fail (`internal`, nothing kept) if it
    /// does not hold what was copied into it (knib's own data path; see
    /// [`crate::qcow2::CopyOptions::check_output`]).
    #[serde(default)]
    pub check_output: bool,
    /// The VM is stopped: persistent bitmaps in the disks' files, exported
    /// by `qemu-nbd` ([`super::bitmap_stopped`]), instead of libvirt's
    /// backup job.
    #[serde(default)]
    pub stopped: bool,
}

impl BitmapPlan {
    /// The NBD server's socket.
    pub fn socket(&self) -> PathBuf {
        self.work_dir.join("nbd.sock")
    }
}

/// The disks of a running domain a bitmap backup takes: every file disk
/// (qcow2 or raw). Refused when the domain is not running or has no file
/// disk (see [`refuse_running_job`] for a job left running).
pub fn inspect(vm: &Vm) -> Result<Vec<DiskInfo>> {
    if !vm.is_running()? {
        return Err(KnibError::invalid(format!(
            "domain {} stopped as its bitmap backup began: nothing was done; back it up again (a stopped domain's bitmap backup reads its disks' files)",
            vm.name()
        )));
    }
    let disks = vm.disks_to_back_up()?;
    if disks.is_empty() {
        return Err(KnibError::invalid(format!("domain {} has no file-backed disk", vm.name())));
    }
    refuse_read_only(vm, &disks)?;
    Ok(disks)
}

/// Refuse a domain with a read-only disk (`<readonly/>`, not a CD-ROM):
/// libvirt refuses a backup job on one while the domain runs, and a
/// stopped domain's backup would write a persistent bitmap into it. The
/// snapshot method backs such disks up.
pub fn refuse_read_only(vm: &Vm, disks: &[DiskInfo]) -> Result<()> {
    match disks.iter().find(|d| d.read_only) {
        Some(d) => Err(KnibError::invalid(format!(
            "disk {} of domain {} ({}) is read-only: the bitmap method does not back up read-only disks (libvirt refuses a backup job on one, and a stopped domain's would get a bitmap written into it); use --method snapshot",
            d.target,
            vm.name(),
            d.file.display()
        ))),
        None => Ok(()),
    }
}

/// Refuse a domain that already has a backup job ("busy").
pub fn refuse_running_job(vm: &Vm, remedy: &str) -> Result<()> {
    if backup::backup_running(vm)? {
        return Err(KnibError::busy(format!("a backup job is running on domain {}: {remedy}", vm.name())));
    }
    Ok(())
}

/// Which backup the dirty bitmaps of `disks` track the writes since: the
/// id of knib's newest checkpoint on the domain, when every disk carries
/// its bitmap, recording and consistent; otherwise why not (a full backup
/// is then needed).
pub fn tracked_since(vm: &Vm, disks: &[DiskInfo]) -> Result<std::result::Result<String, String>> {
    let names = backup::checkpoints(vm)?;
    let Some(id) = names.iter().filter_map(|n| backup::checkpoint_backup_id(n.as_str())).max() else {
        return Ok(Err(format!(
            "domain {} has no knib checkpoint (the last backup was not taken by bitmap, ended its chain, or the checkpoint was removed)",
            vm.name()
        )));
    };
    Ok(tracks(vm, disks, id)?.map(|()| id.to_string()))
}

/// Whether every disk of `disks` carries the dirty bitmap of backup
/// `id`'s checkpoint, recording and consistent (so it holds every write
/// since that backup's instant); otherwise why not.
pub fn tracks(vm: &Vm, disks: &[DiskInfo], id: &str) -> Result<std::result::Result<(), String>> {
    let name = backup::checkpoint_name(id);
    if !backup::checkpoints(vm)?.contains(&name) {
        return Ok(Err(format!("domain {} has no checkpoint {name}", vm.name())));
    }
    for d in disks {
        let bitmaps = backup::bitmaps_of(vm, &d.file)?;
        let Some(b) = bitmaps.iter().find(|b| b.name == name) else {
            if d.format != "qcow2" {
                return Ok(Err(format!(
                    "disk {} of domain {} is {}: its dirty bitmap {name} lived in QEMU's memory only, and is gone (the VM was restarted since that backup, or the bitmap was removed)",
                    d.target,
                    vm.name(),
                    d.format
                )));
            }
            return Ok(Err(format!(
                "disk {} of domain {} has no dirty bitmap {name} (it was removed, or the disk changed since the checkpoint)",
                d.target,
                vm.name()
            )));
        };
        if b.inconsistent {
            return Ok(Err(format!(
                "the dirty bitmap {name} of disk {} is inconsistent (QEMU stopped while it was in use)",
                d.target
            )));
        }
        if !b.recording {
            return Ok(Err(format!("the dirty bitmap {name} of disk {} does not record writes", d.target)));
        }
    }
    Ok(Ok(()))
}

/// The uid and gid the domain's QEMU runs as (from its pid file), if known.
fn qemu_owner(vm: &Vm) -> Option<(u32, u32)> {
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", vm.name())).ok()?;
    let md = fs::metadata(format!("/proc/{}", pid.trim())).ok()?;
    Some((md.uid(), md.gid()))
}

/// Make the private directory of the NBD socket and scratch files: mode
/// 0700, owned by QEMU's user (who creates the socket there).
pub(crate) fn make_work_dir(vm: &Vm, dir: &Path) -> Result<()> {
    // Checked before anything is made: a refused start leaves no directory
    // (nothing sweeps it from the store afterwards).
    let sock = dir.join("nbd.sock");
    if sock.as_os_str().len() > 107 {
        return Err(KnibError::invalid(format!(
            "the NBD socket path {} is longer than a UNIX socket path may be (107 bytes): use a store with a shorter path",
            sock.display()
        )));
    }
    fs::DirBuilder::new().mode(0o700).create(dir).map_err(|e| KnibError::io("cannot create", dir, e))?;
    if let Some((uid, gid)) = qemu_owner(vm) {
        if let Err(e) = std::os::unix::fs::chown(dir, Some(uid), Some(gid)) {
            let _ = fs::remove_dir(dir);
            return Err(KnibError::io("cannot chown", dir, e));
        }
    }
    Ok(())
}

pub(crate) fn remove_work_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KnibError::io("cannot remove", dir, e)),
    }
}

/// The file a quiesced backup makes in its work directory right before it
/// freezes the guest, and removes once the guest is thawed: a recover (or
/// an agent's cleanup) thaws a frozen guest only when it is there. A guest
/// frozen by another tool (a snapshot of its own under way) is that tool's
/// to thaw; before, any cleanup of a bitmap backup of a running domain
/// thawed it.
fn freeze_marker(plan: &BitmapPlan) -> PathBuf {
    plan.work_dir.join("frozen-by-knib")
}

/// The guest is thawed: remove [`freeze_marker`] (a marker left behind
/// only makes a recover thaw a guest frozen since, and is logged).
fn forget_freeze(plan: &BitmapPlan) {
    if let Err(e) = fsio::remove_if_exists(&freeze_marker(plan)) {
        log::warn!("{e}");
    }
}

/// How long a freeze may take, in seconds (the guest syncs its dirty data
/// first); the thaw after it is [`freeze::thaw`]'s.
const FREEZE_TIMEOUT_SECS: i32 = 30;

/// The NBD export knib adds for the changes of a disk that libvirt does
/// not checkpoint (raw): named, and with the id, `knib-<target>`.
fn own_export(d: &BitmapDisk) -> String {
    format!("knib-{}", d.target)
}

/// Whether libvirt checkpoints disk `d` (qcow2); the dirty bitmaps of the
/// others (raw) are knib's own, in QEMU's memory only.
fn checkpointed(d: &BitmapDisk) -> bool {
    d.format == "qcow2"
}

/// Start the backup job of `plan` (and its checkpoint), quiescing around it
/// when asked.
///
/// A raw disk's dirty bitmap is knib's own (libvirt keeps checkpoints of
/// qcow2 disks only): a non-persistent bitmap `knib-<id>` is added to its
/// node just before the job starts, and, for an incremental, the parent's
/// bitmap is stopped just after and exported beside libvirt's export of
/// the disk (`knib-<target>`, on the job's fleecing node, so it reads the
/// job's instant). Each bitmap so covers a little more than its interval
/// (the writes between the two calls and the job's instant): the clusters
/// it adds are read at the job's instant too, so the copy stays exact.
fn begin(vm: &Vm, plan: &BitmapPlan) -> Result<()> {
    let all = disk_targets(&vm.xml()?)?;
    let with_bitmap: Vec<String> = plan.disks.iter().filter(|d| checkpointed(d)).map(|d| d.target.clone()).collect();
    let disks: Vec<BackupDisk> = plan
        .disks
        .iter()
        .map(|d| BackupDisk {
            target: d.target.clone(),
            scratch: scratch_of(plan, d),
            incremental: if checkpointed(d) { plan.since.clone() } else { None },
        })
        .collect();
    let owner = qemu_owner(vm);
    for (b, d) in disks.iter().zip(&plan.disks) {
        backup::make_scratch(&b.scratch, backup::disk_capacity(vm, &d.target)?, owner)?;
    }
    let bxml = backup::backup_xml(&plan.socket(), &disks);
    let cxml = plan.checkpoint.as_deref().map(|c| backup::checkpoint_xml(c, &all, &with_bitmap));
    if let Some(c) = raw_bitmap(plan) {
        for d in plan.disks.iter().filter(|d| !checkpointed(d)) {
            backup::add_bitmap(vm, &backup::node_of(vm, &d.file, &d.format)?, &c, false)?;
        }
    }
    if plan.quiesce {
        // Before the freeze: a recover thaws only a guest this marker says
        // a backup of knib's may have left frozen.
        fsio::write_atomic(&freeze_marker(plan), b"")?;
        let why = |e: KnibError, thawed: &str| {
            e.context(format!(
                "quiescing domain {}: the guest agent did not freeze the filesystems{thawed}; nothing was changed",
                vm.name()
            ))
        };
        match freeze::freeze(vm, FREEZE_TIMEOUT_SECS) {
            freeze::Freeze::Frozen => {}
            freeze::Freeze::NotSent(e) => return Err(why(e, "")),
            // The freeze may go on in the guest after libvirt gave up.
            freeze::Freeze::Failed(e) => {
                // A guest the thaw left frozen is not consistent: the
                // journal stays, and `knib recover` thaws it.
                return Err(match freeze::thaw(vm) {
                    Ok(_) => {
                        forget_freeze(plan);
                        why(e, " (they are thawed)")
                    }
                    Err(t) => why(t, &format!(" ({e})")).with_vm_consistent(false),
                });
            }
        }
    }
    if plan.quiesce {
        crate::crashpoint::durable_step(&format!("backup job of domain {}, its filesystems frozen", vm.name()));
    }
    let r = backup::backup_begin(vm, &bxml, cxml.as_deref());
    let thawed =
        if plan.quiesce { freeze::thaw(vm).inspect(|_| forget_freeze(plan)) } else { Ok(freeze::Thawed::Cleanly) };
    // A backup that leaves the guest frozen fails, whether its job began
    // or not: the caller undoes the job, the error says how to thaw the
    // guest and that the VM is not consistent (its journal stays, and
    // `knib recover` thaws it). A thaw's failure was lost behind the
    // job's own.
    let thawed = match thawed {
        Ok(t) => t,
        Err(t) => {
            let e = match r {
                Err(e) => KnibError::new(t.kind, format!("{}; and {}", e.message, t.message)),
                Ok(()) => t,
            };
            return Err(e.with_vm_consistent(false));
        }
    };
    // The guest is thawed, but its freeze may not have held until the
    // job began: the backup fails (the caller undoes the job), the VM
    // consistent.
    if let freeze::Thawed::Early(why) = thawed {
        return Err(match r {
            Err(e) => KnibError::new(e.kind, format!("{}; and {why}", e.message)),
            Ok(()) => KnibError::new(
                ErrorKind::Hypervisor,
                format!("{why}: the backup is not taken as quiesced; nothing was changed"),
            ),
        });
    }
    r?;
    if let Some(since) = &plan.since {
        for d in plan.disks.iter().filter(|d| !checkpointed(d)) {
            let node = backup::node_of(vm, &d.file, &d.format)?;
            backup::set_bitmap_recording(vm, &node, since, false)?;
            let fleecing = backup::node_of(vm, &scratch_of(plan, d), "qcow2")?;
            backup::add_export(vm, &own_export(d), &fleecing, since)?;
        }
    }
    Ok(())
}

/// The dirty bitmap [`begin`] adds to each raw disk: the backup's
/// checkpoint's, or, for an incremental that keeps no checkpoint (it ends
/// its chain), one of the same name that lives until the backup ends. The
/// parent's bitmap stops recording once the job starts: without a new
/// one, the writes from then until a failed backup is undone were tracked
/// nowhere, and the next incremental since the parent missed them.
fn raw_bitmap(plan: &BitmapPlan) -> Option<String> {
    plan.checkpoint.clone().or_else(|| plan.since.as_ref().map(|_| backup::checkpoint_name(&plan.backup_id)))
}

/// The scratch file of disk `d`'s export.
fn scratch_of(plan: &BitmapPlan, d: &BitmapDisk) -> PathBuf {
    plan.work_dir.join(format!("{}.scratch", d.target))
}

/// Remove knib's own exports of `plan` (before the job ends).
fn remove_own_exports(vm: &Vm, plan: &BitmapPlan) -> Result<()> {
    if plan.disks.iter().all(checkpointed) || !vm.is_running()? {
        return Ok(());
    }
    for d in plan.disks.iter().filter(|d| !checkpointed(d)) {
        backup::remove_export(vm, &own_export(d))?;
    }
    Ok(())
}

/// Remove every knib dirty bitmap of the raw disks of `plan` but `keep`;
/// returns those removed.
fn prune_raw_bitmaps(vm: &Vm, plan: &BitmapPlan, keep: Option<&str>) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    if plan.disks.iter().all(checkpointed) || !vm.is_running()? {
        return Ok(gone);
    }
    for d in plan.disks.iter().filter(|d| !checkpointed(d)) {
        let Ok(node) = backup::node_of(vm, &d.file, &d.format) else { continue };
        for b in backup::bitmaps_of_node(vm, &node)? {
            if backup::checkpoint_backup_id(&b.name).is_some() && Some(b.name.as_str()) != keep {
                backup::remove_bitmap(vm, &node, &b.name)?;
                gone.push(format!("{} of disk {}", b.name, d.target));
            }
        }
    }
    Ok(gone)
}

/// Give a raw disk's writes since the interrupted backup back to its
/// parent's bitmap: it records again, the new bitmap is merged into it and
/// removed (in that order, so no write falls between).
fn undo_raw_bitmaps(vm: &Vm, plan: &BitmapPlan) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if !vm.is_running()? {
        return Ok(done);
    }
    for d in plan.disks.iter().filter(|d| !checkpointed(d)) {
        let Ok(node) = backup::node_of(vm, &d.file, &d.format) else { continue };
        let have = backup::bitmaps_of_node(vm, &node)?;
        let has = |n: &str| have.iter().find(|b| b.name == n);
        if let Some(p) = plan.since.as_deref().and_then(has) {
            if !p.recording {
                backup::set_bitmap_recording(vm, &node, &p.name, true)?;
            }
        }
        if let Some(c) = raw_bitmap(plan).as_deref().and_then(has) {
            if let Some(p) = plan.since.as_deref().and_then(has) {
                backup::merge_bitmap(vm, &node, &p.name, &c.name)?;
            }
            backup::remove_bitmap(vm, &node, &c.name)?;
            done.push(format!("removed dirty bitmap {} of raw disk {}", c.name, d.target));
        }
    }
    Ok(done)
}

/// End the job of backup `plan`, if it runs (its NBD server listens on
/// the plan's socket); returns what was done. Another backup job (begun
/// by another tool, or by another backup of knib's) is left running, and
/// said so: aborting it failed that backup.
fn end_job(vm: &Vm, plan: &BitmapPlan) -> Result<Option<String>> {
    match backup::running_job_socket(vm)? {
        None => Ok(None),
        Some(Some(s)) if crate::fsio::same_file(&s, &plan.socket()) => {
            Ok(end_own_job(vm)?.then(|| format!("ended the backup job of domain {}", vm.name())))
        }
        Some(other) => Ok(Some(format!(
            "left the backup job running on domain {} alone: it is not this backup's (its NBD server {}, not {})",
            vm.name(),
            other.map_or("is not on a unix socket".to_string(), |s| format!("listens on {}", s.display())),
            plan.socket().display()
        ))),
    }
}

/// End the backup job this backup started (known to run): abort it and
/// wait for its end, without first asking whether it runs.
fn end_own_job(vm: &Vm) -> Result<bool> {
    if let Err(e) = backup::abort_job(vm) {
        // The domain stopped, or the job ended some other way (between a
        // look and the abort).
        if backup::backup_running(vm)? {
            return Err(e);
        }
        return Ok(false);
    }
    wait_job_end(vm)?;
    Ok(true)
}

/// Wait until the domain's backup job, aborted, has ended.
fn wait_job_end(vm: &Vm) -> Result<()> {
    // libvirt's abort of a pull-mode job returns before the job has ended
    // when block jobs must finish first; libvirt then removes the exports
    // and scratch nodes in the background. A short period: every backup
    // waits here once (a 200 ms period was half of a small incremental's
    // time), and each look is one call to libvirtd.
    let t = std::time::Instant::now();
    while backup::backup_running(vm)? {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            return Err(KnibError::hypervisor(format!("the backup job of domain {} does not end", vm.name())));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// Delete every knib checkpoint of the domain but `keep`; returns those
/// deleted.
pub fn prune_checkpoints(vm: &Vm, keep: Option<&str>) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let mut mine: Vec<String> =
        backup::checkpoints(vm)?.into_iter().filter(|n| backup::checkpoint_backup_id(n).is_some()).collect();
    mine.sort();
    for n in mine {
        if Some(n.as_str()) == keep {
            continue;
        }
        if delete_checkpoint(vm, &n)? {
            log::info!("domain {}: deleted checkpoint {n}", vm.name());
            gone.push(n);
        }
    }
    Ok(gone)
}

/// The checkpoints a finished backup of `plan` leaves: its own, unless
/// isolated (the others are left as they were).
fn after_publish(vm: &Vm, plan: &BitmapPlan) -> Result<Vec<String>> {
    if plan.kind == BackupKind::Isolated {
        return Ok(Vec::new());
    }
    let mut gone = prune_checkpoints(vm, plan.checkpoint.as_deref())?;
    gone.extend(prune_raw_bitmaps(vm, plan, plan.checkpoint.as_deref())?);
    Ok(gone)
}

/// How the disks of a bitmap backup are exported and its checkpoints kept:
/// by libvirt's backup job for a running domain ([`Libvirt`]), by
/// `qemu-nbd` and persistent bitmaps for a stopped VM
/// ([`super::bitmap_stopped::Stopped`]).
pub(crate) trait Exporter {
    /// What is backed up, for messages ("domain web1").
    fn who(&self) -> String;
    /// Start the exports and create the backup's checkpoint.
    fn begin(&mut self, plan: &BitmapPlan) -> Result<()>;
    /// Where disk `d` is exported: the socket, the export's name, and the
    /// dirty bitmap of an incremental's changes.
    fn export(&self, plan: &BitmapPlan, d: &BitmapDisk) -> (PathBuf, String, Option<String>);
    /// After publication: end the exports, delete the older checkpoints,
    /// remove the work directory. Returns what was done.
    fn end(&mut self, plan: &BitmapPlan) -> Result<Vec<String>>;
    /// Before publication: end the exports, delete the new checkpoint (the
    /// one before it still covers every write), remove the work directory.
    fn undo(&mut self, plan: &BitmapPlan) -> Result<Vec<String>>;
}

/// A running domain's backup job.
pub(crate) struct Libvirt<'a>(pub &'a Vm);

impl Exporter for Libvirt<'_> {
    fn who(&self) -> String {
        format!("domain {}", self.0.name())
    }

    fn begin(&mut self, plan: &BitmapPlan) -> Result<()> {
        make_work_dir(self.0, &plan.work_dir)?;
        begin(self.0, plan).map_err(|e| match undo(self.0, plan) {
            Ok(_) => e,
            Err(u) => undo_failed(e, u, &self.who()),
        })
    }

    fn export(&self, plan: &BitmapPlan, d: &BitmapDisk) -> (PathBuf, String, Option<String>) {
        match &plan.since {
            None => (plan.socket(), d.target.clone(), None),
            Some(_) if checkpointed(d) => (plan.socket(), d.target.clone(), Some(d.target.clone())),
            Some(since) => (plan.socket(), own_export(d), Some(since.clone())),
        }
    }

    fn end(&mut self, plan: &BitmapPlan) -> Result<Vec<String>> {
        let vm = self.0;
        let mut done = Vec::new();
        remove_own_exports(vm, plan)?;
        // The older checkpoints go first, while the job still runs (its
        // export reads a bitmap of its own, merged at its start): libvirt
        // then ends the job while knib waits for it, instead of after.
        let older = after_publish(vm, plan)?;
        done.extend(end_job(vm, plan)?);
        for c in older {
            done.push(format!("deleted checkpoint {c} (older than the backup's)"));
        }
        remove_work_dir(&plan.work_dir)?;
        Ok(done)
    }

    fn undo(&mut self, plan: &BitmapPlan) -> Result<Vec<String>> {
        undo(self.0, plan)
    }
}

/// A bitmap backup's copy of one disk's export made elsewhere than into
/// its `dest` file (a vault's upload): given the disk, the export's
/// socket, name and dirty bitmap, and the compression, it returns what it
/// wrote and the disk's guest-visible size.
pub type ExportCopyTo<'a> = dyn FnMut(
        &BitmapDisk,
        &Path,
        &str,
        Option<&str>,
        Option<CompressionType>,
        &Control,
    ) -> Result<(crate::engine::take::CopiedTo, u64)>
    + 'a;

/// Take a bitmap backup of a running domain as `plan` says. `journal` is
/// called before each step; `publish` once every copy is durable on the
/// store; `copy_to`, when given, makes each copy instead of the store's
/// file. A failure before publishing ends the job, deletes the new
/// checkpoint and the copies (the error says the VM is consistent).
pub fn take(
    vm: &Vm,
    plan: &BitmapPlan,
    ctl: &Control,
    journal: &mut dyn FnMut(BitmapStep) -> Result<()>,
    copy_to: Option<&mut ExportCopyTo<'_>>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<Vec<VolumeResult>> {
    run(&mut Libvirt(vm), plan, ctl, journal, copy_to, publish)
}

/// The error of a start that failed (`e`) and could not be undone (`u`):
/// the job, its exports or the new checkpoint may still be there, which
/// the next backup refuses until it is recovered (`knib recover`, or the
/// agent's `agent.cleanup_vm_backup`; the journal is kept).
pub(crate) fn undo_failed(mut e: KnibError, u: KnibError, who: &str) -> KnibError {
    log::error!("undoing the start of the bitmap backup of {who}: {u}");
    e.message = format!(
        "{}; undoing the start failed too ({u}): recover the backup (`knib recover`; through CloudStack's agent, agent.cleanup_vm_backup)",
        e.message
    );
    e.with_vm_consistent(false)
}

/// Take the bitmap backup `plan` through `exp` (see [`take`]).
pub(crate) fn run(
    exp: &mut dyn Exporter,
    plan: &BitmapPlan,
    ctl: &Control,
    journal: &mut dyn FnMut(BitmapStep) -> Result<()>,
    mut copy_to: Option<&mut ExportCopyTo<'_>>,
    publish: &mut dyn FnMut(&[VolumeResult]) -> Result<()>,
) -> Result<Vec<VolumeResult>> {
    let direct = copy_to.is_some();
    let who = exp.who();
    journal(BitmapStep::Begin)?;
    crate::crashpoint::durable_step(&format!("backup exports of {who}"));
    if let Err(e) = exp.begin(plan) {
        // Consistent unless the start could not be undone.
        let consistent = e.vm_consistent.unwrap_or(true);
        return Err(e.context(format!("bitmap backup of {who}")).with_vm_consistent(consistent));
    }
    log::debug!("bitmap backup {} of {who}: exports ready", plan.backup_id);
    let copied = (|| -> Result<Vec<VolumeResult>> {
        journal(BitmapStep::Copy)?;
        let mut results = Vec::new();
        for d in &plan.disks {
            ctl.check(&format!("copy of disk {}", d.target))?;
            crate::crashpoint::durable_step(&format!("copy of disk {} of {who}", d.target));
            let (socket, export, bitmap) = exp.export(plan, d);
            let ctype = plan.compress.map(|c| match c {
                CompressionLibrary::Zstd => CompressionType::Zstd,
                CompressionLibrary::Zlib => CompressionType::Zlib,
            });
            if let Some(copy_to) = copy_to.as_mut() {
                let (c, virtual_size) = copy_to(d, &socket, &export, bitmap.as_deref(), ctype, ctl)
                    .map_err(|e| e.context(format!("disk {}", d.target)))?;
                results.push(VolumeResult {
                    name: d.target.clone(),
                    active_file: d.file.clone(),
                    dest: d.dest.clone(),
                    size: c.size,
                    virtual_size,
                    hash: Some(c.hash),
                    compression: plan.compress,
                    data_bytes: Some(c.bytes_read),
                });
                continue;
            }
            let c = super::bitmap_copy::copy_export(
                &socket,
                &export,
                bitmap.as_deref(),
                &d.dest,
                d.parent.as_deref(),
                ctype,
                plan.check_output,
                ctl,
            )
            .map_err(|e| e.context(format!("disk {}", d.target)))?;
            results.push(VolumeResult {
                name: d.target.clone(),
                active_file: d.file.clone(),
                dest: d.dest.clone(),
                size: fsio::file_size(&d.dest)?,
                virtual_size: c.virtual_size,
                hash: Some(c.hash),
                compression: plan.compress,
                data_bytes: Some(c.data_bytes),
            });
        }
        log::debug!("bitmap backup {} of {who}: copied", plan.backup_id);
        ctl.check("publishing the backup")?;
        journal(BitmapStep::Publish)?;
        publish(&results)?;
        Ok(results)
    })();
    let results = match copied {
        Ok(r) => r,
        Err(e) => {
            let mut consistent = true;
            if let Err(u) = exp.undo(plan) {
                log::error!("undoing the bitmap backup of {who}: {u}");
                consistent = false;
            }
            // (A direct copy's `dest` only names it: its caller removes it.)
            for d in plan.disks.iter().filter(|_| !direct) {
                let _ = fsio::remove_if_exists(&d.dest);
            }
            return Err(e.with_vm_consistent(consistent));
        }
    };
    let end = journal(BitmapStep::End).and_then(|()| exp.end(plan));
    match end {
        Ok(done) => {
            for a in done {
                log::info!("bitmap backup {} of {who}: {a}", plan.backup_id);
            }
        }
        Err(e) => {
            return Err(e
                .context(format!("the backup is stored, but ending its exports on {who} failed"))
                .with_vm_consistent(false))
        }
    }
    Ok(results)
}

/// Undo an unpublished backup: end the job, delete its checkpoint (its
/// bitmap is merged into the parent's), remove the work directory.
fn undo(vm: &Vm, plan: &BitmapPlan) -> Result<Vec<String>> {
    let mut done = Vec::new();
    remove_own_exports(vm, plan)?;
    if vm.is_running()? {
        done.extend(end_job(vm, plan)?);
    }
    done.extend(undo_raw_bitmaps(vm, plan)?);
    if let Some(c) = &plan.checkpoint {
        // Running or stopped (a host crash stops the domain before
        // `recover` runs).
        if delete_checkpoint(vm, c)? {
            done.push(format!("deleted checkpoint {c} (its changes stay tracked by the one before it)"));
        }
    }
    if freeze_marker(plan).exists() {
        // The guest may still be frozen (its thaw failed): the marker stays
        // for the recover that thaws it; the rest goes.
        empty_work_dir_but_marker(plan)?;
    } else {
        remove_work_dir(&plan.work_dir)?;
    }
    Ok(done)
}

/// Remove everything in the work directory of `plan` but its
/// [`freeze_marker`].
fn empty_work_dir_but_marker(plan: &BitmapPlan) -> Result<()> {
    // A directory, not a link to one (whose target's entries would go): a
    // link is removed as ever.
    if !fs::symlink_metadata(&plan.work_dir).is_ok_and(|m| m.is_dir()) {
        return remove_work_dir(&plan.work_dir);
    }
    let marker = freeze_marker(plan);
    let entries = fs::read_dir(&plan.work_dir).map_err(|e| KnibError::io("cannot read", &plan.work_dir, e))?;
    for e in entries {
        let p = e.map_err(|e| KnibError::io("cannot read", &plan.work_dir, e))?.path();
        if p == marker {
            continue;
        }
        let r = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KnibError::io("cannot remove", &p, e)),
        }
    }
    Ok(())
}

/// Finish or undo an interrupted bitmap backup: the job is ended; a
/// published backup keeps its checkpoint (the older ones go), an
/// unpublished one loses it; the socket and scratch files go. Returns what
/// was done.
///
/// With `plan.quiesce`, a guest left frozen (the backup was killed between
/// its freeze and its thaw) is thawed first: its I/O hung until someone
/// ran `virsh domfsthaw`. Only when the backup's `frozen-by-knib` marker says it
/// may have frozen the guest: a guest frozen otherwise is left so, and said.
pub fn recover(vm: &Vm, plan: &BitmapPlan, published: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if plan.quiesce && freeze_marker(plan).exists() {
        if vm.is_running()? && freeze::thaw_if_frozen(vm)? {
            done.push(format!("thawed the filesystems of domain {}, left frozen by the interrupted backup", vm.name()));
        }
        // Thawed (or stopped since): the work directory goes whole.
        forget_freeze(plan);
    } else if plan.quiesce && vm.is_running()? && freeze::frozen(vm) {
        done.push(format!(
            "left the filesystems of domain {} frozen: the interrupted backup never froze them (another tool did)",
            vm.name()
        ));
    }
    let mut exp = Libvirt(vm);
    done.extend(if published { exp.end(plan) } else { exp.undo(plan) }?);
    Ok(done)
}

/// Delete knib checkpoint `name` of the domain, running or stopped;
/// whether it was there. For a stopped domain whose images libvirt cannot
/// edit, the checkpoint's metadata goes and its bitmaps are removed from
/// the disks' files with `qemu-img bitmap --remove`.
pub fn delete_checkpoint(vm: &Vm, name: &str) -> Result<bool> {
    if vm.is_running()? {
        return prune_one(vm, name);
    }
    match backup::delete_checkpoint(vm, name, false) {
        Ok(there) => Ok(there),
        Err(e) => {
            log::warn!("{e}: deleting its metadata and removing its bitmaps from the disks' files");
            let there = backup::delete_checkpoint(vm, name, true)?;
            for d in vm.disks()?.iter().filter(|d| d.format == "qcow2") {
                let r = crate::process::Invocation::new(
                    std::env::var_os("KNIB_QEMU_IMG").unwrap_or_else(|| "qemu-img".into()),
                )
                .args(["bitmap", "--remove"])
                .arg(d.file.as_os_str())
                .arg(name)
                .run(&Control::new());
                // A bitmap left in the image records every write from then
                // on: said, not swallowed (a disk without it is fine).
                match r {
                    Ok(f) if f.code == Some(0) => {
                        log::debug!("qemu-img bitmap --remove {name} on {}: removed", d.file.display())
                    }
                    Ok(f) if f.stderr.contains("not found") => {
                        log::debug!("qemu-img bitmap --remove {name} on {}: not there", d.file.display())
                    }
                    Ok(f) => log::warn!(
                        "qemu-img bitmap --remove {name} on {} failed (if the bitmap is there, `qemu-img bitmap --remove` removes it): {}",
                        d.file.display(),
                        f.stderr.trim()
                    ),
                    Err(e) => log::warn!("qemu-img bitmap --remove {name} on {}: {e}", d.file.display()),
                }
            }
            Ok(there)
        }
    }
}

/// Delete checkpoint `name` of a running domain (libvirt merges its
/// bitmaps into the checkpoint before it); when libvirt cannot (a bitmap
/// gone or broken), its record goes alone, then what is left of its
/// bitmaps. Whether it was there.
fn prune_one(vm: &Vm, n: &str) -> Result<bool> {
    match backup::delete_checkpoint(vm, n, false) {
        Ok(there) => {
            // The raw disks' bitmaps of that name are knib's own.
            if there && vm.is_running()? {
                backup::remove_bitmaps_named(vm, n)?;
            }
            Ok(there)
        }
        Err(e) => {
            log::warn!("{e}: deleting the checkpoint's record and removing its remaining bitmaps");
            let there = backup::delete_checkpoint(vm, n, true)?;
            if there {
                let left = backup::remove_bitmaps_named(vm, n)?;
                log::info!("domain {}: deleted checkpoint {n} (record; {left} bitmaps removed)", vm.name());
            }
            Ok(there)
        }
    }
}

/// Delete every knib checkpoint of the domain, running or stopped: a
/// backup by the snapshot method changes the disks' chains under them.
pub fn prune_stale_checkpoints(vm: &Vm) -> Result<Vec<String>> {
    let mine: Vec<String> =
        backup::checkpoints(vm)?.into_iter().filter(|n| backup::checkpoint_backup_id(n).is_some()).collect();
    let mut gone = Vec::new();
    for n in mine {
        if delete_checkpoint(vm, &n)? {
            gone.push(n);
        }
    }
    Ok(gone)
}
