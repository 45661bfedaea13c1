//! One operation per VM at a time: an exclusive, non-blocking `flock` on
//! `vms/<vm>/.lock`. A second operation fails at once with "busy", naming
//! the operation that holds the lock; the lock goes with the process, so a
//! crash never leaves a VM locked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::error::{KnibError, Result};

/// The lock of one VM; released when dropped.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

impl VmLock {
    /// Take the lock at `path` for `operation` on `vm`, or fail with
    /// [`crate::ErrorKind::Busy`] at once.
    pub fn acquire(path: &Path, vm: &str, operation: &str) -> Result<VmLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| KnibError::io("cannot open lock", path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { "another operation".to_string() } else { holder.to_string() };
                return Err(KnibError::busy(format!("VM {vm} is busy: {who} is running; try again when it ends")));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(KnibError::io("cannot lock", path, e)),
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{operation} (pid {})", std::process::id());
        Ok(VmLock { _file: file })
    }
}
