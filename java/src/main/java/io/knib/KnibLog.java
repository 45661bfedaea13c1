package io.knib;

import java.util.logging.ConsoleHandler;
import java.util.logging.Filter;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogManager;
import java.util.logging.LogRecord;
import java.util.logging.Logger;

/**
 * knib's log records, forwarded from the native library to {@code java.util.logging} (logger {@code
 * io.knib.native}). A library writes nothing to stdout or stderr by itself: while java.util.logging runs as the
 * JDK sets it up ({@link #jdkDefaults()}), a record goes to every handler of {@code io.knib.native} and of its
 * parents as JUL would send it, but for the {@link ConsoleHandler} the JDK puts on the root logger, which writes
 * to {@code System.err}. Once the host configured logging (a configuration file or class, or a LogManager of
 * its own, as a bridge to another logging library installs), records go through {@link Logger#log(LogRecord)}
 * as any other.
 */
final class KnibLog {
    /** The logger native records go to. */
    static final Logger LOGGER = Logger.getLogger("io.knib.native");

    private KnibLog() {}

    /** Called by the native library, on the thread that logged. */
    static void log(int level, String message) {
        Level l = level(level);
        if (!LOGGER.isLoggable(l)) {
            return;
        }
        LogRecord r = new LogRecord(l, message);
        r.setLoggerName(LOGGER.getName());
        if (!jdkDefaults()) {
            LOGGER.log(r);
            return;
        }
        Filter f = LOGGER.getFilter();
        if (f != null && !f.isLoggable(r)) {
            return;
        }
        for (Logger x = LOGGER; x != null; x = x.getParent()) {
            boolean root = x.getParent() == null;
            for (Handler h : x.getHandlers()) {
                if (!(root && h.getClass() == ConsoleHandler.class)) {
                    h.publish(r);
                }
            }
            if (!x.getUseParentHandlers()) {
                break;
            }
        }
    }

    /**
     * Whether java.util.logging runs as the JDK sets it up by itself: its own {@link LogManager}, read from no
     * configuration file or class the host named ({@code java.util.logging.config.file}, {@code
     * java.util.logging.config.class}). Its root logger's {@link ConsoleHandler} is then the JDK's, not a choice
     * of the host's.
     */
    static boolean jdkDefaults() {
        return LogManager.getLogManager().getClass() == LogManager.class
                && System.getProperty("java.util.logging.config.file") == null
                && System.getProperty("java.util.logging.config.class") == null;
    }

    static Level level(int level) {
        switch (level) {
            case 1: return Level.SEVERE;
            case 2: return Level.WARNING;
            case 3: return Level.INFO;
            case 4: return Level.FINE;
            default: return Level.FINEST;
        }
    }

    /** The native level (0 off, 1 error ... 5 trace) that forwards what {@code level} lets through. */
    static int nativeLevel(Level level) {
        int v = level.intValue();
        if (v == Level.OFF.intValue()) {
            return 0;
        } else if (v >= Level.SEVERE.intValue()) {
            return 1;
        } else if (v >= Level.WARNING.intValue()) {
            return 2;
        } else if (v >= Level.INFO.intValue()) {
            return 3;
        } else if (v >= Level.FINE.intValue()) {
            return 4;
        }
        return 5;
    }

    /** The effective level of {@link #LOGGER}: its own, or its nearest parent's. */
    static Level effectiveLevel() {
        for (Logger l = LOGGER; l != null; l = l.getParent()) {
            if (l.getLevel() != null) {
                return l.getLevel();
            }
        }
        return Level.INFO;
    }
}
