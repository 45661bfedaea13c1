//! Recovering group backups a crash interrupted (see [`super`]), and the
//! lock a running group holds so that recovery leaves it alone.

use std::fs;
use std::path::Path;

use super::super::lock::VmLock;
use super::super::Store;
use super::{GroupRecord, OnFailure};
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::Hypervisor;
use crate::names;
use crate::progress::Control;

/// The content of [`Store::freeze_marker`].
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeMarker {
    schema: u32,
    /// The domains the group froze (or was about to).
    domains: Vec<String>,
}

/// [`Store::freeze_marker`] of group `id`, under the store.
fn freeze_marker_rel(id: &str) -> std::path::PathBuf {
    Path::new("groups").join(format!(".{id}.frozen"))
}

impl Store {
    /// The file a quiesced group backup writes right before it freezes its
    /// guests, and removes once every one is thawed: `group recover` of a
    /// group killed in between thaws those of its domain members that are
    /// frozen (only then: a guest frozen by another tool is that tool's).
    pub(super) fn freeze_marker(&self, id: &str) -> std::path::PathBuf {
        self.root.join(freeze_marker_rel(id))
    }

    /// Write [`Store::freeze_marker`] of group `id`, naming the domains
    /// about to be frozen.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(super) fn save_freeze_marker(&self, id: &str, domains: &[&str]) -> Result<()> {
        self.ensure_dir(Path::new("groups"), "groups directory")?;
        let m = FreezeMarker { schema: 1, domains: domains.iter().map(|d| d.to_string()).collect() };
        fsio::write_atomic(&self.freeze_marker(id), &serde_json::to_vec(&m).expect("a marker serializes"))
    }

    /// Every guest is thawed: remove [`Store::freeze_marker`] (a marker left
    /// behind only makes a recover thaw guests frozen since, and is logged).
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(super) fn forget_freeze(&self, id: &str) {
        if let Err(e) = fsio::remove_if_exists(&self.freeze_marker(id)) {
            log::warn!("{e}");
        }
    }

    /// The lock file of a running group backup.
    pub(super) fn lock_file(&self, id: &str) -> std::path::PathBuf {
        self.groups_dir().join(format!(".{id}.lock"))
    }

    /// Take the lock of group `id` (a record lock on `.<id>.lock`, through
    /// the registry of [`VmLock`], so that threads of this process exclude
    /// each other too and no other descriptor of the file comes and goes
    /// while it is held, which would drop it): `None` when another
    /// operation, of this process or another, holds it (the group is
    /// running there). A link in place of the lock file is `corrupt`, never
    /// followed: it must not make knib create or open a file outside the
    /// store.
    pub(super) fn lock_group(&self, id: &str) -> Result<Option<VmLock>> {
        self.ensure_dir(Path::new("groups"), "groups directory")?;
        let p = self.lock_file(id);
        // Checked without opening it (a FIFO would make an open wait, and
        // any descriptor closed drops the process's lock); the open itself
        // follows no link.
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(KnibError::corrupt(format!(
                    "lock file {} is a symbolic link: knib follows no link inside a store",
                    p.display()
                )))
            }
            Ok(m) if !m.is_file() => {
                return Err(KnibError::corrupt(format!("lock file {} is not a regular file", p.display())))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KnibError::io("cannot stat", &p, e)),
        }
        match VmLock::acquire(&p, &format!("group {id}"), &format!("group backup {id}")) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind == ErrorKind::Busy => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Finish every group backup a crash interrupted (see the module
    /// documentation): the records written, with what each member left,
    /// and what the crash left half-written removed. A group running, in
    /// another process or in this one (its lock held), is left alone.
    pub fn recover_groups(&self, connect: Option<&str>, ctl: &Control) -> Result<Vec<GroupRecord>> {
        let dir = self.groups_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(KnibError::io("cannot list", &dir, e)),
        };
        // The groups something of which is left: a journal, a lock, a
        // half-written journal or record.
        let mut ids: Vec<String> = Vec::new();
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix('.') else { continue };
            let rest = rest.trim_start_matches('.');
            let id = [".journal.json.part", ".journal.json", ".json.part", ".lock", ".frozen.part", ".frozen"]
                .iter()
                .find_map(|sfx| rest.strip_suffix(sfx));
            if let Some(id) = id.filter(|id| names::validate("group id", id).is_ok()) {
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        let mut out = Vec::new();
        let mut marker_errors: Vec<KnibError> = Vec::new();
        for id in ids {
            let Some(_lock) = self.lock_group(&id)? else {
                log::info!("group {id} is running (its lock is held); it is left alone");
                continue;
            };
            // Killed between its freeze and its thaw, or its thaw failed
            // (the group may have ended, and written its record or not). A
            // marker that cannot be acted on (damaged, or a thaw failed) is
            // kept and reported at the end; the other groups are recovered.
            let thawed = match self.thaw_left_frozen(&id, connect) {
                Ok(()) => true,
                Err(e) => {
                    let e = e.context(format!("group {id}: thawing the guests its freeze marker names"));
                    log::error!("{e}");
                    marker_errors.push(e);
                    false
                }
            };
            // A record of the group (valid, at its own id) means it
            // finished: the crash came before its journal was removed. The
            // journal is only removed then; replaying it would judge the
            // members' backups again (one deleted since, by retention or a
            // delete, made "rollback" delete the others, and "keep"
            // rewrite the record).
            let record_rel = Path::new("groups").join(format!("{id}.json"));
            let finished = match self.load_group(&record_rel, &id) {
                Ok(r) => r.is_some(),
                Err(e) => {
                    log::warn!("group {id}: its record cannot be used ({e}); it is recovered from its journal");
                    false
                }
            };
            let journal_rel = Path::new("groups").join(format!(".{id}.journal.json"));
            if finished {
                log::info!(
                    "group {id} finished (its record is written); its journal is removed, its record and backups are left as they are"
                );
            } else if let Some(r) = self.load_group(&journal_rel, &id)? {
                if let Some(r) = self.recover_group(r, connect, ctl)? {
                    out.push(r);
                }
            }
            let marker = thawed.then(|| self.freeze_marker(&id));
            for f in [
                Some(self.journal_file(&id)),
                Some(dir.join(format!("..{id}.journal.json.part"))),
                Some(dir.join(format!(".{id}.json.part"))),
                Some(dir.join(format!("..{id}.frozen.part"))),
                marker,
                Some(self.lock_file(&id)),
            ]
            .into_iter()
            .flatten()
            {
                fsio::remove_if_exists(&f)?;
            }
        }
        match marker_errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// When group `id` left its [`Store::freeze_marker`] (killed between its
    /// freeze and its thaw, or a thaw failed), thaw the domains it names
    /// that are running and frozen: their I/O hangs until then. The marker
    /// is read as the store's JSON files are (confined, capped, names
    /// checked); one that does not parse is `corrupt`.
    fn thaw_left_frozen(&self, id: &str, connect: Option<&str>) -> Result<()> {
        let rel = freeze_marker_rel(id);
        let Some(text) = super::super::confine::read(&self.root, &rel, "freeze marker")? else { return Ok(()) };
        let m: FreezeMarker = crate::json::from_slice(&text)
            .map_err(|e| KnibError::corrupt(format!("freeze marker of group {id} is corrupted: {e}")))?;
        for d in &m.domains {
            names::validate("domain name", d).map_err(|e| e.context(format!("freeze marker of group {id}")))?;
        }
        if m.domains.is_empty() {
            return Ok(());
        }
        let hv = Hypervisor::open(connect.unwrap_or(crate::libvirt::SYSTEM_URI))?;
        for d in &m.domains {
            match hv.domain(d) {
                Ok(vm) => {
                    if vm.is_running()? && crate::libvirt::freeze::thaw_if_frozen(&vm)? {
                        log::warn!("group {id}: thawed the guest of {d}, left frozen by the group");
                    }
                }
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Recover the members of one interrupted group and write its record
    /// (`None` when none of its members' backups is left).
    fn recover_group(&self, mut r: GroupRecord, connect: Option<&str>, ctl: &Control) -> Result<Option<GroupRecord>> {
        let id = r.id.clone();
        let hv = r
            .members
            .iter()
            .any(|m| m.domain)
            .then(|| Hypervisor::open(connect.unwrap_or(crate::libvirt::SYSTEM_URI)))
            .transpose()?;
        for m in &mut r.members {
            if let (true, Some(hv)) = (m.domain, &hv) {
                match hv.domain(&m.vm) {
                    Ok(vm) => {
                        self.recover_domain(&vm, ctl).map_err(|e| e.context(format!("group {id}: member {}", m.vm)))?;
                    }
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            // Published when its manifest is there; a manifest that cannot
            // be read (I/O, permissions, damage) stops the recovery rather
            // than count as unpublished, which in rollback mode would delete
            // the other members' good backups.
            let exists = match m.backup.as_deref() {
                None => false,
                Some(b) => match self.load_manifest(&m.vm, b) {
                    // A journal naming a backup the group did not take
                    // (with "rollback" its recovery deletes them).
                    Ok(manifest) => {
                        super::member_of(&id, m, &manifest).map_err(|e| e.context(format!("journal of group {id}")))?;
                        true
                    }
                    Err(e) if e.kind == ErrorKind::NotFound => false,
                    Err(e) => {
                        return Err(e.context(format!("group {id}: member {}: its backup {b}", m.vm)));
                    }
                },
            };
            if !exists {
                m.backup = None;
                m.error = Some("interrupted (finished by recover)".into());
            }
        }
        let published: Vec<(String, String)> =
            r.members.iter().filter_map(|m| m.backup.clone().map(|b| (m.vm.clone(), b))).collect();
        if published.len() < r.members.len() && r.on_failure == OnFailure::Rollback {
            for (vm, b) in &published {
                log::warn!("group {id} (rollback): deleting backup {b} of {vm}, published before the crash");
                self.delete(b)?;
            }
            return Ok(None);
        }
        if published.is_empty() {
            return Ok(None);
        }
        r.state = if published.len() == r.members.len() { "complete" } else { "partial" }.into();
        r.recovered = true;
        self.save_group(&self.record_file(&id), &r)?;
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_link_in_place_of_a_group_lock_is_corrupt_and_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("store"), d.path().join("outside"));
        std::fs::create_dir_all(root.join("groups")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let target = outside.join("nologin");
        let lock = root.join("groups/.evil.lock");
        symlink(&target, &lock).unwrap();
        let store = Store::open(&root).unwrap();
        let want = format!("lock file {} is a symbolic link: knib follows no link inside a store", lock.display());
        let e = store.lock_group("evil").unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Corrupt, want.as_str()));
        // Recovery finds the group by its lock file, and refuses it the same.
        let e = store.recover_groups(None, &Control::new()).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Corrupt, want.as_str()));
        // A FIFO in its place: refused at once, not waited on.
        let fifo = root.join("groups/.fifo.lock");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = store.lock_group("fifo").unwrap_err();
        assert_eq!(e.message, format!("lock file {} is not a regular file", fifo.display()));
        assert!(std::fs::symlink_metadata(&target).is_err(), "the link's target outside the store was created");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(std::fs::symlink_metadata(&lock).unwrap().file_type().is_symlink());
    }

    /// A freeze marker that does not parse (or names no domain knib would
    /// name) is `corrupt`, named, and kept; the other groups are recovered
    /// all the same (their leftovers removed) before it is reported.
    #[test]
    fn a_damaged_freeze_marker_is_kept_and_reported_after_the_other_groups() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::create(d.path().join("store")).unwrap();
        std::fs::create_dir_all(store.groups_dir()).unwrap();
        let (bad, other) = ("group-20261203-000000000-aaaa", "group-20261203-000000000-bbbb");
        std::fs::write(store.freeze_marker(bad), b"{not json").unwrap();
        let stale = store.groups_dir().join(format!("..{other}.frozen.part"));
        std::fs::write(&stale, b"{").unwrap();
        let e = store.recover_groups(None, &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains(&format!("freeze marker of group {bad}")), "{e}");
        assert!(store.freeze_marker(bad).exists(), "the damaged marker was removed unread");
        assert!(!stale.exists(), "the other group's half-written marker was left");
        std::fs::write(store.freeze_marker(bad), br#"{"schema":1,"domains":["../x"]}"#).unwrap();
        let e = store.recover_groups(None, &Control::new()).unwrap_err();
        assert!(e.message.contains("domain name"), "{e}");
        assert!(store.freeze_marker(bad).exists());
    }

    #[test]
    fn recovery_leaves_a_group_running_in_this_process_alone() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::create(d.path().join("store")).unwrap();
        let id = "group-20261203-000000000-abcd";
        let held = store.lock_group(id).unwrap().expect("the lock is free");
        let lock = store.lock_file(id);
        // Another thread of this process (the C and JNI interfaces run
        // operations in parallel) finds the group running.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(store.lock_group(id).unwrap().is_none());
                assert!(store.recover_groups(None, &Control::new()).unwrap().is_empty());
            });
        });
        assert!(lock.exists(), "recovery removed a running group's lock file");
        // And another process still sees the lock held.
        let st = std::process::Command::new("python3")
            .args(["-c", "import fcntl,sys; f=open(sys.argv[1],'r+');\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); sys.exit(0)\nexcept OSError: sys.exit(3)"])
            .arg(&lock)
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(3), "the running group's lock was dropped");
        drop(held);
        assert!(store.lock_group(id).unwrap().is_some());
    }
}
