package io.knib;

/**
 * An internal error knib reported itself (an invariant it checks was broken, or a copy it wrote that does not read
 * back as written: its source is sound and a retry may work), or an answer the Java classes cannot read. A panic is not this but a {@link KnibPanicError}.
 */
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
