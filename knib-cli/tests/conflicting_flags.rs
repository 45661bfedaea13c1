//! Options that contradict each other are refused as usage errors (status
//! 2) before anything is opened, not silently ignored.

use std::process::Command;

fn knib(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_knib")).args(args).output().expect("knib runs")
}

/// Before, `--format raw` was ignored by a quick restore (its overlays are
/// qcow2) and `--domain` by a plain restore; both went on to open the
/// store (here: status 11, it does not exist).
#[test]
fn restore_refuses_options_the_kind_of_restore_ignores() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("none");
    let store = store.to_str().unwrap();
    for (args, names) in [
        (
            vec!["restore", "--store", store, "b", "--quick", "--domain", "d", "--format", "raw"],
            ["--quick", "--format"],
        ),
        (
            vec!["restore", "--store", store, "b", "--volume", "v", "--to", "/tmp/t", "--domain", "d"],
            ["--domain", "--volume"],
        ),
    ] {
        let out = knib(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("cannot be used with"), "{args:?}: {err}");
        for n in names {
            assert!(err.contains(n), "{args:?}: {err}");
        }
    }
}

/// `--check-output` reads back what `--compress` writes: without it, a
/// backup (of one VM or a group) is refused as a usage error naming both,
/// before the store is opened.
#[test]
fn check_output_needs_compress() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("none");
    let store = store.to_str().unwrap();
    for args in [
        vec!["backup", "--store", store, "--vm", "v", "--disk", "root=/nonexistent.qcow2", "--check-output"],
        vec!["group", "backup", "--store", store, "--domain", "d", "--check-output"],
    ] {
        let out = knib(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--check-output") && err.contains("--compress"), "{args:?}: {err}");
        assert!(!d.path().join("none").exists(), "{args:?}");
    }
    // Nor with --vault: a backup sent straight to a vault leaves no file
    // to read back.
    let args = [
        "backup",
        "--store",
        store,
        "--vm",
        "v",
        "--disk",
        "root=/nonexistent.qcow2",
        "--compress",
        "--check-output",
        "--vault",
        "s3://b/p",
    ];
    let out = knib(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be used with") && err.contains("--check-output") && err.contains("--vault"), "{err}");
    assert!(!d.path().join("none").exists());
}
