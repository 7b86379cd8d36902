package oip;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.lang.instrument.Instrumentation;

/**
 * Defines TorchServe 0.12.0's {@code WorkerLifeCycle$ReaderThread} (the reader of a worker's stdout and stderr)
 * from {@code org.pytorch.serve.wlm.WorkerOutput} (what and why: there), stored renamed in the jar as
 * {@code oip-classes/org/pytorch/serve/wlm/WorkerLifeCycle$ReaderThread.bin} (serve/torchserve/agent.py).
 * On any other TorchServe the class loads unchanged and one line on stderr says so (GuardedPatch).
 */
final class WorkerOutputPatch extends GuardedPatch {

    static final String READER = "org/pytorch/serve/wlm/WorkerLifeCycle$ReaderThread";

    private WorkerOutputPatch() {
        super("worker-output");
    }

    static void install(Instrumentation inst) {
        GuardedPatch.install(inst, new WorkerOutputPatch());
    }

    @Override
    boolean targets(String className) {
        return READER.equals(className);
    }

    @Override
    byte[] patch(String className, byte[] original) {
        try (InputStream in = WorkerOutputPatch.class.getResourceAsStream("/oip-classes/" + READER + ".bin")) {
            if (in == null) {
                throw new IllegalStateException("oip-agent.jar lacks oip-classes/" + READER + ".bin; rebuild it");
            }
            return in.readAllBytes();
        } catch (IOException err) {
            throw new UncheckedIOException(err);
        }
    }
}
