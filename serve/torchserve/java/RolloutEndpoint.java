package oip;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.OutputStream;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.security.MessageDigest;
import java.util.ConcurrentModificationException;
import java.util.List;
import java.util.Map;
import java.util.regex.Pattern;
import org.pytorch.serve.http.StatusResponse;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.ApiUtils;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.wlm.BatchAggregator;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerThread;

/**
 * {@code POST /rollout?op=register|unregister|inflight&...&secret=S} on the management port: the two model-API
 * calls that {@code python -m serve rollout|rollback} needs while {@code enable_model_api=false} keeps
 * TorchServe's own register and unregister refused (405) for everyone, and the count of one version's requests
 * in flight, which the rollout polls until it is 0 before it retires the old version.
 *
 * <p>Accepted only when all of these hold (else a JSON 4xx naming what failed):
 *
 * <ul>
 *   <li>TorchServe's token auth passed (the management key: this runs after its check) and the request came
 *       to the management listener, which is loopback-only in every shipped configuration;
 *   <li>{@code secret} equals the token in {@code rollout.secret} in TorchServe's working directory, a file
 *       the rollout command creates (mode 0600, exclusively: it is also the one-rollout-at-a-time lock) and
 *       deletes when it ends, so outside a rollout nothing is accepted;
 *   <li>register: {@code archive} is a plain file name of a {@code .mar} present in the model store (no
 *       path, no URL), and TorchServe's own {@code allowed_urls} check still runs;
 *   <li>unregister: the version is not the model's default.
 * </ul>
 *
 * <p>{@code inflight} answers {@code queued} (jobs in the version's job queue), {@code held} (inference jobs its
 * worker threads have taken from the queue and not yet answered: the {@code jobs} map of each worker's
 * {@code BatchAggregator}, which a job enters when it is polled for a batch and leaves after its response is
 * written) and {@code inflight}, their sum. TorchServe 0.12 exposes only the first (the management API's
 * {@code pendingRequests}); the second is read by reflection. A job moves from the queue to the map in one
 * step of the worker thread, so a caller that reads 0 twice a few milliseconds apart has seen every request
 * that reached that version answered.
 *
 * Registered through the plugin SDK's {@code ServiceLoader} (the agent jar is on the class path); written for
 * TorchServe 0.12.0 only and refuses on any other version. See docs/security.md, "Rolling out a version".
 */
@Endpoint(
        urlPattern = "rollout",
        endpointType = EndpointTypes.MANAGEMENT,
        description = "register/unregister one model version for python -m serve rollout")
public final class RolloutEndpoint extends ModelServerEndpoint {

    static final String SECRET_FILE = "rollout.secret";
    private static final Pattern ARCHIVE = Pattern.compile("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\\.mar");
    private static final Pattern NAME = Pattern.compile("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        int[] status = {200};
        JsonObject body = new JsonObject();
        try {
            body.addProperty("status", handle(req, body));
        } catch (Refused refused) {
            status[0] = refused.code;
            body.addProperty("code", refused.code);
            body.addProperty("type", "RolloutRefused");
            body.addProperty("message", refused.getMessage());
            body.addProperty("error", refused.getMessage());
        }
        rsp.setStatus(status[0]);
        rsp.setContentType("application/json");
        try (OutputStream out = rsp.getOutputStream()) {
            out.write(body.toString().getBytes(StandardCharsets.UTF_8));
        }
    }

    private static String handle(Request req, JsonObject body) throws Refused {
        List<String> op = req.getParameter("op");
        if (op != null && op.size() == 1 && "inflight".equals(op.get(0))) {
            checkVersion();
            checkSecret(param(req, "secret"));
            return inflight(checked(NAME, param(req, "model"), "model"),
                    checked(NAME, param(req, "version"), "version"), body);
        }
        return change(req);
    }

    private static void checkVersion() throws Refused {
        String version = ConfigManager.getInstance().getVersion();
        if (version == null || !version.startsWith("0.12.0")) {
            throw new Refused(501, "the rollout endpoint is written for TorchServe 0.12.0, this is " + version);
        }
    }

    /** register or unregister, one at a time (an inflight count never waits behind a register). */
    private static synchronized String change(Request req) throws Refused {
        checkVersion();
        checkSecret(param(req, "secret"));
        String op = param(req, "op");
        String model = checked(NAME, param(req, "model"), "model");
        String modelVersion = checked(NAME, param(req, "version"), "version");
        try {
            if ("register".equals(op)) {
                return register(req, model, modelVersion);
            }
            if ("unregister".equals(op)) {
                Model current = ModelManager.getInstance().getDefaultModels().get(model);
                if (current != null && modelVersion.equals(current.getVersion())) {
                    throw new Refused(409, "version " + modelVersion + " is " + model + "'s default; set another "
                            + "default first");
                }
                ApiUtils.unregisterModel(model, modelVersion);
                return model + " version " + modelVersion + " unregistered";
            }
        } catch (Refused refused) {
            throw refused;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new Refused(500, op + " interrupted");
        } catch (Exception e) { // TorchServe's own refusals: unknown model/version, bad archive, load failure
            throw new Refused(400, op + " " + model + " " + modelVersion + " failed: " + e.getMessage());
        }
        throw new Refused(400, "op must be register, unregister or inflight, got " + op);
    }

    private static String inflight(String model, String modelVersion, JsonObject body) throws Refused {
        Model found = find(model, modelVersion);
        if (found == null) {
            throw new Refused(404, model + " version " + modelVersion + " is not served");
        }
        int queued = found.getPendingRequestsInJobQueue(); // first: a job leaves the queue before it is held
        int held = 0;
        for (WorkerThread worker : ModelManager.getInstance().getWorkers(found.getModelVersionName())) {
            held += held(worker);
        }
        body.addProperty("queued", queued);
        body.addProperty("held", held);
        body.addProperty("inflight", queued + held);
        return model + " version " + modelVersion + ": " + (queued + held) + " request(s) in flight";
    }

    /** Inference jobs a worker thread holds: taken from the queue for its batch and not yet answered. */
    private static int held(WorkerThread worker) throws Refused {
        try {
            Object aggregator = field(WorkerThread.class, "aggregator").get(worker);
            if (!(aggregator instanceof BatchAggregator)) {
                return 0;
            }
            Object jobs = field(BatchAggregator.class, "jobs").get(aggregator);
            if (!(jobs instanceof Map)) {
                return 0;
            }
            Map<?, ?> map = (Map<?, ?>) jobs;
            for (int attempt = 0; attempt < 5; attempt++) {
                try { // the worker thread changes the map without a lock: a copy may need another try
                    int count = 0;
                    for (Object job : map.values().toArray()) {
                        count += job instanceof Job && !((Job) job).isControlCmd() ? 1 : 0;
                    }
                    return count;
                } catch (ConcurrentModificationException | NullPointerException e) {
                    Thread.onSpinWait();
                }
            }
            return map.size();
        } catch (ReflectiveOperationException | RuntimeException e) {
            throw new Refused(501, "cannot count the requests held by " + worker.getWorkerId() + ": " + e);
        }
    }

    private static Field field(Class<?> owner, String name) throws NoSuchFieldException {
        Field field = owner.getDeclaredField(name);
        field.setAccessible(true);
        return field;
    }

    private static String register(Request req, String model, String modelVersion) throws Exception {
        String archive = checked(ARCHIVE, param(req, "archive"), "archive");
        Path store = Paths.get(ConfigManager.getInstance().getModelStore());
        if (!Files.isRegularFile(store.resolve(archive))) {
            throw new Refused(404, "archive " + archive + " is not in the model store " + store);
        }
        Model existing = find(model, modelVersion);
        if (existing != null) {
            throw new Refused(409, model + " version " + modelVersion + " is already served");
        }
        int workers = Integer.parseInt(checked(Pattern.compile("[1-9][0-9]?"), param(req, "workers"), "workers"));
        StatusResponse result = ApiUtils.handleRegister(
                archive, model, null, null, -1, -1, -1, -1, workers, true, false, false);
        if (result.getHttpResponseCode() != 200) {
            throw new Refused(result.getHttpResponseCode(), result.getStatus());
        }
        Model loaded = find(model, modelVersion);
        if (loaded == null) { // the archive's manifest names another version: take it back out
            String actual = versionOf(model, archive);
            if (actual != null) {
                ApiUtils.unregisterModel(model, actual);
            }
            throw new Refused(400, archive + " is not " + model + " version " + modelVersion
                    + (actual == null ? "" : " (its manifest says " + actual + "); unregistered it again"));
        }
        return result.getStatus();
    }

    private static Model find(String model, String modelVersion) {
        try {
            return ModelManager.getInstance().getModel(model, modelVersion);
        } catch (Exception e) { // ModelVersionNotFoundException
            return null;
        }
    }

    private static String versionOf(String model, String archive) throws Exception {
        for (java.util.Map.Entry<String, Model> entry : ModelManager.getInstance().getAllModelVersions(model)) {
            if (archive.equals(entry.getValue().getModelUrl())) {
                return entry.getKey();
            }
        }
        return null;
    }

    private static void checkSecret(String given) throws Refused {
        Path file = Paths.get(System.getProperty("user.dir"), SECRET_FILE);
        String expected;
        try {
            String[] fields = Files.readString(file, StandardCharsets.UTF_8).trim().split("\\s+");
            expected = fields[fields.length - 1];
        } catch (NoSuchFileException e) {
            throw new Refused(403, "no rollout is in progress (python -m serve rollout holds the secret)");
        } catch (IOException e) {
            throw new Refused(403, "the rollout secret cannot be read: " + e.getMessage());
        }
        byte[] a = expected.getBytes(StandardCharsets.UTF_8);
        byte[] b = given.getBytes(StandardCharsets.UTF_8);
        if (expected.length() < 32 || !MessageDigest.isEqual(a, b)) {
            throw new Refused(403, "wrong rollout secret");
        }
    }

    private static String param(Request req, String name) throws Refused {
        List<String> values = req.getParameter(name);
        if (values == null || values.size() != 1 || values.get(0).isEmpty()) {
            throw new Refused(400, "query parameter " + name + " is required (once)");
        }
        return values.get(0);
    }

    private static String checked(Pattern pattern, String value, String what) throws Refused {
        if (!pattern.matcher(value).matches()) {
            throw new Refused(400, "bad " + what + " " + value + ": expected " + pattern.pattern());
        }
        return value;
    }

    /** A refusal with its HTTP status. */
    static final class Refused extends Exception {
        final int code;

        Refused(int code, String message) {
            super(message);
            this.code = code;
        }
    }
}
