//! One operation per VM at a time: a non-blocking POSIX write lock
//! (`fcntl(F_SETLK)`) on `vms/<vm>/.lock`, plus a registry inside the
//! process. A second operation fails at once with "busy", naming the
//! operation that holds the lock; the lock goes with the process, so a crash
//! never leaves a VM locked.
//!
//! The kernel lock is [`crate::lock::try_record_lock`] (why a record lock
//! and not an `flock` is said there). Record locks belong to the process:
//! they do not exclude threads of one process from each other, which the
//! registry does, and closing any descriptor of the file drops them, so the
//! lock file is opened and closed only under the registry's mutex.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{KnibError, Result};

/// Locks this process holds: lock file -> the operation holding it. The lock
/// file is opened only while this mutex is held and the path is not in the
/// map, and closed under the mutex: closing any descriptor of a file drops
/// the process's POSIX locks on it, so no other descriptor may come and go
/// while one is held.
static HELD: Mutex<Option<HashMap<PathBuf, String>>> = parking_lot::const_mutex(None);

/// The lock of one VM; released when dropped.
#[derive(Debug)]
pub struct VmLock {
    file: Option<File>,
    key: PathBuf,
}

fn busy(vm: &str, holder: &str) -> KnibError {
    let holder = holder.trim();
    let who = if holder.is_empty() { "another operation" } else { holder };
    KnibError::busy(format!("VM {vm} is busy: {who} is running; try again when it ends"))
}

impl VmLock {
    /// Take the lock at `path` for `operation` on `vm`, or fail with
    /// [`crate::ErrorKind::Busy`] at once.
    pub fn acquire(path: &Path, vm: &str, operation: &str) -> Result<VmLock> {
        let dir = crate::fsio::parent_dir(path);
        let key = dir
            .canonicalize()
            .map_err(|e| KnibError::io("cannot resolve", dir, e))?
            .join(path.file_name().unwrap_or_default());
        let mut held = HELD.lock();
        let map = held.get_or_insert_with(HashMap::new);
        if let Some(holder) = map.get(&key) {
            return Err(busy(vm, holder));
        }
        // No link is followed: the lock file lives in the store, and a link
        // there must not make knib write elsewhere.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&key)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => KnibError::corrupt(format!(
                    "lock file {} is a symbolic link: knib follows no link inside a store",
                    key.display()
                )),
                _ => KnibError::io("cannot open lock", &key, e),
            })?;
        // Nor is a hard link written: its other name may lie outside the
        // store (the lock file is truncated and written below).
        let meta = file.metadata().map_err(|e| KnibError::io("cannot stat lock", &key, e))?;
        if let Some(why) = crate::fsio::not_own_file(&meta) {
            return Err(KnibError::corrupt(format!(
                "lock file {} {why}: knib writes no file another name leads to",
                key.display()
            )));
        }
        match crate::lock::try_record_lock(&file) {
            Ok(true) => {}
            Ok(false) => {
                // What the holder wrote, read as hostile: a line of at most
                // 256 bytes, control characters shown as '?'.
                let mut raw = Vec::new();
                let _ = (&mut file).take(256).read_to_end(&mut raw);
                let holder: String =
                    String::from_utf8_lossy(&raw).chars().map(|c| if c.is_control() { '?' } else { c }).collect();
                return Err(busy(vm, &holder));
            }
            Err(e) => return Err(KnibError::io("cannot lock", &key, e)),
        }
        let text = format!("{operation} (pid {})", std::process::id());
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(text.as_bytes());
        map.insert(key.clone(), text);
        Ok(VmLock { file: Some(file), key })
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        let mut held = HELD.lock();
        drop(self.file.take());
        if let Some(map) = held.as_mut() {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn a_busy_attempt_does_not_release_the_holders_lock() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".lock");
        let held = VmLock::acquire(&p, "vm", "backup of vm").unwrap();
        let e = VmLock::acquire(&p, "vm", "delete").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("backup of vm (pid"), "{e}");
        // Another process still sees the lock held after the busy attempt.
        {
            let st = std::process::Command::new("python3")
                .args(["-c", "import fcntl,sys; f=open(sys.argv[1],'r+');\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); sys.exit(0)\nexcept OSError: sys.exit(3)"])
                .arg(&p)
                .status()
                .unwrap();
            assert_eq!(st.code(), Some(3), "the lock must still be held");
        }
        drop(held);
        VmLock::acquire(&p, "vm", "delete").unwrap();
    }

    /// A lock held by another process names its holder from the file: read
    /// as hostile (its first 256 bytes, control characters as '?').
    #[test]
    fn the_holder_named_by_a_lock_file_is_bounded_and_printable() {
        use std::io::BufRead;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(".lock");
        std::fs::write(&p, format!("\x1b[31mbackup\n{}", "x".repeat(100_000))).unwrap();
        let mut holder = std::process::Command::new("python3")
            .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"])
            .arg(&p)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "held");
        let e = VmLock::acquire(&p, "vm", "delete").unwrap_err();
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("VM vm is busy: ?[31mbackup?xxx"), "{e}");
        assert!(e.message.len() < 400 && !e.message.chars().any(char::is_control), "{e}");
    }
}
