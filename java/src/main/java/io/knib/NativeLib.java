package io.knib;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;

/**
 * The native methods of {@code libknib_jni.so}, and how the library is found, in this order:
 * <ol>
 *   <li>the file named by the system property {@value #PATH_PROPERTY}, when it is set;</li>
 *   <li>{@code System.loadLibrary("knib_jni")}, from {@code java.library.path};</li>
 *   <li>{@value #RESOURCE} inside the jar, copied to a temporary file that is removed once loaded.</li>
 * </ol>
 */
final class NativeLib {
    /** The system property naming the library file. */
    static final String PATH_PROPERTY = "knib.library.path";
    /** The library inside the jar. */
    static final String RESOURCE = "/native/linux-x86_64/libknib_jni.so";

    private static String origin;

    private NativeLib() {}

    /** Load the library once; later calls do nothing. */
    static synchronized void load() {
        if (origin != null) {
            return;
        }
        String explicit = System.getProperty(PATH_PROPERTY);
        if (explicit != null && !explicit.isEmpty()) {
            Path p = Path.of(explicit).toAbsolutePath();
            try {
                System.load(p.toString());
            } catch (UnsatisfiedLinkError e) {
                throw link("cannot load " + p + " (named by -D" + PATH_PROPERTY + "): " + e.getMessage(), e);
            }
            origin = "property";
        } else {
            List<String> tried = new ArrayList<>();
            try {
                System.loadLibrary("knib_jni");
                origin = "library path";
            } catch (UnsatisfiedLinkError e) {
                tried.add("System.loadLibrary(\"knib_jni\"): " + e.getMessage());
                loadFromJar(tried);
                origin = "jar";
            }
        }
        setLogLevel(KnibLog.nativeLevel(KnibLog.effectiveLevel()));
    }

    /** @return where the library came from: "property", "library path" or "jar"; null before loading */
    static synchronized String origin() {
        return origin;
    }

    private static void loadFromJar(List<String> tried) {
        String os = System.getProperty("os.name", "");
        String arch = System.getProperty("os.arch", "");
        if (!os.toLowerCase().contains("linux") || !(arch.equals("amd64") || arch.equals("x86_64"))) {
            tried.add("the jar holds a library for linux-x86_64 only, this is " + os + "/" + arch);
            throw link("knib's native library was not found: " + String.join("; ", tried), null);
        }
        try (InputStream in = NativeLib.class.getResourceAsStream(RESOURCE)) {
            if (in == null) {
                tried.add("no " + RESOURCE + " in the class path");
                throw link("knib's native library was not found: " + String.join("; ", tried)
                        + "; set -D" + PATH_PROPERTY + "=/path/to/libknib_jni.so", null);
            }
            Path tmp = Files.createTempFile("libknib_jni-", ".so");
            try {
                Files.copy(in, tmp, StandardCopyOption.REPLACE_EXISTING);
                System.load(tmp.toString());
            } finally {
                // Once loaded, the mapping stays: the file is not needed.
                Files.deleteIfExists(tmp);
            }
        } catch (IOException e) {
            throw link("cannot copy " + RESOURCE + " out of the jar: " + e.getMessage(), e);
        }
    }

    private static UnsatisfiedLinkError link(String message, Throwable cause) {
        UnsatisfiedLinkError e = new UnsatisfiedLinkError(message);
        if (cause != null) {
            e.initCause(cause);
        }
        return e;
    }

    static native String version();

    static native long contextNew();

    static native void contextClose(long handle);

    static native String call(long handle, String op, String request) throws KnibException;

    static native void cancel(long handle);

    static native void setTimeout(long handle, long seconds);

    static native void setProgressListener(long handle, ProgressListener listener);

    static native boolean setLogLevel(int level);

    static native void testPanic(long handle) throws KnibException;
}
