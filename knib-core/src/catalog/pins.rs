//! The quick restores that read the store's files: one record per overlay
//! (`pins/<backup>.<n>.json`: the VM, the backup, the volume and the
//! overlay's absolute path), written when the overlay is made, so that a
//! delete never removes a file a quick-restored disk still reads as its
//! backing file.
//!
//! # Invariants
//!
//! - A backup an overlay still reads is not removed from disk: deleting it
//!   is refused (busy, naming the overlay), and a removed ancestor reached
//!   by a delete's cascade is kept.
//! - A record is live while its overlay exists and its backing file is
//!   one of the backup's volume files (the same file, by device and
//!   inode, whatever path reaches the store), or while it cannot be told:
//!   the overlay is on another host (the record names the host that made
//!   it), or its backing file is not found from here. Otherwise (the
//!   overlay removed, or consolidated so that it reads the backup no more)
//!   it is stale and removed by the delete that finds it.
//! - A record is store content, so hostile input: it is read without
//!   following links, capped, and must name the backup it is filed under;
//!   the overlay it names must be an absolute path, is only opened (when
//!   it is a regular file or a block device) read-only to read its header,
//!   and at worst a record makes a delete refuse.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{confine, Manifest, Store};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::qcow2::Qcow2Image;

/// One quick restore's overlay.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    vm: String,
    backup: String,
    volume: String,
    overlay: PathBuf,
    /// The host that made the overlay (records without it are this
    /// host's): another host's overlay cannot be looked at from here, so
    /// its record is always live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    fn pins_rel() -> &'static Path {
        Path::new("pins")
    }

    /// Record that `overlay` reads (or is about to read) volume `volume` of
    /// backup `m`: written before the overlay is made.
    pub(super) fn pin(&self, m: &Manifest, volume: &str, overlay: &Path) -> Result<()> {
        self.ensure_dir(Self::pins_rel(), "quick-restore records directory")?;
        // The overlay is not made yet: its directory resolved, its name kept.
        let name = overlay
            .file_name()
            .ok_or_else(|| KnibError::invalid(format!("overlay {} has no file name", overlay.display())))?;
        let dir = fsio::parent_dir(overlay);
        let overlay = fs::canonicalize(dir).map_err(|e| KnibError::io("cannot resolve", dir, e))?.join(name);
        let ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("{}.{ns:x}-{}-{}.json", m.id, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let host = Some(super::jobs::ownership::hostname());
        let pin = Pin { vm: m.vm.clone(), backup: m.id.clone(), volume: volume.to_string(), overlay, host };
        let text =
            serde_json::to_vec_pretty(&pin).map_err(|e| KnibError::internal(format!("quick-restore record: {e}")))?;
        fsio::write_atomic(&self.root.join(Self::pins_rel()).join(name), &text)
    }

    /// The overlays that still read backup `m`'s files; the stale records
    /// of `m` are removed.
    pub(super) fn live_pins(&self, m: &Manifest) -> Result<Vec<PathBuf>> {
        let dir = self.root.join(Self::pins_rel());
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(KnibError::io("cannot list", &dir, e)),
        };
        let prefix = format!("{}.", m.id);
        let files: Vec<PathBuf> = m.volumes.iter().filter_map(|v| self.volume_file(m, &v.name).ok()).collect();
        let here = super::jobs::ownership::hostname();
        let mut live = Vec::new();
        for e in entries {
            let e = e.map_err(|e| KnibError::io("cannot list", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(&prefix) && name.ends_with(".json")) {
                continue;
            }
            let rel = Self::pins_rel().join(&name);
            let Some(text) = confine::read(&self.root, &rel, "quick-restore record")? else { continue };
            let path = self.root.join(&rel);
            let pin: Pin = serde_json::from_slice(&text).map_err(|e| {
                KnibError::corrupt(format!("quick-restore record {} does not parse: {e}", path.display()))
            })?;
            if !pin.overlay.is_absolute() {
                return Err(KnibError::corrupt(format!(
                    "quick-restore record {} names overlay {}, not an absolute path (knib writes it canonical)",
                    path.display(),
                    pin.overlay.display()
                )));
            }
            if pin.backup != m.id || pin.vm != m.vm {
                return Err(KnibError::corrupt(format!(
                    "quick-restore record {} names backup {} of VM {}, not {} of {}",
                    path.display(),
                    pin.backup,
                    pin.vm,
                    m.id,
                    m.vm
                )));
            }
            if let Some(host) = pin.host.as_deref().filter(|h| *h != here) {
                log::info!(
                    "quick-restore record {}: overlay {} is on host {host}, not looked at from {here}; counted as still reading backup {}",
                    path.display(),
                    pin.overlay.display(),
                    m.id
                );
                live.push(pin.overlay);
                continue;
            }
            if reads_one_of(&pin.overlay, &files)? {
                live.push(pin.overlay);
            } else {
                log::info!(
                    "quick-restore record {}: {} reads backup {} no more",
                    path.display(),
                    pin.overlay.display(),
                    m.id
                );
                fsio::remove_if_exists(&path)?;
            }
        }
        Ok(live)
    }

    /// A "busy" error when quick restores still read backup `m`'s files.
    pub(super) fn refuse_while_pinned(&self, m: &Manifest) -> Result<()> {
        let live = self.live_pins(m)?;
        if live.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = live.iter().map(|p| p.display().to_string()).collect();
        Err(KnibError::busy(format!(
            "backup {} is the backing file of quick-restored disks ({}): consolidate them (`knib consolidate`) or \
             remove them first",
            m.id,
            list.join(", ")
        )))
    }
}

/// Whether the qcow2 file `overlay` exists and its backing file is one of
/// `files`, compared as files (device and inode: the store reached by
/// another path, a bind mount, is the same store).
///
/// Only a regular file or a block device is opened: a FIFO there would
/// make the delete wait forever with the VM locked, and a device may act
/// on being opened. Anything else is kept as live, as what cannot be read.
fn reads_one_of(overlay: &Path, files: &[PathBuf]) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match fs::metadata(overlay) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Ok(md) if !(md.is_file() || md.file_type().is_block_device()) => {
            log::warn!(
                "quick-restore overlay {} is neither a regular file nor a block device; counted as still reading \
                 its backup",
                overlay.display()
            );
            return Ok(true);
        }
        _ => {}
    }
    let img = match Qcow2Image::open(overlay) {
        Ok(i) => i,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(false),
        // What cannot be read is kept as live: a delete must not guess.
        Err(e) => {
            log::warn!("quick-restore overlay {}: {e}; counted as still reading its backup", overlay.display());
            return Ok(true);
        }
    };
    let Some(b) = img.header().backing_file.clone() else { return Ok(false) };
    let b = Path::new(&b);
    let b = if b.is_absolute() { b.to_path_buf() } else { fsio::parent_dir(overlay).join(b) };
    if fs::metadata(&b).is_err() {
        // Not found from here (the overlay names the store by a path this
        // host does not have): it cannot be told apart, so it is kept.
        log::warn!(
            "quick-restore overlay {}: its backing file {} is not found from here; counted as still reading its backup",
            overlay.display(),
            b.display()
        );
        return Ok(true);
    }
    Ok(files.iter().any(|f| fsio::same_file(&b, f)))
}
