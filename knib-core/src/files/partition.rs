//! Partition tables: GPT (with its CRC32 checks, falling back to the backup
//! header) and MBR (primary, extended and logical partitions).
//!
//! Written from the UEFI specification (chapter 5, GUID Partition Table)
//! and the classic MBR/EBR layout. Sectors are 512 bytes, except that a GPT
//! is also looked for with 4096-byte sectors.
//!
//! What is found decides the layout of a disk:
//! - a valid GPT header (primary at LBA 1, or the backup at the last LBA)
//!   with a matching entries CRC: the GPT's partitions;
//! - else, when sector 0 is itself a filesystem's boot sector (FAT, NTFS,
//!   exFAT): one filesystem on the whole disk;
//! - else an MBR (signature 0x55AA, status bytes 0x00 or 0x80) with at
//!   least one partition: its primary partitions (1 to 4) and the logical
//!   ones of its extended partition (5 and up);
//! - else the whole disk.
//!
//! A protective MBR (type 0xEE) whose GPT is damaged in both copies is a
//! Corrupt error, as is a partition that goes past the end of the disk.

use crate::error::{KnibError, Result};

use super::device::Window;

/// The most logical partitions followed in an extended partition.
pub const MAX_LOGICAL: usize = 128;
/// The most GPT entries read.
pub const MAX_GPT_ENTRIES: u32 = 4096;

/// One partition (or the whole disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number (1-4 primary, 5+ logical; GPT entry index + 1), `None`
    /// for the whole disk.
    pub number: Option<u32>,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Which table a disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A GUID partition table.
    Gpt,
    /// An MS-DOS partition table.
    Mbr,
    /// No table: one filesystem (or nothing) on the whole disk.
    None,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The partitions of the disk seen through `disk` (the whole device).
pub fn read_partitions(disk: &Window) -> Result<(TableKind, Vec<Partition>)> {
    let size = disk.len();
    let whole = || vec![Partition { number: None, start: 0, size }];
    if size < 512 {
        return Ok((TableKind::None, whole()));
    }
    let mbr = disk.read_vec(0, 512)?;
    let has_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let protective = has_sig && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xee);
    for sector in [512u64, 4096] {
        if let Some(parts) = read_gpt(disk, sector)? {
            return Ok((TableKind::Gpt, parts));
        }
    }
    if protective {
        return Err(KnibError::corrupt(format!(
            "{}: the MBR says the disk has a GPT, but neither its primary nor its backup header is valid",
            disk.device().borrow().name()
        )));
    }
    if super::detect::is_boot_sector_fs(&mbr) {
        return Ok((TableKind::None, whole()));
    }
    if has_sig {
        if let Some(parts) = read_mbr(disk, &mbr)? {
            return Ok((TableKind::Mbr, parts));
        }
    }
    Ok((TableKind::None, whole()))
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

fn check_bounds(disk: &Window, number: u32, start: u64, size: u64) -> Result<()> {
    if start.checked_add(size).is_none_or(|e| e > disk.len()) {
        return Err(KnibError::corrupt(format!(
            "{}: partition {number} ({size} bytes at offset {start}) goes past the end of the disk ({} bytes)",
            disk.device().borrow().name(),
            disk.len()
        )));
    }
    Ok(())
}

/// The partitions of an MBR, `None` when the sector does not look like one.
fn read_mbr(disk: &Window, mbr: &[u8]) -> Result<Option<Vec<Partition>>> {
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + i * 16..446 + (i + 1) * 16]).collect();
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        let (kind, lba, count) = (e[4], le32(e, 8) as u64, le32(e, 12) as u64);
        if kind == 0 || count == 0 {
            continue;
        }
        let number = i as u32 + 1;
        let (start, size) = (lba * 512, count * 512);
        check_bounds(disk, number, start, size)?;
        if is_extended(kind) {
            if extended.is_none() {
                extended = Some((lba, count));
            }
            continue;
        }
        parts.push(Partition { number: Some(number), start, size });
    }
    if let Some((ext_lba, ext_count)) = extended {
        read_logical(disk, ext_lba, ext_count, &mut parts)?;
    }
    if parts.is_empty() && extended.is_none() {
        return Ok(None);
    }
    Ok(Some(parts))
}

/// Follow the chain of EBRs of the extended partition at `ext_lba`.
fn read_logical(disk: &Window, ext_lba: u64, ext_count: u64, parts: &mut Vec<Partition>) -> Result<()> {
    let mut ebr_lba = ext_lba;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5;
    loop {
        if !seen.insert(ebr_lba) || seen.len() > MAX_LOGICAL {
            return Err(KnibError::corrupt(format!(
                "{}: the chain of logical partitions loops or is longer than {MAX_LOGICAL}",
                disk.device().borrow().name()
            )));
        }
        let ebr = disk.read_vec(ebr_lba * 512, 512)?;
        if ebr.len() < 512 || ebr[510] != 0x55 || ebr[511] != 0xaa {
            return Err(KnibError::corrupt(format!(
                "{}: the extended boot record at sector {ebr_lba} has no 0x55AA signature",
                disk.device().borrow().name()
            )));
        }
        let (first, second) = (&ebr[446..462], &ebr[462..478]);
        if first[4] != 0 && le32(first, 12) != 0 {
            let start = (ebr_lba + le32(first, 8) as u64) * 512;
            let size = le32(first, 12) as u64 * 512;
            check_bounds(disk, number, start, size)?;
            parts.push(Partition { number: Some(number), start, size });
            number += 1;
        }
        if !is_extended(second[4]) || le32(second, 12) == 0 {
            return Ok(());
        }
        let next = ext_lba + le32(second, 8) as u64;
        if next >= ext_lba + ext_count {
            return Err(KnibError::corrupt(format!(
                "{}: an extended boot record points at sector {next}, outside the extended partition",
                disk.device().borrow().name()
            )));
        }
        ebr_lba = next;
    }
}

/// The partitions of a GPT with `sector`-byte sectors, `None` when there is
/// no valid header in either place.
fn read_gpt(disk: &Window, sector: u64) -> Result<Option<Vec<Partition>>> {
    let sectors = disk.len() / sector;
    if sectors < 3 {
        return Ok(None);
    }
    for lba in [1, sectors - 1] {
        if let Some(parts) = gpt_at(disk, sector, lba)? {
            return Ok(Some(parts));
        }
    }
    Ok(None)
}

/// The partitions of the GPT whose header is at `lba`, `None` if that header
/// or its entries do not check out.
fn gpt_at(disk: &Window, sector: u64, lba: u64) -> Result<Option<Vec<Partition>>> {
    let h = disk.read_vec(lba * sector, sector as usize)?;
    if h.len() < 92 || &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let header_size = le32(&h, 12) as usize;
    if !(92..=h.len()).contains(&header_size) {
        return Ok(None);
    }
    let mut copy = h[..header_size].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != le32(&h, 16) || le64(&h, 24) != lba {
        return Ok(None);
    }
    let sectors = disk.len() / sector;
    let (first_usable, last_usable) = (le64(&h, 40), le64(&h, 48));
    let entries_lba = le64(&h, 72);
    let (count, entry_size) = (le32(&h, 80), le32(&h, 84));
    if count > MAX_GPT_ENTRIES
        || entry_size < 128
        || !entry_size.is_power_of_two()
        || entry_size > 4096
        || first_usable > last_usable
        || last_usable >= sectors
        || entries_lba >= sectors
    {
        return Ok(None);
    }
    let bytes = count as usize * entry_size as usize;
    let Some(off) = entries_lba.checked_mul(sector) else { return Ok(None) };
    if off.checked_add(bytes as u64).is_none_or(|e| e > disk.len()) {
        return Ok(None);
    }
    let table = disk.read_vec(off, bytes)?;
    if crc32fast::hash(&table) != le32(&h, 88) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for i in 0..count as usize {
        let e = &table[i * entry_size as usize..(i + 1) * entry_size as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let number = i as u32 + 1;
        if first > last || last >= sectors {
            return Err(KnibError::corrupt(format!(
                "{}: GPT partition {number} has sectors {first} to {last}, not inside the disk's {sectors}",
                disk.device().borrow().name()
            )));
        }
        parts.push(Partition { number: Some(number), start: first * sector, size: (last - first + 1) * sector });
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::device::Device;

    fn window(data: Vec<u8>) -> Window {
        let len = data.len() as u64;
        Window::new(Device::from_bytes(data, "test disk").shared(), 0, len).unwrap()
    }

    fn mbr_entry(d: &mut [u8], i: usize, kind: u8, lba: u32, count: u32) {
        let e = &mut d[446 + i * 16..446 + (i + 1) * 16];
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
    }

    #[test]
    fn mbr_with_extended_and_logical_partitions() {
        let mut d = vec![0u8; 4 << 20];
        d[510] = 0x55;
        d[511] = 0xaa;
        mbr_entry(&mut d, 0, 0x83, 2048, 2048);
        mbr_entry(&mut d, 1, 0x05, 4096, 4096);
        // EBR at 4096: logical at +1 (1000 sectors), next EBR at ext+2048.
        let ebr = 4096 * 512;
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xaa;
        let mut e = d[ebr..ebr + 512].to_vec();
        mbr_entry(&mut e, 0, 0x83, 1, 1000);
        mbr_entry(&mut e, 1, 0x05, 2048, 1000);
        d[ebr..ebr + 512].copy_from_slice(&e);
        let ebr2 = (4096 + 2048) * 512;
        let mut e = vec![0u8; 512];
        e[510] = 0x55;
        e[511] = 0xaa;
        mbr_entry(&mut e, 0, 0x83, 2, 500);
        d[ebr2..ebr2 + 512].copy_from_slice(&e);
        let (kind, parts) = read_partitions(&window(d.clone())).unwrap();
        assert_eq!(kind, TableKind::Mbr);
        assert_eq!(
            parts,
            vec![
                Partition { number: Some(1), start: 2048 * 512, size: 2048 * 512 },
                Partition { number: Some(5), start: 4097 * 512, size: 1000 * 512 },
                Partition { number: Some(6), start: (4096 + 2048 + 2) * 512, size: 500 * 512 },
            ]
        );
        // An EBR chain that points back at itself is an error, not a hang.
        let mut looped = d.clone();
        let mut e = looped[ebr2..ebr2 + 512].to_vec();
        mbr_entry(&mut e, 1, 0x05, 2048, 1000);
        looped[ebr2..ebr2 + 512].copy_from_slice(&e);
        let e = read_partitions(&window(looped)).unwrap_err();
        assert!(e.message.contains("loops"), "{e}");
        // A partition past the end of the disk.
        let mut big = d;
        mbr_entry(&mut big, 0, 0x83, 2048, 1 << 30);
        let e = read_partitions(&window(big)).unwrap_err();
        assert!(e.message.contains("partition 1") && e.message.contains("past the end"), "{e}");
    }

    #[test]
    fn no_table_is_the_whole_disk() {
        let (kind, parts) = read_partitions(&window(vec![0u8; 1 << 20])).unwrap();
        assert_eq!(kind, TableKind::None);
        assert_eq!(parts, vec![Partition { number: None, start: 0, size: 1 << 20 }]);
    }

    fn gpt_disk() -> Vec<u8> {
        let sectors = 8192u64;
        let mut d = vec![0u8; (sectors * 512) as usize];
        d[510] = 0x55;
        d[511] = 0xaa;
        mbr_entry(&mut d, 0, 0xee, 1, (sectors - 1) as u32);
        let mut table = vec![0u8; 128 * 128];
        table[0] = 1; // a non-zero type GUID
        table[32..40].copy_from_slice(&2048u64.to_le_bytes());
        table[40..48].copy_from_slice(&4095u64.to_le_bytes());
        let name: Vec<u8> = "EFI".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        table[56..56 + name.len()].copy_from_slice(&name);
        let tcrc = crc32fast::hash(&table);
        let header = |my: u64, entries: u64| {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
            h[72..80].copy_from_slice(&entries.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&tcrc.to_le_bytes());
            let c = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            h
        };
        d[512..604].copy_from_slice(&header(1, 2));
        d[1024..1024 + table.len()].copy_from_slice(&table);
        let last = (sectors - 1) as usize * 512;
        d[last..last + 92].copy_from_slice(&header(sectors - 1, sectors - 33));
        let bt = (sectors - 33) as usize * 512;
        d[bt..bt + table.len()].copy_from_slice(&table);
        d
    }

    #[test]
    fn gpt_primary_then_backup_then_corrupt() {
        let d = gpt_disk();
        let want = vec![Partition { number: Some(1), start: 2048 * 512, size: 2048 * 512 }];
        assert_eq!(read_partitions(&window(d.clone())).unwrap(), (TableKind::Gpt, want.clone()));
        // A damaged primary header: the backup is used.
        let mut d2 = d.clone();
        d2[512 + 40] ^= 1;
        assert_eq!(read_partitions(&window(d2.clone())).unwrap(), (TableKind::Gpt, want));
        // Both damaged: a clear error, since the MBR is protective.
        let last = d2.len() - 512;
        d2[last + 40] ^= 1;
        let e = read_partitions(&window(d2)).unwrap_err();
        assert!(e.message.contains("neither its primary nor its backup header is valid"), "{e}");
        // A damaged entry array fails its CRC in both copies.
        let mut d3 = d;
        d3[1024 + 33] ^= 1;
        let bt = d3.len() - 33 * 512;
        d3[bt + 33] ^= 1;
        assert!(read_partitions(&window(d3)).is_err());
    }
}
