//! Settings of one VM in a store: `STORE/vms/<vm>/settings.json`, optional
//! (missing = every default), JSON with a `schema` field (1):
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `backup_method` | how backups of a libvirt domain find its changes: `snapshot` (external snapshot, copy, merge) or `bitmap` (checkpoints and dirty bitmaps; running domains) | `"snapshot"` |
//!
//! An unknown key or a value of the wrong type is refused ("invalid
//! input", naming it).

use serde::{Deserialize, Serialize};

use super::Store;
use crate::engine::method::BackupMethod;
use crate::error::{KnibError, Result};
use crate::fsio;

/// The file's name, in the VM's directory.
pub const VM_SETTINGS_FILE: &str = "settings.json";

/// The settings of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    /// How backups of the VM find its changes.
    #[serde(default)]
    pub backup_method: BackupMethod,
}

#[derive(Serialize)]
struct VmSettingsFile {
    schema: u32,
    #[serde(flatten)]
    settings: VmSettings,
}

impl Store {
    /// The settings of `vm` (every default when it has none).
    pub fn vm_settings(&self, vm: &str) -> Result<VmSettings> {
        crate::names::validate("VM name", vm)?;
        let rel = Self::vm_rel(vm).join(VM_SETTINGS_FILE);
        let Some(t) = super::confine::read(&self.root, &rel, "VM settings")? else {
            return Ok(VmSettings::default());
        };
        let v: serde_json::Value = crate::json::from_slice(&t).map_err(|e| {
            KnibError::invalid(format!("settings of VM {vm} ({}): {e}", self.root.join(&rel).display()))
        })?;
        match v.get("schema").and_then(|s| s.as_u64()) {
            Some(1) => {}
            _ => {
                return Err(KnibError::invalid(format!(
                    "settings of VM {vm} ({}): `schema` must be 1",
                    self.root.join(&rel).display()
                )))
            }
        }
        let mut obj = v;
        if let Some(o) = obj.as_object_mut() {
            o.remove("schema");
        }
        serde_json::from_value(obj)
            .map_err(|e| KnibError::invalid(format!("settings of VM {vm} ({}): {e}", self.root.join(&rel).display())))
    }

    /// Record the settings of `vm` (under its lock: not while it is
    /// being backed up).
    pub fn set_vm_settings(&self, vm: &str, s: &VmSettings) -> Result<()> {
        let _lock = self.lock_vm(vm, &format!("settings of {vm}"))?;
        let f = VmSettingsFile { schema: 1, settings: s.clone() };
        let p = self.vm_dir(vm).join(VM_SETTINGS_FILE);
        fsio::write_atomic(&p, &serde_json::to_vec_pretty(&f).expect("settings serialize"))?;
        log::info!("VM {vm}: backup method {}", s.backup_method);
        Ok(())
    }
}
