package io.knib;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.logging.Handler;
import java.util.logging.LogRecord;
import java.util.logging.Logger;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * A library writes nothing to stdout or stderr by itself: with java.util.logging as the JDK sets it up (its root
 * ConsoleHandler writes to System.err), knib's records go nowhere; a handler the host configured gets them.
 * Each case runs in a JVM of its own, so that the logging set up is the JDK's and nothing else's.
 */
class QuietLoggingTest {
    @TempDir
    Path dir;

    /** The child JVM: a call that logs at INFO, one that fails (logged at INFO), and its answers printed nowhere. */
    public static void main(String[] args) throws Exception {
        List<String> seen = new ArrayList<>();
        if (args.length > 0 && args[0].equals("handler")) {
            Logger.getLogger("io.knib.native").addHandler(new Handler() {
                @Override
                public void publish(LogRecord r) {
                    seen.add(r.getLevel() + " " + r.getMessage());
                }

                @Override
                public void flush() {}

                @Override
                public void close() {}
            });
        }
        try (Knib k = new Knib()) {
            k.call("version", "{}");
            try {
                k.call("agent.take_hash", "{\"files\": [\"/no/such/knib/file\"]}");
                System.exit(3);
            } catch (NotFoundException expected) {
                // logged as "agent.take_hash: failed after ..."
            }
        }
        if (args.length > 0 && args[0].equals("handler")) {
            boolean ok = seen.stream().anyMatch(m -> m.startsWith("INFO ") && m.contains("version: done in"))
                    && seen.stream().anyMatch(m -> m.contains("agent.take_hash: failed after"));
            System.exit(ok ? 0 : 4);
        }
    }

    private static Sh.Result child(String... args) {
        List<String> cmd = new ArrayList<>();
        cmd.add(Path.of(System.getProperty("java.home"), "bin", "java").toString());
        cmd.add("-cp");
        cmd.add(System.getProperty("java.class.path"));
        cmd.addAll(List.of(args));
        return Sh.exec(cmd);
    }

    /** Its stderr, but for the JVM's notes on options taken from the environment. */
    private static String stderr(Sh.Result r) {
        return r.stderr().lines().filter(l -> !l.startsWith("Picked up ")).collect(Collectors.joining("\n"));
    }

    @Test
    void withTheJdksLoggingNothingReachesStdoutOrStderr() {
        // The native level came from JUL's effective level (INFO) and the records went to the root logger's
        // ConsoleHandler: every call wrote "knib: version: done in ..." to the host's System.err.
        Sh.Result r = child(QuietLoggingTest.class.getName());
        assertEquals(0, r.code(), r.stderr() + r.stdout());
        assertEquals("", r.stdout());
        assertEquals("", stderr(r));
    }

    @Test
    void aHandlerOnTheKnibLoggerGetsTheRecords() {
        Sh.Result r = child(QuietLoggingTest.class.getName(), "handler");
        assertEquals(0, r.code(), "the handler did not get the records: " + r.stderr() + r.stdout());
        assertEquals("", r.stdout());
        assertEquals("", stderr(r));
    }

    @Test
    void aConsoleTheHostConfiguredGetsTheRecords() throws Exception {
        Path config = dir.resolve("logging.properties");
        Files.writeString(config, "handlers = java.util.logging.ConsoleHandler\n"
                + "java.util.logging.ConsoleHandler.level = ALL\n.level = INFO\n");
        Sh.Result r = child("-Djava.util.logging.config.file=" + config, QuietLoggingTest.class.getName());
        assertEquals(0, r.code(), r.stderr() + r.stdout());
        assertTrue(r.stderr().contains("knib: version: done in"), r.stderr());
        assertEquals("", r.stdout());
    }
}
