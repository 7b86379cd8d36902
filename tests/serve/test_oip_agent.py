"""serve/torchserve/agent.py: the Java agent jar builds from serve/torchserve/java and is wired into TorchServe's JVM options.

What the agent's classes DO is tested against a real TorchServe in tests/e2e/test_e2e_oip.py.
"""
from __future__ import annotations

import zipfile

import pytest

from serve.torchserve import agent as oip_agent


def test_agent_jar_builds_with_the_replacement_classes(tmp_path):
    jar = oip_agent.build(tmp_path / "oip-agent.jar")
    with zipfile.ZipFile(jar) as archive:
        names = set(archive.namelist())
        manifest = archive.read("META-INF/MANIFEST.MF").decode()
    assert "Premain-Class: oip.OipAgent" in manifest
    assert "oip/OipAgent.class" in names
    for name in oip_agent.REPLACED:
        # Stored as resources, not .class files: on the class path model-server.jar would win.
        assert f"oip-classes/{name}.bin" in names and f"{name}.class" not in names
    # Up to date: a second build leaves the jar alone.
    stamp = jar.stat().st_mtime_ns
    assert oip_agent.build(jar).stat().st_mtime_ns == stamp


def test_agent_replaces_what_the_java_side_lists():
    source = (oip_agent.SOURCES / "OipAgent.java").read_text()
    for name in oip_agent.REPLACED:
        assert f'"{name}"' in source


def test_jvm_options_add_the_agent_once_and_switch_on_oip(tmp_path):
    jar = tmp_path / "a.jar"
    props = oip_agent.jvm_options({"vmargs": "-Xmx1g -javaagent:/old.jar", "x": "1"}, jar)
    assert props["vmargs"] == f"-Xmx1g -javaagent:{jar}"
    assert props["ts_open_inference_protocol"] == "true" and props["x"] == "1"
    assert oip_agent.jvm_options({}, jar)["vmargs"] == f"-javaagent:{jar}"
    # No agent (OIP_AGENT_JAR set empty): TorchServe's own OIP handler, an old agent flag removed.
    assert oip_agent.jvm_options({"vmargs": "-Xmx1g -javaagent:/old.jar"}, None) == {
        "vmargs": "-Xmx1g", "ts_open_inference_protocol": "true"}


def test_prebuilt_jar_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OIP_AGENT_JAR", str(tmp_path / "missing.jar"))
    with pytest.raises(oip_agent.AgentBuildError, match="does not exist"):
        oip_agent.agent_jar()
    (tmp_path / "missing.jar").write_bytes(b"jar")
    assert oip_agent.agent_jar() == tmp_path / "missing.jar"
    for off in ("", "off"):
        monkeypatch.setenv("OIP_AGENT_JAR", off)
        assert oip_agent.agent_jar() is None


def test_agent_patches_batch_aggregator_and_the_class_verifies(tmp_path):
    """The agent's BatchAggregator patch (serve/torchserve/java/HeldJobsPatch.java) applies to the installed TorchServe and
    the patched class passes the JVM's verifier; what it does is tested in tests/reliability/test_dead_worker.py."""
    import shutil
    import subprocess

    from serve.server import java_executable
    from servers import clean_env

    jar = oip_agent.build(tmp_path / "oip-agent.jar")
    with zipfile.ZipFile(jar) as archive:
        assert {"oip/HeldJobs.class", "oip/HeldJobsPatch.class"} <= set(archive.namelist())
    probe = tmp_path / "Probe.java"
    probe.write_text(
        "public class Probe { public static void main(String[] a) throws Exception {\n"
        "  for (String name : a) for (var m : Class.forName(name).getDeclaredMethods())\n"
        "    if (m.getName().startsWith(\"getRequest\") || m.getName().equals(\"sendError\"))\n"
        "      System.out.println(name + \" \" + m.getName() + \" \" + java.lang.reflect.Modifier.toString(m.getModifiers()));\n"
        "}}\n")
    frontend = str(oip_agent.torchserve_jar())
    subprocess.run([shutil.which("javac"), "-d", str(tmp_path), str(probe)], check=True, env=clean_env())
    aggregators = [f"org.pytorch.serve.wlm.{name}" for name in
                   ("BatchAggregator", "SequenceBatching", "ContinuousBatching", "AsyncBatchAggregator")]
    result = subprocess.run(
        [java_executable(), "-Xverify:all", f"-javaagent:{jar}", "-cp", f"{frontend}:{tmp_path}", "Probe", *aggregators],
        capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.split("\n"))
    assert "org.pytorch.serve.wlm.BatchAggregator getRequest$unguarded private" in lines
    assert "org.pytorch.serve.wlm.BatchAggregator getRequest public" in lines
    assert "org.pytorch.serve.wlm.BatchAggregator sendError public synchronized" in lines
    # The subclasses keep their own methods: none gains the rename, their sendError stays as it was.
    subclasses = [line for line in lines if line.startswith(("org.pytorch.serve.wlm.Seq", "org.pytorch.serve.wlm.Cont",
                                                                "org.pytorch.serve.wlm.Async"))]
    assert subclasses and not any("unguarded" in line or "synchronized" in line for line in subclasses), subclasses
    assert "held-jobs patch" not in result.stderr, result.stderr


def test_agent_data_path_patch_applies_and_the_classes_verify(tmp_path):
    """The data-path patch (serve/torchserve/java/DataPathPatch.java) applies to the installed TorchServe's four
    classes and each passes the JVM's verifier: the request encoder gains its allocateBuffer, and no class is
    reported as left unchanged. What the patch does is tested in tests/e2e/test_e2e_datapath.py."""
    import shutil
    import subprocess

    from serve.server import java_executable
    from servers import clean_env

    jar = oip_agent.build(tmp_path / "oip-agent.jar")
    with zipfile.ZipFile(jar) as archive:
        assert {"oip/DataPath.class", "oip/DataPathPatch.class"} <= set(archive.namelist())
    probe = tmp_path / "Probe.java"
    probe.write_text(  # loaded and linked, not initialised (WorkerThread's static init needs a ConfigManager)
        "public class Probe { public static void main(String[] a) throws Exception {\n"
        "  for (String name : a) for (var m : Class.forName(name, false, Probe.class.getClassLoader()).getDeclaredMethods())\n"
        "    System.out.println(name + \" \" + m.getName() + \" \" + java.lang.reflect.Modifier.toString(m.getModifiers()));\n"
        "}}\n")
    frontend = str(oip_agent.torchserve_jar())
    subprocess.run([shutil.which("javac"), "-d", str(tmp_path), str(probe)], check=True, env=clean_env())
    classes = ["org.pytorch.serve.wlm.Model", "org.pytorch.serve.ServerInitializer",
               "org.pytorch.serve.wlm.WorkerThread$1", "org.pytorch.serve.util.codec.ModelRequestEncoder",
               "org.pytorch.serve.wlm.WorkerThread"]
    result = subprocess.run(
        [java_executable(), "-Xverify:all", f"-javaagent:{jar}", "-cp", f"{frontend}:{tmp_path}", "Probe", *classes],
        capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.split("\n"))
    assert "org.pytorch.serve.util.codec.ModelRequestEncoder allocateBuffer protected" in lines
    assert "org.pytorch.serve.wlm.Model pollBatch public" in lines
    assert "data-path patch" not in result.stderr, result.stderr


def test_worker_output_reader_replaces_torchserves_and_reads_metrics_as_its_parser_does(tmp_path):
    """The worker-output reader (serve/torchserve/java/WorkerOutput.java) is defined in place of TorchServe's
    ReaderThread, passes the verifier, and reads every ``[METRICS]`` text as TorchServe's own ``Metric.parse``
    does (the reference): the same metric, or none and the line goes to ``Metric.parse`` itself. The lines our
    workers write must take the fast path. What the reader does in a server: tests/e2e (metrics, worker start)."""
    import shutil
    import subprocess

    from serve.server import java_executable
    from servers import clean_env
    from wire.metric_lines import metric_line

    jar = oip_agent.build(tmp_path / "oip-agent.jar")
    ours = [metric_line("model_stage_duration_seconds", "seconds", 0.000905393, [("model_name", "mnistnet"),
                                                                              ("stage", "decode")], "histogram"),
            metric_line("model_predicted_class_total", "count", 8, [("model_name", "m"), ("class", "7")], "counter"),
            metric_line("PredictionTime", "Milliseconds", 2.99, [("ModelName", "mnistnet"), ("Level", "Model")], "gauge",
                        request_ids="01a2515e-3535-7faa-9eb9-d7789b8f66f9,01a2515e-3536-760d-8510-34850fc6e173"),
            "[METRICS]HandlerTime.Milliseconds:1.2|#ModelName:m,Level:Model|#hostname:vm,1700000000,req-1"]
    others = ["[METRICS]x.ms:1|#|#type:GAUGE|#hostname:h,1", "[METRICS]a b.c d:1e-3|#d:v,w:|#hostname:h,1,",
              "[METRICS] lead.ms:1|#d:v|#hostname:h,1", "[METRICS]x.ms:1|#d:v|#type:A,B|#hostname:h,1",
              "[METRICS]x.ms:1|#d:v|#type:|#hostname:h,1", "[METRICS]x.ms:1|#d:v|#hostname:,1",
              "[METRICS]x.ms:1|#d:v|#hostname:h,", "[METRICS]x.ms:1|#d:v|#hostname:h,,1", "[METRICS]x.ms:|#d|#hostname:h,1",
              "[METRICS]x.ms:1x|#d:v|#hostname:h,1", "[METRICS]x:1|#d:v|#hostname:h,1", "[METRICS]x.ms:1|#d:v|#hostname:h,1,a\u2028b",
              "[METRICS]x.ms:1|#a:b:c,d:e,f|#type:COUNTER|#hostname:h|x,1,r|s", "[METRICS]x.ms:1|#d:v|#junk|#hostname:h,1"]
    lines = [line[len("[METRICS]"):] for line in ours + others]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    probe = tmp_path / "Probe.java"
    probe.write_text(
        "import java.nio.file.*; import org.pytorch.serve.metrics.Metric;\n"
        "public class Probe { static String show(Metric m) { return m == null ? \"null\" : m + \" type=\" + m.getType()\n"
        "  + \" dims=\" + m.getDimensionNames() + m.getDimensionValues(); }\n"
        "public static void main(String[] a) throws Exception {\n"
        "  var fast = Class.forName(\"org.pytorch.serve.wlm.WorkerLifeCycle$ReaderThread\").getDeclaredMethod(\"parse\", String.class);\n"
        "  fast.setAccessible(true);\n"
        "  for (String line : Files.readAllLines(Path.of(a[0]))) {\n"
        "    Metric ours = (Metric) fast.invoke(null, line);\n"
        "    System.out.println((ours == null ? \"fallback \" : show(ours).equals(show(Metric.parse(line))) ? \"same \" : \"DIFFERENT \")\n"
        "      + show(Metric.parse(line)) + \" | ours: \" + show(ours)); } } }\n")
    frontend = str(oip_agent.torchserve_jar())
    subprocess.run([shutil.which("javac"), "-cp", frontend, "-d", str(tmp_path), str(probe)], check=True, env=clean_env())
    result = subprocess.run(
        [java_executable(), "-Xverify:all", f"-javaagent:{jar}", "-cp", f"{frontend}:{tmp_path}", "Probe",
         str(tmp_path / "lines.txt")], capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 0 and "worker-output patch" not in result.stderr, result.stderr
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("same ", "fallback ", "DIFFERENT "))]
    assert len(verdicts) == len(lines) and not [v for v in verdicts if v.startswith("DIFFERENT")], result.stdout
    assert all(v.startswith("same ") and " | ours: null" not in v for v in verdicts[:len(ours)]), result.stdout
    # The probe's lines exercise both paths, and TorchServe's parser refuses some of them (null both ways).
    assert any(v.startswith("fallback null") for v in verdicts) and any(v.startswith("same ") for v in verdicts[len(ours):])
