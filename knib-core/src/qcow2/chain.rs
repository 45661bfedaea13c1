//! A qcow2 image and its backing files, read as the guest sees the top.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::header::MAGIC;
use super::image::{file_size, Qcow2Image};
use crate::error::{KnibError, Result};

/// The most files a chain may have (the top included).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A raw file used as a backing file: its bytes are its guest content and
/// its length its virtual size.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: File,
    len: u64,
    /// Every answer of [`RawImage::next_data`], by the offset asked:
    /// (data from, hole from). A scan asks the file system once per
    /// stretch of data or hole, not once per block; and a second scan (a
    /// copy plans from the tables, then copies) gets the first one's
    /// answers, which a file system may otherwise change meanwhile (ext4
    /// and XFS count a preallocated stretch as data only while its pages
    /// are cached: the copy's own reads could turn a hole the plan skipped
    /// into data, and the image written would not match its plan).
    answers: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl RawImage {
    /// Open the raw file at `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| KnibError::io("open raw image", path, e))?;
        let len = file_size(&file).map_err(|e| KnibError::io("size raw image", path, e))?;
        Ok(RawImage { path: path.to_path_buf(), file, len, answers: Default::default() })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A duplicate of its descriptor.
    pub(crate) fn dup_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Its virtual size: the file's (or block device's) length when opened.
    pub fn virtual_size(&self) -> u64 {
        self.len
    }

    /// The first offset at or past `from` that may hold data: the next
    /// data the file system knows of (`lseek(SEEK_DATA)`; a hole reads as
    /// zeros), its virtual size when none is left, `from` itself where the
    /// file system or device cannot say (every byte may then be data).
    /// Asked of the file system only where no earlier answer covers
    /// `from` (a file system on the network answers each question over a
    /// round trip), so the same image answers the same for its life.
    pub(crate) fn next_data(&mut self, from: u64) -> u64 {
        if from >= self.len {
            return self.len;
        }
        if let Some((&asked, &(data, hole))) = self.answers.range(..=from).next_back() {
            if (asked..data).contains(&from) {
                return data;
            }
            if (data..hole).contains(&from) {
                return from;
            }
        }
        let (data, hole) = match self.seek(from, libc::SEEK_DATA) {
            // No data past `from`.
            Err(libc::ENXIO) => (self.len, self.len),
            // Cannot say: data, up to the end.
            Err(_) => (from, self.len),
            Ok(data) => (data, self.seek(data, libc::SEEK_HOLE).unwrap_or(self.len).max(data + 1)),
        };
        self.answers.insert(from, (data, hole));
        data
    }

    /// `lseek(offset, whence)` within the image's length, or the call's
    /// error number. Its reads are positioned (pread), so moving the file
    /// offset changes nothing for them.
    fn seek(&self, offset: u64, whence: libc::c_int) -> std::result::Result<u64, i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor this image owns.
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), crate::fsio::to_off(offset), whence) };
        if at < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok((at as u64).clamp(offset, self.len))
    }

    /// Read bytes `offset..offset + buf.len()`; bytes past the end of the
    /// file (should it shrink) read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Qcow2Image::check_range(|| format!("raw image {}", self.path.display()), self.len, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KnibError::io("read raw image", &self.path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
}

/// One file of a [`Chain`].
#[derive(Debug)]
pub enum Layer {
    /// A qcow2 file.
    Qcow2(Box<Qcow2Image>),
    /// A raw file (only as a backing file).
    Raw(RawImage),
}

impl Layer {
    /// The layer's virtual size.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.virtual_size(),
            Layer::Raw(r) => r.virtual_size(),
        }
    }

    /// The path the layer was opened from (`None` for an in-memory image).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Layer::Qcow2(i) => i.path(),
            Layer::Raw(r) => Some(r.path()),
        }
    }
}

/// A qcow2 image with its backing chain, read as the guest sees the top.
///
/// The top's unallocated clusters read from its backing file, and so on
/// down; bytes past a backing file's end (a backing file shorter than the
/// image above it) and unallocated clusters of the last file read as zeros.
#[derive(Debug)]
pub struct Chain {
    top: Qcow2Image,
    /// The backing files, nearest first.
    backing: Vec<Layer>,
}

/// Why [`Chain::walk`] failed: a file of the chain is neither a regular
/// file nor a block device, or any other reason.
enum Refusal {
    SpecialFile(KnibError),
    Other(KnibError),
}

impl From<KnibError> for Refusal {
    fn from(e: KnibError) -> Self {
        Refusal::Other(e)
    }
}

impl Chain {
    /// Open the qcow2 image at `top` and its backing files, at most
    /// [`MAX_CHAIN_DEPTH`] files.
    ///
    /// A relative backing name is resolved against the directory of the
    /// image that names it. The backing format comes from the image's
    /// backing format extension ("qcow2" or "raw"; others are refused), or
    /// is probed from the file's magic when there is none.
    ///
    /// Errors: [`crate::ErrorKind::NotFound`] for a missing backing file;
    /// [`crate::ErrorKind::Corrupt`] for a chain that loops or is deeper
    /// than the limit, and for any image that [`Qcow2Image::open`] refuses
    /// as corrupt; [`crate::ErrorKind::InvalidInput`] for an unsupported
    /// backing format or protocol; [`crate::ErrorKind::Io`] for a file of
    /// the chain that is neither a regular file nor a block device (a FIFO,
    /// a character device, a directory: checked before it is opened, never
    /// read, and not an image qemu-img should be asked to read either).
    pub fn open(top: &Path) -> Result<Self> {
        Self::open_with_depth(top, MAX_CHAIN_DEPTH)
    }

    /// [`Chain::open`] with a chain of at most `max_depth` files.
    pub fn open_with_depth(top: &Path, max_depth: usize) -> Result<Self> {
        Self::open_inner(top, max_depth, false)
    }

    /// [`Chain::open`] for a chain named from outside (a backup file given
    /// by its path): every file of it must be a regular file (checked
    /// before it is opened, so a device or a fifo is never read) holding
    /// qcow2; a raw backing file is refused (a backup's chain is all
    /// qcow2, and a raw pointer could name any file or disk of the host);
    /// and every backing file is on the filesystem of `top`: a backup's
    /// chain stays in its backup repository (a store, CloudStack's
    /// backup repository mount), and a pointer out of it, written into a
    /// backup file on a share others can write, would restore, boot or
    /// browse another VM's disk on primary storage as this backup's.
    ///
    /// Errors: those of [`Chain::open`], InvalidInput naming the file
    /// that is not a regular file or not qcow2, and Corrupt naming a
    /// backing file on another filesystem.
    pub fn open_files_only(top: &Path) -> Result<Self> {
        Self::open_inner(top, MAX_CHAIN_DEPTH, true)
    }

    fn open_inner(top: &Path, max_depth: usize, files_only: bool) -> Result<Self> {
        Self::walk(top, max_depth, files_only).map_err(|r| match r {
            Refusal::SpecialFile(e) | Refusal::Other(e) => e,
        })
    }

    /// The error of [`Chain::open`] on `top` when a file of its chain is
    /// neither a regular file nor a block device (that file is never
    /// opened); `None` when the chain opens, or fails for any other reason.
    pub(crate) fn special_file_in(top: &Path) -> Option<KnibError> {
        match Self::walk(top, MAX_CHAIN_DEPTH, false) {
            Err(Refusal::SpecialFile(e)) => Some(e),
            _ => None,
        }
    }

    fn walk(top: &Path, max_depth: usize, files_only: bool) -> std::result::Result<Self, Refusal> {
        let mut layers = Vec::new();
        // Files seen, by device and inode (so symlinks and hard links count).
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        let mut names: Vec<String> = Vec::new();
        let mut path = top.to_path_buf();
        let mut format = Some("qcow2".to_string());
        let mut top_dev = None;
        loop {
            let meta = std::fs::metadata(&path).map_err(|e| match names.last() {
                Some(parent) => {
                    KnibError::io("open backing file", &path, e).context(format!("backing chain of {parent}"))
                }
                None => KnibError::io("open qcow2 image", &path, e),
            })?;
            let block = meta.file_type().is_block_device();
            if !meta.is_file() && (files_only || !block) {
                // Never opened: a FIFO would wait for a writer, a character
                // device (`/dev/zero`) never ends. A disk's chain (not a
                // backup's) gets an I/O error, not InvalidInput: callers
                // hand InvalidInput refusals of the reader to qemu-img,
                // which would wait on the FIFO in its turn.
                let e = match files_only {
                    true => KnibError::invalid(format!("{} is not a regular file", path.display())),
                    false => KnibError::new(
                        crate::ErrorKind::Io,
                        format!("{} is neither a regular file nor a block device: it is not read", path.display()),
                    ),
                };
                let e = match names.last() {
                    Some(parent) => e.context(format!("backing chain of {parent}")),
                    None => e,
                };
                return Err(if files_only { Refusal::Other(e) } else { Refusal::SpecialFile(e) });
            }
            if files_only && *top_dev.get_or_insert(meta.dev()) != meta.dev() {
                return Err(Refusal::Other(KnibError::corrupt(format!(
                    "backing file {} of {} is on another filesystem than backup file {}: a backup's chain stays on the filesystem of its backup repository (a pointer out of it could name another VM's disk), and a chain spread over several filesystems is not read; refused",
                    path.display(),
                    names.last().map_or("", String::as_str),
                    top.display()
                ))));
            }
            names.push(path.display().to_string());
            if !seen.insert((meta.dev(), meta.ino())) {
                return Err(Refusal::Other(KnibError::corrupt(format!("backing chain loops: {}", names.join(" -> ")))));
            }
            if layers.len() >= max_depth {
                return Err(Refusal::Other(KnibError::corrupt(format!(
                    "backing chain of {} is deeper than {max_depth} files",
                    top.display()
                ))));
            }
            let fmt = match format.take() {
                Some(f) => f,
                None => probe(&path, names.iter().rev().nth(1).map_or("", String::as_str))?,
            };
            if files_only && fmt != "qcow2" {
                return Err(Refusal::Other(KnibError::invalid(format!(
                    "backing file {} of {} is not qcow2 (format \"{fmt}\"): a backup's chain holds only qcow2 files",
                    path.display(),
                    names[names.len() - 2]
                ))));
            }
            let layer = match fmt.as_str() {
                "qcow2" => Layer::Qcow2(Box::new(Qcow2Image::open(&path)?)),
                "raw" => Layer::Raw(RawImage::open(&path)?),
                other => {
                    return Err(Refusal::Other(KnibError::invalid(format!(
                        "backing file {} has format \"{other}\": only qcow2 and raw are supported",
                        path.display()
                    ))))
                }
            };
            let next = match &layer {
                Layer::Qcow2(img) => {
                    img.header().backing_file.clone().map(|name| (name, img.header().backing_format.clone()))
                }
                Layer::Raw(_) => None,
            };
            layers.push(layer);
            let Some((name, backing_format)) = next else { break };
            // QEMU takes a name with a ':' before any '/' for a protocol
            // (`file:/etc/shadow`, `host_device:/dev/sda`, `nbd:unix:...`)
            // and opens what it names, not the file knib would find by
            // that name in the directory. A disk's `json:` description (or
            // a URL) is left to qemu-img, as before (InvalidInput); any
            // other protocol, and any at all in a backup's chain, is
            // refused as corrupt, which no caller hands to qemu-img: knib
            // never checks one chain while QEMU reads another.
            if has_protocol(&name) || name.contains("://") {
                let described = name.starts_with("json:") || name.contains("://");
                let e = if described && !files_only {
                    KnibError::invalid(format!(
                        "{}: backing file \"{name}\" is not a plain file name (protocols are not supported)",
                        path.display()
                    ))
                } else {
                    KnibError::corrupt(format!(
                        "{}: backing file \"{name}\" names a QEMU protocol, not a file (a ':' before any '/'): QEMU would open what it names; refused",
                        path.display()
                    ))
                };
                return Err(Refusal::Other(e));
            }
            let named = Path::new(&name);
            path = if named.is_absolute() {
                named.to_path_buf()
            } else {
                path.parent().map(|d| d.join(named)).unwrap_or_else(|| named.to_path_buf())
            };
            format = backing_format;
        }
        // One L2 cache budget for the whole chain, shared by its qcow2 layers.
        let qcow2_layers = layers.iter().filter(|l| matches!(l, Layer::Qcow2(_))).count().max(1) as u64;
        for l in &mut layers {
            if let Layer::Qcow2(img) = l {
                img.set_l2_cache_bytes(super::image::L2_CACHE_BYTES / qcow2_layers);
            }
        }
        let mut layers = layers.into_iter();
        match layers.next() {
            Some(Layer::Qcow2(top)) => Ok(Chain { top: *top, backing: layers.collect() }),
            _ => Err(KnibError::internal(format!("chain of {} has no qcow2 top", top.display())).into()),
        }
    }

    /// A chain of images opened by the caller (from [`super::ReadAt`]
    /// sources, such as a vault's objects): `top`, then its backing files
    /// nearest first. The caller has checked that each one's backing
    /// pointer names the next; the L2 cache budget is shared as in
    /// [`Chain::open`].
    pub fn from_images(top: Qcow2Image, backing: Vec<Qcow2Image>) -> Result<Self> {
        if backing.len() >= MAX_CHAIN_DEPTH {
            return Err(KnibError::corrupt(format!(
                "backing chain of {} is deeper than {MAX_CHAIN_DEPTH} files",
                top.name()
            )));
        }
        let share = super::image::L2_CACHE_BYTES / (1 + backing.len() as u64);
        let mut top = top;
        top.set_l2_cache_bytes(share);
        let backing = backing
            .into_iter()
            .map(|mut img| {
                img.set_l2_cache_bytes(share);
                Layer::Qcow2(Box::new(img))
            })
            .collect();
        Ok(Chain { top, backing })
    }

    /// The top image (its header, its own [`Qcow2Image::cluster_state`]).
    pub fn top(&self) -> &Qcow2Image {
        &self.top
    }

    /// The top image, mutable (lookups fill its L2 cache).
    pub fn top_mut(&mut self) -> &mut Qcow2Image {
        &mut self.top
    }

    /// The top image and its backing files (nearest first), taken apart.
    pub fn into_parts(self) -> (Qcow2Image, Vec<Layer>) {
        (self.top, self.backing)
    }

    /// The backing files, nearest first.
    pub fn backing(&self) -> &[Layer] {
        &self.backing
    }

    /// Number of files in the chain, the top included.
    pub fn depth(&self) -> usize {
        1 + self.backing.len()
    }

    /// The top's virtual size: the guest-visible size.
    pub fn virtual_size(&self) -> u64 {
        self.top.virtual_size()
    }

    /// The parts of guest range `offset..offset + len` (clipped to the
    /// virtual size) that some layer holds data for: a data or compressed
    /// cluster, or a raw layer, not hidden by a zero cluster above it. Read
    /// from the tables only (a data cluster holding zero bytes counts as
    /// data). The ranges are in order, at the granularity of the chain's
    /// smallest cluster size, and clipped to the range asked.
    ///
    /// Errors: those of [`Qcow2Image::cluster_state`]. (No [`crate::Control`]
    /// to check: a range no layer maps, or maps with L2 tables of zeros
    /// only, is passed in one step per L1 entry.)
    pub fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len).min(self.virtual_size());
        let grain = self
            .backing
            .iter()
            .filter_map(|l| match l {
                Layer::Qcow2(img) => Some(img.cluster_size()),
                Layer::Raw(_) => None,
            })
            .fold(self.top.cluster_size(), u64::min);
        // The smallest range of an L1 entry: every layer maps all of one
        // such range or none of it.
        let span = |img: &Qcow2Image| img.cluster_size() * img.header().l2_entries();
        let min_span = self
            .backing
            .iter()
            .filter_map(|l| match l {
                Layer::Qcow2(img) => Some(span(img)),
                Layer::Raw(_) => None,
            })
            .fold(span(&self.top), u64::min);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let first = offset / grain * grain;
        let mut at = first;
        while at < end {
            // A range no layer maps (no L2 table, or one of zeros) is
            // passed in one step (a large sparse disk costs a few table
            // lookups, not one per cluster); its end is a multiple of the
            // grain. Asked where such a range may start, not per cluster.
            if at == first || at.is_multiple_of(min_span) {
                if let Some(skip) = self.no_tables_until(at)? {
                    at = skip.max(at + grain);
                    continue;
                }
            }
            // Within a mapped range, the clusters no layer's entry maps
            // are passed in one step too (a crafted table may hold one
            // entry among millions of 0).
            let next = self.next_entry_at_or_after(at)?.min(end) / grain * grain;
            if next > at {
                at = next;
                continue;
            }
            if self.has_data_at(at)? {
                let (s, e) = (at.max(offset), (at + grain).min(end));
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == s => last.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            at += grain;
        }
        Ok(out)
    }

    /// Where the range from guest byte `offset` on that no layer maps
    /// ([`Qcow2Image::l2_range_mapped`]: no L2 table, or one of zeros)
    /// ends (the first layer's end, top down, past which every layer below
    /// reads as zeros, ends it too): `None` when some layer maps something
    /// there, or a raw layer holds data. The end is the end of an L1
    /// entry's range of a layer above, or `u64::MAX`.
    fn no_tables_until(&mut self, offset: u64) -> Result<Option<u64>> {
        let backing = self.backing.iter_mut().map(|l| match l {
            Layer::Qcow2(img) => Ok(&mut **img),
            Layer::Raw(raw) => Err(raw.virtual_size()),
        });
        let mut end = u64::MAX;
        for layer in std::iter::once(Ok(&mut self.top)).chain(backing) {
            let img = match layer {
                Ok(img) => img,
                // A raw layer holds data up to its end.
                Err(raw_size) => return Ok((offset >= raw_size).then_some(end)),
            };
            if offset >= img.virtual_size() {
                return Ok(Some(end));
            }
            let span = img.header().l2_entries() * img.cluster_size();
            if img.l2_range_mapped((offset / span) as usize)? {
                return Ok(None);
            }
            end = end.min((offset / span + 1) * span);
        }
        Ok(Some(end))
    }

    /// The first guest byte at or after `offset` in a cluster whose L2
    /// entry is not 0 in some layer that is read there, or at the end of a
    /// layer's virtual size (where what is read changes), whichever comes
    /// first; `offset` itself when a raw layer is read there.
    fn next_entry_at_or_after(&mut self, offset: u64) -> Result<u64> {
        let mut next = u64::MAX;
        let backing = self.backing.iter_mut().map(|l| match l {
            Layer::Qcow2(img) => Ok(&mut **img),
            Layer::Raw(raw) => Err(raw.virtual_size()),
        });
        for layer in std::iter::once(Ok(&mut self.top)).chain(backing) {
            let img = match layer {
                Ok(img) => img,
                Err(raw_size) if offset < raw_size => return Ok(offset),
                Err(_) => break,
            };
            if offset >= img.virtual_size() {
                break;
            }
            let cs = img.cluster_size();
            let mapped = img.next_mapped_cluster(offset / cs)?.saturating_mul(cs);
            next = next.min(mapped.max(offset)).min(img.virtual_size());
        }
        Ok(next.max(offset))
    }

    /// Whether the cluster holding guest byte `offset` has data in some
    /// layer (see [`Chain::data_ranges`]).
    fn has_data_at(&mut self, offset: u64) -> Result<bool> {
        fn state(img: &mut Qcow2Image, offset: u64) -> Result<Option<bool>> {
            if offset >= img.virtual_size() {
                return Ok(Some(false));
            }
            Ok(match img.cluster_state(offset / img.cluster_size())? {
                super::ClusterState::Unallocated => None,
                super::ClusterState::Zero => Some(false),
                _ => Some(true),
            })
        }
        if let Some(d) = state(&mut self.top, offset)? {
            return Ok(d);
        }
        for layer in &mut self.backing {
            match layer {
                Layer::Qcow2(img) => {
                    if let Some(d) = state(img, offset)? {
                        return Ok(d);
                    }
                }
                Layer::Raw(raw) => return Ok(offset < raw.virtual_size()),
            }
        }
        Ok(false)
    }

    /// Read guest-visible bytes `offset..offset + buf.len()` of the top.
    ///
    /// Errors: [`crate::ErrorKind::InvalidInput`] when the range goes past
    /// the virtual size; [`crate::ErrorKind::Corrupt`] when a structure that
    /// the read uses is damaged (the error names the file).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let backing = &mut self.backing;
        self.top.read_with(offset, buf, &mut |o, b| read_layers(backing, o, b))
    }
}

/// Read `buf` at `offset` of `layers[0]`, its unallocated parts from the
/// rest; the part past a layer's virtual size reads as zeros.
pub(crate) fn read_layers(layers: &mut [Layer], offset: u64, buf: &mut [u8]) -> Result<()> {
    let Some((first, rest)) = layers.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    let size = first.virtual_size();
    let within = if offset >= size { 0 } else { (size - offset).min(buf.len() as u64) as usize };
    let (inside, past) = buf.split_at_mut(within);
    past.fill(0);
    if inside.is_empty() {
        return Ok(());
    }
    match first {
        Layer::Qcow2(img) => img.read_with(offset, inside, &mut |o, b| read_layers(rest, o, b)),
        Layer::Raw(raw) => raw.read_at(offset, inside),
    }
}

/// The bytes QEMU's format probe reads at the start of an image.
const PROBE_BYTES: usize = 2048;

/// The format of a backing file named without one (`parent`'s): qcow2 by
/// its magic, else raw, as QEMU probes it. A file another format QEMU
/// probes claims (its magic, or the name of a `.dmg`) is refused as
/// InvalidInput naming it and the format: QEMU reads it as that format,
/// not as raw, so the callers leave it to qemu-img.
fn probe(path: &Path, parent: &str) -> Result<String> {
    let file = File::open(path).map_err(|e| KnibError::io("open backing file", path, e))?;
    let mut head = [0u8; PROBE_BYTES];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KnibError::io("read backing file", path, e)),
        }
    }
    let head = &head[..got];
    if head.starts_with(&MAGIC) {
        return Ok("qcow2".to_string());
    }
    if let Some((format, why)) = other_format(head, path) {
        return Err(KnibError::invalid(format!(
            "backing file {} of {parent} has no format recorded and is {format} ({why}), which QEMU reads as \
             {format}: only qcow2 and raw are read natively",
            path.display()
        )));
    }
    Ok("raw".to_string())
}

/// The format other than qcow2 and raw QEMU's probe finds in a file whose
/// first bytes are `head` (at most [`PROBE_BYTES`]), and what tells it: the
/// content checks of its drivers' probes (version fields aside: a file
/// refused here is read by qemu-img, which probes it again).
fn other_format(head: &[u8], path: &Path) -> Option<(&'static str, &'static str)> {
    const MAGICS: &[(&[u8], &str, &str)] = &[
        (b"KDMV", "vmdk", "magic \"KDMV\""),
        (b"COWD", "vmdk", "magic \"COWD\""),
        (b"QED\0", "qed", "magic \"QED\\0\""),
        (b"vhdxfile", "vhdx", "signature \"vhdxfile\""),
        (b"conectix", "vpc", "cookie \"conectix\""),
        (b"LUKS\xba\xbe", "luks", "magic \"LUKS\\xba\\xbe\""),
        (b"WithoutFreeSpace", "parallels", "magic \"WithoutFreeSpace\""),
        (b"WithouFreSpacExt", "parallels", "magic \"WithouFreSpacExt\""),
        (b"Bochs Virtual HD Image", "bochs", "magic \"Bochs Virtual HD Image\""),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$IMAGE\n", "cloop", "cloop header"),
    ];
    if let Some((_, format, why)) = MAGICS.iter().find(|(m, _, _)| head.starts_with(m)) {
        return Some((format, why));
    }
    if head.get(0x40..0x44) == Some(&0xbeda_107fu32.to_le_bytes()[..]) {
        return Some(("vdi", "signature 0xbeda107f at 0x40"));
    }
    if vmdk_descriptor(head) {
        return Some(("vmdk", "a VMDK descriptor"));
    }
    if path.to_str().is_some_and(|n| n.len() > 4 && n.ends_with(".dmg")) {
        return Some(("dmg", "its name ends in .dmg"));
    }
    None
}

/// Whether `head` is a VMDK text descriptor as QEMU's `vmdk_probe` finds
/// one: comment lines and blank lines, then `version=1`, `2` or `3`.
fn vmdk_descriptor(head: &[u8]) -> bool {
    let mut p = 0;
    while p < head.len() {
        match head[p] {
            b'#' => {
                while p < head.len() && head[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < head.len() && head[p] == b' ' {
                    p += 1;
                }
                if p < head.len() && head[p] == b'\r' {
                    p += 1;
                }
                if p == head.len() || head[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &head[p..];
                return [b'1', b'2', b'3'].iter().any(|&v| {
                    let line = [&b"version="[..], &[v]].concat();
                    rest.starts_with(&line) && matches!(&rest[line.len()..], [b'\n', ..] | [b'\r', b'\n', ..])
                });
            }
        }
    }
    false
}

/// The path of `to` relative to directory `from` (both absolute), as a
/// backing pointer: `../<parent>/vol.qcow2`. Both are resolved first
/// (symbolic links, `..`) when they exist, so the pointer holds for the
/// files as they are on disk.
pub fn relative_pointer(from: &Path, to: &Path) -> String {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (from, to) = (canonical(from), canonical(to));
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    out.to_string_lossy().into_owned()
}

/// Whether QEMU reads backing file name `name` as a protocol: a `:` comes
/// before any `/` (its `path_has_protocol`), `json:` among them.
pub(crate) fn has_protocol(name: &str) -> bool {
    name.find([':', '/']).is_some_and(|i| name.as_bytes()[i] == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw image answers where its data is the same way for its life,
    /// even once the file system would answer otherwise: a copy plans from
    /// these answers, then copies by them, and the two must agree (a hole
    /// the plan skipped, turned into data by the time the copy got there,
    /// would fail the copy as "the source changed"). Before, only the last
    /// answer was kept, and the file system was asked again.
    #[test]
    fn a_raw_image_keeps_its_answers_of_where_data_is() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("raw");
        let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 32 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 48 << 20).unwrap();
        f.sync_all().unwrap();
        let mut raw = RawImage::open(&p).unwrap();
        let first = raw.next_data(0);
        if first == 0 {
            // A file system that cannot say where data is: nothing to keep.
            return;
        }
        assert_eq!(first, 32 << 20);
        assert_eq!(raw.next_data((32 << 20) + 8192), 48 << 20);
        // Data put where the image answered a hole.
        f.write_all_at(&[3u8; 4096], 16 << 20).unwrap();
        f.sync_all().unwrap();
        assert_eq!(raw.next_data(16 << 20), 32 << 20, "asked again");
        assert_eq!(RawImage::open(&p).unwrap().next_data(16 << 20), 16 << 20, "a new image sees the data");
    }

    /// The formats QEMU's probe finds by content (or a `.dmg` name) beside
    /// those qemu-img makes in the integration tests: a VMDK descriptor
    /// only as `vmdk_probe` takes one, LUKS, bochs, cloop.
    #[test]
    fn other_formats_are_found_as_qemu_probes_them() {
        let raw = Path::new("base.img");
        let found = |head: &[u8]| other_format(head, raw).map(|(f, _)| f);
        assert_eq!(found(b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n"), Some("vmdk"));
        assert_eq!(found(b"# c\r\n   \r\nversion=3\r\n"), Some("vmdk"));
        assert_eq!(found(b"# c\n\nversion=1\n"), None, "an empty line is not skipped");
        assert_eq!(found(b"# c\nversion=4\n"), None);
        assert_eq!(found(b"# c\n x\nversion=1\n"), None);
        assert_eq!(found(b"version=1"), None);
        assert_eq!(found(b"LUKS\xba\xbe\x00\x01"), Some("luks"));
        assert_eq!(found(b"Bochs Virtual HD Image\0"), Some("bochs"));
        assert_eq!(found(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$IMAGE\n"), Some("cloop"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(found(&vdi), Some("vdi"));
        assert_eq!(found(&vdi[..0x43]), None);
        assert_eq!(other_format(b"", Path::new("d/base.dmg")).map(|(f, _)| f), Some("dmg"));
        assert_eq!(found(b"QFI\xfb\0\0\0\x03"), None, "qcow2 is not another format");
        assert_eq!(found(&[0u8; 2048]), None);
    }

    #[test]
    fn relative_pointers() {
        assert_eq!(relative_pointer(Path::new("/s/b2"), Path::new("/s/b1/v.qcow2")), "../b1/v.qcow2");
        assert_eq!(relative_pointer(Path::new("/s"), Path::new("/s/v.qcow2")), "v.qcow2");
        assert_eq!(relative_pointer(Path::new("/a/b/c"), Path::new("/x/v")), "../../../x/v");
    }
}
