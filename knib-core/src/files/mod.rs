//! File-level restore: the filesystems and files of a backup, read straight
//! from its qcow2 chain in the store (any backup of a chain, compressed or
//! not): no restore of the whole disk, no root, no kernel module, no mount.
//! These are the `files.*` ops of [`crate::api::call`].
//!
//! # Layers
//!
//! - [`device`]: the volume's guest-visible disk, read-only, through a
//!   small cache (4 MiB), and windows onto its partitions;
//! - [`partition`]: GPT (CRC-checked, backup header used when the primary
//!   is damaged) and MBR (primary, extended, logical) tables;
//! - [`detect`]: which filesystem a partition holds, from magic numbers;
//! - [`fs`]: the one trait of the filesystem readers: ext2/3/4 through the
//!   `ext4-view` crate, FAT12/16/32 by knib's own reader (see `fat.rs` for
//!   why not the `fatfs` crate), NTFS through the `ntfs` crate; anything
//!   else through libguestfs (`guestfish --ro`) when it is installed, or a
//!   clear error naming the filesystem found.
//!
//! # Operations (JSON, schema 1)
//!
//! `files.fs`, `files.ls` and `files.get`: their requests and answers are
//! the structs at the end of this module (JSON Schema in
//! `docs/schema.json`, fields in the README's operation table).
//!
//! The backup is named either by `store`, `backup` and `volume` (a backup
//! of knib's catalog) or by `backup_path`: the absolute path of a qcow2
//! file (a CloudStack backup, which has no catalog), its chain following
//! the backing pointers, relative or absolute. Every file of such a chain
//! is opened read-only, must be a regular qcow2 file and is checked as
//! hostile input; a chain that loops, is deeper than 64 files or names a
//! missing file is refused naming the file.
//!
//! - `files.fs`: `index` is what `fs` names (1, 2, ...); `partition` the
//!   partition's number (MBR 1-4 primary, 5+ logical; GPT entry number), or
//!   null for a filesystem on the whole disk; `start` and `size` in bytes;
//!   `type` as blkid names it ("ext4", "vfat", "ntfs", or one knib does not
//!   read: "xfs", "btrfs", "LVM2_member", "swap", ..., "unknown"); `label`
//!   or null; `device` the name libguestfs gives it (`/dev/sdaN`, or
//!   `/dev/sda` for the whole disk), as CloudStack's agent names it.
//! - `fs` is the `index` (a number) or the `device` (a string) of a
//!   filesystem; it may be left out when exactly one filesystem of the
//!   volume is read natively; with several, the error names the choices.
//! - `files.ls`: the entries of directory `path` (sorted by name; a file's
//!   path gives that one entry). `type` is "file", "dir", "symlink" or
//!   "other"; `mode` the permission bits (`0o7777`, as a number); `mtime`
//!   seconds since the epoch and `mtime_nsec` its nanoseconds; `target`
//!   only for symlinks (shown, never followed). Names that are not UTF-8
//!   are shown lossily.
//! - `files.get`: extracts file or directory `path` to the local path `to`.
//!
//! # Paths
//!
//! A requested path is taken from the filesystem's root (`/a/b` and `a/b`
//! are the same; `.` and empty components are ignored). A `..` component
//! is refused (InvalidInput naming the path). Symlinks met on the way (the
//! last component included) are followed inside the filesystem: a relative
//! target from the link's directory; a target that is absolute, or whose
//! `..` would climb above the filesystem's root, leaves the filesystem and
//! is refused (InvalidInput naming the link and its target). At most 40
//! links are followed.
//!
//! # `get`
//!
//! - `to` must not exist yet (like `knib restore`); its parent must be a
//!   directory. Everything is written under a temporary sibling name
//!   (`.<name>.knib-<pid>-<n>.part`, the name cut at 200 bytes) and renamed into place at the end
//!   (never replacing anything), so a failure or a cancellation leaves
//!   nothing half-written.
//! - A directory is extracted as a tree: regular files with their bytes
//!   (streamed in 1 MiB chunks, never whole in memory; runs of zeros left
//!   as holes), directories, and symlinks recreated as symlinks with their
//!   targets as stored (never followed; nothing is written through a link:
//!   every entry is created relative to its parent's descriptor with
//!   `O_EXCL | O_NOFOLLOW`). Devices, fifos and sockets are left out.
//! - Modes and modification times are set on every entry (directories'
//!   after their children); setuid and setgid bits are dropped and owners
//!   are not set (the files belong to whoever extracts them).
//! - Progress is reported as bytes of file data over the total; the
//!   operation stops at cancellation or deadline.
//! - Damaged structures are errors (Corrupt, naming what was wrong): a
//!   directory met again below itself, a cluster chain or directory that
//!   loops, a file shorter than its size, a name that cannot be a file name.
//! - What one extraction may make is bounded by its filesystem's size (a
//!   guest can cross-link entries, make zeros holes and files empty): at
//!   most 4 times that size plus 1 GiB of file data read, its size of data
//!   written, as many entries as it can hold (its size over 12 bytes for
//!   ext4, 32 for FAT, 80 for NTFS), and as many entries listed and held
//!   at once (the listings of the directories from the top down to the
//!   one being walked, which cross-linked directories can share). Beyond
//!   that is Corrupt, mostly found before anything is written (see
//!   [`extract`]).
//!
//! # Filesystem specifics
//!
//! - ext2/3/4: modes, mtimes with nanoseconds and symlinks as stored.
//! - FAT: no modes, symlinks or time zones: files are `0o644` (`0o444`
//!   with the read-only attribute), directories `0o755`; times are read
//!   as UTC, 2-second resolution. Name lookups ignore case.
//! - NTFS: no Unix modes: files `0o644` (`0o444` read-only), directories
//!   `0o755`; times with 100 ns resolution; reparse points (links,
//!   junctions) are "other". Name lookups ignore case.

pub mod detect;
pub mod device;
mod ext4;
pub mod extract;
pub mod fallback;
mod fat;
pub mod fs;
mod ntfs;
mod ops;
pub mod partition;
mod path;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::catalog::Store;
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

use detect::{Detected, Native};
use device::{Device, SharedDevice, Window};
use fs::{display, Filesystem, Kind, Node};

pub use extract::GetSummary;
pub(crate) use ops::{fs_op, get_op, ls_op, FsReq, GetReq, LsReq};
pub use ops::{EntriesAnswer, FilesystemsAnswer};
pub use path::MAX_LINKS;
pub(crate) use path::{parse_path, resolve};

/// One filesystem of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct FsInfo {
    /// What `fs` names it by (1, 2, ...).
    pub index: u32,
    /// The partition's number, `None` for the whole disk.
    pub partition: Option<u32>,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// blkid's name of its type ("ext4", "vfat", "ntfs", "xfs", ...,
    /// "unknown").
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Its label.
    pub label: Option<String>,
    /// The name libguestfs gives it: `/dev/sdaN`, or `/dev/sda` for the
    /// whole disk (what CloudStack's agent calls the filesystem).
    pub device: String,
}

/// Which filesystem of a disk: its `index` or its `device` name (see
/// [`FsInfo`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a filesystem's index (1, 2, ...) or its device name (\"/dev/sda1\")")]
pub enum FsRef {
    /// Its `index`.
    Index(u32),
    /// Its `device`.
    Device(String),
}

impl std::fmt::Display for FsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsRef::Index(n) => write!(f, "{n}"),
            FsRef::Device(d) => write!(f, "{d:?}"),
        }
    }
}

/// One directory entry as `ls` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct EntryInfo {
    /// Its name (lossy when not UTF-8).
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Length in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Its nanoseconds.
    pub mtime_nsec: u32,
    /// A symlink's target (only for symlinks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The disk of one volume of a backup, its partitions and what they hold.
pub struct Disk {
    dev: SharedDevice,
    /// The qcow2 top file, for the libguestfs fallback.
    image: Option<PathBuf>,
    found: Vec<(FsInfo, Detected)>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("device", &self.dev.borrow().name()).field("found", &self.found).finish()
    }
}

/// A filesystem opened for reading.
enum Mounted {
    Native(Box<dyn Filesystem>),
    Guest(fallback::Guest),
}

impl Disk {
    /// The disk of volume `volume` of backup `backup` in `store`.
    pub fn open_backup(store: &Store, backup: &str, volume: &str, ctl: &Control) -> Result<Disk> {
        let m = store.show(backup)?;
        let file = store.chain_files(&m, volume)?.pop().expect("a chain has a file");
        let name = format!("volume {volume} of backup {backup}");
        Disk::open_named(&file, name, ctl)
    }

    /// The disk of the qcow2 image at `path` (with its backing chain).
    pub fn open_image(path: &Path, ctl: &Control) -> Result<Disk> {
        Disk::open_named(path, path.display().to_string(), ctl)
    }

    /// The disk of the backup file at `path`, named from outside (a
    /// CloudStack backup): `path` must be absolute, and its chain is
    /// opened by [`crate::qcow2::Chain::open_files_only`] (regular qcow2
    /// files only).
    ///
    /// Errors: InvalidInput for a relative path, a file of the chain that
    /// is not a regular qcow2 file; NotFound for a missing file; Corrupt
    /// for a chain that loops, leaves the backup file's filesystem, or a
    /// damaged image; each naming the file.
    pub fn open_backup_file(path: &Path, ctl: &Control) -> Result<Disk> {
        if !path.is_absolute() {
            return Err(KnibError::invalid(format!("backup_path {} is not an absolute path", path.display())));
        }
        let dev = Device::open_files_only(path, format!("backup {}", path.display()), ctl)?.shared();
        let mut d = Disk::scan(dev)?;
        d.image = Some(path.to_path_buf());
        Ok(d)
    }

    fn open_named(path: &Path, name: String, ctl: &Control) -> Result<Disk> {
        let dev = Device::open(path, name, ctl)?.shared();
        let mut d = Disk::scan(dev)?;
        d.image = Some(path.to_path_buf());
        Ok(d)
    }

    /// The disk of a chain opened by the caller (a volume of a backup in
    /// a vault); `name` names it in messages. Filesystems knib does not
    /// read natively are refused (the libguestfs fallback needs a file).
    pub fn open_chain(chain: crate::qcow2::Chain, name: String, ctl: &Control) -> Result<Disk> {
        Disk::scan(Device::from_chain(chain, name, ctl).shared())
    }

    /// The disk of volume `volume` of backup `backup` in the vault at
    /// `location` (`s3://bucket/prefix`), read by ranged requests: only the
    /// tables and clusters the filesystem reader asks for (their hashes are
    /// not checked, which takes the whole objects: `verify` does it).
    pub fn open_vault(location: &str, backup: &str, volume: &str, ctl: &Control) -> Result<Disk> {
        let (chain, name) = crate::vault::Vault::open(location)?.volume_chain(backup, volume)?;
        Disk::open_chain(chain, name, ctl)
    }

    /// A disk held in memory (tests, fuzzing).
    pub fn from_bytes(data: Vec<u8>) -> Result<Disk> {
        Disk::scan(Device::from_bytes(data, "disk in memory").shared())
    }

    fn scan(dev: SharedDevice) -> Result<Disk> {
        let size = dev.borrow().size();
        let whole = Window::new(dev.clone(), 0, size)?;
        let (_, parts) = partition::read_partitions(&whole)?;
        let mut found = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let w = Window::new(dev.clone(), p.start, p.size)?;
            let d = detect::detect(&w)?;
            let info = FsInfo {
                index: i as u32 + 1,
                partition: p.number,
                start: p.start,
                size: p.size,
                fs_type: d.name.clone(),
                label: d.label.clone(),
                device: fallback::device_name(p.number),
            };
            found.push((info, d));
        }
        let mut disk = Disk { dev, image: None, found };
        // Labels the magic does not give (FAT's root entry, NTFS's $Volume);
        // a filesystem that does not open keeps what the magic gave.
        for i in 0..disk.found.len() {
            if matches!(disk.found[i].1.native, Some(Native::Fat | Native::Ntfs)) {
                let label = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match disk.mount_at(i) {
                    Ok(Mounted::Native(mut f)) => f.label(),
                    _ => None,
                }));
                if let Ok(Some(l)) = label {
                    disk.found[i].0.label = Some(l);
                }
            }
        }
        Ok(disk)
    }

    /// What the disk is, for messages.
    pub fn name(&self) -> String {
        self.dev.borrow().name().to_string()
    }

    /// Its filesystems (one per partition, or one for the whole disk).
    pub fn filesystems(&self) -> Vec<FsInfo> {
        self.found.iter().map(|(i, _)| i.clone()).collect()
    }

    fn describe(&self, i: usize) -> String {
        let (info, _) = &self.found[i];
        let label = info.label.as_deref().map(|l| format!(" {l:?}")).unwrap_or_default();
        format!("{} ({}, {}{label})", info.index, fallback::place(info.partition), info.fs_type)
    }

    fn choices(&self) -> String {
        (0..self.found.len()).map(|i| self.describe(i)).collect::<Vec<_>>().join(", ")
    }

    /// The index in `found` of filesystem `fs`, or of the only one read
    /// natively.
    fn choose(&self, fs: Option<&FsRef>) -> Result<usize> {
        if self.found.is_empty() {
            // A partition table without a partition (a GPT of no entries).
            return Err(KnibError::invalid(format!(
                "{} has no partitions and no filesystem: its partition table is empty",
                self.name()
            )));
        }
        match fs {
            Some(r) => self
                .found
                .iter()
                .position(|(i, _)| match r {
                    FsRef::Index(n) => i.index == *n,
                    FsRef::Device(d) => i.device == *d,
                })
                .ok_or_else(|| {
                    let devices = self.found.iter().map(|(i, _)| i.device.as_str()).collect::<Vec<_>>().join(", ");
                    KnibError::invalid(format!(
                        "{} has no filesystem {r}; it has: {} (devices {devices})",
                        self.name(),
                        self.choices()
                    ))
                }),
            None => {
                let native: Vec<usize> = (0..self.found.len()).filter(|&i| self.found[i].1.native.is_some()).collect();
                match native.as_slice() {
                    [one] => Ok(*one),
                    [] if self.found.len() == 1 => Ok(0),
                    [] => Err(KnibError::invalid(format!(
                        "{} has no filesystem knib reads natively: {}; choose one with `fs` (--fs N)",
                        self.name(),
                        self.choices()
                    ))),
                    _ => Err(KnibError::invalid(format!(
                        "{} has {} filesystems knib can read: {}; choose one with `fs` (--fs N)",
                        self.name(),
                        native.len(),
                        native.iter().map(|&i| self.describe(i)).collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
        }
    }

    fn mount_at(&self, i: usize) -> Result<Mounted> {
        let (info, d) = &self.found[i];
        let w = Window::new(self.dev.clone(), info.start, info.size)?;
        let ctx = || format!("filesystem {} of {}", self.describe(i), self.name());
        let fs: Box<dyn Filesystem> = match d.native {
            Some(Native::Ext) => Box::new(ext4::Ext4Fs::open(w).map_err(|e| e.context(ctx()))?),
            Some(Native::Fat) => Box::new(fat::FatFs::open(w).map_err(|e| e.context(ctx()))?),
            Some(Native::Ntfs) => Box::new(ntfs::NtfsFs::open(w).map_err(|e| e.context(ctx()))?),
            None => {
                let guest =
                    self.image.as_deref().and_then(|img| fallback::Guest::find(img, &info.fs_type, info.partition));
                return match guest {
                    Some(g) => Ok(Mounted::Guest(g)),
                    None => Err(fallback::unsupported(&info.fs_type, info.partition).context(self.name())),
                };
            }
        };
        Ok(Mounted::Native(fs))
    }

    /// Run `f` on filesystem `fs` (see [`Disk::choose`]), errors given the
    /// filesystem as context; a panic in a reader is an Internal error.
    fn with_fs<T>(&self, fs: Option<&FsRef>, f: impl FnOnce(Mounted, &str) -> Result<T>) -> Result<T> {
        let i = self.choose(fs)?;
        let what = format!("filesystem {} of {}", self.describe(i), self.name());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self.mount_at(i)?, &what)));
        match r {
            Ok(r) => r.map_err(|e| {
                let named = e.message.contains(&what) || e.message.starts_with(&self.name());
                if matches!(e.kind, ErrorKind::Cancelled | ErrorKind::Timeout) || named {
                    e
                } else {
                    e.context(&what)
                }
            }),
            Err(p) => {
                let msg = crate::panic_log::payload_message(p.as_ref());
                Err(KnibError::internal(format!("{what}: the reader failed: {msg}")))
            }
        }
    }

    /// The entries of directory `path` of filesystem `fs` (a file's path
    /// gives that file's entry).
    pub fn list(&self, fs: Option<u32>, path: &str, ctl: &Control) -> Result<Vec<EntryInfo>> {
        self.list_in(fs.map(FsRef::Index).as_ref(), path, ctl)
    }

    /// [`Disk::list`] with the filesystem named by index or device.
    pub fn list_in(&self, fs: Option<&FsRef>, path: &str, ctl: &Control) -> Result<Vec<EntryInfo>> {
        let comps = parse_path(path)?;
        self.with_fs(fs, |m, _| match m {
            Mounted::Guest(g) => g.list(&display(&comps), ctl),
            Mounted::Native(mut f) => {
                let (canon, node) = resolve(f.as_mut(), path, &comps)?;
                let mut out = Vec::new();
                if node.kind == Kind::Dir {
                    for e in f.read_dir(&canon, &node)? {
                        let mut p = canon.clone();
                        p.push(e.name.clone());
                        out.push(entry_info(f.as_mut(), &p, &e.name, &e.node)?);
                    }
                    out.sort_by(|a, b| a.name.cmp(&b.name));
                } else {
                    let name = canon.last().cloned().unwrap_or_default();
                    out.push(entry_info(f.as_mut(), &canon, &name, &node)?);
                }
                Ok(out)
            }
        })
    }

    /// Extract file or directory `path` of filesystem `fs` to `to` (see the
    /// module's documentation).
    pub fn get(&self, fs: Option<u32>, path: &str, to: &Path, ctl: &Control) -> Result<GetSummary> {
        self.get_in(fs.map(FsRef::Index).as_ref(), path, to, ctl)
    }

    /// [`Disk::get`] with the filesystem named by index or device.
    pub fn get_in(&self, fs: Option<&FsRef>, path: &str, to: &Path, ctl: &Control) -> Result<GetSummary> {
        let comps = parse_path(path)?;
        self.with_fs(fs, |m, _| match m {
            Mounted::Guest(g) => g.get(&display(&comps), to, ctl),
            Mounted::Native(mut f) => {
                let (canon, node) = resolve(f.as_mut(), path, &comps)?;
                extract::extract(f.as_mut(), &canon, &node, to, &display(&canon), ctl)
            }
        })
    }
}

fn entry_info(f: &mut dyn Filesystem, path: &[Vec<u8>], name: &[u8], n: &Node) -> Result<EntryInfo> {
    let target =
        if n.kind == Kind::Symlink { Some(String::from_utf8_lossy(&f.read_link(path, n)?).into_owned()) } else { None };
    Ok(EntryInfo {
        name: String::from_utf8_lossy(name).into_owned(),
        kind: n.kind.as_str(),
        size: n.size,
        mode: n.mode,
        mtime: n.mtime,
        mtime_nsec: n.mtime_nsec,
        target,
    })
}

/// The filesystems of volume `volume` of backup `backup`.
pub fn filesystems(store: &Store, backup: &str, volume: &str, ctl: &Control) -> Result<Vec<FsInfo>> {
    Ok(Disk::open_backup(store, backup, volume, ctl)?.filesystems())
}

/// The entries of directory `path` of filesystem `fs` of a backup's volume.
pub fn list(
    store: &Store,
    backup: &str,
    volume: &str,
    fs: Option<u32>,
    path: &str,
    ctl: &Control,
) -> Result<Vec<EntryInfo>> {
    Disk::open_backup(store, backup, volume, ctl)?.list(fs, path, ctl)
}

/// Extract `path` of filesystem `fs` of a backup's volume to `to`.
#[allow(clippy::too_many_arguments)]
pub fn get(
    store: &Store,
    backup: &str,
    volume: &str,
    fs: Option<u32>,
    path: &str,
    to: &Path,
    ctl: &Control,
) -> Result<GetSummary> {
    Disk::open_backup(store, backup, volume, ctl)?.get(fs, path, to, ctl)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of `sectors` 512-byte sectors with a valid GPT (both headers)
    /// of no entries.
    fn empty_gpt(sectors: u64) -> Vec<u8> {
        let mut d = vec![0u8; (sectors * 512) as usize];
        d[510] = 0x55;
        d[511] = 0xaa;
        d[446 + 4] = 0xee;
        d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
        let header = |my: u64| {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
            h[72..80].copy_from_slice(&2u64.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&[]).to_le_bytes());
            let c = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            h
        };
        d[512..604].copy_from_slice(&header(1));
        let last = (sectors as usize - 1) * 512;
        d[last..last + 92].copy_from_slice(&header(sectors - 1));
        d
    }

    /// A GPT of no entries: the error says the disk has no partitions
    /// (it listed an empty choice before).
    #[test]
    fn an_empty_partition_table_says_so() {
        let disk = Disk::from_bytes(empty_gpt(2048)).unwrap();
        assert!(disk.filesystems().is_empty());
        for fs in [None, Some(1)] {
            let e = disk.list(fs, "/", &Control::new()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
            assert_eq!(
                e.message, "disk in memory has no partitions and no filesystem: its partition table is empty",
                "{fs:?}"
            );
        }
    }

    /// Random bytes as a disk: errors, never a panic or a hang.
    #[test]
    fn random_disks_give_errors_not_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let len = [4096usize, 65536, 1 << 20][round % 3];
            let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make some of them look like a partition table or a filesystem.
            match round % 6 {
                1 => {
                    d[510] = 0x55;
                    d[511] = 0xaa;
                    d[446] = 0;
                    d[462] = 0;
                    d[478] = 0;
                    d[494] = 0;
                }
                2 if len > 2048 => {
                    d[1024 + 56] = 0x53;
                    d[1024 + 57] = 0xef;
                }
                3 => {
                    d[0] = 0xeb;
                    d[11..13].copy_from_slice(&512u16.to_le_bytes());
                    d[13] = 1 << (next() % 8);
                    d[14] = 1;
                    d[16] = 2;
                    d[21] = 0xf8;
                }
                4 => d[3..11].copy_from_slice(b"NTFS    "),
                _ => {}
            }
            let Ok(disk) = Disk::from_bytes(d) else { continue };
            let n = disk.filesystems().len() as u32;
            for fs in 1..=n {
                for path in ["/", "/a/b"] {
                    if let Err(e) = disk.list(Some(fs), path, &Control::new()) {
                        assert_ne!(e.kind, ErrorKind::Internal, "round {round}: {e}");
                    }
                }
            }
        }
    }
}
