//! The answers of the agent operations, one typed struct each (their JSON
//! Schema is part of `docs/schema.json`; the Java facade's `Answer` classes
//! mirror them field by field).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Serialize;

use crate::qemu_img::CompressionLibrary;

/// The answer of `agent.take_backup`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TakeBackupAnswer {
    /// "full", "incremental" or "isolated".
    pub kind: String,
    /// Always true on success (a failure says it in its error).
    pub vm_consistent: bool,
    /// One per volume of the request, in its order.
    pub volumes: Vec<TakenVolume>,
    /// Bytes of the backup: the sum of the volumes' `size`.
    pub total_size: u64,
    /// Method `bitmap` only, when an incremental backup could not follow
    /// its parent's checkpoint (why: the checkpoint or a bitmap is
    /// missing, inconsistent or not recording, or a disk is raw): every
    /// cluster was copied over the parent, so the file is as large as a
    /// full backup but still an exact incremental of its parent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
}

impl TakeBackupAnswer {
    /// The answer of these volumes, `total_size` their sum.
    pub(crate) fn new(kind: &str, volumes: Vec<TakenVolume>) -> Self {
        let total_size = volumes.iter().map(|v| v.size).sum();
        TakeBackupAnswer { kind: kind.to_string(), vm_consistent: true, volumes, total_size, full_reason: None }
    }

    /// The answer of a backup of the request's `volumes`, whose results
    /// are `results` in the same order; `domain`: the volumes are disks of
    /// a libvirt domain (their targets are answered).
    pub(crate) fn of(
        kind: &str,
        volumes: &[super::requests::BackupVolume],
        results: &[crate::engine::take::VolumeResult],
        domain: bool,
    ) -> Self {
        let taken = volumes
            .iter()
            .zip(results)
            .map(|(v, a)| TakenVolume {
                uuid: v.uuid.clone(),
                target: domain.then(|| a.name.clone()),
                new_volume_path: a.active_file.clone(),
                delta_path_on_store: a.dest.clone(),
                size: a.size,
                virtual_size: a.virtual_size,
            })
            .collect();
        Self::new(kind, taken)
    }
}

/// One volume backed up.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TakenVolume {
    /// The request's uuid.
    pub uuid: String,
    /// The disk target it runs as; null for a VM without a domain.
    pub target: Option<String>,
    /// The file the volume runs on now.
    pub new_volume_path: PathBuf,
    /// Its backup file.
    pub delta_path_on_store: PathBuf,
    /// Bytes of the backup file (its apparent length, as Java's
    /// `Files.size`).
    pub size: u64,
    /// Guest-visible size.
    pub virtual_size: u64,
}

/// The answer of `agent.cleanup_vm_backup`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CleanupVmBackupAnswer {
    /// The request's mode: "discard" or "complete".
    pub mode: String,
    /// Whether every store file of the backup was present: with mode
    /// "complete" the backup was then finished; otherwise (and always with
    /// "discard") it was undone.
    pub published: bool,
    /// Always true on success.
    pub vm_consistent: bool,
    /// The file each volume runs on now.
    pub volumes: Vec<VolumeState>,
    /// What was done, one line each.
    pub actions: Vec<String>,
    /// The backup's files removed from the store (partial copies too).
    pub removed_from_store: Vec<PathBuf>,
    /// Whether the VM runs after the cleanup: its domain's state, false
    /// for a VM without a domain.
    pub vm_running: bool,
}

/// A volume and the file it runs on.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VolumeState {
    /// The request's uuid.
    pub uuid: Option<String>,
    /// Its disk target; null for a VM without a domain.
    pub target: Option<String>,
    /// The file it runs on now.
    pub path: Option<PathBuf>,
}

/// The answer of `agent.compress`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CompressAnswer {
    /// One per file, in the request's order.
    pub compressed: Vec<CompressedFile>,
}

/// One compressed copy, not yet finalized.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CompressedFile {
    /// The backup file.
    pub path: PathBuf,
    /// Its compressed copy (`<path>.comp`).
    pub comp_path: PathBuf,
    /// Bytes before.
    pub original_size: u64,
    /// Bytes after.
    pub compressed_size: u64,
    /// The library used.
    pub library: CompressionLibrary,
    /// xxh3-128 of the compressed file, when its source was checked
    /// against an expected hash (`expected_hashes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl From<crate::engine::CompressedFile> for CompressedFile {
    fn from(c: crate::engine::CompressedFile) -> Self {
        CompressedFile {
            path: c.path,
            comp_path: c.comp_path,
            original_size: c.original_size,
            compressed_size: c.compressed_size,
            library: c.library,
            hash: c.hash,
        }
    }
}

/// The answer of `agent.finalize_compression`: `finalized` or, with
/// `cleanup`, `discarded`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FinalizeAnswer {
    /// Each file, now compressed, and its size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalized: Option<Vec<SizedFile>>,
    /// The files whose `.comp` copies were removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discarded: Option<Vec<PathBuf>>,
    /// Bytes of the finalized files together (the agent's answer details);
    /// 0 with `cleanup`.
    pub total_size: u64,
}

/// A file and its size.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SizedFile {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The answer of `agent.restore`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RestoreAnswer {
    /// Each volume restored.
    pub volumes: Vec<RestoredVolume>,
    /// The old deltas removed (one that could not be removed, once every
    /// volume was restored, is logged as a warning and left out).
    pub removed: Vec<PathBuf>,
}

/// One volume restored.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RestoredVolume {
    /// The request's uuid.
    pub uuid: Option<String>,
    /// The volume's file.
    pub path: PathBuf,
    /// Its backing file (the backup) after a quick restore.
    pub backing: Option<PathBuf>,
}

/// The answer of `agent.consolidate`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConsolidateAnswer {
    /// Each volume (or, without `volumes` in the request, each disk).
    pub consolidated: Vec<Consolidated>,
}

/// One volume consolidated.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Consolidated {
    /// The request's uuid.
    pub uuid: Option<String>,
    /// Its disk target.
    pub target: String,
    /// The file it runs on.
    pub path: PathBuf,
    /// Whether it had backing files to pull in.
    pub pulled: bool,
}

/// The answer of `agent.prepare_validation`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PrepareValidationAnswer {
    /// One overlay per volume.
    pub volumes: Vec<PreparedVolume>,
}

/// The overlay of one volume.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PreparedVolume {
    /// The request's uuid.
    pub uuid: String,
    /// The backup file under it.
    pub backup_path: PathBuf,
    /// The overlay made.
    pub overlay_path: PathBuf,
}

/// The answer of `agent.validate`. The agent's `ValidateKbossVmAnswer` is
/// `boot_validated`, `screenshot_store_path` and `script_result`, as they
/// are; the rest is knib's.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ValidateAnswer {
    /// Whether the guest agent answered (false when it was not waited for).
    pub boot_validated: bool,
    /// Seconds to its first answer (or to giving up).
    pub boot_seconds: f64,
    /// The screenshot taken (absolute).
    pub screenshot_path: Option<PathBuf>,
    /// The screenshot relative to the request's `store_root`, as the agent
    /// answers `screenshotPath`.
    pub screenshot_store_path: Option<String>,
    /// The agent's `scriptResult`: null when the script gave the expected
    /// result (or was not asked for); else its standard output in base64
    /// (as the guest agent sent it; `"exit code N, no output"` when it
    /// printed nothing), `"Timeout"`, or the error that kept it from
    /// running.
    pub script_result: Option<String>,
    /// The script's standard output, decoded.
    pub script_output: Option<String>,
    /// The script's exit code.
    pub script_exit_code: Option<i64>,
    /// Whether every check passed (the boot when waited for, the
    /// screenshot, the script).
    pub passed: bool,
    /// What failed, one line each.
    pub problems: Vec<String>,
}

/// The answer of `agent.take_hash`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TakeHashAnswer {
    /// The request's `backup_uuid`.
    pub backup_uuid: Option<String>,
    /// xxh3-128 of the whole chain, 32 hex digits.
    pub hash: String,
    /// Each file's own hash.
    pub files: Vec<FileHash>,
}

/// The hash of one volume's chain of a backup (in the answer of `hash`):
/// the same values as the `hash` and `files` of `agent.take_hash` given the
/// files of that chain.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ChainHash {
    /// xxh3-128 of the whole chain, 32 hex digits.
    pub hash: String,
    /// Each file's own hash, root first.
    pub files: Vec<FileHash>,
}

/// One file's hash.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileHash {
    /// The file.
    pub path: PathBuf,
    /// Its xxh3-128.
    pub hash: String,
}

/// The answer of `agent.cleanup_validation`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CleanupValidationAnswer {
    /// Whether a domain was destroyed (only with `remove_domain`).
    pub domain_removed: bool,
    /// The overlays removed.
    pub removed: Vec<PathBuf>,
}

/// The answer of `agent.merge_snapshot`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MergeSnapshotAnswer {
    /// The file each merged volume runs on now.
    pub volumes: Vec<MergedVolume>,
}

/// One merge done.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MergedVolume {
    /// The request's uuid.
    pub uuid: Option<String>,
    /// Its disk target; null for a VM without a domain.
    pub target: Option<String>,
    /// The file it runs on now.
    pub path: PathBuf,
}
