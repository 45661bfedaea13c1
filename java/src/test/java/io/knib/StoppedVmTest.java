package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A stopped CloudStack VM: its transient domain ({@code virsh create}, never defined) was destroyed, so libvirt
 * does not know it, and it is backed up from its volume files alone ({@code domain} null, {@code running} false).
 */
class StoppedVmTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    private final List<TestVm> vms = new ArrayList<>();

    @AfterEach
    void removeDomains() {
        vms.forEach(TestVm::close);
    }

    private TestVm track(TestVm vm) {
        vms.add(vm);
        return vm;
    }

    private Path restore(Path backup, String name) throws Exception {
        Path to = dir.resolve("restored/" + name);
        Files.createDirectories(to.getParent());
        try (Knib k = new Knib()) {
            k.restoreBackup(RestoreBackup.Request.builder().volume(new RestoreBackup.Volume("vol-1", backup.toString(), to.toString())).build());
        }
        return to;
    }

    @Test
    void aDestroyedTransientDomainIsBackedUpFromItsFiles() throws Exception {
        TestVm vm = track(TestVm.running(dir, "vda"));
        Path base = vm.disks.get("vda");
        Path store = dir.resolve("store");
        vm.write("vda", 0x41, 0, MIB);
        vm.write("vda", 0x42, 20 * MIB, 256 * 1024);

        // While it runs, a backup without its domain is refused: QEMU holds the file.
        Path delta1 = dir.resolve("2b7c0d9e-delta");
        TakeBackup.Request full = TakeBackup.Request.builder()
                .running(false)
                .volume(new TakeBackup.Volume("vol-1", base.toString(), delta1.toString(), store.resolve("b1/vda.qcow2").toString()))
                .build();
        try (Knib k = new Knib()) {
            BusyException e = assertThrows(BusyException.class, () -> k.takeBackup(full));
            assertTrue(e.getMessage().contains(base.toString()), e.getMessage());
            assertTrue(e.isVmConsistent());
        }
        assertFalse(Files.exists(delta1));
        assertFalse(Files.exists(store.resolve("b1/vda.qcow2")));

        vm.close(); // destroyed: a transient domain is gone
        assertTrue(Sh.exec(List.of("virsh", "-q", "-c", TestVm.URI, "domstate", vm.name)).code() != 0, "libvirt does not know it");
        TakeBackup.Answer a1;
        try (Knib k = new Knib()) {
            a1 = k.takeBackup(full);
        }
        assertEquals("full", a1.kind());
        assertEquals(Map.of("vol-1", delta1.toString()), a1.newVolumePaths());
        assertNull(a1.volumes().get(0).target());
        assertEquals(base.getFileName().toString(), Sh.backing(delta1));
        Path r1 = restore(store.resolve("b1/vda.qcow2"), "b1.qcow2");
        assertTrue(Sh.identical(delta1, r1), "the full backup is the disk as it was");

        // Started again (a new transient domain on the delta), written, destroyed; an incremental backup.
        TestVm again = track(TestVm.runningOn(Map.of("vda", delta1)));
        again.write("vda", 0x43, 4 * MIB, 512 * 1024);
        again.write("vda", 0x44, 0, 64 * 1024);
        again.close();
        Path delta2 = dir.resolve("5e1f3a70-delta");
        TakeBackup.Request incr = TakeBackup.Request.builder()
                .running(false)
                .endOfChain(false)
                .volume(new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), store.resolve("b2/vda.qcow2").toString())
                        .withParentBackupPath(store.resolve("b1/vda.qcow2").toString())
                        .withMerge(new TakeBackup.MergeTree(base.toString(), delta1.toString())))
                .build();
        TakeBackup.Answer a2;
        try (Knib k = new Knib()) {
            a2 = k.takeBackup(incr);
        }
        assertEquals("incremental", a2.kind());
        assertEquals(delta2.toString(), a2.volumes().get(0).newVolumePath());
        assertFalse(Files.exists(delta1), "the old delta is merged into the base and removed");
        assertEquals(base.getFileName().toString(), Sh.backing(delta2));
        assertEquals("../b1/vda.qcow2", Sh.backing(store.resolve("b2/vda.qcow2")));
        Path r2 = restore(store.resolve("b2/vda.qcow2"), "b2.qcow2");
        assertTrue(Sh.identical(delta2, r2), "the incremental backup is the disk as it was");
        assertTrue(Sh.has(r2, 0x43, 4 * MIB, 512 * 1024) && Sh.has(r2, 0x44, 0, 64 * 1024) && Sh.has(r2, 0x42, 20 * MIB, 256 * 1024));

        // A merge of the delta into its base without a domain (the end of the chain, as the MS asks it).
        MergeSnapshot.Request m = new MergeSnapshot.Request(null, List.of(new MergeSnapshot.Merge("vol-1", base.toString(), delta2.toString(), List.of())))
                .withRunning(false);
        MergeSnapshot.Answer ma;
        try (Knib k = new Knib()) {
            ma = k.mergeSnapshot(m);
        }
        assertEquals(base.toString(), ma.volumes().get(0).path());
        assertNull(ma.volumes().get(0).target());
        assertFalse(Files.exists(delta2));
        assertTrue(Sh.identical(base, r2), "the merge kept every write");

        // The MS ends every whole-VM restore with a merge of the volumes not in the backup: none here.
        MergeSnapshot.Answer none;
        try (Knib k = new Knib()) {
            none = k.mergeSnapshot(new MergeSnapshot.Request(null, List.of()).withRunning(false));
        }
        assertTrue(none.volumes().isEmpty(), "nothing to merge is a success with nothing done");
        assertTrue(Sh.identical(base, r2), "an empty merge changed nothing");
    }

    @Test
    void aFailedBackupOfAStoppedTransientVmIsCleanedUpFromItsFiles() throws Exception {
        TestVm vm = track(TestVm.running(dir, "vda"));
        Path base = vm.disks.get("vda");
        Path store = dir.resolve("store");
        vm.write("vda", 0x51, 0, MIB);
        vm.close();
        Path delta1 = dir.resolve("0d4e-delta");
        try (Knib k = new Knib()) {
            k.takeBackup(TakeBackup.Request.builder()
                    .running(false)
                    .volume(new TakeBackup.Volume("vol-1", base.toString(), delta1.toString(), store.resolve("b1/vda.qcow2").toString()))
                    .build());
        }
        TestVm again = track(TestVm.runningOn(Map.of("vda", delta1)));
        again.write("vda", 0x52, 8 * MIB, 128 * 1024);
        again.close();
        Path before = dir.resolve("before.qcow2");
        Sh.run("qemu-img", "convert", "-U", "-O", "qcow2", delta1.toString(), before.toString());

        // The copy fails: a directory stands where its temporary file goes.
        Path delta2 = dir.resolve("7a9c-delta");
        TakeBackup.Request incr = TakeBackup.Request.builder()
                .running(false)
                .volume(new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), store.resolve("b2/vda.qcow2").toString())
                        .withParentBackupPath(store.resolve("b1/vda.qcow2").toString())
                        .withMerge(new TakeBackup.MergeTree(base.toString(), delta1.toString())))
                .build();
        Path part = store.resolve("b2/.vda.qcow2.part/x");
        Files.createDirectories(part);
        try (Knib k = new Knib()) {
            KnibException e = assertThrows(KnibException.class, () -> k.takeBackup(incr));
            assertTrue(e.isVmConsistent(), e.getMessage());
            Files.delete(part);
            Files.delete(part.getParent());
            CleanupVmBackup.Answer c = k.cleanupVmBackup(CleanupVmBackup.Request.of(incr));
            assertFalse(c.published());
            assertEquals("discard", c.mode());
            assertFalse(c.vmRunning(), "a VM without a domain does not run");
            assertEquals(delta1.toString(), c.volumes().get(0).path());
            assertNull(c.volumes().get(0).target());
        }
        assertFalse(Files.exists(delta2));
        assertFalse(Files.exists(store.resolve("b2/vda.qcow2")));
        assertTrue(Sh.identical(delta1, before), "the VM reads what it wrote");

        // The next incremental backup holds every write.
        TestVm third = track(TestVm.runningOn(Map.of("vda", delta1)));
        third.write("vda", 0x53, 12 * MIB, 64 * 1024);
        third.close();
        try (Knib k = new Knib()) {
            k.takeBackup(incr);
        }
        Path r = restore(store.resolve("b2/vda.qcow2"), "b2.qcow2");
        assertTrue(Sh.identical(delta2, r));
        assertTrue(Sh.has(r, 0x51, 0, MIB) && Sh.has(r, 0x52, 8 * MIB, 128 * 1024) && Sh.has(r, 0x53, 12 * MIB, 64 * 1024));
    }
    /** The state a backup fails in after its copy: the new delta on the old one, the store file complete. */
    private static void failedAfterTheCopy(Path oldDelta, Path newDelta, Path storeFile) throws Exception {
        Sh.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", oldDelta.getFileName().toString(), newDelta.toString());
        Files.createDirectories(storeFile.getParent());
        Sh.run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", "-B", "../b1/vda.qcow2", "-F", "qcow2",
                oldDelta.toString(), storeFile.toString());
    }

    @Test
    void aCompleteFailedBackupIsDiscardedByDefaultAndFinishedWithModeComplete() throws Exception {
        TestVm vm = track(TestVm.running(dir, "vda"));
        Path base = vm.disks.get("vda");
        Path store = dir.resolve("store");
        vm.write("vda", 0x61, 0, MIB);
        vm.close();
        Path delta1 = dir.resolve("1c2d-delta");
        try (Knib k = new Knib()) {
            k.takeBackup(TakeBackup.Request.builder()
                    .running(false)
                    .volume(new TakeBackup.Volume("vol-1", base.toString(), delta1.toString(), store.resolve("b1/vda.qcow2").toString()))
                    .build());
        }
        TestVm again = track(TestVm.runningOn(Map.of("vda", delta1)));
        again.write("vda", 0x62, 6 * MIB, 128 * 1024);
        again.close();
        Path before = dir.resolve("before.qcow2");
        Sh.run("qemu-img", "convert", "-U", "-O", "qcow2", delta1.toString(), before.toString());

        Path delta2 = dir.resolve("3e4f-delta");
        Path b2 = store.resolve("b2/vda.qcow2");
        TakeBackup.Request incr = TakeBackup.Request.builder()
                .running(false)
                .volume(new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), b2.toString())
                        .withParentBackupPath(store.resolve("b1/vda.qcow2").toString())
                        .withMerge(new TakeBackup.MergeTree(base.toString(), delta1.toString())))
                .build();

        // The agent's cleanup (the default): the store file goes, the VM is back on base <- delta1.
        failedAfterTheCopy(delta1, delta2, b2);
        try (Knib k = new Knib()) {
            CleanupVmBackup.Answer c = k.cleanupVmBackup(CleanupVmBackup.Request.of(incr));
            assertEquals("discard", c.mode());
            assertTrue(c.published(), "every store file was there");
            assertEquals(List.of(b2.toString()), c.removedFromStore());
            assertFalse(c.vmRunning());
            assertEquals(delta1.toString(), c.volumes().get(0).path());
        }
        assertFalse(Files.exists(b2));
        assertFalse(Files.exists(delta2));
        assertEquals(base.getFileName().toString(), Sh.backing(delta1));
        assertTrue(Sh.identical(delta1, before), "the VM reads what it wrote");

        // With mode "complete", the same state is finished: the backup kept, the old delta merged.
        failedAfterTheCopy(delta1, delta2, b2);
        try (Knib k = new Knib()) {
            CleanupVmBackup.Answer c = k.cleanupVmBackup(CleanupVmBackup.Request.of(incr).withMode("complete"));
            assertEquals("complete", c.mode());
            assertTrue(c.published());
            assertEquals(List.of(), c.removedFromStore());
            assertEquals(delta2.toString(), c.volumes().get(0).path());
        }
        assertFalse(Files.exists(delta1));
        assertTrue(Sh.identical(delta2, before));
        assertTrue(Sh.identical(restore(b2, "b2.qcow2"), before), "the finished backup is the disk as it was");
    }
}
