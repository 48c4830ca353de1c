"""An attack's ``Reconstruction.extras`` made safe for ``attacks.jsonl`` (strict JSON).

Attacks put diagnostics in ``extras``: restart objectives, pruning schedules, the images of
an intermediate phase (GIDM's phase 1). :func:`extras_to_json` keeps every entry, converted:

* numbers, strings, booleans, None, lists and mappings pass through (non-finite floats become
  ``None``: the results file is strict JSON);
* small tensors / arrays (at most :data:`MAX_INLINE` elements) become nested lists;
* larger ones are saved next to the results as ``<stem>_<key>.npz`` (key ``array``) and, when
  they look like images (``[N, C, H, W]``, C = 1 or 3, values in [0, 1]), also as a PNG grid;
  the row then holds ``{"file", "png", "shape", "dtype", "min", "max", "mean"}`` with paths
  relative to the run directory;
* anything else becomes its (truncated) ``repr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: tensors with at most this many elements are written inline as lists
MAX_INLINE = 256


def extras_to_json(extras: Mapping[str, Any], run_dir: Path, stem: str) -> dict[str, Any]:
    """JSON-safe copy of ``extras`` (see module doc); large arrays go to
    ``run_dir/<stem>_<key>.npz`` (+ ``.png`` for images).

    >>> import tempfile
    >>> out = extras_to_json({"restart_objectives": torch.tensor([0.5, float("nan")]),
    ...                       "survivors": (0, 3)}, Path(tempfile.mkdtemp()), "attacks/x")
    >>> out
    {'restart_objectives': [0.5, None], 'survivors': [0, 3]}
    """
    return {str(k): _safe(v, Path(run_dir), f"{stem}_{_slug(k)}") for k, v in extras.items()}


def _slug(key: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(key))[:40]


def _safe(v: Any, run_dir: Path, stem: str) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    if isinstance(v, np.ndarray):
        if v.size <= MAX_INLINE:
            return _safe(v.tolist(), run_dir, stem)
        return _save_array(v, run_dir, stem)
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _safe(x, run_dir, f"{stem}_{_slug(k)}") for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_safe(x, run_dir, f"{stem}_{i}") for i, x in enumerate(v)]
    return repr(v)[:200]


def _save_array(a: np.ndarray, run_dir: Path, stem: str) -> dict[str, Any]:
    path = run_dir / f"{stem}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, array=a)
    out: dict[str, Any] = {"file": str(path.relative_to(run_dir)), "shape": list(a.shape),
                           "dtype": str(a.dtype)}
    if np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating):
        finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
        if finite.size:
            out.update(min=float(finite.min()), max=float(finite.max()),
                       mean=float(finite.mean()))
        if a.ndim == 4 and a.shape[1] in (1, 3) and finite.size == a.size and finite.size \
                and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0:
            from PIL import Image  # lazy: Pillow only where a PNG is written

            # lazy: the run_dir package loads config and views, which attacks need not
            from fl_sim.run_dir.images import image_grid
            png = path.with_suffix(".png")
            Image.fromarray(image_grid([torch.from_numpy(np.asarray(a, np.float32))])).save(png)
            out["png"] = str(png.relative_to(run_dir))
    return out
