//! Fuzz the qcow2 reader on arbitrary bytes: the header parser, then, when
//! the bytes open as an image, cluster lookups and reads (L1/L2 entries,
//! compressed clusters). Any input may fail; none may panic, hang or
//! allocate without bound.
//!
//! Run (nightly + cargo-fuzz): `cd knib-core/fuzz && cargo +nightly fuzz run qcow2_header`

#![no_main]

use knib_core::qcow2::{Header, Qcow2Image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse("fuzz", data, data.len() as u64);
    let Ok(mut img) = Qcow2Image::from_bytes("fuzz", data.to_vec()) else { return };
    let clusters = img.guest_clusters();
    for i in 0..clusters.min(256) {
        let _ = img.cluster_state(i);
    }
    let cs = img.cluster_size();
    let size = img.virtual_size();
    let mut buf = vec![0u8; 8192];
    for i in 0..clusters.min(16) {
        let off = i * cs;
        let len = (size - off).min(buf.len() as u64) as usize;
        let _ = img.read_at(off, &mut buf[..len]);
    }
});
