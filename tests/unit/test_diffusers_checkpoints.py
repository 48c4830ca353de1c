"""Standard diffusers DDPM checkpoints as `model.pretrained` and as attacks' `prior` (issue 24
item 1).

The directories are built with EXACTLY the published configurations of ``google/ddpm-cifar10-32``
(UNet2DModel, 35,746,307 parameters) and ``google/ddpm-ema-celebahq-256`` (113,673,219) and
their DDPMScheduler config, with random weights (``save_pretrained``); nothing is downloaded.
Compute runs on the 32 px one only (the 256 px one is checked config-only: reading, validation,
its parameter count on the meta device). Cases are fixed here: CIFAR-10 test images from index
0, seeds 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fl_sim.cases.data import make_task
from fl_sim.cases.records import diffusion_record, make_record
from fl_sim.config import ModelConfig, TaskConfig
from fl_sim.diffusers_dirs import read_checkpoint
from fl_sim.errors import ConfigError, DataError
from fl_sim.tasks import task_from_config
from tests.attack_cases import CIFAR_FILE, cifar_images

#: google/ddpm-cifar10-32/unet/config.json (diffusers' port of Ho et al.'s CIFAR-10 model)
CIFAR10_UNET: dict[str, Any] = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
#: google/ddpm-ema-celebahq-256/unet/config.json
CELEBAHQ_UNET: dict[str, Any] = {
    **CIFAR10_UNET, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                         "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                       "UpBlock2D"]}
#: both checkpoints' scheduler/scheduler_config.json
DDPM_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
    "trained_betas": None, "variance_type": "fixed_large"}
MODEL_INDEX = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
               "unet": ["diffusers", "UNet2DModel"]}
TINY_UNET: dict[str, Any] = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}


def write_pipeline(root: Path, unet: dict[str, Any], scheduler: dict[str, Any] | None, *,
                   weights: bool = True, index: dict[str, Any] | None = None) -> Path:
    """A pipeline directory (model_index.json, unet/, scheduler/) of these configs; random
    weights (seed 0) when ``weights``, else configs only."""
    (root / "unet").mkdir(parents=True)
    if weights:
        torch.manual_seed(0)
        model = UNet2DModel.from_config({k: v for k, v in unet.items() if k[0] != "_"})
        model.save_pretrained(root / "unet", safe_serialization=True)
    else:
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    if scheduler is not None:
        DDPMScheduler.from_config(scheduler).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index or MODEL_INDEX))
    return root


@pytest.fixture(scope="module")
def cifar_ddpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CIFAR-10 DDPM checkpoint's layout and configs, random weights (~143 MB, once)."""
    return write_pipeline(tmp_path_factory.mktemp("ddpm") / "ddpm-cifar10-32", CIFAR10_UNET,
                          DDPM_SCHEDULER)


def experiment(path: Path, *, channels: int = 3, size: int = 32, **task: Any) -> Any:
    return task_from_config(ModelConfig(name="unet", pretrained=str(path)),
                            TaskConfig(name="diffusion", **task), channels, 10, size,
                            (0.5,) * channels, (0.5,) * channels, seed=0, pretrained=True)


def n_params(cfg: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = UNet2DModel.from_config({k: v for k, v in cfg.items() if k[0] != "_"})
    return sum(p.numel() for p in model.parameters())


def test_published_configurations_have_the_published_sizes() -> None:
    # the figures of the two model cards: 35.7 M and 113.7 M parameters
    assert n_params(CIFAR10_UNET) == 35_746_307
    assert n_params(CELEBAHQ_UNET) == 113_673_219


@pytest.mark.slow
def test_cifar_checkpoint_is_the_experiments_model_and_schedule(cifar_ddpm: Path) -> None:
    from fl_sim.priors import load_unet

    task, spec = experiment(cifar_ddpm)
    saved = load_unet(cifar_ddpm / "unet")
    assert sum(p.numel() for p in task.model.parameters()) == 35_746_307
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in task.model.state_dict().items())
    # the architecture is the checkpoint's (no preset): keys the "cifar" preset would differ in
    assert task.model.config.flip_sin_to_cos is False and task.model.config.freq_shift == 1
    assert task.model.config.downsample_padding == 0
    ref = DDPMScheduler.from_config(DDPM_SCHEDULER)
    assert torch.equal(task.alphas_cumprod, ref.alphas_cumprod.float())
    # a record's spec rebuilds the same schedule and architecture (attacks' path)
    rebuilt = spec.build_task()
    assert torch.equal(rebuilt.alphas_cumprod, task.alphas_cumprod)
    assert rebuilt.scheduler.config.clip_sample is True
    assert list(rebuilt.model.config.block_out_channels) == [128, 256, 256, 256]


@pytest.mark.parametrize("schedule,prediction", [("squaredcos_cap_v2", "v_prediction"),
                                                 ("scaled_linear", "sample")])
def test_schedule_and_prediction_type_are_read(tmp_path: Path, schedule: str,
                                               prediction: str, one_thread) -> None:
    sched = {**DDPM_SCHEDULER, "beta_schedule": schedule, "prediction_type": prediction,
             "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 500}
    path = write_pipeline(tmp_path / "ckpt", TINY_UNET, sched)
    task, spec = experiment(path)
    assert (task.num_train_timesteps, task.prediction_type) == (500, prediction)
    ref = DDPMScheduler.from_config(sched).alphas_cumprod.float()
    linear = DDPMScheduler(num_train_timesteps=500).alphas_cumprod.float()
    assert torch.equal(task.alphas_cumprod, ref)
    assert (task.alphas_cumprod - linear).abs().max() > 0.05  # not DDPM's default schedule
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 3, 32, 32,
                                                                      generator=g)
    t = torch.tensor([100, 400])
    abar = ref[t].view(-1, 1, 1, 1)
    want = (abar.sqrt() * eps - (1 - abar).sqrt() * x0 if prediction == "v_prediction"
            else x0)
    assert torch.allclose(task.target(x0, eps, t), want)
    assert not torch.allclose(task.target(x0, eps, t), eps, atol=0.1)
    # the DDIM sampler the attacks build from the rebuilt task reads the same type & schedule
    from attacks.components.ddim_sampler import DDIMSampler
    sampler = DDIMSampler.from_scheduler(spec.build_task().model, spec.build_task().scheduler, 2)
    assert sampler.prediction_type == prediction
    assert torch.equal(sampler.alphas_cumprod, ref)
    # ... and so does the sampler of the same directory opened as an attack's prior (GIAS)
    from fl_sim.priors import open_prior
    prior = open_prior(path, where="gias.prior")
    prior_sampler = DDIMSampler.from_scheduler(prior.unet, prior.scheduler, 2)
    assert prior_sampler.prediction_type == prediction
    assert torch.equal(prior.alphas_cumprod, ref)
    assert prior_sampler.timesteps == [250, 0]  # T = 500, read from the checkpoint


def test_config_that_disagrees_with_the_checkpoint_is_refused(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path / "ckpt", TINY_UNET,
                          {**DDPM_SCHEDULER, "prediction_type": "v_prediction"}, weights=False)
    with pytest.raises(ConfigError, match=r"task.prediction_type: 'epsilon', but .* has "
                                          r"'v_prediction'"):
        experiment(path, prediction_type="epsilon")


def _one_line(exc: pytest.ExceptionInfo[Exception]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("case,match", [
    ("conditional", "conditional UNet"), ("class_embeddings", "num_class_embeds=10"),
    ("latent_pipeline", "latent or text-conditioned pipeline"),
    ("latent_channels", "latent model"), ("size", r"sample_size 256 \(pretrained\) vs 32"),
    ("channels", "makes 3x32x32 images"), ("scheduler", "PNDMScheduler")])
def test_unsupported_checkpoints_are_one_line_errors(tmp_path: Path, case: str,
                                                     match: str) -> None:
    unet, sched, index, channels = dict(TINY_UNET), dict(DDPM_SCHEDULER), None, 3
    if case == "conditional":
        unet = {**unet, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}
        index = {**MODEL_INDEX, "unet": ["diffusers", "UNet2DConditionModel"]}
    elif case == "class_embeddings":
        unet["num_class_embeds"] = 10
    elif case == "latent_pipeline":
        index = {"_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"],
                 "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    elif case == "latent_channels":
        unet.update(in_channels=4, out_channels=4)
    elif case == "size":
        unet = dict(CELEBAHQ_UNET)  # the 256 px CelebA-HQ configuration, config only
    elif case == "channels":
        channels = 1
    path = write_pipeline(tmp_path / "ckpt", unet, None if case == "scheduler" else sched,
                          weights=False, index=index)
    if case == "scheduler":
        (path / "scheduler").mkdir()
        (path / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({**sched, "_class_name": "PNDMScheduler"}))
    with pytest.raises(ConfigError) as exc:
        experiment(path, channels=channels)
    assert _one_line(exc).startswith("model.pretrained: ")
    assert exc.match(match)


def test_celebahq_256_configuration_is_read(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path / "celebahq", CELEBAHQ_UNET, DDPM_SCHEDULER, weights=False)
    ckpt = read_checkpoint(path)
    assert (ckpt.layout, ckpt.unet_config["sample_size"]) == ("pipeline", 256)
    assert ckpt.scheduler_config is not None
    assert ckpt.scheduler_config["beta_schedule"] == "linear"
    from fl_sim.diffusers_dirs import check_shape
    check_shape(ckpt, 3, 256, where="gidm.prior")  # the right shape passes
    with pytest.raises(DataError, match="no scheduler"):
        read_checkpoint(write_pipeline(tmp_path / "noschedule", CELEBAHQ_UNET, None,
                                       weights=False))


def test_bare_unet_directory(tmp_path: Path, one_thread) -> None:
    torch.manual_seed(0)
    UNet2DModel.from_config({k: v for k, v in TINY_UNET.items() if k[0] != "_"}
                            ).save_pretrained(tmp_path / "unet", safe_serialization=True)
    task, _ = experiment(tmp_path / "unet", beta_schedule="squaredcos_cap_v2")
    # no scheduler in a bare UNet directory: the schedule is the configured one
    assert torch.equal(task.alphas_cumprod,
                       DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.float())
    from fl_sim.priors import open_prior
    with pytest.raises(ConfigError, match="bare UNet directory without scheduler_config"):
        open_prior(tmp_path / "unet", where="gias.prior")


# -- compute on the 32 px CIFAR-10 architecture (random weights) -------------------------------
def _victims(n: int) -> torch.Tensor:
    return cifar_images(n)  # CIFAR-10 test images 0 .. n-1


def _aux(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"eps": torch.randn(n, 3, 32, 32, generator=g),
            "t": torch.randint(0, 1000, (n,), generator=g)}


@pytest.mark.slow
def test_a_federation_round_trains_the_checkpoint(cifar_ddpm: Path, tmp_path: Path) -> None:
    from fl_sim.cases.federation import CaseClient, build_case
    from fl_sim.run_dir import load_run

    task, spec = experiment(cifar_ddpm)
    clients = [CaseClient(_victims(1), torch.zeros(1, dtype=torch.int64), torch.tensor([0]))]
    run_dir = build_case(tmp_path / "case", spec=spec, global_state=task.model.state_dict(),
                         clients=clients, strategy="fedavg", lr=1e-4, local_steps=1,
                         peer_clients=(),
                         data={"name": "npz", "path": str(CIFAR_FILE)})
    run = load_run(run_dir)
    record = run.view("server").record(1, 0)
    delta = sum(float(v.double().square().sum()) for v in record.update.values())
    assert len(record.update) == len(dict(task.model.named_parameters()))
    assert math.isfinite(delta) and delta > 0
    # the round's client trained with the checkpoint's schedule, rebuilt from the record
    assert torch.equal(record.spec.build_task().alphas_cumprod, task.alphas_cumprod)


@pytest.mark.slow
def test_gidm_runs_on_the_cifar_checkpoint(cifar_ddpm: Path) -> None:
    from attacks.gidm import GIDM

    task, spec = experiment(cifar_ddpm)
    record = diffusion_record(task, spec, _victims(1), aux=_aux(1))
    attack = GIDM(phase1_iterations=1, phase2_iterations=0, sampler_steps=1)
    # (the global model = the checkpoint as prior; phase 2 is the prior-free pixel search)
    out = attack.reconstruct(record, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)
    assert out.extras["prior"] == "global model"
    assert math.isfinite(out.matching_loss) and out.matching_loss > 0


@pytest.mark.slow
def test_gidm_plus_runs_on_the_cifar_checkpoint(cifar_ddpm: Path) -> None:
    from attacks.gidm_plus import GIDMPlus

    task, spec = experiment(cifar_ddpm)
    record = diffusion_record(task, spec, _victims(1), aux=_aux(1), grant=False)
    attack = GIDMPlus(phase1_iterations=1, phase2_iterations=0, sampler_steps=1,
                      prior=str(cifar_ddpm), t_search="fixed", t_init=500.0,
                      refine_candidates=0)  # the checkpoint directory as prior
    out = attack.reconstruct(record, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)
    assert math.isfinite(out.matching_loss)


@pytest.mark.slow
def test_gias_uses_the_cifar_checkpoint_as_prior(cifar_ddpm: Path) -> None:
    from attacks.gias import GIAS

    clf, clf_spec = make_task("lenet", {})
    x = _victims(1)
    y = torch.tensor([3])
    record = make_record(clf, clf_spec, x, y, knowledge={"labels": y})
    out = GIAS(prior=str(cifar_ddpm), phase1_iterations=2, phase2_iterations=1,
               sampler_steps=1).reconstruct(record, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)
    assert out.knowledge["prior"] == str(cifar_ddpm)
    assert out.matching_loss <= out.extras["phase1_matching_loss"]


def test_library_copies_of_the_published_configurations() -> None:
    """Benchmarks build the architectures from fl_sim.diffusers_dirs: the same as above."""
    from fl_sim.diffusers_dirs import PUBLISHED_SCHEDULER, PUBLISHED_UNETS

    strip = {k: v for k, v in CIFAR10_UNET.items() if k[0] != "_"}
    assert PUBLISHED_UNETS["google/ddpm-cifar10-32"] == strip
    assert PUBLISHED_UNETS["google/ddpm-ema-celebahq-256"] == {
        k: v for k, v in CELEBAHQ_UNET.items() if k[0] != "_"}
    assert PUBLISHED_SCHEDULER == {k: v for k, v in DDPM_SCHEDULER.items() if k[0] != "_"}


@pytest.mark.slow
def test_cli_refuses_a_conditional_checkpoint_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    unet = {**TINY_UNET, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}
    path = write_pipeline(tmp_path / "sd", unet, DDPM_SCHEDULER, weights=False,
                          index={**MODEL_INDEX, "unet": ["diffusers", "UNet2DConditionModel"]})
    out = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run",
                          str(root / "configs" / "diffusion_digits.toml"), "--set",
                          f'model.pretrained="{path}"', "--run-dir", str(tmp_path / "run")],
                         cwd=root, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("fl-sim: error: model.pretrained:")
    assert "conditional UNet" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "run").exists()
