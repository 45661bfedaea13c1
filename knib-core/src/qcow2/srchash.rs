//! The hash of a source file of a copy, taken from the bytes the copy reads.
//!
//! A backup's recorded hash is xxh3-128 over every byte of its file, in file
//! order ([`crate::hash`]). A copy reads a file's data clusters in
//! guest order, which for files written front to back (knib's writer,
//! `qemu-img convert`) is also host order. [`SourceHasher`] is fed each
//! range the copy reads, at its offset: bytes at or after the hashed prefix
//! extend it, and any gap before them (the header, tables, clusters a
//! flattened copy takes from a layer above, unallocated or leaked space) is
//! read from the file and hashed first. What is left after the copy is read
//! at the end. So the file's bytes are read once, except:
//!
//! - metadata (header, L1/L2 and refcount tables): read by the lookups and
//!   again, in file order, for the hash (small: about 1/8192 of the data
//!   for 64 KiB clusters);
//! - data the copy reads out of host order (a file whose clusters are not in
//!   guest order): the hash reads ahead over them, and the copy reads them
//!   again later; counted in [`SourceHash::read_twice_bytes`] (so are the
//!   few bytes where the sector-rounded extents of neighbouring compressed
//!   clusters overlap).
//!
//! The digest is the same as [`crate::hash::hash_chain`]'s per-file
//! hash: the same bytes in the same order (the file is read through a
//! duplicate of the descriptor the copy reads, so it is the same inode even
//! if the path is replaced meanwhile).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{KnibError, Result};

/// The hash of one source file of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceHash {
    /// The file, as the copy opened it.
    pub path: PathBuf,
    /// xxh3-128 of the whole file, 32 lower-case hex digits.
    pub hash: String,
    /// Bytes read for the hash alone (the metadata, data the copy did not
    /// need, and data it read out of order, ahead of it).
    pub hash_only_bytes: u64,
    /// Bytes the copy read that had been read for the hash already.
    pub read_twice_bytes: u64,
}

/// Hashes a file from the ranges a copy reads (see the module docs).
pub(crate) struct SourceHasher {
    path: PathBuf,
    file: File,
    /// The file's length when it was opened: ranges the copy reads past it
    /// are zeros it made up, not bytes of the file.
    len: u64,
    /// Bytes `0..pos` are hashed.
    pos: u64,
    hasher: Xxh3,
    extra: u64,
    twice: u64,
}

impl std::fmt::Debug for SourceHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceHasher").field("path", &self.path).field("pos", &self.pos).finish_non_exhaustive()
    }
}

/// The longest read of [`SourceHasher::read_to`].
const CHUNK: usize = 256 << 10;

impl SourceHasher {
    /// A hasher of `file` (a duplicate of the copy's descriptor), `len`
    /// bytes long when opened.
    pub(crate) fn new(path: &Path, file: File, len: u64) -> Self {
        SourceHasher { path: path.to_path_buf(), file, len, pos: 0, hasher: Xxh3::new(), extra: 0, twice: 0 }
    }

    /// The copy read `data` at `offset` of the file.
    pub(crate) fn seen(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset >= self.len {
            return Ok(());
        }
        let data = &data[..data.len().min((self.len - offset) as usize)];
        let end = offset + data.len() as u64;
        if end <= self.pos {
            // Hashed already, by a read ahead: the copy read it again.
            self.twice += data.len() as u64;
            return Ok(());
        }
        if offset > self.pos {
            self.read_to(Some(offset))?;
            if self.pos < offset {
                return Err(KnibError::new(
                    crate::ErrorKind::Io,
                    format!("{} became shorter while it was read", self.path.display()),
                ));
            }
        }
        let skip = (self.pos - offset) as usize;
        self.twice += skip as u64;
        self.hasher.update(&data[skip..]);
        self.pos = end;
        Ok(())
    }

    /// Read and hash the file from `pos` up to `end`, or to its end of file
    /// (`None`).
    ///
    /// The buffer lives only for the call and is no longer than the gap
    /// (at most [`CHUNK`]): a chain keeps one hasher per layer, and a
    /// buffer kept by each would make the copy's memory grow with the
    /// chain's depth.
    fn read_to(&mut self, end: Option<u64>) -> Result<()> {
        let first = match end {
            Some(e) if self.pos >= e => return Ok(()),
            Some(e) => ((e - self.pos) as usize).min(CHUNK),
            None => CHUNK,
        };
        let mut buf = vec![0u8; first];
        loop {
            let want = match end {
                Some(e) if self.pos >= e => return Ok(()),
                Some(e) => ((e - self.pos) as usize).min(first),
                None => first,
            };
            let n = match self.file.read_at(&mut buf[..want], self.pos) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(KnibError::io("cannot read", &self.path, e)),
            };
            if n == 0 {
                // The file is shorter than when it was opened: hash what is there.
                return Ok(());
            }
            self.hasher.update(&buf[..n]);
            self.pos += n as u64;
            self.extra += n as u64;
        }
    }

    /// Hash the rest of the file and give the digest.
    pub(crate) fn finish(mut self) -> Result<SourceHash> {
        let extra_before = self.extra;
        self.read_to(None)?;
        let tail = self.extra - extra_before;
        log::debug!(
            "source {}: hashed {} bytes, {} of them read for the hash alone ({} at the end), {} read twice",
            self.path.display(),
            self.pos,
            self.extra,
            tail,
            self.twice
        );
        Ok(SourceHash {
            path: self.path,
            hash: format!("{:032x}", self.hasher.digest128()),
            hash_only_bytes: self.extra,
            read_twice_bytes: self.twice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Feeding ranges in any order, overlapping, past the end, gives the
    /// hash of the whole file.
    #[test]
    fn any_reads_give_the_whole_file_hash() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::File::create(&p).and_then(|mut f| f.write_all(&data)).expect("write");
        let want = crate::hash::hash_files(std::slice::from_ref(&p), &crate::progress::Control::new()).expect("hash");
        let mut seed = 0x1234_5678_9abc_def0u64;
        for round in 0..50 {
            let f = File::open(&p).expect("open");
            let mut h = SourceHasher::new(&p, f, data.len() as u64);
            for _ in 0..(round % 7) * 3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = seed % (data.len() as u64 + 1000);
                let len = (seed >> 40) % 200_000;
                let mut buf = vec![0u8; len as usize];
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = data.get(off as usize + i).copied().unwrap_or(0);
                }
                h.seen(off, &buf).expect("seen");
            }
            assert_eq!(h.finish().expect("finish").hash, want, "round {round}");
        }
    }
}
