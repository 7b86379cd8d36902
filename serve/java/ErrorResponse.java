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
        this.message = message;
        this.error = message;
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
