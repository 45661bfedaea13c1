#!/usr/bin/env bash
# The C ABI's checks and tests, as CI runs them (from scripts/test-all.sh):
#   1. include/knib.h must equal a fresh generation by the pinned cbindgen,
#      and its version defines must equal Cargo.toml's version;
#   2. libknib.so / libknib.a are built and installed with the header into
#      a prefix (target/c-prefix), as a user would get them;
#   3. the C programs in tests/c are built against that prefix with the
#      system C compiler and run with AddressSanitizer + UBSan (leaks
#      included), then built plainly and run under Valgrind memcheck;
#      backup_restore is also linked statically against libknib.a once.
#      vault needs an S3 server (KNIB_S3_ENDPOINT and the AWS_* settings, as
#      `eval "$(bash scripts/ceph.sh env)"` gives them; test-all.sh starts
#      Ceph RGW before this script) and says it is skipped without one.
# Valgrind counts every memory error and the "definitely lost" and
# "indirectly lost" leaks; "possibly lost" and "still reachable" blocks are
# shown but not counted (Rust's std and libvirt keep process-wide
# allocations, such as thread-locals, until exit). tests/c/valgrind.supp
# suppresses the reports that are not errors, each with why.
#
#   bash scripts/test-c.sh                 check, build, test
#   bash scripts/test-c.sh --write-header  regenerate include/knib.h only
#
# Needs: a Rust toolchain, gcc (cc), valgrind, binutils (readelf),
# qemu-utils. (libvirt and libnbd are loaded by knib when first used, not
# linked: knib-core/src/dynlib.rs.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

CBINDGEN_VERSION=0.29.4
TARGET_DIR=${CARGO_TARGET_DIR:-target}
WORK=$TARGET_DIR/c-test
PREFIX=$TARGET_DIR/c-prefix
HEADER=include/knib.h

say() { echo "test-c: $*"; }
die() { echo "test-c: FAILED: $*" >&2; exit 1; }

# 0. The pinned cbindgen.
if ! cbindgen --version 2>/dev/null | grep -qx "cbindgen $CBINDGEN_VERSION"; then
    say "installing cbindgen $CBINDGEN_VERSION"
    cargo install cbindgen --version "$CBINDGEN_VERSION" --locked --quiet
fi
generate() { cbindgen --quiet --config knib-ffi/cbindgen.toml --output "$1" knib-ffi; }

if [ "${1:-}" = "--write-header" ]; then
    generate "$HEADER"
    say "wrote $HEADER"
    exit 0
fi

# 1. Header drift and version defines.
mkdir -p "$WORK"
generate "$WORK/knib.h.fresh"
if ! diff -u "$HEADER" "$WORK/knib.h.fresh" > "$WORK/header.diff"; then
    head -40 "$WORK/header.diff" >&2
    die "$HEADER differs from what cbindgen $CBINDGEN_VERSION generates from knib-ffi (diff above, whole in $WORK/header.diff): an exported item changed and the header was not regenerated; run: bash scripts/test-c.sh --write-header, and commit $HEADER"
fi
version=$(awk -F'"' '/^\[workspace\.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{print $2; exit}' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml's [workspace.package]"
IFS=. read -r major minor patch <<<"${version%%[-+]*}"
define() { sed -n "s/^#define $1 \(.*\)$/\1/p" "$HEADER"; }
[ "$(define KNIB_VERSION)" = "\"$version\"" ] || die "$HEADER: KNIB_VERSION is $(define KNIB_VERSION), Cargo.toml says \"$version\""
[ "$(define KNIB_VERSION_MAJOR)" = "$major" ] || die "$HEADER: KNIB_VERSION_MAJOR is $(define KNIB_VERSION_MAJOR), Cargo.toml says $major"
[ "$(define KNIB_VERSION_MINOR)" = "$minor" ] || die "$HEADER: KNIB_VERSION_MINOR is $(define KNIB_VERSION_MINOR), Cargo.toml says $minor"
[ "$(define KNIB_VERSION_PATCH)" = "$patch" ] || die "$HEADER: KNIB_VERSION_PATCH is $(define KNIB_VERSION_PATCH), Cargo.toml says $patch"
say "$HEADER matches cbindgen $CBINDGEN_VERSION and version $version"

# 2. Build and install. The static library's link line comes from rustc,
# printed only when it compiles the crate: kept from the last time.
cargo rustc --release --quiet -p knib-ffi --lib -- --print native-static-libs 2> "$WORK/rustc.err" || {
    cat "$WORK/rustc.err" >&2
    die "cargo build of knib-ffi"
}
if grep -q "native-static-libs:" "$WORK/rustc.err"; then
    sed -n 's/.*native-static-libs: //p' "$WORK/rustc.err" | tail -1 > "$WORK/native-static-libs"
fi
if [ ! -s "$WORK/native-static-libs" ]; then
    cargo clean --release --quiet -p knib-ffi
    cargo rustc --release --quiet -p knib-ffi --lib -- --print native-static-libs 2> "$WORK/rustc.err"
    sed -n 's/.*native-static-libs: //p' "$WORK/rustc.err" | tail -1 > "$WORK/native-static-libs"
fi
if [ "$major" = 0 ]; then soname=libknib.so.0.$minor; else soname=libknib.so.$major; fi
got=$(readelf -d "$TARGET_DIR/release/libknib.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$got" = "$soname" ] || die "libknib.so has soname '$got', want $soname"
rm -rf "$PREFIX"
install -D -m 644 "$HEADER" "$PREFIX/include/knib.h"
install -D -m 755 "$TARGET_DIR/release/libknib.so" "$PREFIX/lib/libknib.so.$version"
install -m 644 "$TARGET_DIR/release/libknib.a" "$PREFIX/lib/libknib.a"
ln -s "libknib.so.$version" "$PREFIX/lib/$soname"
ln -s "$soname" "$PREFIX/lib/libknib.so"
PREFIX=$(cd "$PREFIX" && pwd)
say "installed libknib $version ($soname) in $PREFIX"

# 3. Build and run the C programs.
CC=${CC:-cc}
CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic -g -I"$PREFIX/include")
LINK=(-L"$PREFIX/lib" -Wl,-rpath,"$PREFIX/lib" -lknib -lpthread)
programs=(backup_restore hostile files vault)
passed=0
failed=0
run_test() { # name, command...
    local name=$1; shift
    local log status=0
    log="$WORK/$(echo "$name" | tr -c 'A-Za-z0-9_\n' '-').log"
    "$@" > "$log" 2>&1 || status=$?
    if [ "$status" = 0 ]; then
        passed=$((passed + 1))
        say "pass: $name"
    else
        failed=$((failed + 1))
        tail -60 "$log" >&2
        say "FAIL: $name (exit $status; whole output in $log)"
    fi
}

export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=98
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
mkdir -p "$WORK/asan" "$WORK/plain"
# ASan intercepts the XDR calls of libtirpc, which libvirt uses, and binds
# its interceptors to the real functions when the program starts. libknib
# loads libvirt, and with it libtirpc, only when a domain is first used,
# so an ASan program that uses libknib's domain calls links libtirpc itself
# (without it, libvirt's first XDR call jumps to address 0). The README says
# so for C programs.
ASAN_LINK=(-Wl,--no-as-needed -l:libtirpc.so.3 -Wl,--as-needed)
for p in "${programs[@]}"; do
    "$CC" "${CFLAGS[@]}" -fsanitize=address,undefined -fno-omit-frame-pointer \
        -o "$WORK/asan/$p" "tests/c/$p.c" "${LINK[@]}" "${ASAN_LINK[@]}"
    "$CC" "${CFLAGS[@]}" -O1 -o "$WORK/plain/$p" "tests/c/$p.c" "${LINK[@]}"
done
# shellcheck disable=SC2046 # the link line is a list of words
"$CC" "${CFLAGS[@]}" -o "$WORK/plain/backup_restore-static" tests/c/backup_restore.c \
    "$PREFIX/lib/libknib.a" $(cat "$WORK/native-static-libs")

for p in "${programs[@]}"; do
    run_test "$p (ASan+UBSan)" "$WORK/asan/$p"
done
for p in "${programs[@]}"; do
    run_test "$p (Valgrind)" valgrind --quiet --error-exitcode=99 --leak-check=full \
        --suppressions=tests/c/valgrind.supp \
        --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
        "$WORK/plain/$p"
done
run_test "backup_restore (static libknib.a)" "$WORK/plain/backup_restore-static"
# A panic caught at the boundary goes to knib's log, never to the host
# program's stderr (Rust's default hook would print it there).
# shellcheck disable=SC2016 # $1 and $2 are the inner shell's
run_test "hostile (no panic message on stderr)" bash -c \
    '"$1" 2> "$2"; s=$?; if grep -q "panicked" "$2"; then cat "$2"; exit 97; fi; exit $s' \
    _ "$WORK/plain/hostile" "$WORK/hostile.stderr"

echo "ctests: $passed passed, $failed failed"
[ "$failed" = 0 ]
