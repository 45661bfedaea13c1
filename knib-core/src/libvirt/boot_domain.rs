//! The definition of a throwaway domain that boots a backup for a boot
//! test: the XML libvirt is handed (see `engine::validate` for the test).
//!
//! # Invariants
//!
//! - Every path and name in the XML is escaped; a path that is not UTF-8 is
//!   refused, never mangled.
//! - The domain runs QEMU as root with a static DAC label and no
//!   relabelling (`<seclabel type='static' model='dac' relabel='no'>`):
//!   libvirt never changes the owner of the files it is given.
//! - One vCPU, the disks in the order given (virtio for `vd*`, SATA for
//!   `sd*`, IDE for `hd*`), a guest agent channel, a VGA card without a
//!   graphics listener (screenshots need none), the serial console in a
//!   file; no memory balloon. Without a kernel the first disk boots through
//!   the firmware.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::xml::xml_escape;
use crate::error::{KnibError, Result};

/// The kernel command line used with a kernel and no command line.
pub const DEFAULT_CMDLINE: &str = "root=/dev/vda console=tty0 console=ttyS0";

/// What the throwaway domain is made of.
#[derive(Debug, Clone, Copy)]
pub struct BootDomain<'a> {
    /// The domain's name.
    pub name: &'a str,
    /// libvirt's domain type, `kvm` or `qemu`.
    pub domain_type: &'a str,
    /// A kernel to boot directly.
    pub kernel: Option<&'a Path>,
    /// Its initrd.
    pub initrd: Option<&'a Path>,
    /// Its command line; default [`DEFAULT_CMDLINE`].
    pub cmdline: Option<&'a str>,
    /// The guest's memory, in MiB.
    pub memory_mib: u64,
    /// The disks in boot order: (guest target, qcow2 file).
    pub disks: &'a [(String, PathBuf)],
    /// The file the serial console is written to.
    pub console: &'a Path,
    /// Who runs the test, added to the domain's description (the boot
    /// test's sweep of orphan domains reads it back).
    pub owner: &'a str,
}

/// The bus of a disk target: `virtio` for `vd*`, `sata` for `sd*`, `ide`
/// for `hd*`, none for any other.
pub fn disk_bus(target: &str) -> Option<&'static str> {
    if target.starts_with("vd") {
        Some("virtio")
    } else if target.starts_with("sd") {
        Some("sata")
    } else if target.starts_with("hd") {
        Some("ide")
    } else {
        None
    }
}

fn utf8(p: &Path) -> Result<String> {
    p.to_str().map(xml_escape).ok_or_else(|| KnibError::invalid(format!("path {} is not UTF-8", p.display())))
}

impl BootDomain<'_> {
    /// The domain's XML.
    pub fn xml(&self) -> Result<String> {
        let (name, domain_type, overlays) = (self.name, self.domain_type, self.disks);
        let mut os = String::from("<type arch='x86_64'>hvm</type>");
        if let Some(kernel) = self.kernel {
            let _ = write!(os, "<kernel>{}</kernel>", utf8(kernel)?);
            if let Some(initrd) = self.initrd {
                let _ = write!(os, "<initrd>{}</initrd>", utf8(initrd)?);
            }
            let cmdline = self.cmdline.unwrap_or(DEFAULT_CMDLINE);
            let _ = write!(os, "<cmdline>{}</cmdline>", xml_escape(cmdline));
        }
        let mut devices = String::new();
        for (i, (target, file)) in overlays.iter().enumerate() {
            let boot = if i == 0 && self.kernel.is_none() { "\n      <boot order='1'/>" } else { "" };
            let _ = write!(
                devices,
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      <target dev='{}' bus='{}'/>{boot}\n    </disk>\n",
                utf8(file)?,
                xml_escape(target),
                disk_bus(target).unwrap_or("virtio"),
            );
        }
        Ok(format!(
            "<domain type='{domain_type}'>
  <name>{name}</name>
  <description>knib boot test of a backup; removed when the test ends; {owner}</description>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>{os}</os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{devices}    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
            name = xml_escape(name),
            owner = xml_escape(self.owner),
            memory = self.memory_mib,
            console = utf8(self.console)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_has_the_devices() {
        let xml = BootDomain {
            name: "knib-validate-1-0",
            domain_type: "qemu",
            kernel: Some(Path::new("/k/vmlinuz")),
            initrd: Some(Path::new("/k/initrd")),
            cmdline: Some("root=/dev/vda a&b"),
            memory_mib: 256,
            disks: &[("vda".into(), "/w/o.qcow2".into())],
            console: Path::new("/w/c.log"),
            owner: "run by pid 1 in pid:[4]",
        }
        .xml()
        .unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let text = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).unwrap();
        assert_eq!(text("kernel"), "/k/vmlinuz");
        assert!(text("description").ends_with("; run by pid 1 in pid:[4]"));
        assert_eq!(text("cmdline"), "root=/dev/vda a&b");
        assert!(xml.contains("org.qemu.guest_agent.0") && xml.contains("<model type='vga'/>"));
        assert!(!xml.contains("<boot order"));
    }
}
