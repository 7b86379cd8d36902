package org.pytorch.serve.http;

import io.netty.handler.codec.http.HttpRequest;
import java.util.regex.Pattern;
import oip.RequestIds;

/**
 * TorchServe's per-request session (access log line, {@code x-request-id} answer header), loaded in place
 * of TorchServe's own class by serve/torchserve/java/OipAgent.java so that a caller's {@code X-Request-ID}
 * names its request: TorchServe writes {@link #getRequestId()} into every REST answer's
 * {@code x-request-id} header (its own errors included) once the answer's code is set, and this session
 * then names the caller's ID when it sent a usable one (1-128 printable ASCII characters, no spaces).
 * Until then {@link #getRequestId()} is a fresh UUID made as the request is received
 * ({@link RequestIds#newId}: version 7, which tells the handler when, for its queue time): the key of the job
 * in its batch and the worker's request ID, unique even when callers repeat an ID. The access log line ends
 * with the answer's ID and, when the caller sent a W3C {@code traceparent}, its trace ID.
 */
public class Session {

    private static final Pattern TRACEPARENT =
            Pattern.compile("[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?");

    private String requestId;
    private String callerId;
    private String answerId;
    private String traceId;
    private String remoteIp;
    private String method;
    private String uri;
    private String protocol;
    private int code;
    private long startTime;

    public Session(String remoteIp, HttpRequest request) {
        this.remoteIp = remoteIp;
        this.uri = request.uri();
        if (request.decoderResult().isSuccess()) {
            method = request.method().name();
            protocol = request.protocolVersion().text();
            callerId = usableId(request.headers().get("X-Request-ID"));
            traceId = traceId(request.headers().get("traceparent"));
        } else {
            method = "GET";
            protocol = "HTTP/1.1";
        }
        requestId = RequestIds.newId();
        startTime = System.currentTimeMillis();
    }

    public Session(String remoteIp, String gRPCMethod) {
        this.remoteIp = remoteIp;
        method = "gRPC";
        protocol = "HTTP/2.0";
        uri = gRPCMethod;
        requestId = RequestIds.newId();
        startTime = System.currentTimeMillis();
    }

    /** {@code value} when it is usable as a request ID (1-128 printable ASCII characters, no spaces), else null. */
    public static String usableId(String value) {
        if (value == null || value.isEmpty() || value.length() > 128) {
            return null;
        }
        for (int i = 0; i < value.length(); i++) { // a loop, not a regex: this runs for every request that has one
            char c = value.charAt(i);
            if (c < 0x21 || c > 0x7e) {
                return null;
            }
        }
        return value;
    }

    /** The trace ID of a W3C traceparent ({@code 00-<32 hex>-<16 hex>-<2 hex>}), else null. */
    public static String traceId(String value) {
        if (value == null) {
            return null;
        }
        String trace = value.trim().toLowerCase();
        if (!TRACEPARENT.matcher(trace).matches() || trace.startsWith("ff")
                || (trace.startsWith("00") && trace.length() != 55)) {
            return null;
        }
        String id = trace.substring(3, 35);
        return id.matches("0+") ? null : id;
    }

    /**
     * The fresh UUID while the request runs; once answered (code set), the ID the answer names
     * ({@link #nameAnswer}), else the caller's if it sent one.
     */
    public String getRequestId() {
        return code != 0 ? answerId() : requestId;
    }

    /**
     * The answer names its request {@code id} (header X-Request-ID set by the handler: an OIP body's
     * {@code id} when the caller sent no X-Request-ID; oip/RequestIds.java); ignored unless usable.
     */
    public void nameAnswer(String id) {
        String usable = usableId(id);
        if (usable != null) {
            answerId = usable;
        }
    }

    /** The ID the answer names: {@link #nameAnswer}'s, else the caller's, else the fresh one. */
    public String answerId() {
        return answerId != null ? answerId : callerId != null ? callerId : requestId;
    }

    public void setCode(int code) {
        this.code = code;
    }

    @Override
    public String toString() {
        long duration = System.currentTimeMillis() - startTime;
        return remoteIp + " \"" + method + " " + uri + ' ' + protocol + "\" " + code + ' ' + duration
                + " request_id=" + answerId()
                + (traceId != null ? " trace_id=" + traceId : "");
    }
}
