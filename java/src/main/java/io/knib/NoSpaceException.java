package io.knib;

/** Not enough free space where the work would write. */
public class NoSpaceException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public NoSpaceException(String message, int vmConsistent) {
        super(ErrorKind.NO_SPACE, message, vmConsistent);
    }
}
