//! Settings of a store: `STORE/knib.json`, optional (a missing file means
//! every default), JSON with a `schema` field (1).
//!
//! The keys are CloudStack's global settings, renamed under one prefix;
//! durations are in seconds (so tests can use small values):
//!
//! | key | CloudStack setting | default |
//! |---|---|---|
//! | `compression.enabled` | (offering's `compress`; job processing on) | `true` |
//! | `compression.max_concurrent_per_host` | `backup.compression.max.concurrent.operations.per.host` | `5` |
//! | `compression.max_retries` | `backup.compression.max.job.retries` | `2` |
//! | `compression.retry_interval_secs` | `backup.compression.retry.interval` (60 minutes) | `3600` |
//! | `compression.timeout_secs` | `backup.compression.timeout` (0 = no limit) | `28800` |
//! | `compression.min_free_factor` | `backup.compression.minimum.free.storage` (x backup size) | `1.0` |
//! | `compression.coroutines` | `backup.compression.coroutines` (`qemu-img -m`, 1 to 16) | `1` |
//! | `compression.rate_limit_mbps` | `backup.compression.rate.limit` (MB/s, < 1 = none) | `0` |
//! | `compression.library` | offering's `compressionlibrary` (`zstd` or `zlib`) | `"zstd"` |
//! | `validation.enabled` | (offering's `validate`; job processing on) | `true` |
//! | `validation.max_concurrent_per_host` | (validation jobs at once on a host) | `1` |
//! | `validation.max_retries` | (retries of a validation that could not run) | `2` |
//! | `validation.retry_interval_secs` | | `3600` |
//! | `validation.timeout_secs` | (one validation job; 0 = no limit) | `3600` |
//! | `validation.boot` | (boot test in validation jobs) | `false` |
//! | `validation.connect` | libvirt URI of the boot test | `"qemu:///system"` |
//! | `validation.kernel`, `validation.initrd`, `validation.cmdline` | boot a kernel directly (else the first disk through the firmware) | none |
//! | `validation.memory_mib` | guest memory | `512` |
//! | `validation.boot_timeout_secs` | wait for `guest-sync` | `300` |
//! | `validation.screenshot` | save a PNG screenshot (`STORE/jobs/<job>.png`) | `true` |
//! | `validation.command` | `["/path", "arg", ...]` run through `guest-exec` | none |
//! | `validation.expect_exit` | exit code the command must end with | `0` |
//! | `validation.expect_output` | output it must print (trailing white space ignored) | none |
//! | `validation.domain_type` | `kvm` or `qemu` | chosen by the host |
//!
//! A validation job always runs `qemu-img check` on every file of the
//! backup's chains, compares backing pointers and sizes with the manifest,
//! and checks the hash (recorded at backup time or the first success); with
//! `validation.boot` it also boots the backup.
//! | `knib.data.path` | (knib: who moves the bytes of copies, compressions, restores) | `"native"` (or `"qemu-img"`) |
//!
//! Keys may be written flat (`{"schema": 1, "compression.max_retries": 3}`)
//! or nested (`{"schema": 1, "compression": {"max_retries": 3}}`). An unknown
//! key, a key given twice, a value of the wrong type or out of range is an
//! [`crate::ErrorKind::InvalidInput`] error naming the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{CompressOptions, DataPath};
use crate::error::{KnibError, Result};
use crate::qemu_img::CompressionLibrary;

/// The settings file's name, in the store's directory.
pub const SETTINGS_FILE: &str = "knib.json";

/// The settings schema this version of knib reads.
pub const SETTINGS_SCHEMA: u32 = 1;

/// Every key, with the CloudStack setting it stands for.
pub const SETTING_KEYS: &[(&str, &str)] = &[
    ("compression.enabled", "offering compress"),
    ("compression.max_concurrent_per_host", "backup.compression.max.concurrent.operations.per.host"),
    ("compression.max_retries", "backup.compression.max.job.retries"),
    ("compression.retry_interval_secs", "backup.compression.retry.interval"),
    ("compression.timeout_secs", "backup.compression.timeout"),
    ("compression.min_free_factor", "backup.compression.minimum.free.storage"),
    ("compression.coroutines", "backup.compression.coroutines"),
    ("compression.rate_limit_mbps", "backup.compression.rate.limit"),
    ("compression.library", "offering compressionlibrary"),
    ("validation.enabled", "offering validate"),
    ("validation.max_concurrent_per_host", "validation jobs per host"),
    ("validation.max_retries", "validation job retries"),
    ("validation.retry_interval_secs", "validation retry interval"),
    ("validation.timeout_secs", "validation job timeout"),
    ("validation.boot", "boot test"),
    ("validation.connect", "libvirt URI"),
    ("validation.kernel", "boot test kernel"),
    ("validation.initrd", "boot test initrd"),
    ("validation.cmdline", "boot test kernel command line"),
    ("validation.memory_mib", "boot test memory"),
    ("validation.boot_timeout_secs", "wait-for-boot timeout"),
    ("validation.screenshot", "boot test screenshot"),
    ("validation.command", "boot test guest command"),
    ("validation.expect_exit", "guest command exit code"),
    ("validation.expect_output", "guest command output"),
    ("validation.domain_type", "boot test domain type"),
    ("knib.data.path", "knib's native data path or qemu-img"),
];

/// How compression jobs run (see the module's table for the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionSettings {
    /// Whether `jobs run` runs compression jobs (queued ones wait when not).
    pub enabled: bool,
    /// Compression jobs running at once on one host, all runners together.
    pub max_concurrent_per_host: u32,
    /// Retries after a failed attempt (so at most `1 + max_retries` attempts).
    pub max_retries: u32,
    /// Seconds between a failed attempt and the next.
    pub retry_interval_secs: u64,
    /// Time budget of one attempt, in seconds; 0 = no limit.
    pub timeout_secs: u64,
    /// Refuse to compress unless the store has this many times the backup
    /// file's size free.
    pub min_free_factor: f64,
    /// qemu-img coroutines (`-m`), 1 to 16.
    pub coroutines: u32,
    /// Rate limit in MB/s; 0 = none.
    pub rate_limit_mbps: u64,
    /// zstd or zlib (zlib is used for qcow2 v2 files whatever is set).
    pub library: CompressionLibrary,
}

impl Default for CompressionSettings {
    fn default() -> Self {
        CompressionSettings {
            enabled: true,
            max_concurrent_per_host: 5,
            max_retries: 2,
            retry_interval_secs: 3600,
            timeout_secs: 28800,
            min_free_factor: 1.0,
            coroutines: 1,
            rate_limit_mbps: 0,
            library: CompressionLibrary::Zstd,
        }
    }
}

/// How validation jobs run (see the module's table for the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationSettings {
    /// Whether `jobs run` runs validation jobs (queued ones wait when not).
    pub enabled: bool,
    /// Validation jobs running at once on one host, all runners together.
    pub max_concurrent_per_host: u32,
    /// Retries after an attempt that could not run (a backup found bad is
    /// failed at once: checking it again would not change it).
    pub max_retries: u32,
    /// Seconds between such an attempt and the next.
    pub retry_interval_secs: u64,
    /// Time budget of one attempt, in seconds; 0 = no limit.
    pub timeout_secs: u64,
    /// Boot the backup in a throwaway domain.
    pub boot: bool,
    /// The libvirt URI of the boot test.
    pub connect: String,
    /// A kernel to boot directly.
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Seconds the guest agent has to answer.
    pub boot_timeout_secs: u64,
    /// Save a screenshot.
    pub screenshot: bool,
    /// A command to run in the guest: program then arguments.
    pub command: Vec<String>,
    /// The exit code the command must end with.
    pub expect_exit: Option<i64>,
    /// The output the command must print.
    pub expect_output: Option<String>,
    /// libvirt's domain type (`kvm` or `qemu`); none = chosen by the host.
    pub domain_type: Option<String>,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            enabled: true,
            max_concurrent_per_host: 1,
            max_retries: 2,
            retry_interval_secs: 3600,
            timeout_secs: 3600,
            boot: false,
            connect: "qemu:///system".into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: 512,
            boot_timeout_secs: 300,
            screenshot: true,
            command: Vec::new(),
            expect_exit: None,
            expect_output: None,
            domain_type: None,
        }
    }
}

/// The settings of a store.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Settings {
    /// Compression jobs.
    pub compression: CompressionSettings,
    /// Validation jobs.
    pub validation: ValidationSettings,
    /// Backup copies, compressions and restores: knib's native qcow2 data
    /// path (default) or `qemu-img convert` (`knib.data.path`).
    #[serde(default)]
    pub data_path: DataPath,
}

fn flatten(prefix: &str, obj: &serde_json::Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (k, v) in obj {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Object(inner) if !SETTING_KEYS.iter().any(|(s, _)| *s == key) => flatten(&key, inner, out),
            _ => out.push((key, v.clone())),
        }
    }
}

impl Settings {
    /// The settings of the store at `store_root`: its `knib.json`, or the
    /// defaults when there is none.
    pub fn load(store_root: &Path) -> Result<Settings> {
        let path = store_root.join(SETTINGS_FILE);
        // Read without following a link: the file is part of the store.
        match super::confine::read(store_root, Path::new(SETTINGS_FILE), "settings")? {
            Some(text) => {
                let text = String::from_utf8(text)
                    .map_err(|_| KnibError::invalid(format!("settings {}: not UTF-8 text", path.display())))?;
                Settings::from_json(&text, &path.display().to_string())
            }
            None => Ok(Settings::default()),
        }
    }

    /// Parse settings; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Settings> {
        let bad = |what: String| KnibError::invalid(format!("settings {origin}: {what}"));
        crate::json::check_unique_keys(text.as_bytes()).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(top) = v else {
            return Err(bad("must be a JSON object".into()));
        };
        match top.get("schema") {
            Some(s) if s.as_u64() == Some(SETTINGS_SCHEMA as u64) => {}
            Some(s) => return Err(bad(format!("schema is {s}; this knib reads schema {SETTINGS_SCHEMA}"))),
            None => return Err(bad(format!("has no \"schema\" field (add \"schema\": {SETTINGS_SCHEMA})"))),
        }
        let mut body = top.clone();
        body.remove("schema");
        let mut pairs = Vec::new();
        flatten("", &body, &mut pairs);
        let mut s = Settings::default();
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in pairs {
            if seen.contains(&key) {
                return Err(bad(format!("key {key:?} is given twice")));
            }
            seen.push(key.clone());
            let c = &mut s.compression;
            let val = &mut s.validation;
            let type_err = |want: &str| bad(format!("{key} must be {want}, not {value}"));
            let uint = |max: u64| value.as_u64().filter(|n| *n <= max);
            let boolean = || value.as_bool().ok_or_else(|| type_err("true or false"));
            let text = || value.as_str().map(str::to_string).ok_or_else(|| type_err("a string"));
            let path = || {
                value
                    .as_str()
                    .filter(|p| p.starts_with('/'))
                    .map(PathBuf::from)
                    .ok_or_else(|| type_err("an absolute path"))
            };
            match key.as_str() {
                "validation.enabled" => val.enabled = boolean()?,
                "validation.max_concurrent_per_host" => {
                    val.max_concurrent_per_host =
                        uint(1024).filter(|n| *n >= 1).ok_or_else(|| type_err("a whole number from 1 to 1024"))? as u32
                }
                "validation.max_retries" => {
                    val.max_retries = uint(1_000_000).ok_or_else(|| type_err("a whole number, 0 or more"))? as u32
                }
                "validation.retry_interval_secs" => {
                    val.retry_interval_secs =
                        uint(u32::MAX as u64).ok_or_else(|| type_err("a number of seconds, 0 or more"))?
                }
                "validation.timeout_secs" => {
                    val.timeout_secs = uint(u32::MAX as u64)
                        .ok_or_else(|| type_err("a number of seconds, 0 or more (0 = no limit)"))?
                }
                "validation.boot" => val.boot = boolean()?,
                "validation.connect" => val.connect = text()?,
                "validation.kernel" => val.kernel = Some(path()?),
                "validation.initrd" => val.initrd = Some(path()?),
                "validation.cmdline" => val.cmdline = Some(text()?),
                "validation.memory_mib" => {
                    val.memory_mib =
                        uint(1 << 20).filter(|n| *n >= 64).ok_or_else(|| type_err("a number of MiB, 64 or more"))?
                }
                "validation.boot_timeout_secs" => {
                    val.boot_timeout_secs = uint(u32::MAX as u64)
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| type_err("a number of seconds, 1 or more"))?
                }
                "validation.screenshot" => val.screenshot = boolean()?,
                "validation.command" => {
                    let want = "a list of strings, the program (an absolute path in the guest) first";
                    let list = value.as_array().ok_or_else(|| type_err(want))?;
                    let words: Option<Vec<String>> = list.iter().map(|w| w.as_str().map(str::to_string)).collect();
                    let words = words
                        .filter(|w| w.first().is_some_and(|p| p.starts_with('/')))
                        .ok_or_else(|| type_err(want))?;
                    val.command = words;
                }
                "validation.expect_exit" => {
                    val.expect_exit = Some(value.as_i64().ok_or_else(|| type_err("a whole number"))?)
                }
                "validation.expect_output" => val.expect_output = Some(text()?),
                "validation.domain_type" => {
                    let t = text()?;
                    if t != "kvm" && t != "qemu" {
                        return Err(type_err("\"kvm\" or \"qemu\""));
                    }
                    val.domain_type = Some(t);
                }
                "compression.enabled" => c.enabled = value.as_bool().ok_or_else(|| type_err("true or false"))?,
                "compression.max_concurrent_per_host" => {
                    c.max_concurrent_per_host =
                        uint(1024).filter(|n| *n >= 1).ok_or_else(|| type_err("a whole number from 1 to 1024"))? as u32
                }
                "compression.max_retries" => {
                    c.max_retries = uint(1_000_000).ok_or_else(|| type_err("a whole number, 0 or more"))? as u32
                }
                "compression.retry_interval_secs" => {
                    c.retry_interval_secs =
                        uint(u32::MAX as u64).ok_or_else(|| type_err("a number of seconds, 0 or more"))?
                }
                "compression.timeout_secs" => {
                    c.timeout_secs = uint(u32::MAX as u64)
                        .ok_or_else(|| type_err("a number of seconds, 0 or more (0 = no limit)"))?
                }
                "compression.min_free_factor" => {
                    c.min_free_factor = value
                        .as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .ok_or_else(|| type_err("a number, 0 or more"))?
                }
                "compression.coroutines" => {
                    c.coroutines =
                        uint(16).filter(|n| *n >= 1).ok_or_else(|| type_err("a whole number from 1 to 16"))? as u32
                }
                "compression.rate_limit_mbps" => {
                    // CloudStack: less than 1 means no limit.
                    c.rate_limit_mbps =
                        value.as_i64().ok_or_else(|| type_err("a whole number of MB/s (less than 1 = none)"))?.max(0)
                            as u64
                }
                "compression.library" => {
                    c.library = value
                        .as_str()
                        .ok_or_else(|| type_err("\"zstd\" or \"zlib\""))?
                        .parse()
                        .map_err(|_| type_err("\"zstd\" or \"zlib\""))?
                }
                "knib.data.path" => {
                    s.data_path = value
                        .as_str()
                        .ok_or_else(|| type_err("\"native\" or \"qemu-img\""))?
                        .parse()
                        .map_err(|_| type_err("\"native\" or \"qemu-img\""))?
                }
                _ => {
                    let known: Vec<&str> = SETTING_KEYS.iter().map(|(k, _)| *k).collect();
                    return Err(bad(format!("unknown key {key:?} (known keys: schema, {})", known.join(", "))));
                }
            }
        }
        Ok(s)
    }

    /// The settings as the file would hold them (flat keys, every one).
    pub fn to_json(&self) -> Value {
        let c = &self.compression;
        let mut v = serde_json::json!({
            "schema": SETTINGS_SCHEMA,
            "compression.enabled": c.enabled,
            "compression.max_concurrent_per_host": c.max_concurrent_per_host,
            "compression.max_retries": c.max_retries,
            "compression.retry_interval_secs": c.retry_interval_secs,
            "compression.timeout_secs": c.timeout_secs,
            "compression.min_free_factor": c.min_free_factor,
            "compression.coroutines": c.coroutines,
            "compression.rate_limit_mbps": c.rate_limit_mbps,
            "compression.library": c.library.as_str(),
            "knib.data.path": self.data_path.as_str(),
        });
        if let (Value::Object(out), Value::Object(val)) =
            (&mut v, serde_json::to_value(&self.validation).expect("settings serialize"))
        {
            for (k, x) in val {
                let unset = x.is_null() || x.as_array().is_some_and(|a| a.is_empty());
                if !unset {
                    out.insert(format!("validation.{k}"), x);
                }
            }
        }
        v
    }

    /// The compression options of a compression job.
    pub fn compress_options(&self) -> CompressOptions {
        let c = &self.compression;
        CompressOptions {
            library: c.library,
            coroutines: c.coroutines,
            rate_limit_mbps: c.rate_limit_mbps,
            min_free_factor: c.min_free_factor,
            data_path: self.data_path,
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            (c.max_concurrent_per_host, c.max_retries, c.retry_interval_secs, c.timeout_secs),
            (5, 2, 3600, 28800)
        );
        assert_eq!((c.min_free_factor, c.coroutines, c.rate_limit_mbps), (1.0, 1, 0));
        assert_eq!(c.library, CompressionLibrary::Zstd);
        let v = &s.validation;
        assert!(v.enabled && !v.boot && v.screenshot);
        assert_eq!((v.max_concurrent_per_host, v.max_retries, v.timeout_secs), (1, 2, 3600));
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
        let v = parse(
            r#"{"schema": 1, "validation": {"boot": true, "kernel": "/boot/vmlinuz", "command": ["/bin/uname", "-s"],
                "expect_output": "Linux", "max_concurrent_per_host": 2, "domain_type": "qemu"}}"#,
        )
        .unwrap();
        assert!(v.validation.boot);
        assert_eq!(v.validation.kernel.as_deref(), Some(Path::new("/boot/vmlinuz")));
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
            (r#"{"schema": 1, "compression.library": "lz4"}"#, "compression.library"),
            (r#"{"schema": 1, "compression.timeout_secs": 1.5}"#, "compression.timeout_secs"),
            (r#"{"schema": 1, "validation.command": ["uname"]}"#, "validation.command"),
            (r#"{"schema": 1, "validation.kernel": "vmlinuz"}"#, "validation.kernel"),
            (r#"{"schema": 1, "validation.domain_type": "xen"}"#, "validation.domain_type"),
            (r#"{"schema": 1, "validation": {"boot": "yes"}}"#, "validation.boot"),
            (r#"{"schema": 1, "knib.data.path": "qemu"}"#, "knib.data.path"),
            (r#"{"schema": 1, "knib": {"data": {"path": 1}}}"#, "knib.data.path"),
            (r#"{"schema": 1, "compression.enabled": true, "compression": {"enabled": false}}"#, "given twice"),
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
}
