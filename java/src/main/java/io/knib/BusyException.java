package io.knib;

/** Another operation holds the VM, or this {@link Knib} context, right now; try later. */
public class BusyException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public BusyException(String message, int vmConsistent) {
        super(ErrorKind.BUSY, message, vmConsistent);
    }
}
