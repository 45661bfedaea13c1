//! Filesystems knib does not read natively (XFS, btrfs, ...), through
//! libguestfs when `guestfish` is installed (Debian: libguestfs-tools):
//! `guestfish --ro` on the backup's top file (libguestfs reads the qcow2
//! chain itself), the partition mounted read-only as `/dev/sdaN` (`/dev/sda`
//! for a filesystem on the whole disk). Without it, the error names the
//! filesystem found and the package to install.
//!
//! Through the fallback, paths are resolved by libguestfs inside the
//! guest's filesystem; `get` copies with `copy-out` into a temporary
//! sibling of the destination, renamed into place at the end as the
//! native path renames its own (never over an entry that appeared
//! meanwhile; on a file system that takes no rename flags, NFS, CIFS or
//! FUSE, a file hard-linked in place, a directory renamed after checking
//! that nothing is there: see [`super::extract`]). The times are those
//! the host's tar run by `copy-out` sets: the mtime alone, which a FUSE
//! file system of libfuse 2 (bindfs) ignores, keeping the copy's.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{ErrorKind, KnibError, Result};
use crate::process::Invocation;
use crate::progress::Control;

use rustix::fs::CWD;

use super::extract::{place_noreplace, GetSummary};
use super::EntryInfo;

/// `program` found in the directories of `path_var` (a PATH value).
pub fn find_tool(program: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_var?).map(|d| d.join(program)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Where a filesystem is, for messages: "partition 2", "the whole disk".
pub fn place(partition: Option<u32>) -> String {
    match partition {
        Some(n) => format!("partition {n}"),
        None => "the whole disk".into(),
    }
}

/// The device name libguestfs gives the filesystem at `partition` of the
/// one disk it is given: `/dev/sdaN`, or `/dev/sda` for the whole disk.
pub fn device_name(partition: Option<u32>) -> String {
    match partition {
        Some(n) => format!("/dev/sda{n}"),
        None => "/dev/sda".into(),
    }
}

/// The error for filesystem `fs_type` at `partition`, not read natively,
/// with no libguestfs to fall back on.
pub fn unsupported(fs_type: &str, partition: Option<u32>) -> KnibError {
    let at = place(partition);
    match fs_type {
        "unknown" => KnibError::invalid(format!("{at} holds no filesystem knib recognizes")),
        "swap" => KnibError::invalid(format!("{at} is swap space: it holds no files")),
        "LVM2_member" => KnibError::invalid(format!(
            "{at} is an LVM physical volume: knib does not read LVM natively; install libguestfs-tools and run virt-ls / virt-copy-out on the backup's file"
        )),
        "crypto_LUKS" => KnibError::invalid(format!("{at} is encrypted (LUKS): knib cannot read it")),
        t => KnibError::invalid(format!(
            "filesystem {t} on {at} is not supported natively; install libguestfs-tools for a fallback"
        )),
    }
}

/// A filesystem read through guestfish.
pub struct Guest {
    guestfish: PathBuf,
    image: PathBuf,
    device: String,
}

/// Names of the temporary files and directories of the fallback.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other call (of this process or another) uses:
/// `<what>-<pid>-<n>-<ns>`.
fn unique(what: &str) -> String {
    let ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{what}-{}-{}-{ns:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// `s` as one argument of a guestfish script: a double-quoted string in
/// which every byte but ASCII letters, digits and `/._-` is a `\xHH`
/// escape. No name or path, whatever bytes it holds, can end the string,
/// start another argument or command, or reach a host shell (`!`, `|`,
/// `<!`): guestfish reads the string back byte for byte.
pub fn script_string(s: &[u8]) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for &b in s {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("\\x{b:02x}"));
        }
    }
    q.push('"');
    q
}

/// A private directory for one guestfish run (mode 0700), removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(unique(".knib-guestfish"));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| KnibError::io("cannot create", &dir, e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Guest {
    /// The fallback for the filesystem at `partition` of the qcow2 chain
    /// whose top is `image`, if guestfish is on PATH (and the type is one
    /// libguestfs can mount from a partition).
    pub fn find(image: &Path, fs_type: &str, partition: Option<u32>) -> Option<Guest> {
        if matches!(fs_type, "unknown" | "swap" | "LVM2_member" | "crypto_LUKS") {
            return None;
        }
        let guestfish = find_tool("guestfish", std::env::var_os("PATH").as_deref())?;
        Some(Guest { guestfish, image: image.to_path_buf(), device: device_name(partition) })
    }

    /// Run `script` (lines of commands whose arguments are all
    /// [`script_string`]s): written to a file of a private directory and
    /// given with `-f`, so that nothing of the guest's is ever on
    /// guestfish's command line, where an argument `:` starts a command.
    fn run(&self, script: &str, scratch: &Scratch, ctl: &Control) -> Result<String> {
        let file = scratch.0.join("script");
        std::fs::write(&file, script).map_err(|e| KnibError::io("cannot write", &file, e))?;
        let inv = Invocation::new(&self.guestfish)
            .args(["--ro", "--format=qcow2", "-a"])
            .arg(self.image.as_os_str())
            .arg("-m")
            .arg(format!("{}:/:ro", self.device))
            .arg("-f")
            .arg(file.as_os_str());
        Ok(inv.run_ok(ctl, ErrorKind::ImageTool)?.stdout)
    }

    /// The entries of directory `path`.
    pub fn list(&self, path: &str, ctl: &Control) -> Result<Vec<EntryInfo>> {
        let path = if path.is_empty() { "/" } else { path };
        let scratch = Scratch::new()?;
        // The names, NUL-separated, into a file of ours (`ls0`): a name may
        // hold any byte but NUL and `/`, newlines included.
        let listing = scratch.0.join("names");
        self.run(
            &format!("ls0 {} {}\n", script_string(path.as_bytes()), script_string(listing.as_os_str().as_bytes())),
            &scratch,
            ctl,
        )?;
        let raw = std::fs::read(&listing).map_err(|e| KnibError::io("cannot read", &listing, e))?;
        let mut names = Vec::new();
        for n in raw.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            match std::str::from_utf8(n) {
                Ok(n) if n != "." && n != ".." && !n.contains('/') => names.push(n.to_string()),
                Ok(n) if n == "." || n == ".." => {}
                _ => log::warn!(
                    "{path}: guestfish listed a name knib cannot pass on, left out: {:?}",
                    String::from_utf8_lossy(n)
                ),
            }
        }
        if names.is_empty() {
            return Ok(Vec::new());
        }
        // One stat and one readlink per name, each after a marker the
        // guest cannot know in advance (the readlink of what is not a link
        // fails, and `-` lets the script go on).
        let marker = unique("KNIB");
        let mut script = String::new();
        for (i, name) in names.iter().enumerate() {
            let full = if path.ends_with('/') { format!("{path}{name}") } else { format!("{path}/{name}") };
            let q = script_string(full.as_bytes());
            script.push_str(&format!(
                "echo {}\nlstatns {q}\n-readlink {q}\n",
                script_string(format!("{marker}-{i}").as_bytes())
            ));
        }
        let out = self.run(&script, &scratch, ctl)?;
        let sections = split_sections(&out, &marker, names.len()).ok_or_else(|| {
            KnibError::new(
                ErrorKind::ImageTool,
                format!("guestfish's stat output for {path} is not what knib asked for"),
            )
        })?;
        Ok(names
            .into_iter()
            .zip(sections)
            .map(|(name, (st, target))| {
                let get =
                    |k: &str| st.iter().find(|(key, _)| key == k).and_then(|(_, v)| v.parse::<i64>().ok()).unwrap_or(0);
                let fmt = get("st_mode") as u32 & 0o170000;
                let kind = match fmt {
                    0o100000 => "file",
                    0o040000 => "dir",
                    0o120000 => "symlink",
                    _ => "other",
                };
                EntryInfo {
                    name,
                    kind,
                    size: get("st_size").max(0) as u64,
                    mode: get("st_mode") as u32 & 0o7777,
                    mtime: get("st_mtime_sec"),
                    mtime_nsec: get("st_mtime_nsec").clamp(0, 999_999_999) as u32,
                    target: (kind == "symlink").then_some(target),
                }
            })
            .collect())
    }

    /// Copy `path` out to `to` (which must not exist). guestfish's
    /// `copy-out` unpacks a tar as the caller, which keeps owners, setuid
    /// bits and device nodes: the copy is made in a private temporary
    /// directory beside `to` and brought to what the native path gives
    /// (owners not set, setuid and setgid dropped, devices, fifos and
    /// sockets left out) before it is renamed into place, never over an
    /// entry that appeared meanwhile.
    pub fn get(&self, path: &str, to: &Path, ctl: &Control) -> Result<GetSummary> {
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(KnibError::invalid(format!(
                "{} already exists: give a path that does not exist yet",
                to.display()
            )));
        }
        let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = parent.join(format!("{}.part", unique(".knib-guestfish")));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| KnibError::io("cannot create", &tmp, e))?;
        }
        let r = (|| {
            let scratch = Scratch::new()?;
            self.run(
                &format!("copy-out {} {}\n", script_string(path.as_bytes()), script_string(tmp.as_os_str().as_bytes())),
                &scratch,
                ctl,
            )?;
            let base = Path::new(path).file_name().unwrap_or(OsStr::new(""));
            let got = if base.is_empty() { tmp.clone() } else { tmp.join(base) };
            let summary = tame(&got)?;
            // guestfish wrote the tree without syncing it: made durable
            // before it appears under its name.
            crate::fsio::sync_filesystem(&tmp)?;
            // Put in place as the native path puts its own: a directory
            // by a checked rename where the file system takes no rename
            // flags (NFS, CIFS, FUSE), since it cannot be hard-linked. A
            // second name left by a failed link is removed with `tmp`.
            let dir = std::fs::symlink_metadata(&got).is_ok_and(|m| m.is_dir());
            let c = |p: &Path| {
                CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| KnibError::invalid(format!("{} contains a NUL byte", p.display())))
            };
            crate::crashpoint::durable_step(&format!("rename {} to {}", got.display(), to.display()));
            place_noreplace(CWD, &c(&got)?, &got, CWD, &c(to)?, to, dir)?;
            crate::fsio::sync_dir(crate::fsio::parent_dir(to))?;
            Ok(summary)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        r
    }
}

/// The `key: value` fields of one `lstatns`.
type Fields = Vec<(String, String)>;

/// The `lstatns` fields and `readlink` target after each marker
/// `<marker>-<i>` of `out`, for `n` markers in order; `None` when the
/// output does not have them.
fn split_sections(out: &str, marker: &str, n: usize) -> Option<Vec<(Fields, String)>> {
    let mut sections: Vec<(Fields, Vec<&str>)> = Vec::with_capacity(n);
    for line in out.split('\n') {
        if line == format!("{marker}-{}", sections.len()) {
            sections.push((Vec::new(), Vec::new()));
            continue;
        }
        let (fields, rest) = sections.last_mut()?;
        match line.split_once(": ") {
            Some((k, v)) if rest.is_empty() && k.starts_with("st_") && !k.contains(' ') => {
                fields.push((k.to_string(), v.trim().to_string()))
            }
            _ => rest.push(line),
        }
    }
    if sections.len() != n {
        return None;
    }
    Some(
        sections
            .into_iter()
            .map(|(f, mut rest)| {
                // The target's line(s), without the newline after it (and
                // the empty line the split leaves at the very end).
                while rest.last() == Some(&"") {
                    rest.pop();
                }
                (f, rest.join("\n"))
            })
            .collect(),
    )
}

/// Bring the tree `copy-out` made at `p` to what the native path gives:
/// owned by whoever extracts it, without setuid or setgid bits, without
/// devices, fifos or sockets (removed). Counts what is left.
fn tame(p: &Path) -> Result<GetSummary> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut s = GetSummary::default();
    let m = std::fs::symlink_metadata(p).map_err(|e| KnibError::io("cannot stat", p, e))?;
    let ft = m.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::lchown(
            p,
            Some(rustix::process::geteuid().as_raw()),
            Some(rustix::process::getegid().as_raw()),
        )
        .map_err(|e| KnibError::io("cannot chown", p, e))?;
        s.symlinks += 1;
        return Ok(s);
    }
    if !(ft.is_dir() || ft.is_file()) {
        std::fs::remove_file(p).map_err(|e| KnibError::io("cannot remove", p, e))?;
        log::info!("{}: left out (not a file, directory or link)", p.display());
        return Ok(s);
    }
    std::os::unix::fs::lchown(p, Some(rustix::process::geteuid().as_raw()), Some(rustix::process::getegid().as_raw()))
        .map_err(|e| KnibError::io("cannot chown", p, e))?;
    if ft.is_dir() {
        // Readable and writable by us while its children are tamed.
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| KnibError::io("cannot chmod", p, e))?;
        s.dirs += 1;
        for e in std::fs::read_dir(p).map_err(|e| KnibError::io("cannot list", p, e))? {
            let e = e.map_err(|e| KnibError::io("cannot list", p, e))?;
            let c = tame(&e.path())?;
            s.files += c.files;
            s.dirs += c.dirs;
            s.symlinks += c.symlinks;
            s.bytes += c.bytes;
        }
    } else {
        s.files += 1;
        s.bytes += m.len();
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m.mode() & 0o1777))
        .map_err(|e| KnibError::io("cannot chmod", p, e))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_guestfish_the_error_names_the_filesystem_and_the_package() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(find_tool("guestfish", Some(empty.path().as_os_str())), None);
        assert_eq!(find_tool("guestfish", None), None);
        let e = unsupported("xfs", Some(2));
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert_eq!(
            e.message,
            "filesystem xfs on partition 2 is not supported natively; install libguestfs-tools for a fallback"
        );
        assert!(unsupported("btrfs", None).message.contains("filesystem btrfs on the whole disk"));
        assert!(unsupported("LVM2_member", Some(3)).message.contains("partition 3 is an LVM physical volume"));
        // A program that is there is found.
        let bin = tempfile::tempdir().unwrap();
        let prog = bin.path().join("guestfish");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_tool("guestfish", Some(bin.path().as_os_str())), Some(prog));
    }

    #[test]
    fn script_strings_hold_any_name_as_one_argument() {
        assert_eq!(script_string(b"/d/plain.txt"), "\"/d/plain.txt\"");
        assert_eq!(script_string(b":"), "\"\\x3a\"");
        assert_eq!(script_string(b"a b\n\"|!"), "\"a\\x20b\\x0a\\x22\\x7c\\x21\"");
        assert_eq!(script_string("é".as_bytes()), "\"\\xc3\\xa9\"");
    }

    #[test]
    fn stat_sections_follow_their_markers() {
        let out = "M-0\nst_mode: 33188\nst_size: 5\nst_mtime_sec: 1600000000\nM-1\nst_mode: 41471\nst_size: 1\nt\nM-2\nst_mode: 41471\nline1\nline2\n";
        let s = split_sections(out, "M", 3).unwrap();
        assert_eq!(s[0].0[0], ("st_mode".to_string(), "33188".to_string()));
        assert_eq!(s[0].1, "");
        assert_eq!(s[1].1, "t");
        assert_eq!(s[2].1, "line1\nline2");
        // A marker missing or out of order: not what was asked for.
        assert!(split_sections(out, "M", 4).is_none());
        assert!(split_sections("M-1\nst_mode: 1\n", "M", 1).is_none());
    }
}
