"""Shadow / reference models for LiRA and RMIA: trained on the attacker's auxiliary data,
once per data set, cached by content hash.

A shadow model has the target's architecture (:class:`~fl_sim.records.ModelSpec`, public in
FL) and is trained by :func:`train_shadow` with a fixed recipe (:class:`ShadowRecipe`: SGD
steps, lr, batch size, the size of its training set). Model ``k`` of a set trains on a
seeded random subset of a POOL:

* offline (``pool`` = the auxiliary data, which holds no candidate): every model is a
  reference model that saw none of the candidates ("OUT" for all);
* online (``pool`` = auxiliary data + the candidates, Carlini et al.'s shadow training): each
  candidate is IN the training set of about half the models; :func:`shadow_set` returns the
  IN mask ``[K, N]`` over the pool.

**Cache** (decision, documented in docs/how-to/inference-attacks.md):
``$FL_SIM_CACHE_DIR/shadows/`` if that is set,
else ``~/.cache/fl-sim/shadows/``; one ``<key>.safetensors`` per model, ``key`` = SHA-256 of
the pool's content hash, the model spec, the recipe, the model's index and the set's seed. A
grid of runs over the same data (same clients, so the same held-out pool) and the same
candidate seed trains each model once; a pool whose content differs can never hit. Written
atomically (:func:`fl_sim.stores.write_tensors`), so concurrent grid cells at worst train the
same model twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from fl_sim.errors import ConfigError
from fl_sim.records import ModelSpec
from fl_sim.seeding import torch_generator
from fl_sim.stores import read_tensors, write_tensors
from fl_sim.tasks.base import Batch, module_tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowRecipe:
    """How each shadow model is trained: ``size`` examples drawn from the pool, ``steps``
    plain SGD steps (as fl-sim's clients by default) of ``batch_size`` at ``lr``."""

    size: int = 256
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.05


def cache_dir() -> Path:
    """Where shadow models are cached (module doc)."""
    root = os.environ.get("FL_SIM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "fl-sim") / "shadows"


def _key(spec: ModelSpec, recipe: ShadowRecipe, pool_digest: str, index: int,
         seed: int) -> str:
    blob = json.dumps([spec.to_json(), asdict(recipe), pool_digest, index, seed],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_shadow(spec: ModelSpec, images: Tensor, labels: Tensor, recipe: ShadowRecipe, *,
                 generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """A model of ``spec`` trained on ``images [M, C, H, W]`` / ``labels [M]`` by ``recipe``;
    its ``state_dict`` on CPU."""
    from fl_sim.tasks import build_task
    init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    task = build_task(spec, device=device, seed=init_seed)
    task.model.train()
    opt = torch.optim.SGD(task.model.parameters(), lr=recipe.lr)
    n = images.shape[0]
    for _ in range(recipe.steps):
        pos = torch.randint(0, n, (min(recipe.batch_size, n),), generator=generator)
        params, buffers = module_tensors(task.model)
        loss = task.loss(params, buffers, Batch(images[pos].to(device), labels[pos].to(device)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().cpu().clone() for k, v in task.model.state_dict().items()}


def shadow_set(spec: ModelSpec, pool_images: Tensor, pool_labels: Tensor, pool_digest: str,
               recipe: ShadowRecipe, *, num_models: int, seed: int, halves: int = 0,
               device: torch.device = torch.device("cpu")
               ) -> tuple[list[dict[str, Tensor]], Tensor]:
    """``(states, in_mask [K, M])``: ``num_models`` models, model ``k`` trained on a seeded
    subset of ``recipe.size`` pool examples (``in_mask[k]``), loaded from the cache when
    there. ``halves``: the first ``halves`` pool entries (online LiRA's candidates) are split
    in halves: model ``2j`` takes a seeded random half, model ``2j + 1`` the other half, so
    each is IN exactly half the models (``num_models`` even); the rest of ``recipe.size``
    is drawn from the other pool entries. Raises :class:`~fl_sim.errors.ConfigError` (one
    line) when the pool is smaller than ``recipe.size``, ``num_models < 1``, or the size
    cannot hold half the candidates."""
    m = int(pool_labels.shape[0])
    if num_models < 1:
        raise ConfigError(f"num_shadows = {num_models}: at least one shadow model is needed")
    if recipe.size > m:
        raise ConfigError(f"shadow_size = {recipe.size} exceeds the {m} examples the attacker "
                          "holds for shadow training")
    states, masks = [], []
    root = cache_dir()
    if halves and recipe.size < (halves + 1) // 2:
        raise ConfigError(f"shadow_size = {recipe.size} cannot hold half of the {halves} "
                          "candidates (online shadow training)")
    for k in range(num_models):
        g = torch_generator(seed, "shadow", pool_digest, k)
        if halves:
            split = torch.randperm(halves, generator=torch_generator(seed, "halves",
                                                                     pool_digest, k // 2))
            half = split[:halves // 2] if k % 2 == 0 else split[halves // 2:]
            rest = halves + torch.randperm(m - halves, generator=g)[:recipe.size - len(half)]
            subset = torch.cat([half, rest])
        else:
            subset = torch.randperm(m, generator=g)[:recipe.size]
        mask = torch.zeros(m, dtype=torch.bool)
        mask[subset] = True
        path = root / f"{_key(spec, recipe, pool_digest, k, seed + 7919 * halves)}.safetensors"
        state = _load(path)
        if state is None:
            state = train_shadow(spec, pool_images[subset], pool_labels[subset], recipe,
                                 generator=g, device=device)
            write_tensors(path, state, {"index": k, "pool": pool_digest,
                                        "recipe": asdict(recipe), "seed": seed})
            logger.info("trained shadow model %d/%d (%s)", k + 1, num_models, path.name)
        states.append(state)
        masks.append(mask)
    return states, torch.stack(masks)


def _load(path: Path) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        return read_tensors(path)[0]
    except Exception:  # noqa: BLE001 -- a torn cache file is retrained, never trusted
        logger.warning("shadow cache %s unreadable; retraining", path)
        return None


@torch.no_grad()
def true_class_logits(spec: ModelSpec, state: Mapping[str, Tensor], images: Tensor,
                      labels: Tensor, *, device: torch.device = torch.device("cpu")
                      ) -> tuple[Tensor, Tensor]:
    """``(phi [N], p [N])`` of a model of ``spec`` at ``state``: the logit-scaled confidence
    ``φ = log p_y − log(1 − p_y)`` (LiRA's statistic, computed stably from the logits) and
    the softmax probability ``p_y`` of the true label (RMIA's)."""
    task = spec.build_task(device=device)
    task.model.load_state_dict(dict(state), strict=True)
    task.model.eval()
    params, buffers = module_tensors(task.model)
    logits = task.logits(params, buffers, images.to(device).float()).double().cpu()
    y = labels.long().cpu()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return true - others, torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
