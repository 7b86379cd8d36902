"""The networks and the registry: shapes, exact parameter counts, SmoothStep maths, spec consistency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from models.registry import MNIST_MEAN, MNIST_STD, REGISTRY, get_spec
from models.smoothstep import SmoothStep

from paths import REPO_ROOT as REPO
MNIST_NETS = ["mnistnet", "deepnet", "feedforwardnet"]

# Counted by hand from the layer sizes, e.g. MNISTNet: 784·128+128 + 128·64+64 + 64·10+10.
EXPECTED_PARAMETERS = {
    "mnistnet": 109_386,
    "deepnet": 567_434,
    "feedforwardnet": 101_770,
    "regressionnet": 241,
    "linearregression": 2,
    "mlp": 41,
    "smoothstepnet": 129,  # 2·32+32 + 32·1+1
}


def output_width(spec) -> int:
    return spec.num_classes if spec.task == "classification" else 1


def test_expected_parameter_table_covers_the_registry():
    assert set(EXPECTED_PARAMETERS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_exact_parameter_count(name):
    model = get_spec(name).build()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_output_shape_for_a_batch(name):
    spec = get_spec(name)
    model = spec.build().eval()
    with torch.no_grad():
        out = model(torch.randn(5, *spec.input_shape))
    assert out.shape == (5, output_width(spec))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MNIST_NETS)
def test_mnist_nets_accept_every_image_layout(name):
    model = get_spec(name).build().eval()
    images = torch.randn(3, 28, 28)
    with torch.no_grad():
        flat = model(images.reshape(3, 784))
        assert flat.shape == (3, 10)
        for layout in (images, images.reshape(3, 1, 28, 28)):
            assert torch.equal(model(layout), flat)
        single = model(images[0])
    assert single.shape == (1, 10)
    assert torch.allclose(single[0], flat[0])


def test_binary_mlp_outputs_probabilities():
    model = get_spec("mlp").build().eval()
    with torch.no_grad():
        out = model(torch.randn(64, 2) * 10)
    assert ((out > 0) & (out < 1)).all()


# ------------------------------------------------------------------------------------------ SmoothStep

def smoothstep_formula(x: torch.Tensor) -> torch.Tensor:
    return 6 * x**5 - 15 * x**4 + 10 * x**3


def test_smoothstep_fixed_points_and_clamp():
    values = SmoothStep()(torch.tensor([-3.0, -1e-3, 0.0, 0.5, 1.0, 1.001, 7.0], dtype=torch.float64))
    assert values.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0], abs=1e-12)


def test_smoothstep_matches_formula_inside_unit_interval():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(SmoothStep()(x), smoothstep_formula(x), atol=1e-12)


def test_smoothstep_is_monotone_on_unit_interval():
    y = SmoothStep()(torch.linspace(0, 1, 501, dtype=torch.float64))
    assert (y.diff() >= 0).all()


def test_smoothstep_gradient_inside_and_outside():
    inside = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    outside = torch.tensor([-5.0, -0.5, -0.01, 1.01, 2.0, 9.0], dtype=torch.float64)
    x = torch.cat([inside, outside]).requires_grad_()
    SmoothStep()(x).sum().backward()
    expected_inside = 30 * inside**2 * (inside - 1) ** 2
    assert torch.allclose(x.grad[: len(inside)], expected_inside, atol=1e-10)
    assert torch.equal(x.grad[len(inside):], torch.zeros(len(outside), dtype=torch.float64))


def test_smoothstep_gradient_check():
    x = (torch.rand(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.9 + 0.05)
    assert torch.autograd.gradcheck(SmoothStep(), (x.requires_grad_(),))


# ------------------------------------------------------------------------------------------- registry

def top_level_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.name for node in tree.body if isinstance(node, ast.ClassDef)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_model_file_defines_exactly_its_one_class(name):
    spec = get_spec(name)
    path = REPO / spec.model_file
    assert path.is_file(), f"{spec.model_file} does not exist"
    assert top_level_classes(path) == [spec.model_class.__name__]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_spec_is_consistent(name):
    spec = get_spec(name)
    assert spec.name == name
    assert spec.task in ("classification", "regression", "binary")
    model = spec.build()
    first = next(model.parameters())
    # The first layer's input width is the flattened sample width the spec promises.
    assert first.shape[-1] == spec.input_width
    if spec.is_image_model:
        assert spec.image_size[0] * spec.image_size[1] == spec.input_width
        assert spec.normalize == (MNIST_MEAN, MNIST_STD)
        assert spec.num_classes == 10
    if spec.task == "classification":
        assert spec.num_classes is not None


@pytest.mark.parametrize("name", MNIST_NETS)
def test_mnist_training_defaults(name):
    config = get_spec(name).train
    assert config.epochs == 10
    assert config.lr == 1e-3


def test_get_spec_unknown_name_lists_known_models():
    with pytest.raises(KeyError) as excinfo:
        get_spec("resnet9000")
    message = str(excinfo.value)
    assert "resnet9000" in message
    for name in REGISTRY:
        assert name in message


def test_with_train_overrides_only_given_fields():
    spec = get_spec("mnistnet")
    changed = spec.with_train(epochs=2, lr=None)
    assert changed.train.epochs == 2
    assert changed.train.lr == spec.train.lr
    assert spec.train.epochs == 10


# What each registered name is, written down from the model modules themselves (not read from the registry).
EXPECTED_CLASSES = {
    "mnistnet": ("models.mnist_net", "MNISTNet"),
    "deepnet": ("models.deep_net", "DeepNet"),
    "feedforwardnet": ("models.feedforward_net", "FeedForwardNet"),
    "linearregression": ("models.linear_regression", "LinearRegression"),
    "mlp": ("models.mlp", "MLP"),
    "regressionnet": ("models.regression_net", "Net"),
    "smoothstepnet": ("models.smoothstep_net", "SmoothStepNet"),
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_spec_builds_the_class_of_its_model_module(name):
    """The lazily named class is the one its module defines, and build() makes one of it."""
    import importlib

    assert set(EXPECTED_CLASSES) == set(REGISTRY)
    module, class_name = EXPECTED_CLASSES[name]
    expected = getattr(importlib.import_module(module), class_name)
    spec = get_spec(name)
    assert spec.model_class is expected
    assert type(spec.build()) is expected
    assert spec.model_file == module.replace(".", "/") + ".py"


def test_task_losses_are_torch_losses():
    from models.registry import TASKS

    assert TASKS["classification"].loss is torch.nn.CrossEntropyLoss
    assert TASKS["binary"].loss is torch.nn.BCELoss
    assert TASKS["regression"].loss is torch.nn.MSELoss


@pytest.mark.parametrize("statement", [
    "import models.registry",
    "import models",
    "from models.registry import REGISTRY, get_spec; [s.model_file for s in REGISTRY.values()]; get_spec('mlp').outputs",
    "import serve.package",  # what `python -m serve start` reads the model names with
    "import serve.__main__",
])
def test_reading_the_registry_does_not_import_torch(statement):
    """A fresh interpreter: reading names, shapes and settings leaves torch (and every network) unimported."""
    import subprocess
    import sys

    check = (f"{statement}\nimport sys\n"
             "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'models.')) "
             "and m not in ('models.registry',))\n"
             "print(','.join(loaded))")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{statement!r} imported {result.stdout.strip()}"


def test_the_torch_check_sees_torch():
    """Control: the same probe reports torch once a network is built."""
    import subprocess
    import sys

    check = "from models.registry import get_spec; get_spec('mlp').build(); import sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr
