package oip;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.Unpooled;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandler;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelPipeline;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpMessage;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpMessage;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
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
 * access log line.
 *
 * <p>{@link #answer}, called first in {@code sendHttpResponse}: an ID the answer already names (header
 * {@code X-Request-ID}: an OIP body's {@code id}, handlers/base.py) becomes the session's; a JSON object
 * error body without {@code request_id} gets the ID the answer's header will carry. {@link #accepted}: each
 * connection's {@code HttpObjectAggregator} is replaced at its first read by an {@link Aggregator}, which
 * writes Netty's 413 and 417 itself, with header {@code X-Request-ID} (the caller's usable ID, else a fresh
 * one), a JSON body {@code {"code", "type", "message", "error", "request_id"}} and an access log line. No
 * handler of ours sits in the request path: each one there costs every request a hop both ways.
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

    /** Called from {@link Drain#accepted}: the connection's aggregator becomes an {@link Aggregator}. */
    static void accepted(Channel channel) {
        channel.pipeline().addFirst("oip-ids-install", new Installer());
    }

    /**
     * Called first in {@code NettyUtils.sendHttpResponse}: the answer to send in place of {@code response}
     * (itself unless it is an error with a JSON body that lacks {@code request_id}).
     */
    public static HttpResponse answer(ChannelHandlerContext ctx, HttpResponse response) {
        try {
            Session session = ctx.channel().attr(SESSION).get();
            String named = response.headers().get(HEADER);
            if (session != null && named != null) {
                session.nameAnswer(named);
            }
            if (response.status().code() < 400 || !(response instanceof FullHttpResponse)) {
                return response;
            }
            String id = session != null ? session.answerId() : named;
            if (id == null) { // no session: TorchServe writes no header either
                id = newId();
                response.headers().set(HEADER, id);
            }
            return withId((FullHttpResponse) response, id);
        } catch (RuntimeException err) { // never lose an answer over its ID
            System.err.println("oip-agent: request id: " + err);
            return response;
        }
    }

    /** The first bytes of a connection: put an {@link Aggregator} in the codec's aggregator's place, step aside. */
    static final class Installer extends ChannelInboundHandlerAdapter {
        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            ChannelHandler aggregator = ctx.pipeline().get("aggregator");
            if (aggregator != null && aggregator.getClass() == HttpObjectAggregator.class) {
                int limit = ((HttpObjectAggregator) aggregator).maxContentLength();
                ctx.pipeline().replace(aggregator, "aggregator", new Aggregator(limit));
            }
            ctx.pipeline().remove(this);
            ctx.fireChannelRead(msg);
        }
    }

    /** TorchServe's request aggregator, whose refusals (413, 417) name their request. */
    static final class Aggregator extends HttpObjectAggregator {
        Aggregator(int maxContentLength) {
            super(maxContentLength);
        }

        /**
         * A request whose body outgrows {@code max_request_size}: 413 with its ID. Like Netty, the connection
         * stays open (the rest of the body is skipped) unless the body is already read or, with neither
         * keep-alive nor {@code Expect: 100-continue}, nothing more can come on it.
         */
        @Override
        protected void handleOversizedMessage(ChannelHandlerContext ctx, HttpMessage oversized) throws Exception {
            if (!(oversized instanceof HttpRequest)) {
                super.handleOversizedMessage(ctx, oversized);
                return;
            }
            HttpRequest head = (HttpRequest) oversized;
            boolean close = head instanceof FullHttpMessage
                    || !HttpUtil.is100ContinueExpected(head) && !HttpUtil.isKeepAlive(head);
            FullHttpResponse refusal = refusal(ctx, head, HttpResponseStatus.REQUEST_ENTITY_TOO_LARGE);
            if (close) {
                refusal.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
            }
            ctx.writeAndFlush(refusal).addListener(sent -> {
                if (close || !sent.isSuccess()) {
                    ctx.close();
                }
            });
        }

        /** Netty's answer to {@code Expect:} (100 Continue, or a 417/413 refusal), a refusal with its ID. */
        @Override
        protected Object newContinueResponse(HttpMessage start, int maxContentLength, ChannelPipeline pipeline) {
            Object answer = super.newContinueResponse(start, maxContentLength, pipeline);
            if (!(answer instanceof FullHttpResponse) || ((FullHttpResponse) answer).status().code() < 400
                    || !(start instanceof HttpRequest)) {
                return answer;
            }
            HttpResponseStatus status = ((FullHttpResponse) answer).status();
            ((FullHttpResponse) answer).release();
            return refusal(pipeline.context(this), (HttpRequest) start, status);
        }

        /** Refusal {@code status} of request {@code head}, with ID, JSON body and access log line. */
        private static FullHttpResponse refusal(ChannelHandlerContext ctx, HttpRequest head, HttpResponseStatus status) {
            String id = Session.usableId(head.headers().get(HEADER));
            id = id != null ? id : newId();
            FullHttpResponse response = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status);
            response.headers().set(HEADER, id);
            response = withId(response, id);
            ACCESS_LOG.info("{} \"{} {} {}\" {} 0 request_id={}", ctx.channel().remoteAddress(), head.method().name(),
                    head.uri(), head.protocolVersion().text(), status.code(), id);
            Drain.answered(ctx.channel());
            return response;
        }
    }

    /** Error answer {@code response} with a JSON body naming {@code id}: itself when it needs no change. */
    static FullHttpResponse withId(FullHttpResponse response, String id) {
        String body = bodyWithId(response, id);
        if (body == null) {
            return response;
        }
        FullHttpResponse replaced = response.replace(Unpooled.copiedBuffer(body, StandardCharsets.UTF_8));
        response.release();
        replaced.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        HttpUtil.setContentLength(replaced, replaced.content().readableBytes());
        return replaced;
    }

    /** The body of error answer {@code response} naming {@code id}, or null when it needs no change. */
    static String bodyWithId(FullHttpResponse response, String id) {
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
