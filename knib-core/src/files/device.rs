//! A read-only block device view of a backup: the guest-visible bytes of a
//! volume's qcow2 chain (any backup, compressed or not), through a small
//! cache, and windows onto its partitions.
//!
//! Memory is bounded: the cache holds [`CACHE_SLOTS`] blocks of
//! [`CACHE_BLOCK`] bytes (4 MiB); reads of a whole block or more go
//! straight to the chain. Every read checks the operation's [`Control`]
//! (cancellation, deadline) and counts against a read budget, so that a
//! filesystem whose structures loop ends with an error instead of reading
//! forever.

use std::cell::RefCell;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;

use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;
use crate::qcow2::Chain;

/// Bytes per cache block.
pub const CACHE_BLOCK: usize = 64 << 10;
/// Blocks in the cache.
pub const CACHE_SLOTS: usize = 64;

/// Where the bytes come from.
enum Source {
    Chain(Box<Chain>),
    Memory(Vec<u8>),
}

/// The disk of one volume of one backup, read-only.
pub struct Device {
    source: Source,
    size: u64,
    name: String,
    ctl: Control,
    /// (block number, data, last use).
    cache: Vec<(u64, Box<[u8]>, u64)>,
    clock: u64,
    /// Bytes that may still be read before the operation is taken for a
    /// loop; `None` for no limit.
    budget: Option<(u64, String)>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).field("size", &self.size).finish()
    }
}

/// A device shared by the windows and readers of one operation (one thread).
pub type SharedDevice = Rc<RefCell<Device>>;

impl Device {
    /// The guest-visible disk of the qcow2 image at `path` and its backing
    /// chain; `name` names it in errors ("volume root of backup X").
    pub fn open(path: &Path, name: impl Into<String>, ctl: &Control) -> Result<Device> {
        let chain = Chain::open(path)?;
        let size = chain.virtual_size();
        Ok(Device::new(Source::Chain(Box::new(chain)), size, name.into(), ctl))
    }

    /// [`Device::open`] for a chain named from outside: regular qcow2
    /// files only (see [`Chain::open_files_only`]).
    pub fn open_files_only(path: &Path, name: impl Into<String>, ctl: &Control) -> Result<Device> {
        let chain = Chain::open_files_only(path)?;
        let size = chain.virtual_size();
        Ok(Device::new(Source::Chain(Box::new(chain)), size, name.into(), ctl))
    }

    /// The guest-visible disk of a chain opened by the caller (a backup
    /// in a vault, read by ranged requests).
    pub fn from_chain(chain: Chain, name: impl Into<String>, ctl: &Control) -> Device {
        let size = chain.virtual_size();
        Device::new(Source::Chain(Box::new(chain)), size, name.into(), ctl)
    }

    /// A disk held in memory (tests, fuzzing).
    pub fn from_bytes(data: Vec<u8>, name: impl Into<String>) -> Device {
        let size = data.len() as u64;
        Device::new(Source::Memory(data), size, name.into(), &Control::new())
    }

    fn new(source: Source, size: u64, name: String, ctl: &Control) -> Device {
        Device { source, size, name, ctl: ctl.clone(), cache: Vec::new(), clock: 0, budget: None }
    }

    /// Share it.
    pub fn shared(self) -> SharedDevice {
        Rc::new(RefCell::new(self))
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What the disk is, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allow at most `bytes` more bytes of reads for `what` (a step such as
    /// "listing directory /a"); `None` lifts the limit.
    pub fn set_budget(&mut self, bytes: Option<u64>, what: &str) {
        self.budget = bytes.map(|b| (b, what.to_string()));
    }

    fn charge(&mut self, len: usize) -> Result<()> {
        if let Some((left, what)) = &mut self.budget {
            if *left < len as u64 {
                return Err(KnibError::corrupt(format!(
                    "{what} on {} read more of the disk than the filesystem could hold: its structures loop",
                    self.name
                )));
            }
            *left -= len as u64;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    ///
    /// Errors: InvalidInput past the end of the disk; the chain's errors
    /// (Corrupt, Io); Cancelled or Timeout from the operation's control.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.ctl.check(&format!("reading {}", self.name))?;
        self.charge(buf.len())?;
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(KnibError::invalid(format!(
                "read of {} bytes at offset {offset} is past the end of {} ({} bytes)",
                buf.len(),
                self.name,
                self.size
            )));
        }
        if buf.len() >= CACHE_BLOCK {
            return self.read_source(offset, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / CACHE_BLOCK as u64;
            let within = (pos % CACHE_BLOCK as u64) as usize;
            let n = (CACHE_BLOCK - within).min(buf.len() - done);
            let slot = self.cached(block)?;
            buf[done..done + n].copy_from_slice(&self.cache[slot].1[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// The cache slot holding `block`, read in if needed.
    fn cached(&mut self, block: u64) -> Result<usize> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(i) = self.cache.iter().position(|s| s.0 == block) {
            self.cache[i].2 = clock;
            return Ok(i);
        }
        let start = block * CACHE_BLOCK as u64;
        let len = (self.size - start).min(CACHE_BLOCK as u64) as usize;
        let slot = if self.cache.len() < CACHE_SLOTS {
            self.cache.push((u64::MAX, vec![0u8; CACHE_BLOCK].into_boxed_slice(), clock));
            self.cache.len() - 1
        } else {
            let (i, _) = self.cache.iter().enumerate().min_by_key(|(_, s)| s.2).expect("the cache is full");
            i
        };
        // Mark the slot empty until it is filled, so a failed read leaves
        // no stale block under the new number.
        self.cache[slot].0 = u64::MAX;
        let mut data = std::mem::take(&mut self.cache[slot].1);
        let r = self.read_source(start, &mut data[..len]);
        data[len..].fill(0);
        self.cache[slot].1 = data;
        r?;
        self.cache[slot].0 = block;
        self.cache[slot].2 = clock;
        Ok(slot)
    }

    fn read_source(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &mut self.source {
            Source::Chain(c) => c.read_at(offset, buf),
            Source::Memory(m) => {
                let start = offset as usize;
                buf.copy_from_slice(&m[start..start + buf.len()]);
                Ok(())
            }
        }
    }
}

/// The error a [`Window`] gives to filesystem crates: an `io::Error`
/// carrying the [`KnibError`], so it can be taken back out.
pub fn to_io(e: KnibError) -> io::Error {
    let kind = match e.kind {
        ErrorKind::InvalidInput => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// The [`KnibError`] inside an `io::Error` made by [`to_io`], or a Corrupt
/// error with its text (`what` names the filesystem).
pub fn from_io(e: &io::Error, what: &str) -> KnibError {
    if let Some(k) = e.get_ref().and_then(|i| i.downcast_ref::<KnibError>()) {
        return k.clone();
    }
    KnibError::corrupt(format!("{what}: {e}"))
}

/// A byte range of a device (a partition, or the whole disk), read-only.
///
/// It implements `Read + Seek` (for filesystem crates) and `Write`, whose
/// every call fails: nothing ever writes to a backup.
#[derive(Clone)]
pub struct Window {
    dev: SharedDevice,
    start: u64,
    len: u64,
    pos: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window").field("start", &self.start).field("len", &self.len).finish()
    }
}

impl Window {
    /// Bytes `start..start + len` of `dev`.
    ///
    /// Errors: InvalidInput when the range is not inside the device.
    pub fn new(dev: SharedDevice, start: u64, len: u64) -> Result<Window> {
        let size = dev.borrow().size();
        if start.checked_add(len).is_none_or(|e| e > size) {
            return Err(KnibError::corrupt(format!(
                "range of {len} bytes at offset {start} is past the end of {} ({size} bytes)",
                dev.borrow().name()
            )));
        }
        Ok(Window { dev, start, len, pos: 0 })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device.
    pub fn device(&self) -> &SharedDevice {
        &self.dev
    }

    /// Read exactly `buf.len()` bytes at `offset` of the window.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.len) {
            return Err(KnibError::corrupt(format!(
                "read of {} bytes at offset {offset} is past the end of the filesystem's {} bytes on {}",
                buf.len(),
                self.len,
                self.dev.borrow().name()
            )));
        }
        self.dev.borrow_mut().read_at(self.start + offset, buf)
    }

    /// Up to `len` bytes at `offset`, fewer at the end of the window.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let n = self.len.saturating_sub(offset).min(len as u64) as usize;
        let mut v = vec![0u8; n];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.len.saturating_sub(self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_at(self.pos, &mut buf[..n]).map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the filesystem")),
        }
    }
}

impl Write for Window {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "a backup is read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_through_the_cache_match_the_source_and_writes_fail() {
        let data: Vec<u8> = (0..(3 * CACHE_BLOCK as u32 + 100)).map(|i| (i % 251) as u8).collect();
        let dev = Device::from_bytes(data.clone(), "test disk").shared();
        let mut w = Window::new(dev.clone(), 10, data.len() as u64 - 10).unwrap();
        for (off, len) in
            [(0u64, 1usize), (CACHE_BLOCK as u64 - 20, 40), (5, 2 * CACHE_BLOCK + 7), (3 * 65536 + 80, 10)]
        {
            let mut b = vec![0; len];
            w.read_at(off, &mut b).unwrap();
            assert_eq!(&b[..], &data[10 + off as usize..10 + off as usize + len]);
        }
        let e = w.read_at(3 * 65536 + 85, &mut [0; 10]).unwrap_err();
        assert!(e.message.contains("past the end"), "{e}");
        assert!(w.write(b"x").is_err());
        assert!(Window::new(dev.clone(), 1, data.len() as u64).is_err());
        dev.borrow_mut().set_budget(Some(100), "listing directory /x");
        let e = w.read_at(0, &mut [0; 101]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message.contains("listing directory /x on test disk read more"), "{e}");
        dev.borrow_mut().set_budget(None, "");
        let mut all = Vec::new();
        w.seek(SeekFrom::Start(0)).unwrap();
        w.read_to_end(&mut all).unwrap();
        assert_eq!(all, &data[10..]);
    }
}
