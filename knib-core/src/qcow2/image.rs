//! One qcow2 file: its L1 table, an L2 table cache, cluster lookups, and
//! reads of its own guest-visible data (unallocated clusters handed to a
//! caller-supplied filler: zeros, or the backing chain).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::compressed::Decompressor;
use super::header::{header_prefix_len, Header};
use super::source::ReadAt;
use crate::error::{KnibError, Result};

/// Bits 9-55 of an L1 or standard L2 entry: a cluster-aligned host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry: 0-8 and 56-62.
pub(crate) const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry: 1-8 and 56-61.
pub(crate) const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// L2 entry bit 62: compressed cluster.
pub(crate) const L2_COMPRESSED: u64 = 1 << 62;
/// L1 and L2 entry bit 63: "copied" (refcount exactly one); ignored for reading.
pub(crate) const COPIED: u64 = 1 << 63;
/// Standard cluster descriptor bit 0: reads as zeros (v3).
pub(crate) const L2_ZERO: u64 = 1;
/// Bits 9-63 of a refcount table entry.
pub(crate) const RT_OFFSET_MASK: u64 = !0x1ff;
/// The L2 cache holds about this many bytes of tables (a chain shares it
/// among its layers: [`Qcow2Image::set_l2_cache_bytes`]). 1 MiB: sixteen
/// 64 KiB tables, 8 GiB of guest disk; a copy, a restore or a merge reads
/// each layer's tables in guest order and needs one at a time (2 MiB took
/// the engine's incremental of a 32 GiB disk over 32 MiB of RSS).
pub(crate) const L2_CACHE_BYTES: u64 = 1 << 20;
/// ... and between these many tables.
const L2_CACHE_MIN: usize = 2;
const L2_CACHE_MAX: usize = 64;

/// How many L2 tables of `1 << cluster_bits` bytes a cache of about `bytes`
/// holds.
fn l2_capacity(bytes: u64, cluster_bits: u32) -> usize {
    ((bytes >> cluster_bits) as usize).clamp(L2_CACHE_MIN, L2_CACHE_MAX)
}

/// Where one guest cluster of ONE image (its backing file not consulted)
/// gets its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterState {
    /// Not allocated in this image: it reads from the backing file, or as
    /// zeros when there is none (or the backing file is shorter).
    Unallocated,
    /// Reads as zeros (the v3 zero flag), whatever the backing file holds.
    Zero,
    /// Stored uncompressed at this cluster-aligned offset of the file.
    Data {
        /// Offset of the cluster in the image file.
        host_offset: u64,
    },
    /// Stored compressed at this (unaligned) offset of the file.
    Compressed {
        /// Offset of the compressed data in the image file.
        host_offset: u64,
        /// Bytes from `host_offset` to the end of the last 512-byte sector
        /// the descriptor covers: an upper bound of the compressed data's
        /// length (the data may end earlier in that sector).
        compressed_len: u64,
    },
}

/// The bytes an image is read from: a file, or memory (for tests and fuzzing).
#[derive(Debug)]
enum Storage {
    File(File),
    Memory(Vec<u8>),
    /// Any other source (an object of a vault: [`super::source`]).
    Source(SharedSource),
}

/// A [`ReadAt`] source shared with whoever made it.
struct SharedSource(std::sync::Arc<dyn ReadAt>);

impl std::fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSource").field("len", &self.0.len()).finish()
    }
}

impl Storage {
    /// Fill `buf` from `offset`; bytes past the end of the storage read as
    /// zeros. Returns how many bytes came from the storage.
    fn read_zero_fill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Storage::Memory(data) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                let n = (data.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&data[start..start + n]);
                buf[n..].fill(0);
                Ok(n)
            }
            Storage::Source(s) => s.0.read_at(offset, buf),
            Storage::File(f) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf[done..].fill(0);
                Ok(done)
            }
        }
    }
}

pub(crate) use super::source::file_size;

/// Entries of the L1 table read at a time (16 KiB: with 64 KiB clusters,
/// 1 TiB of disk; with 4 KiB clusters, 4 GiB).
const L1_CHUNK_ENTRIES: usize = 2048;
/// Chunks of the L1 table an image holds at a time: 64 KiB a layer, 4 MiB
/// for the deepest chain ([`super::MAX_CHAIN_DEPTH`]), whatever the
/// virtual sizes.
const L1_CHUNK_SLOTS: usize = 4;

/// The L1 table, read on demand: the entries covering the virtual size
/// (`entries`, from the table at `offset`), an LRU of a few chunks of
/// them in memory: (chunk number, entries, last use). A copy, a restore or
/// a merge reads the entries in guest order, one chunk at a time; a table
/// of 32 MiB (2 PiB of disk) costs no more memory than a small one, and a
/// chain no more than its depth times a few chunks.
#[derive(Debug)]
struct L1Window {
    offset: u64,
    entries: usize,
    slots: Vec<(usize, Vec<u64>, u64)>,
    /// The slot used last (the next lookup's first guess).
    last: usize,
    clock: u64,
}

/// An LRU cache of decoded L2 tables, keyed by their file offset: (offset,
/// entries, last use, which groups of 64 entries hold one that is not 0:
/// bit `g % 64` of word `g / 64` for entries `64 * g..64 * g + 64`).
#[derive(Debug)]
struct L2Cache {
    slots: Vec<(u64, Vec<u64>, u64, Vec<u64>)>,
    capacity: usize,
    clock: u64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the tables or the in-memory bytes: they can be large.
        f.debug_struct("Qcow2Image")
            .field("name", &self.name)
            .field("file_len", &self.file_len)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// One qcow2 file opened for reading.
///
/// It reads the guest-visible bytes the file itself holds; unallocated
/// clusters read as zeros through [`Qcow2Image::read_at`], and come from
/// the backing chain through [`super::Chain`]. Every lookup checks the
/// entries it uses (see the module documentation); a violation is a
/// [`crate::ErrorKind::Corrupt`] error naming the file.
pub struct Qcow2Image {
    name: String,
    path: Option<PathBuf>,
    storage: Storage,
    file_len: u64,
    header: Header,
    /// The active L1 entries that cover the virtual size, read on demand.
    l1: L1Window,
    l2_cache: L2Cache,
    /// The last decompressed cluster: ((host offset, compressed length),
    /// cluster bytes). Keyed by both: two L2 entries may name one offset
    /// with different lengths (one decompressing, one truncated), and each
    /// reads as its own entry says, as QEMU reads it.
    decompressed: Option<((u64, u64), Vec<u8>)>,
    /// Guest clusters `from..to` found to be unmapped (L2 entries of 0)
    /// by the last [`Qcow2Image::next_mapped_cluster_before`].
    unmapped: Option<(u64, u64)>,
    compressed_buf: Vec<u8>,
    decompressor: Decompressor,
}

impl Qcow2Image {
    /// Open the qcow2 file at `path` read-only and check its header (the
    /// L1 table is read as it is used, each entry checked then). A dirty
    /// image opens (reads are correct) with a warning logged.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| KnibError::io("open qcow2 image", path, e))?;
        let file_len = file_size(&file).map_err(|e| KnibError::io("size qcow2 image", path, e))?;
        let mut img = Self::from_storage(path.display().to_string(), Storage::File(file), file_len)?;
        img.path = Some(path.to_path_buf());
        Ok(img)
    }

    /// Open an image held in memory; `name` is used in error messages. The
    /// same checks as [`Qcow2Image::open`]: for tests and fuzzing.
    pub fn from_bytes(name: impl Into<String>, data: Vec<u8>) -> Result<Self> {
        let len = data.len() as u64;
        Self::from_storage(name.into(), Storage::Memory(data), len)
    }

    /// Open the image whose bytes `source` gives (an object of a vault);
    /// `name` is used in error messages. The same checks as
    /// [`Qcow2Image::open`].
    pub fn from_source(name: impl Into<String>, source: std::sync::Arc<dyn ReadAt>) -> Result<Self> {
        let len = source.len();
        Self::from_storage(name.into(), Storage::Source(SharedSource(source)), len)
    }

    fn from_storage(name: String, storage: Storage, file_len: u64) -> Result<Self> {
        let io = |e: std::io::Error| read_error(&name, e);
        let mut start = [0u8; 24];
        let got = storage.read_zero_fill(0, &mut start).map_err(io)?;
        let mut prefix = vec![0u8; header_prefix_len(&start[..got], file_len)];
        let got = storage.read_zero_fill(0, &mut prefix).map_err(io)?;
        prefix.truncate(got);
        let header = Header::parse(&name, &prefix, file_len)?;
        drop(prefix);
        if header.is_dirty() {
            log::warn!("qcow2 image {name} is marked dirty (not closed cleanly); reading it anyway");
        }
        if header.is_marked_corrupt() {
            log::warn!("qcow2 image {name} is marked corrupt by QEMU; reading it with every entry checked");
        }

        // The L1 entries covering the virtual size (Header::parse checked
        // that there are that many and that the whole table is in the file).
        let entries = (l1_held_bytes(&header) / 8) as usize; // <= 4 Mi entries
        let l1 = L1Window { offset: header.l1_table_offset, entries, slots: Vec::new(), last: 0, clock: 0 };

        let capacity = l2_capacity(L2_CACHE_BYTES, header.cluster_bits);
        Ok(Qcow2Image {
            name,
            path: None,
            storage,
            file_len,
            header,
            l1,
            l2_cache: L2Cache { slots: Vec::new(), capacity, clock: 0 },
            decompressed: None,
            unmapped: None,
            compressed_buf: Vec::new(),
            decompressor: Decompressor::default(),
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path it was opened from (`None` for an in-memory image).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The name used in error messages (the path, or the in-memory name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Virtual (guest-visible) size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Number of guest clusters (the last may extend past the virtual size).
    pub fn guest_clusters(&self) -> u64 {
        self.header.guest_clusters()
    }

    /// Length of the image file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Whether the image is marked dirty (see [`Header::is_dirty`]).
    pub fn is_dirty(&self) -> bool {
        self.header.is_dirty()
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> KnibError {
        KnibError::corrupt(format!("qcow2 image {}: {what}", self.name))
    }

    fn io_err(&self, e: std::io::Error) -> KnibError {
        read_error(&self.name, e)
    }

    /// Where guest cluster `index` (guest offset `index * cluster_size`)
    /// gets its data in this image alone.
    ///
    /// Errors: [`crate::ErrorKind::InvalidInput`] for an index at or past
    /// [`Qcow2Image::guest_clusters`]; [`crate::ErrorKind::Corrupt`] for a
    /// bad L1 or L2 entry (reserved bits, misaligned or out-of-file offsets,
    /// a zero flag in a v2 image, a compressed range past the end of file).
    pub fn cluster_state(&mut self, index: u64) -> Result<ClusterState> {
        if index >= self.guest_clusters() {
            return Err(KnibError::invalid(format!(
                "qcow2 image {}: guest cluster {index} is past the virtual size ({} clusters)",
                self.name,
                self.guest_clusters()
            )));
        }
        let l2_entries = self.header.l2_entries();
        let l1_index = (index / l2_entries) as usize; // < l1.len() by the check above
        let l2_index = (index % l2_entries) as usize;
        let l2_offset = self.l2_table_offset(l1_index)?;
        if l2_offset == 0 {
            return Ok(ClusterState::Unallocated);
        }
        let entry = self.l2_entry(l2_offset, l2_index)?;
        self.decode_l2_entry(index, entry)
    }

    /// Let the L2 cache hold about `bytes` of tables (at least two), from
    /// now on: a chain gives each of its layers a share of one budget, so
    /// its memory does not grow with its depth.
    pub fn set_l2_cache_bytes(&mut self, bytes: u64) {
        self.l2_cache.capacity = l2_capacity(bytes, self.header.cluster_bits);
        self.l2_cache.slots.truncate(self.l2_cache.capacity);
    }

    /// How many L2 tables the cache holds at most.
    pub fn l2_cache_capacity(&self) -> usize {
        self.l2_cache.capacity
    }

    /// The L2 table offset (checked) of L1 entry `i`, 0 when that range of
    /// guest clusters has no L2 table.
    pub(crate) fn l2_table_offset(&mut self, i: usize) -> Result<u64> {
        let e = self.l1_entry(i)?;
        self.check_l1_entry(i, e)
    }

    /// L1 entry `i` (unchecked), its chunk of the table read unless it is
    /// held ([`L1Window`]).
    fn l1_entry(&mut self, i: usize) -> Result<u64> {
        let (chunk, at) = (i / L1_CHUNK_ENTRIES, i % L1_CHUNK_ENTRIES);
        if i >= self.l1.entries {
            return Err(self.corrupt(format!("no L1 entry {i}")));
        }
        let w = &mut self.l1;
        if let Some((c, e, _)) = w.slots.get(w.last) {
            if *c == chunk {
                return Ok(e.get(at).copied().unwrap_or(0));
            }
        }
        w.clock += 1;
        let clock = w.clock;
        if let Some(slot) = w.slots.iter().position(|s| s.0 == chunk) {
            w.slots[slot].2 = clock;
            w.last = slot;
            return Ok(w.slots[slot].1.get(at).copied().unwrap_or(0));
        }
        let first = chunk * L1_CHUNK_ENTRIES;
        let n = (w.entries - first).min(L1_CHUNK_ENTRIES);
        let mut raw = vec![0u8; n * 8];
        let got = self.storage.read_zero_fill(w.offset + first as u64 * 8, &mut raw).map_err(|e| self.io_err(e))?;
        if got < raw.len() {
            return Err(self.corrupt("L1 table is cut short by the end of the file"));
        }
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        let e = table.get(at).copied().unwrap_or(0);
        let w = &mut self.l1;
        if w.slots.len() < L1_CHUNK_SLOTS {
            w.slots.push((chunk, table, clock));
            w.last = w.slots.len() - 1;
        } else {
            let lru = w.slots.iter().enumerate().min_by_key(|(_, s)| s.2).map_or(0, |(at, _)| at);
            w.slots[lru] = (chunk, table, clock);
            w.last = lru;
        }
        Ok(e)
    }

    /// Whether the range of L1 entry `i` maps anything: it has an L2
    /// table with an entry that is not 0. A table of zeros maps nothing
    /// (each of its entries reads as unallocated), and a loop over guest
    /// clusters steps over its range in one go: a crafted image whose
    /// millions of L1 entries name tables of zeros (one shared table, or
    /// holes of a sparse file) would otherwise be walked cluster by
    /// cluster, 2^40 lookups with 2 MiB clusters. The table is read into
    /// the L2 cache (where the clusters of a mapped range are looked up
    /// next); whether it holds anything is noted as it is decoded.
    pub(crate) fn l2_range_mapped(&mut self, i: usize) -> Result<bool> {
        let off = self.l2_table_offset(i)?;
        if off == 0 {
            return Ok(false);
        }
        let slot = self.load_l2(off)?;
        Ok(self.l2_cache.slots.get(slot).is_some_and(|s| s.3.iter().any(|&w| w != 0)))
    }

    /// The first entry at or after `from` of the L2 table in cache slot
    /// `slot` that is not 0, found through the slot's groups of 64: a
    /// table with one entry set costs a few dozen words to search, not a
    /// step per entry (a crafted image may name one such table from every
    /// L1 entry).
    fn next_nonzero_entry(&self, slot: usize, from: usize) -> Option<usize> {
        let (_, table, _, groups) = self.l2_cache.slots.get(slot)?;
        let mut g = from / 64;
        // The rest of the first group, then the next groups that hold one.
        if let Some(k) = table.get(from..(g + 1) * 64).and_then(|t| t.iter().position(|&e| e != 0)) {
            return Some(from + k);
        }
        g += 1;
        while g / 64 < groups.len() {
            let word = groups[g / 64] >> (g % 64);
            if word == 0 {
                g = (g / 64 + 1) * 64;
                continue;
            }
            g += word.trailing_zeros() as usize;
            let start = g * 64;
            return table.get(start..).and_then(|t| t.iter().take(64).position(|&e| e != 0)).map(|k| start + k);
        }
        None
    }

    /// The first guest cluster at or after `index` whose L2 entry is not
    /// 0 ([`Qcow2Image::guest_clusters`] when none is): every cluster
    /// before it is unallocated here. Reads the L1 table (its entries
    /// checked) and the L2 tables it names up to there, so a walk steps
    /// over the unmapped ranges of a huge, sparse image, and over the
    /// zero entries of a table, instead of asking for each cluster (a
    /// crafted image whose millions of L1 entries name one table with a
    /// single entry set costs one search of that table per entry).
    pub(crate) fn next_mapped_cluster(&mut self, index: u64) -> Result<u64> {
        self.next_mapped_cluster_before(index, u64::MAX)
    }

    /// [`Qcow2Image::next_mapped_cluster`], searching no further than
    /// cluster `end` (returned when nothing is mapped before it).
    pub(crate) fn next_mapped_cluster_before(&mut self, index: u64, end: u64) -> Result<u64> {
        let limit = self.guest_clusters().min(end);
        // What the last search found unmapped is not searched again: a
        // walk that asks of several images in turn searches each one's
        // stretches once, not once for every cluster another one maps.
        let (mut start, mut from) = (index, index);
        if let Some((f, t)) = self.unmapped {
            if f <= index && index < t {
                (start, from) = (t, f);
            }
        }
        if start >= limit {
            return Ok(limit.max(index));
        }
        let l2_entries = self.header.l2_entries();
        let mut found = limit;
        let mut r = start / l2_entries;
        while r * l2_entries < limit {
            let off = self.l2_table_offset(r as usize)?;
            if off != 0 {
                let slot = self.load_l2(off)?;
                let at = if r == start / l2_entries { (start % l2_entries) as usize } else { 0 };
                if let Some(k) = self.next_nonzero_entry(slot, at) {
                    // An entry past the virtual size (in the last table)
                    // maps nothing the guest sees.
                    found = (r * l2_entries + k as u64).min(limit);
                    break;
                }
            }
            r += 1;
        }
        self.unmapped = Some((from, found));
        Ok(found)
    }

    /// The open file (`None` for an in-memory image).
    pub(crate) fn file(&self) -> Option<&File> {
        match &self.storage {
            Storage::File(f) => Some(f),
            Storage::Memory(_) | Storage::Source(_) => None,
        }
    }

    /// The L2 table offset of L1 entry `i` (0: none), checked.
    fn check_l1_entry(&self, i: usize, e: u64) -> Result<u64> {
        if e & L1_RESERVED != 0 {
            return Err(self.corrupt(format!("L1 entry {i} ({e:#018x}) has reserved bits set")));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(self.corrupt(format!("L1 entry {i}: L2 table offset {off} is not cluster aligned")));
        }
        if off < cs || off.saturating_add(cs) > self.file_len {
            return Err(self.corrupt(format!(
                "L1 entry {i}: L2 table at {off} is in the header cluster or past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(off)
    }

    /// Entry `i` of the L2 table at `off` (checked to be in the file).
    fn l2_entry(&mut self, off: u64, i: usize) -> Result<u64> {
        let slot = self.load_l2(off)?;
        Ok(self.l2_cache.slots.get(slot).and_then(|s| s.1.get(i)).copied().unwrap_or(0))
    }

    /// The slot of the L2 cache holding the table at `off` (checked to be
    /// in the file), read into it unless it is there.
    fn load_l2(&mut self, off: u64) -> Result<usize> {
        self.l2_cache.clock += 1;
        let clock = self.l2_cache.clock;
        if let Some(at) = self.l2_cache.slots.iter().position(|s| s.0 == off) {
            self.l2_cache.slots[at].2 = clock;
            return Ok(at);
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        let got = self.storage.read_zero_fill(off, &mut raw).map_err(|e| self.io_err(e))?;
        if got < raw.len() {
            return Err(self.corrupt(format!("L2 table at {off} is cut short by the end of the file")));
        }
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        let mut groups = vec![0u64; table.len().div_ceil(64 * 64)];
        for (g, chunk) in table.chunks(64).enumerate() {
            if chunk.iter().any(|&e| e != 0) {
                groups[g / 64] |= 1 << (g % 64);
            }
        }
        let slots = &mut self.l2_cache.slots;
        if slots.len() < self.l2_cache.capacity {
            slots.push((off, table, clock, groups));
            return Ok(slots.len() - 1);
        }
        let lru = slots.iter().enumerate().min_by_key(|(_, s)| s.2).map_or(0, |(at, _)| at);
        slots[lru] = (off, table, clock, groups);
        Ok(lru)
    }

    fn decode_l2_entry(&self, index: u64, e: u64) -> Result<ClusterState> {
        let cs = self.cluster_size();
        if e & L2_COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8) bits of offset, then the count of
            // additional 512-byte sectors up to bit 61.
            let x = 62 - (self.header.cluster_bits - 8);
            let host_offset = e & ((1u64 << x) - 1);
            let extra_sectors = (e >> x) & ((1u64 << (62 - x)) - 1);
            if host_offset >> 56 != 0 {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index} ({e:#018x}): compressed offset {host_offset} is over 2^56"
                )));
            }
            let end = (host_offset & !511) + (extra_sectors + 1) * 512;
            let compressed_len = end - host_offset;
            // The last sector may overhang the end of the file (QEMU writes
            // only the compressed bytes), by less than one sector.
            if host_offset < cs || host_offset >= self.file_len || end > self.file_len.div_ceil(512) * 512 {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index}: compressed data at {host_offset} ({compressed_len} bytes) \
                     is in the header cluster or past the end of the file ({} bytes)",
                    self.file_len
                )));
            }
            return Ok(ClusterState::Compressed { host_offset, compressed_len });
        }
        if e & L2_RESERVED != 0 {
            return Err(self.corrupt(format!("L2 entry for guest cluster {index} ({e:#018x}) has reserved bits set")));
        }
        if e & L2_ZERO != 0 {
            if self.header.version < 3 {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index} has the zero flag, which version 2 images cannot have"
                )));
            }
            // A zero cluster may keep its allocation; QEMU refuses it at an
            // unaligned offset, and so does knib (it read as zeros).
            let kept = e & OFFSET_MASK;
            if !kept.is_multiple_of(cs) {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index}: zero cluster allocation offset {kept} is not cluster aligned"
                )));
            }
            return Ok(ClusterState::Zero);
        }
        let host_offset = e & OFFSET_MASK;
        if host_offset == 0 {
            if e & COPIED != 0 {
                return Err(self.corrupt(format!(
                    "L2 entry for guest cluster {index} maps host offset 0 (only valid with an external data file)"
                )));
            }
            return Ok(ClusterState::Unallocated);
        }
        if !host_offset.is_multiple_of(cs) {
            return Err(self.corrupt(format!(
                "L2 entry for guest cluster {index}: data offset {host_offset} is not cluster aligned"
            )));
        }
        // A data cluster starts inside the file; a tail past the end of the
        // file reads as zeros (as QEMU reads it).
        if host_offset < cs || host_offset >= self.file_len {
            return Err(self.corrupt(format!(
                "L2 entry for guest cluster {index}: data cluster at {host_offset} is in the header cluster or \
                 past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(ClusterState::Data { host_offset })
    }

    /// Read `buf.len()` bytes of the file itself at `offset` (bytes past the
    /// end of the file read as zeros): the raw read behind a
    /// [`ClusterState::Data`] cluster.
    pub fn read_host(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage.read_zero_fill(offset, buf).map_err(|e| self.io_err(e))?;
        Ok(())
    }

    /// A duplicate of the descriptor the image reads (`None` in memory).
    pub(crate) fn dup_file(&self) -> Option<std::io::Result<File>> {
        match &self.storage {
            Storage::File(f) => Some(f.try_clone()),
            Storage::Memory(_) | Storage::Source(_) => None,
        }
    }

    /// Read guest bytes `offset..offset + buf.len()` of this image alone:
    /// unallocated clusters read as zeros (the backing file is NOT read; use
    /// [`super::Chain`] for that).
    ///
    /// Errors: [`crate::ErrorKind::InvalidInput`] when the range goes past the
    /// virtual size; [`crate::ErrorKind::Corrupt`] as [`Qcow2Image::cluster_state`],
    /// or for compressed data that does not decompress to a whole cluster.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_with(offset, buf, &mut |_, b| {
            b.fill(0);
            Ok(())
        })
    }

    /// Check that `offset..offset + len` is inside the virtual size `size`
    /// of the image that `name` (called only on error) names.
    pub(crate) fn check_range(name: impl Fn() -> String, size: u64, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(KnibError::invalid(format!(
                "{}: read of {len} bytes at {offset} goes past the virtual size {size}",
                name()
            ))),
        }
    }

    /// Like [`Qcow2Image::read_at`], with unallocated runs filled by
    /// `unallocated(guest_offset, buf)`.
    pub(crate) fn read_with(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        unallocated: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        Self::check_range(|| format!("qcow2 image {}", self.name), self.virtual_size(), offset, buf.len())?;
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos >> bits;
            let in_cluster = pos & (cs - 1);
            let remaining = buf.len() - done;
            let state = self.cluster_state(index)?;
            let mut len = ((cs - in_cluster) as usize).min(remaining);
            // Extend the run over following clusters of the same kind (and,
            // for data, contiguous in the file), to read them in one go.
            if !matches!(state, ClusterState::Compressed { .. }) {
                let mut next = index + 1;
                while len < remaining {
                    let follows = match (state, self.cluster_state(next)?) {
                        (ClusterState::Unallocated, ClusterState::Unallocated) => true,
                        (ClusterState::Zero, ClusterState::Zero) => true,
                        (ClusterState::Data { host_offset: a }, ClusterState::Data { host_offset: b }) => {
                            Some(b) == a.checked_add((next - index) << bits)
                        }
                        _ => false,
                    };
                    if !follows {
                        break;
                    }
                    len += (cs as usize).min(remaining - len);
                    next += 1;
                }
            }
            let out = &mut buf[done..done + len];
            match state {
                ClusterState::Unallocated => unallocated(pos, out)?,
                ClusterState::Zero => out.fill(0),
                ClusterState::Data { host_offset } => {
                    self.storage.read_zero_fill(host_offset + in_cluster, out).map_err(|e| self.io_err(e))?;
                }
                ClusterState::Compressed { host_offset, compressed_len } => {
                    let data = self.decompress(index, host_offset, compressed_len, &mut |_, _| Ok(()))?;
                    let start = in_cluster as usize;
                    out.copy_from_slice(&data[start..start + len]);
                }
            }
            done += len;
        }
        Ok(())
    }

    /// The guest bytes (one whole cluster) of guest cluster `index`, stored
    /// compressed at `host_offset` as [`Qcow2Image::cluster_state`] said.
    pub fn read_compressed(&mut self, index: u64, host_offset: u64, compressed_len: u64) -> Result<&[u8]> {
        self.decompress(index, host_offset, compressed_len, &mut |_, _| Ok(()))
    }

    /// [`Qcow2Image::read_compressed`], calling `seen(offset, bytes)` with
    /// the bytes read from the file, if any were (a cached cluster is not
    /// read again): for the hash of the file as it is read.
    pub(crate) fn read_compressed_seen(
        &mut self,
        index: u64,
        host_offset: u64,
        compressed_len: u64,
        seen: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<&[u8]> {
        self.decompress(index, host_offset, compressed_len, seen)
    }

    /// The decompressed bytes (one whole cluster) of the compressed cluster
    /// at `host_offset` of `compressed_len` bytes; the last one is cached
    /// (by offset and length).
    fn decompress(
        &mut self,
        index: u64,
        host_offset: u64,
        compressed_len: u64,
        seen: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<&[u8]> {
        let cs = self.cluster_size() as usize;
        let key = (host_offset, compressed_len);
        let cached = matches!(&self.decompressed, Some((k, _)) if *k == key);
        if !cached {
            // compressed_len <= 2 * cluster size (the sector count has
            // cluster_bits - 8 bits), so this buffer is bounded.
            let avail = compressed_len.min(self.file_len.saturating_sub(host_offset)) as usize;
            let mut input = std::mem::take(&mut self.compressed_buf);
            input.resize(avail, 0);
            let got = self.storage.read_zero_fill(host_offset, &mut input).map_err(|e| self.io_err(e))?;
            input.truncate(got);
            if let Err(e) = seen(host_offset, &input) {
                self.compressed_buf = input;
                return Err(e);
            }
            let mut out = match self.decompressed.take() {
                Some((_, v)) => v,
                None => Vec::new(),
            };
            out.resize(cs, 0);
            let r = self.decompressor.run(self.header.compression_type, &input, &mut out);
            self.compressed_buf = input;
            if let Err(what) = r {
                return Err(self.corrupt(format!(
                    "compressed cluster for guest cluster {index} at {host_offset} ({}): {what}",
                    self.header.compression_type.as_str()
                )));
            }
            self.decompressed = Some((key, out));
        }
        match &self.decompressed {
            Some((_, data)) => Ok(data),
            None => Err(KnibError::internal("decompressed cluster cache is empty")),
        }
    }
}

/// Bytes of the L1 table an image with header `h` reads: the entries
/// covering its virtual size (8 bytes per 512 MiB of disk with 64 KiB
/// clusters, per 2 MiB with 4 KiB clusters).
fn l1_held_bytes(h: &Header) -> u64 {
    h.size.div_ceil(h.cluster_size() * h.l2_entries()) * 8
}

/// The error of a failed read of image `name`: an I/O error, unless the
/// source said more (a vault object that changed is `corrupt`).
fn read_error(name: &str, e: std::io::Error) -> KnibError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<KnibError>()) {
        Some(k) => k.clone().context(format!("read qcow2 image {name}")),
        None => KnibError::new(crate::ErrorKind::Io, format!("read qcow2 image {name}: {e}")),
    }
}
