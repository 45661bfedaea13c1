package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Incremental backups after disk-only VM snapshots taken since the last backup, as the KBOSS agent sends them:
 * {@code path} the top snapshot delta, {@code merge.child} the delta of the last backup, {@code merge.parent}
 * the layer below it, {@code merge.grand_children} the layer over it, {@code vm_snapshot_delta_paths} the old
 * delta and the snapshot deltas but the top, oldest first. Each backup is restored and compared with what the
 * guest had written up to it (writes made through the monitor).
 */
class VmSnapshotsTest {
    static final long MIB = TestVm.MIB;
    static final long DISK_SIZE = 64 * MIB;

    @TempDir
    Path dir;

    private final List<TestVm> vms = new ArrayList<>();

    @AfterEach
    void removeDomains() {
        vms.forEach(TestVm::close);
    }

    private Path store() {
        return dir.resolve("store");
    }

    private Path storeFile(int n, String target) {
        return store().resolve("b" + n + "/" + target + ".qcow2");
    }

    private Path delta(TestVm vm, String target, int n) {
        return dir.resolve(vm.name + "-" + target + "-delta-" + n);
    }

    /**
     * The volume of backup {@code n} of disk {@code target} now on {@code chain} (top first) as the management
     * server sends it, with {@code k} VM snapshots taken since the last backup.
     */
    private TakeBackup.Volume volume(TestVm vm, String target, List<Path> chain, int n, Integer parent, int k) {
        TakeBackup.Volume v = new TakeBackup.Volume("uuid-" + target, chain.get(0).toString(), delta(vm, target, n).toString(),
                storeFile(n, target).toString());
        if (chain.size() > k + 1) {
            List<String> grandChildren = k > 0 ? List.of(chain.get(k - 1).toString()) : List.of();
            v = v.withMerge(new TakeBackup.MergeTree(chain.get(k + 1).toString(), chain.get(k).toString(), grandChildren));
            List<String> snapshots = new ArrayList<>();
            for (int i = k; i >= 1; i--) {
                snapshots.add(chain.get(i).toString());
            }
            v = v.withVmSnapshotDeltaPaths(snapshots);
        }
        if (parent != null) {
            v = v.withParentBackupPath(storeFile(parent, target).toString());
        }
        return v;
    }

    /** A disk-only VM snapshot named {@code name} of every disk; the new files. */
    private Map<String, Path> vmSnapshot(TestVm vm, String name) {
        Map<String, Path> files = new LinkedHashMap<>();
        for (String t : vm.disks.keySet()) {
            files.put(t, dir.resolve(vm.name + "-" + t + "-" + name));
        }
        vm.snapshot(files);
        return files;
    }

    private TakeBackup.Answer take(TakeBackup.Request r) throws Exception {
        try (Knib k = new Knib()) {
            return k.takeBackup(r);
        }
    }

    /** Backup {@code n} of disk {@code target}, restored, is the disk after the first {@code upto} writes; its store file is clean. */
    private void assertBackup(GuestWrites model, int n, String target, int upto) throws Exception {
        Path to = dir.resolve("restored/" + target + "-" + n + ".qcow2");
        Files.createDirectories(to.getParent());
        Files.deleteIfExists(to);
        try (Knib k = new Knib()) {
            k.restoreBackup(RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("uuid-" + target, storeFile(n, target).toString(), to.toString()))
                    .build());
        }
        model.assertIs(to, target, upto, dir);
        for (Path f : Sh.chain(storeFile(n, target))) {
            Sh.check(f);
        }
    }

    /** Backup {@code n} of a running domain with {@code k} VM snapshots since backup {@code parent}. */
    private TakeBackup.Answer takeRunning(TestVm vm, int n, Integer parent, int k) throws Exception {
        TakeBackup.Request.Builder b = TakeBackup.Request.builder().domain(vm.name).running(true);
        for (String t : vm.disks.keySet()) {
            b.volume(volume(vm, t, Sh.chain(vm.activeFile(t)), n, parent, k));
        }
        return take(b.build());
    }

    @Test
    void incrementalsOfARunningDomainAfterOneAndAfterTwoVmSnapshots() throws Exception {
        TestVm vm = TestVm.running(dir, "vda", "vdb");
        vms.add(vm);
        GuestWrites model = new GuestWrites(vm, DISK_SIZE);
        long[] at = {0};
        java.util.function.IntConsumer write = p -> {
            for (String t : vm.disks.keySet()) {
                model.write(t, p, at[0], 192 * 1024);
            }
            at[0] += 256 * 1024;
        };

        write.accept(0x11);
        int n1 = model.writes.size();
        TakeBackup.Answer a = takeRunning(vm, 1, null, 0);
        assertEquals("full", a.kind());
        for (String t : vm.disks.keySet()) {
            assertEquals(List.of(delta(vm, t, 1), vm.disks.get(t)), Sh.chain(vm.activeFile(t)));
            assertBackup(model, 1, t, n1);
        }

        // One VM snapshot since the last backup, with writes before and after it.
        write.accept(0x21);
        Map<String, Path> s1 = vmSnapshot(vm, "s1");
        write.accept(0x22);
        int n2 = model.writes.size();
        a = takeRunning(vm, 2, 1, 1);
        assertEquals("incremental", a.kind());
        for (int i = 0; i < 2; i++) {
            String t = "vd" + (char) ('a' + i);
            assertEquals("uuid-" + t, a.volumes().get(i).uuid());
            assertEquals(delta(vm, t, 2).toString(), a.volumes().get(i).newVolumePath());
            assertEquals(List.of(delta(vm, t, 2), s1.get(t), vm.disks.get(t)), Sh.chain(vm.activeFile(t)),
                    "the old delta is merged into the base, the VM snapshot's delta kept");
            assertFalse(Files.exists(delta(vm, t, 1)), "the old delta is removed");
            assertEquals("../b1/" + t + ".qcow2", Sh.backing(storeFile(2, t)));
            assertBackup(model, 2, t, n2);
        }

        // Two VM snapshots since the last backup.
        write.accept(0x31);
        Map<String, Path> s2 = vmSnapshot(vm, "s2");
        write.accept(0x32);
        Map<String, Path> s3 = vmSnapshot(vm, "s3");
        write.accept(0x33);
        int n3 = model.writes.size();
        a = takeRunning(vm, 3, 2, 2);
        assertEquals("incremental", a.kind());
        for (String t : vm.disks.keySet()) {
            assertEquals(List.of(delta(vm, t, 3), s3.get(t), s2.get(t), s1.get(t), vm.disks.get(t)), Sh.chain(vm.activeFile(t)),
                    "the old delta is merged into the first VM snapshot's delta, the two new ones kept");
            assertFalse(Files.exists(delta(vm, t, 2)));
            assertEquals("../b2/" + t + ".qcow2", Sh.backing(storeFile(3, t)));
            assertBackup(model, 3, t, n3);
        }

        // The next incremental (no VM snapshot since) still holds every write.
        write.accept(0x41);
        int n4 = model.writes.size();
        a = takeRunning(vm, 4, 3, 0);
        assertEquals("incremental", a.kind());
        for (String t : vm.disks.keySet()) {
            assertEquals(List.of(delta(vm, t, 4), s3.get(t), s2.get(t), s1.get(t), vm.disks.get(t)), Sh.chain(vm.activeFile(t)));
            assertBackup(model, 4, t, n4);
        }
        model.assertVmReadsEverything();

        // Stopped (QEMU writes all it holds): every file of the chains is clean and reads every write.
        Map<String, Path> active = new LinkedHashMap<>();
        for (String t : vm.disks.keySet()) {
            active.put(t, vm.activeFile(t));
        }
        vm.close();
        for (String t : vm.disks.keySet()) {
            for (Path f : Sh.chain(active.get(t))) {
                Sh.check(f);
            }
            model.assertIs(active.get(t), t, model.writes.size(), dir);
        }
    }

    @Test
    void incrementalOfAStoppedVmAfterOneVmSnapshot() throws Exception {
        TestVm vm = TestVm.running(dir, "vda");
        vms.add(vm);
        GuestWrites model = new GuestWrites(vm, DISK_SIZE);
        model.write("vda", 0x51, 0, MIB);
        takeRunning(vm, 1, null, 0);
        assertBackup(model, 1, "vda", 1);
        model.write("vda", 0x52, 8 * MIB, 256 * 1024);
        Map<String, Path> s1 = vmSnapshot(vm, "s1");
        model.write("vda", 0x53, 9 * MIB, 128 * 1024);
        model.write("vda", 0x54, 40 * MIB, 64 * 1024);
        Path top = vm.activeFile("vda");
        assertEquals(s1.get("vda"), top);
        vm.close(); // destroyed: the transient domain is gone, the VM is its files

        List<Path> chain = Sh.chain(top);
        TakeBackup.Request r = TakeBackup.Request.builder()
                .running(false)
                .volume(volume(vm, "vda", chain, 2, 1, 1))
                .build();
        assertEquals(List.of(delta(vm, "vda", 1).toString()), r.volumes().get(0).vmSnapshotDeltaPaths());
        assertEquals(List.of(top.toString()), r.volumes().get(0).merge().grandChildren());
        TakeBackup.Answer a = take(r);
        assertEquals("incremental", a.kind());
        assertNull(a.volumes().get(0).target());
        assertEquals(delta(vm, "vda", 2).toString(), a.volumes().get(0).newVolumePath());
        List<Path> now = Sh.chain(delta(vm, "vda", 2));
        assertEquals(List.of(delta(vm, "vda", 2), s1.get("vda"), vm.disks.get("vda")), now);
        assertFalse(Files.exists(delta(vm, "vda", 1)));
        for (Path f : now) {
            Sh.check(f);
        }
        assertBackup(model, 2, "vda", model.writes.size());
        assertBackup(model, 1, "vda", 1);
        model.assertIs(delta(vm, "vda", 2), "vda", model.writes.size(), dir);
    }
}
