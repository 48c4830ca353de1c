"""A leaner double back-propagation for gradient matching (an engineering step, no paper).

Gradient-matching attacks (DLG, Inverting Gradients) differentiate a PARAMETER gradient
``g(x) = dL/dtheta`` with respect to the INPUT images ``x``. With stock autograd that second
backward pass wastes work on every convolution: PyTorch's ``aten::_convolution_double_backward``
always computes the second-order term with respect to the weights (``conv(ggI, gO)``), whether
or not anybody asked for it — measured 6.7 ms per 256-channel 32x32 layer at batch 1, more than
the layer's forward convolution (2.8 ms), on the 2-core CPU of ``benchmarks/RESULTS.md``.

Inside :class:`LeanSecondOrder`, ``torch.nn.functional.conv2d`` runs as :class:`_Conv2d`, whose
backward is the differentiable :class:`_Conv2dGrad`; its own backward (the double backward)
computes only the input-side terms: ``d/dgy = conv(ggx, W) + conv(x, ggW) + ggb`` and
``d/dx = conv_input_grad(gy, ggW)``, never the weight term. Parameter gradients are produced
once, by :meth:`LeanSecondOrder.parameter_grads`; every later derivative through the graph treats
the parameters as CONSTANTS (weights and biases get no gradient). That is exactly what an
attack needs and nothing more. (A Python autograd function only sees which inputs require
grad, not which ones the current backward call wants, so the switch is explicit: without it
the second pass would recompute every weight gradient of the forward convolutions.)
Everything else (BatchNorm, activations, linear layers, pooling) runs as stock autograd;
string ``padding`` ("same"/"valid") falls back to stock autograd too.

Measured on the ConvNet-64 case at batch 1 (``benchmarks/attack_speed.py``): one Inverting
Gradients iteration drops from ~3.1–3.5 to ~2.6 plain forward+backward passes. On tiny models
(LeNet) the Python dispatch costs more than it saves; see ``inverting_gradients``'s
``double_backward`` option. Plain autograd only (not ``torch.func`` transforms: the restart
batch of ``vmap`` and the unrolled multi-step updates keep stock formulas).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["LeanSecondOrder"]

_CONV_ARGS = ("bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, 1, 0, 1, 1)


def _pair(v: Any) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


class _Conv(NamedTuple):
    """The hyper-parameters of one ``conv2d`` call, as ``convolution_backward`` takes them."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    has_bias: bool


class _Conv2dGrad(torch.autograd.Function):
    """``(gy, x, w) -> (gx, gw, gb)`` of a 2-d convolution, with a lean backward.

    ``w`` arrives detached (parameters are constants for second-order work), so the backward
    never computes a weight term; ``mask`` says which first-order outputs to compute.
    """

    @staticmethod
    def forward(ctx: Any, gy: Tensor, x: Tensor, w: Tensor, c: _Conv,
                mask: list[bool]) -> tuple[Tensor | None, ...]:
        ctx.save_for_backward(gy, x, w)
        ctx.conv = c
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero tensor
        return torch.ops.aten.convolution_backward(
            gy, x, w, [w.shape[0]] if c.has_bias else None, c.stride, c.padding, c.dilation,
            False, [0, 0], c.groups, mask)

    @staticmethod
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None,
                 ggb: Tensor | None) -> tuple[Tensor | None, ...]:
        gy, x, w = ctx.saved_tensors
        c: _Conv = ctx.conv
        need_gy, need_x = ctx.needs_input_grad[:2]
        d_gy = d_x = None
        if need_gy:
            terms = []
            if ggx is not None:
                terms.append(F.conv2d(ggx, w, None, c.stride, c.padding, c.dilation, c.groups))
            if ggw is not None:
                terms.append(F.conv2d(x, ggw, None, c.stride, c.padding, c.dilation, c.groups))
            if ggb is not None:
                terms.append(ggb.view(1, -1, 1, 1).expand_as(gy))
            d_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and ggw is not None:
            d_x = torch.ops.aten.convolution_backward(
                gy, x, ggw, None, c.stride, c.padding, c.dilation, False, [0, 0], c.groups,
                [True, False, False])[0]
        return d_gy, d_x, None, None, None


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward is the differentiable :class:`_Conv2dGrad`."""

    @staticmethod
    def forward(ctx: Any, owner: LeanSecondOrder, x: Tensor, w: Tensor, b: Tensor | None,
                c: _Conv) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.owner, ctx.conv = owner, c
        ctx.set_materialize_grads(False)
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        if not ctx.owner.parameters_wanted:
            need_w = need_b = False
        if gy is None or not (need_x or need_w or need_b):
            return None, None, None, None, None
        gx, gw, gb = _Conv2dGrad.apply(gy, x, w.detach(), ctx.conv,
                                       [need_x, need_w, need_b and ctx.conv.has_bias])
        return None, gx, gw, gb, None


class LeanSecondOrder(TorchFunctionMode):
    """Build a loss whose parameter gradient is cheap to differentiate w.r.t. the inputs.

    Usage (the forward pass inside the mode, the gradients outside)::

        lean = LeanSecondOrder()
        with lean:
            loss = task.loss(params, buffers, batch, {})
        grads = lean.parameter_grads(loss, list(params.values()), create_graph=True)
        (gx,) = torch.autograd.grad(distance(grads, target), images)   # lean double backward

    ``parameter_grads`` equals ``torch.autograd.grad(loss, params, create_graph=...)``; after
    it, parameters are constants for any further derivative through this graph.
    """

    def __init__(self) -> None:
        super().__init__()
        #: True until :meth:`parameter_grads` has run: later passes skip weight gradients
        self.parameters_wanted = True

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, w, *rest = args
            vals = dict(zip(_CONV_ARGS, _CONV_DEFAULTS, strict=True))
            vals.update(zip(_CONV_ARGS, rest, strict=False))
            vals.update(kwargs)
            if not isinstance(vals["padding"], str):
                c = _Conv(_pair(vals["stride"]), _pair(vals["padding"]), _pair(vals["dilation"]),
                          int(vals["groups"]), vals["bias"] is not None)
                return _Conv2d.apply(self, x, w, vals["bias"], c)
        return func(*args, **kwargs)

    def parameter_grads(self, loss: Tensor, params: Sequence[Tensor], *,
                        create_graph: bool) -> tuple[Tensor, ...]:
        """``d loss / d params`` (as :func:`torch.autograd.grad`); afterwards parameters are
        constants for every derivative through the graph built inside this mode."""
        self.parameters_wanted = True
        try:
            return torch.autograd.grad(loss, list(params), create_graph=create_graph)
        finally:
            self.parameters_wanted = False
