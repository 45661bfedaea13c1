package io.knib;

/** A backup, volume, file or domain that was named does not exist. */
public class NotFoundException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public NotFoundException(String message, int vmConsistent) {
        super(ErrorKind.NOT_FOUND, message, vmConsistent);
    }
}
