//! The `qemu-img` runner: every call is an argument vector, every report is
//! `--output=json` parsed with serde, every call has the caller's time budget
//! and can be cancelled, and `-p` progress is forwarded.
//!
//! The program is `qemu-img` from `PATH`, or the path in `KNIB_QEMU_IMG`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{ErrorKind, KnibError, Result};
use crate::process::Invocation;
use crate::progress::Control;

/// One image of a backing chain, as `qemu-img info --output=json` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file name as opened.
    pub filename: String,
    /// `qcow2`, `raw`, ...
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the file takes on disk.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// The backing pointer as written in the image.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing pointer resolved to a path.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// The backing format recorded in the image.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Cluster size (qcow2).
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// Whether the image is encrypted.
    #[serde(default)]
    pub encrypted: Option<bool>,
    /// Whether the image is marked dirty (was not closed cleanly).
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// Format-specific details.
    #[serde(default)]
    pub format_specific: Option<FormatSpecific>,
}

/// The `format-specific` part of `qemu-img info`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FormatSpecific {
    /// The format ("qcow2").
    #[serde(rename = "type")]
    pub kind: String,
    /// Its data.
    #[serde(default)]
    pub data: FormatData,
}

/// qcow2 details from `qemu-img info`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FormatData {
    /// "0.10" (qcow2 v2) or "1.1" (v3).
    #[serde(default)]
    pub compat: Option<String>,
    /// "zlib" or "zstd".
    #[serde(default)]
    pub compression_type: Option<String>,
    /// Whether QEMU marked the image corrupt.
    #[serde(default)]
    pub corrupt: Option<bool>,
    /// The name of an external data file, if any.
    #[serde(default)]
    pub data_file: Option<String>,
    /// The persistent dirty bitmaps stored in the image.
    #[serde(default)]
    pub bitmaps: Vec<ImageBitmap>,
}

/// A persistent dirty bitmap stored in a qcow2 image.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ImageBitmap {
    /// Its name.
    pub name: String,
    /// `auto` (it records the writes of whoever opens the image) and
    /// `in-use` (the image was not closed cleanly while it was loaded: its
    /// content cannot be trusted).
    #[serde(default)]
    pub flags: Vec<String>,
    /// Bytes per bit.
    #[serde(default)]
    pub granularity: u64,
}

impl ImageBitmap {
    /// Whether it records writes (`auto`).
    pub fn recording(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }

    /// Whether QEMU marks it inconsistent (`in-use` in a closed image).
    pub fn inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

impl ImageInfo {
    /// Whether this is a qcow2 image of version 2 (compat 0.10).
    pub fn is_qcow2_v2(&self) -> bool {
        self.format_specific.as_ref().and_then(|f| f.data.compat.as_deref()).is_some_and(|c| c == "0.10")
    }
}

/// What `qemu-img check --output=json` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The file checked.
    pub filename: String,
    /// Its format.
    pub format: String,
    /// Errors the check could not get past.
    #[serde(default)]
    pub check_errors: u64,
    /// Corruptions found.
    #[serde(default)]
    pub corruptions: u64,
    /// Leaked clusters (harmless, but not clean).
    #[serde(default)]
    pub leaks: u64,
    /// Allocated clusters.
    #[serde(default)]
    pub allocated_clusters: Option<u64>,
    /// All clusters.
    #[serde(default)]
    pub total_clusters: Option<u64>,
}

impl CheckReport {
    /// No corruption, no leak, no check error.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

/// What `qemu-img measure --output=json` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    /// Bytes a converted copy needs.
    pub required: u64,
    /// Bytes a fully allocated copy needs.
    pub fully_allocated: u64,
}

/// Compression library of a compressed qcow2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompressionLibrary {
    /// zstd (qcow2 v3 only).
    #[default]
    Zstd,
    /// zlib (any qcow2).
    Zlib,
}

impl CompressionLibrary {
    /// "zstd" or "zlib".
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionLibrary::Zstd => "zstd",
            CompressionLibrary::Zlib => "zlib",
        }
    }
}

impl std::str::FromStr for CompressionLibrary {
    type Err = KnibError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zstd" => Ok(Self::Zstd),
            "zlib" => Ok(Self::Zlib),
            _ => Err(KnibError::invalid(format!("unknown compression library {s:?}: use zstd or zlib"))),
        }
    }
}

/// Output format of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// qcow2.
    #[default]
    Qcow2,
    /// raw.
    Raw,
}

impl ImageFormat {
    /// "qcow2" or "raw".
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = KnibError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(Self::Qcow2),
            "raw" => Ok(Self::Raw),
            _ => Err(KnibError::invalid(format!("unknown image format {s:?}: use qcow2 or raw"))),
        }
    }
}

/// A `qemu-img convert` to run.
#[derive(Debug, Clone, Default)]
pub struct Convert {
    /// Source image (read through its whole chain unless `backing` is set).
    pub source: PathBuf,
    /// Source format (qcow2 when `None`).
    pub source_format: Option<String>,
    /// Destination file.
    pub dest: PathBuf,
    /// Destination format.
    pub dest_format: ImageFormat,
    /// Backing pointer of the destination (relative to the destination's
    /// directory, or absolute). Only data above the source's own backing is
    /// copied: the destination's backing must hold what the source's does.
    pub backing: Option<String>,
    /// Compress with this library.
    pub compress: Option<CompressionLibrary>,
    /// Keep qcow2 v2 (compat 0.10) in the destination.
    pub compat_v2: bool,
    /// Parallel coroutines (`-m`), 1 when `None`.
    pub coroutines: Option<u32>,
    /// Rate limit in MB/s (`-r`), none when `None` or 0.
    pub rate_limit_mbps: Option<u64>,
    /// Open the source with `-U` (it may be in use by a running VM).
    pub force_share: bool,
    /// Allow out-of-order writes (`-W`).
    pub out_of_order: bool,
}

/// Runs `qemu-img`.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
}

impl Default for QemuImg {
    fn default() -> Self {
        Self::new()
    }
}

fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

impl QemuImg {
    /// `qemu-img` from `KNIB_QEMU_IMG` or `PATH`.
    pub fn new() -> Self {
        let program = std::env::var_os("KNIB_QEMU_IMG").map(PathBuf::from).unwrap_or_else(|| "qemu-img".into());
        QemuImg { program }
    }

    /// A runner for a given program path.
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        QemuImg { program: program.into() }
    }

    fn inv(&self) -> Invocation {
        Invocation::new(&self.program)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, inv: &Invocation, text: &str) -> Result<T> {
        serde_json::from_str(text).map_err(|e| {
            KnibError::new(ErrorKind::ImageTool, format!("cannot parse the JSON of {}: {e}", inv.display()))
        })
    }

    /// The version as (major, minor).
    pub fn version(&self, ctl: &Control) -> Result<(u32, u32)> {
        let inv = self.inv().arg("--version");
        let f = inv.run_ok(ctl, ErrorKind::ImageTool)?;
        let v = f
            .stdout
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .ok_or_else(|| KnibError::new(ErrorKind::ImageTool, "cannot read the version of qemu-img"))?;
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
    }

    fn require_file(path: &Path) -> Result<()> {
        match std::fs::metadata(path) {
            Ok(_) => Ok(()),
            Err(e) => Err(KnibError::io("cannot open image", path, e)),
        }
    }

    /// The backing chain of `path`, top first (`info --backing-chain`).
    pub fn info_chain(&self, path: &Path, ctl: &Control) -> Result<Vec<ImageInfo>> {
        Self::require_file(path)?;
        let inv = self.inv().args(["info", "-U", "--backing-chain", "--output=json"]).arg(os(path));
        let f = inv.run_ok(ctl, ErrorKind::ImageTool)?;
        self.json(&inv, &f.stdout)
    }

    /// The image at `path` alone (`info`).
    pub fn info(&self, path: &Path, ctl: &Control) -> Result<ImageInfo> {
        Self::require_file(path)?;
        let inv = self.inv().args(["info", "-U", "--output=json"]).arg(os(path));
        let f = inv.run_ok(ctl, ErrorKind::ImageTool)?;
        self.json(&inv, &f.stdout)
    }

    /// `qemu-img check` of one image (its backing files are opened, not
    /// checked).
    pub fn check(&self, path: &Path, ctl: &Control) -> Result<CheckReport> {
        Self::require_file(path)?;
        let inv = self.inv().args(["check", "-U", "--output=json"]).arg(os(path));
        let f = inv.run(ctl)?;
        match f.code {
            Some(0) | Some(2) | Some(3) => self.json(&inv, &f.stdout),
            _ => Err(inv.failure(&f, ErrorKind::Corrupt)),
        }
    }

    /// Repair `path` in place with `qemu-img check -r all -f qcow2` (what
    /// QEMU does when it opens a dirty image for writing: refcounts rebuilt
    /// from the tables), then check it again. Errors: the repair failed, or
    /// left corruptions or leaks ([`ErrorKind::Corrupt`]).
    pub fn repair(&self, path: &Path, ctl: &Control) -> Result<CheckReport> {
        self.repair_what(path, "all", ctl)
    }

    /// Reclaim the leaked clusters of `path` in place with
    /// `qemu-img check -r leaks -f qcow2` (refcounts of clusters no table
    /// references are lowered; nothing a table references changes), then
    /// check it again. Errors as [`QemuImg::repair`].
    pub fn repair_leaks(&self, path: &Path, ctl: &Control) -> Result<CheckReport> {
        self.repair_what(path, "leaks", ctl)
    }

    fn repair_what(&self, path: &Path, what: &str, ctl: &Control) -> Result<CheckReport> {
        Self::require_file(path)?;
        let inv = self.inv().args(["check", "-r", what, "-f", "qcow2", "--output=json"]).arg(os(path));
        let f = inv.run(ctl)?;
        if f.code != Some(0) {
            return Err(inv.failure(&f, ErrorKind::Corrupt));
        }
        let after = self.check(path, ctl)?;
        if !after.is_clean() {
            return Err(KnibError::corrupt(format!(
                "{}: qemu-img check -r {what} left {} corruptions and {} leaks",
                path.display(),
                after.corruptions,
                after.leaks
            )));
        }
        Ok(after)
    }

    /// `qemu-img measure` of converting `path` (its whole chain) to `format`.
    pub fn measure(&self, path: &Path, format: ImageFormat, ctl: &Control) -> Result<Measure> {
        Self::require_file(path)?;
        let inv = self.inv().args(["measure", "-U", "--output=json", "-O", format.as_str()]).arg(os(path));
        let f = inv.run_ok(ctl, ErrorKind::ImageTool)?;
        self.json(&inv, &f.stdout)
    }

    /// Create an empty qcow2 image of `size` bytes.
    pub fn create(&self, path: &Path, size: u64, ctl: &Control) -> Result<()> {
        self.inv()
            .args(["create", "-q", "-f", "qcow2"])
            .arg(os(path))
            .arg(size.to_string())
            .run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Create a qcow2 overlay at `path` whose backing file is `backing`
    /// (written as given: relative names are relative to `path`'s directory).
    /// With `size`, the backing file is not opened (`-u`).
    pub fn create_overlay(
        &self,
        path: &Path,
        backing: &str,
        backing_format: &str,
        size: Option<u64>,
        ctl: &Control,
    ) -> Result<()> {
        let mut inv = self.inv().args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing]);
        if size.is_some() {
            inv = inv.arg("-u");
        }
        inv = inv.arg(os(path));
        if let Some(s) = size {
            inv = inv.arg(s.to_string());
        }
        inv.run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// [`QemuImg::convert`] into `file`, a temporary of knib's own named
    /// `tmp` (`c.dest` is not used): qemu-img opens this process's
    /// descriptor of it (`/proc/<pid>/fd/<n>`), never the name, so an entry
    /// put under the name meanwhile (a link, symbolic or hard) is not
    /// written through. A backing pointer (`c.backing`, relative to `tmp`'s
    /// directory, or absolute) is given absolute for qemu-img's open (a
    /// name relative to `/proc` leads nowhere), then written as named
    /// (`qemu-img rebase -u`).
    pub fn convert_into(&self, c: &Convert, file: &std::fs::File, tmp: &Path, ctl: &Control) -> Result<()> {
        let by_fd = crate::fsio::by_fd(file);
        let absolute = match &c.backing {
            None => None,
            Some(b) => {
                let at = crate::fsio::parent_dir(tmp).join(b);
                let at = std::path::absolute(&at).map_err(|e| KnibError::io("cannot resolve", &at, e))?;
                Some(
                    at.to_str()
                        .ok_or_else(|| KnibError::invalid(format!("backing file {} is not UTF-8", at.display())))?
                        .to_string(),
                )
            }
        };
        self.convert(&Convert { dest: by_fd.clone(), backing: absolute, ..c.clone() }, ctl)?;
        if let Some(b) = &c.backing {
            self.rebase_unsafe(&by_fd, b, "qcow2", ctl)?;
        }
        Ok(())
    }

    /// Run a conversion.
    pub fn convert(&self, c: &Convert, ctl: &Control) -> Result<()> {
        let src_fmt = c.source_format.clone().unwrap_or_else(|| "qcow2".into());
        let mut inv = self.inv().args(["convert", "-p", "-f", &src_fmt, "-O", c.dest_format.as_str()]);
        if c.force_share {
            inv = inv.arg("-U");
        }
        if let Some(b) = &c.backing {
            inv = inv.args(["-B", b, "-F", "qcow2"]);
        }
        let mut opts = Vec::new();
        if c.dest_format == ImageFormat::Qcow2 {
            if c.compat_v2 {
                opts.push("compat=0.10".to_string());
            }
            if let Some(lib) = c.compress {
                if !c.compat_v2 {
                    opts.push(format!("compression_type={}", lib.as_str()));
                }
            }
        }
        if c.compress.is_some() {
            inv = inv.arg("-c");
        }
        if !opts.is_empty() {
            inv = inv.arg("-o").arg(opts.join(","));
        }
        if let Some(m) = c.coroutines.filter(|m| *m > 1) {
            inv = inv.arg("-m").arg(m.min(16).to_string());
        }
        if let Some(r) = c.rate_limit_mbps.filter(|r| *r > 0) {
            inv = inv.arg("-r").arg(format!("{r}M"));
        }
        if c.out_of_order {
            inv = inv.arg("-W");
        }
        let step = format!("convert {}", c.source.display());
        inv = inv.arg(os(&c.source)).arg(os(&c.dest)).progress(step);
        inv.run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Commit `path` into its backing file. With `keep`, `path` keeps its
    /// data (`-d`); otherwise it is emptied.
    ///
    /// Both files are checked first ([`QemuImg::require_uncorrupted`]): a
    /// qcow2 file that `qemu-img check` finds corrupt is refused, and
    /// nothing is written. `qemu-img commit` writes by the tables and
    /// refcounts it finds: into a base whose refcount says a cluster in use
    /// is free, or whose L2 entries share a cluster or point into its
    /// metadata, it writes over guest data and answers success.
    pub fn commit(&self, path: &Path, keep: bool, ctl: &Control) -> Result<()> {
        self.require_uncorrupted(path, ctl)?;
        let mut inv = self.inv().args(["commit", "-p", "-f", "qcow2"]);
        if keep {
            inv = inv.arg("-d");
        }
        inv = inv.arg(os(path)).progress(format!("commit {}", path.display()));
        inv.run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Refuse `top` or its backing file when either is qcow2 and
    /// `qemu-img check` (read only) finds corruptions in it or cannot check
    /// it: [`ErrorKind::Corrupt`], naming the file and the check's first
    /// line. Leaks (clusters counted but unused) are harmless to a write
    /// and pass. A backing file named by a `json:` description is not a
    /// file to check; it passes, logged.
    pub fn require_uncorrupted(&self, top: &Path, ctl: &Control) -> Result<()> {
        let chain = self.info_chain(top, ctl)?;
        for i in chain.iter().take(2).filter(|i| i.format == "qcow2") {
            if i.filename.starts_with("json:") {
                log::warn!("{}: not checked before the merge (a json: description)", i.filename);
                continue;
            }
            self.require_no_corruption(Path::new(&i.filename), ctl)?;
        }
        Ok(())
    }

    /// Refuse the qcow2 file `file` when `qemu-img check` (read only) finds
    /// corruptions in it or cannot check it ([`ErrorKind::Corrupt`], naming
    /// it): before a merge into or from it. Leaks pass.
    pub fn require_no_corruption(&self, file: &Path, ctl: &Control) -> Result<()> {
        let r = self.check(file, ctl).map_err(|e| e.context(format!("check of {} before a merge", file.display())))?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(KnibError::corrupt(format!(
                "{}: qemu-img check finds {} corruptions and {} check errors: nothing is merged into or from it",
                file.display(),
                r.corruptions,
                r.check_errors
            )));
        }
        Ok(())
    }

    /// The persistent dirty bitmaps of the qcow2 image at `path`.
    pub fn bitmaps(&self, path: &Path, ctl: &Control) -> Result<Vec<ImageBitmap>> {
        let info = self.info(path, ctl)?;
        Ok(info.format_specific.map(|f| f.data.bitmaps).unwrap_or_default())
    }

    /// Add an enabled persistent dirty bitmap `name` to the qcow2 image at
    /// `path` (`bitmap --add --enable`): it records every write from now on.
    pub fn bitmap_add(&self, path: &Path, name: &str, ctl: &Control) -> Result<()> {
        self.inv()
            .args(["bitmap", "-f", "qcow2", "--add", "--enable"])
            .arg(os(path))
            .arg(name)
            .run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Remove the persistent dirty bitmap `name` from the qcow2 image at
    /// `path` (`bitmap --remove`).
    pub fn bitmap_remove(&self, path: &Path, name: &str, ctl: &Control) -> Result<()> {
        self.inv()
            .args(["bitmap", "-f", "qcow2", "--remove"])
            .arg(os(path))
            .arg(name)
            .run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Point `path` at another backing file without touching data
    /// (`rebase -u`).
    pub fn rebase_unsafe(&self, path: &Path, backing: &str, backing_format: &str, ctl: &Control) -> Result<()> {
        self.inv()
            .args(["rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", backing])
            .arg(os(path))
            .run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Copy every backing layer's data into `path` and drop its backing
    /// file (`rebase -b ""`, the safe mode): the stopped-VM equivalent of a
    /// block pull.
    pub fn flatten_in_place(&self, path: &Path, ctl: &Control) -> Result<()> {
        self.inv()
            .args(["rebase", "-p", "-f", "qcow2", "-b", ""])
            .arg(os(path))
            .progress(format!("pull into {}", path.display()))
            .run_ok(ctl, ErrorKind::ImageTool)?;
        Ok(())
    }

    /// Whether the guest-visible contents of two images are identical
    /// (`qemu-img compare`; formats are probed).
    pub fn compare(&self, a: &Path, b: &Path, ctl: &Control) -> Result<bool> {
        let inv = self.inv().args(["compare", "-U"]).arg(os(a)).arg(os(b));
        let f = inv.run(ctl)?;
        match f.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(inv.failure(&f, ErrorKind::ImageTool)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_check_measure_parse_from_real_qemu_img() {
        let d = tempfile::tempdir().unwrap();
        let q = QemuImg::new();
        let ctl = Control::new();
        let base = d.path().join("base.qcow2");
        let top = d.path().join("top.qcow2");
        q.create(&base, 8 << 20, &ctl).unwrap();
        q.create_overlay(&top, "base.qcow2", "qcow2", None, &ctl).unwrap();
        let chain = q.info_chain(&top, &ctl).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing_filename.as_deref(), Some("base.qcow2"));
        assert_eq!(chain[0].virtual_size, 8 << 20);
        assert_eq!(chain[1].backing_filename, None);
        assert!(!chain[0].is_qcow2_v2());
        let r = q.check(&top, &ctl).unwrap();
        assert!(r.is_clean(), "{r:?}");
        let m = q.measure(&top, ImageFormat::Qcow2, &ctl).unwrap();
        assert!(m.fully_allocated >= 8 << 20);
        assert!(q.compare(&top, &base, &ctl).unwrap());
        let (major, _) = q.version(&ctl).unwrap();
        assert!(major >= 5);
    }

    #[test]
    fn a_convert_past_its_budget_is_killed_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let q = QemuImg::new();
        let src = d.path().join("src.qcow2");
        let dst = d.path().join("dst.qcow2");
        q.create(&src, 64 << 20, &Control::new()).unwrap();
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 0 16M"])
            .arg(&src)
            .output()
            .unwrap();
        assert!(st.status.success());
        // 16 MiB at 1 MB/s takes over 10 s; the budget is 1 s.
        let ctl = Control::new().with_deadline(crate::Deadline::after(std::time::Duration::from_secs(1)));
        let t = std::time::Instant::now();
        let c = Convert { source: src, dest: dst, rate_limit_mbps: Some(1), ..Default::default() };
        let e = q.convert(&c, &ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.message.contains("qemu-img convert") && e.message.contains("was killed"), "{e}");
        assert!(e.message.contains("time budget (1s) ran out"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn missing_image_is_not_found_and_names_it() {
        let e = QemuImg::new().info(Path::new("/nonexistent/x.qcow2"), &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("/nonexistent/x.qcow2"));
    }

    #[test]
    fn image_tool_failure_carries_its_message() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("not-an-image");
        std::fs::write(&p, b"hello").unwrap();
        let e = QemuImg::new().commit(&p, false, &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ImageTool);
        assert!(e.message.contains("qemu-img commit"), "{e}");
    }
}
