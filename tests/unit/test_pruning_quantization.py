"""Pruning and quantisation defenses (defenses/pruning.py, defenses/quantization.py).

Maths on seeded random tensors; the attack figure on a quantised update uses a real CIFAR-10
image (LeNet, 16x16, as the fast Inverting Gradients tests) and is marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_cases import cifar_images, cifar_labels, make_record, make_spec

from attacks.inverting_gradients import InvertingGradients
from defenses.base import UpdateContext
from defenses.pruning import Pruning, prune_top_k
from defenses.quantization import Quantization, scaled_sign, stochastic_quantize
from fl_sim.cases import with_update
from fl_sim.errors import ConfigError
from fl_sim.metrics import psnr
from fl_sim.registry import DEFENSES
from fl_sim.tasks import build_task

#: bars of the slow quality test (measured values and margins: tests/QUALITY_MARGINS.md)
MIN_DROP_DB = 3.0  # 4-bit stochastic and sign quantisation each cost plain IG this much
MIN_SIGN_ADAPTIVE_GAIN_DB = 0.5  # the adaptive attack's gain on sign updates
MIN_STOCHASTIC_ADAPTIVE_GAIN_DB = 2.0  # ... on 4-bit stochastic updates


def ctx(seed: int = 0) -> UpdateContext:
    return UpdateContext(kind="gradient", global_state={}, task=None, steps=(), lr=0.1,
                         num_examples=1, server_round=1, client_id=0,
                         generator=torch.Generator().manual_seed(seed))


def update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(20, 30, generator=g), "a.bias": torch.randn(20, generator=g),
            "b.weight": 0.01 * torch.randn(5, 20, generator=g)}


# -- pruning -------------------------------------------------------------------------------
def test_pruning_layer_scope_keeps_exactly_the_largest_tenth_of_each_tensor():
    u = update()
    out = Pruning(ratio=0.9).apply(u, ctx())
    for k, v in u.items():
        kept = out[k] != 0
        assert int(kept.sum()) == v.numel() - round(0.9 * v.numel())
        # every kept entry is at least as large as every dropped one, and kept ones are exact
        assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())
        torch.testing.assert_close(out[k][kept], v[kept], rtol=0, atol=0)
        assert out[k].dtype == v.dtype and out[k].shape == v.shape


def test_pruning_global_scope_ranks_all_tensors_together():
    u = update()
    out = prune_top_k(u, 0.9, scope="global")
    flat = torch.cat([v.flatten() for v in u.values()])
    kept = torch.cat([out[k].flatten() for k in u]) != 0
    assert int(kept.sum()) == flat.numel() - round(0.9 * flat.numel())
    assert float(flat[kept].abs().min()) >= float(flat[~kept].abs().max())
    assert int((out["b.weight"] != 0).sum()) == 0  # the small layer is pruned away entirely


def test_pruning_ratio_zero_is_identity():
    u = update()
    out = Pruning(ratio=0.0).apply(u, ctx())
    for k in u:
        assert torch.equal(out[k], u[k])


# -- quantisation --------------------------------------------------------------------------
def test_stochastic_quantisation_is_unbiased_over_seeds():
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    delta = 2 * float(x.abs().max()) / (2 ** 2 - 1)
    mean = torch.stack([stochastic_quantize(x, 2, torch.Generator().manual_seed(s))
                        for s in range(4000)]).mean(0)
    # per-coordinate std <= delta / 2; the mean of 4000 draws: <= delta / 126 (5 sigma: /25)
    assert float((mean - x).abs().max()) < delta / 25
    # and it is not the identity: single draws are coarse
    assert float((stochastic_quantize(x, 2, torch.Generator()) - x).abs().max()) > delta / 10


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_levels_are_2_pow_bits_on_the_max_abs_grid(bits: int):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(bits))
    x = torch.cat([x, -x])  # both ends of [-s, s] are hit exactly
    q = stochastic_quantize(x, bits, torch.Generator().manual_seed(0))
    s = float(x.abs().max())
    levels = torch.unique(q)
    assert levels.numel() == 2 ** bits
    grid = torch.linspace(-s, s, 2 ** bits)
    torch.testing.assert_close(levels, grid, rtol=0, atol=1e-5 * s)
    # each coordinate goes to one of its two neighbouring levels
    assert float((q - x).abs().max()) <= 2 * s / (2 ** bits - 1) + 1e-5


def test_stochastic_mode_uses_the_context_generator():
    u = update()
    d = Quantization(bits=4)
    a, b, c = d.apply(u, ctx(0)), d.apply(u, ctx(0)), d.apply(u, ctx(1))
    assert all(torch.equal(a[k], b[k]) for k in u)
    assert any(not torch.equal(a[k], c[k]) for k in u)


def test_sign_mode_is_the_mean_abs_scaled_sign():
    u = update()
    out = Quantization(mode="sign").apply(u, ctx())
    for k, v in u.items():
        torch.testing.assert_close(out[k], v.abs().mean() * torch.sign(v))
        assert torch.unique(out[k].abs()).numel() == 1
    assert scaled_sign(torch.tensor([2.0, -1.0, 0.0])).tolist() == [1.0, -1.0, 0.0]


def test_describe_carries_the_resolved_defaults():
    assert Quantization().describe() == {"name": "quantization", "mode": "stochastic",
                                         "bits": 4}
    assert Pruning().describe() == {"name": "pruning", "ratio": 0.9, "scope": "layer"}


@pytest.mark.parametrize("name,params,field", [
    ("pruning", {"ratio": 1.5}, "ratio"), ("pruning", {"ratio": -0.1}, "ratio"),
    ("pruning", {"scope": "row"}, "scope"), ("quantization", {"bits": 0}, "bits"),
    ("quantization", {"bits": 17}, "bits"), ("quantization", {"mode": "ternary"}, "mode"),
])
def test_bad_parameters_are_config_errors_naming_the_field(name, params, field):
    with pytest.raises(ConfigError, match=field):
        DEFENSES.create(name, _where="defenses[0]", **params)


@pytest.mark.slow
def test_inverting_gradients_on_quantised_updates(one_thread):
    """Figures (recorded in benchmarks/RESULTS.md): LeNet 16x16, CIFAR test image 0, IG 300
    iterations, labels granted: undefended 18.7 dB; 4-bit stochastic 13.7 dB, adaptive (dead
    zone) 18.4 dB; sign 14.6 dB, adaptive sign 15.8 dB (measured 2026-12-03)."""
    spec = make_spec("lenet", {}, image_size=16)
    task = build_task(spec, seed=0)
    task.model.eval()
    x, y = F.adaptive_avg_pool2d(cifar_images(1), 16), cifar_labels(1)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    scores = {}
    for label, d, adaptive in (("undefended", None, False),
                               ("stochastic", Quantization(), False),
                               ("stochastic adaptive", Quantization(), True),
                               ("sign", Quantization(mode="sign"), False),
                               ("sign adaptive", Quantization(mode="sign"), True)):
        r = rec if d is None else with_update(
            rec, d.apply(rec.update, ctx(0)), x, y, defenses=(d.describe(),))
        out = InvertingGradients(max_iterations=300, labels="granted", adaptive=adaptive)(
            r, generator=torch.Generator().manual_seed(0))
        scores[label] = float(psnr(out.images, x).mean())
    assert scores["undefended"] - scores["stochastic"] >= MIN_DROP_DB, scores
    assert scores["undefended"] - scores["sign"] >= MIN_DROP_DB, scores
    assert scores["sign adaptive"] - scores["sign"] >= MIN_SIGN_ADAPTIVE_GAIN_DB, scores
    assert (scores["stochastic adaptive"] - scores["stochastic"]
            >= MIN_STOCHASTIC_ADAPTIVE_GAIN_DB), scores
