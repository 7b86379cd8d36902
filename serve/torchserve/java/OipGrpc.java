package oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.protobuf.ByteString;
import com.google.protobuf.CodedInputStream;
import com.google.protobuf.CodedOutputStream;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.protobuf.UnsafeByteOperations;
import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.Detachable;
import io.grpc.ForwardingServerCall;
import io.grpc.Grpc;
import io.grpc.HasByteBuffer;
import io.grpc.KnownLength;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.ProtoUtils;
import io.grpc.stub.ServerCalls;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyResponse;
import org.pytorch.serve.http.api.rest.OpenInferenceProtocolRequestHandler;
import org.pytorch.serve.http.Session;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.TokenAuthorization;
import org.pytorch.serve.wlm.Model;

/**
 * The Open Inference Protocol gRPC service ({@code inference.GRPCInferenceService}, KServe v2, the proto
 * {@code tritonclient.grpc} speaks) inside TorchServe's JVM, on its own grpc-java server at
 * {@code oip_grpc_listen} (HOST:PORT in TorchServe's config, written by serve/server.py; absent or
 * {@code off}: none). TorchServe's model-server.jar ships grpc-java, protobuf and generated classes of the
 * same messages under another package name ({@code org.pytorch.serve.grpc.openinference}); the wire
 * format is the field numbers, so this service registers them under the KServe service name with
 * {@link ProtoUtils} marshallers. ModelStatistics, which TorchServe's proto lacks, is encoded here.
 *
 * <p>{@link DrainPatch} starts it first in {@code ModelServer.startGRPCServers} (after token auth and the
 * models are set up) and {@link Drain} stops it first in {@code ModelServer.stop}: new calls refused,
 * calls in progress answered (workers are still up) for up to {@link Drain#LIMIT_MS}.
 *
 * <p>Every call needs the inference key in {@code authorization} metadata when token auth is on (the same
 * keys as REST; {@code Bearer KEY}), else UNAUTHENTICATED. ModelInfer becomes one job in TorchServe's
 * queue ({@link InferJob}), with the body of a binary REST request; other RPCs answer from the frontend's
 * own state, as the REST surface does (OpenInferenceProtocolRequestHandler). Unknown RPCs: UNIMPLEMENTED.
 */
public final class OipGrpc {

    static final String SERVICE = "inference.GRPCInferenceService";
    static final String LISTEN_PROPERTY = "oip_grpc_listen";
    /** Larger than grpc's 1 MiB default: a 256-image request (800 kB) then flows without window updates. */
    static final int FLOW_CONTROL_WINDOW = 8 << 20;

    static final Metadata.Key<String> AUTHORIZATION = Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    static final Metadata.Key<String> REQUEST_ID = Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);
    static final Metadata.Key<String> TRACEPARENT = Metadata.Key.of("traceparent", Metadata.ASCII_STRING_MARSHALLER);

    /** The call's metadata and the request ID its answer names (x-request-id trailing metadata). */
    static final class CallState {
        final Metadata headers;
        /** The caller's usable x-request-id metadata, else null. */
        final String callerId;
        volatile String requestId;

        CallState(Metadata headers) {
            this.headers = headers;
            this.callerId = Session.usableId(headers.get(REQUEST_ID));
            this.requestId = callerId;
        }
    }

    static final Context.Key<CallState> STATE = Context.key("oip-grpc-call");

    /** TorchServe's access log (logs/access_log.log at SERVE_LOG_LEVEL=info): one line per call, as REST's. */
    private static final org.slf4j.Logger ACCESS_LOG = org.slf4j.LoggerFactory.getLogger("ACCESS_LOG");

    private static volatile Server server;

    private OipGrpc() {}

    // ------------------------------------------------------------------------------------ lifecycle

    /** Called first in {@code ModelServer.startGRPCServers}; throws when the address cannot be bound. */
    public static void start() throws IOException {
        ConfigManager config = ConfigManager.getInstance();
        String listen = config.getProperty(LISTEN_PROPERTY, "").trim();
        if (listen.isEmpty() || "off".equals(listen) || server != null) {
            return;
        }
        int colon = listen.lastIndexOf(':');
        InetSocketAddress address;
        try {
            String host = listen.substring(0, colon).replace("[", "").replace("]", "");
            address = new InetSocketAddress(host, Integer.parseInt(listen.substring(colon + 1)));
        } catch (RuntimeException e) {
            throw new IOException("oip-agent: " + LISTEN_PROPERTY + "=" + listen + " is not HOST:PORT");
        }
        Server built = NettyServerBuilder.forAddress(address)
                // Twice TorchServe's max_request_size: up to that the message is read whole and ModelInfer
                // refuses one above max_request_size with a status the client sees (InferJob); grpc's own
                // refusal resets the stream while the client still sends (the client then reads CANCELLED).
                .maxInboundMessageSize((int) Math.min(Integer.MAX_VALUE, 2L * config.getMaxRequestSize()))
                .flowControlWindow(FLOW_CONTROL_WINDOW)
                .directExecutor() // every RPC only reads frontend state or queues a job: no blocking
                .addService(ServerInterceptors.intercept(definition(), new CallInterceptor()))
                .build();
        try {
            built.start();
        } catch (IOException e) {
            throw new IOException("oip-agent: cannot listen for OIP gRPC on " + listen + ": " + e.getMessage(), e);
        }
        server = built;
        System.err.println("oip-agent: OIP gRPC (" + SERVICE + ") listening on " + listen);
    }

    /** Called from {@link Drain#drain}: refuse new calls, let running ones finish for up to {@code limitMs}. */
    static void drain(long limitMs) {
        Server running = server;
        if (running == null) {
            return;
        }
        try {
            running.shutdown();
            if (!running.awaitTermination(limitMs, TimeUnit.MILLISECONDS)) {
                System.err.println("oip-agent: OIP gRPC calls still running after " + limitMs + " ms; cancelled");
                running.shutdownNow();
            }
        } catch (InterruptedException e) {
            running.shutdownNow();
            Thread.currentThread().interrupt();
        }
    }

    // ------------------------------------------------------------------------------------- service

    private static <Q, R> MethodDescriptor<Q, R> method(
            String name, MethodDescriptor.Marshaller<Q> request, MethodDescriptor.Marshaller<R> response) {
        return MethodDescriptor.<Q, R>newBuilder()
                .setType(MethodDescriptor.MethodType.UNARY)
                .setFullMethodName(MethodDescriptor.generateFullMethodName(SERVICE, name))
                .setRequestMarshaller(request)
                .setResponseMarshaller(response)
                .build();
    }

    private static <M extends Message> MethodDescriptor.Marshaller<M> proto(M instance) {
        return ProtoUtils.marshaller(instance);
    }

    static ServerServiceDefinition definition() {
        return ServerServiceDefinition.builder(SERVICE)
                .addMethod(method("ServerLive", proto(ServerLiveRequest.getDefaultInstance()),
                                proto(ServerLiveResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall((ServerLiveRequest r, StreamObserver<ServerLiveResponse> o) ->
                                answer(o, () -> ServerLiveResponse.newBuilder().setLive(true).build())))
                .addMethod(method("ServerReady", proto(ServerReadyRequest.getDefaultInstance()),
                                proto(ServerReadyResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall((ServerReadyRequest r, StreamObserver<ServerReadyResponse> o) ->
                                answer(o, () -> ServerReadyResponse.newBuilder()
                                        .setReady(OpenInferenceProtocolRequestHandler.notReady().isEmpty()).build())))
                .addMethod(method("ServerMetadata", proto(ServerMetadataRequest.getDefaultInstance()),
                                proto(ServerMetadataResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall((ServerMetadataRequest r, StreamObserver<ServerMetadataResponse> o) ->
                                answer(o, () -> ServerMetadataResponse.newBuilder()
                                        .setName("torchserve")
                                        .setVersion(ConfigManager.getInstance().getVersion())
                                        .addAllExtensions(OpenInferenceProtocolRequestHandler.EXTENSIONS).build())))
                .addMethod(method("ModelReady", proto(ModelReadyRequest.getDefaultInstance()),
                                proto(ModelReadyResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall((ModelReadyRequest r, StreamObserver<ModelReadyResponse> o) ->
                                answer(o, () -> ModelReadyResponse.newBuilder().setReady(
                                        OpenInferenceProtocolRequestHandler.readyWorkers(model(r.getName(), r.getVersion())) > 0)
                                        .build())))
                .addMethod(method("ModelMetadata", proto(ModelMetadataRequest.getDefaultInstance()),
                                proto(ModelMetadataResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall((ModelMetadataRequest r, StreamObserver<ModelMetadataResponse> o) ->
                                answer(o, () -> modelMetadata(model(r.getName(), r.getVersion())))))
                .addMethod(method("ModelInfer", new InferRequestMarshaller(),
                                proto(ModelInferResponse.getDefaultInstance())),
                        ServerCalls.asyncUnaryCall(InferJob::submit))
                .addMethod(method("ModelStatistics", new BytesMarshaller(), new BytesMarshaller()),
                        ServerCalls.asyncUnaryCall(OipGrpc::statistics))
                .build();
    }

    interface Answer<R> {
        R get() throws StatusRuntimeException;
    }

    /** Send what {@code answer} returns, or the status it throws; anything else is INTERNAL. */
    static <R> void answer(StreamObserver<R> observer, Answer<R> answer) {
        R result;
        try {
            result = answer.get();
        } catch (StatusRuntimeException e) {
            observer.onError(e);
            return;
        } catch (RuntimeException e) {
            observer.onError(Status.INTERNAL.withDescription(e.toString()).asRuntimeException());
            return;
        }
        observer.onNext(result);
        observer.onCompleted();
    }

    static StatusRuntimeException error(Status status, String message) {
        return status.withDescription(message).asRuntimeException();
    }

    /** The model (its default version when {@code version} is empty), else NOT_FOUND naming what is served. */
    static Model model(String name, String version) {
        if (name.isEmpty()) {
            throw error(Status.INVALID_ARGUMENT, "model name is required");
        }
        Model model = OpenInferenceProtocolRequestHandler.findModel(name, version.isEmpty() ? null : version);
        if (model == null) {
            throw error(Status.NOT_FOUND, OpenInferenceProtocolRequestHandler.notFound(name, version.isEmpty() ? null : version));
        }
        return model;
    }

    private static ModelMetadataResponse modelMetadata(Model model) {
        JsonObject body = OpenInferenceProtocolRequestHandler.metadata(model);
        ModelMetadataResponse.Builder result = ModelMetadataResponse.newBuilder()
                .setName(model.getModelName())
                .setPlatform(body.has("platform") ? body.get("platform").getAsString() : "");
        for (JsonElement version : body.getAsJsonArray("versions")) {
            result.addVersions(version.getAsString());
        }
        for (String kind : new String[] {"inputs", "outputs"}) {
            JsonArray tensors = body.has(kind) ? body.getAsJsonArray(kind) : new JsonArray();
            for (JsonElement element : tensors) {
                JsonObject tensor = element.getAsJsonObject();
                ModelMetadataResponse.TensorMetadata.Builder meta = ModelMetadataResponse.TensorMetadata.newBuilder()
                        .setName(tensor.get("name").getAsString())
                        .setDatatype(tensor.get("datatype").getAsString());
                for (JsonElement dim : tensor.getAsJsonArray("shape")) {
                    meta.addShape(dim.getAsLong());
                }
                if ("inputs".equals(kind)) {
                    result.addInputs(meta);
                } else {
                    result.addOutputs(meta);
                }
            }
        }
        return result.build();
    }

    // ---------------------------------------------------------------------------------- statistics

    /**
     * ModelStatistics (the statistics extension): request {@code name = 1, version = 2}; the answer is
     * the REST extension's JSON (OpenInferenceProtocolRequestHandler) encoded as Triton's
     * ModelStatisticsResponse, whose messages TorchServe's proto lacks.
     */
    static void statistics(byte[] request, StreamObserver<byte[]> observer) {
        answer(observer, () -> {
            String name = "";
            String version = "";
            try {
                CodedInputStream in = CodedInputStream.newInstance(request);
                for (int tag; (tag = in.readTag()) != 0; ) {
                    if (tag == (1 << 3 | 2)) {
                        name = in.readStringRequireUtf8();
                    } else if (tag == (2 << 3 | 2)) {
                        version = in.readStringRequireUtf8();
                    } else if (!in.skipField(tag)) {
                        break;
                    }
                }
            } catch (IOException e) {
                throw error(Status.INVALID_ARGUMENT, "unreadable ModelStatisticsRequest: " + e.getMessage());
            }
            List<String> names;
            if (name.isEmpty()) {
                names = OpenInferenceProtocolRequestHandler.modelNames();
            } else {
                Model model = model(name, version);
                names = List.of(model.getModelName());
            }
            try {
                java.io.ByteArrayOutputStream bytes = new java.io.ByteArrayOutputStream();
                CodedOutputStream out = CodedOutputStream.newInstance(bytes);
                for (String each : names) {
                    List<String> versions = version.isEmpty()
                            ? OpenInferenceProtocolRequestHandler.versions(each) : List.of(version);
                    for (String v : versions) {
                        out.writeByteArray(1, modelStatistics(OpenInferenceProtocolRequestHandler.modelStatistics(each, v)));
                    }
                }
                out.flush();
                return bytes.toByteArray();
            } catch (IOException e) {
                throw error(Status.INTERNAL, e.toString());
            }
        });
    }

    private static byte[] modelStatistics(JsonObject stats) throws IOException {
        java.io.ByteArrayOutputStream bytes = new java.io.ByteArrayOutputStream();
        CodedOutputStream out = CodedOutputStream.newInstance(bytes);
        out.writeString(1, stats.get("name").getAsString());
        out.writeString(2, stats.get("version").getAsString());
        out.writeUInt64(3, stats.get("last_inference").getAsLong());
        out.writeUInt64(4, stats.get("inference_count").getAsLong());
        out.writeUInt64(5, stats.get("execution_count").getAsLong());
        JsonObject inference = stats.getAsJsonObject("inference_stats");
        java.io.ByteArrayOutputStream inner = new java.io.ByteArrayOutputStream();
        CodedOutputStream infer = CodedOutputStream.newInstance(inner);
        String[] fields = {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"};
        for (int i = 0; i < fields.length; i++) {
            JsonObject duration = inference.getAsJsonObject(fields[i]);
            java.io.ByteArrayOutputStream d = new java.io.ByteArrayOutputStream();
            CodedOutputStream dur = CodedOutputStream.newInstance(d);
            dur.writeUInt64(1, duration.get("count").getAsLong());
            dur.writeUInt64(2, duration.get("ns").getAsLong());
            dur.flush();
            infer.writeByteArray(i + 1, d.toByteArray());
        }
        infer.flush();
        out.writeByteArray(6, inner.toByteArray());
        out.flush();
        return bytes.toByteArray();
    }

    /** Messages kept as their encoded bytes. */
    static final class BytesMarshaller implements MethodDescriptor.Marshaller<byte[]> {
        @Override
        public InputStream stream(byte[] value) {
            return new ByteArrayInputStream(value);
        }

        @Override
        public byte[] parse(InputStream stream) {
            try {
                return stream.readAllBytes();
            } catch (IOException e) {
                throw error(Status.INTERNAL, "cannot read the request: " + e);
            }
        }
    }

    /**
     * ModelInferRequest parsed where grpc received it: with grpc's {@link Detachable} and {@link HasByteBuffer}
     * the message's transport buffers are kept (not copied) and the message is parsed from them with
     * aliasing, so each raw_input_contents is a view of the received bytes; {@link InferJob#prepare} then
     * copies them once, into the worker's body, before the buffers go back to the transport. Without those
     * interfaces the message is read into one array first (then views of that array). The parsed message
     * does not outlive this call: only the names, the ID and the body (or what is wrong) travel on.
     */
    static final class InferRequestMarshaller implements MethodDescriptor.Marshaller<InferJob.Call> {
        @Override
        public InputStream stream(InferJob.Call value) {
            throw new UnsupportedOperationException("the server never sends a ModelInferRequest");
        }

        @Override
        public InferJob.Call parse(InputStream stream) {
            InputStream held = null;
            try {
                ByteString bytes = null;
                if (stream instanceof Detachable && stream instanceof HasByteBuffer
                        && ((HasByteBuffer) stream).byteBufferSupported()) {
                    held = ((Detachable) stream).detach();
                    bytes = views(held);
                }
                if (bytes == null) {
                    InputStream source = held != null ? held : stream;
                    byte[] data;
                    if (source instanceof KnownLength) {
                        data = new byte[source.available()];
                        int read = source.readNBytes(data, 0, data.length);
                        if (read != data.length) {
                            throw new IOException("message ended after " + read + " of " + data.length + " bytes");
                        }
                    } else {
                        data = source.readAllBytes();
                    }
                    bytes = UnsafeByteOperations.unsafeWrap(data);
                }
                // A ByteString's own CodedInputStream counts its bytes immutable: with aliasing, bytes fields
                // are then views (CodedInputStream.newInstance(byte[]) would copy each one).
                CodedInputStream in = bytes.newCodedInput();
                in.enableAliasing(true);
                in.setSizeLimit(Integer.MAX_VALUE);
                return InferJob.prepare(ModelInferRequest.parseFrom(in));
            } catch (InvalidProtocolBufferException e) {
                throw error(Status.INVALID_ARGUMENT, "unreadable ModelInferRequest: " + e.getMessage());
            } catch (IOException e) {
                throw error(Status.INTERNAL, "cannot read the request: " + e);
            } finally {
                if (held != null) {
                    try {
                        held.close(); // the transport's buffers go back; nothing refers to them any more
                    } catch (IOException e) { // nothing to do
                    }
                }
            }
        }

        /**
         * The detached message as views of its transport buffers (marked, so skipping keeps them until
         * {@code close}), or null when they cannot be kept (nothing has been read then).
         */
        private static ByteString views(InputStream held) throws IOException {
            if (!(held instanceof HasByteBuffer) || !held.markSupported()) {
                return null;
            }
            held.mark(Integer.MAX_VALUE);
            List<ByteString> parts = new ArrayList<>();
            for (int left; (left = held.available()) > 0; ) {
                ByteBuffer buffer = ((HasByteBuffer) held).getByteBuffer();
                if (buffer == null || !buffer.hasRemaining()) {
                    held.reset();
                    return null;
                }
                buffer = buffer.slice();
                if (buffer.remaining() > left) {
                    buffer.limit(left);
                }
                parts.add(UnsafeByteOperations.unsafeWrap(buffer));
                long skipped = held.skip(buffer.remaining());
                if (skipped != buffer.remaining()) {
                    throw new IOException("skipped " + skipped + " of " + buffer.remaining() + " bytes");
                }
            }
            return ByteString.copyFrom(parts); // a rope of the views, not a copy
        }
    }

    // -------------------------------------------------------------------------------- interceptor

    /**
     * Token auth (the inference key, as REST) and the call's state; every answer, errors included, carries
     * trailing metadata {@code x-request-id} once the call has one, and writes one access-log line in REST's
     * format: {@code <peer> "gRPC /<method> HTTP/2.0" <gRPC status code> <ms> request_id=<id> [trace_id=<t>]}.
     */
    static final class CallInterceptor implements ServerInterceptor {
        @Override
        public <Q, R> ServerCall.Listener<Q> interceptCall(
                ServerCall<Q, R> call, Metadata headers, ServerCallHandler<Q, R> next) {
            CallState state = new CallState(headers);
            long started = System.currentTimeMillis();
            ServerCall<Q, R> wrapped = new ForwardingServerCall.SimpleForwardingServerCall<Q, R>(call) {
                @Override
                public void close(Status status, Metadata trailers) {
                    String id = state.requestId;
                    if (id != null) {
                        trailers.put(REQUEST_ID, id);
                    }
                    super.close(status, trailers);
                    if (ACCESS_LOG.isInfoEnabled()) {
                        String trace = Session.traceId(headers.get(TRACEPARENT));
                        ACCESS_LOG.info(getAttributes().get(Grpc.TRANSPORT_ATTR_REMOTE_ADDR) + " \"gRPC /"
                                + getMethodDescriptor().getFullMethodName() + " HTTP/2.0\" " + status.getCode().value()
                                + ' ' + (System.currentTimeMillis() - started) + " request_id=" + (id == null ? "-" : id)
                                + (trace != null ? " trace_id=" + trace : ""));
                    }
                }
            };
            if (Boolean.TRUE.equals(TokenAuthorization.isEnabled())) {
                String given = headers.get(AUTHORIZATION);
                String problem = given == null
                        ? "no inference key: send metadata 'authorization: Bearer <key>' (the inference key of key_file.json)"
                        : !TokenAuthorization.checkTokenAuthorization(
                                TokenAuthorization.parseTokenFromBearerTokenHeader(given),
                                TokenAuthorization.TokenType.INFERENCE)
                                ? "the inference key in 'authorization' metadata is wrong or expired (expected 'Bearer <key>')"
                                : null;
                if (problem != null) {
                    wrapped.close(Status.UNAUTHENTICATED.withDescription(problem), new Metadata());
                    return new ServerCall.Listener<Q>() {};
                }
            }
            return Contexts.interceptCall(Context.current().withValue(STATE, state), wrapped, headers, next);
        }
    }

    static byte[] utf8(String text) {
        return text.getBytes(StandardCharsets.UTF_8);
    }
}
