//! The vault's records of the quick restores it serves: one small object
//! per served domain, `serving/<backup>/<host>/<domain>.json`, written
//! before the server starts and removed when it is stopped, so that a
//! delete on any host never removes the objects a running guest reads
//! through the exports (its reads of clusters not yet pulled would fail).
//!
//! # Invariants
//!
//! - A backup with a live record is not expunged: deleting it is `busy`,
//!   naming the host and the domain; a removed ancestor reached by a
//!   delete's cascade is kept (marked removed) instead.
//! - A delete looks for records before it removes the manifest and again
//!   after (putting the manifest back when one appeared), and a quick
//!   restore reads the manifest after its record is written: with the
//!   S3 store's read-after-write consistency, either the delete sees the
//!   record or the quick restore finds the backup gone.
//! - A record of this host whose directory is gone is stale (the
//!   consolidation that ended it could not reach the vault, or the host
//!   restarted and the directory was removed by hand): a delete removes
//!   it. A record of another host is live until that host's
//!   consolidation removes it, or an operator removes the object.
//! - A record is vault content, so hostile input: capped, parsed without
//!   unknown fields, and its directory is only looked at, never opened.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Vault;
use crate::error::{KnibError, Result};
use crate::names;

/// The most bytes of a record.
const MAX_RECORD: u64 = 64 << 10;

/// What a record holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Serving {
    schema: u32,
    backup: String,
    host: String,
    domain: String,
    /// The directory of the server's sockets, on `host`.
    dir: PathBuf,
    /// When the quick restore started (UTC, RFC 3339).
    created: String,
}

/// The key of the record of `backup` served to `domain` on `host`.
fn record_rel(backup: &str, host: &str, domain: &str) -> String {
    format!("serving/{backup}/{host}/{domain}.json")
}

/// This host's name as a record names it: it must be a plain name.
#[cfg(feature = "libvirt")]
fn this_host() -> Result<String> {
    let host = crate::catalog::jobs::hostname();
    names::validate("host name", &host).map_err(|e| {
        e.context("a quick restore from a vault records the host it is served on, by its name".to_string())
    })?;
    Ok(host)
}

impl Vault {
    /// Record that `backup` is served to `domain` from `dir` on this host,
    /// then read the backup's manifest again: a delete that removed it
    /// meanwhile makes this fail (not found), the record removed.
    #[cfg(feature = "libvirt")]
    pub(super) fn record_serving(&self, backup: &str, domain: &str, dir: &std::path::Path) -> Result<()> {
        names::validate("backup id", backup)?;
        names::validate("domain name", domain)?;
        let host = this_host()?;
        let rec = Serving {
            schema: 1,
            backup: backup.to_string(),
            host: host.clone(),
            domain: domain.to_string(),
            dir: dir.to_path_buf(),
            created: crate::catalog::manifest::rfc3339(std::time::SystemTime::now()),
        };
        let rel = record_rel(backup, &host, domain);
        let text = serde_json::to_vec_pretty(&rec).expect("a record serializes");
        self.put_small(&rel, text, object_store::PutMode::Overwrite, "quick restore record")?;
        if let Err(e) = self.show(backup) {
            let _ = self.delete_key(&rel);
            return Err(e);
        }
        Ok(())
    }

    /// Remove the record of `backup` served to `domain` on this host.
    #[cfg(feature = "libvirt")]
    pub(super) fn remove_serving(&self, backup: &str, domain: &str) -> Result<()> {
        names::validate("backup id", backup)?;
        names::validate("domain name", domain)?;
        self.delete_key(&record_rel(backup, &this_host()?, domain))
    }

    /// The live records of `backup`, as "domain D on host H (since T)";
    /// stale ones of this host are removed (logged).
    pub(super) fn served_to(&self, backup: &str) -> Result<Vec<String>> {
        names::validate("backup id", backup)?;
        let me = crate::catalog::jobs::hostname();
        let mut out = Vec::new();
        for rel in self.keys_under(&format!("serving/{backup}"))? {
            let shown = self.inner.show(&self.key(&rel));
            let Some(text) = self.get_small(&rel, MAX_RECORD, "quick restore record")? else { continue };
            let rec: Serving = crate::json::from_slice(&text)
                .map_err(|e| KnibError::corrupt(format!("quick restore record {shown} is corrupted: {e}")))?;
            let (host, domain) = (rec.host.as_str(), rec.domain.as_str());
            if rec.schema != 1
                || rec.backup != backup
                || names::validate("host name", host).is_err()
                || names::validate("domain name", domain).is_err()
                || rel != record_rel(backup, host, domain)
            {
                return Err(KnibError::corrupt(format!(
                    "quick restore record {shown} is not what knib writes for backup {backup} (it must be serving/{backup}/<host>/<domain>.json naming them)"
                )));
            }
            if host == me && std::fs::symlink_metadata(&rec.dir).is_err() {
                log::warn!(
                    "vault {}: the quick restore of backup {backup} to domain {domain} on this host ended ({} is gone): its record is removed",
                    self.location(),
                    rec.dir.display()
                );
                self.delete_key(&rel)?;
                continue;
            }
            let since: String = rec.created.chars().take(40).collect();
            out.push(format!("domain {domain} on host {host} (since {since}; record {shown})"));
        }
        Ok(out)
    }
}
