package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

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
        TakeBackup.Request r = new TakeBackup.Request();
        r.domain = TestVm.newName() + "-never-defined";
        r.volumes.add(new TakeBackup.Volume("v1", dir.resolve("v1.qcow2").toString(),
                dir.resolve("d1").toString(), dir.resolve("store/b1/v1.qcow2").toString()));
        try (Knib k = new Knib()) {
            NotFoundException e = assertThrows(NotFoundException.class, () -> k.takeBackup(r));
            assertEquals(ErrorKind.NOT_FOUND, e.kind());
            assertEquals(1, e.code());
            assertEquals(Optional.of(true), e.vmConsistent());
            assertTrue(e.getMessage().contains(r.domain), e.getMessage());
        }
    }

    @Test
    void missingFileArrivesAsNotFoundException() {
        TakeBackupHash.Request r = new TakeBackupHash.Request();
        r.files.add(dir.resolve("no-such-backup.qcow2").toString());
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
            CompressBackup.Request c = new CompressBackup.Request();
            c.files.add("relative/file.qcow2");
            e = assertThrows(InvalidInputException.class, () -> k.compressBackup(c));
            assertTrue(e.getMessage().contains("not an absolute path"), e.getMessage());
            // The context is still usable.
            assertTrue(k.call("version", "{}").contains(Knib.version()));
        }
    }

    @Test
    void forcedPanicArrivesAsInternalExceptionAndTheJvmGoesOn() throws Exception {
        try (Knib k = new Knib()) {
            for (int i = 0; i < 3; i++) {
                InternalException e = assertThrows(InternalException.class, k::testPanic);
                assertEquals(ErrorKind.INTERNAL, e.kind());
                assertTrue(e.getMessage().contains("panicked"), e.getMessage());
            }
            // The same context runs operations afterwards (the panic released it).
            assertTrue(k.call("version", "{}").contains("\"schema\":1"));
            assertThrows(NotFoundException.class, () -> k.call("agent.take_hash", "{\"files\": [\"/no/such/knib/file\"]}"));
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
            RestoreBackup.Request r = new RestoreBackup.Request();
            r.volumes.add(new RestoreBackup.Volume("a", f.toString(), dir.resolve("r.qcow2").toString()));
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
