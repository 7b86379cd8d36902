package oip;

import io.netty.buffer.ByteBuf;
import io.netty.channel.AdaptiveRecvByteBufAllocator;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelOption;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.ModelInferenceRequest;
import org.pytorch.serve.util.messages.RequestInput;

/**
 * Two changes to how TorchServe 0.12 moves a request, wired in by {@link DataPathPatch}.
 *
 * <ul>
 *   <li>{@link #accepted}: each accepted REST connection reads with an adaptive buffer of
 *       {@link #RECEIVE_MIN}–{@link #RECEIVE_MAX} bytes instead of TorchServe's fixed 4 kB one, so a large
 *       body arrives in a few reads (an 803 kB OIP tensor took ~200 reads of 4 kB, each one an
 *       {@code HttpContent} the aggregator collected, and 16 reads per wake-up of the event loop).
 *   <li>{@link #nextJob}: when a worker builds a batch it waits for more jobs only while more REST connections
 *       are active and OIP gRPC calls in flight than the batch holds ({@link Drain#active}: a request in
 *       progress, or answered within the last millisecond, as a closed-loop client sends its next one right
 *       after; {@link InferJob#inFlight}): those may yet join it. TorchServe's {@code Model.pollBatch} (and {@code pollInferJob}) always waits up to
 *       {@code maxBatchDelay} for every further job, so a lone request (one caller, or one request that
 *       carries a whole batch of samples) waited the full window for company that never came. Jobs already
 *       queued are always taken. {@code -Doip.batchWait=always} keeps TorchServe's wait, {@code never}
 *       takes only what is queued (default {@code auto}: as described).
 *   <li>{@link #workerChannel}: the socket to each worker gets a send buffer of {@link #WORKER_SEND_BUFFER}
 *       (the kernel caps it at {@code net.core.wmem_max}), so a large batch is written in one go instead of
 *       ~200 kB at a time, each step waiting for the worker to read and the event loop to wake again.
 *   <li>{@link #requestBuffer}: the frame of a batch for the worker is encoded into a buffer sized for it
 *       (the bodies' bytes plus room for the fields) instead of one that starts small and is copied each
 *       time it doubles.
 *   <li>{@link #runHere}: the worker thread writes its batch to the worker socket itself instead of handing
 *       the write to the common pool ({@code CompletableFuture.runAsync}), which cost one more thread wake-up
 *       per batch (and on a JVM that sees 2 CPUs, a new thread per batch: bench/README.md). TorchServe never
 *       waits for that future (its {@code stream().map(join)} has no terminal operation), and the write
 *       itself is queued to the channel's event loop by Netty, so nothing else changes.
 * </ul>
 */
public final class DataPath {

    static final int RECEIVE_MIN = 1024;
    static final int RECEIVE_INITIAL = 16 * 1024;
    static final int RECEIVE_MAX = Integer.getInteger("oip.receiveMax", 1 << 20);
    static final String BATCH_WAIT = System.getProperty("oip.batchWait", "auto");
    /** A connection answered this recently counts as active: its client may be sending the next request. */
    static final long RECENT_NANOS = 1_000_000;
    static final int WORKER_SEND_BUFFER = Integer.getInteger("oip.workerSendBuffer", 4 << 20);

    private DataPath() {}

    /** Called first in {@code ServerInitializer.initChannel}: the connection's receive buffer sizes. */
    public static void accepted(Channel channel) {
        try {
            channel.config().setRecvByteBufAllocator(
                    new AdaptiveRecvByteBufAllocator(RECEIVE_MIN, RECEIVE_INITIAL, RECEIVE_MAX));
        } catch (RuntimeException err) { // keep TorchServe's allocator
        }
    }

    /**
     * In place of {@code queue.poll(delay, unit)} inside {@code Model.pollBatch}'s batch loop ({@code batch}: the
     * jobs it holds so far): the next job already queued; else, while more connections are active than the
     * batch holds, the next one within the delay; else null (the batch is complete) without waiting.
     */
    public static Object nextJob(LinkedBlockingDeque<?> queue, long delay, TimeUnit unit, Map<?, ?> batch)
            throws InterruptedException {
        switch (BATCH_WAIT) {
            case "always":
                return queue.poll(delay, unit);
            case "never":
                return queue.poll();
            default:
                Object job = queue.poll();
                if (job != null || Drain.active(Math.min(unit.toNanos(delay), RECENT_NANOS)) + InferJob.inFlight()
                        <= batch.size()) {
                    return job;
                }
                return queue.poll(delay, unit);
        }
    }

    /** Called first in the worker connection's {@code ChannelInitializer.initChannel}: its send buffer. */
    public static void workerChannel(Channel channel) {
        try {
            channel.config().setOption(ChannelOption.SO_SNDBUF, WORKER_SEND_BUFFER);
        } catch (RuntimeException err) { // keep the default
        }
    }

    /**
     * {@code ModelRequestEncoder.allocateBuffer}: a buffer with room for the whole frame of an inference batch
     * (MessageToByteEncoder's own: {@code ioBuffer()} / {@code heapBuffer()}, grown as it is written).
     */
    public static ByteBuf requestBuffer(ChannelHandlerContext ctx, Object msg, boolean preferDirect) {
        int size = 256;
        if (msg instanceof ModelInferenceRequest) {
            long total = size;
            for (RequestInput input : ((ModelInferenceRequest) msg).getRequestBatch()) {
                total += 64 + utf8Bound(input.getRequestId());
                for (Map.Entry<String, String> header : input.getHeaders().entrySet()) {
                    total += 8 + utf8Bound(header.getKey()) + utf8Bound(header.getValue());
                }
                for (InputParameter parameter : input.getParameters()) {
                    byte[] value = parameter.getValue();
                    total += 12 + utf8Bound(parameter.getName()) + utf8Bound(parameter.getContentType())
                            + (value == null ? 0 : value.length);
                }
            }
            size = (int) Math.min(total, Integer.MAX_VALUE - 8);
        }
        return preferDirect ? ctx.alloc().ioBuffer(size) : ctx.alloc().heapBuffer(size);
    }

    /** Most bytes {@code text} takes in UTF-8 (3 per UTF-16 unit). */
    private static long utf8Bound(CharSequence text) {
        return text == null ? 0 : 3L * text.length();
    }

    /** In place of {@code CompletableFuture.runAsync(task)} in {@code WorkerThread.run}: runs it now. */
    public static CompletableFuture<Void> runHere(Runnable task) {
        try {
            task.run();
            return CompletableFuture.completedFuture(null);
        } catch (Throwable err) { // as runAsync: the failure goes into the future (which nobody reads)
            return CompletableFuture.failedFuture(err);
        }
    }
}
