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
//! bounded (about 4 MiB of batches, see [`batch_plan`]) whatever the disk
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
use std::sync::Arc;

use parking_lot::Mutex;

use super::content::{check_written, is_zero, ContentDigest, DigestShape};
use super::copy_batch::{batch_plan, compress_loop, Batch, Item};
use super::copy_read::{read_loop, Resolved, Source, SourceMode};
use super::direct::{Bounce, ScatterWriter, WriteMode};
use super::header::CompressionType;
use super::sink::{CountSink, FileSink, Sink};
use super::srchash::SourceHash;
use super::writer::{BackingRef, ImageSpec, Layout, WriteSummary};
use crate::error::{KnibError, Result};
use crate::progress::{Control, EveryPercent};

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
    /// The backing pointer of a qcow2 output ([`SourceMode::Top`] and
    /// [`SourceMode::Above`] only).
    pub backing: Option<BackingRef>,
    /// Compress the clusters of a qcow2 output: each cluster is stored
    /// compressed when that makes it shorter than a cluster, as zero when
    /// it is all zeros, and as it is otherwise.
    pub compression: Option<CompressionType>,
    /// log2 of the output's cluster size; `None`: the source's.
    pub cluster_bits: Option<u32>,
    /// Compute the xxh3-128 hash of the output file.
    pub hash: bool,
    /// Read a qcow2 output file back through its own tables once written,
    /// as the device holds it (fsynced, its pages dropped from the cache
    /// first; compressed clusters decompressed) and compare its header and
    /// clusters with what the copy put into it ([`super::ContentDigest`]):
    /// an output that does not read back as written is an
    /// [`crate::ErrorKind::Internal`] error naming it (the copy is faulty,
    /// not its source). A raw output is not read back; a copy into a sink
    /// refuses the option.
    pub check_output: bool,
    /// Compute the xxh3-128 hash of each source file (the top and, for a
    /// flattened copy, every backing file), from the bytes the copy reads
    /// (see `qcow2::srchash`): [`CopyReport::source_hashes`].
    pub hash_source: bool,
    /// Compression worker threads; 0 = one per core, at most
    /// [`MAX_AUTO_THREADS`].
    pub threads: usize,
    /// Read at most this many MB (10^6 bytes) of data per second; 0 = no limit.
    pub rate_limit_mbps: u64,
    /// fsync the output before returning.
    pub sync: bool,
    /// How the output is written: by default the host's mode
    /// ([`WriteMode::host_default`]: through the page cache, sent to the
    /// device as written and dropped from the cache once there, unless
    /// `KNIB_WRITE_MODE` says otherwise).
    pub write_mode: WriteMode,
}

/// The most compression threads "one per core" ([`CopyOptions::threads`]
/// 0) starts: beyond it a copy is bound by its single reader and writer.
pub const MAX_AUTO_THREADS: usize = 16;

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            mode: SourceMode::Top,
            format: TargetFormat::Qcow2,
            backing: None,
            compression: None,
            cluster_bits: None,
            hash: false,
            check_output: false,
            hash_source: false,
            threads: 0,
            rate_limit_mbps: 0,
            sync: true,
            write_mode: WriteMode::default(),
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
    /// With [`CopyOptions::check_output`]: the clusters the output's
    /// digest counts (data, and zeros when it has a backing file), read
    /// back and found as copied.
    pub checked: Option<u64>,
}

/// Copy the image at `source` to `dest` (created or truncated) in one pass.
///
/// `before_write` is called once, before anything is written, with the
/// most bytes the output can take (the exact length of a plain qcow2
/// output), for a free-space check; an error there stops the copy.
///
/// Errors: those of [`super::Qcow2Image::open`] and [`super::Chain::open`] (encrypted
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
    copy_image_to(source, dest, Output::Named, opts, ctl, before_write)
}

/// How [`copy_image_to`] gets the file it writes at `dest`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Output<'a> {
    /// Created or truncated by name, following links: a path a caller
    /// named ([`copy_image`]).
    Named,
    /// Already open (a temporary the caller created, a compression's also
    /// locked; emptied here): written through this handle, and the name never opened
    /// again, so no entry put in its place (a link, symbolic or hard) is
    /// written. The caller checks that the name still leads to it before
    /// using the name.
    Opened(&'a File),
}

impl Output<'_> {
    fn open(self, dest: &Path) -> Result<File> {
        match self {
            Output::Named => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dest)
                .map_err(|e| KnibError::io("cannot create", dest, e)),
            Output::Opened(f) => {
                crate::crashpoint::pause_point(&format!("creating {}", dest.display()));
                let f = f.try_clone().map_err(|e| KnibError::io("cannot open", dest, e))?;
                f.set_len(0).map_err(|e| KnibError::io("cannot truncate", dest, e))?;
                Ok(f)
            }
        }
    }
}

/// [`copy_image`], `dest` opened as `out` says once the source is checked.
pub(crate) fn copy_image_to(
    source: &Path,
    dest: &Path,
    out: Output<'_>,
    opts: &CopyOptions,
    ctl: &Control,
    before_write: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<CopyReport> {
    let Prepared { mut src, spec, plain_qcow2, planned_header, planned_len, step } =
        prepare(source, opts, output_backing_size(dest, opts), ctl, before_write)?;

    let file = out.open(dest)?;

    if plain_qcow2 {
        // The exact length is known: allocate it up front (one extent
        // allocation instead of one delayed allocation per page written).
        // Best effort: a file system without fallocate just grows as written.
        use std::os::fd::AsRawFd;
        let len = i64::try_from(planned_len).unwrap_or(i64::MAX);
        // SAFETY: fallocate on an open file descriptor we own.
        let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    }
    let mut report = CopyReport { virtual_size: src.size, ..Default::default() };
    let cs = src.cs;

    let mut target = match opts.format {
        TargetFormat::Raw => {
            let scatter = ScatterWriter::open(&file, opts.write_mode);
            Target::Raw(RawOut { file, scatter, size: src.size, cs, dest })
        }
        TargetFormat::Qcow2 => {
            let header = plain_qcow2.then_some(planned_header.clone());
            let hash = opts.hash && plain_qcow2;
            // A compressed image is hashed by reading it back, below.
            let read_back = opts.hash && !plain_qcow2;
            let sink = FileSink::with_mode(file, dest, hash, opts.write_mode, read_back)?;
            Target::Qcow2(Box::new(Layout::new(spec.clone(), sink, header)?))
        }
    };
    let written = run(&mut src, &mut target, opts, ctl, &step, &mut report)?;

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
    // Read back through the handle written, never by name: whatever the
    // name leads to meanwhile is not what is checked or hashed. The check
    // first, from the device (it drops the file's pages from the cache
    // before it reads); the hash then reads the pages the check brought
    // in, and drops them: one read from the device for both (a file
    // larger than the page cache is read twice).
    let hash_back = opts.hash && report.hash.is_none();
    if hash_back || written.is_some() {
        crate::crashpoint::pause_point(&format!("read-back of {}", dest.display()));
    }
    if let Some((shape, want)) = written {
        let threads = if opts.threads > 0 { opts.threads } else { auto_threads() };
        let backing = opts.backing.as_ref().map(|b| b.name.as_str());
        report.checked = Some(check_written(&file, dest, &shape, backing, &want, threads, ctl)?);
    }
    if hash_back {
        report.hash = Some(crate::hash::hash_written_file(&file, dest, ctl)?);
    }
    Ok(report)
}

/// What a copy to a sink leaves to its caller.
pub struct SinkCopy<S: Sink> {
    /// What the copy did; `file_len` is the bytes appended; `hash` is
    /// `None` (the sink hashes what it is given, if it hashes).
    pub report: CopyReport,
    /// The sink, every byte appended.
    pub sink: S,
    /// For a compressed image: the header cluster to write at offset 0 in
    /// place of the zeros appended there (`report.hash` is then `None`).
    pub header: Option<Vec<u8>>,
}

/// [`copy_image`] into `sink` (a qcow2 output only), front to back: the
/// single-pass copy written elsewhere than a local file (a vault's
/// multipart upload). Nothing is fsynced or hashed back: the caller
/// finishes the sink. `before_write` is called as [`copy_image`] calls it.
pub fn copy_image_to_sink<S: Sink>(
    source: &Path,
    sink: S,
    opts: &CopyOptions,
    ctl: &Control,
    before_write: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<SinkCopy<S>> {
    if opts.format != TargetFormat::Qcow2 {
        return Err(KnibError::invalid("a copy into a sink writes qcow2"));
    }
    if opts.check_output {
        return Err(KnibError::invalid("a copy into a sink is not read back (check_output)"));
    }
    let Prepared { mut src, spec, plain_qcow2, planned_header, step, .. } =
        prepare(source, opts, None, ctl, before_write)?;
    let mut report = CopyReport { virtual_size: src.size, ..Default::default() };
    let header = plain_qcow2.then_some(planned_header);
    let mut target: Target<'_, S> = Target::Qcow2(Box::new(Layout::new(spec, sink, header)?));
    run(&mut src, &mut target, opts, ctl, &step, &mut report)?;
    let Target::Qcow2(layout) = target else { unreachable!("a qcow2 target") };
    let (header, sink, summary) = (*layout).finish()?;
    report.file_len = summary.file_len;
    report.summary = summary;
    Ok(SinkCopy { report, sink, header: (!plain_qcow2).then_some(header) })
}

/// A copy's source opened and its output planned.
struct Prepared {
    src: Source,
    spec: ImageSpec,
    plain_qcow2: bool,
    planned_header: Vec<u8>,
    planned_len: u64,
    step: String,
}

/// The virtual size of the backing file a copy above a base gives `dest`
/// (its name is relative to `dest`'s directory), when it can be read: the
/// output reads zeros past it whatever it leaves unallocated there. `None`
/// for other copies, and when the file cannot be opened or parsed (the
/// copy then writes the zero clusters it would need over any size).
fn output_backing_size(dest: &Path, opts: &CopyOptions) -> Option<u64> {
    let b = opts.backing.as_ref().filter(|_| matches!(opts.mode, SourceMode::Above(n) if n > 0))?;
    let path = crate::fsio::parent_dir(dest).join(&b.name);
    let size = match b.format.as_str() {
        "qcow2" => super::Qcow2Image::open(&path).map(|i| i.virtual_size()),
        "raw" => std::fs::metadata(&path).map(|m| m.len()).map_err(|e| KnibError::io("cannot stat", &path, e)),
        _ => return None,
    };
    size.map_err(|e| log::info!("{}: {e}; zero clusters are written past every shorter layer", path.display())).ok()
}

/// Open and check the source, plan the output from its tables alone and
/// call `before_write` with the most bytes it can take. `backing_size`:
/// the output's backing file's virtual size, when known
/// ([`output_backing_size`]).
fn prepare(
    source: &Path,
    opts: &CopyOptions,
    backing_size: Option<u64>,
    ctl: &Control,
    before_write: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Prepared> {
    if opts.mode == SourceMode::Chain && opts.backing.is_some() {
        return Err(KnibError::invalid("a flattened copy has no backing file"));
    }
    if opts.format == TargetFormat::Raw && (opts.backing.is_some() || opts.compression.is_some()) {
        return Err(KnibError::invalid("a raw output has no backing file and no compression"));
    }
    let step = format!("copy {}", source.display());
    let mut src = Source::open(source, opts.mode, backing_size)?;
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
    let (mut i, mut looked) = (0u64, 0u64);
    while i < src.clusters() {
        if looked % 4096 == 0 {
            ctl.check(&step)?;
        }
        looked += 1;
        let mut next = i + 1;
        match src.resolve(i)? {
            Resolved::Skip => next = src.after_skip(i)?,
            Resolved::Zero => plan.push_zero(i, 1)?,
            _ => {
                data_clusters += 1;
                plan.push_data(i, &zero_cluster)?;
            }
        }
        i = next;
    }
    let (planned_header, _, planned) = plan.finish()?;
    let bound = match opts.format {
        TargetFormat::Raw => data_clusters * src.cs,
        TargetFormat::Qcow2 => planned.file_len + planned.l2_tables * src.cs,
    };
    before_write(bound)?;
    Ok(Prepared { src, spec, plain_qcow2, planned_header, planned_len: planned.file_len, step })
}

/// Threads for "one per core": at most [`MAX_AUTO_THREADS`].
pub(crate) fn auto_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_AUTO_THREADS)
}

/// The copy's threads (a reader, compression workers, this thread as the
/// writer) from `src` into `target`, then the rest of each source file
/// for its hash. With [`CopyOptions::check_output`] and a qcow2 target:
/// the content digest of what was put into it.
fn run<S: Sink>(
    src: &mut Source,
    target: &mut Target<'_, S>,
    opts: &CopyOptions,
    ctl: &Control,
    step: &str,
    report: &mut CopyReport,
) -> Result<Option<(DigestShape, ContentDigest)>> {
    let workers = match opts.compression {
        None => 0,
        Some(_) if opts.threads > 0 => opts.threads,
        Some(_) => auto_threads(),
    };
    let (in_flight, batch_bytes) = batch_plan(src.cs, workers);
    let zero_is_skip = opts.backing.is_none();
    let compression = opts.compression;
    let cs = src.cs;
    let total = src.clusters();
    let digest_shape = (opts.check_output && matches!(target, Target::Qcow2(_))).then_some(DigestShape {
        cluster_size: cs,
        virtual_size: src.size,
        zeros_count: opts.backing.is_some(),
    });

    // A raw output's writes go to I/O threads: each cluster has its own
    // offset, so they may land in any order, and two writers keep the
    // device busier than one (docs/performance.md). Two more batches in
    // flight for them (about 6.7 MiB of batches in all).
    let raw_io = if matches!(target, Target::Raw(_)) { RAW_IO_THREADS } else { 0 };
    let in_flight = in_flight + raw_io;
    let raw_error: Mutex<Option<KnibError>> = Mutex::new(None);
    let written = std::thread::scope(|scope| -> Result<Option<(DigestShape, ContentDigest)>> {
        let (free_tx, free_rx) = sync_channel::<Batch>(in_flight);
        for _ in 0..in_flight {
            free_tx.send(Batch::default()).map_err(|_| KnibError::internal("batch pool"))?;
        }
        let (work_tx, work_rx) = sync_channel::<Result<Batch>>(in_flight);
        let reader_ctl = ctl.clone();
        let reader_step = step.to_string();
        let rate = opts.rate_limit_mbps;
        let src = &mut *src;
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
                scope.spawn(move || compress_loop(rx, tx, ctype, cs, zero_is_skip, digest_shape));
            }
            done_rx
        };
        let out = match target {
            Target::Qcow2(l) => Out::Qcow2 { layout: l, digest: digest_shape.map(|s| (s, ContentDigest::default())) },
            Target::Raw(raw) => {
                let (raw_tx, raw_rx) = sync_channel::<Batch>(in_flight);
                let raw_rx = Arc::new(Mutex::new(raw_rx));
                let raw: &RawOut = raw;
                for _ in 0..raw_io {
                    let rx = Arc::clone(&raw_rx);
                    let free = free_tx.clone();
                    let err = &raw_error;
                    scope.spawn(move || raw_io_loop(raw, &rx, &free, err));
                }
                Out::Raw { tx: raw_tx, error: &raw_error }
            }
        };
        // `out` (and with it the raw writers' channel) is dropped when the
        // loop returns: the I/O threads then finish and the scope joins them.
        write_loop(out, done_rx, free_tx, total, ctl, step, report)
    })?;
    if let Some(e) = raw_error.into_inner() {
        return Err(e);
    }

    // The rest of each source file, for its hash.
    for h in std::mem::take(&mut src.hashers) {
        ctl.check(step)?;
        report.source_hashes.push(h.finish()?);
    }
    Ok(written)
}

enum Target<'a, S: Sink = FileSink> {
    Raw(RawOut<'a>),
    Qcow2(Box<Layout<S>>),
}

struct RawOut<'a> {
    file: File,
    /// The file's writes, around the page cache where allowed.
    scatter: ScatterWriter,
    size: u64,
    cs: u64,
    dest: &'a Path,
}

impl RawOut<'_> {
    /// Write `data` (whole clusters from guest cluster `index`), skipping
    /// all-zero clusters (the file stays sparse) and bytes past the size.
    fn write(&self, index: u64, data: &[u8], bounce: &mut Bounce) -> Result<()> {
        let cs = self.cs as usize;
        let mut run: Option<(u64, usize)> = None; // (guest offset, start in data)
        let n = data.len() / cs;
        for k in 0..=n {
            let nonzero = k < n && !is_zero(&data[k * cs..(k + 1) * cs]);
            match (nonzero, run) {
                (true, None) => run = Some(((index + k as u64) * self.cs, k * cs)),
                (false, Some((off, at))) => {
                    let end = (k * cs).min(at + (self.size - off) as usize);
                    self.scatter
                        .write_at(&self.file, bounce, &data[at..end], off)
                        .map_err(|e| KnibError::io("cannot write", self.dest, e))?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// I/O threads writing a raw output.
const RAW_IO_THREADS: usize = 2;

/// Where the writer puts each batch.
enum Out<'t, S: Sink> {
    /// Into the qcow2 layout, in order; with the content digest of what
    /// is put there when the output is to be checked.
    Qcow2 { layout: &'t mut Layout<S>, digest: Option<(DigestShape, ContentDigest)> },
    /// To the raw output's I/O threads; the first error they meet.
    Raw { tx: SyncSender<Batch>, error: &'t Mutex<Option<KnibError>> },
}

/// One I/O thread of a raw output: write each batch's data clusters at
/// their offsets, then give the batch back to the reader. After an error
/// (kept in `error`, the first only) it only gives batches back.
fn raw_io_loop(
    raw: &RawOut<'_>,
    rx: &Mutex<Receiver<Batch>>,
    free: &SyncSender<Batch>,
    error: &Mutex<Option<KnibError>>,
) {
    let cs = raw.cs as usize;
    let mut bounce = Bounce::new();
    loop {
        let next = rx.lock().recv();
        let Ok(mut batch) = next else {
            if error.lock().is_none() {
                if let Err(e) = raw.scatter.finish_thread(&raw.file, &mut bounce) {
                    error.lock().get_or_insert(KnibError::io("cannot write", raw.dest, e));
                }
            }
            return;
        };
        if error.lock().is_none() {
            for item in &batch.items {
                if let Item::Data { index, count, at } = item {
                    if let Err(e) = raw.write(*index, &batch.data[*at..*at + *count as usize * cs], &mut bounce) {
                        error.lock().get_or_insert(e);
                        break;
                    }
                }
            }
        }
        batch.items.clear();
        // The reader may have finished: nobody to recycle for.
        let _ = free.send(batch);
    }
}

/// The writer (the caller's thread): batches in order into the target.
/// Returns, for a checked qcow2 output, its shape and the content digest
/// of what it put there.
fn write_loop<S: Sink>(
    mut out: Out<'_, S>,
    done: Receiver<Result<Batch>>,
    free: SyncSender<Batch>,
    total: u64,
    ctl: &Control,
    step: &str,
    report: &mut CopyReport,
) -> Result<Option<(DigestShape, ContentDigest)>> {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    let mut covered = 0u64;
    let mut progress = EveryPercent::new(ctl, step);
    progress.at(0, total);
    while let Ok(msg) = done.recv() {
        let batch = msg?;
        pending.insert(batch.seq, batch);
        while let Some(mut batch) = pending.remove(&next) {
            next += 1;
            ctl.check(step)?;
            report.bytes_read += batch.read_bytes;
            covered = batch.end_index;
            let end_index = batch.end_index;
            match &mut out {
                Out::Qcow2 { layout: l, digest } => {
                    let cs = l.spec().cluster_size() as usize;
                    if let Some((_, d)) = digest.as_mut() {
                        d.merge(&batch.digest);
                    }
                    batch.digest = ContentDigest::default();
                    for item in &batch.items {
                        match item {
                            Item::Data { index, count, at } => {
                                let data = &batch.data[*at..*at + *count as usize * cs];
                                if let Some((shape, d)) = digest.as_mut() {
                                    for (k, c) in data.chunks_exact(cs).enumerate() {
                                        d.add_data(shape, *index + k as u64, c);
                                    }
                                }
                                l.push_data(*index, data)?
                            }
                            // Counted by the worker that compressed it.
                            Item::Compressed { index, at, len } => {
                                l.push_compressed(*index, &batch.out[*at..*at + *len])?
                            }
                            Item::Zero { index, count } => {
                                if let Some((shape, d)) = digest.as_mut() {
                                    d.add_zeros(shape, *index, *count);
                                }
                                l.push_zero(*index, *count)?
                            }
                        }
                    }
                    batch.items.clear();
                    // The reader may have finished: nobody to recycle for.
                    let _ = free.send(batch);
                }
                Out::Raw { tx, error } => {
                    if let Some(e) = error.lock().take() {
                        return Err(e);
                    }
                    tx.send(batch).map_err(|_| KnibError::internal(format!("{step}: the raw writers stopped")))?;
                }
            }
            progress.at(end_index, total);
        }
    }
    if covered != total {
        return Err(KnibError::internal(format!("{step}: the reader stopped at cluster {covered} of {total}")));
    }
    Ok(match out {
        Out::Qcow2 { digest, .. } => digest,
        Out::Raw { .. } => None,
    })
}

#[cfg(test)]
mod raw_io_tests {
    use super::*;

    /// A raw writer that fails keeps the first error, still gives every
    /// batch back (so the reader never waits forever), and writes nothing
    /// more after it.
    #[test]
    fn raw_io_error_is_kept_and_batches_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        std::fs::write(&path, b"").unwrap();
        // Opened read-only: every write fails.
        let file = File::open(&path).unwrap();
        let scatter = ScatterWriter::open(&file, WriteMode::Buffered);
        let raw = RawOut { file, scatter, size: 1 << 20, cs: 65536, dest: &path };
        let (tx, rx) = sync_channel::<Batch>(4);
        let (free_tx, free_rx) = sync_channel::<Batch>(4);
        let error = Mutex::new(None);
        for seq in 0..3 {
            let mut b = Batch { seq, ..Default::default() };
            let at = b.grow(65536);
            b.data[at..].fill(7);
            b.items.push(Item::Data { index: seq, count: 1, at });
            tx.send(b).unwrap();
        }
        drop(tx);
        let rx = Mutex::new(rx);
        raw_io_loop(&raw, &rx, &free_tx, &error);
        let back: Vec<Batch> = free_rx.try_iter().collect();
        assert_eq!(back.len(), 3, "every batch is given back");
        assert!(back.iter().all(|b| b.items.is_empty()));
        let e = error.into_inner().expect("the write error is kept");
        assert!(e.to_string().contains("cannot write"), "{e}");
        assert!(e.to_string().contains("out.raw"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
