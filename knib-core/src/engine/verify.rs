//! Checking backup files against their recorded hashes as they are read.
//!
//! The recorded hash of a backup file is xxh3-128 over every byte of that
//! file alone (the per-file hash of [`crate::hash::hash_chain`],
//! the catalog's `VolumeEntry::hash`, the `files[].hash` of
//! `agent.take_hash`), not the chain hash CloudStack stores.
//!
//! A restore or a compression on the native data path hashes each file it
//! reads from the bytes the copy reads ([`crate::qcow2::SourceHash`]) and
//! checks them with [`check_source_hashes`] before its output is published.
//! The qemu-img data path cannot see the bytes `qemu-img` reads: it hashes
//! the files in a separate read first ([`verify_files`]), then copies.
//! When the copy itself fails (a damaged table, a file cut short), the files
//! are hashed in a separate read so that the error names the damaged file
//! ([`explain_failure`]).

use crate::fsio::same_file;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, KnibError, Result};
use crate::progress::Control;
use crate::qcow2::SourceHash;

/// The hash a file must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectedHash {
    /// The file.
    pub path: PathBuf,
    /// Its xxh3-128, 32 hex digits (as `agent.take_hash` gives it per file).
    pub hash: String,
}

/// The "corrupt" error of a file whose hash is not the recorded one.
pub fn mismatch(path: &Path, got: &str, want: &str) -> KnibError {
    KnibError::corrupt(format!(
        "backup file {} is corrupted: its xxh3-128 hash is {got}, the recorded hash is {want}",
        path.display()
    ))
}

/// Check the hashes a copy took of its sources against `expected`: every
/// expected file must be one of the copy's sources (a source whose backing
/// pointers lead elsewhere is refused as corrupt) with the recorded hash.
pub fn check_source_hashes(got: &[SourceHash], expected: &[ExpectedHash]) -> Result<()> {
    for e in expected {
        let Some(g) = got.iter().find(|g| same_file(&g.path, &e.path)) else {
            return Err(KnibError::corrupt(format!(
                "backup file {} is not in the chain that was read ({}): a backing pointer does not lead to it",
                e.path.display(),
                got.iter().map(|g| g.path.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        };
        if !g.hash.eq_ignore_ascii_case(&e.hash) {
            return Err(mismatch(&e.path, &g.hash, &e.hash));
        }
    }
    let alone: u64 = got.iter().map(|g| g.hash_only_bytes).sum();
    let twice: u64 = got.iter().map(|g| g.read_twice_bytes).sum();
    log::debug!(
        "{} source files match their recorded hashes ({alone} bytes read for the hashes alone, {twice} read twice)",
        expected.len()
    );
    Ok(())
}

/// Hash each expected file in a read of its own and compare.
pub fn verify_files(expected: &[ExpectedHash], ctl: &Control) -> Result<()> {
    for e in expected {
        let (_, each) = crate::hash::hash_chain(std::slice::from_ref(&e.path), ctl)?;
        let got = each.into_iter().next().unwrap_or_default();
        if !got.eq_ignore_ascii_case(&e.hash) {
            return Err(mismatch(&e.path, &got, &e.hash));
        }
    }
    Ok(())
}

/// Hold the files of `chain` (a backup's chain, as `qemu-img info` opens
/// it) the caller gave hashes for against them, each in a read of its own:
/// every expected file must be in the chain (as [`check_source_hashes`]
/// requires of a copy's sources).
pub fn verify_chain_files(chain: &[PathBuf], expected: &[ExpectedHash], ctl: &Control) -> Result<()> {
    for e in expected {
        if !chain.iter().any(|f| same_file(f, &e.path)) {
            return Err(KnibError::corrupt(format!(
                "backup file {} is not in the chain ({}): a backing pointer does not lead to it",
                e.path.display(),
                chain.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    verify_files(expected, ctl)
}

/// A copy of hash-checked files failed with `err`: when a file does not
/// match its hash, that is the error (with the copy's error as detail);
/// otherwise `err` itself. Cancellations, timeouts and a full disk are
/// returned as they are, without reading anything.
pub fn explain_failure(err: KnibError, expected: &[ExpectedHash], ctl: &Control) -> KnibError {
    if expected.is_empty() || matches!(err.kind, ErrorKind::Cancelled | ErrorKind::Timeout | ErrorKind::NoSpace) {
        return err;
    }
    match verify_files(expected, ctl) {
        Err(e) if e.kind == ErrorKind::Corrupt => {
            KnibError::corrupt(format!("{} (the copy failed: {})", e.message, err.message))
        }
        _ => err,
    }
}
