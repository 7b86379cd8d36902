package oip;

import java.io.IOException;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.ProtectionDomain;
import java.util.Map;
import java.util.Set;
import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.Label;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

/**
 * Class-file transform of TorchServe 0.12.0's {@code BatchAggregator}: requests a worker thread holds
 * while its batch fills are not lost when its worker process dies ({@link HeldJobs} says what happens).
 *
 * <p>The change: {@code getRequest(String, WorkerState)} is renamed to a private method and a new
 * {@code getRequest} calls it; on {@code InterruptedException} (the worker thread is interrupted when its
 * worker's channel closes) the new one hands the aggregator's held jobs to {@link HeldJobs#requeue} and
 * rethrows. And {@code sendError} becomes {@code synchronized}: when TorchServe stops a worker on purpose
 * it returns the held jobs itself ({@code sendError(null, ...)}) from another thread, and the two must
 * not run at once (HeldJobs says why). sendError runs only for errors, so the lock costs nothing. Why a transform and not a replaced class: the rest of the class (and its subclasses, which
 * inherit or override {@code getRequest}) stays TorchServe's own bytes. It uses the JDK's internal copy
 * of ASM, exported to this agent by {@link #install}. Applied only when TorchServe's {@code
 * ts/version.txt} (the file its ConfigManager reads) says 0.12.0 and the method is there as expected;
 * otherwise the class loads unchanged and one line on stderr says so.
 */
final class HeldJobsPatch implements ClassFileTransformer {

    static final String TARGET = "org/pytorch/serve/wlm/BatchAggregator";
    static final String VERSION = "0.12.0";
    private static final String METHOD = "getRequest";
    private static final String DESCRIPTOR =
            "(Ljava/lang/String;Lorg/pytorch/serve/wlm/WorkerState;)"
                    + "Lorg/pytorch/serve/util/messages/BaseModelRequest;";
    private static final String RENAMED = "getRequest$unguarded";
    private static final String SEND_ERROR = "(Lorg/pytorch/serve/util/messages/BaseModelRequest;Ljava/lang/String;I)V";
    private static final String ASM = "jdk.internal.org.objectweb.asm";

    private HeldJobsPatch() {}

    /** Export the JDK's ASM to this agent and register the transform (before TorchServe loads the class). */
    static void install(Instrumentation inst) {
        try {
            inst.redefineModule(
                    Object.class.getModule(),
                    Set.of(),
                    Map.of(ASM, Set.of(HeldJobsPatch.class.getModule())),
                    Map.of(),
                    Set.of(),
                    Map.of());
            inst.addTransformer(new HeldJobsPatch());
        } catch (RuntimeException err) { // never stop the server over it
            warn("not installed: " + err);
        }
    }

    @Override
    public byte[] transform(
            ClassLoader loader,
            String className,
            Class<?> classBeingRedefined,
            ProtectionDomain protectionDomain,
            byte[] classfileBuffer) {
        if (!TARGET.equals(className) || classBeingRedefined != null) {
            return null;
        }
        try {
            String version = torchServeVersion(protectionDomain);
            if (!VERSION.equals(version)) {
                warn("TorchServe " + version + " is not " + VERSION + "; left as it is");
                return null;
            }
            byte[] patched = Asm.patch(classfileBuffer);
            if (patched == null) {
                warn("BatchAggregator lacks " + METHOD + DESCRIPTOR + " or sendError" + SEND_ERROR + "; left as it is");
            }
            return patched;
        } catch (RuntimeException | IOException | LinkageError err) {
            warn("not applied: " + err);
            return null;
        }
    }

    /** TorchServe's version: {@code ts/version.txt} beside {@code ts/frontend/model-server.jar}. */
    static String torchServeVersion(ProtectionDomain domain) throws IOException {
        if (domain == null || domain.getCodeSource() == null) {
            return "(unknown: no code source)";
        }
        try {
            Path jar = Path.of(domain.getCodeSource().getLocation().toURI());
            Path file = jar.getParent().getParent().resolve("version.txt");
            return Files.readString(file, StandardCharsets.UTF_8).strip();
        } catch (java.net.URISyntaxException | java.nio.file.NoSuchFileException | NullPointerException err) {
            return "(unknown: " + err + ")";
        }
    }

    private static void warn(String message) {
        System.err.println("oip-agent: held-jobs patch of " + TARGET + ": " + message);
    }

    /**
     * Everything that names ASM types, in a class of its own: the verifier would otherwise load them
     * with this class, before {@link #install} has exported ASM to the agent.
     */
    private static final class Asm {
        /** The class with getRequest wrapped and sendError synchronized, or null when either is missing. */
        static byte[] patch(byte[] original) {
            ClassReader reader = new ClassReader(original);
            ClassWriter writer = new ClassWriter(reader, 0);
            boolean[] found = {false, false};
            reader.accept(
                    new ClassVisitor(Opcodes.ASM8, writer) {
                        @Override
                        public MethodVisitor visitMethod(
                                int access, String name, String descriptor, String signature, String[] exceptions) {
                            if (METHOD.equals(name) && DESCRIPTOR.equals(descriptor) && access == Opcodes.ACC_PUBLIC) {
                                found[0] = true;
                                return super.visitMethod(Opcodes.ACC_PRIVATE, RENAMED, descriptor, signature, exceptions);
                            }
                            if ("sendError".equals(name) && SEND_ERROR.equals(descriptor) && access == Opcodes.ACC_PUBLIC) {
                                found[1] = true;
                                return super.visitMethod(
                                        access | Opcodes.ACC_SYNCHRONIZED, name, descriptor, signature, exceptions);
                            }
                            return super.visitMethod(access, name, descriptor, signature, exceptions);
                        }

                        @Override
                        public void visitEnd() {
                            if (found[0]) {
                                addWrapper(writer); // straight to the writer, not through visitMethod above
                            }
                            super.visitEnd();
                        }
                    },
                    0);
            return found[0] && found[1] ? writer.toByteArray() : null;
        }

        /**
         * {@code public BaseModelRequest getRequest(String id, WorkerState state)}:
         * {@code try { return getRequest$unguarded(id, state); } catch (InterruptedException e) {
         * HeldJobs.requeue(this, this.model, this.jobs); throw e; }}
         */
        private static void addWrapper(ClassVisitor cv) {
            MethodVisitor mv = cv.visitMethod(
                    Opcodes.ACC_PUBLIC,
                    METHOD,
                    DESCRIPTOR,
                    null,
                    new String[] {"java/lang/InterruptedException", "java/util/concurrent/ExecutionException"});
            mv.visitCode();
            Label start = new Label();
            Label end = new Label();
            Label handler = new Label();
            mv.visitTryCatchBlock(start, end, handler, "java/lang/InterruptedException");
            mv.visitLabel(start);
            mv.visitVarInsn(Opcodes.ALOAD, 0);
            mv.visitVarInsn(Opcodes.ALOAD, 1);
            mv.visitVarInsn(Opcodes.ALOAD, 2);
            mv.visitMethodInsn(Opcodes.INVOKESPECIAL, TARGET, RENAMED, DESCRIPTOR, false);
            mv.visitLabel(end);
            mv.visitInsn(Opcodes.ARETURN);
            mv.visitLabel(handler);
            mv.visitFrame(Opcodes.F_SAME1, 0, null, 1, new Object[] {"java/lang/InterruptedException"});
            mv.visitVarInsn(Opcodes.ASTORE, 3);
            mv.visitVarInsn(Opcodes.ALOAD, 0);
            mv.visitVarInsn(Opcodes.ALOAD, 0);
            mv.visitFieldInsn(Opcodes.GETFIELD, TARGET, "model", "Lorg/pytorch/serve/wlm/Model;");
            mv.visitVarInsn(Opcodes.ALOAD, 0);
            mv.visitFieldInsn(Opcodes.GETFIELD, TARGET, "jobs", "Ljava/util/Map;");
            mv.visitMethodInsn(
                    Opcodes.INVOKESTATIC,
                    "oip/HeldJobs",
                    "requeue",
                    "(L" + TARGET + ";Lorg/pytorch/serve/wlm/Model;Ljava/util/Map;)V",
                    false);
            mv.visitVarInsn(Opcodes.ALOAD, 3);
            mv.visitInsn(Opcodes.ATHROW);
            mv.visitMaxs(3, 4);
            mv.visitEnd();
        }
    }
}
