//! The qcow2 header (v2 and v3) and its header extensions, parsed from bytes.
//!
//! [`Header::parse`] is pure: it takes the first bytes of a file and the
//! file's length and either returns a header whose every offset and size is
//! known to be usable, or an error naming what was wrong. It never panics and
//! allocates at most the backing file name, the backing format name and the
//! feature name table (all bounded by the first cluster).

use crate::error::{KnibError, Result};

/// The qcow2 magic, "QFI\xfb", the first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];
/// The smallest cluster_bits the format allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// The largest cluster_bits this reader (and QEMU) accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest active L1 table this reader accepts, in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The longest backing file name the format allows, in bytes.
pub const MAX_BACKING_NAME: u64 = 1023;

/// Length of a v2 header; the fixed part every version has.
pub(crate) const V2_HEADER_LEN: usize = 72;
/// The smallest v3 header length.
const V3_MIN_HEADER_LEN: usize = 104;

/// Incompatible feature bit 0: the image was not closed cleanly.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found the image corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Auto-clear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// The most internal snapshots QEMU opens an image with.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The longest refcount table QEMU opens an image with, in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// The fixed part of a snapshot table entry, in bytes.
pub(crate) const SNAPSHOT_ENTRY_LEN: u64 = 40;
/// The most bitmaps QEMU accepts in the bitmaps extension.
pub const MAX_BITMAPS: u32 = 65535;
/// The largest bitmap directory QEMU accepts, in bytes.
pub const MAX_BITMAP_DIRECTORY: u64 = 1024 * MAX_BITMAPS as u64;
/// The longest backing format name QEMU reads from its extension.
const MAX_BACKING_FORMAT: u64 = 15;

/// How compressed clusters of an image are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951, no zlib header), type 0, the default.
    Zlib,
    /// One zstd frame per cluster, type 1 (v3 images only).
    Zstd,
}

impl CompressionType {
    /// The name QEMU uses ("zlib", "zstd").
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version: 2 or 3.
    pub version: u32,
    /// The backing file name as stored (not resolved), if any.
    pub backing_file: Option<String>,
    /// The backing file's format from the header extension ("qcow2",
    /// "raw", ...), if the image names one.
    pub backing_format: Option<String>,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual (guest-visible) size in bytes, as QEMU sees it: the header's
    /// size rounded down to a multiple of 512.
    pub size: u64,
    /// Number of entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table in the file.
    pub l1_table_offset: u64,
    /// Offset of the refcount table in the file.
    pub refcount_table_offset: u64,
    /// Number of clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots (not read by this reader).
    pub nb_snapshots: u32,
    /// Offset of the snapshot table (not read by this reader).
    pub snapshots_offset: u64,
    /// Incompatible feature bits (only dirty, corrupt and compression type
    /// can be set in an accepted header).
    pub incompatible_features: u64,
    /// Compatible feature bits (lazy refcounts; ignored for reading).
    pub compatible_features: u64,
    /// Auto-clear feature bits (bitmaps; ignored for reading).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression_type: CompressionType,
    /// The bitmaps extension, when the image has one (its bitmaps are in
    /// use only while auto-clear bit 0 is set).
    pub bitmaps: Option<BitmapsExt>,
}

/// The bitmaps header extension: where the bitmap directory lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory (1 to 65535).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(name: &str, what: impl std::fmt::Display) -> KnibError {
    KnibError::corrupt(format!("qcow2 image {name}: {what}"))
}

fn unsupported(name: &str, what: impl std::fmt::Display) -> KnibError {
    KnibError::invalid(format!("qcow2 image {name}: {what}"))
}

/// A table of `len` bytes at `offset` lies wholly inside a file of `file_len` bytes.
fn within(offset: u64, len: u64, file_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= file_len)
}

impl Header {
    /// Parse and validate the header of the file called `name` (used in
    /// error messages) from `prefix`, the first bytes of the file, and
    /// `file_len`, the file's length.
    ///
    /// `prefix` should hold the file's first cluster (or the whole file when
    /// it is shorter); [`header_prefix_len`] tells how much that is once the
    /// first 24 bytes are known. Header extensions or a backing file name
    /// that run past `prefix` are reported as a truncated header.
    ///
    /// Errors: [`crate::ErrorKind::InvalidInput`] for a file that is not
    /// qcow2 or uses a feature this reader refuses (encryption, external data
    /// file, extended L2 entries, unknown incompatible features, an unknown
    /// version or compression type, clusters over 2 MiB);
    /// [`crate::ErrorKind::Corrupt`] for anything that breaks the format.
    pub fn parse(name: &str, prefix: &[u8], file_len: u64) -> Result<Header> {
        let prefix = &prefix[..prefix.len().min(usize::try_from(file_len).unwrap_or(usize::MAX))];
        if prefix.len() >= 4 && prefix[..4] != MAGIC {
            return Err(unsupported(name, format!("not a qcow2 image (bad magic {:02x?})", &prefix[..4])));
        }
        if prefix.len() < V2_HEADER_LEN {
            return Err(corrupt(
                name,
                format!("truncated header: {} bytes, a qcow2 header needs at least {V2_HEADER_LEN}", prefix.len()),
            ));
        }
        let version = be32(prefix, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(name, format!("unsupported qcow2 version {version} (only 2 and 3)")));
        }
        let cluster_bits = be32(prefix, 20);
        if cluster_bits < MIN_CLUSTER_BITS {
            return Err(corrupt(name, format!("cluster_bits {cluster_bits} is below the minimum {MIN_CLUSTER_BITS}")));
        }
        if cluster_bits > MAX_CLUSTER_BITS {
            return Err(unsupported(
                name,
                format!("cluster_bits {cluster_bits} is not supported (at most {MAX_CLUSTER_BITS}, 2 MiB clusters)"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;

        let (header_length, incompatible_features, compatible_features, autoclear_features, refcount_order) =
            if version == 2 {
                (V2_HEADER_LEN as u32, 0, 0, 0, 4)
            } else {
                if prefix.len() < V3_MIN_HEADER_LEN {
                    return Err(corrupt(
                        name,
                        format!(
                            "truncated header: {} bytes, a version 3 header needs at least {V3_MIN_HEADER_LEN}",
                            prefix.len()
                        ),
                    ));
                }
                let hl = be32(prefix, 100);
                if (hl as usize) < V3_MIN_HEADER_LEN || !hl.is_multiple_of(8) || u64::from(hl) > cluster_size {
                    return Err(corrupt(
                        name,
                        format!(
                            "header_length {hl} is invalid (a multiple of 8 from {V3_MIN_HEADER_LEN} to the \
                             cluster size {cluster_size})"
                        ),
                    ));
                }
                if prefix.len() < hl as usize {
                    return Err(corrupt(
                        name,
                        format!("truncated header: {} bytes, header_length says {hl}", prefix.len()),
                    ));
                }
                (hl, be64(prefix, 72), be64(prefix, 80), be64(prefix, 88), be32(prefix, 96))
            };
        if refcount_order > 6 {
            return Err(corrupt(name, format!("refcount_order {refcount_order} is over the maximum 6")));
        }

        let crypt_method = be32(prefix, 32);
        if crypt_method != 0 {
            let what = match crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(unsupported(
                name,
                format!("encrypted images are not supported (crypt_method {crypt_method}, {what})"),
            ));
        }

        // Header extensions: from the end of the header to the backing file
        // name (or the end of the first cluster).
        let backing_file_offset = be64(prefix, 8);
        let backing_file_size = be32(prefix, 16);
        let ext_end = if backing_file_offset != 0 { backing_file_offset.min(cluster_size) } else { cluster_size };
        let mut backing_format = None;
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        let mut has_data_file_ext = false;
        let mut bitmaps = None;
        let mut pos = u64::from(header_length);
        while pos < ext_end {
            // An extension's 8-byte header must fit in the area, as QEMU
            // has it ("Header extension too large").
            if pos + 8 > ext_end {
                return Err(corrupt(
                    name,
                    format!("header extension at {pos} runs past the end of the header area ({ext_end})"),
                ));
            }
            if pos + 8 > prefix.len() as u64 {
                return Err(corrupt(name, format!("header extensions run past the end of the file at {pos}")));
            }
            let p = pos as usize;
            let ty = be32(prefix, p);
            let len = u64::from(be32(prefix, p + 4));
            if ty == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start + len; // both under 2^33: no overflow
            if data_end > ext_end {
                return Err(corrupt(
                    name,
                    format!(
                        "header extension {ty:#010x} at {pos} ({len} bytes) runs past the end of the header area \
                         ({ext_end})"
                    ),
                ));
            }
            if data_end > prefix.len() as u64 {
                return Err(corrupt(
                    name,
                    format!("header extension {ty:#010x} at {pos} runs past the end of the file"),
                ));
            }
            let data = &prefix[data_start as usize..data_end as usize];
            match ty {
                EXT_BACKING_FORMAT => {
                    if len > MAX_BACKING_FORMAT {
                        return Err(corrupt(
                            name,
                            format!(
                                "backing format extension of {len} bytes is too long (at most {MAX_BACKING_FORMAT})"
                            ),
                        ));
                    }
                    let s = std::str::from_utf8(data)
                        .map_err(|_| corrupt(name, "backing format name is not UTF-8"))?
                        .trim_end_matches('\0');
                    backing_format = Some(s.to_string());
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        let raw = &entry[2..];
                        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        feature_names.push((entry[0], entry[1], String::from_utf8_lossy(&raw[..end]).into_owned()));
                    }
                }
                EXT_DATA_FILE => has_data_file_ext = true,
                // QEMU refuses the image (only LUKS has it); encrypted
                // images are refused before this.
                EXT_CRYPTO => {
                    return Err(corrupt(name, "CRYPTO header extension without LUKS encryption".to_string()));
                }
                // QEMU ignores the extension (the bitmaps are stale) while
                // the auto-clear bit is clear; it checks only its length.
                EXT_BITMAPS if autoclear_features & AUTOCLEAR_BITMAPS == 0 => match data.len() {
                    24 => {}
                    n => return Err(corrupt(name, format!("bitmaps extension of {n} bytes (it has 24)"))),
                },
                EXT_BITMAPS => bitmaps = Some(parse_bitmaps_ext(name, data, cluster_size)?),
                _ => {}
            }
            pos = data_end.div_ceil(8) * 8;
        }

        // Incompatible features: refuse what this reader cannot honour.
        let feature_name = |bit: u32| {
            feature_names
                .iter()
                .find(|(ty, b, _)| *ty == 0 && u32::from(*b) == bit)
                .map(|(_, _, n)| format!(" \"{n}\""))
                .unwrap_or_default()
        };
        let unknown = incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> =
                (0..64).filter(|b| unknown & (1u64 << b) != 0).map(|b| format!("bit {b}{}", feature_name(b))).collect();
            return Err(unsupported(name, format!("unknown incompatible features: {}", bits.join(", "))));
        }
        if incompatible_features & INCOMPAT_DATA_FILE != 0 || has_data_file_ext {
            return Err(unsupported(name, "images with an external data file are not supported"));
        }
        if incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(unsupported(name, "extended L2 entries (subclusters) are not supported"));
        }

        // Compression type: byte 104 when the header is long enough.
        let ctype = if header_length as usize > V3_MIN_HEADER_LEN { prefix[V3_MIN_HEADER_LEN] } else { 0 };
        let compression_type = match ctype {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            t => return Err(unsupported(name, format!("unknown compression type {t}"))),
        };
        let bit = incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit != (ctype != 0) {
            return Err(corrupt(
                name,
                format!(
                    "compression type {} does not match the compression type feature bit ({})",
                    compression_type.as_str(),
                    if bit { "set" } else { "clear" }
                ),
            ));
        }

        // Backing file name: inside the first cluster and the file.
        let backing_file = if backing_file_offset != 0 {
            let len = u64::from(backing_file_size);
            if len == 0 || len > MAX_BACKING_NAME {
                return Err(corrupt(
                    name,
                    format!("backing file name length {len} is invalid (1 to {MAX_BACKING_NAME})"),
                ));
            }
            if backing_file_offset < u64::from(header_length) || !within(backing_file_offset, len, cluster_size) {
                return Err(corrupt(
                    name,
                    format!(
                        "backing file name at {backing_file_offset} ({len} bytes) is outside the header cluster \
                         ({cluster_size} bytes)"
                    ),
                ));
            }
            if !within(backing_file_offset, len, prefix.len() as u64) {
                return Err(corrupt(name, "backing file name runs past the end of the file"));
            }
            let raw = &prefix[backing_file_offset as usize..(backing_file_offset + len) as usize];
            // No path holds one (QEMU would take the name as cut there).
            if let Some(i) = raw.iter().position(|&b| b == 0) {
                return Err(corrupt(name, format!("backing file name has a NUL byte at {i}")));
            }
            let s = std::str::from_utf8(raw).map_err(|_| unsupported(name, "backing file name is not UTF-8"))?;
            Some(s.to_string())
        } else {
            None
        };

        // QEMU sees whole 512-byte sectors: a size that is not a multiple
        // of 512 reads (and is reported) rounded down.
        let size = be64(prefix, 24) & !511;
        let l1_size = be32(prefix, 36);
        let l1_table_offset = be64(prefix, 40);
        let refcount_table_offset = be64(prefix, 48);
        let refcount_table_clusters = be32(prefix, 56);
        let nb_snapshots = be32(prefix, 60);
        let snapshots_offset = be64(prefix, 64);

        // L1 table: bounded, big enough for the virtual size, aligned, in the file.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(
                name,
                format!("L1 table of {l1_size} entries is over the limit of {} entries", MAX_L1_BYTES / 8),
            ));
        }
        let span = cluster_size * (cluster_size / 8); // guest bytes per L1 entry
        let needed = size / span + u64::from(!size.is_multiple_of(span));
        if needed > u64::from(l1_size) {
            return Err(corrupt(
                name,
                format!("L1 table has {l1_size} entries but the virtual size {size} needs {needed}"),
            ));
        }
        if !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(name, format!("L1 table offset {l1_table_offset} is not cluster aligned")));
        }
        if l1_size > 0 && (l1_table_offset < cluster_size || !within(l1_table_offset, l1_bytes, file_len)) {
            return Err(corrupt(
                name,
                format!(
                    "L1 table at {l1_table_offset} ({l1_size} entries) is outside the file ({file_len} bytes) or \
                     in the header cluster"
                ),
            ));
        }

        // Refcount table: not used for reading, but a sign of a sane file.
        if !refcount_table_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(name, format!("refcount table offset {refcount_table_offset} is not cluster aligned")));
        }
        let rt_bytes = u64::from(refcount_table_clusters) << cluster_bits;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(
                name,
                format!(
                    "refcount table of {refcount_table_clusters} clusters is over the limit of \
                     {MAX_REFCOUNT_TABLE_BYTES} bytes"
                ),
            ));
        }
        if refcount_table_clusters == 0 || !within(refcount_table_offset, rt_bytes, file_len) {
            return Err(corrupt(
                name,
                format!(
                    "refcount table at {refcount_table_offset} ({refcount_table_clusters} clusters) is empty or \
                     outside the file ({file_len} bytes)"
                ),
            ));
        }

        // Snapshot table: QEMU's limits, aligned, inside the file.
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(name, format!("{nb_snapshots} snapshots are over the limit of {MAX_SNAPSHOTS}")));
        }
        if !snapshots_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(name, format!("snapshot table offset {snapshots_offset} is not cluster aligned")));
        }
        if nb_snapshots > 0
            && (snapshots_offset < cluster_size
                || !within(snapshots_offset, u64::from(nb_snapshots) * SNAPSHOT_ENTRY_LEN, file_len))
        {
            return Err(corrupt(
                name,
                format!(
                    "snapshot table at {snapshots_offset} ({nb_snapshots} snapshots) is outside the file \
                     ({file_len} bytes) or in the header cluster"
                ),
            ));
        }
        if let Some(b) = &bitmaps {
            if b.directory_offset < cluster_size || !within(b.directory_offset, b.directory_size, file_len) {
                return Err(corrupt(
                    name,
                    format!(
                        "bitmap directory at {} ({} bytes) is outside the file ({file_len} bytes) or in the header \
                         cluster",
                        b.directory_offset, b.directory_size
                    ),
                ));
            }
        }

        Ok(Header {
            version,
            backing_file,
            backing_format,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            bitmaps,
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Number of entries of one L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Number of guest clusters covering the virtual size (the last one may
    /// be partly past the virtual size).
    pub fn guest_clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size())
    }

    /// Whether the image is marked dirty (not closed cleanly: its refcounts
    /// may be stale). Reading is still correct; writing would need a repair.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether QEMU marked the image corrupt (incompatible bit 1). Reading
    /// goes on; every structure read is still checked.
    pub fn is_marked_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
}

/// The bitmaps extension's data, checked as QEMU checks it on open.
fn parse_bitmaps_ext(name: &str, data: &[u8], cluster_size: u64) -> Result<BitmapsExt> {
    if data.len() != 24 {
        return Err(corrupt(name, format!("bitmaps extension of {} bytes (it has 24)", data.len())));
    }
    let nb_bitmaps = be32(data, 0);
    let reserved = be32(data, 4);
    let directory_size = be64(data, 8);
    let directory_offset = be64(data, 16);
    if reserved != 0 {
        return Err(corrupt(name, "bitmaps extension: reserved field is not zero"));
    }
    if nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS {
        return Err(corrupt(name, format!("bitmaps extension: {nb_bitmaps} bitmaps (1 to {MAX_BITMAPS})")));
    }
    if directory_size == 0 || directory_size > MAX_BITMAP_DIRECTORY {
        return Err(corrupt(
            name,
            format!("bitmaps extension: directory size {directory_size} (1 to {MAX_BITMAP_DIRECTORY})"),
        ));
    }
    if !directory_offset.is_multiple_of(cluster_size) {
        return Err(corrupt(
            name,
            format!("bitmaps extension: directory offset {directory_offset} is not cluster aligned"),
        ));
    }
    Ok(BitmapsExt { nb_bitmaps, directory_size, directory_offset })
}

/// The header of the open file `file` (called `path` in messages): its
/// first cluster read and given to [`Header::parse`]. Errors: Io for a
/// failed read, and those of [`Header::parse`].
pub fn read_header(file: &std::fs::File, path: &std::path::Path) -> Result<Header> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map_err(|e| KnibError::io("cannot stat", path, e))?.len();
    let mut start = [0u8; 24];
    let n = file.read_at(&mut start, 0).map_err(|e| KnibError::io("cannot read", path, e))?;
    let mut prefix = vec![0u8; header_prefix_len(&start[..n], len)];
    file.read_exact_at(&mut prefix, 0).map_err(|e| KnibError::io("cannot read", path, e))?;
    Header::parse(&path.display().to_string(), &prefix, len)
}

/// The qcow2 header of `path` when it is a regular file that can be opened
/// and read as qcow2; `None` otherwise (missing, unreadable, a link when
/// `no_follow`, a special file: opened without blocking and never read, so
/// a FIFO does not wait for a writer). For the checks that look at files a
/// step will read later, which reports what is wrong with them.
pub(crate) fn header_of_regular_file(path: &std::path::Path, no_follow: bool) -> Option<Header> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_NONBLOCK | if no_follow { libc::O_NOFOLLOW } else { 0 };
    let f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).ok()?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return None;
    }
    read_header(&f, path).ok()
}

/// How many leading bytes of a file [`Header::parse`] wants, given its first
/// bytes `start` (at least 24 of them to know the cluster size) and the
/// file's length: the first cluster, or the whole file when it is shorter.
pub fn header_prefix_len(start: &[u8], file_len: u64) -> usize {
    let bits = if start.len() >= 24 { be32(start, 20).clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS) } else { 12 };
    // At most 2 MiB: fits in usize everywhere.
    (1u64 << bits).min(file_len) as usize
}
