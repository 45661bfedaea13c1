package io.knib;

/**
 * Receives the progress of the operations of a {@link Knib} context. Called on whatever thread reports
 * (often not the caller's), never after the operation returned; keep it short. An exception it throws is
 * logged and ignored.
 */
@FunctionalInterface
public interface ProgressListener {
    /**
     * @param step what is being done now ("convert /path", "block pull of disk vda")
     * @param percent how much of that step is done, 0 to 100
     */
    void onProgress(String step, double percent);
}
