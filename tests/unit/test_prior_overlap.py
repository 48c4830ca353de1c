"""A prior's independence from the victims is measured, not asserted (issue 18, item 3).

The session's digits prior (``fl-sim train-prior`` on the digits TRAIN split, whose
examples.json now records a content hash per training image); victims are either TEST
digits (a disjoint prior: overlap 0) or TRAIN digits it saw (overlap > 0, and the report
warns). The cases: the first 4 digits of a split
by index, fixed before any outcome.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusion_cases import digits_prior  # noqa: F401  (a fixture)

from fl_sim.attack_runner import replay
from fl_sim.bench.outputs import overlap_text
from fl_sim.cases import DIGITS, CaseClient, build_case, digits_splits
from fl_sim.cases import digits_spec as classifier_spec
from fl_sim.prior_overlap import (
    image_hashes,
    overlap_warning,
    prior_overlap,
    prior_training_hashes,
)
from fl_sim.report import write_report
from fl_sim.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4  # victims: the first N digits of a split


@pytest.fixture
def tiny_digits_prior(digits_prior: Path) -> Path:  # noqa: F811
    """The session's digits prior (tests/diffusion_cases.py; trained by fl-sim train-prior
    on the TRAIN split): this file shares its xdist group, so it costs nothing extra."""
    return digits_prior


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = getattr(digits_splits(), split)
    return torch.as_tensor(s.images[:N]).float(), torch.as_tensor(s.labels[:N]).long()


def test_hashes_follow_the_image_content():
    u8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    x = u8.float() / 255.0
    assert image_hashes(x) == image_hashes(x.clone().double())  # same content, same hash
    assert image_hashes(x)[0] != image_hashes(x)[1]
    y = x.clone()
    y[0, 0, 0, 0] = (u8[0, 0, 0, 0].float() + (1 if u8[0, 0, 0, 0] < 255 else -1)) / 255
    assert image_hashes(y)[0] != image_hashes(x)[0]  # one grey level of one pixel differs


def test_overlap_zero_for_test_digits_and_full_for_the_training_digits(tiny_digits_prior):
    examples = json.loads((tiny_digits_prior / "examples.json").read_text())
    assert len(examples["hashes"]) == len(examples["indices"]) > 0
    test_x, _ = _digits("test")
    train = digits_splits().train
    seen = torch.as_tensor(train.images)[torch.as_tensor(examples["indices"][:N])].float()
    disjoint, overlapping = prior_overlap(tiny_digits_prior, test_x), \
        prior_overlap(tiny_digits_prior, seen)
    assert (disjoint["count"], disjoint["fraction"], disjoint["victims"]) == (0, 0.0, N)
    assert (overlapping["count"], overlapping["fraction"]) == (N, 1.0)
    assert overlap_warning(disjoint) is None and "WARNING" in overlap_warning(overlapping)
    assert overlap_text(disjoint) == f"0/{N}" and overlap_text(overlapping).startswith("WARN")


def test_old_prior_without_hashes_recomputes_or_says_unknown(tiny_digits_prior, tmp_path):
    old = tmp_path / "old"
    for f in ("examples.json", "fl_sim_prior.json"):
        (old / f).parent.mkdir(exist_ok=True)
        (old / f).write_text((tiny_digits_prior / f).read_text())
    ex = json.loads((old / "examples.json").read_text())
    hashes = ex.pop("hashes")
    (old / "examples.json").write_text(json.dumps(ex))
    back, source = prior_training_hashes(old)
    assert back == hashes and source.startswith("recomputed")
    meta = json.loads((old / "fl_sim_prior.json").read_text())
    meta["data"] = {"name": "npz", "path": str(tmp_path / "gone.npz")}
    (old / "fl_sim_prior.json").write_text(json.dumps(meta))
    unknown = prior_overlap(old, _digits("test")[0])
    assert unknown["count"] is None and unknown["source"].startswith("unknown")
    assert "unknown" in overlap_warning(unknown) and overlap_text(unknown) == "unknown"


@pytest.mark.parametrize("split", ["test", "train"])
def test_runner_writes_the_overlap_and_the_report_warns(tiny_digits_prior, tmp_path, split):
    """A curious-peer case whose other clients hold the first N digits of ``split`` (the
    peer, client 0, holds one more); peer_diffusion_prior with the tiny prior through the
    runner: the result carries the measured overlap, report.html a warning line iff > 0."""
    spec = classifier_spec()
    x, y = _digits(split)
    if split == "train":  # the prior's own training images (examples.json order)
        idx = torch.as_tensor(json.loads((tiny_digits_prior / "examples.json").read_text())[
            "indices"][:N])
        x = torch.as_tensor(digits_splits().train.images)[idx].float()
        y = torch.as_tensor(digits_splits().train.labels)[idx].long()
    peer_x, peer_y = _digits("test" if split == "train" else "train")
    clients = [CaseClient(peer_x[:1], peer_y[:1], torch.tensor([0]))] + [
        CaseClient(x[k:k + 1], y[k:k + 1], torch.tensor([k])) for k in range(N)]
    run_dir = build_case(tmp_path / "run", spec=spec, clients=clients, data=DIGITS,
                         global_state=build_task(spec, seed=0).model.state_dict())
    [row] = replay(run_dir, "peer_diffusion_prior", params={
        "prior": str(tiny_digits_prior), "max_iterations": 2, "projection_iterations": 1,
        "sampler_steps": 1})
    overlap = row["prior_overlap"]
    assert overlap["victims"] == N and overlap["source"] == "examples.json"
    html = write_report(run_dir).read_text()
    if split == "test":
        assert overlap["count"] == 0 and "WARNING" not in html
        assert f"Prior overlap with the attacked images: 0 of {N}" in html
    else:
        assert overlap["count"] == N and overlap["fraction"] == 1.0
        assert f"WARNING: the prior was trained on {N} of the {N} attacked images" in html
