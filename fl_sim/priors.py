"""Diffusion priors on disk, in diffusers' own format: save, load, check, turn into a task.

A prior directory holds::

    PATH/unet/                 UNet2DModel.save_pretrained (config.json + safetensors)
    PATH/scheduler/            DDPMScheduler.save_pretrained (scheduler_config.json)
    PATH/fl_sim_prior.json     metadata: data source + filter, image size, channels, steps,
                               seed, fl-sim version, and the SHA-256 of every weight file

so a diffusers user loads it with ``UNet2DModel.from_pretrained("PATH/unet")`` and
``DDPMScheduler.from_pretrained("PATH/scheduler")``. ``fl_sim_prior.json`` is written last
(atomically): a crash while saving leaves a directory without it, which :func:`load_prior`
refuses as "not a prior" instead of loading half-written weights; the recorded digests catch
weights changed or damaged afterwards. Nothing is ever downloaded (``local_files_only``),
and only safetensors weights are read (``use_safetensors=True``): a pickled checkpoint
(``diffusion_pytorch_model.bin``, ``*.pt``, ``*.pkl``, ...) is refused without being opened,
since unpickling runs whatever code the file names.

Importing this module imports neither flwr nor ray (attacks use it); diffusers is imported
lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fl_sim import __version__
from fl_sim.diffusers_dirs import (
    METADATA_FILE,
    SCHEDULER_DIR,
    UNET_DIR,
    read_checkpoint,
    unet_arch_config,
)
from fl_sim.errors import ConfigError, DataError, MissingResourceError
from fl_sim.models.unet import use_classic_attention
from fl_sim.tasks.diffusion import DiffusionTask

logger = logging.getLogger(__name__)

FORMAT = "fl-sim-prior"
FORMAT_VERSION = 1
#: weight formats that load through pickle (refused, never opened)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"

__all__ = ["METADATA_FILE", "SCHEDULER_DIR", "UNET_DIR", "Prior", "load_checkpoint_prior",
           "load_prior", "load_unet", "open_prior", "prior_task", "read_metadata", "save_prior"]


@dataclass(frozen=True)
class Prior:
    """A loaded prior: a frozen ``UNet2DModel`` (eval mode, ``requires_grad`` False, classic
    attention processor), its ``DDPMScheduler``, the metadata dict, and the scheduler's
    ``alphas_cumprod`` [T] as float32 on the UNet's device."""

    unet: nn.Module
    scheduler: Any
    metadata: dict[str, Any]
    alphas_cumprod: Tensor
    path: Path

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)


def _version() -> str:
    return __version__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root/unet`` and ``root/scheduler`` (relative paths)."""
    out = {}
    for sub in (UNET_DIR, SCHEDULER_DIR):
        for f in sorted((root / sub).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = _sha256(f)
    return out


def save_prior(path: str | Path, unet: nn.Module, scheduler: Any, *,
               metadata: Mapping[str, Any]) -> Path:
    """Write ``unet`` + ``scheduler`` + ``metadata`` as a prior at ``path``; returns ``path``.

    ``unet``: a diffusers ``UNet2DModel``; ``scheduler``: a ``DDPMScheduler``; ``metadata``:
    JSON-serialisable (data source and params, filter, training steps done, seed, ...).
    ``image_size``, ``in_channels``, the fl-sim version, the format tag and the weight digests
    are added. An existing prior at ``path`` is replaced; other files in ``path`` are kept.
    The metadata file is written last, atomically (see the module doc).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
        scheduler.save_pretrained(tmp / SCHEDULER_DIR)
        meta = dict(metadata)
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                     "fl_sim_version": _version(), "image_size": int(size),
                     "in_channels": int(cfg.in_channels), "digests": _digests(tmp)})
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        (root / METADATA_FILE).unlink(missing_ok=True)  # invalid from here until the end
        for sub in (UNET_DIR, SCHEDULER_DIR):
            if (root / sub).exists():
                shutil.rmtree(root / sub)
            os.replace(tmp / sub, root / sub)
        (tmp / METADATA_FILE).write_text(text)
        os.replace(tmp / METADATA_FILE, root / METADATA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of the prior at ``path``.

    Raises :class:`~fl_sim.errors.MissingResourceError` if ``path`` does not exist and
    :class:`~fl_sim.errors.DataError` if it is not a complete fl-sim prior.
    """
    root = Path(path)
    if not root.exists():
        raise MissingResourceError(f"prior {root}: no such directory (nothing is downloaded)")
    meta_file = root / METADATA_FILE
    if not root.is_dir() or not meta_file.is_file():
        raise DataError(f"prior {root}: not an fl-sim prior (no {METADATA_FILE}; an "
                        "interrupted save leaves none)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"prior {root}: unreadable {METADATA_FILE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"prior {root}: {METADATA_FILE} is not fl-sim prior metadata")
    return meta


def _check_digests(root: Path, recorded: Mapping[str, str]) -> None:
    for rel, digest in sorted(recorded.items()):
        f = root / rel
        if not f.is_file():
            raise DataError(f"prior {root}: {rel} is missing")
        if _sha256(f) != digest:
            raise DataError(f"prior {root}: {rel} is corrupt (SHA-256 differs from the one "
                            "recorded at save time)")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' own log lines and warnings off while it loads: on an error path they would
    add lines ("Defaulting to unsafe serialization", ...) to the one-line error we raise."""
    lib = logging.getLogger("diffusers")
    level = lib.level
    lib.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lib.setLevel(level)


def check_safe_weights(d: Path) -> None:
    """``d`` holds safetensors weights (``diffusion_pytorch_model.safetensors`` or its
    sharded index); a pickled checkpoint in their place is refused by name, unopened.

    Raises :class:`~fl_sim.errors.DataError` (one line, naming the file and how to convert
    it)."""
    if (d / SAFE_WEIGHTS).is_file() or (d / f"{SAFE_WEIGHTS}.index.json").is_file():
        return
    pickled = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise DataError(f"{d / pickled[0]}: refusing a pickled checkpoint (loading it could run "
                        f"code); only {SAFE_WEIGHTS} is read -- convert it once with "
                        "safetensors.torch.save_file(state_dict, "
                        f"'{SAFE_WEIGHTS}')")
    raise DataError(f"{d}: no weights ({SAFE_WEIGHTS} is missing)")


def load_unet(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """A diffusers ``UNet2DModel`` from a local directory (``config.json`` + safetensors
    weights), with the classic attention processor, on ``device``, in eval mode.

    Raises :class:`~fl_sim.errors.MissingResourceError` for a missing directory and
    :class:`~fl_sim.errors.DataError` for one diffusers cannot load or whose weights are not
    safetensors (one line; diffusers' own warnings are silenced).
    """
    from diffusers import UNet2DModel  # lazy: diffusers is heavy; attacks import priors


    d = Path(path)
    if not d.is_dir():
        raise MissingResourceError(f"UNet directory {d}: not found (nothing is downloaded)")
    if not (d / "config.json").is_file():
        raise DataError(f"{d}: not a diffusers model directory (no config.json)")
    check_safe_weights(d)
    try:
        with quiet_diffusers():
            unet = UNet2DModel.from_pretrained(str(d), local_files_only=True,
                                               low_cpu_mem_usage=False, use_safetensors=True)
    except Exception as exc:  # diffusers/safetensors raise many types for bad files
        msg = " ".join(str(exc).split())[:300]
        raise DataError(f"{d}: cannot load the UNet weights: {type(exc).__name__}: "
                        f"{msg}") from None
    use_classic_attention(unet)
    return unet.to(device).eval()


def load_prior(path: str | Path, *, device: str | torch.device = "cpu") -> Prior:
    """Load the prior saved at ``path`` by :func:`save_prior` (or ``fl-sim train-prior``).

    Returns a :class:`Prior` whose UNet is frozen on ``device``. Raises
    :class:`~fl_sim.errors.MissingResourceError` (missing path) or
    :class:`~fl_sim.errors.DataError` (not a prior, missing or corrupt weights) with a
    one-line message.
    """
    from diffusers import DDPMScheduler  # lazy: diffusers is heavy; attacks import priors

    root = Path(path)
    meta = read_metadata(root)
    _check_digests(root, meta.get("digests", {}))
    unet = load_unet(root / UNET_DIR, device=device)
    unet.requires_grad_(False)
    try:
        with quiet_diffusers():  # a scheduler is a JSON config; no weights to unpickle
            scheduler = DDPMScheduler.from_pretrained(str(root / SCHEDULER_DIR),
                                                      local_files_only=True,
                                                      use_safetensors=True)
    except Exception as exc:
        raise DataError(f"prior {root}: cannot load the scheduler: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32).clone()
    return Prior(unet=unet, scheduler=scheduler, metadata=meta, alphas_cumprod=abar,
                 path=root)


def prior_task(prior: Prior) -> Any:
    """A :class:`~fl_sim.tasks.diffusion.DiffusionTask` around ``prior.unet`` with the prior's
    own scheduler, so fl-sim's evaluation (``evaluate``) and sampling (``sample``) apply.

    The task shares the prior's (frozen) UNet; copy it first to train it.
    """

    sc = prior.scheduler.config
    c = prior.in_channels
    task = DiffusionTask(prior.unet, ((0.5,) * c, (0.5,) * c),
                         num_train_timesteps=int(sc.num_train_timesteps),
                         beta_schedule=sc.beta_schedule, prediction_type=sc.prediction_type)
    task.scheduler = prior.scheduler
    task.alphas_cumprod = prior.alphas_cumprod.detach().to("cpu", torch.float32).clone()
    return task


def open_prior(path: str | Path, *, where: str, device: str | torch.device = "cpu",
               scheduler: Any = None) -> Prior:
    """An fl-sim prior (:func:`load_prior`) or a local diffusers pipeline / UNet directory
    (:func:`load_checkpoint_prior`, its scheduler read from it;
    ``scheduler`` only for a bare UNet directory without one).

    A directory with ``fl_sim_prior.json``, or with neither ``model_index.json`` nor
    ``config.json`` (e.g. an interrupted save), goes to :func:`load_prior` and its errors.
    """
    root = Path(path)
    if (root / METADATA_FILE).is_file() or not (
            (root / "model_index.json").is_file() or (root / "config.json").is_file()):
        return load_prior(root, device=device)
    return load_checkpoint_prior(root, where=where, device=device, scheduler=scheduler)


def load_checkpoint_prior(path: str | Path, *, where: str, device: Any = "cpu",
                          scheduler: Any = None) -> Prior:
    """A :class:`Prior` from a diffusers pipeline or UNet directory.

    The UNet is frozen, in eval mode, with the classic attention processor; the scheduler is
    the checkpoint's (a ``DDPMScheduler`` built from its config). A bare UNet directory
    without ``scheduler_config.json`` takes ``scheduler`` (gidm / gidm_plus pass the record's
    own training schedule) and is refused without one. Raises the errors of
    :func:`fl_sim.diffusers_dirs.read_checkpoint` and :func:`load_unet`, one line each.
    """
    from diffusers import DDPMScheduler  # lazy: diffusers is heavy; attacks import priors

    ckpt = read_checkpoint(path, where=where)
    if ckpt.scheduler_config is not None:
        with quiet_diffusers():
            sched = DDPMScheduler.from_config(unet_arch_config(ckpt.scheduler_config))
    elif scheduler is not None:
        sched = scheduler
    else:
        raise ConfigError(f"{where}: {ckpt.root} is a bare UNet directory without "
                          "scheduler_config.json; give the pipeline directory (with "
                          "scheduler/) so that its noise schedule is read, not assumed")
    unet = load_unet(ckpt.unet_dir, device=device)
    unet.requires_grad_(False)
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32).clone()
    meta = {"source": "diffusers", "layout": ckpt.layout, "data": None, "filter": None,
            "num_examples": None}
    return Prior(unet=unet, scheduler=sched, metadata=meta, alphas_cumprod=abar,
                 path=ckpt.root)


def load_prior_for(path: str | Path, spec: Any, *, attack: str,
                   device: str | torch.device = "cpu") -> Prior:
    """:func:`open_prior` (an fl-sim prior or a diffusers directory), checked against the
    attacked classifier's ``spec``
    (``in_channels``, ``image_size``) for the prior-based attacks (gias, peer_diffusion_prior,
    user_level_diffusion).

    Raises :class:`~fl_sim.errors.MissingResourceError` (no such path),
    :class:`~fl_sim.errors.DataError` (not a prior) or :class:`~fl_sim.errors.ConfigError`
    (its images are not the classifier's shape, named as ``<attack>.prior``), each one line.
    """
    prior = open_prior(path, where=f"{attack}.prior", device=device)
    if (prior.in_channels, prior.image_size) != (spec.in_channels, spec.image_size):
        raise ConfigError(f"{attack}.prior: {path} makes {prior.in_channels}x"
                          f"{prior.image_size}x{prior.image_size} images; the attacked "
                          f"classifier takes {spec.in_channels}x{spec.image_size}x"
                          f"{spec.image_size}")
    return prior
