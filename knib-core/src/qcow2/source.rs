//! Where a qcow2 image's bytes come from when they are not a local file
//! opened by path: any [`ReadAt`] source (an object of an S3 vault read by
//! ranged requests, see [`crate::vault`]).
//!
//! The reader ([`super::Qcow2Image::from_source`]) makes the same checks on
//! such a source as on a file: every byte it reads is hostile input.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read at an offset: a file, or a remote object.
///
/// Implementations are shared between threads (a restore's reader and the
/// hash of what it read), so they take `&self` and hold their own cache.
pub trait ReadAt: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end of the source read as
    /// zeros. Returns how many bytes came from the source.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;

    /// The source's length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A local file as a source (its length taken when it is wrapped).
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Wrap an open file.
    pub fn new(file: File) -> std::io::Result<FileSource> {
        let len = file_size(&file)?;
        Ok(FileSource { file, len })
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// The size of an open file or block device (whose metadata says 0).
pub(crate) fn file_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_source_reads_zeros_past_its_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abcdef").unwrap();
        let s = FileSource::new(File::open(&p).unwrap()).unwrap();
        assert_eq!(s.len(), 6);
        let mut buf = [9u8; 5];
        assert_eq!(s.read_at(3, &mut buf).unwrap(), 3);
        assert_eq!(&buf, b"def\0\0");
    }
}
