//! A vault that stops answering in the middle of an operation, against a
//! real S3 server (Ceph RGW, `scripts/ceph.sh`; see `common/s3.rs`) reached
//! through a TCP relay of this test that can be cut: what the vault holds
//! is not judged by a network that failed.
//!
//! Through a relay that carries bytes slowly, or stalls, the vault's
//! transfers are judged by their progress: one that keeps moving is never
//! cut, however long it takes; one where nothing moves for the stall
//! timeout fails saying so, after its retries.
//!
//! The relay is this binary's only endpoint (`AWS_ENDPOINT_URL` is the
//! process's environment), so it has a test binary of its own.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::disk::*;
use knib_core::catalog::{BackupOptions, Store};
use knib_core::qemu_img::ImageFormat;
use knib_core::vault::{SyncOptions, Vault};
use knib_core::{Control, ErrorKind};

/// Held by each test: the relay is the process's endpoint
/// (`AWS_ENDPOINT_URL`), so the tests take turns.
static ENDPOINT: Mutex<()> = Mutex::new(());

/// The vault's stall timeout, in seconds (set by a test, in its turn).
const STALL: &str = "KNIB_VAULT_STALL_TIMEOUT";

/// This test's turn at the endpoint, set to the S3 server itself (not a
/// relay another test left), and the server's address for a relay; the
/// stall timeout is the default.
fn turn() -> (MutexGuard<'static, ()>, String) {
    let turn = ENDPOINT.lock().unwrap_or_else(|e| e.into_inner());
    let endpoint = s3::settings().unwrap()["AWS_ENDPOINT_URL"].clone();
    std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
    std::env::remove_var(STALL);
    (turn, endpoint.trim_start_matches("http://").trim_end_matches('/').to_string())
}

/// How a [`Relay`] carries its connections: at most `rate` bytes a second
/// each way, each; no more than `up` bytes of what each connection's
/// client sends, and no more than `down` bytes of what the server answers
/// in all: past them, the connections stall, open, nothing more read from
/// that side.
#[derive(Clone, Copy)]
struct Link {
    rate: u64,
    up: u64,
    down: u64,
}

/// As fast as the relay's threads go, nothing held.
const FREE: Link = Link { rate: u64::MAX, up: u64::MAX, down: u64::MAX };

/// A TCP relay from a local port to the S3 server, as its [`Link`] says,
/// until [`Relay::cut`] (or its drop): then every connection through it is
/// shut and new ones are refused.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

/// Carry `from` to `into` at `rate`, until either end closes or the relay
/// is cut; once `moved` (shared or not) reaches `limit`, nothing more.
fn pump(mut from: TcpStream, mut into: TcpStream, rate: u64, limit: u64, moved: Arc<AtomicU64>, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 << 10];
    while !cut.load(Ordering::SeqCst) {
        let room = limit.saturating_sub(moved.load(Ordering::SeqCst));
        if room == 0 {
            // Stalled: the connection stays open, nothing is read.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let max = room.min(buf.len() as u64) as usize;
        let n = match from.read(&mut buf[..max]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if into.write_all(&buf[..n]).is_err() {
            break;
        }
        moved.fetch_add(n as u64, Ordering::SeqCst);
        if rate != u64::MAX {
            // Paced per read: a connection left idle gains no credit.
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = into.shutdown(Shutdown::Write);
}

/// Make the connections `listener` accepts look like a network's, not
/// loopback's: segments of 1400 bytes, a receive buffer of 64 KiB. (With
/// loopback's 64 KiB segments, the client's socket buffer alone holds
/// megabytes, which a slow link takes seconds to drain after the client
/// handed over its last byte: a stall as the client sees it.)
fn like_a_network(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    for (level, opt, v) in [(libc::IPPROTO_TCP, libc::TCP_MAXSEG, 1400), (libc::SOL_SOCKET, libc::SO_RCVBUF, 64 << 10)]
    {
        let v: libc::c_int = v;
        // SAFETY: a valid socket and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

impl Relay {
    fn new(to: &str) -> Relay {
        Relay::with(to, FREE)
    }

    fn with(to: &str, link: Link) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        like_a_network(&listener);
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let to = to.to_string();
        let (c, o) = (Arc::clone(&cut), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    // Refused: closed before a byte is read.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&to) else { continue };
                let mut kept = o.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(server.try_clone().unwrap());
                for (from, into, limit, moved) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), link.up, Arc::default()),
                    (server, client, link.down, Arc::clone(&down)),
                ] {
                    let c = Arc::clone(&c);
                    std::thread::spawn(move || pump(from, into, link.rate, limit, moved, c));
                }
            }
        });
        Relay { port, cut, open }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A verify whose vault stops answering while it reads a backup fails
/// with the I/O error: it does not report the backup as damaged (an
/// operator would delete or send again a backup that is whole).
#[test]
fn a_verify_cut_off_from_the_vault_fails_and_reports_no_damage() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("cut");
    let vm = TestDisks::two();
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x52 0 8M");
    let m1 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &Control::new()).unwrap();
    qemu_io(vm.path("root"), "write -P 0x53 4M 4M");
    let m2 = store.backup("vm1", &vm.disks, &BackupOptions::default(), &Control::new()).unwrap();
    Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &Control::new()).unwrap();

    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    // Through the relay, both backups are whole.
    let v = Vault::open(&p.location()).unwrap().verify(None, &Control::new()).unwrap();
    assert!(v.reports.len() == 2 && v.reports.iter().all(|r| r.ok), "{v:?}");

    // Cut while one backup is verified (its chain, both backups), then
    // while the whole vault is (the first backup's turn).
    for (which, at) in [(Some(m2.id.clone()), &m2.id), (None, &m1.id)] {
        let at = format!("verify of {at} in the vault");
        let relay = Relay::new(&server);
        std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
        let vault = Vault::open(&p.location()).unwrap();
        knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
        let verify = std::thread::spawn(move || vault.verify(which.as_deref(), &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the verify never began");
        relay.cut();
        let e = match verify.join().unwrap() {
            Ok(v) => panic!("a verify cut off from its vault answered {v:?}"),
            Err(e) => e,
        };
        assert_eq!(e.kind, ErrorKind::Io, "{e}");
        assert!(e.message.contains("cannot read"), "{e}");
    }
}

/// A sync of a whole store whose vault stops answering while it sends the
/// first VM ends there with the vault's error (origin
/// [`knib_core::Origin::Vault`]): it does not take the failure for that
/// VM's own and go on to the next one (each would fail alike, and the
/// error would blame the VMs).
#[test]
fn a_store_sync_cut_off_from_the_vault_ends_at_the_first_vm() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("netsync");
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let (a, b) = (TestDisks::two(), TestDisks::two());
    qemu_io(a.path("root"), "write -P 0x61 0 4M");
    qemu_io(b.path("root"), "write -P 0x62 0 4M");
    let ma = store.backup("vm-a", &a.disks, &BackupOptions::default(), &Control::new()).unwrap();
    let mb = store.backup("vm-b", &b.disks, &BackupOptions::default(), &Control::new()).unwrap();

    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let vault = Vault::open(&p.location()).unwrap();
    let at = format!("opening {} to send it", store.volume_file(&ma, "root").unwrap().display());
    knib_core::crashpoint::pause_before(&at, Duration::from_secs(2));
    let e = std::thread::scope(|s| {
        let sync = s.spawn(|| vault.sync_from(&store, &SyncOptions::default(), &Control::new()));
        assert!(knib_core::crashpoint::wait_for_pause(&at, Duration::from_secs(60)), "the sync never began");
        relay.cut();
        match sync.join().unwrap() {
            Ok(r) => panic!("a sync cut off from its vault answered {r:?}"),
            Err(e) => e,
        }
    });
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert_eq!(e.origin, knib_core::Origin::Vault, "{e}");
    assert!(e.message.starts_with(&format!("vault {}: ", p.location())), "{e}");
    assert!(!e.message.contains("VMs unsent") && !e.message.contains("vm-b"), "{e}");

    // Through a relay that answers, the next sync sends both.
    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let r = Vault::open(&p.location()).unwrap().sync_from(&store, &SyncOptions::default(), &Control::new()).unwrap();
    let mut sent = r.sent.clone();
    sent.sort();
    let mut want = vec![ma.id.clone(), mb.id.clone()];
    want.sort();
    assert_eq!(sent, want, "{r:?}");
}

/// Parts of 5 MiB, one at a time.
fn parts() -> SyncOptions {
    SyncOptions { part_size: 5 << 20, parallel_parts: 1, ..Default::default() }
}

/// A sync and a direct backup whose parts take 5 s and more through a link
/// of 1 MiB/s finish with a stall timeout of 2 s, and a restore whose GETs
/// (up to 1 MiB) take up to 4 s through one of 256 KiB/s with a stall
/// timeout of 1 s: they keep moving. (With
/// a total timeout per request, as before, every attempt of such a part
/// or GET was cut.) What they sent and read back is the disks' bytes.
#[test]
fn slow_transfers_that_keep_moving_are_not_cut() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("slow");
    let (a, b) = (TestDisks::two(), TestDisks::two());
    qemu_io(a.path("root"), "write -P 0x71 0 6M");
    qemu_io(a.path("data"), "write -P 0x72 0 2M");
    qemu_io(b.path("root"), "write -P 0x73 0 6M");
    qemu_io(b.path("data"), "write -P 0x74 0 2M");
    let (refs_a, refs_b) = (a.snapshot_all("a"), b.snapshot_all("b"));
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    let ma = store.backup("vm-a", &a.disks, &BackupOptions::default(), &Control::new()).unwrap();

    std::env::set_var(STALL, "2");
    let relay = Relay::with(&server, Link { rate: 1 << 20, ..FREE });
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let vault = Vault::open(&p.location()).unwrap();
    let t = Instant::now();
    let r = vault.sync_from(&store, &parts(), &Control::new()).unwrap();
    assert_eq!(r.sent, vec![ma.id.clone()], "{r:?}");
    assert!(t.elapsed() > Duration::from_secs(6), "the link was not slow: {:?}", t.elapsed());
    let ddir = tempfile::tempdir().unwrap();
    let direct = Store::create(ddir.path()).unwrap();
    let t = Instant::now();
    let mb = vault.backup_direct(&direct, "vm-b", &b.disks, &BackupOptions::default(), &parts(), &Control::new());
    let mb = mb.unwrap();
    assert!(t.elapsed() > Duration::from_secs(6), "the link was not slow: {:?}", t.elapsed());
    drop(relay);

    // Read back through a link of 256 KiB/s, with a stall timeout of 1 s:
    // a GET of up to 1 MiB (the read-ahead, the hash's ranges) takes up to
    // 4 s. (Before, the S3 client's total timeout cut such a GET, and its
    // retries went on from where the last attempt stopped: downloads
    // failed only below a few KiB/s.)
    std::env::set_var(STALL, "1");
    let relay = Relay::with(&server, Link { rate: 256 << 10, ..FREE });
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let vault = Vault::open(&p.location()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("a-data.raw");
    let t = Instant::now();
    let done = vault.restore(&ma.id, "data", &to, ImageFormat::Raw, true, &Control::new()).unwrap();
    assert!(done.verified);
    assert!(t.elapsed() > Duration::from_secs(4), "the link was not slow: {:?}", t.elapsed());
    assert_identical(&to, &refs_a["data"]);
    drop(relay);
    // The others, straight from the server.
    std::env::set_var("AWS_ENDPOINT_URL", s3::settings().unwrap()["AWS_ENDPOINT_URL"].clone());
    let vault = Vault::open(&p.location()).unwrap();
    for (m, refs, vol) in [(&ma, &refs_a, "root"), (&mb, &refs_b, "root"), (&mb, &refs_b, "data")] {
        let to = out.path().join(format!("{}-{vol}.raw", m.id));
        vault.restore(&m.id, vol, &to, ImageFormat::Raw, true, &Control::new()).unwrap();
        assert_identical(&to, &refs[vol]);
    }
    let v = vault.verify(None, &Control::new()).unwrap();
    assert!(v.reports.len() == 2 && v.reports.iter().all(|r| r.ok), "{v:?}");
}

/// A part whose upload stalls (the link takes 1 MiB of each connection's
/// upload, then nothing, the connection left open) fails the sync and the
/// direct backup after the retries, with an error naming the part and
/// saying the transfer stalled; so does a restore whose download stalls.
/// Nothing is published.
#[test]
fn a_transfer_that_stalls_fails_saying_so_after_its_retries() {
    if !s3::setup() {
        return;
    }
    let (_turn, server) = turn();
    let p = s3::Prefix::new("stall");
    let (a, b) = (TestDisks::two(), TestDisks::two());
    qemu_io(a.path("root"), "write -P 0x81 0 6M");
    qemu_io(b.path("root"), "write -P 0x82 0 6M");
    let sdir = tempfile::tempdir().unwrap();
    let store = Store::create(sdir.path()).unwrap();
    store.backup("vm-a", &a.disks, &BackupOptions::default(), &Control::new()).unwrap();

    std::env::set_var(STALL, "1");
    let relay = Relay::with(&server, Link { up: 1 << 20, ..FREE });
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let vault = Vault::open(&p.location()).unwrap();
    let e = vault.sync_from(&store, &parts(), &Control::new()).unwrap_err();
    assert_eq!((e.kind, e.origin), (ErrorKind::Io, knib_core::Origin::Vault), "{e}");
    for says in ["cannot send", "partNumber=1&", "after 5 retries", "the transfer stalled: no byte moved for 1 s"] {
        assert!(e.message.contains(says), "{says:?} not in: {e}");
    }
    let ddir = tempfile::tempdir().unwrap();
    let direct = Store::create(ddir.path()).unwrap();
    let opts = BackupOptions::default();
    let e = vault.backup_direct(&direct, "vm-b", &b.disks, &opts, &parts(), &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    for says in ["cannot send", "part 0 (5242880 bytes)", "after 5 retries", "the transfer stalled: no byte moved"] {
        assert!(e.message.contains(says), "{says:?} not in: {e}");
    }
    assert!(vault.list(None).unwrap().is_empty());
    drop(relay);

    // A download that stalls: a backup sent, then read through a link
    // that answers 1 MiB in all, then nothing.
    let relay = Relay::new(&server);
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let m = Vault::open(&p.location()).unwrap().sync_from(&store, &parts(), &Control::new()).unwrap().sent;
    drop(relay);
    let relay = Relay::with(&server, Link { down: 1 << 20, ..FREE });
    std::env::set_var("AWS_ENDPOINT_URL", relay.endpoint());
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("root.raw");
    let vault = Vault::open(&p.location()).unwrap();
    let e = vault.restore(&m[0], "root", &to, ImageFormat::Raw, true, &Control::new()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    for says in ["cannot read", "the transfer stalled", "1 s"] {
        assert!(e.message.contains(says), "{says:?} not in: {e}");
    }
    assert!(!to.exists());
}
