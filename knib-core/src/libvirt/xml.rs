//! Domain XML: reading disks and their backing chains, writing the XML of a
//! disk-only snapshot. Pure functions, no libvirt connection needed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{KnibError, Result};

/// One image below the active file of a disk, as libvirt reports it in the
/// live domain XML (`<backingStore>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingLayer {
    /// The image's path (for a `type='block'` layer, its device node).
    pub file: PathBuf,
    /// Its format (`qcow2`, `raw`, ...); empty when libvirt does not say.
    pub format: String,
}

/// One file-backed disk (`<disk type='file' device='disk'>`) of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The guest target (`vda`, `sdb`): the name libvirt's APIs take.
    pub target: String,
    /// The bus of the target (`virtio`, `scsi`, `sata`, ...), if given.
    pub bus: Option<String>,
    /// The active file: the top of the chain, where the guest writes go.
    pub file: PathBuf,
    /// The active file's format (`<driver type>`); `raw` when not given.
    pub format: String,
    /// The images below the active file, top-down (the active file's backing
    /// file first, the base last). Only a running domain's XML carries the
    /// chain: for a stopped domain libvirt does not probe it and this is
    /// empty (read the chain from the files with `qemu-img info`).
    pub backing_chain: Vec<BackingLayer>,
    /// The device alias (`virtio-disk0`) of a running domain.
    pub alias: Option<String>,
    /// The disk is read-only to the guest (`<readonly/>`).
    pub read_only: bool,
}

impl DiskInfo {
    /// The QOM path of the device's block backend, as HMP `qemu-io -d`
    /// takes it: `/machine/peripheral/<alias>/virtio-backend` for a
    /// virtio-blk disk, `/machine/peripheral/<alias>` for the others
    /// (scsi-hd, ide-hd). `None` when the disk has no alias (a stopped
    /// domain). The path stays valid across snapshots and pivots, unlike
    /// block node names.
    pub fn qom_device_path(&self) -> Option<String> {
        let alias = self.alias.as_deref()?;
        let virtio = match self.bus.as_deref() {
            Some(bus) => bus == "virtio",
            None => self.target.starts_with("vd"),
        };
        Some(if virtio {
            format!("/machine/peripheral/{alias}/virtio-backend")
        } else {
            format!("/machine/peripheral/{alias}")
        })
    }

    /// All files of the chain top-down: the active file, then the backing
    /// layers.
    pub fn chain_files(&self) -> Vec<&Path> {
        std::iter::once(self.file.as_path()).chain(self.backing_chain.iter().map(|l| l.file.as_path())).collect()
    }
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml).map_err(|e| KnibError::invalid(format!("domain XML does not parse: {e}")))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// Every `<devices><disk>` element of a domain XML.
fn disk_nodes<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Result<Vec<roxmltree::Node<'a, 'i>>> {
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(KnibError::invalid(format!(
            "domain XML: the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    Ok(child(root, "devices").map(|d| d.children().filter(|c| c.has_tag_name("disk")).collect()).unwrap_or_default())
}

fn target_of(disk: roxmltree::Node<'_, '_>) -> Result<String> {
    child(disk, "target")
        .and_then(|t| t.attribute("dev"))
        .map(str::to_string)
        .ok_or_else(|| KnibError::invalid("domain XML: a <disk> has no <target dev>"))
}

/// The disks of a domain XML a backup leaves out though the guest may
/// write them (not `<readonly/>`, not a CD-ROM): a `device='disk'` that is
/// not a file (block, network, volume) or has no source file, each as
/// "TARGET (type 'TYPE')"; a LUN passed through or a floppy, whatever its
/// type, as "TARGET (device 'DEVICE', type 'TYPE')"; in document order.
pub fn left_out_disks(xml: &str) -> Result<Vec<String>> {
    let doc = parse(xml)?;
    let mut out = Vec::new();
    for disk in disk_nodes(&doc)? {
        let kind = disk.attribute("type").unwrap_or("file");
        let device = disk.attribute("device").unwrap_or("disk");
        // A CD-ROM is read-only whatever its XML says.
        if device == "cdrom" || child(disk, "readonly").is_some() {
            continue;
        }
        let target = child(disk, "target").and_then(|t| t.attribute("dev")).unwrap_or("?");
        if device != "disk" {
            out.push(format!("{target} (device '{device}', type '{kind}')"));
            continue;
        }
        if kind == "file" && child(disk, "source").and_then(|s| s.attribute("file")).is_some() {
            continue;
        }
        out.push(format!("{target} (type '{kind}')"));
    }
    Ok(out)
}

/// The file disks of a domain XML, in document order: every
/// `<disk type='file' device='disk'>` with a source file. CD-ROMs, floppies,
/// LUNs, block, network and volume disks, and empty drives are left out.
/// Their targets name files of knib's (a scratch file, a part in the
/// store): a target that is not a safe file name ([`names::validate`]) is
/// invalid input.
///
/// [`names::validate`]: crate::names::validate
pub fn parse_disks(xml: &str) -> Result<Vec<DiskInfo>> {
    let doc = parse(xml)?;
    let mut out = Vec::new();
    for disk in disk_nodes(&doc)? {
        if disk.attribute("type").unwrap_or("file") != "file" || disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let Some(file) = child(disk, "source").and_then(|s| s.attribute("file")) else {
            continue;
        };
        let target = target_of(disk)?;
        crate::names::validate("disk target", &target).map_err(|e| e.context("domain XML"))?;
        let bus = child(disk, "target").and_then(|t| t.attribute("bus")).map(str::to_string);
        let format = child(disk, "driver").and_then(|d| d.attribute("type")).unwrap_or("raw").to_string();
        let alias = child(disk, "alias").and_then(|a| a.attribute("name")).map(str::to_string);
        let mut backing_chain = Vec::new();
        let mut node = child(disk, "backingStore");
        while let Some(bs) = node {
            // `<backingStore/>` (no children) ends the chain.
            let Some(source) = child(bs, "source") else {
                break;
            };
            // An NBD export on a UNIX socket (quick restore from the vault):
            // the layer is named by its socket.
            let nbd_socket = (source.attribute("protocol") == Some("nbd"))
                .then(|| child(source, "host").and_then(|h| h.attribute("socket")))
                .flatten();
            let Some(path) = source.attribute("file").or_else(|| source.attribute("dev")).or(nbd_socket) else {
                return Err(KnibError::invalid(format!(
                    "domain XML: disk {target} has a backing layer of type '{}' that is not a file",
                    bs.attribute("type").unwrap_or("?")
                )));
            };
            let format = child(bs, "format").and_then(|f| f.attribute("type")).unwrap_or("").to_string();
            backing_chain.push(BackingLayer { file: PathBuf::from(path), format });
            node = child(bs, "backingStore");
        }
        let read_only = child(disk, "readonly").is_some();
        out.push(DiskInfo { target, bus, file: PathBuf::from(file), format, backing_chain, alias, read_only });
    }
    Ok(out)
}

/// The targets of every `<disk>` of a domain XML, of any type and device
/// (CD-ROMs included), in document order.
pub fn disk_targets(xml: &str) -> Result<Vec<String>> {
    let doc = parse(xml)?;
    disk_nodes(&doc)?.into_iter().map(target_of).collect()
}

/// `s` escaped for an XML attribute value in single or double quotes.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The `<domainsnapshot>` XML of a disk-only external snapshot: every target
/// of `all_targets` is listed, those in `new_files` with
/// `snapshot='external'`, a qcow2 driver and their new file, the others with
/// `snapshot='no'`. Fails (invalid input) when a target of `new_files` is
/// not in `all_targets`, is named twice, or its file is not an absolute
/// path.
pub fn snapshot_xml<S: AsRef<str>, P: AsRef<Path>>(all_targets: &[String], new_files: &[(S, P)]) -> Result<String> {
    for (i, (target, file)) in new_files.iter().enumerate() {
        let (target, file) = (target.as_ref(), file.as_ref());
        if !all_targets.iter().any(|t| t == target) {
            return Err(KnibError::not_found(format!("disk {target} is not a disk of the domain")));
        }
        if new_files[..i].iter().any(|(t, _)| t.as_ref() == target) {
            return Err(KnibError::invalid(format!("disk {target} is named twice in the snapshot")));
        }
        if !file.is_absolute() {
            return Err(KnibError::invalid(format!(
                "the new file of disk {target} must be an absolute path: {}",
                file.display()
            )));
        }
        if file.to_str().is_none() {
            return Err(KnibError::invalid(format!("the new file of disk {target} is not UTF-8: {}", file.display())));
        }
    }
    let mut xml = String::from("<domainsnapshot>\n  <disks>\n");
    for target in all_targets {
        let name = xml_escape(target);
        match new_files.iter().find(|(t, _)| t.as_ref() == target) {
            Some((_, file)) => {
                let file = xml_escape(file.as_ref().to_str().unwrap_or_default());
                let _ = writeln!(
                    xml,
                    "    <disk name='{name}' snapshot='external'>\n      <driver type='qcow2'/>\n      <source file='{file}'/>\n    </disk>"
                );
            }
            None => {
                let _ = writeln!(xml, "    <disk name='{name}' snapshot='no'/>");
            }
        }
    }
    xml.push_str("  </disks>\n</domainsnapshot>\n");
    Ok(xml)
}

/// `xml` with the `<source file>` of each named disk target replaced.
pub fn replace_disk_sources(xml: &str, sources: &[(String, PathBuf)]) -> Result<String> {
    replace_disk_sources_as(xml, sources, None)
}

/// [`replace_disk_sources`], and with `format` each of those disks' driver
/// type set to it (a `<driver name='qemu' type=...>` added to a disk that
/// has none): a qcow2 overlay put under a disk defined as raw was read as
/// raw, the guest seeing qcow2 metadata.
pub fn replace_disk_sources_as(xml: &str, sources: &[(String, PathBuf)], format: Option<&str>) -> Result<String> {
    let doc = parse(xml)?;
    // The devices' disks only: not an element named so elsewhere (in
    // <metadata>, of any namespace).
    let disks = disk_nodes(&doc)?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for (target, file) in sources {
        let disk = disks
            .iter()
            .copied()
            .find(|n| n.children().any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target.as_str())))
            .ok_or_else(|| KnibError::not_found(format!("the domain has no disk {target}")))?;
        let src = disk
            .children()
            .find(|c| c.has_tag_name("source"))
            .ok_or_else(|| KnibError::invalid(format!("disk {target} has no <source>")))?;
        let path = file.to_str().ok_or_else(|| KnibError::invalid(format!("path {} is not UTF-8", file.display())))?;
        edits.push((src.range(), format!("<source file='{}'/>", xml_escape(path))));
        if let Some(fmt) = format {
            match disk.children().find(|c| c.has_tag_name("driver")) {
                Some(drv) => match drv.attributes().find(|a| a.name() == "type") {
                    Some(a) => edits.push((a.range_value(), xml_escape(fmt))),
                    None => {
                        let at = drv.range().start + "<driver".len();
                        edits.push((at..at, format!(" type='{}'", xml_escape(fmt))));
                    }
                },
                None => {
                    let at = src.range().start;
                    edits.push((at..at, format!("<driver name='qemu' type='{}'/>", xml_escape(fmt))));
                }
            }
        }
        for b in disk.children().filter(|c| c.has_tag_name("backingStore")) {
            edits.push((b.range(), String::new()));
        }
    }
    // From the end, so earlier ranges stay valid; at one start (a driver
    // added before the source), the replacement first, then the insertion
    // (so it lands before it).
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// A writable disk that is not a file (or has no source), a LUN passed
    /// through and a floppy are named as left out; a file disk, a CD-ROM
    /// and a read-only disk or LUN are not.
    #[test]
    fn disks_a_backup_leaves_out_are_named() {
        let xml = "<domain><name>d</name><devices>\
            <disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdb'/></disk>\
            <disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>\
            <disk type='file' device='disk'><target dev='vdd'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vde'/><readonly/></disk>\
            <disk type='file' device='cdrom'><source file='/i.iso'/><target dev='sda'/></disk>\
            <disk type='block' device='lun'><source dev='/dev/sdy'/><target dev='sdb' bus='scsi'/></disk>\
            <disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdc' bus='scsi'/><readonly/></disk>\
            <disk type='file' device='floppy'><source file='/f.img'/><target dev='fda'/></disk>\
            </devices></domain>";
        assert_eq!(
            left_out_disks(xml).unwrap(),
            vec![
                "vdb (type 'block')",
                "vdc (type 'network')",
                "vdd (type 'file')",
                "sdb (device 'lun', type 'block')",
                "fda (device 'floppy', type 'file')"
            ]
        );
    }

    use super::*;
    use crate::error::ErrorKind;

    /// A disk's driver type set with its source: an attribute replaced,
    /// one added, a driver element added; other disks untouched.
    #[test]
    fn replaced_sources_can_set_the_driver_type() {
        let xml = "<domain><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/a.raw'/><target dev='vda'/></disk>\
            <disk type='file' device='disk'><driver name='qemu'/><source file='/b'/><target dev='vdb'/></disk>\
            <disk type='file' device='disk'><source file='/c'/><target dev='vdc'/></disk>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/d.raw'/><target dev='vdd'/></disk>\
            </devices></domain>";
        let sources: Vec<(String, PathBuf)> =
            ["vda", "vdb", "vdc"].iter().map(|t| (t.to_string(), PathBuf::from(format!("/o-{t}.qcow2")))).collect();
        let out = replace_disk_sources_as(xml, &sources, Some("qcow2")).unwrap();
        assert!(out.contains("<driver name='qemu' type='qcow2' cache='none'/><source file='/o-vda.qcow2'/>"), "{out}");
        assert!(out.contains("<driver type='qcow2' name='qemu'/><source file='/o-vdb.qcow2'/>"), "{out}");
        assert!(out.contains("<driver name='qemu' type='qcow2'/><source file='/o-vdc.qcow2'/>"), "{out}");
        assert!(out.contains("<driver name='qemu' type='raw'/><source file='/d.raw'/>"), "{out}");
        roxmltree::Document::parse(&out).unwrap();
        // Without a format, the driver is left as it is.
        let out = replace_disk_sources(xml, &sources).unwrap();
        assert!(out.contains("type='raw' cache='none'/><source file='/o-vda.qcow2'/>"), "{out}");
    }

    /// A running domain's XML as libvirt 9.0 gives it: vda on a two-layer
    /// chain, vdb without backing, a CD-ROM, a block disk and a network disk.
    const LIVE: &str = r#"<domain type='kvm' id='1'>
  <name>knibexp1</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/knibexp/a.d2' index='5'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/tmp/knibexp/a.d1'/>
        <backingStore type='file' index='2'>
          <format type='qcow2'/>
          <source file='/tmp/knibexp/a.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/knib &amp; co/b.qcow2' index='1'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
      <alias name='ide0-1-0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/lv'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/sda.img'/>
      <target dev='sda' bus='scsi'/>
      <alias name='scsi0-0-0-0'/>
    </disk>
    <serial type='pty'/>
  </devices>
</domain>"#;

    /// A stopped domain's XML: no chain, no alias, no driver type.
    const INACTIVE: &str = r#"<domain type='kvm'>
  <name>stopped</name>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/vm/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn parses_live_disks_with_chains() {
        let disks = parse_disks(LIVE).unwrap();
        let targets: Vec<_> = disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb", "sda"]);
        let vda = &disks[0];
        assert_eq!(vda.file, PathBuf::from("/tmp/knibexp/a.d2"));
        assert_eq!(vda.format, "qcow2");
        assert_eq!(vda.bus.as_deref(), Some("virtio"));
        assert_eq!(vda.alias.as_deref(), Some("virtio-disk0"));
        assert_eq!(
            vda.backing_chain,
            vec![
                BackingLayer { file: "/tmp/knibexp/a.d1".into(), format: "qcow2".into() },
                BackingLayer { file: "/tmp/knibexp/a.qcow2".into(), format: "qcow2".into() },
            ]
        );
        assert_eq!(
            vda.chain_files(),
            [Path::new("/tmp/knibexp/a.d2"), Path::new("/tmp/knibexp/a.d1"), Path::new("/tmp/knibexp/a.qcow2")]
        );
        assert_eq!(vda.qom_device_path().as_deref(), Some("/machine/peripheral/virtio-disk0/virtio-backend"));
        let vdb = &disks[1];
        assert_eq!(vdb.file, PathBuf::from("/tmp/knib & co/b.qcow2"));
        assert!(vdb.backing_chain.is_empty());
        assert_eq!(disks[2].format, "raw");
        assert_eq!(disks[2].qom_device_path().as_deref(), Some("/machine/peripheral/scsi0-0-0-0"));
    }

    #[test]
    fn parses_inactive_disks() {
        let disks = parse_disks(INACTIVE).unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].target, "vda");
        assert_eq!(disks[0].format, "raw");
        assert_eq!(disks[0].alias, None);
        assert_eq!(disks[0].qom_device_path(), None);
        assert!(disks[0].backing_chain.is_empty());
    }

    #[test]
    fn lists_all_targets() {
        assert_eq!(disk_targets(LIVE).unwrap(), ["vda", "vdb", "hdc", "vdc", "vdd", "sda"]);
        assert_eq!(disk_targets(INACTIVE).unwrap(), ["vda", "hdc"]);
    }

    #[test]
    fn rejects_bad_xml() {
        assert_eq!(parse_disks("<domain>").unwrap_err().kind, ErrorKind::InvalidInput);
        assert_eq!(parse_disks("<network/>").unwrap_err().kind, ErrorKind::InvalidInput);
        let no_target = "<domain><devices><disk type='file'><source file='/a'/></disk></devices></domain>";
        assert_eq!(parse_disks(no_target).unwrap_err().kind, ErrorKind::InvalidInput);
        let net_backing = "<domain><devices><disk type='file' device='disk'><source file='/a'/>\
            <backingStore type='network'><format type='raw'/><source protocol='nbd'/></backingStore>\
            <target dev='vda'/></disk></devices></domain>";
        assert_eq!(parse_disks(net_backing).unwrap_err().kind, ErrorKind::InvalidInput);
        // An NBD export on a UNIX socket (quick restore from the vault) is
        // named by its socket.
        let nbd_unix = "<domain><devices><disk type='file' device='disk'><source file='/a'/>\
            <backingStore type='network'><format type='raw'/><source protocol='nbd'>\
            <host transport='unix' socket='/d/vda.sock'/></source></backingStore>\
            <target dev='vda'/></disk></devices></domain>";
        let d = parse_disks(nbd_unix).unwrap();
        assert_eq!(d[0].backing_chain, vec![BackingLayer { file: PathBuf::from("/d/vda.sock"), format: "raw".into() }]);
        assert_eq!(parse_disks("<domain/>").unwrap(), vec![]);
    }

    /// A disk target that would escape a directory when used as a file
    /// name is refused, naming it.
    #[test]
    fn an_unsafe_disk_target_is_refused() {
        for bad in ["../x", "a/b", ".hidden", "v da"] {
            let xml = format!(
                "<domain><name>web1</name><devices><disk type='file' device='disk'>\
                 <source file='/a'/><target dev='{bad}' bus='virtio'/></disk></devices></domain>"
            );
            let e = parse_disks(&xml).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{bad}: {e}");
            assert!(e.message.starts_with("domain XML: disk target"), "{e}");
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }

    /// A `<disk>` outside `<devices>` (in `<metadata>`, in a namespace) is
    /// not the disk whose source is replaced.
    #[test]
    fn only_the_devices_disk_source_is_replaced() {
        let xml = "<domain><name>d</name><metadata>\
            <x:disk xmlns:x='urn:x'><x:target dev='vda'/><x:source file='/a'/></x:disk></metadata>\
            <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
            <source file='/real'/><target dev='vda'/></disk></devices></domain>";
        let sources = vec![("vda".to_string(), PathBuf::from("/o.qcow2"))];
        let out = replace_disk_sources_as(xml, &sources, Some("qcow2")).unwrap();
        assert!(out.contains("<x:target dev='vda'/><x:source file='/a'/></x:disk>"), "{out}");
        assert!(
            out.contains("<driver name='qemu' type='qcow2'/><source file='/o.qcow2'/><target dev='vda'/>"),
            "{out}"
        );
        roxmltree::Document::parse(&out).unwrap();
        let disks = parse_disks(&out).unwrap();
        assert_eq!(disks[0].file, PathBuf::from("/o.qcow2"));
        // A target only in the metadata is not a disk of the domain.
        let only_meta = vec![("vdz".to_string(), PathBuf::from("/o"))];
        let xml = xml.replace("dev='vda'/><x:source", "dev='vdz'/><x:source");
        assert_eq!(replace_disk_sources(&xml, &only_meta).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn builds_snapshot_xml() {
        let all = vec!["vda".to_string(), "vdb".to_string(), "hdc".to_string()];
        let xml = snapshot_xml(&all, &[("vda", "/v/a'&.d1")]).unwrap();
        assert_eq!(
            xml,
            "<domainsnapshot>\n  <disks>\n    <disk name='vda' snapshot='external'>\n      <driver type='qcow2'/>\n      \
             <source file='/v/a&apos;&amp;.d1'/>\n    </disk>\n    <disk name='vdb' snapshot='no'/>\n    \
             <disk name='hdc' snapshot='no'/>\n  </disks>\n</domainsnapshot>\n"
        );
        // It parses back, with the file name intact.
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let src = doc.descendants().find(|n| n.has_tag_name("source")).unwrap();
        assert_eq!(src.attribute("file"), Some("/v/a'&.d1"));

        assert_eq!(snapshot_xml(&all, &[("vdz", "/x")]).unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(snapshot_xml(&all, &[("vda", "x.d1")]).unwrap_err().kind, ErrorKind::InvalidInput);
        assert_eq!(snapshot_xml(&all, &[("vda", "/x"), ("vda", "/y")]).unwrap_err().kind, ErrorKind::InvalidInput);
    }
}
