package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicBoolean;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Cancellation and time budgets of a context, between and around its operations. */
class CancelAndTimeoutTest {
    @TempDir
    Path dir;

    /** A one-disk backup of VM "web" in {@code store}; its id. */
    private String backUp(Knib k, Path store) throws KnibException {
        Path disk = dir.resolve("disk.qcow2");
        Sh.qcow2(disk, 4 * TestVm.MIB);
        Sh.write(disk, 0x61, 0, TestVm.MIB);
        String a = k.call("backup", "{\"store\": \"" + store + "\", \"vm\": \"web\", "
                + "\"disks\": [{\"name\": \"root\", \"path\": \"" + disk + "\"}]}");
        return JsonParser.parseString(a).getAsJsonObject().get("id").getAsString();
    }

    private static int backups(Knib k, Path store) throws KnibException {
        return JsonParser.parseString(k.call("list", "{\"store\": \"" + store + "\"}")).getAsJsonArray().size();
    }

    @Test
    void aCancelBetweenOperationsCancelsTheNextOneWhateverItIs() throws Exception {
        // Only the operations that take a control looked at the cancel token: delete (and version, list,
        // show, ...) went ahead and the cancel was used up unseen.
        Path store = dir.resolve("store");
        try (Knib k = new Knib()) {
            String id = backUp(k, store);
            String ref = "{\"store\": \"" + store + "\", \"backup\": \"" + id + "\"}";
            k.cancel();
            CancelledException e = assertThrows(CancelledException.class, () -> k.call("delete", ref));
            assertEquals(ErrorKind.CANCELLED, e.kind());
            assertTrue(e.getMessage().contains("delete: cancelled before it started"), e.getMessage());
            assertEquals(1, backups(k, store), "the backup is still there");
            assertTrue(k.call("show", ref).contains(id));
            k.cancel();
            assertThrows(CancelledException.class, () -> k.call("version", "{}"));
            // The cancel was used up: the next call runs.
            assertTrue(k.call("delete", ref).contains(id));
            assertEquals(0, backups(k, store));
        }
    }

    @Test
    void cancelRacingCloseDoesNothing() throws Exception {
        // cancel() read a live handle, close() released it, and the native side threw IllegalStateException
        // for the dead handle: cancel is documented to do nothing on a closed context.
        ExecutorService pool = Executors.newSingleThreadExecutor();
        try {
            for (int i = 0; i < 2000; i++) {
                Knib k = new Knib();
                CountDownLatch spinning = new CountDownLatch(1);
                AtomicBoolean closed = new AtomicBoolean();
                Future<?> canceller = pool.submit(() -> {
                    spinning.countDown();
                    while (!closed.get()) {
                        k.cancel();
                    }
                    k.cancel();
                    return null;
                });
                spinning.await();
                k.close();
                closed.set(true);
                try {
                    canceller.get();
                } catch (ExecutionException e) {
                    throw new AssertionError("round " + i + ": cancel() racing close() threw " + e.getCause(), e.getCause());
                }
            }
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    void aBudgetIsRoundedUpToWholeSecondsNeverDownToNone() {
        // Duration.toSeconds() truncated: a budget under a second became 0, which is no limit at all.
        assertEquals(1, Knib.timeoutSeconds(Duration.ofMillis(500)));
        assertEquals(1, Knib.timeoutSeconds(Duration.ofNanos(1)));
        assertEquals(1, Knib.timeoutSeconds(Duration.ofSeconds(1)));
        assertEquals(2, Knib.timeoutSeconds(Duration.ofMillis(1001)));
        assertEquals(30, Knib.timeoutSeconds(Duration.ofSeconds(30)));
        assertEquals(0, Knib.timeoutSeconds(null));
        assertEquals(0, Knib.timeoutSeconds(Duration.ZERO));
        assertEquals(0, Knib.timeoutSeconds(Duration.ofMillis(-500)));
        assertEquals(0, Knib.timeoutSeconds(Duration.ofSeconds(-3)));
        assertEquals(Long.MAX_VALUE, Knib.timeoutSeconds(Duration.ofSeconds(Long.MAX_VALUE)));
        assertEquals(Long.MAX_VALUE, Knib.timeoutSeconds(Duration.ofSeconds(Long.MAX_VALUE, 999_999_999)));
    }

    @Test
    void aHalfSecondBudgetRunsOut() throws Exception {
        Path f = dir.resolve("t.qcow2");
        Sh.qcow2(f, 64 * TestVm.MIB);
        Sh.write(f, 0x74, 0, 32 * TestVm.MIB);
        try (Knib k = new Knib()) {
            // The first progress report outlasts the budget.
            boolean[] slept = {false};
            k.setTimeout(Duration.ofMillis(500)).setProgressListener((step, pct) -> {
                if (!slept[0]) {
                    slept[0] = true;
                    try {
                        Thread.sleep(2500);
                    } catch (InterruptedException e) {
                        Thread.currentThread().interrupt();
                    }
                }
            });
            Path out = dir.resolve("t-restored.qcow2");
            RestoreBackup.Request r = RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("t", f.toString(), out.toString()))
                    .build();
            KnibTimeoutException e = assertThrows(KnibTimeoutException.class, () -> k.restoreBackup(r));
            assertTrue(e.getMessage().contains("time budget (1s)"), e.getMessage());
            assertFalse(Files.exists(out), "nothing half-written is left");
        }
    }
}
