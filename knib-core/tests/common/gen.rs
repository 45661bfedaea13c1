//! Seeded random images for the qcow2 tests: a deterministic generator,
//! source files for `qemu-io write -s`, and random qemu-io commands.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const K: u64 = 1024;

/// xorshift64: deterministic, so a failure reproduces from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Files of bytes for `write -s`: random (incompressible) and text-like.
pub fn sources(dir: &Path, rng: &mut Rng, len: u64) -> Vec<PathBuf> {
    (0..4)
        .map(|i| {
            let path = dir.join(format!("src{i}.bin"));
            let mut data = rng.bytes(len as usize);
            if i >= 2 {
                data.iter_mut().for_each(|b| *b = 0x20 | (*b & 0x3f));
            }
            std::fs::write(&path, data).unwrap();
            path
        })
        .collect()
}

/// Random qemu-io commands over an image of `size` bytes with clusters of
/// `cs`; with `compressed`, first compressed writes of whole clusters.
pub fn random_ops(rng: &mut Rng, size: u64, cs: u64, n: usize, srcs: &[PathBuf], compressed: bool) -> Vec<String> {
    let src_len = std::fs::metadata(&srcs[0]).unwrap().len();
    let mut ops = Vec::new();
    if compressed {
        let mut used = std::collections::HashSet::new();
        for _ in 0..n / 4 {
            let c = rng.below(size / cs);
            if !used.insert(c) {
                continue;
            }
            let off = c * cs;
            ops.push(match rng.below(3) {
                0 => format!("write -q -c -P {} {off} {cs}", rng.below(256)),
                k => format!("write -q -c -s {} {off} {cs}", srcs[1 + k as usize].display()),
            });
        }
    }
    while ops.len() < n {
        let mut off = rng.below(size);
        if rng.below(2) == 0 {
            off -= off % cs;
        }
        let max = (size - off).min(3 * cs);
        let len = match rng.below(3) {
            0 => 1 + rng.below(4 * K),
            1 => cs,
            _ => 1 + rng.below(max),
        }
        .min(max);
        ops.push(match rng.below(100) {
            0..=44 => {
                let src = &srcs[rng.below(srcs.len() as u64) as usize];
                format!("write -q -s {} {off} {}", src.display(), len.min(src_len))
            }
            45..=64 => format!("write -q -P {} {off} {len}", rng.below(256)),
            65..=77 => format!("write -q -z {off} {len}"),
            78..=87 => format!("write -q -z -u {off} {len}"),
            _ => format!("discard -q {off} {len}"),
        });
    }
    ops
}
