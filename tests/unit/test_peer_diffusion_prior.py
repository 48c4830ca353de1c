"""Curious peer + diffusion prior (``peer_diffusion_prior``): restoration must not hurt SSIM.

The case (:func:`fl_sim.cases.digits_peer_case`, a recorded run read through the PEER view):
a classifier on grey 16x16 digits (the project's sigmoid LeNet, seeded, untrained); the peer
is client 0; ``others`` clients hold one digit of the TEST split each (disjoint from the
TRAIN split the session's ``digits_prior`` saw, checked by content hash in the slow test) and
send FedSGD gradients; the peer derives their mean from consecutive globals and recovers the
labels itself (nothing is granted to a peer).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler
from diffusion_cases import (  # noqa: F401  (digits_prior is a fixture)
    IMAGE_SIZE,
    digits_prior,
)

from attacks.components.ddim_sampler import DDIMSampler
from attacks.peer_diffusion_prior import PeerDiffusionPrior, ddim_invert, project
from attacks.peer_inversion import PeerInversion
from fl_sim.attack_runner import _score_phases
from fl_sim.cases import digits_peer_case, digits_splits, others_truth
from fl_sim.cases import digits_spec as digits_spec
from fl_sim.errors import ConfigError, FlSimError, MissingResourceError
from fl_sim.metrics import label_accuracy, score_reconstruction
from fl_sim.models import build_model
from fl_sim.prior_overlap import prior_overlap
from fl_sim.priors import load_prior, save_prior
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.run_dir import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

#: the inversion of the quality case: IG on the sigmoid LeNet (no TV, see README), labels
#: recovered by the peer (``auto``: batch label recovery for several images)
INVERSION = {"max_iterations": 200, "labels": "auto", "tv_weight": 0.0}
#: bars of the slow quality test (measured values in its docstring and tests/QUALITY_MARGINS.md)
MIN_SSIM_GAIN = 0.0  # mean SSIM after the prior − before
MAX_BEFORE_SSIM = 0.95  # the plain reconstruction is imperfect
MIN_MOVED_MSE = 0.001  # the prior really moved the images (MSE after vs before)
MIN_LABEL_ACCURACY = 0.9  # the labels the peer recovered itself


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    return digits_splits()


def peer_case(path: Path, others: int, *, start: int = 0, model: str = "lenet",
              seed: int = 0) -> tuple[ObservationRecord, torch.Tensor]:
    """``(peer record, truth [others, 1, 16, 16])`` of :func:`digits_peer_case` recorded in
    ``path``: client 0's peer view of round 1 (granted nothing), and the others' images from
    the truth store (for scoring only)."""
    run = load_run(digits_peer_case(path, others, start=start, model=model, seed=seed))
    return run.view("peer", client=0).record(1), others_truth(run, 1, 0)[0]


def tiny_prior(path: Path, *, size: int = IMAGE_SIZE, channels: int = 1) -> Path:
    """An untrained tiny-UNet prior (seeded) saved like ``fl-sim train-prior`` saves one."""
    unet = build_model("unet", channels, 10, size, seed=0, params={"preset": "tiny"})
    sched = DDPMScheduler(num_train_timesteps=100)
    meta = {"data": {"name": "digits", "image_size": size}, "filter": {"split": "train"}}
    return save_prior(path, unet, sched, metadata=meta)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, FlSimError), msg
    return msg


def test_registered_peer_view_and_prior_required():
    assert ATTACKS.get("peer_diffusion_prior") is PeerDiffusionPrior
    assert PeerDiffusionPrior.view == "peer" and issubclass(PeerDiffusionPrior, PeerInversion)
    with pytest.raises(ConfigError) as exc:
        ATTACKS.create("peer_diffusion_prior", _where="attack peer_diffusion_prior")
    assert "peer_diffusion_prior.prior" in _one_line(exc) and "train-prior" in str(exc.value)
    with pytest.raises(ConfigError, match="fidelity_pool"):
        PeerDiffusionPrior(prior="p", fidelity_pool=0)
    with pytest.raises(ConfigError, match="latent_init"):
        ATTACKS.create("peer_diffusion_prior", prior="p", latent_init="zeros")


def test_missing_prior_path_fails_before_the_inversion(tmp_path):
    record, _ = peer_case(tmp_path / "case", 2)
    seen: list[int] = []
    attack = PeerDiffusionPrior(prior=str(tmp_path / "nope"), max_iterations=5)
    with pytest.raises(MissingResourceError) as exc:
        attack.reconstruct(record, generator=torch.Generator(),
                           callback=lambda i, x: seen.append(i))
    assert str(tmp_path / "nope") in _one_line(exc)
    assert seen == []  # refused before any inversion step


@pytest.mark.parametrize(("size", "channels", "pool", "what"),
                         [(8, 1, 4, "1x8x8 images"), (16, 3, 4, "3x16x16 images"),
                          (16, 1, 32, "fidelity_pool")])
def test_prior_of_another_shape_is_one_line(tmp_path, size, channels, pool, what):
    record, _ = peer_case(tmp_path / "case", 2)
    path = tiny_prior(tmp_path / "p", size=size, channels=channels)
    with pytest.raises(ConfigError) as exc:
        PeerDiffusionPrior(prior=str(path), max_iterations=1, fidelity_pool=pool)(record)
    assert what in _one_line(exc)


class _ConstantEps(torch.nn.Module):
    """A noise predictor whose output ignores ``x`` and ``t``: DDIM inversion is then exact."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.pattern = pattern

    def forward(self, x, t, return_dict=False):
        return (self.pattern.expand_as(x),)


def test_round_trip_and_projection_on_an_untrained_prior(tmp_path):
    """The pieces on a seeded untrained prior: DDIM inversion is the sampler run backwards
    (exact when eps does not depend on x, t), the projection lowers its pooled MSE, and the
    attack's before_images are exactly peer_inversion's images (same seed)."""
    prior = load_prior(tiny_prior(tmp_path / "p"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    stub = _ConstantEps(torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g))
    exact = DDIMSampler.from_scheduler(stub, prior.scheduler, 4)
    z = ddim_invert(exact, x0 * 2 - 1)
    assert z.std() > 0.5 and torch.allclose(exact.sample(z), x0 * 2 - 1, atol=1e-4)
    sampler = DDIMSampler.from_scheduler(prior.unet, prior.scheduler, 3)
    z0 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    _, _, history = project(sampler, x0, z0, iterations=8, lr=0.05, pool=4)
    assert history[-1] < 0.8 * history[0], history
    record, _ = peer_case(tmp_path / "case", 3)
    kw = {"max_iterations": 10, "labels": "auto", "tv_weight": 0.0}
    out = PeerDiffusionPrior(prior=str(prior.path), projection_iterations=2, sampler_steps=2,
                             **kw)(record, generator=torch.Generator().manual_seed(0))
    plain = PeerInversion(**kw)(record, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.extras["before_images"], plain.images)
    assert out.images.shape == plain.images.shape and not torch.equal(out.images, plain.images)
    assert out.knowledge["prior"] == str(prior.path)
    # independence from the victims is measured by the scorer (prior_overlap), never asserted
    assert "disjoint_from_victims" not in out.knowledge["prior_data"]


@pytest.mark.slow
def test_prior_raises_mean_ssim_on_the_peer_reconstructions(digits_prior, tmp_path):  # noqa: F811
    """Issue 10's bar: mean SSIM after the prior >= before, per image recorded.

    16 other clients, one TEST digit each (the prior saw only TRAIN digits: overlap 0 by
    content hash), FedSGD, the sigmoid LeNet; the record is the peer's view of a recorded run
    (:func:`fl_sim.cases.digits_peer_case`), labels recovered by the peer (``auto``); IG 200
    iterations; the attack's defaults for the projection (20 iterations, 5 DDIM steps, 4x4
    pooling, DDIM-inversion start). Re-measured 2026-12-07 (this seed, the session's 400-step
    prior; before, the peer was wrongly granted the others' true labels on a hand-built
    record: 0.805 -> 0.890): mean SSIM 0.806 -> 0.886, PSNR 17.73 -> 20.22 dB, labels 16/16,
    MSE after vs before 0.0197 (per image in ``benchmarks/RESULTS.md``, "Peer +
    diffusion prior").
    """
    run = load_run(digits_peer_case(tmp_path / "case", 16))
    record = run.view("peer", client=0).record(1)
    truth, true_labels = others_truth(run, 1, 0)
    assert prior_overlap(digits_prior, truth)["count"] == 0  # the victims are unseen
    out = PeerDiffusionPrior(prior=str(digits_prior), **INVERSION)(
        record, generator=torch.Generator().manual_seed(0))
    before = score_reconstruction(out.extras["before_images"], truth)
    after = score_reconstruction(out.images, truth)
    per_image = list(zip(before["ssim_per_image"], after["ssim_per_image"], strict=True))
    assert after["ssim"] - before["ssim"] >= MIN_SSIM_GAIN, per_image
    assert before["ssim"] < MAX_BEFORE_SSIM, before["ssim"]
    assert out.extras["mse_after_to_before"] > MIN_MOVED_MSE
    assert float(label_accuracy(out.labels, true_labels)) >= MIN_LABEL_ACCURACY
    # the runner scores before_images beside the final images: both in one result
    phases = _score_phases(out.extras, truth)
    assert phases["before_ssim"] == pytest.approx(before["ssim"])
    assert phases["before_psnr"] == pytest.approx(before["psnr"])
