"""Analytic inversion of a first fully connected layer, as an fl-sim attack plug-in.

Phong, Aono, Hayashi, Wang, Moriai, "Privacy-Preserving Deep Learning via Additively
Homomorphic Encryption", IEEE TIFS 2018, sec. 3: for ``y = W x + b`` and one example, the
gradient of any loss gives ``dL/dW_i = (dL/db_i) x`` for every output unit ``i``, so
``x = (dL/dW_i) / (dL/db_i)`` for any ``i`` with ``dL/db_i != 0``: the input is read off the
update exactly, without optimisation. A FedAvg delta of one local SGD step is ``-lr`` times
the gradient, and the ratio is the same.
"""

from __future__ import annotations

import torch

from attacks.base import Attack, Reconstruction
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS


@ATTACKS.register("fc_analytic")
class FCAnalytic(Attack):
    """Read the input off the first fully connected layer's update (Phong et al. 2018).

    ``min_bias_update``: smallest ``|dL/db_i|`` a unit may have to be divided by (a smaller
    one only amplifies noise). Returns ONE image ``[1, C, H, W]`` in [0, 1]: with a batch of
    ``B > 1`` the ratio is a gradient-weighted mix of the batch (the paper's limit). Assumes
    (recorded in the result) one image per update and a model whose first trainable layer is
    fully connected over the flattened image. Raises :class:`~fl_sim.errors.ConfigError` when
    the model has no such layer or no unit's bias update exceeds ``min_bias_update``.
    """

    view = "server"                 # what the attack reads: one client's update as received
    needs_client_update = True      # the maths needs ONE client's update, not a SecAgg+ sum

    def __init__(self, *, min_bias_update: float = 1e-10) -> None:
        if not min_bias_update > 0:
            raise ConfigError(f"fc_analytic.min_bias_update: got {min_bias_update!r}; "
                              "allowed: > 0")
        self.min_bias_update = min_bias_update

    def required_knowledge(self) -> tuple[str, ...]:
        return ()  # e.g. ("labels",) would ask the threat model to grant the true labels

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        spec = record.spec
        task = spec.build_task()  # the public architecture: which update entries are which
        pixels = spec.in_channels * spec.image_size ** 2
        weight = next((n for n, p in task.model.named_parameters()
                       if p.ndim == 2 and p.shape[1] == pixels), None)
        if weight is None:
            raise ConfigError(f"fc_analytic: model {spec.model} has no fully connected layer "
                              f"over the {pixels} input pixels")
        bias = weight.removesuffix("weight") + "bias"
        gw = record.update[weight].to(torch.float64)
        gb = record.update[bias].to(torch.float64)
        unit = int(gb.abs().argmax())
        if float(gb[unit].abs()) <= self.min_bias_update:
            raise ConfigError("fc_analytic: every bias update is below min_bias_update")
        z = (gw[unit] / gb[unit]).view(1, spec.in_channels, spec.image_size, spec.image_size)
        mean = torch.tensor(spec.mean, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=z.dtype).view(1, -1, 1, 1)
        image = (z * std + mean).clamp(0, 1).to(torch.float32)  # undo the task's normalisation
        return Reconstruction(images=image, labels=None, iterations=0,
                              knowledge={"num_images": 1, "first_layer": "fully_connected"},
                              extras={"unit": unit, "bias_update": float(gb[unit])})
