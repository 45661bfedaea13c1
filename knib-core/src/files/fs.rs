//! The one trait every filesystem reader implements, and what it returns.

use crate::error::Result;

/// A path inside a filesystem: its components from the root, each a name
/// as stored (bytes; no `/`, never `.` or `..`). The root is empty.
pub type FsPath = [Vec<u8>];

/// The most entries read from one directory of ext4 or NTFS (FAT's own
/// limit, its specification's, is 65536): a listing holds them all in
/// memory (about 80 bytes each besides its name, which an NTFS name makes
/// up to 765 bytes: at most about 850 MiB), and
/// a directory with more is refused as Corrupt, naming it.
pub const MAX_ENTRIES: usize = 1 << 20;

/// The most bytes of one ext4 directory read (its `i_size`): a directory
/// of [`MAX_ENTRIES`] entries of the longest names takes about 270 MiB; a
/// larger one is refused as Corrupt.
pub const MAX_DIR_BYTES: u64 = 1 << 30;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

impl Kind {
    /// The name used in answers: "file", "dir", "symlink", "other".
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Other => "other",
        }
    }
}

/// What a reader knows of a file, directory or link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: Kind,
    /// Its length in bytes (a symlink's: its target's length).
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// What identifies a directory in its filesystem (inode, first
    /// cluster, MFT record), when the reader knows it: a directory met
    /// again below itself is a loop.
    pub id: Option<u64>,
    /// Where the reader finds its data (reader-specific).
    pub handle: u64,
}

/// One entry of a directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name, as stored.
    pub name: Vec<u8>,
    /// What it is.
    pub node: Node,
}

/// A file's bytes, read in order.
pub trait FileRead {
    /// Read up to `buf.len()` bytes; 0 at the end.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;
}

/// A read-only filesystem. Paths given to it are canonical: every component
/// but the last is a directory (never a symlink), so a reader never
/// resolves links itself.
pub trait Filesystem {
    /// The root directory.
    fn root(&mut self) -> Result<Node>;
    /// The entry `name` of directory `dir` (at `dir_path`), not following a
    /// link, with its name as stored (filesystems that ignore case);
    /// `None` when there is none.
    fn lookup(&mut self, dir_path: &FsPath, dir: &Node, name: &[u8]) -> Result<Option<Entry>> {
        Ok(self.read_dir(dir_path, dir)?.into_iter().find(|e| e.name == name))
    }
    /// The entries of directory `dir` at `path`, without `.` and `..`.
    fn read_dir(&mut self, path: &FsPath, dir: &Node) -> Result<Vec<Entry>>;
    /// The target of symlink `node` at `path`.
    fn read_link(&mut self, path: &FsPath, node: &Node) -> Result<Vec<u8>>;
    /// The bytes of file `node` at `path`.
    fn open<'a>(&'a mut self, path: &FsPath, node: &Node) -> Result<Box<dyn FileRead + 'a>>;
    /// The filesystem's label, if set.
    fn label(&mut self) -> Option<String>;
    /// An upper bound of the directories the filesystem can hold: a walk
    /// that meets more is going round a loop.
    fn max_dirs(&self) -> u64;
    /// The bytes the filesystem spans on its disk: more data than this
    /// can be read from it only when its files share their data (a
    /// cross-linked filesystem, or hard links).
    fn capacity(&self) -> u64;
    /// The fewest bytes of the filesystem one directory entry takes (an
    /// ext4 entry of a one-byte name, a FAT entry, an NTFS index entry):
    /// a walk that meets more than [`Filesystem::capacity`] over this many
    /// entries is going round cross-linked directories.
    fn min_entry_bytes(&self) -> u64;
    /// Refuse file `node` at `path` when its data cannot be read as the
    /// file's bytes (NTFS compression, encryption): called for every file
    /// an extraction counts, so that it fails before writing anything.
    fn check_readable(&mut self, _path: &FsPath, _node: &Node) -> Result<()> {
        Ok(())
    }
}

/// `path` as `/a/b` for messages (names not in UTF-8 shown lossily).
pub fn display(path: &FsPath) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.iter().map(|c| format!("/{}", String::from_utf8_lossy(c))).collect()
}

/// The item of `items` (a directory's entries) that `name` names, for a
/// filesystem whose names are looked up without case: the one with
/// exactly that name (any of `keys`: a FAT entry's long and short names),
/// else the only one whose name matches without case. Several matching
/// without case and none exactly (`README` and `Readme`, asked for as
/// `readme`) is invalid input naming them, never one picked for the other.
pub fn find_without_case<T>(
    dir_path: &FsPath,
    items: Vec<T>,
    name: &[u8],
    keys: impl Fn(&T) -> Vec<&[u8]>,
) -> crate::error::Result<Option<T>> {
    if let Some(i) = items.iter().position(|t| keys(t).contains(&name)) {
        return Ok(items.into_iter().nth(i));
    }
    let want = String::from_utf8_lossy(name).to_lowercase();
    let same = |t: &T| keys(t).iter().any(|k| String::from_utf8_lossy(k).to_lowercase() == want);
    let mut found: Vec<T> = items.into_iter().filter(|t| same(t)).collect();
    if found.len() > 1 {
        let names: Vec<String> = found.iter().map(|t| format!("{:?}", String::from_utf8_lossy(keys(t)[0]))).collect();
        let mut path = dir_path.to_vec();
        path.push(name.to_vec());
        return Err(crate::error::KnibError::invalid(format!(
            "{}: the entries {} match it without case, and none exactly: ask for one by its exact name",
            display(&path),
            names.join(" and ")
        )));
    }
    Ok(found.pop())
}
