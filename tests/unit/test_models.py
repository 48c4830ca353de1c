"""Model factories: reference parameter counts, shapes, seeding, UNet double backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fl_sim.errors import ConfigError, PluginError
from fl_sim.models import build_model
from fl_sim.registry import MODELS


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names() -> None:
    assert {"lenet", "convnet", "resnet18", "mlp", "unet"} <= set(MODELS.names())


def test_convnet_matches_breaching_parameter_count() -> None:
    model = build_model("convnet", 3, 10, 32, seed=0)
    assert _count(model) == 2_904_970
    assert model.fc.in_features == 2304


def test_resnet18_cifar_matches_reference_parameter_count() -> None:
    model = build_model("resnet18", 3, 10, 32, seed=0)
    assert _count(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.bias is None


def test_lenet_is_the_dlg_layout() -> None:
    model = build_model("lenet", 3, 10, 32, seed=0)
    assert model.fc.in_features == 12 * 8 * 8
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 3


@pytest.mark.parametrize(("name", "params", "size"), [
    ("lenet", {}, 32), ("lenet", {"activation": "relu"}, 16), ("convnet", {"width": 8}, 16),
    ("resnet18", {"width": 8}, 16), ("mlp", {"hidden": [32]}, 8),
])
def test_classifier_models_map_images_to_logits(name: str, params: dict, size: int) -> None:
    model = build_model(name, 1, 7, size, seed=0, params=params)
    model.eval()
    out = model(torch.rand(3, 1, size, size))
    assert out.shape == (3, 7)


def test_tiny_unet_predicts_noise_of_input_shape() -> None:
    model = build_model("unet", 1, 10, 16, seed=0)
    assert _count(model) <= 1_000_000
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 500])).sample
    assert out.shape == (2, 1, 16, 16)


def test_unet_rejects_indivisible_image_size() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_model("unet", 3, 10, 15, seed=0)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("convnet", 3, 10, 16, seed=7, params={"width": 4})
    assert torch.equal(torch.rand(1), expected)
    b = build_model("convnet", 3, 10, 16, seed=7, params={"width": 4})
    c = build_model("convnet", 3, 10, 16, seed=8, params={"width": 4})
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_model_params_take_effect() -> None:
    relu = build_model("lenet", 3, 10, 32, seed=0, params={"activation": "relu"})
    kinds = [type(m).__name__ for m in relu.modules()]
    assert kinds.count("ReLU") == 3 and "Sigmoid" not in kinds
    assert build_model("convnet", 3, 10, 32, seed=0, params={"width": 4}).fc.in_features == 144
    mlp = build_model("mlp", 1, 10, 16, seed=0, params={"hidden": [32]})
    assert next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear)).out_features == 32


def test_build_model_errors_name_the_problem() -> None:
    with pytest.raises(PluginError, match="known: .*convnet"):
        build_model("alexnet", 3, 10, 32, seed=0)
    with pytest.raises(ConfigError, match="model.widht: unknown key"):
        build_model("convnet", 3, 10, 32, seed=0, params={"widht": 3})
    with pytest.raises(ConfigError, match="model.activation"):
        build_model("lenet", 3, 10, 32, seed=0, params={"activation": "tanh"})


def test_tiny_unet_supports_double_backward() -> None:
    """Gradient matching differentiates a gradient: needs the classic attention processor."""
    model = build_model("unet", 1, 10, 16, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    target = torch.autograd.grad(
        model(torch.rand(1, 1, 16, 16), torch.tensor([10])).sample.square().mean(), params)
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    grads = torch.autograd.grad(model(x, torch.tensor([10])).sample.square().mean(), params,
                                create_graph=True)
    match = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
    match.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_importing_models_and_tasks_does_not_load_diffusers() -> None:
    code = ("import sys, fl_sim.models, fl_sim.tasks; "
            "sys.exit(int('diffusers' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.slow
def test_cifar_unet_preset_is_the_ddpm_cifar_layout() -> None:
    model = build_model("unet", 3, 10, 32, seed=0, params={"preset": "cifar"})
    assert model.config.block_out_channels == (128, 256, 256, 256)
    assert 35_000_000 < _count(model) < 36_500_000  # Ho et al. report 35.7 M
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([7])).sample
    assert out.shape == (1, 3, 32, 32)
