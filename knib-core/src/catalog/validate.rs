//! Validation of a catalog backup: the checks of [`Store::verify`] (every
//! file of its chains through `qemu-img check`, backing pointers and sizes
//! as the manifest says, the hash recorded at backup time (or the first
//! success) and
//! compared later) and, when asked, a boot test
//! ([`crate::engine::validate::boot_test`]) on overlays of the backup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::settings::ValidationSettings;
use super::{Manifest, Store, VerifyReport};
use crate::error::{KnibError, Result};
use crate::progress::Control;

/// What a validation found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    /// The backup.
    pub id: String,
    /// Whether every check passed.
    pub ok: bool,
    /// What failed, one line each.
    pub problems: Vec<String>,
    /// The file checks and hashes.
    pub verify: VerifyReport,
    /// The boot test, when one ran.
    #[cfg(feature = "libvirt")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::engine::validate::BootTestReport>,
}

/// Whether `name` is a guest disk target (`vda`, `sdb`, `hdc`).
fn is_target(name: &str) -> bool {
    let (p, rest) = name.split_at(name.len().min(2));
    matches!(p, "vd" | "sd" | "hd") && !rest.is_empty() && rest.chars().all(|c| c.is_ascii_lowercase())
}

/// The most bytes a boot test's kernel or initrd may have.
#[cfg(feature = "libvirt")]
const MAX_BOOT_FILE: u64 = 1 << 30;

impl Store {
    /// The store's file `rel` (a boot test's kernel or initrd, as the
    /// store's settings name it) copied into `work_dir` as `what`, opened
    /// without following a link and never outside the store: QEMU boots
    /// the copy (it would follow a link swapped in meanwhile).
    #[cfg(feature = "libvirt")]
    fn boot_file_copy(&self, rel: &Path, work_dir: &Path, what: &str) -> Result<PathBuf> {
        use super::confine::{self, Want};
        let origin = format!("validation.{what}");
        let rel = super::settings::store_relative(&origin, rel)?;
        let src = confine::open(self.root(), &rel, Want::File, &origin)?;
        let path = self.root().join(rel);
        let len = src.metadata().map_err(|e| KnibError::io("cannot stat", &path, e))?.len();
        if len > MAX_BOOT_FILE {
            return Err(KnibError::invalid(format!(
                "{origin} {} has {len} bytes, more than a boot test's {what} may have ({MAX_BOOT_FILE})",
                path.display()
            )));
        }
        let dest = work_dir.join(what);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(|e| KnibError::io("cannot create", &dest, e))?;
        std::io::copy(&mut std::io::Read::take(&src, MAX_BOOT_FILE), &mut out)
            .map_err(|e| KnibError::io("cannot copy", &path, e))?;
        Ok(dest)
    }

    /// The disks of backup `m` for a boot test, in the manifest's order:
    /// (guest target, top file of the volume's chain). A volume named like
    /// a target keeps its name; others become `vda`, `vdb`, … by position.
    pub fn boot_files(&self, m: &Manifest) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for (i, v) in m.volumes.iter().enumerate() {
            let top = self.chain_files(m, &v.name)?.pop().expect("a chain has a file");
            let target =
                if is_target(&v.name) { v.name.clone() } else { format!("vd{}", (b'a' + (i % 26) as u8) as char) };
            out.push((target, top));
        }
        Ok(out)
    }

    /// Validate backup `id` as `settings` say: always the file checks and
    /// hashes of [`Store::verify`]; with `settings.boot` also a boot test
    /// whose overlays go in `work_dir` (removed afterwards) and whose
    /// screenshot, if wanted, is written to `screenshot`. The backup's files
    /// are only read (a first successful validation records the hashes in
    /// the manifest). A backup found bad is a report with `ok` false; an
    /// error means the validation could not run.
    pub fn validate(
        &self,
        id: &str,
        settings: &ValidationSettings,
        work_dir: &Path,
        screenshot: Option<&Path>,
        ctl: &Control,
    ) -> Result<ValidationReport> {
        let verify = self.verify(Some(id), ctl)?.pop().expect("one backup verified");
        #[cfg_attr(not(feature = "libvirt"), allow(unused_mut))]
        let mut problems = verify.problems.clone();
        #[cfg(feature = "libvirt")]
        let mut boot = None;
        if settings.boot && verify.ok {
            #[cfg(feature = "libvirt")]
            {
                use crate::engine::validate::{boot_test, BootTestRequest, GuestCommand};
                let m = self.show(id)?;
                let command = settings.command.split_first().map(|(path, args)| GuestCommand {
                    path: path.clone(),
                    args: args.to_vec(),
                    expect_exit: settings.expect_exit,
                    expect_output: settings.expect_output.clone(),
                });
                // A store's settings pick no remote host and no transport
                // that runs a program.
                if !super::settings::is_local_qemu_uri(&settings.connect) {
                    return Err(KnibError::invalid(format!(
                        "setting validation.connect must be a local QEMU URI (qemu:///system, qemu:///session, or the same with qemu+unix), not {:?}: a store's settings pick no remote host and no transport that runs a program",
                        settings.connect
                    )));
                }
                std::fs::create_dir_all(work_dir).map_err(|e| KnibError::io("cannot create", work_dir, e))?;
                let _remove = RemoveDir(work_dir);
                let copy = |rel: &Option<PathBuf>, what: &str| match rel {
                    Some(rel) => self.boot_file_copy(rel, work_dir, what).map(Some),
                    None => Ok(None),
                };
                let kernel = copy(&settings.kernel, "kernel")?;
                let initrd = copy(&settings.initrd, "initrd")?;
                let req = BootTestRequest {
                    backup_files: self.boot_files(&m)?,
                    work_dir: work_dir.to_path_buf(),
                    kernel,
                    initrd,
                    cmdline: settings.cmdline.clone(),
                    memory_mib: settings.memory_mib,
                    boot_timeout_secs: settings.boot_timeout_secs,
                    screenshot: if settings.screenshot { screenshot.map(Path::to_path_buf) } else { None },
                    command,
                    domain_type: settings.domain_type.clone(),
                    max_write_bytes: settings.max_write_mib.map(|m| m << 20),
                    timing: Default::default(),
                };
                let hv = crate::libvirt::Hypervisor::open(&settings.connect)?;
                let report = boot_test(&hv, &req, ctl)?;
                problems.extend(report.problems.iter().map(|p| format!("boot test: {p}")));
                boot = Some(report);
            }
            #[cfg(not(feature = "libvirt"))]
            {
                let _ = (work_dir, screenshot, ctl);
                return Err(KnibError::invalid("validation.boot needs libvirt, and this knib was built without it"));
            }
        }
        Ok(ValidationReport {
            id: id.to_string(),
            ok: problems.is_empty(),
            problems,
            verify,
            #[cfg(feature = "libvirt")]
            boot,
        })
    }
}

/// A boot test's work directory, removed (with all in it) when dropped:
/// on every way out of [`Store::validate`].
#[cfg(feature = "libvirt")]
struct RemoveDir<'a>(&'a Path);

#[cfg(feature = "libvirt")]
impl Drop for RemoveDir<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}
