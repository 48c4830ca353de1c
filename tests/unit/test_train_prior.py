"""`fl-sim train-prior` / fl_sim.train_prior: filter, learning, resume, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_sim.data import load_data
from fl_sim.errors import ConfigError, DataError
from fl_sim.models import build_model
from fl_sim.priors import load_prior, prior_task
from fl_sim.seeding import torch_generator
from fl_sim.train_prior import FilterConfig, prior_config, select_examples, train_prior

ROOT = Path(__file__).resolve().parents[2]
BASE = {"data": {"name": "digits", "image_size": 8}, "filter": {"classes": [0, 1, 2]},
        "model": {"name": "unet", "preset": "tiny"},
        "task": {"name": "diffusion", "num_train_timesteps": 100},
        "training": {"steps": 30, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 10,
                     "eval_examples": 64, "sample_images": 4, "sample_steps": 3}}


def _cfg(**training: object) -> dict:
    return {**BASE, "training": {**BASE["training"], **training}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_prior(BASE, tmp_path_factory.mktemp("prior") / "digits012")
    finally:
        torch.set_num_threads(before)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_prior(path).unet.state_dict()


def test_filter_keeps_only_the_chosen_classes(trained: Path) -> None:
    train = load_data("digits", image_size=8).train
    meta = load_prior(trained).metadata
    used = json.loads((trained / "examples.json").read_text())
    assert used["split"] == "train"
    labels = train.labels[torch.tensor(used["indices"])]
    assert set(labels.tolist()) == {0, 1, 2}
    assert meta["num_examples"] == int(torch.isin(train.labels, torch.tensor([0, 1, 2])).sum())
    assert meta["classes_present"] == [0, 1, 2] and meta["filter"]["classes"] == [0, 1, 2]
    assert meta["steps_done"] == 30 and meta["data"] == {"name": "digits", "image_size": 8}


def test_select_examples_by_group_and_class() -> None:
    labels = torch.tensor([0, 1, 2, 1, 0])
    groups = torch.tensor([7, 7, 8, 9, 9])
    idx = select_examples(torch.zeros(5, 1, 2, 2), labels, groups,
                          FilterConfig(classes=(0, 1), groups=(9,)))
    assert idx.tolist() == [3, 4]
    with pytest.raises(ConfigError, match="no groups"):
        select_examples(torch.zeros(5, 1, 2, 2), labels, None, FilterConfig(groups=(9,)))
    with pytest.raises(DataError, match="no train example"):
        select_examples(torch.zeros(5, 1, 2, 2), labels, groups, FilterConfig(classes=(5,)))


def test_training_lowers_the_heldout_loss_on_real_digits(trained: Path, one_thread) -> None:
    test = load_data("digits", image_size=8).test
    held = test.images[torch.isin(test.labels, torch.tensor([0, 1, 2]))][:64]
    task = prior_task(load_prior(trained))
    fresh = prior_task(load_prior(trained))
    fresh.model.load_state_dict(build_model("unet", 1, 10, 8, seed=0,
                                            params={"preset": "tiny"}).state_dict())
    gen = lambda: torch_generator(0, "test-heldout")  # noqa: E731
    after = task.evaluate(held, generator=gen())["loss"]
    before = fresh.evaluate(held, generator=gen())["loss"]
    assert after < 0.5 * before, (before, after)
    log = [json.loads(x) for x in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["eval_loss"] < log[0]["eval_loss"]
    assert (trained / "samples.png").stat().st_size > 0


class _Stop(Exception):
    pass


def test_interrupted_training_resumes_bit_identical(trained: Path, tmp_path: Path,
                                                    one_thread) -> None:
    out = tmp_path / "resumed"

    def stop_at_25(event: dict) -> None:  # after the step-20 checkpoint, before step 30
        if event["step"] == 25:
            raise _Stop

    with pytest.raises(_Stop):
        train_prior(BASE, out, progress=stop_at_25)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 20
    with pytest.raises(DataError):
        load_prior(out)  # not a prior yet
    train_prior(BASE, out)
    a, b = _state(trained), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
            == json.loads((trained / "train_log.jsonl").read_text().splitlines()[-1])
            | {"seconds": json.loads((out / "train_log.jsonl").read_text()
                                     .splitlines()[-1])["seconds"]})
    with pytest.raises(ConfigError, match=r"another config \(section\(s\) \['training'\]"):
        train_prior(_cfg(lr=1e-2), out)


def test_config_is_validated_with_overrides() -> None:
    cfg = prior_config(BASE, ["training.steps=7", "filter.split=\"test\""])
    assert cfg.training.steps == 7 and cfg.filter.split == "test"
    with pytest.raises(ConfigError, match="training.bogus: unknown key; allowed: batch_size"):
        prior_config(BASE, ["training.bogus=1"])
    with pytest.raises(ConfigError, match="task.name: a prior is a diffusion model"):
        prior_config({**BASE, "task": {"name": "classifier"}})
    with pytest.raises(ConfigError, match="data.name"):
        prior_config({**BASE, "data": {"name": "nope"}})


def _cli(*args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fl_sim.cli", *args]
    if kw.get("background"):
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('[data]\nname = "digits"\nimage_size = 8\n[model]\nname = "unet"\n'
                   f'pretrained = "{tmp_path / "missing"}"\n[task]\nname = "diffusion"\n')
    out = _cli("train-prior", str(cfg), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "model.pretrained" in out.stderr and "does not exist" in out.stderr


@pytest.mark.slow
def test_cli_sigkill_then_rerun_is_bit_identical(trained: Path, tmp_path: Path) -> None:
    """A real kill -9 mid-training; re-running the same command finishes the same prior."""
    cfg = tmp_path / "p.toml"
    lines = ['[data]', 'name = "digits"', 'image_size = 8', '[filter]', 'classes = [0, 1, 2]',
             '[model]', 'name = "unet"', 'preset = "tiny"', '[task]', 'name = "diffusion"',
             'num_train_timesteps = 100', '[training]']
    lines += [f"{k} = {v}" for k, v in BASE["training"].items()]
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "killed"
    proc = _cli("train-prior", str(cfg), "--out", str(out), "--no-progress", background=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 10):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _cli("train-prior", str(cfg), "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    a, b = _state(trained), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_prior_is_returned_untouched(trained: Path) -> None:
    weights = trained / "unet" / "diffusion_pytorch_model.safetensors"
    before = (weights.stat().st_mtime_ns, (trained / "train_log.jsonl").read_text())
    assert train_prior(BASE, trained) == trained
    assert (weights.stat().st_mtime_ns, (trained / "train_log.jsonl").read_text()) == before
