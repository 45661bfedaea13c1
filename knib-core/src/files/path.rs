//! Paths inside a guest filesystem: a requested path parsed into its
//! components, and resolved through the filesystem's directories and
//! symbolic links.
//!
//! # Invariants
//!
//! - A requested path is absolute or relative to the filesystem's root; a
//!   `..` component is refused (it could only name something the request
//!   did not), `.` and empty components are dropped.
//! - Symbolic links are followed inside the guest filesystem only, at most
//!   [`MAX_LINKS`] of them, so a loop is an error, never a hang; a `..`
//!   in a link's target never climbs above the filesystem's root, and a
//!   link never leads to a file of the host.

use super::fs::{self, display, Filesystem, Kind, Node};
use crate::error::{KnibError, Result};

/// The most symlinks followed while resolving one path.
pub const MAX_LINKS: usize = 40;

/// The components of a requested path; `..` is refused.
pub(crate) fn parse_path(path: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(KnibError::invalid(format!(
                "path {path:?} has a `..` component: paths are taken from the filesystem's root and may not leave it"
            )))
            }
            c if c.contains('\0') => return Err(KnibError::invalid(format!("path {path:?} contains a NUL byte"))),
            c => out.push(c.as_bytes().to_vec()),
        }
    }
    Ok(out)
}

/// Resolve `comps` (of request `request`) from the root of `f`, following
/// symlinks inside the filesystem: the canonical path (directories only,
/// then the last component) and what it names.
pub(crate) fn resolve(f: &mut dyn Filesystem, request: &str, comps: &[Vec<u8>]) -> Result<(Vec<Vec<u8>>, Node)> {
    let mut todo: std::collections::VecDeque<Vec<u8>> = comps.iter().cloned().collect();
    let mut canon: Vec<Vec<u8>> = Vec::new();
    let mut nodes: Vec<Node> = vec![f.root()?];
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == b".." {
            // Only from a symlink's target.
            if canon.pop().is_none() {
                return Err(KnibError::invalid(format!(
                    "{request}: a symlink on the way climbs above the filesystem's root"
                )));
            }
            nodes.pop();
            continue;
        }
        let dir = nodes.last().expect("the root is always there").clone();
        if dir.kind != Kind::Dir {
            return Err(KnibError::invalid(format!("{request}: {} is not a directory", display(&canon))));
        }
        let fs::Entry { name: c, node } = f.lookup(&canon, &dir, &c)?.ok_or_else(|| {
            let mut p = canon.clone();
            p.push(c.clone());
            KnibError::not_found(format!("{request}: {} does not exist", display(&p)))
        })?;
        if node.kind == Kind::Symlink {
            let mut link = canon.clone();
            link.push(c.clone());
            links += 1;
            if links > MAX_LINKS {
                return Err(KnibError::invalid(format!(
                    "{request}: more than {MAX_LINKS} symlinks on the way (at {}): they loop",
                    display(&link)
                )));
            }
            let target = f.read_link(&link, &node)?;
            let shown = String::from_utf8_lossy(&target).into_owned();
            let leaves = || {
                KnibError::invalid(format!(
                    "{request}: symlink {} points to {shown:?}, outside the filesystem; ask for a path inside it",
                    display(&link)
                ))
            };
            if target.first() == Some(&b'/') {
                return Err(leaves());
            }
            // Climbing above the root from the link's directory leaves it.
            let mut depth = canon.len() as i64;
            let mut parts = Vec::new();
            for t in target.split(|&b| b == b'/') {
                match t {
                    b"" | b"." => {}
                    b".." => {
                        depth -= 1;
                        if depth < 0 {
                            return Err(leaves());
                        }
                        parts.push(t.to_vec());
                    }
                    t => {
                        depth += 1;
                        parts.push(t.to_vec());
                    }
                }
            }
            for p in parts.into_iter().rev() {
                todo.push_front(p);
            }
            continue;
        }
        canon.push(c);
        nodes.push(node);
    }
    let node = nodes.pop().expect("the root is always there");
    Ok((canon, node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn requested_paths() {
        assert_eq!(parse_path("/a//b/./c/").unwrap(), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(parse_path("").unwrap().is_empty());
        let e = parse_path("/a/../../etc/passwd").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("\"/a/../../etc/passwd\" has a `..` component"), "{e}");
    }
}
