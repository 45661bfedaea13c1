//! Writing a file front to back with the writes done by I/O threads, so
//! that filling the next buffer overlaps the writing of the last one:
//! around the page cache (O_DIRECT, [`WriteMode::Direct`]) or through it,
//! written behind ([`WriteMode::Behind`], see `super::behind`).
//!
//! Why O_DIRECT: a backup's output is not read again soon, so caching it
//! only evicts the host's useful data; and on some hosts writing through
//! new page-cache pages costs several times what the device does (measured
//! on the first development machine, docs/performance.md). On NFS, where
//! each direct write is a synchronous round trip, and where the file system
//! refuses O_DIRECT, the same code writes behind. Why an I/O thread written
//! behind: the copy into the page cache (about 1 GB/s on the second
//! development machine) and the waits of write-behind are then off the
//! thread that fills the buffers.
//!
//! A writer that hashes does it on its I/O threads, each buffer just before
//! its write and in file order (a thread that takes a buffer waits until
//! the one before it is hashed): the hash (a few GB/s) is then off the
//! thread that fills the buffers, which in a copy also reads or receives
//! the data, and no buffer more is needed (a hashing stage of its own held
//! one, and left the device one write at a time).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use xxhash_rust::xxh3::Xxh3;

use super::behind::WriteBehind;
use crate::error::{KnibError, Result};

/// Alignment of O_DIRECT buffers, offsets and lengths.
const ALIGN: usize = 4096;
/// Each write is this long (but the last).
const BUFFER: usize = 1 << 20;
/// I/O threads writing directly: the device gets this many writes at once.
const IO_THREADS: usize = 2;
/// I/O threads writing behind: one, its writes in file order (the kernel's
/// writeback has the device busy).
const BEHIND_THREADS: usize = 1;
/// Buffers in all, per I/O thread: one being filled, one written by each
/// thread, one waiting (writing behind: three, 3 MiB; a fourth bought no
/// speed and took the engine's incremental of a 32 GiB disk over 32 MiB
/// of RSS, docs/performance.md).
const fn buffers(threads: usize) -> usize {
    threads + 2
}
/// `statfs` magic of NFS.
const NFS_SUPER_MAGIC: i64 = 0x6969;

/// The environment variable that sets the host's write mode
/// ([`WriteMode::host_default`]): `behind`, `direct` or `buffered`.
pub const WRITE_MODE_ENV: &str = "KNIB_WRITE_MODE";

/// How an output file is written. Its default is the host's
/// ([`WriteMode::host_default`]): written behind unless `KNIB_WRITE_MODE`
/// says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the page cache, each chunk sent to the device as it is
    /// written and dropped from the cache once there, with at most 64 MiB
    /// per writer not yet on the device (write-behind; the module doc of
    /// `qcow2::behind` says why this is the default).
    Behind,
    /// Around the page cache (O_DIRECT), in aligned 1 MiB writes made by two
    /// I/O threads, where the file system allows it (not NFS); written
    /// behind where it does not.
    Direct,
    /// Through the page cache, left to the kernel until the caller's fsync.
    Buffered,
}

impl WriteMode {
    /// The host's write mode, read once per process from `KNIB_WRITE_MODE`
    /// ([`WRITE_MODE_ENV`]); [`WriteMode::Behind`] when it is unset. Which
    /// mode is fastest depends on the host's storage (on one development
    /// host O_DIRECT was, on the next the page cache; `docs/performance.md`),
    /// so it is the host's setting, not a backup's: the CLI, the C library
    /// and the CloudStack agent's JNI all read it from their environment. A
    /// value that is none of the three is logged as a warning, once, and
    /// written behind. A restore from a vault is always written behind (on
    /// the caller's thread: its memory bound).
    pub fn host_default() -> WriteMode {
        static MODE: std::sync::OnceLock<WriteMode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var(WRITE_MODE_ENV) {
            Err(_) => WriteMode::Behind,
            Ok(v) => v.parse().unwrap_or_else(|e: crate::error::KnibError| {
                log::warn!("{}; writing behind", e.message);
                WriteMode::Behind
            }),
        })
    }
}

impl Default for WriteMode {
    /// The host's write mode ([`WriteMode::host_default`]).
    fn default() -> Self {
        WriteMode::host_default()
    }
}

impl std::str::FromStr for WriteMode {
    type Err = crate::error::KnibError;

    fn from_str(s: &str) -> crate::error::Result<WriteMode> {
        match s {
            "behind" => Ok(WriteMode::Behind),
            "direct" => Ok(WriteMode::Direct),
            "buffered" => Ok(WriteMode::Buffered),
            other => Err(crate::error::KnibError::invalid(format!(
                "{WRITE_MODE_ENV}={other:?} is not a write mode (behind, direct or buffered)"
            ))),
        }
    }
}

/// Turn O_DIRECT on or off for `file`; whether it now is as asked. Never
/// turned on for a file on NFS.
pub(crate) fn set_direct(file: &File, on: bool) -> bool {
    let fd = file.as_raw_fd();
    if on {
        // SAFETY: fstatfs into a zeroed struct we own, on a descriptor we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(fd, &mut st) } != 0 || st.f_type as i64 == NFS_SUPER_MAGIC {
            return false;
        }
    }
    // SAFETY: fcntl flag changes on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return !on;
        }
        let want = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
        libc::fcntl(fd, libc::F_SETFL, want) == 0
    }
}

/// Bytes whose first one is 4 KiB aligned, so that O_DIRECT writes can
/// use them in place (a `Vec<u8>` of this size starts 16 bytes
/// into a page). Grows exactly, keeping its bytes.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub(crate) fn with_len(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.grow_to(len);
        b
    }

    /// Grow to `len` bytes (new bytes are zeros); never shrinks.
    pub(crate) fn grow_to(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        let mut mem = Vec::new();
        mem.reserve_exact(len + ALIGN);
        mem.resize(len + ALIGN, 0);
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        mem[start..start + self.len].copy_from_slice(&self.mem[self.start..self.start + self.len]);
        mem.truncate(start + len);
        *self = AlignedBuf { mem, start, len };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// Whether `data` may be written at file offset `pos` directly: its
/// address, length and offset 4 KiB aligned.
pub(crate) fn is_aligned(data: &[u8], pos: u64) -> bool {
    (data.as_ptr() as usize).is_multiple_of(ALIGN)
        && data.len().is_multiple_of(ALIGN)
        && pos.is_multiple_of(ALIGN as u64)
}

/// A 1 MiB aligned buffer, the first `len` bytes filled.
struct Aligned {
    buf: AlignedBuf,
    len: usize,
}

impl Aligned {
    fn new() -> Aligned {
        Aligned { buf: AlignedBuf::with_len(BUFFER), len: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Write `data` at `pos` of `file`; an unaligned write, or one the file
/// system refuses with EINVAL, turns O_DIRECT off for good and is done
/// buffered.
fn write_at(file: &File, data: &[u8], pos: u64) -> std::io::Result<()> {
    if !data.len().is_multiple_of(ALIGN) || !pos.is_multiple_of(ALIGN as u64) {
        set_direct(file, false);
    }
    match file.write_all_at(data, pos) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && set_direct(file, false) => {
            log::debug!("O_DIRECT write refused: writing buffered");
            file.write_all_at(data, pos)
        }
        r => r,
    }
}

/// Appends to a file from offset 0 in aligned 1 MiB writes made by I/O
/// threads: O_DIRECT when asked and the file system allows it, else
/// through the page cache, written behind.
pub(crate) struct DirectWriter {
    path: PathBuf,
    /// The buffer being filled.
    cur: Aligned,
    /// File offset of `cur`'s first byte.
    pos: u64,
    /// Full buffers to the I/O thread, with their offsets.
    to_io: Option<SyncSender<(Aligned, u64)>>,
    /// Written buffers back (or the error that stopped the thread).
    back: Receiver<std::io::Result<Aligned>>,
    /// Buffers sent and not yet back.
    in_flight: usize,
    /// Buffers never used yet.
    spare: usize,
    io: Vec<JoinHandle<std::io::Result<()>>>,
    /// The hash of the buffers, when hashing, taken by the I/O threads in
    /// file order.
    hash: Option<Arc<HashTurn>>,
}

/// The hasher the I/O threads share, and the file offset of the next
/// byte to hash: a thread hashes its buffer when that offset is its own.
struct HashTurn {
    state: Mutex<(Box<Xxh3>, u64)>,
    turn: Condvar,
}

impl HashTurn {
    /// Hash `data`, the bytes at `pos`, once every byte before it is.
    fn hash(&self, data: &[u8], pos: u64) {
        let mut st = self.state.lock();
        while st.1 != pos {
            self.turn.wait(&mut st);
        }
        st.0.update(data);
        st.1 += data.len() as u64;
        self.turn.notify_all();
    }
}

impl DirectWriter {
    /// Start writing `file` (at `path`, named in errors) as `mode` says;
    /// `None` for [`WriteMode::Buffered`] (the caller writes). With `hash`,
    /// every byte appended is hashed (xxh3) in order, and
    /// [`DirectWriter::finish`] gives the hasher. Written behind, with
    /// `keep_cached` the pages stay cached once on the device (the file is
    /// read back next).
    pub(crate) fn start(
        file: &File,
        path: &Path,
        hash: bool,
        mode: WriteMode,
        keep_cached: bool,
    ) -> Result<Option<DirectWriter>> {
        let threads = match mode {
            WriteMode::Buffered => return Ok(None),
            WriteMode::Direct if set_direct(file, true) => IO_THREADS,
            WriteMode::Direct | WriteMode::Behind => BEHIND_THREADS,
        };
        let behind = threads == BEHIND_THREADS;
        let buffers = buffers(threads);
        let (to_io, from_sink) = sync_channel::<(Aligned, u64)>(buffers);
        let hash =
            hash.then(|| Arc::new(HashTurn { state: Mutex::new((Box::new(Xxh3::new()), 0)), turn: Condvar::new() }));
        let (to_sink, back) = sync_channel::<std::io::Result<Aligned>>(buffers);
        let from_sink = Arc::new(Mutex::new(from_sink));
        let mut io = Vec::new();
        for _ in 0..threads {
            let io_file = file.try_clone().map_err(|e| KnibError::io("cannot open", path, e))?;
            let (rx, tx, turn) = (Arc::clone(&from_sink), to_sink.clone(), hash.clone());
            let mut wb = behind.then(|| {
                let mut wb = WriteBehind::new();
                if keep_cached {
                    wb.keep_cached();
                }
                wb
            });
            let h = std::thread::Builder::new()
                .name("knib-write-io".into())
                .spawn(move || loop {
                    let next = rx.lock().recv();
                    let Ok((mut buf, pos)) = next else {
                        // The writer is done (or gone): what was written
                        // behind is waited for, its error returned.
                        return wb.as_mut().map_or(Ok(()), |wb| wb.finish(&io_file));
                    };
                    // Buffers are taken in file order (one at a time, under
                    // the lock), so the one before this one is already
                    // taken and is hashed without waiting for this one.
                    if let Some(t) = &turn {
                        t.hash(buf.data(), pos);
                    }
                    let mut r = write_at(&io_file, buf.data(), pos);
                    if let (Ok(()), Some(wb)) = (&r, wb.as_mut()) {
                        r = wb.wrote(&io_file, pos, buf.len as u64);
                    }
                    buf.len = 0;
                    let failed = r.is_err();
                    if tx.send(r.map(|()| buf)).is_err() || failed {
                        return Ok(());
                    }
                })
                .map_err(|e| KnibError::internal(format!("cannot start an I/O thread: {e}")))?;
            io.push(h);
        }
        Ok(Some(DirectWriter {
            path: path.to_path_buf(),
            cur: Aligned::new(),
            pos: 0,
            to_io: Some(to_io),
            back,
            in_flight: 0,
            spare: buffers - 1,
            io,
            hash,
        }))
    }

    fn io_err(&self, e: std::io::Error) -> KnibError {
        KnibError::io("cannot write", &self.path, e)
    }

    /// A written buffer back from the I/O thread.
    fn take_back(&mut self) -> Result<Aligned> {
        match self.back.recv() {
            Ok(Ok(buf)) => {
                self.in_flight -= 1;
                Ok(buf)
            }
            Ok(Err(e)) => Err(self.io_err(e)),
            Err(_) => Err(KnibError::internal(format!("the I/O thread writing {} stopped", self.path.display()))),
        }
    }

    /// Send the current buffer to be written and get an empty one.
    fn send(&mut self) -> Result<()> {
        if self.cur.len == 0 {
            return Ok(());
        }
        let next = if self.spare > 0 {
            self.spare -= 1;
            Aligned::new()
        } else {
            self.take_back()?
        };
        let full = std::mem::replace(&mut self.cur, next);
        let len = full.len as u64;
        let tx = self.to_io.as_ref().ok_or_else(|| KnibError::internal("the I/O thread is gone"))?;
        tx.send((full, self.pos))
            .map_err(|_| KnibError::internal(format!("the I/O thread writing {} stopped", self.path.display())))?;
        self.in_flight += 1;
        self.pos += len;
        Ok(())
    }

    /// Append `bytes`.
    pub(crate) fn append(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let k = (BUFFER - self.cur.len).min(bytes.len());
            let at = self.cur.len;
            self.cur.buf[at..at + k].copy_from_slice(&bytes[..k]);
            self.cur.len += k;
            bytes = &bytes[k..];
            if self.cur.len == BUFFER {
                self.send()?;
            }
        }
        Ok(())
    }

    /// Bytes appended so far.
    pub(crate) fn len(&self) -> u64 {
        self.pos + self.cur.len as u64
    }

    /// Write out everything appended and wait until it is written (on the
    /// device, when written behind; the file then has O_DIRECT off); the
    /// hasher, when hashing.
    pub(crate) fn finish(mut self, file: &File) -> Result<Option<Box<Xxh3>>> {
        self.send()?;
        while self.in_flight > 0 {
            self.take_back()?;
        }
        self.to_io = None;
        for h in std::mem::take(&mut self.io) {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.io_err(e)),
                Err(_) => return Err(KnibError::internal("an I/O thread panicked")),
            }
        }
        set_direct(file, false);
        let hasher = match self.hash.take().map(Arc::try_unwrap) {
            Some(Ok(t)) => Some(t.state.into_inner().0),
            Some(Err(_)) => return Err(KnibError::internal("an I/O thread still holds the hash")),
            None => None,
        };
        Ok(hasher)
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // Stop the I/O thread (an error path): no more buffers, wait for it.
        self.to_io = None;
        while self.in_flight > 0 && self.back.recv().is_ok() {
            self.in_flight -= 1;
        }
        for h in self.io.drain(..) {
            let _ = h.join();
        }
    }
}

/// Writes at any offset of a file, as a [`WriteMode`] says: around the
/// page cache where the file system allows it ([`WriteMode::Direct`]: a
/// second open of the file with O_DIRECT, its own open file description,
/// so the caller's stays buffered), written through an aligned bounce
/// buffer per writing thread unless the data is aligned already; else
/// through the caller's buffered file, written behind unless the mode is
/// [`WriteMode::Buffered`]. A direct write that is not 4 KiB aligned, and
/// every write after the file system refuses O_DIRECT, goes buffered. Used
/// for raw outputs, whose clusters are written at their guest offsets by
/// several I/O threads.
pub(crate) struct ScatterWriter {
    direct: Option<File>,
    refused: std::sync::atomic::AtomicBool,
    behind: bool,
}

/// A writing thread's own state for [`ScatterWriter`]: its 1 MiB aligned
/// bounce buffer and its write-behind.
pub(crate) struct Bounce(Aligned, WriteBehind);

impl Bounce {
    pub(crate) fn new() -> Bounce {
        Bounce(Aligned::new(), WriteBehind::new())
    }
}

impl ScatterWriter {
    /// Open `file` again (the same file, through `/proc/self/fd`: not its
    /// name, which may lead elsewhere by now) for direct writes when `mode`
    /// asks for them; when that is not possible (NFS, a file system
    /// without O_DIRECT, no `/proc`) writes go behind.
    pub(crate) fn open(file: &File, mode: WriteMode) -> ScatterWriter {
        use std::os::fd::AsRawFd;
        let again = format!("/proc/self/fd/{}", file.as_raw_fd());
        let file = (mode == WriteMode::Direct)
            .then(|| std::fs::OpenOptions::new().write(true).open(&again).ok())
            .flatten()
            .filter(|f| set_direct(f, true));
        ScatterWriter {
            direct: file,
            refused: std::sync::atomic::AtomicBool::new(false),
            behind: mode != WriteMode::Buffered,
        }
    }

    /// Write `data` at `pos`: directly when aligned and allowed, else
    /// through `buffered`.
    pub(crate) fn write_at(&self, buffered: &File, bounce: &mut Bounce, data: &[u8], pos: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        let aligned = data.len().is_multiple_of(ALIGN) && pos.is_multiple_of(ALIGN as u64);
        let from = match &self.direct {
            Some(f) if aligned && !self.refused.load(Ordering::Relaxed) => {
                let mut done = 0;
                while done < data.len() {
                    let n = (data.len() - done).min(BUFFER);
                    // Data that is aligned in memory too (a copy's batches
                    // are) goes as it is; other data through the bounce buffer.
                    let chunk = if is_aligned(&data[done..done + n], 0) {
                        &data[done..done + n]
                    } else {
                        let b = &mut bounce.0;
                        b.len = n;
                        b.buf[..n].copy_from_slice(&data[done..done + n]);
                        b.data()
                    };
                    match f.write_all_at(chunk, pos + done as u64) {
                        Ok(()) => done += n,
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            log::debug!("O_DIRECT write refused: writing buffered");
                            self.refused.store(true, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                done
            }
            _ => 0,
        };
        if from == data.len() {
            return Ok(());
        }
        buffered.write_all_at(&data[from..], pos + from as u64)?;
        if self.behind {
            bounce.1.wrote(buffered, pos + from as u64, (data.len() - from) as u64)?;
        }
        Ok(())
    }

    /// A writing thread is done: wait until what it wrote behind is on
    /// the device (and out of the cache).
    pub(crate) fn finish_thread(&self, buffered: &File, bounce: &mut Bounce) -> std::io::Result<()> {
        bounce.1.finish(buffered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_of_any_length_land_in_order_and_are_hashed_in_order_with_an_unaligned_tail() {
        for mode in [WriteMode::Direct, WriteMode::Behind] {
            appends_land_in_order(mode);
        }
    }

    fn appends_land_in_order(mode: WriteMode) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut want = Vec::new();
        let mut state = 7u64;
        let mut w = DirectWriter::start(&file, &path, true, mode, false).unwrap().expect("an I/O thread writes");
        // 11 MiB and a bit, in pieces of 1 byte to 3 MiB: several buffers
        // in flight, then a tail that is not a multiple of 4 KiB.
        while want.len() < (11 << 20) + 1234 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = ((state >> 33) % (3 << 20) + 1) as usize;
            let n = n.min((11 << 20) + 1234 - want.len());
            let piece: Vec<u8> = (0..n).map(|i| (i as u64 ^ state) as u8).collect();
            w.append(&piece).unwrap();
            want.extend_from_slice(&piece);
            assert_eq!(w.len(), want.len() as u64);
        }
        let hasher = w.finish(&file).unwrap().expect("the writer hashed");
        // The I/O threads hashed every byte, in order.
        assert_eq!(hasher.digest128(), xxhash_rust::xxh3::xxh3_128(&want));
        // O_DIRECT is off again: a buffered write at any offset works.
        file.write_all_at(b"x", 3).unwrap();
        want[3] = b'x';
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn aligned_buffers_keep_their_bytes_and_alignment_as_they_grow() {
        let mut b = AlignedBuf::default();
        let mut want = Vec::new();
        for (round, len) in [1usize, 4095, 4096, 70_000, 70_001, 1 << 20].into_iter().enumerate() {
            b.grow_to(len);
            want.resize(len, 0);
            assert_eq!(b.len(), len);
            assert!((b.as_ptr() as usize).is_multiple_of(ALIGN), "round {round}: not aligned");
            assert_eq!(&b[..], &want[..], "round {round}: bytes lost");
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(round as u8 + 3);
            }
            want.copy_from_slice(&b);
        }
        b.grow_to(10);
        assert_eq!(b.len(), 1 << 20, "never shrinks");
    }
}
