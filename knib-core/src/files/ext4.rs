//! ext2, ext3 and ext4 through the `ext4-view` crate (read-only, no unsafe
//! code, fuzzed upstream).
//!
//! ext4-view does not give inode numbers, so a directory loop (an entry
//! that leads back to an ancestor) is caught by each directory's `..`
//! entry: it must lead to the directory it was reached from (same
//! metadata), and that directory's entry of the same name must lead back
//! to it (same metadata); otherwise the directory is reached through an
//! entry of another directory: a loop or a cross-link, and an error. A loop
//! crafted to pass these checks still ends: a walk meets at most as many
//! directories as the filesystem has inodes.
//!
//! ext4-view reads by path only: every call resolves its path from the
//! root, and it refuses paths of more than 4096 bytes or 1000 components.
//! So that a walk of a deep tree costs one resolution per directory and
//! per file, not four, the metadata of the directories on the way to the
//! last one listed are kept (each from its `.` entry), and the second
//! check (through `..`, two components longer) is left out where its path
//! would pass ext4-view's limits.
//!
//! ext4-view bounds a directory's blocks only by its size, and its extents
//! may map one block many times over (each read then served by its block
//! cache, never reaching the device's checks): a directory longer than the
//! filesystem or than [`MAX_DIR_BYTES`] is refused before it is read, one
//! with more than [`MAX_ENTRIES`] entries or with a name twice (a block
//! mapped again) is Corrupt, naming it.

use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};

use crate::error::{KnibError, Result};

use super::device::Window;
use super::fs::{display, Entry, FileRead, Filesystem, FsPath, Kind, Node, MAX_DIR_BYTES, MAX_ENTRIES};

/// The longest symlink target read (a longer one is corrupt).
const MAX_LINK: u64 = 4096;
/// The longest path ext4-view resolves, in bytes and in components.
const EXT4_VIEW_PATH_BYTES: usize = 4096;
const EXT4_VIEW_PATH_COMPONENTS: usize = 1000;

struct Reader(Window);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.read_at(start, dst).map_err(|e| Box::new(e) as _)
    }
}

/// An ext2/3/4 filesystem.
pub struct Ext4Fs {
    fs: Ext4,
    inodes: u64,
    /// The bytes it spans.
    span: u64,
    /// The directories on the way to the last one listed, from the root
    /// (whose name is empty), each with its metadata.
    known: Vec<(Vec<u8>, Metadata)>,
}

/// The error for `e`, met while doing `what` (a path, a step).
fn err(e: Ext4Error, what: &str) -> KnibError {
    match e {
        Ext4Error::Io(inner) => match inner.downcast::<KnibError>() {
            Ok(k) => *k,
            Err(other) => KnibError::corrupt(format!("{what}: {other}")),
        },
        Ext4Error::NotFound => KnibError::not_found(format!("{what}: no such file or directory")),
        Ext4Error::Incompatible(i) => KnibError::invalid(format!("{what}: ext4 feature not supported: {i}")),
        Ext4Error::Encrypted => KnibError::invalid(format!("{what}: the file is encrypted")),
        Ext4Error::PathTooLong => KnibError::invalid(format!(
            "{what}: the path is longer than ext4-view reads (4096 bytes, 1000 components); extract a directory above it"
        )),
        other => KnibError::corrupt(format!("{what}: {other}")),
    }
}

fn path_bytes(path: &FsPath) -> Vec<u8> {
    let mut p = Vec::new();
    for c in path {
        p.push(b'/');
        p.extend_from_slice(c);
    }
    if p.is_empty() {
        p.push(b'/');
    }
    p
}

fn node(m: &Metadata) -> Node {
    let t = m.file_type();
    let kind = if t.is_regular_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    Node {
        kind,
        size: m.len(),
        mode: u32::from(m.mode()) & 0o7777,
        mtime: m.modified().seconds(),
        mtime_nsec: m.modified().nanoseconds(),
        id: None,
        handle: 0,
    }
}

impl Ext4Fs {
    /// Load the filesystem in `win`.
    pub fn open(win: Window) -> Result<Ext4Fs> {
        let sb = win.read_vec(1024, 1024)?;
        let inodes = if sb.len() >= 4 { u32::from_le_bytes(sb[0..4].try_into().expect("4 bytes")) as u64 } else { 0 };
        let span = win.len();
        let fs = Ext4::load(Box::new(Reader(win))).map_err(|e| err(e, "superblock"))?;
        Ok(Ext4Fs { fs, inodes, span, known: Vec::new() })
    }

    /// Whether directory `dir` at `path` is short enough to be read.
    fn check_size(&self, path: &FsPath, dir: &Node) -> Result<()> {
        let limit = self.span.min(MAX_DIR_BYTES);
        if dir.size > limit {
            return Err(KnibError::corrupt(format!(
                "directory {} is {} bytes long, more than {} ({limit} bytes): its size or extents are damaged",
                display(path),
                dir.size,
                if limit == self.span { "the whole filesystem" } else { "knib reads of one directory" }
            )));
        }
        Ok(())
    }

    fn metadata(&self, path: &FsPath) -> Result<Metadata> {
        let p = path_bytes(path);
        let ep = ext4_view::Path::try_from(p.as_slice())
            .map_err(|_| KnibError::not_found(format!("{}: not a valid ext4 path", display(path))))?;
        self.fs.symlink_metadata(ep).map_err(|e| err(e, &display(path)))
    }
}

impl Filesystem for Ext4Fs {
    fn root(&mut self) -> Result<Node> {
        Ok(node(&self.metadata(&[])?))
    }

    fn lookup(&mut self, dir_path: &FsPath, dir: &Node, name: &[u8]) -> Result<Option<Entry>> {
        self.check_size(dir_path, dir)?;
        let mut p = dir_path.to_vec();
        p.push(name.to_vec());
        match self.metadata(&p) {
            Ok(m) => Ok(Some(Entry { name: name.to_vec(), node: node(&m) })),
            Err(e) if e.kind == crate::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_dir(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<Entry>> {
        self.check_size(path, dir)?;
        let what = display(path);
        let p = path_bytes(path);
        let ep = ext4_view::Path::try_from(p.as_slice())
            .map_err(|_| KnibError::not_found(format!("{what}: not a valid ext4 path")))?;
        let mut out = Vec::new();
        let (mut dot, mut dotdot) = (None, None);
        for e in self.fs.read_dir(ep).map_err(|e| err(e, &what))? {
            let e = e.map_err(|e| err(e, &what))?;
            if out.len() >= MAX_ENTRIES {
                return Err(KnibError::corrupt(format!(
                    "directory {what} has more than {MAX_ENTRIES} entries (the most knib reads of one directory): its blocks are damaged or mapped many times"
                )));
            }
            let name = e.file_name().as_ref().to_vec();
            let m = e.metadata().map_err(|e| err(e, &format!("{what}: entry {}", String::from_utf8_lossy(&name))))?;
            match name.as_slice() {
                b"." => dot = Some(m),
                b".." => dotdot = Some(m),
                _ => out.push(Entry { name, node: node(&m) }),
            }
        }
        // A name met twice: a block of the directory mapped again.
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(KnibError::corrupt(format!(
                "directory {what} has the name {:?} twice: its blocks are mapped more than once",
                String::from_utf8_lossy(&w[0].name)
            )));
        }
        let here = match dot {
            Some(m) => m,
            None => self.metadata(path)?,
        };
        // The known directories that are this one's ancestors.
        let mut keep = 0;
        while keep < self.known.len() && keep < path.len() && (keep == 0 || self.known[keep].0 == path[keep - 1]) {
            keep += 1;
        }
        self.known.truncate(keep);
        // `..` must lead back to where the directory was reached from, and
        // that directory's entry of this name must be this directory.
        if let Some((name, parent)) = path.split_last() {
            let loops = || {
                KnibError::corrupt(format!(
                    "directory {what}: its `..` entry does not lead back to {}: the directories loop or are cross-linked",
                    display(parent)
                ))
            };
            let above = match self.known.get(parent.len()) {
                Some((_, m)) if self.known.len() == path.len() => m.clone(),
                _ => self.metadata(parent)?,
            };
            if dotdot.as_ref() != Some(&above) {
                return Err(loops());
            }
            let mut back = path_bytes(path);
            back.extend_from_slice(b"/../");
            back.extend_from_slice(name);
            if back.len() <= EXT4_VIEW_PATH_BYTES && path.len() + 2 <= EXT4_VIEW_PATH_COMPONENTS {
                let again =
                    ext4_view::Path::try_from(back.as_slice()).ok().and_then(|p| self.fs.symlink_metadata(p).ok());
                if again.as_ref() != Some(&here) {
                    return Err(loops());
                }
            }
        }
        if self.known.len() == path.len() {
            self.known.push((path.last().cloned().unwrap_or_default(), here));
        }
        Ok(out)
    }

    fn read_link(&mut self, path: &FsPath, node: &Node) -> Result<Vec<u8>> {
        if node.size > MAX_LINK {
            return Err(KnibError::corrupt(format!("symlink {}: target of {} bytes", display(path), node.size)));
        }
        let p = path_bytes(path);
        let ep = ext4_view::Path::try_from(p.as_slice())
            .map_err(|_| KnibError::not_found(format!("{}: not a valid ext4 path", display(path))))?;
        let t = self.fs.read_link(ep).map_err(|e| err(e, &display(path)))?;
        Ok(t.as_ref().to_vec())
    }

    fn open<'a>(&'a mut self, path: &FsPath, _node: &Node) -> Result<Box<dyn FileRead + 'a>> {
        let p = path_bytes(path);
        let what = display(path);
        let ep = ext4_view::Path::try_from(p.as_slice())
            .map_err(|_| KnibError::not_found(format!("{what}: not a valid ext4 path")))?;
        let file = self.fs.open(ep).map_err(|e| err(e, &what))?;
        Ok(Box::new(Ext4File { file, what }))
    }

    fn label(&mut self) -> Option<String> {
        let l = self.fs.label().to_str().ok()?.trim_end_matches('\0').trim().to_string();
        (!l.is_empty()).then_some(l)
    }

    fn max_dirs(&self) -> u64 {
        // The superblock's count is the guest's word; each directory takes
        // at least a block (1 KiB at the least) of the filesystem.
        self.inodes.min(self.span / 1024)
    }

    fn capacity(&self) -> u64 {
        self.span
    }

    fn min_entry_bytes(&self) -> u64 {
        // 8 bytes of header and a name of 1 to 4 bytes.
        12
    }
}

struct Ext4File {
    file: ext4_view::File,
    what: String,
}

impl FileRead for Ext4File {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        // ext4-view gives at most one block per call: fill what we can.
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_bytes(&mut buf[done..]).map_err(|e| err(e, &self.what))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}
