//! A model of what a test guest wrote: every write (disk, offset, length,
//! byte) in order, never overlapping, so that the disks at any instant can be
//! rebuilt offline and compared with a restore.

#![cfg(feature = "libvirt")]
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use super::disk::{assert_identical, make_disk};
use super::vm::TestVm;

/// One guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// Index of the disk target in [`Model::targets`].
    pub disk: usize,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The byte written.
    pub pattern: u8,
}

/// Every write made to a test VM's disks, in order.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Disk targets and their sizes.
    pub targets: Vec<(String, u64)>,
    /// The writes, in the order they completed.
    pub writes: Vec<Write>,
}

impl Model {
    /// A model of disks of these targets and sizes.
    pub fn new(targets: &[(&str, u64)]) -> Model {
        Model { targets: targets.iter().map(|(t, s)| (t.to_string(), *s)).collect(), writes: Vec::new() }
    }

    /// Index of a target.
    pub fn idx(&self, target: &str) -> usize {
        self.targets.iter().position(|(t, _)| t == target).expect("known target")
    }

    /// Make a write on the running VM and record it.
    pub fn write(&mut self, vm: &TestVm, target: &str, pattern: u8, offset: u64, len: u64) {
        let w = Write { disk: self.idx(target), offset, len, pattern };
        assert!(
            !self.writes.iter().any(|o| o.disk == w.disk && o.offset < offset + len && offset < o.offset + o.len),
            "test writes must not overlap"
        );
        vm.write(target, pattern, offset, len);
        self.writes.push(w);
    }

    /// Make a write to the file of disk `target` of a stopped VM (`qemu-io`
    /// on the image, which loads its persistent bitmaps and records the
    /// write in them as QEMU running the VM would) and record it.
    pub fn write_file(&mut self, file: &Path, format: &str, target: &str, pattern: u8, offset: u64, len: u64) {
        let w = Write { disk: self.idx(target), offset, len, pattern };
        assert!(
            !self.writes.iter().any(|o| o.disk == w.disk && o.offset < offset + len && offset < o.offset + o.len),
            "test writes must not overlap"
        );
        let out = Command::new("qemu-io")
            .args(["-f", format, "-c", &format!("write -P 0x{pattern:02x} {offset} {len}")])
            .arg(file)
            .output()
            .expect("qemu-io");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.writes.push(w);
    }

    /// Build disk `target` as the first `n` writes left it, at `dest` (qcow2).
    pub fn build(&self, target: &str, n: usize, dest: &Path) {
        let i = self.idx(target);
        make_disk(dest, self.targets[i].1, &[]);
        let cmds: Vec<String> = self.writes[..n]
            .iter()
            .filter(|w| w.disk == i)
            .map(|w| format!("write -P 0x{:02x} {} {}", w.pattern, w.offset, w.len))
            .collect();
        for chunk in cmds.chunks(200) {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "qcow2"]);
            for cmd in chunk {
                c.args(["-c", cmd]);
            }
            let out = c.arg(dest).output().expect("qemu-io");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Assert the image at `restored` is disk `target` after the first `n`
    /// writes.
    pub fn assert_restored(&self, target: &str, n: usize, restored: &Path, scratch: &Path) {
        let reference = scratch.join(format!("ref-{target}-{n}.qcow2"));
        let _ = std::fs::remove_file(&reference);
        self.build(target, n, &reference);
        assert_identical(restored, &reference);
    }

    /// Assert the running VM reads back every write.
    pub fn assert_vm_reads_everything(&self, vm: &TestVm) {
        for w in &self.writes {
            let t = &self.targets[w.disk].0;
            assert!(
                vm.read_check(t, w.pattern, w.offset, w.len),
                "the guest lost the write of 0x{:02x} at {}+{} on {t}",
                w.pattern,
                w.offset,
                w.len
            );
        }
    }
}

/// Whether image `file` (any format) holds `len` bytes of `pattern` at `offset`.
pub fn image_has(file: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-c", &format!("read -P 0x{pattern:02x} {offset} {len}")])
        .arg(file)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read ") && !text.contains("read failed"), "qemu-io on {}: {text}", file.display());
    !text.contains("Pattern verification failed")
}
