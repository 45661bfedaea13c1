//! Taking and recovering group backups (the libvirt part of
//! [`super`]; see its documentation for the steps and invariants).

use std::time::{Duration, Instant, SystemTime};

use super::super::manifest::rfc3339;
use super::super::{BackupOptions, Manifest, Store};
use super::gate::{Gate, GateState, Phase};
use super::{group_id, GroupMember, GroupOptions, GroupRecord, MemberSpec, OnFailure, GROUP_SCHEMA};
use crate::engine::live::LiveStep;
use crate::error::{ErrorKind, KnibError, Result};
use crate::fsio;
use crate::libvirt::{freeze, Hypervisor, Vm};
use crate::names;
use crate::progress::Control;

/// A member domain's agent: whether its XML has a guest agent channel.
fn has_agent_channel(vm: &Vm) -> Result<bool> {
    Ok(vm.xml()?.contains("org.qemu.guest_agent.0"))
}

/// [`freeze::freeze`] each of `vms` in parallel, each bounded by
/// `timeout`: for each, whether a freeze was sent (so it must be thawed)
/// and its error.
fn freeze_all(vms: &[&Vm], timeout: Duration) -> Vec<(bool, Option<String>)> {
    let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
    on_each(
        vms,
        |vm| match freeze::freeze(vm, secs) {
            freeze::Freeze::Frozen => (true, None),
            freeze::Freeze::Failed(e) => (true, Some(e.message)),
            freeze::Freeze::NotSent(e) => (false, Some(e.message)),
        },
        || (true, Some("the freeze panicked".into())),
    )
}

/// [`freeze::thaw`] each of `vms` in parallel: how each was thawed, or
/// the error of each left frozen.
fn thaw_all(vms: &[&Vm]) -> Vec<std::result::Result<freeze::Thawed, String>> {
    on_each(vms, |vm| freeze::thaw(vm).map_err(|e| e.message), || Err("the thaw panicked".into()))
}

/// `f` on each of `vms`, each on its own thread, all at once: the
/// results in order (`panicked` for a thread that panicked).
fn on_each<T: Send>(vms: &[&Vm], f: impl Fn(&Vm) -> T + Sync, panicked: impl Fn() -> T) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = vms.iter().map(|vm| s.spawn(move || f(vm))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panicked())).collect()
    })
}

/// The group's timing and each member's snapshot instant and quiescing,
/// into its record (`snaps`: the members' snapshot instants, in order).
fn stamp(record: &mut GroupRecord, snaps: &[SystemTime], freeze_to_thaw: Option<Duration>, frozen: &[bool]) {
    if let (Some(first), Some(last)) = (snaps.iter().min(), snaps.iter().max()) {
        record.instant = Some(rfc3339(*last));
        // Whole microseconds: a number the record's JSON gives back exactly
        // (`show` answers what `backup` answered).
        let us = last.duration_since(*first).unwrap_or_default().as_micros();
        record.snapshot_skew_ms = Some(us as f64 / 1000.0);
    }
    if snaps.len() == record.members.len() {
        for ((m, t), f) in record.members.iter_mut().zip(snaps).zip(frozen) {
            m.snapshot_at = Some(rfc3339(*t));
            m.quiesced = *f;
        }
    }
    record.freeze_to_thaw_ms = freeze_to_thaw.map(|d| d.as_micros() as f64 / 1000.0);
}

impl Store {
    /// Take a group backup (see the module documentation): one backup of
    /// each member at a common instant, recorded as a group.
    pub fn backup_group(&self, members: &[MemberSpec], opts: &GroupOptions, ctl: &Control) -> Result<GroupRecord> {
        if members.len() < 2 {
            return Err(KnibError::invalid("a group backup names at least two VMs"));
        }
        opts.check()?;
        let mut names_seen: Vec<&str> = Vec::new();
        for m in members {
            let n = m.name()?;
            names::validate("VM name", n)?;
            if names_seen.contains(&n) {
                return Err(KnibError::invalid(format!("VM {n} is named twice in the group")));
            }
            names_seen.push(n);
        }
        let hv = members
            .iter()
            .any(|m| m.domain.is_some())
            .then(|| Hypervisor::open(opts.connect.as_deref().unwrap_or(crate::libvirt::SYSTEM_URI)))
            .transpose()?;
        let vms: Vec<Option<Vm>> = members
            .iter()
            .map(|m| match (&m.domain, &hv) {
                (Some(d), Some(hv)) => hv.domain(d).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        // One file in two members (a disk given twice, or shared by two
        // domains) would be snapshotted and merged by both at once (it
        // destroyed the disk): refused before anything is written.
        let mut files: Vec<(&str, String, std::path::PathBuf)> = Vec::new();
        for (m, vm) in members.iter().zip(&vms) {
            let n = m.name()?;
            let disks: Vec<(String, std::path::PathBuf)> = match vm {
                Some(vm) => vm.disks()?.into_iter().map(|d| (d.target, d.file)).collect(),
                None => m.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect(),
            };
            for (vol, path) in disks {
                let same = files.iter().find(|(on, _, op)| *on != n && super::super::backup::one_file(op, &path));
                if let Some((on, ov, op)) = same {
                    return Err(KnibError::invalid(format!(
                        "disk {vol} of VM {n} ({}) and disk {ov} of VM {on} ({}) are the same file: a group backup takes each disk once; nothing was written",
                        path.display(),
                        op.display()
                    )));
                }
                files.push((n, vol, path));
            }
        }
        let running: Vec<bool> =
            vms.iter().map(|v| v.as_ref().map_or(Ok(false), Vm::is_running)).collect::<Result<_>>()?;
        let agent: Vec<bool> = vms
            .iter()
            .zip(&running)
            .map(|(v, r)| match v {
                Some(vm) if *r && opts.quiesce => has_agent_channel(vm),
                _ => Ok(false),
            })
            .collect::<Result<_>>()?;

        let id = group_id();
        let ids: Vec<String> = members.iter().map(|_| self.fresh_backup_id()).collect::<Result<_>>()?;
        let mut record = GroupRecord {
            schema: GROUP_SCHEMA,
            id: id.clone(),
            created: rfc3339(SystemTime::now()),
            state: "running".into(),
            members: members
                .iter()
                .zip(&ids)
                .zip(&running)
                .map(|((m, b), r)| GroupMember {
                    vm: m.name().expect("checked").to_string(),
                    domain: m.domain.is_some(),
                    backup: Some(b.clone()),
                    running: *r,
                    quiesced: false,
                    snapshot_at: None,
                    error: None,
                })
                .collect(),
            quiesce: opts.quiesce,
            on_failure: opts.on_failure,
            instant: None,
            freeze_to_thaw_ms: None,
            snapshot_skew_ms: None,
            recovered: false,
        };
        let journal = self.journal_file(&id);
        // Held while the group runs: `recover_groups` leaves it alone.
        let _running =
            self.lock_group(&id)?.ok_or_else(|| KnibError::internal(format!("group {id} is locked already")))?;
        crate::crashpoint::durable_step(&format!("journal of group {id}"));
        self.save_group(&journal, &record)?;

        let max_copying = match opts.max_parallel {
            Some(n) => n,
            None => super::super::settings::Settings::load(&self.root)?.group.max_concurrent_copies as usize,
        };
        let gate = Gate::new(members.len(), max_copying);
        let rollback = opts.on_failure == OnFailure::Rollback;
        let mut freeze_to_thaw = None;
        let mut frozen = vec![false; members.len()];
        // Each member's manifest names the group (what its delete and
        // recovery check).
        let member_opts = BackupOptions { group: Some(id.clone()), ..opts.backup.clone() };
        let results: Vec<Result<Manifest>> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let (gate, vm, bid, member_opts) = (&gate, vms[i].as_ref(), ids[i].as_str(), &member_opts);
                    s.spawn(move || {
                        let mctl = Control::new().with_deadline(ctl.deadline).with_cancel(ctl.cancel.clone());
                        let name = m.name().expect("checked");
                        // Where a member waits with its copies written (a
                        // point where a test can act).
                        let written_point = || {
                            crate::crashpoint::pause_point(&format!("group member {name}: written, waiting to publish"))
                        };
                        // A member that panics is failed like one that
                        // errs: the group aborts or finishes (before, the
                        // coordinator waited for it forever, and its copy
                        // slot was never given back).
                        let body = || match (vm, m) {
                            (Some(vm), _) => self.backup_domain_with(
                                vm,
                                member_opts,
                                false,
                                Some(bid),
                                &mut |step| match step {
                                    LiveStep::Snapshot => {
                                        gate.update(|st| st.ready[i] = true);
                                        gate.member_wait(i, &mctl, &[Phase::Snapshot, Phase::Copy, Phase::Publish])
                                    }
                                    LiveStep::Copy => {
                                        gate.update(|st| st.snapped[i] = Some(SystemTime::now()));
                                        gate.member_wait(i, &mctl, &[Phase::Copy, Phase::Publish])?;
                                        gate.take_slot(i, &mctl)
                                    }
                                    LiveStep::Publish => {
                                        gate.give_slot(i);
                                        if rollback {
                                            gate.update(|st| st.written[i] = true);
                                            written_point();
                                            gate.member_wait(i, &mctl, &[Phase::Publish])?;
                                        }
                                        Ok(())
                                    }
                                    _ => Ok(()),
                                },
                                &mctl,
                            ),
                            (None, m) => (|| {
                                // A plain-disk VM does not change: it is
                                // checked now and backed up after the thaw.
                                for d in &m.disks {
                                    if !d.path.exists() {
                                        return Err(KnibError::not_found(format!(
                                            "disk {}: {} does not exist",
                                            d.name,
                                            d.path.display()
                                        )));
                                    }
                                }
                                gate.update(|st| st.ready[i] = true);
                                gate.member_wait(i, &mctl, &[Phase::Snapshot, Phase::Copy, Phase::Publish])?;
                                gate.update(|st| st.snapped[i] = Some(SystemTime::now()));
                                gate.member_wait(i, &mctl, &[Phase::Copy, Phase::Publish])?;
                                gate.take_slot(i, &mctl)?;
                                self.backup_with(
                                    m.vm.as_deref().expect("checked"),
                                    &m.disks,
                                    member_opts,
                                    Some(bid),
                                    &mut || {
                                        gate.give_slot(i);
                                        if rollback {
                                            gate.update(|st| st.written[i] = true);
                                            written_point();
                                            gate.member_wait(i, &mctl, &[Phase::Publish])?;
                                        }
                                        Ok(())
                                    },
                                    &mctl,
                                )
                            })(),
                        };
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
                            let what = crate::panic_log::payload_message(p.as_ref());
                            log::error!(
                                "group {}: the backup of VM {name} panicked: {what}",
                                member_opts.group.as_deref().unwrap_or("?")
                            );
                            // What it left is not known: its VM is for
                            // `recover`.
                            Err(KnibError::internal(format!("the backup of VM {name} panicked: {what}"))
                                .with_vm_consistent(false))
                        });
                        gate.give_slot(i);
                        gate.update(|st| {
                            st.done[i] = true;
                            if let Err(e) = &r {
                                st.failed[i] = Some(e.to_string());
                            }
                        });
                        r
                    })
                })
                .collect();

            // 1. Every member planned, or one failed.
            let planned = gate.wait(ctl, |st| st.failed.iter().any(Option::is_some) || st.ready.iter().all(|r| *r));
            let first_failure = |st: &GateState| {
                st.failed
                    .iter()
                    .enumerate()
                    .find_map(|(i, f)| f.as_ref().map(|f| format!("member {}: {f}", members[i].name().unwrap_or("?"))))
            };
            let failed_early = planned.is_err() || first_failure(&gate.lock()).is_some();
            if failed_early {
                let why = first_failure(&gate.lock()).unwrap_or_else(|| "cancelled".into());
                gate.abort(why);
            } else {
                // 2. and 3. Freeze, snapshot, thaw.
                let started = Instant::now();
                let to_freeze: Vec<usize> = (0..members.len()).filter(|i| agent[*i]).collect();
                let freeze_vms: Vec<&Vm> = to_freeze.iter().map(|i| vms[*i].as_ref().expect("a domain")).collect();
                let mut ok = true;
                if !freeze_vms.is_empty() {
                    ctl.report("group backup: freezing the guests", 10.0);
                    // Before the freeze, removed once every guest is thawed:
                    // a group killed in between has `group recover` thaw them.
                    let names: Vec<&str> = freeze_vms.iter().map(|vm| vm.name()).collect();
                    let answers = match self.save_freeze_marker(&id, &names) {
                        Ok(()) => freeze_all(&freeze_vms, opts.freeze_timeout),
                        Err(e) => {
                            let why = format!("writing the group's freeze marker: {e}");
                            freeze_vms.iter().map(|_| (false, Some(why.clone()))).collect()
                        }
                    };
                    crate::crashpoint::helper_step(&format!(
                        "snapshots of group {id}, its guests frozen: {}",
                        names.join(", ")
                    ));
                    for (k, (sent, e)) in to_freeze.iter().zip(&answers) {
                        frozen[*k] = *sent;
                        if let Some(e) = e {
                            ok = false;
                            gate.abort(format!(
                                "the guest of {} could not be frozen: {e}",
                                members[*k].name().unwrap_or("?")
                            ));
                        }
                    }
                }
                if ok {
                    gate.update(|st| st.phase = Phase::Snapshot);
                    let bound = opts.freeze_timeout;
                    let snapped = gate.wait(ctl, |st| {
                        st.failed.iter().any(Option::is_some)
                            || st.snapped.iter().all(Option::is_some)
                            || (!freeze_vms.is_empty() && started.elapsed() > bound)
                    });
                    let st = gate.lock();
                    let all = st.snapped.iter().all(Option::is_some);
                    let why = first_failure(&st);
                    drop(st);
                    if snapped.is_err() || !all {
                        gate.abort(why.unwrap_or_else(|| {
                            format!("freezing and snapshotting the group took longer than {} s", bound.as_secs())
                        }));
                    }
                }
                let sent: Vec<usize> = to_freeze.iter().copied().filter(|k| frozen[*k]).collect();
                if !sent.is_empty() {
                    // Every guest a freeze was sent to, until it says it is
                    // thawed; one left frozen fails the group.
                    let sent_vms: Vec<&Vm> = sent.iter().map(|i| vms[*i].as_ref().expect("a domain")).collect();
                    let mut left_frozen: Vec<&str> = Vec::new();
                    for ((k, vm), t) in sent.iter().zip(&sent_vms).zip(thaw_all(&sent_vms)) {
                        let member = members[*k].name().unwrap_or("?");
                        match t {
                            Ok(freeze::Thawed::Cleanly) => {}
                            // Thawed, but the freeze may not have held
                            // until the snapshots: not quiesced.
                            Ok(freeze::Thawed::Early(why)) => {
                                log::error!("group {id}: thawing the guest of {member}: {why}");
                                gate.abort(format!("member {member}: {why}: the group is not taken as quiesced"));
                            }
                            Err(e) => {
                                left_frozen.push(vm.name());
                                log::error!("group {id}: thawing the guest of {member}: {e}");
                                gate.abort(format!("member {member}: {e}"));
                            }
                        }
                    }
                    // The marker names only the guests that may be frozen
                    // still, for `group recover`; none, it goes.
                    if left_frozen.is_empty() {
                        self.forget_freeze(&id);
                    } else if let Err(e) = self.save_freeze_marker(&id, &left_frozen) {
                        log::warn!("group {id}: the freeze marker still names every guest frozen: {e}");
                    }
                    freeze_to_thaw = Some(started.elapsed());
                } else if !freeze_vms.is_empty() {
                    // No freeze was sent: nothing is frozen by this group.
                    self.forget_freeze(&id);
                }
                // 4. Copies and merges.
                let aborted = gate.lock().phase == Phase::Abort;
                if !aborted {
                    // The journal keeps the instant, for a record `recover`
                    // writes after a crash.
                    let snaps: Vec<SystemTime> = gate.lock().snapped.iter().flatten().copied().collect();
                    stamp(&mut record, &snaps, freeze_to_thaw, &frozen);
                    if let Err(e) = self.save_group(&journal, &record) {
                        gate.abort(format!("writing the group's journal: {e}"));
                    }
                }
                let aborted = gate.lock().phase == Phase::Abort;
                if !aborted {
                    gate.update(|st| st.phase = Phase::Copy);
                    ctl.report("group backup: copying", 30.0);
                    if rollback {
                        let written =
                            gate.wait(ctl, |st| st.failed.iter().any(Option::is_some) || st.written.iter().all(|w| *w));
                        let why = first_failure(&gate.lock());
                        // A cancel or the time budget ending while members
                        // copy aborts the group (`wait` set `Abort`): no
                        // member may publish then, though none failed yet.
                        match (why, written) {
                            (Some(w), _) => gate.abort(w),
                            (None, Err(e)) => gate.abort(e.message),
                            (None, Ok(())) => gate.update(|st| st.phase = Phase::Publish),
                        }
                    }
                }
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(KnibError::internal("a group member's thread panicked"))))
                .collect()
        });

        let st = gate.lock();
        let snaps: Vec<SystemTime> = st.snapped.iter().flatten().copied().collect();
        let aborted = st.phase == Phase::Abort;
        let reason = st.abort_reason.clone();
        drop(st);
        // A member that failed after its backup was published (its merge
        // or the end of its job: "the backup is stored, but ...") keeps its
        // backup in the record, with its error: what counts is whether the
        // manifest is there, as recovery judges it.
        let mut published = 0;
        for (m, r) in record.members.iter_mut().zip(&results) {
            match r {
                Ok(_) => published += 1,
                Err(e) => {
                    let stored = m.backup.as_deref().is_some_and(|b| self.load_manifest(&m.vm, b).is_ok());
                    if stored {
                        published += 1;
                    } else {
                        m.backup = None;
                    }
                    m.error = Some(e.to_string());
                }
            }
        }
        if aborted || published == 0 {
            fsio::remove_durable(&journal)?;
            fsio::remove_if_exists(&self.lock_file(&id))?;
            let why = reason.unwrap_or_else(|| "every member failed".into());
            let detail: Vec<String> =
                record.members.iter().filter_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.vm))).collect();
            let consistent = results.iter().all(|r| r.as_ref().err().is_none_or(|e| e.vm_consistent != Some(false)));
            let e = KnibError::new(
                ErrorKind::Cancelled,
                format!(
                    "group backup {id} failed, no member was published: {why}{}",
                    if detail.is_empty() { String::new() } else { format!(" ({})", detail.join("; ")) }
                ),
            );
            return Err(e.with_vm_consistent(consistent));
        }
        record.state = if published == members.len() { "complete" } else { "partial" }.into();
        stamp(&mut record, &snaps, freeze_to_thaw, &frozen);
        crate::crashpoint::durable_step(&format!("record of group {id}"));
        self.save_group(&self.record_file(&id), &record)?;
        fsio::remove_durable(&journal)?;
        fsio::remove_if_exists(&self.lock_file(&id))?;
        fsio::sync_dir(&self.groups_dir())?;
        Ok(record)
    }
}
