//! The native data path: one pass over a qcow2 image (its own clusters, or
//! its whole chain flattened) into a new qcow2 v3 image (plain or with
//! compressed clusters, with or without a backing pointer) or a raw file.
//!
//! Threads: one reader (cluster lookups, reads coalesced into runs of
//! contiguous host clusters, compressed input clusters decompressed), zero
//! or more compression workers (zstd or raw deflate, one cluster at a time),
//! and the caller's thread as the one writer, which keeps guest order and
//! hashes the file as it writes it. Batches of clusters travel between them
//! through bounded channels, and their buffers are recycled, so memory is
//! bounded (about 32 MiB of batches, see [`batch_plan`]) whatever the disk
//! size.
//!
//! A plain (uncompressed) qcow2 output is planned first from the source's
//! tables alone (no data read): the plan gives the exact file length, for
//! the free-space check, and the header, so the file is written strictly
//! front to back and its xxh3-128 hash is computed in the same pass. A
//! compressed output's layout depends on the compressed sizes, so its
//! header is written last; its hash (when asked for) is taken by reading
//! the finished file back.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::chain::{read_layers, Chain, Layer};
use super::header::CompressionType;
use super::image::{ClusterState, Qcow2Image};
use super::srchash::{SourceHash, SourceHasher};
use super::writer::{BackingRef, CountSink, FileSink, ImageSpec, Layout, WriteSummary};
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
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    /// qcow2 version 3.
    Qcow2,
    /// A raw (sparse) file of the virtual size.
    Raw,
}

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Which clusters are copied.
    pub mode: SourceMode,
    /// The output format.
    pub format: TargetFormat,
    /// The backing pointer of a qcow2 output ([`SourceMode::Top`] only).
    pub backing: Option<BackingRef>,
    /// Compress the clusters of a qcow2 output: each cluster is stored
    /// compressed when that makes it shorter than a cluster, as zero when
    /// it is all zeros, and as it is otherwise.
    pub compression: Option<CompressionType>,
    /// log2 of the output's cluster size; `None`: the source's.
    pub cluster_bits: Option<u32>,
    /// Compute the xxh3-128 hash of the output file.
    pub hash: bool,
    /// Compute the xxh3-128 hash of each source file (the top and, for a
    /// flattened copy, every backing file), from the bytes the copy reads
    /// (see [`super::srchash`]): [`CopyReport::source_hashes`].
    pub hash_source: bool,
    /// Compression worker threads; 0 = one per core.
    pub threads: usize,
    /// Read at most this many MB (10^6 bytes) of data per second; 0 = no limit.
    pub rate_limit_mbps: u64,
    /// fsync the output before returning.
    pub sync: bool,
    /// Write a qcow2 output around the page cache (O_DIRECT) where the file
    /// system allows it (see [`FileSink::new_direct`]).
    pub direct_io: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            mode: SourceMode::Top,
            format: TargetFormat::Qcow2,
            backing: None,
            compression: None,
            cluster_bits: None,
            hash: false,
            hash_source: false,
            threads: 0,
            rate_limit_mbps: 0,
            sync: true,
            direct_io: true,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// The virtual size of the output.
    pub virtual_size: u64,
    /// Guest bytes read from the source (its data clusters).
    pub bytes_read: u64,
    /// Length of the output file.
    pub file_len: u64,
    /// xxh3-128 of the output file, when asked for.
    pub hash: Option<String>,
    /// The qcow2 output's clusters and tables (empty for raw).
    pub summary: WriteSummary,
    /// With [`CopyOptions::hash_source`]: the hash of each source file, the
    /// top first, then its backing files nearest first.
    pub source_hashes: Vec<SourceHash>,
}

/// Where one guest cluster of the output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
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
struct Source {
    top: Qcow2Image,
    backing: Vec<Layer>,
    mode: SourceMode,
    cs: u64,
    bits: u32,
    size: u64,
    /// The hasher of each layer (0 = top), when source hashes are asked for.
    hashers: Vec<SourceHasher>,
}

impl Source {
    fn open(path: &Path, mode: SourceMode) -> Result<Source> {
        let (top, backing) = match mode {
            SourceMode::Top => (Qcow2Image::open(path)?, Vec::new()),
            SourceMode::Chain => Chain::open(path)?.into_parts(),
        };
        let (cs, bits, size) = (top.cluster_size(), top.header().cluster_bits, top.virtual_size());
        Ok(Source { top, backing, mode, cs, bits, size, hashers: Vec::new() })
    }

    /// Hash every file of the source as it is read.
    fn hash_files(&mut self) -> Result<()> {
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
        for layer in &self.backing {
            hashers.push(match layer {
                Layer::Qcow2(img) => dup(img.path(), img.dup_file(), img.file_len())?,
                Layer::Raw(r) => dup(Some(r.path()), Some(r.dup_file()), r.virtual_size())?,
            });
        }
        self.hashers = hashers;
        Ok(())
    }

    /// The copy read `buf` at `offset` of layer `layer`.
    fn seen(&mut self, layer: usize, offset: u64, buf: &[u8]) -> Result<()> {
        match self.hashers.get_mut(layer) {
            Some(h) => h.seen(offset, buf),
            None => Ok(()),
        }
    }

    fn clusters(&self) -> u64 {
        self.size.div_ceil(self.cs)
    }

    fn resolve(&mut self, index: u64) -> Result<Resolved> {
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
        let mut state = Some(state);
        for layer in 0..=self.backing.len() {
            let st = match layer {
                0 => state.take().unwrap_or(ClusterState::Unallocated),
                _ => match &mut self.backing[layer - 1] {
                    Layer::Qcow2(img) => {
                        let size = img.virtual_size();
                        if start >= size {
                            return Ok(Resolved::Skip);
                        }
                        if start + need > size || img.cluster_size() != self.cs {
                            return Ok(Resolved::Complex);
                        }
                        img.cluster_state(index)?
                    }
                    Layer::Raw(r) => {
                        let size = r.virtual_size();
                        if start >= size {
                            return Ok(Resolved::Skip);
                        }
                        if start + self.cs > size {
                            return Ok(Resolved::Complex);
                        }
                        return Ok(Resolved::Host { layer, offset: start });
                    }
                },
            };
            match st {
                ClusterState::Unallocated => continue,
                ClusterState::Zero => return Ok(Resolved::Skip),
                ClusterState::Data { host_offset } => return Ok(Resolved::Host { layer, offset: host_offset }),
                ClusterState::Compressed { host_offset, compressed_len } => {
                    return Ok(Resolved::Compressed { layer, offset: host_offset, len: compressed_len })
                }
            }
        }
        Ok(Resolved::Skip)
    }

    fn read_host(&mut self, layer: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        match layer {
            0 => self.top.read_host(offset, buf)?,
            _ => match &mut self.backing[layer - 1] {
                Layer::Qcow2(img) => img.read_host(offset, buf)?,
                Layer::Raw(r) => r.read_at(offset, buf)?,
            },
        }
        self.seen(layer, offset, buf)
    }

    fn read_compressed(&mut self, layer: usize, index: u64, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
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

    fn read_complex(&mut self, index: u64, out: &mut [u8]) -> Result<()> {
        let start = index * self.cs;
        let need = (self.cs.min(self.size - start)) as usize;
        let backing = &mut self.backing;
        self.top.read_with(start, &mut out[..need], &mut |o, b| read_layers(backing, o, b))?;
        out[need..].fill(0);
        Ok(())
    }
}

/// One item of a batch: runs of guest clusters.
#[derive(Debug, Clone, Copy)]
enum Item {
    /// `count` clusters from `index`, uncompressed, at `at` of the batch's data.
    Data { index: u64, count: u64, at: usize },
    /// Zero clusters.
    Zero { index: u64, count: u64 },
    /// One cluster, compressed, at `at..at + len` of the batch's output.
    Compressed { index: u64, at: usize, len: usize },
}

/// A batch of consecutive guest clusters.
#[derive(Debug, Default)]
struct Batch {
    seq: u64,
    items: Vec<Item>,
    /// Uncompressed clusters: the first `used` bytes (the buffer keeps its
    /// length from batch to batch, so it is not zeroed again).
    data: Vec<u8>,
    used: usize,
    /// Compressed clusters: the first `out_used` bytes.
    out: Vec<u8>,
    out_used: usize,
    /// The guest clusters it covers end before this one.
    end_index: u64,
    read_bytes: u64,
}

/// Batches in flight and the data bytes of each: about 32 MiB in all.
fn batch_plan(cs: u64, workers: usize) -> (usize, usize) {
    const BUDGET: u64 = 32 << 20;
    let in_flight = workers + 3;
    let per = if workers > 0 { BUDGET / (2 * in_flight as u64) } else { BUDGET / in_flight as u64 };
    let bytes = (per.min(4 << 20) / cs).max(1) * cs;
    (in_flight, bytes as usize)
}

/// Whether `b` is all zeros.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The compressor of one worker.
enum Compressor {
    Zstd(zstd::bulk::Compressor<'static>),
    Zlib(flate2::Compress),
}

/// zstd level QEMU uses (the library's default).
const ZSTD_LEVEL: i32 = 3;

impl Compressor {
    fn new(t: CompressionType) -> Result<Self> {
        Ok(match t {
            CompressionType::Zstd => {
                let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| KnibError::internal(format!("zstd compressor: {e}")))?;
                // One frame per cluster, as QEMU reads it; no checksum.
                c.include_checksum(false).map_err(|e| KnibError::internal(format!("zstd compressor: {e}")))?;
                Compressor::Zstd(c)
            }
            // QEMU reads raw deflate with a 4 KiB window (window bits 12).
            CompressionType::Zlib => Compressor::Zlib(flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                12,
            )),
        })
    }

    /// Compress `src` (one cluster) into `dst`; `None` when it does not fit
    /// in `dst` (whose length is the most allowed).
    fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        match self {
            Compressor::Zstd(c) => c.compress_to_buffer(src, dst).ok(),
            Compressor::Zlib(d) => {
                d.reset();
                match d.compress(src, dst, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) if d.total_in() as usize == src.len() => Some(d.total_out() as usize),
                    _ => None,
                }
            }
        }
    }
}

/// Copy the image at `source` to `dest` (created or truncated) in one pass.
///
/// `before_write` is called once, before anything is written, with the
/// most bytes the output can take (the exact length of a plain qcow2
/// output), for a free-space check; an error there stops the copy.
///
/// Errors: those of [`Qcow2Image::open`] and [`Chain::open`] (encrypted
/// images and external data files are refused as invalid input, damaged
/// ones as corrupt), I/O errors (a full disk is [`crate::ErrorKind::NoSpace`]),
/// cancellation and timeouts from `ctl`. On error `dest` may hold a partial
/// file: the caller removes it.
pub fn copy_image(
    source: &Path,
    dest: &Path,
    opts: &CopyOptions,
    ctl: &Control,
    before_write: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<CopyReport> {
    if opts.mode == SourceMode::Chain && opts.backing.is_some() {
        return Err(KnibError::invalid("a flattened copy has no backing file"));
    }
    if opts.format == TargetFormat::Raw && (opts.backing.is_some() || opts.compression.is_some()) {
        return Err(KnibError::invalid("a raw output has no backing file and no compression"));
    }
    let step = format!("copy {}", source.display());
    let mut src = Source::open(source, opts.mode)?;
    if opts.hash_source {
        src.hash_files()?;
    }
    let out_bits = opts.cluster_bits.unwrap_or(src.bits);
    if out_bits != src.bits {
        return Err(KnibError::invalid(format!(
            "the native copy keeps the source's cluster size ({} bytes), not {}",
            src.cs,
            1u64 << out_bits
        )));
    }
    let spec = ImageSpec {
        virtual_size: src.size,
        cluster_bits: out_bits,
        backing: opts.backing.clone(),
        compression: opts.compression.unwrap_or(CompressionType::Zlib),
    };
    if opts.format == TargetFormat::Qcow2 {
        spec.validate()?;
    }

    // Plan from the tables alone.
    let plain_qcow2 = opts.format == TargetFormat::Qcow2 && opts.compression.is_none();
    let mut plan = Layout::new(spec.clone(), CountSink::default(), None)?;
    let zero_cluster = vec![0u8; src.cs as usize];
    let mut data_clusters = 0u64;
    for i in 0..src.clusters() {
        if i % 4096 == 0 {
            ctl.check(&step)?;
        }
        match src.resolve(i)? {
            Resolved::Skip => {}
            Resolved::Zero => plan.push_zero(i, 1)?,
            _ => {
                data_clusters += 1;
                plan.push_data(i, &zero_cluster)?;
            }
        }
    }
    let (planned_header, _, planned) = plan.finish()?;
    let bound = match opts.format {
        TargetFormat::Raw => data_clusters * src.cs,
        TargetFormat::Qcow2 => planned.file_len + planned.l2_tables * src.cs,
    };
    before_write(bound)?;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .map_err(|e| KnibError::io("cannot create", dest, e))?;

    if plain_qcow2 {
        // The exact length is known: allocate it up front (one extent
        // allocation instead of one delayed allocation per page written).
        // Best effort: a file system without fallocate just grows as written.
        use std::os::fd::AsRawFd;
        let len = i64::try_from(planned.file_len).unwrap_or(i64::MAX);
        // SAFETY: fallocate on an open file descriptor we own.
        let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    }
    let workers = match opts.compression {
        None => 0,
        Some(_) if opts.threads > 0 => opts.threads,
        Some(_) => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let (in_flight, batch_bytes) = batch_plan(src.cs, workers);
    let mut report = CopyReport { virtual_size: src.size, ..Default::default() };

    let zero_is_skip = opts.backing.is_none();
    let compression = opts.compression;
    let cs = src.cs;
    let total = src.clusters();

    let mut target = match opts.format {
        TargetFormat::Raw => Target::Raw(RawOut { file, size: src.size, cs, dest }),
        TargetFormat::Qcow2 => {
            let header = plain_qcow2.then_some(planned_header.clone());
            let hash = opts.hash && plain_qcow2;
            let sink =
                if opts.direct_io { FileSink::new_direct(file, dest, hash)? } else { FileSink::new(file, dest, hash) };
            Target::Qcow2(Box::new(Layout::new(spec.clone(), sink, header)?))
        }
    };

    std::thread::scope(|scope| -> Result<()> {
        let (free_tx, free_rx) = sync_channel::<Batch>(in_flight);
        for _ in 0..in_flight {
            free_tx.send(Batch::default()).map_err(|_| KnibError::internal("batch pool"))?;
        }
        let (work_tx, work_rx) = sync_channel::<Result<Batch>>(in_flight);
        let reader_ctl = ctl.clone();
        let reader_step = step.clone();
        let rate = opts.rate_limit_mbps;
        let src = &mut src;
        scope.spawn(move || {
            read_loop(src, free_rx, work_tx, batch_bytes, rate, &reader_ctl, &reader_step);
        });
        let done_rx = if workers == 0 {
            work_rx
        } else {
            let (done_tx, done_rx) = sync_channel::<Result<Batch>>(in_flight);
            let shared = Arc::new(Mutex::new(work_rx));
            for _ in 0..workers {
                let rx = Arc::clone(&shared);
                let tx = done_tx.clone();
                let ctype = compression.unwrap_or(CompressionType::Zstd);
                scope.spawn(move || compress_loop(rx, tx, ctype, cs, zero_is_skip));
            }
            done_rx
        };
        write_loop(&mut target, done_rx, free_tx, total, ctl, &step, &mut report)
    })?;

    // The rest of each source file, for its hash.
    for h in std::mem::take(&mut src.hashers) {
        ctl.check(&step)?;
        report.source_hashes.push(h.finish()?);
    }

    // Finish the output.
    let file = match target {
        Target::Raw(raw) => {
            raw.file.set_len(raw.size).map_err(|e| KnibError::io("cannot size", dest, e))?;
            raw.file
        }
        Target::Qcow2(layout) => {
            let (header, sink, summary) = (*layout).finish()?;
            let (file, hash) = sink.finish()?;
            if !plain_qcow2 {
                file.write_all_at(&header, 0).map_err(|e| KnibError::io("cannot write", dest, e))?;
            }
            report.hash = hash;
            report.summary = summary;
            file
        }
    };
    if opts.sync {
        file.sync_all().map_err(|e| KnibError::io("cannot fsync", dest, e))?;
    }
    report.file_len = crate::qcow2::image::file_size(&file).map_err(|e| KnibError::io("cannot size", dest, e))?;
    drop(file);
    if opts.hash && report.hash.is_none() {
        report.hash = Some(crate::hash::hash_files(&[dest.to_path_buf()], ctl)?);
    }
    Ok(report)
}

enum Target<'a> {
    Raw(RawOut<'a>),
    Qcow2(Box<Layout<FileSink>>),
}

struct RawOut<'a> {
    file: File,
    size: u64,
    cs: u64,
    dest: &'a Path,
}

impl RawOut<'_> {
    /// Write `data` (whole clusters from guest cluster `index`), skipping
    /// all-zero clusters (the file stays sparse) and bytes past the size.
    fn write(&mut self, index: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs as usize;
        let mut run: Option<(u64, usize)> = None; // (guest offset, start in data)
        let n = data.len() / cs;
        for k in 0..=n {
            let nonzero = k < n && !is_zero(&data[k * cs..(k + 1) * cs]);
            match (nonzero, run) {
                (true, None) => run = Some(((index + k as u64) * self.cs, k * cs)),
                (false, Some((off, at))) => {
                    let end = (k * cs).min(at + (self.size - off) as usize);
                    self.file.write_all_at(&data[at..end], off).map_err(|e| KnibError::io("cannot write", self.dest, e))?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The reader thread: fills batches with consecutive guest clusters.
fn read_loop(
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
fn throttle(started: Instant, bytes: u64, rate_mbps: u64, ctl: &Control, step: &str) -> Result<()> {
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
fn fill_batch(src: &mut Source, batch: &mut Batch, index: &mut u64, batch_bytes: usize) -> Result<()> {
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
                    Resolved::Skip | Resolved::Host { .. } => {}
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
        *index += 1;
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

impl Batch {
    /// Room for `len` more bytes of data: where they go.
    fn grow(&mut self, len: usize) -> usize {
        let at = self.used;
        if self.data.len() < at + len {
            self.data.resize(at + len, 0);
        }
        self.used += len;
        at
    }

    /// Room for up to `len` more compressed bytes: where they go.
    fn grow_out(&mut self, len: usize) -> usize {
        let at = self.out_used;
        if self.out.len() < at + len {
            self.out.resize(at + len, 0);
        }
        at
    }
}

fn push_data(batch: &mut Batch, index: u64, count: u64, at: usize, cs: usize) {
    if let Some(Item::Data { index: f, count: c, at: a }) = batch.items.last_mut() {
        if *f + *c == index && *a + *c as usize * cs == at {
            *c += count;
            return;
        }
    }
    batch.items.push(Item::Data { index, count, at });
}

/// A compression worker: turns the data items of batches into compressed,
/// zero or (when compression does not pay) uncompressed clusters.
fn compress_loop(
    work: Arc<Mutex<Receiver<Result<Batch>>>>,
    done: SyncSender<Result<Batch>>,
    ctype: CompressionType,
    cs: u64,
    zero_is_skip: bool,
) {
    let mut compressor = match Compressor::new(ctype) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = done.send(Err(e));
            None
        }
    };
    let cs = cs as usize;
    let mut items = Vec::new();
    loop {
        let next = match work.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(msg) = next else { return };
        let mut batch = match (msg, compressor.as_mut()) {
            (Ok(b), Some(_)) => b,
            (Err(e), _) => {
                let _ = done.send(Err(e));
                return;
            }
            (Ok(_), None) => return,
        };
        let Some(c) = compressor.as_mut() else { return };
        items.clear();
        std::mem::swap(&mut items, &mut batch.items);
        for item in items.iter().copied() {
            let Item::Data { index, count, at } = item else {
                batch.items.push(item);
                continue;
            };
            for k in 0..count as usize {
                let g = index + k as u64;
                let off = at + k * cs;
                let cluster = &batch.data[off..off + cs];
                if is_zero(cluster) {
                    if !zero_is_skip {
                        match batch.items.last_mut() {
                            Some(Item::Zero { index: z, count }) if *z + *count == g => *count += 1,
                            _ => batch.items.push(Item::Zero { index: g, count: 1 }),
                        }
                    }
                    continue;
                }
                let start = batch.grow_out(cs - 1);
                let (data, out) = (&batch.data[off..off + cs], &mut batch.out[start..start + cs - 1]);
                match c.compress(data, out) {
                    Some(len) => {
                        batch.out_used += len;
                        batch.items.push(Item::Compressed { index: g, at: start, len });
                    }
                    None => batch.items.push(Item::Data { index: g, count: 1, at: off }),
                }
            }
        }
        if done.send(Ok(batch)).is_err() {
            return;
        }
    }
}

/// The writer (the caller's thread): batches in order into the target.
fn write_loop(
    target: &mut Target<'_>,
    done: Receiver<Result<Batch>>,
    free: SyncSender<Batch>,
    total: u64,
    ctl: &Control,
    step: &str,
    report: &mut CopyReport,
) -> Result<()> {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    let mut covered = 0u64;
    let mut reported = -1.0f64;
    let cs = match target {
        Target::Raw(r) => r.cs,
        Target::Qcow2(l) => l.spec().cluster_size(),
    } as usize;
    ctl.report(step, 0.0);
    while let Ok(msg) = done.recv() {
        let batch = msg?;
        pending.insert(batch.seq, batch);
        while let Some(mut batch) = pending.remove(&next) {
            next += 1;
            ctl.check(step)?;
            for item in &batch.items {
                match (item, &mut *target) {
                    (Item::Data { index, count, at }, Target::Qcow2(l)) => {
                        l.push_data(*index, &batch.data[*at..*at + *count as usize * cs])?
                    }
                    (Item::Data { index, count, at }, Target::Raw(r)) => {
                        r.write(*index, &batch.data[*at..*at + *count as usize * cs])?
                    }
                    (Item::Compressed { index, at, len }, Target::Qcow2(l)) => {
                        l.push_compressed(*index, &batch.out[*at..*at + *len])?
                    }
                    (Item::Zero { index, count }, Target::Qcow2(l)) => l.push_zero(*index, *count)?,
                    (_, Target::Raw(_)) => {}
                }
            }
            report.bytes_read += batch.read_bytes;
            covered = batch.end_index;
            let pct = if total == 0 { 100.0 } else { batch.end_index as f64 * 100.0 / total as f64 };
            if pct - reported >= 1.0 {
                ctl.report(step, pct);
                reported = pct;
            }
            batch.items.clear();
            // The reader may have finished: nobody to recycle for.
            let _ = free.send(batch);
        }
    }
    if covered != total {
        return Err(KnibError::internal(format!("{step}: the reader stopped at cluster {covered} of {total}")));
    }
    Ok(())
}
