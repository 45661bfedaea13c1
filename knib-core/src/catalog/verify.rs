//! Verifying stored backups: every file of each backup's chain read back
//! and held against its manifest and its recorded hashes.
//!
//! # Invariants
//!
//! - Verifying only reads the store; a backup found bad is a report with
//!   `ok` false, never an error.
//! - A backup file's qcow2 backing pointer must be exactly the
//!   `../<parent>/<file>` its manifest and its parent's say before any chain
//!   is read through it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Manifest, Store, VmLock};
use crate::error::{ErrorKind, Result};
use crate::progress::Control;

/// The result of verifying one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VerifyReport {
    /// The backup.
    pub id: String,
    /// Whether every check passed.
    pub ok: bool,
    /// What failed, one line each.
    pub problems: Vec<String>,
    /// Files checked.
    pub files_checked: usize,
    /// The xxh3-128 of the backup's chain (files root first), per volume.
    pub chain_hashes: BTreeMap<String, String>,
}

impl VerifyReport {
    /// The failed report of backup `id` of `vm`, whose manifest cannot be
    /// read (`e` says why): nothing of it could be checked.
    pub(crate) fn unreadable(id: String, vm: &str, e: &crate::KnibError) -> Self {
        VerifyReport {
            id,
            ok: false,
            problems: vec![format!("VM {vm}: {}", e.message)],
            files_checked: 0,
            chain_hashes: BTreeMap::new(),
        }
    }
}

impl Store {
    /// Verify one backup, or every backup of the store: `qemu-img check` of
    /// its files, backing pointers and sizes as the manifest says, the whole
    /// chain present, and each file's hash (recorded when the backup was
    /// written or at the first clean verify, compared afterwards).
    ///
    /// Verifying every backup also reports each backup directory whose
    /// manifest cannot be read (it does not parse, names another backup,
    /// is not a regular file, is missing while the directory holds
    /// files...) as a failed report under the directory's name: a listing
    /// skips it, a verify must not hide it.
    pub fn verify(&self, id: Option<&str>, ctl: &Control) -> Result<Vec<VerifyReport>> {
        if let Some(id) = id {
            return Ok(vec![self.verify_one(&self.show(id)?, ctl)?]);
        }
        let mut out = Vec::new();
        for vm in self.vms()? {
            let (manifests, unreadable) = self.scan_backups(&vm)?;
            for m in manifests.iter().filter(|m| !m.removed) {
                out.push(self.verify_one(m, ctl)?);
            }
            for id in unreadable {
                // Read again: mended meanwhile, it is verified as any other.
                match self.load_manifest(&vm, &id) {
                    Ok(m) if m.removed => {}
                    Ok(m) => out.push(self.verify_one(&m, ctl)?),
                    // Deleted meanwhile (renamed away whole).
                    Err(e)
                        if e.kind == ErrorKind::NotFound
                            && std::fs::symlink_metadata(self.vm_dir(&vm).join(&id))
                                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {}
                    Err(e) => out.push(VerifyReport::unreadable(id, &vm, &e)),
                }
            }
        }
        Ok(out)
    }

    /// Verify one backup. The checks run without the VM's lock (a backup
    /// of the VM may go on meanwhile); when they find a problem, they are
    /// run again under the lock, on the manifest as it is then, so that a
    /// compression that replaced a file between the manifest's read and the
    /// file's (its manifest is saved after its files, under the lock) is
    /// never reported as a changed hash. Hashes are recorded under the lock.
    /// A lock refused as `corrupt` (a compression of the VM that cannot be
    /// finished) leaves the first checks' report, the refusal among its
    /// problems.
    fn verify_one(&self, m: &Manifest, ctl: &Control) -> Result<VerifyReport> {
        let (report, new_hashes) = self.check_backup(m, ctl)?;
        if report.ok && new_hashes.is_empty() {
            return Ok(report);
        }
        // A lock refused for what the store holds (an interrupted
        // compression of the VM that cannot be finished) is reported with
        // this backup, not made the answer for every backup verified.
        let _lock = match self.wait_for_vm(&m.vm, &format!("verify of {}", m.id), ctl) {
            Ok(l) => l,
            Err(e) if matches!(e.kind, ErrorKind::Corrupt | ErrorKind::InvalidInput) => {
                let mut report = report;
                if report.ok {
                    log::warn!("backup {}: its hashes are not recorded: {}", m.id, e.message);
                } else {
                    report
                        .problems
                        .push(format!("not checked again under the VM's lock, which is refused: {}", e.message));
                }
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let (report, new_hashes, m) = if report.ok {
            (report, new_hashes, m.clone())
        } else {
            match self.load_manifest(&m.vm, &m.id) {
                Ok(fresh) if !fresh.removed => {
                    let (r, h) = self.check_backup(&fresh, ctl)?;
                    (r, h, fresh)
                }
                // Deleted meanwhile: what was found stands.
                _ => return Ok(report),
            }
        };
        if report.ok && !new_hashes.is_empty() {
            let mut fresh = self.load_manifest(&m.vm, &m.id)?;
            if fresh.compression == m.compression {
                for (name, h) in new_hashes {
                    if let Some(v) = fresh.volumes.iter_mut().find(|v| v.name == name) {
                        v.hash = Some(h);
                    }
                }
                fresh.save(&self.backup_dir(&fresh).join("manifest.json"))?;
            }
        }
        Ok(report)
    }

    /// Take the lock of `vm`, waiting (up to ten minutes, as `ctl` allows)
    /// while another operation holds it.
    fn wait_for_vm(&self, vm: &str, operation: &str, ctl: &Control) -> Result<VmLock> {
        let start = std::time::Instant::now();
        loop {
            match self.lock_vm(vm, operation) {
                Err(e) if e.kind == ErrorKind::Busy && start.elapsed() < std::time::Duration::from_secs(600) => {
                    ctl.check(operation)?;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// The checks of [`Store::verify`] on `m` as read, and the hashes to
    /// record (volumes without one).
    fn check_backup(&self, m: &Manifest, ctl: &Control) -> Result<(VerifyReport, Vec<(String, String)>)> {
        crate::crashpoint::pause_point(&format!("verify of backup {}: manifest read", m.id));
        let q = &self.qemu_img;
        let mut problems = Vec::new();
        let mut files_checked = 0;
        let mut chain_hashes = BTreeMap::new();
        let mut new_hashes = Vec::new();
        // The manifests of the chain, root first (one read for every volume).
        let manifests = self.chain(m);
        for v in &m.volumes {
            let file = self.backup_dir(m).join(&v.file);
            let files = match self.chain_files(m, &v.name) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(e.message);
                    continue;
                }
            };
            match q.check(&file, ctl) {
                Ok(r) if r.is_clean() => {}
                Ok(r) => problems.push(format!(
                    "{}: qemu-img check found {} corruptions, {} leaks, {} errors",
                    file.display(),
                    r.corruptions,
                    r.leaks,
                    r.check_errors
                )),
                Err(e) if e.kind == ErrorKind::Cancelled || e.kind == ErrorKind::Timeout => return Err(e),
                Err(e) => problems.push(e.message),
            }
            files_checked += 1;
            crate::crashpoint::pause_point(&format!("verify of backup {}: qemu-img info of {}", m.id, v.name));
            match q.info(&file, ctl) {
                Ok(info) => {
                    if info.backing_filename != v.backing {
                        problems.push(format!(
                            "{}: backing file is {:?}, the manifest says {:?}",
                            file.display(),
                            info.backing_filename,
                            v.backing
                        ));
                    }
                    if info.virtual_size != v.virtual_size {
                        problems.push(format!(
                            "{}: virtual size is {}, the manifest says {}",
                            file.display(),
                            info.virtual_size,
                            v.virtual_size
                        ));
                    }
                }
                // Stopped or out of time: not a problem of the backup.
                Err(e) if e.kind == ErrorKind::Cancelled || e.kind == ErrorKind::Timeout => return Err(e),
                Err(e) => problems.push(e.message),
            }
            // The manifests, as `files` are: each file is held against its
            // own backup's recorded hash (a parent deleted but kept for the
            // chain is checked only this way).
            let chain = match &manifests {
                Ok(c) if c.len() == files.len() => c,
                Ok(_) => {
                    problems.push(format!("backup {}: its chain changed while it was verified", m.id));
                    continue;
                }
                Err(e) => {
                    problems.push(e.message.clone());
                    continue;
                }
            };
            let (chain_hash, file_hashes) = crate::hash::hash_chain(&files, ctl)?;
            let own = file_hashes.last().cloned().expect("a chain has a file");
            match &v.hash {
                Some(h) if *h != own => problems.push(format!(
                    "{}: hash {own} differs from the recorded {h} of backup {}: the file changed since it was verified",
                    file.display(),
                    m.id
                )),
                Some(_) => {}
                None => new_hashes.push((v.name.clone(), own)),
            }
            for ((b, f), got) in chain.iter().zip(&files).zip(&file_hashes).take(files.len() - 1) {
                let recorded = b.volume(&v.name).ok().and_then(|bv| bv.hash.as_ref());
                if let Some(h) = recorded.filter(|h| *h != got) {
                    problems.push(format!(
                        "{}: hash {got} differs from the recorded {h} of backup {}, in the chain of backup {}: \
                         the file changed since it was verified",
                        f.display(),
                        b.id,
                        m.id
                    ));
                }
            }
            chain_hashes.insert(v.name.clone(), chain_hash);
        }
        let report = VerifyReport { id: m.id.clone(), ok: problems.is_empty(), problems, files_checked, chain_hashes };
        Ok((report, new_hashes))
    }
}
