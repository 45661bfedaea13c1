//! The catalog operations: requests that name a backup by its store and
//! id, each a thin layer that looks the backup's files up in the store and
//! then makes the same call as the path-based operation doing that work,
//! with the same field names and defaults, and answers in the same form:
//!
//! | catalog | path-based | shared |
//! |---|---|---|
//! | `compress` | `agent.compress` + `agent.finalize_compression` | [`crate::engine::compress_verified()`], [`crate::engine::finalize()`]; fields `library`, `coroutines`, `rate_limit_mbps`, `min_free_factor`, `min_free_bytes`, `check_output`, `timeout_secs` |
//! | `hash` | `agent.take_hash` | `agent::chain_hash`: each volume's [`ChainHash`] is `agent.take_hash`'s `hash` and `files` for that chain |
//! | `restore` | `agent.restore` | [`crate::engine::restore_verified()`]; the answer is [`RestoreAnswer`] |
//!
//! The catalog forms take the expected hashes from the manifests (the
//! agent's take them from the request), and answer the backup as
//! [`BackupView`] where they change it. Every catalog operation that does
//! long work takes `timeout_secs` as the agent operations do.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::{self, ChainHash, RestoreAnswer, RestoredVolume};
use crate::catalog::{BackupOptions, CompressionInfo, DiskSpec, Manifest, Store, DEFAULT_CHAIN_SIZE};
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::qemu_img::{CompressionLibrary, ImageFormat};
use crate::vault::{SyncOptions, SyncReport, Vault};
#[cfg(not(feature = "libvirt"))]
use crate::wire::no_libvirt;
use crate::wire::{absolute, check_goes_with_compress, store_dir, store_or_vault};

fn default_chain() -> i64 {
    DEFAULT_CHAIN_SIZE
}
fn default_one() -> u32 {
    1
}
fn default_factor() -> f64 {
    1.0
}

/// A request with no fields (`version`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Empty {}

/// The request of `backup`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupReq {
    /// The store directory (made when missing).
    store: PathBuf,
    /// The VM's name, with `disks`.
    #[serde(default)]
    vm: Option<String>,
    /// The VM's disks (with `vm`).
    #[serde(default)]
    disks: Vec<DiskSpec>,
    /// A libvirt domain, instead of `vm` and `disks`.
    #[serde(default)]
    domain: Option<String>,
    /// The libvirt URI (default `qemu:///system`).
    #[serde(default)]
    connect: Option<String>,
    /// With `domain`: freeze the guest's filesystems (guest agent) for the
    /// snapshot.
    #[serde(default)]
    quiesce: bool,
    /// Start a new chain.
    #[serde(default)]
    full: bool,
    /// A full backup outside the chain.
    #[serde(default)]
    isolated: bool,
    /// Backups per chain (default 8).
    #[serde(default = "default_chain")]
    chain_size: i64,
    /// Compress as copied, in one pass.
    #[serde(default)]
    compress: Option<CompressionLibrary>,
    /// With `compress`: read each compressed file back before the backup
    /// is kept; one that does not hold what was copied into it fails the
    /// backup as an internal error (nothing kept). The store's
    /// `compression.check_output` turns it on whatever is asked, for
    /// backups into the store. A file copied by qemu-img is compared with
    /// its source by guest bytes; one whose source knib's reader does not
    /// read is not read back (a warning is logged). Refused without
    /// `compress`, and for a backup sent straight to a vault (no file of
    /// its own is left to read).
    #[serde(default)]
    check_output: bool,
    /// With `domain`: how changes are found, `snapshot` or `bitmap`
    /// (checkpoints and dirty bitmaps, running domains); absent: the VM's
    /// setting (`vm.settings`), `snapshot` by default.
    #[serde(default)]
    method: Option<crate::engine::BackupMethod>,
    /// Write the backup straight to this vault (`s3://bucket/prefix`) as
    /// it is copied, instead of into the store (which keeps the VM's lock,
    /// settings and, for a domain, the journal); the chain continued is the
    /// vault's.
    #[serde(default)]
    vault: Option<String>,
    /// The time budget in seconds; 0 or absent = none. It bounds the
    /// snapshot and the copy; once the backup is published the merge of the
    /// disks runs to its end (stopping it would leave them for `recover`).
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// The request of `vm.settings`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VmSettingsReq {
    /// The store directory (made when a setting is given and it is missing).
    store: PathBuf,
    /// The VM's name (a libvirt domain's name).
    vm: String,
    /// Set the VM's backup method: `snapshot` or `bitmap`; absent: leave it.
    #[serde(default)]
    backup_method: Option<crate::engine::BackupMethod>,
}

/// The settings of a VM, after a `vm.settings` request.
pub(crate) fn vm_settings(r: VmSettingsReq) -> Result<crate::catalog::VmSettings> {
    store_dir("vm.settings", &r.store)?;
    crate::names::validate("VM name", &r.vm)?;
    match r.backup_method {
        Some(m) => {
            let store = Store::create(&r.store)?;
            let mut s = store.vm_settings(&r.vm)?;
            s.backup_method = m;
            store.set_vm_settings(&r.vm, &s)?;
            Ok(s)
        }
        None => Store::open(&r.store)?.vm_settings(&r.vm),
    }
}

/// The request of `list`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`).
    store: PathBuf,
    /// Only this VM's backups.
    #[serde(default)]
    vm: Option<String>,
}

/// A request naming one backup (`show`, `delete`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackupRef {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`).
    store: PathBuf,
    /// The backup's id.
    backup: String,
}

/// The request of `hash`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HashReq {
    /// The store directory.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// The request of `verify`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`).
    store: PathBuf,
    /// One backup; absent: every backup of the store.
    #[serde(default)]
    backup: Option<String>,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// The request of `restore`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`).
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The volume's name.
    volume: String,
    /// The new image (must not exist).
    to: PathBuf,
    /// Its format.
    #[serde(default)]
    format: ImageFormat,
    /// Skip checking every file of the chain against its recorded hash as
    /// it is read (checked by default).
    #[serde(default)]
    no_verify: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// The request of `quick_restore`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
// Read only by the libvirt part.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) struct QuickRestoreReq {
    /// The store directory, or a vault (`s3://BUCKET/PREFIX`): the disks
    /// then read the vault through knib's NBD server, a `knib vault-serve`
    /// process that runs until `agent.consolidate` (or `knib consolidate`)
    /// has pulled the data in.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// The libvirt domain (stopped).
    domain: String,
    /// The libvirt URI.
    #[serde(default)]
    connect: Option<String>,
    /// From a vault only: the `knib` program to run as the NBD server
    /// (default: `knib` on `PATH`).
    #[serde(default)]
    server_program: Option<PathBuf>,
}

/// The request of `recover`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
// Read only by the libvirt part.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) struct RecoverReq {
    /// The store directory.
    store: PathBuf,
    /// The libvirt domain.
    domain: String,
    /// The libvirt URI.
    #[serde(default)]
    connect: Option<String>,
    /// The vault (`s3://bucket/prefix`) the interrupted backup was being
    /// written to, when its journal names one: it says whether the backup
    /// was published, and loses the objects of one that was not.
    #[serde(default)]
    vault: Option<String>,
    /// Give up an interrupted backup that recover cannot finish or undo
    /// (the domain is gone, its disks were changed by hand, its journal is
    /// damaged): its journal is set aside in the store and its unpublished
    /// files removed; the domain and its disks are not touched (nor looked
    /// up: `domain` names the VM in the store). The answer's `discarded`
    /// says what was done and what may be left outside the store. Not
    /// with `vault`.
    #[serde(default)]
    discard: bool,
}

/// The request of `compress`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompressReq {
    /// The store directory.
    store: PathBuf,
    /// The backup's id.
    backup: String,
    /// "zstd" (default) or "zlib".
    #[serde(default)]
    library: CompressionLibrary,
    /// qemu-img's `-m`, 1 to 16.
    #[serde(default = "default_one")]
    coroutines: u32,
    /// MB/s; 0 = no limit.
    #[serde(default)]
    rate_limit_mbps: u64,
    /// Refuse unless this many times each file's size is free.
    #[serde(default = "default_factor")]
    min_free_factor: f64,
    /// Refuse unless this many bytes are free in the backup's directory.
    #[serde(default)]
    min_free_bytes: Option<u64>,
    /// Read each compressed copy back before it replaces the backup's file
    /// and compare its data with the file's: one that differs fails as an
    /// internal error (the copy is faulty, not the backup) and the backup
    /// is kept. The store's `compression.check_output` turns it on
    /// whatever is asked. It costs about 1.5x the CPU.
    #[serde(default)]
    check_output: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// A backup as every binding and `knib --json` show it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct BackupView {
    /// Its id.
    pub id: String,
    /// Its VM.
    pub vm: String,
    /// "full", "incremental" or "isolated".
    pub kind: String,
    /// The parent backup.
    pub parent: Option<String>,
    /// Position in the chain.
    pub position: u32,
    /// Whether it ended its chain.
    pub end_of_chain: bool,
    /// When it was taken.
    pub created: String,
    /// Compression, if compressed.
    pub compression: Option<CompressionInfo>,
    /// Whether it was deleted (kept for its children).
    pub removed: bool,
    /// Why it is full where an incremental backup was asked for (the chain
    /// could not be continued safely); null otherwise.
    pub full_reason: Option<String>,
    /// Its volumes, with absolute file paths.
    pub volumes: Vec<VolumeView>,
}

/// A volume of a backup as every binding shows it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct VolumeView {
    /// The volume's name.
    pub name: String,
    /// The backup file (absolute).
    pub file: PathBuf,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Bytes on the store.
    pub size: u64,
    /// The disk it came from.
    pub source: String,
    /// The backing pointer in the file.
    pub backing: Option<String>,
    /// The recorded hash.
    pub hash: Option<String>,
}

impl BackupView {
    /// The view of manifest `m` in vault `vault`: each volume's `file` is
    /// its object's `s3://` name.
    pub fn in_vault(vault: &Vault, m: &Manifest) -> BackupView {
        Self::of(m, |f| PathBuf::from(format!("{}/vms/{}/{}/{f}", vault.location(), m.vm, m.id)))
    }

    /// The view of manifest `m` in `store`.
    pub fn new(store: &Store, m: &Manifest) -> BackupView {
        let dir = store.backup_dir(m);
        let dir = dir.canonicalize().unwrap_or(dir);
        Self::of(m, |f| dir.join(f))
    }

    fn of(m: &Manifest, file: impl Fn(&str) -> PathBuf) -> BackupView {
        BackupView {
            id: m.id.clone(),
            vm: m.vm.clone(),
            kind: m.kind.as_str().to_string(),
            parent: m.parent.clone(),
            position: m.position,
            end_of_chain: m.end_of_chain,
            created: m.created.clone(),
            compression: m.compression.clone(),
            removed: m.removed,
            full_reason: m.full_reason.clone(),
            volumes: m
                .volumes
                .iter()
                .map(|v| VolumeView {
                    name: v.name.clone(),
                    file: file(&v.file),
                    virtual_size: v.virtual_size,
                    size: v.size,
                    source: v.source.clone(),
                    backing: v.backing.clone(),
                    hash: v.hash.clone(),
                })
                .collect(),
        }
    }
}

/// The answer of `version`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VersionAnswer {
    /// knib's version.
    pub version: String,
    /// The request schema it reads.
    pub schema: u32,
}

/// The answer of `quick_restore`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct QuickRestoreAnswer {
    /// `[target, overlay]` of each disk.
    pub overlays: Vec<(String, PathBuf)>,
    /// `[target, file]` of each writable disk of the domain that the
    /// backup does not have (added after it was taken): it was left on its
    /// file, as it is now.
    pub kept: Vec<(String, PathBuf)>,
}

/// The answer of `hash`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct HashAnswer {
    /// The backup's id.
    pub backup: String,
    /// Each volume's chain (by volume name): its xxh3-128, root first, and
    /// each file's, as `agent.take_hash` answers them.
    pub volumes: BTreeMap<String, ChainHash>,
}

/// The answer of `recover`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecoverAnswer {
    /// The interrupted backup, if a journal was found.
    pub backup_id: Option<String>,
    /// The step it had reached ("snapshot", "copy", "publish", "merge",
    /// "pivot").
    pub step: Option<String>,
    /// Whether it had reached the store (then finished, else undone).
    pub published: bool,
    /// What was done.
    pub report: RecoverReport,
    /// With `discard`: the journals set aside, one per interrupted backup
    /// (none: nothing was interrupted); the other fields then say nothing
    /// was recovered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discarded: Option<Vec<crate::catalog::DiscardedJournal>>,
}

/// What `recover` did.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecoverReport {
    /// One line per action.
    pub actions: Vec<String>,
    /// `[target, [file, ...]]`: the files each disk runs on, active first.
    pub chains: Vec<(String, Vec<PathBuf>)>,
}

pub(crate) fn version() -> VersionAnswer {
    VersionAnswer { version: crate::VERSION.to_string(), schema: crate::wire::SCHEMA }
}

pub(crate) fn backup(op: &str, r: BackupReq, ctl: &Control) -> Result<BackupView> {
    store_dir(op, &r.store)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    let opts = BackupOptions {
        full: r.full,
        isolated: r.isolated,
        chain_size: r.chain_size,
        compress: r.compress,
        check_output: r.check_output,
        method: r.method,
        group: None,
    };
    check_goes_with_compress(op, r.check_output, r.compress.is_some())?;
    if r.check_output && r.vault.is_some() {
        return Err(KnibError::invalid(format!(
            "request of {op}: field `check_output` does not go with `vault` (a backup sent straight to a vault leaves no file to read back)"
        )));
    }
    if r.full && r.isolated {
        return Err(KnibError::invalid(format!(
            "request of {op}: fields `full` and `isolated` exclude each other (an isolated backup is a full one outside the chain)"
        )));
    }
    if r.vm.is_some() && r.domain.is_none() {
        // What only a domain's backup does: refused, not ignored.
        if r.quiesce {
            return Err(KnibError::invalid(format!("request of {op}: field `quiesce` goes with `domain`, not `vm`")));
        }
        if r.method.is_some() {
            return Err(KnibError::invalid(format!("request of {op}: field `method` goes with `domain`, not `vm`")));
        }
    }
    let store = Store::create(&r.store)?;
    if let Some(to) = &r.vault {
        if !crate::vault::is_vault(to) {
            return Err(KnibError::invalid(format!(
                "request of {op}: field `vault`: {to:?} is not s3://BUCKET/PREFIX"
            )));
        }
        let vault = Vault::open(to)?;
        let m = match (&r.vm, &r.domain) {
            (Some(vm), None) => vault.backup_direct(&store, vm, &r.disks, &opts, &SyncOptions::direct(), ctl)?,
            (None, Some(d)) => {
                if !r.disks.is_empty() {
                    return Err(KnibError::invalid(format!(
                        "request of {op}: field `disks` goes with `vm`, not `domain`"
                    )));
                }
                #[cfg(feature = "libvirt")]
                {
                    let dom = crate::libvirt::domain(r.connect.as_deref(), d)?;
                    vault.backup_domain_direct(&store, &dom, &opts, r.quiesce, &SyncOptions::direct(), ctl)?
                }
                #[cfg(not(feature = "libvirt"))]
                {
                    let _ = d;
                    return Err(no_libvirt(op));
                }
            }
            _ => return Err(KnibError::invalid(format!("request of {op}: give `vm` with `disks`, or `domain`"))),
        };
        return Ok(BackupView::in_vault(&vault, &m));
    }
    let m = match (&r.vm, &r.domain) {
        (Some(vm), None) => store.backup(vm, &r.disks, &opts, ctl)?,
        (None, Some(d)) => {
            if !r.disks.is_empty() {
                return Err(KnibError::invalid(format!("request of {op}: field `disks` goes with `vm`, not `domain`")));
            }
            #[cfg(feature = "libvirt")]
            {
                store.backup_domain(&crate::libvirt::domain(r.connect.as_deref(), d)?, &opts, r.quiesce, ctl)?
            }
            #[cfg(not(feature = "libvirt"))]
            {
                let _ = (d, r.quiesce, &r.connect);
                return Err(no_libvirt(op));
            }
        }
        _ => return Err(KnibError::invalid(format!("request of {op}: give `vm` with `disks`, or `domain`"))),
    };
    // `sync.auto`: the VM's sync job, queued; a backup that worked is not
    // failed by a problem here.
    match store.queue_sync_after_backup(&m.vm) {
        Ok(Some(j)) => log::info!("backup {}: queued sync job {}", m.id, j.id),
        Ok(None) => {}
        Err(e) => log::warn!("backup {}: its sync job was not queued: {e}", m.id),
    }
    Ok(BackupView::new(&store, &m))
}

/// The vault `store` names (`s3://bucket/prefix`), if it names one.
fn vault_of(store: &std::path::Path) -> Result<Option<Vault>> {
    match store.to_str() {
        Some(s) if crate::vault::is_vault(s) => Ok(Some(Vault::open(s)?)),
        _ => Ok(None),
    }
}

pub(crate) fn list(r: ListReq) -> Result<Vec<BackupView>> {
    store_or_vault("list", "store", &r.store)?;
    if let Some(v) = vault_of(&r.store)? {
        return Ok(v.list(r.vm.as_deref())?.iter().map(|m| BackupView::in_vault(&v, m)).collect());
    }
    let store = Store::open(&r.store)?;
    Ok(store.list(r.vm.as_deref())?.iter().map(|m| BackupView::new(&store, m)).collect())
}

pub(crate) fn show(r: BackupRef) -> Result<BackupView> {
    store_or_vault("show", "store", &r.store)?;
    if let Some(v) = vault_of(&r.store)? {
        return Ok(BackupView::in_vault(&v, &v.show(&r.backup)?));
    }
    let store = Store::open(&r.store)?;
    let m = store.show(&r.backup)?;
    Ok(BackupView::new(&store, &m))
}

pub(crate) fn restore(r: RestoreReq, ctl: &Control) -> Result<RestoreAnswer> {
    store_or_vault("restore", "store", &r.store)?;
    absolute("restore", "to", &r.to)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    if let Some(v) = vault_of(&r.store)? {
        v.restore(&r.backup, &r.volume, &r.to, r.format, !r.no_verify, ctl)?;
        return Ok(restored(r.volume, r.to));
    }
    Store::open(&r.store)?.restore_with(&r.backup, &r.volume, &r.to, r.format, !r.no_verify, ctl)?;
    Ok(restored(r.volume, r.to))
}

/// The answer of `restore` (and of `knib restore --json`): `agent.restore`'s,
/// the volume named by its name in the backup, written flattened to `to`.
pub fn restored(volume: String, to: PathBuf) -> RestoreAnswer {
    RestoreAnswer { volumes: vec![RestoredVolume { uuid: Some(volume), path: to, backing: None }], removed: Vec::new() }
}

pub(crate) fn quick_restore(op: &str, r: QuickRestoreReq, ctl: &Control) -> Result<QuickRestoreAnswer> {
    store_or_vault(op, "store", &r.store)?;
    #[cfg(feature = "libvirt")]
    {
        if let Some(loc) = r.store.to_str().filter(|s| crate::vault::is_vault(s)) {
            let program = crate::vault::serve::server_program(r.server_program.as_deref())?;
            let vault = Vault::open(loc)?;
            let vm = crate::libvirt::domain(r.connect.as_deref(), &r.domain)?;
            let mut spawn = |dir: &std::path::Path| crate::vault::serve::spawn_server(&program, loc, &r.backup, dir);
            let st = crate::vault::serve::quick_restore_domain(
                &vault,
                &crate::qemu_img::QemuImg::new(),
                &r.backup,
                &vm,
                &mut spawn,
                ctl,
            )?;
            let overlays: Vec<_> = st.disks.iter().map(|d| (d.target.clone(), d.overlay.clone())).collect();
            let kept = crate::catalog::disks_not_restored(&vm, &overlays);
            return Ok(QuickRestoreAnswer { overlays, kept });
        }
        if r.server_program.is_some() {
            return Err(KnibError::invalid(format!(
                "request of {op}: field `server_program` goes with a vault (`store` s3://BUCKET/PREFIX)"
            )));
        }
        let vm = crate::libvirt::domain(r.connect.as_deref(), &r.domain)?;
        let store = Store::open(&r.store)?;
        let overlays = store.quick_restore_domain(&r.backup, &vm, ctl)?;
        let kept = crate::catalog::disks_not_restored(&vm, &overlays);
        Ok(QuickRestoreAnswer { overlays, kept })
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (r, ctl);
        Err(no_libvirt(op))
    }
}

pub(crate) fn recover(op: &str, r: RecoverReq, ctl: &Control) -> Result<RecoverAnswer> {
    store_dir(op, &r.store)?;
    if r.discard {
        if r.vault.is_some() {
            return Err(KnibError::invalid(format!(
                "request of {op}: `discard` and `vault` exclude each other (a discard changes only the store)"
            )));
        }
        let d = Store::open(&r.store)?.discard_interrupted(&r.domain)?;
        return Ok(RecoverAnswer {
            backup_id: None,
            step: None,
            published: false,
            report: RecoverReport { actions: Vec::new(), chains: Vec::new() },
            discarded: Some(d.discarded),
        });
    }
    #[cfg(feature = "libvirt")]
    {
        let _ = op;
        let vm = crate::libvirt::domain(r.connect.as_deref(), &r.domain)?;
        // An existing store only (a mistyped path made an empty store).
        let store = Store::open(&r.store)?;
        let o = match &r.vault {
            Some(to) => Vault::open(to)?.recover_domain(&store, &vm, ctl)?,
            None => store.recover_domain(&vm, ctl)?,
        };
        Ok(RecoverAnswer {
            backup_id: o.backup_id,
            step: o.step.map(|s| s.as_str().to_string()),
            published: o.published,
            report: RecoverReport { actions: o.report.actions, chains: o.report.chains },
            discarded: None,
        })
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (r, ctl);
        Err(no_libvirt(op))
    }
}

pub(crate) fn compress(r: CompressReq, ctl: &Control) -> Result<BackupView> {
    store_dir("compress", &r.store)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    let store = Store::open(&r.store)?;
    let opts = agent::compress_options(r.library, r.coroutines, r.rate_limit_mbps, r.min_free_factor, r.check_output);
    if r.min_free_bytes.is_some() {
        let dir = store.backup_dir(&store.show(&r.backup)?);
        agent::require_free(&dir, r.min_free_bytes)?;
    }
    let m = store.compress(&r.backup, &opts, ctl)?;
    Ok(BackupView::new(&store, &m))
}

pub(crate) fn verify(r: VerifyReq, ctl: &Control) -> Result<Vec<crate::catalog::VerifyReport>> {
    store_or_vault("verify", "store", &r.store)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    if let Some(v) = vault_of(&r.store)? {
        return Ok(v.verify(r.backup.as_deref(), ctl)?.reports);
    }
    Store::open(&r.store)?.verify(r.backup.as_deref(), ctl)
}

pub(crate) fn hash(r: HashReq, ctl: &Control) -> Result<HashAnswer> {
    store_dir("hash", &r.store)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    let store = Store::open(&r.store)?;
    let m = store.show(&r.backup)?;
    let mut volumes = BTreeMap::new();
    for v in &m.volumes {
        let files = store.chain_files(&m, &v.name)?;
        volumes.insert(v.name.clone(), agent::chain_hash(&files, ctl)?);
    }
    Ok(HashAnswer { backup: r.backup, volumes })
}

pub(crate) fn delete(r: BackupRef) -> Result<crate::catalog::DeleteOutcome> {
    store_or_vault("delete", "store", &r.store)?;
    if let Some(v) = vault_of(&r.store)? {
        return v.delete(&r.backup);
    }
    Store::open(&r.store)?.delete(&r.backup)
}

/// The request of `sync`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SyncReq {
    /// The store directory the backups are sent from.
    store: PathBuf,
    /// The vault they are sent to: `s3://bucket/prefix` (endpoint, region
    /// and credentials from the usual AWS environment variables and files).
    to: String,
    /// Only this VM's backups.
    #[serde(default)]
    vm: Option<String>,
    /// Read (and send) at most this many MB/s; 0 or absent = no limit.
    #[serde(default)]
    rate_limit_mbps: u64,
    /// Parts of a multipart upload in flight at once, 1 to 16 (default 2;
    /// each holds 5 MiB).
    #[serde(default)]
    parallel_parts: Option<u32>,
    /// Also read every object of the vault's backups of the VMs synced and
    /// hold it against its manifest's hash; an object whose bytes changed
    /// is sent again like a lost one (default false: objects are only
    /// listed, which finds those gone or of another length).
    #[serde(default)]
    check: bool,
    /// The time budget in seconds; 0 or absent = none.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

pub(crate) fn sync(r: SyncReq, ctl: &Control) -> Result<SyncReport> {
    store_dir("sync", &r.store)?;
    let ctl = &agent::budget(ctl, r.timeout_secs);
    if !crate::vault::is_vault(&r.to) {
        return Err(KnibError::invalid(format!("request of sync: field `to`: {:?} is not s3://BUCKET/PREFIX", r.to)));
    }
    let parallel = r.parallel_parts.unwrap_or(crate::vault::DEFAULT_PARALLEL_PARTS as u32);
    if !(1..=16).contains(&parallel) {
        return Err(KnibError::invalid(format!("request of sync: field `parallel_parts`: {parallel} is not 1 to 16")));
    }
    let store = Store::open(&r.store)?;
    let vault = Vault::open(&r.to)?;
    let opts = SyncOptions {
        vm: r.vm,
        parallel_parts: parallel as usize,
        rate_limit_mbps: r.rate_limit_mbps,
        check: r.check,
        ..Default::default()
    };
    vault.sync_from(&store, &opts, ctl)
}
