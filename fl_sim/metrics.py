"""Reconstruction metrics: PSNR, SSIM, MSE, LPIPS, label accuracy and batch matching.

THE convention of fl-sim (every number in a result file follows it; adapters for other papers'
conventions must say so in their name):

- Images are float tensors in [0, 1] pixel space, ``[B, C, H, W]`` (a single ``[C, H, W]`` is
  treated as a batch of one). ``data_range`` is 1.
- A reconstructed batch has no order (shared labels are sorted, optimisers permute), so
  reconstructions are first matched one-to-one to the true images by the Hungarian algorithm
  (``scipy.optimize.linear_sum_assignment``) on per-pair MSE; every metric is then computed on
  the matched pairs.
- PSNR is computed per image over all pixels AND channels (``10 log10(1 / MSE)``), then the
  per-image values are averaged (not the PSNR of the averaged MSE).
- SSIM follows scikit-image / torchmetrics: 11x11 Gaussian window with sigma 1.5,
  ``K1 = 0.01``, ``K2 = 0.03``, population covariances, mean over the valid (un-padded)
  window positions, computed per channel and averaged over channels, per image.
- Label accuracy is order-free: the number of labels of the true multiset that the
  predicted multiset also holds, divided by the batch size.
- LPIPS needs the optional ``lpips`` package AND a local file with the full LPIPS state dict;
  nothing is ever downloaded (:class:`~fl_sim.errors.MissingResourceError` otherwise).

All functions are pure torch/numpy/scipy; per-image results come back as float64 CPU tensors.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fl_sim.errors import MissingResourceError

__all__ = ["mse", "psnr", "ssim", "match_pairs", "match_batch", "label_accuracy",
           "score_reconstruction", "lpips_available", "lpips", "roc_curve", "tpr_at_fpr",
           "roc_metrics", "ROC_FPR_LEVELS"]

MatchMetric = Literal["mse", "psnr"]


def _as_batch(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _as_batch(x, "x"), _as_batch(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error over pixels and channels. ``[B,C,H,W]`` x2 -> ``[B]``."""
    x, y = _pair(x, y)
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB over all pixels and channels. ``[B,C,H,W]`` x2 -> ``[B]``.

    Identical images give ``inf``.

    >>> x = torch.zeros(1, 1, 2, 2); y = torch.full((1, 1, 2, 2), 0.1)
    >>> round(float(psnr(x, y)[0]), 6)
    20.0
    """
    err = mse(x, y)
    return 10.0 * torch.log10(data_range**2 / err)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, *, window_size: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004), channels averaged. ``[B,C,H,W]`` x2 -> ``[B]``.

    Gaussian window as scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``; raises ``ValueError`` for images smaller than
    the window.
    """
    x, y = _pair(x, y)
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {window_size}x{window_size} "
                         "SSIM window")
    win = _gaussian_window(window_size, sigma).expand(c, 1, window_size, window_size)

    def filt(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1)
                                                      * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


def _pairwise_mse(recon: Tensor, truth: Tensor) -> Tensor:
    r = _as_batch(recon, "recon").flatten(1)
    t = _as_batch(truth, "truth").flatten(1)
    if r.shape[1] != t.shape[1]:
        raise ValueError(f"recon and truth images differ in size: {tuple(recon.shape[1:])} vs "
                         f"{tuple(truth.shape[1:])}")
    return torch.cdist(r, t).pow(2) / r.shape[1]  # [n_recon, n_truth]


def match_pairs(recon: Tensor, truth: Tensor, metric: MatchMetric = "mse"
                ) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one matching (Hungarian) of reconstructions to true images.

    ``recon`` ``[R,C,H,W]``, ``truth`` ``[T,C,H,W]`` -> ``(recon_idx, truth_idx)``, both
    ``[min(R, T)]`` int64, sorted by ``truth_idx``. ``metric="mse"`` minimises total MSE,
    ``"psnr"`` maximises total PSNR (the two differ only when images are rectangularly
    unmatched or errors are very unequal). Raises ``ValueError`` for an unknown metric.
    """
    cost = _pairwise_mse(recon, truth)
    if metric == "psnr":
        cost = 10.0 * torch.log10(cost.clamp_min(1e-20))  # = -PSNR; minimised
    elif metric != "mse":
        raise ValueError(f"unknown matching metric {metric!r}; allowed: 'mse', 'psnr'")
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.argsort(cols)
    return torch.as_tensor(rows[order], dtype=torch.int64), \
        torch.as_tensor(cols[order], dtype=torch.int64)


def match_batch(recon: Tensor, truth: Tensor, metric: MatchMetric = "mse") -> Tensor:
    """The permutation aligning reconstructions to the true batch: ``recon[perm] ~ truth``.

    ``recon`` ``[R,C,H,W]`` with ``R >= T`` and ``truth`` ``[T,C,H,W]`` -> ``perm`` ``[T]``
    int64. Raises ``ValueError`` if there are fewer reconstructions than true images (use
    :func:`match_pairs` then).
    """
    if recon.shape[0] < truth.shape[0]:
        raise ValueError(f"{recon.shape[0]} reconstructions cannot cover {truth.shape[0]} "
                         "true images; use match_pairs")
    rows, _ = match_pairs(recon, truth, metric)
    return rows


def label_accuracy(pred: Tensor, true: Tensor) -> float:
    """Order-free label accuracy: multiset overlap of ``pred`` and ``true`` over ``len(true)``.

    >>> label_accuracy(torch.tensor([3, 1, 1]), torch.tensor([1, 3, 3]))
    0.6666666666666666
    """
    p = torch.as_tensor(pred).flatten().long().cpu()
    t = torch.as_tensor(true).flatten().long().cpu()
    if t.numel() == 0:
        raise ValueError("label_accuracy needs at least one true label")
    if p.numel() == 0:
        return 0.0
    n = int(max(p.max(), t.max())) + 1
    hits = torch.minimum(torch.bincount(p, minlength=n), torch.bincount(t, minlength=n))
    return float(hits.sum()) / t.numel()


def score_reconstruction(recon_images: Tensor, truth_images: Tensor,
                         recon_labels: Tensor | None = None,
                         truth_labels: Tensor | None = None, *,
                         match_on: MatchMetric = "mse") -> dict[str, Any]:
    """Score a reconstructed batch against the truth under THE convention (module doc).

    ``recon_images`` ``[R,C,H,W]`` (``R`` may be 0 for label-only attacks), ``truth_images``
    ``[T,C,H,W]``, labels ``[R]`` / ``[T]``. Returns plain floats/lists: ``psnr``, ``ssim``,
    ``mse`` (means over matched pairs; NaN without images), ``psnr_per_image`` etc. (in
    true-image order), ``recon_index`` / ``truth_index`` (the matching) and
    ``label_accuracy`` (None without labels).
    """
    out: dict[str, Any] = {"num_true": int(truth_images.shape[0]),
                           "num_reconstructed": int(recon_images.shape[0])}
    if recon_images.shape[0] > 0 and truth_images.shape[0] > 0:
        r_idx, t_idx = match_pairs(recon_images, truth_images, match_on)
        r, t = recon_images[r_idx], truth_images[t_idx]
        per = {"psnr": psnr(r, t), "ssim": ssim(r, t), "mse": mse(r, t)}
        for k, v in per.items():
            out[k] = float(v.mean())
            out[f"{k}_per_image"] = [float(a) for a in v]
        out["recon_index"], out["truth_index"] = r_idx.tolist(), t_idx.tolist()
    else:
        for k in ("psnr", "ssim", "mse"):
            out[k], out[f"{k}_per_image"] = math.nan, []
        out["recon_index"], out["truth_index"] = [], []
    out["label_accuracy"] = (label_accuracy(recon_labels, truth_labels)
                             if recon_labels is not None and truth_labels is not None
                             else None)
    return out


# -- LPIPS (optional: package + local weights) ----------------------------------------------

def _lpips_package_installed() -> bool:
    return importlib.util.find_spec("lpips") is not None


def lpips_available(weights_path: str | Path | None) -> bool:
    """Whether :func:`lpips` can run: the ``lpips`` package is installed and the file exists."""
    return (weights_path is not None and Path(weights_path).is_file()
            and _lpips_package_installed())


_LPIPS_CACHE: dict[tuple[str, str], Any] = {}


def _lpips_model(weights_path: str | Path | None, net: str) -> Any:
    if not _lpips_package_installed():
        raise MissingResourceError("LPIPS needs the optional 'lpips' package "
                                   "(pip install 'fl-sim[lpips]'); it is not installed")
    if weights_path is None or not Path(weights_path).is_file():
        raise MissingResourceError(
            f"LPIPS weights not found at {weights_path!r}: give a local file holding the full "
            f"LPIPS-{net} state dict (backbone + linear heads); fl-sim never downloads weights")
    key = (str(Path(weights_path).resolve()), net)
    if key not in _LPIPS_CACHE:
        # lazy: keeps lpips out of this module's import
        import lpips as lpips_pkg  # optional dependency

        # pretrained=False / pnet_rand=True: build the architecture without any download,
        # then load backbone and heads from the one local file.
        model = lpips_pkg.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        _LPIPS_CACHE[key] = model.eval()
    return _LPIPS_CACHE[key]


def lpips(x: Tensor, y: Tensor, *, weights_path: str | Path | None, net: str = "alex"
          ) -> Tensor:
    """Per-image LPIPS distance (Zhang et al. 2018). ``[B,C,H,W]`` in [0,1] x2 -> ``[B]``.

    Raises :class:`~fl_sim.errors.MissingResourceError` when the ``lpips`` package or the
    local weights file is missing; never downloads.
    """
    model = _lpips_model(weights_path, net)
    xb, yb = _pair(x, y)
    if xb.shape[1] == 1:  # the LPIPS backbones take RGB
        xb, yb = xb.expand(-1, 3, -1, -1), yb.expand(-1, 3, -1, -1)
    with torch.no_grad():
        d = model(xb.float() * 2 - 1, yb.float() * 2 - 1)  # LPIPS expects [-1, 1]
    return d.flatten().double()


# -- membership / property inference: ROC metrics -------------------------------------------
#: the FPR levels the field reports TPR at (Carlini et al. 2022, "Membership Inference Attacks
#: From First Principles": low-FPR TPR, not average accuracy, is the figure of merit)
ROC_FPR_LEVELS = (0.1, 0.01, 0.001, 0.0001)


def roc_curve(scores: Tensor | np.ndarray, membership: Tensor | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` over every distinct threshold, from ``(0, 0)`` to ``(1, 1)``.

    ``scores`` ``[N]`` (higher = more likely a member / has the property), ``membership``
    ``[N]`` bool (the truth; only the scorer holds it). Tied scores form one step (as
    scikit-learn's ``roc_curve(drop_intermediate=False)``). Raises ``ValueError`` without
    both classes or for non-finite scores.

    >>> fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.1]), np.array([True, False, False]))
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double().numpy()).ravel()
    y = np.asarray(torch.as_tensor(membership).detach().cpu().bool().numpy()).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and membership {y.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN/inf")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"ROC needs members and non-members (got {pos} and {neg})")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The highest TPR among thresholds whose FPR is at most ``level`` (0 allowed).

    >>> tpr_at_fpr(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0, 1.0]), 0.0)
    1.0
    """
    ok = fpr <= level + 1e-12
    return float(tpr[ok].max())


def roc_metrics(scores: Tensor | np.ndarray, membership: Tensor | np.ndarray
                ) -> dict[str, Any]:
    """The figures membership / property inference is reported with.

    ``auc`` (ROC AUC, trapezoidal = Mann-Whitney with ties counted 1/2),
    ``tpr_at_fpr_10pct`` / ``_1pct`` / ``_0.1pct`` / ``_0.01pct`` (None where fewer than
    ``1 / level`` non-members make the level unresolvable: one false positive would already
    exceed it), ``tpr_at_fpr_0`` (members scored above every non-member),
    ``balanced_accuracy`` (the best threshold's ``(TPR + TNR) / 2``, as LiRA reports
    "accuracy" on balanced sets), ``num_members``, ``num_nonmembers`` and the curve itself
    (``roc_fpr`` / ``roc_tpr``, for the report's log-scale plot). Raises ``ValueError`` as
    :func:`roc_curve`.

    >>> m = roc_metrics(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0]))
    >>> m["auc"], m["balanced_accuracy"], m["tpr_at_fpr_0"]
    (0.75, 0.75, 0.5)
    """
    fpr, tpr = roc_curve(scores, membership)
    y = np.asarray(torch.as_tensor(membership).bool().numpy()).ravel()
    neg = int((~y).sum())
    out: dict[str, Any] = {"auc": float(np.trapezoid(tpr, fpr))}
    for level in ROC_FPR_LEVELS:
        name = f"tpr_at_fpr_{level * 100:g}pct"
        out[name] = tpr_at_fpr(fpr, tpr, level) if neg * level >= 1 - 1e-9 else None
    out["tpr_at_fpr_0"] = tpr_at_fpr(fpr, tpr, 0.0)
    out["balanced_accuracy"] = float(((tpr + 1.0 - fpr) / 2).max())
    out["num_members"], out["num_nonmembers"] = int(y.sum()), neg
    out["roc_fpr"], out["roc_tpr"] = fpr.tolist(), tpr.tolist()
    return out
