//! `knib verify --boot`: prove a backup boots, through the engine's boot
//! test (a throwaway domain on overlays of the backup).

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
    /// Run this command in the guest (through the guest agent); repeat for its arguments.
    #[arg(long = "exec", num_args = 1.., value_name = "PATH ARG", requires = "boot")]
    pub exec: Vec<String>,
    /// The exit code the command must end with (default 0).
    #[arg(long, requires = "exec")]
    pub expect_exit: Option<i64>,
    /// The output the command must print (trailing white space ignored).
    #[arg(long, requires = "exec")]
    pub expect_output: Option<String>,
}

/// Run the boot test of backup `id`, on libvirt at `connect`.
pub fn run(store: &Store, id: &str, a: &BootArgs, connect: &str, json: bool, ctl: &Control) -> Result<()> {
    let m = store.show(id)?;
    let backup_files = store.boot_files(&m)?;
    // A private directory of a name no one can plant beforehand (mode 0700,
    // random): root's overlays and console log are made in it.
    let scratch = tempfile::Builder::new()
        .prefix(&format!("knib-validate-{id}-"))
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
