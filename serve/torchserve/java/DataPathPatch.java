package oip;

import java.lang.instrument.Instrumentation;
import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

/**
 * Class-file transform of two TorchServe 0.12.0 classes that wires in {@link DataPath} (what and why: there).
 *
 * <ul>
 *   <li>{@code ServerInitializer.initChannel(Channel)}: {@code DataPath.accepted(channel)} inserted first;
 *   <li>{@code Model.pollBatch(String, long, Map)} (what {@code BatchAggregator} calls) and
 *       {@code Model.pollInferJob(Map, int, LinkedBlockingDeque)} (the same loop, for the job-ticket
 *       aggregators): the batch loop's timed {@code LinkedBlockingDeque.poll(long, TimeUnit)}, the last one
 *       in each (before it: the worker's own management queue, and the wait for the batch's first job,
 *       which stay), becomes {@code DataPath.nextJob(queue, delay, unit, batch)} (the method's job map).
 *   <li>{@code WorkerThread$1.initChannel(Channel)} (the worker connection's initializer):
 *       {@code DataPath.workerChannel(channel)} inserted first;
 *   <li>{@code ModelRequestEncoder}: a method added, {@code allocateBuffer(ctx, msg, preferDirect)} (it has none:
 *       {@code MessageToByteEncoder}'s is used) returning {@code DataPath.requestBuffer(ctx, msg, preferDirect)};
 *   <li>{@code WorkerThread.run()}: its one {@code CompletableFuture.runAsync(Runnable)} (the batch's write to
 *       the worker) becomes {@code DataPath.runHere(Runnable)}.
 * </ul>
 *
 * Applied only when TorchServe's version is 0.12.0 ({@link HeldJobsPatch#torchServeVersion}) and each method
 * is there as expected (pollBatch with three timed polls, pollInferJob with two); otherwise the class loads
 * unchanged and one line on stderr says so. Uses the JDK's ASM that {@link HeldJobsPatch#install} exports to the agent, so it
 * is registered after it.
 */
final class DataPathPatch extends GuardedPatch {

    private static final String INITIALIZER = "org/pytorch/serve/ServerInitializer";
    private static final String MODEL = "org/pytorch/serve/wlm/Model";
    private static final String WORKER_INIT = "org/pytorch/serve/wlm/WorkerThread$1";
    private static final String ENCODER = "org/pytorch/serve/util/codec/ModelRequestEncoder";
    private static final String WORKER_THREAD = "org/pytorch/serve/wlm/WorkerThread";
    private static final String RUN_ASYNC = "(Ljava/lang/Runnable;)Ljava/util/concurrent/CompletableFuture;";
    private static final String ALLOCATE = "allocateBuffer";
    private static final String ALLOCATE_DESCRIPTOR =
            "(Lio/netty/channel/ChannelHandlerContext;Ljava/lang/Object;Z)Lio/netty/buffer/ByteBuf;";
    private static final String CHANNEL = "Lio/netty/channel/Channel;";
    private static final String DEQUE = "java/util/concurrent/LinkedBlockingDeque";
    private static final String POLL_INFER = "(Ljava/util/Map;IL" + DEQUE + ";)V";
    private static final String POLL_BATCH = "(Ljava/lang/String;JLjava/util/Map;)V";
    private static final String TIMED_POLL = "(JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";

    private DataPathPatch() {
        super("data-path");
    }

    static void install(Instrumentation inst) {
        GuardedPatch.install(inst, new DataPathPatch());
    }

    @Override
    boolean targets(String className) {
        return INITIALIZER.equals(className) || MODEL.equals(className) || WORKER_INIT.equals(className)
                || ENCODER.equals(className) || WORKER_THREAD.equals(className);
    }

    @Override
    byte[] patch(String className, byte[] original) {
        return Asm.patch(className, original);
    }

    /** Everything that names ASM types, in a class of its own (HeldJobsPatch.Asm says why). */
    private static final class Asm {
        static byte[] patch(String className, byte[] original) {
            ClassReader reader = new ClassReader(original);
            ClassWriter writer = new ClassWriter(reader, ClassWriter.COMPUTE_MAXS);
            int[] polls = {0, 0}; // timed polls seen in pollBatch, in pollInferJob
            int[] expected = {3, 2}; // the last one of each is the batch loop's
            int[] found = {0};
            reader.accept(
                    new ClassVisitor(Opcodes.ASM8, writer) {
                        @Override
                        public MethodVisitor visitMethod(
                                int access, String name, String descriptor, String signature, String[] exceptions) {
                            MethodVisitor mv = super.visitMethod(access, name, descriptor, signature, exceptions);
                            boolean isPublic = (access & Opcodes.ACC_PUBLIC) != 0;
                            if ((INITIALIZER.equals(className) || WORKER_INIT.equals(className)) && isPublic
                                    && "initChannel".equals(name) && ("(" + CHANNEL + ")V").equals(descriptor)) {
                                found[0]++;
                                String call = INITIALIZER.equals(className) ? "accepted" : "workerChannel";
                                return new MethodVisitor(Opcodes.ASM8, mv) {
                                    @Override
                                    public void visitCode() {
                                        super.visitCode();
                                        visitVarInsn(Opcodes.ALOAD, 1);
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/DataPath", call,
                                                "(" + CHANNEL + ")V", false);
                                    }
                                };
                            }
                            if (WORKER_THREAD.equals(className) && isPublic && "run".equals(name) && "()V".equals(descriptor)) {
                                found[0]++;
                                return new MethodVisitor(Opcodes.ASM8, mv) {
                                    @Override
                                    public void visitMethodInsn(
                                            int opcode, String owner, String method, String desc, boolean itf) {
                                        if (opcode == Opcodes.INVOKESTATIC && "java/util/concurrent/CompletableFuture".equals(owner)
                                                && "runAsync".equals(method) && RUN_ASYNC.equals(desc)) {
                                            polls[0]++;
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, "oip/DataPath", "runHere", RUN_ASYNC, false);
                                            return;
                                        }
                                        super.visitMethodInsn(opcode, owner, method, desc, itf);
                                    }
                                };
                            }
                            if (ENCODER.equals(className) && ALLOCATE.equals(name)) {
                                found[0] = -100; // it has its own: leave the class alone
                            }
                            int which = !MODEL.equals(className) || !isPublic ? -1
                                    : "pollBatch".equals(name) && POLL_BATCH.equals(descriptor) ? 0
                                    : "pollInferJob".equals(name) && POLL_INFER.equals(descriptor) ? 1 : -1;
                            if (which >= 0) {
                                found[0]++;
                                return new MethodVisitor(Opcodes.ASM8, mv) {
                                    @Override
                                    public void visitMethodInsn(
                                            int opcode, String owner, String method, String desc, boolean itf) {
                                        if (opcode == Opcodes.INVOKEVIRTUAL && DEQUE.equals(owner)
                                                && "poll".equals(method) && TIMED_POLL.equals(desc)
                                                && ++polls[which] == expected[which]) {
                                            // the batch so far: pollBatch's jobsRepo (slot 4), pollInferJob's jobs (1)
                                            super.visitVarInsn(Opcodes.ALOAD, which == 0 ? 4 : 1);
                                            super.visitMethodInsn(Opcodes.INVOKESTATIC, "oip/DataPath", "nextJob",
                                                    "(L" + DEQUE + ";JLjava/util/concurrent/TimeUnit;Ljava/util/Map;)"
                                                            + "Ljava/lang/Object;", false);
                                            return;
                                        }
                                        super.visitMethodInsn(opcode, owner, method, desc, itf);
                                    }
                                };
                            }
                            return mv;
                        }

                        @Override
                        public void visitEnd() {
                            if (ENCODER.equals(className) && found[0] == 0) {
                                found[0] = 1;
                                MethodVisitor mv = super.visitMethod(
                                        Opcodes.ACC_PROTECTED, ALLOCATE, ALLOCATE_DESCRIPTOR, null,
                                        new String[] {"java/lang/Exception"});
                                mv.visitCode();
                                mv.visitVarInsn(Opcodes.ALOAD, 1);
                                mv.visitVarInsn(Opcodes.ALOAD, 2);
                                mv.visitVarInsn(Opcodes.ILOAD, 3);
                                mv.visitMethodInsn(Opcodes.INVOKESTATIC, "oip/DataPath", "requestBuffer",
                                        ALLOCATE_DESCRIPTOR, false);
                                mv.visitInsn(Opcodes.ARETURN);
                                mv.visitMaxs(3, 4);
                                mv.visitEnd();
                            }
                            super.visitEnd();
                        }
                    },
                    0);
            boolean asExpected = MODEL.equals(className)
                    ? found[0] == 2 && polls[0] == expected[0] && polls[1] == expected[1]
                    : WORKER_THREAD.equals(className) ? found[0] == 1 && polls[0] == 1 // one runAsync in run()
                    : found[0] == 1;
            return asExpected ? writer.toByteArray() : null;
        }
    }
}
