//! C libraries loaded the first time they are used, not when the process
//! starts: libvirt ([`crate::libvirt`]) and libnbd ([`crate::nbd`]).
//!
//! Linking them costs every process that links knib, whether or not it
//! ever talks to a domain: the dynamic loader maps libvirt and the fifty
//! libraries it needs (GnuTLS, libxml2, GLib, ...), libnbd and its own
//! (ICU among them), and resolves their symbols, at each start. Measured with
//! `perf stat` (an empty C program: 0.3 ms of CPU; linked with `-lvirt`:
//! 9.4 ms), this was nine tenths of `knib`'s start, paid by every `knib
//! restore`, `knib compress` or `knib list`, by every C program that
//! links `libknib.so`, and a tenth of a short incremental backup
//! (docs/performance.md, "Process start"). Neither the `virt` crate nor
//! any libnbd binding on crates.io loads its library on demand, so knib
//! declares the calls it makes ([`dyn_api!`]) and resolves them with
//! `libloading` (the well-kept crate for `dlopen`) on first use.
//!
//! A host without the library gets a clear error from the operations that
//! need it (naming the library, the Debian package and the loader's
//! reason) and runs every other operation; knib builds without the
//! libraries' headers.
//!
//! # Invariants
//!
//! - A library is loaded at most once per process (the table is kept in a
//!   `OnceLock`) and never unloaded: the table keeps its `Library` handles,
//!   so the function pointers stay valid for the life of the process.
//! - A failed load is remembered: later calls get the same error without
//!   trying again.
//! - Every call is resolved when the table is made: a missing symbol is an
//!   error then, never a crash later.

use libloading::Library;

/// Load shared library `soname`; the error names it, what it is for
/// (`what`) and the Debian package that has it.
pub(crate) fn open(soname: &str, what: &str, package: &str) -> Result<Library, String> {
    // SAFETY: loading runs the library's initialisers, which are written to
    // run in any process that links it (as every client of it does).
    unsafe { Library::new(soname) }
        .map_err(|e| format!("cannot load {soname}, {what} (is it installed? {package} on Debian): {e}"))
}

/// Declares a table of C functions (`$lib` tags which library has each)
/// and its constructor `resolve`, which takes the libraries by tag.
macro_rules! dyn_api {
    ($(#[$meta:meta])* $vis:vis struct $api:ident { $($lib:ident $name:ident: fn($($arg:ty),* $(,)?) -> $ret:ty;)* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        $vis struct $api {
            $($vis $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            _libs: Vec<libloading::Library>,
        }

        impl $api {
            /// Resolve every call in `libs` (each with its tag).
            ///
            /// # Safety
            /// Each symbol must have the declared C signature.
            unsafe fn resolve(libs: Vec<(&str, libloading::Library)>) -> std::result::Result<Self, String> {
                let lib = |tag: &str| libs.iter().find(|(t, _)| *t == tag).map(|(_, l)| l).expect("a library per tag");
                let api = $api {
                    $($name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: the caller vouches for the signature; the
                        // pointer is copied out, and stays valid because the
                        // library is kept in `_libs`, never unloaded.
                        *unsafe { lib(stringify!($lib)).get(name.as_bytes()) }
                            .map_err(|e| format!("{} lacks {}: {e}", stringify!($lib), stringify!($name)))?
                    },)*
                    _libs: Vec::new(),
                };
                Ok($api { _libs: libs.into_iter().map(|(_, l)| l).collect(), ..api })
            }
        }
    };
}
pub(crate) use dyn_api;
