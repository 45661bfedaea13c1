//! The hash of a backup: xxh3-128 over the bytes of every file of its chain,
//! root first, as CloudStack stores it after a first successful validation.
//!
//! It reads plain files and knows nothing of their format, so it stands
//! below every module that hashes: the qcow2 copy and source hashes
//! (`qcow2`), the engine and the catalog.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use xxhash_rust::xxh3::Xxh3;

use crate::error::{KnibError, Result};
use crate::progress::Control;

/// xxh3-128 of the files in the order given (root of the chain first), as
/// 32 lower-case hex digits.
pub fn hash_files(files: &[PathBuf], ctl: &Control) -> Result<String> {
    Ok(hash_chain(files, ctl)?.0)
}

/// In one read of each file: the hash of the whole chain (as
/// [`hash_files`]) and the hash of each file on its own, in order.
pub fn hash_chain(files: &[PathBuf], ctl: &Control) -> Result<(String, Vec<String>)> {
    let mut chain = Xxh3::new();
    let mut each = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        ctl.check(&format!("hash of {}", f.display()))?;
        let mut own = Xxh3::new();
        let mut file = File::open(f).map_err(|e| KnibError::io("cannot open", f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| KnibError::io("cannot read", f, e))?;
            if n == 0 {
                break;
            }
            chain.update(&buf[..n]);
            own.update(&buf[..n]);
        }
        each.push(format!("{:032x}", own.digest128()));
    }
    Ok((format!("{:032x}", chain.digest128()), each))
}
