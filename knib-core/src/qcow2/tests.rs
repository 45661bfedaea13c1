//! Unit tests of the qcow2 reader on images built in memory: every kind of
//! cluster, each header and table check, and a seeded mutation run (no
//! input may panic).

use super::*;
use crate::error::ErrorKind;

const COPIED: u64 = 1 << 63;

/// What one guest cluster of a built image holds.
#[derive(Clone)]
enum Entry {
    Data(Vec<u8>),
    Zero,
    /// Already compressed bytes.
    Compressed(Vec<u8>),
    /// An L2 entry written as is.
    Raw(u64),
}

/// Builds small qcow2 images in memory, laid out as: header cluster,
/// refcount table, L1 table, L2 tables, data clusters, compressed data.
#[derive(Clone)]
struct Builder {
    version: u32,
    bits: u32,
    size: u64,
    compression: u8,
    incompat: u64,
    backing: Option<String>,
    entries: Vec<(u64, Entry)>,
}

impl Builder {
    fn new(version: u32, bits: u32, size: u64) -> Self {
        Builder { version, bits, size, compression: 0, incompat: 0, backing: None, entries: Vec::new() }
    }

    fn with(mut self, cluster: u64, e: Entry) -> Self {
        self.entries.push((cluster, e));
        self
    }

    fn zstd(mut self) -> Self {
        self.compression = 1;
        self.incompat |= INCOMPAT_COMPRESSION;
        self
    }

    fn build(&self) -> Vec<u8> {
        let cs = 1u64 << self.bits;
        let l2_entries = cs / 8;
        let l1_size = self.size.div_ceil(cs * l2_entries).max(1);
        let l1_off = 2 * cs;
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let mut file = vec![0u8; ((2 + l1_clusters) * cs) as usize];
        let put64 =
            |f: &mut Vec<u8>, at: u64, v: u64| f[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
        let put32 =
            |f: &mut Vec<u8>, at: u64, v: u32| f[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
        let alloc = |f: &mut Vec<u8>| {
            let at = f.len() as u64;
            f.resize(f.len() + cs as usize, 0);
            at
        };
        let mut l2_of = std::collections::BTreeMap::new();
        let mut l2_offset = |f: &mut Vec<u8>, cluster: u64| -> u64 {
            let l1i = cluster / l2_entries;
            *l2_of.entry(l1i).or_insert_with(|| {
                let at = alloc(f);
                put64(f, l1_off + l1i * 8, at | COPIED);
                at
            })
        };
        let x = 62 - (self.bits - 8);
        for pass in 0..2 {
            for (cluster, e) in &self.entries {
                let slot = l2_offset(&mut file, *cluster) + (cluster % l2_entries) * 8;
                let v = match (pass, e) {
                    (0, Entry::Data(d)) => {
                        let at = alloc(&mut file);
                        file[at as usize..at as usize + d.len()].copy_from_slice(d);
                        at | COPIED
                    }
                    (0, Entry::Zero) => 1,
                    (0, Entry::Raw(v)) => *v,
                    (1, Entry::Compressed(c)) => {
                        let at = file.len() as u64;
                        file.extend_from_slice(c);
                        let extra = ((at + c.len() as u64 - 1) >> 9) - (at >> 9);
                        (1 << 62) | (extra << x) | at
                    }
                    _ => continue,
                };
                put64(&mut file, slot, v);
            }
        }
        // Header.
        file[..4].copy_from_slice(&MAGIC);
        put32(&mut file, 4, self.version);
        put32(&mut file, 20, self.bits);
        put64(&mut file, 24, self.size);
        put32(&mut file, 36, l1_size as u32);
        put64(&mut file, 40, l1_off);
        put64(&mut file, 48, cs);
        put32(&mut file, 56, 1);
        let hl: u64 = if self.version == 2 { 72 } else { 112 };
        if self.version == 3 {
            put64(&mut file, 72, self.incompat);
            put32(&mut file, 96, 4);
            put32(&mut file, 100, hl as u32);
            file[104] = self.compression;
        }
        // Extensions: just the end marker, then the backing name.
        if let Some(b) = &self.backing {
            let at = hl + 8;
            put64(&mut file, 8, at);
            put32(&mut file, 16, b.len() as u32);
            file[at as usize..at as usize + b.len()].copy_from_slice(b.as_bytes());
        }
        file
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn open(bytes: Vec<u8>) -> crate::Result<Qcow2Image> {
    Qcow2Image::from_bytes("mem.qcow2", bytes)
}

#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: crate::Result<T>, kind: ErrorKind, needle: &str) {
    match r {
        Ok(v) => panic!("expected {kind} error containing {needle:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.message.contains(needle), "{e} does not contain {needle:?}");
            assert!(e.message.contains("mem.qcow2"), "{e} does not name the file");
        }
    }
}

fn read_all(img: &mut Qcow2Image) -> crate::Result<Vec<u8>> {
    let mut out = vec![0u8; img.virtual_size() as usize];
    img.read_at(0, &mut out)?;
    Ok(out)
}

/// A v3 image of 64 KiB clusters with every kind of cluster.
fn mixed(b: Builder, compressor: fn(&[u8]) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let cs = 1usize << b.bits;
    // QEMU reads whole 512-byte sectors: an odd size is rounded down.
    let size = (b.size & !511) as usize;
    let d0 = pattern(1, cs);
    let d3 = pattern(3, cs);
    let c5 = pattern(5, cs);
    let b = b
        .with(0, Entry::Data(d0.clone()))
        .with(2, Entry::Zero)
        .with(3, Entry::Data(d3.clone()))
        .with(5, Entry::Compressed(compressor(&c5)))
        .with(6, Entry::Compressed(compressor(&vec![0x5a; cs])));
    let mut expect = vec![0u8; size];
    expect[..cs].copy_from_slice(&d0);
    expect[3 * cs..4 * cs].copy_from_slice(&d3);
    expect[5 * cs..6 * cs].copy_from_slice(&c5);
    let end = (7 * cs).min(size);
    expect[6 * cs..end].fill(0x5a);
    (b.build(), expect)
}

#[test]
fn reads_every_kind_of_cluster_zlib() {
    let (bytes, expect) = mixed(Builder::new(3, 16, 10 * 65536 + 1000), deflate);
    let mut img = open(bytes).unwrap();
    assert_eq!(img.guest_clusters(), 11);
    assert_eq!(img.header().compression_type, CompressionType::Zlib);
    assert!(matches!(img.cluster_state(0).unwrap(), ClusterState::Data { host_offset } if host_offset % 65536 == 0));
    assert_eq!(img.cluster_state(1).unwrap(), ClusterState::Unallocated);
    assert_eq!(img.cluster_state(2).unwrap(), ClusterState::Zero);
    assert!(matches!(img.cluster_state(5).unwrap(), ClusterState::Compressed { .. }));
    assert_eq!(img.cluster_state(10).unwrap(), ClusterState::Unallocated);
    expect_err(img.cluster_state(11), ErrorKind::InvalidInput, "past the virtual size");
    assert_eq!(read_all(&mut img).unwrap(), expect);
    // Unaligned pieces across cluster kinds.
    let mut rng = XorShift(99);
    for _ in 0..200 {
        let off = rng.next() % expect.len() as u64;
        let len = (rng.next() % 200_000).min(expect.len() as u64 - off) as usize;
        let mut buf = vec![1u8; len];
        img.read_at(off, &mut buf).unwrap();
        assert!(buf == expect[off as usize..off as usize + len], "at {off}+{len}");
    }
}

#[test]
fn reads_every_kind_of_cluster_zstd() {
    let (bytes, expect) = mixed(Builder::new(3, 16, 7 * 65536).zstd(), |d| zstd::bulk::compress(d, 3).unwrap());
    let mut img = open(bytes).unwrap();
    assert_eq!(img.header().compression_type, CompressionType::Zstd);
    assert_eq!(read_all(&mut img).unwrap(), expect);
}

#[test]
fn small_clusters_and_v2() {
    let (bytes, expect) = mixed(Builder::new(3, 9, 40 * 512 + 17), deflate);
    assert_eq!(read_all(&mut open(bytes).unwrap()).unwrap(), expect);
    let b = Builder::new(2, 12, 3 * 4096).with(1, Entry::Data(pattern(7, 4096)));
    let mut img = open(b.build()).unwrap();
    assert_eq!(img.header().version, 2);
    assert_eq!(&read_all(&mut img).unwrap()[4096..8192], &pattern(7, 4096)[..]);
    // With 512-byte clusters a compressed offset has 61 bits; those over 55 must be clear.
    let mut img = open(Builder::new(3, 9, 4 * 512).with(1, Entry::Raw((1 << 62) | (1 << 58) | 4096)).build()).unwrap();
    expect_err(img.cluster_state(1), ErrorKind::Corrupt, "over 2^56");
    // The zero flag does not exist in v2.
    let mut img = open(Builder::new(2, 12, 3 * 4096).with(1, Entry::Zero).build()).unwrap();
    expect_err(img.cluster_state(1), ErrorKind::Corrupt, "zero flag");
}

#[test]
fn empty_image_and_range_checks() {
    let mut img = open(Builder::new(3, 16, 0).build()).unwrap();
    assert_eq!(img.guest_clusters(), 0);
    img.read_at(0, &mut []).unwrap();
    expect_err(img.read_at(0, &mut [0u8; 1]), ErrorKind::InvalidInput, "past the virtual size");
    let mut img = open(Builder::new(3, 16, 65536).build()).unwrap();
    expect_err(img.read_at(u64::MAX, &mut [0u8; 2]), ErrorKind::InvalidInput, "past the virtual size");
    expect_err(img.read_at(65535, &mut [0u8; 2]), ErrorKind::InvalidInput, "past the virtual size");
    let mut buf = [7u8; 2];
    img.read_at(65534, &mut buf).unwrap();
    assert_eq!(buf, [0, 0]);
}

#[test]
fn backing_name_and_dirty_flag() {
    let mut b = Builder::new(3, 16, 65536);
    b.backing = Some("base.qcow2".into());
    b.incompat |= INCOMPAT_DIRTY;
    let img = open(b.build()).unwrap();
    assert_eq!(img.header().backing_file.as_deref(), Some("base.qcow2"));
    assert!(img.is_dirty());
}

/// Write `v` big-endian at `at` of a copy of `bytes`.
fn patched(bytes: &[u8], at: usize, v: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + v.len()].copy_from_slice(v);
    b
}

#[test]
fn header_errors() {
    let good = Builder::new(3, 16, 1 << 20).build();
    open(good.clone()).unwrap();
    expect_err(open(good[..50].to_vec()), ErrorKind::Corrupt, "truncated header");
    expect_err(open(good[..80].to_vec()), ErrorKind::Corrupt, "truncated header");
    expect_err(open(good[..2].to_vec()), ErrorKind::Corrupt, "truncated header");
    expect_err(open(patched(&good, 0, b"QFI\0")), ErrorKind::InvalidInput, "bad magic");
    expect_err(open(patched(&good, 4, &4u32.to_be_bytes())), ErrorKind::InvalidInput, "version 4");
    expect_err(open(patched(&good, 20, &30u32.to_be_bytes())), ErrorKind::InvalidInput, "cluster_bits 30");
    expect_err(open(patched(&good, 20, &8u32.to_be_bytes())), ErrorKind::Corrupt, "cluster_bits 8");
    expect_err(open(patched(&good, 32, &1u32.to_be_bytes())), ErrorKind::InvalidInput, "encrypted");
    expect_err(open(patched(&good, 32, &2u32.to_be_bytes())), ErrorKind::InvalidInput, "LUKS");
    expect_err(open(patched(&good, 72, &4u64.to_be_bytes())), ErrorKind::InvalidInput, "external data file");
    expect_err(open(patched(&good, 72, &16u64.to_be_bytes())), ErrorKind::InvalidInput, "extended L2");
    expect_err(open(patched(&good, 72, &(1u64 << 40).to_be_bytes())), ErrorKind::InvalidInput, "bit 40");
    expect_err(open(patched(&good, 72, &8u64.to_be_bytes())), ErrorKind::Corrupt, "compression type");
    expect_err(open(patched(&good, 104, &[1])), ErrorKind::Corrupt, "compression type");
    expect_err(open(patched(&good, 104, &[7])), ErrorKind::InvalidInput, "compression type 7");
    expect_err(open(patched(&good, 100, &100u32.to_be_bytes())), ErrorKind::Corrupt, "header_length");
    expect_err(open(patched(&good, 96, &7u32.to_be_bytes())), ErrorKind::Corrupt, "refcount_order");
    // L1: too small for the size, huge, misaligned, past the end of file.
    expect_err(open(patched(&good, 24, &(1u64 << 40).to_be_bytes())), ErrorKind::Corrupt, "needs");
    expect_err(open(patched(&good, 24, &u64::MAX.to_be_bytes())), ErrorKind::Corrupt, "needs");
    expect_err(open(patched(&good, 36, &u32::MAX.to_be_bytes())), ErrorKind::Corrupt, "over the limit");
    expect_err(open(patched(&good, 36, &1_000_000u32.to_be_bytes())), ErrorKind::Corrupt, "outside the file");
    expect_err(open(patched(&good, 40, &(1u64 << 50).to_be_bytes())), ErrorKind::Corrupt, "outside the file");
    expect_err(open(patched(&good, 40, &(!65535u64).to_be_bytes())), ErrorKind::Corrupt, "outside the file");
    expect_err(open(patched(&good, 40, &4096u64.to_be_bytes())), ErrorKind::Corrupt, "not cluster aligned");
    expect_err(open(patched(&good, 48, &(1u64 << 62).to_be_bytes())), ErrorKind::Corrupt, "refcount table");
    // Backing name: too long, outside the header cluster, past end of file.
    let with_backing = patched(&patched(&good, 8, &200u64.to_be_bytes()), 16, &2000u32.to_be_bytes());
    expect_err(open(with_backing), ErrorKind::Corrupt, "backing file name length 2000");
    let with_backing = patched(&patched(&good, 8, &65530u64.to_be_bytes()), 16, &100u32.to_be_bytes());
    expect_err(open(with_backing), ErrorKind::Corrupt, "outside the header cluster");
    // A CRYPTO extension of an image not encrypted (QEMU refuses it).
    let crypto = patched(&patched(&good, 112, &0x0537_be77u32.to_be_bytes()), 116, &16u32.to_be_bytes());
    expect_err(open(crypto), ErrorKind::Corrupt, "CRYPTO header extension");
    // An extension header cut by the backing file name (QEMU: "Header
    // extension too large"); it was taken for the end.
    let cut = patched(&patched(&patched(&good, 8, &116u64.to_be_bytes()), 16, &4u32.to_be_bytes()), 116, b"base");
    expect_err(open(cut), ErrorKind::Corrupt, "header extension at 112 runs past the end of the header area (116)");
    // A header extension longer than the header cluster.
    let ext = patched(&patched(&good, 112, &0x1234u32.to_be_bytes()), 116, &0xffff_fff0u32.to_be_bytes());
    expect_err(open(ext), ErrorKind::Corrupt, "header extension 0x00001234");
    // An unknown incompatible bit named by the feature name table.
    let mut named = patched(&good, 72, &(1u64 << 9).to_be_bytes());
    named = patched(&named, 112, &0x6803_f857u32.to_be_bytes());
    named = patched(&named, 116, &48u32.to_be_bytes());
    named = patched(&named, 120, &[0, 9]);
    named = patched(&named, 122, b"frobnication");
    expect_err(open(named), ErrorKind::InvalidInput, "bit 9 \"frobnication\"");
}

#[test]
fn table_entry_errors() {
    let cs = 65536u64;
    let b = Builder::new(3, 16, 4 * cs).with(0, Entry::Data(pattern(1, 16)));
    let good = b.build();
    let len = good.len() as u64;
    let mut img = open(good.clone()).unwrap();
    let ClusterState::Data { host_offset } = img.cluster_state(0).unwrap() else { panic!() };
    assert_eq!(img.header().l1_table_offset, 2 * cs);
    let l2 = 3 * cs; // the first allocation after the L1 table
    let entry = |e: u64| {
        let mut img = open(patched(&good, l2 as usize + 8, &e.to_be_bytes())).unwrap();
        img.cluster_state(1)
    };
    expect_err(entry(len.next_multiple_of(cs) + cs), ErrorKind::Corrupt, "past the end of the file");
    expect_err(entry((1 << 55) | COPIED), ErrorKind::Corrupt, "past the end of the file");
    expect_err(entry(host_offset + 512), ErrorKind::Corrupt, "not cluster aligned");
    expect_err(entry(host_offset | 2), ErrorKind::Corrupt, "reserved bits");
    expect_err(entry(host_offset | (1 << 57)), ErrorKind::Corrupt, "reserved bits");
    expect_err(entry(COPIED), ErrorKind::Corrupt, "host offset 0");
    expect_err(entry(((cs / 2) & !511) | COPIED), ErrorKind::Corrupt, "not cluster aligned");
    assert_eq!(entry(host_offset | COPIED).unwrap(), ClusterState::Data { host_offset });
    assert_eq!(entry(host_offset | 1).unwrap(), ClusterState::Zero);
    assert_eq!(entry(1).unwrap(), ClusterState::Zero);
    // A zero cluster keeping an allocation at an unaligned offset: QEMU
    // fails the read ("Cluster allocation offset ... unaligned"); it read
    // as zeros.
    expect_err(entry((host_offset + 512) | COPIED | 1), ErrorKind::Corrupt, "not cluster aligned");
    assert_eq!(entry(0).unwrap(), ClusterState::Unallocated);
    // Compressed: x = 62 - 8 = 54 offset bits, 8 bits of extra sectors.
    let compressed = |off: u64, extra: u64| (1u64 << 62) | (extra << 54) | off;
    expect_err(entry(compressed(len + 10, 0)), ErrorKind::Corrupt, "past the end of the file");
    expect_err(entry(compressed(len - 600, 255)), ErrorKind::Corrupt, "past the end of the file");
    expect_err(entry(compressed(100, 0)), ErrorKind::Corrupt, "header cluster");
    let off = len - 600;
    let compressed_len = (off & !511) + 1024 - off;
    assert_eq!(entry(compressed(off, 1)).unwrap(), ClusterState::Compressed { host_offset: off, compressed_len });
    // ... and its data is not deflate.
    let mut img = open(patched(&good, l2 as usize + 8, &compressed(len - 600, 1).to_be_bytes())).unwrap();
    let mut buf = vec![0u8; 100];
    expect_err(img.read_at(cs, &mut buf), ErrorKind::Corrupt, "compressed cluster");
    // L1 entries.
    let l1 = |e: u64| {
        let mut img = open(patched(&good, 2 * cs as usize, &e.to_be_bytes())).unwrap();
        img.cluster_state(0)
    };
    expect_err(l1(l2 | 1), ErrorKind::Corrupt, "L1 entry 0");
    expect_err(l1(l2 | (1 << 60)), ErrorKind::Corrupt, "reserved bits");
    expect_err(l1(l2 + 512), ErrorKind::Corrupt, "not cluster aligned");
    expect_err(l1(len.next_multiple_of(cs) + cs), ErrorKind::Corrupt, "past the end of the file");
    expect_err(l1(cs * 1000), ErrorKind::Corrupt, "past the end of the file");
    assert_eq!(l1(0).unwrap(), ClusterState::Unallocated);
}

#[test]
fn bad_compressed_data() {
    let cs = 1usize << 16;
    // Decompresses to less than a cluster.
    let short = Builder::new(3, 16, 2 * cs as u64).with(1, Entry::Compressed(deflate(&[1u8; 1000])));
    let mut img = open(short.build()).unwrap();
    expect_err(read_all(&mut img), ErrorKind::Corrupt, "not a whole cluster");
    let short = Builder::new(3, 16, 2 * cs as u64)
        .zstd()
        .with(1, Entry::Compressed(zstd::bulk::compress(&[1u8; 1000], 1).unwrap()));
    expect_err(read_all(&mut open(short.build()).unwrap()), ErrorKind::Corrupt, "not a whole cluster");
    // Cut short.
    let full = deflate(&pattern(4, cs));
    let cut = Builder::new(3, 16, 2 * cs as u64).with(1, Entry::Compressed(full[..full.len() / 2].to_vec()));
    expect_err(read_all(&mut open(cut.build()).unwrap()), ErrorKind::Corrupt, "ends early");
    let full = zstd::bulk::compress(&pattern(4, cs), 1).unwrap();
    let cut = Builder::new(3, 16, 2 * cs as u64).zstd().with(1, Entry::Compressed(full[..full.len() / 2].to_vec()));
    expect_err(read_all(&mut open(cut.build()).unwrap()), ErrorKind::Corrupt, "ends early");
    // Garbage.
    let junk = Builder::new(3, 16, 2 * cs as u64).zstd().with(1, Entry::Compressed(vec![0xff; 3000]));
    expect_err(read_all(&mut open(junk.build()).unwrap()), ErrorKind::Corrupt, "bad zstd data");
    // More than a cluster: exactly one cluster is used.
    let mut long = pattern(6, cs);
    long.extend_from_slice(&[9u8; 5000]);
    let img = Builder::new(3, 16, 2 * cs as u64).with(1, Entry::Compressed(deflate(&long)));
    assert_eq!(read_all(&mut open(img.build()).unwrap()).unwrap()[cs..], pattern(6, cs)[..]);
    // A zstd frame of more than a cluster is refused, as QEMU refuses it
    // (the frame must end with the cluster); the rest was dropped.
    let img =
        Builder::new(3, 16, 2 * cs as u64).zstd().with(1, Entry::Compressed(zstd::bulk::compress(&long, 1).unwrap()));
    expect_err(read_all(&mut open(img.build()).unwrap()), ErrorKind::Corrupt, "more than a cluster");
    // A cluster in two zstd frames reads, as QEMU reads it.
    let two = pattern(7, cs);
    let mut frames = zstd::bulk::compress(&two[..cs / 4], 1).unwrap();
    frames.extend(zstd::bulk::compress(&two[cs / 4..], 1).unwrap());
    let img = Builder::new(3, 16, 2 * cs as u64).zstd().with(1, Entry::Compressed(frames));
    assert_eq!(read_all(&mut open(img.build()).unwrap()).unwrap()[cs..], two[..]);
}

#[test]
fn qcow2_image_and_chain_are_send() {
    fn send<T: Send>() {}
    send::<Qcow2Image>();
    send::<Chain>();
}

/// Mutate a valid image at random (seeded) and read it all: errors are
/// fine, panics and huge allocations are not.
#[test]
fn mutated_images_never_panic() {
    let (zlib, _) = mixed(Builder::new(3, 9, 12 * 512 + 100), deflate);
    let (zstd_img, _) = mixed(Builder::new(3, 9, 12 * 512).zstd(), |d| zstd::bulk::compress(d, 1).unwrap());
    let mut v2 = Builder::new(2, 9, 20 * 512).with(3, Entry::Data(pattern(2, 512)));
    v2.backing = Some("b".into());
    let v2 = v2.build();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut opened = 0;
    for round in 0..20000u32 {
        let base = [&zlib, &zstd_img, &v2][round as usize % 3];
        let mut bytes = base.clone();
        let flips = 1 + rng.next() % 4;
        for _ in 0..flips {
            let at = (rng.next() % bytes.len() as u64) as usize;
            match rng.next() % 4 {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] ^= 1 << (rng.next() % 8),
                2 => bytes[at] = [0, 0xff, 0x80, 0x7f][(rng.next() % 4) as usize],
                _ => {
                    // Focus on the header, L1 and L2 tables (the first clusters).
                    let at = (rng.next() % 2048) as usize;
                    if at < bytes.len() {
                        bytes[at] = rng.next() as u8;
                    }
                }
            }
        }
        if rng.next().is_multiple_of(10) {
            bytes.truncate((rng.next() % bytes.len() as u64) as usize);
        }
        let Ok(mut img) = open(bytes) else { continue };
        opened += 1;
        if img.virtual_size() > 1 << 20 {
            for i in 0..img.guest_clusters().min(64) {
                let _ = img.cluster_state(i);
            }
            continue;
        }
        let _ = read_all(&mut img);
        for i in 0..img.guest_clusters() {
            let _ = img.cluster_state(i);
        }
    }
    assert!(opened > 4000, "only {opened} mutated images opened");
}

/// An image written by the native writer in memory: data, zero and
/// compressed clusters over several L2 tables and refcount blocks
/// (512-byte clusters).
fn written_image() -> Vec<u8> {
    use super::writer::{BackingRef, ImageSpec, Layout};
    let spec = ImageSpec {
        virtual_size: 300 * 512 + 100,
        cluster_bits: 9,
        backing: Some(BackingRef { name: "base.qcow2".into(), format: "qcow2".into() }),
        compression: CompressionType::Zstd,
    };
    let mut l = Layout::new(spec, Vec::new(), None).unwrap();
    let mut i = 0;
    while i < 300 {
        match i % 7 {
            0 | 1 => l.push_data(i, &pattern(i, 512)).unwrap(),
            2 => l.push_zero(i, 1).unwrap(),
            3 | 4 => l.push_compressed(i, &zstd::bulk::compress(&[i as u8; 512], 1).unwrap()).unwrap(),
            _ => {}
        }
        i += 1;
    }
    let (header, mut bytes, _) = l.finish().unwrap();
    bytes[..header.len()].copy_from_slice(&header);
    bytes
}

#[test]
fn written_images_are_consistent_and_read_back() {
    let bytes = written_image();
    let mut img = open(bytes).unwrap();
    let r = img.check_refcounts(&crate::progress::Control::new()).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(img.header().backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(img.header().compression_type, CompressionType::Zstd);
    let mut buf = vec![0u8; 512];
    for i in 0..300u64 {
        let state = img.cluster_state(i).unwrap();
        match i % 7 {
            0 | 1 => {
                img.read_at(i * 512, &mut buf).unwrap();
                assert_eq!(buf, pattern(i, 512), "cluster {i}: {state:?}");
            }
            3 | 4 => {
                assert!(matches!(state, ClusterState::Compressed { .. }), "cluster {i}: {state:?}");
                img.read_at(i * 512, &mut buf).unwrap();
                assert_eq!(buf, [i as u8; 512], "cluster {i}");
            }
            2 => assert_eq!(state, ClusterState::Zero),
            _ => assert_eq!(state, ClusterState::Unallocated),
        }
    }
    // A stored refcount changed is found, as a leak or a corruption.
    let rt = img.header().refcount_table_offset;
    let mut raw = written_image();
    let block = u64::from_be_bytes(raw[rt as usize..rt as usize + 8].try_into().unwrap()) as usize;
    raw[block + 3] += 1; // host cluster 1: refcount 2, referenced once
    let r = open(raw).unwrap().check_refcounts(&crate::progress::Control::new()).unwrap();
    assert!(r.leaks >= 1 && r.corruptions >= 1, "{r:?}");
}

/// L1 entries naming one L2 table: the table's entries are counted once
/// per L1 entry naming it, as QEMU counts them (each a reference to its
/// data cluster), with the table read once (a crafted image of millions of
/// such entries took hours); a cancelled check stops.
#[test]
fn l1_entries_sharing_an_l2_table_are_counted_as_qemu_counts_them() {
    let good = Builder::new(3, 16, 64 << 30).with(0, Entry::Data(pattern(1, 16))).build();
    let mut img = open(good.clone()).unwrap();
    let (l1, n) = (img.header().l1_table_offset as usize, img.header().l1_size as usize);
    assert_eq!(n, 128);
    let first = u64::from_be_bytes(good[l1..l1 + 8].try_into().unwrap()) & super::image::OFFSET_MASK;
    let ClusterState::Data { host_offset } = img.cluster_state(0).unwrap() else { panic!() };
    let mut shared = good.clone();
    for i in 1..n {
        shared[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&first.to_be_bytes());
    }
    // The builder writes no refcounts: every cluster's is 0, so each
    // referenced one is listed with its count of references.
    let ctl = crate::progress::Control::new();
    let r = open(shared.clone()).unwrap().check_refcounts(&ctl).unwrap();
    let said = |c: u64, times: usize| format!("host cluster {c}: refcount 0, referenced {times} times");
    assert!(r.problems.contains(&said(first / 65536, n)), "{r:?}");
    assert!(r.problems.contains(&said(host_offset / 65536, n)), "{r:?}");
    ctl.cancel.cancel();
    let e = open(shared).unwrap().check_refcounts(&ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
}

#[test]
fn mutated_written_images_never_panic_in_reads_or_the_refcount_check() {
    let base = written_image();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut opened = 0;
    for _ in 0..5000u32 {
        let mut bytes = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() % bytes.len() as u64) as usize;
            match rng.next() % 3 {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] ^= 1 << (rng.next() % 8),
                _ => bytes[at] = [0, 0xff, 0x80, 0x7f][(rng.next() % 4) as usize],
            }
        }
        let Ok(mut img) = open(bytes) else { continue };
        opened += 1;
        let _ = img.check_refcounts(&crate::progress::Control::new());
        for c in 0..8 {
            let _ = img.refcount(c);
        }
        if img.virtual_size() <= 1 << 20 {
            let _ = read_all(&mut img);
        }
    }
    assert!(opened > 1000, "only {opened} mutated images opened");
}

/// A chain's layers share one L2 cache budget: an 8-deep chain holds no
/// more tables in all than one image alone (at least two per layer).
#[test]
fn a_chains_layers_share_one_l2_cache_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut below: Option<std::path::PathBuf> = None;
    for i in 0..8 {
        let f = dir.path().join(format!("l{i}.qcow2"));
        let mut c = std::process::Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = &below {
            c.args(["-F", "qcow2", "-b"]).arg(b);
        }
        assert!(c.arg(&f).arg("1G").status().unwrap().success());
        below = Some(f);
    }
    let top = below.unwrap();
    let alone = Qcow2Image::open(&top).unwrap().l2_cache_capacity();
    assert_eq!(alone, 16, "1 MiB of 64 KiB tables");
    let chain = Chain::open(&top).unwrap();
    let mut total = chain.top().l2_cache_capacity();
    for l in chain.backing() {
        if let Layer::Qcow2(img) = l {
            total += img.l2_cache_capacity();
        }
    }
    assert_eq!(total, alone, "eight layers of {} tables", alone / 8);
}
