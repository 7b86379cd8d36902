package org.pytorch.serve.http;

/**
 * TorchServe's JSON error body, loaded in place of TorchServe's own class by serve/java/OipAgent.java:
 * the same {@code code}, {@code type} and {@code message}, plus {@code error} (= message), the key
 * Open Inference Protocol clients such as tritonclient read, so that every TorchServe error (unknown
 * model, full queue, worker died) reads the same through either protocol.
 */
public class ErrorResponse {

    private int code;
    private String type;
    private String message;
    private String error;

    public ErrorResponse() {}

    public ErrorResponse(int code, String message) {
        this(code, null, message);
    }

    public ErrorResponse(int code, String type, String message) {
        this.code = code;
        this.type = type;
        this.message = busyMessage(code, message);
        this.error = this.message;
    }

    /**
     * TorchServe answers a full job queue with 503 "Model X has no worker to serve inference request.
     * Please use scale workers API to add workers...", which sends users looking for dead workers when
     * the model is merely busy: say what happened and what to do.
     */
    static String busyMessage(int code, String message) {
        String marker = " has no worker to serve inference request";
        if (code != 503 || message == null || !message.contains(marker)) {
            return message;
        }
        String model = message.substring(0, message.indexOf(marker)).replaceFirst("^Model ", "");
        return "model " + model + " is busy: its job queue (job_queue_size) is full or no worker is READY;"
                + " retry with backoff";
    }

    public int getCode() {
        return code;
    }

    public String getType() {
        return type;
    }

    public String getMessage() {
        return message;
    }

    public String getError() {
        return error;
    }
}
