package io.knib;

/**
 * The operation's time budget ran out; what it started was stopped. (Named so as not to be mistaken for
 * {@code java.util.concurrent.TimeoutException}.)
 */
public class KnibTimeoutException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public KnibTimeoutException(String message, int vmConsistent) {
        super(ErrorKind.TIMEOUT, message, vmConsistent);
    }
}
