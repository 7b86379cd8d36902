package oip;

import java.io.IOException;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;

/**
 * What the agent's method-level patches (DrainPatch, DataPathPatch) share: they apply only to TorchServe
 * {@value HeldJobsPatch#VERSION} ({@link HeldJobsPatch#torchServeVersion}), and a class they cannot patch
 * loads unchanged with one line on stderr, never an exception. A subclass names its classes and patches one.
 * Its ASM code stays in a nested class of its own (HeldJobsPatch.Asm says why).
 */
abstract class GuardedPatch implements ClassFileTransformer {

    private final String name;

    GuardedPatch(String name) {
        this.name = name;
    }

    /** Register {@code patch}; uses the JDK's ASM, so after {@link HeldJobsPatch#install} exported it. */
    static void install(Instrumentation inst, GuardedPatch patch) {
        try {
            inst.addTransformer(patch);
        } catch (RuntimeException err) { // never stop the server over it
            patch.warn("agent", "not installed: " + err);
        }
    }

    /** Whether {@code className} (internal name) is one of the classes this patch changes. */
    abstract boolean targets(String className);

    /** The patched class, or null when the method to patch is not as expected. */
    abstract byte[] patch(String className, byte[] original);

    @Override
    public final byte[] transform(
            ClassLoader loader,
            String className,
            Class<?> classBeingRedefined,
            ProtectionDomain protectionDomain,
            byte[] classfileBuffer) {
        if (classBeingRedefined != null || !targets(className)) {
            return null;
        }
        try {
            String version = HeldJobsPatch.torchServeVersion(protectionDomain);
            if (!HeldJobsPatch.VERSION.equals(version)) {
                warn(className, "TorchServe " + version + " is not " + HeldJobsPatch.VERSION + "; left as it is");
                return null;
            }
            byte[] patched = patch(className, classfileBuffer);
            if (patched == null) {
                warn(className, "the method to patch is not as expected; left as it is");
            }
            return patched;
        } catch (RuntimeException | IOException | LinkageError err) {
            warn(className, "not applied: " + err);
            return null;
        }
    }

    final void warn(String target, String message) {
        System.err.println("oip-agent: " + name + " patch of " + target + ": " + message);
    }
}
