//! The validation requests' own parts (see "Validation" in [`super`]):
//! `agent.prepare_validation`'s overlays, and how the agent's script fields
//! become a guest command and its outcome the agent's `scriptResult`.

use std::path::{Path, PathBuf};

use super::{same_file, PrepareReq, PrepareValidationAnswer, PreparedVolume, VALIDATION_SUFFIX};
use crate::engine;
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::progress::Control;
use crate::qemu_img::QemuImg;
use crate::wire::{absolute, non_empty};

/// The overlay `agent.prepare_validation` makes for volume `uuid` of VM
/// `vm_name`: `<vm_name>..<uuid>.knib-validation.qcow2`. Neither name may
/// hold "..", nor a uuid start with a dot, so the last ".." of a file name
/// tells the VM from the volume: VM `a` with volume `b-c` and VM `a-b` with
/// volume `c` get two names, and the clean-up of `a` leaves `a-b`'s alone.
pub fn validation_overlay(work_dir: &Path, vm_name: &str, uuid: &str) -> PathBuf {
    work_dir.join(format!("{vm_name}..{uuid}{VALIDATION_SUFFIX}"))
}

/// Whether `file_name` is an overlay [`validation_overlay`] names for VM
/// `vm_name` (any volume). Used by the live clean-up only.
#[cfg(feature = "libvirt")]
pub(crate) fn is_validation_overlay_of(file_name: &str, vm_name: &str) -> bool {
    let Some(stem) = file_name.strip_suffix(VALIDATION_SUFFIX) else { return false };
    let Some(at) = stem.rfind("..") else { return false };
    stem[..at] == *vm_name && crate::names::validate("volume uuid", &stem[at + 2..]).is_ok()
}

/// `agent.prepare_validation`: one overlay per volume, at its
/// `overlay_path` or in `work_dir`; all or none (the overlays made are
/// removed on a failure; a replaced volume file is only replaced once its
/// overlay is whole).
pub(crate) fn prepare_validation(op: &str, r: &PrepareReq, ctl: &Control) -> Result<PrepareValidationAnswer> {
    crate::names::validate("VM name", &r.vm_name)?;
    non_empty(op, "volumes", &r.volumes)?;
    if let Some(dir) = &r.work_dir {
        absolute(op, "work_dir", dir)?;
        if !dir.is_dir() {
            return Err(KnibError::not_found(format!("work directory {} does not exist", dir.display())));
        }
    }
    let mut overlays = Vec::new();
    for (i, v) in r.volumes.iter().enumerate() {
        crate::names::validate("volume uuid", &v.uuid)?;
        absolute(op, &format!("volumes[{i}].backup_path"), &v.backup_path)?;
        if r.volumes[..i].iter().any(|o| o.uuid == v.uuid) {
            return Err(KnibError::invalid(format!("request of {op}: volume {} is named twice", v.uuid)));
        }
        let overlay = match (&v.overlay_path, &r.work_dir) {
            (Some(p), _) => {
                absolute(op, &format!("volumes[{i}].overlay_path"), p)?;
                replaceable_volume(p, ctl)?;
                p.clone()
            }
            (None, Some(dir)) => validation_overlay(dir, &r.vm_name, &v.uuid),
            (None, None) => {
                return Err(KnibError::invalid(format!(
                    "request of {op}: volumes[{i}] has no `overlay_path` and there is no `work_dir`"
                )))
            }
        };
        if overlays.iter().any(|o: &PathBuf| same_file(o, &overlay) || o == &overlay)
            || same_file(&overlay, &v.backup_path)
        {
            return Err(KnibError::invalid(format!(
                "request of {op}: overlay {} is named twice or is a backup file",
                overlay.display()
            )));
        }
        overlays.push(overlay);
    }
    let q = QemuImg::new();
    let mut out = Vec::new();
    // Every overlay is made under a temporary name of its own first (each
    // removed on a failure); the volume files are replaced only once all
    // are whole.
    let mut made: Vec<fsio::TempFile> = Vec::new();
    for (v, overlay) in r.volumes.iter().zip(&overlays) {
        let tmp = fsio::TempFile::beside(overlay)?;
        engine::restore::write_overlay(&q, &v.backup_path, &tmp, ctl)
            .map_err(|e| e.context(format!("overlay of volume {}", v.uuid)))?;
        made.push(tmp);
        out.push(PreparedVolume {
            uuid: v.uuid.clone(),
            backup_path: v.backup_path.clone(),
            overlay_path: overlay.clone(),
        });
    }
    for (tmp, overlay) in made.into_iter().zip(&overlays) {
        tmp.commit(overlay, true)?;
    }
    Ok(PrepareValidationAnswer { volumes: out })
}

/// Refuse to replace `path` unless it holds no data: absent, empty, or a
/// qcow2 image with no backing file, no internal snapshot and no guest
/// cluster that reads as anything but zeros (the management server
/// preallocates a volume as its offering says: `metadata`, `falloc` or
/// `full` map every cluster, all zeros), and no process holds QEMU's lock
/// on it. A validation VM's volume, as the management server creates it,
/// is such a file; anything else may be a guest's data.
fn replaceable_volume(path: &Path, ctl: &Control) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(KnibError::io("cannot read", path, e)),
    };
    let refuse = |why: String| {
        KnibError::invalid(format!(
            "{} {why}: knib replaces only an empty volume file with a validation overlay; nothing was written",
            path.display()
        ))
    };
    if !meta.is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    crate::lock::ensure_unused(&[path], "replacing it with a validation overlay")?;
    if meta.len() == 0 {
        return Ok(());
    }
    let mut img = crate::qcow2::Qcow2Image::open(path)
        .map_err(|e| refuse(format!("is not an empty qcow2 image ({})", e.message)))?;
    if let Some(b) = &img.header().backing_file {
        return Err(refuse(format!("has a backing file ({b})")));
    }
    if img.header().nb_snapshots > 0 {
        return Err(refuse(format!("has {} internal snapshot(s)", img.header().nb_snapshots)));
    }
    if let Some(i) = img.first_nonzero_cluster(ctl)? {
        return Err(refuse(format!("holds data (guest cluster {i} is not zeros)")));
    }
    Ok(())
}

/// A guest command from CloudStack's script fields: the arguments are split
/// at every comma, nothing trimmed, as the agent splits them (no arguments
/// when there are none; an empty string is one empty argument).
#[cfg(feature = "libvirt")]
pub(crate) fn guest_command(script: &str, args: Option<&str>) -> engine::validate::GuestCommand {
    engine::validate::GuestCommand {
        path: script.to_string(),
        args: args.map(|a| a.split(',').map(str::to_string).collect()).unwrap_or_default(),
        expect_exit: None,
        expect_output: None,
    }
}

/// The agent's `scriptResult` for a script run: `None` when it matched
/// `expected` (`"0"` and an exit code of 0, or the base64 of its output
/// equal to `expected`); else that base64 output, `"Timeout"`, or the error
/// that kept it from running. Where the agent would fail on a script that
/// printed nothing (it reads the missing `out-data`), the result says
/// `"exit code N, no output"`: never an empty string, which a caller could
/// take for a match.
#[cfg(feature = "libvirt")]
pub(crate) fn script_result(expected: &str, exec: &engine::validate::Exec) -> Option<String> {
    use engine::validate::Exec;
    match exec {
        Exec::Ended(out) => {
            if (expected == "0" && out.exit == Some(0)) || out.stdout_base64 == expected {
                None
            } else if out.stdout_base64.is_empty() {
                Some(match (out.exit, out.signal) {
                    (Some(c), _) => format!("exit code {c}, no output"),
                    (None, Some(s)) => format!("killed by signal {s}, no output"),
                    (None, None) => "no exit code, no output".to_string(),
                })
            } else {
                Some(out.stdout_base64.clone())
            }
        }
        Exec::TimedOut => Some("Timeout".to_string()),
        Exec::Failed(m) => Some(m.clone()),
    }
}

#[cfg(all(test, feature = "libvirt"))]
mod tests {
    use super::*;

    #[test]
    fn guest_commands_split_at_commas_as_the_agent() {
        let c = guest_command("/bin/check", Some(" -a, b,,c "));
        assert_eq!(c.args, [" -a", " b", "", "c "]);
        assert_eq!(guest_command("/bin/echo", Some("")).args, [""]);
        assert!(guest_command("/x", None).args.is_empty());
    }

    #[test]
    fn script_results_mean_what_the_agents_mean() {
        use engine::validate::{CommandOutcome, Exec};
        let ended = |exit: i64, out: &str| {
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, out);
            Exec::Ended(CommandOutcome {
                exit: Some(exit),
                signal: None,
                stdout: out.into(),
                stdout_base64: b64,
                stderr: String::new(),
            })
        };
        // "0" matches an exit code of 0, whatever the output.
        assert_eq!(script_result("0", &ended(0, "hello\n")), None);
        // Any other exit code gives the output, in base64.
        assert_eq!(script_result("0", &ended(3, "hello\n")).as_deref(), Some("aGVsbG8K"));
        // An expected output is compared in base64, not decoded.
        assert_eq!(script_result("aGVsbG8K", &ended(1, "hello\n")), None);
        assert_eq!(script_result("hello\n", &ended(0, "hello\n")).as_deref(), Some("aGVsbG8K"));
        // A number other than 0 is never an exit code.
        assert_eq!(script_result("3", &ended(3, "x")).as_deref(), Some("eA=="));
        // No output: a text, never "".
        assert_eq!(script_result("0", &ended(2, "")).as_deref(), Some("exit code 2, no output"));
        assert_eq!(script_result("0", &Exec::TimedOut).as_deref(), Some("Timeout"));
        assert_eq!(
            script_result("0", &Exec::Failed("agent not connected".into())).as_deref(),
            Some("agent not connected")
        );
    }
}
