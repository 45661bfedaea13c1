//! Pull-mode backup jobs and checkpoints of a running domain
//! (`virDomainBackupBegin`, `virDomainCheckpoint*`). Each call is wrapped once here.
//!
//! knib's checkpoints are named `knib-<backup id>` ([`checkpoint_name`]),
//! so that knib only ever deletes its own; each disk's QEMU dirty bitmap
//! carries the same name.
//!
//! Behaviour of libvirt 9.0 / QEMU 7.2 that the engine relies on:
//! - `virDomainBackupBegin` with a checkpoint XML creates the checkpoint
//!   at the instant of the backup, for all its disks at once;
//! - a pull-mode job stays until it is aborted (`virDomainAbortJob`); its
//!   NBD server is then stopped;
//! - with `VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`, libvirt opens scratch
//!   files that exist (qcow2, the disk's size) instead of creating them
//!   with a `blockdev-create` job, attaches them with the disk as their
//!   backing node (whatever their header says), and leaves them when the
//!   job ends (knib creates and removes them, with the work directory);
//! - deleting a checkpoint merges its bitmap into its parent's (when it
//!   has one), so the parent keeps tracking every write since its own
//!   instant.

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{ffi, last_virt_error, Vm};
use crate::error::{KnibError, Result};

/// The prefix of knib's checkpoint names.
pub const CHECKPOINT_PREFIX: &str = "knib-";

/// The checkpoint (and bitmap) name of backup `id`.
pub fn checkpoint_name(id: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{id}")
}

/// The backup id of a knib checkpoint name, when it is one.
pub fn checkpoint_backup_id(name: &str) -> Option<&str> {
    let id = name.strip_prefix(CHECKPOINT_PREFIX)?;
    crate::names::validate("backup id", id).ok()?;
    Some(id)
}

/// Escape text for an XML attribute.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// One disk of a pull-mode backup: its target (also the NBD export's and
/// the exported bitmap's name) and its scratch file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    /// The guest target (`vda`).
    pub target: String,
    /// Where QEMU keeps the old data of clusters the guest overwrites
    /// during the job: an empty qcow2 of the disk's size that exists
    /// before the job ([`make_scratch`]).
    pub scratch: PathBuf,
    /// The checkpoint whose changes since are exported as the dirty bitmap
    /// named after the target (an incremental of this disk), or none (the
    /// whole disk).
    pub incremental: Option<String>,
}

/// The `<domainbackup mode='pull'>` XML: an NBD server on the UNIX socket
/// `socket`, one export per disk named after its target; a disk with an
/// incremental checkpoint also exports the changes since it as the dirty
/// bitmap named after the target. Disks not listed are not backed up.
pub fn backup_xml(socket: &Path, disks: &[BackupDisk]) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    let _ = writeln!(x, "  <server transport='unix' socket='{}'/>", esc(&socket.to_string_lossy()));
    x.push_str("  <disks>\n");
    for d in disks {
        let t = esc(&d.target);
        let mode = match &d.incremental {
            Some(c) => format!("backupmode='incremental' incremental='{}' exportbitmap='{t}'", esc(c)),
            None => "backupmode='full'".to_string(),
        };
        let _ = writeln!(x, "    <disk name='{t}' backup='yes' type='file' {mode} exportname='{t}'>");
        let _ = writeln!(x, "      <scratch file='{}'/>", esc(&d.scratch.to_string_lossy()));
        x.push_str("      <driver type='qcow2'/>\n");
        x.push_str("    </disk>\n");
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// The `<domaincheckpoint>` XML of checkpoint `name`: a bitmap of that
/// name on each of `with_bitmap`, none on the other targets of `all`.
pub fn checkpoint_xml(name: &str, all: &[String], with_bitmap: &[String]) -> String {
    let mut x = format!("<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n", esc(name));
    for t in all {
        if with_bitmap.contains(t) {
            let _ = writeln!(x, "    <disk name='{}' checkpoint='bitmap' bitmap='{}'/>", esc(t), esc(name));
        } else {
            let _ = writeln!(x, "    <disk name='{}' checkpoint='no'/>", esc(t));
        }
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// Record checkpoint `name` in libvirt's metadata of a domain, running or
/// stopped, whose disks already carry its bitmaps (`with_bitmap`; `all` is
/// every disk target): a bitmap knib added with `qemu-img bitmap` while
/// the domain was stopped (libvirt 9 creates checkpoints of running
/// domains only). A running domain's next backup job can then follow it.
/// Nothing is done when the checkpoint is already recorded.
pub fn redefine_checkpoint(vm: &Vm, name: &str, all: &[String], with_bitmap: &[String]) -> Result<()> {
    if checkpoints(vm)?.iter().any(|c| c == name) {
        return Ok(());
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let xml = checkpoint_xml(name, all, with_bitmap).replacen(
        "  <disks>\n",
        &format!("  <creationTime>{now}</creationTime>\n  <disks>\n"),
        1,
    );
    let what = format!("recording checkpoint {name} of domain {}", vm.name());
    let x = c_string(&what, &xml)?;
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the XML
    // outlives the call; the checkpoint reference returned is freed once.
    unsafe {
        let cp = (vm.dom().api.virDomainCheckpointCreateXML)(
            vm.dom().as_ptr(),
            x.as_ptr(),
            ffi::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
        );
        if cp.is_null() {
            return Err(last_virt_error(vm.dom(), what));
        }
        (vm.dom().api.virDomainCheckpointFree)(cp);
    }
    Ok(())
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| KnibError::invalid(format!("{what}: a NUL byte in {s:?}")))
}

/// Make the scratch file of a pull-mode backup of a disk of `size` bytes
/// (its capacity): an empty qcow2 image, mode 0600, owned by `owner` (QEMU's
/// user) when given. Written by knib's own qcow2 writer: libvirt would
/// otherwise create it through a QMP `blockdev-create` job inside
/// `virDomainBackupBegin` (about 20 ms). Not fsynced: it is scratch, and
/// goes with the work directory.
pub fn make_scratch(path: &Path, size: u64, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let spec = crate::qcow2::ImageSpec {
        virtual_size: size,
        cluster_bits: 16,
        backing: None,
        compression: crate::qcow2::CompressionType::Zlib,
    };
    let body = crate::qcow2::empty_image_bytes(spec)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KnibError::io("cannot create", path, e))?;
    f.write_all_at(&body, 0).map_err(|e| KnibError::io("cannot write", path, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|e| KnibError::io("cannot chown", path, e))?;
    }
    Ok(())
}

/// The capacity (guest-visible size) of disk `target` of the domain.
pub fn disk_capacity(vm: &Vm, target: &str) -> Result<u64> {
    vm.dom().block_capacity(target).map_err(|e| {
        KnibError::hypervisor(format!("virDomainGetBlockInfo of disk {target} of domain {}: {e}", vm.name()))
    })
}

/// Start a backup job on the running domain (`backup` from [`backup_xml`],
/// whose scratch files exist: [`make_scratch`]; `checkpoint`, from
/// [`checkpoint_xml`], is created at the same instant).
pub fn backup_begin(vm: &Vm, backup: &str, checkpoint: Option<&str>) -> Result<()> {
    let what = format!("virDomainBackupBegin on domain {}", vm.name());
    let b = c_string(&what, backup)?;
    let c = checkpoint.map(|c| c_string(&what, c)).transpose()?;
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the
    // strings are NUL-terminated and outlive the call (null: no checkpoint).
    let ret = unsafe {
        (vm.dom().api.virDomainBackupBegin)(
            vm.dom().as_ptr(),
            b.as_ptr(),
            c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            ffi::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL,
        )
    };
    if ret < 0 {
        return Err(last_virt_error(vm.dom(), what));
    }
    Ok(())
}

/// Whether a backup job runs on the domain. Only libvirt's "no backup
/// job" (or a domain no longer running) is `false`: any other failure (a
/// connection lost, access refused) is an error, never taken for "no job"
/// (a cleanup then skipped the abort, removed its journal, and left the
/// job blocking every later backup).
pub fn backup_running(vm: &Vm) -> Result<bool> {
    Ok(job_xml(vm)?.is_some())
}

/// The XML of the backup job running on the domain, if one does (errors
/// as [`backup_running`]'s).
fn job_xml(vm: &Vm) -> Result<Option<String>> {
    if !vm.is_running()? {
        return Ok(None);
    }
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the
    // answer is a malloc'ed string we free, or null on an error (no job
    // is one).
    let p = unsafe { (vm.dom().api.virDomainBackupGetXMLDesc)(vm.dom().as_ptr(), 0) };
    if p.is_null() {
        let e = super::ffi::VirtError::last(vm.dom().api);
        if e.code() == ffi::VIR_ERR_NO_DOMAIN_BACKUP || !vm.is_running()? {
            return Ok(None);
        }
        return Err(super::virt_error(format!("virDomainBackupGetXMLDesc on domain {}", vm.name()), &e));
    }
    // SAFETY: `p` is a NUL-terminated string from libvirt's allocator,
    // copied, then freed once.
    let xml = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { libc::free(p.cast()) };
    Ok(Some(xml))
}

/// The backup job running on the domain, if one does: `Some(socket)`,
/// the unix socket its NBD server listens on (`None` inside for a job
/// that has none: a push-mode job, or one on TCP). Errors as
/// [`backup_running`]'s.
pub fn running_job_socket(vm: &Vm) -> Result<Option<Option<PathBuf>>> {
    let Some(xml) = job_xml(vm)? else { return Ok(None) };
    let doc = roxmltree::Document::parse(&xml).map_err(|e| {
        KnibError::hypervisor(format!("the backup job XML of domain {} does not parse: {e}", vm.name()))
    })?;
    let socket = doc
        .descendants()
        .find(|n| n.has_tag_name("server") && n.attribute("transport") == Some("unix"))
        .and_then(|n| n.attribute("socket"))
        .map(PathBuf::from);
    Ok(Some(socket))
}

/// End the domain's job (the backup job): its NBD server stops and its
/// scratch files go.
pub fn abort_job(vm: &Vm) -> Result<()> {
    // SAFETY: the domain pointer is valid while `vm` is borrowed.
    if unsafe { (vm.dom().api.virDomainAbortJob)(vm.dom().as_ptr()) } < 0 {
        return Err(last_virt_error(vm.dom(), format!("virDomainAbortJob on domain {}", vm.name())));
    }
    Ok(())
}

/// The names of the domain's checkpoints.
pub fn checkpoints(vm: &Vm) -> Result<Vec<String>> {
    let mut list: *mut ffi::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: the domain pointer is valid while `vm` is borrowed; libvirt
    // fills `list` with `n` references and a NULL, all ours to free.
    let n = unsafe { (vm.dom().api.virDomainListAllCheckpoints)(vm.dom().as_ptr(), &mut list, 0) };
    if n < 0 {
        return Err(last_virt_error(vm.dom(), format!("virDomainListAllCheckpoints on domain {}", vm.name())));
    }
    let mut names = Vec::new();
    for i in 0..n as usize {
        // SAFETY: `i < n`; each entry is a live checkpoint reference, its
        // name a string owned by it; each reference is freed once.
        unsafe {
            let cp = *list.add(i);
            let name = (vm.dom().api.virDomainCheckpointGetName)(cp);
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            (vm.dom().api.virDomainCheckpointFree)(cp);
        }
    }
    if !list.is_null() {
        // SAFETY: the array came from libvirt's allocator.
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

/// Delete checkpoint `name` of the domain (its bitmaps too, unless
/// `metadata_only`); `false` when there was none.
pub fn delete_checkpoint(vm: &Vm, name: &str, metadata_only: bool) -> Result<bool> {
    if !checkpoints(vm)?.iter().any(|c| c == name) {
        return Ok(false);
    }
    let what = format!("deleting checkpoint {name} of domain {}", vm.name());
    let c = c_string(&what, name)?;
    // SAFETY: the domain pointer is valid while `vm` is borrowed; the name
    // outlives the call; the reference returned is freed once.
    unsafe {
        let cp = (vm.dom().api.virDomainCheckpointLookupByName)(vm.dom().as_ptr(), c.as_ptr(), 0);
        if cp.is_null() {
            return Err(last_virt_error(vm.dom(), what));
        }
        let flags = if metadata_only { ffi::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY } else { 0 };
        let r = (vm.dom().api.virDomainCheckpointDelete)(cp, flags);
        // The error is read before the free: every libvirt call, the free
        // too, clears the thread's last error (it was "an unknown libvirt
        // error" here).
        let failed = (r < 0).then(|| last_virt_error(vm.dom(), &what));
        (vm.dom().api.virDomainCheckpointFree)(cp);
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(true)
}

/// One dirty bitmap of a block node, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    /// Its name.
    pub name: String,
    /// Whether it records writes.
    pub recording: bool,
    /// Whether QEMU marks it inconsistent (in use when QEMU stopped).
    pub inconsistent: bool,
    /// Whether it lives in the image (kept across VM restarts).
    pub persistent: bool,
}

/// The dirty bitmaps of the block node whose file is `file` (the active
/// file of a disk of the running domain), from `query-named-block-nodes`.
pub fn bitmaps_of(vm: &Vm, file: &Path) -> Result<Vec<BitmapState>> {
    let out =
        super::qemu_monitor_command_qmp(vm, r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| KnibError::hypervisor(format!("query-named-block-nodes of domain {}: {e}", vm.name())))?;
    let want = file.as_os_str().as_bytes();
    let mut found = Vec::new();
    for node in v["return"].as_array().into_iter().flatten() {
        if node["file"].as_str().map(str::as_bytes) != Some(want) || node["drv"].as_str() == Some("file") {
            continue;
        }
        for b in node["dirty-bitmaps"].as_array().into_iter().flatten() {
            let flag = |k: &str| b[k].as_bool().unwrap_or(false);
            found.push(BitmapState {
                name: b["name"].as_str().unwrap_or_default().to_string(),
                recording: flag("recording"),
                inconsistent: flag("inconsistent"),
                persistent: flag("persistent"),
            });
        }
    }
    Ok(found)
}

/// Remove QEMU's dirty bitmap `name` from every block node of the running
/// domain that has it (after its checkpoint's record was deleted alone);
/// returns how many were removed.
pub fn remove_bitmaps_named(vm: &Vm, name: &str) -> Result<usize> {
    let out =
        super::qemu_monitor_command_qmp(vm, r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| KnibError::hypervisor(format!("query-named-block-nodes of domain {}: {e}", vm.name())))?;
    let mut n = 0;
    for node in v["return"].as_array().into_iter().flatten() {
        let has = node["dirty-bitmaps"].as_array().into_iter().flatten().any(|b| b["name"] == name);
        if has && node["node-name"].is_string() {
            let cmd = serde_json::json!({"execute": "block-dirty-bitmap-remove",
                "arguments": {"node": node["node-name"], "name": name}});
            super::qemu_monitor_command_qmp(vm, &cmd.to_string())?;
            n += 1;
        }
    }
    Ok(n)
}

/// The block nodes of the running domain (`query-named-block-nodes`).
fn named_nodes(vm: &Vm) -> Result<Vec<serde_json::Value>> {
    let out =
        super::qemu_monitor_command_qmp(vm, r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| KnibError::hypervisor(format!("query-named-block-nodes of domain {}: {e}", vm.name())))?;
    Ok(v["return"].as_array().cloned().unwrap_or_default())
}

/// The name of the node of driver `drv` (`raw`, `qcow2`) whose file is
/// `file`, in the running domain.
pub fn node_of(vm: &Vm, file: &Path, drv: &str) -> Result<String> {
    named_nodes(vm)?
        .iter()
        .find(|n| n["drv"].as_str() == Some(drv) && n["file"].as_str().is_some_and(|f| names_file(f, file)))
        .and_then(|n| n["node-name"].as_str().map(str::to_string))
        .ok_or_else(|| {
            KnibError::hypervisor(format!("domain {} has no {drv} block node of {}", vm.name(), file.display()))
        })
}

/// Whether a block node's `file` (its filename in QEMU's words) is `file`:
/// the path itself, or a `json:{...}` filename whose protocol layer is that
/// file (QEMU writes the options so when a node was opened with options its
/// header does not hold, as a scratch file given a backing node).
fn names_file(name: &str, file: &Path) -> bool {
    let want = file.as_os_str().as_bytes();
    if name.as_bytes() == want {
        return true;
    }
    let Some(json) = name.strip_prefix("json:") else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else { return false };
    v["file"]["driver"] == "file" && v["file"]["filename"].as_str().map(str::as_bytes) == Some(want)
}

/// Run one QMP command on the running domain; its error names `what`.
fn qmp(vm: &Vm, what: &str, cmd: serde_json::Value) -> Result<()> {
    super::qemu_monitor_command_qmp(vm, &cmd.to_string())
        .map(|_| ())
        .map_err(|e| e.context(format!("{what} on domain {}", vm.name())))
}

/// Add a dirty bitmap `name` to block node `node`, recording from now on
/// (`persistent: false`: kept in QEMU's memory only, as on a raw disk).
pub fn add_bitmap(vm: &Vm, node: &str, name: &str, persistent: bool) -> Result<()> {
    qmp(
        vm,
        &format!("adding dirty bitmap {name} to {node}"),
        serde_json::json!({"execute": "block-dirty-bitmap-add",
            "arguments": {"node": node, "name": name, "persistent": persistent}}),
    )
}

/// Stop (`false`) or start (`true`) dirty bitmap `name` of `node`
/// recording writes.
pub fn set_bitmap_recording(vm: &Vm, node: &str, name: &str, on: bool) -> Result<()> {
    let cmd = if on { "block-dirty-bitmap-enable" } else { "block-dirty-bitmap-disable" };
    qmp(
        vm,
        &format!("{cmd} {name} of {node}"),
        serde_json::json!({"execute": cmd, "arguments": {"node": node, "name": name}}),
    )
}

/// Merge dirty bitmap `from` into `into`, both of `node`.
pub fn merge_bitmap(vm: &Vm, node: &str, into: &str, from: &str) -> Result<()> {
    qmp(
        vm,
        &format!("merging dirty bitmap {from} into {into} of {node}"),
        serde_json::json!({"execute": "block-dirty-bitmap-merge",
            "arguments": {"node": node, "target": into, "bitmaps": [from]}}),
    )
}

/// Remove dirty bitmap `name` of `node`.
pub fn remove_bitmap(vm: &Vm, node: &str, name: &str) -> Result<()> {
    qmp(
        vm,
        &format!("removing dirty bitmap {name} of {node}"),
        serde_json::json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": name}}),
    )
}

/// The dirty bitmaps of block node `node`.
pub fn bitmaps_of_node(vm: &Vm, node: &str) -> Result<Vec<BitmapState>> {
    Ok(named_nodes(vm)?
        .iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| {
            let flag = |k: &str| b[k].as_bool().unwrap_or(false);
            Some(BitmapState {
                name: b["name"].as_str()?.to_string(),
                recording: flag("recording"),
                inconsistent: flag("inconsistent"),
                persistent: flag("persistent"),
            })
        })
        .collect())
}

/// Add a read-only NBD export `name` (also its id) of block node `node` to
/// the NBD server the domain's backup job started, with dirty bitmap
/// `bitmap` (found on `node` or below it) as a meta context.
pub fn add_export(vm: &Vm, name: &str, node: &str, bitmap: &str) -> Result<()> {
    qmp(
        vm,
        &format!("exporting {node} as {name}"),
        serde_json::json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": name,
            "node-name": node, "name": name, "writable": false, "bitmaps": [bitmap]}}),
    )
}

/// Remove NBD export `id`, if the domain has it.
pub fn remove_export(vm: &Vm, id: &str) -> Result<()> {
    let out = super::qemu_monitor_command_qmp(vm, r#"{"execute":"query-block-exports"}"#)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| KnibError::hypervisor(format!("query-block-exports of domain {}: {e}", vm.name())))?;
    if v["return"].as_array().into_iter().flatten().any(|e| e["id"] == id) {
        qmp(
            vm,
            &format!("removing NBD export {id}"),
            serde_json::json!({"execute": "block-export-del", "arguments": {"id": id, "mode": "hard"}}),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_of_a_pull_backup_and_its_checkpoint() {
        let d = [
            BackupDisk { target: "vda".into(), scratch: "/s/vda.scratch".into(), incremental: Some("knib-1".into()) },
            BackupDisk { target: "vdb".into(), scratch: "/s/vdb.scratch".into(), incremental: None },
        ];
        let x = backup_xml(Path::new("/s/nbd.sock"), &d);
        assert!(x.contains("socket='/s/nbd.sock'"), "{x}");
        assert!(
            x.contains("name='vda' backup='yes' type='file' backupmode='incremental' incremental='knib-1' exportbitmap='vda' exportname='vda'"),
            "{x}"
        );
        assert!(x.contains("name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb'>"), "{x}");
        assert!(x.contains("<scratch file='/s/vda.scratch'/>\n      <driver type='qcow2'/>"), "{x}");
        let full = backup_xml(Path::new("/s/n'b.sock"), &d[1..]);
        assert!(!full.contains("incremental") && !full.contains("exportbitmap"), "{full}");
        assert!(full.contains("n&apos;b.sock"), "{full}");
        let c = checkpoint_xml("knib-2", &["vda".into(), "hdc".into()], &["vda".into()]);
        assert!(c.contains("<disk name='vda' checkpoint='bitmap' bitmap='knib-2'/>"), "{c}");
        assert!(c.contains("<disk name='hdc' checkpoint='no'/>"), "{c}");
    }

    #[test]
    fn a_node_names_its_file_plainly_or_in_json_options() {
        let f = Path::new("/w/.x.nbd/vda.scratch");
        assert!(names_file("/w/.x.nbd/vda.scratch", f));
        let json = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/d/vda.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/w/.x.nbd/vda.scratch"}}"#;
        assert!(names_file(json, f));
        // The backing file's name is not the node's.
        assert!(!names_file(json, Path::new("/d/vda.qcow2")));
        assert!(!names_file("json:{not json", f));
        assert!(!names_file("/w/.x.nbd/vda.scratch2", f));
    }

    #[test]
    fn a_scratch_file_is_an_empty_qcow2_of_the_disks_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.scratch");
        make_scratch(&p, 3 << 30, None).unwrap();
        let img = crate::qcow2::Qcow2Image::open(&p).unwrap();
        assert_eq!(img.header().size, 3 << 30);
        assert!(img.header().backing_file.is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // Never over an existing file.
        assert!(make_scratch(&p, 1 << 20, None).is_err());
        let out = std::process::Command::new("qemu-img").args(["check", "-q"]).arg(&p).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn checkpoint_names_carry_backup_ids() {
        let id = "20260101-000000000-00ab";
        assert_eq!(checkpoint_backup_id(&checkpoint_name(id)), Some(id));
        assert_eq!(checkpoint_backup_id("user-checkpoint"), None);
        assert_eq!(checkpoint_backup_id("knib-../x"), None);
    }
}
