//! Where a streaming qcow2 writer ([`super::Layout`]) puts its bytes: a
//! file (written behind, buffered, or unbuffered with `O_DIRECT`: see
//! [`WriteMode`]), a counter (to plan a
//! file's length without writing it), or memory.
//!
//! # Invariants
//!
//! - Bytes are only appended, front to back; [`FileSink::patch`] rewrites
//!   bytes already written (the header of a compressed image) and is the
//!   one exception.
//! - A hashing file sink hashes every byte appended, in file order, so for
//!   a file written front to back its hash is the file's xxh3-128 as
//!   [`crate::hash`] reads it back; a patch is not hashed (a compressed
//!   image, whose header is patched last, is hashed by reading it back).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use super::behind::WriteBehind;
use super::direct::{DirectWriter, WriteMode};
use crate::error::{KnibError, Result};

/// Where the writer's bytes go, in file order.
pub trait Sink {
    /// Append `bytes` at the end of what was written so far.
    fn append(&mut self, bytes: &[u8]) -> Result<()>;
    /// Append `n` zero bytes.
    fn append_zeros(&mut self, n: u64) -> Result<()> {
        const Z: [u8; 4096] = [0; 4096];
        let mut left = n;
        while left > 0 {
            let k = left.min(Z.len() as u64) as usize;
            self.append(&Z[..k])?;
            left -= k as u64;
        }
        Ok(())
    }
}

/// Memory (tests, fuzzing).
impl Sink for Vec<u8> {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// A sink that only counts: used to plan a file before writing it.
#[derive(Debug, Default)]
pub struct CountSink(pub u64);

impl Sink for CountSink {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.0 += bytes.len() as u64;
        Ok(())
    }
    fn append_zeros(&mut self, n: u64) -> Result<()> {
        self.0 += n;
        Ok(())
    }
}

/// A file written front to back through a buffer, optionally hashed
/// (xxh3-128) in the same order.
pub struct FileSink {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    pos: u64,
    hasher: Option<Box<Xxh3>>,
    /// The I/O threads writing ([`WriteMode::Direct`] and
    /// [`WriteMode::Behind`]) until [`FileSink::flush`].
    direct: Option<DirectWriter>,
    /// Written behind by the caller's thread ([`FileSink::new_behind_inline`]).
    behind: Option<WriteBehind>,
}

/// Appends this long or longer skip the buffer.
const UNBUFFERED_APPEND: usize = 256 << 10;

const SINK_BUFFER: usize = 1 << 20;

impl FileSink {
    /// Write `file` (at `path`, named in errors) from offset 0 through the
    /// page cache ([`WriteMode::Buffered`]); with `hash`, every byte appended
    /// is hashed in order.
    pub fn new(file: File, path: &Path, hash: bool) -> Self {
        FileSink {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(SINK_BUFFER),
            pos: 0,
            hasher: hash.then(|| Box::new(Xxh3::new())),
            direct: None,
            behind: None,
        }
    }

    /// Like [`FileSink::new`], written as `mode` says, by I/O threads but
    /// for [`WriteMode::Buffered`]. [`WriteMode::Direct`] falls back to
    /// writing behind when O_DIRECT is refused now, and to buffered writes
    /// when it is refused at a write. Written behind, with `keep_cached`
    /// the pages stay cached once on the device: for a file read back
    /// next (a compressed image's hash, read back because its header is
    /// written last).
    pub fn with_mode(file: File, path: &Path, hash: bool, mode: WriteMode, keep_cached: bool) -> Result<Self> {
        let mut sink = Self::new(file, path, hash);
        sink.direct = DirectWriter::start(&sink.file, path, hash, mode, keep_cached)?;
        if sink.direct.is_some() {
            // The writer hashes (on its I/O threads); buffered, the sink
            // hashes as it appends.
            sink.hasher = None;
        }
        Ok(sink)
    }

    /// Written behind by the caller's thread, with no I/O thread and no
    /// buffer beyond the sink's own 1 MiB: for a writer whose memory is
    /// tight (a restore from the vault, which also holds a read cache;
    /// the I/O thread's four buffers took it over 32 MiB).
    pub(crate) fn new_behind_inline(file: File, path: &Path, hash: bool) -> Self {
        let mut sink = Self::new(file, path, hash);
        sink.behind = Some(WriteBehind::new());
        sink
    }

    fn io(&self, e: std::io::Error) -> KnibError {
        KnibError::io("cannot write", &self.path, e)
    }

    fn write_out(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, self.pos).map_err(|e| self.io(e))?;
        if let Some(b) = self.behind.as_mut() {
            b.wrote(&self.file, self.pos, bytes.len() as u64)
                .map_err(|e| KnibError::io("cannot write", &self.path, e))?;
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Write out what is buffered.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(d) = self.direct.take() {
            self.pos = d.len();
            // The writer's hasher, which has seen every byte appended:
            // what is appended from now on is hashed here.
            if let Some(h) = d.finish(&self.file)? {
                self.hasher = Some(h);
            }
        }
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.write_out(&buf);
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    /// Bytes written so far (buffered ones included).
    pub fn len(&self) -> u64 {
        match &self.direct {
            Some(d) => d.len(),
            None => self.pos + self.buf.len() as u64,
        }
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overwrite `bytes` at `offset` (already written); not hashed.
    pub fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.flush()?;
        self.file.write_all_at(bytes, offset).map_err(|e| self.io(e))
    }

    /// Flush, and return the file and the hash of everything appended (32
    /// lower-case hex digits) when hashing.
    pub fn finish(mut self) -> Result<(File, Option<String>)> {
        self.flush()?;
        if let Some(mut b) = self.behind.take() {
            b.finish(&self.file).map_err(|e| self.io(e))?;
        }
        let hash = self.hasher.take().map(|h| format!("{:032x}", h.digest128()));
        Ok((self.file, hash))
    }
}

impl Sink for FileSink {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        if let Some(d) = self.direct.as_mut() {
            return d.append(bytes);
        }
        if bytes.len() >= UNBUFFERED_APPEND {
            self.flush()?;
            return self.write_out(bytes);
        }
        if self.buf.len() + bytes.len() > SINK_BUFFER {
            self.flush()?;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}
