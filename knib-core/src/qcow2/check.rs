//! Refcounts: reading them, and a consistency check in the manner of
//! `qemu-img check` (every host cluster's stored refcount against the
//! references the header, the tables and the L2 entries make).

use super::image::{Qcow2Image, COPIED, L2_COMPRESSED as COMPRESSED, OFFSET_MASK, RT_OFFSET_MASK};
use crate::error::{KnibError, Result};
use crate::progress::Control;

/// The check keeps one counter per host cluster: at most this many.
const MAX_CHECK_CLUSTERS: u64 = 64 << 20;
/// Problems listed in a report (all are counted).
const MAX_LISTED: usize = 20;

/// What [`Qcow2Image::check_refcounts`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefcountCheck {
    /// Host clusters whose stored refcount is above their references.
    pub leaks: u64,
    /// Host clusters whose stored refcount is below their references, and
    /// other structural errors (references past the end of the file,
    /// wrong "copied" flags).
    pub corruptions: u64,
    /// The first problems, one line each.
    pub problems: Vec<String>,
    /// Host clusters in use (refcount above zero).
    pub allocated_clusters: u64,
}

impl RefcountCheck {
    /// No leak, no corruption.
    pub fn is_clean(&self) -> bool {
        self.leaks == 0 && self.corruptions == 0
    }

    /// Count a problem; list it (`what` makes its line) if the list has
    /// room. Lines past the list are not even formatted: a crafted image
    /// can have a billion wrong entries.
    fn problem(&mut self, leak: bool, what: impl FnOnce() -> String) {
        self.problems_n(leak, 1, what)
    }

    /// `n` problems alike, listed once.
    fn problems_n(&mut self, leak: bool, n: u64, what: impl FnOnce() -> String) {
        if leak {
            self.leaks += n;
        } else {
            self.corruptions += n;
        }
        if self.problems.len() < MAX_LISTED {
            self.problems.push(what());
        }
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

impl Qcow2Image {
    /// The stored refcount of host cluster `cluster` (0 when its refcount
    /// block is not allocated or lies outside the refcount table).
    pub fn refcount(&self, cluster: u64) -> Result<u64> {
        let h = self.header();
        let cs = h.cluster_size();
        let bits = 1u64 << h.refcount_order;
        let per_block = cs * 8 / bits;
        let rt_index = cluster / per_block;
        if rt_index >= u64::from(h.refcount_table_clusters) * cs / 8 {
            return Ok(0);
        }
        let mut e = [0u8; 8];
        self.read_host(h.refcount_table_offset + rt_index * 8, &mut e)?;
        let entry = u64::from_be_bytes(e);
        if entry & 0x1ff != 0 {
            return Err(KnibError::corrupt(format!(
                "qcow2 image {}: refcount table entry {rt_index} ({entry:#x}) has reserved bits set",
                self.name()
            )));
        }
        let block = entry & RT_OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if !block.is_multiple_of(cs) || block.saturating_add(cs) > self.file_len() {
            return Err(KnibError::corrupt(format!(
                "qcow2 image {}: refcount block at {block} is misaligned or past the end of the file",
                self.name()
            )));
        }
        let i = cluster % per_block;
        let bit = i * bits;
        let mut raw = [0u8; 8];
        let nbytes = bits.div_ceil(8) as usize;
        self.read_host(block + bit / 8, &mut raw[..nbytes])?;
        Ok(if bits >= 8 {
            raw[..nbytes].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b))
        } else {
            (u64::from(raw[0]) >> (bit % 8)) & ((1 << bits) - 1)
        })
    }

    /// Why [`Qcow2Image::check_refcounts`] refuses this image
    /// ([`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput)), if it
    /// does: it holds internal snapshots, or has more host clusters than
    /// the check counts (64M, 4 TiB of 64 KiB clusters). Read from the
    /// header and the file's size alone.
    pub fn refcount_check_refusal(&self) -> Option<String> {
        let h = self.header();
        if h.nb_snapshots != 0 {
            return Some(format!(
                "qcow2 image {}: checking images with internal snapshots is not supported",
                self.name()
            ));
        }
        if self.file_len().div_ceil(h.cluster_size()) > MAX_CHECK_CLUSTERS {
            return Some(format!("qcow2 image {}: too large to check here", self.name()));
        }
        None
    }

    /// Check every host cluster's stored refcount against the references
    /// made to it by the header, the L1 table, the refcount table and
    /// blocks, the L2 tables and the data and compressed clusters (as
    /// `qemu-img check` counts them), and the "copied" flags of L1 and L2
    /// entries. Images with internal snapshots are refused (their tables
    /// are not followed). Memory: four bytes per host cluster of the file
    /// (and one L2 table), whatever the number of entries: the tables are
    /// walked twice, once to count the references, then again to check
    /// each entry's copied flag against its cluster's stored refcount,
    /// with nothing kept per entry but one offset per L1 entry naming an L2
    /// table. Each L2 table is read once per pass however many L1 entries
    /// name it, its entries counted as many times (a crafted image of four
    /// million L1 entries all naming one table took hours), and `ctl` is
    /// checked as the tables are walked.
    pub fn check_refcounts(&mut self, ctl: &Control) -> Result<RefcountCheck> {
        if let Some(why) = self.refcount_check_refusal() {
            return Err(KnibError::invalid(why));
        }
        let h = self.header().clone();
        let cs = h.cluster_size();
        let nclusters = self.file_len().div_ceil(cs);
        let mut refs = vec![0u32; nclusters as usize];
        let mut report = RefcountCheck::default();
        // `n` references to the clusters of `len` bytes at `offset`.
        let mut inc_n = |report: &mut RefcountCheck, what: &str, offset: u64, len: u64, n: u32| {
            if len == 0 {
                return;
            }
            let last = offset.saturating_add(len - 1) / cs;
            for c in offset / cs..=last {
                match refs.get_mut(c as usize) {
                    Some(r) => *r = r.saturating_add(n),
                    None => {
                        report
                            .problem(false, || format!("{what} at {offset} ({len} bytes) is past the end of the file"));
                        return;
                    }
                }
            }
        };
        let mut inc =
            |report: &mut RefcountCheck, what: &str, offset: u64, len: u64| inc_n(report, what, offset, len, 1);
        inc(&mut report, "header", 0, cs);
        inc(&mut report, "L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8);
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        inc(&mut report, "refcount table", h.refcount_table_offset, rt_len);
        // Refcount blocks.
        let mut rt = vec![0u8; rt_len as usize];
        self.read_host(h.refcount_table_offset, &mut rt)?;
        for i in 0..rt.len() / 8 {
            let e = be64(&rt, i);
            if e & 0x1ff != 0 {
                report.problem(false, || format!("refcount table entry {i} has reserved bits set"));
            }
            let off = e & RT_OFFSET_MASK;
            if off != 0 {
                inc(&mut report, "refcount block", off, cs);
            }
        }
        drop(rt);
        // L1 and L2 tables, data and compressed clusters.
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        self.read_host(h.l1_table_offset, &mut l1)?;
        let mut l2 = vec![0u8; cs as usize];
        let x = 62 - (h.cluster_bits - 8);
        let progress = |i: usize| match i % 4096 {
            0 => ctl.check("refcount check"),
            _ => Ok(()),
        };
        // The L2 tables, each once, with how many L1 entries name it (in the
        // order of the first one): a table named n times counts each of its
        // entries n times, as QEMU counts them, without being walked n
        // times (a crafted image of millions of L1 entries naming one
        // 2 MiB table took hours).
        let mut named: Vec<(u64, u32)> = Vec::new();
        for i in 0..l1.len() / 8 {
            progress(i)?;
            let off = be64(&l1, i) & OFFSET_MASK;
            if off != 0 {
                inc(&mut report, "L2 table", off, cs);
                named.push((off, i as u32));
            }
        }
        named.sort_unstable();
        // (first L1 index, offset, times named)
        let mut tables: Vec<(u32, u64, u32)> = Vec::new();
        for &(off, i) in &named {
            match tables.last_mut() {
                Some(t) if t.1 == off => t.2 = t.2.saturating_add(1),
                _ => tables.push((i, off, 1)),
            }
        }
        drop(named);
        tables.sort_unstable();
        for (k, &(i, off, n)) in tables.iter().enumerate() {
            progress(k)?;
            self.read_host(off, &mut l2)?;
            for j in 0..l2.len() / 8 {
                let e = be64(&l2, j);
                if e & COMPRESSED != 0 {
                    let coff = e & ((1u64 << x) - 1);
                    let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
                    let csize = (sectors * 512).saturating_sub(coff & 511);
                    inc_n(&mut report, "compressed cluster", coff, csize, n);
                    if e & COPIED != 0 {
                        report.problems_n(false, u64::from(n), || {
                            format!("compressed L2 entry {j} of table {i} has the copied flag")
                        });
                    }
                    continue;
                }
                let host = e & OFFSET_MASK;
                if host != 0 {
                    inc_n(&mut report, "data cluster", host, cs, n);
                }
            }
        }
        // Stored refcounts against references; `refs` then holds the
        // stored refcounts (u32::MAX: that or more) for the copied flags.
        for (c, r) in refs.iter_mut().enumerate() {
            if c % (1 << 20) == 0 {
                ctl.check("refcount check")?;
            }
            let stored = self.refcount(c as u64)?;
            if stored > 0 {
                report.allocated_clusters += 1;
            }
            if stored != u64::from(*r) {
                let refs = *r;
                report.problem(stored > u64::from(refs), || {
                    format!("host cluster {c}: refcount {stored}, referenced {refs} times")
                });
            }
            *r = u32::try_from(stored).unwrap_or(u32::MAX);
        }
        // The copied flags of L1 and uncompressed L2 entries against the
        // stored refcounts: the tables walked again, entry by entry.
        let stored_of = |img: &Self, c: u64| match refs.get(c as usize) {
            Some(&stored) if stored != u32::MAX => Ok(u64::from(stored)),
            _ => img.refcount(c),
        };
        let mut next_table = tables.iter().peekable();
        for i in 0..l1.len() / 8 {
            progress(i)?;
            let e = be64(&l1, i);
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let (copied, stored) = (e & COPIED != 0, stored_of(self, off / cs)?);
            if (stored == 1) != copied {
                report.problem(false, || format!("L1 entry {i}: copied flag {copied} but refcount {stored}"));
            }
            // Each table walked at the first L1 entry naming it, its
            // problems counted as many times as it is named.
            let Some(&(_, _, n)) = next_table.next_if(|t| t.0 as usize == i) else { continue };
            self.read_host(off, &mut l2)?;
            for j in 0..l2.len() / 8 {
                let e = be64(&l2, j);
                let host = e & OFFSET_MASK;
                if e & COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let (copied, stored) = (e & COPIED != 0, stored_of(self, host / cs)?);
                if (stored == 1) != copied {
                    report.problems_n(false, u64::from(n), || {
                        format!("L2 entry {j} of table {i}: copied flag {copied} but refcount {stored}")
                    });
                }
            }
        }
        Ok(report)
    }
}
