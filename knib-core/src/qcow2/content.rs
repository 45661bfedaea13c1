//! The content digest of a qcow2 image's own clusters: what a copy reads
//! back from its output to show that the output holds what was copied into
//! it, whatever the encoding (compressed or not, a zero flag or a cluster
//! of zeros).
//!
//! # What it covers
//!
//! Each guest cluster the image itself holds counts once, by its index:
//!
//! - data that is not all zeros: its bytes (the last cluster's up to the
//!   virtual size only), as the guest reads them (decompressed);
//! - zeros (a zero flag, or data that is all zeros): "zeros here", when the
//!   image has a backing file (zeros then hide what it holds); nothing when
//!   it has none (an unallocated cluster reads as zeros too);
//! - an unallocated cluster: nothing (it reads from the backing file).
//!
//! The digest is the wrapping sum of one xxh3-128 per counted cluster
//! (seeded with the cluster's index and its kind), so the clusters may be
//! added in any order: the compression workers add theirs as they go. It
//! finds what goes wrong by accident (a cluster under another's index, a
//! cluster lost or added, bytes changed between the compressor and the
//! file); it is not meant to stand against someone forging an image.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::chain::{read_layers, Chain, Layer};
use super::image::{ClusterState, Qcow2Image};
use super::source::{FileSource, ReadAt};
use crate::error::{KnibError, Result};
use crate::progress::Control;

/// Whether `b` is all zeros.
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// An order-independent digest of guest clusters (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContentDigest {
    sum: u128,
    clusters: u64,
}

/// How the clusters of one image are counted: its cluster and virtual
/// sizes, and whether zeros count (it has a backing file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestShape {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// The image has a backing file: its zero clusters count.
    pub zeros_count: bool,
}

impl DigestShape {
    /// The bytes of guest cluster `index` that the guest sees: all but the
    /// part of the last cluster past the virtual size.
    fn visible(&self, index: u64) -> usize {
        let start = index.saturating_mul(self.cluster_size);
        self.virtual_size.saturating_sub(start).min(self.cluster_size) as usize
    }
}

impl ContentDigest {
    /// Count guest cluster `index` holding `data` (one whole cluster, or
    /// at least its visible part).
    pub fn add_data(&mut self, shape: &DigestShape, index: u64, data: &[u8]) {
        let data = &data[..shape.visible(index).min(data.len())];
        if is_zero(data) {
            self.add_zeros(shape, index, 1);
        } else {
            self.add(xxh3_128_with_seed(data, index.wrapping_mul(2).wrapping_add(1)));
        }
    }

    /// Count `count` zero clusters from guest cluster `index`.
    pub fn add_zeros(&mut self, shape: &DigestShape, index: u64, count: u64) {
        if shape.zeros_count {
            for i in index..index.saturating_add(count) {
                self.add(xxh3_128_with_seed(b"", i.wrapping_mul(2)));
            }
        }
    }

    /// Add another digest's clusters (of the same image).
    pub fn merge(&mut self, other: &ContentDigest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.clusters += other.clusters;
    }

    /// The clusters counted.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    fn add(&mut self, h: u128) {
        self.sum = self.sum.wrapping_add(h);
        self.clusters += 1;
    }
}

/// The content digest of the own clusters of the qcow2 image `source`
/// gives (`name` in errors), counted as `zeros_count` says, read through
/// its tables (compressed clusters decompressed) by `threads` threads
/// (at least one), each taking the next stretch of clusters; the digest
/// does not depend on the order. Checks `ctl` as it goes, naming `step`.
pub fn image_digest(
    name: &str,
    source: Arc<dyn ReadAt>,
    zeros_count: bool,
    threads: usize,
    ctl: &Control,
    step: &str,
) -> Result<ContentDigest> {
    let first = Qcow2Image::from_source(name, Arc::clone(&source))?;
    digest_of(first, name, source, zeros_count, threads, ctl, step)
}

/// [`image_digest`] of `first`, an image already open on `source`.
fn digest_of(
    first: Qcow2Image,
    name: &str,
    source: Arc<dyn ReadAt>,
    zeros_count: bool,
    threads: usize,
    ctl: &Control,
    step: &str,
) -> Result<ContentDigest> {
    let total = first.guest_clusters();
    // Whole L2 ranges, at least 1024 clusters a stretch.
    let stretch = first.header().l2_entries().max(1024);
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let work = |mut img: Qcow2Image| -> Result<ContentDigest> {
        let mut d = ContentDigest::default();
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(d);
            }
            let from = next.fetch_add(stretch, Ordering::Relaxed);
            if from >= total {
                return Ok(d);
            }
            let r = digest_range(&mut img, from, (from + stretch).min(total), zeros_count, &mut d, ctl, step);
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
                return r.map(|_| d);
            }
        }
    };
    let threads = threads.max(1);
    let results: Vec<Result<ContentDigest>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 1..threads {
            let source = Arc::clone(&source);
            let work = &work;
            handles.push(scope.spawn(move || Qcow2Image::from_source(name, source).and_then(work)));
        }
        let mut results = vec![work(first)];
        for h in handles {
            results.push(h.join().unwrap_or_else(|_| Err(KnibError::internal(format!("{step}: a reader panicked")))));
        }
        results
    });
    let mut d = ContentDigest::default();
    for r in results {
        d.merge(&r?);
    }
    Ok(d)
}

/// Add the clusters `from..to` of `img` to `d`.
fn digest_range(
    img: &mut Qcow2Image,
    from: u64,
    to: u64,
    zeros_count: bool,
    d: &mut ContentDigest,
    ctl: &Control,
    step: &str,
) -> Result<()> {
    let shape = DigestShape { cluster_size: img.cluster_size(), virtual_size: img.virtual_size(), zeros_count };
    let mut buf = vec![0u8; img.cluster_size() as usize];
    let mut i = from;
    let mut steps = 0u64;
    while i < to {
        steps += 1;
        if steps.is_multiple_of(4096) {
            ctl.check(step)?;
        }
        // Clusters whose L2 entry is 0 (no table, or an entry of 0) hold
        // nothing here: stepped over, not looked up one by one.
        let next = img.next_mapped_cluster_before(i, to)?;
        if next > i {
            i = next;
            continue;
        }
        match img.cluster_state(i)? {
            ClusterState::Unallocated => {}
            ClusterState::Zero => d.add_zeros(&shape, i, 1),
            ClusterState::Data { host_offset } => {
                img.read_host(host_offset, &mut buf)?;
                d.add_data(&shape, i, &buf);
            }
            ClusterState::Compressed { host_offset, compressed_len } => {
                let data = img.read_compressed(i, host_offset, compressed_len)?;
                d.add_data(&shape, i, data);
            }
        }
        i += 1;
    }
    Ok(())
}

/// The program that wrote a copy, named in [`miswritten`]'s error.
const KNIB: &str = "knib";
/// See [`KNIB`].
const QEMU_IMG: &str = "qemu-img";

/// The error for a copy `name`, written by `by` ([`KNIB`] or
/// [`QEMU_IMG`]), that does not read back as written:
/// [`crate::ErrorKind::Internal`], the copy being faulty, not its source.
fn miswritten(name: &str, by: &str, what: impl std::fmt::Display) -> KnibError {
    KnibError::internal(format!(
        "{name} does not read back as written: {what} (the copy is faulty, not its source: a fault of this host or of {by})"
    ))
}

/// An error met reading the copy `name` (written by `by`) back: the
/// copy's own fault (a table or cluster it cannot give), unless it is of
/// the host or the caller (I/O, cancelled, timed out), kept as it is.
fn of_copy(name: &str, by: &str, e: KnibError) -> KnibError {
    match e.kind {
        crate::ErrorKind::Cancelled | crate::ErrorKind::Timeout | crate::ErrorKind::Io => e,
        _ => miswritten(name, by, e),
    }
}

/// Read the qcow2 file just written (through the handle written, never by
/// name) back through its own tables as the device holds it (made durable,
/// its cached pages dropped first), on `threads` threads: its virtual
/// size, cluster size and backing pointer must be `shape`'s and
/// `backing`, and its content digest `want`, the digest of what the copy
/// put into it. Returns the clusters counted. A file that differs is an
/// [`crate::ErrorKind::Internal`] error naming it: the copy is faulty (a
/// fault of this host or of knib), not its source.
pub(crate) fn check_written(
    file: &File,
    dest: &Path,
    shape: &DigestShape,
    backing: Option<&str>,
    want: &ContentDigest,
    threads: usize,
    ctl: &Control,
) -> Result<u64> {
    crate::crashpoint::pause_point(&format!("check of {}", dest.display()));
    crate::fsio::uncache_for_read_back(file, dest)?;
    let handle = file.try_clone().map_err(|e| KnibError::io("cannot open", dest, e))?;
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::new(handle).map_err(|e| KnibError::io("cannot size", dest, e))?);
    let name = dest.display().to_string();
    let img = Qcow2Image::from_source(name.as_str(), Arc::clone(&source))
        .map_err(|e| miswritten(&name, KNIB, format_args!("it does not open ({e})")))?;
    let h = img.header();
    if img.virtual_size() != shape.virtual_size
        || img.cluster_size() != shape.cluster_size
        || h.backing_file.as_deref() != backing
    {
        return Err(miswritten(
            &name,
            KNIB,
            format_args!(
                "its header gives {} bytes, clusters of {} and backing file {:?}, not {}, {} and {:?}",
                img.virtual_size(),
                img.cluster_size(),
                h.backing_file,
                shape.virtual_size,
                shape.cluster_size,
                backing
            ),
        ));
    }
    let step = format!("check of {name}");
    let got =
        digest_of(img, &name, source, shape.zeros_count, threads, ctl, &step).map_err(|e| of_copy(&name, KNIB, e))?;
    if got != *want {
        return Err(if got.clusters() == want.clusters() {
            miswritten(&name, KNIB, "a cluster reads back other than it was written")
        } else {
            miswritten(
                &name,
                KNIB,
                format_args!("{} clusters read back where {} were written", got.clusters(), want.clusters()),
            )
        });
    }
    log::debug!("{name}: {} clusters read back as written", got.clusters());
    Ok(got.clusters())
}

/// What another program (qemu-img) copied from a source image into a
/// qcow2 file, for [`check_guest_copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied<'a> {
    /// The source's own clusters, over the same backing file (a
    /// compression): the copy's backing pointer is the source's.
    Top,
    /// The source's own clusters, over another backing file that holds
    /// what the source's does (an incremental backup over its parent
    /// backup): the copy's backing pointer is this one, opened from the
    /// copy's directory. The two backing chains are not compared.
    TopOver(&'a str),
    /// The source's whole chain, flattened into a file of its own (a full
    /// backup): the copy has no backing file.
    Whole,
}

/// Whether `img` holds a cluster of its own in `[off, end)`.
fn owns(img: &mut Qcow2Image, off: u64, end: u64) -> Result<bool> {
    let cs = img.cluster_size();
    let (mut i, last) = (off / cs, end.div_ceil(cs));
    loop {
        // Entries of 0 are unallocated: stepped over.
        i = img.next_mapped_cluster_before(i, last)?;
        if i >= last {
            return Ok(false);
        }
        if img.cluster_state(i)? != ClusterState::Unallocated {
            return Ok(true);
        }
        i += 1;
    }
}

/// The start of the first cluster at or after `off` whose L2 entry is
/// not 0 (no table, a table of zeros, entries of 0 map nothing), or `off`
/// when its own cluster's is not.
fn unmapped_end(img: &mut Qcow2Image, off: u64) -> Result<u64> {
    let cs = img.cluster_size();
    Ok(img.next_mapped_cluster(off / cs)?.saturating_mul(cs).max(off))
}

/// [`unmapped_end`] of a backing file at `off` (a
/// raw file holds everything up to its size but its holes, which read as
/// zeros: a sparse template of terabytes is not read whole).
fn layer_unmapped_end(l: &mut Layer, off: u64) -> Result<u64> {
    match l {
        Layer::Qcow2(img) => unmapped_end(img, off),
        Layer::Raw(raw) => Ok(raw.next_data(off)),
    }
}

/// [`owns`] of a backing file in `[off, end)`, within its virtual size (a
/// raw file holds everything up to its size but its holes).
fn layer_owns(l: &mut Layer, off: u64, end: u64) -> Result<bool> {
    match l {
        Layer::Qcow2(img) => owns(img, off, end),
        Layer::Raw(raw) => Ok(raw.next_data(off) < end),
    }
}

/// The check of a copy of `source` (its chain, opened) that another program (qemu-img) wrote
/// to `out` (named `out_name`, read as the device holds it: made durable,
/// its cached pages dropped first), as `what` says it was copied: the same
/// virtual size and the backing pointer `what` gives, and the same guest
/// bytes, each read through its own chain, wherever the copy or the part
/// of the source that was copied holds a cluster of its own (elsewhere
/// both read backing files that `what` says hold the same). Guest bytes
/// are compared, not clusters, because the other program may lay out what
/// it copies otherwise (another cluster size, zeros left to a backing file
/// that reads zeros there, a partial last cluster copied whole). Returns
/// the blocks compared; a copy that differs is an
/// [`crate::ErrorKind::Internal`] error naming it.
pub(crate) fn check_guest_copy(
    source: Chain,
    out: &File,
    out_name: &Path,
    what: Copied<'_>,
    ctl: &Control,
) -> Result<u64> {
    let (mut src, mut layers) = source.into_parts();
    let name = out_name.display().to_string();
    crate::fsio::uncache_for_read_back(out, out_name)?;
    let handle = out.try_clone().map_err(|e| KnibError::io("cannot open", out_name, e))?;
    let file = FileSource::new(handle).map_err(|e| KnibError::io("cannot size", out_name, e))?;
    let mut copy = Qcow2Image::from_source(name.as_str(), Arc::new(file))
        .map_err(|e| miswritten(&name, QEMU_IMG, format_args!("it does not open ({e})")))?;
    let want_backing = match what {
        Copied::Top => src.header().backing_file.clone(),
        Copied::TopOver(b) => Some(b.to_string()),
        Copied::Whole => None,
    };
    if copy.virtual_size() != src.virtual_size() || copy.header().backing_file != want_backing {
        return Err(miswritten(
            &name,
            QEMU_IMG,
            format_args!(
                "its header gives {} bytes and backing file {:?}, not {} and {:?}",
                copy.virtual_size(),
                copy.header().backing_file,
                src.virtual_size(),
                want_backing
            ),
        ));
    }
    // The copy's own backing chain, when it is not the source's.
    let mut own_layers = match what {
        Copied::Top => None,
        Copied::TopOver(b) => {
            let (top, mut below) = Chain::open_files_only(&crate::fsio::parent_dir(out_name).join(b))?.into_parts();
            below.insert(0, Layer::Qcow2(Box::new(top)));
            Some(below)
        }
        Copied::Whole => Some(Vec::new()),
    };
    // Of the source's backing files, those copied too.
    let whole = what == Copied::Whole;
    let step = format!("check of {name}");
    let size = src.virtual_size();
    let (scs, ccs) = (src.cluster_size(), copy.cluster_size());
    // Blocks of the larger cluster size (both are powers of two, so a
    // block holds whole clusters of each): one read of each file a block.
    let w = scs.max(ccs);
    let (mut a, mut b) = (vec![0u8; w as usize], vec![0u8; w as usize]);
    let of_copy = |e: KnibError| of_copy(&name, QEMU_IMG, e);
    let (mut off, mut compared, mut looked) = (0u64, 0u64, 0u64);
    while off < size {
        if looked.is_multiple_of(4096) {
            ctl.check(&step)?;
        }
        looked += 1;
        let mut skip = unmapped_end(&mut src, off)?.min(unmapped_end(&mut copy, off).map_err(of_copy)?);
        if whole {
            // Backing files, as reads go through them (QEMU's and knib's
            // alike): a read stops at a file past whose size it is, and
            // what lies below is not seen.
            let mut seen = size;
            for l in layers.iter_mut() {
                seen = seen.min(l.virtual_size());
                if off >= seen || skip <= off {
                    break;
                }
                skip = skip.min(layer_unmapped_end(l, off)?);
            }
        }
        // Whole blocks (a raw file's data may start anywhere): skipping
        // less is always safe.
        let skip = skip / w * w;
        if skip > off {
            off = skip;
            continue;
        }
        let end = (off + w).min(size);
        let mut held = owns(&mut src, off, end)? || owns(&mut copy, off, end).map_err(of_copy)?;
        if whole && !held {
            let mut seen = size;
            for l in layers.iter_mut() {
                seen = seen.min(l.virtual_size());
                if off >= seen {
                    break;
                }
                held = layer_owns(l, off, end.min(seen))?;
                if held {
                    break;
                }
            }
        }
        if held {
            let len = (end - off) as usize;
            src.read_with(off, &mut a[..len], &mut |o, buf| read_layers(&mut layers, o, buf))?;
            // An error of the backing files (the source's, or the copy's
            // own: files that were there before it) is theirs, not the
            // copy's.
            let mut below: Option<KnibError> = None;
            let copy_layers = own_layers.as_mut().unwrap_or(&mut layers);
            let r = copy.read_with(off, &mut b[..len], &mut |o, buf| {
                read_layers(copy_layers, o, buf).inspect_err(|e| below = Some(e.clone()))
            });
            if let Some(e) = below {
                return Err(e);
            }
            r.map_err(of_copy)?;
            if a[..len] != b[..len] {
                return Err(miswritten(
                    &name,
                    QEMU_IMG,
                    format_args!("its guest bytes at offset {off} differ from {}'s", src.name()),
                ));
            }
            compared += 1;
        }
        off = end;
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn qemu(args: &[&str]) {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A full backup's comparison of a disk over a sparse raw file (a
    /// template) reads the raw file's data, not its holes; and still finds
    /// data of the raw file the copy lacks, in a range where the disk and
    /// the copy have tables (400 MiB) and where they have none (1600 MiB).
    /// Before, every block up to the raw file's size was read and compared
    /// (32,768 blocks of this 2 GiB file).
    #[test]
    fn the_comparison_over_a_sparse_raw_file_reads_its_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let raw = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(p("base.raw")).unwrap();
        raw.set_len(2 << 30).unwrap();
        // Data in two places of the raw file, one under the top's data.
        raw.write_all_at(&[7u8; 200_000], 300 << 20).unwrap();
        raw.write_all_at(&[9u8; 4096], 5 << 20).unwrap();
        raw.sync_all().unwrap();
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", &p("base.raw"), &p("top.qcow2")]);
        qemu(&["qemu-io", "-c", "write -P 1 5M 64k", "-c", "write -P 2 700M 64k", &p("top.qcow2")]);
        qemu(&["qemu-img", "convert", "-O", "qcow2", &p("top.qcow2"), &p("copy.qcow2")]);
        let check = || {
            let out = std::fs::File::open(p("copy.qcow2")).unwrap();
            let src = Chain::open(Path::new(&p("top.qcow2"))).unwrap();
            check_guest_copy(src, &out, Path::new(&p("copy.qcow2")), Copied::Whole, &Control::new())
        };
        let compared = check().expect("a good copy");
        // The raw file's 200,000 bytes (4 blocks of 64 KiB, one more where
        // they straddle) and the top's two clusters.
        assert!((2..=8).contains(&compared), "{compared} blocks compared");
        // Data the copy lacks, put into the raw file's holes afterwards.
        for at in [400u64 << 20, 1600 << 20] {
            raw.write_all_at(&[5u8; 4096], at).unwrap();
            let e = check().expect_err("a copy that lacks data");
            assert_eq!(e.kind, crate::ErrorKind::Internal, "{e}");
            assert!(e.message.contains(&format!("its guest bytes at offset {at} differ")), "{e}");
            raw.write_all_at(&[0u8; 4096], at).unwrap();
        }
        check().expect("zeros again");
    }

    const SHAPE: DigestShape = DigestShape { cluster_size: 4, virtual_size: 10, zeros_count: true };

    /// The digest of data clusters (index, bytes).
    fn of(clusters: &[(u64, &[u8])]) -> ContentDigest {
        let mut d = ContentDigest::default();
        for (i, data) in clusters {
            d.add_data(&SHAPE, *i, data);
        }
        d
    }

    #[test]
    fn order_does_not_matter_and_index_kind_and_bytes_do() {
        let a = of(&[(0, b"abcd"), (1, b"efgh")]);
        assert_eq!(a, of(&[(1, b"efgh"), (0, b"abcd")]));
        assert_ne!(a, of(&[(0, b"efgh"), (1, b"abcd")]), "a cluster under another's index");
        assert_ne!(a, of(&[(0, b"abcd"), (1, b"efgi")]));
        let lost = of(&[(0, b"abcd")]);
        assert_ne!(a, lost);
        assert_eq!(lost.clusters(), 1);
        let mut zero_vs_gone = lost;
        zero_vs_gone.add_zeros(&SHAPE, 1, 1);
        assert_ne!(zero_vs_gone, lost, "zeros over a backing file count");
    }

    #[test]
    fn zeros_are_zeros_however_stored_and_the_tail_past_the_size_is_not_seen() {
        let mut flag = ContentDigest::default();
        flag.add_zeros(&SHAPE, 1, 2);
        let data = of(&[(1, &[0; 4]), (2, &[0, 0, 9, 9])]);
        assert_eq!(flag, data, "the last cluster's bytes past the virtual size (10) are not the guest's");
        let alone = DigestShape { zeros_count: false, ..SHAPE };
        let mut none = ContentDigest::default();
        none.add_zeros(&alone, 0, 3);
        none.add_data(&alone, 1, &[0; 4]);
        assert_eq!(none, ContentDigest::default(), "without a backing file zeros are nothing");
        assert_eq!(of(&[(2, b"xy\0\0")]), of(&[(2, b"xyzz")]));
    }
}
