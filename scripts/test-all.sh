#!/usr/bin/env bash
# Runs every test of knib on a fresh Debian 12 machine, as root: installs the
# system packages, starts libvirt and a local Ceph S3 gateway (RGW), then the
# Rust, C and Java tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
# Debug info cut to line tables (backtraces keep files and lines) and no
# incremental-compilation state: the build takes about 5 GiB of disk, not 13
# (a CI machine's disk had 4.8 GiB free after the full-debug build).
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only
cargo build --workspace --all-targets
# The code's layout (rustfmt.toml) and clippy's lints, warnings refused.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The library without its libvirt part (plain files and the vault) builds.
cargo clippy -p knib-core --no-default-features -- -D warnings
# Doc comments: no broken or private links.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
# Free disk, for a run that fails on a full one (the tests need a few GiB).
df -h . /var/tmp | sed 's/^/test-all: /'
# The S3 tests' server: a single-node Ceph cluster with RGW on 127.0.0.1
# (scripts/ceph.sh), stopped when this run ends unless it ran before. Its S3
# settings (AWS_*, KNIB_S3_*) go to every test below, Rust, C and Java.
if ! bash scripts/ceph.sh status >/dev/null; then
    trap 'bash scripts/ceph.sh stop' EXIT
    bash scripts/ceph.sh start
fi
s3_env=$(bash scripts/ceph.sh env)
eval "$s3_env"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
# The C ABI: header drift, then the C programs under ASan/UBSan and Valgrind.
bash scripts/test-c.sh
# The Java bindings: the io.knib classes and their JUnit tests under -Xcheck:jni.
bash scripts/test-java.sh
