package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Stream;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Many Java threads in the library at once, and a call cancelled from another thread. */
class ConcurrencyTest {
    static final long MIB = TestVm.MIB;

    @TempDir
    Path dir;

    private final List<TestVm> vms = new ArrayList<>();

    @AfterEach
    void removeDomains() {
        vms.forEach(TestVm::close);
    }

    @Test
    void eightThreadsBackUpAndRestoreEightVmsAtOnce() throws Exception {
        int n = 8;
        for (int i = 0; i < n; i++) {
            TestVm vm = TestVm.stopped(dir, "vda");
            vms.add(vm);
            Sh.write(vm.disks.get("vda"), 0x40 + i, i * MIB, MIB);
        }
        ExecutorService pool = Executors.newFixedThreadPool(n);
        CountDownLatch go = new CountDownLatch(1);
        AtomicInteger progress = new AtomicInteger();
        List<Future<Path>> results = new ArrayList<>();
        try {
            for (int i = 0; i < n; i++) {
                TestVm vm = vms.get(i);
                int id = i;
                results.add(pool.submit(() -> {
                    go.await();
                    Path disk = vm.disks.get("vda");
                    Path dest = dir.resolve("store/vm" + id + "/b1/vda.qcow2");
                    try (Knib k = new Knib()) {
                        k.setProgressListener((step, pct) -> progress.incrementAndGet());
                        TakeBackup.Request r = TakeBackup.Request.builder()
                                .domain(vm.name)
                                .running(false)
                                .volume(new TakeBackup.Volume("v" + id, disk.toString(),
                                        dir.resolve(vm.name + "-delta-1").toString(), dest.toString()))
                                .build();
                        TakeBackup.Answer a = k.takeBackup(r);
                        assertEquals(dir.resolve(vm.name + "-delta-1").toString(), a.volumes().get(0).newVolumePath());
                        Path to = dir.resolve("restored-" + id + ".qcow2");
                        RestoreBackup.Request rr = RestoreBackup.Request.builder()
                                .volume(new RestoreBackup.Volume("v" + id, dest.toString(), to.toString()))
                                .build();
                        k.restoreBackup(rr);
                        return to;
                    }
                }));
            }
            go.countDown();
            for (int i = 0; i < n; i++) {
                Path restored;
                try {
                    restored = results.get(i).get();
                } catch (ExecutionException e) {
                    throw new AssertionError("thread " + i + " failed: " + e.getCause(), e.getCause());
                }
                assertTrue(Sh.has(restored, 0x40 + i, i * MIB, MIB), "VM " + i + "'s restore holds its own write");
                assertTrue(Sh.identical(restored, vms.get(i).activeFile("vda")));
            }
        } finally {
            pool.shutdownNow();
        }
        assertTrue(progress.get() > 0, "progress was reported");
    }

    @Test
    void aCallCancelledFromAnotherThreadEndsWithCancelledExceptionAndLeavesNothing() throws Exception {
        Path backup = dir.resolve("big.qcow2");
        Sh.qcow2(backup, 512 * MIB);
        Sh.write(backup, 0x5a, 0, 256 * MIB);
        Path dest = dir.resolve("dest");
        Files.createDirectories(dest);
        CountDownLatch started = new CountDownLatch(1);
        CountDownLatch cancelled = new CountDownLatch(1);
        ExecutorService pool = Executors.newSingleThreadExecutor();
        try (Knib k = new Knib()) {
            // The first progress report holds the copy until the cancellation was asked for.
            k.setProgressListener((step, pct) -> {
                if (started.getCount() > 0) {
                    started.countDown();
                    try {
                        cancelled.await();
                    } catch (InterruptedException e) {
                        Thread.currentThread().interrupt();
                    }
                }
            });
            RestoreBackup.Request r = RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("big", backup.toString(), dest.resolve("vol.qcow2").toString()))
                    .build();
            Future<RestoreBackup.Answer> f = pool.submit(() -> k.restoreBackup(r));
            started.await();
            k.cancel();
            cancelled.countDown();
            ExecutionException e = org.junit.jupiter.api.Assertions.assertThrows(ExecutionException.class, f::get);
            assertTrue(e.getCause() instanceof CancelledException, "got " + e.getCause());
            assertEquals(ErrorKind.CANCELLED, ((KnibException) e.getCause()).kind());
            try (Stream<Path> left = Files.list(dest)) {
                assertEquals(List.of(), left.toList(), "nothing half-written is left");
            }
            // The context is usable again.
            assertTrue(k.call("version", "{}").contains("version"));
        } finally {
            pool.shutdownNow();
        }
    }
}
