//! NTFS through the `ntfs` crate (read-only, no unsafe code).
//!
//! NTFS has no Unix modes: files are `0o644` (`0o444` with the read-only
//! attribute) and directories `0o755`; the modification time is the
//! $STANDARD_INFORMATION one (100 ns resolution). Reparse points (links,
//! junctions) are reported as "other" and left out of extractions. The
//! system files of the root (`$MFT`, ...) are not listed. Names are
//! compared without case. Only the unnamed data stream is read. Each
//! directory listing may read at most four times the disk (plus 256 MiB).
//!
//! A file's data past its valid data length (the initialized size of its
//! `$DATA` attribute, which Windows raises as it writes a preallocated
//! file) reads as zeros, as Windows reads it; the crate does not tell that
//! size, so knib reads it from the attribute's header in the file record
//! ([`initialized_size`]). Data the crate cannot decode (NTFS compression,
//! EFS encryption: it would give the bytes as stored) is refused, naming
//! the file.
//!
//! A directory's index (a B-tree of index records) is walked by knib, not
//! by the crate's iterator, which pushes each subnode's record on a stack
//! and never checks for one met again (an index whose nodes loop grew
//! without end), and reads records of the size the guest's $INDEX_ROOT
//! gives (up to 4 GiB each). Here a record size outside 512 bytes to
//! 64 KiB, an index record reached twice, more than [`MAX_INDEX_RECORDS`]
//! records or more than [`MAX_ENTRIES`] entries are Corrupt, naming the
//! directory; one record is held at a time, so memory stays within the
//! entries found and a few MiB.

use std::collections::HashSet;
use std::io::SeekFrom;

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace, NtfsIndexAllocation, NtfsIndexRoot};
use ntfs::{
    Ntfs, NtfsAttribute, NtfsAttributeFlags, NtfsAttributeItem, NtfsAttributeType, NtfsError, NtfsFile,
    NtfsIndexNodeEntries, NtfsReadSeek,
};

use crate::error::{KnibError, Result};

use super::device::{from_io, Window};
use super::fs::{display, Entry, FileRead, Filesystem, FsPath, Kind, Node, MAX_ENTRIES};

/// The largest index record read (NTFS writes 4 KiB ones).
pub const MAX_INDEX_RECORD: u32 = 64 << 10;
/// The most index records of one directory read: a directory of
/// [`MAX_ENTRIES`] entries holds at least six in each 4 KiB record.
pub const MAX_INDEX_RECORDS: usize = MAX_ENTRIES / 4;

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
            if !file.is_directory() {
                return Err(KnibError::corrupt(format!("{what}: its file record is not a directory's")));
            }
            let (root_item, alloc_item) = index_items(&file, win, &what)?;
            let root_attr = root_item.to_attribute().map_err(|e| err(e, &what))?;
            let root = root_attr.resident_structured_value::<NtfsIndexRoot>().map_err(|e| err(e, &what))?;
            let mut walk = IndexWalk {
                what: &what,
                dir: dir.handle,
                found: &mut found,
                pending: Vec::new(),
                seen: HashSet::new(),
            };
            walk.node(root.entries::<NtfsFileNameIndex>().map_err(|e| err(e, &what))?)?;
            if !walk.pending.is_empty() {
                let size = root.index_record_size();
                if !(512..=MAX_INDEX_RECORD).contains(&size) || size % 512 != 0 {
                    return Err(KnibError::corrupt(format!(
                        "{what}: its index records are {size} bytes each (NTFS's are 512 bytes to 64 KiB, whole sectors)"
                    )));
                }
                let alloc_item = alloc_item.ok_or_else(|| {
                    KnibError::corrupt(format!("{what}: its index has subnodes but no $INDEX_ALLOCATION"))
                })?;
                let alloc_attr = alloc_item.to_attribute().map_err(|e| err(e, &what))?;
                let alloc = alloc_attr.structured_value::<_, NtfsIndexAllocation>(win).map_err(|e| err(e, &what))?;
                while let Some(vcn) = walk.pending.pop() {
                    let record = alloc.record_from_vcn(win, size, vcn).map_err(|e| err(e, &what))?;
                    walk.node(record.entries::<NtfsFileNameIndex>().map_err(|e| err(e, &what))?)?;
                }
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

/// The $INDEX_ROOT and $INDEX_ALLOCATION attributes of directory `file`'s
/// index (`$I30`), the second only when there is one.
fn index_items<'n, 'f>(
    file: &'f NtfsFile<'n>,
    win: &mut Window,
    what: &str,
) -> Result<(NtfsAttributeItem<'n, 'f>, Option<NtfsAttributeItem<'n, 'f>>)> {
    let (mut root, mut alloc) = (None, None);
    let mut iter = file.attributes();
    while let Some(item) = iter.next(win) {
        let item = item.map_err(|e| err(e, what))?;
        let ty = {
            let attr = item.to_attribute().map_err(|e| err(e, what))?;
            let ty = attr.ty().map_err(|e| err(e, what))?;
            if !matches!(ty, NtfsAttributeType::IndexRoot | NtfsAttributeType::IndexAllocation)
                || attr.name().map_err(|e| err(e, what))? != "$I30"
            {
                continue;
            }
            ty
        };
        match ty {
            NtfsAttributeType::IndexRoot if root.is_none() => root = Some(item),
            NtfsAttributeType::IndexAllocation if alloc.is_none() => alloc = Some(item),
            _ => {}
        }
        if root.is_some() && alloc.is_some() {
            break;
        }
    }
    let root = root.ok_or_else(|| KnibError::corrupt(format!("{what}: it has no index ($INDEX_ROOT)")))?;
    Ok((root, alloc))
}

/// A walk over the nodes of one directory's index: the entries found, the
/// subnodes still to read, the subnodes met (each may be met once).
struct IndexWalk<'a> {
    what: &'a str,
    dir: u64,
    found: &'a mut Vec<(Vec<u8>, u64)>,
    pending: Vec<ntfs::types::Vcn>,
    seen: HashSet<i64>,
}

impl IndexWalk<'_> {
    /// Take the entries of one node.
    fn node(&mut self, entries: NtfsIndexNodeEntries<'_, NtfsFileNameIndex>) -> Result<()> {
        let what = self.what;
        for e in entries {
            let e = e.map_err(|e| err(e, what))?;
            if let Some(vcn) = e.subnode_vcn() {
                let vcn = vcn.map_err(|e| err(e, what))?;
                if !self.seen.insert(vcn.value()) {
                    return Err(KnibError::corrupt(format!(
                        "{what}: its index loops (the index record at VCN {} is reached twice)",
                        vcn.value()
                    )));
                }
                if self.seen.len() > MAX_INDEX_RECORDS {
                    return Err(KnibError::corrupt(format!(
                        "{what}: its index has more than {MAX_INDEX_RECORDS} records (the most knib reads of one directory)"
                    )));
                }
                self.pending.push(vcn);
            }
            let Some(key) = e.key() else { continue };
            let key = key.map_err(|e| err(e, what))?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let rec = e.file_reference().file_record_number();
            let name = key.name().to_string_lossy();
            if name == "." || (self.dir == ROOT_RECORD && rec < FIRST_USER_RECORD && name.starts_with('$')) {
                continue;
            }
            if self.found.len() >= MAX_ENTRIES {
                return Err(KnibError::corrupt(format!(
                    "{what} has more than {MAX_ENTRIES} entries (the most knib reads of one directory)"
                )));
            }
            self.found.push((name.into_bytes(), rec));
        }
        Ok(())
    }
}

impl Filesystem for NtfsFs {
    fn root(&mut self) -> Result<Node> {
        let NtfsFs { ntfs, win } = self;
        let file = ntfs.file(win, ROOT_RECORD).map_err(|e| err(e, "root directory"))?;
        node_of(&file, win, "root directory")
    }

    fn lookup(&mut self, dir_path: &FsPath, dir: &Node, name: &[u8]) -> Result<Option<Entry>> {
        let entries = self.entries(dir_path, dir)?;
        let found = super::fs::find_without_case(dir_path, entries, name, |(n, _)| vec![n.as_slice()])?;
        Ok(found.map(|(name, node)| Entry { name, node }))
    }

    fn read_dir(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<Entry>> {
        Ok(self.entries(path, dir)?.into_iter().map(|(name, node)| Entry { name, node }).collect())
    }

    fn read_link(&mut self, path: &FsPath, _node: &Node) -> Result<Vec<u8>> {
        Err(KnibError::invalid(format!("{}: NTFS reparse points are not read", display(path))))
    }

    fn open<'a>(&'a mut self, path: &FsPath, node: &Node) -> Result<Box<dyn FileRead + 'a>> {
        let what = format!("file {}", display(path));
        let valid = self.valid_length(node, &what)?;
        Ok(Box::new(NtfsReader { fs: self, what, record: node.handle, pos: 0, valid }))
    }

    fn check_readable(&mut self, path: &FsPath, node: &Node) -> Result<()> {
        self.valid_length(node, &format!("file {}", display(path))).map(drop)
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

    fn min_entry_bytes(&self) -> u64 {
        // A 16-byte index entry header and a $FILE_NAME key of 66 bytes
        // and more.
        80
    }
}

impl NtfsFs {
    /// The valid data length of file `node` (named `what`): what of its
    /// unnamed data stream reads as stored, the rest as zeros. Data the
    /// crate would give as stored, not as the file's bytes (compressed,
    /// encrypted), is refused.
    fn valid_length(&mut self, node: &Node, what: &str) -> Result<u64> {
        let NtfsFs { ntfs, win } = self;
        let file = ntfs.file(win, node.handle).map_err(|e| err(e, what))?;
        let Some(item) = file.data(win, "") else { return Ok(0) };
        let item = item.map_err(|e| err(e, what))?;
        let attr = item.to_attribute().map_err(|e| err(e, what))?;
        if attr.is_resident() {
            // Stored as it is in the file record (never compressed, even
            // when flagged so).
            return Ok(attr.value_length());
        }
        let flags = attr.flags();
        for (flag, how) in [
            (NtfsAttributeFlags::COMPRESSED, "compressed (NTFS compression)"),
            (NtfsAttributeFlags::ENCRYPTED, "encrypted (EFS)"),
        ] {
            if flags.contains(flag) {
                return Err(KnibError::invalid(format!(
                    "{what}: its data is {how}, which knib does not read (it would give the bytes as stored): copy it from the restored disk with Windows or ntfs-3g"
                )));
            }
        }
        Ok(initialized_size(ntfs, win, &file, &attr, what)?.min(attr.value_length()))
    }
}

/// A file's unnamed data stream, read from `pos` on; the file record is
/// looked up again for each read (no borrow of it outlives a call). What
/// lies past `valid` (its valid data length) reads as zeros.
struct NtfsReader<'a> {
    fs: &'a mut NtfsFs,
    what: String,
    record: u64,
    pos: u64,
    valid: u64,
}

/// The initialized size of non-resident attribute `attr` of `file` (its
/// valid data length), read from the attribute's header in its file
/// record, read whole with its update sequence applied (as the crate
/// reads records). `attr` may be in an extension record (an attribute
/// list): that record is the one of the record size holding it.
fn initialized_size(
    ntfs: &Ntfs,
    win: &Window,
    file: &NtfsFile<'_>,
    attr: &NtfsAttribute<'_, '_>,
    what: &str,
) -> Result<u64> {
    let bad = |why: String| KnibError::corrupt(format!("{what}: the header of its $DATA attribute {why}"));
    let size = u64::from(ntfs.file_record_size());
    let at = attr.position().value().ok_or_else(|| bad("has no position".into()))?.get();
    let base = file.position().value().map_or(0, |p| p.get());
    let in_base = (base..base + size).contains(&at);
    let start = if in_base { base } else { at - at % size };
    let mut rec = win.read_vec(start, size as usize)?;
    if rec.len() as u64 != size || &rec[..4] != b"FILE" {
        if !in_base {
            // An extension record not aligned to the record size (an MFT
            // of clusters smaller than its records): its data is read as
            // the crate gives it, up to its size.
            log::warn!("{what}: the file record of its $DATA attribute is not found at byte {start}; its valid data length is not known, and it is read up to its size");
            return Ok(attr.value_length());
        }
        return Err(bad(format!("is not in a file record (none at byte {start} of the filesystem)")));
    }
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let (usa, count) = (le16(&rec, 4), le16(&rec, 6));
    if count == 0 || usa + 2 * count > rec.len() || (count - 1) * 512 > rec.len() {
        return Err(bad(format!("is in a file record whose update sequence ({count} at {usa}) does not fit it")));
    }
    for i in 1..count {
        let end = i * 512;
        if rec[end - 2..end] != rec[usa..usa + 2] {
            return Err(bad(format!(
                "is in a file record whose sector {i} is torn (its update sequence number differs)"
            )));
        }
        let (a, b) = (rec[usa + 2 * i], rec[usa + 2 * i + 1]);
        rec[end - 2] = a;
        rec[end - 1] = b;
    }
    let off = (at - start) as usize;
    let le64 = |o: usize| u64::from_le_bytes(rec[o..o + 8].try_into().expect("eight bytes"));
    // The header the crate read: a non-resident $DATA of its data size.
    let same = off + 0x40 <= rec.len()
        && u32::from_le_bytes(rec[off..off + 4].try_into().expect("four bytes")) == 0x80
        && rec[off + 8] == 1
        && le64(off + 0x30) == attr.value_length();
    if !same {
        if !in_base {
            log::warn!("{what}: the header at byte {off} of the file record at byte {start} is not the one of its $DATA attribute; its valid data length is not known, and it is read up to its size");
            return Ok(attr.value_length());
        }
        return Err(bad(format!("at byte {off} of its file record is not the non-resident one read")));
    }
    Ok(le64(off + 0x38))
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
        if self.pos >= self.valid {
            // Past the valid data length: zeros, whatever the clusters hold.
            let n = buf.len().min((value.len() - self.pos).try_into().unwrap_or(usize::MAX));
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        let upto = buf.len().min((self.valid - self.pos).try_into().unwrap_or(usize::MAX));
        let buf = &mut buf[..upto];
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
