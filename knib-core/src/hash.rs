//! The hash of a backup: xxh3-128 over the bytes of every file of its chain,
//! root first, as CloudStack stores it after a first successful validation.
//!
//! It reads plain files and knows nothing of their format, so it stands
//! below every module that hashes: the qcow2 copy and source hashes
//! (`qcow2`), the engine and the catalog.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{KnibError, Result};
use crate::progress::Control;

/// xxh3-128 of the files in the order given (root of the chain first), as
/// 32 lower-case hex digits.
///
/// Errors: InvalidInput naming a file that is not a regular file (a FIFO,
/// a device, a directory: none is read, so none can hang or never end).
pub fn hash_files(files: &[PathBuf], ctl: &Control) -> Result<String> {
    Ok(hash_chain(files, ctl)?.0)
}

/// In one read of each file: the hash of the whole chain (as
/// [`hash_files`]) and the hash of each file on its own, in order.
pub fn hash_chain(files: &[PathBuf], ctl: &Control) -> Result<(String, Vec<String>)> {
    hash_chain_with(files, ctl, false)
}

/// [`hash_files`] of one file just written, not to be read again soon,
/// open as `file` (named `name` in errors), read from its start through
/// this handle: the file written, whatever its name leads to meanwhile.
/// Its pages are dropped from the page cache once hashed (those that are
/// clean; best effort).
pub(crate) fn hash_written_file(file: &File, name: &Path, ctl: &Control) -> Result<String> {
    ctl.check(&format!("hash of {}", name.display()))?;
    let mut own = Xxh3::new();
    hash_open(file, name, true, &mut [&mut own], &mut vec![0u8; 1 << 20])?;
    Ok(format!("{:032x}", own.digest128()))
}

/// [`hash_written_file`] drops what it read every this many bytes.
const DROP_EVERY: u64 = 32 << 20;

fn hash_chain_with(files: &[PathBuf], ctl: &Control, drop_cache: bool) -> Result<(String, Vec<String>)> {
    let mut chain = Xxh3::new();
    let mut each = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        ctl.check(&format!("hash of {}", f.display()))?;
        let mut own = Xxh3::new();
        let file = crate::fsio::open_regular(f)?;
        hash_open(&file, f, drop_cache, &mut [&mut chain, &mut own], &mut buf)?;
        each.push(format!("{:032x}", own.digest128()));
    }
    Ok((format!("{:032x}", chain.digest128()), each))
}

/// Feed every byte of `file` (named `name`), from its start, to each of
/// `into`; with `drop_cache`, its pages are dropped as they are hashed.
fn hash_open(file: &File, name: &Path, drop_cache: bool, into: &mut [&mut Xxh3], buf: &mut [u8]) -> Result<()> {
    let (mut at, mut dropped) = (0u64, 0u64);
    loop {
        let n = file.read_at(buf, at).map_err(|e| KnibError::io("cannot read", name, e))?;
        if n == 0 {
            break;
        }
        for h in into.iter_mut() {
            h.update(&buf[..n]);
        }
        at += n as u64;
        if drop_cache && at - dropped >= DROP_EVERY {
            // From the start: a large folio is dropped only by a range
            // that holds it whole (see `qcow2::behind`).
            crate::fsio::drop_cached(file, 0, at);
            dropped = at;
        }
    }
    if drop_cache {
        crate::fsio::drop_cached(file, 0, 0);
    }
    Ok(())
}
