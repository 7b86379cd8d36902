package oip;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.Unpooled;
import io.netty.channel.Channel;
import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpHeaders;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.util.AttributeKey;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import org.pytorch.serve.http.Session;
import org.pytorch.serve.util.ConfigManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The request ID of every REST error answer, whoever wrote it (docs/protocols.md, "Request IDs, timing and
 * statistics"). TorchServe names the ID only in the {@code x-request-id} header of the answers it sends
 * through {@code NettyUtils.sendHttpResponse} ({@link Session} makes that the caller's ID); its JSON error
 * bodies ({@code ErrorResponse}: unknown model, bad token, full queue, dead worker...) lack it, and Netty's
 * own refusals (413 for a body over {@code max_request_size}, 417) have neither an ID nor a body nor an
 * access log line. {@link #accepted} puts an {@link Ids} handler right after each connection's HTTP codec,
 * where every answer passes: an error answer gets header {@code X-Request-ID} when it has none (the
 * caller's usable ID, else a fresh UUID), a JSON object body without {@code request_id} gets it (the
 * header's value), an empty one becomes {@code {"code", "type", "message", "error", "request_id"}}, and an
 * answer that bypassed TorchServe gets its access log line.
 *
 * <p>{@link #answering}: an answer whose handler already named its request (header {@code X-Request-ID}:
 * an OIP body's {@code id}, handlers/base.py) keeps that ID in the header and the access log line.
 */
public final class RequestIds {

    private static final AttributeKey<Session> SESSION = AttributeKey.valueOf("session");
    private static final Logger ACCESS_LOG = LoggerFactory.getLogger("ACCESS_LOG");
    static final String HEADER = "x-request-id";

    private RequestIds() {}

    /**
     * A fresh request ID that also says when it was made: a UUID version 7 (RFC 9562) whose 12 bits after
     * the version hold the sub-millisecond fraction (its method 3: 1/4096 ms, about 0.25 µs), with 62
     * random bits. The frontend names each request with one as it receives it, so the worker reads the
     * request's queue time from its ID (handlers/tracing.py) and no request carries a timestamp header.
     * Cheaper than {@link UUID#randomUUID} (no SecureRandom); time-ordered, so log lines sort by arrival.
     */
    public static String newId() {
        Instant now = Instant.now(); // microseconds on Linux
        long fraction = (now.getNano() % 1_000_000) * 4096L / 1_000_000;
        long high = (now.toEpochMilli() << 16) | 0x7000L | fraction;
        long low = (ThreadLocalRandom.current().nextLong() >>> 2) | 0x8000000000000000L;
        return new UUID(high, low).toString();
    }

    /** Called from {@link Drain#accepted}: the {@link Ids} handler joins the pipeline once the codec is in. */
    static void accepted(Channel channel) {
        channel.pipeline().addFirst("oip-ids-install", new Installer());
    }

    /** Called first in {@code NettyUtils.sendHttpResponse}: an ID the answer already names is the session's. */
    static void answering(ChannelHandlerContext ctx, Object response) {
        if (!(response instanceof HttpResponse)) {
            return;
        }
        Session session = ctx.channel().attr(SESSION).get();
        String named = ((HttpResponse) response).headers().get(HEADER);
        if (session != null && named != null) {
            session.nameAnswer(named);
        }
    }

    /** The first bytes of a connection: put {@link Ids} after TorchServe's codec, then step aside. */
    static final class Installer extends ChannelInboundHandlerAdapter {
        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (ctx.pipeline().get("http") != null && ctx.pipeline().get(Ids.class) == null) {
                ctx.pipeline().addAfter("http", "oip-ids", new Ids());
            }
            ctx.pipeline().remove(this);
            ctx.fireChannelRead(msg);
        }
    }

    /** Between the HTTP codec and the aggregator: sees each request's head and every answer. */
    static final class Ids extends ChannelDuplexHandler {
        private HttpRequest head; // the current request's (no body: nothing to release)
        private long started;

        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (msg instanceof HttpRequest) { // only noted: read when an answer bypasses TorchServe
                head = (HttpRequest) msg;
                started = System.currentTimeMillis();
            }
            ctx.fireChannelRead(msg);
        }

        @Override
        public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) {
            if (msg instanceof FullHttpResponse && ((FullHttpResponse) msg).status().code() >= 400) {
                try {
                    msg = named(ctx, (FullHttpResponse) msg);
                } catch (RuntimeException err) { // never lose an answer over its ID
                    System.err.println("oip-agent: request id: " + err);
                }
            }
            ctx.write(msg, promise);
        }

        private FullHttpResponse named(ChannelHandlerContext ctx, FullHttpResponse response) {
            HttpHeaders headers = response.headers();
            String id = headers.get(HEADER);
            if (id == null) { // not sent by TorchServe's sendHttpResponse (Netty's 413/417): no ID, no log line
                id = head == null ? null : Session.usableId(head.headers().get(HEADER));
                id = id != null ? id : newId();
                headers.set(HEADER, id);
                String line = head == null ? "\"- - -\"" : '"' + head.method().name() + ' ' + head.uri() + ' '
                        + head.protocolVersion().text() + '"';
                ACCESS_LOG.info("{} {} {} {} request_id={}", ctx.channel().remoteAddress(), line,
                        response.status().code(), System.currentTimeMillis() - started, id);
                Drain.answered(ctx.channel());
            }
            String body = withId(response, id);
            if (body == null) {
                return response;
            }
            FullHttpResponse replaced = response.replace(Unpooled.copiedBuffer(body, StandardCharsets.UTF_8));
            response.release();
            replaced.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
            HttpUtil.setContentLength(replaced, replaced.content().readableBytes());
            return replaced;
        }
    }

    /** The body of error answer {@code response} naming {@code id}, or null when it needs no change. */
    static String withId(FullHttpResponse response, String id) {
        JsonObject body;
        if (response.content().readableBytes() == 0) {
            int code = response.status().code();
            String message = code == 413
                    ? "request too large: its body exceeds max_request_size (" + ConfigManager.getInstance().getMaxRequestSize()
                            + " bytes); send fewer or smaller inputs per request"
                    : response.status().reasonPhrase();
            body = new JsonObject();
            body.addProperty("code", code);
            body.addProperty("type", response.status().reasonPhrase().replace(" ", ""));
            body.addProperty("message", message);
            body.addProperty("error", message);
        } else {
            String type = response.headers().get(HttpHeaderNames.CONTENT_TYPE);
            if (type == null || !type.toLowerCase().startsWith("application/json")) {
                return null;
            }
            JsonElement parsed;
            try {
                parsed = JsonParser.parseString(response.content().toString(StandardCharsets.UTF_8));
            } catch (RuntimeException err) {
                return null;
            }
            if (!parsed.isJsonObject() || parsed.getAsJsonObject().has("request_id")) {
                return null;
            }
            body = parsed.getAsJsonObject();
        }
        body.addProperty("request_id", id);
        return new GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create().toJson(body) + "\n";
    }
}
