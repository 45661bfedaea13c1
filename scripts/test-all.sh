#!/usr/bin/env bash
# Runs every test of knib on a fresh Debian 12 machine, as root: installs the
# system packages, starts libvirt, then the Rust, C and Java tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
cargo build --workspace --all-targets
# The code's layout (rustfmt.toml) and clippy's lints, warnings refused.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Doc comments: no broken or private links.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
# The C ABI: header drift, then the C programs under ASan/UBSan and Valgrind.
bash scripts/test-c.sh
# The Java bindings: the io.knib classes and their JUnit tests under -Xcheck:jni.
bash scripts/test-java.sh
