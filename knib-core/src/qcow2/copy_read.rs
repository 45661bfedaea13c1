//! The reader of a native copy ([`super::copy_image`]): the source image
//! (its own clusters, or its chain flattened) resolved cluster by cluster
//! and read into batches, in guest order.
//!
//! # Invariants
//!
//! - Clusters are read in guest order; reads of contiguous host clusters
//!   are coalesced into one, compressed input is decompressed here.
//! - Every byte read of a source file is fed to its source hash when one is
//!   asked for, so a copy verifies what it read, not what it wrote.
//! - The read rate is throttled to the caller's limit, and a cancellation
//!   or the deadline is seen between batches.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use super::chain::{read_layers, Chain, Layer};
use super::copy_batch::{Batch, Item};
use super::image::{ClusterState, Qcow2Image};
use super::srchash::SourceHasher;
use crate::error::{KnibError, Result};
use crate::progress::Control;

/// Which clusters of the source are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceMode {
    /// The image's own clusters only (a delta): unallocated clusters stay
    /// unallocated (they read from the backing file), zero clusters stay
    /// zero clusters. The backing chain is not opened.
    Top,
    /// The whole chain as the guest sees it, flattened: the output has no
    /// backing file.
    Chain,
    /// The top and its first `n` backing files flattened into one delta
    /// over what lies below them (the base): a cluster allocated or zero
    /// in any of these layers is copied as the topmost of them holds it
    /// (data, or a zero cluster); a cluster unallocated in all of them
    /// stays unallocated, so that it reads from the output's backing file.
    /// A cluster the layers cover only in part (cluster sizes or virtual
    /// sizes differ) is copied whole as the full chain reads it; one wholly
    /// past the end of one of these layers, and unallocated in those above
    /// it, is a zero cluster (the chain reads zeros there), or is left out
    /// past the end of the output's backing file (read for its size by
    /// `copy_image`), where the output reads zeros anyway. `Above(0)`
    /// copies what [`SourceMode::Top`] copies. How a delta with disk-only
    /// VM snapshots taken over it is backed up in one pass.
    Above(usize),
}

/// Where one guest cluster of the output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolved {
    /// Nothing to write: unallocated in a delta, or reads as zeros in a
    /// flattened copy.
    Skip,
    /// A zero cluster (delta copies only).
    Zero,
    /// Uncompressed bytes at `offset` of layer `layer` (0 = top).
    Host { layer: usize, offset: u64 },
    /// Compressed bytes in layer `layer`.
    Compressed { layer: usize, offset: u64, len: u64 },
    /// Read through the chain (cluster sizes differ, a layer ends inside
    /// the cluster).
    Complex,
}

/// The source: the top image and, for a flattened copy, its backing files.
pub(super) struct Source {
    pub(super) top: Qcow2Image,
    pub(super) backing: Vec<Layer>,
    pub(super) mode: SourceMode,
    pub(super) cs: u64,
    pub(super) bits: u32,
    pub(super) size: u64,
    /// The hasher of each layer (0 = top), when source hashes are asked for.
    pub(super) hashers: Vec<SourceHasher>,
    /// Per layer (0 = top), the last answer of [`Source::next_mapped`]:
    /// (asked from, first mapped cluster at or after it).
    mapped: Vec<Option<(u64, u64)>>,
    /// A copy above a base: the virtual size of the output's backing file,
    /// when known. Past it the output reads zeros where it leaves a
    /// cluster unallocated, so a cluster past a shorter layer's end needs
    /// no zero cluster there ([`Source::past_the_end`]).
    below_end: Option<u64>,
}

impl Source {
    /// Open `path` for a copy in `mode`. `below_end`: for a copy above a
    /// base, the virtual size of the output's backing file, when known.
    pub(super) fn open(path: &Path, mode: SourceMode, below_end: Option<u64>) -> Result<Source> {
        let (top, backing) = match mode {
            SourceMode::Top => (Qcow2Image::open(path)?, Vec::new()),
            SourceMode::Chain => Chain::open(path)?.into_parts(),
            SourceMode::Above(n) => {
                let (top, backing) = Chain::open(path)?.into_parts();
                if backing.len() < n {
                    return Err(KnibError::invalid(format!(
                        "{} has {} backing files, fewer than the {n} layers to copy above its base",
                        path.display(),
                        backing.len()
                    )));
                }
                (top, backing)
            }
        };
        let (cs, bits, size) = (top.cluster_size(), top.header().cluster_bits, top.virtual_size());
        let mapped = vec![None; 1 + backing.len()];
        Ok(Source { top, backing, mode, cs, bits, size, hashers: Vec::new(), mapped, below_end })
    }

    /// What the cluster at guest offset `start`, wholly past the end of a
    /// layer the copy reads, resolves to when no layer above that one holds
    /// it: the chain reads zeros there whatever lies below. A flattened
    /// copy leaves it out; a delta above a base must hide what its
    /// backing file holds there, and does so with a zero cluster (no read,
    /// no data written), or leaves it out past that file's end, where the
    /// output reads zeros anyway. (A disk grown after a disk-only VM
    /// snapshot has a top larger than the layers below it: a cluster-sized
    /// read and a data cluster of zeros each wrote every byte it grew by
    /// into the backup.)
    fn past_the_end(&self, start: u64) -> Resolved {
        if matches!(self.mode, SourceMode::Above(_)) && self.below_end.is_none_or(|end| start < end) {
            Resolved::Zero
        } else {
            Resolved::Skip
        }
    }

    /// Hash every file of the source as it is read.
    pub(super) fn hash_files(&mut self) -> Result<()> {
        let mut hashers = Vec::with_capacity(1 + self.backing.len());
        let top = &self.top;
        let dup = |path: Option<&Path>, f: Option<std::io::Result<File>>, len: u64| -> Result<SourceHasher> {
            let path = path.ok_or_else(|| KnibError::internal("a source file without a path"))?;
            let file = f
                .ok_or_else(|| KnibError::internal("a source file in memory"))?
                .map_err(|e| KnibError::io("cannot open", path, e))?;
            Ok(SourceHasher::new(path, file, len))
        };
        hashers.push(dup(top.path(), top.dup_file(), top.file_len())?);
        // A copy above a base reads only the layers above it.
        let read = match self.mode {
            SourceMode::Above(n) => n,
            _ => self.backing.len(),
        };
        for layer in &self.backing[..read] {
            hashers.push(match layer {
                Layer::Qcow2(img) => dup(img.path(), img.dup_file(), img.file_len())?,
                Layer::Raw(r) => dup(Some(r.path()), Some(r.dup_file()), r.virtual_size())?,
            });
        }
        self.hashers = hashers;
        Ok(())
    }

    /// The copy read `buf` at `offset` of layer `layer`.
    pub(super) fn seen(&mut self, layer: usize, offset: u64, buf: &[u8]) -> Result<()> {
        match self.hashers.get_mut(layer) {
            Some(h) => h.seen(offset, buf),
            None => Ok(()),
        }
    }

    pub(super) fn clusters(&self) -> u64 {
        self.size.div_ceil(self.cs)
    }

    /// The first cluster at or after `index` that may not resolve to
    /// [`Resolved::Skip`]: every cluster before it is unallocated in each
    /// layer the copy reads (or, flattened, past the end of a shorter
    /// layer). Only the tables are looked at, so a copy of a huge, mostly
    /// unmapped image (a crafted header can ask for 2^61 bytes) steps over
    /// its holes instead of resolving billions of clusters; and over a raw file, the last layer of a
    /// flattened copy, it steps to the file's next data
    /// ([`RawImage::next_data`]). `index` itself when it may hold data.
    pub(super) fn next_candidate(&mut self, index: u64) -> Result<u64> {
        let mut end = self.next_mapped(0, index)?.min(self.clusters());
        if end <= index || self.mode == SourceMode::Top {
            return Ok(end.max(index));
        }
        let upper = match self.mode {
            SourceMode::Above(n) => n,
            _ => self.backing.len(),
        };
        let start = index * self.cs;
        for layer in 1..=upper {
            let (size, same_clusters) = match &mut self.backing[layer - 1] {
                Layer::Qcow2(img) => (img.virtual_size(), img.cluster_size() == self.cs),
                // A raw file, the last layer, flattened: the clusters
                // before the next data the file system knows of are holes
                // (zeros, resolve's Skip). Above a base, its holes are
                // written as zeros, cluster by cluster.
                Layer::Raw(r) if self.mode == SourceMode::Chain && start < r.virtual_size() => {
                    return Ok(end.min(r.next_data(start) / self.cs).max(index));
                }
                Layer::Raw(r) => (r.virtual_size(), false),
            };
            if start >= size {
                // Past this layer's end: a flattened copy reads zeros there
                // whatever lies below (resolve's Skip), a delta above a
                // base writes them as zero clusters, up to the end of its
                // backing file ([`Source::past_the_end`]).
                return Ok(if self.past_the_end(start) == Resolved::Skip { end } else { index });
            }
            // Raw data, other cluster sizes and a layer ending inside the
            // range: cluster by cluster, as resolve does.
            let whole = size / self.cs;
            if !same_clusters || whole <= index {
                return Ok(index);
            }
            end = end.min(whole).min(self.next_mapped(layer, index)?);
            if end <= index {
                return Ok(index);
            }
        }
        Ok(end)
    }

    /// The next cluster to resolve after cluster `index` resolved to
    /// [`Resolved::Skip`]: past the clusters no layer maps
    /// ([`Source::next_candidate`]; within a table too, so a table with
    /// one entry set, named by every L1 entry of a crafted image, is not
    /// walked entry by entry).
    pub(super) fn after_skip(&mut self, index: u64) -> Result<u64> {
        self.next_candidate(index + 1)
    }

    /// The first cluster at or after `index` whose L2 entry in qcow2 layer
    /// `layer` is not 0 ([`Qcow2Image::next_mapped_cluster`]). Copies ask
    /// in guest order, so the last answer is kept and each stretch of a
    /// table is searched once.
    fn next_mapped(&mut self, layer: usize, index: u64) -> Result<u64> {
        if let Some(Some((from, next))) = self.mapped.get(layer) {
            if *from <= index && index <= *next {
                return Ok(*next);
            }
        }
        let next = match layer {
            0 => self.top.next_mapped_cluster(index)?,
            _ => match &mut self.backing[layer - 1] {
                Layer::Qcow2(img) => img.next_mapped_cluster(index)?,
                Layer::Raw(_) => index,
            },
        };
        if let Some(m) = self.mapped.get_mut(layer) {
            *m = Some((index, next));
        }
        Ok(next)
    }

    pub(super) fn resolve(&mut self, index: u64) -> Result<Resolved> {
        let state = self.top.cluster_state(index)?;
        if self.mode == SourceMode::Top {
            return Ok(match state {
                ClusterState::Unallocated => Resolved::Skip,
                ClusterState::Zero => Resolved::Zero,
                ClusterState::Data { host_offset } => Resolved::Host { layer: 0, offset: host_offset },
                ClusterState::Compressed { host_offset, compressed_len } => {
                    Resolved::Compressed { layer: 0, offset: host_offset, len: compressed_len }
                }
            });
        }
        let start = index * self.cs;
        let need = self.cs.min(self.size - start);
        // A delta over the layers below `upper` (a copy above a base).
        let (upper, delta) = match self.mode {
            SourceMode::Above(n) => (n, true),
            _ => (self.backing.len(), false),
        };
        let mut state = Some(state);
        for layer in 0..=upper {
            let st = match layer {
                0 => state.take().unwrap_or(ClusterState::Unallocated),
                _ => match &mut self.backing[layer - 1] {
                    Layer::Qcow2(img) => {
                        let size = img.virtual_size();
                        if start >= size {
                            return Ok(self.past_the_end(start));
                        }
                        if start + need > size || img.cluster_size() != self.cs {
                            return Ok(Resolved::Complex);
                        }
                        img.cluster_state(index)?
                    }
                    Layer::Raw(r) => {
                        let size = r.virtual_size();
                        if start >= size {
                            return Ok(self.past_the_end(start));
                        }
                        if start + self.cs > size {
                            return Ok(Resolved::Complex);
                        }
                        // A cluster wholly in a hole of the file system
                        // reads as zeros: not read (a sparse template of
                        // terabytes was read whole, every zero dropped).
                        if r.next_data(start) >= start + self.cs {
                            return Ok(if delta { Resolved::Zero } else { Resolved::Skip });
                        }
                        return Ok(Resolved::Host { layer, offset: start });
                    }
                },
            };
            match st {
                ClusterState::Unallocated => continue,
                ClusterState::Zero => return Ok(if delta { Resolved::Zero } else { Resolved::Skip }),
                ClusterState::Data { host_offset } => return Ok(Resolved::Host { layer, offset: host_offset }),
                ClusterState::Compressed { host_offset, compressed_len } => {
                    return Ok(Resolved::Compressed { layer, offset: host_offset, len: compressed_len })
                }
            }
        }
        Ok(Resolved::Skip)
    }

    pub(super) fn read_host(&mut self, layer: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        match layer {
            0 => self.top.read_host(offset, buf)?,
            _ => match &mut self.backing[layer - 1] {
                Layer::Qcow2(img) => img.read_host(offset, buf)?,
                Layer::Raw(r) => r.read_at(offset, buf)?,
            },
        }
        self.seen(layer, offset, buf)
    }

    pub(super) fn read_compressed(
        &mut self,
        layer: usize,
        index: u64,
        offset: u64,
        len: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let img = match layer {
            0 => &mut self.top,
            _ => match &mut self.backing[layer - 1] {
                Layer::Qcow2(img) => img,
                Layer::Raw(_) => return Err(KnibError::internal("a compressed cluster in a raw layer")),
            },
        };
        let data = match self.hashers.get_mut(layer) {
            Some(h) => img.read_compressed_seen(index, offset, len, &mut |o, b| h.seen(o, b))?,
            None => img.read_compressed(index, offset, len)?,
        };
        out.copy_from_slice(&data[..out.len()]);
        Ok(())
    }

    pub(super) fn read_complex(&mut self, index: u64, out: &mut [u8]) -> Result<()> {
        let start = index * self.cs;
        let need = (self.cs.min(self.size - start)) as usize;
        let backing = &mut self.backing;
        self.top.read_with(start, &mut out[..need], &mut |o, b| read_layers(backing, o, b))?;
        out[need..].fill(0);
        Ok(())
    }
}

/// The reader thread: fills batches with consecutive guest clusters.
pub(super) fn read_loop(
    src: &mut Source,
    free: Receiver<Batch>,
    out: SyncSender<Result<Batch>>,
    batch_bytes: usize,
    rate_mbps: u64,
    ctl: &Control,
    step: &str,
) {
    let started = Instant::now();
    let mut read_total = 0u64;
    let total = src.clusters();
    let mut index = 0u64;
    let mut seq = 0u64;
    while index < total {
        let Ok(mut batch) = free.recv() else { return };
        let r = fill_batch(src, &mut batch, &mut index, batch_bytes);
        let r = r.and_then(|_| ctl.check(step));
        let r = r.and_then(|_| {
            read_total += batch.read_bytes;
            throttle(started, read_total, rate_mbps, ctl, step)
        });
        batch.seq = seq;
        seq += 1;
        let failed = r.is_err();
        if out.send(r.map(|_| batch)).is_err() || failed {
            return;
        }
    }
}

/// Sleep until `bytes` read since `started` are within `rate_mbps`.
pub(super) fn throttle(started: Instant, bytes: u64, rate_mbps: u64, ctl: &Control, step: &str) -> Result<()> {
    if rate_mbps == 0 {
        return Ok(());
    }
    let due = Duration::from_secs_f64(bytes as f64 / (rate_mbps as f64 * 1e6));
    loop {
        let elapsed = started.elapsed();
        if elapsed >= due {
            return Ok(());
        }
        ctl.check(step)?;
        std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
    }
}

/// Fill `batch` from guest cluster `*index` on: up to `batch_bytes` of data,
/// contiguous host clusters read in one go.
pub(super) fn fill_batch(src: &mut Source, batch: &mut Batch, index: &mut u64, batch_bytes: usize) -> Result<()> {
    batch.items.clear();
    batch.used = 0;
    batch.out_used = 0;
    batch.read_bytes = 0;
    let cs = src.cs as usize;
    let total = src.clusters();
    // Clusters looked at per batch, data or not (bounds the items).
    let scan_end = (*index + 65536).min(total);
    // A pending run of uncompressed host clusters: (layer, host offset, first index, count).
    let mut run: Option<(usize, u64, u64, u64)> = None;
    let flush_run = |src: &mut Source, batch: &mut Batch, run: &mut Option<(usize, u64, u64, u64)>| -> Result<()> {
        if let Some((layer, host, first, count)) = run.take() {
            let len = count as usize * cs;
            let at = batch.grow(len);
            src.read_host(layer, host, &mut batch.data[at..at + len])?;
            batch.read_bytes += len as u64;
            push_data(batch, first, count, at, cs);
        }
        Ok(())
    };
    while *index < scan_end && batch.used + run.map_or(0, |r| r.3 as usize * cs) < batch_bytes {
        let i = *index;
        let mut next = i + 1;
        let r = src.resolve(i)?;
        match r {
            Resolved::Host { layer, offset } => {
                let extends = matches!(run, Some((l, h, f, c)) if l == layer && h + c * src.cs == offset && f + c == i);
                if extends {
                    if let Some(run) = run.as_mut() {
                        run.3 += 1;
                    }
                } else {
                    flush_run(src, batch, &mut run)?;
                    run = Some((layer, offset, i, 1));
                }
            }
            other => {
                flush_run(src, batch, &mut run)?;
                match other {
                    Resolved::Skip => next = src.after_skip(i)?,
                    Resolved::Host { .. } => {}
                    Resolved::Zero => match batch.items.last_mut() {
                        Some(Item::Zero { index: z, count }) if *z + *count == i => *count += 1,
                        _ => batch.items.push(Item::Zero { index: i, count: 1 }),
                    },
                    Resolved::Compressed { layer, offset, len } => {
                        let at = batch.grow(cs);
                        src.read_compressed(layer, i, offset, len, &mut batch.data[at..at + cs])?;
                        batch.read_bytes += cs as u64;
                        push_data(batch, i, 1, at, cs);
                    }
                    Resolved::Complex => {
                        let at = batch.grow(cs);
                        src.read_complex(i, &mut batch.data[at..at + cs])?;
                        batch.read_bytes += cs as u64;
                        push_data(batch, i, 1, at, cs);
                    }
                }
            }
        }
        *index = next;
    }
    flush_run(src, batch, &mut run)?;
    // Bytes past the virtual size in the last cluster are stored as zeros.
    if *index == total {
        if let Some(Item::Data { index: first, count, at }) = batch.items.last().copied() {
            if first + count == total {
                let tail = (src.size % src.cs) as usize;
                if tail != 0 {
                    let last = at + (count as usize - 1) * cs;
                    batch.data[last + tail..last + cs].fill(0);
                }
            }
        }
    }
    batch.end_index = *index;
    Ok(())
}

pub(super) fn push_data(batch: &mut Batch, index: u64, count: u64, at: usize, cs: usize) {
    if let Some(Item::Data { index: f, count: c, at: a }) = batch.items.last_mut() {
        if *f + *c == index && *a + *c as usize * cs == at {
            *c += count;
            return;
        }
    }
    batch.items.push(Item::Data { index, count, at });
}
