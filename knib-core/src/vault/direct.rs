//! A backup written straight to a vault from the single-pass copy: each
//! volume's qcow2 image goes from the native copy into a [`VaultSink`], a
//! multipart upload, without a local file; the manifest is written last.
//!
//! # Invariants
//!
//! - The backup is taken as a backup into the store is (the store's lock
//!   of the VM is held, the disks' deltas and `.knib-since` markers are
//!   handled the same way), but nothing of it is written to the store: the
//!   chain it continues is the vault's. Its parent must be in the vault:
//!   when the disks' deltas follow a backup that is in the store but not
//!   in the vault, the backup is refused (sync first, or take a full one).
//! - A [`VaultSink`] holds at most `parallel_parts` parts of memory (the
//!   part being filled and those being sent), and one more for a
//!   compressed image: its first part, kept until the end so that the
//!   header can be written into it. Parts are `part_size` bytes; past
//!   [`GROW_AFTER`] parts (an object of more than 24 GiB at 5 MiB) each
//!   further [`GROW_EVERY`] parts double in size, so that an object of up
//!   to 327 GiB at 5 MiB fits in S3's 10,000 parts.
//!   An image of one part goes up as one PUT; a larger one as a multipart
//!   upload recorded under `uploads/` before its first part is sent, as a
//!   sync records them.
//! - Nothing is visible before the manifest: a copy that fails aborts its
//!   upload and removes what the backup had completed; a process killed
//!   part way leaves an upload record, or objects without a manifest, which
//!   the next direct backup (or sync) of the VM removes before it starts.
//! - Every object's hash is that of the bytes sent, in file order; a
//!   compressed image, whose header is written last into the first part,
//!   is hashed by reading the completed object back (one GET of it).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutPayload};
use xxhash_rust::xxh3::Xxh3;

use super::sync::{SyncOptions, UploadRecord, MIN_PART};
use super::Vault;
use crate::catalog::head::{decide_among, follows_of_plain_disks, Decision, Follows};
use crate::catalog::{BackupOptions, DiskSpec, Manifest, Store};
use crate::engine::take::{take_backup_direct, CopiedTo, TakeBackupRequest, VolumeBackup};
use crate::engine::BackupKind;
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::qcow2::Sink;

type PartTask = tokio::task::JoinHandle<object_store::Result<PartId>>;

/// Parts of a [`VaultSink`] sent at the part size asked for.
pub const GROW_AFTER: usize = 5_000;
/// Past [`GROW_AFTER`], the part size doubles every this many parts.
pub const GROW_EVERY: usize = 1_000;

/// A vault object written front to back as a multipart upload: the
/// [`Sink`] of a direct backup's qcow2 writer.
pub struct VaultSink {
    vault: Vault,
    /// The object's key (relative to the prefix), and its upload record's.
    rel: String,
    record: String,
    key: Key,
    part_size: usize,
    parallel: usize,
    /// Whether part 0 is kept until [`VaultSink::finish`] (for
    /// [`VaultSink::patch`]), or sent as soon as a second part is needed.
    keep_first: bool,
    /// Part 0, until it is sent.
    first: Vec<u8>,
    first_sent: bool,
    /// The part being filled (number `next`, from 1 on).
    cur: Vec<u8>,
    next: usize,
    /// The multipart upload, once a second part is needed.
    upload: Option<String>,
    in_flight: VecDeque<(usize, usize, PartTask)>,
    in_flight_bytes: usize,
    parts: Vec<Option<PartId>>,
    hasher: Option<Box<Xxh3>>,
    len: u64,
    peak: usize,
    done: bool,
}

impl std::fmt::Debug for VaultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSink").field("rel", &self.rel).field("len", &self.len).finish_non_exhaustive()
    }
}

impl VaultSink {
    /// A sink writing object `rel` (a `/`-separated path of checked names
    /// under the prefix), its upload recorded at `record`, in parts of
    /// `opts.part_size` bytes, `opts.parallel_parts` of them filled or in
    /// flight at once; with `hash`, every byte appended is hashed in order
    /// and the image is written front to back (part 0 is sent as soon as a
    /// second part is needed: no [`VaultSink::patch`]); without it, part 0
    /// is kept until the end, for the header of a compressed image.
    pub fn new(vault: &Vault, rel: &str, record: &str, opts: &SyncOptions, hash: bool) -> Result<VaultSink> {
        check_part_size(opts.part_size)?;
        Ok(VaultSink {
            vault: vault.clone(),
            rel: rel.to_string(),
            record: record.to_string(),
            key: vault.key(rel),
            part_size: opts.part_size,
            parallel: opts.parallel_parts.max(1),
            keep_first: !hash,
            first: Vec::new(),
            first_sent: false,
            cur: Vec::new(),
            next: 1,
            upload: None,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            parts: Vec::new(),
            hasher: hash.then(|| Box::new(Xxh3::new())),
            len: 0,
            peak: 0,
            done: false,
        })
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most bytes of parts the sink held at once (buffered or in flight).
    pub fn peak_buffered(&self) -> usize {
        self.peak
    }

    /// The most bytes of parts it may hold (in its first
    /// `GROW_AFTER` parts): `parallel_parts * part_size`, one part
    /// more when it keeps part 0 for a patch.
    pub fn bound(&self) -> usize {
        (self.parallel + usize::from(self.keep_first)) * self.part_size
    }

    /// The size of part `idx`: the part size asked for, doubled every
    /// [`GROW_EVERY`] parts past [`GROW_AFTER`].
    fn size_of_part(&self, idx: usize) -> usize {
        let doublings = idx.saturating_sub(GROW_AFTER - 1).div_ceil(GROW_EVERY).min(16) as u32;
        self.part_size << doublings
    }

    fn note_peak(&mut self) {
        let held = self.first.len() + self.cur.len() + self.in_flight_bytes;
        self.peak = self.peak.max(held);
    }

    fn name(&self) -> String {
        self.vault.inner.show(&self.key)
    }

    /// Overwrite `bytes` at `offset`, inside the first part (the header of
    /// a compressed image); the hash taken so far is dropped.
    pub fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let end = offset as usize + bytes.len();
        if self.first_sent || end > self.first.len() {
            return Err(KnibError::internal(format!(
                "{}: a patch of bytes {offset}..{end} is outside the first part ({} bytes)",
                self.name(),
                self.first.len()
            )));
        }
        self.first[offset as usize..end].copy_from_slice(bytes);
        self.hasher = None;
        Ok(())
    }

    /// Start the multipart upload and record it (before its first part).
    fn start(&mut self) -> Result<String> {
        if let Some(id) = &self.upload {
            return Ok(id.clone());
        }
        let name = self.name();
        crate::crashpoint::durable_step(&format!("start of the upload of {name}"));
        let s3 = Arc::clone(&self.vault.inner.s3);
        let k = self.key.clone();
        let id = self
            .vault
            .block_on(async move { s3.create_multipart(&k).await })
            .map_err(|e| self.vault.inner.error(&format!("cannot start sending {name}"), &e))?;
        self.upload = Some(id.clone());
        let rec =
            serde_json::to_vec(&UploadRecord { key: self.key.to_string(), upload_id: id.clone() }).expect("serializes");
        crate::crashpoint::durable_step(&format!("record of the upload of {name}"));
        self.vault.put_small(&self.record, rec, PutMode::Overwrite, "upload record")?;
        Ok(id)
    }

    /// Send part `idx` (`data`), and wait until fewer than
    /// `parallel_parts` are in flight.
    fn send(&mut self, idx: usize, data: Vec<u8>) -> Result<()> {
        let id = self.start()?;
        crate::crashpoint::durable_step(&format!("part {idx} of {}", self.name()));
        let s3 = Arc::clone(&self.vault.inner.s3);
        let k = self.key.clone();
        let n = data.len();
        let task = self.vault.inner.rt.spawn(async move { s3.put_part(&k, &id, idx, PutPayload::from(data)).await });
        self.in_flight.push_back((idx, n, task));
        self.in_flight_bytes += n;
        self.note_peak();
        while self.in_flight.len() >= self.parallel {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let Some((idx, n, task)) = self.in_flight.pop_front() else { return Ok(()) };
        let r = self.vault.block_on(task);
        self.in_flight_bytes -= n;
        let part = match r {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(self.vault.inner.error(&format!("cannot send {}", self.name()), &e)),
            Err(e) => return Err(KnibError::internal(format!("a part upload failed: {e}"))),
        };
        if self.parts.len() <= idx {
            self.parts.resize(idx + 1, None);
        }
        self.parts[idx] = Some(part);
        Ok(())
    }

    fn append_inner(&mut self, mut bytes: &[u8]) -> Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            if !self.keep_first && !self.first_sent && self.first.len() == self.part_size {
                // A second part is needed: part 0 goes now.
                let data = std::mem::take(&mut self.first);
                self.first_sent = true;
                self.send(0, data)?;
            }
            let into_first = !self.first_sent && self.first.len() < self.part_size;
            let size = if into_first { self.part_size } else { self.size_of_part(self.next) };
            let buf = if into_first { &mut self.first } else { &mut self.cur };
            if buf.capacity() == 0 {
                buf.reserve_exact(size);
            }
            let k = (size - buf.len()).min(bytes.len());
            buf.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            self.note_peak();
            if !into_first && self.cur.len() == size {
                let data = std::mem::take(&mut self.cur);
                let idx = self.next;
                self.next += 1;
                self.send(idx, data)?;
            }
        }
        Ok(())
    }

    /// Send what is left, complete the upload and remove its record: the
    /// object's length and, when hashing and not patched, its xxh3-128.
    /// On error the upload is aborted.
    pub fn finish(mut self) -> Result<(u64, Option<String>)> {
        let r = self.finish_inner();
        if r.is_err() {
            self.abort();
        }
        self.done = true;
        r
    }

    fn finish_inner(&mut self) -> Result<(u64, Option<String>)> {
        let name = self.name();
        let hash = self.hasher.take().map(|h| format!("{:032x}", h.digest128()));
        if self.upload.is_none() && self.cur.is_empty() && !self.first_sent {
            // One part: one PUT.
            let data = std::mem::take(&mut self.first);
            crate::crashpoint::durable_step(&format!("upload of {name}"));
            let s3 = Arc::clone(&self.vault.inner.s3);
            let k = self.key.clone();
            self.vault
                .block_on(async move { s3.put(&k, PutPayload::from(data)).await })
                .map_err(|e| self.vault.inner.error(&format!("cannot send {name}"), &e))?;
            return Ok((self.len, hash));
        }
        if !self.cur.is_empty() {
            let data = std::mem::take(&mut self.cur);
            let idx = self.next;
            self.next += 1;
            self.send(idx, data)?;
        }
        if !self.first_sent {
            let first = std::mem::take(&mut self.first);
            self.first_sent = true;
            self.send(0, first)?;
        }
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        let parts: Vec<PartId> = self.parts.drain(..).map(|p| p.expect("every part sent")).collect();
        let id = self.upload.clone().expect("a multipart upload");
        crate::crashpoint::durable_step(&format!("completion of the upload of {name}"));
        let s3 = Arc::clone(&self.vault.inner.s3);
        let k = self.key.clone();
        self.vault
            .block_on(async move { s3.complete_multipart(&k, &id, parts).await })
            .map_err(|e| self.vault.inner.error(&format!("cannot finish sending {name}"), &e))?;
        self.upload = None;
        crate::crashpoint::durable_step(&format!("removal of the upload record of {name}"));
        self.vault.delete_key(&self.record)?;
        Ok((self.len, hash))
    }

    /// Abort the upload (if started) and remove its record; errors are
    /// logged (the next direct backup or sync of the VM cleans up).
    fn abort(&mut self) {
        for (_, _, t) in self.in_flight.drain(..) {
            t.abort();
        }
        self.in_flight_bytes = 0;
        if let Some(id) = self.upload.take() {
            let s3 = Arc::clone(&self.vault.inner.s3);
            let k = self.key.clone();
            match self.vault.block_on(async move { s3.abort_multipart(&k, &id).await }) {
                Ok(()) => {
                    if let Err(e) = self.vault.delete_key(&self.record) {
                        log::warn!("{e}");
                    }
                }
                Err(e) => {
                    log::warn!(
                        "vault {}: {}",
                        self.vault.location(),
                        self.vault.inner.error("cannot abort an upload", &e)
                    )
                }
            }
        }
    }
}

impl Sink for VaultSink {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.append_inner(bytes)
    }
}

impl Drop for VaultSink {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}

fn check_part_size(part_size: usize) -> Result<()> {
    if !(MIN_PART..=(512 << 20)).contains(&part_size) {
        return Err(KnibError::invalid(format!("part size {part_size} is not between 5 MiB and 512 MiB")));
    }
    Ok(())
}

impl Vault {
    /// Take a backup of `vm`'s disks (plain qcow2 files of a stopped VM)
    /// straight into the vault: full or incremental is decided from the
    /// vault's chain and `opts`, as [`Store::backup`] decides it from the
    /// store's; `store` holds the VM's lock and settings (its data path),
    /// nothing of the backup. Each volume is sent as it is copied
    /// ([`VaultSink`], `send`'s part size and parallel parts); the
    /// manifest is written last.
    pub fn backup_direct(
        &self,
        store: &Store,
        vm: &str,
        disks: &[DiskSpec],
        opts: &BackupOptions,
        send: &SyncOptions,
        ctl: &Control,
    ) -> Result<Manifest> {
        check_part_size(send.part_size)?;
        let q = store.qemu_img();
        let on_base = crate::catalog::check_disks(q, vm, disks, ctl)?;
        let _lock = store.lock_vm(vm, &format!("backup of {vm} to vault {}", self.location()))?;
        self.abort_recorded(vm)?;
        self.remove_unfinished(vm)?;

        let sources: Vec<(String, PathBuf)> = disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
        let follows = follows_of_plain_disks(&on_base);
        let all = if opts.isolated || opts.full || opts.chain_size == 1 { Vec::new() } else { self.manifests(vm)? };
        if !opts.isolated && !opts.full && opts.chain_size != 1 {
            let local = store.manifests(vm)?;
            for (disk, f) in &follows {
                if let Follows::Backup(id) = f {
                    if !all.iter().any(|m| &m.id == id) && local.iter().any(|m| &m.id == id && !m.removed) {
                        return Err(KnibError::invalid(format!(
                            "backup of {vm} to vault {}: the delta of disk {disk} follows backup {id}, which is in store {} but not in the vault: send it first (knib sync), or take a full backup (--full)",
                            self.location(),
                            store.root().display()
                        )));
                    }
                }
            }
        }
        let place = format!("vault {}", self.location());
        let Decision { kind, parent, position, end_of_chain, full_reason } =
            decide_among(vm, &all, &place, &sources, opts, &follows, &|_, _| {}, &|_| Ok(()))?;

        let id = crate::catalog::new_backup_id();
        let mut manifest = Manifest::new(&id, vm, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        manifest.full_reason = full_reason;
        let req = TakeBackupRequest {
            volumes: disks
                .iter()
                .map(|d| VolumeBackup {
                    name: d.name.clone(),
                    disk: d.path.clone(),
                    dest: PathBuf::from(self.inner.show(&self.key(&format!("vms/{vm}/{id}/{}.qcow2", d.name)))),
                    parent: parent.as_ref().map(|p| crate::catalog::manifest::parent_file_ref(p, &d.name)),
                })
                .collect(),
            kind,
            end_of_chain,
            data_path: crate::catalog::settings::Settings::load(store.root())?.data_path,
            compress: opts.compress,
        };
        let mut published = false;
        let mut copy_to = |v: &VolumeBackup, copy: &crate::qcow2::CopyOptions, ctl: &Control| -> Result<CopiedTo> {
            let rel = format!("vms/{vm}/{id}/{}.qcow2", v.name);
            let record = format!("uploads/{vm}/{id}/{}.qcow2.json", v.name);
            self.copy_volume(&v.disk, &rel, &record, copy, send, ctl)
        };
        let result = take_backup_direct(q, &req, ctl, &mut copy_to, &mut |vols| {
            manifest.volumes = crate::catalog::volume_entries(vols, disks, parent.as_ref());
            manifest.compression = crate::catalog::compressed_as_copied(vols);
            self.publish_manifest(&manifest)?;
            published = true;
            if kind != BackupKind::Isolated {
                for d in disks {
                    crate::engine::take::write_since_marker(&d.path, &id)?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            if !published {
                if let Err(e) = self.remove_backup_objects(vm, &id) {
                    log::warn!("{e}");
                }
            }
            return Err(e);
        }
        Ok(manifest)
    }

    #[cfg(feature = "libvirt")]
    /// Take a backup of libvirt domain `vm` (running or stopped, by either
    /// method) straight into the vault: the store holds the VM's lock and
    /// its journal (which names the vault), nothing of the backup; the
    /// chain continued is the vault's ([`Store::backup_domain_to`],
    /// [`Store::backup_domain_bitmap_to`]). Each disk is sent as it is
    /// copied, the manifest written last; by the snapshot method the disks
    /// are merged on primary only once it is.
    pub fn backup_domain_direct(
        &self,
        store: &Store,
        vm: &crate::libvirt::Vm,
        opts: &BackupOptions,
        quiesce: bool,
        send: &SyncOptions,
        ctl: &Control,
    ) -> Result<Manifest> {
        check_part_size(send.part_size)?;
        let method = match opts.method {
            Some(m) => m,
            None => store.vm_settings(vm.name())?.backup_method,
        };
        let target = DirectTarget { vault: self, send };
        if method == crate::engine::BackupMethod::Bitmap {
            return store.backup_domain_bitmap_to(vm, opts, quiesce, Some(&target), ctl);
        }
        store.backup_domain_to(vm, opts, quiesce, None, Some(&target), &mut |_| Ok(()), ctl)
    }

    #[cfg(feature = "libvirt")]
    /// Finish or undo an interrupted backup of domain `vm` that was being
    /// written to this vault ([`Store::recover_domain_in`]).
    pub fn recover_domain(
        &self,
        store: &Store,
        vm: &crate::libvirt::Vm,
        ctl: &Control,
    ) -> Result<crate::catalog::live::RecoverOutcome> {
        let send = SyncOptions::direct();
        let target = DirectTarget { vault: self, send: &send };
        store.recover_domain_in(vm, Some(&target), ctl)
    }

    /// One volume's native copy from `disk` into object `rel`: its length,
    /// hash and the guest bytes read.
    fn copy_volume(
        &self,
        disk: &std::path::Path,
        rel: &str,
        record: &str,
        copy: &crate::qcow2::CopyOptions,
        send: &SyncOptions,
        ctl: &Control,
    ) -> Result<CopiedTo> {
        let sink = VaultSink::new(self, rel, record, send, copy.compression.is_none())?;
        // The send's rate limit, as a limit on what the copy reads.
        let copy = crate::qcow2::CopyOptions { rate_limit_mbps: send.rate_limit_mbps, ..copy.clone() };
        crate::crashpoint::durable_step(&format!("copy of {} to the vault", disk.display()));
        let mut done = crate::qcow2::copy_image_to_sink(disk, sink, &copy, ctl, &mut |_| Ok(()))?;
        if let Some(h) = &done.header {
            done.sink.patch(0, h)?;
        }
        log::debug!(
            "vault {}: {rel}: {} bytes, at most {} bytes of parts held (bound {})",
            self.location(),
            done.sink.len(),
            done.sink.peak_buffered(),
            done.sink.bound()
        );
        let (size, hash) = self.finish_sink(rel, done.sink)?;
        Ok(CopiedTo { size, hash, bytes_read: done.report.bytes_read })
    }

    /// Complete object `rel`'s upload: its length and hash (a compressed
    /// image's, whose header went in last, read back once).
    fn finish_sink(&self, rel: &str, sink: VaultSink) -> Result<(u64, String)> {
        let (size, hash) = sink.finish()?;
        let hash = match hash {
            Some(h) => h,
            None => {
                let obj = super::RemoteObject::new(
                    Arc::clone(&self.inner),
                    self.key(rel),
                    size,
                    super::object::BlockCache::new(0),
                    true,
                );
                obj.finish_hash()?.ok_or_else(|| KnibError::internal(format!("{rel} was not hashed")))?
            }
        };
        Ok((size, hash))
    }

    /// Write `m`'s manifest, conditionally created: the backup becomes visible.
    fn publish_manifest(&self, m: &Manifest) -> Result<()> {
        let text = serde_json::to_vec_pretty(m).expect("a manifest serializes");
        let rel = Self::manifest_rel(m);
        crate::crashpoint::durable_step(&format!("publishing backup {} in vault {}", m.id, self.location()));
        match self.put_raw(&rel, text.clone(), PutMode::Create) {
            Ok(()) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Err(KnibError::internal(format!("backup {} exists in vault {} already", m.id, self.location())))
            }
            Err(object_store::Error::NotImplemented | object_store::Error::NotSupported { .. }) => {
                self.put_small(&rel, text, PutMode::Overwrite, "manifest")
            }
            Err(e) => Err(self.inner.error("cannot write manifest", &e)),
        }
    }

    /// Remove every object under `vms/<vm>/<id>/` (a backup whose manifest
    /// was never written).
    fn remove_backup_objects(&self, vm: &str, id: &str) -> Result<()> {
        let prefix = self.key(&format!("vms/{vm}/{id}"));
        let s3 = Arc::clone(&self.inner.s3);
        let listed = self.block_on(async move {
            use futures::TryStreamExt;
            s3.list(Some(&prefix)).try_collect::<Vec<_>>().await
        });
        for o in listed.map_err(|e| self.inner.error("cannot list", &e))? {
            let Some(rel) = self.inner.rel_of(&o.location) else { continue };
            crate::crashpoint::durable_step(&format!("removal of the unfinished {rel}"));
            self.delete_key(&rel)?;
        }
        Ok(())
    }

    /// Remove the objects of `vm`'s backups that have no manifest (left by
    /// a direct backup that was killed); recorded uploads must have been
    /// aborted first. Returns how many backups were cleaned up.
    pub(super) fn remove_unfinished(&self, vm: &str) -> Result<usize> {
        let (have, unreadable) = self.scan_backups(vm)?;
        let mut n = 0;
        for id in self.children(&format!("vms/{vm}"))? {
            if have.iter().any(|m| m.id == id)
                || unreadable.contains(&id)
                || crate::names::validate("backup id", &id).is_err()
            {
                continue;
            }
            log::warn!(
                "vault {}: removing vms/{vm}/{id}: an upload that never finished (no manifest)",
                self.location()
            );
            self.remove_backup_objects(vm, &id)?;
            n += 1;
        }
        Ok(n)
    }
}

/// A domain backup's destination in a vault (see
/// [`Vault::backup_domain_direct`]).
#[cfg(feature = "libvirt")]
struct DirectTarget<'a> {
    vault: &'a Vault,
    send: &'a SyncOptions,
}

#[cfg(feature = "libvirt")]
impl crate::catalog::live::DomainBackupTarget for DirectTarget<'_> {
    fn location(&self) -> String {
        self.vault.location().to_string()
    }

    fn manifests(&self, vm: &str) -> Result<Vec<Manifest>> {
        self.vault.manifests(vm)
    }

    fn dest(&self, vm: &str, id: &str, volume: &str) -> PathBuf {
        PathBuf::from(self.vault.inner.show(&self.vault.key(&format!("vms/{vm}/{id}/{volume}.qcow2"))))
    }

    fn prepare(&self, vm: &str) -> Result<()> {
        self.vault.abort_recorded(vm)?;
        self.vault.remove_unfinished(vm)?;
        Ok(())
    }

    fn copy(
        &self,
        vm: &str,
        id: &str,
        v: &VolumeBackup,
        opts: &crate::qcow2::CopyOptions,
        ctl: &Control,
    ) -> Result<CopiedTo> {
        let rel = format!("vms/{vm}/{id}/{}.qcow2", v.name);
        let record = format!("uploads/{vm}/{id}/{}.qcow2.json", v.name);
        self.vault.copy_volume(&v.disk, &rel, &record, opts, self.send, ctl)
    }

    fn copy_export(
        &self,
        vm: &str,
        id: &str,
        d: &crate::engine::bitmap::BitmapDisk,
        socket: &std::path::Path,
        export: &str,
        bitmap: Option<&str>,
        compress: Option<crate::qcow2::CompressionType>,
        ctl: &Control,
    ) -> Result<(CopiedTo, u64)> {
        let rel = format!("vms/{vm}/{id}/{}.qcow2", d.target);
        let record = format!("uploads/{vm}/{id}/{}.qcow2.json", d.target);
        let what = format!("copy of NBD export {export} to vault {}", self.vault.location());
        crate::crashpoint::durable_step(&format!("copy of disk {} to the vault", d.target));
        let mut w = crate::engine::bitmap_copy::copy_export_to(
            socket,
            export,
            bitmap,
            d.parent.as_deref(),
            compress,
            ctl,
            &what,
            &mut |_, hash| VaultSink::new(self.vault, &rel, &record, self.send, hash),
        )?;
        if let Some(h) = &w.header {
            w.sink.patch(0, h)?;
        }
        let (size, hash) = self.vault.finish_sink(&rel, w.sink)?;
        Ok((CopiedTo { size, hash, bytes_read: w.data_bytes }, w.virtual_size))
    }

    fn publish(&self, m: &Manifest) -> Result<()> {
        self.vault.publish_manifest(m)
    }

    fn has(&self, vm: &str, id: &str) -> Result<bool> {
        Ok(self.vault.manifests(vm)?.iter().any(|m| m.id == id))
    }

    fn discard(&self, vm: &str, id: &str) -> Result<()> {
        self.vault.abort_recorded(vm)?;
        self.vault.remove_backup_objects(vm, id)
    }
}
