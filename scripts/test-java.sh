#!/usr/bin/env bash
# The Java bindings' build and tests, as CI runs them (from scripts/test-all.sh):
#   1. knib-jni (libknib_jni.so) is built with cargo;
#   2. the io.knib classes are compiled (javac --release 17, warnings are
#      errors) and packed with the library into java/build/knib.jar, at
#      /native/linux-x86_64/libknib_jni.so;
#   3. the JUnit 5 tests are compiled against that jar and run with
#      -Xcheck:jni through the real library (loaded from the jar), against
#      the real libvirt daemon and qemu-img.
# It fails on any failed test and on any warning of -Xcheck:jni. Offline:
# only Debian's jars (packages junit5 and libgoogle-gson-java) are used.
#
#   bash scripts/test-java.sh                      everything
#   bash scripts/test-java.sh --select-class io.knib.ErrorMappingTest
#                                                  some tests (JUnit selectors, in place
#                                                  of scanning every test class)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=java/build
JARS=/usr/share/java
GSON=$JARS/gson.jar
JUNIT=$JARS/junit-platform-console-standalone.jar

say() { echo "test-java: $*"; }
die() { echo "test-java: FAILED: $*" >&2; exit 1; }

for f in "$GSON" "$JUNIT"; do
    [ -f "$f" ] || die "$f is missing: install the Debian packages libgoogle-gson-java and junit5 (bash scripts/setup.sh)"
done
command -v javac >/dev/null || die "javac is missing: install openjdk-17-jdk-headless (bash scripts/setup.sh)"

# 1. The native library (a debug build, as cargo test builds).
cargo build --quiet -p knib-jni
LIB=$TARGET_DIR/debug/libknib_jni.so
[ -f "$LIB" ] || die "cargo did not build $LIB"

# 2. The classes and the jar, with the library inside.
rm -rf "$OUT"
mkdir -p "$OUT/classes/native/linux-x86_64" "$OUT/test-classes"
javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$GSON" -d "$OUT/classes" \
    $(find java/src/main/java -name '*.java' | sort)
cp "$LIB" "$OUT/classes/native/linux-x86_64/libknib_jni.so"
jar --create --file "$OUT/knib.jar" --main-class io.knib.Knib -C "$OUT/classes" .
say "built $OUT/knib.jar"

# 3. The tests, against the jar. The library is found in the jar (no
# knib.library.path, nothing on java.library.path); knib.test.library names
# the built file for the tests of the other ways of loading it.
javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$OUT/knib.jar:$GSON:$JUNIT" -d "$OUT/test-classes" \
    $(find java/src/test/java -name '*.java' | sort)
LOG=$OUT/junit-output.txt
selectors=("$@")
[ "${#selectors[@]}" -gt 0 ] || selectors=(--scan-class-path "$OUT/test-classes")
set +e
java -Xcheck:jni \
    -Dknib.test.library="$(realpath "$LIB")" \
    -Djava.util.logging.SimpleFormatter.format='[%4$s] %3$s: %5$s%6$s%n' \
    -cp "$JUNIT:$OUT/knib.jar:$GSON:$OUT/test-classes" \
    org.junit.platform.console.ConsoleLauncher \
    --disable-banner --disable-ansi-colors --details=tree --fail-if-no-tests \
    "${selectors[@]}" > "$LOG" 2>&1
status=$?
set -e
cat "$LOG"

count() { sed -n "s/^\[ *\([0-9]\+\) tests $1 *\]$/\1/p" "$LOG" | tail -1; }
passed=$(count successful); failed=$(count failed); skipped=$(count skipped)
passed=${passed:-0}; failed=${failed:-0}; skipped=${skipped:-0}
# -Xcheck:jni's warnings start with "WARNING" (the JUL format above never
# does); a fatal one aborts the JVM.
warnings=$(grep -cE '^WARNING|FATAL ERROR in native method' "$LOG" || true)
echo "test-java: $passed passed, $failed failed, $skipped skipped, $warnings -Xcheck:jni warnings"
[ "$warnings" -eq 0 ] || { grep -nE '^WARNING|FATAL ERROR in native method' "$LOG" >&2; die "-Xcheck:jni warned (lines above; whole output in $LOG)"; }
[ "$status" -eq 0 ] || die "JUnit exited with $status (whole output in $LOG)"
[ "$passed" -gt 0 ] || die "no test ran"
