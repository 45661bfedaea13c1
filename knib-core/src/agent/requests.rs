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

fn default_memory() -> u64 {
    512
}

fn default_boot_timeout() -> u64 {
    300
}

/// One volume of a backup, as the agent's KbossTO describes it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupVolume {
    pub uuid: String,
    pub path: PathBuf,
    pub delta_path_on_primary: PathBuf,
    pub delta_path_on_store: PathBuf,
    #[serde(default)]
    pub parent_backup_path: Option<PathBuf>,
    #[serde(default)]
    pub merge: Option<MergeTree>,
    #[serde(default)]
    pub vm_snapshot_delta_paths: Vec<PathBuf>,
}

/// A DeltaMergeTreeTO: `child` is committed into `parent`; `grand_children`
/// used `child` as their backing file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MergeTree {
    pub parent: PathBuf,
    pub child: PathBuf,
    /// With a domain, accepted as the transfer object carries it (after a
    /// backup's copy the only child of `child` in the disk's chain is the
    /// new delta, which the merge itself moves onto `parent`). Without a
    /// domain, each (other than the new delta, always moved) is re-pointed
    /// at `parent` after the merge.
    #[serde(default)]
    pub grand_children: Vec<PathBuf>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TakeReq {
    /// The libvirt domain; may be absent only with `running: false` (a
    /// stopped VM libvirt does not know: the volumes' files alone).
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub running: Option<bool>,
    #[serde(default)]
    pub quiesce: bool,
    #[serde(default)]
    pub end_of_chain: bool,
    #[serde(default)]
    pub isolated: bool,
    pub volumes: Vec<BackupVolume>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompressReq {
    pub(crate) files: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) library: CompressionLibrary,
    #[serde(default = "default_one")]
    pub(crate) coroutines: u32,
    #[serde(default)]
    pub(crate) rate_limit_mbps: u64,
    #[serde(default = "default_factor")]
    pub(crate) min_free_factor: f64,
    #[serde(default)]
    pub(crate) min_free_bytes: Option<u64>,
    #[serde(default)]
    pub(crate) expected_hashes: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FinalizeReq {
    pub(crate) files: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) cleanup: bool,
    #[serde(default)]
    #[allow(dead_code)]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreVolume {
    #[serde(default)]
    pub(crate) uuid: Option<String>,
    pub(crate) backup_path: PathBuf,
    pub(crate) volume_path: PathBuf,
    #[serde(default)]
    pub(crate) expected_hashes: Vec<engine::ExpectedHash>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreReq {
    pub(crate) volumes: Vec<RestoreVolume>,
    #[serde(default)]
    pub(crate) quick_restore: bool,
    #[serde(default)]
    pub(crate) deltas_to_remove: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeRef {
    #[serde(default)]
    pub uuid: Option<String>,
    pub path: PathBuf,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsolidateReq {
    pub domain: String,
    #[serde(default)]
    pub connect: Option<String>,
    /// The volumes to consolidate; absent or empty: every disk of the
    /// domain that has backing files.
    #[serde(default)]
    pub volumes: Vec<VolumeRef>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareVolume {
    pub(crate) uuid: String,
    pub(crate) backup_path: PathBuf,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareReq {
    pub(crate) vm_name: String,
    pub(crate) work_dir: PathBuf,
    pub(crate) volumes: Vec<PrepareVolume>,
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValidateDisk {
    pub target: String,
    pub path: PathBuf,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValidateReq {
    #[serde(default)]
    pub vm_name: Option<String>,
    #[serde(default)]
    pub connect: Option<String>,
    pub disks: Vec<ValidateDisk>,
    pub work_dir: PathBuf,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_true")]
    pub wait_for_boot: bool,
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
    #[serde(default)]
    pub take_screenshot: bool,
    #[serde(default)]
    pub screenshot_path: Option<PathBuf>,
    #[serde(default)]
    pub execute_script: bool,
    #[serde(default)]
    pub script: Option<String>,
    #[serde(default)]
    pub script_arguments: Option<String>,
    #[serde(default)]
    pub expected_result: Option<String>,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub domain_type: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HashReq {
    pub(crate) files: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) backup_uuid: Option<String>,
    #[serde(default)]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CleanupValidationReq {
    pub vm_name: String,
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotMerge {
    #[serde(default)]
    pub uuid: Option<String>,
    pub parent: PathBuf,
    pub child: PathBuf,
    #[serde(default)]
    pub grand_children: Vec<PathBuf>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MergeReq {
    /// The libvirt domain; may be absent only with `running: false`.
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub running: Option<bool>,
    pub merges: Vec<SnapshotMerge>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The domain a request names: `Ok(None)` for a stopped VM libvirt does
/// not know (no `domain`, `running: false`); without `domain` and with
/// `running` true or absent, an error naming the field.
pub(crate) fn domain_of<'a>(op: &str, domain: &'a Option<String>, running: Option<bool>) -> crate::error::Result<Option<&'a str>> {
    match (domain.as_deref(), running) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(false)) => Ok(None),
        (None, _) => Err(crate::error::KnibError::invalid(format!(
            "request of {op}: field `domain` is missing: it may be left out only with `running: false` (a stopped VM named by its volumes' files)"
        ))),
    }
}
