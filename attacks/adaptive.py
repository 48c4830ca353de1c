"""Adaptive gradient matching: an attack told which public defense shaped the update.

A defense whose mechanism is public (Kerckhoffs) leaves traces the attacker can model: the
zeros of a pruned update ARE its mask, a signSGD update is a scaled sign, a clipped update
has a known norm bound. An adaptive attack applies the same (or a smooth surrogate of the)
defense to its CANDIDATE's update before comparing it with the observed one, so that it
matches what survived instead of penalising its candidate for what the defense removed
(the "adaptive attacker" that Carlini & Wagner, "Adversarial Examples Are Not Easily
Detected", AISec 2017, ask every defense to be evaluated against). The observed target
itself is left as received.

:func:`adaptation` reads ``record.defenses`` (the ``describe()`` dicts of
:mod:`defenses`) and returns an :class:`Adaptation`: a callable on candidate updates
``{name: [R, *shape]}`` (``R`` restarts) plus a description per defense of what it adapted
to. Per defense:

* ``pruning``: mask the candidate with the observed update's non-zero pattern (only the
  surviving coordinates are compared; the masked-out ones are ignored, not matched to 0);
* ``soteria``: mask the all-zero input-feature columns of 2-D weight updates (the pruned
  representation features);
* ``quantization`` ``mode = "sign"``: the candidate becomes ``mean|g| · tanh(g / τ)`` per
  tensor with ``τ = 0.1 · mean|g|`` (a smooth, differentiable surrogate of the scaled sign);
  ``mode = "stochastic"``: a tolerance (dead-zone) distance — every true entry lies within
  one level step ``Δ = 2 max|q| / (2**bits − 1)`` of its observed level ``q`` (the grid is
  read off the update itself), so the candidate becomes ``q + (g − clamp(g, q − Δ, q + Δ))``:
  entries inside the box count as matched, only the excess is compared;
* ``local_dp`` (or any defense with ``clipping_norm``): the candidate's whole update is
  clipped to the same bound, in the target's units (``scale`` converts a delta read as a
  gradient); the Gaussian noise is not modelled further (an L2 distance is already its
  likelihood; cosine matching ignores the scale);
* ``dp_sgd``: when the update was computed from ONE example in one step
  (``single_example``), per-example clipping is whole-update clipping: the candidate is
  clipped to ``max_grad_norm`` as for ``local_dp``; over several examples or steps the
  per-example clip happens inside training and is not modelled (said so);
* defenses not listed: nothing, said so.

On an aggregate of several clients (``aggregate=True``) only the masks are modelled.
The notes describe only what was done; a defense left alone is named with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attacks.components.gradients import Params

Transform = Callable[[Params], Params]
#: surrogate sharpness of the sign: tau = SIGN_TEMPERATURE * mean|g| per tensor
SIGN_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Adaptation:
    """Transforms applied in order to candidate updates ``{name: [R, *shape]}`` (names not
    in a transform's scope pass unchanged); ``adapted_to``: one line per defense."""

    transforms: tuple[Transform, ...] = ()
    adapted_to: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self, update: Params) -> Params:
        for fn in self.transforms:
            update = fn(update)
        return update

    @property
    def active(self) -> bool:
        """Does it change anything (a transform at all)?"""
        return bool(self.transforms)


def _masked(masks: Mapping[str, Tensor]) -> Transform:
    def fn(update: Params) -> Params:
        return {k: (v * masks[k].to(v.dtype) if k in masks else v) for k, v in update.items()}
    return fn


def _pruning(d: Mapping[str, Any], target: Params, scale: float) -> tuple[Transform | None, str]:
    masks = {k: t != 0 for k, t in target.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return _masked(masks), (f"pruning: matched only the {kept} of {total} surviving "
                            f"(non-zero) coordinates ({100.0 * kept / max(total, 1):.1f} %)")


def _soteria(d: Mapping[str, Any], target: Params, scale: float) -> tuple[Transform | None, str]:
    masks, cols = {}, 0
    for k, t in target.items():
        if t.dim() == 2:
            dead = (t == 0).all(dim=0)
            if bool(dead.any()):
                masks[k] = (~dead).unsqueeze(0).expand_as(t)
                cols += int(dead.sum())
    if not masks:
        return None, "soteria: no all-zero feature column in the update; nothing to mask"
    return _masked(masks), (f"soteria: ignored the {cols} zeroed feature columns of "
                            f"{', '.join(masks)}")


def _quantization(d: Mapping[str, Any], target: Params, scale: float
                  ) -> tuple[Transform | None, str]:
    if d.get("mode") != "sign":
        return _quantization_box(int(d.get("bits", 4)), target)
    names = set(target)

    def fn(update: Params) -> Params:
        out = {}
        for k, v in update.items():
            if k not in names:
                out[k] = v
                continue
            m = v.abs().flatten(1).mean(1).view(-1, *([1] * (v.dim() - 1)))
            tau = (SIGN_TEMPERATURE * m).detach().clamp_min(1e-20)
            out[k] = m * torch.tanh(v / tau)
        return out
    return fn, (f"quantization (sign): candidate mapped to mean|g| * tanh(g / "
                f"({SIGN_TEMPERATURE} mean|g|)), a smooth scaled sign")


def _quantization_box(bits: int, target: Params) -> tuple[Transform | None, str]:
    # each true entry lies within one level step of its observed level: |x - q| <= delta
    steps = 2 ** bits - 1
    delta = {k: 2 * t.abs().max() / steps for k, t in target.items()}

    def fn(update: Params) -> Params:
        out = {}
        for k, v in update.items():
            if k not in delta:
                out[k] = v
                continue
            t, dl = target[k], delta[k]
            # dead zone: inside [q - delta, q + delta] the candidate counts as a perfect match
            out[k] = t + (v - torch.maximum(torch.minimum(v, t + dl), t - dl))
        return out
    return fn, (f"quantization (stochastic, {bits} bits): entries within one level step "
                "of the observed level count as matched (dead zone), only the excess is "
                "compared")


def _clipping(d: Mapping[str, Any], target: Params, scale: float
              ) -> tuple[Transform | None, str]:
    bound = float(d["clipping_norm"]) * abs(scale)
    names = list(target)

    def fn(update: Params) -> Params:
        sq = sum(update[k].flatten(1).pow(2).sum(1) for k in names)
        factor = (bound / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)  # type: ignore[union-attr]
        return {k: (v * factor.view(-1, *([1] * (v.dim() - 1))) if k in target else v)
                for k, v in update.items()}
    return fn, (f"{d.get('name')}: candidate update clipped to norm {bound:.4g} (clipping_norm "
                f"{d['clipping_norm']} in the target's units); noise not modelled")


_HANDLERS: dict[str, Callable[[Mapping[str, Any], Params, float],
                              tuple[Transform | None, str]]] = {
    "pruning": _pruning, "soteria": _soteria, "quantization": _quantization,
}


def single_example(record: Any) -> bool:
    """Is ``record`` one client's update from ONE example in one local step?"""
    return (record.tap == "server_in" and int(record.num_examples) == 1
            and int(record.local_steps) <= 1)


def adaptation(defenses: Sequence[Any], target: Params, *, scale: float = 1.0,
               aggregate: bool = False, single_example: bool = False) -> Adaptation:
    """The :class:`Adaptation` to ``defenses`` (``record.defenses``: describe() dicts or
    names) for the observed ``target`` ``{name: [*shape]}``.

    ``scale`` is the factor that turned the recorded update into ``target`` (e.g.
    ``-1 / (lr * local_steps)`` when a delta is matched as a mean gradient; 1 otherwise): it
    converts norm bounds into the target's units. ``aggregate``: the target is a SUM/mean of
    several clients' defended updates (the aggregate tap, a peer's view): a per-client sign or
    clip does not commute with averaging, so only the masks are modelled there (a coordinate
    zero in the aggregate was zeroed in every client's update, barring exact cancellation).
    ``single_example``: the update comes from one example in one local step (DP-SGD's
    per-example clipping bound then applies to the whole update).
    """
    transforms: list[Transform] = []
    notes: list[str] = []
    for d in defenses:
        d = {"name": d} if isinstance(d, str) else dict(d)
        name = str(d.get("name", "?"))
        handler = _HANDLERS.get(name)
        if handler is None and "clipping_norm" in d:
            handler = _clipping
        elif handler is None and "max_grad_norm" in d and single_example:
            # one example, one step: DP-SGD's per-example clip is the whole update's clip
            d, handler = {**d, "clipping_norm": d["max_grad_norm"]}, _clipping
        if handler is None:
            notes.append(f"{name}: not modelled (no public mechanism the matching can use)")
            continue
        if aggregate and handler not in (_pruning, _soteria):
            notes.append(f"{name}: per-client transform seen through an aggregate; not "
                         "modelled")
            continue
        fn, note = handler(d, target, scale)
        if fn is not None:
            transforms.append(fn)
        notes.append(note)
    return Adaptation(tuple(transforms), tuple(notes))
