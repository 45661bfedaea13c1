//! What knib's dirty bitmaps and checkpoints look like from outside: the
//! persistent bitmaps stored in a qcow2 file, and a domain's checkpoints.

#![cfg(feature = "libvirt")]
#![allow(dead_code)]

use std::path::Path;

use knib_core::libvirt::backup::checkpoints;
use knib_core::qemu_img::QemuImg;
use knib_core::Control;

use super::vm::TestVm;

/// The knib bitmaps (`knib-*`) stored in the qcow2 file `file`, sorted.
pub fn file_bitmaps(file: &Path) -> Vec<String> {
    let mut b: Vec<String> = QemuImg::new()
        .bitmaps(file, &Control::new())
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .filter(|n| n.starts_with("knib-"))
        .collect();
    b.sort();
    b
}

/// The domain's knib checkpoints, sorted.
pub fn knib_checkpoints(vm: &TestVm) -> Vec<String> {
    let mut c: Vec<String> = checkpoints(&vm.vm).unwrap().into_iter().filter(|n| n.starts_with("knib-")).collect();
    c.sort();
    c
}
