//! QEMU-specific calls: the guest agent and the QEMU monitor, through
//! libvirt (`libvirt-qemu`). Monitor commands taint the domain in libvirt's
//! eyes ("custom-monitor"); knib uses them in tests and diagnostics only.

use super::{virt_error, Vm};
use crate::error::{KnibError, Result};

/// Send `json_cmd` (a guest agent command such as
/// `{"execute":"guest-sync","arguments":{"id":1}}`) to the domain's guest
/// agent and return its JSON answer. `timeout_secs` is how long to wait for
/// the answer: a positive number of seconds, `0` not to wait, `-1` for
/// libvirt's default, `-2` to wait forever.
pub fn qemu_agent_command(vm: &Vm, json_cmd: &str, timeout_secs: i32) -> Result<String> {
    if timeout_secs < -2 {
        return Err(KnibError::invalid(format!("guest agent command timeout {timeout_secs} is below -2")));
    }
    vm.dom()
        .qemu_agent_command(json_cmd, timeout_secs)
        .map_err(|e| virt_error(format_args!("guest agent command {json_cmd} on domain {}", vm.name()), &e))
}

/// Run a human monitor (HMP) command (`info block`, `qemu-io ...`) in the
/// domain's QEMU and return its text output. Note that HMP `qemu-io`
/// prints its results on QEMU's standard output (the domain's log file),
/// not in this answer.
pub fn qemu_monitor_command_hmp(vm: &Vm, cmd: &str) -> Result<String> {
    vm.dom()
        .qemu_monitor_command(cmd, super::ffi::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        .map_err(|e| virt_error(format_args!("HMP command {cmd:?} on domain {}", vm.name()), &e))
}

/// Run a QMP command (`{"execute":"query-block-jobs"}`) in the domain's QEMU
/// and return its JSON answer.
pub fn qemu_monitor_command_qmp(vm: &Vm, json_cmd: &str) -> Result<String> {
    vm.dom()
        .qemu_monitor_command(json_cmd, super::ffi::VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
        .map_err(|e| virt_error(format_args!("QMP command {json_cmd} on domain {}", vm.name()), &e))
}
