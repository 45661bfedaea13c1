//! File-level restore through the libguestfs fallback, for real: an XFS
//! filesystem (which knib does not read natively) made by guestfish with
//! names a hostile guest would choose (`:`, which starts a command on
//! guestfish's command line, a name holding newlines and a would-be
//! `event` command, spaces), a symlink, a device node and a setuid file;
//! listed and extracted through knib's fallback. Every name comes back
//! exactly, no name runs anything, and the extracted tree has what the
//! native path gives (no device, no setuid bit, owned by whoever extracts).
//!
//! Skipped without guestfish (`scripts/setup.sh` installs it). The
//! appliance runs under TCG (`LIBGUESTFS_BACKEND_SETTINGS=force_tcg`): a
//! nested KVM host may refuse it KVM.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use knib_core::files::fallback::{find_tool, script_string};
use knib_core::files::Disk;
use knib_core::{Control, ErrorKind};

/// The name that would have become commands on guestfish's command line.
const INJECT: &str = "x\n:\nevent\nh\n*\ntouch knib-pwned";

fn guestfish(args: &[&str], script: &str, dir: &Path) {
    let file = dir.join("make.gf");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("guestfish").args(args).arg("-f").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "guestfish: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_names_through_the_guestfish_fallback_are_names_not_commands() {
    if find_tool("guestfish", std::env::var_os("PATH").as_deref()).is_none() {
        eprintln!("SKIPPED hostile_names_through_the_guestfish_fallback_are_names_not_commands: no guestfish");
        return;
    }
    // The only test of this binary: the environment and the working
    // directory are its own. An injected `event` would run its shell
    // command in the working directory.
    std::env::set_var("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    let work = tempfile::tempdir().unwrap();
    std::env::set_current_dir(work.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("xfs.qcow2");
    let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("512M").status().unwrap();
    assert!(st.success());
    let q = |s: &str| script_string(s.as_bytes());
    let mut script = String::from("run\nmkfs xfs /dev/sda\nmount /dev/sda /\nmkdir \"/d\"\n");
    for (name, content) in [("plain", "hello"), ("a b", "space"), (":", "colon"), (INJECT, "inject")] {
        script.push_str(&format!("write {} {}\n", q(&format!("/d/{name}")), q(content)));
    }
    script.push_str("ln-s \"/d/plain\" \"/d/lnk\"\nmknod-c 0666 1 3 \"/d/devnull\"\n");
    script.push_str("write \"/d/suid\" \"s\"\nchmod 04755 \"/d/suid\"\n");
    guestfish(&["-a", image.to_str().unwrap()], &script, dir.path());

    let ctl = Control::new();
    let disk = Disk::open_image(&image, &ctl).unwrap();
    let list = disk.list(None, "/d", &ctl).unwrap();
    let mut names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec![":", "a b", "devnull", "lnk", "plain", "suid", INJECT]);
    let e = |n: &str| list.iter().find(|e| e.name == n).unwrap();
    assert_eq!((e("plain").kind, e("plain").size), ("file", 5));
    assert_eq!((e(":").kind, e(":").size), ("file", 5));
    assert_eq!((e(INJECT).kind, e(INJECT).size), ("file", 6));
    assert_eq!((e("lnk").kind, e("lnk").target.as_deref()), ("symlink", Some("/d/plain")));
    assert_eq!(e("devnull").kind, "other");
    assert_eq!(e("suid").mode, 0o4755);
    assert!(!work.path().join("knib-pwned").exists(), "a guest's name ran a command on the host");

    // The whole directory, then one hostile name on its own.
    let out = dir.path().join("out");
    let got = disk.get(None, "/d", &out, &ctl).unwrap();
    assert_eq!((got.files, got.symlinks), (5, 1), "{got:?}");
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
    assert_eq!(read("plain"), "hello");
    assert_eq!(read("a b"), "space");
    assert_eq!(read(":"), "colon");
    assert_eq!(read(INJECT), "inject");
    assert_eq!(std::fs::read_link(out.join("lnk")).unwrap().to_str(), Some("/d/plain"));
    assert!(!out.join("devnull").exists(), "a device node was extracted");
    let suid = std::fs::metadata(out.join("suid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o755, "the setuid bit was kept");
    assert_eq!((suid.uid(), suid.gid()), (own_uid(), own_gid()));
    let one = dir.path().join("one");
    disk.get(None, &format!("/d/{INJECT}"), &one, &ctl).unwrap();
    assert_eq!(std::fs::read_to_string(&one).unwrap(), "inject");
    // An existing destination is refused, and nothing is left beside it.
    let e = disk.get(None, "/d/plain", &one, &ctl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, vec!["make.gf", "one", "out", "xfs.qcow2"]);
    assert!(!work.path().join("knib-pwned").exists(), "a guest's name ran a command on the host");
}

fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn own_gid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().gid()
}
