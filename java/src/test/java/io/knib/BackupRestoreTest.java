package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.RandomAccessFile;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Backups, compression, restores, quick restore, consolidation and the hash, from Java, for real. */
class BackupRestoreTest {
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

    @Test
    void fullAndIncrementalBackupOfARunningDomainCompressedAndRestoredIsIdenticalToTheDisk() throws Exception {
        TestVm vm = track(TestVm.running(dir, "vda"));
        Path disk = vm.disks.get("vda");
        Path store = dir.resolve("store");
        vm.write("vda", 0x11, 0, MIB);

        Path delta1 = dir.resolve("8c1e7a52-delta");
        TakeBackup.Request full = TakeBackup.Request.builder()
                .domain(vm.name)
                .running(true)
                .volume(new TakeBackup.Volume("vol-1", disk.toString(), delta1.toString(), store.resolve("b1/vda.qcow2").toString()))
                .build();
        TakeBackup.Answer a1;
        try (Knib k = new Knib()) {
            a1 = k.takeBackup(full);
        }
        assertEquals("full", a1.kind());
        assertEquals(Map.of("vol-1", delta1.toString()), a1.newVolumePaths());
        assertEquals(delta1, vm.activeFile("vda"), "the volume runs on the new delta");
        assertTrue(a1.volumes().get(0).size() > 0);
        assertEquals(a1.volumes().stream().mapToLong(TakeBackup.VolumeResult::size).sum(), a1.totalSize(),
                "totalSize: the sum of the volumes' sizes");

        vm.write("vda", 0x22, 4 * MIB, 512 * 1024);
        vm.write("vda", 0x23, 40 * MIB, 64 * 1024);
        Path delta2 = dir.resolve("f09b44d1-delta");
        TakeBackup.Volume v = new TakeBackup.Volume("vol-1", delta1.toString(), delta2.toString(), store.resolve("b2/vda.qcow2").toString())
                .withParentBackupPath(store.resolve("b1/vda.qcow2").toString())
                .withMerge(new TakeBackup.MergeTree(disk.toString(), delta1.toString()));
        TakeBackup.Request incr = TakeBackup.Request.builder().domain(vm.name).volume(v).build();
        List<String> steps = new ArrayList<>();
        TakeBackup.Answer a2;
        try (Knib k = new Knib()) {
            k.setProgressListener((step, pct) -> {
                synchronized (steps) {
                    steps.add(step);
                }
            });
            a2 = k.takeBackup(incr);
        }
        assertEquals("incremental", a2.kind());
        assertEquals(delta2.toString(), a2.volumes().get(0).newVolumePath());
        assertEquals(delta2, vm.activeFile("vda"));
        assertFalse(Files.exists(delta1), "the old delta was merged into the base");
        Path b2 = store.resolve("b2/vda.qcow2");
        assertEquals("../b1/vda.qcow2", Sh.backing(b2));
        synchronized (steps) {
            // The copy of the delta (knib's native data path) reported its progress.
            assertTrue(steps.stream().anyMatch(s -> s.startsWith("copy ") && s.endsWith(delta1.toString())), "progress: " + steps);
        }

        // Compress and finalize the incremental backup.
        try (Knib k = new Knib()) {
            // Read back and compared before it counts as written (a field knib refuses under any other name).
            CompressBackup.Request c = CompressBackup.Request.builder().file(b2.toString()).coroutines(2).rateLimitMbps(-1)
                    .checkOutput(true).build();
            assertEquals(0, c.rateLimitMbps(), "below 1 is no limit");
            assertTrue(c.checkOutput());
            CompressBackup.Answer ca = k.compressBackup(c);
            assertEquals("zstd", ca.compressed().get(0).library());
            assertTrue(Files.exists(Path.of(ca.compressed().get(0).compPath())));
            FinalizeCompression.Request f = new FinalizeCompression.Request(List.of(b2.toString()));
            FinalizeCompression.Answer fa = k.finalizeBackupCompression(f);
            assertEquals(Files.size(b2), fa.finalized().get(0).size());
            assertEquals(fa.finalized().stream().mapToLong(FinalizeCompression.SizedFile::size).sum(), fa.totalSize(),
                    "totalSize: the agent's answer details");
            assertFalse(Files.exists(Path.of(ca.compressed().get(0).compPath())));
            assertTrue(Sh.run("qemu-img", "info", "-U", b2.toString()).contains("compression type: zstd"));
        }

        // Restored to a new file, it is the disk as it is (no write came after the backup).
        Path restored = dir.resolve("restored/vda.qcow2");
        Files.createDirectories(restored.getParent());
        RestoreBackup.Request r = RestoreBackup.Request.builder()
                .volume(new RestoreBackup.Volume("vol-1", b2.toString(), restored.toString()))
                .build();
        try (Knib k = new Knib()) {
            RestoreBackup.Answer ra = k.restoreBackup(r);
            assertEquals(restored.toString(), ra.volumes().get(0).path());
            assertNull(ra.volumes().get(0).backing());
        }
        assertNull(Sh.backing(restored), "a restore is flattened");
        // The domain goes first, so that QEMU has written all it holds.
        Path active = vm.activeFile("vda");
        vm.close();
        assertTrue(Sh.identical(active, restored), "qemu-img compare: the restore differs from the disk");
        assertTrue(Sh.has(restored, 0x22, 4 * MIB, 512 * 1024) && Sh.has(restored, 0x11, 0, MIB));
    }

    /** A small chain like a store's: a full backup and an incremental one on it. */
    private Path[] chain() {
        Path full = dir.resolve("store/b1/vda.qcow2");
        Path incr = dir.resolve("store/b2/vda.qcow2");
        try {
            Files.createDirectories(full.getParent());
            Files.createDirectories(incr.getParent());
        } catch (java.io.IOException e) {
            throw new AssertionError(e);
        }
        Sh.qcow2(full, 32 * MIB);
        Sh.write(full, 0x31, 0, 2 * MIB);
        Sh.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "../b1/vda.qcow2", incr.toString());
        Sh.write(incr, 0x32, MIB, 256 * 1024);
        return new Path[] {full, incr};
    }

    @Test
    void quickRestoreThenConsolidate() throws Exception {
        Path[] c = chain();
        Path volume = dir.resolve("primary/vol-7.qcow2");
        Path oldDelta = dir.resolve("primary/vol-7-old-delta");
        Files.createDirectories(volume.getParent());
        Sh.qcow2(volume, 32 * MIB);
        Sh.qcow2(oldDelta, 32 * MIB);
        RestoreBackup.Request r = RestoreBackup.Request.builder()
                .quickRestore(true)
                .volume(new RestoreBackup.Volume("vol-7", c[1].toString(), volume.toString()))
                .deltaToRemove(oldDelta.toString())
                .build();
        try (Knib k = new Knib()) {
            RestoreBackup.Answer a = k.restoreBackup(r);
            assertEquals(c[1].toRealPath().toString(), a.volumes().get(0).backing());
            assertEquals(List.of(oldDelta.toString()), a.removed());
        }
        assertFalse(Files.exists(oldDelta));
        assertEquals(c[1].toRealPath().toString(), Sh.backing(volume), "the volume is an overlay on the backup");

        TestVm vm = track(TestVm.runningOn(Map.of("vda", volume)));
        ConsolidateVolumes.Request cr = new ConsolidateVolumes.Request(vm.name,
                List.of(new ConsolidateVolumes.VolumeRef("vol-7", volume.toString())));
        try (Knib k = new Knib()) {
            ConsolidateVolumes.Answer a = k.consolidateVolumes(cr);
            assertEquals(1, a.consolidated().size());
            assertTrue(a.consolidated().get(0).pulled());
            assertEquals("vda", a.consolidated().get(0).target());
        }
        vm.close();
        assertNull(Sh.backing(volume), "after consolidation the volume no longer needs the store");
        assertTrue(Sh.identical(volume, c[1]), "qemu-img compare: the consolidated volume differs from the backup");
    }

    @Test
    void theHashOfAChainIsStableAndChangesWithOneByte() throws Exception {
        Path[] c = chain();
        TakeBackupHash.Request r = new TakeBackupHash.Request(List.of(c[0].toString(), c[1].toString()))
                .withBackupUuid("backup-2");
        try (Knib k = new Knib()) {
            TakeBackupHash.Answer h1 = k.takeBackupHash(r);
            TakeBackupHash.Answer h2 = k.takeBackupHash(r);
            assertEquals(h1.hash(), h2.hash());
            assertEquals(32, h1.hash().length());
            assertEquals("backup-2", h1.backupUuid());
            assertEquals(2, h1.files().size());
            try (RandomAccessFile f = new RandomAccessFile(c[1].toFile(), "rw")) {
                long at = f.length() - 1;
                f.seek(at);
                int b = f.read();
                f.seek(at);
                f.write(b ^ 0x01);
            }
            TakeBackupHash.Answer h3 = k.takeBackupHash(r);
            assertNotEquals(h1.hash(), h3.hash());
            assertEquals(h1.files().get(0).hash(), h3.files().get(0).hash(), "the full backup did not change");
        }
    }
}
