//! Native qcow2: a reader (headers v2 and v3, cluster lookups, compressed
//! clusters in zlib and zstd, refcounts, backing chains of qcow2 or raw
//! files), a streaming writer of qcow2 version 3 images, the one-pass
//! data path built on both ([`copy_image`]: delta copies, compression,
//! flattening to qcow2 or raw), and the in-place merge of an image into its
//! backing file ([`Commit`]; what it checks before it writes and its write
//! order are documented there).
//!
//! Written from QEMU's format specification (docs/interop/qcow2.txt). Reads
//! stream: a few 16 KiB chunks of each file's L1 table, read as they are
//! used (64 KiB a file whatever its virtual size, so a chain of 64 files
//! claiming 2 PiB each holds 4 MiB of them, not 2 GiB), a small LRU cache
//! of L2 tables (about 1 MiB, 2 to 64 tables, shared by a chain's layers),
//! and the last decompressed cluster. An L2 entry of 0 maps nothing, as a
//! range without a table: loops over guest clusters step from one entry
//! that is not 0 to the next, found through a summary of each cached
//! table (a bit per 64 entries), and a range without a table or with a
//! table of zeros in one go (a crafted image of millions of L1 entries
//! naming one table of zeros, or one with a single entry set, is not
//! walked cluster by cluster).
//!
//! # What the writer writes ([`Layout`])
//!
//! Version 3, no encryption, no external data file, no snapshots, no
//! bitmaps, clean (the dirty bit is never set: the file is written under a
//! temporary name and renamed once complete). The cluster size is the
//! source's (512 bytes to 2 MiB; 64 KiB is QEMU's default), refcount_order
//! 4 (16-bit refcounts), header_length 112 with the compression type byte
//! (0 zlib, 1 zstd; zstd also sets incompatible bit 3), then the backing
//! format extension ("qcow2") when there is a backing file, the end of the
//! extensions, and the backing file name, all in cluster 0.
//!
//! The file is produced front to back, in guest order:
//!
//! ```text
//! cluster 0                      header
//! for each L2 range, in order:   its data clusters, then its L2 table
//!   (before an L2 table: every refcount block whose whole range of host
//!    clusters now lies behind)
//! tail                           L1 table, refcount table, last refcount blocks
//! ```
//!
//! Invariants kept (what `qemu-img check` verifies, and
//! [`Qcow2Image::check_refcounts`] too):
//!
//! - Every host cluster in the file is referenced, and its stored refcount
//!   is exactly the number of references: 1 for the header, each L1, L2
//!   and refcount table cluster, each refcount block and each uncompressed
//!   data cluster; for a cluster holding compressed data, the number of
//!   compressed descriptors whose range (from their offset to the end of
//!   their last 512-byte sector) touches it. No cluster is leaked; a
//!   cluster that would need a refcount above 65535 is never shared again
//!   (the writer moves to the next cluster).
//! - L1 entries and uncompressed L2 entries have the copied flag (bit 63),
//!   as their refcount is 1; compressed entries never do.
//! - Uncompressed data, L2 tables, the L1 table, the refcount table and
//!   blocks are cluster aligned. Compressed data is packed byte after byte
//!   (a descriptor may span two host clusters, as the format allows), each
//!   strictly shorter than a cluster (else the cluster is stored
//!   uncompressed), one zstd frame or one raw deflate stream with a 4 KiB
//!   window (what QEMU inflates with) per cluster; the sector count is
//!   `(offset + length - 1) / 512 - offset / 512`.
//! - Zero clusters are the L2 zero flag alone (no host cluster); L2 tables
//!   whose range holds nothing are not written (their L1 entry is 0).
//! - The refcount table covers every refcount block, and the blocks cover
//!   every cluster of the file (they cover themselves and the tail).
//!
//! Outputs (qcow2 and raw) are written through the page cache, each chunk
//! sent to the device as it is written and dropped from the cache once
//! there (`behind`); [`WriteMode`] can ask for O_DIRECT writes made by I/O
//! threads (`direct`) or plain buffered ones. The bytes are the same
//! whichever way.
//!
//! Memory is bounded whatever the disk size: one L2 table, the L1 table
//! (8 bytes per 512 MiB of disk with 64 KiB clusters), the refcounts of the
//! clusters not yet covered by an emitted refcount block, and one entry per
//! refcount block emitted.
//!
//! # What is read and what is refused
//!
//! - [`Header::parse`]: magic `QFI\xfb`; version 2 or 3 (others refused);
//!   cluster_bits 9..=21 (below 9 is corrupt, above 21 refused as QEMU does);
//!   v3 header_length a multiple of 8 from 104 to the cluster size;
//!   refcount_order at most 6; the compression type (byte 104, present when
//!   header_length > 104: 0 zlib, 1 zstd, others refused) agreeing with
//!   incompatible bit 3. Refused: encryption (crypt_method != 0), an
//!   external data file (bit 2 or its extension), extended L2 entries
//!   (bit 4), and any unknown incompatible bit (named from the feature name
//!   table when the image has one). Accepted and reported: dirty (bit 0,
//!   [`Header::is_dirty`]) and QEMU's corrupt mark (bit 1). Compatible and
//!   auto-clear bits, snapshots and bitmaps are ignored for reading (the
//!   merge refuses or keeps them, see [`Commit`]). The virtual size is the
//!   header's rounded down to a multiple of 512, as QEMU reads it.
//! - Header extensions lie between the header and the backing file name (or
//!   the end of the first cluster), each within that area; the backing
//!   format comes from extension 0xe2792aca (at most 15 bytes, as QEMU
//!   reads it); the bitmaps extension (0x23852875) is 24 bytes, and while
//!   auto-clear bit 0 is set names 1 to 65535 bitmaps and a directory of at
//!   most 64 MiB, cluster aligned, inside the file, past the header cluster.
//! - The backing file name: 1 to 1023 bytes of UTF-8, inside the first
//!   cluster, after the header.
//!
//! # On-disk invariants checked (a violation is a Corrupt error naming the file)
//!
//! - The header, its extensions and the backing name are inside the file.
//! - The active L1 table has at most 4 Mi entries (32 MiB, QEMU's limit),
//!   enough entries for the virtual size, a cluster-aligned offset past the
//!   header cluster, and lies wholly inside the file. Only the entries that
//!   cover the virtual size are loaded (so memory is bounded by the file
//!   size and by 32 MiB). The refcount table is non-empty, at most 8 MiB
//!   (QEMU's limit), aligned and in the file (it is not otherwise read).
//! - The snapshot table: at most 65536 snapshots (QEMU's limit), a cluster
//!   aligned offset, and when there are snapshots, past the header cluster
//!   with room for their fixed-size entries inside the file (the table is
//!   not otherwise read).
//! - L1 entries: reserved bits (0-8, 56-62) clear; an L2 table offset (bits
//!   9-55) is 0 (unallocated) or cluster aligned, past the header cluster,
//!   and the whole table inside the file.
//! - Standard L2 entries: reserved bits (1-8, 56-61) clear; the zero flag
//!   (bit 0) only in v3 images (it wins over any preallocated offset); a data
//!   offset that is cluster aligned, past the header cluster and starts
//!   inside the file (a tail past the end of file reads as zeros, as QEMU
//!   reads it); offset 0 with the copied flag (external data files only) is
//!   corrupt. The copied flag (bit 63) is otherwise ignored.
//! - Compressed L2 entries (bit 62): with x = 62 - (cluster_bits - 8), the
//!   offset is bits 0..x (below 2^56, past the header cluster, inside the
//!   file) and bits x..=61 count the 512-byte sectors after the first; the
//!   covered range may overhang the end of the file only within its last
//!   sector. It is at most two clusters long by construction. The data must
//!   decompress (raw deflate, or one zstd frame with a window of at most
//!   8 MiB) to at least one whole cluster; exactly one cluster is used.
//! - Chains: at most [`MAX_CHAIN_DEPTH`] files, no file twice (compared by
//!   device and inode, so symlinks and hard links count), relative names
//!   resolved against the naming image's directory, formats qcow2 or raw
//!   (probed by magic when not named).
//!
//! No input makes this module panic or allocate without bound: every size
//! taken from a file is checked before it sizes a buffer (at most 2 MiB for
//! a header cluster or an L2 table, 4 MiB for compressed input, 16 KiB
//! chunks of an L1 table read for lookups, 32 MiB for a whole table read
//! by the checks and the merge, and never more than the file holds).

mod behind;
mod chain;
mod check;
mod commit;
mod commit_base;
mod compressed;
mod content;
mod copy;
mod copy_batch;
mod copy_read;
mod direct;
mod empty;
mod guard;
mod header;
mod image;
mod sink;
mod source;
mod srchash;
#[cfg(test)]
mod tests;
mod writer;

pub(crate) use behind::WriteBehind;
pub use chain::{relative_pointer, Chain, Layer, RawImage, MAX_CHAIN_DEPTH};
pub use check::RefcountCheck;
pub use commit::Commit;
pub use commit_base::CommitReport;
#[cfg(feature = "libvirt")]
pub(crate) use content::check_written;
pub(crate) use content::{check_guest_copy, Copied};
pub use content::{image_digest, ContentDigest, DigestShape};
#[cfg(feature = "libvirt")]
pub(crate) use copy::auto_threads;
pub use copy::{copy_image, copy_image_to_sink, CopyOptions, CopyReport, SinkCopy, TargetFormat, MAX_AUTO_THREADS};
pub(crate) use copy::{copy_image_to, Output};
#[cfg(feature = "libvirt")]
pub(crate) use copy_batch::Compressor;
pub use copy_batch::{zstd_level, DEFAULT_ZSTD_LEVEL, ZSTD_LEVELS, ZSTD_LEVEL_ENV};
pub use copy_read::SourceMode;
pub use direct::{WriteMode, WRITE_MODE_ENV};
pub use empty::{empty_image, empty_image_bytes};
#[doc(hidden)]
pub use guard::scan_file;
pub(crate) use header::header_of_regular_file;
pub use header::{
    header_prefix_len, read_header, BitmapsExt, CompressionType, Header, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
};
pub use image::{ClusterState, Qcow2Image};
pub use sink::{CountSink, FileSink, Sink};
pub use source::{FileSource, ReadAt};
pub use srchash::SourceHash;
pub use writer::{header_cluster, BackingRef, ImageSpec, Layout, WriteSummary, REFCOUNT_ORDER};
