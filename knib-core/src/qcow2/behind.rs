//! Write-behind: an output written through the page cache is sent to the
//! device as it is written, a bounded amount behind the writer, and dropped
//! from the cache once it is on the device.
//!
//! Why: a backup's output is not read again soon. Left to the kernel, its
//! pages stay dirty until the final fsync (gigabytes of dirty memory on a
//! host that runs guests, and a long fsync at the end), then stay cached,
//! evicting the host's useful data. Writing around the cache (O_DIRECT,
//! [`super::direct`]) avoids both, but on some hosts its synchronous writes
//! are slower than the kernel's writeback, which merges pages into large
//! writes and queues many at once: on the host of the fifth benchmark run
//! (docs/performance.md) a 400 MB incremental took 1.3-2.4 s with
//! knib's O_DIRECT writer and 0.8 s buffered, fsync included. Write-behind
//! keeps the kernel's writeback and bounds the cost: each writer has at most
//! [`LAG`] bytes written and not yet known to be on the device, and what is
//! on the device is dropped from the cache.
//!
//! How: `sync_file_range(2)` starts the writeback of every [`CHUNK`] bytes
//! written (it returns at once); once more than [`LAG`] bytes are in
//! writeback, the oldest chunk is waited for (`SYNC_FILE_RANGE_WAIT_AFTER`,
//! which reports a failed write) and its pages dropped
//! (`POSIX_FADV_DONTNEED`, which drops only clean pages). A chunk is the
//! span from the lowest to the highest byte a writer wrote since the last
//! chunk: writes at scattered offsets (a raw output) make wide spans, in
//! which pages never written are simply absent. The caller still fsyncs
//! the file for its metadata. A file system that refuses `sync_file_range`
//! is written plainly buffered.
//!
//! A wait's error is returned, never dropped: `sync_file_range` consumes the
//! file's writeback error, so a later fsync would not see it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;

/// Start the writeback of every this many bytes written.
pub(crate) const CHUNK: u64 = 8 << 20;
/// At most this many bytes of a writer in writeback and not waited for.
pub(crate) const LAG: u64 = 64 << 20;

/// Bytes written in a span of the file.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    bytes: u64,
}

/// One writer's write-behind state (a raw output has one per I/O thread).
#[derive(Debug, Default)]
pub(crate) struct WriteBehind {
    /// Written since the last chunk started.
    open: Option<Span>,
    /// Chunks in writeback, not yet waited for, oldest first.
    started: VecDeque<Span>,
    /// Their bytes.
    started_bytes: u64,
    /// The file system refused `sync_file_range`: plain buffered writes.
    off: bool,
    /// Keep the pages cached once on the device (the file is read back
    /// next: [`crate::hash::hash_written_file`] drops them as it reads).
    keep: bool,
    /// The span of every chunk waited for so far: what is dropped.
    done: Option<(u64, u64)>,
}

impl WriteBehind {
    pub(crate) fn new() -> WriteBehind {
        WriteBehind::default()
    }

    /// Keep what is written in the cache once it is on the device: for a
    /// file read back right after it is written (a compressed image, whose
    /// hash is read back because its header is written last).
    pub(crate) fn keep_cached(&mut self) {
        self.keep = true;
    }

    /// Record that `len` bytes were written at `pos` of `file`: start the
    /// writeback of a full chunk, wait for the oldest beyond the lag.
    pub(crate) fn wrote(&mut self, file: &File, pos: u64, len: u64) -> std::io::Result<()> {
        if self.off || len == 0 {
            return Ok(());
        }
        let s = self.open.get_or_insert(Span { start: pos, end: pos + len, bytes: 0 });
        s.start = s.start.min(pos);
        s.end = s.end.max(pos + len);
        s.bytes += len;
        if s.bytes >= CHUNK {
            self.start_open(file)?;
        }
        while self.started_bytes > LAG {
            self.retire_oldest(file)?;
        }
        Ok(())
    }

    /// Wait until everything recorded is on the device, and drop it from
    /// the cache.
    pub(crate) fn finish(&mut self, file: &File) -> std::io::Result<()> {
        self.start_open(file)?;
        while !self.started.is_empty() {
            self.retire_oldest(file)?;
        }
        Ok(())
    }

    /// Bytes recorded and not yet waited for (for tests).
    #[cfg(test)]
    fn behind(&self) -> u64 {
        self.started_bytes + self.open.map_or(0, |s| s.bytes)
    }

    fn start_open(&mut self, file: &File) -> std::io::Result<()> {
        let Some(s) = self.open.take() else { return Ok(()) };
        if self.range(file, s, libc::SYNC_FILE_RANGE_WRITE)? {
            self.started_bytes += s.bytes;
            self.started.push_back(s);
        }
        Ok(())
    }

    fn retire_oldest(&mut self, file: &File) -> std::io::Result<()> {
        let Some(s) = self.started.pop_front() else { return Ok(()) };
        self.started_bytes -= s.bytes;
        let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        if self.range(file, s, all)? && !self.keep {
            // Everything waited for so far, not just this chunk: the cache
            // keeps large folios (2 MiB and more), and one is dropped only
            // when a range holds it whole, which a chunk's span need not.
            let (lo, hi) = self.done.map_or((s.start, s.end), |(lo, hi)| (lo.min(s.start), hi.max(s.end)));
            self.done = Some((lo, hi));
            crate::fsio::drop_cached(file, lo, hi - lo);
        }
        Ok(())
    }

    /// `sync_file_range` over `s`; `false` when the file system refuses it
    /// (write-behind is then off for good).
    fn range(&mut self, file: &File, s: Span, flags: libc::c_uint) -> std::io::Result<bool> {
        // SAFETY: sync_file_range on a descriptor we own.
        let r = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                crate::fsio::to_off(s.start),
                crate::fsio::to_off(s.end - s.start),
                flags,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EOPNOTSUPP) => {
                log::debug!("sync_file_range refused ({e}): writing buffered");
                self.off = true;
                self.open = None;
                self.started.clear();
                self.started_bytes = 0;
                Ok(false)
            }
            _ => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_writer_is_never_more_than_the_lag_and_a_chunk_behind_and_finish_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let mut wb = WriteBehind::new();
        let mut want = vec![0u8; 100 << 20];
        let mut state = 11u64;
        let mut most = 0;
        // Writes of 4 KiB to 3 MiB at scattered offsets, some overlapping.
        for _ in 0..120 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = ((state >> 20) % (3 << 20)) as usize / 4096 * 4096 + 4096;
            let pos = ((state >> 40) as usize % (want.len() - len)) / 4096 * 4096;
            let piece: Vec<u8> = (0..len).map(|i| (i as u64 ^ state) as u8).collect();
            file.write_all_at(&piece, pos as u64).unwrap();
            want[pos..pos + len].copy_from_slice(&piece);
            wb.wrote(&file, pos as u64, len as u64).unwrap();
            most = most.max(wb.behind());
        }
        assert!(most <= LAG + CHUNK + (3 << 20), "{most} bytes behind");
        assert!(most > CHUNK, "the test never filled a chunk: {most}");
        wb.finish(&file).unwrap();
        assert_eq!(wb.behind(), 0);
        file.set_len(want.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want, "every byte written is there");
    }

    #[test]
    fn a_file_that_refuses_sync_file_range_is_written_plainly() {
        // A pipe: sync_file_range says ESPIPE.
        let (r, w) = std::io::pipe().unwrap();
        let w = File::from(std::os::fd::OwnedFd::from(w));
        let mut wb = WriteBehind::new();
        for _ in 0..3 {
            wb.wrote(&w, 0, CHUNK).unwrap();
        }
        assert!(wb.off);
        assert_eq!(wb.behind(), 0);
        wb.finish(&w).unwrap();
        drop(r);
    }
}
