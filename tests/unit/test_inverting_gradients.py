"""Inverting Gradients (Geiping et al. 2020) and its shared machinery.

Fast tests use small models on 16x16 CIFAR crops; the reference cases of FACTS.md
("Reference attack cases", breaching's figures) are marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_cases import (
    cifar_images,
    cifar_labels,
    fedavg_delta_record,
    make_record,
    make_spec,
    make_task,
)

from attacks.components.gradients import parameter_gradients, split_state, target_from_record
from attacks.components.objectives import (
    BNStatistics,
    NormalisedImages,
    bn_prior,
    cosine_distance,
    simulated_update,
    total_variation,
    unrolled_delta,
)
from attacks.inverting_gradients import InvertingGradients
from fl_sim.errors import ConfigError, InvalidRecordError, ThreatModelError
from fl_sim.metrics import psnr, score_reconstruction
from fl_sim.registry import ATTACKS
from fl_sim.tasks import build_task
from fl_sim.tasks.base import Batch

BN_PRIOR_WEIGHT = 1e-3  # BN prior ~12 at a real batch, ~90 at the random start (ConvNet-64)
#: bars of the quality tests below (measured values and margins: tests/QUALITY_MARGINS.md)
MIN_GAIN_DB = 6.0  # LeNet 16x16, image 0, 120 it: PSNR gain over the random start
REF_CONVNET_B1_DB = 17.5  # breaching: 17.6 dB
REF_CONVNET_B4_DB = 14.0  # breaching: 14.0 dB
REF_RESNET18_B1_DB = 15.8  # breaching: 15.85 dB
BN_PRIOR_MAX_LOSS_DB = 0.5  # the BN prior may cost at most this much PSNR (measured: -0.21)


def small_case(model: str = "convnet", n: int = 1, size: int = 16, seed: int = 0,
               params: dict | None = None):
    """A seeded eval-mode task on ``size``x``size`` CIFAR images (average-pooled)."""
    if params is None:
        params = {"width": 16} if model == "convnet" else {}
    spec = make_spec(model, params, image_size=size)
    task = build_task(spec, seed=seed)
    task.model.eval()
    images = F.adaptive_avg_pool2d(cifar_images(n), size)
    return task, spec, images, cifar_labels(n)


def init_psnr(spec, truth: torch.Tensor, seed: int) -> float:
    """PSNR of the attack's random start (same generator draw as restart 0)."""
    cand = NormalisedImages((1, *truth.shape), spec.mean, spec.std,
                            generator=torch.Generator().manual_seed(seed))
    cand.clamp_()
    return float(psnr(cand.images()[0].detach(), truth).mean())


# -- shared gradient module ---------------------------------------------------------------
def test_split_state_and_gradients_match_module_autograd():
    task, spec, x, y = small_case("convnet")
    params, buffers = split_state(task, task.model.state_dict())
    assert set(params) == {n for n, _ in task.model.named_parameters()}
    assert "features.bn0.running_mean" in buffers
    grads = parameter_gradients(task, params, buffers, Batch(x, y), {})
    task.model.zero_grad()
    F.cross_entropy(task.model(task.normalize(x)), y).backward()
    for name, p in task.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
        assert not grads[name].requires_grad


def test_split_state_names_missing_entry():
    task, *_ = small_case("lenet")
    state = dict(task.model.state_dict())
    state.pop("fc.bias")
    with pytest.raises(InvalidRecordError, match="fc.bias"):
        split_state(task, state)


def test_target_from_record_drops_buffers():
    task, spec, x, y = small_case("convnet", n=2)
    rec = fedavg_delta_record(task, spec, x, y, lr=0.1, steps=1, batch_size=2)
    assert "features.bn0.running_mean" in rec.update
    target = target_from_record(rec, task)
    assert list(target) == [n for n, _ in task.model.named_parameters()]


# -- objectives -----------------------------------------------------------------------------
def test_cosine_distance_matches_flattened_cosine():
    g = {"a": torch.randn(3, 4, 5), "b": torch.randn(3, 7)}
    t = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    flat_g = torch.cat([g["a"].flatten(1), g["b"]], 1)
    flat_t = torch.cat([t["a"].flatten(), t["b"]])
    expected = 1 - F.cosine_similarity(flat_g, flat_t.expand_as(flat_g), dim=1)
    torch.testing.assert_close(cosine_distance(g, t), expected)
    assert float(cosine_distance({"a": t["a"][None] * 3, "b": t["b"][None] * 3}, t)[0]) < 1e-6


def test_total_variation_zero_on_constant_and_per_restart():
    x = torch.zeros(2, 1, 3, 8, 8)
    x[1, 0, :, :, 4:] = 1.0
    tv = total_variation(x)
    assert tv.shape == (2,) and float(tv[0]) == 0.0 and float(tv[1]) > 0


def test_unrolled_delta_matches_torch_sgd():
    task, spec, x, y = small_case("convnet", n=4)
    rec = fedavg_delta_record(task, spec, x, y, lr=0.05, steps=3, batch_size=2)  # wraps around
    params, buffers = split_state(task, rec.global_params)
    delta, _ = unrolled_delta(task, params, buffers, x, y, lr=0.05, steps=3, batch_size=2)
    for name in params:
        torch.testing.assert_close(delta[name], rec.update[name], rtol=1e-3, atol=1e-6)


def test_vmapped_restarts_equal_separate_calls(one_thread):
    task, spec, x, y = small_case("convnet", n=2)
    params, buffers = split_state(task, task.model.state_dict())
    images = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for unroll in (None, (0.1, 2, 1)):
        batched, _ = simulated_update(task, params, buffers, images, y, unroll=unroll)
        for r in range(2):
            single, _ = simulated_update(task, params, buffers, images[r:r + 1], y,
                                         unroll=unroll)
            for name in params:
                torch.testing.assert_close(batched[name][r], single[name][0],
                                           rtol=1e-4, atol=1e-6)


def test_bn_prior_minimal_at_true_batch_larger_at_noise():
    task, spec, x, y = small_case("convnet", n=8)
    # running statistics := the true batch's statistics (momentum 1, one train-mode pass)
    for m in task.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum, m.track_running_stats = 1.0, True
    task.model.train()
    with torch.no_grad():
        task.model(task.normalize(x))
    task.model.eval()
    params, buffers = split_state(task, task.model.state_dict())
    bn = BNStatistics(task.model)

    def prior(images):
        _, p = simulated_update(task, params, buffers, images[None], y, unroll=None, bn=bn)
        return float(p[0])

    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    # not exactly 0: running_var holds the unbiased batch variance, the prior the biased one
    assert prior(x) < 1e-2 * prior(noise)
    # the single-restart path the attack takes (plain autograd, lean or stock) computes the
    # same prior, and it reaches the images
    from attacks.inverting_gradients import InversionProblem, _update_fn
    problem = InversionProblem(task, params, buffers, {}, y, None, tuple(x.shape[1:]),
                               spec.mean, spec.std)
    for mode in ("lean", "autograd"):
        z = x[None].clone().requires_grad_(True)
        _, p = _update_fn(problem, bn, mode)(z)
        assert p is not None
        assert float(p[0].detach()) == pytest.approx(prior(x), rel=1e-4)
        (g,) = torch.autograd.grad(p.sum(), z)
        assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatistics(small_case("lenet")[0].model)
    stats = [(torch.zeros(4), torch.ones(4))]
    zero = bn_prior(stats, {"m": torch.zeros(4), "v": torch.ones(4)}, [("m", "v")])
    assert float(zero) == 0.0


# -- the attack -----------------------------------------------------------------------------
def test_registered_and_config_validated():
    assert ATTACKS.get("inverting_gradients") is InvertingGradients
    assert InvertingGradients(labels="granted").required_knowledge() == ("labels",)
    assert InvertingGradients().required_knowledge() == ()
    for bad in ({"max_iterations": 0}, {"restarts": 0}, {"lr": 0.0}, {"tv_weight": -1.0},
                {"labels": "oracle"}, {"multi_step": "twice"}, {"schedule": "exp"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            InvertingGradients(**bad)
    with pytest.raises(ConfigError, match="labels"):
        ATTACKS.create("inverting_gradients", labels="oracle")


def test_granted_labels_required_by_threat_model():
    task, spec, x, y = small_case("lenet")
    rec = make_record(task, spec, x, y)
    with pytest.raises(ThreatModelError, match="labels"):
        InvertingGradients(labels="granted", max_iterations=1)(rec)


def test_bn_prior_on_model_without_batchnorm_is_config_error():
    task, spec, x, y = small_case("lenet")
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    with pytest.raises(ConfigError, match="BatchNorm"):
        InvertingGradients(labels="granted", bn_prior_weight=0.1, max_iterations=1)(rec)


def test_small_reconstruction_beats_random_start(one_thread):
    task, spec, x, y = small_case("lenet")
    rec = make_record(task, spec, x, y)  # labels recovered with iDLG
    attack = InvertingGradients(max_iterations=120)
    out = attack(rec, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == x.shape and out.labels.tolist() == y.tolist()
    assert out.knowledge["labels"] == "idlg"
    gained = float(psnr(out.images, x).mean()) - init_psnr(spec, x, seed=0)
    assert gained >= MIN_GAIN_DB, gained


def test_best_restart_is_returned(one_thread):
    task, spec, x, y = small_case("lenet", n=2)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    last = {}
    out = InvertingGradients(max_iterations=15, restarts=3, labels="granted",
                             restart_pruning="none").reconstruct(
        rec, generator=torch.Generator().manual_seed(3),
        callback=lambda it, imgs: last.update(images=imgs))
    objectives = out.extras["restart_objectives"]
    assert len(objectives) == 3 and len(set(objectives)) == 3
    best = min(range(3), key=objectives.__getitem__)
    assert out.extras["best_restart"] == best and out.extras["survivors"] == [0, 1, 2]
    assert out.extras["pruning"] == [] and out.extras["evaluations"] == 3 * 16
    assert out.matching_loss == pytest.approx(objectives[best])
    torch.testing.assert_close(out.images, last["images"][best].clamp(0, 1))


def test_pruning_schedule_halves_before_first_lr_drop():
    from attacks.inverting_gradients import pruning_schedule
    assert pruning_schedule(8, 160) == [(10, 4), (20, 2), (40, 1)]  # 1/16, 1/8, 1/4
    assert pruning_schedule(8, 160, keep=2) == [(20, 4), (40, 2)]
    assert pruning_schedule(3, 100) == [(12, 2), (25, 1)]
    assert pruning_schedule(1, 100) == [] and pruning_schedule(8, 2) == [(1, 4)]
    assert pruning_schedule(8, 4) == [(1, 4), (2, 2), (3, 1)]
    with pytest.raises(ConfigError, match="restart_pruning"):
        InvertingGradients(restart_pruning="random")
    with pytest.raises(ConfigError, match="restart_keep"):
        InvertingGradients(restart_keep=0)


def test_halving_prunes_by_objective_and_returns_best_survivor(one_thread):
    """R = 8 with halving: pruned restarts scored worse at their pruning point than the kept
    ones, the winner is the best survivor, and the work is <= 4x one restart."""
    task, spec, x, y = small_case("lenet", n=1)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    iters, last = 32, {}
    out = InvertingGradients(max_iterations=iters, restarts=8, labels="granted",
                             restart_keep=2).reconstruct(
        rec, generator=torch.Generator().manual_seed(3),
        callback=lambda it, imgs: last.update(images=imgs))
    ex = out.extras
    assert ex["restart_pruning"] == "halving"
    assert [p["iteration"] for p in ex["pruning"]] == [4, 8]
    alive = list(range(8))
    for p in ex["pruning"]:
        assert p["candidates"] == alive and len(p["kept"]) == len(alive) // 2
        score = dict(zip(p["candidates"], p["objectives"], strict=True))
        assert max(score[k] for k in p["kept"]) <= min(score[d] for d in p["dropped"])
        alive = p["kept"]
    assert ex["survivors"] == alive and len(alive) == 2
    objectives = ex["restart_objectives"]
    pos = min(range(2), key=objectives.__getitem__)
    assert ex["best_restart"] == alive[pos]
    assert out.matching_loss == pytest.approx(min(objectives))
    torch.testing.assert_close(out.images, last["images"][pos].clamp(0, 1))
    # slicing the batch and Adam's moments leaves each survivor's trajectory unchanged
    full = InvertingGradients(max_iterations=iters, restarts=8, labels="granted",
                              restart_pruning="none")(
        rec, generator=torch.Generator().manual_seed(3)).extras["restart_objectives"]
    assert objectives == pytest.approx([full[i] for i in alive], rel=1e-4)
    # the default keep=1: 8 restarts cost at most 4x one restart in gradient evaluations
    one = InvertingGradients(max_iterations=iters, restarts=1, labels="granted")(
        rec, generator=torch.Generator().manual_seed(3)).extras["evaluations"]
    eight = InvertingGradients(max_iterations=iters, restarts=8, labels="granted")(
        rec, generator=torch.Generator().manual_seed(3))
    assert one == iters + 1 and len(eight.extras["survivors"]) == 1
    assert eight.extras["evaluations"] <= 4 * one, eight.extras["evaluations"]


# -- reference cases (FACTS.md), slow ---------------------------------------------------------
def _reference(model: str, n: int, iterations: int, **kw) -> float:
    task, spec = make_task(model)
    x, y = cifar_images(n), cifar_labels(n)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    out = InvertingGradients(max_iterations=iterations, labels="granted", **kw)(
        rec, generator=torch.Generator().manual_seed(0))
    return score_reconstruction(out.images, x)["psnr"]


@pytest.mark.slow
def test_reference_convnet_batch1_600_iterations():
    assert _reference("convnet", 1, 600) >= REF_CONVNET_B1_DB


@pytest.mark.slow
def test_reference_convnet_batch4_200_iterations():
    assert _reference("convnet", 4, 200) >= REF_CONVNET_B4_DB


@pytest.mark.slow
def test_reference_resnet18_batch1_600_iterations():
    assert _reference("resnet18", 1, 600) >= REF_RESNET18_B1_DB


def test_unrolled_objective_is_exact_where_single_gradient_is_not(one_thread):
    """At the true images the unrolled FedAvg objective is ~0; one gradient is only close."""
    from attacks.inverting_gradients import _update_fn
    task, spec, x, y = small_case("lenet", n=8)
    rec = fedavg_delta_record(task, spec, x, y, lr=1.0, steps=4, batch_size=2,
                       knowledge={"labels": y})
    dist = {}
    for mode in ("unroll", "single"):
        problem, _ = InvertingGradients(labels="granted", multi_step=mode).problem(
            rec, generator=torch.Generator())
        upd, _ = _update_fn(problem, None)(x[None])
        dist[mode] = float(cosine_distance(upd, problem.target)[0])
    assert dist["unroll"] < 1e-5 and dist["single"] > 1e-3, dist


# unrolled vs single-gradient FedAvg inversion (>= 2 dB): tests/unit/test_multistep.py


def _convnet_with_cifar_bn_statistics():
    """ConvNet-64 whose BN running statistics come from the 128 vendored CIFAR-10 training
    images (tests/data/cifar10_ref.npz)."""
    from attack_cases import cifar_train_images

    task, spec = make_task("convnet")
    train = cifar_train_images(128)
    for m in task.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    task.model.train()
    with torch.no_grad():
        for b in train.split(128):
            task.model(task.normalize(b))
    task.model.eval()
    return task, spec


@pytest.mark.slow
def test_bn_prior_does_not_hurt_batch4_with_real_running_statistics():
    task, spec = _convnet_with_cifar_bn_statistics()
    x, y = cifar_images(4), cifar_labels(4)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    scores, images = {}, {}
    for weight in (0.0, BN_PRIOR_WEIGHT):
        out = InvertingGradients(max_iterations=100, labels="granted", bn_prior_weight=weight)(
            rec, generator=torch.Generator().manual_seed(0))
        scores[weight] = score_reconstruction(out.images, x)["psnr"]
        images[weight] = out.images
    assert not torch.equal(images[0.0], images[BN_PRIOR_WEIGHT])  # the prior is in use
    assert scores[0.0] - scores[BN_PRIOR_WEIGHT] <= BN_PRIOR_MAX_LOSS_DB, scores
