//! Tests of [`super`] (the store's settings).
use super::*;
use crate::ErrorKind;

fn parse(t: &str) -> Result<Settings> {
    Settings::from_json(t, "knib.json")
}

#[test]
fn missing_file_means_defaults() {
    let d = tempfile::tempdir().unwrap();
    let s = Settings::load(d.path()).unwrap();
    assert_eq!(s, Settings::default());
    let c = &s.compression;
    assert!(c.enabled);
    assert_eq!((c.max_concurrent_per_host, c.max_retries, c.retry_interval_secs, c.timeout_secs), (5, 2, 3600, 28800));
    assert_eq!((c.min_free_factor, c.coroutines, c.rate_limit_mbps), (1.0, 1, 0));
    assert_eq!(c.library, CompressionLibrary::Zstd);
    let v = &s.validation;
    assert!(v.enabled && !v.boot && v.screenshot);
    assert_eq!((v.max_concurrent_per_host, v.max_retries, v.timeout_secs), (1, 2, 3600));
    let y = &s.sync;
    assert!(y.enabled && !y.auto && y.vault.is_none());
    assert_eq!((y.max_concurrent_per_host, y.max_retries, y.retry_interval_secs, y.timeout_secs), (2, 2, 600, 28800));
    assert_eq!((y.rate_limit_mbps, y.part_size_mib, y.parallel_parts), (0, 5, 2));
}

#[test]
fn sync_settings_are_read_and_checked() {
    let s = parse(r#"{"schema": 1, "sync.vault": "s3://knib-vault/site-a", "sync": {"auto": true, "max_retries": 0}}"#)
        .unwrap();
    assert_eq!(s.sync.vault.as_deref(), Some("s3://knib-vault/site-a"));
    assert!(s.sync.auto && s.sync.enabled);
    assert_eq!(s.sync.max_retries, 0);
    assert_eq!(parse(&s.to_json().to_string()).unwrap(), s);
    for (text, needle) in [
        (r#"{"schema": 1, "sync.vault": "/srv/vault"}"#, "sync.vault"),
        (r#"{"schema": 1, "sync.vault": "s3://"}"#, "sync.vault"),
        (r#"{"schema": 1, "sync.part_size_mib": 4}"#, "sync.part_size_mib"),
        (r#"{"schema": 1, "sync.parallel_parts": 0}"#, "sync.parallel_parts"),
        (r#"{"schema": 1, "sync.secret_key": "x"}"#, "sync.secret_key"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{text}");
        assert!(e.message.contains(needle), "{text}: {e}");
    }
}

#[test]
fn flat_and_nested_keys_and_round_trip() {
    let a = parse(r#"{"schema": 1, "compression.max_retries": 4, "compression.library": "zlib"}"#).unwrap();
    let b = parse(r#"{"schema": 1, "compression": {"max_retries": 4, "library": "zlib"}}"#).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.compression.max_retries, 4);
    assert_eq!(a.compression.library, CompressionLibrary::Zlib);
    assert_eq!(parse(&a.to_json().to_string()).unwrap(), a);
    assert_eq!(parse(r#"{"schema":1,"compression.rate_limit_mbps":-3}"#).unwrap().compression.rate_limit_mbps, 0);
    // Over 1 TB/s: qemu-img's -r (bytes per second, an i64) would overflow.
    assert_eq!(
        parse(r#"{"schema":1,"compression.rate_limit_mbps":1000000}"#).unwrap().compression.rate_limit_mbps,
        1_000_000
    );
    for key in ["compression.rate_limit_mbps", "sync.rate_limit_mbps"] {
        let e = parse(&format!(r#"{{"schema":1,"{key}":9000000000000}}"#)).unwrap_err();
        assert!(e.message.contains(key) && e.message.contains("must be at most 1000000 MB/s"), "{e}");
    }
    let v = parse(
        r#"{"schema": 1, "validation": {"boot": true, "kernel": "boot/vmlinuz", "command": ["/bin/uname", "-s"],
            "expect_output": "Linux", "max_concurrent_per_host": 2, "domain_type": "qemu"}}"#,
    )
    .unwrap();
    assert!(v.validation.boot);
    assert_eq!(v.validation.kernel.as_deref(), Some(Path::new("boot/vmlinuz")));
    assert_eq!(v.validation.command, ["/bin/uname", "-s"]);
    assert_eq!(v.validation.max_concurrent_per_host, 2);
    assert_eq!(parse(&v.to_json().to_string()).unwrap(), v);
    assert_eq!(parse(&Settings::default().to_json().to_string()).unwrap(), Settings::default());
}

#[test]
fn the_data_path_is_native_unless_set_to_qemu_img() {
    assert_eq!(Settings::default().data_path, DataPath::Native);
    assert_eq!(Settings::default().compress_options().data_path, DataPath::Native);
    let flat = parse(r#"{"schema": 1, "knib.data.path": "qemu-img"}"#).unwrap();
    let nested = parse(r#"{"schema": 1, "knib": {"data": {"path": "qemu-img"}}}"#).unwrap();
    assert_eq!(flat, nested);
    assert_eq!(flat.data_path, DataPath::QemuImg);
    assert_eq!(flat.compress_options().data_path, DataPath::QemuImg);
    assert_eq!(parse(r#"{"schema": 1, "knib.data.path": "native"}"#).unwrap().data_path, DataPath::Native);
    assert_eq!(parse(&flat.to_json().to_string()).unwrap(), flat);
}

#[test]
fn bad_settings_name_the_key() {
    for (text, needle) in [
        (r#"{"schema": 1, "compression.max_retires": 3}"#, "compression.max_retires"),
        (r#"{"schema": 1, "compression": {"colour": 3}}"#, "compression.colour"),
        (r#"{"schema": 1, "compresion": {"enabled": true}}"#, "compresion.enabled"),
        (r#"{"schema": 1, "compression.max_retries": "two"}"#, "compression.max_retries"),
        (r#"{"schema": 1, "compression.enabled": 1}"#, "compression.enabled"),
        (r#"{"schema": 1, "compression.coroutines": 17}"#, "compression.coroutines"),
        (r#"{"schema": 1, "compression.max_concurrent_per_host": 0}"#, "compression.max_concurrent_per_host"),
        (r#"{"schema": 1, "compression.min_free_factor": -1}"#, "compression.min_free_factor"),
        (r#"{"schema": 1, "group.max_concurrent_copies": 0}"#, "group.max_concurrent_copies"),
        (r#"{"schema": 1, "compression.library": "lz4"}"#, "compression.library"),
        (r#"{"schema": 1, "compression.timeout_secs": 1.5}"#, "compression.timeout_secs"),
        (r#"{"schema": 1, "validation.command": ["uname"]}"#, "validation.command"),
        (r#"{"schema": 1, "validation.domain_type": "xen"}"#, "validation.domain_type"),
        (r#"{"schema": 1, "validation": {"boot": "yes"}}"#, "validation.boot"),
        (r#"{"schema": 1, "knib.data.path": "qemu"}"#, "knib.data.path"),
        (r#"{"schema": 1, "knib": {"data": {"path": 1}}}"#, "knib.data.path"),
        (r#"{"schema": 1, "compression.enabled": true, "compression": {"enabled": false}}"#, "given twice"),
        (
            r#"{"schema": 1, "knib.data": {"path": "native"}, "knib": {"data.path": "native"}}"#,
            "\"knib.data.path\" is given twice",
        ),
        (r#"{"schema": 1, "validation": {"kernel": null}}"#, "validation.kernel"),
        (r#"{"schema": 1, "validation.memory_mib": 32}"#, "validation.memory_mib"),
        (r#"{"schema": 1, "validation.max_write_mib": 0}"#, "validation.max_write_mib"),
        (r#"{"schema": 1, "validation": {"max_write_mib": 1048577}}"#, "validation.max_write_mib"),
        (r#"{"schema": 1, "knib": {"data": {"route": "native"}}}"#, "knib.data.route"),
        (r#"{"compression.enabled": true}"#, "schema"),
        (r#"{"schema": 2}"#, "schema"),
        (r#"[1]"#, "object"),
        (r#"{"schema": 1,"#, "JSON"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{text}");
        assert!(e.message.contains(needle), "{text}: {e}");
        assert!(e.message.starts_with("settings knib.json: "), "{e}");
    }
}

/// A boot test's kernel and initrd are files of the store, and its URI a
/// local QEMU one: checked when a boot test runs (a store's settings that
/// once took an absolute path still load, so its backups go on).
#[test]
fn boot_test_files_are_the_stores_and_its_uri_local() {
    use super::{is_local_qemu_uri, store_relative};
    let s =
        parse(r#"{"schema": 1, "validation.kernel": "/boot/vmlinuz", "validation.connect": "qemu+ssh://h/system"}"#)
            .unwrap();
    assert_eq!(s.validation.kernel.as_deref(), Some(Path::new("/boot/vmlinuz")));
    for bad in ["/boot/vmlinuz", "/etc/shadow", "../boot/vmlinuz", ""] {
        let e = store_relative("validation.initrd", Path::new(bad)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{bad}");
        assert!(e.message.starts_with("setting validation.initrd must be a path inside the store"), "{e}");
    }
    assert_eq!(store_relative("validation.kernel", Path::new("boot/vmlinuz")).unwrap(), Path::new("boot/vmlinuz"));
    for uri in ["qemu:///system", "qemu:///session", "qemu+unix:///system", "qemu+unix:///session"] {
        assert!(is_local_qemu_uri(uri), "{uri}");
    }
    for uri in [
        "qemu+ext:///system?command=/store/x.sh",
        "qemu+ssh://host/system",
        "qemu:///system?socket=/tmp/s",
        "qemu://host/system",
        "xen:///system",
        "",
    ] {
        assert!(!is_local_qemu_uri(uri), "{uri}");
    }
}

#[test]
fn every_key_of_the_table_is_read_and_written() {
    let s = parse(
        r#"{"schema": 1, "validation": {"kernel": "k", "initrd": "b/i", "connect": "qemu+unix:///session", "cmdline": "c", "command": ["/bin/true"],
            "expect_exit": 0, "expect_output": "", "domain_type": "kvm", "max_write_mib": 2048}, "sync.vault": "s3://b12/p"}"#,
    )
    .unwrap();
    let v = s.to_json();
    let written: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).filter(|k| *k != "schema").collect();
    let mut table: Vec<&str> = SETTING_KEYS.iter().map(|(k, _)| *k).collect();
    table.sort();
    assert_eq!(written, table);
    assert_eq!(parse(&v.to_string()).unwrap(), s);
}

/// A key of thousands of parts is unknown, said at once and cut short (it
/// overflowed the stack: a store's knib.json crashed the process).
#[test]
fn a_key_of_many_parts_is_unknown_and_shown_cut_short() {
    for parts in [5, 100, 100_000] {
        let key = vec!["compression"; parts].join(".");
        let e = parse(&format!(r#"{{"schema": 1, "{key}": 1}}"#)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{parts} parts: {e}");
        assert!(e.message.contains(&format!("({parts} parts; no key has more than ")), "{e}");
        assert!(e.message.len() < 300, "{parts} parts: the message is {} bytes", e.message.len());
    }
    // Inside a nested object too (it overflowed the stack there): the
    // parts of the object's key count.
    for parts in [5, 100_000] {
        let key = vec!["a"; parts].join(".");
        let e = parse(&format!(r#"{{"schema": 1, "compression": {{"{key}": 1}}}}"#)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{parts} parts: {e}");
        assert!(e.message.contains("unknown key \"compression.a.a"), "{e}");
        assert!(e.message.contains(&format!("({} parts; no key has more than ", parts + 1)), "{e}");
        assert!(e.message.len() < 300, "{parts} parts: the message is {} bytes", e.message.len());
    }
    // The same depth nested is refused by the JSON reader's own limit.
    let nested = format!(r#"{{"schema": 1, "compression": {}1{}}}"#, r#"{"a": "#.repeat(10_000), "}".repeat(10_000));
    assert_eq!(parse(&nested).unwrap_err().kind, ErrorKind::InvalidInput);
}
