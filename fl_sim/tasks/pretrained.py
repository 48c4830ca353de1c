"""Start a model from saved weights: an fl-sim prior or a plain diffusers UNet directory.

``[model] pretrained = "PATH"`` (the realistic setting of federated fine-tuning: a pretrained
DDPM trained further on private client data). ``PATH`` is a prior written by
:func:`fl_sim.priors.save_prior` / ``fl-sim train-prior``, a diffusers ``UNet2DModel``
directory (``config.json`` + weights) or a diffusers pipeline directory with a ``unet/``
sub-directory, e.g. a local copy of ``google/ddpm-cifar10-32`` (:mod:`fl_sim.diffusers_dirs`).
Without a model ``preset`` the architecture is the checkpoint's own (its whole UNet config);
with one, the saved architecture must be the preset's. Channels and image size come from the
data either way; the noise schedule comes from the checkpoint's scheduler config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fl_sim.diffusers_dirs import (
    check_shape,
    read_checkpoint,
    scheduler_task_params,
    unet_arch_config,
)
from fl_sim.errors import ConfigError, DataError, MissingResourceError
from fl_sim.priors import METADATA_FILE, UNET_DIR, load_prior, load_unet

#: UNet2DModel config entries that define the architecture (not dropout & co.).
ARCH_KEYS = ("in_channels", "out_channels", "sample_size", "block_out_channels",
             "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
             "norm_num_groups", "attention_head_dim", "add_attention", "time_embedding_type",
             "class_embed_type", "num_class_embeds", "center_input_sample", "flip_sin_to_cos",
             "freq_shift", "downsample_padding", "norm_eps", "act_fn", "mid_block_scale_factor",
             "resnet_time_scale_shift", "downsample_type", "upsample_type",
             "attn_norm_num_groups")
WHERE = "model.pretrained"


def resolve_unet_dir(path: str | Path) -> tuple[Path, bool]:
    """``(unet_dir, is_prior)`` for a prior, a UNet directory or a pipeline directory.

    Raises :class:`~fl_sim.errors.MissingResourceError` for a missing path and
    :class:`~fl_sim.errors.DataError` for a directory that is none of the three.
    """

    root = Path(path)
    if not root.exists():
        raise MissingResourceError(f"{WHERE}: {root} does not exist (nothing is downloaded)")
    if (root / METADATA_FILE).is_file():
        return root / UNET_DIR, True
    for d in (root, root / UNET_DIR):
        if (d / "config.json").is_file():
            return d, False
    raise DataError(f"{WHERE}: {root} is neither an fl-sim prior nor a diffusers UNet "
                    "directory (no fl_sim_prior.json, config.json or unet/config.json)")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v


def architecture_diff(saved: Any, wanted: Any) -> list[str]:
    """``"key saved-value (pretrained) vs wanted-value (experiment)"`` for each differing
    architecture entry of two diffusers configs."""
    out = []
    for key in ARCH_KEYS:
        a, b = _norm(saved.get(key)), _norm(wanted.get(key))
        if a != b:
            out.append(f"{key} {a} (pretrained) vs {b} (experiment)")
    return out


def checkpoint_params(path: str | Path, model: str, task: str, model_params: Mapping[str, Any],
                      task_params: Mapping[str, Any], *, in_channels: int, image_size: int
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and task params of an experiment that starts from the checkpoint at ``path``.

    Model ``unet`` without a ``preset`` (or ``config``): the checkpoint's whole UNet config
    (``config``; its images must be the data's: ``ConfigError`` otherwise). Task
    ``diffusion`` with a scheduler config in the checkpoint: ``num_train_timesteps``,
    ``beta_schedule``, ``prediction_type`` and ``scheduler_config`` from it
    (:func:`fl_sim.diffusers_dirs.scheduler_task_params`); a task value set in the config that
    disagrees is a ``ConfigError`` (never silently replaced). Also raises the errors of
    :func:`fl_sim.diffusers_dirs.read_checkpoint` (conditional / latent model, ...).
    """

    ckpt = read_checkpoint(path, where=WHERE)
    out_model, out_task = dict(model_params), dict(task_params)
    if model == "unet" and "preset" not in out_model and "config" not in out_model:
        check_shape(ckpt, in_channels, image_size, where=WHERE)
        out_model["config"] = unet_arch_config(ckpt.unet_config)
    if task == "diffusion" and ckpt.scheduler_config is not None:
        read = scheduler_task_params(ckpt.scheduler_config)
        for key in ("num_train_timesteps", "beta_schedule", "prediction_type"):
            if key in out_task and out_task[key] != read[key]:
                raise ConfigError(f"task.{key}: {out_task[key]!r}, but {path}'s scheduler "
                                  f"has {read[key]!r} (the checkpoint's schedule is used: "
                                  f"drop task.{key} or set it to {read[key]!r})")
        out_task.update(read)
    return out_model, out_task


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Copy the weights at ``path`` into ``model`` (a diffusers ``UNet2DModel``), in place.

    Raises :class:`~fl_sim.errors.ConfigError` when ``model`` is not a diffusers model or the
    architectures differ (naming each differing entry), plus the errors of
    :func:`resolve_unet_dir` and :func:`fl_sim.priors.load_prior` -- one line each.
    """

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ConfigError(f"{WHERE}: only diffusers models (model.name = 'unet') can start "
                          f"from pretrained weights, not {type(model).__name__}")
    unet_dir, is_prior = resolve_unet_dir(path)
    saved = load_prior(path).unet if is_prior else load_unet(unet_dir)
    diff = architecture_diff(dict(saved.config), dict(model.config))
    if diff:
        raise ConfigError(f"{WHERE}: {path} does not match the experiment's model: "
                          + "; ".join(diff) + " (channels and image size come from [data], "
                          "the blocks from the model preset)")
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{WHERE}: {path} does not match the experiment's model: "
                          f"{first}") from None
