package oip;

import java.lang.instrument.Instrumentation;
import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

/**
 * Class-file transform of three TorchServe 0.12.0 classes that wires in {@link Drain} and {@link RequestIds}
 * (what they do and why: there): static calls are inserted at the start of each method, the rest stays
 * TorchServe's bytes.
 *
 * <ul>
 *   <li>{@code ServerInitializer.initChannel(Channel)}: {@code Drain.accepted(channel)};
 *   <li>{@code NettyUtils.sendHttpResponse(ctx, response, keepAlive)}:
 *       {@code response = RequestIds.answer(ctx, response); keepAlive = Drain.answering(ctx, response, keepAlive)};
 *   <li>{@code ModelServer.startGRPCServers()}: {@code OipGrpc.start()} (the OIP gRPC service, {@link OipGrpc});
 *   <li>{@code ModelServer.stop()}: {@code Drain.drain(this.futures)} (the listeners' bind futures).
 * </ul>
 *
 * Applied only when TorchServe's version is 0.12.0 ({@link HeldJobsPatch#torchServeVersion}) and the
 * method is there as expected; otherwise the class loads unchanged and one line on stderr says so. Uses
 * the JDK's ASM that {@link HeldJobsPatch#install} exports to the agent, so it is registered after it.
 */
final class DrainPatch extends GuardedPatch {

    private static final String INITIALIZER = "org/pytorch/serve/ServerInitializer";
    private static final String NETTY_UTILS = "org/pytorch/serve/util/NettyUtils";
    private static final String MODEL_SERVER = "org/pytorch/serve/ModelServer";
    private static final String CHANNEL = "Lio/netty/channel/Channel;";
    private static final String CTX = "Lio/netty/channel/ChannelHandlerContext;";
    private static final String RESPONSE = "Lio/netty/handler/codec/http/HttpResponse;";

    private DrainPatch() {
        super("drain");
    }

    static void install(Instrumentation inst) {
        GuardedPatch.install(inst, new DrainPatch());
    }

    @Override
    boolean targets(String className) {
        return INITIALIZER.equals(className) || NETTY_UTILS.equals(className) || MODEL_SERVER.equals(className);
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
            boolean[] found = {false};
            reader.accept(
                    new ClassVisitor(Opcodes.ASM8, writer) {
                        @Override
                        public MethodVisitor visitMethod(
                                int access, String name, String descriptor, String signature, String[] exceptions) {
                            MethodVisitor mv = super.visitMethod(access, name, descriptor, signature, exceptions);
                            boolean isPublic = (access & Opcodes.ACC_PUBLIC) != 0;
                            if (INITIALIZER.equals(className) && isPublic && "initChannel".equals(name)
                                    && ("(" + CHANNEL + ")V").equals(descriptor)) {
                                found[0] = true;
                                return new Prologue(mv) {
                                    @Override
                                    void insert() {
                                        visitVarInsn(Opcodes.ALOAD, 1);
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/Drain", "accepted",
                                                "(" + CHANNEL + ")V", false);
                                    }
                                };
                            }
                            if (NETTY_UTILS.equals(className) && isPublic && "sendHttpResponse".equals(name)
                                    && ("(" + CTX + RESPONSE + "Z)V").equals(descriptor)) {
                                found[0] = true;
                                return new Prologue(mv) {
                                    @Override
                                    void insert() {
                                        visitVarInsn(Opcodes.ALOAD, 0);
                                        visitVarInsn(Opcodes.ALOAD, 1);
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/RequestIds", "answer",
                                                "(" + CTX + RESPONSE + ")" + RESPONSE, false);
                                        visitVarInsn(Opcodes.ASTORE, 1);
                                        visitVarInsn(Opcodes.ALOAD, 0);
                                        visitVarInsn(Opcodes.ALOAD, 1);
                                        visitVarInsn(Opcodes.ILOAD, 2);
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/Drain", "answering",
                                                "(" + CTX + "Ljava/lang/Object;Z)Z", false);
                                        visitVarInsn(Opcodes.ISTORE, 2);
                                    }
                                };
                            }
                            if (MODEL_SERVER.equals(className) && isPublic && "startGRPCServers".equals(name)
                                    && "()V".equals(descriptor)) {
                                found[0] = true;
                                return new Prologue(mv) {
                                    @Override
                                    void insert() {
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/OipGrpc", "start", "()V", false);
                                    }
                                };
                            }
                            if (MODEL_SERVER.equals(className) && isPublic && "stop".equals(name) && "()V".equals(descriptor)) {
                                found[0] = true;
                                return new Prologue(mv) {
                                    @Override
                                    void insert() {
                                        visitVarInsn(Opcodes.ALOAD, 0);
                                        visitFieldInsn(Opcodes.GETFIELD, MODEL_SERVER, "futures", "Ljava/util/List;");
                                        visitMethodInsn(Opcodes.INVOKESTATIC, "oip/Drain", "drain",
                                                "(Ljava/util/List;)V", false);
                                    }
                                };
                            }
                            return mv;
                        }
                    },
                    0);
            return found[0] ? writer.toByteArray() : null;
        }
    }

    /** A method visitor that inserts {@link #insert} before the method's first instruction. */
    private abstract static class Prologue extends MethodVisitor {
        Prologue(MethodVisitor mv) {
            super(Opcodes.ASM8, mv);
        }

        abstract void insert();

        @Override
        public void visitCode() {
            super.visitCode();
            insert();
        }
    }
}
