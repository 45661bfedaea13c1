//! Which backup the next incremental backup of a VM follows.
//!
//! # Invariants
//!
//! - The parent of an incremental backup is derived from what primary
//!   storage says each disk's delta follows, checked against the published
//!   manifests; `state.json` is only a cache of it (written when a backup is
//!   published and by `recover`, compared and repaired here). A domain's
//!   delta is `<base>.knib-delta-<id>`: its name carries the backup it was
//!   started for. A plain disk's delta is the disk file itself, emptied in
//!   place, so the backup it follows is recorded beside it in
//!   `<disk>.knib-since` ([`crate::engine::take::since_marker_path`]),
//!   written after the backup is published and before the delta is emptied
//!   or created for it.
//! - A delta that follows backup `S` therefore holds every guest write since
//!   `S` (or more, when a crash came between the marker and the emptying).
//!   Any published backup `N` whose chain contains `S` was taken after `S`,
//!   so the writes since `N` are among them: the newest live, non-isolated
//!   such `N` is the parent. This is what makes a crash between publishing
//!   a backup and recording it harmless: the published backup is found
//!   whatever `state.json` says.
//! - When knib cannot tell (a disk on no delta, no marker, a damaged marker,
//!   disks that disagree, a backup the store does not have), the backup is
//!   full: the reason is logged as a warning and recorded in the manifest
//!   (`full_reason`). An incremental backup is never built on a parent the
//!   deltas do not follow.

use std::path::{Path, PathBuf};

use super::{Manifest, Store};
use crate::engine::BackupKind;
use crate::error::{KnibError, Result};
use crate::qcow2::MAX_CHAIN_DEPTH;

/// What a disk's delta follows, as primary storage says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Follows {
    /// The disk runs on no delta (a full backup is needed).
    NoDelta,
    /// The disk runs on a delta, but what it follows cannot be told (why).
    Unknown(String),
    /// What the disks' changes follow cannot be told for the whole VM
    /// (why, naming the disk at fault): its dirty bitmaps do not say.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    Untracked(String),
    /// The delta holds every write since this backup.
    Backup(String),
}

/// What the next backup is.
#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub kind: BackupKind,
    pub parent: Option<Manifest>,
    pub position: u32,
    pub end_of_chain: bool,
    /// Why a full backup is taken where an incremental one was asked for.
    pub full_reason: Option<String>,
}

/// What each of `disks` (name, path) follows: plain disk files of a stopped
/// VM. `on_base` says whether the disk runs on its knib base.
pub(crate) fn follows_of_plain_disks(disks: &[(String, PathBuf, bool)]) -> Vec<(String, Follows)> {
    disks
        .iter()
        .map(|(name, path, on_base)| {
            let f = if !on_base {
                Follows::NoDelta
            } else {
                match crate::engine::take::read_since_marker(path) {
                    Ok(Some(id)) => Follows::Backup(id),
                    Ok(None) => Follows::Unknown(format!(
                        "{} is missing (it is written by this version of knib's catalog after each backup)",
                        crate::engine::take::since_marker_path(path).display()
                    )),
                    Err(e) => Follows::Unknown(e.message),
                }
            };
            (name.clone(), f)
        })
        .collect()
}

impl Store {
    /// Decide full, incremental or isolated, the parent, the position in
    /// the chain and whether this backup ends it, from `sources` (volume
    /// name, source path as the manifests record it) and what each disk's
    /// delta follows.
    pub(crate) fn decide(
        &self,
        vm: &str,
        sources: &[(String, PathBuf)],
        opts: &super::BackupOptions,
        follows: &[(String, Follows)],
    ) -> Result<Decision> {
        let all = if opts.isolated || opts.full || opts.chain_size == 1 { Vec::new() } else { self.manifests(vm)? };
        let note_head = |head: &Manifest, follows_id: &str| {
            match self.load_state(vm) {
            Ok(st) if st.head.as_deref() == Some(head.id.as_str()) => {}
            Ok(st) => log::warn!(
                "state of {vm} names {} as the chain head, but the disks' deltas follow backup {}: continuing from {} (the state is repaired when this backup is published)",
                st.head.as_deref().unwrap_or("no backup"),
                follows_id,
                head.id
            ),
            Err(e) => log::warn!("{e}: the chain head is taken from the disks' deltas ({})", head.id),
        }
        };
        let check_chain = |head: &Manifest| -> Result<()> {
            for (name, _) in sources {
                self.chain_files(head, name).map_err(|e: KnibError| {
                    e.context("the chain to continue is damaged; take a full backup with --full")
                })?;
            }
            Ok(())
        };
        decide_among(vm, &all, "this store", sources, opts, follows, &note_head, &check_chain)
    }
}

/// [`Store::decide`] among the backups `all` of `vm` (oldest first) kept
/// in `place` ("this store", or a vault), with `note_head` called with the
/// head the deltas follow (and the first id they follow) and
/// `check_chain` with the head an incremental backup would continue.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_among(
    vm: &str,
    all: &[Manifest],
    place: &str,
    sources: &[(String, PathBuf)],
    opts: &super::BackupOptions,
    follows: &[(String, Follows)],
    note_head: &dyn Fn(&Manifest, &str),
    check_chain: &dyn Fn(&Manifest) -> Result<()>,
) -> Result<Decision> {
    if opts.full && opts.isolated {
        return Err(KnibError::invalid(format!(
            "backup of {vm}: full and isolated exclude each other (an isolated backup is a full one outside the chain)"
        )));
    }
    // At most N backups per chain, and never more than a qcow2 chain knib
    // reads (a 65th backup of an "unlimited" chain could not be restored).
    let limit = match opts.chain_size {
        n if n >= 1 => n.min(MAX_CHAIN_DEPTH as i64),
        _ => MAX_CHAIN_DEPTH as i64,
    };
    let decision = |kind: BackupKind, parent: Option<Manifest>, full_reason: Option<String>| {
        let position = parent.as_ref().map(|p: &Manifest| p.position.saturating_add(1)).unwrap_or(1);
        let end_of_chain = kind != BackupKind::Isolated && position as i64 >= limit;
        if let Some(why) = &full_reason {
            log::warn!("backup of {vm}: taking a full backup: {why}");
        }
        let ends = if end_of_chain { ", which ends its chain" } else { "" };
        log::info!("backup of {vm}: {} backup at position {position}{ends}", kind.as_str());
        Decision { kind, parent, position, end_of_chain, full_reason }
    };
    if opts.isolated {
        return Ok(decision(BackupKind::Isolated, None, None));
    }
    if opts.full || opts.chain_size == 1 {
        return Ok(decision(BackupKind::Full, None, None));
    }
    // No chain to continue, or the newest backup closed it: a full
    // backup is what is expected.
    match all.iter().rev().find(|m| !m.removed && m.kind != BackupKind::Isolated) {
        // Deltas that follow a backup the store cannot show (its
        // manifest unreadable or gone): full, saying so.
        None => {
            let why = follows.iter().find_map(|(disk, f)| match f {
                Follows::Backup(id) => Some(format!(
                    "the delta of disk {disk} follows backup {id}, and {vm} has no readable backup in {place} (a manifest that does not parse is skipped)"
                )),
                _ => None,
            });
            return Ok(decision(BackupKind::Full, None, why));
        }
        Some(m) if m.end_of_chain => return Ok(decision(BackupKind::Full, None, None)),
        Some(_) => {}
    }
    let full = |why: String| Ok(decision(BackupKind::Full, None, Some(why)));
    let mut ids: Vec<(&str, &str)> = Vec::new();
    for (disk, f) in follows {
        match f {
            Follows::NoDelta => {
                return full(format!("disk {disk} does not run on a delta since a backup"));
            }
            Follows::Unknown(why) => {
                return full(format!("cannot tell which backup the delta of disk {disk} follows: {why}"));
            }
            Follows::Untracked(why) => {
                return full(format!("cannot tell which backup the disks' changes follow: {why}"));
            }
            Follows::Backup(id) => ids.push((disk, id)),
        }
    }
    for (disk, id) in &ids {
        if !all.iter().any(|m| m.id == *id) {
            return full(format!(
                "the delta of disk {disk} follows backup {id}, which is not a backup of {vm} in {place} (deleted, or taken into another store)"
            ));
        }
    }
    let in_chain = |m: &Manifest, id: &str| {
        let mut cur = Some(m);
        for _ in 0..=all.len() {
            match cur {
                Some(c) if c.id == id => return true,
                Some(c) => cur = c.parent.as_ref().and_then(|p| all.iter().find(|x| &x.id == p)),
                None => return false,
            }
        }
        false
    };
    let Some(head) = all
        .iter()
        .rev()
        .find(|m| !m.removed && m.kind != BackupKind::Isolated && ids.iter().all(|(_, id)| in_chain(m, id)))
        .cloned()
    else {
        let list: Vec<String> = ids.iter().map(|(d, id)| format!("disk {d} follows {id}")).collect();
        return full(format!(
            "no backup of {vm} continues what the deltas follow ({}): it was deleted",
            list.join(", ")
        ));
    };
    note_head(&head, ids.first().map(|(_, id)| *id).unwrap_or(""));
    if head.end_of_chain {
        return Ok(decision(BackupKind::Full, None, None));
    }
    let same_disks = head.volumes.len() == sources.len()
        && sources
            .iter()
            .all(|(name, path)| head.volumes.iter().any(|v| &v.name == name && Path::new(&v.source) == path.as_path()));
    if !same_disks {
        return full(format!("the disks are not those of backup {}, the head of the chain", head.id));
    }
    if (head.position as i64) >= limit {
        return Ok(decision(BackupKind::Full, None, None));
    }
    check_chain(&head)?;
    Ok(decision(BackupKind::Incremental, Some(head), None))
}
