//! The batches a native copy moves between its threads, and the
//! compression workers.
//!
//! # Invariants
//!
//! - A batch holds clusters in guest order; its buffers are recycled, so
//!   memory stays bounded (about 4 MiB of batches, see [`batch_plan`])
//!   whatever the disk size.
//! - A compressed cluster is kept only when it is smaller than a cluster;
//!   otherwise the cluster is written as it is.

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use parking_lot::Mutex;

use super::content::{is_zero, ContentDigest, DigestShape};
use super::direct::AlignedBuf;
use super::header::CompressionType;
use crate::error::{KnibError, Result};

/// One item of a batch: runs of guest clusters.
#[derive(Debug, Clone, Copy)]
pub(super) enum Item {
    /// `count` clusters from `index`, uncompressed, at `at` of the batch's data.
    Data { index: u64, count: u64, at: usize },
    /// Zero clusters.
    Zero { index: u64, count: u64 },
    /// One cluster, compressed, at `at..at + len` of the batch's output.
    Compressed { index: u64, at: usize, len: usize },
}

/// A batch of consecutive guest clusters.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) seq: u64,
    pub(super) items: Vec<Item>,
    /// Uncompressed clusters: the first `used` bytes (the buffer keeps its
    /// length from batch to batch, so it is not zeroed again). 4 KiB
    /// aligned, so that a raw output's O_DIRECT writes take it in place.
    pub(super) data: AlignedBuf,
    pub(super) used: usize,
    /// Compressed clusters: the first `out_used` bytes.
    pub(super) out: Vec<u8>,
    pub(super) out_used: usize,
    /// The guest clusters it covers end before this one.
    pub(super) end_index: u64,
    pub(super) read_bytes: u64,
    /// The content digest of the clusters a compression worker compressed
    /// (when the copy checks its output): the writer adds it to the copy's
    /// and empties it.
    pub(super) digest: ContentDigest,
}

impl Batch {
    /// Room for `len` more bytes of data: where they go.
    pub(super) fn grow(&mut self, len: usize) -> usize {
        let at = self.used;
        if self.data.len() < at + len {
            // Exactly: a doubling growth would leave batches up to twice
            // their planned size (memory bound: `batch_plan`).
            self.data.grow_to(at + len);
        }
        self.used += len;
        at
    }

    /// Room for up to `len` more compressed bytes: where they go.
    pub(super) fn grow_out(&mut self, len: usize) -> usize {
        let at = self.out_used;
        if self.out.len() < at + len {
            self.out.reserve_exact(at + len - self.out.len());
            self.out.resize(at + len, 0);
        }
        at
    }
}

/// Batches in flight and the data bytes of each: about 4 MiB in all (a
/// copy's whole memory stays under 32 MiB, process and libraries
/// included: issue 18; larger batches bought no speed, docs/performance.md).
pub(super) fn batch_plan(cs: u64, workers: usize) -> (usize, usize) {
    const BUDGET: u64 = 4 << 20;
    let in_flight = workers + 3;
    let per = if workers > 0 { BUDGET / (2 * in_flight as u64) } else { BUDGET / in_flight as u64 };
    let bytes = (per.min(4 << 20) / cs).max(1) * cs;
    (in_flight, bytes as usize)
}

/// The compressor of one worker: one context, reused for every cluster.
pub(crate) enum Compressor {
    Zstd(zstd::bulk::Compressor<'static>),
    Zlib(flate2::Compress),
}

/// zstd's default level for qcow2 clusters: 2, with the library's own
/// parameters for it.
///
/// QEMU uses the library's default, level 3. Measured cluster by cluster
/// (64 KiB frames, each compressed on its own as a qcow2 cluster is) on
/// the benchmark's image, on a tar of a Debian system's `/usr/lib` and
/// `/usr/share/doc` and on a tar of `/usr/bin`, `/usr/share`, `/etc` and a
/// Rust toolchain: level 2 takes 0.80x, 0.86x and 0.83x level 3's CPU, for
/// output 0.14%, 1.38% and 1.68% larger. A minimum match of 4 bytes (knib's
/// setting until then) cost 12% more CPU for output 0.54%, 1.23% and 1.82%
/// larger; larger hash tables bought at most 0.2% for 3% to 7% more CPU;
/// staying within 1% of level 3 on binaries takes the `dfast` strategy,
/// which costs what level 3 costs (docs/performance.md, "Compression").
/// A host that counts bytes in the store above CPU sets `KNIB_ZSTD_LEVEL`
/// ([`zstd_level`]). Any zstd decoder reads the frames; QEMU's does.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;

/// The environment variable that sets zstd's level for every compressed
/// output of the process ([`zstd_level`]).
pub const ZSTD_LEVEL_ENV: &str = "KNIB_ZSTD_LEVEL";

/// The levels `KNIB_ZSTD_LEVEL` takes: zstd's ordinary ones.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// The host's zstd level, read once per process from `KNIB_ZSTD_LEVEL`
/// ([`ZSTD_LEVEL_ENV`], 1 to 19); [`DEFAULT_ZSTD_LEVEL`] when it is unset.
/// On real files level 2 and QEMU's level 3 trade CPU for bytes (on a tar
/// of a Debian system's `/usr`: level 3 about 0.6x qemu-img's CPU for its
/// output size, level 2 0.51x for 1.5% more; docs/performance.md), so the
/// host chooses, as it chooses its write mode: the CLI, the C library and
/// the CloudStack agent's JNI all read it from their environment. It sets
/// every zstd compression on the native data path (backups compressed in
/// one pass, compression jobs, the bitmap method's copies); `qemu-img`
/// has no level and uses its own. A value that is not a level is logged
/// as a warning, once, and the default is used.
pub fn zstd_level() -> i32 {
    static LEVEL: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var(ZSTD_LEVEL_ENV) {
        Err(_) => DEFAULT_ZSTD_LEVEL,
        Ok(v) => match v.trim().parse::<i32>() {
            Ok(l) if ZSTD_LEVELS.contains(&l) => l,
            _ => {
                log::warn!(
                    "{ZSTD_LEVEL_ENV}={v:?} is not a zstd level ({} to {}); compressing at level {DEFAULT_ZSTD_LEVEL}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                );
                DEFAULT_ZSTD_LEVEL
            }
        },
    })
}

impl Compressor {
    pub(crate) fn new(t: CompressionType) -> Result<Self> {
        let zerr = |e: std::io::Error| KnibError::internal(format!("zstd compressor: {e}"));
        Ok(match t {
            CompressionType::Zstd => {
                let mut c = zstd::bulk::Compressor::new(zstd_level()).map_err(zerr)?;
                // One frame per cluster, as QEMU reads it; no checksum.
                c.include_checksum(false).map_err(zerr)?;
                Compressor::Zstd(c)
            }
            // QEMU reads raw deflate with a 4 KiB window (window bits 12).
            CompressionType::Zlib => {
                Compressor::Zlib(flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12))
            }
        })
    }

    /// Compress `src` (one cluster) into `dst`; `None` when it does not fit
    /// in `dst` (whose length is the most allowed).
    pub(crate) fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
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

/// A compression worker: turns the data items of batches into compressed,
/// zero or (when compression does not pay) uncompressed clusters. With
/// `digest`, each cluster it compresses is added to its batch's digest
/// from the bytes it compressed (the writer counts the others).
pub(super) fn compress_loop(
    work: Arc<Mutex<Receiver<Result<Batch>>>>,
    done: SyncSender<Result<Batch>>,
    ctype: CompressionType,
    cs: u64,
    zero_is_skip: bool,
    digest: Option<DigestShape>,
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
        let next = work.lock().recv();
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
                        if let Some(shape) = &digest {
                            batch.digest.add_data(shape, g, data);
                        }
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
