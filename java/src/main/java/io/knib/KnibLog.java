package io.knib;

import java.util.logging.Level;
import java.util.logging.Logger;

/** knib's log records, forwarded from the native library to {@code java.util.logging} (logger {@code io.knib.native}). */
final class KnibLog {
    /** The logger native records go to. */
    static final Logger LOGGER = Logger.getLogger("io.knib.native");

    private KnibLog() {}

    /** Called by the native library, on the thread that logged. */
    static void log(int level, String message) {
        LOGGER.log(level(level), message);
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
