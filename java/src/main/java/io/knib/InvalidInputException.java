package io.knib;

/** The request is wrong: bad JSON, an unknown or missing field (the message names it), a bad name or option. */
public class InvalidInputException extends KnibException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what was wrong
     * @param vmConsistent 1 when the VM was left consistent, 0 when not, -1 when unknown or not about a VM
     */
    public InvalidInputException(String message, int vmConsistent) {
        super(ErrorKind.INVALID_INPUT, message, vmConsistent);
    }
}
