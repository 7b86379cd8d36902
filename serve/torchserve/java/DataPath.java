package oip;

import io.netty.channel.AdaptiveRecvByteBufAllocator;
import io.netty.channel.Channel;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;

/**
 * Two changes to how TorchServe 0.12 moves a request, wired in by {@link DataPathPatch}.
 *
 * <ul>
 *   <li>{@link #accepted}: each accepted REST connection reads with an adaptive buffer of
 *       {@link #RECEIVE_MIN}–{@link #RECEIVE_MAX} bytes instead of TorchServe's fixed 4 kB one, so a large
 *       body arrives in a few reads (an 803 kB OIP tensor took ~200 reads of 4 kB, each one an
 *       {@code HttpContent} the aggregator collected, and 16 reads per wake-up of the event loop).
 *   <li>{@link #nextJob}: when a worker builds a batch it takes the jobs already queued and does not wait
 *       {@code maxBatchDelay} for more. TorchServe's {@code Model.pollBatch} (and {@code pollInferJob}) waits up to the delay
 *       for every further job, so a lone request (one caller, or one request that carries a whole batch
 *       of samples) always waited the full window for company that never came. Under load, requests
 *       queue while the workers are busy, so batches still form from what is waiting.
 *       {@code -Doip.batchWait=true} keeps TorchServe's wait (to measure the difference).
 * </ul>
 */
public final class DataPath {

    static final int RECEIVE_MIN = 1024;
    static final int RECEIVE_INITIAL = 16 * 1024;
    static final int RECEIVE_MAX = Integer.getInteger("oip.receiveMax", 1 << 20);
    static final boolean BATCH_WAIT = Boolean.getBoolean("oip.batchWait");

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
     * In place of {@code queue.poll(delay, unit)} inside {@code Model.pollInferJob}'s batch loop: the next
     * job already queued, or null (the batch is complete) without waiting.
     */
    public static Object nextJob(LinkedBlockingDeque<?> queue, long delay, TimeUnit unit) throws InterruptedException {
        return BATCH_WAIT ? queue.poll(delay, unit) : queue.poll();
    }
}
