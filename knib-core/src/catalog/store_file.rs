//! Checks of the files a store holds, made before knib reads them.
//!
//! A backup file is written by knib as qcow2; one that does not start with
//! the qcow2 magic was damaged (or replaced) after it was written, so it is
//! [`crate::ErrorKind::Corrupt`], never "invalid input": the caller did
//! nothing wrong. (A caller's own disk that is not qcow2 is invalid input,
//! and is checked where disks are inspected.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{KnibError, Result};
use crate::qcow2::MAGIC;

/// Fail with a `corrupt` error unless `f` (the file at `file`, opened)
/// starts with the qcow2 magic; `what` names the file's place in the store
/// ("backup X: file F of volume V").
pub(crate) fn require_qcow2_magic(f: &File, file: &Path, what: &str) -> Result<()> {
    // From offset 0 whatever the handle's position (positional reads).
    let mut head = vec![0u8; MAGIC.len()];
    let mut n = 0;
    while n < head.len() {
        match f.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KnibError::io("cannot read", file, e)),
        }
    }
    head.truncate(n);
    if head == MAGIC {
        return Ok(());
    }
    let found = if head.len() < MAGIC.len() {
        format!("the file is {} bytes long", head.len())
    } else {
        format!("bad magic {head:02x?}")
    };
    Err(KnibError::corrupt(format!("{what} is not a qcow2 image ({found}): the store was damaged")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn only_the_qcow2_magic_passes() {
        let d = tempfile::tempdir().expect("temp dir");
        let cases: [(&[u8], Option<&str>); 5] = [
            (b"QFI\xfb\0\0\0\x03", None),
            (b"QFI\xfa\0\0\0\x03", Some("bad magic [51, 46, 49, fa]")),
            (b"\0\0\0\0", Some("bad magic")),
            (b"QF", Some("2 bytes long")),
            (b"", Some("0 bytes long")),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            let p = d.path().join(format!("f{i}"));
            std::fs::write(&p, bytes).expect("write");
            match (require_qcow2_magic(&File::open(&p).expect("open"), &p, "the file"), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => {
                    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
                    assert!(e.message.contains(w) && e.message.contains("the file is not a qcow2"), "{e}");
                }
                (r, w) => panic!("{bytes:?}: got {r:?}, want {w:?}"),
            }
        }
    }
}
