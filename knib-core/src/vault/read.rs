//! Reading backups straight from a vault: restore (flattened to qcow2 or
//! raw), verify (every object's hash, tables and refcounts) and the disk
//! of a volume for file-level restore, all through knib's qcow2 reader
//! over ranged GETs ([`RemoteObject`]): nothing is downloaded whole first.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as Key;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use super::object::{BlockCache, RemoteObject};
use super::Vault;
use crate::catalog::{Manifest, VerifyReport};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qcow2::{Chain, CompressionType, FileSink, ImageSpec, Layout, Qcow2Image, WriteBehind};
use crate::qemu_img::ImageFormat;

/// The read cache of one chain's objects, one budget shared among them
/// (whatever the chain's depth): 12 blocks, enough for the read-ahead of
/// three layers read at once.
pub const CHAIN_CACHE_BYTES: u64 = 3 << 20;
/// Guest bytes read per step of a restore.
const RESTORE_CHUNK: usize = 256 << 10;

/// What a restore from a vault did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VaultRestore {
    /// The backup.
    pub backup: String,
    /// The volume.
    pub volume: String,
    /// The image written.
    pub path: std::path::PathBuf,
    /// Bytes fetched from the vault.
    pub bytes_fetched: u64,
    /// Whether every object of the chain was checked against its hash.
    pub verified: bool,
}

/// What a verify of a vault found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VaultVerify {
    /// One report per backup.
    pub reports: Vec<VerifyReport>,
    /// Bytes fetched from the vault.
    pub bytes_fetched: u64,
}

/// One object of an opened chain.
struct Opened {
    object: Arc<RemoteObject>,
    backup: String,
    hash: Option<String>,
}

impl Vault {
    /// The HEAD of the object of `rel`: its length, checked against the
    /// manifest's size, and its ETag (the version every later read asks for).
    pub(super) fn object_len(&self, rel: &str, want: u64) -> Result<(u64, Option<String>)> {
        let key = self.key(rel);
        let Some((len, e_tag)) = self.head_len(&key)? else {
            return Err(KnibError::corrupt(format!(
                "object {} is missing from the vault, though its manifest is there",
                self.inner.show(&key)
            )));
        };
        if len != want {
            return Err(KnibError::corrupt(format!(
                "object {} is {len} bytes long, its manifest says {want}: the vault was damaged",
                self.inner.show(&key)
            )));
        }
        Ok((len, e_tag))
    }

    /// The length and ETag of object `key` (a full key), or `None` when
    /// there is no such object.
    pub(super) fn head_len(&self, key: &Key) -> Result<Option<(u64, Option<String>)>> {
        let s3 = Arc::clone(&self.inner.s3);
        let k = key.clone();
        match self.block_on(async move { s3.head(&k).await }) {
            Ok(meta) => Ok(Some((meta.size, meta.e_tag))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.inner.error("cannot read", &e)),
        }
    }

    /// Open volume `volume` of `m`'s chain as a qcow2 [`Chain`] over ranged
    /// reads: each object's qcow2 header must hold the backing pointer the
    /// manifests say. With `hash`, each object's hash is taken as it is read.
    fn open_chain(&self, m: &Manifest, volume: &str, hash: bool) -> Result<(Chain, Vec<Opened>)> {
        let chain = self.chain(m)?;
        // Refused before any object is opened (each holds its L1 table).
        if chain.len() > crate::qcow2::MAX_CHAIN_DEPTH {
            return Err(KnibError::corrupt(format!(
                "backup {} in vault {}: its chain has {} backups, more than the {} files a qcow2 chain may have",
                m.id,
                self.location(),
                chain.len(),
                crate::qcow2::MAX_CHAIN_DEPTH
            )));
        }
        super::keep_large_buffers_mapped();
        let cache = BlockCache::new(CHAIN_CACHE_BYTES);
        let mut images = Vec::new();
        let mut opened = Vec::new();
        let mut below: Option<(String, String)> = None;
        for b in &chain {
            let v = b.volume(volume)?;
            let want = below.as_ref().map(|(id, file)| format!("../{id}/{file}"));
            if v.backing != want {
                return Err(KnibError::corrupt(format!(
                    "manifest of backup {} in vault {}: volume {volume} has backing {:?}, but its parent's file is {:?}",
                    b.id,
                    self.location(),
                    v.backing,
                    want
                )));
            }
            let rel = Self::volume_rel(b, &v.file);
            let (len, etag) = self.object_len(&rel, v.size)?;
            let object = Arc::new(RemoteObject::new(
                Arc::clone(&self.inner),
                self.key(&rel),
                len,
                etag,
                Arc::clone(&cache),
                hash,
            ));
            let name = object.name();
            let img = Qcow2Image::from_source(name.clone(), object.clone()).map_err(|e| {
                if e.kind == ErrorKind::InvalidInput {
                    KnibError::corrupt(format!("backup {}: object {name}: {}", b.id, e.message))
                } else {
                    e
                }
            })?;
            if img.header().backing_file != want {
                return Err(KnibError::corrupt(format!(
                    "object {name}: its qcow2 backing pointer is {:?}, the manifest says {want:?}; \
                     knib reads no chain the manifests do not describe",
                    img.header().backing_file
                )));
            }
            images.push(img);
            opened.push(Opened { object, backup: b.id.clone(), hash: v.hash.clone() });
            below = Some((b.id.clone(), v.file.clone()));
        }
        images.reverse();
        let mut images = images.into_iter();
        let top = images.next().ok_or_else(|| KnibError::internal("a chain without a file"))?;
        Ok((Chain::from_images(top, images.collect())?, opened))
    }

    /// [`Vault::open_chain`] for reading the volume's data: its top
    /// object's header must give it the virtual size its manifest records
    /// (else a header changed since it was sent would size what a restore
    /// writes, up to the largest a qcow2 header can claim).
    fn open_chain_sized(&self, m: &Manifest, volume: &str, hash: bool) -> Result<(Chain, Vec<Opened>)> {
        let (chain, opened) = self.open_chain(m, volume, hash)?;
        let want = m.volume(volume)?.virtual_size;
        if chain.virtual_size() != want {
            let top = opened.last().map(|o| o.object.name()).unwrap_or_default();
            return Err(KnibError::corrupt(format!(
                "object {top}: its qcow2 header gives volume {volume} a virtual size of {} bytes, the manifest {want}: the object changed since it was sent; nothing is read from it",
                chain.virtual_size()
            )));
        }
        Ok((chain, opened))
    }

    /// Restore volume `volume` of backup `id` from the vault to `to` (which
    /// must not exist), flattened, as `format`. With `verify`, every object
    /// of the chain is checked against its recorded hash from the bytes the
    /// restore reads (and what it skipped); a mismatch is a `corrupt` error
    /// naming the object, and nothing is left at `to`.
    pub fn restore(
        &self,
        id: &str,
        volume: &str,
        to: &Path,
        format: ImageFormat,
        verify: bool,
        ctl: &Control,
    ) -> Result<VaultRestore> {
        let m = self.show(id)?;
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(KnibError::invalid(format!("{} already exists; it is not overwritten", to.display())));
        }
        let dir = fsio::parent_dir(to);
        if !dir.is_dir() {
            return Err(KnibError::not_found(format!("directory {} does not exist", dir.display())));
        }
        let before = self.bytes_fetched();
        let (mut chain, opened) = self.open_chain_sized(&m, volume, verify)?;
        let tmp = fsio::TempFile::beside(to)?;
        write_flat(
            &mut chain,
            tmp.path(),
            tmp.file(),
            format,
            &format!("restore of {volume} of {id} from the vault"),
            ctl,
        )?;
        if verify {
            check_hashes(&opened, ctl)?;
        }
        tmp.commit(to, false)?;
        Ok(VaultRestore {
            backup: id.to_string(),
            volume: volume.to_string(),
            path: to.to_path_buf(),
            bytes_fetched: self.bytes_fetched() - before,
            verified: verify,
        })
    }

    /// The qcow2 chain of volume `volume` of backup `id`, read by ranged
    /// GETs (only the tables and clusters asked for; their hashes are not
    /// checked: that takes the whole objects, `verify` does it), and a name
    /// for it in messages: what file-level restore opens (`files::Disk::open_vault`).
    pub fn volume_chain(&self, id: &str, volume: &str) -> Result<(Chain, String)> {
        let m = self.show(id)?;
        let (chain, _) = self.open_chain_sized(&m, volume, false)?;
        Ok((chain, format!("volume {volume} of backup {id} in vault {}", self.location())))
    }

    /// Verify one backup, or every backup of the vault: each object of its
    /// chains opened as qcow2 with its backing pointer as the manifests
    /// say, its own objects' refcounts checked, and every byte of its
    /// objects read and held against the recorded hash: of every object of
    /// its chains for one backup, of its own objects when every backup is
    /// verified (each object is then read once), and of those of the
    /// removed backups its chains read (deleted, kept for the backups that
    /// read them: no report of their own checks them; each read once, its
    /// problem told in the report of every backup that reads it). A backup found bad is a
    /// report with `ok` false; so is, when every backup is verified, a
    /// backup whose manifest cannot be read (a listing skips it, a verify
    /// must not hide it), under its id.
    pub fn verify(&self, id: Option<&str>, ctl: &Control) -> Result<VaultVerify> {
        let before = self.bytes_fetched();
        let mut reports = Vec::new();
        let mut kept = Kept::default();
        if let Some(id) = id {
            reports.push(self.verify_one(&self.show(id)?, true, &mut kept, ctl)?);
        } else {
            for vm in self.vms()? {
                let (manifests, unreadable) = self.scan_backups(&vm)?;
                kept.removed.extend(manifests.iter().filter(|m| m.removed).map(|m| (vm.clone(), m.id.clone())));
                for m in manifests.iter().filter(|m| !m.removed) {
                    reports.push(self.verify_one(m, false, &mut kept, ctl)?);
                }
                for id in unreadable {
                    // Read again: mended meanwhile, it is verified as any other.
                    match self.load_manifest(&vm, &id) {
                        Ok(None) => {}
                        Ok(Some(m)) if m.removed => {}
                        Ok(Some(m)) => reports.push(self.verify_one(&m, false, &mut kept, ctl)?),
                        Err(e) if not_damage(&e) => return Err(e),
                        Err(e) => reports.push(VerifyReport::unreadable(id, &vm, &e)),
                    }
                }
            }
        }
        Ok(VaultVerify { reports, bytes_fetched: self.bytes_fetched() - before })
    }

    /// The checks of backup `m`: what was found bad is the report's
    /// problems; what stopped the checks without saying anything of the
    /// backup ([`not_damage`]) is the error. Without `whole_chain`, the
    /// objects hashed are the backup's own and those of the removed
    /// backups of `kept` its chains read (each once for all reports).
    fn verify_one(&self, m: &Manifest, whole_chain: bool, kept: &mut Kept, ctl: &Control) -> Result<VerifyReport> {
        let mut problems = Vec::new();
        let mut files_checked = 0;
        crate::crashpoint::pause_point(&format!("verify of {} in the vault", m.id));
        for v in &m.volumes {
            ctl.check(&format!("verify of {} in the vault", m.id))?;
            let (mut chain, opened) = match self.open_chain(m, &v.name, true) {
                Ok(c) => c,
                Err(e) if not_damage(&e) => return Err(e),
                Err(e) => {
                    problems.push(e.message);
                    continue;
                }
            };
            let own = opened.last().expect("a chain has an object");
            if chain.virtual_size() != v.virtual_size {
                problems.push(format!(
                    "{}: virtual size is {}, the manifest says {}",
                    own.object.name(),
                    chain.virtual_size(),
                    v.virtual_size
                ));
            }
            match chain.top_mut().check_refcounts(ctl) {
                Ok(r) if r.is_clean() => {}
                Ok(r) => problems.push(format!(
                    "{}: {} corruptions, {} leaks: {}",
                    own.object.name(),
                    r.corruptions,
                    r.leaks,
                    r.problems.join("; ")
                )),
                Err(e) if not_damage(&e) => return Err(e),
                Err(e) => problems.push(e.message),
            }
            for o in &opened {
                let removed =
                    !whole_chain && o.backup != m.id && kept.removed.contains(&(m.vm.clone(), o.backup.clone()));
                if !(whole_chain || o.backup == m.id || removed) {
                    continue;
                }
                if let Some(found) = removed.then(|| kept.found.get(&o.object.name())).flatten() {
                    problems.extend(found.clone());
                    continue;
                }
                ctl.check(&format!("verify of {} in the vault", m.id))?;
                files_checked += 1;
                let found = match o.object.finish_hash(ctl) {
                    Ok(Some(h)) if Some(&h) != o.hash.as_ref() => Some(format!(
                        "{}: hash {h} differs from the recorded {}: the object changed since it was sent",
                        o.object.name(),
                        o.hash.as_deref().unwrap_or("(none)")
                    )),
                    Ok(_) => None,
                    Err(e) if not_damage(&e) => return Err(e),
                    Err(e) => Some(e.message),
                };
                let found = found.map(|f| {
                    if removed {
                        format!("{f} (backup {}, deleted, is kept because this backup reads it)", o.backup)
                    } else {
                        f
                    }
                });
                if removed {
                    kept.found.insert(o.object.name(), found.clone());
                }
                problems.extend(found);
            }
        }
        Ok(VerifyReport {
            id: m.id.clone(),
            ok: problems.is_empty(),
            problems,
            files_checked,
            chain_hashes: BTreeMap::new(),
        })
    }
}

/// The removed backups a verify of every backup hashes through the backups
/// that read them, and what each of their objects was found to be.
#[derive(Default)]
struct Kept {
    /// By VM and id (ids are unique within a VM).
    removed: std::collections::HashSet<(String, String)>,
    /// By object name: the problem found, `None` when it was sound.
    found: std::collections::HashMap<String, Option<String>>,
}

/// An error of a vault's verify that says nothing of the backup verified:
/// the caller's cancellation or time budget, or the vault not answering
/// (unreachable, refusing the credentials: an I/O error of the S3 client,
/// where what the vault holds is found wrong as `Corrupt` or `NotFound`).
/// The verify fails with it rather than report a whole backup as bad.
fn not_damage(e: &KnibError) -> bool {
    matches!(e.kind, ErrorKind::Cancelled | ErrorKind::Timeout | ErrorKind::Io)
}

/// The hash of each object of a restored chain against its manifest's.
fn check_hashes(opened: &[Opened], ctl: &Control) -> Result<()> {
    for o in opened {
        ctl.check("hash of the vault's objects")?;
        let got = o.object.finish_hash(ctl)?;
        match (&got, &o.hash) {
            (Some(g), Some(w)) if g == w => {}
            (Some(g), Some(w)) => {
                return Err(KnibError::corrupt(format!(
                    "backup {}: object {} has hash {g}, its manifest says {w}: the vault's copy is damaged; nothing was restored",
                    o.backup,
                    o.object.name()
                )))
            }
            _ => return Err(KnibError::internal("an object of the vault without its hash")),
        }
    }
    Ok(())
}

/// Write the guest-visible bytes of `chain` to `dest`: raw
/// (sparse) or qcow2 (clusters that read as zeros left unallocated).
/// `dest` names `made`, the empty file made for it ([`fsio::TempFile`]),
/// written through its handle, never reopened by name (a hard link swapped
/// in under the name had its file written).
fn write_flat(
    chain: &mut Chain,
    dest: &Path,
    made: &std::fs::File,
    format: ImageFormat,
    step: &str,
    ctl: &Control,
) -> Result<()> {
    let size = chain.virtual_size();
    let bits = chain.top().header().cluster_bits;
    let cs = 1usize << bits;
    let file = made.try_clone().map_err(|e| KnibError::io("cannot open", dest, e))?;
    let mut layout = match format {
        ImageFormat::Qcow2 => {
            let spec =
                ImageSpec { virtual_size: size, cluster_bits: bits, backing: None, compression: CompressionType::Zlib };
            let f = file.try_clone().map_err(|e| KnibError::io("cannot open", dest, e))?;
            Some(Layout::new(spec, FileSink::new_behind_inline(f, dest, false), None)?)
        }
        ImageFormat::Raw => None,
    };
    let chunk = RESTORE_CHUNK.max(cs);
    let mut buf = vec![0u8; chunk];
    // A raw output is written behind as a qcow2 one is (by its sink).
    let mut behind = WriteBehind::new();
    let mut offset = 0u64;
    ctl.report(step, 0.0);
    while offset < size {
        ctl.check(step)?;
        let n = (chunk as u64).min(size - offset) as usize;
        buf.fill(0);
        chain.read_at(offset, &mut buf[..n])?;
        // Whole clusters (the last one padded with zeros).
        let whole = n.div_ceil(cs) * cs;
        for (k, c) in buf[..whole].chunks(cs).enumerate() {
            if c.iter().all(|&b| b == 0) {
                continue;
            }
            let at = offset + (k * cs) as u64;
            match layout.as_mut() {
                Some(l) => l.push_data(at >> bits, c)?,
                None => {
                    let len = (c.len() as u64).min(size - at) as usize;
                    file.write_all_at(&c[..len], at).map_err(|e| KnibError::io("cannot write", dest, e))?;
                    behind.wrote(&file, at, len as u64).map_err(|e| KnibError::io("cannot write", dest, e))?;
                }
            }
        }
        offset += n as u64;
        ctl.report(step, offset as f64 * 100.0 / size as f64);
    }
    match layout {
        Some(l) => {
            let (header, sink, _) = l.finish()?;
            let (f, _) = sink.finish()?;
            f.write_all_at(&header, 0).map_err(|e| KnibError::io("cannot write", dest, e))?;
        }
        None => {
            behind.finish(&file).map_err(|e| KnibError::io("cannot write", dest, e))?;
            file.set_len(size).map_err(|e| KnibError::io("cannot size", dest, e))?
        }
    }
    file.sync_all().map_err(|e| KnibError::io("cannot fsync", dest, e))
}
