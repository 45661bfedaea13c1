//! File-level restore: filesystems and files of a backup, read straight from
//! its qcow2 chain (`files.*` ops of [`crate::api::call`]).

use crate::error::{KnibError, Result};
use crate::progress::Control;

/// Run file operation `op` (named `files.<name>`).
pub fn call(op: &str, _request: &str, _ctl: &Control) -> Result<String> {
    Err(KnibError::invalid(format!("unknown operation {op:?}")))
}
