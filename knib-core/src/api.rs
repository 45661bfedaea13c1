//! The one API of knib: every operation takes a JSON object and gives one
//! back, through [`call`]. The C ABI (`knib_call`), the JNI bridge
//! (`NativeLib.call`) and the Java facade hand a request to [`call`] and
//! return its answer or its [`KnibError`]; they hold no logic.
//!
//! # The schema
//!
//! [`Request`] is the one typed set of operations: a variant per operation,
//! named by its `op`, each holding its request struct (unknown fields
//! refused) and giving one typed answer. [`schema`] is their JSON Schema
//! (draft 2020-12, generated with `schemars`); it is checked in as
//! `docs/schema.json`, and the operation tables of the README,
//! `include/knib.h` and the Java request/answer classes are checked against
//! it by `knib-core/tests/schema.rs` (`KNIB_WRITE_SCHEMA=1 cargo test -p
//! knib-core --test schema` rewrites the generated files and tables).
//!
//! The wire rules ([`crate::wire`]): a request is a JSON object; it may
//! carry `"schema": 1` and any other number is refused; unknown, missing
//! and mistyped fields are refused naming the field. Paths are strings.
//!
//! # Two ways to name a backup
//!
//! The path-based operations (`agent.*`, as CloudStack's KVM agent runs
//! them) take the files themselves; the catalog operations (`backup`,
//! `list`, `show`, `restore`, `compress`, `hash`, ...) take a store and a
//! backup id, look the files up and make the same calls, with the same
//! field names, defaults and answers (`restore` answers as `agent.restore`,
//! `hash` gives each volume's `agent.take_hash` answer, `compress` takes
//! `agent.compress`'s fields; see [`catalog`]). No two operations do the
//! same work: compressing explicit
//! files is `agent.compress` then `agent.finalize_compression`;
//! consolidating a domain is `agent.consolidate` (every disk when no
//! `volumes` are given); merging a VM snapshot delta is
//! `agent.merge_snapshot`. The `files.*` operations (file-level restore)
//! are described in [`crate::files`].
//!
//! A backup is shown the same way everywhere ([`BackupView`]): the answers
//! of `backup`, `show`, `list` and `compress`, and `knib --json`.

use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::agent;
use crate::error::{KnibError, Result};
use crate::files;
use crate::progress::Control;
use crate::wire::{self, to_json};

pub mod catalog;
pub mod group;
pub mod jobs;

pub use crate::wire::{DEFAULT_URI, SCHEMA};
pub use catalog::{BackupView, VolumeView};

/// Declares the operations once: the [`Request`] enum, [`OPS`], the parser
/// and the answers' schemas all come from this one table.
macro_rules! operations {
    ($( $(#[doc = $doc:literal])* $name:literal => $Variant:ident($Req:ty) -> $Ans:ty, )*) => {
        /// The request of every operation, tagged by its name in `op` (the
        /// schema's form; [`call`] takes the name apart from the object).
        #[derive(JsonSchema)]
        #[serde(tag = "op")]
        #[allow(private_interfaces)]
        pub enum Request {
            $( $(#[doc = $doc])* #[serde(rename = $name)] $Variant($Req), )*
        }

        /// Every operation's name, in the schema's order.
        pub const OPS: &[&str] = &[$($name),*];

        impl Request {
            /// The request of operation `op` from its JSON text: its
            /// `"schema"` checked, unknown fields refused (naming them).
            pub fn parse(op: &str, json: &str) -> Result<Request> {
                match op {
                    $( $name => Ok(Request::$Variant(wire::parse(op, json)?)), )*
                    _ => Err(KnibError::invalid(format!(
                        "unknown operation {op:?}: the operations are {}",
                        OPS.join(", ")
                    ))),
                }
            }

            /// The name of its operation.
            pub fn op(&self) -> &'static str {
                match self {
                    $( Request::$Variant(_) => $name, )*
                }
            }
        }

        fn answer_schemas(g: &mut schemars::SchemaGenerator) -> Map<String, Value> {
            let mut m = Map::new();
            $( m.insert($name.to_string(), g.subschema_for::<$Ans>().to_value()); )*
            m
        }
    };
}

operations! {
    /// knib's version and the schema it reads.
    "version" => Version(catalog::Empty) -> catalog::VersionAnswer,
    /// Back up all the disks of one VM together, full or incremental as its chain decides.
    "backup" => Backup(catalog::BackupReq) -> BackupView,
    /// The backups of a store that were not deleted.
    "list" => List(catalog::ListReq) -> Vec<BackupView>,
    /// One backup.
    "show" => Show(catalog::BackupRef) -> BackupView,
    /// Write one volume of a backup, its chain flattened, to a new image.
    "restore" => Restore(catalog::RestoreReq) -> agent::RestoreAnswer,
    /// Run a stopped libvirt domain at once on overlays over a backup.
    "quick_restore" => QuickRestore(catalog::QuickRestoreReq) -> catalog::QuickRestoreAnswer,
    /// Compress a backup's files and finalize them, recording it in the manifest.
    "compress" => Compress(catalog::CompressReq) -> BackupView,
    /// Check one backup or all: qemu-img check, backing pointers, sizes, chains, hashes.
    "verify" => Verify(catalog::VerifyReq) -> Vec<crate::catalog::VerifyReport>,
    /// The xxh3-128 of each volume's chain of a backup.
    "hash" => Hash(catalog::HashReq) -> catalog::HashAnswer,
    /// Delete a backup without breaking its chain.
    "delete" => Delete(catalog::BackupRef) -> crate::catalog::DeleteOutcome,
    /// A VM's settings (its backup method), set when given.
    "vm.settings" => VmSettings(catalog::VmSettingsReq) -> crate::catalog::VmSettings,
    /// Send the backups of a store that an S3 vault lacks (parents first, each manifest last).
    "sync" => Sync(catalog::SyncReq) -> crate::vault::SyncReport,
    /// Finish or undo the interrupted live backup of a domain from its journal.
    "recover" => Recover(catalog::RecoverReq) -> catalog::RecoverAnswer,
    /// One backup of each of several VMs at a common instant (guests frozen together), recorded as a group.
    "group.backup" => GroupBackup(group::GroupBackupReq) -> crate::catalog::group::GroupRecord,
    /// The group backups of a store.
    "group.list" => GroupList(group::StoreReq) -> Vec<crate::catalog::group::GroupRecord>,
    /// One group backup.
    "group.show" => GroupShow(group::GroupRef) -> crate::catalog::group::GroupRecord,
    /// Restore every member of a group backup (copies, or quick overlays).
    "group.restore" => GroupRestore(group::GroupRestoreReq) -> group::GroupRestoreAnswer,
    /// Delete every member's backup of a group (chain-safely), then the group.
    "group.delete" => GroupDelete(group::GroupRef) -> group::GroupDeleteAnswer,
    /// Finish the group backups a crash interrupted (each member recovered).
    "group.recover" => GroupRecover(group::GroupRecoverReq) -> Vec<crate::catalog::group::GroupRecord>,
    /// The store's jobs (compression, validation, sync), oldest first.
    "jobs.list" => JobsList(jobs::JobsListReq) -> Vec<jobs::JobView>,
    /// One job of the store's queue.
    "jobs.show" => JobsShow(jobs::JobRef) -> jobs::JobView,
    /// Queue a compression or validation of a backup, or a sync of a VM to the store's vault (run by `knib jobs run`).
    "jobs.queue" => JobsQueue(jobs::JobsQueueReq) -> jobs::JobView,
    /// Cancel a job: a queued one at once, a running one by asking its runner to stop it (its backup left as it was).
    "jobs.cancel" => JobsCancel(jobs::JobsCancelReq) -> jobs::JobView,
    /// Snapshot a domain's volumes, copy them to the store, merge (CloudStack's TakeKbossBackupCommand); or, with method bitmap, copy what a checkpoint tracked.
    "agent.take_backup" => TakeBackup(agent::TakeReq) -> agent::TakeBackupAnswer,
    /// Discard a failed agent.take_backup (store files removed, VM back on base <- delta), or with mode "complete" finish it when it is stored, given its request.
    "agent.cleanup_vm_backup" => CleanupVmBackup(agent::CleanupReq) -> agent::CleanupVmBackupAnswer,
    /// Write `<file>.comp` beside each file, each under a temporary name until whole (all removed on failure).
    "agent.compress" => AgentCompress(agent::CompressReq) -> agent::CompressAnswer,
    /// Rename each `<file>.comp` over its file (each first checked to be a whole qcow2 image with its file's size and backing pointer), or with `cleanup` remove them.
    "agent.finalize_compression" => FinalizeCompression(agent::FinalizeReq) -> agent::FinalizeAnswer,
    /// Restore volumes from backup files (all or none replaced), or quickly onto overlays.
    "agent.restore" => AgentRestore(agent::RestoreReq) -> agent::RestoreAnswer,
    /// Pull the backing files into a domain's volumes (after a quick restore).
    "agent.consolidate" => Consolidate(agent::ConsolidateReq) -> agent::ConsolidateAnswer,
    /// One qcow2 overlay per volume of a backup, for a validation: at each volume's overlay_path (an empty volume file) or in work_dir.
    "agent.prepare_validation" => PrepareValidation(agent::PrepareReq) -> agent::PrepareValidationAnswer,
    /// Validate a running domain (CloudStack's validation VM) or a throwaway one booted on backup files: boot, screenshot, script.
    "agent.validate" => Validate(Box<agent::ValidateReq>) -> agent::ValidateAnswer,
    /// xxh3-128 of a backup's chain, root first, and of each file.
    "agent.take_hash" => TakeHash(agent::HashReq) -> agent::TakeHashAnswer,
    /// Nothing by default (as the agent); with remove_domain the validation's domain, with work_dir knib's overlays.
    "agent.cleanup_validation" => CleanupValidation(agent::CleanupValidationReq) -> agent::CleanupValidationAnswer,
    /// Merge disk-only VM snapshot deltas into the layer below them.
    "agent.merge_snapshot" => MergeSnapshot(agent::MergeReq) -> agent::MergeSnapshotAnswer,
    /// The filesystems of a backup's volume (from the catalog, or a backup file by its path).
    "files.fs" => FilesFs(files::FsReq) -> files::FilesystemsAnswer,
    /// The entries of a directory (or one file) of a filesystem of a backup.
    "files.ls" => FilesLs(files::LsReq) -> files::EntriesAnswer,
    /// Extract a file or directory tree of a backup to a new local path.
    "files.get" => FilesGet(files::GetReq) -> files::GetSummary,
}

/// Run the operation that needs libvirt, or say that this knib lacks it.
macro_rules! live {
    ($op:expr, $e:expr) => {{
        #[cfg(feature = "libvirt")]
        {
            to_json(&$e?)
        }
        #[cfg(not(feature = "libvirt"))]
        {
            Err(wire::no_libvirt($op))
        }
    }};
}

/// Run operation `op` on the JSON request `request`; the answer is JSON.
#[cfg_attr(not(feature = "libvirt"), allow(unused_variables))]
pub fn call(op: &str, request: &str, ctl: &Control) -> Result<String> {
    let request = Request::parse(op, request)?;
    let op = request.op();
    match request {
        Request::Version(_) => to_json(&catalog::version()),
        Request::Backup(r) => to_json(&catalog::backup(op, r, ctl)?),
        Request::List(r) => to_json(&catalog::list(r)?),
        Request::Show(r) => to_json(&catalog::show(r)?),
        Request::Restore(r) => to_json(&catalog::restore(r, ctl)?),
        Request::QuickRestore(r) => to_json(&catalog::quick_restore(op, r, ctl)?),
        Request::Compress(r) => to_json(&catalog::compress(r, ctl)?),
        Request::Verify(r) => to_json(&catalog::verify(r, ctl)?),
        Request::Hash(r) => to_json(&catalog::hash(r, ctl)?),
        Request::Delete(r) => to_json(&catalog::delete(r)?),
        Request::VmSettings(r) => to_json(&catalog::vm_settings(r)?),
        Request::Sync(r) => to_json(&catalog::sync(r, ctl)?),
        Request::Recover(r) => to_json(&catalog::recover(op, r, ctl)?),
        Request::GroupBackup(r) => to_json(&group::backup(op, r, ctl)?),
        Request::GroupList(r) => to_json(&group::list(r)?),
        Request::GroupShow(r) => to_json(&group::show(r)?),
        Request::GroupRestore(r) => to_json(&group::restore(r, ctl)?),
        Request::GroupDelete(r) => to_json(&group::delete(r)?),
        Request::GroupRecover(r) => to_json(&group::recover(op, r, ctl)?),
        Request::JobsList(r) => to_json(&jobs::list(r)?),
        Request::JobsShow(r) => to_json(&jobs::show(r)?),
        Request::JobsQueue(r) => to_json(&jobs::queue(r)?),
        Request::JobsCancel(r) => to_json(&jobs::cancel(r, ctl)?),
        // Without `domain` (`running: false`): the volumes' files alone.
        Request::TakeBackup(r) => {
            let domain = agent::domain_of(op, &r.domain, r.running)?;
            let _held = agent::hold_volumes(op, &r, domain).map_err(|e| e.with_vm_consistent(true))?;
            match domain {
                None => to_json(&agent::stopped::take_backup(op, &r, &agent::budget(ctl, r.timeout_secs))?),
                Some(_) => live!(op, agent::live::take_backup(op, &r, &agent::budget(ctl, r.timeout_secs))),
            }
        }
        Request::CleanupVmBackup(r) => {
            let (r, mode) = r.into_parts();
            let domain = agent::domain_of(op, &r.domain, r.running)?;
            let _held = agent::hold_volumes(op, &r, domain)?;
            match domain {
                None => to_json(&agent::stopped::cleanup_vm_backup(op, &r, mode, &agent::budget(ctl, r.timeout_secs))?),
                Some(_) => live!(op, agent::live::cleanup_vm_backup(op, &r, mode, &agent::budget(ctl, r.timeout_secs))),
            }
        }
        Request::AgentCompress(r) => to_json(&agent::compress(op, &r, &agent::budget(ctl, r.timeout_secs))?),
        Request::FinalizeCompression(r) => to_json(&agent::finalize_compression(op, &r)?),
        Request::AgentRestore(r) => to_json(&agent::restore(op, &r, &agent::budget(ctl, r.timeout_secs))?),
        Request::Consolidate(r) => live!(op, agent::live::consolidate(op, &r, &agent::budget(ctl, r.timeout_secs))),
        Request::PrepareValidation(r) => {
            to_json(&agent::prepare_validation(op, &r, &agent::budget(ctl, r.timeout_secs))?)
        }
        Request::Validate(r) => live!(op, agent::live::validate(op, &r, &agent::budget(ctl, r.timeout_secs))),
        Request::TakeHash(r) => to_json(&agent::take_hash(op, &r, &agent::budget(ctl, r.timeout_secs))?),
        Request::CleanupValidation(r) => live!(op, agent::live::cleanup_validation(op, &r)),
        Request::MergeSnapshot(r) => match crate::wire::at_most(op, "merges", &r.merges)
            .and_then(|()| agent::domain_of(op, &r.domain, r.running))?
        {
            None => to_json(&agent::stopped::merge_snapshot(op, &r, &agent::budget(ctl, r.timeout_secs))?),
            Some(_) => live!(op, agent::live::merge_snapshot(op, &r, &agent::budget(ctl, r.timeout_secs))),
        },
        Request::FilesFs(r) => to_json(&files::fs_op(&r, ctl)?),
        Request::FilesLs(r) => to_json(&files::ls_op(&r, ctl)?),
        Request::FilesGet(r) => to_json(&files::get_op(&r, ctl)?),
    }
}

/// The JSON Schema (draft 2020-12) of every request and answer, as checked
/// in at `docs/schema.json`: `request` is the [`Request`] enum (each
/// variant an object tagged by `op`), `answers` maps each operation to the
/// schema of its answer; both refer to the definitions in `$defs`.
pub fn schema() -> Value {
    let mut g = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let request = g.subschema_for::<Request>().to_value();
    let answers = answer_schemas(&mut g);
    let defs: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "knib operations",
        "description": "The requests and answers of knib's one API (knib_core::api::call, knib_call, NativeLib.call). A request is the JSON object of its variant without `op` (the operation is named apart), plus an optional \"schema\": 1.",
        "schema_version": SCHEMA,
        "request": request,
        "answers": answers,
        "$defs": defs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::{json, Value};

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
        // One operation per piece of work: the duplicates are gone.
        for gone in ["compress_files", "finalize_files", "consolidate", "merge_snapshot"] {
            let e = call(gone, "{}", &ctl).unwrap_err();
            assert!(e.message.contains(&format!("unknown operation \"{gone}\"")), "{e}");
            assert!(!OPS.contains(&gone));
        }
        // `schema` is taken by the wire, never a field of a request.
        assert!(call("version", r#"{"schema": 1}"#, &ctl).is_ok());
        let e = call("version", r#"{"scheme": 1}"#, &ctl).unwrap_err();
        assert!(e.message.contains("unknown field `scheme`"), "{e}");
        assert!(call("version", "{}", &ctl).unwrap().contains(crate::VERSION));
    }

    #[test]
    fn a_backup_restore_and_hash_through_json() {
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
        let ans: Value = serde_json::from_str(&call("restore", &req.to_string(), &Control::new()).unwrap()).unwrap();
        assert!(crate::qemu_img::QemuImg::new().compare(&to, &disk, &Control::new()).unwrap());
        // The answer of `agent.restore`.
        assert_eq!(ans, json!({"volumes": [{"uuid": "a", "path": to, "backing": null}], "removed": []}));

        // `hash` gives, per volume, what `agent.take_hash` gives on its chain.
        let ans: Value = serde_json::from_str(
            &call("hash", &json!({"store": store, "backup": id}).to_string(), &Control::new()).unwrap(),
        )
        .unwrap();
        let files: Vec<Value> =
            ans["volumes"]["a"]["files"].as_array().unwrap().iter().map(|f| f["path"].clone()).collect();
        assert_eq!(files.len(), 1);
        let agent: Value = serde_json::from_str(
            &call("agent.take_hash", &json!({"files": files, "timeout_secs": 60}).to_string(), &Control::new())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ans["volumes"]["a"]["hash"], agent["hash"]);
        assert_eq!(ans["volumes"]["a"]["files"], agent["files"]);

        // The compression fields of `agent.compress`, with the same checks.
        let req = json!({"store": store, "backup": id, "min_free_bytes": u64::MAX, "timeout_secs": 60});
        let e = call("compress", &req.to_string(), &Control::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
        assert!(e.message.contains("min_free_bytes"), "{e}");
    }

    #[test]
    fn compress_and_finalize_through_json() {
        let d = tempfile::tempdir().unwrap();
        let q = crate::qemu_img::QemuImg::new();
        let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
        q.create(&a, 4 << 20, &Control::new()).unwrap();
        q.create(&b, 4 << 20, &Control::new()).unwrap();
        let e = call("agent.compress", r#"{"files": []}"#, &Control::new()).unwrap_err();
        assert!(e.message.contains("field `files` is empty"), "{e}");
        let e =
            call("agent.finalize_compression", r#"{"files": ["/x"], "clean_up": true}"#, &Control::new()).unwrap_err();
        assert!(e.message.contains("unknown field `clean_up`"), "{e}");

        let ans: Value = serde_json::from_str(
            &call("agent.compress", &json!({"files": [a], "library": "zlib"}).to_string(), &Control::new()).unwrap(),
        )
        .unwrap();
        assert_eq!(ans["compressed"][0]["library"], "zlib");
        assert!(crate::engine::compress::comp_path(&a).exists());
        let ans = call("agent.finalize_compression", &json!({"files": [a]}).to_string(), &Control::new()).unwrap();
        assert!(ans.contains("\"finalized\""), "{ans}");
        assert!(!crate::engine::compress::comp_path(&a).exists());

        call("agent.compress", &json!({"files": [b]}).to_string(), &Control::new()).unwrap();
        let ans =
            call("agent.finalize_compression", &json!({"files": [b], "cleanup": true}).to_string(), &Control::new())
                .unwrap();
        assert!(ans.contains("\"discarded\""), "{ans}");
        assert!(!crate::engine::compress::comp_path(&b).exists());
        assert!(b.exists());
    }

    #[test]
    fn bad_agent_requests_name_the_field() {
        let ctl = Control::new();
        let e = call("agent.take_hash", r#"{"file": ["/x"]}"#, &ctl).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("unknown field `file`"), "{e}");
        let e = call("agent.take_hash", r#"{"files": ["x"]}"#, &ctl).unwrap_err();
        assert!(e.message.contains("field `files[0]`: x is not an absolute path"), "{e}");
        let e = call("agent.compress", r#"{"files": ["/x"], "coroutines": -1}"#, &ctl).unwrap_err();
        assert!(e.message.contains("field `coroutines`"), "{e}");
        let e = call("agent.restore", r#"{"volumes": [{"backup_path": "/b"}]}"#, &ctl).unwrap_err();
        assert!(e.message.contains("missing field `volume_path`"), "{e}");
        let e = call("agent.finalize_compression", r#"{"files": []}"#, &ctl).unwrap_err();
        assert!(e.message.contains("field `files` is empty"), "{e}");
        let e = call("agent.explode", "{}", &ctl).unwrap_err();
        assert!(
            e.message.contains("unknown operation \"agent.explode\"") && e.message.contains("agent.take_backup"),
            "{e}"
        );
    }

    #[test]
    fn bad_file_requests_name_the_field() {
        let ctl = Control::new();
        let e = call("files.ls", r#"{"store": "/x", "backup": "b", "volume": "v", "fs": true}"#, &ctl).unwrap_err();
        assert!(e.message.contains("request of files.ls: field `fs`"), "{e}");
        assert!(e.message.contains("a filesystem's index (1, 2, ...) or its device name"), "{e}");
        let e = call("files.ls", r#"{"store": "/x", "backup": "b", "volume": "v", "backup_path": "/b"}"#, &ctl)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("request of files.ls: give either `backup_path` or `store`, `backup` and `volume`, not both (`backup_path` and `store`, `backup`, `volume` given)"), "{e}");
        let e = call("files.fs", "{}", &ctl).unwrap_err();
        assert!(
            e.message
                .contains("request of files.fs: give `backup_path`, or `store`, `backup` and `volume`: none was given"),
            "{e}"
        );
        let e = call("files.get", r#"{"store": "/x", "volume": "v", "path": "/", "to": "/t"}"#, &ctl).unwrap_err();
        assert!(e.message.contains("missing field `backup`"), "{e}");
        let e = call("files.fs", r#"{"backup_path": "rel/b.qcow2"}"#, &ctl).unwrap_err();
        assert!(e.message.contains("backup_path rel/b.qcow2 is not an absolute path"), "{e}");
        let e = call("files.get", r#"{"store": "/x", "backup": "b", "volume": "v", "path": "/"}"#, &ctl).unwrap_err();
        assert!(e.message.contains("missing field `to`"), "{e}");
        let e = call("files.fs", r#"{"store": "/x", "backup": "b", "volume": "v", "fs": 1}"#, &ctl).unwrap_err();
        assert!(e.message.contains("unknown field `fs`"), "{e}");
        let e = call("files.cat", "{}", &ctl).unwrap_err();
        assert!(e.message.contains("unknown operation \"files.cat\""), "{e}");
    }
}
