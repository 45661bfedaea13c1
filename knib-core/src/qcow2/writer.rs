//! A streaming qcow2 version 3 writer: guest clusters are pushed in
//! increasing order and the file is produced front to back, so memory stays
//! bounded whatever the disk size and the file can be hashed as it is
//! written. See the module documentation of [`crate::qcow2`] for the layout.

use super::header::{CompressionType, INCOMPAT_COMPRESSION, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES};
use super::image::{COPIED, L2_COMPRESSED as COMPRESSED, L2_ZERO as ZERO};
use super::sink::Sink;
use crate::error::{KnibError, Result};

/// log2 of the refcount width written (16-bit refcounts, as QEMU's default).
pub const REFCOUNT_ORDER: u32 = 4;
/// The largest refcount a 16-bit entry holds.
const REFCOUNT_MAX: u16 = u16::MAX;
/// The header length written: 104 bytes plus the compression type byte,
/// padded to a multiple of 8.
const HEADER_LENGTH: usize = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// The backing file an image points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name written in the image (relative to the image's directory, or absolute).
    pub name: String,
    /// Its format ("qcow2" or "raw"), written in the backing format extension.
    pub format: String,
}

/// The shape of an image to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Virtual (guest-visible) size in bytes.
    pub virtual_size: u64,
    /// log2 of the cluster size: 9 to 21 (16 = 64 KiB, QEMU's default).
    pub cluster_bits: u32,
    /// The backing file pointer, if any.
    pub backing: Option<BackingRef>,
    /// The compression type recorded in the header (compressed clusters
    /// must use it); zstd sets incompatible feature bit 3.
    pub compression: CompressionType,
}

impl ImageSpec {
    /// Check the spec against the format's and QEMU's limits.
    pub fn validate(&self) -> Result<()> {
        if !(super::MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(KnibError::invalid(format!(
                "cluster size 2^{} is not supported (512 bytes to 2 MiB)",
                self.cluster_bits
            )));
        }
        if let Some(b) = &self.backing {
            if b.name.is_empty() || b.name.len() as u64 > MAX_BACKING_NAME {
                return Err(KnibError::invalid(format!(
                    "backing file name {:?} must be 1 to {MAX_BACKING_NAME} bytes",
                    b.name
                )));
            }
            if b.format.is_empty() || b.format.len() > 64 {
                return Err(KnibError::invalid(format!("backing format {:?} is invalid", b.format)));
            }
            let need = HEADER_LENGTH + 8 + b.format.len().div_ceil(8) * 8 + 8 + b.name.len();
            if need as u64 > self.cluster_size() {
                return Err(KnibError::invalid(format!(
                    "backing file name {:?} does not fit in the header cluster of {} bytes",
                    b.name,
                    self.cluster_size()
                )));
            }
        }
        if self.l1_size() * 8 > MAX_L1_BYTES {
            return Err(KnibError::invalid(format!(
                "virtual size {} needs an L1 table over QEMU's limit of {MAX_L1_BYTES} bytes with {}-byte clusters",
                self.virtual_size,
                self.cluster_size()
            )));
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Guest clusters covering the virtual size.
    pub fn guest_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    /// Entries of the L1 table.
    pub fn l1_size(&self) -> u64 {
        self.guest_clusters().div_ceil(self.l2_entries())
    }
}

/// What a finished image holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Length of the file in bytes.
    pub file_len: u64,
    /// Guest clusters stored uncompressed.
    pub data_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters written as zero clusters (L2 zero flag).
    pub zero_clusters: u64,
    /// L2 tables written.
    pub l2_tables: u64,
    /// Refcount blocks written.
    pub refcount_blocks: u64,
}

/// The streaming writer. The file it produces is, in order:
///
/// 1. cluster 0: the header (given up front, or written at the end by the
///    caller through [`Layout::finish`]'s result);
/// 2. for each L2 range (the guest clusters one L2 table maps) in guest
///    order: its data (uncompressed clusters aligned, compressed clusters
///    packed byte by byte), then its L2 table (aligned); refcount blocks
///    whose whole range of host clusters lies before are emitted just
///    before an L2 table;
/// 3. the L1 table, the refcount table, and the remaining refcount blocks.
pub struct Layout<S: Sink> {
    spec: ImageSpec,
    cs: u64,
    bits: u32,
    l2_entries: u64,
    /// Refcount entries per refcount block.
    rb_entries: u64,
    sink: S,
    /// Bytes produced so far (the next byte's offset).
    pos: u64,
    l1: Vec<u64>,
    /// The L2 range being filled and its table.
    range: Option<u64>,
    l2: Vec<u64>,
    l2_used: bool,
    /// Refcounts of host clusters from `window_start` on.
    window_start: u64,
    counts: std::collections::VecDeque<u16>,
    /// Offsets of the refcount blocks emitted, by block number.
    blocks: Vec<u64>,
    /// The last guest cluster pushed, to keep the order.
    last_index: Option<u64>,
    header: Option<Vec<u8>>,
    summary: WriteSummary,
    raw_l2: Vec<u8>,
}

impl<S: Sink> Layout<S> {
    /// Start an image: `header` is the header cluster when it is known in
    /// advance (from a plan: it is appended first, and [`Layout::finish`]
    /// checks it); otherwise cluster 0 is left zero for the caller to fill.
    pub fn new(spec: ImageSpec, mut sink: S, header: Option<Vec<u8>>) -> Result<Self> {
        spec.validate()?;
        let cs = spec.cluster_size();
        match &header {
            Some(h) if h.len() as u64 == cs => sink.append(h)?,
            Some(h) => {
                return Err(KnibError::internal(format!("header cluster of {} bytes, not {cs}", h.len())));
            }
            None => sink.append_zeros(cs)?,
        }
        let mut counts = std::collections::VecDeque::new();
        counts.push_back(1); // the header cluster
        let l1_size = spec.l1_size() as usize;
        Ok(Layout {
            bits: spec.cluster_bits,
            l2_entries: spec.l2_entries(),
            rb_entries: cs * 8 / (1 << REFCOUNT_ORDER),
            cs,
            sink,
            pos: cs,
            l1: vec![0; l1_size],
            range: None,
            l2: vec![0; (cs / 8) as usize],
            l2_used: false,
            window_start: 0,
            counts,
            blocks: Vec::new(),
            last_index: None,
            header,
            summary: WriteSummary::default(),
            raw_l2: Vec::new(),
            spec,
        })
    }

    /// The spec being written.
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// Bytes produced so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The sink (e.g. to see how much is buffered).
    pub fn sink(&self) -> &S {
        &self.sink
    }

    fn order(&mut self, index: u64, count: u64) -> Result<()> {
        let end = index
            .checked_add(count)
            .filter(|e| *e <= self.spec.guest_clusters())
            .ok_or_else(|| KnibError::internal(format!("guest cluster {index} (+{count}) is past the virtual size")))?;
        if let Some(last) = self.last_index {
            if index <= last {
                return Err(KnibError::internal(format!("guest cluster {index} pushed after {last}")));
            }
        }
        if count > 0 {
            self.last_index = Some(end - 1);
        }
        Ok(())
    }

    /// Refcount of host cluster `c` += 1.
    fn add_ref(&mut self, c: u64) -> Result<()> {
        let i = c
            .checked_sub(self.window_start)
            .ok_or_else(|| KnibError::internal(format!("refcount of host cluster {c} is already written")))?
            as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        let v = &mut self.counts[i];
        *v = v.checked_add(1).ok_or_else(|| KnibError::internal(format!("refcount of host cluster {c} overflows")))?;
        Ok(())
    }

    fn count_of(&self, c: u64) -> u16 {
        c.checked_sub(self.window_start).and_then(|i| self.counts.get(i as usize).copied()).unwrap_or(0)
    }

    /// Pad to the next cluster boundary.
    fn align(&mut self) -> Result<()> {
        let rem = self.pos % self.cs;
        if rem != 0 {
            self.sink.append_zeros(self.cs - rem)?;
            self.pos += self.cs - rem;
        }
        Ok(())
    }

    /// Move to the L2 range of guest cluster `index`, closing the previous one.
    fn enter_range(&mut self, index: u64) -> Result<()> {
        let r = index / self.l2_entries;
        if self.range != Some(r) {
            self.close_range()?;
            self.range = Some(r);
        }
        Ok(())
    }

    /// Emit the refcount blocks whose whole range lies before `pos` (aligned).
    fn emit_complete_blocks(&mut self) -> Result<()> {
        loop {
            let k = self.blocks.len() as u64;
            let end = (k + 1) * self.rb_entries;
            if end > self.pos / self.cs {
                return Ok(());
            }
            let at = self.pos;
            self.emit_block()?;
            self.blocks.push(at);
            self.add_ref(at / self.cs)?;
        }
    }

    /// Write the refcount block of the window's first range and slide the
    /// window past it.
    fn emit_block(&mut self) -> Result<()> {
        let n = self.rb_entries as usize;
        let mut raw = vec![0u8; self.cs as usize];
        for (i, c) in self.counts.drain(..n.min(self.counts.len())).enumerate() {
            raw[i * 2..i * 2 + 2].copy_from_slice(&c.to_be_bytes());
        }
        self.window_start += self.rb_entries;
        self.sink.append(&raw)?;
        self.pos += self.cs;
        self.summary.refcount_blocks += 1;
        Ok(())
    }

    fn close_range(&mut self) -> Result<()> {
        let Some(r) = self.range.take() else { return Ok(()) };
        if !self.l2_used {
            return Ok(());
        }
        self.align()?;
        self.emit_complete_blocks()?;
        let at = self.pos;
        self.add_ref(at / self.cs)?;
        self.l1[r as usize] = at | COPIED;
        let mut raw = std::mem::take(&mut self.raw_l2);
        raw.clear();
        raw.extend(self.l2.iter().flat_map(|e| e.to_be_bytes()));
        self.sink.append(&raw)?;
        self.raw_l2 = raw;
        self.pos += self.cs;
        self.l2.iter_mut().for_each(|e| *e = 0);
        self.l2_used = false;
        self.summary.l2_tables += 1;
        Ok(())
    }

    fn set_l2(&mut self, index: u64, entry: u64) {
        self.l2[(index % self.l2_entries) as usize] = entry;
        self.l2_used = true;
    }

    /// Store guest clusters `index..index + n` uncompressed; `data` holds
    /// them back to back (`n` whole clusters; bytes past the virtual size
    /// are stored as given).
    pub fn push_data(&mut self, index: u64, data: &[u8]) -> Result<()> {
        if !(data.len() as u64).is_multiple_of(self.cs) {
            return Err(KnibError::internal("push_data takes whole clusters"));
        }
        let n = data.len() as u64 / self.cs;
        self.order(index, n)?;
        let mut i = 0;
        while i < n {
            let g = index + i;
            self.enter_range(g)?;
            // The clusters of this L2 range in one write.
            let in_range = (self.l2_entries - g % self.l2_entries).min(n - i);
            self.align()?;
            let at = self.pos;
            for j in 0..in_range {
                let host = at + j * self.cs;
                self.add_ref(host / self.cs)?;
                self.set_l2(g + j, host | COPIED);
            }
            let bytes = &data[(i * self.cs) as usize..((i + in_range) * self.cs) as usize];
            self.sink.append(bytes)?;
            self.pos += bytes.len() as u64;
            self.summary.data_clusters += in_range;
            i += in_range;
        }
        Ok(())
    }

    /// Store guest cluster `index` compressed: `data` is its compressed
    /// form (shorter than a cluster), in the image's compression type.
    pub fn push_compressed(&mut self, index: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if len == 0 || len >= self.cs {
            return Err(KnibError::internal(format!("compressed cluster of {len} bytes (cluster {})", self.cs)));
        }
        self.order(index, 1)?;
        self.enter_range(index)?;
        // Every host cluster the descriptor covers (up to the end of its
        // last 512-byte sector, which never crosses a cluster boundary)
        // gets one more reference; move to a fresh cluster rather than
        // overflow a 16-bit refcount.
        let cs = self.cs;
        let span = |start: u64| (start / cs, (start + len - 1) / cs);
        let (first, last) = span(self.pos);
        if (first..=last).any(|c| self.count_of(c) == REFCOUNT_MAX) {
            self.align()?;
        }
        let start = self.pos;
        let (first, last) = span(start);
        for c in first..=last {
            self.add_ref(c)?;
        }
        let x = 62 - (self.bits - 8);
        if start >> x != 0 {
            return Err(KnibError::invalid(format!(
                "compressed data at offset {start} is past what a {}-byte cluster descriptor can address",
                self.cs
            )));
        }
        let extra_sectors = (start + len - 1) / 512 - start / 512;
        self.set_l2(index, COMPRESSED | (extra_sectors << x) | start);
        self.sink.append(data)?;
        self.pos += len;
        self.summary.compressed_clusters += 1;
        Ok(())
    }

    /// Make guest clusters `index..index + n` read as zeros (L2 zero flag:
    /// the backing file is not read for them).
    pub fn push_zero(&mut self, index: u64, n: u64) -> Result<()> {
        self.order(index, n)?;
        for g in index..index + n {
            self.enter_range(g)?;
            self.set_l2(g, ZERO);
        }
        self.summary.zero_clusters += n;
        Ok(())
    }

    /// Write the remaining metadata. Returns the header cluster (the caller
    /// writes it at offset 0 unless it was given to [`Layout::new`], in which
    /// case it is checked to be the same), the sink and a summary.
    pub fn finish(mut self) -> Result<(Vec<u8>, S, WriteSummary)> {
        self.close_range()?;
        self.align()?;
        self.emit_complete_blocks()?;
        let cs = self.cs;
        let used = self.pos / cs;
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        let k0 = self.blocks.len() as u64;
        // The tail: L1 table, refcount table, remaining refcount blocks;
        // the refcount table and blocks must cover themselves.
        let (mut rt_clusters, mut rb) = (1u64, 1u64);
        loop {
            let total = used + l1_clusters + rt_clusters + rb;
            let nblocks = total.div_ceil(self.rb_entries);
            let rb2 = nblocks - k0;
            let rt2 = (nblocks * 8).div_ceil(cs).max(1);
            if (rb2, rt2) == (rb, rt_clusters) {
                break;
            }
            (rb, rt_clusters) = (rb2, rt2);
        }
        let l1_offset = if l1_clusters > 0 { self.pos } else { 0 };
        let rt_offset = self.pos + l1_clusters * cs;
        let rb_offset = rt_offset + rt_clusters * cs;
        for c in used..used + l1_clusters + rt_clusters + rb {
            self.add_ref(c)?;
        }
        // L1 table.
        if l1_clusters > 0 {
            let mut raw: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            raw.resize((l1_clusters * cs) as usize, 0);
            self.sink.append(&raw)?;
        }
        // Refcount table.
        let mut rt: Vec<u8> = self.blocks.iter().flat_map(|e| e.to_be_bytes()).collect();
        for i in 0..rb {
            rt.extend((rb_offset + i * cs).to_be_bytes());
        }
        rt.resize((rt_clusters * cs) as usize, 0);
        self.sink.append(&rt)?;
        self.pos = rb_offset;
        // Remaining refcount blocks.
        for _ in 0..rb {
            self.emit_block()?;
        }
        self.summary.file_len = self.pos;
        let header = header_cluster(&self.spec, l1_offset, rt_offset, rt_clusters as u32)?;
        if let Some(h) = &self.header {
            if *h != header {
                return Err(KnibError::new(
                    crate::ErrorKind::Corrupt,
                    "the image written does not match its plan: the source changed while it was copied",
                ));
            }
        }
        Ok((header, self.sink, self.summary))
    }
}

/// The header cluster of an image of `spec` whose L1 table is at
/// `l1_offset` and refcount table at `rt_offset` (`rt_clusters` long).
pub fn header_cluster(spec: &ImageSpec, l1_offset: u64, rt_offset: u64, rt_clusters: u32) -> Result<Vec<u8>> {
    spec.validate()?;
    let mut h = vec![0u8; spec.cluster_size() as usize];
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    h[..4].copy_from_slice(&MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, spec.cluster_bits);
    put64(&mut h, 24, spec.virtual_size);
    put32(&mut h, 32, 0); // no encryption
    put32(&mut h, 36, spec.l1_size() as u32);
    put64(&mut h, 40, l1_offset);
    put64(&mut h, 48, rt_offset);
    put32(&mut h, 56, rt_clusters);
    // No snapshots (60..72 stay zero).
    let incompat = if spec.compression == CompressionType::Zstd { INCOMPAT_COMPRESSION } else { 0 };
    put64(&mut h, 72, incompat);
    put32(&mut h, 96, REFCOUNT_ORDER);
    put32(&mut h, 100, HEADER_LENGTH as u32);
    h[104] = match spec.compression {
        CompressionType::Zlib => 0,
        CompressionType::Zstd => 1,
    };
    let mut pos = HEADER_LENGTH;
    if let Some(b) = &spec.backing {
        put32(&mut h, pos, EXT_BACKING_FORMAT);
        put32(&mut h, pos + 4, b.format.len() as u32);
        h[pos + 8..pos + 8 + b.format.len()].copy_from_slice(b.format.as_bytes());
        pos += 8 + b.format.len().div_ceil(8) * 8;
    }
    // End of the extensions (type 0, length 0), then the backing name.
    pos += 8;
    if let Some(b) = &spec.backing {
        put64(&mut h, 8, pos as u64);
        put32(&mut h, 16, b.name.len() as u32);
        h[pos..pos + b.name.len()].copy_from_slice(b.name.as_bytes());
    }
    Ok(h)
}
