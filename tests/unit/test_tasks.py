"""Tasks: functional loss == module loss, torch.func.grad == autograd, training, builders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import grad

from fl_sim.config import ModelConfig, TaskConfig
from fl_sim.models import build_model
from fl_sim.records import ModelSpec
from fl_sim.tasks import build_task, task_from_config
from fl_sim.tasks.base import Batch, Task, module_tensors
from fl_sim.tasks.classifier import ClassifierTask
from fl_sim.tasks.diffusion import DiffusionTask

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(scope="module")
def digits() -> Batch:
    """sklearn digits as [N, 1, 16, 16] in [0, 1] (bilinear upsampling of the 8×8 originals)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    return Batch(x, torch.tensor(data.target, dtype=torch.int64))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classifier(name: str = "convnet", **params: object) -> ClassifierTask:
    model = build_model(name, 1, 10, 16, seed=0, params=params)
    return ClassifierTask(model, (MEAN, STD))


def _diffusion() -> DiffusionTask:
    return DiffusionTask(build_model("unet", 1, 10, 16, seed=0), (MEAN, STD),
                         num_train_timesteps=100)


def test_tasks_satisfy_the_protocol() -> None:
    assert isinstance(_classifier(width=4), Task)
    assert isinstance(_diffusion(), Task)


def test_classifier_functional_loss_equals_module_loss(digits: Batch) -> None:
    task = _classifier(width=4)
    task.model.eval()
    batch = Batch(digits.images[:8], digits.labels[:8])
    params, buffers = module_tensors(task.model)
    expected = F.cross_entropy(task.model((batch.images - 0.5) / 0.25), batch.labels)
    torch.testing.assert_close(task.loss(params, buffers, batch, {}), expected)


def test_diffusion_functional_loss_equals_module_loss(digits: Batch) -> None:
    task = _diffusion()
    batch = Batch(digits.images[:4], digits.labels[:4])
    aux = task.sample_aux(batch, _gen(0))
    x0 = batch.images * 2 - 1
    x_t = task.scheduler.add_noise(x0, aux["eps"], aux["t"])
    expected = F.mse_loss(task.model(x_t, aux["t"]).sample, aux["eps"])
    params, buffers = module_tensors(task.model)
    torch.testing.assert_close(task.loss(params, buffers, batch, aux), expected)


def _assert_func_grad_matches_autograd(task: Task, batch: Batch, aux: dict) -> None:
    params, buffers = module_tensors(task.model)
    detached = {k: v.detach() for k, v in params.items()}
    func_grads = grad(lambda p: task.loss(p, buffers, batch, aux))(detached)
    task.model.zero_grad()
    task.loss(params, buffers, batch, aux).backward()
    for name, p in task.model.named_parameters():
        torch.testing.assert_close(func_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_classifier_func_grad_equals_autograd(digits: Batch) -> None:
    task = _classifier(width=4)
    task.model.eval()  # fresh BN statistics, as in the reference attack cases
    _assert_func_grad_matches_autograd(task, Batch(digits.images[:4], digits.labels[:4]), {})


def test_diffusion_func_grad_equals_autograd(digits: Batch) -> None:
    task = _diffusion()
    batch = Batch(digits.images[:2], digits.labels[:2])
    _assert_func_grad_matches_autograd(task, batch, task.sample_aux(batch, _gen(1)))


def test_diffusion_aux_is_determined_by_the_generator(digits: Batch) -> None:
    task = _diffusion()
    batch = Batch(digits.images[:4], digits.labels[:4])
    a, b, c = (task.sample_aux(batch, _gen(s)) for s in (5, 5, 6))
    assert a["eps"].shape == (4, 1, 16, 16) and a["t"].shape == (4,)
    assert a["t"].dtype == torch.int64 and 0 <= int(a["t"].min()) <= int(a["t"].max()) < 100
    assert torch.equal(a["eps"], b["eps"]) and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["eps"], c["eps"])


def test_diffusion_loss_needs_eps_and_t(digits: Batch) -> None:
    task = _diffusion()
    params, buffers = module_tensors(task.model)
    with pytest.raises(KeyError, match="eps"):
        task.loss(params, buffers, Batch(digits.images[:1], digits.labels[:1]), {})


def test_classifier_train_step_learns_digits(digits: Batch) -> None:
    task = _classifier("mlp", hidden=(64,))
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    train, test = slice(0, 1500), slice(1500, None)
    before = task.evaluate(digits.images[test], digits.labels[test])
    gen, order = _gen(0), torch.randperm(1500, generator=_gen(1))
    for step in range(60):
        idx = order[(step * 25) % 1500:][:25]
        result = task.train_step(opt, Batch(digits.images[train][idx], digits.labels[idx]), gen)
        assert result.aux == {}
    after = task.evaluate(digits.images[test], digits.labels[test], batch_size=100)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8 > before["accuracy"]


def test_tiny_unet_trains_on_digits(digits: Batch) -> None:
    task = _diffusion()
    opt = torch.optim.Adam(task.model.parameters(), lr=2e-3)
    held_out = digits.images[-64:]
    before = task.evaluate(held_out, batch_size=64)
    gen, losses = _gen(0), []
    for step in range(25):
        batch = Batch(digits.images[step * 16:(step + 1) * 16], digits.labels[:16])
        result = task.train_step(opt, batch, gen)
        assert set(result.aux) == {"eps", "t"}
        losses.append(result.loss)
    after = task.evaluate(held_out, batch_size=64)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert after["loss"] < 0.5 * before["loss"]
    assert task.evaluate(held_out) == after  # fixed default generator


def test_diffusion_sample_is_deterministic_and_in_range() -> None:
    task = _diffusion()
    for scheduler in ("ddim", "ddpm"):
        a = task.sample(2, _gen(0), num_inference_steps=4, scheduler=scheduler)
        b = task.sample(2, _gen(0), num_inference_steps=4, scheduler=scheduler)
        assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(ValueError, match="scheduler"):
        task.sample(1, _gen(0), num_inference_steps=2, scheduler="euler")  # type: ignore[arg-type]


def test_build_task_round_trips_through_model_spec() -> None:
    spec = ModelSpec(model="convnet", model_params={"width": 4}, task="classifier",
                     task_params={"label_smoothing": 0.1}, in_channels=3, num_classes=10,
                     image_size=16, mean=(0.4915, 0.4823, 0.4468), std=(0.2470, 0.2435, 0.2616))
    again = ModelSpec.from_json(spec.to_json())
    a, b = build_task(spec, seed=3), again.build_task()
    assert isinstance(a, ClassifierTask) and a.label_smoothing == 0.1 and a.std == spec.std
    probe = Batch(torch.rand(2, 3, 16, 16), torch.tensor([1, 2]))
    params, buffers = dict(a.model.named_parameters()), dict(a.model.named_buffers())
    logits = a.logits(params, buffers, probe.images)
    smoothed = a.loss(params, buffers, probe, {})
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, probe.labels,
                                                         label_smoothing=0.1))
    assert not torch.allclose(smoothed, F.cross_entropy(logits, probe.labels))
    b.model.load_state_dict(a.model.state_dict())
    batch = Batch(torch.rand(2, 3, 16, 16), torch.tensor([1, 2]))
    a.model.eval()
    b.model.eval()
    pa, ba = module_tensors(a.model)
    pb, bb = module_tensors(b.model)
    assert torch.equal(a.loss(pa, ba, batch, {}), b.loss(pb, bb, batch, {}))


def test_task_from_config_returns_a_spec_with_resolved_params() -> None:
    task, spec = task_from_config(ModelConfig(name="unet"), TaskConfig(name="diffusion",
                                  num_train_timesteps=50), 1, 10, 16, MEAN, STD, seed=0,
                                  device="cpu")
    assert isinstance(task, DiffusionTask) and task.num_train_timesteps == 50
    assert spec.model_params == {"preset": "tiny"}
    assert spec.task_params == {"num_train_timesteps": 50, "beta_schedule": "linear",
                                "prediction_type": "epsilon"}
    rebuilt = build_task(ModelSpec.from_json(spec.to_json()), seed=0)
    pairs = zip(task.model.state_dict().items(), rebuilt.model.state_dict().values(), strict=True)
    for (k, v), w in pairs:
        assert torch.equal(v, w), k
