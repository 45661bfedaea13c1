//! Gives `libknib.so` its soname. Within 0.y every minor release may break
//! the ABI (Cargo's semver), so the soname carries the compatible part of
//! the version: `libknib.so.0.1` for 0.1.z, `libknib.so.1` for 1.y.z.

fn main() {
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let minor = env!("CARGO_PKG_VERSION_MINOR");
    let soname = if major == "0" { format!("libknib.so.0.{minor}") } else { format!("libknib.so.{major}") };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    println!("cargo:rerun-if-changed=build.rs");
}
