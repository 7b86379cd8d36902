"""GPU check: prove on a machine with CUDA that the project's serving path works on the GPU.

    python3 -m scripts.gpu_check [--weights DIR] [--out FILE] [--models all|a,b] [--seconds S] [--no-server]
    make gpu-check                     # the same with the repository's .venv (GPU_CHECK_ARGS=... for options)

Two parts, each built from the project's own pieces (README.md, "GPU check", says what each proves):
``inprocess.py`` loads every model's archive through TorchServe's model loader and ``Service`` on the GPU
(bench/worker.py's harness, no Java) and compares its answers with the network on the CPU; ``served.py``
(where Java and TorchServe are there) starts TorchServe with serve/server.py, asks it with the client and
loads it with bench/loadgen.py. This module holds what both share: the report, the inputs, the CPU
reference and the comparison. Without a GPU the check says so and exits 0; ``--device cpu`` is a dry run.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

NO_GPU_MESSAGE = "no GPU (torch.cuda.is_available() is False): nothing to check"
PROB_TOLERANCE = 1e-4  # max |GPU - CPU| of a probability (issue 15)
TABULAR_ROWS = 4096  # seeded rows per tabular model for the parity check
CHUNK = 256  # samples per parity request (and the large throughput request)


class Report:
    """Collects one result per check and prints it as it comes: ``STATUS name: detail``."""

    def __init__(self, stream=None):
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.stream = stream or sys.stdout

    def check(self, name: str, status: str, detail: str, **numbers) -> dict:
        assert status in ("PASS", "FAIL", "SKIP"), status
        entry = {"name": name, "status": status, "detail": detail, **numbers}
        self.checks.append(entry)
        print(f"{status} {name}: {detail}", file=self.stream, flush=True)
        return entry

    def info(self, text: str) -> None:
        self.notes.append(text)
        print(f"INFO {text}", file=self.stream, flush=True)

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c["status"] == status)

    @property
    def failed(self) -> bool:
        return self.count("FAIL") > 0


# ------------------------------------------------------------------------------------ inputs, weights


def mnist_test():
    """The 10,000 MNIST test digits, ``(uint8 (N, 28, 28), int64 labels (N,))``, verified by sha256."""
    from train.data import mnist_arrays

    return mnist_arrays("test")


def digits_for(names: list[str], digits=None):
    """``digits`` if given, else the MNIST test digits when one of ``names`` is an image model, else None."""
    from models.registry import get_spec

    if digits is not None or not any(get_spec(n).is_image_model for n in names):
        return digits
    return mnist_test()


def check_inputs(spec, digits=None):
    """``(wire array, OIP datatype, float32 model input tensor, labels or None)`` for the parity check.

    Image models: the test digits as UINT8 pixels (the handler divides by 255 and normalises) and
    the same digits normalised as training does. Tabular models: seeded rows in [-3, 3].
    """
    import torch

    if spec.is_image_model:
        from train.data import normalize_images

        images, labels = digits if digits is not None else mnist_test()
        return images, "UINT8", normalize_images(images).reshape(len(images), -1), labels
    generator = torch.Generator().manual_seed(15)
    rows = torch.rand(TABULAR_ROWS, spec.input_width, generator=generator) * 6.0 - 3.0
    return rows.numpy(), "FP32", rows, None


def chunks(array, chunk: int = CHUNK) -> list:
    """``array`` cut into consecutive pieces of ``chunk`` samples (the last may be shorter)."""
    return [array[start:start + chunk] for start in range(0, len(array), chunk)]


def resolve_weights(names: list[str], weights_dir: Path, dest: Path, device, report: Report) -> dict[str, Path]:
    """``<dest>/<name>.pt`` for every model: copied from ``weights_dir``, or trained now when missing there.

    A private copy, so the archives and the CPU reference all read the same file.
    """
    from models.registry import get_spec

    dest.mkdir(parents=True, exist_ok=True)
    found, trained = {}, []
    for name in names:
        source = Path(weights_dir) / f"{name}.pt"
        if source.is_file():
            shutil.copy2(source, dest / source.name)
            found[name] = dest / source.name
            continue
        try:
            from train.trainer import train_model

            started = time.perf_counter()
            metrics = train_model(get_spec(name), dest, device=device, progress=False, log=lambda *a, **k: None)
            seconds = time.perf_counter() - started
        except Exception as err:
            report.check(f"weights[{name}]", "FAIL", f"{source} is missing and training it failed: "
                         f"{type(err).__name__}: {err} (copy or carry weights/ to this machine)")
            continue
        score = metrics.get("test_accuracy", metrics.get("held_out_accuracy"))
        score_text = (f"held-out accuracy {score:.2%}" if score is not None
                      else f"held-out R² {metrics.get('held_out_r2', float('nan')):.3f}")
        report.check(f"weights[{name}]", "PASS", f"{source} missing: trained now on {device} in {seconds:.1f} s "
                     f"(registry's training, {score_text})", seconds=round(seconds, 2))
        found[name] = dest / f"{name}.pt"
        trained.append(name)
    copied = [n for n in found if n not in trained]
    if copied:
        report.info(f"weights from {Path(weights_dir).resolve()}: {', '.join(copied)}")
    return found


def throughput_model(names: list[str]) -> str | None:
    """mnistnet if there (the model bench/ measures), else the first image model."""
    from models.registry import get_spec

    image_models = [n for n in names if get_spec(n).is_image_model]
    return "mnistnet" if "mnistnet" in image_models else (image_models[0] if image_models else None)


# ------------------------------------------------------------------------------ reference, comparison


def oip_headers(header_length: int) -> dict[str, str]:
    """The headers of a binary Open Inference Protocol request whose JSON header is ``header_length`` bytes."""
    return {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}


def outputs_of(response: dict) -> dict:
    """OIP response → ``{output name: numpy array}``."""
    import numpy as np

    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response["outputs"]}


def reference_outputs(spec, weights: Path, x) -> dict:
    """The network on the CPU in this process: ``{"probabilities"|"predictions": array}``."""
    import torch

    model = spec.build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    with torch.inference_mode():
        out = model.eval()(x.float()).float()
    if spec.task == "classification":
        return {"probabilities": torch.softmax(out, dim=1).numpy()}
    values = out.reshape(len(out), -1).numpy()
    values = values[:, 0] if values.shape[1] == 1 else values
    return {"probabilities" if spec.task == "binary" else "predictions": values}


def compare(spec, statuses: list[int], responses: list[dict], expected: dict, labels=None) -> dict:
    """Answers under test vs the CPU reference: ``{"status", "detail", numbers...}`` (PASS within tolerance)."""
    import numpy as np

    from models.registry import BINARY_THRESHOLD

    bad = [s for s in statuses if s != 200]
    if bad:
        return {"status": "FAIL", "detail": f"{len(bad)} of {len(statuses)} requests answered {sorted(set(bad))}: "
                f"{responses[statuses.index(bad[0])]}"}
    (key, want), = expected.items()
    got = np.concatenate([outputs_of(r)[key] for r in responses]).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return {"status": "FAIL", "detail": f"{key} has shape {got.shape}, expected {want.shape}"}
    diff = float(np.max(np.abs(got - want)))
    scale = 1.0 if key == "probabilities" else max(1.0, float(np.max(np.abs(want))))
    tolerance = PROB_TOLERANCE * scale
    result = {"samples": int(len(got)), "max_abs_diff": diff, "tolerance": tolerance}
    what = f"{len(got)} {'test digits' if spec.is_image_model else 'seeded rows'}, max |Δ{key}| {diff:.1e}"
    if spec.task != "regression":
        predicted = np.concatenate([outputs_of(r)["predicted_class"] for r in responses])
        reference = want.argmax(axis=1) if want.ndim == 2 else (want >= BINARY_THRESHOLD).astype(np.int64)
        result["class_mismatches"] = int(np.sum(predicted != reference))
        what += f", predicted class differs on {result['class_mismatches']}"
        if labels is not None:
            result["accuracy"] = float(np.mean(predicted == np.asarray(labels)))
            result["reference_accuracy"] = float(np.mean(reference == np.asarray(labels)))
            what += f", accuracy {result['accuracy']:.2%} (CPU {result['reference_accuracy']:.2%})"
    ok = diff <= tolerance
    result["status"] = "PASS" if ok else "FAIL"
    result["detail"] = f"{what}; {'≤' if ok else 'EXCEEDS'} {tolerance:.0e}"
    return result


def parity_check(report: Report, name: str, label: str, what: str, answer, weights: Path, digits) -> dict:
    """One parity line, ``label[name]: what: numbers``: ``answer(wire chunk, datatype)`` → ``(status, OIP
    response)`` for every chunk of the model's check inputs, compared with the network on the CPU."""
    from models.registry import get_spec

    spec = get_spec(name)
    wire, datatype, x, labels = check_inputs(spec, digits)
    try:
        answers = [answer(part, datatype) for part in chunks(wire)]
        result = compare(spec, [s for s, _ in answers], [r for _, r in answers],
                         reference_outputs(spec, weights, x), labels)
    except Exception as err:
        result = {"status": "FAIL", "detail": f"{type(err).__name__}: {err}"}
    status, detail = result.pop("status"), result.pop("detail")
    return report.check(f"{label}[{name}]", status, f"{what}: {detail}", **result)
