//! The sync job's attempt (see [`crate::catalog::jobs`]): the backups of the
//! job's VM that the vault of the settings lacks, sent by
//! [`Vault::sync_from`].

use std::sync::Arc;

use super::{credentials_refused, SyncOptions, Vault};
use crate::catalog::jobs::{Job, SyncAttempt, SyncRunner};
use crate::catalog::settings::SyncSettings;
use crate::catalog::Store;
use crate::error::{ErrorKind, KnibError};
use crate::progress::Control;

/// The [`SyncRunner`] to give [`crate::catalog::jobs::run_jobs`]: it opens
/// `sync.vault` and sends the VM's backups the vault lacks with the
/// settings' rate limit, part size and parts in flight. No vault set, a
/// bad location, refused credentials, or objects of the vault lost that
/// this store has the backup of but cannot send again (the report's
/// `unmended`) fail the job at once; anything else is retried.
pub fn sync_runner() -> SyncRunner {
    Arc::new(attempt)
}

fn attempt(store: &Store, job: &Job, settings: &SyncSettings, ctl: &Control) -> SyncAttempt {
    let Some(location) = &settings.vault else {
        return SyncAttempt::Refused(KnibError::invalid(format!(
            "store {} has no vault for sync jobs: set \"sync.vault\" in its knib.json",
            store.root().display()
        )));
    };
    let opts = SyncOptions {
        vm: Some(job.vm.clone()),
        part_size: settings.part_size_mib as usize * (1 << 20),
        parallel_parts: settings.parallel_parts as usize,
        rate_limit_mbps: settings.rate_limit_mbps,
        check: false,
    };
    let sent = Vault::open(location).and_then(|v| v.sync_from(store, &opts, ctl));
    match sent {
        // Objects of the vault lost that this store has the backup of and
        // could not send again: no retry mends them, and a job said done
        // would hide that the vault cannot restore those backups (damage
        // to backups only the vault keeps is in the report's `damaged`).
        Ok(report) if !report.unmended.is_empty() => SyncAttempt::Refused(KnibError::corrupt(format!(
            "vault {location} holds backups of {} that cannot be restored and this store could not mend: {} (sent meanwhile: {}); see knib verify --store {location}",
            job.vm,
            report.unmended.join(", "),
            if report.sent.is_empty() { "nothing".to_string() } else { report.sent.join(", ") },
        ))),
        Ok(report) => {
            log::info!(
                "job {}: sent {} backup(s) of {} to {location} ({} bytes)",
                job.id,
                report.sent.len(),
                job.vm,
                report.bytes_sent
            );
            SyncAttempt::Done(serde_json::to_value(&report).expect("a sync report serializes"))
        }
        Err(e) if credentials_refused(&e) || e.kind == ErrorKind::InvalidInput => SyncAttempt::Refused(e),
        Err(e) => SyncAttempt::Failed(e),
    }
}
