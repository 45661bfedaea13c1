//! Merging a qcow2 image into its qcow2 backing file in place, then
//! emptying it: what `qemu-img commit` does, natively, for knib's layout of
//! a stopped disk (`B <- P`: the base `B` holds everything up to the last
//! backup, `P` the writes since).
//!
//! [`Commit::prepare`] opens both files and decides, before anything is
//! written, whether the native merge handles them; when it does not, it
//! says why and the caller uses `qemu-img commit`. It handles a base that
//! is qcow2 version 3 with 16-bit refcounts, no internal snapshots, no
//! bitmaps (no auto-clear bit), the same cluster size and virtual size as
//! the top, and a refcount table with room for every cluster the merge can
//! add; and a top that is version 3 without internal snapshots, bitmaps,
//! auto-clear bits or compatible features other than lazy refcounts (what
//! [`empty_image`] would drop: `qemu-img commit` keeps them). Both files
//! are locked the way a QEMU writer locks images (OFD locks on bytes 100,
//! 101 and 201), so a QEMU process that writes either (a running VM) makes
//! the merge fail as busy, and none can open them for writing during it;
//! readers that share writing (`qemu-img info -U`) can. Each file is
//! locked before its tables are read, and the file read is the file
//! locked (same device and inode).
//!
//! # What is checked before the first write
//!
//! The checks QEMU makes when it opens an image for writing and on every
//! allocation, all made before anything is written; a failure is a
//! [`ErrorKind::Corrupt`] error naming the image and the problem, and
//! neither file is changed:
//!
//! - the headers, as QEMU checks them on open ([`super::Header::parse`]:
//!   table offsets aligned and inside the file, L1 and refcount table sizes
//!   within QEMU's limits, the snapshot table's count, alignment and place,
//!   header extension lengths, the bitmaps extension);
//! - neither file is marked dirty (stale lazy refcounts: the caller has
//!   them rebuilt by `qemu-img check -r all` first, as the engine's native
//!   merge does) nor marked corrupt by QEMU;
//! - one pass over the base's metadata ([`super::guard`]): no table or
//!   block (header, L1, L2, refcount table and blocks, bitmap directory
//!   and tables) shares a host cluster with another or with guest data
//!   (QEMU's metadata overlap checks), no two L2 entries share an
//!   uncompressed host cluster, nothing points past the end of the file
//!   (compressed data included: its sector count may not run past it),
//!   no stored refcount is below the references to its cluster (stale
//!   refcounts with the dirty bit clear), and every copied flag the merge
//!   relies on (of L1 entries and uncompressed L2 entries) matches its
//!   cluster's refcount being 1, while no compressed entry has one (QEMU's
//!   `OFLAG_COPIED` errors);
//! - every entry of the top reads, and every compressed cluster of the top
//!   decompresses (so a top that cannot be read fails before the base is
//!   written, not part-way through the merge);
//! - no refcount counts a cluster past the end of the base's file, and no
//!   cluster the merge may add lies past the 56 bits of offset an L2 entry
//!   holds (such a base goes to `qemu-img commit`, which allocates from the
//!   first free cluster).
//!
//! So every cluster the merge writes is safe to write: data in place only
//! over a cluster one L2 entry alone references, existing L2 tables and
//! refcount blocks where the tables say, new clusters from past every
//! cluster that is referenced or counted and past the end of the file. The
//! writes check the scan's map again (a data cluster in place is not
//! metadata, an L2 table rewritten is the one the L1 entry named, a new
//! cluster holds nothing).
//!
//! # What is written to the base
//!
//! For every cluster the top holds (data, compressed or zero):
//!
//! - data over a base cluster that has its own host cluster (refcount 1,
//!   the copied flag; a preallocated zero cluster too): written in place;
//! - data over anything else (unallocated, zero, compressed, shared):
//!   written to a new cluster at the end of the file;
//! - zero: the zero flag, keeping the base's host cluster when it owns one
//!   (as QEMU keeps preallocated zero clusters);
//! - a compressed or shared base cluster that is replaced loses one
//!   reference on each host cluster its data touches.
//!
//! New clusters (data, L2 tables, refcount blocks) are allocated at the end
//! of the file, never in freed space; a refcount block is placed at the
//! first cluster of the range it covers, so it counts itself.
//!
//! # Order of writes (crash safety)
//!
//! Work goes in batches of at most [`BATCH_TABLE_BYTES`] of L2 tables. For
//! each batch:
//!
//! 1. data clusters, new L2 tables, the increased refcounts (and the
//!    decreases of the previous batch); fdatasync;
//! 2. refcount table entries of new refcount blocks, if any; fdatasync;
//! 3. the changed entries of existing L2 tables and of the L1 table;
//!    fdatasync.
//!
//! The last batch's decreases are written and synced at the end. So after a
//! crash at any point no table points to a cluster whose refcount is not
//! durable: the base may leak clusters (which `qemu-img check -r leaks`
//! reclaims) but is never corrupt. The top is untouched until the base is
//! durable, and reads through the top are the same at every point: the top
//! overrides whatever part of its writes the base already holds.
//!
//! [`empty_image`] then replaces the top with an empty image of the same
//! shape (same backing pointer, cluster size, compression type, lazy
//! refcounts bit, owner and mode), written under a temporary name, fsynced
//! and renamed over it; it refuses a top with snapshots, bitmaps or other
//! features it would drop.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chain::{Chain, Layer};
use super::commit_base::{l2_ranges, Base, BaseEntry, CommitReport, TableEdit, MAX_HOST_END};
use super::empty::{empty_image, keeps_what_emptying_drops};
use super::image::{ClusterState, Qcow2Image, COPIED, L2_ZERO as ZERO};
use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;

/// The L2 tables one batch holds in memory at most (32 tables of 64 KiB,
/// covering 16 GiB of guest disk: a merge of scattered writes into a large
/// base takes more batches, not more memory).
pub const BATCH_TABLE_BYTES: usize = 2 << 20;
/// The largest refcount table the merge keeps in memory.
const MAX_REFCOUNT_TABLE_BYTES: u64 = 32 << 20;

/// A merge of a top image into its base, checked and ready to run.
pub struct Commit {
    top: Qcow2Image,
    top_path: PathBuf,
    base: Base,
    /// The top, open with QEMU's locks held until the merge is done.
    _top_lock: File,
    batch_bytes: usize,
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit").field("top", &self.top_path).field("base", &self.base.path).finish_non_exhaustive()
    }
}

/// Lock `file` (at `path`) as a QEMU writer does ([`crate::lock::lock_like_qemu_writer`]),
/// or fail as busy when another process writes it or does not let others
/// write (a running QEMU, `qemu-img commit`, ...). The locks are held as
/// long as `file` stays open.
fn lock_like_qemu(file: &File, path: &Path) -> Result<()> {
    match crate::lock::lock_like_qemu_writer(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(KnibError::new(
            ErrorKind::Busy,
            format!("{} is in use by another process (a running QEMU?): it cannot be merged now", path.display()),
        )),
        Err(e) => Err(KnibError::io("cannot lock", path, e)),
    }
}

/// The error for an image marked dirty: its refcounts are stale, so
/// nothing may be allocated in it until they are rebuilt
/// (the engine's native merge has `qemu-img check -r all` do it first).
fn dirty(path: &Path) -> KnibError {
    KnibError::corrupt(format!(
        "qcow2 image {} is marked dirty (not closed cleanly): its refcounts are stale; rebuild them \
         (qemu-img check -r all) before merging",
        path.display()
    ))
}

/// Check that `read` (the file an image was read from) is `locked` (the
/// file the lock is held on): a path replaced between the two opens is
/// an error ([`ErrorKind::Busy`]).
fn same_file_as(locked: &std::fs::File, read: Option<&std::fs::File>, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id =
        |f: &std::fs::File| f.metadata().map(|m| (m.dev(), m.ino())).map_err(|e| KnibError::io("cannot stat", path, e));
    let same = match read {
        Some(r) => id(locked)? == id(r)?,
        None => false,
    };
    if !same {
        return Err(KnibError::busy(format!(
            "{} was replaced while it was opened for a merge; nothing was written",
            path.display()
        )));
    }
    Ok(())
}

/// The error for an image QEMU marked corrupt (it opens it read-only).
fn marked_corrupt(path: &Path) -> KnibError {
    KnibError::corrupt(format!(
        "qcow2 image {} is marked corrupt by QEMU: it is not merged (qemu-img check -r all repairs it)",
        path.display()
    ))
}

impl Commit {
    /// Open `top` and its backing file and check that the native merge
    /// handles them. `Ok(Err(reason))` when it does not (nothing was
    /// written; `qemu-img commit` can do it). Errors: the files cannot be
    /// opened or read, are corrupt, or are in use ([`ErrorKind::Busy`]).
    pub fn prepare(top: &Path) -> Result<std::result::Result<Commit, String>> {
        // Locked before anything is read: a writer that finished between a
        // read of the top's tables and the lock would have written clusters
        // the merge does not see, and the emptied top would drop them.
        crate::crashpoint::pause_point(&format!("locking {} for a merge", top.display()));
        let top_file =
            OpenOptions::new().read(true).write(true).open(top).map_err(|e| KnibError::io("cannot open", top, e))?;
        lock_like_qemu(&top_file, top)?;
        let chain = Chain::open(top)?;
        let (top_img, layers) = chain.into_parts();
        let base_path = match layers.first() {
            None => return Err(KnibError::invalid(format!("{} has no backing file to merge into", top.display()))),
            Some(Layer::Raw(_)) => return Ok(Err("its backing file is raw".into())),
            Some(Layer::Qcow2(b)) => match b.path() {
                Some(p) => p.to_path_buf(),
                None => return Err(KnibError::internal("backing image without a path")),
            },
        };
        drop(layers);
        let th = top_img.header();
        if th.version < 3 {
            return Ok(Err(format!("{} is qcow2 version 2", top.display())));
        }
        if th.is_dirty() {
            return Err(dirty(top));
        }
        if th.is_marked_corrupt() {
            return Err(marked_corrupt(top));
        }
        if let Some(why) = keeps_what_emptying_drops(th) {
            return Ok(Err(format!("{} {why}", top.display())));
        }
        same_file_as(&top_file, top_img.file(), top)?;
        let base_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base_path)
            .map_err(|e| KnibError::io("cannot open", &base_path, e))?;
        lock_like_qemu(&base_file, &base_path)?;
        // Read the base again under the lock.
        let base_img = Qcow2Image::open(&base_path)?;
        same_file_as(&base_file, base_img.file(), &base_path)?;
        let bh = base_img.header().clone();
        if bh.is_dirty() {
            return Err(dirty(&base_path));
        }
        if bh.is_marked_corrupt() {
            return Err(marked_corrupt(&base_path));
        }
        let why = if bh.version < 3 {
            Some("is qcow2 version 2")
        } else if bh.refcount_order != 4 {
            Some("does not use 16-bit refcounts")
        } else if bh.nb_snapshots != 0 {
            Some("has internal snapshots")
        } else if bh.autoclear_features != 0 {
            Some("has bitmaps or other auto-clear features")
        } else if bh.cluster_bits != th.cluster_bits {
            Some("has another cluster size than the image merged into it")
        } else if bh.size != th.size {
            Some("has another virtual size than the image merged into it")
        } else if u64::from(bh.refcount_table_clusters) << bh.cluster_bits > MAX_REFCOUNT_TABLE_BYTES {
            Some("has a refcount table over 32 MiB")
        } else {
            None
        };
        if let Some(w) = why {
            return Ok(Err(format!("{} {w}", base_path.display())));
        }
        // Every cluster the merge may write into is checked against the
        // base's metadata and references, in one pass before any write.
        let file_len = super::image::file_size(&base_file).map_err(|e| KnibError::io("cannot size", &base_path, e))?;
        let scan = match super::guard::scan(&base_file, &base_path, &bh, file_len)? {
            Ok(scan) => scan,
            Err(why) => return Ok(Err(why)),
        };
        let base = Base::open(base_file, base_path, &base_img, file_len, scan)?;
        drop(base_img);
        // Room in the refcount table for the worst case: every top cluster
        // and L2 table needing a new cluster, and the blocks counting them.
        let mut top_img = top_img;
        let worst = worst_case_new_clusters(&mut top_img)?;
        // New clusters are taken from the scan's end up. A refcount for a
        // cluster past the end of the file (a crash between QEMU's refcount
        // update and its write, or a crafted file) would put them far past
        // it (a huge sparse file), or past what an L2 entry's 56 bits of
        // offset hold (QEMU would then read another cluster for them): such
        // a base goes to qemu-img, which allocates from the first free
        // cluster.
        let file_clusters = file_len.div_ceil(base.cs);
        if base.next_free > file_clusters {
            return Ok(Err(format!(
                "{} counts host cluster {} past its end ({file_clusters} clusters)",
                base.path.display(),
                base.next_free - 1
            )));
        }
        // Each new refcount block counts itself and at most per_block - 1
        // other new clusters.
        let last = base.next_free + worst + worst.div_ceil(base.per_block - 1) + 2;
        if last.checked_mul(base.cs).is_none_or(|end| end > MAX_HOST_END) {
            return Ok(Err(format!(
                "{}: the clusters the merge may add would lie past the offsets a qcow2 L2 entry holds",
                base.path.display()
            )));
        }
        if last / base.per_block >= base.rt.len() as u64 {
            return Ok(Err(format!(
                "{}: its refcount table is too small for the clusters the merge may add",
                base.path.display()
            )));
        }
        Ok(Ok(Commit {
            top: top_img,
            top_path: top.to_path_buf(),
            base,
            _top_lock: top_file,
            batch_bytes: BATCH_TABLE_BYTES,
        }))
    }

    /// The base file the top is merged into.
    pub fn base_path(&self) -> &Path {
        &self.base.path
    }

    /// How many host clusters of the base were leaked (counted but not
    /// referenced) when [`Commit::prepare`] scanned it. The merge allocates
    /// past them, so they are safe, but they stay wasted space that
    /// `qemu-img check` reports (a merge killed halfway leaves some).
    pub fn base_leaks(&self) -> u64 {
        self.base.scan.leaks
    }

    /// Make batches of at most `bytes` of L2 tables (at least one table):
    /// smaller batches sync more often. For tests of stops between batches.
    pub fn with_batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = bytes;
        self
    }

    /// Once [`Commit::run`] succeeded: replace the top with an empty image
    /// of the same shape ([`empty_image`]), the locks still held.
    pub fn empty_top(&self) -> Result<()> {
        empty_image(&self.top_path, self.top.header())
    }

    /// Merge the top's clusters into the base (see the module
    /// documentation). The top is not changed. `ctl` is checked between
    /// batches, where stopping leaves the base consistent.
    pub fn run(&mut self, ctl: &Control) -> Result<CommitReport> {
        let step = format!("merge of {} into {}", self.top_path.display(), self.base.path.display());
        crate::crashpoint::pause_point(&format!("{step}: writing"));
        let l2n = self.top.header().l2_entries();
        let total = self.top.guest_clusters();
        let cs = self.base.cs;
        let top_fd = match self.top.file() {
            Some(f) => f.as_raw_fd(),
            None => return Err(KnibError::internal("top image without a file")),
        };
        let mut report = CommitReport::default();
        let mut batch: Vec<TableEdit> = Vec::new();
        let mut run = CopyRun::default();
        for r in 0..l2_ranges(&self.top) {
            if self.top.l2_table_offset(r)? == 0 {
                continue;
            }
            let first = r as u64 * l2n;
            let end = (first + l2n).min(total);
            let mut table: Option<TableEdit> = None;
            // The entries that are not 0 (each of them: no step per entry
            // of 0, which a crafted table may hold by the million).
            let mut next = first;
            loop {
                let i = self.top.next_mapped_cluster_before(next, end)?;
                if i >= end {
                    break;
                }
                next = i + 1;
                let st = self.top.cluster_state(i)?;
                if st == ClusterState::Unallocated {
                    continue;
                }
                if table.is_none() {
                    table = Some(self.base.load_table(r, &mut report)?);
                }
                let Some(t) = table.as_mut() else { continue };
                let j = (i - first) as usize;
                let old = self.base.classify(i, t.entries[j])?;
                if st == ClusterState::Zero {
                    report.zero_clusters += 1;
                    t.entries[j] = match old {
                        BaseEntry::Owned(off) => off | COPIED | ZERO,
                        BaseEntry::Empty => ZERO,
                        BaseEntry::Release { offset, len } => {
                            self.base.freed.push((offset, len));
                            ZERO
                        }
                    };
                    continue;
                }
                let dest = match old {
                    BaseEntry::Owned(off) => {
                        report.in_place_clusters += 1;
                        off
                    }
                    BaseEntry::Empty => self.base.alloc(&mut report)?,
                    BaseEntry::Release { offset, len } => {
                        self.base.freed.push((offset, len));
                        self.base.alloc(&mut report)?
                    }
                };
                t.entries[j] = dest | COPIED;
                report.data_clusters += 1;
                report.bytes += cs;
                match st {
                    ClusterState::Data { host_offset } if !run.extend(host_offset, dest, cs) => {
                        run.flush(top_fd, &self.base.file, &self.base.path)?;
                        run = CopyRun { src: host_offset, dst: dest, len: cs };
                    }
                    ClusterState::Compressed { host_offset, compressed_len } => {
                        let data = self.top.read_compressed(i, host_offset, compressed_len)?;
                        self.base
                            .file
                            .write_all_at(data, dest)
                            .map_err(|e| KnibError::io("cannot write", &self.base.path, e))?;
                    }
                    _ => {}
                }
            }
            if let Some(t) = table {
                batch.push(t);
            }
            if batch.len() * cs as usize >= self.batch_bytes {
                run.flush(top_fd, &self.base.file, &self.base.path)?;
                run = CopyRun::default();
                self.base.flush(&mut batch, &mut report)?;
                if let Err(e) = ctl.check(&step) {
                    self.base.release_freed(&mut report)?;
                    return Err(e);
                }
            }
        }
        run.flush(top_fd, &self.base.file, &self.base.path)?;
        if !batch.is_empty() {
            self.base.flush(&mut batch, &mut report)?;
        }
        self.base.release_freed(&mut report)?;
        Ok(report)
    }
}

/// A run of clusters copied from the top file to the base file.
#[derive(Debug, Default)]
struct CopyRun {
    src: u64,
    dst: u64,
    len: u64,
}

impl CopyRun {
    fn extend(&mut self, src: u64, dst: u64, len: u64) -> bool {
        if self.len > 0 && src == self.src + self.len && dst == self.dst + self.len {
            self.len += len;
            return true;
        }
        false
    }

    /// Copy the run in the kernel (`copy_file_range`), or through a buffer
    /// where the file systems cannot. A source that ends early gives zeros.
    fn flush(&self, src_fd: i32, dst: &File, dst_path: &Path) -> Result<()> {
        let (mut done, mut kernel) = (0u64, true);
        let mut buf = Vec::new();
        while done < self.len {
            let left = self.len - done;
            if kernel {
                let mut off_in = (self.src + done) as libc::loff_t;
                let mut off_out = (self.dst + done) as libc::loff_t;
                // SAFETY: both descriptors are open; the offsets are ours.
                let n = unsafe {
                    libc::copy_file_range(src_fd, &mut off_in, dst.as_raw_fd(), &mut off_out, left as usize, 0)
                };
                if n > 0 {
                    done += n as u64;
                    continue;
                }
                if n == 0 {
                    break; // the source ends: the rest reads as zeros
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOSYS) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        kernel = false;
                        continue;
                    }
                    _ => return Err(KnibError::io("cannot copy into", dst_path, e)),
                }
            }
            buf.resize(left.min(1 << 20) as usize, 0);
            // SAFETY: reading into our own buffer from an open descriptor.
            let n =
                unsafe { libc::pread(src_fd, buf.as_mut_ptr().cast(), buf.len(), (self.src + done) as libc::off_t) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(KnibError::io("cannot read the image merged into", dst_path, e));
            }
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n as usize], self.dst + done)
                .map_err(|e| KnibError::io("cannot write", dst_path, e))?;
            done += n as u64;
        }
        if done < self.len {
            let zeros = vec![0u8; (self.len - done).min(1 << 20) as usize];
            while done < self.len {
                let k = (self.len - done).min(zeros.len() as u64) as usize;
                dst.write_all_at(&zeros[..k], self.dst + done)
                    .map_err(|e| KnibError::io("cannot write", dst_path, e))?;
                done += k as u64;
            }
        }
        // Start writing the run back now, in the background: the batch's
        // fdatasync then waits for the tail of the writes, not for all of
        // them (a hint: its failure changes nothing, the fdatasync reports
        // any write error).
        // SAFETY: an open descriptor; a range of it, no memory passed.
        unsafe {
            libc::sync_file_range(
                dst.as_raw_fd(),
                self.dst as libc::off64_t,
                self.len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        Ok(())
    }
}

/// At most how many host clusters merging `top` adds to its base: one per
/// data or compressed cluster and one per L2 table. Every entry of the top
/// is read and every compressed cluster decompressed on the way, so a top
/// whose data cannot be read (compressed data garbled, or a descriptor
/// pointing at its own tables) fails here, before the base is written,
/// rather than part-way through the merge. An L2 table counts, its
/// entries of 0 are not walked ([`Qcow2Image::next_mapped_cluster`]). (No
/// [`Control`] to check here: [`Commit::prepare`] takes none.)
fn worst_case_new_clusters(top: &mut Qcow2Image) -> Result<u64> {
    let l2n = top.header().l2_entries();
    let total = top.guest_clusters();
    let mut n = 0;
    for r in 0..l2_ranges(top) {
        if top.l2_table_offset(r)? == 0 {
            continue;
        }
        n += 1;
        let first = r as u64 * l2n;
        let end = (first + l2n).min(total);
        let mut i = top.next_mapped_cluster_before(first, end)?;
        while i < end {
            match top.cluster_state(i)? {
                ClusterState::Data { .. } => n += 1,
                ClusterState::Compressed { host_offset, compressed_len } => {
                    top.read_compressed(i, host_offset, compressed_len)?;
                    n += 1;
                }
                _ => {}
            }
            i = top.next_mapped_cluster_before(i + 1, end)?;
        }
    }
    Ok(n)
}
