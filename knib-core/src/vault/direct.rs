//! A backup written straight to a vault from the single-pass copy: each
//! volume's qcow2 image goes from the native copy into a [`VaultSink`], a
//! multipart upload, without a copy of the image on local disk; the
//! manifest is written last.
//!
//! # Invariants
//!
//! - The backup is taken as a backup into the store is (the store's lock
//!   of the VM is held, the disks' deltas and `.knib-since` markers are
//!   handled the same way), but nothing of it is written to the store: the
//!   chain it continues is the vault's. Its parent must be in the vault:
//!   when the disks' deltas follow a backup that is in the store but not
//!   in the vault, the backup is refused (sync first, or take a full one).
//! - A [`VaultSink`] holds its parts in spool files, not in memory
//!   (module `spool`): anonymous temporary files (unlinked: nothing is left
//!   of them after a crash) in the VM's directory of the store, which the
//!   backup owns while it holds the VM's lock. At most `parallel_parts`
//!   parts are filled or in flight at once, and one more for a compressed
//!   image: its first part, kept until the end so that the header can be
//!   written into it (a positioned write into its file). Parts are
//!   `part_size` bytes; past [`GROW_AFTER`] parts (an object of more than
//!   24 GiB at 5 MiB) each further [`GROW_EVERY`] parts double in size, so
//!   that an object of up to 327 GiB at 5 MiB fits in S3's 10,000 parts.
//!   An image of one part goes up as one PUT (streamed from its spool file
//!   the same way: no upload to record, and a crash before it leaves
//!   nothing); a larger one as a multipart upload recorded under
//!   `uploads/` before its first part is sent, as a sync records them. A
//!   PUT that fails on the way is sent again, read again from its file's
//!   start, as often as the vault's S3 client retries its own requests.
//! - Nothing is visible before the manifest: a copy that fails aborts its
//!   upload and removes what the backup had completed; a process killed
//!   part way leaves an upload record, or objects without a manifest, which
//!   the next direct backup (or sync) of the VM removes before it starts.
//! - Every object's hash (the one its manifest records) is that of the
//!   bytes knib made, in their final order (the header patched in), never
//!   that of bytes read from somewhere they could have changed. The spool
//!   files are not trusted: each block of a part is hashed as it is
//!   written, and checked as it is read for its PUT and before a patch
//!   (module `spool`); a part that changed is not sent, and the backup
//!   fails `corrupt` naming the object. An image written front to back is
//!   hashed as it is appended; an image of one part (patched or not) from
//!   that part. A compressed image of more parts, whose header is written
//!   last into its first part, cannot be hashed in order as it is sent:
//!   each part is hashed on its own (part 0 again with its header), the
//!   completed object is read back once (ranged GETs of 1 MiB), each part
//!   of it is checked against the hash of the part sent, and the hash of
//!   the bytes read back is recorded only when every part matches: it is
//!   then the hash of the bytes made. A part that differs is a `corrupt`
//!   error naming the object, which is removed; no manifest is written. An
//!   image written front to back is not read back: a change the vault makes
//!   to it is not seen by the backup, but its recorded hash is still that
//!   of the bytes made, so a verify or restore finds it.
//!
//! # Costs
//!
//! In memory, a sink holds small buffers only, whatever the part size: a
//! write buffer of 256 KiB for the part being filled, and per part in
//! flight at most two chunks of 256 KiB of its body (read from its file,
//! queued in the HTTP client or being written to the connection):
//! [`VaultSink::bound`], 1.75 MiB with the defaults, where holding the
//! parts took 15 MiB (20 MiB compressed). On disk, the spool files take at
//! most `parallel_parts` parts (`parallel_parts + 1` for a compressed
//! image: 15 and 20 MiB with [`SyncOptions::direct`]; more once parts
//! grow), freed as each part is sent. Every byte is written to a spool
//! file and read back once more (twice if its PUT is retried): a copy into
//! the page cache and out of it, CPU time but no disk read in practice, as
//! a part is read back within seconds of being written; the spool files
//! are never synced, and the kernel may write some of their pages back
//! (memory it may reclaim, not the process's RSS). The checks cost an
//! xxh3 pass as a block is written and one as it is read (two more for a
//! compressed image: its parts' own hashes, and the object read back), the
//! hashes of a part's blocks while it is held (16 bytes per 256 KiB), the
//! length and hash of each part sent (48 bytes), one block of 256 KiB
//! while part 0 is read back for its header (counted in the bound: beside
//! it are the write buffer and at most `parallel_parts - 1` parts in
//! flight), and, for a compressed image of more than one part, a read of
//! the whole object from the vault, 1 MiB at a time, once every part is
//! sent (as before these checks).
//!
//! # Why not object_store's `put_part`
//!
//! The vault prefers a well-kept crate to code of its own (`vault`'s "Why
//! `object_store`"), and everything else of the upload still goes through
//! object_store: starting, completing and aborting it (`MultipartStore`),
//! the upload records, the manifest, and the URL and signature of every
//! part. But `put_part` takes the whole part as a `PutPayload` in memory,
//! and a part is at least 5 MiB (S3's least): with the parts in flight and
//! the one being filled, that is 15 to 20 MiB, which took a direct backup
//! to 41 to 45 MiB of RSS, over issue 18's 32 MiB for any operation.
//! object_store has no way to send a body it does not hold, so the parts
//! are sent by the `spool` module: the same request, built and signed by
//! object_store, with a body streamed from the part's spool file, and its
//! answer read as `put_part` reads it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::PutMode;
use xxhash_rust::xxh3::Xxh3;

use super::object::HASH_CHUNK;
use super::spool::{Gauge, PatchError, PutError, Sender, Spool, CHUNK, WINDOW, WRITE_BUF};
use super::sync::{SyncOptions, UploadRecord, MIN_PART};
use super::Vault;
use crate::catalog::head::{decide_among, follows_of_plain_disks, Decision, Follows};
use crate::catalog::{BackupOptions, DiskSpec, Manifest, Store};
use crate::engine::take::{take_backup_direct, CopiedTo, TakeBackupRequest, VolumeBackup};
use crate::engine::BackupKind;
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::qcow2::Sink;

type PartTask = tokio::task::JoinHandle<std::result::Result<PartId, PutError>>;

// The sizes the docs give (module doc, `VaultSink::bound`).
const _: () = assert!(WRITE_BUF == 256 << 10 && CHUNK == 256 << 10 && WINDOW == 2);

/// Parts of a [`VaultSink`] sent at the part size asked for.
pub const GROW_AFTER: usize = 5_000;
/// Past [`GROW_AFTER`], the part size doubles every this many parts.
pub const GROW_EVERY: usize = 1_000;

/// A vault object written front to back as a multipart upload, its parts
/// held in spool files: the [`Sink`] of a direct backup's qcow2 writer.
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
    /// Where the spool files are made.
    spool_dir: PathBuf,
    /// Part 0, complete, until it is sent.
    first: Option<Spool>,
    first_sent: bool,
    /// The part being filled (number `next`): its spool file, and the last
    /// bytes appended, not yet written to it.
    filling: Option<Spool>,
    buf: Vec<u8>,
    next: usize,
    /// The multipart upload, once a second part is needed.
    upload: Option<String>,
    /// How parts are sent, made for the first one.
    sender: Option<Arc<Sender>>,
    /// Parts in flight: number, bytes, task.
    in_flight: VecDeque<(usize, u64, PartTask)>,
    in_flight_bytes: u64,
    parts: Vec<Option<PartId>>,
    /// Each part's length and hash as knib made it (patches included),
    /// when there is no running hash: what the object read back is
    /// checked against.
    sums: Vec<Option<(u64, u128)>>,
    /// The hash of the bytes appended, in order (none for a sink that
    /// keeps part 0 for a patch, or once patched).
    hasher: Option<Box<Xxh3>>,
    len: u64,
    /// Bytes in memory: the write buffer, the chunks of the parts' bodies.
    gauge: Arc<Gauge>,
    peak_spooled: u64,
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
    /// flight at once, each held in an anonymous spool file made in
    /// `spool_dir` (a directory of the local disk the caller owns); with
    /// `hash`, every byte appended is hashed in order and the image is
    /// written front to back (part 0 is sent as soon as a second part is
    /// needed: no [`VaultSink::patch`] after that); without it, part 0 is
    /// kept until the end, for the header of a compressed image, and each
    /// part is hashed on its own (the object read back is checked against
    /// them: [`VaultSink::finish`]).
    pub fn new(
        vault: &Vault,
        rel: &str,
        record: &str,
        opts: &SyncOptions,
        hash: bool,
        spool_dir: &Path,
    ) -> Result<VaultSink> {
        check_part_size(opts.part_size)?;
        Ok(VaultSink {
            vault: vault.clone(),
            rel: rel.to_string(),
            record: record.to_string(),
            key: vault.key(rel),
            part_size: opts.part_size,
            parallel: opts.parallel_parts.max(1),
            keep_first: !hash,
            spool_dir: spool_dir.to_path_buf(),
            first: None,
            first_sent: false,
            filling: None,
            buf: Vec::new(),
            next: 0,
            upload: None,
            sender: None,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            parts: Vec::new(),
            sums: Vec::new(),
            hasher: hash.then(|| Box::new(Xxh3::new())),
            len: 0,
            gauge: Arc::new(Gauge::default()),
            peak_spooled: 0,
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

    /// The most bytes of parts the sink held in memory at once (its write
    /// buffer and the chunks of the bodies being sent).
    pub fn peak_buffered(&self) -> usize {
        self.gauge.peak()
    }

    /// The most bytes of parts it may hold in memory, whatever the part
    /// size: its write buffer (256 KiB), and two chunks of 256 KiB of the
    /// body of each part in flight (`parallel_parts` of them): 1.75 MiB
    /// with [`SyncOptions::direct`].
    pub fn bound(&self) -> usize {
        WRITE_BUF + self.parallel * WINDOW * CHUNK
    }

    /// The most bytes of parts it held in spool files at once (at most
    /// `parallel_parts` parts, one more when it keeps part 0 for a patch).
    pub fn peak_spooled(&self) -> u64 {
        self.peak_spooled
    }

    /// The size of part `idx`: the part size asked for, doubled every
    /// [`GROW_EVERY`] parts past [`GROW_AFTER`].
    fn size_of_part(&self, idx: usize) -> usize {
        let doublings = idx.saturating_sub(GROW_AFTER - 1).div_ceil(GROW_EVERY).min(16) as u32;
        self.part_size << doublings
    }

    fn note_spooled(&mut self) {
        let held = self.first.as_ref().map_or(0, Spool::len)
            + self.filling.as_ref().map_or(0, Spool::len)
            + self.in_flight_bytes;
        self.peak_spooled = self.peak_spooled.max(held);
    }

    fn name(&self) -> String {
        self.vault.inner.show(&self.key)
    }

    fn spool_error(&self, what: &str, e: std::io::Error) -> KnibError {
        KnibError::io(&format!("{}: cannot {what} a spool file in", self.name()), &self.spool_dir, e)
    }

    /// The bytes of the part being filled (in its file and its buffer).
    fn filling_len(&self) -> u64 {
        self.filling.as_ref().map_or(0, Spool::len) + self.buf.len() as u64
    }

    /// Write the buffered bytes into the part being filled.
    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let spool = self.filling.as_mut().expect("buffered bytes belong to a part being filled");
        if let Err(e) = spool.append(&self.buf) {
            return Err(self.spool_error("write", e));
        }
        self.buf.clear();
        self.note_spooled();
        Ok(())
    }

    /// Append `bytes` to the part being filled, through the buffer.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buf.len() + bytes.len() > WRITE_BUF {
            self.flush()?;
        }
        if bytes.len() < WRITE_BUF {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(WRITE_BUF);
                self.gauge.add(self.buf.capacity());
            }
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        let spool = self.filling.as_mut().expect("a part being filled");
        if let Err(e) = spool.append(bytes) {
            return Err(self.spool_error("write", e));
        }
        self.note_spooled();
        Ok(())
    }

    /// Free the write buffer (nothing more is appended).
    fn release_buf(&mut self) {
        self.gauge.sub(self.buf.capacity());
        self.buf = Vec::new();
    }

    /// Overwrite `bytes` at `offset`, inside the first part (the header of
    /// a compressed image): the part is read back from its spool file
    /// first, and is a `corrupt` error when it changed since it was
    /// written; its hash is taken afresh (the hash of the bytes appended
    /// is dropped: the object's is the first part's, or is checked by
    /// reading it back, [`VaultSink::finish`]).
    pub fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let end = offset + bytes.len() as u64;
        let first_len = match (&self.first, &self.filling) {
            (Some(s), _) => s.len(),
            (None, Some(_)) if self.next == 0 => self.filling_len(),
            _ => 0,
        };
        if self.first_sent || end > first_len {
            return Err(KnibError::internal(format!(
                "{}: a patch of bytes {offset}..{end} is outside the first part ({first_len} bytes)",
                self.name()
            )));
        }
        if self.first.is_none() {
            self.flush()?;
        }
        // One block of the part at a time, counted with the other buffers
        // (beside the write buffer, the parts in flight are one fewer than
        // the most: within the bound).
        let mut block = vec![0; CHUNK];
        self.gauge.add(block.len());
        let r = match (&mut self.first, &mut self.filling) {
            (Some(s), _) | (None, Some(s)) => s.patch(offset, bytes, &mut block),
            (None, None) => {
                self.gauge.sub(block.len());
                return Err(KnibError::internal(format!("{}: part 0 is not held for its header", self.name())));
            }
        };
        self.gauge.sub(block.len());
        match r {
            Ok(()) => {}
            Err(PatchError::Io(e)) => return Err(self.spool_error("read or write", e)),
            Err(PatchError::Changed(c)) => {
                return Err(KnibError::corrupt(format!(
                    "{}: part 0, before its header was written: {c} (spool files in {}); not sent",
                    self.name(),
                    self.spool_dir.display()
                )))
            }
        }
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

    /// How parts are sent (made once: the vault's HTTP client for parts).
    fn sender(&mut self) -> Result<Arc<Sender>> {
        if let Some(s) = &self.sender {
            return Ok(Arc::clone(s));
        }
        let inner = &self.vault.inner;
        let http = match inner.parts_http.get() {
            Some(c) => c.clone(),
            None => {
                let _in_runtime = inner.rt.enter();
                let c = super::spool::client().map_err(|e| {
                    KnibError::internal(format!(
                        "vault {}: cannot make an HTTP client: {}",
                        inner.location,
                        super::error_chain(&e)
                    ))
                })?;
                inner.parts_http.get_or_init(|| c).clone()
            }
        };
        let s = Arc::new(Sender {
            s3: Arc::clone(&inner.s3),
            http,
            region: inner.region.clone(),
            retry: super::config::retry(),
            stall: inner.stall,
            key: self.key.clone(),
            gauge: Arc::clone(&self.gauge),
            secrets: inner.secrets.clone(),
        });
        self.sender = Some(Arc::clone(&s));
        Ok(s)
    }

    /// Send part `idx` (held in `spool`), and wait until fewer than
    /// `parallel_parts` are in flight.
    fn send(&mut self, idx: usize, spool: Spool) -> Result<()> {
        let id = self.start()?;
        crate::crashpoint::durable_step(&format!("part {idx} of {}", self.name()));
        let sender = self.sender()?;
        let n = spool.len();
        if self.sums.len() <= idx {
            self.sums.resize(idx + 1, None);
        }
        self.sums[idx] = spool.hash().map(|h| (n, h));
        self.in_flight_bytes += n;
        self.note_spooled();
        let task = self.vault.inner.rt.spawn(sender.put(Some(spool), Some((idx, id))));
        self.in_flight.push_back((idx, n, task));
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
            Ok(Err(e)) => return Err(self.put_error(e)),
            Err(e) => return Err(KnibError::internal(format!("a part upload failed: {e}"))),
        };
        if self.parts.len() <= idx {
            self.parts.resize(idx + 1, None);
        }
        self.parts[idx] = Some(part);
        Ok(())
    }

    /// The error of a part (or a PUT) not sent: a spool file that changed
    /// is `corrupt`.
    fn put_error(&self, e: PutError) -> KnibError {
        match e {
            PutError::Store(e) => self.vault.inner.error(&format!("cannot send {}", self.name()), &e),
            e @ PutError::Changed { .. } => {
                KnibError::corrupt(format!("{}: {e} (spool files in {})", self.name(), self.spool_dir.display()))
            }
        }
    }

    /// The part being filled is full: part 0 is held (until a second part
    /// is needed, or the end), the others are sent.
    fn part_full(&mut self) -> Result<()> {
        self.flush()?;
        let spool = self.filling.take().expect("a part being filled");
        let idx = self.next;
        self.next += 1;
        if idx == 0 {
            self.first = Some(spool);
            return Ok(());
        }
        self.send(idx, spool)
    }

    fn append_inner(&mut self, mut bytes: &[u8]) -> Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.filling.is_none() {
                if !self.keep_first && self.first.is_some() {
                    // A second part is needed: part 0 goes now.
                    let first = self.first.take().expect("part 0");
                    self.first_sent = true;
                    self.send(0, first)?;
                }
                // Hashed on its own when the object is not.
                self.filling = Some(Spool::new(&self.spool_dir, self.hasher.is_none())?);
            }
            let size = self.size_of_part(self.next) as u64;
            let k = (size - self.filling_len()).min(bytes.len() as u64) as usize;
            self.write(&bytes[..k])?;
            bytes = &bytes[k..];
            if self.filling_len() == size {
                self.part_full()?;
            }
        }
        Ok(())
    }

    /// Send what is left, complete the upload and remove its record: the
    /// object's length and xxh3-128 (32 lower-case hex digits), that of
    /// the bytes made, in their final order (patches included). Taken as
    /// they were appended when not patched; else, for an object of one
    /// part, from that part (read back from its spool file by the patch,
    /// every block checked); else from the object read back once from the
    /// vault, each part of it checked against the hash of the part sent (a
    /// part that differs is a `corrupt` error, and the object is removed):
    /// so that what is recorded is never the hash of bytes other than
    /// those made. `ctl` is checked between the reads. On error the upload
    /// is aborted.
    pub fn finish(mut self, ctl: &Control) -> Result<(u64, String)> {
        let r = self.finish_inner(ctl);
        if r.is_err() {
            self.abort();
        }
        self.done = true;
        self.note_peak();
        r
    }

    /// Tell the vault handle how much memory the sink held at its peak.
    fn note_peak(&self) {
        let peak = self.gauge.peak() as u64;
        self.vault.inner.part_memory_peak.fetch_max(peak, std::sync::atomic::Ordering::Relaxed);
    }

    fn finish_inner(&mut self, ctl: &Control) -> Result<(u64, String)> {
        let name = self.name();
        let running = self.hasher.take().map(|h| h.digest128());
        self.flush()?;
        self.release_buf();
        if self.upload.is_none() && (self.first.is_none() || self.filling.is_none()) {
            // One part (or none): one PUT.
            let spool = self.first.take().or_else(|| self.filling.take());
            let hash = match (running, &spool) {
                (Some(h), _) => h,
                (None, Some(s)) => s.hash().ok_or_else(|| KnibError::internal(format!("{name} was not hashed")))?,
                (None, None) => Xxh3::new().digest128(),
            };
            crate::crashpoint::durable_step(&format!("upload of {name}"));
            let sender = self.sender()?;
            self.vault.block_on(sender.put(spool, None)).map_err(|e| self.put_error(e))?;
            return Ok((self.len, format!("{hash:032x}")));
        }
        if let Some(spool) = self.filling.take() {
            let idx = self.next;
            self.next += 1;
            self.send(idx, spool)?;
        }
        if let Some(first) = self.first.take() {
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
        let hash = match running {
            Some(h) => h,
            None => match self.read_back(ctl) {
                Ok(h) => h,
                Err(e) => {
                    // The object is not the image made: nothing may take
                    // it for the backup (the caller removes the backup's
                    // objects too; the next backup of the VM would).
                    if e.kind == crate::error::ErrorKind::Corrupt {
                        if let Err(d) = self.vault.delete_key(&self.rel) {
                            log::warn!("{d}");
                        }
                    }
                    return Err(e);
                }
            },
        };
        Ok((self.len, format!("{hash:032x}")))
    }

    /// Read the completed object back whole, by ranged GETs of at most
    /// [`HASH_CHUNK`] bytes, checking each part against the hash of the
    /// part sent: the object's xxh3-128, then that of the bytes made.
    fn read_back(&self, ctl: &Control) -> Result<u128> {
        let name = self.name();
        let step = format!("check of {name}");
        let obj = super::RemoteObject::whole(Arc::clone(&self.vault.inner), self.key.clone(), self.len);
        let mut whole = Xxh3::new();
        let mut pos = 0u64;
        for (idx, sum) in self.sums.iter().enumerate() {
            let Some((n, want)) = *sum else {
                return Err(KnibError::internal(format!("{name}: part {idx} was not hashed")));
            };
            let (start, end) = (pos, pos + n);
            let mut part = Xxh3::new();
            while pos < end {
                ctl.check(&step)?;
                let to = (pos + HASH_CHUNK).min(end);
                let b = obj.fetch(pos, to)?;
                part.update(&b);
                whole.update(&b);
                pos = to;
            }
            let got = part.digest128();
            if got != want {
                return Err(KnibError::corrupt(format!(
                    "{name}: part {idx} (bytes {start}..{end}) read back from the vault hashes {got:032x}, not {want:032x} as it was sent: the vault does not hold the image sent; the object is removed, the backup not kept"
                )));
            }
        }
        if pos != self.len {
            return Err(KnibError::internal(format!("{name}: its parts add up to {pos} bytes, not {}", self.len)));
        }
        Ok(whole.digest128())
    }

    /// Abort the upload (if started) and remove its record; errors are
    /// logged (the next direct backup or sync of the VM cleans up). The
    /// spool files go with the parts.
    fn abort(&mut self) {
        // Stopped and waited for before the upload is aborted (as the
        // sync does): a part landing after the abort left storage behind.
        let stopping: Vec<_> = self.in_flight.drain(..).map(|(_, _, t)| t).collect();
        for t in stopping {
            t.abort();
            let _ = self.vault.block_on(t);
        }
        self.in_flight_bytes = 0;
        self.first = None;
        self.filling = None;
        self.release_buf();
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
            self.note_peak();
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
    /// Refuse to continue the chain of `head` unless it is whole in the
    /// vault: every backup's manifest, and every volume object of the size
    /// its manifest says (a lost parent object made every later backup
    /// unrestorable while each answered success).
    pub(crate) fn require_whole_chain(&self, head: &Manifest) -> Result<()> {
        let whole = || -> Result<()> {
            for b in self.chain(head)? {
                for v in &b.volumes {
                    self.object_len(&format!("vms/{}/{}/{}", b.vm, b.id, v.file), v.size)?;
                }
            }
            Ok(())
        };
        whole().map_err(|e| e.context("the chain to continue is damaged; take a full backup with --full"))
    }

    /// Take a backup of `vm`'s disks (plain qcow2 files of a stopped VM)
    /// straight into the vault: full or incremental is decided from the
    /// vault's chain and `opts`, as [`Store::backup`] decides it from the
    /// store's; `store` holds the VM's lock and settings (its data path)
    /// and, while the backup runs, the spool files of its parts
    /// (anonymous: nothing of them stays), nothing of the backup. Each
    /// volume is sent as it is copied ([`VaultSink`], `send`'s part size
    /// and parallel parts); the manifest is written last.
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
        crate::catalog::refuse_check_direct(opts, &format!("backup of {vm} to vault {}", self.location()))?;
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
        // The chain an incremental continues must be whole in the vault:
        // every backup's manifest and every volume object, of the size its
        // manifest says (before, a lost parent object went unseen and every
        // later backup answered success and could not be restored).
        let check_chain = |head: &Manifest| self.require_whole_chain(head);
        let Decision { kind, parent, position, end_of_chain, full_reason } =
            decide_among(vm, &all, &place, &sources, opts, &follows, &|_, _| {}, &check_chain)?;

        let id = crate::catalog::new_backup_id();
        let mut manifest = Manifest::new(&id, vm, kind, parent.as_ref().map(|p| p.id.clone()), position, end_of_chain);
        manifest.full_reason = full_reason;
        let req = TakeBackupRequest {
            volumes: disks
                .iter()
                .map(|d| VolumeBackup {
                    name: d.name.clone(),
                    disk: d.path.clone(),
                    dest: PathBuf::from(self.inner.show(&self.key(&object_rel(vm, &id, &d.name)))),
                    parent: parent.as_ref().map(|p| crate::catalog::manifest::parent_file_ref(p, &d.name)),
                })
                .collect(),
            kind,
            end_of_chain,
            data_path: crate::catalog::settings::Settings::load(store.root())?.data_path,
            compress: opts.compress,
            // A vault's upload is not read back (it has no local file).
            check_output: false,
        };
        let mut published = false;
        let target = DirectTarget { vault: self, send, store };
        let mut copy_to = |v: &VolumeBackup, copy: &crate::qcow2::CopyOptions, ctl: &Control| -> Result<CopiedTo> {
            target.copy_volume(vm, &id, &v.name, &v.disk, copy, ctl)
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
        let target = DirectTarget { vault: self, send, store };
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
        let target = DirectTarget { vault: self, send: &send, store };
        store.recover_domain_in(vm, Some(&target), ctl)
    }

    /// Complete object `rel`'s upload: its length and hash, that of the
    /// bytes made ([`VaultSink::finish`]).
    fn finish_sink(&self, rel: &str, sink: VaultSink, ctl: &Control) -> Result<(u64, String)> {
        log::debug!(
            "vault {}: {rel}: {} bytes, at most {} bytes of parts in memory (bound {}), {} in spool files",
            self.location(),
            sink.len(),
            sink.peak_buffered(),
            sink.bound(),
            sink.peak_spooled()
        );
        sink.finish(ctl)
    }

    /// Write `m`'s manifest, conditionally created: the backup becomes visible.
    fn publish_manifest(&self, m: &Manifest) -> Result<()> {
        let text = serde_json::to_vec_pretty(m).expect("a manifest serializes");
        let rel = Self::manifest_rel(m);
        crate::crashpoint::durable_step(&format!("publishing backup {} in vault {}", m.id, self.location()));
        self.require_objects(m)?;
        self.require_parent(m)?;
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
        // Asked of the manifest itself, not inferred from a listing: a
        // published backup is never cleaned up as unfinished.
        if self.load_manifest(vm, id)?.is_some() {
            log::warn!(
                "vault {}: vms/{vm}/{id} has a manifest (published meanwhile): it is not removed",
                self.location()
            );
            return Ok(());
        }
        for rel in self.keys_under(&format!("vms/{vm}/{id}"))? {
            if rel.ends_with("/manifest.json") {
                continue;
            }
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

/// Where a direct backup writes: the vault, how it sends, and the store
/// whose VM directory holds the spool files of its parts (see
/// [`Vault::backup_direct`], and `Vault::backup_domain_direct`).
struct DirectTarget<'a> {
    vault: &'a Vault,
    send: &'a SyncOptions,
    store: &'a Store,
}

/// The key (under the prefix) of volume `volume`'s object in backup `id`.
fn object_rel(vm: &str, id: &str, volume: &str) -> String {
    format!("vms/{vm}/{id}/{volume}.qcow2")
}

/// The key of the record of that object's upload.
fn record_rel(vm: &str, id: &str, volume: &str) -> String {
    format!("uploads/{vm}/{id}/{volume}.qcow2.json")
}

impl DirectTarget<'_> {
    /// A sink of volume `volume`'s object in backup `id` of `vm`, its
    /// parts spooled in the VM's directory of the store (made by
    /// [`Store::lock_vm`], held for the backup).
    fn sink(&self, vm: &str, id: &str, volume: &str, hash: bool) -> Result<VaultSink> {
        let spool_dir = self.store.vm_dir(vm);
        VaultSink::new(
            self.vault,
            &object_rel(vm, id, volume),
            &record_rel(vm, id, volume),
            self.send,
            hash,
            &spool_dir,
        )
    }

    /// One volume's native copy from `disk` into its object: its length,
    /// hash and the guest bytes read.
    fn copy_volume(
        &self,
        vm: &str,
        id: &str,
        volume: &str,
        disk: &std::path::Path,
        copy: &crate::qcow2::CopyOptions,
        ctl: &Control,
    ) -> Result<CopiedTo> {
        let sink = self.sink(vm, id, volume, copy.compression.is_none())?;
        // The send's rate limit, as a limit on what the copy reads.
        let copy = crate::qcow2::CopyOptions { rate_limit_mbps: self.send.rate_limit_mbps, ..copy.clone() };
        crate::crashpoint::durable_step(&format!("copy of {} to the vault", disk.display()));
        let mut done = crate::qcow2::copy_image_to_sink(disk, sink, &copy, ctl, &mut |_| Ok(()))?;
        if let Some(h) = &done.header {
            done.sink.patch(0, h)?;
        }
        let (size, hash) = self.vault.finish_sink(&object_rel(vm, id, volume), done.sink, ctl)?;
        Ok(CopiedTo { size, hash, bytes_read: done.report.bytes_read })
    }
}

#[cfg(feature = "libvirt")]
impl crate::catalog::live::DomainBackupTarget for DirectTarget<'_> {
    fn location(&self) -> String {
        self.vault.location().to_string()
    }

    fn check_chain(&self, head: &Manifest) -> Result<()> {
        self.vault.require_whole_chain(head)
    }

    fn manifests(&self, vm: &str) -> Result<Vec<Manifest>> {
        self.vault.manifests(vm)
    }

    fn dest(&self, vm: &str, id: &str, volume: &str) -> PathBuf {
        PathBuf::from(self.vault.inner.show(&self.vault.key(&object_rel(vm, id, volume))))
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
        self.copy_volume(vm, id, &v.name, &v.disk, opts, ctl)
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
        let what = format!("copy of NBD export {export} to vault {}", self.vault.location());
        crate::crashpoint::durable_step(&format!("copy of disk {} to the vault", d.target));
        // An incremental's parent (`../<id>/<file>`), read from the vault.
        let mut parent = match (bitmap, d.parent.as_deref()) {
            (Some(_), Some(p)) => {
                let id = p.split('/').nth(1).unwrap_or_default();
                Some(self.vault.volume_chain(id, &d.target)?.0)
            }
            _ => None,
        };
        let mut w = crate::engine::bitmap_copy::copy_export_to(
            socket,
            export,
            bitmap,
            d.parent.as_deref(),
            parent.as_mut(),
            compress,
            // A vault's upload is not read back (it has no local file).
            false,
            ctl,
            &what,
            &mut |_, hash| self.sink(vm, id, &d.target, hash),
        )?;
        if let Some(h) = &w.header {
            w.sink.patch(0, h)?;
        }
        let (size, hash) = self.vault.finish_sink(&object_rel(vm, id, &d.target), w.sink, ctl)?;
        Ok((CopiedTo { size, hash, bytes_read: w.data_bytes }, w.virtual_size))
    }

    fn publish(&self, m: &Manifest) -> Result<()> {
        self.vault.publish_manifest(m)
    }

    /// A manifest that is there but cannot be read (damaged, too large,
    /// naming another backup) is neither published nor unfinished: an
    /// error naming it (a recovery stops there, its journal kept, and
    /// nothing of the backup is discarded).
    fn has(&self, vm: &str, id: &str) -> Result<bool> {
        match self.vault.load_manifest(vm, id) {
            Ok(m) => Ok(m.is_some()),
            Err(e) if e.kind == crate::error::ErrorKind::Corrupt => Err(KnibError::corrupt(format!(
                "vault {}: backup {id} of {vm} has a manifest that cannot be read ({}): knib can neither count it as published nor discard it; repair or remove that manifest, then recover again",
                self.vault.location(),
                e.message
            ))),
            Err(e) => Err(e),
        }
    }

    /// Refused when the backup has a manifest (readable or not): only a
    /// backup that was never published is discarded.
    fn discard(&self, vm: &str, id: &str) -> Result<()> {
        if self.has(vm, id)? {
            return Err(KnibError::invalid(format!(
                "backup {id} of {vm} has a manifest in vault {}: it was published, and is not discarded",
                self.vault.location()
            )));
        }
        self.vault.abort_recorded(vm)?;
        self.vault.remove_backup_objects(vm, id)
    }
}
