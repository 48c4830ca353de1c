"""configs/diffusion_digits.toml end to end on Flower's Ray backend, from a saved prior.

One 2-round FedAvg run (tiny settings) serves every assertion: the held-out diffusion loss
goes down, per-round DDIM sample grids are written and shown in report.html (and no accuracy
curve is), every local step's eps and t are in the ground truth, and the round-1 global model
the server sent is exactly the pretrained one (``[model] pretrained``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fl_sim.config import load
from fl_sim.models import build_model
from fl_sim.priors import save_prior
from fl_sim.run_dir import Run, load_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "RAY_USAGE_STATS_ENABLED": "0"}
LOCAL_STEPS, BATCH = 3, 8


@pytest.fixture(scope="module")
def prior_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from diffusers import DDPMScheduler
    unet = build_model("unet", 1, 10, 16, seed=123, params={"preset": "tiny"})
    path = save_prior(tmp_path_factory.mktemp("prior") / "p", unet,
                      DDPMScheduler(num_train_timesteps=1000), metadata={"seed": 123})
    return path, {k: v.clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prior_state: tuple[Path, dict]
        ) -> Iterator[Run]:
    from fl_sim.federation.simulation import run_experiment
    env = {**ENV, "FLWR_HOME": str(tmp_path_factory.mktemp("flwr_home"))}
    cfg = load(ROOT / "configs" / "diffusion_digits.toml", [
        "federation.num_rounds=2", "federation.num_clients=2",
        f"federation.local_steps={LOCAL_STEPS}", f"federation.batch_size={BATCH}",
        "samples.num_images=4", "samples.num_inference_steps=3",
        f"model.pretrained=\"{prior_state[0]}\""])
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield load_run(run_experiment(cfg, run_dir=tmp_path_factory.mktemp("run") / "r"))


def test_heldout_diffusion_loss_goes_down(run: Run) -> None:
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert not any("eval_accuracy" in r for r in rows)


def test_sample_grids_are_written_and_in_the_report(run: Run) -> None:
    from fl_sim.report import write_report
    grids = sorted(p.name for p in (run.path / "samples").glob("*.png"))
    assert grids == ["r0001.png", "r0002.png"]
    assert (run.path / "samples" / "r0001.png").read_bytes() != \
        (run.path / "samples" / "r0002.png").read_bytes()  # the model changed, not the noise
    html = write_report(run.path).read_text()
    assert "Samples of the global model" in html
    for r in (1, 2):
        assert re.search(rf'alt="samples after round {r}" src="data:image/png;base64,', html)
    assert "eval_accuracy" not in html and "eval accuracy" not in html


def test_fedavg_truth_holds_every_local_steps_eps_and_t(run: Run) -> None:
    for client in run.clients_in_round(1):
        steps = run.truth(1, client).steps
        assert len(steps) == LOCAL_STEPS
        for s in steps:
            assert s.aux["eps"].shape == (BATCH, 1, 16, 16)
            assert s.aux["t"].shape == (BATCH,) and s.aux["t"].dtype == torch.int64
        assert not torch.equal(steps[0].aux["eps"], steps[1].aux["eps"])


def test_round_one_starts_from_the_pretrained_weights(run: Run,
                                                      prior_state: tuple[Path, dict]) -> None:
    _, saved = prior_state
    client = run.clients_in_round(1)[0]
    sent = run.view("server").record(1, client).global_params
    assert sent.keys() == saved.keys()
    assert all(torch.equal(sent[k], saved[k]) for k in saved)
