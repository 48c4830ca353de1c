"""The differentiable DDIM sampler against diffusers' own DDIMScheduler loop (eta = 0)."""

from __future__ import annotations

import pytest
import torch

from attacks.components.ddim_sampler import DDIMSampler, auto_plan, ddim_timesteps
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


@pytest.mark.parametrize("mode", ["sampler", "full"])
def test_checkpointing_gives_same_values_and_gradients(mode):
    # K = 3 steps on the tiny UNet, functional weights perturbed away from the module's own
    # (diffusers' stock block checkpointing recomputes with the module's weights: 0.91 off)
    task = _task(seed=3)
    sampler = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=3)
    sampler.clip_sample = False
    g = torch.Generator().manual_seed(7)
    params = {k: (v.detach() + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_(True)
              for k, v in task.model.named_parameters()}
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    names = ["conv_in.weight", "down_blocks.1.attentions.0.to_q.weight", "conv_out.bias"]

    def grads(ckpt):
        z = x_T.clone().requires_grad_(True)
        out = sampler.sample(z, params=params, checkpoint=ckpt)
        gz, *gp = torch.autograd.grad(out.square().mean(), [z, *(params[n] for n in names)])
        return out.detach(), gz, gp

    out0, gz0, gp0 = grads("none")
    out1, gz1, gp1 = grads(mode)
    # measured max abs differences: 0 (values), 0 (d/dz), 0 (d/dparams) on this CPU
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gz1, gz0, rtol=1e-5, atol=1e-7)
    for a, b in zip(gp1, gp0, strict=True):
        assert b.abs().sum() > 0  # gradients reach the UNet's functional parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not task.model.is_gradient_checkpointing  # block checkpointing never left on


def _saved_bytes(sampler, x_T, mode):
    """Bytes of the tensors the sampler's graph keeps for backward (outside checkpoints)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    weights = {p.untyped_storage().data_ptr() for p in sampler.unet.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sampler.sample(x_T.clone().requires_grad_(True), checkpoint=mode)
    return sum(n for ptr, n in seen.items() if ptr not in weights)


def test_checkpointing_keeps_memory_flat_in_k_and_auto_follows_the_budget(monkeypatch):
    import attacks.components.ddim_sampler as mod

    task = _task(seed=4)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    one = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=1)
    ten = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps=10)
    # without checkpointing the graph keeps K steps' activations; with it the K inputs and
    # the last step's activations (back-propagated first: recomputing it would save nothing)
    plain1, plain10 = _saved_bytes(one, x_T, "none"), _saved_bytes(ten, x_T, "none")
    assert plain10 > 9 * plain1  # measured 11.54 MB vs 1.154 MB: 10.0x
    assert _saved_bytes(ten, x_T, "sampler") < 1.05 * plain1  # measured 1.004x
    per_step = ten.step_activation_bytes(x_T)
    # the probe (on the meta device: no memory, no compute) measures one step's activations:
    # 1,169,808 B vs 1,153,936 B saved by the real K = 1 graph (1.014x); a real probe 1,153,424
    assert 0.95 * plain1 < per_step < 1.05 * plain1
    assert per_step == pytest.approx(ten.step_activation_bytes(x_T, meta=False), rel=0.03)
    assert ten.checkpoint_plan("auto", x_T) == ("none", 0)  # 10 x 1.15 MB < the 64 MiB floor
    assert ten.checkpoint_plan("sampler", x_T) == ("sampler", 9)  # never the last step
    # without the floor, the relative rule: weights 2.8 MB + one step 1.15 MB, half of that
    # holds one more step: the last 2 steps kept, the first 8 recomputed
    monkeypatch.setattr(mod, "AUTO_FLOOR_BYTES", 0)
    ten._auto.clear()
    assert ten.checkpoint_plan("auto", x_T) == ("sampler", 8)
    assert 1.9 * plain1 < _saved_bytes(ten, x_T, "auto") < 2.1 * plain1  # measured 2.00x
    # a budget of 4.5 steps: keep the last 4 steps' activations, recompute the first 6
    monkeypatch.setattr(mod, "AUTO_BUDGET_BYTES", int(4.5 * per_step))
    ten._auto.clear()
    assert ten.checkpoint_plan("auto", x_T) == ("sampler", 6)
    kept = _saved_bytes(ten, x_T, "auto")  # measured 4.00x one step
    assert 3.9 * plain1 < kept < 4.1 * plain1
    monkeypatch.setattr(mod, "AUTO_BUDGET_BYTES", per_step // 2)
    ten._auto.clear()
    assert ten.checkpoint_plan("auto", x_T) == ("full", 9)
    with torch.no_grad():
        assert ten.resolve_checkpoint("full", x_T) == "none"
    with pytest.raises(ValueError, match="checkpoint mode"):
        ten.resolve_checkpoint("blocks", x_T)


MiB = 1 << 20


@pytest.mark.parametrize(("k", "step", "weights", "kwargs", "plan"), [
    # the CIFAR-10 DDPM architecture at 32 px, batch 1 (probe: 43.2 MiB a step, 143 MB of
    # weights): half the one-step footprint holds 2 more steps -> keep 3, recompute 7 at K=10
    (10, 43 * MiB, 143 * MiB, {}, ("sampler", 7)),
    (4, 43 * MiB, 143 * MiB, {}, ("sampler", 1)),
    (3, 43 * MiB, 143 * MiB, {}, ("none", 0)),  # K small: nothing recomputed
    (1, 43 * MiB, 143 * MiB, {}, ("none", 0)),
    # the CelebA-HQ DDPM architecture at 256 px (one step outweighs the 455 MB of weights)
    (10, 2000 * MiB, 455 * MiB, {}, ("sampler", 9)),
    (2, 2000 * MiB, 455 * MiB, {}, ("sampler", 1)),
    # all K steps under the 64 MiB floor: never worth a recomputation
    (10, 6 * MiB, 1 * MiB, {}, ("none", 0)),
    (10, 6 * MiB, 1 * MiB, {"floor_bytes": 0}, ("sampler", 9)),
    # the device's free memory bounds the kept steps to half of it...
    (10, 43 * MiB, 143 * MiB, {"free_bytes": 4 * 43 * MiB}, ("sampler", 8)),
    # ... and when one step does not fit half of it, the UNet's blocks are checkpointed too
    (10, 43 * MiB, 143 * MiB, {"free_bytes": 80 * MiB}, ("full", 9)),
    (10, 43 * MiB, 143 * MiB, {"free_bytes": 80 * MiB, "blocks": False}, ("sampler", 9)),
    # an explicit budget replaces the relative rule (4.5 steps -> the last 4 kept)
    (10, 43 * MiB, 143 * MiB, {"budget_bytes": int(4.5 * 43 * MiB)}, ("sampler", 6)),
    (10, 43 * MiB, 143 * MiB, {"budget_bytes": 1 << 30}, ("none", 0)),
    (10, 43 * MiB, 143 * MiB, {"budget_bytes": 20 * MiB}, ("full", 9)),
])
def test_auto_plan_policy(k, step, weights, kwargs, plan):
    assert auto_plan(k, step, weights, **kwargs) == plan


@pytest.mark.parametrize("k", [2, 5, 10, 20, 50])
@pytest.mark.parametrize(("step", "weights"), [(43 * MiB, 143 * MiB), (500 * MiB, 455 * MiB),
                                               (2000 * MiB, 455 * MiB), (10 * MiB, 455 * MiB)])
def test_auto_plan_keeps_the_extra_activations_within_half_a_step_footprint(k, step, weights):
    # what the rule promises: the kept steps beyond the one always held add at most half of
    # the one-step footprint (weights + one step), and only steps that must go are recomputed
    mode, m = auto_plan(k, step, weights, floor_bytes=0)
    kept = k - m
    assert mode in ("none", "sampler")
    assert (kept - 1) * step <= 0.5 * (weights + step)
    if m:  # one more kept step would break the bound
        assert kept * step > 0.5 * (weights + step)


@pytest.mark.parametrize("name", ["gidm", "gidm_plus", "gias", "peer_diffusion_prior",
                                  "user_level_diffusion"])
def test_every_sampler_attack_has_the_checkpoint_option(name):
    from fl_sim.errors import ConfigError
    from fl_sim.registry import ATTACKS, validate_params

    cls = ATTACKS.get(name)
    extra = {} if name.startswith("gidm") else {"prior": "p"}
    assert validate_params(cls, extra, where=name)["checkpoint"] == "auto"
    assert validate_params(cls, {**extra, "checkpoint": "full"}, where=name)["checkpoint"] == "full"
    with pytest.raises(ConfigError, match=f"{name}.checkpoint"):
        validate_params(cls, {**extra, "checkpoint": "blocks"}, where=name)
    with pytest.raises(ConfigError, match="checkpoint"):
        cls(**extra, checkpoint="blocks")


def test_bad_steps_and_spacing_refused():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(100, 0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(100, 5, spacing="cubic")
