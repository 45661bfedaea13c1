package io.knib;

/** The operation was cancelled with {@link Knib#cancel()}; what it had written was removed. */
public class CancelledException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public CancelledException(String message, int vmConsistent) {
        super(ErrorKind.CANCELLED, message, vmConsistent);
    }
}
