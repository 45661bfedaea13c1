//! knib's NBD client against a hostile server whose structured replies to
//! a read do not cover the range asked exactly once. libnbd checks only
//! that the lengths of a read's chunks add up to the read's length (its
//! `nbd_pread_structured` documentation: it "does not validate that the
//! server obeyed the requirement that a read call must not have
//! overlapping chunks"): a chunk sent twice hides a range never sent,
//! which libnbd leaves zero and reports as read. knib's reads
//! (`Nbd::pread`, `Nbd::pread_pipelined`) must refuse such a reply with an
//! error naming the export, the read and the bytes missing, and still
//! read replies whose chunks tile the range in any order.
//!
//! The server (a thread of the test) speaks the fixed newstyle handshake,
//! `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_GO`; the export's name says how
//! it answers each read.

#![cfg(feature = "libvirt")]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use knib_core::nbd::Nbd;
use knib_core::{Control, ErrorKind};

const KIB: u64 = 1024;
const SIZE: u64 = 8 << 20;

/// The byte at `off` of the export (a hole reads as zeros).
fn expected(off: u64) -> u8 {
    (off % 251) as u8 + 1
}

/// A reply chunk: data of `len` bytes at `off`, or a hole.
#[derive(Clone, Copy)]
enum Chunk {
    Data(u64, u64),
    Hole(u64, u64),
}

/// The chunks that answer a read of `len` bytes at `off` in `mode` (offsets
/// relative to the read).
fn plan(mode: &str, len: u64) -> Vec<Chunk> {
    use Chunk::*;
    let half = len / 2;
    match mode {
        "whole" => vec![Data(0, len)],
        // Any order, holes included, tiling the range: read.
        "tiled" => vec![Data(half, len - half), Hole(64 * KIB, half - 64 * KIB), Data(0, 64 * KIB)],
        // libnbd refuses these itself (the lengths do not add up).
        "short" => vec![Data(0, 64 * KIB)],
        // The lengths add up to the read's, but the second half never came.
        "first_half_twice" => vec![Data(0, half), Data(0, len - half)],
        "hole_then_data_over_it" => vec![Hole(0, half), Data(0, len - half)],
        // The lengths add up, [half - 4 KiB, half) twice, the last 4 KiB never.
        "overlap" => vec![Data(0, half), Data(half - 4 * KIB, len - half)],
        _ => panic!("unknown mode {mode}"),
    }
}

fn take(c: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0; n];
    c.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn option_reply(c: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m)
}

fn chunk(c: &mut UnixStream, handle: u64, kind: u16, done: bool, payload: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    m.extend_from_slice(&u16::from(done).to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    c.write_all(&m)
}

/// One connection: the handshake, then reads answered as the export's name says.
fn serve_one(mut c: UnixStream) -> std::io::Result<()> {
    let mut hello = b"NBDMAGIC".to_vec();
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    c.write_all(&hello)?;
    take(&mut c, 4)?;
    let mode = loop {
        let head = take(&mut c, 16)?;
        let (opt, len) = (be32(&head[8..]), be32(&head[12..]) as usize);
        let data = take(&mut c, len)?;
        match opt {
            8 => option_reply(&mut c, opt, 1, &[])?, // STRUCTURED_REPLY: ACK
            7 => {
                // GO: the export's size and flags (HAS_FLAGS | READ_ONLY), ACK.
                let name = String::from_utf8_lossy(&data[4..4 + be32(&data) as usize]).into_owned();
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(&3u16.to_be_bytes());
                option_reply(&mut c, opt, 3, &info)?;
                option_reply(&mut c, opt, 1, &[])?;
                break name;
            }
            2 => return option_reply(&mut c, opt, 1, &[]),       // ABORT
            _ => option_reply(&mut c, opt, (1 << 31) | 1, &[])?, // ERR_UNSUP
        }
    };
    loop {
        let req = take(&mut c, 28)?;
        let (kind, handle, off, len) =
            (u16::from_be_bytes([req[6], req[7]]), be64(&req[8..]), be64(&req[16..]), be32(&req[24..]));
        match kind {
            0 => {
                let chunks = plan(&mode, u64::from(len));
                for (i, ch) in chunks.iter().enumerate() {
                    let done = i + 1 == chunks.len();
                    match *ch {
                        Chunk::Data(at, n) => {
                            let mut p = (off + at).to_be_bytes().to_vec();
                            p.extend((off + at..off + at + n).map(expected));
                            chunk(&mut c, handle, 1, done, &p)?;
                        }
                        Chunk::Hole(at, n) => {
                            let mut p = (off + at).to_be_bytes().to_vec();
                            p.extend_from_slice(&(n as u32).to_be_bytes());
                            chunk(&mut c, handle, 2, done, &p)?;
                        }
                    }
                }
            }
            2 => return Ok(()), // DISC
            _ => {
                let mut p = 22u32.to_be_bytes().to_vec(); // EINVAL, no message
                p.extend_from_slice(&0u16.to_be_bytes());
                chunk(&mut c, handle, 0x8001, true, &p)?;
            }
        }
    }
}

/// The hostile server on `sock`, a thread per connection (left running:
/// the test's process ends them).
fn serve(sock: &Path) {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve_one(c));
        }
    });
}

fn connect(sock: &Path, mode: &str) -> Nbd {
    Nbd::connect_unix_within(sock, mode, &[], &Control::new(), Duration::from_secs(20)).unwrap()
}

/// Whether `buf`, read at `off`, holds the export's bytes, zeros where
/// the plan of `mode` has a hole.
fn check_bytes(mode: &str, buf: &[u8], off: u64) {
    for ch in plan(mode, buf.len() as u64) {
        let (at, n, hole) = match ch {
            Chunk::Data(at, n) => (at, n, false),
            Chunk::Hole(at, n) => (at, n, true),
        };
        for k in at..at + n {
            let want = if hole { 0 } else { expected(off + k) };
            assert_eq!(buf[k as usize], want, "{mode}: byte {k} of the read at {off}");
        }
    }
}

#[test]
fn replies_that_tile_the_read_are_read_in_any_order_holes_included() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    serve(&sock);
    for mode in ["whole", "tiled"] {
        let mut n = connect(&sock, mode);
        let mut buf = vec![0xffu8; 512 * KIB as usize];
        n.pread(&mut buf, 3 * KIB).unwrap();
        check_bytes(mode, &buf, 3 * KIB);
        let ranges: Vec<(u64, usize)> = (0..12).map(|i| (i * 300 * KIB, 256 * KIB as usize)).collect();
        let mut seen = 0;
        n.pread_pipelined(&ranges, 4, &Control::new(), &mut |i, bytes| {
            check_bytes(mode, bytes, ranges[i].0);
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ranges.len(), "{mode}");
    }
}

#[test]
fn a_reply_that_leaves_part_of_the_read_unsent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    serve(&sock);
    for mode in ["short", "first_half_twice", "hole_then_data_over_it", "overlap"] {
        let mut n = connect(&sock, mode);
        let mut buf = vec![0u8; 512 * KIB as usize];
        let e = n.pread(&mut buf, 64 * KIB).expect_err(mode);
        assert_eq!(e.kind, ErrorKind::Io, "{mode}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("read of 524288 bytes at 65536 from export") && msg.contains(mode), "{mode}: {msg}");
        if mode != "short" {
            // libnbd's own check misses these: knib's names what is missing.
            assert!(msg.contains("never sent"), "{mode}: {msg}");
        }

        // Pipelined: every read of this export is answered so, the first
        // one is refused and none is handed over.
        let ranges: Vec<(u64, usize)> = (0..6).map(|i| (i * 512 * KIB, 512 * KIB as usize)).collect();
        let mut seen = Vec::new();
        let e = n
            .pread_pipelined(&ranges, 3, &Control::new(), &mut |i, _| {
                seen.push(i);
                Ok(())
            })
            .expect_err(mode);
        assert!(seen.is_empty(), "{mode}: reads {seen:?} were handed over");
        let msg = e.to_string();
        assert!(msg.contains("read of 524288 bytes at 0 from export") && msg.contains(mode), "{mode}: {msg}");
        if mode == "first_half_twice" {
            assert!(msg.contains("[262144, 524288)"), "{mode}: {msg}");
        }
    }
}
