package io.knib;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/**
 * Every write a test guest made, in order and never overlapping, so that what each disk held at any instant can
 * be rebuilt offline (a new image with the first n writes) and compared with a restore.
 */
final class GuestWrites {
    /** One guest write. */
    record Write(String target, int pattern, long offset, long len) {}

    private final TestVm vm;
    private final long diskSize;
    final List<Write> writes = new ArrayList<>();

    GuestWrites(TestVm vm, long diskSize) {
        this.vm = vm;
        this.diskSize = diskSize;
    }

    /** Write through the running domain's monitor, and record it. */
    void write(String target, int pattern, long offset, long len) {
        for (Write w : writes) {
            assertTrue(!w.target.equals(target) || w.offset + w.len <= offset || offset + len <= w.offset, "test writes must not overlap");
        }
        vm.write(target, pattern, offset, len);
        writes.add(new Write(target, pattern, offset, len));
    }

    /** Disk {@code target} as the first {@code n} writes left it, as a new qcow2 image in {@code dir}. */
    Path build(String target, int n, Path dir) {
        Path p = dir.resolve("expected-" + target + "-" + n + ".qcow2");
        try {
            Files.deleteIfExists(p);
        } catch (java.io.IOException e) {
            throw new AssertionError(e);
        }
        Sh.qcow2(p, diskSize);
        List<String> cmd = new ArrayList<>(List.of("qemu-io", "-f", "qcow2"));
        for (Write w : writes.subList(0, n)) {
            if (w.target.equals(target)) {
                cmd.add("-c");
                cmd.add(String.format("write -P 0x%02x %d %d", w.pattern, w.offset, w.len));
            }
        }
        cmd.add(p.toString());
        Sh.run(cmd.toArray(new String[0]));
        return p;
    }

    /** Fail unless image {@code image} reads as disk {@code target} after the first {@code n} writes. */
    void assertIs(Path image, String target, int n, Path dir) {
        Path expected = build(target, n, dir);
        assertTrue(Sh.identical(image, expected), image + " is not disk " + target + " after the first " + n + " writes");
    }

    /** Fail unless the running guest reads back every write. */
    void assertVmReadsEverything() {
        for (Write w : writes) {
            assertTrue(vm.reads(w.target, w.pattern, w.offset, w.len),
                    String.format("the guest lost the write of 0x%02x at %d+%d on %s", w.pattern, w.offset, w.len, w.target));
        }
    }
}
