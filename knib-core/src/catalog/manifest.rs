//! The manifest of one backup: `vms/<vm>/<id>/manifest.json`, JSON with a
//! schema version, written atomically.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::BackupKind;
use crate::error::{KnibError, Result};
use crate::fsio;
use crate::names;
use crate::qemu_img::CompressionLibrary;

/// The manifest schema this version of knib writes and reads.
pub const MANIFEST_SCHEMA: u32 = 1;

/// The manifest a compression in progress will leave, beside
/// `manifest.json` (see `compress_commit`).
pub(crate) const NEXT_MANIFEST: &str = "manifest.next.json";

/// One volume of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    /// The volume's name.
    pub name: String,
    /// The backup file, relative to the backup's directory.
    pub file: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Size of the backup file in bytes.
    pub size: u64,
    /// The disk it was taken from. Only compared with the disks a backup
    /// is asked for (never opened, read or written through).
    pub source: String,
    /// Backing pointer written in the file (`../<parent>/<file>`), if any.
    pub backing: Option<String>,
    /// xxh3-128 of the file, recorded when the backup is written (native
    /// data path) or by the first successful verify.
    #[serde(default)]
    pub hash: Option<String>,
}

/// Compression of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompressionInfo {
    /// The library used.
    pub library: CompressionLibrary,
    /// Bytes of all the volume files before.
    pub original_size: u64,
    /// Bytes after.
    pub size: u64,
}

/// The record of one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Schema version ([`MANIFEST_SCHEMA`]).
    pub schema: u32,
    /// The backup's id (unique in the store).
    pub id: String,
    /// The VM it belongs to.
    pub vm: String,
    /// Full, incremental or isolated.
    pub kind: BackupKind,
    /// The parent backup (incremental backups only).
    pub parent: Option<String>,
    /// Position in its chain: 1 for a full backup.
    pub position: u32,
    /// Whether this backup closed its chain (the next one is full).
    pub end_of_chain: bool,
    /// When it was taken (UTC, RFC 3339).
    pub created: String,
    /// The volumes.
    pub volumes: Vec<VolumeEntry>,
    /// Set once the backup is compressed.
    #[serde(default)]
    pub compression: Option<CompressionInfo>,
    /// Deleted by the user but kept because later backups need its files;
    /// expunged when its last child goes.
    #[serde(default)]
    pub removed: bool,
    /// Why this backup is full where an incremental one was asked for (the
    /// chain could not be continued safely, see [`crate::catalog`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// The group backup this backup was taken in, if any: a group's record
    /// (or a crashed group's journal) acts only on backups that say they
    /// are its members (see [`crate::catalog::group`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The schema of manifest text `text` when it is a JSON object whose
/// `schema` is a number above [`MANIFEST_SCHEMA`]: written by a newer knib,
/// not damaged.
pub(crate) fn newer_schema(text: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    v.get("schema")?.as_u64().filter(|s| *s > u64::from(MANIFEST_SCHEMA))
}

impl Manifest {
    /// A new manifest, taken now, with no volume yet.
    pub fn new(
        id: &str,
        vm: &str,
        kind: BackupKind,
        parent: Option<String>,
        position: u32,
        end_of_chain: bool,
    ) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            id: id.to_string(),
            vm: vm.to_string(),
            kind,
            parent,
            position,
            end_of_chain,
            created: rfc3339(std::time::SystemTime::now()),
            volumes: Vec::new(),
            compression: None,
            removed: false,
            full_reason: None,
            group: None,
        }
    }

    /// Read and check a manifest (see [`Manifest::parse`]) at `path`, a
    /// file the caller names: anything but a regular file is refused at
    /// once (a FIFO is not waited on), and so is a file of more than 16
    /// MiB, unread (the cap on a store's JSON files).
    pub fn load(path: &Path) -> Result<Manifest> {
        let f = crate::fsio::open_regular(path)?;
        let text = super::confine::read_capped(&f, path, "manifest")?;
        Manifest::parse(&text, path)
    }

    /// Parse and check the manifest read from `origin`: JSON without
    /// unknown or repeated keys, this schema, and every name in it a plain
    /// name ([`crate::names`]): the id, the VM, the parent, each volume's
    /// name and file, and a backing pointer that is exactly
    /// `../<parent>/<file>`. Anything else is [`crate::ErrorKind::Corrupt`]
    /// naming the manifest and the field.
    pub fn parse(text: &[u8], origin: &Path) -> Result<Manifest> {
        let m: Manifest = crate::json::from_slice(text)
            .map_err(|e| KnibError::corrupt(format!("manifest {} is corrupted: {e}", origin.display())))?;
        if m.schema != MANIFEST_SCHEMA {
            return Err(KnibError::corrupt(format!(
                "manifest {} has schema {}; this knib reads schema {MANIFEST_SCHEMA}",
                origin.display(),
                m.schema
            )));
        }
        m.check_names(origin)?;
        Ok(m)
    }

    fn check_names(&self, origin: &Path) -> Result<()> {
        let bad = |field: &str, why: String| {
            KnibError::corrupt(format!("manifest {}: field `{field}`: {why}", origin.display()))
        };
        let name = |field: &str, what: &str, v: &str| names::validate(what, v).map_err(|e| bad(field, e.message));
        name("id", "backup id", &self.id)?;
        name("vm", "VM name", &self.vm)?;
        if let Some(g) = &self.group {
            name("group", "group id", g)?;
        }
        if let Some(p) = &self.parent {
            name("parent", "backup id", p)?;
            if p == &self.id {
                return Err(bad("parent", format!("backup {p} names itself as its parent")));
            }
        }
        // Names seen so far: a manifest of many volumes is checked in
        // linear time (40,000 volumes took 13 s compared pairwise).
        let mut seen = std::collections::HashSet::with_capacity(self.volumes.len());
        let mut files = std::collections::HashSet::with_capacity(self.volumes.len());
        for (i, v) in self.volumes.iter().enumerate() {
            name(&format!("volumes[{i}].name"), "volume name", &v.name)?;
            name(&format!("volumes[{i}].file"), "volume file name", &v.file)?;
            // A volume's file is its own: never the manifest's name (a vault
            // sync repairing the "volume" uploaded an image over the
            // manifest, or deleted it), nor another volume's.
            if v.file == "manifest.json" || v.file == NEXT_MANIFEST {
                return Err(bad(
                    &format!("volumes[{i}].file"),
                    format!("{:?} is the name of the backup's manifest", v.file),
                ));
            }
            // Nor a name a compression writes beside a volume file (a
            // compression of volume "a.qcow2" removed or renamed a volume
            // file "a.qcow2.comp" as its own output).
            if v.file.ends_with(".comp") {
                return Err(bad(
                    &format!("volumes[{i}].file"),
                    format!("{:?} ends with \".comp\", the name of a compression's output", v.file),
                ));
            }
            if !files.insert(v.file.as_str()) {
                return Err(bad(&format!("volumes[{i}].file"), format!("file {:?} is listed twice", v.file)));
            }
            if let Some(h) = &v.hash {
                // What knib writes: xxh3-128 as 32 lowercase hex digits
                // (compared, never used as a name; anything else is a
                // tampered manifest).
                if h.len() != 32 || !h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
                    let shown: String = h.chars().take(40).collect();
                    let more = if shown.len() < h.len() { "..." } else { "" };
                    return Err(bad(
                        &format!("volumes[{i}].hash"),
                        format!("{shown:?}{more} is not an xxh3-128 hash (32 lowercase hex digits)"),
                    ));
                }
            }
            if !seen.insert(v.name.as_str()) {
                return Err(bad(&format!("volumes[{i}].name"), format!("volume {:?} is listed twice", v.name)));
            }
            let field = format!("volumes[{i}].backing");
            match (&self.parent, &v.backing) {
                (None, None) => {}
                (None, Some(b)) => return Err(bad(&field, format!("{b:?} is set, but the backup has no parent"))),
                (Some(p), None) => return Err(bad(&field, format!("is missing: the backup's parent is {p}"))),
                (Some(p), Some(b)) => {
                    let file = b
                        .strip_prefix("../")
                        .and_then(|r| r.strip_prefix(p.as_str()))
                        .and_then(|r| r.strip_prefix('/'))
                        .ok_or_else(|| bad(&field, format!("{b:?} is not ../{p}/<file>")))?;
                    name(&field, "backing file name", file)?;
                }
            }
        }
        Ok(())
    }

    /// The parent's file that volume `v`'s backing pointer names, if any
    /// (the part after `../<parent>/`, checked by [`Manifest::parse`]).
    pub fn backing_file_name<'a>(&self, v: &'a VolumeEntry) -> Option<&'a str> {
        let (b, p) = (v.backing.as_deref()?, self.parent.as_deref()?);
        b.strip_prefix("../")?.strip_prefix(p)?.strip_prefix('/')
    }

    /// Write a manifest atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        fsio::write_atomic(path, &text)
    }

    /// The entry of volume `name`.
    pub fn volume(&self, name: &str) -> Result<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name).ok_or_else(|| {
            let names: Vec<_> = self.volumes.iter().map(|v| v.name.as_str()).collect();
            KnibError::not_found(format!("backup {} has no volume {name:?} (it has: {})", self.id, names.join(", ")))
        })
    }
}

/// The backing pointer a volume file of a child of backup `parent` holds:
/// the parent's file of volume `volume`, relative to the child's directory
/// (`../<parent id>/<volume>.qcow2`), the store's one layout rule for chains.
pub(crate) fn parent_file_ref(parent: &Manifest, volume: &str) -> String {
    format!("../{}/{volume}.qcow2", parent.id)
}

/// A UTC time as RFC 3339 with milliseconds (`2026-11-21T13:05:01.123Z`);
/// a time before 1970 is shown as 1970-01-01T00:00:00.000Z.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    // Clamped to what the format can show (1970 to the end of 9999).
    let last = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    let t = time::OffsetDateTime::from(t.clamp(std::time::UNIX_EPOCH, last));
    t.format(FORMAT).expect("a UTC time from 1970 on formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// `Manifest::load` refuses a FIFO at once and a huge file unread.
    #[test]
    fn load_refuses_a_fifo_and_a_huge_file() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = Manifest::load(&fifo).unwrap_err();
        assert_eq!(e.message, format!("{} is not a regular file", fifo.display()));
        let huge = d.path().join("huge.json");
        std::fs::File::create(&huge).unwrap().set_len(100 << 30).unwrap();
        let e = Manifest::load(&huge).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains("is larger than 16777216 bytes"), "{e}");
    }

    /// A volume file named as the manifest, or twice, or as a compression's
    /// output, is refused.
    #[test]
    fn a_volume_file_named_as_the_manifest_or_twice_is_corrupt() {
        let vol = |name: &str, file: &str| serde_json::json!({"name": name, "file": file, "size": 1, "virtual_size": 1, "source": "/d", "backing": null});
        for (files, says) in [
            (
                vec![vol("vda", "manifest.json")],
                "field `volumes[0].file`: \"manifest.json\" is the name of the backup's manifest",
            ),
            (
                vec![vol("vda", "a.qcow2"), vol("vdb", "a.qcow2")],
                "field `volumes[1].file`: file \"a.qcow2\" is listed twice",
            ),
            (
                vec![vol("vda", "a.qcow2"), vol("vdb", "a.qcow2.comp")],
                "field `volumes[1].file`: \"a.qcow2.comp\" ends with \".comp\", the name of a compression's output",
            ),
        ] {
            let mut m =
                serde_json::to_value(Manifest::new("20260101-000000000-abcd", "vm1", BackupKind::Full, None, 1, false))
                    .unwrap();
            m["volumes"] = serde_json::Value::Array(files);
            let e = Manifest::parse(m.to_string().as_bytes(), Path::new("/s/m.json")).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::Corrupt, "{e}");
            assert_eq!(e.message, format!("manifest /s/m.json: {says}"));
        }
        // A volume named "manifest" has its file "manifest.qcow2": fine.
        let mut m =
            serde_json::to_value(Manifest::new("20260101-000000000-abcd", "vm1", BackupKind::Full, None, 1, false))
                .unwrap();
        m["volumes"] = serde_json::Value::Array(vec![vol("manifest", "manifest.qcow2")]);
        Manifest::parse(m.to_string().as_bytes(), Path::new("/s/m.json")).unwrap();
    }

    #[test]
    fn rfc3339_is_right() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_266_301_123)), "2026-11-21T13:05:01.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        // Past the year 9999: the last time the format shows, no panic.
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 1000)), "9999-12-31T23:59:59.000Z");
    }
}
