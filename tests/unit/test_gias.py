"""GIAS with a diffusion prior (``gias``): bad inputs, and the quality bar vs Inverting Gradients.

The quality case: breaching's ReLU ConvNet (:data:`MODEL`; seeded, untrained, eval mode) on
grey 16x16 digits; one client's FedSGD gradient of a batch of 4 digits of the TEST split
(disjoint from the TRAIN split the session's ``digits_prior`` saw), batches = TEST digits 0-3
and 4-7 (the first two by index), labels granted (the test measures images, not label
recovery). Built without Ray, as a client computes its gradient, and read through the
server view (:func:`fl_sim.cases.gias.gias_case`). The bar (issue 10, made
strict by issue 18): GIAS beats Inverting Gradients, run as its paper runs it (TV 0.2,
:data:`IG_BASE`), at EQUAL WALL TIME on the same gradient in PSNR AND in SSIM, on each batch,
by the margins :data:`MIN_PSNR_GAIN_DB` / :data:`MIN_SSIM_GAIN` (measured values:
tests/QUALITY_MARGINS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_cases import digits_prior  # noqa: F401  (fixture)
from test_peer_diffusion_prior import _digits, _one_line, tiny_prior

from attacks.components.gradients import parameter_gradients, split_state
from attacks.gias import GIAS
from attacks.inverting_gradients import InvertingGradients
from fl_sim.attack_runner import _score_phases
from fl_sim.cases import rerecord
from fl_sim.cases.gias import GIAS_BUDGET, IG_BASE, MODEL, gias_case
from fl_sim.errors import ConfigError, MissingResourceError
from fl_sim.metrics import score_reconstruction
from fl_sim.records import TruthStep
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

#: IG's iterations in the CI test: what fit in GIAS's wall time when measured live
#: (benchmarks/gias.py: 271 and 295 iterations on batches 0 and 4, one thread, shared 2-core
#: machine), rounded up in IG's favour. A fixed count keeps the test deterministic; the
#: benchmark measures the equal-time count live.
IG_EQUAL_TIME_ITERATIONS = 300
#: the bar, both metrics on each batch: GIAS PSNR - IG PSNR (measured min 4.85 dB, batch 4)
MIN_PSNR_GAIN_DB = 2.0
#: ... and GIAS SSIM - IG SSIM (measured min 0.453, batch 4)
MIN_SSIM_GAIN = 0.2


# -- bad input (fast) -------------------------------------------------------------------------


def test_registered_server_view_and_prior_required():
    assert ATTACKS.get("gias") is GIAS and GIAS.view == "server"
    with pytest.raises(ConfigError) as exc:
        ATTACKS.create("gias", _where="attack gias")
    assert "gias.prior" in _one_line(exc) and "train-prior" in str(exc.value)
    for bad in ({"phase1_iterations": -1}, {"sampler_steps": 0}, {"lr_params": 0.0},
                {"distance": "l1"}, {"drift_weight": -1.0}):
        with pytest.raises(ConfigError, match=f"gias.{next(iter(bad))}"):
            GIAS(prior="p", **bad)
    assert GIAS(prior="p", labels="granted").required_knowledge() == ("labels",)


def test_missing_prior_path_fails_before_any_step(tmp_path):
    record, _ = gias_case(n=2)
    seen: list[int] = []
    attack = GIAS(prior=str(tmp_path / "nope"), phase1_iterations=2, labels="granted")
    with pytest.raises(MissingResourceError) as exc:
        attack.reconstruct(record, generator=torch.Generator(),
                           callback=lambda p, i, x: seen.append(i))
    assert str(tmp_path / "nope") in _one_line(exc) and seen == []


@pytest.mark.parametrize(("size", "channels", "what"), [(8, 1, "1x8x8"), (16, 3, "3x16x16")])
def test_prior_of_another_shape_is_one_line(tmp_path, size, channels, what):
    record, _ = gias_case(n=2)
    path = tiny_prior(tmp_path / "p", size=size, channels=channels)
    with pytest.raises(ConfigError) as exc:
        GIAS(prior=str(path), labels="granted").reconstruct(record,
                                                             generator=torch.Generator())
    msg = _one_line(exc)
    assert "gias.prior" in msg and what in msg and "1x16x16" in msg


def test_phases_shapes_and_monotone_matching(tmp_path):
    """A tiny run on an untrained prior: shapes, phase-1 images scored by the runner, phase 2
    (seeded with phase 1's best) never matches worse, the drift is reported, seeded."""
    record, truth = gias_case(n=2)
    path = tiny_prior(tmp_path / "p")
    attack = GIAS(prior=str(path), phase1_iterations=3, phase2_iterations=2, sampler_steps=2,
                  labels="granted")
    phases: list[int] = []
    out = attack.reconstruct(record, generator=torch.Generator().manual_seed(0),
                             callback=lambda p, i, x: phases.append(p))
    assert out.images.shape == (2, 1, 16, 16) and out.labels.tolist() == record.knowledge[
        "labels"].tolist()
    assert phases == [1, 1, 1, 2, 2]
    assert out.extras["phase2_matching_loss"] <= out.extras["phase1_matching_loss"]
    assert out.extras["relative_drift"] > 0
    assert set(_score_phases(out.extras, truth)) == {"phase1_psnr", "phase1_ssim"}
    again = attack.reconstruct(record, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.images, again.images)


def test_checkpointing_reaches_both_phases_and_changes_no_result(tmp_path, monkeypatch):
    """Phase 2 differentiates per-image FUNCTIONAL copies of the prior's weights (where
    diffusers' stock block checkpointing gets gradients wrong): with ``"full"`` (sampler steps
    and UNet blocks) the sampler gets the mode in both phases and the images equal those
    without checkpointing (measured max abs diff 0)."""
    mode = "full"
    from attacks.components.ddim_sampler import DDIMSampler

    record, _ = gias_case(n=2)
    path = tiny_prior(tmp_path / "p")
    seen: list[object] = []
    sample = DDIMSampler.sample

    def spy(self, x_T, **kw):
        seen.append((kw.get("params") is not None, kw.get("checkpoint")))
        return sample(self, x_T, **kw)
    monkeypatch.setattr(DDIMSampler, "sample", spy)
    out = {}
    for ckpt in ("none", mode):
        attack = GIAS(prior=str(path), phase1_iterations=1, phase2_iterations=1,
                      sampler_steps=2, labels="granted", checkpoint=ckpt)
        out[ckpt] = attack.reconstruct(record, generator=torch.Generator().manual_seed(0))
    assert {(False, mode), (True, mode)} <= set(seen)  # phase 1 (own weights), 2 (functional)
    torch.testing.assert_close(out[mode].images, out["none"].images, rtol=0, atol=1e-5)
    assert out[mode].matching_loss == pytest.approx(out["none"].matching_loss, rel=1e-5)


def test_fedavg_delta_is_unrolled_as_inverting_gradients(tmp_path):
    """A FedAvg delta (2 local SGD steps of batch 2 on 4 images) is matched by unrolling, with
    the same assumptions recorded as ``inverting_gradients`` records."""
    record, _ = gias_case(n=4)
    from fl_sim.tasks import build_task

    task = build_task(record.spec, seed=0)
    task.model.eval()
    p, buffers = split_state(task, record.global_params)
    x = torch.as_tensor(_digits().test.images[:4]).float()
    y = record.knowledge["labels"]
    for k in range(2):
        g = parameter_gradients(task, p, buffers, Batch(x[2 * k:2 * k + 2], y[2 * k:2 * k + 2]))
        p = {name: v - 0.1 * g[name] for name, v in p.items()}
    delta = {name: p[name] - v for name, v in split_state(task, record.global_params)[0].items()}
    rec = rerecord(record, delta, update_kind="delta", local_steps=2, lr=0.1, batch_size=2,
                   num_examples=4, steps=[TruthStep(k, x[2 * k:2 * k + 2], y[2 * k:2 * k + 2],
                                                    torch.arange(2 * k, 2 * k + 2))
                                          for k in range(2)])
    attack = GIAS(prior=str(tiny_prior(tmp_path / "p")), phase1_iterations=2,
                  phase2_iterations=1, sampler_steps=2, labels="granted")
    out = attack.reconstruct(rec, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 1, 16, 16)
    assert out.knowledge["local_training"]["local_steps"] == 2
    assert 0 <= out.extras["phase1_matching_loss"] <= 2


# -- quality bar (slow) -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("start", [0, 4])
def test_gias_beats_ig_at_equal_wall_time(digits_prior: Path, start: int):  # noqa: F811
    """Batch 4 of TEST digits on the ConvNet: GIAS (50 latent + 6 parameter iterations, K = 3)
    vs IG with the iterations that fit in the same seconds (:data:`IG_EQUAL_TIME_ITERATIONS`).
    Measured 2026-12-07 (one thread, shared 2-core CPU): batch 0 GIAS 16.95 dB / SSIM 0.791 vs
    IG 10.00 / 0.149; batch 4 GIAS 15.12 / 0.747 vs IG 10.27 / 0.294. IG without TV (how this
    test ran it before, not its paper's setting) scores 11.00 / 0.701 and 14.43 / 0.851: TV 0.2
    over-smooths these digits, so against that baseline GIAS would lose SSIM on batch 4 (the
    old "PSNR or SSIM" bar passed there by 0.38 dB). Figures of >= 8 images:
    benchmarks/RESULTS.md (GIAS section)."""
    record, truth = gias_case(start, **MODEL)
    gias = GIAS(prior=str(digits_prior), **GIAS_BUDGET)(
        record, generator=torch.Generator().manual_seed(0))
    ig = InvertingGradients(max_iterations=IG_EQUAL_TIME_ITERATIONS, **IG_BASE)(
        record, generator=torch.Generator().manual_seed(0))
    s_gias, s_ig = score_reconstruction(gias.images, truth), score_reconstruction(ig.images, truth)
    assert s_gias["psnr"] - s_ig["psnr"] >= MIN_PSNR_GAIN_DB, (s_gias, s_ig)
    assert s_gias["ssim"] - s_ig["ssim"] >= MIN_SSIM_GAIN, (s_gias, s_ig)
    # phase 2 (per-image weights, seeded with phase 1's best) never matches worse
    assert gias.extras["phase2_matching_loss"] <= gias.extras["phase1_matching_loss"]
