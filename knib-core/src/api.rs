//! One request/answer schema for every binding: each operation takes a JSON
//! object and gives one back. The C ABI and the JNI bridge hand a request to
//! [`call`] and return its answer or its [`KnibError`]; they hold no logic.
//!
//! # Schema (version 1)
//!
//! Every request is a JSON object. It may carry `"schema": 1`; any other
//! number is refused. Unknown fields are refused, naming the field, so a
//! misspelt option never goes unnoticed. Paths are strings. Operations:
//!
//! | op | request fields | answer |
//! |---|---|---|
//! | `version` | (none) | `{"version": "x.y.z", "schema": 1}` |
//! | `backup` | `store`, `vm` + `disks` (`[{"name","path"}]`) or `domain` (+ `connect`, `quiesce`), `full`, `isolated`, `chain_size` (default 8), `compress` (`zstd`/`zlib`: compressed as copied, one pass) | a backup |
//! | `list` | `store`, `vm`? | `[backup, ...]` |
//! | `show` | `store`, `backup` | a backup |
//! | `restore` | `store`, `backup`, `volume`, `to`, `format` (`qcow2`/`raw`) | `{"restored": id, "volume", "to"}` |
//! | `quick_restore` | `store`, `backup`, `domain`, `connect`? | `{"overlays": [[target, path], ...]}` |
//! | `consolidate` | `domain`, `connect`? | `{"consolidated": [target, ...]}` |
//! | `compress` | `store`, `backup`, `library` (`zstd`/`zlib`), `coroutines` (1), `rate_limit_mbps` (0), `min_free_factor` (1.0) | a backup |
//! | `verify` | `store`, `backup`? | `[{"id","ok","problems","files_checked","chain_hashes"}]` |
//! | `hash` | `store`, `backup` | `{"backup": id, "chain_hashes": {volume: hex}}` |
//! | `delete` | `store`, `backup` | `{"expunged": [...], "marked_removed": [...]}` |
//! | `merge_snapshot` | `domain`, `connect`?, `disk` (target), `delta` (a file of its chain) | `{"disk", "active_file"}` |
//! | `recover` | `store`, `domain`, `connect`? | `{"backup_id","step","published","report"}` |
//! | `compress_files` | `files` (`[path]`), `library`, `coroutines`, `rate_limit_mbps`, `min_free_factor` | `{"compressed": [{"path","comp_path","original_size","compressed_size","library"}]}` |
//! | `finalize_files` | `files` (`[path]`), `backup_exists` (true) | `{"finalized": [path]}` or `{"discarded": [path]}` |
//! | `files.fs` | `store`, `backup`, `volume` | `{"filesystems": [{"index","partition","start","size","type","label"}]}` |
//! | `files.ls` | `store`, `backup`, `volume`, `fs`?, `path`? (`/`) | `{"entries": [{"name","type","size","mode","mtime","mtime_nsec","target"}]}` |
//! | `files.get` | `store`, `backup`, `volume`, `fs`?, `path`, `to` | `{"files","dirs","symlinks","bytes"}` |
//!
//! The `files.*` operations (file-level restore) are described in
//! [`crate::files`].
//!
//! `compress_files` and `finalize_files` are the engine's two compression
//! steps on explicit files, as CloudStack's agent runs them (`compress`
//! does both on a catalog backup and records it in the manifest):
//! `compress_files` writes `<file>.comp` beside each file (all removed on
//! failure or cancellation); `finalize_files` renames each `.comp` over its
//! file, or removes the `.comp` files when `backup_exists` is false.
//!
//! A backup is `{"id","vm","kind","parent","position","end_of_chain",
//! "created","compression","removed","volumes":[{"name","file","virtual_size",
//! "size","source","backing","hash"}]}` where `file` is the absolute path of
//! the volume's backup file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::catalog::{BackupOptions, DiskSpec, Manifest, Store, DEFAULT_CHAIN_SIZE};
use crate::engine::CompressOptions;
use crate::error::{KnibError, Result};
use crate::progress::Control;
use crate::qemu_img::{CompressionLibrary, ImageFormat};

pub use crate::wire::{DEFAULT_URI, SCHEMA};
#[cfg(feature = "libvirt")]
use crate::wire::domain;
#[cfg(not(feature = "libvirt"))]
use crate::wire::no_libvirt;
use crate::wire::{need, parse, to_json};

fn default_chain() -> i64 {
    DEFAULT_CHAIN_SIZE
}
fn default_one() -> u32 {
    1
}
fn default_factor() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupReq {
    store: PathBuf,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    disks: Vec<DiskSpec>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    connect: Option<String>,
    #[serde(default)]
    quiesce: bool,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    isolated: bool,
    #[serde(default = "default_chain")]
    chain_size: i64,
    #[serde(default)]
    compress: Option<CompressionLibrary>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreReq {
    store: PathBuf,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    backup: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    store: PathBuf,
    backup: String,
    volume: String,
    to: PathBuf,
    #[serde(default)]
    format: ImageFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainReq {
    #[serde(default)]
    store: Option<PathBuf>,
    #[serde(default)]
    backup: Option<String>,
    domain: String,
    #[serde(default)]
    connect: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeReq {
    domain: String,
    #[serde(default)]
    connect: Option<String>,
    disk: String,
    delta: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressReq {
    store: PathBuf,
    backup: String,
    #[serde(default)]
    library: CompressionLibrary,
    #[serde(default = "default_one")]
    coroutines: u32,
    #[serde(default)]
    rate_limit_mbps: u64,
    #[serde(default = "default_factor")]
    min_free_factor: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesReq {
    files: Vec<PathBuf>,
    #[serde(default)]
    library: CompressionLibrary,
    #[serde(default = "default_one")]
    coroutines: u32,
    #[serde(default)]
    rate_limit_mbps: u64,
    #[serde(default = "default_factor")]
    min_free_factor: f64,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FinalizeReq {
    files: Vec<PathBuf>,
    #[serde(default = "default_true")]
    backup_exists: bool,
}

/// A backup as every binding shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupView {
    /// Its id.
    pub id: String,
    /// Its VM.
    pub vm: String,
    /// "full", "incremental" or "isolated".
    pub kind: &'static str,
    /// The parent backup.
    pub parent: Option<String>,
    /// Position in the chain.
    pub position: u32,
    /// Whether it ended its chain.
    pub end_of_chain: bool,
    /// When it was taken.
    pub created: String,
    /// Compression, if compressed.
    pub compression: Option<crate::catalog::CompressionInfo>,
    /// Whether it was deleted (kept for its children).
    pub removed: bool,
    /// Its volumes, with absolute file paths.
    pub volumes: Vec<VolumeView>,
}

/// A volume of a backup as every binding shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    /// The volume's name.
    pub name: String,
    /// The backup file (absolute).
    pub file: PathBuf,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Bytes on the store.
    pub size: u64,
    /// The disk it came from.
    pub source: String,
    /// The backing pointer in the file.
    pub backing: Option<String>,
    /// The recorded hash.
    pub hash: Option<String>,
}

impl BackupView {
    /// The view of manifest `m` in `store`.
    pub fn new(store: &Store, m: &Manifest) -> BackupView {
        let dir = store.backup_dir(m);
        let dir = dir.canonicalize().unwrap_or(dir);
        BackupView {
            id: m.id.clone(),
            vm: m.vm.clone(),
            kind: m.kind.as_str(),
            parent: m.parent.clone(),
            position: m.position,
            end_of_chain: m.end_of_chain,
            created: m.created.clone(),
            compression: m.compression.clone(),
            removed: m.removed,
            volumes: m
                .volumes
                .iter()
                .map(|v| VolumeView {
                    name: v.name.clone(),
                    file: dir.join(&v.file),
                    virtual_size: v.virtual_size,
                    size: v.size,
                    source: v.source.clone(),
                    backing: v.backing.clone(),
                    hash: v.hash.clone(),
                })
                .collect(),
        }
    }
}

/// Run operation `op` on the JSON request `request`; the answer is JSON.
pub fn call(op: &str, request: &str, ctl: &Control) -> Result<String> {
    match op {
        "version" => {
            parse::<Empty>(op, request)?;
            to_json(&json!({"version": crate::VERSION, "schema": SCHEMA}))
        }
        "backup" => {
            let r: BackupReq = parse(op, request)?;
            let opts = BackupOptions { full: r.full, isolated: r.isolated, chain_size: r.chain_size, compress: r.compress };
            let store = Store::create(&r.store)?;
            let m = match (&r.vm, &r.domain) {
                (Some(vm), None) => store.backup(vm, &r.disks, &opts, ctl)?,
                (None, Some(d)) => {
                    if !r.disks.is_empty() {
                        return Err(KnibError::invalid("request of backup: field `disks` goes with `vm`, not `domain`"));
                    }
                    #[cfg(feature = "libvirt")]
                    {
                        store.backup_domain(&domain(r.connect.as_deref(), d)?, &opts, r.quiesce, ctl)?
                    }
                    #[cfg(not(feature = "libvirt"))]
                    {
                        let _ = (d, r.quiesce, &r.connect);
                        return Err(no_libvirt(op));
                    }
                }
                _ => return Err(KnibError::invalid("request of backup: give `vm` with `disks`, or `domain`")),
            };
            to_json(&BackupView::new(&store, &m))
        }
        "list" => {
            let r: StoreReq = parse(op, request)?;
            let store = Store::open(&r.store)?;
            let list: Vec<BackupView> =
                store.list(r.vm.as_deref())?.iter().map(|m| BackupView::new(&store, m)).collect();
            to_json(&list)
        }
        "show" => {
            let r: StoreReq = parse(op, request)?;
            let store = Store::open(&r.store)?;
            let m = store.show(&need(op, "backup", r.backup)?)?;
            to_json(&BackupView::new(&store, &m))
        }
        "restore" => {
            let r: RestoreReq = parse(op, request)?;
            Store::open(&r.store)?.restore(&r.backup, &r.volume, &r.to, r.format, ctl)?;
            to_json(&json!({"restored": r.backup, "volume": r.volume, "to": r.to}))
        }
        "quick_restore" | "consolidate" | "recover" => {
            let r: DomainReq = parse(op, request)?;
            #[cfg(feature = "libvirt")]
            {
                let vm = domain(r.connect.as_deref(), &r.domain)?;
                match op {
                    "quick_restore" => {
                        let store = Store::open(need(op, "store", r.store)?)?;
                        let o = store.quick_restore_domain(&need(op, "backup", r.backup)?, &vm, ctl)?;
                        to_json(&json!({"overlays": o}))
                    }
                    "consolidate" => {
                        let done = crate::engine::live::consolidate(&crate::qemu_img::QemuImg::new(), &vm, ctl)?;
                        to_json(&json!({"consolidated": done}))
                    }
                    _ => {
                        let store = Store::create(need(op, "store", r.store)?)?;
                        to_json(&store.recover_domain(&vm, ctl)?)
                    }
                }
            }
            #[cfg(not(feature = "libvirt"))]
            {
                let _ = r;
                Err(no_libvirt(op))
            }
        }
        "merge_snapshot" => {
            let r: MergeReq = parse(op, request)?;
            #[cfg(feature = "libvirt")]
            {
                let vm = domain(r.connect.as_deref(), &r.domain)?;
                let q = crate::qemu_img::QemuImg::new();
                let now = crate::engine::live::merge_snapshot_delta(&q, &vm, &r.disk, &r.delta, ctl)?;
                to_json(&json!({"disk": r.disk, "active_file": now}))
            }
            #[cfg(not(feature = "libvirt"))]
            {
                let _ = r;
                Err(no_libvirt(op))
            }
        }
        "compress" => {
            let r: CompressReq = parse(op, request)?;
            let store = Store::open(&r.store)?;
            let opts = CompressOptions {
                library: r.library,
                coroutines: r.coroutines,
                rate_limit_mbps: r.rate_limit_mbps,
                min_free_factor: r.min_free_factor,
                ..Default::default()
            };
            let m = store.compress(&r.backup, &opts, ctl)?;
            to_json(&BackupView::new(&store, &m))
        }
        "verify" => {
            let r: StoreReq = parse(op, request)?;
            to_json(&Store::open(&r.store)?.verify(r.backup.as_deref(), ctl)?)
        }
        "hash" => {
            let r: StoreReq = parse(op, request)?;
            let store = Store::open(&r.store)?;
            let id = need(op, "backup", r.backup)?;
            let m = store.show(&id)?;
            let mut hashes = std::collections::BTreeMap::new();
            for v in &m.volumes {
                let files = store.chain_files(&m, &v.name)?;
                hashes.insert(v.name.clone(), crate::engine::hash_files(&files, ctl)?);
            }
            to_json(&json!({"backup": id, "chain_hashes": hashes}))
        }
        "delete" => {
            let r: StoreReq = parse(op, request)?;
            to_json(&Store::open(&r.store)?.delete(&need(op, "backup", r.backup)?)?)
        }
        "compress_files" => {
            let r: FilesReq = parse(op, request)?;
            if r.files.is_empty() {
                return Err(KnibError::invalid("request of compress_files: field `files` is empty"));
            }
            let opts = CompressOptions {
                library: r.library,
                coroutines: r.coroutines,
                rate_limit_mbps: r.rate_limit_mbps,
                min_free_factor: r.min_free_factor,
                ..Default::default()
            };
            let done = crate::engine::compress(&crate::qemu_img::QemuImg::new(), &r.files, &opts, ctl)?;
            to_json(&json!({ "compressed": done }))
        }
        "finalize_files" => {
            let r: FinalizeReq = parse(op, request)?;
            crate::engine::finalize(&r.files, r.backup_exists)?;
            let key = if r.backup_exists { "finalized" } else { "discarded" };
            to_json(&json!({ key: r.files }))
        }
        _ if op.starts_with("agent.") => crate::agent::call(op, request, ctl),
        _ if op.starts_with("files.") => crate::files::call(op, request, ctl),
        _ => Err(KnibError::invalid(format!(
            "unknown operation {op:?}: use version, backup, list, show, restore, quick_restore, consolidate, compress, verify, hash, delete, recover, compress_files or finalize_files"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::Value;

    #[test]
    fn bad_requests_name_the_field() {
        let ctl = Control::new();
        let e = call("show", r#"{"stor": "/x", "backup": "b"}"#, &ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("unknown field `stor`"), "{e}");
        let e = call("restore", r#"{"store": "/x", "backup": "b", "volume": "v"}"#, &ctl).unwrap_err();
        assert!(e.message.contains("missing field `to`"), "{e}");
        let e = call("compress", r#"{"store": "/x", "backup": "b", "coroutines": "many"}"#, &ctl).unwrap_err();
        assert!(e.message.contains("field `coroutines`: invalid type: string \"many\""), "{e}");
        let e = call("list", r#"{"store": "/x", "schema": 2}"#, &ctl).unwrap_err();
        assert!(e.message.contains("field `schema` is 2"), "{e}");
        let e = call("list", "{not json", &ctl).unwrap_err();
        assert!(e.message.contains("is not valid JSON"), "{e}");
        let e = call("explode", "{}", &ctl).unwrap_err();
        assert!(e.message.contains("unknown operation \"explode\""), "{e}");
        assert!(call("version", "{}", &ctl).unwrap().contains(crate::VERSION));
    }

    #[test]
    fn a_backup_and_restore_through_json() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("a.qcow2");
        crate::qemu_img::QemuImg::new().create(&disk, 4 << 20, &Control::new()).unwrap();
        let store = d.path().join("s");
        let req = json!({"schema": 1, "store": store, "vm": "v", "disks": [{"name": "a", "path": disk}]});
        let ans: Value = serde_json::from_str(&call("backup", &req.to_string(), &Control::new()).unwrap()).unwrap();
        assert_eq!(ans["kind"], "full");
        let id = ans["id"].as_str().unwrap();
        let to = d.path().join("r.raw");
        let req = json!({"store": store, "backup": id, "volume": "a", "to": to, "format": "raw"});
        call("restore", &req.to_string(), &Control::new()).unwrap();
        assert!(crate::qemu_img::QemuImg::new().compare(&to, &disk, &Control::new()).unwrap());
    }

    #[test]
    fn compress_and_finalize_files_through_json() {
        let d = tempfile::tempdir().unwrap();
        let q = crate::qemu_img::QemuImg::new();
        let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
        q.create(&a, 4 << 20, &Control::new()).unwrap();
        q.create(&b, 4 << 20, &Control::new()).unwrap();
        let e = call("compress_files", r#"{"files": []}"#, &Control::new()).unwrap_err();
        assert!(e.message.contains("field `files` is empty"), "{e}");
        let e = call("finalize_files", r#"{"files": ["/x"], "backup_exist": true}"#, &Control::new()).unwrap_err();
        assert!(e.message.contains("unknown field `backup_exist`"), "{e}");

        let ans: Value = serde_json::from_str(
            &call("compress_files", &json!({"files": [a], "library": "zlib"}).to_string(), &Control::new()).unwrap(),
        )
        .unwrap();
        assert_eq!(ans["compressed"][0]["library"], "zlib");
        assert!(crate::engine::compress::comp_path(&a).exists());
        let ans = call("finalize_files", &json!({"files": [a]}).to_string(), &Control::new()).unwrap();
        assert!(ans.contains("\"finalized\""), "{ans}");
        assert!(!crate::engine::compress::comp_path(&a).exists());

        call("compress_files", &json!({"files": [b]}).to_string(), &Control::new()).unwrap();
        let ans = call("finalize_files", &json!({"files": [b], "backup_exists": false}).to_string(), &Control::new())
            .unwrap();
        assert!(ans.contains("\"discarded\""), "{ans}");
        assert!(!crate::engine::compress::comp_path(&b).exists());
        assert!(b.exists());
    }
}
