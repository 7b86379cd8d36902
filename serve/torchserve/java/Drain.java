package oip;

import io.netty.channel.Channel;
import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelFuture;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelOption;
import io.netty.handler.codec.http.FullHttpResponse;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * The drain that runs when TorchServe stops (SIGTERM: its shutdown hook calls {@code ModelServer.stop}),
 * before TorchServe closes its listeners and shuts its event loops (which closes every connection left).
 * {@link DrainPatch} wires it in. Each accepted REST connection (inference, management, metrics) gets
 * SO_LINGER off again (TorchServe sets 0, which makes every close a reset that drops unsent bytes) and a
 * first handler that notes when a request begins on it; TorchServe's answer ends it.
 *
 * <p>{@link #drain}: from then on every full answer is sent with {@code Connection: close} and the
 * connection closed after the flush (TorchServe's own non-keep-alive path); the listeners stop accepting
 * (they are not closed here: TorchServe's main thread shuts everything down once the first one closes); for {@link #GRACE_MS} nothing else is closed, so a request a client already
 * sent on an idle keep-alive connection is read and answered; after it, connections with no request in
 * progress are closed (FIN). The stop goes on when every connection is closed or after {@link #LIMIT_MS}
 * (then TorchServe closes what is left, as before). Workers stay up meanwhile: TorchServe unregisters
 * models last. A streamed answer ({@code ts_stream_next}) is left alone; its connection counts as busy
 * until it closes or the limit passes.
 */
public final class Drain {

    /** How long idle connections are left open after the drain begins, for requests already sent. */
    static final long GRACE_MS = Long.getLong("oip.drain.graceMs", 1000);
    /** The most the drain waits for answers in progress (below `serve stop`'s 10 s before SIGKILL). */
    static final long LIMIT_MS = Long.getLong("oip.drain.limitMs", 5000);

    private static final Set<Tracker> OPEN = ConcurrentHashMap.newKeySet();
    private static final AtomicBoolean STARTED = new AtomicBoolean();
    /** Connections with a request in progress (read and not yet answered): REST requests in flight. */
    private static final AtomicInteger IN_PROGRESS = new AtomicInteger();
    private static volatile boolean draining;

    private Drain() {}

    /** Called first in {@code ServerInitializer.initChannel}: linger off, track the connection. */
    public static void accepted(Channel channel) {
        try {
            channel.config().setOption(ChannelOption.SO_LINGER, -1);
        } catch (RuntimeException err) { // a channel type without SO_LINGER: leave it
        }
        Tracker tracker = new Tracker(channel);
        channel.pipeline().addFirst("oip-drain", tracker);
        OPEN.add(tracker);
        channel.closeFuture().addListener(f -> {
            OPEN.remove(tracker);
            tracker.idle();
        });
        RequestIds.accepted(channel);
    }

    /** REST requests read and not yet answered, on every connection. */
    public static int inProgress() {
        return IN_PROGRESS.get();
    }

    /**
     * Connections with a request in progress or answered within the last {@code windowNanos} (a client in a
     * closed loop sends its next request right after its answer): DataPath's batching asks, only when the
     * job queue is empty, so the walk over the open connections is rare.
     */
    public static int active(long windowNanos) {
        long now = System.nanoTime();
        int active = 0;
        for (Tracker tracker : OPEN) {
            if (tracker.busy.get() || now - tracker.answeredAt < windowNanos) {
                active++;
            }
        }
        return active;
    }

    /**
     * Called in {@code NettyUtils.sendHttpResponse}, after {@link RequestIds#answer}: the request on this
     * connection is answered; returns the keep-alive to use (false for full answers once the drain has begun).
     */
    public static boolean answering(ChannelHandlerContext ctx, Object response, boolean keepAlive) {
        if (!(response instanceof FullHttpResponse)) { // a stream's head: busy until the connection closes
            return keepAlive;
        }
        answered(ctx.channel());
        return keepAlive && !draining;
    }

    /** The request on {@code channel} is answered (also Netty's own refusals: RequestIds). */
    static void answered(Channel channel) {
        Tracker tracker = channel.pipeline().get(Tracker.class);
        if (tracker != null) {
            tracker.idle();
        }
    }

    /** Called first in {@code ModelServer.stop} with its listeners' bind futures; returns once drained. */
    public static void drain(List<ChannelFuture> listeners) {
        if (!STARTED.compareAndSet(false, true)) {
            return;
        }
        try {
            long start = System.nanoTime();
            draining = true;
            OipGrpc.drain(LIMIT_MS); // OIP gRPC: new calls refused, calls in progress answered
            System.err.println("oip-agent: drain: " + OPEN.size() + " connection(s) open");
            if (listeners != null) { // stop accepting; not closed: TorchServe's main thread ends all once they are
                for (ChannelFuture listener : listeners) {
                    listener.channel().config().setAutoRead(false);
                }
            }
            long elapsed;
            while (!OPEN.isEmpty() && (elapsed = (System.nanoTime() - start) / 1_000_000) < LIMIT_MS) {
                if (elapsed >= GRACE_MS) {
                    for (Tracker tracker : OPEN) {
                        tracker.closeIfIdle();
                    }
                }
                Thread.sleep(20);
            }
            long took = (System.nanoTime() - start) / 1_000_000;
            System.err.println(OPEN.isEmpty()
                    ? "oip-agent: drain: every connection closed after " + took + " ms"
                    : "oip-agent: drain: " + OPEN.size() + " connection(s) still busy after " + took
                            + " ms; TorchServe closes them");
        } catch (InterruptedException err) {
            Thread.currentThread().interrupt();
        } catch (RuntimeException err) { // never stop the stop over it
            System.err.println("oip-agent: drain: " + err);
        }
    }

    /** First handler of a connection: busy from the first bytes of a request until its answer. */
    static final class Tracker extends ChannelDuplexHandler {
        private final Channel channel;
        private final AtomicBoolean busy = new AtomicBoolean();
        private volatile long answeredAt = System.nanoTime() - 3_600_000_000_000L; // never, in effect

        Tracker(Channel channel) {
            this.channel = channel;
        }

        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (busy.compareAndSet(false, true)) {
                IN_PROGRESS.incrementAndGet();
            }
            ctx.fireChannelRead(msg);
        }

        /** The request is answered (or the connection closed). */
        void idle() {
            answeredAt = System.nanoTime();
            if (busy.compareAndSet(true, false)) {
                IN_PROGRESS.decrementAndGet();
            }
        }

        void closeIfIdle() {
            channel.eventLoop().execute(() -> {
                if (!busy.get() && channel.isOpen()) {
                    channel.close();
                }
            });
        }
    }
}
