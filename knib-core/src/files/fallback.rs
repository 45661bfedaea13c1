//! Filesystems knib does not read natively (XFS, btrfs, ...), through
//! libguestfs when `guestfish` is installed (Debian: libguestfs-tools):
//! `guestfish --ro` on the backup's top file (libguestfs reads the qcow2
//! chain itself), the partition mounted read-only as `/dev/sdaN` (`/dev/sda`
//! for a filesystem on the whole disk). Without it, the error names the
//! filesystem found and the package to install.
//!
//! Through the fallback, paths are resolved by libguestfs inside the
//! guest's filesystem; `get` copies with `copy-out` into a temporary
//! sibling of the destination, renamed into place at the end.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, KnibError, Result};
use crate::process::Invocation;
use crate::progress::Control;

use super::extract::GetSummary;
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

    fn run(&self, commands: &[&OsStr], ctl: &Control) -> Result<String> {
        let inv = Invocation::new(&self.guestfish)
            .args(["--ro", "--format=qcow2", "-a"])
            .arg(self.image.as_os_str())
            .arg("-m")
            .arg(format!("{}:/:ro", self.device))
            .arg("--")
            .args(commands.iter().copied());
        Ok(inv.run_ok(ctl, ErrorKind::ImageTool)?.stdout)
    }

    /// The entries of directory `path`.
    pub fn list(&self, path: &str, ctl: &Control) -> Result<Vec<EntryInfo>> {
        let path = if path.is_empty() { "/" } else { path };
        let p = OsStr::new(path);
        let names: Vec<String> =
            self.run(&[OsStr::new("ls"), p], ctl)?.lines().filter(|l| !l.is_empty()).map(String::from).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd: Vec<&OsStr> = vec![OsStr::new("lstatnslist"), p];
        cmd.extend(names.iter().map(OsStr::new));
        cmd.push(OsStr::new(":"));
        cmd.push(OsStr::new("readlinklist"));
        cmd.push(p);
        cmd.extend(names.iter().map(OsStr::new));
        let out = self.run(&cmd, ctl)?;
        let (stats, links) = parse_stats(&out);
        if stats.len() != names.len() {
            return Err(KnibError::new(
                ErrorKind::ImageTool,
                format!("guestfish gave {} stat results for {} names in {path}", stats.len(), names.len()),
            ));
        }
        Ok(names
            .into_iter()
            .zip(stats)
            .enumerate()
            .map(|(i, (name, st))| {
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
                    target: (kind == "symlink").then(|| links.get(i).cloned().unwrap_or_default()),
                }
            })
            .collect())
    }

    /// Copy `path` out to `to` (which must not exist).
    pub fn get(&self, path: &str, to: &Path, ctl: &Control) -> Result<GetSummary> {
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(KnibError::invalid(format!(
                "{} already exists: give a path that does not exist yet",
                to.display()
            )));
        }
        let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = parent.join(format!(".knib-guestfish-{}.part", std::process::id()));
        std::fs::create_dir(&tmp).map_err(|e| KnibError::io("cannot create", &tmp, e))?;
        let r = (|| {
            self.run(&[OsStr::new("copy-out"), OsStr::new(path), tmp.as_os_str()], ctl)?;
            let base = Path::new(path).file_name().unwrap_or(OsStr::new(""));
            let got = if base.is_empty() { tmp.clone() } else { tmp.join(base) };
            let summary = count(&got)?;
            // guestfish wrote the tree without syncing it: made durable
            // before it appears under its name.
            crate::fsio::sync_filesystem(&tmp)?;
            crate::fsio::commit_rename(&got, to)?;
            Ok(summary)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        r
    }
}

/// The structs of a `lstatnslist` (lists of `key: value` between `{` and
/// `}`) and the lines of a `readlinklist` after them.
fn parse_stats(out: &str) -> (Vec<Vec<(String, String)>>, Vec<String>) {
    let mut stats = Vec::new();
    let mut links = Vec::new();
    let mut cur: Option<Vec<(String, String)>> = None;
    for line in out.lines() {
        let t = line.trim();
        if t.ends_with('{') {
            cur = Some(Vec::new());
        } else if t == "}" {
            stats.extend(cur.take());
        } else if let Some(c) = cur.as_mut() {
            if let Some((k, v)) = t.split_once(':') {
                c.push((k.trim().to_string(), v.trim().to_string()));
            }
        } else {
            links.push(line.to_string());
        }
    }
    (stats, links)
}

/// Files, directories, symlinks and bytes under `p`.
fn count(p: &Path) -> Result<GetSummary> {
    let mut s = GetSummary::default();
    let m = std::fs::symlink_metadata(p).map_err(|e| KnibError::io("cannot stat", p, e))?;
    if m.is_dir() {
        s.dirs += 1;
        for e in std::fs::read_dir(p).map_err(|e| KnibError::io("cannot list", p, e))? {
            let e = e.map_err(|e| KnibError::io("cannot list", p, e))?;
            let c = count(&e.path())?;
            s.files += c.files;
            s.dirs += c.dirs;
            s.symlinks += c.symlinks;
            s.bytes += c.bytes;
        }
    } else if m.file_type().is_symlink() {
        s.symlinks += 1;
    } else if m.is_file() {
        s.files += 1;
        s.bytes += m.len();
    }
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
    fn guestfish_stat_lists_parse() {
        let out = "[0] = {\n  st_mode: 33188\n  st_size: 5\n  st_mtime_sec: 1600000000\n}\n[1] = {\n  st_mode: 41471\n}\n\nt\n";
        let (stats, links) = parse_stats(out);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0][0], ("st_mode".to_string(), "33188".to_string()));
        assert_eq!(links, vec!["".to_string(), "t".to_string()]);
    }
}
