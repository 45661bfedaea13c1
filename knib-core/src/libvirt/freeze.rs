//! Freezing and thawing a running guest's filesystems through its agent
//! (`guest-fsfreeze-freeze`, `guest-fsfreeze-thaw`), for the backups that
//! quiesce by hand: the bitmap method and group backups. (The snapshot
//! method asks libvirt to quiesce, and libvirt thaws.)
//!
//! # Invariants
//!
//! - No freeze is sent through a channel libvirt says no agent is
//!   connected to ([`Freeze::NotSent`]): nothing to thaw then.
//! - After any freeze was sent, whether it answered, failed or timed out,
//!   [`thaw`] is called: a freeze libvirt stopped waiting for goes on in the
//!   guest (the agent is busy syncing the filesystems), and nothing else
//!   would thaw them. [`thaw`] sends thaws until the guest says its
//!   filesystems are thawed, for up to [`THAW_BUDGET`]. The guest saying
//!   they are thawed ends the thaw, whatever the thaw answered: an agent
//!   whose fsfreeze hook fails on `thaw` answers the hook's error for
//!   filesystems it has thawed. Any other failed thaw (answered with
//!   an error, or not answered), the guest thawed, is [`Thawed::Early`]: the freeze may have ended by
//!   itself before (a Windows guest's does after 10 s), and a backup taken
//!   while the guest was meant to be frozen is not taken as quiesced.
//! - A guest that cannot be thawed is an error naming the domain and the
//!   command that thaws it by hand, never only a log line.
//! - A thaw does not look at the caller's cancellation or deadline: it is
//!   what a cancelled backup owes the guest.

use std::time::{Duration, Instant};

use super::{qemu_agent_command, Vm};
use crate::error::{ErrorKind, KnibError, Result};

/// How long [`thaw`] keeps trying: a freeze that outlasted its bound may
/// still be syncing the guest's dirty data.
pub const THAW_BUDGET: Duration = Duration::from_secs(180);

/// How long one thaw or status query waits for the agent, in seconds.
const THAW_COMMAND_SECS: i32 = 10;

/// What the Linux guest agent's error says when its fsfreeze hook
/// (`qemu-ga -F`) failed ("... has failed with status N") or was killed
/// ("... has terminated abnormally"): on `thaw` the hook runs after the
/// filesystems were thawed. (The agent's own text, in English whatever
/// the host's locale.)
const HOOK_FAILED: &str = "fsfreeze hook has";

/// Between two thaw attempts.
const THAW_RETRY: Duration = Duration::from_secs(2);

/// What [`freeze`] did.
#[derive(Debug)]
pub enum Freeze {
    /// The guest answered: its filesystems are frozen.
    Frozen,
    /// The freeze was sent and failed or was not answered in time: it may
    /// go on in the guest, which must be [`thaw`]ed.
    Failed(KnibError),
    /// Nothing was sent: the domain's agent channel is not connected (no
    /// agent runs in the guest), so nothing can be frozen.
    NotSent(KnibError),
}

/// Send `guest-fsfreeze-freeze`, waiting at most `timeout_secs` seconds
/// (at least 1), unless the domain's agent channel says no agent is
/// connected (libvirt's `state='disconnected'`).
pub fn freeze(vm: &Vm, timeout_secs: i32) -> Freeze {
    match agent_connected(vm) {
        Ok(false) => {
            return Freeze::NotSent(KnibError::new(
                ErrorKind::Hypervisor,
                format!(
                    "the guest agent of domain {} is not connected (is it running in the guest?); nothing was frozen",
                    vm.name()
                ),
            ))
        }
        Ok(true) => {}
        Err(e) => return Freeze::NotSent(e),
    }
    match qemu_agent_command(vm, r#"{"execute":"guest-fsfreeze-freeze"}"#, timeout_secs.max(1)) {
        Ok(_) => Freeze::Frozen,
        Err(e) => Freeze::Failed(e),
    }
}

/// Whether the domain's guest agent channel is connected: `false` only
/// when libvirt says `state='disconnected'` (a libvirt that says nothing
/// counts as connected).
pub fn agent_connected(vm: &Vm) -> Result<bool> {
    let xml = vm.xml()?;
    let doc = roxmltree::Document::parse(&xml)
        .map_err(|e| KnibError::invalid(format!("domain XML of {} does not parse: {e}", vm.name())))?;
    Ok(!doc.descendants().any(|n| {
        n.has_tag_name("target")
            && n.attribute("name") == Some("org.qemu.guest_agent.0")
            && n.attribute("state") == Some("disconnected")
    }))
}

/// Thaw the guest's filesystems: `guest-fsfreeze-thaw`, then
/// `guest-fsfreeze-status` (whether the thaw answered or failed) until it
/// answers `thawed`, retried for up to [`THAW_BUDGET`]; whether a thaw
/// failed otherwise than by the guest's fsfreeze hook before the guest was
/// found thawed ([`Thawed::Early`]). The error says the filesystems may still be frozen and
/// how to thaw them.
pub fn thaw(vm: &Vm) -> Result<Thawed> {
    thaw_within(vm, thaw_budget())
}

/// How [`thaw`] found the guest thawed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thawed {
    /// A thaw answered (or failed only by the guest's fsfreeze hook, which
    /// runs once the filesystems are thawed).
    Cleanly,
    /// The guest is thawed, but a thaw failed otherwise (an error the
    /// agent answered, or no answer) without the guest saying it was still
    /// frozen (the message, naming the domain): the freeze may have ended
    /// before, by itself (a Windows guest's does after 10 s), so what was
    /// taken while the guest was meant to be frozen may not be quiesced.
    Early(String),
}

/// [`THAW_BUDGET`]; in debug builds, the seconds
/// `KNIB_TEST_THAW_BUDGET_SECS` says when set (how a test sees a thaw
/// that keeps failing end without waiting three minutes).
fn thaw_budget() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(secs) = std::env::var("KNIB_TEST_THAW_BUDGET_SECS").ok().and_then(|v| v.parse().ok()) {
        return Duration::from_secs(secs);
    }
    THAW_BUDGET
}

/// [`thaw`] with another budget.
pub fn thaw_within(vm: &Vm, budget: Duration) -> Result<Thawed> {
    let started = Instant::now();
    let mut attempts = 0u32;
    // A thaw that failed (not by the guest's hook) while the guest may
    // already have been thawed: the freeze may not have held. Failing
    // closed, a thaw not answered counts, and only the guest saying it is
    // still frozen clears it (the freeze held until then).
    let mut unsure: Option<String> = None;
    loop {
        attempts += 1;
        // The status is asked after a thaw that failed as well: an agent
        // whose fsfreeze hook fails on `thaw` has thawed the filesystems
        // before it ran the hook, and answers the hook's error.
        let sent = qemu_agent_command(vm, r#"{"execute":"guest-fsfreeze-thaw"}"#, THAW_COMMAND_SECS);
        let state = status(vm);
        match (&sent, &state) {
            (_, Ok(s)) if s == "frozen" => unsure = None,
            (Err(e), _) if !e.message.contains(HOOK_FAILED) => {
                unsure.get_or_insert_with(|| e.message.clone());
            }
            _ => {}
        }
        let why = match (state, sent) {
            (Ok(s), sent) if s == "thawed" => {
                if let Err(e) = &sent {
                    log::warn!(
                        "domain {}: a thaw failed ({}); the guest agent says the filesystems are thawed",
                        vm.name(),
                        e.message
                    );
                } else if attempts > 1 {
                    log::warn!("domain {}: the guest's filesystems thawed at attempt {attempts}", vm.name());
                }
                return Ok(match unsure {
                    None => Thawed::Cleanly,
                    Some(e) => Thawed::Early(format!(
                        "a thaw of domain {} failed ({e}) and the guest agent then said its filesystems were \
                         thawed: the freeze may have ended before the backup's instant",
                        vm.name()
                    )),
                });
            }
            (_, Err(e)) => e.message,
            (Ok(s), Ok(_)) => format!("the guest agent says the filesystems are {s}"),
            (Err(e), Ok(_)) => e.message,
        };
        if started.elapsed() + THAW_RETRY >= budget {
            return Err(KnibError::new(
                ErrorKind::Hypervisor,
                format!(
                    "the filesystems of domain {name} may still be frozen: {attempts} thaws in {secs} s failed, \
                     the last: {why}; `virsh domfsthaw {name}` thaws them",
                    name = vm.name(),
                    secs = started.elapsed().as_secs()
                ),
            ));
        }
        log::warn!("domain {}: thawing the guest's filesystems (attempt {attempts}): {why}", vm.name());
        std::thread::sleep(THAW_RETRY);
    }
}

/// Thaw the guest's filesystems when its agent says they are frozen (a
/// backup killed between its freeze and its thaw left them so); whether
/// it thawed them. A guest whose agent does not answer is left as it is
/// (logged): knib cannot have frozen it either.
pub fn thaw_if_frozen(vm: &Vm) -> Result<bool> {
    match status(vm) {
        Ok(s) if s == "frozen" => {
            log::warn!(
                "domain {}: the guest's filesystems are frozen (an interrupted backup's freeze): thawing them",
                vm.name()
            );
            thaw(vm).map(|_| true)
        }
        Ok(_) => Ok(false),
        Err(e) => {
            log::info!("domain {}: the freeze state of its filesystems is unknown ({e}): not thawed", vm.name());
            Ok(false)
        }
    }
}

/// Whether the guest's agent says its filesystems are frozen (false when
/// it does not answer).
pub fn frozen(vm: &Vm) -> bool {
    status(vm).is_ok_and(|s| s == "frozen")
}

/// `guest-fsfreeze-status`: "thawed" or "frozen".
fn status(vm: &Vm) -> Result<String> {
    let answer = qemu_agent_command(vm, r#"{"execute":"guest-fsfreeze-status"}"#, THAW_COMMAND_SECS)?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| {
        KnibError::new(
            ErrorKind::Hypervisor,
            format!("guest-fsfreeze-status of domain {} answered {answer}: {e}", vm.name()),
        )
    })?;
    v.get("return").and_then(|r| r.as_str()).map(str::to_string).ok_or_else(|| {
        KnibError::new(
            ErrorKind::Hypervisor,
            format!("guest-fsfreeze-status of domain {} answered {answer}", vm.name()),
        )
    })
}
