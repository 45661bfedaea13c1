//! How a VM's changes are found between backups.

use serde::{Deserialize, Serialize};

use crate::error::{KnibError, Result};

/// The backup method of a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupMethod {
    /// A disk-only external snapshot puts a new delta on each disk; the old
    /// delta is copied to the store and merged into the base (KBOSS).
    #[default]
    Snapshot,
    /// libvirt checkpoints and QEMU dirty bitmaps: a pull-mode backup job
    /// exports the disks over NBD, the dirty clusters are copied; the disk
    /// chain is never touched.
    Bitmap,
}

impl BackupMethod {
    /// "snapshot" or "bitmap".
    pub fn as_str(self) -> &'static str {
        match self {
            BackupMethod::Snapshot => "snapshot",
            BackupMethod::Bitmap => "bitmap",
        }
    }
}

impl std::str::FromStr for BackupMethod {
    type Err = KnibError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "snapshot" => Ok(BackupMethod::Snapshot),
            "bitmap" => Ok(BackupMethod::Bitmap),
            _ => Err(KnibError::invalid(format!("backup method {s:?} is not snapshot or bitmap"))),
        }
    }
}

impl std::fmt::Display for BackupMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
