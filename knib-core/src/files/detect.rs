//! Which filesystem (or volume format) a partition holds, from its magic
//! numbers, with its label when the format has one where it is cheap to
//! read. Names follow blkid's: "ext2", "ext3", "ext4", "vfat", "ntfs",
//! "exfat", "xfs", "btrfs", "LVM2_member", "swap", "crypto_LUKS",
//! "iso9660", "squashfs", "linux_raid_member"; "unknown" otherwise.

use crate::error::Result;

use super::device::Window;

/// A filesystem knib reads natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Native {
    /// ext2, ext3 or ext4 (ext4-view).
    Ext,
    /// FAT12, FAT16 or FAT32 (knib's own reader).
    Fat,
    /// NTFS (the ntfs crate).
    Ntfs,
}

/// What a partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// blkid's name of the format, or "unknown".
    pub name: String,
    /// The label, when the format has one and it is set.
    pub label: Option<String>,
    /// The native reader for it, if any.
    pub native: Option<Native>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A label field: up to the first NUL, trimmed; `None` when empty.
fn label(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let s = String::from_utf8_lossy(&bytes[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Whether `b` (at least 512 bytes) is a plausible FAT boot sector.
pub(crate) fn is_fat_boot_sector(b: &[u8]) -> bool {
    if b.len() < 512 || !matches!(b[0], 0xeb | 0xe9) {
        return false;
    }
    let bps = le16(b, 11);
    let spc = b[13];
    let media = b[21];
    let total = if le16(b, 19) != 0 { le16(b, 19) as u32 } else { le32(b, 32) };
    let fat_size = if le16(b, 22) != 0 { le16(b, 22) as u32 } else { le32(b, 36) };
    matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc != 0
        && spc.is_power_of_two()
        && le16(b, 14) != 0
        && b[16] != 0
        && (media == 0xf0 || media >= 0xf8)
        && total != 0
        && fat_size != 0
        && &b[3..11] != b"NTFS    "
        && &b[3..11] != b"EXFAT   "
}

/// Whether sector 0 (512 bytes) is the boot sector of a filesystem that
/// starts there (FAT, NTFS, exFAT), so it is not an MBR.
pub(crate) fn is_boot_sector_fs(b: &[u8]) -> bool {
    b.len() >= 512 && (&b[3..11] == b"NTFS    " || &b[3..11] == b"EXFAT   " || is_fat_boot_sector(b))
}

/// blkid's name for an ext filesystem with these feature flags.
fn ext_name(compat: u32, incompat: u32, ro_compat: u32) -> &'static str {
    const HAS_JOURNAL: u32 = 0x4;
    const JOURNAL_DEV: u32 = 0x8;
    // incompat features ext3 has too: filetype, recover, meta_bg.
    const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10;
    // ro_compat features ext3 has too: sparse_super, large_file, btree_dir.
    const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4;
    if incompat & JOURNAL_DEV != 0 {
        "jbd"
    } else if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if compat & HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    }
}

/// What `w` holds.
pub fn detect(w: &Window) -> Result<Detected> {
    let head = w.read_vec(0, 8192)?;
    let found =
        |name: &str, label: Option<String>, native: Option<Native>| Detected { name: name.to_string(), label, native };
    let at = |off: usize, magic: &[u8]| head.len() >= off + magic.len() && &head[off..off + magic.len()] == magic;
    if at(0, b"LUKS\xba\xbe") {
        // Its header (and label) may be cut short by a tiny disk.
        let l = if head.len() >= 8 && le16(&head, 6) == 2 { head.get(24..72).and_then(label) } else { None };
        return Ok(found("crypto_LUKS", l, None));
    }
    for s in 0..4 {
        if at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001") {
            return Ok(found("LVM2_member", None, None));
        }
    }
    if at(0, b"XFSB") {
        return Ok(found("xfs", head.get(108..120).and_then(label), None));
    }
    if at(0, b"hsqs") {
        return Ok(found("squashfs", None, None));
    }
    if w.len() >= 0x10000 + 0x1000 {
        let sb = w.read_vec(0x10000, 0x1000)?;
        if &sb[0x40..0x48] == b"_BHRfS_M" {
            return Ok(found("btrfs", label(&sb[0x12b..0x12b + 256]), None));
        }
    }
    if head.len() >= 512 && &head[3..11] == b"NTFS    " {
        return Ok(found("ntfs", None, Some(Native::Ntfs)));
    }
    if head.len() >= 512 && &head[3..11] == b"EXFAT   " {
        return Ok(found("exfat", None, None));
    }
    if head.len() >= 2048 && le16(&head, 1024 + 56) == 0xef53 {
        let sb = &head[1024..2048];
        let name = ext_name(le32(sb, 92), le32(sb, 96), le32(sb, 100));
        let native = (name != "jbd").then_some(Native::Ext);
        return Ok(found(name, label(&sb[120..136]), native));
    }
    if is_fat_boot_sector(&head) {
        let fat32 = le16(&head, 22) == 0;
        let l = if fat32 { &head[71..82] } else { &head[43..54] };
        let l = label(l).filter(|l| l != "NO NAME");
        return Ok(found("vfat", l, Some(Native::Fat)));
    }
    if head.len() >= 4096 && (at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE")) {
        return Ok(found("swap", label(&head[1024 + 28..1024 + 44]), None));
    }
    if head.len() >= 4100 && le32(&head, 4096) == 0xa92b_4efc {
        return Ok(found("linux_raid_member", None, None));
    }
    if w.len() >= 0x8006 && &w.read_vec(0x8001, 5)?[..] == b"CD001" {
        return Ok(found("iso9660", None, None));
    }
    Ok(found("unknown", None, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::device::Device;

    fn detect_bytes(d: Vec<u8>) -> Detected {
        let len = d.len() as u64;
        detect(&Window::new(Device::from_bytes(d, "t").shared(), 0, len).unwrap()).unwrap()
    }

    #[test]
    fn magic_numbers() {
        let mut x = vec![0u8; 1 << 17];
        x[0..4].copy_from_slice(b"XFSB");
        x[108..113].copy_from_slice(b"data1");
        assert_eq!(detect_bytes(x), Detected { name: "xfs".into(), label: Some("data1".into()), native: None });
        let mut l = vec![0u8; 1 << 17];
        l[512..520].copy_from_slice(b"LABELONE");
        l[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(detect_bytes(l).name, "LVM2_member");
        let mut s = vec![0u8; 1 << 17];
        s[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect_bytes(s).name, "swap");
        let mut b = vec![0u8; 1 << 17];
        b[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(detect_bytes(b).name, "btrfs");
        let mut e = vec![0u8; 1 << 17];
        e[1024 + 56] = 0x53;
        e[1024 + 57] = 0xef;
        assert_eq!(detect_bytes(e.clone()).name, "ext2");
        e[1024 + 92] = 4;
        assert_eq!(detect_bytes(e.clone()).name, "ext3");
        e[1024 + 96] = 0x40;
        e[1024 + 120..1024 + 124].copy_from_slice(b"root");
        assert_eq!(
            detect_bytes(e),
            Detected { name: "ext4".into(), label: Some("root".into()), native: Some(Native::Ext) }
        );
        assert_eq!(detect_bytes(vec![0u8; 1 << 17]).name, "unknown");
        assert_eq!(detect_bytes(vec![0u8; 100]).name, "unknown");
    }

    /// A disk shorter than the header its magic announces (a LUKS magic in
    /// 6 bytes, an XFS one in 100): detected without its label, never a
    /// panic on a slice past the end.
    #[test]
    fn short_disks_with_a_magic() {
        let mut luks2 = b"LUKS\xba\xbe\x00\x02".to_vec();
        luks2.resize(50, b'x');
        let mut xfs = b"XFSB".to_vec();
        xfs.resize(110, b'y');
        for (data, name) in [
            (b"LUKS\xba\xbe".to_vec(), "crypto_LUKS"),
            (b"LUKS\xba\xbe\x00".to_vec(), "crypto_LUKS"),
            (luks2, "crypto_LUKS"),
            (b"XFSB".to_vec(), "xfs"),
            (xfs, "xfs"),
        ] {
            let len = data.len();
            assert_eq!(detect_bytes(data.clone()), Detected { name: name.into(), label: None, native: None }, "{len}");
            let disk = crate::files::Disk::from_bytes(data).unwrap();
            assert_eq!(disk.filesystems()[0].fs_type, name, "{len}");
        }
    }
}
