package oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import com.google.protobuf.ByteString;
import com.google.protobuf.UnsafeByteOperations;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.StreamObserver;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.InferParameter;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.InferTensorContents;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;
import org.pytorch.serve.http.Session;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.metrics.IMetric;
import org.pytorch.serve.metrics.MetricCache;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;

/**
 * One ModelInfer as one job in TorchServe's queue, like {@code POST /v2/models/{m}[/versions/{v}]/infer}
 * with the binary tensor data extension: the worker gets the same headers and body as from REST (a JSON
 * header naming each input's {@code binary_data_size}, every output asked as binary, then the inputs'
 * bytes), so handlers/protocols.py decodes it exactly as the REST binary form. Inputs are checked first
 * (INVALID_ARGUMENT naming the input); the raw inputs are copied once, into that body. The answer's
 * binary outputs become {@code raw_output_contents} as views of the worker's bytes (no copy).
 *
 * <p>Request ID: the caller's {@code x-request-id} metadata, else the request's {@code id}, else a fresh
 * UUID; it goes to the handler as {@code X-Request-ID} and comes back as trailing metadata (errors
 * included). The response's {@code id} is the request's, else the caller's {@code x-request-id}, else empty
 * (as Triton: equal requests get equal answers). The job's own ID is a fresh UUID, as REST's
 * ({@link RequestIds#newId}: it tells the handler when the call arrived, for its queue time).
 * Counted in TorchServe's request, latency and queue metrics like a REST request (ModelStatistics reads them).
 */
final class InferJob extends Job {

    static final String HEADER_LENGTH = "Inference-Header-Content-Length";

    /** ModelInfer calls queued or in a batch and not yet answered: DataPath's batch wait counts them. */
    private static final AtomicInteger IN_FLIGHT = new AtomicInteger();

    private final AtomicBoolean inFlight = new AtomicBoolean();

    private final Call call;
    private final ServerCallStreamObserver<ModelInferResponse> observer;
    private final OipGrpc.CallState state;
    private final List<String> labels;
    /** The caller's usable x-request-id metadata, else null (then the answer's id stays empty, as Triton's). */
    private final String callerId;

    private InferJob(Model model, String version, RequestInput input, Call call,
            StreamObserver<ModelInferResponse> observer, OipGrpc.CallState state) {
        super(model.getModelName(), version, WorkerCommands.PREDICT, input);
        this.call = call;
        this.observer = (ServerCallStreamObserver<ModelInferResponse>) observer;
        this.state = state;
        this.callerId = state.callerId;
        this.labels = Arrays.asList(model.getModelName(), version == null ? "default" : version,
                ConfigManager.getInstance().getHostName());
    }

    /**
     * A ModelInfer as its marshaller leaves it ({@link OipGrpc.InferRequestMarshaller}): the request's names
     * and ID, and the worker's body with its JSON header's length, or the first thing wrong with the request.
     * Made while the parsed message's raw inputs are still views of the received bytes.
     */
    static final class Call {
        final String modelName;
        final String modelVersion;
        final String id;
        final byte[] body;
        final int headerLength;
        final StatusRuntimeException problem;

        private Call(ModelInferRequest request, byte[] body, int headerLength, StatusRuntimeException problem) {
            this.modelName = request.getModelName();
            this.modelVersion = request.getModelVersion();
            this.id = request.getId();
            this.body = body;
            this.headerLength = headerLength;
            this.problem = problem;
        }
    }

    /** Checks the request (name, max_request_size, inputs: in that order) and builds its body: one copy. */
    static Call prepare(ModelInferRequest request) {
        try {
            if (request.getModelName().isEmpty()) {
                throw OipGrpc.error(Status.INVALID_ARGUMENT, "model name is required");
            }
            int cap = ConfigManager.getInstance().getMaxRequestSize();
            if (request.getSerializedSize() > cap) {
                throw OipGrpc.error(Status.RESOURCE_EXHAUSTED, "the request is " + request.getSerializedSize()
                        + " bytes; this server takes at most " + cap + " (max_request_size)");
            }
            int[] headerLength = new int[1];
            byte[] body = body(request, headerLength);
            return new Call(request, body, headerLength[0], null);
        } catch (StatusRuntimeException e) {
            return new Call(request, null, 0, e);
        } catch (RuntimeException e) { // ArithmeticException from a shape's element count and kin
            return new Call(request, null, 0, OipGrpc.error(Status.INVALID_ARGUMENT, e.toString()));
        }
    }

    /** The ModelInfer RPC. */
    static void submit(Call call, StreamObserver<ModelInferResponse> observer) {
        OipGrpc.CallState state = OipGrpc.STATE.get();
        String id = state.requestId;
        if (id == null) {
            id = Session.usableId(call.id);
        }
        state.requestId = id != null ? id : RequestIds.newId();
        try {
            if (call.problem != null) {
                throw call.problem;
            }
            String version = call.modelVersion.isEmpty() ? null : call.modelVersion;
            Model model = OipGrpc.model(call.modelName, call.modelVersion);
            RequestInput input = new RequestInput(RequestIds.newId()); // tells the handler when (queue time)
            input.updateHeaders("content-type", "application/octet-stream");
            input.updateHeaders(HEADER_LENGTH.toLowerCase(), String.valueOf(call.headerLength));
            input.updateHeaders("explain", "False");
            input.updateHeaders("oip-request", "v2");
            input.updateHeaders("x-request-id", state.requestId);
            String traceparent = state.headers.get(OipGrpc.TRACEPARENT);
            if (traceparent != null) {
                input.updateHeaders("traceparent", traceparent);
            }
            input.addParameter(new InputParameter("body", call.body, "application/octet-stream"));
            count("ts_inference_requests_total", Arrays.asList(model.getModelName(),
                    version == null ? "default" : version, ConfigManager.getInstance().getHostName()), 1);
            InferJob job = new InferJob(model, version, input, call, observer, state);
            job.inFlight.set(true);
            IN_FLIGHT.incrementAndGet();
            if (!ModelManager.getInstance().addJob(job)) {
                job.answered();
                throw OipGrpc.error(Status.UNAVAILABLE, "model " + quote(model.getModelName())
                        + " has no worker or its job queue is full; retry later");
            }
        } catch (StatusRuntimeException e) {
            observer.onError(e);
        } catch (Exception e) { // ModelNotFoundException and kin (a model unregistered meanwhile)
            observer.onError(OipGrpc.error(Status.NOT_FOUND, e.getMessage()));
        }
    }

    // ----------------------------------------------------------------------------------- request

    static int elementSize(String datatype) {
        switch (datatype) {
            case "BOOL": case "INT8": case "UINT8": return 1;
            case "INT16": case "UINT16": case "FP16": case "BF16": return 2;
            case "INT32": case "UINT32": case "FP32": return 4;
            case "INT64": case "UINT64": case "FP64": return 8;
            case "BYTES": return 0;
            default: return -1;
        }
    }

    /** The REST binary body of the request: JSON header, then each input's bytes; checked against shapes. */
    static byte[] body(ModelInferRequest request, int[] headerLength) {
        int inputs = request.getInputsCount();
        if (inputs == 0) {
            throw OipGrpc.error(Status.INVALID_ARGUMENT, "the request has no inputs");
        }
        int raws = request.getRawInputContentsCount();
        if (raws != 0 && raws != inputs) {
            throw OipGrpc.error(Status.INVALID_ARGUMENT, raws + " raw_input_contents for " + inputs
                    + " inputs: send one per input, in input order");
        }
        Set<String> names = new HashSet<>();
        JsonArray entries = new JsonArray();
        List<ByteString> blobs = new ArrayList<>(inputs);
        long total = 0;
        for (int index = 0; index < inputs; index++) {
            ModelInferRequest.InferInputTensor tensor = request.getInputs(index);
            String name = tensor.getName();
            String datatype = tensor.getDatatype();
            if (name.isEmpty()) {
                throw invalid("input " + index + " has no name");
            }
            if (!names.add(name)) {
                throw invalid("input '" + name + "' appears more than once");
            }
            int size = elementSize(datatype);
            if (size < 0) {
                throw invalid("input '" + name + "': unknown datatype '" + datatype
                        + "' (one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BF16, BYTES)");
            }
            for (String key : tensor.getParametersMap().keySet()) {
                if (key.startsWith("shared_memory")) {
                    throw invalid("input '" + name + "': shared memory is not supported");
                }
            }
            long count = 1;
            for (long dim : tensor.getShapeList()) {
                if (dim < 0) {
                    throw invalid("input '" + name + "': shape " + tensor.getShapeList() + " has a negative dimension");
                }
                count = Math.multiplyExact(count, Math.max(dim, 0));
            }
            ByteString data;
            if (raws != 0) {
                if (tensor.hasContents() && contentsUsed(tensor.getContents()).size() > 0) {
                    throw invalid("input '" + name + "' has both contents and raw_input_contents; send one or the other");
                }
                data = request.getRawInputContents(index);
                if (size == 0) {
                    checkBytes(name, data, count);
                } else if (data.size() != count * size) {
                    throw invalid("input '" + name + "': " + data.size() + " bytes of raw_input_contents, but shape "
                            + tensor.getShapeList() + " of " + datatype + " needs " + count + " x " + size + " = "
                            + count * size);
                }
            } else {
                data = typedContents(tensor, count);
            }
            JsonObject entry = new JsonObject();
            entry.addProperty("name", name);
            JsonArray shape = new JsonArray();
            tensor.getShapeList().forEach(shape::add);
            entry.add("shape", shape);
            entry.addProperty("datatype", datatype);
            JsonObject params = parameters(tensor.getParametersMap());
            params.addProperty("binary_data_size", data.size());
            entry.add("parameters", params);
            entries.add(entry);
            blobs.add(data);
            total += data.size();
        }
        JsonObject header = new JsonObject();
        if (!request.getId().isEmpty()) {
            header.addProperty("id", request.getId());
        }
        header.add("inputs", entries);
        JsonObject params = parameters(request.getParametersMap());
        if (request.getOutputsCount() > 0) {
            JsonArray outputs = new JsonArray();
            for (ModelInferRequest.InferRequestedOutputTensor output : request.getOutputsList()) {
                JsonObject wanted = new JsonObject();
                wanted.addProperty("name", output.getName());
                JsonObject outputParams = parameters(output.getParametersMap());
                outputParams.addProperty("binary_data", true);
                wanted.add("parameters", outputParams);
                outputs.add(wanted);
            }
            header.add("outputs", outputs);
        } else {
            params.addProperty("binary_data_output", true);
        }
        header.add("parameters", params);
        byte[] json = header.toString().getBytes(StandardCharsets.UTF_8);
        if (total + json.length > Integer.MAX_VALUE - 16) {
            throw invalid("the request's tensors are too large (" + total + " bytes)");
        }
        byte[] body = new byte[json.length + (int) total];
        System.arraycopy(json, 0, body, 0, json.length);
        int offset = json.length;
        for (ByteString blob : blobs) {
            blob.copyTo(body, offset);
            offset += blob.size();
        }
        headerLength[0] = json.length;
        return body;
    }

    private static StatusRuntimeException invalid(String message) {
        return OipGrpc.error(Status.INVALID_ARGUMENT, message);
    }

    static JsonObject parameters(Map<String, InferParameter> params) {
        JsonObject object = new JsonObject();
        for (Map.Entry<String, InferParameter> entry : params.entrySet()) {
            InferParameter p = entry.getValue();
            switch (p.getParameterChoiceCase()) {
                case BOOL_PARAM: object.addProperty(entry.getKey(), p.getBoolParam()); break;
                case INT64_PARAM: object.addProperty(entry.getKey(), p.getInt64Param()); break;
                case STRING_PARAM: object.addProperty(entry.getKey(), p.getStringParam()); break;
                default: break;
            }
        }
        return object;
    }

    /** A BYTES tensor is {@code count} elements, each a 4-byte little-endian length and that many bytes. */
    private static void checkBytes(String name, ByteString data, long count) {
        ByteBuffer buffer = data.asReadOnlyByteBuffer().order(ByteOrder.LITTLE_ENDIAN);
        for (long i = 0; i < count; i++) {
            if (buffer.remaining() < 4) {
                throw invalid("input '" + name + "': BYTES element " + i + " has no 4-byte length");
            }
            long length = Integer.toUnsignedLong(buffer.getInt());
            if (length > buffer.remaining()) {
                throw invalid("input '" + name + "': BYTES element " + i + " says " + length + " bytes, "
                        + buffer.remaining() + " left");
            }
            buffer.position(buffer.position() + (int) length);
        }
        if (buffer.hasRemaining()) {
            throw invalid("input '" + name + "': " + buffer.remaining() + " bytes after the " + count + " BYTES elements");
        }
    }

    private static List<String> contentsUsed(InferTensorContents c) {
        List<String> used = new ArrayList<>();
        if (c.getBoolContentsCount() > 0) used.add("bool_contents");
        if (c.getIntContentsCount() > 0) used.add("int_contents");
        if (c.getInt64ContentsCount() > 0) used.add("int64_contents");
        if (c.getUintContentsCount() > 0) used.add("uint_contents");
        if (c.getUint64ContentsCount() > 0) used.add("uint64_contents");
        if (c.getFp32ContentsCount() > 0) used.add("fp32_contents");
        if (c.getFp64ContentsCount() > 0) used.add("fp64_contents");
        if (c.getBytesContentsCount() > 0) used.add("bytes_contents");
        return used;
    }

    static String contentsField(String datatype) {
        switch (datatype) {
            case "BOOL": return "bool_contents";
            case "INT8": case "INT16": case "INT32": return "int_contents";
            case "INT64": return "int64_contents";
            case "UINT8": case "UINT16": case "UINT32": return "uint_contents";
            case "UINT64": return "uint64_contents";
            case "FP32": return "fp32_contents";
            case "FP64": return "fp64_contents";
            case "BYTES": return "bytes_contents";
            default: return null;
        }
    }

    /** The little-endian bytes of an input given in the typed {@code contents} fields. */
    private static ByteString typedContents(ModelInferRequest.InferInputTensor tensor, long count) {
        String name = tensor.getName();
        String datatype = tensor.getDatatype();
        InferTensorContents c = tensor.getContents();
        List<String> used = contentsUsed(c);
        String expected = contentsField(datatype);
        if (used.isEmpty()) {
            if (count == 0) {
                return ByteString.EMPTY;
            }
            throw invalid("input '" + name + "' has no data: send raw_input_contents or contents."
                    + (expected == null ? "<none>" : expected));
        }
        if (expected == null) {
            throw invalid("input '" + name + "': datatype " + datatype + " can only be sent in raw_input_contents");
        }
        if (!used.equals(List.of(expected))) {
            used.remove(expected);
            throw invalid("input '" + name + "' has datatype " + datatype + ", so its data belongs in contents."
                    + expected + ", not in contents." + String.join(", contents.", used));
        }
        List<?> values;
        switch (expected) {
            case "bool_contents": values = c.getBoolContentsList(); break;
            case "int_contents": values = c.getIntContentsList(); break;
            case "int64_contents": values = c.getInt64ContentsList(); break;
            case "uint_contents": values = c.getUintContentsList(); break;
            case "uint64_contents": values = c.getUint64ContentsList(); break;
            case "fp32_contents": values = c.getFp32ContentsList(); break;
            case "fp64_contents": values = c.getFp64ContentsList(); break;
            default: values = c.getBytesContentsList(); break;
        }
        if (values.size() != count) {
            throw invalid("input '" + name + "': " + values.size() + " values in contents." + expected + ", but shape "
                    + tensor.getShapeList() + " needs " + count);
        }
        if ("BYTES".equals(datatype)) {
            int size = 0;
            for (Object v : values) {
                size += 4 + ((ByteString) v).size();
            }
            ByteBuffer out = ByteBuffer.allocate(size).order(ByteOrder.LITTLE_ENDIAN);
            for (Object v : values) {
                out.putInt(((ByteString) v).size());
                ((ByteString) v).copyTo(out);
            }
            return UnsafeByteOperations.unsafeWrap(out.array());
        }
        int size = elementSize(datatype);
        ByteBuffer out = ByteBuffer.allocate(values.size() * size).order(ByteOrder.LITTLE_ENDIAN);
        for (Object v : values) {
            switch (datatype) {
                case "BOOL": out.put((byte) (((Boolean) v) ? 1 : 0)); break;
                case "FP32": out.putFloat((Float) v); break;
                case "FP64": out.putDouble((Double) v); break;
                case "INT64": case "UINT64": out.putLong((Long) v); break;
                case "UINT32": out.putInt((Integer) v); break;
                case "INT32": out.putInt((Integer) v); break;
                default: { // INT8, INT16, UINT8, UINT16 from 32-bit fields
                    long value = datatype.startsWith("U") ? Integer.toUnsignedLong((Integer) v) : (Integer) v;
                    long min = datatype.startsWith("U") ? 0 : -(1L << (size * 8 - 1));
                    long max = datatype.startsWith("U") ? (1L << (size * 8)) - 1 : (1L << (size * 8 - 1)) - 1;
                    if (value < min || value > max) {
                        throw invalid("input '" + name + "': values of contents." + expected + " out of range for " + datatype);
                    }
                    if (size == 1) {
                        out.put((byte) value);
                    } else {
                        out.putShort((short) value);
                    }
                }
            }
        }
        return UnsafeByteOperations.unsafeWrap(out.array());
    }

    // ---------------------------------------------------------------------------------- response

    @Override
    public void response(byte[] body, CharSequence contentType, int statusCode, String statusPhrase,
            Map<String, String> responseHeaders) {
        answered();
        long now = System.nanoTime();
        count("ts_inference_latency_microseconds", labels, (now - getBegin()) / 1000.0);
        count("ts_queue_latency_microseconds", labels, (getScheduled() - getBegin()) / 1000.0);
        try {
            if (statusCode != 200) {
                fail(statusCode, errorMessage(body, statusCode, statusPhrase));
                return;
            }
            ModelInferResponse result = answer(body, headerLength(responseHeaders));
            try {
                observer.onNext(result);
                observer.onCompleted();
            } catch (IllegalStateException | StatusRuntimeException e) { // cancelled meanwhile
            }
        } catch (StatusRuntimeException e) {
            send(e);
        } catch (RuntimeException e) {
            send(OipGrpc.error(Status.INTERNAL, "unusable answer from the handler: " + e));
        }
    }

    private static int headerLength(Map<String, String> headers) {
        if (headers != null) {
            for (Map.Entry<String, String> e : headers.entrySet()) {
                if (HEADER_LENGTH.equalsIgnoreCase(e.getKey())) {
                    return Integer.parseInt(e.getValue().trim());
                }
            }
        }
        return -1;
    }

    private ModelInferResponse answer(byte[] body, int headerLength) {
        int jsonLength = headerLength < 0 ? body.length : headerLength;
        JsonObject header = JsonParser.parseString(new String(body, 0, jsonLength, StandardCharsets.UTF_8)).getAsJsonObject();
        ModelInferResponse.Builder result = ModelInferResponse.newBuilder()
                .setModelName(call.modelName)
                .setModelVersion(!call.modelVersion.isEmpty() ? call.modelVersion
                        : header.has("model_version") && !header.get("model_version").isJsonNull()
                                ? header.get("model_version").getAsString() : "")
                .setId(!call.id.isEmpty() ? call.id : callerId == null ? "" : callerId);
        if (header.has("parameters") && header.get("parameters").isJsonObject()) {
            for (Map.Entry<String, JsonElement> p : header.getAsJsonObject("parameters").entrySet()) {
                InferParameter value = parameter(p.getValue());
                if (value != null) {
                    result.putParameters(p.getKey(), value);
                }
            }
        }
        int offset = jsonLength;
        for (JsonElement element : header.getAsJsonArray("outputs")) {
            JsonObject output = element.getAsJsonObject();
            String name = output.get("name").getAsString();
            ModelInferResponse.InferOutputTensor.Builder tensor = ModelInferResponse.InferOutputTensor.newBuilder()
                    .setName(name)
                    .setDatatype(output.get("datatype").getAsString());
            for (JsonElement dim : output.getAsJsonArray("shape")) {
                tensor.addShape(dim.getAsLong());
            }
            JsonObject params = output.has("parameters") ? output.getAsJsonObject("parameters") : new JsonObject();
            if (!params.has("binary_data_size")) {
                throw OipGrpc.error(Status.INTERNAL, "the handler returned output '" + name + "' as JSON, not binary");
            }
            int size = params.get("binary_data_size").getAsInt();
            if (size < 0 || offset + size > body.length) {
                throw OipGrpc.error(Status.INTERNAL, "output '" + name + "' says " + size + " bytes; the answer has "
                        + (body.length - offset) + " left");
            }
            for (Map.Entry<String, JsonElement> p : params.entrySet()) {
                if (!"binary_data_size".equals(p.getKey()) && !"binary_data".equals(p.getKey())) {
                    InferParameter value = parameter(p.getValue());
                    if (value != null) {
                        tensor.putParameters(p.getKey(), value);
                    }
                }
            }
            result.addOutputs(tensor);
            result.addRawOutputContents(UnsafeByteOperations.unsafeWrap(body, offset, size));
            offset += size;
        }
        return result.build();
    }

    private static InferParameter parameter(JsonElement value) {
        if (!value.isJsonPrimitive()) {
            return null;
        }
        JsonPrimitive p = value.getAsJsonPrimitive();
        if (p.isBoolean()) {
            return InferParameter.newBuilder().setBoolParam(p.getAsBoolean()).build();
        }
        if (p.isNumber()) {
            double d = p.getAsDouble();
            if (d == Math.rint(d) && Math.abs(d) < 9.2e18) {
                return InferParameter.newBuilder().setInt64Param(p.getAsLong()).build();
            }
            return InferParameter.newBuilder().setStringParam(p.getAsString()).build();
        }
        return InferParameter.newBuilder().setStringParam(p.getAsString()).build();
    }

    /** The handler's {@code error} (TorchServe's own errors say {@code message}), else a short excerpt. */
    private static String errorMessage(byte[] body, int status, String phrase) {
        String text = body == null ? "" : new String(body, StandardCharsets.UTF_8);
        try {
            JsonObject json = JsonParser.parseString(text).getAsJsonObject();
            for (String key : new String[] {"error", "message"}) {
                if (json.has(key) && json.get(key).isJsonPrimitive()) {
                    return json.get(key).getAsString();
                }
            }
        } catch (RuntimeException e) { // not JSON: the text itself
        }
        text = text.strip();
        return text.isEmpty() ? "HTTP " + status + (phrase == null ? "" : " " + phrase)
                : text.substring(0, Math.min(300, text.length()));
    }

    /** The gRPC code of a REST status (what a REST client would have got). */
    static Status statusOf(int http) {
        switch (http) {
            case 400: case 413: case 422: return Status.INVALID_ARGUMENT;
            case 401: return Status.UNAUTHENTICATED;
            case 403: return Status.PERMISSION_DENIED;
            case 404: return Status.NOT_FOUND;
            case 408: case 504: return Status.DEADLINE_EXCEEDED;
            case 429: case 503: return Status.UNAVAILABLE;
            default: return Status.INTERNAL;
        }
    }

    private void fail(int http, String message) {
        send(OipGrpc.error(statusOf(http), message));
    }

    private void send(StatusRuntimeException error) {
        try {
            observer.onError(error);
        } catch (RuntimeException e) { // the call was cancelled meanwhile
        }
    }

    @Override
    public void sendError(int status, String error) {
        answered();
        count("ts_inference_latency_microseconds", labels, (System.nanoTime() - getBegin()) / 1000.0);
        fail(status, error == null ? "HTTP " + status : error);
    }

    /** ModelInfer calls in flight (see {@link #IN_FLIGHT}). */
    static int inFlight() {
        return IN_FLIGHT.get();
    }

    private void answered() {
        if (inFlight.compareAndSet(true, false)) {
            IN_FLIGHT.decrementAndGet();
        }
    }

    @Override
    public boolean isOpen() {
        return !observer.isCancelled();
    }

    private static void count(String metric, List<String> labels, double value) {
        try {
            IMetric m = MetricCache.getInstance().getMetricFrontend(metric);
            if (m != null) {
                m.addOrUpdate(labels, value);
            }
        } catch (RuntimeException e) { // metrics never fail a request
        }
    }

    private static String quote(String text) {
        return new JsonPrimitive(text).toString();
    }
}
