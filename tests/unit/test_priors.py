"""Priors on disk (fl_sim.priors) and `[model] pretrained` (fl_sim.tasks.pretrained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from fl_sim.errors import ConfigError, DataError, MissingResourceError
from fl_sim.models import build_model
from fl_sim.priors import METADATA_FILE, load_prior, prior_task, save_prior
from fl_sim.tasks.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

META = {"data": {"name": "digits", "image_size": 8}, "filter": {"classes": [0, 1]},
        "steps_done": 0, "seed": 3}


def _unet(seed: int = 0, channels: int = 1, size: int = 8) -> torch.nn.Module:
    return build_model("unet", channels, 10, size, seed=seed, params={"preset": "tiny"})


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    unet = _unet(seed=1)
    return save_prior(tmp_path / "prior", unet, _scheduler(), metadata=META), unet


def test_round_trip_is_bit_exact_and_frozen(saved: tuple[Path, torch.nn.Module]) -> None:
    path, unet = saved
    prior = load_prior(path)
    assert _same(prior.unet, unet)
    assert not prior.unet.training
    assert not any(p.requires_grad for p in prior.unet.parameters())
    procs = [m.processor for m in prior.unet.modules() if isinstance(m, Attention)]
    assert procs and all(type(p) is AttnProcessor for p in procs)
    assert prior.metadata["filter"] == {"classes": [0, 1]} and prior.metadata["seed"] == 3
    assert prior.metadata["image_size"] == 8 and prior.metadata["in_channels"] == 1
    assert prior.scheduler.config.num_train_timesteps == 100
    assert prior.alphas_cumprod.dtype == torch.float32
    assert torch.equal(prior.alphas_cumprod, _scheduler().alphas_cumprod.float())


def test_plain_diffusers_loads_it(saved: tuple[Path, torch.nn.Module]) -> None:
    path, unet = saved
    plain = UNet2DModel.from_pretrained(path / "unet", local_files_only=True,
                                        low_cpu_mem_usage=False)
    sched = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    assert _same(plain, unet)
    assert sched.config.beta_schedule == "squaredcos_cap_v2"


def test_prior_task_uses_the_prior_scheduler(saved: tuple[Path, torch.nn.Module]) -> None:
    prior = load_prior(saved[0])
    task = prior_task(prior)
    assert task.model is prior.unet and task.num_train_timesteps == 100
    assert torch.equal(task.alphas_cumprod, prior.alphas_cumprod)
    x = task.sample(2, torch.Generator().manual_seed(0), num_inference_steps=3)
    assert x.shape == (2, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert task.evaluate(torch.rand(3, 1, 8, 8))["loss"] > 0


def test_interrupted_save_never_looks_valid(tmp_path: Path, monkeypatch) -> None:
    first = _unet(seed=1)
    path = save_prior(tmp_path / "p", first, _scheduler(), metadata=META)
    sched = _scheduler()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sched, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_prior(path, _unet(seed=2), sched, metadata=META)
    assert _same(load_prior(path).unet, first)  # the old prior is untouched
    assert not list(path.glob(".tmp-*"))
    with pytest.raises(KeyboardInterrupt):
        save_prior(tmp_path / "fresh", _unet(seed=2), sched, metadata=META)
    with pytest.raises(DataError, match="not an fl-sim prior"):
        load_prior(tmp_path / "fresh")


def test_load_errors_are_one_line(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = saved
    with pytest.raises(MissingResourceError, match="no such directory"):
        load_prior(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an fl-sim prior"):
        load_prior(tmp_path / "empty")
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt") as err:
        load_prior(path)
    assert "\n" not in str(err.value)
    (path / METADATA_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_prior(path)


def test_truncated_weights_without_digest_are_a_data_error(tmp_path: Path) -> None:
    d = tmp_path / "unet"
    _unet().save_pretrained(d)
    weights = d / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    model = _unet(seed=5)
    with pytest.raises(DataError, match="cannot load the UNet weights") as err:
        load_pretrained(model, d)
    assert "\n" not in str(err.value)


def test_pretrained_loads_a_prior_or_a_plain_unet_dir(saved: tuple[Path, torch.nn.Module],
                                                      tmp_path: Path) -> None:
    path, unet = saved
    model = _unet(seed=7)
    assert not _same(model, unet)
    load_pretrained(model, path)
    assert _same(model, unet)
    plain = tmp_path / "plain"
    _unet(seed=9).save_pretrained(plain)
    load_pretrained(model, plain)
    assert _same(model, _unet(seed=9))


def test_pretrained_mismatch_names_the_difference(saved: tuple[Path, torch.nn.Module],
                                                  tmp_path: Path) -> None:
    path, _ = saved
    with pytest.raises(ConfigError, match=r"in_channels 1 \(pretrained\) vs 3"):
        load_pretrained(_unet(channels=3), path)
    with pytest.raises(ConfigError, match=r"sample_size 8 \(pretrained\) vs 16"):
        load_pretrained(_unet(size=16), path)
    other_preset = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                               block_out_channels=(16, 32), layers_per_block=1,
                               norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                               up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ConfigError, match=r"block_out_channels \[32, 64\] \(pretrained\) "
                                          r"vs \[16, 32\]"):
        load_pretrained(other_preset, path)
    with pytest.raises(ConfigError, match="only diffusers models"):
        load_pretrained(build_model("lenet", 1, 10, 32, seed=0), path)
    with pytest.raises(MissingResourceError, match="does not exist"):
        load_pretrained(_unet(), tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="neither an fl-sim prior nor a diffusers UNet"):
        load_pretrained(_unet(), tmp_path / "junk")


def test_metadata_is_json_with_version_and_digests(saved: tuple[Path, torch.nn.Module]
                                                   ) -> None:
    meta = json.loads((saved[0] / METADATA_FILE).read_text())
    assert meta["format"] == "fl-sim-prior" and meta["fl_sim_version"]
    assert "unet/diffusion_pytorch_model.safetensors" in meta["digests"]
