package io.knib;

/** Reading or writing a file failed. */
public class KnibIoException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public KnibIoException(String message, int vmConsistent) {
        super(ErrorKind.IO, message, vmConsistent);
    }
}
