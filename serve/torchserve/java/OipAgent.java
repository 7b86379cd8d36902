package oip;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import java.util.HashMap;
import java.util.Map;

/**
 * Java agent (`-javaagent:oip-agent.jar` in TorchServe's vmargs) that defines three TorchServe 0.12
 * classes from this jar instead of model-server.jar, as they are first loaded:
 *
 * <ul>
 *   <li>{@code OpenInferenceProtocolRequestHandler}: the whole Open Inference Protocol REST surface
 *       that TorchServe's own handler lacks (model metadata and readiness, readiness that means READY
 *       workers, server metadata listing {@code binary_tensor_data}, versioned infer/explain);
 *   <li>{@code ErrorResponse}: every TorchServe error body also carries {@code "error"}, the key
 *       OIP clients read;
 *   <li>{@code Session}: the caller's {@code X-Request-ID} names its answer and access log line.
 * </ul>
 *
 * <p>It also patches one method of TorchServe 0.12.0's {@code BatchAggregator} (HeldJobsPatch) and inserts
 * the stop's drain into three of its classes (DrainPatch); the drain's hooks also name the request ID in
 * every error answer (RequestIds). DataPathPatch changes how it reads
 * bodies, forms batches and hands them to the workers.
 *
 * Why an agent and not a TorchServe endpoint plugin: a plugin registered for "/v2" would also take
 * {@code POST /v2/models/m/infer} away from TorchServe's own fast route, and TorchServe runs plugins
 * on another thread after Netty has released the request body (measured: IllegalReferenceCount).
 */
public final class OipAgent implements ClassFileTransformer {

    /** Internal names of the classes this jar replaces; their bytes are resources "oip-classes/NAME.bin". */
    static final String[] REPLACED = {
        "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler",
        "org/pytorch/serve/http/ErrorResponse",
        "org/pytorch/serve/http/Session",
    };

    private final Map<String, byte[]> replacements = new HashMap<>();

    private OipAgent() throws IOException {
        for (String name : REPLACED) {
            try (InputStream in = OipAgent.class.getResourceAsStream("/oip-classes/" + name + ".bin")) {
                if (in == null) {
                    throw new IOException("oip-agent.jar lacks oip-classes/" + name + ".bin; rebuild it");
                }
                replacements.put(name, in.readAllBytes());
            }
        }
    }

    public static void premain(String args, Instrumentation inst) throws IOException {
        inst.addTransformer(new OipAgent());
        HeldJobsPatch.install(inst); // requests held for a batch survive a dead worker (HeldJobs)
        DrainPatch.install(inst); // a stop answers requests already sent before it closes connections (Drain)
        DataPathPatch.install(inst); // large reads for large bodies, no batch wait for jobs not queued (DataPath)
        WorkerOutputPatch.install(inst); // worker output lines read without regular expressions (WorkerOutput)
    }

    @Override
    public byte[] transform(
            ClassLoader loader,
            String className,
            Class<?> classBeingRedefined,
            ProtectionDomain protectionDomain,
            byte[] classfileBuffer) {
        return classBeingRedefined == null ? replacements.get(className) : null;
    }
}
