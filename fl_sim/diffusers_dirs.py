"""Local diffusers checkpoints of unconditional pixel-space DDPMs: read, check, load.

Layouts read (nothing is ever downloaded; every path is local):

* a **pipeline** directory, as the public ``google/ddpm-cifar10-32`` and
  ``google/ddpm-ema-celebahq-256`` are laid out: ``model_index.json``, ``unet/`` (a
  ``UNet2DModel``: ``config.json`` + safetensors weights) and ``scheduler/``
  (``scheduler_config.json`` of a ``DDPMScheduler`` or ``DDIMScheduler``);
* a **bare UNet** directory: ``config.json`` + weights (a ``scheduler_config.json`` beside them
  is read when present);
* an fl-sim prior (``fl-sim train-prior``: ``unet/`` + ``scheduler/`` + ``fl_sim_prior.json``).

The noise schedule -- betas (``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2,
``beta_start``, ``beta_end``, ``trained_betas``), ``num_train_timesteps`` and
``prediction_type`` (epsilon / v_prediction / sample) -- is READ from the scheduler config and
carried in the task's params (:func:`scheduler_task_params`), so the training loss, the DDIM
sampler and every attack that rebuilds the task from a record use the checkpoint's schedule.
Refused with one line (:class:`~fl_sim.errors.ConfigError`): a conditional UNet
(``UNet2DConditionModel``, cross-attention, class embeddings), a latent model (a VQ-VAE / VAE
or text encoder in ``model_index.json``, or latent channels), a scheduler other than DDPM /
DDIM, and images of another size or channel count than the data set's (:func:`check_shape`).

Importing this module imports neither flwr nor ray (attacks use it); diffusers lazily.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_sim.errors import ConfigError, DataError, MissingResourceError

__all__ = ["METADATA_FILE", "PUBLISHED_SCHEDULER", "PUBLISHED_UNETS", "SCHEDULER_DIR",
           "UNET_DIR", "Checkpoint", "read_checkpoint", "check_shape", "scheduler_task_params",
           "unet_arch_config"]

#: the layout of a prior directory (:mod:`fl_sim.priors`, re-exported there): fl-sim's
#: metadata file beside a diffusers pipeline's ``unet/`` and ``scheduler/``
METADATA_FILE = "fl_sim_prior.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"

#: model_index.json components that make a pipeline latent or text-conditioned
LATENT_COMPONENTS = ("vqvae", "vae", "text_encoder", "tokenizer", "image_encoder")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: UNet2DModel config keys that make a model conditional when set
_CONDITIONAL_KEYS = ("class_embed_type", "num_class_embeds", "cross_attention_dim",
                     "encoder_hid_dim", "addition_embed_type")


#: the UNet2DModel configs of the public DDPM checkpoints (their ``unet/config.json``, without
#: diffusers' bookkeeping keys): 35,746,307 and 113,673,219 parameters. Benchmarks build these
#: architectures with random weights; nothing is downloaded.
PUBLISHED_UNETS: dict[str, dict[str, Any]] = {
    "google/ddpm-cifar10-32": {
        "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    "google/ddpm-ema-celebahq-256": {
        "act_fn": "silu", "attention_head_dim": None,
        "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                             "AttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                           "UpBlock2D"]},
}
#: both checkpoints' ``scheduler/scheduler_config.json`` (DDPM's linear schedule)
PUBLISHED_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
    "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory holds: its UNet directory and config, and its scheduler
    config (``None`` for a bare UNet directory without one). ``layout``: ``"pipeline"``,
    ``"unet"`` or ``"prior"``."""

    root: Path
    unet_dir: Path
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    layout: str


def _json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: unreadable {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: {path} is not a JSON object")
    return data


def read_checkpoint(path: str | Path, *, where: str = "model.pretrained") -> Checkpoint:
    """Read and check the configs of the checkpoint at ``path`` (no weights are loaded).

    Raises :class:`~fl_sim.errors.MissingResourceError` for a missing path,
    :class:`~fl_sim.errors.DataError` for a directory of none of the layouts, and
    :class:`~fl_sim.errors.ConfigError` for a conditional / latent model or an unsupported
    scheduler -- one line each, starting with ``where``.
    """
    root = Path(path)
    if not root.exists():
        raise MissingResourceError(f"{where}: {root} does not exist (nothing is downloaded)")
    if (root / "model_index.json").is_file():
        _check_pipeline(_json(root / "model_index.json", where), root, where)
        layout, unet_dir, sched = "pipeline", root / UNET_DIR, root / SCHEDULER_DIR
    elif (root / "config.json").is_file():
        layout, unet_dir, sched = "unet", root, root
    elif (root / UNET_DIR / "config.json").is_file():
        layout = "prior" if (root / METADATA_FILE).is_file() else "pipeline"
        unet_dir, sched = root / UNET_DIR, root / SCHEDULER_DIR
    else:
        raise DataError(f"{where}: {root} is neither a diffusers pipeline (model_index.json), "
                        "a UNet directory (config.json) nor an fl-sim prior")
    if not (unet_dir / "config.json").is_file():
        raise DataError(f"{where}: {root} has no {unet_dir.name}/config.json")
    unet_config = _json(unet_dir / "config.json", where)
    _check_unet(unet_config, unet_dir, where)
    sched_file = sched / "scheduler_config.json"
    scheduler_config = _json(sched_file, where) if sched_file.is_file() else None
    if scheduler_config is None and layout != "unet":
        raise DataError(f"{where}: {root} has no scheduler/scheduler_config.json (the noise "
                        "schedule is read from it, never assumed)")
    if scheduler_config is not None:
        _check_scheduler(scheduler_config, sched_file, where)
    return Checkpoint(root, unet_dir, unet_config, scheduler_config, layout)


def _check_pipeline(index: Mapping[str, Any], root: Path, where: str) -> None:
    latent = [k for k in LATENT_COMPONENTS if index.get(k)]
    if latent:
        raise ConfigError(f"{where}: {root} is a latent or text-conditioned pipeline "
                          f"({index.get('_class_name', '?')} with {', '.join(latent)}); fl-sim "
                          "trains and inverts unconditional pixel-space DDPMs only")
    unet = index.get("unet")
    if not unet:
        raise DataError(f"{where}: {root}/model_index.json names no 'unet' component")
    cls = unet[-1] if isinstance(unet, list) else unet
    if cls != "UNet2DModel":
        raise ConfigError(f"{where}: {root} holds a {cls}; fl-sim needs an unconditional "
                          "UNet2DModel")


def _check_unet(cfg: Mapping[str, Any], unet_dir: Path, where: str) -> None:
    cls = cfg.get("_class_name", "UNet2DModel")
    conditional = [f"{k}={cfg[k]!r}" for k in _CONDITIONAL_KEYS if cfg.get(k) is not None]
    if "Condition" in str(cls) or conditional:
        raise ConfigError(f"{where}: {unet_dir} is a conditional UNet ({cls}"
                          + (f", {', '.join(conditional)}" if conditional else "")
                          + "); fl-sim trains and inverts unconditional DDPMs only")
    if cls != "UNet2DModel":
        raise ConfigError(f"{where}: {unet_dir} holds a {cls}; fl-sim needs a UNet2DModel")
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_in not in (1, 3):
        raise ConfigError(f"{where}: {unet_dir} takes {c_in} input channels: a latent model "
                          "(VAE latents)? fl-sim needs a pixel-space DDPM (1 or 3 channels)")
    if c_out != c_in:
        raise ConfigError(f"{where}: {unet_dir} has out_channels {c_out} != in_channels "
                          f"{c_in} (learned variance?); fl-sim's loss needs one output per "
                          "input channel")


def _check_scheduler(cfg: Mapping[str, Any], path: Path, where: str) -> None:
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULERS:
        raise ConfigError(f"{where}: {path} is a {cls}; allowed: {', '.join(SCHEDULERS)}")
    checks = (("beta_schedule", "linear", BETA_SCHEDULES),
              ("prediction_type", "epsilon", PREDICTION_TYPES))
    for key, default, allowed in checks:
        if cfg.get(key, default) not in allowed:
            raise ConfigError(f"{where}: {path}: {key} {cfg.get(key)!r}; allowed: "
                              f"{', '.join(allowed)}")


def _size(cfg: Mapping[str, Any]) -> int:
    size = cfg.get("sample_size", 32)
    return int(size if isinstance(size, int) else size[0])


def check_shape(ckpt: Checkpoint, in_channels: int, image_size: int, *, where: str,
                what: str = "the data set") -> None:
    """ConfigError unless the checkpoint's UNet takes ``in_channels x image_size x
    image_size`` images (one line naming both shapes)."""
    c, s = int(ckpt.unet_config.get("in_channels", 3)), _size(ckpt.unet_config)
    sizes = ckpt.unet_config.get("sample_size")
    if isinstance(sizes, list | tuple) and len(set(sizes)) > 1:
        raise ConfigError(f"{where}: {ckpt.root} makes non-square {sizes} images")
    if (c, s) != (int(in_channels), int(image_size)):
        raise ConfigError(f"{where}: {ckpt.root} makes {c}x{s}x{s} images (in_channels {c}, "
                          f"sample_size {s} (pretrained) vs {image_size} (experiment)); "
                          f"{what} has {in_channels}x{image_size}x{image_size}")


def unet_arch_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The UNet config without diffusers' bookkeeping keys (``_class_name``, ...): what
    ``UNet2DModel.from_config`` needs, JSON-serialisable (stored in the run's model spec)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def scheduler_task_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion task's params that reproduce a scheduler config: ``num_train_timesteps``,
    ``beta_schedule``, ``prediction_type`` and the whole config (``scheduler_config``: betas,
    ``trained_betas``, clipping and timestep spacing for the samplers)."""
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return {"num_train_timesteps": int(clean.get("num_train_timesteps", 1000)),
            "beta_schedule": clean.get("beta_schedule", "linear"),
            "prediction_type": clean.get("prediction_type", "epsilon"),
            "scheduler_config": clean}
