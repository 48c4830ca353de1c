"""Reference attack that checks the observation-record contract and reconstructs nothing."""

from __future__ import annotations

import math

import torch

from attacks.base import Attack, Reconstruction
from fl_sim.errors import ThreatModelError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS


@ATTACKS.register("noop")
class Noop(Attack):
    """Contract check: verifies record types/shapes/finiteness, returns no images."""

    def __init__(self, *, view: str = "server") -> None:
        self.view = view  # type: ignore[misc]

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        params = dict(record.global_params)
        for name, upd in record.update.items():
            if name not in params:
                raise ThreatModelError(f"update entry {name!r} has no global parameter")
            if upd.shape != params[name].shape:
                raise ValueError(f"update {name!r} shape {tuple(upd.shape)} != global "
                                 f"{tuple(params[name].shape)}")
            if upd.requires_grad or upd.device.type != "cpu":
                raise ValueError(f"update {name!r} is not a detached CPU copy")
        norm = math.sqrt(sum(float(u.double().pow(2).sum()) for u in record.update.values()))
        c, s = record.spec.in_channels, record.spec.image_size
        return Reconstruction(images=torch.empty(0, c, s, s), labels=None,
                              extras={"update_norm": norm, "num_tensors": len(record.update)})
