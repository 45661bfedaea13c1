//! `knib verify --boot` on a backup of a small Linux guest built from Debian
//! packages (`scripts/build-test-guest.sh`, cached in /var/tmp): it boots,
//! shows a screen, and a command's output is checked; a wrong expectation
//! fails with its own exit status.

use std::path::{Path, PathBuf};
use std::process::Command;

fn libvirt_available() -> bool {
    Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn knib(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

#[test]
fn verify_boot_proves_a_backup_boots_and_checks_a_command() {
    if !libvirt_available() {
        eprintln!("skipped: the libvirt daemon does not answer");
        return;
    }
    let guest =
        PathBuf::from(std::env::var("KNIB_TEST_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/knib-test-guest".into()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-guest.sh");
    let out = Command::new("bash").arg(&script).arg(&guest).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(guest.join(f)).unwrap().trim().to_string();
    let (cmdline, marker) = (read("cmdline"), read("marker"));
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("guest.qcow2");
    std::fs::copy(guest.join("disk.qcow2"), &disk).unwrap();
    let store = d.path().join("store");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out =
        knib(&["--json", "backup", "--store", &s(&store), "--vm", "guest", "--disk", &format!("root={}", s(&disk))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    let shot = d.path().join("screen.png");
    let (kernel, initrd) = (s(&guest.join("vmlinuz")), s(&guest.join("initrd.img")));
    let base = [
        "verify",
        "--store",
        &s(&store),
        &id,
        "--boot",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
        "--boot-timeout",
        "240",
    ];
    // A boot test killed while its guest boots leaves its domain running
    // (nothing destroyed it); the next boot test on the host removes it
    // and its overlay.
    let mut killed = Command::new(env!("CARGO_BIN_EXE_knib"))
        .args(base)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let orphan = format!("knib-validate-{}-0", killed.id());
    let virsh = |args: &[&str]| {
        let o = Command::new("virsh").args(["-c", "qemu:///system"]).args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let listed = |name: &str| virsh(&["list", "--all", "--name"]).lines().any(|l| l.trim() == name);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !listed(&orphan) {
        assert!(std::time::Instant::now() < until, "{orphan} never started");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let overlay: PathBuf = virsh(&["domblklist", &orphan])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|f| f.contains(&orphan))
        .map(PathBuf::from)
        .expect("the orphan's overlay");
    // A boot test in another pid namespace (a container's knib, the same
    // libvirt) does not take the running test's domain for an orphan,
    // though the pid in its name is none of its namespace's.
    let mut other = vec!["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_knib")];
    other.extend(base[..base.len() - 1].iter().copied());
    other.push("1");
    let out = Command::new("unshare").args(&other).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("does not boot")
            || String::from_utf8_lossy(&out.stderr).contains("boot"),
        "the boot test in another pid namespace did not run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(killed.try_wait().unwrap().is_none(), "the boot test died");
    assert!(
        listed(&orphan) && overlay.exists(),
        "a boot test in another pid namespace removed a running test's domain"
    );
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(listed(&orphan) && overlay.exists(), "the killed boot test left nothing to clean");
    let mut ok = base.to_vec();
    let shot_s = s(&shot);
    ok.extend(["--screenshot", &shot_s, "--exec", "/bin/cat", "/etc/knib-marker", "--expect-output", &marker]);
    // The kernel and initrd given relative to knib's working directory.
    // Before, they went into the domain's XML as they were, and libvirt
    // read them from its own working directory (/): `vmlinuz` booted the
    // host's /vmlinuz; names that are not there did not start.
    std::fs::copy(guest.join("vmlinuz"), d.path().join("guest-vmlinuz")).unwrap();
    std::fs::copy(guest.join("initrd.img"), d.path().join("guest-initrd.img")).unwrap();
    let mut relative = ok.clone();
    assert_eq!((relative[5], relative[7]), ("--kernel", "--initrd"));
    relative[6] = "guest-vmlinuz";
    relative[8] = "guest-initrd.img";
    let out = Command::new(env!("CARGO_BIN_EXE_knib")).args(&relative).current_dir(d.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("{id}: boots")) && text.contains("command exited 0"), "{text}");
    assert!(!listed(&orphan), "{orphan} of the killed boot test is still there");
    assert!(!overlay.exists(), "{} of the killed boot test is still there", overlay.display());
    let scratch = overlay.parent().unwrap();
    assert!(!scratch.exists(), "{}, the directory of the killed boot test, is still there", scratch.display());
    assert_eq!(&std::fs::read(&shot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let mut js = vec!["--json"];
    js.extend(ok.iter().copied());
    let out = knib(&js);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["booted"].as_bool(), report["passed"].as_bool()), (Some(true), Some(true)), "{report}");
    let domain = report["domain"].as_str().unwrap().to_string();
    assert!(domain.starts_with("knib-validate-"), "{domain}");
    let mut bad = base.to_vec();
    bad.extend(["--exec", "/bin/cat", "/etc/knib-marker", "--expect-output", "something else"]);
    let out = knib(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(20), "{err}");
    assert!(err.contains(&format!("backup {id} failed its boot test")) && err.contains("something else"), "{err}");
    // No throwaway domain is left behind.
    let list = Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).lines().any(|l| l.trim() == domain), "{domain} was left behind");
}
