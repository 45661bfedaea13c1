//! `knib verify --boot`: prove a backup boots, through the engine's boot
//! test (a throwaway domain on overlays of the backup).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;
use knib_core::catalog::Store;
use knib_core::engine::validate::{boot_test, BootTestRequest, GuestCommand};
use knib_core::libvirt::Hypervisor;
use knib_core::{Control, ErrorKind, KnibError, Result};

use crate::output;

/// Options of the boot test.
#[derive(Args, Debug)]
pub struct BootArgs {
    /// Boot the backup in a throwaway domain on overlays of it and check it.
    #[arg(long, requires = "backup")]
    pub boot: bool,
    /// Boot this kernel directly (otherwise the first disk boots through the firmware).
    #[arg(long, requires = "boot")]
    pub kernel: Option<PathBuf>,
    /// The kernel's initrd.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel's command line.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Seconds the guest agent has to answer once the domain started.
    #[arg(long, default_value_t = 300, requires = "boot")]
    pub boot_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, requires = "boot")]
    pub memory: u64,
    /// Save a screenshot of the booted guest here (PNG).
    #[arg(long, requires = "boot")]
    pub screenshot: Option<PathBuf>,
    /// Stop the guest, and fail the test, once it has written more than this
    /// many MiB to its overlays and console log (default: no limit but the
    /// free space: a boot test always leaves 1 GiB free on the file system
    /// of its work directory).
    #[arg(long, value_name = "MIB", requires = "boot", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_write_mib: Option<u64>,
    /// Run this command in the guest (through the guest agent): its path and
    /// arguments, up to knib's next option (`--exec=ARG` for an argument
    /// that is one of knib's options).
    #[arg(long = "exec", num_args = 1.., value_name = "PATH ARG", requires = "boot")]
    pub exec: Vec<String>,
    /// The exit code the command must end with (default 0).
    #[arg(long, requires = "exec")]
    pub expect_exit: Option<i64>,
    /// The output the command must print (trailing white space ignored).
    #[arg(long, requires = "exec")]
    pub expect_output: Option<String>,
}

/// The command line `args` with each word of the guest command after
/// `--exec` given as `--exec=WORD`, so that a word starting with a hyphen
/// (`/bin/sh -c ...`) is the command's, not an unknown option of knib's.
/// The command ends at the next long option of `knib verify` (or a global
/// one): `--exec /bin/sh -c 'echo hi' --expect-output hi`. A word that is
/// one of those options is given as `--exec=WORD`.
pub fn exec_words_apart(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    use clap::CommandFactory;
    let cli = crate::Cli::command();
    let verify = cli.find_subcommand("verify").expect("knib verify");
    let longs: Vec<String> = cli
        .get_arguments()
        .chain(verify.get_arguments())
        .filter_map(|a| a.get_long())
        .chain(["help"])
        .map(|l| format!("--{l}"))
        .collect();
    let is_option = |w: &OsString| {
        let w = w.to_string_lossy();
        longs.iter().any(|l| w == l.as_str() || w.strip_prefix(l.as_str()).is_some_and(|r| r.starts_with('=')))
    };
    let mut out = Vec::new();
    let mut in_exec = false;
    for w in args {
        if w == "--exec" {
            in_exec = true;
            continue;
        }
        if in_exec && !is_option(&w) {
            let mut e = OsString::from("--exec=");
            e.push(&w);
            out.push(e);
            continue;
        }
        in_exec = false;
        out.push(w);
    }
    out
}

/// Run the boot test of backup `id`, on libvirt at `connect`.
pub fn run(store: &Store, id: &str, a: &BootArgs, connect: &str, json: bool, ctl: &Control) -> Result<()> {
    let m = store.show(id)?;
    let backup_files = store.boot_files(&m)?;
    // A private directory of a name no one can plant beforehand (mode 0700,
    // random): root's overlays and console log are made in it.
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}{id}-", knib_core::engine::validate::SCRATCH_PREFIX))
        .tempdir()
        .map_err(|e| KnibError::io("cannot create a directory in", &std::env::temp_dir(), e))?;
    let work_dir = scratch.path().to_path_buf();
    let command = a.exec.split_first().map(|(path, args)| GuestCommand {
        path: path.clone(),
        args: args.to_vec(),
        expect_exit: a.expect_exit,
        expect_output: a.expect_output.clone(),
    });
    // The domain's XML names them: from knib's working directory, not
    // libvirt's.
    let absolute = |p: &Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.as_deref()
            .map(|p| std::path::absolute(p).map_err(|e| KnibError::io("cannot make absolute", p, e)))
            .transpose()
    };
    let req = BootTestRequest {
        backup_files,
        work_dir: work_dir.clone(),
        kernel: absolute(&a.kernel)?,
        initrd: absolute(&a.initrd)?,
        cmdline: a.cmdline.clone(),
        memory_mib: a.memory,
        boot_timeout_secs: a.boot_timeout,
        screenshot: a.screenshot.clone(),
        command,
        domain_type: None,
        max_write_bytes: a.max_write_mib.map(|m| m.saturating_mul(1 << 20)),
        timing: Default::default(),
    };
    let hv = Hypervisor::open(connect)?;
    let report = boot_test(&hv, &req, ctl);
    drop(scratch);
    let report = report?;
    output::clear_progress();
    let text = if report.passed {
        format!(
            "{id}: boots (guest agent answered after {:.1}s){}{}",
            report.boot_seconds,
            report.screenshot.as_ref().map(|p| format!(", screenshot {}", p.display())).unwrap_or_default(),
            report.command_exit.map(|c| format!(", command exited {c}")).unwrap_or_default()
        )
    } else {
        format!("{id}: boot test FAILED: {}", report.problems.join("; "))
    };
    output::say(json, || serde_json::to_value(&report), &text)?;
    if !report.passed {
        return Err(KnibError::new(
            ErrorKind::Corrupt,
            format!("backup {id} failed its boot test: {}", report.problems.join("; ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::{Cli, Command};

    fn exec_of(args: &[&str]) -> (Vec<String>, Option<String>) {
        let args = super::exec_words_apart(args.iter().map(|a| a.into()));
        let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Verify { boot, .. } => (boot.exec, boot.expect_output),
            _ => panic!("not verify"),
        }
    }

    /// Before, clap refused the `-c` of `--exec /bin/sh -c ...` as an
    /// unknown option of knib's. The command's words end at knib's next
    /// option.
    #[test]
    fn exec_takes_arguments_that_start_with_a_hyphen() {
        assert_eq!(
            exec_of(&["knib", "verify", "--store", "/s", "b", "--boot", "--exec=/bin/sh", "--exec=-c", "--exec=-x"]).0,
            ["/bin/sh", "-c", "-x"]
        );
        let base = ["knib", "verify", "--store", "/s", "b", "--boot", "--exec", "/bin/sh", "-c", "echo -n hi"];
        assert_eq!(exec_of(&base).0, ["/bin/sh", "-c", "echo -n hi"]);
        let mut more = base.to_vec();
        more.extend(["--expect-output", "hi"]);
        assert_eq!(exec_of(&more), (vec!["/bin/sh".into(), "-c".into(), "echo -n hi".into()], Some("hi".into())));
        let json = ["knib", "verify", "--store", "/s", "b", "--boot", "--exec", "/bin/sh", "-v", "--json"];
        assert_eq!(exec_of(&json).0, ["/bin/sh", "-v"]);
        assert_eq!(
            exec_of(&[
                "knib",
                "verify",
                "--store",
                "/s",
                "b",
                "--boot",
                "--exec",
                "/x",
                "--exec=--json",
                "--memory=64"
            ])
            .0,
            ["/x", "--json"]
        );
    }
}
