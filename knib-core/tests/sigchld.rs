//! A host whose process loses its children's exit status: knib must say so,
//! and not report a `qemu-img` it cannot judge as done or as failed
//! without a reason. Its own test binary: SIGCHLD's action and a reaper
//! thread are the whole process's.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knib_core::process::Invocation;
use knib_core::qemu_img::QemuImg;
use knib_core::{Control, ErrorKind};

/// Set SIGCHLD's action to `handler` with `flags`.
fn set_sigchld(handler: libc::sighandler_t, flags: libc::c_int) {
    // SAFETY: all-zero is a valid `sigaction`; the action set is the
    // default, ignore, or a flag on the default, none of which runs code.
    unsafe {
        let mut a: libc::sigaction = std::mem::zeroed();
        a.sa_sigaction = handler;
        a.sa_flags = flags;
        assert_eq!(libc::sigaction(libc::SIGCHLD, &a, std::ptr::null_mut()), 0);
    }
}

fn refused(q: &QemuImg, out: &Path, how: &str) {
    let e = q.create(out, 1 << 20, &Control::new()).expect_err("qemu-img was run with SIGCHLD's status lost");
    assert_eq!(e.kind, ErrorKind::Io);
    assert_eq!(
        e.message,
        format!(
            "cannot run qemu-img: this process {how}, so the kernel reaps knib's children and their exit status is lost; leave SIGCHLD at its default action in the host (nothing was run)"
        )
    );
    assert!(!out.exists(), "qemu-img ran and wrote {}", out.display());
}

#[test]
fn a_process_that_loses_its_childrens_status_gets_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let q = QemuImg::new();
    let out = d.path().join("new.qcow2");

    // The kernel reaps children at once: nothing is run.
    set_sigchld(libc::SIG_IGN, 0);
    refused(&q, &out, "ignores SIGCHLD (SIG_IGN)");
    set_sigchld(libc::SIG_DFL, libc::SA_NOCLDWAIT);
    refused(&q, &out, "handles SIGCHLD with SA_NOCLDWAIT");

    // The default: it runs.
    set_sigchld(libc::SIG_DFL, 0);
    q.create(&out, 1 << 20, &Control::new()).unwrap();
    assert!(out.exists());

    // Something else in the process reaps every child (a host's own
    // waitpid(-1)): the error says why, and no progress is reported after
    // the call returned. The reaper may lose the race to knib's own wait;
    // a few tries.
    let src = d.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let stop = Arc::new(AtomicBool::new(false));
    let reaper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: waitpid with a null status pointer only reaps.
                if unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } < 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        })
    };
    let mut seen = None;
    for i in 0..5 {
        let reports = Arc::new(AtomicUsize::new(0));
        let r = reports.clone();
        let ctl = Control::new().with_progress(Arc::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        let dest = d.path().join(format!("copy{i}.qcow2"));
        let run = Invocation::new("qemu-img")
            .args(["convert", "-p", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&dest)
            .progress("copy")
            .run(&ctl);
        let after = reports.load(Ordering::SeqCst);
        if let Err(e) = run {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(reports.load(Ordering::SeqCst), after, "progress was reported after the call returned");
            seen = Some(e);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    reaper.join().unwrap();
    let e = seen.expect("the reaper never took qemu-img's status from knib in five runs");
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.message.starts_with("waiting for qemu-img convert -p"), "{}", e.message);
    assert!(
        e.message.ends_with(
            "(something else in this process reaped it, so whether it succeeded is unknown: the host must not wait for children it did not start)"
        ),
        "{}",
        e.message
    );
}
