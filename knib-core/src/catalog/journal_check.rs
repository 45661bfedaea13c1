//! The journal of a domain's backup (`vms/<vm>/journal.json`) is read back
//! from the store, so it is untrusted: before `recover` acts on it, every
//! path in its plan is checked against what knib itself would have written
//! for the domain as it is now.
//!
//! # What a plan must be
//!
//! - its backup id, each disk target and each parent id are plain names
//!   ([`crate::names`]); each target is a disk of the domain, named once;
//! - each disk's `base` is an absolute path in that disk's current chain
//!   (the files libvirt or the qcow2 headers show);
//! - `new_delta` is exactly [`live::delta_path`]`(base, backup id)`, and
//!   `old_delta`, if any, is `<base>.knib-delta-<id>` beside the base for a
//!   plain id: the only files `recover` may merge or delete are knib deltas
//!   of the domain's own disks;
//! - `snapshots` and `grand_children` are empty (the catalog never writes
//!   them: only the agent's requests name VM snapshot deltas and other
//!   branches on the old delta);
//! - `dest` is `<vm>/.<id>.part/<target>.qcow2` or `<vm>/<id>/<target>.qcow2`
//!   (for a backup written to a vault: the vault's key of that file)
//!   (only its tail is checked: the store may have been mounted elsewhere
//!   since, and `recover` does not touch it), and `parent` is
//!   `../<id>/<target>.qcow2`.
//!
//! Anything else is [`crate::ErrorKind::Corrupt`] naming the journal, and
//! nothing is merged or deleted.

use std::path::{Component, Path, PathBuf};

use crate::engine::live::{self, LivePlan, DELTA_MARKER};
use crate::error::{ErrorKind, KnibError, Result};
use crate::names;

/// Whether backup `id` of VM `vm` is published in the store at `root`, as
/// an interrupted backup's recovery decides it (finish or undo): its
/// `vms/<vm>/<id>/manifest.json` is a regular file reached without
/// following any link ([`super::confine`]). A link on the way (a backup
/// directory pointed elsewhere) or a manifest that is no regular file is
/// `corrupt`, naming it, and the recovery changes nothing.
pub(crate) fn published_in_store(root: &Path, vm: &str, id: &str) -> Result<bool> {
    let rel = Path::new("vms").join(vm).join(id).join("manifest.json");
    match super::confine::check(root, &rel, super::confine::Want::File, "manifest") {
        Ok(()) => Ok(true),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Check `plan`, read from `journal`, against the domain's disks (`disks`:
/// each target with its current chain, active file first) and the VM's
/// name `vm`.
pub fn check_plan(
    plan: &LivePlan,
    journal: &Path,
    vm: &str,
    disks: &[(String, Vec<PathBuf>)],
    vault_dest: Option<&dyn Fn(&str) -> PathBuf>,
) -> Result<()> {
    let bad = |what: String| {
        KnibError::corrupt(format!(
            "journal {}: {what}; nothing was merged or deleted (when the domain's disks were changed by hand, \
             `knib recover --discard` sets this backup aside: see the README)",
            journal.display()
        ))
    };
    let name = |field: &str, what: &str, v: &str| {
        names::validate(what, v).map_err(|e| bad(format!("field `{field}`: {}", e.message)))
    };
    name("plan.backup_id", "backup id", &plan.backup_id)?;
    if plan.disks.is_empty() {
        return Err(bad("the plan has no disk".into()));
    }
    let part = Path::new(vm).join(format!(".{}.part", plan.backup_id));
    let published = Path::new(vm).join(&plan.backup_id);
    for (i, d) in plan.disks.iter().enumerate() {
        let field = |f: &str| format!("plan.disks[{i}].{f}");
        name(&field("target"), "disk target", &d.target)?;
        if plan.disks[..i].iter().any(|o| o.target == d.target) {
            return Err(bad(format!("field `{}`: disk {} is listed twice", field("target"), d.target)));
        }
        let chain = disks
            .iter()
            .find(|(t, _)| *t == d.target)
            .map(|(_, c)| c)
            .ok_or_else(|| bad(format!("field `{}`: the domain has no disk {}", field("target"), d.target)))?;
        let clean = |p: &Path| {
            p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        };
        if !clean(&d.base) || !chain.iter().any(|c| c == &d.base) {
            return Err(bad(format!(
                "field `{}`: {} is not a file of disk {}'s chain ({})",
                field("base"),
                d.base.display(),
                d.target,
                chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" <- ")
            )));
        }
        // The base is the file knib's deltas sit on: every layer above it is
        // a knib delta of it. A file further down (a template other VMs
        // share) would have recover remove, as a leftover, a delta of that
        // name beside it that is another VM's.
        let base_name = d.base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let delta_of_base = |c: &PathBuf| {
            c.parent() == d.base.parent()
                && c.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(base_name.as_str()))
                    .is_some_and(|r| r.starts_with(DELTA_MARKER))
        };
        let at = chain.iter().position(|c| c == &d.base).unwrap_or(0);
        if let Some(above) = chain[..at].iter().find(|c| !delta_of_base(c)) {
            return Err(bad(format!(
                "field `{}`: {} is below {} in disk {}'s chain, which is not a knib delta of it: the base is the file knib's deltas sit on",
                field("base"),
                d.base.display(),
                above.display(),
                d.target
            )));
        }
        if !d.snapshots.is_empty() {
            return Err(bad(format!("field `{}`: knib's own backups take no VM snapshot deltas", field("snapshots"))));
        }
        // Only the agent's requests name other branches on the old delta;
        // recover would run `qemu-img info` and `rebase -u` on each.
        if !d.grand_children.is_empty() {
            return Err(bad(format!(
                "field `{}`: knib's own backups re-point no other branch of a snapshot tree",
                field("grand_children")
            )));
        }
        let want = live::delta_path(&d.base, &plan.backup_id);
        if d.new_delta != want {
            return Err(bad(format!(
                "field `{}`: {} is not {}, the delta knib names for this backup",
                field("new_delta"),
                d.new_delta.display(),
                want.display()
            )));
        }
        if let Some(old) = &d.old_delta {
            let base_name = d.base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let ok = old.parent() == d.base.parent()
                && old
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(base_name.as_str()))
                    .and_then(|n| n.strip_prefix(DELTA_MARKER))
                    .is_some_and(|id| names::validate("backup id", id).is_ok());
            if !ok {
                return Err(bad(format!(
                    "field `{}`: {} is not a knib delta of {} (<base>{DELTA_MARKER}<id> beside it)",
                    field("old_delta"),
                    old.display(),
                    d.base.display()
                )));
            }
        }
        let file = format!("{}.qcow2", d.target);
        if let Some(want) = vault_dest {
            if d.dest != want(&d.target) {
                return Err(bad(format!(
                    "field `{}`: {} is not {} of this backup in its vault",
                    field("dest"),
                    d.dest.display(),
                    want(&d.target).display()
                )));
            }
        } else if !clean(&d.dest) || !d.dest.ends_with(part.join(&file)) && !d.dest.ends_with(published.join(&file)) {
            return Err(bad(format!(
                "field `{}`: {} is not {} of this backup in the store",
                field("dest"),
                d.dest.display(),
                file
            )));
        }
        if let Some(p) = &d.parent {
            let id = p
                .strip_prefix("../")
                .and_then(|r| r.strip_suffix(&format!("/{file}")))
                .ok_or_else(|| bad(format!("field `{}`: {p:?} is not ../<parent id>/{file}", field("parent"))))?;
            name(&field("parent"), "backup id", id)?;
        }
    }
    Ok(())
}
