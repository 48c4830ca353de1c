"""Is a prior independent of the victims? Measured by content hashes, never assumed.

A prior-based attack (``gias``, ``peer_diffusion_prior``, ``user_level_diffusion``) is only
a fair figure if the prior never saw the images it is scored on. ``fl-sim train-prior``
records what the prior was trained on in ``PRIOR/examples.json``: the split, the dataset
indices and (since 2026-12-07) one content hash per training image (:func:`image_hashes`).
The SCORER, which holds the ground truth, compares them with the attacked images' hashes
(:func:`prior_overlap`); the attack itself never sees the victims.

Hash: SHA-256 of the image's shape and its 8-bit quantisation ``round(255 x)`` (``x`` in
[0, 1], ``[C, H, W]``), so an image stored losslessly as uint8 by the truth store and the
float image the prior trained on hash alike, while any visibly different image differs.

A prior trained before hashes were recorded: the hashes are recomputed from the recorded
source (``fl_sim_prior.json``'s ``data``) and ``examples.json``'s split + indices when that
source still loads; otherwise the overlap is reported as unknown (``count`` None), never 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fl_sim.data import load_data

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.json"
METADATA_FILE = "fl_sim_prior.json"
HASH_RULE = "sha256(shape, uint8(round(255 x)))"


def image_hashes(images: Tensor) -> list[str]:
    """One hex digest per image of ``images [N, C, H, W]`` in [0, 1] (see module doc)."""
    x = images.detach().to("cpu", torch.float32)
    u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8).contiguous()
    out = []
    for img in u8:
        h = hashlib.sha256(repr(tuple(img.shape)).encode())
        h.update(img.numpy().tobytes())
        out.append(h.hexdigest())
    return out


def _recompute(root: Path, examples: dict[str, Any]) -> list[str]:
    """Hashes of the recorded split + indices, reloaded from the recorded data source."""

    meta = json.loads((root / METADATA_FILE).read_text())
    data = dict(meta["data"])
    splits = load_data(data.pop("name"), **data)
    split = splits.train if examples["split"] == "train" else splits.test
    idx = torch.as_tensor(examples["indices"], dtype=torch.int64)
    return image_hashes(torch.as_tensor(split.images)[idx].float())


def prior_training_hashes(prior: str | Path) -> tuple[list[str] | None, str]:
    """``(hashes of the prior's training images, where they came from)``; ``(None, why)``
    when they cannot be known."""
    root = Path(prior)
    try:
        examples = json.loads((root / EXAMPLES_FILE).read_text())
    except (OSError, ValueError) as exc:
        return None, f"unknown: no readable {EXAMPLES_FILE} ({type(exc).__name__})"
    if isinstance(examples.get("hashes"), list):
        return [str(h) for h in examples["hashes"]], EXAMPLES_FILE
    try:
        return _recompute(root, examples), "recomputed from the recorded source and indices"
    except Exception as exc:  # noqa: BLE001 -- any failure: honestly unknown, not zero
        logger.warning("prior %s: cannot recompute its training images (%s: %s)", root,
                       type(exc).__name__, exc)
        return None, f"unknown: the recorded source does not load ({type(exc).__name__})"


def prior_overlap(prior: str | Path, victims: Tensor) -> dict[str, Any]:
    """How many of ``victims [N, C, H, W]`` (the attacked images, from the truth store) the
    prior at ``prior`` was trained on: ``{"count", "fraction", "victims", "prior_examples",
    "source", "hash"}``; ``count`` / ``fraction`` / ``prior_examples`` are None when the
    prior's training set is unknown."""
    trained, source = prior_training_hashes(prior)
    n = int(victims.shape[0])
    if trained is None:
        return {"count": None, "fraction": None, "victims": n, "prior_examples": None,
                "source": source, "hash": HASH_RULE}
    seen = set(trained)
    count = sum(h in seen for h in image_hashes(victims))
    return {"count": count, "fraction": count / n if n else 0.0, "victims": n,
            "prior_examples": len(trained), "source": source, "hash": HASH_RULE}


def overlap_warning(overlap: dict[str, Any] | None) -> str | None:
    """The one warning line a report shows for ``overlap`` (None when it is 0 or absent)."""
    if not overlap:
        return None
    if overlap.get("count") is None:
        return (f"prior overlap with the victims unknown ({overlap.get('source')}): its "
                "independence from them is not checked")
    if overlap["count"] > 0:
        return (f"WARNING: the prior was trained on {overlap['count']} of the "
                f"{overlap['victims']} attacked images ({overlap['fraction']:.0%}): the "
                "figure is not that of a prior independent of the victims")
    return None


def overlap_field(attack: Any, victims: Tensor) -> dict[str, Any]:
    """``{"prior_overlap": ...}`` for a result row when ``attack`` has a ``prior`` path (gias,
    peer_diffusion_prior, user_level_diffusion), else ``{}``; logs a warning when the prior
    saw some of the victims. ``victims``: the attacked images from the truth store."""
    prior = getattr(attack, "prior", None)
    if not isinstance(prior, str | Path) or not str(prior):
        return {}
    overlap = prior_overlap(prior, victims)
    if (line := overlap_warning(overlap)) is not None:
        logger.warning("%s: %s", type(attack).__name__, line)
    return {"prior_overlap": overlap}
