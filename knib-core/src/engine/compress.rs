//! Compressing backups on the store, in two steps as CloudStack does:
//! [`compress`] writes `<file>.comp` beside each backup file (under a
//! temporary name until it is whole and durable; same backing
//! pointer: a compressed qcow2 stays a valid backing file), then
//! [`finalize`] renames them over the originals, or removes them when the
//! backup was deleted meanwhile.
//!
//! [`compress_verified`] checks each source against its recorded hash while
//! it reads it (native data path; the qemu-img data path hashes it in a
//! separate read first, see [`crate::engine::verify`]) and refuses a source
//! that does not match with a `corrupt` error naming it, leaving no `.comp`
//! behind; the output of a verified source gets its own hash
//! ([`CompressedFile::hash`], read back from the finished file). A source
//! without an expected hash cannot be checked here: its output gets no
//! hash either.
//!
//! With [`CompressOptions::check_output`] each copy is also read back
//! before it counts as written. On the native data path its header and
//! its clusters, read through its own tables and decompressed, must be
//! what the copy put into it (the content digest of
//! [`crate::qcow2::ContentDigest`]: the same data at the same index, zeros
//! where there were zeros), taken from the bytes the copy read (checked
//! against the recorded hash as they were read). On the qemu-img one its
//! guest bytes must be the backup file's, through the chain, wherever
//! either file holds a cluster of its own. A copy that differs is an
//! `internal` error naming it (the copy is faulty, not the backup): it is
//! removed and the backup is kept. The output's hash alone cannot show
//! this: it is taken from the bytes written, whatever they hold.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::native::{self, DataPath, NativeCopy};
use crate::engine::verify::{self, ExpectedHash};
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qcow2::{Qcow2Image, SourceMode, TargetFormat};
use crate::qemu_img::{CompressionLibrary, Convert, QemuImg};

/// The highest compression rate limit, in MB/s (1 TB/s): qemu-img's
/// `-r` takes bytes per second in an i64, which a larger limit overflows
/// (qemu-img then refuses every compression).
pub const MAX_RATE_LIMIT_MBPS: u64 = 1_000_000;

/// How to compress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressOptions {
    /// zstd (default) or zlib; zlib is used for qcow2 v2 images whatever is
    /// asked, as v2 has no other.
    pub library: CompressionLibrary,
    /// Parallel coroutines of qemu-img (`-m`), 1 to 16; on the native data
    /// path, the number of compression threads (at most one per core).
    pub coroutines: u32,
    /// Rate limit in MB/s; 0 = none. Needs QEMU 5.2 or later.
    pub rate_limit_mbps: u64,
    /// Refuse unless the store has this many times the file's size free.
    pub min_free_factor: f64,
    /// Native data path (default) or qemu-img.
    #[serde(default)]
    pub data_path: DataPath,
    /// Read each compressed copy back before it counts as written, and
    /// compare its data (decompressed) with the backup file's; a copy that
    /// differs is an `internal` error naming it, and the backup is kept as
    /// it was (see the module docs). Off by default: on an image of
    /// real files it took about 1.5x the CPU and 1.6x to 2x the time of
    /// the compression alone (docs/performance.md); a store turns it on
    /// with `compression.check_output`.
    #[serde(default)]
    pub check_output: bool,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            library: CompressionLibrary::Zstd,
            coroutines: 1,
            rate_limit_mbps: 0,
            min_free_factor: 1.0,
            data_path: DataPath::Native,
            check_output: false,
        }
    }
}

/// One compressed file, not yet finalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressedFile {
    /// The backup file.
    pub path: PathBuf,
    /// Its compressed copy (`<path>.comp`).
    pub comp_path: PathBuf,
    /// Size before, in bytes.
    pub original_size: u64,
    /// Size after, in bytes.
    pub compressed_size: u64,
    /// The library used.
    pub library: CompressionLibrary,
    /// xxh3-128 of the compressed file, when its source was checked
    /// against an expected hash ([`compress_verified`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// `<file>.comp`.
pub fn comp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".comp");
    PathBuf::from(s)
}

/// Compress each file to `<file>.comp`. On failure every `.comp` written is
/// removed and the originals are untouched. No hash is checked (see
/// [`compress_verified`]).
pub fn compress(q: &QemuImg, files: &[PathBuf], opts: &CompressOptions, ctl: &Control) -> Result<Vec<CompressedFile>> {
    compress_verified(q, files, &vec![None; files.len()], opts, ctl)
}

/// [`compress`], checking file `files[i]` against `expected[i]` (its own
/// xxh3-128, as recorded) when there is one, as it is read: a mismatch is a
/// `corrupt` error naming the file, every `.comp` is removed and the
/// originals are untouched. The output of a checked file gets its hash.
pub fn compress_verified(
    q: &QemuImg,
    files: &[PathBuf],
    expected: &[Option<String>],
    opts: &CompressOptions,
    ctl: &Control,
) -> Result<Vec<CompressedFile>> {
    if expected.len() != files.len() {
        return Err(KnibError::invalid(format!(
            "{} expected hashes are given for {} files",
            expected.len(),
            files.len()
        )));
    }
    if !(1..=16).contains(&opts.coroutines) {
        return Err(KnibError::invalid(format!("coroutines must be 1 to 16, not {}", opts.coroutines)));
    }
    if opts.rate_limit_mbps > MAX_RATE_LIMIT_MBPS {
        return Err(KnibError::invalid(format!(
            "rate_limit_mbps must be at most {MAX_RATE_LIMIT_MBPS} (0: no limit), not {}",
            opts.rate_limit_mbps
        )));
    }
    if opts.rate_limit_mbps > 0 && opts.data_path == DataPath::QemuImg {
        let (major, minor) = q.version(ctl)?;
        if (major, minor) < (5, 2) {
            return Err(KnibError::invalid(format!(
                "a rate limit needs qemu-img 5.2 or later; this is {major}.{minor}"
            )));
        }
    }
    let mut done: Vec<CompressedFile> = Vec::new();
    // The temporaries claimed, one per entry of `done`, held to the end:
    // until then no other compression of these files starts, and a failure
    // removes only what is still this compression's own.
    let mut claims: Vec<std::fs::File> = Vec::new();
    let r = (|| -> Result<()> {
        for (f, want) in files.iter().zip(expected) {
            let want: Vec<ExpectedHash> =
                want.iter().map(|h| ExpectedHash { path: f.clone(), hash: h.clone() }).collect();
            let size = fsio::file_size(f)?;
            let dir = fsio::parent_dir(f);
            let needed = (size as f64 * opts.min_free_factor.max(0.0)).ceil() as u64;
            fsio::require_space(dir, needed, &format!("compression of {}", f.display()))?;
            let out = comp_path(f);
            // Written under a temporary name, renamed to `out` once whole
            // and durable: a `.comp` file is always a finished one, which
            // [`finalize`] may rename over the backup (a compression killed
            // midway leaves only the temporary, removed by the next).
            let tmp = fsio::temp_path(&out);
            // No merge writes `f` while it is read.
            let _reading =
                crate::lock::hold_for_reading(&[f.as_path()], &format!("the compression of {}", f.display()))?;
            // A compressed copy holds the image's current data only: the
            // internal snapshots of a file would be dropped with it.
            let head = crate::qcow2::header_of_regular_file(f, false);
            if let Some(h) = head.as_ref().filter(|h| h.nb_snapshots > 0) {
                return Err(KnibError::invalid(format!(
                    "backup file {} holds {} internal snapshot(s) (`qemu-img snapshot -l` lists them): its compressed copy would drop them; it is not compressed",
                    f.display(),
                    h.nb_snapshots
                )));
            }
            if let Some(h) = &head {
                require_qcow2_backing(f, h)?;
            }
            // The native path takes qcow2 v3 files; v2 ones stay v2 (zlib)
            // through qemu-img.
            let native_header = match opts.data_path {
                DataPath::Native => {
                    let mut img = Qcow2Image::open(f).map_err(|e| verify::explain_failure(e, &want, ctl))?;
                    refuse_damaged(&mut img, f, ctl)?;
                    Some(img.header().clone()).filter(|h| h.version >= 3)
                }
                DataPath::QemuImg => None,
            };
            let info = if native_header.is_none() {
                Some(q.info(f, ctl).map_err(|e| verify::explain_failure(e, &want, ctl))?)
            } else {
                None
            };
            let v2 = info.as_ref().is_some_and(|i| i.is_qcow2_v2());
            let library = if v2 { CompressionLibrary::Zlib } else { opts.library };
            // One compression of `f` at a time: the temporary is locked
            // while it is written (a retried command ran a second beside
            // the first, which removed the first's temporary and had it
            // rename half of its own). Removed with the `.comp` on a failure
            // from here on.
            claims.push(claim_temp(&tmp, f)?);
            let claim = claims.last().expect("pushed above");
            done.push(CompressedFile {
                path: f.clone(),
                comp_path: out.clone(),
                original_size: size,
                compressed_size: 0,
                library,
                hash: None,
            });
            fsio::remove_if_exists(&out)?;
            let (compressed_size, hash) = match (native_header, info) {
                (Some(header), _) => {
                    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                    let threads = (opts.coroutines as usize).clamp(1, cores);
                    log::info!(
                        "compressing {} ({}) with {threads} compression thread{} ({} asked, {cores} cores)",
                        f.display(),
                        library.as_str(),
                        if threads == 1 { "" } else { "s" },
                        opts.coroutines
                    );
                    let what = format!("compression of {}", f.display());
                    let c = NativeCopy {
                        source: f,
                        dest: &tmp,
                        dest_file: claim,
                        mode: SourceMode::Top,
                        format: TargetFormat::Qcow2,
                        backing: header.backing_file.clone(),
                        compress: Some(library),
                        hash: !want.is_empty(),
                        check: opts.check_output,
                        threads,
                        rate_limit_mbps: opts.rate_limit_mbps,
                        what: &what,
                    };
                    if want.is_empty() {
                        (native::copy(&c, ctl)?.file_len, None)
                    } else {
                        let r = native::copy_hashing_sources(&c, ctl)
                            .and_then(|r| verify::check_source_hashes(&r.source_hashes, &want).map(|_| r))
                            .map_err(|e| verify::explain_failure(e, &want, ctl))?;
                        (r.file_len, r.hash)
                    }
                }
                (None, info) => {
                    log::info!(
                        "compressing {} ({}) with qemu-img convert -m {}",
                        f.display(),
                        library.as_str(),
                        opts.coroutines
                    );
                    // qemu-img reads the file itself: its hash takes a read of its own.
                    verify::verify_files(&want, ctl)?;
                    // qemu-img writes the claimed file, never its name: a
                    // link swapped in at the name meanwhile (the hash above
                    // takes long) would have it truncate and write whatever
                    // the link leads to.
                    crate::crashpoint::pause_point(&format!("qemu-img compression of {}", f.display()));
                    q.convert_into(
                        &Convert {
                            source: f.clone(),
                            backing: info.and_then(|i| i.backing_filename),
                            compress: Some(library),
                            compat_v2: v2,
                            coroutines: Some(opts.coroutines),
                            rate_limit_mbps: Some(opts.rate_limit_mbps),
                            ..Default::default()
                        },
                        claim,
                        &tmp,
                        ctl,
                    )?;
                    claim.sync_all().map_err(|e| KnibError::io("cannot sync", &tmp, e))?;
                    crate::crashpoint::pause_point(&format!("qemu-img wrote {}", tmp.display()));
                    if opts.check_output {
                        // The backup file's data through its chain, against
                        // the copy qemu-img wrote, wherever either holds a
                        // cluster of its own.
                        let source = crate::qcow2::Chain::open(f)?;
                        crate::qcow2::check_guest_copy(source, claim, &tmp, crate::qcow2::Copied::Top, ctl)?;
                    }
                    let hash =
                        if want.is_empty() { None } else { Some(crate::hash::hash_written_file(claim, &tmp, ctl)?) };
                    let len = claim.metadata().map_err(|e| KnibError::io("cannot stat", &tmp, e))?.len();
                    (len, hash)
                }
            };
            // The copy wrote the claimed file through its handle and
            // hashed it through the handle: the name must still lead to
            // it, before the rename and after.
            crate::crashpoint::pause_point(&format!("written {}", tmp.display()));
            fsio::commit_own_temp(&tmp, claim, &out, true)?;
            let last = done.last_mut().expect("pushed above");
            last.compressed_size = compressed_size;
            last.hash = hash;
        }
        Ok(())
    })();
    if let Err(e) = r {
        if let Some(first) = done.first() {
            crate::crashpoint::pause_point(&format!("undoing the compression of {}", first.path.display()));
        }
        for (c, claim) in done.iter().zip(&claims) {
            for p in [c.comp_path.clone(), fsio::temp_path(&c.comp_path)] {
                if own_to_remove(&p, claim) {
                    let _ = fsio::remove_if_exists(&p);
                }
            }
        }
        return Err(e);
    }
    Ok(done)
}

/// Whether a failed compression removes the entry at `p` (its `.comp` or
/// its temporary): the file it claimed, or an entry no compression made (a
/// link or anything but a regular file put there); not a regular file
/// another compression holds (its own temporary, which it is writing).
fn own_to_remove(p: &Path, claim: &std::fs::File) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if fsio::require_same_file(p, claim).is_ok() {
        return true;
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_file() => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(p)
            .and_then(|f| crate::lock::held_by_one_operation(&f))
            .is_ok_and(|held| !held),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Refuse to compress `f` when its refcounts are corrupt (what `qemu-img
/// check` counts as corruptions): its compressed copy would be clean and
/// replace it, and the damage would be hidden (its data may still read;
/// whether to repair it or take a new backup is the operator's call).
/// Leaks pass, and so does an image whose refcounts knib does not check
/// (internal snapshots).
fn refuse_damaged(img: &mut Qcow2Image, f: &Path, ctl: &Control) -> Result<()> {
    match img.check_refcounts(ctl) {
        Ok(c) if c.corruptions > 0 => Err(KnibError::corrupt(format!(
            "backup file {} is damaged: {} corruptions of its metadata ({}): it is not compressed, which would hide them",
            f.display(),
            c.corruptions,
            c.problems.first().cloned().unwrap_or_default()
        ))),
        Err(e) if matches!(e.kind, crate::ErrorKind::Corrupt | crate::ErrorKind::Cancelled | crate::ErrorKind::Timeout) => {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// Refuse to compress `f` (whose header is `h`) when its backing file is
/// not qcow2: a compressed copy records its backing file as qcow2 (both
/// data paths), and a raw one would then be read as what it is not. A
/// backing format that is not recorded is probed as QEMU would: the
/// backing file must open as qcow2.
fn require_qcow2_backing(f: &Path, h: &crate::qcow2::Header) -> Result<()> {
    let Some(name) = &h.backing_file else { return Ok(()) };
    let refuse = |why: String| {
        Err(KnibError::invalid(format!(
            "backup file {} has backing file `{name}` {why}: its compressed copy would record it as qcow2 and read it as what it is not; it is not compressed",
            f.display()
        )))
    };
    match h.backing_format.as_deref() {
        Some("qcow2") => Ok(()),
        Some(other) => refuse(format!("of format {other}")),
        None if crate::qcow2::header_of_regular_file(&fsio::parent_dir(f).join(name), false).is_some() => Ok(()),
        None => refuse("of no recorded format, and it does not open as qcow2".into()),
    }
}

/// Open (or create) the temporary `tmp` a compression of `f` writes, lock
/// it for this compression alone ([`crate::lock::try_lock_operation_byte`]) and
/// empty it; the lock goes with the file returned. Another compression of
/// `f` running (in any process) is busy. A link or anything but a regular
/// file under the name is refused. The name must still lead to the file
/// locked: a compression that just renamed its finished temporary to
/// `.comp` lets it go, and whoever opened the old name before must not
/// empty that `.comp`.
fn claim_temp(tmp: &Path, f: &Path) -> Result<std::fs::File> {
    let Some(file) = crate::lock::create_and_lock_named(tmp)? else {
        return Err(KnibError::busy(format!(
            "a compression of {} is running (it holds {}); try again when it ends",
            f.display(),
            tmp.display()
        )));
    };
    file.set_len(0).map_err(|e| KnibError::io("cannot truncate", tmp, e))?;
    Ok(file)
}

/// Finish a compression: when the backup still exists, each `.comp` is
/// renamed over its original (atomically, made durable); when it was
/// deleted meanwhile, the `.comp` files are removed.
///
/// A finalize interrupted between two files (or answered to a caller that
/// never heard it) can be asked again: a file whose `.comp` is gone while
/// the file is there was finalized before, and is left as it is. Every
/// file is checked before anything is renamed; when no file has a `.comp`
/// there is nothing to finalize (an error naming the first). A `.comp`
/// that is not a whole compression of its file (cut short, damaged, made
/// from another image) is refused, `corrupt` and naming it, before
/// anything is renamed.
pub fn finalize(files: &[PathBuf], backup_exists: bool) -> Result<()> {
    if !backup_exists {
        for f in files {
            fsio::remove_if_exists(&comp_path(f))?;
            fsio::remove_if_exists(&fsio::temp_path(&comp_path(f)))?;
        }
        return Ok(());
    }
    let mut pending = Vec::new();
    for f in files {
        let comp = comp_path(f);
        // The entry itself: a link at the `.comp` name is refused below,
        // never followed (it would be renamed over the backup file).
        match (std::fs::symlink_metadata(&comp).is_ok(), f.exists()) {
            (true, _) => pending.push((comp, f)),
            (false, true) => log::info!("finalize: {} has no {}: finalized before", f.display(), comp.display()),
            (false, false) => {
                return Err(KnibError::not_found(format!(
                    "neither {} nor its compressed file {} exists",
                    f.display(),
                    comp.display()
                )))
            }
        }
    }
    if pending.is_empty() {
        let comp = files.first().map(|f| comp_path(f)).unwrap_or_default();
        return Err(KnibError::not_found(format!("compressed file {} does not exist", comp.display())));
    }
    for (comp, f) in &pending {
        check_compressed(comp, f)?;
    }
    for (comp, f) in pending {
        fsio::commit_rename(&comp, f)?;
    }
    Ok(())
}

/// Refuse a `.comp` file that is not a finished compression of `f` before
/// it can replace `f`: it must be a regular file that opens as qcow2 with
/// no refcount corruption, and have `f`'s virtual size and backing
/// pointer. Its data is not compared (that takes the hashes `agent.compress`
/// answers): what this catches is a file cut short or damaged since, or
/// one that never was `f`'s, which a rename would put in place of the
/// backup.
fn check_compressed(comp: &Path, f: &Path) -> Result<()> {
    let bad = |why: String| {
        KnibError::corrupt(format!(
            "compressed file {} {why}: it does not replace {}, and nothing was finalized",
            comp.display(),
            f.display()
        ))
    };
    // The `.comp` entry, not what a link there leads to: the rename puts
    // the entry in place of the backup file.
    // Another name (a hard link) would lead to the backup file once
    // renamed, and whoever holds it could rewrite the backup.
    match std::fs::symlink_metadata(comp) {
        Ok(m) if m.is_file() || m.file_type().is_symlink() => {
            if let Some(why) = fsio::not_own_file(&m) {
                return Err(bad(format!("{why}, not a file knib wrote")));
            }
        }
        // Anything else: refused as it always was (invalid input).
        _ => fsio::require_file(comp, "compressed file ", false)?,
    }
    fsio::require_file(f, "backup file ", false)?;
    let mut c = Qcow2Image::open(comp).map_err(|e| bad(format!("is not a whole qcow2 image ({})", e.message)))?;
    // A compression writes no internal snapshot (and knib checks no
    // refcounts of an image that has one).
    if c.header().nb_snapshots > 0 {
        return Err(bad(format!("holds {} internal snapshot(s), not a file knib wrote", c.header().nb_snapshots)));
    }
    if let Some(why) = c.refcount_check_refusal() {
        // Too large for the check (over 64M host clusters), as the
        // compression's own check of its source skips it: its header is
        // still checked below. Refused, such a file could never be
        // finalized.
        log::warn!("finalize: {}: its refcounts are not checked ({why})", comp.display());
    } else {
        match c.check_refcounts(&Control::new()) {
            Ok(check) if check.corruptions > 0 => {
                let first = check.problems.first().cloned().unwrap_or_default();
                return Err(bad(format!("is damaged: {} corruptions ({first})", check.corruptions)));
            }
            Ok(_) => {}
            Err(e) => return Err(bad(format!("cannot be checked ({})", e.message))),
        }
    }
    let o = Qcow2Image::open(f).map_err(|e| e.context(format!("backup file {}", f.display())))?;
    let (was, now) = (o.header(), c.header());
    if was.size != now.size {
        return Err(bad(format!("has a virtual size of {} bytes, not {}", now.size, was.size)));
    }
    if was.backing_file != now.backing_file {
        let name = |b: &Option<String>| b.as_deref().map_or("none".to_string(), |b| format!("`{b}`"));
        return Err(bad(format!("has backing file {}, not {}", name(&now.backing_file), name(&was.backing_file))));
    }
    // A compression records a backing file as qcow2; one of no recorded
    // format was probed as qcow2 before it was compressed.
    let format = |h: &crate::qcow2::Header| h.backing_format.clone().unwrap_or_else(|| "qcow2".into());
    if was.backing_file.is_some() && format(was) != format(now) {
        return Err(bad(format!("records its backing file as {}, not {}", format(now), format(was))));
    }
    Ok(())
}
