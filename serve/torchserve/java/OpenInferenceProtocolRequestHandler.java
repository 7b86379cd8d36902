package org.pytorch.serve.http.api.rest;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.channel.ChannelHandlerContext;
import io.netty.buffer.Unpooled;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.util.AttributeKey;
import io.prometheus.client.Collector;
import io.prometheus.client.CollectorRegistry;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.Enumeration;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.metrics.IMetric;
import org.pytorch.serve.metrics.MetricCache;
import org.pytorch.serve.util.ApiUtils;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.ModelVersionedRefs;
import org.pytorch.serve.wlm.WorkerInitializationException;
import org.pytorch.serve.wlm.WorkerState;
import org.pytorch.serve.wlm.WorkerThread;

/**
 * The Open Inference Protocol REST surface on TorchServe's inference port (loaded in place of
 * TorchServe's own class by serve/java/OipAgent.java; TorchServe adds it to the inference chain when
 * {@code ts_open_inference_protocol=true}). Requests reach it after token authorization and after
 * TorchServe's InferenceRequestHandler, which already sends {@code POST /v2/models/{m}/infer|explain}
 * to the model's handler with the raw body and headers. Everything else under {@code /v2} is here:
 *
 * <pre>
 * GET  /v2                                        server metadata (extensions: binary_tensor_data)
 * GET  /v2/health/live                            200 while the frontend runs
 * GET  /v2/health/ready                           200 when every model has its READY workers, else 400
 * GET  /v2/models/{m}[/versions/{v}]              model metadata (oip_metadata.json in the archive)
 * GET  /v2/models/{m}[/versions/{v}]/ready        200 when that model has a READY worker, else 400
 * POST /v2/models/{m}/versions/{v}/infer|explain  that version's handler, like the unversioned route
 * GET  /v2/models[/{m}[/versions/{v}]]/stats      statistics extension, Triton's format (docs/protocols.md)
 * </pre>
 *
 * Errors are JSON {"error": "...", "code": N, "request_id": "..."} with a 4xx status, as the protocol
 * asks; they carry header X-Request-ID: the caller's, else the ID TorchServe gave the request.
 */
public class OpenInferenceProtocolRequestHandler extends HttpRequestHandlerChain {

    /** Written into every archive by serve/package.py from models/registry.py (ModelSpec.oip_metadata). */
    static final String METADATA_FILE = "oip_metadata.json";

    public static final List<String> EXTENSIONS = Arrays.asList("binary_tensor_data", "statistics");

    /** The caller's X-Request-ID on this connection's current request, for the errors sent here. */
    static final AttributeKey<String> CALLER_REQUEST_ID = AttributeKey.valueOf("oip-caller-request-id");

    public OpenInferenceProtocolRequestHandler() {}

    @Override
    public void handleRequest(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        if (segments.length < 2 || !"v2".equals(segments[1])) {
            chain.handleRequest(ctx, req, decoder, segments);
            return;
        }
        String[] path = Arrays.copyOfRange(segments, 2, segments.length);
        HttpMethod method = req.method();
        String callerId = req.headers().get("X-Request-ID");
        ctx.channel().attr(CALLER_REQUEST_ID).set(
                callerId != null && callerId.matches("[\\x21-\\x7e]{1,128}") ? callerId : null);
        if (path.length == 0) {
            if (requireMethod(ctx, method, HttpMethod.GET)) {
                serverMetadata(ctx);
            }
        } else if (path.length == 2 && "health".equals(path[0])
                && ("live".equals(path[1]) || "ready".equals(path[1]))) {
            if (requireMethod(ctx, method, HttpMethod.GET)) {
                if ("live".equals(path[1])) {
                    JsonObject live = new JsonObject();
                    live.addProperty("live", true);
                    NettyUtils.sendJsonResponse(ctx, live);
                } else {
                    serverReady(ctx);
                }
            }
        } else if (path.length == 2 && "models".equals(path[0]) && "stats".equals(path[1])) {
            if (requireMethod(ctx, method, HttpMethod.GET)) {
                statistics(ctx, null, null);
            }
        } else if ("models".equals(path[0]) && path.length >= 2) {
            modelRequest(ctx, req, path);
        } else {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, "no Open Inference Protocol endpoint at " + decoder.path());
        }
    }

    private void modelRequest(ChannelHandlerContext ctx, FullHttpRequest req, String[] path) {
        String name = path[1];
        String version = null;
        int next = 2;
        if (path.length >= 4 && "versions".equals(path[2])) {
            version = path[3];
            next = 4;
        }
        String action = path.length > next ? path[next] : "";
        if (path.length > next + 1 || (path.length == 3 && "versions".equals(path[2]))) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, "no Open Inference Protocol endpoint at /v2/" + String.join("/", path));
            return;
        }
        Model model = findModel(name, version);
        if (model == null) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, notFound(name, version));
            return;
        }
        switch (action) {
            case "":
                if (requireMethod(ctx, req.method(), HttpMethod.GET)) {
                    modelMetadata(ctx, model);
                }
                break;
            case "ready":
                if (requireMethod(ctx, req.method(), HttpMethod.GET)) {
                    modelReady(ctx, model);
                }
                break;
            case "stats":
                if (requireMethod(ctx, req.method(), HttpMethod.GET)) {
                    statistics(ctx, model.getModelName(), version);
                }
                break;
            case "infer":
            case "explain":
                if (requireMethod(ctx, req.method(), HttpMethod.POST)) {
                    predict(ctx, req, model, "explain".equals(action));
                }
                break;
            default:
                sendError(ctx, HttpResponseStatus.NOT_FOUND, "unknown model endpoint " + quote(action)
                        + "; use ready, stats, infer or explain");
        }
    }

    // ------------------------------------------------------------------------------- health, metadata

    private static void serverMetadata(ChannelHandlerContext ctx) {
        JsonObject body = new JsonObject();
        body.addProperty("name", "torchserve");
        body.addProperty("version", ConfigManager.getInstance().getVersion());
        JsonArray extensions = new JsonArray();
        EXTENSIONS.forEach(extensions::add);
        body.add("extensions", extensions);
        NettyUtils.sendJsonResponse(ctx, body);
    }

    /** What keeps the server from being ready ("model/version (n of m workers READY)"); empty when ready. */
    public static List<String> notReady() {
        List<String> waiting = new ArrayList<>();
        ModelManager manager = ModelManager.getInstance();
        for (Map.Entry<String, ModelVersionedRefs> entry : manager.getAllModels()) {
            for (Map.Entry<String, Model> version : entry.getValue().getAllVersions()) {
                Model model = version.getValue();
                int healthy = readyWorkers(model);
                int needed = Math.max(1, model.getMinWorkers());
                if (healthy < needed) {
                    waiting.add(entry.getKey() + "/" + version.getKey() + " (" + healthy + " of " + needed + " workers READY)");
                }
            }
        }
        return waiting;
    }

    private static void serverReady(ChannelHandlerContext ctx) {
        List<String> waiting = notReady();
        JsonObject body = new JsonObject();
        body.addProperty("ready", waiting.isEmpty());
        if (!waiting.isEmpty()) {
            body.addProperty("error", "not ready: " + String.join(", ", waiting));
        }
        NettyUtils.sendJsonResponse(ctx, body, waiting.isEmpty() ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
    }

    private static void modelReady(ChannelHandlerContext ctx, Model model) {
        int healthy = readyWorkers(model);
        JsonObject body = new JsonObject();
        body.addProperty("name", model.getModelName());
        body.addProperty("version", model.getVersion());
        body.addProperty("ready", healthy > 0);
        if (healthy == 0) {
            body.addProperty("error", "model " + quote(model.getModelName()) + " has no READY worker yet");
        }
        NettyUtils.sendJsonResponse(ctx, body, healthy > 0 ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
    }

    private static void modelMetadata(ChannelHandlerContext ctx, Model model) {
        NettyUtils.sendJsonResponse(ctx, metadata(model));
    }

    /** The model metadata answer: oip_metadata.json of the archive, its name and every served version. */
    public static JsonObject metadata(Model model) {
        JsonObject body;
        Path file = model.getModelDir().toPath().resolve(METADATA_FILE);
        try {
            body = JsonParser.parseString(new String(Files.readAllBytes(file), StandardCharsets.UTF_8)).getAsJsonObject();
        } catch (IOException | RuntimeException e) {
            // An archive built without serve/package.py: say what TorchServe knows.
            body = new JsonObject();
            body.addProperty("platform", "pytorch_torchserve");
            body.add("inputs", new JsonArray());
            body.add("outputs", new JsonArray());
        }
        body.addProperty("name", model.getModelName());
        JsonArray versions = new JsonArray();
        versions(model.getModelName()).forEach(versions::add);
        body.add("versions", versions);
        return body;
    }

    /** The NOT_FOUND message for a model or version that is not served, naming what is. */
    public static String notFound(String name, String version) {
        return version == null
                ? "model " + quote(name) + " is not served; served models: " + String.join(", ", modelNames())
                : "model " + quote(name) + " has no version " + quote(version) + "; served versions: "
                        + String.join(", ", versions(name));
    }

    // ----------------------------------------------------------------------------------- inference

    /** Same as TorchServe's own {@code POST /v2/models/{m}/infer}, for an explicit version. */
    private static void predict(ChannelHandlerContext ctx, FullHttpRequest req, Model model, boolean explain) {
        RequestInput input = new RequestInput(NettyUtils.getRequestId(ctx.channel()));
        for (Map.Entry<String, String> header : req.headers().entries()) {
            input.updateHeaders(header.getKey(), header.getValue());
        }
        input.updateHeaders("explain", explain ? "True" : "False");
        input.updateHeaders("oip-request", "v2"); // handlers/protocols.py: only OIP is spoken here
        input.addParameter(new InputParameter("body", NettyUtils.getBytes(req.content()), HttpUtil.getMimeType(req)));
        input.setClientExpireTS(model.getClientTimeoutInMills());
        IMetric requests = MetricCache.getInstance().getMetricFrontend("ts_inference_requests_total");
        if (requests != null) {
            requests.addOrUpdate(
                    Arrays.asList(model.getModelName(), model.getVersion(), ConfigManager.getInstance().getHostName()), 1);
        }
        try {
            ApiUtils.addRESTInferenceJob(ctx, model.getModelName(), model.getVersion(), input);
        } catch (ModelNotFoundException | ModelVersionNotFoundException e) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, e.getMessage());
        }
    }

    // ---------------------------------------------------------------------------------- statistics

    /**
     * The statistics extension in Triton's format, from what the frontend's Prometheus registry holds
     * (metrics_mode=prometheus with serve/metrics.yaml): TorchServe's request, latency and queue counters
     * per model version, and the handler's per-batch stage durations and rejections per model
     * (handlers/metrics.py). {@code name} null: every model; {@code version} null: every version.
     */
    private static void statistics(ChannelHandlerContext ctx, String name, String version) {
        JsonArray stats = new JsonArray();
        List<String> names = name == null ? modelNames() : Collections.singletonList(name);
        for (String model : names) {
            List<String> modelVersions = version == null ? versions(model) : Collections.singletonList(version);
            for (String v : modelVersions) {
                stats.add(modelStatistics(model, v));
            }
        }
        JsonObject body = new JsonObject();
        body.add("model_stats", stats);
        NettyUtils.sendJsonResponse(ctx, body);
    }

    public static JsonObject modelStatistics(String name, String version) {
        // Per version (TorchServe's counters).
        long requests = (long) sum("ts_inference_requests_total", name, version, null);
        double latencyUs = sum("ts_inference_latency_microseconds", name, version, null);
        double queueUs = sum("ts_queue_latency_microseconds", name, version, null);
        // Per model name (the handler's metrics have no version label).
        long failed = (long) sum("model_rejected_inputs_total", name, null, null);
        long batches = (long) sum("model_stage_duration_seconds_count", name, null, "decode");
        JsonObject inference = new JsonObject();
        inference.add("success", duration(Math.max(0, requests - failed), latencyUs * 1e3));
        inference.add("fail", duration(failed, 0));
        inference.add("queue", duration(requests, queueUs * 1e3));
        inference.add("compute_input", duration(batches, sum("model_stage_duration_seconds_sum", name, null, "decode") * 1e9));
        inference.add("compute_infer", duration(
                (long) sum("model_stage_duration_seconds_count", name, null, "forward")
                        + (long) sum("model_stage_duration_seconds_count", name, null, "explain"),
                (sum("model_stage_duration_seconds_sum", name, null, "forward")
                        + sum("model_stage_duration_seconds_sum", name, null, "explain")) * 1e9));
        inference.add("compute_output", duration(
                (long) sum("model_stage_duration_seconds_count", name, null, "encode"),
                sum("model_stage_duration_seconds_sum", name, null, "encode") * 1e9));
        inference.add("cache_hit", duration(0, 0));
        inference.add("cache_miss", duration(0, 0));
        JsonObject stats = new JsonObject();
        stats.addProperty("name", name);
        stats.addProperty("version", version);
        stats.addProperty("last_inference", 0);
        stats.addProperty("inference_count", requests);
        stats.addProperty("execution_count", batches);
        stats.add("inference_stats", inference);
        stats.add("batch_stats", new JsonArray());
        return stats;
    }

    private static JsonObject duration(long count, double ns) {
        JsonObject stat = new JsonObject();
        stat.addProperty("count", count);
        stat.addProperty("ns", (long) ns);
        return stat;
    }

    /**
     * The sum of the registry's samples called {@code sample} whose label model_name is {@code name} and,
     * when given, model_version is {@code version} and stage is {@code stage}; 0 when there are none.
     */
    private static double sum(String sample, String name, String version, String stage) {
        double total = 0;
        Enumeration<Collector.MetricFamilySamples> families = CollectorRegistry.defaultRegistry.metricFamilySamples();
        while (families.hasMoreElements()) {
            for (Collector.MetricFamilySamples.Sample s : families.nextElement().samples) {
                if (sample.equals(s.name) && name.equals(label(s, "model_name"))
                        && (version == null || version.equals(versionOf(name, label(s, "model_version"))))
                        && (stage == null || stage.equals(label(s, "stage")))) {
                    total += s.value;
                }
            }
        }
        return total;
    }

    /** TorchServe labels a request to the unversioned route with version "default": the default version. */
    private static String versionOf(String name, String labelled) {
        if (!"default".equals(labelled)) {
            return labelled;
        }
        Model model = findModel(name, null);
        return model == null ? labelled : model.getVersion();
    }

    private static String label(Collector.MetricFamilySamples.Sample sample, String key) {
        int i = sample.labelNames.indexOf(key);
        return i < 0 ? null : sample.labelValues.get(i);
    }

    // -------------------------------------------------------------------------------------- helpers

    /** Workers that have loaded the model: what the management API reports as READY. */
    public static int readyWorkers(Model model) {
        int ready = 0;
        for (WorkerThread worker : ModelManager.getInstance().getWorkers(model.getModelVersionName())) {
            if (worker.isRunning() && worker.getState() == WorkerState.WORKER_MODEL_LOADED) {
                ready++;
            }
        }
        return ready;
    }

    public static Model findModel(String name, String version) {
        try {
            return ModelManager.getInstance().getModel(name, version);
        } catch (ModelVersionNotFoundException | RuntimeException e) {
            return null;
        }
    }

    public static List<String> modelNames() {
        List<String> names = new ArrayList<>();
        for (Map.Entry<String, ModelVersionedRefs> entry : ModelManager.getInstance().getAllModels()) {
            names.add(entry.getKey());
        }
        Collections.sort(names);
        return names;
    }

    public static List<String> versions(String name) {
        List<String> versions = new ArrayList<>();
        try {
            for (Map.Entry<String, Model> entry : ModelManager.getInstance().getAllModelVersions(name)) {
                versions.add(entry.getKey());
            }
        } catch (ModelNotFoundException e) {
            return versions;
        }
        Collections.sort(versions);
        return versions;
    }

    private static boolean requireMethod(ChannelHandlerContext ctx, HttpMethod method, HttpMethod expected) {
        if (expected.equals(method)) {
            return true;
        }
        sendError(ctx, HttpResponseStatus.METHOD_NOT_ALLOWED, "use " + expected + " here, not " + method);
        return false;
    }

    private static void sendError(ChannelHandlerContext ctx, HttpResponseStatus status, String message) {
        String requestId = ctx.channel().attr(CALLER_REQUEST_ID).get();
        if (requestId == null) {
            requestId = NettyUtils.getRequestId(ctx.channel());
        }
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        body.addProperty("code", status.code());
        body.addProperty("request_id", requestId);
        FullHttpResponse resp = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status,
                Unpooled.copiedBuffer(body.toString() + "\n", StandardCharsets.UTF_8));
        resp.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        if (requestId != null) {
            resp.headers().set("X-Request-ID", requestId);
        }
        NettyUtils.sendHttpResponse(ctx, resp, true);
    }

    private static String quote(String text) {
        JsonElement element = new com.google.gson.JsonPrimitive(text);
        return element.toString();
    }
}
