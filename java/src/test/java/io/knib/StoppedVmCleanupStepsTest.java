package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.RandomAccessFile;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.stream.Stream;
import org.junit.jupiter.api.Named;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;

/**
 * The cleanup ({@code cleanupVmBackup}) of an incremental backup of a stopped VM without a domain (its files
 * alone) that failed after each of its durable steps, in mode "discard" (the default) and "complete": the answer
 * says what was published and removed and where the volume runs; the volume reads what the guest had, its chain
 * is clean with nothing else left on primary storage, the store holds nothing of a discarded backup; and the
 * next backup holds every write.
 */
class StoppedVmCleanupStepsTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    /** The states a failure can leave, each the one before it and one more durable step of the backup. */
    enum State {
        /** The new delta is created over the old one; nothing is copied. */
        NEW_DELTA,
        /** The copy is partly written to the store, under its temporary name. */
        PARTIAL_COPY,
        /** The copy is complete and published under its final name. */
        PUBLISHED,
        /** The old delta is merged into the base (and kept); the new delta is still on the old delta. */
        OLD_MERGED,
        /** The new delta is re-pointed at the base; the old delta's file is still there. */
        REPOINTED,
        /** The old delta is removed: the backup is finished. */
        OLD_REMOVED
    }

    static Stream<Arguments> states() {
        List<Arguments> all = new ArrayList<>();
        for (Named<String> mode : List.of(Named.<String>of("the default mode (discard)", null), Named.of("mode complete", "complete"))) {
            for (State s : State.values()) {
                all.add(Arguments.of(s, mode));
            }
        }
        return all.stream();
    }

    @ParameterizedTest(name = "{0}, {1}")
    @MethodSource("states")
    void aFailedBackupIsCleanedUpFromEveryStep(State state, String mode) throws Exception {
        Path primary = dir.resolve("primary");
        Files.createDirectories(primary);
        Path store = dir.resolve("store");
        Path base = primary.resolve("vda-vol");
        Sh.qcow2(base, 16 * MIB);
        Sh.write(base, 0x61, 0, MIB);
        Path delta1 = primary.resolve("vda-delta-b1");
        Path b1 = store.resolve("b1/vda.qcow2");
        try (Knib k = new Knib()) {
            k.takeBackup(TakeBackup.Request.builder()
                    .running(false)
                    .volume(new TakeBackup.Volume("vol-1", base.toString(), delta1.toString(), b1.toString()))
                    .build());
        }
        Path v1 = dir.resolve("view-b1.qcow2");
        Sh.flatten(delta1, v1);
        Sh.write(delta1, 0x62, 6 * MIB, 128 * 1024);
        Sh.write(delta1, 0x63, 512 * 1024, 64 * 1024);
        Sh.run("qemu-io", "-f", "qcow2", "-c", "write -z 0 65536", delta1.toString());
        Path before = dir.resolve("view-before.qcow2");
        Sh.flatten(delta1, before);

        Path delta2 = primary.resolve("vda-delta-b2");
        Path b2 = store.resolve("b2/vda.qcow2");
        Path part = store.resolve("b2/.vda.qcow2.part");
        TakeBackup.Request incr = TakeBackup.Request.builder()
                .running(false)
                .volume(new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), b2.toString())
                        .withParentBackupPath(b1.toString())
                        .withMerge(new TakeBackup.MergeTree(base.toString(), delta1.toString())))
                .build();

        // The backup's steps up to `state`, as the backup takes them.
        for (State s : State.values()) {
            switch (s) {
                case NEW_DELTA -> Sh.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", delta1.getFileName().toString(),
                        delta2.toString());
                case PARTIAL_COPY -> {
                    Files.createDirectories(part.getParent());
                    copy(delta1, part);
                    try (RandomAccessFile f = new RandomAccessFile(part.toFile(), "rw")) {
                        f.setLength(f.length() / 2);
                    }
                }
                case PUBLISHED -> {
                    Files.delete(part);
                    copy(delta1, b2);
                }
                case OLD_MERGED -> Sh.run("qemu-img", "commit", "-q", "-d", delta1.toString());
                case REPOINTED -> Sh.run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", base.getFileName().toString(), delta2.toString());
                case OLD_REMOVED -> Files.delete(delta1);
            }
            if (s == state) {
                break;
            }
        }
        assertTrue(Sh.identical(delta2, before), "the backup's steps keep what the volume reads");
        // The VM ran between the failed backup and the cleanup: it wrote into the new delta, over what the old
        // delta holds. The cleanup must keep those writes.
        Sh.write(delta2, 0x6e, 0, 8 * MIB);
        Path now = dir.resolve("view-now.qcow2");
        Sh.flatten(delta2, now);

        CleanupVmBackup.Request req = CleanupVmBackup.Request.of(incr);
        if (mode != null) {
            req = req.withMode(mode);
        }
        CleanupVmBackup.Answer c;
        try (Knib k = new Knib()) {
            c = k.cleanupVmBackup(req);
        }
        boolean published = state.compareTo(State.PUBLISHED) >= 0;
        boolean finish = published && mode != null;
        String what = state + ", mode " + c.mode() + ": " + c.actions();
        assertEquals(mode == null ? "discard" : mode, c.mode());
        assertEquals(published, c.published(), what);
        assertTrue(c.vmConsistent());
        assertFalse(c.vmRunning(), "a VM without a domain does not run");
        List<String> removed = state == State.PARTIAL_COPY ? List.of(part.toString()) : published && !finish ? List.of(b2.toString()) : List.of();
        assertEquals(removed, c.removedFromStore(), what);
        assertEquals(state == State.OLD_REMOVED && finish, c.actions().isEmpty(), what);
        // Discarded: back on the old delta while it is in the chain, else (merged into the base) on the base.
        Path top = finish ? delta2 : state.compareTo(State.REPOINTED) >= 0 ? base : delta1;
        assertEquals(1, c.volumes().size());
        assertEquals("vol-1", c.volumes().get(0).uuid());
        assertNull(c.volumes().get(0).target());
        assertEquals(top.toString(), c.volumes().get(0).path(), what);

        // The volume's chain: the top over the base, clean, and nothing else on primary storage.
        List<Path> chain = Sh.chain(top);
        assertEquals(top.equals(base) ? List.of(base) : List.of(top, base), chain, what);
        try (Stream<Path> files = Files.list(primary)) {
            assertEquals(chain.stream().sorted().toList(), files.sorted().toList(), "the files on primary storage: " + what);
        }
        chain.forEach(Sh::check);
        assertTrue(Sh.identical(top, now), "the volume reads what the guest wrote: " + what);
        // The store: the failed backup complete (finished) or gone (discarded).
        assertFalse(Files.exists(part));
        assertEquals(finish, Files.exists(b2), what);
        Sh.check(b1);
        if (finish) {
            Sh.check(b2);
            assertTrue(Sh.identical(restore(b2, "b2"), before), "the finished backup is the volume as it was");
        }

        // The next backup holds every write: incremental over the last backup whose delta is still there,
        // else (the volume on its base alone) full.
        Sh.write(top, 0x64, 12 * MIB, 64 * 1024);
        Path v3 = dir.resolve("view-b3.qcow2");
        Sh.flatten(top, v3);
        Path b3 = store.resolve("b3/vda.qcow2");
        TakeBackup.Volume next = new TakeBackup.Volume("vol-1", top.toString(), primary.resolve("vda-delta-b3").toString(), b3.toString());
        if (!top.equals(base)) {
            next = next.withMerge(new TakeBackup.MergeTree(base.toString(), top.toString())).withParentBackupPath((finish ? b2 : b1).toString());
        }
        try (Knib k = new Knib()) {
            TakeBackup.Answer a = k.takeBackup(TakeBackup.Request.builder().running(false).volume(next).build());
            assertEquals(top.equals(base) ? "full" : "incremental", a.kind());
        }
        assertTrue(Sh.identical(restore(b3, "b3"), v3), "the next backup holds every write: " + what);
        assertTrue(Sh.identical(restore(b1, "b1"), v1));
        Sh.chain(primary.resolve("vda-delta-b3")).forEach(Sh::check);
    }

    /** The copy an incremental backup writes: the old delta's clusters over the parent backup. */
    private static void copy(Path delta, Path to) {
        Sh.run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", "-B", "../b1/vda.qcow2", "-F", "qcow2", delta.toString(), to.toString());
    }

    private Path restore(Path backup, String name) throws Exception {
        Path to = dir.resolve("restored-" + name + ".qcow2");
        Files.deleteIfExists(to);
        try (Knib k = new Knib()) {
            k.restoreBackup(RestoreBackup.Request.builder().volume(new RestoreBackup.Volume("vol-1", backup.toString(), to.toString())).build());
        }
        return to;
    }
}
