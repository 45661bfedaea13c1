//! Writing a store file from an NBD export: the clusters a block status
//! walk selects (the allocated ones for a full backup, the dirty ones for
//! an incremental one) are read and written through knib's own streaming
//! qcow2 writer, with the parent backup as backing file.
//!
//! # Invariants
//!
//! - An incremental copy holds every cluster that has a dirty byte in the
//!   exported bitmap; a dirty cluster that reads as zeros all through is
//!   written as a zero cluster (so the parent's data is not seen through
//!   it). Reading more than was changed is harmless; reading less never
//!   happens: a missing bitmap context is an error, not an empty bitmap.
//! - A full copy holds every cluster that does not read as zeros all
//!   through; the others read as zeros without a backing file. A full
//!   copy over a parent (a backing file, when no bitmap can say what
//!   changed) holds every cluster: the zero ones as zero clusters, so
//!   nothing of the parent is seen through it.
//! - The selection is made before any data is read (the export is a
//!   point-in-time view, it does not change), so the output is planned
//!   first: its header is known in advance, the file is written strictly
//!   front to back and hashed in the same pass (xxh3-128, as
//!   [`crate::hash`] reads it back).

use crate::qcow2::Sink;
use std::path::Path;

use crate::error::{KnibError, Result};
use crate::nbd::{self, Nbd};
use crate::progress::Control;
use crate::qcow2::{BackingRef, CompressionType, ContentDigest, CountSink, DigestShape, FileSink, ImageSpec, Layout};

/// log2 of the output's cluster size (64 KiB, QEMU's default, and the
/// default granularity of its dirty bitmaps).
pub const CLUSTER_BITS: u32 = 16;

/// The most bytes one read from the export asks for.
const READ_RUN: u64 = 512 << 10;

/// Reads in flight at once: the server works on them together (QEMU reads
/// its image from several threads), and their buffers,
/// `READ_RUN * READ_DEPTH` (4 MiB), are what the copy holds.
const READ_DEPTH: usize = 8;

/// What a run of clusters becomes in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Read from the export and stored.
    Data,
    /// Stored as zero clusters (the parent is not read for them).
    Zero,
}

/// A run of `count` output clusters from cluster `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The first cluster.
    pub start: u64,
    /// How many clusters.
    pub count: u64,
    /// What they become.
    pub kind: RunKind,
}

/// Turns byte segments (in increasing order, without gaps) into runs of
/// clusters: a cluster is wanted when any of its bytes is, and zero when
/// all of its bytes are.
#[derive(Debug)]
pub struct Selector {
    cs: u64,
    incremental: bool,
    /// The cluster being gathered: (index, wanted, all zero).
    cur: Option<(u64, bool, bool)>,
    runs: Vec<Run>,
}

impl Selector {
    /// A selector for clusters of `1 << bits` bytes; `incremental` keeps
    /// wanted zero clusters (as [`RunKind::Zero`]), a full copy drops them.
    pub fn new(bits: u32, incremental: bool) -> Self {
        Selector { cs: 1 << bits, incremental, cur: None, runs: Vec::new() }
    }

    fn emit(&mut self, index: u64, count: u64, wanted: bool, zero: bool) {
        if !wanted || count == 0 {
            return;
        }
        let kind = match (zero, self.incremental) {
            (true, false) => return,
            (true, true) => RunKind::Zero,
            (false, _) => RunKind::Data,
        };
        if let Some(last) = self.runs.last_mut() {
            if last.kind == kind && last.start + last.count == index {
                last.count += count;
                return;
            }
        }
        self.runs.push(Run { start: index, count, kind });
    }

    fn flush(&mut self) {
        if let Some((i, w, z)) = self.cur.take() {
            self.emit(i, 1, w, z);
        }
    }

    /// Bytes `offset..offset + len`: `wanted` (dirty, or allocated) and
    /// reading as zeros (`zero`).
    pub fn feed(&mut self, offset: u64, len: u64, wanted: bool, zero: bool) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / self.cs, (offset + len - 1) / self.cs);
        // The first cluster, maybe shared with the segment before.
        match &mut self.cur {
            Some((i, w, z)) if *i == first => {
                *w |= wanted;
                *z &= zero;
            }
            _ => {
                self.flush();
                self.cur = Some((first, wanted, zero));
            }
        }
        if last == first {
            return;
        }
        self.flush();
        // Whole clusters in between, then the last one (maybe shared with
        // the next segment).
        self.emit(first + 1, last - first - 1, wanted, zero);
        self.cur = Some((last, wanted, zero));
    }

    /// The runs, in order.
    pub fn finish(mut self) -> Vec<Run> {
        self.flush();
        self.runs
    }
}

/// Walk the block status of the whole export: the runs of clusters to copy.
///
/// With `parent`, the parent backup's chain of an incremental: a range that
/// is clean in the dirty bitmap but reads as zeros now, where the parent
/// holds data, is taken too (as zeros). QEMU does not mark what a shrink
/// removed: a disk shrunk and grown again between two backups reads zeros
/// in the grown part, clean in its bitmap, and an incremental without it
/// would restore the parent's old data there. A guest's discard or
/// write-zeroes is marked dirty, so this takes nothing else.
fn select(
    n: &mut Nbd,
    size: u64,
    dirty_ctx: Option<&str>,
    over_parent: bool,
    mut parent: Option<&mut crate::qcow2::Chain>,
    ctl: &Control,
    what: &str,
) -> Result<Vec<Run>> {
    let mut sel = Selector::new(CLUSTER_BITS, dirty_ctx.is_some() || over_parent);
    let mut off = 0;
    while off < size {
        ctl.check(what)?;
        let (end, got) = n.block_status(off, size - off, ctl)?;
        let alloc = got.iter().find(|(c, _)| c == nbd::BASE_ALLOCATION).map(|(_, l)| l.as_slice()).unwrap_or(&[]);
        let dirty = match dirty_ctx {
            Some(d) => Some(got.iter().find(|(c, _)| c == d).map(|(_, l)| l.as_slice()).ok_or_else(|| {
                KnibError::hypervisor(format!("{what}: the NBD server gave no block status for {d}"))
            })?),
            None => None,
        };
        // Intersect the contexts' extents into segments.
        let (mut a, mut d, mut at) = (0usize, 0usize, off);
        while at < end {
            let ae = alloc.get(a);
            let (a_end, zero) = match ae {
                Some(e) => (e.offset + e.length, e.flags & nbd::STATE_ZERO != 0),
                None => (end, false),
            };
            let (d_end, wanted) = match dirty {
                Some(list) => match list.get(d) {
                    Some(e) => (e.offset + e.length, e.flags & nbd::STATE_DIRTY != 0),
                    // Past the answer: dirty, to be safe.
                    None => (end, true),
                },
                None => (end, !zero || over_parent),
            };
            let seg_end = a_end.min(d_end).min(end);
            if seg_end <= at {
                return Err(KnibError::hypervisor(format!("{what}: the NBD block status answer is out of order")));
            }
            match parent.as_deref_mut() {
                Some(p) if dirty.is_some() && !wanted && zero => {
                    let mut cur = at;
                    for (s, l) in p.data_ranges(at, seg_end - at).map_err(|e| e.context("the parent backup"))? {
                        if s > cur {
                            sel.feed(cur, s - cur, false, true);
                        }
                        log::warn!(
                            "{what}: bytes {s}..{} read as zeros and are clean in the dirty bitmap, but the parent backup holds data there (the disk was shrunk and grown again?): taken as zeros",
                            s + l
                        );
                        sel.feed(s, l, true, true);
                        cur = s + l;
                    }
                    if seg_end > cur {
                        sel.feed(cur, seg_end - cur, false, true);
                    }
                }
                _ => sel.feed(at, seg_end - at, wanted, zero),
            }
            at = seg_end;
            if a_end == at {
                a += 1;
            }
            if dirty.is_some() && d_end == at {
                d += 1;
            }
        }
        off = end;
    }
    Ok(sel.finish())
}

/// What [`copy_export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCopy {
    /// xxh3-128 of the file written.
    pub hash: String,
    /// Guest data bytes read from the export and stored.
    pub data_bytes: u64,
    /// The export's size (the guest-visible size).
    pub virtual_size: u64,
}

/// Copy export `export` of the NBD server on `socket` into a new qcow2
/// file `dest`: every cluster that is dirty in the export's bitmap
/// `bitmap` (incremental), or every cluster that does not read as zeros
/// (`bitmap` `None`: full). `backing` is the parent backup's file, as the
/// backing pointer written (relative to `dest`); a full copy with one
/// holds every cluster (the zero ones as zero clusters). With `compress`, each
/// cluster is stored compressed when that makes it shorter (the header is
/// then written last and the file hashed by reading it back); with `check`
/// too, the file is read back through its own tables before it is kept,
/// and must hold what was put into it (else an `internal` error naming it:
/// [`crate::qcow2::CopyOptions::check_output`]).
///
/// The file is written under a temporary name of knib's own
/// ([`crate::fsio::temp_path`], created following no link), fsynced and
/// renamed to `dest` only when whole (never replacing an entry there): a
/// `dest` that exists is always a finished copy (a copy killed midway left
/// a partial `dest`, which a cleanup took for a finished one and kept).
/// On error the temporary is removed; a stale one (a killed copy's) is
/// replaced.
#[allow(clippy::too_many_arguments)]
pub fn copy_export(
    socket: &Path,
    export: &str,
    bitmap: Option<&str>,
    dest: &Path,
    backing: Option<&str>,
    compress: Option<CompressionType>,
    check: bool,
    ctl: &Control,
) -> Result<ExportCopy> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(KnibError::io("cannot create", dest, std::io::ErrorKind::AlreadyExists.into()));
    }
    let tmp = crate::fsio::temp_path(dest);
    // Written through the file as created, never by name.
    let r = copy_export_into(socket, export, bitmap, dest, &tmp, backing, compress, check, ctl)
        .and_then(|(c, file)| crate::fsio::commit_own_temp(&tmp, &file, dest, false).map(|()| c));
    if r.is_err() {
        let _ = crate::fsio::remove_if_exists(&tmp);
    }
    r
}

/// [`copy_export`] into `tmp`, fsynced, with the file as created; `dest`
/// names the copy.
#[allow(clippy::too_many_arguments)]
fn copy_export_into(
    socket: &Path,
    export: &str,
    bitmap: Option<&str>,
    dest: &Path,
    tmp: &Path,
    backing: Option<&str>,
    compress: Option<CompressionType>,
    check: bool,
    ctl: &Control,
) -> Result<(ExportCopy, std::fs::File)> {
    use std::os::unix::fs::FileExt;
    let what = format!("copy of NBD export {export} to {}", dest.display());
    // An incremental's parent, as its backing pointer names it.
    let mut parent = match (bitmap, backing) {
        (Some(_), Some(b)) => {
            let p = crate::fsio::parent_dir(dest).join(b);
            Some(
                crate::qcow2::Chain::open_files_only(&p)
                    .map_err(|e| e.context(format!("parent backup {}", p.display())))?,
            )
        }
        _ => None,
    };
    let w = copy_export_to(
        socket,
        export,
        bitmap,
        backing,
        parent.as_mut(),
        compress,
        check,
        ctl,
        &what,
        &mut |planned, hash| {
            if let (Some(len), Some(dir)) = (planned, dest.parent()) {
                crate::fsio::require_space(dir, len, &what)?;
            }
            let file = crate::fsio::create_own_temp(tmp)?;
            crate::crashpoint::pause_point(&format!("creating {}", tmp.display()));
            // Written as the host's write mode says (behind by default: the
            // file's fsync then has little left to write back), as the
            // snapshot method's copies.
            // A compressed image (its length not planned) is hashed by reading
            // it back, below.
            FileSink::with_mode(file, tmp, hash, crate::qcow2::WriteMode::default(), planned.is_none())
        },
    )?;
    let (file, hash) = w.sink.finish()?;
    let hash = match (&w.header, hash) {
        (None, Some(h)) => {
            file.sync_all().map_err(|e| KnibError::io("cannot sync", tmp, e))?;
            h
        }
        (Some(header), _) => {
            file.write_all_at(header, 0).map_err(|e| KnibError::io("cannot write", tmp, e))?;
            file.sync_all().map_err(|e| KnibError::io("cannot sync", tmp, e))?;
            crate::crashpoint::pause_point(&format!("wrote {}", tmp.display()));
            if let Some((shape, want)) = &w.written {
                let threads = crate::qcow2::auto_threads();
                crate::qcow2::check_written(&file, tmp, shape, backing, want, threads, ctl)?;
            }
            crate::hash::hash_written_file(&file, tmp, ctl)?
        }
        (None, None) => return Err(KnibError::internal("the file sink did not hash")),
    };
    Ok((ExportCopy { hash, data_bytes: w.data_bytes, virtual_size: w.virtual_size }, file))
}

/// What [`copy_export_to`] wrote into its sink.
pub(crate) struct ExportWritten<S> {
    /// The sink, every byte appended (not finished).
    pub sink: S,
    /// A compressed image's header, to write at offset 0 last (the sink was
    /// made without hashing); `None`: the header went first, and the sink
    /// hashed everything.
    pub header: Option<Vec<u8>>,
    /// Guest data bytes read from the export and stored.
    pub data_bytes: u64,
    /// The export's size (the guest-visible size).
    pub virtual_size: u64,
    /// With `check` (a compressed image): its shape and the content digest
    /// of what was put into it, for the read-back.
    pub written: Option<(DigestShape, ContentDigest)>,
}

/// [`copy_export`] into any [`Sink`], front to back: `make(planned
/// length, hash)` makes it once the image's length is known (`None`: a
/// compressed image, whose length is not). A vault's upload is one.
/// `check`: keep the digest of a compressed image's content
/// ([`ExportWritten::written`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_export_to<S: Sink>(
    socket: &Path,
    export: &str,
    bitmap: Option<&str>,
    backing: Option<&str>,
    parent: Option<&mut crate::qcow2::Chain>,
    compress: Option<CompressionType>,
    check: bool,
    ctl: &Control,
    what: &str,
    make: &mut dyn FnMut(Option<u64>, bool) -> Result<S>,
) -> Result<ExportWritten<S>> {
    let dirty_ctx = bitmap.map(nbd::dirty_bitmap_context);
    let mut contexts = vec![nbd::BASE_ALLOCATION];
    if let Some(d) = &dirty_ctx {
        contexts.push(d);
    }
    let t0 = std::time::Instant::now();
    let mut n = Nbd::connect_unix(socket, export, &contexts, ctl)?;
    log::debug!("{what}: connected in {:?}", t0.elapsed());
    if let Some(d) = &dirty_ctx {
        if !n.can_meta_context(d)? {
            return Err(KnibError::hypervisor(format!(
                "{what}: the export has no dirty bitmap {d}: an incremental copy cannot be made from it"
            )));
        }
    }
    let size = n.size()?;
    let runs = select(&mut n, size, dirty_ctx.as_deref(), backing.is_some(), parent, ctl, what)?;
    log::debug!("{what}: {} runs selected at {:?}", runs.len(), t0.elapsed());
    let spec = ImageSpec {
        virtual_size: size,
        cluster_bits: CLUSTER_BITS,
        backing: backing.map(|b| BackingRef { name: b.to_string(), format: "qcow2".into() }),
        compression: compress.unwrap_or(CompressionType::Zlib),
    };
    if let Some(t) = compress {
        return copy_compressed(&mut n, &runs, spec, t, size, check, ctl, what, make);
    }
    let cs = spec.cluster_size();
    let pieces = Pieces::new(&runs, cs, size);
    let zeros = vec![0u8; READ_RUN as usize];
    // Plan: the header and the file's length, before anything is read.
    let mut plan = Layout::new(spec.clone(), CountSink::default(), None)?;
    pieces.replay(&mut plan, &mut |plan, p, _| plan.push_data(p.cluster, &zeros[..p.len]))?;
    let (header, _, planned) = plan.finish()?;
    let mut out = Layout::new(spec, make(Some(planned.file_len), true)?, Some(header))?;
    let mut data_bytes = 0u64;
    let mut done = 0u64;
    pieces.read(&mut n, ctl, what, &mut out, &mut |out, p, bytes| {
        out.push_data(p.cluster, bytes)?;
        data_bytes += p.readable as u64;
        done += p.len as u64;
        ctl.report(what, done as f64 * 100.0 / pieces.data_len.max(1) as f64);
        Ok(())
    })?;
    log::debug!("{what}: read at {:?}", t0.elapsed());
    let (_, sink, _) = out.finish()?;
    log::debug!("{what}: finished at {:?}", t0.elapsed());
    Ok(ExportWritten { sink, header: None, data_bytes, virtual_size: size, written: None })
}

/// A read of the export: `len` bytes (whole clusters) from cluster
/// `cluster`, of which `readable` are inside the export (the last cluster
/// may pass its end: the rest reads as zeros).
#[derive(Debug, Clone, Copy)]
struct Piece {
    cluster: u64,
    len: usize,
    readable: usize,
}

/// What is done with a read's bytes (none when planning).
type PieceFn<'f, T> = dyn FnMut(&mut Layout<T>, Piece, &[u8]) -> Result<()> + 'f;

/// The runs cut into reads of at most [`READ_RUN`] bytes, in order, with
/// the zero runs between them.
struct Pieces<'a> {
    runs: &'a [Run],
    cs: u64,
    /// Every read, in output order.
    reads: Vec<Piece>,
    /// Bytes of all reads.
    data_len: u64,
}

impl<'a> Pieces<'a> {
    fn new(runs: &'a [Run], cs: u64, size: u64) -> Self {
        let per = READ_RUN / cs;
        let mut reads = Vec::new();
        for r in runs.iter().filter(|r| r.kind == RunKind::Data) {
            let mut i = r.start;
            while i < r.start + r.count {
                let k = per.min(r.start + r.count - i);
                let (off, len) = (i * cs, k * cs);
                reads.push(Piece {
                    cluster: i,
                    len: len as usize,
                    readable: len.min(size.saturating_sub(off)) as usize,
                });
                i += k;
            }
        }
        let data_len = reads.iter().map(|p| p.len as u64).sum();
        Pieces { runs, cs, reads, data_len }
    }

    /// Hand the zero runs to `out` and each read to `data`, in output
    /// order, without reading (`data` gets no bytes): for planning.
    fn replay<T: Sink>(&self, out: &mut Layout<T>, data: &mut PieceFn<'_, T>) -> Result<()> {
        let mut zeros = ZeroRuns::new(self.runs);
        for p in &self.reads {
            zeros.before(out, p.cluster)?;
            data(out, *p, &[])?;
        }
        zeros.before(out, u64::MAX)
    }

    /// Read every piece from the export, several at once, and hand the zero
    /// runs to `out` and each piece's bytes (zero-filled past the export's
    /// end) to `data`, in output order.
    fn read<T: Sink>(
        &self,
        n: &mut Nbd,
        ctl: &Control,
        what: &str,
        out: &mut Layout<T>,
        data: &mut PieceFn<'_, T>,
    ) -> Result<()> {
        let ranges: Vec<(u64, usize)> = self.reads.iter().map(|p| (p.cluster * self.cs, p.readable)).collect();
        let mut zeros = ZeroRuns::new(self.runs);
        let mut tail = Vec::new();
        n.pread_pipelined(&ranges, READ_DEPTH, ctl, &mut |i, bytes| {
            ctl.check(what)?;
            let p = self.reads[i];
            zeros.before(out, p.cluster)?;
            if p.readable == p.len {
                return data(out, p, bytes);
            }
            tail.clear();
            tail.extend_from_slice(bytes);
            tail.resize(p.len, 0);
            data(out, p, &tail)
        })?;
        zeros.before(out, u64::MAX)
    }
}

/// The zero runs of a selection, handed out in order.
struct ZeroRuns<'a> {
    runs: std::slice::Iter<'a, Run>,
    next: Option<&'a Run>,
}

impl<'a> ZeroRuns<'a> {
    fn new(runs: &'a [Run]) -> Self {
        let mut runs = runs.iter();
        let next = runs.find(|r| r.kind == RunKind::Zero);
        ZeroRuns { runs, next }
    }

    /// Push to `out` every zero run that starts before cluster `cluster`.
    fn before<T: Sink>(&mut self, out: &mut Layout<T>, cluster: u64) -> Result<()> {
        while let Some(r) = self.next.filter(|r| r.start < cluster) {
            out.push_zero(r.start, r.count)?;
            self.next = self.runs.find(|r| r.kind == RunKind::Zero);
        }
        Ok(())
    }
}

/// [`copy_export_to`] with compressed clusters; with `check`, the digest
/// of what it puts into the image.
#[allow(clippy::too_many_arguments)]
fn copy_compressed<S: Sink>(
    n: &mut Nbd,
    runs: &[Run],
    spec: ImageSpec,
    t: CompressionType,
    size: u64,
    check: bool,
    ctl: &Control,
    what: &str,
    make: &mut dyn FnMut(Option<u64>, bool) -> Result<S>,
) -> Result<ExportWritten<S>> {
    let cs = spec.cluster_size();
    let shape = DigestShape { cluster_size: cs, virtual_size: size, zeros_count: spec.backing.is_some() };
    let mut digest = ContentDigest::default();
    if check {
        for r in runs.iter().filter(|r| r.kind == RunKind::Zero) {
            digest.add_zeros(&shape, r.start, r.count);
        }
    }
    let mut out = Layout::new(spec, make(None, false)?, None)?;
    let mut packed = vec![0u8; cs as usize - 1];
    let mut compressor = crate::qcow2::Compressor::new(t)?;
    let mut data_bytes = 0u64;
    Pieces::new(runs, cs, size).read(n, ctl, what, &mut out, &mut |out, p, bytes| {
        data_bytes += p.readable as u64;
        for (j, cluster) in bytes.chunks(cs as usize).enumerate() {
            let i = p.cluster + j as u64;
            if check {
                digest.add_data(&shape, i, cluster);
            }
            match compressor.compress(cluster, &mut packed) {
                Some(len) => out.push_compressed(i, &packed[..len])?,
                None => out.push_data(i, cluster)?,
            }
        }
        Ok(())
    })?;
    let (header, sink, _) = out.finish()?;
    let written = check.then_some((shape, digest));
    Ok(ExportWritten { sink, header: Some(header), data_bytes, virtual_size: size, written })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_makes_cluster_runs() {
        // Clusters of 16 bytes.
        let mut s = Selector::new(4, true);
        s.feed(0, 8, false, false); // cluster 0: half clean
        s.feed(8, 4, true, false); //  ... a dirty byte: wanted
        s.feed(12, 36, false, false); // rest of 0, clusters 1, 2: clean
        s.feed(48, 40, true, true); // clusters 3, 4 zero; cluster 5 starts zero
        s.feed(88, 8, true, false); // cluster 5 has data
        s.feed(96, 16, false, false);
        let runs = s.finish();
        assert_eq!(
            runs,
            vec![
                Run { start: 0, count: 1, kind: RunKind::Data },
                Run { start: 3, count: 2, kind: RunKind::Zero },
                Run { start: 5, count: 1, kind: RunKind::Data },
            ]
        );
        // A full copy drops zero clusters.
        let mut s = Selector::new(4, false);
        s.feed(0, 32, true, true);
        s.feed(32, 33, true, false);
        assert_eq!(s.finish(), vec![Run { start: 2, count: 3, kind: RunKind::Data }]);
    }
}
