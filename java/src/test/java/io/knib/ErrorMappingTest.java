package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTimeoutPreemptively;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.lang.ref.WeakReference;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Failures cross the boundary as the right exception, and the JVM and the context go on. */
class ErrorMappingTest {
    @TempDir
    Path dir;

    @Test
    void unknownDomainArrivesAsNotFoundExceptionSayingTheVmIsConsistent() {
        TakeBackup.Request r = TakeBackup.Request.builder()
                .domain(TestVm.newName() + "-never-defined")
                .volume(new TakeBackup.Volume("v1", dir.resolve("v1.qcow2").toString(),
                        dir.resolve("d1").toString(), dir.resolve("store/b1/v1.qcow2").toString()))
                .build();
        try (Knib k = new Knib()) {
            NotFoundException e = assertThrows(NotFoundException.class, () -> k.takeBackup(r));
            assertEquals(ErrorKind.NOT_FOUND, e.kind());
            assertEquals(1, e.code());
            assertEquals(Optional.of(true), e.vmConsistent());
            assertTrue(e.getMessage().contains(r.domain()), e.getMessage());
        }
    }

    @Test
    void missingFileArrivesAsNotFoundException() {
        TakeBackupHash.Request r = new TakeBackupHash.Request(List.of(dir.resolve("no-such-backup.qcow2").toString()));
        try (Knib k = new Knib()) {
            NotFoundException e = assertThrows(NotFoundException.class, () -> k.takeBackupHash(r));
            assertTrue(e.getMessage().contains("no-such-backup.qcow2"), e.getMessage());
            assertEquals(Optional.empty(), e.vmConsistent());
            assertTrue(e.isVmConsistent());
        }
    }

    @Test
    void badRequestsArriveAsInvalidInputExceptionNamingTheField() throws Exception {
        try (Knib k = new Knib()) {
            InvalidInputException e = assertThrows(InvalidInputException.class,
                    () -> k.call("agent.take_hash", "{\"file\": [\"/x\"]}"));
            assertTrue(e.getMessage().contains("unknown field `file`"), e.getMessage());
            assertEquals(3, e.code());
            e = assertThrows(InvalidInputException.class, () -> k.call("agent.restore", "{not json"));
            assertTrue(e.getMessage().contains("is not valid JSON"), e.getMessage());
            e = assertThrows(InvalidInputException.class, () -> k.call("agent.no_such_op", "{}"));
            assertTrue(e.getMessage().contains("unknown operation"), e.getMessage());
            CompressBackup.Request c = CompressBackup.Request.builder().file("relative/file.qcow2").build();
            e = assertThrows(InvalidInputException.class, () -> k.compressBackup(c));
            assertTrue(e.getMessage().contains("not an absolute path"), e.getMessage());
            // The context is still usable.
            assertTrue(k.call("version", "{}").contains(Knib.version()));
        }
    }

    @Test
    void aMinFreeFactorThatIsNotFiniteIsInvalidInputNamingIt() throws Exception {
        // Gson refused NaN and infinities with an unchecked IllegalArgumentException naming no field.
        Path f = dir.resolve("c.qcow2");
        Sh.qcow2(f, TestVm.MIB);
        try (Knib k = new Knib()) {
            for (double v : new double[] {Double.NaN, Double.POSITIVE_INFINITY, Double.NEGATIVE_INFINITY}) {
                CompressBackup.Request c = CompressBackup.Request.builder().file(f.toString()).minFreeFactor(v).build();
                InvalidInputException e = assertThrows(InvalidInputException.class, () -> k.compressBackup(c));
                assertTrue(e.getMessage().contains("minFreeFactor") && e.getMessage().contains("min_free_factor"),
                        e.getMessage());
                assertTrue(e.getMessage().contains(Double.toString(v)), e.getMessage());
                assertEquals(ErrorKind.INVALID_INPUT, e.kind());
            }
            assertFalse(Files.exists(Path.of(f + ".comp")));
        }
    }

    @Test
    void aLoneSurrogateIsInvalidInputNamingTheArgument() throws Exception {
        // The jni crate decoded a string it could not read as text lossily: the lone surrogate became U+FFFD,
        // and knib looked for another file than the one named.
        try (Knib k = new Knib()) {
            InvalidInputException e = assertThrows(InvalidInputException.class,
                    () -> k.call("agent.take_hash", "{\"files\":[\"/tmp/a\uD800\"]}"));
            assertTrue(e.getMessage().contains("`request`") && e.getMessage().contains("U+D800"), e.getMessage());
            e = assertThrows(InvalidInputException.class, () -> k.call("version\uDC00", "{}"));
            assertTrue(e.getMessage().contains("`op`") && e.getMessage().contains("U+DC00"), e.getMessage());
            e = assertThrows(InvalidInputException.class, () -> k.call("version", "{\"x\": \"\uDE00\uD83D\"}"));
            assertTrue(e.getMessage().contains("`request`"), e.getMessage());
            // Text that is all there (a pair, U+FFFD itself) goes through unchanged.
            String path = "/no/such/knib/\u00e9\uD83D\uDE00\uFFFD";
            NotFoundException n = assertThrows(NotFoundException.class,
                    () -> k.call("agent.take_hash", "{\"files\":[\"" + path + "\"]}"));
            assertTrue(n.getMessage().contains(path), n.getMessage());
            assertTrue(k.call("version", "{}").contains(Knib.version()));
        }
    }

    @Test
    void forcedPanicArrivesAsAnUncheckedErrorAndTheJvmGoesOn() throws Exception {
        try (Knib k = new Knib()) {
            for (int i = 0; i < 3; i++) {
                // A bug is not an operational failure: an Error, which no `catch (KnibException e)` swallows.
                KnibPanicError e = assertThrows(KnibPanicError.class, k::testPanic);
                assertTrue(e instanceof Error);
                assertFalse(Exception.class.isAssignableFrom(KnibPanicError.class));
                assertTrue(e.getMessage().contains("panicked"), e.getMessage());
                assertTrue(e.getMessage().contains("NativeLib.testPanic was called"), e.getMessage());
            }
            // The same context runs operations afterwards (the panic released it).
            assertTrue(k.call("version", "{}").contains("\"schema\":1"));
            assertThrows(NotFoundException.class, () -> k.call("agent.take_hash", "{\"files\": [\"/no/such/knib/file\"]}"));
        }
    }

    @Test
    void aSpentBudgetArrivesAsKnibTimeoutException() throws Exception {
        // No class of knib is named like java.util.concurrent.TimeoutException.
        assertThrows(ClassNotFoundException.class, () -> Class.forName("io.knib.TimeoutException"));
        assertNotEquals(java.util.concurrent.TimeoutException.class.getSimpleName(), KnibTimeoutException.class.getSimpleName());
        Path f = dir.resolve("t.qcow2");
        Sh.qcow2(f, 64 * TestVm.MIB);
        Sh.write(f, 0x74, 0, 32 * TestVm.MIB);
        try (Knib k = new Knib()) {
            // The first progress report outlasts the one-second budget.
            boolean[] slept = {false};
            k.setTimeout(Duration.ofSeconds(1)).setProgressListener((step, pct) -> {
                if (!slept[0]) {
                    slept[0] = true;
                    try {
                        Thread.sleep(2500);
                    } catch (InterruptedException e) {
                        Thread.currentThread().interrupt();
                    }
                }
            });
            RestoreBackup.Request r = RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("t", f.toString(), dir.resolve("t-restored.qcow2").toString()))
                    .build();
            KnibTimeoutException e = assertThrows(KnibTimeoutException.class, () -> k.restoreBackup(r));
            assertEquals(ErrorKind.TIMEOUT, e.kind());
            assertEquals(5, e.code());
            assertFalse(Files.exists(dir.resolve("t-restored.qcow2")), "nothing half-written is left");
        }
    }

    @Test
    void aHugeTimeoutIsNoLimit() throws Exception {
        long[] budgets = {Long.MAX_VALUE, Long.MAX_VALUE - 1, Long.MAX_VALUE / 2, 1L << 40, Integer.MAX_VALUE};
        try (Knib k = new Knib()) {
            for (long secs : budgets) {
                k.setTimeout(Duration.ofSeconds(secs));
                assertTrue(k.call("version", "{}").contains(Knib.version()), "budget " + secs);
                NotFoundException e = assertThrows(NotFoundException.class,
                        () -> k.call("agent.take_hash", "{\"files\": [\"/no/such/knib/file\"]}"));
                assertTrue(e.getMessage().contains("/no/such/knib/file"), e.getMessage());
            }
            k.setTimeout(Duration.ofSeconds(Long.MAX_VALUE, 999_999_999));
            assertTrue(k.call("version", "{}").contains(Knib.version()));
        }
    }

    @Test
    void handlesAreReleasedExactlyOnceAndUseAfterCloseIsAnException() throws Exception {
        Knib k = new Knib();
        k.setTimeout(Duration.ofSeconds(30)).setProgressListener((step, pct) -> { });
        assertFalse(k.isClosed());
        k.close();
        k.close();
        assertTrue(k.isClosed());
        assertThrows(IllegalStateException.class, () -> k.call("version", "{}"));
        assertThrows(IllegalStateException.class, () -> k.setTimeout(Duration.ofSeconds(1)));
        k.cancel();
        // A stale handle given to the library itself is refused, not used.
        assertThrows(IllegalStateException.class, () -> NativeLib.call(0x1234, "version", "{}"));
        try (Knib other = new Knib()) {
            assertThrows(NullPointerException.class, () -> NativeLib.call(other.handleForTests(), null, "{}"));
        }
    }

    /** An unclosed context whose listener uses it, made in its own frame so that nothing else refers to it. */
    private static WeakReference<Knib> unclosedContextWithASelfReferringListener(List<Boolean> seen) {
        Knib k = new Knib();
        k.setProgressListener((step, pct) -> seen.add(k.isClosed()));
        return new WeakReference<>(k);
    }

    @Test
    void aListenerReferringToAnUnclosedContextDoesNotKeepItAlive() throws Exception {
        // The native context held its listener by a global reference, a root to the collector: a listener
        // using its Knib kept an unclosed Knib reachable for ever, and its native context was never released.
        WeakReference<Knib> ref = unclosedContextWithASelfReferringListener(new ArrayList<>());
        for (int i = 0; i < 200 && ref.get() != null; i++) {
            System.gc();
            Thread.sleep(20);
        }
        assertNull(ref.get(), "an unclosed Knib whose listener refers to it was never collected");

        // A live context keeps its listener, however much is collected: a lambda held by nothing else is
        // still called after collections.
        Path f = dir.resolve("gc.qcow2");
        Sh.qcow2(f, 4 * TestVm.MIB);
        Sh.write(f, 0x61, 0, TestVm.MIB);
        List<String> steps = new ArrayList<>();
        try (Knib k = new Knib()) {
            k.setProgressListener((step, pct) -> {
                synchronized (steps) {
                    steps.add(step);
                }
            });
            for (int i = 0; i < 5; i++) {
                System.gc();
                Thread.sleep(20);
            }
            k.restoreBackup(RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("a", f.toString(), dir.resolve("gc-r.qcow2").toString()))
                    .build());
        }
        synchronized (steps) {
            assertFalse(steps.isEmpty(), "the listener of a live context was not called after collections");
        }
    }

    @Test
    void aLogHandlerMaySetTheLogLevel() throws Exception {
        // A record was forwarded holding a read lock, and setLogLevel took the write lock: a handler calling
        // setLogLevel from inside a forwarded record waited for itself.
        List<Throwable> failures = new ArrayList<>();
        List<String> seen = new ArrayList<>();
        Handler h = new Handler() {
            @Override
            public void publish(LogRecord r) {
                try {
                    Knib.setLogLevel(Level.INFO);
                    synchronized (seen) {
                        seen.add(r.getMessage());
                    }
                } catch (Throwable t) {
                    synchronized (failures) {
                        failures.add(t);
                    }
                }
            }

            @Override
            public void flush() {}

            @Override
            public void close() {}
        };
        KnibLog.LOGGER.addHandler(h);
        try {
            assertTimeoutPreemptively(Duration.ofSeconds(60), () -> {
                try (Knib k = new Knib()) {
                    Knib.setLogLevel(Level.INFO);
                    k.call("version", "{}");
                    k.call("version", "{}");
                }
            }, "a log handler calling Knib.setLogLevel deadlocked the call that logged");
        } finally {
            KnibLog.LOGGER.removeHandler(h);
        }
        synchronized (failures) {
            assertTrue(failures.isEmpty(), "setLogLevel inside a handler failed: " + failures);
        }
        synchronized (seen) {
            assertTrue(seen.stream().anyMatch(m -> m.contains("version: done in")), "records: " + seen);
        }
    }

    @Test
    void aNullLogLevelChangesNothing() {
        // Before, the logger's level was set to null, then the native level's conversion threw.
        Knib.setLogLevel(Level.FINE);
        assertThrows(NullPointerException.class, () -> Knib.setLogLevel(null));
        assertEquals(Level.FINE, KnibLog.LOGGER.getLevel());
        Knib.setLogLevel(Level.INFO);
    }

    @Test
    void busyWhenTheSameContextIsUsedTwiceAtOnce() throws Exception {
        try (Knib k = new Knib()) {
            List<Throwable> seen = new ArrayList<>();
            k.setProgressListener((step, pct) -> { });
            // A progress listener runs inside an operation: calling the same context from it is refused.
            Path f = dir.resolve("a.qcow2");
            Sh.qcow2(f, 4 * TestVm.MIB);
            Sh.write(f, 0x61, 0, TestVm.MIB);
            k.setProgressListener((step, pct) -> {
                try {
                    k.call("version", "{}");
                } catch (KnibException e) {
                    synchronized (seen) {
                        seen.add(e);
                    }
                }
            });
            RestoreBackup.Request r = RestoreBackup.Request.builder()
                    .volume(new RestoreBackup.Volume("a", f.toString(), dir.resolve("r.qcow2").toString()))
                    .build();
            k.restoreBackup(r);
            assertFalse(seen.isEmpty(), "the listener was called");
            assertTrue(seen.get(0) instanceof BusyException, seen.get(0).toString());
        }
    }

    @Test
    void nativeLogsReachJavaLogging() throws Exception {
        List<LogRecord> records = new ArrayList<>();
        Handler h = new Handler() {
            @Override
            public void publish(LogRecord r) {
                synchronized (records) {
                    records.add(r);
                }
            }

            @Override
            public void flush() {}

            @Override
            public void close() {}
        };
        KnibLog.LOGGER.addHandler(h);
        try (Knib k = new Knib()) {
            Knib.setLogLevel(Level.INFO);
            k.call("version", "{}");
            assertThrows(NotFoundException.class, () -> k.call("agent.take_hash", "{\"files\": [\"/no/such/knib/file\"]}"));
        } finally {
            KnibLog.LOGGER.removeHandler(h);
        }
        synchronized (records) {
            assertTrue(records.stream().anyMatch(r -> r.getLevel() == Level.INFO && r.getMessage().contains("version: done in")),
                    "records: " + records.stream().map(LogRecord::getMessage).toList());
            assertTrue(records.stream().anyMatch(r -> r.getMessage().contains("agent.take_hash: failed after")));
        }
    }
}
