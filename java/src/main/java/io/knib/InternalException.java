package io.knib;

/** A bug in knib: an invariant broken, or a panic caught at the boundary (the JVM and the context go on). */
public class InternalException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public InternalException(String message, int vmConsistent) {
        super(ErrorKind.INTERNAL, message, vmConsistent);
    }
}
