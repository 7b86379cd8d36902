package org.pytorch.serve.wlm;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.pytorch.serve.metrics.Dimension;
import org.pytorch.serve.metrics.IMetric;
import org.pytorch.serve.metrics.Metric;
import org.pytorch.serve.metrics.MetricCache;
import org.pytorch.serve.util.ConfigManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The thread that reads one Python worker's stdout or stderr: TorchServe 0.12's
 * {@code WorkerLifeCycle.ReaderThread}, which the agent defines from this class (renamed as the jar is built,
 * serve/torchserve/agent.py; javac cannot compile a nested class's replacement under its name) when
 * TorchServe is 0.12.0 (WorkerOutputPatch). It does
 * what TorchServe's does, line by line: a {@code [METRICS]} line updates its backend metric (Prometheus),
 * "Torch worker started." and {@code [PID]n} tell the life cycle, any other line goes to MODEL_LOG (INFO from
 * stdout, WARN from stderr). TorchServe's reads lines with a {@link java.util.Scanner} and matches each with
 * three regular expressions and each metric with a fourth: under load that thread took 14-50 % of the
 * frontend's CPU (JFR, bench/README.md "Request IDs"), varying with how the JIT compiled the regex. Here
 * lines come from a {@link BufferedReader} and are told apart by their prefix; a metric line in the form our
 * workers write (wire/metric_lines.py) is cut at its separators, and any other goes to TorchServe's own
 * {@link Metric#parse}, so both read the same lines the same way.
 */
final class WorkerOutput extends Thread {

    private static final Logger LOG = LoggerFactory.getLogger(WorkerLifeCycle.class);
    private static final Logger MODEL_LOG = LoggerFactory.getLogger("MODEL_LOG");
    private static final String METRICS = "[METRICS]";
    private static final String INFO = "INFO > ";
    private static final String STARTED = "Torch worker started"; // and any one character (TorchServe's regex)
    private static final Pattern PID = Pattern.compile("^(INFO > )?(\\[PID])(\\d+)$");

    private final MetricCache metricCache = MetricCache.getInstance();
    private final InputStream is;
    private final boolean error;
    private final WorkerLifeCycle lifeCycle;

    public WorkerOutput(String name, InputStream is, boolean error, WorkerLifeCycle lifeCycle) {
        super(name + (error ? "-stderr" : "-stdout"));
        this.is = is;
        this.error = error;
        this.lifeCycle = lifeCycle;
    }

    @Override
    public void run() {
        try (BufferedReader reader = new BufferedReader(new InputStreamReader(is, StandardCharsets.UTF_8), 1 << 16)) {
            String line;
            while ((line = reader.readLine()) != null) {
                int metric = line.startsWith(METRICS) ? METRICS.length()
                        : line.startsWith(INFO + METRICS) ? INFO.length() + METRICS.length() : -1;
                if (metric >= 0) {
                    LOG.info("result={}, pattern={}", line, METRICS);
                    update(line, metric);
                    continue;
                }
                int length = line.length();
                if (length > STARTED.length() && line.startsWith(STARTED, length - STARTED.length() - 1)) {
                    lifeCycle.setSuccess(true);
                } else if (line.startsWith("[PID]") || line.startsWith(INFO + "[PID]")) {
                    Matcher pid = PID.matcher(line);
                    if (pid.matches()) {
                        lifeCycle.setPid(Integer.parseInt(pid.group(3)));
                    }
                }
                if (error) {
                    MODEL_LOG.warn(line);
                } else {
                    MODEL_LOG.info(line);
                }
            }
        } catch (IOException e) { // the stream closed under it: the end, as TorchServe's Scanner takes it
            LOG.debug("{}: {}", getName(), e.toString());
        } catch (RuntimeException e) {
            LOG.error("Couldn't create scanner - {}", getName(), e);
        } finally {
            LOG.info("Stopped Scanner - {}", getName());
            lifeCycle.setSuccess(false);
            try {
                is.close();
            } catch (IOException e) {
                LOG.error("Failed to close stream for thread {}", getName(), e);
            }
        }
    }

    /** The backend metric of {@code line}'s {@code [METRICS]} text (from index {@code start}) takes its value. */
    private void update(String line, int start) {
        String text = line.substring(start);
        Metric metric = parse(text);
        if (metric == null) {
            metric = Metric.parse(text);
        }
        if (metric == null) {
            LOG.error("Failed to parse metrics line: \"{}\".", line);
            return;
        }
        try {
            if (metricCache.getMetricBackend(metric.getMetricName()) == null) {
                if (!ConfigManager.getInstance().isModelMetricsAutoDetectEnabled()) {
                    return;
                }
                LOG.info("Registering auto detected backend metric: {}", metric);
                metricCache.addAutoDetectMetricBackend(metric);
            }
            List<String> dimensions = metric.getDimensionValues();
            dimensions.add(metric.getHostName());
            IMetric backend = metricCache.getMetricBackend(metric.getMetricName());
            backend.addOrUpdate(dimensions, metric.getRequestId(), Double.parseDouble(metric.getValue()));
        } catch (Exception e) {
            LOG.error("Failed to update backend metric ", metric.getMetricName(), ": ", e);
        }
    }

    /**
     * {@code text} as {@link Metric#parse} reads it, for the lines whose parts it can cut without a regular
     * expression ({@code name.unit:value|#dims|#type:TYPE|#hostname:host,timestamp[,request ids]}, TYPE part
     * optional); null for anything else, which then goes to {@link Metric#parse}.
     */
    static Metric parse(String text) {
        int n = text.length();
        int dot = 0;
        while (dot < n && wordOrSpace(text.charAt(dot))) {
            dot++;
        }
        if (dot == 0 || dot == n || text.charAt(dot) != '.' || space(text.charAt(0))) {
            return null; // leading white space: Metric.parse's \s* and [\w\s]+ share it
        }
        int colon = dot + 1;
        while (colon < n && wordOrSpace(text.charAt(colon))) {
            colon++;
        }
        if (colon == dot + 1 || colon == n || text.charAt(colon) != ':') {
            return null;
        }
        int end = colon + 1;
        while (end < n && valueChar(text.charAt(end))) {
            end++;
        }
        if (end == colon + 1 || !text.startsWith("|#", end)) {
            return null;
        }
        int bar = text.indexOf('|', end + 2);
        if (bar < 0) {
            return null;
        }
        String dimensions = text.substring(end + 2, bar);
        String type = null;
        int host = bar;
        if (text.startsWith("|#type:", bar)) {
            int typeEnd = bar + 7;
            while (typeEnd < n && text.charAt(typeEnd) != '|' && text.charAt(typeEnd) != ',') {
                typeEnd++;
            }
            if (typeEnd == bar + 7) {
                return null;
            }
            type = text.substring(bar + 7, typeEnd);
            host = typeEnd;
        }
        if (!text.startsWith("|#hostname:", host)) {
            return null;
        }
        int hostStart = host + 11;
        int comma = text.indexOf(',', hostStart);
        if (comma <= hostStart || comma + 1 == n || text.charAt(comma + 1) == ',') {
            return null;
        }
        int stampEnd = text.indexOf(',', comma + 1);
        String requestId = stampEnd < 0 ? null : text.substring(stampEnd + 1);
        if (requestId != null && !noLineBreak(requestId)) {
            return null; // Metric.parse's (.*) stops at one
        }
        Metric metric = new Metric();
        metric.setMetricName(text.substring(0, dot));
        metric.setUnit(text.substring(dot + 1, colon));
        metric.setValue(text.substring(colon + 1, end));
        metric.setType(type);
        metric.setHostName(text.substring(hostStart, comma));
        metric.setTimestamp(stampEnd < 0 ? text.substring(comma + 1) : text.substring(comma + 1, stampEnd));
        metric.setRequestId(requestId);
        String[] pairs = dimensions.split(",");
        List<Dimension> parsed = new ArrayList<>(pairs.length);
        for (String pair : pairs) {
            String[] nameValue = pair.split(":");
            if (nameValue.length == 2) {
                parsed.add(new Dimension(nameValue[0], nameValue[1]));
            }
        }
        metric.setDimensions(parsed);
        return metric;
    }

    private static boolean space(char c) { // regex \s
        return c == ' ' || c == '\t' || c == '\n' || c == 0x0B || c == '\f' || c == '\r';
    }

    private static boolean wordOrSpace(char c) { // regex [\w\s]
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || space(c);
    }

    private static boolean valueChar(char c) { // regex [0-9\-,.e]
        return (c >= '0' && c <= '9') || c == '-' || c == ',' || c == '.' || c == 'e';
    }

    private static boolean noLineBreak(String s) { // what regex . matches (no DOTALL)
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '\n' || c == '\r' || c == '\u0085' || c == '\u2028' || c == '\u2029') {
                return false;
            }
        }
        return true;
    }
}
