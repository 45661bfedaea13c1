//! NTFS through the `ntfs` crate (read-only, no unsafe code).
//!
//! NTFS has no Unix modes: files are `0o644` (`0o444` with the read-only
//! attribute) and directories `0o755`; the modification time is the
//! $STANDARD_INFORMATION one (100 ns resolution). Reparse points (links,
//! junctions) are reported as "other" and left out of extractions. The
//! system files of the root (`$MFT`, ...) are not listed. Names are
//! compared without case. Only the unnamed data stream is read. Each
//! directory listing may read at most four times the disk (plus 256 MiB):
//! an index whose nodes loop ends in an error.

use std::io::SeekFrom;

use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsError, NtfsFile, NtfsReadSeek};

use crate::error::{KnibError, Result};

use super::device::{from_io, Window};
use super::fs::{display, Entry, FileRead, Filesystem, FsPath, Kind, Node};

/// The root directory's file record.
const ROOT_RECORD: u64 = 5;
/// File records below this are the system's.
const FIRST_USER_RECORD: u64 = 24;

/// An NTFS filesystem.
pub struct NtfsFs {
    ntfs: Ntfs,
    win: Window,
}

fn err(e: NtfsError, what: &str) -> KnibError {
    match e {
        NtfsError::Io(io) => {
            let k = from_io(&io, what);
            if k.message.contains(what) {
                k
            } else {
                k.context(what)
            }
        }
        other => KnibError::corrupt(format!("{what}: {other}")),
    }
}

/// An NT time (100 ns units since 1601) as Unix seconds and nanoseconds.
pub(crate) fn unix_time(t: u64) -> (i64, u32) {
    const EPOCH_DIFF: i64 = 11_644_473_600;
    ((t / 10_000_000) as i64 - EPOCH_DIFF, (t % 10_000_000) as u32 * 100)
}

/// Lifts the device's read budget when dropped.
struct Budget(Window);

impl Budget {
    fn set(win: &Window, what: &str) -> Budget {
        let size = win.device().borrow().size();
        win.device().borrow_mut().set_budget(Some(size.saturating_mul(4).saturating_add(256 << 20)), what);
        Budget(win.clone())
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.0.device().borrow_mut().set_budget(None, "");
    }
}

fn node_of(file: &NtfsFile<'_>, win: &mut Window, what: &str) -> Result<Node> {
    let info = file.info().map_err(|e| err(e, what))?;
    let attrs = info.file_attributes();
    let dir = file.is_directory();
    let kind = if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        Kind::Other
    } else if dir {
        Kind::Dir
    } else {
        Kind::File
    };
    let size = if kind == Kind::File {
        match file.data(win, "") {
            None => 0,
            Some(item) => {
                let item = item.map_err(|e| err(e, what))?;
                item.to_attribute().map_err(|e| err(e, what))?.value_length()
            }
        }
    } else {
        0
    };
    let mode = if dir {
        0o755
    } else if attrs.contains(NtfsFileAttributeFlags::READ_ONLY) {
        0o444
    } else {
        0o644
    };
    let (mtime, mtime_nsec) = unix_time(info.modification_time().nt_timestamp());
    let rec = file.file_record_number();
    Ok(Node { kind, size, mode, mtime, mtime_nsec, id: dir.then_some(rec), handle: rec })
}

impl NtfsFs {
    /// Read the boot sector and the MFT's own record of the NTFS in `win`.
    pub fn open(win: Window) -> Result<NtfsFs> {
        let mut w = win.clone();
        let ntfs = Ntfs::new(&mut w).map_err(|e| err(e, "NTFS boot sector"))?;
        Ok(NtfsFs { ntfs, win })
    }

    fn entries(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<(Vec<u8>, Node)>> {
        let what = format!("directory {}", display(path));
        let NtfsFs { ntfs, win } = self;
        let mut found = Vec::new();
        {
            let _budget = Budget::set(win, &format!("listing {what}"));
            let file = ntfs.file(win, dir.handle).map_err(|e| err(e, &what))?;
            let index = file.directory_index(win).map_err(|e| err(e, &what))?;
            let mut iter = index.entries();
            while let Some(e) = iter.next(win) {
                let e = e.map_err(|e| err(e, &what))?;
                let Some(key) = e.key() else { continue };
                let key = key.map_err(|e| err(e, &what))?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let rec = e.file_reference().file_record_number();
                let name = key.name().to_string_lossy();
                if name == "." || (dir.handle == ROOT_RECORD && rec < FIRST_USER_RECORD && name.starts_with('$')) {
                    continue;
                }
                found.push((name.into_bytes(), rec));
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (name, rec) in found {
            let what = format!("{what}: entry {}", String::from_utf8_lossy(&name));
            let file = ntfs.file(win, rec).map_err(|e| err(e, &what))?;
            out.push((name, node_of(&file, win, &what)?));
        }
        Ok(out)
    }
}

impl Filesystem for NtfsFs {
    fn root(&mut self) -> Result<Node> {
        let NtfsFs { ntfs, win } = self;
        let file = ntfs.file(win, ROOT_RECORD).map_err(|e| err(e, "root directory"))?;
        node_of(&file, win, "root directory")
    }

    fn lookup(&mut self, dir_path: &FsPath, dir: &Node, name: &[u8]) -> Result<Option<Entry>> {
        let want = String::from_utf8_lossy(name).to_lowercase();
        Ok(self
            .entries(dir_path, dir)?
            .into_iter()
            .find(|(n, _)| String::from_utf8_lossy(n).to_lowercase() == want)
            .map(|(name, node)| Entry { name, node }))
    }

    fn read_dir(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<Entry>> {
        Ok(self.entries(path, dir)?.into_iter().map(|(name, node)| Entry { name, node }).collect())
    }

    fn read_link(&mut self, path: &FsPath, _node: &Node) -> Result<Vec<u8>> {
        Err(KnibError::invalid(format!("{}: NTFS reparse points are not read", display(path))))
    }

    fn open<'a>(&'a mut self, path: &FsPath, node: &Node) -> Result<Box<dyn FileRead + 'a>> {
        Ok(Box::new(NtfsReader { fs: self, what: format!("file {}", display(path)), record: node.handle, pos: 0 }))
    }

    fn label(&mut self) -> Option<String> {
        let NtfsFs { ntfs, win } = self;
        let name = ntfs.volume_name(win)?.ok()?.name().to_string_lossy();
        (!name.is_empty()).then_some(name)
    }

    fn max_dirs(&self) -> u64 {
        self.win.len() / u64::from(self.ntfs.file_record_size().max(256))
    }

    fn capacity(&self) -> u64 {
        self.win.len()
    }
}

/// A file's unnamed data stream, read from `pos` on; the file record is
/// looked up again for each read (no borrow of it outlives a call).
struct NtfsReader<'a> {
    fs: &'a mut NtfsFs,
    what: String,
    record: u64,
    pos: u64,
}

impl FileRead for NtfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let what = &self.what;
        let NtfsFs { ntfs, win } = &mut *self.fs;
        let file = ntfs.file(win, self.record).map_err(|e| err(e, what))?;
        let Some(item) = file.data(win, "") else { return Ok(0) };
        let item = item.map_err(|e| err(e, what))?;
        let attr = item.to_attribute().map_err(|e| err(e, what))?;
        let mut value = attr.value(win).map_err(|e| err(e, what))?;
        if self.pos >= value.len() {
            return Ok(0);
        }
        value.seek(win, SeekFrom::Start(self.pos)).map_err(|e| err(e, what))?;
        let mut done = 0;
        while done < buf.len() {
            let n = value.read(win, &mut buf[done..]).map_err(|e| err(e, what))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        self.pos += done as u64;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_times() {
        assert_eq!(unix_time(116_444_736_000_000_000), (0, 0));
        assert_eq!(
            unix_time(116_444_736_000_000_000 + 16_000_000_000_000_000 + 1_234_567),
            (1_600_000_000, 123_456_700)
        );
    }
}
