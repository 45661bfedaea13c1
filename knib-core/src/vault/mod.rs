//! The vault: knib's store on S3 object storage (`s3://bucket/prefix`),
//! where backups live off-site. It holds the same backups as a store
//! directory, laid out the same way, and is read without downloading
//! anything whole: restore, verify and file-level restore read the qcow2
//! chains by ranged GETs through knib's own qcow2 reader.
//!
//! # Layout
//!
//! ```text
//! PREFIX/vms/<vm>/<id>/manifest.json   the backup's manifest (schema 1), written last
//! PREFIX/vms/<vm>/<id>/<volume>.qcow2  one object per volume: the store's file, byte for byte
//! PREFIX/uploads/<vm>/<id>/<file>.json an upload in progress: its multipart upload id
//! ```
//!
//! # Guarantees
//!
//! - A backup is visible (listed, restorable) only when its manifest
//!   exists, and the manifest is written after every object of the backup
//!   is complete, with a conditional create (`If-None-Match: *`) where the
//!   server has it: two syncs never overwrite each other's manifest.
//! - A chain's parent is in the vault before its children: sync sends a
//!   backup only once its parent's manifest is there.
//! - An interrupted upload leaves nothing visible: volume objects larger
//!   than one part go up as multipart uploads, whose parts are invisible
//!   until completed; each upload's id is recorded under `uploads/` before
//!   its first part, and the next sync aborts the recorded uploads and
//!   sends the backup again. (A process killed between starting an upload
//!   and recording it leaves one incomplete upload unrecorded: a bucket
//!   lifecycle rule `AbortIncompleteMultipartUpload` is the backstop.)
//!   A backup written straight to the vault ([`Vault::backup_direct`],
//!   module `direct`) records its uploads the same way; a sync or direct
//!   backup of a VM also removes the objects of its backups that have no
//!   manifest (left by a direct backup that was killed).
//! - Every object's xxh3-128 is in its manifest (taken from the bytes sent
//!   and compared with the hash the local store recorded, if any): verify
//!   reads every object and compares; restore compares the hash of each
//!   object of the chain from the bytes it reads and refuses (nothing left
//!   at the destination) on a mismatch.
//! - Everything read from the vault is hostile input, as in a store
//!   directory: keys are built only from checked names, manifests are
//!   parsed strictly and must sit at `vms/<their vm>/<their id>/`, and a
//!   volume object's qcow2 backing pointer must be exactly the
//!   `../<parent>/<file>` the manifests say before a chain is read through it.
//! - Credentials (access key, secret key, session token) never appear in
//!   logs, errors, manifests or answers: every message that comes from the
//!   S3 client has them blanked out, and [`Vault`]'s `Debug` shows only the
//!   location.
//! - One writer at a time per vault prefix (a sync or a delete): S3 has no
//!   lock; two concurrent syncs are safe for the manifests (conditional
//!   create) but one may abort the other's recorded uploads.
//!
//! # Costs
//!
//! A sync reads each local file once and sends it once (parts of
//! [`SyncOptions::part_size`], [`SyncOptions::parallel_parts`] read or in
//! flight: at most their product of memory, 10 MiB by default), plus a few
//! small requests per backup (list, manifest, upload record). A restore
//! fetches each object of the chain about once (the hash check reads what
//! the copy skipped); a file-level restore fetches the qcow2 tables and the
//! clusters of what it reads; verify fetches every object of the backup
//! whole. A backup written straight to the vault sends each object once,
//! its parts written to spool files on the store's disk and read back
//! once (at most `parallel_parts` parts of disk, one more compressed:
//! module `direct`); a compressed object of more than one part is fetched
//! back once more, to check it against the parts sent.
//!
//! # Memory
//!
//! A sync and a read stay under the 32 MiB peak RSS of any knib operation
//! (issue 18; a process starts at about 16 MiB, its shared libraries, and
//! about 22 MiB once it has talked to a vault: the runtime, the HTTP
//! client and their code), whatever the disk's size or the chain's depth
//! (a sync's parts grow only past 48.8 GiB per file): a sync
//! holds its parts (10 MiB by default), and a
//! read of a chain (restore, verify, file-level restore) one block cache
//! of 3 MiB shared by all the chain's objects, plus the range being
//! fetched (at most 1 MiB of read-ahead, or one read); a restore reads
//! 256 KiB of the guest's bytes per step. (A restore of a 1 GiB disk
//! peaked at 31 MiB with a 4 MiB cache and 1 MiB steps, 28.5 to 29.8 MiB
//! with these: about 7.5 MiB of the peak is knib's own code, mapped as
//! the kernel caches it, in large folios.)
//!
//! In a program that has allowed it ([`allow_allocator_tuning`]: the
//! `knib` CLI does; a library user's process is left as it is unless it
//! asks), a read of a chain fixes glibc malloc's mmap threshold at its
//! initial 128 KiB for the process (`mallopt(M_MMAP_THRESHOLD)`, once). By default
//! glibc raises the threshold to the size of each large block freed (up
//! to 32 MiB), after which parts and fetched ranges come from its arenas
//! (one per thread: the runtime's workers free what the caller
//! allocated), which keep freed memory instead of returning it: 6 MiB more
//! peak RSS for a restore. Fixed, every buffer of 128 KiB or more is its
//! own mapping, returned to the system when freed. (Not for a sync or a
//! direct backup: their peak is the same either way, and a compressed
//! copy's many large buffers would each cost a mapping.)
//!
//! A backup written straight to a vault stays under 32 MiB too, since its
//! parts are held in spool files instead of memory and sent with bodies
//! streamed from them (module `direct`): the copy's own buffers (a backup
//! into a store peaks at 26 to 27 MiB) plus the vault's client plus at
//! most 1.75 MiB of the parts' buffers ([`VaultSink::bound`]) peak at
//! 27.8 to 28.6 MiB, compressed or not, for a 1 GiB disk (41 MiB, 45 MiB
//! compressed, when the parts were held in memory).
//!
//! # Why `object_store`
//!
//! `object_store` (Apache Arrow) is a well-kept S3 client: request
//! signing, retries with backoff, multipart uploads with explicit ids
//! (`MultipartStore`, which a resumable upload needs), conditional puts and
//! ranged GETs, with the usual `AWS_*` environment variables. The AWS SDK
//! does the same with several times the dependencies. One request is not
//! sent by it: a direct backup's parts go in PUTs that object_store names
//! and signs but knib sends, with a body streamed from a spool file
//! (object_store's `put_part` holds the whole part in memory; module
//! `direct` says why that matters). object_store is async: a
//! vault runs a small private tokio runtime (one worker thread) and the
//! rest of knib stays synchronous; every call into it blocks on that
//! runtime, so a vault must not be used from inside another tokio runtime.

mod config;
mod delete;
mod direct;
mod job;
mod net;
mod object;
mod read;
#[cfg(feature = "libvirt")]
pub mod serve;
mod serving;
mod spool;
mod sync;

use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use object_store::aws::AmazonS3;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::catalog::Manifest;
use crate::error::{ErrorKind, KnibError, Origin, Result};
use crate::names;

pub use direct::VaultSink;
pub use job::sync_runner;
pub use object::RemoteObject;
pub use read::{VaultRestore, VaultVerify};
pub use sync::{SyncOptions, SyncReport, DEFAULT_PARALLEL_PARTS, DEFAULT_PART_SIZE};

pub use crate::catalog::{is_vault, VAULT_TAKES};

/// What an error says when the server refused the credentials (see
/// [`credentials_refused`]).
const REFUSED: &str =
    ": the server refused the credentials (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile)";

/// Whether `e` says the vault refused the credentials (a retry with the
/// same ones would be refused again).
pub fn credentials_refused(e: &KnibError) -> bool {
    e.message.contains(REFUSED)
}

/// Whether the program allowed [`keep_large_buffers_mapped`].
static ALLOCATOR_TUNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Allow reads of a vault chain to tune glibc malloc for the whole process
/// (see the module's "Memory"): for a program that owns its process, as
/// the `knib` CLI does. A library user (the CloudStack agent's JVM, a C
/// program) keeps its allocator as it is unless it calls this.
pub fn allow_allocator_tuning() {
    ALLOCATOR_TUNING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Fix glibc malloc's mmap threshold at its initial 128 KiB, once per
/// process, when the program allowed it (see the module's "Memory").
pub(super) fn keep_large_buffers_mapped() {
    if !ALLOCATOR_TUNING.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets a tuning parameter of the allocator;
            // any value is valid for M_MMAP_THRESHOLD up to 32 MiB.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
            }
        });
    }
}

/// The most bytes a manifest may have (a real one is a few KiB).
const MAX_MANIFEST: u64 = 1 << 20;

/// A vault: a bucket and prefix of an S3 server.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    rt: tokio::runtime::Runtime,
    s3: Arc<AmazonS3>,
    /// `s3://bucket/prefix`, for messages.
    location: String,
    /// The prefix, without a trailing slash (may be empty).
    prefix: String,
    /// The credentials' strings, blanked out of every message.
    secrets: Vec<String>,
    /// The region requests are signed for (the S3 client's).
    region: String,
    /// The HTTP client that sends a direct backup's parts (`spool`), made
    /// for the first one.
    parts_http: std::sync::OnceLock<reqwest::Client>,
    /// How long a transfer may go without a byte moving (module `net`).
    stall: std::time::Duration,
    /// Bytes fetched by GET requests (ranged or whole).
    fetched: AtomicU64,
    /// GET requests made.
    gets: AtomicU64,
    /// The most bytes of parts one direct backup's sink held in memory.
    part_memory_peak: AtomicU64,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("location", &self.inner.location).finish_non_exhaustive()
    }
}

impl Vault {
    /// Open the vault at `location` (`s3://bucket` or `s3://bucket/prefix`).
    /// The endpoint, region and credentials come from the usual AWS
    /// environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_PROFILE`) and, for what they leave out, the shared config files
    /// (`~/.aws/credentials`, `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE`
    /// and `AWS_CONFIG_FILE`). An `http://` endpoint is allowed (a local
    /// server). The bucket is checked at once: a missing bucket is NotFound,
    /// refused credentials an Io error saying so.
    pub fn open(location: &str) -> Result<Vault> {
        let (bucket, prefix) = config::parse_location(location)?;
        let settings = config::Settings::load()?;
        let location = if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
        let secrets = settings.secrets();
        let s3 = settings
            .build(&bucket)
            .map_err(|e| KnibError::invalid(format!("vault {location}: {}", redact(&secrets, &e.to_string()))))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("knib-vault")
            .enable_all()
            .build()
            .map_err(|e| KnibError::internal(format!("vault {location}: cannot start its runtime: {e}")))?;
        let v = Vault {
            inner: Arc::new(Inner {
                rt,
                s3: Arc::new(s3),
                location,
                prefix,
                secrets,
                region: settings.region(),
                parts_http: std::sync::OnceLock::new(),
                stall: settings.stall(),
                fetched: AtomicU64::new(0),
                gets: AtomicU64::new(0),
                part_memory_peak: AtomicU64::new(0),
            }),
        };
        v.probe()?;
        Ok(v)
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Bytes fetched from the vault by this handle so far (GET bodies).
    pub fn bytes_fetched(&self) -> u64 {
        self.inner.fetched.load(Ordering::Relaxed)
    }

    /// GET requests made by this handle so far.
    pub fn get_requests(&self) -> u64 {
        self.inner.gets.load(Ordering::Relaxed)
    }

    /// The most bytes of parts that one [`VaultSink`] of this handle (a
    /// volume of a backup written straight to the vault) held in memory at
    /// once, so far ([`VaultSink::peak_buffered`]).
    pub fn part_memory_peak(&self) -> u64 {
        self.inner.part_memory_peak.load(Ordering::Relaxed)
    }

    /// One cheap request, so that a missing bucket or refused credentials
    /// are said at once and clearly.
    fn probe(&self) -> Result<()> {
        let key = self.key("vms");
        let s3 = Arc::clone(&self.inner.s3);
        let r = self.block_on(async move { s3.list_with_delimiter(Some(&key)).await });
        r.map(drop).map_err(|e| match e {
            object_store::Error::NotFound { .. } => KnibError::not_found(format!(
                "vault {}: the bucket does not exist ({})",
                self.location(),
                redact(&self.inner.secrets, &error_chain(&e))
            ))
            .with_origin(Origin::Vault),
            e => self.inner.error("cannot open", &e),
        })
    }

    /// The key of `rel` (a `/`-separated path of checked names) under the prefix.
    fn key(&self, rel: &str) -> Key {
        self.inner.key(rel)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.rt.block_on(f)
    }

    /// The whole of a small object (a manifest, an upload record), or
    /// `None` when it does not exist; more than `max` bytes is corrupt.
    fn get_small(&self, rel: &str, max: u64, what: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(rel);
        let s3 = Arc::clone(&self.inner.s3);
        let k = key.clone();
        let r = self.block_on(async move {
            let got = s3.get(&k).await?;
            let size = got.meta.size;
            if size > max {
                return Ok(Err(size));
            }
            body_capped(got, max).await
        });
        self.inner.gets.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(Ok(b)) => {
                self.inner.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b.to_vec()))
            }
            Ok(Err(size)) => Err(KnibError::corrupt(format!(
                "{what} {} is {size} bytes long, more than the {max} a {what} may have",
                self.inner.show(&key)
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.inner.error(&format!("cannot read {what}"), &e)),
        }
    }

    /// Write a small object whole (a PUT is atomic: it is there complete
    /// or not at all).
    fn put_small(&self, rel: &str, data: Vec<u8>, mode: PutMode, what: &str) -> Result<()> {
        self.put_raw(rel, data, mode).map_err(|e| self.inner.error(&format!("cannot write {what}"), &e))
    }

    /// [`Vault::put_small`] with the S3 client's own error.
    fn put_raw(&self, rel: &str, data: Vec<u8>, mode: PutMode) -> object_store::Result<()> {
        let key = self.key(rel);
        let s3 = Arc::clone(&self.inner.s3);
        let r = self.block_on(async move {
            s3.put_opts(&key, PutPayload::from(data), PutOptions { mode, ..Default::default() }).await
        });
        r.map(drop)
    }

    fn delete_key(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        let s3 = Arc::clone(&self.inner.s3);
        let k = key.clone();
        match self.block_on(async move { s3.delete(&k).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.inner.error("cannot delete", &e)),
        }
    }

    /// The keys (relative to the vault) of every object under `rel/`.
    /// A listed key outside `rel/` (a server that does not honour the
    /// prefix) is left out, with a warning: what a listing returns never
    /// steers a delete elsewhere.
    fn keys_under(&self, rel: &str) -> Result<Vec<String>> {
        Ok(self.objects_under(rel)?.into_iter().map(|(k, _)| k).collect())
    }

    /// [`Vault::keys_under`] with each object's length.
    fn objects_under(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        let prefix = self.key(rel);
        let s3 = Arc::clone(&self.inner.s3);
        // At most MAX_LISTED objects are taken in (a hostile or broken
        // server answering page after page grew the memory without end).
        let listed = self.block_on(async move {
            use futures::TryStreamExt;
            let mut got = Vec::new();
            let mut stream = s3.list(Some(&prefix));
            while let Some(o) = stream.try_next().await? {
                if got.len() >= MAX_LISTED {
                    return Ok(Err(got.len()));
                }
                got.push(o);
            }
            Ok(Ok(got))
        });
        let listed = listed.map_err(|e| self.inner.error("cannot list", &e))?.map_err(|n| {
            KnibError::corrupt(format!(
                "vault {}: the listing of {rel}/ has more than {n} objects, more than knib writes there: refused",
                self.location()
            ))
        })?;
        let want = format!("{rel}/");
        let mut out = Vec::new();
        for o in listed {
            match self.inner.rel_of(&o.location) {
                // A key that knib's S3 client would write otherwise (its
                // characters, `~` `%` `#` ..., are encoded when a key is
                // named): what knib removed or read under that name would
                // be another object (a delete that removes nothing, an
                // upload left unfinished for good).
                Some(r) if r.starts_with(&want) && !r[want.len()..].is_empty() && self.key(&r) != o.location => {
                    return Err(KnibError::corrupt(format!(
                        "vault {}: the listing of {rel}/ holds {}, a key with characters knib's S3 client cannot name as they are (it encodes them): that object was not written by knib, and knib can neither read nor remove it, nor tell whether an upload is unfinished while it is there: remove it with another S3 client, e.g. `aws s3 rm`",
                        self.location(),
                        self.inner.show(&o.location)
                    ))
                    .with_origin(Origin::Vault));
                }
                Some(r) if r.starts_with(&want) && !r[want.len()..].is_empty() => out.push((r, o.size)),
                _ => log::warn!(
                    "vault {}: the listing of {rel}/ returned {}, which is not under it: ignored",
                    self.location(),
                    o.location
                ),
            }
        }
        Ok(out)
    }

    /// Whether an upload to `vm`'s backups is unfinished: objects under a
    /// backup's prefix that is not one of `known` (the backups with a
    /// manifest, readable or not), or an upload record; the first one
    /// found, for messages. A sync or direct backup of `vm` running now
    /// leaves these, and so does one that was interrupted (the next sync or
    /// direct backup of `vm` removes those).
    pub(super) fn unfinished_upload(&self, vm: &str, known: &[String]) -> Result<Option<String>> {
        for id in self.children(&format!("vms/{vm}"))? {
            // A prefix holding no object but a "folder" marker (what an S3
            // console's "Create folder" makes, which knib cannot list nor
            // remove) is no upload.
            if !known.contains(&id)
                && names::validate("backup id", &id).is_ok()
                && !self.keys_under(&format!("vms/{vm}/{id}"))?.is_empty()
            {
                return Ok(Some(format!("vms/{vm}/{id}/ has objects but no manifest")));
            }
        }
        Ok(self.keys_under(&format!("uploads/{vm}"))?.into_iter().next().map(|k| format!("upload record {k}")))
    }

    /// Refuse to publish `m` unless every object it names is in the vault
    /// at the length it says: another writer's cleanup of unfinished
    /// backups (two stores syncing one VM name, against the one-writer
    /// rule) may have removed a finished object, and the manifest would
    /// name what is not there, the backup answered as sent.
    pub(super) fn require_objects(&self, m: &Manifest) -> Result<()> {
        for v in &m.volumes {
            let key = self.key(&format!("vms/{}/{}/{}", m.vm, m.id, v.file));
            let found = match self.head_len(&key)? {
                Some((len, _)) if len == v.size => continue,
                Some((len, _)) => format!("has {len} bytes, not the {} sent", v.size),
                None => "is not there".to_string(),
            };
            return Err(KnibError::corrupt(format!(
                "backup {} is not published in vault {}: its object {} {found} (removed by another writer of VM {}?)",
                m.id,
                self.location(),
                self.inner.show(&key),
                m.vm
            )));
        }
        Ok(())
    }

    /// Before a backup's manifest is written: its parent must still be in
    /// the vault (a delete may have removed it while the backup was sent).
    pub(super) fn require_parent(&self, m: &Manifest) -> Result<()> {
        let Some(p) = &m.parent else { return Ok(()) };
        match self.load_manifest(&m.vm, p)? {
            Some(_) => Ok(()),
            None => Err(KnibError::not_found(format!(
                "backup {} is not published in vault {}: its parent {p} was deleted from the vault while it was sent (its objects are removed by the next sync or direct backup of {})",
                m.id,
                self.location(),
                m.vm
            ))),
        }
    }

    /// The names one level below `rel/` (common prefixes).
    fn children(&self, rel: &str) -> Result<Vec<String>> {
        let key = self.key(rel);
        let s3 = Arc::clone(&self.inner.s3);
        let k = key.clone();
        let r = self.block_on(async move { s3.list_with_delimiter(Some(&k)).await });
        let list = r.map_err(|e| self.inner.error("cannot list", &e))?;
        let mut out: Vec<String> =
            list.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        out.sort();
        Ok(out)
    }

    /// Every VM with a backup prefix in the vault (names checked; others
    /// are skipped with a warning).
    pub fn vms(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for n in self.children("vms")? {
            match names::validate("VM name", &n) {
                Ok(()) => out.push(n),
                Err(_) => log::warn!("vault {}: skipping vms/{n}: not a VM of this vault", self.location()),
            }
        }
        Ok(out)
    }

    /// The manifest of backup `id` of `vm`, or `None` when the vault has
    /// none (not sent, or an upload that never finished).
    fn load_manifest(&self, vm: &str, id: &str) -> Result<Option<Manifest>> {
        names::validate("VM name", vm)?;
        names::validate("backup id", id)?;
        let rel = format!("vms/{vm}/{id}/manifest.json");
        let Some(text) = self.get_small(&rel, MAX_MANIFEST, "manifest")? else { return Ok(None) };
        let shown = self.inner.show(&self.key(&rel));
        let m = Manifest::parse(&text, FsPath::new(&shown))?;
        if m.vm != vm || m.id != id {
            return Err(KnibError::corrupt(format!(
                "manifest {shown} is the manifest of backup {} of VM {}, not of {id} of {vm}",
                m.id, m.vm
            )));
        }
        if let Some((i, _)) = m.volumes.iter().enumerate().find(|(_, v)| v.hash.is_none()) {
            return Err(KnibError::corrupt(format!(
                "manifest {shown}: field `volumes[{i}].hash` is missing (every object of a vault has its hash)"
            )));
        }
        Ok(Some(m))
    }

    /// Every backup of `vm` in the vault (removed ones too), oldest first,
    /// and the ids whose manifest cannot be read (skipped with a warning;
    /// a delete keeps their parents).
    pub fn scan_backups(&self, vm: &str) -> Result<(Vec<Manifest>, Vec<String>)> {
        names::validate("VM name", vm)?;
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for id in self.children(&format!("vms/{vm}"))? {
            if names::validate("backup id", &id).is_err() {
                log::warn!("vault {}: skipping vms/{vm}/{id}: not a backup of this vault", self.location());
                continue;
            }
            match self.load_manifest(vm, &id) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => log::info!(
                    "vault {}: vms/{vm}/{id} has no manifest (an upload not finished): not a backup",
                    self.location()
                ),
                Err(e) if matches!(e.kind, ErrorKind::Corrupt) => {
                    log::warn!("vault {}: skipping vms/{vm}/{id}: {e}", self.location());
                    unreadable.push(id);
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.created.as_str(), a.id.as_str()).cmp(&(b.created.as_str(), b.id.as_str())));
        Ok((out, unreadable))
    }

    /// Every backup of `vm` (removed ones too), oldest first.
    pub fn manifests(&self, vm: &str) -> Result<Vec<Manifest>> {
        Ok(self.scan_backups(vm)?.0)
    }

    /// Backups of one VM, or of all, oldest first; removed backups are
    /// left out.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<Manifest>> {
        let vms = match vm {
            Some(v) => vec![v.to_string()],
            None => self.vms()?,
        };
        let mut out = Vec::new();
        for v in vms {
            out.extend(self.manifests(&v)?.into_iter().filter(|m| !m.removed));
        }
        Ok(out)
    }

    /// The manifest of backup `id` (removed backups included). An id is
    /// one backup's: found under two VMs (somebody copied a backup under
    /// another VM's name, perhaps to be restored in its place), it is a
    /// `corrupt` error naming them, never the first one found.
    pub fn find(&self, id: &str) -> Result<Manifest> {
        names::validate("backup id", id)?;
        let mut found: Option<Manifest> = None;
        for vm in self.vms()? {
            if let Some(m) = self.load_manifest(&vm, id)? {
                if let Some(first) = &found {
                    return Err(KnibError::corrupt(format!(
                        "backup {id} is in vault {} under two VMs, {} and {vm}: an id names one backup, so one of them was copied there; remove the copy",
                        self.location(),
                        first.vm
                    )));
                }
                found = Some(m);
            }
        }
        found.ok_or_else(|| KnibError::not_found(format!("backup {id} does not exist in vault {}", self.location())))
    }

    /// The manifest of a backup that was not deleted.
    pub fn show(&self, id: &str) -> Result<Manifest> {
        let m = self.find(id)?;
        if m.removed {
            return Err(KnibError::not_found(format!(
                "backup {id} was deleted from vault {} (its objects stay until the backups that depend on it are deleted)",
                self.location()
            )));
        }
        Ok(m)
    }

    /// The chain of `m`, root first, ending with `m`.
    pub fn chain(&self, m: &Manifest) -> Result<Vec<Manifest>> {
        let mut chain = vec![m.clone()];
        let mut cur = m.clone();
        while let Some(p) = cur.parent.clone() {
            if chain.iter().any(|c| c.id == p) {
                return Err(KnibError::corrupt(format!("backup {} has a parent loop (through {p})", m.id)));
            }
            let pm = self.load_manifest(&m.vm, &p)?.ok_or_else(|| {
                KnibError::not_found(format!(
                    "parent {p} of backup {} is missing from vault {}",
                    cur.id,
                    self.location()
                ))
            })?;
            chain.push(pm.clone());
            // Bounded: no chain knib reads is deeper, and a longer one made
            // every verify of the vault fetch its manifests again and again.
            if chain.len() > crate::qcow2::MAX_CHAIN_DEPTH {
                return Err(KnibError::corrupt(format!(
                    "backup {} in vault {}: its chain has more than the {} backups a qcow2 chain may have",
                    m.id,
                    self.location(),
                    crate::qcow2::MAX_CHAIN_DEPTH
                )));
            }
            cur = pm;
        }
        chain.reverse();
        Ok(chain)
    }

    /// The key (relative to the prefix) of volume `volume`'s object of `m`.
    fn volume_rel(m: &Manifest, file: &str) -> String {
        format!("vms/{}/{}/{file}", m.vm, m.id)
    }

    /// The manifest key (relative to the prefix) of `m`.
    fn manifest_rel(m: &Manifest) -> String {
        format!("vms/{}/{}/manifest.json", m.vm, m.id)
    }
}

impl Inner {
    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `key` relative to the prefix, if it is below it.
    fn rel_of(&self, key: &Key) -> Option<String> {
        let k = key.as_ref();
        if self.prefix.is_empty() {
            return Some(k.to_string());
        }
        k.strip_prefix(self.prefix.as_str()).and_then(|r| r.strip_prefix('/')).map(str::to_string)
    }

    /// `s3://bucket/key`, for messages.
    fn show(&self, key: &Key) -> String {
        let bucket = self.location.trim_start_matches("s3://").split('/').next().unwrap_or_default();
        format!("s3://{bucket}/{key}")
    }

    /// A KnibError for `e` met while doing `what`, the credentials blanked
    /// out and the usual causes said plainly.
    fn error(&self, what: &str, e: &object_store::Error) -> KnibError {
        let text = redact(&self.secrets, &error_chain(e));
        let refused = ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden"];
        let (kind, hint) = match e {
            // A key someone else wrote (`vms//x`): the S3 client refuses
            // the whole page of a listing that holds it.
            object_store::Error::InvalidPath { .. } => (ErrorKind::Corrupt, INVALID_KEY),
            _ if text.contains("NoSuchBucket") => (ErrorKind::NotFound, ": the bucket does not exist"),
            object_store::Error::NotFound { .. } => (ErrorKind::NotFound, ""),
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                (ErrorKind::Io, REFUSED)
            }
            _ if refused.iter().any(|r| text.contains(r)) => (ErrorKind::Io, REFUSED),
            _ => (ErrorKind::Io, ""),
        };
        // A download cut by its read timeout says only that it timed out.
        let stalled = if net::stalled(e) && !text.contains("stalled") {
            format!(
                " (the transfer stalled: no byte came for {} s, the stall timeout, KNIB_VAULT_STALL_TIMEOUT)",
                self.stall.as_secs_f64()
            )
        } else {
            String::new()
        };
        KnibError::new(kind, format!("vault {}: {what}: {text}{hint}{stalled}", self.location))
            .with_origin(Origin::Vault)
    }
}

/// What a vault error says of an object whose key knib cannot name.
const INVALID_KEY: &str =
    "; that object was not written by knib, and while it is there no listing of that part of the vault \
     can be read: remove it (every object whose key starts so) with another S3 client, e.g. `aws s3 rm`";

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out.replace('\n', " ")
}

/// The most objects one listing takes in: a VM's backups times their
/// volumes, far below this.
const MAX_LISTED: usize = 1_000_000;

/// `text` with every secret (of 4 bytes or more) replaced by `***`.
pub(super) fn redact(secrets: &[String], text: &str) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

/// The body of `got`, read chunk by chunk: `Err(n)` as soon as more than
/// `cap` bytes have come (a server may stream more than its
/// `Content-Length` said), so a hostile response cannot fill the memory.
pub(crate) async fn body_capped(
    got: object_store::GetResult,
    cap: u64,
) -> std::result::Result<std::result::Result<bytes::Bytes, u64>, object_store::Error> {
    use futures::StreamExt;
    let mut stream = got.into_stream();
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Ok(Err(out.len() as u64 + chunk.len() as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Ok(out.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET response whose body is `chunks`, whatever its metadata says.
    fn response(chunks: Vec<&'static [u8]>) -> object_store::GetResult {
        use futures::StreamExt;
        let stream = futures::stream::iter(chunks.into_iter().map(|c| Ok(bytes::Bytes::from_static(c)))).boxed();
        object_store::GetResult {
            payload: object_store::GetResultPayload::Stream(stream),
            meta: object_store::ObjectMeta {
                location: Key::from("k"),
                last_modified: chrono::DateTime::<chrono::Utc>::MIN_UTC,
                size: 10,
                e_tag: None,
                version: None,
            },
            range: 0..10,
            attributes: Default::default(),
        }
    }

    #[test]
    fn a_body_longer_than_asked_is_cut_off_as_it_comes() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let chunk: &'static [u8] = &[7u8; 10];
        // Metadata says 10 bytes; the body streams 30.
        let got = rt.block_on(body_capped(response(vec![chunk, chunk, chunk]), 10)).unwrap();
        assert_eq!(got, Err(20), "stopped at the first chunk past the cap");
        let got = rt.block_on(body_capped(response(vec![chunk, chunk, chunk]), 30)).unwrap();
        assert_eq!(got.map(|b| b.len()), Ok(30));
    }

    #[test]
    fn secrets_are_blanked_out() {
        let s = vec!["AKIDSECRET".to_string(), "abc".to_string()];
        assert_eq!(redact(&s, "key AKIDSECRET and abc"), "key *** and abc");
    }

    #[test]
    fn vault_locations_are_told_apart() {
        assert!(is_vault("s3://b/p"));
        assert!(!is_vault("/srv/store"));
        assert!(!is_vault("s3:/b"));
    }
}
