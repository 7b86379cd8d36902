"""Train one registered network from in-memory tensors and write its weights, metrics and plots.

:func:`train_model` is the whole pipeline for one :class:`~models.registry.ModelSpec`:

1. load the spec's data set (``train/data.py``) into tensors on the device (CUDA when available);
2. train with Adam (``spec.train``: lr, weight decay, batch size, epochs, optional cosine decay and
   random-shift augmentation), shuffling with a seeded ``torch.randperm`` each epoch; the loss, the
   held-out metric and what ``<name>.json`` reports come from the task's row of ``models.registry.TASKS``;
3. after every epoch evaluate on the held-out set (``model.eval()``, ``torch.no_grad()``);
4. write ``<name>.json`` (metrics), ``<name>_curves.png``, for classifiers ``<name>_confusion.png``,
   and last ``<name>.pt`` (a plain ``state_dict``), each atomically (temp file + ``os.replace``), so an
   interrupted run never leaves a half-written file and ``--missing`` retrains it.

On CPU the same seed gives bit-identical weights (seeded init, dropout, shuffling and augmentation,
``torch.use_deterministic_algorithms``) for a given number of threads.

The registry's training defaults and the runs that chose them: docs/training/README.md.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.registry import TASKS, ModelSpec, TrainConfig
from paths import WEIGHTS_DIR
from train.data import load_dataset
from train.plots import confusion_png, curves_png

DEFAULT_OUTPUT_DIR = WEIGHTS_DIR


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def deterministic(seed: int):
    """Seed torch's global RNG (init, dropout) and switch on deterministic kernels for the block."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.manual_seed(seed)
    # warn_only: a kernel without a deterministic variant (some CUDA ops) warns instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def shift_images(images: Tensor, max_shift: int, generator: torch.Generator, fill: float) -> Tensor:
    """Move each image of a ``(B, H, W)`` batch by its own random offset in [−max_shift, max_shift]² px.

    Pads by ``max_shift`` with ``fill`` (the normalised background) and crops one window per image with a
    single gather, so the cost is one indexing op per batch.
    """
    batch, height, width = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), generator=generator).to(images.device)
    rows = offsets[0] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Per-step cosine decay from ``config.lr`` towards 0 for ``lr_schedule="cosine"``, else None."""
    if config.lr_schedule == "constant":
        return None
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; expected 'constant' or 'cosine'")


def train_one_epoch(model, x, y, loss_fn, optimizer, scheduler, config: TrainConfig, generator,
                    fill: float | None, progress: tqdm) -> float:
    """One pass over ``(x, y)`` in shuffled batches; returns the mean training loss per sample."""
    model.train()
    total_loss = 0.0
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), config.batch_size):
        batch = order[start:start + config.batch_size]
        inputs, targets = x[batch], y[batch]
        if config.augment_shift and fill is not None:
            inputs = shift_images(inputs, config.augment_shift, generator, fill)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(batch)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return total_loss / len(x)


@torch.no_grad()
def evaluate(model: nn.Module, task: str, x: Tensor, y: Tensor, loss_fn, train_mean: float | None = None,
             batch_size: int = 4096) -> dict:
    """Held-out metrics: ``loss``, plus ``accuracy`` (and a ``confusion_matrix`` for class labels) where the
    task has an output head, else ``mse``/``r2``/``baseline_mse``.

    ``baseline_mse`` is the MSE of always predicting ``train_mean`` (the training targets' mean).
    """
    model.eval()
    outputs = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    result = {"loss": loss_fn(outputs, y).item()}
    info = TASKS[task]
    if info.predict is not None:
        predicted = info.predict(outputs)
        result["accuracy"] = (predicted == y).float().mean().item()
        if "confusion_matrix" in info.report:
            classes = outputs.shape[1]
            counts = torch.bincount(y * classes + predicted, minlength=classes * classes)
            result["confusion_matrix"] = counts.reshape(classes, classes).tolist()
    else:
        mse = torch.mean((outputs - y) ** 2).item()
        variance = torch.mean((y - y.mean()) ** 2).item()
        result.update(mse=mse, r2=1.0 - mse / variance if variance > 0 else float("nan"))
        if train_mean is not None:
            result["baseline_mse"] = torch.mean((y - train_mean) ** 2).item()
    return result


def train_model(spec: ModelSpec, output_dir: str | Path = DEFAULT_OUTPUT_DIR, *, limit: int | None = None,
                mnist_root: str | Path | None = None, device: str | torch.device | None = None,
                progress: bool = True, log=print) -> dict:
    """Train ``spec`` with ``spec.train`` and write its artifacts to ``output_dir``; returns the metrics.

    Args:
        output_dir: where ``<name>.pt``/``.json``/``_curves.png``/``_confusion.png`` go (default ``weights/``).
        limit: use only the first ``limit`` training and held-out samples (smoke runs); default all.
        mnist_root: MNIST copy to read, default the repository's ``data/mnist``.
        device: default CUDA when available, else CPU.
        progress: show a tqdm bar per epoch; ``log`` receives the one-line-per-epoch summaries.
    """
    config, task, info = spec.train, spec.task, spec.task_info
    device = torch.device(device) if device is not None else default_device()
    data = load_dataset(spec.dataset, limit=limit, mnist_root=mnist_root)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    # Shift augmentation pads with the normalised background value (pixel 0).
    fill = -spec.normalize[0] / spec.normalize[1] if spec.is_image_model and spec.normalize else None
    if config.augment_shift and fill is None:
        raise ValueError(f"{spec.name}: augment_shift needs an image model with normalize set")
    history = {"train_loss": [], "held_out_loss": [], "held_out_" + info.metric: [], "epoch_seconds": []}
    steps = math.ceil(len(x_train) / config.batch_size)
    train_mean = y_train.mean().item() if info.predict is None else None

    with deterministic(config.seed):
        model = spec.build().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config, steps * config.epochs)
        loss_fn = info.loss()
        generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
        started = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            with tqdm(total=steps, desc=f"{spec.name} {epoch}/{config.epochs}", unit="batch",
                      leave=False, disable=not progress) as bar:
                train_loss = train_one_epoch(model, x_train, y_train, loss_fn, optimizer, scheduler,
                                             config, generator, fill, bar)
            result = evaluate(model, task, x_test, y_test, loss_fn, train_mean)
            history["train_loss"].append(train_loss)
            history["held_out_loss"].append(result["loss"])
            history["held_out_" + info.metric].append(result[info.metric])
            history["epoch_seconds"].append(time.perf_counter() - epoch_start)
            log(f"{spec.name} epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}, held-out loss "
                f"{result['loss']:.4f}, held-out {info.metric_label} {result[info.metric]:.4f} "
                f"({history['epoch_seconds'][-1]:.1f}s)")
        seconds = time.perf_counter() - started

    metrics = build_metrics(spec, model, data.info, result, history, seconds, device, limit)
    write_outputs(spec, model, metrics, Path(output_dir))
    return metrics


def build_metrics(spec, model, data_info, final, history, seconds, device, limit) -> dict:
    """The ``<name>.json`` document (see README's training section for every key)."""
    config, task = spec.train, spec.task
    metrics = {
        "model": spec.name,
        "version": spec.version,
        "model_class": spec.model_class.__name__,
        "task": task,
        "dataset": spec.dataset,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "lr_schedule": config.lr_schedule,
        "augment_shift": config.augment_shift,
        "seed": config.seed,
        "limit": limit,
        "seconds": round(seconds, 3),
        "torch_version": torch.__version__,
        "device": str(device),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "data": data_info,
        "history": history,
    }
    metrics.update({json_key: final[key] for key, json_key in spec.task_info.report.items()})
    if hasattr(model, "learned"):  # a model whose parameters mean something (a line's weight and bias)
        metrics["learned"] = model.learned()
    return metrics


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o644)  # mkstemp makes 0600; weights must stay readable by the server's user
        with os.fdopen(handle, "wb") as temp:
            temp.write(payload)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_outputs(spec: ModelSpec, model: nn.Module, metrics: dict, output_dir: Path) -> None:
    """Metrics and plots first, the ``.pt`` last: a run cut short leaves no weights file behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = spec.artifact_stem
    atomic_write(output_dir / f"{stem}.json", (json.dumps(metrics, indent=2) + "\n").encode())
    info = spec.task_info
    atomic_write(output_dir / f"{stem}_curves.png",
                 curves_png(spec.name, metrics["history"]["train_loss"],
                            metrics["history"]["held_out_" + info.metric], info.metric_label))
    if "confusion_matrix" in metrics:
        title = f"{spec.name}: test accuracy {metrics['test_accuracy']:.2%}"
        atomic_write(output_dir / f"{stem}_confusion.png",
                     confusion_png(title, metrics["confusion_matrix"]))
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    atomic_write(output_dir / f"{stem}.pt", buffer.getvalue())


def load_trained(spec: ModelSpec, weights_dir: str | Path = DEFAULT_OUTPUT_DIR) -> nn.Module:
    """``spec.build()`` with ``<weights_dir>/<name>.pt`` loaded (``weights_only=True``), in eval mode."""
    path = Path(weights_dir) / f"{spec.artifact_stem}.pt"
    if not path.is_file():
        flag = "" if spec.artifact_stem == spec.name else f" --version {spec.version}"
        raise FileNotFoundError(f"{path}: no trained weights; run `python -m train {spec.name}{flag}`")
    model = spec.build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
