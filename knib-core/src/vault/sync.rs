//! Sending a store's backups to a vault: only what the vault lacks, each
//! chain's parent before its children, each backup's objects complete
//! before its manifest (written last, conditionally created).
//!
//! # Invariants
//!
//! - A volume file larger than one part goes up as a multipart upload: its
//!   id is recorded under `uploads/<vm>/<id>/` before the first part, parts
//!   are read in order and sent [`SyncOptions::parallel_parts`] at a time
//!   (memory: at most that many parts; parts grow past
//!   [`SyncOptions::part_size`] only for a file that would take more than
//!   S3's 10,000 parts, above 48.8 GiB at 5 MiB), and the record is
//!   removed once the upload is completed or aborted. A sync first aborts every recorded
//!   upload of the VMs it sends (left by a sync that was killed), removes
//!   the objects of their backups that have no manifest (left by a direct
//!   backup that was killed) and sends those backups again.
//! - The bytes sent are hashed as they are read; a file whose recorded
//!   hash (from the backup, or a verify) differs is not sent: the local
//!   copy changed since it was written, and that is a `corrupt` error.
//! - The local VM's lock is held while its backups are read, so a
//!   compression cannot replace a file under the sync.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::Vault;
use crate::catalog::{Manifest, Store};
use crate::error::{ErrorKind, KnibError, Origin, Result};
use crate::progress::Control;

/// How a sync sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOptions {
    /// Only this VM's backups; `None`: every VM of the store.
    pub vm: Option<String>,
    /// Bytes per part of a multipart upload (at least 5 MiB, S3's least).
    pub part_size: usize,
    /// Parts in flight at once.
    pub parallel_parts: usize,
    /// Read (and so send) at most this many MB (10^6 bytes) per second; 0: no limit.
    pub rate_limit_mbps: u64,
    /// Also read every object of the vault's backups of the VMs synced
    /// and hold it against its manifest's hash: an object whose bytes
    /// changed (of the right length, which a listing alone cannot tell) is
    /// sent again as a lost one. Off by default: it reads the whole vault
    /// part of those VMs.
    pub check: bool,
}

/// The default part size: S3's least, 5 MiB (the `sync.part_size_mib`
/// setting's default).
pub const DEFAULT_PART_SIZE: usize = (crate::catalog::settings::DEFAULT_SYNC_PART_SIZE_MIB as usize) << 20;
/// The default number of parts filled or in flight (the
/// `sync.parallel_parts` setting's default).
pub const DEFAULT_PARALLEL_PARTS: usize = crate::catalog::settings::DEFAULT_SYNC_PARALLEL_PARTS as usize;

const _: () = assert!(DEFAULT_PART_SIZE == MIN_PART);

impl Default for SyncOptions {
    /// Parts of 5 MiB, 2 read or in flight: a sync holds at most 10 MiB of
    /// parts, and the whole process stays under the 32 MiB peak of any
    /// operation (issue 18).
    fn default() -> Self {
        SyncOptions {
            vm: None,
            part_size: DEFAULT_PART_SIZE,
            parallel_parts: DEFAULT_PARALLEL_PARTS,
            rate_limit_mbps: 0,
            check: false,
        }
    }
}

impl SyncOptions {
    /// The default of a backup written straight to the vault: parts of
    /// 5 MiB, 3 filled or in flight (so that 2 are sent while the copy
    /// fills the next: filling takes as long as the copy, where a sync's
    /// read of a part is quick). The parts are held in spool files, at
    /// most 15 MiB of them (20 MiB for a compressed image, whose first
    /// part is kept until its header is written), and sent from there:
    /// its upload holds 1.75 MiB of memory at most beside the copy's own
    /// ([`super::VaultSink::bound`]).
    pub fn direct() -> Self {
        SyncOptions { parallel_parts: 3, ..SyncOptions::default() }
    }
}

/// S3's most parts in one multipart upload.
pub(super) const MAX_PARTS: u64 = 10_000;

/// The most bytes an S3 object may hold (5 TiB).
pub(super) const MAX_OBJECT_BYTES: u64 = 5 << 40;

/// The part size for a file of `len` bytes: `part_size`, or larger (whole
/// MiB) when `len` would take more than [`MAX_PARTS`] parts.
pub(super) fn part_size_for(part_size: usize, len: u64) -> usize {
    let least = len.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    part_size.max(least as usize)
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SyncReport {
    /// Backups sent, in the order sent (parents first).
    pub sent: Vec<String>,
    /// Backups the vault already had.
    pub present: Vec<String>,
    /// Bytes of volume files sent.
    pub bytes_sent: u64,
    /// Interrupted uploads found and aborted.
    pub aborted_uploads: usize,
    /// Backups the vault had whose objects were lost (gone, or of another
    /// length than their manifest's) and were sent again from the store.
    #[serde(default)]
    pub repaired: Vec<String>,
    /// Objects lost from backups the vault has that this store cannot send
    /// again (it has no such backup, or its file is not the one the
    /// vault's manifest describes), one line each: those backups cannot be
    /// restored from the vault (`knib verify` says the same).
    #[serde(default)]
    pub damaged: Vec<String>,
    /// The backups among `damaged` that this store has, whose file could
    /// not mend the vault's (it is not the one sent): a sync job fails on
    /// them (`knib sync` exits `corrupt`). Damage to backups only the vault
    /// keeps is reported in `damaged` alone (no sync of this store can mend
    /// it, and a job failing on it would fail for good).
    #[serde(default)]
    pub unmended: Vec<String>,
    /// Bytes of the vault's objects read and checked against their hashes
    /// (with [`SyncOptions::check`]; 0 without).
    #[serde(default)]
    pub bytes_checked: u64,
}

/// One sync at work: the store it sends from, how, and what it did so far.
struct SyncRun<'a> {
    store: &'a Store,
    opts: &'a SyncOptions,
    ctl: &'a Control,
    report: SyncReport,
}

/// The record of an upload in progress.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadRecord {
    pub(super) key: String,
    pub(super) upload_id: String,
}

/// S3's least part size (but the last).
pub(super) const MIN_PART: usize = 5 << 20;

impl Vault {
    /// Send every backup of `store` (or of one VM) that the vault lacks.
    /// A sync of a store of several VMs goes on past a VM it cannot send
    /// (busy, its backups damaged, missing or unreadable), then fails
    /// naming every VM left and what was done (see `left_error`); an error
    /// of the vault itself, a cancel or the time budget ends it at once.
    pub fn sync_from(&self, store: &Store, opts: &SyncOptions, ctl: &Control) -> Result<SyncReport> {
        if opts.part_size < MIN_PART || opts.part_size > (512 << 20) {
            return Err(KnibError::invalid(format!("part size {} is not between 5 MiB and 512 MiB", opts.part_size)));
        }
        let vms = match &opts.vm {
            Some(v) => vec![v.clone()],
            None => store.vms()?,
        };
        let mut run = SyncRun { store, opts, ctl, report: SyncReport::default() };
        // A sync of the whole store goes on past a VM it cannot send (busy
        // with another operation, its backups damaged, missing or
        // unreadable in the store): the others are sent, then the sync
        // fails naming each VM left. What would fail every VM alike ends
        // it at once: the vault unreachable, the credentials refused, the
        // bucket missing (the vault's own I/O and not-found errors), a
        // cancel, the time budget.
        let whole = opts.vm.is_none() && vms.len() > 1;
        let vault_wide = |e: &KnibError| {
            matches!(e.kind, ErrorKind::Cancelled | ErrorKind::Timeout)
                || (matches!(e.kind, ErrorKind::Io | ErrorKind::NotFound) && e.origin == Origin::Vault)
        };
        let mut left: Vec<(String, KnibError)> = Vec::new();
        for vm in &vms {
            match self.sync_vm(&mut run, vm) {
                Ok(()) => {}
                Err(e) if whole && !vault_wide(&e) => {
                    log::warn!("sync to {}: VM {vm} is left for the next sync: {e}", self.location());
                    left.push((vm.clone(), e));
                }
                Err(e) => return Err(e),
            }
        }
        if left.is_empty() {
            return Ok(run.report);
        }
        Err(self.left_error(&left, vms.len(), &run.report))
    }

    /// The error of a whole-store sync that left the VMs of `left`: the
    /// kind of the gravest (damage before refusal before the rest before
    /// busy; `corrupt` whenever the vault holds backups the store could
    /// not mend, as `knib sync` exits then), and what was done meanwhile.
    fn left_error(&self, left: &[(String, KnibError)], vms: usize, r: &SyncReport) -> KnibError {
        let grave = |k: ErrorKind| match k {
            ErrorKind::Corrupt => 0,
            ErrorKind::InvalidInput => 1,
            ErrorKind::Busy => 3,
            _ => 2,
        };
        let kind = if r.unmended.is_empty() {
            left.iter().map(|(_, e)| e.kind).min_by_key(|k| grave(*k)).unwrap_or(ErrorKind::Io)
        } else {
            ErrorKind::Corrupt
        };
        let each: Vec<String> = left.iter().map(|(vm, e)| format!("VM {vm}: {e}")).collect();
        let mut done = format!(
            "sent: {}; {} present",
            if r.sent.is_empty() { "nothing".to_string() } else { r.sent.join(", ") },
            r.present.len()
        );
        if !r.repaired.is_empty() {
            done.push_str(&format!("; sent again the lost objects of {}", r.repaired.join(", ")));
        }
        for d in &r.damaged {
            done.push_str(&format!("; DAMAGED in the vault, not repaired: {d}"));
        }
        if !r.unmended.is_empty() {
            done.push_str(&format!(
                "; the vault holds backups this store could not mend ({}): they cannot be restored from it",
                r.unmended.join(", ")
            ));
        }
        KnibError::new(
            kind,
            format!(
                "the sync to {} left {} of the store's {vms} VMs unsent: {}; {done}",
                self.location(),
                left.len(),
                each.join("; ")
            ),
        )
    }

    fn sync_vm(&self, run: &mut SyncRun<'_>, vm: &str) -> Result<()> {
        let SyncRun { store, opts, ctl, .. } = *run;
        let local = store.manifests(vm)?;
        // A VM the store has no backup of is left alone, unless it was
        // asked for: then what interrupted uploads (or a delete killed
        // part way) left in the vault is removed, as the busy error of a
        // vault delete advises (a site whose store is gone had no other
        // way out).
        if local.is_empty() && opts.vm.as_deref() != Some(vm) {
            return Ok(());
        }
        let _lock = store.lock_vm(vm, &format!("sync of {vm} to vault {}", self.location()))?;
        run.report.aborted_uploads += self.abort_recorded(vm)?;
        self.remove_unfinished(vm)?;
        let local = store.manifests(vm)?;
        let (in_vault, unreadable) = self.scan_backups(vm)?;
        self.send_lost_objects(run, vm, &local, &in_vault)?;
        let have: std::collections::BTreeSet<String> = in_vault.into_iter().map(|m| m.id).collect();
        // What to send: every live backup the vault lacks, and the
        // ancestors it lacks (removed ones too: their children need them).
        let mut needed: Vec<&Manifest> = Vec::new();
        for m in local.iter().filter(|m| !m.removed) {
            let mut cur = Some(m);
            let mut path = Vec::new();
            while let Some(c) = cur {
                if have.contains(&c.id)
                    || needed.iter().any(|n| n.id == c.id)
                    || path.iter().any(|p: &&Manifest| p.id == c.id)
                {
                    break;
                }
                if unreadable.contains(&c.id) {
                    // Sending it again would overwrite objects its manifest
                    // (which may be newer than this knib) describes.
                    return Err(KnibError::corrupt(format!(
                        "vault {}: the manifest of backup {} (vms/{vm}/{}/manifest.json) cannot be read: it is not sent again over it, nor is {}; repair or delete it in the vault",
                        self.location(),
                        c.id,
                        c.id,
                        if c.id == m.id { "anything built on it".to_string() } else { format!("backup {}, built on it", m.id) }
                    )));
                }
                path.push(c);
                cur = match &c.parent {
                    Some(p) => Some(local.iter().find(|x| &x.id == p).ok_or_else(|| {
                        KnibError::corrupt(format!("backup {}: its parent {p} is missing from the store", c.id))
                    })?),
                    None => None,
                };
            }
            // Parents first.
            needed.extend(path.into_iter().rev());
            if have.contains(&m.id) {
                run.report.present.push(m.id.clone());
            }
        }
        for m in needed {
            ctl.check(&format!("sync of {} to the vault", m.id))?;
            self.send_backup(run, m)?;
            run.report.sent.push(m.id.clone());
        }
        Ok(())
    }

    /// The objects of the backups the vault has (`in_vault`, their
    /// manifests read) that are gone or whose length is not their
    /// manifest's (removed by hand or by a lifecycle rule, lost by the
    /// server): each is sent again from the store's backup of that id when
    /// its bytes hash as the vault's manifest says (checked while it is
    /// sent; otherwise its upload is not completed, and the vault's object
    /// is left as it is). What cannot be sent
    /// again goes to the report's `damaged`, with a warning. One listing of
    /// the VM's objects.
    fn send_lost_objects(
        &self,
        run: &mut SyncRun<'_>,
        vm: &str,
        local: &[Manifest],
        in_vault: &[Manifest],
    ) -> Result<()> {
        let SyncRun { store, opts, ctl, .. } = *run;
        let report = &mut run.report;
        if in_vault.is_empty() {
            return Ok(());
        }
        let listed: std::collections::HashMap<String, u64> =
            self.objects_under(&format!("vms/{vm}"))?.into_iter().collect();
        for m in in_vault {
            let mut sent_again = false;
            for v in &m.volumes {
                let rel = Self::volume_rel(m, &v.file);
                let lost = match listed.get(&rel) {
                    Some(&n) if n == v.size && !opts.check => continue,
                    Some(&n) if n == v.size => match self.object_hash(&rel, n, ctl) {
                        Ok(h) => {
                            report.bytes_checked += n;
                            match &v.hash {
                                Some(want) if *want == h => continue,
                                want => format!(
                                    "has hash {h}, its manifest says {} (its bytes changed)",
                                    want.as_deref().unwrap_or("none")
                                ),
                            }
                        }
                        // Removed since it was listed.
                        Err(e) if e.kind == crate::ErrorKind::NotFound => "is gone".to_string(),
                        Err(e) => return Err(e),
                    },
                    Some(&n) => format!("is {n} bytes long, its manifest says {}", v.size),
                    None => "is gone".to_string(),
                };
                let mut damaged = |why: &str, here: bool| {
                    let line = format!("backup {}: object {rel} {lost}, and {why}", m.id);
                    log::warn!("vault {}: {line}", self.location());
                    report.damaged.push(line);
                    if here && !report.unmended.contains(&m.id) {
                        report.unmended.push(m.id.clone());
                    }
                };
                if v.hash.is_none() {
                    damaged(
                        "the vault's manifest has no hash to check a copy against",
                        local.iter().any(|l| l.id == m.id),
                    );
                    continue;
                }
                let Some(mine) = local.iter().find(|l| l.id == m.id) else {
                    damaged("this store has no backup of that id to send it again from", false);
                    continue;
                };
                let Ok(entry) = mine.volume(&v.name) else {
                    damaged("this store's backup of that id has no such volume", true);
                    continue;
                };
                if entry.hash.is_some() && entry.hash != v.hash {
                    damaged("this store's file of it is not the one sent (another hash: compressed since?)", true);
                    continue;
                }
                // A delete of the backup running meanwhile (its manifest
                // goes first) would find the object sent again an orphan.
                if self.load_manifest(vm, &m.id)?.is_none() {
                    log::warn!(
                        "vault {}: backup {} was deleted meanwhile: {rel} is not sent again",
                        self.location(),
                        m.id
                    );
                    sent_again = false;
                    break;
                }
                let file = store.chain_files(mine, &v.name)?.pop().expect("a chain has a file");
                ctl.check(&format!("sync of {} to the vault", m.id))?;
                log::warn!("vault {}: object {rel} {lost}: sending it again from {}", self.location(), file.display());
                let record = format!("uploads/{vm}/{}/{}.json", m.id, v.file);
                // A file of this store that is not the copy sent (damaged
                // here too) never replaces the vault's object, damaged as
                // it may be: its upload is not completed.
                let sent = self.upload_file(store, &file, &rel, &record, v.hash.as_deref(), opts, ctl)?;
                if !sent.written {
                    damaged(
                        &format!(
                            "this store's file of it, {}, is not the one sent either (hash {}, {} bytes): the vault's object is left as it is",
                            file.display(),
                            sent.hash,
                            sent.len
                        ),
                        true,
                    );
                    continue;
                }
                report.bytes_sent += sent.len;
                sent_again = true;
            }
            if sent_again {
                report.repaired.push(m.id.clone());
            }
        }
        Ok(())
    }

    /// The hash of object `rel`, `len` bytes long, read whole.
    fn object_hash(&self, rel: &str, len: u64, ctl: &Control) -> Result<String> {
        super::RemoteObject::whole(Arc::clone(&self.inner), self.key(rel), len).hash_whole(ctl)
    }

    /// Abort every upload recorded for `vm` (left by a sync that stopped),
    /// and remove the records.
    pub(super) fn abort_recorded(&self, vm: &str) -> Result<usize> {
        let mut n = 0;
        for rel in self.keys_under(&format!("uploads/{vm}"))? {
            // A record too large to be one is junk under this VM's uploads:
            // removed below like a record that names no upload of it.
            let text = match self.get_small(&rel, 64 << 10, "upload record") {
                Err(e) if e.kind == crate::ErrorKind::Corrupt => Some(b"{}".to_vec()),
                r => r?,
            };
            if let Some(text) = text {
                match crate::json::from_slice::<UploadRecord>(&text) {
                    Ok(r) if r.key.starts_with(&format!("{}/", self.key(&format!("vms/{vm}")))) => {
                        crate::crashpoint::durable_step(&format!("abort of the interrupted upload of {}", r.key));
                        let s3 = Arc::clone(&self.inner.s3);
                        let key = Key::from(r.key.as_str());
                        let id = r.upload_id.clone();
                        match self.block_on(async move { s3.abort_multipart(&key, &id).await }) {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(self.inner.error("cannot abort an interrupted upload", &e)),
                        }
                        log::warn!("vault {}: aborted the interrupted upload of {}", self.location(), r.key);
                        n += 1;
                    }
                    _ => log::warn!(
                        "vault {}: removing the upload record {rel}, which names no upload of {vm}",
                        self.location()
                    ),
                }
            }
            crate::crashpoint::durable_step(&format!("removal of the upload record {rel}"));
            self.delete_key(&rel)?;
        }
        Ok(n)
    }

    /// Send backup `m` (its parent is in the vault): each volume's file,
    /// then the manifest.
    fn send_backup(&self, run: &mut SyncRun<'_>, m: &Manifest) -> Result<()> {
        let SyncRun { store, opts, ctl, .. } = *run;
        let report = &mut run.report;
        log::info!("vault {}: sending backup {} of {}", self.location(), m.id, m.vm);
        let mut out = m.clone();
        for v in out.volumes.iter_mut() {
            let files = store.chain_files(m, &v.name)?;
            let file = files.last().expect("a chain has a file").clone();
            let rel = Self::volume_rel(m, &v.file);
            let record = format!("uploads/{}/{}/{}.json", m.vm, m.id, v.file);
            // A file whose bytes are not the ones its manifest records is
            // not sent: its upload is not completed, so that no object of
            // the vault is replaced by it (another sync may have sent the
            // backup meanwhile).
            let sent = self.upload_file(store, &file, &rel, &record, v.hash.as_deref(), opts, ctl)?;
            if !sent.written {
                return Err(KnibError::corrupt(format!(
                    "backup {}: file {} has hash {}, its manifest says {}: it changed since it was written; not sent",
                    m.id,
                    file.display(),
                    sent.hash,
                    v.hash.as_deref().unwrap_or_default()
                )));
            }
            v.hash = Some(sent.hash);
            v.size = sent.len;
            report.bytes_sent += sent.len;
        }
        let text = serde_json::to_vec_pretty(&out).expect("a manifest serializes");
        let rel = Self::manifest_rel(&out);
        crate::crashpoint::durable_step(&format!("publishing backup {} in vault {}", m.id, self.location()));
        self.require_objects(&out)?;
        self.require_parent(&out)?;
        match self.put_raw(&rel, text.clone(), PutMode::Create) {
            Ok(()) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                // Another sync sent it meanwhile: the same backup, or not sent.
                let theirs = self.load_manifest(&m.vm, &m.id)?;
                let same = theirs.as_ref().is_some_and(|t| {
                    t.volumes.len() == out.volumes.len()
                        && t.volumes.iter().zip(&out.volumes).all(|(a, b)| a.hash == b.hash && a.size == b.size)
                });
                if !same {
                    return Err(KnibError::corrupt(format!(
                        "vault {}: backup {} has a manifest already whose hashes are not this store's: not sent",
                        self.location(),
                        m.id
                    )));
                }
                log::warn!("vault {}: backup {} was sent meanwhile by another sync", self.location(), m.id);
                Ok(())
            }
            Err(object_store::Error::NotImplemented | object_store::Error::NotSupported { .. }) => {
                log::warn!(
                    "vault {}: the server has no conditional create; the manifest of {} is written unconditionally",
                    self.location(),
                    m.id
                );
                self.put_small(&rel, text, PutMode::Overwrite, "manifest")
            }
            Err(e) => Err(self.inner.error("cannot write manifest", &e)),
        }
    }

    /// Send local file `path` to object `rel`, hashing it as it is read;
    /// its length and hash. When `want` is given and the bytes read hash
    /// otherwise, the object is not written (a single put is not made, a
    /// multipart upload is aborted instead of completed): the bytes hashed
    /// are the bytes that would have been sent, so no change to the file
    /// between a check and the upload can slip through.
    #[allow(clippy::too_many_arguments)]
    fn upload_file(
        &self,
        store: &Store,
        path: &std::path::Path,
        rel: &str,
        record: &str,
        want: Option<&str>,
        opts: &SyncOptions,
        ctl: &Control,
    ) -> Result<Sent> {
        crate::crashpoint::pause_point(&format!("opening {} to send it", path.display()));
        let file = store.open_file(path, "backup file being sent")?;
        let len = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?.len();
        // S3 holds no larger object; a longer file (a sparse one planted in
        // the store, say) would be read in parts of over 500 MiB each.
        if len > MAX_OBJECT_BYTES {
            return Err(KnibError::invalid(format!(
                "backup file {} is {len} bytes long, more than the {MAX_OBJECT_BYTES} bytes (5 TiB) an S3 object may hold; not sent",
                path.display()
            )));
        }
        let mut hasher = Xxh3::new();
        let refused = |hash: &str| want.is_some_and(|w| w != hash);
        let key = self.key(rel);
        let step = format!("sending {}", path.display());
        let start = Instant::now();
        let throttle = |sent: u64| {
            if opts.rate_limit_mbps > 0 {
                let due = Duration::from_secs_f64(sent as f64 / (opts.rate_limit_mbps as f64 * 1e6));
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        };
        let read_part = |off: u64, n: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, off).map_err(|e| KnibError::io("cannot read", path, e))?;
            Ok(buf)
        };
        let part_size = part_size_for(opts.part_size, len);
        if len <= part_size as u64 {
            let data = read_part(0, len as usize)?;
            hasher.update(&data);
            let hash = format!("{:032x}", hasher.digest128());
            if refused(&hash) {
                return Ok(Sent { len, hash, written: false });
            }
            throttle(len);
            crate::crashpoint::durable_step(&format!("upload of {}", path.display()));
            let s3 = Arc::clone(&self.inner.s3);
            let k = key.clone();
            self.block_on(async move { s3.put(&k, PutPayload::from(data)).await })
                .map_err(|e| self.inner.error(&format!("cannot send {}", path.display()), &e))?;
            return Ok(Sent { len, hash, written: true });
        }
        crate::crashpoint::durable_step(&format!("start of the upload of {}", path.display()));
        let s3 = Arc::clone(&self.inner.s3);
        let k = key.clone();
        let id = self
            .block_on(async move { s3.create_multipart(&k).await })
            .map_err(|e| self.inner.error(&format!("cannot start sending {}", path.display()), &e))?;
        let rec =
            serde_json::to_vec(&UploadRecord { key: key.to_string(), upload_id: id.clone() }).expect("serializes");
        let abort = |why: KnibError| -> KnibError {
            let s3 = Arc::clone(&self.inner.s3);
            let (k, i) = (key.clone(), id.clone());
            if let Err(e) = self.block_on(async move { s3.abort_multipart(&k, &i).await }) {
                log::warn!("vault {}: {}", self.location(), self.inner.error("cannot abort an upload", &e));
            } else if let Err(e) = self.delete_key(record) {
                log::warn!("{e}");
            }
            why
        };
        crate::crashpoint::durable_step(&format!("record of the upload of {}", path.display()));
        if let Err(e) = self.put_small(record, rec, PutMode::Overwrite, "upload record") {
            return Err(abort(e));
        }
        let mut in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<PartId>>> = VecDeque::new();
        let mut parts: Vec<PartId> = Vec::new();
        let mut off = 0u64;
        let mut idx = 0usize;
        // The parts still in flight are stopped, and waited for, before the
        // upload is aborted: dropped, their tasks went on (a part landing
        // after the abort left storage behind, and the memory and bandwidth
        // of every part in flight stayed in use after the error).
        let stop = |q: &mut VecDeque<tokio::task::JoinHandle<object_store::Result<PartId>>>| {
            for h in q.drain(..) {
                h.abort();
                let _ = self.block_on(h);
            }
        };
        let wait = |h: tokio::task::JoinHandle<object_store::Result<PartId>>| -> Result<PartId> {
            match self.block_on(h) {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => Err(self.inner.error(&format!("cannot send {}", path.display()), &e)),
                Err(e) => Err(KnibError::internal(format!("a part upload failed: {e}"))),
            }
        };
        while off < len {
            if let Err(e) = ctl.check(&step) {
                stop(&mut in_flight);
                return Err(abort(e));
            }
            ctl.report(&step, off as f64 * 100.0 / len as f64);
            let n = (part_size as u64).min(len - off) as usize;
            let data = match read_part(off, n) {
                Ok(d) => d,
                Err(e) => {
                    stop(&mut in_flight);
                    return Err(abort(e));
                }
            };
            hasher.update(&data);
            let s3 = Arc::clone(&self.inner.s3);
            let (k, i) = (key.clone(), id.clone());
            let part = idx;
            crate::crashpoint::durable_step(&format!("part {part} of {}", path.display()));
            in_flight
                .push_back(self.inner.rt.spawn(async move { s3.put_part(&k, &i, part, PutPayload::from(data)).await }));
            off += n as u64;
            idx += 1;
            throttle(off);
            if in_flight.len() >= opts.parallel_parts.max(1) {
                let h = in_flight.pop_front().expect("a part in flight");
                match wait(h) {
                    Ok(p) => parts.push(p),
                    Err(e) => {
                        stop(&mut in_flight);
                        return Err(abort(e));
                    }
                }
            }
        }
        while let Some(h) = in_flight.pop_front() {
            match wait(h) {
                Ok(p) => parts.push(p),
                Err(e) => {
                    stop(&mut in_flight);
                    return Err(abort(e));
                }
            }
        }
        let hash = format!("{:032x}", hasher.digest128());
        if refused(&hash) {
            log::warn!(
                "vault {}: {} has hash {hash}, not {}: its upload is aborted",
                self.location(),
                path.display(),
                want.unwrap_or_default()
            );
            abort(KnibError::corrupt("hash differs"));
            return Ok(Sent { len, hash, written: false });
        }
        crate::crashpoint::durable_step(&format!("completion of the upload of {}", path.display()));
        let s3 = Arc::clone(&self.inner.s3);
        let (k, i) = (key.clone(), id.clone());
        if let Err(e) = self.block_on(async move { s3.complete_multipart(&k, &i, parts).await }) {
            return Err(abort(self.inner.error(&format!("cannot finish sending {}", path.display()), &e)));
        }
        crate::crashpoint::durable_step(&format!("removal of the upload record of {}", path.display()));
        self.delete_key(record)?;
        Ok(Sent { len, hash, written: true })
    }
}

/// What [`Vault::upload_file`] read and whether it wrote the object.
struct Sent {
    /// Bytes read.
    len: u64,
    /// Their hash.
    hash: String,
    /// False when they did not hash as wanted: nothing was written.
    written: bool,
}
