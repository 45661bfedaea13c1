//! The base file of a native merge ([`super::Commit`]), open for writing:
//! its L1 and refcount tables, the refcount blocks it changes, and the
//! allocation of new clusters.
//!
//! # Invariants
//!
//! - New clusters (data, L2 tables, refcount blocks) come from past every
//!   cluster that is referenced or counted and past the end of the file,
//!   never from freed space; a refcount block sits at the first cluster of
//!   the range it covers, so it counts itself.
//! - Every write is checked against the scan of the base's metadata taken
//!   before the merge: data in place only over a cluster one L2 entry alone
//!   references, an L2 table rewritten only where its L1 entry points.
//! - A batch is written in the order data and refcount increases, refcount
//!   table, L2 and L1 entries, each step fdatasynced; decreases wait for
//!   the next batch. So no table ever points to a cluster whose refcount is
//!   not durable.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::guard::Scan;
use super::image::{
    Qcow2Image, COPIED, L1_RESERVED, L2_COMPRESSED as COMPRESSED, L2_RESERVED, OFFSET_MASK, RT_OFFSET_MASK,
};
use crate::error::{KnibError, Result};

/// The end of the host offsets an L2 entry holds (bits 9 to 55): no new
/// cluster of a merge ends past it.
pub(super) const MAX_HOST_END: u64 = 1 << 56;

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Data clusters written into the base (in place or new).
    pub data_clusters: u64,
    /// Of those, written in place over the base's own clusters.
    pub in_place_clusters: u64,
    /// Clusters set to read as zeros.
    pub zero_clusters: u64,
    /// Host clusters added to the base file (data, L2 tables, refcount blocks).
    pub new_clusters: u64,
    /// Guest bytes copied.
    pub bytes: u64,
    /// fdatasync calls made.
    pub syncs: u32,
}

/// The number of L2 ranges (L1 entries) covering an image's virtual size.
pub(super) fn l2_ranges(img: &Qcow2Image) -> usize {
    img.guest_clusters().div_ceil(img.header().l2_entries()) as usize
}

/// An L2 table of the base being changed.
#[derive(Debug)]
pub(super) struct TableEdit {
    pub(super) l1_index: usize,
    pub(super) offset: u64,
    pub(super) entries: Vec<u64>,
    /// Allocated by this merge (written before the L1 entry points to it).
    pub(super) is_new: bool,
}

/// What the base held for one guest cluster.
#[derive(Debug, Clone, Copy)]
pub(super) enum BaseEntry {
    /// No host cluster (unallocated, or zero without one).
    Empty,
    /// Its own host cluster (refcount 1), maybe a preallocated zero cluster.
    Owned(u64),
    /// Host data that loses this reference when replaced: compressed data,
    /// or a cluster without the copied flag.
    Release { offset: u64, len: u64 },
}

/// The base file, open for writing.
pub(super) struct Base {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) cs: u64,
    pub(super) bits: u32,
    pub(super) file_len: u64,
    pub(super) l1_offset: u64,
    pub(super) l1: Vec<u64>,
    pub(super) rt_offset: u64,
    pub(super) rt: Vec<u64>,
    /// Refcount table entries set by this merge, to write.
    pub(super) rt_dirty: Vec<usize>,
    /// Refcount entries per block (16-bit refcounts).
    pub(super) per_block: u64,
    /// Loaded refcount blocks by refcount table index: (bytes, changed).
    pub(super) blocks: HashMap<usize, (Vec<u8>, bool)>,
    /// The next host cluster to allocate: past every cluster referenced or
    /// counted, and past the end of the file.
    pub(super) next_free: u64,
    /// The base's metadata, read before the merge.
    pub(super) scan: Scan,
    /// References dropped by the current batch's table changes.
    pub(super) freed: Vec<(u64, u64)>,
    /// ... and by the previous batch's (now durable) ones.
    pub(super) freed_durable: Vec<(u64, u64)>,
}

pub(super) fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

impl Base {
    /// The base open for writing, its header read by `img` (the same file).
    pub(super) fn open(file: File, path: PathBuf, img: &Qcow2Image, file_len: u64, scan: Scan) -> Result<Base> {
        let h = img.header();
        let cs = h.cluster_size();
        let io = |what: &str, e: std::io::Error| KnibError::io(what, &path, e);
        let l1_len = l2_ranges(img);
        let mut raw = vec![0u8; l1_len * 8];
        file.read_exact_at(&mut raw, h.l1_table_offset).map_err(|e| io("cannot read the L1 table of", e))?;
        let l1 = (0..l1_len).map(|i| be64_at(&raw, i)).collect();
        let rt_len = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
        let mut raw = vec![0u8; rt_len * 8];
        file.read_exact_at(&mut raw, h.refcount_table_offset)
            .map_err(|e| io("cannot read the refcount table of", e))?;
        let rt: Vec<u64> = (0..rt_len).map(|i| be64_at(&raw, i)).collect();
        let per_block = cs * 8 / 16;
        let base = Base {
            file,
            path,
            cs,
            bits: h.cluster_bits,
            file_len,
            l1_offset: h.l1_table_offset,
            l1,
            rt_offset: h.refcount_table_offset,
            rt,
            rt_dirty: Vec::new(),
            per_block,
            blocks: HashMap::new(),
            next_free: scan.end,
            scan,
            freed: Vec::new(),
            freed_durable: Vec::new(),
        };
        Ok(base)
    }

    pub(super) fn corrupt(&self, what: impl std::fmt::Display) -> KnibError {
        KnibError::corrupt(format!("qcow2 image {}: {what}", self.path.display()))
    }

    pub(super) fn io(&self, what: &str, e: std::io::Error) -> KnibError {
        KnibError::io(what, &self.path, e)
    }

    /// Refcount block `rti` (loaded, or zeros for a new one), marked
    /// changed when it is to be `written`.
    pub(super) fn block(&mut self, rti: usize, written: bool) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&rti) {
            let off = self.rt.get(rti).copied().unwrap_or(0) & RT_OFFSET_MASK;
            let mut b = vec![0u8; self.cs as usize];
            if off != 0 {
                if !off.is_multiple_of(self.cs)
                    || off.saturating_add(self.cs) > self.file_len.max(self.next_free * self.cs)
                {
                    return Err(self
                        .corrupt(format!("refcount block {rti} at {off} is misaligned or past the end of the file")));
                }
                self.file.read_exact_at(&mut b, off).map_err(|e| self.io("cannot read a refcount block of", e))?;
            }
            self.blocks.insert(rti, (b, false));
        }
        match self.blocks.get_mut(&rti) {
            Some((b, dirty)) => {
                *dirty |= written;
                Ok(b)
            }
            None => Err(KnibError::internal("refcount block cache")),
        }
    }

    /// Add `delta` (+1 or -1) to the refcount of host cluster `c`.
    pub(super) fn add_ref(&mut self, c: u64, delta: i64) -> Result<()> {
        let rti = (c / self.per_block) as usize;
        let k = (c % self.per_block) as usize;
        if rti >= self.rt.len() || self.rt[rti] & RT_OFFSET_MASK == 0 {
            return Err(self.corrupt(format!("host cluster {c} has no refcount block")));
        }
        let block = self.block(rti, true)?;
        let old = i64::from(u16::from_be_bytes([block[2 * k], block[2 * k + 1]]));
        let new = old + delta;
        if !(0..=i64::from(u16::MAX)).contains(&new) {
            return Err(self.corrupt(format!("refcount of host cluster {c} would go from {old} to {new}")));
        }
        block[2 * k..2 * k + 2].copy_from_slice(&(new as u16).to_be_bytes());
        Ok(())
    }

    /// A new host cluster at the end of the file, its refcount set to 1
    /// (placing a refcount block first when its range has none).
    pub(super) fn alloc(&mut self, report: &mut CommitReport) -> Result<u64> {
        loop {
            let c = self.next_free;
            let rti = (c / self.per_block) as usize;
            if rti >= self.rt.len() {
                return Err(KnibError::internal(format!(
                    "{}: the refcount table is full (checked before the merge)",
                    self.path.display()
                )));
            }
            if (c + 1).checked_mul(self.cs).is_none_or(|end| end > MAX_HOST_END) {
                return Err(KnibError::internal(format!(
                    "{}: host cluster {c} lies past the offsets a qcow2 L2 entry holds (checked before the merge)",
                    self.path.display()
                )));
            }
            self.next_free += 1;
            report.new_clusters += 1;
            if let Some(m) = self.scan.metadata(c) {
                return Err(KnibError::internal(format!(
                    "{}: host cluster {c} to allocate holds {m}",
                    self.path.display()
                )));
            }
            if self.rt[rti] & RT_OFFSET_MASK == 0 {
                // A refcount block for this range, counting itself.
                self.blocks.insert(rti, (vec![0u8; self.cs as usize], true));
                self.rt[rti] = c * self.cs;
                self.rt_dirty.push(rti);
                self.add_ref(c, 1)?;
                continue;
            }
            self.add_ref(c, 1)?;
            return Ok(c * self.cs);
        }
    }

    /// The L2 table of range `r`, loaded, or a new one.
    pub(super) fn load_table(&mut self, r: usize, report: &mut CommitReport) -> Result<TableEdit> {
        let e = self.l1.get(r).copied().ok_or_else(|| self.corrupt(format!("no L1 entry {r}")))?;
        if e & L1_RESERVED != 0 {
            return Err(self.corrupt(format!("L1 entry {r} ({e:#018x}) has reserved bits set")));
        }
        let off = e & OFFSET_MASK;
        let n = (self.cs / 8) as usize;
        if off == 0 {
            let offset = self.alloc(report)?;
            return Ok(TableEdit { l1_index: r, offset, entries: vec![0; n], is_new: true });
        }
        if !off.is_multiple_of(self.cs) || off < self.cs || off.saturating_add(self.cs) > self.file_len {
            return Err(self.corrupt(format!("L1 entry {r}: L2 table at {off} is misaligned or outside the file")));
        }
        if e & COPIED == 0 {
            return Err(self.corrupt(format!("L1 entry {r}: the L2 table at {off} lacks the copied flag")));
        }
        // An L2 table (the scan refused two structures in one cluster: so
        // it is this entry's).
        if self.scan.kind(off / self.cs) != Some(super::guard::Meta::L2Table) {
            return Err(KnibError::internal(format!(
                "{}: the L2 table of L1 entry {r} was not seen by the scan",
                self.path.display()
            )));
        }
        let mut raw = vec![0u8; self.cs as usize];
        self.file.read_exact_at(&mut raw, off).map_err(|e| self.io("cannot read an L2 table of", e))?;
        Ok(TableEdit { l1_index: r, offset: off, entries: (0..n).map(|i| be64_at(&raw, i)).collect(), is_new: false })
    }

    /// What base L2 entry `e` of guest cluster `index` holds.
    pub(super) fn classify(&self, index: u64, e: u64) -> Result<BaseEntry> {
        let cs = self.cs;
        if e & COMPRESSED != 0 {
            let x = 62 - (self.bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let extra = (e >> x) & ((1u64 << (62 - x)) - 1);
            let end = (offset & !511) + (extra + 1) * 512;
            if offset < cs || offset >= self.file_len {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index}: compressed data at {offset} is outside the file"
                )));
            }
            return Ok(BaseEntry::Release { offset, len: end - offset });
        }
        if e & L2_RESERVED != 0 {
            return Err(self.corrupt(format!("L2 entry for guest cluster {index} ({e:#018x}) has reserved bits set")));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(BaseEntry::Empty);
        }
        if !off.is_multiple_of(cs) || off < cs || off >= self.file_len {
            return Err(self.corrupt(format!(
                "L2 entry for guest cluster {index}: data cluster at {off} is misaligned or outside the file"
            )));
        }
        // Checked for every entry by the scan before the merge; checked
        // again where it is written.
        if let Some(m) = self.scan.metadata(off / cs) {
            return Err(self.corrupt(format!(
                "L2 entry for guest cluster {index} points at host cluster {}, which holds {m}: metadata overlap",
                off / cs
            )));
        }
        if e & COPIED != 0 {
            Ok(BaseEntry::Owned(off))
        } else {
            Ok(BaseEntry::Release { offset: off, len: cs })
        }
    }

    pub(super) fn sync(&self, report: &mut CommitReport) -> Result<()> {
        report.syncs += 1;
        self.file.sync_data().map_err(|e| self.io("cannot fsync", e))
    }

    /// Drop the references in `ranges`, one per host cluster each touches.
    pub(super) fn drop_refs(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        for &(offset, len) in ranges {
            for c in offset / self.cs..=(offset + len - 1) / self.cs {
                self.add_ref(c, -1)?;
            }
        }
        Ok(())
    }

    /// Write the changed refcount blocks and forget them.
    pub(super) fn write_blocks(&mut self) -> Result<()> {
        let mut blocks: Vec<_> = self.blocks.drain().filter(|(_, (_, dirty))| *dirty).collect();
        blocks.sort_by_key(|(rti, _)| *rti);
        for (rti, (b, _)) in blocks {
            let off = self.rt[rti] & RT_OFFSET_MASK;
            self.file.write_all_at(&b, off).map_err(|e| self.io("cannot write a refcount block of", e))?;
        }
        Ok(())
    }

    /// Make one batch of table changes durable, in the order of the module
    /// documentation.
    pub(super) fn flush(&mut self, batch: &mut Vec<TableEdit>, report: &mut CommitReport) -> Result<()> {
        let raw = |t: &TableEdit| t.entries.iter().flat_map(|e| e.to_be_bytes()).collect::<Vec<u8>>();
        // 1. New tables, refcounts (and the previous batch's releases).
        for t in batch.iter().filter(|t| t.is_new) {
            self.file.write_all_at(&raw(t), t.offset).map_err(|e| self.io("cannot write an L2 table of", e))?;
        }
        let released = std::mem::take(&mut self.freed_durable);
        self.drop_refs(&released)?;
        self.write_blocks()?;
        self.sync(report)?;
        // 2. The refcount table entries of new blocks.
        if !self.rt_dirty.is_empty() {
            for rti in std::mem::take(&mut self.rt_dirty) {
                self.file
                    .write_all_at(&self.rt[rti].to_be_bytes(), self.rt_offset + rti as u64 * 8)
                    .map_err(|e| self.io("cannot write the refcount table of", e))?;
            }
            self.sync(report)?;
        }
        // 3. Existing tables and the L1 entries of new ones.
        crate::crashpoint::helper_step(&format!("writing the merged tables of {}", self.path.display()));
        for t in batch.drain(..) {
            if t.is_new {
                self.l1[t.l1_index] = t.offset | COPIED;
                self.file
                    .write_all_at(&self.l1[t.l1_index].to_be_bytes(), self.l1_offset + t.l1_index as u64 * 8)
                    .map_err(|e| self.io("cannot write the L1 table of", e))?;
            } else {
                self.file.write_all_at(&raw(&t), t.offset).map_err(|e| self.io("cannot write an L2 table of", e))?;
            }
        }
        self.sync(report)?;
        self.freed_durable = std::mem::take(&mut self.freed);
        Ok(())
    }

    /// Drop the references the last batch released, once its tables are durable.
    pub(super) fn release_freed(&mut self, report: &mut CommitReport) -> Result<()> {
        let released = std::mem::take(&mut self.freed_durable);
        if released.is_empty() {
            return Ok(());
        }
        self.drop_refs(&released)?;
        self.write_blocks()?;
        self.sync(report)
    }
}
