//! Group backups: one backup of each of several VMs at a common instant
//! (issue 17), recorded as a group in the store.
//!
//! # The steps
//!
//! 1. Every member is planned at once, each in its own thread, as a
//!    backup of its own (its VM's lock, its journal, its chain's decision):
//!    a libvirt domain (running or stopped) through
//!    `Store::backup_domain_with`, a plain-disk VM through
//!    `Store::backup_with`. Each domain stops before its snapshot. If any
//!    member fails there, every member is let go with an error: nothing was
//!    snapshotted, nothing is published, every VM is as it was.
//! 2. With `quiesce`, every running member whose domain has a guest agent
//!    channel is frozen (`guest-fsfreeze-freeze`), all freezes sent in
//!    parallel; members without a channel are not quiesced (the record says
//!    so). A freeze that fails, or the whole freezing and snapshotting that
//!    outlasts `freeze_timeout_secs`, thaws every guest and fails the
//!    group: the snapshots taken are undone, nothing is published.
//! 3. The disk-only snapshots of all running and stopped domains, in
//!    parallel; then every frozen guest is thawed (always, whatever
//!    happened: every guest a freeze was sent to is sent thaws until it
//!    says it is thawed, see [`crate::libvirt::freeze`]: a freeze that
//!    timed out goes on in the guest). A guest that cannot be thawed fails
//!    the group, the error naming it and `virsh domfsthaw`.
//! 4. The copies and merges of all members, in parallel, at most
//!    `group.max_concurrent_copies` copies at once. Plain-disk VMs
//!    (stopped: their disks do not change) are backed up in this step.
//!    With `on_failure: "rollback"` every member waits, its copies written,
//!    until all are written: if one failed, the others are undone before
//!    they are published. With `"keep"` (the default) each member is
//!    published as it finishes, and one that fails is reported in the
//!    record beside the others.
//!
//! The time from the first freeze to the last thaw and the spread of the
//! members' snapshot instants are measured and recorded.
//!
//! # Store layout and invariants
//!
//! ```text
//! STORE/groups/<id>.json          the record of a finished group backup
//! STORE/groups/.<id>.journal.json the members and their backup ids, while
//!                                 it runs (a crash leaves it for recover)
//! ```
//!
//! - The journal is written before any member starts; the record replaces
//!   it when all are done. Each member's own crash safety is its own (the
//!   domain's journal, the plain disk's marker).
//! - [`Store::recover_groups`] finishes every group a crash interrupted:
//!   each member domain is recovered ([`Store::recover_domain`]), then the
//!   record says which members' backups exist; with `"rollback"`, a group
//!   not all of whose members were published has the published ones
//!   deleted (chain-safely) instead. A group whose record was written
//!   before the crash (its journal not yet removed) finished: only its
//!   journal is removed, its record and its members' backups are left as
//!   they are (some may have been deleted since).
//! - Everything read back (records, journals) is untrusted: unknown keys are
//!   refused, every name is checked, a record must sit at its own id.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BackupOptions, DiskSpec, Store};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::names;

#[cfg(feature = "libvirt")]
mod gate;
#[cfg(feature = "libvirt")]
mod recover;
#[cfg(feature = "libvirt")]
mod take;

/// The record's schema version.
pub const GROUP_SCHEMA: u32 = 1;

/// The default bound on freezing and snapshotting, in seconds.
pub const DEFAULT_FREEZE_TIMEOUT_SECS: u64 = 30;

/// What a group backup does when a member fails after the snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Publish the members that succeeded; report the failed one.
    #[default]
    Keep,
    /// Publish no member unless every member's copy succeeded.
    Rollback,
}

/// One VM of a group backup.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// A libvirt domain (running or stopped), by name.
    #[serde(default)]
    pub domain: Option<String>,
    /// A plain-disk VM's name (with `disks`).
    #[serde(default)]
    pub vm: Option<String>,
    /// The plain-disk VM's disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
}

impl MemberSpec {
    /// The member's name in the store.
    pub fn name(&self) -> Result<&str> {
        match (&self.domain, &self.vm) {
            (Some(d), None) if self.disks.is_empty() => Ok(d),
            (None, Some(v)) if !self.disks.is_empty() => Ok(v),
            _ => Err(KnibError::invalid("a group member is a `domain`, or a `vm` with `disks`")),
        }
    }
}

/// How a group backup is taken.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Each member's backup options (full, chain size, compression).
    pub backup: BackupOptions,
    /// Freeze the guests that have a guest agent channel.
    pub quiesce: bool,
    /// The bound on freezing and snapshotting all members while guests are
    /// frozen (at least 1 s; a group with no guest frozen is not bounded).
    pub freeze_timeout: Duration,
    /// What a failure after the snapshots does.
    pub on_failure: OnFailure,
    /// The libvirt URI.
    pub connect: Option<String>,
    /// Members copied at once after the thaw (at least 1); `None`: the
    /// store's `group.max_concurrent_copies` setting.
    pub max_parallel: Option<usize>,
}

impl GroupOptions {
    /// Whether these options can run a group backup: at least one member
    /// copied at once, a freeze bound of at least a second, and
    /// `check_output` only with `compress`.
    pub fn check(&self) -> Result<()> {
        self.backup.refuse_check_uncompressed("a group backup")?;
        if self.max_parallel == Some(0) {
            return Err(KnibError::invalid("a group backup copies at least one member at once: max_parallel is 0"));
        }
        if self.freeze_timeout.is_zero() {
            return Err(KnibError::invalid("a group backup's freeze timeout must be at least 1 second, not 0"));
        }
        Ok(())
    }
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            backup: BackupOptions::default(),
            quiesce: false,
            freeze_timeout: Duration::from_secs(DEFAULT_FREEZE_TIMEOUT_SECS),
            on_failure: OnFailure::Keep,
            connect: None,
            max_parallel: None,
        }
    }
}

/// One member in a group's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupMember {
    /// The VM's name in the store.
    pub vm: String,
    /// Whether it is a libvirt domain (else a plain-disk VM).
    pub domain: bool,
    /// Its backup's id (planned in a journal; in a record, published).
    pub backup: Option<String>,
    /// Whether the VM was running at its snapshot.
    #[serde(default)]
    pub running: bool,
    /// Whether its guest was frozen for the snapshot.
    #[serde(default)]
    pub quiesced: bool,
    /// When its snapshot was done (UTC).
    #[serde(default)]
    pub snapshot_at: Option<String>,
    /// Why it has no backup.
    #[serde(default)]
    pub error: Option<String>,
}

/// A member of a partial group that a group restore left out: it has no
/// backup.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct SkippedMember {
    /// The member VM.
    pub vm: String,
    /// Why it has no backup (the group record's error).
    pub error: Option<String>,
}

/// One volume a group restore wrote.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RestoredMember {
    /// The member VM.
    pub vm: String,
    /// Its backup.
    pub backup: String,
    /// The volume.
    pub volume: String,
    /// The file written.
    pub path: PathBuf,
}

/// A group backup: its record in the store (and its journal while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRecord {
    /// Schema version (1).
    pub schema: u32,
    /// The group backup's id.
    pub id: String,
    /// When it started (UTC).
    pub created: String,
    /// `"complete"` (every member backed up), `"partial"` (some failed,
    /// `on_failure: "keep"`) or `"running"` (a journal).
    pub state: String,
    /// The members.
    pub members: Vec<GroupMember>,
    /// Whether quiescing was asked for.
    pub quiesce: bool,
    /// What a failure after the snapshots does.
    pub on_failure: OnFailure,
    /// The group's instant: when the last snapshot was done (UTC).
    #[serde(default)]
    pub instant: Option<String>,
    /// Milliseconds from the first freeze to the last thaw (with quiesce).
    #[serde(default)]
    pub freeze_to_thaw_ms: Option<f64>,
    /// Milliseconds between the first and the last member's snapshot.
    #[serde(default)]
    pub snapshot_skew_ms: Option<f64>,
    /// Whether the record was finished by `recover` after a crash.
    #[serde(default)]
    pub recovered: bool,
}

#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(super) fn group_id() -> String {
    format!("group-{}", super::new_backup_id())
}

impl Store {
    pub(super) fn groups_dir(&self) -> PathBuf {
        self.root.join("groups")
    }

    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(super) fn journal_file(&self, id: &str) -> PathBuf {
        self.groups_dir().join(format!(".{id}.journal.json"))
    }

    pub(super) fn record_file(&self, id: &str) -> PathBuf {
        self.groups_dir().join(format!("{id}.json"))
    }

    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(super) fn save_group(&self, path: &Path, r: &GroupRecord) -> Result<()> {
        self.ensure_dir(Path::new("groups"), "groups directory")?;
        fsio::write_atomic(path, &serde_json::to_vec_pretty(r).expect("a group record serializes"))
    }

    /// Read a record or journal (`rel` under the store), checked.
    pub(super) fn load_group(&self, rel: &Path, id: &str) -> Result<Option<GroupRecord>> {
        let Some(text) = super::confine::read(&self.root, rel, "group record")? else {
            return Ok(None);
        };
        let path = self.root.join(rel);
        let r: GroupRecord = crate::json::from_slice(&text)
            .map_err(|e| KnibError::corrupt(format!("group record {} is corrupted: {e}", path.display())))?;
        let bad = |m: String| KnibError::corrupt(format!("group record {}: {m}", path.display()));
        if r.id != id {
            return Err(bad(format!("it is the record of {}, not of {id}", r.id)));
        }
        if r.schema != GROUP_SCHEMA {
            return Err(bad(format!("schema {} is not {GROUP_SCHEMA}", r.schema)));
        }
        for (i, m) in r.members.iter().enumerate() {
            names::validate("VM name", &m.vm).map_err(|e| bad(e.message))?;
            // knib never takes two backups of one VM in a group (a restore
            // of such a record wrote the VM's files twice, then blamed them).
            if r.members[..i].iter().any(|o| o.vm == m.vm) {
                return Err(bad(format!("VM {} is a member twice", m.vm)));
            }
            if let Some(b) = &m.backup {
                names::validate("backup id", b).map_err(|e| bad(e.message))?;
            }
        }
        Ok(Some(r))
    }

    /// The record of group backup `id`.
    pub fn group(&self, id: &str) -> Result<GroupRecord> {
        names::validate("group id", id)?;
        self.load_group(&Path::new("groups").join(format!("{id}.json")), id)?
            .ok_or_else(|| KnibError::not_found(format!("group backup {id} does not exist in {}", self.root.display())))
    }

    /// Every finished group backup, oldest first (a record that cannot be
    /// read is skipped with a warning).
    pub fn groups(&self) -> Result<Vec<GroupRecord>> {
        let dir = self.groups_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(KnibError::io("cannot list", &dir, e)),
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(id) = n.strip_suffix(".json").filter(|id| !id.starts_with('.')) else { continue };
            match self.group(id) {
                Ok(r) => out.push(r),
                Err(err) => log::warn!("skipping {}: {err}", e.path().display()),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Restore every volume of every member of group `id` to
    /// `to/<vm>/<volume>.<qcow2|raw>` (flattened, the chain's hashes checked
    /// unless `verify` is false), or with `quick` as qcow2 overlays over the
    /// backups. All or none: on a failure the files already written are
    /// removed. A partial group (members without a backup) is refused,
    /// naming them, unless `partial`: then the others are restored and the
    /// members left out are returned beside the volumes written.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_group(
        &self,
        id: &str,
        to: &Path,
        format: crate::qemu_img::ImageFormat,
        quick: bool,
        verify: bool,
        partial: bool,
        ctl: &crate::progress::Control,
    ) -> Result<(Vec<RestoredMember>, Vec<SkippedMember>)> {
        let r = self.group(id)?;
        let skipped: Vec<SkippedMember> = r
            .members
            .iter()
            .filter(|m| m.backup.is_none())
            .map(|m| SkippedMember { vm: m.vm.clone(), error: m.error.clone() })
            .collect();
        if !skipped.is_empty() && !partial {
            let why: Vec<String> =
                skipped.iter().map(|m| format!("{} ({})", m.vm, m.error.as_deref().unwrap_or("no backup"))).collect();
            return Err(KnibError::invalid(format!(
                "group {id} is partial: {} of its {} members have no backup: {}; nothing was restored \
                 (ask for a partial restore to restore the others)",
                skipped.len(),
                r.members.len(),
                why.join("; ")
            )));
        }
        let mut out: Vec<RestoredMember> = Vec::new();
        let result = (|| -> Result<()> {
            for m in &r.members {
                let Some(b) = &m.backup else { continue };
                let manifest = self.show(b).map_err(|e| e.context(format!("group {id}: member {}", m.vm)))?;
                member_of(id, m, &manifest)?;
                let dir = to.join(&m.vm);
                fsio::create_dir_all_durable(&dir)?;
                for v in &manifest.volumes {
                    let ext = if quick { "qcow2" } else { format.as_str() };
                    let path = dir.join(format!("{}.{ext}", v.name));
                    if quick {
                        self.quick_restore_overlay(b, &v.name, &path, ctl)?;
                    } else {
                        self.restore_with(b, &v.name, &path, format, verify, ctl)?;
                    }
                    out.push(RestoredMember { vm: m.vm.clone(), backup: b.clone(), volume: v.name.clone(), path });
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for f in &out {
                let _ = fsio::remove_if_exists(&f.path);
            }
            return Err(e.context(format!("restore of group {id} (nothing was left written)")));
        }
        Ok((out, skipped))
    }

    /// Delete every member's backup of group `id` (chain-safely, as
    /// [`Store::delete`]), then its record.
    pub fn delete_group(&self, id: &str) -> Result<Vec<super::DeleteOutcome>> {
        let r = self.group(id)?;
        // Every member's backup is checked before any is deleted.
        for m in &r.members {
            if let Some(b) = &m.backup {
                match self.find(b) {
                    Ok(manifest) => member_of(id, m, &manifest)?,
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(e.context(format!("group {id}: member {}", m.vm))),
                }
            }
        }
        let mut out = Vec::new();
        let mut r = r;
        let mut deleted: Vec<String> = Vec::new();
        for i in 0..r.members.len() {
            let Some(b) = r.members[i].backup.clone() else { continue };
            let vm = r.members[i].vm.clone();
            match self.delete(&b) {
                Ok(o) => out.push(o),
                Err(e) if e.kind == ErrorKind::NotFound => log::warn!("group {id}: backup {b} of {vm} is gone already"),
                Err(e) if deleted.is_empty() => return Err(e.context(format!("group {id}: member {vm}"))),
                Err(e) => {
                    // The record says what is left: the members deleted so
                    // far have no backup, and the group is partial.
                    let why = format!("deleted by a group delete that stopped at member {vm}");
                    for m in r.members.iter_mut().filter(|m| m.backup.as_ref().is_some_and(|b| deleted.contains(b))) {
                        m.backup = None;
                        m.error = Some(why.clone());
                    }
                    r.state = "partial".into();
                    self.save_group(&self.record_file(id), &r)?;
                    return Err(e.context(format!(
                        "group {id}: member {vm} (the backups of the members before it were deleted: {}; the \
                         group's record now says so)",
                        deleted.join(", ")
                    )));
                }
            }
            deleted.push(b);
        }
        fsio::remove_if_exists(&self.record_file(id))?;
        Ok(out)
    }
}

/// Fail unless `manifest`, the backup member `m` of group `id` names, is a
/// backup of that member's VM taken in that group (its manifest says so):
/// a record naming another VM's backup, or a backup taken on its own or
/// in another group, was not written by knib, and its restore or delete
/// would act on backups the group never took.
pub(crate) fn member_of(id: &str, m: &GroupMember, manifest: &super::Manifest) -> Result<()> {
    if manifest.vm != m.vm {
        return Err(KnibError::corrupt(format!(
            "group {id}: member {} names backup {}, which is a backup of {}: the group's record was changed; nothing was done",
            m.vm, manifest.id, manifest.vm
        )));
    }
    if manifest.group.as_deref() != Some(id) {
        let taken = match &manifest.group {
            Some(g) => format!("in group {g}"),
            None => "on its own".to_string(),
        };
        return Err(KnibError::corrupt(format!(
            "group {id}: member {} names backup {}, which was taken {taken}: the group's record was changed; nothing was done",
            m.vm, manifest.id
        )));
    }
    Ok(())
}
