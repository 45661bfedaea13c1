//! A small read-only NBD server: it serves a flattened disk (a qcow2
//! [`Chain`] read through knib's own reader, e.g. a backup volume in the
//! vault) as raw bytes on a UNIX socket, so that QEMU can use it as the
//! backing file of an overlay (quick restore from the vault).
//!
//! # Protocol
//!
//! The fixed newstyle handshake (with `NBD_FLAG_NO_ZEROES`), the options
//! `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME` and `NBD_OPT_ABORT`
//! (every other option is answered `NBD_REP_ERR_UNSUP`, so clients fall
//! back to simple replies and no meta contexts), one export named `""`,
//! simple replies only, and the commands `NBD_CMD_READ`, `NBD_CMD_FLUSH`
//! (nothing to flush) and `NBD_CMD_DISC`; writes, trims and every other
//! command are refused (`EPERM` for what would change the disk, `EINVAL`
//! for the rest); the export flags say read-only. Requests of more than
//! [`MAX_REQUEST`] bytes are refused; a write longer than that (whose
//! payload cannot be skipped safely) ends the connection.
//!
//! # Why written here
//!
//! crates.io has no well-kept NBD server: the `nbd` crate (last released
//! years ago) has an old-style handshake without `NBD_OPT_GO`, and the
//! servers of the NBD project, nbdkit and QEMU are C programs that cannot
//! read a chain through knib's reader over ranged GETs. The server side of
//! the part knib needs is small (a few hundred lines) and is tested against
//! libnbd, the NBD project's own client (and QEMU's client in the vault
//! tests).
//!
//! # Invariants
//!
//! - UNIX sockets only, never TCP, of mode 0600: the socket's owner alone
//!   may connect (the vault's quick restore gives it to QEMU's user).
//! - At most [`MAX_CONNECTIONS`] connections at a time (each has a thread
//!   and up to a request's buffer, [`MAX_REQUEST`]): a client that opens
//!   more gets its connection closed, so it cannot take the host's memory
//!   or the process's file descriptors; a failing `accept` is retried
//!   after a pause, not in a loop, and both are logged at most every 10 s.
//! - Read-only: nothing a client sends changes the export.
//! - Each connection has its own thread; reads of the shared export are
//!   serialised by a mutex (a chain's reader is not shared).
//! - A client's bad request is answered with an error or ends its
//!   connection; it never ends the server.
//! - The handshake must be done within [`HANDSHAKE_TIMEOUT`] (one deadline
//!   for all of it, not per read), or the connection is closed: a client
//!   that connects and sends nothing (or a byte now and then) cannot hold
//!   a slot. Once in the transmission phase a connection has no idle
//!   timeout: QEMU's client sends nothing while its guest reads nothing
//!   from the backing export (for hours, on a quick-restore overlay), and
//!   a running QEMU does not reconnect to an export that closed it.
//! - A connection's slot is given back when its thread ends, even by a
//!   panic (a guard in the thread).
//! - Dropping the server wakes its accepting thread with `shutdown(2)` on
//!   the listening socket, not by connecting to its path (which may have
//!   been removed or replaced meanwhile).

use std::cell::Cell;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{KnibError, Result};
use crate::qcow2::Chain;

/// The longest read (and the longest write payload skipped) a request may
/// ask for: 32 MiB, what the protocol lets a client assume.
pub const MAX_REQUEST: u32 = 32 << 20;

/// The most connections a server keeps open at once (QEMU opens one per
/// disk it reads; a block job or `qemu-img` one more).
pub const MAX_CONNECTIONS: usize = 16;
/// The longest option payload accepted.
const MAX_OPTION: u32 = 4096;
/// The time a client has, from its connection, to end the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const C_FLAG_FIXED_NEWSTYLE: u32 = 1;
const C_FLAG_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// What an NBD server serves: a disk of `size` bytes read at offsets.
pub trait Export: Send {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the disk's bytes from `offset` (within the size).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl Export for Chain {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Chain::read_at(self, offset, buf)
    }
}

/// A running server on one UNIX socket. Dropping it stops accepting
/// connections (those open end when their clients disconnect) and removes
/// the socket.
pub struct NbdServer {
    path: PathBuf,
    /// The socket file's device and inode as bound: the file removed on
    /// drop only if it is still this one.
    id: Option<(u64, u64)>,
    /// The listening socket, shared with the accepting thread so that its
    /// descriptor stays open until the drop has shut it down.
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// A connection's slot in the count of open connections (counted by the
/// accepting thread before it starts the connection's thread), given back
/// when that thread ends, by returning or by a panic.
struct Slot {
    open: Arc<AtomicUsize>,
    name: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!("NBD export {}: a connection's thread panicked; its connection is closed", self.name);
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A file's device and inode, to tell whether a path still names it.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Temporary directories of [`bind_private`].
static BIND_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A listening socket at `path` that only its owner could ever connect
/// to: bound in a new directory of mode 0700 beside `path`, given mode
/// 0600, then renamed to `path` (never over an existing entry). Bound at
/// `path` directly, the socket would have the umask's mode until changed,
/// and a connection made meanwhile would wait in the backlog to be served.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = crate::fsio::parent_dir(path);
    let dir = parent.join(format!(".knib-nbd-{}-{}", std::process::id(), BIND_COUNTER.fetch_add(1, Ordering::SeqCst)));
    let tmp = dir.join("s");
    if tmp.as_os_str().len() > 107 {
        return Err(KnibError::invalid(format!(
            "the NBD socket path {} is too long for its temporary name {} (107 bytes)",
            path.display(),
            tmp.display()
        )));
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| KnibError::io("cannot create", &dir, e))?;
    let r = (|| {
        let listener = UnixListener::bind(&tmp).map_err(|e| KnibError::io("cannot listen on", &tmp, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| KnibError::io("cannot change the mode of", &tmp, e))?;
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        renameat_with(CWD, &tmp, CWD, path, RenameFlags::NOREPLACE)
            .map_err(|e| KnibError::io(&format!("cannot rename {} to", tmp.display()), path, e.into()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    r
}

impl NbdServer {
    /// Serve `export` (named `name` in logs) on a new UNIX socket at
    /// `path` (which must not exist; its owner's alone from the start:
    /// bound in a private directory and renamed into place), each connection
    /// on its own thread.
    pub fn start(path: &Path, name: &str, export: Box<dyn Export>) -> Result<NbdServer> {
        Self::start_with(path, name, export, HANDSHAKE_TIMEOUT)
    }

    /// [`NbdServer::start`], with a client's time for its handshake.
    fn start_with(path: &Path, name: &str, export: Box<dyn Export>, handshake: Duration) -> Result<NbdServer> {
        if path.as_os_str().len() > 107 {
            return Err(KnibError::invalid(format!(
                "the NBD socket path {} is longer than a UNIX socket path may be (107 bytes)",
                path.display()
            )));
        }
        let listener = Arc::new(bind_private(path)?);
        let id = file_id(path);
        let l = Arc::clone(&listener);
        let stop = Arc::new(AtomicBool::new(false));
        let export: Arc<Mutex<Box<dyn Export>>> = Arc::new(Mutex::new(export));
        let s = Arc::clone(&stop);
        let name = name.to_string();
        let for_log = name.clone();
        let shown = path.display().to_string();
        let accept = std::thread::Builder::new()
            .name("knib-nbd".into())
            .spawn(move || {
                let open = Arc::new(AtomicUsize::new(0));
                let mut quiet_until = std::time::Instant::now();
                // At most one line every 10 s for what a client can repeat.
                let mut say = |what: String| {
                    if std::time::Instant::now() >= quiet_until {
                        log::warn!("NBD server on {shown}: {what}");
                        quiet_until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    }
                };
                for conn in l.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(c) if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS => {
                            drop(c);
                            say(format!("{MAX_CONNECTIONS} connections are open; another one was closed"));
                        }
                        Ok(c) => {
                            let e = Arc::clone(&export);
                            let n = for_log.clone();
                            open.fetch_add(1, Ordering::SeqCst);
                            let done = Arc::clone(&open);
                            let r = std::thread::Builder::new().name("knib-nbd-conn".into()).spawn(move || {
                                // Given back however the thread ends.
                                let slot = Slot { open: done, name: n };
                                match serve_connection(c, &e, handshake) {
                                    Ok(()) => log::debug!("NBD export {}: a client disconnected", slot.name),
                                    Err(err) => log::info!("NBD export {}: connection ended: {err}", slot.name),
                                }
                            });
                            // The closure did not run: no slot was made.
                            if let Err(err) = r {
                                open.fetch_sub(1, Ordering::SeqCst);
                                say(format!("cannot start a connection thread: {err}"));
                            }
                        }
                        Err(err) => {
                            say(format!("accept failed: {err}"));
                            // Out of descriptors, say: the connection stays
                            // queued, and accept would fail again at once.
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| KnibError::internal(format!("cannot start the NBD server thread: {e}")))?;
        log::info!("NBD server for {name} on {}", path.display());
        Ok(NbdServer { path: path.to_path_buf(), id, listener, stop, accept: Some(accept) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread: on Linux, shutting a listening socket
        // down makes a blocked accept fail (EINVAL), and every later one.
        // SAFETY: the descriptor is the listener's, kept open by the Arc
        // held here; shutdown takes no pointer.
        let r = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if r != 0 {
            // Never block on a thread that was not woken.
            log::warn!(
                "NBD server on {}: cannot shut its socket down ({}); its thread is left",
                self.path.display(),
                std::io::Error::last_os_error()
            );
            self.accept.take();
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Not a file put at the path since.
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why a connection ends.
#[derive(Debug)]
enum End {
    Io(std::io::Error),
    Protocol(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Io(e) => write!(f, "{e}"),
            End::Protocol(s) => f.write_str(s),
        }
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Io(e)
    }
}

type Conn<T> = std::result::Result<T, End>;

fn read_u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// A connection's socket, read and written before a deadline (all of
/// it shared by the reading and the writing half) or, without one, with
/// no timeout.
struct Timed {
    stream: UnixStream,
    until: Rc<Cell<Option<Instant>>>,
}

impl Timed {
    /// Set the socket's timeouts to what is left before the deadline.
    fn arm(&self) -> std::io::Result<()> {
        let Some(until) = self.until.get() else {
            return Ok(());
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// One client, from the handshake (to be done within `limit`) to its
/// disconnection.
fn serve_connection(stream: UnixStream, export: &Mutex<Box<dyn Export>>, limit: Duration) -> Conn<()> {
    let until = Rc::new(Cell::new(Some(Instant::now() + limit)));
    let mut r = BufReader::new(Timed { stream: stream.try_clone()?, until: Rc::clone(&until) });
    let mut w = BufWriter::new(Timed { stream, until: Rc::clone(&until) });
    let size = export.lock().size();
    match handshake(&mut r, &mut w, size) {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(End::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(End::Protocol(format!(
                "the client did not end its handshake within {} s ({e}); it was disconnected",
                limit.as_secs_f64()
            )));
        }
        Err(e) => return Err(e),
    }
    // No idle timeout from here (see the module's invariants).
    until.set(None);
    // (The two halves share one socket, and its timeouts.)
    r.get_ref().stream.set_read_timeout(None)?;
    r.get_ref().stream.set_write_timeout(None)?;
    transmission(&mut r, &mut w, export, size)
}

/// The handshake and option haggling: whether the client went on to the
/// transmission phase (false: it aborted).
fn handshake(r: &mut impl Read, w: &mut impl Write, size: u64) -> Conn<bool> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let cflags = read_u32(r)?;
    if cflags & !(C_FLAG_FIXED_NEWSTYLE | C_FLAG_NO_ZEROES) != 0 {
        return Err(End::Protocol(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & C_FLAG_NO_ZEROES != 0;
    loop {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(End::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(End::Protocol(format!("option {option} of {len} bytes (at most {MAX_OPTION})")));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if !data.is_empty() {
                    return Err(End::Protocol(format!(
                        "no export named {:?} (the one export is named \"\")",
                        String::from_utf8_lossy(&data)
                    )));
                }
                w.write_all(&size.to_be_bytes())?;
                w.write_all(&EXPORT_FLAGS.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0; 124])?;
                }
                w.flush()?;
                return Ok(true);
            }
            OPT_ABORT => {
                // The client may close before reading the answer.
                let _ = option_reply(w, option, REP_ACK, &[]);
                return Ok(false);
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    option_reply(w, option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO request")?;
                    continue;
                };
                if !name.is_empty() {
                    option_reply(w, option, REP_ERR_UNKNOWN, b"no such export (the one export is named \"\")")?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                option_reply(w, option, REP_INFO, &info)?;
                if requests.contains(&INFO_BLOCK_SIZE) {
                    let mut b = Vec::with_capacity(14);
                    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    option_reply(w, option, REP_INFO, &b)?;
                }
                option_reply(w, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(w, option, REP_ERR_UNSUP, b"not supported by knib's read-only server")?,
        }
    }
}

/// The export name and information requests of an `NBD_OPT_INFO`/`GO`.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let n = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + n)?;
    let rest = data.get(4 + n..)?;
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

fn simple_reply(w: &mut impl Write, error: u32, cookie: u64, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// The transmission phase: requests answered in order until `NBD_CMD_DISC`.
fn transmission(r: &mut impl Read, w: &mut impl Write, export: &Mutex<Box<dyn Export>>, size: u64) -> Conn<()> {
    let mut buf = Vec::new();
    loop {
        let magic = read_u32(r)?;
        if magic != REQUEST_MAGIC {
            return Err(End::Protocol(format!("bad request magic {magic:#x}")));
        }
        let _flags = read_u16(r)?;
        let kind = read_u16(r)?;
        let cookie = read_u64(r)?;
        let offset = read_u64(r)?;
        let len = read_u32(r)?;
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
        match kind {
            CMD_READ => {
                if len > MAX_REQUEST || !in_range {
                    simple_reply(w, EINVAL, cookie, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                let got = export.lock().read_at(offset, &mut buf);
                match got {
                    Ok(()) => simple_reply(w, 0, cookie, &buf)?,
                    Err(e) => {
                        log::warn!("NBD read of {len} bytes at {offset}: {e}");
                        simple_reply(w, EIO, cookie, &[])?;
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(End::Protocol(format!("a write of {len} bytes (refused; at most {MAX_REQUEST})")));
                }
                std::io::copy(&mut r.take(u64::from(len)), &mut std::io::sink())?;
                simple_reply(w, EPERM, cookie, &[])?;
            }
            CMD_DISC => return Ok(()),
            CMD_FLUSH => simple_reply(w, 0, cookie, &[])?,
            CMD_TRIM | CMD_WRITE_ZEROES => simple_reply(w, EPERM, cookie, &[])?,
            _ => simple_reply(w, EINVAL, cookie, &[])?,
        }
    }
}

#[cfg(all(test, feature = "libvirt"))]
mod tests {
    use super::*;
    use crate::nbd::Nbd;
    use crate::progress::Control;

    /// A disk whose byte at `i` is `i % 251`.
    struct Pattern(u64);

    impl Export for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| ((offset + i) % 251) as u8).collect()
    }

    #[test]
    fn libnbd_reads_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let server = NbdServer::start(&sock, "pattern", Box::new(Pattern(10 << 20))).unwrap();
        let mut c = Nbd::connect_unix(&sock, "", &[], &Control::new()).unwrap();
        assert_eq!(c.size().unwrap(), 10 << 20);
        let mut buf = vec![0; 1 << 20];
        c.pread(&mut buf, 3 << 20).unwrap();
        assert_eq!(buf, pattern(3 << 20, 1 << 20));
        let mut tail = vec![0; 100];
        c.pread(&mut tail, (10 << 20) - 100).unwrap();
        assert_eq!(tail, pattern((10 << 20) - 100, 100));
        // Past the end: refused, and the connection goes on.
        assert!(c.pread(&mut tail, (10 << 20) - 50).is_err());
        c.pread(&mut tail, 7).unwrap();
        assert_eq!(tail, pattern(7, 100));
        // A second client at the same time.
        let mut c2 = Nbd::connect_unix(&sock, "", &[], &Control::new()).unwrap();
        c2.pread(&mut tail, 1000).unwrap();
        assert_eq!(tail, pattern(1000, 100));
        drop(c);
        drop(c2);
        drop(server);
        assert!(!sock.exists());
    }

    /// A disk whose reads past `from` wait `hold` (a hung storage).
    struct Hangs {
        size: u64,
        from: u64,
        hold: std::time::Duration,
    }

    impl Export for Hangs {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
            if offset >= self.from {
                std::thread::sleep(self.hold);
            }
            buf.fill(7);
            Ok(())
        }
    }

    /// A server that stops answering fails a pipelined read after the
    /// reply timeout, and a cancellation ends it within a poll, instead of
    /// waiting for ever (with the VM's lock and its backup job held).
    #[test]
    fn a_silent_server_or_a_cancel_ends_a_pipelined_read() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let hold = Duration::from_secs(6);
        let _server = NbdServer::start(&sock, "hangs", Box::new(Hangs { size: 8 << 20, from: 4 << 20, hold })).unwrap();
        let ranges: Vec<(u64, usize)> = (0..8u64).map(|i| (i << 20, 1 << 20)).collect();
        let mut c = Nbd::connect_unix(&sock, "", &[], &Control::new()).unwrap();
        c.set_reply_timeout(Duration::from_secs(1));
        let started = Instant::now();
        let mut seen = Vec::new();
        let e = c.pread_pipelined(&ranges, 2, &Control::new(), &mut |i, _| {
            seen.push(i);
            Ok(())
        });
        let e = e.unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Timeout, "{e}");
        assert!(e.message.contains("answered nothing for 1 s"), "{e}");
        assert!(started.elapsed() < hold, "waited {:?}", started.elapsed());
        assert_eq!(seen, vec![0, 1, 2, 3]);
        drop(c);
        // A cancel from another thread, with the default reply timeout.
        let mut c = Nbd::connect_unix(&sock, "", &[], &Control::new()).unwrap();
        let ctl = Control::new();
        let token = ctl.cancel.clone();
        let started = Instant::now();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                token.cancel();
            });
            c.pread_pipelined(&ranges, 2, &ctl, &mut |_, _| Ok(())).unwrap_err()
        });
        assert_eq!(e.kind, crate::ErrorKind::Cancelled, "{e}");
        assert!(started.elapsed() < hold, "waited {:?}", started.elapsed());
    }

    /// The socket is its owner's alone; a client cannot open more than
    /// MAX_CONNECTIONS connections, and a slot is free again once one ends.
    #[test]
    fn the_socket_is_its_owners_and_connections_are_capped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let _server = NbdServer::start(&sock, "pattern", Box::new(Pattern(1 << 20))).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777, 0o600);
        // Bound in a private directory and renamed: nothing else is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let greeted = |s: &mut UnixStream| {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let mut magic = [0u8; 8];
            match s.read(&mut magic) {
                Ok(8) => magic == *b"NBDMAGIC",
                _ => false,
            }
        };
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = UnixStream::connect(&sock).unwrap();
            assert!(greeted(&mut s));
            held.push(s);
        }
        let mut extra = UnixStream::connect(&sock).unwrap();
        assert!(!greeted(&mut extra), "connection {} was served", MAX_CONNECTIONS + 1);
        drop(held);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut c = loop {
            match Nbd::connect_unix(&sock, "", &[], &Control::new()) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > until => panic!("no slot freed: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        assert_eq!(c.size().unwrap(), 1 << 20);
    }

    /// A client connection that is not refused: it reads the greeting.
    fn greeted(s: &mut UnixStream) -> bool {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut magic = [0u8; 8];
        matches!(s.read(&mut magic), Ok(8)) && magic == *b"NBDMAGIC"
    }

    /// libnbd's client connects within 10 s (a slot may take a moment to
    /// be given back).
    fn connect_soon(sock: &Path) -> Nbd {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Nbd::connect_unix(sock, "", &[], &Control::new()) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > until => panic!("no slot freed: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    /// Clients that connect and send nothing, or trickle an option a byte
    /// at a time, are disconnected when the handshake's time is up: they
    /// cannot hold every slot, and a real client connects afterwards.
    #[test]
    fn a_client_that_sends_nothing_is_disconnected_after_the_handshake_timeout() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let limit = Duration::from_secs(2);
        let _server = NbdServer::start_with(&sock, "pattern", Box::new(Pattern(1 << 20)), limit).unwrap();
        let started = Instant::now();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            let mut s = UnixStream::connect(&sock).unwrap();
            assert!(greeted(&mut s));
            held.push(s);
        }
        // The last one sends a byte every 100 ms: never silent for long,
        // and never done.
        let mut slow = UnixStream::connect(&sock).unwrap();
        assert!(greeted(&mut slow));
        let trickle = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&(C_FLAG_FIXED_NEWSTYLE | C_FLAG_NO_ZEROES).to_be_bytes());
            bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
            bytes.extend_from_slice(&3u32.to_be_bytes());
            bytes.extend_from_slice(&MAX_OPTION.to_be_bytes());
            bytes.resize(bytes.len() + MAX_OPTION as usize, 0);
            let t = Instant::now();
            for b in bytes {
                if slow.write_all(&[b]).is_err() {
                    return Some(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        });
        // Every slot is taken.
        let mut extra = UnixStream::connect(&sock).unwrap();
        assert!(!greeted(&mut extra), "connection {} was served", MAX_CONNECTIONS + 1);
        assert!(started.elapsed() < limit, "too slow to test: {:?}", started.elapsed());
        // The silent ones are closed by the server (end of file).
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut rest = Vec::new();
            let r = s.read_to_end(&mut rest);
            assert!(r.is_ok(), "not closed by the server: {r:?}");
        }
        let sent_for = trickle.join().unwrap().expect("the trickling client was never disconnected");
        assert!(sent_for < Duration::from_secs(20), "{sent_for:?}");
        let mut c = connect_soon(&sock);
        assert_eq!(c.size().unwrap(), 1 << 20);
    }

    /// A disk whose reads panic (a reader's bug).
    struct Panics;

    impl Export for Panics {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
            panic!("test: a reader's bug");
        }
    }

    /// A connection whose thread panics gives its slot back: more panics
    /// than there are slots, and a client still connects.
    #[test]
    fn a_panicking_connection_gives_its_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let _server = NbdServer::start(&sock, "panics", Box::new(Panics)).unwrap();
        let mut buf = [0; 512];
        for i in 0..MAX_CONNECTIONS + 2 {
            let mut c = connect_soon(&sock);
            assert!(c.pread(&mut buf, 0).is_err(), "read {i} answered");
        }
        let mut c = connect_soon(&sock);
        assert_eq!(c.size().unwrap(), 1 << 20);
    }

    /// Dropping a server returns when its socket's path was removed, or
    /// replaced by another socket (which it leaves), before.
    #[test]
    fn a_server_whose_socket_was_removed_or_replaced_drops() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.sock");
        let replaced = dir.path().join("replaced.sock");
        let a = NbdServer::start(&gone, "pattern", Box::new(Pattern(1 << 20))).unwrap();
        let b = NbdServer::start(&replaced, "pattern", Box::new(Pattern(1 << 20))).unwrap();
        std::fs::remove_file(&gone).unwrap();
        std::fs::remove_file(&replaced).unwrap();
        let other = UnixListener::bind(&replaced).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for server in [a, b] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                drop(server);
                tx.send(()).unwrap();
            });
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(60)).expect("dropping the server did not return");
        }
        // The other socket is left, and nothing connected to it.
        assert!(replaced.exists());
        other.set_nonblocking(true).unwrap();
        assert!(other.accept().is_err());
    }

    #[test]
    fn unknown_exports_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let _server = NbdServer::start(&sock, "pattern", Box::new(Pattern(1 << 20))).unwrap();
        let e = Nbd::connect_unix(&sock, "other", &[], &Control::new()).unwrap_err();
        assert!(e.message.contains("other"), "{e}");
        // The server goes on.
        let mut c = Nbd::connect_unix(&sock, "", &[], &Control::new()).unwrap();
        assert_eq!(c.size().unwrap(), 1 << 20);
    }

    /// The raw protocol: the old `NBD_OPT_EXPORT_NAME`, a write refused
    /// with EPERM, a flush, a read, then `NBD_CMD_DISC`.
    #[test]
    fn export_name_writes_refused_and_disc() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let _server = NbdServer::start(&sock, "pattern", Box::new(Pattern(1 << 20))).unwrap();
        let mut s = UnixStream::connect(&sock).unwrap();
        assert_eq!(read_u64(&mut s).unwrap(), NBDMAGIC);
        assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
        assert_eq!(read_u16(&mut s).unwrap(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&(C_FLAG_FIXED_NEWSTYLE | C_FLAG_NO_ZEROES).to_be_bytes()).unwrap();
        // An unknown option (NBD_OPT_LIST) is refused.
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(&0u32.to_be_bytes()).unwrap();
        assert_eq!(read_u64(&mut s).unwrap(), REPLY_MAGIC);
        assert_eq!(read_u32(&mut s).unwrap(), 3);
        assert_eq!(read_u32(&mut s).unwrap(), REP_ERR_UNSUP);
        let n = read_u32(&mut s).unwrap();
        let mut skip = vec![0; n as usize];
        s.read_exact(&mut skip).unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&OPT_EXPORT_NAME.to_be_bytes()).unwrap();
        s.write_all(&0u32.to_be_bytes()).unwrap();
        assert_eq!(read_u64(&mut s).unwrap(), 1 << 20);
        assert_eq!(read_u16(&mut s).unwrap(), EXPORT_FLAGS);
        let request = |s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32| {
            s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
            s.write_all(&0u16.to_be_bytes()).unwrap();
            s.write_all(&kind.to_be_bytes()).unwrap();
            s.write_all(&cookie.to_be_bytes()).unwrap();
            s.write_all(&offset.to_be_bytes()).unwrap();
            s.write_all(&len.to_be_bytes()).unwrap();
        };
        let reply = |s: &mut UnixStream| {
            assert_eq!(read_u32(s).unwrap(), SIMPLE_REPLY_MAGIC);
            let e = read_u32(s).unwrap();
            (e, read_u64(s).unwrap())
        };
        request(&mut s, CMD_WRITE, 1, 0, 8);
        s.write_all(&[9; 8]).unwrap();
        assert_eq!(reply(&mut s), (EPERM, 1));
        request(&mut s, CMD_FLUSH, 2, 0, 0);
        assert_eq!(reply(&mut s), (0, 2));
        request(&mut s, CMD_READ, 3, 500, 16);
        assert_eq!(reply(&mut s), (0, 3));
        let mut data = [0; 16];
        s.read_exact(&mut data).unwrap();
        assert_eq!(data.to_vec(), pattern(500, 16));
        request(&mut s, CMD_DISC, 4, 0, 0);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    /// QEMU's client, through `qemu-img convert`: a qcow2 chain served
    /// flattened comes out byte for byte.
    #[test]
    fn qemu_img_reads_a_served_chain() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let raw = dir.path().join("a.raw");
        std::fs::write(&raw, pattern(0, 3 << 20)).unwrap();
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        let chain = Chain::open(&img).unwrap();
        let sock = dir.path().join("c.sock");
        let _server = NbdServer::start(&sock, "chain", Box::new(chain)).unwrap();
        let out = dir.path().join("out.raw");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "raw"])
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read(&out).unwrap(), pattern(0, 3 << 20));
    }
}
