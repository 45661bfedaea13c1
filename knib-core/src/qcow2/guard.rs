//! What is checked in an existing qcow2 image before knib writes into it
//! (the base of a native merge, [`super::Commit`]): one pass over all of
//! its metadata, before the first write, in the manner of QEMU's metadata
//! overlap checks and of `qemu-img check`.
//!
//! [`scan`] reads the L1 table (all of it), every L2 table it points to,
//! the refcount table and every refcount block, and the bitmap directory
//! and bitmap tables when the bitmaps extension is in use. It refuses the
//! image with a [`crate::ErrorKind::Corrupt`] error naming the problem when:
//!
//! - a table or block (header cluster, L1 table, L2 table, refcount table,
//!   refcount block, bitmap directory or table) is misaligned, lies past
//!   the end of the file, or shares a host cluster with another one;
//! - an L2 entry points a data cluster, or compressed data, at a host
//!   cluster holding metadata (the overlaps QEMU's
//!   `qcow2_check_metadata_overlap` guards against), or past the end of
//!   the file (compressed data: its last sector ends past the end of the
//!   file, rounded up to a sector, as [`super::Qcow2Image`] refuses to read
//!   it), or has reserved bits set, or is compressed with the copied flag;
//! - two L2 entries point at the same uncompressed host cluster, or
//!   compressed data shares a host cluster with an uncompressed one;
//! - a host cluster holding compressed data is referenced by more L2
//!   entries than its 16-bit refcount can count ([`MAX_REFCOUNT`]: what
//!   `qemu-img check` reports as a refcount overflow; the merge would drop
//!   one reference per replaced entry, down to 0 while entries still point
//!   at it);
//! - a host cluster's stored refcount is below the number of references
//!   made to it (stale refcounts with the dirty bit clear: a cluster in
//!   use that an allocation could take), or a referenced cluster has no
//!   refcount block;
//! - the copied flag (bit 63) of an L1 entry (any of the table) or of an
//!   uncompressed L2 entry (data, or a zero cluster keeping its host
//!   cluster) does not match its cluster's stored refcount being 1 (what
//!   `qemu-img check` reports as `OFLAG_COPIED` errors). The merge relies
//!   on these flags as it writes: it rewrites an L2 table only when its L1
//!   entry has the flag (and fails there, part-way, otherwise), writes
//!   data in place over a cluster whose entry has it, and drops a
//!   reference to a cluster whose entry lacks it.
//!
//! What it returns ([`Scan`]) lets the merge check each cluster it writes:
//! [`Scan::metadata`] names the metadata a host cluster holds
//! ([`Scan::kind`] says which), and
//! [`Scan::end`] is a host cluster past every cluster that is referenced
//! or counted, and past the end of the file, so that allocating from there
//! can never land on a cluster any table references. Images with internal
//! snapshots are not scanned (the merge does not write into them).
//!
//! Memory: the references are counted in windows of at most
//! [`SCAN_WINDOW_CLUSTERS`] host clusters (two bytes and three bits per
//! cluster of the window), one window after the other, each pass reading
//! the L2 tables and refcount blocks again, one at a time; and two bits per
//! host cluster of the file saying which metadata it holds (8 MiB at the
//! most, for [`MAX_SCAN_CLUSTERS`]; a map entry per metadata cluster took
//! about 100 bytes, half a gigabyte for an image of 4 Mi L2 tables), with
//! the names of the few structures that are neither L2 tables nor refcount
//! blocks. So the scan's memory does not grow with the size of the file
//! beyond that (issue 18: a backup's memory stays under 32 MiB); a file of
//! up to 64 GiB (with 64 KiB clusters) takes one pass.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use super::image::{COPIED, L1_RESERVED, L2_COMPRESSED, L2_RESERVED, OFFSET_MASK, RT_OFFSET_MASK};
use crate::error::{KnibError, Result};

/// The most host clusters a scan counts references of (2 TiB with 64 KiB
/// clusters: a larger file would take more than 32 passes).
pub const MAX_SCAN_CLUSTERS: u64 = 32 << 20;
/// Host clusters whose references one pass counts (2 MiB of counters).
pub const SCAN_WINDOW_CLUSTERS: u64 = 1 << 20;
/// The most references a host cluster's refcount counts: the scan reads
/// 16-bit refcounts only (`refcount_order` 4).
pub const MAX_REFCOUNT: u16 = u16::MAX;

/// What a metadata host cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Meta {
    /// An L2 table.
    L2Table,
    /// A refcount block.
    RefcountBlock,
    /// The header, the L1 table, the refcount table, or a bitmap's
    /// directory, table or data.
    Other,
}

/// The metadata host clusters of an image: two bits per host cluster of
/// the file (none, an L2 table, a refcount block, other), and the names of
/// the structures of the third kind but bitmap data clusters.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    bits: Vec<u64>,
    /// Host clusters `lo..hi` holding what the name says.
    named: Vec<(u64, u64, String)>,
}

impl MetaMap {
    fn new(nclusters: u64) -> MetaMap {
        MetaMap { bits: vec![0; nclusters.div_ceil(32) as usize], named: Vec::new() }
    }

    /// What host cluster `c` holds, if it is metadata.
    pub(crate) fn kind(&self, c: u64) -> Option<Meta> {
        let w = *self.bits.get(usize::try_from(c / 32).ok()?)?;
        match (w >> (2 * (c % 32))) & 3 {
            1 => Some(Meta::L2Table),
            2 => Some(Meta::RefcountBlock),
            3 => Some(Meta::Other),
            _ => None,
        }
    }

    /// Mark host cluster `c` (in the file) as holding `kind`.
    fn set(&mut self, c: u64, kind: Meta) {
        let code = match kind {
            Meta::L2Table => 1u64,
            Meta::RefcountBlock => 2,
            Meta::Other => 3,
        };
        if let Some(w) = self.bits.get_mut((c / 32) as usize) {
            *w |= code << (2 * (c % 32));
        }
    }

    /// What host cluster `c` holds, named for a message ("an L2 table",
    /// "the L1 table").
    pub(crate) fn name(&self, c: u64) -> Option<String> {
        Some(match self.kind(c)? {
            Meta::L2Table => "an L2 table".into(),
            Meta::RefcountBlock => "a refcount block".into(),
            Meta::Other => match self.named.iter().find(|(lo, hi, _)| (*lo..*hi).contains(&c)) {
                Some((_, _, n)) => format!("the {n}"),
                None => "a data cluster of a bitmap".into(),
            },
        })
    }

    /// The metadata host clusters in `lo..hi`.
    fn within(&self, lo: u64, hi: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut c = lo;
        while c < hi {
            match self.bits.get((c / 32) as usize) {
                None => break,
                Some(0) => c = (c / 32 + 1) * 32,
                Some(_) => {
                    if self.kind(c).is_some() {
                        out.push(c);
                    }
                    c += 1;
                }
            }
        }
        out.retain(|&c| c < hi);
        out
    }
}

/// The metadata of an image, as found by [`scan`].
#[derive(Debug)]
pub(crate) struct Scan {
    /// What each metadata host cluster holds.
    meta: MetaMap,
    /// A host cluster past every referenced or counted cluster and past the
    /// end of the file: where allocations may start.
    pub end: u64,
    /// Host clusters whose stored refcount is above their references
    /// (leaked, as `qemu-img check` counts them: a merge killed between
    /// its refcount and table writes leaves some).
    pub leaks: u64,
}

impl Scan {
    /// The metadata host cluster `c` holds, if any, named for a message
    /// ("an L2 table").
    pub fn metadata(&self, c: u64) -> Option<String> {
        self.meta.name(c)
    }

    /// What host cluster `c` holds, if it is metadata.
    pub fn kind(&self, c: u64) -> Option<Meta> {
        self.meta.kind(c)
    }
}

struct Refs<'a> {
    path: &'a Path,
    cs: u64,
    file_len: u64,
    nclusters: u64,
    /// The window of host clusters counted now: `lo..lo + refs.len()`.
    lo: u64,
    /// References to each host cluster of the window.
    refs: Vec<u16>,
    /// Whether each host cluster of the window holds compressed data.
    compressed: Vec<u64>,
    /// Whether each host cluster of the window is an L2 table or the data
    /// of an uncompressed L2 entry: one entry refers to it, whose copied
    /// flag must match its stored refcount being 1.
    flagged: Vec<u64>,
    /// ... and whether that entry has the copied flag.
    copied: Vec<u64>,
    meta: MetaMap,
    /// One past the last host cluster referenced.
    max_ref: u64,
    /// Host clusters counted above their references so far.
    leaks: u64,
}

impl Refs<'_> {
    fn corrupt(&self, what: impl std::fmt::Display) -> KnibError {
        KnibError::corrupt(format!("qcow2 image {}: {what}; it is not written into", self.path.display()))
    }

    /// Index of host cluster `c` in the window, if it is in it.
    fn at(&self, c: u64) -> Option<usize> {
        c.checked_sub(self.lo).filter(|&i| i < self.refs.len() as u64).map(|i| i as usize)
    }

    /// References to host cluster `c` of the window counted so far.
    fn refs_of(&self, c: u64) -> u16 {
        self.at(c).map_or(0, |i| self.refs[i])
    }

    /// Count one more reference to host cluster `c`. Only compressed data
    /// is counted more than once, and [`Refs::compressed`] refuses a count
    /// past [`MAX_REFCOUNT`] before it.
    fn count(&mut self, c: u64) {
        if let Some(i) = self.at(c) {
            self.refs[i] = self.refs[i].saturating_add(1);
        }
        self.max_ref = self.max_ref.max(c + 1);
    }

    /// Start counting the window `lo..hi`: the metadata clusters in it
    /// are counted once each, as the first pass counted them.
    fn window(&mut self, lo: u64, hi: u64) {
        self.lo = lo;
        self.refs.clear();
        self.refs.resize((hi - lo) as usize, 0);
        for bits in [&mut self.compressed, &mut self.flagged, &mut self.copied] {
            bits.clear();
            bits.resize((hi - lo).div_ceil(64) as usize, 0);
        }
        for c in self.meta.within(lo, hi) {
            self.count(c);
        }
    }

    /// A metadata structure of `len` bytes at `offset` (`kind`, `what` in
    /// messages, and its name kept with `named`), cluster aligned and in the
    /// file, sharing no host cluster with anything counted before.
    fn metadata(&mut self, kind: Meta, what: String, named: bool, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !offset.is_multiple_of(self.cs) || offset.checked_add(len).is_none_or(|end| end > self.file_len) {
            return Err(self.corrupt(format!(
                "{what} at {offset} ({len} bytes) is misaligned or past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        let (first, last) = (offset / self.cs, (offset + len - 1) / self.cs);
        for c in first..=last {
            if let Some(other) = self.meta.name(c) {
                return Err(
                    self.corrupt(format!("{what} at {offset} overlaps {other} (host cluster {c}): metadata overlap"))
                );
            }
            if self.refs_of(c) != 0 {
                return Err(self
                    .corrupt(format!("{what} at {offset} overlaps guest data (host cluster {c}): metadata overlap")));
            }
            self.meta.set(c, kind);
            self.count(c);
        }
        if named {
            self.meta.named.push((first, last + 1, what));
        }
        Ok(())
    }

    /// Uncompressed guest data at host cluster `c`, referenced by the L2
    /// entry of guest cluster `guest` (with the copied flag or not).
    fn data(&mut self, guest: u64, c: u64, copied: bool) -> Result<()> {
        let what = format_args!("the L2 entry of guest cluster {guest}");
        if let Some(m) = self.meta.name(c) {
            return Err(self.corrupt(format!("{what} points at host cluster {c}, which holds {m}: metadata overlap")));
        }
        if self.refs_of(c) != 0 {
            let shared = if self.is_compressed(c) { "compressed data" } else { "another L2 entry's data" };
            return Err(self.corrupt(format!("{what} points at host cluster {c}, which also holds {shared}")));
        }
        self.count(c);
        self.flag(c, copied);
        Ok(())
    }

    /// Host cluster `c` is referred to by one entry (L1, or uncompressed
    /// L2) whose copied flag is `copied`: checked against its refcount.
    fn flag(&mut self, c: u64, copied: bool) {
        if let Some(i) = self.at(c) {
            self.flagged[i / 64] |= 1 << (i % 64);
            if copied {
                self.copied[i / 64] |= 1 << (i % 64);
            }
        }
    }

    /// For host cluster `c` of the window referred to by one entry with a
    /// copied flag: whether that entry has it.
    fn copied_flag(&self, c: u64) -> Option<bool> {
        let i = self.at(c)?;
        (self.flagged[i / 64] & (1 << (i % 64)) != 0).then(|| self.copied[i / 64] & (1 << (i % 64)) != 0)
    }

    /// Compressed data touching host cluster `c`, referenced by the L2
    /// entry of guest cluster `guest`.
    fn compressed(&mut self, guest: u64, c: u64) -> Result<()> {
        let what = format_args!("the L2 entry of guest cluster {guest}");
        if let Some(m) = self.meta.name(c) {
            return Err(
                self.corrupt(format!("{what}: compressed data in host cluster {c}, which holds {m}: metadata overlap"))
            );
        }
        if self.refs_of(c) != 0 && !self.is_compressed(c) {
            return Err(self.corrupt(format!(
                "{what}: compressed data in host cluster {c}, which also holds another L2 entry's data"
            )));
        }
        if self.refs_of(c) == MAX_REFCOUNT {
            return Err(self.corrupt(format!(
                "{what}: compressed data in host cluster {c}, which more than {MAX_REFCOUNT} L2 entries \
                 reference: its 16-bit refcount overflows (refcount overflow)"
            )));
        }
        if let Some(i) = self.at(c) {
            self.compressed[i / 64] |= 1 << (i % 64);
        }
        self.count(c);
        Ok(())
    }

    fn is_compressed(&self, c: u64) -> bool {
        self.at(c).is_some_and(|i| self.compressed[i / 64] & (1 << (i % 64)) != 0)
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// Scan the metadata of the image `file` (at `path`, `file_len` bytes,
/// header `h`) before a write (see the module documentation). `Ok(Err)`
/// when the image is too large to scan here (nothing is wrong with it).
pub(crate) fn scan(file: &File, path: &Path, h: &Header, file_len: u64) -> Result<std::result::Result<Scan, String>> {
    scan_windowed(file, path, h, file_len, SCAN_WINDOW_CLUSTERS)
}

/// Scan the qcow2 image at `path` as the merge does before it writes into
/// it (see the module documentation), counting references in windows of
/// `window` host clusters (`None`: the merge's own window). What the merge
/// would learn: `Ok(Ok(end))` with the first host cluster free to allocate,
/// `Ok(Err(why))` when the image is not scanned here, `Err` (corrupt) when
/// it is refused. For tests of the windowed count.
#[doc(hidden)]
pub fn scan_file(path: &Path, window: Option<u64>) -> Result<std::result::Result<u64, String>> {
    let file = File::open(path).map_err(|e| KnibError::io("cannot open", path, e))?;
    let img = super::Qcow2Image::open(path)?;
    let len = super::image::file_size(&file).map_err(|e| KnibError::io("cannot size", path, e))?;
    let scan = scan_windowed(&file, path, img.header(), len, window.unwrap_or(SCAN_WINDOW_CLUSTERS))?;
    Ok(scan.map(|s| s.end))
}

/// [`scan`], counting references in windows of `window` host clusters.
fn scan_windowed(
    file: &File,
    path: &Path,
    h: &Header,
    file_len: u64,
    window: u64,
) -> Result<std::result::Result<Scan, String>> {
    if h.nb_snapshots != 0 {
        return Err(KnibError::internal(format!("{}: images with snapshots are not scanned", path.display())));
    }
    if h.refcount_order != 4 {
        return Err(KnibError::internal(format!("{}: only 16-bit refcounts are scanned", path.display())));
    }
    let cs = h.cluster_size();
    let nclusters = file_len.div_ceil(cs);
    if nclusters > MAX_SCAN_CLUSTERS {
        return Ok(Err(format!(
            "{} has {nclusters} host clusters, over the {MAX_SCAN_CLUSTERS} the check before a native write counts",
            path.display()
        )));
    }
    let io = |what: &str, e: std::io::Error| KnibError::io(what, path, e);
    let mut r = Refs {
        path,
        cs,
        file_len,
        nclusters,
        lo: 0,
        refs: vec![0; nclusters.min(window.max(1)) as usize],
        compressed: vec![0; nclusters.min(window.max(1)).div_ceil(64) as usize],
        flagged: vec![0; nclusters.min(window.max(1)).div_ceil(64) as usize],
        copied: vec![0; nclusters.min(window.max(1)).div_ceil(64) as usize],
        meta: MetaMap::new(nclusters),
        max_ref: 0,
        leaks: 0,
    };
    r.metadata(Meta::Other, "header".into(), true, 0, cs)?;
    let l1_bytes = u64::from(h.l1_size) * 8;
    r.metadata(Meta::Other, "L1 table".into(), true, h.l1_table_offset, l1_bytes)?;
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    r.metadata(Meta::Other, "refcount table".into(), true, h.refcount_table_offset, rt_bytes)?;

    // Refcount blocks.
    let mut raw = vec![0u8; rt_bytes as usize];
    file.read_exact_at(&mut raw, h.refcount_table_offset).map_err(|e| io("cannot read the refcount table of", e))?;
    let rt: Vec<u64> = (0..raw.len() / 8).map(|i| be64(&raw, i)).collect();
    for (i, &e) in rt.iter().enumerate() {
        if e & !RT_OFFSET_MASK != 0 {
            return Err(r.corrupt(format!("refcount table entry {i} ({e:#x}) has reserved bits set")));
        }
        if e != 0 {
            r.metadata(Meta::RefcountBlock, format!("refcount block {i}"), false, e, cs)?;
        }
    }

    // Bitmaps in use: their directory, tables and data clusters.
    if let Some(b) = h.bitmaps.filter(|_| h.autoclear_features & super::header::AUTOCLEAR_BITMAPS != 0) {
        r.metadata(Meta::Other, "bitmap directory".into(), true, b.directory_offset, b.directory_size)?;
        let mut dir = vec![0u8; b.directory_size as usize];
        file.read_exact_at(&mut dir, b.directory_offset).map_err(|e| io("cannot read the bitmap directory of", e))?;
        let mut pos = 0usize;
        for n in 0..b.nb_bitmaps {
            if pos + 24 > dir.len() {
                return Err(r.corrupt(format!("bitmap directory entry {n} runs past the directory")));
            }
            let table_offset = u64::from_be_bytes(dir[pos..pos + 8].try_into().expect("8 bytes"));
            let table_size = u64::from(u32::from_be_bytes(dir[pos + 8..pos + 12].try_into().expect("4 bytes")));
            let name_size = u64::from(u16::from_be_bytes(dir[pos + 14..pos + 16].try_into().expect("2 bytes")));
            let extra = u64::from(u32::from_be_bytes(dir[pos + 20..pos + 24].try_into().expect("4 bytes")));
            let table_bytes = table_size * 8;
            if table_bytes > 64 << 20 {
                return Err(r.corrupt(format!("bitmap {n}: its table of {table_size} entries is too large")));
            }
            r.metadata(Meta::Other, format!("table of bitmap {n}"), true, table_offset, table_bytes)?;
            let mut table = vec![0u8; table_bytes as usize];
            file.read_exact_at(&mut table, table_offset).map_err(|e| io("cannot read a bitmap table of", e))?;
            for k in 0..table_size as usize {
                let off = be64(&table, k) & OFFSET_MASK;
                if off != 0 {
                    r.metadata(Meta::Other, format!("data cluster {k} of bitmap {n}"), false, off, cs)?;
                }
            }
            pos += (24 + extra + name_size).div_ceil(8) as usize * 8;
        }
    }

    // L2 tables (from the whole L1 table), then what they point to.
    let mut raw = vec![0u8; l1_bytes as usize];
    file.read_exact_at(&mut raw, h.l1_table_offset).map_err(|e| io("cannot read the L1 table of", e))?;
    let l1: Vec<u64> = (0..raw.len() / 8).map(|i| be64(&raw, i)).collect();
    for (i, &e) in l1.iter().enumerate() {
        if e & L1_RESERVED != 0 {
            return Err(r.corrupt(format!("L1 entry {i} ({e:#018x}) has reserved bits set")));
        }
        if e & OFFSET_MASK != 0 {
            r.metadata(Meta::L2Table, format!("L2 table of L1 entry {i}"), false, e & OFFSET_MASK, cs)?;
        }
    }
    // Each window of host clusters: the references the L2 tables make into
    // it, then its stored refcounts against them.
    let window = window.max(1);
    let mut last_counted = 0u64;
    let mut lo = 0u64;
    loop {
        let hi = (lo + window).min(nclusters);
        if lo > 0 {
            r.window(lo, hi);
        }
        count_l2_refs(&mut r, file, h, &l1)?;
        let last = hi >= nclusters;
        last_counted = last_counted.max(check_refcounts(&mut r, file, &rt, &l1, hi, last)?);
        if last {
            break;
        }
        lo = hi;
    }
    let per_block = cs / 2;
    let covered = rt.len() as u64 * per_block;
    if r.max_ref > covered {
        return Err(r.corrupt(format!(
            "host cluster {} is referenced but the refcount table covers only {covered} clusters",
            r.max_ref - 1
        )));
    }
    let end = nclusters.max(last_counted).max(r.max_ref);
    Ok(Ok(Scan { meta: r.meta, end, leaks: r.leaks }))
}

/// Count the references the L2 tables (those of `l1`) make into the window
/// of `r`, checking every entry (the checks that need no counts are made in
/// every pass and fail in the first).
fn count_l2_refs(r: &mut Refs<'_>, file: &File, h: &Header, l1: &[u64]) -> Result<()> {
    let (cs, file_len) = (r.cs, r.file_len);
    let l2n = cs / 8;
    let x = 62 - (h.cluster_bits - 8);
    let mut table = vec![0u8; cs as usize];
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        // The L2 table's own copied flag (its cluster is counted as metadata).
        r.flag(off / cs, e & COPIED != 0);
        file.read_exact_at(&mut table, off).map_err(|e| KnibError::io("cannot read an L2 table of", r.path, e))?;
        for j in 0..l2n as usize {
            let e = be64(&table, j);
            let guest = i as u64 * l2n + j as u64;
            let what = || format!("the L2 entry of guest cluster {guest}");
            if e & L2_COMPRESSED != 0 {
                let coff = e & ((1u64 << x) - 1);
                let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
                let end = (coff & !511) + sectors * 512;
                if coff < cs || coff >= file_len {
                    return Err(r.corrupt(format!("{}: compressed data at {coff} is outside the file", what())));
                }
                // Its last sector may overhang the end of the file (QEMU
                // writes only the compressed bytes), by less than a sector,
                // as the reader allows ([`super::Qcow2Image`]); a sector
                // count reaching further makes the merge drop references
                // to clusters past the end when it replaces the data.
                if end > file_len.div_ceil(512) * 512 {
                    return Err(r.corrupt(format!(
                        "{}: compressed data at {coff} ({} bytes) runs past the end of the file ({file_len} bytes)",
                        what(),
                        end - coff
                    )));
                }
                if e & COPIED != 0 {
                    return Err(r.corrupt(format!(
                        "{} ({e:#018x}) is compressed and has the copied flag, which compressed clusters never have",
                        what()
                    )));
                }
                for c in coff / cs..=(end - 1) / cs {
                    r.compressed(guest, c)?;
                }
                continue;
            }
            if e & L2_RESERVED != 0 {
                return Err(r.corrupt(format!("{} ({e:#018x}) has reserved bits set", what())));
            }
            let host = e & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if host >= file_len {
                return Err(
                    r.corrupt(format!("{} points at {host}, past the end of the file ({file_len} bytes)", what()))
                );
            }
            if !host.is_multiple_of(cs) {
                return Err(r.corrupt(format!("{} points at {host}, not cluster aligned", what())));
            }
            r.data(guest, host / cs, e & COPIED != 0)?;
        }
    }
    Ok(())
}

/// Check the stored refcounts of the window of `r` (which ends at host
/// cluster `hi`; with `last`, also those past the end of the file) against
/// the references counted, and the copied flags of the entries referring
/// to its L2 tables and data clusters (`l1`: the L1 table) against them;
/// the host cluster past the last one with a stored refcount, among those
/// looked at.
fn check_refcounts(r: &mut Refs<'_>, file: &File, rt: &[u64], l1: &[u64], hi: u64, last: bool) -> Result<u64> {
    let (cs, nclusters, lo) = (r.cs, r.nclusters, r.lo);
    let per_block = cs / 2;
    let mut last_counted = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (rti, &e) in rt.iter().enumerate() {
        let first = rti as u64 * per_block;
        // This block's clusters looked at in this pass.
        let from = first.max(lo);
        let to = if last { first + per_block } else { (first + per_block).min(hi) };
        if from >= to {
            continue;
        }
        if e == 0 {
            // No block: nothing in its range may be referenced.
            if let Some(c) = (from..to.min(nclusters)).find(|&c| r.refs_of(c) != 0) {
                let what = r.metadata_name(c);
                return Err(r.corrupt(format!("host cluster {c}{what} is referenced but has no refcount block")));
            }
            continue;
        }
        file.read_exact_at(&mut block, e).map_err(|e| KnibError::io("cannot read a refcount block of", r.path, e))?;
        for c in from..to {
            let k = (c - first) as usize;
            let stored = u16::from_be_bytes([block[2 * k], block[2 * k + 1]]);
            if stored != 0 {
                last_counted = c + 1;
            }
            let refs = r.refs_of(c);
            if stored > refs {
                r.leaks += 1;
            }
            if stored < refs {
                let what = r.metadata_name(c);
                return Err(r.corrupt(format!(
                    "host cluster {c}{what} has refcount {stored} but is referenced {refs} times (stale \
                     refcounts: qemu-img check -r all repairs them)"
                )));
            }
            if let Some(copied) = r.copied_flag(c).filter(|&copied| copied != (stored == 1)) {
                let who = referrer(r, file, l1, c)?;
                let has = if copied { "has" } else { "lacks" };
                return Err(r.corrupt(format!(
                    "{who} {has} the copied flag, but host cluster {c} it points at has refcount {stored} \
                     (OFLAG_COPIED: qemu-img check -r all repairs it)"
                )));
            }
        }
    }
    Ok(last_counted)
}

/// The entry referring to host cluster `c` (an L2 table or the data of an
/// uncompressed L2 entry), named with its value: for an error message.
fn referrer(r: &Refs<'_>, file: &File, l1: &[u64], c: u64) -> Result<String> {
    let cs = r.cs;
    if let Some((i, e)) = l1.iter().enumerate().find(|&(_, &e)| e & OFFSET_MASK != 0 && (e & OFFSET_MASK) / cs == c) {
        return Ok(format!("L1 entry {i} ({e:#018x})"));
    }
    let l2n = cs / 8;
    let mut table = vec![0u8; cs as usize];
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        file.read_exact_at(&mut table, off).map_err(|e| KnibError::io("cannot read an L2 table of", r.path, e))?;
        for j in 0..l2n as usize {
            let e = be64(&table, j);
            if e & L2_COMPRESSED == 0 && e & OFFSET_MASK != 0 && (e & OFFSET_MASK) / cs == c {
                return Ok(format!("the L2 entry of guest cluster {} ({e:#018x})", i as u64 * l2n + j as u64));
            }
        }
    }
    Ok(format!("the entry referring to host cluster {c}"))
}

impl Refs<'_> {
    fn metadata_name(&self, c: u64) -> String {
        self.meta.name(c).map(|m| format!(" ({m})")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two bits a cluster: what each holds, named; the clusters of a
    /// window found across words; nothing past the file.
    #[test]
    fn the_metadata_map_keeps_kinds_names_and_windows() {
        let mut m = MetaMap::new(100);
        assert_eq!(m.bits.len(), 4, "two bits per cluster, 32 a word");
        m.set(0, Meta::Other);
        m.named.push((0, 1, "header".into()));
        m.set(31, Meta::L2Table);
        m.set(32, Meta::RefcountBlock);
        m.set(70, Meta::Other);
        m.set(99, Meta::L2Table);
        m.set(5000, Meta::L2Table);
        assert_eq!(m.kind(0), Some(Meta::Other));
        assert_eq!(m.kind(31), Some(Meta::L2Table));
        assert_eq!(m.kind(32), Some(Meta::RefcountBlock));
        assert_eq!((m.kind(1), m.kind(30), m.kind(33), m.kind(5000), m.kind(u64::MAX)), (None, None, None, None, None));
        assert_eq!(m.name(0).as_deref(), Some("the header"));
        assert_eq!(m.name(31).as_deref(), Some("an L2 table"));
        assert_eq!(m.name(32).as_deref(), Some("a refcount block"));
        assert_eq!(m.name(70).as_deref(), Some("a data cluster of a bitmap"));
        assert_eq!(m.within(0, 100), vec![0, 31, 32, 70, 99]);
        assert_eq!(m.within(1, 70), vec![31, 32]);
        assert_eq!(m.within(71, 99), Vec::<u64>::new());
        assert_eq!(m.within(90, 200), vec![99]);
    }
}
