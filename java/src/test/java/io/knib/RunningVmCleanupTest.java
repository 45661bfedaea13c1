package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.RandomAccessFile;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

/**
 * The agent's cleanup ({@code cleanupVmBackup}, default mode "discard") of a failed incremental backup of a
 * running transient domain, from each state a failure can leave: the guest goes on writing meanwhile, and
 * afterwards the domain runs on the file it ran on before, the store holds nothing of the failed backup, and
 * the guest reads every write.
 */
class RunningVmCleanupTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    /** Where the failed backup stopped. */
    enum State {
        /** The new delta is on top (the domain writes into it), nothing is on the store. */
        NEW_DELTA,
        /** Also a partial copy on the store, under its temporary name. */
        PARTIAL_COPY,
        /** Also the store file, complete under its final name. */
        COPIED
    }

    @ParameterizedTest
    @EnumSource(State.class)
    void aFailedBackupOfARunningDomainIsDiscarded(State state) throws Exception {
        try (TestVm vm = TestVm.running(dir, "vda")) {
            Path base = vm.disks.get("vda");
            Path store = dir.resolve("store");
            GuestWrites model = new GuestWrites(vm, 64 * MIB);
            model.write("vda", 0x31, 0, MIB);
            Path delta1 = dir.resolve("6d1e-delta");
            Path b1 = store.resolve("b1/vda.qcow2");
            try (Knib k = new Knib()) {
                k.takeBackup(TakeBackup.Request.builder()
                        .domain(vm.name)
                        .running(true)
                        .volume(new TakeBackup.Volume("vol-1", base.toString(), delta1.toString(), b1.toString()))
                        .build());
            }
            model.write("vda", 0x32, 2 * MIB, MIB);

            Path delta2 = dir.resolve("9f2a-delta");
            Path b2 = store.resolve("b2/vda.qcow2");
            Path part = store.resolve("b2/.vda.qcow2.part");
            TakeBackup.Request incr = TakeBackup.Request.builder()
                    .domain(vm.name)
                    .running(true)
                    .volume(new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), b2.toString())
                            .withParentBackupPath(b1.toString())
                            .withMerge(new TakeBackup.MergeTree(base.toString(), delta1.toString())))
                    .build();

            // The state the failed backup left.
            vm.snapshot(Map.of("vda", delta2));
            assertEquals(delta2, vm.activeFile("vda"));
            if (state != State.NEW_DELTA) {
                Files.createDirectories(b2.getParent());
                Path copy = state == State.COPIED ? b2 : part;
                Sh.run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", "-B", "../b1/vda.qcow2", "-F", "qcow2",
                        delta1.toString(), copy.toString());
                if (state == State.PARTIAL_COPY) {
                    try (RandomAccessFile f = new RandomAccessFile(copy.toFile(), "rw")) {
                        f.setLength(f.length() / 2);
                    }
                }
            }
            // The guest writes on, into the new delta.
            model.write("vda", 0x33, 5 * MIB, 128 * 1024);

            CleanupVmBackup.Answer c;
            try (Knib k = new Knib()) {
                c = k.cleanupVmBackup(CleanupVmBackup.Request.of(incr));
            }
            assertEquals("discard", c.mode());
            assertEquals(state == State.COPIED, c.published(), "published: every store file was there");
            assertTrue(c.vmConsistent());
            assertTrue(c.vmRunning(), "the domain runs");
            List<String> removed = switch (state) {
                case NEW_DELTA -> List.of();
                case PARTIAL_COPY -> List.of(part.toString());
                case COPIED -> List.of(b2.toString());
            };
            assertEquals(removed, c.removedFromStore());
            assertEquals(1, c.volumes().size());
            assertEquals("vol-1", c.volumes().get(0).uuid());
            assertEquals("vda", c.volumes().get(0).target());
            assertEquals(delta1.toString(), c.volumes().get(0).path());
            assertFalse(c.actions().isEmpty());

            // The domain runs on the file it ran on before, over the same base; nothing of the backup is left.
            assertEquals(delta1, vm.activeFile("vda"));
            assertEquals(List.of(delta1, base), Sh.chain(delta1));
            assertFalse(Files.exists(delta2), "the new delta is committed back and removed");
            assertFalse(Files.exists(b2));
            assertFalse(Files.exists(part));
            model.assertVmReadsEverything();
            vm.flush("vda");
            model.assertIs(delta1, "vda", model.writes.size(), dir);

            // The same backup again holds every write.
            int upto = model.writes.size();
            try (Knib k = new Knib()) {
                TakeBackup.Answer a = k.takeBackup(incr);
                assertEquals("incremental", a.kind());
                Path to = dir.resolve("restored.qcow2");
                k.restoreBackup(RestoreBackup.Request.builder().volume(new RestoreBackup.Volume("vol-1", b2.toString(), to.toString())).build());
                model.assertIs(to, "vda", upto, dir);
            }
            assertEquals(List.of(delta2, base), Sh.chain(vm.activeFile("vda")));
            Sh.check(b2);
            Sh.check(b1);
            model.assertVmReadsEverything();
        }
    }
}
