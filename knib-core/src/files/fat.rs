//! FAT12, FAT16 and FAT32 (EFI system partitions, boot partitions), read by
//! knib itself, with VFAT long names.
//!
//! Written from Microsoft's FAT specification ("FAT: General Overview of
//! On-Disk Format", 1.03) rather than through the `fatfs` crate: its last
//! release (0.3.6) follows a cluster chain that loops forever, subtracts
//! below zero (a panic with debug assertions) on a chain that points at
//! cluster 0 or 1, and does not say which cluster a directory starts at,
//! so a directory that contains its own ancestor cannot be caught. This
//! reader never writes, checks every cluster number against the volume,
//! stops any chain longer than the volume's cluster count, caps a
//! directory at 65536 entries (the specification's limit), and gives each
//! directory its first cluster as its id.
//!
//! FAT has no owners, modes or time zones. knib reports directories as
//! `0o755` and files as `0o644`, or `0o444` when the read-only attribute is
//! set (as Linux's vfat does by default); modification times are taken as
//! UTC and have a 2-second resolution.

use crate::error::{KnibError, Result};

use super::device::Window;
use super::fs::{display, Entry, FileRead, Filesystem, FsPath, Kind, Node};

/// The most entries (32 bytes each) a directory may have.
pub const MAX_DIR_ENTRIES: usize = 65536;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A FAT filesystem.
pub struct FatFs {
    win: Window,
    /// 12, 16 or 32.
    bits: u32,
    cluster_size: u64,
    fat_offset: u64,
    data_offset: u64,
    /// Data clusters; valid cluster numbers are 2..clusters + 2.
    clusters: u32,
    /// FAT12/16: the fixed root directory (offset, bytes); FAT32: None.
    fixed_root: Option<(u64, u64)>,
    root_cluster: u32,
    bpb_label: Option<String>,
}

/// A FAT date and time as seconds since the epoch (UTC).
pub(crate) fn fat_time(date: u16, clock: u16) -> i64 {
    let y = 1980 + (date >> 9) as i32;
    let m = ((date >> 5) & 0xf).clamp(1, 12) as u8;
    let d = ((date & 0x1f) as i64).max(1);
    let h = ((clock >> 11) as i64).min(23);
    let min = (((clock >> 5) & 0x3f) as i64).min(59);
    let s = (((clock & 0x1f) * 2) as i64).min(59);
    // A day past the month's end (the 31st of April) runs into the next
    // month, as the fields were written.
    let month = time::Month::try_from(m).expect("clamped to 1..=12");
    let first = time::Date::from_calendar_date(y, month, 1).expect("a year from 1980 to 2107 is in range");
    let midnight = (first + time::Duration::days(d - 1)).midnight().assume_utc().unix_timestamp();
    midnight + h * 3600 + min * 60 + s
}

/// The checksum of a short name that its long-name entries carry.
fn short_checksum(name: &[u8]) -> u8 {
    name.iter().fold(0u8, |sum, &b| ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b))
}

/// A short (8.3) name as text, lowercased as the NT flags say.
fn short_name(e: &[u8]) -> Vec<u8> {
    let mut base = e[0..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xe5;
    }
    let lower = |v: &[u8], yes: bool| -> String {
        let s: String = v.iter().map(|&b| if b < 0x80 { b as char } else { '\u{fffd}' }).collect();
        let s = s.trim_end_matches(' ').to_string();
        if yes {
            s.to_ascii_lowercase()
        } else {
            s
        }
    };
    let b = lower(&base, e[12] & 0x08 != 0);
    let x = lower(&e[8..11], e[12] & 0x10 != 0);
    if x.is_empty() {
        b.into_bytes()
    } else {
        format!("{b}.{x}").into_bytes()
    }
}

/// Brent's cycle detection over a cluster chain: O(1) memory, finds a
/// loop within about twice the length of the chain's tail and cycle.
#[derive(Debug, Default)]
struct LoopCheck {
    saved: u32,
    power: u64,
    steps: u64,
}

impl LoopCheck {
    /// Whether stepping onto cluster `c` closes a loop.
    fn step(&mut self, c: u32) -> bool {
        if self.power != 0 && c == self.saved {
            return true;
        }
        self.steps += 1;
        if self.steps >= self.power {
            self.saved = c;
            self.power = (self.power * 2).max(1);
            self.steps = 0;
        }
        false
    }
}

/// One directory entry with its short name (for lookups).
struct FatEntry {
    entry: Entry,
    short: Vec<u8>,
}

impl FatFs {
    /// Read the boot sector of the FAT filesystem in `win`.
    pub fn open(win: Window) -> Result<FatFs> {
        let name = win.device().borrow().name().to_string();
        let bad = |what: String| KnibError::corrupt(format!("FAT filesystem on {name}: {what}"));
        let b = win.read_vec(0, 512)?;
        if b.len() < 512 || !super::detect::is_fat_boot_sector(&b) {
            return Err(bad("the boot sector is not a valid FAT boot sector".into()));
        }
        let bps = le16(&b, 11) as u64;
        let spc = b[13] as u64;
        let reserved = le16(&b, 14) as u64;
        let fats = b[16] as u64;
        let root_entries = le16(&b, 17) as u64;
        let total = if le16(&b, 19) != 0 { le16(&b, 19) as u64 } else { le32(&b, 32) as u64 };
        let fat_size = if le16(&b, 22) != 0 { le16(&b, 22) as u64 } else { le32(&b, 36) as u64 };
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let meta = reserved + fats * fat_size + root_sectors;
        if total * bps > win.len() {
            return Err(bad(format!(
                "it says it has {total} sectors of {bps} bytes, more than the {} bytes it is in",
                win.len()
            )));
        }
        if meta >= total {
            return Err(bad(format!(
                "its {meta} sectors of FATs and root directory leave no room for data in {total} sectors"
            )));
        }
        let clusters = (total - meta) / spc;
        // A boot sector without a 16-bit FAT size is FAT32's, whatever the
        // count of clusters (as Linux reads it: `mkfs.fat -F 32` makes
        // such volumes with fewer clusters than FAT32 suggests; read as
        // FAT16 by the count, its root would list as empty).
        let bits = if le16(&b, 22) == 0 {
            32
        } else if clusters < 4085 {
            12
        } else if clusters < 65525 {
            16
        } else {
            return Err(bad(format!(
                "its boot sector is a FAT12/16 one (a 16-bit FAT size), yet it has {clusters} clusters, more than FAT16 counts"
            )));
        };
        if (clusters + 2) * bits / 8 > fat_size * bps {
            return Err(bad(format!("a FAT of {fat_size} sectors cannot hold {clusters} clusters")));
        }
        let clusters = u32::try_from(clusters).map_err(|_| bad(format!("{clusters} clusters")))?;
        let (fixed_root, root_cluster, label_at) = if bits == 32 {
            (None, le32(&b, 44), 71)
        } else {
            (Some(((reserved + fats * fat_size) * bps, root_sectors * bps)), 0, 43)
        };
        let bpb_label = {
            let s: String =
                b[label_at..label_at + 11].iter().map(|&c| if c < 0x80 { c as char } else { '\u{fffd}' }).collect();
            let s = s.trim().to_string();
            (!s.is_empty() && s != "NO NAME").then_some(s)
        };
        let fs = FatFs {
            win,
            bits: bits as u32,
            cluster_size: spc * bps,
            fat_offset: reserved * bps,
            data_offset: meta * bps,
            clusters,
            fixed_root,
            root_cluster,
            bpb_label,
        };
        if bits == 32 {
            fs.check_cluster(root_cluster, "the root directory")?;
        }
        Ok(fs)
    }

    fn check_cluster(&self, c: u32, what: &str) -> Result<()> {
        if c < 2 || c - 2 >= self.clusters {
            return Err(KnibError::corrupt(format!(
                "FAT: {what} points at cluster {c}; the volume has clusters 2 to {}",
                self.clusters as u64 + 1
            )));
        }
        Ok(())
    }

    /// The cluster after `c`, `None` at the end of the chain.
    fn next(&self, c: u32, what: &str) -> Result<Option<u32>> {
        let (v, end, bad) = match self.bits {
            12 => {
                let off = c as u64 + c as u64 / 2;
                let mut b = [0u8; 2];
                self.win.read_at(self.fat_offset + off, &mut b)?;
                let raw = u16::from_le_bytes(b);
                let v = if c & 1 == 1 { raw >> 4 } else { raw & 0xfff };
                (v as u32, 0xff8, 0xff7)
            }
            16 => {
                let mut b = [0u8; 2];
                self.win.read_at(self.fat_offset + c as u64 * 2, &mut b)?;
                (u16::from_le_bytes(b) as u32, 0xfff8, 0xfff7)
            }
            _ => {
                let mut b = [0u8; 4];
                self.win.read_at(self.fat_offset + c as u64 * 4, &mut b)?;
                (u32::from_le_bytes(b) & 0x0fff_ffff, 0x0fff_fff8, 0x0fff_fff7)
            }
        };
        if v >= end {
            return Ok(None);
        }
        if v == bad {
            return Err(KnibError::corrupt(format!("FAT: {what} runs into a cluster marked bad after cluster {c}")));
        }
        self.check_cluster(v, what)?;
        Ok(Some(v))
    }

    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset + (c as u64 - 2) * self.cluster_size
    }

    /// The raw bytes of directory `node` at `path`.
    fn dir_bytes(&self, path: &FsPath, node: &Node) -> Result<Vec<u8>> {
        let what = format!("directory {}", display(path));
        let cap = (MAX_DIR_ENTRIES * 32) as u64;
        if node.handle == 0 {
            return match self.fixed_root {
                Some((off, len)) if path.is_empty() => self.win.read_vec(off, len.min(cap) as usize),
                _ => Err(KnibError::corrupt(format!("FAT: {what} starts at cluster 0"))),
            };
        }
        let mut c = node.handle as u32;
        self.check_cluster(c, &what)?;
        let mut out = Vec::new();
        let mut looped = LoopCheck::default();
        loop {
            if looped.step(c) {
                return Err(KnibError::corrupt(format!("FAT: the cluster chain of {what} loops")));
            }
            if out.len() as u64 + self.cluster_size > cap {
                return Err(KnibError::corrupt(format!(
                    "FAT: {what} is longer than {MAX_DIR_ENTRIES} entries: its cluster chain loops"
                )));
            }
            let start = out.len();
            out.resize(start + self.cluster_size as usize, 0);
            self.win.read_at(self.cluster_offset(c), &mut out[start..])?;
            // The end marker ends the directory: no need to follow on.
            if out[start..].chunks(32).any(|e| e[0] == 0) {
                return Ok(out);
            }
            match self.next(c, &what)? {
                Some(n) => c = n,
                None => return Ok(out),
            }
        }
    }

    fn entries(&self, path: &FsPath, node: &Node) -> Result<(Vec<FatEntry>, Option<String>)> {
        let data = self.dir_bytes(path, node)?;
        let mut out = Vec::new();
        let mut label = None;
        // Long name parts being gathered: (parts, checksum, next sequence expected).
        let mut lfn: Option<(Vec<[u16; 13]>, u8, u8)> = None;
        for e in data.chunks_exact(32) {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xe5 {
                lfn = None;
                continue;
            }
            let attr = e[11];
            if attr & 0x3f == 0x0f {
                let seq = e[0] & 0x1f;
                let mut chars = [0u16; 13];
                for (i, at) in (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2)).enumerate() {
                    chars[i] = le16(e, at);
                }
                if e[0] & 0x40 != 0 {
                    lfn = (seq != 0).then(|| (vec![chars], e[13], seq - 1));
                } else {
                    lfn = match lfn.take() {
                        Some((mut parts, sum, want)) if want == seq && seq != 0 && sum == e[13] => {
                            parts.push(chars);
                            Some((parts, sum, seq - 1))
                        }
                        _ => None,
                    };
                }
                continue;
            }
            let long = lfn.take();
            if attr & 0x08 != 0 && attr & 0x10 == 0 {
                if path.is_empty() {
                    let s: String = e[0..11].iter().map(|&c| if c < 0x80 { c as char } else { '\u{fffd}' }).collect();
                    label = Some(s.trim().to_string()).filter(|s| !s.is_empty());
                }
                continue;
            }
            if &e[0..11] == b".          " || &e[0..11] == b"..         " {
                continue;
            }
            let short = short_name(e);
            let name = match long {
                Some((parts, sum, 0)) if sum == short_checksum(&e[0..11]) => {
                    let units: Vec<u16> =
                        parts.iter().rev().flat_map(|p| p.iter().copied()).take_while(|&u| u != 0).collect();
                    String::from_utf16_lossy(&units).into_bytes()
                }
                _ => short.clone(),
            };
            let hi = if self.bits == 32 { (le16(e, 20) as u32) << 16 } else { 0 };
            let cluster = hi | le16(e, 26) as u32;
            let dir = attr & 0x10 != 0;
            let mode = if dir {
                0o755
            } else if attr & 0x01 != 0 {
                0o444
            } else {
                0o644
            };
            let node = Node {
                kind: if dir { Kind::Dir } else { Kind::File },
                size: if dir { 0 } else { le32(e, 28) as u64 },
                mode,
                mtime: fat_time(le16(e, 24), le16(e, 22)),
                mtime_nsec: 0,
                id: dir.then_some(cluster as u64),
                handle: cluster as u64,
            };
            out.push(FatEntry { entry: Entry { name, node }, short });
        }
        Ok((out, label))
    }
}

impl Filesystem for FatFs {
    fn root(&mut self) -> Result<Node> {
        let c = if self.fixed_root.is_some() { 0 } else { self.root_cluster };
        Ok(Node {
            kind: Kind::Dir,
            size: 0,
            mode: 0o755,
            mtime: 0,
            mtime_nsec: 0,
            id: Some(c as u64),
            handle: c as u64,
        })
    }

    fn lookup(&mut self, dir_path: &FsPath, dir: &Node, name: &[u8]) -> Result<Option<Entry>> {
        let (entries, _) = self.entries(dir_path, dir)?;
        let found = super::fs::find_without_case(dir_path, entries, name, |e| vec![&e.entry.name, &e.short])?;
        Ok(found.map(|e| e.entry))
    }

    fn read_dir(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<Entry>> {
        Ok(self.entries(path, dir)?.0.into_iter().map(|e| e.entry).collect())
    }

    fn read_link(&mut self, path: &FsPath, _node: &Node) -> Result<Vec<u8>> {
        Err(KnibError::invalid(format!("{}: FAT has no symlinks", display(path))))
    }

    fn open<'a>(&'a mut self, path: &FsPath, node: &Node) -> Result<Box<dyn FileRead + 'a>> {
        let what = format!("file {}", display(path));
        let cluster = node.handle as u32;
        if node.size > 0 {
            self.check_cluster(cluster, &what)?;
        }
        let mut looped = LoopCheck::default();
        looped.step(cluster);
        Ok(Box::new(FatFile { fs: self, what, cluster, offset: 0, left: node.size, walked: 0, looped }))
    }

    fn label(&mut self) -> Option<String> {
        let root = self.root().ok()?;
        match self.entries(&[], &root) {
            Ok((_, Some(l))) if l != "NO NAME" => Some(l),
            _ => self.bpb_label.clone(),
        }
    }

    fn max_dirs(&self) -> u64 {
        self.clusters as u64 + 1
    }

    fn capacity(&self) -> u64 {
        self.win.len()
    }

    fn min_entry_bytes(&self) -> u64 {
        32
    }
}

struct FatFile<'a> {
    fs: &'a FatFs,
    what: String,
    cluster: u32,
    /// Offset in the current cluster.
    offset: u64,
    /// Bytes of the file still to read.
    left: u64,
    /// Clusters of the chain walked so far.
    walked: u64,
    looped: LoopCheck,
}

impl FileRead for FatFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() && self.left > 0 {
            if self.offset == self.fs.cluster_size {
                self.walked += 1;
                if self.walked >= self.fs.clusters as u64 {
                    return Err(KnibError::corrupt(format!("FAT: the cluster chain of {} loops", self.what)));
                }
                self.cluster = self.fs.next(self.cluster, &self.what)?.ok_or_else(|| {
                    KnibError::corrupt(format!("FAT: the cluster chain of {} ends before its size", self.what))
                })?;
                if self.looped.step(self.cluster) {
                    return Err(KnibError::corrupt(format!("FAT: the cluster chain of {} loops", self.what)));
                }
                self.offset = 0;
            }
            let n = (self.fs.cluster_size - self.offset).min(self.left).min((buf.len() - done) as u64) as usize;
            self.fs.win.read_at(self.fs.cluster_offset(self.cluster) + self.offset, &mut buf[done..done + n])?;
            done += n;
            self.offset += n as u64;
            self.left -= n as u64;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_times_are_utc() {
        // 2020-09-13 12:26:40 UTC = 1600000000.
        let date = ((2020 - 1980) << 9) | (9 << 5) | 13;
        let time = (12 << 11) | (26 << 5) | (40 / 2);
        assert_eq!(fat_time(date, time), 1_600_000_000);
        assert_eq!(fat_time(0x21, 0), 315_532_800); // 1980-01-01
        assert_eq!(fat_time(0, 0), 315_532_800); // month and day 0 read as 1
    }

    #[test]
    fn loops_are_found_and_chains_are_not_loops() {
        let mut l = LoopCheck::default();
        assert!((2..10_000).all(|c| !l.step(c)));
        let mut l = LoopCheck::default();
        // 2 3 4 5 6 7 then 5 6 7 5 6 7 ...
        let chain = (2..8).chain([5, 6, 7].into_iter().cycle());
        let found = chain.take(40).position(|c| l.step(c));
        assert!(found.is_some());
    }

    #[test]
    fn short_names_and_checksums() {
        let mut e = [0u8; 32];
        e[0..11].copy_from_slice(b"README  TXT");
        assert_eq!(short_name(&e), b"README.TXT");
        e[12] = 0x18;
        assert_eq!(short_name(&e), b"readme.txt");
        e[0..11].copy_from_slice(b"\x05BC        ");
        e[12] = 0;
        assert_eq!(short_name(&e), "\u{fffd}BC".as_bytes());
        assert_eq!(short_checksum(b"README  TXT"), 0x73);
    }
}
