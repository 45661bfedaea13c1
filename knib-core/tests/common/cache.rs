//! What of a file the page cache holds, as a test measures it.

use std::path::Path;

/// Bytes of `path` in the page cache (mmap + mincore).
pub fn resident(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a private read-only map of a file we opened, unmapped below;
    // mincore writes one byte per page into `vec`, which has that many.
    unsafe {
        let m = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(m, libc::MAP_FAILED);
        assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
        libc::munmap(m, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * page as u64
}
