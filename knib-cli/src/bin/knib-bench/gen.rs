//! The benchmark's data: a deterministic disk image generated layer by
//! layer (extents of zeros, text-like and random data), written through
//! knib's qcow2 writer, with the counts of what each layer holds. The same
//! seed gives the same bytes, so runs and tools compare on equal data.

use super::*;

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A pool of log-like text: timestamps, levels, words from a vocabulary.
pub(crate) fn text_pool(rng: &mut Rng, len: usize) -> Vec<u8> {
    let words: Vec<String> = (0..3000)
        .map(|_| {
            let n = 2 + rng.below(9) as usize;
            (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect()
        })
        .collect();
    let levels = ["INFO", "DEBUG", "WARN", "ERROR"];
    let mut out = Vec::with_capacity(len + 256);
    let mut t = 1_700_000_000u64;
    while out.len() < len {
        t += rng.below(5000);
        out.extend_from_slice(format!("{t}.{:03} {} ", rng.below(1000), levels[rng.below(4) as usize]).as_bytes());
        for _ in 0..4 + rng.below(14) {
            // Zipf-like: frequent words are more frequent.
            let i = (rng.below(3000) * rng.below(3000) / 3000) as usize;
            out.extend_from_slice(words[i].as_bytes());
            out.push(if rng.below(12) == 0 { b'=' } else { b' ' });
            if rng.below(10) == 0 {
                out.extend_from_slice(rng.below(100_000).to_string().as_bytes());
                out.push(b' ');
            }
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) data: u64,
    pub(crate) zero: u64,
}

/// Write a qcow2 layer of `size` bytes: extents of 1 to 64 clusters; a
/// cluster extent is unallocated with `p_skip`%, zero with `p_zero`%, text
/// with `p_text`%, random otherwise. With a `stride` above 1 the layer holds
/// the same extents (same seed, same bytes) as a layer of `size / stride`
/// bytes, each moved from cluster `i` to cluster `i * stride`: a larger
/// disk with the same data (and, for a delta, the same change).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gen_layer(
    path: &Path,
    size: u64,
    stride: u64,
    backing: Option<&str>,
    seed: u64,
    p_skip: u64,
    p_zero: u64,
    p_text: u64,
    pool: &[u8],
) -> Counts {
    let mut rng = Rng::new(seed);
    let spec = ImageSpec {
        virtual_size: size,
        cluster_bits: 16,
        backing: backing.map(|b| BackingRef { name: b.into(), format: "qcow2".into() }),
        compression: CompressionType::Zlib,
    };
    let file = std::fs::File::create(path).expect("create image");
    let mut l = Layout::new(spec, FileSink::new(file, path, false), None).expect("layout");
    let clusters = size / stride / CS;
    let mut buf = vec![0u8; (64 * CS) as usize];
    let mut counts = Counts::default();
    let mut i = 0;
    while i < clusters {
        let n = (1 + rng.below(64)).min(clusters - i);
        let k = rng.below(100);
        if k < p_skip {
        } else if k < p_skip + p_zero {
            l.push_zero(i * stride, n).expect("zero");
            counts.zero += n;
        } else {
            let b = &mut buf[..(n * CS) as usize];
            if k < p_skip + p_zero + p_text {
                for c in b.chunks_mut(CS as usize) {
                    let at = rng.below((pool.len() - c.len()) as u64) as usize;
                    c.copy_from_slice(&pool[at..at + c.len()]);
                }
            } else {
                rng.fill(b);
            }
            l.push_data(i * stride, b).expect("data");
            counts.data += n;
        }
        i += n;
    }
    let (header, sink, _) = l.finish().expect("finish");
    let (file, _) = sink.finish().expect("flush");
    use std::os::unix::fs::FileExt;
    file.write_all_at(&header, 0).expect("header");
    file.sync_all().expect("fsync");
    counts
}
