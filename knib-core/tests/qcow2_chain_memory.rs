//! The qcow2 reader's memory does not grow with a chain's virtual sizes:
//! each file's L1 table is read a few chunks at a time as it is used.
//!
//! Alone in its test binary: it measures this process's peak resident
//! memory, which another test running beside it would raise.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

#[path = "common/gen.rs"]
mod gen;
use gen::Rng;

use knib_core::qcow2::Chain;

/// The peak resident memory of this process so far, in bytes.
fn max_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

fn run(dir: &Path, program: &str, args: &[String]) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seventeen backups of a 4 TiB disk with 4 KiB clusters over its base
/// (each file's L1 table 16 MiB, 288 MiB for the chain): a legitimate
/// chain, which QEMU reads. Opened as a backup's chain, it reads what was
/// written in it (seeded writes across the whole disk, later layers over
/// earlier ones, checked block by block), and the reader's peak memory
/// grows by a few MiB. It was refused as corrupt (a budget of 256 MiB of
/// L1 tables held in memory: no next incremental, no restore), and
/// before the budget a chain held every table whole.
#[test]
fn a_deep_chain_of_huge_disks_is_read_with_little_memory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 4u64 << 40;
    let block = 4096u64;
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    run(dir, "qemu-img", &args(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "l0.qcow2", "4T"]));
    let mut rng = Rng::new(0x4b1b_c4a1);
    // The pattern byte each written block holds in the end.
    let mut expect: BTreeMap<u64, u8> = BTreeMap::new();
    let mut spots: Vec<u64> = Vec::new();
    for layer in 0..18u64 {
        let name = format!("l{layer}.qcow2");
        if layer > 0 {
            let below = format!("l{}.qcow2", layer - 1);
            run(
                dir,
                "qemu-img",
                &args(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", &below, "-F", "qcow2", &name]),
            );
        }
        let mut io = Vec::new();
        for w in 0..4 {
            // Over an earlier write now and then, else anywhere (the last
            // blocks of the disk among them).
            let at = match (w, spots.is_empty()) {
                (0, false) => spots[rng.below(spots.len() as u64) as usize],
                (1, _) if layer % 3 == 0 => size - 16 * block,
                _ => rng.below(size / block - 16) * block,
            };
            let blocks = 1 + rng.below(16);
            let pattern = (layer * 4 + w + 1) as u8;
            io.extend(["-c".to_string(), format!("write -q -P {pattern} {at} {}", blocks * block)]);
            for b in 0..blocks {
                expect.insert(at / block + b, pattern);
            }
            spots.push(at);
        }
        io.push(name);
        run(dir, "qemu-io", &io);
    }
    let top = dir.join("l17.qcow2");

    let before = max_rss();
    let mut chain = Chain::open_files_only(&top).unwrap();
    assert_eq!((chain.depth(), chain.virtual_size()), (18, size));
    let mut buf = vec![0u8; block as usize];
    for (&b, &pattern) in &expect {
        chain.read_at(b * block, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == pattern), "block {b}: expected {pattern:#x}, read {:#x}", buf[0]);
        // The block after a write's end reads as written or as zeros.
        if !expect.contains_key(&(b + 1)) && b + 1 < size / block {
            chain.read_at((b + 1) * block, &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 0), "block {} should read as zeros", b + 1);
        }
    }
    // The chain maps exactly the blocks written (4 KiB clusters).
    let ranges = chain.data_ranges(0, size).unwrap();
    let mapped: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(mapped, expect.len() as u64 * block, "{ranges:?}");
    drop(chain);
    let grown = max_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "reading the chain raised the peak memory by {} MiB", grown >> 20);
}
