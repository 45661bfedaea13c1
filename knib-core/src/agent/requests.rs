//! The requests of the `agent.*` operations: one struct per operation
//! (`*Req`) and the objects nested in them, read by [`crate::wire`]. Their
//! JSON Schema is `docs/schema.json`, generated from them.
//!
//! # Invariants
//!
//! - Every struct refuses unknown fields, so a misspelt field is an error
//!   naming it, never ignored.
//! - Field names are the ones CloudStack's transfer objects fix (see
//!   `java/README.md`); a default here is the agent's default.
//! - A request only carries what the caller said: checks that need the
//!   file system or the hypervisor are made by the operations
//!   ([`super`]), not here.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::engine;
use crate::qemu_img::CompressionLibrary;

fn default_one() -> u32 {
    1
}

fn default_factor() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

/// The memory of `agent.validate`'s throwaway domain, in MiB, unless told.
pub(crate) const DEFAULT_MEMORY_MIB: u64 = 512;

fn default_boot_timeout() -> u64 {
    300
}

/// One volume of a backup, as the agent's KbossTO describes it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupVolume {
    /// The volume's uuid (the key of its results in the answer).
    pub uuid: String,
    /// The file the disk runs on now (VolumeObjectTO path, absolute).
    pub path: PathBuf,
    /// The new delta the disk runs on after the backup (created).
    pub delta_path_on_primary: PathBuf,
    /// The backup file written on the store (its directory made when missing).
    pub delta_path_on_store: PathBuf,
    /// The parent backup on the store: the copy is incremental, with it as backing file; absent: a full copy of this volume (method `snapshot` takes full and incremental volumes in one backup; method `bitmap` all or none).
    #[serde(default)]
    pub parent_backup_path: Option<PathBuf>,
    /// The delta written since the last backup and the base it is committed into after the copy.
    #[serde(default)]
    pub merge: Option<MergeTree>,
    /// Disk-only VM snapshot deltas taken since the last backup, oldest first: `[merge.child, X1, …]`, the layers between `merge.parent` and `path` (sent with a parent backup).
    #[serde(default)]
    pub vm_snapshot_delta_paths: Vec<PathBuf>,
}

/// A DeltaMergeTreeTO: `child` is committed into `parent`; `grand_children`
/// used `child` as their backing file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MergeTree {
    /// The base the delta is committed into.
    pub parent: PathBuf,
    /// The delta committed (it must be `path`).
    pub child: PathBuf,
    /// Files whose backing file is `child`. With a domain, the one in the
    /// disk's chain is moved onto `parent` by the merge itself, and each
    /// outside it (another branch of a VM snapshot tree) must have `child`
    /// as its backing file and is re-pointed at `parent` after the merge,
    /// before `child` is removed. Without a domain, each (other than the
    /// new delta, always moved) is re-pointed at `parent` after the merge.
    #[serde(default)]
    pub grand_children: Vec<PathBuf>,
}

/// The request of `agent.take_backup` (and, with `mode`, of `agent.cleanup_vm_backup`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TakeReq {
    /// The libvirt domain; may be absent only with `running: false` (a
    /// stopped VM libvirt does not know: the volumes' files alone).
    #[serde(default)]
    pub domain: Option<String>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// Whether the VM runs (absent: asked of libvirt).
    #[serde(default)]
    pub running: Option<bool>,
    /// Freeze the guest's filesystems (guest agent) for the snapshot.
    #[serde(default)]
    pub quiesce: bool,
    /// End the chain: the new delta is committed into the base too, and the disk runs on its base alone.
    #[serde(default)]
    pub end_of_chain: bool,
    /// A full copy outside the chain; the disks' chains stay as they were.
    #[serde(default)]
    pub isolated: bool,
    /// Every volume of the VM, backed up at one instant.
    pub volumes: Vec<BackupVolume>,
    /// The time budget in seconds (the command's `wait`); 0 or absent = none. It bounds the snapshot and the copy; once the backup is published its merges run to their end, as on the Java path.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// "snapshot" (the default: KBOSS's external snapshot, copy and merge)
    /// or "bitmap" (a running domain only: libvirt checkpoints and a
    /// pull-mode backup job; the disks' chains are left as they are, so
    /// `delta_path_on_primary` is not created and `merge` and
    /// `vm_snapshot_delta_paths` must be absent).
    #[serde(default)]
    pub method: engine::BackupMethod,
}

/// What `agent.cleanup_vm_backup` does with a failed backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CleanupMode {
    /// The agent's cleanup (the default): the backup's store files are
    /// removed, even when every one is complete, and each new delta is
    /// committed back into the file below it (`base <- delta` again), so
    /// the next incremental backup holds every write.
    #[default]
    Discard,
    /// knib's own: a backup whose every store file is present is finished
    /// (merges, end of chain); otherwise it is discarded as above.
    Complete,
}

impl CleanupMode {
    /// Its name in requests.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupMode::Discard => "discard",
            CleanupMode::Complete => "complete",
        }
    }
}

/// The request of `agent.cleanup_vm_backup`: the failed `agent.take_backup`'s
/// request (`quiesce` is ignored) and `mode`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CleanupReq {
    /// The libvirt domain; may be absent only with `running: false` (a
    /// stopped VM libvirt does not know: the volumes' files alone).
    #[serde(default)]
    pub domain: Option<String>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// Whether the VM runs (absent: asked of libvirt).
    #[serde(default)]
    pub running: Option<bool>,
    /// As the failed backup's (ignored).
    #[serde(default)]
    pub quiesce: bool,
    /// As the failed backup's: whether the backup ended the chain.
    #[serde(default)]
    pub end_of_chain: bool,
    /// As the failed backup's: whether it was an isolated full copy.
    #[serde(default)]
    pub isolated: bool,
    /// The failed backup's volumes, as its request gave them.
    pub volumes: Vec<BackupVolume>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// "discard" (the default, the agent's cleanup: the store files are
    /// removed and the VM put back on `base <- delta`) or "complete"
    /// (a backup whose every store file is present is finished).
    #[serde(default)]
    pub mode: CleanupMode,
    /// As the failed backup's: "snapshot" (the default) or "bitmap".
    #[serde(default)]
    pub method: engine::BackupMethod,
}

impl CleanupReq {
    /// The failed backup's request and the mode.
    pub fn into_parts(self) -> (TakeReq, CleanupMode) {
        let CleanupReq {
            domain,
            connect,
            running,
            quiesce,
            end_of_chain,
            isolated,
            volumes,
            timeout_secs,
            mode,
            method,
        } = self;
        (TakeReq { domain, connect, running, quiesce, end_of_chain, isolated, volumes, timeout_secs, method }, mode)
    }
}

/// The request of `agent.compress`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompressReq {
    /// The backup files to compress (absolute); `<file>.comp` is written beside each.
    pub(crate) files: Vec<PathBuf>,
    /// "zstd" (default) or "zlib".
    #[serde(default)]
    pub(crate) library: CompressionLibrary,
    /// qemu-img's `-m`, 1 to 16.
    #[serde(default = "default_one")]
    pub(crate) coroutines: u32,
    /// MB/s; 0 = no limit.
    #[serde(default)]
    pub(crate) rate_limit_mbps: u64,
    /// Refuse unless this many times each file's size is free.
    #[serde(default = "default_factor")]
    pub(crate) min_free_factor: f64,
    /// Refuse unless this many bytes are free beside the files.
    #[serde(default)]
    pub(crate) min_free_bytes: Option<u64>,
    /// One xxh3-128 per file, in order: a file that does not match is refused as corrupt.
    #[serde(default)]
    pub(crate) expected_hashes: Option<Vec<String>>,
    /// Read each `.comp` back before it counts as written and compare its
    /// data with the file's: one that differs fails as an internal error
    /// (the copy is faulty, not the file), and no `.comp` is left. It
    /// costs about 1.5x the CPU of the compression.
    #[serde(default)]
    pub(crate) check_output: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

/// The request of `agent.finalize_compression`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FinalizeReq {
    /// The files whose `<file>.comp` is renamed over them (or removed).
    pub(crate) files: Vec<PathBuf>,
    /// Remove the `<file>.comp` files instead (a failed compression).
    #[serde(default)]
    pub(crate) cleanup: bool,
    /// Accepted for symmetry; finalizing is a rename.
    #[serde(default)]
    #[allow(dead_code)]
    pub(crate) timeout_secs: Option<u64>,
}

/// One volume of `agent.restore`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreVolume {
    /// The volume's uuid, echoed in the answer.
    #[serde(default)]
    pub(crate) uuid: Option<String>,
    /// The backup file (its chain follows its backing pointers).
    pub(crate) backup_path: PathBuf,
    /// The volume file replaced.
    pub(crate) volume_path: PathBuf,
    /// Files of the backup's chain with their xxh3-128: a mismatch fails the restore before any volume is replaced.
    #[serde(default)]
    pub(crate) expected_hashes: Vec<engine::ExpectedHash>,
}

/// The request of `agent.restore`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreReq {
    /// The volumes to restore, all or none.
    pub(crate) volumes: Vec<RestoreVolume>,
    /// Write empty qcow2 overlays over the backups instead of copies (consolidate later).
    #[serde(default)]
    pub(crate) quick_restore: bool,
    /// Files of the old chains on primary, removed after the restore (a file of a backup's chain or a directory refuses the request).
    #[serde(default)]
    pub(crate) deltas_to_remove: Vec<PathBuf>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

/// One volume of `agent.consolidate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeRef {
    /// The volume's uuid, echoed in the answer.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The volume's file.
    pub path: PathBuf,
}

/// The request of `agent.consolidate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsolidateReq {
    /// The libvirt domain.
    pub domain: String,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// The volumes to consolidate; absent or empty: every disk of the
    /// domain that has backing files.
    #[serde(default)]
    pub volumes: Vec<VolumeRef>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// One volume of `agent.prepare_validation`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareVolume {
    /// The volume's uuid (names the overlay in `work_dir`).
    pub(crate) uuid: String,
    /// The backup file the overlay is made over (only read).
    pub(crate) backup_path: PathBuf,
    /// Where the overlay goes: the validation VM's volume file, as
    /// CloudStack's management server created it. An existing file is
    /// replaced only when it holds no data (empty, or a qcow2 image with no
    /// backing file and no allocated cluster) and no QEMU holds it.
    /// Without it the overlay goes to `work_dir`.
    #[serde(default)]
    pub(crate) overlay_path: Option<PathBuf>,
}

/// The request of `agent.prepare_validation`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareReq {
    /// The validation VM's name (names the overlays in `work_dir`).
    pub(crate) vm_name: String,
    /// Where the overlays of the volumes without `overlay_path` go.
    #[serde(default)]
    pub(crate) work_dir: Option<PathBuf>,
    /// The backup's volumes.
    pub(crate) volumes: Vec<PrepareVolume>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

/// One disk of `agent.validate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValidateDisk {
    /// The disk's target name in the guest (`vda`, ...).
    pub target: String,
    /// Its file (a prepared overlay or a backup file; only read).
    pub path: PathBuf,
}

/// The request of `agent.validate`. Two ways: `domain` validates a domain
/// that runs already (CloudStack's validation VM, as the agent does);
/// `disks` boots a throwaway domain on overlays of its own (knib's boot
/// test). The checks run in the agent's order: wait for the guest agent,
/// the screenshot, the script.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValidateReq {
    /// The validated VM's name (in messages).
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The running domain to validate, by name: knib creates, changes and
    /// destroys nothing (not with `disks`).
    #[serde(default)]
    pub domain: Option<String>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// The disks to boot a throwaway domain on, first the boot disk (not
    /// with `domain`).
    #[serde(default)]
    pub disks: Vec<ValidateDisk>,
    /// Where the throwaway domain's overlays go (with `disks`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// The throwaway domain's memory in MiB (default 512).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Wait for the guest agent to answer `guest-sync` (else the boot is
    /// not validated and the other checks run at once).
    #[serde(default = "default_true")]
    pub wait_for_boot: bool,
    /// How long to wait for the guest agent.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
    /// Save a PNG screenshot after the boot; without it the screenshot
    /// fields below are ignored (the Java wrapper sets them whatever the
    /// offering's steps).
    #[serde(default)]
    pub take_screenshot: bool,
    /// Seconds to wait before the screenshot (the agent's `screenshotWait`).
    #[serde(default)]
    pub screenshot_wait_secs: u64,
    /// Where the screenshot goes (not with `screenshot_next_to`); an existing file there is replaced only when it is a PNG image or empty.
    #[serde(default)]
    pub screenshot_path: Option<PathBuf>,
    /// Name the screenshot as the agent does:
    /// `<screenshot_next_to>-screenshot-<UTC time>.png`, next to this file
    /// (the backup's first file on the store).
    #[serde(default)]
    pub screenshot_next_to: Option<PathBuf>,
    /// The store's mount point: the answer's `screenshot_store_path` is the
    /// screenshot relative to it, as the agent answers.
    #[serde(default)]
    pub store_root: Option<PathBuf>,
    /// Run `script` in the guest through the guest agent.
    #[serde(default)]
    pub execute_script: bool,
    /// The program to run in the guest (an absolute path).
    #[serde(default)]
    pub script: Option<String>,
    /// Its arguments, split at every comma, nothing trimmed (as the agent
    /// splits them).
    #[serde(default)]
    pub script_arguments: Option<String>,
    /// How long the script may run, in seconds (the agent's
    /// `scriptTimeout`; default 60).
    #[serde(default)]
    pub script_timeout_secs: Option<u64>,
    /// What the script must give, as the agent compares it: `"0"` (the
    /// default) matches an exit code of 0; any value matches a standard
    /// output whose base64 (as the guest agent sends it) equals it.
    #[serde(default)]
    pub expected_result: Option<String>,
    /// Boot this kernel directly (else the first disk through the
    /// firmware; with `disks`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Its command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// `kvm` or `qemu` (default: chosen by the host; with `disks`).
    #[serde(default)]
    pub domain_type: Option<String>,
    /// The most the throwaway domain's guest may write to its overlays and
    /// serial console log, in MiB (1 to 1048576; with `disks`): past it the
    /// guest is stopped and the validation fails, saying so. Default: no
    /// limit of its own, but a guest is stopped the same way whenever the
    /// work directory's file system has less than 1 GiB free.
    #[serde(default)]
    pub max_write_mib: Option<u64>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The request of `agent.take_hash`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HashReq {
    /// The backup's chain, root first (absolute paths), hashed in this order.
    pub(crate) files: Vec<PathBuf>,
    /// Echoed in the answer.
    #[serde(default)]
    pub(crate) backup_uuid: Option<String>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

/// The request of `agent.cleanup_validation`. By default it does nothing
/// (the agent only releases its mounts: the management server destroys the
/// validation VM and its volumes).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CleanupValidationReq {
    /// The validation VM's name.
    pub vm_name: String,
    /// Destroy (and undefine) the domain of that name, if there is one.
    #[serde(default)]
    pub remove_domain: bool,
    /// Where `agent.prepare_validation` put the overlays of the volumes
    /// without `overlay_path` (they are removed).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// Accepted for symmetry.
    #[serde(default)]
    #[allow(dead_code)]
    pub timeout_secs: Option<u64>,
}

/// One merge of `agent.merge_snapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotMerge {
    /// The volume's uuid, echoed in the answer.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The layer the delta is committed into.
    pub parent: PathBuf,
    /// The snapshot delta committed.
    pub child: PathBuf,
    /// The files whose backing file was `child`: they are moved onto `parent`.
    #[serde(default)]
    pub grand_children: Vec<PathBuf>,
}

/// The request of `agent.merge_snapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MergeReq {
    /// The libvirt domain; may be absent only with `running: false`.
    #[serde(default)]
    pub domain: Option<String>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    pub connect: Option<String>,
    /// Whether the VM runs (absent: asked of libvirt).
    #[serde(default)]
    pub running: Option<bool>,
    /// One merge per volume; empty: nothing to do (an empty answer), as
    /// the management server sends it after a restore of every volume.
    pub merges: Vec<SnapshotMerge>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The domain a request names: `Ok(None)` for a stopped VM libvirt does
/// not know (no `domain`, `running: false`); without `domain` and with
/// `running` true or absent, an error naming the field.
pub(crate) fn domain_of<'a>(
    op: &str,
    domain: &'a Option<String>,
    running: Option<bool>,
) -> crate::error::Result<Option<&'a str>> {
    match (domain.as_deref(), running) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(false)) => Ok(None),
        (None, _) => Err(crate::error::KnibError::invalid(format!(
            "request of {op}: field `domain` is missing: it may be left out only with `running: false` (a stopped VM named by its volumes' files)"
        ))),
    }
}

/// The kind of a backup from its request: isolated, full (no volume has
/// `parent_backup_path`) or incremental (some have). With `mixed`, an
/// incremental backup may hold full volumes too: each volume without a
/// parent is copied whole, as the management server asks for a disk
/// attached since the last backup, or one whose delta was merged when it
/// was detached or migrated (method `snapshot`). Without it, every volume
/// must have a parent (method `bitmap`: one checkpoint for all disks).
pub(crate) fn kind_of(op: &str, r: &TakeReq, mixed: bool) -> crate::error::Result<crate::engine::take::BackupKind> {
    let parents = r.volumes.iter().filter(|v| v.parent_backup_path.is_some()).count();
    if r.isolated {
        if let Some(v) = r.volumes.iter().find(|v| v.parent_backup_path.is_some()) {
            return Err(crate::error::KnibError::invalid(format!(
                "request of {op}: an isolated backup is a full copy: volume {} must not have `parent_backup_path`",
                v.uuid
            )));
        }
        Ok(crate::engine::take::BackupKind::Isolated)
    } else if parents == 0 {
        Ok(crate::engine::take::BackupKind::Full)
    } else if parents == r.volumes.len() || mixed {
        Ok(crate::engine::take::BackupKind::Incremental)
    } else {
        let without: Vec<&str> =
            r.volumes.iter().filter(|v| v.parent_backup_path.is_none()).map(|v| v.uuid.as_str()).collect();
        Err(crate::error::KnibError::invalid(format!(
            "request of {op}: some volumes have `parent_backup_path` and some ({}) do not: method `bitmap` backs up all volumes full or all incremental (method `snapshot` takes both in one backup)",
            without.join(", ")
        )))
    }
}
