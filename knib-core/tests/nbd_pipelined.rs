//! knib's NBD client reading with several requests in flight
//! (`Nbd::pread_pipelined`), against a real `qemu-nbd`: every range comes
//! back in the order asked with the bytes the image holds (seeded ranges
//! of random lengths and depths), and a server killed in the middle of the
//! reads gives an error naming the read, never bytes, a hang or a crash;
//! a server that stops answering (the process stopped with SIGSTOP) fails
//! the connection and block status after the timeout, or at a cancel, and
//! closing a connection to it does not hang.

#![cfg(feature = "libvirt")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use knib_core::nbd::{Nbd, BASE_ALLOCATION};
use knib_core::{Control, ErrorKind};

const MIB: u64 = 1 << 20;

/// The byte at `off` of the test image: written by qemu-io as 64 KiB
/// blocks of pattern `(off / 64 KiB) % 251 + 1`.
fn expected(off: u64) -> u8 {
    ((off / (64 << 10)) % 251 + 1) as u8
}

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    let ok = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg(size.to_string()).status();
    assert!(ok.unwrap().success());
    let mut script = String::new();
    for b in 0..size / (64 << 10) {
        script.push_str(&format!("write -P {} {} 64k\n", expected(b * (64 << 10)), b * (64 << 10)));
    }
    let mut io = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    io.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(io.wait().unwrap().success());
    img
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(img: &Path, sock: &Path) -> Server {
    serve_with(img, sock, &[])
}

/// [`serve`] with more of qemu-nbd's options.
fn serve_with(img: &Path, sock: &Path, more: &[&str]) -> Server {
    let child = Command::new("qemu-nbd")
        .args(more)
        .args(["--read-only", "-f", "qcow2", "-x", "disk", "-k"])
        .arg(sock)
        .arg(img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server(child)
}

/// Connect once the server listens.
fn connect(sock: &Path) -> Nbd {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match Nbd::connect_unix(sock, "disk", &[BASE_ALLOCATION], &Control::new()) {
            Ok(n) => return n,
            Err(e) => assert!(Instant::now() < until, "qemu-nbd did not answer: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small seeded generator (xorshift).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn pipelined_reads_come_back_in_order_with_the_images_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let img = image(dir.path(), size);
    let sock = dir.path().join("nbd.sock");
    let _server = serve(&img, &sock);
    let mut n = connect(&sock);
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let ranges: Vec<(u64, usize)> = (0..1 + rng.below(60))
            .map(|_| {
                let len = 1 + rng.below(2 * MIB);
                (rng.below(size - len), len as usize)
            })
            .collect();
        let depth = 1 + rng.below(16) as usize;
        let mut seen = Vec::new();
        n.pread_pipelined(&ranges, depth, &knib_core::Control::new(), &mut |i, bytes| {
            let (off, len) = ranges[i];
            assert_eq!(bytes.len(), len, "seed {seed}: range {i}");
            for (k, b) in bytes.iter().enumerate().step_by(509) {
                assert_eq!(*b, expected(off + k as u64), "seed {seed}: range {i} byte {k}");
            }
            assert_eq!(bytes[len - 1], expected(off + len as u64 - 1), "seed {seed}: range {i}, last byte");
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (0..ranges.len()).collect::<Vec<_>>(), "seed {seed}: order");
    }
}

#[test]
fn an_error_of_the_callback_stops_the_reads_and_the_handle_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 8 * MIB);
    let sock = dir.path().join("nbd.sock");
    let _server = serve(&img, &sock);
    let mut n = connect(&sock);
    let ranges: Vec<(u64, usize)> = (0..32).map(|i| (i * 256 * 1024, 256 * 1024)).collect();
    let mut calls = 0;
    let e = n
        .pread_pipelined(&ranges, 8, &knib_core::Control::new(), &mut |_, _| {
            calls += 1;
            if calls == 3 {
                return Err(knib_core::KnibError::invalid("stop here"));
            }
            Ok(())
        })
        .unwrap_err();
    assert!(e.to_string().contains("stop here"), "{e}");
    assert_eq!(calls, 3);
    // The reads left in flight were taken off: the next read is answered.
    let mut buf = vec![0u8; 4096];
    n.pread(&mut buf, 5 * MIB).unwrap();
    assert!(buf.iter().all(|b| *b == expected(5 * MIB)));
}

#[test]
fn a_server_killed_during_the_reads_gives_an_error_naming_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 * MIB);
    let sock = dir.path().join("nbd.sock");
    let mut server = serve(&img, &sock);
    let mut n = connect(&sock);
    let ranges: Vec<(u64, usize)> = (0..64).map(|i| (i * 256 * 1024 % (15 * MIB), 256 * 1024)).collect();
    let mut calls = 0;
    let start = Instant::now();
    let r = n.pread_pipelined(&ranges, 8, &knib_core::Control::new(), &mut |_, _| {
        calls += 1;
        if calls == 2 {
            server.0.kill().unwrap();
            server.0.wait().unwrap();
        }
        Ok(())
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("NBD read of"), "{e}");
    assert!(calls < ranges.len(), "every read succeeded after the server was killed");
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// Send `signal` (`STOP`, `CONT`) to the server.
fn signal(server: &Server, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(server.0.id().to_string()).status().unwrap();
    assert!(ok.success());
}

/// A server that stops answering (qemu-nbd stopped: the kernel still
/// accepts connections on its socket, nothing answers) fails a connection
/// and a block status after the timeout, and a cancel ends them sooner.
/// Before, both waited in libnbd for as long as the server was silent,
/// with the VM's lock and its backup job held.
#[test]
fn a_silent_server_fails_the_connection_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 4 * MIB);
    let sock = dir.path().join("nbd.sock");
    // Persistent, several clients at once.
    let server = serve_with(&img, &sock, &["--persistent", "--shared", "4"]);
    let mut n = connect(&sock);
    let (end, got) = n.block_status(0, 4 * MIB, &Control::new()).unwrap();
    assert_eq!(end, 4 * MIB);
    assert_eq!(got[0].0, BASE_ALLOCATION);
    signal(&server, "STOP");

    // The connection: the socket is accepted, the greeting never comes.
    let t = Instant::now();
    let e = Nbd::connect_unix_within(&sock, "disk", &[BASE_ALLOCATION], &Control::new(), Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(e.message.contains("connection to export disk") && e.message.contains("answered nothing for 1 s"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "waited {:?}", t.elapsed());
    // A cancel from another thread ends the wait (default timeout: 120 s).
    let ctl = Control::new();
    let token = ctl.cancel.clone();
    let t = Instant::now();
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            token.cancel();
        });
        Nbd::connect_unix(&sock, "disk", &[BASE_ALLOCATION], &ctl).unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "waited {:?}", t.elapsed());

    // Block status on the connection made before the server stopped.
    n.set_reply_timeout(Duration::from_secs(1));
    let t = Instant::now();
    let e = n.block_status(0, 4 * MIB, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(e.message.contains("block status of"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "waited {:?}", t.elapsed());
    // The connection was cut: later calls fail at once, and dropping it
    // does not wait for the silent server.
    let e = n.block_status(0, 4 * MIB, &Control::new()).unwrap_err();
    assert!(e.message.contains("was closed after an earlier error"), "{e}");
    drop(n);

    // A connection made, then the server silent: closing it (the drop
    // tells the server) gives up after a short while.
    signal(&server, "CONT");
    let n = connect(&sock);
    signal(&server, "STOP");
    let t = Instant::now();
    drop(n);
    assert!(t.elapsed() < Duration::from_secs(10), "the close waited {:?}", t.elapsed());
    signal(&server, "CONT");
}

/// A copy of an export that fails midway (its server killed once the copy
/// began) leaves nothing under the backup file's name, nor its temporary:
/// a file there is always a whole copy. Before, the copy wrote the backup
/// file itself, and a copy killed midway left a partial one, which the
/// agent's cleanup took for a finished backup and kept.
#[test]
fn a_copy_of_an_export_that_fails_midway_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 * MIB);
    let sock = dir.path().join("nbd.sock");
    // Persistent (-t): it outlives the connection that waits for it.
    let mut server = serve_with(&img, &sock, &["-t"]);
    drop(connect(&sock));
    let dest = dir.path().join("out").join("vda.qcow2");
    std::fs::create_dir(dest.parent().unwrap()).unwrap();
    let at = format!("creating {}", dest.parent().unwrap().display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "no pause at {at}");
            let _ = server.0.kill();
            let _ = server.0.wait();
        });
        knib_core::engine::bitmap_copy::copy_export(&sock, "disk", None, &dest, None, None, false, &Control::new())
            .unwrap_err()
    });
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?} ({e})");
    // Whole, it is there.
    let _server = serve_with(&img, &sock, &["-t"]);
    drop(connect(&sock));
    knib_core::engine::bitmap_copy::copy_export(&sock, "disk", None, &dest, None, None, false, &Control::new())
        .unwrap();
    let out = Command::new("qemu-img").args(["compare", "-q"]).arg(&img).arg(&dest).status().unwrap();
    assert!(out.success(), "the copy differs from the image");
}
