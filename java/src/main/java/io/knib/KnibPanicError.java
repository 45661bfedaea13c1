package io.knib;

/**
 * knib panicked: a bug in knib, not an operational failure, so an unchecked {@link Error} rather than a
 * {@link KnibException}. The panic was caught at the native boundary: the JVM and the {@link Knib} context go
 * on (the operation that panicked released the context and did not finish). Report it with its message.
 */
public class KnibPanicError extends Error {
    private static final long serialVersionUID = 1L;

    /** @param message what panicked ("internal: knib panicked (a bug) and recovered: ...") */
    public KnibPanicError(String message) {
        super(message);
    }
}
