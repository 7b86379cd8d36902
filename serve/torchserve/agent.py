"""Build ``oip-agent.jar``, the Java agent that gives TorchServe the whole Open Inference Protocol REST surface.

``serve/torchserve/java/`` holds three replacement frontend classes and the agent that loads them in place
of TorchServe's own (what they replace and why: docs/torchserve-patches.md; ``OipAgent.java`` says why an
agent rather than an endpoint plugin). ``serve start`` adds ``-javaagent:<jar>`` to the JVM options and
``ts_open_inference_protocol=true`` (:func:`jvm_options`), in the container too.

    python -m serve.torchserve.agent [--out build/oip-agent.jar]   # build (or rebuild when sources changed)

Needs ``javac`` (a JDK 17: ``apt-get install -y openjdk-17-jdk-headless``) the first time only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from paths import BUILD_DIR

SOURCES = Path(__file__).resolve().parent / "java"
DEFAULT_JAR = BUILD_DIR / "oip-agent.jar"
AGENT_CLASS = "oip/OipAgent"
JDK_ASM = "jdk.internal.org.objectweb.asm"  # the JDK's ASM copy the BatchAggregator patch uses
# Classes defined from the jar in place of TorchServe's (must match OipAgent.REPLACED).
REPLACED = (
    "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler",
    "org/pytorch/serve/http/ErrorResponse",
    "org/pytorch/serve/http/Session",
)

# Classes compiled under a name of their own and stored under TorchServe's (the one constant naming the class
# rewritten, renamed_class): javac cannot compile a replacement of a nested class under its binary name.
# WorkerOutputPatch defines it in place of TorchServe's when the version guard allows.
RENAMED = {"org/pytorch/serve/wlm/WorkerOutput": "org/pytorch/serve/wlm/WorkerLifeCycle$ReaderThread"}

# Plugin-SDK services of classes in the agent's package (stored as plain .class entries with it): the rollout
# endpoint (RolloutEndpoint.java, docs/security.md "Rolling out a version").
SERVICES = {"org.pytorch.serve.servingsdk.ModelServerEndpoint": "oip.RolloutEndpoint"}

JDK_HELP = (
    "building the OIP agent needs javac from a JDK 17 (a JRE is not enough):\n"
    "  Debian/Ubuntu: apt-get install -y openjdk-17-jdk-headless\n"
    "or build the jar elsewhere and pass it with OIP_AGENT_JAR=/path/oip-agent.jar"
)


class AgentBuildError(RuntimeError):
    """The agent jar could not be built; says why and how to fix it."""


def torchserve_jar() -> Path:
    """The installed TorchServe frontend jar the agent compiles against."""
    import ts

    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise AgentBuildError(f"TorchServe's frontend jar is missing ({jar}); reinstall torchserve")
    return jar


def _stale(jar: Path, inputs: list[Path]) -> bool:
    if not jar.is_file():
        return True
    built = jar.stat().st_mtime
    return any(path.stat().st_mtime > built for path in inputs)


def build(out: Path = DEFAULT_JAR, force: bool = False) -> Path:
    """Compile ``serve/torchserve/java`` against TorchServe's jar into ``out`` (atomically); skipped when up to date."""
    out = Path(out)
    sources = sorted(SOURCES.glob("*.java"))
    frontend = torchserve_jar()
    if not force and not _stale(out, sources + [frontend]):
        return out
    javac = shutil.which("javac", path=os.path.join(os.environ["JAVA_HOME"], "bin")) if os.environ.get("JAVA_HOME") else None
    javac = javac or shutil.which("javac")
    if not javac:
        raise AgentBuildError(JDK_HELP)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oip-agent-") as tmp:
        classes = Path(tmp) / "classes"
        result = subprocess.run(
            # Not --release: it forbids the export of the JDK's internal ASM (java/HeldJobsPatch.java).
            [javac, "-source", "17", "-target", "17", "-nowarn", "--add-exports", f"java.base/{JDK_ASM}=ALL-UNNAMED",
             "-cp", str(frontend), "-d", str(classes), *map(str, sources)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise AgentBuildError(f"javac failed:\n{result.stdout}{result.stderr}")
        partial = out.with_name(out.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as jar:
            jar.writestr("META-INF/MANIFEST.MF", f"Manifest-Version: 1.0\nPremain-Class: {AGENT_CLASS.replace('/', '.')}\n\n")
            for agent_class in sorted((classes / AGENT_CLASS).parent.glob("*.class")):  # the agent's own package
                jar.write(agent_class, agent_class.relative_to(classes).as_posix())
            for name in REPLACED:
                # Not stored as .class: the agent jar joins the class path, where model-server.jar comes first.
                jar.write(classes / f"{name}.class", f"oip-classes/{name}.bin")
            for name, stored in RENAMED.items():
                data = renamed_class((classes / f"{name}.class").read_bytes(), name, stored)
                jar.writestr(f"oip-classes/{stored}.bin", data)
            for service, provider in SERVICES.items():
                jar.writestr(f"META-INF/services/{service}", provider + "\n")
        os.replace(partial, out)
    return out


_CONSTANT_SIZES = {3: 4, 4: 4, 5: 8, 6: 8, 7: 2, 8: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2, 17: 4, 18: 4,
                   19: 2, 20: 2}  # constant pool tag -> bytes after it (1, Utf8: a u2 length and the bytes)


def renamed_class(data: bytes, old: str, new: str) -> bytes:
    """Class file ``data`` of class ``old`` (internal name) as class ``new``: the constant pool's Utf8 entry
    ``old`` rewritten (every reference to the class goes through it). Refuses a class whose descriptors name
    it (``Lold;``), which would need a full remap."""
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise AgentBuildError(f"{old}.class is not a class file")
    count = int.from_bytes(data[8:10], "big")
    out, pos, index, hits = [data[:10]], 10, 1, 0
    while index < count:
        tag = data[pos]
        if tag == 1:
            length = int.from_bytes(data[pos + 1:pos + 3], "big")
            text = data[pos + 3:pos + 3 + length]
            if f"L{old};".encode() in text:
                raise AgentBuildError(f"{old} names its own type in a descriptor; renaming it needs a full remap")
            if text == old.encode():
                text, hits = new.encode(), hits + 1
            out.append(bytes([1]) + len(text).to_bytes(2, "big") + text)
            pos += 3 + length
        elif tag in _CONSTANT_SIZES:
            out.append(data[pos:pos + 1 + _CONSTANT_SIZES[tag]])
            pos += 1 + _CONSTANT_SIZES[tag]
        else:
            raise AgentBuildError(f"{old}.class: unknown constant pool tag {tag}")
        index += 2 if tag in (5, 6) else 1  # a long or double takes two entries
    if hits != 1:
        raise AgentBuildError(f"{old}.class names itself {hits} times in its constant pool, expected once")
    out.append(data[pos:])
    return b"".join(out)


AGENT_ENV = "OIP_AGENT_JAR"  # a prebuilt jar (the image's); set but empty, or "off": no agent


def agent_jar() -> Path | None:
    """The agent jar to run with: ``$OIP_AGENT_JAR`` when set (prebuilt, e.g. in the image), else built here;
    None when ``OIP_AGENT_JAR`` is set empty or to ``off`` (TorchServe's own partial OIP)."""
    prebuilt = os.environ.get(AGENT_ENV)
    if prebuilt is not None and prebuilt.strip() in ("", "off"):
        return None
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise AgentBuildError(f"OIP_AGENT_JAR={prebuilt} does not exist")
        return Path(prebuilt)
    return build()


def jvm_options(props: dict[str, str], jar: Path | None) -> dict[str, str]:
    """``props`` (a TorchServe config) with the agent in ``vmargs`` and TorchServe's OIP handler switched on;
    with ``jar`` None, only TorchServe's own OIP handler (no agent)."""
    props = dict(props)
    vmargs = [arg for arg in props.get("vmargs", "").split() if not arg.startswith("-javaagent:")]
    props["vmargs"] = " ".join(vmargs + ([f"-javaagent:{jar}"] if jar is not None else []))
    props["ts_open_inference_protocol"] = "true"
    return props


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.torchserve.agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_JAR, help=f"jar to write (default: {DEFAULT_JAR})")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        print(build(args.out, force=args.force))
    except AgentBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
