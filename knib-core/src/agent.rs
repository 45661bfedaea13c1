//! The CloudStack KVM agent's operations as JSON requests (`agent.*` ops of
//! [`crate::api::call`]): path-based, stateless, one per agent command
//! wrapper. The Java facade maps each wrapper onto one of these.

use crate::error::{KnibError, Result};
use crate::progress::Control;

/// Run agent operation `op` (named `agent.<name>`).
pub fn call(op: &str, _request: &str, _ctl: &Control) -> Result<String> {
    Err(KnibError::invalid(format!("unknown operation {op:?}")))
}
