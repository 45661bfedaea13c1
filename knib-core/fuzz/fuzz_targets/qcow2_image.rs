//! Fuzz a whole qcow2 image given as bytes: open it, look up and read its
//! clusters (data, zero, compressed zlib and zstd), read its refcounts and
//! run the refcount check over every table. Any input may fail; none may
//! panic, hang or allocate without bound.
//!
//! Run (nightly + cargo-fuzz): `cd knib-core/fuzz && cargo +nightly fuzz run qcow2_image`

#![no_main]

use knib_core::qcow2::Qcow2Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut img) = Qcow2Image::from_bytes("fuzz", data.to_vec()) else { return };
    let clusters = img.guest_clusters();
    let cs = img.cluster_size();
    let size = img.virtual_size();
    let mut buf = vec![0u8; cs as usize];
    for i in 0..clusters.min(512) {
        if img.cluster_state(i).is_ok() {
            let len = (size - i * cs).min(cs) as usize;
            let _ = img.read_at(i * cs, &mut buf[..len]);
        }
    }
    for c in 0..data.len() as u64 / cs + 2 {
        let _ = img.refcount(c);
    }
    let _ = img.check_refcounts();
});
