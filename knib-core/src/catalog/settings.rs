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
//! | `compression.rate_limit_mbps` | `backup.compression.rate.limit` (MB/s, < 1 = none, at most 1000000) | `0` |
//! | `compression.library` | offering's `compressionlibrary` (`zstd` or `zlib`) | `"zstd"` |
//! | `compression.check_output` | (knib: read each compressed copy back and compare it with the backup before it replaces it; and each backup compressed as it is copied, before it is kept) | `false` |
//! | `validation.enabled` | (offering's `validate`; job processing on) | `true` |
//! | `validation.max_concurrent_per_host` | (validation jobs at once on a host) | `1` |
//! | `validation.max_retries` | (retries of a validation that could not run) | `2` |
//! | `validation.retry_interval_secs` | | `3600` |
//! | `validation.timeout_secs` | (one validation job; 0 = no limit) | `3600` |
//! | `validation.boot` | (boot test in validation jobs) | `false` |
//! | `validation.connect` | libvirt URI of the boot test: local QEMU only (`qemu:///system`, `qemu:///session`, `qemu+unix:///...`) | `"qemu:///system"` |
//! | `validation.kernel`, `validation.initrd`, `validation.cmdline` | boot a kernel directly (else the first disk through the firmware); kernel and initrd are files of the store, relative to it | none |
//! | `validation.memory_mib` | guest memory | `512` |
//! | `validation.boot_timeout_secs` | wait for `guest-sync` | `300` |
//! | `validation.screenshot` | save a PNG screenshot (`STORE/jobs/<job>.png`) | `true` |
//! | `validation.command` | `["/path", "arg", ...]` run through `guest-exec` | none |
//! | `validation.expect_exit` | exit code the command must end with | `0` |
//! | `validation.expect_output` | output it must print (trailing white space ignored) | none |
//! | `validation.domain_type` | `kvm` or `qemu` | chosen by the host |
//! | `validation.max_write_mib` | (knib: the most the boot test's guest may write, 1 to 1048576 MiB; it always leaves 1 GiB free) | none |
//! | `sync.enabled` | (sync jobs processed) | `true` |
//! | `sync.auto` | (queue a sync job of the VM after each backup) | `false` |
//! | `sync.vault` | (the vault sync jobs send to: `s3://bucket/prefix`) | none |
//! | `sync.max_concurrent_per_host` | (sync jobs at once on a host) | `2` |
//! | `sync.max_retries` | (retries of a failed sync) | `2` |
//! | `sync.retry_interval_secs` | | `600` |
//! | `sync.timeout_secs` | (one sync job; 0 = no limit) | `28800` |
//! | `sync.rate_limit_mbps` | (MB/s read and sent by one sync job, < 1 = none, at most 1000000) | `0` |
//! | `sync.part_size_mib` | (part of a multipart upload, 5 to 512) | `5` |
//! | `sync.parallel_parts` | (parts in flight at once, 1 to 16) | `2` |
//! | `group.max_concurrent_copies` | (knib: members of a group backup copied at once, after the thaw) | `4` |
//! | `knib.data.path` | (knib: who moves the bytes of copies, compressions, restores) | `"native"` (or `"qemu-img"`) |
//!
//! A validation job always runs `qemu-img check` on every file of the
//! backup's chains, compares backing pointers and sizes with the manifest,
//! and checks the hash (recorded at backup time or the first success); with
//! `validation.boot` it also boots the backup.
//!
//! Keys may be written flat (`{"schema": 1, "compression.max_retries": 3}`)
//! or nested (`{"schema": 1, "compression": {"max_retries": 3}}`), or both
//! in one file. An unknown key, a key given twice (in one object, or once
//! flat and once nested), a value of the wrong type or out of range is an
//! [`crate::ErrorKind::InvalidInput`] error naming the key.
//!
//! How: the flat keys are expanded into the nested object, which serde
//! reads into [`Settings`] (every section refuses unknown fields and takes
//! its defaults for keys left out; the ranges are checked by the fields'
//! deserializers), and `serde_path_to_error` names the key of an error.

use std::path::{Path, PathBuf};

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    ("compression.check_output", "knib: compressed copies read back"),
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
    ("validation.max_write_mib", "knib: boot test write limit"),
    ("sync.enabled", "sync jobs processed"),
    ("sync.auto", "sync job queued after each backup"),
    ("sync.vault", "vault of the sync jobs"),
    ("sync.max_concurrent_per_host", "sync jobs per host"),
    ("sync.max_retries", "sync job retries"),
    ("sync.retry_interval_secs", "sync retry interval"),
    ("sync.timeout_secs", "sync job timeout"),
    ("sync.rate_limit_mbps", "sync rate limit"),
    ("sync.part_size_mib", "sync multipart part size"),
    ("sync.parallel_parts", "sync parts in flight"),
    ("group.max_concurrent_copies", "group backup members copied at once"),
    ("knib.data.path", "knib's native data path or qemu-img"),
];

/// The default part of a sync's multipart uploads, in MiB: S3's least
/// (the vault's `DEFAULT_PART_SIZE` follows it).
pub const DEFAULT_SYNC_PART_SIZE_MIB: u32 = 5;
/// The default number of a sync's parts read or in flight at once.
pub const DEFAULT_SYNC_PARALLEL_PARTS: u32 = 2;

/// How sync jobs run: they send a VM's backups to a vault on S3 (see the
/// module's table for the keys, and [`super::jobs`] for what a job sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    /// Whether `jobs run` runs sync jobs (queued ones wait when not).
    pub enabled: bool,
    /// Queue a sync job of the VM after each backup (with `enabled`).
    pub auto: bool,
    /// The vault sync jobs send to: `s3://bucket/prefix` (endpoint, region
    /// and credentials from the usual AWS environment variables and files,
    /// never from this file).
    #[serde(deserialize_with = "vault_location", skip_serializing_if = "Option::is_none")]
    pub vault: Option<String>,
    /// Sync jobs running at once on one host, all runners together.
    #[serde(deserialize_with = "per_host")]
    pub max_concurrent_per_host: u32,
    /// Retries after a failed attempt (refused credentials fail at once).
    #[serde(deserialize_with = "retries")]
    pub max_retries: u32,
    /// Seconds between a failed attempt and the next.
    #[serde(deserialize_with = "seconds")]
    pub retry_interval_secs: u64,
    /// Time budget of one attempt, in seconds; 0 = no limit.
    #[serde(deserialize_with = "seconds")]
    pub timeout_secs: u64,
    /// MB/s one sync job reads and sends; 0 = none.
    #[serde(deserialize_with = "rate_limit")]
    pub rate_limit_mbps: u64,
    /// MiB per part of a multipart upload, 5 to 512.
    #[serde(deserialize_with = "part_size")]
    pub part_size_mib: u32,
    /// Parts in flight at once, 1 to 16 (memory: their product with the
    /// part size, per running job).
    #[serde(deserialize_with = "parallel_parts")]
    pub parallel_parts: u32,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            enabled: true,
            auto: false,
            vault: None,
            max_concurrent_per_host: 2,
            max_retries: 2,
            retry_interval_secs: 600,
            timeout_secs: 28800,
            rate_limit_mbps: 0,
            part_size_mib: DEFAULT_SYNC_PART_SIZE_MIB,
            parallel_parts: DEFAULT_SYNC_PARALLEL_PARTS,
        }
    }
}

/// How group backups run (see the module's table for the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    /// Members of a group backup copied at once (1 to 1024).
    #[serde(deserialize_with = "per_host")]
    pub max_concurrent_copies: u32,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings { max_concurrent_copies: 4 }
    }
}

/// How compression jobs run (see the module's table for the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionSettings {
    /// Whether `jobs run` runs compression jobs (queued ones wait when not).
    pub enabled: bool,
    /// Compression jobs running at once on one host, all runners together.
    #[serde(deserialize_with = "per_host")]
    pub max_concurrent_per_host: u32,
    /// Retries after a failed attempt (so at most `1 + max_retries` attempts).
    #[serde(deserialize_with = "retries")]
    pub max_retries: u32,
    /// Seconds between a failed attempt and the next.
    #[serde(deserialize_with = "seconds")]
    pub retry_interval_secs: u64,
    /// Time budget of one attempt, in seconds; 0 = no limit.
    #[serde(deserialize_with = "seconds")]
    pub timeout_secs: u64,
    /// Refuse to compress unless the store has this many times the backup
    /// file's size free.
    #[serde(deserialize_with = "factor")]
    pub min_free_factor: f64,
    /// qemu-img coroutines (`-m`), 1 to 16.
    #[serde(deserialize_with = "coroutines")]
    pub coroutines: u32,
    /// Rate limit in MB/s; 0 = none.
    #[serde(deserialize_with = "rate_limit")]
    pub rate_limit_mbps: u64,
    /// zstd or zlib (zlib is used for qcow2 v2 files whatever is set).
    pub library: CompressionLibrary,
    /// Read each compressed copy back and compare it with the backup file
    /// before it replaces it ([`CompressOptions::check_output`]), and each
    /// backup compressed as it is copied into the store before it is kept
    /// ([`super::BackupOptions::check_output`]).
    pub check_output: bool,
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
            check_output: false,
        }
    }
}

/// How validation jobs run (see the module's table for the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSettings {
    /// Whether `jobs run` runs validation jobs (queued ones wait when not).
    pub enabled: bool,
    /// Validation jobs running at once on one host, all runners together.
    #[serde(deserialize_with = "per_host")]
    pub max_concurrent_per_host: u32,
    /// Retries after an attempt that could not run (a backup found bad is
    /// failed at once: checking it again would not change it).
    #[serde(deserialize_with = "retries")]
    pub max_retries: u32,
    /// Seconds between such an attempt and the next.
    #[serde(deserialize_with = "seconds")]
    pub retry_interval_secs: u64,
    /// Time budget of one attempt, in seconds; 0 = no limit.
    #[serde(deserialize_with = "seconds")]
    pub timeout_secs: u64,
    /// Boot the backup in a throwaway domain.
    pub boot: bool,
    /// The libvirt URI of the boot test: a local QEMU one (a store's file
    /// picks no remote host, nor a transport that runs a program, such as
    /// `qemu+ext:///system?command=...`). Checked when a boot test runs
    /// (any other value fails that validation, naming it), not when the
    /// settings are read: a store set up before keeps its backups going.
    pub connect: String,
    /// A kernel to boot directly: a file of the store, relative to it (a
    /// store's file names no host file; the boot test copies it out of the
    /// store without following links). Checked when a boot test runs, as
    /// `connect` is (an absolute path, which knib once took, fails it).
    #[serde(deserialize_with = "some_path", skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Its initrd, the same way.
    #[serde(deserialize_with = "some_path", skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Its command line.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[serde(deserialize_with = "memory")]
    pub memory_mib: u64,
    /// Seconds the guest agent has to answer.
    #[serde(deserialize_with = "boot_seconds")]
    pub boot_timeout_secs: u64,
    /// Save a screenshot.
    pub screenshot: bool,
    /// A command to run in the guest: program then arguments.
    #[serde(deserialize_with = "guest_command", skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The exit code the command must end with.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub expect_exit: Option<i64>,
    /// The output the command must print.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub expect_output: Option<String>,
    /// libvirt's domain type (`kvm` or `qemu`); none = chosen by the host.
    #[serde(deserialize_with = "domain_type", skip_serializing_if = "Option::is_none")]
    pub domain_type: Option<String>,
    /// The most the boot test's guest may write to its overlays and console
    /// log, in MiB ([`crate::engine::validate`]'s `max_write_bytes`); none
    /// = no limit but the free space it always leaves.
    #[serde(deserialize_with = "write_limit", skip_serializing_if = "Option::is_none")]
    pub max_write_mib: Option<u64>,
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
            max_write_mib: None,
        }
    }
}

/// The settings of a store. As serde reads and writes it, it is the nested
/// form of the file without its `schema` (`{"compression": {..},
/// "validation": {..}, "knib": {"data": {"path": ..}}}`); [`Settings::load`]
/// and [`Settings::from_json`] read the file itself.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Compression jobs.
    pub compression: CompressionSettings,
    /// Validation jobs.
    pub validation: ValidationSettings,
    /// Sync jobs.
    pub sync: SyncSettings,
    /// Group backups.
    pub group: GroupSettings,
    /// Backup copies, compressions and restores: knib's native qcow2 data
    /// path (default) or `qemu-img convert` (`knib.data.path`).
    #[serde(rename = "knib", with = "knib_section")]
    pub data_path: DataPath,
}

/// The `knib` section: `{"data": {"path": "native"}}`.
mod knib_section {
    use super::*;

    #[derive(Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Knib {
        data: Data,
    }

    #[derive(Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Data {
        path: DataPath,
    }

    pub fn serialize<S: serde::Serializer>(path: &DataPath, s: S) -> std::result::Result<S::Ok, S::Error> {
        Knib { data: Data { path: *path } }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<DataPath, D::Error> {
        Ok(Knib::deserialize(d)?.data.path)
    }
}

// The fields' deserializers: the type by serde, then the range.

type De<T, E> = std::result::Result<T, E>;

/// A whole number from `min` to `max`, or an error saying so.
fn whole<'de, D: Deserializer<'de>>(d: D, min: u64, max: u64, want: &str) -> De<u64, D::Error> {
    let n = u64::deserialize(d)?;
    if n < min || n > max {
        return Err(D::Error::custom(format!("must be {want}, not {n}")));
    }
    Ok(n)
}

fn per_host<'de, D: Deserializer<'de>>(d: D) -> De<u32, D::Error> {
    whole(d, 1, 1024, "a whole number from 1 to 1024").map(|n| n as u32)
}

fn retries<'de, D: Deserializer<'de>>(d: D) -> De<u32, D::Error> {
    whole(d, 0, 1_000_000, "a whole number from 0 to 1000000").map(|n| n as u32)
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> De<u64, D::Error> {
    whole(d, 0, u32::MAX as u64, "a number of seconds from 0 to 4294967295")
}

fn boot_seconds<'de, D: Deserializer<'de>>(d: D) -> De<u64, D::Error> {
    whole(d, 1, u32::MAX as u64, "a number of seconds, 1 or more")
}

fn coroutines<'de, D: Deserializer<'de>>(d: D) -> De<u32, D::Error> {
    whole(d, 1, 16, "a whole number from 1 to 16").map(|n| n as u32)
}

fn part_size<'de, D: Deserializer<'de>>(d: D) -> De<u32, D::Error> {
    whole(d, 5, 512, "a number of MiB from 5 to 512").map(|n| n as u32)
}

fn parallel_parts<'de, D: Deserializer<'de>>(d: D) -> De<u32, D::Error> {
    whole(d, 1, 16, "a whole number from 1 to 16").map(|n| n as u32)
}

/// `s3://bucket[/prefix]` (checked whole when the vault is opened).
fn vault_location<'de, D: Deserializer<'de>>(d: D) -> De<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if !super::is_vault(&s) || s.len() <= "s3://".len() {
        return Err(D::Error::custom(format!("must be a vault location, s3://BUCKET/PREFIX, not {s:?}")));
    }
    Ok(Some(s))
}

fn write_limit<'de, D: Deserializer<'de>>(d: D) -> De<Option<u64>, D::Error> {
    whole(d, 1, 1 << 20, "a number of MiB from 1 to 1048576").map(Some)
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> De<u64, D::Error> {
    whole(d, 64, 1 << 20, "a number of MiB from 64 to 1048576")
}

fn factor<'de, D: Deserializer<'de>>(d: D) -> De<f64, D::Error> {
    let f = f64::deserialize(d)?;
    if !(f.is_finite() && f >= 0.0) {
        return Err(D::Error::custom(format!("must be a number, 0 or more, not {f}")));
    }
    Ok(f)
}

/// CloudStack: a rate limit below 1 means none; at most
/// [`crate::engine::compress::MAX_RATE_LIMIT_MBPS`].
fn rate_limit<'de, D: Deserializer<'de>>(d: D) -> De<u64, D::Error> {
    let max = crate::engine::compress::MAX_RATE_LIMIT_MBPS;
    let v = i64::deserialize(d)?;
    if v > max as i64 {
        return Err(D::Error::custom(format!("must be at most {max} MB/s (below 1: no limit), not {v}")));
    }
    Ok(v.max(0) as u64)
}

/// A value that is present (`null` is not a value here).
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> De<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn some_path<'de, D: Deserializer<'de>>(d: D) -> De<Option<PathBuf>, D::Error> {
    Ok(Some(PathBuf::deserialize(d)?))
}

/// The file of the store that setting `key` (`validation.kernel`,
/// `validation.initrd`) names: a plain path relative to the store (no
/// leading `/`, no `.` or `..`); anything else is an error naming it.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) fn store_relative(key: &str, p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() || !p.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
        return Err(KnibError::invalid(format!(
            "setting {key} must be a path inside the store, relative to it (no leading /, no . or ..), not {:?}: a store's settings name no host file",
            p.display().to_string()
        )));
    }
    Ok(p.to_path_buf())
}

/// Whether `uri` is a libvirt URI of the local QEMU driver: `qemu` or
/// `qemu+unix`, no host, path `/system` or `/session`, no parameters.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) fn is_local_qemu_uri(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("qemu:///").or_else(|| uri.strip_prefix("qemu+unix:///")) else {
        return false;
    };
    matches!(rest, "system" | "session")
}

fn guest_command<'de, D: Deserializer<'de>>(d: D) -> De<Vec<String>, D::Error> {
    let words = Vec::<String>::deserialize(d)?;
    if !words.first().is_some_and(|p| p.starts_with('/')) {
        return Err(D::Error::custom(format!(
            "must be a list of strings, the program (an absolute path in the guest) first, not {words:?}"
        )));
    }
    Ok(words)
}

fn domain_type<'de, D: Deserializer<'de>>(d: D) -> De<Option<String>, D::Error> {
    let t = String::deserialize(d)?;
    if t != "kvm" && t != "qemu" {
        return Err(D::Error::custom(format!("must be \"kvm\" or \"qemu\", not {t:?}")));
    }
    Ok(Some(t))
}

/// Put `value` at the dotted `key` of `into`, splitting the key and
/// merging objects; a leaf reached twice is an error naming its key, and
/// so is a key of more than `most_parts` parts with its prefix (said before
/// it is split: its parts nest one call each, and a nested object's key of
/// ten thousand parts overflowed the stack).
fn insert_dotted(
    into: &mut Map<String, Value>,
    key: &str,
    value: Value,
    prefix: &str,
    most_parts: usize,
) -> std::result::Result<(), String> {
    let above = if prefix.is_empty() { 0 } else { prefix.split('.').count() };
    let parts = above + key.split('.').count();
    if parts > most_parts {
        let whole = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
        let shown: String = whole.chars().take(80).collect();
        let cut = if shown.len() < whole.len() { "..." } else { "" };
        return Err(format!("unknown key \"{shown}{cut}\" ({parts} parts; no key has more than {most_parts})"));
    }
    let (first, rest) = match key.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (key, None),
    };
    let full = if prefix.is_empty() { first.to_string() } else { format!("{prefix}.{first}") };
    let (rest, value) = match (rest, value) {
        (Some(rest), value) => (Some(rest), value),
        // A nested object: its keys are inserted one by one, so they may be
        // dotted too and may meet keys given flat.
        (None, Value::Object(inner)) => {
            let slot = into.entry(first).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(slot) = slot else { return Err(format!("key {full:?} is given twice")) };
            for (k, v) in inner {
                insert_dotted(slot, &k, v, &full, most_parts)?;
            }
            return Ok(());
        }
        (None, value) => (None, value),
    };
    match rest {
        Some(rest) => {
            let slot = into.entry(first).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(slot) = slot else { return Err(format!("key {full:?} is given twice")) };
            insert_dotted(slot, rest, value, &full, most_parts)
        }
        None if into.contains_key(first) => Err(format!("key {full:?} is given twice")),
        None => {
            into.insert(first.to_string(), value);
            Ok(())
        }
    }
}

/// The leaf keys of `v`, dotted (`"a": {"b": 1}` gives `a.b`).
fn leaf_keys(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                leaf_keys(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out)
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

impl Settings {
    /// The settings of the store at `store_root`: its `knib.json`, or the
    /// defaults when there is none.
    pub fn load(store_root: &Path) -> Result<Settings> {
        let path = store_root.join(SETTINGS_FILE);
        // Read without following a link: the file is part of the store. A
        // store path that is not a directory is said so, as everywhere.
        let read = super::confine::read(store_root, Path::new(SETTINGS_FILE), "settings")
            .map_err(|e| super::or_not_a_directory(store_root, e))?;
        match read {
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
        let Value::Object(mut top) = v else {
            return Err(bad("must be a JSON object".into()));
        };
        match top.remove("schema") {
            Some(s) if s.as_u64() == Some(SETTINGS_SCHEMA as u64) => {}
            Some(s) => return Err(bad(format!("schema is {s}; this knib reads schema {SETTINGS_SCHEMA}"))),
            None => return Err(bad(format!("has no \"schema\" field (add \"schema\": {SETTINGS_SCHEMA})"))),
        }
        // A key of more parts than any known one is unknown (see
        // `insert_dotted`), shown cut short.
        let most_parts = SETTING_KEYS.iter().map(|(k, _)| k.split('.').count()).max().unwrap_or(1);
        let mut nested = Map::new();
        for (k, v) in top {
            insert_dotted(&mut nested, &k, v, "", most_parts).map_err(bad)?;
        }
        let nested = Value::Object(nested);
        serde_path_to_error::deserialize::<_, Settings>(&nested).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner().to_string();
            if inner.starts_with("unknown field") {
                // Name the whole key as written, not only the section that
                // does not know it.
                let mut leaves = Vec::new();
                leaf_keys("", &nested, &mut leaves);
                let under = format!("{key}.");
                let written = leaves.into_iter().find(|l| *l == key || l.starts_with(&under)).unwrap_or(key);
                let known: Vec<&str> = SETTING_KEYS.iter().map(|(k, _)| *k).collect();
                bad(format!("unknown key {written:?} (known keys: schema, {})", known.join(", ")))
            } else {
                bad(format!("{key}: {inner}"))
            }
        })
    }

    /// The settings as the file would hold them (flat keys, every one that
    /// is set).
    pub fn to_json(&self) -> Value {
        let nested = serde_json::to_value(self).expect("settings serialize");
        let mut leaves = Vec::new();
        leaf_keys("", &nested, &mut leaves);
        let mut out = Map::new();
        out.insert("schema".into(), SETTINGS_SCHEMA.into());
        for key in leaves {
            let v = key.split('.').fold(&nested, |v, k| &v[k]);
            out.insert(key, v.clone());
        }
        Value::Object(out)
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
            check_output: c.check_output,
        }
    }
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
