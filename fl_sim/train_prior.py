"""Centralised DDPM training of a prior on public / auxiliary data (``fl-sim train-prior``).

The prior is trained by the diffusion task's own step (:meth:`DiffusionTask.train_step`, the
step every federated client takes), on a registered data source filtered to some classes or
identities of one split -- so a prior can be trained on data disjoint from the victims'. The
output directory IS the prior (:mod:`fl_sim.priors` layout) plus training records::

    OUT/unet/ OUT/scheduler/ OUT/fl_sim_prior.json   the prior (diffusers format)
    OUT/samples.png                                  DDIM samples of the final model
    OUT/train_log.jsonl                              step, train loss, held-out loss
    OUT/examples.json                                split + dataset indices trained on,
                                                     one content hash per image
    OUT/prior_config.json                            the resolved training config
    OUT/checkpoint/                                  model + optimizer + step (resume)

Resumable after a kill: every ``checkpoint_every`` steps the model and optimizer state and
the step are written atomically; running again with the same config continues from there.
Every random number of step ``s`` (batch, eps/t, dropout) derives from ``(seed, s)``, so no
generator state needs saving and a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import tomllib
import torch
from pydantic import Field
from pydantic_core import PydanticCustomError
from torch import Tensor

from fl_sim.config import DataConfig, ModelConfig, TaskConfig, _Section, apply_overrides
from fl_sim.data import load_data
from fl_sim.errors import ConfigError, DataError, PluginError, RunDirError
from fl_sim.federation.local import make_optimizer
from fl_sim.output_dirs import check_output_dir
from fl_sim.prior_overlap import HASH_RULE, image_hashes
from fl_sim.priors import METADATA_FILE, read_metadata, save_prior
from fl_sim.registry import DATA_SOURCES, MODELS, TASKS, format_validation_error, validate_params
from fl_sim.run_dir import read_json_object
from fl_sim.samples import save_sample_grid
from fl_sim.seeding import derive_seed, torch_generator
from fl_sim.store_guard import is_count, resolve_inside
from fl_sim.stores import append_jsonl, read_jsonl, read_tensors, rewrite_jsonl, write_tensors
from fl_sim.tasks import task_from_config
from fl_sim.tasks.base import Batch

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
CONFIG_FILE = "prior_config.json"
LOG_FILE = "train_log.jsonl"
EXAMPLES_FILE = "examples.json"
SAMPLES_FILE = "samples.png"
CKPT_DIR = "checkpoint"
#: Training keys that do not change the weights: they may differ on resume.
_RESUME_FREE = ("steps", "checkpoint_every", "eval_examples", "sample_images", "sample_steps")


class FilterConfig(_Section):
    """Which examples of the data source the prior sees: one split, optionally only some
    classes (labels) and/or groups (identities, for sources with groups)."""

    split: Literal["train", "test"] = "train"
    classes: tuple[int, ...] | None = None
    groups: tuple[int, ...] | None = None


class TrainingConfig(_Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    checkpoint_every: int = Field(250, ge=1)
    eval_examples: int = Field(256, ge=1)
    sample_images: int = Field(16, ge=1)
    sample_steps: int = Field(50, ge=1)

    @pydantic.field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        if device == "cuda" and not torch.cuda.is_available():
            raise PydanticCustomError("no_cuda", "'cuda' requested but CUDA is not available "
                                      "on this machine; use \"cpu\" or \"auto\"")
        return device


class PriorConfig(_Section):
    """A ``train-prior`` config: ``[data]``, ``[filter]``, ``[model]``, ``[task]``,
    ``[training]``; unknown keys are rejected."""

    data: DataConfig = DataConfig()
    filter: FilterConfig = FilterConfig()
    model: ModelConfig = ModelConfig(name="unet")
    task: TaskConfig = TaskConfig(name="diffusion", num_train_timesteps=1000)
    training: TrainingConfig = TrainingConfig()

    def to_json_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _check(registry: Any, section: Any, where: str, skip: int) -> None:
    try:
        obj = registry.get(section.name)
    except PluginError as exc:
        raise ConfigError(f"{where}.name: {exc}") from None
    validate_params(obj, section.params, where=where, skip=skip)


def prior_config(source: PriorConfig | Mapping[str, Any] | str | Path,
                 overrides: Iterable[str] = ()) -> PriorConfig:
    """Validate a config given as an object, a raw dict or a TOML/JSON path (+ ``--set``
    overrides ``key.path=value``). Raises a one-line :class:`~fl_sim.errors.ConfigError`."""
    if isinstance(source, PriorConfig):
        raw: Mapping[str, Any] = source.to_json_dict()
    elif isinstance(source, Mapping):
        raw = source
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(
                p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML/JSON: {exc}") from None
    try:
        cfg = PriorConfig.model_validate(apply_overrides(raw, overrides))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "", _section_of(exc))) from None
    if cfg.task.name != "diffusion":
        raise ConfigError(f"task.name: a prior is a diffusion model (got {cfg.task.name!r})")
    _check(DATA_SOURCES, cfg.data, "data", 0)
    _check(MODELS, cfg.model, "model", 3)
    _check(TASKS, cfg.task, "task", 2)
    return cfg


def _section_of(exc: pydantic.ValidationError) -> type[pydantic.BaseModel] | None:
    """The section whose keys an unknown-key error should list as allowed."""
    sections = {(): PriorConfig, ("filter",): FilterConfig, ("training",): TrainingConfig}
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            return sections.get(tuple(str(x) for x in err["loc"][:-1]))
    return None


def select_examples(images: Tensor, labels: Tensor, groups: Tensor | None,
                    flt: FilterConfig) -> Tensor:
    """Indices [M] (int64, ascending) of the examples that pass ``flt``'s class and group
    filters. Raises :class:`~fl_sim.errors.ConfigError` for a group filter on data without
    groups and :class:`~fl_sim.errors.DataError` when nothing is left."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    if flt.classes is not None:
        keep &= torch.isin(labels, torch.tensor(flt.classes, dtype=torch.int64))
    if flt.groups is not None:
        if groups is None:
            raise ConfigError("filter.groups: this data source has no groups (identities); "
                              "use filter.classes")
        keep &= torch.isin(groups, torch.tensor(flt.groups, dtype=torch.int64))
    idx = torch.nonzero(keep).flatten()
    if len(idx) == 0:
        raise DataError(f"filter {flt.model_dump()}: no {flt.split} example passes it")
    return idx


def _load_data(cfg: PriorConfig) -> tuple[Any, Tensor, Tensor, Tensor]:
    """``(splits, train_images, train_indices, heldout_images)`` after the filter."""

    splits = load_data(cfg.data.name, **cfg.data.params)
    use, other = ((splits.train, splits.test) if cfg.filter.split == "train"
                  else (splits.test, splits.train))
    idx = select_examples(use.images, use.labels, use.groups, cfg.filter)
    held = other.images[select_examples(other.images, other.labels, other.groups, cfg.filter)
                        if _has_examples(other, cfg.filter) else torch.arange(0)]
    return splits, use.images[idx], idx, held[:cfg.training.eval_examples]


def _has_examples(data: Any, flt: FilterConfig) -> bool:
    try:
        select_examples(data.images, data.labels, data.groups, flt)
    except DataError:
        return False
    return True


def _build(cfg: PriorConfig, splits: Any) -> tuple[Any, Any, torch.optim.Optimizer]:

    device = cfg.training.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    task, spec = task_from_config(cfg.model, cfg.task, splits.in_channels, splits.num_classes,
                                  splits.image_size, splits.mean, splits.std,
                                  seed=cfg.training.seed, device=device, pretrained=True)
    if not hasattr(task.model, "save_pretrained"):
        raise ConfigError(f"model.name: a prior needs a diffusers model ('unet'), got "
                          f"{cfg.model.name!r}")
    opt = make_optimizer(cfg.training.optimizer, task.model.parameters(), cfg.training.lr)
    return task, spec, opt


# -- checkpoints ----------------------------------------------------------------------------
def _save_checkpoint(out: Path, step: int, model: torch.nn.Module,
                     opt: torch.optim.Optimizer) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars: dict[str, Any] = {}
    for pid, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{key}"] = v
            else:
                scalars[f"{pid}.{key}"] = v
    name = f"step-{step:08d}.safetensors"
    write_tensors(out / CKPT_DIR / name, tensors, {"step": step, "opt_scalars": scalars})
    state = out / CKPT_DIR / "state.json"
    tmp = state.with_name(".tmp-state.json")
    tmp.write_text(json.dumps({"step": step, "file": name}))
    os.replace(tmp, state)
    for f in (out / CKPT_DIR).glob("step-*.safetensors"):
        if f.name != name:
            f.unlink(missing_ok=True)


def checkpoint_state(out: Path) -> dict[str, Any] | None:
    """``checkpoint/state.json`` of ``out`` (None if there is none), checked: a step >= 0
    and a checkpoint file inside ``checkpoint/`` that exists. Raises a one-line
    :class:`~fl_sim.errors.RunDirError` for a torn or forged state (delete ``checkpoint/``
    to start over)."""
    state = out / CKPT_DIR / "state.json"
    if not state.is_file():
        return None
    info = read_json_object(state)
    name = info.get("file")
    if not is_count(info.get("step")) or not isinstance(name, str):
        raise RunDirError(f"{state}: corrupt checkpoint state {info!r}; delete {out / CKPT_DIR} "
                          "to train from the start")
    if not resolve_inside(out / CKPT_DIR, name).is_file():
        raise RunDirError(f"{state}: names a missing file {name}; delete {out / CKPT_DIR} to "
                          "train from the start")
    return info


def _load_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Restore the last checkpoint into ``model``/``opt``; returns its step (0 if none)."""
    info = checkpoint_state(out)
    if info is None:
        return 0
    tensors, meta = read_tensors(out / CKPT_DIR / info["file"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    for k, v in meta.get("opt_scalars", {}).items():
        pid, key = k.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": opt_state,
                         "param_groups": opt.state_dict()["param_groups"]})
    return int(info["step"])


def _check_resumable(out: Path, cfg: PriorConfig) -> None:
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        return
    saved, now = read_json_object(saved_file), cfg.to_json_dict()
    for c in (saved, now):
        for key in _RESUME_FREE:
            c.get("training", {}).pop(key, None)
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(f"{out} holds a prior trained with another config (section(s) "
                          f"{diff} differ); choose another output directory")


# -- training -------------------------------------------------------------------------------
def train_step_at(task: Any, opt: torch.optim.Optimizer, images: Tensor, step: int, *,
                  seed: int, batch_size: int) -> float:
    """Training step number ``step`` (0-based): its batch, eps/t and dropout derive from
    ``(seed, step)`` only; the maths is the task's own ``train_step``. Returns the loss."""
    device = next(task.model.parameters()).device
    gen = torch_generator(seed, "prior", "step", step, "batch")
    pos = torch.randperm(len(images), generator=gen)[:min(batch_size, len(images))]
    x = images[pos].to(device)
    batch = Batch(x, torch.zeros(len(pos), dtype=torch.int64, device=device))
    aux_gen = torch_generator(seed, "prior", "step", step, "aux")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "prior", "step", step, "torch"))
        return task.train_step(opt, batch, aux_gen).loss


def heldout_loss(task: Any, images: Tensor, seed: int) -> float | None:
    """Diffusion loss on held-out ``images`` with fixed eps/t (comparable across steps)."""
    if len(images) == 0:
        return None
    gen = torch_generator(seed, "prior", "heldout")
    return float(task.evaluate(images, None, generator=gen)["loss"])


def train_prior(cfg: PriorConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, *,
                overrides: Iterable[str] = (), progress: Progress | None = None) -> Path:
    """Train (or finish training) the prior of ``cfg`` into ``out_dir``; returns ``out_dir``.

    ``cfg`` may be a :class:`PriorConfig`, a raw dict or a config path; ``overrides`` are
    ``key.path=value`` strings. If ``out_dir`` holds a checkpoint of the same config, training
    continues from it (a finished prior with as many steps returns at once). ``progress(event)``
    receives ``{"step", "total", "loss"}`` (+ ``"eval_loss"`` at checkpoints).
    Raises :class:`~fl_sim.errors.ConfigError` / :class:`~fl_sim.errors.DataError`.
    """

    cfg = prior_config(cfg, overrides)
    out = Path(out_dir)
    check_output_dir(out, what="prior", markers=(CONFIG_FILE, METADATA_FILE))
    _check_resumable(out, cfg)
    checkpoint_state(out)  # a torn state.json fails here, before anything is written
    tr = cfg.training
    if ((out / CONFIG_FILE).is_file() and (out / METADATA_FILE).is_file()
            and read_metadata(out).get("steps_done") == tr.steps):
        return out  # already trained with this config (checked above)
    splits, images, indices, held = _load_data(cfg)
    task, spec, opt = _build(cfg, splits)
    try:
        start = _load_checkpoint(out, task.model, opt)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:  # torch's own mismatches
        raise RunDirError(f"{out / CKPT_DIR}: cannot restore the checkpoint ({type(exc).__name__}"
                          f": {' '.join(str(exc).split())[:200]}); delete it to train from the "
                          "start") from None
    out.mkdir(parents=True, exist_ok=True)  # the first write: every check is behind us
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True))
    if start > tr.steps:
        raise ConfigError(f"training.steps = {tr.steps} but {out} already holds step {start}")
    rewrite_jsonl(out / LOG_FILE, [r for r in read_jsonl(out / LOG_FILE) if r["step"] <= start])
    (out / EXAMPLES_FILE).write_text(json.dumps(  # hashes: checked against victims by scorers
        {"split": cfg.filter.split, "indices": indices.tolist(), "hash": HASH_RULE,
         "hashes": image_hashes(images)}))
    if start:
        logger.info("resuming prior training in %s at step %d", out, start)
    losses: list[float] = []
    every = max(1, tr.steps // 100)
    t0 = time.perf_counter()
    for step in range(start, tr.steps):
        losses.append(train_step_at(task, opt, images, step, seed=tr.seed,
                                    batch_size=tr.batch_size))
        done = step + 1
        event: dict[str, Any] = {"step": done, "total": tr.steps, "loss": losses[-1]}
        if done % tr.checkpoint_every == 0 or done == tr.steps:
            event["eval_loss"] = heldout_loss(task, held, tr.seed)
            append_jsonl(out / LOG_FILE, {"step": done, "train_loss": sum(losses) / len(losses),
                                          "eval_loss": event["eval_loss"],
                                          "seconds": round(time.perf_counter() - t0, 3)})
            losses = []
            _save_checkpoint(out, done, task.model, opt)
        if progress is not None and (done % every == 0 or "eval_loss" in event):
            progress(event)
    save_sample_grid(task, out / SAMPLES_FILE, num_images=tr.sample_images,
                     num_steps=tr.sample_steps, seed=tr.seed)
    save_prior(out, task.model, task.scheduler,
               metadata=_metadata(cfg, splits, spec, indices, read_jsonl(out / LOG_FILE)))
    return out


def _metadata(cfg: PriorConfig, splits: Any, spec: Any, indices: Tensor,
              log: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``fl_sim_prior.json`` records about how the prior was trained."""
    labels = (splits.train if cfg.filter.split == "train" else splits.test).labels
    return {"source": "fl-sim train-prior", "data": cfg.data.model_dump(mode="json"),
            "filter": cfg.filter.model_dump(mode="json"), "num_examples": len(indices),
            "classes_present": sorted({int(c) for c in labels[indices]}),
            "model": cfg.model.model_dump(mode="json"), "task": dict(spec.task_params),
            "spec": spec.to_json(), "training": cfg.training.model_dump(mode="json"),
            "steps_done": cfg.training.steps, "seed": cfg.training.seed,
            "heldout_loss": log[-1]["eval_loss"] if log else None}
