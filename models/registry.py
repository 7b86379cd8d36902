"""The one registry of model specs: training, packaging and serving all read it.

A :class:`ModelSpec` says how to build a network, what one input sample looks like, which task it
solves, how it is trained by default and how it is served. Add your own model by writing its module
(one ``nn.Module`` class per file) and one ``ModelSpec`` entry in ``REGISTRY`` below.

Importing this module imports neither torch nor the networks: a spec names its class as
``"module:Class"`` and imports it when it is first asked for (``model_class``, ``build()``), so
commands that only read names, shapes and settings start at once.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

TaskName = Literal["classification", "regression", "binary"]


@dataclass(frozen=True)
class Task:
    """What a task means to every stage; ``TASKS`` below has one row per task and nothing else branches on it.

    Attributes:
        loss_ref: training loss class as ``"module:Class"`` (the binary nets already end in a Sigmoid, hence
            ``BCELoss``); ``loss`` is the class itself.
        metric: the held-out headline number, ``accuracy`` or ``r2``; ``metric_label`` is how logs and plots say it.
        predict: output head, network output → predicted label (``None`` for regression: the output is the answer).
        report: the held-out results written into ``<name>.json``, evaluation key → JSON key (a
            ``confusion_matrix`` entry makes training compute and plot one).
        handler: the TorchServe handler file, relative to the repository root.
        outputs: the named outputs of one request, ``(name, OIP datatype, shape of one sample)``.
        targets: how many classes an explanation may target (``-1``: the spec's ``num_classes``).
        attribution_of: what an explanation attributes.
    """

    loss_ref: str
    metric: str
    metric_label: str
    predict: Callable[[torch.Tensor], torch.Tensor] | None
    report: dict[str, str]
    handler: str
    outputs: Callable[["ModelSpec"], tuple[tuple[str, str, tuple[int, ...]], ...]]
    targets: int
    attribution_of: str

    @property
    def loss(self) -> type[nn.Module]:
        """The training loss class (imports torch)."""
        return load_object(self.loss_ref)


def load_object(ref: str) -> Any:
    """The object named ``"package.module:Name"``, importing its module."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


BINARY_THRESHOLD = 0.5  # p(class 1) >= this → class 1, in training metrics and in the served answer

TASKS: dict[str, Task] = {
    "classification": Task(
        loss_ref="torch.nn:CrossEntropyLoss", metric="accuracy", metric_label="accuracy",
        predict=lambda out: out.argmax(dim=1),
        report={"accuracy": "test_accuracy", "loss": "test_loss", "confusion_matrix": "confusion_matrix"},
        handler="handlers/image_classifier.py",
        outputs=lambda spec: (("probabilities", "FP32", (spec.num_classes,)), ("predicted_class", "INT64", ())),
        targets=-1, attribution_of="logit of the target class",
    ),
    "binary": Task(
        loss_ref="torch.nn:BCELoss", metric="accuracy", metric_label="accuracy",
        predict=lambda out: (out >= BINARY_THRESHOLD).to(out.dtype),
        report={"accuracy": "held_out_accuracy", "loss": "held_out_loss"},
        handler="handlers/tabular.py",
        outputs=lambda spec: (("probabilities", "FP32", ()), ("predicted_class", "INT64", ())),
        targets=2, attribution_of="probability of the target class (class 1: sigmoid output p; class 0: 1 - p)",
    ),
    "regression": Task(
        loss_ref="torch.nn:MSELoss", metric="r2", metric_label="R²", predict=None,
        report={"mse": "held_out_mse", "r2": "held_out_r2", "baseline_mse": "baseline_mse"},
        handler="handlers/tabular.py",
        outputs=lambda spec: (("predictions", "FP32", ()),),
        targets=1, attribution_of="predicted value",
    ),
}

# MNIST pixel statistics after scaling to [0, 1], measured on the 60,000 training images
# (tests/train/test_data.py recomputes them from data/mnist/); training and serving normalise with exactly these numbers.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class TrainConfig:
    """Default training hyperparameters; every field can be overridden on the ``python -m train`` CLI."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # Adam's base learning rate
    weight_decay: float = 0.0  # Adam's L2 penalty
    seed: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: per-step decay from lr towards 0
    augment_shift: int = 0  # image models: random shift of each training image by up to ± this many pixels


DEFAULT_VERSION = "1.0"  # the version of unversioned artifacts (weights/<name>.pt, model_store/<name>.mar)
VERSION_PATTERN = re.compile(r"[0-9][0-9A-Za-z._]{0,31}")  # TorchServe takes it in URLs and file names


def check_version(version: str) -> str:
    """``version`` if it is a usable model version (a digit, then up to 31 letters, digits, dots or underscores:
    it appears in file names and URL paths), else ``ValueError`` saying so."""
    if not VERSION_PATTERN.fullmatch(version or ""):
        raise ValueError(f"bad version {version!r}: expected a digit then up to 31 of [0-9A-Za-z._], e.g. 2.0")
    return version


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about one served network.

    Attributes:
        name: public name, used in file names (``weights/<name>.pt``, ``model_store/<name>.mar``) and URLs.
        model_ref: the ``nn.Module`` subclass as ``"module:Class"``, imported on first use; ``model_class``
            is the class itself and ``build()`` calls it with ``init_kwargs``.
        input_shape: shape of ONE sample as the model consumes it, e.g. ``(784,)`` or ``(10,)``.
        task: ``classification`` (logits over classes), ``regression`` (real values) or ``binary``
            (a probability from a Sigmoid output).
        dataset: the training data set; see ``train/data.py``.
        normalize: ``(mean, std)`` applied to inputs before the model, or ``None``.
        image_size: for image models, the ``(height, width)`` a picture is decoded to.
        num_classes: output classes for classification.
        train: default training hyperparameters.
        version: model version written into the archive and served at ``/predictions/<name>/<version>``;
            ``at_version()`` gives the spec of another version (its files: ``artifact_stem``).
        batch_size / max_batch_delay_ms: TorchServe dynamic batching for this model. A batch that does
            not fill waits the whole delay, so keep it short, but not 0 (TorchServe then polls); the
            measurements are in bench/README.md ("Tuning conclusions").
        workers: TorchServe worker processes for this model (each single-threaded).
    """

    name: str
    model_ref: str
    input_shape: tuple[int, ...]
    task: TaskName
    dataset: str
    init_kwargs: dict = field(default_factory=dict)
    normalize: tuple[float, float] | None = None
    image_size: tuple[int, int] | None = None
    num_classes: int | None = None
    train: TrainConfig = TrainConfig()
    version: str = DEFAULT_VERSION
    batch_size: int = 8
    max_batch_delay_ms: int = 2
    workers: int = 1

    @property
    def artifact_stem(self) -> str:
        """File name stem of this version's artifacts: ``<name>`` for the default version (``weights/<name>.pt``,
        ``model_store/<name>.mar``, as before versions existed), ``<name>-v<version>`` for any other, so a new
        version never overwrites the files of a served one."""
        return self.name if self.version == DEFAULT_VERSION else f"{self.name}-v{self.version}"

    def at_version(self, version: str | None) -> "ModelSpec":
        """This spec at ``version`` (``None``: unchanged); raises ``ValueError`` for a malformed version."""
        if version is None:
            return self
        check_version(version)
        return dataclasses.replace(self, version=version)

    @property
    def input_width(self) -> int:
        """Number of values in one flattened sample (784 for the MNIST nets)."""
        width = 1
        for dim in self.input_shape:
            width *= dim
        return width

    @property
    def is_image_model(self) -> bool:
        return self.image_size is not None

    @property
    def model_class(self) -> type[nn.Module]:
        """The network class named by ``model_ref`` (imports its module, and so torch)."""
        return load_object(self.model_ref)

    @property
    def model_file(self) -> str:
        """Path of the module defining ``model_class``, relative to the repository root (nothing imported)."""
        return self.model_ref.partition(":")[0].replace(".", "/") + ".py"

    @property
    def task_info(self) -> Task:
        """This spec's row of ``TASKS``."""
        return TASKS[self.task]

    @property
    def handler(self) -> str:
        """TorchServe handler file serving this model, relative to the repository root (per task)."""
        return self.task_info.handler

    @property
    def outputs(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """The named outputs of one request, ``(name, OIP datatype, shape of one sample)``; the handlers'
        ``postprocess`` returns exactly these and the Open Inference Protocol metadata lists them."""
        return self.task_info.outputs(self)

    @property
    def target_count(self) -> int:
        """How many classes an explanation may target: num_classes, 2 for binary, 1 for regression."""
        targets = self.task_info.targets
        return (self.num_classes or 0) if targets == -1 else targets

    def oip_metadata(self) -> dict:
        """Open Inference Protocol model metadata (``GET /v2/models/<name>``); -1 is the batch dimension."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "pytorch_torchserve",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}],
            "outputs": [
                {"name": name, "datatype": datatype, "shape": [-1, *shape]} for name, datatype, shape in self.outputs
            ],
        }

    def build(self) -> nn.Module:
        """A freshly initialised network of this spec (call ``load_state_dict`` for trained weights)."""
        return self.model_class(**self.init_kwargs)

    def with_train(self, **overrides) -> "ModelSpec":
        """A copy whose training defaults are replaced by the given non-None ``overrides``."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


# Batch 64, Adam lr 1e-3 with per-step cosine decay to 0, and every training image shifted by a random
# -1..+1 px in x and y: the runs that chose it are in docs/training/README.md.
MNIST_TRAIN = TrainConfig(epochs=10, batch_size=64, lr=1e-3, lr_schedule="cosine", augment_shift=1)

_MNIST = dict(
    train=MNIST_TRAIN,
    input_shape=(784,),
    task="classification",
    dataset="mnist",
    normalize=(MNIST_MEAN, MNIST_STD),
    image_size=(28, 28),
    num_classes=10,
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # Two workers and a 1 ms batch delay for the model the load tests and benchmark hit: one worker was
        # the bottleneck, and a lone request waits the whole delay (bench/README.md, "Tuning conclusions").
        ModelSpec("mnistnet", "models.mnist_net:MNISTNet", workers=2, max_batch_delay_ms=1, **_MNIST),
        ModelSpec("deepnet", "models.deep_net:DeepNet", **_MNIST),
        ModelSpec(
            "feedforwardnet",
            "models.feedforward_net:FeedForwardNet",
            init_kwargs=dict(input_size=784, hidden_size=128, output_size=10),
            **_MNIST,
        ),
        ModelSpec(
            "linearregression",
            "models.linear_regression:LinearRegression",
            init_kwargs=dict(input_dim=1, output_dim=1),
            input_shape=(1,),
            task="regression",
            dataset="linear",
            train=TrainConfig(epochs=10, batch_size=32, lr=5e-2, lr_schedule="cosine"),
        ),
        ModelSpec(
            "mlp",
            "models.mlp:MLP",
            init_kwargs=dict(input_dim=2, hidden_dim=10, output_dim=1),
            input_shape=(2,),
            task="binary",
            dataset="moons",
            # 10 ReLU units need ~3000 steps to bend round both moon tips from every seed.
            train=TrainConfig(epochs=30, batch_size=16, lr=2e-2, lr_schedule="cosine"),
        ),
        ModelSpec(
            "regressionnet",
            "models.regression_net:Net",
            input_shape=(10,),
            task="regression",
            dataset="regression10",
            train=TrainConfig(epochs=10, batch_size=32, lr=1e-2),
        ),
        ModelSpec(
            "smoothstepnet",
            "models.smoothstep_net:SmoothStepNet",
            init_kwargs=dict(input_dim=2, hidden_dim=32, output_dim=1),
            input_shape=(2,),
            task="regression",
            dataset="smoothstep",
            train=TrainConfig(epochs=10, batch_size=32, lr=1e-2),
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; raises ``KeyError`` naming the known models otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None
