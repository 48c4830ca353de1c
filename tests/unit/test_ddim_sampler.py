"""The differentiable DDIM sampler against diffusers' own DDIMScheduler loop (eta = 0)."""

from __future__ import annotations

import pytest
import torch

from attacks.components.ddim_sampler import DDIMSampler, ddim_timesteps
from fl_sim.records import ModelSpec
from fl_sim.tasks import build_task


def _task(seed: int = 0, **task_params):
    spec = ModelSpec(model="unet", model_params={"preset": "tiny"}, task="diffusion",
                     task_params={"num_train_timesteps": 100, **task_params}, in_channels=1,
                     num_classes=10, image_size=8, mean=(0.5,), std=(0.5,))
    task = build_task(spec, seed=seed)
    task.model.eval()
    return task


def _diffusers_loop(task, x, num_steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(task.scheduler.config)
    sched.set_timesteps(num_steps)
    for t in sched.timesteps:
        out = task.model(x, t.expand(x.shape[0]), return_dict=False)[0]
        x = sched.step(out, t, x, eta=0.0, return_dict=False)[0]
    return x, [int(t) for t in sched.timesteps]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    from diffusers import DDIMScheduler

    for k in (1, 3, 7, 10, 50):
        sched = DDIMScheduler(num_train_timesteps=100, timestep_spacing=spacing)
        sched.set_timesteps(k)
        assert ddim_timesteps(100, k, spacing=spacing) == sched.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_equals_diffusers_ddim(prediction_type):
    torch.manual_seed(0)
    task = _task(prediction_type=prediction_type)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=5)
    with torch.no_grad():
        ref, steps = _diffusers_loop(task, x_T.clone(), 5)
        ours = sampler.sample(x_T)
    assert list(sampler.timesteps) == steps
    assert sampler.clip_sample  # diffusers' default config clips x0: we must too
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # functional parameters give the same values as the module's own
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    with torch.no_grad():
        functional = sampler.sample(x_T, params=params)
    torch.testing.assert_close(functional, ref, rtol=1e-5, atol=1e-5)


def test_gradient_to_latent_matches_finite_differences():
    task = _task(seed=2)
    sampler = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=3)
    sampler.clip_sample = False  # the clamp is piecewise constant: no finite-difference check
    sampler.alphas_cumprod = sampler.alphas_cumprod.double()
    task.model.double()
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64).requires_grad_(True)
    w = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(z):
        return (sampler.sample(z) * w).sum()

    (g,) = torch.autograd.grad(f(x_T), x_T)
    assert g.abs().sum() > 0
    direction = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (f(x_T + h * direction) - f(x_T - h * direction)) / (2 * h)
    # diffusers builds the timestep embedding in float32 even in a float64 model: ~1e-4
    assert float(fd) == pytest.approx(float((g * direction).sum()), rel=1e-3)


def test_checkpointing_gives_same_values_and_gradients():
    task = _task(seed=3)
    sampler = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=4)
    sampler.clip_sample = False
    params = {k: v.detach().clone().requires_grad_(True)
              for k, v in task.model.named_parameters()}
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))

    def grads(ckpt):
        z = x_T.clone().requires_grad_(True)
        out = sampler.sample(z, params=params, checkpoint=ckpt)
        loss = out.square().mean()
        names = ["conv_in.weight", "conv_out.bias"]
        gz, *gp = torch.autograd.grad(loss, [z, *(params[n] for n in names)])
        return out.detach(), gz, gp

    out0, gz0, gp0 = grads(False)
    out1, gz1, gp1 = grads(True)
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gz1, gz0, rtol=1e-5, atol=1e-7)
    for a, b in zip(gp1, gp0, strict=True):
        assert b.abs().sum() > 0  # gradients reach the UNet's functional parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_steps_and_spacing_refused():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(100, 0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(100, 5, spacing="cubic")
